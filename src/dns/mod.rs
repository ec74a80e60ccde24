//! Keeping the DNS-derived sets of a ruleset fresh.
//!
//! The compiler puts every allowed name into `Ruleset::names`; the sets those
//! bindings name (`dns_v4`, `dns_v6`, `dns_v4_ports`, `dns_v6_ports`) carry
//! `flags timeout` and start empty. This module fills them:
//! - [`proxy`]: the filtering DNS proxy a sandbox's port-53 traffic is
//!   redirected to. It forwards only queries for allowed names, writes the
//!   answer's addresses into the sets and only then releases the answer, and
//!   refuses every other name (no tunnelling through the resolver);
//! - [`resolver`]: the resolver loop that keeps the exact names resolved and
//!   their elements refreshed before they expire, and keeps last-known
//!   addresses through an upstream outage;
//! - [`cache`]: the answer cache both share, across sandboxes;
//! - [`learn`]: the boundary to the kernel ([`learn::AddressSink`]) and the
//!   mapping from (binding, address) to set elements;
//! - [`ttl`]: the documented TTL policy (clamping, grace, refresh, backoff,
//!   stale limit);
//! - [`answer`], [`names`], [`origins`], [`upstream`]: address extraction,
//!   the allowed-name index, address → name memory, upstream exchange.
//!
//! Nothing here talks netlink or changes namespaces: the sockets the proxy
//! serves on are given to it already bound, and the sink is given to it.

pub mod answer;
pub mod cache;
pub mod learn;
pub mod names;
pub mod origins;
pub mod proxy;
pub mod resolver;
pub mod ttl;
pub mod upstream;

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};

/// A random `u64` from the standard library's per-process random SipHash
/// keys applied to a counter: unpredictable to anyone outside the process,
/// which is what DNS ids (RFC 5452 §9.2) and timing jitter need.
pub(crate) fn random_u64() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    RandomState::new().hash_one(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// A random number in `[0, 1)` for jitter.
pub(crate) fn jitter() -> f64 {
    (random_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// An error and its causes on one line (`message: cause: cause`), for logs.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_in_the_unit_interval_and_varies() {
        let values: Vec<f64> = (0..100).map(|_| jitter()).collect();
        assert!(values.iter().all(|v| (0.0..1.0).contains(v)));
        assert!(values.iter().any(|v| (v - values[0]).abs() > 1e-9));
    }

    #[test]
    fn error_chain_joins_causes() {
        let error = upstream::Error::Udp {
            server: "127.0.0.1:53".parse().unwrap(),
            source: std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused"),
        };
        assert_eq!(
            error_chain(&error),
            "exchanging a query with the upstream DNS server 127.0.0.1:53 over UDP: refused"
        );
    }
}
