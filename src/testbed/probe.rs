//! Client probes. Each acts in the calling thread's network namespace: call
//! them through [`super::Testbed`] (which runs them on a thread in the
//! sandbox), or inside [`super::Testbed::in_sandbox`] for a loop.

use std::fmt;
use std::io::{self, Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use super::Error;

/// What a connection attempt ran into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// TCP: the handshake completed. UDP: a reply came back.
    Connected,
    /// ECONNREFUSED: a TCP reset, or ICMP port unreachable for UDP. An
    /// nftables `reject with tcp reset` in the sender's own output chain
    /// shows up here at once.
    Refused,
    /// An ICMP error other than port unreachable (an nftables `reject with
    /// icmp(x) admin-prohibited` arrives as EHOSTUNREACH, RFC 1812 §5.2.7.1
    /// and RFC 4443 §3.1), no route, or a local EACCES/EPERM.
    Unreachable { errno: i32 },
    /// Nothing came back before the timeout: a silent drop, not a reject.
    TimedOut,
}

impl Verdict {
    /// Whether the attempt was actively rejected, as netleash's deny rules do.
    pub fn is_rejected(&self) -> bool {
        matches!(self, Verdict::Refused | Verdict::Unreachable { .. })
    }

    /// The verdict an error stands for, or `None` if it says nothing about
    /// the path to the destination (a bug in the harness, not a verdict).
    fn of_error(err: &io::Error) -> Option<Verdict> {
        match err.raw_os_error() {
            // A reset that comes after the SYN (connect or a read sees
            // ECONNRESET) is a reset all the same.
            Some(libc::ECONNREFUSED | libc::ECONNRESET) => Some(Verdict::Refused),
            Some(errno @ (libc::EHOSTUNREACH | libc::ENETUNREACH | libc::EACCES | libc::EPERM)) => {
                Some(Verdict::Unreachable { errno })
            }
            Some(libc::ETIMEDOUT | libc::EAGAIN) => Some(Verdict::TimedOut),
            // std's connect_timeout and socket timeouts report expiry with no errno.
            None if matches!(
                err.kind(),
                io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
            ) =>
            {
                Some(Verdict::TimedOut)
            }
            _ => None,
        }
    }
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Verdict::Connected => f.write_str("connected"),
            Verdict::Refused => f.write_str("refused"),
            Verdict::Unreachable { errno } => {
                let name = match *errno {
                    libc::EHOSTUNREACH => "EHOSTUNREACH".to_string(),
                    libc::ENETUNREACH => "ENETUNREACH".to_string(),
                    libc::EACCES => "EACCES".to_string(),
                    libc::EPERM => "EPERM".to_string(),
                    other => format!("errno {other}"),
                };
                write!(f, "unreachable ({name})")
            }
            Verdict::TimedOut => f.write_str("timed out"),
        }
    }
}

/// A verdict and how long it took to arrive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    /// From the first packet to the verdict (TCP: the connect; UDP: the reply
    /// or error).
    pub elapsed: Duration,
}

impl Outcome {
    /// Whether the attempt was rejected (not timed out) within `limit`.
    pub fn rejected_within(&self, limit: Duration) -> bool {
        self.verdict.is_rejected() && self.elapsed < limit
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} after {:.1} ms",
            self.verdict,
            self.elapsed.as_secs_f64() * 1e3
        )
    }
}

/// An outcome and, when the destination answered, the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchange<T> {
    pub outcome: Outcome,
    /// `Some` exactly when `outcome.verdict` is `Connected`.
    pub reply: Option<T>,
}

impl<T> Exchange<T> {
    pub(super) fn failed(verdict: Verdict, started: Instant) -> Exchange<T> {
        Exchange {
            outcome: Outcome {
                verdict,
                elapsed: started.elapsed(),
            },
            reply: None,
        }
    }
}

/// The status and body of an HTTP response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    pub status: u16,
    pub body: String,
}

/// Try a TCP connection to `addr` and close it.
pub fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<Outcome, Error> {
    let started = Instant::now();
    let verdict = match tcp_connect_stream(addr, timeout)? {
        Ok(_stream) => Verdict::Connected,
        Err(verdict) => verdict,
    };
    Ok(Outcome {
        verdict,
        elapsed: started.elapsed(),
    })
}

/// Connect to `addr`: the stream, with `timeout` also bounding each of its
/// reads and writes, or the verdict that stopped it.
pub(super) fn tcp_connect_stream(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<Result<TcpStream, Verdict>, Error> {
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(stream) => {
            let set_timeouts = stream
                .set_read_timeout(Some(timeout))
                .and_then(|()| stream.set_write_timeout(Some(timeout)));
            set_timeouts.map_err(|source| Error::Io {
                peer: addr,
                stage: "set timeouts",
                source,
            })?;
            Ok(Ok(stream))
        }
        Err(err) => match Verdict::of_error(&err) {
            Some(verdict) => Ok(Err(verdict)),
            None => Err(Error::Io {
                peer: addr,
                stage: "connect",
                source: err,
            }),
        },
    }
}

/// `GET /` over HTTP/1.0; `timeout` bounds the connect and each read and write.
pub fn http_get(addr: SocketAddr, timeout: Duration) -> Result<Exchange<HttpResponse>, Error> {
    let started = Instant::now();
    let mut stream = match tcp_connect_stream(addr, timeout)? {
        Ok(stream) => stream,
        Err(verdict) => return Ok(Exchange::failed(verdict, started)),
    };
    let outcome = Outcome {
        verdict: Verdict::Connected,
        elapsed: started.elapsed(),
    };
    let request = format!("GET / HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut raw = Vec::new();
    let exchanged = stream
        .write_all(request.as_bytes())
        .map_err(|err| ("send request", err))
        .and_then(|()| {
            stream
                .read_to_end(&mut raw)
                .map_err(|err| ("read response", err))
        });
    // A reset or a silence after the handshake is a verdict too: the rules
    // may change under an open connection.
    if let Err((stage, err)) = exchanged {
        return match Verdict::of_error(&err) {
            Some(verdict) => Ok(Exchange::failed(verdict, started)),
            None => Err(Error::Io {
                peer: addr,
                stage,
                source: err,
            }),
        };
    }
    let malformed = || Error::Io {
        peer: addr,
        stage: "parse response",
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            String::from_utf8_lossy(&raw).into_owned(),
        ),
    };
    let text = std::str::from_utf8(&raw).map_err(|_| malformed())?;
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(malformed)?;
    // Status line: HTTP-version SP status-code SP reason (RFC 9112 §4).
    let status = head
        .lines()
        .next()
        .and_then(|line| line.split(' ').nth(1))
        .and_then(|code| code.parse().ok())
        .ok_or_else(malformed)?;
    Ok(Exchange {
        outcome,
        reply: Some(HttpResponse {
            status,
            body: body.to_string(),
        }),
    })
}

/// Send `payload` in one datagram from a connected UDP socket and wait for
/// one datagram back. A connected socket is what receives ICMP errors
/// (ip(7), udp(7)): port unreachable as ECONNREFUSED, the others as EHOSTUNREACH.
pub fn udp_exchange(
    addr: SocketAddr,
    payload: &[u8],
    timeout: Duration,
) -> Result<Exchange<Vec<u8>>, Error> {
    let io_error = |stage| {
        move |source| Error::Io {
            peer: addr,
            stage,
            source,
        }
    };
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local).map_err(io_error("bind"))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(io_error("set timeout"))?;
    socket.connect(addr).map_err(io_error("connect"))?;
    let started = Instant::now();
    let classify = |stage, err: io::Error| match Verdict::of_error(&err) {
        Some(verdict) => Ok(Exchange::failed(verdict, started)),
        None => Err(Error::Io {
            peer: addr,
            stage,
            source: err,
        }),
    };
    if let Err(err) = socket.send(payload) {
        return classify("send", err);
    }
    let mut buffer = vec![0; 65_536];
    match socket.recv(&mut buffer) {
        Ok(len) => {
            buffer.truncate(len);
            let outcome = Outcome {
                verdict: Verdict::Connected,
                elapsed: started.elapsed(),
            };
            Ok(Exchange {
                outcome,
                reply: Some(buffer),
            })
        }
        Err(err) => classify("receive", err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_verdicts() {
        let of = |errno| Verdict::of_error(&io::Error::from_raw_os_error(errno));
        assert_eq!(of(libc::ECONNREFUSED), Some(Verdict::Refused));
        assert_eq!(of(libc::ECONNRESET), Some(Verdict::Refused));
        assert_eq!(
            of(libc::EPERM),
            Some(Verdict::Unreachable { errno: libc::EPERM })
        );
        assert_eq!(
            of(libc::EHOSTUNREACH),
            Some(Verdict::Unreachable {
                errno: libc::EHOSTUNREACH
            })
        );
        assert_eq!(of(libc::ETIMEDOUT), Some(Verdict::TimedOut));
        assert_eq!(of(libc::EINVAL), None);
        let expired = io::Error::new(io::ErrorKind::TimedOut, "connection timed out");
        assert_eq!(Verdict::of_error(&expired), Some(Verdict::TimedOut));
    }

    #[test]
    fn only_a_fast_reject_counts_as_rejected_within() {
        let fast = Duration::from_millis(3);
        let refused = Outcome {
            verdict: Verdict::Refused,
            elapsed: fast,
        };
        assert!(refused.rejected_within(Duration::from_millis(100)));
        let slow = Outcome {
            verdict: Verdict::Refused,
            elapsed: Duration::from_millis(150),
        };
        assert!(!slow.rejected_within(Duration::from_millis(100)));
        let dropped = Outcome {
            verdict: Verdict::TimedOut,
            elapsed: fast,
        };
        assert!(!dropped.rejected_within(Duration::from_millis(100)));
        let connected = Outcome {
            verdict: Verdict::Connected,
            elapsed: fast,
        };
        assert!(!connected.rejected_within(Duration::from_millis(100)));
    }
}
