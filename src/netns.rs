//! Run work inside a network namespace without changing the caller's own.

use std::path::PathBuf;

/// A network namespace to act in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A name under /run/netns (as `ip netns add NAME` creates).
    Name(String),
    /// A path to a namespace file (a bind mount or /proc/PID/ns/net).
    Path(PathBuf),
    /// The network namespace of a process: /proc/PID/ns/net.
    Pid(u32),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("network namespaces are not built yet")]
    NotBuilt,
}
