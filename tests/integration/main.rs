//! The one integration test binary; one module per topic.
//!
//! `harness`, `enforcement` and `demo` are privileged: they build network
//! namespaces and fail (never skip) when not run as root.

mod bad_input;
mod demo;
mod dns;
mod dns_upstream;
mod enforcement;
mod harness;
mod kernel;
mod policies;
mod support;
