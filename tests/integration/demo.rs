//! `netleash demo`, run as a user would.

use std::process::{Command, Output, Stdio};

use crate::support::{self, describe};

/// Run `netleash demo ARGS`; returns its output and the `nl-PID-` prefix of
/// the namespaces it names, the only ones a test may delete.
fn demo(args: &[&str]) -> (Output, String) {
    let child = Command::new(env!("CARGO_BIN_EXE_netleash"))
        .arg("demo")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run netleash demo");
    let prefix = format!("nl-{}-", child.id());
    (
        child.wait_with_output().expect("wait for netleash demo"),
        prefix,
    )
}

fn leftovers(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|entry| entry.ok()?.file_name().into_string().ok())
                .filter(|name| name.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// The table row for `destination` and `port` (e.g. "443/tcp").
fn row<'a>(stdout: &'a str, destination: &str, port: &str) -> &'a str {
    stdout
        .lines()
        .find(|line| {
            let mut words = line.split_whitespace();
            words.next() == Some(destination) && words.next() == Some(port)
        })
        .unwrap_or_else(|| panic!("no row for {destination} {port} in:\n{stdout}"))
}

#[test]
fn demo_shows_what_is_allowed_and_blocked_and_cleans_up() {
    support::require_root();
    let (output, prefix) = demo(&[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", describe(&output));
    for (destination, port, expected) in [
        ("198.51.100.10", "443/tcp", "allowed"),
        ("198.51.100.10", "8443/tcp", "blocked"),
        ("203.0.113.20", "443/tcp", "blocked"),
        ("2001:db8:100::10", "443/tcp", "allowed"),
        ("169.254.169.254", "80/tcp", "blocked"),
        ("fd00:ec2::254", "80/tcp", "blocked"),
        ("198.51.100.53", "53/udp", "allowed"),
    ] {
        let line = row(&stdout, destination, port);
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[2], expected, "{line}");
        assert!(line.contains(" yes "), "observation does not match: {line}");
    }
    assert!(
        stdout.contains("All 13 observations match the policy."),
        "{stdout}"
    );
    assert_eq!(
        leftovers(&prefix),
        Vec::<String>::new(),
        "the demo left namespaces behind"
    );
}

#[test]
fn demo_keep_leaves_the_namespaces_and_says_how_to_delete_them() {
    support::require_root();
    let (output, prefix) = demo(&["--keep"]);
    let kept = leftovers(&prefix);
    // Delete what the demo kept before asserting, so a failure leaves nothing.
    for name in &kept {
        let _ = Command::new("ip").args(["netns", "delete", name]).status();
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", describe(&output));
    assert_eq!(kept.len(), 2, "{kept:?}");
    for name in &kept {
        assert!(
            stdout.contains(&format!("ip netns delete {name}")),
            "{name} not named in:\n{stdout}"
        );
    }
}

#[test]
fn demo_without_root_says_what_it_needs() {
    support::require_root();
    let output = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            env!("CARGO_BIN_EXE_netleash"),
            "demo",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run setpriv (util-linux)");
    assert_eq!(output.status.code(), Some(3), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("needs root"), "{stderr}");
}
