//! The inbound SMTP handler: who may relay, and into the spool.
//!
//! A client may relay when its address is in `relay.allow_networks`, or it presented a
//! client certificate that verified against `relay.client_ca` (the TLS verifier aborts the
//! handshake on any other certificate, so a certificate in the session means a verified
//! one), or it authenticated with SMTP AUTH over TLS against `relay.users_file`. Anyone
//! else gets `550 5.7.1 Relaying denied` for every recipient: never an open relay.
//!
//! A message that already carries more `Received:` trace fields than `server.max_hops`
//! (50) is refused with `554 5.4.6` (RFC 5321 §6.3: a mail loop).
//!
//! At the end of DATA the message gets a `Received:` trace field and is stored with
//! [`Spool::store`]; the client gets `250` with the queue id only when the store returned
//! `Ok` (the message is then on stable storage). Disk full answers
//! `452 4.3.1 Insufficient system storage`, any other spool error `451 4.3.0`.

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use altroute_queue::Spool;
use altroute_smtp::{Envelope, Handler, Reply, SessionInfo};

use crate::config::Config;
use crate::metrics::Metrics;

/// The relay's [`Handler`].
#[derive(Debug)]
pub struct Inbound {
    hostname: String,
    allow_networks: Vec<IpNet>,
    client_certs: bool,
    users: Vec<(String, [u8; 32])>,
    max_hops: usize,
    /// `relay.postmaster`: where mail to `postmaster` goes.
    postmaster: Option<String>,
    spool: Spool,
    metrics: Arc<Metrics>,
}

impl Inbound {
    /// A handler storing into `spool` with the access rules of `config.relay`.
    pub fn new(config: &Config, spool: Spool, metrics: Arc<Metrics>) -> Inbound {
        Inbound {
            hostname: config.server.hostname.clone(),
            allow_networks: config.relay.allow_networks.clone(),
            client_certs: config.relay.client_ca.is_some(),
            users: config.relay.users.clone(),
            max_hops: config.server.max_hops,
            postmaster: config.relay.postmaster.clone(),
            spool,
            metrics,
        }
    }

    fn allowed_address(&self, ip: IpAddr) -> bool {
        crate::config::in_networks(&self.allow_networks, ip)
    }
}

/// The reply to an address [`askable`] refuses.
const NOT_ASKABLE: &str =
    "Address not relayed: a local part with @, % or ! is read as another mailbox";

/// Whether the policy can be asked about `address` as the relay asks
/// ([`crate::delivery::question_address`]).
fn askable(address: &str) -> bool {
    altroute_policy::pattern::is_mailbox(&crate::delivery::question_address(address))
}

impl Handler for Inbound {
    fn may_relay(&self, session: &SessionInfo) -> bool {
        let by_cert = self.client_certs
            && session
                .tls
                .as_ref()
                .is_some_and(|t| t.client_cert_der.is_some());
        let allowed = by_cert || session.auth.is_some() || self.allowed_address(session.peer.ip());
        if !allowed {
            self.metrics.reject_rcpt("relay_denied");
            tracing::info!(peer = %session.peer, "relaying denied");
        }
        allowed
    }

    /// Only a sender the policy can be asked about (see [`rcpt_to`](Self::rcpt_to)).
    async fn mail_from(&self, _session: &SessionInfo, envelope: &Envelope) -> Reply {
        if !envelope.mail_from.is_empty() && !askable(&envelope.mail_from) {
            return Reply::new(501, (5, 1, 7), NOT_ASKABLE);
        }
        Reply::new(250, (2, 1, 0), "Sender OK")
    }

    /// Only a recipient the policy can be asked about: a plain RFC 5321 mailbox whose
    /// local part holds no `@`, `%` or `!` ([`altroute_policy::pattern::is_mailbox`]). A
    /// next hop may read such a local part as another mailbox (Postfix delivers
    /// `bob%partner.example@localhost` to bob@partner.example), and the contract refuses
    /// it as a fact, so the mail could only be deferred until it expired. The SMTP edge
    /// filter refuses the same addresses.
    ///
    /// `postmaster` (no domain) is taken only when `relay.postmaster` names where it goes
    /// (it is stored as that address): the relay has no mailboxes, and an audit's message
    /// to it was accepted, then deferred for the whole queue lifetime.
    async fn rcpt_to(&self, _session: &SessionInfo, _envelope: &Envelope, rcpt: &str) -> Reply {
        if rcpt.eq_ignore_ascii_case("postmaster") {
            if self.postmaster.is_none() {
                self.metrics.reject_rcpt("no_postmaster");
                return Reply::new(
                    550,
                    (5, 1, 1),
                    "No postmaster mailbox here: this relay has no mailboxes of its own",
                );
            }
            return Reply::new(250, (2, 1, 5), "Recipient OK");
        }
        if !askable(rcpt) {
            self.metrics.reject_rcpt("bad_address");
            return Reply::new(501, (5, 1, 3), NOT_ASKABLE);
        }
        Reply::new(250, (2, 1, 5), "Recipient OK")
    }

    async fn authenticate(
        &self,
        session: &SessionInfo,
        authcid: &str,
        password: &str,
    ) -> Option<String> {
        let hash: [u8; 32] = Sha256::digest(password.as_bytes()).into();
        // Compare every byte of every entry so timing does not tell how much matched.
        let mut found = None;
        for (user, stored) in &self.users {
            let same = stored
                .iter()
                .zip(hash.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same && user == authcid {
                found = Some(user.clone());
            }
        }
        // Who relays as whom, and every failure (what an operator and fail2ban watch): an
        // audit's 18,000 wrong guesses left no trace at all.
        match &found {
            Some(user) => tracing::info!(peer = %session.peer, user = %user, "SMTP AUTH succeeded"),
            None => {
                self.metrics.auth_failures.inc();
                tracing::warn!(peer = %session.peer, user = ?authcid, "SMTP AUTH failed");
            }
        }
        found
    }

    async fn data(&self, session: &SessionInfo, envelope: &Envelope, message: Vec<u8>) -> Reply {
        let hops = received_count(&message);
        if hops > self.max_hops {
            self.metrics.reject_message("too_many_hops");
            tracing::info!(peer = %session.peer, hops, "message refused: too many hops");
            return Reply::new(
                554,
                (5, 4, 6),
                format!("too many hops ({hops} Received: headers); mail loop?"),
            );
        }
        // `postmaster` is accepted only with `relay.postmaster` set (see `rcpt_to`). A
        // recipient given twice (its domain in any case) is kept once, with the DSN
        // parameters of its first RCPT, as Postfix's cleanup does: a next hop that does
        // not drop duplicates would deliver it twice (an audit's next hop got three).
        let mut rcpt_to: Vec<String> = Vec::with_capacity(envelope.rcpt_to.len());
        let mut dsn = Vec::with_capacity(envelope.rcpt_to.len());
        for (i, r) in envelope.rcpt_to.iter().enumerate() {
            let r = match &self.postmaster {
                Some(p) if r.eq_ignore_ascii_case("postmaster") => p.clone(),
                _ => r.clone(),
            };
            if rcpt_to.iter().any(|seen| same_recipient(seen, &r)) {
                continue;
            }
            rcpt_to.push(r);
            dsn.push(envelope.rcpt_dsn.get(i).cloned().unwrap_or_default());
        }
        let mut env = altroute_queue::Envelope::new(envelope.mail_from.clone(), rcpt_to);
        env.requiretls = envelope.requiretls;
        env.tls_required_no = has_tls_required_no(&message);
        env.received_from = Some(session.peer.ip().to_string());
        env.env_id = envelope.env_id.clone();
        env.smtputf8 = envelope.smtputf8;
        env.ret = envelope.ret;
        if dsn.iter().any(|d| !d.is_empty()) {
            env.dsn = dsn;
        }

        let trace = received_field(&self.hostname, session, envelope);
        let mut stored = Vec::with_capacity(trace.len() + message.len());
        stored.extend_from_slice(trace.as_bytes());
        stored.extend_from_slice(&message);
        let size = stored.len() as u64;

        match self.spool.store(env, stored).await {
            Ok(id) => {
                self.metrics.accepted.inc();
                self.metrics.accepted_bytes.inc_by(size);
                tracing::debug!(queue_id = %id, peer = %session.peer, size, "message queued");
                Reply::new(250, (2, 0, 0), format!("Ok: queued as {id}"))
            }
            Err(e) => {
                self.metrics.store_errors.inc();
                tracing::warn!(error = %e, peer = %session.peer, "spool store failed");
                if e.is_disk_full() {
                    self.metrics.reject_message("disk_full");
                    Reply::new(452, (4, 3, 1), "Insufficient system storage")
                } else {
                    self.metrics.reject_message("store_error");
                    Reply::new(451, (4, 3, 0), "Temporary local problem, try again later")
                }
            }
        }
    }
}

/// Whether two envelope recipients are one: the same local part, and the same domain in
/// any case or spelling as delivery writes it (its A-label: `bücher.test` is
/// `xn--bcher-kva.test`, which an audit's next hop got twice). A local part's case may
/// matter to its domain (RFC 5321 §2.4).
fn same_recipient(a: &str, b: &str) -> bool {
    let (a, b) = (
        crate::delivery::delivery_address(a),
        crate::delivery::delivery_address(b),
    );
    match (a.rsplit_once('@'), b.rsplit_once('@')) {
        (Some((la, da)), Some((lb, db))) => la == lb && da.eq_ignore_ascii_case(db),
        _ => a == b,
    }
}

/// Does the header section carry `TLS-Required: No` (RFC 8689 section 5)? Field names and
/// the value compare case-insensitively; folded values are unfolded.
pub fn has_tls_required_no(message: &[u8]) -> bool {
    let mut current: Option<Vec<u8>> = None;
    let check = |field: &[u8]| -> bool {
        let Some(colon) = field.iter().position(|&b| b == b':') else {
            return false;
        };
        let (name, value) = field.split_at(colon);
        let value = value.get(1..).unwrap_or(&[]);
        name.trim_ascii().eq_ignore_ascii_case(b"TLS-Required")
            && value.trim_ascii().eq_ignore_ascii_case(b"No")
    };
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            if let Some(f) = current.as_mut() {
                f.push(b' ');
                f.extend_from_slice(line.trim_ascii());
            }
            continue;
        }
        if let Some(f) = current.take()
            && check(&f)
        {
            return true;
        }
        current = Some(line.to_vec());
    }
    current.is_some_and(|f| check(&f))
}

/// How many `Received:` fields the header section holds (continuation lines are part of
/// their field; the name compares case-insensitively).
pub fn received_count(message: &[u8]) -> usize {
    let mut n = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        if !line[0].is_ascii_whitespace()
            && line[..colon].trim_ascii().eq_ignore_ascii_case(b"Received")
        {
            n += 1;
        }
    }
    n
}

/// The `Received:` trace field (RFC 5321 section 4.4) we prepend, CRLF-terminated.
fn received_field(hostname: &str, session: &SessionInfo, envelope: &Envelope) -> String {
    // RFC 3848 protocol names.
    let protocol = match (session.tls.is_some(), session.auth.is_some()) {
        (false, false) => "ESMTP",
        (true, false) => "ESMTPS",
        (false, true) => "ESMTPA",
        (true, true) => "ESMTPSA",
    };
    // A host name or an address literal: nothing that opens a comment or a date in the
    // field (an audit's `EHLO evil(x;Mon,_01_Jan_2001` left a `(` open and a `;`).
    let helo: String = session
        .helo
        .as_deref()
        .unwrap_or("")
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(*c))
        .collect();
    let helo = if helo.is_empty() { "unknown" } else { &helo };
    // The recipient as it is delivered: its domain as an A-label. In Unicode it made an
    // all-ASCII message need SMTPUTF8 (and 8BITMIME), and an audit's was bounced `550
    // 5.6.7` by a next hop without SMTPUTF8 for the relay's own field.
    // A local part in UTF-8 is left out altogether: the field would make the message
    // 8-bit for a next hop that takes SMTPUTF8 but not 8BITMIME.
    let rcpt = match envelope.rcpt_to.as_slice() {
        [one] => {
            let delivered = crate::delivery::delivery_address(one);
            if delivered.is_ascii() {
                format!(
                    "\r\n\tfor <{}>",
                    altroute_smtp::address::for_header(&delivered)
                )
            } else {
                String::new()
            }
        }
        _ => String::new(),
    };
    format!(
        "Received: from {helo} ([{}])\r\n\tby {hostname} (altroute) with {protocol}{rcpt};\r\n\t{}\r\n",
        session.peer.ip(),
        rfc5322_now()
    )
}

/// Current UTC time as an RFC 5322 date-time, e.g. `Tue, 25 Nov 2026 11:48:56 +0000`.
fn rfc5322_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    crate::delivery::dsn::rfc5322_date(secs)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn tls_required_header() {
        let cases: &[(&[u8], bool)] = &[
            (b"Subject: x\r\nTLS-Required: No\r\n\r\nbody", true),
            (b"tls-required:   no  \r\n\r\n", true),
            (b"TLS-Required:\r\n No\r\n\r\n", true),
            (b"TLS-Required: Yes\r\n\r\n", false),
            (b"Subject: a\r\n\r\nTLS-Required: No\r\n", false),
            (b"X-TLS-Required: No\r\n\r\n", false),
            (b"TLS-Required: No", true),
        ];
        for (msg, want) in cases {
            assert_eq!(
                has_tls_required_no(msg),
                *want,
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    #[test]
    fn received_fields() {
        let cases: &[(&[u8], usize)] = &[
            (
                b"Received: a\r\n\tby b\r\nreceived :c\r\nSubject: x\r\n\r\n",
                2,
            ),
            (
                b"Subject: x\r\n Received: folded\r\nX-Received: no\r\n\r\n",
                0,
            ),
            (b"Subject: x\r\n\r\nReceived: in the body\r\n", 0),
            (b"Received: no body", 1),
        ];
        for (msg, want) in cases {
            assert_eq!(
                received_count(msg),
                *want,
                "{:?}",
                String::from_utf8_lossy(msg)
            );
        }
    }

    /// The field the relay writes is ASCII for an ASCII message (the recipient's domain as
    /// its A-label), and the client's HELO cannot open a comment in it.
    #[test]
    fn the_received_field_is_ascii_and_well_formed() {
        let mut session = SessionInfo::new(
            "192.0.2.7:2525".parse().unwrap(),
            "192.0.2.1:25".parse().unwrap(),
        );
        session.helo = Some("evil(x;Mon,_01_Jan_2001".into());
        let envelope = Envelope {
            mail_from: "a@x.example".into(),
            rcpt_to: vec!["bob@b\u{fc}cher.example".into()],
            ..Envelope::default()
        };
        let field = received_field("relay.example", &session, &envelope);
        assert!(field.is_ascii(), "{field}");
        assert!(field.contains("for <bob@xn--bcher-kva.example>"), "{field}");
        assert!(
            field.starts_with("Received: from evilxMon_01_Jan_2001 ([192.0.2.7])"),
            "{field}"
        );
        session.helo = Some("(((".into());
        let field = received_field("relay.example", &session, &envelope);
        assert!(
            field.starts_with("Received: from unknown ([192.0.2.7])"),
            "{field}"
        );
        let envelope = Envelope {
            rcpt_to: vec!["j\u{f6}rg@b\u{fc}cher.example".into()],
            ..envelope
        };
        let field = received_field("relay.example", &session, &envelope);
        assert!(field.is_ascii() && !field.contains("for <"), "{field}");
    }

    #[test]
    fn dates() {
        assert_eq!(
            crate::delivery::dsn::rfc5322_date(0),
            "Thu, 01 Jan 1970 00:00:00 +0000"
        );
        assert_eq!(
            crate::delivery::dsn::rfc5322_date(1_709_210_096),
            "Thu, 29 Feb 2024 12:34:56 +0000"
        );
        assert_eq!(
            crate::delivery::dsn::rfc5322_date(1_795_607_336),
            "Wed, 25 Nov 2026 11:48:56 +0000"
        );
    }
}
