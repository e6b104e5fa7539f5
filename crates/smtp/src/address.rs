//! Envelope addresses as the relay keeps them and as it writes them.
//!
//! smtp-proto hands the server a mailbox with a quoted local part already unquoted
//! (`"john smith"@x.example` arrives as `john smith@x.example`), and that is the form the
//! envelope keeps, the spool stores and the policy decides on. Written back into a
//! command as it is, such a local part is read by the next hop as something else:
//! `"v@a.example> ORCPT=rfc822;x"@b.example` became `RCPT TO:<v@a.example> ORCPT=…>`, a
//! recipient at `a.example` that the relay had never accepted nor decided on. So every
//! address that goes into a command or a header goes through [`to_wire`], which quotes a
//! local part that is not a dot-atom (RFC 5321 §4.1.2), as Postfix's `quote_821_local`
//! does. smtp-proto has no writer for this; it is a few lines.

use std::borrow::Cow;
use std::net::{Ipv4Addr, Ipv6Addr};

/// RFC 5322 `atext`, extended by RFC 6531 with every non-ASCII octet (UTF-8).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b) || !b.is_ascii()
}

/// A dot-atom: atoms of [`is_atext`] joined by single dots.
pub fn is_dot_atom(local: &str) -> bool {
    !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.bytes().all(is_atext))
}

/// An octet that no mailbox can hold on the wire: RFC 5321's `qtextSMTP` and
/// `quoted-pairSMTP` take printable ASCII and space only (and UTF-8 under RFC 6531).
pub fn is_control(b: u8) -> bool {
    b < 0x20 || b == 0x7f
}

/// An address literal the relay can deliver to: `[IPv4]` or `[IPv6:…]` (RFC 5321
/// §4.1.3). A general literal (`[tag:…]`) may hold `>` and other bytes that a next hop
/// reads as the end of the path, and the relay could not connect to it anyway.
pub fn is_ip_literal(domain: &str) -> bool {
    let Some(inner) = domain.strip_prefix('[').and_then(|d| d.strip_suffix(']')) else {
        return false;
    };
    match inner.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..].parse::<Ipv6Addr>().is_ok(),
        _ => inner.parse::<Ipv4Addr>().is_ok(),
    }
}

/// The address as it goes into `MAIL FROM:<…>`, `RCPT TO:<…>` or a header: the local
/// part as it is when it is a dot-atom, else quoted with `"` and `\` escaped. The null
/// path and a bare `postmaster` stay as they are. `None` when the address holds a
/// control character, which no quoting can carry (the server refuses those).
pub fn to_wire(address: &str) -> Option<Cow<'_, str>> {
    if address.bytes().any(is_control) {
        return None;
    }
    let Some((local, domain)) = address.rsplit_once('@') else {
        return Some(Cow::Borrowed(address));
    };
    if is_dot_atom(local) {
        return Some(Cow::Borrowed(address));
    }
    let mut out = String::with_capacity(address.len() + 4);
    out.push('"');
    for c in local.chars() {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push_str("\"@");
    out.push_str(domain);
    Some(Cow::Owned(out))
}

/// The address as [`to_wire`] writes it, for a header or a report: a control character
/// (which the server refuses, so only mail spooled before that check has one) is
/// written as `?` instead of failing.
pub fn for_header(address: &str) -> Cow<'_, str> {
    if let Some(wire) = to_wire(address) {
        return wire;
    }
    let clean: String = address
        .chars()
        .map(|c| if c.is_ascii_control() { '?' } else { c })
        .collect();
    Cow::Owned(to_wire(&clean).map(Cow::into_owned).unwrap_or_default())
}

/// `value` as RFC 3461 `xtext` (the form of `ENVID=`): every octet outside `!`..`~`,
/// and `+` and `=`, as `+HH`. smtp-proto decodes the client's `ENVID` (`a+20b` is
/// `a b`); written back as it is, a decoded space would start another MAIL parameter.
pub fn xtext(value: &str) -> Cow<'_, str> {
    let plain = |b: u8| (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=';
    if value.bytes().all(plain) {
        return Cow::Borrowed(value);
    }
    let mut out = String::with_capacity(value.len() + 8);
    for b in value.bytes() {
        if plain(b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    Cow::Owned(out)
}

/// Decodes RFC 3461 `xtext` (`+HH` for any octet) to text: the octets must be UTF-8
/// without control characters (C0, DEL, C1) or line and paragraph separators. `None`
/// otherwise, or for a malformed `+`. smtp-proto's decoder makes each `+HH` the char
/// U+00HH, so `+C3+B6` (ö in UTF-8) became `Ã¶`, and `+85` a C1 control.
pub fn xtext_decode(value: &[u8]) -> Option<String> {
    let mut bytes = Vec::with_capacity(value.len());
    let mut i = 0;
    while let Some(&b) = value.get(i) {
        if b == b'+' {
            let hex = std::str::from_utf8(value.get(i + 1..i + 3)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if (b'!'..=b'~').contains(&b) && b != b'=' {
            bytes.push(b);
            i += 1;
        } else {
            return None;
        }
    }
    let text = String::from_utf8(bytes).ok()?;
    (!text
        .chars()
        .any(|c| c.is_control() || c == '\u{2028}' || c == '\u{2029}'))
    .then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envids_are_written_as_xtext() {
        assert_eq!(xtext("QQ314159"), "QQ314159");
        assert_eq!(xtext("hi there"), "hi+20there");
        assert_eq!(xtext("a+b=c"), "a+2Bb+3Dc");
        assert_eq!(xtext("x SIZE=1"), "x+20SIZE+3D1");
        assert_eq!(xtext("é"), "+C3+A9");
        // Any byte can go: an ENVID of `ab+0D+0AX` decodes to a CR LF, and goes back so.
        assert_eq!(xtext("ab\r\nX"), "ab+0D+0AX");
    }

    #[test]
    fn local_parts_that_are_not_dot_atoms_are_quoted() {
        let cases = [
            ("bob@x.example", "bob@x.example"),
            ("b.o+b@x.example", "b.o+b@x.example"),
            ("jörg@bücher.example", "jörg@bücher.example"),
            ("", ""),
            ("postmaster", "postmaster"),
            ("john smith@x.example", "\"john smith\"@x.example"),
            (
                "v@a.example> ORCPT=rfc822;x@b.example",
                "\"v@a.example> ORCPT=rfc822;x\"@b.example",
            ),
            ("c\"d@x.example", "\"c\\\"d\"@x.example"),
            ("e\\f@x.example", "\"e\\\\f\"@x.example"),
            (".bob@x.example", "\".bob\"@x.example"),
            ("bo..b@x.example", "\"bo..b\"@x.example"),
            ("bob.@x.example", "\"bob.\"@x.example"),
            ("@x.example", "\"\"@x.example"),
        ];
        for (address, want) in cases {
            assert_eq!(to_wire(address).as_deref(), Some(want), "{address:?}");
        }
        for bad in [
            "a\rb@x.example",
            "a\tb@x.example",
            "a\0@x.example",
            "a\x7f@x",
        ] {
            assert_eq!(to_wire(bad), None, "{bad:?}");
        }
        assert_eq!(for_header("a\rb@x.example"), "a?b@x.example");
        assert_eq!(for_header("a b@x.example"), "\"a b\"@x.example");
    }

    #[test]
    fn only_ip_literals_are_literals() {
        for ok in ["[192.0.2.1]", "[IPv6:2001:db8::1]", "[ipv6:::1]"] {
            assert!(is_ip_literal(ok), "{ok}");
        }
        for bad in [
            "[x:a>b]",
            "[192.0.2.1> X=y]",
            "[300.0.0.1]",
            "[IPv6:192.0.2.1]",
            "[]",
            "192.0.2.1",
            "[192.0.2.1",
        ] {
            assert!(!is_ip_literal(bad), "{bad}");
        }
    }

    #[test]
    fn xtext_decodes_utf8_and_refuses_controls() {
        assert_eq!(xtext_decode(b"j+C3+B6rg@x").as_deref(), Some("jörg@x"));
        assert_eq!(xtext_decode(b"id+2B1").as_deref(), Some("id+1"));
        assert_eq!(xtext_decode(b"a+e9").as_deref(), None, "not UTF-8");
        for bad in [
            &b"a+85b"[..],
            b"a+E2+80+A8b",
            b"a+0D+0Ab",
            b"a+0",
            b"a+ZZ",
            b"a=b",
        ] {
            assert_eq!(
                xtext_decode(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let s = "x\u{e9}+= y";
        assert_eq!(xtext_decode(xtext(s).as_bytes()).as_deref(), Some(s));
    }
}
