//! A throwaway test world in real network namespaces, for the privileged
//! tests and `netleash demo`.
//!
//! ```text
//!   sandbox netns (nl-PID-N-sbx)             world netns (nl-PID-N-wld)
//!   veth-sbx 192.0.2.2/24          ◀──veth──▶ veth-wld 192.0.2.1/24
//!            2001:db8:1::2/64                          2001:db8:1::1/64
//!   default via 192.0.2.1 / 2001:db8:1::1    lo: every TEST_ADDRESSES entry, the
//!                                                metadata stand-ins and the resolvers
//! ```
//!
//! Invariants:
//! - nothing is ever created in the caller's namespace: the veth pair is
//!   created inside the sandbox namespace (`ip -n`) with its peer placed
//!   straight into the world namespace, and every other device is one of
//!   theirs; so no packet a test sends can leave the two namespaces;
//! - every address used is one the world owns: the documentation ranges of
//!   RFC 5737 (IPv4) and RFC 3849 (IPv6), plus the two cloud metadata
//!   addresses, which here are ordinary addresses on the world's `lo`;
//! - the servers are threads of this process that created their sockets after
//!   entering the world namespace (a socket stays in the namespace it was
//!   created in), so they serve the world whatever namespace the rest of the
//!   process is in;
//! - the calling thread never changes namespace: work "in the sandbox" runs on
//!   a thread that entered it;
//! - [`Testbed`] deletes exactly the namespaces it created, on drop too (and
//!   so when a test panics), and never one it did not create.

mod dns;
mod namespace;
pub mod probe;
mod servers;

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

pub use dns::{DnsReply, QueryLogEntry, Zone, ZoneRecord, query as dns_query};
pub use namespace::{netns_path, run_in_netns};
pub use probe::{Exchange, HttpResponse, Outcome, Verdict};
pub use servers::http_body;

/// The sandbox's address on the link, and the world's (its IPv4 gateway).
pub const SANDBOX_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
pub const WORLD_LINK_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The sandbox's IPv6 address on the link, and the world's (its IPv6 gateway).
pub const SANDBOX_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
pub const WORLD_LINK_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 1);

/// Destinations the world serves HTTP on ([`TCP_PORTS`]) and UDP echo on
/// ([`UDP_ECHO_PORT`]).
pub const TEST_ADDRESSES: [IpAddr; 6] = [
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 10)),
    IpAddr::V4(Ipv4Addr::new(198, 51, 100, 11)),
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 5)),
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 20)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x10)),
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x11)),
];

/// Stand-ins for the cloud metadata services (AWS IMDS over IPv4 and IPv6),
/// which the safety blocklist must keep out even when a policy allows them.
/// Inside the testbed they are ordinary addresses of the world, served like
/// [`TEST_ADDRESSES`].
pub const METADATA_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(169, 254, 169, 254));
pub const METADATA_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254));

/// The world's DNS servers (UDP and TCP port 53), answering from [`Zone`].
pub const RESOLVER_V4: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 53));
pub const RESOLVER_V6: IpAddr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0x100, 0, 0, 0, 0, 0x53));

/// Ports with an HTTP responder on every served address.
pub const TCP_PORTS: [u16; 3] = [80, 443, 8443];
/// Port of the UDP echo on every served address.
pub const UDP_ECHO_PORT: u16 = 443;
pub const DNS_PORT: u16 = 53;

/// A block of the benchmarking range (RFC 2544, 198.18.0.0/15) for tests that
/// need many distinct destinations: [`Testbed::add_world_range`] makes every
/// address in it one of the world's.
pub const BULK_RANGE_V4: &str = "198.18.0.0/22";

/// Interface names inside the namespaces. They never collide with anything:
/// each exists only in a namespace of its own testbed.
pub const SANDBOX_LINK: &str = "veth-sbx";
pub const WORLD_LINK: &str = "veth-wld";

/// A transport protocol, for DNS queries and for counting arrivals.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    /// For DNS, each message is prefixed with its two-byte length (RFC 1035 §4.2.2).
    Tcp,
}

/// Every address with an HTTP responder and a UDP echo: the test addresses
/// and the metadata stand-ins.
pub fn served_addresses() -> Vec<IpAddr> {
    let mut all = TEST_ADDRESSES.to_vec();
    all.extend([METADATA_V4, METADATA_V6]);
    all
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the testbed needs root (CAP_SYS_ADMIN to create network namespaces, \
         CAP_NET_ADMIN to configure them); run it as root, e.g. with sudo"
    )]
    NotRoot,
    #[error("the testbed needs the `ip` command of iproute2 (Debian: apt-get install iproute2)")]
    IpMissing(#[source] io::Error),
    #[error("cannot run `{command}`")]
    Spawn { command: String, source: io::Error },
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot enter the network namespace {path}")]
    EnterNetns { path: PathBuf, source: io::Error },
    #[error("cannot start a thread for network namespace {netns}")]
    Thread { netns: String, source: io::Error },
    #[error("cannot open {what} in the world namespace")]
    Bind { what: String, source: io::Error },
    #[error("unexpected error from {peer} ({stage})")]
    Io {
        peer: SocketAddr,
        stage: &'static str,
        source: io::Error,
    },
    #[error("invalid DNS name {name:?}")]
    DnsName {
        name: String,
        source: hickory_proto::ProtoError,
    },
    #[error("cannot encode a DNS query for {name:?}")]
    DnsEncode {
        name: String,
        source: hickory_proto::ProtoError,
    },
    #[error("malformed DNS response from {peer}")]
    DnsDecode {
        peer: SocketAddr,
        source: hickory_proto::serialize::binary::DecodeError,
    },
    #[error("DNS response from {peer} has id {received}, the query had {sent}")]
    DnsIdMismatch {
        peer: SocketAddr,
        sent: u16,
        received: u16,
    },
    #[error("the world's servers stopped with an error")]
    Servers(#[source] io::Error),
}

/// Where a testbed's namespaces get their unique names: one counter per process.
static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

/// The two namespaces, the link between them and the world's servers.
/// Dropping it stops the servers and deletes both namespaces.
pub struct Testbed {
    sandbox: String,
    world: String,
    /// The namespaces this testbed created, in creation order; the only ones
    /// it will ever delete.
    created: Vec<String>,
    zone: Zone,
    servers: Option<servers::Servers>,
}

impl Testbed {
    /// Build the topology and start the servers. Takes about 100 ms.
    pub fn new() -> Result<Testbed, Error> {
        require_root()?;
        require_ip()?;
        let counter = NEXT_TESTBED.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("nl-{}-{counter}", std::process::id());
        let mut testbed = Testbed {
            sandbox: format!("{prefix}-sbx"),
            world: format!("{prefix}-wld"),
            created: Vec::new(),
            zone: Zone::default(),
            servers: None,
        };
        // From here on, an early return drops `testbed`, which deletes what
        // was created so far.
        for name in [testbed.sandbox.clone(), testbed.world.clone()] {
            run_ip(&["netns", "add", &name], None)?;
            testbed.created.push(name);
        }
        testbed.configure_link()?;
        testbed.servers = Some(servers::Servers::start(
            &testbed.world,
            testbed.zone.clone(),
        )?);
        Ok(testbed)
    }

    fn configure_link(&self) -> Result<(), Error> {
        let (sbx, wld) = (&self.sandbox, &self.world);
        // The veth pair is born in the sandbox namespace and its peer in the
        // world namespace (`peer ... netns`): neither end ever exists in the
        // caller's namespace. `nodad` makes IPv6 addresses usable at once
        // instead of after duplicate address detection (RFC 4862 §5.4).
        let sandbox_link = format!(
            "link add {SANDBOX_LINK} type veth peer name {WORLD_LINK} netns {wld}\n\
             link set lo up\n\
             link set {SANDBOX_LINK} up\n\
             address add {SANDBOX_V4}/24 dev {SANDBOX_LINK}\n\
             address add {SANDBOX_V6}/64 dev {SANDBOX_LINK} nodad\n"
        );
        run_ip_batch(sbx, &sandbox_link)?;

        let mut world = format!(
            "link set lo up\n\
             link set {WORLD_LINK} up\n\
             address add {WORLD_LINK_V4}/24 dev {WORLD_LINK}\n\
             address add {WORLD_LINK_V6}/64 dev {WORLD_LINK} nodad\n"
        );
        // Host addresses on the world's loopback: the world takes packets for
        // them as local (and its servers can bind them). The sandbox reaches
        // them through its default route, so it only ever resolves the
        // gateway's link address, never theirs.
        for addr in served_addresses()
            .into_iter()
            .chain([RESOLVER_V4, RESOLVER_V6])
        {
            match addr {
                IpAddr::V4(v4) => world.push_str(&format!("address add {v4}/32 dev lo\n")),
                IpAddr::V6(v6) => world.push_str(&format!("address add {v6}/128 dev lo nodad\n")),
            }
        }
        run_ip_batch(wld, &world)?;

        // Routes last: the gateways must be on a link that is up on both ends.
        let routes = format!(
            "route add default via {WORLD_LINK_V4} dev {SANDBOX_LINK}\n\
             route add ::/0 via {WORLD_LINK_V6} dev {SANDBOX_LINK}\n"
        );
        run_ip_batch(sbx, &routes)
    }

    /// Make every address of `net` local to the world (a `local` route on its
    /// `lo`, the "AnyIP" form: no address per host is needed), so a listener
    /// on the unspecified address there accepts connections to any of them.
    /// The sandbox reaches them through its default route. Take ranges from
    /// [`BULK_RANGE_V4`] or the other documentation ranges only.
    pub fn add_world_range(&self, net: ipnet::IpNet) -> Result<(), Error> {
        run_ip_batch(&self.world, &format!("route add local {net} dev lo\n"))
    }

    /// A TCP listener bound to `addr` inside the world namespace (e.g.
    /// `0.0.0.0:PORT` for a range added with [`Testbed::add_world_range`]),
    /// with a deep accept queue. It stays in the world wherever it is used.
    pub fn world_tcp_listener(&self, addr: SocketAddr) -> Result<std::net::TcpListener, Error> {
        let bind = move || {
            let listener = std::net::TcpListener::bind(addr)?;
            servers::deepen_backlog(&listener)?;
            Ok(listener)
        };
        self.in_world(bind)?.map_err(|source| Error::Bind {
            what: format!("tcp {addr}"),
            source,
        })
    }

    /// The sandbox namespace's name (under /run/netns), for `--netns`.
    pub fn sandbox(&self) -> &str {
        &self.sandbox
    }

    /// The world namespace's name (under /run/netns).
    pub fn world(&self) -> &str {
        &self.world
    }

    /// The world's DNS zone; changes are visible to the next query.
    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Run `work` on a thread inside the sandbox namespace and return its
    /// result. A panic in `work` is resumed on the caller's thread.
    pub fn in_sandbox<T: Send, F: FnOnce() -> T + Send>(&self, work: F) -> Result<T, Error> {
        run_in_netns(&self.sandbox, work)
    }

    /// Run `work` on a thread inside the world namespace.
    pub fn in_world<T: Send, F: FnOnce() -> T + Send>(&self, work: F) -> Result<T, Error> {
        run_in_netns(&self.world, work)
    }

    /// A TCP connection attempt from the sandbox; see [`probe::tcp_connect`].
    pub fn tcp_connect(
        &self,
        addr: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Outcome, Error> {
        self.in_sandbox(|| probe::tcp_connect(SocketAddr::new(addr, port), timeout))?
    }

    /// An HTTP/1.0 GET from the sandbox; see [`probe::http_get`].
    pub fn http_get(
        &self,
        addr: IpAddr,
        port: u16,
        timeout: Duration,
    ) -> Result<Exchange<HttpResponse>, Error> {
        self.in_sandbox(|| probe::http_get(SocketAddr::new(addr, port), timeout))?
    }

    /// One UDP datagram from the sandbox and its echo; see [`probe::udp_exchange`].
    pub fn udp_exchange(
        &self,
        addr: IpAddr,
        port: u16,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<Exchange<Vec<u8>>, Error> {
        self.in_sandbox(|| probe::udp_exchange(SocketAddr::new(addr, port), payload, timeout))?
    }

    /// A DNS query from the sandbox; see [`dns::query`].
    pub fn dns_query(
        &self,
        server: IpAddr,
        name: &str,
        record_type: hickory_proto::rr::RecordType,
        transport: Transport,
        timeout: Duration,
    ) -> Result<Exchange<DnsReply>, Error> {
        let server = SocketAddr::new(server, DNS_PORT);
        self.in_sandbox(|| dns::query(server, name, record_type, transport, timeout))?
    }

    /// How many TCP connections the world accepted on `addr`, or UDP
    /// datagrams it received there, since the testbed started: proves that a
    /// blocked attempt never reached the world.
    pub fn arrivals(&self, transport: Transport, addr: SocketAddr) -> u64 {
        self.servers
            .as_ref()
            .map_or(0, |servers| servers.arrivals(transport, addr))
    }

    /// Stop the servers and delete the namespaces, reporting failures (drop
    /// does the same but can only print them).
    pub fn close(mut self) -> Result<(), Error> {
        self.teardown()
    }

    /// Stop the servers but leave both namespaces (and any ruleset in them)
    /// for inspection; returns (sandbox, world) names. The caller deletes
    /// them with `ip netns delete NAME`.
    pub fn keep(mut self) -> Result<(String, String), Error> {
        let stopped = self.servers.take().map(servers::Servers::stop).transpose();
        self.created.clear();
        stopped.map_err(Error::Servers)?;
        Ok((self.sandbox.clone(), self.world.clone()))
    }

    fn teardown(&mut self) -> Result<(), Error> {
        let stopped = self.servers.take().map(servers::Servers::stop).transpose();
        let mut first_error = stopped.err().map(Error::Servers);
        // Deleting the name unmounts /run/netns/NAME; the kernel frees the
        // namespace (and the veth pair with it) once nothing refers to it.
        while let Some(name) = self.created.pop() {
            if let Err(err) = run_ip(&["netns", "delete", &name], None) {
                first_error.get_or_insert(err);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if let Err(err) = self.teardown() {
            eprintln!(
                "netleash testbed: cleanup failed: {}",
                crate::cli::render_error(&err)
            );
        }
    }
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("sandbox", &self.sandbox)
            .field("world", &self.world)
            .finish()
    }
}

/// Fail with [`Error::NotRoot`] unless the effective user is root.
pub fn require_root() -> Result<(), Error> {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        Ok(())
    } else {
        Err(Error::NotRoot)
    }
}

fn require_ip() -> Result<(), Error> {
    match Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(_) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(Error::IpMissing(err)),
        Err(source) => Err(Error::Spawn {
            command: "ip -V".into(),
            source,
        }),
    }
}

fn run_ip_batch(netns: &str, commands: &str) -> Result<(), Error> {
    run_ip(&["-n", netns, "-batch", "-"], Some(commands))
}

/// Run `ip ARGS`, with `stdin` as its input, and fail with its stderr.
fn run_ip(args: &[&str], stdin: Option<&str>) -> Result<(), Error> {
    let output = run_command("ip", args, stdin)?;
    if output.status.success() {
        return Ok(());
    }
    let mut command = format!("ip {}", args.join(" "));
    if let Some(text) = stdin {
        command.push_str(&format!(" <<< {text:?}"));
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
    Err(Error::Command { command, stderr })
}

/// Run `program ARGS` with `stdin` as its input (or none) and collect its
/// output; the exit status is the caller's to judge.
pub fn run_command(program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, Error> {
    use std::io::Write as _;
    let spawn_error = |source| Error::Spawn {
        command: format!("{program} {}", args.join(" ")),
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).map_err(spawn_error)?;
    }
    child.wait_with_output().map_err(spawn_error)
}
