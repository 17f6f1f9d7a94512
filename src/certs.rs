//! `tollgate certs`: the deployment CA and one certificate per gateway, for gossip's mutual
//! TLS.
//!
//! Gateways gossip over QUIC and admit a peer only if its certificate chains to the
//! deployment CA *and* names one configured gateway (see [`crate::gossip::quic`]). This
//! module is the other half of that contract: it issues each gateway a certificate whose
//! only DNS SAN is `<instance>.<region>.tollgate.internal` (also the TLS server name a peer
//! dials), usable as server and client certificate alike (EKU serverAuth + clientAuth),
//! since every gateway both dials and accepts.
//!
//! Why one certificate per gateway rather than per region: the certificate is the only
//! thing a peer cannot forge, so it must name exactly what the gossip trusts a sender to
//! speak for. With a region certificate, any instance of the region could present itself
//! as any other (and take over or shadow its slot); with a gateway certificate a Hello can
//! only ever name the gateway that holds the key. Region certificates of earlier versions
//! are refused with a message that says how to reissue.
//!
//! Private keys are written with mode 0600 through a temporary file and a rename, so a key is
//! never readable by others, not even for a moment, and a crash never leaves half a file. An
//! existing CA is never replaced unless asked (`--force`): replacing it silently would cut
//! every region that still holds certificates from the old one off the mesh.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use chrono::{Datelike, Days, NaiveDate, Utc};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The DNS suffix of a gateway's name in its certificate:
/// `<instance>.<region>.tollgate.internal`.
pub const DNS_SUFFIX: &str = "tollgate.internal";
/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// How long the CA is valid.
const CA_VALIDITY_DAYS: u64 = 10 * 365;
/// How long a gateway certificate is valid.
const GATEWAY_VALIDITY_DAYS: u64 = 365;
/// Longest region or instance name (one DNS label).
const MAX_LABEL_LEN: usize = 63;
/// The instance `--regions` issues for, the one the shipped region files name.
pub const DEFAULT_INSTANCE: &str = "a";

/// What went wrong creating certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// No gateway was given.
    #[error("no gateways given: pass --gateways region/instance,... (or --regions)")]
    NoGateways,
    /// A region name that cannot be a DNS label.
    #[error(
        "bad region name {0:?}: use 1-63 lowercase letters, digits and inner hyphens (a DNS label), not only digits"
    )]
    BadRegion(String),
    /// An instance name that cannot be a DNS label.
    #[error(
        "bad instance name {0:?}: use 1-63 lowercase letters, digits and inner hyphens (a DNS label), not only digits"
    )]
    BadInstance(String),
    /// A `--gateways` item that is not `region/instance`.
    #[error("bad gateway {0:?}: expected region/instance, such as us-east/a")]
    BadGateway(String),
    /// The same gateway twice.
    #[error("gateway {0:?} given twice")]
    DuplicateGateway(String),
    /// A CA is already there and `--force` was not given.
    #[error(
        "{} already exists: replacing the CA cuts off every region holding certificates from it; pass --force to replace it",
        .0.display()
    )]
    CaExists(PathBuf),
    /// Reading or writing a file.
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Key or certificate generation.
    #[error("cannot generate {what}: {source}")]
    Generate {
        what: String,
        #[source]
        source: rcgen::Error,
    },
}

impl CertsError {
    /// Whether the arguments were at fault (as opposed to the file system or key generation).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Self::NoGateways
                | Self::BadRegion(_)
                | Self::BadInstance(_)
                | Self::BadGateway(_)
                | Self::DuplicateGateway(_)
                | Self::CaExists(_)
        )
    }
}

/// `tollgate certs` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write `ca.pem`, `ca.key` and `<region>.<instance>.pem` / `.key` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Gateways to issue certificates for, comma-separated `region/instance` (e.g.
    /// us-east/a,us-east/b,eu-west/a): one certificate each, naming that gateway only.
    #[arg(long, value_delimiter = ',', required_unless_present = "regions")]
    pub gateways: Vec<String>,
    /// Shorthand for `--gateways R/a,...`: instance `a` of each region (the instance the
    /// shipped region files name).
    #[arg(long, value_delimiter = ',', conflicts_with = "gateways")]
    pub regions: Vec<String>,
    /// Replace an existing CA (and every gateway certificate) in `--out`.
    #[arg(long)]
    pub force: bool,
}

impl CertsArgs {
    /// The gateways asked for, parsed and validated.
    pub fn gateways(&self) -> Result<Vec<Gateway>, CertsError> {
        if self.gateways.is_empty() {
            return self
                .regions
                .iter()
                .map(|region| Gateway::new(region, DEFAULT_INSTANCE))
                .collect();
        }
        self.gateways.iter().map(|item| item.parse()).collect()
    }
}

/// One gateway a certificate is issued for: its region and its instance within it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Gateway {
    pub region: String,
    pub instance: String,
}

impl Gateway {
    /// Validates both names (each a DNS label).
    pub fn new(region: &str, instance: &str) -> Result<Self, CertsError> {
        validate_region(region)?;
        validate_label(instance).map_err(|()| CertsError::BadInstance(instance.to_owned()))?;
        Ok(Self {
            region: region.to_owned(),
            instance: instance.to_owned(),
        })
    }

    /// The DNS name its certificate carries and peers dial it by:
    /// `<instance>.<region>.tollgate.internal`.
    pub fn dns_name(&self) -> String {
        gateway_dns_name(&self.region, &self.instance)
    }

    /// Its certificate's file name in `tollgate certs --out`: `<region>.<instance>.pem`.
    pub fn cert_file(&self) -> String {
        format!("{}.{}.pem", self.region, self.instance)
    }

    /// Its key's file name: `<region>.<instance>.key`.
    pub fn key_file(&self) -> String {
        format!("{}.{}.key", self.region, self.instance)
    }
}

impl std::fmt::Display for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.region, self.instance)
    }
}

impl std::str::FromStr for Gateway {
    type Err = CertsError;

    fn from_str(text: &str) -> Result<Self, CertsError> {
        let (region, instance) = text
            .trim()
            .split_once('/')
            .ok_or_else(|| CertsError::BadGateway(text.to_owned()))?;
        Self::new(region, instance)
    }
}

/// `<instance>.<region>.tollgate.internal`, the one name a gateway's certificate carries.
pub fn gateway_dns_name(region: &str, instance: &str) -> String {
    format!("{instance}.{region}.{DNS_SUFFIX}")
}

/// Paths of one gateway's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayFiles {
    pub gateway: Gateway,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub gateways: Vec<GatewayFiles>,
}

/// Runs `tollgate certs`: generates, then prints what was written.
pub fn run(args: &CertsArgs) -> Result<Generated, CertsError> {
    let generated = generate(&args.out, &args.gateways()?, args.force)?;
    println!(
        "CA: {} (key {})",
        generated.ca_cert.display(),
        generated.ca_key.display()
    );
    for files in &generated.gateways {
        println!(
            "{}: {} (key {})",
            files.gateway,
            files.cert.display(),
            files.key.display()
        );
    }
    Ok(generated)
}

/// Checks that `region` is a lowercase DNS label (so it can be part of a TLS server name).
pub fn validate_region(region: &str) -> Result<(), CertsError> {
    validate_label(region).map_err(|()| CertsError::BadRegion(region.to_owned()))
}

/// Whether `label` is a lowercase DNS label that cannot be read as a number: what a region
/// or instance name must be, since both are part of a certificate's name.
pub fn is_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= MAX_LABEL_LEN
        && label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !label.starts_with('-')
        && !label.ends_with('-')
        // An all-digit name could be read as (part of) an IP address.
        && !label.bytes().all(|b| b.is_ascii_digit())
}

fn validate_label(label: &str) -> Result<(), ()> {
    if is_dns_label(label) { Ok(()) } else { Err(()) }
}

/// Creates a CA and one certificate per gateway in `out` (created if missing). Refuses to
/// replace an existing CA unless `force`. All names are validated before anything is written.
pub fn generate(out: &Path, gateways: &[Gateway], force: bool) -> Result<Generated, CertsError> {
    if gateways.is_empty() {
        return Err(CertsError::NoGateways);
    }
    for (i, gateway) in gateways.iter().enumerate() {
        Gateway::new(&gateway.region, &gateway.instance)?;
        if gateways[..i].contains(gateway) {
            return Err(CertsError::DuplicateGateway(gateway.to_string()));
        }
    }
    let ca_cert_path = out.join(CA_CERT);
    let ca_key_path = out.join(CA_KEY);
    if !force {
        for path in [&ca_cert_path, &ca_key_path] {
            // `symlink_metadata` so that a dangling link still counts as "there".
            if path.symlink_metadata().is_ok() {
                return Err(CertsError::CaExists(path.clone()));
            }
        }
    }
    fs::create_dir_all(out).map_err(|source| CertsError::Io {
        path: out.to_owned(),
        source,
    })?;

    let today = Utc::now().date_naive();
    // A day of slack before "now" for peers whose clocks are a little behind.
    let not_before = today.checked_sub_days(Days::new(1)).unwrap_or(today);

    let ca_key = generate_key("the CA key")?;
    let mut ca_params = CertificateParams::default();
    ca_params.distinguished_name = distinguished_name("tollgate deployment CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(
        &mut ca_params,
        not_before,
        add_days(today, CA_VALIDITY_DAYS),
    );
    let ca_cert = ca_params
        .self_signed(&ca_key)
        .map_err(|source| CertsError::Generate {
            what: "the CA certificate".to_owned(),
            source,
        })?;
    let issuer = Issuer::new(ca_params, &ca_key);

    // Everything is generated before anything is written, so a failure leaves `out` as it was.
    let mut issued = Vec::with_capacity(gateways.len());
    for gateway in gateways {
        let key = generate_key(&format!("the key of {gateway}"))?;
        let mut params = CertificateParams::new(vec![gateway.dns_name()]).map_err(|source| {
            CertsError::Generate {
                what: format!("the certificate of {gateway}"),
                source,
            }
        })?;
        params.distinguished_name = distinguished_name(&gateway.to_string());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(
            &mut params,
            not_before,
            add_days(today, GATEWAY_VALIDITY_DAYS),
        );
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| CertsError::Generate {
                what: format!("the certificate of {gateway}"),
                source,
            })?;
        issued.push((gateway.clone(), cert.pem(), key.serialize_pem()));
    }

    // Gateway files first, the CA last: an interrupted run leaves no CA, so it can be rerun
    // without --force.
    let mut files = Vec::with_capacity(issued.len());
    for (gateway, cert_pem, key_pem) in issued {
        let cert = out.join(gateway.cert_file());
        let key = out.join(gateway.key_file());
        write_file(&key, key_pem.as_bytes(), 0o600)?;
        write_file(&cert, cert_pem.as_bytes(), 0o644)?;
        files.push(GatewayFiles { gateway, cert, key });
    }
    write_file(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644)?;
    Ok(Generated {
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        gateways: files,
    })
}

fn generate_key(what: &str) -> Result<KeyPair, CertsError> {
    KeyPair::generate().map_err(|source| CertsError::Generate {
        what: what.to_owned(),
        source,
    })
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "tollgate");
    name.push(DnType::CommonName, common_name);
    name
}

fn add_days(date: NaiveDate, days: u64) -> NaiveDate {
    date.checked_add_days(Days::new(days)).unwrap_or(date)
}

/// Sets a certificate's validity to whole days, `from` to `until` (midnight UTC).
fn set_validity(params: &mut CertificateParams, from: NaiveDate, until: NaiveDate) {
    // `date_time_ymd` panics only on an invalid date; a `NaiveDate`'s month (1-12, fits u8)
    // and day are valid by construction, and the dates here (today, plus at most ten years) are
    // within `time`'s year range (±9999).
    let convert = |d: NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
    params.not_before = convert(from);
    params.not_after = convert(until);
}

/// Writes `contents` to `path` with `mode`, through a fresh temporary file in the same
/// directory and a rename: the file is created with its final mode (a key is never briefly
/// world-readable) and replaces any previous file whole.
fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertsError> {
    let io_error = |source| CertsError::Io {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    // A leftover from a crashed run would make `create_new` fail.
    let _ = fs::remove_file(&temp);
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result.map_err(io_error)
}
