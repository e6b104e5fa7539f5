//! The SMTP dialogue follower of the stream face: pure byte processing, no host calls.
//!
//! A [`Session`] sees the client's bytes ([`Session::client_bytes`]) and the server's bytes
//! ([`Session::server_bytes`]) and returns what to forward. It keeps a FIFO of the commands
//! that still wait for a reply, so that replies pair with commands under PIPELINING and
//! whatever way the bytes are split across reads.
//!
//! Enforcement: every `RCPT TO:<addr>` seen (the session is clear text, or it would be
//! opaque) is decided with a plan query. When the decision requires TLS, the command is
//! replaced by `NOOP` going upstream and the NOOP's reply is replaced by
//! `450 4.7.10 TLS required for <addr>` going back. 450 rather than 530: the client keeps
//! the recipient and may retry, after STARTTLS or through another route.
//!
//! After a `220` reply to `STARTTLS` the session is opaque: bytes pass untouched. Bytes
//! sent after `STARTTLS` before its reply close the session, as after `DATA` (below): a
//! server that refuses STARTTLS reads them as commands in clear text.
//!
//! Where the server may read the same bytes as commands or as message data, the follower
//! must never be the one that reads them as data, or a `RCPT` would pass unchecked:
//! - After `DATA`, the client waits for the reply (RFC 2920, DATA ends a pipelined
//!   group): the message follows a `354`, commands anything else. Bytes sent before the
//!   reply are a protocol violation; they are dropped and the session is closed
//!   ([`Session::take_violation`]), since what they are depends on a reply not yet seen.
//! - `BDAT` goes upstream only when the server offered `CHUNKING` in its last EHLO reply
//!   and the size is plain digits; its data then passes unread (a server that offers it
//!   consumes the chunk even when it refuses the command, RFC 3030). Otherwise a `NOOP`
//!   goes in its place and both sides read what follows as commands: a server may take a
//!   chunk it did not offer (Postfix does after HELO).
//! - A message ends at `CRLF . CRLF`. A `.` line that servers read differently (after or
//!   ended by a bare LF, with more than one CR, after a bare CR, with a bare CR, or longer
//!   than a server reads whole) closes the session ([`body_step`]).
//!
//! Every buffer is bounded. A client with more than [`MAX_PENDING`] commands waiting for
//! their replies (one who writes without reading: each bare LF is a command) is a
//! violation and closes the session, or the queue of pending commands would grow until
//! the VM ran out of memory and took every session of its worker down with it.
//! A reply line over 4 KiB is forwarded as it comes and counted as
//! one reply. A command line over 1000 bytes ([`MAX_COMMAND_LINE`]) is not forwarded at
//! all (a server that runs only its start could take an unchecked `RCPT`): a `NOOP` goes
//! in its place and the client gets `500 5.5.6 Line too long`, which keeps the pairing.
//! Nor is a command line with a NUL byte or a bare CR.
//!
//! Commands are split into words at any white space, as servers split them, so
//! `RCPT\tTO:<a>` is checked like `RCPT TO:<a>`. A `MAIL` or `RCPT` whose argument is not
//! of the form `FROM:` / `TO:` is not forwarded either: a `NOOP` goes in its place and the
//! client gets the server's syntax reply (`501 5.5.4 Syntax: RCPT TO:<address>`). Nor is
//! an address that is not a plain mailbox ([`is_mailbox`]): a server could read it as
//! another mailbox than the one the policy was asked about (`501 5.1.3`).

use std::collections::VecDeque;
use std::rc::Rc;

use policy::pattern::is_mailbox;
use policy::{Policy, Query, decide};

/// The longest reply line held while waiting for its end (RFC 5321 allows 512 octets for
/// replies; EHLO keywords can be longer). Commands: [`MAX_COMMAND_LINE`].
const MAX_LINE: usize = 4096;

/// The longest command line forwarded, counted with its line end. It must not be more than
/// the upstream reads whole: a server that cuts a long command and runs its start (Postfix
/// runs the first `line_length_limit` = 2048 bytes and discards the rest) would take a
/// `RCPT` or a `BDAT` size other than the one checked here. RFC 5321 allows 512 octets,
/// more with extensions' parameters; 1000 leaves room for those and stays well under
/// Postfix's limit (a deployment requirement: docs/envoy.md).
const MAX_COMMAND_LINE: usize = 1000;

/// Most commands a client may have waiting for their replies. A pipelining client waits
/// for the replies at DATA (RFC 2920), so a group is its MAIL, its RCPTs and DATA: this
/// leaves room for ten times the 100 recipients RFC 5321 §4.5.3.1.8 asks servers to take.
const MAX_PENDING: usize = 1000;

/// Most senders a `RCPT` is checked against while `MAIL`, `RSET` or `EHLO` commands
/// wait for their replies ([`Session::senders`]); more, and the `RCPT` is refused. A
/// pipelining client sends one `MAIL` per group.
const MAX_SENDERS: usize = 4;

/// The reply to a command line longer than [`MAX_COMMAND_LINE`] (as the relay's own
/// server says it).
const LINE_TOO_LONG: &str = "500 5.5.6 Line too long\r\n";
/// The reply to a command line with a NUL byte in it.
const NUL_IN_COMMAND: &str = "500 5.5.2 Command contains a NUL byte\r\n";
/// The reply to a command line with a CR that does not end it.
const CR_IN_COMMAND: &str = "500 5.5.2 Command contains a bare CR\r\n";
/// The reply to a command line that starts with white space (as the relay's own server
/// says it).
const SPACE_BEFORE_COMMAND: &str = "500 5.5.2 Command starts with white space\r\n";
/// The replies to a `MAIL` or `RCPT` whose argument is not `FROM:` / `TO:` (Postfix's).
const MAIL_SYNTAX: &str = "501 5.5.4 Syntax: MAIL FROM:<address>\r\n";
const RCPT_SYNTAX: &str = "501 5.5.4 Syntax: RCPT TO:<address>\r\n";
/// The replies to an address that is not a plain mailbox ([`is_mailbox`]; Postfix's words).
const BAD_SENDER: &str = "501 5.1.7 Bad sender address syntax\r\n";
const BAD_RECIPIENT: &str = "501 5.1.3 Bad recipient address syntax\r\n";
/// The replies to a `BDAT` that is not forwarded.
const BDAT_NOT_OFFERED: &str = "503 5.5.1 CHUNKING was not offered: use DATA\r\n";
const BDAT_SYNTAX: &str = "501 5.5.4 Syntax: BDAT count [LAST]\r\n";

/// The longest address echoed back in a reply.
const MAX_ECHOED_ADDRESS: usize = 256;

/// What a command is waiting for from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// The server's greeting (no command).
    Greeting,
    /// `EHLO`/`HELO`: a positive reply ends any transaction.
    Ehlo,
    /// A `MAIL` the follower checked: its sender is the transaction's only once the server
    /// accepted it (a server refuses a nested `MAIL` and keeps the first sender).
    Mail {
        sender: String,
        requiretls: bool,
    },
    /// `RSET`: a positive reply ends any transaction.
    Reset,
    /// The end of a message (the `.` after `DATA`, or `BDAT … LAST`): whatever the reply,
    /// the transaction is over.
    EndOfData,
    StartTls,
    Data,
    /// A `RCPT` replaced by `NOOP`: its reply is replaced by this line.
    Refused(String),
    /// Anything else: the reply passes.
    Other,
}

/// How the client's bytes are read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    /// Command lines.
    Command,
    /// A message after `DATA`; `at` tracks the terminating `.` line ([`MID`], [`LINE`],
    /// [`DOT`], [`DOT_CR`], [`CR`], [`CR_DOT`]).
    Body { at: u8 },
    /// `DATA` was sent: nothing may come until its reply.
    AwaitData,
    /// The data of a `BDAT` chunk: that many bytes pass untouched.
    Chunk { remaining: u64 },
    /// `STARTTLS` was sent: nothing may come until its reply (after a `220` the session
    /// is opaque; after a refusal, commands follow).
    AwaitTls,
    /// The session broke the protocol (see [`Session::take_violation`]): every byte from
    /// the client is dropped.
    Closed,
}

/// What happened during a call, for the metrics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Events {
    /// Recipients decided.
    pub checked: u32,
    /// Recipients refused, per reason kind (indexes of [`REASON_KINDS`]).
    pub refused: [u32; REASON_KINDS.len()],
    /// STARTTLS succeeded: the session became opaque.
    pub encrypted: bool,
    /// Lines too long to hold: commands refused, replies forwarded as they came.
    pub overlong: u32,
}

impl Events {
    fn refuse(&mut self, kind: &'static str) {
        if let Some(i) = REASON_KINDS.iter().position(|k| *k == kind) {
            self.refused[i] += 1;
        }
    }

    /// Recipients refused, all reasons.
    pub(crate) fn refused_total(&self) -> u32 {
        self.refused.iter().sum()
    }

    /// Whether anything happened.
    pub(crate) fn is_empty(&self) -> bool {
        self.checked == 0 && !self.encrypted && self.overlong == 0
    }
}

/// One SMTP session between a client and the upstream server.
pub(crate) struct Session {
    policy: Rc<Policy>,
    opaque: bool,
    client: Client,
    /// A client command line without its end yet.
    client_line: Vec<u8>,
    /// An overlong client line is being dropped up to its end.
    client_skipping: bool,
    /// CRs after a line-start `.` in a message, so far ([`body_step`]).
    dot_crs: usize,
    /// A server reply line without its end yet.
    server_line: Vec<u8>,
    /// An overlong server line is being passed (or dropped) up to its end; holds whether
    /// it is the reply's last line.
    server_skipping: Option<bool>,
    pending: VecDeque<Pending>,
    /// The transaction the server holds: a `MAIL` it accepted, until its end.
    in_transaction: bool,
    sender: String,
    requiretls: bool,
    /// The upstream offered STARTTLS in its reply to the last EHLO or HELO.
    starttls_offered: bool,
    /// The upstream offered CHUNKING in its reply to the last EHLO or HELO.
    chunking_offered: bool,
    /// What the EHLO reply being read lists so far: (STARTTLS, CHUNKING). It counts once
    /// the reply is whole and positive: an audit pipelined `EHLO` then `HELO`, the
    /// EHLO's reply turned CHUNKING on after the HELO had turned it off, and a BDAT with
    /// a RCPT for its chunk went upstream to a server that had not offered CHUNKING
    /// (one that refuses such a BDAT without reading the chunk runs the RCPT unchecked).
    ehlo_offers: (bool, bool),
    /// Lines of the server's current reply read so far (a keyword is never on the first).
    reply_lines: usize,
    /// The client broke the protocol in a way that leaves the follower unsure how the
    /// server reads its bytes: the session must be closed.
    violation: Option<&'static str>,
    events: Events,
}

impl Session {
    pub(crate) fn new(policy: Rc<Policy>) -> Session {
        Session {
            policy,
            opaque: false,
            client: Client::Command,
            client_line: Vec::new(),
            client_skipping: false,
            dot_crs: 0,
            server_line: Vec::new(),
            server_skipping: None,
            pending: VecDeque::from([Pending::Greeting]),
            in_transaction: false,
            sender: String::new(),
            requiretls: false,
            starttls_offered: false,
            chunking_offered: false,
            ehlo_offers: (false, false),
            reply_lines: 0,
            violation: None,
            events: Events::default(),
        }
    }

    /// Why the session must be closed, once: the client's bytes of that call and of any
    /// later call are dropped (see the module's overview).
    pub(crate) fn take_violation(&mut self) -> Option<&'static str> {
        self.violation.take()
    }

    /// The session went through STARTTLS: nothing more to follow.
    pub(crate) fn is_opaque(&self) -> bool {
        self.opaque
    }

    /// Whether the upstream offered STARTTLS (last EHLO reply).
    pub(crate) fn starttls_offered(&self) -> bool {
        self.starttls_offered
    }

    /// What happened since the last call.
    pub(crate) fn take_events(&mut self) -> Events {
        std::mem::take(&mut self.events)
    }

    /// Client bytes in; what to send upstream out: `None` when that is `data` unchanged
    /// (the common case: whole lines, nothing refused, message bodies), so the caller
    /// neither copies nor writes the buffer back. `end` flushes a partial line.
    pub(crate) fn client_bytes(&mut self, data: &[u8], end: bool) -> Option<Vec<u8>> {
        if self.opaque {
            return None;
        }
        let mut out = Out::new(data);
        let mut i = 0;
        while i < data.len() {
            if self.pending.len() > MAX_PENDING {
                self.violation = Some("too many commands waiting for their replies");
                self.client = Client::Closed;
                self.client_line.clear();
                return Some(Vec::new());
            }
            match self.client {
                Client::AwaitData | Client::AwaitTls | Client::Closed => {
                    // Dropped: the server would read them as message or as commands
                    // depending on the DATA reply, or as a TLS handshake or as commands
                    // depending on the STARTTLS reply (a server that refuses STARTTLS
                    // reads on in clear text). Nothing of this call goes upstream.
                    match self.client {
                        Client::AwaitData => {
                            self.violation = Some("data sent before the reply to DATA");
                        }
                        Client::AwaitTls => {
                            self.violation = Some("data sent before the reply to STARTTLS");
                        }
                        _ => {}
                    }
                    self.client = Client::Closed;
                    self.client_line.clear();
                    return Some(Vec::new());
                }
                Client::Chunk { remaining } => {
                    let left = data.len() - i;
                    let take = usize::try_from(remaining).unwrap_or(usize::MAX).min(left);
                    out.pass(i, i + take);
                    i += take;
                    let remaining = remaining - take as u64;
                    self.client = if remaining == 0 {
                        Client::Command
                    } else {
                        Client::Chunk { remaining }
                    };
                }
                Client::Body { at } => {
                    // Bytes of a message pass as they are; only the end is looked for.
                    let (n, ended) = scan_body(&data[i..], at, &mut self.dot_crs);
                    if ended == Some(SMUGGLED) {
                        // What follows is message to one server and commands to another:
                        // as after DATA, nothing of this call goes upstream.
                        self.violation = Some("a '.' line that servers read differently");
                        self.client = Client::Closed;
                        self.client_line.clear();
                        return Some(Vec::new());
                    }
                    out.pass(i, i + n);
                    i += n;
                    match ended {
                        None => {
                            // The reply to the end of data is the DATA command's second reply.
                            self.pending.push_back(Pending::EndOfData);
                            self.client = Client::Command;
                        }
                        Some(at) => self.client = Client::Body { at },
                    }
                }
                Client::Command => {
                    let rest = &data[i..];
                    match memchr::memchr(b'\n', rest) {
                        Some(n) => {
                            let line_start = i;
                            i += n + 1;
                            let overlong = self.client_line.len() + n + 1 > MAX_COMMAND_LINE;
                            if self.client_skipping || overlong {
                                // The end of an overlong line: none of it went upstream.
                                // A NOOP takes its place, and its reply is the refusal.
                                if !self.client_skipping {
                                    self.events.overlong += 1;
                                }
                                self.client_line.clear();
                                out.drop_bytes();
                                out.push(b"NOOP\r\n");
                                self.client_skipping = false;
                                self.pending
                                    .push_back(Pending::Refused(LINE_TOO_LONG.to_owned()));
                            } else if self.client_line.is_empty() {
                                self.command(&rest[..n], Some(line_start), &mut out);
                            } else {
                                self.client_line.extend_from_slice(&rest[..n]);
                                let line = std::mem::take(&mut self.client_line);
                                self.command(&line, None, &mut out);
                                // Keep the allocation for the next split line.
                                self.client_line = line;
                                self.client_line.clear();
                            }
                        }
                        None => {
                            i = data.len();
                            if self.client_skipping {
                                out.drop_bytes();
                            } else if self.client_line.len() + rest.len() >= MAX_COMMAND_LINE {
                                // Not forwarded: a server that reads only the start of a
                                // long line (Postfix keeps its first 2048 bytes) would
                                // take a `RCPT` this follower did not check.
                                self.client_line.clear();
                                out.drop_bytes();
                                self.client_skipping = true;
                                self.events.overlong += 1;
                            } else {
                                // Held until its end: it may be a RCPT to replace.
                                out.hold();
                                self.client_line.extend_from_slice(rest);
                            }
                        }
                    }
                }
            }
        }
        if end && !self.client_line.is_empty() {
            // A command without its line end at the end of the stream: servers do not run
            // it, and it is not forwarded unread.
            self.client_line.clear();
        }
        out.finish()
    }

    /// One command line (without its LF). Forwarded with CRLF, so that this follower and
    /// the server agree on where lines end even when the client sent a bare LF. `at` is
    /// where the line starts in the current input when it lies there whole.
    fn command(&mut self, raw: &[u8], at: Option<usize>, out: &mut Out<'_>) {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if memchr::memchr(0, line).is_some() {
            // Servers stop reading a line at a NUL, or refuse it; which word it cuts, the
            // follower cannot tell (`RCPT\0TO:<a>` is no RCPT to it). Not forwarded.
            out.push(b"NOOP\r\n");
            self.pending
                .push_back(Pending::Refused(NUL_IN_COMMAND.to_owned()));
            return;
        }
        if memchr::memchr(b'\r', line).is_some() {
            // Postfix and this relay read `RCPT TO:<a>\rRCPT TO:<b>` as one line, but a
            // server that ended lines at a bare CR would run the second RCPT unchecked
            // (an audit's finding, not reproduced with Postfix). Not forwarded.
            out.push(b"NOOP\r\n");
            self.pending
                .push_back(Pending::Refused(CR_IN_COMMAND.to_owned()));
            return;
        }
        if line.first().is_some_and(|b| is_space(*b)) {
            // Servers skip white space before the verb (` RCPT TO:<a>` is a RCPT to
            // smtp-proto and to Postfix's smtp-sink), and here the verb would be empty:
            // an audit's RCPT and MAIL went through unchecked so. Not forwarded.
            out.push(b"NOOP\r\n");
            self.pending
                .push_back(Pending::Refused(SPACE_BEFORE_COMMAND.to_owned()));
            return;
        }
        // Servers split a command into words at any white space (Postfix: spaces, tabs,
        // CR, VT, FF), so `RCPT\tTO:<a>` and `RCPT  TO:<a>` are a RCPT too.
        let verb_end = line.iter().position(|b| is_space(*b)).unwrap_or(line.len());
        let verb = &line[..verb_end];
        let is = |v: &[u8]| verb.eq_ignore_ascii_case(v);
        let mut forward = true;
        let pending = if is(b"MAIL") || is(b"RCPT") {
            let (keyword, syntax) = if is(b"MAIL") {
                (&b"FROM"[..], MAIL_SYNTAX)
            } else {
                (&b"TO"[..], RCPT_SYNTAX)
            };
            match argument(&line[verb_end..], keyword) {
                None => {
                    // Not a form this follower can check, so not forwarded: what a
                    // server makes of it could be a recipient nobody asked the policy
                    // about. The client gets the syntax reply the server would give.
                    out.push(b"NOOP\r\n");
                    forward = false;
                    Pending::Refused(syntax.to_owned())
                }
                Some(arg) if is(b"MAIL") => {
                    let (addr, params) = address(arg);
                    if addr.is_empty() || is_mailbox(&addr) {
                        // The transaction's sender once the server says so (see
                        // `reply_done`); until then RCPTs are checked against both.
                        Pending::Mail {
                            sender: addr,
                            requiretls: params
                                .split(|b| is_space(*b))
                                .any(|p| p.eq_ignore_ascii_case(b"REQUIRETLS")),
                        }
                    } else {
                        // Which mailbox a server makes of it (comments, routing through
                        // `%` or `!`) the policy cannot know, and the sender picks rules.
                        out.push(b"NOOP\r\n");
                        forward = false;
                        Pending::Refused(BAD_SENDER.to_owned())
                    }
                }
                Some(arg) => {
                    let (recipient, _) = address(arg);
                    if !(is_mailbox(&recipient) || recipient.eq_ignore_ascii_case("postmaster")) {
                        // Postfix delivers `<bob@(c)partner.example>` and
                        // `<bob%partner.example@localhost>` to bob@partner.example.
                        out.push(b"NOOP\r\n");
                        self.pending
                            .push_back(Pending::Refused(BAD_RECIPIENT.to_owned()));
                        return;
                    }
                    match self.refusal(&recipient) {
                        Some(reply) => {
                            out.push(b"NOOP\r\n");
                            forward = false;
                            Pending::Refused(reply)
                        }
                        None => Pending::Other,
                    }
                }
            }
        } else if is(b"EHLO") || is(b"HELO") {
            // Known again from this EHLO's reply.
            self.chunking_offered = false;
            Pending::Ehlo
        } else if is(b"RSET") {
            Pending::Reset
        } else if is(b"DATA") {
            // The message follows a 354; any other reply, and the follower reads commands.
            self.client = Client::AwaitData;
            Pending::Data
        } else if is(b"BDAT") {
            // A server may take a chunk even when this follower did not see it offer
            // CHUNKING (Postfix does after HELO), and its end could cut through a line
            // that the follower would read whole: a `BDAT` goes upstream only when
            // CHUNKING was offered and its size is plain digits. Otherwise a NOOP goes in
            // its place, and both sides read what follows as commands.
            // While an EHLO or HELO is unanswered, the offer is not known yet.
            let offered = self.chunking_offered && !self.pending.contains(&Pending::Ehlo);
            match (offered, chunk_size(&line[verb_end..])) {
                (true, Some(size)) => {
                    if size > 0 {
                        self.client = Client::Chunk { remaining: size };
                    }
                    let last = line[verb_end..]
                        .split(|b| is_space(*b))
                        .any(|w| w.eq_ignore_ascii_case(b"LAST"));
                    if last {
                        Pending::EndOfData
                    } else {
                        Pending::Other
                    }
                }
                (offered, _) => {
                    out.push(b"NOOP\r\n");
                    forward = false;
                    Pending::Refused(
                        if offered {
                            BDAT_SYNTAX
                        } else {
                            BDAT_NOT_OFFERED
                        }
                        .to_owned(),
                    )
                }
            }
        } else if is(b"STARTTLS") {
            self.client = Client::AwaitTls;
            Pending::StartTls
        } else {
            Pending::Other
        };
        if forward {
            match at {
                // Already CRLF-terminated in the input: passes as it is.
                Some(start) if raw.len() > line.len() => out.pass(start, start + raw.len() + 1),
                _ => {
                    out.push(line);
                    out.push(b"\r\n");
                }
            }
        }
        self.pending.push_back(pending);
    }

    fn reset_transaction(&mut self) {
        self.sender.clear();
        self.requiretls = false;
        self.in_transaction = false;
    }

    /// The senders a `RCPT` sent now may be read under: the transaction's, and those of
    /// the `MAIL`, `RSET`, `EHLO` and end of data still waiting for their replies, each of
    /// which the server may accept or refuse. `None` in the list is no transaction (the
    /// server refuses the `RCPT`); more than [`MAX_SENDERS`] is `None` altogether.
    fn senders(&self) -> Option<Vec<Option<(&str, bool)>>> {
        let mut states: Vec<Option<(&str, bool)>> = vec![
            self.in_transaction
                .then_some((self.sender.as_str(), self.requiretls)),
        ];
        for p in &self.pending {
            match p {
                Pending::Mail { sender, requiretls } => {
                    states.push(Some((sender.as_str(), *requiretls)));
                }
                Pending::Reset | Pending::Ehlo => states.push(None),
                Pending::EndOfData => {
                    states.clear();
                    states.push(None);
                }
                _ => continue,
            }
            states.sort();
            states.dedup();
            if states.len() > MAX_SENDERS {
                return None;
            }
        }
        Some(states)
    }

    /// The reply that refuses `recipient`, when the policy requires TLS for it under any
    /// sender the server may hold when it reads the `RCPT` ([`Session::senders`]). A
    /// refused `MAIL` (a nested one, say) once changed the sender the follower checked
    /// against while the server kept the first, whose rules then went unchecked.
    fn refusal(&mut self, recipient: &str) -> Option<String> {
        if !recipient.contains('@') {
            // Not an address the policy can judge (postmaster, garbage): the server judges.
            return None;
        }
        self.events.checked += 1;
        let shown: String = recipient.chars().take(MAX_ECHOED_ADDRESS).collect();
        let Some(states) = self.senders() else {
            self.events.refuse("other");
            return Some(format!(
                "450 4.7.10 TLS required for <{shown}>: too many unanswered MAIL, RSET or EHLO commands\r\n"
            ));
        };
        let mut senders: Vec<(&str, bool)> = states.into_iter().flatten().collect();
        if senders.is_empty() {
            // No transaction whatever the replies: the server refuses the RCPT; asked as
            // before, with the null sender.
            senders.push(("", false));
        }
        let rule = senders.into_iter().find_map(|(sender, requiretls)| {
            let mut query = Query::plan(sender, recipient);
            query.requiretls = requiretls;
            let decision = decide(&self.policy, &query);
            decision.tls.required.then_some(decision.rule)
        })?;
        self.events.refuse(reason_kind(&rule));
        Some(format!("450 4.7.10 TLS required for <{shown}>\r\n"))
    }

    /// Server bytes in; what to send to the client out, `None` when that is `data`
    /// unchanged. `end` flushes a partial line.
    pub(crate) fn server_bytes(&mut self, data: &[u8], end: bool) -> Option<Vec<u8>> {
        if self.opaque {
            return None;
        }
        let mut out = Out::new(data);
        let mut i = 0;
        while i < data.len() {
            if self.opaque {
                out.pass(i, data.len());
                break;
            }
            let rest = &data[i..];
            let dropping = matches!(self.pending.front(), Some(Pending::Refused(_)));
            match memchr::memchr(b'\n', rest) {
                Some(n) => {
                    let line_start = i;
                    i += n + 1;
                    if let Some(last) = self.server_skipping.take() {
                        if dropping {
                            out.drop_bytes();
                        } else {
                            out.pass(line_start, i);
                        }
                        if last {
                            self.reply_done(b"", &mut out);
                        }
                    } else if self.server_line.is_empty() {
                        self.reply_line(&rest[..=n], Some(line_start), &mut out);
                    } else {
                        self.server_line.extend_from_slice(&rest[..=n]);
                        let line = std::mem::take(&mut self.server_line);
                        self.reply_line(&line, None, &mut out);
                        self.server_line = line;
                        self.server_line.clear();
                    }
                }
                None => {
                    i = data.len();
                    if self.server_skipping.is_some() {
                        if dropping {
                            out.drop_bytes();
                        } else {
                            out.pass(i - rest.len(), i);
                        }
                    } else if self.server_line.len() + rest.len() > MAX_LINE {
                        self.server_line.extend_from_slice(rest);
                        self.server_skipping = Some(is_last_line(&self.server_line));
                        self.events.overlong += 1;
                        if dropping {
                            out.drop_bytes();
                        } else {
                            out.push(&self.server_line);
                        }
                        self.server_line.clear();
                    } else {
                        out.hold();
                        self.server_line.extend_from_slice(rest);
                    }
                }
            }
        }
        if end && !self.server_line.is_empty() {
            out.push(&self.server_line);
            self.server_line.clear();
        }
        out.finish()
    }

    /// One complete reply line, with its line end; `at` is where it starts in the
    /// current input when it lies there whole.
    fn reply_line(&mut self, line: &[u8], at: Option<usize>, out: &mut Out<'_>) {
        let last = is_last_line(line);
        match self.pending.front() {
            Some(Pending::Refused(_)) => out.drop_bytes(),
            front => {
                // The first line is the server's name, not a keyword (a server named
                // CHUNKING answers a HELO with `250 CHUNKING`).
                if front == Some(&Pending::Ehlo) && self.reply_lines > 0 && line.len() > 4 {
                    let keyword = line[4..]
                        .split(|b| *b == b' ' || *b == b'\r' || *b == b'\n')
                        .next()
                        .unwrap_or_default();
                    if keyword.eq_ignore_ascii_case(b"STARTTLS") {
                        self.ehlo_offers.0 = true;
                    } else if keyword.eq_ignore_ascii_case(b"CHUNKING") {
                        self.ehlo_offers.1 = true;
                    }
                }
                match at {
                    Some(start) => out.pass(start, start + line.len()),
                    None => out.push(line),
                }
            }
        }
        self.reply_lines += 1;
        if last {
            self.reply_done(line, out);
        }
    }

    /// The last line of a reply arrived: the front command is answered.
    fn reply_done(&mut self, line: &[u8], out: &mut Out<'_>) {
        self.reply_lines = 0;
        let offers = std::mem::take(&mut self.ehlo_offers);
        let Some(front) = self.pending.pop_front() else {
            // A reply nobody asked for (a 421 on shutdown): it passed as it was.
            return;
        };
        let positive = |code: &[u8]| line.starts_with(code);
        match front {
            Pending::Refused(reply) => out.push(reply.as_bytes()),
            Pending::StartTls => {
                if positive(b"220") {
                    self.opaque = true;
                    self.events.encrypted = true;
                    self.pending.clear();
                } else if self.client == Client::AwaitTls {
                    self.client = Client::Command;
                }
            }
            Pending::Data => {
                if self.client == Client::AwaitData {
                    self.client = if positive(b"354") {
                        {
                            self.dot_crs = 0;
                            Client::Body { at: LINE }
                        }
                    } else {
                        Client::Command
                    };
                }
            }
            Pending::Mail { sender, requiretls } => {
                if line.first() == Some(&b'2') {
                    self.sender = sender;
                    self.requiretls = requiretls;
                    self.in_transaction = true;
                }
            }
            Pending::Ehlo => {
                // The reply to the last EHLO or HELO says what is offered; a refused one
                // offers nothing.
                let positive = line.first() == Some(&b'2');
                (self.starttls_offered, self.chunking_offered) =
                    if positive { offers } else { (false, false) };
                if positive {
                    self.reset_transaction();
                }
            }
            Pending::Reset => {
                if line.first() == Some(&b'2') {
                    self.reset_transaction();
                }
            }
            Pending::EndOfData => self.reset_transaction(),
            Pending::Greeting | Pending::Other => {}
        }
    }
}

/// States of [`scan_body`] (see [`Client::Body`]).
const MID: u8 = 0;
/// At a line start (after an LF).
const LINE: u8 = 1;
/// After a `.` at a line start.
const DOT: u8 = 2;
/// After a `.` at a line start and one or more CRs.
const DOT_CR: u8 = 3;
/// After a CR that is no part of a `.` line (a CR of a CRLF, or a bare one).
const CR: u8 = 4;
/// After a `.` that follows a bare CR.
const CR_DOT: u8 = 5;
/// Not a state: the message holds a `.` line that a server could take for its end when
/// the follower does not, or the reverse ([`scan_body`]); the session is closed.
const SMUGGLED: u8 = 6;
/// At a line start after a bare LF (no CR before it).
const LINE_BARE: u8 = 7;
/// After a `.` at a line start after a bare LF.
const DOT_BARE: u8 = 8;

/// One step of the body's state machine over byte `b` from state `at`; `crs` counts the
/// CRs after a line-start `.`. `None`: the end of data.
fn body_step(at: u8, b: u8, crs: &mut usize) -> Option<u8> {
    let next = match (at, b) {
        // Only `CRLF . CRLF` ends the data for every server. Postfix also ends it at a
        // bare LF (`\n.\n`, `\r\n.\n`, `\n.\r\n`) and after more CRs (`.\r\r\n`); the
        // relay's own server does not. Either reading can be the upstream's, so such a
        // line closes the session (an audit's `\n.\n` ended the message here but not for
        // the relay, and the replies after it were paired with the wrong commands).
        (DOT_CR, b'\n') if *crs == 1 => return None,
        (DOT | DOT_CR | DOT_BARE, b'\n') | (DOT_BARE, b'\r') => SMUGGLED,
        // Postfix strips every CR before the LF: `.\r\r\n` ends the data too, but only
        // while the line fits in what it reads whole (a `.` and 2048 CRs do not).
        (DOT | DOT_CR, b'\r') if *crs + 3 > MAX_COMMAND_LINE => SMUGGLED,
        (DOT | DOT_CR, b'\r') => {
            *crs += 1;
            return Some(DOT_CR);
        }
        // `.\rX`, `\r.\r`, `\r.\n`: a `.` line to a server that ends lines at a bare
        // CR (SMTP smuggling); none of these is in a well-formed message.
        (DOT_CR, _) | (CR_DOT, b'\r' | b'\n') => SMUGGLED,
        (CR, b'\n') => LINE,
        (_, b'\n') => LINE_BARE,
        (_, b'\r') => CR,
        (LINE, b'.') => DOT,
        (LINE_BARE, b'.') => DOT_BARE,
        (CR, b'.') => CR_DOT,
        _ => MID,
    };
    *crs = 0;
    Some(next)
}

/// Scans message bytes for the end of data (`CRLF . CRLF`, or a bare LF for CRLF, and any
/// number of CRs before the LF) from the line state `at` (see [`Client::Body`]). Returns
/// how many bytes belong to the message and `None` when the end was found (the count then
/// includes it), or the state to carry into the next read, or [`SMUGGLED`].
///
/// Mid-line (state [`MID`]), the only ways towards the end are a dot right after an LF or
/// a CR, so the scan jumps from dot to dot with `memchr` (word at a time, or SIMD when the
/// module is built with `simd128`) rather than stopping at every line: a message body is
/// most of the bytes this filter sees, and base64 (attachments) has no dot at all. Only
/// the bytes after a dot that follows a line end, or at the start of a read that continues
/// a line end, go through the state machine one by one.
fn scan_body(data: &[u8], mut at: u8, crs: &mut usize) -> (usize, Option<u8>) {
    let mut i = 0;
    loop {
        while at != MID {
            let Some(&b) = data.get(i) else {
                return (i, Some(at));
            };
            i += 1;
            match body_step(at, b, crs) {
                None => return (i, None),
                Some(SMUGGLED) => return (i, Some(SMUGGLED)),
                Some(next) => at = next,
            }
        }
        // State MID at `i`: the byte before `i`, if any, is neither an LF nor a CR.
        match memchr::memchr(b'.', &data[i..]) {
            Some(n) => {
                let dot = i + n;
                i = dot + 1;
                *crs = 0;
                at = match data[..dot].last() {
                    // The byte before the LF, when it is before `i`, is no CR (state MID).
                    Some(b'\n') if n > 0 && dot >= 2 && data[dot - 2] == b'\r' => DOT,
                    Some(b'\n') if n > 0 => DOT_BARE,
                    Some(b'\r') if n > 0 => CR_DOT,
                    _ => MID,
                };
            }
            // No dot ahead: the state at the end follows the last byte.
            None => {
                let len = data.len();
                let end = match data.last() {
                    Some(b'\n') if len >= 2 && data[len - 2] == b'\r' => LINE,
                    Some(b'\n') => LINE_BARE,
                    Some(b'\r') => CR,
                    _ => MID,
                };
                return (data.len(), Some(end));
            }
        }
    }
}

/// The output of one call, built lazily: while everything passes in order, nothing is
/// copied and [`Out::finish`] answers `None` (unchanged).
struct Out<'a> {
    input: &'a [u8],
    /// `input[..passed]` went out verbatim (meaningful while `owned` is `None`).
    passed: usize,
    /// The output, once it differs from a prefix of the input.
    owned: Option<Vec<u8>>,
}

impl<'a> Out<'a> {
    fn new(input: &'a [u8]) -> Out<'a> {
        Out {
            input,
            passed: 0,
            owned: None,
        }
    }

    fn owned(&mut self) -> &mut Vec<u8> {
        let (input, passed) = (self.input, self.passed);
        self.owned.get_or_insert_with(|| {
            let mut v = Vec::with_capacity(input.len() + 64);
            v.extend_from_slice(&input[..passed]);
            v
        })
    }

    /// `input[start..end]` goes out as it is.
    fn pass(&mut self, start: usize, end: usize) {
        if self.owned.is_none() && start == self.passed {
            self.passed = end;
        } else {
            let input = self.input;
            self.owned().extend_from_slice(&input[start..end]);
        }
    }

    /// Bytes that are not the input's go out.
    fn push(&mut self, bytes: &[u8]) {
        self.owned().extend_from_slice(bytes);
    }

    /// Input bytes are kept back (a partial line): the output is no longer the input.
    fn hold(&mut self) {
        self.owned();
    }

    /// Input bytes are dropped (a refused command's reply).
    fn drop_bytes(&mut self) {
        self.owned();
    }

    fn finish(self) -> Option<Vec<u8>> {
        match self.owned {
            Some(v) => Some(v),
            None if self.passed == self.input.len() => None,
            None => Some(self.input[..self.passed].to_vec()),
        }
    }
}

/// Whether a reply line is the last of its reply (`250 ok`, not `250-...`). A line that
/// does not look like a reply counts as a last line, so a confused server cannot stall
/// the pairing.
fn is_last_line(line: &[u8]) -> bool {
    line.get(3) != Some(&b'-')
}

/// White space between the words of a command, as servers split them (Postfix's
/// `ISSPACE`: space, tab, LF, VT, FF, CR).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The argument of `MAIL FROM:` or `RCPT TO:` after the verb: `rest` is what follows the
/// verb, `keyword` is `FROM` or `TO`. White space is allowed around the keyword and the
/// colon, a superset of what servers take. `None` when `rest` is not of that form.
fn argument<'l>(rest: &'l [u8], keyword: &[u8]) -> Option<&'l [u8]> {
    let rest = trim_start(rest);
    let after = rest.get(keyword.len()..)?;
    if !rest[..keyword.len()].eq_ignore_ascii_case(keyword) {
        return None;
    }
    trim_start(after).strip_prefix(b":").map(trim_start)
}

fn trim_start(bytes: &[u8]) -> &[u8] {
    let n = bytes
        .iter()
        .position(|b| !is_space(*b))
        .unwrap_or(bytes.len());
    &bytes[n..]
}

/// The address of a `MAIL FROM:` or `RCPT TO:` argument and the parameters after it.
/// `<a@b> X=1` gives (`a@b`, `X=1`); a missing `<` takes the first word.
fn address(arg: &[u8]) -> (String, &[u8]) {
    let arg = trim_start(arg);
    let (addr, params) = match arg.strip_prefix(b"<") {
        Some(inner) => match closing_bracket(inner) {
            Some(n) => (&inner[..n], &inner[n + 1..]),
            None => (inner, &b""[..]),
        },
        None => {
            let n = arg.iter().position(|b| is_space(*b)).unwrap_or(arg.len());
            (&arg[..n], &arg[n..])
        }
    };
    // Not trimmed: white space inside the brackets is no mailbox ([`is_mailbox`]).
    (
        String::from_utf8_lossy(addr).to_ascii_lowercase(),
        params.trim_ascii(),
    )
}

/// The size of a `BDAT` (what follows the verb): `count [LAST]`, the count in plain digits.
fn chunk_size(rest: &[u8]) -> Option<u64> {
    let mut words = rest.split(|b| is_space(*b)).filter(|w| !w.is_empty());
    let count = words.next()?;
    match words.next() {
        None => {}
        Some(last) if last.eq_ignore_ascii_case(b"LAST") => {}
        Some(_) => return None,
    }
    if words.next().is_some() || !count.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(count).ok()?.parse().ok()
}

/// Where the `>` closing an address is: not one inside a quoted local part
/// (`<"a>b"@x.example>`), nor one escaped with a backslash there.
fn closing_bracket(inner: &[u8]) -> Option<usize> {
    let (mut quoted, mut escaped) = (false, false);
    for (i, &b) in inner.iter().enumerate() {
        match b {
            _ if escaped => escaped = false,
            b'\\' if quoted => escaped = true,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// The reason kind of a refusal, from the rule that required TLS. Bounded set: these are
/// metric names.
pub(crate) fn reason_kind(rule: &str) -> &'static str {
    match rule.split_once(':') {
        Some(("tls_compliance", _)) => "tls_compliance",
        Some(("standard", "requiretls")) => "requiretls",
        Some(("standard", "mta-sts")) => "mta_sts",
        Some(("route", _)) => "host_route",
        _ if rule == "fault" => "fault",
        _ => "other",
    }
}

/// Every value [`reason_kind`] returns.
pub(crate) const REASON_KINDS: [&str; 6] = [
    "tls_compliance",
    "requiretls",
    "mta_sts",
    "host_route",
    "fault",
    "other",
];

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn session() -> Session {
        let compiled = policy::compile(
            r#"
            [[tls_compliance]]
            name = "partners"
            domains = ["partner.example"]
            "#,
        )
        .unwrap();
        Session::new(Rc::new(compiled.policy))
    }

    const CLIENT: &[u8] = b"EHLO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<b@partner.example>\r\nRCPT TO:<c@other.example>\r\nDATA\r\n";
    const SERVER: &[u8] =
        b"220 hi\r\n250-s\r\n250 PIPELINING\r\n250 ok\r\n250 noop\r\n250 rcpt\r\n354 go\r\n";

    fn run(s: &mut Session, client: &[u8], server: &[u8], step: usize) -> (Vec<u8>, Vec<u8>) {
        let mut up = Vec::new();
        for c in client.chunks(step) {
            up.extend(s.client_bytes(c, false).unwrap_or_else(|| c.to_vec()));
        }
        let mut down = Vec::new();
        for c in server.chunks(step) {
            down.extend(s.server_bytes(c, false).unwrap_or_else(|| c.to_vec()));
        }
        (up, down)
    }

    #[test]
    fn pipelined_refusal_pairs() {
        for step in [1, 3, 7, 1000] {
            let mut s = session();
            let (up, down) = run(&mut s, CLIENT, SERVER, step);
            assert_eq!(
                String::from_utf8(up).unwrap(),
                "EHLO c\r\nMAIL FROM:<a@corp.example>\r\nNOOP\r\nRCPT TO:<c@other.example>\r\nDATA\r\n"
            );
            assert_eq!(
                String::from_utf8(down).unwrap(),
                "220 hi\r\n250-s\r\n250 PIPELINING\r\n250 ok\r\n450 4.7.10 TLS required for <b@partner.example>\r\n250 rcpt\r\n354 go\r\n"
            );
            let e = s.take_events();
            assert_eq!((e.checked, e.refused), (2, [1, 0, 0, 0, 0, 0]));
        }
    }

    /// A recipient domain written in Unicode (SMTPUTF8) is held to the rule for its
    /// A-label. Before, `RCPT TO:<b@bücher.example>` passed the edge in clear text.
    #[test]
    fn a_unicode_recipient_domain_is_held_to_the_rule_for_its_a_label() {
        let compiled = policy::compile(
            r#"
            [[tls_compliance]]
            name = "books"
            domains = ["xn--bcher-kva.example"]
            "#,
        )
        .unwrap();
        let client = "EHLO c\r\nMAIL FROM:<a@corp.example> SMTPUTF8\r\nRCPT TO:<b@BÜCHER.example>\r\nRCPT TO:<c@other.example>\r\nDATA\r\n";
        for step in [1, 3, 1000] {
            let mut s = Session::new(Rc::new(compiled.policy.clone()));
            let (up, down) = run(&mut s, client.as_bytes(), SERVER, step);
            assert_eq!(
                String::from_utf8(up).unwrap(),
                "EHLO c\r\nMAIL FROM:<a@corp.example> SMTPUTF8\r\nNOOP\r\nRCPT TO:<c@other.example>\r\nDATA\r\n",
                "step {step}"
            );
            assert_eq!(
                String::from_utf8(down).unwrap(),
                "220 hi\r\n250-s\r\n250 PIPELINING\r\n250 ok\r\n450 4.7.10 TLS required for <b@bÜcher.example>\r\n250 rcpt\r\n354 go\r\n",
                "step {step}"
            );
        }
    }

    #[test]
    fn body_is_not_parsed_and_starttls_goes_opaque() {
        let mut s = session();
        let (_, _) = run(&mut s, CLIENT, SERVER, 1000);
        let body = b"RCPT TO:<x@partner.example>\r\n.\r\nSTARTTLS\r\n";
        assert_eq!(s.client_bytes(body, false), None, "unchanged");
        assert_eq!(
            s.server_bytes(b"250 queued\r\n220 go ahead\r\n", false),
            None
        );
        assert!(s.is_opaque());
        assert_eq!(s.client_bytes(b"\x16\x03\x01", false), None);
        assert_eq!(
            s.client_bytes(b"RCPT TO:<x@partner.example>\r\n", false),
            None
        );
    }

    /// Addresses a server could read as another mailbox than the one the policy would be
    /// asked about are refused with Postfix's `501 5.1.3`, never forwarded: Postfix 3.7
    /// with its defaults delivered each of the first eleven to bob@partner.example
    /// (comments, white space and a backslash in the domain; `%` and `!` routing and a
    /// quoted `@` through a domain local to it). Plain mailboxes in every form RFC 5321
    /// allows are still decided.
    #[test]
    fn addresses_a_server_reads_otherwise_are_refused() {
        let refused: [&[u8]; 16] = [
            b"<bob@(c)partner.example>",
            b"<bob@partner.example(c)>",
            b"<bob@partner.example (c)>",
            b"<bob@ partner.example>",
            b"<bob@\tpartner.example>",
            b"<bob@partner . example>",
            b"<bob@partner\\.example>",
            b"<bob%partner.example@localhost>",
            b"<partner.example!bob@localhost>",
            b"<\"bob@partner.example\"@localhost>",
            b"<bob@partner.example@localhost>",
            b"<bob(c)@partner.example>",
            b"<bob>",
            b"<>",
            b"<bob@partner..example>",
            b"<@:bob@partner.example>",
        ];
        for a in refused {
            let mut s = greeted(b"250 ok\r\n");
            let reply = replaced(&mut s, &[&b"RCPT TO:"[..], a].concat());
            assert_eq!(reply, BAD_RECIPIENT, "{}", String::from_utf8_lossy(a));
        }
        // Decided: required TLS for partner.example, whatever the form.
        let decided: [&[u8]; 8] = [
            b"<bob@partner.example>",
            b"<Bob.Smith+tag@Partner.Example.>",
            b"<\"bob smith\"@partner.example>",
            b"<@relay.example,@[127.0.0.1]:bob@partner.example>",
            b"<j\xc3\xb6rg@partner.example>",
            b"<bob@mail.partner.example>",
            b"bob@partner.example",
            b"<o'brien@partner.example> NOTIFY=NEVER",
        ];
        for a in decided {
            let compiled = policy::compile(
                "[[tls_compliance]]\nname = \"p\"\ndomains = [\"partner.example\", \"*.partner.example\"]\n",
            )
            .unwrap();
            let mut s = Session::new(Rc::new(compiled.policy));
            assert_eq!(s.server_bytes(b"220 hi\r\n", false), None);
            let reply = replaced(&mut s, &[&b"RCPT TO:"[..], a].concat());
            assert!(reply.starts_with("450 4.7.10"), "{reply}");
        }
        // Passed: other domains, an address literal, postmaster.
        for a in [
            &b"<bob@other.example>"[..],
            b"<bob@[192.0.2.1]>",
            b"<Postmaster>",
        ] {
            let mut s = greeted(b"250 ok\r\n");
            let mut line = b"RCPT TO:".to_vec();
            line.extend(a);
            line.extend(b"\r\n");
            assert_eq!(
                s.client_bytes(&line, false),
                None,
                "{}",
                String::from_utf8_lossy(a)
            );
        }
        // A sender the policy cannot read is refused too (it picks the org unit's rules);
        // the null sender is not.
        let mut s = greeted(b"250 ok\r\n");
        assert_eq!(
            replaced(&mut s, b"MAIL FROM:<a@(c)corp.example>"),
            BAD_SENDER
        );
        assert_eq!(s.client_bytes(b"MAIL FROM:<>\r\n", false), None);
    }

    /// A command without its line end when the client closes is not forwarded: servers do
    /// not run it, and the follower did not read it. Before, it went upstream raw.
    #[test]
    fn a_partial_command_at_the_end_is_dropped() {
        let mut s = greeted(b"250 ok\r\n");
        let bytes: &[u8] = b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<bob@partner.example>";
        assert_eq!(
            s.client_bytes(bytes, true).as_deref(),
            Some(&b"MAIL FROM:<a@corp.example>\r\n"[..])
        );
    }

    /// Bytes sent after `STARTTLS` before its reply: a server that refuses STARTTLS (not
    /// offered, or 454) reads them as commands in clear text, so they would have been an
    /// unchecked RCPT. They are dropped and the session is closed, as after DATA. Before,
    /// they passed unparsed.
    #[test]
    fn commands_pipelined_after_starttls_close_the_session() {
        for split in [false, true] {
            let mut s = greeted(b"250 ok\r\n");
            let pipelined: &[u8] =
                b"STARTTLS\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<b@partner.example>\r\n";
            let up = if split {
                assert_eq!(s.client_bytes(&pipelined[..10], false), None);
                s.client_bytes(&pipelined[10..], false)
            } else {
                s.client_bytes(pipelined, false)
            };
            assert_eq!(up, Some(Vec::new()), "nothing more goes upstream");
            assert_eq!(
                s.take_violation(),
                Some("data sent before the reply to STARTTLS")
            );
            // The server refuses STARTTLS: the follower reads no command after it.
            assert_eq!(
                s.server_bytes(b"454 4.7.0 TLS not available\r\n", false),
                None
            );
            assert_eq!(
                s.client_bytes(b"RCPT TO:<b@partner.example>\r\n", false),
                Some(Vec::new())
            );
        }
    }

    #[test]
    fn unchanged_input_is_not_copied_and_changes_are_exact() {
        let mut s = session();
        assert_eq!(s.server_bytes(b"220 hi\r\n", false), None);
        assert_eq!(s.client_bytes(b"EHLO c\r\n", false), None);
        // A bare LF is forwarded as CRLF.
        assert_eq!(s.server_bytes(b"250 ok\r\n", false), None);
        assert_eq!(
            s.client_bytes(b"MAIL FROM:<a@corp.example>\n", false),
            Some(b"MAIL FROM:<a@corp.example>\r\n".to_vec())
        );
        // A partial line is held back: the prefix before it goes out.
        assert_eq!(
            s.client_bytes(b"RCPT TO:<c@other.example>\r\nRCPT TO:<b@par", false),
            Some(b"RCPT TO:<c@other.example>\r\n".to_vec())
        );
        assert_eq!(
            s.client_bytes(b"tner.example>\r\nDATA\r\n", false),
            Some(b"NOOP\r\nDATA\r\n".to_vec())
        );
        assert_eq!(
            s.server_bytes(b"250 mail\r\n250 rcpt\r\n250 noop\r\n354 go\r\n", false),
            Some(b"250 mail\r\n250 rcpt\r\n450 4.7.10 TLS required for <b@partner.example>\r\n354 go\r\n".to_vec())
        );
        // The body passes without a copy, split anywhere, the end marker included.
        assert_eq!(s.client_bytes(b"a\r\n.", false), None);
        assert_eq!(s.client_bytes(b"\r", false), None);
        assert_eq!(s.client_bytes(b"\nQUIT\r\n", false), None);
        assert_eq!(s.server_bytes(b"250 queued\r\n221 bye\r\n", false), None);
        assert_eq!(s.take_events().refused_total(), 1);
    }

    #[test]
    fn body_scan_finds_the_end_only_at_a_line_start() {
        let scan = |data: &[u8], at| scan_body(data, at, &mut 0);
        assert_eq!(scan(b"x.\r\n", MID), (4, Some(LINE)));
        assert_eq!(scan(b"x\r\n.\r\nQUIT", MID), (6, None));
        assert_eq!(scan(b".\n", LINE).1, Some(SMUGGLED));
        assert_eq!(scan(b".\r\n", LINE), (3, None));
        assert_eq!(scan(b"..\r\n", LINE), (4, Some(LINE)));
        assert_eq!(scan(b"\r\n", DOT_CR), (2, None));
        assert_eq!(scan(b"\n", DOT_CR).1, Some(SMUGGLED));
        let mut one = 1;
        assert_eq!(scan_body(b"\n", DOT_CR, &mut one), (1, None));
        // A `.` line after a bare LF, or ended by one, is an end for Postfix and not for
        // the relay: the session is closed.
        assert_eq!(scan(b"x\n.\n", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\n.\r\n", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\r\n.\n", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\n..\r\n", MID), (6, Some(LINE)));
        assert_eq!(scan(b"x\n", MID), (2, Some(LINE_BARE)));
        assert_eq!(scan(b"x\r", MID), (2, Some(CR)));
        // Postfix strips every CR before the LF: `.\r\r\n` ends the data for it, and
        // not for the relay: the session is closed.
        assert_eq!(scan(b"x\r\n.\r\r\nMAIL", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\r\n.\r\r\r\n", MID).1, Some(SMUGGLED));
        // A `.` line to a server that ends lines at a bare CR: the session is closed.
        assert_eq!(scan(b"x\r\n.\rx\r\n", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\r.\r\nMAIL", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\r.\n", MID).1, Some(SMUGGLED));
        assert_eq!(scan(b".\r\n", CR).1, Some(SMUGGLED));
        assert_eq!(scan(b"x\r.x\r\n", MID), (6, Some(LINE)));
        // A `.` and more CRs than a server reads whole (Postfix: 2048) does not end the
        // message for Postfix: the session is closed at 1000.
        // A `.` line of 1000 bytes with its LF is closed as any `.` with more than one CR.
        let mut long = b"\r\n.".to_vec();
        long.extend(std::iter::repeat_n(b'\r', 998));
        long.push(b'\n');
        assert_eq!(scan(&long, MID).1, Some(SMUGGLED));
        let mut longer = b"\r\n.".to_vec();
        longer.extend(std::iter::repeat_n(b'\r', 999));
        longer.push(b'\n');
        assert_eq!(scan(&longer, MID).1, Some(SMUGGLED));
        // The count carries across reads.
        let mut crs = 0;
        assert_eq!(
            scan_body(&longer[..500], MID, &mut crs),
            (500, Some(DOT_CR))
        );
        assert_eq!(
            scan_body(&longer[500..], DOT_CR, &mut crs).1,
            Some(SMUGGLED)
        );
    }

    /// The byte-at-a-time state machine `scan_body` must agree with.
    fn scan_body_reference(data: &[u8], mut at: u8, crs: &mut usize) -> (usize, Option<u8>) {
        for (i, &b) in data.iter().enumerate() {
            match body_step(at, b, crs) {
                None => return (i + 1, None),
                Some(SMUGGLED) => return (i + 1, Some(SMUGGLED)),
                Some(next) => at = next,
            }
        }
        (data.len(), Some(at))
    }

    #[test]
    fn body_scan_matches_the_state_machine_on_every_short_input() {
        // Every string of up to 8 bytes over the bytes that matter (and one that does
        // not), from every state and from a CR count at the limit: 6 x 2 x (4^0 + ... +
        // 4^8) cases.
        let alphabet = [b'\r', b'\n', b'.', b'x'];
        for len in 0..=8u32 {
            for code in 0..4usize.pow(len) {
                let data: Vec<u8> = (0..len)
                    .map(|k| alphabet[code / 4usize.pow(k) % 4])
                    .collect();
                for at in [MID, LINE, DOT, DOT_CR, CR, CR_DOT, LINE_BARE, DOT_BARE] {
                    for start in [0, MAX_COMMAND_LINE - 4] {
                        let (mut fast, mut slow) = (start, start);
                        assert_eq!(
                            scan_body(&data, at, &mut fast),
                            scan_body_reference(&data, at, &mut slow),
                            "{:?} from state {at}, {start} CRs",
                            String::from_utf8_lossy(&data)
                        );
                    }
                }
            }
        }
    }

    /// A message line of a `.` after a bare CR, or of a `.` and a bare CR, or of a `.`
    /// and too many CRs, ends the message for some servers and not for others (SMTP
    /// smuggling): the session is closed. Before, a `.` and 2048 CRs ended it for the
    /// follower and not for Postfix, which then took a BDAT's "chunk" as commands and
    /// delivered to bob@partner.example.
    #[test]
    fn dot_lines_servers_read_differently_close_the_session() {
        let mut two_thousand = b".".to_vec();
        two_thousand.extend(std::iter::repeat_n(b'\r', 2048));
        two_thousand.push(b'\n');
        // `.\r\r\n` and a `.` line after or before a bare LF end the data for Postfix
        // and not for the relay's own server (an audit's `\n.\n` put the edge's reply
        // pairing out of step behind the relay, and a later RCPT was checked against
        // the wrong sender).
        for end in [
            &b"\r.\r\n"[..],
            b"\r.\r",
            b"\n.\rX",
            &two_thousand,
            b".\r\r\n",
            b"\n.\n",
            b".\n",
            b"\n.\r\n",
        ] {
            let mut s = greeted(b"250-s\r\n250 CHUNKING\r\n");
            let setup = b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<carol@random.example>\r\nDATA\r\n";
            assert_eq!(s.client_bytes(setup, false), None);
            assert_eq!(
                s.server_bytes(b"250 ok\r\n250 ok\r\n354 go\r\n", false),
                None
            );
            let mut attack = b"Subject: t\r\n\r\nhi\r\n".to_vec();
            attack.extend(end);
            attack.extend(b"BDAT 68\r\n.\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nDATA\r\n");
            assert_eq!(
                s.client_bytes(&attack, false),
                Some(Vec::new()),
                "{:?}",
                String::from_utf8_lossy(end)
            );
            assert_eq!(
                s.take_violation(),
                Some("a '.' line that servers read differently")
            );
        }
    }

    /// An overlong command line is not forwarded, not even its start: a server that reads
    /// only the start of a long line (Postfix keeps 2048 bytes and discards the rest)
    /// would take a `RCPT` padded past 4 KiB that this follower never checked. A `NOOP`
    /// goes in its place, and the client gets `500 5.5.6`. Before, the line was forwarded.
    #[test]
    fn overlong_command_lines_are_refused_not_forwarded() {
        for step in [1, 100, 100_000] {
            let mut s = session();
            let mut client = b"EHLO c\r\nRCPT TO:<b@partner.example>".to_vec();
            client.extend(std::iter::repeat_n(b' ', 10_000));
            client.extend(b"\r\nMAIL FROM:<>\r\nRCPT TO:<b@partner.example>\r\n");
            let (up, down) = run(
                &mut s,
                &client,
                b"220 hi\r\n250 e\r\n250 noop\r\n250 ok\r\n250 noop\r\n",
                step,
            );
            assert_eq!(
                String::from_utf8(up).unwrap(),
                "EHLO c\r\nNOOP\r\nMAIL FROM:<>\r\nNOOP\r\n",
                "step {step}"
            );
            assert_eq!(
                String::from_utf8(down).unwrap(),
                "220 hi\r\n250 e\r\n500 5.5.6 Line too long\r\n250 ok\r\n450 4.7.10 TLS required for <b@partner.example>\r\n",
                "step {step}"
            );
            assert_eq!(s.take_events().overlong, 1);
        }
    }

    /// Postfix runs the first 2048 bytes of a longer command and discards the rest: a RCPT
    /// padded to 2049–4096 bytes was decided here on its whole address
    /// (`b2@partner.example.evil.example`, opportunistic) and delivered by Postfix to
    /// b2@partner.example; a padded BDAT size (`10000` read as `10`) let the follower
    /// take the next transaction for chunk data. Command lines over 1000 bytes are now
    /// refused, and so are NUL bytes in a command.
    #[test]
    fn commands_longer_than_a_server_reads_whole_are_not_forwarded() {
        for pad in [2021, 2022, 2500, 1000 - 8 - 26] {
            let mut s = greeted(b"250 ok\r\n");
            let mut line = b"RCPT TO:".to_vec();
            line.extend(std::iter::repeat_n(b' ', pad));
            line.extend(b"b2@partner.example.evil.example");
            assert_eq!(replaced(&mut s, &line), LINE_TOO_LONG, "pad {pad}");
        }
        // 1000 bytes with the line end still go.
        let mut s = greeted(b"250 ok\r\n");
        let mut line = b"RCPT TO:<b@other.example>".to_vec();
        line.extend(std::iter::repeat_n(b' ', 1000 - line.len() - 2));
        line.extend(b"\r\n");
        assert_eq!(line.len(), 1000);
        assert_eq!(s.client_bytes(&line, false), None);

        let mut s = greeted(b"250-s\r\n250-CHUNKING\r\n250 PIPELINING\r\n");
        let mut line = b"BDAT".to_vec();
        line.extend(std::iter::repeat_n(b' ', 2042));
        line.extend(b"10000\r\n");
        line.extend(b"0123456789RSET\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nBDAT 7 LAST\r\nhello\r\n");
        let up = s.client_bytes(&line, false).unwrap_or_else(|| line.clone());
        assert!(
            !up.windows(25).any(|w| w == b"RCPT TO:<bob@partner.exam"),
            "{}",
            String::from_utf8_lossy(&up)
        );

        let mut s = greeted(b"250 ok\r\n");
        assert_eq!(
            replaced(&mut s, b"RCPT\0TO:<n1@partner.example>"),
            NUL_IN_COMMAND
        );
        for line in [
            &b"NOOP\rRCPT TO:<n2@partner.example>"[..],
            b"RCPT TO:<c@other.example>\rRCPT TO:<n3@partner.example>",
            b"RCPT TO:<c@other.example>\r\r",
        ] {
            let mut s = greeted(b"250 ok\r\n");
            assert_eq!(replaced(&mut s, line), CR_IN_COMMAND, "{line:?}");
        }
        // White space before the verb: servers skip it, so it is no RCPT this follower
        // saw (an audit's ` RCPT TO:<bob@partner.example>` got 250 through the edge).
        for line in [
            &b" RCPT TO:<s1@partner.example>"[..],
            b"\tRCPT TO:<s2@partner.example>",
            b" MAIL FROM:<cfo@corp.example>",
            b"  BDAT 31",
        ] {
            let mut s = greeted(b"250 ok\r\n");
            assert_eq!(replaced(&mut s, line), SPACE_BEFORE_COMMAND, "{line:?}");
        }
    }

    /// Servers split commands at any white space, and read a quoted local part whole: each
    /// of these is a RCPT for a mailbox at partner.example to Postfix, and is checked. A
    /// MAIL or RCPT the follower cannot read is refused, not forwarded. Before, all of
    /// these went upstream unchecked.
    #[test]
    fn every_spelling_of_rcpt_is_checked_and_the_unreadable_ones_refused() {
        let checked: [&[u8]; 6] = [
            b"RCPT\tTO:<b@partner.example>",
            b"RCPT  TO:<b@partner.example>",
            b"rcpt to : <b@partner.example>",
            b"RCPT TO:\t<b@partner.example> NOTIFY=NEVER",
            b"RCPT TO:b@partner.example\tNOTIFY=NEVER",
            b"RCPT TO:<\"a>b\\\"\"@partner.example>",
        ];
        for rcpt in checked {
            let mut s = greeted(b"250 ok\r\n");
            let reply = replaced(&mut s, rcpt);
            assert!(
                reply.starts_with("450 4.7.10 TLS required for <"),
                "{reply}"
            );
        }
        let refused: [(&[u8], &str); 4] = [
            (b"RCPT <b@partner.example>", RCPT_SYNTAX),
            (b"RCPT TO<b@partner.example>", RCPT_SYNTAX),
            (b"RCPT", RCPT_SYNTAX),
            (b"MAIL FRM:<a@corp.example>", MAIL_SYNTAX),
        ];
        for (command, reply) in refused {
            let mut s = greeted(b"250 ok\r\n");
            assert_eq!(replaced(&mut s, command), reply);
        }
        // MAIL with a tab: its REQUIRETLS parameter is read too.
        let mut s = greeted(b"250 ok\r\n");
        assert_eq!(
            s.client_bytes(b"MAIL\tFROM:<a@corp.example>\tREQUIRETLS\r\n", false),
            None
        );
        assert_eq!(s.server_bytes(b"250 ok\r\n", false), None);
        assert!(s.requiretls);
        assert_eq!(s.sender, "a@corp.example");
    }

    /// A policy whose rules depend on the sender.
    fn sender_rules() -> Session {
        let compiled = policy::compile(
            r#"
            [[org_units]]
            path = "/finance"
            senders = ["cfo@corp.example"]

            [[tls_compliance]]
            name = "supplier-inbound"
            direction = "inbound"
            domains = ["supplier.example"]

            [[tls_compliance]]
            name = "finance-strict"
            org_unit = "/finance"
            domains = ["audit.example"]
            "#,
        )
        .unwrap();
        let mut s = Session::new(Rc::new(compiled.policy));
        assert_eq!(s.server_bytes(b"220 hi\r\n", false), None);
        assert_eq!(s.client_bytes(b"EHLO c\r\n", false), None);
        assert_eq!(s.server_bytes(b"250 PIPELINING\r\n", false), None);
        s
    }

    /// The sender is the transaction's once the server accepted its MAIL, and a refused
    /// MAIL, EHLO or RSET leaves the transaction as it was. The follower once took the
    /// sender at command time: after `MAIL FROM:<orders@supplier.example>` (250), a nested
    /// `MAIL FROM:<a@corp.example>` (503: Postfix keeps the first) made it check the next
    /// RCPT against a@corp.example, and Postfix delivered in clear text mail from
    /// supplier.example, which the policy requires TLS for. So did an `EHLO` without a
    /// name (501) and an `RSET x` (501) after a finance sender's MAIL.
    #[test]
    fn a_refused_mail_ehlo_or_rset_does_not_change_the_sender() {
        let refused = |rcpt: &str| format!("450 4.7.10 TLS required for <{rcpt}>\r\n");
        for (first, second, reply, rcpt) in [
            (
                "MAIL FROM:<orders@supplier.example>",
                "MAIL FROM:<a@corp.example>",
                "503 5.5.1 Error: nested MAIL command",
                "x@random.example",
            ),
            (
                "MAIL FROM:<cfo@corp.example>",
                "EHLO",
                "501 Syntax: EHLO hostname",
                "x@audit.example",
            ),
            (
                "MAIL FROM:<cfo@corp.example>",
                "RSET x",
                "501 5.5.4 Syntax: RSET",
                "x@audit.example",
            ),
        ] {
            // One by one, each reply read before the next command.
            let mut s = sender_rules();
            let line = |c: &str| format!("{c}\r\n").into_bytes();
            assert_eq!(s.client_bytes(&line(first), false), None);
            assert_eq!(s.server_bytes(b"250 2.1.0 Ok\r\n", false), None);
            assert_eq!(s.client_bytes(&line(second), false), None);
            assert_eq!(s.server_bytes(&line(reply), false), None);
            assert_eq!(
                replaced(&mut s, format!("RCPT TO:<{rcpt}>").as_bytes()),
                refused(rcpt),
                "{second}"
            );
            // Pipelined: the RCPT is checked against both senders while the replies wait.
            let mut s = sender_rules();
            let group = [
                line(first),
                line(second),
                line(&format!("RCPT TO:<{rcpt}>")),
            ]
            .concat();
            let up = s.client_bytes(&group, false).unwrap();
            assert!(
                up.ends_with(b"NOOP\r\n"),
                "{}",
                String::from_utf8_lossy(&up)
            );
        }
        // Accepted, the second MAIL or RSET does change the transaction.
        let mut s = sender_rules();
        assert_eq!(
            s.client_bytes(b"MAIL FROM:<orders@supplier.example>\r\n", false),
            None
        );
        assert_eq!(s.server_bytes(b"250 ok\r\n", false), None);
        assert_eq!(s.client_bytes(b"RSET\r\n", false), None);
        assert_eq!(s.server_bytes(b"250 ok\r\n", false), None);
        assert_eq!(
            s.client_bytes(b"MAIL FROM:<a@corp.example>\r\n", false),
            None
        );
        assert_eq!(s.server_bytes(b"250 ok\r\n", false), None);
        assert_eq!(
            s.client_bytes(b"RCPT TO:<x@random.example>\r\n", false),
            None
        );
        // A whole pipelined transaction from one sender is checked as before.
        let mut s = sender_rules();
        let group = b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<x@random.example>\r\nRCPT TO:<y@audit.example>\r\nDATA\r\n";
        assert_eq!(s.client_bytes(group, false), None);
        // After the end of a message its sender is gone, whatever the reply.
        assert_eq!(
            s.server_bytes(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n", false),
            None
        );
        assert_eq!(s.client_bytes(b"hi\r\n.\r\n", false), None);
        assert_eq!(s.server_bytes(b"451 try later\r\n", false), None);
        assert!(!s.in_transaction);
        // Too many senders waiting: refused.
        let mut s = sender_rules();
        let mut group = Vec::new();
        for i in 0..=MAX_SENDERS {
            group.extend(format!("MAIL FROM:<s{i}@corp.example>\r\n").into_bytes());
        }
        group.extend(b"RCPT TO:<x@random.example>\r\n");
        let up = s.client_bytes(&group, false).unwrap();
        assert!(up.ends_with(b"NOOP\r\n"));
    }

    /// Sends the command line `command` (CRLF added), which must go upstream as a `NOOP`
    /// alone, and returns what the client gets for the NOOP's `250`.
    fn replaced(s: &mut Session, command: &[u8]) -> String {
        let mut line = command.to_vec();
        line.extend(b"\r\n");
        let what = String::from_utf8_lossy(command);
        assert_eq!(
            s.client_bytes(&line, false).as_deref(),
            Some(&b"NOOP\r\n"[..]),
            "{what}"
        );
        let reply = s.server_bytes(b"250 noop\r\n", false).expect("rewritten");
        String::from_utf8(reply).expect("text")
    }

    /// Greeting and EHLO done; `ehlo` is the server's EHLO reply.
    fn greeted(ehlo: &[u8]) -> Session {
        let mut s = session();
        assert_eq!(s.server_bytes(b"220 hi\r\n", false), None);
        assert_eq!(s.client_bytes(b"EHLO c\r\n", false), None);
        assert_eq!(s.server_bytes(ehlo, false), None);
        s
    }

    #[test]
    fn bytes_after_data_before_its_reply_close_the_session() {
        // The bypass this closes: the first RCPT becomes NOOP, so the server refuses DATA
        // (no valid recipients) and reads the second RCPT as a command. Whole, or split
        // anywhere after DATA.
        let attack: &[u8] = b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<v@partner.example>\r\nDATA\r\nRCPT TO:<v@partner.example>\r\n";
        let after_data = attack.windows(6).position(|w| w == b"DATA\r\n").unwrap() + 6;
        for split in [attack.len(), after_data, after_data + 1, attack.len() - 1] {
            let mut s = greeted(b"250 PIPELINING\r\n");
            let (first, second) = attack.split_at(split);
            let mut up = Vec::new();
            let mut closed = false;
            for part in [first, second] {
                if part.is_empty() {
                    continue;
                }
                let out = s.client_bytes(part, false);
                up.extend(out.clone().unwrap_or_else(|| part.to_vec()));
                if let Some(why) = s.take_violation() {
                    assert!(why.contains("DATA"), "{why}");
                    assert_eq!(out, Some(Vec::new()), "nothing of that read goes upstream");
                    closed = true;
                }
            }
            assert!(closed, "split at {split}");
            assert!(
                !up.windows(4).any(|w| w == b"RCPT"),
                "split at {split}: {:?}",
                String::from_utf8_lossy(&up)
            );
            // Whatever comes later is dropped too, and the violation is told once.
            assert_eq!(s.client_bytes(b"QUIT\r\n", false), Some(Vec::new()));
            assert_eq!(s.take_violation(), None);
        }
    }

    #[test]
    fn a_client_that_writes_without_reading_is_closed() {
        // Each bare LF is a command with a reply to wait for; the queue of them grew
        // until the VM ran out of memory (an audit took every worker's VM down so).
        let mut s = greeted(b"250 PIPELINING\r\n");
        let empty = "\r\n".repeat(MAX_PENDING - 1);
        assert_eq!(s.client_bytes(empty.as_bytes(), false), None);
        assert_eq!(s.take_violation(), None);
        assert_eq!(s.client_bytes(b"\r\n\r\n\r\n", false), Some(Vec::new()));
        assert_eq!(
            s.take_violation(),
            Some("too many commands waiting for their replies")
        );
        assert_eq!(s.client_bytes(b"QUIT\r\n", false), Some(Vec::new()));

        // A large pipelined group whose replies come is not: the queue drains.
        let mut s = greeted(b"250 PIPELINING\r\n");
        let mut group = b"MAIL FROM:<a@corp.example>\r\n".to_vec();
        for i in 0..MAX_PENDING - 10 {
            group.extend_from_slice(format!("RCPT TO:<r{i}@random.example>\r\n").as_bytes());
        }
        group.extend_from_slice(b"DATA\r\n");
        assert_eq!(s.client_bytes(&group, false), None);
        let replies = "250 ok\r\n".repeat(MAX_PENDING - 9) + "354 go\r\n";
        assert_eq!(s.server_bytes(replies.as_bytes(), false), None);
        assert_eq!(s.client_bytes(b"hi\r\n.\r\n", false), None);
        assert_eq!(s.server_bytes(b"250 queued\r\n", false), None);
        for _ in 0..3 {
            let batch = "NOOP\r\n".repeat(MAX_PENDING / 2);
            assert_eq!(s.client_bytes(batch.as_bytes(), false), None);
            let replies = "250 ok\r\n".repeat(MAX_PENDING / 2);
            assert_eq!(s.server_bytes(replies.as_bytes(), false), None);
        }
        assert_eq!(s.take_violation(), None);
    }

    #[test]
    fn a_refused_data_leaves_the_follower_reading_commands() {
        let mut s = greeted(b"250 PIPELINING\r\n");
        assert_eq!(
            s.client_bytes(
                b"MAIL FROM:<a@corp.example>\r\nRCPT TO:<v@partner.example>\r\nDATA\r\n",
                false
            ),
            Some(b"MAIL FROM:<a@corp.example>\r\nNOOP\r\nDATA\r\n".to_vec())
        );
        assert_eq!(
            s.server_bytes(b"250 ok\r\n250 noop\r\n554 no valid recipients\r\n", false),
            Some(
                b"250 ok\r\n450 4.7.10 TLS required for <v@partner.example>\r\n554 no valid recipients\r\n"
                    .to_vec()
            )
        );
        assert_eq!(
            s.client_bytes(b"RCPT TO:<v@partner.example>\r\n", false),
            Some(b"NOOP\r\n".to_vec())
        );
        assert_eq!(s.take_violation(), None);
    }

    #[test]
    fn bdat_data_passes_unread_only_when_the_server_offers_chunking() {
        let chunk = b"BDAT 29\r\nRCPT TO:<v@partner.example>\r\n";
        // Not offered: the BDAT does not go upstream (a server may take the chunk all the
        // same: Postfix does after HELO), so both sides read the "data" as commands.
        let mut s = greeted(b"250-s\r\n250 PIPELINING\r\n");
        assert_eq!(
            s.client_bytes(chunk, false),
            Some(b"NOOP\r\nNOOP\r\n".to_vec())
        );
        assert_eq!(
            s.server_bytes(b"250 noop\r\n250 noop\r\n", false).as_deref(),
            Some(
                &b"503 5.5.1 CHUNKING was not offered: use DATA\r\n450 4.7.10 TLS required for <v@partner.example>\r\n"[..]
            )
        );
        // Offered: the chunk is the message's, and the next command is checked again.
        let mut s = greeted(b"250-s\r\n250-CHUNKING\r\n250 PIPELINING\r\n");
        assert_eq!(s.client_bytes(chunk, false), None);
        assert_eq!(
            s.client_bytes(b"RCPT TO:<v@partner.example>\r\n", false),
            Some(b"NOOP\r\n".to_vec())
        );
        // The replies to the chunk and to the refused RCPT.
        assert!(
            s.server_bytes(b"250 chunk\r\n250 noop\r\n", false)
                .is_some()
        );
        // A size that is not plain digits is refused, and what follows read as commands.
        for bad in [
            &b"BDAT +29\r\n"[..],
            b"BDAT 29 junk\r\n",
            b"BDAT\r\n",
            b"BDAT 29 LAST x\r\n",
        ] {
            let mut line = bad.to_vec();
            line.extend(b"RCPT TO:<v@partner.example>\r\n");
            assert_eq!(
                s.client_bytes(&line, false),
                Some(b"NOOP\r\nNOOP\r\n".to_vec()),
                "{}",
                String::from_utf8_lossy(bad)
            );
            assert_eq!(
                s.server_bytes(b"250 noop\r\n250 noop\r\n", false).as_deref(),
                Some(
                    &b"501 5.5.4 Syntax: BDAT count [LAST]\r\n450 4.7.10 TLS required for <v@partner.example>\r\n"[..]
                )
            );
        }
        assert_eq!(s.client_bytes(b"BDAT 0 LAST\r\n", false), None);
        // A new EHLO forgets the offer until its own reply says it again.
        assert_eq!(s.client_bytes(b"EHLO again\r\n", false), None);
        assert_eq!(
            s.client_bytes(chunk, false),
            Some(b"NOOP\r\nNOOP\r\n".to_vec())
        );
    }

    /// The reply to the last EHLO or HELO decides whether CHUNKING is offered, whatever
    /// order the replies come in relative to the commands. An audit pipelined `EHLO`
    /// then `HELO`: the EHLO's reply turned the offer on after the HELO had turned it off,
    /// and the BDAT (its chunk a RCPT) went upstream.
    #[test]
    fn only_the_last_greeting_s_reply_offers_chunking() {
        let chunk = b"BDAT 29\r\nRCPT TO:<v@partner.example>\r\n";
        let refused: &[u8] = b"503 5.5.1 CHUNKING was not offered: use DATA\r\n450 4.7.10 TLS required for <v@partner.example>\r\n";
        let ehlo_reply: &[u8] = b"250-s\r\n250-CHUNKING\r\n250 PIPELINING\r\n";
        for step in [1, 5, 1000] {
            // EHLO and HELO pipelined, both answered, then BDAT.
            let mut s = session();
            let (up, _) = run(
                &mut s,
                b"EHLO c\r\nHELO c\r\n",
                &[b"220 hi\r\n", ehlo_reply, b"250 s\r\n"].concat(),
                step,
            );
            assert_eq!(up, b"EHLO c\r\nHELO c\r\n");
            assert_eq!(
                s.client_bytes(chunk, false),
                Some(b"NOOP\r\nNOOP\r\n".to_vec()),
                "step {step}"
            );
            assert_eq!(
                s.server_bytes(b"250 noop\r\n250 noop\r\n", false)
                    .as_deref(),
                Some(refused)
            );
            // BDAT pipelined behind an EHLO whose reply has not come: not known yet.
            let mut s = greeted(ehlo_reply);
            assert_eq!(s.client_bytes(b"EHLO again\r\n", false), None);
            assert_eq!(
                s.client_bytes(chunk, false),
                Some(b"NOOP\r\nNOOP\r\n".to_vec())
            );
            // A HELO answered by a server named CHUNKING offers nothing.
            let mut s = greeted(b"250 s\r\n");
            assert_eq!(s.client_bytes(b"HELO c\r\n", false), None);
            assert_eq!(s.server_bytes(b"250 CHUNKING\r\n", false), None);
            assert_eq!(
                s.client_bytes(chunk, false),
                Some(b"NOOP\r\nNOOP\r\n".to_vec())
            );
            // A refused EHLO offers nothing either, whatever its lines say.
            let mut s = greeted(ehlo_reply);
            assert_eq!(s.client_bytes(b"EHLO again\r\n", false), None);
            assert_eq!(s.server_bytes(b"550-x\r\n550 CHUNKING\r\n", false), None);
            assert_eq!(
                s.client_bytes(chunk, false),
                Some(b"NOOP\r\nNOOP\r\n".to_vec())
            );
        }
    }
}
