//! Thin entry point: install the TLS crypto provider, parse the command line, run.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // rustls needs exactly one process-wide provider; ring keeps OpenSSL and aws-lc out of the tree.
    if rustls::crypto::ring::default_provider()
        .install_default()
        .is_err()
    {
        eprintln!("error: a rustls crypto provider was already installed");
        return ExitCode::FAILURE;
    }
    let cli = secrets_webhook::cli::Cli::parse();
    match secrets_webhook::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
