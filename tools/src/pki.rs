//! The development PKI: a CA, the broker's server certificate, and client certificates for
//! cars (subject CN = O = VIN) and for the gateway, all PEM, made with rcgen.
//!
//! Files in a PKI directory (see `certs/README.md`):
//!
//! | file | what |
//! |---|---|
//! | `ca.pem`, `ca.key` | the development CA; brokers and clients trust `ca.pem` |
//! | `server.pem`, `server.key` | the broker's server certificate for `localhost` and `127.0.0.1` |
//! | `gateway.pem`, `gateway.key` | a client certificate for the gateway (CN = O = `gateway`), for brokers that require one from everybody (Mosquitto with `require_certificate`) |
//! | `VIN.pem`, `VIN.key` | a car's client certificate (CN = O = VIN) |
//! | `crl.pem` | the CA's certificate revocation list ([`revoke_cert`] adds to it) |
//!
//! The VIN is in both CN and O because the brokers read different fields for a client's
//! identity: rumqttd's `validate-tenant-prefix` takes the tenant from O, Mosquitto's
//! `use_identity_as_username` takes the user name from CN. Keys are ECDSA P-256 in PKCS#8
//! PEM (`-----BEGIN PRIVATE KEY-----`), which rustls, rumqttd and OpenSSL all read; key files
//! are written with mode 0600.
//!
//! Everything is written to temporary names first and renamed into place once all files are
//! written, so a failure part-way leaves the directory as it was.

use std::path::{Path, PathBuf};

use caas_protocol::Vin;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// The CA certificate's file name.
pub const CA_CERT: &str = "ca.pem";
/// The CA key's file name.
pub const CA_KEY: &str = "ca.key";
/// The broker server certificate's file name.
pub const SERVER_CERT: &str = "server.pem";
/// The broker server key's file name.
pub const SERVER_KEY: &str = "server.key";
/// The gateway client certificate's file name.
pub const GATEWAY_CERT: &str = "gateway.pem";
/// The gateway client key's file name.
pub const GATEWAY_KEY: &str = "gateway.key";
/// The identity (CN and O) of the gateway's client certificate.
pub const GATEWAY_IDENTITY: &str = "gateway";
/// The names the broker's server certificate is valid for.
pub const SERVER_NAMES: [&str; 2] = ["localhost", "127.0.0.1"];
/// How long the CA is valid.
pub const CA_VALIDITY_DAYS: i64 = 3650;
/// How long server and client certificates are valid.
pub const LEAF_VALIDITY_DAYS: i64 = 825;
/// Backdating of every `notBefore`, so a peer whose clock is a little behind accepts it.
pub const BACKDATE: Duration = Duration::hours(1);
/// Largest PEM file read back (a CA certificate or key is about 1 KB).
pub const MAX_PEM_FILE: u64 = 64 * 1024;
/// The revocation list's file name.
pub const CRL: &str = "crl.pem";
/// Most certificates one revocation list names: about 40 bytes each, so a list stays well
/// under the gateway's 16 MiB limit on the file (`--tls-crl`).
pub const MAX_REVOKED: usize = 100_000;
/// How long a revocation list is valid (its nextUpdate): OpenSSL (Mosquitto) refuses every
/// client once the list in force is past it, so `caasctl certs revoke` before then (it
/// signs the whole list again).
pub const CRL_VALIDITY_DAYS: i64 = LEAF_VALIDITY_DAYS;

/// Why a certificate could not be made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// Reading or writing a file failed.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done ("cannot write", ...).
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The CA files are missing or are not a CA.
    #[error("{path}: {reason} (make a CA with `caasctl certs init --out DIR`)")]
    BadCa {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A certificate to revoke was not issued by this CA.
    #[error("{path}: {reason}")]
    NotOurs {
        /// The certificate file.
        path: PathBuf,
        /// Why it is not this CA's.
        reason: String,
    },
    /// The revocation list on disk cannot be added to.
    #[error("{path}: {reason}")]
    BadCrl {
        /// The list's file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// A name is not allowed in a certificate.
    #[error("invalid certificate name {0:?}: a client identity is 1-64 ASCII letters and digits")]
    BadName(String),
    /// A server name is neither a DNS name nor an IP address.
    #[error(
        "invalid server name {0:?}: give a DNS name (letters, digits, '-' and '.', a leading \
         \"*.\" for a wildcard; at most 253 characters) or an IP address"
    )]
    BadServerName(String),
    /// rcgen refused.
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct PemPair {
    /// The certificate (`-----BEGIN CERTIFICATE-----`).
    pub cert_pem: String,
    /// The PKCS#8 private key (`-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
}

/// A certificate authority that can issue certificates, held in memory.
pub struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    cert_pem: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("subject", &self.cert.params().distinguished_name)
            .finish()
    }
}

fn validity(params: &mut CertificateParams, days: i64) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days);
}

fn name(cn: &str, o: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    dn.push(DnType::OrganizationName, o);
    dn
}

impl Ca {
    /// A fresh development CA ("CaaS Development CA" and a tag from its key), valid [`CA_VALIDITY_DAYS`], allowed to
    /// sign end-entity certificates only (path length 0).
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::default();
        // A tag from the CA's own public key tells two development CAs apart, so a
        // certificate from another one fails as "unknown issuer", not as a bad signature.
        let tag: String = key
            .public_key_raw()
            .iter()
            .skip(1)
            .take(4)
            .map(|b| format!("{b:02x}"))
            .collect();
        params.distinguished_name = name(&format!("CaaS Development CA {tag}"), "CaaS development");
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        validity(&mut params, CA_VALIDITY_DAYS);
        let cert = params.self_signed(&key)?;
        let cert_pem = cert.pem();
        Ok(Ca {
            cert,
            key,
            cert_pem,
        })
    }

    /// A CA from its certificate and key (PEM). Checks that the certificate is a CA and
    /// that the key is its key, so nothing is issued that would not verify.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaPemError> {
        let key =
            KeyPair::from_pem(key_pem).map_err(|_| CaPemError::Key("not a PEM private key"))?;
        let der = pem_cert_der(cert_pem).ok_or(CaPemError::Cert("not a PEM certificate"))?;
        let (_, x509) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| CaPemError::Cert("not a valid X.509 certificate"))?;
        if !x509.is_ca() {
            return Err(CaPemError::Cert(
                "not a CA certificate (no basicConstraints cA)",
            ));
        }
        if x509.public_key().raw != key.public_key_der().as_slice() {
            return Err(CaPemError::Key(
                "this key does not belong to the CA certificate",
            ));
        }
        let params = CertificateParams::from_ca_cert_der(&der.into())
            .map_err(|_| CaPemError::Cert("cannot read the CA's parameters"))?;
        // Re-signing gives a certificate object with the original's subject name, key and
        // key id, which is all issuing uses; the original `ca.pem` stays the trust anchor.
        let cert = params
            .self_signed(&key)
            .map_err(|_| CaPemError::Key("cannot sign with this key"))?;
        Ok(Ca {
            cert,
            key,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// Loads `ca.pem` and `ca.key` from `dir`.
    pub fn load(dir: &Path) -> Result<Self, PkiError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        let cert_pem = read_pem(&cert_path)?;
        let key_pem = read_pem(&key_path)?;
        Ca::from_pem(&cert_pem, &key_pem).map_err(|e| match e {
            CaPemError::Cert(reason) => PkiError::BadCa {
                path: cert_path,
                reason: reason.into(),
            },
            CaPemError::Key(reason) => PkiError::BadCa {
                path: key_path,
                reason: reason.into(),
            },
        })
    }

    /// The CA certificate (what peers trust).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn issue(&self, mut params: CertificateParams, days: i64) -> Result<PemPair, PkiError> {
        let key = KeyPair::generate()?;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        validity(&mut params, days);
        let cert = params.signed_by(&key, &self.cert, &self.key)?;
        Ok(PemPair {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A TLS server certificate for `names` (DNS names or IP addresses), CN = the first name.
    pub fn issue_server(&self, names: &[&str]) -> Result<PemPair, PkiError> {
        let owned: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let mut params =
            CertificateParams::new(owned).map_err(|_| PkiError::BadName(names.join(",")))?;
        let cn = names.first().copied().unwrap_or("server");
        params.distinguished_name = name(cn, "CaaS broker");
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.issue(params, LEAF_VALIDITY_DAYS)
    }

    /// A TLS client certificate whose subject CN and O are both `identity`.
    ///
    /// `identity` must be 1-64 ASCII letters and digits: rumqttd refuses any other character
    /// in a tenant id (O), and it is then safe as a Mosquitto user name and a file name too.
    pub fn issue_client(&self, identity: &str) -> Result<PemPair, PkiError> {
        if !valid_identity(identity) {
            return Err(PkiError::BadName(identity.to_owned()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = name(identity, identity);
        params.subject_alt_names = Vec::<SanType>::new();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, LEAF_VALIDITY_DAYS)
    }

    /// A car's client certificate: subject CN = O = the VIN.
    pub fn issue_car(&self, vin: &Vin) -> Result<PemPair, PkiError> {
        self.issue_client(vin.as_str())
    }

    /// The CA's revocation list number `number` naming `revoked`, signed, PEM.
    pub fn revocation_list(&self, number: u64, revoked: &[Revoked]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: now + Duration::days(CRL_VALIDITY_DAYS),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: r.at,
                    reason_code: r.reason.map(Reason::to_rcgen),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.cert, &self.key)?.pem()?)
    }

    /// Checks that `cert_pem` is a certificate this CA signed; returns its serial and subject
    /// Common Name.
    fn issued_here(&self, cert_pem: &str) -> Result<(Vec<u8>, String), String> {
        let der = pem_cert_der(cert_pem).ok_or("not a PEM certificate")?;
        let (_, cert) = x509_parser::parse_x509_certificate(&der)
            .map_err(|_| "not a valid X.509 certificate")?;
        let ca_der = pem_cert_der(&self.cert_pem).ok_or("the CA certificate is not PEM")?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|_| "the CA certificate does not parse")?;
        if cert.issuer().as_raw() != ca.subject().as_raw()
            || cert.verify_signature(Some(ca.public_key())).is_err()
        {
            return Err(format!(
                "not issued by this CA ({}): it names {} as its issuer",
                ca.subject(),
                cert.issuer()
            ));
        }
        let cn = cert
            .subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .unwrap_or_default()
            .to_owned();
        Ok((cert.raw_serial().to_vec(), cn))
    }

    /// Reads a revocation list this CA signed: its number and what it names.
    fn read_list(&self, pem: &str) -> Result<(u64, Vec<Revoked>), String> {
        let (_, parsed) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|_| "not PEM")?;
        if parsed.label != "X509 CRL" {
            return Err(format!("holds a {}, not an X509 CRL", parsed.label));
        }
        let (_, crl) = x509_parser::parse_x509_crl(&parsed.contents)
            .map_err(|_| "not a valid revocation list")?;
        let ca_der = pem_cert_der(&self.cert_pem).ok_or("the CA certificate is not PEM")?;
        let (_, ca) = x509_parser::parse_x509_certificate(&ca_der)
            .map_err(|_| "the CA certificate does not parse")?;
        if crl.issuer().as_raw() != ca.subject().as_raw()
            || crl.verify_signature(ca.public_key()).is_err()
        {
            return Err("not signed by this CA".into());
        }
        let number = crl
            .crl_number()
            .and_then(|n| u64::try_from(n).ok())
            .unwrap_or(0);
        let revoked = crl
            .iter_revoked_certificates()
            .map(|r| Revoked {
                serial: r.raw_serial().to_vec(),
                at: r.revocation_date.to_datetime(),
                reason: r
                    .reason_code()
                    .and_then(|(_, code)| Reason::from_code(code.0)),
            })
            .collect();
        Ok((number, revoked))
    }
}

/// One certificate a revocation list names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// Its serial number (DER integer bytes).
    pub serial: Vec<u8>,
    /// When it was revoked.
    pub at: OffsetDateTime,
    /// Why, if said.
    pub reason: Option<Reason>,
}

/// Why a certificate was revoked (RFC 5280 CRLReason, the ones a fleet uses).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[non_exhaustive]
pub enum Reason {
    /// No reason given.
    Unspecified,
    /// The unit's key may be known to someone else (a stolen or tampered unit).
    KeyCompromise,
    /// The car left the fleet or changed hands.
    AffiliationChanged,
    /// A new unit took its place (a telematics unit replaced).
    Superseded,
    /// The unit is out of service (a scrapped car).
    CessationOfOperation,
}

impl Reason {
    fn to_rcgen(self) -> RevocationReason {
        match self {
            Reason::Unspecified => RevocationReason::Unspecified,
            Reason::KeyCompromise => RevocationReason::KeyCompromise,
            Reason::AffiliationChanged => RevocationReason::AffiliationChanged,
            Reason::Superseded => RevocationReason::Superseded,
            Reason::CessationOfOperation => RevocationReason::CessationOfOperation,
        }
    }

    /// The reason a list's entry gives; `None` for codes a fleet does not use.
    fn from_code(code: u8) -> Option<Reason> {
        Some(match code {
            0 => Reason::Unspecified,
            1 => Reason::KeyCompromise,
            3 => Reason::AffiliationChanged,
            4 => Reason::Superseded,
            5 => Reason::CessationOfOperation,
            _ => return None,
        })
    }

    /// The name RFC 5280 gives it.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Unspecified => "unspecified",
            Reason::KeyCompromise => "keyCompromise",
            Reason::AffiliationChanged => "affiliationChanged",
            Reason::Superseded => "superseded",
            Reason::CessationOfOperation => "cessationOfOperation",
        }
    }
}

/// What [`revoke_cert`] did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// The list's file.
    pub crl: PathBuf,
    /// The revoked certificate's subject Common Name (a car's VIN).
    pub common_name: String,
    /// Its serial number (DER integer bytes).
    pub serial: Vec<u8>,
    /// False when the list already named it (nothing was written).
    pub newly_revoked: bool,
    /// The list's number now.
    pub crl_number: u64,
    /// How many certificates the list names now.
    pub revoked_count: usize,
}

/// What is wrong with a CA given as PEM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CaPemError {
    /// The certificate.
    #[error("{0}")]
    Cert(&'static str),
    /// The key.
    #[error("{0}")]
    Key(&'static str),
}

/// Longest client identity.
pub const MAX_IDENTITY_LEN: usize = 64;

/// A DNS name (labels of 1-63 letters, digits and inner '-', an optional leading "*." for a
/// wildcard) or an IP address, as a server certificate may name.
fn valid_server_name(s: &str) -> bool {
    if s.parse::<std::net::IpAddr>().is_ok() {
        return true;
    }
    let host = s.strip_prefix("*.").unwrap_or(s);
    !host.is_empty()
        && s.len() <= 253
        && host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

fn valid_identity(s: &str) -> bool {
    // rumqttd refuses a tenant id (O) with anything but letters and digits.
    !s.is_empty() && s.len() <= MAX_IDENTITY_LEN && s.bytes().all(|b| b.is_ascii_alphanumeric())
}

fn pem_cert_der(pem: &str) -> Option<Vec<u8>> {
    let (_, parsed) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
    (parsed.label == "CERTIFICATE").then_some(parsed.contents)
}

fn read_pem(path: &Path) -> Result<String, PkiError> {
    use std::io::Read;
    let file = std::fs::File::open(path).map_err(|source| PkiError::BadCa {
        path: path.to_owned(),
        reason: format!("cannot read: {source}"),
    })?;
    let mut text = String::new();
    file.take(MAX_PEM_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|source| PkiError::BadCa {
            path: path.to_owned(),
            reason: format!("cannot read: {source}"),
        })?;
    if text.len() as u64 > MAX_PEM_FILE {
        return Err(PkiError::BadCa {
            path: path.to_owned(),
            reason: format!("larger than {MAX_PEM_FILE} bytes"),
        });
    }
    Ok(text)
}

/// One file to write: its name, content and whether it is secret (mode 0600).
struct Out<'a> {
    name: String,
    text: &'a str,
    secret: bool,
}

/// Writes every file under a temporary name, then renames them all into place; on any
/// failure removes what it wrote, so the directory is left as it was.
fn write_all(dir: &Path, files: &[Out<'_>]) -> Result<Vec<PathBuf>, PkiError> {
    std::fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        action: "cannot create directory",
        path: dir.to_owned(),
        source,
    })?;
    let mut temps: Vec<PathBuf> = Vec::with_capacity(files.len());
    let cleanup = |temps: &[PathBuf]| {
        for t in temps {
            let _ = std::fs::remove_file(t);
        }
    };
    for f in files {
        let temp = dir.join(format!(".{}.tmp", f.name));
        if let Err(source) = write_file(&temp, f.text, f.secret) {
            cleanup(&temps);
            let _ = std::fs::remove_file(&temp);
            return Err(PkiError::Io {
                action: "cannot write",
                path: dir.join(&f.name),
                source,
            });
        }
        temps.push(temp);
    }
    let mut done = Vec::with_capacity(files.len());
    for (f, temp) in files.iter().zip(&temps) {
        let path = dir.join(&f.name);
        if let Err(source) = std::fs::rename(temp, &path) {
            cleanup(&temps);
            return Err(PkiError::Io {
                action: "cannot write",
                path,
                source,
            });
        }
        done.push(path);
    }
    Ok(done)
}

fn write_file(path: &Path, text: &str, secret: bool) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, if secret { 0o600 } else { 0o644 });
    let mut f = opts.open(path)?;
    #[cfg(unix)]
    if secret {
        // A leftover temp file keeps its old mode through open(); force it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(text.as_bytes())?;
    f.sync_all()
}

/// The files of a development PKI, as [`init_dev_pki`] wrote them.
#[derive(Debug, Clone)]
pub struct DevPkiFiles {
    /// `ca.pem`.
    pub ca_cert: PathBuf,
    /// `ca.key`.
    pub ca_key: PathBuf,
    /// `server.pem`.
    pub server_cert: PathBuf,
    /// `server.key`.
    pub server_key: PathBuf,
    /// `gateway.pem`.
    pub gateway_cert: PathBuf,
    /// `gateway.key`.
    pub gateway_key: PathBuf,
    /// `crl.pem`, the CA's revocation list (empty).
    pub crl: PathBuf,
}

/// A certificate file and its key file.
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// The certificate (`NAME.pem`).
    pub cert: PathBuf,
    /// Its key (`NAME.key`, mode 0600).
    pub key: PathBuf,
}

/// Makes a new development PKI in `dir` (created if missing): `ca.pem`, `ca.key`,
/// `server.pem`, `server.key`, `gateway.pem`, `gateway.key`. Replaces any PKI already there
/// (certificates issued by the old CA stop verifying).
pub fn init_dev_pki(dir: &Path) -> Result<DevPkiFiles, PkiError> {
    let ca = Ca::generate()?;
    let server = ca.issue_server(&SERVER_NAMES)?;
    let gateway = ca.issue_client(GATEWAY_IDENTITY)?;
    let ca_key = ca.key_pem();
    // An empty list from the start, so brokers can be pointed at it before any revocation.
    let crl = ca.revocation_list(1, &[])?;
    let out = |name: &str, text, secret| Out {
        name: name.to_owned(),
        text,
        secret,
    };
    write_all(
        dir,
        &[
            out(CA_CERT, ca.cert_pem(), false),
            out(CA_KEY, &ca_key, true),
            out(SERVER_CERT, &server.cert_pem, false),
            out(SERVER_KEY, &server.key_pem, true),
            out(GATEWAY_CERT, &gateway.cert_pem, false),
            out(GATEWAY_KEY, &gateway.key_pem, true),
            out(CRL, &crl, false),
        ],
    )?;
    Ok(DevPkiFiles {
        ca_cert: dir.join(CA_CERT),
        ca_key: dir.join(CA_KEY),
        server_cert: dir.join(SERVER_CERT),
        server_key: dir.join(SERVER_KEY),
        gateway_cert: dir.join(GATEWAY_CERT),
        gateway_key: dir.join(GATEWAY_KEY),
        crl: dir.join(CRL),
    })
}

/// Revokes the certificate in `cert` (issued by the CA in `ca_dir`): adds it to the CA's
/// revocation list `ca_dir/crl.pem` (made if missing), numbered one above the list before,
/// all of it signed again. A certificate the list already names changes nothing.
pub fn revoke_cert(
    ca_dir: &Path,
    cert: &Path,
    reason: Option<Reason>,
) -> Result<Revocation, PkiError> {
    let ca = Ca::load(ca_dir)?;
    let cert_pem = read_pem(cert)?;
    let (serial, common_name) = ca
        .issued_here(&cert_pem)
        .map_err(|reason| PkiError::NotOurs {
            path: cert.to_owned(),
            reason,
        })?;
    let crl_path = ca_dir.join(CRL);
    let (number, mut revoked) = if crl_path.exists() {
        let pem = read_crl_file(&crl_path)?;
        ca.read_list(&pem).map_err(|reason| PkiError::BadCrl {
            path: crl_path.clone(),
            reason,
        })?
    } else {
        (0, Vec::new())
    };
    if revoked.iter().any(|r| r.serial == serial) {
        return Ok(Revocation {
            crl: crl_path,
            common_name,
            serial,
            newly_revoked: false,
            crl_number: number,
            revoked_count: revoked.len(),
        });
    }
    if revoked.len() >= MAX_REVOKED {
        return Err(PkiError::BadCrl {
            path: crl_path,
            reason: format!("already names {MAX_REVOKED} certificates, the most one list holds"),
        });
    }
    revoked.push(Revoked {
        serial: serial.clone(),
        at: OffsetDateTime::now_utc(),
        reason,
    });
    let number = number + 1;
    let pem = ca.revocation_list(number, &revoked)?;
    write_all(
        ca_dir,
        &[Out {
            name: CRL.to_owned(),
            text: &pem,
            secret: false,
        }],
    )?;
    Ok(Revocation {
        crl: crl_path,
        common_name,
        serial,
        newly_revoked: true,
        crl_number: number,
        revoked_count: revoked.len(),
    })
}

/// Reads a revocation list file, bounded by [`MAX_REVOKED`] entries' worth of bytes.
fn read_crl_file(path: &Path) -> Result<String, PkiError> {
    use std::io::Read;
    const MAX_CRL_FILE: u64 = MAX_PEM_FILE + 64 * MAX_REVOKED as u64;
    let bad = |reason: String| PkiError::BadCrl {
        path: path.to_owned(),
        reason,
    };
    let file = std::fs::File::open(path).map_err(|e| bad(format!("cannot read: {e}")))?;
    let mut text = String::new();
    file.take(MAX_CRL_FILE + 1)
        .read_to_string(&mut text)
        .map_err(|e| bad(format!("cannot read: {e}")))?;
    if text.len() as u64 > MAX_CRL_FILE {
        return Err(bad(format!("larger than {MAX_CRL_FILE} bytes")));
    }
    Ok(text)
}

/// Issues a client certificate with CN = O = `identity`, signed by the CA in `ca_dir`, into
/// `out/IDENTITY.pem` and `out/IDENTITY.key` (replacing them if present).
pub fn issue_client_cert(ca_dir: &Path, identity: &str, out: &Path) -> Result<CertFiles, PkiError> {
    let ca = Ca::load(ca_dir)?;
    let pair = ca.issue_client(identity)?;
    write_pair(out, identity, &pair)
}

/// Issues a TLS server certificate for `names` (DNS names or IP addresses; CN = the first),
/// signed by the CA in `ca_dir`, into `out/STEM.pem` and `out/STEM.key` (replacing them if
/// present): the IoT API's (`--https-cert`) or a broker's, on a host the development PKI's
/// `server.pem` (localhost, 127.0.0.1) does not name. `stem` defaults to the first name.
pub fn issue_server_cert(
    ca_dir: &Path,
    names: &[&str],
    stem: Option<&str>,
    out: &Path,
) -> Result<CertFiles, PkiError> {
    let first = names
        .first()
        .ok_or_else(|| PkiError::BadServerName(String::new()))?;
    if let Some(bad) = names.iter().find(|n| !valid_server_name(n)) {
        return Err(PkiError::BadServerName((*bad).to_owned()));
    }
    let stem = stem.unwrap_or(first).replace('*', "wildcard");
    if !valid_server_name(&stem) || stem.contains(':') {
        return Err(PkiError::BadServerName(stem));
    }
    let ca = Ca::load(ca_dir)?;
    let pair = ca.issue_server(names)?;
    write_pair(out, &stem, &pair)
}

/// Issues a car's client certificate (CN = O = VIN), signed by the CA in `ca_dir`, into
/// `out/VIN.pem` and `out/VIN.key` (replacing them if present).
pub fn issue_car_cert(ca_dir: &Path, vin: &Vin, out: &Path) -> Result<CertFiles, PkiError> {
    issue_client_cert(ca_dir, vin.as_str(), out)
}

fn write_pair(out: &Path, stem: &str, pair: &PemPair) -> Result<CertFiles, PkiError> {
    let cert = format!("{stem}.pem");
    let key = format!("{stem}.key");
    write_all(
        out,
        &[
            Out {
                name: cert.clone(),
                text: &pair.cert_pem,
                secret: false,
            },
            Out {
                name: key.clone(),
                text: &pair.key_pem,
                secret: true,
            },
        ],
    )?;
    Ok(CertFiles {
        cert: out.join(cert),
        key: out.join(key),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_reloaded_from_pem_is_the_same_issuer() {
        let ca = Ca::generate().unwrap();
        let again = Ca::from_pem(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(
            again.cert.params().distinguished_name,
            ca.cert.params().distinguished_name
        );
        assert_eq!(again.cert.key_identifier(), ca.cert.key_identifier());
    }

    #[test]
    fn a_ca_refuses_a_foreign_key_and_a_leaf_certificate() {
        let ca = Ca::generate().unwrap();
        let other = Ca::generate().unwrap();
        assert_eq!(
            Ca::from_pem(ca.cert_pem(), &other.key_pem()).err(),
            Some(CaPemError::Key(
                "this key does not belong to the CA certificate"
            ))
        );
        let leaf = ca.issue_client("x").unwrap();
        assert!(matches!(
            Ca::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(CaPemError::Cert(_))
        ));
        assert!(matches!(
            Ca::from_pem("junk", &ca.key_pem()),
            Err(CaPemError::Cert(_))
        ));
    }

    #[test]
    fn server_names_are_dns_names_or_addresses() {
        for good in [
            "gateway.example.com",
            "localhost",
            "*.fleet.example",
            "10.0.0.7",
            "::1",
            "a-b.c",
        ] {
            assert!(valid_server_name(good), "{good}");
        }
        for bad in [
            "",
            "*.",
            "a..b",
            "-a.b",
            "a-.b",
            "a b",
            "a/b",
            "a*.b",
            &"x".repeat(64),
        ] {
            assert!(!valid_server_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn identities_are_plain() {
        assert!(valid_identity("WVWZZZ1JZXW000001"));
        assert!(valid_identity(GATEWAY_IDENTITY));
        assert!(valid_identity("gateway2"));
        for bad in [
            "",
            ".x",
            "a/b",
            "a b",
            "a,O=evil",
            "caas-gateway",
            "a_b",
            &"x".repeat(65),
        ] {
            assert!(!valid_identity(bad), "{bad:?}");
        }
    }
}
