//! `netleash sandbox`: the operator's client of the host agent's API.
//!
//! Exit codes: 0 done; 2 invalid input (nothing changed); 3 the agent or the
//! kernel failed, or the agent cannot be reached; 4 no sandbox with that id.

use std::path::PathBuf;
use std::time::Duration;

use super::policy_args::{read_agent_file, read_policy_text};
use super::{EXIT_INVALID_INPUT, EXIT_OK, EXIT_SYSTEM_ERROR};
use crate::agent::protocol::{
    self, AgentDefinition, DEFAULT_SOCKET, FailureKind, Put, Reply, ReplyWhen, Request,
    SandboxStatus, call,
};

/// `sandbox get|delete` of an id the agent does not have.
pub const EXIT_NOT_FOUND: u8 = 4;

/// How long the client waits for the agent: a Put may wait for the first
/// lookups of its names (up to 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Ask the netleash agent to enforce, replace, show or forget sandbox policies.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The agent's API socket.
    #[arg(long, global = true, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Print the agent's reply as JSON.
    #[arg(long, global = true)]
    pub json: bool,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Every sandbox the agent enforces, with counters.
    List,
    /// One sandbox's status.
    Get {
        /// The sandbox's id (the container id, for sandboxes the OCI hook hands over).
        id: String,
    },
    /// Create or replace sandbox ID's policy, enforced in the network namespace at --netns.
    Put {
        /// The sandbox's id (the container id, for sandboxes the OCI hook hands over).
        id: String,
        /// The sandbox's namespace file: /proc/PID/ns/net, a bind mount, /run/netns/NAME.
        #[arg(long, value_name = "PATH")]
        netns: PathBuf,
        /// The sandbox's process, recorded with it.
        #[arg(long, value_name = "PID")]
        pid: Option<u32>,
        /// The policy: a JSON file, or `-` for standard input.
        policy: String,
        /// The sandbox's agent definition (JSON) whose `mcp_servers` URLs are
        /// allowed when the policy sets `"allow_mcp_servers": true`; the agent
        /// keeps it with the sandbox.
        #[arg(long, value_name = "FILE")]
        agent: Option<PathBuf>,
    },
    /// Forget sandbox ID: its DNS work stops; its rules stay in its namespace.
    Delete {
        /// The sandbox's id (the container id, for sandboxes the OCI hook hands over).
        id: String,
    },
}

impl protocol::Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            protocol::Error::Refused { kind, .. } => match kind {
                FailureKind::InvalidInput => EXIT_INVALID_INPUT,
                FailureKind::NotFound => EXIT_NOT_FOUND,
                FailureKind::System => EXIT_SYSTEM_ERROR,
            },
            _ => EXIT_SYSTEM_ERROR,
        }
    }
}

pub fn run(args: Args) -> Result<u8, super::Error> {
    let request = match args.command {
        Command::List => Request::List,
        Command::Get { id } => Request::Get { id },
        Command::Delete { id } => Request::Delete { id },
        Command::Put {
            id,
            netns,
            pid,
            policy,
            agent,
        } => {
            let (text, origin) = read_policy_text(&policy)?;
            let agent = match agent {
                Some(path) => {
                    let (text, origin) = read_agent_file(&path)?;
                    Some(AgentDefinition { text, origin })
                }
                None => None,
            };
            Request::Put(Put {
                id,
                netns,
                pid,
                policy: text,
                origin,
                agent,
                reply_when: ReplyWhen::default(),
            })
        }
    };
    let reply = call(&args.socket, &request, CALL_TIMEOUT).map_err(super::Error::AgentApi)?;
    let text = if args.json {
        serde_json::to_string_pretty(&reply).expect("a reply always serializes")
    } else {
        match &reply {
            Reply::Sandbox(status) => describe(status),
            Reply::Sandboxes(all) if all.is_empty() => "no sandboxes".to_string(),
            Reply::Sandboxes(all) => all.iter().map(describe).collect::<Vec<_>>().join("\n"),
            Reply::Deleted { id } => {
                format!("forgot sandbox {id}; its rules stay in its namespace")
            }
        }
    };
    println!("{text}");
    Ok(EXIT_OK)
}

fn describe(status: &SandboxStatus) -> String {
    let pid = status.pid.map(|p| format!(" pid {p}")).unwrap_or_default();
    let sets: Vec<String> = status
        .set_sizes
        .iter()
        .map(|(set, size)| format!("{set}={size}"))
        .collect();
    let denial_log = match &status.denial_log {
        None => String::new(),
        Some(log) => match &log.error {
            Some(error) => format!("\n  denied-connection log: off ({error})"),
            None => format!(
                "\n  denied-connection log: {} on nflog group {}; {} packets, {} lines, {} suppressed",
                if log.listening { "reading" } else { "stopped" },
                log.nflog_group,
                log.packets,
                log.logged,
                log.suppressed,
            ),
        },
    };
    format!(
        "{}  netns {}{pid}  policy {}\n  sets: {}\n  allowed: {} connection packets, {} bytes; denied: {} packets, {} bytes; DNS: {} queries, {} refused{denial_log}",
        status.id,
        status.netns.display(),
        status.digest,
        sets.join(" "),
        status.allowed_packets,
        status.allowed_bytes,
        status.denied_packets,
        status.denied_bytes,
        status.dns_queries,
        status.dns_refused,
    )
}
