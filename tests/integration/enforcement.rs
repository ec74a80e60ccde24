//! End-to-end enforcement: policies applied with the `netleash` binary, as a
//! user would, to a real sandbox namespace, judged by real connections.

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
    for text in [LIMITED, ALLOWS_METADATA, REAPPLY_FIRST, REAPPLY_SECOND] {
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
        for round in 0..REAPPLIES {
            let policy = if round % 2 == 0 { &second } else { &first };
            let output = apply(&bed, policy);
            assert!(
                output.status.success(),
                "re-apply {round} failed: {}",
                describe(&output)
            );
        }
    });
    eprintln!(
        "reapply_is_atomic: {probes} probes, {} wrong verdicts during {REAPPLIES} re-applies",
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
        probes >= REAPPLIES as u64,
        "only {probes} probes during {REAPPLIES} re-applies"
    );
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
