//! The filtering DNS proxy of a sandbox.
//!
//! The ruleset redirects every UDP and TCP packet to port 53 from the sandbox
//! to this proxy, whatever resolver address the client chose. For each query:
//! - malformed → dropped and counted (never a crash, never an answer to a
//!   packet that is not a query, so the proxy cannot be used to reflect);
//! - a name no [`NameBinding`] allows → REFUSED (or NXDOMAIN), logged,
//!   never forwarded: the upstream never sees it, which closes DNS
//!   tunnelling through the resolver;
//! - an allowed name → answered from the shared cache or forwarded upstream;
//!   the answer's addresses are written into the sets through the
//!   [`AddressSink`], and the answer is released to the client only after
//!   the sink confirmed. A client connects only after it has an answer, so
//!   its first SYN always finds its address in the set.
//!
//! A forwarded answer is returned to the client as the upstream sent it
//! (only the id is put back to the client's); an answer from the cache is
//! the cached upstream answer with the client's id and question and its TTLs
//! lowered by its age.
//!
//! Over UDP, the datagrams waiting on the socket are taken in batches with
//! one recvmmsg(2), those answerable without waiting (cache hits, refusals)
//! are answered in place and their replies sent with one sendmmsg(2); the
//! rest continue in tasks.

use std::cell::RefCell;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::{DNSClass, RecordType};
use tokio::io::{AsyncWriteExt, Interest};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinHandle;

use crate::dns::answer::{AnswerAddress, MAX_ADDRESSES_PER_NAME, answer_ttl, extract_addresses};
use crate::dns::cache::{AnswerCache, CacheKey, CachedAnswer, ReplyTemplate};
use crate::dns::learn::{AddressSink, learned_for};
use crate::dns::names::{AllowedNames, normalize_query_name};
use crate::dns::origins::AddressOrigins;
use crate::dns::ttl::{self, TtlPolicy};
use crate::dns::upstream::{Upstream, read_frame};
use crate::dns::{error_chain, random_u64};
use crate::ruleset::NameBinding;

/// The EDNS UDP payload size the proxy advertises upstream and to clients:
/// the DNS Flag Day 2020 value, which avoids IP fragmentation on any path
/// with an MTU of 1280 (the IPv6 minimum) and lets larger answers go to TCP.
pub const UPSTREAM_EDNS_PAYLOAD: u16 = 1_232;

/// The UDP payload a client without EDNS accepts (RFC 1035 §4.2.1).
const CLASSIC_UDP_PAYLOAD: usize = 512;

/// UDP queries handled at the same time; beyond this, queries are dropped
/// (the client retries) instead of queueing without bound.
pub const MAX_INFLIGHT_UDP_QUERIES: usize = 1_024;

/// TCP connections served at the same time; beyond this, new connections
/// are closed at once (RFC 7766 §6.2.2 lets a server limit them).
pub const MAX_TCP_CONNECTIONS: usize = 128;

/// Pipelined queries processed at the same time on one TCP connection
/// (RFC 7766 §6.2.1.1 asks for concurrent processing); reading pauses
/// beyond this.
const MAX_INFLIGHT_PER_CONNECTION: usize = 16;

/// A TCP connection with no query for this long is closed (RFC 7766 §6.2.3
/// recommends idle timeouts of the order of seconds).
pub const TCP_IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most this many refusal log lines per [`LOG_WINDOW`]; the rest are
/// counted and the count is reported with the next line that gets through.
pub const LOG_BURST: u32 = 20;
pub const LOG_WINDOW: Duration = Duration::from_secs(10);

/// How a query for a name the policy does not allow is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// RCODE 5: the resolver will not answer this (the default; a client sees
    /// that the name is blocked, not that it does not exist).
    Refused,
    /// RCODE 3: the name does not exist (for clients that retry other
    /// resolvers on REFUSED).
    NxDomain,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub upstream: Upstream,
    pub refusal: Refusal,
    pub ttl: TtlPolicy,
    pub max_addresses_per_name: usize,
    pub tcp_idle_timeout: Duration,
}

impl ProxyConfig {
    /// The defaults documented on the constants, with these upstream servers.
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        ProxyConfig {
            upstream: Upstream::new(servers),
            refusal: Refusal::Refused,
            ttl: TtlPolicy::default(),
            max_addresses_per_name: MAX_ADDRESSES_PER_NAME,
            tcp_idle_timeout: TCP_IDLE_TIMEOUT,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid DNS proxy configuration")]
    Config(#[source] ttl::Error),
    #[error("the DNS proxy has no upstream DNS server; give one or a resolv.conf that names one")]
    NoUpstream,
    #[error("preparing the DNS proxy's UDP socket")]
    UdpSocket(#[source] io::Error),
    #[error("preparing the DNS proxy's TCP listener")]
    TcpListener(#[source] io::Error),
    #[error("the DNS proxy's {transport} task failed")]
    Task {
        transport: &'static str,
        #[source]
        source: tokio::task::JoinError,
    },
}

/// The transport a query arrived on; it decides whether an answer too large
/// for the client must be sent truncated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// Counters for status and health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProxyStats {
    pub udp_queries: u64,
    pub tcp_queries: u64,
    /// Packets that were not a parseable DNS query; dropped.
    pub malformed: u64,
    /// UDP queries dropped because [`MAX_INFLIGHT_UDP_QUERIES`] were in flight.
    pub overloaded: u64,
    /// Queries for names the policy does not allow.
    pub refused: u64,
    pub forwarded: u64,
    pub cache_hits: u64,
    /// Forwarded queries the upstream did not answer (client got SERVFAIL).
    pub upstream_failures: u64,
    /// Answers whose addresses could not be written (client got SERVFAIL).
    pub learn_failures: u64,
    /// Addresses not learned because of the per-name cap.
    pub addresses_over_cap: u64,
    /// UDP answers sent truncated because they exceed the client's limit.
    pub truncated: u64,
}

#[derive(Debug, Default)]
struct Counters {
    udp_queries: AtomicU64,
    tcp_queries: AtomicU64,
    malformed: AtomicU64,
    overloaded: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    cache_hits: AtomicU64,
    upstream_failures: AtomicU64,
    learn_failures: AtomicU64,
    addresses_over_cap: AtomicU64,
    truncated: AtomicU64,
}

fn bump(counter: &AtomicU64, by: u64) {
    counter.fetch_add(by, Ordering::Relaxed);
}

/// A log rate limit: [`LOG_BURST`] lines per [`LOG_WINDOW`].
#[derive(Debug)]
struct LogLimiter {
    state: Mutex<LogWindow>,
}

#[derive(Debug)]
struct LogWindow {
    started: Instant,
    logged: u32,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> Self {
        LogLimiter {
            state: Mutex::new(LogWindow {
                started: Instant::now(),
                logged: 0,
                suppressed: 0,
            }),
        }
    }

    /// Calls `line` with the number of lines suppressed since the last one,
    /// if a line may be logged now.
    fn log(&self, line: impl FnOnce(u64)) {
        if let Some(suppressed) = self.admit() {
            line(suppressed);
        }
    }

    fn admit(&self) -> Option<u64> {
        let mut window = self
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if now.duration_since(window.started) >= LOG_WINDOW {
            window.started = now;
            window.logged = 0;
        }
        if window.logged < LOG_BURST {
            window.logged += 1;
            Some(std::mem::take(&mut window.suppressed))
        } else {
            window.suppressed += 1;
            None
        }
    }
}

/// The proxy of one sandbox (one policy, one sink). Share it as `Arc<Proxy>`.
pub struct Proxy {
    config: ProxyConfig,
    names: RwLock<Arc<AllowedNames>>,
    sink: Arc<dyn AddressSink>,
    cache: Arc<AnswerCache>,
    origins: Arc<AddressOrigins>,
    counters: Counters,
    refusal_log: LogLimiter,
    malformed_log: LogLimiter,
    problem_log: LogLimiter,
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl Proxy {
    pub fn new(
        config: ProxyConfig,
        names: AllowedNames,
        sink: Arc<dyn AddressSink>,
        cache: Arc<AnswerCache>,
        origins: Arc<AddressOrigins>,
    ) -> Result<Self, Error> {
        config.ttl.validate().map_err(Error::Config)?;
        if config.upstream.servers.is_empty() {
            return Err(Error::NoUpstream);
        }
        Ok(Proxy {
            config,
            names: RwLock::new(Arc::new(names)),
            sink,
            cache,
            origins,
            counters: Counters::default(),
            refusal_log: LogLimiter::new(),
            malformed_log: LogLimiter::new(),
            problem_log: LogLimiter::new(),
        })
    }

    /// Replaces the allowed names (a policy reload); queries in flight finish
    /// with the names they started with.
    pub fn set_names(&self, names: AllowedNames) {
        *self
            .names
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(names);
    }

    fn names(&self) -> Arc<AllowedNames> {
        self.names
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    pub fn origins(&self) -> &AddressOrigins {
        &self.origins
    }

    pub fn stats(&self) -> ProxyStats {
        let c = &self.counters;
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        ProxyStats {
            udp_queries: get(&c.udp_queries),
            tcp_queries: get(&c.tcp_queries),
            malformed: get(&c.malformed),
            overloaded: get(&c.overloaded),
            refused: get(&c.refused),
            forwarded: get(&c.forwarded),
            cache_hits: get(&c.cache_hits),
            upstream_failures: get(&c.upstream_failures),
            learn_failures: get(&c.learn_failures),
            addresses_over_cap: get(&c.addresses_over_cap),
            truncated: get(&c.truncated),
        }
    }

    /// Answers one DNS message that arrived on `transport`. `None` means the
    /// packet is dropped without an answer.
    pub async fn handle(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        bump(
            match transport {
                Transport::Udp => &self.counters.udp_queries,
                Transport::Tcp => &self.counters.tcp_queries,
            },
            1,
        );
        if let Some(query) = PlainQuery::parse(packet)
            && let Some(reply) = self.answer_hit(packet, query, transport).await
        {
            return reply;
        }
        self.handle_message(packet, transport).await
    }

    /// A plain query for an allowed name whose answer is in the cache,
    /// answered from the cached answer's [`ReplyTemplate`] without decoding
    /// the query into a [`Message`] or encoding the reply record by record.
    /// The reply is the one [`Proxy::handle_message`] gives (the unit tests
    /// compare them). `None` if it is not such a query: nothing was counted
    /// but the query itself, and the full path answers it.
    async fn answer_hit(
        &self,
        packet: &[u8],
        query: PlainQuery<'_>,
        transport: Transport,
    ) -> Option<Option<Vec<u8>>> {
        let names = self.names();
        let bindings = names.matching(&query.key.name);
        if bindings.is_empty() {
            return None;
        }
        let now = Instant::now();
        let hit = self.cache.get_counting_hits(&query.key, now)?;
        bump(&self.counters.cache_hits, 1);
        if !self
            .learn(&query.key.name, &bindings, &hit.addresses_at(now))
            .await
        {
            return Some(self.decoded(packet, |query| {
                encode(&reply_to(query, ResponseCode::ServFail))
            }));
        }
        let opt = query.edns.map(|edns| reply_opt(edns.dnssec_ok));
        let limit = query
            .edns
            .map_or(CLASSIC_UDP_PAYLOAD, |edns| usize::from(edns.max_payload));
        let template = hit.reply_template(reply_template).filter(|template| {
            let length = opt.map_or(0, |opt| opt.len()) + template.len();
            same_question(template.question(), query.question)
                && (transport == Transport::Tcp || length <= limit)
        });
        let Some(template) = template else {
            // No template, or an answer to truncate: encode it in full.
            return Some(self.decoded(packet, |query| {
                let reply = encode(&cached_reply(query, hit.message_at(now)))?;
                Some(self.fit(reply, query, transport))
            }));
        };
        Some(Some(template.reply(
            query.id,
            query.recursion_desired,
            query.question,
            hit.elapsed_secs(now),
            opt.as_ref().map(|opt| &opt[..]),
        )))
    }

    /// `reply` applied to `packet` decoded as a [`Message`]; only called for
    /// packets [`PlainQuery::parse`] accepted, which always decode.
    fn decoded(
        &self,
        packet: &[u8],
        reply: impl FnOnce(&Message) -> Option<Vec<u8>>,
    ) -> Option<Vec<u8>> {
        match Message::from_vec(packet) {
            Ok(query) => reply(&query),
            Err(_) => self.drop_malformed(packet.len(), "not a DNS message"),
        }
    }

    /// The full path: the query decoded into a [`Message`], the reply
    /// encoded from one.
    async fn handle_message(&self, packet: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let Ok(query) = Message::from_vec(packet) else {
            return self.drop_malformed(packet.len(), "not a DNS message");
        };
        if query.metadata.message_type != MessageType::Query {
            return self.drop_malformed(packet.len(), "a DNS response, not a query");
        }
        if query.metadata.op_code != OpCode::Query {
            return encode(&reply_to(&query, ResponseCode::NotImp));
        }
        // RFC 9619: a query has exactly one question.
        let [question] = query.queries.as_slice() else {
            return encode(&reply_to(&query, ResponseCode::FormErr));
        };
        let names = self.names();
        let name = normalize_query_name(question.name())
            .filter(|_| question.query_class() == DNSClass::IN);
        let bindings = name
            .as_deref()
            .map(|n| names.matching(n))
            .unwrap_or_default();
        let Some(name) = name.filter(|_| !bindings.is_empty()) else {
            return self.refuse(&query, transport);
        };
        let key = cache_key(&query, &name);
        let now = Instant::now();
        if let Some(hit) = key.as_ref().and_then(|key| self.cache.get(key, now)) {
            bump(&self.counters.cache_hits, 1);
            if !self.learn(&name, &bindings, &hit.addresses_at(now)).await {
                return encode(&reply_to(&query, ResponseCode::ServFail));
            }
            let reply = encode(&cached_reply(&query, hit.message_at(now)))?;
            return Some(self.fit(reply, &query, transport));
        }
        self.forward(&query, &name, &bindings, key, transport).await
    }

    async fn forward(
        &self,
        query: &Message,
        name: &str,
        bindings: &[&NameBinding],
        key: Option<CacheKey>,
        transport: Transport,
    ) -> Option<Vec<u8>> {
        let exchange = match self.config.upstream.exchange(&upstream_query(query)).await {
            Ok(exchange) => exchange,
            Err(error) => {
                bump(&self.counters.upstream_failures, 1);
                self.problem_log.log(|suppressed| {
                    tracing::warn!(name, suppressed, error = %error_chain(&error), "DNS query for an allowed name failed upstream");
                });
                return encode(&reply_to(query, ResponseCode::ServFail));
            }
        };
        bump(&self.counters.forwarded, 1);
        let extracted = extract_addresses(
            &exchange.message,
            query.queries[0].name(),
            self.config.max_addresses_per_name,
        );
        if extracted.over_cap > 0 {
            bump(&self.counters.addresses_over_cap, extracted.over_cap as u64);
            tracing::debug!(
                name,
                kept = extracted.addresses.len(),
                dropped = extracted.over_cap,
                "answer has more addresses than the per-name cap"
            );
        }
        if !self.learn(name, bindings, &extracted.addresses).await {
            return encode(&reply_to(query, ResponseCode::ServFail));
        }
        let cacheable = exchange.message.metadata.response_code == ResponseCode::NoError
            && !exchange.message.metadata.truncation;
        if let (Some(key), Some(ttl), true) = (key, answer_ttl(&exchange.message), cacheable) {
            let mut message = exchange.message;
            message.edns = None; // RFC 6891 §6.1.1: OPT RRs MUST NOT be cached
            self.cache.insert(
                key,
                CachedAnswer::new(message, extracted.addresses, ttl, Instant::now()),
            );
        }
        let mut wire = exchange.wire;
        wire[..2].copy_from_slice(&query.metadata.id.to_be_bytes());
        Some(self.fit(wire, query, transport))
    }

    /// Writes the addresses of `name` into the sets of every binding that
    /// allows it and waits until they are there. `false` if the sink failed:
    /// the client then gets SERVFAIL instead of an address it could not reach.
    async fn learn(
        &self,
        name: &str,
        bindings: &[&NameBinding],
        addresses: &[AnswerAddress],
    ) -> bool {
        if addresses.is_empty() {
            return true;
        }
        let batch = learned_for(bindings, addresses, &self.config.ttl);
        match self.sink.learn(&batch).await {
            Ok(()) => {
                self.origins.record(name, addresses.iter().map(|a| a.addr));
                true
            }
            Err(error) => {
                bump(&self.counters.learn_failures, 1);
                self.problem_log.log(|suppressed| {
                    tracing::error!(name, suppressed, error = %error_chain(&error), "could not write the answer's addresses into the sets; answering SERVFAIL");
                });
                false
            }
        }
    }

    fn refuse(&self, query: &Message, transport: Transport) -> Option<Vec<u8>> {
        bump(&self.counters.refused, 1);
        self.refusal_log.log(|suppressed| {
            let question = &query.queries[0];
            tracing::warn!(
                name = %question.name().to_ascii(),
                record_type = %question.query_type(),
                ?transport,
                suppressed,
                "DNS query refused: the policy does not allow this name"
            );
        });
        let rcode = match self.config.refusal {
            Refusal::Refused => ResponseCode::Refused,
            Refusal::NxDomain => ResponseCode::NXDomain,
        };
        encode(&reply_to(query, rcode))
    }

    fn drop_malformed(&self, length: usize, why: &'static str) -> Option<Vec<u8>> {
        bump(&self.counters.malformed, 1);
        self.malformed_log.log(|suppressed| {
            tracing::debug!(length, why, suppressed, "dropped a malformed DNS packet");
        });
        None
    }

    /// Over UDP, an answer larger than the client accepts is replaced by a
    /// truncated one (TC=1, question only), and the client retries over TCP
    /// (RFC 1035 §4.2.1, RFC 6891 §7). Its addresses are already learned.
    fn fit(&self, wire: Vec<u8>, query: &Message, transport: Transport) -> Vec<u8> {
        let limit = query.edns.as_ref().map_or(CLASSIC_UDP_PAYLOAD, |e| {
            usize::from(e.max_payload()).max(CLASSIC_UDP_PAYLOAD)
        });
        if transport == Transport::Tcp || wire.len() <= limit {
            return wire;
        }
        bump(&self.counters.truncated, 1);
        let mut truncated = reply_to(query, ResponseCode::NoError);
        truncated.metadata.truncation = true;
        encode(&truncated).unwrap_or_default()
    }

    /// Serves UDP and TCP queries on the given sockets until the handle is
    /// stopped. The sockets are bound by the caller (inside the sandbox's
    /// namespace if need be: a socket stays in the namespace it was created
    /// in). Must be called inside a tokio runtime.
    pub fn spawn(
        self: &Arc<Self>,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<ProxyHandle, Error> {
        udp.set_nonblocking(true).map_err(Error::UdpSocket)?;
        tcp.set_nonblocking(true).map_err(Error::TcpListener)?;
        let udp = Arc::new(UdpSocket::from_std(udp).map_err(Error::UdpSocket)?);
        let tcp = TcpListener::from_std(tcp).map_err(Error::TcpListener)?;
        let udp_local = udp.local_addr().map_err(Error::UdpSocket)?;
        let tcp_local = tcp.local_addr().map_err(Error::TcpListener)?;
        let (stop, stopped) = watch::channel(false);
        let udp_task = tokio::spawn(serve_udp(self.clone(), udp, stopped.clone()));
        let tcp_task = tokio::spawn(serve_tcp(self.clone(), tcp, stopped));
        Ok(ProxyHandle {
            stop,
            udp_task,
            tcp_task,
            udp_local,
            tcp_local,
        })
    }
}

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    stop: watch::Sender<bool>,
    udp_task: JoinHandle<()>,
    tcp_task: JoinHandle<()>,
    udp_local: SocketAddr,
    tcp_local: SocketAddr,
}

impl ProxyHandle {
    pub fn udp_addr(&self) -> SocketAddr {
        self.udp_local
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_local
    }

    /// Stops accepting queries and waits for the serving loops to end.
    /// Queries already being answered finish on their own.
    pub async fn stop(self) -> Result<(), Error> {
        let _ = self.stop.send(true);
        self.udp_task.await.map_err(|source| Error::Task {
            transport: "UDP",
            source,
        })?;
        self.tcp_task.await.map_err(|source| Error::Task {
            transport: "TCP",
            source,
        })
    }
}

/// Datagrams taken from the socket with one recvmmsg(2), and at most as many
/// replies sent with one sendmmsg(2): under load, one system call each way
/// per batch instead of per query, and one wake-up of the loop per batch.
const UDP_BATCH: usize = 32;

/// The largest UDP payload: a receive buffer never cuts a datagram short
/// (which would turn it into a malformed one).
const MAX_DATAGRAM: usize = 65_535;

thread_local! {
    /// The receive buffers of the UDP loops that run on this thread (all the
    /// proxies of a host agent share them): a loop borrows them from a
    /// receive to the end of its answers, with no await in between.
    static RECEIVE_BATCH: RefCell<ReceiveBatch> = RefCell::new(ReceiveBatch::new());
}

/// Buffers and headers for recvmmsg(2). The buffer is reserved, not zeroed:
/// only the pages datagrams are written into become resident (a query
/// touches the first page of its slot).
struct ReceiveBatch {
    buffer: Vec<u8>,
    peers: Vec<libc::sockaddr_storage>,
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

impl ReceiveBatch {
    fn new() -> Self {
        fn zeroed<T>() -> Vec<T> {
            // SAFETY: all-zero is a valid value of these plain C structs.
            (0..UDP_BATCH)
                .map(|_| unsafe { std::mem::zeroed() })
                .collect()
        }
        ReceiveBatch {
            buffer: Vec::with_capacity(UDP_BATCH * MAX_DATAGRAM),
            peers: zeroed(),
            iovecs: zeroed(),
            headers: zeroed(),
        }
    }

    /// Receives the datagrams waiting on `socket`, up to [`UDP_BATCH`],
    /// without blocking.
    fn receive(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let base = self.buffer.as_mut_ptr();
        for slot in 0..UDP_BATCH {
            self.iovecs[slot] = libc::iovec {
                // SAFETY: the slot lies within the buffer's capacity.
                iov_base: unsafe { base.add(slot * MAX_DATAGRAM) }.cast(),
                iov_len: MAX_DATAGRAM,
            };
            let header = &mut self.headers[slot];
            header.msg_hdr.msg_name = (&raw mut self.peers[slot]).cast();
            header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            header.msg_hdr.msg_iov = &raw mut self.iovecs[slot];
            header.msg_hdr.msg_iovlen = 1;
            header.msg_hdr.msg_control = std::ptr::null_mut();
            header.msg_hdr.msg_controllen = 0;
            header.msg_hdr.msg_flags = 0;
            header.msg_len = 0;
        }
        // SAFETY: every header points at a live iovec, a slot of the buffer
        // and a sockaddr_storage, all as long as their lengths say.
        let received = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.headers.as_mut_ptr(),
                UDP_BATCH as libc::c_uint,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        usize::try_from(received).map_err(|_| io::Error::last_os_error())
    }

    /// Datagram `slot` of the last [`ReceiveBatch::receive`], and its sender
    /// (`None` for an address family that is not IP, which cannot happen on
    /// an IP socket).
    fn datagram(&self, slot: usize) -> (&[u8], Option<SocketAddr>) {
        let header = &self.headers[slot];
        let length = (header.msg_len as usize).min(MAX_DATAGRAM);
        // SAFETY: the kernel wrote `msg_len` bytes at the slot's start.
        let packet = unsafe {
            std::slice::from_raw_parts(self.buffer.as_ptr().add(slot * MAX_DATAGRAM), length)
        };
        (packet, socket_addr(&self.peers[slot]))
    }
}

/// The IP address and port in a `sockaddr_storage` the kernel filled in.
fn socket_addr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: an AF_INET address is a sockaddr_in, which fits.
            let v4 = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in>() };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr)),
                u16::from_be(v4.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: an AF_INET6 address is a sockaddr_in6, which fits.
            let v6 = unsafe { &*std::ptr::from_ref(storage).cast::<libc::sockaddr_in6>() };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(v6.sin6_addr.s6_addr),
                u16::from_be(v6.sin6_port),
                v6.sin6_flowinfo,
                v6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

async fn serve_udp(proxy: Arc<Proxy>, socket: Arc<UdpSocket>, mut stopped: watch::Receiver<bool>) {
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_UDP_QUERIES));
    let mut replies: Vec<(Vec<u8>, SocketAddr)> = Vec::with_capacity(UDP_BATCH);
    loop {
        tokio::select! {
            _ = stopped.changed() => return,
            ready = socket.readable() => if let Err(error) = ready {
                // Only when the runtime shuts down.
                tracing::warn!(%error, "waiting on the DNS proxy's UDP socket");
                return;
            },
        }
        RECEIVE_BATCH.with_borrow_mut(|batch| {
            // A WouldBlock clears the socket's readiness, so the next
            // `readable` waits for new datagrams.
            let received = match socket.try_io(Interest::READABLE, || batch.receive(&socket)) {
                Ok(received) => received,
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => return,
                Err(error) => {
                    // Errors on an unconnected UDP socket are per datagram
                    // (e.g. a queued ICMP error); the socket stays usable.
                    proxy.problem_log.log(|suppressed| {
                        tracing::warn!(%error, suppressed, "receiving on the DNS proxy's UDP socket");
                    });
                    return;
                }
            };
            for slot in 0..received {
                if let (packet, Some(peer)) = batch.datagram(slot) {
                    answer_datagram(&proxy, &socket, &inflight, packet, peer, &mut replies);
                }
            }
        });
        send_udp_replies(&proxy, &socket, &mut replies);
    }
}

/// Answers one datagram: in place if that needs no waiting (its reply is
/// added to `replies`), else from a task.
fn answer_datagram(
    proxy: &Arc<Proxy>,
    socket: &Arc<UdpSocket>,
    inflight: &Arc<Semaphore>,
    packet: &[u8],
    peer: SocketAddr,
    replies: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    let Ok(permit) = inflight.clone().try_acquire_owned() else {
        bump(&proxy.counters.overloaded, 1);
        return;
    };
    let packet = packet.to_vec();
    let handler = proxy.clone();
    let mut answer = Box::pin(async move { handler.handle(&packet, Transport::Udp).await });
    // A query that needs no waiting (a cache hit whose elements the sink
    // already has in the sets, a refusal, a malformed packet) is answered
    // here, without a task and the wake-ups between threads it costs. One
    // that must wait (for the upstream, for the kernel) continues in a task:
    // polling it there registers the task's waker, the only one a future
    // must wake (the contract of `Future::poll`).
    let mut context = Context::from_waker(Waker::noop());
    match answer.as_mut().poll(&mut context) {
        Poll::Ready(reply) => {
            drop(permit);
            if let Some(reply) = reply {
                replies.push((reply, peer));
            }
        }
        Poll::Pending => {
            let (proxy, socket) = (proxy.clone(), socket.clone());
            tokio::spawn(async move {
                let _permit = permit;
                if let Some(reply) = answer.await {
                    send_udp_reply_later(&proxy, &socket, &reply, peer).await;
                }
            });
        }
    }
}

/// Sends `replies` (emptying it) with sendmmsg(2); those the socket's
/// buffer has no room for are sent from a task once it has.
fn send_udp_replies(
    proxy: &Arc<Proxy>,
    socket: &Arc<UdpSocket>,
    replies: &mut Vec<(Vec<u8>, SocketAddr)>,
) {
    let mut sent = 0;
    while sent < replies.len() {
        match send_batch(socket, &replies[sent..]) {
            Ok(count) => sent += count,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                for (reply, peer) in replies.drain(sent..) {
                    let (proxy, socket) = (proxy.clone(), socket.clone());
                    tokio::spawn(async move {
                        send_udp_reply_later(&proxy, &socket, &reply, peer).await;
                    });
                }
                break;
            }
            Err(error) => {
                // sendmmsg(2) reports an error of the first message it could
                // not send; it is dropped and the rest are sent.
                log_send_error(proxy, &error, replies[sent].1);
                sent += 1;
            }
        }
    }
    replies.clear();
}

/// One sendmmsg(2) of up to [`UDP_BATCH`] replies: how many were sent (at
/// least one), or the error of the first.
fn send_batch(socket: &UdpSocket, replies: &[(Vec<u8>, SocketAddr)]) -> io::Result<usize> {
    let replies = &replies[..replies.len().min(UDP_BATCH)];
    let peers: Vec<socket2::SockAddr> = replies
        .iter()
        .map(|(_, peer)| socket2::SockAddr::from(*peer))
        .collect();
    let mut iovecs: Vec<libc::iovec> = replies
        .iter()
        .map(|(reply, _)| libc::iovec {
            iov_base: reply.as_ptr().cast_mut().cast(),
            iov_len: reply.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .zip(&peers)
        .map(|(iovec, peer)| {
            // SAFETY: all-zero is a valid mmsghdr (no control data, no flags).
            let mut header: libc::mmsghdr = unsafe { std::mem::zeroed() };
            header.msg_hdr.msg_name = peer.as_ptr().cast_mut().cast();
            header.msg_hdr.msg_namelen = peer.len();
            header.msg_hdr.msg_iov = iovec;
            header.msg_hdr.msg_iovlen = 1;
            header
        })
        .collect();
    // SAFETY: each header points at a live address and a live iovec over
    // its reply; the kernel only reads them.
    let sent = unsafe {
        libc::sendmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            headers.len() as libc::c_uint,
            libc::MSG_DONTWAIT,
        )
    };
    match usize::try_from(sent) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::WriteZero,
            "sendmmsg sent nothing",
        )),
        Ok(sent) => Ok(sent),
        Err(_) => Err(io::Error::last_os_error()),
    }
}

async fn send_udp_reply_later(proxy: &Proxy, socket: &UdpSocket, reply: &[u8], peer: SocketAddr) {
    if let Err(error) = socket.send_to(reply, peer).await {
        log_send_error(proxy, &error, peer);
    }
}

fn log_send_error(proxy: &Proxy, error: &io::Error, peer: SocketAddr) {
    proxy.problem_log.log(|suppressed| {
        tracing::warn!(%error, %peer, suppressed, "sending a DNS answer over UDP");
    });
}

async fn serve_tcp(proxy: Arc<Proxy>, listener: TcpListener, mut stopped: watch::Receiver<bool>) {
    let connections = Arc::new(Semaphore::new(MAX_TCP_CONNECTIONS));
    loop {
        let stream = tokio::select! {
            _ = stopped.changed() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => stream,
                Err(error) => {
                    proxy.problem_log.log(|suppressed| {
                        tracing::warn!(%error, suppressed, "accepting a TCP connection on the DNS proxy");
                    });
                    // Out of file descriptors (EMFILE) fails every accept
                    // until a connection closes; do not spin meanwhile.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            drop(stream);
            continue;
        };
        let (proxy, stopped) = (proxy.clone(), stopped.clone());
        tokio::spawn(async move {
            serve_connection(proxy, stream, stopped).await;
            drop(permit);
        });
    }
}

/// One TCP connection: length-prefixed messages (RFC 1035 §4.2.2), possibly
/// pipelined and answered out of order, matched by id (RFC 7766 §6.2.1.1).
async fn serve_connection(
    proxy: Arc<Proxy>,
    stream: TcpStream,
    mut stopped: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let (mut reader, writer) = stream.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let inflight = Arc::new(Semaphore::new(MAX_INFLIGHT_PER_CONNECTION));
    loop {
        let frame = tokio::select! {
            _ = stopped.changed() => return,
            frame = tokio::time::timeout(proxy.config.tcp_idle_timeout, read_frame(&mut reader)) => frame,
        };
        // Idle timeout, end of stream or a broken connection: close it.
        let Ok(Ok(packet)) = frame else { return };
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let (proxy, writer) = (proxy.clone(), writer.clone());
        tokio::spawn(async move {
            if let Some(reply) = proxy.handle(&packet, Transport::Tcp).await {
                let _ = write_frame(&writer, &reply).await;
            }
            drop(permit);
        });
    }
}

async fn write_frame(
    writer: &tokio::sync::Mutex<OwnedWriteHalf>,
    message: &[u8],
) -> io::Result<()> {
    let length = u16::try_from(message.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "answer too long"))?;
    let mut framed = Vec::with_capacity(2 + message.len());
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(message);
    writer.lock().await.write_all(&framed).await
}

/// The cache entry a query may be answered from, if it is a plain one: class
/// IN and no CD bit (a client that disables checking wants the upstream's
/// raw view).
fn cache_key(query: &Message, name: &str) -> Option<CacheKey> {
    let question = &query.queries[0];
    if query.metadata.checking_disabled || question.query_type() == RecordType::ANY {
        return None;
    }
    Some(CacheKey {
        name: name.to_string(),
        record_type: question.query_type(),
        dnssec_ok: query.edns.as_ref().is_some_and(|e| e.flags().dnssec_ok),
    })
}

/// The query as sent upstream: a fresh random id (the client's may be
/// predictable; RFC 5452 §9.2), only the question, and EDNS reduced to what
/// is end to end. EDNS options are hop by hop or reveal the client (cookies,
/// RFC 7873 §5.4; client subnet, RFC 7871 §11; keepalive, RFC 7828; padding,
/// RFC 7830), so none is forwarded; the version and DO bit are kept and the
/// payload size is capped at [`UPSTREAM_EDNS_PAYLOAD`].
fn upstream_query(query: &Message) -> Message {
    let mut upstream = Message::new(random_u64() as u16, MessageType::Query, OpCode::Query);
    upstream.metadata.recursion_desired = query.metadata.recursion_desired;
    upstream.metadata.checking_disabled = query.metadata.checking_disabled;
    upstream.metadata.authentic_data = query.metadata.authentic_data;
    upstream.add_queries(query.queries.iter().cloned());
    if let Some(edns) = &query.edns {
        let mut clean = Edns::new();
        clean.set_max_payload(edns.max_payload().min(UPSTREAM_EDNS_PAYLOAD));
        clean.set_version(edns.version());
        clean.set_dnssec_ok(edns.flags().dnssec_ok);
        upstream.set_edns(clean);
    }
    upstream
}

/// A reply to `query` with no records: the query's id, opcode and question,
/// RD copied, RA set, and an OPT record if the query had one (RFC 6891
/// §6.1.1 requires it in the response).
fn reply_to(query: &Message, rcode: ResponseCode) -> Message {
    let mut reply = Message::response(query.metadata.id, query.metadata.op_code);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.checking_disabled = query.metadata.checking_disabled;
    reply.metadata.response_code = rcode;
    reply.add_queries(query.queries.iter().cloned());
    if let Some(edns) = &query.edns {
        reply.set_edns(reply_edns(edns));
    }
    reply
}

fn reply_edns(query_edns: &Edns) -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(UPSTREAM_EDNS_PAYLOAD);
    edns.set_dnssec_ok(query_edns.flags().dnssec_ok);
    edns
}

/// A cached answer dressed as the reply to `query`: its id, its question
/// (with the client's letter case, which 0x20-randomizing clients check),
/// its RD bit, and an OPT record only if it sent one.
fn cached_reply(query: &Message, cached: Message) -> Message {
    let mut reply = cached;
    reply.metadata.id = query.metadata.id;
    reply.metadata.message_type = MessageType::Response;
    reply.metadata.op_code = OpCode::Query;
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = false;
    reply.metadata.truncation = false;
    // The proxy does not validate DNSSEC itself, so it does not vouch for it.
    reply.metadata.authentic_data = false;
    reply.queries = query.queries.clone();
    reply.edns = query.edns.as_ref().map(reply_edns);
    reply
}

/// The reply template of a cached answer: the reply [`cached_reply`] gives
/// a query with the answer's own question, id 0, RD clear and no EDNS.
/// `None` (hits are then encoded in full) for an answer whose reply would
/// not be that plus the patches of [`ReplyTemplate::reply`]: one with a TSIG
/// record (its TTL is not lowered with the others) or an extended RCODE
/// (carried in the OPT record, RFC 6891 §6.1.3).
fn reply_template(cached: &Message) -> Option<ReplyTemplate> {
    if cached.signature.is_some() || cached.metadata.response_code.high() != 0 {
        return None;
    }
    let mut query = Message::new(0, MessageType::Query, OpCode::Query);
    query.add_queries(cached.queries.iter().cloned());
    ReplyTemplate::new(encode(&cached_reply(&query, cached.clone()))?)
}

/// The OPT record [`reply_edns`] encodes to in a reply with RCODE below 16:
/// root owner, type OPT (41), the UDP payload size as class, extended RCODE
/// and version 0, the DO bit as asked, no options (RFC 6891 §6.1.2-§6.1.3).
fn reply_opt(dnssec_ok: bool) -> [u8; 11] {
    let [high, low] = UPSTREAM_EDNS_PAYLOAD.to_be_bytes();
    let do_bit = if dnssec_ok { 0x80 } else { 0 };
    [0, 0, 41, high, low, 0, 0, do_bit, 0, 0, 0]
}

/// Whether two encoded questions ask the same: the same name but for
/// letter case (RFC 4343), and the same type and class.
fn same_question(a: &[u8], b: &[u8]) -> bool {
    // Label lengths are at most 63, below b'A', so case folding only ever
    // touches label bytes; type and class are compared exactly.
    a.len() == b.len()
        && a.len() >= 4
        && a[..a.len() - 4].eq_ignore_ascii_case(&b[..b.len() - 4])
        && a[a.len() - 4..] == b[b.len() - 4..]
}

/// A query in the form stub resolvers send, read straight from the wire
/// for the cache-hit path: QUERY opcode, one question of class IN with a
/// name of letters, digits, `-` and `_` and no compression, nothing but an
/// OPT record without options after it, CD clear, not ANY. Every packet it
/// accepts also decodes as a [`Message`] with the same meaning, and
/// `normalize_query_name` and `cache_key` give that message the same name
/// and key as here.
#[derive(Debug)]
struct PlainQuery<'a> {
    id: u16,
    recursion_desired: bool,
    /// The question as received: name, type and class.
    question: &'a [u8],
    key: CacheKey,
    edns: Option<PlainEdns>,
}

#[derive(Debug, Clone, Copy)]
struct PlainEdns {
    /// The UDP payload size the client accepts, at least 512 (RFC 6891 §6.2.3).
    max_payload: u16,
    dnssec_ok: bool,
}

impl<'a> PlainQuery<'a> {
    /// The longest name accepted here (the limit is 255 octets, RFC 1035
    /// §3.1; longer ones are left to the decoder, which rejects them).
    const MAX_NAME: usize = 250;

    fn parse(packet: &'a [u8]) -> Option<Self> {
        let header = packet.get(..12)?;
        let count = |at: usize| u16::from_be_bytes([header[at], header[at + 1]]);
        // QR (0x80) clear and OPCODE (0x78) QUERY; CD (0x10) clear.
        if header[2] & 0xF8 != 0 || header[3] & 0x10 != 0 {
            return None;
        }
        if count(4) != 1 || count(6) != 0 || count(8) != 0 || count(10) > 1 {
            return None;
        }
        let mut name = String::new();
        let mut at = 12;
        loop {
            let length = usize::from(*packet.get(at)?);
            if length == 0 {
                at += 1;
                break;
            }
            // Above 63: a compression pointer or a reserved label type.
            if length > 63 {
                return None;
            }
            let label = packet.get(at + 1..at + 1 + length)?;
            if !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
            {
                return None;
            }
            if !name.is_empty() {
                name.push('.');
            }
            name.extend(label.iter().map(|b| char::from(b.to_ascii_lowercase())));
            at += 1 + length;
        }
        if name.is_empty() || at - 12 > Self::MAX_NAME {
            return None;
        }
        let fixed = packet.get(at..at + 4)?;
        let record_type = u16::from_be_bytes([fixed[0], fixed[1]]);
        let class = u16::from_be_bytes([fixed[2], fixed[3]]);
        if class != u16::from(DNSClass::IN) || record_type == u16::from(RecordType::ANY) {
            return None;
        }
        let question = &packet[12..at + 4];
        at += 4;
        let edns = if count(10) == 1 {
            // Owner (root), TYPE, CLASS (payload), TTL (extended RCODE,
            // version, flags), RDLENGTH (no options).
            let opt = packet.get(at..at + 11)?;
            if opt[0] != 0
                || u16::from_be_bytes([opt[1], opt[2]]) != u16::from(RecordType::OPT)
                || opt[9..11] != [0, 0]
            {
                return None;
            }
            at += 11;
            Some(PlainEdns {
                max_payload: u16::from_be_bytes([opt[3], opt[4]]).max(512),
                dnssec_ok: opt[7] & 0x80 != 0,
            })
        } else {
            None
        };
        if at != packet.len() {
            return None;
        }
        Some(PlainQuery {
            id: u16::from_be_bytes([header[0], header[1]]),
            recursion_desired: header[2] & 0x01 != 0,
            question,
            key: CacheKey {
                name,
                record_type: RecordType::from(record_type),
                dnssec_ok: edns.is_some_and(|edns| edns.dnssec_ok),
            },
            edns,
        })
    }
}

fn encode(message: &Message) -> Option<Vec<u8>> {
    match message.to_vec() {
        Ok(wire) => Some(wire),
        Err(error) => {
            tracing::error!(%error, "encoding a DNS reply");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;
    use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};

    use super::*;

    fn query(name: &str, record_type: RecordType) -> Message {
        let mut message = Message::new(0x1234, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = true;
        message.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        message
    }

    #[test]
    fn upstream_query_strips_edns_options_and_caps_the_payload() {
        let mut client = query("x.org.", RecordType::A);
        let mut edns = Edns::new();
        edns.set_max_payload(4_096);
        edns.set_dnssec_ok(true);
        edns.options_mut()
            .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![1; 8]));
        client.set_edns(edns);
        let upstream = upstream_query(&client);
        let edns = upstream.edns.as_ref().expect("EDNS kept");
        assert_eq!(edns.max_payload(), UPSTREAM_EDNS_PAYLOAD);
        assert!(edns.flags().dnssec_ok);
        assert!(edns.options().as_ref().is_empty());
        assert_eq!(upstream.queries, client.queries);
        assert!(upstream.metadata.recursion_desired);
        // The id is random: over a few queries it is not always the client's.
        assert!((0..8).any(|_| upstream_query(&client).metadata.id != client.metadata.id));
    }

    #[test]
    fn upstream_query_without_edns_stays_without() {
        assert!(
            upstream_query(&query("x.org.", RecordType::A))
                .edns
                .is_none()
        );
    }

    #[test]
    fn replies_echo_the_question_and_carry_opt_only_if_asked() {
        let plain = query("X.org.", RecordType::AAAA);
        let reply = reply_to(&plain, ResponseCode::Refused);
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.metadata.message_type, MessageType::Response);
        assert_eq!(reply.metadata.response_code, ResponseCode::Refused);
        assert!(reply.queries[0].name().eq_case(plain.queries[0].name()));
        assert!(reply.edns.is_none());
        let mut with_edns = plain.clone();
        with_edns.set_edns(Edns::new());
        assert!(reply_to(&with_edns, ResponseCode::Refused).edns.is_some());
    }

    // ------------------------------------------------ the cache-hit path

    use hickory_proto::rr::rdata::{A, CNAME, SOA};
    use hickory_proto::rr::{RData, Record};

    use crate::dns::learn::RecordingSink;
    use crate::dns::names::tests::binding;
    use crate::policy::{Ports, Target};

    /// A proxy allowing `*.example.org`, with an upstream it never reaches
    /// in these tests (every query they send is a hit or refused).
    fn hit_proxy(sink: Arc<RecordingSink>) -> Proxy {
        let names = AllowedNames::new(vec![binding(
            Target::Wildcard("example.org".into()),
            Ports::Any,
        )]);
        Proxy::new(
            ProxyConfig::new(vec!["127.0.0.1:9".parse().unwrap()]),
            names,
            sink,
            Arc::new(AnswerCache::default()),
            Arc::new(AddressOrigins::default()),
        )
        .unwrap()
    }

    /// An upstream answer as the proxy caches it (decoded from the wire):
    /// a CNAME chain, `addresses` A records, an SOA in the authority
    /// section with a shorter TTL and an A record in the additional one.
    fn upstream_answer(qname: &str, addresses: u8) -> Message {
        let name = |text: &str| Name::from_ascii(text).unwrap();
        let mut answer = Message::response(0x4242, OpCode::Query);
        answer.metadata.recursion_desired = true;
        answer.metadata.recursion_available = true;
        answer.add_query(Query::query(name(qname), RecordType::A));
        answer.add_answer(Record::from_rdata(
            name(qname),
            600,
            RData::CNAME(CNAME(name("edge.example.org."))),
        ));
        for i in 0..addresses {
            answer.add_answer(Record::from_rdata(
                name("edge.example.org."),
                300,
                RData::A(A::new(192, 0, 2, i)),
            ));
        }
        answer.add_authority(Record::from_rdata(
            name("example.org."),
            40,
            RData::SOA(SOA::new(
                name("ns.example.org."),
                name("hostmaster.example.org."),
                1,
                7_200,
                900,
                1_209_600,
                60,
            )),
        ));
        answer.add_additional(Record::from_rdata(
            name("ns.example.org."),
            3_600,
            RData::A(A::new(198, 51, 100, 1)),
        ));
        Message::from_vec(&answer.to_vec().unwrap()).unwrap()
    }

    fn cache_answer(proxy: &Proxy, qname: &str, addresses: u8, dnssec_ok: bool, age: Duration) {
        let message = upstream_answer(qname, addresses);
        let extracted = extract_addresses(&message, &message.queries[0].name().clone(), 32);
        let ttl = answer_ttl(&message).unwrap();
        proxy.cache.insert(
            CacheKey {
                name: normalize_query_name(message.queries[0].name()).unwrap(),
                record_type: RecordType::A,
                dnssec_ok,
            },
            CachedAnswer::new(message, extracted.addresses, ttl, Instant::now() - age),
        );
    }

    fn client_query(id: u16, qname: &str, rd: bool, edns: Option<(u16, bool)>) -> Vec<u8> {
        let mut message = Message::new(id, MessageType::Query, OpCode::Query);
        message.metadata.recursion_desired = rd;
        message.add_query(Query::query(
            Name::from_ascii(qname).unwrap(),
            RecordType::A,
        ));
        if let Some((payload, dnssec_ok)) = edns {
            let mut edns = Edns::new();
            edns.set_max_payload(payload);
            edns.set_dnssec_ok(dnssec_ok);
            message.set_edns(edns);
        }
        message.to_vec().unwrap()
    }

    fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(future)
    }

    /// The reply of the hit path and of the full path to `packet`, and
    /// whether the hit path answered it (rather than passing it on).
    fn both_replies(
        proxy: &Proxy,
        packet: &[u8],
        transport: Transport,
    ) -> (Vec<u8>, Vec<u8>, bool) {
        block_on(async {
            let plain = PlainQuery::parse(packet).expect("a plain query");
            let fast = proxy.answer_hit(packet, plain, transport).await;
            let answered = fast.is_some();
            let fast = match fast {
                Some(reply) => reply,
                None => proxy.handle_message(packet, transport).await,
            };
            let full = proxy.handle_message(packet, transport).await;
            (fast.expect("an answer"), full.expect("an answer"), answered)
        })
    }

    #[test]
    fn a_patched_cached_reply_is_the_encoded_one() {
        let proxy = hit_proxy(Arc::new(RecordingSink::new()));
        // Cached 100 s ago: the SOA (TTL 40) is down to 0, the rest lowered.
        cache_answer(
            &proxy,
            "www.example.org.",
            3,
            false,
            Duration::from_secs(100),
        );
        cache_answer(&proxy, "www.example.org.", 3, true, Duration::from_secs(7));
        for (id, rd, edns) in [
            (0x0001, true, None),
            (0xbeef, false, None),
            (0x7777, true, Some((4_096, false))),
            (0x0000, true, Some((512, true))),
            (0xffff, false, Some((100, false))),
        ] {
            for transport in [Transport::Udp, Transport::Tcp] {
                let packet = client_query(id, "www.example.org.", rd, edns);
                let (fast, full, answered) = both_replies(&proxy, &packet, transport);
                assert!(answered, "answered from the template");
                assert_eq!(fast, full, "id {id:#x}, RD {rd}, EDNS {edns:?}");
            }
        }
        let reply = Message::from_vec(
            &both_replies(
                &proxy,
                &client_query(1, "www.example.org.", true, None),
                Transport::Udp,
            )
            .0,
        )
        .unwrap();
        let ttls: Vec<u32> = reply
            .answers
            .iter()
            .chain(&reply.authorities)
            .chain(&reply.additionals)
            .map(|r| r.ttl)
            .collect();
        assert_eq!(ttls, [500, 200, 200, 200, 0, 3_500]);
    }

    #[test]
    fn a_hit_in_other_letter_case_echoes_the_question_exactly() {
        let proxy = hit_proxy(Arc::new(RecordingSink::new()));
        cache_answer(&proxy, "www.example.org.", 2, false, Duration::from_secs(3));
        for qname in ["WWW.EXAMPLE.ORG.", "wWw.ExAmPlE.oRg.", "www.example.org"] {
            let packet = client_query(0x0a0b, qname, true, Some((1_232, false)));
            let (fast, full, answered) = both_replies(&proxy, &packet, Transport::Udp);
            assert!(answered);
            // RFC 1035 §7.3, RFC 5452 §9.1: the question comes back as sent.
            let question = &packet[12..packet.len() - 11];
            assert_eq!(&fast[12..12 + question.len()], question, "{qname}");
            // The rest is the same message; a name compressed against the
            // question reads the client's case, which DNS does not tell
            // apart (RFC 4343).
            let (fast, full) = (
                Message::from_vec(&fast).unwrap(),
                Message::from_vec(&full).unwrap(),
            );
            assert_eq!(fast, full, "{qname}");
            assert!(fast.queries[0].name().eq_case(full.queries[0].name()));
        }
    }

    #[test]
    fn an_answer_too_large_for_the_client_is_truncated_as_before() {
        let proxy = hit_proxy(Arc::new(RecordingSink::new()));
        // About 30 A records: more than 512 bytes, less than 1,232.
        cache_answer(&proxy, "big.example.org.", 30, false, Duration::ZERO);
        for (edns, transport, truncated) in [
            (None, Transport::Udp, true),
            (Some((512, false)), Transport::Udp, true),
            (Some((1_232, false)), Transport::Udp, false),
            (None, Transport::Tcp, false),
        ] {
            let packet = client_query(9, "big.example.org.", true, edns);
            let (fast, full, _) = both_replies(&proxy, &packet, transport);
            assert_eq!(fast, full, "EDNS {edns:?} over {transport:?}");
            assert_eq!(
                Message::from_vec(&fast).unwrap().metadata.truncation,
                truncated
            );
        }
        assert_eq!(
            proxy.stats().truncated,
            4,
            "two truncated replies, on each path"
        );
    }

    #[test]
    fn hits_count_and_learn_as_on_the_full_path() {
        let sink = Arc::new(RecordingSink::new());
        let proxy = hit_proxy(sink.clone());
        cache_answer(
            &proxy,
            "www.example.org.",
            2,
            false,
            Duration::from_secs(10),
        );
        let packet = client_query(5, "www.example.org.", true, None);
        let before = proxy.cache.stats();
        block_on(proxy.handle(&packet, Transport::Udp)).expect("an answer");
        let fast = (proxy.stats(), proxy.cache.stats(), sink.calls());
        block_on(proxy.handle_message(&packet, Transport::Udp)).expect("an answer");
        let stats = proxy.stats();
        assert_eq!((stats.udp_queries, stats.cache_hits), (1, 2));
        assert_eq!(fast.0.cache_hits, 1);
        assert_eq!(fast.1.hits - before.hits, 1);
        assert_eq!(proxy.cache.stats().hits - fast.1.hits, 1);
        assert_eq!(proxy.cache.stats().misses, before.misses, "no miss counted");
        // Both learned the same elements, with TTLs lowered by the age.
        let calls = sink.calls();
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].batch, calls[1].batch);
        assert_eq!(fast.2.len(), 1);
        assert_eq!(
            proxy
                .origins()
                .name_of("192.0.2.1".parse().unwrap())
                .as_deref(),
            Some("www.example.org")
        );
        // A failing sink gets SERVFAIL on both paths.
        sink.set_failing(true);
        let (fast, full, answered) = both_replies(&proxy, &packet, Transport::Udp);
        assert!(answered);
        assert_eq!(fast, full);
        assert_eq!(
            Message::from_vec(&fast).unwrap().metadata.response_code,
            ResponseCode::ServFail
        );
    }

    #[test]
    fn misses_and_refusals_are_left_to_the_full_path_uncounted() {
        let proxy = hit_proxy(Arc::new(RecordingSink::new()));
        let before = proxy.cache.stats();
        for qname in ["exfiltrate.example.", "example.org.", "new.example.org."] {
            let packet = client_query(1, qname, true, None);
            let plain = PlainQuery::parse(&packet).expect("a plain query");
            // A miss looks in the cache but counts nothing: `get` does.
            assert!(block_on(proxy.answer_hit(&packet, plain, Transport::Udp)).is_none());
        }
        assert_eq!(proxy.cache.stats(), before);
        assert_eq!(proxy.stats(), ProxyStats::default());
    }

    #[test]
    fn plain_queries_decode_to_the_same_question_and_key() {
        let mut packets = Vec::new();
        for qname in [
            "a.b.",
            "X-1_y.Example.ORG.",
            &format!("{}.org.", "a".repeat(63)),
        ] {
            for record_type in [
                RecordType::A,
                RecordType::AAAA,
                RecordType::HTTPS,
                RecordType::MX,
            ] {
                for edns in [None, Some((0, false)), Some((4_096, true))] {
                    let mut message = query(qname, record_type);
                    message.metadata.id = 0x5a5a;
                    if let Some((payload, dnssec_ok)) = edns {
                        let mut edns = Edns::new();
                        edns.set_max_payload(payload);
                        edns.set_dnssec_ok(dnssec_ok);
                        message.set_edns(edns);
                    }
                    packets.push(message.to_vec().unwrap());
                }
            }
        }
        for packet in &packets {
            let plain = PlainQuery::parse(packet).expect("a plain query");
            let message = Message::from_vec(packet).unwrap();
            let name = normalize_query_name(message.queries[0].name()).unwrap();
            assert_eq!(Some(&plain.key), cache_key(&message, &name).as_ref());
            assert_eq!(plain.id, message.metadata.id);
            assert_eq!(plain.recursion_desired, message.metadata.recursion_desired);
            assert_eq!(
                plain.edns.map(|e| (e.max_payload, e.dnssec_ok)),
                message
                    .edns
                    .as_ref()
                    .map(|e| (e.max_payload(), e.flags().dnssec_ok))
            );
            let mut question = Vec::new();
            let mut encoder = hickory_proto::serialize::binary::BinEncoder::new(&mut question);
            hickory_proto::serialize::binary::BinEncodable::emit(&message.queries[0], &mut encoder)
                .unwrap();
            assert_eq!(plain.question, question);
        }
    }

    #[test]
    fn anything_but_a_plain_query_takes_the_full_path() {
        let plain = query("www.example.org.", RecordType::A).to_vec().unwrap();
        assert!(PlainQuery::parse(&plain).is_some());
        let changed = |change: &dyn Fn(&mut Vec<u8>)| {
            let mut packet = plain.clone();
            change(&mut packet);
            PlainQuery::parse(&packet).map(|query| query.id)
        };
        assert!(changed(&|p| p[2] |= 0x80).is_none(), "a response");
        assert!(changed(&|p| p[2] |= 0x10).is_none(), "opcode STATUS");
        assert!(changed(&|p| p[3] |= 0x10).is_none(), "CD");
        assert!(changed(&|p| p[5] = 2).is_none(), "two questions");
        assert!(changed(&|p| p[7] = 1).is_none(), "an answer record");
        assert!(changed(&|p| p.push(0)).is_none(), "trailing bytes");
        assert!(
            changed(&|p| {
                p.pop();
            })
            .is_none(),
            "cut short"
        );
        assert!(changed(&|p| p[13] = b'.').is_none(), "a dot inside a label");
        assert!(changed(&|p| p[13] = 0xc3).is_none(), "a non-ASCII byte");
        assert!(
            changed(&|p| {
                let end = p.len();
                p[end - 1] = 3;
            })
            .is_none(),
            "class CH"
        );
        assert!(
            changed(&|p| {
                let end = p.len();
                p[end - 3] = 255;
            })
            .is_none(),
            "ANY"
        );
        // A compressed name: a pointer back into the header (nonsense, but
        // the decoder judges it, not this parser).
        let mut pointer = plain[..12].to_vec();
        pointer.extend_from_slice(&[0xc0, 0x0c, 0, 1, 0, 1]);
        assert!(PlainQuery::parse(&pointer).is_none());
        // EDNS with an option (a cookie) is decoded in full.
        let mut with_cookie = query("www.example.org.", RecordType::A);
        let mut edns = Edns::new();
        edns.options_mut()
            .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![1; 8]));
        with_cookie.set_edns(edns);
        assert!(PlainQuery::parse(&with_cookie.to_vec().unwrap()).is_none());
        // The root name is refused by the full path, never a hit.
        assert!(PlainQuery::parse(&query(".", RecordType::A).to_vec().unwrap()).is_none());
    }

    #[test]
    fn the_reply_opt_is_what_hickory_encodes() {
        for dnssec_ok in [false, true] {
            let mut reply = Message::response(0, OpCode::Query);
            let mut edns = Edns::new();
            edns.set_dnssec_ok(dnssec_ok);
            reply.set_edns(reply_edns(&edns));
            let wire = reply.to_vec().unwrap();
            assert_eq!(wire[12..], reply_opt(dnssec_ok));
        }
    }

    #[test]
    fn socket_addresses_read_back_from_sockaddr_storage() {
        for addr in ["192.0.2.7:53000", "[2001:db8::5]:1053", "[fe80::1%3]:9"] {
            let addr: SocketAddr = addr.parse().unwrap();
            let written = socket2::SockAddr::from(addr);
            // SAFETY: all-zero is a valid sockaddr_storage; the copy stays
            // within both (a sockaddr is at most a sockaddr_storage).
            let storage = unsafe {
                let mut storage: libc::sockaddr_storage = std::mem::zeroed();
                std::ptr::copy_nonoverlapping(
                    written.as_ptr().cast::<u8>(),
                    (&raw mut storage).cast::<u8>(),
                    written.len() as usize,
                );
                storage
            };
            assert_eq!(socket_addr(&storage), Some(addr));
        }
    }

    /// Many queries sent at once, from several clients on IPv4 and IPv6:
    /// they arrive in batches, and every client gets the answers to its own
    /// queries.
    #[test]
    fn a_burst_of_queries_is_answered_to_each_sender() {
        block_on(async {
            let proxy = Arc::new(hit_proxy(Arc::new(RecordingSink::new())));
            cache_answer(&proxy, "www.example.org.", 2, false, Duration::ZERO);
            for localhost in ["127.0.0.1:0", "[::1]:0"] {
                let udp = std::net::UdpSocket::bind(localhost).unwrap();
                let tcp = std::net::TcpListener::bind(localhost).unwrap();
                let handle = proxy.spawn(udp, tcp).unwrap();
                let clients: Vec<UdpSocket> = bound_clients(localhost, 4).await;
                const PER_CLIENT: u16 = 50;
                for (c, client) in clients.iter().enumerate() {
                    for i in 0..PER_CLIENT {
                        let id = (c as u16) * 1_000 + i;
                        let qname = if i % 5 == 0 {
                            "refused.example."
                        } else {
                            "WWW.example.org."
                        };
                        let packet = client_query(id, qname, true, None);
                        client.send_to(&packet, handle.udp_addr()).await.unwrap();
                    }
                }
                for (c, client) in clients.iter().enumerate() {
                    let mut ids = Vec::new();
                    let mut buffer = [0; 1_500];
                    while ids.len() < usize::from(PER_CLIENT) {
                        let (length, from) = tokio::time::timeout(
                            Duration::from_secs(5),
                            client.recv_from(&mut buffer),
                        )
                        .await
                        .expect("every query answered")
                        .unwrap();
                        assert_eq!(from, handle.udp_addr());
                        let reply = Message::from_vec(&buffer[..length]).unwrap();
                        let id = reply.metadata.id;
                        assert_eq!(
                            usize::from(id / 1_000),
                            c,
                            "an answer to this client's query"
                        );
                        let expected = if id.is_multiple_of(5) {
                            ResponseCode::Refused
                        } else {
                            ResponseCode::NoError
                        };
                        assert_eq!(reply.metadata.response_code, expected);
                        ids.push(id);
                    }
                    ids.sort_unstable();
                    ids.dedup();
                    assert_eq!(ids.len(), usize::from(PER_CLIENT));
                }
                handle.stop().await.unwrap();
            }
            let stats = proxy.stats();
            assert_eq!(stats.udp_queries, 2 * 4 * 50);
            assert_eq!(stats.refused, 2 * 4 * 10);
            assert_eq!(stats.cache_hits, 2 * 4 * 40);
        });
    }

    async fn bound_clients(localhost: &str, count: usize) -> Vec<UdpSocket> {
        let mut clients = Vec::new();
        for _ in 0..count {
            clients.push(UdpSocket::bind(localhost).await.unwrap());
        }
        clients
    }

    #[test]
    fn any_and_cd_queries_bypass_the_cache() {
        assert!(cache_key(&query("x.org.", RecordType::A), "x.org").is_some());
        assert!(cache_key(&query("x.org.", RecordType::ANY), "x.org").is_none());
        let mut cd = query("x.org.", RecordType::A);
        cd.metadata.checking_disabled = true;
        assert!(cache_key(&cd, "x.org").is_none());
    }
}
