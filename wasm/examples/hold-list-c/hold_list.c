/*
 * hold-list: an altroute policy extension in C, written directly against the proxy-wasm
 * ABI 0.2.1 (no SDK, no libc). Built by build.sh with clang --target=wasm32.
 *
 * Plugin configuration: a comma-separated list of recipient domains, e.g.
 * "review.example,audit.example". Mail to those domains whose decision so far delivers
 * (direct, host, alternate) is held: the decision becomes defer with
 * "451 4.7.1 Held for review". Everything else is left as it is. Refusals stay refusals.
 *
 * Header contract: docs/extensions.md. Values are ASCII and percent-encoded, so the
 * recipient's '@' and the domain arrive as written.
 */

typedef unsigned int u32;
typedef unsigned char u8;

#define IMPORT(name) __attribute__((import_module("env"), import_name(name)))
#define EXPORT(name) __attribute__((export_name(name)))

IMPORT("proxy_log") u32 proxy_log(u32 level, const u8 *msg, u32 len);
IMPORT("proxy_get_buffer_bytes") u32 proxy_get_buffer_bytes(u32 type, u32 start, u32 max, u8 **ptr, u32 *len);
IMPORT("proxy_get_header_map_value") u32 proxy_get_header_map_value(u32 map, const u8 *key, u32 key_len, u8 **ptr, u32 *len);
IMPORT("proxy_replace_header_map_value") u32 proxy_replace_header_map_value(u32 map, const u8 *key, u32 key_len, const u8 *val, u32 val_len);
IMPORT("proxy_send_local_response") u32 proxy_send_local_response(u32 status, const u8 *details, u32 details_len, const u8 *body, u32 body_len, const u8 *headers, u32 headers_len, int grpc_status);

enum { MAP_REQUEST_HEADERS = 0, BUFFER_PLUGIN_CONFIGURATION = 7, LOG_INFO = 2, LOG_WARN = 3 };
enum { ACTION_CONTINUE = 0, ACTION_PAUSE = 1 };

/* A bump allocator over a static arena, reset at the start of every callback that
 * receives memory from the host: nothing the host hands over outlives its callback. */
static u8 arena[64 * 1024];
static u32 used;

EXPORT("malloc") void *guest_malloc(u32 n) {
    n = (n + 7u) & ~7u;
    if (n > sizeof(arena) - used) {
        return 0; /* the host reports the failure; we never trap */
    }
    void *p = &arena[used];
    used += n;
    return p;
}

static u32 slen(const char *s) {
    u32 n = 0;
    while (s[n]) n++;
    return n;
}

static int lower(int c) { return (c >= 'A' && c <= 'Z') ? c + 32 : c; }

static int same(const u8 *a, u32 a_len, const u8 *b, u32 b_len) {
    if (a_len != b_len) return 0;
    for (u32 i = 0; i < a_len; i++) {
        if (lower(a[i]) != lower(b[i])) return 0;
    }
    return 1;
}

static void log_str(u32 level, const char *s) { proxy_log(level, (const u8 *)s, slen(s)); }

static u8 domains[4096];
static u32 domains_len;

EXPORT("_initialize") void initialize(void) {}
EXPORT("proxy_abi_version_0_2_1") void abi_version(void) {}
EXPORT("proxy_on_context_create") void on_context_create(u32 id, u32 root) { (void)id; (void)root; }
EXPORT("proxy_on_vm_start") u32 on_vm_start(u32 root, u32 size) { (void)root; (void)size; return 1; }

EXPORT("proxy_on_configure") u32 on_configure(u32 root, u32 size) {
    (void)root;
    used = 0;
    u8 *p = 0;
    u32 n = 0;
    if (size == 0 || proxy_get_buffer_bytes(BUFFER_PLUGIN_CONFIGURATION, 0, size, &p, &n) != 0 || p == 0 || n == 0) {
        log_str(LOG_WARN, "hold-list: no domains configured");
        return 0; /* refuse: an empty list is a configuration mistake */
    }
    if (n > sizeof(domains)) {
        log_str(LOG_WARN, "hold-list: configuration too long (max 4096 bytes)");
        return 0;
    }
    for (u32 i = 0; i < n; i++) domains[i] = p[i];
    domains_len = n;
    log_str(LOG_INFO, "hold-list: configured");
    return 1;
}

/* Whether `domain` is one of the comma-separated configured domains. */
static int listed(const u8 *domain, u32 len) {
    u32 start = 0;
    for (u32 i = 0; i <= domains_len; i++) {
        if (i == domains_len || domains[i] == ',') {
            u32 s = start, e = i;
            while (s < e && (domains[s] == ' ' || domains[s] == '\n')) s++;
            while (e > s && (domains[e - 1] == ' ' || domains[e - 1] == '\n')) e--;
            if (same(domains + s, e - s, domain, len)) return 1;
            start = i + 1;
        }
    }
    return 0;
}

static u32 header(const char *name, u8 **value, u32 *len) {
    return proxy_get_header_map_value(MAP_REQUEST_HEADERS, (const u8 *)name, slen(name), value, len);
}

static void set(const char *name, const char *value) {
    proxy_replace_header_map_value(MAP_REQUEST_HEADERS, (const u8 *)name, slen(name), (const u8 *)value, slen(value));
}

EXPORT("proxy_on_request_headers") u32 on_request_headers(u32 id, u32 n, u32 eos) {
    (void)id; (void)n; (void)eos;
    used = 0;
    u8 *rcpt = 0, *route = 0;
    u32 rcpt_len = 0, route_len = 0;
    if (header("x-altroute-recipient", &rcpt, &rcpt_len) != 0 || rcpt == 0) return ACTION_CONTINUE;
    if (header("x-altroute-route", &route, &route_len) != 0 || route == 0) return ACTION_CONTINUE;
    u32 at = rcpt_len;
    for (u32 i = 0; i < rcpt_len; i++) {
        if (rcpt[i] == '@') at = i;
    }
    if (at == rcpt_len || !listed(rcpt + at + 1, rcpt_len - at - 1)) return ACTION_CONTINUE;
    /* Only a delivering decision is held; defer and bounce stay as they are. */
    if (!same(route, route_len, (const u8 *)"direct", 6) && !same(route, route_len, (const u8 *)"host", 4) &&
        !same(route, route_len, (const u8 *)"alternate", 9)) {
        return ACTION_CONTINUE;
    }
    set("x-altroute-route", "defer");
    set("x-altroute-rule", "extension:hold-list");
    set("x-altroute-reason", "held%20for%20review%20(hold-list)");
    set("x-altroute-reply", "451%204.7.1%20Held%20for%20review");
    static const u8 no_headers[4] = {0, 0, 0, 0};
    const char *body = "451 4.7.1 Held for review";
    if (proxy_send_local_response(503, (const u8 *)"held", 4, (const u8 *)body, slen(body), no_headers, 4, -1) == 0) {
        return ACTION_PAUSE;
    }
    return ACTION_CONTINUE;
}

EXPORT("proxy_on_done") u32 on_done(u32 id) { (void)id; return 1; }
EXPORT("proxy_on_log") void on_log(u32 id) { (void)id; }
EXPORT("proxy_on_delete") void on_delete(u32 id) { (void)id; }
