//! `netleash agent` end to end: the agent runs inside the testbed's world
//! namespace (so its upstream, the world's DNS server at 198.51.100.53, is
//! reachable from its own namespace), each test with its own socket and
//! state directory in a tempdir; sandboxes are the testbed's sandbox and
//! extra namespaces the test creates. Real packets judge it. Privileged:
//! every test fails (never skips) without root.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use netleash::agent::protocol::{
    self, AgentDefinition, FailureKind, Put, Reply, ReplyWhen, Request, SandboxStatus,
};
use netleash::denial_log::DENIED_MESSAGE;
use netleash::kernel::nflog::NflogListener;
use netleash::netns::Target;
use netleash::policy::DEFAULT_NFLOG_GROUP;
use netleash::testbed::{self, DnsReply, Testbed, Transport, Verdict, ZoneRecord};

use crate::support::{
    self, LineMissing, LoggedChild, TIMEOUT, addr, assert_reachable, assert_rejected, describe,
    netleash, netleash_table, write_policy,
};

const READY_WITHIN: Duration = Duration::from_secs(20);
const UPSTREAM: &str = "198.51.100.53";
/// Nothing serves DNS here; a query sent there is answered only if it is
/// redirected to the sandbox's proxy.
const NOT_A_RESOLVER: &str = "203.0.113.5";
const CALL: Duration = Duration::from_secs(60);

/// A running `netleash agent` in the world namespace, killed on drop.
pub(crate) struct Agent {
    process: LoggedChild,
    pub(crate) socket: PathBuf,
    metrics: SocketAddr,
}

impl Agent {
    fn start(bed: &Testbed, dir: &Path) -> Agent {
        Agent::start_with(bed, dir, &[])
    }

    /// An agent with its socket (`run/agent.sock`) and state directory
    /// (`state`) under `dir`, and the `extra` flags. It looks for sandboxes
    /// whose namespace is gone every 200 ms unless `extra` has its own
    /// `--reap-interval`.
    pub(crate) fn start_with(bed: &Testbed, dir: &Path, extra: &[&str]) -> Agent {
        support::require_root();
        let socket = dir.join("run/agent.sock");
        let state = dir.join("state");
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", bed.world(), env!("CARGO_BIN_EXE_netleash")])
            .args(["agent", "--socket"])
            .arg(&socket)
            .arg("--state-dir")
            .arg(&state)
            .args(["--upstream", UPSTREAM, "--metrics", "127.0.0.1:0"])
            .args(if extra.contains(&"--reap-interval") {
                &[][..]
            } else {
                &["--reap-interval", "200ms"][..]
            })
            .args(["--log", "netleash=debug"])
            .args(extra);
        let mut agent = Agent {
            process: LoggedChild::spawn(command, "agent"),
            socket,
            metrics: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let ready = agent.wait_for_line("ready:");
        agent.metrics = ready
            .split("metrics on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|at| at.parse().ok())
            .unwrap_or_else(|| panic!("no metrics address in {ready:?}"));
        agent
    }

    pub(crate) fn wait_for_line(&mut self, needle: &str) -> String {
        match self.process.wait_for_line(needle, READY_WITHIN) {
            Ok(line) => line,
            Err(LineMissing::Exited(status)) => {
                panic!("the agent exited with {status}\n{}", self.logs())
            }
            Err(LineMissing::TimedOut) => panic!(
                "no {needle:?} line within {READY_WITHIN:?}\n{}",
                self.logs()
            ),
        }
    }

    pub(crate) fn logs(&self) -> String {
        self.process.logs()
    }

    fn call(&self, request: &Request) -> Result<Reply, protocol::Error> {
        protocol::call(&self.socket, request, CALL)
    }

    fn put(&self, id: &str, netns: &Path, policy: &str) -> Result<SandboxStatus, protocol::Error> {
        self.put_with(id, netns, policy, None, None)
    }

    fn put_with_agent(
        &self,
        id: &str,
        netns: &Path,
        policy: &str,
        agent: Option<&str>,
    ) -> Result<SandboxStatus, protocol::Error> {
        self.put_with(id, netns, policy, agent, None)
    }

    /// A Put with an agent definition and the pid of the sandbox's process.
    fn put_with(
        &self,
        id: &str,
        netns: &Path,
        policy: &str,
        agent: Option<&str>,
        pid: Option<u32>,
    ) -> Result<SandboxStatus, protocol::Error> {
        let request = Request::Put(Put {
            id: id.into(),
            netns: netns.to_path_buf(),
            pid,
            policy: policy.into(),
            origin: format!("test policy of {id}"),
            agent: agent.map(|text| AgentDefinition {
                text: text.into(),
                origin: format!("test agent of {id}"),
            }),
            reply_when: ReplyWhen::default(),
        });
        self.call(&request).map(|reply| match reply {
            Reply::Sandbox(status) => status,
            other => panic!("put {id}: unexpected reply {other:?}"),
        })
    }

    fn get(&self, id: &str) -> SandboxStatus {
        match self.call(&Request::Get { id: id.into() }) {
            Ok(Reply::Sandbox(status)) => status,
            other => panic!("get {id}: {other:?}\n{}", self.logs()),
        }
    }

    /// GET /metrics, from inside the world namespace where the agent listens.
    fn metrics(&self, bed: &Testbed) -> String {
        let at = self.metrics;
        bed.in_world(move || {
            let mut stream = TcpStream::connect_timeout(&at, TIMEOUT).expect("connect to metrics");
            stream
                .write_all(b"GET /metrics HTTP/1.0\r\nHost: agent\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            stream.read_to_string(&mut text).unwrap();
            text
        })
        .expect("run in the world")
    }

    /// The JSON log events (`--log-format json`) whose message is `message`.
    fn json_events(&self, message: &str) -> Vec<serde_json::Value> {
        self.process.json_events(message)
    }

    pub(crate) fn kill_9(&mut self) {
        self.process.child.kill().expect("SIGKILL the agent");
        self.process.child.wait().expect("reap the agent");
    }
}

/// A bare namespace (`ip netns add`, loopback up), deleted on drop.
struct Namespace(String);

impl Namespace {
    fn new(tag: &str) -> Namespace {
        let name = format!("nl-agent-{}-{tag}", std::process::id());
        let run = |args: &[&str]| {
            let output = testbed::run_command("ip", args, None).expect("run ip");
            assert!(
                output.status.success(),
                "ip {args:?}: {}",
                describe(&output)
            );
        };
        run(&["netns", "add", &name]);
        let namespace = Namespace(name);
        run(&["-n", &namespace.0, "link", "set", "lo", "up"]);
        namespace
    }

    fn path(&self) -> PathBuf {
        testbed::netns_path(&self.0)
    }

    /// A DNS query from inside this namespace to its own loopback port 53,
    /// which only the redirect to the proxy can answer.
    fn query(&self, name: &str) -> Option<DnsReply> {
        let name = name.to_string();
        netleash::netns::run_in(&Target::Name(self.0.clone()), move || {
            testbed::dns_query(
                SocketAddr::from(([127, 0, 0, 1], 53)),
                &name,
                RecordType::A,
                Transport::Udp,
                TIMEOUT,
            )
            .expect("query")
            .reply
        })
        .expect("run in the namespace")
    }

    fn delete(&mut self) {
        let _ = testbed::run_command("ip", &["netns", "delete", &self.0], None);
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        self.delete();
    }
}

fn policy_json(hosts: &[&str]) -> String {
    serde_json::json!({"type": "limited", "allowed_hosts": hosts}).to_string()
}

fn a(text: &str) -> ZoneRecord {
    match addr(text) {
        IpAddr::V4(v4) => ZoneRecord::A(v4),
        IpAddr::V6(v6) => ZoneRecord::Aaaa(v6),
    }
}

fn sandbox_path(bed: &Testbed) -> PathBuf {
    testbed::netns_path(bed.sandbox())
}

/// In the sandbox: resolve `name` at a non-resolver address (redirected to
/// the proxy) and connect to its first address on 443.
fn resolve_and_connect(bed: &Testbed, name: &str) -> (ResponseCode, Option<Verdict>) {
    let name = name.to_string();
    bed.in_sandbox(move || {
        let exchange = testbed::dns_query(
            SocketAddr::new(addr(NOT_A_RESOLVER), testbed::DNS_PORT),
            &name,
            RecordType::A,
            Transport::Udp,
            TIMEOUT,
        )
        .expect("query from the sandbox");
        let Some(reply) = exchange.reply else {
            return (ResponseCode::ServFail, None);
        };
        let verdict = reply.addresses().first().map(|to| {
            testbed::probe::tcp_connect(SocketAddr::new(*to, 443), TIMEOUT)
                .expect("connect")
                .verdict
        });
        (reply.response_code, verdict)
    })
    .expect("run in the sandbox")
}

/// The sandbox's table as `nft` lists it, without counter values and the
/// time learned elements have left, which change on their own.
fn table_without_expiry(bed: &Testbed) -> String {
    let table = netleash_table(bed.sandbox()).expect("the table is in force");
    let mut words = Vec::new();
    let mut skip = false;
    for word in table.split(' ') {
        if !skip && word != "expires" {
            words.push(word);
        }
        skip = word == "expires";
    }
    words.join(" ")
}

/// Log text without its ANSI colour sequences (`ESC [ ... m`).
fn without_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for skipped in chars.by_ref() {
                if skipped == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of the metrics sample `series` (name and labels), if present.
fn sample(text: &str, series: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn put_enforces_by_name_through_the_agents_proxy_with_counters_and_a_root_only_socket() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    bed.zone().set("denied.test", &[a("203.0.113.20")], 300);
    let agent = Agent::start(&bed, dir.path());
    let mode = std::fs::metadata(&agent.socket)
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the API socket must be root-only");

    // The operator CLI puts the sandbox.
    let file = write_policy(dir.path(), "p.json", &policy_json(&["allowed.test"]));
    let socket = agent.socket.to_str().unwrap().to_string();
    let netns = sandbox_path(&bed);
    let output = netleash(&[
        "sandbox",
        "put",
        "c1",
        "--netns",
        netns.to_str().unwrap(),
        file.to_str().unwrap(),
        "--socket",
        &socket,
    ]);
    assert!(output.status.success(), "{}", describe(&output));

    assert_eq!(
        resolve_and_connect(&bed, "allowed.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );
    assert_reachable(&bed, "198.51.100.10", 443);
    let (code, _) = resolve_and_connect(&bed, "denied.test");
    assert_eq!(code, ResponseCode::Refused);
    assert_rejected(&bed, "203.0.113.20", 443);
    // DNS over TLS to the upstream is denied; plain DNS to it is redirected.
    assert_rejected(&bed, UPSTREAM, 853);

    let status = agent.get("c1");
    assert!(status.digest.starts_with("sha256:"), "{status:?}");
    assert!(
        status.dns_queries >= 2 && status.dns_refused >= 1,
        "{status:?}"
    );
    assert!(status.denied_packets >= 2, "{status:?}");
    // The connection to 198.51.100.10 opened through an allow rule.
    assert!(status.allowed_packets >= 1, "{status:?}");
    assert!(
        status.set_sizes.get("dns_v4").copied().unwrap_or(0) >= 1,
        "{status:?}"
    );

    let list = netleash(&["sandbox", "list", "--json", "--socket", &socket]);
    assert!(list.status.success(), "{}", describe(&list));
    assert!(String::from_utf8_lossy(&list.stdout).contains("\"c1\""));

    let metrics = agent.metrics(&bed);
    assert!(metrics.starts_with("HTTP/1.0 200"), "{metrics}");
    let of = |series: &str| {
        sample(&metrics, series).unwrap_or_else(|| panic!("no {series} in\n{metrics}"))
    };
    assert_eq!(of("netleash_sandboxes"), 1);
    assert!(of("netleash_sandbox_denied_packets_total{sandbox=\"c1\"}") >= 2);
    assert!(of("netleash_sandbox_allowed_packets_total{sandbox=\"c1\"}") >= 1);
    assert!(of("netleash_sandbox_dns_refused_total{sandbox=\"c1\"}") >= 1);
    assert!(of("netleash_sandbox_dns_allowed_total{sandbox=\"c1\"}") >= 1);
    assert!(of("netleash_sandbox_dns_queries_total{sandbox=\"c1\"}") >= 2);
    assert!(of("netleash_sandbox_set_elements{sandbox=\"c1\",set=\"dns_v4\"}") >= 1);
    // allowed.test, A and AAAA, once each.
    assert_eq!(of("netleash_resolver_upstream_queries_total"), 2);
    assert_eq!(of("netleash_resolver_names"), 1);
    assert_eq!(of("netleash_resolver_errors_total{kind=\"upstream\"}"), 0);
}

#[test]
fn a_bad_policy_is_invalid_input_and_changes_nothing_and_delete_leaves_the_rules() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    let agent = Agent::start(&bed, dir.path());
    let netns = sandbox_path(&bed);
    let before = agent
        .put("c1", &netns, &policy_json(&["allowed.test"]))
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    let table = table_without_expiry(&bed);

    let bad =
        r#"{"type": "limited", "allowed_hosts": ["allowed.test"], "allow_package_manager": true}"#;
    let expected = netleash::policy::load(bad, "test policy of c1", &Default::default())
        .unwrap_err()
        .to_string();
    match agent.put("c1", &netns, bad) {
        Err(protocol::Error::Refused { kind, message, .. }) => {
            assert_eq!(kind, FailureKind::InvalidInput);
            assert_eq!(message, expected);
        }
        other => panic!("a bad policy must be refused, got {other:?}"),
    }
    // The same through the CLI: exit 2.
    let file = write_policy(dir.path(), "bad.json", bad);
    let socket = agent.socket.to_str().unwrap().to_string();
    let output = netleash(&[
        "sandbox",
        "put",
        "c1",
        "--netns",
        netns.to_str().unwrap(),
        file.to_str().unwrap(),
        "--socket",
        &socket,
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("allow_package_manager"));

    assert_eq!(agent.get("c1").digest, before.digest);
    assert_eq!(table_without_expiry(&bed), table, "the table changed");
    assert_eq!(
        resolve_and_connect(&bed, "allowed.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );

    // Delete: the agent forgets it, the rules stay, DNS is no longer answered.
    let output = netleash(&["sandbox", "delete", "c1", "--socket", &socket]);
    assert!(output.status.success(), "{}", describe(&output));
    let output = netleash(&["sandbox", "get", "c1", "--socket", &socket]);
    assert_eq!(output.status.code(), Some(4), "{}", describe(&output));
    assert!(
        netleash_table(bed.sandbox()).is_some(),
        "delete must leave the rules"
    );
    assert!(!dir.path().join("state/sandboxes/c1.json").exists());
    // The sandbox's denied-connection log stopped with it: its nflog group
    // in the namespace is free again.
    let sandbox = Target::Name(bed.sandbox().to_string());
    if let Err(error) = NflogListener::open(&sandbox, DEFAULT_NFLOG_GROUP) {
        panic!(
            "the nflog group is still held after delete: {}",
            netleash::cli::render_error(&error)
        );
    }
    let (code, _) = resolve_and_connect(&bed, "allowed.test");
    assert_ne!(
        code,
        ResponseCode::NoError,
        "nobody should answer DNS after delete"
    );
    assert_rejected(&bed, "203.0.113.20", 443);
}

#[test]
fn the_agents_extra_hosts_and_a_sandboxs_mcp_servers_are_allowed_and_a_bad_definition_changes_nothing()
 {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("mcp.test", &[a("198.51.100.10")], 300);
    let agent = Agent::start_with(&bed, dir.path(), &["--extra-host", "198.51.100.11:443"]);
    let netns = sandbox_path(&bed);
    let policy = r#"{"type": "limited", "allowed_hosts": [], "allow_mcp_servers": true}"#;
    let definition =
        r#"{"mcp_servers": [{"type": "url", "name": "docs", "url": "https://mcp.test/mcp"}]}"#;
    agent
        .put_with_agent("c1", &netns, policy, Some(definition))
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    // The MCP server's host, by name through the proxy, on its URL's port.
    assert_eq!(
        resolve_and_connect(&bed, "mcp.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );
    // The agent's extra host, on its port only.
    assert_reachable(&bed, "198.51.100.11", 443);
    assert_rejected(&bed, "198.51.100.11", 80);
    assert_rejected(&bed, "203.0.113.20", 443);
    let table = table_without_expiry(&bed);

    // The definition is part of the sandbox: after a restart it is compiled
    // the same way, so the table in force is kept as it is.
    let record = std::fs::read_to_string(dir.path().join("state/sandboxes/c1.json")).unwrap();
    assert!(record.contains("mcp.test"), "{record}");

    // A broken definition is refused with its place, and changes nothing.
    let broken = r#"{"mcp_servers": [{"type": "url", "name": "docs", "url": 7}]}"#;
    match agent.put_with_agent("c1", &netns, policy, Some(broken)) {
        Err(protocol::Error::Refused { kind, message, .. }) => {
            assert_eq!(kind, FailureKind::InvalidInput);
            assert!(message.starts_with("test agent of c1:1:"), "{message}");
            assert!(message.contains("mcp_servers[0].url"), "{message}");
        }
        other => panic!("a broken agent definition must be refused, got {other:?}"),
    }
    assert_eq!(table_without_expiry(&bed), table, "the table changed");

    // Without the definition the MCP host is no longer allowed.
    agent.put("c1", &netns, policy).unwrap();
    let (code, _) = resolve_and_connect(&bed, "mcp.test");
    assert_eq!(code, ResponseCode::Refused);
    assert_reachable(&bed, "198.51.100.11", 443);
}

#[test]
fn a_second_sandbox_in_an_enforced_namespace_is_refused_and_changes_nothing() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&bed, dir.path());
    let netns = sandbox_path(&bed);
    let first = agent
        .put("c1", &netns, &policy_json(&["198.51.100.10"]))
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    let table = table_without_expiry(&bed);
    match agent.put("c2", &netns, &policy_json(&["198.51.100.11"])) {
        Err(protocol::Error::Refused { kind, message, .. }) => {
            assert_eq!(kind, FailureKind::InvalidInput);
            assert_eq!(
                message,
                format!(
                    "the network namespace {} of sandbox \"c2\" is already enforced as sandbox \"c1\"; \
                     sandboxes that share a network namespace share its policy: put it once (for a \
                     pod, on the container that owns the namespace), or delete \"c1\" first",
                    netns.display()
                )
            );
        }
        other => panic!("a second sandbox in the namespace must be refused, got {other:?}"),
    }
    assert_eq!(table_without_expiry(&bed), table, "the table changed");
    assert_eq!(agent.get("c1").digest, first.digest);
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "198.51.100.11", 443);
    assert!(!dir.path().join("state/sandboxes/c2.json").exists());

    // A Put that arrives while c1 is being deleted waits until c1 has let go
    // of the namespace's proxy port, then succeeds.
    std::thread::scope(|scope| {
        let deleting = scope.spawn(|| agent.call(&Request::Delete { id: "c1".into() }));
        std::thread::sleep(Duration::from_millis(20));
        agent
            .put("c2", &netns, &policy_json(&["198.51.100.11"]))
            .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
        assert!(deleting.join().unwrap().is_ok());
    });
    // And once c1's denied-connection log has let go of the nflog group.
    let log = agent
        .get("c2")
        .denial_log
        .expect("the agent reports the log");
    assert!(log.listening && log.error.is_none(), "{log:?}");
    assert_reachable(&bed, "198.51.100.11", 443);
    assert_rejected(&bed, "198.51.100.10", 443);
}

/// A process started in `namespace` (`ip netns exec` enters it, then execs
/// `sleep`, keeping the pid), once it is there; killed and reaped on drop.
struct ProcessIn(std::process::Child);

impl ProcessIn {
    fn start(namespace: &Namespace) -> ProcessIn {
        let child = Command::new("ip")
            .args(["netns", "exec", &namespace.0, "sleep", "600"])
            .spawn()
            .expect("start a process in the namespace");
        let process = ProcessIn(child);
        let wanted = std::fs::metadata(namespace.path()).expect("the namespace file");
        let deadline = Instant::now() + TIMEOUT;
        use std::os::unix::fs::MetadataExt as _;
        while !std::fs::metadata(format!("/proc/{}/ns/net", process.pid()))
            .is_ok_and(|m| (m.dev(), m.ino()) == (wanted.dev(), wanted.ino()))
        {
            assert!(
                Instant::now() < deadline,
                "the process never entered the namespace"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        process
    }

    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ProcessIn {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_pod_container_that_restarts_takes_over_the_namespace_once_the_old_one_has_exited() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&bed, dir.path());
    // The pod's namespace is held by a bind mount (as a pause container
    // holds it), so the reaper never finds it gone.
    let pod = Namespace::new("pod");
    let first = ProcessIn::start(&pod);
    let old = agent
        .put_with(
            "c1",
            &pod.path(),
            &policy_json(&["198.51.100.10"]),
            None,
            Some(first.pid()),
        )
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    let second = ProcessIn::start(&pod);
    let policy = policy_json(&["198.51.100.11"]);

    // While c1's process lives, the namespace stays c1's.
    match agent.put_with("c2", &pod.path(), &policy, None, Some(second.pid())) {
        Err(protocol::Error::Refused { kind, message, .. }) => {
            assert_eq!(kind, FailureKind::InvalidInput);
            assert!(
                message.contains("already enforced as sandbox \"c1\""),
                "{message}"
            );
        }
        other => panic!("c1's process still runs, so c2 must be refused, got {other:?}"),
    }
    assert_eq!(agent.get("c1").digest, old.digest);

    // c1's process exits (its poststop has not come): c2 takes over.
    drop(first);
    let new = agent
        .put_with("c2", &pod.path(), &policy, None, Some(second.pid()))
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    assert_ne!(new.digest, old.digest);
    assert_eq!(
        agent.get("c2").digest,
        new.digest,
        "the table in force is c2's"
    );
    match agent.call(&Request::Get { id: "c1".into() }) {
        Err(protocol::Error::Refused { kind, .. }) => assert_eq!(kind, FailureKind::NotFound),
        other => panic!("c1 must be forgotten, got {other:?}"),
    }
    assert!(!dir.path().join("state/sandboxes/c1.json").exists());
    assert!(dir.path().join("state/sandboxes/c2.json").exists());
    // c1 had let go of the proxy port and the nflog group before c2 started.
    let log = agent
        .get("c2")
        .denial_log
        .expect("the agent reports the log");
    assert!(log.listening && log.error.is_none(), "{log:?}");
    // c1's late poststop finds nothing to delete and leaves c2 alone.
    assert!(agent.call(&Request::Delete { id: "c1".into() }).is_err());
    assert_eq!(agent.get("c2").digest, new.digest);
}

#[test]
fn a_put_that_replies_once_the_rules_are_in_force_does_not_wait_for_names() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    let agent = Agent::start(&bed, dir.path());
    let request = Request::Put(Put {
        id: "c1".into(),
        netns: sandbox_path(&bed),
        pid: None,
        policy: policy_json(&["allowed.test"]),
        origin: "test policy of c1".into(),
        agent: None,
        reply_when: ReplyWhen::RulesInForce,
    });
    let status = match agent.call(&request) {
        Ok(Reply::Sandbox(status)) => status,
        other => panic!("put: {other:?}\n{}", agent.logs()),
    };
    // The reply carries the digest in force but reads no table.
    assert!(status.digest.starts_with("sha256:"), "{status:?}");
    assert!(status.set_sizes.is_empty(), "{status:?}");
    assert_eq!(agent.get("c1").digest, status.digest);
    // The proxy answers at once and learns before it answers.
    assert_eq!(
        resolve_and_connect(&bed, "allowed.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );
    assert!(
        agent
            .get("c1")
            .set_sizes
            .get("dns_v4")
            .copied()
            .unwrap_or(0)
            >= 1,
        "get reads the table"
    );
}

#[test]
fn an_agent_with_a_bad_extra_host_does_not_start() {
    support::require_root();
    let dir = tempfile::tempdir().unwrap();
    let output = netleash(&[
        "agent",
        "--socket",
        dir.path().join("agent.sock").to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--upstream",
        "127.0.0.1",
        "--extra-host",
        "https://callback.example:99999",
    ]);
    assert_eq!(output.status.code(), Some(2), "{}", describe(&output));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("99999"), "{stderr}");
    assert!(!dir.path().join("agent.sock").exists());
}

#[test]
fn two_sandboxes_with_the_same_names_cost_one_upstream_query_per_name() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    let names = ["one.test", "two.test", "three.test"];
    for (i, name) in names.iter().enumerate() {
        bed.zone()
            .set(name, &[a(&format!("198.51.100.{}", 10 + i))], 300);
    }
    let other = Namespace::new("second");
    let agent = Agent::start(&bed, dir.path());
    let policy = policy_json(&names);
    agent
        .put("first", &sandbox_path(&bed), &policy)
        .expect("put first");
    let second = agent
        .put("second", &other.path(), &policy)
        .expect("put second");
    // The second sandbox got the addresses the loop had already resolved.
    assert_eq!(second.set_sizes.get("dns_v4"), Some(&3), "{second:?}");

    for name in names {
        let (code, verdict) = resolve_and_connect(&bed, name);
        assert_eq!(code, ResponseCode::NoError, "{name}");
        assert!(verdict.is_some(), "{name}");
        let reply = other
            .query(name)
            .unwrap_or_else(|| panic!("{name}: no answer in the second sandbox"));
        assert_eq!(reply.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(reply.addresses().len(), 1);
    }
    let refused = other.query("other.test").expect("an answer");
    assert_eq!(refused.response_code, ResponseCode::Refused);

    let queries = bed.zone().queries();
    for name in names {
        for record_type in [RecordType::A, RecordType::AAAA] {
            let count = queries
                .iter()
                .filter(|q| q.name == name && q.record_type == record_type)
                .count();
            assert_eq!(count, 1, "{name} {record_type}: {queries:?}");
        }
    }
    // The second namespace disappears without a Delete: the agent notices
    // and forgets it (its descriptor no longer pins the namespace).
    let mut other = other;
    other.delete();
    let started = Instant::now();
    loop {
        match agent.call(&Request::Get {
            id: "second".into(),
        }) {
            Err(protocol::Error::Refused {
                kind: FailureKind::NotFound,
                ..
            }) => break,
            _ => {
                assert!(
                    started.elapsed() < Duration::from_secs(5),
                    "the sandbox of a deleted namespace is still known\n{}",
                    agent.logs()
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    assert!(!dir.path().join("state/sandboxes/second.json").exists());
    assert_eq!(agent.get("first").id, "first");
    assert!(
        !queries.iter().any(|q| q.name == "other.test"),
        "a refused name went upstream"
    );
}

#[test]
fn enforcement_survives_kill_9_and_a_restart_adopts_and_cleans_up() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    let mut gone = Namespace::new("gone");
    let mut agent = Agent::start(&bed, dir.path());
    let policy = policy_json(&["allowed.test"]);
    let before = agent
        .put("c1", &sandbox_path(&bed), &policy)
        .expect("put c1");
    agent.put("c2", &gone.path(), &policy).expect("put c2");
    assert!(dir.path().join("state/sandboxes/c2.json").exists());
    assert_eq!(
        resolve_and_connect(&bed, "allowed.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );

    agent.kill_9();
    // Fail closed: the rules and learned addresses stay in the kernel.
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "203.0.113.20", 443);
    let (code, _) = resolve_and_connect(&bed, "allowed.test");
    assert_ne!(
        code,
        ResponseCode::NoError,
        "no proxy answers while the agent is down"
    );
    gone.delete();

    let mut restarted = Agent::start(&bed, dir.path());
    let ready = restarted.wait_for_line("ready:");
    assert!(ready.contains("adopted 1 sandbox(es), forgot 1"), "{ready}");
    let after = restarted.get("c1");
    assert_eq!(after.digest, before.digest);
    let log = after.denial_log.as_ref().expect("a denied-connection log");
    assert!(log.listening && log.error.is_none(), "{log:?}");
    assert!(
        restarted.process.stderr().contains("already in force"),
        "{}",
        restarted.logs()
    );
    assert_eq!(
        resolve_and_connect(&bed, "allowed.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );
    assert!(!dir.path().join("state/sandboxes/c2.json").exists());
    match restarted.call(&Request::Get { id: "c2".into() }) {
        Err(protocol::Error::Refused { kind, .. }) => assert_eq!(kind, FailureKind::NotFound),
        other => panic!("c2 should be forgotten, got {other:?}"),
    }
}

#[test]
fn replacing_a_policy_carries_the_addresses_it_still_allows_and_forgets_the_rest() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("keep.test", &[a("198.51.100.10")], 300);
    bed.zone().set("drop.test", &[a("198.51.100.11")], 300);
    let agent = Agent::start(&bed, dir.path());
    let netns = sandbox_path(&bed);
    let before = agent
        .put("c1", &netns, &policy_json(&["keep.test", "drop.test"]))
        .expect("put");
    for name in ["keep.test", "drop.test"] {
        assert_eq!(
            resolve_and_connect(&bed, name),
            (ResponseCode::NoError, Some(Verdict::Connected)),
            "{name}"
        );
    }
    let after = agent
        .put("c1", &netns, &policy_json(&["keep.test"]))
        .expect("replace");
    assert_ne!(after.digest, before.digest);
    let logs = without_colours(&agent.process.stderr());
    assert!(logs.contains("carried=1 forgotten=1"), "{logs}");
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "198.51.100.11", 443);
    let (code, _) = resolve_and_connect(&bed, "drop.test");
    assert_eq!(code, ResponseCode::Refused);
    let record = std::fs::read_to_string(dir.path().join("state/sandboxes/c1.json")).unwrap();
    assert!(!record.contains("drop.test"), "{record}");
}

/// Waits up to `limit` until `check` holds.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_denied_connection_is_logged_once_by_the_agent_with_the_host_and_the_sandbox_id() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("app.test", &[a("198.51.100.11")], 300);
    let agent = Agent::start_with(&bed, dir.path(), &["--log-format", "json"]);
    let put = agent
        .put("c1", &sandbox_path(&bed), &policy_json(&["app.test:443"]))
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    let log = put.denial_log.expect("the status shows the log");
    assert!(log.listening, "{log:?}");
    assert_eq!(log.nflog_group, DEFAULT_NFLOG_GROUP);

    // Resolved through the agent's proxy, then connected on the allowed port.
    assert_eq!(
        resolve_and_connect(&bed, "app.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );
    // Denied twice: the resolved address on a port the policy does not allow.
    assert_rejected(&bed, "198.51.100.11", 8443);
    assert_rejected(&bed, "198.51.100.11", 8443);

    eventually(
        Duration::from_secs(5),
        "one denied-connection line and two denied packets",
        || {
            !agent.json_events(DENIED_MESSAGE).is_empty()
                && agent
                    .get("c1")
                    .denial_log
                    .is_some_and(|log| log.packets >= 2)
        },
    );
    // Room for a wrong second line to arrive (the kernel batches for 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    let events = agent.json_events(DENIED_MESSAGE);
    assert_eq!(events.len(), 1, "{events:#?}\n{}", agent.logs());
    let fields = &events[0]["fields"];
    assert_eq!(fields["sandbox"], "c1", "{fields:#}");
    assert_eq!(fields["host"], "app.test", "{fields:#}");
    assert_eq!(fields["dst"], "198.51.100.11", "{fields:#}");
    assert_eq!(fields["port"], 8443, "{fields:#}");
    assert_eq!(fields["proto"], "tcp", "{fields:#}");
    assert_eq!(fields["src"], testbed::SANDBOX_V4.to_string(), "{fields:#}");
    assert_eq!(events[0]["level"], "WARN");

    let log = agent
        .get("c1")
        .denial_log
        .expect("the status shows the log");
    assert_eq!(
        (log.listening, log.packets, log.logged, log.suppressed),
        (true, 2, 1, 0),
        "{log:?}"
    );
    let metrics = agent.metrics(&bed);
    for (series, expected) in [
        ("netleash_sandbox_denial_log_listening{sandbox=\"c1\"}", 1),
        (
            "netleash_sandbox_denial_log_packets_total{sandbox=\"c1\"}",
            2,
        ),
        ("netleash_sandbox_denial_log_lines_total{sandbox=\"c1\"}", 1),
        (
            "netleash_sandbox_denial_log_suppressed_total{sandbox=\"c1\"}",
            0,
        ),
    ] {
        assert_eq!(
            sample(&metrics, series),
            Some(expected),
            "{series}\n{metrics}"
        );
    }
}

#[test]
fn a_sandbox_whose_nflog_group_is_taken_is_enforced_and_its_status_says_the_log_is_off() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    // Another listener holds the group in the sandbox's namespace first.
    let sandbox = Target::Name(bed.sandbox().to_string());
    let _other = NflogListener::open(&sandbox, DEFAULT_NFLOG_GROUP).unwrap_or_else(|error| {
        panic!(
            "listen to nflog in the sandbox: {}",
            netleash::cli::render_error(&error)
        )
    });
    let agent = Agent::start(&bed, dir.path());
    let put = agent
        .put("c1", &sandbox_path(&bed), &policy_json(&["allowed.test"]))
        .unwrap_or_else(|e| panic!("{}\n{}", netleash::cli::render_error(&e), agent.logs()));
    let log = put.denial_log.expect("the status shows the log");
    assert!(!log.listening, "{log:?}");
    assert!(
        log.error
            .as_deref()
            .is_some_and(|error| error.contains("another program already listens")),
        "{log:?}"
    );
    assert_eq!(
        resolve_and_connect(&bed, "allowed.test"),
        (ResponseCode::NoError, Some(Verdict::Connected))
    );
    assert_rejected(&bed, "203.0.113.20", 443);
    assert!(agent.get("c1").denied_packets >= 1);
    let metrics = agent.metrics(&bed);
    assert_eq!(
        sample(
            &metrics,
            "netleash_sandbox_denial_log_listening{sandbox=\"c1\"}"
        ),
        Some(0),
        "{metrics}"
    );
}

/// The agent's shared resolver loop without the agent: one loop, routes to
/// two recording sinks, names tracked and untracked while it runs (loopback
/// test upstream, no namespaces).
mod shared_loop {
    use std::net::Ipv4Addr;
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use netleash::dns::cache::AnswerCache;
    use netleash::dns::learn::{AddressSink, RecordingSink};
    use netleash::dns::names::AllowedNames;
    use netleash::dns::origins::AddressOrigins;
    use netleash::dns::resolver::{NameRoutes, ResolverLoop, ResolverLoopConfig, Route};
    use netleash::dns::ttl::TtlPolicy;
    use netleash::policy::{Ports, Source, Target};
    use netleash::ruleset::NameBinding;

    use crate::dns_upstream::TestUpstream;

    fn names(target: Target) -> AllowedNames {
        AllowedNames::new(vec![NameBinding {
            target,
            ports: Ports::Any,
            sources: vec![Source::AllowedHosts],
            set_v4: "dns_v4".into(),
            set_v6: "dns_v6".into(),
        }])
    }

    /// Sandbox `a` allows shared.test exactly, sandbox `b` allows *.test;
    /// each remembers the names of the addresses it was given.
    struct TwoSandboxes {
        a: (Arc<RecordingSink>, AllowedNames, Arc<AddressOrigins>),
        b: (Arc<RecordingSink>, AllowedNames, Arc<AddressOrigins>),
    }

    impl NameRoutes for TwoSandboxes {
        fn routes(&self, name: &str) -> Vec<Route> {
            [&self.a, &self.b]
                .into_iter()
                .filter_map(|(sink, names, origins)| {
                    let bindings: Vec<NameBinding> =
                        names.matching(name).into_iter().cloned().collect();
                    (!bindings.is_empty()).then(|| Route {
                        sink: sink.clone() as Arc<dyn AddressSink>,
                        bindings,
                        origins: origins.clone(),
                    })
                })
                .collect()
        }
    }

    async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
        let started = Instant::now();
        while !check() {
            assert!(started.elapsed() < Duration::from_secs(5), "{what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn one_lookup_fans_out_to_every_sandbox_that_allows_the_name_and_a_failing_one_harms_no_other()
     {
        let upstream = TestUpstream::start().await;
        let address = Ipv4Addr::new(192, 0, 2, 7);
        upstream.set_a("shared.test", 1, &[address]);
        let routes = Arc::new(TwoSandboxes {
            a: (
                Arc::new(RecordingSink::new()),
                names(Target::Name("shared.test".into())),
                Arc::new(AddressOrigins::default()),
            ),
            b: (
                Arc::new(RecordingSink::new()),
                names(Target::Wildcard("test".into())),
                Arc::new(AddressOrigins::default()),
            ),
        });
        let mut config = ResolverLoopConfig::new(vec![upstream.addr]);
        config.ttl = TtlPolicy {
            min_ttl: Duration::from_secs(1),
            max_ttl: Duration::from_secs(1),
            grace: Duration::from_secs(1),
            ..TtlPolicy::default()
        };
        config.query_timeout = Duration::from_millis(200);
        let mut handle =
            ResolverLoop::routed(config, routes.clone(), Arc::new(AnswerCache::default()))
                .expect("valid configuration")
                .spawn();
        assert!(handle.track("shared.test").unwrap());
        assert!(!handle.track("shared.test").unwrap(), "tracked twice");
        let (a, b) = (&routes.a.0, &routes.b.0);
        eventually("both sandboxes learn the address", || {
            a.addresses().contains(&address.into()) && b.addresses().contains(&address.into())
        })
        .await;
        assert_eq!(upstream.queries_for("shared.test"), 2, "one A and one AAAA");
        // Each sandbox's denied-connection log can name the address (recorded
        // right after its sink took it).
        eventually("each sandbox records the address's name", || {
            [&routes.a.2, &routes.b.2]
                .iter()
                .all(|origins| origins.name_of(address.into()).as_deref() == Some("shared.test"))
        })
        .await;

        // b's sets fail: a keeps getting refreshes, the name is not in backoff.
        b.set_failing(true);
        let calls = a.calls().len();
        eventually("a refresh reaches a while b fails", || {
            a.calls().len() > calls && handle.stats().sink_failures > 0
        })
        .await;
        assert!(
            handle.snapshot().iter().all(|lookup| lookup.failures == 0),
            "{:?}",
            handle.snapshot()
        );

        // Untracked: no more lookups.
        assert!(handle.untrack("shared.test"));
        assert!(handle.names().is_empty() && handle.snapshot().is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
        let queries = upstream.queries_for("shared.test");
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(upstream.queries_for("shared.test"), queries);
        handle.stop().await.unwrap();
    }
}
