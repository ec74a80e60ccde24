//! The evaluator behind `netleash check`: walks the model's chains and rules
//! in order, as the kernel walks the table, and names the rule that decided.
//!
//! A probe is a new TCP or UDP connection from the sandbox to a destination:
//! - an address: the packet the kernel would see. It matches the static set
//!   elements (interval containment; concatenations by address, protocol and
//!   port) and the DNS sets, which are empty unless the caller supplies what
//!   the resolver learned ([`Learned`]);
//! - a name: an address the resolver has learned for that name and that is in
//!   no static set. It is in exactly the DNS sets of the [`NameBinding`]s that
//!   match the name, with their ports, which is where the resolver loop puts
//!   the name's addresses. So "allowed" means: its addresses, once the
//!   resolver learns them, go into those sets and the rule reading them
//!   accepts. The blocklist and address literals cannot be judged without the
//!   addresses; `check --resolve` evaluates those as well.
//!
//! The walk follows nftables semantics: the output base chain's rules in
//! order, a `jump` runs the target chain and continues with the next rule when
//! the target falls off its end, and a base chain that falls off its end
//! applies its policy. Conditions a new connection cannot meet are false:
//! `ct state established,related` (its first packet is `new`) and ICMPv6
//! types (a probe is TCP or UDP). The output interface is `lo` exactly for
//! loopback addresses (127.0.0.0/8, ::1), which the kernel routes through `lo`.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::compile::DENY_CHAIN;
use super::model::*;
use crate::policy::{PortSpec, Ports, Proto};

/// Where a probe goes. Names are normalized as the policy normalizes them
/// (lowercase ASCII, punycode, no trailing dot); an IP literal is an `Addr`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Addr(IpAddr),
    Name(String),
}

/// A new connection from the sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    pub destination: Destination,
    /// `None`: TCP when a port is given; both TCP and UDP when none is.
    pub proto: Option<Proto>,
    /// `None`: every port is tried, and the answer says which are allowed.
    pub port: Option<u16>,
}

/// Set elements the resolver loop has added at run time (to `DnsAllow` sets).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Learned {
    elements: BTreeMap<String, BTreeSet<Element>>,
}

impl Learned {
    /// What the resolver loop inserts when `name` resolves to `addrs`: each
    /// address goes into the set of its family of every binding that matches
    /// the name, once per allowed protocol/port when the binding has ports.
    pub fn from_answer(ruleset: &Ruleset, name: &str, addrs: &[IpAddr]) -> Learned {
        let mut learned = Learned::default();
        for binding in ruleset.names.iter().filter(|b| b.target.matches_name(name)) {
            for addr in addrs {
                // The resolver loop's own mapping, so `check --resolve` adds
                // exactly what it would.
                for (set, element) in crate::dns::learn::elements_for(binding, *addr) {
                    learned.elements.entry(set).or_default().insert(element);
                }
            }
        }
        learned
    }

    fn contains(&self, set: &str, element: &Element) -> bool {
        self.elements
            .get(set)
            .is_some_and(|elements| elements.contains(element))
    }

    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.elements
            .values()
            .flatten()
            .filter_map(|element| match element {
                Element::AddrProtoPort(_, _, port) => Some(*port),
                Element::Addr(_) => None,
            })
    }
}

/// What happens to the packet in the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Drop,
    Reject(RejectKind),
}

/// A rule that matched, and the chain it is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RuleRef<'a> {
    pub chain: &'a str,
    pub rule: &'a Rule,
}

/// What decided the verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decider<'a> {
    /// A rule matched and its verdict (or the verdict of the chain it jumped
    /// to) ended the walk. Rules of the `deny` chain only carry out a denial
    /// decided by the rule that jumped there, so the decider is never one of them.
    Rule(RuleRef<'a>),
    /// No rule ended the walk; the base chain's policy did.
    ChainPolicy { chain: &'a str, policy: ChainPolicy },
}

impl Decider<'_> {
    /// The rule id, or `policy of chain NAME`.
    pub fn name(&self) -> String {
        match self {
            Decider::Rule(r) => r.rule.id.clone(),
            Decider::ChainPolicy { chain, .. } => format!("policy of chain {chain}"),
        }
    }

    pub fn description(&self) -> String {
        match self {
            Decider::Rule(r) => r.rule.description.clone(),
            Decider::ChainPolicy {
                policy: ChainPolicy::Accept,
                ..
            } => "no rule matched; the base chain accepts everything else".to_string(),
            Decider::ChainPolicy {
                policy: ChainPolicy::Drop,
                ..
            } => "no rule matched; the base chain drops everything else".to_string(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision<'a> {
    pub verdict: Verdict,
    pub decided_by: Decider<'a>,
    /// Every rule whose verdict the walk followed, in order (jumps included).
    pub path: Vec<RuleRef<'a>>,
}

impl Decision<'_> {
    pub fn allowed(&self) -> bool {
        self.verdict == Verdict::Accept
    }
}

/// The ports an outcome stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum PortClass {
    Port(u16),
    /// Every port (1–65535) that no other outcome of the same protocol names.
    /// No rule tells these ports apart, so one of them stands for all.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome<'a> {
    pub family: Family,
    pub proto: Proto,
    pub port: PortClass,
    pub decision: Decision<'a>,
}

/// The answer to a probe: one outcome per address family, protocol and port
/// class tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation<'a> {
    pub probe: Probe,
    pub outcomes: Vec<Outcome<'a>>,
    /// For a name: the bindings that match it, whose sets its addresses go into.
    pub bindings: Vec<&'a NameBinding>,
}

impl<'a> Evaluation<'a> {
    /// Allowed when some tried protocol/port is accepted (for a probe with a
    /// port, that is the one port asked about).
    pub fn allowed(&self) -> bool {
        self.outcomes.iter().any(|o| o.decision.allowed())
    }

    /// Outcomes with the same decider (so all accepted or all denied; TCP and
    /// UDP may be rejected differently): the accepted ones first, then in the
    /// order the outcomes were tried.
    pub fn groups(&self) -> Vec<Group<'_, 'a>> {
        let mut groups: Vec<Group<'_, 'a>> = Vec::new();
        for outcome in &self.outcomes {
            let key = outcome.decision.decided_by;
            match groups.iter_mut().find(|g| g.decision.decided_by == key) {
                Some(group) => group.members.push(outcome),
                None => groups.push(Group {
                    decision: &outcome.decision,
                    members: vec![outcome],
                }),
            }
        }
        groups.sort_by_key(|g| !g.decision.allowed());
        groups
    }
}

/// Outcomes that were decided by the same rule.
#[derive(Debug, Clone)]
pub struct Group<'e, 'a> {
    /// The decision of the first member.
    pub decision: &'e Decision<'a>,
    pub members: Vec<&'e Outcome<'a>>,
}

impl Group<'_, '_> {
    /// The ports of this group for humans, e.g. `443/tcp, 443/udp` or
    /// `every tcp port except 53, 853`, given the whole evaluation the group
    /// belongs to (the exceptions are the ports other groups decided). When
    /// the address families differ, each gets its own text (`IPv4: ...; IPv6: ...`).
    pub fn ports_text(&self, evaluation: &Evaluation<'_>) -> String {
        let families = self.families();
        let texts: Vec<(Family, String)> = families
            .iter()
            .map(|&family| (family, self.family_ports_text(family, evaluation)))
            .collect();
        if texts.iter().all(|(_, text)| *text == texts[0].1) {
            return texts
                .into_iter()
                .next()
                .map(|(_, text)| text)
                .unwrap_or_default();
        }
        let parts: Vec<String> = texts
            .into_iter()
            .map(|(family, text)| match family {
                Family::V4 => format!("IPv4: {text}"),
                Family::V6 => format!("IPv6: {text}"),
            })
            .collect();
        parts.join("; ")
    }

    fn family_ports_text(&self, family: Family, evaluation: &Evaluation<'_>) -> String {
        let mut parts = Vec::new();
        for proto in [Proto::Tcp, Proto::Udp] {
            let mine: BTreeSet<PortClass> = self
                .members
                .iter()
                .filter(|o| o.family == family && o.proto == proto)
                .map(|o| o.port)
                .collect();
            if mine.contains(&PortClass::Other) {
                let except: BTreeSet<u16> = evaluation
                    .outcomes
                    .iter()
                    .filter(|o| o.family == family && o.proto == proto && !mine.contains(&o.port))
                    .filter_map(|o| match o.port {
                        PortClass::Port(p) => Some(p),
                        PortClass::Other => None,
                    })
                    .collect();
                if except.is_empty() {
                    parts.push(format!("every {proto} port"));
                } else {
                    let list: Vec<String> = except.iter().map(u16::to_string).collect();
                    parts.push(format!("every {proto} port except {}", list.join(", ")));
                }
            } else {
                parts.extend(mine.iter().filter_map(|class| match class {
                    PortClass::Port(p) => Some(format!("{p}/{proto}")),
                    PortClass::Other => None,
                }));
            }
        }
        parts.join(", ")
    }

    pub fn families(&self) -> BTreeSet<Family> {
        self.members.iter().map(|o| o.family).collect()
    }
}

/// The destination address of a probe packet.
#[derive(Debug, Clone, Copy)]
enum Daddr<'n> {
    Addr(IpAddr),
    /// An address of `family` learned for the probed name: in no static set,
    /// in the DNS sets of the matching bindings.
    LearnedFor {
        family: Family,
        bindings: &'n [&'n NameBinding],
    },
}

#[derive(Debug, Clone, Copy)]
struct Packet<'n> {
    daddr: Daddr<'n>,
    proto: Proto,
    port: u16,
}

impl Packet<'_> {
    fn family(&self) -> Family {
        match self.daddr {
            Daddr::Addr(addr) => Family::of(&addr),
            Daddr::LearnedFor { family, .. } => family,
        }
    }
}

/// nftables allows at most 16 nested jumps; deeper is a broken model.
const MAX_JUMP_DEPTH: usize = 16;

/// Answer a probe against a ruleset, with what the resolver has learned.
pub fn evaluate<'a>(ruleset: &'a Ruleset, probe: &Probe, learned: &Learned) -> Evaluation<'a> {
    let bindings: Vec<&'a NameBinding> = match &probe.destination {
        Destination::Name(name) => ruleset
            .names
            .iter()
            .filter(|b| b.target.matches_name(name))
            .collect(),
        Destination::Addr(_) => Vec::new(),
    };
    let families: Vec<Family> = match &probe.destination {
        Destination::Addr(addr) => vec![Family::of(addr)],
        Destination::Name(_) => vec![Family::V4, Family::V6],
    };
    let protos: Vec<Proto> = match (probe.proto, probe.port) {
        (Some(proto), _) => vec![proto],
        (None, Some(_)) => vec![Proto::Tcp],
        (None, None) => vec![Proto::Tcp, Proto::Udp],
    };
    let ports: Vec<PortClass> = match probe.port {
        Some(port) => vec![PortClass::Port(port)],
        None => port_classes(ruleset, &bindings, learned),
    };

    let mut outcomes = Vec::new();
    for &family in &families {
        for &proto in &protos {
            for &class in &ports {
                let port = match class {
                    PortClass::Port(p) => p,
                    PortClass::Other => representative_port(&ports),
                };
                let daddr = match &probe.destination {
                    Destination::Addr(addr) => Daddr::Addr(*addr),
                    Destination::Name(_) => Daddr::LearnedFor {
                        family,
                        bindings: &bindings,
                    },
                };
                let packet = Packet { daddr, proto, port };
                outcomes.push(Outcome {
                    family,
                    proto,
                    port: class,
                    decision: decide(ruleset, &packet, learned),
                });
            }
        }
    }
    Evaluation {
        probe: probe.clone(),
        outcomes,
        bindings,
    }
}

/// Every port some rule, set element or binding names, plus `Other` for all
/// the rest: no rule can tell two unnamed ports apart.
fn port_classes(ruleset: &Ruleset, bindings: &[&NameBinding], learned: &Learned) -> Vec<PortClass> {
    let mut named: BTreeSet<u16> = BTreeSet::new();
    for rule in ruleset.chains.iter().flat_map(|c| &c.rules) {
        for m in &rule.matches {
            if let Match::DportIn(ports) = m {
                named.extend(ports);
            }
        }
    }
    for element in ruleset.sets.iter().flat_map(|s| &s.elements) {
        if let Element::AddrProtoPort(_, _, port) = element {
            named.insert(*port);
        }
    }
    for binding in bindings {
        if let Ports::Only(specs) = &binding.ports {
            named.extend(specs.iter().map(|s: &PortSpec| s.port));
        }
    }
    named.extend(learned.ports());
    let mut classes: Vec<PortClass> = named.into_iter().map(PortClass::Port).collect();
    if classes.len() < usize::from(u16::MAX) {
        classes.push(PortClass::Other);
    }
    classes
}

/// The lowest port in 1..=65535 that no class names.
fn representative_port(classes: &[PortClass]) -> u16 {
    let named: BTreeSet<u16> = classes
        .iter()
        .filter_map(|c| match c {
            PortClass::Port(p) => Some(*p),
            PortClass::Other => None,
        })
        .collect();
    (1..=u16::MAX)
        .find(|p| !named.contains(p))
        .unwrap_or(u16::MAX)
}

fn decide<'a>(ruleset: &'a Ruleset, packet: &Packet<'_>, learned: &Learned) -> Decision<'a> {
    let base = ruleset
        .chains
        .iter()
        .find(|c| {
            c.base
                .is_some_and(|b| b.hook == Hook::Output && b.kind == ChainKind::Filter)
        })
        .expect("ruleset invariant: the compiler always emits an output base chain");
    let mut path = Vec::new();
    let verdict = match run_chain(ruleset, base, packet, learned, &mut path, 0) {
        Some(verdict) => verdict,
        None => {
            let policy = base.base.map_or(ChainPolicy::Accept, |b| b.policy);
            let decided_by = Decider::ChainPolicy {
                chain: &base.name,
                policy,
            };
            let verdict = match policy {
                ChainPolicy::Accept => Verdict::Accept,
                ChainPolicy::Drop => Verdict::Drop,
            };
            return Decision {
                verdict,
                decided_by,
                path,
            };
        }
    };
    let decider = path
        .iter()
        .rev()
        .find(|r| r.chain != DENY_CHAIN)
        .copied()
        .expect("a verdict is always reached through a rule of a base chain");
    Decision {
        verdict,
        decided_by: Decider::Rule(decider),
        path,
    }
}

/// Runs `chain`; `Some(verdict)` when a rule ended the walk, `None` when the
/// chain fell off its end (the caller continues after its jump).
fn run_chain<'a>(
    ruleset: &'a Ruleset,
    chain: &'a Chain,
    packet: &Packet<'_>,
    learned: &Learned,
    path: &mut Vec<RuleRef<'a>>,
    depth: usize,
) -> Option<Verdict> {
    assert!(
        depth <= MAX_JUMP_DEPTH,
        "ruleset invariant: jumps nest at most {MAX_JUMP_DEPTH} deep"
    );
    for rule in &chain.rules {
        if !rule
            .matches
            .iter()
            .all(|m| matches(ruleset, m, packet, learned))
        {
            continue;
        }
        path.push(RuleRef {
            chain: &chain.name,
            rule,
        });
        for action in &rule.actions {
            match action {
                Action::Counter | Action::Log { .. } => {}
                Action::Accept => return Some(Verdict::Accept),
                Action::Drop => return Some(Verdict::Drop),
                Action::Reject(kind) => return Some(Verdict::Reject(*kind)),
                // Only in the nat chain, which this walk never enters; the
                // kernel's redirect accepts the packet on its hook (nft_redir).
                Action::Redirect(_) => return Some(Verdict::Accept),
                // Only in raw chains, which this walk never enters; not a verdict.
                Action::CtZoneSet(_) => {}
                Action::Jump(target) => {
                    let target = ruleset
                        .chain(target)
                        .expect("ruleset invariant: every jump target is a chain of the ruleset");
                    match run_chain(ruleset, target, packet, learned, path, depth + 1) {
                        Some(verdict) => return Some(verdict),
                        // A jump is a verdict: the rest of this rule is not run.
                        None => break,
                    }
                }
            }
        }
    }
    None
}

fn matches(ruleset: &Ruleset, m: &Match, packet: &Packet<'_>, learned: &Learned) -> bool {
    match m {
        Match::OifLoopback => matches!(packet.daddr, Daddr::Addr(addr) if addr.is_loopback()),
        Match::CtEstablishedRelated | Match::Icmpv6Types(_) => false,
        Match::L4ProtoIn(protos) => protos.contains(&packet.proto),
        Match::DportIn(ports) => ports.contains(&packet.port),
        Match::DaddrInSet { family, set } => {
            *family == packet.family() && in_set(ruleset, set, packet, learned, false)
        }
        Match::DaddrProtoPortInSet { family, set } => {
            *family == packet.family() && in_set(ruleset, set, packet, learned, true)
        }
        Match::Daddr(want) => matches!(packet.daddr, Daddr::Addr(addr) if addr == *want),
        // A probe is a connection of the sandbox's own processes, whose
        // packets carry no mark (setting one needs CAP_NET_ADMIN).
        Match::MarkIs(_) => false,
        Match::MarkIsNot(_) => true,
        // A probe is a packet the sandbox sends, never a reply from a server.
        Match::SaddrProtoSportInSet { .. } => false,
    }
}

/// Whether the packet's key (address, or address . protocol . port when
/// `ported`) is an element of the named set.
fn in_set(
    ruleset: &Ruleset,
    name: &str,
    packet: &Packet<'_>,
    learned: &Learned,
    ported: bool,
) -> bool {
    match packet.daddr {
        Daddr::Addr(addr) => {
            let host = IpNet::from(addr);
            let key = if ported {
                Element::AddrProtoPort(host, packet.proto, packet.port)
            } else {
                Element::Addr(host)
            };
            let statically = ruleset.set(name).is_some_and(|set| {
                set.elements.iter().any(|element| match (element, &key) {
                    (Element::Addr(net), Element::Addr(_)) => net.contains(&addr),
                    (Element::AddrProtoPort(net, proto, port), Element::AddrProtoPort(_, p, q)) => {
                        net.contains(&addr) && proto == p && port == q
                    }
                    _ => false,
                })
            });
            statically || learned.contains(name, &key)
        }
        Daddr::LearnedFor { family, bindings } => bindings.iter().any(|binding| {
            let set = match family {
                Family::V4 => &binding.set_v4,
                Family::V6 => &binding.set_v6,
            };
            set == name
                && match &binding.ports {
                    Ports::Any => !ported,
                    Ports::Only(_) => {
                        ported && binding.ports.admits(packet.proto, Some(packet.port))
                    }
                }
        }),
    }
}

/// Policies built in code for the unit tests of this module and of the CLI.
#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::policy::{
        BlockEntry, CompileOptions, Dialect, HostRule, Mode, Policy, Source, Target,
    };
    use crate::ruleset::compile;

    pub(crate) fn host_rule(target: Target, ports: Ports) -> HostRule {
        HostRule {
            entry: target.to_string(),
            target,
            ports,
            sources: [Source::AllowedHosts].into(),
        }
    }

    pub(crate) fn only(specs: &[(Proto, u16)]) -> Ports {
        Ports::only(specs.iter().copied())
    }

    pub(crate) fn net(text: &str) -> Target {
        Target::Net(text.parse().unwrap())
    }

    pub(crate) fn policy(mode: Mode, mut rules: Vec<HostRule>) -> Policy {
        rules.sort_by(|a, b| a.target.cmp(&b.target));
        let blocklist = ["169.254.0.0/16", "100.100.100.200/32", "fd00:ec2::254/128"]
            .iter()
            .map(|n| BlockEntry {
                net: n.parse().unwrap(),
                reason: "cloud metadata".into(),
            })
            .collect();
        Policy {
            mode,
            dialect: Dialect::Limited,
            rules,
            blocklist,
            warnings: vec![],
        }
    }

    pub(crate) fn options() -> CompileOptions {
        CompileOptions {
            resolvers: vec![
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            nflog_group: 4711,
            proxy: None,
        }
    }

    /// Names with and without ports, a wildcard, literals and CIDRs of both
    /// families, with and without ports, and a CIDR over the blocklist.
    fn mixed() -> Ruleset {
        let https = only(&[(Proto::Tcp, 443), (Proto::Udp, 443)]);
        compile(
            &policy(
                Mode::Limited,
                vec![
                    host_rule(Target::Name("api.example.com".into()), https.clone()),
                    host_rule(Target::Name("files.example.org".into()), Ports::Any),
                    host_rule(Target::Wildcard("cdn.example.net".into()), Ports::Any),
                    host_rule(net("203.0.113.0/24"), Ports::Any),
                    host_rule(net("198.51.100.7/32"), only(&[(Proto::Tcp, 443)])),
                    host_rule(net("169.254.0.0/15"), Ports::Any),
                    host_rule(net("2001:db8:1::/48"), Ports::Any),
                    host_rule(net("2001:db8:2::7/128"), https),
                ],
            ),
            &options(),
        )
    }

    fn addr_probe(addr: &str, proto: Proto, port: Option<u16>) -> Probe {
        Probe {
            destination: Destination::Addr(addr.parse().unwrap()),
            proto: Some(proto),
            port,
        }
    }

    fn name_probe(name: &str, proto: Option<Proto>, port: Option<u16>) -> Probe {
        Probe {
            destination: Destination::Name(name.into()),
            proto,
            port,
        }
    }

    /// The id of the rule that decided a single-outcome evaluation, and whether it allowed.
    fn decided(evaluation: &Evaluation<'_>) -> (String, bool) {
        assert_eq!(evaluation.outcomes.len(), 1, "{evaluation:#?}");
        (
            evaluation.outcomes[0].decision.decided_by.name(),
            evaluation.allowed(),
        )
    }

    #[test]
    fn every_rule_of_the_egress_chain_decides_a_probe() {
        let ruleset = mixed();
        let none = Learned::default();
        let learned_any = Learned::from_answer(
            &ruleset,
            "files.example.org",
            &[
                "192.0.2.80".parse().unwrap(),
                "2001:db8:80::1".parse().unwrap(),
            ],
        );
        let learned_https = Learned::from_answer(
            &ruleset,
            "api.example.com",
            &[
                "192.0.2.44".parse().unwrap(),
                "2001:db8:44::1".parse().unwrap(),
            ],
        );
        let cases: Vec<(Probe, &Learned, &str, bool)> = vec![
            (
                addr_probe("127.0.0.1", Proto::Tcp, Some(8080)),
                &none,
                "loopback",
                true,
            ),
            (
                addr_probe("::1", Proto::Udp, Some(53)),
                &none,
                "loopback",
                true,
            ),
            // Blocklist beats an allowed CIDR (169.254.0.0/15 is allowed).
            (
                addr_probe("169.254.169.254", Proto::Tcp, Some(80)),
                &none,
                "blocklist-v4",
                false,
            ),
            (
                addr_probe("fd00:ec2::254", Proto::Tcp, Some(80)),
                &none,
                "blocklist-v6",
                false,
            ),
            (
                addr_probe("192.0.2.53", Proto::Udp, Some(53)),
                &none,
                "dns-resolvers-v4",
                true,
            ),
            (
                addr_probe("2001:db8::53", Proto::Tcp, Some(53)),
                &none,
                "dns-resolvers-v6",
                true,
            ),
            // DNS to a non-resolver is denied even though 203.0.113.0/24 is allowed on every port.
            (
                addr_probe("203.0.113.9", Proto::Udp, Some(53)),
                &none,
                "dns-other",
                false,
            ),
            (
                addr_probe("203.0.113.9", Proto::Tcp, Some(853)),
                &none,
                "dns-other",
                false,
            ),
            (
                addr_probe("2001:db8:1::9", Proto::Tcp, Some(853)),
                &none,
                "dns-other",
                false,
            ),
            (
                addr_probe("203.0.113.9", Proto::Tcp, Some(22)),
                &none,
                "allow-static-v4",
                true,
            ),
            (
                addr_probe("169.255.1.1", Proto::Udp, Some(123)),
                &none,
                "allow-static-v4",
                true,
            ),
            (
                addr_probe("198.51.100.7", Proto::Tcp, Some(443)),
                &none,
                "allow-static-v4-ports",
                true,
            ),
            (
                addr_probe("2001:db8:1::9", Proto::Tcp, Some(22)),
                &none,
                "allow-static-v6",
                true,
            ),
            (
                addr_probe("2001:db8:2::7", Proto::Udp, Some(443)),
                &none,
                "allow-static-v6-ports",
                true,
            ),
            (
                addr_probe("2001:db8:2::7", Proto::Tcp, Some(443)),
                &none,
                "allow-static-v6-ports",
                true,
            ),
            (
                addr_probe("192.0.2.80", Proto::Tcp, Some(8080)),
                &learned_any,
                "allow-dns-v4",
                true,
            ),
            (
                addr_probe("2001:db8:80::1", Proto::Udp, Some(5000)),
                &learned_any,
                "allow-dns-v6",
                true,
            ),
            (
                addr_probe("192.0.2.44", Proto::Udp, Some(443)),
                &learned_https,
                "allow-dns-v4-ports",
                true,
            ),
            (
                addr_probe("2001:db8:44::1", Proto::Tcp, Some(443)),
                &learned_https,
                "allow-dns-v6-ports",
                true,
            ),
            // Ports are enforced: the literal and the name are allowed on 443 only.
            (
                addr_probe("198.51.100.7", Proto::Tcp, Some(80)),
                &none,
                "default-deny",
                false,
            ),
            (
                addr_probe("198.51.100.7", Proto::Udp, Some(443)),
                &none,
                "default-deny",
                false,
            ),
            (
                addr_probe("192.0.2.44", Proto::Tcp, Some(80)),
                &learned_https,
                "default-deny",
                false,
            ),
            // A learned address is only allowed once learned.
            (
                addr_probe("192.0.2.80", Proto::Tcp, Some(8080)),
                &none,
                "default-deny",
                false,
            ),
            (
                addr_probe("2001:db8:3::1", Proto::Tcp, Some(443)),
                &none,
                "default-deny",
                false,
            ),
        ];
        let mut deciders = BTreeSet::new();
        for (probe, learned, rule, allowed) in &cases {
            let evaluation = evaluate(&ruleset, probe, learned);
            assert_eq!(
                decided(&evaluation),
                (rule.to_string(), *allowed),
                "{probe:?}"
            );
            deciders.insert(rule.to_string());
        }
        // `established` and `icmpv6-neighbour-discovery` match no new TCP/UDP
        // connection, which is all a probe can be; every other rule decided one.
        let egress = ruleset.chain("egress").unwrap();
        let expected: BTreeSet<String> = egress
            .rules
            .iter()
            .map(|r| r.id.clone())
            .filter(|id| id != "established" && id != "icmpv6-neighbour-discovery")
            .collect();
        assert_eq!(deciders, expected);
    }

    #[test]
    fn a_denial_is_decided_by_the_egress_rule_and_carried_out_by_the_deny_chain() {
        let ruleset = mixed();
        let tcp = evaluate(
            &ruleset,
            &addr_probe("198.51.100.7", Proto::Tcp, Some(80)),
            &Learned::default(),
        );
        let decision = &tcp.outcomes[0].decision;
        assert_eq!(decision.verdict, Verdict::Reject(RejectKind::TcpReset));
        let path: Vec<&str> = decision.path.iter().map(|r| r.rule.id.as_str()).collect();
        assert_eq!(path, ["output-egress", "default-deny", "deny-tcp"]);

        let udp = evaluate(
            &ruleset,
            &addr_probe("198.51.100.7", Proto::Udp, Some(80)),
            &Learned::default(),
        );
        assert_eq!(
            udp.outcomes[0].decision.verdict,
            Verdict::Reject(RejectKind::IcmpxAdminProhibited)
        );
    }

    #[test]
    fn a_name_is_allowed_through_the_dns_sets_of_its_bindings() {
        let ruleset = mixed();
        let none = Learned::default();
        let api = evaluate(
            &ruleset,
            &name_probe("api.example.com", None, Some(443)),
            &none,
        );
        let rules: Vec<String> = api
            .outcomes
            .iter()
            .map(|o| o.decision.decided_by.name())
            .collect();
        assert_eq!(rules, ["allow-dns-v4-ports", "allow-dns-v6-ports"]);
        assert!(api.allowed());
        assert_eq!(api.bindings.len(), 1);
        assert_eq!(api.bindings[0].set_v4, "dns_v4_ports");

        let wrong_port = evaluate(
            &ruleset,
            &name_probe("api.example.com", Some(Proto::Tcp), Some(80)),
            &none,
        );
        assert!(!wrong_port.allowed());
        assert!(
            wrong_port
                .outcomes
                .iter()
                .all(|o| o.decision.decided_by.name() == "default-deny")
        );

        // The wildcard covers any depth below the suffix, never the suffix itself.
        let deep = evaluate(
            &ruleset,
            &name_probe("a.b.cdn.example.net", Some(Proto::Udp), Some(9)),
            &none,
        );
        assert!(deep.allowed());
        assert_eq!(deep.outcomes[0].decision.decided_by.name(), "allow-dns-v4");
        let apex = evaluate(
            &ruleset,
            &name_probe("cdn.example.net", Some(Proto::Tcp), Some(443)),
            &none,
        );
        assert!(!apex.allowed());

        // DNS rules come before the DNS sets: a name allowed on every port still may not get DNS.
        let dns = evaluate(
            &ruleset,
            &name_probe("files.example.org", Some(Proto::Udp), Some(53)),
            &none,
        );
        assert!(
            dns.outcomes
                .iter()
                .all(|o| o.decision.decided_by.name() == "dns-other")
        );
    }

    #[test]
    fn without_a_port_the_answer_lists_the_allowed_ports() {
        let ruleset = mixed();
        let none = Learned::default();
        let api = evaluate(&ruleset, &name_probe("api.example.com", None, None), &none);
        assert!(api.allowed());
        let groups = api.groups();
        let texts: Vec<(String, String)> = groups
            .iter()
            .map(|g| (g.decision.decided_by.name(), g.ports_text(&api)))
            .collect();
        assert_eq!(
            texts,
            [
                (
                    "allow-dns-v4-ports".to_string(),
                    "443/tcp, 443/udp".to_string()
                ),
                (
                    "allow-dns-v6-ports".to_string(),
                    "443/tcp, 443/udp".to_string()
                ),
                (
                    "dns-other".to_string(),
                    "53/tcp, 853/tcp, 53/udp, 853/udp".to_string()
                ),
                (
                    "default-deny".to_string(),
                    "every tcp port except 53, 443, 853, every udp port except 53, 443, 853"
                        .to_string()
                ),
            ]
        );

        let cidr = evaluate(
            &ruleset,
            &addr_probe("203.0.113.9", Proto::Tcp, None),
            &none,
        );
        let texts: Vec<(String, String)> = cidr
            .groups()
            .iter()
            .map(|g| (g.decision.decided_by.name(), g.ports_text(&cidr)))
            .collect();
        assert_eq!(
            texts,
            [
                (
                    "allow-static-v4".to_string(),
                    "every tcp port except 53, 853".to_string()
                ),
                ("dns-other".to_string(), "53/tcp, 853/tcp".to_string()),
            ]
        );

        let loopback = evaluate(&ruleset, &addr_probe("127.0.0.1", Proto::Udp, None), &none);
        assert_eq!(loopback.groups().len(), 1);
        assert_eq!(loopback.groups()[0].ports_text(&loopback), "every udp port");

        let unknown = evaluate(&ruleset, &name_probe("other.example", None, None), &none);
        assert!(!unknown.allowed());
    }

    #[test]
    fn rebinding_a_name_to_the_blocklist_stays_blocked() {
        let ruleset = mixed();
        let metadata: IpAddr = "169.254.169.254".parse().unwrap();
        let learned = Learned::from_answer(&ruleset, "files.example.org", &[metadata]);
        let evaluation = evaluate(
            &ruleset,
            &addr_probe("169.254.169.254", Proto::Tcp, Some(80)),
            &learned,
        );
        assert_eq!(decided(&evaluation), ("blocklist-v4".to_string(), false));
    }

    #[test]
    fn learned_elements_follow_the_bindings_ports() {
        let ruleset = mixed();
        let addr: IpAddr = "192.0.2.44".parse().unwrap();
        let learned = Learned::from_answer(&ruleset, "api.example.com", &[addr]);
        let host = IpNet::from(addr);
        assert!(learned.contains(
            "dns_v4_ports",
            &Element::AddrProtoPort(host, Proto::Tcp, 443)
        ));
        assert!(learned.contains(
            "dns_v4_ports",
            &Element::AddrProtoPort(host, Proto::Udp, 443)
        ));
        assert!(!learned.contains("dns_v4", &Element::Addr(host)));
        assert_eq!(
            Learned::from_answer(&ruleset, "unlisted.example", &[addr]),
            Learned::default()
        );
    }

    #[test]
    fn unrestricted_accepts_everything_but_the_blocklist() {
        let ruleset = compile(&policy(Mode::Unrestricted, vec![]), &options());
        let none = Learned::default();
        let open = evaluate(
            &ruleset,
            &addr_probe("198.51.100.7", Proto::Tcp, Some(25)),
            &none,
        );
        assert_eq!(decided(&open), ("policy of chain output".to_string(), true));
        let dns = evaluate(
            &ruleset,
            &addr_probe("198.51.100.7", Proto::Udp, Some(53)),
            &none,
        );
        assert!(dns.allowed());
        let name = evaluate(
            &ruleset,
            &name_probe("anything.example", None, Some(443)),
            &none,
        );
        assert!(name.allowed());
        let metadata = evaluate(
            &ruleset,
            &addr_probe("100.100.100.200", Proto::Tcp, Some(80)),
            &none,
        );
        assert_eq!(decided(&metadata), ("blocklist-v4".to_string(), false));
        let v6 = evaluate(
            &ruleset,
            &addr_probe("fd00:ec2::254", Proto::Udp, Some(80)),
            &none,
        );
        assert_eq!(decided(&v6), ("blocklist-v6".to_string(), false));
    }

    #[test]
    fn limited_with_nothing_allowed_denies_by_default_deny() {
        let ruleset = compile(&policy(Mode::Limited, vec![]), &options());
        let evaluation = evaluate(
            &ruleset,
            &addr_probe("198.51.100.7", Proto::Tcp, None),
            &Learned::default(),
        );
        assert!(!evaluation.allowed());
        assert!(evaluation.outcomes.iter().all(|o| !o.decision.allowed()));
    }
}
