//! End-to-end enforcement: policies applied with the `netleash` binary, as a
//! user would, to a real sandbox namespace, judged by real connections.

use std::path::Path;

use netleash::testbed::{self, TCP_PORTS, Testbed, UDP_ECHO_PORT};

use crate::support::{
    self, addr, apply, apply_ok, assert_reachable, assert_rejected, describe, netleash,
    netleash_table, write_policy,
};

const LIMITED: &str = r#"{"type": "limited",
  "allowed_hosts": ["https://198.51.100.10", "[2001:db8:100::10]:443", "203.0.113.0/28"]}"#;
/// Allows the metadata services in every way the grammar can say it.
const ALLOWS_METADATA: &str = r#"{"type": "limited", "allowed_hosts": [
    "169.254.169.254", "169.254.0.0/16", "http://169.254.169.254", "fd00:ec2::254",
    "[fd00:ec2::254]:80", "198.51.100.10"]}"#;
const UNRESTRICTED: &str = r#"{"type": "unrestricted"}"#;
/// The re-apply pair: both allow 198.51.100.10:443 and both block
/// 198.51.100.11, through different sets (an any-port address in one, a port
/// entry in the other), so each re-apply really changes the table.
const REAPPLY_FIRST: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "203.0.113.0/28", "2001:db8:100::10"]}"#;
const REAPPLY_SECOND: &str =
    r#"{"type": "limited", "allowed_hosts": ["https://198.51.100.10", "[2001:db8:100::11]:443"]}"#;
/// The edit pair: the same rules, different elements. Both allow
/// 198.51.100.10, 203.0.113.0/28 and 2001:db8:100::10 on any port; the
/// first also 198.51.100.9 (next to 198.51.100.10), the second 198.51.100.12
/// and 2001:db8:100::12 (next to the rejected 198.51.100.11 and
/// 2001:db8:100::11). Each re-apply edits `allow_v4` and `allow_v6` in place
/// around the probed addresses.
const EDIT_FIRST: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "198.51.100.9", "203.0.113.0/28", "2001:db8:100::10"]}"#;
const EDIT_SECOND: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "198.51.100.12", "203.0.113.0/28", "2001:db8:100::10", "2001:db8:100::12"]}"#;
/// Policies `apply` must refuse, as (file name, text).
const INVALID: [(&str, &str); 3] = [
    (
        "not-json.json",
        r#"{"type": "limited", "allowed_hosts": ["https://198.51.100.11""#,
    ),
    ("unknown-type.json", r#"{"type": "wide_open"}"#),
    (
        "bad-host.json",
        r#"{"type": "limited", "allowed_hosts": ["https://198.51.100.11:99999"]}"#,
    ),
];

/// The policies of these tests mean what the tests assume, checked with the
/// loader alone (no root, no kernel), so an enforcement failure is never a
/// fixture's fault.
#[test]
fn the_policies_used_here_load_as_assumed() {
    use netleash::policy::{self, Expansions, Mode};
    let load = |text| policy::load(text, "test", &Expansions::default());
    for text in [
        LIMITED,
        ALLOWS_METADATA,
        REAPPLY_FIRST,
        REAPPLY_SECOND,
        EDIT_FIRST,
        EDIT_SECOND,
    ] {
        let loaded = load(text)
            .unwrap_or_else(|err| panic!("{text}: {}", netleash::cli::render_error(&err)));
        assert_eq!(loaded.mode, Mode::Limited, "{text}");
    }
    assert_eq!(
        load(UNRESTRICTED).expect("unrestricted loads").mode,
        Mode::Unrestricted
    );
    for (name, text) in INVALID {
        assert!(
            load(text).is_err(),
            "{name} loads, but the tests need it refused"
        );
    }
}

#[test]
fn an_allowed_host_is_reachable_and_everything_else_is_rejected_at_once() {
    let (bed, _dir) = support::enforced("limited.json", LIMITED);

    assert_reachable(&bed, "198.51.100.10", 443);
    assert_reachable(&bed, "2001:db8:100::10", 443);
    // A CIDR entry with no port allows every port of every address in it.
    for port in TCP_PORTS {
        assert_reachable(&bed, "203.0.113.5", port);
    }
    support::assert_udp_echoed(&bed, "203.0.113.5", UDP_ECHO_PORT);

    for ip in ["198.51.100.11", "203.0.113.20", "2001:db8:100::11"] {
        for port in TCP_PORTS {
            assert_rejected(&bed, ip, port);
        }
        support::assert_udp_rejected(&bed, ip, UDP_ECHO_PORT);
    }
}

#[test]
fn ports_are_enforced() {
    let (bed, _dir) = support::enforced("limited.json", LIMITED);

    // `https://198.51.100.10` means port 443 and nothing else.
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "198.51.100.10", 80);
    assert_rejected(&bed, "198.51.100.10", 8443);
    // `[2001:db8:100::10]:443` likewise.
    assert_reachable(&bed, "2001:db8:100::10", 443);
    assert_rejected(&bed, "2001:db8:100::10", 80);
    assert_rejected(&bed, "2001:db8:100::10", 8443);
}

/// Ranges restricted to ports (built in code: the policy grammar takes a
/// port on a single address only, and a range from a platform's own rules
/// is the same model), on two protocols and three ports, each port's
/// addresses in a set of their own: every address of a range is reachable
/// on its port and protocol, and rejected at once on the others.
#[test]
fn ports_of_ranges_are_enforced_per_protocol_and_port() {
    use netleash::policy::{CompileOptions, Dialect, HostRule, Mode, Policy, Ports, Proto};
    use netleash::policy::{Source, Target};
    let bed = support::testbed();
    let entries = [
        (
            "198.51.100.0/28",
            Ports::only([(Proto::Tcp, 80), (Proto::Udp, 443)]),
        ),
        ("203.0.113.0/27", Ports::only([(Proto::Tcp, 8443)])),
        ("2001:db8:100::/120", Ports::only([(Proto::Tcp, 443)])),
    ];
    let policy = Policy {
        mode: Mode::Limited,
        dialect: Dialect::Limited,
        rules: entries
            .into_iter()
            .map(|(net, ports)| HostRule {
                target: Target::Net(net.parse().expect("a net")),
                ports,
                sources: [Source::AllowedHosts].into(),
                entry: net.into(),
            })
            .collect(),
        blocklist: vec![],
        warnings: vec![],
    };
    let model = netleash::ruleset::compile(&policy, &CompileOptions::default());
    let port_sets: Vec<&str> = model
        .sets
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| name.starts_with("allow_"))
        .collect();
    assert_eq!(
        port_sets,
        [
            "allow_v4_tcp_80",
            "allow_v4_tcp_8443",
            "allow_v4_udp_443",
            "allow_v6_tcp_443"
        ]
    );
    let target = netleash::netns::Target::Name(bed.sandbox().to_string());
    netleash::kernel::apply(&target, &model)
        .unwrap_or_else(|err| panic!("apply: {}", netleash::cli::render_error(&err)));

    // 198.51.100.0/28: tcp/80 and udp/443 only.
    for ip in ["198.51.100.10", "198.51.100.11"] {
        assert_reachable(&bed, ip, 80);
        assert_rejected(&bed, ip, 443);
        assert_rejected(&bed, ip, 8443);
        support::assert_udp_echoed(&bed, ip, UDP_ECHO_PORT);
    }
    // 203.0.113.0/27: tcp/8443 only.
    for ip in ["203.0.113.5", "203.0.113.20"] {
        assert_reachable(&bed, ip, 8443);
        assert_rejected(&bed, ip, 80);
        assert_rejected(&bed, ip, 443);
        support::assert_udp_rejected(&bed, ip, UDP_ECHO_PORT);
    }
    // 2001:db8:100::/120: tcp/443 only, not udp/443.
    for ip in ["2001:db8:100::10", "2001:db8:100::11"] {
        assert_reachable(&bed, ip, 443);
        assert_rejected(&bed, ip, 80);
        assert_rejected(&bed, ip, 8443);
        support::assert_udp_rejected(&bed, ip, UDP_ECHO_PORT);
    }
}

#[test]
fn the_blocklist_wins_over_an_allow() {
    let (bed, _dir) = support::enforced("metadata.json", ALLOWS_METADATA);

    // The policy is in force: its one ordinary entry is reachable...
    assert_reachable(&bed, "198.51.100.10", 80);
    // ...but the metadata services are not, whatever the policy says.
    for ip in [testbed::METADATA_V4, testbed::METADATA_V6] {
        for port in TCP_PORTS {
            assert_rejected(&bed, &ip.to_string(), port);
        }
        support::assert_udp_rejected(&bed, &ip.to_string(), UDP_ECHO_PORT);
    }
}

#[test]
fn unrestricted_blocks_only_the_blocklist() {
    let (bed, _dir) = support::enforced("open.json", UNRESTRICTED);

    for ip in testbed::TEST_ADDRESSES {
        for port in TCP_PORTS {
            assert_reachable(&bed, &ip.to_string(), port);
        }
        support::assert_udp_echoed(&bed, &ip.to_string(), UDP_ECHO_PORT);
    }
    for ip in [testbed::METADATA_V4, testbed::METADATA_V6] {
        for port in TCP_PORTS {
            assert_rejected(&bed, &ip.to_string(), port);
        }
    }
    assert!(
        support::netleash_table(bed.sandbox()).is_some(),
        "the table is in place"
    );
}

/// While 500 re-applies alternate between two policies that agree on the
/// probed destinations, a connection loop in the sandbox must never see the
/// other verdict: not an open moment (no table), not a closed one (half a table).
/// The two policies differ in their rules, so each re-apply swaps generations
/// (see [`reapply_in_place_is_atomic`] for edits in place).
#[test]
fn reapply_is_atomic() {
    const REAPPLIES: usize = 500;
    let bed = support::testbed();
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_policy(dir.path(), "first.json", REAPPLY_FIRST);
    let second = write_policy(dir.path(), "second.json", REAPPLY_SECOND);
    apply_ok(&bed, &first);

    let expectations = [
        (addr("198.51.100.10"), true),
        (addr("198.51.100.11"), false),
    ];
    let (probes, wrong) = support::probe_while(&bed, &expectations, 443, || {
        reapply_alternately(&bed, [&first, &second], REAPPLIES, "swapped generation");
    });
    assert_no_wrong_verdict("reapply_is_atomic", probes, &wrong, REAPPLIES);
}

/// [`reapply_is_atomic`] with two policies that differ in elements alone:
/// each of the 500 one-shot re-applies edits the generation in force in
/// place (one transaction that changes `allow_v4` and `allow_v6` and the
/// entry rules' digest), and the connection loop must never see another
/// verdict for the addresses both policies allow, or deny.
#[test]
fn reapply_in_place_is_atomic() {
    const REAPPLIES: usize = 500;
    let bed = support::testbed();
    let dir = tempfile::tempdir().expect("tempdir");
    let first = write_policy(dir.path(), "first.json", EDIT_FIRST);
    let second = write_policy(dir.path(), "second.json", EDIT_SECOND);
    apply_ok(&bed, &first);
    let expectations = [
        (addr("198.51.100.10"), true),
        (addr("203.0.113.5"), true),
        (addr("2001:db8:100::10"), true),
        (addr("198.51.100.11"), false),
        (addr("203.0.113.20"), false),
        (addr("2001:db8:100::11"), false),
    ];
    let (probes, wrong) = support::probe_while(&bed, &expectations, 443, || {
        reapply_alternately(
            &bed,
            [&first, &second],
            REAPPLIES,
            "edited generation 1 in place",
        );
    });
    assert_no_wrong_verdict("reapply_in_place_is_atomic", probes, &wrong, REAPPLIES);
    let table = netleash_table(bed.sandbox()).expect("the table is in place");
    assert!(
        table.contains("set allow_v4.g1 ") && table.contains("jump egress.g1 "),
        "generation 1 stayed in force: {table}"
    );
}

/// `reapplies` re-applies with `netleash apply`, alternating between the
/// two policies (the second first: the first is in force), each of which
/// must succeed and say `how` it was applied.
fn reapply_alternately(bed: &Testbed, policies: [&Path; 2], reapplies: usize, how: &str) {
    for round in 0..reapplies {
        let policy = policies[(round + 1) % 2];
        let output = apply(bed, policy);
        assert!(
            output.status.success(),
            "re-apply {round} failed: {}",
            describe(&output)
        );
        assert!(
            String::from_utf8_lossy(&output.stdout).contains(how),
            "re-apply {round} did not say {how:?}: {}",
            describe(&output)
        );
    }
}

/// What `support::probe_while` found during `reapplies` re-applies of test
/// `test`: no wrong verdict, in at least as many probes as re-applies.
fn assert_no_wrong_verdict(test: &str, probes: u64, wrong: &[String], reapplies: usize) {
    eprintln!(
        "{test}: {probes} probes, {} wrong verdicts during {reapplies} re-applies",
        wrong.len()
    );
    assert!(
        wrong.is_empty(),
        "{} wrong verdicts in {probes} probes during re-apply (first ones): {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    // The loop must have overlapped the re-applies for the test to mean anything.
    assert!(
        probes >= reapplies as u64,
        "only {probes} probes during {reapplies} re-applies"
    );
}

/// The session re-apply pair: large static sets (200 single addresses of
/// each family on any port, 200 ranges on tcp/443, never contacted) around
/// the addresses probed. Variant 1 replaces one address of each family and
/// adds the range 203.0.113.20/30 on tcp/443, so a session changes
/// `allow_v4`, `allow_v6` and `allow_v4_tcp_443` (an address interval set,
/// as every port's set of ranges) in place at every re-apply, both ways. Both allow 198.51.100.10 and
/// 2001:db8:100::10 on any port and 203.0.113.5 on tcp/443; neither allows
/// 198.51.100.11.
fn in_place_pair(variant: usize) -> netleash::ruleset::Ruleset {
    use netleash::policy::{BlockEntry, CompileOptions, Dialect, HostRule, Mode, Policy, Ports};
    use netleash::policy::{Proto, Source, Target};
    let https = || Ports::only([(Proto::Tcp, 443)]);
    let mut entries = vec![
        ("198.51.100.10/32".to_string(), Ports::Any),
        ("2001:db8:100::10/128".to_string(), Ports::Any),
        ("203.0.113.5/32".to_string(), https()),
    ];
    for i in 0..200u32 {
        let moved = variant == 1 && i == 0;
        let (v4, v6) = if moved {
            (78, "fd77:1")
        } else {
            (77, "fd77:0")
        };
        // Every other address, so that the compiler cannot merge them.
        entries.push((
            format!("10.{v4}.{}.{}/32", i / 100, i % 100 * 2),
            Ports::Any,
        ));
        entries.push((format!("{v6}::{:x}/128", i * 2), Ports::Any));
        entries.push((format!("10.88.{i}.0/30"), https()));
    }
    if variant == 1 {
        entries.push(("203.0.113.20/30".to_string(), https()));
    }
    let rules = entries
        .into_iter()
        .map(|(net, ports)| HostRule {
            target: Target::Net(net.parse().expect("a net")),
            ports,
            sources: [Source::AllowedHosts].into(),
            entry: net,
        })
        .collect();
    let policy = Policy {
        mode: Mode::Limited,
        dialect: Dialect::Limited,
        rules,
        blocklist: vec![BlockEntry {
            net: "169.254.0.0/16".parse().expect("a net"),
            reason: "link-local".into(),
        }],
        warnings: vec![],
    };
    netleash::ruleset::compile(&policy, &CompileOptions::default())
}

/// A long-lived session (the agent's path) that re-applies policies whose
/// sets differ in a few elements edits the generation in force in place
/// (one transaction changes those sets): an element both policies hold (in a
/// set being changed) must match throughout, and an address neither allows
/// must be rejected throughout.
#[test]
fn a_session_reapply_that_changes_sets_in_place_is_atomic() {
    const REAPPLIES: usize = 1000;
    let bed = support::testbed();
    let models = [in_place_pair(0), in_place_pair(1)];
    let target = netleash::netns::Target::Name(bed.sandbox().to_string());
    let mut session = netleash::kernel::Session::open(&target).expect("open a session");
    session.apply(&models[0]).expect("first apply");
    let expectations = [
        (addr("198.51.100.10"), true),
        (addr("2001:db8:100::10"), true),
        (addr("203.0.113.5"), true),
        (addr("198.51.100.11"), false),
    ];
    let (probes, wrong) = support::probe_while(&bed, &expectations, 443, || {
        for round in 0..REAPPLIES {
            let report = session
                .apply(&models[(round + 1) % 2])
                .unwrap_or_else(|err| {
                    panic!("re-apply {round}: {}", netleash::cli::render_error(&err))
                });
            assert!(
                matches!(
                    report.method,
                    netleash::kernel::Method::Edit { generation: 1, .. }
                ),
                "re-apply {round}: {:?}",
                report.method
            );
        }
    });
    assert_no_wrong_verdict(
        "a_session_reapply_that_changes_sets_in_place_is_atomic",
        probes,
        &wrong,
        REAPPLIES,
    );
    // The sets were changed in place all along: generation 1's, still in
    // force, with all their elements.
    let table = netleash_table(bed.sandbox()).expect("the table is in place");
    for (set, elements) in [
        ("allow_v4", 201),
        ("allow_v6", 201),
        ("allow_v4_tcp_443", 200),
    ] {
        assert_eq!(
            models[0].set(set).expect("the set").elements.len(),
            elements
        );
        assert!(
            table.contains(&format!("set {set}.g1 ")),
            "{set} was created again: {table}"
        );
    }
    session.close_in_background();
}

#[test]
fn an_invalid_policy_keeps_the_old_rules_and_remove_restores_open_traffic() {
    let (bed, dir) = support::enforced("limited.json", LIMITED);
    let table_before = netleash_table(bed.sandbox()).expect("the table is in place after apply");
    let status = netleash(&["status", "--netns", bed.sandbox()]);
    assert!(status.status.success(), "status: {}", describe(&status));

    for (name, json) in INVALID {
        let output = apply(&bed, &write_policy(dir.path(), name, json));
        assert_eq!(
            output.status.code(),
            Some(2),
            "apply {name} must fail as invalid input: {}",
            describe(&output)
        );
        assert!(
            !output.stderr.is_empty(),
            "apply {name} must say what is wrong"
        );
        assert_limited_still_enforced(&bed, &table_before, &format!("after apply {name}"));
    }
    let missing = apply(&bed, &dir.path().join("no-such-file.json"));
    assert_eq!(missing.status.code(), Some(2), "{}", describe(&missing));
    assert_eq!(netleash_table(bed.sandbox()).as_ref(), Some(&table_before));

    let removed = netleash(&["remove", "--netns", bed.sandbox()]);
    assert!(removed.status.success(), "remove: {}", describe(&removed));
    assert_eq!(
        netleash_table(bed.sandbox()),
        None,
        "the table is gone after remove"
    );
    for ip in testbed::served_addresses() {
        assert_reachable(&bed, &ip.to_string(), 443);
    }
}

/// The table is protected by the kernel, not by netleash: changing it needs
/// CAP_NET_ADMIN in the namespace's user namespace, and a root process of the
/// sandbox that lacks it gets EPERM from nfnetlink.
#[test]
fn a_root_process_without_cap_net_admin_cannot_change_the_table() {
    let (bed, _dir) = support::enforced("limited.json", LIMITED);
    let table_before = netleash_table(bed.sandbox()).expect("the table is in place after apply");

    let capsh = |script: &str| {
        support::exec_in(
            bed.sandbox(),
            &["capsh", "--drop=cap_net_admin", "--", "-c", script],
            None,
        )
    };
    // The control: capsh itself works here, so a failure below is nftables refusing.
    let control = capsh("true");
    assert!(
        control.status.success(),
        "capsh (libcap2-bin; apt-get install libcap2-bin) must run: {}",
        describe(&control)
    );
    for script in [
        "nft delete table inet netleash",
        "nft flush ruleset",
        "nft add rule inet netleash output accept",
    ] {
        let attempt = capsh(script);
        assert!(
            !attempt.status.success(),
            "`{script}` without CAP_NET_ADMIN succeeded: {}",
            describe(&attempt)
        );
        let stderr = String::from_utf8_lossy(&attempt.stderr);
        assert!(
            stderr.contains("Operation not permitted"),
            "`{script}`: {}",
            describe(&attempt)
        );
    }
    assert_limited_still_enforced(
        &bed,
        &table_before,
        "after the attempts without CAP_NET_ADMIN",
    );
}

/// The table is still `table_before` (counters aside) and [`LIMITED`] still
/// decides: its allowed host connects and another address is rejected.
fn assert_limited_still_enforced(bed: &Testbed, table_before: &str, when: &str) {
    assert_eq!(
        netleash_table(bed.sandbox()).as_deref(),
        Some(table_before),
        "the table changed {when}"
    );
    assert_reachable(bed, "198.51.100.10", 443);
    assert_rejected(bed, "198.51.100.11", 443);
}
