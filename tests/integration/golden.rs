//! Golden files: the rendered ruleset of every example policy
//! (`policies/examples/*.json`) and of the policies built in code
//! (`fixtures::model_cases`), as `tests/golden/<name>.nft` and `.json`.
//! `NETLEASH_UPDATE_GOLDEN=1 cargo test` rewrites them; review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use netleash::policy::{self, Expansions, Policy};
use netleash::ruleset::{compile, render};

use crate::fixtures;

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples")
}

/// Every golden case: (name, policy or the reason it could not be loaded).
fn cases() -> Vec<(String, Result<Policy, String>)> {
    let mut cases: Vec<(String, Result<Policy, String>)> = fixtures::model_cases()
        .into_iter()
        .map(|(name, policy)| (name.to_string(), Ok(policy)))
        .collect();
    let mut examples: Vec<PathBuf> = match fs::read_dir(examples_dir()) {
        Ok(entries) => entries
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(_) => Vec::new(),
    };
    examples.sort();
    for path in examples {
        let name = path.file_stem().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(&path).unwrap();
        let loaded = policy::load(&text, &path.display().to_string(), &Expansions::default())
            .map_err(|err| netleash::cli::render_error(&err));
        cases.push((name, loaded));
    }
    cases
}

/// The two renderings of a policy under the fixed golden options.
pub fn renderings(policy: &Policy) -> [(&'static str, String); 2] {
    let ruleset = compile(policy, &fixtures::options());
    let mut json = serde_json::to_string_pretty(&render::json(&ruleset)).unwrap();
    json.push('\n');
    [("nft", render::nft(&ruleset)), ("json", json)]
}

fn first_difference(expected: &str, actual: &str) -> String {
    let line = expected
        .lines()
        .zip(actual.lines())
        .position(|(e, a)| e != a);
    match line {
        Some(i) => format!(
            "first difference at line {}:\n  golden:   {}\n  rendered: {}",
            i + 1,
            expected.lines().nth(i).unwrap_or(""),
            actual.lines().nth(i).unwrap_or("")
        ),
        None => format!(
            "lengths differ: golden {} lines, rendered {} lines",
            expected.lines().count(),
            actual.lines().count()
        ),
    }
}

#[test]
fn every_case_matches_its_golden_files() {
    let update = std::env::var_os("NETLEASH_UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let dir = golden_dir();
    fs::create_dir_all(&dir).unwrap();
    let mut failures = Vec::new();
    let mut expected_files = Vec::new();
    for (name, loaded) in cases() {
        let policy = match loaded {
            Ok(policy) => policy,
            Err(err) => {
                failures.push(format!("{name}: the example does not load:\n{err}"));
                continue;
            }
        };
        for (extension, rendered) in renderings(&policy) {
            let path = dir.join(format!("{name}.{extension}"));
            expected_files.push(path.clone());
            if update {
                fs::write(&path, &rendered).unwrap();
                continue;
            }
            match fs::read_to_string(&path) {
                Ok(golden) if golden == rendered => {}
                Ok(golden) => failures.push(format!(
                    "{} differs from the rendered ruleset; if the change is intended, run \
                     `NETLEASH_UPDATE_GOLDEN=1 cargo test` and review the diff.\n{}",
                    path.display(),
                    first_difference(&golden, &rendered)
                )),
                Err(_) => failures.push(format!(
                    "{} is missing; create it with `NETLEASH_UPDATE_GOLDEN=1 cargo test` and review it",
                    path.display()
                )),
            }
        }
    }
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if !expected_files.contains(&path) {
            failures.push(format!(
                "{} belongs to no example or model case; delete it",
                path.display()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn rendering_is_deterministic() {
    for (name, policy) in fixtures::model_cases() {
        assert_eq!(renderings(&policy), renderings(&policy.clone()), "{name}");
    }
}
