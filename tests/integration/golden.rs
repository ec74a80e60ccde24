//! Golden files: the rendered ruleset of every example policy
//! (`policies/examples/*.json`) and of the policies built in code
//! (`fixtures::model_cases`, and `fixtures::proxy_cases` compiled with the
//! sidecar's DNS proxy), as `tests/golden/<name>.nft` and `.json`.
//! `NETLEASH_UPDATE_GOLDEN=1 cargo test` rewrites them; review the diff.

use std::fs;
use std::path::{Path, PathBuf};

use netleash::policy::{self, CompileOptions, Expansions, Policy};
use netleash::ruleset::{compile, render};

use crate::fixtures;

pub fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/examples")
}

/// A golden case: name, policy (or the reason it could not be loaded), options.
type Case = (String, Result<Policy, String>, CompileOptions);

/// Every golden case.
fn cases() -> Vec<Case> {
    let mut cases: Vec<Case> = fixtures::model_cases()
        .into_iter()
        .map(|(name, policy)| (name.to_string(), Ok(policy), fixtures::options()))
        .chain(
            fixtures::proxy_cases()
                .into_iter()
                .map(|(name, policy)| (name.to_string(), Ok(policy), fixtures::proxy_options())),
        )
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
        cases.push((name, loaded, fixtures::options()));
    }
    cases
}

/// The two renderings of a policy under golden options.
pub fn renderings(policy: &Policy, options: &CompileOptions) -> [(&'static str, String); 2] {
    let ruleset = compile(policy, options);
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
    for (name, loaded, options) in cases() {
        let policy = match loaded {
            Ok(policy) => policy,
            Err(err) => {
                failures.push(format!("{name}: the example does not load:\n{err}"));
                continue;
            }
        };
        for (extension, rendered) in renderings(&policy, &options) {
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
        let options = fixtures::options();
        assert_eq!(
            renderings(&policy, &options),
            renderings(&policy.clone(), &options),
            "{name}"
        );
    }
}
