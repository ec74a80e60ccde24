//! `nft -f` text.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv6Addr};

use ipnet::IpNet;

use super::{addr_protocol, icmpv6_type_name, key_types, proto_name};
use crate::ruleset::model::{
    Action, BaseChain, Chain, ChainKind, ChainPolicy, Element, Family, Hook, Match, RejectKind,
    Rule, Ruleset, Set, TABLE_NAME,
};

/// A set with more elements than this lists one element per line.
const INLINE_ELEMENTS_MAX: usize = 3;

/// The ruleset as `nft -f` input that replaces the `netleash` table atomically.
pub fn nft(ruleset: &Ruleset) -> String {
    // About 40 bytes per element plus the chains: one allocation for most rulesets.
    let elements: usize = ruleset.sets.iter().map(|s| s.elements.len()).sum();
    let mut out = String::with_capacity(8192 + 40 * elements);
    let mode = match ruleset.mode {
        crate::policy::Mode::Unrestricted => "unrestricted",
        crate::policy::Mode::Limited => "limited",
    };
    let _ = writeln!(
        out,
        "# netleash ruleset, mode {mode}. `nft -f` applies this file as one transaction:"
    );
    let _ = writeln!(
        out,
        "# it replaces table inet {TABLE_NAME} and touches no other table."
    );
    // Creating the table first makes the delete valid when it does not exist yet.
    let _ = writeln!(out, "table inet {TABLE_NAME}");
    let _ = writeln!(out, "delete table inet {TABLE_NAME}");
    let _ = writeln!(out);
    let _ = writeln!(out, "table inet {TABLE_NAME} {{");
    let _ = writeln!(out, "\tcomment {}", quoted(&ruleset.digest));
    for set in &ruleset.sets {
        let _ = writeln!(out);
        write_set(&mut out, set);
    }
    for chain in &ruleset.chains {
        let _ = writeln!(out);
        write_chain(&mut out, chain);
    }
    let _ = writeln!(out, "}}");
    out
}

fn write_set(out: &mut String, set: &Set) {
    let _ = writeln!(out, "\tset {} {{", set.name);
    let _ = writeln!(out, "\t\ttype {}", key_types(set.key).join(" . "));
    let flags: Vec<&str> = [(set.interval, "interval"), (set.timeout, "timeout")]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect();
    if !flags.is_empty() {
        let _ = writeln!(out, "\t\tflags {}", flags.join(","));
    }
    if set.elements.len() > INLINE_ELEMENTS_MAX {
        let _ = writeln!(out, "\t\telements = {{");
        for element in &set.elements {
            out.push_str("\t\t\t");
            write_element(out, element);
            out.push_str(",\n");
        }
        let _ = writeln!(out, "\t\t}}");
    } else if !set.elements.is_empty() {
        out.push_str("\t\telements = { ");
        for (i, element) in set.elements.iter().enumerate() {
            if i > 0 {
                out.push_str(", ");
            }
            write_element(out, element);
        }
        out.push_str(" }\n");
    }
    let _ = writeln!(out, "\t}}");
}

/// Writes into `out` directly: a ruleset can hold tens of thousands of
/// elements, and formatting through `Display` costs several times more.
fn write_net(out: &mut String, net: &IpNet) {
    match net.addr() {
        IpAddr::V4(addr) => {
            for (i, octet) in addr.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                write_decimal(out, octet.into());
            }
        }
        IpAddr::V6(addr) => write_ipv6(out, addr),
    }
    if net.prefix_len() != net.max_prefix_len() {
        out.push('/');
        write_decimal(out, net.prefix_len().into());
    }
}

fn write_decimal(out: &mut String, n: u16) {
    let mut digits = [0u8; 5];
    let mut len = 0;
    let mut rest = n;
    loop {
        digits[len] = b'0' + (rest % 10) as u8;
        len += 1;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    for &digit in digits[..len].iter().rev() {
        out.push(char::from(digit));
    }
}

/// RFC 5952 §4 text: lowercase hex without leading zeros, the longest run
/// of two or more zero groups (the first on a tie) as `::`. Addresses in
/// ::/80 (IPv4-mapped and -compatible forms, written with a dotted quad by
/// some tools) go through `Ipv6Addr`'s Display, which handles them.
fn write_ipv6(out: &mut String, addr: Ipv6Addr) {
    let groups = addr.segments();
    if groups[..5] == [0; 5] {
        let _ = write!(out, "{addr}");
        return;
    }
    let (mut best_start, mut best_len) = (0, 0);
    let mut i = 0;
    while i < 8 {
        if groups[i] == 0 {
            let start = i;
            while i < 8 && groups[i] == 0 {
                i += 1;
            }
            if i - start > best_len {
                (best_start, best_len) = (start, i - start);
            }
        } else {
            i += 1;
        }
    }
    let compressed = if best_len >= 2 {
        best_start..best_start + best_len
    } else {
        8..8
    };
    let mut i = 0;
    while i < 8 {
        if i == compressed.start {
            out.push_str("::");
            i = compressed.end;
            continue;
        }
        if i > 0 && i != compressed.end {
            out.push(':');
        }
        write_hex(out, groups[i]);
        i += 1;
    }
}

fn write_hex(out: &mut String, group: u16) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut started = false;
    for shift in [12, 8, 4, 0] {
        let nibble = usize::from((group >> shift) & 0xf);
        if nibble != 0 || started || shift == 0 {
            out.push(char::from(HEX[nibble]));
            started = true;
        }
    }
}

fn write_element(out: &mut String, element: &Element) {
    match element {
        Element::Addr(net) => write_net(out, net),
        Element::AddrProtoPort(net, proto, port) => {
            write_net(out, net);
            out.push_str(" . ");
            out.push_str(proto_name(*proto));
            out.push_str(" . ");
            write_decimal(out, *port);
        }
    }
}

fn write_chain(out: &mut String, chain: &Chain) {
    let _ = writeln!(out, "\tchain {} {{", chain.name);
    if let Some(base) = &chain.base {
        let _ = writeln!(out, "\t\t{}", base_chain_text(base));
    }
    for rule in &chain.rules {
        let _ = writeln!(out, "\t\t{}", rule_text(rule));
    }
    let _ = writeln!(out, "\t}}");
}

fn base_chain_text(base: &BaseChain) -> String {
    let hook = match base.hook {
        Hook::Output => "output",
        Hook::Forward => "forward",
        Hook::Prerouting => "prerouting",
    };
    // `filter` and `raw` are the named priorities 0 and -300 (nft(8),
    // "PRIORITY"). nft 1.0.6 knows `dstnat` (-100) only on the prerouting
    // hook, so a nat chain's priority is written as a number.
    let named = |name: &str, zero: i32| match base.priority - zero {
        0 => name.to_string(),
        p if p > 0 => format!("{name} + {p}"),
        p => format!("{name} - {}", p.unsigned_abs()),
    };
    let (kind, priority) = match base.kind {
        ChainKind::Filter => ("filter", named("filter", 0)),
        ChainKind::Raw => ("filter", named("raw", -300)),
        ChainKind::Nat => ("nat", base.priority.to_string()),
    };
    let policy = match base.policy {
        ChainPolicy::Accept => "accept",
        ChainPolicy::Drop => "drop",
    };
    format!("type {kind} hook {hook} priority {priority}; policy {policy};")
}

/// One value, or an anonymous set `{ a, b }` of several.
fn one_or_set(values: Vec<String>) -> String {
    if values.len() == 1 {
        values.into_iter().next().unwrap_or_default()
    } else {
        format!("{{ {} }}", values.join(", "))
    }
}

fn match_text(m: &Match) -> String {
    match m {
        Match::OifLoopback => "oif \"lo\"".to_string(),
        Match::CtEstablishedRelated => "ct state established,related".to_string(),
        Match::Icmpv6Types(types) => {
            let names = types.iter().map(|t| {
                icmpv6_type_name(*t)
                    .map(str::to_string)
                    .unwrap_or_else(|| t.to_string())
            });
            format!("icmpv6 type {}", one_or_set(names.collect()))
        }
        Match::L4ProtoIn(protos) => {
            format!(
                "meta l4proto {}",
                one_or_set(protos.iter().map(|p| proto_name(*p).to_string()).collect())
            )
        }
        Match::DportIn(ports) => format!(
            "th dport {}",
            one_or_set(ports.iter().map(u16::to_string).collect())
        ),
        Match::DaddrInSet { family, set } => format!("{} daddr @{set}", addr_protocol(*family)),
        Match::DaddrProtoPortInSet { family, set } => {
            format!(
                "{} daddr . meta l4proto . th dport @{set}",
                addr_protocol(*family)
            )
        }
        Match::Daddr(addr) => format!("{} daddr {addr}", addr_protocol(Family::of(addr))),
        Match::SaddrProtoSportInSet { family, set } => {
            format!(
                "{} saddr . meta l4proto . th sport @{set}",
                addr_protocol(*family)
            )
        }
        Match::MarkIs(mark) => format!("meta mark {mark:#010x}"),
        Match::MarkIsNot(mark) => format!("meta mark != {mark:#010x}"),
    }
}

fn action_text(action: &Action) -> String {
    match action {
        Action::Counter => "counter".to_string(),
        Action::Log { group, prefix } => format!("log group {group} prefix {}", quoted(prefix)),
        Action::Accept => "accept".to_string(),
        Action::Drop => "drop".to_string(),
        Action::Reject(RejectKind::TcpReset) => "reject with tcp reset".to_string(),
        Action::Reject(RejectKind::IcmpxAdminProhibited) => {
            "reject with icmpx admin-prohibited".to_string()
        }
        Action::Jump(chain) => format!("jump {chain}"),
        Action::Redirect(port) => format!("redirect to :{port}"),
        Action::CtZoneSet(zone) => format!("ct zone set {zone}"),
    }
}

fn rule_text(rule: &Rule) -> String {
    let mut parts: Vec<String> = rule.matches.iter().map(match_text).collect();
    parts.extend(rule.actions.iter().map(action_text));
    parts.push(format!("comment {}", quoted(&rule.id)));
    parts.join(" ")
}

/// An nft string literal. nft strings have no escapes, so a `"` (never in
/// compiler output) is replaced rather than allowed to end the string early.
fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Proto;
    use crate::ruleset::model::{Family, SetKey, SetRole};

    fn set(elements: Vec<Element>) -> Set {
        Set {
            name: "concatenated_v4".into(),
            key: SetKey::AddrProtoPort(Family::V4),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements,
        }
    }

    #[test]
    fn few_elements_stay_on_one_line_and_many_get_one_line_each() {
        let one = Element::AddrProtoPort("10.0.0.0/8".parse().unwrap(), Proto::Tcp, 443);
        let host = Element::AddrProtoPort("198.51.100.7/32".parse().unwrap(), Proto::Udp, 443);
        let mut out = String::new();
        write_set(&mut out, &set(vec![one, host]));
        assert_eq!(
            out,
            "\tset concatenated_v4 {\n\t\ttype ipv4_addr . inet_proto . inet_service\n\t\tflags interval\n\
             \t\telements = { 10.0.0.0/8 . tcp . 443, 198.51.100.7 . udp . 443 }\n\t}\n"
        );

        let many: Vec<Element> = (1..=4)
            .map(|i| {
                Element::AddrProtoPort(format!("192.0.2.{i}/32").parse().unwrap(), Proto::Tcp, 80)
            })
            .collect();
        let mut out = String::new();
        write_set(&mut out, &set(many));
        assert!(
            out.contains(
                "\t\telements = {\n\t\t\t192.0.2.1 . tcp . 80,\n\t\t\t192.0.2.2 . tcp . 80,\n"
            ),
            "{out}"
        );
    }

    #[test]
    fn addresses_and_prefixes_are_written_in_nft_notation() {
        for (net, text) in [
            ("0.0.0.0/0", "0.0.0.0/0"),
            ("10.9.100.255/32", "10.9.100.255"),
            ("192.168.0.0/16", "192.168.0.0/16"),
            ("2001:db8::/32", "2001:db8::/32"),
            ("::1/128", "::1"),
            ("::ffff:192.0.2.1/128", "::ffff:192.0.2.1"),
            ("fe80::/10", "fe80::/10"),
        ] {
            let mut out = String::new();
            write_net(&mut out, &net.parse().unwrap());
            assert_eq!(out, text);
        }
    }

    /// The hand-written IPv6 text equals `Ipv6Addr`'s RFC 5952 Display for
    /// zero runs of every length and position, and for pseudo-random addresses.
    #[test]
    fn ipv6_text_matches_the_standard_library() {
        let mut addresses: Vec<Ipv6Addr> = Vec::new();
        for mask in 0u16..256 {
            let groups: [u16; 8] = std::array::from_fn(|i| {
                if mask & (1 << i) != 0 {
                    0x20 + i as u16 * 0x1001
                } else {
                    0
                }
            });
            addresses.push(Ipv6Addr::from(groups));
        }
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2_000 {
            // xorshift64: deterministic, no dependency.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let zero_mask = (state >> 48) as u16;
            let groups: [u16; 8] = std::array::from_fn(|i| {
                if zero_mask & (1 << i) != 0 {
                    0
                } else {
                    (state >> (i * 8)) as u16
                }
            });
            addresses.push(Ipv6Addr::from(groups));
        }
        for addr in addresses {
            let mut out = String::new();
            write_ipv6(&mut out, addr);
            assert_eq!(out, addr.to_string(), "{:?}", addr.segments());
        }
    }

    #[test]
    fn an_empty_set_has_no_elements_line_and_both_flags_are_joined() {
        let mut s = set(vec![]);
        s.timeout = true;
        let mut out = String::new();
        write_set(&mut out, &s);
        assert!(!out.contains("elements"), "{out}");
        assert!(out.contains("flags interval,timeout\n"), "{out}");
    }

    #[test]
    fn rules_render_matches_then_actions_then_the_id_as_comment() {
        let rule = Rule {
            id: "dns-other".into(),
            description: String::new(),
            matches: vec![
                Match::L4ProtoIn(vec![Proto::Tcp, Proto::Udp]),
                Match::DportIn(vec![53, 853]),
            ],
            actions: vec![Action::Counter, Action::Jump("deny".into())],
        };
        assert_eq!(
            rule_text(&rule),
            "meta l4proto { tcp, udp } th dport { 53, 853 } counter jump deny comment \"dns-other\""
        );
        let icmp = Match::Icmpv6Types(vec![133, 135, 200]);
        assert_eq!(
            match_text(&icmp),
            "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, 200 }"
        );
        let v6 = Match::DaddrProtoPortInSet {
            family: Family::V6,
            set: "dns_v6_ports".into(),
        };
        assert_eq!(
            match_text(&v6),
            "ip6 daddr . meta l4proto . th dport @dns_v6_ports"
        );
    }

    #[test]
    fn base_chain_priority_is_named_relative_to_filter() {
        let mut base = BaseChain {
            kind: ChainKind::Filter,
            hook: Hook::Forward,
            priority: 0,
            policy: ChainPolicy::Drop,
        };
        assert_eq!(
            base_chain_text(&base),
            "type filter hook forward priority filter; policy drop;"
        );
        base.priority = -10;
        base.policy = ChainPolicy::Accept;
        assert_eq!(
            base_chain_text(&base),
            "type filter hook forward priority filter - 10; policy accept;"
        );
        let nat = BaseChain {
            kind: ChainKind::Nat,
            hook: Hook::Output,
            priority: -100,
            policy: ChainPolicy::Accept,
        };
        assert_eq!(
            base_chain_text(&nat),
            "type nat hook output priority -100; policy accept;"
        );
    }

    #[test]
    fn proxy_matches_and_the_redirect_render_as_nft_writes_them() {
        let rule = Rule {
            id: "dns-redirect".into(),
            description: String::new(),
            matches: vec![
                Match::MarkIsNot(0x6e6c),
                Match::L4ProtoIn(vec![Proto::Tcp, Proto::Udp]),
                Match::DportIn(vec![53]),
            ],
            actions: vec![Action::Redirect(1053)],
        };
        assert_eq!(
            rule_text(&rule),
            "meta mark != 0x00006e6c meta l4proto { tcp, udp } th dport 53 redirect to :1053 \
             comment \"dns-redirect\""
        );
        assert_eq!(match_text(&Match::MarkIs(7)), "meta mark 0x00000007");
        assert_eq!(
            match_text(&Match::Daddr("::1".parse().unwrap())),
            "ip6 daddr ::1"
        );
        assert_eq!(
            match_text(&Match::Daddr("127.0.0.1".parse().unwrap())),
            "ip daddr 127.0.0.1"
        );
    }
}
