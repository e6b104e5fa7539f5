//! A server-certificate verifier that records its verdict instead of failing.
//!
//! Delivery policy must see *why* a certificate is not acceptable (untrusted,
//! expired, wrong host name) to decide, after the handshake, whether to
//! proceed, take the alternate secure route, defer or bounce. rustls aborts
//! the handshake on a bad certificate, so [`RecordingVerifier`] wraps
//! rustls's `WebPkiServerVerifier`, stores the classified result and lets the
//! handshake continue. Handshake signatures are still checked by the wrapped
//! verifier: a peer without the private key for the certificate it sent
//! still fails the handshake. Only the certificate verdict is deferred.

use std::sync::{Arc, Mutex, PoisonError};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::Error;

/// The classified certificate verification result.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum CertResult {
    /// Chains to a trusted root, in date, valid for the server name.
    Valid,
    /// Does not chain to a trusted root (includes self-signed).
    Untrusted,
    /// Expired or not yet valid.
    Expired,
    /// Trusted and in date but not valid for the name we asked for.
    HostnameMismatch,
    /// Anything else (bad encoding, revoked, wrong key usage...), with the
    /// rustls error text.
    Invalid(String),
}

impl CertResult {
    fn classify(result: &Result<ServerCertVerified, rustls::Error>) -> Self {
        match result {
            Ok(_) => CertResult::Valid,
            Err(rustls::Error::InvalidCertificate(e)) => match e {
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => CertResult::Expired,
                CertificateError::UnknownIssuer => CertResult::Untrusted,
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => CertResult::HostnameMismatch,
                other => CertResult::Invalid(format!("{other:?}")),
            },
            Err(other) => CertResult::Invalid(other.to_string()),
        }
    }
}

/// A [`ServerCertVerifier`] that records the WebPKI verdict and never aborts
/// the handshake over it. Use one instance per connection.
#[derive(Debug)]
pub struct RecordingVerifier {
    inner: Arc<WebPkiServerVerifier>,
    provider: Arc<CryptoProvider>,
    result: Mutex<Option<CertResult>>,
}

impl RecordingVerifier {
    /// Build from trusted roots, using the ring provider.
    pub fn new(roots: Arc<RootCertStore>) -> Result<Arc<Self>, Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| Error::Config(format!("certificate verifier: {e}")))?;
        Ok(Arc::new(Self {
            inner,
            provider,
            result: Mutex::new(None),
        }))
    }

    /// The verdict of the last handshake, `None` before any certificate was
    /// seen (e.g. the handshake failed earlier).
    pub fn result(&self) -> Option<CertResult> {
        self.result
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A rustls client configuration (TLS 1.2 and 1.3, ring) that uses this
    /// verifier.
    pub fn client_config(self: &Arc<Self>) -> Result<rustls::ClientConfig, Error> {
        let config = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS versions: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(self.clone())
            .with_no_client_auth();
        Ok(config)
    }
}

impl ServerCertVerifier for RecordingVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        let class = CertResult::classify(&verdict);
        tracing::debug!(?class, "server certificate verdict recorded");
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(class);
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
