//! Verification against a table changed behind netleash's back: after an
//! apply, one value of one rule is changed with `nft` inside the test's
//! namespace (a port, an inverted lookup, a header offset, a meta key, a
//! log group, a reject code, a verdict, ...). The comparison of the table
//! in force with the model (`kernel::plan`, what `apply --dry-run` and the
//! verification after every apply run) must report exactly that rule, with
//! exactly the changed expression on both sides, and the next apply must
//! put the model back in force.
//!
//! These tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) and `nft`; they
//! FAIL when they cannot run, never skip. No test sends a packet.

use netleash::kernel::{self, Difference};
use netleash::ruleset::{self, Ruleset};
use serde_json::Value;

use super::fixtures;
use super::kernel::Netns;

/// The DNS proxy's policy: every kind of expression the compiler emits
/// (named and anonymous lookups, compares, payload loads, `ct state`, log,
/// both rejects, jumps, marks, `redirect`, `ct zone set`).
fn proxied() -> Ruleset {
    let (_, policy) = fixtures::proxy_cases()
        .into_iter()
        .next()
        .expect("a proxy case");
    ruleset::compile(&policy, &fixtures::proxy_options())
}

/// One change made behind netleash's back: rule `rule` of model chain
/// `chain` replaced by `nft` with `text` (`{g}` stands for the generation
/// suffix of the generation in force, e.g. `.g2`; `{SET}` for the kernel
/// name of model set SET, which may be kept from an earlier generation, e.g.
/// `blocklist_v4.g1`), and what the comparison
/// must then say of it, in the kernel and in the policy.
struct Tampering {
    chain: &'static str,
    rule: &'static str,
    text: &'static str,
    kernel: &'static [&'static str],
    model: &'static [&'static str],
}

const TAMPERINGS: &[Tampering] = &[
    // "not in set": the blocklist inverted lets everything else be denied
    // and the blocklist through.
    Tampering {
        chain: "egress",
        rule: "blocklist-v4",
        text: "ip daddr != @{blocklist_v4} counter jump deny{g}",
        kernel: &["#3 lookup reg 1 !@blocklist_v4"],
        model: &["#3 lookup reg 1 @blocklist_v4"],
    },
    // The source address instead of the destination.
    Tampering {
        chain: "egress",
        rule: "blocklist-v4",
        text: "ip saddr @{blocklist_v4} counter jump deny{g}",
        kernel: &["#2 payload load 4b @ network header + 12 => reg 1"],
        model: &["#2 payload load 4b @ network header + 16 => reg 1"],
    },
    // Another port.
    Tampering {
        chain: "egress",
        rule: "dns-proxy-v4",
        text: "ip daddr 127.0.0.1 meta l4proto { tcp, udp } th dport 1054 accept",
        kernel: &["#7 cmp eq reg 1 0x041e"],
        model: &["#7 cmp eq reg 1 0x041d"],
    },
    // Another port in an anonymous set.
    Tampering {
        chain: "egress",
        rule: "dns-other",
        text: "meta l4proto { tcp, udp } th dport { 53, 854 } counter jump deny{g}",
        kernel: &["#3 lookup reg 1 { 0x0035, 0x0356 } (key type 13 of 2 bytes)"],
        model: &["#3 lookup reg 1 { 0x0035, 0x0355 } (key type 13 of 2 bytes)"],
    },
    // One more ICMPv6 type let through.
    Tampering {
        chain: "egress",
        rule: "icmpv6-neighbour-discovery",
        text: "icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert, \
               mld2-listener-report, echo-request } accept",
        kernel: &["#5 lookup reg 1 { 0x80, 0x85, 0x87, 0x88, 0x8f } (key type 29 of 1 bytes)"],
        model: &["#5 lookup reg 1 { 0x85, 0x87, 0x88, 0x8f } (key type 29 of 1 bytes)"],
    },
    // Another address.
    Tampering {
        chain: "egress",
        rule: "dns-proxy-v4",
        text: "ip daddr 127.0.0.2 meta l4proto { tcp, udp } th dport 1053 accept",
        kernel: &["#3 cmp eq reg 1 0x7f000002"],
        model: &["#3 cmp eq reg 1 0x7f000001"],
    },
    // Another meta key with the same value (interface 1 in, not out).
    Tampering {
        chain: "egress",
        rule: "loopback",
        text: "iif \"lo\" accept",
        kernel: &["#0 meta load iif => reg 1"],
        model: &["#0 meta load oif => reg 1"],
    },
    // `ct state established` only: another mask.
    Tampering {
        chain: "egress",
        rule: "established",
        text: "ct state established accept",
        kernel: &["#1 bitwise reg 1 = (reg 1 & 0x02000000) ^ 0x00000000 len 4"],
        model: &["#1 bitwise reg 1 = (reg 1 & 0x06000000) ^ 0x00000000 len 4"],
    },
    // The default deny accepting.
    Tampering {
        chain: "egress",
        rule: "default-deny",
        text: "counter accept",
        kernel: &["#1 accept"],
        model: &["#1 jump deny"],
    },
    // "not the proxy's mark" turned into "the proxy's mark".
    Tampering {
        chain: "egress",
        rule: "dns-not-redirected",
        text: "meta mark 0x00006e6c meta l4proto { tcp, udp } th dport 53 counter jump deny{g}",
        kernel: &["#1 cmp eq reg 1 0x6c6e0000"],
        model: &["#1 cmp neq reg 1 0x6c6e0000"],
    },
    // Another kind of reject.
    Tampering {
        chain: "deny",
        rule: "deny-tcp",
        text: "meta l4proto tcp log prefix \"netleash deny \" group 4711 reject with icmpx admin-prohibited",
        kernel: &["#3 reject icmpx code 3"],
        model: &["#3 reject tcp reset"],
    },
    // Another log group: denials no longer reach the agent.
    Tampering {
        chain: "deny",
        rule: "deny-other",
        text: "log prefix \"netleash deny \" group 4712 reject with icmpx admin-prohibited",
        kernel: &["#0 log prefix \"netleash deny \" group 4712"],
        model: &["#0 log prefix \"netleash deny \" group 4711"],
    },
    // Another reject code.
    Tampering {
        chain: "deny",
        rule: "deny-other",
        text: "log prefix \"netleash deny \" group 4711 reject with icmpx port-unreachable",
        kernel: &["#1 reject icmpx code 1"],
        model: &["#1 reject icmpx code 3"],
    },
    // DNS redirected to another port.
    Tampering {
        chain: "dns-redirect-body",
        rule: "dns-redirect",
        text: "meta mark != 0x00006e6c meta l4proto { tcp, udp } th dport 53 redirect to :1054",
        kernel: &["#6 immediate reg 1 0x041e"],
        model: &["#6 immediate reg 1 0x041d"],
    },
    // Another conntrack zone.
    Tampering {
        chain: "dns-zone-output-body",
        rule: "dns-zone-proxy",
        text: "meta mark 0x00006e6c ct zone set 28269",
        kernel: &["#2 immediate reg 1 0x6d6e"],
        model: &["#2 immediate reg 1 0x6c6e"],
    },
];

/// `nft -j list table inet netleash`.
fn listing(ns: &Netns) -> Value {
    let out = ns.nft(&["-j", "list", "table", "inet", "netleash"]);
    assert!(
        out.status.success(),
        "nft list failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("nft -j prints JSON")
}

/// The kernel name of model chain `chain` in `listing` (a generation chain
/// `egress.g3`, or a base chain under its own name), and the generation
/// suffix (`.g3`) of the generation in force.
fn kernel_chain(listing: &Value, chain: &str) -> (String, String) {
    let names: Vec<&str> = listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item["chain"]["name"].as_str())
        .collect();
    let egress = names
        .iter()
        .find(|name| name.starts_with("egress.g"))
        .unwrap_or_else(|| panic!("no generation chain in {names:?}"));
    let suffix = egress.trim_start_matches("egress").to_string();
    let name = names
        .iter()
        .find(|name| **name == chain || name.strip_suffix(suffix.as_str()) == Some(chain))
        .unwrap_or_else(|| panic!("no chain {chain} in {names:?}"));
    (name.to_string(), suffix)
}

/// The handle of the rule with comment `rule` in kernel chain `chain`.
fn handle(listing: &Value, chain: &str, rule: &str) -> u64 {
    listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item.get("rule"))
        .find(|r| r["chain"] == chain && r["comment"] == rule)
        .and_then(|r| r["handle"].as_u64())
        .unwrap_or_else(|| panic!("no rule {rule} in chain {chain}"))
}

/// Replace the rule of `tampering` with its text, keeping its comment.
fn tamper(ns: &Netns, tampering: &Tampering) {
    let listing = listing(ns);
    let (chain, suffix) = kernel_chain(&listing, tampering.chain);
    let handle = handle(&listing, &chain, tampering.rule).to_string();
    let mut text = tampering.text.replace("{g}", &suffix);
    for set in listing["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item["set"]["name"].as_str())
    {
        let model = set.split_once(".g").map_or(set, |(model, _)| model);
        text = text.replace(&format!("{{{model}}}"), set);
    }
    let statement = format!(
        "replace rule inet netleash {chain} handle {handle} {text} comment \"{}\"",
        tampering.rule
    );
    let out = ns.nft(&[&statement]);
    assert!(
        out.status.success(),
        "nft {statement}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn differences(ns: &Netns, model: &Ruleset) -> Vec<Difference> {
    kernel::plan(&ns.target(), model)
        .expect("compare the table with the model")
        .differences
}

#[test]
fn a_value_changed_behind_netleashs_back_is_reported_exactly_and_repaired() {
    let ns = Netns::new("verify");
    let model = proxied();
    kernel::apply(&ns.target(), &model).expect("apply");
    assert_eq!(differences(&ns, &model), vec![]);
    for tampering in TAMPERINGS {
        tamper(&ns, tampering);
        let found = differences(&ns, &model);
        let expected = Difference::RuleExpressions {
            chain: tampering.chain.into(),
            rule: tampering.rule.into(),
            kernel: tampering.kernel.iter().map(|s| s.to_string()).collect(),
            model: tampering.model.iter().map(|s| s.to_string()).collect(),
        };
        assert_eq!(found, vec![expected], "after {:?}", tampering.text);
        // What `apply --dry-run` and a failed verification print.
        if tampering.text.contains("!= @") {
            assert_eq!(
                found[0].to_string(),
                "rule \"blocklist-v4\" in chain \"egress\" has expressions \
                 [#3 lookup reg 1 !@blocklist_v4] in the kernel, \
                 [#3 lookup reg 1 @blocklist_v4] in the policy"
            );
        }
        // The next apply puts the model back in force (a new generation),
        // and verifies it.
        kernel::apply(&ns.target(), &model).expect("re-apply");
        assert_eq!(
            differences(&ns, &model),
            vec![],
            "after re-applying over {:?}",
            tampering.text
        );
    }
}
