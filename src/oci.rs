//! What an OCI runtime hook learns about its container: the state on
//! standard input, the bundle's `config.json`, the policy annotations, and
//! the container's network namespace.
//!
//! Only the fields netleash needs are read; every other field of the
//! runtime-spec documents is ignored, so newer runtimes keep working.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The annotation that carries the policy document itself (JSON text).
pub const POLICY_ANNOTATION: &str = "netleash.policy";
/// The annotation that names a policy file on the host.
pub const POLICY_FILE_ANNOTATION: &str = "netleash.policy-file";
/// The annotation that carries the container's agent definition (JSON text,
/// Claude Managed Agents' shape), whose `mcp_servers` a policy with
/// `"allow_mcp_servers": true` allows.
pub const AGENT_ANNOTATION: &str = "netleash.agent";
/// The annotation that names an agent definition file on the host.
pub const AGENT_FILE_ANNOTATION: &str = "netleash.agent-file";

/// The state of a container (runtime-spec `state.md`), as the runtime
/// writes it to a hook's standard input.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub oci_version: String,
    pub id: String,
    pub status: String,
    /// The container's init process, as seen from the runtime's PID
    /// namespace. REQUIRED by the spec while the container is `created` or
    /// `running`; absent or 0 once it has stopped.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The absolute path of the bundle (the directory with config.json).
    pub bundle: PathBuf,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

impl State {
    /// The init process's PID, when the container has one.
    pub fn live_pid(&self) -> Option<u32> {
        self.pid.filter(|&pid| pid != 0)
    }
}

/// The parts of a bundle's `config.json` (runtime-spec `config.md`) a hook reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
    #[serde(default)]
    pub root: Option<Root>,
    #[serde(default)]
    pub mounts: Vec<Mount>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Root {
    /// The root filesystem: absolute, or relative to the bundle.
    pub path: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Mount {
    pub destination: PathBuf,
    /// For a bind mount, a host path: absolute, or relative to the bundle.
    #[serde(default)]
    pub source: Option<PathBuf>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub options: Vec<String>,
}

impl Mount {
    fn is_bind(&self) -> bool {
        self.kind.as_deref() == Some("bind")
            || self.options.iter().any(|o| o == "bind" || o == "rbind")
    }
}

/// Where a container's policy (or agent definition) comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicySource {
    /// `netleash.policy` (`netleash.agent`): the JSON document itself.
    Inline(String),
    /// `netleash.policy-file` (`netleash.agent-file`): a file on the host.
    File(PathBuf),
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "the container state on standard input is not an OCI state document \
         (run `netleash hook` as an OCI runtime hook, which gets the state from the runtime)"
    )]
    State(#[source] serde_json::Error),
    #[error("cannot read the bundle configuration {path} of container {id}")]
    ReadConfig {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the bundle configuration {path} of container {id} is not valid")]
    Config {
        id: String,
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("container {id} has both annotations {inline} and {file}; give exactly one of them")]
    BothAnnotations {
        id: String,
        inline: &'static str,
        file: &'static str,
    },
    #[error(
        "annotation {annotation} of container {id} is empty; give the path of {what} on the host"
    )]
    EmptyFileAnnotation {
        id: String,
        annotation: &'static str,
        what: &'static str,
    },
    #[error(
        "container {id} has no process in state {status:?}, so its network namespace cannot be found; \
         run the hook at the createRuntime (or prestart) stage"
    )]
    NoPid { id: String, status: String },
    #[error("cannot find the network namespace of container {id} ({path})")]
    Namespace {
        id: String,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "container {id} has no network namespace of its own: it shares the host's (the hook's) \
         network namespace, and enforcing its policy there would firewall the host. Give the \
         container a network namespace (config.json linux.namespaces: {{\"type\": \"network\"}}; \
         not `--network host`), or remove its {POLICY_ANNOTATION} annotation"
    )]
    SharesHostNamespace { id: String },
}

impl Error {
    /// Whether the error is in the input (state, bundle, annotations) rather
    /// than the system.
    pub fn is_invalid_input(&self) -> bool {
        !matches!(self, Error::Namespace { .. })
    }
}

/// Parse the state document a runtime writes to a hook's standard input.
pub fn parse_state(text: &str) -> Result<State, Error> {
    serde_json::from_str(text).map_err(Error::State)
}

/// Read and parse `config.json` in the bundle of container `state`.
pub fn read_config(state: &State) -> Result<Config, Error> {
    let path = state.bundle.join("config.json");
    let text = fs::read_to_string(&path).map_err(|source| Error::ReadConfig {
        id: state.id.clone(),
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| Error::Config {
        id: state.id.clone(),
        path,
        source,
    })
}

/// The policy source the annotations name: `None` when neither annotation
/// is present (the container is not netleash's business).
pub fn policy_source(
    id: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<PolicySource>, Error> {
    annotated_source(
        id,
        annotations,
        (POLICY_ANNOTATION, POLICY_FILE_ANNOTATION),
        "a policy file",
    )
}

/// The agent definition the annotations name, if any: its MCP servers are
/// the hosts `"allow_mcp_servers": true` allows.
pub fn agent_source(
    id: &str,
    annotations: &BTreeMap<String, String>,
) -> Result<Option<PolicySource>, Error> {
    annotated_source(
        id,
        annotations,
        (AGENT_ANNOTATION, AGENT_FILE_ANNOTATION),
        "an agent definition file",
    )
}

/// A document given inline by one annotation or as a host file by the
/// other; both at once is an error, and so is an empty file annotation.
fn annotated_source(
    id: &str,
    annotations: &BTreeMap<String, String>,
    (inline, file): (&'static str, &'static str),
    what: &'static str,
) -> Result<Option<PolicySource>, Error> {
    match (annotations.get(inline), annotations.get(file)) {
        (None, None) => Ok(None),
        (Some(_), Some(_)) => Err(Error::BothAnnotations {
            id: id.into(),
            inline,
            file,
        }),
        (Some(text), None) => Ok(Some(PolicySource::Inline(text.clone()))),
        (None, Some(path)) if path.trim().is_empty() => Err(Error::EmptyFileAnnotation {
            id: id.into(),
            annotation: file,
            what,
        }),
        (None, Some(path)) => Ok(Some(PolicySource::File(PathBuf::from(path)))),
    }
}

/// The host path of the file the container will see as /etc/resolv.conf:
/// the source of a bind mount onto it (podman and CRI-O bind one), else the
/// file in the root filesystem. Relative paths are relative to the bundle.
pub fn resolv_conf(bundle: &Path, config: &Config) -> Option<PathBuf> {
    let in_bundle = |path: &Path| bundle.join(path);
    // The last mount onto a destination is the one the container sees.
    let bound = config
        .mounts
        .iter()
        .rev()
        .find(|mount| mount.destination == Path::new("/etc/resolv.conf") && mount.is_bind());
    match bound {
        Some(mount) => mount.source.as_deref().map(in_bundle),
        None => config
            .root
            .as_ref()
            .map(|root| in_bundle(&root.path).join("etc/resolv.conf")),
    }
}

/// The network namespace file of container `state`'s init process, after
/// checking that it is not the caller's own: a container without a network
/// namespace of its own (runc with no `network` namespace entry, podman
/// `--network host`) shares the runtime's, which is the host's, and a
/// policy enforced there would confine the whole host.
///
/// Two namespace files name the same namespace exactly when their device
/// and inode numbers are equal (namespaces(7), "The /proc/[pid]/ns/ directory").
pub fn container_netns(state: &State) -> Result<PathBuf, Error> {
    let pid = state.live_pid().ok_or_else(|| Error::NoPid {
        id: state.id.clone(),
        status: state.status.clone(),
    })?;
    let path = PathBuf::from(format!("/proc/{pid}/ns/net"));
    let identity = |path: &Path| {
        fs::metadata(path)
            .map(|meta| (meta.dev(), meta.ino()))
            .map_err(|source| Error::Namespace {
                id: state.id.clone(),
                path: path.to_path_buf(),
                source,
            })
    };
    let container = identity(&path)?;
    let own = identity(Path::new("/proc/self/ns/net"))?;
    if container == own {
        return Err(Error::SharesHostNamespace {
            id: state.id.clone(),
        });
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATE: &str = r#"{"ociVersion": "1.0.2", "id": "web-1", "status": "created",
        "pid": 4242, "bundle": "/run/bundles/web-1",
        "annotations": {"netleash.policy": "{}"}, "newField": true}"#;

    #[test]
    fn state_parses_and_tolerates_new_fields() {
        let state = parse_state(STATE).unwrap();
        assert_eq!(state.id, "web-1");
        assert_eq!(state.live_pid(), Some(4242));
        assert_eq!(state.bundle, PathBuf::from("/run/bundles/web-1"));
        assert_eq!(state.annotations["netleash.policy"], "{}");

        let stopped = parse_state(
            r#"{"ociVersion": "1.0.2", "id": "x", "status": "stopped", "pid": 0, "bundle": "/b"}"#,
        )
        .unwrap();
        assert_eq!(stopped.live_pid(), None);
        let err = container_netns(&stopped).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("container x has no process in state \"stopped\""),
            "{err}"
        );

        let err = parse_state(r#"{"id": "x"}"#).unwrap_err();
        assert!(
            matches!(&err, Error::State(source) if source.to_string().contains("missing field `ociVersion`")),
            "{err:?}"
        );
    }

    #[test]
    fn annotations_name_one_policy_source() {
        let annotations = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(
            policy_source("c", &annotations(&[("other", "x")])).unwrap(),
            None
        );
        assert_eq!(
            policy_source("c", &annotations(&[(POLICY_ANNOTATION, "{\"type\": 1}")])).unwrap(),
            Some(PolicySource::Inline("{\"type\": 1}".into()))
        );
        assert_eq!(
            policy_source(
                "c",
                &annotations(&[(POLICY_FILE_ANNOTATION, "/etc/p.json")])
            )
            .unwrap(),
            Some(PolicySource::File("/etc/p.json".into()))
        );
        let err = policy_source(
            "c",
            &annotations(&[(POLICY_ANNOTATION, "{}"), (POLICY_FILE_ANNOTATION, "/p")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "container c has both annotations netleash.policy and netleash.policy-file; give exactly one of them"
        );
        let err = policy_source("c", &annotations(&[(POLICY_FILE_ANNOTATION, " ")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation netleash.policy-file of container c is empty; give the path of a policy file on the host"
        );

        // The agent definition: the same rules under its own two keys, and
        // independent of the policy's.
        let both = annotations(&[
            (POLICY_ANNOTATION, "{}"),
            (AGENT_FILE_ANNOTATION, "/etc/agent.json"),
        ]);
        assert_eq!(
            agent_source("c", &both).unwrap(),
            Some(PolicySource::File("/etc/agent.json".into()))
        );
        assert_eq!(
            agent_source("c", &annotations(&[(POLICY_ANNOTATION, "{}")])).unwrap(),
            None
        );
        let err = agent_source(
            "c",
            &annotations(&[(AGENT_ANNOTATION, "{}"), (AGENT_FILE_ANNOTATION, "/a")]),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "container c has both annotations netleash.agent and netleash.agent-file; give exactly one of them"
        );
        let err = agent_source("c", &annotations(&[(AGENT_FILE_ANNOTATION, "")])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "annotation netleash.agent-file of container c is empty; give the path of an agent definition file on the host"
        );
    }

    #[test]
    fn resolv_conf_follows_a_bind_mount_else_the_root_filesystem() {
        let config: Config = serde_json::from_str(
            r#"{"root": {"path": "rootfs", "readonly": true},
                "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}]}"#,
        )
        .unwrap();
        assert_eq!(
            resolv_conf(Path::new("/b"), &config),
            Some(PathBuf::from("/b/rootfs/etc/resolv.conf"))
        );
        let config: Config = serde_json::from_str(
            r#"{"root": {"path": "/var/lib/c/root"},
                "mounts": [{"destination": "/etc/resolv.conf", "type": "bind",
                            "source": "/run/c/resolv.conf", "options": ["rbind", "ro"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            resolv_conf(Path::new("/b"), &config),
            Some(PathBuf::from("/run/c/resolv.conf"))
        );
        // A bind mount given only by its options, with a bundle-relative source.
        let config: Config = serde_json::from_str(
            r#"{"mounts": [{"destination": "/etc/resolv.conf", "source": "resolv.conf", "options": ["bind"]}]}"#,
        )
        .unwrap();
        assert_eq!(
            resolv_conf(Path::new("/b"), &config),
            Some(PathBuf::from("/b/resolv.conf"))
        );
        assert_eq!(resolv_conf(Path::new("/b"), &Config::default()), None);
    }

    #[test]
    fn a_process_in_our_own_namespace_is_refused() {
        let state = State {
            oci_version: "1.0.2".into(),
            id: "hostnet".into(),
            status: "created".into(),
            pid: Some(std::process::id()),
            bundle: "/b".into(),
            annotations: BTreeMap::new(),
        };
        let err = container_netns(&state).unwrap_err();
        assert!(matches!(err, Error::SharesHostNamespace { .. }), "{err:?}");
        assert!(err.to_string().contains("would firewall the host"), "{err}");
    }
}
