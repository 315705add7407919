//! Thin entry point: install the TLS crypto provider, parse the command line, run.

use clap::Parser;

fn main() -> anyhow::Result<()> {
    // rustls needs exactly one process-wide provider; ring keeps OpenSSL and aws-lc out of the tree.
    rustls::crypto::ring::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let cli = secrets_webhook::cli::Cli::parse();
    secrets_webhook::cli::run(cli)
}
