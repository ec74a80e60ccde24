//! The `netleash` command line: one file per subcommand.
//!
//! Exit codes (also in `--help` and the README):
//! - 0: success; for `check`, the destination is allowed;
//! - 1: `check` only: the destination is blocked;
//! - 2: invalid input (policy, arguments, files); nothing was changed;
//! - 3: a system or kernel error; the rules in force before the command are still in force;
//! - 4: `sandbox`: the agent has no sandbox with that id.

use std::ffi::OsString;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod agent;
pub mod apply;
pub mod check;
pub mod compile;
pub mod demo;
pub mod dns_args;
pub mod explain;
pub mod hook;
pub mod netns_args;
pub mod policy_args;
pub mod remove;
pub mod sandbox;
pub mod sidecar;
pub mod status;

pub const EXIT_OK: u8 = 0;
pub const EXIT_BLOCKED: u8 = 1;
pub const EXIT_INVALID_INPUT: u8 = 2;
pub const EXIT_SYSTEM_ERROR: u8 = 3;

pub const EXIT_CODES_HELP: &str = "\
Exit codes:
  0  success (for `check`: allowed)
  1  `check`: blocked
  2  invalid input: policy, arguments or files; nothing was changed
  3  system or kernel error; the rules in force before the command stay in force
  4  `sandbox`: the agent has no sandbox with that id";

/// Enforce a sandbox's egress policy with nftables.
///
/// netleash reads the `networking` object of a sandbox environment
/// (`unrestricted`, `limited` with `allowed_hosts`, `allow_package_managers`,
/// `allow_mcp_servers`, or `allowed_hosts`) and turns it into an nftables
/// table, `inet netleash`, that allows only what the policy says.
#[derive(Debug, Parser)]
#[command(name = "netleash", version, after_help = EXIT_CODES_HELP, propagate_version = true)]
pub struct Cli {
    /// Log filter, e.g. `info` or `netleash=debug` (also the NETLEASH_LOG variable).
    /// Default: `info` for `agent`, else `warn`.
    #[arg(long, global = true, env = "NETLEASH_LOG")]
    pub log: Option<String>,

    /// Write logs as JSON lines instead of text.
    #[arg(long, global = true)]
    pub log_json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    Compile(compile::Args),
    Explain(explain::Args),
    Check(check::Args),
    /// Enforce a policy in a sandbox's network namespace (atomic, verified).
    ///
    /// Compiles POLICY and puts it in force in the `inet netleash` table of the namespace,
    /// atomically for packets, then reads it back and verifies it. A change of addresses only
    /// edits the sets in force in one transaction (the rules and their counters stay); any
    /// other change stages a new generation of rules, then swaps it in. On any error the rules
    /// in force before stay in force.
    ///
    /// What the apply verified is kept in /run/netleash/last-apply/ (root only; the variable
    /// NETLEASH_LAST_APPLY_DIR names another directory), so that the next apply in the same
    /// namespace plans without reading the table first. The kernel refuses a plan made from a
    /// file that anything changed since (the ruleset's generation id), and the apply then
    /// reads the table.
    ///
    /// The command exits as soon as the policy is verified. When it replaced something, the
    /// kernel frees the replaced objects a moment later (one RCU grace period, 10–30 ms), and a
    /// process closing its nf_tables socket waits for that: a short-lived child `netleash`
    /// process holds the socket until then, after this command has exited.
    Apply(apply::Args),
    /// Show what netleash enforces in a network namespace.
    Status(status::Args),
    /// Stop enforcing: delete netleash's table from a network namespace.
    Remove(remove::Args),
    /// Show enforcement with real connections in a throwaway sandbox.
    Demo(demo::Args),
    /// Enforce a policy and run its filtering DNS proxy and resolver loop in a sandbox's namespace.
    Sidecar(sidecar::Args),
    /// Run the host agent that enforces the policies of many sandboxes (see `sandbox`).
    Agent(agent::Args),
    /// Ask the host agent to enforce, replace, show or forget a sandbox's policy.
    Sandbox(sandbox::Args),
    /// OCI runtime hook: enforce a container's annotated policy before it starts.
    Hook(hook::Args),
}

/// Everything a subcommand can fail with; each variant knows its exit code.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Policy(#[from] crate::policy::Error),
    #[error("{0}")]
    Usage(String),
    #[error("cannot read {what} {path}")]
    ReadInput {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write output")]
    Output(#[source] std::io::Error),
    #[error("cannot resolve {0} with the system resolver")]
    Resolve(String, #[source] std::io::Error),
    #[error(transparent)]
    Kernel(#[from] crate::kernel::Error),
    #[error(transparent)]
    Netns(#[from] crate::netns::Error),
    #[error(transparent)]
    Testbed(#[from] crate::testbed::Error),
    #[error(
        "{mismatches} of {total} observations do not match the policy: enforcement is not working here"
    )]
    DemoMismatch { mismatches: usize, total: usize },
    #[error(transparent)]
    Sidecar(Box<sidecar::Error>),
    #[error(transparent)]
    Agent(Box<agent::Error>),
    #[error(transparent)]
    AgentApi(crate::agent::protocol::Error),
    #[error(transparent)]
    Hook(Box<hook::Error>),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Policy(_) | Error::Usage(_) | Error::ReadInput { .. } => EXIT_INVALID_INPUT,
            Error::Output(_)
            | Error::Resolve(..)
            | Error::Kernel(_)
            | Error::Netns(_)
            | Error::Testbed(_)
            | Error::DemoMismatch { .. } => EXIT_SYSTEM_ERROR,
            Error::Sidecar(err) => err.exit_code(),
            Error::Agent(err) => err.exit_code(),
            Error::AgentApi(err) => err.exit_code(),
            Error::Hook(err) => err.exit_code(),
        }
    }
}

/// `netleash hook` alone: its own arguments and the global logging options,
/// which is all an OCI runtime passes at every container start (see
/// [`parse_hook_only`]).
#[derive(Debug, Parser)]
#[command(name = "netleash-hook")]
struct HookOnly {
    #[arg(long, env = "NETLEASH_LOG")]
    log: Option<String>,
    #[arg(long)]
    log_json: bool,
    #[command(flatten)]
    args: hook::Args,
}

/// `argv` parsed as `netleash hook ...` against the hook's arguments only,
/// or `None` when it is not a hook invocation this parser accepts.
///
/// The runtime starts the hook at every container creation, and it waits for
/// it: building the whole command tree (every subcommand with all its
/// arguments) costs about 0.4 ms of CPU there, more than a third of the
/// process's own start (docs/benchmarks.md, "OCI hook"). Whatever this parser
/// does not accept, `--help`, `--version` and every mistake included, goes to
/// the full parser, so help and error messages are the same either way.
fn parse_hook_only(argv: impl IntoIterator<Item = OsString>) -> Option<HookOnly> {
    let mut argv = argv.into_iter();
    let program = argv.next()?;
    if argv.next()? != "hook" {
        return None;
    }
    HookOnly::try_parse_from(std::iter::once(program).chain(argv)).ok()
}

pub fn main() -> ExitCode {
    if let Some(hook) = parse_hook_only(std::env::args_os()) {
        init_tracing(hook.log.as_deref().unwrap_or("warn"), hook.log_json);
        crate::netns::close_sockets_after_exit();
        return exit(hook::run(hook.args));
    }
    let cli = Cli::parse();
    let (default_log, json) = match &cli.command {
        Command::Agent(args) => (
            "info",
            cli.log_json || args.log_format == agent::LogFormat::Json,
        ),
        _ => ("warn", cli.log_json),
    };
    init_tracing(cli.log.as_deref().unwrap_or(default_log), json);
    // One kernel change, then exit: the caller need not wait for the
    // kernel to free what it replaced (see `netns::close_sockets_after_exit`).
    // A dry run changes nothing.
    let changes_the_kernel = match &cli.command {
        Command::Apply(args) => !args.dry_run,
        Command::Remove(_) | Command::Hook(_) => true,
        _ => false,
    };
    if changes_the_kernel {
        crate::netns::close_sockets_after_exit();
    }
    let result = match cli.command {
        Command::Compile(args) => compile::run(args),
        Command::Explain(args) => explain::run(args),
        Command::Check(args) => check::run(args),
        Command::Apply(args) => apply::run(args),
        Command::Status(args) => status::run(args),
        Command::Remove(args) => remove::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Sidecar(args) => sidecar::run(args),
        Command::Agent(args) => agent::run(args),
        Command::Sandbox(args) => sandbox::run(args),
        Command::Hook(args) => hook::run(args),
    };
    exit(result)
}

/// The process's exit code for a subcommand's result; an error is printed
/// first, with its cause chain.
pub fn exit(result: Result<u8, Error>) -> ExitCode {
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("{}", render_error(&err));
            ExitCode::from(err.exit_code())
        }
    }
}

/// `error: <message>` followed by one `  caused by: <source>` line per cause.
pub fn render_error(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = format!("error: {err}");
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(&format!("\n  caused by: {cause}"));
        source = cause.source();
    }
    text
}

/// Log to stderr, as text or JSON lines, filtered by `filter` (`warn` if it does not parse).
pub fn init_tracing(filter: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.without_time().with_target(false).try_init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("netleash")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    /// The hook's arguments as the full parser reads them.
    fn full_parse(args: &[&str]) -> (Option<String>, bool, hook::Args) {
        let cli = Cli::try_parse_from(argv(args)).expect("the full parser accepts it");
        match cli.command {
            Command::Hook(hook) => (cli.log, cli.log_json, hook),
            other => panic!("not the hook: {other:?}"),
        }
    }

    #[test]
    fn the_hook_only_parser_reads_what_the_full_parser_reads() {
        for args in [
            &["hook"][..],
            &[
                "hook",
                "--standalone",
                "--resolver",
                "192.0.2.53",
                "--nflog-group",
                "7",
            ],
            &[
                "hook",
                "--stage",
                "poststop",
                "--socket",
                "/s",
                "--timeout",
                "3",
            ],
            &[
                "hook",
                "--log",
                "debug",
                "--log-json",
                "--stage",
                "prestart",
            ],
        ] {
            let fast = parse_hook_only(argv(args)).expect("the hook-only parser accepts it");
            let (log, log_json, full) = full_parse(args);
            assert_eq!(fast.log, log, "{args:?}");
            assert_eq!(fast.log_json, log_json, "{args:?}");
            assert_eq!(format!("{:?}", fast.args), format!("{full:?}"), "{args:?}");
        }
    }

    #[test]
    fn everything_else_goes_to_the_full_parser() {
        for args in [
            &["compile", "p.json"][..],
            &["--log", "debug", "hook"],
            &["hook", "--help"],
            &["hook", "--version"],
            &["hook", "--stage", "poststart"],
            &["hook", "--timeout", "0"],
            &["hook", "--standalone", "extra"],
            &[],
        ] {
            assert!(parse_hook_only(argv(args)).is_none(), "{args:?}");
        }
    }
}
