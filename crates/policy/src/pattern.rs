//! Address patterns: an exact address, an exact domain, or `*.` subdomains.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What a TLS compliance rule, a static route or an org unit's sender list matches.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Pattern {
    /// `ceo@partner.example` (case-insensitive).
    Address(String),
    /// `partner.example`: that domain only.
    Domain(String),
    /// `*.bank.example`: every subdomain of `bank.example`, at any depth, not the domain itself.
    Subdomains(String),
}

impl Pattern {
    /// Parse a pattern as admins write it. Lower-cases it, writes a quoted local part
    /// without its quotes (`"ceo"@x.example` is `ceo@x.example`) and a Unicode domain as
    /// its A-label (`bücher.example` is `xn--bcher-kva.example`), see [`canonical`].
    pub fn parse(s: &str) -> Result<Pattern, String> {
        let s = s.trim().to_ascii_lowercase();
        // A quoted local part loses its quotes; a domain written in Unicode
        // (`bücher.example`) is kept as its A-label, the form questions are matched in.
        let s = if s.starts_with('"') || !s.is_ascii() {
            let (wild, rest) = match s.strip_prefix("*.") {
                Some(rest) => ("*.", rest),
                None => ("", s.as_str()),
            };
            let domain = domain_of(rest);
            if !domain.is_ascii() && idna::domain_to_ascii(domain).is_err() {
                return Err(format!("`{s}`: not a valid internationalised domain name"));
            }
            // A name that resolvers map two ways (`straße`: IDNA 2003 `strasse`, IDNA 2008
            // `xn--strae-oqa`) is refused in a question; in a rule it would silently pick
            // one meaning (an audit's rule for `straße.example` did not cover mail to
            // `strasse.example`, where such a resolver sends it).
            if !domain.is_ascii() && !is_unambiguous_idn(domain) {
                return Err(format!(
                    "`{s}`: an ambiguous internationalised domain name (resolvers map it two ways): write its A-label ({}) or the name it also means",
                    canonical_domain(domain)
                ));
            }
            format!("{wild}{}", canonical(rest))
        } else {
            s
        };
        if let Some(rest) = s.strip_prefix("*.") {
            check_domain(rest)?;
            return Ok(Pattern::Subdomains(rest.to_string()));
        }
        if let Some((local, domain)) = s.rsplit_once('@') {
            if local.is_empty() || local.len() > 64 {
                return Err(format!(
                    "`{s}`: the local part must have 1 to 64 characters"
                ));
            }
            if local
                .bytes()
                .any(|b| b <= b' ' || b == b'@' || b == b'<' || b == b'>' || b == 0x7f)
            {
                return Err(format!(
                    "`{s}`: the local part has a character not allowed here"
                ));
            }
            // `*@partner.example` reads as "everyone there", but a pattern has no local-part
            // wildcard: it was taken as the one mailbox `*`, and an audit's rule so written
            // protected nobody.
            if local.contains(['*', '?']) {
                return Err(format!(
                    "`{s}`: patterns have no wildcard in the local part: to match every address at {domain}, list `{domain}` (or `*.{domain}` for its subdomains) under domains"
                ));
            }
            // The relay refuses such mailboxes (a next hop may read them as another
            // address): no question carries one, and the rule would match nothing.
            if local.contains(['%', '!']) {
                return Err(format!(
                    "`{s}`: a local part with `%` or `!` is never asked about (the relay refuses such addresses): this pattern would match nothing"
                ));
            }
            check_domain(domain)?;
            return Ok(Pattern::Address(s));
        }
        check_domain(&s)?;
        Ok(Pattern::Domain(s))
    }

    /// How specific the pattern is; higher wins. An address beats a domain, a domain beats
    /// a wildcard, a longer wildcard beats a shorter one.
    pub fn specificity(&self) -> (u8, usize) {
        match self {
            Pattern::Address(a) => (3, a.len()),
            Pattern::Domain(d) => (2, d.len()),
            Pattern::Subdomains(d) => (1, d.len()),
        }
    }

    /// Whether `address` (an envelope address or a bare domain) matches.
    pub fn matches(&self, address: &str) -> bool {
        self.matches_split(address, domain_of(address))
    }

    /// [`Pattern::matches`], where a next hop strips a recipient delimiter: an address
    /// pattern `bob@x` also matches `bob+news@x` when `delimiter` has `+` (see
    /// [`base_mailbox`]).
    pub fn matches_mailbox(&self, address: &str, delimiter: &str) -> bool {
        self.matches(address)
            || matches!(self, Pattern::Address(_)) && {
                let address = Canonical::new(address);
                base_mailbox(address.address(), address.domain(), delimiter)
                    .is_some_and(|base| self.matches(&base))
            }
    }

    /// [`Pattern::matches`] with `domain` = `domain_of(address)` already found (a
    /// decision matches one address against many patterns). Both are taken as
    /// [`canonical`] writes them.
    pub fn matches_split(&self, address: &str, domain: &str) -> bool {
        let (address, domain) = (canonical(address), canonical_domain(domain));
        let (address, domain) = (address.as_ref(), domain.as_ref());
        match self {
            Pattern::Address(a) => a.eq_ignore_ascii_case(address),
            Pattern::Domain(d) => d.eq_ignore_ascii_case(domain),
            Pattern::Subdomains(d) => {
                domain.len() > d.len() + 1
                    && domain.as_bytes()[domain.len() - d.len() - 1] == b'.'
                    && domain[domain.len() - d.len()..].eq_ignore_ascii_case(d)
            }
        }
    }
}

/// The mailbox a next hop delivers `address` to when it strips a recipient delimiter, as
/// Postfix's `recipient_delimiter` does: the local part up to the first of the `delimiter`
/// characters (`bob+news@x` is `bob@x`). `None` when the local part has no delimiter after
/// its first character, or `delimiter` is empty. `address` and `domain` (its domain part)
/// as [`canonical`] writes them.
pub fn base_mailbox(address: &str, domain: &str, delimiter: &str) -> Option<String> {
    if delimiter.is_empty() || address.len() <= domain.len() {
        return None;
    }
    let local = &address[..address.len() - domain.len() - 1];
    // As Postfix's `split_addr`: some mailboxes are never split, and with `-` among the
    // delimiters neither are mailing-list owner and request addresses
    // (`owner_request_special`): `owner-news@` and `news-request@` are their own
    // mailboxes, not `owner@`'s or `news@`'s (an audit's `owner-announce@` picked up
    // `owner@`'s TLS exemption).
    let special = |name: &str| local.eq_ignore_ascii_case(name);
    if special("postmaster") || special("mailer-daemon") || special("double-bounce") {
        return None;
    }
    if delimiter.contains('-') {
        let owner = local
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case("owner-"));
        let request = local.len() > 8
            && local
                .get(local.len() - 8..)
                .is_some_and(|s| s.eq_ignore_ascii_case("-request"));
        if owner || request {
            return None;
        }
    }
    // The delimiters are ASCII, so the cut is at a char boundary.
    let cut = local
        .bytes()
        .position(|b| delimiter.as_bytes().contains(&b))?;
    (cut > 0).then(|| format!("{}@{domain}", &local[..cut]))
}

/// The domain part of an address (everything after the last `@`), or the whole string.
pub fn domain_of(address: &str) -> &str {
    // A byte search, not `rsplit_once('@')`: the char searcher's generic reverse search
    // was a visible share of a decision in the wasm module (BENCHMARKS.md).
    match address.bytes().rposition(|b| b == b'@') {
        // `@` is ASCII: the byte after it starts a char.
        Some(at) => &address[at + 1..],
        None => address,
    }
}

/// `domain` without the trailing dot of a fully qualified name: `partner.example.` is
/// `partner.example` (one dot only; `a..` stays malformed and matches nothing).
pub fn trim_root(domain: &str) -> &str {
    match domain.strip_suffix('.') {
        Some(d) if !d.is_empty() && !d.ends_with('.') => d,
        _ => domain,
    }
}

/// A domain as patterns see it: without a trailing dot ([`trim_root`]), and, when it is
/// written in Unicode (an SMTPUTF8 address: `bücher.example`), as its A-label
/// (`xn--bcher-kva.example`, UTS 46 as the `idna` crate maps it, which also folds case).
/// Patterns are stored in that form, and the A-label is the domain mail to it is
/// resolved and delivered to, so a rule cannot be escaped by writing its domain in
/// Unicode. A Unicode name that is not a valid IDN stays as it is and matches no pattern;
/// no question can carry one ([`is_plain_domain`] refuses it: a resolver that maps names
/// by IDNA 2003 may still find a domain for it). Borrows unless there was Unicode.
pub fn canonical_domain(domain: &str) -> Cow<'_, str> {
    let domain = trim_root(domain);
    if domain.is_ascii() {
        return Cow::Borrowed(domain);
    }
    match idna::domain_to_ascii(domain) {
        // UTS 46 maps a final `。`, `．` or `｡` to `.`: the root dot, trimmed after the
        // mapping too (`tls.example。` once matched no rule of `tls.example`).
        Ok(ascii) => match trim_root(&ascii) {
            trimmed if trimmed.len() < ascii.len() => Cow::Owned(trimmed.to_string()),
            _ => Cow::Owned(ascii),
        },
        Err(_) => Cow::Borrowed(domain),
    }
}

/// An envelope address as patterns see it: the domain as [`canonical_domain`] writes it,
/// and a quoted local part without its quotes and backslashes (`"ceo"@partner.example`
/// is the mailbox `ceo@partner.example`, RFC 5321 §4.1.2). Otherwise a rule could be
/// escaped by spelling its address another way. Borrows unless there was a quote to
/// remove or a Unicode domain to convert. A source route (`@relay.example:bob@x.example`,
/// RFC 5321 §4.1.1.3, which servers ignore or strip, as Postfix does) is left out: the
/// mailbox is `bob@x.example`.
pub fn canonical(address: &str) -> Cow<'_, str> {
    let address = without_source_route(address);
    let Some(at) = address.bytes().rposition(|b| b == b'@') else {
        return canonical_domain(address);
    };
    // `@` is ASCII: the bytes around it start chars.
    let (local, domain) = (&address[..at], canonical_domain(&address[at + 1..]));
    let inner = local.strip_prefix('"').and_then(|l| l.strip_suffix('"'));
    let unquoted = match inner {
        None => Cow::Borrowed(local),
        Some(inner) => {
            let mut out = String::with_capacity(inner.len());
            let mut escaped = false;
            for c in inner.chars() {
                if c == '\\' && !escaped {
                    escaped = true;
                } else {
                    out.push(c);
                    escaped = false;
                }
            }
            Cow::Owned(out)
        }
    };
    let local = fold_local(unquoted);
    match (local, domain) {
        // The common case: nothing to change but perhaps the trailing dot.
        (Cow::Borrowed(_), Cow::Borrowed(d)) => Cow::Borrowed(&address[..at + 1 + d.len()]),
        (local, domain) => Cow::Owned(format!("{local}@{domain}")),
    }
}

/// A local part in Unicode, case-folded (full folding, as ICU's default that Postfix
/// uses for SMTPUTF8 addresses): `JÖRG` is `jörg`, and `ſales` (U+017F) and `Kim`
/// (U+212A, the Kelvin sign) are `sales` and `kim`. An ASCII local part is left as it is
/// (patterns compare ASCII letters without case). Otherwise a rule for `sales@x.example`
/// was escaped by `ſales@x.example`, which Postfix delivered to sales. Folding is done
/// with ICU4X's `icu_casemap` (compiled data), not by hand.
fn fold_local(local: Cow<'_, str>) -> Cow<'_, str> {
    if local.is_ascii() {
        return local;
    }
    // Already folded (`jörg`): kept as it is, without a copy.
    match icu_casemap::CaseMapper::new().fold_string(&local) {
        Cow::Borrowed(_) => None,
        Cow::Owned(folded) => Some(folded),
    }
    .map_or(local, Cow::Owned)
}

/// `address` without a leading source route (`@a.example,@b.example:`), if it has one.
/// A route's domains may be address literals (`@[IPv6:::1]:`), whose colons are inside
/// brackets.
fn without_source_route(address: &str) -> &str {
    split_source_route(address).map_or(address, |(_, mailbox)| mailbox)
}

/// `address` split into its source route (`@a.example,@b.example`, without the `:`) and
/// the mailbox after it; `None` when it has no complete route.
pub fn split_source_route(address: &str) -> Option<(&str, &str)> {
    if !address.starts_with('@') {
        return None;
    }
    let mut in_literal = false;
    for (i, b) in address.bytes().enumerate() {
        match b {
            b'[' => in_literal = true,
            b']' => in_literal = false,
            // `:` is ASCII: the bytes around it start chars.
            b':' if !in_literal => return Some((&address[..i], &address[i + 1..])),
            _ => {}
        }
    }
    None
}

/// Whether a fact's address (a question's sender or recipient) or an address an SMTP
/// follower reads can be only the mailbox it is matched as. A question with anything else
/// is refused (a fault, deferred): a program that hands `bob@(c)partner.example`, or
/// `bob@partner.example, x@random.example` (two recipients in one value, as an HTTP
/// server joins a repeated header), to an MTA gets mail to bob@partner.example, which the
/// policy would not have been asked about.
///
/// Whether `addr` (what was between `<` and `>`) is a mailbox as RFC 5321 §4.1.2 writes
/// it, with nothing a server could read as another mailbox: an optional source route
/// (`@a.example,@b.example:`), a local part that is a dot-string or a quoted string, `@`,
/// and a domain (labels, UTF-8 allowed, an optional final dot) or an address literal.
/// Refused besides: a local part that holds `@`, `%` or `!` (unquoted), since servers
/// route through those (Postfix delivers `bob%partner.example@localhost` and
/// `partner.example!bob@localhost` to bob@partner.example). Comments, white space and
/// backslashes outside a quoted string fail the grammar.
pub fn is_mailbox(addr: &str) -> bool {
    let rest = match split_source_route(addr) {
        // Each hop of a route is `@domain`, without a final dot.
        Some((route, mailbox)) => {
            let hop_ok = |hop: &str| {
                hop.strip_prefix('@')
                    .is_some_and(|d| !d.ends_with('.') && is_plain_domain(d))
            };
            if !route.split(',').all(hop_ok) {
                return false;
            }
            mailbox
        }
        None if addr.starts_with('@') => return false,
        None => addr,
    };
    let bytes = rest.as_bytes();
    let local_len = if bytes.first() == Some(&b'"') {
        match quoted_len(bytes) {
            Some(n) => n,
            None => return false,
        }
    } else {
        let n = bytes.iter().position(|b| *b == b'@').unwrap_or(bytes.len());
        let atext =
            |b: &u8| b.is_ascii_alphanumeric() || b"#$&'*+-/=?^_`{|}~".contains(b) || *b >= 0x80;
        if n == 0
            || !bytes[..n]
                .split(|b| *b == b'.')
                .all(|atom| !atom.is_empty() && atom.iter().all(atext))
        {
            return false;
        }
        n
    };
    // The local part ends at a quote or before an `@`: ASCII, a char boundary.
    rest[local_len..]
        .strip_prefix('@')
        .is_some_and(is_plain_domain)
}

/// The length of the quoted string at the start of `s` (quotes included), if it is one
/// whose content has no `@`, `%` or `!` (servers read `"bob@partner.example"@localhost`
/// as bob@partner.example).
fn quoted_len(s: &[u8]) -> Option<usize> {
    let mut i = 1;
    while let Some(&b) = s.get(i) {
        match b {
            b'"' => return Some(i + 1),
            b'\\' => {
                let escaped = *s.get(i + 1)?;
                if !(0x20..=0x7e).contains(&escaped) || b"@%!".contains(&escaped) {
                    return None;
                }
                i += 2;
            }
            b'@' | b'%' | b'!' => return None,
            0x20..=0x7e => i += 1,
            _ if b >= 0x80 => i += 1,
            _ => return None,
        }
    }
    None
}

/// Whether `domain` is labels (letters, digits, `-`, `_`, UTF-8) joined by single dots,
/// with an optional final dot, or an address literal of printable ASCII (`[192.0.2.1]`).
/// A domain in Unicode must be a valid IDN (UTS 46, as [`canonical_domain`] maps it)
/// without a deviation character ([`is_unambiguous_idn`]):
/// `partner\u{200D}.example` (a zero-width joiner) is none, so it matched no rule and was
/// decided opportunistic, while a resolver that maps names by IDNA 2003 (Python's `idna`
/// codec) drops the joiner and delivers to partner.example. The relay's SMTP server
/// refuses such a name too.
pub fn is_plain_domain(domain: &str) -> bool {
    if let Some(literal) = domain.strip_prefix('[') {
        return literal.strip_suffix(']').is_some_and(|inner| {
            !inner.is_empty()
                && inner
                    .bytes()
                    .all(|b| (0x21..=0x7e).contains(&b) && !b"[]\\".contains(&b))
        });
    }
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b >= 0x80)
        })
        && (domain.is_ascii() || is_unambiguous_idn(domain))
}

/// The characters IDNA 2008 (UTS 46 non-transitional, as this crate maps) keeps but
/// IDNA 2003 and transitional processing map elsewhere: ß to `ss`, ς to σ, the two
/// joiners to nothing.
const DEVIATIONS: [char; 4] = ['\u{00DF}', '\u{03C2}', '\u{200C}', '\u{200D}'];

/// Characters UTS 46 ignores (maps to nothing) that IDNA 2003 keeps: Hangul fillers,
/// Khmer inherent vowels, a Mongolian variation selector. `partner\u{115F}.example` is
/// partner.example here and another domain to an IDNA 2003 resolver.
const IGNORED_HERE_KEPT_THERE: [char; 5] =
    ['\u{115F}', '\u{1160}', '\u{17B4}', '\u{17B5}', '\u{180F}'];

/// A Unicode domain that names one domain to every resolver: a valid IDN, and no label
/// written in Unicode holds a deviation character once mapped (nor a character that
/// UTS 46 ignores and IDNA 2003 keeps). `straße.example` is `xn--strae-oqa.example` here
/// and `strasse.example` to an IDNA 2003 resolver (Python's `idna` codec, libidn 1): an
/// audit's rule for strasse.example was escaped that way. Labels written as A-labels (or
/// in ASCII) are unambiguous, so `xn--strae-oqa.bücher.example` is taken.
fn is_unambiguous_idn(domain: &str) -> bool {
    // Mapped, it must be a host name (letters, digits, `-`, `_`, dots): UTS 46 without
    // STD3 rules maps a no-break space to a space and a fullwidth `>` to `>`, and an
    // audit's `bob@partner.example` + U+00A0 was decided opportunistic (a consumer that
    // trims Unicode white space delivers it to partner.example).
    match idna::domain_to_ascii(domain) {
        Ok(ascii)
            if ascii
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.')) => {}
        _ => return false,
    }
    if domain.contains(IGNORED_HERE_KEPT_THERE) {
        return false;
    }
    // UTS 46 reads these as label separators too.
    domain
        .split(['.', '\u{3002}', '\u{FF0E}', '\u{FF61}'])
        .filter(|label| !label.is_ascii())
        .all(|label| {
            let (mapped, ok) = idna::domain_to_unicode(label);
            ok.is_ok() && !mapped.contains(DEVIATIONS)
        })
}

/// An envelope address (or a bare domain) in the form patterns are matched against
/// ([`canonical`]), with its domain found once: a question matches each of its two
/// addresses against several tables, and converts each only once.
#[derive(Debug, Clone)]
pub struct Canonical<'a> {
    address: Cow<'a, str>,
    domain_at: usize,
}

impl<'a> Canonical<'a> {
    pub fn new(address: &'a str) -> Canonical<'a> {
        let address = canonical(address);
        let domain_at = address.len() - domain_of(&address).len();
        Canonical { address, domain_at }
    }

    /// The whole address.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The domain part (everything after the last `@`), or the whole string.
    pub fn domain(&self) -> &str {
        &self.address[self.domain_at..]
    }

    /// The domain alone, as a bare domain (what static routes match).
    pub fn domain_only(&self) -> Canonical<'_> {
        Canonical {
            address: Cow::Borrowed(self.domain()),
            domain_at: 0,
        }
    }
}

impl std::fmt::Display for Pattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Pattern::Address(a) => f.write_str(a),
            Pattern::Domain(d) => f.write_str(d),
            Pattern::Subdomains(d) => write!(f, "*.{d}"),
        }
    }
}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Pattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Pattern::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Check a domain name (RFC 1035 preferred syntax, lower-cased, no trailing dot).
pub fn check_domain(d: &str) -> Result<(), String> {
    if d.is_empty() {
        return Err("empty domain".to_string());
    }
    if d.len() > 253 {
        return Err(format!("`{d}`: a domain has at most 253 characters"));
    }
    for label in d.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(format!("`{d}`: each label must have 1 to 63 characters"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(format!(
                "`{d}`: only letters, digits, `-` and `_` are allowed in a domain"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!("`{d}`: a label may not start or end with `-`"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Unicode name whose mapping is no host name (a no-break or ideographic space, a
    /// fullwidth `>`, `:`, `/` or `%`) is no plain domain: an audit's
    /// `bob@partner.example` + U+00A0 was decided opportunistic. Mapped dots and letters
    /// stay fine.
    #[test]
    fn a_unicode_name_must_map_to_a_host_name() {
        for bad in [
            "partner.example\u{a0}",
            "partner.example\u{3000}",
            "partner.example\u{2003}",
            "partner.example\u{ff1e}",
            "partner.example\u{ff1a}25",
            "partner.example\u{ff0f}x",
            "random.example\u{ff05}partner.example",
        ] {
            assert!(!is_plain_domain(bad), "{bad:?}");
            // A pattern is trimmed of white space first (then it names partner.example).
            if !bad.ends_with(char::is_whitespace) {
                assert!(Pattern::parse(bad).is_err(), "{bad:?}");
            }
        }
        for good in [
            "partner.example\u{3002}",
            "p\u{ff41}rtner.example",
            "bücher.example",
        ] {
            assert!(is_plain_domain(good), "{good:?}");
        }
    }

    /// Patterns an admin would read otherwise are refused with the way to write them: a
    /// local-part wildcard (an audit's `*@partner.example` was the one mailbox `*` and
    /// protected nobody), a local part no question carries, an ambiguous IDN.
    #[test]
    fn misleading_patterns_are_refused() {
        for (p, says) in [
            ("*@partner.example", "list `partner.example`"),
            ("a*@partner.example", "no wildcard in the local part"),
            ("?@partner.example", "no wildcard in the local part"),
            ("\"*\"@partner.example", "no wildcard in the local part"),
            ("bob%x@partner.example", "never asked about"),
            ("a!b@partner.example", "never asked about"),
            (
                "straße.example",
                "write its A-label (xn--strae-oqa.example)",
            ),
            ("*.ςigma.example", "ambiguous"),
            ("bob@straße.example", "ambiguous"),
        ] {
            let err = Pattern::parse(p).expect_err(p);
            assert!(err.contains(says), "{p}: {err}");
        }
        for ok in [
            "bücher.example",
            "bob@bücher.example",
            "xn--strae-oqa.example",
            "b+tag@x.example",
        ] {
            assert!(Pattern::parse(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn parse_and_match() {
        let cases: &[(&str, &str, bool)] = &[
            ("partner.example", "bob@partner.example", true),
            ("partner.example", "bob@mail.partner.example", false),
            ("*.partner.example", "bob@mail.partner.example", true),
            ("*.partner.example", "bob@a.b.partner.example", true),
            ("*.partner.example", "bob@partner.example", false),
            ("*.partner.example", "bob@xpartner.example", false),
            ("CEO@Partner.example", "ceo@partner.EXAMPLE", true),
            ("ceo@partner.example", "cfo@partner.example", false),
        ];
        for (pat, addr, want) in cases {
            let p = Pattern::parse(pat).expect("valid pattern");
            assert_eq!(p.matches(addr), *want, "{pat} vs {addr}");
        }
    }

    #[test]
    fn rejects_bad_patterns() {
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.example",
            "a b.example",
            "@example.com",
            "x@",
            "*.*.x",
        ] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }
}
