//! TLS material for gossip's mutual TLS: the deployment CA, this gateway's certificate and key.
//!
//! Every region both accepts and dials, so one [`PeerTls`] yields both a server config (which
//! *requires* a client certificate chaining to the CA) and a client config (which trusts only
//! the CA, never the system roots, and presents this gateway's certificate). TLS 1.3 only (QUIC
//! requires it) and exactly one crypto provider, `ring`, passed explicitly instead of relying
//! on a process-wide default that another crate could install differently.
//!
//! Which *gateway* a verified certificate names is read here too ([`name_of_cert`]), so the
//! naming convention of [`crate::certs`] is interpreted in one place.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

use crate::certs::DNS_SUFFIX;
use crate::crdt::Slot;

/// The ALPN protocol gossip speaks; a peer offering anything else fails the handshake.
pub const ALPN: &[u8] = b"tollgate-gossip/1";

/// What went wrong loading TLS material or building a TLS config.
///
/// Each message embeds its cause, so no variant also returns it as `source()`: a printer that
/// walks the chain (anyhow's report) would print the cause twice.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that cannot be read or parsed.
    #[error("{}: {error}", path.display())]
    Pem {
        path: PathBuf,
        error: rustls::pki_types::pem::Error,
    },
    /// A certificate file without certificates.
    #[error("{}: no certificate in the file", .0.display())]
    NoCertificate(PathBuf),
    /// The CA certificate is not a usable trust anchor.
    #[error("{}: not a usable CA certificate: {error}", path.display())]
    BadCa { path: PathBuf, error: rustls::Error },
    /// The client-certificate verifier could not be built.
    #[error("cannot build the client certificate verifier: {0}")]
    Verifier(rustls::server::VerifierBuilderError),
    /// rustls refused the configuration (e.g. a key that does not match the certificate).
    #[error("invalid TLS configuration: {0}")]
    Config(rustls::Error),
    /// The rustls config cannot run QUIC.
    #[error("TLS config unusable for QUIC: {0}")]
    Quic(quinn::crypto::rustls::NoInitialCipherSuite),
}

impl From<rustls::server::VerifierBuilderError> for TlsError {
    fn from(error: rustls::server::VerifierBuilderError) -> Self {
        Self::Verifier(error)
    }
}

impl From<rustls::Error> for TlsError {
    fn from(error: rustls::Error) -> Self {
        Self::Config(error)
    }
}

impl From<quinn::crypto::rustls::NoInitialCipherSuite> for TlsError {
    fn from(error: quinn::crypto::rustls::NoInitialCipherSuite) -> Self {
        Self::Quic(error)
    }
}

/// The CA, this gateway's certificate chain and its private key.
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
    /// Loads PEM files: the CA certificate, this gateway's certificate (chain) and its key.
    pub fn load(ca_path: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, TlsError> {
        let ca = read_certs(ca_path)?;
        let chain = read_certs(cert_path)?;
        let key = PrivateKeyDer::from_pem_file(key_path).map_err(|error| TlsError::Pem {
            path: key_path.to_owned(),
            error,
        })?;
        let mut roots = RootCertStore::empty();
        for cert in ca {
            roots.add(cert).map_err(|error| TlsError::BadCa {
                path: ca_path.to_owned(),
                error,
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
            chain,
            key,
        })
    }

    /// What our own certificate names (the gateway we present ourselves as).
    pub fn name(&self) -> CertName {
        self.chain
            .first()
            .map_or(CertName::Nothing, |cert| name_of_cert(cert))
    }

    /// The server side: requires a client certificate chaining to the CA (which gateway it
    /// names is checked after the handshake, against the configured gateways).
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

    /// The client side: trusts only the CA (the server name checked is the gateway dialled,
    /// `<instance>.<region>.tollgate.internal`) and presents this gateway's certificate.
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
    let pem_error = |error| TlsError::Pem {
        path: path.to_owned(),
        error,
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

/// What a certificate says it is, by the naming convention of [`crate::certs`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertName {
    /// Exactly one gateway: a DNS SAN `<instance>.<region>.tollgate.internal`.
    Gateway(Slot),
    /// A region certificate of an earlier version (`us-east`, `us-east.tollgate.internal`):
    /// it can stand for any instance of the region, so it is refused.
    RegionOnly(String),
    /// No gateway, or more than one.
    Nothing,
}

/// The gateway a certificate names (see [`CertName`]). Other qualified names (and
/// wildcards) are ignored; two different gateways name nothing, since one certificate must
/// stand for one peer.
///
/// Only meaningful for a certificate already verified against the CA (the SANs are read, not
/// checked); never panics on malformed input.
pub fn name_of_cert(cert: &CertificateDer<'_>) -> CertName {
    let Ok(cert) = webpki::EndEntityCert::try_from(cert) else {
        return CertName::Nothing;
    };
    let mut gateway: Option<Slot> = None;
    let mut region_only: Option<String> = None;
    for name in cert.valid_dns_names() {
        let name = name.to_ascii_lowercase();
        let labels = match name.strip_suffix(DNS_SUFFIX) {
            Some(prefix) => match prefix.strip_suffix('.') {
                Some(labels) => labels.to_owned(),
                None => continue,
            },
            // A bare label is how region certificates of earlier versions named the region.
            None if !name.is_empty() && !name.contains(['.', '*']) => {
                region_only.get_or_insert(name);
                continue;
            }
            None => continue,
        };
        if labels.contains('*') {
            continue;
        }
        match labels.split_once('.') {
            Some((instance, region)) if !instance.is_empty() && !region.contains('.') => {
                let found = Slot::new(region, instance);
                match &gateway {
                    None => gateway = Some(found),
                    Some(seen) if *seen == found => {}
                    Some(_) => return CertName::Nothing,
                }
            }
            None if !labels.is_empty() => {
                region_only.get_or_insert(labels);
            }
            _ => {}
        }
    }
    match (gateway, region_only) {
        (Some(gateway), _) => CertName::Gateway(gateway),
        (None, Some(region)) => CertName::RegionOnly(region),
        (None, None) => CertName::Nothing,
    }
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
    fn a_certificate_names_its_gateway() {
        assert_eq!(
            name_of_cert(&cert_with(&["a.us-east.tollgate.internal"])),
            CertName::Gateway(Slot::new("us-east", "a"))
        );
        // Unrelated qualified names and wildcards are ignored.
        assert_eq!(
            name_of_cert(&cert_with(&[
                "gw.example.com",
                "*.eu-west.tollgate.internal",
                "b.eu-west.tollgate.internal"
            ])),
            CertName::Gateway(Slot::new("eu-west", "b"))
        );
    }

    #[test]
    fn region_certificates_of_earlier_versions_are_recognised() {
        assert_eq!(
            name_of_cert(&cert_with(&["us-east", "us-east.tollgate.internal"])),
            CertName::RegionOnly("us-east".to_owned())
        );
        assert_eq!(
            name_of_cert(&cert_with(&["eu-west.tollgate.internal"])),
            CertName::RegionOnly("eu-west".to_owned())
        );
    }

    #[test]
    fn two_gateways_or_none_name_nothing() {
        assert_eq!(
            name_of_cert(&cert_with(&[
                "a.us-east.tollgate.internal",
                "b.us-east.tollgate.internal"
            ])),
            CertName::Nothing
        );
        assert_eq!(
            name_of_cert(&cert_with(&["gw.example.com"])),
            CertName::Nothing
        );
        assert_eq!(
            name_of_cert(&cert_with(&["x.a.us-east.tollgate.internal"])),
            CertName::Nothing
        );
        assert_eq!(
            name_of_cert(&CertificateDer::from(vec![0x30, 0x03, 1, 2])),
            CertName::Nothing
        );
    }
}
