//! The denied-connection log: every packet the `deny` chain logs to nflog
//! becomes at most one structured `tracing` warning per destination, with
//! the hostname its address was resolved from.
//!
//! - One line per (transport protocol, destination address, destination
//!   port) within [`DEDUP_WINDOW`]: a client that retries a blocked
//!   connection every second is logged once every ten minutes, not 600 times.
//! - At most [`LINES_PER_SECOND`] lines per second, in bursts of up to
//!   [`LINE_BURST`] (a token bucket), whatever the sandbox sends: a scan of
//!   many destinations cannot flood the log. Lines over the limit are
//!   counted and summed up every [`SUMMARY_INTERVAL`] in one "suppressed N
//!   denied-connection lines" warning; their destinations count as logged for
//!   the window (the summary stands for them).
//! - The hostname is the name the DNS proxy (or the resolver loop) last
//!   released the address for ([`AddressOrigins`]); an address with no such
//!   answer was used literally or resolved some other way.
//!
//! [`DenialLimiter`] is the pure decision (clock injected, for tests);
//! [`DenialWatch`] runs it on a thread that reads an [`NflogListener`].

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::dns::origins::AddressOrigins;
use crate::kernel::nflog::{Delivery, DeniedPacket, NflogListener};
use crate::netns;
use crate::ruleset::compile::LOG_PREFIX;

/// How long a logged destination stays quiet: later denials of the same
/// (protocol, address, port) within it are counted, not logged.
pub const DEDUP_WINDOW: Duration = Duration::from_secs(10 * 60);

/// The sustained rate of denied-connection lines (token bucket refill).
pub const LINES_PER_SECOND: u32 = 20;

/// The most lines logged at once after a quiet spell (token bucket size).
pub const LINE_BURST: u32 = 20;

/// How often suppressed lines are summed up (only if there were any).
pub const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// How many destinations the window remembers; beyond it the oldest is
/// forgotten early (and logged again on its next denial). About 80 bytes each.
pub const REMEMBERED_DESTINATIONS: usize = 16_384;

/// The `note` of a line whose address the DNS proxy never answered with.
pub const NO_DNS_ANSWER: &str =
    "no DNS answer seen for this address: a literal address or a name resolved elsewhere";

/// The message of every denied-connection line (the JSON logs' `fields.message`).
pub const DENIED_MESSAGE: &str = "denied connection";

/// What is logged once per window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Destination {
    pub l4proto: u8,
    pub dst: IpAddr,
    pub dport: Option<u16>,
}

impl From<&DeniedPacket> for Destination {
    fn from(packet: &DeniedPacket) -> Self {
        Destination {
            l4proto: packet.l4proto,
            dst: packet.dst,
            dport: packet.dport,
        }
    }
}

/// What to do with one denied packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Log a line.
    Log,
    /// Its destination was logged (or suppressed) within the window.
    Repeat,
    /// A new destination, but the rate limit is reached: count it.
    Suppress,
}

/// Counters of the denied-connection log, shared with the health endpoint.
#[derive(Debug, Default)]
pub struct DenialCounters {
    packets: AtomicU64,
    logged: AtomicU64,
    repeated: AtomicU64,
    suppressed: AtomicU64,
    unreadable: AtomicU64,
    foreign: AtomicU64,
    overruns: AtomicU64,
    receive_errors: AtomicU64,
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

/// A reading of [`DenialCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DenialStats {
    /// Denied packets seen (with netleash's log prefix).
    pub packets: u64,
    /// Denied-connection lines written.
    pub logged: u64,
    /// Packets whose destination was already logged within the window.
    pub repeated: u64,
    /// Lines not written because of the rate limit.
    pub suppressed: u64,
    /// Messages that could not be parsed (no or truncated packet bytes).
    pub unreadable: u64,
    /// Packets logged to the group by some other rule (another prefix), ignored.
    pub foreign: u64,
    /// Times the socket's buffer overflowed and the kernel dropped packets.
    pub overruns: u64,
    /// Failed reads from the socket.
    pub receive_errors: u64,
}

impl DenialCounters {
    pub fn snapshot(&self) -> DenialStats {
        let read = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        DenialStats {
            packets: read(&self.packets),
            logged: read(&self.logged),
            repeated: read(&self.repeated),
            suppressed: read(&self.suppressed),
            unreadable: read(&self.unreadable),
            foreign: read(&self.foreign),
            overruns: read(&self.overruns),
            receive_errors: read(&self.receive_errors),
        }
    }
}

/// A token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug)]
struct TokenBucket {
    capacity: f64,
    rate: f64,
    tokens: f64,
    refilled: Instant,
}

impl TokenBucket {
    fn new(capacity: u32, rate: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            capacity: f64::from(capacity),
            rate: f64::from(rate),
            tokens: f64::from(capacity),
            refilled: now,
        }
    }

    fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.refilled = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Deduplication and rate limit of denied-connection lines.
#[derive(Debug)]
pub struct DenialLimiter {
    window: Duration,
    capacity: usize,
    /// When each remembered destination was last logged or suppressed.
    since: HashMap<Destination, Instant>,
    /// The same, oldest first; a slot whose time is not the map's is a
    /// leftover of an earlier window and is skipped.
    order: VecDeque<(Destination, Instant)>,
    bucket: TokenBucket,
    /// Suppressed since the last summary.
    unreported: u64,
    counters: Arc<DenialCounters>,
}

impl DenialLimiter {
    /// The limiter with the documented window, rate and capacity.
    pub fn new(counters: Arc<DenialCounters>, now: Instant) -> DenialLimiter {
        DenialLimiter::with_limits(
            counters,
            now,
            DEDUP_WINDOW,
            LINE_BURST,
            LINES_PER_SECOND,
            REMEMBERED_DESTINATIONS,
        )
    }

    pub fn with_limits(
        counters: Arc<DenialCounters>,
        now: Instant,
        window: Duration,
        burst: u32,
        per_second: u32,
        capacity: usize,
    ) -> DenialLimiter {
        DenialLimiter {
            window,
            capacity: capacity.max(1),
            since: HashMap::new(),
            order: VecDeque::new(),
            bucket: TokenBucket::new(burst, per_second, now),
            unreported: 0,
            counters,
        }
    }

    /// Decides about one denied packet to `destination` seen at `now`, and counts it.
    pub fn decide(&mut self, destination: Destination, now: Instant) -> Decision {
        bump(&self.counters.packets);
        self.expire(now);
        if self.since.contains_key(&destination) {
            bump(&self.counters.repeated);
            return Decision::Repeat;
        }
        self.since.insert(destination, now);
        self.order.push_back((destination, now));
        while self.since.len() > self.capacity {
            let Some((oldest, at)) = self.order.pop_front() else {
                break;
            };
            if self.since.get(&oldest) == Some(&at) {
                self.since.remove(&oldest);
            }
        }
        if self.bucket.take(now) {
            bump(&self.counters.logged);
            Decision::Log
        } else {
            bump(&self.counters.suppressed);
            self.unreported += 1;
            Decision::Suppress
        }
    }

    /// Forgets the destinations whose window has passed at `now`.
    fn expire(&mut self, now: Instant) {
        while let Some(&(destination, at)) = self.order.front() {
            if now.saturating_duration_since(at) < self.window {
                break;
            }
            self.order.pop_front();
            if self.since.get(&destination) == Some(&at) {
                self.since.remove(&destination);
            }
        }
    }

    /// The number of lines suppressed since the last call.
    pub fn take_unreported(&mut self) -> u64 {
        std::mem::take(&mut self.unreported)
    }

    /// How many destinations are remembered.
    pub fn remembered(&self) -> usize {
        self.since.len()
    }
}

/// The name of a transport protocol number, as nft writes it where it has one.
pub fn protocol_name(l4proto: u8) -> String {
    match l4proto {
        1 => "icmp".into(),
        6 => "tcp".into(),
        17 => "udp".into(),
        33 => "dccp".into(),
        58 => "icmpv6".into(),
        132 => "sctp".into(),
        136 => "udplite".into(),
        other => other.to_string(),
    }
}

/// A short name for the sandbox in log lines: the namespace's name, path or process.
pub fn sandbox_label(target: &netns::Target) -> String {
    match target {
        netns::Target::Name(name) => name.clone(),
        netns::Target::Path(path) => path.display().to_string(),
        netns::Target::Pid(pid) => format!("pid {pid}"),
    }
}

/// Turns denied packets into log lines.
struct DenialLogger {
    sandbox: String,
    origins: Arc<AddressOrigins>,
    limiter: DenialLimiter,
    counters: Arc<DenialCounters>,
}

impl DenialLogger {
    fn delivery(&mut self, delivery: Delivery, now: Instant) {
        match delivery {
            Delivery::Overrun => {
                bump(&self.counters.overruns);
                tracing::warn!(
                    sandbox = %self.sandbox,
                    "the kernel dropped denied-packet records (nflog socket buffer full); \
                     some denied connections are not logged"
                );
            }
            Delivery::Messages(messages) => {
                for message in messages {
                    match message {
                        Ok(packet) => self.packet(&packet, now),
                        Err(reason) => {
                            bump(&self.counters.unreadable);
                            tracing::debug!(sandbox = %self.sandbox, reason, "unreadable nflog message");
                        }
                    }
                }
            }
        }
    }

    fn packet(&mut self, packet: &DeniedPacket, now: Instant) {
        if packet.prefix != LOG_PREFIX {
            bump(&self.counters.foreign);
            return;
        }
        if self.limiter.decide(packet.into(), now) != Decision::Log {
            return;
        }
        let host = self.origins.name_of(packet.dst);
        tracing::warn!(
            sandbox = %self.sandbox,
            proto = %protocol_name(packet.l4proto),
            src = %packet.src,
            dst = %packet.dst,
            port = packet.dport,
            host = host.as_deref(),
            note = host.is_none().then_some(NO_DNS_ANSWER),
            "{DENIED_MESSAGE}"
        );
    }

    fn summarize(&mut self) {
        let suppressed = self.limiter.take_unreported();
        if suppressed > 0 {
            tracing::warn!(
                sandbox = %self.sandbox,
                suppressed,
                "suppressed {suppressed} denied-connection lines in the last {}s \
                 (limit: {LINES_PER_SECOND} lines per second)",
                SUMMARY_INTERVAL.as_secs()
            );
        }
    }
}

/// The running denied-connection log of one sandbox, or why it is off.
#[derive(Debug)]
pub struct DenialWatch {
    counters: Arc<DenialCounters>,
    /// Why there is no log (the listener could not be opened).
    error: Option<String>,
    group: u16,
    stop: Arc<AtomicBool>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

/// The health view of the denied-connection log.
#[derive(Debug, Clone, Serialize)]
pub struct DenialHealth {
    /// Whether denied packets are being read.
    pub listening: bool,
    pub nflog_group: u16,
    /// Why not, if not.
    pub error: Option<String>,
    #[serde(flatten)]
    pub stats: DenialStats,
}

impl DenialWatch {
    /// Starts reading `listener` on a thread of its own, logging as the
    /// sandbox `sandbox` and naming hosts from `origins`.
    pub fn start(
        listener: NflogListener,
        sandbox: String,
        origins: Arc<AddressOrigins>,
    ) -> std::io::Result<DenialWatch> {
        let counters = Arc::new(DenialCounters::default());
        let stop = Arc::new(AtomicBool::new(false));
        let group = listener.group();
        let logger = DenialLogger {
            sandbox,
            origins,
            limiter: DenialLimiter::new(counters.clone(), Instant::now()),
            counters: counters.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("netleash-denials".into())
            .stack_size(THREAD_STACK)
            .spawn({
                let stop = stop.clone();
                move || watch(listener, logger, &stop)
            })?;
        Ok(DenialWatch {
            counters,
            error: None,
            group,
            stop,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// A watch that is off because of `error`: it logs nothing and says why in health.
    pub fn off(group: u16, error: String) -> DenialWatch {
        DenialWatch {
            counters: Arc::default(),
            error: Some(error),
            group,
            stop: Arc::new(AtomicBool::new(true)),
            thread: Mutex::new(None),
        }
    }

    pub fn stats(&self) -> DenialStats {
        self.counters.snapshot()
    }

    /// Why the log is off, if it could not be started.
    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    pub fn health(&self) -> DenialHealth {
        let running = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_some_and(|thread| !thread.is_finished());
        DenialHealth {
            listening: running,
            nflog_group: self.group,
            error: self.error.clone(),
            stats: self.stats(),
        }
    }

    /// Tells the thread to stop, without waiting: it ends within
    /// [`crate::kernel::nflog::RECEIVE_POLL`]. For stopping many at once,
    /// before [`DenialWatch::stop`] waits for each.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the thread (within [`crate::kernel::nflog::RECEIVE_POLL`]) and
    /// closes the socket, which releases the group. Blocks until then.
    pub fn stop(&self) {
        self.request_stop();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

/// The stack of the log's thread. It reads into a heap buffer and formats
/// one log line at a time; the default 2 MiB would be reserved for each of
/// the agent's sandboxes.
const THREAD_STACK: usize = 256 * 1024;

/// How long the thread waits after a failed read before reading again.
const RECEIVE_RETRY: Duration = Duration::from_secs(1);

fn watch(mut listener: NflogListener, mut logger: DenialLogger, stop: &AtomicBool) {
    let mut last_summary = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        match listener.receive() {
            Ok(Some(delivery)) => logger.delivery(delivery, Instant::now()),
            Ok(None) => {}
            Err(error) => {
                bump(&logger.counters.receive_errors);
                tracing::error!(
                    sandbox = %logger.sandbox,
                    error = %crate::cli::render_error(&error),
                    "reading denied packets failed; retrying"
                );
                std::thread::sleep(RECEIVE_RETRY);
            }
        }
        if last_summary.elapsed() >= SUMMARY_INTERVAL {
            logger.summarize();
            last_summary = Instant::now();
        }
    }
    logger.summarize();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(last: u8, port: u16) -> Destination {
        Destination {
            l4proto: 6,
            dst: IpAddr::from([198, 51, 100, last]),
            dport: Some(port),
        }
    }

    fn limiter(now: Instant) -> (DenialLimiter, Arc<DenialCounters>) {
        let counters = Arc::new(DenialCounters::default());
        (DenialLimiter::new(counters.clone(), now), counters)
    }

    #[test]
    fn a_destination_is_logged_once_per_window() {
        let start = Instant::now();
        let (mut limiter, counters) = limiter(start);
        assert_eq!(limiter.decide(to(10, 8080), start), Decision::Log);
        for second in 1..100 {
            let now = start + Duration::from_secs(second);
            assert_eq!(limiter.decide(to(10, 8080), now), Decision::Repeat);
        }
        // Another port, protocol or address is another destination.
        assert_eq!(limiter.decide(to(10, 8081), start), Decision::Log);
        let udp = Destination {
            l4proto: 17,
            ..to(10, 8080)
        };
        assert_eq!(limiter.decide(udp, start), Decision::Log);
        assert_eq!(limiter.decide(to(11, 8080), start), Decision::Log);
        let stats = counters.snapshot();
        assert_eq!(
            (
                stats.packets,
                stats.logged,
                stats.repeated,
                stats.suppressed
            ),
            (103, 4, 99, 0)
        );
    }

    #[test]
    fn a_destination_is_logged_again_once_its_window_has_passed() {
        let start = Instant::now();
        let (mut limiter, counters) = limiter(start);
        assert_eq!(limiter.decide(to(10, 8080), start), Decision::Log);
        let almost = start + DEDUP_WINDOW - Duration::from_millis(1);
        assert_eq!(limiter.decide(to(10, 8080), almost), Decision::Repeat);
        let after = start + DEDUP_WINDOW;
        assert_eq!(limiter.decide(to(10, 8080), after), Decision::Log);
        // The new window starts at the second line, not at the first.
        assert_eq!(
            limiter.decide(to(10, 8080), after + DEDUP_WINDOW / 2),
            Decision::Repeat
        );
        assert_eq!(counters.snapshot().logged, 2);
        assert_eq!(limiter.remembered(), 1);
    }

    #[test]
    fn the_rate_limit_allows_a_burst_then_the_refill_rate() {
        let start = Instant::now();
        let (mut limiter, counters) = limiter(start);
        let mut port = 0;
        let mut next = || {
            port += 1;
            to(10, port)
        };
        for _ in 0..LINE_BURST {
            assert_eq!(limiter.decide(next(), start), Decision::Log);
        }
        for _ in 0..5 {
            assert_eq!(limiter.decide(next(), start), Decision::Suppress);
        }
        assert_eq!(limiter.take_unreported(), 5);
        assert_eq!(limiter.take_unreported(), 0);
        // One refill interval later, exactly one more line.
        let later = start + Duration::from_secs(1) / LINES_PER_SECOND;
        assert_eq!(limiter.decide(next(), later), Decision::Log);
        assert_eq!(limiter.decide(next(), later), Decision::Suppress);
        // A full second refills the whole burst, never more.
        let much_later = later + Duration::from_secs(60);
        let logged = (0..LINE_BURST + 10)
            .filter(|_| limiter.decide(next(), much_later) == Decision::Log)
            .count();
        assert_eq!(logged, LINE_BURST as usize);
        let stats = counters.snapshot();
        assert_eq!(stats.logged, u64::from(LINE_BURST) * 2 + 1);
        assert_eq!(stats.suppressed, 5 + 1 + 10);
    }

    #[test]
    fn a_suppressed_destination_is_not_logged_later_in_its_window() {
        let start = Instant::now();
        let counters = Arc::new(DenialCounters::default());
        let mut limiter =
            DenialLimiter::with_limits(counters.clone(), start, Duration::from_secs(60), 1, 1, 100);
        assert_eq!(limiter.decide(to(10, 1), start), Decision::Log);
        assert_eq!(limiter.decide(to(10, 2), start), Decision::Suppress);
        let later = start + Duration::from_secs(5);
        assert_eq!(limiter.decide(to(10, 2), later), Decision::Repeat);
        assert_eq!(
            limiter.decide(to(10, 2), start + Duration::from_secs(60)),
            Decision::Log
        );
    }

    #[test]
    fn the_memory_is_bounded_and_forgets_the_oldest_first() {
        let start = Instant::now();
        let counters = Arc::new(DenialCounters::default());
        let mut limiter = DenialLimiter::with_limits(counters, start, DEDUP_WINDOW, 1000, 1000, 3);
        for port in 1..=4 {
            let now = start + Duration::from_secs(u64::from(port));
            assert_eq!(limiter.decide(to(10, port), now), Decision::Log);
        }
        assert_eq!(limiter.remembered(), 3);
        let now = start + Duration::from_secs(10);
        assert_eq!(limiter.decide(to(10, 1), now), Decision::Log);
        assert_eq!(limiter.decide(to(10, 4), now), Decision::Repeat);
    }

    #[test]
    fn the_logger_counts_foreign_unreadable_and_lost_records_apart() {
        use crate::kernel::nflog::Family;

        let start = Instant::now();
        let counters = Arc::new(DenialCounters::default());
        let origins = Arc::new(AddressOrigins::default());
        origins.record("app.example", [IpAddr::from([198, 51, 100, 10])]);
        let mut logger = DenialLogger {
            sandbox: "sbx".into(),
            origins,
            limiter: DenialLimiter::new(counters.clone(), start),
            counters: counters.clone(),
        };
        let packet = |prefix: &str| DeniedPacket {
            family: Family::Ipv4,
            l4proto: 6,
            src: IpAddr::from([192, 0, 2, 2]),
            dst: IpAddr::from([198, 51, 100, 10]),
            dport: Some(8080),
            prefix: prefix.into(),
        };
        logger.delivery(
            Delivery::Messages(vec![
                Ok(packet(LOG_PREFIX)),
                Ok(packet("someone else ")),
                Err("a truncated IPv4 header"),
                Ok(packet(LOG_PREFIX)),
            ]),
            start,
        );
        logger.delivery(Delivery::Overrun, start);
        let stats = counters.snapshot();
        assert_eq!(
            (stats.packets, stats.logged, stats.repeated),
            (2, 1, 1),
            "{stats:?}"
        );
        assert_eq!((stats.foreign, stats.unreadable, stats.overruns), (1, 1, 1));
    }

    #[test]
    fn protocol_names_follow_nft() {
        assert_eq!(protocol_name(6), "tcp");
        assert_eq!(protocol_name(58), "icmpv6");
        assert_eq!(protocol_name(250), "250");
    }
}
