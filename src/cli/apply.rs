//! `netleash apply`: enforce a policy in a sandbox's network namespace.

use std::io::Write;

use super::netns_args::NetnsArgs;
use super::policy_args::PolicyArgs;
use super::{EXIT_OK, Error};
use crate::kernel::{self, Plan};
use crate::ruleset::{self, Ruleset, TABLE_NAME};

/// Compile POLICY and put it in force in the `inet netleash` table of the namespace,
/// atomically for packets (a new generation is staged, then swapped in; or, when only set
/// elements change, the generation in force is edited in place), then read it back and
/// verify it. On any error the rules in force before stay in force.
/// (The help text is on `Command::Apply`.)
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub target: NetnsArgs,

    /// Print what would change, have the kernel check the new table without committing it,
    /// and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(args: Args) -> Result<u8, Error> {
    let (policy, options) = args.policy.load()?;
    let ruleset = ruleset::compile(&policy, &options);
    let target = args.target.target();
    let mut out = std::io::stdout().lock();
    if args.dry_run {
        let plan = kernel::plan(&target, &ruleset)?;
        write_plan(&mut out, &target, &ruleset, &plan).map_err(Error::Output)?;
        return Ok(EXIT_OK);
    }
    let report = kernel::apply(&target, &ruleset)?;
    if report.method == kernel::Method::Create {
        // Nothing was replaced: closing the socket waits for nothing of
        // ours, so it is closed here rather than handed over at exit
        // (`netns::close_sockets_after_exit`, which `main` arranged).
        crate::netns::close_kept_now();
    }
    writeln!(
        out,
        "applied policy {} to the {target}: {} sets with {} elements, {} rules; {}",
        report.digest, report.sets, report.elements, report.rules, report.method
    )
    .map_err(Error::Output)?;
    Ok(EXIT_OK)
}

fn write_plan(
    out: &mut impl Write,
    target: &crate::netns::Target,
    ruleset: &Ruleset,
    plan: &Plan,
) -> std::io::Result<()> {
    writeln!(out, "dry run: nothing was changed in the {target}")?;
    let elements: usize = ruleset.sets.iter().map(|s| s.elements.len()).sum();
    let rules: usize = ruleset.chains.iter().map(|c| c.rules.len()).sum();
    match &plan.current {
        None => writeln!(
            out,
            "there is no table inet {TABLE_NAME}: apply would create it with policy {}, {} sets with {elements} \
             elements, {rules} rules",
            ruleset.digest,
            ruleset.sets.len()
        )?,
        Some(_) if plan.differences.is_empty() => writeln!(
            out,
            "policy {} is already in force: apply would put an identical one in force ({})",
            ruleset.digest,
            match plan.method {
                kernel::Method::Edit { .. } => "in place: rules and their counters are kept",
                _ => "counters restart",
            }
        )?,
        Some(current) => {
            writeln!(
                out,
                "apply would replace policy {} with {}:",
                current.digest.as_deref().unwrap_or("(no digest)"),
                ruleset.digest
            )?;
            for difference in &plan.differences {
                writeln!(out, "  - {difference}")?;
            }
        }
    }
    match &plan.method {
        kernel::Method::Create => {}
        kernel::Method::Swap { from, to } => writeln!(
            out,
            "apply would stage generation {to} and swap it in for generation {from}"
        )?,
        kernel::Method::Edit {
            generation,
            added,
            removed,
        } => writeln!(
            out,
            "apply would edit generation {generation} in place: {added} element(s) added, {removed} \
             removed, one transaction, rules and their counters kept"
        )?,
        kernel::Method::Replace { reason } => writeln!(
            out,
            "apply would replace the table as a whole, once, because {reason}"
        )?,
    }
    writeln!(out, "the kernel checked the new table and would accept it")
}
