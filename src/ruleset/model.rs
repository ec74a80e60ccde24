//! The ruleset model: a complete description of the `inet netleash` table,
//! produced by the pure compiler and consumed by the renderers (nft text,
//! libnftables JSON), the evaluator behind `check`, and the kernel module
//! (one nftnl batch). Nothing here knows about netlink.
//!
//! Invariants (established by `ruleset::compile`):
//! - set names are unique; every `Match` names a set of this ruleset whose key
//!   fits the match (`Addr` for `DaddrInSet`, `AddrProtoPort` for `DaddrProtoPortInSet`);
//! - elements of an interval set never overlap (the kernel rejects overlapping
//!   intervals) and are sorted; sets without the interval flag only hold
//!   single addresses (/32 or /128);
//! - chains that are jumped to are declared before the chains that jump to them;
//! - rule ids are unique across the ruleset and stable across compiles, so
//!   `check` can name the rule that decided and the kernel can name a failing rule.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::policy::{Mode, Ports, Proto, Source, Target};

/// The one table netleash owns. It never reads or writes any other table.
pub const TABLE_NAME: &str = "netleash";

/// Address family of a set key or an address match.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }
}

/// The key type of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SetKey {
    /// `ipv4_addr` / `ipv6_addr`.
    Addr(Family),
    /// `ipv4_addr . inet_proto . inet_service` (or the ipv6 form).
    AddrProtoPort(Family),
}

impl SetKey {
    pub fn family(&self) -> Family {
        match self {
            SetKey::Addr(f) | SetKey::AddrProtoPort(f) => *f,
        }
    }
}

/// What a set is for; decides how `check` and the DNS layer treat it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum SetRole {
    /// Safety blocklist (static, interval).
    Blocklist,
    /// DNS servers the sandbox may query (static).
    Resolvers,
    /// Address literals and CIDRs from the policy (static, interval).
    StaticAllow,
    /// Addresses learned from DNS answers for allowed names (timeout, filled at run time).
    DnsAllow,
}

/// One element of a set. In an interval set an `IpNet` is a range; elsewhere
/// it is always a single address.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Element {
    Addr(IpNet),
    AddrProtoPort(IpNet, Proto, u16),
}

impl Element {
    pub fn net(&self) -> IpNet {
        match self {
            Element::Addr(net) | Element::AddrProtoPort(net, _, _) => *net,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Set {
    pub name: String,
    pub key: SetKey,
    pub role: SetRole,
    /// `flags interval`: elements are ranges. An interval element must always be
    /// sent to the kernel with its end, or it covers everything above its start.
    pub interval: bool,
    /// `flags timeout`: elements may carry a timeout and expire.
    pub timeout: bool,
    /// Static elements, sorted, non-overlapping.
    pub elements: Vec<Element>,
}

/// Netfilter hook of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Hook {
    Output,
    Forward,
    /// Only for [`ChainKind::Raw`] chains (the proxy's conntrack zone of replies).
    Prerouting,
}

/// Verdict used as a base chain's policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainPolicy {
    Accept,
    Drop,
}

/// The type of a base chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChainKind {
    /// `type filter`: accepts, rejects and drops.
    Filter,
    /// `type nat`: rewrites addresses of a connection's first packet
    /// (the DNS redirect to the sidecar's proxy); never filters.
    Nat,
    /// `type filter` at the raw priority (-300), before conntrack (-200):
    /// only sets conntrack metadata (the proxy's conntrack zone); never filters.
    Raw,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BaseChain {
    pub kind: ChainKind,
    pub hook: Hook,
    /// `filter` priority is 0.
    pub priority: i32,
    pub policy: ChainPolicy,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Chain {
    pub name: String,
    /// `None` for a regular chain that is only jumped to.
    pub base: Option<BaseChain>,
    pub rules: Vec<Rule>,
}

/// A packet condition. All matches of a rule must hold.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Match {
    /// `oif "lo"`: the packet leaves through the loopback interface.
    OifLoopback,
    /// `ct state established,related`.
    CtEstablishedRelated,
    /// `icmpv6 type { ... }` (implies `meta l4proto ipv6-icmp`); ICMPv6 type numbers.
    Icmpv6Types(Vec<u8>),
    /// `meta l4proto { tcp, udp }`.
    L4ProtoIn(Vec<Proto>),
    /// `th dport { ... }`; only after an `L4ProtoIn` match.
    DportIn(Vec<u16>),
    /// `ip daddr @set` / `ip6 daddr @set` (implies `meta nfproto`).
    DaddrInSet { family: Family, set: String },
    /// `ip daddr . meta l4proto . th dport @set` (ipv6 form for V6).
    DaddrProtoPortInSet { family: Family, set: String },
    /// `ip daddr ADDR` / `ip6 daddr ADDR` (implies `meta nfproto`).
    Daddr(IpAddr),
    /// `ip saddr . meta l4proto . th sport @set` (ipv6 form for V6): a packet
    /// coming from one of the set's servers (a reply).
    SaddrProtoSportInSet { family: Family, set: String },
    /// `meta mark MARK`: the packet carries this mark (SO_MARK of its socket).
    MarkIs(u32),
    /// `meta mark != MARK`.
    MarkIsNot(u32),
}

/// How a denied packet is answered, so clients fail fast instead of hanging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectKind {
    /// `reject with tcp reset`; only after `L4ProtoIn([Tcp])`.
    TcpReset,
    /// `reject with icmpx admin-prohibited` (ICMP type 3 code 13 / ICMPv6 type 1 code 1).
    IcmpxAdminProhibited,
}

/// A statement; a rule's statements run in order, the last one may be a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// An anonymous per-rule packet/byte counter.
    Counter,
    /// `log group N prefix "..."` to nflog.
    Log {
        group: u16,
        prefix: String,
    },
    Accept,
    Drop,
    Reject(RejectKind),
    Jump(String),
    /// `redirect to :PORT`, in a nat chain only: the connection goes to PORT
    /// on the host itself (127.0.0.1 or ::1 for locally generated packets).
    Redirect(u16),
    /// `ct zone set ZONE`, in a raw chain only: the packet is tracked in this
    /// conntrack zone, apart from connections of the default zone 0.
    CtZoneSet(u16),
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Rule {
    /// Stable, unique id (e.g. `blocklist-v4`, `allow-static-v6-tcp-443`); rendered
    /// as the rule's comment.
    pub id: String,
    /// One line for humans: what this rule does and why.
    pub description: String,
    pub matches: Vec<Match>,
    pub actions: Vec<Action>,
}

/// An allowed DNS name and the sets its resolved addresses go into.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NameBinding {
    /// `Target::Name` or `Target::Wildcard`, never `Target::Net`.
    pub target: Target,
    pub ports: Ports,
    pub sources: Vec<Source>,
    /// The `SetRole::DnsAllow` set for IPv4 answers (key `Addr(V4)` when
    /// `ports` is `Any`, else `AddrProtoPort(V4)`).
    pub set_v4: String,
    /// Same for IPv6 answers.
    pub set_v6: String,
}

/// The whole `inet netleash` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub mode: Mode,
    /// `sha256:<hex>` over a canonical encoding of the policy, the compile
    /// options and the compiler's layout version; stored as the table comment
    /// so `status` can tell which policy is in force.
    pub digest: String,
    pub sets: Vec<Set>,
    /// Regular chains first, then base chains.
    pub chains: Vec<Chain>,
    pub names: Vec<NameBinding>,
}

impl Ruleset {
    pub fn set(&self, name: &str) -> Option<&Set> {
        self.sets.iter().find(|s| s.name == name)
    }

    pub fn chain(&self, name: &str) -> Option<&Chain> {
        self.chains.iter().find(|c| c.name == name)
    }
}
