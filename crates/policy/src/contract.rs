//! The header contract between a host (the altroute relay, Envoy) and a policy module.
//!
//! A routing question is an HTTP request whose headers carry the facts ([`Query`]); the
//! module answers by setting request headers ([`Decision`]), or with a local response
//! (status [`DEFER_STATUS`] or [`BOUNCE_STATUS`], body = the SMTP reply) for a rejection.
//!
//! Values are ASCII. Free text (addresses, reasons, replies) is percent-encoded: every
//! byte outside ` `..`~`, `%`, a space at either end of the value, and `,` in an item of
//! a comma-separated list, becomes `%XX`. So a value never holds CR, LF or NUL, never
//! starts or ends with a space (HTTP drops those), and decoding gives back exactly what
//! was encoded.
//!
//! Every name and value used anywhere in altroute comes from this module.

use crate::query::{Decision, HostTarget, Query, TlsRequirement};
use crate::types::{
    CertStatus, Hop, MinTls, MtaSts, ResultType, Route, Starttls, TlsVersion, Token, Verify,
    parse_yes_no, yes_no,
};

// Facts in (set by the host).
pub const PHASE: &str = "x-altroute-phase";
pub const SENDER: &str = "x-altroute-sender";
pub const RECIPIENT: &str = "x-altroute-recipient";
pub const REQUIRETLS: &str = "x-altroute-requiretls";
pub const TLS_REQUIRED_NO: &str = "x-altroute-tls-required-no";
pub const MX: &str = "x-altroute-mx";
pub const HOP: &str = "x-altroute-hop";
pub const STARTTLS: &str = "x-altroute-starttls";
pub const TLS: &str = "x-altroute-tls";
pub const CERT: &str = "x-altroute-cert";
pub const MTA_STS: &str = "x-altroute-mta-sts";
pub const ATTEMPT: &str = "x-altroute-attempt";

/// Every fact header, in encoding order.
pub const FACT_HEADERS: [&str; 12] = [
    PHASE,
    SENDER,
    RECIPIENT,
    REQUIRETLS,
    TLS_REQUIRED_NO,
    MX,
    HOP,
    STARTTLS,
    TLS,
    CERT,
    MTA_STS,
    ATTEMPT,
];

// Decision out (set by the module).
pub const ROUTE: &str = "x-altroute-route";
pub const HOST: &str = "x-altroute-host";
pub const HOST_ADDRESSES: &str = "x-altroute-host-addresses";
pub const HOST_PORT: &str = "x-altroute-host-port";
pub const HOST_MX_LOOKUP: &str = "x-altroute-host-mx-lookup";
pub const TLS_REQUIRED: &str = "x-altroute-tls-required";
pub const TLS_VERIFY: &str = "x-altroute-tls-verify";
pub const TLS_MIN: &str = "x-altroute-tls-min";
pub const RULE: &str = "x-altroute-rule";
pub const POLICY_VERSION: &str = "x-altroute-policy-version";
pub const RESULT: &str = "x-altroute-result";
pub const REASON: &str = "x-altroute-reason";
pub const REPLY: &str = "x-altroute-reply";

/// Every decision header a module may set. A host removes these from the facts it sends,
/// so that a decision can only come from the module.
pub const DECISION_HEADERS: [&str; 13] = [
    ROUTE,
    HOST,
    HOST_ADDRESSES,
    HOST_PORT,
    HOST_MX_LOOKUP,
    TLS_REQUIRED,
    TLS_VERIFY,
    TLS_MIN,
    RULE,
    POLICY_VERSION,
    RESULT,
    REASON,
    REPLY,
];

/// The HTTP status of the local response that answers a `defer` (body: the 4xx reply).
pub const DEFER_STATUS: u32 = 503;
/// The HTTP status of the local response that answers a `bounce` (body: the 5xx reply).
pub const BOUNCE_STATUS: u32 = 403;

/// Why a set of headers is not a valid query or decision.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContractError {
    #[error("header {0} is missing")]
    Missing(&'static str),
    #[error("header {name} has an invalid value {value:?}")]
    Invalid { name: &'static str, value: String },
    /// A fact given twice: which one a decision is about would be a guess, and whoever
    /// acts on the request (an upstream behind Envoy's HTTP face) might take the other.
    #[error("header {0} is given more than once")]
    Repeated(&'static str),
}

/// Percent-encode free text for a header value: every byte outside ` `..`~`, `%`, and a
/// space at either end (HTTP drops the spaces around a header value) as `%XX`.
pub fn encode_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_text_into(s, &mut out);
    out
}

/// [`encode_text`], appended to `out`. Runs of bytes that need no escape are copied in
/// one piece (most text is one run, a reason included), not byte by byte.
pub fn encode_text_into(s: &str, out: &mut String) {
    encode_into(s, b'%', out);
}

/// [`encode_text_into`] for one item of a comma-separated list (a host's addresses): `,`
/// is escaped as well.
fn encode_item_into(s: &str, out: &mut String) {
    encode_into(s, b',', out);
}

/// Escapes what [`encode_text`] escapes, and `also`.
fn encode_into(s: &str, also: u8, out: &mut String) {
    let bytes = s.as_bytes();
    if plain_text(bytes, b'%', also) {
        out.push_str(s);
        return;
    }
    // At most three bytes out per byte in: no growth on the way.
    out.reserve(bytes.len() * 3);
    let last = bytes.len() - 1;
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if PLAIN[b as usize] && b != also && (b != b' ' || (i != 0 && i != last)) {
            continue;
        }
        if run < i {
            // `s[run..i]` is ASCII and follows a char start: both ends are boundaries.
            out.push_str(&s[run..i]);
        }
        // One `push_str` of `%XX` from a table (three `push`es of chars cost more in
        // the wasm module, where this runs for every decision).
        let at = b as usize * 3;
        out.push_str(&ESCAPES[at..at + 3]);
        run = i + 1;
    }
    // `run` is the end, or an unescaped (ASCII) byte: a boundary.
    if run < bytes.len() {
        out.push_str(&s[run..]);
    }
}

/// Whether `bytes` need no escape: every byte is in ` `..`~` and is neither `x` nor `y`,
/// and there is no space at either end. Eight bytes per step (SWAR): every decision's
/// text values go through this check twice, in the module and in the relay, and a reason
/// (a sentence of about 140 bytes) that passes it is copied in one piece on both sides
/// instead of byte by byte (BENCHMARKS.md, decision latency). A crate for this would
/// bring SIMD code per target; these four word tests are exact as booleans (Sean
/// Anderson's "bit twiddling hacks": `hasless`, `hasmore`, `haszero`), and a test
/// compares them with the byte-per-step definition on every byte at every position.
fn plain_text(bytes: &[u8], x: u8, y: u8) -> bool {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGH: u64 = ONES * 0x80;
    if bytes.first() == Some(&b' ') || bytes.last() == Some(&b' ') {
        return false;
    }
    let zero_byte = |v: u64| v.wrapping_sub(ONES) & !v & HIGH != 0;
    let (words, rest) = bytes.as_chunks::<8>();
    for w in words {
        let w = u64::from_le_bytes(*w);
        // A byte below ` ` (0x20), a byte above `~` (0x7e), or `x` or `y`.
        let below = w.wrapping_sub(ONES * 0x20) & !w & HIGH != 0;
        let above = (w.wrapping_add(ONES) | w) & HIGH != 0;
        if below
            || above
            || zero_byte(w ^ (ONES * u64::from(x)))
            || zero_byte(w ^ (ONES * u64::from(y)))
        {
            return false;
        }
    }
    rest.iter()
        .all(|&b| (b' '..=b'~').contains(&b) && b != x && b != y)
}

/// `%00%01…%FF`: the escape of byte `b` is `ESCAPES[3 * b..3 * b + 3]`.
const ESCAPES: &str = {
    const BYTES: [u8; 768] = {
        let mut t = [0u8; 768];
        let mut b = 0;
        while b < 256 {
            t[b * 3] = b'%';
            t[b * 3 + 1] = HEX[b >> 4];
            t[b * 3 + 2] = HEX[b & 15];
            b += 1;
        }
        t
    };
    match std::str::from_utf8(&BYTES) {
        Ok(s) => s,
        Err(_) => panic!("the escape table is ASCII"),
    }
};

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes [`encode_text`] copies as they are (a space only inside the text): ` `..`~`
/// except `%`. A table: one load per byte instead of three comparisons (this runs on
/// every decision header).
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = b' ';
    while b <= b'~' {
        t[b as usize] = b != b'%';
        b += 1;
    }
    t
};

/// Decode a percent-encoded header value. `None` for bad escapes or non-UTF-8 results.
pub fn decode_text(v: &[u8]) -> Option<String> {
    // Most values (addresses, names, versions, reasons) have no escape: checked and
    // copied in one piece.
    if plain_text(v, b'%', b'%') {
        return String::from_utf8(v.to_vec()).ok();
    }
    // A space at either end is never written as it is (HTTP would have dropped it).
    if v.first() == Some(&b' ') || v.last() == Some(&b' ') {
        return None;
    }
    // Text with escapes byte by byte into reserved room: cheaper than a copy per run
    // between escapes.
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while let Some(&b) = v.get(i) {
        if b == b'%' {
            let (hi, lo) = (*v.get(i + 1)?, *v.get(i + 2)?);
            out.push(hex_val(hi)? << 4 | hex_val(lo)?);
            i += 3;
        } else if (b' '..=b'~').contains(&b) {
            out.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// [`decode_text`] into `out` (cleared first): a value without escapes (the usual fact:
/// an address, a host name) reuses `out`'s room. `false` for bad escapes or non-UTF-8
/// results, and `out` is then empty.
pub fn decode_text_into(v: &[u8], out: &mut String) -> bool {
    out.clear();
    if plain_text(v, b'%', b'%') {
        return match std::str::from_utf8(v) {
            Ok(s) => {
                out.push_str(s);
                true
            }
            Err(_) => false,
        };
    }
    match decode_text(v) {
        Some(s) => {
            out.push_str(&s);
            true
        }
        None => false,
    }
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Encode a query as header pairs (in [`FACT_HEADERS`] order).
pub fn encode_query(q: &Query) -> Vec<(&'static str, String)> {
    let mut buf = String::new();
    encode_query_into(q, &mut buf)
        .into_iter()
        .map(|(name, at)| (name, buf[at].to_string()))
        .collect()
}

/// [`encode_query`] into one buffer: `buf` is cleared and holds every value; each pair
/// is the name and where its value is in `buf`. A host asking for a decision encodes the
/// facts with one allocation (or none, when it keeps `buf`).
pub fn encode_query_into(
    q: &Query,
    buf: &mut String,
) -> [(&'static str, std::ops::Range<usize>); FACT_HEADERS.len()] {
    buf.clear();
    let mut put = |fill: &dyn Fn(&mut String)| {
        let start = buf.len();
        fill(buf);
        start..buf.len()
    };
    [
        (PHASE, put(&|b| b.push_str(q.phase.token()))),
        (SENDER, put(&|b| encode_text_into(&q.sender, b))),
        (RECIPIENT, put(&|b| encode_text_into(&q.recipient, b))),
        (REQUIRETLS, put(&|b| b.push_str(yes_no(q.requiretls)))),
        (
            TLS_REQUIRED_NO,
            put(&|b| b.push_str(yes_no(q.tls_required_no))),
        ),
        (MX, put(&|b| encode_text_into(&q.mx, b))),
        (HOP, put(&|b| b.push_str(q.hop.token()))),
        (STARTTLS, put(&|b| b.push_str(q.starttls.token()))),
        (TLS, put(&|b| b.push_str(q.tls.token()))),
        (CERT, put(&|b| b.push_str(q.cert.token()))),
        (MTA_STS, put(&|b| b.push_str(q.mta_sts.token()))),
        (
            ATTEMPT,
            put(&|b| {
                use std::fmt::Write;
                // Writing to a String cannot fail.
                let _ = write!(b, "{}", q.attempt);
            }),
        ),
    ]
}

/// [`encode_query_into`] without the facts that hold their default value
/// ([`Query::default`]; phase and recipient are always there): [`decode_query`] gives the
/// same query back. Returns the array and how many of its first pairs are in use.
///
/// The relay asks with this form. A plan query usually carries 3 facts instead of 12, a
/// verdict 4 to 9: every fact left out is a header the host does not store and serialize
/// and the module does not parse and decode (BENCHMARKS.md, decision latency).
pub fn encode_query_compact_into(
    q: &Query,
    buf: &mut String,
) -> (
    [(&'static str, std::ops::Range<usize>); FACT_HEADERS.len()],
    usize,
) {
    let mut facts = encode_query_into(q, buf);
    let d = Query::default();
    // By name, not by position in `encode_query_into`'s list.
    let at_default = |name: &str| match name {
        SENDER => q.sender == d.sender,
        REQUIRETLS => q.requiretls == d.requiretls,
        TLS_REQUIRED_NO => q.tls_required_no == d.tls_required_no,
        MX => q.mx == d.mx,
        HOP => q.hop == d.hop,
        STARTTLS => q.starttls == d.starttls,
        TLS => q.tls == d.tls,
        CERT => q.cert == d.cert,
        MTA_STS => q.mta_sts == d.mta_sts,
        ATTEMPT => q.attempt == d.attempt,
        // Phase and recipient are required.
        _ => false,
    };
    let mut n = 0;
    for i in 0..facts.len() {
        if !at_default(facts[i].0) {
            facts.swap(n, i);
            n += 1;
        }
    }
    (facts, n)
}

/// Decode a query from headers, looked up by name with `get` (raw bytes, as a host or the
/// proxy-wasm SDK's `_bytes` calls give them). Phase and recipient are required; the
/// other facts default as in [`Query::default`].
pub fn decode_query<'a>(get: impl Source<'a>) -> Result<Query, ContractError> {
    let mut q = Query::default();
    decode_query_into(get, &mut q)?;
    Ok(q)
}

/// [`decode_query`], written over `q`: every fact is set (to its default when absent) and
/// the room of `q`'s strings is reused, so a caller that keeps `q` decodes without
/// allocating (the wasm module does, on every routing question). On an error `q` holds
/// part of the facts and must not be used.
pub fn decode_query_into<'a>(get: impl Source<'a>, q: &mut Query) -> Result<(), ContractError> {
    if let Some(name) = get.repeated_fact() {
        return Err(ContractError::Repeated(name));
    }
    let d = Query::default();
    q.phase = token(&get, at::PHASE)?.ok_or(ContractError::Missing(PHASE))?;
    if !text_into(&get, at::RECIPIENT, &mut q.recipient)? {
        return Err(ContractError::Missing(RECIPIENT));
    }
    if !crate::pattern::is_mailbox(&q.recipient) {
        return Err(ContractError::Invalid {
            name: RECIPIENT,
            value: q.recipient.clone(),
        });
    }
    if !text_into(&get, at::SENDER, &mut q.sender)? {
        q.sender.clear();
    }
    if !q.sender.is_empty() && !crate::pattern::is_mailbox(&q.sender) {
        return Err(ContractError::Invalid {
            name: SENDER,
            value: q.sender.clone(),
        });
    }
    q.requiretls = yes_no_header(&get, at::REQUIRETLS)?.unwrap_or(d.requiretls);
    q.tls_required_no = yes_no_header(&get, at::TLS_REQUIRED_NO)?.unwrap_or(d.tls_required_no);
    if !text_into(&get, at::MX, &mut q.mx)? {
        q.mx.clear();
    }
    q.hop = token::<Hop>(&get, at::HOP)?.unwrap_or(d.hop);
    q.starttls = token::<Starttls>(&get, at::STARTTLS)?.unwrap_or(d.starttls);
    q.tls = token::<TlsVersion>(&get, at::TLS)?.unwrap_or(d.tls);
    q.cert = token::<CertStatus>(&get, at::CERT)?.unwrap_or(d.cert);
    q.mta_sts = token::<MtaSts>(&get, at::MTA_STS)?.unwrap_or(d.mta_sts);
    q.attempt = match get.value(at::ATTEMPT.0, ATTEMPT) {
        None => d.attempt,
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(ATTEMPT, raw))?,
    };
    Ok(())
}

/// Encode a decision as header pairs. Absent optional parts are left out.
pub fn encode_decision(d: &Decision) -> Vec<(&'static str, String)> {
    let mut h = Vec::with_capacity(DECISION_HEADERS.len());
    let mut buf = String::new();
    for_each_decision_header(d, &mut buf, |name, value| h.push((name, value.to_string())));
    h
}

/// The pairs of [`encode_decision`], in the same order, handed to `f` one by one with
/// the value built in `buf` (cleared before each header): a caller that keeps `buf`
/// encodes a decision without allocating.
pub fn for_each_decision_header(
    d: &Decision,
    buf: &mut String,
    mut f: impl FnMut(&'static str, &str),
) {
    let mut emit = |name: &'static str, buf: &mut String, fill: &dyn Fn(&mut String)| {
        buf.clear();
        fill(buf);
        f(name, buf);
    };
    emit(ROUTE, buf, &|b| b.push_str(d.route.token()));
    if let Some(host) = &d.host {
        emit(HOST, buf, &|b| encode_text_into(&host.name, b));
        emit(HOST_ADDRESSES, buf, &|b| {
            for (i, a) in host.addresses.iter().enumerate() {
                if i > 0 {
                    b.push(',');
                }
                encode_item_into(a, b);
            }
        });
        emit(HOST_PORT, buf, &|b| push_decimal(host.port, b));
        emit(HOST_MX_LOOKUP, buf, &|b| b.push_str(yes_no(host.mx_lookup)));
    }
    emit(TLS_REQUIRED, buf, &|b| b.push_str(yes_no(d.tls.required)));
    emit(TLS_VERIFY, buf, &|b| b.push_str(d.tls.verify.token()));
    emit(TLS_MIN, buf, &|b| b.push_str(d.tls.min.token()));
    emit(RULE, buf, &|b| encode_text_into(&d.rule, b));
    emit(POLICY_VERSION, buf, &|b| {
        encode_text_into(&d.policy_version, b)
    });
    emit(RESULT, buf, &|b| b.push_str(d.result.token()));
    emit(REASON, buf, &|b| encode_text_into(&d.reason, b));
    if let Some(r) = &d.reply {
        emit(REPLY, buf, &|b| encode_text_into(r, b));
    }
}

/// `n` in decimal, without the formatting machinery (which cost more than the rest of a
/// header in the wasm module).
fn push_decimal(mut n: u16, out: &mut String) {
    let mut digits = [0u8; 5];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend(digits[at..].iter().map(|&d| char::from(d)));
}

/// Decode a decision from headers. Route, TLS requirement, rule and policy version are
/// required: a decision that does not name them is not a decision.
pub fn decode_decision<'a>(get: impl Source<'a>) -> Result<Decision, ContractError> {
    let route: Route = token(&get, at::ROUTE)?.ok_or(ContractError::Missing(ROUTE))?;
    let host = match text(&get, at::HOST)? {
        None => None,
        Some(name) => {
            let addresses = match get.value(at::HOST_ADDRESSES.0, HOST_ADDRESSES) {
                None | Some([]) => Vec::new(),
                Some(raw) => raw
                    .split(|b| *b == b',')
                    .map(|a| decode_text(a).ok_or_else(|| invalid(HOST_ADDRESSES, raw)))
                    .collect::<Result<_, _>>()?,
            };
            let port = match get.value(at::HOST_PORT.0, HOST_PORT) {
                None => 25,
                Some(raw) => std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| invalid(HOST_PORT, raw))?,
            };
            let mx_lookup = yes_no_header(&get, at::HOST_MX_LOOKUP)?.unwrap_or(false);
            Some(HostTarget {
                name,
                addresses,
                port,
                mx_lookup,
            })
        }
    };
    let tls = TlsRequirement {
        required: yes_no_header(&get, at::TLS_REQUIRED)?
            .ok_or(ContractError::Missing(TLS_REQUIRED))?,
        verify: token::<Verify>(&get, at::TLS_VERIFY)?.ok_or(ContractError::Missing(TLS_VERIFY))?,
        min: token::<MinTls>(&get, at::TLS_MIN)?.ok_or(ContractError::Missing(TLS_MIN))?,
    };
    Ok(Decision {
        route,
        host,
        tls,
        rule: text(&get, at::RULE)?.ok_or(ContractError::Missing(RULE))?,
        policy_version: text(&get, at::POLICY_VERSION)?
            .ok_or(ContractError::Missing(POLICY_VERSION))?,
        result: token::<ResultType>(&get, at::RESULT)?.unwrap_or(ResultType::Success),
        reason: text(&get, at::REASON)?.map(cut_reason).unwrap_or_default(),
        reply: text(&get, at::REPLY)?.filter(|r| is_reply_for(route, r)),
    })
}

/// The longest SMTP reply a decision may carry: one line of 512 octets with its CRLF
/// (RFC 5321 §4.5.3.1.5).
pub const MAX_REPLY: usize = 510;

/// The longest reason kept from a decision (longer ones are cut, marked with `…`).
pub const MAX_REASON: usize = 1000;

/// Whether `reply` can answer a recipient for `route`: one line of at most [`MAX_REPLY`]
/// octets that starts with a reply code of the route's class (4xx for `defer`, 5xx for
/// `bounce`) and a space or its end. Another reply is dropped from the decision, and the
/// relay writes its own: a module's 15 MiB local response once became a recipient's
/// reply, stored again at every attempt (a gigabyte of spool), and a `defer` with a
/// `550` reply showed a permanent error on mail that was retried.
pub fn is_reply_for(route: Route, reply: &str) -> bool {
    let b = reply.as_bytes();
    let class = match route {
        Route::Defer => b'4',
        Route::Bounce => b'5',
        _ => return false,
    };
    b.len() <= MAX_REPLY
        && b.len() >= 3
        && b[0] == class
        && b[1..3].iter().all(u8::is_ascii_digit)
        && b.get(3).is_none_or(|&c| c == b' ')
        && !b.iter().any(|&c| c == b'\r' || c == b'\n')
}

/// `reason`, cut to [`MAX_REASON`] bytes (at a character boundary) and marked.
fn cut_reason(mut reason: String) -> String {
    if reason.len() > MAX_REASON {
        let mut end = MAX_REASON;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        reason.push('…');
    }
    reason
}

/// An invalid value, named in the error by its first 64 bytes and its length: an
/// audit's 1 MB value was copied whole into every warning about it (4 MB of log per
/// question).
fn invalid(name: &'static str, raw: &[u8]) -> ContractError {
    const SHOWN: usize = 64;
    let value = if raw.len() > SHOWN {
        format!(
            "{}… ({} bytes)",
            String::from_utf8_lossy(&raw[..SHOWN]),
            raw.len()
        )
    } else {
        String::from_utf8_lossy(raw).into_owned()
    };
    ContractError::Invalid { name, value }
}

fn text<'a>(get: &impl Source<'a>, (slot, name): Slot) -> Result<Option<String>, ContractError> {
    match get.value(slot, name) {
        None => Ok(None),
        Some(raw) => decode_text(raw).map(Some).ok_or_else(|| invalid(name, raw)),
    }
}

/// [`text`] into `out`: `Ok(false)` when the header is absent (`out` untouched).
fn text_into<'a>(
    get: &impl Source<'a>,
    (slot, name): Slot,
    out: &mut String,
) -> Result<bool, ContractError> {
    match get.value(slot, name) {
        None => Ok(false),
        Some(raw) if decode_text_into(raw, out) => Ok(true),
        Some(raw) => Err(invalid(name, raw)),
    }
}

fn token<'a, T: Token>(
    get: &impl Source<'a>,
    (slot, name): Slot,
) -> Result<Option<T>, ContractError> {
    match get.value(slot, name) {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(T::parse_token)
            .map(Some)
            .ok_or_else(|| invalid(name, raw)),
    }
}

fn yes_no_header<'a>(
    get: &impl Source<'a>,
    (slot, name): Slot,
) -> Result<Option<bool>, ContractError> {
    match get.value(slot, name) {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(parse_yes_no)
            .map(Some)
            .ok_or_else(|| invalid(name, raw)),
    }
}

/// Where the decoders read header values: any name lookup (`Fn(&str) -> Option<&[u8]>`),
/// or an [`Index`] of a list of pairs, which answers without a search.
pub trait Source<'a> {
    /// The value of the contract header `name`, whose index in [`FACT_HEADERS`] then
    /// [`DECISION_HEADERS`] is `slot`.
    fn value(&self, slot: usize, name: &'static str) -> Option<&'a [u8]>;

    /// A fact header given more than once, if any (the facts are then refused).
    fn repeated_fact(&self) -> Option<&'static str> {
        None
    }
}

impl<'a, F: Fn(&str) -> Option<&'a [u8]>> Source<'a> for F {
    fn value(&self, _slot: usize, name: &'static str) -> Option<&'a [u8]> {
        self(name)
    }
}

/// A list of header pairs, indexed once by contract header: a decision reads a dozen
/// headers out of two dozen, and a scan per header cost more than the decision itself.
pub struct Index<'a, K, V> {
    pairs: &'a [(K, V)],
    slots: [Option<&'a [u8]>; SLOTS],
    /// The slot of the first fact header seen twice.
    repeated: Option<usize>,
}

impl<'a, K: AsRef<[u8]>, V: AsRef<[u8]>> Index<'a, K, V> {
    /// The first value of header `name` (ASCII case-insensitive, as HTTP compares names).
    pub fn get(&self, name: &str) -> Option<&'a [u8]> {
        match slot_of(name.as_bytes()) {
            Some(i) => self.slots[i],
            None => self
                .pairs
                .iter()
                .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name.as_bytes()))
                .map(|(_, v)| v.as_ref()),
        }
    }
}

impl<K, V> Index<'_, K, V> {
    /// The decision headers present in the indexed list, as spelled in
    /// [`DECISION_HEADERS`] (a module drops these from a request before it answers).
    pub fn decision_headers(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.slots[FACT_HEADERS.len()..]
            .iter()
            .zip(DECISION_HEADERS)
            .filter(|(v, _)| v.is_some())
            .map(|(_, name)| name)
    }
}

impl<'a, K, V> Source<'a> for Index<'a, K, V> {
    fn value(&self, slot: usize, _name: &'static str) -> Option<&'a [u8]> {
        self.slots[slot]
    }

    fn repeated_fact(&self) -> Option<&'static str> {
        self.repeated.map(slot_name)
    }
}

/// A borrowed index reads the same (the module decodes from an index it keeps).
impl<'a, K, V> Source<'a> for &Index<'a, K, V> {
    fn value(&self, slot: usize, name: &'static str) -> Option<&'a [u8]> {
        (**self).value(slot, name)
    }

    fn repeated_fact(&self) -> Option<&'static str> {
        (**self).repeated_fact()
    }
}

/// Index a list of header pairs for the decoders ([`Index::get`] for any other name).
/// Of repeated names, the first counts; a repeated fact header makes the facts invalid
/// ([`ContractError::Repeated`]).
pub fn lookup<'a, K: AsRef<[u8]>, V: AsRef<[u8]>>(pairs: &'a [(K, V)]) -> Index<'a, K, V> {
    let mut slots: [Option<&'a [u8]>; SLOTS] = [None; SLOTS];
    let mut repeated = None;
    for (k, v) in pairs {
        if let Some(i) = slot_of(k.as_ref()) {
            if slots[i].is_none() {
                slots[i] = Some(v.as_ref());
            } else if i < FACT_HEADERS.len() {
                repeated = repeated.or(Some(i));
            }
        }
    }
    Index {
        pairs,
        slots,
        repeated,
    }
}

/// A contract header: its slot (see [`Source::value`]) and name.
type Slot = (usize, &'static str);

/// The slot of every contract header.
mod at {
    use super::{SLOTS, Slot, slot_name};

    /// The slot of `name`, found at compile time (a name missing from the lists does
    /// not compile).
    const fn slot(name: &'static str) -> Slot {
        let mut i = 0;
        while i < SLOTS {
            let candidate = slot_name(i);
            if candidate.len() == name.len() {
                let (a, b) = (candidate.as_bytes(), name.as_bytes());
                let mut j = 0;
                while j < a.len() && a[j] == b[j] {
                    j += 1;
                }
                if j == a.len() {
                    return (i, name);
                }
            }
            i += 1;
        }
        panic!("not a contract header")
    }

    pub(super) const PHASE: Slot = slot(super::PHASE);
    pub(super) const SENDER: Slot = slot(super::SENDER);
    pub(super) const RECIPIENT: Slot = slot(super::RECIPIENT);
    pub(super) const REQUIRETLS: Slot = slot(super::REQUIRETLS);
    pub(super) const TLS_REQUIRED_NO: Slot = slot(super::TLS_REQUIRED_NO);
    pub(super) const MX: Slot = slot(super::MX);
    pub(super) const HOP: Slot = slot(super::HOP);
    pub(super) const STARTTLS: Slot = slot(super::STARTTLS);
    pub(super) const TLS: Slot = slot(super::TLS);
    pub(super) const CERT: Slot = slot(super::CERT);
    pub(super) const MTA_STS: Slot = slot(super::MTA_STS);
    pub(super) const ATTEMPT: Slot = slot(super::ATTEMPT);
    pub(super) const ROUTE: Slot = slot(super::ROUTE);
    pub(super) const HOST: Slot = slot(super::HOST);
    pub(super) const HOST_ADDRESSES: Slot = slot(super::HOST_ADDRESSES);
    pub(super) const HOST_PORT: Slot = slot(super::HOST_PORT);
    pub(super) const HOST_MX_LOOKUP: Slot = slot(super::HOST_MX_LOOKUP);
    pub(super) const TLS_REQUIRED: Slot = slot(super::TLS_REQUIRED);
    pub(super) const TLS_VERIFY: Slot = slot(super::TLS_VERIFY);
    pub(super) const TLS_MIN: Slot = slot(super::TLS_MIN);
    pub(super) const RULE: Slot = slot(super::RULE);
    pub(super) const POLICY_VERSION: Slot = slot(super::POLICY_VERSION);
    pub(super) const RESULT: Slot = slot(super::RESULT);
    pub(super) const REASON: Slot = slot(super::REASON);
    pub(super) const REPLY: Slot = slot(super::REPLY);
}

/// The decision header `name` is, as spelled in [`DECISION_HEADERS`] (names compare
/// ASCII case-insensitively); `None` for any other name.
pub fn decision_header(name: &[u8]) -> Option<&'static str> {
    let i = slot_of(name)?.checked_sub(FACT_HEADERS.len())?;
    Some(DECISION_HEADERS[i])
}

/// Fact and decision headers: the slots of [`lookup`]'s index.
const SLOTS: usize = FACT_HEADERS.len() + DECISION_HEADERS.len();

/// The index of a contract header name in [`FACT_HEADERS`] then [`DECISION_HEADERS`],
/// ASCII case-insensitively; `None` for any other name.
/// What every contract header name starts with.
const PREFIX: &[u8] = b"x-altroute-";

fn slot_of(name: &[u8]) -> Option<usize> {
    let head = name.get(..PREFIX.len())?;
    if head != PREFIX && !head.eq_ignore_ascii_case(PREFIX) {
        return None;
    }
    let rest = &name[PREFIX.len()..];
    if let Some(i) = suffix_slot(rest) {
        return Some(i);
    }
    // Names arrive lower-cased from every host (HTTP/2 and Envoy's header maps are
    // lower case); others are lower-cased here, on the stack.
    let mut lower = [0u8; 32];
    let b = lower.get_mut(..rest.len())?;
    b.copy_from_slice(rest);
    b.make_ascii_lowercase();
    suffix_slot(b)
}

fn suffix_slot(rest: &[u8]) -> Option<usize> {
    // Only the few names of the same length are compared (one or two of the 25).
    let candidates = BY_LENGTH.get(rest.len())?;
    candidates
        .iter()
        .take_while(|&&i| i != NONE)
        .map(|&i| usize::from(i))
        .find(|&i| &slot_name(i).as_bytes()[PREFIX.len()..] == rest)
}

/// The contract header name of slot `i` (see [`lookup`]).
const fn slot_name(i: usize) -> &'static str {
    if i < FACT_HEADERS.len() {
        FACT_HEADERS[i]
    } else {
        DECISION_HEADERS[i - FACT_HEADERS.len()]
    }
}

/// An empty place in [`BY_LENGTH`].
const NONE: u8 = u8::MAX;

/// The slots of the names whose part after [`PREFIX`] is `n` bytes long, for each `n`,
/// built at compile time from the header lists (a list that outgrows the table does not
/// compile).
const BY_LENGTH: [[u8; 4]; 32] = {
    let mut t = [[NONE; 4]; 32];
    let mut i = 0;
    while i < SLOTS {
        let n = slot_name(i).len() - PREFIX.len();
        let mut j = 0;
        while t[n][j] != NONE {
            j += 1;
        }
        t[n][j] = i as u8;
        i += 1;
    }
    t
};

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// Calls `f` with every sequence of up to `max_len` items of `alphabet`.
    fn every_sequence<T: Copy>(alphabet: &[T], max_len: u32, mut f: impl FnMut(&[T])) {
        let mut seq = Vec::new();
        for len in 0..=max_len {
            for n in 0..alphabet.len().pow(len) {
                seq.clear();
                let mut n = n;
                for _ in 0..len {
                    seq.push(alphabet[n % alphabet.len()]);
                    n /= alphabet.len();
                }
                f(&seq);
            }
        }
    }

    /// The byte-at-a-time definition `encode_text_into` (`also` = `%`) and
    /// `encode_item_into` (`also` = `,`) must match exactly.
    fn reference(s: &str, also: u8) -> String {
        let mut out = String::new();
        let last = s.len().saturating_sub(1);
        for (i, &b) in s.as_bytes().iter().enumerate() {
            let at_an_end = i == 0 || i == last;
            if (b' '..=b'~').contains(&b) && b != b'%' && b != also && !(b == b' ' && at_an_end) {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    #[test]
    fn every_contract_name_has_its_own_slot() {
        let names = FACT_HEADERS.iter().chain(DECISION_HEADERS.iter());
        for (i, name) in names.enumerate() {
            assert_eq!(slot_of(name.as_bytes()), Some(i), "{name}");
            assert_eq!(
                slot_of(name.to_ascii_uppercase().as_bytes()),
                Some(i),
                "{name}"
            );
        }
        for name in DECISION_HEADERS {
            assert_eq!(
                decision_header(name.to_ascii_uppercase().as_bytes()),
                Some(name)
            );
        }
        for name in FACT_HEADERS {
            assert_eq!(decision_header(name.as_bytes()), None);
        }
        for other in [
            "",
            ":path",
            "x-altroute-",
            "x-altroute-other",
            "x-altroutes-route",
        ] {
            assert_eq!(slot_of(other.as_bytes()), None, "{other}");
        }
        // The index finds what a scan finds: the first of repeated names, any case.
        let pairs = [
            ("X-Altroute-Route", "host"),
            ("x-altroute-route", "direct"),
            (":path", "/decide"),
        ];
        let index = lookup(&pairs);
        assert_eq!(index.get(ROUTE), Some(&b"host"[..]));
        assert_eq!(index.get(":PATH"), Some(&b"/decide"[..]));
        assert_eq!(index.get(HOST), None);
        assert_eq!(index.value(at::ROUTE.0, ROUTE), Some(&b"host"[..]));
        let all = FACT_HEADERS.iter().chain(DECISION_HEADERS.iter());
        for (i, name) in all.enumerate() {
            let pairs = [(*name, "v")];
            let index = lookup(&pairs);
            assert_eq!(index.value(i, name), Some(&b"v"[..]), "{name}");
        }
    }

    /// A decision's reply is kept only when it is one reply line of the route's class,
    /// its reason is cut, and an invalid value is named by its start and length: an
    /// audit's module answered 15 MiB replies (stored again at every attempt) and a
    /// `defer` with a `550` reply, and a 1 MB invalid value filled the log.
    #[test]
    fn replies_and_reasons_are_bounded() {
        let decode = |route: &str, reply: Option<&str>, reason: &str| {
            let mut pairs = vec![
                (ROUTE, route.to_string()),
                (TLS_REQUIRED, "yes".to_string()),
                (TLS_VERIFY, "ca".to_string()),
                (TLS_MIN, "1.2".to_string()),
                (RULE, "r".to_string()),
                (POLICY_VERSION, "v".to_string()),
                (REASON, encode_text(reason)),
            ];
            if let Some(r) = reply {
                pairs.push((REPLY, encode_text(r)));
            }
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            decode_decision(lookup(&pairs)).unwrap()
        };
        let ok = "451 4.7.10 TLS required, will retry";
        assert_eq!(decode("defer", Some(ok), "x").reply.as_deref(), Some(ok));
        assert_eq!(
            decode("defer", Some("451"), "x").reply.as_deref(),
            Some("451")
        );
        let bounce = "550 5.7.10 TLS required";
        assert_eq!(
            decode("bounce", Some(bounce), "x").reply.as_deref(),
            Some(bounce)
        );
        let long = format!("451 {}", "A".repeat(MAX_REPLY));
        for (route, reply) in [
            ("defer", long.as_str()),
            ("defer", "550 5.7.1 extension says no"),
            ("bounce", "451 4.7.0 later"),
            ("bounce", "250 2.0.0 ok"),
            ("defer", "451 4.7.0 a\r\n250 ok"),
            ("defer", "4510 x"),
            ("defer", "45"),
            ("direct", "451 4.7.0 x"),
        ] {
            assert_eq!(
                decode(route, Some(reply), "x").reply,
                None,
                "{route} {reply:?}"
            );
        }
        let d = decode("defer", None, &"é".repeat(MAX_REASON));
        assert!(d.reason.len() <= MAX_REASON + '…'.len_utf8());
        assert!(d.reason.ends_with("é…"), "{}", d.reason);
        assert_eq!(decode("defer", None, "short").reason, "short");
        let big = "z".repeat(1_000_000);
        let pairs = [(ROUTE, big.as_str())];
        let err = decode_decision(lookup(&pairs)).unwrap_err().to_string();
        assert!(err.len() < 200 && err.contains("(1000000 bytes)"), "{err}");
    }

    #[test]
    fn the_word_scan_matches_the_byte_scan_at_every_position() {
        let by_byte = |b: &[u8], x: u8, y: u8| {
            b.first() != Some(&b' ')
                && b.last() != Some(&b' ')
                && b.iter()
                    .all(|&c| (b' '..=b'~').contains(&c) && c != x && c != y)
        };
        // Every byte value at every position of plain words of several lengths (the
        // word loop, the tail, and both), with the two excluded bytes of each caller.
        for len in [1usize, 7, 8, 9, 16, 23] {
            for at in 0..len {
                for v in 0..=255u8 {
                    let mut b = vec![b'a'; len];
                    b[at] = v;
                    for (x, y) in [(b'%', b','), (b'%', b'%')] {
                        assert_eq!(
                            super::plain_text(&b, x, y),
                            by_byte(&b, x, y),
                            "{b:?} without {x} {y}"
                        );
                    }
                }
            }
        }
        // Words mixing bytes at and around every bound (borrows and carries across
        // bytes), from a fixed pseudo-random sequence.
        let near = [
            0x00u8, 0x1f, 0x20, 0x21, 0x22, 0x24, 0x25, 0x26, 0x2b, 0x2c, 0x2d, 0x61, 0x7d, 0x7e,
            0x7f, 0x80, 0xa1, 0xfe, 0xff,
        ];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200_000 {
            let mut b = [0u8; 8];
            for c in &mut b {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                *c = near[(seed % near.len() as u64) as usize];
            }
            assert_eq!(
                super::plain_text(&b, b'%', b','),
                by_byte(&b, b'%', b','),
                "{b:?}"
            );
        }
        // Neighbours of the bounds next to each other (borrows across bytes).
        for pair in [
            [0x20u8, 0x21],
            [0x7e, 0x7f],
            [0x00, 0xff],
            [0x80, 0x21],
            [0x24, 0x26],
        ] {
            let mut b = [b'z'; 8];
            b[3..5].copy_from_slice(&pair);
            assert_eq!(super::plain_text(&b, b'%', b','), by_byte(&b, b'%', b','));
        }
    }

    #[test]
    fn decode_text_rejects_what_encode_text_never_writes() {
        let bad = [
            &b" a"[..],
            b"a ",
            b" ",
            b"%20 ",
            b"%",
            b"%4",
            b"%zz",
            b"x%4",
            b"\x80",
            b"%FF",
            b"a\tb",
        ];
        for v in bad {
            assert_eq!(decode_text(v), None, "{v:?}");
        }
        assert_eq!(decode_text(b"").as_deref(), Some(""));
        assert_eq!(decode_text(b"%41%2c%25").as_deref(), Some("A,%"));
        // Inside the text a space and a comma may come as they are or escaped.
        assert_eq!(decode_text(b"a b,c").as_deref(), Some("a b,c"));
        assert_eq!(decode_text(b"a%20b%2Cc").as_deref(), Some("a b,c"));
        // Into a string that held text before: its old content never shows through.
        let good: [&[u8]; 5] = [b"", b"%41%2c%25", b"%C3%A9t%C3%A9", b"plain", b"a b, c"];
        for v in bad.into_iter().chain(good) {
            let mut out = "left over from an earlier value".to_string();
            let ok = decode_text_into(v, &mut out);
            assert_eq!(
                ok.then_some(out.as_str()),
                decode_text(v).as_deref(),
                "{v:?}"
            );
            if !ok {
                assert_eq!(out, "", "{v:?}");
            }
        }
    }

    /// [`decode_text`] one byte at a time, as the contract defines it.
    fn decode_reference(v: &[u8]) -> Option<String> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < v.len() {
            match v[i] {
                b'%' => {
                    let hex = std::str::from_utf8(v.get(i + 1..i + 3)?).ok()?;
                    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return None;
                    }
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                    i += 3;
                }
                b' ' if i == 0 || i == v.len() - 1 => return None,
                b @ b' '..=b'~' => {
                    out.push(b);
                    i += 1;
                }
                _ => return None,
            }
        }
        String::from_utf8(out).ok()
    }

    #[test]
    fn decode_text_matches_the_byte_at_a_time_definition() {
        // Every value of up to five bytes over an alphabet of plain bytes, escapes, hex
        // digits of both cases, bytes never written plain and half a UTF-8 sequence; then
        // longer values whose runs span the eight-byte steps.
        let mut checked = 0;
        every_sequence(b"%aFc0 \xc3\xa9", 5, |v| {
            assert_eq!(decode_text(v), decode_reference(v), "{v:?}");
            checked += 1;
        });
        assert!(checked > 20_000);
        for s in [
            "no STARTTLS does not meet TLS 1.2+ required, verify hostname; rerouted",
            "0123456789abcdef 0123456789abcdef,0123456789abcdef%",
            "ends with an escape ",
            "日本語 text, 100% of it, and some more plain words after it",
        ] {
            let encoded = encode_text(s);
            assert_eq!(decode_text(encoded.as_bytes()).as_deref(), Some(s));
            // Cut anywhere, the result is the reference's.
            for cut in 0..encoded.len() {
                let v = &encoded.as_bytes()[..cut];
                assert_eq!(decode_text(v), decode_reference(v), "{v:?}");
            }
        }
    }

    #[test]
    fn encode_text_matches_the_byte_at_a_time_definition() {
        let check = |s: &str| {
            assert_eq!(encode_text(s), reference(s, b'%'), "{s:?}");
            assert_eq!(decode_text(encode_text(s).as_bytes()).as_deref(), Some(s));
            let mut item = String::new();
            encode_item_into(s, &mut item);
            assert_eq!(item, reference(s, b','), "{s:?}");
            assert!(!item.contains(','), "{item:?}");
            assert_eq!(decode_text(item.as_bytes()).as_deref(), Some(s));
        };
        for s in [
            "",
            "plain",
            "a b",
            " lead",
            "trail ",
            " ",
            "  ",
            "%,%",
            "é",
            "xé",
            "éx",
            "日本語 text, 100%",
            "a\r\nb\0c",
            "\u{10FFFF}",
            "no STARTTLS does not meet TLS 1.2+ required, verify hostname; rerouted",
        ] {
            check(s);
        }
        // Every text of up to five chars over spaces, commas, escapes, plain bytes, a
        // control byte and a two-byte char: spaces at the ends and inside, runs across the
        // eight-byte steps of the plain check.
        every_sequence(&[" ", ",", "%", "a", "~", "\t", "é"], 5, |parts| {
            check(&parts.concat());
        });
        for len in [7, 8, 9, 15, 16, 17] {
            for at in 0..len {
                for c in [" ", ",", "%", "\x7f"] {
                    let mut s = "x".repeat(len);
                    s.replace_range(at..at + 1, c);
                    check(&s);
                }
            }
        }
    }
}
