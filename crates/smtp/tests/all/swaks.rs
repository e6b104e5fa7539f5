//! Interop with Debian's swaks: an SMTP client nobody here wrote.

use std::process::Output;

use tokio::process::Command;

use crate::common::{Memory, Pki, config, spawn_server};

/// Body with dot lines, an empty line and 8-bit text, CRLF line ends.
const BODY: &[u8] = b"From: a@src.test\r\nTo: b@dst.test\r\nSubject: swaks interop\r\n\r\n.one leading dot\r\n..two leading dots\r\n.\r\n\r\nlast line \xc3\xa9\r\n";

async fn swaks(args: &[&str]) -> Output {
    match Command::new("swaks").args(args).output().await {
        Ok(out) => out,
        Err(e) => panic!(
            "cannot run swaks ({e}): install it with `apt-get install -y swaks libnet-ssleay-perl libio-socket-ssl-perl`"
        ),
    }
}

#[tokio::test]
async fn swaks_plain_tls_pipeline() {
    let pki = Pki::new("Test CA");
    let leaf = pki.leaf(&["mx.test"], false, false);
    let mut c = config();
    c.tls = Some(pki.server_tls(&leaf));
    let handler = Memory::new(true);
    let srv = spawn_server(c, handler.clone()).await;
    let dir = std::env::temp_dir().join(format!("altroute-smtp-swaks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body_path = dir.join("body.eml");
    // swaks always sends "<data>\r\n.\r\n", so the file leaves out the final
    // CRLF that the received message must end with.
    std::fs::write(&body_path, BODY.strip_suffix(b"\r\n").unwrap()).unwrap();
    let data_arg = format!("@{}", body_path.display());
    let server = srv.addr.to_string();
    // (mode, extra swaks flags)
    let modes: [(&str, &[&str]); 3] = [
        ("plain", &[]),
        ("tls", &["--tls"]),
        ("pipeline", &["--pipeline", "--tls"]),
    ];
    for (i, (mode, extra)) in modes.iter().enumerate() {
        let mut args = vec![
            "--server",
            server.as_str(),
            "--helo",
            "client.test",
            "--from",
            "a@src.test",
            "--to",
            "b@dst.test",
            "--data",
            data_arg.as_str(),
            "--timeout",
            "30",
        ];
        args.extend_from_slice(extra);
        let out = swaks(&args).await;
        let transcript = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{mode}: swaks failed: {transcript}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stored = handler.messages();
        assert_eq!(stored.len(), i + 1, "{mode}: {transcript}");
        let got = &stored[i];
        assert_eq!(
            got.message,
            BODY,
            "{mode}: body differs:\n{:?}",
            String::from_utf8_lossy(&got.message)
        );
        assert_eq!(got.envelope.rcpt_to, vec!["b@dst.test".to_string()]);
        assert_eq!(got.session.tls.is_some(), *mode != "plain", "{mode}");
        if *mode == "pipeline" {
            assert!(transcript.contains("PIPELINING"), "{transcript}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}
