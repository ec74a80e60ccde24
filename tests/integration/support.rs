//! Helpers for the privileged tests, over `netleash::testbed`.
//!
//! Every privileged test starts with [`testbed`] (or [`require_root`]), which
//! FAILS when the test cannot run: these tests never skip.

use std::io::{BufRead as _, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use netleash::testbed::{self, Outcome, Testbed, Transport, Verdict};

/// Long enough that a connection that should succeed does, even on a busy
/// CI machine; a reject must come far sooner (see [`REJECT_WITHIN`]).
pub const TIMEOUT: Duration = Duration::from_secs(3);
/// netleash rejects (TCP reset, ICMP admin-prohibited) instead of dropping,
/// so a client learns of a block at once, not after a timeout (issue 3, item 7).
pub const REJECT_WITHIN: Duration = Duration::from_millis(100);
/// The resolver every applied policy names: the world's DNS server.
pub const RESOLVER: &str = "198.51.100.53";

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;

/// Fail loudly unless this process is root with the capabilities the
/// testbed needs. Never skip: a privileged test that does not run must be red.
pub fn require_root() {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} line in /proc/self/status"))
            .trim()
            .to_string()
    };
    let euid: u32 = field("Uid:")
        .split_whitespace()
        .nth(1)
        .and_then(|uid| uid.parse().ok())
        .expect("euid");
    let effective = u64::from_str_radix(&field("CapEff:"), 16).expect("CapEff is hex");
    let missing: Vec<&str> = [
        (CAP_NET_ADMIN, "CAP_NET_ADMIN"),
        (CAP_SYS_ADMIN, "CAP_SYS_ADMIN"),
    ]
    .into_iter()
    .filter(|(bit, _)| effective & (1 << bit) == 0)
    .map(|(_, name)| name)
    .collect();
    assert!(
        euid == 0 && missing.is_empty(),
        "PRIVILEGED TEST CANNOT RUN: it needs root with CAP_NET_ADMIN and CAP_SYS_ADMIN \
         (euid {euid}, missing {missing:?}). Run `sudo -E cargo test --test integration`; \
         these tests fail instead of skipping so that CI cannot pass without running them."
    );
}

/// A fresh testbed, or a loud failure.
pub fn testbed() -> Testbed {
    require_root();
    Testbed::new().unwrap_or_else(|err| {
        panic!(
            "cannot build the testbed: {}",
            netleash::cli::render_error(&err)
        )
    })
}

pub fn addr(text: &str) -> IpAddr {
    text.parse()
        .unwrap_or_else(|_| panic!("{text} is not an address"))
}

pub fn connect(bed: &Testbed, ip: &str, port: u16) -> Outcome {
    bed.tcp_connect(addr(ip), port, TIMEOUT)
        .unwrap_or_else(|err| {
            panic!(
                "probe {ip} port {port}: {}",
                netleash::cli::render_error(&err)
            )
        })
}

/// Assert that `ip`:`port` answers HTTP from the sandbox, and that the answer
/// came from that very address and port of the world.
pub fn assert_reachable(bed: &Testbed, ip: &str, port: u16) {
    let at = SocketAddr::new(addr(ip), port);
    let exchange = bed
        .http_get(at.ip(), port, TIMEOUT)
        .unwrap_or_else(|err| panic!("GET {at}: {}", netleash::cli::render_error(&err)));
    let response = exchange
        .reply
        .unwrap_or_else(|| panic!("{at} should be reachable, but: {}", exchange.outcome));
    assert_eq!(response.status, 200, "{at}");
    assert_eq!(
        response.body,
        testbed::http_body(at),
        "{at} answered for another address"
    );
}

/// Assert that a TCP connection to `ip`:`port` is actively rejected within
/// [`REJECT_WITHIN`] and that nothing reached the world.
pub fn assert_rejected(bed: &Testbed, ip: &str, port: u16) {
    let at = SocketAddr::new(addr(ip), port);
    let before = bed.arrivals(Transport::Tcp, at);
    let outcome = connect(bed, ip, port);
    assert!(
        outcome.rejected_within(REJECT_WITHIN),
        "{at} should be rejected within {REJECT_WITHIN:?}, but: {outcome}"
    );
    assert_eq!(
        bed.arrivals(Transport::Tcp, at),
        before,
        "a rejected connection to {at} reached the world"
    );
}

/// Assert that a UDP datagram to `ip`:`port` is rejected fast and never arrives.
pub fn assert_udp_rejected(bed: &Testbed, ip: &str, port: u16) {
    let at = SocketAddr::new(addr(ip), port);
    let before = bed.arrivals(Transport::Udp, at);
    let exchange = bed
        .udp_exchange(at.ip(), port, b"probe", TIMEOUT)
        .unwrap_or_else(|err| panic!("udp {at}: {}", netleash::cli::render_error(&err)));
    assert!(
        exchange.outcome.rejected_within(REJECT_WITHIN),
        "udp {at} should be rejected within {REJECT_WITHIN:?}, but: {}",
        exchange.outcome
    );
    assert_eq!(
        bed.arrivals(Transport::Udp, at),
        before,
        "a rejected datagram to {at} reached the world"
    );
}

/// Assert that a UDP datagram to `ip`:`port` comes back as sent.
pub fn assert_udp_echoed(bed: &Testbed, ip: &str, port: u16) {
    let payload = format!("echo {ip} {port}");
    let exchange = bed
        .udp_exchange(addr(ip), port, payload.as_bytes(), TIMEOUT)
        .unwrap_or_else(|err| panic!("udp {ip} {port}: {}", netleash::cli::render_error(&err)));
    assert_eq!(
        exchange.outcome.verdict,
        Verdict::Connected,
        "udp {ip} port {port}: {}",
        exchange.outcome
    );
    assert_eq!(exchange.reply.as_deref(), Some(payload.as_bytes()));
}

/// Run `netleash ARGS` (the binary under test) and return its output.
pub fn netleash(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_netleash"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run the netleash binary")
}

/// Describe a finished command for an assertion message.
pub fn describe(output: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Write `json` as a policy file named `name` in `dir`.
pub fn write_policy(dir: &Path, name: &str, json: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, json).expect("write the policy file");
    path
}

/// `netleash apply POLICY --netns SANDBOX --resolver 198.51.100.53`.
pub fn apply(bed: &Testbed, policy: &Path) -> Output {
    let policy = policy.to_str().expect("policy path is UTF-8");
    netleash(&[
        "apply",
        policy,
        "--netns",
        bed.sandbox(),
        "--resolver",
        RESOLVER,
    ])
}

/// Apply `policy` and assert that it worked.
pub fn apply_ok(bed: &Testbed, policy: &Path) {
    let output = apply(bed, policy);
    assert!(
        output.status.success(),
        "netleash apply {}: {}",
        policy.display(),
        describe(&output)
    );
}

/// A fresh testbed with `json` applied (written as `name` into the returned
/// directory, which later policies of the test can share).
pub fn enforced(name: &str, json: &str) -> (Testbed, tempfile::TempDir) {
    let bed = testbed();
    let dir = tempfile::tempdir().expect("tempdir");
    apply_ok(&bed, &write_policy(dir.path(), name, json));
    (bed, dir)
}

/// Run `work` on the calling thread while a thread in the sandbox probes,
/// over and over, each `(address, allowed)` of `expectations` on `port`. An
/// allowed address must answer HTTP (a full exchange, which also keeps the
/// loop from outrunning the world's accept queue); any other must be rejected
/// within [`REJECT_WITHIN`]. Returns the number of probes and every wrong
/// verdict. The loop stops when `work` returns or panics.
pub fn probe_while(
    bed: &Testbed,
    expectations: &[(IpAddr, bool)],
    port: u16,
    work: impl FnOnce(),
) -> (u64, Vec<String>) {
    /// Sets the flag when dropped, so a panic in `work` still ends the loop
    /// (otherwise the scope would wait for the prober forever).
    struct StopOnDrop<'a>(&'a AtomicBool);
    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            self.0.store(true, Ordering::Relaxed);
        }
    }
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            bed.in_sandbox(|| {
                let (mut probes, mut wrong) = (0_u64, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    for &(ip, allowed) in expectations {
                        let at = SocketAddr::new(ip, port);
                        let wrong_verdict = if allowed {
                            let exchange = expect_probe(
                                at,
                                testbed::probe::http_get(at, Duration::from_secs(1)),
                            );
                            match exchange.reply {
                                Some(response) if response.body == testbed::http_body(at) => None,
                                Some(response) => Some(format!("answered {response:?}")),
                                None => Some(exchange.outcome.to_string()),
                            }
                        } else {
                            let outcome = expect_probe(
                                at,
                                testbed::probe::tcp_connect(at, Duration::from_secs(1)),
                            );
                            (!outcome.rejected_within(REJECT_WITHIN)).then(|| outcome.to_string())
                        };
                        probes += 1;
                        if let Some(verdict) = wrong_verdict {
                            wrong.push(format!("{at} (allowed: {allowed}): {verdict}"));
                        }
                    }
                }
                (probes, wrong)
            })
            .expect("run the prober in the sandbox")
        });
        {
            let _stop = StopOnDrop(&stop);
            work();
        }
        prober
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

fn expect_probe<T>(at: SocketAddr, result: Result<T, testbed::Error>) -> T {
    result.unwrap_or_else(|err| panic!("probe {at}: {}", netleash::cli::render_error(&err)))
}

/// Run `COMMAND ARGS` inside the network namespace `netns` (`ip netns exec`).
pub fn exec_in(netns: &str, command: &[&str], stdin: Option<&str>) -> Output {
    let args: Vec<&str> = ["netns", "exec", netns]
        .into_iter()
        .chain(command.iter().copied())
        .collect();
    testbed::run_command("ip", &args, stdin).unwrap_or_else(|err| {
        panic!(
            "run {command:?} in {netns}: {}",
            netleash::cli::render_error(&err)
        )
    })
}

/// Load an nftables ruleset into `netns` with `nft -f -`, bypassing netleash.
pub fn nft_load(netns: &str, ruleset: &str) {
    let output = exec_in(netns, &["nft", "-f", "-"], Some(ruleset));
    assert!(
        output.status.success(),
        "nft -f in {netns}: {}",
        describe(&output)
    );
}

/// `nft list table inet netleash` in `netns`, with every counter value
/// replaced by `N`, so two listings compare equal when only traffic differs.
/// `None` when the table does not exist.
pub fn netleash_table(netns: &str) -> Option<String> {
    let output = exec_in(netns, &["nft", "list", "table", "inet", "netleash"], None);
    if !output.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let mut normalized = Vec::new();
    let mut previous = "";
    for word in text.split_whitespace() {
        normalized.push(if previous == "packets" || previous == "bytes" {
            "N"
        } else {
            word
        });
        previous = word;
    }
    Some(normalized.join(" "))
}

/// Whether /run/netns/NAME exists.
pub fn netns_exists(name: &str) -> bool {
    testbed::netns_path(name).exists()
}

/// A started child process (a long-running `netleash` command) whose stdout
/// lines and stderr text are collected as it writes them, killed on drop;
/// its output is printed when the test is failing.
pub struct LoggedChild {
    pub child: std::process::Child,
    /// What the logs call it: `agent`, `sidecar`.
    name: &'static str,
    stdout: Arc<Mutex<Vec<String>>>,
    stderr: Arc<Mutex<String>>,
}

/// Why [`LoggedChild::wait_for_line`] found no line.
pub enum LineMissing {
    Exited(std::process::ExitStatus),
    TimedOut,
}

impl LoggedChild {
    /// Starts `command` with stdin closed and its output collected, or panics
    /// with "start netleash NAME".
    pub fn spawn(mut command: Command, name: &'static str) -> LoggedChild {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("start netleash {name}: {err:?}"));
        let stdout = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stdout.take().expect("stdout is piped");
        let lines = stdout.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        });
        let pipe = child.stderr.take().expect("stderr is piped");
        let text = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                let mut text = text.lock().unwrap();
                text.push_str(&line);
                text.push('\n');
            }
        });
        LoggedChild {
            child,
            name,
            stdout,
            stderr,
        }
    }

    /// The stdout lines so far.
    pub fn stdout(&self) -> MutexGuard<'_, Vec<String>> {
        self.stdout.lock().unwrap()
    }

    /// The stderr text so far.
    pub fn stderr(&self) -> MutexGuard<'_, String> {
        self.stderr.lock().unwrap()
    }

    /// The first stdout line containing `needle`, waiting up to `limit`.
    pub fn wait_for_line(&mut self, needle: &str, limit: Duration) -> Result<String, LineMissing> {
        let started = Instant::now();
        loop {
            if let Some(line) = self.stdout().iter().find(|l| l.contains(needle)) {
                return Ok(line.clone());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(LineMissing::Exited(status));
            }
            if started.elapsed() >= limit {
                return Err(LineMissing::TimedOut);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The JSON log events (`--log-format json`) on stderr whose message is `message`.
    pub fn json_events(&self, message: &str) -> Vec<serde_json::Value> {
        self.stderr()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|event| event["fields"]["message"] == message)
            .collect()
    }

    pub fn logs(&self) -> String {
        format!(
            "--- {name} stdout\n{}\n--- {name} stderr\n{}",
            self.stdout().join("\n"),
            self.stderr(),
            name = self.name
        )
    }
}

impl Drop for LoggedChild {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}
