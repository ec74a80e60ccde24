//! Every golden ruleset passes `nft -c` (which checks a ruleset against the
//! kernel; it needs root), and the nft and JSON renderings load into the same
//! table. Both run in a fresh network namespace (`unshare --net`): with
//! nftables 1.0.6 on Linux 6.18, a table that `nft -c` checks can be seen by
//! `nft list` in the same namespace while the check runs (seen 161 times in
//! 2,000 listings during 600 checks), so a check in the host's namespace would
//! briefly show a `netleash` table there.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use netleash::ruleset::{compile, render};

use crate::fixtures;
use crate::golden::golden_dir;

/// The nft binary; fails the test when nftables is not installed.
fn nft() -> PathBuf {
    for candidate in ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    panic!(
        "nft is not installed: install nftables (apt-get install nftables) to run the ruleset checks"
    );
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|err| panic!("cannot run {command:?}: {err}"))
}

/// `nft -c -f FILE` (`-j` for JSON) in a fresh network namespace; panics
/// with nft's message when rejected.
fn nft_check(path: &Path) {
    let mut command = Command::new("unshare");
    command.arg("--net").arg(nft());
    if path.extension().is_some_and(|x| x == "json") {
        command.arg("-j");
    }
    let output = run(command.arg("-c").arg("-f").arg(path));
    assert!(
        output.status.success(),
        "nft -c rejected {} (nft -c and unshare --net need root):\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn golden_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(golden_dir())
        .expect("tests/golden exists")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "nft" || x == "json"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_golden_ruleset_passes_nft_check() {
    let files = golden_files();
    assert!(
        files.len() >= 2 * fixtures::model_cases().len(),
        "golden files are missing: {files:?}"
    );
    for path in files {
        nft_check(&path);
    }
}

#[test]
fn a_large_generated_ruleset_passes_nft_check() {
    let ruleset = compile(&fixtures::generated(2_000), &fixtures::options());
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("large.nft");
    fs::write(&text, render::nft(&ruleset)).unwrap();
    nft_check(&text);
    let json = dir.path().join("large.json");
    fs::write(
        &json,
        serde_json::to_string(&render::json(&ruleset)).unwrap(),
    )
    .unwrap();
    nft_check(&json);
}

/// Loads a file into a fresh network namespace (`unshare -n`, gone when nft
/// exits) and lists the table as the kernel holds it.
fn load_and_list(path: &Path, json: bool) -> String {
    let nft = nft();
    let flag = if json { "-j " } else { "" };
    let script = format!(
        "{0} {flag}-f '{1}' && {0} list table inet netleash",
        nft.display(),
        path.display()
    );
    let output = run(Command::new("unshare").args(["--net", "sh", "-c", &script]));
    assert!(
        output.status.success(),
        "loading {} in a new network namespace failed (needs root and unshare):\n{}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

#[test]
fn nft_and_json_renderings_load_into_the_same_table() {
    let proxied = fixtures::proxy_cases()
        .into_iter()
        .map(|(name, policy)| (name, policy, fixtures::proxy_options()));
    let cases = fixtures::model_cases()
        .into_iter()
        .map(|(name, policy)| (name, policy, fixtures::options()))
        .chain(proxied);
    for (name, policy, options) in cases {
        let ruleset = compile(&policy, &options);
        let dir = tempfile::tempdir().unwrap();
        let text_path = dir.path().join(format!("{name}.nft"));
        fs::write(&text_path, render::nft(&ruleset)).unwrap();
        let json_path = dir.path().join(format!("{name}.json"));
        fs::write(
            &json_path,
            serde_json::to_string(&render::json(&ruleset)).unwrap(),
        )
        .unwrap();

        let from_text = load_and_list(&text_path, false);
        let from_json = load_and_list(&json_path, true);
        // nft 1.0.6 keeps a table comment only from text input.
        let comment = format!("\tcomment \"{}\"\n", ruleset.digest);
        assert!(
            from_text.contains(&comment),
            "{name}: the digest comment is missing:\n{from_text}"
        );
        assert_eq!(
            from_text.replace(&comment, ""),
            from_json.replace(&comment, ""),
            "{name}"
        );
        for rule in ruleset.chains.iter().flat_map(|c| &c.rules) {
            assert!(
                from_text.contains(&format!("comment \"{}\"", rule.id)),
                "{name}: rule {} is missing",
                rule.id
            );
        }
    }
}
