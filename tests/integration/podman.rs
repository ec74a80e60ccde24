//! The shipped OCI hooks.d entries (`deploy/hooks.d/`) with a real podman:
//! podman reads them with `--hooks-dir`, matches the annotation, runs
//! `netleash hook` at createRuntime and poststop, and the real
//! `netleash agent` enforces the container's policy in the testbed's sandbox
//! namespace. The container's root filesystem is a busybox directory
//! (`--rootfs`), so no image and no registry is involved. Privileged: fails
//! when not root or when podman is missing.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

use crate::agent::Agent;
use crate::oci::{arrivals, assert_only_10_answered, body, fetch_script, listed_sandboxes, stdout};
use crate::runc::{Bundle, MARKER_DIR};
use crate::support::{self, describe};
use netleash::testbed::{self, Testbed};

/// The testbed world's DNS server, given to podman as the container's
/// nameserver (`--dns`), so nothing the container resolves leaves the testbed.
const NAMESERVER: &str = "198.51.100.53";
static NEXT: AtomicU32 = AtomicU32::new(0);
const HOOK_FILES: [&str; 2] = ["50-netleash.json", "50-netleash-poststop.json"];

/// podman with its own storage, run state and hooks directory under a
/// temporary directory, so a test touches none of the host's containers.
struct Podman {
    dir: tempfile::TempDir,
}

impl Podman {
    /// A podman whose hooks directory holds the shipped hooks.d entries with
    /// two changes a test needs: the hook's path is the netleash binary under
    /// test, and `--socket` points it at the test's agent. Everything else
    /// (the annotation filter, the stages, the arguments) is the shipped file.
    fn with_shipped_hooks(agent_socket: &Path) -> Podman {
        support::require_root();
        let version = Command::new("podman").arg("--version").output();
        assert!(
            matches!(&version, Ok(out) if out.status.success()),
            "podman is missing: install Debian's podman (tests/bootstrap.sh does): {version:?}"
        );
        let dir = tempfile::tempdir().expect("podman tempdir");
        let hooks = dir.path().join("hooks.d");
        std::fs::create_dir_all(&hooks).expect("hooks directory");
        let shipped_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/hooks.d");
        for file in HOOK_FILES {
            let shipped: Value = serde_json::from_str(
                &std::fs::read_to_string(shipped_dir.join(file)).expect("read the shipped hook"),
            )
            .expect("the shipped hook is JSON");
            let mut entry = shipped.clone();
            entry["hook"]["path"] = json!(env!("CARGO_BIN_EXE_netleash"));
            entry["hook"]["args"]
                .as_array_mut()
                .expect("the shipped hook has args")
                .extend([json!("--socket"), json!(agent_socket)]);
            assert_eq!(entry["when"], shipped["when"]);
            assert_eq!(entry["stages"], shipped["stages"]);
            std::fs::write(hooks.join(file), entry.to_string()).expect("write the hook entry");
        }
        Podman { dir }
    }

    fn command(&self) -> Command {
        let mut command = Command::new("podman");
        command
            .arg("--root")
            .arg(self.dir.path().join("storage"))
            .arg("--runroot")
            .arg(self.dir.path().join("run"))
            .arg("--hooks-dir")
            .arg(self.dir.path().join("hooks.d"))
            // No systemd on a CI machine: plain cgroupfs and a file for events.
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "file"]);
        command
    }

    /// `podman run` of `script` in a busybox root filesystem, in the
    /// namespace at `netns`, with `annotations`; then `podman rm`, which runs
    /// the poststop hooks. (Not `run --rm`: podman 4.3 without systemd can
    /// lose the exit code when the cleanup process removes the container
    /// first.) podman's default rlimits are above what some machines allow,
    /// so they are set to values any machine grants.
    fn run(
        &self,
        rootfs: &Path,
        netns: &Path,
        annotations: &[(&str, &str)],
        script: &str,
    ) -> Output {
        let name = format!(
            "netleash-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        );
        let mut command = self.command();
        command
            .args(["run", "--name", &name, "--ulimit", "nofile=1024:1024"])
            .args(["--ulimit", "nproc=1024:1024", "--dns", NAMESERVER])
            .arg(format!("--network=ns:{}", netns.display()))
            .arg("--volume")
            .arg(format!(
                "{}:{MARKER_DIR}",
                rootfs.with_file_name("marker").display()
            ));
        for (key, value) in annotations {
            command
                .arg("--annotation")
                .arg(csv_field(&format!("{key}={value}")));
        }
        command
            .arg("--rootfs")
            .arg(rootfs)
            .args(["sh", "-c", script]);
        let output = command
            .output()
            .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
        let removed = self.command().args(["rm", "--force", &name]).output();
        assert!(
            matches!(&removed, Ok(out) if out.status.success()),
            "podman rm {name}: {removed:?}"
        );
        output
    }
}

/// podman splits `--annotation` values as CSV (so a JSON policy's commas
/// and quotes break it): one CSV field, quoted, with its quotes doubled
/// (RFC 4180 §2), is read back as the text itself. docs/deployment.md
/// tells users the same.
fn csv_field(text: &str) -> String {
    format!("\"{}\"", text.replace('"', "\"\""))
}

impl Drop for Podman {
    fn drop(&mut self) {
        // The containers are removed; this unmounts podman's run state so
        // the temporary directory can go. Failures are reported, not fatal.
        let out = self.command().args(["system", "reset", "--force"]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("podman system reset: {out:?}");
        }
    }
}

fn rootfs(bundle: &Bundle) -> PathBuf {
    bundle.path().join("rootfs")
}

fn sandbox_netns(bed: &Testbed) -> PathBuf {
    testbed::netns_path(bed.sandbox())
}

#[test]
fn podman_runs_the_shipped_hooks_and_the_agent_enforces_the_annotated_policy() {
    let bed = support::testbed();
    bed.zone().set(
        "allowed.test",
        &[testbed::ZoneRecord::A("198.51.100.10".parse().unwrap())],
        300,
    );
    bed.zone().set(
        "mcp.test",
        &[testbed::ZoneRecord::A("203.0.113.20".parse().unwrap())],
        300,
    );
    let dir = tempfile::tempdir().expect("agent tempdir");
    // The reaper would also forget the sandbox once its container is gone;
    // an hour keeps it out of the way, so only the poststop hook can.
    let agent = Agent::start_with(&bed, dir.path(), &["--reap-interval", "60m"]);
    let socket = agent.socket.to_str().expect("a UTF-8 path").to_string();
    let podman = Podman::with_shipped_hooks(&agent.socket);
    let bundle = Bundle::new("");

    // By name: nslookup goes to the container's nameserver, which the policy
    // redirects to the agent's proxy; then fetches from the allowed host and
    // the agent definition's MCP server, which must pass, and one that must
    // be rejected at once (nc reports the reset as "refused").
    let script = format!(
        "nslookup -type=a allowed.test; nslookup -type=a mcp.test; {}",
        fetch_script(&["198.51.100.10", "203.0.113.20", "198.51.100.11"])
    );
    let before = arrivals(&bed, "198.51.100.11");
    let output = podman.run(
        &rootfs(&bundle),
        &sandbox_netns(&bed),
        &[
            (
                "netleash.policy",
                r#"{"type": "limited", "allowed_hosts": ["http://allowed.test"], "allow_mcp_servers": true}"#,
            ),
            (
                "netleash.agent",
                r#"{"mcp_servers": [{"type": "url", "name": "tools", "url": "http://mcp.test/mcp"}]}"#,
            ),
        ],
        &script,
    );
    assert!(
        output.status.success(),
        "podman run: {}\n{}",
        describe(&output),
        agent.logs()
    );
    let out = stdout(&output);
    assert!(
        out.contains("Name:\tallowed.test\nAddress: 198.51.100.10"),
        "the allowed name did not resolve through the agent's proxy: {}",
        describe(&output)
    );
    assert_only_10_answered(&bed, &output, before);
    assert!(
        out.contains(&body("203.0.113.20")),
        "the agent definition's MCP server was not reachable: {}",
        describe(&output)
    );
    assert!(
        bundle.marker_dir().join("ran").exists(),
        "the workload did not run"
    );
    assert!(
        agent.logs().contains("applied the policy"),
        "the agent never received the container: {}",
        agent.logs()
    );
    // podman ran the poststop entry when it removed the container.
    let listed = listed_sandboxes(&socket);
    assert!(
        listed.is_empty(),
        "the agent still enforces {listed:?} after the container is gone\n{}",
        agent.logs()
    );
}

#[test]
fn podman_leaves_a_container_without_the_annotation_untouched() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().expect("agent tempdir");
    let agent = Agent::start_with(&bed, dir.path(), &["--reap-interval", "60m"]);
    let socket = agent.socket.to_str().expect("a UTF-8 path").to_string();
    let podman = Podman::with_shipped_hooks(&agent.socket);
    let bundle = Bundle::new("");

    let output = podman.run(
        &rootfs(&bundle),
        &sandbox_netns(&bed),
        &[("org.example.other", "1")],
        &fetch_script(&["198.51.100.11"]),
    );
    assert!(output.status.success(), "podman run: {}", describe(&output));
    assert!(
        stdout(&output).contains(&body("198.51.100.11")),
        "an unannotated container lost its network: {}",
        describe(&output)
    );
    assert_eq!(
        support::netleash_table(bed.sandbox()),
        None,
        "a table appeared in the namespace of an unannotated container"
    );
    assert!(listed_sandboxes(&socket).is_empty());
    assert!(
        !agent.logs().contains("applied the policy"),
        "the hook ran for a container without the annotation: {}",
        agent.logs()
    );
}
