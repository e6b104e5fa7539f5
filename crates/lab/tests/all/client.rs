//! A tiny SMTP client for driving the sink and the proxy: raw lines out, replies in.

use std::sync::Arc;

use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

pub enum Conn {
    Plain(BufReader<TcpStream>),
    Tls(Box<BufReader<TlsStream<TcpStream>>>),
}

/// One SMTP reply: code and the text of each line.
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn has_line(&self, text: &str) -> bool {
        self.lines.iter().any(|l| l.eq_ignore_ascii_case(text))
    }
}

pub struct Client {
    conn: Option<Conn>,
    /// Every raw reply line received, with its code and separator.
    pub raw: Vec<String>,
}

impl Client {
    /// Connects and reads the greeting, which must be 220.
    pub async fn connect(addr: std::net::SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let mut c = Client {
            conn: Some(Conn::Plain(BufReader::new(stream))),
            raw: Vec::new(),
        };
        let greeting = c.reply().await;
        assert_eq!(greeting.code, 220, "greeting {greeting:?}");
        c
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        match self.conn.as_mut().unwrap() {
            Conn::Plain(s) => {
                s.get_mut().write_all(bytes).await.unwrap();
                s.get_mut().flush().await.unwrap();
            }
            Conn::Tls(s) => {
                s.get_mut().write_all(bytes).await.unwrap();
                s.get_mut().flush().await.unwrap();
            }
        }
    }

    async fn line(&mut self) -> String {
        let mut line = String::new();
        let n = match self.conn.as_mut().unwrap() {
            Conn::Plain(s) => s.read_line(&mut line).await.unwrap(),
            Conn::Tls(s) => s.read_line(&mut line).await.unwrap(),
        };
        assert!(n > 0, "server closed the connection");
        line.trim_end_matches(['\r', '\n']).to_owned()
    }

    pub async fn reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let line = self.line().await;
            self.raw.push(line.clone());
            let code: u16 = line
                .get(..3)
                .and_then(|c| c.parse().ok())
                .expect("reply code");
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_owned());
            if last {
                return Reply { code, lines };
            }
        }
    }

    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.send(format!("{line}\r\n").as_bytes()).await;
        self.reply().await
    }

    /// Sends STARTTLS (expects 220) and runs the handshake; returns the handshake error.
    pub async fn starttls(
        &mut self,
        config: Arc<ClientConfig>,
        name: &str,
    ) -> Result<(), std::io::Error> {
        let r = self.cmd("STARTTLS").await;
        assert_eq!(r.code, 220, "STARTTLS reply {r:?}");
        let Some(Conn::Plain(s)) = self.conn.take() else {
            panic!("TLS already active")
        };
        let name = ServerName::try_from(name.to_owned()).unwrap();
        let tls = TlsConnector::from(config)
            .connect(name, s.into_inner())
            .await?;
        self.conn = Some(Conn::Tls(Box::new(BufReader::new(tls))));
        Ok(())
    }

    /// The negotiated TLS version as rustls reports it on the client side.
    pub fn tls_version(&self) -> Option<rustls::ProtocolVersion> {
        match self.conn.as_ref()? {
            Conn::Tls(s) => s.get_ref().get_ref().1.protocol_version(),
            Conn::Plain(_) => None,
        }
    }

    /// A whole transaction; returns the reply to the final ".".
    pub async fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        let r = self.cmd(&format!("MAIL FROM:<{from}>")).await;
        assert_eq!(r.code, 250, "MAIL {r:?}");
        for rcpt in to {
            let r = self.cmd(&format!("RCPT TO:<{rcpt}>")).await;
            assert_eq!(r.code, 250, "RCPT {r:?}");
        }
        let r = self.cmd("DATA").await;
        assert_eq!(r.code, 354, "DATA {r:?}");
        let mut data = String::new();
        for line in body.split("\r\n") {
            if line.starts_with('.') {
                data.push('.');
            }
            data.push_str(line);
            data.push_str("\r\n");
        }
        data.push_str(".\r\n");
        self.send(data.as_bytes()).await;
        self.reply().await
    }
}

/// The rustls error inside a failed handshake's io::Error.
pub fn rustls_error(e: &std::io::Error) -> rustls::Error {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .cloned()
        .unwrap_or_else(|| panic!("not a rustls error: {e:?}"))
}
