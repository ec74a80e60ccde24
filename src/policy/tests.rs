//! Tests of `load`: merging, sorting, expansions and warnings.

use super::hosts::tests::only as ports;
use super::*;
use std::collections::BTreeSet;

fn limited(hosts: &[&str]) -> String {
    serde_json::json!({"config": {"type": "cloud", "networking": {"type": "limited", "allowed_hosts": hosts}}})
        .to_string()
}

fn load_ok(text: &str, expansions: &Expansions) -> Policy {
    load(text, "p.json", expansions).unwrap_or_else(|e| panic!("{e}"))
}

fn rule<'a>(policy: &'a Policy, target: &str) -> &'a HostRule {
    policy
        .rules
        .iter()
        .find(|r| r.target.to_string() == target)
        .unwrap_or_else(|| panic!("no rule for {target}"))
}

#[test]
fn unrestricted_has_no_rules_but_the_blocklist() {
    let policy = load_ok(r#"{"type": "unrestricted"}"#, &Expansions::default());
    assert_eq!(policy.mode, Mode::Unrestricted);
    assert_eq!(policy.dialect, Dialect::Unrestricted);
    assert!(policy.rules.is_empty());
    assert_eq!(policy.blocklist, expansions::safety_blocklist().unwrap());
    assert!(policy.warnings.is_empty());

    let no_networking = load_ok(
        r#"{"name": "x", "config": {"type": "cloud"}}"#,
        &Expansions::default(),
    );
    assert_eq!(no_networking.mode, Mode::Unrestricted);
    assert!(!no_networking.blocklist.is_empty());
}

#[test]
fn duplicates_merge_ports_and_keep_the_first_entry() {
    let policy = load_ok(
        &limited(&[
            "https://Example.com",
            "http://example.com.",
            "example.com:8443",
            "EXAMPLE.COM:8443",
        ]),
        &Expansions::default(),
    );
    assert_eq!(policy.rules.len(), 1);
    let rule = &policy.rules[0];
    assert_eq!(rule.entry, "https://Example.com");
    use Proto::{Tcp, Udp};
    assert_eq!(
        rule.ports,
        ports(&[(Tcp, 80), (Tcp, 443), (Udp, 443), (Tcp, 8443), (Udp, 8443)])
    );
    assert_eq!(rule.sources, BTreeSet::from([Source::AllowedHosts]));

    let policy = load_ok(
        &limited(&["https://example.com", "example.com"]),
        &Expansions::default(),
    );
    assert_eq!(
        policy.rules[0].ports,
        Ports::Any,
        "a bare name (every port) absorbs the others"
    );
}

#[test]
fn rules_are_sorted_by_target() {
    let policy = load_ok(
        &limited(&[
            "zeta.example",
            "10.0.0.0/8",
            "*.example.com",
            "alpha.example",
            "2001:db8::1",
            "192.0.2.1",
        ]),
        &Expansions::default(),
    );
    let targets: Vec<&Target> = policy.rules.iter().map(|r| &r.target).collect();
    let mut sorted = targets.clone();
    sorted.sort();
    assert_eq!(targets, sorted);
    assert_eq!(policy.rules.len(), 6);
    assert_eq!(policy.rules[0].target, Target::Name("alpha.example".into()));
}

#[test]
fn wildcard_and_apex_are_distinct_targets() {
    let policy = load_ok(
        &limited(&["*.example.com", "example.com"]),
        &Expansions::default(),
    );
    assert_eq!(policy.rules.len(), 2);
    assert!(
        !rule(&policy, "*.example.com")
            .target
            .matches_name("example.com")
    );
    assert!(
        rule(&policy, "*.example.com")
            .target
            .matches_name("a.b.example.com")
    );
}

#[test]
fn package_managers_expand_with_their_source() {
    let text =
        r#"{"type": "limited", "allowed_hosts": ["pypi.org"], "allow_package_managers": true}"#;
    let policy = load_ok(text, &Expansions::default());
    let pypi = rule(&policy, "pypi.org");
    assert_eq!(pypi.entry, "pypi.org", "the user's entry came first");
    assert_eq!(pypi.ports, Ports::Any);
    assert_eq!(
        pypi.sources,
        BTreeSet::from([Source::AllowedHosts, Source::PackageManager("pip".into())])
    );
    let files = rule(&policy, "files.pythonhosted.org");
    assert_eq!(
        files.sources,
        BTreeSet::from([Source::PackageManager("pip".into())])
    );
    assert!(
        rule(&policy, "deb.debian.org")
            .ports
            .admits(Proto::Tcp, Some(80))
    );
    assert!(
        rule(&policy, "*.archive.ubuntu.com")
            .ports
            .admits(Proto::Tcp, Some(80))
    );

    let without = load_ok(
        r#"{"type": "limited", "allowed_hosts": ["pypi.org"]}"#,
        &Expansions::default(),
    );
    assert_eq!(without.rules.len(), 1);
}

#[test]
fn qoder_allowed_hosts_type_is_limited() {
    let text = r#"{"type": "allowed_hosts", "allowed_hosts": ["api.github.com"]}"#;
    let policy = load_ok(text, &Expansions::default());
    assert_eq!(policy.mode, Mode::Limited);
    assert_eq!(policy.dialect, Dialect::AllowedHosts);
    assert_eq!(policy.rules.len(), 1);
}

#[test]
fn mcp_servers_only_with_allow_mcp_servers() {
    let mut expansions = Expansions::default();
    expansions
        .add_mcp_server_url("https://mcp.example.com/sse")
        .unwrap();
    let allowed = load_ok(
        r#"{"type": "limited", "allow_mcp_servers": true}"#,
        &expansions,
    );
    let mcp = rule(&allowed, "mcp.example.com");
    assert_eq!(
        mcp.sources,
        BTreeSet::from([Source::Mcp("mcp.example.com".into())])
    );
    assert_eq!(mcp.entry, "https://mcp.example.com/sse");
    assert!(allowed.warnings.is_empty(), "{:?}", allowed.warnings);

    let refused = load_ok(
        r#"{"type": "limited", "allowed_hosts": ["a.example"]}"#,
        &expansions,
    );
    assert_eq!(refused.rules.len(), 1);
    assert_eq!(
        refused.warnings,
        [
            "p.json:1:1: 1 MCP server(s) given (\"mcp.example.com\") but allow_mcp_servers is not true; they are not allowed"
        ]
    );

    let qoder = load_ok(
        r#"{"type": "allowed_hosts", "allowed_hosts": ["a.example"]}"#,
        &expansions,
    );
    assert!(
        qoder.warnings[0]
            .contains("but type \"allowed_hosts\" allows only its list; they are not allowed")
    );

    let unrestricted = load_ok(r#"{"type": "unrestricted"}"#, &expansions);
    assert!(unrestricted.warnings.is_empty());
}

#[test]
fn allow_mcp_servers_without_servers_warns() {
    let text = "{\"type\": \"limited\",\n \"allowed_hosts\": [\"a.example\"],\n \"allow_mcp_servers\": true}";
    let policy = load_ok(text, &Expansions::default());
    assert_eq!(
        policy.warnings,
        [
            "p.json:3:23: allow_mcp_servers: is true but no MCP server was given (--agent FILE or --mcp-server URL); no MCP host is allowed"
        ]
    );
}

#[test]
fn extra_hosts_are_always_allowed_in_limited_mode() {
    let mut expansions = Expansions::default();
    expansions
        .add_extra_host("callback.platform.example")
        .unwrap();
    let policy = load_ok(
        r#"{"type": "allowed_hosts", "allowed_hosts": []}"#,
        &expansions,
    );
    assert_eq!(
        rule(&policy, "callback.platform.example").sources,
        BTreeSet::from([Source::Extra])
    );
    assert!(policy.warnings.is_empty());
    let unrestricted = load_ok(r#"{"type": "unrestricted"}"#, &expansions);
    assert!(unrestricted.rules.is_empty());
}

#[test]
fn flags_are_validated_in_every_mode() {
    let expansions = Expansions {
        extra_hosts: vec!["a b".into()],
        ..Expansions::default()
    };
    let err = load(r#"{"type": "unrestricted"}"#, "p.json", &expansions).unwrap_err();
    assert_eq!(
        err.to_string(),
        "--extra-host \"a b\" contains a space; a host name cannot"
    );
    let expansions = Expansions {
        mcp_servers: vec![("x".into(), "nope".into())],
        ..Expansions::default()
    };
    let err = load(r#"{"type": "unrestricted"}"#, "p.json", &expansions).unwrap_err();
    assert_eq!(
        err.to_string(),
        "MCP server \"x\": \"nope\" has no scheme; an MCP server URL starts with https:// or http://, as in \"https://nope\""
    );
}

#[test]
fn allowed_entries_inside_the_blocklist_warn() {
    let text = "{\"type\": \"limited\", \"allowed_hosts\": [\n  \"169.254.169.254\",\n  \"169.254.7.0/24\", \"169.0.0.0/8\"]}";
    let mut expansions = Expansions::default();
    expansions.add_extra_host("[fd00:ec2::254]:80").unwrap();
    let policy = load_ok(text, &expansions);
    assert_eq!(policy.warnings.len(), 3, "{:#?}", policy.warnings);
    assert!(policy.warnings.iter().any(|w| w.starts_with(
        "p.json:2:3: allowed_hosts[0]: \"169.254.169.254\" lies inside the safety blocklist entry 169.254.169.254/32 (instance metadata service"
    ) && w.ends_with("; it stays blocked")));
    assert!(policy.warnings.iter().any(|w| w.starts_with(
        "p.json:3:3: allowed_hosts[1]: \"169.254.7.0/24\" lies inside the safety blocklist entry 169.254.0.0/16 (IPv4 link-local"
    )));
    assert!(policy.warnings.iter().any(|w| w.starts_with(
        "--extra-host \"[fd00:ec2::254]:80\": \"[fd00:ec2::254]:80\" lies inside the safety blocklist entry fd00:ec2::254/128"
    )));
}

#[test]
fn a_limited_policy_that_allows_nothing_warns() {
    let policy = load_ok(
        "{\"config\": {\"networking\": {\"type\": \"limited\"}}}",
        &Expansions::default(),
    );
    assert_eq!(
        policy.warnings,
        [
            "p.json:1:27: config.networking: allows no destination; every connection except DNS to the configured resolvers will be blocked"
        ]
    );
}

#[test]
fn host_entry_errors_name_position_and_path() {
    let text = "{\n  \"config\": {\n    \"networking\": {\n      \"type\": \"limited\",\n      \"allowed_hosts\": [\n        \"a.example\",\n        \"b.example\",\n        \"https://example.com/v1\"\n      ]\n    }\n  }\n}";
    let err = load(text, "policy.json", &Expansions::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy.json:8:9: config.networking.allowed_hosts[2]: \"https://example.com/v1\" has a path (\"/v1\"); paths cannot be enforced at the network layer, which sees only addresses and ports; allow \"https://example.com\" instead"
    );
    assert!(matches!(err, Error::HostEntry { .. }));
}

#[test]
fn many_hosts_load_quickly() {
    // The locator runs only on errors and warnings, so a big policy stays linear.
    let hosts: Vec<String> = (0..10_000).map(|i| format!("h{i}.example.com")).collect();
    let refs: Vec<&str> = hosts.iter().map(String::as_str).collect();
    let started = std::time::Instant::now();
    let policy = load_ok(&limited(&refs), &Expansions::default());
    assert_eq!(policy.rules.len(), 10_000);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}
