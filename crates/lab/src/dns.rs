//! An authoritative DNS server on loopback whose records change at run time.
//!
//! Built on hickory-server: one in-memory zone handler for the root zone `.` serves
//! every name, so any name the test did not add gets an authoritative NXDOMAIN with the
//! root SOA in the authority section, and a known name asked for a type it lacks gets
//! NODATA (NOERROR, no answers, SOA). That is what a stub resolver such as
//! hickory-resolver needs to tell "no such domain" from "no MX" (and fall back to A).
//! Records are added through the same `Arc` that the server's catalog holds, so
//! changes take effect for the next query without restarting anything.

use std::collections::HashSet;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use hickory_proto::rr::rdata::{A, AAAA, CNAME, MX, NS, SOA, TXT};
use hickory_proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::ResponseCode;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{
    AxfrPolicy, Catalog, MessageResponseBuilder, ZoneHandler, ZoneType,
};
use tokio::net::{TcpListener, UdpSocket};

use crate::LabError;

/// TTL of every record the lab serves. Short, so that a resolver with a cache sees
/// changes quickly; tests that change records should still use a fresh resolver.
pub const TTL: u32 = 5;

/// How long the TCP side waits for a query on an idle connection. Defaults to 5 s.
const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(5);

/// An authoritative DNS server (UDP and TCP on the same port) for names defined in code.
///
/// The server runs on the current tokio runtime until the `DnsServer` is dropped.
pub struct DnsServer {
    addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler>,
    failing: Failing,
    serial: AtomicU32,
    // Dropping the server aborts its UDP and TCP tasks.
    _server: Server<Lab>,
}

/// (name, type) pairs answered SERVFAIL, as a broken authoritative server would.
type Failing = Arc<Mutex<HashSet<(LowerName, RecordType)>>>;

/// The catalog, with the SERVFAIL knob in front of it.
struct Lab {
    catalog: Catalog,
    failing: Failing,
}

#[async_trait::async_trait]
impl RequestHandler for Lab {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response_handle: R,
    ) -> ResponseInfo {
        let fails = request.request_info().is_ok_and(|info| {
            let key = (info.query.name().clone(), info.query.query_type());
            self.failing
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&key)
        });
        if !fails {
            return self
                .catalog
                .handle_request::<R, T>(request, response_handle)
                .await;
        }
        let response = MessageResponseBuilder::new(&request.queries, None)
            .error_msg(&request.metadata, ResponseCode::ServFail);
        match response_handle.send_response(response).await {
            Ok(info) => info,
            Err(e) => {
                tracing::warn!(error = %e, "lab DNS: sending SERVFAIL failed");
                let mut metadata =
                    hickory_server::proto::op::Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                hickory_server::proto::op::Header {
                    metadata,
                    counts: Default::default(),
                }
                .into()
            }
        }
    }
}

impl std::fmt::Debug for DnsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DnsServer")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl DnsServer {
    /// Binds UDP and TCP on `bind` (port 0 picks a port free for both) and starts serving.
    pub async fn start(bind: SocketAddr) -> Result<DnsServer, LabError> {
        let (udp, tcp) = bind_pair(bind).await?;
        let addr = udp.local_addr()?;

        let root = Name::root();
        let mut zone =
            InMemoryZoneHandler::empty(root.clone(), ZoneType::Primary, AxfrPolicy::Deny);
        let ns = name("ns.lab.")?;
        let soa = SOA::new(
            ns.clone(),
            name("hostmaster.lab.")?,
            1,
            3600,
            600,
            86400,
            TTL,
        );
        zone.upsert_mut(Record::from_rdata(root.clone(), TTL, RData::SOA(soa)), 1);
        zone.upsert_mut(Record::from_rdata(root.clone(), TTL, RData::NS(NS(ns))), 1);
        let zone = Arc::new(zone);

        let mut catalog = Catalog::new();
        let handler: Arc<dyn ZoneHandler> = zone.clone();
        catalog.upsert(LowerName::from(root), vec![handler]);

        let failing = Failing::default();
        let mut server = Server::new(Lab {
            catalog,
            failing: failing.clone(),
        });
        server.register_socket(udp);
        // 4096: enough for any answer the lab builds; responses are small.
        server.register_listener(tcp, TCP_IDLE_TIMEOUT, 4096);
        tracing::debug!(%addr, "lab DNS server started");
        Ok(DnsServer {
            addr,
            zone,
            failing,
            serial: AtomicU32::new(1),
            _server: server,
        })
    }

    /// The address (UDP and TCP) the server answers on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A hickory-resolver configuration that asks only this server (UDP, then TCP).
    pub fn resolver_config(&self) -> ResolverConfig {
        let mut udp = ConnectionConfig::udp();
        udp.port = self.addr.port();
        let mut tcp = ConnectionConfig::tcp();
        tcp.port = self.addr.port();
        ResolverConfig::from_parts(
            None,
            vec![],
            vec![NameServerConfig::new(self.addr.ip(), true, vec![udp, tcp])],
        )
    }

    /// Adds an MX record `domain MX pref host`.
    pub async fn add_mx(&self, domain: &str, pref: u16, host: &str) -> Result<(), LabError> {
        self.add(domain, RData::MX(MX::new(pref, name(host)?)))
            .await
    }

    /// Adds an A record.
    pub async fn add_a(&self, host: &str, ip: Ipv4Addr) -> Result<(), LabError> {
        self.add(host, RData::A(A(ip))).await
    }

    /// Adds an AAAA record.
    pub async fn add_aaaa(&self, host: &str, ip: Ipv6Addr) -> Result<(), LabError> {
        self.add(host, RData::AAAA(AAAA(ip))).await
    }

    /// Adds a TXT record holding one string (split into 255-byte character strings as
    /// the wire format requires).
    pub async fn add_txt(&self, name_: &str, text: &str) -> Result<(), LabError> {
        let chunks: Vec<String> = text
            .as_bytes()
            .chunks(255)
            .map(|c| String::from_utf8_lossy(c).into_owned())
            .collect();
        let chunks = if chunks.is_empty() {
            vec![String::new()]
        } else {
            chunks
        };
        self.add(name_, RData::TXT(TXT::new(chunks))).await
    }

    /// Sets the CNAME of `alias` to `target` (a name has at most one CNAME).
    pub async fn add_cname(&self, alias: &str, target: &str) -> Result<(), LabError> {
        self.add(alias, RData::CNAME(CNAME(name(target)?))).await
    }

    /// Answers queries for `record_type` at `name_` with SERVFAIL (a temporary failure,
    /// as a broken authoritative server gives) from now on.
    pub fn fail(&self, name_: &str, record_type: RecordType) -> Result<(), LabError> {
        let key = (LowerName::from(name(name_)?), record_type);
        self.failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(key);
        Ok(())
    }

    /// Answers queries for `record_type` at `name_` normally again (see [`fail`](Self::fail)).
    pub fn heal(&self, name_: &str, record_type: RecordType) -> Result<(), LabError> {
        let key = (LowerName::from(name(name_)?), record_type);
        self.failing
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&key);
        Ok(())
    }

    /// Removes every record of `record_type` at `name_`. Returns whether any existed.
    pub async fn remove(&self, name_: &str, record_type: RecordType) -> Result<bool, LabError> {
        let key = RrKey::new(LowerName::from(name(name_)?), record_type);
        let removed = self.zone.records_mut().await.remove(&key).is_some();
        self.serial.fetch_add(1, Ordering::Relaxed);
        Ok(removed)
    }

    /// Removes every record at `name_` (the name then answers NXDOMAIN unless names
    /// below it exist). Returns how many record sets were removed.
    pub async fn remove_name(&self, name_: &str) -> Result<usize, LabError> {
        let lower = LowerName::from(name(name_)?);
        let mut records = self.zone.records_mut().await;
        let before = records.len();
        records.retain(|key, _| key.name != lower);
        self.serial.fetch_add(1, Ordering::Relaxed);
        Ok(before - records.len())
    }

    async fn add(&self, owner: &str, rdata: RData) -> Result<(), LabError> {
        let owner = name(owner)?;
        let serial = self.serial.fetch_add(1, Ordering::Relaxed) + 1;
        let record = Record::from_rdata(owner.clone(), TTL, rdata);
        if self.zone.upsert(record, serial).await {
            Ok(())
        } else {
            // upsert says false when the record was already there: adding it twice is
            // not an error for a lab.
            tracing::debug!(%owner, "record already present");
            Ok(())
        }
    }
}

/// Parses a name and makes it fully qualified ("example.test" means "example.test.").
fn name(s: &str) -> Result<Name, LabError> {
    let mut n = Name::from_str(s).map_err(|e| LabError::Dns(format!("bad name {s:?}: {e}")))?;
    n.set_fqdn(true);
    Ok(n)
}

/// Binds UDP and TCP on the same port. With port 0, the UDP port picked by the kernel may
/// be taken for TCP, so try a few times.
async fn bind_pair(bind: SocketAddr) -> Result<(UdpSocket, TcpListener), LabError> {
    let mut last_err = None;
    for _ in 0..16 {
        let udp = UdpSocket::bind(bind).await?;
        let addr = udp.local_addr()?;
        match TcpListener::bind(addr).await {
            Ok(tcp) => return Ok((udp, tcp)),
            Err(e) if bind.port() == 0 => last_err = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last_err.map_or_else(|| LabError::Dns("could not bind".into()), LabError::Io))
}
