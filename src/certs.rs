//! Certificate generation (development CA, serving certificates).

/// Arguments of `secrets-webhook certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {}

/// `secrets-webhook certs`.
pub fn run(_args: CertsArgs) -> anyhow::Result<()> {
    anyhow::bail!("certs is not implemented yet")
}

/// Paths of the development CA and serving certificate written by [`ensure_dev_certs`].
#[derive(Debug, Clone)]
pub struct DevCerts {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// Creates (or reuses, if still valid) a development CA and a serving certificate for `localhost`
/// and `127.0.0.1` in `dir` (`ca.pem`, `tls.crt`, `tls.key`).
pub fn ensure_dev_certs(dir: &std::path::Path) -> anyhow::Result<DevCerts> {
    let _ = dir;
    anyhow::bail!("dev certificates are not implemented yet")
}
