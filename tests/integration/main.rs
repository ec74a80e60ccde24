//! The one integration test binary; one module per topic.

mod bad_input;
mod dns;
mod dns_upstream;
mod kernel;
mod policies;
