//! Where a domain's mail goes: MX records in preference order, then each host's A/AAAA
//! addresses (RFC 5321 §5.1), with hickory-resolver pointed at the configured server.

use std::net::{IpAddr, SocketAddr};

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::RData;

use altroute_policy::HostTarget;

use super::DeliveryError;

/// One host to try, with its addresses in the order to try them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Host name (no trailing dot), or an IP literal. The TLS server name to verify.
    pub name: String,
    /// MX preference (0 for hosts that did not come from MX records).
    pub preference: u16,
    /// Whether the name is an MX record's exchange: a host name, also when it reads like
    /// an IP address, so no certificate for an IP address names it.
    pub from_mx: bool,
    /// Addresses of the host.
    pub addrs: Vec<IpAddr>,
    /// Why its addresses, or one family of them (A or AAAA), could not be looked up, when
    /// they could not (`addrs` holds what was found, if anything). Such a host was not
    /// wholly reached: it may take the mail at the next attempt, so what the others say
    /// bounces nothing (an audit's mail bounced at a backup MX while the primary's address
    /// lookup had only failed for the moment).
    pub unresolved: Option<String>,
}

/// Why a destination could not be resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResolveFailure {
    /// The domain does not exist, or publishes a null MX (RFC 7505): permanent.
    Permanent(String),
    /// Anything else (timeouts, SERVFAIL, hosts without addresses): try again later.
    Temporary(String),
}

/// At most this many MX hosts of a domain are looked up in one attempt (in preference
/// order); the others count as not reached.
pub const MAX_MX_HOSTS: usize = 32;

/// The relay's DNS resolver.
#[derive(Clone)]
pub struct Resolver {
    inner: TokioResolver,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

/// `host` as an IP address, when it is one (bare or in brackets).
fn literal(host: &str) -> Option<IpAddr> {
    host.trim_matches(|c| c == '[' || c == ']').parse().ok()
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_string()
    } else {
        format!("{name}.")
    }
}

impl Resolver {
    /// A resolver asking only `server` (UDP, then TCP), or the system's resolvers
    /// (`/etc/resolv.conf`) when `None`.
    pub fn new(server: Option<SocketAddr>) -> Result<Resolver, DeliveryError> {
        let builder = match server {
            Some(addr) => {
                let mut udp = ConnectionConfig::udp();
                udp.port = addr.port();
                let mut tcp = ConnectionConfig::tcp();
                tcp.port = addr.port();
                let config = ResolverConfig::from_parts(
                    None,
                    vec![],
                    vec![NameServerConfig::new(addr.ip(), true, vec![udp, tcp])],
                );
                TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
            }
            None => TokioResolver::builder_tokio()
                .map_err(|e| DeliveryError::Resolver(e.to_string()))?,
        };
        let inner = builder
            .build()
            .map_err(|e| DeliveryError::Resolver(e.to_string()))?;
        Ok(Resolver { inner })
    }

    /// The hosts that receive mail for `domain`: its MX hosts by preference, or the
    /// domain itself when it has no MX records (implicit MX, RFC 5321 §5.1).
    pub async fn mail_hosts(&self, domain: &str) -> Result<Vec<Candidate>, ResolveFailure> {
        let mut mx: Vec<(u16, String)> = match self.inner.mx_lookup(fqdn(domain)).await {
            Ok(lookup) => lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::MX(mx) => Some((
                        mx.preference,
                        mx.exchange.to_ascii().trim_end_matches('.').to_string(),
                    )),
                    _ => None,
                })
                .collect(),
            Err(e) if e.is_nx_domain() => {
                return Err(ResolveFailure::Permanent(format!(
                    "domain {domain} does not exist"
                )));
            }
            Err(e) if e.is_no_records_found() => Vec::new(),
            Err(e) => {
                return Err(ResolveFailure::Temporary(format!(
                    "MX lookup for {domain} failed: {e}"
                )));
            }
        };
        if mx.is_empty() {
            return Ok(vec![self.candidate(domain).await?]);
        }
        // RFC 7505: a single MX with an empty exchange means "no mail accepted".
        if mx.len() == 1 && mx.iter().all(|(_, h)| h.is_empty()) {
            return Err(ResolveFailure::Permanent(format!(
                "domain {domain} accepts no mail (null MX)"
            )));
        }
        order_mx(&mut mx);
        // Every MX host looked up at once (an audit's domain of eight MX hosts whose AAAA
        // queries went unanswered held a worker for two minutes, one host after the
        // other), and at most MAX_MX_HOSTS of them: the others wait for the next attempt.
        let mut lookups = tokio::task::JoinSet::new();
        for (i, (_, name)) in mx.iter().enumerate().take(MAX_MX_HOSTS) {
            let (resolver, name) = (self.clone(), name.clone());
            lookups.spawn(async move { (i, resolver.host_lookup(&name).await) });
        }
        let mut found: Vec<Option<(Vec<IpAddr>, Option<String>)>> = vec![None; mx.len()];
        while let Some(done) = lookups.join_next().await {
            if let Ok((i, lookup)) = done {
                found[i] = Some(lookup);
            }
        }
        let mut out = Vec::new();
        for ((preference, name), lookup) in mx.into_iter().zip(found) {
            // An MX names a host (RFC 5321 §5.1, RFC 2181 §10.3): a numeric exchange is a
            // name to look up, never an address literal.
            let (addrs, unresolved) = match lookup {
                Some((addrs, None)) if addrs.is_empty() => {
                    (addrs, Some(format!("MX host {name} has no address")))
                }
                Some(found) => found,
                None => (
                    Vec::new(),
                    Some(format!(
                        "MX host {name} not looked up in this attempt (at most {MAX_MX_HOSTS} \
                         per domain)"
                    )),
                ),
            };
            out.push(Candidate {
                name,
                preference,
                from_mx: true,
                addrs,
                unresolved,
            });
        }
        if out.iter().all(|c| c.addrs.is_empty()) {
            return Err(ResolveFailure::Temporary(
                out.into_iter()
                    .rev()
                    .find_map(|c| c.unresolved)
                    .unwrap_or_else(|| format!("no MX host of {domain} has an address")),
            ));
        }
        Ok(out)
    }

    /// The TXT records at `name`, each as one string (its character strings joined).
    /// A name without TXT records gives an empty list; a name that does not exist gives
    /// [`ResolveFailure::Permanent`]. Used for MTA-STS and TLS-RPT discovery.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, ResolveFailure> {
        match self.inner.txt_lookup(fqdn(name)).await {
            Ok(lookup) => Ok(lookup
                .answers()
                .iter()
                .filter_map(|r| match &r.data {
                    RData::TXT(txt) => Some(
                        txt.txt_data
                            .iter()
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .collect::<String>(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) if e.is_nx_domain() => {
                Err(ResolveFailure::Permanent(format!("{name} does not exist")))
            }
            Err(e) if e.is_no_records_found() => Ok(Vec::new()),
            Err(e) => Err(ResolveFailure::Temporary(format!(
                "TXT lookup for {name} failed: {e}"
            ))),
        }
    }

    /// A/AAAA addresses of `host` (an IP literal resolves to itself: for hosts the
    /// policy names, not for MX exchanges, see [`Resolver::host_addresses`]).
    pub async fn addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveFailure> {
        if let Some(ip) = literal(host) {
            return Ok(vec![ip]);
        }
        self.host_addresses(host).await
    }

    /// `host` (a name, or an IP literal the policy names) as a candidate of preference 0:
    /// [`Resolver::host_lookup`]'s addresses and failure, or an error when it has no
    /// address at all.
    pub async fn candidate(&self, host: &str) -> Result<Candidate, ResolveFailure> {
        let (addrs, unresolved) = match literal(host) {
            Some(ip) => (vec![ip], None),
            None => self.host_lookup(host).await,
        };
        if addrs.is_empty() {
            return Err(ResolveFailure::Temporary(
                unresolved.unwrap_or_else(|| format!("{host} has no address")),
            ));
        }
        Ok(Candidate {
            name: host.to_string(),
            preference: 0,
            from_mx: false,
            addrs,
            unresolved,
        })
    }

    /// A/AAAA addresses of the host name `host`, from DNS only (a name that looks like
    /// an address too).
    pub async fn host_addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveFailure> {
        match self.host_lookup(host).await {
            (addrs, _) if !addrs.is_empty() => Ok(addrs),
            (_, Some(why)) => Err(ResolveFailure::Temporary(why)),
            (_, None) => Err(ResolveFailure::Temporary(format!("{host} has no address"))),
        }
    }

    /// The A and AAAA addresses of the host name `host` (IPv4 first), each family looked
    /// up on its own, with why one of them failed for the moment (a SERVFAIL, a timeout:
    /// not "no such name" or "no such record"). Looked up together, a failed family was
    /// dropped without a word, and an audit's mail bounced at the other family's
    /// addresses while the failed ones were the host's real ones.
    pub async fn host_lookup(&self, host: &str) -> (Vec<IpAddr>, Option<String>) {
        let name = fqdn(host);
        let (v4, v6) = tokio::join!(
            self.inner.ipv4_lookup(name.clone()),
            self.inner.ipv6_lookup(name)
        );
        let mut addrs = Vec::new();
        let mut failed = Vec::new();
        for (family, found) in [("A", v4), ("AAAA", v6)] {
            match found {
                Ok(lookup) => addrs.extend(lookup.answers().iter().filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                    _ => None,
                })),
                Err(e) if e.is_nx_domain() || e.is_no_records_found() => {}
                Err(e) => failed.push(format!("{family} lookup for {host} failed: {e}")),
            }
        }
        let why = (!failed.is_empty()).then(|| failed.join("; "));
        (addrs, why)
    }

    /// The hosts of a policy host (static route or alternate secure route): its addresses
    /// in order (primary, then secondary), each resolved, or their MX hosts when
    /// `mx_lookup` is set. An address that does not resolve is kept as an unresolved
    /// candidate ([`Candidate::unresolved`]) when another one does.
    pub async fn host_target(&self, target: &HostTarget) -> Result<Vec<Candidate>, ResolveFailure> {
        let mut out = Vec::new();
        for address in &target.addresses {
            let found = if target.mx_lookup {
                self.mail_hosts(address).await
            } else {
                self.candidate(address).await.map(|c| vec![c])
            };
            match found {
                Ok(c) => out.extend(c),
                Err(ResolveFailure::Temporary(e) | ResolveFailure::Permanent(e)) => {
                    out.push(Candidate {
                        name: address.clone(),
                        preference: 0,
                        from_mx: false,
                        addrs: Vec::new(),
                        unresolved: Some(e),
                    })
                }
            }
        }
        if out.iter().all(|c| c.addrs.is_empty()) {
            return Err(ResolveFailure::Temporary(
                out.into_iter()
                    .rev()
                    .find_map(|c| c.unresolved)
                    .unwrap_or_else(|| format!("host {} has no address", target.name)),
            ));
        }
        Ok(out)
    }
}

/// MX records in the order to try them: by preference, and hosts of equal preference in
/// random order (RFC 5321 §5.1: the client MUST randomize them, to spread the load). They
/// were sorted by name, and the first of a domain's equally preferred hosts took all of
/// the relay's mail (an audit's).
fn order_mx(mx: &mut [(u16, String)]) {
    mx.sort();
    for group in mx.chunk_by_mut(|a, b| a.0 == b.0) {
        fastrand::shuffle(group);
    }
}

#[cfg(test)]
mod tests {
    use super::order_mx;

    /// Hosts of equal preference come in random order, after the more preferred ones.
    #[test]
    fn equal_preferences_are_shuffled() {
        let mut firsts = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let mut mx = vec![
                (20, "c.test".to_string()),
                (10, "b.test".to_string()),
                (10, "a.test".to_string()),
                (5, "z.test".to_string()),
            ];
            order_mx(&mut mx);
            assert_eq!(mx[0], (5, "z.test".to_string()));
            assert_eq!(mx[3], (20, "c.test".to_string()));
            firsts.insert(mx[1].1.clone());
        }
        assert_eq!(firsts.len(), 2, "always {firsts:?} first");
    }
}
