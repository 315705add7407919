//! Thin entry point: install the TLS crypto provider, parse the command line, run.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// jemalloc instead of glibc's malloc: a patched admission builds and drops thousands of small JSON
/// values, and glibc spent about a third of its instructions on that (with a consolidation pass
/// before every larger buffer). Measured in docs/performance.md: −40% server CPU per warm
/// admission at the same memory (mimalloc was as fast but broke the 64 MiB burst target).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

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
