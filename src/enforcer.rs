//! What every process that enforces a policy with a DNS proxy does for one
//! sandbox, shared by `netleash sidecar` (one sandbox) and `netleash agent`
//! (many): the compile options of the proxy, its sockets bound inside the
//! sandbox's namespace, which learned addresses a new policy keeps, and the
//! sandbox's denied-connection log.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use crate::denial_log::DenialWatch;
use crate::dns::learn::elements_for;
use crate::dns::names::AllowedNames;
use crate::dns::origins::AddressOrigins;
use crate::dns::proxy::{self, Proxy, ProxyHandle};
use crate::kernel::nflog::NflogListener;
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
    let addrs = [
        SocketAddr::new(IpAddr::from(Ipv4Addr::LOCALHOST), port),
        SocketAddr::new(IpAddr::from(Ipv6Addr::LOCALHOST), port),
    ];
    // All four sockets from one visit to the namespace: a container start
    // waits for this (the agent's Put), and each visit is a thread.
    let opened = netns::run_in(target, || {
        addrs.map(|addr| {
            std::net::UdpSocket::bind(addr)
                .and_then(|udp| Ok((udp, std::net::TcpListener::bind(addr)?)))
        })
    })
    .map_err(|source| Error::ProxySocket {
        addr: addrs[0],
        target: target.clone(),
        source,
    })?;
    let mut bound = Vec::new();
    for (addr, pair) in addrs.into_iter().zip(opened) {
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
    let started = NflogListener::open(target, group)
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
