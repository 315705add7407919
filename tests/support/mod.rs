//! Helpers shared by the integration tests. Each test binary uses only some of them.
#![allow(dead_code)]

pub mod api;
pub mod cel_policy;
pub mod fake_apiserver;
pub mod kube_e2e;
pub mod leaks;
pub mod logs;
pub mod metrics;
pub mod openbao;
pub mod podspec_probe;
pub mod tls;
