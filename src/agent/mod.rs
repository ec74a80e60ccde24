//! The host agent: one long-running process that enforces the policies of
//! many sandboxes, and the local API the OCI hook and operators use to reach it.
//!
//! - [`protocol`]: the JSON-line API on a root-only Unix socket;
//! - [`state`]: the state directory that lets a restarted agent adopt its
//!   sandboxes again;
//! - [`server`]: the socket and the Prometheus metrics endpoint;
//! - this module: the [`Agent`] itself.
//!
//! One process serves every sandbox. Each sandbox has its own kernel session
//! (`Sandbox`) and its own DNS proxy, whose sockets are bound inside the
//! sandbox's namespace (the ruleset redirects the sandbox's port-53 traffic
//! to them). All of them share one answer cache and one resolver loop keyed
//! by name: N sandboxes allowing the same names cost one upstream lookup per
//! name and type per TTL, and each answer fans out to the sets of every
//! sandbox whose policy allows the name. Upstream queries (the proxies' and
//! the loop's) leave from the agent's own network namespace, so a sandbox
//! needs no resolver of its own and its ruleset lets no DNS out at all.
//!
//! Each sandbox has its own denied-connection log ([`crate::denial_log`]): an
//! nflog listener in its namespace, started once its rules are enforced,
//! naming each denied destination by the host that sandbox's proxy (or the
//! resolver loop, for that sandbox) released the address for. Each sandbox
//! keeps its own address-to-name map, so a sandbox is never told a name only
//! another sandbox resolved.
//!
//! Each sandbox's namespace is held by an open file descriptor taken at Put,
//! and all work in it goes through that descriptor (`/proc/self/fd/N`): a
//! pid that is reused later can never point the agent at another namespace.

pub mod protocol;
pub mod server;
pub mod state;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;

use crate::denial_log::{DenialStats, DenialWatch};
use crate::dns::cache::{AnswerCache, CacheKey, CacheStats};
use crate::dns::learn::{AddressSink, Learned, LearnedBatch, learned_for};
use crate::dns::names::AllowedNames;
use crate::dns::origins::AddressOrigins;
use crate::dns::proxy::{Proxy, ProxyConfig, ProxyHandle, ProxyStats};
use crate::dns::resolver::{
    self, NameRoutes, ResolverHandle, ResolverLoop, ResolverLoopConfig, ResolverStats, Route,
};
use crate::dns::ttl::TtlPolicy;
use crate::dns::upstream::Upstream;
use crate::enforcer::{
    self, open_sandbox_sockets, proxy_options, serve_proxy, still_allowed, watch_denials,
};
use crate::kernel::CountedVerdict;
use crate::netns::{self, Target};
use crate::policy::{self, CompileOptions, Expansions};
use crate::ruleset::{self, Ruleset};
use crate::sandbox::{self, Enforcement, Sandbox, SinkStats};
use protocol::{AgentDefinition, DenialLogStatus, FailureKind, ReplyWhen, SandboxStatus};
use state::{SandboxRecord, StateDir};

/// How long a Put waits for the resolver loop's first round over names no
/// other sandbox had (one lookup's attempts, with a margin) before it
/// replies anyway; the proxy learns any name it is asked for regardless.
const FIRST_ROUND_LIMIT: Duration = Duration::from_secs(10);

/// The longest sandbox id: container ids are 64 hex digits.
const MAX_ID_LENGTH: usize = 128;

/// What the agent is started with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The DNS servers the proxies and the resolver loop ask, from the
    /// agent's own network namespace.
    pub upstreams: Vec<SocketAddr>,
    pub state_dir: PathBuf,
    /// Where each sandbox's proxy listens (127.0.0.1 and ::1 in its namespace).
    pub proxy_port: u16,
    pub ttl: TtlPolicy,
    /// Platform hosts every sandbox needs, in the allowed_hosts grammar
    /// (`--extra-host`): allowed in every limited policy.
    pub extra_hosts: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{id:?} is not a valid sandbox id: use 1 to {MAX_ID_LENGTH} letters, digits, '.', '_' \
         or '-', not starting with '.' (a container id is fine)"
    )]
    InvalidId { id: String },
    /// The policy's own message, unchanged (line:column and the fix).
    #[error(transparent)]
    Policy(#[from] policy::Error),
    #[error(
        "the network namespace {path} of sandbox {id:?} does not exist; give /proc/PID/ns/net of \
         a running process, a bind mount, or /run/netns/NAME"
    )]
    NoNamespace {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} (sandbox {id:?}) is not a network namespace file")]
    NotNamespace {
        id: String,
        path: PathBuf,
        #[source]
        source: Box<netns::Error>,
    },
    #[error(
        "the network namespace {path} of sandbox {id:?} is already enforced as sandbox {other:?}; \
         sandboxes that share a network namespace share its policy: put it once (for a pod, on \
         the container that owns the namespace), or delete {other:?} first"
    )]
    NamespaceTaken {
        id: String,
        path: PathBuf,
        other: String,
    },
    #[error("no sandbox {id:?}; list them with `netleash sandbox list`")]
    NotFound { id: String },
    #[error("cannot start the DNS proxy of sandbox {id:?}")]
    Proxy {
        id: String,
        #[source]
        source: Box<enforcer::Error>,
    },
    #[error("cannot enforce the policy of sandbox {id:?}; the rules in force before stay")]
    Enforce {
        id: String,
        #[source]
        source: Box<sandbox::Error>,
    },
    #[error("cannot record sandbox {id:?} in the state directory")]
    State {
        id: String,
        #[source]
        source: state::Error,
    },
    #[error("cannot start the state directory")]
    StateDir(#[source] state::Error),
    #[error("the resolver loop refused a name of sandbox {id:?}")]
    Resolver {
        id: String,
        #[source]
        source: Box<resolver::Error>,
    },
    #[error("cannot start the resolver loop")]
    ResolverStart(#[source] Box<resolver::Error>),
}

impl Error {
    /// What the API reports, which decides the client's exit code.
    pub fn kind(&self) -> FailureKind {
        match self {
            Error::InvalidId { .. }
            | Error::Policy(_)
            | Error::NoNamespace { .. }
            | Error::NotNamespace { .. }
            | Error::NamespaceTaken { .. } => FailureKind::InvalidInput,
            Error::NotFound { .. } => FailureKind::NotFound,
            _ => FailureKind::System,
        }
    }
}

/// Sandbox ids become file names in the state directory.
fn check_id(id: &str) -> Result<(), Error> {
    let valid = !id.is_empty()
        && id.len() <= MAX_ID_LENGTH
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidId { id: id.to_string() })
    }
}

/// A namespace held open, and its identity.
struct HeldNamespace {
    file: File,
    dev: u64,
    inode: u64,
}

impl HeldNamespace {
    fn open(id: &str, path: &Path) -> Result<HeldNamespace, Error> {
        let no_namespace = |source| Error::NoNamespace {
            id: id.to_string(),
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(no_namespace)?;
        let metadata = file.metadata().map_err(no_namespace)?;
        let held = HeldNamespace {
            file,
            dev: metadata.dev(),
            inode: metadata.ino(),
        };
        // Checked with an ioctl, without a thread that enters it; whether
        // the agent may enter it shows when its sockets are opened there.
        netns::check_network_namespace(&held.file, path).map_err(|source| Error::NotNamespace {
            id: id.to_string(),
            path: path.to_path_buf(),
            source: Box::new(source),
        })?;
        Ok(held)
    }

    /// The namespace through this process's descriptor, valid as long as
    /// `self` lives, whatever happens to the path it was opened from.
    fn target(&self) -> Target {
        Target::Path(PathBuf::from(format!(
            "/proc/self/fd/{}",
            self.file.as_raw_fd()
        )))
    }
}

/// Whether a sandbox being created is in the state directory already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recorded {
    /// Adopted after a restart, from its record: on a failure the record
    /// stays, for the next restart to try again.
    Already,
    /// Put now: recorded while its rules are applied, removed if that fails.
    New,
}

/// One sandbox the agent enforces.
struct Enforced {
    record: RwLock<SandboxRecord>,
    /// Kept open for the sandbox's whole life here; every target below goes through it.
    #[expect(
        dead_code,
        reason = "held for its file descriptor, which the targets name"
    )]
    namespace: HeldNamespace,
    sandbox: Arc<Sandbox>,
    names: RwLock<AllowedNames>,
    proxy: Arc<Proxy>,
    proxy_handles: tokio::sync::Mutex<Vec<ProxyHandle>>,
    /// The name each address this sandbox was given came from: recorded by
    /// its proxy and by the resolver loop's writes into its sets.
    origins: Arc<AddressOrigins>,
    denials: DenialWatch,
}

impl Enforced {
    fn names(&self) -> AllowedNames {
        self.names
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    fn record(&self) -> SandboxRecord {
        self.record
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Stops the proxy and the denied-connection log (which releases its
    /// nflog group in the namespace before this returns).
    async fn stop(&self) {
        let handles = std::mem::take(&mut *self.proxy_handles.lock().await);
        for handle in handles {
            if let Err(error) = handle.stop().await {
                tracing::error!(error = %crate::dns::error_chain(&error), "stopping a DNS proxy");
            }
        }
        tokio::task::block_in_place(|| self.denials.stop());
    }
}

/// The sandboxes by id; the resolver loop's routes.
#[derive(Default)]
struct Registry {
    sandboxes: RwLock<BTreeMap<String, Arc<Enforced>>>,
}

impl Registry {
    fn get(&self, id: &str) -> Option<Arc<Enforced>> {
        self.read().get(id).cloned()
    }

    fn all(&self) -> Vec<Arc<Enforced>> {
        self.read().values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<String, Arc<Enforced>>> {
        self.sandboxes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, Arc<Enforced>>> {
        self.sandboxes
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Every exact name some sandbox allows.
    fn exact_names(&self) -> BTreeSet<String> {
        self.read()
            .values()
            .flat_map(|e| {
                e.names()
                    .exact_names()
                    .into_iter()
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl NameRoutes for Registry {
    fn routes(&self, name: &str) -> Vec<Route> {
        self.read()
            .values()
            .filter_map(|enforced| {
                let names = enforced.names();
                let bindings: Vec<_> = names.matching(name).into_iter().cloned().collect();
                (!bindings.is_empty()).then(|| Route {
                    sink: enforced.sandbox.clone() as Arc<dyn AddressSink>,
                    bindings,
                    origins: enforced.origins.clone(),
                })
            })
            .collect()
    }
}

/// Per-sandbox numbers for the metrics endpoint.
pub struct SandboxMetrics {
    pub status: SandboxStatus,
    pub proxy: ProxyStats,
    pub sink: SinkStats,
    pub denials: DenialStats,
    /// Whether the denied-connection log is reading denied packets.
    pub denial_log_listening: bool,
    /// Reading the table failed (the namespace's kernel side is gone?).
    pub table_error: Option<String>,
}

/// Agent-wide numbers for the metrics endpoint.
pub struct AgentMetrics {
    pub sandboxes: Vec<SandboxMetrics>,
    pub resolver: ResolverStats,
    pub tracked_names: usize,
    pub cache: CacheStats,
}

/// The running agent. Share it as `Arc<Agent>`.
pub struct Agent {
    config: AgentConfig,
    state: StateDir,
    options: CompileOptions,
    registry: Arc<Registry>,
    resolver: tokio::sync::Mutex<ResolverHandle>,
    cache: Arc<AnswerCache>,
    /// Puts and Deletes run one at a time, so the registry, the tracked
    /// names and the state directory always agree.
    changes: tokio::sync::Mutex<()>,
    /// The namespaces (device, inode) of forgotten sandboxes that are still
    /// stopping: their proxy sockets and nflog group are bound there until
    /// [`Agent::retire`] is done, so a Put into one waits for that.
    retiring: std::sync::Mutex<BTreeSet<(u64, u64)>>,
}

impl Agent {
    /// Opens the state directory and starts the (empty) resolver loop. Must
    /// be called inside a tokio runtime.
    pub fn start(config: AgentConfig) -> Result<Agent, Error> {
        let state = StateDir::open(&config.state_dir).map_err(Error::StateDir)?;
        let options = CompileOptions {
            // The sandbox sends no DNS anywhere: it all goes to its proxy,
            // which asks from the agent's namespace.
            resolvers: Vec::new(),
            proxy: Some(proxy_options(config.proxy_port, Vec::new())),
            ..CompileOptions::default()
        };
        let registry = Arc::new(Registry::default());
        let cache = Arc::new(AnswerCache::default());
        let mut resolver_config = ResolverLoopConfig::new(config.upstreams.clone());
        resolver_config.ttl = config.ttl;
        let resolver = ResolverLoop::routed(resolver_config, registry.clone(), cache.clone())
            .map_err(|error| Error::ResolverStart(Box::new(error)))?
            .spawn();
        Ok(Agent {
            config,
            state,
            options,
            registry,
            resolver: tokio::sync::Mutex::new(resolver),
            cache,
            changes: tokio::sync::Mutex::new(()),
            retiring: std::sync::Mutex::default(),
        })
    }

    /// Adopts every sandbox of the state directory whose namespace still
    /// exists and is the same one (same device and inode); forgets the
    /// others. A sandbox whose table in force is its policy keeps it as it
    /// is (no window: `Sandbox::enforce` finds it already in force), and its
    /// proxy and DNS work start again. Returns (adopted, forgotten).
    pub async fn adopt(&self) -> Result<(usize, usize), Error> {
        let (records, unreadable) = self.state.load().map_err(Error::StateDir)?;
        for file in unreadable {
            tracing::error!(path = %file.path.display(), problem = %file.problem, "state file is not a sandbox record; left as it is");
        }
        let (mut adopted, mut forgotten) = (0, 0);
        for record in records {
            let id = record.id.clone();
            let held = match HeldNamespace::open(&id, &record.netns) {
                Ok(held) if (held.dev, held.inode) == (record.ns_dev, record.ns_inode) => held,
                outcome => {
                    let now = match outcome {
                        Ok(held) => format!("is now namespace {}:{}", held.dev, held.inode),
                        Err(error) => crate::dns::error_chain(&error),
                    };
                    tracing::info!(sandbox = %id, netns = %record.netns.display(), was = %format!("{}:{}", record.ns_dev, record.ns_inode), %now, "the sandbox's namespace is gone; forgetting its state");
                    if let Err(error) = self.state.remove(&id) {
                        tracing::error!(sandbox = %id, error = %crate::dns::error_chain(&error), "cannot remove the state file");
                    }
                    forgotten += 1;
                    continue;
                }
            };
            let created = {
                let _change = self.changes.lock().await;
                self.create(record, held, Recorded::Already, None).await
            };
            match created {
                Ok((entry, fresh)) => {
                    self.wait_first_round(&fresh).await;
                    let status = self.status_of(&entry).await;
                    tracing::info!(sandbox = %id, digest = %status.digest, "adopted the sandbox after a restart");
                    adopted += 1;
                }
                Err(error) => {
                    tracing::error!(sandbox = %id, error = %crate::dns::error_chain(&error), "cannot adopt the sandbox; its rules stay in force and its state file stays");
                }
            }
        }
        Ok((adopted, forgotten))
    }

    /// Create or replace the policy of sandbox `put.id` in the namespace at
    /// `put.netns`; returns once the rules are in force (and, as
    /// `put.reply_when` says, the new names resolved). Bad input changes
    /// nothing.
    pub async fn put(&self, put: protocol::Put) -> Result<SandboxStatus, Error> {
        let protocol::Put {
            id,
            netns,
            pid,
            policy,
            origin,
            agent,
            reply_when,
        } = put;
        check_id(&id)?;
        // Validated before anything is touched.
        let loaded = policy::load(&policy, &origin, &self.expansions(agent.as_ref())?)?;
        let held = HeldNamespace::open(&id, &netns)?;
        let record = SandboxRecord {
            id: id.clone(),
            netns,
            pid,
            ns_dev: held.dev,
            ns_inode: held.inode,
            policy,
            origin,
            agent,
        };
        let mut moved = None;
        let created = {
            let _change = loop {
                let change = self.changes.lock().await;
                if self.is_retiring((held.dev, held.inode)) {
                    // Another sandbox of this namespace is still stopping (a
                    // Delete just before this Put); other Puts go on meanwhile.
                    drop(change);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    continue;
                }
                // One sandbox per namespace: a second one's proxy could not bind
                // its port there, and its policy would replace the first one's table.
                let Some(other) = self.registry.all().into_iter().find(|other| {
                    let other = other.record();
                    other.id != id && (other.ns_dev, other.ns_inode) == (held.dev, held.inode)
                }) else {
                    break change;
                };
                let other = other.record();
                if !process_left(&other) {
                    return Err(Error::NamespaceTaken {
                        id,
                        path: record.netns,
                        other: other.id,
                    });
                }
                // The other sandbox's process has exited while its namespace
                // lives on (held by a pod's other containers; its poststop
                // has not come yet): a container of the pod restarting. Its
                // sandbox is forgotten as a Delete would (its rules stay in
                // force until this Put's replace them in one transaction),
                // and once it has let go of the namespace's proxy port and
                // nflog group this Put goes on.
                tracing::info!(sandbox = %id, previous = %other.id, pid = ?other.pid, "the namespace's previous sandbox has exited; this one takes the namespace over");
                let previous = self.unregister(&other.id)?;
                drop(change);
                self.retire(&other.id, previous).await;
            };
            match self.registry.get(&id) {
                Some(existing) => {
                    let same = {
                        let old = existing.record();
                        (old.ns_dev, old.ns_inode) == (held.dev, held.inode)
                    };
                    if same {
                        self.replace(&existing, record, loaded).await
                    } else {
                        // The id moved to another namespace: the old one is
                        // left as a Delete leaves it (retired below, also
                        // when the new one fails).
                        moved = Some(self.unregister(&id)?);
                        self.create(record, held, Recorded::New, Some(loaded)).await
                    }
                }
                None => self.create(record, held, Recorded::New, Some(loaded)).await,
            }
        };
        if let Some(old) = moved {
            self.retire(&id, old).await;
        }
        let (entry, fresh) = created?;
        // Outside the lock: a sandbox whose names are slow to resolve does
        // not hold up the Puts of others.
        if reply_when == ReplyWhen::RulesInForce {
            // The apply verified the table; reading it again for set sizes
            // and counters would hold up the container start for nothing.
            return Ok(Self::known_status(&entry));
        }
        self.wait_first_round(&fresh).await;
        Ok(self.status_of(&entry).await)
    }

    /// The host expansions of a sandbox's policy: the agent's extra hosts
    /// and the MCP servers of the sandbox's agent definition.
    fn expansions(&self, agent: Option<&AgentDefinition>) -> Result<Expansions, Error> {
        let mut expansions = Expansions::default();
        for host in &self.config.extra_hosts {
            expansions.add_extra_host(host)?;
        }
        if let Some(agent) = agent {
            expansions.add_agent_file(&agent.text, &agent.origin)?;
        }
        Ok(expansions)
    }

    /// The ruleset of `record`'s policy; `loaded` is that policy if the
    /// caller has loaded it already (a Put validates it first).
    fn compile(
        &self,
        record: &SandboxRecord,
        loaded: Option<policy::Policy>,
    ) -> Result<Ruleset, Error> {
        let policy = match loaded {
            Some(policy) => policy,
            None => {
                let expansions = self.expansions(record.agent.as_ref())?;
                policy::load(&record.policy, &record.origin, &expansions)?
            }
        };
        for warning in &policy.warnings {
            tracing::warn!(sandbox = %record.id, %warning, "policy warning");
        }
        Ok(ruleset::compile(&policy, &self.options))
    }

    /// A new sandbox: everything it needs inside its namespace opened in one
    /// visit (the proxy's sockets, bound from then on, so redirected queries
    /// wait in their queues; the kernel session and element writer; the
    /// nflog subscription), then the rules in one transaction with the
    /// addresses the shared cache already has for its names, while its
    /// state record is written; then the denied-connection log, the
    /// resolver loop, the proxy. Returns the sandbox and the names it is the
    /// first to allow.
    async fn create(
        &self,
        record: SandboxRecord,
        namespace: HeldNamespace,
        recorded: Recorded,
        loaded: Option<policy::Policy>,
    ) -> Result<(Arc<Enforced>, BTreeSet<String>), Error> {
        let id = record.id.clone();
        let ruleset = self.compile(&record, loaded)?;
        let target = namespace.target();
        let names = AllowedNames::new(ruleset.names.clone());
        let digest = ruleset.digest.clone();
        // New (or adopted after a restart): this sandbox has released no
        // address yet, so a policy applied over an older one carries nothing.
        let origins = Arc::new(AddressOrigins::default());
        let (seed, released) = self.cached_addresses(&names);
        // The record is written on another thread while this one applies
        // (a restart adopts it; if the apply fails it is removed again).
        let saving = (recorded == Recorded::New).then(|| {
            let state = self.state.clone();
            let record = record.clone();
            tokio::task::spawn_blocking(move || state.save(&record))
        });
        // One visit to the namespace by this thread for every socket, then
        // the apply on this thread too: no thread hop before the rules are
        // in force.
        let opened = tokio::task::block_in_place(|| {
            let sockets =
                open_sandbox_sockets(&target, self.config.proxy_port, self.options.nflog_group)
                    .map_err(|source| Error::Proxy {
                        id: id.clone(),
                        source: Box::new(source),
                    })?;
            let enforce_error = |source| Error::Enforce {
                id: id.clone(),
                source: Box::new(source),
            };
            let (session, writer) = sockets.netfilter.map_err(|source| {
                enforce_error(sandbox::Error::Open {
                    target: target.clone(),
                    source,
                })
            })?;
            let (sandbox, enforced) = Sandbox::enforce_new(
                target.clone(),
                session,
                writer,
                ruleset,
                still_allowed(origins.clone(), names.clone()),
                &seed,
            )
            .map_err(enforce_error)?;
            Ok::<_, Error>((sockets.listeners, sockets.nflog, sandbox, enforced))
        });
        let saved = match saving {
            None => Ok(()),
            Some(saving) => saving.await.unwrap_or_else(|error| {
                Err(state::Error::Write {
                    path: self.state.path(&id),
                    source: io::Error::other(format!("the writing thread failed: {error}")),
                })
            }),
        };
        let (listeners, nflog, sandbox, enforced) = match opened {
            Ok(opened) => opened,
            Err(error) => {
                if recorded == Recorded::New
                    && saved.is_ok()
                    && let Err(error) = self.state.remove(&id)
                {
                    tracing::error!(sandbox = %id, error = %crate::dns::error_chain(&error), "cannot remove the state file of a sandbox that failed");
                }
                return Err(error);
            }
        };
        let sandbox = Arc::new(sandbox);
        log_enforcement(&id, &digest, &enforced);
        // The rules are in force (fail closed) even if the agent cannot
        // record the sandbox; it then does not serve it.
        saved.map_err(|source| Error::State {
            id: id.clone(),
            source,
        })?;
        if let Enforcement::Applied { .. } = enforced {
            for (name, addresses) in released {
                origins.record(&name, addresses);
            }
        }

        let mut proxy_config = ProxyConfig::new(self.config.upstreams.clone());
        proxy_config.upstream = Upstream::new(self.config.upstreams.clone());
        proxy_config.ttl = self.config.ttl;
        let proxy_error = |source| Error::Proxy {
            id: id.clone(),
            source: Box::new(source),
        };
        let proxy = Proxy::new(
            proxy_config,
            names.clone(),
            sandbox.clone(),
            self.cache.clone(),
            origins.clone(),
        )
        .map_err(|source| proxy_error(enforcer::Error::Proxy(source)))?;
        // The rules are in force, so their deny chain logs to the group.
        let denials = watch_denials(nflog, self.options.nflog_group, id.clone(), origins.clone());
        let entry = Arc::new(Enforced {
            record: RwLock::new(record.clone()),
            namespace,
            sandbox,
            names: RwLock::new(names.clone()),
            proxy: Arc::new(proxy),
            proxy_handles: tokio::sync::Mutex::new(Vec::new()),
            origins,
            denials,
        });
        // Routed, then seeded again: an answer the loop got since the seed
        // was read from the cache is written too; what the apply carried is
        // remembered as written, so the rest costs no transaction.
        self.registry.write().insert(id.clone(), entry.clone());
        self.seed_from_cache(&entry, &names).await;
        let ready = async {
            let fresh = self.track_names(&id).await?;
            let handles = serve_proxy(&entry.proxy, listeners).map_err(proxy_error)?;
            *entry.proxy_handles.lock().await = handles;
            Ok::<_, Error>(fresh)
        };
        match ready.await {
            Ok(fresh) => Ok((entry, fresh)),
            Err(error) => {
                // The rules stay in force (fail closed); the agent forgets it.
                self.registry.write().remove(&id);
                entry.stop().await;
                let _ = self.state.remove(&id);
                self.untrack_unused().await;
                Err(error)
            }
        }
    }

    /// A new policy for a sandbox already enforced in the same namespace:
    /// applied atomically, carrying the learned addresses it still allows.
    /// Returns the sandbox and the names it is the first to allow.
    async fn replace(
        &self,
        entry: &Arc<Enforced>,
        record: SandboxRecord,
        loaded: policy::Policy,
    ) -> Result<(Arc<Enforced>, BTreeSet<String>), Error> {
        let id = record.id.clone();
        let ruleset = self.compile(&record, Some(loaded))?;
        let names = AllowedNames::new(ruleset.names.clone());
        let digest = ruleset.digest.clone();
        let old_names = entry.names();
        // The proxy answers by the new names from now on, so nothing it
        // learns from here is for a name the new policy drops.
        entry.proxy.set_names(names.clone());
        let enforced = entry
            .sandbox
            .enforce(ruleset, still_allowed(entry.origins.clone(), names.clone()))
            .await;
        let enforced = match enforced {
            Ok(enforced) => enforced,
            Err(source) => {
                entry.proxy.set_names(old_names);
                return Err(Error::Enforce {
                    id,
                    source: Box::new(source),
                });
            }
        };
        log_enforcement(&id, &digest, &enforced);
        *entry
            .names
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = names.clone();
        *entry
            .record
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = record.clone();
        self.state.save(&record).map_err(|source| Error::State {
            id: id.clone(),
            source,
        })?;
        self.seed_from_cache(entry, &names).await;
        let fresh = self.track_names(&id).await?;
        self.untrack_unused().await;
        Ok((entry.clone(), fresh))
    }

    /// Forgets every sandbox whose namespace path no longer names the
    /// namespace it was put with (the container exited without a Delete:
    /// /proc/PID/ns/net is gone or is another process's, or /run/netns/NAME
    /// was deleted). The agent's own descriptor keeps such a namespace
    /// alive, so without this it would never be freed. Returns the ids forgotten.
    pub async fn forget_gone(&self) -> Vec<String> {
        let mut gone = Vec::new();
        for entry in self.registry.all() {
            let record = entry.record();
            let same = std::fs::metadata(&record.netns)
                .is_ok_and(|m| (m.dev(), m.ino()) == (record.ns_dev, record.ns_inode));
            if same {
                continue;
            }
            let unregistered = {
                let _change = self.changes.lock().await;
                // Still the same entry (not replaced or deleted meanwhile)?
                if !self
                    .registry
                    .get(&record.id)
                    .is_some_and(|current| Arc::ptr_eq(&current, &entry))
                {
                    continue;
                }
                tracing::info!(sandbox = %record.id, netns = %record.netns.display(), "the sandbox's namespace is gone; forgetting it");
                self.unregister(&record.id)
            };
            match unregistered {
                Ok(entry) => {
                    self.retire(&record.id, entry).await;
                    gone.push(record.id);
                }
                Err(error) => {
                    tracing::error!(sandbox = %record.id, error = %crate::dns::error_chain(&error), "cannot forget the sandbox");
                }
            }
        }
        gone
    }

    /// Forget sandbox `id`: its proxy and DNS work stop, its state file
    /// goes; its rules stay in its namespace.
    pub async fn delete(&self, id: &str) -> Result<(), Error> {
        let entry = {
            let _change = self.changes.lock().await;
            self.unregister(id)?
        };
        self.retire(id, entry).await;
        Ok(())
    }

    fn retiring(&self) -> std::sync::MutexGuard<'_, BTreeSet<(u64, u64)>> {
        self.retiring
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn is_retiring(&self, namespace: (u64, u64)) -> bool {
        self.retiring().contains(&namespace)
    }

    /// Removes sandbox `id` from the state directory and the registry, so
    /// the API no longer knows it, and marks its namespace as retiring.
    /// Called with `changes` held; the caller then [`Agent::retire`]s the
    /// entry without it.
    fn unregister(&self, id: &str) -> Result<Arc<Enforced>, Error> {
        if self.registry.get(id).is_none() {
            return Err(Error::NotFound { id: id.to_string() });
        }
        // The state file goes first: once the sandbox is unknown to the API
        // it is gone from the state directory too.
        self.state.remove(id).map_err(|source| Error::State {
            id: id.to_string(),
            source,
        })?;
        let entry = self
            .registry
            .write()
            .remove(id)
            .ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        let record = entry.record();
        self.retiring().insert((record.ns_dev, record.ns_inode));
        Ok(entry)
    }

    /// Stops an unregistered sandbox's proxy, DNS work and denied-connection
    /// log, then stops resolving the names no sandbox allows any more.
    /// Stopping takes up to the denied-connection log's poll interval, so
    /// it runs without `changes`: the Puts of other sandboxes (a container
    /// start waits for one) do not wait for it; only a Put into the same
    /// namespace does (`retiring`). The names are untracked with `changes`
    /// held, so a Put that tracks a name at the same moment cannot lose it.
    async fn retire(&self, id: &str, entry: Arc<Enforced>) {
        entry.stop().await;
        let record = entry.record();
        self.retiring().remove(&(record.ns_dev, record.ns_inode));
        {
            let _change = self.changes.lock().await;
            self.untrack_unused().await;
        }
        tracing::info!(sandbox = %id, "forgot the sandbox; its rules stay in its namespace");
    }

    pub async fn get(&self, id: &str) -> Result<SandboxStatus, Error> {
        let entry = self
            .registry
            .get(id)
            .ok_or_else(|| Error::NotFound { id: id.to_string() })?;
        Ok(self.status_of(&entry).await)
    }

    pub async fn list(&self) -> Vec<SandboxStatus> {
        let mut all = Vec::new();
        for entry in self.registry.all() {
            all.push(self.status_of(&entry).await);
        }
        all
    }

    pub async fn metrics(&self) -> AgentMetrics {
        let mut sandboxes = Vec::new();
        for entry in self.registry.all() {
            let (status, table_error) = self.read_status(&entry).await;
            let denial_log = entry.denials.health();
            sandboxes.push(SandboxMetrics {
                status,
                proxy: entry.proxy.stats(),
                sink: entry.sandbox.stats(),
                denials: denial_log.stats,
                denial_log_listening: denial_log.listening,
                table_error,
            });
        }
        let resolver = self.resolver.lock().await;
        AgentMetrics {
            sandboxes,
            resolver: resolver.stats(),
            tracked_names: resolver.names().len(),
            cache: self.cache.stats(),
        }
    }

    /// Stops every proxy, denied-connection log and the resolver loop. The
    /// rules stay (fail closed).
    pub async fn stop(&self) {
        let _change = self.changes.lock().await;
        let all = self.registry.all();
        // Every log thread stops at its next poll; told all at once, they
        // stop together instead of one poll interval after another.
        for entry in &all {
            entry.denials.request_stop();
        }
        for entry in all {
            entry.stop().await;
        }
        // Each lookup stops at its next wake-up; what it wrote stays until
        // its timeout.
        let mut resolver = self.resolver.lock().await;
        for name in resolver.names() {
            resolver.untrack(&name);
        }
    }

    async fn status_of(&self, entry: &Enforced) -> SandboxStatus {
        let (status, table_error) = self.read_status(entry).await;
        if let Some(error) = table_error {
            tracing::warn!(sandbox = %status.id, %error, "cannot read the sandbox's table");
        }
        status
    }

    /// The status, from the table as the kernel holds it now.
    async fn read_status(&self, entry: &Enforced) -> (SandboxStatus, Option<String>) {
        let mut status = Self::known_status(entry);
        match entry.sandbox.status().await {
            Ok(Some(table)) => {
                if let Some(digest) = &table.digest {
                    status.digest = digest.clone();
                }
                status.set_sizes = table
                    .sets
                    .iter()
                    .map(|s| (s.name.clone(), s.elements as u64))
                    .collect();
                (status.allowed_packets, status.allowed_bytes) =
                    table.counted(CountedVerdict::Allowed);
                (status.denied_packets, status.denied_bytes) =
                    table.counted(CountedVerdict::Denied);
                (status, None)
            }
            Ok(None) => (status, Some("the table is missing".into())),
            Err(error) => (status, Some(crate::dns::error_chain(&error))),
        }
    }

    /// What the agent knows of a sandbox without reading its table: id,
    /// namespace, the digest of the policy it put in force, the proxy's
    /// counters and the denied-connection log's health. Set sizes and rule
    /// counters stay empty.
    fn known_status(entry: &Enforced) -> SandboxStatus {
        let record = entry.record();
        let stats = entry.proxy.stats();
        SandboxStatus {
            id: record.id,
            netns: record.netns,
            pid: record.pid,
            digest: entry
                .sandbox
                .ruleset()
                .map(|r| r.digest.clone())
                .unwrap_or_default(),
            dns_queries: stats.udp_queries + stats.tcp_queries,
            dns_refused: stats.refused,
            denial_log: Some(DenialLogStatus::from(entry.denials.health())),
            ..SandboxStatus::default()
        }
    }

    /// What the shared cache already knows for the exact names of `names`:
    /// the elements to write, and the addresses released per name.
    fn cached_addresses(
        &self,
        names: &AllowedNames,
    ) -> (Vec<Learned>, Vec<(String, Vec<std::net::IpAddr>)>) {
        let now = Instant::now();
        let mut batch = LearnedBatch::default();
        let mut released = Vec::new();
        for name in names.exact_names() {
            let bindings = names.matching(name);
            for record_type in [RecordType::A, RecordType::AAAA] {
                let key = CacheKey {
                    name: name.to_string(),
                    record_type,
                    dnssec_ok: false,
                };
                let Some(hit) = self.cache.get(&key, now) else {
                    continue;
                };
                let addresses = hit.addresses_at(now);
                released.push((name.to_string(), addresses.iter().map(|a| a.addr).collect()));
                for learned in learned_for(&bindings, &addresses, &self.config.ttl) {
                    batch.add(learned.set, learned.element, learned.timeout);
                }
            }
        }
        (batch.into_sorted(), released)
    }

    /// Writes into a sandbox's sets what the shared cache already knows for
    /// its exact names, so a sandbox joining names other sandboxes keep
    /// resolved has their addresses before its first query. Elements the
    /// sandbox wrote already (a seed its apply carried) are not written again.
    async fn seed_from_cache(&self, entry: &Enforced, names: &AllowedNames) {
        let (batch, released) = self.cached_addresses(names);
        if batch.is_empty() {
            return;
        }
        match entry.sandbox.learn(&batch).await {
            Ok(()) => {
                for (name, addresses) in released {
                    entry.origins.record(&name, addresses);
                }
            }
            Err(error) => {
                tracing::warn!(sandbox = %entry.record().id, error = %crate::dns::error_chain(&error), "cannot write the cached addresses; the proxy and the resolver loop will");
            }
        }
    }

    /// Tracks the exact names of sandbox `id` that no other sandbox had;
    /// returns them.
    async fn track_names(&self, id: &str) -> Result<BTreeSet<String>, Error> {
        let Some(entry) = self.registry.get(id) else {
            return Ok(BTreeSet::new());
        };
        let mut fresh = BTreeSet::new();
        {
            let mut resolver = self.resolver.lock().await;
            for name in entry.names().exact_names() {
                if resolver.track(name).map_err(|source| Error::Resolver {
                    id: id.to_string(),
                    source: Box::new(source),
                })? {
                    fresh.insert(name.to_string());
                }
            }
        }
        Ok(fresh)
    }

    /// Waits (bounded) until the resolver loop has looked up each of `fresh`
    /// once (A and AAAA), so the reply to a Put shows their addresses in the
    /// sets. The proxy answers meanwhile and learns on its own.
    async fn wait_first_round(&self, fresh: &BTreeSet<String>) {
        let lookups = fresh.len() * 2;
        let started = Instant::now();
        while lookups > 0 && started.elapsed() < FIRST_ROUND_LIMIT {
            let done = self
                .resolver
                .lock()
                .await
                .snapshot()
                .iter()
                .filter(|lookup| fresh.contains(&lookup.name))
                .count();
            if done >= lookups {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Stops resolving names no sandbox allows any more.
    async fn untrack_unused(&self) {
        let wanted = self.registry.exact_names();
        let mut resolver = self.resolver.lock().await;
        for name in resolver.names() {
            if !wanted.contains(&name) {
                resolver.untrack(&name);
            }
        }
    }
}

/// Whether the process `record` was put with has left the sandbox's
/// namespace: its /proc/PID/ns/net no longer names that namespace (device
/// and inode, namespaces(7)), because the process has exited (and its pid
/// may be another process's now) or moved. A record without a pid never
/// counts as left. A process that is still in the namespace, or a pid
/// reused by another process in it, counts as there: the namespace is then
/// not taken over.
fn process_left(record: &SandboxRecord) -> bool {
    record.pid.is_some_and(|pid| {
        let there = std::fs::metadata(format!("/proc/{pid}/ns/net"))
            .is_ok_and(|m| (m.dev(), m.ino()) == (record.ns_dev, record.ns_inode));
        !there
    })
}

fn log_enforcement(id: &str, digest: &str, enforced: &Enforcement) {
    match enforced {
        Enforcement::AlreadyInForce { learned } => tracing::info!(
            sandbox = %id, %digest, learned,
            "the policy is already in force; kept the table and its learned elements"
        ),
        Enforcement::Applied {
            report,
            carried,
            forgotten,
        } => tracing::info!(
            sandbox = %id, %digest, sets = report.sets, rules = report.rules, carried, forgotten,
            "applied the policy"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_file_names() {
        for good in ["c1", "4f3a9b", "pod_1.ctr-2", &"a".repeat(128)] {
            check_id(good).unwrap();
        }
        for bad in ["", ".hidden", "a/b", "..", "a b", &"a".repeat(129)] {
            let error = check_id(bad).unwrap_err();
            assert_eq!(error.kind(), FailureKind::InvalidInput, "{bad:?}");
        }
    }

    #[test]
    fn a_bad_policy_is_invalid_input_with_the_policy_message_unchanged() {
        let error =
            policy::load("{\"type\":\"limted\"}", "req", &Expansions::default()).unwrap_err();
        let expected = error.to_string();
        let wrapped = Error::from(error);
        assert_eq!(wrapped.kind(), FailureKind::InvalidInput);
        assert_eq!(wrapped.to_string(), expected);
    }

    #[test]
    fn only_a_process_gone_from_the_namespace_has_left_it() {
        let own = std::fs::metadata("/proc/self/ns/net").expect("own namespace");
        let record = |pid: Option<u32>| SandboxRecord {
            id: "c1".into(),
            netns: PathBuf::from("/proc/self/ns/net"),
            pid,
            ns_dev: own.dev(),
            ns_inode: own.ino(),
            policy: String::new(),
            origin: String::new(),
            agent: None,
        };
        // This process is in the namespace: it has not left.
        assert!(!process_left(&record(Some(std::process::id()))));
        // Above the kernel's PID_MAX_LIMIT (2^22): never a live process.
        assert!(process_left(&record(Some(u32::MAX))));
        // Without a pid nothing says the sandbox's process is gone.
        assert!(!process_left(&record(None)));
        // A live process in another namespace (this one, against a record
        // of another inode) has left it.
        let mut elsewhere = record(Some(std::process::id()));
        elsewhere.ns_inode += 1;
        assert!(process_left(&elsewhere));
    }

    #[test]
    fn a_missing_namespace_is_invalid_input() {
        let error = HeldNamespace::open("c1", Path::new("/proc/0/ns/net"))
            .err()
            .expect("no process 0");
        assert_eq!(error.kind(), FailureKind::InvalidInput);
        assert!(error.to_string().contains("does not exist"), "{error}");
    }
}
