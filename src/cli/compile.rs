//! `netleash compile`: the nftables ruleset of a policy, without applying it.

use std::io::Write as _;
use std::path::PathBuf;

use super::policy_args::PolicyArgs;
use crate::ruleset::{self, render};

const AFTER_HELP: &str = "\
The output replaces table `inet netleash` in one transaction when applied with
`nft -f FILE` (or `nft -j -f FILE` for JSON) and touches no other table. Names
are not resolved: their addresses are added to the `dns_*` sets at run time.

Examples:
  netleash compile policy.json
  netleash compile policy.json --format json -o ruleset.json
  echo '{\"type\": \"limited\", \"allowed_hosts\": [\"https://pypi.org\"]}' | netleash compile -
  netleash compile policy.json -o ruleset.nft && nft -c -f ruleset.nft";

/// Print the nftables ruleset a policy compiles to, without applying it.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    pub policy: PolicyArgs,

    /// Output format: `nft` text (for `nft -f`) or libnftables JSON (for `nft -j -f`).
    #[arg(long, value_enum, default_value_t = Format::Nft)]
    pub format: Format,

    /// Write the ruleset to FILE instead of standard output.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Nft,
    Json,
}

/// The rendered ruleset, ending with a newline.
pub fn render(ruleset: &ruleset::Ruleset, format: Format) -> String {
    match format {
        Format::Nft => render::nft(ruleset),
        Format::Json => {
            let mut text = serde_json::to_string_pretty(&render::json(ruleset))
                .expect("a serde_json::Value always serializes");
            text.push('\n');
            text
        }
    }
}

pub fn run(args: Args) -> Result<u8, super::Error> {
    let (policy, options) = args.policy.load()?;
    let text = render(&ruleset::compile(&policy, &options), args.format);
    match &args.output {
        Some(path) => std::fs::write(path, text).map_err(super::Error::Output)?,
        None => std::io::stdout()
            .lock()
            .write_all(text.as_bytes())
            .map_err(super::Error::Output)?,
    }
    Ok(super::EXIT_OK)
}
