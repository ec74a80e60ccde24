//! OCI bundles with a busybox root filesystem, run with the real `runc`
//! (Debian packages `runc` and `busybox-static`). Shared by the OCI hook
//! tests and the hook-overhead benchmark (`benches/oci_hook.rs`).
//!
//! Every container runs under a private runc state directory (`runc --root`)
//! and is deleted (`runc delete -f`) when its [`Container`] is dropped, so a
//! failing test leaves nothing behind in the host's runc state.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::{Value, json};

/// The statically linked busybox of Debian's `busybox-static`.
pub const BUSYBOX: &str = "/bin/busybox";
/// The applets the containers call, as symlinks to busybox.
const APPLETS: [&str; 6] = ["sh", "true", "nc", "touch", "sleep", "nslookup"];
/// Where a bundle's marker directory is bind-mounted in the container.
pub const MARKER_DIR: &str = "/marker";

static NEXT_CONTAINER: AtomicU32 = AtomicU32::new(0);

/// The container's network namespace.
#[derive(Debug, Clone)]
pub enum Network {
    /// Join an existing namespace file (e.g. /run/netns/NAME).
    Join(PathBuf),
    /// A fresh, empty namespace that runc creates (the benchmark's case).
    #[allow(dead_code)]
    Fresh,
    /// No network namespace entry: the container shares runc's (the host's).
    Host,
}

/// A bundle directory: `rootfs/` with busybox, a marker directory on the
/// host, and a `config.json` written by [`Bundle::configure`].
pub struct Bundle {
    dir: tempfile::TempDir,
}

impl Bundle {
    /// A bundle whose container reads `resolv_conf` as /etc/resolv.conf.
    pub fn new(resolv_conf: &str) -> Bundle {
        assert!(
            Path::new(BUSYBOX).exists(),
            "{BUSYBOX} is missing: install Debian's busybox-static (tests/bootstrap.sh does)"
        );
        let dir = tempfile::tempdir().expect("bundle tempdir");
        let rootfs = dir.path().join("rootfs");
        for sub in ["bin", "etc", "proc", "dev", "sys", "tmp", "marker"] {
            std::fs::create_dir_all(rootfs.join(sub)).expect("rootfs directories");
        }
        std::fs::create_dir_all(dir.path().join("marker")).expect("marker directory");
        std::fs::copy(BUSYBOX, rootfs.join("bin/busybox")).expect("copy busybox");
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", rootfs.join("bin").join(applet))
                .expect("applet symlink");
        }
        std::fs::write(rootfs.join("etc/resolv.conf"), resolv_conf).expect("resolv.conf");
        Bundle { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The host directory the container sees at [`MARKER_DIR`].
    pub fn marker_dir(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// Write config.json: `runc spec`'s default, with `args` as the process,
    /// `network` as its network namespace, `annotations`, the marker bind
    /// mount and, when given, a createRuntime hook running the netleash
    /// binary with `hook_args` after `hook`.
    pub fn configure(
        &self,
        args: &[&str],
        network: &Network,
        annotations: &[(&str, &str)],
        hook_args: Option<&[&str]>,
    ) {
        let config_path = self.path().join("config.json");
        let _ = std::fs::remove_file(&config_path);
        let spec = Command::new("runc")
            .args(["spec", "--bundle"])
            .arg(self.path())
            .output()
            .expect("run `runc spec` (install Debian's runc; tests/bootstrap.sh does)");
        assert!(spec.status.success(), "runc spec: {spec:?}");
        let mut config = self.read_config();

        config["process"]["terminal"] = json!(false);
        config["process"]["args"] = json!(args);
        config["hostname"] = json!("netleash-test");
        let namespaces = config["linux"]["namespaces"]
            .as_array_mut()
            .expect("runc spec lists namespaces");
        namespaces.retain(|ns| ns["type"] != "network");
        match network {
            Network::Join(path) => namespaces.push(json!({"type": "network", "path": path})),
            Network::Fresh => namespaces.push(json!({"type": "network"})),
            Network::Host => {}
        }
        config["mounts"]
            .as_array_mut()
            .expect("runc spec lists mounts")
            .push(json!({"destination": MARKER_DIR, "type": "bind",
                         "source": self.marker_dir(), "options": ["rbind", "rw"]}));
        let annotations: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(key, value)| (key.to_string(), json!(value)))
            .collect();
        config["annotations"] = Value::Object(annotations);
        self.write_config(&config);
        if let Some(hook_args) = hook_args {
            let mut argv = vec!["netleash", "hook"];
            argv.extend_from_slice(hook_args);
            self.set_create_runtime_hook(env!("CARGO_BIN_EXE_netleash"), &argv);
        }
    }

    /// Make `path` with arguments `argv` (argv[0] first) the bundle's one
    /// createRuntime hook.
    pub fn set_create_runtime_hook(&self, path: &str, argv: &[&str]) {
        let mut config = self.read_config();
        config["hooks"] = json!({"createRuntime": [{"path": path, "args": argv, "timeout": 30}]});
        self.write_config(&config);
    }

    /// Make `path` with arguments `argv` (argv[0] first) the bundle's one
    /// poststop hook, which runc runs when it deletes the container.
    pub fn set_poststop_hook(&self, path: &str, argv: &[&str]) {
        let mut config = self.read_config();
        config["hooks"]["poststop"] = json!([{"path": path, "args": argv, "timeout": 30}]);
        self.write_config(&config);
    }

    fn read_config(&self) -> Value {
        let text =
            std::fs::read_to_string(self.path().join("config.json")).expect("read config.json");
        serde_json::from_str(&text).expect("config.json is JSON")
    }

    fn write_config(&self, config: &Value) {
        let text = serde_json::to_string_pretty(config).expect("serialize config.json");
        std::fs::write(self.path().join("config.json"), text).expect("write config.json");
    }

    /// `runc run` the bundle in the foreground as a new container and wait
    /// for it; the container is deleted when the returned guard drops.
    pub fn run(&self) -> (Container, Output) {
        let container = Container::new();
        let output = container
            .runc()
            .args(["run", "--bundle"])
            .arg(self.path())
            .arg(&container.id)
            .stdin(Stdio::null())
            .output()
            .expect("run `runc run`");
        (container, output)
    }

    /// `runc run -d`: start the bundle as a new container that keeps
    /// running; returns runc's output once the container runs (its
    /// createRuntime hooks have run by then) or runc failed. The container's
    /// standard output and error go to files in the bundle, since it would
    /// hold pipes open and `runc` waits for nothing else.
    pub fn run_detached(&self) -> (Container, Output) {
        let container = Container::new();
        let out = self.path().join("runc.out");
        let err = self.path().join("runc.err");
        let file = |path: &Path| std::fs::File::create(path).expect("create a runc output file");
        let status = container
            .runc()
            .args(["run", "--detach", "--bundle"])
            .arg(self.path())
            .arg(&container.id)
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            .status()
            .expect("run `runc run --detach`");
        let read = |path: &Path| std::fs::read(path).expect("read a runc output file");
        let output = Output {
            status,
            stdout: read(&out),
            stderr: read(&err),
        };
        (container, output)
    }
}

/// A container id with a private runc state directory; `runc delete -f` on drop.
pub struct Container {
    pub id: String,
    state_root: tempfile::TempDir,
}

impl Container {
    fn new() -> Container {
        let id = format!(
            "netleash-test-{}-{}",
            std::process::id(),
            NEXT_CONTAINER.fetch_add(1, Ordering::Relaxed)
        );
        Container {
            id,
            state_root: tempfile::tempdir().expect("runc state tempdir"),
        }
    }

    /// A `runc` command with the container's private state directory.
    fn runc(&self) -> Command {
        let mut command = Command::new("runc");
        command.arg("--root").arg(self.state_root.path());
        command
    }

    /// `runc exec` `args` in the running container and wait for it.
    pub fn exec(&self, args: &[&str]) -> Output {
        self.runc()
            .arg("exec")
            .arg(&self.id)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run `runc exec`")
    }

    /// `runc delete -f`: kill the container and delete it, running its
    /// poststop hooks.
    pub fn delete(&self) -> Output {
        self.runc()
            .args(["delete", "-f", &self.id])
            .stdin(Stdio::null())
            .output()
            .expect("run `runc delete`")
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // Quietly: after a successful `runc run` the container is already
        // gone and delete says so.
        let _ = self
            .runc()
            .args(["delete", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
