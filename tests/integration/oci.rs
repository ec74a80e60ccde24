//! `netleash hook` with a real OCI runtime: `runc run` of a busybox
//! container whose network namespace is the testbed's sandbox, with the hook
//! at createRuntime in standalone mode, with a stand-in agent, and with the
//! real `netleash agent` through its restart. Privileged: fails when not root.

use std::net::SocketAddr;
use std::process::{Command, Output};

use netleash::agent::protocol;
use netleash::testbed::{self, Testbed, Transport};

use crate::agent::Agent;
use crate::runc::{Bundle, MARKER_DIR, Network};
use crate::support::{self, describe, netleash_table};

/// The container's /etc/resolv.conf: the testbed world's DNS server.
const RESOLV_CONF: &str = "nameserver 198.51.100.53\n";
const ALLOWS_10: &str = r#"{"type": "limited", "allowed_hosts": ["http://198.51.100.10"]}"#;
const ALLOWS_11: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.11"]}"#;
/// Invalid at line 2, column 20: port 99999.
const BROKEN: &str =
    "{\"type\": \"limited\",\n \"allowed_hosts\": [\"https://198.51.100.10:99999\"]}";

/// A shell script for the container: GET / from port 80 of each address
/// and print the answer, or `FAILED <address> <exit code>`; then leave a
/// marker that the workload ran. (busybox nc, not wget: the static busybox's
/// wget crashes in glibc's NSS when it looks up the service name.)
pub(crate) fn fetch_script(addresses: &[&str]) -> String {
    let mut script = String::new();
    for ip in addresses {
        script.push_str(&format!(
            "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80 2>&1 || echo \"FAILED {ip} $?\"; "
        ));
    }
    script.push_str(&format!("touch {MARKER_DIR}/ran"));
    script
}

/// The body the world's HTTP server sends for `ip` port 80.
pub(crate) fn body(ip: &str) -> String {
    testbed::http_body(SocketAddr::new(support::addr(ip), 80))
}

fn sandbox_network(bed: &Testbed) -> Network {
    Network::Join(testbed::netns_path(bed.sandbox()))
}

pub(crate) fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Arrivals at the world's HTTP server on `ip` port 80.
pub(crate) fn arrivals(bed: &Testbed, ip: &str) -> u64 {
    bed.arrivals(Transport::Tcp, SocketAddr::new(support::addr(ip), 80))
}

/// Assert that runc refused to start the container: non-zero exit, the
/// hook's message in its stderr, and the workload never ran.
fn assert_refused(bundle: &Bundle, output: &Output, messages: &[&str]) {
    assert!(
        !output.status.success(),
        "runc started the container: {}",
        describe(output)
    );
    let text = stderr(output);
    for message in messages {
        assert!(
            text.contains(message),
            "runc's stderr lacks {message:?}: {}",
            describe(output)
        );
    }
    assert!(
        !bundle.marker_dir().join("ran").exists(),
        "the workload ran although the hook failed"
    );
    assert!(stdout(output).is_empty(), "{}", describe(output));
}

/// Assert that the output of [`fetch_script`] for 198.51.100.10 and
/// 198.51.100.11 shows the first answering and the second rejected at once
/// without reaching the world (`before`: its arrivals before the run).
pub(crate) fn assert_only_10_answered(bed: &Testbed, output: &Output, before: u64) {
    let out = stdout(output);
    assert!(out.contains(&body("198.51.100.10")), "{}", describe(output));
    assert!(
        !out.contains(&body("198.51.100.11")),
        "{}",
        describe(output)
    );
    // A TCP reset makes nc report "Connection refused" at once; a silent
    // drop would end in its 5 s timeout instead.
    assert!(
        out.contains("Connection refused") && out.contains("FAILED 198.51.100.11 1"),
        "{}",
        describe(output)
    );
    assert_eq!(
        arrivals(bed, "198.51.100.11"),
        before,
        "a blocked connection reached the world"
    );
}

/// Run a container under `ALLOWS_10` with `netleash hook --standalone` in
/// the testbed's sandbox and assert that 198.51.100.10 answered and 198.51.100.11 was rejected at
/// once without reaching the world. Returns the bundle (for its marker).
fn assert_only_10_reachable(bed: &Testbed) -> Bundle {
    let bundle = Bundle::new(RESOLV_CONF);
    let script = fetch_script(&["198.51.100.10", "198.51.100.11"]);
    bundle.configure(
        &["sh", "-c", &script],
        &sandbox_network(bed),
        &[("netleash.policy", ALLOWS_10)],
        Some(&["--standalone"]),
    );
    let before = arrivals(bed, "198.51.100.11");
    let (_container, output) = bundle.run();
    assert!(output.status.success(), "{}", describe(&output));
    assert_only_10_answered(bed, &output, before);
    bundle
}

#[test]
fn the_annotated_policy_is_in_force_before_the_workload_starts() {
    let bed = support::testbed();
    let bundle = assert_only_10_reachable(&bed);
    assert!(bundle.marker_dir().join("ran").exists());
    // The policy stays in the sandbox's namespace, with the container's
    // resolv.conf nameserver as its resolver.
    let table = netleash_table(bed.sandbox()).expect("the hook left no netleash table");
    assert!(table.contains("198.51.100.53"), "{table}");
}

#[test]
fn a_policy_file_annotation_is_read_from_the_host() {
    let bed = support::testbed();
    let bundle = Bundle::new(RESOLV_CONF);
    let policy = support::write_policy(bundle.path(), "policy.json", ALLOWS_11);
    let script = fetch_script(&["198.51.100.11", "198.51.100.10"]);
    bundle.configure(
        &["sh", "-c", &script],
        &sandbox_network(&bed),
        &[("netleash.policy-file", policy.to_str().unwrap())],
        Some(&["--standalone"]),
    );
    let (_container, output) = bundle.run();

    assert!(output.status.success(), "{}", describe(&output));
    let out = stdout(&output);
    assert!(
        out.contains(&body("198.51.100.11")),
        "{}",
        describe(&output)
    );
    assert!(
        out.contains("FAILED 198.51.100.10 1"),
        "{}",
        describe(&output)
    );
}

#[test]
fn a_container_without_the_annotation_is_untouched() {
    let bed = support::testbed();
    let bundle = Bundle::new(RESOLV_CONF);
    let script = fetch_script(&["198.51.100.10", "198.51.100.11"]);
    bundle.configure(
        &["sh", "-c", &script],
        &sandbox_network(&bed),
        &[("org.example.other", "x")],
        Some(&["--standalone"]),
    );
    let (_container, output) = bundle.run();

    assert!(output.status.success(), "{}", describe(&output));
    let out = stdout(&output);
    for ip in ["198.51.100.10", "198.51.100.11"] {
        assert!(out.contains(&body(ip)), "{ip}: {}", describe(&output));
    }
    assert!(!out.contains("FAILED"), "{}", describe(&output));
    assert_eq!(netleash_table(bed.sandbox()), None);
}

#[test]
fn a_broken_policy_stops_the_container_from_starting() {
    let bed = support::testbed();
    let bundle = Bundle::new(RESOLV_CONF);
    bundle.configure(
        &["sh", "-c", &fetch_script(&[])],
        &sandbox_network(&bed),
        &[("netleash.policy", BROKEN)],
        Some(&["--standalone"]),
    );
    let (container, output) = bundle.run();

    let place = format!(
        "annotation netleash.policy of container {}:2:20",
        container.id
    );
    assert_refused(&bundle, &output, &[&place, "99999"]);
    assert_eq!(
        netleash_table(bed.sandbox()),
        None,
        "a broken policy changed the rules"
    );
}

#[test]
fn a_container_sharing_the_host_network_namespace_is_refused() {
    support::require_root();
    let host_table = || {
        Command::new("nft")
            .args(["list", "table", "inet", "netleash"])
            .output()
            .expect("run nft")
    };
    let before = host_table();
    let bundle = Bundle::new(RESOLV_CONF);
    // Unrestricted, so that even a hook that wrongly went ahead would only
    // block the metadata addresses on this machine.
    bundle.configure(
        &["sh", "-c", &fetch_script(&[])],
        &Network::Host,
        &[("netleash.policy", r#"{"type": "unrestricted"}"#)],
        Some(&["--standalone"]),
    );
    let (container, output) = bundle.run();

    let message = format!(
        "container {} has no network namespace of its own",
        container.id
    );
    assert_refused(&bundle, &output, &[&message, "would firewall the host"]);
    let after = host_table();
    assert_eq!(
        (after.status.code(), after.stdout),
        (before.status.code(), before.stdout),
        "the host's netleash table changed"
    );
}

#[test]
fn without_an_agent_the_container_does_not_start_unless_standalone() {
    let bed = support::testbed();
    let bundle = Bundle::new(RESOLV_CONF);
    let missing = bundle.path().join("no-agent.sock");
    bundle.configure(
        &["sh", "-c", &fetch_script(&[])],
        &sandbox_network(&bed),
        &[("netleash.policy", ALLOWS_10)],
        Some(&["--socket", missing.to_str().unwrap()]),
    );
    let (container, output) = bundle.run();

    let message = format!(
        "cannot hand container {} to the netleash agent, so it must not start",
        container.id
    );
    assert_refused(
        &bundle,
        &output,
        &[
            &message,
            "--standalone",
            "cannot connect to the netleash agent",
        ],
    );
    assert_eq!(netleash_table(bed.sandbox()), None);
}

/// A stand-in for `netleash agent`: accepts one connection on `socket`
/// (within 30 s), answers `reply`, and returns the request it got.
fn fake_agent(
    socket: &std::path::Path,
    reply: protocol::Response,
) -> std::thread::JoinHandle<protocol::Request> {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::os::unix::net::UnixListener::bind(socket).expect("bind the fake agent");
    listener
        .set_nonblocking(true)
        .expect("a non-blocking listener");
    std::thread::spawn(move || {
        // Poll, so that a hook that never connects fails the test instead of hanging it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let stream = loop {
            match listener.accept() {
                Ok((stream, _)) => break stream,
                Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "the hook never connected to the fake agent"
                    );
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(err) => panic!("accept: {err}"),
            }
        };
        stream.set_nonblocking(false).expect("a blocking stream");
        let mut line = String::new();
        BufReader::new(&stream)
            .read_line(&mut line)
            .expect("read the request");
        let request = serde_json::from_str(line.trim_end()).expect("a valid request");
        let mut out = serde_json::to_vec(&reply).expect("serialize the reply");
        out.push(b'\n');
        (&stream).write_all(&out).expect("send the reply");
        request
    })
}

/// A bundle whose container (policy `ALLOWS_10`, in the testbed's sandbox)
/// has the hook talk to a fake agent that answers `reply`.
fn with_fake_agent(
    bed: &Testbed,
    reply: protocol::Response,
) -> (Bundle, std::thread::JoinHandle<protocol::Request>) {
    let bundle = Bundle::new(RESOLV_CONF);
    let socket = bundle.path().join("agent.sock");
    let socket_arg = socket.to_str().expect("a UTF-8 path").to_string();
    bundle.configure(
        &["sh", "-c", &fetch_script(&[])],
        &sandbox_network(bed),
        &[("netleash.policy", ALLOWS_10)],
        Some(&["--socket", &socket_arg]),
    );
    let agent = fake_agent(&socket, reply);
    (bundle, agent)
}

#[test]
fn with_an_agent_the_hook_hands_the_container_over_and_obeys_its_answer() {
    let bed = support::testbed();

    let accepted = protocol::Response::Ok {
        reply: protocol::Reply::Sandbox(protocol::SandboxStatus {
            digest: "sha256:test".into(),
            ..Default::default()
        }),
    };
    let (bundle, agent) = with_fake_agent(&bed, accepted);
    let (container, output) = bundle.run();
    let request = agent.join().expect("the fake agent");
    assert!(output.status.success(), "{}", describe(&output));
    assert!(bundle.marker_dir().join("ran").exists());
    match request {
        protocol::Request::Put(protocol::Put {
            id,
            netns,
            pid: Some(pid),
            policy,
            origin,
            agent: None,
            // A container waits for its rules, not for its names' lookups.
            reply_when: protocol::ReplyWhen::RulesInForce,
        }) => {
            assert_eq!(id, container.id);
            assert_eq!(
                netns,
                std::path::PathBuf::from(format!("/proc/{pid}/ns/net"))
            );
            assert_eq!(policy, ALLOWS_10);
            assert_eq!(
                origin,
                format!("annotation netleash.policy of container {}", container.id)
            );
        }
        other => panic!("expected a put with a pid, got {other:?}"),
    }
    // The agent enforces, not the hook: this stand-in enforced nothing.
    assert_eq!(netleash_table(bed.sandbox()), None);

    let failed = protocol::Response::Error {
        kind: protocol::FailureKind::System,
        message: "cannot enforce".into(),
        causes: vec!["the kernel said no".into()],
    };
    let (refused, agent) = with_fake_agent(&bed, failed);
    let (_container, output) = refused.run();
    agent.join().expect("the fake agent");
    assert_refused(
        &refused,
        &output,
        &["the netleash agent refused the request: cannot enforce: the kernel said no"],
    );
}

/// `sandbox list --json` of the agent at `socket`: every sandbox it enforces.
pub(crate) fn listed_sandboxes(socket: &str) -> Vec<protocol::SandboxStatus> {
    let output = support::netleash(&["sandbox", "list", "--json", "--socket", socket]);
    assert!(output.status.success(), "{}", describe(&output));
    match serde_json::from_slice(&output.stdout) {
        Ok(protocol::Reply::Sandboxes(all)) => all,
        other => panic!("not a list of sandboxes: {other:?}: {}", describe(&output)),
    }
}

/// `nslookup -type=a NAME` in the container, through its resolv.conf
/// nameserver (the world's DNS server, which the policy redirects to the
/// agent's proxy in the container's namespace). Returns the addresses of
/// the answer, empty when the lookup failed, and busybox's output.
fn lookup(container: &crate::runc::Container, name: &str) -> (Vec<String>, String) {
    let output = container.exec(&["nslookup", "-type=a", name]);
    let text = format!("{}{}", stdout(&output), stderr(&output));
    // busybox prints the server first ("Server: ...", "Address: ...:53"),
    // then "Name: NAME" and one "Address: IP" line per answer.
    let addresses = text
        .split_once(&format!("Name:\t{name}"))
        .map(|(_, answer)| {
            answer
                .lines()
                .filter_map(|line| line.strip_prefix("Address: "))
                .map(|ip| ip.trim().to_string())
                .collect()
        })
        .unwrap_or_default();
    (addresses, text)
}

/// GET / from port 80 of `ip` in the container with busybox nc: the answer,
/// or `FAILED <ip> <exit code>`.
fn fetch(container: &crate::runc::Container, ip: &str) -> String {
    let script = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 {ip} 80 2>&1 || echo \"FAILED {ip} $?\""
    );
    let output = container.exec(&["sh", "-c", &script]);
    assert!(output.status.success(), "runc exec: {}", describe(&output));
    stdout(&output)
}

/// Assert that the container reaches 198.51.100.10 and that 198.51.100.11
/// is rejected at once (a TCP reset, not nc's 5 s timeout) without reaching
/// the world.
fn assert_only_10_reachable_from(bed: &Testbed, container: &crate::runc::Container, when: &str) {
    let allowed = fetch(container, "198.51.100.10");
    assert!(
        allowed.contains(&body("198.51.100.10")),
        "{when}: {allowed}"
    );
    let before = arrivals(bed, "198.51.100.11");
    let other = fetch(container, "198.51.100.11");
    assert!(
        other.contains("Connection refused") && other.contains("FAILED 198.51.100.11 1"),
        "{when}: {other}"
    );
    assert_eq!(
        arrivals(bed, "198.51.100.11"),
        before,
        "{when}: a blocked connection reached the world"
    );
}

#[test]
fn enforcement_continues_through_an_agent_restart() {
    let bed = support::testbed();
    bed.zone().set(
        "allowed.test",
        &[testbed::ZoneRecord::A("198.51.100.10".parse().unwrap())],
        300,
    );
    bed.zone().set(
        "denied.test",
        &[testbed::ZoneRecord::A("198.51.100.11".parse().unwrap())],
        300,
    );
    let dir = tempfile::tempdir().expect("agent tempdir");
    // The reaper would also forget a sandbox whose container is gone; an
    // hour keeps it out of the way, so only the poststop hook can.
    const REAP: &str = "60m";
    let mut agent = Agent::start_with(&bed, dir.path(), &["--reap-interval", REAP]);
    let socket = agent.socket.to_str().expect("a UTF-8 path").to_string();

    let bundle = Bundle::new(RESOLV_CONF);
    bundle.configure(
        &["sleep", "600"],
        &sandbox_network(&bed),
        &[(
            "netleash.policy",
            r#"{"type": "limited", "allowed_hosts": ["allowed.test"]}"#,
        )],
        Some(&["--socket", &socket, "--timeout", "20"]),
    );
    bundle.set_poststop_hook(
        env!("CARGO_BIN_EXE_netleash"),
        &[
            "netleash",
            "hook",
            "--stage",
            "poststop",
            "--socket",
            &socket,
            "--timeout",
            "20",
        ],
    );
    let (container, output) = bundle.run_detached();
    assert!(
        output.status.success(),
        "runc run: {}\n{}",
        describe(&output),
        agent.logs()
    );
    let record = dir
        .path()
        .join("state/sandboxes")
        .join(format!("{}.json", container.id));
    assert!(
        record.exists(),
        "the agent keeps no state for the container"
    );
    let listed = listed_sandboxes(&socket);
    assert_eq!(listed.len(), 1, "{listed:?}");
    let before = listed[0].clone();
    assert_eq!(before.id, container.id);
    assert!(before.digest.starts_with("sha256:"), "{before:?}");

    // By name, through the agent's proxy in the container's namespace.
    let (addresses, text) = lookup(&container, "allowed.test");
    assert_eq!(addresses, ["198.51.100.10"], "{text}");
    let (addresses, text) = lookup(&container, "denied.test");
    // The proxy answers REFUSED for a name the policy does not allow.
    assert!(
        addresses.is_empty() && text.contains("can't find denied.test: REFUSED"),
        "a name the policy does not allow resolved: {text}"
    );
    assert_only_10_reachable_from(&bed, &container, "with the agent");

    agent.kill_9();
    // Fail closed: the rules and the learned address stay in the kernel.
    assert_only_10_reachable_from(&bed, &container, "with the agent killed");
    let (addresses, text) = lookup(&container, "allowed.test");
    // The redirect to the proxy's port stays, and nothing listens there.
    assert!(
        addresses.is_empty() && text.contains("no servers could be reached"),
        "no proxy answers while the agent is down: {text}"
    );

    // The same state directory: the agent adopts the container's sandbox.
    agent = Agent::start_with(&bed, dir.path(), &["--reap-interval", REAP]);
    let ready = agent.wait_for_line("ready:");
    assert!(ready.contains("adopted 1 sandbox(es), forgot 0"), "{ready}");
    let listed = listed_sandboxes(&socket);
    assert_eq!(
        listed
            .iter()
            .map(|s| (&s.id, &s.digest))
            .collect::<Vec<_>>(),
        [(&before.id, &before.digest)],
        "{listed:?}"
    );
    let (addresses, text) = lookup(&container, "allowed.test");
    assert_eq!(addresses, ["198.51.100.10"], "after the restart: {text}");
    assert_only_10_reachable_from(&bed, &container, "after the restart");

    // runc runs the poststop hook, which tells the agent to forget it.
    let deleted = container.delete();
    assert!(
        deleted.status.success(),
        "runc delete: {}",
        describe(&deleted)
    );
    let listed = listed_sandboxes(&socket);
    assert!(
        listed.is_empty(),
        "the agent still has {listed:?}\n{}",
        agent.logs()
    );
    assert!(!record.exists(), "the container's state file stays");
}
