//! The DNS arguments the sidecar and the agent share: upstream servers,
//! durations and the hidden TTL clamp overrides, and the one error their
//! checks give (invalid input, exit code 2).

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use crate::dns::ttl::{self, TtlPolicy};
use crate::dns::upstream::{self, DNS_PORT};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid --ttl-min/--ttl-max/--ttl-grace")]
    Ttl(#[source] ttl::Error),
    #[error("no upstream DNS server: give --upstream IP, or a resolv.conf with a nameserver line")]
    Upstream(#[source] upstream::Error),
}

/// The TTL clamp overrides, hidden: for tests and benchmarks that need
/// learned addresses to expire within seconds.
#[derive(Debug, Clone, clap::Args)]
pub struct TtlArgs {
    /// Shortest time a learned address stays allowed (TTL clamp minimum), e.g. 30s.
    #[arg(long, hide = true, env = "NETLEASH_TTL_MIN", value_parser = parse_duration)]
    pub ttl_min: Option<Duration>,

    /// Longest time a learned address stays allowed on one answer (TTL clamp maximum).
    #[arg(long, hide = true, env = "NETLEASH_TTL_MAX", value_parser = parse_duration)]
    pub ttl_max: Option<Duration>,

    /// Added to every learned address's timeout after clamping.
    #[arg(long, hide = true, env = "NETLEASH_TTL_GRACE", value_parser = parse_duration)]
    pub ttl_grace: Option<Duration>,
}

impl TtlArgs {
    /// The default TTL policy with the overrides applied, validated.
    pub fn policy(&self) -> Result<TtlPolicy, Error> {
        let mut policy = TtlPolicy::default();
        if let Some(min) = self.ttl_min {
            policy.min_ttl = min;
        }
        if let Some(max) = self.ttl_max {
            policy.max_ttl = max;
        }
        if let Some(grace) = self.ttl_grace {
            policy.grace = grace;
        }
        policy.validate().map_err(Error::Ttl)?;
        Ok(policy)
    }
}

/// The nameservers of the resolv.conf at `path`, when no `--upstream` is given.
pub fn servers_from_resolv_conf(path: &Path) -> Result<Vec<SocketAddr>, Error> {
    upstream::servers_from_resolv_conf(path).map_err(Error::Upstream)
}

/// An `--upstream`: IP, IP:PORT or [IPv6]:PORT, port 53 by default.
pub fn parse_upstream(text: &str) -> Result<SocketAddr, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DNS_PORT));
    }
    text.parse::<SocketAddr>().map_err(|_| {
        format!("{text:?} is not IP, IP:PORT or [IPv6]:PORT (e.g. 192.0.2.53, 192.0.2.53:5353, [2001:db8::53]:53)")
    })
}

/// `30`, `30s`, `500ms` or `2m`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 30s, 500ms or 2m"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(value)),
        "s" => Ok(Duration::from_secs(value)),
        "m" => Ok(Duration::from_secs(value * 60)),
        _ => Err(format!("{text:?}: the unit must be ms, s or m")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstreams_take_an_optional_port() {
        assert_eq!(
            parse_upstream("198.51.100.53").unwrap(),
            "198.51.100.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("2001:db8::53").unwrap(),
            "[2001:db8::53]:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("[2001:db8::53]:5353").unwrap(),
            "[2001:db8::53]:5353".parse().unwrap()
        );
        let error = parse_upstream("resolver.example").unwrap_err();
        assert!(error.contains("IP:PORT"), "{error}");
    }

    #[test]
    fn durations_have_units() {
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("s").is_err());
    }
}
