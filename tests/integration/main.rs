//! The one integration test binary; one module per topic.
//!
//! `harness`, `enforcement` and `demo` are privileged: they build network
//! namespaces and fail (never skip) when not run as root.

mod bad_input;
mod demo;
mod enforcement;
mod harness;
mod policies;
mod support;
