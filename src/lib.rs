//! netleash: enforce a sandbox's egress policy (`config.networking`) with nftables.
//!
//! Layers, each consuming only the one before it:
//! - [`policy`]: input dialects → a validated, expanded [`policy::Policy`];
//! - [`ruleset`]: the pure compiler → [`ruleset::Ruleset`], its renderers and evaluator;
//! - [`kernel`]: the only module that talks netlink; applies a `Ruleset` in one batch;
//! - [`netns`]: runs work inside a sandbox's network namespace;
//! - [`dns`]: the DNS proxy and resolver loop that fill the DNS-derived sets;
//! - [`sandbox`]: one enforced sandbox at run time, the DNS layer's sink;
//! - [`denial_log`]: the sidecar's denied-connection log (nflog packets matched
//!   to the DNS proxy's answers, deduplicated and rate-limited);
//! - [`enforcer`]: the DNS proxy wiring the sidecar and the agent share;
//! - [`http_endpoint`]: the small HTTP endpoints (`/metrics`, `/healthz`);
//! - [`agent`]: the host agent's API, shared by `netleash agent` and `netleash hook`;
//! - [`oci`]: the OCI runtime state and bundle configuration `netleash hook` reads;
//! - [`cli`]: the `netleash` command;
//! - [`testbed`]: throwaway sandbox and world namespaces with servers, for the
//!   privileged tests and `netleash demo`.

pub mod agent;
pub mod cli;
pub mod denial_log;
pub mod dns;
pub mod enforcer;
pub mod http_endpoint;
pub mod kernel;
pub mod netns;
pub mod oci;
pub mod policy;
pub mod ruleset;
pub mod sandbox;
pub mod testbed;
