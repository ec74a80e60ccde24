//! Renderers of the ruleset model: `nft -f` text and libnftables JSON.
//!
//! Both describe the same transaction, which replaces the `inet netleash`
//! table atomically and touches no other table:
//! 1. `add table inet netleash` (creates it if missing, so step 2 cannot fail);
//! 2. `delete table inet netleash` (drops the old sets, chains and rules);
//! 3. the new table with its sets, chains and rules.
//!
//! nft applies a file or a JSON document as one netlink batch, so either the
//! whole new table is in force afterwards, or (on any error) the old one still is.
//! Output is deterministic: sets, elements, chains and rules in model order.

mod json;
mod nft;

pub use json::json;
pub use nft::nft;

use super::model::{Family, SetKey};
use crate::policy::Proto;

/// The nft name of an ICMPv6 type number (see `nft describe icmpv6 type`),
/// or `None` for a type without a name.
fn icmpv6_type_name(number: u8) -> Option<&'static str> {
    Some(match number {
        1 => "destination-unreachable",
        2 => "packet-too-big",
        3 => "time-exceeded",
        4 => "parameter-problem",
        128 => "echo-request",
        129 => "echo-reply",
        130 => "mld-listener-query",
        131 => "mld-listener-report",
        132 => "mld-listener-done",
        133 => "nd-router-solicit",
        134 => "nd-router-advert",
        135 => "nd-neighbor-solicit",
        136 => "nd-neighbor-advert",
        137 => "nd-redirect",
        138 => "router-renumbering",
        141 => "ind-neighbor-solicit",
        142 => "ind-neighbor-advert",
        143 => "mld2-listener-report",
        _ => return None,
    })
}

/// `ip` or `ip6`: the payload protocol of an address match.
fn addr_protocol(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

/// The nft data type of an address.
fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// The nft data types of a set key, one per concatenated field.
fn key_types(key: SetKey) -> Vec<&'static str> {
    match key {
        SetKey::Addr(family) => vec![addr_type(family)],
        SetKey::AddrProtoPort(family) => vec![addr_type(family), "inet_proto", "inet_service"],
    }
}

fn proto_name(proto: Proto) -> &'static str {
    match proto {
        Proto::Tcp => "tcp",
        Proto::Udp => "udp",
    }
}
