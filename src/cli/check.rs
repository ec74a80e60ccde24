//! `netleash check`: would a connection to this destination be allowed, and
//! which rule decides?

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{IpAddr, ToSocketAddrs};

use super::policy_args::PolicyArgs;
use crate::policy::hosts::{self, HostSpec};
use crate::policy::{HostRule, Mode, Policy, Proto, Target};
use crate::ruleset::evaluate::{
    self, Decider, Destination, Evaluation, Group, Learned, Probe, Verdict,
};
use crate::ruleset::{self, Family, RejectKind, Ruleset};

const AFTER_HELP: &str = "\
DEST is HOST|IP[:PORT][/tcp|udp]: a name or an address, an optional port, and
an optional protocol (default tcp). Bracket an IPv6 address to give a port.
Without a port, every port is tried and the answer lists where the destination
is allowed; it counts as allowed if some port is. Without a protocol and port,
both TCP and UDP are tried.

A name is matched as a name against the policy: allowed means its addresses,
once the sandbox's resolver learns them, go into a DNS set that a rule
accepts. --resolve also resolves the name now with the system resolver and
checks each address as the kernel would (the safety blocklist wins even over
an allowed name); the answer is then allowed only if every address is.

Exit codes: 0 allowed, 1 blocked, 2 invalid input, 3 system error.

Examples:
  netleash check policy.json --to pypi.org:443
  netleash check policy.json --to files.pythonhosted.org
  netleash check policy.json --to 169.254.169.254:80
  netleash check policy.json --to '[2001:db8::1]:443/udp'
  netleash check policy.json --to 2001:db8::1
  netleash check policy.json --to example.com/udp --resolve";

/// Tell whether a connection to a destination would be allowed, and by which rule.
#[derive(Debug, clap::Args)]
#[command(after_help = AFTER_HELP)]
pub struct Args {
    #[command(flatten)]
    pub policy: PolicyArgs,

    /// The destination: HOST|IP[:PORT][/tcp|udp].
    #[arg(long, value_name = "DEST", value_parser = parse_to)]
    pub to: To,

    /// Also resolve a name with the system resolver and check its current addresses.
    #[arg(long)]
    pub resolve: bool,
}

/// A parsed `--to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct To {
    pub destination: Destination,
    pub port: Option<u16>,
    pub proto: Option<Proto>,
    /// Set when an IPv4-mapped IPv6 address was given: the kernel sends such
    /// a connection as IPv4, so it is checked as the IPv4 address.
    pub mapped_from: Option<IpAddr>,
}

impl To {
    fn probe(&self) -> Probe {
        Probe {
            destination: self.destination.clone(),
            proto: self.proto,
            port: self.port,
        }
    }
}

/// Parse `HOST|IP[:PORT][/tcp|udp]`.
pub fn parse_to(text: &str) -> Result<To, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err(
            "empty destination; write HOST|IP[:PORT][/tcp|udp], e.g. example.com:443".into(),
        );
    }
    if let Some((scheme, _)) = text.split_once("://") {
        return Err(format!(
            "`{scheme}://` is a URL scheme; write the host and port instead, e.g. example.com:443"
        ));
    }
    let (rest, proto) = match text.rsplit_once('/') {
        None => (text, None),
        Some((rest, suffix)) => match suffix.to_ascii_lowercase().as_str() {
            "tcp" => (rest, Some(Proto::Tcp)),
            "udp" => (rest, Some(Proto::Udp)),
            s if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!(
                    "`{text}` is a network; check one address, e.g. {rest}"
                ));
            }
            _ => return Err(format!("unknown protocol `/{suffix}`; use /tcp or /udp")),
        },
    };
    let (host, port) = if let Some(bracketed) = rest.strip_prefix('[') {
        let (inside, after) = bracketed
            .split_once(']')
            .ok_or_else(|| format!("`{rest}` has no closing `]`; write [2001:db8::1]:443"))?;
        let addr: std::net::Ipv6Addr = inside
            .parse()
            .map_err(|_| format!("`{inside}` in brackets is not an IPv6 address"))?;
        let port = match after {
            "" => None,
            _ => Some(parse_port(after.strip_prefix(':').ok_or_else(|| {
                format!("unexpected `{after}` after `]`; write [{inside}]:PORT")
            })?)?),
        };
        (Host::Addr(IpAddr::V6(addr)), port)
    } else if let Ok(addr) = rest.parse::<IpAddr>() {
        // A bare IPv6 address has colons but no port: `2001:db8::1`.
        (Host::Addr(addr), None)
    } else if let Some((host, port)) = rest.rsplit_once(':') {
        if host.contains(':') {
            return Err(format!(
                "`{rest}` is not an IPv6 address; to give a port, bracket the address: [2001:db8::1]:443"
            ));
        }
        (parse_host(host)?, Some(parse_port(port)?))
    } else {
        (parse_host(rest)?, None)
    };
    let (destination, mapped_from) = match host {
        Host::Addr(addr) if addr.to_canonical() != addr => {
            (Destination::Addr(addr.to_canonical()), Some(addr))
        }
        Host::Addr(addr) => (Destination::Addr(addr), None),
        Host::Name(name) => (Destination::Name(name), None),
    };
    Ok(To {
        destination,
        port,
        proto,
        mapped_from,
    })
}

enum Host {
    Addr(IpAddr),
    Name(String),
}

fn parse_port(text: &str) -> Result<u16, String> {
    match text.parse::<u32>() {
        Ok(port @ 1..=65535) => Ok(port as u16),
        Ok(_) => Err(format!("port {text} is out of range; ports are 1-65535")),
        Err(_) => Err(format!("`{text}` is not a port; ports are 1-65535")),
    }
}

/// A name normalized and validated exactly as an `allowed_hosts` entry is
/// (lowercase, punycode, no trailing dot, RFC 1035 lengths); an IP literal is
/// an address.
fn parse_host(text: &str) -> Result<Host, String> {
    if let Ok(addr) = text.parse::<IpAddr>() {
        return Ok(Host::Addr(addr));
    }
    if text.contains('*') {
        return Err(format!(
            "`{text}` is a wildcard; check one name below it, e.g. {}",
            text.replace('*', "www")
        ));
    }
    match hosts::parse_entry(text) {
        Ok(HostSpec {
            target: Target::Name(name),
            ..
        }) => Ok(Host::Name(name)),
        Ok(HostSpec { target, .. }) => Err(format!("`{text}` is {target}, not one host")),
        Err(invalid) => Err(invalid.to_string()),
    }
}

pub fn run(args: Args) -> Result<u8, super::Error> {
    let (policy, options) = args.policy.load()?;
    let ruleset = ruleset::compile(&policy, &options);
    let resolved = match (&args.to.destination, args.resolve) {
        (Destination::Name(name), true) => Some(resolve(name)?),
        _ => None,
    };
    let (text, allowed) = report(&policy, &ruleset, &args.to, resolved.as_deref());
    std::io::stdout()
        .lock()
        .write_all(text.as_bytes())
        .map_err(super::Error::Output)?;
    Ok(if allowed {
        super::EXIT_OK
    } else {
        super::EXIT_BLOCKED
    })
}

/// The name's addresses from the system resolver (getaddrinfo: /etc/hosts,
/// then DNS), IPv4 first, without duplicates.
fn resolve(name: &str) -> Result<Vec<IpAddr>, super::Error> {
    let resolve_error = |source| super::Error::Resolve(name.to_string(), source);
    let mut addrs: Vec<IpAddr> = (name, 0u16)
        .to_socket_addrs()
        .map_err(resolve_error)?
        .map(|a| a.ip().to_canonical())
        .collect();
    addrs.sort_by_key(|a| (a.is_ipv6(), *a));
    addrs.dedup();
    if addrs.is_empty() {
        return Err(resolve_error(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "no address",
        )));
    }
    Ok(addrs)
}

/// The text `check` prints, and whether the destination is allowed. With
/// `resolved` (the name's current addresses), allowed means every address is.
pub fn report(
    policy: &Policy,
    ruleset: &Ruleset,
    to: &To,
    resolved: Option<&[IpAddr]>,
) -> (String, bool) {
    let probe = to.probe();
    let evaluation = evaluate::evaluate(ruleset, &probe, &Learned::default());
    let mut allowed = evaluation.allowed();
    let mut body = String::new();
    match &to.destination {
        Destination::Addr(addr) => {
            write_groups(&mut body, &evaluation, "  ");
            if let Some(original) = to.mapped_from {
                let _ = writeln!(
                    body,
                    "  {original} is IPv4-mapped: the kernel sends it as IPv4 to {addr}"
                );
            }
            for rule in &policy.rules {
                if matches!(rule.target, Target::Net(net) if net.contains(addr)) {
                    let _ = writeln!(body, "  covered by policy entry {}", entry_text(rule));
                }
            }
            if addr.is_ipv6() && to.port.is_none() {
                let _ = writeln!(
                    body,
                    "  to check one port, bracket the address: [{addr}]:PORT"
                );
            }
        }
        Destination::Name(name) => {
            let indent = if resolved.is_some() {
                let _ = writeln!(body, "  as a name:");
                "    "
            } else {
                "  "
            };
            write_groups(&mut body, &evaluation, indent);
            write_name_details(&mut body, policy, &evaluation, indent, resolved.is_some());
            if let Some(addrs) = resolved {
                let learned = Learned::from_answer(ruleset, name, addrs);
                let list: Vec<String> = addrs.iter().map(ToString::to_string).collect();
                let _ = writeln!(
                    body,
                    "  its addresses now, from the system resolver{}: {}",
                    if evaluation.bindings.is_empty() {
                        ""
                    } else {
                        ", added to the sets above as the resolver loop would"
                    },
                    list.join(", ")
                );
                let mut all_allowed = true;
                for addr in addrs {
                    let probe = Probe {
                        destination: Destination::Addr(*addr),
                        ..probe.clone()
                    };
                    let address = evaluate::evaluate(ruleset, &probe, &learned);
                    let verdict = if address.allowed() {
                        "allowed"
                    } else {
                        "blocked"
                    };
                    let _ = writeln!(body, "    {addr}: {verdict}");
                    write_groups(&mut body, &address, "      ");
                    all_allowed &= address.allowed();
                }
                if all_allowed != allowed {
                    let _ = writeln!(
                        body,
                        "  the answer follows the addresses: a connection goes to them, not to the name"
                    );
                }
                allowed = all_allowed;
            }
        }
    }

    let what = match &to.destination {
        Destination::Addr(addr) => addr.to_string(),
        Destination::Name(name) => name.clone(),
    };
    let ports = match (to.port, to.proto) {
        (Some(port), proto) => format!("{port}/{}", proto.unwrap_or(Proto::Tcp)),
        (None, Some(proto)) => format!("every {proto} port tried"),
        (None, None) => "every tcp and udp port tried".to_string(),
    };
    let verdict = if allowed { "allowed" } else { "blocked" };
    (format!("{verdict}: {what} ({ports})\n{body}"), allowed)
}

/// One line per decider, e.g. `accepted on 443/tcp by rule allow-static-v4-tcp-443: ...`;
/// deciders that differ only by address family share a line.
fn write_groups(out: &mut String, evaluation: &Evaluation<'_>, indent: &str) {
    let families: BTreeSet<Family> = evaluation.outcomes.iter().map(|o| o.family).collect();
    // (head, deciders with their families, description): deciders that
    // differ only by address family share a line.
    type Line<'a> = (String, Vec<(Decider<'a>, BTreeSet<Family>)>, String);
    let mut lines: Vec<Line<'_>> = Vec::new();
    for group in evaluation.groups() {
        let action = if group.decision.allowed() {
            "accepted"
        } else {
            "denied"
        };
        let head = format!("{action} on {}", group.ports_text(evaluation));
        let mut description = group.decision.decided_by.description();
        if !group.decision.allowed() {
            description.push_str(&format!(" ({})", verdicts_text(&group)));
        }
        let decider = (group.decision.decided_by, group.families());
        match lines
            .iter_mut()
            .find(|(h, _, d)| *h == head && *d == description)
        {
            Some((_, deciders, _)) => deciders.push(decider),
            None => lines.push((head, vec![decider], description)),
        }
    }
    for (head, deciders, description) in lines {
        let names: Vec<String> = deciders
            .iter()
            .map(|(decider, of)| {
                let family = match of.iter().collect::<Vec<_>>()[..] {
                    [Family::V4] if families.len() == 2 => " (IPv4)",
                    [Family::V6] if families.len() == 2 => " (IPv6)",
                    _ => "",
                };
                match decider {
                    Decider::Rule(r) => format!("{}{family}", r.rule.id),
                    Decider::ChainPolicy { chain, .. } => {
                        format!("the policy of chain {chain}{family}")
                    }
                }
            })
            .collect();
        let all_rules = deciders.iter().all(|(d, _)| matches!(d, Decider::Rule(_)));
        let by = match (all_rules, names.len()) {
            (true, 1) => format!("rule {}", names[0]),
            (true, _) => format!("rules {}", names.join(" and ")),
            (false, _) => names.join(" and "),
        };
        let _ = writeln!(out, "{indent}{head} by {by}: {description}");
    }
}

/// How the denied members of a group are answered, per protocol when they differ.
fn verdicts_text(group: &Group<'_, '_>) -> String {
    let mut by_proto: Vec<(Proto, Verdict)> = Vec::new();
    for member in &group.members {
        let pair = (member.proto, member.decision.verdict);
        if !by_proto.contains(&pair) {
            by_proto.push(pair);
        }
    }
    if by_proto.iter().all(|(_, v)| *v == by_proto[0].1) {
        return verdict_text(by_proto[0].1).to_string();
    }
    let parts: Vec<String> = by_proto
        .iter()
        .map(|(proto, verdict)| format!("{proto}: {}", verdict_text(*verdict)))
        .collect();
    parts.join("; ")
}

fn verdict_text(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Accept => "accepted",
        Verdict::Drop => "dropped without an answer",
        Verdict::Reject(RejectKind::TcpReset) => "rejected with a TCP reset",
        Verdict::Reject(RejectKind::IcmpxAdminProhibited) => "rejected with ICMP admin-prohibited",
    }
}

/// `ENTRY (ports PORTS; SOURCES)`, the entry as `explain` shows it.
fn entry_text(rule: &HostRule) -> String {
    let sources: Vec<String> = rule.sources.iter().map(ToString::to_string).collect();
    format!(
        "{} (ports {}; {})",
        super::explain::entry_text(rule),
        rule.ports,
        sources.join("; ")
    )
}

fn write_name_details(
    out: &mut String,
    policy: &Policy,
    evaluation: &Evaluation<'_>,
    indent: &str,
    resolving: bool,
) {
    if policy.mode == Mode::Unrestricted {
        let _ = writeln!(
            out,
            "{indent}unrestricted: every name is allowed; the safety blocklist applies to its addresses"
        );
        return;
    }
    if evaluation.bindings.is_empty() {
        let _ = writeln!(out, "{indent}no policy entry matches this name");
        return;
    }
    for binding in &evaluation.bindings {
        match policy.rules.iter().find(|r| r.target == binding.target) {
            Some(rule) => {
                let _ = writeln!(out, "{indent}matches policy entry {}", entry_text(rule));
            }
            None => {
                let _ = writeln!(
                    out,
                    "{indent}matches policy entry {} (ports {})",
                    binding.target, binding.ports
                );
            }
        }
    }
    let mut sets: Vec<&str> = Vec::new();
    for binding in &evaluation.bindings {
        for set in [&binding.set_v4, &binding.set_v6] {
            if !sets.contains(&set.as_str()) {
                sets.push(set);
            }
        }
    }
    let _ = writeln!(
        out,
        "{indent}its addresses, once the resolver learns them, go into {} {}",
        if sets.len() == 1 { "set" } else { "sets" },
        sets.join(" and ")
    );
    if !resolving {
        let _ = writeln!(
            out,
            "{indent}the safety blocklist still applies to those addresses; --resolve checks the current ones"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{Ports, Source};
    use crate::ruleset::evaluate::tests as policies;

    fn to(text: &str) -> To {
        parse_to(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    #[test]
    fn parses_every_form_of_destination() {
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            to("[2001:db8::1]:443/udp"),
            To {
                destination: Destination::Addr(v6),
                port: Some(443),
                proto: Some(Proto::Udp),
                mapped_from: None
            }
        );
        assert_eq!(
            to("2001:db8::1"),
            To {
                destination: Destination::Addr(v6),
                port: None,
                proto: None,
                mapped_from: None
            }
        );
        assert_eq!(to("[2001:db8::1]").port, None);
        let named = to("Example.COM.:443");
        assert_eq!(named.destination, Destination::Name("example.com".into()));
        assert_eq!(named.port, Some(443));
        let udp = to("example.com/UDP");
        assert_eq!((udp.port, udp.proto), (None, Some(Proto::Udp)));
        assert_eq!(
            to("192.0.2.1:80/tcp").destination,
            Destination::Addr("192.0.2.1".parse().unwrap())
        );
        assert_eq!(
            to("bücher.example").destination,
            Destination::Name("xn--bcher-kva.example".into())
        );
        let mapped = to("[::ffff:169.254.169.254]:80");
        assert_eq!(
            mapped.destination,
            Destination::Addr("169.254.169.254".parse().unwrap())
        );
        assert_eq!(
            mapped.mapped_from,
            Some("::ffff:169.254.169.254".parse().unwrap())
        );
    }

    #[test]
    fn rejects_bad_destinations_with_the_fix() {
        let cases = [
            ("", "empty destination"),
            ("example.com:0", "port 0 is out of range"),
            ("example.com:70000", "port 70000 is out of range"),
            ("example.com:https", "`https` is not a port"),
            (
                "example.com/sctp",
                "unknown protocol `/sctp`; use /tcp or /udp",
            ),
            ("10.0.0.0/8", "is a network"),
            ("2001:db8::1:443:x", "bracket the address"),
            ("[2001:db8::1", "no closing `]`"),
            ("[2001:db8::1]443", "unexpected `443` after `]`"),
            ("[example.com]:443", "not an IPv6 address"),
            ("https://example.com", "URL scheme"),
            ("*.example.com", "is a wildcard"),
            ("a..b", "has an empty label (two dots in a row)"),
            ("exa mple.com", "contains a space; a host name cannot"),
        ];
        for (text, expected) in cases {
            let err = parse_to(text).expect_err(text);
            assert!(err.contains(expected), "{text}: {err}");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(
            parse_to(&long)
                .unwrap_err()
                .contains("a DNS label holds at most 63")
        );
    }

    fn policy() -> Policy {
        let mut policy = policies::policy(
            Mode::Limited,
            vec![
                policies::host_rule(
                    Target::Name("api.example.com".into()),
                    policies::only(&[(Proto::Tcp, 443), (Proto::Udp, 443)]),
                ),
                policies::host_rule(policies::net("203.0.113.0/24"), Ports::Any),
            ],
        );
        policy.rules[0].entry = "https://api.example.com".into();
        policy.rules[1].sources = [Source::Extra].into();
        policy
    }

    fn check(text: &str, resolved: Option<&[IpAddr]>) -> (String, bool) {
        let policy = policy();
        report(
            &policy,
            &ruleset::compile(&policy, &policies::options()),
            &to(text),
            resolved,
        )
    }

    #[test]
    fn a_name_reports_its_entry_rules_and_sets() {
        let (text, allowed) = check("api.example.com:443", None);
        assert!(allowed);
        assert_eq!(
            text,
            "allowed: api.example.com (443/tcp)\n\
             \x20 accepted on 443/tcp by rules allow-dns-v4-ports (IPv4) and allow-dns-v6-ports (IPv6): addresses learned from DNS answers for allowed names, on their allowed protocol and port\n\
             \x20 matches policy entry https://api.example.com (ports 443/tcp, 443/udp; allowed_hosts)\n\
             \x20 its addresses, once the resolver learns them, go into sets dns_v4_ports and dns_v6_ports\n\
             \x20 the safety blocklist still applies to those addresses; --resolve checks the current ones\n"
        );
        let (text, allowed) = check("api.example.com", None);
        assert!(allowed);
        assert!(text.starts_with("allowed: api.example.com (every tcp and udp port tried)\n  accepted on 443/tcp, 443/udp by rules allow-dns-v4-ports (IPv4) and allow-dns-v6-ports (IPv6)"), "{text}");
        assert!(text.contains("  denied on every tcp port except 53, 443, 853, every udp port except 53, 443, 853 by rule default-deny: everything the policy does not allow (tcp: rejected with a TCP reset; udp: rejected with ICMP admin-prohibited)\n"), "{text}");
        let (text, allowed) = check("other.example:443", None);
        assert!(!allowed);
        assert!(text.contains("no policy entry matches this name"), "{text}");
    }

    #[test]
    fn an_address_names_the_deciding_rule_and_covering_entries() {
        let (text, allowed) = check("203.0.113.9:53/udp", None);
        assert!(!allowed);
        assert_eq!(
            text,
            "blocked: 203.0.113.9 (53/udp)\n\
             \x20 denied on 53/udp by rule dns-other: DNS and DNS over TLS to anything but the configured resolvers (rejected with ICMP admin-prohibited)\n\
             \x20 covered by policy entry 203.0.113.0/24 (ports any; extra)\n"
        );
        let (text, allowed) = check("[::ffff:169.254.169.254]:80", None);
        assert!(!allowed);
        assert!(text.contains("by rule blocklist-v4"), "{text}");
        assert!(text.contains("IPv4-mapped"), "{text}");
    }

    #[test]
    fn resolved_addresses_decide_and_the_blocklist_wins() {
        let rebound: Vec<IpAddr> = vec![
            "192.0.2.44".parse().unwrap(),
            "169.254.169.254".parse().unwrap(),
        ];
        let (text, allowed) = check("api.example.com:443", Some(&rebound));
        assert!(!allowed, "{text}");
        assert!(
            text.starts_with("blocked: api.example.com (443/tcp)\n"),
            "{text}"
        );
        assert!(
            text.contains(
                "    192.0.2.44: allowed\n      accepted on 443/tcp by rule allow-dns-v4-ports"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "    169.254.169.254: blocked\n      denied on 443/tcp by rule blocklist-v4"
            ),
            "{text}"
        );

        let good: Vec<IpAddr> = vec![
            "192.0.2.44".parse().unwrap(),
            "2001:db8::44".parse().unwrap(),
        ];
        let (text, allowed) = check("api.example.com:443", Some(&good));
        assert!(allowed, "{text}");
        assert!(
            text.contains("      accepted on 443/tcp by rule allow-dns-v6-ports"),
            "{text}"
        );

        // Not allowed as a name, but its current address is in an allowed CIDR.
        let in_cidr: Vec<IpAddr> = vec!["203.0.113.5".parse().unwrap()];
        let (text, allowed) = check("other.example:443", Some(&in_cidr));
        assert!(allowed, "{text}");
        assert!(text.contains("the answer follows the addresses"), "{text}");
    }
}
