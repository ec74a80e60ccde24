//! The world's servers: an HTTP responder on every served address and TCP
//! port, a UDP echo, and the DNS server. One thread enters the world
//! namespace, opens every socket there, and multiplexes them with poll(2);
//! each accepted TCP connection gets a short-lived thread of its own so a
//! slow client never stalls the others.

use std::collections::HashMap;
use std::io::{self, Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, mpsc};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::dns::{Zone, read_framed};
use super::namespace::{enter, netns_path};
use super::{DNS_PORT, Error, RESOLVER_V4, RESOLVER_V6, TCP_PORTS, Transport, UDP_ECHO_PORT};

/// How long a connection handler waits for its client before giving up.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(2);
/// The accept queue of every TCP listener; see [`deepen_backlog`].
const ACCEPT_BACKLOG: libc::c_int = 4096;
/// The most of an HTTP request head the responder reads.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

type Arrivals = Arc<Mutex<HashMap<(Transport, SocketAddr), u64>>>;

enum Listener {
    Http(TcpListener),
    Echo(UdpSocket),
    DnsUdp(UdpSocket),
    DnsTcp(TcpListener),
}

impl Listener {
    fn fd(&self) -> RawFd {
        match self {
            Listener::Http(socket) | Listener::DnsTcp(socket) => socket.as_raw_fd(),
            Listener::Echo(socket) | Listener::DnsUdp(socket) => socket.as_raw_fd(),
        }
    }
}

/// The running servers; [`Servers::stop`] ends them.
pub(super) struct Servers {
    /// Closing our end wakes the server thread's poll (POLLHUP) and ends it.
    stop: UnixStream,
    thread: JoinHandle<io::Result<()>>,
    arrivals: Arrivals,
}

impl Servers {
    /// Open every socket inside the namespace `world` and serve them. Returns
    /// once every socket is bound, or with the first bind error.
    pub(super) fn start(world: &str, zone: Zone) -> Result<Servers, Error> {
        let (stop, stop_seen) = UnixStream::pair().map_err(|source| Error::Bind {
            what: "a stop socket pair".into(),
            source,
        })?;
        let arrivals = Arrivals::default();
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let path = netns_path(world);
        let thread_arrivals = Arc::clone(&arrivals);
        let thread = thread::Builder::new()
            .name(format!("{world}-servers"))
            .spawn(move || {
                let listeners = match enter(&path).and_then(|()| bind_all()) {
                    Ok(listeners) => listeners,
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return Ok(());
                    }
                };
                let _ = ready_tx.send(Ok(()));
                serve(&listeners, &stop_seen, &zone, &thread_arrivals)
            })
            .map_err(|source| Error::Thread {
                netns: world.to_string(),
                source,
            })?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(Servers {
                stop,
                thread,
                arrivals,
            }),
            Ok(Err(err)) => {
                let _ = thread.join();
                Err(err)
            }
            // The thread ended without a word: it panicked.
            Err(_) => match thread.join() {
                Err(panic) => std::panic::resume_unwind(panic),
                Ok(_) => unreachable!("the server thread reports readiness before it returns"),
            },
        }
    }

    pub(super) fn arrivals(&self, transport: Transport, addr: SocketAddr) -> u64 {
        let arrivals = self
            .arrivals
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        arrivals.get(&(transport, addr)).copied().unwrap_or(0)
    }

    /// Stop serving and close every listening socket.
    pub(super) fn stop(self) -> io::Result<()> {
        drop(self.stop);
        match self.thread.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}

/// Bind every server socket; the calling thread is in the world namespace.
fn bind_all() -> Result<Vec<Listener>, Error> {
    let bind_error = |what: String| move |source| Error::Bind { what, source };
    let mut listeners = Vec::new();
    for addr in super::served_addresses() {
        for port in TCP_PORTS {
            let at = SocketAddr::new(addr, port);
            let listener = TcpListener::bind(at).map_err(bind_error(format!("tcp {at}")))?;
            listeners.push(Listener::Http(listener));
        }
        let at = SocketAddr::new(addr, UDP_ECHO_PORT);
        listeners.push(Listener::Echo(
            UdpSocket::bind(at).map_err(bind_error(format!("udp {at}")))?,
        ));
    }
    for addr in [RESOLVER_V4, RESOLVER_V6] {
        let at = SocketAddr::new(addr, DNS_PORT);
        listeners.push(Listener::DnsUdp(
            UdpSocket::bind(at).map_err(bind_error(format!("udp {at}")))?,
        ));
        listeners.push(Listener::DnsTcp(
            TcpListener::bind(at).map_err(bind_error(format!("tcp {at}")))?,
        ));
    }
    for listener in &listeners {
        if let Listener::Http(socket) | Listener::DnsTcp(socket) = listener {
            deepen_backlog(socket).map_err(bind_error(format!(
                "a deeper accept queue for {:?}",
                socket.local_addr()
            )))?;
        }
        let nonblocking = match listener {
            Listener::Http(socket) | Listener::DnsTcp(socket) => socket.set_nonblocking(true),
            Listener::Echo(socket) | Listener::DnsUdp(socket) => socket.set_nonblocking(true),
        };
        nonblocking.map_err(bind_error("a non-blocking listener".into()))?;
    }
    Ok(listeners)
}

/// Let up to [`ACCEPT_BACKLOG`] connections wait for accept(2). std listens
/// with a backlog of 128; a client that connects and closes in a tight loop
/// (the atomic re-apply test) completes handshakes in the kernel faster than
/// this thread accepts them when it is scheduled out for a moment, and once the
/// queue is full the world silently drops SYNs (TcpExtListenOverflows), which a
/// probe would read as a timeout.
pub(super) fn deepen_backlog(listener: &TcpListener) -> io::Result<()> {
    // SAFETY: listen(2) on a descriptor owned by `listener`, which is already
    // listening; calling it again only changes the backlog (Linux caps it at
    // net.core.somaxconn, 4096 by default in a new namespace).
    let rc = unsafe { libc::listen(listener.as_raw_fd(), ACCEPT_BACKLOG) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Serve until `stop_seen` becomes readable or hangs up.
fn serve(
    listeners: &[Listener],
    stop_seen: &UnixStream,
    zone: &Zone,
    arrivals: &Arrivals,
) -> io::Result<()> {
    let mut fds: Vec<libc::pollfd> = std::iter::once(stop_seen.as_raw_fd())
        .chain(listeners.iter().map(Listener::fd))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `fds` is a live, exclusively borrowed array of `fds.len()`
        // pollfd structs, which poll(2) reads and whose `revents` it writes;
        // every descriptor in it is owned by `stop_seen` or `listeners`, which
        // outlive this call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if ready < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        if fds[0].revents != 0 {
            return Ok(());
        }
        for (pollfd, listener) in fds[1..].iter_mut().zip(listeners) {
            if std::mem::take(&mut pollfd.revents) != 0 {
                drain(listener, zone, arrivals);
            }
        }
    }
}

fn count(arrivals: &Arrivals, transport: Transport, at: SocketAddr) {
    let mut arrivals = arrivals
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    *arrivals.entry((transport, at)).or_default() += 1;
}

/// Handle everything pending on `listener` without blocking. Errors of one
/// client (a reset before accept, a full send buffer) never stop the server.
fn drain(listener: &Listener, zone: &Zone, arrivals: &Arrivals) {
    let mut datagram = vec![0; 65_536];
    loop {
        match listener {
            Listener::Http(socket) | Listener::DnsTcp(socket) => {
                let Ok((stream, _peer)) = socket.accept() else {
                    return;
                };
                let Ok(local) = stream.local_addr() else {
                    continue;
                };
                count(arrivals, Transport::Tcp, local);
                let zone = zone.clone();
                let is_dns = matches!(listener, Listener::DnsTcp(_));
                let _ = thread::Builder::new()
                    .name(format!("conn-{local}"))
                    .spawn(move || {
                        // Linux does not pass O_NONBLOCK from listener to accepted
                        // socket (accept(2)), but say so rather than rely on it.
                        let _ = stream.set_nonblocking(false);
                        let _ = stream.set_read_timeout(Some(CLIENT_TIMEOUT));
                        let _ = stream.set_write_timeout(Some(CLIENT_TIMEOUT));
                        if is_dns {
                            serve_dns_tcp(stream, &zone)
                        } else {
                            serve_http(stream, local)
                        }
                    });
            }
            Listener::Echo(socket) | Listener::DnsUdp(socket) => {
                let Ok((len, peer)) = socket.recv_from(&mut datagram) else {
                    return;
                };
                let Ok(local) = socket.local_addr() else {
                    continue;
                };
                count(arrivals, Transport::Udp, local);
                let reply = match listener {
                    Listener::DnsUdp(_) => zone.answer(&datagram[..len], peer),
                    _ => Some(datagram[..len].to_vec()),
                };
                if let Some(reply) = reply {
                    let _ = socket.send_to(&reply, peer);
                }
            }
        }
    }
}

/// The body of every HTTP response: names the address and port that
/// answered, so a test can tell which server it reached.
pub fn http_body(local: SocketAddr) -> String {
    format!(
        "netleash testbed world: {} port {}\n",
        local.ip(),
        local.port()
    )
}

fn serve_http(mut stream: TcpStream, local: SocketAddr) {
    // Read the request head, up to its empty line (RFC 9112 §2.1). A client
    // that closes first (a bare connection probe) gets nothing.
    let mut head = Vec::new();
    let mut buffer = [0; 2048];
    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => return,
            Ok(len) => head.extend_from_slice(&buffer[..len]),
        }
        if head.len() > MAX_REQUEST_HEAD {
            break;
        }
    }
    let body = http_body(local);
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
}

/// Answer length-prefixed queries until the client closes (RFC 7766 §6.2.1
/// allows several queries on one connection).
fn serve_dns_tcp(mut stream: TcpStream, zone: &Zone) {
    let Ok(peer) = stream.peer_addr() else { return };
    while let Ok(request) = read_framed(&mut stream) {
        let Some(response) = zone.answer(&request, peer) else {
            return;
        };
        let mut framed = (response.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&response);
        if stream.write_all(&framed).is_err() {
            return;
        }
    }
}
