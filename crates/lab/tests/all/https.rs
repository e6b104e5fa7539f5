//! The HTTPS server: canned responses over real TLS, requests recorded.

use std::net::SocketAddr;

use altroute_lab::{HttpResponse, HttpsServer, TestCa, Validity, loopback_ip};
use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

async fn get(ca: &TestCa, addr: SocketAddr, name: &str, path: &str) -> String {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = TlsConnector::from(ca.rustls_client_config().unwrap())
        .connect(ServerName::try_from(name.to_string()).unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(format!("GET {path} HTTP/1.1\r\nHost: {name}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = String::new();
    tls.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn serves_set_paths_and_records_requests() {
    let ca = TestCa::new("https test").unwrap();
    let cert = ca.issue(&["mta-sts.a.test"], Validity::Valid).unwrap();
    let server = HttpsServer::start(SocketAddr::new(loopback_ip().into(), 0), &cert)
        .await
        .unwrap();
    server.set("/p.txt", HttpResponse::text("hello\n"));
    let ok = get(&ca, server.addr(), "mta-sts.a.test", "/p.txt").await;
    assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
    assert!(ok.contains("Content-Type: text/plain\r\n"));
    assert!(ok.contains("Content-Length: 6\r\n"));
    assert!(ok.ends_with("\r\n\r\nhello\n"));
    let missing = get(&ca, server.addr(), "mta-sts.a.test", "/other").await;
    assert!(missing.starts_with("HTTP/1.1 404 "), "{missing}");
    server.remove("/p.txt");
    let gone = get(&ca, server.addr(), "mta-sts.a.test", "/p.txt").await;
    assert!(gone.starts_with("HTTP/1.1 404 "), "{gone}");
    let reqs = server.requests();
    assert_eq!(reqs.len(), 3);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].path, "/p.txt");
    assert_eq!(reqs[0].host.as_deref(), Some("mta-sts.a.test"));
}
