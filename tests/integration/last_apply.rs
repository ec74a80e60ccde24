//! `netleash apply` remembers the table it verified for the next apply in
//! the same network namespace (`kernel::last_apply`): the file is written
//! before the process exits, the next apply plans from it, a change by
//! another program in between makes it read the table instead, and
//! `netleash remove` removes the file. Needs root; fails without it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Output};

use netleash::kernel::last_apply::DIR_VARIABLE;

use crate::support::{describe, require_root, write_policy};

const FIRST: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "203.0.113.0/28"]}"#;
const SECOND: &str =
    r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "203.0.113.16/28"]}"#;

/// A network namespace of its own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new() -> Netns {
        require_root();
        let name = format!("nl-lastapply-{}", std::process::id());
        let output = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "ip netns add: {}",
            describe(&output)
        );
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// `netleash ARGS` with the files in `dir` and debug logs.
fn netleash(dir: &Path, args: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_netleash"))
        .args(args)
        .env(DIR_VARIABLE, dir)
        .env("NETLEASH_LOG", "netleash=debug")
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "netleash {args:?}: {}",
        describe(&output)
    );
    output
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The files in `dir`.
fn files(dir: &Path) -> Vec<std::fs::DirEntry> {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries.map(Result::unwrap).collect(),
        Err(_) => Vec::new(),
    }
}

#[test]
fn the_cli_leaves_its_verified_table_for_the_next_apply_in_the_namespace() {
    let ns = Netns::new();
    let work = tempfile::tempdir().unwrap();
    let first = write_policy(work.path(), "first.json", FIRST);
    let second = write_policy(work.path(), "second.json", SECOND);
    let dir = work.path().join("last-apply");
    let apply =
        |policy: &Path| netleash(&dir, &["apply", policy.to_str().unwrap(), "--netns", &ns.0]);

    let created = apply(&first);
    assert!(
        stderr(&created).contains("was assumed absent (no last apply file"),
        "{}",
        stderr(&created)
    );
    // Written before the process exited (it exits right after answering).
    let written = files(&dir);
    assert_eq!(written.len(), 1, "{written:?}");
    let file = written[0].metadata().unwrap();
    assert_eq!(file.mode() & 0o777, 0o600);
    assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);

    let swapped = apply(&second);
    assert!(
        stderr(&swapped).contains("was recalled from the last apply's file"),
        "{}",
        stderr(&swapped)
    );

    // Another program changes the ruleset: the file is stale, the kernel
    // refuses the transaction planned from it, and the apply reads.
    let status = Command::new("ip")
        .args([
            "netns", "exec", &ns.0, "nft", "add", "table", "inet", "other",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let after_change = apply(&first);
    let log = stderr(&after_change);
    assert!(log.contains("was read from the kernel"), "{log}");
    assert!(!log.contains("was recalled"), "{log}");
    let again = apply(&second);
    assert!(stderr(&again).contains("was recalled from the last apply's file"));

    netleash(&dir, &["remove", "--netns", &ns.0]);
    assert!(files(&dir).is_empty(), "{:?}", files(&dir));
}
