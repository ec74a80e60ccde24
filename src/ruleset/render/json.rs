//! libnftables JSON (`nft -j -f`), schema version 1 (libnftables-json(5)).
//!
//! nft 1.0.6 accepts but ignores a table's `comment` in JSON (it keeps it
//! only from `nft -f` text); the digest is still written so newer versions
//! store it.

use ipnet::IpNet;
use serde_json::{Value, json};

use super::{addr_protocol, icmpv6_type_name, key_types, proto_name};
use crate::ruleset::model::{
    Action, Chain, ChainKind, ChainPolicy, Element, Family, Hook, Match, RejectKind, Rule, Ruleset,
    Set, TABLE_NAME,
};

/// The ruleset as libnftables JSON (`nft -j -f`), same semantics as [`super::nft`].
pub fn json(ruleset: &Ruleset) -> Value {
    let table = json!({"family": "inet", "name": TABLE_NAME});
    let mut commands = vec![
        json!({"metainfo": {"json_schema_version": 1}}),
        // Creating the table first makes the delete valid when it does not exist yet.
        json!({"add": {"table": table}}),
        json!({"delete": {"table": table}}),
        json!({"add": {"table": {"family": "inet", "name": TABLE_NAME, "comment": ruleset.digest}}}),
    ];
    commands.extend(
        ruleset
            .sets
            .iter()
            .map(|set| json!({"add": {"set": set_object(set)}})),
    );
    for chain in &ruleset.chains {
        commands.push(json!({"add": {"chain": chain_object(chain)}}));
        commands.extend(
            chain
                .rules
                .iter()
                .map(|rule| json!({"add": {"rule": rule_object(&chain.name, rule)}})),
        );
    }
    json!({ "nftables": commands })
}

fn set_object(set: &Set) -> Value {
    let types = key_types(set.key);
    let mut object = json!({
        "family": "inet",
        "table": TABLE_NAME,
        "name": set.name,
        "type": if types.len() == 1 { json!(types[0]) } else { json!(types) },
    });
    let flags: Vec<&str> = [(set.interval, "interval"), (set.timeout, "timeout")]
        .into_iter()
        .filter_map(|(on, flag)| on.then_some(flag))
        .collect();
    if !flags.is_empty() {
        object["flags"] = json!(flags);
    }
    if !set.elements.is_empty() {
        object["elem"] = Value::Array(set.elements.iter().map(element_value).collect());
    }
    object
}

fn net_value(net: &IpNet) -> Value {
    if net.prefix_len() == net.max_prefix_len() {
        json!(net.addr().to_string())
    } else {
        json!({"prefix": {"addr": net.addr().to_string(), "len": net.prefix_len()}})
    }
}

fn element_value(element: &Element) -> Value {
    match element {
        Element::Addr(net) => net_value(net),
        Element::AddrProtoPort(net, proto, port) => {
            json!({"concat": [net_value(net), proto_name(*proto), port]})
        }
    }
}

fn chain_object(chain: &Chain) -> Value {
    let mut object = json!({"family": "inet", "table": TABLE_NAME, "name": chain.name});
    if let Some(base) = &chain.base {
        object["type"] = json!(match base.kind {
            ChainKind::Filter | ChainKind::Raw => "filter",
            ChainKind::Nat => "nat",
        });
        object["hook"] = json!(match base.hook {
            Hook::Output => "output",
            Hook::Forward => "forward",
            Hook::Prerouting => "prerouting",
        });
        object["prio"] = json!(base.priority);
        object["policy"] = json!(match base.policy {
            ChainPolicy::Accept => "accept",
            ChainPolicy::Drop => "drop",
        });
    }
    object
}

fn rule_object(chain: &str, rule: &Rule) -> Value {
    let mut expr: Vec<Value> = rule.matches.iter().map(match_value).collect();
    expr.extend(rule.actions.iter().map(action_value));
    json!({"family": "inet", "table": TABLE_NAME, "chain": chain, "comment": rule.id, "expr": expr})
}

/// One value, or an anonymous set of several.
fn one_or_set(mut values: Vec<Value>) -> Value {
    if values.len() == 1 {
        values.remove(0)
    } else {
        json!({ "set": values })
    }
}

fn equals(left: Value, right: Value) -> Value {
    json!({"match": {"op": "==", "left": left, "right": right}})
}

fn payload(protocol: &str, field: &str) -> Value {
    json!({"payload": {"protocol": protocol, "field": field}})
}

fn meta(key: &str) -> Value {
    json!({"meta": {"key": key}})
}

fn match_value(m: &Match) -> Value {
    match m {
        Match::OifLoopback => equals(meta("oif"), json!("lo")),
        // ct state is a bitmask: `in` matches when any of the listed bits is set.
        Match::CtEstablishedRelated => {
            json!({"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}})
        }
        Match::Icmpv6Types(types) => {
            let values = types.iter().map(|t| {
                icmpv6_type_name(*t)
                    .map(|name| json!(name))
                    .unwrap_or_else(|| json!(t))
            });
            equals(payload("icmpv6", "type"), one_or_set(values.collect()))
        }
        Match::L4ProtoIn(protos) => equals(
            meta("l4proto"),
            one_or_set(protos.iter().map(|p| json!(proto_name(*p))).collect()),
        ),
        Match::DportIn(ports) => equals(
            payload("th", "dport"),
            one_or_set(ports.iter().map(|p| json!(p)).collect()),
        ),
        Match::DaddrInSet { family, set } => equals(
            payload(addr_protocol(*family), "daddr"),
            json!(format!("@{set}")),
        ),
        Match::DaddrProtoPortInSet { family, set } => {
            let key = json!({"concat": [payload(addr_protocol(*family), "daddr"), meta("l4proto"), payload("th", "dport")]});
            equals(key, json!(format!("@{set}")))
        }
        Match::Daddr(addr) => equals(
            payload(addr_protocol(Family::of(addr)), "daddr"),
            json!(addr.to_string()),
        ),
        Match::SaddrProtoSportInSet { family, set } => {
            let key = json!({"concat": [payload(addr_protocol(*family), "saddr"), meta("l4proto"), payload("th", "sport")]});
            equals(key, json!(format!("@{set}")))
        }
        Match::MarkIs(mark) => equals(meta("mark"), json!(mark)),
        Match::MarkIsNot(mark) => {
            json!({"match": {"op": "!=", "left": meta("mark"), "right": mark}})
        }
    }
}

fn action_value(action: &Action) -> Value {
    match action {
        Action::Counter => json!({"counter": null}),
        Action::Log { group, prefix } => json!({"log": {"prefix": prefix, "group": group}}),
        Action::Accept => json!({"accept": null}),
        Action::Drop => json!({"drop": null}),
        Action::Reject(RejectKind::TcpReset) => json!({"reject": {"type": "tcp reset"}}),
        Action::Reject(RejectKind::IcmpxAdminProhibited) => {
            json!({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
        }
        Action::Jump(chain) => json!({"jump": {"target": chain}}),
        Action::Redirect(port) => json!({"redirect": {"port": port}}),
        Action::CtZoneSet(zone) => {
            json!({"mangle": {"key": {"ct": {"key": "zone"}}, "value": zone}})
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::Proto;
    use crate::ruleset::model::Family;

    #[test]
    fn elements_are_addresses_prefixes_or_concatenations() {
        assert_eq!(
            element_value(&Element::Addr("192.0.2.1/32".parse().unwrap())),
            json!("192.0.2.1")
        );
        assert_eq!(
            element_value(&Element::AddrProtoPort(
                "2001:db8::/32".parse().unwrap(),
                Proto::Udp,
                443
            )),
            json!({"concat": [{"prefix": {"addr": "2001:db8::", "len": 32}}, "udp", 443]})
        );
    }

    #[test]
    fn concatenated_set_match_has_the_key_in_set_order() {
        let m = Match::DaddrProtoPortInSet {
            family: Family::V4,
            set: "dns_v4_ports".into(),
        };
        assert_eq!(
            match_value(&m),
            json!({"match": {"op": "==", "left": {"concat": [
                {"payload": {"protocol": "ip", "field": "daddr"}},
                {"meta": {"key": "l4proto"}},
                {"payload": {"protocol": "th", "field": "dport"}}
            ]}, "right": "@dns_v4_ports"}})
        );
        assert_eq!(
            match_value(&Match::L4ProtoIn(vec![Proto::Tcp])),
            json!({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "tcp"}})
        );
    }
}
