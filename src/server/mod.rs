//! HTTPS admission server and plain-HTTP admin port.

/// `secrets-webhook serve`.
pub fn run_serve(_args: crate::cli::ServeArgs) -> anyhow::Result<()> {
    anyhow::bail!("serve is not implemented yet")
}
