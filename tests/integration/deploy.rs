//! The deployment files under deploy/ are what the tools that read them
//! expect: hooks.d files in the oci-hooks(5) 1.0.0 schema, the runc hooks
//! snippet in the runtime-spec shape, and the systemd unit's agent flags.
//! Every hook's arguments are parsed by netleash's own command line.

use std::path::{Path, PathBuf};

use clap::Parser as _;
use netleash::agent::protocol::DEFAULT_SOCKET;
use netleash::cli::{Cli, Command};
use netleash::oci::{POLICY_ANNOTATION, POLICY_FILE_ANNOTATION};
use serde_json::Value;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn read_json(path: &str) -> Value {
    let path = deploy(path);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|err| panic!("read {}: {err}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

/// A runtime-spec hook entry (config.md, "POSIX-platform Hooks"): `path`
/// the installed netleash binary (absolute, as the spec requires), `args`
/// starting with the program name, a positive `timeout`; its arguments must
/// be a `netleash hook` command at `stage`.
fn check_hook_entry(hook: &Value, stage: netleash::cli::hook::Stage) {
    let path = hook["path"].as_str().expect("hook.path is a string");
    let args: Vec<&str> = hook["args"]
        .as_array()
        .expect("hook.args is an array")
        .iter()
        .map(|arg| arg.as_str().expect("every hook argument is a string"))
        .collect();
    assert!(
        hook["timeout"].as_u64().is_some_and(|t| t > 0),
        "hook.timeout must be a positive integer: {hook}"
    );
    assert_eq!(
        path, "/usr/local/bin/netleash",
        "the hook is the one netleash binary"
    );
    assert_eq!(args[0], "netleash", "args[0] names the program");
    let parsed = match Cli::try_parse_from(&args) {
        Ok(Cli {
            command: Command::Hook(parsed),
            ..
        }) => parsed,
        Ok(other) => panic!("{args:?} is not `netleash hook`: {other:?}"),
        Err(err) => panic!("{args:?}: {err}"),
    };
    assert_eq!(parsed.stage, stage, "{args:?}");
    assert!(
        hook["timeout"].as_u64().unwrap() > parsed.timeout || parsed.standalone,
        "the runtime's timeout must leave the hook time to wait for the agent: {hook}"
    );
}

#[test]
fn hooks_d_files_follow_the_oci_hooks_1_0_0_schema() {
    use netleash::cli::hook::Stage;
    // Valid stages of the 1.0.0 schema (containers/common pkg/hooks/1.0.0).
    const STAGES: [&str; 6] = [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ];
    for (file, stage, oci_stage) in [
        (
            "hooks.d/50-netleash.json",
            Stage::CreateRuntime,
            "createRuntime",
        ),
        (
            "hooks.d/50-netleash-poststop.json",
            Stage::Poststop,
            "poststop",
        ),
    ] {
        let hook = read_json(file);
        let keys: Vec<&String> = hook.as_object().expect("an object").keys().collect();
        assert_eq!(keys, ["hook", "stages", "version", "when"], "{file}");
        assert_eq!(hook["version"], "1.0.0", "{file}");
        check_hook_entry(&hook["hook"], stage);
        let stages = hook["stages"].as_array().expect("stages is an array");
        assert_eq!(stages, &[Value::from(oci_stage)], "{file}");
        assert!(stages.iter().all(|s| STAGES.contains(&s.as_str().unwrap())));

        // `when.annotations`: key and value regular expressions; all pairs
        // must match some annotation. The one pair must match either
        // annotation, whatever its value (JSON with newlines too), and nothing else.
        let when = hook["when"].as_object().expect("when is an object");
        assert_eq!(when.keys().collect::<Vec<_>>(), ["annotations"], "{file}");
        let pairs = when["annotations"].as_object().expect("an object");
        assert_eq!(pairs.len(), 1, "{file}");
        let (key, value) = pairs.iter().next().unwrap();
        let key = regex::Regex::new(key).expect("the key is a regular expression");
        let value =
            regex::Regex::new(value.as_str().unwrap()).expect("the value is a regular expression");
        for annotation in [POLICY_ANNOTATION, POLICY_FILE_ANNOTATION] {
            assert!(key.is_match(annotation), "{file}: {annotation}");
        }
        for other in [
            "netleash.policyx",
            "xnetleash.policy",
            "netleash-policy",
            "netleash",
        ] {
            assert!(!key.is_match(other), "{file} matches {other}");
        }
        assert!(value.is_match("{\"type\":\n \"limited\"}") && value.is_match(""));
    }
}

#[test]
fn the_runc_snippet_has_hooks_and_an_annotation_that_loads() {
    use netleash::cli::hook::Stage;
    let snippet = read_json("runc/config-hooks.json");
    check_hook_entry(&snippet["hooks"]["createRuntime"][0], Stage::CreateRuntime);
    check_hook_entry(&snippet["hooks"]["poststop"][0], Stage::Poststop);
    let hooks = snippet["hooks"].as_object().unwrap();
    assert_eq!(
        hooks.keys().collect::<Vec<_>>(),
        ["createRuntime", "poststop"]
    );
    let policy = snippet["annotations"][POLICY_ANNOTATION]
        .as_str()
        .expect("the example annotation is a string");
    netleash::policy::load(
        policy,
        "deploy/runc/config-hooks.json",
        &netleash::policy::Expansions::default(),
    )
    .unwrap_or_else(|err| panic!("{}", netleash::cli::render_error(&err)));
}

#[test]
fn the_systemd_unit_runs_the_agent_on_the_default_socket() {
    let path = deploy("systemd/netleash-agent.service");
    let unit = std::fs::read_to_string(&path).expect("read the unit");
    let exec: Vec<&str> = unit
        .lines()
        .filter_map(|line| line.strip_prefix("ExecStart="))
        .collect();
    assert_eq!(exec.len(), 1, "one ExecStart line");
    let words: Vec<&str> = exec[0].split_whitespace().collect();
    assert_eq!(
        words,
        [
            "/usr/local/bin/netleash",
            "agent",
            "--socket",
            DEFAULT_SOCKET,
            "--state-dir",
            "/var/lib/netleash"
        ]
    );
    // The socket's directory is the unit's RuntimeDirectory, and the state
    // directory its StateDirectory: systemd creates them root-only.
    for line in [
        "RuntimeDirectory=netleash",
        "RuntimeDirectoryMode=0700",
        "StateDirectory=netleash",
        "StateDirectoryMode=0700",
        "RestrictNamespaces=net",
    ] {
        assert!(unit.lines().any(|l| l == line), "the unit lacks {line}");
    }
    assert_eq!(
        Path::new(DEFAULT_SOCKET).parent(),
        Some(Path::new("/run/netleash"))
    );
}
