//! The `compile`, `explain` and `check` commands, run as a user runs them:
//! output content and exit codes (0 allowed, 1 blocked, 2 invalid input,
//! 3 system error).

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use netleash::policy::{self, CompileOptions, Expansions};
use netleash::ruleset::{compile, render};

const NETLEASH: &str = env!("CARGO_BIN_EXE_netleash");

const POLICY: &str = r#"{"type": "cloud", "networking": {"type": "limited", "allowed_hosts": [
    "https://api.example.com", "*.cdn.example.net", "203.0.113.0/24", "[2001:db8::7]:8443"]}}"#;

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn finish(output: Output) -> Run {
    Run {
        code: output.status.code().expect("netleash exited by a signal"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

fn run_in(command: &mut Command, stdin: Option<&str>) -> Run {
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
    drop(input);
    finish(child.wait_with_output().unwrap())
}

fn netleash(args: &[&str]) -> Run {
    run_in(Command::new(NETLEASH).args(args), None)
}

/// A temporary directory holding `policy.json` with `text`.
fn policy_file(text: &str) -> (tempfile::TempDir, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policy.json");
    std::fs::write(&path, text).unwrap();
    let path = path.display().to_string();
    (dir, path)
}

fn check(policy: &str, to: &str) -> Run {
    netleash(&["check", policy, "--resolver", "192.0.2.53", "--to", to])
}

#[test]
fn compile_prints_the_library_rendering_in_both_formats() {
    let (dir, policy) = policy_file(POLICY);
    let options = CompileOptions {
        resolvers: vec!["192.0.2.53".parse().unwrap()],
        ..CompileOptions::default()
    };
    let loaded = policy::load(POLICY, &policy, &Expansions::default()).unwrap();
    let ruleset = compile(&loaded, &options);

    let nft = netleash(&["compile", &policy, "--resolver", "192.0.2.53"]);
    assert_eq!((nft.code, nft.stderr.as_str()), (0, ""));
    assert_eq!(nft.stdout, render::nft(&ruleset));
    assert!(
        nft.stdout.contains("\t\telements = { 203.0.113.0/24 }\n"),
        "{}",
        nft.stdout
    );

    let out = dir.path().join("ruleset.json");
    let json = netleash(&[
        "compile",
        &policy,
        "--resolver",
        "192.0.2.53",
        "--format",
        "json",
        "-o",
        &out.display().to_string(),
    ]);
    assert_eq!((json.code, json.stdout.as_str()), (0, ""));
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    assert_eq!(written, render::json(&ruleset));
}

#[test]
fn compile_reads_standard_input() {
    let run = run_in(
        Command::new(NETLEASH).args(["compile", "-", "--resolver", "192.0.2.53"]),
        Some(r#"{"type": "unrestricted"}"#),
    );
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout
            .starts_with("# netleash ruleset, mode unrestricted."),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("policy accept;"), "{}", run.stdout);
}

#[test]
fn explain_lists_entries_kinds_ports_and_sources() {
    let (_dir, policy) = policy_file(POLICY);
    let run = netleash(&[
        "explain",
        &policy,
        "--resolver",
        "192.0.2.53",
        "--extra-host",
        "callback.platform.example",
    ]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert!(
        run.stdout.contains("Mode: limited (type limited)"),
        "{}",
        run.stdout
    );
    for row in [
        "  ENTRY                      KIND      PORTS               SOURCE\n",
        "  https://api.example.com    name      443/tcp, 443/udp    allowed_hosts\n",
        "  callback.platform.example  name      any                 extra\n",
        "  *.cdn.example.net          wildcard  any                 allowed_hosts\n",
        "  203.0.113.0/24             cidr      any                 allowed_hosts\n",
        "  [2001:db8::7]:8443         address   8443/tcp, 8443/udp  allowed_hosts\n",
        "  169.254.169.254  instance metadata service",
        "DNS resolvers (UDP and TCP 53; DNS and DNS over TLS anywhere else are denied): 192.0.2.53\n",
        "nflog group 4711",
        "learned at run time",
    ] {
        assert!(
            run.stdout.contains(row),
            "missing {row:?} in:\n{}",
            run.stdout
        );
    }
}

#[test]
fn explain_shows_warnings_once_in_its_report() {
    let (_dir, policy) = policy_file(r#"{"type": "limited", "allow_mcp_servers": true}"#);
    let run = netleash(&["explain", &policy, "--resolver", "192.0.2.53"]);
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(run.stderr, "");
    assert!(
        run.stdout
            .contains("Allowed: nothing but loopback and DNS to the resolvers below."),
        "{}",
        run.stdout
    );
    assert!(run.stdout.contains("Warnings:\n  - "), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("allow_mcp_servers: is true but no MCP server was given"),
        "{}",
        run.stdout
    );
}

#[test]
fn check_answers_allowed_or_blocked_with_the_deciding_rule() {
    let (_dir, policy) = policy_file(POLICY);
    let cases: [(&str, i32, &str); 9] = [
        (
            "api.example.com:443",
            0,
            "by rules allow-dns-v4-ports (IPv4) and allow-dns-v6-ports (IPv6)",
        ),
        (
            "API.Example.com.",
            0,
            "allowed: api.example.com (every tcp and udp port tried)\n  accepted on 443/tcp, 443/udp",
        ),
        (
            "api.example.com:80",
            1,
            "denied on 80/tcp by rule default-deny",
        ),
        (
            "a.b.cdn.example.net/udp",
            0,
            "accepted on every udp port except 53, 853 by rules allow-dns-v4",
        ),
        (
            "cdn.example.net:443",
            1,
            "no policy entry matches this name",
        ),
        (
            "203.0.113.9:53/udp",
            1,
            "denied on 53/udp by rule dns-other",
        ),
        (
            "169.254.169.254:80",
            1,
            "denied on 80/tcp by rule blocklist-v4",
        ),
        (
            "[2001:db8::7]:8443/udp",
            0,
            "accepted on 8443/udp by rule allow-static-v6-ports",
        ),
        (
            "2001:db8::7",
            0,
            "accepted on 8443/tcp, 8443/udp by rule allow-static-v6-ports",
        ),
    ];
    for (to, code, expected) in cases {
        let run = check(&policy, to);
        assert_eq!(run.code, code, "--to {to}:\n{}{}", run.stdout, run.stderr);
        assert!(
            run.stdout.contains(expected),
            "--to {to}: missing {expected:?} in:\n{}",
            run.stdout
        );
    }
    let resolver = check(&policy, "192.0.2.53:53/udp");
    assert_eq!(resolver.code, 0, "{}", resolver.stdout);
    assert!(
        resolver.stdout.contains("by rule dns-resolvers-v4"),
        "{}",
        resolver.stdout
    );
}

#[test]
fn check_rejects_bad_input_with_exit_code_2() {
    let (_dir, policy) = policy_file(POLICY);
    for (to, message) in [
        ("example.com:0", "port 0 is out of range; ports are 1-65535"),
        (
            "example.com/sctp",
            "unknown protocol `/sctp`; use /tcp or /udp",
        ),
        (
            "2001:db8::1:443:x",
            "to give a port, bracket the address: [2001:db8::1]:443",
        ),
        ("https://example.com", "`https://` is a URL scheme"),
    ] {
        let run = check(&policy, to);
        assert_eq!(run.code, 2, "--to {to}: {}", run.stderr);
        assert!(run.stderr.contains(message), "--to {to}: {}", run.stderr);
        assert!(run.stdout.is_empty());
    }

    let (_bad_dir, bad) = policy_file(r#"{"type": "limited", "allowed_host": []}"#);
    let run = check(&bad, "example.com");
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr.contains(r#"did you mean "allowed_hosts"?"#),
        "{}",
        run.stderr
    );

    let run = check("/nonexistent/policy.json", "example.com");
    assert_eq!(run.code, 2, "{}", run.stderr);
    assert!(
        run.stderr
            .starts_with("error: cannot read policy file /nonexistent/policy.json"),
        "{}",
        run.stderr
    );
}

#[test]
fn check_resolve_follows_the_addresses_of_localhost() {
    let (_dir, policy) = policy_file(POLICY);
    let run = netleash(&[
        "check",
        &policy,
        "--resolver",
        "192.0.2.53",
        "--to",
        "localhost:8080",
        "--resolve",
    ]);
    assert_eq!(run.code, 0, "{}{}", run.stdout, run.stderr);
    assert!(run.stdout.starts_with("allowed: localhost (8080/tcp)\n  as a name:\n    denied on 8080/tcp by rule default-deny"), "{}", run.stdout);
    assert!(
        run.stdout
            .contains("    127.0.0.1: allowed\n      accepted on 8080/tcp by rule loopback"),
        "{}",
        run.stdout
    );
}

/// Runs netleash in a private mount namespace whose /etc/hosts is `hosts` and
/// whose /etc/nsswitch.conf resolves names from files only, so `--resolve`
/// never sends a DNS query. Needs root and unshare(1).
fn netleash_with_hosts(dir: &Path, hosts: &str, args: &[&str]) -> Run {
    let hosts_path: PathBuf = dir.join("hosts");
    std::fs::write(&hosts_path, hosts).unwrap();
    let nsswitch = dir.join("nsswitch.conf");
    std::fs::write(&nsswitch, "hosts: files\n").unwrap();
    let script = r#"mount --bind "$1" /etc/hosts && mount --bind "$2" /etc/nsswitch.conf && shift 2 && exec "$@""#;
    let mut command = Command::new("unshare");
    command
        .args([
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
        ])
        .arg(&hosts_path)
        .arg(&nsswitch)
        .arg(NETLEASH)
        .args(args);
    let run = run_in(&mut command, None);
    assert!(
        !run.stderr.contains("mount:") && !run.stderr.contains("unshare:"),
        "cannot set up a private /etc/hosts (this test needs root and unshare):\n{}",
        run.stderr
    );
    run
}

#[test]
fn check_resolve_keeps_a_rebound_name_blocked() {
    let (dir, policy) = policy_file(POLICY);
    let hosts = "192.0.2.44 api.example.com\n2001:db8::44 api.example.com\n\
                 169.254.169.254 evil.cdn.example.net\n";
    let args = |to: &'static str| {
        [
            "check",
            policy.as_str(),
            "--resolver",
            "192.0.2.53",
            "--resolve",
            "--to",
            to,
        ]
    };

    let good = netleash_with_hosts(dir.path(), hosts, &args("api.example.com:443"));
    assert_eq!(good.code, 0, "{}{}", good.stdout, good.stderr);
    assert!(
        good.stdout.contains(
            "  its addresses now, from the system resolver, added to the sets above as the resolver loop would: \
             192.0.2.44, 2001:db8::44\n    192.0.2.44: allowed\n      accepted on 443/tcp by rule allow-dns-v4-ports"
        ),
        "{}",
        good.stdout
    );
    assert!(
        good.stdout.contains(
            "    2001:db8::44: allowed\n      accepted on 443/tcp by rule allow-dns-v6-ports"
        ),
        "{}",
        good.stdout
    );

    let rebound = netleash_with_hosts(dir.path(), hosts, &args("evil.cdn.example.net:443"));
    assert_eq!(rebound.code, 1, "{}{}", rebound.stdout, rebound.stderr);
    assert!(
        rebound
            .stdout
            .starts_with("blocked: evil.cdn.example.net (443/tcp)\n  as a name:\n    accepted"),
        "{}",
        rebound.stdout
    );
    assert!(
        rebound
            .stdout
            .contains("    169.254.169.254: blocked\n      denied on 443/tcp by rule blocklist-v4"),
        "{}",
        rebound.stdout
    );

    let unknown = netleash_with_hosts(dir.path(), hosts, &args("missing.example.org:443"));
    assert_eq!(unknown.code, 3, "{}{}", unknown.stdout, unknown.stderr);
    assert!(
        unknown.stderr.starts_with(
            "error: cannot resolve missing.example.org with the system resolver\n  caused by: "
        ),
        "{}",
        unknown.stderr
    );
}

#[test]
fn help_documents_destinations_examples_and_exit_codes() {
    let run = netleash(&["check", "--help"]);
    assert_eq!(run.code, 0);
    for text in [
        "HOST|IP[:PORT][/tcp|udp]",
        "--to '[2001:db8::1]:443/udp'",
        "0 allowed, 1 blocked, 2 invalid input",
    ] {
        assert!(
            run.stdout.contains(text),
            "missing {text:?} in:\n{}",
            run.stdout
        );
    }
    let run = netleash(&["compile", "--help"]);
    assert!(
        run.stdout.contains("--format <FORMAT>") && run.stdout.contains("nft -c -f ruleset.nft"),
        "{}",
        run.stdout
    );
}
