//! The one integration test binary; one module per topic.
//!
//! Most modules are privileged (`harness`, `enforcement`, `kernel`, `dns`,
//! `sidecar`, `agent`, `oci` with runc, `podman`, `demo`): they build network
//! namespaces and fail (never skip) when not run as root or when a tool they
//! drive is missing.

mod agent;
mod bad_input;
mod cli;
mod command_exit;
mod demo;
mod deploy;
mod dns;
mod dns_upstream;
mod enforcement;
mod fixtures;
mod golden;
mod harness;
mod kernel;
mod last_apply;
mod nft_check;
mod oci;
mod podman;
mod policies;
mod runc;
mod sidecar;
mod support;
mod verification;
