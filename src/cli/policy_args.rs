//! Arguments shared by the subcommands that read a policy.
//!
//! Placeholder with the interface the subcommands use (`PolicyArgs`,
//! flattened into each subcommand, and `PolicyArgs::load`); the full version
//! adds the expansion options and `/etc/resolv.conf`.

use std::io::Read as _;
use std::net::IpAddr;
use std::path::PathBuf;

use crate::policy::{self, CompileOptions, Expansions, Policy};

#[derive(Debug, Clone, clap::Args)]
pub struct PolicyArgs {
    /// The policy: a file holding an Environment object, a create request, a
    /// `config` object or a bare `networking` object; `-` reads standard input.
    #[arg(value_name = "POLICY")]
    pub policy: PathBuf,

    /// A DNS server the sandbox may query on port 53 (repeatable).
    #[arg(long = "resolver", value_name = "IP")]
    pub resolvers: Vec<IpAddr>,
}

impl PolicyArgs {
    /// Read, validate and expand the policy; the compile options from the flags.
    pub fn load(&self) -> Result<(Policy, CompileOptions), super::Error> {
        let origin = self.policy.display().to_string();
        let mut text = String::new();
        let read = if origin == "-" {
            std::io::stdin().read_to_string(&mut text).map(|_| ())
        } else {
            std::fs::read_to_string(&self.policy).map(|t| text = t)
        };
        read.map_err(|err| super::Error::Usage(format!("cannot read policy {origin}: {err}")))?;
        let policy = policy::load(&text, &origin, &Expansions::default())?;
        let options = CompileOptions {
            resolvers: self.resolvers.clone(),
            ..CompileOptions::default()
        };
        Ok((policy, options))
    }
}
