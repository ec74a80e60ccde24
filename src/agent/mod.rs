//! The host agent: one long-running process that enforces the policies of
//! many sandboxes, and the local API the OCI hook and operators use to reach it.

pub mod protocol;
