//! One enforced sandbox at run time: its network namespace, its kernel
//! session, and the ruleset in force. It is the DNS layer's
//! [`AddressSink`]: learned addresses become set element updates.
//!
//! The netlink session lives on a thread of its own that owns it; callers
//! send it work over a channel and await the answer, so no long netlink
//! exchange (an apply, a read of the table) ever blocks a tokio worker.
//! Element updates waiting when the thread gets to them are committed
//! together in one transaction; if that transaction fails, each update is
//! retried alone, so one bad update never fails the others.
//!
//! Learned elements (the DNS layer's writes, on every cache miss) take a
//! shorter way: the task that learned them writes them itself, on a second
//! netlink socket opened in the namespace ([`LearnWrites`]). One element
//! transaction is one `sendmsg` in which the kernel commits, so it costs
//! less than the two thread wake-ups of the way through the kernel thread.
//! Concurrent writes are combined the same way.
//!
//! Re-adding an element that is present refreshes its timeout and expiry
//! (the kernel resets both when they are sent; checked on Linux 6.18 by the
//! `kernel` and `sidecar` integration tests), which is how a repeated answer
//! keeps an address allowed.
//!
//! A repeated answer (above all one served from the proxy's cache) usually
//! asks for an element this sandbox wrote a moment ago with a timeout that
//! already reaches as far: the sandbox remembers when each element it wrote
//! expires at the earliest, and does not write it again while that covers
//! the new timeout ([`WrittenElements`]). Everything that may remove
//! elements (an enforce, a forget, a delete update, any session job) drops
//! that memory first, so a skipped write never stands for an element that
//! is gone.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, mpsc};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::dns::learn::{self, AddressSink, Learned, SinkFuture};
use crate::dns::upstream::UpstreamSockets;
use crate::kernel::{
    self, ApplyReport, ElementWriter, HeldElement, Session, SetChange, SetUpdate, TableStatus,
};
use crate::netns::{self, SocketFactory, SocketKind};
use crate::ruleset::{Element, Ruleset};

/// The most element updates committed in one transaction.
const MAX_COALESCED_UPDATES: usize = 256;

/// How much earlier than a new timeout asks an element written before may
/// expire and still count as covering it. TTLs are whole seconds (RFC 1035
/// §3.2.1) and a cached answer's remaining TTL is truncated to them, so the
/// timeout of an answer served from the cache, counted from now, can end up
/// to a second after the element's known expiry although both come from the
/// same upstream TTL. A second is far within the grace period every timeout
/// carries (`dns::ttl::GRACE`).
const COVER_SLACK: Duration = Duration::from_secs(1);

/// The elements this sandbox wrote and the earliest moment each can expire
/// in the kernel: the instant before the transaction was sent plus its
/// timeout (the kernel counts the timeout from the commit, which is later).
/// Only what this process wrote is here, and only until something that may
/// remove elements runs (then it is cleared, before the work is queued and
/// again when it is done), so an element found here with time left is in
/// its set. A write records its elements only if no clear happened since it
/// looked (the epoch): a write that raced with a removal is not remembered.
#[derive(Debug, Default)]
struct WrittenElements {
    expiry: HashMap<(String, Element), Instant>,
    epoch: u64,
    /// The size after the last sweep of expired entries; the next sweep
    /// runs when the map has doubled, so sweeping costs O(1) per insert.
    swept_at: usize,
}

impl WrittenElements {
    /// Whether `learned`, written now, would expire no later than (within
    /// [`COVER_SLACK`]) the element already written.
    fn covers(&self, learned: &Learned, now: Instant) -> bool {
        self.expiry
            .get(&(learned.set.clone(), learned.element))
            .is_some_and(|expiry| *expiry + COVER_SLACK >= now + learned.timeout)
    }

    fn record(&mut self, written: &[Learned], sent_at: Instant, epoch: u64) {
        if epoch != self.epoch {
            return;
        }
        for learned in written {
            let expiry = sent_at + learned.timeout;
            let slot = self
                .expiry
                .entry((learned.set.clone(), learned.element))
                .or_insert(expiry);
            *slot = (*slot).max(expiry);
        }
        if self.expiry.len() >= 2 * self.swept_at.max(1_024) {
            let now = Instant::now();
            self.expiry.retain(|_, expiry| *expiry > now);
            self.swept_at = self.expiry.len();
        }
    }

    fn clear(&mut self) {
        self.epoch += 1;
        self.expiry.clear();
        self.swept_at = 0;
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start the kernel thread for the {target}")]
    Thread {
        target: netns::Target,
        #[source]
        source: io::Error,
    },
    #[error("cannot open a netfilter session in the {target}")]
    Open {
        target: netns::Target,
        #[source]
        source: kernel::Error,
    },
    #[error("the kernel thread of the {target} has stopped")]
    Stopped { target: netns::Target },
    #[error("the kernel refused or failed the change in the {target}")]
    Kernel {
        target: netns::Target,
        #[source]
        source: kernel::Error,
    },
}

/// The stack of a sandbox's kernel thread. Its buffers (batches, netlink
/// receive buffers) are on the heap and it does not recurse; the default
/// 2 MiB would be reserved once per sandbox the agent serves.
const KERNEL_THREAD_STACK: usize = 256 * 1024;

/// Work for the kernel thread.
enum Command {
    Update {
        updates: Vec<SetUpdate>,
        done: oneshot::Sender<Result<(), kernel::Error>>,
    },
    Run(Box<dyn FnOnce(&mut Session) + Send>),
}

/// The learned-element writes of a sandbox: made by the task that learned
/// them, on a netlink socket of their own opened in the sandbox's namespace,
/// without a hop to the kernel thread and back (two thread wake-ups, which
/// were most of a cache miss's latency on a busy machine). The kernel
/// commits a transaction inside `sendmsg` and has queued its
/// acknowledgements when that returns, so a write holds the socket for one
/// system call and a few non-waiting reads.
///
/// Writes that arrive while one is in progress are combined: each request
/// is queued, then the socket's lock is taken; whoever holds it commits
/// every queued request in one transaction (each alone if that fails, so
/// one bad request never fails the others) and leaves each its result. A
/// burst of answers thus still costs few transactions.
struct LearnWrites {
    queue: Mutex<Vec<(Vec<SetUpdate>, Arc<WriteResult>)>>,
    writer: Mutex<ElementWriter>,
}

/// The result of one queued write, set by whoever committed it, under the
/// writer's lock.
#[derive(Default)]
struct WriteResult(Mutex<Option<Result<(), kernel::Error>>>);

impl WriteResult {
    fn set(&self, result: Result<(), kernel::Error>) {
        *lock(&self.0) = Some(result);
    }

    fn take(&self) -> Option<Result<(), kernel::Error>> {
        lock(&self.0).take()
    }
}

/// Locks `mutex`, ignoring poisoning: every critical section on these
/// mutexes is a single push, take or netlink transaction, which leaves the
/// data consistent (a transaction is all or nothing in the kernel).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LearnWrites {
    fn new(writer: ElementWriter) -> Self {
        LearnWrites {
            queue: Mutex::new(Vec::new()),
            writer: Mutex::new(writer),
        }
    }

    /// Writes `updates` (one transaction, possibly shared with other
    /// requests) and returns when they are committed or refused. Returns
    /// the number of transactions this call committed.
    fn write(&self, updates: Vec<SetUpdate>) -> (Result<(), kernel::Error>, u64) {
        let mine = Arc::new(WriteResult::default());
        lock(&self.queue).push((updates, mine.clone()));
        let mut writer = lock(&self.writer);
        // Committed by the previous holder of the writer while this one waited.
        if let Some(result) = mine.take() {
            return (result, 0);
        }
        // Not answered yet, so still queued: only holders of the writer take
        // requests from the queue, and they answer them before letting go.
        let queued = std::mem::take(&mut *lock(&self.queue));
        let committed = commit_queued(&mut writer, queued);
        let result = mine.take().unwrap_or_else(|| {
            // Unreachable: this request was queued before the lock was taken,
            // and only holders of the lock take from the queue and answer.
            Err(kernel::Error::Malformed(
                "a learned-element write was lost from its queue".into(),
            ))
        });
        (result, committed)
    }
}

/// Commits queued writes in one transaction (at most
/// [`MAX_COALESCED_UPDATES`] requests each), or each alone if a combined one
/// fails, and answers every request. Returns the transactions committed.
fn commit_queued(
    writer: &mut ElementWriter,
    mut queued: Vec<(Vec<SetUpdate>, Arc<WriteResult>)>,
) -> u64 {
    let mut committed = 0;
    while !queued.is_empty() {
        let rest = queued.split_off(queued.len().min(MAX_COALESCED_UPDATES));
        let batch = std::mem::replace(&mut queued, rest);
        committed += commit_combined(
            batch,
            |updates| writer.update(updates),
            |result, outcome| result.set(outcome),
        );
    }
    committed
}

/// Commits the requests of `batch` with `write` in one transaction, or each
/// alone if that fails (so one bad request never fails the others), and
/// hands each request its outcome with `answer`. Returns the transactions
/// committed. Shared by the kernel thread and the learned-element writes.
fn commit_combined<A>(
    batch: Vec<(Vec<SetUpdate>, A)>,
    mut write: impl FnMut(&[SetUpdate]) -> Result<(), kernel::Error>,
    mut answer: impl FnMut(A, Result<(), kernel::Error>),
) -> u64 {
    if batch.len() > 1 {
        let all: Vec<SetUpdate> = batch.iter().flat_map(|(u, _)| u.iter().cloned()).collect();
        if write(&all).is_ok() {
            for (_, request) in batch {
                answer(request, Ok(()));
            }
            return 1;
        }
    }
    let mut committed = 0;
    for (updates, request) in batch {
        let outcome = write(&updates);
        committed += u64::from(outcome.is_ok());
        answer(request, outcome);
    }
    committed
}

/// What [`Sandbox::enforce`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enforcement {
    /// The table in force was already exactly the ruleset (a restart with the
    /// same policy): nothing was changed, its learned elements stay.
    AlreadyInForce { learned: usize },
    /// The table was replaced in one transaction that also carried the
    /// learned elements the new policy still allows; the rest were forgotten.
    Applied {
        report: ApplyReport,
        carried: usize,
        forgotten: usize,
    },
}

/// Counters for status and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SinkStats {
    /// Element update transactions committed.
    pub transactions: u64,
    /// Elements added or refreshed.
    pub elements_added: u64,
    /// Update batches that failed (their DNS answers got SERVFAIL).
    pub failures: u64,
}

/// One enforced sandbox. Share it as `Arc<Sandbox>`; dropping the last one
/// ends its kernel thread (the rules stay in force).
pub struct Sandbox {
    target: netns::Target,
    commands: mpsc::Sender<Command>,
    ruleset: RwLock<Option<Arc<Ruleset>>>,
    transactions: Arc<AtomicU64>,
    elements_added: AtomicU64,
    failures: AtomicU64,
    written: Mutex<WrittenElements>,
    learning: LearnWrites,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Opens a netfilter session in `target` on a kernel thread of its own.
    /// Changes nothing in the namespace.
    pub fn open(target: netns::Target) -> Result<Sandbox, Error> {
        let open_error = |source| Error::Open {
            target: target.clone(),
            source,
        };
        // Both sockets in one visit to the namespace (each visit is a thread).
        let (session, writer) = netns::run_in(&target, || {
            Ok::<_, kernel::Error>((Session::open_here()?, ElementWriter::open_here()?))
        })
        .map_err(|source| open_error(source.into()))?
        .map_err(open_error)?;
        Sandbox::with_sockets(target, session, writer)
    }

    /// A sandbox for `target` from a session and an element writer already
    /// opened in its namespace (e.g. by [`crate::enforcer::open_sandbox_sockets`],
    /// which opens everything a sandbox needs there in one visit). Starts
    /// the kernel thread, which owns `session`. Changes nothing in the namespace.
    pub fn with_sockets(
        target: netns::Target,
        session: Session,
        writer: ElementWriter,
    ) -> Result<Sandbox, Error> {
        let (commands, incoming) = mpsc::channel::<Command>();
        let transactions = Arc::new(AtomicU64::new(0));
        let counter = transactions.clone();
        std::thread::Builder::new()
            .name("netleash-kernel".into())
            .stack_size(KERNEL_THREAD_STACK)
            .spawn(move || serve(session, &incoming, &counter))
            .map_err(|source| Error::Thread {
                target: target.clone(),
                source,
            })?;
        Ok(Sandbox {
            target,
            commands,
            ruleset: RwLock::new(None),
            transactions,
            elements_added: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            written: Mutex::new(WrittenElements::default()),
            learning: LearnWrites::new(writer),
        })
    }

    /// A new sandbox in `target` whose `ruleset` is enforced (as
    /// [`Sandbox::enforce`] does) on the calling thread, with `session` and
    /// `writer` opened in its namespace: a container start waits for this,
    /// and the apply needs no hop to the kernel thread and back, which
    /// starts with the session afterwards. Blocks; from async code call it
    /// inside `tokio::task::block_in_place`.
    ///
    /// `seed` (addresses the shared cache already holds for the policy's
    /// names) goes into the same transaction as the table, so they are
    /// allowed from the moment the rules are in force without a second
    /// transaction (and the read of the sets it needs), and is remembered as
    /// written, so learning it again writes nothing while its timeouts cover
    /// it. If the table in force already was `ruleset` nothing is applied,
    /// the seed included: learn it afterwards.
    pub fn enforce_new(
        target: netns::Target,
        mut session: Session,
        writer: ElementWriter,
        ruleset: Ruleset,
        still_allowed: impl Fn(IpAddr) -> Vec<(String, Element)>,
        seed: &[Learned],
    ) -> Result<(Sandbox, Enforcement), Error> {
        let seeded: Vec<HeldElement> = seed
            .iter()
            .map(|learned| HeldElement {
                set: learned.set.clone(),
                element: learned.element,
                expires_in: Some(learned.timeout),
            })
            .collect();
        // Before the transaction is sent: the kernel counts each timeout
        // from the commit, which is later, so the expiry recorded is early.
        let sent_at = Instant::now();
        let enforced = match enforce_in(&mut session, &ruleset, still_allowed, &seeded) {
            Ok(enforced) => enforced,
            Err(source) => {
                session.close_in_background();
                return Err(Error::Kernel { target, source });
            }
        };
        let sandbox = Sandbox::with_sockets(target, session, writer)?;
        if let Enforcement::Applied { .. } = enforced {
            let mut written = sandbox.written();
            let epoch = written.epoch;
            written.record(seed, sent_at, epoch);
            sandbox
                .elements_added
                .fetch_add(seed.len() as u64, Ordering::Relaxed);
        }
        *sandbox
            .ruleset
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(Arc::new(ruleset));
        Ok((sandbox, enforced))
    }

    fn written(&self) -> std::sync::MutexGuard<'_, WrittenElements> {
        // Every update of the map is a single insert, retain or clear, so
        // it stays consistent if a holder panicked.
        self.written
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn target(&self) -> &netns::Target {
        &self.target
    }

    /// The ruleset this sandbox last enforced, if any.
    pub fn ruleset(&self) -> Option<Arc<Ruleset>> {
        self.ruleset
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn stats(&self) -> SinkStats {
        SinkStats {
            transactions: self.transactions.load(Ordering::Relaxed),
            elements_added: self.elements_added.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
        }
    }

    /// Runs `job` with the session on the kernel thread, after the work
    /// queued before it. The job may change elements, so the memory of
    /// written elements is dropped.
    pub async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Session) -> T + Send + 'static,
    ) -> Result<T, Error> {
        self.written().clear();
        let result = self.run_job(job).await;
        self.written().clear();
        result
    }

    async fn run_job<T: Send + 'static>(
        &self,
        job: impl FnOnce(&mut Session) -> T + Send + 'static,
    ) -> Result<T, Error> {
        let (done, result) = oneshot::channel();
        let job = Box::new(move |session: &mut Session| {
            let _ = done.send(job(session));
        });
        self.commands
            .send(Command::Run(job))
            .map_err(|_| self.stopped())?;
        result.await.map_err(|_| self.stopped())
    }

    /// The table as the kernel holds it now.
    pub async fn status(&self) -> Result<Option<TableStatus>, Error> {
        let target = self.target.clone();
        self.run_job(|session| session.status())
            .await?
            .map_err(|source| Error::Kernel { target, source })
    }

    /// Makes `ruleset` the table in force.
    ///
    /// If the table in force already is `ruleset` (a restart with the same
    /// policy), nothing changes. Otherwise the learned elements are read,
    /// `still_allowed` says for each learned address which elements the new
    /// policy gives it (none: forget it), and the new table is applied in
    /// one transaction together with those elements, each with the time it
    /// had left. The forgotten ones are then deleted, which matters when the
    /// kernel keeps the DNS sets across a re-apply; deleting an absent
    /// element is not an error. On any error the table in force before stays.
    pub async fn enforce(
        &self,
        ruleset: Ruleset,
        still_allowed: impl Fn(IpAddr) -> Vec<(String, Element)> + Send + 'static,
    ) -> Result<Enforcement, Error> {
        let ruleset = Arc::new(ruleset);
        let model = ruleset.clone();
        let target = self.target.clone();
        let enforced = self
            .run(move |session| enforce_in(session, &model, still_allowed, &[]))
            .await?
            .map_err(|source| Error::Kernel { target, source })?;
        *self
            .ruleset
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(ruleset);
        Ok(enforced)
    }

    /// Applies element updates in one transaction, on the kernel thread.
    pub async fn update(&self, updates: Vec<SetUpdate>) -> Result<(), Error> {
        let removes = updates
            .iter()
            .any(|u| matches!(u.change, SetChange::Delete { .. }));
        if removes {
            self.written().clear();
        }
        let (done, result) = oneshot::channel();
        self.commands
            .send(Command::Update { updates, done })
            .map_err(|_| self.stopped())?;
        let target = self.target.clone();
        let result = result.await.map_err(|_| self.stopped())?;
        if removes {
            self.written().clear();
        }
        result.map_err(|source| Error::Kernel { target, source })
    }

    fn stopped(&self) -> Error {
        Error::Stopped {
            target: self.target.clone(),
        }
    }
}

/// The kernel thread: runs commands in order until every sender is gone.
fn serve(mut session: Session, incoming: &mpsc::Receiver<Command>, transactions: &AtomicU64) {
    let mut pending: Option<Command> = None;
    loop {
        let command = match pending.take() {
            Some(command) => command,
            None => match incoming.recv() {
                Ok(command) => command,
                Err(_) => break,
            },
        };
        match command {
            Command::Run(job) => job(&mut session),
            Command::Update { updates, done } => {
                let mut batch = vec![(updates, done)];
                while batch.len() < MAX_COALESCED_UPDATES {
                    match incoming.try_recv() {
                        Ok(Command::Update { updates, done }) => batch.push((updates, done)),
                        Ok(other) => {
                            pending = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                commit(&mut session, batch, transactions);
            }
        }
    }
    session.close_in_background();
}

type Waiting = (Vec<SetUpdate>, oneshot::Sender<Result<(), kernel::Error>>);

/// Commits the waiting updates in one transaction, or each alone if that fails.
fn commit(session: &mut Session, batch: Vec<Waiting>, transactions: &AtomicU64) {
    let committed = commit_combined(
        batch,
        |updates| session.update_elements(updates),
        |done, outcome| {
            let _ = done.send(outcome);
        },
    );
    transactions.fetch_add(committed, Ordering::Relaxed);
}

fn enforce_in(
    session: &mut Session,
    ruleset: &Ruleset,
    still_allowed: impl Fn(IpAddr) -> Vec<(String, Element)>,
    seed: &[HeldElement],
) -> Result<Enforcement, kernel::Error> {
    let (held, in_force) = session.held_and_enforces(ruleset)?;
    if in_force {
        return Ok(Enforcement::AlreadyInForce {
            learned: held.len(),
        });
    }
    let (carried, forgotten) = carry(&held, still_allowed);
    let added = with_seed(&carried, seed);
    let report = session.apply_carrying(ruleset, &kernel::carry_updates(&added))?;
    // Only from sets the new table has (a policy that became unrestricted has none).
    let forget: Vec<SetUpdate> = deletions(&forgotten)
        .into_iter()
        .filter(|update| ruleset.set(&update.set).is_some())
        .collect();
    if !forget.is_empty() {
        session.update_elements(&forget)?;
    }
    Ok(Enforcement::Applied {
        report,
        carried: carried.len(),
        forgotten: forgotten.len(),
    })
}

/// Splits the held elements into what the new policy keeps (each address's
/// new elements, with the longest time any of its old elements had left)
/// and the held elements that are not kept.
fn carry(
    held: &[HeldElement],
    still_allowed: impl Fn(IpAddr) -> Vec<(String, Element)>,
) -> (Vec<HeldElement>, Vec<HeldElement>) {
    let mut left_by_address: BTreeMap<IpAddr, Duration> = BTreeMap::new();
    for element in held {
        if let Some(left) = element.expires_in {
            let slot = left_by_address
                .entry(element.element.net().addr())
                .or_default();
            *slot = (*slot).max(left);
        }
    }
    let mut carried = Vec::new();
    for (addr, left) in left_by_address {
        for (set, element) in still_allowed(addr) {
            carried.push(HeldElement {
                set,
                element,
                expires_in: Some(left),
            });
        }
    }
    let kept: BTreeSet<(&str, &Element)> = carried
        .iter()
        .map(|c| (c.set.as_str(), &c.element))
        .collect();
    let forgotten = held
        .iter()
        .filter(|h| !kept.contains(&(h.set.as_str(), &h.element)))
        .cloned()
        .collect();
    (carried, forgotten)
}

/// The carried elements and the seed as one list, each element once with
/// the longer of its times (one transaction must not add an element twice).
fn with_seed(carried: &[HeldElement], seed: &[HeldElement]) -> Vec<HeldElement> {
    if seed.is_empty() {
        return carried.to_vec();
    }
    let mut longest: BTreeMap<(&str, &Element), Duration> = BTreeMap::new();
    for element in carried.iter().chain(seed) {
        if let Some(left) = element.expires_in {
            let slot = longest
                .entry((element.set.as_str(), &element.element))
                .or_default();
            *slot = (*slot).max(left);
        }
    }
    longest
        .into_iter()
        .map(|((set, element), left)| HeldElement {
            set: set.to_string(),
            element: *element,
            expires_in: Some(left),
        })
        .collect()
}

/// One delete update per set.
/// Each element once: a dump of a hash set can list an element twice (see
/// `kernel::elements::logical_count`), and one transaction must not delete
/// an element twice.
fn deletions(elements: &[HeldElement]) -> Vec<SetUpdate> {
    let mut by_set: BTreeMap<&str, BTreeSet<Element>> = BTreeMap::new();
    for element in elements {
        by_set
            .entry(&element.set)
            .or_default()
            .insert(element.element);
    }
    by_set
        .into_iter()
        .map(|(set, elements)| SetUpdate {
            set: set.to_string(),
            change: SetChange::Delete {
                elements: elements.into_iter().collect(),
            },
        })
        .collect()
}

/// The learned batch as updates: one per set and timeout (an update carries
/// one timeout), in the batch's order.
fn learned_updates(batch: &[Learned]) -> Vec<SetUpdate> {
    let mut grouped: BTreeMap<(&str, Duration), Vec<Element>> = BTreeMap::new();
    for learned in batch {
        grouped
            .entry((&learned.set, learned.timeout))
            .or_default()
            .push(learned.element);
    }
    grouped
        .into_iter()
        .map(|((set, timeout), elements)| SetUpdate {
            set: set.to_string(),
            change: SetChange::Add {
                elements,
                timeout: Some(timeout),
            },
        })
        .collect()
}

impl AddressSink for Sandbox {
    fn learn<'a>(&'a self, batch: &'a [Learned]) -> SinkFuture<'a> {
        Box::pin(async move {
            let sent_at = Instant::now();
            let (needed, epoch) = {
                let written = self.written();
                let needed: Vec<Learned> = batch
                    .iter()
                    .filter(|learned| !written.covers(learned, sent_at))
                    .cloned()
                    .collect();
                (needed, written.epoch)
            };
            if needed.is_empty() {
                return Ok(());
            }
            let (written, committed) = self.learning.write(learned_updates(&needed));
            self.transactions.fetch_add(committed, Ordering::Relaxed);
            match written.map_err(|source| Error::Kernel {
                target: self.target.clone(),
                source,
            }) {
                Ok(()) => {
                    self.written().record(&needed, sent_at, epoch);
                    self.elements_added
                        .fetch_add(needed.len() as u64, Ordering::Relaxed);
                    Ok(())
                }
                Err(error) => {
                    self.failures.fetch_add(1, Ordering::Relaxed);
                    Err(learn::Error::Learn {
                        count: batch.len(),
                        source: Box::new(error),
                    })
                }
            }
        })
    }

    fn forget<'a>(&'a self, batch: &'a [(String, Element)]) -> SinkFuture<'a> {
        Box::pin(async move {
            let held: Vec<HeldElement> = batch
                .iter()
                .map(|(set, element)| HeldElement {
                    set: set.clone(),
                    element: *element,
                    expires_in: None,
                })
                .collect();
            self.update(deletions(&held))
                .await
                .map_err(|error| learn::Error::Forget {
                    count: batch.len(),
                    source: Box::new(error),
                })
        })
    }
}

/// The upstream sockets of a sandbox's proxy and resolver loop: opened inside
/// the sandbox's namespace with the proxy's packet mark, which the ruleset
/// lets through to the upstream resolvers without redirecting it.
#[derive(Debug)]
pub struct MarkedSockets {
    factory: Arc<SocketFactory>,
    mark: u32,
}

impl MarkedSockets {
    pub fn new(factory: Arc<SocketFactory>, mark: u32) -> Self {
        MarkedSockets { factory, mark }
    }
}

impl UpstreamSockets for MarkedSockets {
    fn udp(&self, local: SocketAddr, _server: SocketAddr) -> io::Result<std::net::UdpSocket> {
        let socket = self
            .factory
            .open(local.ip(), SocketKind::Udp, Some(self.mark))?;
        socket.bind(&local.into())?;
        Ok(socket.into())
    }

    fn tcp(&self, server: SocketAddr) -> io::Result<tokio::net::TcpSocket> {
        let socket = self
            .factory
            .open(server.ip(), SocketKind::Tcp, Some(self.mark))?;
        socket.set_nonblocking(true)?;
        Ok(tokio::net::TcpSocket::from_std_stream(socket.into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held(set: &str, element: &str, left: u64) -> HeldElement {
        HeldElement {
            set: set.into(),
            element: Element::Addr(element.parse().unwrap()),
            expires_in: Some(Duration::from_secs(left)),
        }
    }

    #[test]
    fn carried_addresses_get_their_new_elements_with_the_longest_time_left() {
        let old = [
            held("dns_v4", "192.0.2.1/32", 10),
            held("dns_v4", "192.0.2.2/32", 20),
            held("dns_v4", "192.0.2.3/32", 30),
        ];
        let ported =
            |addr: IpAddr| Element::AddrProtoPort(addr.into(), crate::policy::Proto::Tcp, 443);
        // .1 is still allowed on any port, .2 now only on 443, .3 not at all.
        let (carried, forgotten) = carry(&old, |addr| match addr.to_string().as_str() {
            "192.0.2.1" => vec![("dns_v4".into(), Element::Addr(addr.into()))],
            "192.0.2.2" => vec![("dns_v4_ports".into(), ported(addr))],
            _ => vec![],
        });
        assert_eq!(
            carried,
            vec![
                held("dns_v4", "192.0.2.1/32", 10),
                HeldElement {
                    set: "dns_v4_ports".into(),
                    element: ported("192.0.2.2".parse().unwrap()),
                    expires_in: Some(Duration::from_secs(20)),
                },
            ]
        );
        assert_eq!(
            forgotten,
            vec![
                held("dns_v4", "192.0.2.2/32", 20),
                held("dns_v4", "192.0.2.3/32", 30)
            ]
        );
        let deletes = deletions(&forgotten);
        assert_eq!(deletes.len(), 1);
        assert!(
            matches!(&deletes[0].change, SetChange::Delete { elements } if elements.len() == 2)
        );
    }

    #[test]
    fn a_seed_joins_the_carried_elements_each_once_with_the_longer_time() {
        let carried = [
            held("dns_v4", "192.0.2.1/32", 10),
            held("dns_v4", "192.0.2.2/32", 50),
        ];
        let seed = [
            held("dns_v4", "192.0.2.2/32", 30),
            held("dns_v4", "192.0.2.3/32", 40),
            held("dns_v4_ports", "192.0.2.1/32", 5),
        ];
        assert_eq!(with_seed(&carried, &[]), carried.to_vec());
        assert_eq!(
            with_seed(&carried, &seed),
            vec![
                held("dns_v4", "192.0.2.1/32", 10),
                held("dns_v4", "192.0.2.2/32", 50),
                held("dns_v4", "192.0.2.3/32", 40),
                held("dns_v4_ports", "192.0.2.1/32", 5),
            ]
        );
    }

    fn learned(addr: &str, secs: u64) -> Learned {
        Learned {
            set: "dns_v4".into(),
            element: Element::Addr(addr.parse().unwrap()),
            timeout: Duration::from_secs(secs),
        }
    }

    #[test]
    fn a_written_element_covers_a_timeout_that_ends_no_later() {
        let mut written = WrittenElements::default();
        let t0 = Instant::now();
        let epoch = written.epoch;
        written.record(&[learned("192.0.2.1/32", 360)], t0, epoch);
        // 10 s later a cached answer asks for 350 s (its TTL aged by 10 s).
        let later = t0 + Duration::from_secs(10);
        assert!(written.covers(&learned("192.0.2.1/32", 350), later));
        // Truncating the aged TTL to seconds may end it up to 1 s later.
        assert!(written.covers(&learned("192.0.2.1/32", 351), later));
        // A fresh answer with a longer timeout must be written.
        assert!(!written.covers(&learned("192.0.2.1/32", 352), later));
        // Another element, or the same one in another set, is not covered.
        assert!(!written.covers(&learned("192.0.2.2/32", 1), t0));
        let mut other_set = learned("192.0.2.1/32", 1);
        other_set.set = "dns_v4_ports".into();
        assert!(!written.covers(&other_set, t0));
    }

    #[test]
    fn a_clear_forgets_and_a_write_that_raced_with_it_is_not_remembered() {
        let mut written = WrittenElements::default();
        let t0 = Instant::now();
        let before = written.epoch;
        written.record(&[learned("192.0.2.1/32", 360)], t0, before);
        written.clear();
        assert!(!written.covers(&learned("192.0.2.1/32", 1), t0));
        // A write that looked before the clear and finished after it.
        written.record(&[learned("192.0.2.1/32", 360)], t0, before);
        assert!(!written.covers(&learned("192.0.2.1/32", 1), t0));
        written.record(&[learned("192.0.2.1/32", 360)], t0, written.epoch);
        assert!(written.covers(&learned("192.0.2.1/32", 1), t0));
    }

    #[test]
    fn a_learned_batch_becomes_one_update_per_set_and_timeout() {
        let learned_in = |set: &str, addr: &str, secs: u64| Learned {
            set: set.into(),
            element: Element::Addr(addr.parse().unwrap()),
            timeout: Duration::from_secs(secs),
        };
        let updates = learned_updates(&[
            learned_in("dns_v4", "192.0.2.1/32", 90),
            learned_in("dns_v6", "2001:db8::1/128", 90),
            learned_in("dns_v4", "192.0.2.2/32", 90),
            learned_in("dns_v4", "192.0.2.3/32", 120),
        ]);
        let shape: Vec<(&str, usize, Option<Duration>)> = updates
            .iter()
            .map(|u| match &u.change {
                SetChange::Add { elements, timeout } => (u.set.as_str(), elements.len(), *timeout),
                SetChange::Delete { .. } => unreachable!(),
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                ("dns_v4", 2, Some(Duration::from_secs(90))),
                ("dns_v4", 1, Some(Duration::from_secs(120))),
                ("dns_v6", 1, Some(Duration::from_secs(90))),
            ]
        );
    }
}
