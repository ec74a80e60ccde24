//! Arguments shared by every subcommand that reads a policy, and the one
//! function that turns them into a `Policy` and `CompileOptions`.
//!
//! Minimal version for `apply`: the policy file and `--resolver`. The full
//! set of expansion arguments (`--agent`, `--mcp-server`, `--extra-host`,
//! `--nflog-group`) lives with the policy loader.

use std::io::Read;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::policy::{self, CompileOptions, Expansions, Policy};

#[derive(Debug, clap::Args)]
pub struct PolicyArgs {
    /// The policy: a JSON file with the sandbox's `networking` object, or `-` for standard input.
    #[arg(value_name = "POLICY")]
    pub policy: PathBuf,

    /// A DNS server the sandbox may query on port 53 (repeat for several).
    #[arg(long = "resolver", value_name = "ADDR")]
    pub resolvers: Vec<IpAddr>,
}

impl PolicyArgs {
    /// Read, validate and expand the policy.
    pub fn load(&self) -> Result<(Policy, CompileOptions), super::Error> {
        let origin = self.policy.display().to_string();
        let mut text = String::new();
        let read = if origin == "-" {
            std::io::stdin().read_to_string(&mut text).map(|_| ())
        } else {
            std::fs::read_to_string(&self.policy).map(|t| text = t)
        };
        read.map_err(|err| super::Error::Usage(format!("cannot read the policy {origin}: {err}")))?;
        let policy = policy::load(&text, &origin, &Expansions::default())?;
        let options = CompileOptions {
            resolvers: self.resolvers.clone(),
            ..CompileOptions::default()
        };
        Ok((policy, options))
    }
}
