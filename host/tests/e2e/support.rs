//! Runs the real `altroute` binary from a generated configuration in a temp dir.
//!
//! [`RelayConfig`] describes the relay (listen address from `altroute_lab::loopback_ip`,
//! a free port, extra TOML per section); [`Relay::start`] writes `altroute.toml`, starts
//! `altroute serve`, waits until the SMTP port answers and kills the process on drop.
//! [`Relay::stop`] sends SIGTERM and waits (graceful shutdown), [`Relay::kill`] sends
//! SIGKILL. [`require_tool`] fails a test that needs a missing Debian tool with a message
//! naming the package.

#![allow(dead_code)]

use std::fmt::Write as _;
use std::io::Read as _;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use altroute_queue::{ManualClock, MessageId, Spool, SpoolConfig};

/// Runs the `altroute` binary with `args`: (exit code, stdout, stderr).
pub fn altroute(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
        .args(args)
        .output()
        .expect("running altroute");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The example policy every relay in these tests loads.
pub fn policy_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/policies/hosted-suite.toml")
}

/// Fail (not skip) when a tool is missing.
pub fn require_tool(path: &str, package: &str) {
    assert!(
        Path::new(path).exists(),
        "{path} is missing: install it with `apt-get install -y {package}`"
    );
}

/// What to put in the generated configuration.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// SMTP listen address.
    pub smtp: SocketAddr,
    /// Admin address.
    pub admin: SocketAddr,
    /// `relay.allow_networks`.
    pub allow_networks: Vec<String>,
    /// Spool directory; defaults to `<tempdir>/spool`.
    pub spool_dir: Option<PathBuf>,
    /// Extra lines for `[server]`, `[relay]`.
    pub server_extra: String,
    pub relay_extra: String,
    /// Extra lines for `[admin]`.
    pub admin_extra: String,
    /// Extra lines for `[policy]`.
    pub policy_extra: String,
}

impl RelayConfig {
    /// A relay on a fresh loopback address, loopback clients allowed, delivery off.
    pub fn new() -> RelayConfig {
        let ip = altroute_lab::loopback_ip();
        let port = altroute_lab::free_port(ip).expect("free port");
        let admin_port = altroute_lab::free_port(ip).expect("free port");
        RelayConfig {
            smtp: SocketAddr::new(IpAddr::V4(ip), port),
            admin: SocketAddr::new(IpAddr::V4(ip), admin_port),
            allow_networks: vec!["127.0.0.0/8".into()],
            spool_dir: None,
            server_extra: String::new(),
            relay_extra: String::new(),
            admin_extra: String::new(),
            policy_extra: String::new(),
        }
    }

    fn toml(&self, spool: &Path) -> String {
        let nets: Vec<String> = self
            .allow_networks
            .iter()
            .map(|n| format!("{n:?}"))
            .collect();
        let mut s = String::new();
        writeln!(
            s,
            "[server]\nhostname = \"relay.test\"\nlisten = [\"{}\"]\nshutdown_grace_secs = 10\n{}",
            self.smtp, self.server_extra
        )
        .unwrap();
        writeln!(
            s,
            "[relay]\nallow_networks = [{}]\n{}",
            nets.join(", "),
            self.relay_extra
        )
        .unwrap();
        writeln!(s, "[spool]\ndir = {:?}", spool.display().to_string()).unwrap();
        writeln!(s, "[delivery]\nenabled = false").unwrap();
        writeln!(
            s,
            "[policy]\nfile = {:?}\n{}",
            policy_file().display().to_string(),
            self.policy_extra
        )
        .unwrap();
        writeln!(
            s,
            "[admin]\nlisten = \"{}\"\n{}",
            self.admin, self.admin_extra
        )
        .unwrap();
        s
    }
}

/// A running relay process.
pub struct Relay {
    pub config: RelayConfig,
    pub dir: tempfile::TempDir,
    pub spool_dir: PathBuf,
    pub config_path: PathBuf,
    child: Option<Child>,
}

impl Relay {
    /// Write the configuration and start the relay; panics if it does not come up.
    pub fn start(config: RelayConfig) -> Relay {
        let mut relay = Relay::spawn(config);
        relay.wait_ready();
        relay
    }

    /// Write the configuration and start the relay without waiting for it to serve
    /// (see [`Relay::wait_ready`]).
    pub fn spawn(config: RelayConfig) -> Relay {
        let dir = tempfile::tempdir().expect("tempdir");
        let spool_dir = config
            .spool_dir
            .clone()
            .unwrap_or_else(|| dir.path().join("spool"));
        let config_path = dir.path().join("altroute.toml");
        std::fs::write(&config_path, config.toml(&spool_dir)).expect("write config");
        let mut relay = Relay {
            config,
            dir,
            spool_dir,
            config_path,
            child: None,
        };
        relay.spawn_process();
        relay
    }

    /// (Re)start the process on the same configuration and spool.
    pub fn restart(&mut self) {
        self.spawn_process();
        self.wait_ready();
    }

    fn spawn_process(&mut self) {
        assert!(self.child.is_none(), "relay already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("relay.log"))
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .arg("serve")
            .arg("-c")
            .arg(&self.config_path)
            .env("RUST_LOG", "info")
            // Whether the log has colours is the binary's decision (stderr is a file).
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn altroute");
        self.child = Some(child);
    }

    /// Waits until the relay greets on its SMTP port; panics if it exits or takes over a
    /// minute.
    pub fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("altroute exited early ({status}):\n{}", self.log());
            }
            // Ready means the greeting arrives (the port may be bound before the relay
            // serves, e.g. while the policy module compiles).
            if let Ok(mut s) =
                TcpStream::connect_timeout(&self.config.smtp, Duration::from_millis(200))
            {
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut greeting = [0u8; 4];
                if s.read_exact(&mut greeting).is_ok() && &greeting == b"220 " {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "relay did not listen on {}:\n{}",
                self.config.smtp,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The relay's stderr so far.
    pub fn log(&self) -> String {
        let mut s = String::new();
        if let Ok(mut f) = std::fs::File::open(self.dir.path().join("relay.log")) {
            let _ = f.read_to_string(&mut s);
        }
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM and wait for a graceful exit.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        child.wait().expect("wait")
    }

    /// Wait for the process to exit on its own (after a signal sent with [`signal`]).
    pub fn wait(&mut self) -> ExitStatus {
        self.child.take().expect("running").wait().expect("wait")
    }

    /// SIGKILL, no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Open the spool (the relay must be stopped: the spool is locked while it runs).
    pub fn open_spool(&self) -> Spool {
        open_spool(&self.spool_dir)
    }

    /// HTTP GET on the admin endpoint; returns (status line, body).
    pub fn admin_get(&self, path: &str) -> (String, String) {
        use std::io::Write as _;
        let mut s = TcpStream::connect(self.config.admin).expect("admin connect");
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
        (
            head.lines().next().unwrap_or("").to_owned(),
            body.to_owned(),
        )
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

pub fn open_spool(dir: &Path) -> Spool {
    // A manual clock: reading must not depend on time.
    let clock = std::sync::Arc::new(ManualClock::new(1_700_000_000));
    Spool::open(dir, SpoolConfig::default(), clock).expect("open spool")
}

/// Every message in the spool: (queue id, bytes).
pub fn spool_messages(spool: &Spool) -> Vec<(MessageId, Vec<u8>)> {
    spool
        .list()
        .into_iter()
        .map(|e| {
            let body = spool.read_message(&e.id).expect("read message");
            (e.id, body)
        })
        .collect()
}

/// Strip our `Received:` field (first field, folded lines) from a stored message.
pub fn strip_received(stored: &[u8]) -> &[u8] {
    assert!(
        stored.starts_with(b"Received: "),
        "stored message does not start with Received:"
    );
    let mut pos = 0;
    loop {
        let rest = &stored[pos..];
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("CRLF in Received");
        pos += eol + 2;
        if !matches!(stored.get(pos), Some(b' ' | b'\t')) {
            return &stored[pos..];
        }
    }
}

/// A loopback address other than the relay's, for clients that must not be allowed.
pub fn other_loopback() -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2)
}

/// A minimal SMTP client for tests (independent of altroute-smtp, so a bug there cannot
/// hide itself): one command, one complete reply.
pub struct SmtpConn {
    reader: tokio::io::BufReader<tokio::net::tcp::OwnedReadHalf>,
    writer: tokio::net::tcp::OwnedWriteHalf,
}

impl SmtpConn {
    /// Connect (from `bind` if given), read the greeting and send EHLO.
    pub async fn connect(addr: SocketAddr, bind: Option<IpAddr>) -> std::io::Result<SmtpConn> {
        let socket = tokio::net::TcpSocket::new_v4()?;
        if let Some(ip) = bind {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(addr).await?;
        let (r, w) = stream.into_split();
        let mut c = SmtpConn {
            reader: tokio::io::BufReader::new(r),
            writer: w,
        };
        let (code, text) = c.reply().await?;
        if code != 220 {
            return Err(std::io::Error::other(format!("greeting {code} {text}")));
        }
        let (code, text) = c.cmd("EHLO client.test").await?;
        if code != 250 {
            return Err(std::io::Error::other(format!("EHLO {code} {text}")));
        }
        Ok(c)
    }

    /// The client's end of the connection.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// Read one (possibly multi-line) reply.
    pub async fn reply(&mut self) -> std::io::Result<(u16, String)> {
        use tokio::io::AsyncBufReadExt as _;
        let mut text = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line).await? == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            text.push_str(&line);
            if line.len() < 4 || line.as_bytes()[3] != b'-' {
                let code = line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| std::io::Error::other(format!("bad reply {line:?}")))?;
                return Ok((code, text.trim_end().to_owned()));
            }
        }
    }

    pub async fn cmd(&mut self, line: &str) -> std::io::Result<(u16, String)> {
        use tokio::io::AsyncWriteExt as _;
        self.writer
            .write_all(format!("{line}\r\n").as_bytes())
            .await?;
        self.reply().await
    }

    /// One transaction; returns the first reply that is not positive, or the final one.
    /// `message` uses CRLF line ends; it is dot-stuffed here.
    pub async fn send(
        &mut self,
        from: &str,
        to: &[&str],
        message: &[u8],
    ) -> std::io::Result<(u16, String)> {
        use tokio::io::AsyncWriteExt as _;
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await?;
        if r.0 != 250 {
            return Ok(r);
        }
        let mut any = false;
        let mut last = (0, String::new());
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await?;
            any |= r.0 == 250;
            last = r;
        }
        if !any {
            self.cmd("RSET").await?;
            return Ok(last);
        }
        let r = self.cmd("DATA").await?;
        if r.0 != 354 {
            return Ok(r);
        }
        let mut data = Vec::with_capacity(message.len() + 16);
        for line in message.split_inclusive(|&b| b == b'\n') {
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
        }
        if !data.ends_with(b"\r\n") {
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        self.writer.write_all(&data).await?;
        self.reply().await
    }
}

/// Message-ID field value of a message (first one in the header section).
pub fn message_id(message: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(message);
    for line in text.split("\r\n") {
        if line.is_empty() {
            return None;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("Message-ID")
        {
            return Some(value.trim().to_owned());
        }
    }
    None
}
