//! `tollgate certs`: the deployment CA and one certificate per region, for gossip's mutual TLS.
//!
//! Regions gossip over QUIC and admit a peer only if its certificate chains to the deployment
//! CA *and* names a configured region (see [`crate::gossip::quic`]). This module is the other
//! half of that contract: it issues certificates whose DNS SANs name the region both bare
//! (`us-east`, the TLS server name a peer dials) and qualified (`us-east.tollgate.internal`),
//! usable as server and client certificate alike (EKU serverAuth + clientAuth), since every
//! region both dials and accepts.
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

/// The DNS suffix of the qualified region name in a certificate: `<region>.tollgate.internal`.
pub const DNS_SUFFIX: &str = "tollgate.internal";
/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// How long the CA is valid.
const CA_VALIDITY_DAYS: u64 = 10 * 365;
/// How long a region certificate is valid.
const REGION_VALIDITY_DAYS: u64 = 365;
/// Longest region name (one DNS label).
const MAX_REGION_LEN: usize = 63;

/// What went wrong creating certificates.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// No region was given.
    #[error("no regions given")]
    NoRegions,
    /// A region name that cannot be a DNS label.
    #[error(
        "bad region name {0:?}: use 1-63 lowercase letters, digits and inner hyphens (a DNS label)"
    )]
    BadRegion(String),
    /// The same region twice.
    #[error("region {0:?} given twice")]
    DuplicateRegion(String),
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
            Self::NoRegions | Self::BadRegion(_) | Self::DuplicateRegion(_) | Self::CaExists(_)
        )
    }
}

/// `tollgate certs` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// Directory to write `ca.pem`, `ca.key` and `<region>.pem`, `<region>.key` into.
    #[arg(long)]
    pub out: PathBuf,
    /// Regions to issue certificates for, comma-separated (e.g. us-east,eu-west,ap-south).
    #[arg(long, value_delimiter = ',', required = true)]
    pub regions: Vec<String>,
    /// Replace an existing CA (and every region certificate) in `--out`.
    #[arg(long)]
    pub force: bool,
}

/// Paths of one region's certificate and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionFiles {
    pub region: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// What [`generate`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generated {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub regions: Vec<RegionFiles>,
}

/// Runs `tollgate certs`: generates, then prints what was written.
pub fn run(args: &CertsArgs) -> Result<Generated, CertsError> {
    let generated = generate(&args.out, &args.regions, args.force)?;
    println!(
        "CA: {} (key {})",
        generated.ca_cert.display(),
        generated.ca_key.display()
    );
    for files in &generated.regions {
        println!(
            "{}: {} (key {})",
            files.region,
            files.cert.display(),
            files.key.display()
        );
    }
    Ok(generated)
}

/// Checks that `region` is a lowercase DNS label (so it can be a TLS server name and a SAN).
pub fn validate_region(region: &str) -> Result<(), CertsError> {
    let ok = !region.is_empty()
        && region.len() <= MAX_REGION_LEN
        && region
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !region.starts_with('-')
        && !region.ends_with('-')
        // An all-digit name could be read as (part of) an IP address.
        && !region.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(CertsError::BadRegion(region.to_owned()))
    }
}

/// The DNS names a region's certificate carries: the bare region and the qualified name.
pub fn region_dns_names(region: &str) -> [String; 2] {
    [region.to_owned(), format!("{region}.{DNS_SUFFIX}")]
}

/// Creates a CA and one certificate per region in `out` (created if missing). Refuses to
/// replace an existing CA unless `force`. All names are validated before anything is written.
pub fn generate(out: &Path, regions: &[String], force: bool) -> Result<Generated, CertsError> {
    if regions.is_empty() {
        return Err(CertsError::NoRegions);
    }
    for (i, region) in regions.iter().enumerate() {
        validate_region(region)?;
        if regions[..i].contains(region) {
            return Err(CertsError::DuplicateRegion(region.clone()));
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
    let mut issued = Vec::with_capacity(regions.len());
    for region in regions {
        let key = generate_key(&format!("the key of {region}"))?;
        let mut params =
            CertificateParams::new(region_dns_names(region).to_vec()).map_err(|source| {
                CertsError::Generate {
                    what: format!("the certificate of {region}"),
                    source,
                }
            })?;
        params.distinguished_name = distinguished_name(region);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        set_validity(
            &mut params,
            not_before,
            add_days(today, REGION_VALIDITY_DAYS),
        );
        let cert = params
            .signed_by(&key, &issuer)
            .map_err(|source| CertsError::Generate {
                what: format!("the certificate of {region}"),
                source,
            })?;
        issued.push((region.clone(), cert.pem(), key.serialize_pem()));
    }

    // Region files first, the CA last: an interrupted run leaves no CA, so it can be rerun
    // without --force.
    let mut files = Vec::with_capacity(issued.len());
    for (region, cert_pem, key_pem) in issued {
        let cert = out.join(format!("{region}.pem"));
        let key = out.join(format!("{region}.key"));
        write_file(&key, key_pem.as_bytes(), 0o600)?;
        write_file(&cert, cert_pem.as_bytes(), 0o644)?;
        files.push(RegionFiles { region, cert, key });
    }
    write_file(&ca_key_path, ca_key.serialize_pem().as_bytes(), 0o600)?;
    write_file(&ca_cert_path, ca_cert.pem().as_bytes(), 0o644)?;
    Ok(Generated {
        ca_cert: ca_cert_path,
        ca_key: ca_key_path,
        regions: files,
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
