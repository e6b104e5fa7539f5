//! STARTTLS on the server: injection, state reset, client certificates, AUTH.

use base64_free::b64;
use rustls_pki_types::ServerName;
use tokio_rustls::TlsConnector;

use crate::common::{Memory, Pki, Raw, config, spawn_server};

/// Minimal base64 for the AUTH test (the crate under test decodes; the test
/// encodes independently).
mod base64_free {
    pub fn b64(input: &[u8]) -> String {
        const T: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut out = String::new();
        for chunk in input.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                } else {
                    out.push('=');
                }
            }
        }
        out
    }
}

async fn upgrade(
    raw: Raw,
    tls: std::sync::Arc<rustls::ClientConfig>,
) -> Raw<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let (stream, leftover) = raw.into_inner();
    assert!(
        leftover.is_empty(),
        "server sent bytes after 220: {leftover:?}"
    );
    let name = ServerName::try_from("mx.test").unwrap();
    let tls = TlsConnector::from(tls).connect(name, stream).await.unwrap();
    Raw::wrap(tls)
}

#[tokio::test]
async fn starttls_injection_is_discarded_and_state_reset() {
    let pki = Pki::new("Test CA");
    let leaf = pki.leaf(&["mx.test"], false, false);
    let mut c = config();
    c.tls = Some(pki.server_tls(&leaf));
    let handler = Memory::new(true);
    let srv = spawn_server(c, handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    let ehlo = raw.cmd("EHLO client.test", "250").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("REQUIRETLS"),
        "{ehlo}"
    );
    raw.cmd("MAIL FROM:<before@src.test>", "250").await;
    // Injected commands in the same packet as STARTTLS.
    raw.send(b"STARTTLS\r\nRSET\r\nEHLO injected\r\nMAIL FROM:<evil@src.test>\r\n")
        .await;
    let r = raw.reply().await;
    assert!(r.starts_with("220 2.0.0"), "{r}");
    let mut tls = upgrade(raw, pki.client_tls(None)).await;
    // First reply inside TLS answers our command, not the injected ones, and
    // HELO plus the pre-TLS envelope are gone.
    tls.cmd("MAIL FROM:<a@src.test>", "503 5.5.1").await;
    let ehlo = tls.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("REQUIRETLS"), "{ehlo}");
    assert!(!ehlo.contains("STARTTLS"), "{ehlo}");
    tls.cmd("STARTTLS", "503 5.5.1").await;
    tls.cmd("MAIL FROM:<a@src.test> REQUIRETLS", "250").await;
    tls.cmd("RCPT TO:<b@dst.test>", "250").await;
    tls.cmd("DATA", "354").await;
    tls.send(b"Subject: x\r\n\r\nhi\r\n.\r\n").await;
    assert!(tls.reply().await.starts_with("250 2.0.0"));
    tls.cmd("QUIT", "221").await;
    let stored = handler.messages();
    assert_eq!(stored.len(), 1);
    assert!(stored[0].envelope.requiretls);
    assert_eq!(stored[0].envelope.mail_from, "a@src.test");
    assert_eq!(stored[0].session.helo.as_deref(), Some("client.test"));
}

#[tokio::test]
async fn starttls_with_client_certificate() {
    let pki = Pki::new("Test CA");
    let leaf = pki.leaf(&["mx.test"], false, false);
    let client_leaf = pki.leaf(&["client.test"], false, true);
    let mut c = config();
    c.tls = Some(pki.server_tls(&leaf));
    // Not open to loopback: only the client certificate allows relaying.
    let handler = Memory::new(false);
    let srv = spawn_server(c, handler.clone()).await;

    // Without a certificate: TLS works, relaying does not.
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("STARTTLS", "220").await;
    let mut tls = upgrade(raw, pki.client_tls(None)).await;
    tls.cmd("EHLO client.test", "250").await;
    tls.cmd("MAIL FROM:<a@src.test>", "250").await;
    tls.cmd("RCPT TO:<b@dst.test>", "550 5.7.1").await;

    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("STARTTLS", "220").await;
    let mut tls = upgrade(raw, pki.client_tls(Some(&client_leaf))).await;
    tls.cmd("EHLO client.test", "250").await;
    tls.cmd("MAIL FROM:<a@src.test>", "250").await;
    tls.cmd("RCPT TO:<b@dst.test>", "250").await;
    tls.cmd("DATA", "354").await;
    tls.send(b"Subject: cert\r\n\r\nbody\r\n.\r\n").await;
    assert!(tls.reply().await.starts_with("250"));
    let stored = handler.messages();
    assert_eq!(stored.len(), 1);
    let info = stored[0].session.tls.clone().expect("TLS info");
    assert_eq!(info.client_cert_der, Some(client_leaf.der()));
    assert_eq!(info.sni.as_deref(), Some("mx.test"));
    assert_eq!(info.version, Some(rustls::ProtocolVersion::TLSv1_3));
    assert!(info.cipher.is_some());
}

#[tokio::test]
async fn auth_only_over_tls() {
    let pki = Pki::new("Test CA");
    let leaf = pki.leaf(&["mx.test"], false, false);
    let mut c = config();
    c.tls = Some(pki.server_tls(&leaf));
    c.auth = true;
    let handler = Memory::new(false);
    let srv = spawn_server(c, handler.clone()).await;
    let mut raw = Raw::connect(srv.addr).await;
    let ehlo = raw.cmd("EHLO client.test", "250").await;
    assert!(!ehlo.contains("AUTH"), "AUTH offered in clear text: {ehlo}");
    let plain = b64(b"\0alice\0secret");
    raw.cmd(&format!("AUTH PLAIN {plain}"), "538 5.7.11").await;
    raw.cmd("STARTTLS", "220").await;
    let mut tls = upgrade(raw, pki.client_tls(None)).await;
    let ehlo = tls.cmd("EHLO client.test", "250").await;
    assert!(ehlo.contains("AUTH PLAIN LOGIN"), "{ehlo}");
    tls.cmd(
        &format!("AUTH PLAIN {}", b64(b"\0alice\0wrong")),
        "535 5.7.8",
    )
    .await;
    // A long password (RFC 4954: exchange lines of up to 12,288 octets) is read and
    // checked, not refused as a line too long (an audit's 400-byte password could not
    // log in at all).
    tls.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    tls.cmd(&b64(b"alice"), "334 UGFzc3dvcmQ6").await;
    tls.cmd(&b64(&[b'p'; 2000]), "535 5.7.8").await;
    tls.cmd("AUTH LOGIN", "334 VXNlcm5hbWU6").await;
    tls.cmd(&b64(b"alice"), "334 UGFzc3dvcmQ6").await;
    tls.cmd(&b64(b"secret"), "235 2.7.0").await;
    tls.cmd("MAIL FROM:<a@src.test>", "250").await;
    tls.cmd("RCPT TO:<b@dst.test>", "250").await;
    tls.cmd("DATA", "354").await;
    tls.send(b"Subject: auth\r\n\r\nbody\r\n.\r\n").await;
    assert!(tls.reply().await.starts_with("250"));
    assert_eq!(handler.messages()[0].session.auth.as_deref(), Some("alice"));
    // AUTH PLAIN with a continuation line.
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("STARTTLS", "220").await;
    let mut tls = upgrade(raw, pki.client_tls(None)).await;
    tls.cmd("EHLO client.test", "250").await;
    tls.cmd("AUTH PLAIN", "334").await;
    tls.cmd(&plain, "235 2.7.0").await;
    tls.cmd("AUTH PLAIN", "503 5.5.1").await;

    // An authzid other than the user's own is refused (it was ignored), and every AUTH
    // that fails counts as an error of the session, cancelled or unknown ones too (an
    // audit's 60 of those kept a session open).
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("STARTTLS", "220").await;
    let mut tls = upgrade(raw, pki.client_tls(None)).await;
    tls.cmd("EHLO client.test", "250").await;
    tls.cmd(
        &format!("AUTH PLAIN {}", b64(b"bob\0alice\0secret")),
        "535 5.7.8",
    )
    .await;
    tls.cmd(
        &format!("AUTH PLAIN {}", b64(b"alice\0alice\0secret")),
        "235 2.7.0",
    )
    .await;
    let mut raw = Raw::connect(srv.addr).await;
    raw.cmd("EHLO client.test", "250").await;
    raw.cmd("STARTTLS", "220").await;
    let mut tls = upgrade(raw, pki.client_tls(None)).await;
    tls.cmd("EHLO client.test", "250").await;
    let mut closed = false;
    for _ in 0..40 {
        tls.send(b"AUTH CRAM-MD5\r\n").await;
        let reply = tls.reply().await;
        if reply.starts_with("421") {
            closed = true;
            break;
        }
        assert!(reply.starts_with("504"), "{reply}");
    }
    assert!(
        closed,
        "40 failed AUTH commands and the session is still open"
    );
}
