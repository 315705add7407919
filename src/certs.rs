//! Certificate generation: the development CA and serving certificate behind `serve --dev`, and the
//! `secrets-webhook certs` command that makes a CA and a serving certificate for the webhook's
//! Service (the self-managed alternative to cert-manager, see `certs/README.md`).
//!
//! Keys are ECDSA P-256 (rcgen with ring). Every certificate written here is checked with the same
//! verifier a TLS client uses (rustls' webpki verifier) before anything is reused or reported.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::PublicKeyData as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use time::OffsetDateTime;

/// Common name of the development CA made by [`ensure_dev_certs`].
pub const DEV_CA_COMMON_NAME: &str = "secrets-webhook dev CA";
/// Common name of the CA made by `secrets-webhook certs`.
pub const CA_COMMON_NAME: &str = "secrets-webhook CA";
/// Certificates closer than this to their expiry are not reused.
const MIN_REMAINING: Duration = Duration::from_secs(24 * 60 * 60);
/// Backdating of `notBefore`, so that a node whose clock lags a little still accepts a new certificate.
const CLOCK_SKEW: time::Duration = time::Duration::minutes(5);
/// Lifetime of the development CA and serving certificate.
const DEV_DAYS: u32 = 365;

/// Errors of certificate generation; `Display` is the text the user sees.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot create directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate")]
    NoCertificate { path: PathBuf },
    #[error("{path} holds no usable PEM private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("--reuse-ca: {path} is not a CA certificate this tool can sign with: {reason}")]
    BadCa { path: PathBuf, reason: String },
    #[error(
        "--reuse-ca needs an existing CA in {dir} (ca.pem and ca.key); run once without --reuse-ca to create one"
    )]
    MissingCa { dir: PathBuf },
    #[error(
        "{what} {value:?} is not a valid DNS label (lowercase letters, digits and '-', at most 63)"
    )]
    InvalidName { what: &'static str, value: String },
    #[error(
        "{dir} already holds a CA: pass --reuse-ca to sign a new serving certificate with it, or --new-ca to replace it (then update caBundle)"
    )]
    CaExists { dir: PathBuf },
    #[error("--days and --ca-days must be between 2 and 3650, got {0}")]
    InvalidDays(u32),
    #[error(
        "the CA in {path} expires in less than the new certificate's lifetime; rotate the CA (run without --reuse-ca)"
    )]
    CaExpiresTooSoon { path: PathBuf },
    #[error("cannot generate a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("the new certificate does not verify against its CA for {name}: {reason}")]
    Verify { name: String, reason: String },
}

/// Paths of the development CA and serving certificate written by [`ensure_dev_certs`].
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Creates (or reuses, if still valid) a development CA and a serving certificate for `localhost`
/// and `127.0.0.1` in `dir` (`ca.pem`, `tls.crt`, `tls.key`). `tls.crt` holds the chain (leaf, CA);
/// `tls.key` is written with mode 0600. The CA key is not kept: a renewal makes a new CA.
pub fn ensure_dev_certs(dir: &Path) -> Result<DevCerts, CertError> {
    std::fs::create_dir_all(dir).map_err(|source| CertError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let files = DevCerts {
        ca: dir.join("ca.pem"),
        cert: dir.join("tls.crt"),
        key: dir.join("tls.key"),
    };
    let names = dev_names();
    match check_existing(
        &files.ca,
        &files.cert,
        &files.key,
        &names,
        SystemTime::now(),
    ) {
        Ok(()) => {
            tracing::debug!(dir = %dir.display(), "reusing development certificate");
            return Ok(files);
        }
        Err(reason) => {
            tracing::info!(dir = %dir.display(), %reason, "generating a development certificate");
        }
    }
    let ca = new_ca(DEV_CA_COMMON_NAME, DEV_DAYS)?;
    let leaf = new_leaf(&ca, "localhost", &names, DEV_DAYS)?;
    write_file(&files.key, leaf.key_pem.as_bytes(), true)?;
    write_file(&files.cert, leaf.chain_pem(&ca).as_bytes(), false)?;
    write_file(&files.ca, ca.cert_pem.as_bytes(), false)?;
    Ok(files)
}

/// Arguments of `secrets-webhook certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// The webhook's Service name (the certificate names `<service>.<namespace>.svc` and its short forms).
    #[arg(long, default_value = "secrets-webhook")]
    pub service: String,
    /// The webhook's namespace.
    #[arg(long, default_value = "iomete-system")]
    pub namespace: String,
    /// Where `ca.pem`, `ca.key`, `tls.crt` (leaf + CA) and `tls.key` are written.
    #[arg(long, default_value = "secrets-webhook-certs")]
    pub out_dir: PathBuf,
    /// Lifetime of the serving certificate, in days.
    #[arg(long, default_value_t = 365)]
    pub days: u32,
    /// Lifetime of a new CA, in days.
    #[arg(long, default_value_t = 3650)]
    pub ca_days: u32,
    /// Sign a new serving certificate with the CA already in --out-dir (rotation keeps the caBundle).
    #[arg(long, conflicts_with = "new_ca")]
    pub reuse_ca: bool,
    /// Replace a CA already in --out-dir (the webhook's caBundle must then be updated).
    #[arg(long)]
    pub new_ca: bool,
    /// Print a `kubernetes.io/tls` Secret manifest on stdout (the files are written as well).
    #[arg(long)]
    pub secret_yaml: bool,
    /// Name of the Secret printed by --secret-yaml (the Deployment mounts `secrets-webhook-tls`).
    #[arg(long, default_value = "secrets-webhook-tls")]
    pub secret_name: String,
}

/// What `secrets-webhook certs` produced.
#[derive(Debug, Clone)]
pub struct Issued {
    pub ca_pem: String,
    pub chain_pem: String,
    pub key_pem: String,
    /// `caBundle` for the MutatingWebhookConfiguration: base64 of `ca_pem`.
    pub ca_bundle: String,
    /// True when an existing CA signed the new certificate.
    pub reused_ca: bool,
}

/// `secrets-webhook certs`.
pub fn run(args: CertsArgs) -> anyhow::Result<()> {
    let issued = issue(&args)?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let dir = args.out_dir.display();
    let what = if issued.reused_ca {
        "a new serving certificate signed by the existing CA"
    } else {
        "a new CA and serving certificate"
    };
    eprintln!(
        "wrote {what} for {}.{}.svc to {dir} (ca.pem, ca.key, tls.crt, tls.key); keep ca.key private",
        args.service, args.namespace
    );
    if args.secret_yaml {
        out.write_all(secret_yaml(&args, &issued)?.as_bytes())?;
        eprintln!("caBundle (base64 of {dir}/ca.pem):\n{}", issued.ca_bundle);
        eprintln!("{}", patch_hint(&issued.ca_bundle));
    } else {
        writeln!(out, "{}", issued.ca_bundle)?;
        eprintln!("the line above is the caBundle (base64 of {dir}/ca.pem)");
        eprintln!("{}", patch_hint(&issued.ca_bundle));
    }
    Ok(())
}

/// Creates (or, with `reuse_ca`, loads) the CA, signs a serving certificate for the Service's DNS
/// names, verifies it, and writes the four files into `out_dir`.
pub fn issue(args: &CertsArgs) -> Result<Issued, CertError> {
    validate_label("--service", &args.service)?;
    validate_label("--namespace", &args.namespace)?;
    for days in [args.days, args.ca_days] {
        if !(2..=3650).contains(&days) {
            return Err(CertError::InvalidDays(days));
        }
    }
    let dir = &args.out_dir;
    std::fs::create_dir_all(dir).map_err(|source| CertError::CreateDir {
        path: dir.clone(),
        source,
    })?;
    let ca_path = dir.join("ca.pem");
    let ca_key_path = dir.join("ca.key");
    let ca = if args.reuse_ca {
        if !ca_path.exists() || !ca_key_path.exists() {
            return Err(CertError::MissingCa { dir: dir.clone() });
        }
        let ca = load_ca(&ca_path, &ca_key_path)?;
        let leaf_end = OffsetDateTime::now_utc() + time::Duration::days(i64::from(args.days));
        if ca.not_after < leaf_end {
            return Err(CertError::CaExpiresTooSoon { path: ca_path });
        }
        ca
    } else {
        // Replacing a CA silently would break the installed caBundle.
        if !args.new_ca && (ca_path.exists() || ca_key_path.exists()) {
            return Err(CertError::CaExists { dir: dir.clone() });
        }
        new_ca(CA_COMMON_NAME, args.ca_days)?
    };
    let names = service_names(&args.service, &args.namespace);
    let common_name = format!("{}.{}.svc", args.service, args.namespace);
    let leaf = new_leaf(&ca, &common_name, &names, args.days)?;
    let chain_pem = leaf.chain_pem(&ca);
    // Check with a real TLS verifier before handing anything out.
    verify_chain(&ca.cert_der, &leaf.chain(&ca), &names, SystemTime::now())
        .map_err(|(name, reason)| CertError::Verify { name, reason })?;
    if !args.reuse_ca {
        write_file(
            &ca_key_path,
            ca.issuer.key().serialize_pem().as_bytes(),
            true,
        )?;
        write_file(&ca_path, ca.cert_pem.as_bytes(), false)?;
    }
    write_file(&dir.join("tls.key"), leaf.key_pem.as_bytes(), true)?;
    write_file(&dir.join("tls.crt"), chain_pem.as_bytes(), false)?;
    Ok(Issued {
        ca_bundle: BASE64.encode(ca.cert_pem.as_bytes()),
        ca_pem: ca.cert_pem,
        chain_pem,
        key_pem: leaf.key_pem,
        reused_ca: args.reuse_ca,
    })
}

/// The DNS names the API server may use for the Service (it uses `<service>.<namespace>.svc`).
pub fn service_names(service: &str, namespace: &str) -> Vec<String> {
    vec![
        service.to_owned(),
        format!("{service}.{namespace}"),
        format!("{service}.{namespace}.svc"),
        format!("{service}.{namespace}.svc.cluster.local"),
    ]
}

/// A `kubernetes.io/tls` Secret holding the chain, the key and the CA (`ca.crt`, as cert-manager does).
pub fn secret_yaml(args: &CertsArgs, issued: &Issued) -> Result<String, CertError> {
    validate_label("--secret-name", &args.secret_name)?;
    let mut out = String::new();
    // Written by hand (not serde) so the comment header survives; all values are base64.
    let _ = writeln!(
        out,
        "# Generated by `secrets-webhook certs`; apply with kubectl apply -f -."
    );
    let _ = writeln!(out, "apiVersion: v1");
    let _ = writeln!(out, "kind: Secret");
    let _ = writeln!(out, "metadata:");
    let _ = writeln!(out, "  name: {}", args.secret_name);
    let _ = writeln!(out, "  namespace: {}", args.namespace);
    let _ = writeln!(out, "  labels:");
    let _ = writeln!(out, "    app.kubernetes.io/name: secrets-webhook");
    let _ = writeln!(out, "type: kubernetes.io/tls");
    let _ = writeln!(out, "data:");
    let _ = writeln!(
        out,
        "  tls.crt: {}",
        BASE64.encode(issued.chain_pem.as_bytes())
    );
    let _ = writeln!(
        out,
        "  tls.key: {}",
        BASE64.encode(issued.key_pem.as_bytes())
    );
    let _ = writeln!(out, "  ca.crt: {}", issued.ca_bundle);
    Ok(out)
}

fn patch_hint(ca_bundle: &str) -> String {
    let op = |i: usize| {
        format!(
            r#"{{"op":"add","path":"/webhooks/{i}/clientConfig/caBundle","value":"{ca_bundle}"}}"#
        )
    };
    format!(
        "patch it into the webhook configurations with:\n  kubectl patch mutatingwebhookconfiguration secrets-webhook --type=json \
         -p '[{},{}]'\n  kubectl patch validatingwebhookconfiguration secrets-webhook --type=json -p '[{},{}]'",
        op(0),
        op(1),
        op(0),
        op(1)
    )
}

fn dev_names() -> Vec<String> {
    vec!["localhost".to_owned(), "127.0.0.1".to_owned()]
}

/// A CA: its certificate and the issuer (key + subject) that signs leaves.
struct Ca {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    not_after: OffsetDateTime,
    /// The CA's key and subject, as rcgen signs with them.
    issuer: Issuer<'static, KeyPair>,
}

struct Leaf {
    cert_der: CertificateDer<'static>,
    cert_pem: String,
    key_pem: String,
}

impl Leaf {
    fn chain(&self, ca: &Ca) -> Vec<CertificateDer<'static>> {
        vec![self.cert_der.clone(), ca.cert_der.clone()]
    }

    fn chain_pem(&self, ca: &Ca) -> String {
        format!("{}{}", self.cert_pem, ca.cert_pem)
    }
}

fn validity(days: u32) -> (OffsetDateTime, OffsetDateTime) {
    let now = OffsetDateTime::now_utc();
    (
        now - CLOCK_SKEW,
        now + time::Duration::days(i64::from(days)),
    )
}

fn new_ca(common_name: &str, days: u32) -> Result<Ca, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    // pathlen 0: this CA signs serving certificates, never another CA.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    (params.not_before, params.not_after) = validity(days);
    let not_after = params.not_after;
    let cert = params.self_signed(&key)?;
    Ok(Ca {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        not_after,
        issuer: Issuer::new(params, key),
    })
}

fn load_ca(cert_path: &Path, key_path: &Path) -> Result<Ca, CertError> {
    let bad = |reason: String| CertError::BadCa {
        path: cert_path.to_owned(),
        reason,
    };
    let cert_pem = read_string(cert_path)?;
    let cert_der = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .next()
        .ok_or_else(|| CertError::NoCertificate {
            path: cert_path.to_owned(),
        })?
        .map_err(|e| bad(e.to_string()))?;
    let key_text = read_string(key_path)?;
    let key = KeyPair::from_pem(&key_text).map_err(|e| CertError::BadKey {
        path: key_path.to_owned(),
        reason: e.to_string(),
    })?;
    let (_, parsed) =
        x509_parser::parse_x509_certificate(&cert_der).map_err(|e| bad(e.to_string()))?;
    if !parsed.is_ca() {
        return Err(bad("it is not a CA (basicConstraints CA:FALSE)".into()));
    }
    if parsed.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(bad(format!("{} is not its key", key_path.display())));
    }
    let not_after = parsed.validity().not_after.to_datetime();
    let issuer = Issuer::from_ca_cert_der(&cert_der, key)?;
    Ok(Ca {
        cert_pem: pem_of(&cert_der),
        cert_der,
        not_after,
        issuer,
    })
}

fn pem_of(der: &CertificateDer<'_>) -> String {
    let body = BASE64.encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in body.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A serving certificate for `names` (DNS names or IP addresses) signed by `ca`. Clients check the
/// SANs; the common name is only for people reading the certificate.
fn new_leaf(ca: &Ca, common_name: &str, names: &[String], days: u32) -> Result<Leaf, CertError> {
    new_leaf_valid(ca, common_name, names, validity(days))
}

fn new_leaf_valid(
    ca: &Ca,
    common_name: &str,
    names: &[String],
    (not_before, not_after): (OffsetDateTime, OffsetDateTime),
) -> Result<Leaf, CertError> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse::<IpAddr>() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => Ok(SanType::DnsName(name.clone().try_into()?)),
        })
        .collect::<Result<_, rcgen::Error>>()?;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = not_before;
    params.not_after = not_after;
    let cert = params.signed_by(&key, &ca.issuer)?;
    Ok(Leaf {
        cert_pem: cert.pem(),
        cert_der: cert.der().clone(),
        key_pem: key.serialize_pem(),
    })
}

/// Verifies `chain` (leaf first) against the single trust anchor `ca` for every name, as a TLS
/// client would at time `at`. On failure returns the name and the reason.
fn verify_chain(
    ca: &CertificateDer<'static>,
    chain: &[CertificateDer<'static>],
    names: &[String],
    at: SystemTime,
) -> Result<(), (String, String)> {
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| (String::new(), "empty certificate chain".to_owned()))?;
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .map_err(|e| (String::new(), format!("unusable CA certificate: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .map_err(|e| (String::new(), e.to_string()))?;
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| (String::new(), e.to_string()))?;
    let now = UnixTime::since_unix_epoch(since_epoch);
    for name in names {
        let server_name = ServerName::try_from(name.clone())
            .map_err(|e| (name.clone(), format!("not a DNS name or IP address: {e}")))?;
        verifier
            .verify_server_cert(leaf, intermediates, &server_name, &[], now)
            .map_err(|e| (name.clone(), e.to_string()))?;
    }
    Ok(())
}

/// Ok when the files exist, the key belongs to the certificate, and the chain verifies against the
/// CA for every name both now and one day from now. Otherwise the reason to regenerate.
fn check_existing(
    ca_path: &Path,
    cert_path: &Path,
    key_path: &Path,
    names: &[String],
    now: SystemTime,
) -> Result<(), String> {
    let read = |path: &Path| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
    let ca_pem = read(ca_path)?;
    let chain_pem = read(cert_path)?;
    let key_pem = read(key_path)?;
    let ca = CertificateDer::pem_slice_iter(&ca_pem)
        .next()
        .ok_or_else(|| format!("{} holds no certificate", ca_path.display()))?
        .map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", cert_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    rustls::sign::CertifiedKey::from_der(
        chain.clone(),
        key,
        &rustls::crypto::ring::default_provider(),
    )
    .map_err(|e| {
        format!(
            "{} does not match {}: {e}",
            key_path.display(),
            cert_path.display()
        )
    })?;
    // webpki does not check a trust anchor's own validity period: do it here.
    let (_, parsed_ca) = x509_parser::parse_x509_certificate(&ca)
        .map_err(|e| format!("{}: {e}", ca_path.display()))?;
    let ca_end = parsed_ca.validity().not_after.timestamp();
    let horizon = now + MIN_REMAINING;
    let horizon_secs = horizon
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_secs();
    if ca_end <= i64::try_from(horizon_secs).unwrap_or(i64::MAX) {
        return Err(format!("{} expires within a day", ca_path.display()));
    }
    for at in [now, horizon] {
        verify_chain(&ca, &chain, names, at)
            .map_err(|(name, reason)| format!("{} for {name}: {reason}", cert_path.display()))?;
    }
    Ok(())
}

fn validate_label(what: &'static str, value: &str) -> Result<(), CertError> {
    let ok = !value.is_empty()
        && value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !value.starts_with('-')
        && !value.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(CertError::InvalidName {
            what,
            value: value.to_owned(),
        })
    }
}

fn read_string(path: &Path) -> Result<String, CertError> {
    std::fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a server reloading the directory never reads
/// half a file; keys get mode 0600 from the start.
fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    let mut file = options.open(&tmp).map_err(err)?;
    #[cfg(unix)]
    {
        // `mode` only applies when the file is created; a stale temp file keeps its old mode.
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(if private {
            0o600
        } else {
            0o644
        }))
        .map_err(err)?;
    }
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &Path) -> CertsArgs {
        CertsArgs {
            service: "secrets-webhook".into(),
            namespace: "iomete-system".into(),
            out_dir: dir.to_owned(),
            days: 365,
            ca_days: 3650,
            reuse_ca: false,
            new_ca: false,
            secret_yaml: false,
            secret_name: "secrets-webhook-tls".into(),
        }
    }

    fn first_cert(pem: &str) -> CertificateDer<'static> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .next()
            .unwrap()
            .unwrap()
    }

    fn chain_of(pem: &str) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(pem.as_bytes())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn verify(ca_pem: &str, chain_pem: &str, name: &str) -> Result<(), (String, String)> {
        verify_chain(
            &first_cert(ca_pem),
            &chain_of(chain_pem),
            &[name.to_owned()],
            SystemTime::now(),
        )
    }

    fn sans(der: &CertificateDer<'_>) -> Vec<String> {
        let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
        let san = cert.subject_alternative_name().unwrap().unwrap();
        san.value
            .general_names
            .iter()
            .map(|name| match name {
                x509_parser::extensions::GeneralName::DNSName(dns) => format!("dns:{dns}"),
                x509_parser::extensions::GeneralName::IPAddress(ip) => format!("ip:{ip:?}"),
                other => format!("other:{other:?}"),
            })
            .collect()
    }

    #[test]
    fn service_certificate_verifies_for_the_service_names_only() {
        let dir = tempfile::tempdir().unwrap();
        let issued = issue(&args(dir.path())).unwrap();
        for name in service_names("secrets-webhook", "iomete-system") {
            verify(&issued.ca_pem, &issued.chain_pem, &name).unwrap();
        }
        let (_, reason) =
            verify(&issued.ca_pem, &issued.chain_pem, "other.iomete-system.svc").unwrap_err();
        assert!(reason.contains("not valid for name"), "{reason}");
        // Another CA does not vouch for it.
        let other = tempfile::tempdir().unwrap();
        let other = issue(&args(other.path())).unwrap();
        assert!(
            verify(
                &other.ca_pem,
                &issued.chain_pem,
                "secrets-webhook.iomete-system.svc"
            )
            .is_err()
        );
    }

    #[test]
    fn service_certificate_has_exactly_the_four_dns_sans_and_server_auth() {
        let dir = tempfile::tempdir().unwrap();
        let issued = issue(&args(dir.path())).unwrap();
        let leaf = first_cert(&issued.chain_pem);
        assert_eq!(
            sans(&leaf),
            [
                "dns:secrets-webhook",
                "dns:secrets-webhook.iomete-system",
                "dns:secrets-webhook.iomete-system.svc",
                "dns:secrets-webhook.iomete-system.svc.cluster.local",
            ]
        );
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.is_ca());
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86400;
        assert_eq!(days, 365);
    }

    #[test]
    fn files_are_written_with_private_keys_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let issued = issue(&args(dir.path())).unwrap();
        for (file, mode) in [
            ("ca.key", 0o600),
            ("tls.key", 0o600),
            ("ca.pem", 0o644),
            ("tls.crt", 0o644),
        ] {
            let meta = std::fs::metadata(dir.path().join(file)).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
        }
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tls.crt")).unwrap(),
            issued.chain_pem
        );
        assert_eq!(chain_of(&issued.chain_pem).len(), 2, "leaf then CA");
        assert_eq!(
            BASE64.decode(&issued.ca_bundle).unwrap(),
            issued.ca_pem.as_bytes()
        );
    }

    #[test]
    fn reuse_ca_signs_a_new_leaf_with_the_same_ca() {
        let dir = tempfile::tempdir().unwrap();
        let first = issue(&args(dir.path())).unwrap();
        let mut again = args(dir.path());
        again.reuse_ca = true;
        let second = issue(&again).unwrap();
        assert!(second.reused_ca);
        assert_eq!(first.ca_pem, second.ca_pem);
        assert_eq!(first.ca_bundle, second.ca_bundle);
        assert_ne!(first.key_pem, second.key_pem);
        verify(
            &first.ca_pem,
            &second.chain_pem,
            "secrets-webhook.iomete-system.svc",
        )
        .unwrap();
    }

    #[test]
    fn an_existing_ca_is_replaced_only_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let first = issue(&args(dir.path())).unwrap();
        let err = issue(&args(dir.path())).unwrap_err();
        assert!(matches!(err, CertError::CaExists { .. }), "{err}");
        assert!(err.to_string().contains("--reuse-ca"));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            first.ca_pem
        );
        let mut replace = args(dir.path());
        replace.new_ca = true;
        let second = issue(&replace).unwrap();
        assert_ne!(second.ca_pem, first.ca_pem);
        assert_eq!(
            std::fs::read_to_string(dir.path().join("ca.pem")).unwrap(),
            second.ca_pem
        );
    }

    #[test]
    fn reuse_ca_without_a_ca_says_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.reuse_ca = true;
        let err = issue(&a).unwrap_err();
        assert!(matches!(err, CertError::MissingCa { .. }));
        assert!(err.to_string().contains("run once without --reuse-ca"));
    }

    #[test]
    fn reuse_ca_refuses_a_leaf_or_a_foreign_key_as_ca() {
        let dir = tempfile::tempdir().unwrap();
        let issued = issue(&args(dir.path())).unwrap();
        let mut again = args(dir.path());
        again.reuse_ca = true;
        // Someone else's key next to our CA.
        let ca_key = dir.path().join("ca.key");
        std::fs::write(&ca_key, KeyPair::generate().unwrap().serialize_pem()).unwrap();
        let err = issue(&again).unwrap_err();
        assert!(err.to_string().contains("is not its key"), "{err}");
        // The serving certificate and its key in place of the CA.
        std::fs::write(dir.path().join("ca.pem"), &issued.chain_pem).unwrap();
        std::fs::write(&ca_key, &issued.key_pem).unwrap();
        let err = issue(&again).unwrap_err();
        assert!(err.to_string().contains("not a CA"), "{err}");
        // The failed attempts wrote nothing.
        assert_eq!(
            std::fs::read_to_string(dir.path().join("tls.crt")).unwrap(),
            issued.chain_pem
        );
    }

    #[test]
    fn reuse_ca_refuses_a_leaf_outliving_the_ca() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.ca_days = 30;
        issue(&a).unwrap();
        a.reuse_ca = true;
        a.days = 60;
        assert!(matches!(
            issue(&a).unwrap_err(),
            CertError::CaExpiresTooSoon { .. }
        ));
    }

    #[test]
    fn invalid_names_and_days_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = args(dir.path());
        a.service = "Bad_Name".into();
        assert!(matches!(
            issue(&a).unwrap_err(),
            CertError::InvalidName {
                what: "--service",
                ..
            }
        ));
        let mut a = args(dir.path());
        a.days = 0;
        assert!(matches!(issue(&a).unwrap_err(), CertError::InvalidDays(0)));
    }

    #[test]
    fn secret_yaml_is_a_tls_secret_holding_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = args(dir.path());
        let issued = issue(&a).unwrap();
        let yaml: serde_json::Value =
            serde_yaml::from_str(&secret_yaml(&a, &issued).unwrap()).unwrap();
        assert_eq!(yaml["type"], "kubernetes.io/tls");
        assert_eq!(yaml["metadata"]["name"], "secrets-webhook-tls");
        assert_eq!(yaml["metadata"]["namespace"], "iomete-system");
        let data = |k: &str| BASE64.decode(yaml["data"][k].as_str().unwrap()).unwrap();
        assert_eq!(data("tls.crt"), issued.chain_pem.as_bytes());
        assert_eq!(data("tls.key"), issued.key_pem.as_bytes());
        assert_eq!(data("ca.crt"), issued.ca_pem.as_bytes());
    }

    #[test]
    fn dev_certs_verify_for_localhost_and_loopback_ip() {
        let dir = tempfile::tempdir().unwrap();
        let certs = ensure_dev_certs(&dir.path().join("nested")).unwrap();
        let ca = std::fs::read_to_string(&certs.ca).unwrap();
        let chain = std::fs::read_to_string(&certs.cert).unwrap();
        verify(&ca, &chain, "localhost").unwrap();
        verify(&ca, &chain, "127.0.0.1").unwrap();
        assert!(verify(&ca, &chain, "example.com").is_err());
        let leaf = first_cert(&chain);
        assert_eq!(sans(&leaf), ["dns:localhost", "ip:[127, 0, 0, 1]"]);
        let ca_der = first_cert(&ca);
        let (_, ca_cert) = x509_parser::parse_x509_certificate(&ca_der).unwrap();
        assert_eq!(
            ca_cert.subject().to_string(),
            format!("CN={DEV_CA_COMMON_NAME}")
        );
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&certs.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(
            !dir.path().join("nested/ca.key").exists(),
            "the dev CA key is not kept"
        );
    }

    #[test]
    fn valid_dev_certs_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let first = ensure_dev_certs(dir.path()).unwrap();
        let before = std::fs::read(&first.cert).unwrap();
        let second = ensure_dev_certs(dir.path()).unwrap();
        assert_eq!(std::fs::read(&second.cert).unwrap(), before);
    }

    /// Writes a dev-style set whose leaf has the given names and validity.
    fn write_dev_set(
        dir: &Path,
        names: &[&str],
        valid: (OffsetDateTime, OffsetDateTime),
    ) -> Vec<u8> {
        let ca = new_ca(DEV_CA_COMMON_NAME, 30).unwrap();
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let leaf = new_leaf_valid(&ca, "localhost", &names, valid).unwrap();
        std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
        std::fs::write(dir.join("tls.crt"), leaf.chain_pem(&ca)).unwrap();
        std::fs::write(dir.join("tls.key"), &leaf.key_pem).unwrap();
        leaf.chain_pem(&ca).into_bytes()
    }

    #[test]
    fn expired_or_expiring_dev_certs_are_regenerated() {
        let now = OffsetDateTime::now_utc();
        for valid in [
            (
                now - time::Duration::days(10),
                now - time::Duration::days(1),
            ),
            (
                now - time::Duration::days(10),
                now + time::Duration::hours(12),
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let old = write_dev_set(dir.path(), &["localhost", "127.0.0.1"], valid);
            let certs = ensure_dev_certs(dir.path()).unwrap();
            let new = std::fs::read(&certs.cert).unwrap();
            assert_ne!(new, old);
            let ca = std::fs::read_to_string(&certs.ca).unwrap();
            verify(&ca, &String::from_utf8(new).unwrap(), "localhost").unwrap();
        }
        // The control: the same helper with a long validity is reused.
        let dir = tempfile::tempdir().unwrap();
        let old = write_dev_set(dir.path(), &["localhost", "127.0.0.1"], validity(30));
        let certs = ensure_dev_certs(dir.path()).unwrap();
        assert_eq!(std::fs::read(&certs.cert).unwrap(), old);
    }

    #[test]
    fn dev_certs_with_other_names_or_a_foreign_key_are_regenerated() {
        let dir = tempfile::tempdir().unwrap();
        let old = write_dev_set(dir.path(), &["localhost"], validity(30));
        let certs = ensure_dev_certs(dir.path()).unwrap();
        assert_ne!(
            std::fs::read(&certs.cert).unwrap(),
            old,
            "127.0.0.1 was missing"
        );

        let dir = tempfile::tempdir().unwrap();
        let old = write_dev_set(dir.path(), &["localhost", "127.0.0.1"], validity(30));
        std::fs::write(
            dir.path().join("tls.key"),
            KeyPair::generate().unwrap().serialize_pem(),
        )
        .unwrap();
        let certs = ensure_dev_certs(dir.path()).unwrap();
        assert_ne!(
            std::fs::read(&certs.cert).unwrap(),
            old,
            "key did not match"
        );

        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "garbage").unwrap();
        let certs = ensure_dev_certs(dir.path()).unwrap();
        let ca = std::fs::read_to_string(&certs.ca).unwrap();
        verify(
            &ca,
            &std::fs::read_to_string(&certs.cert).unwrap(),
            "127.0.0.1",
        )
        .unwrap();
    }
}
