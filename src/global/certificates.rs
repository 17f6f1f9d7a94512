//! The gossip certificate files at start-up (and for `tollgate gateway --check`): each file
//! present, loadable, and our certificate naming this very gateway. A file that is not there
//! is the usual first-run mistake, so its error says which `tollgate certs` command makes it.

use std::path::Path;

use super::GlobalError;
use crate::config::{GossipSettings, RegionConfig};
use crate::crdt::Slot;
use crate::gossip::tls::{CertName, PeerTls};

/// Loads the CA, our certificate and key, and checks that the certificate names us.
pub(super) fn load(
    config: &RegionConfig,
    settings: &GossipSettings,
) -> Result<PeerTls, GlobalError> {
    for (what, path) in [
        ("CA certificate", &settings.ca),
        ("certificate", &settings.cert),
        ("key", &settings.key),
    ] {
        // An error other than "not there" (a permission, say) is left to the load, which
        // reports it with the file's name.
        if let Ok(false) = path.try_exists() {
            return Err(GlobalError::MissingFile {
                what,
                path: path.clone(),
                make: how_to_make(what, path, settings),
            });
        }
    }
    let tls = PeerTls::load(&settings.ca, &settings.cert, &settings.key)?;
    let me = Slot::new(config.region.clone(), settings.instance.clone());
    check_own_certificate(&tls, &me, settings)?;
    Ok(tls)
}

/// `tollgate gateway --check`: the certificate files as a start would load them. Returns the
/// gateway they were checked for (`None`: the config does not gossip, so needs none).
pub fn check_certificates(config: &RegionConfig) -> Result<Option<Slot>, GlobalError> {
    let Some(settings) = &config.gossip else {
        return Ok(None);
    };
    load(config, settings)?;
    Ok(Some(Slot::new(
        config.region.clone(),
        settings.instance.clone(),
    )))
}

/// The `tollgate certs` command that writes `path`: every configured gateway's certificate
/// comes from one run, which also makes the CA. Where a CA already sits next to the missing
/// file, the command must replace it, which the operator has to know.
fn how_to_make(what: &str, path: &Path, settings: &GossipSettings) -> String {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let gateways = settings
        .slots()
        .iter()
        .map(Slot::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let command = format!(
        "tollgate certs --out {} --gateways {gateways}",
        dir.display()
    );
    let ca_there = dir.join(crate::certs::CA_CERT).exists();
    if what == "CA certificate" || !ca_there {
        format!("`{command}` makes it (with the CA and every gateway's certificate and key)")
    } else {
        format!(
            "`{command} --force` makes it, replacing the CA in {} (every gateway then needs \
             its new files); or copy it from where that CA was made",
            dir.display()
        )
    }
}

/// Our certificate must name this very gateway: peers admit a connection as the gateway its
/// certificate names, so any other name would be refused by every peer (and a region
/// certificate of an earlier version by all of them).
fn check_own_certificate(
    tls: &PeerTls,
    me: &Slot,
    settings: &GossipSettings,
) -> Result<(), GlobalError> {
    let reissue = format!(
        "issue one certificate per gateway with `tollgate certs --out DIR --gateways {},...` \
         and point `cert`/`key` at {}'s files",
        me,
        crate::certs::Gateway {
            region: me.region.clone(),
            instance: me.instance.clone(),
        }
        .cert_file()
    );
    let message = match tls.name() {
        CertName::Gateway(named) if named == *me => return Ok(()),
        CertName::Gateway(named) => format!("names gateway {named}, but this gateway is {me}"),
        CertName::RegionOnly(region) => format!(
            "is a per-region certificate (region {region:?}) of an earlier version, which \
             peers refuse: {reissue}"
        ),
        CertName::Nothing => format!("names no single gateway: {reissue}"),
    };
    Err(GlobalError::Certificate {
        path: settings.cert.clone(),
        message,
    })
}
