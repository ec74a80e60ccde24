//! Exchanging one query with the upstream resolvers: UDP with a timeout per
//! attempt and retries across the servers, then TCP for an answer that came
//! back truncated (RFC 1035 §4.2.1, RFC 7766 §5).

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType};
use hickory_resolver::net::runtime::iocompat::AsyncIoTokioAsStd;
use hickory_resolver::net::runtime::{
    RuntimeProvider, TokioHandle, TokioRuntimeProvider, TokioTime,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};

/// How long one UDP attempt waits for its answer. Upstream resolvers answer
/// from cache in about a millisecond and recurse in tens to hundreds; 2 s is
/// the usual stub timeout order (glibc waits 5 s, systemd-resolved 5 s,
/// dnsmasq forwards with 2-3 s retries) shortened because the client behind
/// the proxy runs its own timeout too.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(2);

/// UDP attempts per query, spread round-robin over the servers.
pub const UPSTREAM_ATTEMPTS: u32 = 3;

/// Receive buffer for UDP answers. The proxy never advertises more than
/// [`super::proxy::UPSTREAM_EDNS_PAYLOAD`] bytes upstream, so a larger
/// datagram is a misbehaving server; it is treated as truncated and asked
/// again over TCP.
const UDP_RECEIVE_BUFFER: usize = 4_096;

/// The DNS port (RFC 1035 §4.2).
pub const DNS_PORT: u16 = 53;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no upstream DNS server is configured")]
    NoServers,
    #[error(
        "no answer from the upstream DNS servers {servers:?} after {attempts} attempts of {timeout:?} each"
    )]
    NoAnswer {
        servers: Vec<SocketAddr>,
        attempts: u32,
        timeout: Duration,
    },
    #[error("exchanging a query with the upstream DNS server {server} over UDP")]
    Udp {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("retrying a truncated answer from the upstream DNS server {server} over TCP")]
    Tcp {
        server: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("encoding the query for the upstream DNS server")]
    Encode(#[source] hickory_proto::ProtoError),
    #[error("reading the upstream DNS servers from {path}")]
    ResolvConf {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} names no nameserver; give the upstream DNS server explicitly")]
    NoNameserver { path: PathBuf },
}

/// Opens the sockets upstream queries go out on. Without one they are
/// opened in the process's own network namespace; the sidecar gives one that
/// opens them inside the sandbox's namespace, marked as the proxy's own, so
/// the ruleset lets them through to the upstream unredirected.
pub trait UpstreamSockets: Send + Sync + std::fmt::Debug {
    /// A new UDP socket bound to `local`, for exchanges with `server`.
    fn udp(&self, local: SocketAddr, server: SocketAddr) -> io::Result<std::net::UdpSocket>;
    /// A new, unconnected TCP socket for a connection to `server`.
    fn tcp(&self, server: SocketAddr) -> io::Result<tokio::net::TcpSocket>;
}

/// hickory's tokio runtime with its sockets opened through an
/// [`UpstreamSockets`] when one is given, so the resolver loop's queries leave
/// from where the proxy's do (hickory opens a socket per query).
#[derive(Clone, Default)]
pub struct SocketsRuntime {
    tokio: TokioRuntimeProvider,
    opener: Option<Arc<dyn UpstreamSockets>>,
}

impl SocketsRuntime {
    pub fn new(opener: Option<Arc<dyn UpstreamSockets>>) -> Self {
        SocketsRuntime {
            tokio: TokioRuntimeProvider::default(),
            opener,
        }
    }
}

type Boxed<T> = Pin<Box<dyn Send + Future<Output = io::Result<T>>>>;

impl RuntimeProvider for SocketsRuntime {
    type Handle = TokioHandle;
    type Timer = TokioTime;
    type Udp = UdpSocket;
    type Tcp = AsyncIoTokioAsStd<TcpStream>;

    fn create_handle(&self) -> Self::Handle {
        self.tokio.create_handle()
    }

    fn connect_tcp(
        &self,
        server: SocketAddr,
        bind: Option<SocketAddr>,
        wait_for: Option<Duration>,
    ) -> Boxed<Self::Tcp> {
        let Some(opener) = self.opener.clone() else {
            return self.tokio.connect_tcp(server, bind, wait_for);
        };
        Box::pin(async move {
            let socket = opener.tcp(server)?;
            if let Some(bind) = bind {
                socket.bind(bind)?;
            }
            socket.set_nodelay(true)?;
            let wait_for = wait_for.unwrap_or(UPSTREAM_TIMEOUT);
            match tokio::time::timeout(wait_for, socket.connect(server)).await {
                Ok(connected) => connected.map(AsyncIoTokioAsStd),
                Err(_) => Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TCP connect timed out",
                )),
            }
        })
    }

    fn bind_udp(&self, local: SocketAddr, server: SocketAddr) -> Boxed<Self::Udp> {
        let Some(opener) = self.opener.clone() else {
            return self.tokio.bind_udp(local, server);
        };
        Box::pin(async move {
            let socket = opener.udp(local, server)?;
            socket.set_nonblocking(true)?;
            UdpSocket::from_std(socket)
        })
    }
}

/// The upstream resolvers and how to ask them. Clones share one socket pool.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub servers: Vec<SocketAddr>,
    pub timeout: Duration,
    pub attempts: u32,
    sockets: Arc<SocketPool>,
    opener: Option<Arc<dyn UpstreamSockets>>,
}

/// An answer from the upstream.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The answer exactly as the upstream sent it.
    pub wire: Vec<u8>,
    pub message: Message,
    pub server: SocketAddr,
    pub over_tcp: bool,
}

impl Upstream {
    pub fn new(servers: Vec<SocketAddr>) -> Self {
        Upstream {
            servers,
            timeout: UPSTREAM_TIMEOUT,
            attempts: UPSTREAM_ATTEMPTS,
            sockets: Arc::default(),
            opener: None,
        }
    }

    /// Opens every socket through `opener` from now on. Idle sockets opened
    /// before are dropped.
    pub fn with_sockets(mut self, opener: Arc<dyn UpstreamSockets>) -> Self {
        self.opener = Some(opener);
        self.sockets = Arc::default();
        self
    }

    /// Sends `query` and returns the first answer that belongs to it: same
    /// id, a response, same question (RFC 5452 §9.1). Anything else arriving
    /// on the socket is ignored, so an off-path spoofer has to guess the
    /// random id and source port. A truncated UDP answer is asked again over
    /// TCP from the same server.
    pub async fn exchange(&self, query: &Message) -> Result<Exchange, Error> {
        if self.servers.is_empty() {
            return Err(Error::NoServers);
        }
        let wire = query.to_vec().map_err(Error::Encode)?;
        let mut last_error = None;
        for attempt in 0..self.attempts.max(1) {
            let server = self.servers[attempt as usize % self.servers.len()];
            let deadline = Instant::now() + self.timeout;
            let opener = self.opener.as_deref();
            match udp_attempt(&self.sockets, opener, server, &wire, query, deadline).await {
                Ok(Some(answer)) if answer.truncated => {
                    let deadline = Instant::now() + self.timeout;
                    return tcp_exchange(opener, server, &wire, query, deadline)
                        .await
                        .map_err(|source| Error::Tcp { server, source });
                }
                Ok(Some(answer)) => {
                    return Ok(Exchange {
                        wire: answer.wire,
                        message: answer.message,
                        server,
                        over_tcp: false,
                    });
                }
                Ok(None) => {}
                Err(source) => last_error = Some(Error::Udp { server, source }),
            }
        }
        Err(last_error.unwrap_or(Error::NoAnswer {
            servers: self.servers.clone(),
            attempts: self.attempts.max(1),
            timeout: self.timeout,
        }))
    }
}

struct UdpAnswer {
    wire: Vec<u8>,
    message: Message,
    truncated: bool,
}

/// Idle sockets kept per upstream server for the next queries.
const MAX_IDLE_SOCKETS: usize = 32;

/// A socket is closed after this many queries, so the source ports in use
/// keep changing (RFC 5452 §9.2: source port randomization is the second
/// half of a query's entropy; a long-lived port would leave only the id).
const MAX_SOCKET_USES: u32 = 100;

/// Connected UDP sockets to the upstream servers, each on a random source
/// port chosen by the kernel, reused by one query at a time. Opening a socket
/// per query costs several system calls and a reactor registration, most of
/// the proxy's own latency; reuse keeps it off the hot path.
#[derive(Debug, Default)]
struct SocketPool {
    idle: Mutex<HashMap<SocketAddr, Vec<PooledSocket>>>,
}

#[derive(Debug)]
struct PooledSocket {
    socket: UdpSocket,
    uses: u32,
}

impl SocketPool {
    fn idle(&self) -> MutexGuard<'_, HashMap<SocketAddr, Vec<PooledSocket>>> {
        // Every critical section leaves the map consistent; poisoning is ignored.
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    async fn take(
        &self,
        opener: Option<&dyn UpstreamSockets>,
        server: SocketAddr,
    ) -> io::Result<PooledSocket> {
        if let Some(pooled) = self.idle().get_mut(&server).and_then(Vec::pop) {
            return Ok(pooled);
        }
        let socket = bind_udp(opener, server).await?;
        // A connected socket only receives datagrams from the server, and an
        // ICMP port unreachable surfaces as ECONNREFUSED instead of a timeout.
        socket.connect(server).await?;
        Ok(PooledSocket { socket, uses: 0 })
    }

    /// Returns a socket whose exchange completed cleanly. A socket that timed
    /// out or failed is dropped instead: a late answer could still arrive on it.
    fn give_back(&self, server: SocketAddr, pooled: PooledSocket) {
        if pooled.uses >= MAX_SOCKET_USES {
            return;
        }
        let mut idle = self.idle();
        let sockets = idle.entry(server).or_default();
        if sockets.len() < MAX_IDLE_SOCKETS {
            sockets.push(pooled);
        }
    }
}

/// A UDP socket for `server` on a kernel-chosen port of the unspecified
/// address, from `opener` if there is one.
async fn bind_udp(
    opener: Option<&dyn UpstreamSockets>,
    server: SocketAddr,
) -> io::Result<UdpSocket> {
    let local: SocketAddr = match server.ip() {
        IpAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        IpAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let Some(opener) = opener else {
        return UdpSocket::bind(local).await;
    };
    let socket = opener.udp(local, server)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// A TCP connection to `server`, through `opener` if there is one.
async fn connect_tcp(
    opener: Option<&dyn UpstreamSockets>,
    server: SocketAddr,
) -> io::Result<TcpStream> {
    match opener {
        None => TcpStream::connect(server).await,
        Some(opener) => opener.tcp(server)?.connect(server).await,
    }
}

/// One UDP attempt. `Ok(None)` when the deadline passes without a matching
/// answer.
async fn udp_attempt(
    pool: &SocketPool,
    opener: Option<&dyn UpstreamSockets>,
    server: SocketAddr,
    wire: &[u8],
    query: &Message,
    deadline: Instant,
) -> io::Result<Option<UdpAnswer>> {
    let mut pooled = pool.take(opener, server).await?;
    pooled.uses += 1;
    pooled.socket.send(wire).await?;
    let mut buffer = Vec::with_capacity(UDP_RECEIVE_BUFFER);
    loop {
        buffer.clear();
        let received = match timeout_at(deadline, pooled.socket.recv_buf(&mut buffer)).await {
            Err(_elapsed) => return Ok(None),
            Ok(received) => received?,
        };
        // Anything else (a late duplicate of an earlier answer on a reused
        // socket, a spoofing attempt) is skipped.
        let Some(message) = matching_answer(&buffer[..received], query) else {
            continue;
        };
        let truncated = message.metadata.truncation || received >= UDP_RECEIVE_BUFFER;
        pool.give_back(server, pooled);
        buffer.truncate(received);
        return Ok(Some(UdpAnswer {
            wire: buffer,
            message,
            truncated,
        }));
    }
}

/// One exchange over a new TCP connection, length-prefixed (RFC 1035 §4.2.2).
async fn tcp_exchange(
    opener: Option<&dyn UpstreamSockets>,
    server: SocketAddr,
    wire: &[u8],
    query: &Message,
    deadline: Instant,
) -> io::Result<Exchange> {
    let timed_out = || io::Error::new(io::ErrorKind::TimedOut, "no answer before the deadline");
    let mut stream = timeout_at(deadline, connect_tcp(opener, server))
        .await
        .map_err(|_| timed_out())??;
    stream.set_nodelay(true)?;
    let length = u16::try_from(wire.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "query too long"))?;
    let mut framed = Vec::with_capacity(2 + wire.len());
    framed.extend_from_slice(&length.to_be_bytes());
    framed.extend_from_slice(wire);
    timeout_at(deadline, stream.write_all(&framed))
        .await
        .map_err(|_| timed_out())??;
    loop {
        let answer = timeout_at(deadline, read_frame(&mut stream))
            .await
            .map_err(|_| timed_out())??;
        if let Some(message) = matching_answer(&answer, query) {
            return Ok(Exchange {
                wire: answer,
                message,
                server,
                over_tcp: true,
            });
        }
    }
}

/// Reads one length-prefixed DNS message (RFC 1035 §4.2.2).
pub(crate) async fn read_frame<R: AsyncReadExt + Unpin>(reader: &mut R) -> io::Result<Vec<u8>> {
    let mut length = [0u8; 2];
    reader.read_exact(&mut length).await?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(length))];
    reader.read_exact(&mut message).await?;
    Ok(message)
}

/// `wire` parsed, if it is the answer to `query`.
fn matching_answer(wire: &[u8], query: &Message) -> Option<Message> {
    let message = Message::from_vec(wire).ok()?;
    let matches = message.metadata.id == query.metadata.id
        && message.metadata.message_type == MessageType::Response
        && message.queries.len() == query.queries.len()
        && message
            .queries
            .iter()
            .zip(&query.queries)
            .all(|(got, sent)| {
                got.name().eq_ignore_root(sent.name())
                    && got.query_type() == sent.query_type()
                    && got.query_class() == sent.query_class()
            });
    matches.then_some(message)
}

/// The `nameserver` entries of a resolv.conf (resolv.conf(5)), on port 53.
pub fn servers_from_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ResolvConf {
        path: path.to_path_buf(),
        source,
    })?;
    let servers = parse_resolv_conf(&text);
    if servers.is_empty() {
        return Err(Error::NoNameserver {
            path: path.to_path_buf(),
        });
    }
    Ok(servers)
}

fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some("nameserver"))
                .then(|| words.next())
                .flatten()
        })
        // A scoped IPv6 address (`fe80::1%eth0`) cannot be reached from
        // another namespace by its interface name; it is skipped.
        .filter_map(|word| word.parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, DNS_PORT))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf_nameservers_in_order() {
        let text = "# generated\nsearch example\nnameserver 192.0.2.53\nnameserver  2001:db8::53 \n\
                    nameserver fe80::1%eth0\noptions ndots:2\n;nameserver 192.0.2.99\n";
        let servers = parse_resolv_conf(text);
        assert_eq!(
            servers,
            vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn resolv_conf_without_nameserver_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resolv.conf");
        std::fs::write(&path, "search example\n").unwrap();
        let error = servers_from_resolv_conf(&path).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("resolv.conf names no nameserver"),
            "{error}"
        );
        let missing = servers_from_resolv_conf(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(missing, Error::ResolvConf { .. }));
    }

    #[tokio::test]
    async fn no_servers_is_an_error() {
        let upstream = Upstream::new(Vec::new());
        assert!(matches!(
            upstream.exchange(&Message::query()).await,
            Err(Error::NoServers)
        ));
    }
}
