//! Policies built in code, for tests and the compile benchmark (which includes
//! this file with `#[path]`), and the fixed compile options of the goldens.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use ipnet::IpNet;
use netleash::policy::{
    BlockEntry, CompileOptions, DEFAULT_NFLOG_GROUP, Dialect, HostRule, Mode, Policy, PortSpec,
    Ports, Proto, ProxyOptions, Source, Target,
};

/// Resolvers in documentation ranges (RFC 5737, RFC 3849), so goldens do not
/// depend on the machine's /etc/resolv.conf.
pub fn options() -> CompileOptions {
    CompileOptions {
        resolvers: vec![
            IpAddr::V4(Ipv4Addr::new(192, 0, 2, 53)),
            "2001:db8::53".parse().unwrap(),
        ],
        nflog_group: DEFAULT_NFLOG_GROUP,
        proxy: None,
    }
}

/// [`options`] with the sidecar's DNS proxy: port 1053, mark 0x6e6c, the
/// same resolvers as its upstreams.
pub fn proxy_options() -> CompileOptions {
    let options = options();
    let upstreams = options
        .resolvers
        .iter()
        .map(|ip| SocketAddr::new(*ip, 53))
        .collect();
    CompileOptions {
        resolvers: Vec::new(),
        proxy: Some(ProxyOptions {
            port: 1053,
            mark: 0x6e6c,
            upstreams,
            zone: 0x6e6c,
        }),
        ..options
    }
}

fn blocklist() -> Vec<BlockEntry> {
    [
        (
            "169.254.0.0/16",
            "IPv4 link-local, including the 169.254.169.254 metadata service",
        ),
        ("100.100.100.200/32", "Alibaba Cloud metadata service"),
        ("168.63.129.16/32", "Azure wire server"),
        ("fe80::/10", "IPv6 link-local"),
        ("fd00:ec2::254/128", "AWS metadata service over IPv6"),
    ]
    .iter()
    .map(|(net, reason)| BlockEntry {
        net: net.parse().unwrap(),
        reason: reason.to_string(),
    })
    .collect()
}

fn ports(specs: &[(Proto, u16)]) -> Ports {
    Ports::Only(
        specs
            .iter()
            .map(|&(proto, port)| PortSpec { proto, port })
            .collect(),
    )
}

fn https() -> Ports {
    ports(&[(Proto::Tcp, 443), (Proto::Udp, 443)])
}

fn rule(entry: &str, target: Target, ports: Ports, source: Source) -> HostRule {
    HostRule {
        target,
        ports,
        sources: BTreeSet::from([source]),
        entry: entry.to_string(),
    }
}

fn net(text: &str) -> Target {
    Target::Net(text.parse().unwrap())
}

/// A policy with its rules sorted and merged by target, as `policy::load` leaves them.
pub fn policy(mode: Mode, rules: Vec<HostRule>) -> Policy {
    let mut merged: Vec<HostRule> = Vec::new();
    let mut rules = rules;
    rules.sort_by(|a, b| a.target.cmp(&b.target));
    for rule in rules {
        match merged.last_mut() {
            Some(last) if last.target == rule.target => {
                last.ports = last.ports.union(&rule.ports);
                last.sources.extend(rule.sources);
            }
            _ => merged.push(rule),
        }
    }
    let dialect = match mode {
        Mode::Unrestricted => Dialect::Unrestricted,
        Mode::Limited => Dialect::Limited,
    };
    Policy {
        mode,
        dialect,
        rules: merged,
        blocklist: blocklist(),
        warnings: Vec::new(),
    }
}

/// Golden cases built in code: (name, policy).
pub fn model_cases() -> Vec<(&'static str, Policy)> {
    let mixed = vec![
        rule(
            "https://api.example.com",
            Target::Name("api.example.com".into()),
            https(),
            Source::AllowedHosts,
        ),
        rule(
            "pypi.org",
            Target::Name("pypi.org".into()),
            https(),
            Source::PackageManager("pip".into()),
        ),
        rule(
            "files.pythonhosted.org",
            Target::Name("files.pythonhosted.org".into()),
            https(),
            Source::PackageManager("pip".into()),
        ),
        rule(
            "*.cdn.example.net",
            Target::Wildcard("cdn.example.net".into()),
            Ports::Any,
            Source::AllowedHosts,
        ),
        rule(
            "http://deb.debian.org",
            Target::Name("deb.debian.org".into()),
            ports(&[(Proto::Tcp, 80)]),
            Source::PackageManager("apt".into()),
        ),
        rule(
            "https://mcp.example.org",
            Target::Name("mcp.example.org".into()),
            https(),
            Source::Mcp("docs".into()),
        ),
        rule(
            "callback.platform.example",
            Target::Name("callback.platform.example".into()),
            Ports::Any,
            Source::Extra,
        ),
        rule(
            "198.51.100.7:443",
            net("198.51.100.7/32"),
            https(),
            Source::AllowedHosts,
        ),
        rule(
            "203.0.113.0/24",
            net("203.0.113.0/24"),
            Ports::Any,
            Source::AllowedHosts,
        ),
        rule(
            "203.0.113.64/26",
            net("203.0.113.64/26"),
            Ports::Any,
            Source::AllowedHosts,
        ),
        rule(
            "http://192.0.2.10:8080",
            net("192.0.2.10/32"),
            ports(&[(Proto::Tcp, 8080)]),
            Source::AllowedHosts,
        ),
        rule(
            "2001:db8:1::/48",
            net("2001:db8:1::/48"),
            Ports::Any,
            Source::AllowedHosts,
        ),
        rule(
            "[2001:db8:2::7]:8443",
            net("2001:db8:2::7/128"),
            ports(&[(Proto::Tcp, 8443), (Proto::Udp, 8443)]),
            Source::AllowedHosts,
        ),
    ];
    let only_names = vec![
        rule(
            "example.com",
            Target::Name("example.com".into()),
            Ports::Any,
            Source::AllowedHosts,
        ),
        rule(
            "*.example.com",
            Target::Wildcard("example.com".into()),
            https(),
            Source::AllowedHosts,
        ),
    ];
    vec![
        ("model-limited-mixed", policy(Mode::Limited, mixed)),
        ("model-limited-names", policy(Mode::Limited, only_names)),
        ("model-limited-empty", policy(Mode::Limited, Vec::new())),
        ("model-unrestricted", policy(Mode::Unrestricted, Vec::new())),
    ]
}

/// Golden cases compiled with [`proxy_options`]: (name, policy).
pub fn proxy_cases() -> Vec<(&'static str, Policy)> {
    model_cases()
        .into_iter()
        .filter(|(name, _)| *name == "model-limited-names")
        .map(|(_, policy)| ("model-limited-names-proxy", policy))
        .collect()
}

/// A limited policy of `count` allowed hosts with a realistic mix: exact names
/// (half with https ports), wildcards, IPv4 and IPv6 literals with and without
/// ports, and CIDRs of both families.
pub fn generated(count: usize) -> Policy {
    let mut rules = Vec::with_capacity(count);
    for i in 0..count {
        let n = i as u32;
        let (a, b) = ((n >> 8) as u8, n as u8);
        let port_choice = match i % 4 {
            0 => Ports::Any,
            1 => https(),
            2 => ports(&[(Proto::Tcp, 80)]),
            _ => ports(&[(Proto::Tcp, 8000 + (i % 100) as u16)]),
        };
        let (entry, target) = match i % 10 {
            0..=3 => {
                let name = format!("host{i}.svc{}.example.com", i % 97);
                (name.clone(), Target::Name(name))
            }
            4 => (
                format!("*.team{i}.example.net"),
                Target::Wildcard(format!("team{i}.example.net")),
            ),
            5 | 6 => {
                let addr = Ipv4Addr::new(198, 18 + (a >> 7), a, b);
                (addr.to_string(), Target::Net(IpNet::from(IpAddr::V4(addr))))
            }
            7 => {
                let cidr = format!("10.{a}.{b}.0/24");
                (cidr.clone(), net(&cidr))
            }
            8 => {
                let addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, u16::from(a), u16::from(b));
                (addr.to_string(), Target::Net(IpNet::from(IpAddr::V6(addr))))
            }
            _ => {
                let cidr = format!("2001:db8:{:x}::/48", 0x100 + n);
                (cidr.clone(), net(&cidr))
            }
        };
        rules.push(rule(&entry, target, port_choice, Source::AllowedHosts));
    }
    policy(Mode::Limited, rules)
}
