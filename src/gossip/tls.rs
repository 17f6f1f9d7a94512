//! TLS material for gossip's mutual TLS: the deployment CA, this region's certificate and key.
//!
//! Every region both accepts and dials, so one [`PeerTls`] yields both a server config (which
//! *requires* a client certificate chaining to the CA) and a client config (which trusts only
//! the CA, never the system roots, and presents this region's certificate). TLS 1.3 only (QUIC
//! requires it) and exactly one crypto provider, `ring`, passed explicitly instead of relying
//! on a process-wide default that another crate could install differently.
//!
//! Which *region* a verified certificate names is read here too ([`region_of_cert`]), so the
//! naming convention of [`crate::certs`] is interpreted in one place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::certs::DNS_SUFFIX;

/// The ALPN protocol gossip speaks; a peer offering anything else fails the handshake.
pub const ALPN: &[u8] = b"tollgate-gossip/1";

/// What went wrong loading TLS material or building a TLS config.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that cannot be read or parsed.
    #[error("{}: {source}", path.display())]
    Pem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file without certificates.
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    /// The CA certificate is not a usable trust anchor.
    #[error("{}: not a usable CA certificate: {source}", path.display())]
    BadCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The rustls config cannot run QUIC.
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
}

/// The CA, this region's certificate chain and its private key.
#[derive(Debug)]
pub struct PeerTls {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

impl Clone for PeerTls {
    fn clone(&self) -> Self {
        Self {
            roots: self.roots.clone(),
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl PeerTls {
    /// Loads PEM files: the CA certificate, this region's certificate (chain) and its key.
    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let ca = read_certs(ca_path)?;
        let chain = read_certs(cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|source| TlsError::Pem {
            path: key_path.to_owned(),
            source,
        })?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|source| TlsError::BadCa {
                path: ca_path.to_owned(),
                source,
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// The server side: requires a client certificate chaining to the CA (which region it
    /// names is checked after the handshake, against the configured regions).
    pub fn server_config(&self) -> Result<rustls::ServerConfig, TlsError> {
        let provider = provider();
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), provider.clone())
                .build()?;
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }

    /// The client side: trusts only the CA (the server name checked is the region dialled)
    /// and presents this region's certificate.
    pub fn client_config(&self) -> Result<rustls::ClientConfig, TlsError> {
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        config.alpn_protocols = vec![ALPN.to_vec()];
        Ok(config)
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem_error = |source| TlsError::Pem {
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem_error)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem_error)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_owned()));
    }
    Ok(certs)
}

/// The region a certificate names, if it names exactly one: from its DNS SANs, a bare label
/// (`us-east`) or one under [`DNS_SUFFIX`] (`us-east.tollgate.internal`). A certificate naming
/// two different regions, or none, names no region: it cannot stand for a single peer.
///
/// Only meaningful for a certificate already verified against the CA (the SANs are read, not
/// checked); never panics on malformed input.
pub fn region_of_cert(cert: &CertificateDer<'_>) -> Option<String> {
    let cert = webpki::EndEntityCert::try_from(cert).ok()?;
    let mut region: Option<&str> = None;
    for name in cert.valid_dns_names() {
        let candidate = match name.strip_suffix(DNS_SUFFIX) {
            Some(prefix) => match prefix.strip_suffix('.') {
                Some(label) => label,
                None => continue,
            },
            None => name,
        };
        // Other qualified names (and wildcards) are not region names: ignore them.
        if candidate.is_empty() || candidate.contains(['.', '*']) {
            continue;
        }
        match region {
            None => region = Some(candidate),
            Some(seen) if seen.eq_ignore_ascii_case(candidate) => {}
            Some(_) => return None,
        }
    }
    region.map(str::to_ascii_lowercase)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert_with(names: &[&str]) -> CertificateDer<'static> {
        let key = rcgen::KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let params = rcgen::CertificateParams::new(names).unwrap();
        params.self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn a_certificate_names_its_region_bare_or_qualified() {
        assert_eq!(
            region_of_cert(&cert_with(&["us-east", "us-east.tollgate.internal"])).as_deref(),
            Some("us-east")
        );
        assert_eq!(
            region_of_cert(&cert_with(&["eu-west.tollgate.internal"])).as_deref(),
            Some("eu-west")
        );
        // Unrelated qualified names and wildcards are not regions.
        assert_eq!(
            region_of_cert(&cert_with(&[
                "ap-south",
                "gw.example.com",
                "*.tollgate.internal"
            ]))
            .as_deref(),
            Some("ap-south")
        );
    }

    #[test]
    fn two_regions_or_none_name_no_region() {
        assert_eq!(region_of_cert(&cert_with(&["us-east", "eu-west"])), None);
        assert_eq!(
            region_of_cert(&cert_with(&["us-east", "eu-west.tollgate.internal"])),
            None
        );
        assert_eq!(region_of_cert(&cert_with(&["gw.example.com"])), None);
        assert_eq!(
            region_of_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2])),
            None
        );
    }
}
