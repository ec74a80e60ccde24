//! The resolver loop: keeps every exact allowed name resolved and its
//! addresses in the sets, independently of whether a client asks.
//!
//! Each (name, A|AAAA) is one lookup with its own schedule:
//! - on an answer, its addresses are written with the TTL policy's timeouts
//!   and the next lookup is scheduled inside the refresh window (before the
//!   elements expire, with jitter);
//! - when the addresses change, only the new ones are written; the old ones
//!   are not refreshed and expire by their timeout (rotation);
//! - a name with no address of the type (NODATA/NXDOMAIN) is looked at again
//!   after its negative TTL; whatever it had expires;
//! - on an upstream failure the lookup is retried with exponential backoff,
//!   and the last-known addresses are re-written so that they outlive the
//!   next retry, up to the stale limit: an outage never empties a set.
//!
//! A loop serves one sink (the sidecar: one sandbox) or, through
//! [`NameRoutes`], every sandbox of the host agent: it is then keyed by name
//! alone, names are tracked and untracked while it runs, and each answer
//! fans out to the sets of every sandbox whose policy allows the name, so N
//! sandboxes with the same names cost one upstream lookup per name and type
//! per TTL.
//!
//! Wildcards cannot be enumerated; their names are learned by the proxy.
//! CNAME chains are followed by hickory-resolver. Lookups run with bounded
//! concurrency so that a policy with thousands of names does not burst the
//! upstream.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_resolver::Resolver;
use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::{Name, RecordType};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;

use crate::dns::answer::{AnswerAddress, MAX_ADDRESSES_PER_NAME, answer_ttl, extract_addresses};
use crate::dns::cache::{AnswerCache, CacheKey, CachedAnswer};
use crate::dns::learn::{AddressSink, Learned, learned_for};
use crate::dns::names::AllowedNames;
use crate::dns::origins::AddressOrigins;
use crate::dns::ttl::{self, TtlPolicy};
use crate::dns::upstream::{SocketsRuntime, UPSTREAM_ATTEMPTS, UPSTREAM_TIMEOUT, UpstreamSockets};
use crate::dns::{error_chain, jitter};
use crate::ruleset::NameBinding;

/// Lookups in flight at the same time. 16 keeps a policy of 1,000 names to a
/// few hundred queries per second at start-up against a loopback or LAN
/// upstream, and a slow upstream cannot tie up more than 16 tasks.
pub const RESOLVER_CONCURRENCY: usize = 16;

#[derive(Debug, Clone)]
pub struct ResolverLoopConfig {
    /// The upstream servers (from resolv.conf or given explicitly).
    pub upstream: Vec<SocketAddr>,
    pub ttl: TtlPolicy,
    pub concurrency: usize,
    pub max_addresses_per_name: usize,
    /// Timeout of one query attempt.
    pub query_timeout: Duration,
    /// Queries sent again after a failed one, within one lookup.
    pub query_retries: usize,
    /// Where the loop's sockets come from (default: the process's namespace).
    pub sockets: Option<Arc<dyn UpstreamSockets>>,
}

impl ResolverLoopConfig {
    /// The defaults documented on the constants, with these upstream servers.
    pub fn new(upstream: Vec<SocketAddr>) -> Self {
        ResolverLoopConfig {
            upstream,
            ttl: TtlPolicy::default(),
            concurrency: RESOLVER_CONCURRENCY,
            max_addresses_per_name: MAX_ADDRESSES_PER_NAME,
            query_timeout: UPSTREAM_TIMEOUT,
            query_retries: UPSTREAM_ATTEMPTS as usize - 1,
            sockets: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid resolver loop configuration")]
    Config(#[source] ttl::Error),
    #[error(
        "the resolver loop has no upstream DNS server; give one or a resolv.conf that names one"
    )]
    NoUpstream,
    #[error("building the resolver for the upstream DNS servers {servers:?}")]
    Build {
        servers: Vec<SocketAddr>,
        #[source]
        source: NetError,
    },
    #[error("the allowed name {name} is not a valid DNS name")]
    Name {
        name: String,
        #[source]
        source: hickory_resolver::proto::ProtoError,
    },
    #[error("a resolver loop task failed")]
    Task(#[source] tokio::task::JoinError),
}

/// The state of one (name, type) lookup, for status and health.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupStatus {
    pub name: String,
    pub record_type: RecordType,
    /// The addresses of the last answer (during an outage: the last-known
    /// ones, still being kept).
    pub addresses: Vec<IpAddr>,
    /// When the elements written last expire, unless refreshed before.
    pub expires: Option<Instant>,
    pub last_success: Option<Instant>,
    /// Consecutive failed lookups (0 after a success).
    pub failures: u32,
    /// The addresses are last-known ones kept through an upstream outage.
    pub stale: bool,
    pub last_error: Option<String>,
    pub next_lookup: Option<Instant>,
}

/// What one lookup found.
enum Resolution {
    Addresses {
        addresses: Vec<AnswerAddress>,
        stored: Instant,
    },
    /// NODATA or NXDOMAIN, with the negative TTL if the answer had an SOA.
    NoAddresses { negative_ttl: Option<Duration> },
}

/// One name and type the loop keeps resolved.
/// The name, its FQDN and its bindings are shared by the name's A and AAAA
/// lookups (one copy per name, not per lookup).
struct Tracked {
    name: Arc<str>,
    fqdn: Arc<Name>,
    record_type: RecordType,
}

/// Where the addresses of a name go: one route per sink, with the bindings
/// of that sink's policy that allow the name (its exact one and wildcards
/// above it). Asked on every answer, so routes may change while the loop runs.
pub trait NameRoutes: Send + Sync {
    fn routes(&self, name: &str) -> Vec<Route>;
}

/// One sink, the bindings a name has in its policy, and where the sink's
/// owner remembers which name each address it was given came from (for its
/// denied-connection log): the loop records the name there once the sink has
/// the addresses.
pub struct Route {
    pub sink: Arc<dyn AddressSink>,
    pub bindings: Vec<NameBinding>,
    pub origins: Arc<AddressOrigins>,
}

/// One sink with fixed names (the sidecar).
struct SingleSink {
    sink: Arc<dyn AddressSink>,
    names: AllowedNames,
    origins: Arc<AddressOrigins>,
}

impl NameRoutes for SingleSink {
    fn routes(&self, name: &str) -> Vec<Route> {
        vec![Route {
            sink: self.sink.clone(),
            bindings: self.names.matching(name).into_iter().cloned().collect(),
            origins: self.origins.clone(),
        }]
    }
}

/// Counters of a loop, for status and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResolverStats {
    /// Lookups sent upstream (each may be several queries: retries, TCP).
    pub upstream_lookups: u64,
    /// Upstream lookups that failed (timeout, SERVFAIL, network).
    pub upstream_failures: u64,
    /// Answers served from the shared cache instead.
    pub cache_hits: u64,
    /// Writes of a name's elements into a sink that failed.
    pub sink_failures: u64,
}

/// Shared by the lookup tasks.
struct Shared {
    config: ResolverLoopConfig,
    resolver: Resolver<SocketsRuntime>,
    routes: Arc<dyn NameRoutes>,
    cache: Arc<AnswerCache>,
    permits: Semaphore,
    status: Mutex<BTreeMap<(String, u16), LookupStatus>>,
    upstream_lookups: AtomicU64,
    upstream_failures: AtomicU64,
    cache_hits: AtomicU64,
    sink_failures: AtomicU64,
}

impl Shared {
    fn status(&self) -> MutexGuard<'_, BTreeMap<(String, u16), LookupStatus>> {
        // Each update replaces one entry whole; poisoning is ignored.
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A resolver loop ready to run.
pub struct ResolverLoop {
    shared: Arc<Shared>,
    names: Vec<String>,
}

/// A running resolver loop.
pub struct ResolverHandle {
    /// One stop signal per tracked name (both its lookups).
    tracked: HashMap<String, watch::Sender<bool>>,
    tasks: JoinSet<()>,
    shared: Arc<Shared>,
}

impl ResolverLoop {
    /// A loop over the exact names of `names`, asking `config.upstream`,
    /// writing into `sink`.
    pub fn new(
        config: ResolverLoopConfig,
        names: &AllowedNames,
        sink: Arc<dyn AddressSink>,
        cache: Arc<AnswerCache>,
        origins: Arc<AddressOrigins>,
    ) -> Result<Self, Error> {
        let exact: Vec<String> = names.exact_names().into_iter().map(String::from).collect();
        let routes = Arc::new(SingleSink {
            sink,
            names: names.clone(),
            origins,
        });
        let mut resolver_loop = ResolverLoop::routed(config, routes, cache)?;
        for name in &exact {
            fqdn(name)?;
        }
        resolver_loop.names = exact;
        Ok(resolver_loop)
    }

    /// A loop that tracks no name yet and writes each answer through
    /// `routes` (the host agent: names come and go with its sandboxes, see
    /// [`ResolverHandle::track`]).
    pub fn routed(
        config: ResolverLoopConfig,
        routes: Arc<dyn NameRoutes>,
        cache: Arc<AnswerCache>,
    ) -> Result<Self, Error> {
        config.ttl.validate().map_err(Error::Config)?;
        if config.upstream.is_empty() {
            return Err(Error::NoUpstream);
        }
        let resolver = build_resolver(&config)?;
        let permits = Semaphore::new(config.concurrency.max(1));
        let status = Mutex::new(BTreeMap::new());
        let shared = Arc::new(Shared {
            config,
            resolver,
            routes,
            cache,
            permits,
            status,
            upstream_lookups: AtomicU64::new(0),
            upstream_failures: AtomicU64::new(0),
            cache_hits: AtomicU64::new(0),
            sink_failures: AtomicU64::new(0),
        });
        Ok(ResolverLoop {
            shared,
            names: Vec::new(),
        })
    }

    /// Starts one task per (name, type). Must be called inside a tokio runtime.
    pub fn spawn(self) -> ResolverHandle {
        let mut handle = ResolverHandle {
            tracked: HashMap::new(),
            tasks: JoinSet::new(),
            shared: self.shared,
        };
        for name in self.names {
            // Checked in `new`.
            let _ = handle.track(&name);
        }
        handle
    }
}

fn fqdn(name: &str) -> Result<Name, Error> {
    Name::from_ascii(format!("{name}.")).map_err(|source| Error::Name {
        name: name.to_string(),
        source,
    })
}

impl ResolverHandle {
    /// The state of every lookup, sorted by name then type.
    pub fn snapshot(&self) -> Vec<LookupStatus> {
        self.shared.status().values().cloned().collect()
    }

    /// Starts keeping `name` (A and AAAA) resolved; its first lookup runs
    /// at once. Returns false if it was already tracked. Must be called
    /// inside a tokio runtime.
    pub fn track(&mut self, name: &str) -> Result<bool, Error> {
        if self.tracked.contains_key(name) {
            return Ok(false);
        }
        let fqdn = Arc::new(fqdn(name)?);
        let shared_name: Arc<str> = name.into();
        // Reap the tasks of untracked names that have ended.
        while let Some(joined) = self.tasks.try_join_next() {
            joined.map_err(Error::Task)?;
        }
        let (stop, stopped) = watch::channel(false);
        for record_type in [RecordType::A, RecordType::AAAA] {
            let tracked = Tracked {
                name: shared_name.clone(),
                fqdn: fqdn.clone(),
                record_type,
            };
            self.tasks
                .spawn(run_lookup(self.shared.clone(), tracked, stopped.clone()));
        }
        self.tracked.insert(name.to_string(), stop);
        Ok(true)
    }

    /// Stops keeping `name` resolved. What it wrote stays until its timeouts.
    pub fn untrack(&mut self, name: &str) -> bool {
        let Some(stop) = self.tracked.remove(name) else {
            return false;
        };
        let _ = stop.send(true);
        self.shared
            .status()
            .retain(|(tracked, _), _| tracked != name);
        true
    }

    /// The names tracked now, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tracked.keys().cloned().collect();
        names.sort_unstable();
        names
    }

    pub fn stats(&self) -> ResolverStats {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ResolverStats {
            upstream_lookups: get(&self.shared.upstream_lookups),
            upstream_failures: get(&self.shared.upstream_failures),
            cache_hits: get(&self.shared.cache_hits),
            sink_failures: get(&self.shared.sink_failures),
        }
    }

    /// Stops every lookup and waits for the tasks to end. Elements already
    /// written stay in the sets until their timeouts (fail closed, and a
    /// restart finds them in place).
    pub async fn stop(mut self) -> Result<(), Error> {
        for stop in self.tracked.values() {
            let _ = stop.send(true);
        }
        while let Some(joined) = self.tasks.join_next().await {
            joined.map_err(Error::Task)?;
        }
        Ok(())
    }
}

fn build_resolver(config: &ResolverLoopConfig) -> Result<Resolver<SocketsRuntime>, Error> {
    let servers = config
        .upstream
        .iter()
        .map(|server| {
            let mut udp = ConnectionConfig::udp();
            udp.port = server.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = server.port();
            NameServerConfig::new(server.ip(), true, vec![udp, tcp])
        })
        .collect();
    let mut options = ResolverOpts::default();
    // The shared AnswerCache is the one cache; a second one inside the
    // resolver would answer refreshes from itself and never reach upstream.
    options.cache_size = 0;
    options.use_hosts_file = ResolveHosts::Never;
    options.timeout = config.query_timeout;
    // hickory's `attempts` counts retries after the first query.
    options.attempts = config.query_retries;
    options.preserve_intermediates = true;
    options.edns0 = true;
    Resolver::builder_with_config(
        ResolverConfig::from_name_servers(servers),
        SocketsRuntime::new(config.sockets.clone()),
    )
    .with_options(options)
    .build()
    .map_err(|source| Error::Build {
        servers: config.upstream.clone(),
        source,
    })
}

/// What a lookup task remembers between rounds.
#[derive(Default)]
struct Memory {
    /// The last answer's addresses.
    addresses: Vec<AnswerAddress>,
    /// When the last answer's clamped TTL ran out (the stale limit counts from there).
    answer_expires: Option<Instant>,
    /// When the elements written last expire.
    elements_expire: Option<Instant>,
    /// `stored` of the last answer used, so that a refresh only takes a
    /// cached answer newer than it.
    used_stored: Option<Instant>,
    last_success: Option<Instant>,
    failures: u32,
    stale: bool,
    last_error: Option<String>,
}

/// The futures of a lookup and of writing its answer (hickory's lookup
/// above all) are boxed while they run: a task is sized for the largest
/// state of its future, and there is one task per name and type, idle
/// nearly all the time. Inline, those states made every idle task several
/// kilobytes.
async fn run_lookup(shared: Arc<Shared>, tracked: Tracked, mut stopped: watch::Receiver<bool>) {
    let mut memory = Memory::default();
    let mut next: Option<Instant> = None;
    loop {
        if let Some(at) = next {
            tokio::select! {
                _ = stopped.changed() => return,
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(at)) => {}
            }
        }
        let resolution = tokio::select! {
            _ = stopped.changed() => return,
            resolution = async {
                // The semaphore is never closed, so acquiring cannot fail.
                let _permit = shared.permits.acquire().await;
                Box::pin(lookup(&shared, &tracked, memory.used_stored)).await
            } => resolution,
        };
        let delay = match resolution {
            Ok(Resolution::Addresses { addresses, stored }) if !addresses.is_empty() => {
                match Box::pin(program(&shared, &tracked, &addresses)).await {
                    Ok(expires) => {
                        let now = Instant::now();
                        let ttl = Duration::from_secs(u64::from(
                            addresses.iter().map(|a| a.ttl).min().unwrap_or(0),
                        ));
                        memory.addresses = addresses;
                        memory.answer_expires = Some(now + shared.config.ttl.clamp(ttl));
                        memory.elements_expire = Some(expires);
                        memory.used_stored = Some(stored);
                        memory.last_success = Some(now);
                        memory.failures = 0;
                        memory.stale = false;
                        memory.last_error = None;
                        shared.config.ttl.refresh_after(ttl, jitter())
                    }
                    Err(error) => Box::pin(failed(&shared, &tracked, &mut memory, error)).await,
                }
            }
            Ok(Resolution::Addresses { stored, .. }) => {
                // An answer without usable addresses (e.g. only a CNAME to a
                // name with none): like NODATA with the default negative TTL.
                memory.used_stored = Some(stored);
                no_addresses(&shared, &mut memory, None)
            }
            Ok(Resolution::NoAddresses { negative_ttl }) => {
                no_addresses(&shared, &mut memory, negative_ttl)
            }
            Err(error) => Box::pin(failed(&shared, &tracked, &mut memory, error)).await,
        };
        let at = Instant::now() + delay;
        next = Some(at);
        publish(&shared, &tracked, &memory, at);
    }
}

/// The name has no address of this type now. Whatever it had is left to
/// expire; this is an answer, not an outage.
fn no_addresses(shared: &Shared, memory: &mut Memory, negative_ttl: Option<Duration>) -> Duration {
    memory.addresses.clear();
    memory.answer_expires = None;
    memory.last_success = Some(Instant::now());
    memory.failures = 0;
    memory.stale = false;
    memory.last_error = None;
    shared.config.ttl.negative_recheck(negative_ttl, jitter())
}

/// A failed round (upstream or sink): back off, and keep the last-known
/// addresses in the sets until after the next retry, within the stale limit.
/// Returns the delay until the retry.
async fn failed(
    shared: &Shared,
    tracked: &Tracked,
    memory: &mut Memory,
    error: String,
) -> Duration {
    memory.failures = memory.failures.saturating_add(1);
    let policy = &shared.config.ttl;
    let delay = policy.backoff(memory.failures, jitter());
    if memory.failures == 1 || memory.failures.is_power_of_two() {
        tracing::warn!(
            name = %tracked.name,
            record_type = %tracked.record_type,
            failures = memory.failures,
            retry_in = ?delay,
            known_addresses = memory.addresses.len(),
            %error,
            "lookup failed; last-known addresses are kept up to the stale limit"
        );
    }
    memory.last_error = Some(error);
    let now = Instant::now();
    let (Some(answer_expires), false) = (memory.answer_expires, memory.addresses.is_empty()) else {
        return delay;
    };
    let deadline = policy.stale_deadline(answer_expires);
    let Some(timeout) = policy.stale_timeout(delay, now, deadline) else {
        // Past the stale limit: the addresses are no longer kept and expire.
        memory.addresses.clear();
        memory.stale = false;
        return delay;
    };
    // Never shorten what is in the sets: only extend.
    if memory
        .elements_expire
        .is_some_and(|expires| expires >= now + timeout)
    {
        memory.stale = memory.answer_expires.is_some_and(|at| at <= now);
        return delay;
    }
    let addresses = memory.addresses.clone();
    match write_routes(shared, tracked, &addresses, Some(timeout)).await {
        Ok(_) => {
            memory.elements_expire = Some(now + timeout);
            memory.stale = true;
        }
        Err(error) => {
            tracing::error!(name = %tracked.name, %error, "could not keep the last-known addresses in the sets");
        }
    }
    delay
}

/// Writes the elements `addresses` yield into the sets of every route,
/// each with `timeout` if given, else the TTL policy's timeout for its TTL.
/// Returns the shortest timeout written. Fails only if every route that had
/// elements to write failed: one sandbox whose namespace is gone must not
/// put the name into backoff for the others (its failure is logged).
async fn write_routes(
    shared: &Shared,
    tracked: &Tracked,
    addresses: &[AnswerAddress],
    timeout: Option<Duration>,
) -> Result<Duration, String> {
    let mut shortest: Option<Duration> = None;
    let (mut written, mut failures) = (0usize, Vec::new());
    for route in shared.routes.routes(&tracked.name) {
        let bindings: Vec<&NameBinding> = route.bindings.iter().collect();
        let mut batch = learned_for(&bindings, addresses, &shared.config.ttl);
        if let Some(timeout) = timeout {
            batch = batch
                .into_iter()
                .map(|learned| Learned { timeout, ..learned })
                .collect();
        }
        if batch.is_empty() {
            continue;
        }
        match route.sink.learn(&batch).await {
            Ok(()) => {
                route
                    .origins
                    .record(&tracked.name, addresses.iter().map(|a| a.addr));
                written += 1;
                let least = batch.iter().map(|l| l.timeout).min().unwrap_or_default();
                shortest = Some(shortest.map_or(least, |s| s.min(least)));
            }
            Err(error) => {
                shared.sink_failures.fetch_add(1, Ordering::Relaxed);
                failures.push(error_chain(&error));
            }
        }
    }
    match (written, failures.first()) {
        (0, Some(first)) => Err(first.clone()),
        (_, first) => {
            if let Some(error) = first {
                tracing::warn!(name = %tracked.name, failed = failures.len(), written, %error, "some sandboxes' sets did not take the name's addresses");
            }
            Ok(shortest.unwrap_or_default())
        }
    }
}

/// Writes the addresses into the sets; returns when the elements expire.
async fn program(
    shared: &Shared,
    tracked: &Tracked,
    addresses: &[AnswerAddress],
) -> Result<Instant, String> {
    let shortest = write_routes(shared, tracked, addresses, None).await?;
    Ok(Instant::now() + shortest)
}

/// One lookup: from the shared cache if someone fetched a newer answer than
/// the one used last time and it is not due for refresh, else upstream (the
/// answer then goes into the cache for the proxies).
async fn lookup(
    shared: &Shared,
    tracked: &Tracked,
    used_stored: Option<Instant>,
) -> Result<Resolution, String> {
    let key = CacheKey {
        name: tracked.name.to_string(),
        record_type: tracked.record_type,
        dnssec_ok: false,
    };
    let now = Instant::now();
    if let Some(hit) = shared.cache.get(&key, now) {
        let newer = used_stored.is_none_or(|used| hit.stored > used);
        let ttl = Duration::from_secs(u64::from(hit.ttl));
        if newer && !shared.config.ttl.due_for_refresh(hit.remaining(now), ttl) {
            shared.cache_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(Resolution::Addresses {
                addresses: hit.addresses_at(now),
                stored: hit.stored,
            });
        }
    }
    shared.upstream_lookups.fetch_add(1, Ordering::Relaxed);
    let looked_up = shared
        .resolver
        .lookup(Name::clone(&tracked.fqdn), tracked.record_type)
        .await;
    if looked_up
        .as_ref()
        .is_err_and(|error| !error.is_no_records_found())
    {
        shared.upstream_failures.fetch_add(1, Ordering::Relaxed);
    }
    match looked_up {
        Ok(lookup) => {
            let stored = Instant::now();
            let message = lookup.message().clone();
            let extracted = extract_addresses(
                &message,
                &tracked.fqdn,
                shared.config.max_addresses_per_name,
            );
            if extracted.over_cap > 0 {
                tracing::debug!(name = %tracked.name, dropped = extracted.over_cap, "answer has more addresses than the per-name cap");
            }
            if let Some(ttl) = answer_ttl(&message) {
                shared.cache.insert(
                    key,
                    CachedAnswer::new(message, extracted.addresses.clone(), ttl, stored),
                );
            }
            Ok(Resolution::Addresses {
                addresses: extracted.addresses,
                stored,
            })
        }
        Err(error) if error.is_no_records_found() => {
            let negative_ttl = match &error {
                NetError::Dns(hickory_resolver::net::DnsError::NoRecordsFound(no_records)) => {
                    no_records
                        .negative_ttl
                        .map(|ttl| Duration::from_secs(u64::from(ttl)))
                }
                _ => None,
            };
            Ok(Resolution::NoAddresses { negative_ttl })
        }
        Err(error) => Err(error_chain(&error)),
    }
}

fn publish(shared: &Shared, tracked: &Tracked, memory: &Memory, next: Instant) {
    let status = LookupStatus {
        name: tracked.name.to_string(),
        record_type: tracked.record_type,
        addresses: memory.addresses.iter().map(|a| a.addr).collect(),
        expires: memory.elements_expire,
        last_success: memory.last_success,
        failures: memory.failures,
        stale: memory.stale,
        last_error: memory.last_error.clone(),
        next_lookup: Some(next),
    };
    shared.status().insert(
        (tracked.name.to_string(), u16::from(tracked.record_type)),
        status,
    );
}
