//! The SMTP edge filter (the policy module's stream face) through altroute's proxy-wasm
//! host: one whole SMTP session, and one 16 KiB read of a message body (text, and base64
//! as attachments are), next to the no-op module `bench/noop-stream.wat` in the same run
//! (the host's own cost for the same callbacks: the floor under any module). p50 / p99.
//!
//! `bash bench/stream.sh` runs it in release mode and prints a Markdown table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use altroute_policy::{compile, fixtures};
use proxy_wasm_host::{ConnectionInfo, Host, HostConfig, Plugin, PluginSpec};

const SAMPLES: usize = 20_000;

/// One session as Postfix's smtp-source runs it (one message of about 1 KiB, no
/// pipelining), each read as one callback, client and server alternating.
const SESSION: &[(bool, &[u8])] = &[
    (false, b"220 sink.example ESMTP\r\n"),
    (true, b"EHLO client.example\r\n"),
    (
        false,
        b"250-sink.example\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 10240000\r\n",
    ),
    (true, b"MAIL FROM:<bench@client.example>\r\n"),
    (false, b"250 2.1.0 Ok\r\n"),
    (true, b"RCPT TO:<rcpt@random.example>\r\n"),
    (false, b"250 2.1.5 Ok\r\n"),
    (true, b"DATA\r\n"),
    (false, b"354 End data with <CR><LF>.<CR><LF>\r\n"),
    (true, MESSAGE),
    (false, b"250 2.0.0 Ok: queued\r\n"),
    (true, b"QUIT\r\n"),
    (false, b"221 2.0.0 Bye\r\n"),
];

const MESSAGE: &[u8] = b"From: <bench@client.example>\r\nTo: <rcpt@random.example>\r\n\
Subject: benchmark\r\n\r\n\
Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor.\r\n\
Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip.\r\n\
Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu.\r\n\
Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt.\r\n\
Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor.\r\n\
Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip.\r\n\
Duis aute irure dolor in reprehenderit in voluptate velit esse cillum dolore eu.\r\n\
Excepteur sint occaecat cupidatat non proident, sunt in culpa qui officia deserunt.\r\n\
Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor.\r\n\
Ut enim ad minim veniam, quis nostrud exercitation ullamco laboris nisi ut aliquip.\r\n\
..a dot-stuffed line\r\n.\r\n";

fn percentiles(mut v: Vec<Duration>) -> (Duration, Duration) {
    v.sort();
    let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)];
    (at(0.50), at(0.99))
}

fn us(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e6)
}

fn session(plugin: &Plugin) {
    let mut s = plugin
        .stream(ConnectionInfo::default())
        .expect("stream opens");
    for (client, bytes) in SESSION {
        let out = if *client {
            s.downstream(bytes, false)
        } else {
            s.upstream(bytes, false)
        };
        black_box(out.expect("callback runs"));
    }
    s.close().expect("stream closes");
}

/// A body read of `chunk`, repeated inside one message (the stream is left in DATA).
fn body_reads(plugin: &Plugin, chunk: &[u8]) -> Vec<Duration> {
    let mut s = plugin
        .stream(ConnectionInfo::default())
        .expect("stream opens");
    // Everything before the message: the session then expects message bytes.
    let before_body = SESSION
        .iter()
        .position(|(_, bytes)| *bytes == MESSAGE)
        .expect("the session carries a message");
    for (client, bytes) in &SESSION[..before_body] {
        let out = if *client {
            s.downstream(bytes, false)
        } else {
            s.upstream(bytes, false)
        };
        black_box(out.expect("callback runs"));
    }
    (0..SAMPLES)
        .map(|_| {
            let t = Instant::now();
            black_box(
                s.downstream(black_box(chunk), false)
                    .expect("callback runs"),
            );
            t.elapsed()
        })
        .collect()
}

fn lines(line: &[u8], size: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(size);
    while v.len() + line.len() <= size {
        v.extend_from_slice(line);
    }
    v
}

fn main() {
    let compiled = compile(fixtures::TABLE[0].1).expect("table policy compiles");
    let host = Host::new(HostConfig::default()).expect("host");
    let module: Vec<u8> = match std::env::var_os("BENCH_MODULE") {
        Some(p) => std::fs::read(p).expect("module"),
        None => altroute_modules::POLICY.to_vec(),
    };
    let noop_wat = concat!(env!("CARGO_MANIFEST_DIR"), "/../bench/noop-stream.wat");
    let noop = wat::parse_file(noop_wat).expect("bench/noop-stream.wat compiles");
    let filter = host
        .load(PluginSpec::new(module, "altroute.smtp").plugin_config(compiled.json.into_bytes()))
        .expect("policy module loads");
    let floor = host
        .load(PluginSpec::new(noop, "noop"))
        .expect("no-op module loads");

    let text = lines(
        b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. Sed do eiusmod tempor.\r\n",
        16 << 10,
    );
    let base64 = lines(
        b"TG9yZW0gaXBzdW0gZG9sb3Igc2l0IGFtZXQsIGNvbnNlY3RldHVyIGFkaXBpc2NpbmcgZWxpdC4g\r\n",
        16 << 10,
    );

    let mut rows = Vec::new();
    for (name, plugin) in [("policy module", &filter), ("no-op module", &floor)] {
        for _ in 0..2_000 {
            session(plugin);
        }
        let sessions = (0..SAMPLES)
            .map(|_| {
                let t = Instant::now();
                session(plugin);
                t.elapsed()
            })
            .collect();
        rows.push((
            name,
            "one SMTP session (13 reads, 1 KiB message)",
            percentiles(sessions),
        ));
        rows.push((
            name,
            "a 16 KiB read of a text body",
            percentiles(body_reads(plugin, &text)),
        ));
        rows.push((
            name,
            "a 16 KiB read of a base64 body",
            percentiles(body_reads(plugin, &base64)),
        ));
    }

    println!("| module | what | p50 µs | p99 µs | p50 / no-op |");
    println!("|---|---|---|---|---|");
    // The first half of the rows is the policy module, the second the no-op module, in
    // the same order.
    let n = rows.len() / 2;
    for (i, (name, what, (p50, p99))) in rows.iter().enumerate() {
        let floor_p50 = rows[n + i % n].2.0;
        println!(
            "| {name} | {what} | {} | {} | {:.2}x |",
            us(*p50),
            us(*p99),
            p50.as_secs_f64() / floor_p50.as_secs_f64()
        );
    }
}
