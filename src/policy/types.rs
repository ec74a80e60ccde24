//! The validated policy: what the input dialects turn into, and what the
//! compiler consumes. Nothing here knows about nftables.
//!
//! Invariants of a [`Policy`] (established by `policy::load` / `Policy::new`):
//! - every name is lowercase ASCII (IDN already punycode), has no trailing dot,
//!   labels of 1..=63 characters, total length <= 253 (RFC 1035 §2.3.4);
//! - `rules` holds at most one [`HostRule`] per [`Target`]; duplicates were
//!   merged (port sets united, `Ports::Any` absorbs, sources united);
//! - `rules` is sorted by `Target` so compiling is deterministic.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

/// Whether the sandbox's egress is open or allow-listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Mode {
    /// Everything is reachable except the safety blocklist.
    Unrestricted,
    /// Only what `rules` allows is reachable, and never the safety blocklist.
    Limited,
}

/// The input form the policy came from; kept for `explain` only, it never
/// changes what is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `{"type": "unrestricted"}` (or no `networking` at all).
    Unrestricted,
    /// `{"type": "limited", ...}` (Claude Managed Agents, Sandbox0, SandBase, Qoder).
    Limited,
    /// Qoder's `{"type": "allowed_hosts", "allowed_hosts": [...]}`.
    AllowedHosts,
}

/// A transport protocol a port restriction applies to.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One protocol/port pair a destination may be reached on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PortSpec {
    pub proto: Proto,
    pub port: u16,
}

/// Which ports of a destination are allowed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Ports {
    /// Every protocol and port (a bare name or address with no scheme or port).
    Any,
    /// Only these; never empty.
    Only(BTreeSet<PortSpec>),
}

impl Ports {
    /// `Ports::Only` of these (protocol, port) pairs. Callers pass at least one.
    pub fn only(specs: impl IntoIterator<Item = (Proto, u16)>) -> Ports {
        Ports::Only(
            specs
                .into_iter()
                .map(|(proto, port)| PortSpec { proto, port })
                .collect(),
        )
    }

    /// Union of two port restrictions: `Any` absorbs everything.
    pub fn union(&self, other: &Ports) -> Ports {
        match (self, other) {
            (Ports::Any, _) | (_, Ports::Any) => Ports::Any,
            (Ports::Only(a), Ports::Only(b)) => Ports::Only(a.union(b).cloned().collect()),
        }
    }

    /// Whether a connection on `proto`/`port` is inside this restriction.
    /// `port` is `None` for a check that names no port: only `Any` matches then.
    pub fn admits(&self, proto: Proto, port: Option<u16>) -> bool {
        match (self, port) {
            (Ports::Any, _) => true,
            (Ports::Only(_), None) => false,
            (Ports::Only(set), Some(port)) => set.contains(&PortSpec { proto, port }),
        }
    }
}

impl fmt::Display for Ports {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ports::Any => f.write_str("any"),
            Ports::Only(set) => {
                let parts: Vec<String> = set
                    .iter()
                    .map(|p| format!("{}/{}", p.port, p.proto))
                    .collect();
                f.write_str(&parts.join(", "))
            }
        }
    }
}

/// What a rule allows: a DNS name, a wildcard, or an address range.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Target {
    /// Exactly this name (normalized; see module invariants).
    Name(String),
    /// `*.suffix`: any name strictly below `suffix`, at any depth, never `suffix` itself.
    Wildcard(String),
    /// An address (as a /32 or /128) or a CIDR, host bits cleared.
    Net(IpNet),
}

impl Target {
    /// Whether `name` (normalized) is matched by this target as a name.
    pub fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Name(n) => n == name,
            Target::Wildcard(suffix) => {
                name.len() > suffix.len() + 1
                    && name.ends_with(suffix.as_str())
                    && name.as_bytes()[name.len() - suffix.len() - 1] == b'.'
            }
            Target::Net(_) => false,
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(n) => f.write_str(n),
            Target::Wildcard(s) => write!(f, "*.{s}"),
            Target::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())
            }
            Target::Net(net) => write!(f, "{net}"),
        }
    }
}

/// Why a rule is in the policy. A merged rule keeps every source.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// The user's `allowed_hosts` list.
    AllowedHosts,
    /// `allow_package_managers`, for this package manager (`pip`, `apt`, ...).
    PackageManager(String),
    /// `allow_mcp_servers`, for the MCP server of this name.
    Mcp(String),
    /// A platform host given with `--extra-host`.
    Extra,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::AllowedHosts => f.write_str("allowed_hosts"),
            Source::PackageManager(pm) => write!(f, "package managers: {pm}"),
            Source::Mcp(name) => write!(f, "mcp: {name}"),
            Source::Extra => f.write_str("extra"),
        }
    }
}

/// One allowed destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    pub target: Target,
    pub ports: Ports,
    /// Never empty.
    pub sources: BTreeSet<Source>,
    /// The entry as first written by the user or the expansion data, for `explain`.
    pub entry: String,
}

/// One address range of the safety blocklist, with the reason it is there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockEntry {
    pub net: IpNet,
    pub reason: String,
}

/// A validated, expanded, normalized policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub mode: Mode,
    pub dialect: Dialect,
    /// Allowed destinations; empty for `Mode::Unrestricted`. Sorted by target.
    pub rules: Vec<HostRule>,
    /// Checked before every allow rule, in both modes.
    pub blocklist: Vec<BlockEntry>,
    /// Non-fatal findings for the user (e.g. `allow_mcp_servers` with no server).
    pub warnings: Vec<String>,
}

/// Settings of the enforcement that do not come from the policy object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompileOptions {
    /// DNS servers the sandbox may query on port 53 (from resolv.conf or `--resolver`).
    pub resolvers: Vec<IpAddr>,
    /// nflog group denied packets are logged to.
    pub nflog_group: u16,
    /// The sidecar's filtering DNS proxy, if one serves the sandbox: then all
    /// of the sandbox's DNS is redirected to it, and only the proxy may talk
    /// to the upstream resolvers.
    pub proxy: Option<ProxyOptions>,
}

/// Where the sidecar's DNS proxy listens, and how its own queries are told
/// apart from the sandbox's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOptions {
    /// The port the proxy listens on at 127.0.0.1 and ::1 inside the sandbox.
    pub port: u16,
    /// The packet mark (SO_MARK) on the proxy's upstream sockets. Marked DNS
    /// is neither redirected nor denied; the sandbox's own processes cannot
    /// set it without CAP_NET_ADMIN.
    pub mark: u32,
    /// The upstream DNS servers the proxy queries, with their ports; DNS to
    /// them is allowed for marked packets only.
    pub upstreams: Vec<SocketAddr>,
    /// The conntrack zone of the proxy's upstream connections (never 0, the
    /// zone of everything else), so that no packet of the sandbox can ever
    /// join one of them: a sandbox socket that reuses a source port the proxy
    /// used gets a connection of its own, which is redirected like any other.
    pub zone: u16,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            resolvers: Vec::new(),
            nflog_group: DEFAULT_NFLOG_GROUP,
            proxy: None,
        }
    }
}

/// The nflog group denials go to unless `--nflog-group` says otherwise.
pub const DEFAULT_NFLOG_GROUP: u16 = 4_711;
