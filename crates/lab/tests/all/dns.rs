//! DnsServer, queried by hickory-resolver exactly as the relay will query it.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use altroute_lab::{DnsServer, loopback_ip};
use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

async fn server() -> DnsServer {
    DnsServer::start(SocketAddr::new(loopback_ip().into(), 0))
        .await
        .unwrap()
}

/// A fresh resolver (so no cache hides a change) that asks only `config`'s servers.
fn resolver(config: ResolverConfig) -> TokioResolver {
    TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        .build()
        .unwrap()
}

#[tokio::test]
async fn mx_lookup_returns_preference_and_exchange() {
    let dns = server().await;
    dns.add_mx("example.test", 10, "mx1.example.test")
        .await
        .unwrap();
    dns.add_mx("example.test", 20, "mx2.example.test")
        .await
        .unwrap();
    let lookup = resolver(dns.resolver_config())
        .mx_lookup("example.test.")
        .await
        .unwrap();
    let mut mx: Vec<(u16, String)> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
            _ => None,
        })
        .collect();
    mx.sort();
    assert_eq!(
        mx,
        vec![
            (10, "mx1.example.test.".to_owned()),
            (20, "mx2.example.test.".to_owned())
        ]
    );
}

#[tokio::test]
async fn a_aaaa_and_lookup_ip() {
    let dns = server().await;
    let v4 = Ipv4Addr::new(127, 10, 20, 30);
    dns.add_a("mx1.example.test", v4).await.unwrap();
    dns.add_aaaa("mx1.example.test", Ipv6Addr::LOCALHOST)
        .await
        .unwrap();
    let r = resolver(dns.resolver_config());
    let a: Vec<_> = r
        .ipv4_lookup("mx1.example.test.")
        .await
        .unwrap()
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(a, vec![v4]);
    let ips: Vec<_> = r
        .lookup_ip("mx1.example.test.")
        .await
        .unwrap()
        .iter()
        .collect();
    assert!(ips.contains(&v4.into()), "{ips:?}");
    assert!(ips.contains(&Ipv6Addr::LOCALHOST.into()), "{ips:?}");
}

#[tokio::test]
async fn txt_lookup_returns_the_text() {
    let dns = server().await;
    let policy = "v=STSv1; id=20260101T000000;";
    dns.add_txt("_mta-sts.example.test", policy).await.unwrap();
    let lookup = resolver(dns.resolver_config())
        .txt_lookup("_mta-sts.example.test.")
        .await
        .unwrap();
    let texts: Vec<String> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::TXT(txt) => Some(
                txt.txt_data
                    .iter()
                    .map(|d| String::from_utf8_lossy(d).into_owned())
                    .collect(),
            ),
            _ => None,
        })
        .collect();
    assert_eq!(texts, vec![policy.to_owned()]);

    // Longer than one 255-byte character string: split on the wire, whole again here.
    let long = "k=v;".repeat(100);
    dns.add_txt("long.example.test", &long).await.unwrap();
    let lookup = resolver(dns.resolver_config())
        .txt_lookup("long.example.test.")
        .await
        .unwrap();
    let RData::TXT(txt) = &lookup.answers()[0].data else {
        panic!("not TXT")
    };
    assert_eq!(txt.txt_data.len(), 2);
    let joined: Vec<u8> = txt
        .txt_data
        .iter()
        .flat_map(|d| d.iter().copied())
        .collect();
    assert_eq!(joined, long.as_bytes());
}

#[tokio::test]
async fn unknown_name_is_nxdomain() {
    let dns = server().await;
    dns.add_mx("example.test", 10, "mx1.example.test")
        .await
        .unwrap();
    let err = resolver(dns.resolver_config())
        .mx_lookup("nowhere.test.")
        .await
        .unwrap_err();
    assert!(err.is_nx_domain(), "expected NXDOMAIN, got {err:?}");
}

#[tokio::test]
async fn known_name_without_the_type_is_nodata_not_nxdomain() {
    let dns = server().await;
    dns.add_a("plain.example.test", Ipv4Addr::new(127, 0, 0, 9))
        .await
        .unwrap();
    let err = resolver(dns.resolver_config())
        .mx_lookup("plain.example.test.")
        .await
        .unwrap_err();
    assert!(
        err.is_no_records_found(),
        "expected no records, got {err:?}"
    );
    assert!(!err.is_nx_domain(), "NODATA must not be NXDOMAIN: {err:?}");
}

#[tokio::test]
async fn cname_is_followed_to_the_address() {
    let dns = server().await;
    let ip = Ipv4Addr::new(127, 0, 0, 7);
    dns.add_cname("mail.example.test", "mx1.example.test")
        .await
        .unwrap();
    dns.add_a("mx1.example.test", ip).await.unwrap();
    let lookup = resolver(dns.resolver_config())
        .ipv4_lookup("mail.example.test.")
        .await
        .unwrap();
    let types: Vec<RecordType> = lookup.answers().iter().map(|r| r.record_type()).collect();
    assert!(types.contains(&RecordType::CNAME), "{types:?}");
    let a: Vec<_> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect();
    assert_eq!(a, vec![ip]);
}

#[tokio::test]
async fn records_change_at_run_time() {
    let dns = server().await;
    let first = Ipv4Addr::new(127, 0, 1, 1);
    let second = Ipv4Addr::new(127, 0, 1, 2);
    dns.add_a("mx.example.test", first).await.unwrap();
    let a = |lookup: hickory_resolver::lookup::Lookup| -> Vec<Ipv4Addr> {
        lookup
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(a.0),
                _ => None,
            })
            .collect()
    };
    let got = a(resolver(dns.resolver_config())
        .ipv4_lookup("mx.example.test.")
        .await
        .unwrap());
    assert_eq!(got, vec![first]);

    assert!(dns.remove("mx.example.test", RecordType::A).await.unwrap());
    dns.add_a("mx.example.test", second).await.unwrap();
    let got = a(resolver(dns.resolver_config())
        .ipv4_lookup("mx.example.test.")
        .await
        .unwrap());
    assert_eq!(got, vec![second]);

    assert_eq!(dns.remove_name("mx.example.test").await.unwrap(), 1);
    let err = resolver(dns.resolver_config())
        .ipv4_lookup("mx.example.test.")
        .await
        .unwrap_err();
    assert!(err.is_nx_domain(), "{err:?}");
}

#[tokio::test]
async fn answers_over_tcp_on_the_same_port() {
    let dns = server().await;
    dns.add_mx("example.test", 5, "mx.example.test")
        .await
        .unwrap();
    let mut tcp = ConnectionConfig::tcp();
    tcp.port = dns.addr().port();
    let config = ResolverConfig::from_parts(
        None,
        vec![],
        vec![NameServerConfig::new(dns.addr().ip(), true, vec![tcp])],
    );
    let lookup = resolver(config).mx_lookup("example.test.").await.unwrap();
    assert_eq!(lookup.answers().len(), 1);
}

#[tokio::test]
async fn bad_names_are_errors() {
    let dns = server().await;
    assert!(dns.add_a("bad..name", Ipv4Addr::LOCALHOST).await.is_err());
}
