//! The host agent's local API: one JSON request and one JSON reply per
//! connection on a Unix stream socket, each a single line ending in `\n`.
//!
//! ```text
//! → {"op":"put","id":"c1","netns":"/proc/4242/ns/net","pid":4242,"policy":"{…}","origin":"annotation netleash.policy"}
//! ← {"status":"ok","reply":{"sandbox":{…}}}
//! → {"op":"delete","id":"c1"}
//! ← {"status":"error","kind":"not_found","message":"…","causes":[]}
//! ```
//!
//! The socket is created by the agent with mode 0600 and owned by root: the
//! API changes firewall rules, so only root may speak it.
//!
//! Compatibility: unknown request fields are refused (a typo must not be
//! silently ignored); reply fields may grow, so clients ignore unknown ones.

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read as _, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Where the agent listens unless `--socket` says otherwise.
pub const DEFAULT_SOCKET: &str = "/run/netleash/agent.sock";

/// The longest request or reply line either side accepts (a policy with
/// 10,000 hosts is about 400 KiB).
pub const MAX_MESSAGE_BYTES: usize = 8 << 20;

/// A request to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Create or replace the policy of sandbox `id`, enforced in the network
    /// namespace at `netns`. The reply comes once the rules are in force; a
    /// policy that fails validation changes nothing.
    Put(Put),
    /// Forget sandbox `id`. The rules stay in its namespace (which is
    /// usually gone by then); DNS work for it stops.
    Delete { id: String },
    /// One sandbox's status.
    Get { id: String },
    /// Every sandbox's status.
    List,
}

/// A Put: sandbox `id`'s policy (and agent definition), enforced in the
/// network namespace at `netns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Put {
    pub id: String,
    /// The namespace file: /proc/PID/ns/net, a bind mount, /run/netns/NAME.
    pub netns: PathBuf,
    /// The sandbox's process, when known: lets the agent tell after a
    /// restart whether the namespace still exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The policy document, as text (so errors can give line:column).
    pub policy: String,
    /// Where the policy came from, for error messages.
    pub origin: String,
    /// The sandbox's agent definition, whose `mcp_servers` URLs a
    /// policy with `"allow_mcp_servers": true` allows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentDefinition>,
    /// When the agent replies (default: once the names are resolved).
    #[serde(default, skip_serializing_if = "ReplyWhen::is_default")]
    pub reply_when: ReplyWhen,
}

/// When the agent replies to a Put. Either way the rules are in force and
/// the sandbox's DNS proxy answers before the reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplyWhen {
    /// Also after each name the sandbox is the first to allow was looked up
    /// once (bounded by 10 s), so the reply shows their addresses in the sets.
    #[default]
    NamesResolved,
    /// As soon as the rules are in force: what a container start waits for
    /// (the OCI hook). The sandbox's first query for a name goes through its
    /// proxy, which writes the answer's addresses into the sets before it
    /// answers, so nothing is lost by not waiting. The table is not read
    /// again for the reply: its `set_sizes` is empty and its counters are 0.
    RulesInForce,
}

impl ReplyWhen {
    fn is_default(&self) -> bool {
        *self == ReplyWhen::default()
    }
}

/// An agent definition in Claude Managed Agents' shape,
/// `{"mcp_servers": [{"type": "url", "name": "docs", "url": "https://mcp.example.com/mcp"}]}`,
/// as text (errors give line:column) with where it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentDefinition {
    pub text: String,
    /// Where the definition came from, for error messages (a file, an annotation).
    pub origin: String,
}

/// A sandbox as the agent reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct SandboxStatus {
    pub id: String,
    pub netns: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The digest of the ruleset in force.
    pub digest: String,
    /// Elements per set, by set name.
    #[serde(default)]
    pub set_sizes: BTreeMap<String, u64>,
    /// Packets and bytes the allow rules accepted: the packets that open
    /// a connection (an established connection's packets are not counted).
    #[serde(default)]
    pub allowed_packets: u64,
    #[serde(default)]
    pub allowed_bytes: u64,
    /// Packets and bytes the deny chain rejected.
    #[serde(default)]
    pub denied_packets: u64,
    #[serde(default)]
    pub denied_bytes: u64,
    /// DNS queries the proxy answered for this sandbox, and how many of
    /// them it refused.
    #[serde(default)]
    pub dns_queries: u64,
    #[serde(default)]
    pub dns_refused: u64,
    /// The sandbox's denied-connection log; absent from agents that have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denial_log: Option<DenialLogStatus>,
}

/// The denied-connection log of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DenialLogStatus {
    /// Whether denied packets are being read.
    #[serde(default)]
    pub listening: bool,
    #[serde(default)]
    pub nflog_group: u16,
    /// Why the log is off, if it is: the rules are enforced all the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Denied packets the log read.
    #[serde(default)]
    pub packets: u64,
    /// Lines written (one per destination per window).
    #[serde(default)]
    pub logged: u64,
    /// Lines left out by the rate limit.
    #[serde(default)]
    pub suppressed: u64,
}

impl From<crate::denial_log::DenialHealth> for DenialLogStatus {
    fn from(health: crate::denial_log::DenialHealth) -> Self {
        DenialLogStatus {
            listening: health.listening,
            nflog_group: health.nflog_group,
            error: health.error,
            packets: health.stats.packets,
            logged: health.stats.logged,
            suppressed: health.stats.suppressed,
        }
    }
}

/// What a successful request returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reply {
    Sandbox(SandboxStatus),
    Sandboxes(Vec<SandboxStatus>),
    Deleted { id: String },
}

/// Why a request failed, which decides the client's exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailureKind {
    /// The request or its policy is invalid: nothing changed.
    InvalidInput,
    /// No sandbox has that id.
    NotFound,
    /// The agent or the kernel failed.
    System,
}

/// One reply line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Response {
    Ok {
        reply: Reply,
    },
    Error {
        kind: FailureKind,
        /// The top-level message.
        message: String,
        /// The cause chain below it, outermost first.
        #[serde(default)]
        causes: Vec<String>,
    },
}

impl Response {
    /// An error response carrying `err`'s message and its cause chain.
    pub fn failure(kind: FailureKind, err: &(dyn std::error::Error + 'static)) -> Response {
        let mut causes = Vec::new();
        let mut source = err.source();
        while let Some(cause) = source {
            causes.push(cause.to_string());
            source = cause.source();
        }
        Response::Error {
            kind,
            message: err.to_string(),
            causes,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "cannot connect to the netleash agent at {socket}; start it with `netleash agent` \
         (or `systemctl start netleash-agent`), or give its socket with --socket"
    )]
    Connect {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot send the request to the netleash agent at {socket}")]
    Send {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no reply from the netleash agent at {socket}")]
    Receive {
        socket: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the netleash agent at {socket} sent a reply that is not valid: {line:?}")]
    Decode {
        socket: PathBuf,
        line: String,
        #[source]
        source: serde_json::Error,
    },
    #[error(
        "the netleash agent refused the request: {message}{}",
        causes_suffix(causes)
    )]
    Refused {
        kind: FailureKind,
        message: String,
        causes: Vec<String>,
    },
}

fn causes_suffix(causes: &[String]) -> String {
    causes.iter().map(|cause| format!(": {cause}")).collect()
}

/// Send `request` to the agent at `socket` and wait up to `timeout` for its
/// reply. A reply with `"status":"error"` becomes [`Error::Refused`].
pub fn call(socket: &Path, request: &Request, timeout: Duration) -> Result<Reply, Error> {
    let socket_path = socket.to_path_buf();
    let stream = UnixStream::connect(socket).map_err(|source| Error::Connect {
        socket: socket_path.clone(),
        source,
    })?;
    let send = |source| Error::Send {
        socket: socket_path.clone(),
        source,
    };
    stream.set_write_timeout(Some(timeout)).map_err(send)?;
    stream
        .set_read_timeout(Some(timeout))
        .map_err(|source| Error::Receive {
            socket: socket_path.clone(),
            source,
        })?;
    let mut line = serde_json::to_vec(request).expect("a request always serializes");
    line.push(b'\n');
    (&stream).write_all(&line).map_err(send)?;

    let mut reader = BufReader::new(&stream).take(MAX_MESSAGE_BYTES as u64);
    let mut reply = String::new();
    reader
        .read_line(&mut reply)
        .map_err(|source| Error::Receive {
            socket: socket_path.clone(),
            source,
        })?;
    if reply.is_empty() {
        return Err(Error::Receive {
            socket: socket_path,
            source: io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the agent closed the connection",
            ),
        });
    }
    match serde_json::from_str::<Response>(reply.trim_end()) {
        Ok(Response::Ok { reply }) => Ok(reply),
        Ok(Response::Error {
            kind,
            message,
            causes,
        }) => Err(Error::Refused {
            kind,
            message,
            causes,
        }),
        Err(source) => Err(Error::Decode {
            socket: socket_path,
            line: reply.trim_end().to_string(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_unknown_fields_are_refused() {
        let put = Request::Put(Put {
            id: "c1".into(),
            netns: "/proc/42/ns/net".into(),
            pid: Some(42),
            policy: r#"{"type":"unrestricted"}"#.into(),
            origin: "annotation netleash.policy".into(),
            agent: None,
            reply_when: ReplyWhen::RulesInForce,
        });
        let text = serde_json::to_string(&put).unwrap();
        assert!(text.starts_with(r#"{"op":"put","id":"c1""#), "{text}");
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), put);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"list"}"#).unwrap(),
            Request::List
        );
        let err = serde_json::from_str::<Request>(r#"{"op":"delete","id":"c1","force":true}"#)
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `force`"), "{err}");
        let err = serde_json::from_str::<Request>(&text.replace(r#""id""#, r#""force":1,"id""#))
            .unwrap_err();
        assert!(err.to_string().contains("unknown field `force`"), "{err}");
    }

    #[test]
    fn failure_carries_the_cause_chain() {
        let inner = io::Error::other("EPERM");
        let outer = Error::Send {
            socket: "/s".into(),
            source: inner,
        };
        let response = Response::failure(FailureKind::System, &outer);
        assert_eq!(
            response,
            Response::Error {
                kind: FailureKind::System,
                message: "cannot send the request to the netleash agent at /s".into(),
                causes: vec!["EPERM".into()],
            }
        );
    }

    #[test]
    fn call_reports_a_refusal_and_a_missing_agent() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let err = call(&socket, &Request::List, Duration::from_secs(1)).unwrap_err();
        assert!(matches!(err, Error::Connect { .. }), "{err:?}");

        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line).unwrap();
            let request: Request = serde_json::from_str(line.trim_end()).unwrap();
            assert_eq!(request, Request::Get { id: "nope".into() });
            let response = Response::Error {
                kind: FailureKind::NotFound,
                message: "no sandbox \"nope\"".into(),
                causes: vec![],
            };
            let mut out = serde_json::to_vec(&response).unwrap();
            out.push(b'\n');
            (&stream).write_all(&out).unwrap();
        });
        let err = call(
            &socket,
            &Request::Get { id: "nope".into() },
            Duration::from_secs(5),
        )
        .unwrap_err();
        server.join().unwrap();
        match err {
            Error::Refused { kind, message, .. } => {
                assert_eq!(kind, FailureKind::NotFound);
                assert_eq!(message, "no sandbox \"nope\"");
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
}
