//! Vault KV v2 source.

/// `secrets-webhook vault check NAME`.
pub fn run_check(_name: &str, _config: &std::path::Path) -> anyhow::Result<()> {
    anyhow::bail!("vault check is not implemented yet")
}
