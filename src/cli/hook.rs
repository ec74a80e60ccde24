//! `netleash hook`: an OCI runtime hook that puts a container's policy in
//! force before its workload starts, and tells the agent when it is gone.
//!
//! Fail closed: at the createRuntime and prestart stages any failure to
//! enforce a policy that the annotations ask for exits non-zero, and the
//! runtime then does not start the container (runtime-spec config.md,
//! "POSIX-platform Hooks": an error of these hooks MUST stop the lifecycle).
//! A container without the annotations is never touched. At the poststop
//! stage nothing fails: an error there must not break container removal.

use std::io::Read as _;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{EXIT_INVALID_INPUT, EXIT_OK, EXIT_SYSTEM_ERROR, Error as CliError};
use crate::agent::protocol::{self, AgentDefinition, FailureKind, Put, Reply, ReplyWhen, Request};
use crate::kernel;
use crate::netns::Target;
use crate::oci::{
    self, AGENT_ANNOTATION, AGENT_FILE_ANNOTATION, POLICY_ANNOTATION, POLICY_FILE_ANNOTATION,
    PolicySource,
};
use crate::policy::{self, CompileOptions, DEFAULT_NFLOG_GROUP, Expansions, Mode};
use crate::ruleset;

/// How long the hook waits for the agent's reply unless `--timeout` says
/// otherwise. The agent replies once the rules are in force; it may resolve
/// the policy's names first, which the sidecar bounds at 10 s.
pub const DEFAULT_AGENT_TIMEOUT_SECS: u64 = 30;

/// The lifecycle stage the runtime runs the hook at (runtime-spec config.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// After the namespaces are created, before pivot_root; in the runtime's namespace.
    CreateRuntime,
    /// The deprecated predecessor of createRuntime; the same work.
    Prestart,
    /// After the container is deleted: tell the agent to forget it.
    Poststop,
}

/// Run as an OCI runtime hook: read the container state from standard input
/// and enforce the policy of its `netleash.policy` (inline JSON) or
/// `netleash.policy-file` (a host path) annotation in its network namespace,
/// through the agent, or directly with --standalone. A container without
/// either annotation is left alone. Any failure exits non-zero, so the runtime
/// does not start the container.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The stage the runtime runs this hook at.
    #[arg(long, value_enum, default_value = "create-runtime")]
    pub stage: Stage,

    /// The agent's socket.
    #[arg(long, value_name = "PATH", default_value = protocol::DEFAULT_SOCKET)]
    pub socket: PathBuf,

    /// Enforce the policy directly, without the agent. Nothing keeps
    /// DNS-derived rules fresh afterwards, so allowed names stay blocked
    /// (only addresses and CIDRs work); a warning lists them.
    #[arg(long)]
    pub standalone: bool,

    /// How long to wait for the agent's reply, in seconds.
    #[arg(long, value_name = "SECONDS", default_value_t = DEFAULT_AGENT_TIMEOUT_SECS,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,

    /// With --standalone: a DNS server the container may query (port 53).
    /// Repeatable. Default: the nameservers of the container's /etc/resolv.conf
    /// (the source of its bind mount, else the file in its root filesystem).
    #[arg(long = "resolver", value_name = "IP")]
    pub resolvers: Vec<IpAddr>,

    /// With --standalone: the nflog group denied packets are logged to.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_NFLOG_GROUP)]
    pub nflog_group: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the container state from standard input")]
    ReadState(#[source] std::io::Error),
    #[error(transparent)]
    Oci(#[from] oci::Error),
    #[error("cannot read {what} {path} named by annotation {annotation} of container {id}")]
    AnnotatedFile {
        id: String,
        what: &'static str,
        annotation: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot hand container {id} to the netleash agent, so it must not start \
         (to enforce without an agent, run the hook with --standalone)"
    )]
    Agent {
        id: String,
        #[source]
        source: protocol::Error,
    },
    #[error("cannot enforce the policy of container {id}, so it must not start")]
    Enforce {
        id: String,
        #[source]
        source: kernel::Error,
    },
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::ReadState(_) | Error::AnnotatedFile { .. } => EXIT_INVALID_INPUT,
            Error::Oci(err) if err.is_invalid_input() => EXIT_INVALID_INPUT,
            Error::Agent {
                source:
                    protocol::Error::Refused {
                        kind: FailureKind::InvalidInput,
                        ..
                    },
                ..
            } => EXIT_INVALID_INPUT,
            _ => EXIT_SYSTEM_ERROR,
        }
    }
}

impl From<Error> for CliError {
    fn from(error: Error) -> Self {
        CliError::Hook(Box::new(error))
    }
}

pub fn run(args: Args) -> Result<u8, CliError> {
    let mut text = String::new();
    let read = std::io::stdin()
        .read_to_string(&mut text)
        .map_err(Error::ReadState);
    run_with_state(&args, read.map(|_| text))
}

/// The hook's work for the state text the runtime wrote (or the error
/// reading it).
fn run_with_state(args: &Args, text: Result<String, Error>) -> Result<u8, CliError> {
    let state = text.and_then(|text| oci::parse_state(&text).map_err(Error::from));
    match (args.stage, state) {
        (Stage::CreateRuntime | Stage::Prestart, state) => enforce(args, &state?),
        (Stage::Poststop, Ok(state)) => {
            let outcome = forget(args, &state);
            tracing::debug!(container = %state.id, ?outcome, "poststop");
            Ok(EXIT_OK)
        }
        // Even a state that cannot be read must not stop the container's removal.
        (Stage::Poststop, Err(err)) => {
            tracing::warn!(error = %super::render_error(&err), "poststop: nothing done");
            Ok(EXIT_OK)
        }
    }
}

/// The createRuntime/prestart work: find the policy, check the namespace,
/// and put the policy in force through the agent or directly.
fn enforce(args: &Args, state: &oci::State) -> Result<u8, CliError> {
    let id = &state.id;
    let config = oci::read_config(state).map_err(Error::from)?;
    let Some(source) = oci::policy_source(id, &config.annotations).map_err(Error::from)? else {
        tracing::debug!(container = %id, "no netleash annotation: container left alone");
        return Ok(EXIT_OK);
    };
    let (text, origin) = read_source(
        id,
        source,
        (POLICY_ANNOTATION, POLICY_FILE_ANNOTATION),
        "policy file",
    )?;
    let agent = match oci::agent_source(id, &config.annotations).map_err(Error::from)? {
        Some(source) => {
            let (text, origin) = read_source(
                id,
                source,
                (AGENT_ANNOTATION, AGENT_FILE_ANNOTATION),
                "agent definition file",
            )?;
            Some(AgentDefinition { text, origin })
        }
        None => None,
    };
    let mut expansions = Expansions::default();
    if let Some(agent) = &agent {
        expansions.add_agent_file(&agent.text, &agent.origin)?;
    }
    // Checked here in both modes, so a bad policy gets the same message
    // (with line:column) whether or not an agent runs.
    let policy = policy::load(&text, &origin, &expansions)?;
    // Before anything is enforced: never the host's own namespace.
    let netns = oci::container_netns(state).map_err(Error::from)?;

    if args.standalone {
        return enforce_directly(args, state, &config, &netns, policy);
    }
    let request = Request::Put(Put {
        id: id.clone(),
        netns,
        pid: state.live_pid(),
        policy: text,
        origin,
        agent,
        // The container may start once its rules are in force: its DNS goes
        // to its proxy, which learns each answer before it releases it.
        reply_when: ReplyWhen::RulesInForce,
    });
    let reply = protocol::call(&args.socket, &request, Duration::from_secs(args.timeout)).map_err(
        |source| Error::Agent {
            id: id.clone(),
            source,
        },
    )?;
    if let Reply::Sandbox(status) = reply {
        tracing::info!(container = %id, digest = %status.digest, "the agent enforces the policy");
    }
    Ok(EXIT_OK)
}

/// The text of an annotated document and its origin for error messages:
/// the annotation's value itself, or the host file it names.
fn read_source(
    id: &str,
    source: PolicySource,
    (inline, file): (&'static str, &'static str),
    what: &'static str,
) -> Result<(String, String), Error> {
    match source {
        PolicySource::Inline(text) => Ok((text, format!("annotation {inline} of container {id}"))),
        PolicySource::File(path) => {
            let text = std::fs::read_to_string(&path).map_err(|source| Error::AnnotatedFile {
                id: id.to_string(),
                what,
                annotation: file,
                path: path.clone(),
                source,
            })?;
            Ok((text, path.display().to_string()))
        }
    }
}

/// `--standalone`: compile and apply in this process. The rules stay in the
/// namespace after the hook exits; nothing fills the DNS-derived sets.
fn enforce_directly(
    args: &Args,
    state: &oci::State,
    config: &oci::Config,
    netns: &Path,
    mut policy: policy::Policy,
) -> Result<u8, CliError> {
    let resolvers = match (args.resolvers.is_empty(), policy.mode) {
        (false, _) => args.resolvers.clone(),
        // Unrestricted mode does not restrict DNS: no resolver is needed.
        (true, Mode::Unrestricted) => Vec::new(),
        (true, Mode::Limited) => match container_resolv_conf(state, config) {
            Ok(path) => super::policy_args::configured_resolvers(&[], &path, &mut policy),
            Err(why) => {
                policy.warnings.push(format!(
                    "{why}; DNS from container {} will be blocked (give the hook --resolver IP)",
                    state.id
                ));
                Vec::new()
            }
        },
    };
    let options = CompileOptions {
        resolvers,
        nflog_group: args.nflog_group,
        proxy: None,
    };
    let ruleset = ruleset::compile(&policy, &options);
    if !ruleset.names.is_empty() {
        let names: Vec<String> = ruleset
            .names
            .iter()
            .map(|binding| binding.target.to_string())
            .collect();
        policy.warnings.push(format!(
            "container {}: the hook runs with --standalone, so nothing resolves the policy's {} name(s) \
             into the allow sets and connections to them stay blocked: {}; run `netleash agent` and \
             drop --standalone to allow them",
            state.id,
            names.len(),
            names.join(", ")
        ));
    }
    for warning in &policy.warnings {
        eprintln!("warning: {warning}");
    }
    let enforce_error = |source| Error::Enforce {
        id: state.id.clone(),
        source,
    };
    // This process does nothing else before it exits, so its one thread
    // enters the container's namespace itself (the host's was refused above)
    // and the kernel session opens there without a thread of its own; and it
    // is a session of its own rather than `kernel::apply`. If the apply
    // replaced a table, its socket is closed after the hook has exited
    // (`netns::close_sockets_after_exit`): the runtime does not wait for
    // the kernel to free what was replaced.
    let target = Target::Path(netns.to_path_buf());
    crate::netns::enter_for_good(&target)
        .map_err(|source| enforce_error(kernel::Error::from(source)))?;
    let mut session = kernel::Session::open(&target).map_err(enforce_error)?;
    let report = session.apply(&ruleset).map_err(enforce_error)?;
    if report.method == kernel::Method::Create {
        // A new container's namespace: nothing was replaced, so closing
        // waits for nothing of this hook's.
        drop(session);
    } else {
        session.close_in_background();
    }
    tracing::info!(
        container = %state.id,
        digest = %report.digest,
        rules = report.rules,
        "policy enforced without the agent"
    );
    Ok(EXIT_OK)
}

/// The host file the container will read as /etc/resolv.conf. A file in the
/// root filesystem is only read if it resolves inside that root filesystem:
/// a symlink in an image (`/etc/resolv.conf -> /run/...`) means a path in
/// the container, and followed on the host it would read a host file.
fn container_resolv_conf(state: &oci::State, config: &oci::Config) -> Result<PathBuf, String> {
    let path = oci::resolv_conf(&state.bundle, config)
        .ok_or_else(|| "the bundle configuration names no root filesystem".to_string())?;
    let Some(root) = &config.root else {
        return Ok(path);
    };
    if !path.starts_with(state.bundle.join(&root.path)) {
        // A bind-mount source: a host path by definition.
        return Ok(path);
    }
    let root = state.bundle.join(&root.path);
    match (root.canonicalize(), path.canonicalize()) {
        (Ok(root), Ok(real)) if real.starts_with(&root) => Ok(real),
        (Ok(_), Ok(real)) => Err(format!(
            "{} leads outside the container's root filesystem (to {}), so it is not read",
            path.display(),
            real.display()
        )),
        (_, Err(err)) | (Err(err), _) => Err(format!("cannot read {} ({err})", path.display())),
    }
}

/// What the poststop stage did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forgotten {
    /// `--standalone`: there is no agent to tell.
    Standalone,
    /// The container has no netleash annotation.
    NotOurs,
    /// The agent forgot the container.
    Forgotten,
    /// No agent answers on the socket.
    NoAgent,
    /// The agent did not know the container.
    Unknown,
    /// The agent failed; logged as a warning.
    Failed,
}

/// The poststop work: tell the agent to forget the container. Never fails:
/// the outcome is logged and the hook exits 0.
fn forget(args: &Args, state: &oci::State) -> Forgotten {
    let id = &state.id;
    if args.standalone {
        return Forgotten::Standalone;
    }
    // The state carries the annotations at poststop; the bundle may be gone,
    // and then the agent is asked anyway (an unknown id is harmless).
    let annotated = |annotations: &std::collections::BTreeMap<String, String>| {
        annotations.contains_key(POLICY_ANNOTATION)
            || annotations.contains_key(oci::POLICY_FILE_ANNOTATION)
    };
    let ours = annotated(&state.annotations)
        || oci::read_config(state).map_or(true, |config| annotated(&config.annotations));
    if !ours {
        return Forgotten::NotOurs;
    }
    let request = Request::Delete { id: id.clone() };
    match protocol::call(&args.socket, &request, Duration::from_secs(args.timeout)) {
        Ok(_) => {
            tracing::info!(container = %id, "the agent forgot the container");
            Forgotten::Forgotten
        }
        Err(protocol::Error::Connect { socket, source }) => {
            tracing::info!(
                container = %id,
                socket = %socket.display(),
                error = %source,
                "no agent to tell that the container is gone"
            );
            Forgotten::NoAgent
        }
        Err(protocol::Error::Refused {
            kind: FailureKind::NotFound,
            ..
        }) => {
            tracing::info!(container = %id, "the agent did not know the container");
            Forgotten::Unknown
        }
        Err(err) => {
            tracing::warn!(
                container = %id,
                error = %super::render_error(&err),
                "the agent did not forget the container; its entry stays until the agent cleans up"
            );
            Forgotten::Failed
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        args: Args,
    }

    fn args(argv: &[&str]) -> Args {
        Command::try_parse_from(std::iter::once("netleash").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    /// A bundle in a temporary directory with `annotations` in its config.json.
    fn bundle(annotations: serde_json::Value) -> (tempfile::TempDir, oci::State) {
        let dir = tempfile::tempdir().unwrap();
        let config = serde_json::json!({"ociVersion": "1.0.2", "root": {"path": "rootfs"},
                                        "annotations": annotations});
        std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
        let state = oci::State {
            oci_version: "1.0.2".into(),
            id: "c1".into(),
            status: "created".into(),
            // Our own process: a namespace that must be refused if reached.
            pid: Some(std::process::id()),
            bundle: dir.path().to_path_buf(),
            annotations: Default::default(),
        };
        (dir, state)
    }

    fn enforce_error(args: &Args, state: &oci::State) -> CliError {
        enforce(args, state).expect_err("the hook must refuse")
    }

    #[test]
    fn defaults() {
        let parsed = args(&[]);
        assert_eq!(parsed.stage, Stage::CreateRuntime);
        assert_eq!(parsed.socket, PathBuf::from(protocol::DEFAULT_SOCKET));
        assert!(!parsed.standalone);
        assert_eq!(parsed.timeout, DEFAULT_AGENT_TIMEOUT_SECS);
        let parsed = args(&["--stage", "poststop", "--socket", "/s", "--timeout", "3"]);
        assert_eq!(parsed.stage, Stage::Poststop);
        assert_eq!(parsed.timeout, 3);
    }

    #[test]
    fn no_annotation_means_nothing_to_do() {
        let (_dir, state) = bundle(serde_json::json!({"other": "x"}));
        assert_eq!(enforce(&args(&["--standalone"]), &state).unwrap(), EXIT_OK);
    }

    #[test]
    fn a_bad_inline_policy_names_the_annotation_with_line_and_column() {
        let (_dir, state) = bundle(serde_json::json!({
            "netleash.policy": "{\"type\": \"limited\",\n \"allowed_hosts\": [\"https://x.example:99999\"]}"
        }));
        let err = enforce_error(&args(&["--standalone"]), &state);
        assert_eq!(err.exit_code(), EXIT_INVALID_INPUT);
        let text = super::super::render_error(&err);
        assert!(
            text.starts_with("error: annotation netleash.policy of container c1:2:20:"),
            "{text}"
        );
    }

    #[test]
    fn a_bad_agent_definition_is_named_and_a_missing_one_too() {
        let (_dir, state) = bundle(serde_json::json!({
            "netleash.policy": "{\"type\": \"limited\", \"allow_mcp_servers\": true}",
            "netleash.agent": "{\"mcp_servers\": [{\"type\": \"url\", \"name\": \"d\", \"url\": 7}]}"
        }));
        let err = enforce_error(&args(&["--standalone"]), &state);
        assert_eq!(err.exit_code(), EXIT_INVALID_INPUT);
        let text = super::super::render_error(&err);
        assert!(
            text.starts_with("error: annotation netleash.agent of container c1:1:"),
            "{text}"
        );
        assert!(text.contains("mcp_servers[0].url"), "{text}");

        let (_dir, state) = bundle(serde_json::json!({
            "netleash.policy": "{\"type\": \"limited\", \"allow_mcp_servers\": true}",
            "netleash.agent-file": "/nonexistent/agent.json"
        }));
        let err = enforce_error(&args(&["--standalone"]), &state);
        assert_eq!(err.exit_code(), EXIT_INVALID_INPUT);
        assert_eq!(
            super::super::render_error(&err),
            "error: cannot read agent definition file /nonexistent/agent.json named by annotation \
             netleash.agent-file of container c1\n  caused by: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn a_missing_policy_file_is_named() {
        let (_dir, state) =
            bundle(serde_json::json!({"netleash.policy-file": "/nonexistent/p.json"}));
        let err = enforce_error(&args(&["--standalone"]), &state);
        assert_eq!(err.exit_code(), EXIT_INVALID_INPUT);
        assert_eq!(
            super::super::render_error(&err),
            "error: cannot read policy file /nonexistent/p.json named by annotation \
             netleash.policy-file of container c1\n  caused by: No such file or directory (os error 2)"
        );
    }

    #[test]
    fn the_hooks_own_namespace_is_refused_before_anything_is_applied() {
        let (_dir, state) =
            bundle(serde_json::json!({"netleash.policy": "{\"type\": \"unrestricted\"}"}));
        for argv in [
            &["--standalone"][..],
            &["--socket", "/nonexistent/agent.sock"],
        ] {
            let err = enforce_error(&args(argv), &state);
            assert_eq!(err.exit_code(), EXIT_INVALID_INPUT);
            assert!(
                super::super::render_error(&err).contains("would firewall the host"),
                "{err}"
            );
        }
    }

    #[test]
    fn poststop_never_fails_and_skips_containers_that_are_not_ours() {
        let poststop = args(&["--stage", "poststop", "--socket", "/nonexistent/agent.sock"]);
        let (_dir, state) = bundle(serde_json::json!({"netleash.policy": "{}"}));
        assert_eq!(forget(&poststop, &state), Forgotten::NoAgent);
        let (_dir, state) = bundle(serde_json::json!({"other": "x"}));
        assert_eq!(forget(&poststop, &state), Forgotten::NotOurs);
        let (_dir, state) = bundle(serde_json::json!({"netleash.policy": "{}"}));
        let standalone = args(&["--stage", "poststop", "--standalone"]);
        assert_eq!(forget(&standalone, &state), Forgotten::Standalone);
    }

    #[test]
    fn a_state_that_does_not_parse_stops_creation_but_not_removal() {
        let not_state = || Ok("{\"id\": \"c1\"}".to_string());
        let err = run_with_state(&args(&["--standalone"]), not_state()).unwrap_err();
        assert_eq!(err.exit_code(), EXIT_INVALID_INPUT);
        assert!(
            super::super::render_error(&err).contains("missing field `ociVersion`"),
            "{err}"
        );
        let poststop = args(&["--stage", "poststop", "--socket", "/nonexistent/agent.sock"]);
        assert_eq!(run_with_state(&poststop, not_state()).unwrap(), EXIT_OK);
        let unreadable = Err(Error::ReadState(std::io::Error::other("EIO")));
        assert_eq!(run_with_state(&poststop, unreadable).unwrap(), EXIT_OK);
    }

    #[test]
    fn poststop_asks_a_live_agent_and_accepts_an_unknown_id() {
        use std::io::{BufRead as _, BufReader, Write as _};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        let server = std::thread::spawn(move || {
            let mut requests = Vec::new();
            for reply in [
                r#"{"status":"ok","reply":{"deleted":{"id":"c1"}}}"#,
                r#"{"status":"error","kind":"not_found","message":"no sandbox","causes":[]}"#,
            ] {
                let (stream, _) = listener.accept().unwrap();
                let mut line = String::new();
                BufReader::new(&stream).read_line(&mut line).unwrap();
                requests.push(serde_json::from_str::<Request>(line.trim_end()).unwrap());
                (&stream)
                    .write_all(format!("{reply}\n").as_bytes())
                    .unwrap();
            }
            requests
        });
        let socket = socket.display().to_string();
        let poststop = args(&["--stage", "poststop", "--socket", &socket]);
        let (_dir, state) = bundle(serde_json::json!({"netleash.policy": "{}"}));
        assert_eq!(forget(&poststop, &state), Forgotten::Forgotten);
        assert_eq!(forget(&poststop, &state), Forgotten::Unknown);
        assert_eq!(
            server.join().unwrap(),
            [
                Request::Delete { id: "c1".into() },
                Request::Delete { id: "c1".into() }
            ]
        );
    }

    #[test]
    fn resolv_conf_outside_the_root_filesystem_is_not_read() {
        let (dir, state) = bundle(serde_json::json!({}));
        let etc = dir.path().join("rootfs/etc");
        std::fs::create_dir_all(&etc).unwrap();
        let config = oci::read_config(&state).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", etc.join("resolv.conf")).unwrap();
        let why = container_resolv_conf(&state, &config).unwrap_err();
        assert!(
            why.contains("leads outside the container's root filesystem"),
            "{why}"
        );
        std::fs::remove_file(etc.join("resolv.conf")).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 192.0.2.53\n").unwrap();
        let path = container_resolv_conf(&state, &config).unwrap();
        assert!(
            path.ends_with("rootfs/etc/resolv.conf"),
            "{}",
            path.display()
        );
    }
}
