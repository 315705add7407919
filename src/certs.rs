//! Certificate generation (development CA, serving certificates).

/// Arguments of `secrets-webhook certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {}

/// `secrets-webhook certs`.
pub fn run(_args: CertsArgs) -> anyhow::Result<()> {
    anyhow::bail!("certs is not implemented yet")
}
