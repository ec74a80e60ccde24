//! Policy input: the vendor dialects, the `allowed_hosts` grammar and the
//! expansions (package managers, MCP servers, extra hosts, safety blocklist).

mod types;

pub use types::*;

/// Everything that can be wrong with a policy or its expansions.
#[derive(Debug, thiserror::Error)]
pub enum Error {}
