//! What every process that enforces a policy with a DNS proxy does for one
//! sandbox, shared by `netleash sidecar` (one sandbox) and `netleash agent`
//! (many): the compile options of the proxy, its sockets bound inside the
//! sandbox's namespace, which learned addresses a new policy keeps, and the
//! sandbox's denied-connection log.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::denial_log::DenialWatch;
use crate::dns::learn::elements_for;
use crate::dns::names::AllowedNames;
use crate::dns::origins::AddressOrigins;
use crate::dns::proxy::{self, Proxy, ProxyHandle};
use crate::kernel::nflog::NflogListener;
use crate::kernel::{self, ElementWriter, Session};
use crate::netns;
use crate::policy::ProxyOptions;
use crate::ruleset::Element;

/// Where the proxy listens inside the sandbox unless told otherwise.
pub const DEFAULT_PROXY_PORT: u16 = 1053;

/// The packet mark of the proxy's upstream sockets unless told otherwise:
/// "nl" in ASCII.
pub const DEFAULT_PROXY_MARK: u32 = 0x6e6c;

/// The conntrack zone of the proxy's upstream connections unless told
/// otherwise: "nl" in ASCII, like the mark.
pub const DEFAULT_PROXY_ZONE: u16 = 0x6e6c;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen for DNS on {addr} inside the {target}; is another proxy running there?")]
    ProxySocket {
        addr: SocketAddr,
        target: netns::Target,
        #[source]
        source: netns::Error,
    },
    #[error("cannot start the DNS proxy")]
    Proxy(#[source] proxy::Error),
    #[error("cannot enter the {target} to open the sandbox's sockets there")]
    Enter {
        target: netns::Target,
        #[source]
        source: netns::Error,
    },
}

/// The proxy's options with the default mark and zone: the sandbox's port-53
/// traffic is redirected to `port`, and only marked sockets reach `upstreams`
/// (none when the proxy asks from another namespace, as the agent does).
pub fn proxy_options(port: u16, upstreams: Vec<SocketAddr>) -> ProxyOptions {
    ProxyOptions {
        port,
        mark: DEFAULT_PROXY_MARK,
        upstreams,
        zone: DEFAULT_PROXY_ZONE,
    }
}

/// The proxy's UDP socket and TCP listener on 127.0.0.1 and ::1 inside the
/// sandbox. IPv4 is required; IPv6 is skipped if the namespace has no ::1
/// (IPv6 disabled), since then no IPv6 DNS can be sent either.
pub fn bind_proxy_sockets(
    target: &netns::Target,
    port: u16,
) -> Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>, Error> {
    // All four sockets from one visit to the namespace: a container start
    // waits for this (the agent's Put), and each visit is a thread.
    let opened = netns::run_in(target, || bind_proxy_sockets_here(port)).map_err(|source| {
        Error::ProxySocket {
            addr: proxy_addresses(port)[0],
            target: target.clone(),
            source,
        }
    })?;
    bound_proxy_sockets(target, port, opened)
}

/// What a sandbox's enforcement opens inside its namespace, all from one
/// visit to it ([`open_sandbox_sockets`]). Each socket stays in the
/// namespace it was created in (socket(7)), whichever thread uses it later.
pub struct SandboxSockets {
    /// The proxy's bound UDP socket and TCP listener per loopback address.
    pub listeners: Vec<(std::net::UdpSocket, std::net::TcpListener)>,
    /// The kernel session and the learned-element writer
    /// ([`crate::sandbox::Sandbox::with_sockets`]), or why they cannot be opened.
    pub netfilter: Result<(Session, ElementWriter), kernel::Error>,
    /// The denied-connection log's nflog subscription, or why it cannot be
    /// had (the log is then off: [`watch_denials`]).
    pub nflog: Result<NflogListener, kernel::Error>,
}

/// Opens everything a new sandbox needs inside `target` in one visit to the
/// namespace, made by the calling thread itself ([`netns::visit`]: no
/// thread is started; a container start waits for this): the proxy's
/// sockets on `port`, the kernel session and element writer, and the nflog
/// subscription to `nflog_group`. Blocks; from async code call it inside
/// `tokio::task::block_in_place`. Only the proxy's sockets fail the call;
/// the caller decides about the others. Binding the nflog group before the
/// rules are in force is harmless: nothing logs to it before their deny
/// chain does.
pub fn open_sandbox_sockets(
    target: &netns::Target,
    port: u16,
    nflog_group: u16,
) -> Result<SandboxSockets, Error> {
    let (proxy, netfilter, nflog) = netns::visit(target, || {
        let proxy = bind_proxy_sockets_here(port);
        let netfilter =
            Session::open_here().and_then(|session| Ok((session, ElementWriter::open_here()?)));
        (proxy, netfilter, NflogListener::open_here(nflog_group))
    })
    .map_err(|source| Error::Enter {
        target: target.clone(),
        source,
    })?;
    Ok(SandboxSockets {
        listeners: bound_proxy_sockets(target, port, proxy)?,
        netfilter,
        nflog,
    })
}

type ProxySocketPair = io::Result<(std::net::UdpSocket, std::net::TcpListener)>;

const fn proxy_addresses(port: u16) -> [SocketAddr; 2] {
    [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
    ]
}

/// Binds the proxy's pairs in the calling thread's namespace, IPv4 first.
fn bind_proxy_sockets_here(port: u16) -> [ProxySocketPair; 2] {
    proxy_addresses(port).map(|addr| {
        std::net::UdpSocket::bind(addr)
            .and_then(|udp| Ok((udp, std::net::TcpListener::bind(addr)?)))
    })
}

/// The pairs that were bound; an IPv6 pair that could not be (no ::1) is
/// left out, any other failure is the error.
fn bound_proxy_sockets(
    target: &netns::Target,
    port: u16,
    opened: [ProxySocketPair; 2],
) -> Result<Vec<(std::net::UdpSocket, std::net::TcpListener)>, Error> {
    let mut bound = Vec::new();
    for (addr, pair) in proxy_addresses(port).into_iter().zip(opened) {
        match pair {
            Ok(pair) => bound.push(pair),
            Err(source)
                if addr.is_ipv6()
                    && matches!(
                        source.raw_os_error(),
                        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
                    ) =>
            {
                tracing::warn!(%addr, error = %source, "no IPv6 loopback in the sandbox; the proxy serves IPv4 only");
            }
            Err(source) => {
                return Err(Error::ProxySocket {
                    addr,
                    target: target.clone(),
                    source: netns::Error::Socket {
                        path: target.path().unwrap_or_default(),
                        source,
                    },
                });
            }
        }
    }
    Ok(bound)
}

/// Starts `proxy` on each bound pair; returns the running handles.
pub fn serve_proxy(
    proxy: &Arc<Proxy>,
    listeners: Vec<(std::net::UdpSocket, std::net::TcpListener)>,
) -> Result<Vec<ProxyHandle>, Error> {
    listeners
        .into_iter()
        .map(|(udp, tcp)| proxy.spawn(udp, tcp).map_err(Error::Proxy))
        .collect()
}

/// For a learned address: the elements the policy of `names` gives it, by the
/// name it was last learned for; none if that name is unknown or no longer allowed.
pub fn still_allowed(
    origins: Arc<AddressOrigins>,
    names: AllowedNames,
) -> impl Fn(IpAddr) -> Vec<(String, Element)> + Send + 'static {
    move |addr| {
        let Some(name) = origins.name_of(addr) else {
            return Vec::new();
        };
        names
            .matching(&name)
            .into_iter()
            .flat_map(|binding| elements_for(binding, addr))
            .collect()
    }
}

/// Starts the denied-connection log of the sandbox in `target`: nflog
/// `group` read in that namespace, each denied destination named by the host
/// `origins` says its address was released for, lines carrying `sandbox`.
/// Call it once the ruleset is enforced (its `deny` chain logs to `group`).
///
/// If nflog cannot be read, the log is off: the returned watch says why
/// ([`DenialWatch::error`], also logged here) and the caller goes on
/// enforcing, since the rules deny the same packets with or without it.
pub fn start_denial_log(
    target: &netns::Target,
    group: u16,
    sandbox: String,
    origins: Arc<AddressOrigins>,
) -> DenialWatch {
    watch_denials(NflogListener::open(target, group), group, sandbox, origins)
}

/// [`start_denial_log`] with the nflog subscription already opened in the
/// namespace (or the reason it could not be: the log is then off).
pub fn watch_denials(
    listener: Result<NflogListener, kernel::Error>,
    group: u16,
    sandbox: String,
    origins: Arc<AddressOrigins>,
) -> DenialWatch {
    let started = listener
        .map_err(|error| crate::cli::render_error(&error))
        .and_then(|listener| {
            DenialWatch::start(listener, sandbox.clone(), origins).map_err(|error| {
                format!("cannot start the denied-connection log's thread: {error}")
            })
        });
    started.unwrap_or_else(|error| {
        tracing::error!(%sandbox, error, "the denied-connection log is off; the rules are enforced all the same");
        DenialWatch::off(group, error)
    })
}
