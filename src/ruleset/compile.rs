//! The pure compiler: `Policy` + `CompileOptions` → `Ruleset`.
//!
//! Deterministic: the same input gives the same model, element order and digest.
//! Rule order in the `egress` chain is the security argument and must not change
//! without updating docs/policy-reference.md:
//! 1. loopback is accepted (nothing in the blocklist is a loopback address);
//! 2. ICMPv6 neighbour discovery is accepted, or IPv6 breaks (RFC 4861 §4).
//!    It comes before the blocklist because the blocklist holds fe80::/10 and
//!    neighbour solicitations and advertisements are sent to link-local
//!    addresses; ND messages never leave the link (hop limit 255, RFC 4861 §7.1);
//! 3. the safety blocklist is checked before any other accept, so an allowed
//!    name whose DNS answer points into it stays blocked (DNS rebinding);
//! 4. established/related traffic is accepted (its first packet passed 1–3 and 5–8);
//! 5. DNS (53) goes only to the configured resolvers; DNS and DNS over TLS
//!    (853, RFC 7858) to anything else is denied even if the address is allowed;
//! 6. static allow sets (literals, CIDRs: any port, then one address set per
//!    protocol and port, `PortSet`), then DNS-derived sets;
//! 7. everything else is denied: counted, logged to nflog and rejected.
//!
//! In unrestricted mode the chain holds steps 1–3 and the base chains accept.
//!
//! A static set with no element is left out, and so is every rule that looks
//! it up: such a rule can never match, so leaving it out changes no verdict
//! and no order among the rules that remain (`drop_empty_static_sets`).
//!
//! With a DNS proxy (the sidecar; `CompileOptions::proxy`), in limited mode:
//! - a nat chain on the output hook redirects every UDP and TCP packet to
//!   port 53 that does not carry the proxy's mark to the proxy (127.0.0.1 or
//!   ::1 at the proxy's port), whatever resolver address it was sent to;
//! - step 1 gains the `dns-proxy-*` rules that accept those redirected
//!   packets. They are needed because the filter chain runs on the same
//!   hook as the redirect and sees the output interface the packet was
//!   routed to before it was rewritten (`nf_hook_state.out` is set once per
//!   hook, before its chains run), so the loopback rule does not match them;
//! - step 5 accepts DNS to the resolvers only from the proxy's own marked
//!   sockets, so nothing else in the sandbox reaches the upstream directly;
//! - the proxy's upstream connections are tracked in a conntrack zone of
//!   their own (raw chains on output, by the mark, and on prerouting, for
//!   the replies from the upstreams). Without it a sandbox socket that
//!   reused a source port the proxy had used would find the proxy's
//!   connection in conntrack, skip the redirect (nat only sees a
//!   connection's first packet) and pass as established: a way around the
//!   proxy. With it, that socket gets a connection of its own, redirected;
//! - before step 4, an unmarked packet to port 53 that was not redirected
//!   (so it belongs to a connection that was not the sandbox's own) is
//!   denied, as a second line behind the zones.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use sha2::{Digest, Sha256};

use super::model::*;
use crate::policy::{CompileOptions, HostRule, Mode, Policy, Ports, Proto, ProxyOptions, Target};

/// ICMPv6 types a sandbox must be able to send for IPv6 to work at all:
/// router solicitation (133), neighbour solicitation (135) and advertisement
/// (136) from RFC 4861, and MLDv2 listener reports (143, RFC 3810) that
/// switches use to deliver solicited-node multicast.
pub const ICMPV6_NEIGHBOUR_DISCOVERY: [u8; 4] = [133, 135, 136, 143];

/// DNS (RFC 1035) and DNS over TLS (RFC 7858) ports.
pub const DNS_PORTS: [u16; 2] = [53, 853];

/// Prefix of every nflog message netleash emits.
pub const LOG_PREFIX: &str = "netleash deny ";

pub const DENY_CHAIN: &str = "deny";
pub const EGRESS_CHAIN: &str = "egress";
/// The nat chain that sends the sandbox's DNS to the proxy (with a proxy only).
pub const DNS_REDIRECT_CHAIN: &str = "dns-redirect";

/// The priority of the DNS redirect: nft's `dstnat` (-100), before the
/// filter chains (0), as destination NAT always is.
pub const DNS_REDIRECT_PRIORITY: i32 = -100;

/// The raw chains that put the proxy's upstream connections into their conntrack zone.
pub const PROXY_ZONE_OUTPUT_CHAIN: &str = "dns-zone-output";
pub const PROXY_ZONE_REPLIES_CHAIN: &str = "dns-zone-replies";

/// nft's `raw` priority: before conntrack (-200), where a zone must be set.
pub const RAW_PRIORITY: i32 = -300;

/// The port DNS is served on (RFC 1035 §4.2).
const DNS_PORT: u16 = 53;

/// Name of a set, by role, family and whether its key carries ports.
pub fn set_name(role: SetRole, family: Family, ported: bool) -> String {
    let role = match role {
        SetRole::Blocklist => "blocklist",
        SetRole::Resolvers => "resolvers",
        SetRole::StaticAllow => "allow",
        SetRole::DnsAllow => "dns",
    };
    let family = match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    };
    if ported {
        format!("{role}_{family}_ports")
    } else {
        format!("{role}_{family}")
    }
}

fn family_tag(family: Family) -> &'static str {
    match family {
        Family::V4 => "v4",
        Family::V6 => "v6",
    }
}

const FAMILIES: [Family; 2] = [Family::V4, Family::V6];

pub fn compile(policy: &Policy, options: &CompileOptions) -> Ruleset {
    let limited = policy.mode == Mode::Limited;

    // One pass over the rules. A policy can hold tens of thousands, and each
    // pass chases pointers into every rule's port set: passes are what costs.
    let mut digest = RulesetDigest::new(policy.mode);
    let mut nets = AllowedNets::default();
    let mut names = Vec::with_capacity(policy.rules.len());
    let dns_sets = DnsSetNames::new();
    for rule in &policy.rules {
        digest.rule(rule);
        if !limited {
            continue;
        }
        match rule.target {
            Target::Net(net) => nets.add(net, &rule.ports),
            Target::Name(_) | Target::Wildcard(_) => names.push(dns_sets.binding(rule)),
        }
    }

    // The proxy only matters where DNS is filtered: in unrestricted mode every
    // name is allowed and the sandbox's DNS goes where it was sent.
    let proxy = options.proxy.as_ref().filter(|_| limited);

    let mut sets = Vec::new();
    let blocklist: Vec<IpNet> = policy.blocklist.iter().map(|b| b.net).collect();
    for family in FAMILIES {
        sets.push(Set {
            name: set_name(SetRole::Blocklist, family, false),
            key: SetKey::Addr(family),
            role: SetRole::Blocklist,
            interval: true,
            timeout: false,
            elements: aggregate(family, &blocklist)
                .into_iter()
                .map(Element::Addr)
                .collect(),
        });
    }
    if limited {
        sets.extend(limited_sets(&nets, options));
    }

    let mut chains = vec![
        deny_chain(options.nflog_group),
        egress_chain(
            limited,
            proxy,
            &nets.by_port.keys().copied().collect::<Vec<_>>(),
        ),
        base_chain("output", Hook::Output, limited),
        base_chain("forward", Hook::Forward, limited),
    ];
    if let Some(proxy) = proxy {
        chains.extend(proxy_zone_chains(proxy));
        chains.push(dns_redirect_chain(proxy));
    }
    drop_empty_static_sets(&mut sets, &mut chains);

    Ruleset {
        mode: policy.mode,
        digest: digest.finish(policy, options),
        sets,
        chains,
        names,
    }
}

/// Address literals and CIDRs of the policy, by the ports they are allowed on.
#[derive(Default)]
struct AllowedNets {
    any_port: Vec<IpNet>,
    /// Single addresses allowed on a protocol and port (`ADDR:PORT`, a URL):
    /// the `allow_v4_ports` / `allow_v6_ports` hash sets.
    host_ports: BTreeSet<(IpNet, Proto, u16)>,
    /// Ranges allowed on a protocol and port: one interval set per family,
    /// protocol and port (see `PortSet`).
    by_port: BTreeMap<(Proto, u16), Vec<IpNet>>,
}

impl AllowedNets {
    fn add(&mut self, net: IpNet, ports: &Ports) {
        match ports {
            Ports::Any => self.any_port.push(net),
            Ports::Only(specs) => {
                let net = net.trunc();
                for spec in specs {
                    if net.prefix_len() == net.max_prefix_len() {
                        self.host_ports.insert((net, spec.proto, spec.port));
                    } else {
                        self.by_port
                            .entry((spec.proto, spec.port))
                            .or_default()
                            .push(net);
                    }
                }
            }
        }
    }
}

/// The static allow set and rule of the CIDRs of one family allowed on one
/// protocol and port: set `allow_v4_tcp_443`, looked up by rule
/// `allow-static-v4-tcp-443`
/// (`meta l4proto tcp th dport 443 ip daddr @allow_v4_tcp_443`). Single
/// addresses allowed on ports, the only ones the policy grammar gives
/// (`ADDR:PORT`, a URL), go instead into one hash set per family keyed
/// `address . protocol . port` (`allow_v4_ports`, no interval flag): one set
/// and one rule however many ports, cheap to create and to change in place.
///
/// One address set per protocol and port for ranges, not one interval set
/// keyed `address . protocol . port`: in the kernel an interval set with a
/// concatenated key is a pipapo set, which is expensive to change. Creating
/// one, even of five elements, costs `pipapo_resize`; removing one element
/// of 5,000 costs about 13 ms (`nft_pipapo_remove` tests the set's rules one
/// by one), so an apply creates such a set again instead of changing it in
/// place (`kernel::generation::kept_in_swap`). An interval set of addresses
/// is an rbtree: cheap to create, and changed in place when a few of its
/// elements change.
///
/// The price is a set and a rule per family for each distinct protocol and
/// port, and a new connection that no earlier rule accepted walks one such
/// rule per port. That is accepted, with no threshold above which the
/// concatenated set would come back (two layouts, two sets of tests, for a
/// case no policy writer meets): ports come only from address entries
/// (`ADDR:PORT`, a URL; the grammar gives a CIDR no port), each names one
/// port (TCP and UDP, or TCP for `http://`), so a policy has as many ports
/// as its writer named, a few in practice. A rule of another protocol
/// stops at its first compare (`meta l4proto`), one of another port at its
/// second (`th dport`), before any lookup, and only a connection's first
/// packets walk them (step 4 accepts the rest): a hundred ports cost a new
/// connection a few hundred register compares. A set of a few elements is
/// one small message more per apply; the pipapo set cost every apply.
#[derive(Debug, Clone, Copy)]
struct PortSet {
    family: Family,
    proto: Proto,
    port: u16,
}

impl PortSet {
    fn new(family: Family, proto: Proto, port: u16) -> PortSet {
        PortSet {
            family,
            proto,
            port,
        }
    }

    fn set_name(&self) -> String {
        let PortSet {
            family,
            proto,
            port,
        } = self;
        format!(
            "{}_{proto}_{port}",
            set_name(SetRole::StaticAllow, *family, false)
        )
    }

    fn rule_id(&self) -> String {
        let PortSet {
            family,
            proto,
            port,
        } = self;
        format!("allow-static-{}-{proto}-{port}", family_tag(*family))
    }
}

fn limited_sets(nets: &AllowedNets, options: &CompileOptions) -> Vec<Set> {
    let AllowedNets {
        any_port,
        host_ports,
        by_port,
    } = nets;
    let mut sets = Vec::new();
    for family in FAMILIES {
        let mut resolvers: BTreeSet<Element> = BTreeSet::new();
        for addr in options.resolvers.iter().filter(|a| Family::of(a) == family) {
            let host = IpNet::from(*addr);
            resolvers.insert(Element::AddrProtoPort(host, Proto::Udp, DNS_PORT));
            resolvers.insert(Element::AddrProtoPort(host, Proto::Tcp, DNS_PORT));
        }
        let upstreams = options.proxy.iter().flat_map(|p| &p.upstreams);
        for server in upstreams.filter(|s| Family::of(&s.ip()) == family) {
            let host = IpNet::from(server.ip());
            resolvers.insert(Element::AddrProtoPort(host, Proto::Udp, server.port()));
            resolvers.insert(Element::AddrProtoPort(host, Proto::Tcp, server.port()));
        }
        sets.push(Set {
            name: set_name(SetRole::Resolvers, family, true),
            key: SetKey::AddrProtoPort(family),
            role: SetRole::Resolvers,
            interval: false,
            timeout: false,
            elements: resolvers.into_iter().collect(),
        });

        sets.push(Set {
            name: set_name(SetRole::StaticAllow, family, false),
            key: SetKey::Addr(family),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements: aggregate(family, any_port)
                .into_iter()
                .map(Element::Addr)
                .collect(),
        });

        // Single addresses on their ports: one hash set (see `PortSet`).
        sets.push(Set {
            name: set_name(SetRole::StaticAllow, family, true),
            key: SetKey::AddrProtoPort(family),
            role: SetRole::StaticAllow,
            interval: false,
            timeout: false,
            elements: host_ports
                .iter()
                .filter(|(net, _, _)| Family::of(&net.addr()) == family)
                .map(|&(net, proto, port)| Element::AddrProtoPort(net, proto, port))
                .collect(),
        });

        // Ranges: one address set per protocol and port (see `PortSet`);
        // the one of a port no range of this family is allowed on is empty,
        // and left out with its rule.
        for ((proto, port), nets) in by_port {
            sets.push(Set {
                name: PortSet::new(family, *proto, *port).set_name(),
                key: SetKey::Addr(family),
                role: SetRole::StaticAllow,
                interval: true,
                timeout: false,
                elements: aggregate(family, nets)
                    .into_iter()
                    .map(Element::Addr)
                    .collect(),
            });
        }

        for ported in [false, true] {
            sets.push(Set {
                name: set_name(SetRole::DnsAllow, family, ported),
                key: if ported {
                    SetKey::AddrProtoPort(family)
                } else {
                    SetKey::Addr(family)
                },
                role: SetRole::DnsAllow,
                interval: false,
                timeout: true,
                elements: Vec::new(),
            });
        }
    }
    sets
}

/// Removes the static sets that hold no element, and every rule that looks
/// one of them up. Such a rule never matches: all matches of a rule must
/// hold, and a lookup in an empty set holds for no packet (the model has no
/// inverted set lookup, for which that would not be true; `looked_up_set`
/// lists every match). So the ruleset decides every packet as before, and the
/// kernel creates fewer objects in every generation (a names-only policy has
/// every `allow_*` set empty; an IPv4-only one its IPv6 sets; a port that
/// only addresses of one family are allowed on, its set of the other).
///
/// The DNS-derived sets stay, empty or not: the DNS layer writes into them
/// at run time, and they keep what it learned across re-applies.
fn drop_empty_static_sets(sets: &mut Vec<Set>, chains: &mut [Chain]) {
    let empty: BTreeSet<String> = sets
        .iter()
        .filter(|set| set.role != SetRole::DnsAllow && set.elements.is_empty())
        .map(|set| set.name.clone())
        .collect();
    if empty.is_empty() {
        return;
    }
    sets.retain(|set| !empty.contains(&set.name));
    for chain in chains {
        chain.rules.retain(|rule| {
            !rule
                .matches
                .iter()
                .any(|condition| looked_up_set(condition).is_some_and(|set| empty.contains(set)))
        });
    }
}

/// The set a match holds for only if the packet's key is in it.
fn looked_up_set(condition: &Match) -> Option<&str> {
    match condition {
        Match::DaddrInSet { set, .. }
        | Match::DaddrProtoPortInSet { set, .. }
        | Match::SaddrProtoSportInSet { set, .. } => Some(set),
        Match::OifLoopback
        | Match::CtEstablishedRelated
        | Match::Icmpv6Types(_)
        | Match::L4ProtoIn(_)
        | Match::DportIn(_)
        | Match::Daddr(_)
        | Match::MarkIs(_)
        | Match::MarkIsNot(_) => None,
    }
}

/// The nets of one family, merged so that no two overlap or touch (the
/// kernel rejects overlapping intervals in one set), sorted.
fn aggregate(family: Family, nets: &[IpNet]) -> Vec<IpNet> {
    let of_family: Vec<IpNet> = nets
        .iter()
        .filter(|n| Family::of(&n.addr()) == family)
        .map(|n| n.trunc())
        .collect();
    let mut merged = IpNet::aggregate(&of_family);
    merged.sort();
    merged
}

fn deny_chain(nflog_group: u16) -> Chain {
    let log = Action::Log {
        group: nflog_group,
        prefix: LOG_PREFIX.to_string(),
    };
    Chain {
        name: DENY_CHAIN.to_string(),
        base: None,
        rules: vec![
            Rule {
                id: "deny-tcp".into(),
                description: "log denied TCP to nflog and answer with a TCP reset".into(),
                matches: vec![Match::L4ProtoIn(vec![Proto::Tcp])],
                actions: vec![log.clone(), Action::Reject(RejectKind::TcpReset)],
            },
            Rule {
                id: "deny-other".into(),
                description:
                    "log other denied packets to nflog and answer with ICMP admin-prohibited".into(),
                matches: vec![],
                actions: vec![log, Action::Reject(RejectKind::IcmpxAdminProhibited)],
            },
        ],
    }
}

fn deny_actions() -> Vec<Action> {
    vec![Action::Counter, Action::Jump(DENY_CHAIN.to_string())]
}

/// The allow rules count what they accept. They come after `established`,
/// so they see only the packets that open a connection (a TCP SYN, a UDP
/// flow's packets until the reply): the count is of connections the policy
/// allowed, not of traffic. Status, health and metrics report it beside the
/// deny rules' counters.
fn allow_actions() -> Vec<Action> {
    vec![Action::Counter, Action::Accept]
}

/// `ports`: every protocol and port some address literal or CIDR is allowed
/// on, sorted (a rule each, per family; `PortSet`).
fn egress_chain(limited: bool, proxy: Option<&ProxyOptions>, ports: &[(Proto, u16)]) -> Chain {
    let mut rules = vec![Rule {
        id: "loopback".into(),
        description: "traffic to the sandbox's own loopback interface".into(),
        matches: vec![Match::OifLoopback],
        actions: vec![Action::Accept],
    }];
    if let Some(proxy) = proxy {
        rules.extend(dns_proxy_rules(proxy));
    }
    rules.extend([
        // In both modes: the blocklist below holds fe80::/10.
        Rule {
            id: "icmpv6-neighbour-discovery".into(),
            description:
                "ICMPv6 router/neighbour solicitation, neighbour advertisement, MLDv2 reports"
                    .into(),
            matches: vec![Match::Icmpv6Types(ICMPV6_NEIGHBOUR_DISCOVERY.to_vec())],
            actions: vec![Action::Accept],
        },
    ]);
    for family in FAMILIES {
        rules.push(Rule {
            id: format!("blocklist-{}", family_tag(family)),
            description: "safety blocklist (cloud metadata, link-local), checked before any allow"
                .into(),
            matches: vec![Match::DaddrInSet {
                family,
                set: set_name(SetRole::Blocklist, family, false),
            }],
            actions: deny_actions(),
        });
    }
    if !limited {
        return Chain {
            name: EGRESS_CHAIN.into(),
            base: None,
            rules,
        };
    }

    if let Some(proxy) = proxy {
        rules.push(Rule {
            id: "dns-not-redirected".into(),
            description: "unmarked DNS that was not redirected to the proxy: a packet of a \
                          connection the sandbox did not start"
                .into(),
            matches: vec![
                Match::MarkIsNot(proxy.mark),
                Match::L4ProtoIn(vec![Proto::Tcp, Proto::Udp]),
                Match::DportIn(vec![DNS_PORT]),
            ],
            actions: deny_actions(),
        });
    }
    rules.push(Rule {
        id: "established".into(),
        description: "replies and related traffic of connections that were allowed when they began"
            .into(),
        matches: vec![Match::CtEstablishedRelated],
        actions: vec![Action::Accept],
    });
    for family in FAMILIES {
        let lookup = Match::DaddrProtoPortInSet {
            family,
            set: set_name(SetRole::Resolvers, family, true),
        };
        let (description, matches) = match proxy {
            None => ("DNS to the configured resolvers".into(), vec![lookup]),
            Some(proxy) => (
                "DNS from the sidecar's proxy (its marked sockets) to its upstream resolvers"
                    .into(),
                vec![Match::MarkIs(proxy.mark), lookup],
            ),
        };
        rules.push(Rule {
            id: format!("dns-resolvers-{}", family_tag(family)),
            description,
            matches,
            actions: vec![Action::Accept],
        });
    }
    rules.push(Rule {
        id: "dns-other".into(),
        description: "DNS and DNS over TLS to anything but the configured resolvers".into(),
        matches: vec![
            Match::L4ProtoIn(vec![Proto::Tcp, Proto::Udp]),
            Match::DportIn(DNS_PORTS.to_vec()),
        ],
        actions: deny_actions(),
    });
    for family in FAMILIES {
        rules.push(Rule {
            id: format!("allow-static-{}", family_tag(family)),
            description: "address literals and CIDRs, any port".into(),
            matches: vec![Match::DaddrInSet {
                family,
                set: set_name(SetRole::StaticAllow, family, false),
            }],
            actions: allow_actions(),
        });
        rules.push(Rule {
            id: format!("allow-static-{}-ports", family_tag(family)),
            description: "address literals, on their allowed protocol and port".into(),
            matches: vec![Match::DaddrProtoPortInSet {
                family,
                set: set_name(SetRole::StaticAllow, family, true),
            }],
            actions: allow_actions(),
        });
        for &(proto, port) in ports {
            let port_set = PortSet::new(family, proto, port);
            rules.push(Rule {
                id: port_set.rule_id(),
                description: format!("CIDRs allowed on {port}/{proto}"),
                matches: vec![
                    Match::L4ProtoIn(vec![proto]),
                    Match::DportIn(vec![port]),
                    Match::DaddrInSet {
                        family,
                        set: port_set.set_name(),
                    },
                ],
                actions: allow_actions(),
            });
        }
    }
    for family in FAMILIES {
        let what = "addresses learned from DNS answers for allowed names";
        rules.push(Rule {
            id: format!("allow-dns-{}", family_tag(family)),
            description: format!("{what}, any port"),
            matches: vec![Match::DaddrInSet {
                family,
                set: set_name(SetRole::DnsAllow, family, false),
            }],
            actions: allow_actions(),
        });
        rules.push(Rule {
            id: format!("allow-dns-{}-ports", family_tag(family)),
            description: format!("{what}, on their allowed protocol and port"),
            matches: vec![Match::DaddrProtoPortInSet {
                family,
                set: set_name(SetRole::DnsAllow, family, true),
            }],
            actions: allow_actions(),
        });
    }
    rules.push(Rule {
        id: "default-deny".into(),
        description: "everything the policy does not allow".into(),
        matches: vec![],
        actions: deny_actions(),
    });
    Chain {
        name: EGRESS_CHAIN.into(),
        base: None,
        rules,
    }
}

/// `dns-proxy-v4`/`-v6`: the queries the nat chain redirected to the proxy.
fn dns_proxy_rules(proxy: &ProxyOptions) -> Vec<Rule> {
    let loopbacks = [
        (Family::V4, IpAddr::from(std::net::Ipv4Addr::LOCALHOST)),
        (Family::V6, IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
    ];
    loopbacks
        .into_iter()
        .map(|(family, loopback)| Rule {
            id: format!("dns-proxy-{}", family_tag(family)),
            description: "DNS redirected to the sidecar's proxy on the loopback address".into(),
            matches: vec![
                Match::Daddr(loopback),
                Match::L4ProtoIn(vec![Proto::Tcp, Proto::Udp]),
                Match::DportIn(vec![proxy.port]),
            ],
            actions: vec![Action::Accept],
        })
        .collect()
}

/// The raw chains that track the proxy's upstream connections in the
/// proxy's conntrack zone: its own packets by their mark, and the replies by
/// where they come from (an upstream server's address, protocol and port;
/// only the proxy has connections to those, every other DNS is redirected).
fn proxy_zone_chains(proxy: &ProxyOptions) -> Vec<Chain> {
    let raw = |hook| {
        Some(BaseChain {
            kind: ChainKind::Raw,
            hook,
            priority: RAW_PRIORITY,
            policy: ChainPolicy::Accept,
        })
    };
    let output = Chain {
        name: PROXY_ZONE_OUTPUT_CHAIN.into(),
        base: raw(Hook::Output),
        rules: vec![Rule {
            id: "dns-zone-proxy".into(),
            description: "the proxy's upstream queries are tracked in the proxy's conntrack zone"
                .into(),
            matches: vec![Match::MarkIs(proxy.mark)],
            actions: vec![Action::CtZoneSet(proxy.zone)],
        }],
    };
    let replies = Chain {
        name: PROXY_ZONE_REPLIES_CHAIN.into(),
        base: raw(Hook::Prerouting),
        rules: FAMILIES
            .into_iter()
            .map(|family| Rule {
                id: format!("dns-zone-replies-{}", family_tag(family)),
                description: "replies from the upstream resolvers belong to the proxy's zone"
                    .into(),
                matches: vec![Match::SaddrProtoSportInSet {
                    family,
                    set: set_name(SetRole::Resolvers, family, true),
                }],
                actions: vec![Action::CtZoneSet(proxy.zone)],
            })
            .collect(),
    };
    vec![output, replies]
}

/// The nat chain that sends every DNS packet the proxy did not send itself
/// to the proxy. A redirect on the output hook rewrites the destination to
/// the loopback address of the packet's family (nf_nat_redirect_ipv4/ipv6:
/// 127.0.0.1, ::1) and the packet is routed again, out through `lo`.
fn dns_redirect_chain(proxy: &ProxyOptions) -> Chain {
    Chain {
        name: DNS_REDIRECT_CHAIN.into(),
        base: Some(BaseChain {
            kind: ChainKind::Nat,
            hook: Hook::Output,
            priority: DNS_REDIRECT_PRIORITY,
            policy: ChainPolicy::Accept,
        }),
        rules: vec![Rule {
            id: "dns-redirect".into(),
            description:
                "the sandbox's DNS, to whatever address, goes to the sidecar's filtering proxy"
                    .into(),
            matches: vec![
                Match::MarkIsNot(proxy.mark),
                Match::L4ProtoIn(vec![Proto::Tcp, Proto::Udp]),
                Match::DportIn(vec![DNS_PORT]),
            ],
            actions: vec![Action::Redirect(proxy.port)],
        }],
    }
}

fn base_chain(name: &str, hook: Hook, limited: bool) -> Chain {
    Chain {
        name: name.to_string(),
        base: Some(BaseChain {
            kind: ChainKind::Filter,
            hook,
            priority: 0,
            policy: if limited {
                ChainPolicy::Drop
            } else {
                ChainPolicy::Accept
            },
        }),
        rules: vec![Rule {
            id: format!("{name}-egress"),
            description: format!("{name} traffic goes through the egress policy"),
            matches: vec![],
            actions: vec![Action::Jump(EGRESS_CHAIN.to_string())],
        }],
    }
}

/// The `DnsAllow` set names a name's addresses go into, formatted once
/// rather than twice per name.
struct DnsSetNames {
    any_port: (String, String),
    with_ports: (String, String),
}

impl DnsSetNames {
    fn new() -> DnsSetNames {
        let names = |ported| {
            (
                set_name(SetRole::DnsAllow, Family::V4, ported),
                set_name(SetRole::DnsAllow, Family::V6, ported),
            )
        };
        DnsSetNames {
            any_port: names(false),
            with_ports: names(true),
        }
    }

    /// The binding of a `Name` or `Wildcard` rule.
    fn binding(&self, rule: &HostRule) -> NameBinding {
        let (set_v4, set_v6) = if rule.ports == Ports::Any {
            &self.any_port
        } else {
            &self.with_ports
        };
        NameBinding {
            target: rule.target.clone(),
            ports: rule.ports.clone(),
            sources: rule.sources.iter().cloned().collect(),
            set_v4: set_v4.clone(),
            set_v6: set_v6.clone(),
        }
    }
}

/// `sha256:<hex>` over a canonical encoding of everything that decides
/// enforcement. The encoding is binary (tags, lengths, address octets and
/// big-endian ports) so it is unambiguous and cheap: formatting 10,000 rules
/// as text would take longer than compiling them.
struct RulesetDigest(Sha256);

impl RulesetDigest {
    fn new(mode: Mode) -> RulesetDigest {
        let mut hash = Sha256::new();
        // The layout version: bump it whenever the compiler's output for the
        // same policy changes, so a table from an older netleash never looks current.
        hash.update(b"netleash ruleset v4\0");
        hash.update([match mode {
            Mode::Unrestricted => 0u8,
            Mode::Limited => 1,
        }]);
        RulesetDigest(hash)
    }

    fn net(&mut self, tag: u8, net: &IpNet) {
        self.0.update([tag, net.prefix_len()]);
        match net.addr() {
            IpAddr::V4(addr) => self.0.update(addr.octets()),
            IpAddr::V6(addr) => self.0.update(addr.octets()),
        }
    }

    fn rule(&mut self, rule: &HostRule) {
        match &rule.target {
            Target::Name(name) | Target::Wildcard(name) => {
                let tag = if matches!(rule.target, Target::Name(_)) {
                    b'n'
                } else {
                    b'w'
                };
                self.0.update([tag]);
                self.0.update((name.len() as u32).to_be_bytes());
                self.0.update(name.as_bytes());
            }
            Target::Net(net) => self.net(b'a', net),
        }
        match &rule.ports {
            Ports::Any => self.0.update([b'*']),
            Ports::Only(specs) => {
                self.0.update((specs.len() as u32).to_be_bytes());
                for spec in specs {
                    let proto = match spec.proto {
                        Proto::Tcp => b't',
                        Proto::Udp => b'u',
                    };
                    self.0.update([proto]);
                    self.0.update(spec.port.to_be_bytes());
                }
            }
        }
    }

    /// Adds what is not in the rules and returns `sha256:<hex>`.
    fn finish(mut self, policy: &Policy, options: &CompileOptions) -> String {
        for entry in &policy.blocklist {
            self.net(b'b', &entry.net);
        }
        let resolvers: BTreeSet<IpAddr> = options.resolvers.iter().copied().collect();
        for resolver in resolvers {
            self.net(b'r', &IpNet::from(resolver));
        }
        self.0.update(b"g");
        self.0.update(options.nflog_group.to_be_bytes());
        // Only with a proxy, so the digest of every ruleset without one stays as it was.
        if let (Some(proxy), Mode::Limited) = (&options.proxy, policy.mode) {
            self.0.update(b"p");
            self.0.update(proxy.port.to_be_bytes());
            self.0.update(proxy.mark.to_be_bytes());
            self.0.update(proxy.zone.to_be_bytes());
            let upstreams: BTreeSet<std::net::SocketAddr> =
                proxy.upstreams.iter().copied().collect();
            for upstream in upstreams {
                self.net(b'u', &IpNet::from(upstream.ip()));
                self.0.update(upstream.port().to_be_bytes());
            }
        }
        format!("sha256:{}", hex::encode(self.0.finalize()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{BlockEntry, Dialect};

    /// One entry per family: an empty blocklist set would be left out.
    fn link_local_blocklist() -> Vec<BlockEntry> {
        ["169.254.0.0/16", "fe80::/10"]
            .into_iter()
            .map(|net| BlockEntry {
                net: net.parse().unwrap(),
                reason: "link-local".into(),
            })
            .collect()
    }

    fn egress_ids(mode: Mode) -> Vec<String> {
        let policy = Policy {
            mode,
            dialect: Dialect::Limited,
            rules: vec![],
            blocklist: link_local_blocklist(),
            warnings: vec![],
        };
        let ruleset = compile(&policy, &CompileOptions::default());
        ruleset
            .chain(EGRESS_CHAIN)
            .unwrap()
            .rules
            .iter()
            .map(|r| r.id.clone())
            .collect()
    }

    fn proxy() -> ProxyOptions {
        ProxyOptions {
            port: 1053,
            mark: 0x6e6c,
            upstreams: vec![
                "192.0.2.53:53".parse().unwrap(),
                "[2001:db8::53]:5353".parse().unwrap(),
            ],
            zone: 0x6e6c,
        }
    }

    fn empty(mode: Mode) -> Policy {
        Policy {
            mode,
            dialect: Dialect::Limited,
            rules: vec![],
            blocklist: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn with_a_proxy_dns_is_redirected_and_only_the_proxy_reaches_the_upstreams() {
        let options = CompileOptions {
            proxy: Some(proxy()),
            ..CompileOptions::default()
        };
        let ruleset = compile(&empty(Mode::Limited), &options);
        let redirect = ruleset.chain(DNS_REDIRECT_CHAIN).expect("a nat chain");
        assert_eq!(redirect.base.map(|b| b.kind), Some(ChainKind::Nat));
        assert_eq!(redirect.rules[0].matches[0], Match::MarkIsNot(0x6e6c));
        assert_eq!(redirect.rules[0].actions, vec![Action::Redirect(1053)]);

        let egress = ruleset.chain(EGRESS_CHAIN).unwrap();
        let ids: Vec<&str> = egress.rules.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(ids[..3], ["loopback", "dns-proxy-v4", "dns-proxy-v6"]);
        for rule in egress
            .rules
            .iter()
            .filter(|r| r.id.starts_with("dns-resolvers"))
        {
            assert_eq!(rule.matches[0], Match::MarkIs(0x6e6c), "{}", rule.id);
        }
        // The upstreams, with their own ports, are the resolvers.
        let v6 = ruleset.set("resolvers_v6_ports").unwrap();
        assert!(v6.elements.contains(&Element::AddrProtoPort(
            "2001:db8::53/128".parse().unwrap(),
            Proto::Udp,
            5353
        )));
    }

    #[test]
    fn without_a_proxy_or_in_unrestricted_mode_the_ruleset_has_no_proxy_parts() {
        let plain = compile(&empty(Mode::Limited), &CompileOptions::default());
        let proxied = compile(
            &empty(Mode::Limited),
            &CompileOptions {
                proxy: Some(proxy()),
                ..CompileOptions::default()
            },
        );
        assert_ne!(plain.digest, proxied.digest);
        assert!(plain.chain(DNS_REDIRECT_CHAIN).is_none());

        let unrestricted = compile(&empty(Mode::Unrestricted), &CompileOptions::default());
        let unrestricted_proxied = compile(
            &empty(Mode::Unrestricted),
            &CompileOptions {
                proxy: Some(proxy()),
                ..CompileOptions::default()
            },
        );
        assert_eq!(unrestricted, unrestricted_proxied);
    }

    /// A names-only policy with IPv4 resolvers: its static allow sets and
    /// its IPv6 resolver set would be empty, so they and the rules that look
    /// them up are left out; the blocklist and the DNS-derived sets stay, and
    /// every rule left looks up a set the ruleset has.
    #[test]
    fn empty_static_sets_and_their_rules_are_left_out() {
        let policy = Policy {
            mode: Mode::Limited,
            dialect: Dialect::Limited,
            rules: vec![HostRule {
                target: Target::Name("api.example.com".into()),
                ports: Ports::Any,
                sources: [crate::policy::Source::AllowedHosts].into(),
                entry: "api.example.com".into(),
            }],
            blocklist: link_local_blocklist(),
            warnings: vec![],
        };
        let options = CompileOptions {
            resolvers: vec!["192.0.2.53".parse().unwrap()],
            ..CompileOptions::default()
        };
        let ruleset = compile(&policy, &options);
        let sets: Vec<&str> = ruleset.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(
            sets,
            [
                "blocklist_v4",
                "blocklist_v6",
                "resolvers_v4_ports",
                "dns_v4",
                "dns_v4_ports",
                "dns_v6",
                "dns_v6_ports"
            ]
        );
        let ids: Vec<&str> = ruleset
            .chain(EGRESS_CHAIN)
            .unwrap()
            .rules
            .iter()
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(
            ids,
            [
                "loopback",
                "icmpv6-neighbour-discovery",
                "blocklist-v4",
                "blocklist-v6",
                "established",
                "dns-resolvers-v4",
                "dns-other",
                "allow-dns-v4",
                "allow-dns-v4-ports",
                "allow-dns-v6",
                "allow-dns-v6-ports",
                "default-deny"
            ]
        );
        for rule in ruleset.chains.iter().flat_map(|c| &c.rules) {
            for set in rule.matches.iter().filter_map(looked_up_set) {
                assert!(ruleset.set(set).is_some(), "{} looks up {set}", rule.id);
            }
        }
    }

    /// Single addresses restricted to ports share one hash set per family
    /// keyed address . protocol . port; CIDRs restricted to ports get one
    /// address interval set per family, protocol and port (an rbtree in the
    /// kernel, never a concatenated pipapo set), looked up by a rule that
    /// checks the protocol and port first; a port no range of a family is
    /// allowed on has no set or rule in that family. Sets and rules come in
    /// the order of (protocol, port), whatever the order of the policy.
    #[test]
    fn ported_addresses_share_a_hash_set_and_ranges_get_a_set_per_port() {
        let rule = |net: &str, ports: &[(Proto, u16)]| HostRule {
            target: Target::Net(net.parse().unwrap()),
            ports: Ports::only(ports.iter().copied()),
            sources: [crate::policy::Source::AllowedHosts].into(),
            entry: net.into(),
        };
        let policy = Policy {
            rules: vec![
                rule("198.51.100.0/25", &[(Proto::Udp, 443), (Proto::Tcp, 443)]),
                rule("198.51.100.128/25", &[(Proto::Tcp, 443)]),
                rule("2001:db8::7/128", &[(Proto::Tcp, 22)]),
                rule("192.0.2.7/32", &[(Proto::Tcp, 22)]),
            ],
            ..empty(Mode::Limited)
        };
        let ruleset = compile(&policy, &CompileOptions::default());
        // Single addresses on ports: one hash set per family, keyed
        // address . protocol . port.
        for (name, family, elements) in [
            ("allow_v4_ports", Family::V4, "192.0.2.7/32 tcp 22"),
            ("allow_v6_ports", Family::V6, "2001:db8::7/128 tcp 22"),
        ] {
            let set = ruleset.set(name).unwrap();
            assert_eq!(
                (set.key, set.interval, set.timeout),
                (SetKey::AddrProtoPort(family), false, false)
            );
            let listed: Vec<String> = set
                .elements
                .iter()
                .map(|e| match e {
                    Element::AddrProtoPort(net, proto, port) => format!("{net} {proto} {port}"),
                    Element::Addr(net) => net.to_string(),
                })
                .collect();
            assert_eq!(listed, [elements]);
        }
        let allow: Vec<(&str, Vec<String>)> = ruleset
            .sets
            .iter()
            .filter(|s| s.role == SetRole::StaticAllow && !s.name.ends_with("_ports"))
            .map(|s| {
                assert_eq!(
                    (s.key, s.interval, s.timeout),
                    (SetKey::Addr(s.key.family()), true, false)
                );
                let elements = s.elements.iter().map(|e| e.net().to_string()).collect();
                (s.name.as_str(), elements)
            })
            .collect();
        assert_eq!(
            allow,
            [
                // The two halves merge into one range.
                ("allow_v4_tcp_443", vec!["198.51.100.0/24".to_string()]),
                ("allow_v4_udp_443", vec!["198.51.100.0/25".to_string()]),
            ]
        );
        let egress = ruleset.chain(EGRESS_CHAIN).unwrap();
        let allowing: Vec<&Rule> = egress
            .rules
            .iter()
            .filter(|r| r.id.starts_with("allow-static-"))
            .collect();
        let ids: Vec<&str> = allowing.iter().map(|r| r.id.as_str()).collect();
        assert_eq!(
            ids,
            [
                "allow-static-v4-ports",
                "allow-static-v4-tcp-443",
                "allow-static-v4-udp-443",
                "allow-static-v6-ports",
            ]
        );
        assert_eq!(
            allowing[2].matches,
            [
                Match::L4ProtoIn(vec![Proto::Udp]),
                Match::DportIn(vec![443]),
                Match::DaddrInSet {
                    family: Family::V4,
                    set: "allow_v4_udp_443".into()
                }
            ]
        );
        assert!(allowing.iter().all(|r| r.actions == allow_actions()));
        // After the DNS rules, before the DNS-derived sets' rules.
        let position = |id: &str| egress.rules.iter().position(|r| r.id == id).unwrap();
        assert!(position("dns-other") < position("allow-static-v4-ports"));
        assert!(position("allow-static-v6-ports") < position("allow-dns-v4"));
    }

    /// Neighbour discovery talks to link-local addresses (RFC 4861 §4), so it
    /// must be accepted before a blocklist that holds fe80::/10, in both modes.
    #[test]
    fn neighbour_discovery_precedes_the_blocklist() {
        for mode in [Mode::Limited, Mode::Unrestricted] {
            let ids = egress_ids(mode);
            assert_eq!(
                ids[..4],
                [
                    "loopback",
                    "icmpv6-neighbour-discovery",
                    "blocklist-v4",
                    "blocklist-v6"
                ],
                "{mode:?}"
            );
        }
    }
}
