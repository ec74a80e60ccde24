//! DNS under load, side by side in one run: `dnsperf` against
//!
//! - `direct`:   the upstream itself (the baseline);
//! - `netleash`: the real `netleash sidecar` binary enforcing a policy in a
//!   sandbox namespace (redirect of port 53, filtering proxy, learned
//!   addresses written into the kernel sets before each answer is released);
//! - `dnsmasq`:  dnsmasq with `--nftset` doing the same job in a sandbox
//!   namespace of its own (a redirect of port 53 to it, forwarding only the
//!   allowed zone, adding each answer's addresses to an nftables set).
//!
//! Plus the sidecar's memory with 1,000 allowed exact names.
//!
//! Run as root: `cargo bench --bench dns_load` (`-- --quick` for a short run,
//! `-- --memory` for the memory only, `-- --hits` for 9 rounds of the
//! cache-hit saturation workload alone). Besides the rates, it reports each
//! server's CPU time per answered hit, which the machine's other load
//! disturbs far less than the rates.
//! Needs `ip` (iproute2), `nft` (nftables), `dnsperf` and `dnsmasq` built
//! with nftset support (Debian: `apt-get install iproute2 nftables dnsperf
//! dnsmasq-base`).
//!
//! Topology, all created here and deleted at the end (also on panic):
//!
//! ```text
//!   direct   netns  192.0.2.2/30  ──veth──  192.0.2.1/30  ┐
//!   netleash netns  192.0.2.6/30  ──veth──  192.0.2.5/30  ├ world netns, upstream
//!   dnsmasq  netns  192.0.2.10/30 ──veth──  192.0.2.9/30  ┘ 198.51.100.53 on lo
//! ```
//!
//! Network safety: every address is a documentation (RFC 5737) or
//! benchmarking (RFC 2544, in DNS answers only) address inside these
//! namespaces; the veth pairs are born inside them, nothing is created in
//! the caller's namespace except the sidecar's health listener on
//! 127.0.0.1. Both dnsmasq instances get `--conf-file=/dev/null --no-resolv
//! --no-hosts` and bind only addresses of their own namespace, so neither
//! reads the machine's configuration or sends anything outside.
//!
//! The upstream is dnsmasq acting as an authoritative server: `--synth-domain`
//! answers `h-A-B-C-D.bench.test` with the address A.B.C.D for every address
//! of 198.18.0.0/15 (TTL 300), synthesised per query and never cached, so
//! there are 131,072 distinct names with distinct addresses.

use std::fmt::Write as _;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use netleash::testbed::{Transport, dns_query, run_command, run_in_netns};

/// The upstream's address, on the world's loopback. Every client queries it;
/// in the netleash and dnsmasq sandboxes the query is redirected.
const UPSTREAM: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 53);
/// The zone the upstream synthesises and the policies allow.
const ZONE: &str = "bench.test";
/// A name outside the allowed zone: both filters must refuse it.
const NOT_ALLOWED: &str = "exfiltrate.example";
/// How many names the cache-hit workload repeats.
const HIT_NAMES: u32 = 10;
/// The sidecar's memory goal (issue 4), with this many allowed exact names.
const RSS_NAMES: u32 = 1_000;
const RSS_GOAL_KB: u64 = 16 * 1024;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Config {
    Direct,
    Netleash,
    Dnsmasq,
}

const CONFIGS: [Config; 3] = [Config::Direct, Config::Netleash, Config::Dnsmasq];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Config::Direct => "direct",
            Config::Netleash => "netleash",
            Config::Dnsmasq => "dnsmasq",
        }
    }

    /// The /30 of this sandbox's link to the world: (sandbox, world) addresses.
    fn link(self) -> (Ipv4Addr, Ipv4Addr) {
        let base = match self {
            Config::Direct => 0,
            Config::Netleash => 4,
            Config::Dnsmasq => 8,
        };
        (
            Ipv4Addr::new(192, 0, 2, base + 2),
            Ipv4Addr::new(192, 0, 2, base + 1),
        )
    }
}

struct Settings {
    rounds: usize,
    /// Length of a saturation measurement.
    saturation: Duration,
    /// The fixed rate of the latency measurements, and their length.
    rate: u32,
    latency: Duration,
    rss_runs: usize,
    /// Only the cache-hit saturation workload (`-- --hits`): a quick,
    /// steadier comparison of the hit path over more rounds.
    hits_only: bool,
}

// ---------------------------------------------------------------- checks

fn fail(message: &str) -> ! {
    eprintln!("dns_load: {message}");
    std::process::exit(2);
}

/// Every tool this benchmark runs, with the package that has it.
fn check_tools() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        fail("needs root (it creates network namespaces and nftables tables); run it with sudo");
    }
    for (tool, args, package) in [
        ("ip", &["-V"][..], "iproute2"),
        ("nft", &["--version"][..], "nftables"),
        ("dnsperf", &["-h"][..], "dnsperf"),
        ("dnsmasq", &["--version"][..], "dnsmasq-base"),
    ] {
        match Command::new(tool).args(args).output() {
            Ok(output) => {
                if tool == "dnsmasq" {
                    let text = String::from_utf8_lossy(&output.stdout);
                    if !text.contains(" nftset") || text.contains("no-nftset") {
                        fail(
                            "this dnsmasq is built without nftset support; install Debian's \
                             dnsmasq-base (2.87 or later): apt-get install dnsmasq-base",
                        );
                    }
                }
            }
            Err(_) => fail(&format!(
                "`{tool}` is not installed; install it with: apt-get install {package}"
            )),
        }
    }
}

fn version(program: &str, args: &[&str]) -> String {
    Command::new(program)
        .args(args)
        .output()
        .map(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines()
                .find(|l| l.contains("ersion") || l.contains("nftables"))
                .unwrap_or("")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------- topology

/// The four namespaces; deletes exactly those it created, on drop too.
struct Topology {
    world: String,
    created: Vec<String>,
    prefix: String,
}

impl Topology {
    fn new() -> Topology {
        let prefix = format!("nldns-{}", std::process::id());
        let mut topology = Topology {
            world: format!("{prefix}-wld"),
            created: Vec::new(),
            prefix,
        };
        let mut names = vec![topology.world.clone()];
        names.extend(CONFIGS.iter().map(|c| topology.sandbox(*c)));
        for name in names {
            run("ip", &["netns", "add", &name], None);
            topology.created.push(name);
        }
        let world = topology.world.clone();
        let mut world_batch = format!("link set lo up\naddress add {UPSTREAM}/32 dev lo\n");
        for config in CONFIGS {
            let (inside, gateway) = config.link();
            let peer = format!("veth-{}", config.name());
            // Born in the sandbox, its peer straight in the world: neither
            // end ever exists in the caller's namespace.
            let batch = format!(
                "link set lo up\n\
                 link add veth-sbx type veth peer name {peer} netns {world}\n\
                 link set veth-sbx up\n\
                 address add {inside}/30 dev veth-sbx\n"
            );
            ip_batch(&topology.sandbox(config), &batch);
            let _ = write!(
                world_batch,
                "link set {peer} up\naddress add {gateway}/30 dev {peer}\n"
            );
        }
        ip_batch(&world, &world_batch);
        for config in CONFIGS {
            let (_, gateway) = config.link();
            ip_batch(
                &topology.sandbox(config),
                &format!("route add default via {gateway} dev veth-sbx\n"),
            );
        }
        topology
    }

    fn sandbox(&self, config: Config) -> String {
        format!("{}-{}", self.prefix, config.name())
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        while let Some(name) = self.created.pop() {
            let _ = Command::new("ip").args(["netns", "delete", &name]).status();
        }
    }
}

fn ip_batch(netns: &str, commands: &str) {
    run("ip", &["-n", netns, "-batch", "-"], Some(commands));
}

/// Run a command to completion; panic with its stderr if it fails.
fn run(program: &str, args: &[&str], stdin: Option<&str>) -> String {
    let output =
        run_command(program, args, stdin).unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

// ---------------------------------------------------------------- processes

/// A child process (a server) stopped with SIGTERM, then SIGKILL, on drop.
struct Server {
    child: Child,
    what: &'static str,
}

impl Server {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// VmRSS and VmHWM in kB.
    fn memory(&self) -> (u64, u64) {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .unwrap_or_else(|e| panic!("{} exited? {e}", self.what));
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|kb| kb.parse().ok())
                .unwrap_or_else(|| panic!("no {key} in /proc/PID/status"))
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("{} exited early: {status}", self.what);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child, which has not been waited for.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// User + system CPU time of every thread of process `pid` (proc(5):
/// fields 14 and 15 of /proc/PID/stat, in clock ticks).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap_or_else(|e| panic!("process {pid} exited? {e}"));
    // The command name (field 2) may hold spaces; the fields after it do not.
    let after_name = &stat[stat.rfind(')').expect("/proc/PID/stat format") + 1..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_micros(ticks * 1_000_000 / per_second)
}

/// The upstream: dnsmasq as an authoritative server for the zone, in the world.
fn start_upstream(topology: &Topology, dir: &Path) -> Server {
    let log = std::fs::File::create(dir.join("upstream.log")).expect("log file");
    let child = Command::new("ip")
        .args(["netns", "exec", &topology.world, "dnsmasq"])
        .args(dnsmasq_common())
        .arg(format!("--listen-address={UPSTREAM}"))
        // Authoritative for *.test: never forwards, NXDOMAIN for unknown names.
        .arg("--local=/test/")
        .arg(format!("--synth-domain={ZONE},198.18.0.0/15,h-"))
        .arg("--local-ttl=300")
        .arg("--cache-size=0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the upstream dnsmasq");
    let mut server = Server {
        child,
        what: "the upstream dnsmasq",
    };
    wait_for_answer(&topology.sandbox(Config::Direct), &mut server, &hit_name(0));
    server
}

/// Options both dnsmasq instances get: nothing from the machine's
/// configuration, bound to the one address given, in the foreground.
fn dnsmasq_common() -> [&'static str; 8] {
    [
        "--keep-in-foreground",
        "--conf-file=/dev/null",
        "--no-resolv",
        "--no-hosts",
        "--no-poll",
        "--pid-file=",
        "--bind-interfaces",
        "--log-facility=-",
    ]
}

/// The nftables table of the dnsmasq sandbox: a redirect of the sandbox's
/// port-53 traffic to dnsmasq (like netleash's), and an egress filter that
/// lets dnsmasq (uid nobody) reach the upstream and everything else only the
/// addresses in the sets.
const DNSMASQ_TABLE: &str = r#"
table inet dnsbench {
  set allowed_v4 { type ipv4_addr; flags timeout; timeout 1h; }
  set allowed_v6 { type ipv6_addr; flags timeout; timeout 1h; }
  chain dns_redirect {
    type nat hook output priority -100; policy accept;
    meta skuid 0 meta l4proto { tcp, udp } th dport 53 redirect to :53
  }
  chain egress {
    type filter hook output priority filter; policy drop;
    oif "lo" accept
    ip daddr 127.0.0.1 meta l4proto { tcp, udp } th dport 53 accept
    ct state established,related accept
    meta skuid != 0 ip daddr 198.51.100.53 meta l4proto { tcp, udp } th dport 53 accept
    meta l4proto { tcp, udp } th dport { 53, 853 } reject
    ip daddr @allowed_v4 accept
    ip6 daddr @allowed_v6 accept
    reject
  }
}
"#;

fn start_dnsmasq(topology: &Topology, dir: &Path) -> Server {
    let netns = topology.sandbox(Config::Dnsmasq);
    let _ = Command::new("ip")
        .args([
            "netns", "exec", &netns, "nft", "delete", "table", "inet", "dnsbench",
        ])
        .stderr(Stdio::null())
        .status();
    run(
        "ip",
        &["netns", "exec", &netns, "nft", "-f", "-"],
        Some(DNSMASQ_TABLE),
    );
    let log = std::fs::File::create(dir.join("dnsmasq.log")).expect("log file");
    let child = Command::new("ip")
        .args(["netns", "exec", &netns, "dnsmasq"])
        .args(dnsmasq_common())
        .arg("--listen-address=127.0.0.1")
        .arg(format!("--server=/{ZONE}/{UPSTREAM}"))
        .arg(format!(
            "--nftset=/{ZONE}/4#inet#dnsbench#allowed_v4,6#inet#dnsbench#allowed_v6"
        ))
        .arg("--cache-size=10000")
        // As many queries in flight as netleash's proxy allows (default 150).
        .arg("--dns-forward-max=1024")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start dnsmasq");
    let mut server = Server {
        child,
        what: "dnsmasq",
    };
    wait_for_answer(&netns, &mut server, &hit_name(0));
    server
}

/// A running sidecar and its health endpoint.
struct Sidecar {
    server: Server,
    health: SocketAddr,
}

/// `probe`: an allowed name, to check that the proxy answers.
fn start_sidecar(topology: &Topology, dir: &Path, policy: &Path, probe: &str) -> Sidecar {
    let netns = topology.sandbox(Config::Netleash);
    // A fresh table each time: no learned element survives from a previous run.
    let _ = Command::new("ip")
        .args([
            "netns", "exec", &netns, "nft", "delete", "table", "inet", "netleash",
        ])
        .stderr(Stdio::null())
        .status();
    let stdout_path = dir.join("sidecar.out");
    let stdout = std::fs::File::create(&stdout_path).expect("log file");
    let stderr = std::fs::File::create(dir.join("sidecar.err")).expect("log file");
    let child = Command::new(env!("CARGO_BIN_EXE_netleash"))
        .arg("sidecar")
        .arg(policy)
        .args(["--netns", &netns, "--upstream", &UPSTREAM.to_string()])
        .args(["--health", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .expect("start netleash sidecar");
    let mut server = Server {
        child,
        what: "netleash sidecar",
    };
    let started = Instant::now();
    let health = loop {
        server.assert_running();
        let text = std::fs::read_to_string(&stdout_path).unwrap_or_default();
        if let Some(at) = text
            .lines()
            .find(|l| l.contains("ready:"))
            .and_then(|l| l.split("health on http://").nth(1))
            .and_then(|rest| rest.split('/').next())
            .and_then(|at| at.parse().ok())
        {
            break at;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the sidecar did not become ready:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    wait_for_answer(&netns, &mut server, probe);
    Sidecar { server, health }
}

/// `GET /healthz` of a sidecar, as JSON.
fn health(at: SocketAddr) -> serde_json::Value {
    let mut stream = TcpStream::connect_timeout(&at, Duration::from_secs(2)).expect("health");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream
        .write_all(b"GET /healthz HTTP/1.0\r\n\r\n")
        .expect("health request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("health reply");
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("health body {body:?}: {e}"))
}

/// Waits until a query from `netns` to the upstream's address gets an
/// answer (for the filters: redirected to them) and checks that a name
/// outside the zone is refused.
fn wait_for_answer(netns: &str, server: &mut Server, name: &str) {
    let to = SocketAddr::from((UPSTREAM, 53));
    let started = Instant::now();
    loop {
        server.assert_running();
        let reply = run_in_netns(netns, || {
            dns_query(
                to,
                name,
                RecordType::A,
                Transport::Udp,
                Duration::from_millis(200),
            )
        })
        .expect("enter namespace")
        .expect("query");
        if let Some(reply) = reply.reply {
            assert_eq!(reply.response_code, ResponseCode::NoError, "{reply:?}");
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "{} does not answer in {netns}",
            server.what
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    if netns.ends_with("-direct") {
        return;
    }
    // UDP: a query or its answer may be lost under load; ask up to 5 times.
    let mut code = None;
    for _ in 0..5 {
        let reply = run_in_netns(netns, || {
            dns_query(
                to,
                NOT_ALLOWED,
                RecordType::A,
                Transport::Udp,
                Duration::from_secs(1),
            )
        })
        .expect("enter namespace")
        .expect("query");
        code = reply.reply.map(|r| r.response_code);
        if code.is_some() {
            break;
        }
    }
    assert_eq!(
        code,
        Some(ResponseCode::Refused),
        "{} must refuse names outside the allowed zone",
        server.what
    );
}

// ---------------------------------------------------------------- names

fn synth_name(addr: Ipv4Addr) -> String {
    let [a, b, c, d] = addr.octets();
    format!("h-{a}-{b}-{c}-{d}.{ZONE}")
}

/// The names the cache-hit workload repeats: 198.19.255.1 and on.
fn hit_name(i: u32) -> String {
    synth_name(Ipv4Addr::new(198, 19, 255, 1 + i as u8))
}

/// Distinct names for cache misses, from `base` on.
fn write_names(path: &Path, base: Ipv4Addr, count: u32) {
    let mut text = String::with_capacity(count as usize * 32);
    for i in 0..count {
        let addr = Ipv4Addr::from(u32::from(base) + i);
        let _ = writeln!(text, "{} A", synth_name(addr));
    }
    std::fs::write(path, text).expect("write names");
}

// ---------------------------------------------------------------- dnsperf

#[derive(Debug, Default, Clone)]
struct Run {
    sent: u64,
    completed: u64,
    noerror: u64,
    qps: f64,
    /// Per-query latencies in µs (only at a fixed rate).
    latencies: Vec<f64>,
    /// The names answered NOERROR (only at a fixed rate).
    answered: Vec<String>,
}

struct Load<'a> {
    names: &'a Path,
    /// Stop after this long.
    limit: Duration,
    /// Go through the file at most once (distinct names) instead of looping.
    once: bool,
    /// Fixed rate; `None` saturates.
    rate: Option<u32>,
}

fn dnsperf(netns: &str, load: &Load) -> Run {
    let limit = format!("{}", load.limit.as_secs_f64());
    let mut args = vec![
        "netns".to_string(),
        "exec".into(),
        netns.into(),
        "dnsperf".into(),
        "-s".into(),
        UPSTREAM.to_string(),
        "-d".into(),
        load.names.display().to_string(),
        "-l".into(),
        limit,
        "-c".into(),
        "4".into(),
        "-t".into(),
        "2".into(),
    ];
    if load.once {
        args.extend(["-n".into(), "1".into()]);
    }
    if let Some(rate) = load.rate {
        args.extend(["-Q".into(), rate.to_string(), "-v".into()]);
    }
    let mut child = Command::new("ip")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run dnsperf");
    let mut run = Run::default();
    let mut summary = String::new();
    for line in BufReader::new(child.stdout.take().expect("piped")).lines() {
        let line = line.expect("dnsperf output");
        // `> NOERROR h-198-18-0-1.bench.test A 0.000123`
        if let Some(rest) = line.strip_prefix("> ") {
            let mut fields = rest.split_whitespace();
            if fields.next() == Some("NOERROR") {
                run.noerror += 1;
                run.answered
                    .extend(fields.clone().next().map(str::to_string));
            }
            if let Some(seconds) = fields.last().and_then(|s| s.parse::<f64>().ok()) {
                run.latencies.push(seconds * 1e6);
            }
        } else {
            summary.push_str(&line);
            summary.push('\n');
        }
    }
    let mut stderr = String::new();
    let _ = child
        .stderr
        .take()
        .expect("piped")
        .read_to_string(&mut stderr);
    let status = child.wait().expect("wait for dnsperf");
    assert!(status.success(), "dnsperf failed: {stderr}\n{summary}");
    let number = |key: &str| -> f64 {
        summary
            .lines()
            .find_map(|l| l.trim().strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {key:?} in dnsperf's output:\n{summary}"))
    };
    run.sent = number("Queries sent:") as u64;
    run.completed = number("Queries completed:") as u64;
    run.qps = number("Queries per second:");
    if load.rate.is_none() {
        run.noerror = summary
            .lines()
            .find_map(|l| l.trim().strip_prefix("Response codes:"))
            .and_then(|rest| {
                let mut words = rest.split_whitespace();
                (words.next() == Some("NOERROR")).then(|| words.next())?
            })
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
    }
    run
}

// ---------------------------------------------------------------- statistics

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

fn median(samples: &[f64]) -> f64 {
    let mut sorted = samples.to_vec();
    percentile(&mut sorted, 0.5)
}

/// One config's results in one round.
#[derive(Debug, Default, Clone)]
struct Round {
    hit_qps: f64,
    /// CPU time of the answering server per answered query in the hit
    /// saturation workload, in µs (the upstream's for `direct`). Less
    /// disturbed by other load on the machine than the rate.
    hit_cpu_us: f64,
    miss_qps: f64,
    hit_p50: f64,
    hit_p99: f64,
    miss_p50: f64,
    miss_p99: f64,
    /// Queries that got no NOERROR answer, over all four measurements.
    failed: u64,
    /// Addresses in the kernel sets after the miss workloads.
    learned: u64,
    /// Distinct miss names answered (the addresses that should be learned).
    miss_answered: u64,
    /// VmRSS / VmHWM of the filter (kB) after the round.
    rss_kb: u64,
    hwm_kb: u64,
}

// ---------------------------------------------------------------- workloads

struct Files {
    hits: PathBuf,
    miss_latency: PathBuf,
    miss_saturation: PathBuf,
}

/// The workloads against the server of process `server` (its CPU time is
/// measured) through the sandbox `netns`.
fn measure(netns: &str, server: u32, files: &Files, settings: &Settings) -> Round {
    let mut round = Round::default();
    // Warm-up: every hit name answered once, so the caches hold them (again
    // if an answer was lost: dnsmasq drops a few queries now and then, and
    // attaches a repeated query to the forward still waiting for the lost
    // answer, for up to its 10 s forward timeout: so retry for 25 s).
    let mut answered = std::collections::BTreeSet::new();
    for attempt in 0..25 {
        if attempt > 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
        let warm = dnsperf(
            netns,
            &Load {
                names: &files.hits,
                limit: Duration::from_secs(5),
                once: true,
                rate: Some(1_000),
            },
        );
        round.failed += warm.sent - warm.noerror.min(warm.sent);
        answered.extend(warm.answered);
        if answered.len() == HIT_NAMES as usize {
            break;
        }
    }
    assert!(
        answered.len() == HIT_NAMES as usize,
        "the warm-up queries were not all answered: {answered:?}"
    );
    let cpu_before = cpu_time(server);
    let hit_sat = dnsperf(
        netns,
        &Load {
            names: &files.hits,
            limit: settings.saturation,
            once: false,
            rate: None,
        },
    );
    round.hit_qps = hit_sat.qps;
    round.hit_cpu_us =
        (cpu_time(server) - cpu_before).as_secs_f64() * 1e6 / hit_sat.completed.max(1) as f64;
    round.failed += hit_sat.sent - hit_sat.noerror.min(hit_sat.sent);
    if settings.hits_only {
        return round;
    }
    let mut hit_lat = dnsperf(
        netns,
        &Load {
            names: &files.hits,
            limit: settings.latency,
            once: false,
            rate: Some(settings.rate),
        },
    );
    round.hit_p50 = percentile(&mut hit_lat.latencies, 0.5);
    round.hit_p99 = percentile(&mut hit_lat.latencies, 0.99);
    let mut miss_lat = dnsperf(
        netns,
        &Load {
            names: &files.miss_latency,
            limit: settings.latency + Duration::from_secs(1),
            once: true,
            rate: Some(settings.rate),
        },
    );
    round.miss_p50 = percentile(&mut miss_lat.latencies, 0.5);
    round.miss_p99 = percentile(&mut miss_lat.latencies, 0.99);
    let miss_sat = dnsperf(
        netns,
        &Load {
            names: &files.miss_saturation,
            limit: settings.saturation,
            once: true,
            rate: None,
        },
    );
    round.miss_qps = miss_sat.qps;
    round.miss_answered = miss_lat.noerror + miss_sat.noerror;
    for run in [&mut hit_lat, &mut miss_lat] {
        round.failed += run.sent - run.noerror.min(run.sent);
    }
    round.failed += miss_sat.sent - miss_sat.noerror.min(miss_sat.sent);
    round
}

/// Elements of an IPv4 set, counted from `nft -j`.
fn set_size(netns: &str, table: &str, set: &str) -> u64 {
    let json = run(
        "ip",
        &[
            "netns", "exec", netns, "nft", "-j", "list", "set", "inet", table, set,
        ],
        None,
    );
    let value: serde_json::Value = serde_json::from_str(&json).expect("nft -j output");
    value["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|i| i["set"]["elem"].as_array()))
        .map_or(0, |elements| elements.len() as u64)
}

fn round_for(
    config: Config,
    upstream: u32,
    topology: &Topology,
    dir: &Path,
    files: &Files,
    settings: &Settings,
) -> Round {
    let netns = topology.sandbox(config);
    let round = match config {
        Config::Direct => return measure(&netns, upstream, files, settings),
        Config::Netleash => {
            let mut sidecar =
                start_sidecar(topology, dir, &dir.join("zone-policy.json"), &hit_name(0));
            let mut round = measure(&netns, sidecar.server.pid(), files, settings);
            sidecar.server.assert_running();
            (round.rss_kb, round.hwm_kb) = sidecar.server.memory();
            let status = health(sidecar.health);
            let v4 = set_size(&netns, "netleash", "dns_v4");
            round.learned = v4;
            assert!(
                status["healthy"].as_bool() == Some(true),
                "sidecar unhealthy: {status}"
            );
            round
        }
        Config::Dnsmasq => {
            let mut dnsmasq = start_dnsmasq(topology, dir);
            let mut round = measure(&netns, dnsmasq.pid(), files, settings);
            dnsmasq.assert_running();
            (round.rss_kb, round.hwm_kb) = dnsmasq.memory();
            round.learned = set_size(&netns, "dnsbench", "allowed_v4");
            round
        }
    };
    // Every answered miss name has its own address, which netleash must
    // have in the set (dnsmasq gives no such guarantee: it is reported).
    assert!(
        config != Config::Netleash || round.learned >= round.miss_answered,
        "{}: {} miss names answered but only {} addresses in the set",
        config.name(),
        round.miss_answered,
        round.learned
    );
    round
}

/// The sidecar's memory with `RSS_NAMES` exact names, after the resolver
/// loop's first round: (VmRSS, VmHWM) in kB per run.
fn sidecar_memory(topology: &Topology, dir: &Path, runs: usize) -> Vec<(u64, u64)> {
    let hosts: Vec<String> = (0..RSS_NAMES)
        .map(|i| {
            synth_name(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(198, 19, 128, 0)) + i,
            ))
        })
        .collect();
    let policy = dir.join("names-policy.json");
    std::fs::write(
        &policy,
        serde_json::json!({"type": "limited", "allowed_hosts": hosts}).to_string(),
    )
    .expect("write policy");
    let mut results = Vec::new();
    for _ in 0..runs {
        let sidecar = start_sidecar(topology, dir, &policy, &hosts[0]);
        // Ready means the first round ran or timed out: check it finished.
        let started = Instant::now();
        loop {
            let status = health(sidecar.health);
            let lookups = status["resolver"]["lookups"].as_u64().unwrap_or(0);
            let names = status["learned"]["names"].as_u64().unwrap_or(0);
            if lookups >= u64::from(RSS_NAMES) * 2 && names >= u64::from(RSS_NAMES) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the resolver loop did not resolve all {RSS_NAMES} names: {status}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let learned = set_size(&topology.sandbox(Config::Netleash), "netleash", "dns_v4");
        if let Ok(status) =
            std::fs::read_to_string(format!("/proc/{}/status", sidecar.server.pid()))
        {
            let parts: Vec<&str> = status
                .lines()
                .filter(|l| {
                    l.starts_with("RssAnon") || l.starts_with("RssFile") || l.starts_with("Threads")
                })
                .collect();
            println!("  {}", parts.join(", ").replace('\t', " "));
        }
        assert!(
            learned >= u64::from(RSS_NAMES),
            "only {learned} addresses in the set"
        );
        results.push(sidecar.server.memory());
        let _ = std::fs::copy(
            format!("/proc/{}/smaps", sidecar.server.pid()),
            "/tmp/sidecar-smaps.txt",
        );
    }
    results
}

// ---------------------------------------------------------------- main

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let memory_only = std::env::args().any(|a| a == "--memory");
    let hits_only = std::env::args().any(|a| a == "--hits");
    let mut settings = if quick {
        Settings {
            rounds: 2,
            saturation: Duration::from_secs(2),
            rate: 1_000,
            latency: Duration::from_secs(2),
            rss_runs: 2,
            hits_only,
        }
    } else {
        Settings {
            rounds: 5,
            saturation: Duration::from_secs(4),
            rate: 1_000,
            latency: Duration::from_secs(4),
            rss_runs: 5,
            hits_only,
        }
    };
    if hits_only {
        settings.rounds = 9;
    }
    check_tools();
    let topology = Topology::new();
    let dir = std::env::temp_dir().join(format!("netleash-dns-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let hits: String = (0..HIT_NAMES)
        .map(|i| format!("{} A\n", hit_name(i)))
        .collect();
    let files = Files {
        hits: dir.join("hits.txt"),
        miss_latency: dir.join("miss-latency.txt"),
        miss_saturation: dir.join("miss-saturation.txt"),
    };
    std::fs::write(&files.hits, hits).expect("write names");
    let latency_queries = settings.rate * (settings.latency.as_secs() as u32 + 1);
    write_names(
        &files.miss_latency,
        Ipv4Addr::new(198, 19, 0, 0),
        latency_queries,
    );
    write_names(&files.miss_saturation, Ipv4Addr::new(198, 18, 0, 0), 65_536);
    std::fs::write(
        dir.join("zone-policy.json"),
        format!(r#"{{"type": "limited", "allowed_hosts": ["*.{ZONE}"]}}"#),
    )
    .expect("write policy");

    println!("DNS load: dnsperf against the upstream, netleash sidecar and dnsmasq --nftset");
    println!(
        "  {} | {} | {} | {}",
        version("dnsperf", &["-h"]),
        version("dnsmasq", &["--version"]),
        version("nft", &["--version"]),
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    println!(
        "  {} rounds; saturation {} s; latency at {} qps for {} s; miss names are distinct",
        settings.rounds,
        settings.saturation.as_secs(),
        settings.rate,
        settings.latency.as_secs()
    );

    let upstream = start_upstream(&topology, &dir);
    if memory_only {
        report_memory(&topology, &dir, &settings);
        return;
    }
    let mut results: Vec<Vec<Round>> = vec![Vec::new(); CONFIGS.len()];
    println!(
        "{:>5} {:>9} | {:>9} {:>8} {:>9} | {:>7} {:>7} {:>7} {:>7} | {:>6} {:>7} {:>7} | {:>8} {:>8}",
        "round",
        "config",
        "hit qps",
        "hit µs/q",
        "miss qps",
        "hit p50",
        "hit p99",
        "mis p50",
        "mis p99",
        "failed",
        "learned",
        "answered",
        "RSS kB",
        "HWM kB"
    );
    for round in 0..settings.rounds {
        // Rotate the order, so no config always runs first or last.
        for k in 0..CONFIGS.len() {
            let index = (round + k) % CONFIGS.len();
            let config = CONFIGS[index];
            let r = round_for(config, upstream.pid(), &topology, &dir, &files, &settings);
            println!(
                "{:>5} {:>9} | {:>9.0} {:>8.2} {:>9.0} | {:>7.0} {:>7.0} {:>7.0} {:>7.0} | {:>6} {:>7} {:>7} | {:>8} {:>8}",
                round + 1,
                config.name(),
                r.hit_qps,
                r.hit_cpu_us,
                r.miss_qps,
                r.hit_p50,
                r.hit_p99,
                r.miss_p50,
                r.miss_p99,
                r.failed,
                r.learned,
                r.miss_answered,
                r.rss_kb,
                r.hwm_kb
            );
            results[index].push(r);
        }
    }

    println!(
        "\nmedians over {} rounds (latencies in µs):",
        settings.rounds
    );
    println!(
        "{:>9} | {:>9} {:>8} {:>9} | {:>7} {:>7} {:>7} {:>7}",
        "config", "hit qps", "hit µs/q", "miss qps", "hit p50", "hit p99", "mis p50", "mis p99"
    );
    let med = |index: usize, f: fn(&Round) -> f64| {
        median(&results[index].iter().map(f).collect::<Vec<_>>())
    };
    for (index, config) in CONFIGS.iter().enumerate() {
        println!(
            "{:>9} | {:>9.0} {:>8.2} {:>9.0} | {:>7.0} {:>7.0} {:>7.0} {:>7.0}",
            config.name(),
            med(index, |r| r.hit_qps),
            med(index, |r| r.hit_cpu_us),
            med(index, |r| r.miss_qps),
            med(index, |r| r.hit_p50),
            med(index, |r| r.hit_p99),
            med(index, |r| r.miss_p50),
            med(index, |r| r.miss_p99),
        );
    }
    // Added latency: per round, config p50 minus direct p50; median of those.
    let added = |index: usize, f: fn(&Round) -> f64| {
        let diffs: Vec<f64> = results[index]
            .iter()
            .zip(&results[0])
            .map(|(r, d)| f(r) - f(d))
            .collect();
        median(&diffs)
    };
    let ratio = |a: usize, b: usize, f: fn(&Round) -> f64| {
        let ratios: Vec<f64> = results[a]
            .iter()
            .zip(&results[b])
            .map(|(x, y)| f(x) / f(y))
            .collect();
        median(&ratios)
    };
    for (index, config) in CONFIGS.iter().enumerate().skip(1) {
        println!(
            "{:>9}: added p50 {:.0} µs (hits), {:.0} µs (misses); qps vs direct {:.2}× (hits), {:.2}× (misses)",
            config.name(),
            added(index, |r| r.hit_p50),
            added(index, |r| r.miss_p50),
            ratio(index, 0, |r| r.hit_qps),
            ratio(index, 0, |r| r.miss_qps),
        );
    }
    println!(
        " netleash vs dnsmasq: qps {:.2}× (hits), {:.2}× (misses); p50 {:.2}× (hits), {:.2}× (misses)",
        ratio(1, 2, |r| r.hit_qps),
        ratio(1, 2, |r| r.miss_qps),
        ratio(1, 2, |r| r.hit_p50),
        ratio(1, 2, |r| r.miss_p50),
    );
    let per_round = |f: fn(&Round) -> f64| {
        results[1]
            .iter()
            .zip(&results[2])
            .map(|(x, y)| format!("{:.2}", f(x) / f(y)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        " netleash / dnsmasq qps per round: hits {}; misses {}",
        per_round(|r| r.hit_qps),
        per_round(|r| r.miss_qps)
    );
    println!(
        " netleash / dnsmasq CPU per hit: {:.2}× (rounds: {})",
        ratio(1, 2, |r| r.hit_cpu_us),
        per_round(|r| r.hit_cpu_us)
    );

    if !settings.hits_only {
        report_memory(&topology, &dir, &settings);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

fn report_memory(topology: &Topology, dir: &Path, settings: &Settings) {
    let memory = sidecar_memory(topology, dir, settings.rss_runs);
    let rss: Vec<f64> = memory.iter().map(|(rss, _)| *rss as f64).collect();
    let hwm: Vec<f64> = memory.iter().map(|(_, hwm)| *hwm as f64).collect();
    println!(
        "\nsidecar with {RSS_NAMES} exact names after the first round, {} runs: VmRSS {:?} kB, VmHWM {:?} kB",
        memory.len(),
        rss,
        hwm
    );
    let rss_median = median(&rss);
    println!(
        "  median VmRSS {:.0} kB ({:.1} MB), VmHWM {:.0} kB: goal ≤ {} kB {}",
        rss_median,
        rss_median / 1024.0,
        median(&hwm),
        RSS_GOAL_KB,
        if rss_median <= RSS_GOAL_KB as f64 {
            "met"
        } else {
            "NOT met"
        }
    );
}
