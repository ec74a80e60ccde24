//! The one integration test binary; one module per topic.
//!
//! `harness`, `enforcement` and `demo` are privileged: they build network
//! namespaces and fail (never skip) when not run as root.

mod agent;
mod bad_input;
mod cli;
mod demo;
mod deploy;
mod dns;
mod dns_upstream;
mod enforcement;
mod fixtures;
mod golden;
mod harness;
mod kernel;
mod nft_check;
mod oci;
mod policies;
mod runc;
mod sidecar;
mod support;
