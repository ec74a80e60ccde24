//! The integration test binary: one module per topic.

mod dns;
mod dns_upstream;
