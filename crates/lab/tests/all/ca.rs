//! TestCa: issued certificates verify (or fail) the way a real TLS client sees them.

use std::process::Command;
use std::sync::Arc;

use altroute_lab::{TestCa, Validity};
use rustls::{CertificateError, Error};
use rustls_pki_types::{ServerName, UnixTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn verify(ca: &TestCa, cert: &altroute_lab::Issued, name: &str) -> Result<(), Error> {
    let verifier = ca.rustls_server_verifier().unwrap();
    let name = ServerName::try_from(name.to_owned()).unwrap();
    verifier
        .verify_server_cert(&cert.cert_der, &[], &name, &[], UnixTime::now())
        .map(|_| ())
}

#[test]
fn valid_certificate_verifies_for_each_of_its_names() {
    let ca = TestCa::new("lab root").unwrap();
    let cert = ca
        .issue(&["mx1.example.test", "127.0.0.1"], Validity::Valid)
        .unwrap();
    verify(&ca, &cert, "mx1.example.test").unwrap();
    verify(&ca, &cert, "127.0.0.1").unwrap();
}

#[test]
fn expired_certificate_fails_as_expired() {
    let ca = TestCa::new("lab root").unwrap();
    let cert = ca.issue(&["mx1.example.test"], Validity::Expired).unwrap();
    let err = verify(&ca, &cert, "mx1.example.test").unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::Expired | CertificateError::ExpiredContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn not_yet_valid_certificate_fails_as_not_valid_yet() {
    let ca = TestCa::new("lab root").unwrap();
    let cert = ca
        .issue(&["mx1.example.test"], Validity::NotYetValid)
        .unwrap();
    let err = verify(&ca, &cert, "mx1.example.test").unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn wrong_name_fails_as_not_valid_for_name() {
    let ca = TestCa::new("lab root").unwrap();
    let cert = ca.issue(&["mx1.example.test"], Validity::Valid).unwrap();
    let err = verify(&ca, &cert, "mx2.example.test").unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. }
            )
        ),
        "{err:?}"
    );
}

#[test]
fn certificate_from_another_ca_is_unknown_issuer() {
    let trusted = TestCa::new("trusted root").unwrap();
    let rogue = TestCa::new("rogue root").unwrap();
    let cert = rogue.issue(&["mx1.example.test"], Validity::Valid).unwrap();
    let err = verify(&trusted, &cert, "mx1.example.test").unwrap_err();
    assert_eq!(
        err,
        Error::InvalidCertificate(CertificateError::UnknownIssuer)
    );
}

#[test]
fn pem_output_is_accepted_by_openssl() {
    let ca = TestCa::new("lab root").unwrap();
    let cert = ca.issue(&["mx1.example.test"], Validity::Valid).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root.pem");
    let leaf = dir.path().join("leaf.pem");
    let key = dir.path().join("leaf.key");
    std::fs::write(&root, ca.root_pem()).unwrap();
    std::fs::write(&leaf, &cert.chain_pem).unwrap();
    std::fs::write(&key, &cert.key_pem).unwrap();
    let out = Command::new("openssl")
        .arg("verify")
        .arg("-CAfile")
        .arg(&root)
        .arg("-verify_hostname")
        .arg("mx1.example.test")
        .arg(&leaf)
        .output()
        .expect("openssl not found: apt-get install openssl");
    assert!(
        out.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The key must match the certificate: compare their public keys.
    let pub_of = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let from_cert = pub_of(&["x509", "-noout", "-pubkey", "-in", leaf.to_str().unwrap()]);
    let from_key = pub_of(&["pkey", "-pubout", "-in", key.to_str().unwrap()]);
    assert_eq!(from_cert, from_key);
}

/// Runs a TLS handshake over an in-memory pipe and echoes one byte; returns the
/// client's error, if any, and the client certificate the server saw.
async fn handshake(
    server: Arc<rustls::ServerConfig>,
    client: Arc<rustls::ClientConfig>,
    name: &str,
) -> (Result<(), std::io::Error>, Option<usize>) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_task = tokio::spawn(async move {
        let mut tls = TlsAcceptor::from(server).accept(b).await.ok()?;
        let seen = tls.get_ref().1.peer_certificates().map(<[_]>::len);
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await.ok()?;
        tls.write_all(&byte).await.ok()?;
        tls.flush().await.ok()?;
        Some(seen)
    });
    let name = ServerName::try_from(name.to_owned()).unwrap();
    let result = async {
        let mut tls = TlsConnector::from(client).connect(name, a).await?;
        tls.write_all(b"x").await?;
        tls.flush().await?;
        let mut byte = [0u8; 1];
        tls.read_exact(&mut byte).await?;
        Ok(())
    }
    .await;
    let seen = server_task.await.unwrap().flatten();
    (result, seen)
}

#[tokio::test]
async fn mutual_tls_accepts_a_client_certificate_from_the_client_ca() {
    let server_ca = TestCa::new("server root").unwrap();
    let client_ca = TestCa::new("client root").unwrap();
    let server_cert = server_ca
        .issue(&["relay.example.test"], Validity::Valid)
        .unwrap();
    let client_cert = client_ca.issue_client("submitter.example.test").unwrap();

    let server = server_cert.rustls_server_config_mtls(&client_ca).unwrap();
    let client = client_cert.rustls_client_config_mtls(&server_ca).unwrap();
    let (result, seen) = handshake(server.clone(), client, "relay.example.test").await;
    result.unwrap();
    assert_eq!(seen, Some(1), "server saw the client certificate");

    // Without a client certificate the server refuses the handshake.
    let anonymous = server_ca.rustls_client_config().unwrap();
    let (result, _) = handshake(server.clone(), anonymous, "relay.example.test").await;
    assert!(
        result.is_err(),
        "handshake without a client certificate succeeded"
    );

    // A client certificate from a CA the server does not trust is refused too.
    let other = TestCa::new("other root")
        .unwrap()
        .issue_client("intruder")
        .unwrap();
    let client = other.rustls_client_config_mtls(&server_ca).unwrap();
    let (result, _) = handshake(server, client, "relay.example.test").await;
    assert!(
        result.is_err(),
        "handshake with an untrusted client certificate succeeded"
    );
}
