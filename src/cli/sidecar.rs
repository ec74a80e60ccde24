//! `netleash sidecar`: enforce a policy in a sandbox's network namespace and
//! keep its DNS-derived sets fresh, until stopped.
//!
//! Start-up order, so that a client never sees an answer before its address
//! is allowed and bad input never changes the rules in force:
//! 1. arguments, upstreams and the policy are read and checked, and the
//!    health listener is bound (in the caller's namespace);
//! 2. the proxy's sockets are bound inside the sandbox's namespace
//!    (127.0.0.1 and ::1 at `--proxy-port`), so queries redirected from
//!    now on wait in their queues instead of failing;
//! 3. the ruleset (with the proxy's redirect) is enforced: kept as it is if
//!    the table in force already is this policy (a restart), else applied in
//!    one transaction;
//! 4. the resolver loop resolves every exact name once (bounded wait), then
//!    the proxy starts answering.
//!
//! Once the ruleset is enforced, the denied-connection log starts reading the
//! `deny` chain's nflog group ([`crate::denial_log`]); if it cannot, the
//! sidecar says why and enforces all the same (the rules do not depend on it).
//!
//! SIGHUP re-reads the policy and re-applies it atomically, carrying the
//! learned addresses the new policy still allows; a bad policy is reported
//! and the old rules stay. SIGTERM and SIGINT stop the sidecar and leave the
//! rules in place: the sandbox stays confined (fail closed).

use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode};
use serde_json::json;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::signal::unix::{SignalKind, signal};

use super::dns_args::{self, TtlArgs, parse_upstream};
use super::netns_args::NetnsArgs;
use super::policy_args::PolicyArgs;
use super::{EXIT_INVALID_INPUT, EXIT_OK, EXIT_SYSTEM_ERROR};
use crate::denial_log::{self, DenialWatch};
use crate::dns::cache::AnswerCache;
use crate::dns::names::AllowedNames;
use crate::dns::origins::AddressOrigins;
use crate::dns::proxy::{Proxy, ProxyConfig, ProxyHandle, Refusal};
use crate::dns::resolver::{ResolverHandle, ResolverLoop, ResolverLoopConfig};
use crate::dns::ttl::TtlPolicy;
use crate::dns::upstream::{DNS_PORT, Upstream, UpstreamSockets};
use crate::enforcer::{self, bind_proxy_sockets, serve_proxy, start_denial_log, still_allowed};
use crate::http_endpoint;
use crate::kernel::CountedVerdict;
use crate::netns::{self, SocketFactory, SocketKind};
use crate::policy::{CompileOptions, ProxyOptions};
use crate::ruleset::{self, Ruleset};
use crate::sandbox::{self, Enforcement, MarkedSockets, Sandbox};

pub use crate::enforcer::{DEFAULT_PROXY_MARK, DEFAULT_PROXY_PORT, DEFAULT_PROXY_ZONE};

/// How long start-up waits for the resolver loop's first round before the
/// proxy answers anyway: one lookup's attempts, with a margin.
const FIRST_ROUND_LIMIT: Duration = Duration::from_secs(10);

/// How long the health check waits for the proxy's answer.
const HEALTH_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// How long the health endpoint waits for a request head.
const HEALTH_REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// How a query for a name the policy does not allow is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RefuseWith {
    /// RCODE REFUSED (5): the client sees the name is blocked.
    Refused,
    /// RCODE NXDOMAIN (3): for clients that try other resolvers on REFUSED.
    Nxdomain,
}

/// Enforce POLICY in a sandbox's network namespace and run its filtering DNS
/// proxy and resolver loop, until SIGTERM or SIGINT (which leave the rules in
/// force). SIGHUP reloads the policy.
///
/// Every UDP and TCP packet to port 53 from the sandbox is redirected to the
/// proxy, which answers only names the policy allows and writes their
/// addresses into the allow sets before it releases the answer.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub policy: PolicyArgs,

    #[command(flatten)]
    pub target: NetnsArgs,

    /// An upstream DNS server the proxy and the resolver loop ask: IP, IP:PORT or
    /// [IPv6]:PORT (port 53 by default). Repeatable. Default: --resolver, else the
    /// namespace's resolv.conf (/etc/netns/NAME/resolv.conf for a named namespace,
    /// /proc/PID/root/etc/resolv.conf with --pid, else --resolv-conf).
    #[arg(long = "upstream", value_name = "IP[:PORT]", value_parser = parse_upstream)]
    pub upstreams: Vec<SocketAddr>,

    /// The port the proxy listens on at 127.0.0.1 and ::1 inside the sandbox.
    #[arg(long, value_name = "PORT", default_value_t = DEFAULT_PROXY_PORT,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_port: u16,

    /// The packet mark (SO_MARK) of the proxy's upstream sockets, decimal or 0x hex.
    /// Only packets with it may reach the upstream servers; nothing in the sandbox
    /// can set it without CAP_NET_ADMIN.
    #[arg(long, value_name = "MARK", default_value = "0x6e6c", value_parser = parse_mark)]
    pub proxy_mark: u32,

    /// The conntrack zone of the proxy's upstream connections (1-65535), apart from
    /// the sandbox's own connections in zone 0.
    #[arg(long, value_name = "ZONE", default_value_t = DEFAULT_PROXY_ZONE,
          value_parser = clap::value_parser!(u16).range(1..))]
    pub proxy_zone: u16,

    /// Serve GET /healthz over HTTP on this address (in the caller's namespace),
    /// e.g. 127.0.0.1:9053; port 0 picks a free port. No health endpoint unless given.
    #[arg(long, value_name = "ADDR")]
    pub health: Option<SocketAddr>,

    /// How queries for names the policy does not allow are answered.
    #[arg(long, value_enum, default_value = "refused")]
    pub refuse_with: RefuseWith,

    #[command(flatten)]
    pub ttl: TtlArgs,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    DnsArgs(#[from] dns_args::Error),
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("cannot serve health checks on {addr}; give a free address with --health")]
    Health {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open sockets in the sandbox's network namespace")]
    Sockets(#[source] netns::Error),
    #[error(transparent)]
    Enforcer(#[from] enforcer::Error),
    #[error(transparent)]
    Sandbox(#[from] sandbox::Error),
    #[error("cannot start the DNS proxy")]
    Proxy(#[source] crate::dns::proxy::Error),
    #[error("cannot start the resolver loop")]
    Resolver(#[source] crate::dns::resolver::Error),
    #[error("cannot wait for signals")]
    Signals(#[source] std::io::Error),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::DnsArgs(_) => EXIT_INVALID_INPUT,
            _ => EXIT_SYSTEM_ERROR,
        }
    }
}

impl From<Error> for super::Error {
    fn from(error: Error) -> Self {
        // Boxed: the sidecar's errors carry a namespace and a kernel error,
        // and would make every command's error type large.
        super::Error::Sidecar(Box::new(error))
    }
}

fn parse_mark(text: &str) -> Result<u32, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => text.parse(),
    };
    match parsed {
        Ok(0) => Err("the mark must not be 0: unmarked packets carry 0".into()),
        Ok(mark) => Ok(mark),
        Err(_) => Err(format!("{text:?} is not a 32-bit mark (decimal or 0x hex)")),
    }
}

/// The resolv.conf of the sandbox: its named namespace's, the process's view
/// of /etc/resolv.conf, or `--resolv-conf`.
fn sandbox_resolv_conf(target: &netns::Target, fallback: &Path) -> PathBuf {
    let own = match target {
        netns::Target::Name(name) => Some(PathBuf::from(format!("/etc/netns/{name}/resolv.conf"))),
        netns::Target::Pid(pid) => Some(PathBuf::from(format!("/proc/{pid}/root/etc/resolv.conf"))),
        netns::Target::Path(_) => None,
    };
    own.filter(|path| path.exists())
        .unwrap_or_else(|| fallback.to_path_buf())
}

/// `--upstream`, else `--resolver` on port 53, else the sandbox's resolv.conf.
fn upstreams(args: &Args) -> Result<Vec<SocketAddr>, Error> {
    if !args.upstreams.is_empty() {
        return Ok(args.upstreams.clone());
    }
    if !args.policy.resolvers.is_empty() {
        return Ok(args
            .policy
            .resolvers
            .iter()
            .map(|ip| SocketAddr::new(*ip, DNS_PORT))
            .collect());
    }
    let path = sandbox_resolv_conf(&args.target.target(), &args.policy.resolv_conf);
    Ok(dns_args::servers_from_resolv_conf(&path)?)
}

/// Prints a lifecycle line on stdout (the sidecar's log of what it enforces).
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "netleash sidecar: {line}");
    let _ = out.flush();
}

/// Everything a running sidecar holds.
struct Sidecar {
    sandbox: Arc<Sandbox>,
    proxy: Arc<Proxy>,
    proxy_handles: tokio::sync::Mutex<Vec<ProxyHandle>>,
    /// Where the proxy listens (UDP and TCP) inside the sandbox.
    listening: Vec<SocketAddr>,
    resolver: tokio::sync::Mutex<Option<ResolverHandle>>,
    resolver_config: ResolverLoopConfig,
    cache: Arc<AnswerCache>,
    origins: Arc<AddressOrigins>,
    factory: Arc<SocketFactory>,
    proxy_port: u16,
    options: CompileOptions,
    denials: DenialWatch,
}

/// Caps glibc's malloc arenas at [`MALLOC_ARENAS`]. glibc gives a thread
/// that meets a locked arena an arena of its own, up to eight per CPU
/// (mallopt(3), M_ARENA_MAX), and memory freed into one arena is not reused
/// by another: with a tokio worker per CPU, a sidecar's resident memory grows
/// with the host's CPU count rather than with its policy (1,000 names: 16.5 MB
/// uncapped, 15.8 MB capped at two, on 2 CPUs; docs/benchmarks.md). One
/// sidecar runs per sandbox, so that memory is paid thousands of times; its
/// threads mostly wait on sockets, so two arenas are no point of contention.
/// Set before any thread starts.
fn cap_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        // SAFETY: mallopt only changes the allocator's parameters; called
        // before this process starts any thread of its own.
        let applied = unsafe { libc::mallopt(libc::M_ARENA_MAX, MALLOC_ARENAS) };
        if applied != 1 {
            tracing::debug!("mallopt(M_ARENA_MAX) was refused; the allocator keeps its default");
        }
    }
}

/// The sidecar's malloc arenas: the main one and one for its other threads.
#[cfg(target_env = "gnu")]
const MALLOC_ARENAS: libc::c_int = 2;

pub fn run(mut args: Args) -> Result<u8, super::Error> {
    cap_malloc_arenas();
    let ttl = args.ttl.policy().map_err(Error::DnsArgs)?;
    let upstreams = upstreams(&args)?;
    // The upstreams are what the sandbox's DNS resolves through; giving them
    // as resolvers keeps the policy loader from reading another resolv.conf
    // and has it warn about an upstream inside the blocklist.
    args.policy.resolvers = upstreams.iter().map(SocketAddr::ip).collect();
    args.policy.resolvers.dedup();
    let (policy, mut options) = args.policy.load()?;
    options.resolvers = Vec::new();
    options.proxy = Some(ProxyOptions {
        port: args.proxy_port,
        mark: args.proxy_mark,
        upstreams: upstreams.clone(),
        zone: args.proxy_zone,
    });
    let ruleset = ruleset::compile(&policy, &options);

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("netleash-sidecar")
        .build()
        .map_err(Error::Runtime)?;
    runtime.block_on(serve(args, ruleset, options, upstreams, ttl))
}

async fn serve(
    args: Args,
    ruleset: Ruleset,
    options: CompileOptions,
    upstreams: Vec<SocketAddr>,
    ttl: TtlPolicy,
) -> Result<u8, super::Error> {
    let health = match args.health {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| Error::Health { addr, source })?,
        ),
        None => None,
    };
    let mut hangups = signal(SignalKind::hangup()).map_err(Error::Signals)?;
    let mut terminations = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut interrupts = signal(SignalKind::interrupt()).map_err(Error::Signals)?;

    let target = args.target.target();
    let factory = Arc::new(SocketFactory::start(&target).map_err(Error::Sockets)?);
    let listeners = bind_proxy_sockets(&target, args.proxy_port).map_err(Error::Enforcer)?;
    let sandbox = Arc::new(Sandbox::open(target.clone()).map_err(Error::Sandbox)?);
    let origins = Arc::new(AddressOrigins::default());
    let names = AllowedNames::new(ruleset.names.clone());
    let digest = ruleset.digest.clone();
    let enforced = sandbox
        .enforce(ruleset, still_allowed(origins.clone(), names.clone()))
        .await
        .map_err(Error::Sandbox)?;
    say(&match enforced {
        Enforcement::AlreadyInForce { learned } => format!(
            "policy {digest} is already in force in the {target}; kept the table and its {learned} learned element(s)"
        ),
        Enforcement::Applied { report, .. } => format!(
            "applied policy {digest} to the {target}: {} sets, {} rules",
            report.sets, report.rules
        ),
    });
    let denials = start_denial_log(
        &target,
        options.nflog_group,
        denial_log::sandbox_label(&target),
        origins.clone(),
    );
    if let Some(error) = denials.error() {
        say(&format!(
            "the denied-connection log is off; the rules are enforced all the same: {error}"
        ));
    }

    let opener: Arc<dyn UpstreamSockets> =
        Arc::new(MarkedSockets::new(factory.clone(), args.proxy_mark));
    let mut proxy_config = ProxyConfig::new(upstreams.clone());
    proxy_config.upstream = Upstream::new(upstreams.clone()).with_sockets(opener.clone());
    proxy_config.ttl = ttl;
    proxy_config.refusal = match args.refuse_with {
        RefuseWith::Refused => Refusal::Refused,
        RefuseWith::Nxdomain => Refusal::NxDomain,
    };
    let mut resolver_config = ResolverLoopConfig::new(upstreams);
    resolver_config.ttl = ttl;
    resolver_config.sockets = Some(opener);
    let cache = Arc::new(AnswerCache::default());
    let proxy = Arc::new(
        Proxy::new(
            proxy_config,
            names.clone(),
            sandbox.clone(),
            cache.clone(),
            origins.clone(),
        )
        .map_err(Error::Proxy)?,
    );

    let mut sidecar = Sidecar {
        sandbox,
        proxy,
        proxy_handles: tokio::sync::Mutex::new(Vec::new()),
        listening: Vec::new(),
        resolver: tokio::sync::Mutex::new(None),
        resolver_config,
        cache,
        origins,
        factory,
        proxy_port: args.proxy_port,
        options,
        denials,
    };
    let first_round = sidecar.start_resolver(&names).await?;
    if let Some((lookups, done)) = first_round
        && done < lookups
    {
        tracing::warn!(
            lookups,
            done,
            "the resolver loop's first round did not finish in time; the proxy answers anyway"
        );
    }
    // Start-up (policy, compile, apply, first round) leaves freed memory in
    // the allocator's heaps; give it back to the kernel once.
    // SAFETY: malloc_trim(3) has no preconditions.
    unsafe { libc::malloc_trim(0) };
    for handle in serve_proxy(&sidecar.proxy, listeners).map_err(Error::Enforcer)? {
        sidecar.listening.push(handle.udp_addr());
        sidecar.proxy_handles.get_mut().push(handle);
    }
    let sidecar = Arc::new(sidecar);
    let health_line = match health {
        Some(listener) => {
            let at = listener.local_addr().map_err(|source| Error::Health {
                addr: args
                    .health
                    .unwrap_or(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))),
                source,
            })?;
            tokio::spawn(serve_health(listener, sidecar.clone()));
            format!("; health on http://{at}/healthz")
        }
        None => String::new(),
    };
    let listening: Vec<String> = sidecar.listening.iter().map(ToString::to_string).collect();
    say(&format!(
        "ready: DNS proxy on {}{health_line}",
        listening.join(" and ")
    ));

    let signal_name = loop {
        tokio::select! {
            _ = hangups.recv() => sidecar.reload(&args).await,
            _ = terminations.recv() => break "SIGTERM",
            _ = interrupts.recv() => break "SIGINT",
        }
    };
    say(&format!(
        "stopping on {signal_name}; the rules stay in force (fail closed): the sandbox's DNS \
         still goes to the proxy's address, which no longer answers, and learned addresses \
         expire with their timeouts. Start the sidecar again to resume, or `netleash remove` \
         to lift the policy"
    ));
    sidecar.stop().await;
    Ok(EXIT_OK)
}

impl Sidecar {
    /// Starts the resolver loop for the exact names of `names` and waits
    /// (bounded) until each of its lookups has run once. Returns how many
    /// lookups there are and how many ran, or `None` if there are none.
    async fn start_resolver(&self, names: &AllowedNames) -> Result<Option<(usize, usize)>, Error> {
        let lookups = names.exact_names().len() * 2;
        if lookups == 0 {
            return Ok(None);
        }
        let handle = ResolverLoop::new(
            self.resolver_config.clone(),
            names,
            self.sandbox.clone(),
            self.cache.clone(),
            self.origins.clone(),
        )
        .map_err(Error::Resolver)?
        .spawn();
        let started = Instant::now();
        let mut done = handle.snapshot().len();
        while done < lookups && started.elapsed() < FIRST_ROUND_LIMIT {
            tokio::time::sleep(Duration::from_millis(20)).await;
            done = handle.snapshot().len();
        }
        *self.resolver.lock().await = Some(handle);
        Ok(Some((lookups, done)))
    }

    async fn stop_resolver(&self) {
        if let Some(handle) = self.resolver.lock().await.take()
            && let Err(error) = handle.stop().await
        {
            tracing::error!(error = %super::render_error(&error), "stopping the resolver loop");
        }
    }

    /// SIGHUP: re-read the policy and enforce it; on any error the rules and
    /// names in force stay.
    async fn reload(&self, args: &Args) {
        let loaded = args.policy.load();
        let (policy, _) = match loaded {
            Ok(loaded) => loaded,
            Err(error) => {
                say("reload failed: the policy does not load; the rules in force stay");
                tracing::error!("{}", super::render_error(&error));
                return;
            }
        };
        let ruleset = ruleset::compile(&policy, &self.options);
        let old_names = self
            .sandbox
            .ruleset()
            .map(|r| AllowedNames::new(r.names.clone()))
            .unwrap_or_default();
        let names = AllowedNames::new(ruleset.names.clone());
        let digest = ruleset.digest.clone();
        // The proxy answers by the new names from now on, so nothing it
        // learns from here is for a name the new policy drops.
        self.proxy.set_names(names.clone());
        let enforced = self
            .sandbox
            .enforce(ruleset, still_allowed(self.origins.clone(), names.clone()))
            .await;
        match enforced {
            Ok(Enforcement::Applied {
                carried, forgotten, ..
            }) => say(&format!(
                "reloaded policy {digest}: kept {carried} learned element(s) it still allows, forgot {forgotten}"
            )),
            Ok(Enforcement::AlreadyInForce { .. }) => {
                say(&format!(
                    "reload: policy {digest} is unchanged and in force"
                ));
                return;
            }
            Err(error) => {
                self.proxy.set_names(old_names);
                say(
                    "reload failed: the kernel did not take the new policy; the rules in force stay",
                );
                tracing::error!("{}", super::render_error(&error));
                return;
            }
        }
        self.stop_resolver().await;
        if let Err(error) = self.start_resolver(&names).await {
            tracing::error!("{}", super::render_error(&error));
        }
    }

    /// Stops answering and resolving. The rules and learned elements stay.
    async fn stop(&self) {
        let handles = std::mem::take(&mut *self.proxy_handles.lock().await);
        for handle in handles {
            if let Err(error) = handle.stop().await {
                tracing::error!(error = %super::render_error(&error), "stopping the DNS proxy");
            }
        }
        self.stop_resolver().await;
        tokio::task::block_in_place(|| self.denials.stop());
    }

    /// The health check: the table in force is this sidecar's policy, and
    /// the proxy answers a query sent to it inside the sandbox.
    async fn health(&self) -> (bool, serde_json::Value) {
        let digest = self.sandbox.ruleset().map(|r| r.digest.clone());
        let table = self.sandbox.status().await;
        let (table_digest, table_error) = match &table {
            Ok(status) => (status.as_ref().and_then(|s| s.digest.clone()), None),
            Err(error) => (None, Some(super::render_error(error))),
        };
        let counted = |verdict| match &table {
            Ok(Some(status)) => {
                let (packets, bytes) = status.counted(verdict);
                json!({"packets": packets, "bytes": bytes})
            }
            _ => serde_json::Value::Null,
        };
        let table_in_force = digest.is_some() && table_digest == digest;
        let probe = self.probe_proxy().await;
        let proxy_answers = probe.is_ok();
        let stats = self.proxy.stats();
        let sink = self.sandbox.stats();
        let (lookups, failing, stale) = match self.resolver.lock().await.as_ref() {
            Some(handle) => {
                let snapshot = handle.snapshot();
                (
                    snapshot.len(),
                    snapshot.iter().filter(|l| l.failures > 0).count(),
                    snapshot.iter().filter(|l| l.stale).count(),
                )
            }
            None => (0, 0, 0),
        };
        let healthy = table_in_force && proxy_answers;
        let body = json!({
            "healthy": healthy,
            "digest": digest,
            "table": {
                "in_force": table_in_force,
                "digest": table_digest,
                "error": table_error,
                // The rule counters: what the allow rules accepted (the
                // packets that open a connection) and what the deny chain
                // rejected.
                "allowed": counted(CountedVerdict::Allowed),
                "denied": counted(CountedVerdict::Denied),
            },
            "proxy": {
                "answers": proxy_answers,
                "error": probe.err(),
                "listen": self.listening.iter().map(ToString::to_string).collect::<Vec<_>>(),
                "udp_queries": stats.udp_queries,
                "tcp_queries": stats.tcp_queries,
                "forwarded": stats.forwarded,
                "cache_hits": stats.cache_hits,
                "refused": stats.refused,
                "malformed": stats.malformed,
                "overloaded": stats.overloaded,
                "upstream_failures": stats.upstream_failures,
                "learn_failures": stats.learn_failures,
                "addresses_over_cap": stats.addresses_over_cap,
                "truncated": stats.truncated,
            },
            "learned": {
                "names": self.origins.name_count(),
                "addresses": self.origins.len(),
                "elements_added": sink.elements_added,
                "transactions": sink.transactions,
                "failures": sink.failures,
            },
            "resolver": {
                "lookups": lookups,
                "failing": failing,
                "stale": stale,
            },
            "denials": self.denials.health(),
        });
        (healthy, body)
    }

    /// Sends a DNS STATUS query (opcode 2, which the proxy answers NOTIMP
    /// without logging or forwarding) from inside the sandbox to the proxy.
    async fn probe_proxy(&self) -> Result<(), String> {
        let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, self.proxy_port));
        let exchange = async {
            let socket = self
                .factory
                .open(proxy.ip(), SocketKind::Udp, None)
                .and_then(|socket| {
                    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
                    socket.set_nonblocking(true)?;
                    UdpSocket::from_std(socket.into())
                })?;
            socket.connect(proxy).await?;
            let id = crate::dns::random_u64() as u16;
            let query = Message::new(id, MessageType::Query, OpCode::Status);
            let wire = query.to_vec().map_err(std::io::Error::other)?;
            socket.send(&wire).await?;
            let mut buffer = [0u8; 512];
            loop {
                let length = socket.recv(&mut buffer).await?;
                if let Ok(answer) = Message::from_vec(&buffer[..length])
                    && answer.metadata.id == id
                    && answer.metadata.message_type == MessageType::Response
                {
                    return Ok::<(), std::io::Error>(());
                }
            }
        };
        match tokio::time::timeout(HEALTH_PROBE_TIMEOUT, exchange).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("querying the proxy at {proxy}: {error}")),
            Err(_) => Err(format!(
                "the proxy at {proxy} did not answer within {HEALTH_PROBE_TIMEOUT:?}"
            )),
        }
    }
}

async fn serve_health(listener: TcpListener, sidecar: Arc<Sidecar>) {
    http_endpoint::serve(listener, move |stream| {
        answer_health(stream, sidecar.clone())
    })
    .await;
}

/// Answers one HTTP/1.x request: `GET /healthz` with 200 (healthy) or 503
/// and the JSON status; anything else 404.
async fn answer_health(mut stream: TcpStream, sidecar: Arc<Sidecar>) {
    let Some(head) = http_endpoint::read_request_head(&mut stream, HEALTH_REQUEST_TIMEOUT).await
    else {
        return;
    };
    let (status, body) = match http_endpoint::method_and_path(&head) {
        (Some("GET"), Some("/healthz")) => {
            let (healthy, body) = sidecar.health().await;
            let status = if healthy {
                "200 OK"
            } else {
                "503 Service Unavailable"
            };
            (status, body.to_string())
        }
        _ => (
            "404 Not Found",
            json!({"error": "only GET /healthz is served"}).to_string(),
        ),
    };
    http_endpoint::respond(&mut stream, status, "application/json", &body).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_are_decimal_or_hex_and_never_zero() {
        assert_eq!(parse_mark("0x6e6c").unwrap(), 0x6e6c);
        assert_eq!(parse_mark("28268").unwrap(), 0x6e6c);
        assert!(parse_mark("0").unwrap_err().contains("not be 0"));
        assert!(parse_mark("0xzz").is_err());
    }

    #[test]
    fn a_named_namespace_reads_its_own_resolv_conf_if_it_has_one() {
        let fallback = Path::new("/etc/resolv.conf");
        assert_eq!(
            sandbox_resolv_conf(&netns::Target::Name("netleash-no-such-ns".into()), fallback),
            fallback
        );
        assert_eq!(
            sandbox_resolv_conf(&netns::Target::Pid(std::process::id()), fallback),
            PathBuf::from(format!("/proc/{}/root/etc/resolv.conf", std::process::id()))
        );
    }
}
