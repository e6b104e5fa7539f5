//! Properties (`proxy_get_property`): built-in ones with Envoy's names and encodings, and
//! a [`PropertyProvider`] for everything the embedder knows.

use std::net::SocketAddr;

/// Answers property lookups the built-ins do not cover. Paths come split on NUL, as the
/// guest sent them (`["connection", "requested_server_name"]`).
///
/// Return the value in Envoy's encoding: strings as raw bytes, integers as 8 bytes
/// little-endian, booleans as one byte.
pub trait PropertyProvider: Send + Sync {
    /// The value at `path`, or `None` (the guest gets NOT_FOUND).
    fn property(&self, path: &[&str]) -> Option<Vec<u8>>;
}

/// Facts about a downstream connection, for stream contexts and the `source.*`,
/// `destination.*` and `connection.*` properties of HTTP contexts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionInfo {
    /// The client's address (`source.address`, `source.port`).
    pub source: Option<SocketAddr>,
    /// The local address the client connected to (`destination.address`, `destination.port`).
    pub destination: Option<SocketAddr>,
    /// SNI, when known (`connection.requested_server_name`).
    pub requested_server_name: Option<String>,
    /// A connection id (`connection.id`). Defaults to 0.
    pub id: u64,
    /// Whether the connection is encrypted (`connection.mtls` is not modelled; this is
    /// `connection.tls_version` present or not). Defaults to `None`.
    pub tls_version: Option<String>,
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

/// The built-in properties. `headers` are the current request headers, when in an HTTP
/// context; `None` elsewhere.
pub(crate) fn builtin(
    path: &[&str],
    plugin_name: &str,
    root_id: &str,
    vm_id: &str,
    conn: Option<&ConnectionInfo>,
    headers: Option<&[(String, Vec<u8>)]>,
) -> Option<Vec<u8>> {
    // As Envoy's: a header given more than once reads as its values joined by commas.
    let header = |name: &str| -> Option<Vec<u8>> {
        let mut values = headers?
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice());
        let mut out = values.next()?.to_vec();
        for v in values {
            out.push(b',');
            out.extend_from_slice(v);
        }
        Some(out)
    };
    match path {
        ["plugin_name"] => Some(plugin_name.as_bytes().to_vec()),
        ["plugin_root_id"] => Some(root_id.as_bytes().to_vec()),
        ["plugin_vm_id"] => Some(vm_id.as_bytes().to_vec()),
        ["source", "address"] => Some(conn?.source?.to_string().into_bytes()),
        ["source", "port"] => Some(int(i64::from(conn?.source?.port()))),
        ["destination", "address"] => Some(conn?.destination?.to_string().into_bytes()),
        ["destination", "port"] => Some(int(i64::from(conn?.destination?.port()))),
        // Without SNI: empty, as Envoy answers it.
        ["connection", "requested_server_name"] => Some(
            conn?
                .requested_server_name
                .clone()
                .unwrap_or_default()
                .into_bytes(),
        ),
        ["connection", "id"] => Some(int(i64::try_from(conn?.id).unwrap_or(i64::MAX))),
        ["connection", "tls_version"] => Some(conn?.tls_version.clone()?.into_bytes()),
        ["request", "path"] => header(":path"),
        ["request", "url_path"] => {
            let path = header(":path")?;
            let end = path.iter().position(|&b| b == b'?').unwrap_or(path.len());
            Some(path[..end].to_vec())
        }
        ["request", "host"] => header(":authority").or_else(|| header("host")),
        ["request", "method"] => header(":method"),
        ["request", "scheme"] => header(":scheme"),
        ["request", "id"] => header("x-request-id"),
        ["request", "protocol"] => headers.map(|_| b"HTTP/1.1".to_vec()),
        ["request", "headers", name] => header(name),
        // The whole map, in the header-map wire format, each name once with its values
        // joined (as Envoy answers it).
        ["request", "headers"] => {
            let mut joined: Vec<(String, Vec<u8>)> = Vec::new();
            for (k, _) in headers? {
                if !joined.iter().any(|(seen, _)| seen.eq_ignore_ascii_case(k)) {
                    joined.push((k.clone(), header(k).unwrap_or_default()));
                }
            }
            let mut out = Vec::new();
            crate::abi::serialize_map(&joined, &mut out);
            Some(out)
        }
        ["request", "useragent"] => header("user-agent"),
        _ => None,
    }
}
