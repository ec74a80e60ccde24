//! `netleash agent`: the host daemon that enforces the policies of many
//! sandboxes, given to it over its local API (`netleash sandbox`, the OCI
//! hook). See docs/agent.md.
//!
//! Start-up order: arguments and upstreams are checked; the API socket is
//! bound (refusing to start if another agent answers on it); the sandboxes of
//! the state directory are adopted again (their rules never left the kernel);
//! then the API and the metrics endpoint serve. SIGTERM and SIGINT stop the
//! proxies and the resolver loop and leave every sandbox's rules in force
//! (fail closed): their DNS goes to a proxy address nobody answers on, and
//! learned addresses expire with their timeouts until the agent is back.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};

use super::dns_args::{self, TtlArgs, parse_duration, parse_upstream};
use super::{EXIT_INVALID_INPUT, EXIT_OK, EXIT_SYSTEM_ERROR};
use crate::agent::protocol::DEFAULT_SOCKET;
use crate::agent::server::{self, bind_socket, serve_api, serve_metrics};
use crate::agent::state::DEFAULT_STATE_DIR;
use crate::agent::{self, Agent, AgentConfig};
use crate::enforcer::DEFAULT_PROXY_PORT;
use crate::policy::Expansions;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    /// One JSON object per line (tracing-subscriber's JSON format).
    Json,
}

/// Run the host agent: enforce the policies of many sandboxes, each given
/// over the local API by id and network namespace, with one DNS proxy per
/// sandbox (bound inside its namespace) and one resolver loop and answer
/// cache shared by all. Upstream DNS queries leave from the agent's own
/// network namespace.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The API's Unix socket (created with mode 0600).
    #[arg(long, value_name = "PATH", default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Where the agent records its sandboxes, to adopt them after a restart.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,

    /// An upstream DNS server, asked from the agent's own network namespace:
    /// IP, IP:PORT or [IPv6]:PORT (port 53 by default). Repeatable.
    /// Default: the nameserver lines of --resolv-conf.
    #[arg(long = "upstream", value_name = "IP[:PORT]", value_parser = parse_upstream)]
    pub upstreams: Vec<SocketAddr>,

    /// The resolv.conf read for upstreams when no --upstream is given.
    #[arg(long, value_name = "FILE", default_value = "/etc/resolv.conf")]
    pub resolv_conf: PathBuf,

    /// Serve Prometheus metrics at GET /metrics on this address, e.g.
    /// 127.0.0.1:9154; port 0 picks a free port. None unless given.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,

    /// Log as text or as JSON lines (same as the global --log-json).
    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// The port each sandbox's proxy listens on at 127.0.0.1 and ::1 inside its namespace.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROXY_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,

    /// How often the agent looks for sandboxes whose namespace is gone (and forgets them).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_duration)]
    pub reap_interval: Duration,

    /// A platform host every sandbox needs (callback, telemetry), allowed in
    /// every limited policy the agent enforces, in the allowed_hosts grammar
    /// (`host`, `host:port`, `https://host`, CIDR, ...). Repeatable.
    #[arg(long = "extra-host", value_name = "HOST")]
    pub extra_hosts: Vec<String>,

    #[command(flatten)]
    pub ttl: TtlArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    DnsArgs(#[from] dns_args::Error),
    /// An --extra-host that is not in the allowed_hosts grammar; the
    /// policy module's message names it and the fix.
    #[error(transparent)]
    ExtraHost(#[from] crate::policy::Error),
    #[error(transparent)]
    Socket(#[from] server::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot serve metrics on {addr}; give a free address with --metrics")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Agent(Box<agent::Error>),
    #[error("cannot wait for signals")]
    Signals(#[source] std::io::Error),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::DnsArgs(_) | Error::ExtraHost(_) => EXIT_INVALID_INPUT,
            _ => EXIT_SYSTEM_ERROR,
        }
    }
}

impl From<Error> for super::Error {
    fn from(error: Error) -> Self {
        super::Error::Agent(Box::new(error))
    }
}

/// Forgets, every `interval`, the sandboxes whose namespace is gone.
async fn reap(agent: Arc<Agent>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval.max(Duration::from_millis(100)));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        agent.forget_gone().await;
    }
}

/// Prints a lifecycle line on stdout.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "netleash agent: {line}");
    let _ = out.flush();
}

/// Fixes glibc's mmap threshold at its default, 128 KiB. By default glibc
/// raises it (and the trim threshold, to twice it) each time a chunk it had
/// mmapped is freed, so after the first table read-back every later
/// read-back's 128 KiB buffer (`kernel::netlink`) comes from the malloc
/// arenas instead, and the freed space stays resident there. The agent reads
/// the tables of hundreds of sandboxes from their own threads; fixed, those
/// buffers are mapped and unmapped whole. Set before any thread starts
/// (mallopt(3): setting M_MMAP_THRESHOLD turns the dynamic adjustment off).
fn fix_mmap_threshold() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes the allocator's parameters; called
        // before this process starts any thread of its own.
        let applied = unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) };
        if applied != 1 {
            tracing::debug!(
                "mallopt(M_MMAP_THRESHOLD) was refused; the allocator keeps its dynamic threshold"
            );
        }
    }
}

pub fn run(args: Args) -> Result<u8, super::Error> {
    fix_mmap_threshold();
    let ttl = args.ttl.policy().map_err(Error::DnsArgs)?;
    // Checked before the socket is bound: a typo stops the start, it does
    // not surface later in every sandbox's Put.
    for host in &args.extra_hosts {
        Expansions::default()
            .add_extra_host(host)
            .map_err(Error::ExtraHost)?;
    }
    let upstreams = if args.upstreams.is_empty() {
        dns_args::servers_from_resolv_conf(&args.resolv_conf).map_err(Error::DnsArgs)?
    } else {
        args.upstreams.clone()
    };
    let listener = bind_socket(&args.socket).map_err(Error::Socket)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| server::Error::Bind {
            path: args.socket.clone(),
            source,
        })
        .map_err(Error::Socket)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("netleash-agent")
        .build()
        .map_err(Error::Runtime)?;
    let config = AgentConfig {
        upstreams,
        state_dir: args.state_dir.clone(),
        proxy_port: args.proxy_port,
        ttl,
        extra_hosts: args.extra_hosts.clone(),
    };
    let result = runtime.block_on(serve(&args, config, listener));
    // A clean stop removes the socket; a crash leaves a stale one, which the
    // next start replaces.
    let _ = std::fs::remove_file(&args.socket);
    result
}

async fn serve(
    args: &Args,
    config: AgentConfig,
    listener: std::os::unix::net::UnixListener,
) -> Result<u8, super::Error> {
    let mut terminations = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut interrupts = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    let listener = tokio::net::UnixListener::from_std(listener)
        .map_err(|source| server::Error::Bind {
            path: args.socket.clone(),
            source,
        })
        .map_err(Error::Socket)?;
    let metrics = match args.metrics {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Metrics { addr, source })?,
        ),
        None => None,
    };
    let upstreams: Vec<String> = config.upstreams.iter().map(ToString::to_string).collect();
    let agent = Arc::new(Agent::start(config).map_err(|error| Error::Agent(Box::new(error)))?);
    let (adopted, forgotten) = agent
        .adopt()
        .await
        .map_err(|error| Error::Agent(Box::new(error)))?;
    let metrics_line = match metrics {
        Some(listener) => {
            let at = listener.local_addr().map_err(|source| Error::Metrics {
                addr: args
                    .metrics
                    .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
                source,
            })?;
            tokio::spawn(serve_metrics(listener, agent.clone()));
            format!("; metrics on http://{at}/metrics")
        }
        None => String::new(),
    };
    tokio::spawn(serve_api(listener, agent.clone()));
    tokio::spawn(reap(agent.clone(), args.reap_interval));
    say(&format!(
        "ready: API on {}; upstream {}; adopted {adopted} sandbox(es), forgot {forgotten} whose \
         namespace is gone{metrics_line}",
        args.socket.display(),
        upstreams.join(", "),
    ));
    let signal_name = tokio::select! {
        _ = terminations.recv() => "SIGTERM",
        _ = interrupts.recv() => "SIGINT",
    };
    say(&format!(
        "stopping on {signal_name}; every sandbox's rules stay in force (fail closed) and the \
         next start adopts them again"
    ));
    agent.stop().await;
    Ok(EXIT_OK)
}
