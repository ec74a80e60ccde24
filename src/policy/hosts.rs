//! The `allowed_hosts` grammar: one entry → a normalized [`Target`] and its [`Ports`].
//!
//! | entry                          | target                  | ports              |
//! |--------------------------------|-------------------------|--------------------|
//! | `api.example.com`              | name                    | every port         |
//! | `*.example.com`                | any name below, never the apex | every port  |
//! | `https://host[:p]`             | name or address         | tcp+udp p (443)    |
//! | `http://host[:p]`              | name or address         | tcp p (80)         |
//! | `host:p`, `[v6]:p`             | name or address         | tcp+udp p          |
//! | `192.0.2.1`, `2001:db8::1`     | address                 | every port         |
//! | `10.0.0.0/8`, `2001:db8::/32`  | network                 | every port         |
//!
//! `https` carries UDP too because HTTP/3 runs over QUIC on UDP (RFC 9114 §3.1);
//! plain `http` has no UDP variant.
//!
//! Names are normalized: lowercased, one trailing dot (the DNS root, RFC 1034
//! §3.1) dropped, internationalized names converted to punycode (UTS #46, the
//! `idna` crate). After conversion a label holds 1 to 63 octets and a name at
//! most 253 (RFC 1035 §2.3.4, written without the trailing dot). Labels start
//! and end with a letter or digit (RFC 1123 §2.1); underscores are accepted
//! since real hosts use them (e.g. `_dmarc`, some CDN nodes).
//!
//! A path, query, fragment or user info is rejected: the network layer sees
//! addresses and ports, never URLs, so such an entry would promise more than
//! can be enforced. An MCP server URL ([`parse_url`]) has a path by nature; there
//! only the scheme, host and port count.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use idna::AsciiDenyList;
use ipnet::IpNet;

use super::types::{PortSpec, Ports, Proto, Target};

/// What one entry allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostSpec {
    pub target: Target,
    pub ports: Ports,
}

/// An entry the grammar rejects: `"<entry>" <reason>`; the reason says what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{entry:?} {reason}")]
pub struct InvalidHost {
    pub entry: String,
    pub reason: String,
}

/// DNS limits of RFC 1035 §2.3.4.
const MAX_LABEL: usize = 63;
const MAX_NAME: usize = 253;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    Http,
    Https,
}

impl Scheme {
    fn prefix(self) -> &'static str {
        match self {
            Scheme::Http => "http://",
            Scheme::Https => "https://",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// An `allowed_hosts` (or `--extra-host`, or package-manager) entry.
    Entry,
    /// An MCP server URL: scheme required; path, query, fragment and user info dropped.
    Url,
}

/// Parse one `allowed_hosts` entry.
pub fn parse_entry(entry: &str) -> Result<HostSpec, InvalidHost> {
    parse(entry, Kind::Entry).map_err(|reason| InvalidHost {
        entry: entry.to_string(),
        reason,
    })
}

/// Parse an MCP server URL: `http(s)://host[:port]/anything`. Only the
/// scheme, host and port count; wildcards and CIDRs are not URLs.
pub fn parse_url(url: &str) -> Result<HostSpec, InvalidHost> {
    parse(url, Kind::Url).map_err(|reason| InvalidHost {
        entry: url.to_string(),
        reason,
    })
}

fn parse(entry: &str, kind: Kind) -> Result<HostSpec, String> {
    if entry.is_empty() {
        return Err(
            "is empty; write a host such as \"api.example.com\", or remove the entry".into(),
        );
    }
    if entry.trim().is_empty() {
        return Err(
            "is blank; write a host such as \"api.example.com\", or remove the entry".into(),
        );
    }
    if entry.trim() != entry {
        return Err(format!("has spaces around it; write {:?}", entry.trim()));
    }

    let (scheme, rest) = match split_scheme(entry) {
        Some((scheme, rest)) => (Some(parse_scheme(scheme, rest, kind)?), rest),
        None if kind == Kind::Url => {
            return Err(format!(
                "has no scheme; an MCP server URL starts with https:// or http://, as in \"https://{entry}\""
            ));
        }
        None => (None, entry),
    };
    let scheme_text = scheme.map_or("", Scheme::prefix);

    let (authority, tail) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));

    if scheme.is_none() && tail.starts_with('/') {
        if let Some(addr) = parse_ip(authority) {
            return parse_cidr(addr, &tail[1..]);
        }
        if let Some(inner) = authority
            .strip_prefix('[')
            .and_then(|a| a.strip_suffix(']'))
            && inner.parse::<Ipv6Addr>().is_ok()
        {
            return Err(format!(
                "puts a network in brackets; write the CIDR without them: \"{inner}{tail}\""
            ));
        }
    }

    let host_port = match authority.rfind('@') {
        Some(at) if kind == Kind::Entry => {
            return Err(format!(
                "has user info ({:?}); credentials cannot be enforced at the network layer; allow \"{scheme_text}{}\" instead",
                &authority[..=at],
                &authority[at + 1..]
            ));
        }
        Some(at) => &authority[at + 1..],
        None => authority,
    };

    if kind == Kind::Entry && !tail.is_empty() && tail != "/" {
        let allow = format!("{scheme_text}{host_port}");
        return Err(match tail.as_bytes()[0] {
            b'/' => {
                let path = &tail[..tail.find(['?', '#']).unwrap_or(tail.len())];
                if scheme.is_some()
                    && parse_ip(host_port).is_some()
                    && path[1..].bytes().all(|b| b.is_ascii_digit())
                {
                    format!(
                        "combines a scheme with a network; a CIDR allows every port: write \"{host_port}{path}\""
                    )
                } else {
                    format!(
                        "has a path ({path:?}); paths cannot be enforced at the network layer, which sees only addresses and ports; allow {allow:?} instead"
                    )
                }
            }
            b'?' => {
                let query = &tail[..tail.find('#').unwrap_or(tail.len())];
                format!(
                    "has a query ({query:?}); queries cannot be enforced at the network layer, which sees only addresses and ports; allow {allow:?} instead"
                )
            }
            _ => format!(
                "has a fragment ({tail:?}); fragments cannot be enforced at the network layer, which sees only addresses and ports; allow {allow:?} instead"
            ),
        });
    }

    let (host, port) = split_host_port(host_port, scheme)?;
    let target = match host {
        Host::Address(addr) => Target::Net(IpNet::from(addr)),
        Host::Name(name) => {
            let target = parse_name(name)?;
            if kind == Kind::Url && matches!(target, Target::Wildcard(_)) {
                return Err("has a wildcard; an MCP server URL names one host".into());
            }
            target
        }
    };

    let ports = match (scheme, port) {
        (Some(Scheme::Https), port) => tcp_and_udp(port.unwrap_or(443)),
        (Some(Scheme::Http), port) => Ports::Only(BTreeSet::from([PortSpec {
            proto: Proto::Tcp,
            port: port.unwrap_or(80),
        }])),
        (None, Some(port)) => tcp_and_udp(port),
        (None, None) => Ports::Any,
    };
    Ok(HostSpec { target, ports })
}

fn tcp_and_udp(port: u16) -> Ports {
    Ports::Only(BTreeSet::from([
        PortSpec {
            proto: Proto::Tcp,
            port,
        },
        PortSpec {
            proto: Proto::Udp,
            port,
        },
    ]))
}

/// `scheme://rest`, if `entry` starts with an RFC 3986 §3.1 scheme:
/// `ALPHA *( ALPHA / DIGIT / "+" / "-" / "." )`.
fn split_scheme(entry: &str) -> Option<(&str, &str)> {
    let at = entry.find("://")?;
    let scheme = &entry[..at];
    let valid = scheme
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic())
        && scheme
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
    valid.then(|| (scheme, &entry[at + 3..]))
}

/// Well-known ports of schemes netleash does not read, for the suggestion
/// in the error (IANA service names registry).
const OTHER_SCHEME_PORTS: [(&str, u16); 14] = [
    ("ftp", 21),
    ("sftp", 22),
    ("ssh", 22),
    ("git", 9418),
    ("smtp", 25),
    ("imap", 143),
    ("imaps", 993),
    ("ldap", 389),
    ("ldaps", 636),
    ("postgres", 5432),
    ("postgresql", 5432),
    ("mysql", 3306),
    ("redis", 6379),
    ("mongodb", 27017),
];

/// `rest` is what follows `scheme://`; its host makes the suggestion concrete.
fn parse_scheme(scheme: &str, rest: &str, kind: Kind) -> Result<Scheme, String> {
    let host = rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())]
        .rsplit('@')
        .next()
        .unwrap_or(rest);
    let host = if host.is_empty() { "host" } else { host };
    // Schemes are case-insensitive (RFC 3986 §3.1).
    match scheme.to_ascii_lowercase().as_str() {
        "https" => Ok(Scheme::Https),
        "http" => Ok(Scheme::Http),
        other if kind == Kind::Url => Err(format!(
            "uses the scheme \"{other}://\"; an MCP server URL starts with https:// or http://"
        )),
        "wss" => Err(format!(
            "uses the scheme \"wss://\"; WebSocket over TLS runs on HTTPS's port: write \"https://{host}\""
        )),
        "ws" => Err(format!(
            "uses the scheme \"ws://\"; WebSocket runs on HTTP's port: write \"http://{host}\""
        )),
        other => {
            // The host without its port: `[v6]:p` → `[v6]`, `name:p` → `name`.
            let bare = match host.find(']') {
                Some(close) if host.starts_with('[') => &host[..=close],
                _ => host.split(':').next().unwrap_or(host),
            };
            let port = OTHER_SCHEME_PORTS
                .iter()
                .find(|(name, _)| *name == other)
                .map(|(_, port)| format!("\"{bare}:{port}\" for its port, or "))
                .unwrap_or_else(|| format!("\"{bare}:PORT\" for one port, or "));
            Err(format!(
                "uses the scheme \"{other}://\"; only https:// and http:// stand for ports; write {port}\"{bare}\" for every port"
            ))
        }
    }
}

enum Host<'a> {
    Address(IpAddr),
    Name(&'a str),
}

fn parse_ip(text: &str) -> Option<IpAddr> {
    text.parse::<IpAddr>().ok()
}

/// Splits `host[:port]`, `[v6][:port]` or a bare IPv6 address.
fn split_host_port(
    authority: &str,
    scheme: Option<Scheme>,
) -> Result<(Host<'_>, Option<u16>), String> {
    if let Some(bracketed) = authority.strip_prefix('[') {
        let Some(close) = bracketed.find(']') else {
            return Err(
                "has '[' with no closing ']'; write an IPv6 address as [2001:db8::1] or [2001:db8::1]:443".into(),
            );
        };
        let inner = &bracketed[..close];
        let after = &bracketed[close + 1..];
        let addr: Ipv6Addr = inner
            .parse()
            .map_err(|_| format!("has {inner:?} in brackets, which is not an IPv6 address"))?;
        let port = match after.strip_prefix(':') {
            Some(port) => Some(parse_port(port)?),
            None if after.is_empty() => None,
            None => {
                return Err(format!(
                    "has {after:?} after the closing ']'; write [address]:port"
                ));
            }
        };
        return Ok((Host::Address(IpAddr::V6(addr)), port));
    }

    match authority.matches(':').count() {
        0 => host(authority).map(|h| (h, None)),
        1 => {
            let (name, port) = authority.split_once(':').unwrap_or((authority, ""));
            let port = parse_port(port)?;
            if name.is_empty() {
                return Err("has a port but no host; write \"host:port\"".into());
            }
            host(name).map(|h| (h, Some(port)))
        }
        _ => {
            if let Some((addr, zone)) = authority.split_once('%')
                && addr.parse::<Ipv6Addr>().is_ok()
            {
                return Err(format!(
                    "has the zone index \"%{zone}\"; zones are local to one machine and cannot be enforced: write {addr:?}"
                ));
            }
            let addr: Ipv6Addr = authority.parse().map_err(|_| {
                "is not a valid IPv6 address; with a port, write it in brackets: [2001:db8::1]:443".to_string()
            })?;
            if let Some(scheme) = scheme {
                return Err(format!(
                    "has an IPv6 address without brackets after the scheme; write \"{}[{addr}]\"",
                    scheme.prefix()
                ));
            }
            Ok((Host::Address(IpAddr::V6(addr)), None))
        }
    }
}

fn host(text: &str) -> Result<Host<'_>, String> {
    if text.is_empty() {
        return Err("has no host name or address".into());
    }
    Ok(match text.parse::<Ipv4Addr>() {
        Ok(addr) => Host::Address(IpAddr::V4(addr)),
        Err(_) => Host::Name(text),
    })
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err("has an empty port after ':'; write a port from 1 to 65535".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "has the port {text:?}, which is not a number from 1 to 65535"
        ));
    }
    match text.parse::<u32>() {
        Ok(0) => {
            Err("has port 0, which no connection can use; write a port from 1 to 65535".into())
        }
        Ok(port) if port <= u32::from(u16::MAX) => Ok(port as u16),
        _ => Err(format!(
            "has port {text}, which is out of range; ports go from 1 to 65535"
        )),
    }
}

fn parse_cidr(addr: IpAddr, prefix: &str) -> Result<HostSpec, String> {
    let (family, max) = if addr.is_ipv4() {
        ("IPv4", 32)
    } else {
        ("IPv6", 128)
    };
    if prefix.is_empty() || !prefix.bytes().all(|b| b.is_ascii_digit()) {
        let hint = if prefix.contains(':') {
            " (a CIDR allows every port; ports cannot be added to it)"
        } else {
            ""
        };
        return Err(format!(
            "has the prefix length {prefix:?}, which is not a number from 0 to {max}{hint}"
        ));
    }
    let length = prefix
        .parse::<u8>()
        .ok()
        .filter(|&l| l <= max)
        .ok_or_else(|| {
            format!("has the prefix length /{prefix}; an {family} prefix is at most /{max}")
        })?;
    let net = IpNet::new(addr, length).map_err(|e| e.to_string())?;
    if net.trunc() != net {
        let network = net.trunc();
        return Err(format!(
            "has host bits set; the network of {addr}/{length} is {network}: write \"{network}\", or \"{addr}\" for the one address"
        ));
    }
    Ok(HostSpec {
        target: Target::Net(net),
        ports: Ports::Any,
    })
}

/// A host name or `*.name`, normalized; see the module documentation.
fn parse_name(host: &str) -> Result<Target, String> {
    for c in host.chars() {
        if c == ' ' {
            return Err("contains a space; a host name cannot".into());
        }
        if c.is_whitespace() || c.is_control() {
            return Err(format!("contains {c:?}; a host name cannot"));
        }
        if c == ',' || c == ';' {
            return Err(format!("contains {c:?}; write one host per entry"));
        }
        if c.is_ascii() && !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*')) {
            return Err(format!(
                "contains {c:?}, which cannot appear in a host name"
            ));
        }
    }

    let name = host.strip_suffix('.').unwrap_or(host);
    if name.is_empty() {
        return Err("has no host name or address".into());
    }
    if let Some(below) = name.strip_prefix('.') {
        return Err(format!(
            "starts with a dot; write {below:?} for that name, or \"*.{below}\" for every name below it"
        ));
    }
    if name.split('.').any(str::is_empty) {
        return Err("has an empty label (two dots in a row)".into());
    }

    let mut labels: Vec<&str> = name.split('.').collect();
    let wildcard = labels[0] == "*";
    if wildcard {
        labels.remove(0);
        if labels.is_empty() {
            return Err(
                "would allow every host; for that, use {\"type\": \"unrestricted\"}".into(),
            );
        }
    }
    for (i, label) in labels.iter().enumerate() {
        if !label.contains('*') {
            continue;
        }
        if i == 0 && !wildcard {
            let stripped = label.trim_matches('*');
            let rest = labels[1..].join(".");
            let suggestion = if stripped.is_empty() {
                format!("*.{rest}")
            } else {
                format!("*.{stripped}.{rest}")
            };
            let suggestion = suggestion.trim_end_matches('.');
            return Err(format!(
                "has \"*\" inside the label {label:?}; a wildcard is a whole leftmost label, as in {suggestion:?}"
            ));
        }
        let below = &labels[i + 1..];
        let suggestion = if below.len() >= 2 {
            format!("*.{}", below.join("."))
        } else {
            "*.example.com".into()
        };
        return Err(if *label == "*" {
            format!(
                "has \"*\" as an inner label; a wildcard is a whole leftmost label, as in {suggestion:?}"
            )
        } else {
            format!(
                "has \"*\" inside the label {label:?}; a wildcard is a whole leftmost label, as in {suggestion:?}"
            )
        });
    }

    let unicode = labels.join(".");
    let ascii = idna::domain_to_ascii_cow(unicode.as_bytes(), AsciiDenyList::URL)
        .map_err(|_| "is not a valid internationalized domain name (UTS #46)".to_string())?;
    let punycode_note = if unicode.is_ascii() {
        ""
    } else {
        " in punycode"
    };

    let ascii_labels: Vec<&str> = ascii.split('.').collect();
    for label in &ascii_labels {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row)".into());
        }
        if label.len() > MAX_LABEL {
            return Err(format!(
                "has a label of {} characters{punycode_note} ({label:?}); a DNS label holds at most {MAX_LABEL} (RFC 1035 §2.3.4)",
                label.len()
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "has the label {label:?}, which starts or ends with a hyphen; host name labels start and end with a letter or digit (RFC 1123 §2.1)"
            ));
        }
    }
    let length = ascii.len() + if wildcard { 2 } else { 0 };
    if length > MAX_NAME {
        return Err(format!(
            "is {length} characters long{punycode_note}; a DNS name holds at most {MAX_NAME} (RFC 1035 §2.3.4)"
        ));
    }
    let top = ascii_labels[ascii_labels.len() - 1];
    if top.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "is neither an IP address nor a host name: a name cannot end in the all-numeric label {top:?}"
        ));
    }
    if wildcard {
        if ascii_labels.len() == 1 {
            return Err(format!(
                "would allow every name under the top-level domain \"{ascii}\"; name a domain below it, as in \"*.example.{ascii}\""
            ));
        }
        return Ok(Target::Wildcard(ascii.into_owned()));
    }
    Ok(Target::Name(ascii.into_owned()))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    fn spec(entry: &str) -> HostSpec {
        parse_entry(entry).unwrap_or_else(|e| panic!("{entry:?} rejected: {e}"))
    }

    fn reason(entry: &str) -> String {
        match parse_entry(entry) {
            Ok(spec) => panic!("{entry:?} accepted as {spec:?}"),
            Err(e) => {
                assert_eq!(e.entry, entry);
                e.reason
            }
        }
    }

    fn name(n: &str) -> Target {
        Target::Name(n.into())
    }

    fn net(n: &str) -> Target {
        Target::Net(n.parse().unwrap())
    }

    /// `Ports::Only` of these (proto, port) pairs.
    pub(crate) fn only(specs: &[(Proto, u16)]) -> Ports {
        Ports::only(specs.iter().copied())
    }

    use Proto::{Tcp, Udp};

    #[test]
    fn bare_names_allow_every_port() {
        assert_eq!(
            spec("api.example.com"),
            HostSpec {
                target: name("api.example.com"),
                ports: Ports::Any
            }
        );
        assert_eq!(spec("localhost").target, name("localhost"));
        assert_eq!(
            spec("_dmarc.example.com").target,
            name("_dmarc.example.com")
        );
        assert_eq!(
            spec("r1---sn-abc.googlevideo.com").target,
            name("r1---sn-abc.googlevideo.com")
        );
    }

    #[test]
    fn names_are_normalized() {
        assert_eq!(spec("API.Example.COM").target, name("api.example.com"));
        assert_eq!(spec("example.com.").target, name("example.com"));
        assert_eq!(spec("HTTPS://Example.COM./").target, name("example.com"));
        assert_eq!(spec("bücher.example").target, name("xn--bcher-kva.example"));
        assert_eq!(
            spec("*.Bücher.Example.").target,
            Target::Wildcard("xn--bcher-kva.example".into())
        );
        assert_eq!(
            spec("xn--bcher-kva.example").target,
            name("xn--bcher-kva.example")
        );
        assert_eq!(spec("https://münchen.de").target, name("xn--mnchen-3ya.de"));
    }

    #[test]
    fn wildcards() {
        assert_eq!(
            spec("*.example.com"),
            HostSpec {
                target: Target::Wildcard("example.com".into()),
                ports: Ports::Any
            }
        );
        assert_eq!(
            spec("https://*.example.com").ports,
            only(&[(Tcp, 443), (Udp, 443)])
        );
        assert_eq!(
            spec("*.a.b.example.com").target,
            Target::Wildcard("a.b.example.com".into())
        );
    }

    #[test]
    fn schemes_and_ports() {
        assert_eq!(
            spec("https://example.com").ports,
            only(&[(Tcp, 443), (Udp, 443)])
        );
        assert_eq!(
            spec("https://example.com/").ports,
            only(&[(Tcp, 443), (Udp, 443)])
        );
        assert_eq!(spec("http://example.com").ports, only(&[(Tcp, 80)]));
        assert_eq!(spec("HTTP://example.com").ports, only(&[(Tcp, 80)]));
        assert_eq!(
            spec("example.com:8443").ports,
            only(&[(Tcp, 8443), (Udp, 8443)])
        );
        assert_eq!(
            spec("https://example.com:8443").ports,
            only(&[(Tcp, 8443), (Udp, 8443)])
        );
        assert_eq!(spec("http://example.com:8080").ports, only(&[(Tcp, 8080)]));
        assert_eq!(spec("example.com:1").ports, only(&[(Tcp, 1), (Udp, 1)]));
        assert_eq!(
            spec("example.com:65535").ports,
            only(&[(Tcp, 65535), (Udp, 65535)])
        );
        assert_eq!(spec("example.com/").ports, Ports::Any);
    }

    #[test]
    fn addresses_and_networks() {
        assert_eq!(
            spec("192.0.2.1"),
            HostSpec {
                target: net("192.0.2.1/32"),
                ports: Ports::Any
            }
        );
        assert_eq!(
            spec("2001:db8::1"),
            HostSpec {
                target: net("2001:db8::1/128"),
                ports: Ports::Any
            }
        );
        assert_eq!(spec("2001:DB8::1").target, net("2001:db8::1/128"));
        assert_eq!(spec("[2001:db8::1]").target, net("2001:db8::1/128"));
        assert_eq!(
            spec("[2001:db8::1]:443"),
            HostSpec {
                target: net("2001:db8::1/128"),
                ports: only(&[(Tcp, 443), (Udp, 443)])
            }
        );
        assert_eq!(
            spec("https://[2001:db8::1]").ports,
            only(&[(Tcp, 443), (Udp, 443)])
        );
        assert_eq!(spec("http://192.0.2.1:8080").ports, only(&[(Tcp, 8080)]));
        assert_eq!(spec("192.0.2.1:53").ports, only(&[(Tcp, 53), (Udp, 53)]));
        assert_eq!(
            spec("10.0.0.0/8"),
            HostSpec {
                target: net("10.0.0.0/8"),
                ports: Ports::Any
            }
        );
        assert_eq!(spec("2001:db8::/32").target, net("2001:db8::/32"));
        assert_eq!(spec("192.0.2.1/32").target, net("192.0.2.1/32"));
        assert_eq!(spec("0.0.0.0/0").target, net("0.0.0.0/0"));
    }

    #[test]
    fn rejects_paths_queries_fragments_userinfo() {
        assert_eq!(
            reason("https://example.com/v1"),
            "has a path (\"/v1\"); paths cannot be enforced at the network layer, which sees only addresses and ports; allow \"https://example.com\" instead"
        );
        assert!(reason("example.com/api?x=1").starts_with("has a path (\"/api\");"));
        assert!(
            reason("https://example.com?x=1")
                .starts_with("has a query (\"?x=1\"); queries cannot be enforced")
        );
        assert!(reason("https://example.com#top").starts_with("has a fragment (\"#top\");"));
        assert_eq!(
            reason("https://user:pw@example.com:8443/x"),
            "has user info (\"user:pw@\"); credentials cannot be enforced at the network layer; allow \"https://example.com:8443\" instead"
        );
        assert_eq!(
            reason("https://10.0.0.0/8"),
            "combines a scheme with a network; a CIDR allows every port: write \"10.0.0.0/8\""
        );
    }

    #[test]
    fn rejects_other_schemes() {
        assert_eq!(
            reason("ftp://files.example.com/pub"),
            "uses the scheme \"ftp://\"; only https:// and http:// stand for ports; write \"files.example.com:21\" for its port, or \"files.example.com\" for every port"
        );
        assert_eq!(
            reason("SSH://git@example.com:2222"),
            "uses the scheme \"ssh://\"; only https:// and http:// stand for ports; write \"example.com:22\" for its port, or \"example.com\" for every port"
        );
        assert_eq!(
            reason("gopher://example.com"),
            "uses the scheme \"gopher://\"; only https:// and http:// stand for ports; write \"example.com:PORT\" for one port, or \"example.com\" for every port"
        );
        assert!(
            reason("redis://[2001:db8::1:5]:7000")
                .contains("write \"[2001:db8::1:5]:6379\" for its port")
        );
        assert_eq!(
            reason("ws://example.com/x"),
            "uses the scheme \"ws://\"; WebSocket runs on HTTP's port: write \"http://example.com\""
        );
        assert_eq!(
            reason("wss://example.com"),
            "uses the scheme \"wss://\"; WebSocket over TLS runs on HTTPS's port: write \"https://example.com\""
        );
    }

    #[test]
    fn rejects_bad_ports() {
        assert_eq!(
            reason("example.com:0"),
            "has port 0, which no connection can use; write a port from 1 to 65535"
        );
        assert_eq!(
            reason("example.com:65536"),
            "has port 65536, which is out of range; ports go from 1 to 65535"
        );
        assert_eq!(
            reason("example.com:99999999999"),
            "has port 99999999999, which is out of range; ports go from 1 to 65535"
        );
        assert_eq!(
            reason("example.com:"),
            "has an empty port after ':'; write a port from 1 to 65535"
        );
        assert_eq!(
            reason("example.com:https"),
            "has the port \"https\", which is not a number from 1 to 65535"
        );
        assert_eq!(
            reason(":443"),
            "has a port but no host; write \"host:port\""
        );
        assert!(reason("[2001:db8::1]:0").starts_with("has port 0"));
    }

    #[test]
    fn rejects_bad_lengths() {
        let label = "a".repeat(64);
        assert_eq!(
            reason(&format!("{label}.com")),
            format!(
                "has a label of 64 characters (\"{label}\"); a DNS label holds at most 63 (RFC 1035 §2.3.4)"
            )
        );
        assert!(parse_entry(&format!("{}.com", "a".repeat(63))).is_ok());
        let long = vec!["a".repeat(63); 4].join("."); // 255
        assert_eq!(
            reason(&long),
            "is 255 characters long; a DNS name holds at most 253 (RFC 1035 §2.3.4)"
        );
        let just = format!("{}.{}", vec!["a".repeat(63); 3].join("."), "b".repeat(61)); // 253
        assert_eq!(spec(&just).target, name(&just));
        assert_eq!(spec(&format!("{just}.")).target, name(&just));
        assert!(reason(&format!("*.{just}")).starts_with("is 255 characters long"));
        let idn = format!("{}.com", "ü".repeat(60));
        assert!(
            reason(&idn).starts_with("has a label of"),
            "{}",
            reason(&idn)
        );
        assert!(reason(&idn).contains("characters in punycode"));
    }

    #[test]
    fn rejects_misplaced_wildcards() {
        assert_eq!(
            reason("*foo.com"),
            "has \"*\" inside the label \"*foo\"; a wildcard is a whole leftmost label, as in \"*.foo.com\""
        );
        assert_eq!(
            reason("**.example.com"),
            "has \"*\" inside the label \"**\"; a wildcard is a whole leftmost label, as in \"*.example.com\""
        );
        assert_eq!(
            reason("a.*.com"),
            "has \"*\" as an inner label; a wildcard is a whole leftmost label, as in \"*.example.com\""
        );
        assert_eq!(
            reason("api.*.example.com"),
            "has \"*\" as an inner label; a wildcard is a whole leftmost label, as in \"*.example.com\""
        );
        assert_eq!(
            reason("*.*.example.com"),
            "has \"*\" as an inner label; a wildcard is a whole leftmost label, as in \"*.example.com\""
        );
        assert_eq!(
            reason("api.v*.example.com"),
            "has \"*\" inside the label \"v*\"; a wildcard is a whole leftmost label, as in \"*.example.com\""
        );
        assert_eq!(
            reason("*"),
            "would allow every host; for that, use {\"type\": \"unrestricted\"}"
        );
        assert_eq!(
            reason("*.com"),
            "would allow every name under the top-level domain \"com\"; name a domain below it, as in \"*.example.com\""
        );
    }

    #[test]
    fn rejects_empty_blank_and_bad_characters() {
        assert!(reason("").starts_with("is empty;"));
        assert!(reason("   ").starts_with("is blank;"));
        assert_eq!(
            reason(" example.com"),
            "has spaces around it; write \"example.com\""
        );
        assert_eq!(
            reason("exa mple.com"),
            "contains a space; a host name cannot"
        );
        assert_eq!(
            reason("exa$mple.com"),
            "contains '$', which cannot appear in a host name"
        );
        assert_eq!(
            reason("a.example.com,b.example.com"),
            "contains ','; write one host per entry"
        );
        assert_eq!(
            reason("exa\tmple.com"),
            "contains '\\t'; a host name cannot"
        );
        assert_eq!(
            reason("a..example.com"),
            "has an empty label (two dots in a row)"
        );
        assert_eq!(
            reason(".example.com"),
            "starts with a dot; write \"example.com\" for that name, or \"*.example.com\" for every name below it"
        );
        assert_eq!(reason("https://"), "has no host name or address");
        assert!(reason("-foo.example.com").contains("starts or ends with a hyphen"));
        assert!(reason("foo-.example.com").contains("starts or ends with a hyphen"));
        assert_eq!(
            reason("xn--a.com"),
            "is not a valid internationalized domain name (UTS #46)"
        );
    }

    #[test]
    fn rejects_bad_addresses() {
        assert_eq!(
            reason("256.1.1.1"),
            "is neither an IP address nor a host name: a name cannot end in the all-numeric label \"1\""
        );
        assert!(reason("010.1.1.1").starts_with("is neither an IP address"));
        assert_eq!(
            reason("10.0.0.1/8"),
            "has host bits set; the network of 10.0.0.1/8 is 10.0.0.0/8: write \"10.0.0.0/8\", or \"10.0.0.1\" for the one address"
        );
        assert_eq!(
            reason("10.0.0.0/33"),
            "has the prefix length /33; an IPv4 prefix is at most /32"
        );
        assert_eq!(
            reason("2001:db8::/129"),
            "has the prefix length /129; an IPv6 prefix is at most /128"
        );
        assert!(reason("10.0.0.0/8:443").contains("ports cannot be added to it"));
        assert_eq!(
            reason("10.0.0.0/"),
            "has the prefix length \"\", which is not a number from 0 to 32"
        );
        assert_eq!(
            reason("2001:db8::1:443:zz"),
            "is not a valid IPv6 address; with a port, write it in brackets: [2001:db8::1]:443"
        );
        assert_eq!(
            reason("https://2001:db8::1"),
            "has an IPv6 address without brackets after the scheme; write \"https://[2001:db8::1]\""
        );
        assert!(reason("[2001:db8::1").starts_with("has '[' with no closing ']'"));
        assert_eq!(
            reason("[example.com]:443"),
            "has \"example.com\" in brackets, which is not an IPv6 address"
        );
        assert_eq!(
            reason("[2001:db8::1]x"),
            "has \"x\" after the closing ']'; write [address]:port"
        );
        assert_eq!(
            reason("[2001:db8::]/32"),
            "puts a network in brackets; write the CIDR without them: \"2001:db8::/32\""
        );
        assert_eq!(
            reason("fe80::1%eth0"),
            "has the zone index \"%eth0\"; zones are local to one machine and cannot be enforced: write \"fe80::1\""
        );
    }

    #[test]
    fn urls_keep_scheme_host_and_port_only() {
        let url = parse_url("https://user:tok@mcp.example.com:8443/sse?x=1#f").unwrap();
        assert_eq!(
            url,
            HostSpec {
                target: name("mcp.example.com"),
                ports: only(&[(Tcp, 8443), (Udp, 8443)])
            }
        );
        assert_eq!(
            parse_url("http://mcp.example.com/mcp").unwrap().ports,
            only(&[(Tcp, 80)])
        );
        assert!(
            parse_url("mcp.example.com/sse")
                .unwrap_err()
                .reason
                .starts_with("has no scheme")
        );
        assert_eq!(
            parse_url("https://*.example.com/").unwrap_err().reason,
            "has a wildcard; an MCP server URL names one host"
        );
        assert!(
            parse_url("ftp://x.example.com")
                .unwrap_err()
                .reason
                .starts_with("uses the scheme")
        );
    }

    #[test]
    fn display_quotes_the_entry() {
        let err = parse_entry("https://example.com/v1").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("\"https://example.com/v1\" has a path")
        );
    }
}
