//! The SMTP edge filter on the relay's own inbound port (`[edge]`, host/src/edge.rs): the
//! real `altroute serve` binary with the standard module's stream face in front of its
//! SMTP server, driven by Debian's swaks and by a raw client (pipelined and byte by byte);
//! connection routing to the lab's SMTP sinks; a trapping module fails closed.
//!
//! The policy is examples/policies/hosted-suite.toml: partner.example requires TLS,
//! random.example is opportunistic. The refusal is the one the module gives in Envoy
//! (tests/tests/envoy.rs): `450 4.7.10 TLS required for <addr>`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use altroute_lab::{SinkConfig, SmtpSink, TestCa, Validity};

use crate::support::{open_spool, policy_file, require_tool, signal};

const REFUSED: &str = "450 4.7.10 TLS required for <bob@partner.example>";

/// A relay started from a configuration written here (several listeners, `[edge]`).
struct EdgeRelay {
    dir: tempfile::TempDir,
    admin: SocketAddr,
    listen: Vec<SocketAddr>,
    child: Option<Child>,
}

fn free_addr(ip: Ipv4Addr) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), altroute_lab::free_port(ip).unwrap())
}

impl EdgeRelay {
    /// `listeners` SMTP listeners on one loopback address; `server_extra` goes into
    /// `[server]`; `edge` is the `[edge]` TOML (with its tables), given the listeners.
    fn start(
        listeners: usize,
        server_extra: impl FnOnce(&Path) -> String,
        edge: impl FnOnce(&[SocketAddr], &Path) -> String,
    ) -> EdgeRelay {
        let ip = altroute_lab::loopback_ip();
        let listen: Vec<SocketAddr> = (0..listeners).map(|_| free_addr(ip)).collect();
        let admin = free_addr(ip);
        let dir = tempfile::tempdir().unwrap();
        let addrs: Vec<String> = listen.iter().map(|a| format!("\"{a}\"")).collect();
        let toml = format!(
            "[server]\nhostname = \"relay.test\"\nlisten = [{}]\nshutdown_grace_secs = 10\n{}\n\
             [relay]\nallow_networks = [\"127.0.0.0/8\"]\n\
             [spool]\ndir = {:?}\n\
             [delivery]\nenabled = false\n\
             [policy]\nfile = {:?}\n\
             [admin]\nlisten = \"{admin}\"\n\n{}\n",
            addrs.join(", "),
            server_extra(dir.path()),
            dir.path().join("spool").display().to_string(),
            policy_file().display().to_string(),
            edge(&listen, dir.path()),
        );
        std::fs::write(dir.path().join("altroute.toml"), &toml).unwrap();
        let log = std::fs::File::create(dir.path().join("relay.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .args(["serve", "-c"])
            .arg(dir.path().join("altroute.toml"))
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut relay = EdgeRelay {
            dir,
            admin,
            listen,
            child: Some(child),
        };
        relay.wait_ready(&toml);
        relay
    }

    /// Ready = the admin endpoint answers (the SMTP port may be guarded by a module
    /// that never lets a greeting through).
    fn wait_ready(&mut self, toml: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                panic!(
                    "altroute exited early ({status}):\n{}\nconfiguration:\n{toml}",
                    self.log()
                );
            }
            if self
                .get("/health")
                .is_some_and(|(status, _)| status.contains("200"))
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "relay not ready:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn get(&self, path: &str) -> Option<(String, String)> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_millis(500)).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let (head, body) = out.split_once("\r\n\r\n")?;
        Some((head.lines().next()?.to_owned(), body.to_owned()))
    }

    /// The value of one sample of `/metrics` (`name` with its labels, as printed).
    fn metric(&self, sample: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").expect("metrics");
        body.lines()
            .find_map(|l| l.strip_prefix(sample)?.strip_prefix(' ')?.parse().ok())
    }

    /// The sample once it has the value `want`, or what it has after 5 s. For counters
    /// bumped after the connection closed: the client can see the close first.
    fn metric_reaching(&self, sample: &str, want: f64) -> Option<f64> {
        let mut got = self.metric(sample);
        for _ in 0..50 {
            if got == Some(want) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
            got = self.metric(sample);
        }
        got
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("relay.log")).unwrap_or_default()
    }

    /// SIGTERM, wait, and return the spooled messages' recipients (sorted by message).
    fn stop_and_spooled(&mut self) -> Vec<Vec<String>> {
        let mut child = self.child.take().expect("running");
        signal(child.id(), "TERM");
        assert!(child.wait().unwrap().success(), "{}", self.log());
        let spool = open_spool(&self.dir.path().join("spool"));
        let mut all: Vec<Vec<String>> = spool
            .list()
            .into_iter()
            .map(|e| e.envelope.rcpt_to)
            .collect();
        all.sort();
        all
    }
}

impl Drop for EdgeRelay {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A raw SMTP client: what it sends is exactly what goes on the wire.
struct Client {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Client {
    fn connect(addr: SocketAddr, source: Option<Ipv4Addr>) -> Client {
        let socket = match source {
            Some(ip) => {
                let s = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                s.block_on(async {
                    let sock = tokio::net::TcpSocket::new_v4().unwrap();
                    sock.bind(SocketAddr::new(IpAddr::V4(ip), 0)).unwrap();
                    sock.connect(addr).await.unwrap().into_std().unwrap()
                })
            }
            None => TcpStream::connect(addr).unwrap(),
        };
        socket.set_nonblocking(false).unwrap();
        socket.set_nodelay(true).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            reader: BufReader::new(socket.try_clone().unwrap()),
            writer: socket,
        }
    }

    /// One complete reply, lines joined with `\n`, without line ends.
    fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let n = self.reader.read_line(&mut line).unwrap();
            assert!(n > 0, "connection closed after {lines:?}");
            let line = line.trim_end().to_owned();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\n");
            }
        }
    }

    fn replies(&mut self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.reply()).collect()
    }

    fn send(&mut self, bytes: &[u8], bytewise: bool) {
        if bytewise {
            for b in bytes {
                self.writer.write_all(&[*b]).unwrap();
            }
        } else {
            self.writer.write_all(bytes).unwrap();
        }
    }

    /// Everything until the relay closes the connection (`Err` kind on a reset).
    fn read_to_end(&mut self) -> (Vec<u8>, Option<std::io::ErrorKind>) {
        let mut got = Vec::new();
        let r = self.reader.read_to_end(&mut got);
        (got, r.err().map(|e| e.kind()))
    }
}

/// `[edge]` with the defaults: the built-in module, the relay's policy, every listener.
fn default_edge(_: &[SocketAddr], _: &Path) -> String {
    "[edge]\n".to_owned()
}

fn swaks(addr: SocketAddr, args: &[&str]) -> (bool, String) {
    require_tool("/usr/bin/swaks", "swaks");
    let out = Command::new("/usr/bin/swaks")
        .args(["--server", &addr.to_string(), "--timeout", "20"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let mut t = String::from_utf8_lossy(&out.stdout).into_owned();
    t.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), t)
}

fn swaks_clear_text(pipeline: bool) {
    let mut relay = EdgeRelay::start(1, |_| String::new(), default_edge);
    let mut args = vec![
        "--ehlo",
        "client.example",
        "--from",
        "alice@corp.example",
        "--to",
        "bob@partner.example,carol@random.example",
        "--header",
        "Subject: edge",
    ];
    if pipeline {
        args.push("--pipeline");
    }
    let (_, transcript) = swaks(relay.listen[0], &args);
    println!("swaks (pipeline {pipeline}):\n{transcript}");
    assert!(
        transcript.contains(&format!("<** {REFUSED}")),
        "the TLS-required recipient is refused as in Envoy:\n{transcript}"
    );
    assert!(
        transcript.contains("Ok: queued as"),
        "the message is accepted for the other recipient:\n{transcript}"
    );
    let m = |n: &str| relay.metric(n).unwrap_or(-1.0);
    assert_eq!(m("altroute_edge_smtp_sessions_total"), 1.0);
    assert_eq!(m("altroute_edge_smtp_recipients_checked_total"), 2.0);
    assert_eq!(m("altroute_edge_smtp_recipients_rejected_total"), 1.0);
    assert_eq!(m("altroute_edge_smtp_rejected_tls_compliance_total"), 1.0);
    assert_eq!(
        m("altroute_edge_connections_total{cluster=\"inbound\"}"),
        1.0
    );
    assert_eq!(
        relay.stop_and_spooled(),
        vec![vec!["carol@random.example".to_string()]],
        "spooled for the opportunistic recipient only"
    );
}

#[test]
fn swaks_clear_text_refuses_only_the_tls_required_recipient() {
    swaks_clear_text(false);
}

#[test]
fn swaks_pipelined_clear_text_refuses_only_the_tls_required_recipient() {
    swaks_clear_text(true);
}

#[test]
fn starttls_session_passes_the_edge_untouched() {
    let ca = TestCa::new("altroute edge test CA").unwrap();
    let ip = altroute_lab::loopback_ip().to_string();
    let cert = ca.issue(&["relay.test", &ip], Validity::Valid).unwrap();
    let mut relay = EdgeRelay::start(
        1,
        |dir| {
            std::fs::write(dir.join("cert.pem"), &cert.chain_pem).unwrap();
            std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
            format!(
                "tls_cert = {:?}\ntls_key = {:?}\n",
                dir.join("cert.pem").display().to_string(),
                dir.join("key.pem").display().to_string()
            )
        },
        default_edge,
    );
    let (ok, transcript) = swaks(
        relay.listen[0],
        &[
            "--tls",
            "--ehlo",
            "client.example",
            "--from",
            "alice@corp.example",
            "--to",
            "bob@partner.example",
        ],
    );
    println!("swaks --tls:\n{transcript}");
    assert!(ok, "swaks failed:\n{transcript}");
    assert!(transcript.contains("=== TLS started"), "{transcript}");
    assert!(
        !transcript.contains("4.7.10"),
        "nothing refused after STARTTLS:\n{transcript}"
    );
    let m = |n: &str| relay.metric(n).unwrap_or(-1.0);
    assert_eq!(m("altroute_edge_smtp_starttls_sessions_total"), 1.0);
    assert_eq!(m("altroute_edge_smtp_recipients_checked_total"), 0.0);
    assert_eq!(
        relay.stop_and_spooled(),
        vec![vec!["bob@partner.example".to_string()]]
    );
}

/// One pipelined transaction with a TLS-required and an opportunistic recipient; a body
/// line that looks like a command.
fn pipelined_transaction(addr: SocketAddr, bytewise: bool) {
    let mut c = Client::connect(addr, None);
    let greeting = c.reply();
    assert!(greeting.contains(" relay.test "), "{greeting:?}");
    c.send(b"EHLO client.example\r\n", bytewise);
    assert!(c.reply().contains("PIPELINING"));
    c.send(
        b"MAIL FROM:<alice@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nRCPT TO:<carol@random.example>\r\nDATA\r\n",
        bytewise,
    );
    let r = c.replies(4);
    assert!(r[0].starts_with("250 "), "MAIL: {r:?}");
    assert_eq!(r[1], REFUSED, "{r:?}");
    assert!(r[2].starts_with("250 "), "opportunistic recipient: {r:?}");
    assert!(r[3].starts_with("354 "), "DATA: {r:?}");
    c.send(
        b"Subject: edge\r\n\r\nRCPT TO:<bob@partner.example>\r\n.\r\nQUIT\r\n",
        bytewise,
    );
    let r = c.replies(2);
    assert!(r[0].starts_with("250 "), "end of data: {r:?}");
    assert!(r[1].starts_with("221 "), "QUIT: {r:?}");
}

#[test]
fn pipelined_and_byte_by_byte_commands_pair_with_their_replies() {
    let mut relay = EdgeRelay::start(1, |_| String::new(), default_edge);
    pipelined_transaction(relay.listen[0], false);
    pipelined_transaction(relay.listen[0], true);
    // REQUIRETLS makes every recipient TLS-required on a clear session. Sent in one
    // write: the relay refuses MAIL ... REQUIRETLS on a clear session (530), and sent
    // byte by byte, that reply could come back before the RCPT was whole, which then
    // went out of any transaction (503 from the relay, also refused) instead of being
    // decided with the MAIL pending (a test that failed under load).
    let mut c = Client::connect(relay.listen[0], None);
    c.reply();
    c.send(b"EHLO c\r\n", false);
    c.reply();
    c.send(
        b"MAIL FROM:<alice@corp.example> REQUIRETLS\r\nRCPT TO:<carol@random.example>\r\nRSET\r\nQUIT\r\n",
        false,
    );
    let r = c.replies(4);
    assert_eq!(
        r[1], "450 4.7.10 TLS required for <carol@random.example>",
        "{r:?}"
    );
    assert!(r[2].starts_with("250") && r[3].starts_with("221"), "{r:?}");
    assert_eq!(
        relay.metric("altroute_edge_smtp_rejected_requiretls_total"),
        Some(1.0)
    );
    let carol = vec!["carol@random.example".to_string()];
    assert_eq!(relay.stop_and_spooled(), vec![carol.clone(), carol]);
}

/// RCPT pipelined after DATA (the first RCPT refused, so the relay refuses DATA and would
/// read the second as a command): the edge module closes the session, nothing is spooled.
#[test]
fn a_client_sending_past_data_before_its_reply_is_closed() {
    let mut relay = EdgeRelay::start(1, |_| String::new(), default_edge);
    let mut c = Client::connect(relay.listen[0], None);
    c.reply();
    c.send(b"EHLO c\r\n", false);
    c.reply();
    c.send(
        b"MAIL FROM:<alice@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nDATA\r\nRCPT TO:<bob@partner.example>\r\nhello\r\n.\r\n",
        false,
    );
    let (rest, _) = c.read_to_end();
    assert!(
        !String::from_utf8_lossy(&rest).contains("250 2.0.0"),
        "a message was accepted: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert_eq!(
        relay.metric_reaching("altroute_edge_smtp_sessions_closed_total", 1.0),
        Some(1.0)
    );
    // Closing on a violation is the module doing its job, not a filter fault (it was
    // counted as one, and logged as "edge filter failed").
    assert_eq!(
        relay
            .metric("altroute_edge_filter_faults_total{stage=\"data\"}")
            .unwrap_or(0.0),
        0.0
    );
    assert!(
        !relay.log().contains("edge filter failed"),
        "{}",
        relay.log()
    );
    assert_eq!(relay.stop_and_spooled(), Vec::<Vec<String>>::new());
}

/// A client that pipelines commands through the edge, never reads a reply and then goes
/// silent with its connection open: once the replies fill its socket, the session behind
/// the edge ends at its command timeout, and the edge gives the connection up too (each
/// write it makes is bounded). Before, the session (and its `max_sessions` slot) stayed
/// for as long as the client liked.
#[test]
fn a_client_that_never_reads_is_let_go_at_the_command_timeout() {
    let relay = EdgeRelay::start(
        1,
        |_| "command_timeout_secs = 1\nsession_timeout_secs = 3600\n".to_owned(),
        default_edge,
    );
    let mut s = TcpStream::connect(relay.listen[0]).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    let batch = b"HELP\r\n".repeat(1000);
    // Until the relay stops reading (its replies fill the socket) or lets go.
    while s.write_all(&batch).is_ok() {}
    // A bound on the test, not a timing assertion: without the write timeouts the
    // session never ends.
    let deadline = Instant::now() + Duration::from_secs(120);
    while relay.metric("altroute_smtp_sessions_active") != Some(0.0) {
        assert!(
            Instant::now() < deadline,
            "the session outlived its timeouts:\n{}",
            relay.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(s);
}

#[test]
fn connection_routing_picks_the_configured_upstream() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink = |name: &str| {
        let bind = SocketAddr::from(([127, 0, 0, 1], 0));
        rt.block_on(SmtpSink::start(SinkConfig::new(bind, name)))
            .unwrap()
    };
    let (sink_a, sink_b) = (sink("sink-a"), sink("sink-b"));
    let (a, b) = (sink_a.addr(), sink_b.addr());
    let source = Ipv4Addr::new(127, 0, 0, 2);
    // Listeners: 0 main, 1 routed to sink_b by port, 2 routed to a cluster that is not
    // configured, 3 not guarded by the edge (its route is never asked).
    let mut relay = EdgeRelay::start(
        4,
        |_| String::new(),
        |l, _| {
            let compiled =
                altroute_policy::compile(&std::fs::read_to_string(policy_file()).unwrap())
                    .map_err(|_| "policy")
                    .unwrap();
            let config = format!(
                r#"{{"policy": {}, "connection_routes": [
                    {{"destination_port": {}, "cluster": "sink_b"}},
                    {{"destination_port": {}, "cluster": "nowhere"}},
                    {{"destination_port": {}, "cluster": "sink_b"}},
                    {{"source_ip": "{source}", "cluster": "sink_a"}}]}}"#,
                compiled.json,
                l[1].port(),
                l[2].port(),
                l[3].port()
            );
            format!(
                "[edge]\nlisteners = [\"{}\", \"{}\", \"{}\"]\nconfiguration = '''{}'''\n[edge.clusters]\nsink_a = \"{a}\"\nsink_b = \"{b}\"\n",
                l[0],
                l[1],
                l[2],
                config.replace('\n', " ")
            )
        },
    );
    let greet = |addr: SocketAddr, from: Option<Ipv4Addr>| Client::connect(addr, from).reply();
    assert!(greet(relay.listen[0], None).contains(" relay.test "));
    assert!(greet(relay.listen[1], None).contains(" sink-b "), "by port");
    assert!(
        greet(relay.listen[0], Some(source)).contains(" sink-a "),
        "by source address"
    );
    assert!(
        greet(relay.listen[3], None).contains(" relay.test "),
        "a listener without the edge"
    );
    let (got, _) = Client::connect(relay.listen[2], None).read_to_end();
    assert!(got.is_empty(), "unknown cluster: closed: {got:?}");

    // The proxied upstream gets the same enforcement.
    let mut c = Client::connect(relay.listen[1], None);
    c.reply();
    c.send(
        b"HELO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<bob@partner.example>\r\nRCPT TO:<carol@random.example>\r\nDATA\r\n",
        false,
    );
    let r = c.replies(5);
    assert_eq!(r[2], REFUSED, "{r:?}");
    assert!(r[4].starts_with("354"), "{r:?}");
    c.send(b"Subject: x\r\n\r\nhi\r\n.\r\nQUIT\r\n", false);
    let r = c.replies(2);
    assert!(r[0].starts_with("250") && r[1].starts_with("221"), "{r:?}");
    let messages = rt
        .block_on(sink_b.wait_for_messages(1, Duration::from_secs(20)))
        .unwrap();
    assert_eq!(
        messages[0].rcpt_to,
        vec!["carol@random.example".to_string()]
    );
    let commands: Vec<String> = sink_b
        .sessions()
        .into_iter()
        .flat_map(|s| s.commands)
        .collect();
    assert!(commands.iter().any(|c| c == "NOOP"), "{commands:?}");
    assert!(
        !commands.iter().any(|c| c.contains("partner.example")),
        "the refused RCPT reached the upstream: {commands:?}"
    );
    assert!(sink_a.messages().is_empty());

    let m = |n: &str| relay.metric(n).unwrap_or(-1.0);
    assert_eq!(
        m("altroute_edge_connections_total{cluster=\"sink_b\"}"),
        2.0
    );
    assert_eq!(
        m("altroute_edge_connections_total{cluster=\"sink_a\"}"),
        1.0
    );
    assert_eq!(
        m("altroute_edge_connections_total{cluster=\"unknown\"}"),
        1.0
    );
    assert_eq!(m("altroute_edge_connections_routed_total"), 4.0);
    assert!(
        relay.log().contains("not configured"),
        "the unknown cluster is logged:\n{}",
        relay.log()
    );
    relay.stop_and_spooled();
}

/// Behind a proxy (`server.proxy_protocol_from`), the PROXY header is read before the
/// edge sees a byte, and the module's `source.address` is the client's from the header:
/// a connection route by source IP picks its cluster, and the relay's own session behind
/// the edge checks the client's address, not the proxy's.
#[test]
fn the_edge_sees_the_client_of_the_proxy_header() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let sink_a = rt
        .block_on(SmtpSink::start(SinkConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            "sink-a",
        )))
        .unwrap();
    let a = sink_a.addr();
    let proxy = Ipv4Addr::new(127, 0, 0, 3);
    let mut relay = EdgeRelay::start(
        1,
        |_| format!("proxy_protocol_from = [\"{proxy}/32\"]\n"),
        |_, _| {
            let compiled =
                altroute_policy::compile(&std::fs::read_to_string(policy_file()).unwrap())
                    .map_err(|_| "policy")
                    .unwrap();
            let config = format!(
                r#"{{"policy": {}, "connection_routes": [{{"source_ip": "192.0.2.7", "cluster": "sink_a"}}]}}"#,
                compiled.json
            );
            format!(
                "[edge]\nconfiguration = '''{}'''\n[edge.clusters]\nsink_a = \"{a}\"\n",
                config.replace('\n', " ")
            )
        },
    );
    let listen = relay.listen[0];
    let proxied = |client: &str| {
        let mut c = Client::connect(listen, Some(proxy));
        c.send(
            format!("PROXY TCP4 {client} {} 40000 25\r\n", listen.ip()).as_bytes(),
            false,
        );
        c
    };
    // Routed by the client's address in the header.
    assert!(proxied("192.0.2.7").reply().contains(" sink-a "));
    // Another client goes to the relay's own server, which checks that client: outside
    // allow_networks (loopback), although the proxy's address is loopback.
    let mut c = proxied("192.0.2.8");
    assert!(c.reply().contains(" relay.test "));
    c.send(
        b"HELO c\r\nMAIL FROM:<a@corp.example>\r\nRCPT TO:<carol@random.example>\r\nQUIT\r\n",
        false,
    );
    let r = c.replies(4);
    assert!(r[2].starts_with("550 5.7.1"), "{r:?}");
    // The proxy without a header: closed before the edge or the server saw a byte.
    let mut c = Client::connect(listen, Some(proxy));
    c.send(b"EHLO c\r\n", false);
    let (got, _) = c.read_to_end();
    assert!(got.is_empty(), "{got:?}");

    let m = |n: &str| relay.metric_reaching(n, 1.0).unwrap_or(-1.0);
    assert_eq!(
        m("altroute_edge_connections_total{cluster=\"sink_a\"}"),
        1.0
    );
    assert_eq!(
        m("altroute_edge_connections_total{cluster=\"inbound\"}"),
        1.0
    );
    assert_eq!(
        m("altroute_smtp_proxy_protocol_errors_total{reason=\"invalid\"}"),
        1.0
    );
    assert_eq!(
        m("altroute_recipients_rejected_total{reason=\"relay_denied\"}"),
        1.0
    );
    relay.stop_and_spooled();
}

/// A proxy-wasm stream module whose `proxy_on_new_connection`, `proxy_on_downstream_data`
/// and `proxy_on_upstream_data` bodies are given (each leaves an i32: 0 continue, 1
/// pause, or traps); everything else is a well-behaved minimum.
fn stream_module((new_connection, downstream, upstream): (&str, &str, &str)) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (memory (export "memory") 2)
  (global $top (mut i32) (i32.const 4096))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $top))
    (global.set $top (i32.add (global.get $top) (i32.add (local.get $n) (i32.const 8))))
    (local.get $p))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_new_connection") (param i32) (result i32) {new_connection})
  (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32) {downstream})
  (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32) {upstream})
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_delete") (param i32)))"#
    ))
    .unwrap()
}

/// A proxy-wasm module that configures fine and traps (`unreachable`) on every new
/// connection and every read: a module with a bug.
const TRAPPING_MODULE: (&str, &str, &str) = ("unreachable", "unreachable", "unreachable");

#[test]
fn a_trapping_module_fails_closed() {
    let mut relay = EdgeRelay::start(
        1,
        |_| String::new(),
        |_, dir| {
            let path: PathBuf = dir.join("trap.wasm");
            std::fs::write(&path, stream_module(TRAPPING_MODULE)).unwrap();
            format!(
                "[edge]\nmodule = {:?}\nconfiguration = \"{{}}\"\n",
                path.display().to_string()
            )
        },
    );
    for attempt in 1..=3 {
        let mut c = Client::connect(relay.listen[0], None);
        let (got, err) = c.read_to_end();
        println!(
            "connection {attempt}: {} bytes, then {}",
            got.len(),
            err.map_or("EOF".to_string(), |k| format!("{k:?}"))
        );
        assert!(got.is_empty(), "no greeting may pass: {got:?}");
        assert!(
            err.is_none() || err == Some(std::io::ErrorKind::ConnectionReset),
            "closed, not left hanging: {err:?}"
        );
    }
    assert_eq!(
        relay.metric("altroute_edge_filter_faults_total{stage=\"new_connection\"}"),
        Some(3.0)
    );
    let log = relay.log();
    assert!(
        log.contains("edge filter failed on the new connection"),
        "{log}"
    );
    assert!(relay.stop_and_spooled().is_empty());
}

/// Lets connections and server bytes through, traps on the first client bytes.
const TRAPPING_ON_DATA_MODULE: (&str, &str, &str) =
    ("(i32.const 0)", "unreachable", "(i32.const 0)");

#[test]
fn a_module_trapping_on_client_data_closes_the_session() {
    let mut relay = EdgeRelay::start(
        1,
        |_| String::new(),
        |_, dir| {
            let path: PathBuf = dir.join("trap-data.wasm");
            std::fs::write(&path, stream_module(TRAPPING_ON_DATA_MODULE)).unwrap();
            format!(
                "[edge]\nmodule = {:?}\nconfiguration = \"{{}}\"\n",
                path.display().to_string()
            )
        },
    );
    let mut c = Client::connect(relay.listen[0], None);
    let greeting = c.reply();
    assert!(greeting.contains(" relay.test "), "{greeting:?}");
    c.send(b"EHLO client.example\r\n", false);
    let (got, err) = c.read_to_end();
    println!(
        "after EHLO: {} bytes, then {}",
        got.len(),
        err.map_or("EOF".to_string(), |k| format!("{k:?}"))
    );
    assert!(
        got.is_empty(),
        "no reply to the unfiltered command: {got:?}"
    );
    // The relay counts the fault after the failed call closed the connection.
    assert_eq!(
        relay.metric_reaching("altroute_edge_filter_faults_total{stage=\"data\"}", 1.0),
        Some(1.0)
    );
    assert!(relay.stop_and_spooled().is_empty());
}

/// Pauses on every client read: asks the host to hold the bytes back for ever.
const PAUSING_MODULE: (&str, &str, &str) = ("(i32.const 0)", "(i32.const 1)", "(i32.const 0)");

/// A module that holds the client's bytes back for ever (Pause on every read) does not
/// make the relay buffer without end: past 1 MiB the session ends as a filter failure.
#[test]
fn a_module_that_never_lets_bytes_go_is_cut_off() {
    let mut relay = EdgeRelay::start(
        1,
        |_| String::new(),
        |_, dir| {
            let path: PathBuf = dir.join("pause.wasm");
            std::fs::write(&path, stream_module(PAUSING_MODULE)).unwrap();
            format!(
                "[edge]\nmodule = {:?}\nconfiguration = \"{{}}\"\n",
                path.display().to_string()
            )
        },
    );
    let mut c = Client::connect(relay.listen[0], None);
    assert!(c.reply().contains(" relay.test "));
    // 2 MiB of one endless line; the relay must stop reading and close.
    c.writer
        .set_write_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let chunk = vec![b'x'; 64 << 10];
    let mut sent = 0;
    while sent < (2 << 20) {
        if std::io::Write::write_all(&mut c.writer, &chunk).is_err() {
            break;
        }
        sent += chunk.len();
    }
    let (got, _) = c.read_to_end();
    assert!(got.is_empty(), "{got:?}");
    assert_eq!(
        relay.metric_reaching("altroute_edge_filter_faults_total{stage=\"data\"}", 1.0),
        Some(1.0)
    );
    assert!(
        relay.log().contains("held back more than"),
        "{}",
        relay.log()
    );
    assert!(relay.stop_and_spooled().is_empty());
}

#[test]
fn the_edge_follows_a_policy_hot_reload() {
    const TOKEN: &str = "edge-reload-token";
    // The token line lands in `[admin]`, which the generated configuration ends with.
    let mut relay = EdgeRelay::start(
        1,
        |_| String::new(),
        // The edge's memory cap is lower than the relay's: a big policy fits the relay
        // and not the edge.
        |_, _| format!("token = \"{TOKEN}\"\n[edge]\nmemory_limit_mb = 16\n"),
    );
    let args = [
        "--ehlo",
        "client.example",
        "--from",
        "alice@corp.example",
        "--to",
        "bob@partner.example,carol@random.example",
    ];
    let (_, before) = swaks(relay.listen[0], &args);
    assert!(before.contains(&format!("<** {REFUSED}")), "{before}");

    // The same policy with partner.example's rule moved to another domain.
    let text = std::fs::read_to_string(policy_file())
        .unwrap()
        .replace("partner.example", "partner-moved.example");
    let apply = |name: &str, text: &str| {
        let file = relay.dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_altroute"))
            .args(["policy", "apply"])
            .arg(&file)
            .args([
                "--admin",
                &format!("http://{}", relay.admin),
                "--token",
                TOKEN,
            ])
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (ok, out) = apply("relaxed.toml", &text);
    assert!(ok, "apply: {out}");
    // The edge is part of the activation: it serves the new policy once the apply
    // answers.
    assert!(
        relay.log().contains("edge filter: now on the new policy"),
        "{}",
        relay.log()
    );
    let (_, after) = swaks(relay.listen[0], &args);
    assert!(
        !after.contains("4.7.10"),
        "after the reload partner.example is opportunistic at the edge too:\n{after}"
    );

    // A policy the edge cannot load (over its memory cap) is refused as a whole: the
    // relay does not activate it either, and the audit log says why. An audit saw the
    // relay activate it while the edge kept the laxer policy, and a clear-text session
    // delivered to a recipient the active policy required TLS for.
    let mut big = std::fs::read_to_string(policy_file()).unwrap();
    for i in 0..50_000 {
        big.push_str(&format!(
            "\n[[tls_compliance]]\nname = \"r{i}\"\ndomains = [\"d{i}.example\", \"*.w{i}.example\"]\n"
        ));
    }
    let (ok, out) = apply("big.toml", &big);
    assert!(!ok, "the edge's refusal must refuse the candidate: {out}");
    assert!(out.contains("the edge filter refuses it"), "{out}");
    let (_, still) = swaks(relay.listen[0], &args);
    assert!(!still.contains("4.7.10"), "{still}");
    let audit = std::fs::read_to_string(relay.dir.path().join("spool/audit.jsonl")).unwrap();
    let last = audit.lines().last().unwrap();
    assert!(
        last.contains("\"reject\"") && last.contains("edge filter refuses"),
        "{last}"
    );
    assert_eq!(
        relay.stop_and_spooled(),
        vec![
            vec![
                "bob@partner.example".to_string(),
                "carol@random.example".to_string()
            ],
            vec![
                "bob@partner.example".to_string(),
                "carol@random.example".to_string()
            ],
            vec!["carol@random.example".to_string()],
        ],
    );
}
