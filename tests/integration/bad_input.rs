//! The bad-input corpus: every `tests/fixtures/bad/*.json` must be rejected
//! with exactly the text of its sibling `*.expected` (what `netleash` prints,
//! `cli::render_error`). A sibling `*.args` holds extra command-line
//! arguments, one per line (e.g. `--agent` and a file). Adding a fixture adds
//! a case; a fixture without `.expected` fails.

use std::path::{Path, PathBuf};

use clap::Parser;
use netleash::cli::{self, policy_args::PolicyArgs};

const CORPUS: &str = "tests/fixtures/bad";
/// The corpus must cover every stage and rejection; it only grows.
const MIN_FIXTURES: usize = 25;

#[derive(Debug, Parser)]
struct Command {
    #[command(flatten)]
    policy: PolicyArgs,
}

fn fixtures() -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(CORPUS)
        .unwrap_or_else(|e| panic!("cannot list {CORPUS}: {e}"))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    found.sort();
    found
}

/// The error text `netleash` prints for this fixture, or why there is none.
fn rejection(fixture: &Path) -> Result<(String, u8), String> {
    let mut argv = vec!["netleash".to_string(), fixture.display().to_string()];
    // A fixed resolver, so no case depends on this machine's resolv.conf.
    argv.extend(["--resolver".to_string(), "192.0.2.53".to_string()]);
    if let Ok(extra) = std::fs::read_to_string(fixture.with_extension("args")) {
        argv.extend(
            extra
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(str::to_string),
        );
    }
    let command = Command::try_parse_from(&argv).map_err(|e| format!("bad .args: {e}"))?;
    match command.policy.load_quietly() {
        Ok((policy, _)) => Err(format!(
            "was accepted: {} rule(s), warnings {:?}",
            policy.rules.len(),
            policy.warnings
        )),
        Err(err) => Ok((cli::render_error(&err), err.exit_code())),
    }
}

#[test]
fn every_bad_input_is_rejected_with_its_exact_message() {
    let fixtures = fixtures();
    assert!(
        fixtures.len() >= MIN_FIXTURES,
        "only {} fixtures in {CORPUS}",
        fixtures.len()
    );
    let mut failures = Vec::new();
    for fixture in &fixtures {
        let expected_path = fixture.with_extension("expected");
        let Ok(expected) = std::fs::read_to_string(&expected_path) else {
            failures.push(format!(
                "{}: no {}",
                fixture.display(),
                expected_path.display()
            ));
            continue;
        };
        match rejection(fixture) {
            Err(why) => failures.push(format!("{}: {why}", fixture.display())),
            Ok((actual, code)) => {
                if actual != expected.trim_end_matches('\n') {
                    failures.push(format!(
                        "{}:\n  expected: {}\n  actual:   {}",
                        fixture.display(),
                        expected.trim_end(),
                        actual
                    ));
                }
                if code != cli::EXIT_INVALID_INPUT {
                    failures.push(format!(
                        "{}: exit code {code}, not {}",
                        fixture.display(),
                        cli::EXIT_INVALID_INPUT
                    ));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} fixtures failed:\n{}",
        failures.len(),
        fixtures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_expected_file_has_its_fixture() {
    for entry in std::fs::read_dir(CORPUS).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|e| e == "expected" || e == "args")
        {
            assert!(
                path.with_extension("json").exists(),
                "{} has no .json fixture",
                path.display()
            );
        }
    }
}
