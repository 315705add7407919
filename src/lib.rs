//! secrets-webhook: a mutating admission webhook that lets Spark and Jupyter pods use secrets by
//! reference. See `docs/architecture.md` for how the modules fit together.
#![forbid(unsafe_code)]

pub mod admission;
pub mod api;
pub mod authz;
pub mod backends;
pub mod certs;
pub mod cli;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod plan;
pub mod refs;
pub mod review;
pub mod server;
pub mod workload;
