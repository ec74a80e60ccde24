//! `netleash status`: what the kernel enforces in a sandbox's network namespace.

use std::io::Write;

use super::netns_args::NetnsArgs;
use super::{EXIT_OK, Error};
use crate::kernel::{self, CountedVerdict, TableStatus};
use crate::ruleset::TABLE_NAME;

/// Show the `inet netleash` table in the namespace: whether it is there, the digest of
/// the policy in force, the size of each set, and the counters of the allow and deny rules.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub target: NetnsArgs,

    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct JsonStatus<'a> {
    target: String,
    present: bool,
    #[serde(flatten)]
    table: Option<&'a TableStatus>,
}

pub fn run(args: Args) -> Result<u8, Error> {
    let target = args.target.target();
    let status = kernel::status(&target)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        let json = JsonStatus {
            target: target.to_string(),
            present: status.is_some(),
            table: status.as_ref(),
        };
        serde_json::to_writer_pretty(&mut out, &json).map_err(|e| Error::Output(e.into()))?;
        writeln!(out).map_err(Error::Output)?;
        return Ok(EXIT_OK);
    }
    write_text(&mut out, &target, status.as_ref()).map_err(Error::Output)?;
    Ok(EXIT_OK)
}

fn write_text(
    out: &mut impl Write,
    target: &crate::netns::Target,
    status: Option<&TableStatus>,
) -> std::io::Result<()> {
    let Some(status) = status else {
        return writeln!(
            out,
            "no table inet {TABLE_NAME} in the {target}: netleash enforces nothing there"
        );
    };
    writeln!(out, "table inet {TABLE_NAME} in the {target}")?;
    writeln!(
        out,
        "policy: {}",
        status
            .digest
            .as_deref()
            .unwrap_or("(no digest: not written by netleash)")
    )?;
    if let Some(generation) = status.generation {
        writeln!(out, "generation: {generation}")?;
    }
    if !status.leftovers.is_empty() {
        writeln!(
            out,
            "leftovers (reached by no rule; the next apply deletes them): {}",
            status.leftovers.join(", ")
        )?;
    }
    writeln!(out, "sets:")?;
    for set in &status.sets {
        let mut flags = Vec::new();
        if set.interval {
            flags.push("interval");
        }
        if set.timeout {
            flags.push("timeout");
        }
        let flags = if flags.is_empty() {
            String::new()
        } else {
            format!(" ({})", flags.join(", "))
        };
        writeln!(
            out,
            "  {:<20} {:>7} elements{flags}",
            set.name, set.elements
        )?;
    }
    writeln!(out, "chains:")?;
    for chain in &status.chains {
        let base = match (&chain.hook, &chain.policy) {
            (Some(hook), Some(policy)) => format!(" (hook {hook}, policy {policy})"),
            _ => String::new(),
        };
        writeln!(out, "  {:<20} {:>7} rules{base}", chain.name, chain.rules)?;
    }
    for (verdict, heading) in [
        (
            CountedVerdict::Allowed,
            "allowed (rule counters; packets that open a connection):",
        ),
        (CountedVerdict::Denied, "denied (rule counters):"),
    ] {
        writeln!(out, "{heading}")?;
        for counter in status.counters.iter().filter(|c| c.verdict == verdict) {
            writeln!(
                out,
                "  {:<24} {:>7} packets {:>10} bytes",
                counter.rule, counter.packets, counter.bytes
            )?;
        }
    }
    Ok(())
}
