//! A certificate authority generated at run time, and the certificates it issues.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use time::{Duration, OffsetDateTime};

use crate::LabError;

/// The validity window of an issued certificate, relative to now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// From one day ago to 30 days from now.
    Valid,
    /// From 30 days ago to one day ago: verification fails with an "expired" error.
    Expired,
    /// From one day from now to 30 days from now: verification fails with "not valid yet".
    NotYetValid,
}

impl Validity {
    fn window(self) -> (OffsetDateTime, OffsetDateTime) {
        let now = OffsetDateTime::now_utc();
        let day = Duration::days(1);
        let month = Duration::days(30);
        match self {
            Validity::Valid => (now - day, now + month),
            Validity::Expired => (now - month, now - day),
            Validity::NotYetValid => (now + day, now + month),
        }
    }
}

/// The rustls crypto provider the lab uses everywhere (ring, as the workspace selects).
///
/// Named explicitly rather than taken from the process default, so the lab works whatever
/// other crates in the same binary install as default.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root certificate authority created at run time (ECDSA P-256 key, valid for a year).
///
/// A certificate that a peer does not trust is simply one issued by another `TestCa`.
pub struct TestCa {
    name: String,
    issuer: Issuer<'static, KeyPair>,
    root_der: CertificateDer<'static>,
    root_pem: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A certificate and its private key, issued by a [`TestCa`].
#[derive(Clone)]
pub struct Issued {
    /// The leaf certificate, DER.
    pub cert_der: CertificateDer<'static>,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The certificate chain in PEM: the leaf only, since the CA issues leaves directly
    /// and peers must hold the root themselves.
    pub chain_pem: String,
    /// The private key in PEM (PKCS#8).
    pub key_pem: String,
}

impl std::fmt::Debug for Issued {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The key stays out of logs.
        f.debug_struct("Issued")
            .field("chain_pem", &self.chain_pem)
            .finish_non_exhaustive()
    }
}

impl TestCa {
    /// Creates a new root CA whose subject common name is `name`.
    pub fn new(name: &str) -> Result<TestCa, LabError> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name = dn(name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        // Starts well before any leaf so that NotYetValid/Expired leaves are the only
        // thing out of their window.
        params.not_before = now - Duration::days(60);
        params.not_after = now + Duration::days(365);
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(TestCa {
            name: name.to_owned(),
            root_der: cert.der().clone(),
            root_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA's common name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> CertificateDer<'static> {
        self.root_der.clone()
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// Issues a server certificate for `names` (DNS names or IP addresses, as subject
    /// alternative names; the first is also the common name).
    pub fn issue(&self, names: &[&str], validity: Validity) -> Result<Issued, LabError> {
        let sans: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = dn(names.first().copied().unwrap_or("altroute-lab server"));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// Issues a client certificate (for mutual TLS) with common name and DNS name `name`.
    pub fn issue_client(&self, name: &str) -> Result<Issued, LabError> {
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        params.distinguished_name = dn(name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, Validity::Valid)
    }

    fn sign(&self, mut params: CertificateParams, validity: Validity) -> Result<Issued, LabError> {
        let (not_before, not_after) = validity.window();
        params.not_before = not_before;
        params.not_after = not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_der: cert.der().clone(),
            key_der: key.serialize_der(),
            chain_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A root store holding only this CA.
    pub fn rustls_root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        // A certificate we just generated always parses; an error here is a bug in rcgen.
        if let Err(e) = roots.add(self.root_der()) {
            tracing::error!(error = %e, "rustls rejected a generated root certificate");
        }
        roots
    }

    /// A rustls server-certificate verifier that trusts only this CA (checks chain,
    /// validity and name), e.g. to classify a peer's certificate after the handshake.
    pub fn rustls_server_verifier(&self) -> Result<Arc<dyn ServerCertVerifier>, LabError> {
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(self.rustls_root_store()),
            crypto_provider(),
        )
        .build()
        .map_err(|e| LabError::Tls(e.to_string()))?;
        Ok(verifier)
    }

    /// A client configuration that trusts only this CA (TLS 1.2 and 1.3, no client
    /// certificate).
    pub fn rustls_client_config(&self) -> Result<Arc<ClientConfig>, LabError> {
        let config = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(self.rustls_root_store())
            .with_no_client_auth();
        Ok(Arc::new(config))
    }
}

impl Issued {
    /// The private key as rustls wants it.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key_der.clone()))
    }

    /// A server configuration presenting this certificate, TLS 1.2 and 1.3, no client
    /// authentication.
    pub fn rustls_server_config(&self) -> Result<Arc<ServerConfig>, LabError> {
        let config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(vec![self.cert_der.clone()], self.private_key())?;
        Ok(Arc::new(config))
    }

    /// A server configuration presenting this certificate and requiring a client
    /// certificate issued by `client_ca` (mutual TLS).
    pub fn rustls_server_config_mtls(
        &self,
        client_ca: &TestCa,
    ) -> Result<Arc<ServerConfig>, LabError> {
        let verifier = WebPkiClientVerifier::builder_with_provider(
            Arc::new(client_ca.rustls_root_store()),
            crypto_provider(),
        )
        .build()
        .map_err(|e| LabError::Tls(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(vec![self.cert_der.clone()], self.private_key())?;
        Ok(Arc::new(config))
    }

    /// A client configuration that trusts `server_ca` and presents this certificate as
    /// its client certificate (mutual TLS).
    pub fn rustls_client_config_mtls(
        &self,
        server_ca: &TestCa,
    ) -> Result<Arc<ClientConfig>, LabError> {
        let config = ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(server_ca.rustls_root_store())
            .with_client_auth_cert(vec![self.cert_der.clone()], self.private_key())?;
        Ok(Arc::new(config))
    }
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "altroute lab");
    dn
}
