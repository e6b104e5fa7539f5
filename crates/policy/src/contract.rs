//! The header contract between a host (the altroute relay, Envoy) and a policy module.
//!
//! A routing question is an HTTP request whose headers carry the facts ([`Query`]); the
//! module answers by setting request headers ([`Decision`]), or with a local response
//! (status [`DEFER_STATUS`] or [`BOUNCE_STATUS`], body = the SMTP reply) for a rejection.
//!
//! Values are ASCII. Free text (addresses, reasons, replies) is percent-encoded: every
//! byte outside `!`..`~`, and `%` and `,` (the list separator), becomes `%XX`. So a value never holds CR, LF,
//! NUL or a space, and decoding gives back exactly what was encoded.
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
}

/// Percent-encode free text for a header value.
pub fn encode_text(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    encode_text_into(s, &mut out);
    out
}

/// [`encode_text`], appended to `out`. Runs of bytes that need no escape are copied in
/// one piece (most text is one run), not byte by byte.
pub fn encode_text_into(s: &str, out: &mut String) {
    let bytes = s.as_bytes();
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        if PLAIN[b as usize] {
            continue;
        }
        if run < i {
            // `s[run..i]` is ASCII and follows a char start: both ends are boundaries.
            out.push_str(&s[run..i]);
        }
        out.push('%');
        out.push(char::from(HEX[(b >> 4) as usize]));
        out.push(char::from(HEX[(b & 15) as usize]));
        run = i + 1;
    }
    // `run` is the end, or an unescaped (ASCII) byte: a boundary.
    if run < bytes.len() {
        out.push_str(&s[run..]);
    }
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Bytes [`encode_text`] copies as they are: `!`..`~` except `%` and `,`. A table: one
/// load per byte instead of three comparisons (this runs on every decision header).
const PLAIN: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = b'!';
    while b <= b'~' {
        t[b as usize] = b != b'%' && b != b',';
        b += 1;
    }
    t
};

/// Decode a percent-encoded header value. `None` for bad escapes or non-UTF-8 results.
pub fn decode_text(v: &[u8]) -> Option<String> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'%' => {
                let hi = hex_val(*v.get(i + 1)?)?;
                let lo = hex_val(*v.get(i + 2)?)?;
                out.push(hi << 4 | lo);
                i += 3;
            }
            b if (b'!'..=b'~').contains(&b) => {
                out.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    String::from_utf8(out).ok()
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
    vec![
        (PHASE, q.phase.token().to_string()),
        (SENDER, encode_text(&q.sender)),
        (RECIPIENT, encode_text(&q.recipient)),
        (REQUIRETLS, yes_no(q.requiretls).to_string()),
        (TLS_REQUIRED_NO, yes_no(q.tls_required_no).to_string()),
        (MX, encode_text(&q.mx)),
        (HOP, q.hop.token().to_string()),
        (STARTTLS, q.starttls.token().to_string()),
        (TLS, q.tls.token().to_string()),
        (CERT, q.cert.token().to_string()),
        (MTA_STS, q.mta_sts.token().to_string()),
        (ATTEMPT, q.attempt.to_string()),
    ]
}

/// Decode a query from headers, looked up by name with `get` (raw bytes, as a host or the
/// proxy-wasm SDK's `_bytes` calls give them). Phase and recipient are required; the
/// other facts default as in [`Query::default`].
pub fn decode_query<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Result<Query, ContractError> {
    let mut q = Query {
        phase: token(&get, PHASE)?.ok_or(ContractError::Missing(PHASE))?,
        ..Query::default()
    };
    q.recipient = text(&get, RECIPIENT)?.ok_or(ContractError::Missing(RECIPIENT))?;
    if !q.recipient.contains('@') {
        return Err(ContractError::Invalid {
            name: RECIPIENT,
            value: q.recipient,
        });
    }
    if let Some(s) = text(&get, SENDER)? {
        q.sender = s;
    }
    if let Some(b) = yes_no_header(&get, REQUIRETLS)? {
        q.requiretls = b;
    }
    if let Some(b) = yes_no_header(&get, TLS_REQUIRED_NO)? {
        q.tls_required_no = b;
    }
    if let Some(s) = text(&get, MX)? {
        q.mx = s;
    }
    if let Some(v) = token::<Hop>(&get, HOP)? {
        q.hop = v;
    }
    if let Some(v) = token::<Starttls>(&get, STARTTLS)? {
        q.starttls = v;
    }
    if let Some(v) = token::<TlsVersion>(&get, TLS)? {
        q.tls = v;
    }
    if let Some(v) = token::<CertStatus>(&get, CERT)? {
        q.cert = v;
    }
    if let Some(v) = token::<MtaSts>(&get, MTA_STS)? {
        q.mta_sts = v;
    }
    if let Some(raw) = get(ATTEMPT) {
        q.attempt = std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| invalid(ATTEMPT, raw))?;
    }
    Ok(q)
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
                encode_text_into(a, b);
            }
        });
        emit(HOST_PORT, buf, &|b| {
            use std::fmt::Write;
            // Writing to a String cannot fail.
            let _ = write!(b, "{}", host.port);
        });
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

/// Decode a decision from headers. Route, TLS requirement, rule and policy version are
/// required: a decision that does not name them is not a decision.
pub fn decode_decision<'a>(
    get: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Decision, ContractError> {
    let route: Route = token(&get, ROUTE)?.ok_or(ContractError::Missing(ROUTE))?;
    let host = match text(&get, HOST)? {
        None => None,
        Some(name) => {
            let addresses = match get(HOST_ADDRESSES) {
                None | Some([]) => Vec::new(),
                Some(raw) => raw
                    .split(|b| *b == b',')
                    .map(|a| decode_text(a).ok_or_else(|| invalid(HOST_ADDRESSES, raw)))
                    .collect::<Result<_, _>>()?,
            };
            let port = match get(HOST_PORT) {
                None => 25,
                Some(raw) => std::str::from_utf8(raw)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| invalid(HOST_PORT, raw))?,
            };
            let mx_lookup = yes_no_header(&get, HOST_MX_LOOKUP)?.unwrap_or(false);
            Some(HostTarget {
                name,
                addresses,
                port,
                mx_lookup,
            })
        }
    };
    let tls = TlsRequirement {
        required: yes_no_header(&get, TLS_REQUIRED)?.ok_or(ContractError::Missing(TLS_REQUIRED))?,
        verify: token::<Verify>(&get, TLS_VERIFY)?.ok_or(ContractError::Missing(TLS_VERIFY))?,
        min: token::<MinTls>(&get, TLS_MIN)?.ok_or(ContractError::Missing(TLS_MIN))?,
    };
    Ok(Decision {
        route,
        host,
        tls,
        rule: text(&get, RULE)?.ok_or(ContractError::Missing(RULE))?,
        policy_version: text(&get, POLICY_VERSION)?
            .ok_or(ContractError::Missing(POLICY_VERSION))?,
        result: token::<ResultType>(&get, RESULT)?.unwrap_or(ResultType::Success),
        reason: text(&get, REASON)?.unwrap_or_default(),
        reply: text(&get, REPLY)?,
    })
}

fn invalid(name: &'static str, raw: &[u8]) -> ContractError {
    ContractError::Invalid {
        name,
        value: String::from_utf8_lossy(raw).into_owned(),
    }
}

fn text<'a>(
    get: &impl Fn(&str) -> Option<&'a [u8]>,
    name: &'static str,
) -> Result<Option<String>, ContractError> {
    match get(name) {
        None => Ok(None),
        Some(raw) => decode_text(raw).map(Some).ok_or_else(|| invalid(name, raw)),
    }
}

fn token<'a, T: Token>(
    get: &impl Fn(&str) -> Option<&'a [u8]>,
    name: &'static str,
) -> Result<Option<T>, ContractError> {
    match get(name) {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(T::parse_token)
            .map(Some)
            .ok_or_else(|| invalid(name, raw)),
    }
}

fn yes_no_header<'a>(
    get: &impl Fn(&str) -> Option<&'a [u8]>,
    name: &'static str,
) -> Result<Option<bool>, ContractError> {
    match get(name) {
        None => Ok(None),
        Some(raw) => std::str::from_utf8(raw)
            .ok()
            .and_then(parse_yes_no)
            .map(Some)
            .ok_or_else(|| invalid(name, raw)),
    }
}

/// Look a header up in a list of pairs (names compared case-insensitively, as HTTP does).
pub fn lookup<'a, K: AsRef<str>, V: AsRef<[u8]>>(
    pairs: &'a [(K, V)],
) -> impl Fn(&str) -> Option<&'a [u8]> {
    move |name| {
        pairs
            .iter()
            .find(|(k, _)| k.as_ref().eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_ref())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// The byte-at-a-time definition `encode_text_into` must match exactly.
    fn reference(s: &str) -> String {
        let mut out = String::new();
        for &b in s.as_bytes() {
            if (b'!'..=b'~').contains(&b) && b != b'%' && b != b',' {
                out.push(b as char);
            } else {
                out.push_str(&format!("%{b:02X}"));
            }
        }
        out
    }

    #[test]
    fn encode_text_matches_the_byte_at_a_time_definition() {
        for s in [
            "",
            "plain",
            "a b",
            " lead",
            "trail ",
            "%,%",
            "é",
            "xé",
            "éx",
            "日本語 text, 100%",
            "a\r\nb\0c",
            "\u{10FFFF}",
        ] {
            assert_eq!(encode_text(s), reference(s), "{s:?}");
            assert_eq!(decode_text(encode_text(s).as_bytes()).as_deref(), Some(s));
        }
    }
}
