//! Delivery status notifications (RFC 3464): a `multipart/report;
//! report-type=delivery-status` message to the sender for recipients that bounced or
//! whose queue lifetime ran out. Sent with the null sender `<>`, and never for a message
//! that itself has the null sender (no DSN for a DSN, RFC 3461 §6.2).

use altroute_queue::{Envelope, Timestamp};
use altroute_smtp::address::for_header;

/// `address` with its domain as an A-label when only the domain is in Unicode: an ASCII
/// mailbox then, that a next hop without SMTPUTF8 takes. A notice to `z@bücher.example`
/// once needed SMTPUTF8 for its own `To:` field only, was refused by such a hop (550
/// 5.6.7) and, sent with the null sender, lost.
fn ascii_domain(address: &str) -> std::borrow::Cow<'_, str> {
    match address.rsplit_once('@') {
        Some((local, domain)) if local.is_ascii() && !domain.is_ascii() => {
            match altroute_policy::pattern::canonical_domain(domain) {
                d if d.is_ascii() => std::borrow::Cow::Owned(format!("{local}@{d}")),
                _ => std::borrow::Cow::Borrowed(address),
            }
        }
        _ => std::borrow::Cow::Borrowed(address),
    }
}

/// One recipient that failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Its place in the envelope (for its DSN parameters: `NOTIFY`, `ORCPT`).
    pub index: usize,
    /// The recipient address.
    pub recipient: String,
    /// The last reply or reason (an SMTP reply when there was one).
    pub reason: String,
    /// True when the queue lifetime ran out (the failures were temporary).
    pub expired: bool,
    /// Its mail required TLS, or whether it did is not known: a notice, which goes
    /// wherever the sender's domain takes it, returns neither the body, even with
    /// `RET=FULL` (an audit's `RET=FULL` sent the body of TLS-required mail back in
    /// clear text), nor the header fields but `Message-ID` and `Date` (another audit
    /// got the `Subject` of such mail sent back in clear text).
    pub confidential: bool,
}

impl Failure {
    /// The RFC 3463 status: the enhanced code in the reason if it has a 5.x.x one,
    /// `4.4.7` (delivery time expired) for expiry, `5.0.0` otherwise.
    pub fn status(&self) -> String {
        if self.expired {
            return "4.4.7".to_string();
        }
        self.reason
            .split_ascii_whitespace()
            .take(3)
            .find(|w| {
                let parts: Vec<&str> = w.split('.').collect();
                parts.len() == 3
                    && parts[0] == "5"
                    && parts
                        .iter()
                        .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            })
            .map(str::to_string)
            .unwrap_or_else(|| "5.0.0".to_string())
    }
}

/// One recipient handed to a next hop that does not offer DSN, whose sender asked for
/// success notices (`NOTIFY=SUCCESS`): RFC 3461 §6.2.2's `relayed`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relayed {
    /// Its place in the envelope.
    pub index: usize,
    /// The recipient address.
    pub recipient: String,
    /// The next hop that took it (host, address, TLS).
    pub via: String,
}

/// Builds the DSN for `failures` of the message (`envelope`, `original`) and its
/// envelope, or `None` when there is nothing to send: the message had the null sender,
/// or no failed recipient asked for failure notices (`NOTIFY=NEVER`, or `NOTIFY`
/// without `FAILURE`).
pub fn build(
    reporting_mta: &str,
    envelope: &Envelope,
    original: &[u8],
    failures: &[Failure],
    now: Timestamp,
    unique: &str,
) -> Option<(Envelope, Vec<u8>)> {
    let reported: Vec<&Failure> = failures
        .iter()
        .filter(|f| envelope.dsn_of(f.index).notify.on_failure())
        .collect();
    let confidential = reported.iter().any(|f| f.confidential);
    let entries: Vec<Entry> = reported
        .into_iter()
        .map(|f| Entry {
            index: f.index,
            recipient: &f.recipient,
            action: "failed",
            status: f.status(),
            human: if f.expired {
                format!("gave up after the queue lifetime; last error: {}", f.reason)
            } else {
                f.reason.clone()
            },
            diagnostic: Some(&f.reason),
        })
        .collect();
    compose(
        reporting_mta,
        envelope,
        original,
        &entries,
        Kind::Failure { confidential },
        now,
        unique,
    )
}

/// Builds the success notice (`Action: relayed`) for `relayed` recipients that asked
/// for one, or `None` (null sender, nobody asked). `confidential` as in
/// [`Failure::confidential`], for the message.
pub fn build_relayed(
    reporting_mta: &str,
    envelope: &Envelope,
    original: &[u8],
    relayed: &[Relayed],
    confidential: bool,
    now: Timestamp,
    unique: &str,
) -> Option<(Envelope, Vec<u8>)> {
    let entries: Vec<Entry> = relayed
        .iter()
        .filter(|r| envelope.dsn_of(r.index).notify.on_success())
        .map(|r| Entry {
            index: r.index,
            recipient: &r.recipient,
            action: "relayed",
            status: "2.0.0".to_string(),
            human: format!(
                "relayed to {}, which does not report delivery (no DSN support)",
                r.via
            ),
            diagnostic: None,
        })
        .collect();
    compose(
        reporting_mta,
        envelope,
        original,
        &entries,
        Kind::Relayed { confidential },
        now,
        unique,
    )
}

/// One recipient's lines in a report.
struct Entry<'a> {
    index: usize,
    recipient: &'a str,
    action: &'static str,
    status: String,
    human: String,
    diagnostic: Option<&'a str>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// The message, or its headers, as `RET` says. `confidential` as in
    /// [`Failure::confidential`], here and below.
    Failure { confidential: bool },
    /// Headers only, whatever `RET` says (RFC 3461 §4.3: `RET` is for failures).
    Relayed { confidential: bool },
}

/// At most this big a message goes back whole with `RET=FULL` (Postfix's
/// `bounce_size_limit` is 50 KB); a bigger one, its headers only.
pub const MAX_RETURNED_MESSAGE: usize = 64 * 1024;

fn compose(
    reporting_mta: &str,
    envelope: &Envelope,
    original: &[u8],
    entries: &[Entry],
    kind: Kind,
    now: Timestamp,
    unique: &str,
) -> Option<(Envelope, Vec<u8>)> {
    if envelope.mail_from.is_empty() || entries.is_empty() {
        return None;
    }
    let boundary = format!("altroute-dsn-{unique}");
    let (Kind::Failure { confidential } | Kind::Relayed { confidential }) = kind;
    let section = header_section(original);
    let identifying;
    let headers = if confidential {
        identifying = identifying_fields(section);
        &identifying[..]
    } else {
        section
    };
    // RET=FULL (RFC 3461 §4.3): the whole message, when it is small enough and not
    // confidential; otherwise, and by default, its headers.
    let full =
        kind == (Kind::Failure {
            confidential: false,
        }) && envelope.ret == Some(altroute_smtp::dsn::Ret::Full)
            && original.len() <= MAX_RETURNED_MESSAGE;
    let returned = if full { original } else { headers };
    // RFC 6533: a report with UTF-8 in its addresses or returned text is a
    // `message/global-delivery-status` with `message/global-headers` (or
    // `message/global`), and goes with SMTPUTF8 (a next hop without it cannot take it,
    // RFC 6531 §3.4).
    let sender = ascii_domain(&envelope.mail_from);
    let utf8 = !sender.is_ascii()
        || entries
            .iter()
            .any(|e| !ascii_domain(e.recipient).is_ascii())
        || entries.iter().any(|e| {
            envelope
                .dsn_of(e.index)
                .orcpt
                .is_some_and(|o| !o.is_ascii())
        })
        || !headers.is_ascii()
        || full && !original.is_ascii();
    let date = rfc5322_date(now);
    let mut m = String::new();
    m.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>\r\n"
    ));
    m.push_str(&format!("To: <{}>\r\n", for_header(&sender)));
    m.push_str(match kind {
        Kind::Failure { .. } => "Subject: Undelivered Mail Returned to Sender\r\n",
        Kind::Relayed { .. } => "Subject: Successful Mail Delivery Report\r\n",
    });
    m.push_str(&format!("Date: {date}\r\n"));
    let tag = match kind {
        Kind::Failure { .. } => "dsn",
        Kind::Relayed { .. } => "relayed",
    };
    m.push_str(&format!("Message-ID: <{unique}.{tag}@{reporting_mta}>\r\n"));
    m.push_str("Auto-Submitted: auto-replied\r\n");
    m.push_str("MIME-Version: 1.0\r\n");
    m.push_str(&format!(
        "Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary=\"{boundary}\"\r\n"
    ));
    m.push_str("\r\n");
    m.push_str("This is a MIME-encapsulated delivery status notification.\r\n");

    // Human-readable part.
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str(if utf8 {
        "Content-Type: text/plain; charset=utf-8\r\n\r\n"
    } else {
        "Content-Type: text/plain; charset=us-ascii\r\n\r\n"
    });
    m.push_str(&format!(
        "This is the mail system at {reporting_mta}.\r\n\r\n"
    ));
    m.push_str(match kind {
        Kind::Failure { .. } => "Your message could not be delivered to the following recipients:\r\n\r\n",
        Kind::Relayed { .. } => "Your message was handed on for the following recipients, as you asked to be told:\r\n\r\n",
    });
    for e in entries {
        m.push_str(&format!(
            "<{}>: {}\r\n",
            for_header(&ascii_domain(e.recipient)),
            brief(&e.human)
        ));
    }
    if confidential {
        m.push_str(
            "\r\nThe message required TLS, and this notice may travel without it: of its \
             header fields only Message-ID and Date are returned.\r\n",
        );
    }

    // Machine-readable part.
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str(if utf8 {
        "Content-Type: message/global-delivery-status\r\n\r\n"
    } else {
        "Content-Type: message/delivery-status\r\n\r\n"
    });
    m.push_str(&format!("Reporting-MTA: dns; {reporting_mta}\r\n"));
    if let Some(id) = &envelope.env_id {
        // As the sender wrote it: the server took only printable ASCII.
        m.push_str(&format!("Original-Envelope-Id: {}\r\n", brief(id)));
    }
    if envelope.received_at > 0 {
        m.push_str(&format!(
            "Arrival-Date: {}\r\n",
            rfc5322_date(envelope.received_at)
        ));
    }
    for e in entries {
        m.push_str("\r\n");
        if let Some(orcpt) = envelope.dsn_of(e.index).orcpt {
            m.push_str(&format!(
                "Original-Recipient: rfc822; {}\r\n",
                // As the sender wrote it (not re-quoted as a mailbox): the server took
                // no control characters or line separators.
                orcpt
            ));
        }
        m.push_str(&format!(
            "Final-Recipient: rfc822; {}\r\n",
            for_header(&ascii_domain(e.recipient))
        ));
        m.push_str(&format!("Action: {}\r\n", e.action));
        m.push_str(&format!("Status: {}\r\n", e.status));
        if let Some(d) = e.diagnostic {
            m.push_str(&format!("Diagnostic-Code: smtp; {}\r\n", brief(d)));
        }
        // No `Will-Retry-Until`, even for an expiry: RFC 3464 §2.3.7 defines it for
        // `Action: delayed` only, and these notices are `failed` or `relayed`.
        m.push_str(&format!("Last-Attempt-Date: {date}\r\n"));
    }

    // The original message or its headers (RFC 3462 text/rfc822-headers).
    m.push_str(&format!("\r\n--{boundary}\r\n"));
    m.push_str(match (full, utf8) {
        (true, true) => "Content-Type: message/global\r\n\r\n",
        (true, false) => "Content-Type: message/rfc822\r\n\r\n",
        (false, true) => "Content-Type: message/global-headers\r\n\r\n",
        (false, false) => "Content-Type: text/rfc822-headers\r\n\r\n",
    });
    let mut body = m.into_bytes();
    body.extend_from_slice(returned);
    if !returned.ends_with(b"\r\n") && !returned.is_empty() {
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());

    let mut dsn_env = Envelope::new("", vec![envelope.mail_from.clone()]);
    dsn_env.received_from = Some(format!("dsn@{reporting_mta}"));
    // RFC 8689 §5: the DSN of REQUIRETLS mail holds its header section, so it travels
    // under the same requirement (and, as here always, with the headers only).
    dsn_env.requiretls = envelope.requiretls;
    // Sent with SMTPUTF8 only where it needs it (`attempt::send_to`).
    dsn_env.smtputf8 = utf8;
    Some((dsn_env, body))
}

/// At most this much of the original header section goes back (Postfix's
/// `header_size_limit` is 100 KiB, its whole bounce 50 KB).
pub const MAX_RETURNED_HEADERS: usize = 64 * 1024;

/// At most this many bytes of a reason (a reply, a policy's text) per line of a DSN.
pub const MAX_REASON: usize = 512;

/// The header section of `original` as it goes back in a DSN: its lines from the first,
/// as long as each is a header field (`name:`) or the continuation of one, up to the
/// empty line, and at most [`MAX_RETURNED_HEADERS`] (whole lines). A message without an
/// empty line once went back whole, body and all; a hostile one can make its "header
/// section" any size.
fn header_section(original: &[u8]) -> &[u8] {
    let mut end = 0;
    let mut rest = original;
    while let Some(nl) = rest.iter().position(|&b| b == b'\n') {
        let line = &rest[..nl + 1];
        let text = line.strip_suffix(b"\r\n").unwrap_or(line);
        let field = text.iter().position(|&b| b == b':').is_some_and(|colon| {
            colon > 0 && text[..colon].iter().all(|&b| (33..=126).contains(&b))
        });
        let continuation = end > 0 && matches!(text.first(), Some(b' ' | b'\t'));
        if !(field || continuation) || end + line.len() > MAX_RETURNED_HEADERS {
            break;
        }
        end += line.len();
        rest = &rest[nl + 1..];
    }
    &original[..end]
}

/// The `Message-ID` and `Date` fields (with their continuation lines) of a header
/// `section` ([`header_section`]): what identifies a confidential message to its sender
/// without telling what it was about.
fn identifying_fields(section: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut keep = false;
    for line in section.split_inclusive(|&b| b == b'\n') {
        if !matches!(line.first(), Some(b' ' | b'\t')) {
            let name = line.split(|&b| b == b':').next().unwrap_or_default();
            keep = name.eq_ignore_ascii_case(b"message-id") || name.eq_ignore_ascii_case(b"date");
        }
        if keep {
            out.extend_from_slice(line);
        }
    }
    out
}

/// A reason as one printable ASCII line (header fields must not break) of at most
/// [`MAX_REASON`] bytes: a next hop's reply may have 128 lines of 4 KiB, and a DSN once
/// carried it twice per recipient (100 MB for 100 recipients), with lines no next hop
/// takes.
pub fn brief(s: &str) -> String {
    let printable = |c: char| {
        if c.is_ascii_graphic() || c == ' ' {
            c
        } else {
            ' '
        }
    };
    if s.len() <= MAX_REASON {
        return s.chars().map(printable).collect();
    }
    // Cut at a char boundary, leaving room for the mark.
    let mut cut = MAX_REASON - 3;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out: String = s[..cut].chars().map(printable).collect();
    out.push_str("...");
    out
}

/// `Tue, 01 Jul 2025 10:00:00 +0000` for a Unix time (UTC).
pub fn rfc5322_date(t: Timestamp) -> String {
    let days = t / 86_400;
    let secs = t % 86_400;
    let (y, mo, d) = crate::civil::civil_from_days(days as i64);
    // 1970-01-01 was a Thursday.
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][(days % 7) as usize];
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ][(mo - 1) as usize];
    format!(
        "{weekday}, {d:02} {month} {y} {:02}:{:02}:{:02} +0000",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(rfc5322_date(0), "Thu, 01 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(1_700_000_000),
            "Tue, 14 Nov 2023 22:13:20 +0000"
        );
        assert_eq!(rfc5322_date(951_782_400), "Tue, 29 Feb 2000 00:00:00 +0000");
    }

    #[test]
    fn dsn_shape_and_no_dsn_for_dsn() {
        let mut env = Envelope::new("alice@corp.example", vec!["bob@partner.example".into()]);
        env.received_at = 1_700_000_000;
        let failures = [Failure {
            index: 0,
            confidential: true,
            recipient: "bob@partner.example".into(),
            reason: "550 5.7.10 TLS required for this recipient but unavailable".into(),
            expired: false,
        }];
        let original = b"Subject: hi\r\nFrom: alice@corp.example\r\nMessage-ID: <m1@corp>\r\n\r\nsecret body\r\n";
        let (dsn_env, dsn) = build(
            "relay.example",
            &env,
            original,
            &failures,
            1_700_000_100,
            "x1",
        )
        .unwrap();
        assert_eq!(dsn_env.mail_from, "");
        assert_eq!(dsn_env.rcpt_to, vec!["alice@corp.example".to_string()]);
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("report-type=delivery-status"));
        assert!(text.contains("Final-Recipient: rfc822; bob@partner.example\r\n"));
        assert!(text.contains("Status: 5.7.10\r\n"));
        assert!(text.contains("Message-ID: <m1@corp>\r\n"), "{text}");
        assert!(
            !text.contains("Subject: hi") && !text.contains("secret body"),
            "mail that required TLS: only Message-ID and Date go back"
        );
        let null = Envelope::new("", vec!["x@y".into()]);
        assert!(build("r", &null, original, &failures, 0, "x2").is_none());
        // RFC 8689 §5: the DSN of REQUIRETLS mail requires TLS too.
        assert!(!dsn_env.requiretls);
        env.requiretls = true;
        let (dsn_env, _) = build("r", &env, original, &failures, 0, "x3").unwrap();
        assert!(dsn_env.requiretls);
    }

    /// An expiry is a failure like a bounce: `Action: failed` with its dates, and no
    /// `Will-Retry-Until` (RFC 3464 §2.3.7: only for delayed notices).
    #[test]
    fn expired_recipient_is_failed_without_will_retry_until() {
        let mut env = Envelope::new("alice@corp.example", vec!["bob@partner.example".into()]);
        env.received_at = 1_700_000_000;
        let failures = [Failure {
            index: 0,
            confidential: true,
            recipient: "bob@partner.example".into(),
            reason: "451 4.4.1 no answer from the MX hosts".into(),
            expired: true,
        }];
        let (_, dsn) = build(
            "r",
            &env,
            b"Subject: hi\r\n\r\n",
            &failures,
            1_700_432_000,
            "x4",
        )
        .unwrap();
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Action: failed\r\n"), "{text}");
        assert!(
            text.contains("Last-Attempt-Date: Sun, 19 Nov 2023 22:13:20 +0000\r\n"),
            "{text}"
        );
        assert!(!text.contains("Will-Retry-Until"), "{text}");
    }

    /// What an audit's hostile peers made of DSNs: a 128-line reply of 4 KiB lines per
    /// recipient (100 MB for 100 recipients, lines of 60 KB that next hops refuse), and a
    /// message without an empty line returned whole. Each reason is one short line, and
    /// only header lines go back, at most 64 KiB of them.
    #[test]
    fn hostile_replies_and_messages_give_a_bounded_dsn() {
        let env = Envelope::new("alice@corp.example", vec![]);
        let huge = format!("550 5.1.1 {}", "L".repeat(4096).repeat(128));
        let failures: Vec<Failure> = (0..100)
            .map(|i| Failure {
                index: i,
                confidential: false,
                recipient: format!("r{i}@huge.example"),
                reason: huge.clone(),
                expired: false,
            })
            .collect();
        let mut original = b"Subject: hi\r\nX-Folded: a\r\n b\r\n".to_vec();
        for _ in 0..5000 {
            original.extend_from_slice(&[b'B'; 900]);
            original.extend_from_slice(b"\r\n");
        }
        let (_, dsn) = build("r", &env, &original, &failures, 0, "x5").unwrap();
        assert!(dsn.len() < 200 * 1024, "{} bytes", dsn.len());
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.lines().all(|l| l.len() <= 998), "a line over 998");
        assert!(text.contains("Status: 5.1.1\r\n"));
        assert!(text.contains("X-Folded: a\r\n b\r\n"), "{text}");
        assert!(!text.contains("BBBB"), "a body line went back");

        // A header section of many real fields: whole lines up to 64 KiB.
        let mut big = Vec::new();
        for i in 0..10_000 {
            big.extend_from_slice(format!("X-H{i}: {}\r\n", "v".repeat(40)).as_bytes());
        }
        big.extend_from_slice(b"\r\nbody\r\n");
        let returned = header_section(&big);
        assert!(returned.len() <= MAX_RETURNED_HEADERS && returned.len() > 60_000);
        assert!(returned.ends_with(b"\r\n"));
        assert_eq!(header_section(b"no header\r\n\r\n"), b"");
        assert_eq!(header_section(b" leading: space\r\n"), b"");
        assert_eq!(brief("550 5.7.1 a\r\n\tb"), "550 5.7.1 a   b");
    }

    /// The DSN of mail from a UTF-8 sender (SMTPUTF8) carries UTF-8 addresses: RFC 6533's
    /// types, sent with SMTPUTF8. It once went without, and a next hop refused it.
    #[test]
    fn a_dsn_with_utf8_addresses_is_a_global_report_sent_with_smtputf8() {
        let env = Envelope::new("jörg@corp.example", vec![]);
        let failures = [Failure {
            index: 0,
            confidential: true,
            recipient: "bob@partner.example".into(),
            reason: "550 5.1.1 no".into(),
            expired: false,
        }];
        let (dsn_env, dsn) = build("r", &env, b"Subject: x\r\n\r\n", &failures, 0, "x6").unwrap();
        assert!(dsn_env.smtputf8);
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Content-Type: message/global-delivery-status\r\n"));
        assert!(text.contains("Content-Type: message/global-headers\r\n"));
        let ascii = Envelope::new("alice@corp.example", vec![]);
        let (dsn_env, dsn) = build("r", &ascii, b"Subject: x\r\n\r\n", &failures, 0, "x7").unwrap();
        assert!(!dsn_env.smtputf8);
        assert!(
            String::from_utf8(dsn)
                .unwrap()
                .contains("message/delivery-status")
        );
    }

    /// A sender or recipient whose domain only is in Unicode is written with the domain's
    /// A-label: the notice is all ASCII and needs no SMTPUTF8. An audit's notice to
    /// `z@bücher.test` needed it for its own `To:` field only, was refused by a next hop
    /// without it, and was lost (a notice's bounce goes nowhere).
    #[test]
    fn a_unicode_domain_alone_does_not_make_a_dsn_need_smtputf8() {
        let env = Envelope::new("z@bücher.example", vec![]);
        let failures = [Failure {
            index: 0,
            confidential: false,
            recipient: "u@straße-partner.example".into(),
            reason: "550 5.1.1 no".into(),
            expired: false,
        }];
        let (dsn_env, dsn) = build("r", &env, b"Subject: x\r\n\r\n", &failures, 0, "x8").unwrap();
        assert!(!dsn_env.smtputf8);
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.is_ascii(), "{text}");
        assert!(text.contains("To: <z@xn--bcher-kva.example>\r\n"), "{text}");
        assert!(
            text.contains("Final-Recipient: rfc822; u@xn--strae-partner-edb.example\r\n"),
            "{text}"
        );
        assert!(text.contains("Content-Type: message/delivery-status\r\n"));
        assert_eq!(dsn_env.rcpt_to, ["z@bücher.example"]);
    }

    /// `RET=FULL` returns the message only for failures whose mail required no TLS
    /// (the notice goes wherever the sender's domain takes it: an audit's came back in
    /// clear text with the body of TLS-required mail), and never in a `relayed` notice.
    #[test]
    fn ret_full_returns_the_body_only_of_mail_that_needed_no_tls() {
        let mut env = Envelope::new("alice@corp.example", vec![]);
        env.ret = Some(altroute_smtp::dsn::Ret::Full);
        let original = b"Subject: s\r\n\r\nTOPSECRET\r\n";
        let failure = |confidential| Failure {
            index: 0,
            recipient: "bob@partner.example".into(),
            reason: "550 5.1.1 no".into(),
            expired: false,
            confidential,
        };
        let text = |dsn: Option<(Envelope, Vec<u8>)>| String::from_utf8(dsn.unwrap().1).unwrap();
        let open = text(build("r", &env, original, &[failure(false)], 0, "a"));
        assert!(
            open.contains("TOPSECRET") && open.contains("message/rfc822"),
            "{open}"
        );
        let secret = text(build("r", &env, original, &[failure(true)], 0, "b"));
        assert!(!secret.contains("TOPSECRET"), "{secret}");
        assert!(secret.contains("text/rfc822-headers"), "{secret}");
        let mixed = text(build(
            "r",
            &env,
            original,
            &[failure(false), failure(true)],
            0,
            "c",
        ));
        assert!(!mixed.contains("TOPSECRET"), "{mixed}");
        env.dsn = vec![altroute_smtp::dsn::RcptDsn {
            notify: altroute_smtp::dsn::Notify {
                success: true,
                ..Default::default()
            },
            orcpt: None,
        }];
        let relayed = [Relayed {
            index: 0,
            recipient: "bob@partner.example".into(),
            via: "host x".into(),
        }];
        let notice = text(build_relayed("r", &env, original, &relayed, false, 0, "d"));
        assert!(!notice.contains("TOPSECRET"), "{notice}");
        assert!(notice.contains("Subject: s\r\n"), "{notice}");
        let notice = text(build_relayed("r", &env, original, &relayed, true, 0, "e"));
        assert!(!notice.contains("Subject: s"), "{notice}");
    }

    /// The header section of mail that required TLS goes back as its `Message-ID` and
    /// `Date` only (an audit's notice, sent in clear text, carried the `Subject` of mail
    /// a rule required TLS for); an open message's goes back whole.
    #[test]
    fn a_confidential_message_returns_only_its_message_id_and_date() {
        let env = Envelope::new("alice@corp.example", vec![]);
        let original = b"Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nSubject: SECRET-SUBJECT\r\n\
                         To: ceo@partner.example\r\nMESSAGE-ID:\r\n <m2@corp>\r\n\
                         X-Trace: a\r\n\tb\r\n\r\nbody\r\n";
        let failure = |confidential| Failure {
            index: 0,
            recipient: "ceo@partner.example".into(),
            reason: "550 5.7.10 TLS required".into(),
            expired: false,
            confidential,
        };
        let (_, dsn) = build("r", &env, original, &[failure(true)], 0, "f").unwrap();
        let text = String::from_utf8(dsn).unwrap();
        let returned = text.rsplit("text/rfc822-headers\r\n\r\n").next().unwrap();
        assert!(
            returned.starts_with(
                "Date: Mon, 7 Dec 2026 10:00:00 +0000\r\nMESSAGE-ID:\r\n <m2@corp>\r\n\r\n--"
            ),
            "{returned}"
        );
        assert!(!text.contains("SECRET-SUBJECT") && !text.contains("X-Trace"));
        assert!(text.contains("only Message-ID and Date are returned"));
        let (_, dsn) = build("r", &env, original, &[failure(false)], 0, "g").unwrap();
        let text = String::from_utf8(dsn).unwrap();
        assert!(text.contains("Subject: SECRET-SUBJECT\r\n") && text.contains("X-Trace: a\r\n\tb"));
        assert!(!text.contains("only Message-ID and Date"));
    }
}
