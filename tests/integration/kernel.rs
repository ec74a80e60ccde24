//! The kernel layer against the real kernel: apply, read back, re-apply,
//! element updates, remove, large sets, namespaces by pid, and the CLI.
//!
//! These tests need root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and `ip netns`.
//! They FAIL when they cannot run; they never skip. Every test works in its
//! own network namespace, created here and deleted on drop (also on panic).
//! No test sends a packet.

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netleash::kernel::{self, CountedVerdict, SetChange, SetUpdate};
use netleash::netns::Target;
use netleash::policy::{
    BlockEntry, CompileOptions, Dialect, HostRule, Mode, Policy, PortSpec, Ports, Proto, Source,
    Target as Dest,
};
use netleash::ruleset::{
    self, Action, Element, Family, Match, Rule, Ruleset, Set, SetKey, SetRole,
};
use serde_json::Value;

static COUNTER: AtomicUsize = AtomicUsize::new(0);

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the kernel integration tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces \
         and nftables tables; run them as root (CI runs as root)"
    );
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|err| panic!("cannot run {program} {args:?}: {err}"))
}

/// A network namespace that exists for one test and is deleted on drop.
pub(super) struct Netns {
    name: String,
}

impl Netns {
    pub(super) fn new(tag: &str) -> Netns {
        require_root();
        let name = format!(
            "nlk-{tag}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let out = run("ip", &["netns", "add", &name]);
        assert!(
            out.status.success(),
            "`ip netns add {name}` failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Netns { name }
    }

    pub(super) fn target(&self) -> Target {
        Target::Name(self.name.clone())
    }

    pub(super) fn nft(&self, args: &[&str]) -> Output {
        let mut full = vec!["netns", "exec", &self.name, "nft"];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// `nft -j list table inet netleash`, or `None` if the table does not exist.
    fn nft_json(&self) -> Option<Value> {
        let out = self.nft(&["-j", "list", "table", "inet", "netleash"]);
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("No such file or directory"),
                "nft failed: {stderr}"
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("nft -j prints JSON"))
    }

    /// `nft list table inet netleash` as text.
    fn nft_text(&self) -> String {
        let out = self.nft(&["list", "table", "inet", "netleash"]);
        assert!(
            out.status.success(),
            "nft list failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = run("ip", &["netns", "del", &self.name]);
        if !out.status.success() && !std::thread::panicking() {
            panic!(
                "`ip netns del {}` failed: {}",
                self.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

fn net(text: &str) -> IpNet {
    text.parse().unwrap()
}

fn allow(target: &str, ports: &[(Proto, u16)]) -> HostRule {
    HostRule {
        target: Dest::Net(net(target)),
        ports: if ports.is_empty() {
            Ports::Any
        } else {
            Ports::Only(
                ports
                    .iter()
                    .map(|(proto, port)| PortSpec {
                        proto: *proto,
                        port: *port,
                    })
                    .collect(),
            )
        },
        sources: [Source::AllowedHosts].into(),
        entry: target.to_string(),
    }
}

fn block(target: &str) -> BlockEntry {
    BlockEntry {
        net: net(target),
        reason: "test".into(),
    }
}

fn policy(mode: Mode, rules: Vec<HostRule>) -> Policy {
    let mut rules = rules;
    rules.sort_by(|a, b| a.target.cmp(&b.target));
    Policy {
        mode,
        dialect: Dialect::Limited,
        rules,
        blocklist: vec![
            block("169.254.0.0/16"),
            block("100.64.0.0/10"),
            block("fd00:ec2::254/128"),
        ],
        warnings: vec![],
    }
}

fn options() -> CompileOptions {
    CompileOptions {
        resolvers: vec![
            "192.0.2.53".parse().unwrap(),
            "2001:db8::53".parse().unwrap(),
        ],
        nflog_group: 7,
        proxy: None,
    }
}

/// A typical limited policy: ranges, single addresses, ports, both families.
fn typical() -> Ruleset {
    let rules = vec![
        allow("198.51.100.0/24", &[]),
        allow("203.0.113.7/32", &[(Proto::Tcp, 443)]),
        allow("203.0.113.64/26", &[(Proto::Tcp, 80), (Proto::Udp, 443)]),
        allow("2001:db8:1::/64", &[(Proto::Tcp, 443)]),
        allow("2001:db8:2::5/128", &[]),
    ];
    ruleset::compile(&policy(Mode::Limited, rules), &options())
}

/// [`typical`] with one more range allowed on any port: it differs from
/// `typical` only in the elements of `allow_v4`.
fn typical_plus() -> Ruleset {
    let rules = vec![
        allow("192.0.2.0/24", &[]),
        allow("198.51.100.0/24", &[]),
        allow("203.0.113.7/32", &[(Proto::Tcp, 443)]),
        allow("203.0.113.64/26", &[(Proto::Tcp, 80), (Proto::Udp, 443)]),
        allow("2001:db8:1::/64", &[(Proto::Tcp, 443)]),
        allow("2001:db8:2::5/128", &[]),
    ];
    ruleset::compile(&policy(Mode::Limited, rules), &options())
}

/// `model` with, per family, a concatenated interval set (`address .
/// protocol . port`, pipapo in the kernel), `concatenated_v4` / `_v6`, that
/// holds what the model's port sets hold (`allow_v4_tcp_443`'s ranges, on
/// tcp/443), and an allow rule that looks it up, before `default-deny`. The
/// compiler emits no such set any more, but the kernel module applies and
/// verifies any model, and its encoding of a concatenated range (one
/// element, with an inclusive key end) must read back as the range.
fn with_concatenated_twin(mut model: Ruleset) -> Ruleset {
    let egress = model.chain("egress").unwrap().clone();
    for family in [Family::V4, Family::V6] {
        let mut elements = Vec::new();
        for rule in &egress.rules {
            if let [
                Match::L4ProtoIn(protos),
                Match::DportIn(ports),
                Match::DaddrInSet { family: of, set },
            ] = rule.matches.as_slice()
                && *of == family
            {
                let nets = model.set(set).unwrap().elements.iter().map(Element::net);
                elements.extend(nets.map(|net| Element::AddrProtoPort(net, protos[0], ports[0])));
            }
        }
        if elements.is_empty() {
            continue;
        }
        elements.sort();
        let tag = if family == Family::V4 { "v4" } else { "v6" };
        let name = format!("concatenated_{tag}");
        model.sets.push(Set {
            name: name.clone(),
            key: SetKey::AddrProtoPort(family),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements,
        });
        let egress = model
            .chains
            .iter_mut()
            .find(|c| c.name == "egress")
            .unwrap();
        let default_deny = egress.rules.len() - 1;
        egress.rules.insert(
            default_deny,
            Rule {
                id: format!("allow-concatenated-{tag}"),
                description: "the port sets' addresses, in a concatenated interval set".into(),
                matches: vec![Match::DaddrProtoPortInSet { family, set: name }],
                actions: vec![Action::Counter, Action::Accept],
            },
        );
    }
    model
}

fn other() -> Ruleset {
    ruleset::compile(
        &policy(
            Mode::Limited,
            vec![
                allow("192.0.2.0/25", &[(Proto::Tcp, 22)]),
                allow("192.0.2.128/25", &[]),
            ],
        ),
        &options(),
    )
}

/// The model name of an object in nft's listing: a generation object
/// `egress.g7` is `egress` (see `kernel::generation`); persistent objects
/// (base chains, DNS sets) have their model name.
fn model_name(kernel: &str) -> &str {
    match kernel.rsplit_once(".g") {
        Some((model, digits))
            if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) =>
        {
            model
        }
        _ => kernel,
    }
}

/// The items of one kind (`set`, `chain`, `rule`) in nft's JSON listing.
fn items<'a>(table: &'a Value, kind: &str) -> Vec<&'a Value> {
    table["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item.get(kind))
        .collect()
}

/// The one set of nft's listing with model name `name` (there must be exactly one).
fn set_json<'a>(table: &'a Value, name: &str) -> &'a Value {
    let found: Vec<&Value> = items(table, "set")
        .into_iter()
        .filter(|s| model_name(s["name"].as_str().unwrap()) == name)
        .collect();
    match found.as_slice() {
        [set] => set,
        [] => panic!("set {name} not in nft's listing"),
        _ => panic!("set {name} is in nft's listing {} times", found.len()),
    }
}

fn elements_json(table: &Value, name: &str) -> Vec<Value> {
    set_json(table, name)
        .get("elem")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
}

/// Rule comments per chain, in order, from nft's listing.
fn rule_comments(table: &Value, chain: &str) -> Vec<String> {
    items(table, "rule")
        .into_iter()
        .filter(|rule| model_name(rule["chain"].as_str().unwrap()) == chain)
        .map(|rule| rule["comment"].as_str().unwrap_or("(none)").to_string())
        .collect()
}

fn rule_handles(table: &Value) -> Vec<u64> {
    table["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|item| item.get("rule"))
        .map(|rule| rule["handle"].as_u64().unwrap())
        .collect()
}

fn prefix(addr: &str, len: u8) -> Value {
    serde_json::json!({ "prefix": { "addr": addr, "len": len } })
}

#[test]
fn apply_reads_back_what_the_model_says() {
    let ns = Netns::new("apply");
    let model = typical();
    let report = kernel::apply(&ns.target(), &model).expect("apply");
    assert_eq!(report.digest, model.digest);
    assert_eq!(report.sets, model.sets.len());
    let rules: usize = model.chains.iter().map(|c| c.rules.len()).sum();
    assert_eq!(report.rules, rules);

    let status = kernel::status(&ns.target())
        .unwrap()
        .expect("table present");
    assert_eq!(status.digest.as_deref(), Some(model.digest.as_str()));
    for set in &model.sets {
        let kernel_set = status
            .sets
            .iter()
            .find(|s| s.name == set.name)
            .expect("set present");
        assert_eq!(kernel_set.elements, set.elements.len(), "set {}", set.name);
        assert_eq!(
            (kernel_set.interval, kernel_set.timeout),
            (set.interval, set.timeout),
            "set {}",
            set.name
        );
    }
    let counted = |verdict: CountedVerdict| -> BTreeSet<&str> {
        status
            .counters
            .iter()
            .filter(|c| c.verdict == verdict)
            .map(|c| c.rule.as_str())
            .collect()
    };
    assert_eq!(
        counted(CountedVerdict::Denied),
        BTreeSet::from(["blocklist-v4", "blocklist-v6", "dns-other", "default-deny"])
    );
    assert_eq!(
        counted(CountedVerdict::Allowed),
        BTreeSet::from([
            "allow-static-v4",
            "allow-static-v4-ports",
            "allow-static-v4-tcp-80",
            "allow-static-v4-udp-443",
            "allow-static-v6",
            "allow-static-v6-tcp-443",
            "allow-dns-v4",
            "allow-dns-v4-ports",
            "allow-dns-v6",
            "allow-dns-v6-ports",
        ])
    );
    assert!(
        status
            .counters
            .iter()
            .all(|c| c.packets == 0 && c.bytes == 0)
    );

    // nft's own reading of the same table.
    let listing = ns.nft_json().expect("nft sees the table");
    assert_eq!(
        elements_json(&listing, "allow_v4"),
        vec![prefix("198.51.100.0", 24)],
        "198.51.100.0/24 must read back as exactly that prefix, not a range up to 255.255.255.255"
    );
    assert_eq!(
        elements_json(&listing, "allow_v6"),
        vec![Value::String("2001:db8:2::5".into())]
    );
    assert_eq!(
        elements_json(&listing, "blocklist_v4"),
        vec![prefix("100.64.0.0", 10), prefix("169.254.0.0", 16)]
    );
    // A single address allowed on a port: the family's hash set, keyed
    // address . protocol . port.
    assert_eq!(
        elements_json(&listing, "allow_v4_ports"),
        vec![serde_json::json!({"concat": ["203.0.113.7", "tcp", 443]})]
    );
    // The ranges allowed on a port, one address set per protocol and port.
    for (set, elements) in [
        ("allow_v4_tcp_80", vec![prefix("203.0.113.64", 26)]),
        ("allow_v4_udp_443", vec![prefix("203.0.113.64", 26)]),
        ("allow_v6_tcp_443", vec![prefix("2001:db8:1::", 64)]),
    ] {
        assert_eq!(elements_json(&listing, set), elements, "{set}");
    }
    let resolvers = elements_json(&listing, "resolvers_v4_ports");
    assert_eq!(resolvers.len(), 2, "{resolvers:?}");
    // Each rule's comment is its id; a base chain's entry rule also says
    // which policy is in force.
    for chain in &model.chains {
        let ids: Vec<String> = chain
            .rules
            .iter()
            .map(|r| match chain.base {
                Some(_) => format!("{} {}", r.id, model.digest),
                None => r.id.clone(),
            })
            .collect();
        assert_eq!(
            rule_comments(&listing, &chain.name),
            ids,
            "chain {}",
            chain.name
        );
    }
    let text = ns.nft_text();
    assert!(
        text.contains(&format!(
            "jump egress.g1 comment \"output-egress {}\"",
            model.digest
        )),
        "{text}"
    );
    // The generation's chains carry its shape digest and the policy it was
    // staged for.
    let staged = &model.digest[..7 + 16];
    assert!(
        regex::Regex::new(&format!(
            r#"chain egress\.g1 \{{\s+comment "shape sha256:[0-9a-f]{{64}} staged {staged}""#
        ))
        .unwrap()
        .is_match(&text),
        "{text}"
    );
    assert!(
        text.contains(
            "udp dport 443 ip daddr @allow_v4_udp_443.g1 counter packets 0 bytes 0 accept"
        ),
        "{text}"
    );
    assert!(
        text.contains("icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert"),
        "{text}"
    );
    assert!(
        text.contains("meta l4proto { tcp, udp } th dport { 53, 853 } counter"),
        "{text}"
    );
    assert!(
        text.contains("log prefix \"netleash deny \" group 7 reject with icmpx admin-prohibited"),
        "{text}"
    );
    assert!(
        text.contains("type filter hook output priority filter; policy drop;"),
        "{text}"
    );
}

/// A range in a concatenated interval set (pipapo) is one element with an
/// inclusive key end: nft reads it back as the prefix it is, not as a range
/// that runs further (fail open), and the rule reads the concatenation.
#[test]
fn a_concatenated_range_reads_back_as_its_range() {
    let ns = Netns::new("concat");
    let model = with_concatenated_twin(typical());
    kernel::apply(&ns.target(), &model).expect("apply");
    let listing = ns.nft_json().unwrap();
    let ported = elements_json(&listing, "concatenated_v4");
    assert_eq!(
        ported,
        [
            serde_json::json!({"concat": [prefix("203.0.113.64", 26), "tcp", 80]}),
            serde_json::json!({"concat": [prefix("203.0.113.64", 26), "udp", 443]}),
        ]
    );
    assert_eq!(
        elements_json(&listing, "concatenated_v6"),
        [serde_json::json!({"concat": [prefix("2001:db8:1::", 64), "tcp", 443]})]
    );
    let text = ns.nft_text();
    assert!(
        text.contains(
            "ip daddr . meta l4proto . th dport @concatenated_v4.g1 counter packets 0 bytes 0 accept"
        ),
        "{text}"
    );
}

#[test]
fn reapply_replaces_the_table_each_time() {
    let ns = Netns::new("reapply");
    let (a, b) = (typical(), other());
    for model in [&a, &a, &b, &a] {
        let report = kernel::apply(&ns.target(), model).expect("apply");
        assert_eq!(report.digest, model.digest);
        let status = kernel::status(&ns.target()).unwrap().unwrap();
        assert_eq!(status.digest.as_deref(), Some(model.digest.as_str()));
        let listing = ns.nft_json().unwrap();
        let allow_sets = model.sets.iter().filter(|s| s.role == SetRole::StaticAllow);
        for set in allow_sets {
            let expected: Vec<Value> = set
                .elements
                .iter()
                .map(|e| match e {
                    Element::Addr(n) if n.prefix_len() == n.max_prefix_len() => {
                        Value::String(n.addr().to_string())
                    }
                    Element::Addr(n) => prefix(&n.network().to_string(), n.prefix_len()),
                    Element::AddrProtoPort(n, proto, port) => {
                        serde_json::json!({"concat": [n.addr().to_string(), proto.to_string(), port]})
                    }
                })
                .collect();
            assert_eq!(elements_json(&listing, &set.name), expected, "{}", set.name);
        }
    }
}

/// The generation numbers of the generation chains in nft's listing, the
/// generation sets (model name and generation), and the names of the
/// objects without a generation.
fn generations_listed(table: &Value) -> (BTreeSet<u32>, Vec<(String, u32)>, BTreeSet<String>) {
    let mut generations = BTreeSet::new();
    let mut sets = Vec::new();
    let mut persistent = BTreeSet::new();
    for kind in ["set", "chain"] {
        for item in items(table, kind) {
            let name = item["name"].as_str().unwrap();
            match name
                .rsplit_once(".g")
                .and_then(|(model, n)| Some((model, n.parse().ok()?)))
            {
                Some((_, generation)) if kind == "chain" => {
                    generations.insert(generation);
                }
                Some((model, generation)) => sets.push((model.to_string(), generation)),
                None => {
                    persistent.insert(format!("{kind} {name}"));
                }
            }
        }
    }
    (generations, sets, persistent)
}

fn limited_persistent() -> BTreeSet<String> {
    [
        "chain output",
        "chain forward",
        "set dns_v4",
        "set dns_v6",
        "set dns_v4_ports",
        "set dns_v6_ports",
    ]
    .into_iter()
    .map(String::from)
    .collect()
}

#[test]
fn each_reapply_swaps_in_a_generation_and_leaves_exactly_one() {
    let ns = Netns::new("swap");
    let open = ruleset::compile(&policy(Mode::Unrestricted, vec![]), &options());
    let (a, b) = (typical(), other());
    let first = kernel::apply(&ns.target(), &a).expect("apply");
    assert_eq!(
        (first.generation, &first.method),
        (1, &kernel::Method::Create)
    );
    let mut generation = 1;
    let mut previous: Option<&ruleset::Ruleset> = Some(&a);
    for model in [&a, &b, &open, &a, &open, &b] {
        let report = kernel::apply(&ns.target(), model).expect("re-apply");
        if previous.is_some_and(|p| p.digest == model.digest) {
            // The policy in force again: an edit in place that changes no element.
            assert_eq!(
                report.method,
                kernel::Method::Edit {
                    generation,
                    added: 0,
                    removed: 0
                }
            );
            continue;
        }
        assert_eq!(
            report.method,
            kernel::Method::Swap {
                from: generation,
                to: generation + 1
            }
        );
        generation += 1;
        assert_eq!(report.generation, generation);
        assert_eq!(report.digest, model.digest);
        let listing = ns.nft_json().unwrap();
        let (generations, sets, persistent) = generations_listed(&listing);
        assert_eq!(
            generations,
            BTreeSet::from([generation]),
            "nft lists more than the generation in force:
{}",
            ns.nft_text()
        );
        // A set is kept from an earlier generation while it does not
        // change, so set generations may be older; but there is one set per
        // model set, and a set whose elements changed is of this generation.
        let set_names: BTreeSet<&str> = sets.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(set_names.len(), sets.len(), "{}", ns.nft_text());
        assert!(
            sets.iter().all(|(_, g)| *g <= generation),
            "{}",
            ns.nft_text()
        );
        if model.digest == b.digest
            && previous.is_some_and(|p: &ruleset::Ruleset| p.digest == a.digest)
        {
            // `allow_v4` lost its one range and gained another; `a` has
            // no set for tcp/22.
            for set in ["allow_v4", "allow_v4_tcp_22"] {
                let allow = sets.iter().find(|(name, _)| name == set).unwrap();
                assert_eq!(allow.1, generation, "{set}: {}", ns.nft_text());
            }
        }
        previous = Some(model);
        let expected = if model.mode == Mode::Limited {
            limited_persistent()
        } else {
            BTreeSet::from(["chain output".to_string(), "chain forward".to_string()])
        };
        assert_eq!(persistent, expected, "{}", ns.nft_text());
        let status = kernel::status(&ns.target()).unwrap().unwrap();
        assert_eq!(status.generation, Some(generation));
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        assert_eq!(status.digest.as_deref(), Some(model.digest.as_str()));
        let policies: Vec<Option<&str>> = status
            .chains
            .iter()
            .filter(|c| c.hook.is_some())
            .map(|c| c.policy.as_deref())
            .collect();
        let policy = if model.mode == Mode::Limited {
            "drop"
        } else {
            "accept"
        };
        assert_eq!(policies, [Some(policy), Some(policy)]);
        // The sets are reported by model name.
        let names: BTreeSet<&str> = status.sets.iter().map(|s| s.name.as_str()).collect();
        let model_names: BTreeSet<&str> = model.sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, model_names);
    }
}

#[test]
fn reapply_keeps_the_addresses_learned_from_dns() {
    let ns = Netns::new("learned");
    let (a, b) = (typical(), other());
    kernel::apply(&ns.target(), &a).unwrap();
    let learned_v4 = Element::Addr(net("203.0.113.99/32"));
    let learned_v6 = Element::AddrProtoPort(net("2001:db8::99/128"), Proto::Tcp, 443);
    kernel::update_elements(
        &ns.target(),
        &[
            dns_update("dns_v4", vec![learned_v4], Some(Duration::from_secs(600))),
            dns_update("dns_v6_ports", vec![learned_v6], None),
        ],
    )
    .unwrap();

    // A re-apply with another policy (same DNS set definitions) keeps them.
    let report = kernel::apply(&ns.target(), &b).unwrap();
    assert_eq!(report.generation, 2);
    assert_eq!((count(&ns, "dns_v4"), count(&ns, "dns_v6_ports")), (1, 1));
    let listing = ns.nft_json().unwrap();
    let element = &elements_json(&listing, "dns_v4")[0]["elem"];
    assert_eq!(element["val"], "203.0.113.99");
    assert_eq!(element["timeout"], 600, "the element keeps its timeout");
    assert_eq!(
        elements_json(&listing, "dns_v6_ports")[0],
        serde_json::json!({"concat": ["2001:db8::99", "tcp", 443]})
    );
    // The new generation's rules look them up.
    let text = ns.nft_text();
    assert!(
        text.contains("ip daddr @dns_v4 counter packets 0 bytes 0 accept"),
        "{text}"
    );
    assert!(
        text.contains(
            "ip6 daddr . meta l4proto . th dport @dns_v6_ports counter packets 0 bytes 0 accept"
        ),
        "{text}"
    );

    // A policy without DNS-derived sets deletes them; the next one starts empty.
    let open = ruleset::compile(&policy(Mode::Unrestricted, vec![]), &options());
    kernel::apply(&ns.target(), &open).unwrap();
    let listing = ns.nft_json().unwrap();
    assert!(
        items(&listing, "set")
            .iter()
            .all(|s| !s["name"].as_str().unwrap().starts_with("dns_")),
        "{}",
        ns.nft_text()
    );
    kernel::apply(&ns.target(), &a).unwrap();
    assert_eq!((count(&ns, "dns_v4"), count(&ns, "dns_v6_ports")), (0, 0));
}

#[test]
fn a_table_in_the_old_layout_is_replaced_once_then_generations_swap() {
    let ns = Netns::new("legacy");
    // What netleash wrote before generations: everything under model names.
    let legacy = "table inet netleash {\n  comment \"sha256:old\"\n  set dns_v4 { type ipv4_addr; flags timeout; }\n  \
                  chain egress { ip daddr @dns_v4 accept; }\n  \
                  chain output { type filter hook output priority 0; policy accept; jump egress; }\n}\n";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("legacy.nft");
    std::fs::write(&file, legacy).unwrap();
    let out = ns.nft(&["-f", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    assert_eq!(
        (status.generation, status.digest.as_deref()),
        (None, Some("sha256:old")),
        "a table under model names is read as it is"
    );

    let model = typical();
    let report = kernel::apply(&ns.target(), &model).unwrap();
    assert!(
        matches!(&report.method, kernel::Method::Replace { reason } if reason.contains("do not jump into a netleash generation")),
        "{:?}",
        report.method
    );
    assert_eq!(report.generation, 1);
    let (generations, _, persistent) = generations_listed(&ns.nft_json().unwrap());
    assert_eq!(generations, BTreeSet::from([1]));
    assert_eq!(persistent, limited_persistent());
    assert_eq!(
        kernel::apply(&ns.target(), &other()).unwrap().method,
        kernel::Method::Swap { from: 1, to: 2 }
    );
}

/// Give the namespace a default route through a veth pair whose both ends
/// are in it (and the far end has no address, so it drops what it gets), so
/// that packets to any address reach the output hook; nothing leaves the
/// namespace.
fn route_into_nothing(ns: &Netns) {
    for args in [
        &[
            "link", "add", "nothing0", "type", "veth", "peer", "name", "nothing1",
        ][..],
        &["addr", "add", "10.99.0.1/24", "dev", "nothing0"],
        &["link", "set", "nothing0", "up"],
        &["link", "set", "nothing1", "up"],
        &["route", "add", "default", "dev", "nothing0"],
    ] {
        let out = run("ip", &[&["-n", ns.name.as_str()][..], args].concat());
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }
}

/// Send one UDP datagram from inside the namespace to `to`, port 9.
fn send_udp(ns: &Netns, to: &str) {
    let to: std::net::SocketAddr = format!("{to}:9").parse().unwrap();
    netleash::netns::run_in(&ns.target(), move || {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").expect("a UDP socket");
        // A rejected datagram may fail to send (EPERM): it still passed the rules.
        let _ = socket.send_to(b"probe", to);
    })
    .expect("enter the namespace");
}

/// A rule's chain, handle and counter `(packets, bytes)`, if it counts.
type ListedRule = (String, u64, Option<(u64, u64)>);

/// The rules of the generation chains (not the base chains), from nft's listing.
fn generation_rules(listing: &Value) -> Vec<ListedRule> {
    items(listing, "rule")
        .into_iter()
        .filter(|rule| rule["chain"].as_str().unwrap().contains(".g"))
        .map(|rule| {
            let counter = rule["expr"].as_array().unwrap().iter().find_map(|e| {
                e.get("counter")
                    .map(|c| (c["packets"].as_u64().unwrap(), c["bytes"].as_u64().unwrap()))
            });
            (
                rule["chain"].as_str().unwrap().to_string(),
                rule["handle"].as_u64().unwrap(),
                counter,
            )
        })
        .collect()
}

/// The denied counter of `netleash status`: packets the deny rules counted.
fn denied_packets(ns: &Netns) -> u64 {
    kernel::status(&ns.target())
        .unwrap()
        .unwrap()
        .counters
        .iter()
        .filter(|c| c.verdict == kernel::CountedVerdict::Denied)
        .map(|c| c.packets)
        .sum()
}

#[test]
fn a_change_in_elements_only_edits_the_generation_in_force_and_keeps_its_counters() {
    let ns = Netns::new("edit");
    route_into_nothing(&ns);
    let (a, plus) = (typical(), typical_plus());
    // A namespace without a last apply file: the table is created without
    // being read first.
    let report = kernel::apply(&ns.target(), &a).unwrap();
    assert_eq!(
        (report.method, report.table_known),
        (kernel::Method::Create, kernel::TableKnown::AssumedAbsent)
    );
    // One packet allowed (198.51.100.0/24 on any port), one denied.
    send_udp(&ns, "198.51.100.5");
    send_udp(&ns, "203.0.113.200");
    let before = generation_rules(&ns.nft_json().unwrap());
    assert!(
        before
            .iter()
            .filter(|(_, _, c)| c.is_some_and(|(p, _)| p > 0))
            .count()
            >= 2,
        "the probes were counted: {before:?}"
    );
    let denied = denied_packets(&ns);
    assert!(denied >= 1, "the denied probe was counted");

    // Another host allowed: one element added, in place.
    let report = kernel::apply(&ns.target(), &plus).unwrap();
    assert_eq!(
        report.method,
        kernel::Method::Edit {
            generation: 1,
            added: 1,
            removed: 0
        }
    );
    assert_eq!(
        (report.generation, report.digest.as_str()),
        (1, plus.digest.as_str())
    );
    // Planned from the file the creating apply left (counted packets do
    // not change the ruleset generation id).
    assert_eq!(
        (report.table_known, report.restarts),
        (kernel::TableKnown::LastApply, 0)
    );
    let listing = ns.nft_json().unwrap();
    assert_eq!(
        generation_rules(&listing),
        before,
        "the generation's rules keep their handles and counters"
    );
    assert_eq!(
        denied_packets(&ns),
        denied,
        "status's denied counter is kept"
    );
    assert_eq!(
        elements_json(&listing, "allow_v4"),
        vec![prefix("192.0.2.0", 24), prefix("198.51.100.0", 24)]
    );
    let (generations, sets, _) = generations_listed(&listing);
    assert_eq!(generations, BTreeSet::from([1]));
    assert!(sets.iter().all(|(_, g)| *g == 1), "{}", ns.nft_text());
    let text = ns.nft_text();
    assert!(
        text.contains(&format!(
            "jump egress.g1 comment \"output-egress {}\"",
            plus.digest
        )),
        "{text}"
    );
    // Read from scratch: the digest in force is the new policy's, and a
    // session without memory finds nothing to change but edits (and
    // verifies) all the same.
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    assert_eq!(
        (status.generation, status.digest.as_deref()),
        (Some(1), Some(plus.digest.as_str()))
    );
    let mut session = kernel::Session::open(&ns.target()).unwrap();
    let report = session.apply(&plus).unwrap();
    assert_eq!(
        (report.method, report.table_known),
        (
            kernel::Method::Edit {
                generation: 1,
                added: 0,
                removed: 0
            },
            kernel::TableKnown::Read
        )
    );
    session.close_in_background();

    // Another program adds an element behind the one-shot applies' backs:
    // the edit planned from the last apply file is refused by the kernel,
    // and planned again from a reading, which removes that element too.
    let out = ns.nft(&[
        "add",
        "element",
        "inet",
        "netleash",
        "allow_v4.g1",
        "{ 10.0.0.1 }",
    ]);
    assert!(out.status.success(), "{out:?}");
    let report = kernel::apply(&ns.target(), &a).unwrap();
    assert_eq!(
        (report.method, report.restarts, report.table_known),
        (
            kernel::Method::Edit {
                generation: 1,
                added: 0,
                removed: 2
            },
            1,
            kernel::TableKnown::Read
        )
    );
    assert_eq!(
        elements_json(&ns.nft_json().unwrap(), "allow_v4"),
        vec![prefix("198.51.100.0", 24)]
    );
    assert_eq!(
        generation_rules(&ns.nft_json().unwrap()),
        before,
        "still the same rules and counters"
    );
    // The file an edit leaves is as good as a swap's: the next one-shot
    // edit plans from it.
    let report = kernel::apply(&ns.target(), &plus).unwrap();
    assert_eq!(
        (report.method, report.restarts, report.table_known),
        (
            kernel::Method::Edit {
                generation: 1,
                added: 1,
                removed: 0
            },
            0,
            kernel::TableKnown::LastApply
        )
    );

    // A change in the rules (another port set) still swaps generations,
    // and the counters of the new generation start at zero.
    let report = kernel::apply(&ns.target(), &other()).unwrap();
    assert_eq!(report.method, kernel::Method::Swap { from: 1, to: 2 });
    assert_eq!(denied_packets(&ns), 0);
}

/// The nft text of the table as an earlier netleash wrote it: the policy
/// digest as the comment of the generation's chains, and entry rules whose
/// comment is their id alone.
fn as_an_earlier_netleash_wrote_it(text: &str, digest: &str) -> String {
    let shape =
        regex::Regex::new(r#"comment "shape sha256:[0-9a-f]{64} staged sha256:[0-9a-f]{16}""#)
            .unwrap();
    let entry = regex::Regex::new(r#"comment "([a-z-]+) sha256:[0-9a-f]{64}""#).unwrap();
    let text = shape.replace_all(text, format!("comment \"{digest}\"").as_str());
    entry.replace_all(&text, "comment \"$1\"").into_owned()
}

#[test]
fn a_table_without_a_last_apply_file_is_read_not_created_again() {
    let ns = Netns::new("nofile");
    // A session leaves no last apply file: a one-shot apply then finds none,
    // assumes there is no table, and the kernel refuses the exclusive create.
    // The table is at generation 2, so that no object of the create's
    // generation 1 but the table and its base chains exists: only the
    // table's `NLM_F_EXCL` stops the create from adding to them.
    let mut session = kernel::Session::open(&ns.target()).unwrap();
    assert_eq!(
        session.apply(&typical()).unwrap().table_known,
        kernel::TableKnown::Read
    );
    assert_eq!(
        session.apply(&other()).unwrap().method,
        kernel::Method::Swap { from: 1, to: 2 }
    );
    session.close_in_background();
    let report = kernel::apply(&ns.target(), &typical()).unwrap();
    assert_eq!(
        (report.method, report.table_known, report.restarts),
        (
            kernel::Method::Swap { from: 2, to: 3 },
            kernel::TableKnown::Read,
            0
        )
    );
    let (generations, _, _) = generations_listed(&ns.nft_json().unwrap());
    assert_eq!(generations, BTreeSet::from([3]), "{}", ns.nft_text());
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    assert_eq!(status.digest.as_deref(), Some(typical().digest.as_str()));
    // That apply left a file: the next plans from it.
    let report = kernel::apply(&ns.target(), &typical_plus()).unwrap();
    assert_eq!(report.table_known, kernel::TableKnown::LastApply);
    // Another program's table of that name, with nothing of netleash's in
    // it, and no file: only the table's `NLM_F_EXCL` makes the kernel refuse
    // the create. Without it, the create would add to that table, and its
    // echo, which shows only what the create added, would hide the rest.
    assert!(kernel::remove(&ns.target()).unwrap());
    for command in [
        &["add", "table", "inet", "netleash"][..],
        &["add", "chain", "inet", "netleash", "foreign"],
        &["add", "rule", "inet", "netleash", "foreign", "accept"],
    ] {
        let out = ns.nft(command);
        assert!(out.status.success(), "{command:?}: {out:?}");
    }
    let report = kernel::apply(&ns.target(), &typical()).unwrap();
    assert_eq!(report.table_known, kernel::TableKnown::Read);
    assert!(
        !ns.nft_text().contains("foreign"),
        "the other program's chain is left: {}",
        ns.nft_text()
    );
    // After `remove` (which deletes the file too), the next apply creates
    // the table again without reading.
    assert!(kernel::remove(&ns.target()).unwrap());
    let report = kernel::apply(&ns.target(), &typical()).unwrap();
    assert_eq!(
        (report.method, report.table_known),
        (kernel::Method::Create, kernel::TableKnown::AssumedAbsent)
    );
}

#[test]
fn a_table_with_the_digest_on_its_chains_is_read_and_swapped_once_then_edited() {
    let ns = Netns::new("olddigest");
    let (a, plus) = (typical(), typical_plus());
    kernel::apply(&ns.target(), &a).unwrap();
    let old = as_an_earlier_netleash_wrote_it(&ns.nft_text(), &a.digest);
    assert!(
        !old.contains("shape sha256:") && !old.contains("egress sha256:"),
        "{old}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("old.nft");
    std::fs::write(&file, format!("delete table inet netleash\n{old}")).unwrap();
    let out = ns.nft(&["-f", file.to_str().unwrap()]);
    assert!(out.status.success(), "{out:?}\n{old}");
    // The digest in force is read from the chains.
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    assert_eq!(
        (status.generation, status.digest.as_deref()),
        (Some(1), Some(a.digest.as_str()))
    );
    // Its shape is unknown, so even an element change swaps, once (a
    // one-shot apply without a last apply file for this table reads it).
    let mut session = kernel::Session::open(&ns.target()).unwrap();
    let report = session.apply(&plus).unwrap();
    assert_eq!(report.method, kernel::Method::Swap { from: 1, to: 2 });
    session.close_in_background();
    let report = kernel::apply(&ns.target(), &a).unwrap();
    assert_eq!(
        report.method,
        kernel::Method::Edit {
            generation: 2,
            added: 0,
            removed: 1
        }
    );
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    assert_eq!(status.digest.as_deref(), Some(a.digest.as_str()));
    assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
}

#[test]
fn a_session_that_missed_a_change_starts_over_instead_of_applying_stale_plans() {
    let ns = Netns::new("stale");
    let (a, b) = (typical(), other());
    let mut session = kernel::Session::open(&ns.target()).unwrap();
    assert_eq!(session.apply(&a).unwrap().restarts, 0);
    // The session remembers the table; nothing else changed, so no restart.
    assert_eq!(session.apply(&b).unwrap().restarts, 0);
    // Another socket changes the ruleset (as the DNS layer does all the time).
    kernel::update_elements(
        &ns.target(),
        &[dns_update(
            "dns_v4",
            vec![Element::Addr(net("203.0.113.50/32"))],
            None,
        )],
    )
    .unwrap();
    // The session's first transaction carries the old generation id: the
    // kernel refuses it, and the apply reads the table and starts over.
    let report = session.apply(&a).unwrap();
    assert_eq!(report.restarts, 1);
    assert_eq!(report.method, kernel::Method::Swap { from: 2, to: 3 });
    assert_eq!(count(&ns, "dns_v4"), 1);
    let (generations, _, _) = generations_listed(&ns.nft_json().unwrap());
    assert_eq!(generations, BTreeSet::from([3]));
    session.close_in_background();
}

#[test]
fn concurrent_appliers_fail_cleanly_and_never_leave_a_broken_table() {
    let ns = Netns::new("race");
    // `a` and `plus` differ in elements alone (edits in place between
    // them), `b` in rules (swaps).
    let (a, b, plus) = (typical(), other(), typical_plus());
    kernel::apply(&ns.target(), &a).unwrap();
    let errors = std::thread::scope(|scope| {
        let workers: Vec<_> = [&a, &b, &plus]
            .into_iter()
            .map(|model| {
                let target = ns.target();
                scope.spawn(move || {
                    let mut session = kernel::Session::open(&target).unwrap();
                    let (mut errors, mut restarts) = (Vec::new(), 0);
                    for _ in 0..40 {
                        match session.apply(model) {
                            Ok(report) => restarts += report.restarts,
                            Err(err) => errors.push(err),
                        }
                    }
                    session.close_in_background();
                    (errors, restarts)
                })
            })
            .collect();
        let mut errors = Vec::new();
        let mut restarts = 0;
        for worker in workers {
            let (worker_errors, worker_restarts) = worker.join().unwrap();
            errors.extend(worker_errors);
            restarts += worker_restarts;
        }
        eprintln!(
            "concurrent appliers: {restarts} restarts, {} applies lost the race",
            errors.len()
        );
        // The two really raced: the kernel's generation check refused some transactions.
        assert!(restarts + errors.len() > 0, "the appliers never collided");
        errors
    });
    // Losing a race is an error that says so, never a half-applied policy.
    for err in &errors {
        assert!(
            matches!(err, kernel::Error::Unstable { .. }),
            "unexpected error from a concurrent apply: {err}"
        );
    }
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    let model = [&a, &b, &plus]
        .into_iter()
        .find(|m| status.digest.as_deref() == Some(m.digest.as_str()))
        .expect("one of the three policies is in force");
    let plan = kernel::plan(&ns.target(), model).unwrap();
    assert_eq!(plan.differences, vec![], "the policy in force is complete");
    // Whatever a lost race left behind, the next apply deletes.
    kernel::apply(&ns.target(), model).unwrap();
    let (generations, sets, _) = generations_listed(&ns.nft_json().unwrap());
    assert_eq!(generations.len(), 1, "{}", ns.nft_text());
    let set_names: BTreeSet<&str> = sets.iter().map(|(name, _)| name.as_str()).collect();
    assert_eq!(
        set_names.len(),
        sets.len(),
        "one set per model set: {}",
        ns.nft_text()
    );
}

/// Rulesets the kernel refuses although every message is well formed: the
/// failure comes from the kernel, late in the transaction, after the old
/// table was already deleted and the new one half built inside it.
fn rejected_rulesets() -> Vec<(Ruleset, &'static str)> {
    let mut duplicate = other();
    let resolvers = duplicate
        .sets
        .iter_mut()
        .find(|s| s.name == "resolvers_v4_ports")
        .unwrap();
    let first = resolvers.elements[0];
    resolvers.elements.push(first);

    let mut overlapping = other();
    let allow = overlapping
        .sets
        .iter_mut()
        .find(|s| s.name == "allow_v4")
        .unwrap();
    allow.elements = vec![
        Element::Addr(net("10.0.0.0/8")),
        Element::Addr(net("10.1.0.0/16")),
    ];
    vec![(duplicate, "resolvers_v4_ports"), (overlapping, "allow_v4")]
}

#[test]
fn a_rejected_transaction_leaves_the_previous_table_in_force() {
    let ns = Netns::new("atomic");
    let model = typical();
    kernel::apply(&ns.target(), &model).expect("apply");
    let before = ns.nft_json().unwrap();
    for (broken, set) in rejected_rulesets() {
        let err =
            kernel::apply(&ns.target(), &broken).expect_err("the kernel must refuse this ruleset");
        let message = err.to_string();
        assert!(
            message.contains(&format!("the elements of set \"{set}\"")),
            "error must name the set: {message}"
        );
        assert!(err.kernel_errno().is_some(), "{err:?}");
        let status = kernel::status(&ns.target())
            .unwrap()
            .expect("the old table is still there");
        assert_eq!(status.digest.as_deref(), Some(model.digest.as_str()));
        assert_eq!(
            status.generation,
            Some(1),
            "the previous generation stays in force"
        );
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        let after = ns.nft_json().unwrap();
        assert_eq!(
            after, before,
            "the table in force must be exactly the one before"
        );
    }
}

#[test]
fn dry_run_reports_differences_and_changes_nothing() {
    let ns = Netns::new("plan");
    let (a, b) = (typical(), other());
    let plan = kernel::plan(&ns.target(), &a).expect("plan");
    assert_eq!(plan.current, None);
    assert!(plan.differences.is_empty());
    assert_eq!(ns.nft_json(), None, "a dry run must not create the table");

    kernel::apply(&ns.target(), &a).unwrap();
    let before = ns.nft_json().unwrap();
    let same = kernel::plan(&ns.target(), &a).unwrap();
    assert_eq!(
        same.current.unwrap().digest.as_deref(),
        Some(a.digest.as_str())
    );
    assert!(same.differences.is_empty(), "{:?}", same.differences);

    // Elements alone change: the kernel checks the edit in place.
    let edit = kernel::plan(&ns.target(), &typical_plus()).unwrap();
    assert_eq!(
        edit.method,
        kernel::Method::Edit {
            generation: 1,
            added: 1,
            removed: 0
        }
    );
    assert!(
        edit.differences.iter().any(|d| d
            .to_string()
            .starts_with("set \"allow_v4\": 2 element(s) missing")),
        "{:?}",
        edit.differences
    );
    let changed = kernel::plan(&ns.target(), &b).unwrap();
    assert_eq!(changed.method, kernel::Method::Swap { from: 1, to: 2 });
    let text: Vec<String> = changed
        .differences
        .iter()
        .map(ToString::to_string)
        .collect();
    assert!(
        text.iter().any(|d| d.starts_with("policy digest")),
        "{text:?}"
    );
    assert!(
        text.iter().any(|d| d.contains("set \"allow_v4\"")),
        "{text:?}"
    );
    assert_eq!(
        ns.nft_json().unwrap(),
        before,
        "a dry run must not change the table"
    );

    for (broken, set) in rejected_rulesets() {
        let err = kernel::plan(&ns.target(), &broken).expect_err("the kernel check must refuse it");
        assert!(err.to_string().contains(set), "{err}");
        assert_eq!(ns.nft_json().unwrap(), before);
    }
}

fn dns_update(set: &str, elements: Vec<Element>, timeout: Option<Duration>) -> SetUpdate {
    SetUpdate {
        set: set.into(),
        change: SetChange::Add { elements, timeout },
    }
}

fn count(ns: &Netns, set: &str) -> usize {
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    status.sets.iter().find(|s| s.name == set).unwrap().elements
}

#[test]
fn element_updates_add_refresh_expire_and_delete_without_touching_rules() {
    let ns = Netns::new("elements");
    kernel::apply(&ns.target(), &typical()).unwrap();
    let handles = rule_handles(&ns.nft_json().unwrap());

    let v4 = Element::Addr(net("203.0.113.9/32"));
    let v6_port = Element::AddrProtoPort(net("2001:db8::9/128"), Proto::Tcp, 443);
    let start = Instant::now();
    kernel::update_elements(
        &ns.target(),
        &[
            dns_update("dns_v4", vec![v4], Some(Duration::from_secs(2))),
            dns_update("dns_v6_ports", vec![v6_port], Some(Duration::from_secs(2))),
        ],
    )
    .unwrap();
    assert_eq!((count(&ns, "dns_v4"), count(&ns, "dns_v6_ports")), (1, 1));
    let listing = ns.nft_json().unwrap();
    let element = &elements_json(&listing, "dns_v4")[0]["elem"];
    assert_eq!(element["val"], "203.0.113.9");
    assert_eq!(element["timeout"], 2);
    assert_eq!(
        elements_json(&listing, "dns_v6_ports")[0]["elem"]["val"],
        serde_json::json!({"concat": ["2001:db8::9", "tcp", 443]})
    );
    assert_eq!(
        rule_handles(&listing),
        handles,
        "element updates must not touch rules"
    );

    // Refresh dns_v4 with the same timeout after 1.2 s: it must outlive its first expiry.
    std::thread::sleep(Duration::from_millis(1200).saturating_sub(start.elapsed()));
    kernel::update_elements(
        &ns.target(),
        &[dns_update("dns_v4", vec![v4], Some(Duration::from_secs(2)))],
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(2600).saturating_sub(start.elapsed()));
    assert_eq!(
        count(&ns, "dns_v4"),
        1,
        "a refreshed element must not expire at its first deadline"
    );
    assert_eq!(
        count(&ns, "dns_v6_ports"),
        0,
        "an element must expire after its timeout"
    );
    std::thread::sleep(Duration::from_millis(4000).saturating_sub(start.elapsed()));
    assert_eq!(
        count(&ns, "dns_v4"),
        0,
        "the refreshed element expires after its new deadline"
    );

    // Without a timeout an element stays until it is deleted; deleting an absent one is fine.
    let stays = Element::Addr(net("198.51.100.77/32"));
    kernel::update_elements(&ns.target(), &[dns_update("dns_v4", vec![stays], None)]).unwrap();
    assert_eq!(count(&ns, "dns_v4"), 1);
    let delete = SetUpdate {
        set: "dns_v4".into(),
        change: SetChange::Delete {
            elements: vec![stays, v4],
        },
    };
    kernel::update_elements(&ns.target(), &[delete]).unwrap();
    assert_eq!(count(&ns, "dns_v4"), 0);
    assert_eq!(rule_handles(&ns.nft_json().unwrap()), handles);

    // Interval sets get their end elements on updates too.
    let range = SetUpdate {
        set: "allow_v4".into(),
        change: SetChange::Add {
            elements: vec![Element::Addr(net("192.0.2.128/25"))],
            timeout: None,
        },
    };
    kernel::update_elements(&ns.target(), &[range]).unwrap();
    assert_eq!(
        elements_json(&ns.nft_json().unwrap(), "allow_v4"),
        vec![prefix("192.0.2.128", 25), prefix("198.51.100.0", 24)]
    );
}

#[test]
fn bad_element_updates_are_refused_and_change_nothing() {
    let ns = Netns::new("badupd");
    kernel::apply(&ns.target(), &typical()).unwrap();
    let before = ns.nft_json().unwrap();
    let ok = dns_update(
        "dns_v4",
        vec![Element::Addr(net("203.0.113.1/32"))],
        Some(Duration::from_secs(60)),
    );
    let cases = [
        (
            dns_update("no_such_set", vec![], None),
            "has no set \"no_such_set\"",
        ),
        (
            dns_update(
                "allow_v4",
                vec![Element::Addr(net("192.0.2.1/32"))],
                Some(Duration::from_secs(5)),
            ),
            "no timeout flag",
        ),
        (
            dns_update("dns_v4", vec![Element::Addr(net("2001:db8::1/128"))], None),
            "IPv4",
        ),
        (
            dns_update("dns_v4", vec![Element::Addr(net("192.0.2.0/24"))], None),
            "interval",
        ),
    ];
    for (bad, expected) in cases {
        // A valid update in the same call must not be applied either.
        let err =
            kernel::update_elements(&ns.target(), &[ok.clone(), bad]).expect_err("must be refused");
        assert!(err.to_string().contains(expected), "{err}");
        assert_eq!(ns.nft_json().unwrap(), before);
    }
    // Refused by the kernel: an element that overlaps an existing range, in
    // the same transaction as a valid update.
    let overlap = dns_update(
        "allow_v4",
        vec![Element::Addr(net("198.51.100.0/25"))],
        None,
    );
    let err = kernel::update_elements(&ns.target(), &[ok, overlap])
        .expect_err("the kernel must refuse it");
    assert!(
        err.to_string().contains("the elements of set \"allow_v4\""),
        "{err}"
    );
    assert_eq!(ns.nft_json().unwrap(), before);
}

#[test]
fn remove_deletes_the_table_and_absent_is_not_an_error() {
    let ns = Netns::new("remove");
    assert!(!kernel::remove(&ns.target()).unwrap());
    kernel::apply(&ns.target(), &typical()).unwrap();
    assert!(kernel::remove(&ns.target()).unwrap());
    assert_eq!(kernel::status(&ns.target()).unwrap(), None);
    assert_eq!(ns.nft_json(), None);
    assert!(!kernel::remove(&ns.target()).unwrap());
    assert!(matches!(
        kernel::update_elements(&ns.target(), &[dns_update("dns_v4", vec![], None)]),
        Err(kernel::Error::NoTable)
    ));
}

/// 10,000 static elements: 5,000 single IPv4 addresses (any port) and 5,000
/// IPv4 /30s on tcp/443, each in an interval set (rbtree, with an end element
/// each); plus the /30s once more in a concatenated interval set (pipapo,
/// [`with_concatenated_twin`]).
fn large(elements: usize) -> Ruleset {
    let mut rules = Vec::new();
    for i in 0..elements {
        let half = i / 2;
        if i % 2 == 0 {
            // every 4th address, so no two aggregate into one range
            let addr = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(10, 0, 0, 0)) + 4 * half as u32,
            );
            rules.push(allow(&format!("{addr}/32"), &[]));
        } else {
            let addr = std::net::Ipv4Addr::from(
                u32::from(std::net::Ipv4Addr::new(11, 0, 0, 0)) + 8 * half as u32,
            );
            rules.push(allow(&format!("{addr}/30"), &[(Proto::Tcp, 443)]));
        }
    }
    with_concatenated_twin(ruleset::compile(&policy(Mode::Limited, rules), &options()))
}

#[test]
fn ten_thousand_elements_apply_and_read_back() {
    let ns = Netns::new("large");
    let model = large(10_000);
    let elements: usize = model.sets.iter().map(|s| s.elements.len()).sum();
    assert!(elements >= 10_000, "{elements}");
    let report = kernel::apply(&ns.target(), &model).expect("apply 10,000 elements");
    assert_eq!(report.elements, elements);
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    let sets = ["allow_v4", "allow_v4_tcp_443", "concatenated_v4"];
    for set in sets {
        assert_eq!(count(&ns, set), 5_000, "{set}");
    }
    assert_eq!(status.digest.as_deref(), Some(model.digest.as_str()));
    let listing = ns.nft_json().unwrap();
    for set in sets {
        assert_eq!(elements_json(&listing, set).len(), 5_000, "{set}");
    }
    // and once more, replacing 10,000 elements with 10,000
    kernel::apply(&ns.target(), &model).expect("re-apply");
}

fn netns_inode(path: &str) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .ino()
}

#[test]
fn apply_by_pid_and_the_callers_namespace_never_changes() {
    let ns = Netns::new("pid");
    let own = (
        netns_inode("/proc/self/ns/net"),
        netns_inode("/proc/thread-self/ns/net"),
    );
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    // `ip netns exec` enters the namespace, then execs `sleep` in the same process.
    let sleeper = Kill(
        Command::new("ip")
            .args(["netns", "exec", &ns.name, "sleep", "30"])
            .spawn()
            .unwrap(),
    );
    let pid = sleeper.0.id();
    let target_inode = netns_inode(&format!("/run/netns/{}", ns.name));
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .map(|m| m.ino())
        .ok()
        != Some(target_inode)
    {
        assert!(
            Instant::now() < deadline,
            "`ip netns exec` did not enter the namespace"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    let model = typical();
    kernel::apply(&Target::Pid(pid), &model).expect("apply by pid");
    let path = Target::Path(format!("/proc/{pid}/ns/net").into());
    assert_eq!(
        kernel::status(&path).unwrap().unwrap().digest.as_deref(),
        Some(model.digest.as_str())
    );
    assert_eq!(
        kernel::status(&ns.target())
            .unwrap()
            .unwrap()
            .digest
            .as_deref(),
        Some(model.digest.as_str())
    );
    assert!(kernel::remove(&Target::Pid(pid)).unwrap());
    assert_eq!(ns.nft_json(), None);
    assert_eq!(
        (
            netns_inode("/proc/self/ns/net"),
            netns_inode("/proc/thread-self/ns/net")
        ),
        own
    );
}

#[test]
fn a_missing_namespace_is_a_clear_error() {
    require_root();
    let err = kernel::apply(&Target::Name("nlk-does-not-exist".into()), &typical()).unwrap_err();
    assert!(err.to_string().contains("ip netns list"), "{err}");
    let err = kernel::status(&Target::Pid(u32::MAX)).unwrap_err();
    assert!(err.to_string().contains("does not exist"), "{err}");
}

#[test]
fn unrestricted_mode_has_only_the_blocklist() {
    let ns = Netns::new("open");
    let model = ruleset::compile(&policy(Mode::Unrestricted, vec![]), &options());
    kernel::apply(&ns.target(), &model).unwrap();
    let status = kernel::status(&ns.target()).unwrap().unwrap();
    let names: Vec<&str> = status.sets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["blocklist_v4", "blocklist_v6"]);
    let output = status.chains.iter().find(|c| c.name == "output").unwrap();
    assert_eq!(output.policy.as_deref(), Some("accept"));
    assert_eq!(output.hook.as_deref(), Some("output"));
}

fn netleash(args: &[&str]) -> Output {
    run(env!("CARGO_BIN_EXE_netleash"), args)
}

/// `netleash apply` and `apply --dry-run` say when a policy change is an
/// edit in place, and what it changes.
#[test]
fn cli_apply_and_dry_run_name_an_edit_in_place() {
    let ns = Netns::new("cliedit");
    let dir = tempfile::tempdir().unwrap();
    let policy = |name: &str, hosts: &str| {
        let path = dir.path().join(name);
        let text = format!(r#"{{"type": "limited", "allowed_hosts": [{hosts}]}}"#);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let first = policy("first.json", r#""198.51.100.10", "203.0.113.0/28""#);
    let second = policy(
        "second.json",
        r#""198.51.100.10", "198.51.100.12", "203.0.113.0/28""#,
    );
    let apply = |policy: &str, dry_run: bool| {
        let mut args = vec![
            "apply",
            policy,
            "--netns",
            &ns.name,
            "--resolver",
            "192.0.2.53",
        ];
        if dry_run {
            args.push("--dry-run");
        }
        let out = netleash(&args);
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(apply(&first, false).contains("created the table"));
    let plan = apply(&second, true);
    assert!(
        plan.contains(
            "apply would edit generation 1 in place: 1 element(s) added, 0 removed, one \
             transaction, rules and their counters kept"
        ),
        "{plan}"
    );
    let applied = apply(&second, false);
    assert!(
        applied.contains(
            "edited generation 1 in place (1 element(s) added, 0 removed; rules and counters kept)"
        ),
        "{applied}"
    );
    let again = apply(&second, true);
    assert!(
        again.contains(
            "is already in force: apply would put an identical one in force (in place: rules \
             and their counters are kept)"
        ),
        "{again}"
    );
}

#[test]
fn cli_status_remove_and_a_refused_apply() {
    let ns = Netns::new("cli");
    let model = typical();
    kernel::apply(&ns.target(), &model).unwrap();

    let out = netleash(&["status", "--netns", &ns.name, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["present"], true);
    assert_eq!(json["digest"], model.digest.as_str());
    let allow = json["sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "allow_v4_ports")
        .unwrap();
    assert_eq!(allow["elements"], 1);
    let denied: Vec<&str> = json["counters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["verdict"] == "denied")
        .map(|c| c["rule"].as_str().unwrap())
        .collect();
    assert_eq!(
        denied,
        ["blocklist-v4", "blocklist-v6", "dns-other", "default-deny"]
    );
    assert_eq!(
        json["counters"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["verdict"] == "allowed")
            .count(),
        10,
        "{json:#}"
    );

    let out = netleash(&["status", "--netns", &format!("/run/netns/{}", ns.name)]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains(&format!("policy: {}", model.digest)),
        "{text}"
    );
    assert!(text.contains("default-deny"), "{text}");
    assert!(
        text.contains(
            "allowed (rule counters; packets that open a connection):\n  allow-static-v4 "
        ),
        "{text}"
    );

    // A policy that does not load leaves the table in force and exits 2.
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, "{ not json").unwrap();
    let before = ns.nft_json().unwrap();
    for extra in [&[][..], &["--dry-run"][..]] {
        let mut args = vec!["apply", bad.to_str().unwrap(), "--netns", &ns.name];
        args.extend_from_slice(extra);
        let out = netleash(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("error: "));
        assert_eq!(ns.nft_json().unwrap(), before);
    }

    // A namespace that does not exist: exit 3 and a hint.
    let out = netleash(&["status", "--netns", "nlk-no-such-namespace"]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ip netns list"));

    let out = netleash(&["remove", "--netns", &ns.name]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("removed table inet netleash"));
    assert_eq!(ns.nft_json(), None);
    let out = netleash(&["remove", "--netns", &ns.name]);
    assert!(
        out.status.success(),
        "removing an absent table is not an error"
    );
    let out = netleash(&["status", "--netns", &ns.name, "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["present"], false);
}

#[test]
fn cli_apply_prints_each_policy_warning_once() {
    let ns = Netns::new("warn");
    let dir = tempfile::tempdir().unwrap();
    let policy = dir.path().join("policy.json");
    std::fs::write(
        &policy,
        r#"{"type": "limited", "allowed_hosts": ["203.0.113.7"], "allow_mcp_servers": true}"#,
    )
    .unwrap();
    let out = netleash(&["apply", policy.to_str().unwrap(), "--netns", &ns.name]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(
        stderr.matches("warning: ").count(),
        1,
        "one warning, printed once: {stderr}"
    );
    assert!(
        stderr.contains("allow_mcp_servers: is true but no MCP server was given"),
        "{stderr}"
    );
}

#[test]
fn a_session_works_from_any_thread_without_entering_the_namespace() {
    let ns = Netns::new("session");
    let own = netns_inode("/proc/thread-self/ns/net");
    let mut session = kernel::Session::open(&ns.target()).unwrap();
    let (a, b) = (typical(), other());
    assert_eq!(session.apply(&a).unwrap().digest, a.digest);
    assert_eq!(netns_inode("/proc/thread-self/ns/net"), own);
    // The socket stays in the sandbox's namespace when the session moves threads.
    let b_in_worker = b.clone();
    let worker = std::thread::spawn(move || {
        session.apply(&b_in_worker).unwrap();
        session
            .update_elements(&[dns_update(
                "dns_v4",
                vec![Element::Addr(net("203.0.113.5/32"))],
                None,
            )])
            .unwrap();
        let status = session.status().unwrap().unwrap();
        session.close_in_background();
        status
    });
    let status = worker.join().unwrap();
    assert_eq!(status.digest.as_deref(), Some(b.digest.as_str()));
    assert_eq!(
        status
            .sets
            .iter()
            .find(|s| s.name == "dns_v4")
            .unwrap()
            .elements,
        1
    );
    assert_eq!(elements_json(&ns.nft_json().unwrap(), "dns_v4").len(), 1);
}

/// Local UDP and TCP ports listening in a namespace, as `ss` inside it reports them.
fn listening_ports(ns: &Netns, proto_flag: &str) -> String {
    let out = run("ip", &["netns", "exec", &ns.name, "ss", "-Hn", proto_flag]);
    assert!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn sockets_opened_in_a_namespace_live_there() {
    let ns = Netns::new("sockets");
    let own = netns_inode("/proc/thread-self/ns/net");
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().unwrap();
    // Both ways into a namespace: a thread of its own, and a visit by this one.
    let udp = netleash::netns::run_in(&ns.target(), || std::net::UdpSocket::bind(loopback))
        .unwrap()
        .unwrap();
    let tcp = netleash::netns::visit(&ns.target(), || std::net::TcpListener::bind(loopback))
        .unwrap()
        .unwrap();
    let (udp_port, tcp_port) = (
        udp.local_addr().unwrap().port(),
        tcp.local_addr().unwrap().port(),
    );
    // The namespace's own view lists them; nothing is sent.
    assert!(listening_ports(&ns, "-ul").contains(&format!("127.0.0.1:{udp_port}")));
    assert!(listening_ports(&ns, "-tl").contains(&format!("127.0.0.1:{tcp_port}")));
    assert_eq!(netns_inode("/proc/thread-self/ns/net"), own);
    // The port is taken inside that namespace: the proxy's listeners on it
    // fail there, with the namespace named.
    let err = netleash::enforcer::bind_proxy_sockets(&ns.target(), tcp_port).unwrap_err();
    assert!(
        matches!(
            err,
            netleash::enforcer::Error::ProxySocket {
                source: netleash::netns::Error::Socket { .. },
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&ns.name), "{err}");
}

/// The DNS proxy's base chains (`dns-redirect` of type nat, the raw-priority
/// `dns-zone-*`) are kept like `output`: each holds one jump into a
/// generation chain `NAME-body.gN` with its rules, and a re-apply swaps them
/// with the rest of the generation instead of replacing the table.
#[test]
fn the_dns_proxy_chains_swap_with_their_generation() {
    let ns = Netns::new("proxyswap");
    let proxy = crate::fixtures::proxy_options();
    let a = ruleset::compile(
        &policy(Mode::Limited, vec![allow("198.51.100.0/24", &[])]),
        &proxy,
    );
    let b = ruleset::compile(
        &policy(
            Mode::Limited,
            vec![
                allow("192.0.2.0/25", &[(Proto::Tcp, 22)]),
                allow("192.0.2.128/25", &[]),
            ],
        ),
        &proxy,
    );
    let first = kernel::apply(&ns.target(), &a).expect("apply");
    assert_eq!(first.method, kernel::Method::Create);
    for (generation, model) in [(2u32, &b), (3, &a), (4, &b)] {
        let report = kernel::apply(&ns.target(), model).expect("re-apply");
        assert_eq!(
            report.method,
            kernel::Method::Swap {
                from: generation - 1,
                to: generation
            },
            "{}",
            ns.nft_text()
        );
        let (generations, _, persistent) = generations_listed(&ns.nft_json().unwrap());
        assert_eq!(
            generations,
            BTreeSet::from([generation]),
            "{}",
            ns.nft_text()
        );
        for base in ["dns-redirect", "dns-zone-output", "dns-zone-replies"] {
            assert!(
                persistent.contains(&format!("chain {base}")),
                "{persistent:?}"
            );
        }
        let text = ns.nft_text();
        assert!(
            text.contains(&format!("jump dns-redirect-body.g{generation}")),
            "{text}"
        );
        assert!(text.contains("type nat hook output priority"), "{text}");
        assert!(text.contains("redirect to :1053"), "{text}");
        assert!(text.contains("ct zone set"), "{text}");
        let plan = kernel::plan(&ns.target(), model).expect("plan");
        assert!(plan.differences.is_empty(), "{:?}", plan.differences);
        let status = kernel::status(&ns.target()).unwrap().unwrap();
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
    }
}

#[test]
fn the_element_writer_follows_foreign_commits_and_fails_cleanly_without_its_set() {
    let ns = Netns::new("writer");
    kernel::apply(&ns.target(), &typical()).unwrap();
    let mut writer = kernel::ElementWriter::open(&ns.target()).unwrap();
    let mut learn = |element: Element| {
        writer.update(&[dns_update(
            "dns_v4",
            vec![element],
            Some(Duration::from_secs(600)),
        )])
    };
    let first = Element::Addr(net("203.0.113.21/32"));
    learn(first).unwrap();
    assert_eq!(count(&ns, "dns_v4"), 1);

    // Another program commits (a new policy, with the DNS sets kept): the
    // writer's memory of the sets is stale, the kernel refuses its next
    // transaction for it, and the writer reads again and succeeds.
    kernel::apply(&ns.target(), &other()).unwrap();
    let second = Element::Addr(net("203.0.113.22/32"));
    learn(second).unwrap();
    let listing = ns.nft_json().unwrap();
    let held: BTreeSet<String> = elements_json(&listing, "dns_v4")
        .iter()
        .map(|e| e["elem"]["val"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        held,
        BTreeSet::from(["203.0.113.21".to_string(), "203.0.113.22".to_string()])
    );

    // A policy without DNS sets: the write is an error naming the set, and
    // nothing is written.
    let open = ruleset::compile(&policy(Mode::Unrestricted, vec![]), &options());
    kernel::apply(&ns.target(), &open).unwrap();
    let error = learn(second).unwrap_err();
    assert!(error.to_string().contains("dns_v4"), "{error}");

    // No table at all: an error too, and a later table is written into.
    let deleted = ns.nft(&["delete", "table", "inet", "netleash"]);
    assert!(deleted.status.success());
    let error = learn(first).unwrap_err();
    assert!(matches!(error, kernel::Error::NoTable), "{error}");
    kernel::apply(&ns.target(), &typical()).unwrap();
    learn(first).unwrap();
    assert_eq!(count(&ns, "dns_v4"), 1);
}
