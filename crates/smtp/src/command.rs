//! Command framing and parsing for the server.
//!
//! [`CommandReader`] splits the byte stream into command lines with a hard
//! bound on buffered bytes: a line over [`MAX_COMMAND_LINE`] octets is
//! reported as [`CommandLine::TooLong`] and the rest of it is discarded as it
//! arrives, never buffered. smtp-proto's `RequestReceiver` buffers up to 4096
//! octets and cannot report "too long, skip the rest", which is why the
//! framing is our own; the grammar of a complete line is smtp-proto's
//! [`Request::parse`] (see [`parse_command`]).

use std::borrow::Cow;

use smtp_proto::Request;

/// Longest command line, in octets including CRLF (RFC 5321 4.5.3.1.4).
pub const MAX_COMMAND_LINE: usize = 512;

/// Longest line of an AUTH exchange after the command (RFC 4954 §4: 12,288 octets):
/// with the command line's 512, a password of some 380 bytes could not log in at all.
pub const MAX_AUTH_LINE: usize = 12_288;

/// One framed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandLine {
    /// A complete line, terminator stripped (CRLF or a lone LF).
    Line(Vec<u8>),
    /// The line exceeded [`MAX_COMMAND_LINE`]; its bytes were discarded up to
    /// and including its LF.
    TooLong,
}

/// Incremental, bounded command line framer. Pure: fed with byte slices.
#[derive(Debug)]
pub struct CommandReader {
    buf: Vec<u8>,
    discarding: bool,
    limit: usize,
}

impl Default for CommandReader {
    fn default() -> Self {
        Self::new()
    }
}

impl CommandReader {
    /// A reader with the RFC 5321 limit of 512 octets.
    pub fn new() -> Self {
        Self::with_limit(MAX_COMMAND_LINE)
    }

    /// A reader with a custom line limit (octets including CRLF).
    pub fn with_limit(limit: usize) -> Self {
        Self {
            buf: Vec::with_capacity(128),
            discarding: false,
            limit: limit.max(3),
        }
    }

    /// Changes the line limit from the next line on (an AUTH exchange's lines may be
    /// longer than commands).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit.max(3);
    }

    /// Bytes of an unfinished line currently held (never more than the limit).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Drop any partial line (used after STARTTLS: nothing sent in clear text
    /// before the handshake may be interpreted afterwards).
    pub fn clear(&mut self) {
        self.buf.clear();
        self.discarding = false;
    }

    /// Consume bytes until one line completes. Returns how many bytes of
    /// `input` were consumed and the line, if one completed. Call again with
    /// the remaining bytes to get pipelined commands.
    pub fn feed(&mut self, input: &[u8]) -> (usize, Option<CommandLine>) {
        for (i, &b) in input.iter().enumerate() {
            if b == b'\n' {
                if std::mem::take(&mut self.discarding) {
                    self.buf.clear();
                    return (i + 1, Some(CommandLine::TooLong));
                }
                let mut line = std::mem::take(&mut self.buf);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                // Content may use limit - 2 octets; the rest is the CRLF.
                if line.len() + 2 > self.limit {
                    return (i + 1, Some(CommandLine::TooLong));
                }
                return (i + 1, Some(CommandLine::Line(line)));
            }
            if self.discarding {
                continue;
            }
            // Hold at most limit - 1 octets (content plus a possible CR);
            // past that the line cannot end within the limit.
            if self.buf.len() + 1 >= self.limit {
                self.discarding = true;
                self.buf.clear();
                continue;
            }
            self.buf.push(b);
        }
        (input.len(), None)
    }
}

/// Parse one command line (without its terminator) with smtp-proto.
pub fn parse_command(line: &[u8]) -> Result<Request<String>, smtp_proto::Error> {
    // A command starts with its verb (RFC 5321 §4.1.1). smtp-proto skips white space
    // before it, and a follower that does not (the SMTP edge) would see no command where
    // this server runs one: refused, as the edge refuses it.
    if line.first().is_some_and(|b| b.is_ascii_whitespace()) {
        return Err(smtp_proto::Error::UnknownCommand);
    }
    // smtp-proto's grammar expects the LF terminator.
    let mut framed = Vec::with_capacity(line.len() + 2);
    framed.extend_from_slice(line);
    framed.extend_from_slice(b"\r\n");
    let req: Request<Cow<'_, str>> = Request::parse(&mut framed.iter())?;
    let mut req = req.into_owned();
    // smtp-proto ignores what follows DATA, RSET and STARTTLS, which take no argument
    // (RFC 5321 4.1.1.4, 4.1.1.5; RFC 3207 4): `DATA junk` was answered 354. As Postfix,
    // refuse them with 501. (QUIT's argument is ignored, as Postfix does: the client is
    // leaving either way.)
    let bare = |verb: &'static str| {
        let rest = line.get(verb.len()..).unwrap_or(&[]);
        if rest.iter().all(|b| *b == b' ') {
            Ok(())
        } else {
            Err(smtp_proto::Error::SyntaxError { syntax: verb })
        }
    };
    match req {
        Request::Data => bare("DATA")?,
        Request::Rset => bare("RSET")?,
        Request::StartTls => bare("STARTTLS")?,
        _ => {}
    }
    // smtp-proto 0.2.5 saturates SIZE at 20 digits but then restarts from the
    // next digit, so `SIZE=` followed by 21 nines parses as 9. Re-check the raw
    // parameter: anything longer than 19 digits is "too big".
    if let Request::Mail { from } = &mut req
        && line
            .split(|b| *b == b' ')
            .filter_map(|p| {
                p.get(..5)
                    .filter(|k| k.eq_ignore_ascii_case(b"SIZE="))
                    .map(|_| &p[5..])
            })
            .any(|digits| digits.len() > 19)
    {
        from.size = usize::MAX;
    }
    // smtp-proto parses `<postmaster>` as an empty address, the null path. As a forward
    // path it is the one mailbox without a domain, which must be accepted (RFC 5321
    // 4.1.1.3); as a reverse path it is no mailbox at all (4.1.2 wants a domain), and
    // taken for `<>` it sent mail out from the null sender, whose bounces are dropped.
    // So it is given back as written, and the server refuses it in MAIL.
    let postmaster = || {
        line.iter()
            .position(|b| *b == b'<')
            .and_then(|open| line.get(open + 1..open + 12))
            .filter(|p| p.eq_ignore_ascii_case(b"postmaster>"))
            .map(|path| String::from_utf8_lossy(&path[..10]).into_owned())
    };
    match &mut req {
        Request::Rcpt { to } if to.address.is_empty() => {
            if let Some(p) = postmaster() {
                to.address = p;
            }
        }
        Request::Mail { from } if from.address.is_empty() => {
            if let Some(p) = postmaster() {
                from.address = p;
            }
        }
        _ => {}
    }
    Ok(req)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn feed_all(r: &mut CommandReader, mut input: &[u8]) -> Vec<CommandLine> {
        let mut out = Vec::new();
        while !input.is_empty() {
            let (n, line) = r.feed(input);
            input = &input[n..];
            out.extend(line);
        }
        out
    }

    #[test]
    fn commands_without_arguments_refuse_one() {
        for line in ["DATA junk", "RSET x", "STARTTLS now", "data\tx"] {
            assert!(
                matches!(
                    parse_command(line.as_bytes()),
                    Err(smtp_proto::Error::SyntaxError { .. } | smtp_proto::Error::UnknownCommand)
                ),
                "{line}"
            );
        }
        for line in ["DATA", "data  ", "RSET", "STARTTLS", "QUIT now"] {
            assert!(parse_command(line.as_bytes()).is_ok(), "{line}");
        }
    }

    #[test]
    fn limit_is_512_including_crlf() {
        let mut r = CommandReader::new();
        let ok = [vec![b'A'; 510], b"\r\n".to_vec()].concat();
        assert_eq!(
            feed_all(&mut r, &ok),
            vec![CommandLine::Line(vec![b'A'; 510])]
        );
        let long = [vec![b'A'; 511], b"\r\nNOOP\r\n".to_vec()].concat();
        assert_eq!(
            feed_all(&mut r, &long),
            vec![CommandLine::TooLong, CommandLine::Line(b"NOOP".to_vec())]
        );
    }

    #[test]
    fn discarding_stays_bounded() {
        let mut r = CommandReader::new();
        for _ in 0..1000 {
            let (_, line) = r.feed(&[b'x'; 4096]);
            assert!(line.is_none());
            assert!(r.buffered() <= MAX_COMMAND_LINE);
        }
        assert_eq!(feed_all(&mut r, b"\r\n"), vec![CommandLine::TooLong]);
    }

    #[test]
    fn byte_at_a_time() {
        let mut r = CommandReader::new();
        let mut got = Vec::new();
        for b in b"EHLO a\r\nQUIT\n" {
            let (n, line) = r.feed(std::slice::from_ref(b));
            assert_eq!(n, 1);
            got.extend(line);
        }
        assert_eq!(
            got,
            vec![
                CommandLine::Line(b"EHLO a".to_vec()),
                CommandLine::Line(b"QUIT".to_vec())
            ]
        );
    }

    #[test]
    fn parses_with_smtp_proto() {
        assert!(matches!(
            parse_command(b"MAIL FROM:<> SIZE=10"),
            Ok(Request::Mail { .. })
        ));
        assert!(matches!(parse_command(b"RSET"), Ok(Request::Rset)));
        assert!(parse_command(b"FOO").is_err());
    }

    #[test]
    fn huge_size_does_not_wrap() {
        for n in [19, 21, 25, 39] {
            let line = format!("MAIL FROM:<a@b> SIZE={}", "9".repeat(n));
            match parse_command(line.as_bytes()) {
                Ok(Request::Mail { from }) => {
                    assert!(from.size >= 999_999_999, "{n}: {}", from.size)
                }
                other => panic!("{n} digits: {other:?}"),
            }
        }
    }
}
