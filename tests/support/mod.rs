//! Shared helpers of the integration tests.
#![allow(dead_code)]

pub mod fake_apiserver;
pub mod openbao;
