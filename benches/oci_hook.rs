//! Container start overhead of `netleash hook`: `runc run` of a trivial
//! container (`/bin/true` in a fresh network namespace), without a hook and
//! with `netleash hook` at createRuntime enforcing a typical policy,
//! interleaved run by run so all see the same machine load. The kinds:
//!
//! - no hook;
//! - `/bin/true` as the hook: runc's own cost of running any hook, the peer
//!   netleash's own part is measured against;
//! - the netleash hook on a container without the annotation: its process
//!   start and reading the state and config.json;
//! - `netleash hook --standalone`: the hook compiles and applies the policy
//!   itself;
//! - `netleash hook` (agent mode, the default): the hook hands the container
//!   to a running `netleash agent` and waits for its reply, which comes once
//!   the rules are in force.
//!
//! The agent runs in the world namespace of a testbed, whose DNS server
//! (started by the benchmark) answers the policy's names: no traffic leaves
//! the namespaces the benchmark creates. The testbed's sandbox namespace holds
//! a resident sandbox with the same policy, as on a host where other
//! containers with that policy run, so the agent already tracks its names
//! (a container whose names are new to the agent also waits for their first
//! lookups). The agent forgets each container when its reaper finds the
//! container's process gone, as it does for a container whose poststop hook
//! did not run; a poststop hook would add a second netleash process to each
//! `runc run`, after the workload.
//!
//! `cargo bench --bench oci_hook` as root; `NETLEASH_BENCH_RUNS` sets the
//! number of runs of each kind (default 40). `NETLEASH_BENCH_HOOK_BIN` runs
//! another netleash binary as the hook and the agent (default: the one cargo
//! built for the benchmark), and `NETLEASH_BENCH_BASELINE_BIN` adds two kinds that run a
//! second binary's hook (no annotation, and standalone) in the same rounds.
//! Then the agent's part alone: the round trip of the hook's Put into a
//! fresh namespace (`NETLEASH_BENCH_BASELINE_AGENT_BIN` adds a second agent
//! from another binary, Puts alternating between the two).
//! Needs runc and busybox-static.

// Shared with the integration tests, which use the parts this file does not.
#[allow(dead_code)]
#[path = "../tests/integration/runc.rs"]
mod runc;

use std::io::{BufRead as _, BufReader};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use netleash::agent::protocol::{self, Put, ReplyWhen, Request};
use netleash::cli::render_error;
use netleash::testbed::{Testbed, ZoneRecord, netns_path};
use runc::{Bundle, Network};

/// A typical sandbox policy: a dozen entries of every kind. The names stay
/// blocked in standalone mode (a warning says so) but are compiled all the same.
const TYPICAL_POLICY: &str = r#"{"type": "limited", "allowed_hosts": [
    "api.example.com", "*.cdn.example.net", "https://registry.example.org",
    "198.51.100.10", "https://198.51.100.11", "203.0.113.0/28", "[2001:db8:100::10]:443",
    "2001:db8:200::/48", "192.0.2.80:8080", "http://updates.example.com",
    "198.51.100.20:5432", "mirror.example.com"]}"#;

/// The exact names of [`TYPICAL_POLICY`], which the testbed's DNS server
/// answers for the agent.
const POLICY_NAMES: [&str; 4] = [
    "api.example.com",
    "registry.example.org",
    "updates.example.com",
    "mirror.example.com",
];

const WARM_UP_RUNS: usize = 5;
const DEFAULT_RUNS: usize = 40;

/// One kind of container start the benchmark times.
struct Arm {
    name: String,
    bundle: Bundle,
    /// Wall-clock time of each `runc run`.
    wall: Vec<Duration>,
    /// CPU time (user + system) of each `runc run` and every process it
    /// waited for: runc, the hook, the container. Unlike wall-clock time, it
    /// does not grow when other work competes for the CPUs.
    cpu: Vec<Duration>,
}

/// `netleash agent` in the testbed's world namespace, killed on drop.
struct AgentProcess {
    child: Child,
    _dir: tempfile::TempDir,
    socket: String,
}

impl AgentProcess {
    /// `binary agent` in the testbed's world namespace, with a resident
    /// sandbox of the typical policy in `resident` (a namespace path), so
    /// its names are tracked and cached.
    fn start(bed: &Testbed, binary: &str, resident: &Path) -> AgentProcess {
        let dir = tempfile::tempdir().expect("agent tempdir");
        let socket = dir.path().join("agent.sock");
        let mut child = Command::new("ip")
            .args(["netns", "exec", bed.world(), binary])
            .arg("agent")
            .arg("--socket")
            .arg(&socket)
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--upstream", "198.51.100.53", "--log", "warn"])
            .args(["--reap-interval", "200ms"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let mut ready = String::new();
        BufReader::new(child.stdout.take().expect("the agent's stdout"))
            .read_line(&mut ready)
            .expect("the agent's ready line");
        assert!(
            ready.contains("ready:"),
            "the agent did not start: {ready:?}"
        );
        let agent = AgentProcess {
            child,
            socket: socket.to_str().expect("a UTF-8 path").to_string(),
            _dir: dir,
        };
        let resident = Request::Put(Put {
            id: "resident".into(),
            netns: resident.to_path_buf(),
            pid: None,
            policy: TYPICAL_POLICY.into(),
            origin: "the benchmark's resident sandbox".into(),
            agent: None,
            reply_when: ReplyWhen::default(),
        });
        protocol::call(Path::new(&agent.socket), &resident, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("put the resident sandbox: {}", render_error(&e)));
        agent
    }

    /// The agent's CPU time so far (user + system, /proc/PID/stat); `ip
    /// netns exec` execs the agent, so the child is the agent.
    fn cpu(&self) -> Duration {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))
            .expect("the agent's /proc/PID/stat");
        // The fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat[stat.rfind(')').expect("a stat line") + 2..]
            .split(' ')
            .collect();
        // utime and stime are fields 14 and 15 (proc(5)), 12 and 13 here.
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // SAFETY: sysconf only reads a configuration value.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
        Duration::from_nanos(ticks * 1_000_000_000 / per_second)
    }

    /// One Put of the typical policy into a fresh namespace, as the hook
    /// sends it (`reply_when: rules_in_force`): its round trip and the
    /// agent's CPU time meanwhile. The sandbox and the namespace are removed
    /// afterwards, outside the timing.
    fn timed_put(&self, tag: &str) -> (Duration, Duration) {
        let name = format!("nl-bench-put-{}-{tag}", std::process::id());
        let ip = |args: &[&str]| {
            let status = Command::new("ip").args(args).status().expect("run ip");
            assert!(status.success(), "ip {args:?}");
        };
        ip(&["netns", "add", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        let put = Request::Put(Put {
            id: name.clone(),
            netns: netns_path(&name),
            pid: None,
            policy: TYPICAL_POLICY.into(),
            origin: "the benchmark's container".into(),
            agent: None,
            reply_when: ReplyWhen::RulesInForce,
        });
        let socket = Path::new(&self.socket);
        let cpu = self.cpu();
        let started = Instant::now();
        protocol::call(socket, &put, Duration::from_secs(30))
            .unwrap_or_else(|e| panic!("put {name}: {}", render_error(&e)));
        let took = started.elapsed();
        let cpu = self.cpu() - cpu;
        protocol::call(
            socket,
            &Request::Delete { id: name.clone() },
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| panic!("delete {name}: {}", render_error(&e)));
        ip(&["netns", "delete", &name]);
        (took, cpu)
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn main() {
    // Criterion-style arguments (`--bench`) are ignored.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the OCI hook benchmark runs containers with runc: run it as root"
    );
    // cargo runs a benchmark with LD_LIBRARY_PATH naming target/ and the
    // toolchain's directories. runc gives a hook without an "env" its own
    // environment, so every hook process would first look for each of its
    // libraries in those directories (about 0.2 ms for netleash's, measured
    // with `perf stat`), which no runtime started by podman, CRI-O or
    // systemd does. Nothing this benchmark starts needs the variable.
    // SAFETY: no other thread of this process runs yet.
    unsafe { std::env::remove_var("LD_LIBRARY_PATH") };
    let runs: usize = std::env::var("NETLEASH_BENCH_RUNS")
        .ok()
        .map(|n| n.parse().expect("NETLEASH_BENCH_RUNS is a number"))
        .unwrap_or(DEFAULT_RUNS);

    let bed = Testbed::new().expect("build the testbed");
    for (i, name) in POLICY_NAMES.iter().enumerate() {
        let v4 = Ipv4Addr::new(198, 18, 0, i as u8 + 1);
        bed.zone().set(name, &[ZoneRecord::A(v4)], 300);
    }

    // The netleash binary the hooks run, and an optional second one (an
    // older build, say) whose hook runs in the same rounds for a before/after.
    let hook_binary = std::env::var("NETLEASH_BENCH_HOOK_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_netleash").to_string());
    // The agent is the same netleash binary as the hook, as when installed.
    let agent = AgentProcess::start(&bed, &hook_binary, &netns_path(bed.sandbox()));
    let baseline_binary = std::env::var("NETLEASH_BENCH_BASELINE_BIN").ok();
    let arm = |name: String, annotations: &[(&str, &str)], hook: Option<(&str, &[&str])>| {
        let bundle = Bundle::new("nameserver 192.0.2.53\n");
        bundle.configure(&["/bin/true"], &Network::Fresh, annotations, None);
        if let Some((path, args)) = hook {
            bundle.set_create_runtime_hook(path, args);
        }
        Arm {
            name,
            bundle,
            wall: Vec::new(),
            cpu: Vec::new(),
        }
    };
    let policy = [("netleash.policy", TYPICAL_POLICY)];
    let standalone = ["netleash", "hook", "--standalone"];
    let agent_mode = ["netleash", "hook", "--socket", agent.socket.as_str()];
    let mut arms = vec![
        arm("no hook".into(), &[], None),
        // What runc itself spends on running a hook: /bin/true as the hook.
        arm("hook /bin/true".into(), &[], Some(("/bin/true", &["true"]))),
        // netleash's process start, state and config.json, no annotation.
        arm(
            "netleash hook, no annotation".into(),
            &[],
            Some((&hook_binary, &standalone)),
        ),
        arm(
            "netleash hook --standalone, typical policy".into(),
            &policy,
            Some((&hook_binary, &standalone)),
        ),
        arm(
            "netleash hook (agent), typical policy".into(),
            &policy,
            Some((&hook_binary, &agent_mode)),
        ),
    ];
    if let Some(baseline) = &baseline_binary {
        arms.push(arm(
            "baseline: no annotation".into(),
            &[],
            Some((baseline, &standalone)),
        ));
        arms.push(arm(
            "baseline: --standalone, typical policy".into(),
            &policy,
            Some((baseline, &standalone)),
        ));
    }
    println!("hook binary: {hook_binary}");
    if let Some(baseline) = &baseline_binary {
        println!("baseline binary: {baseline}");
    }

    for _ in 0..WARM_UP_RUNS {
        for arm in &arms {
            time_run(&arm.bundle);
        }
    }
    for i in 0..runs {
        // Rotate which arm goes first, so none always follows another.
        for k in 0..arms.len() {
            let index = (i + k) % arms.len();
            let arm = &mut arms[index];
            let (wall, cpu) = time_run(&arm.bundle);
            arm.wall.push(wall);
            arm.cpu.push(cpu);
        }
    }

    println!(
        "runc run /bin/true, fresh network namespace, {runs} interleaved rounds \
         (every kind once per round); paired: the median of the per-round \
         difference to \"no hook\" and to \"hook /bin/true\"; CPU: runc, the \
         hook and the container (the agent's CPU is not included)"
    );
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>11} {:>11} {:>6} {:>9} {:>10}",
        "", "wall p50", "p10", "p90", "vs no hook", "vs true", "ratio", "CPU p50", "CPU diff"
    );
    let (baseline_wall, baseline_cpu) = (arms[0].wall.clone(), arms[0].cpu.clone());
    let peer_wall = arms[1].wall.clone();
    for arm in &arms {
        // Each round ran every kind back to back, so the difference within a
        // round cancels most of the load the machine had at that moment.
        let paired = median_ms(&differences(&arm.wall, &baseline_wall));
        let over_peer = median_ms(&differences(&arm.wall, &peer_wall));
        let wall = median_ms(&as_ms(&arm.wall));
        let cpu = median_ms(&as_ms(&arm.cpu));
        println!(
            "{:<44} {:>6.2} ms {:>6.2} ms {:>6.2} ms {:>+8.2} ms {:>+8.2} ms {:>6.3} {:>6.2} ms {:>+7.2} ms",
            arm.name,
            wall,
            percentile_ms(&as_ms(&arm.wall), 10),
            percentile_ms(&as_ms(&arm.wall), 90),
            paired,
            over_peer,
            wall / median_ms(&as_ms(&baseline_wall)),
            cpu,
            cpu - median_ms(&as_ms(&baseline_cpu)),
        );
    }
    put_round_trips(&bed, agent, runs);
    bed.close().expect("remove the testbed");
}

/// The agent's part alone: the round trip of the hook's Put into a fresh
/// namespace, and the agent's CPU time for it, without runc and the hook
/// process around it. `NETLEASH_BENCH_BASELINE_AGENT_BIN` adds a second
/// agent from another netleash binary (an older build, say), with its own
/// resident sandbox; the two get their Puts in alternating order, round by
/// round, so both see the same load.
fn put_round_trips(bed: &Testbed, agent: AgentProcess, runs: usize) {
    let mut agents = vec![("agent".to_string(), agent)];
    // Kept until the end: the baseline agent's resident sandbox lives there.
    let mut resident = None;
    if let Ok(binary) = std::env::var("NETLEASH_BENCH_BASELINE_AGENT_BIN") {
        let name = format!("nl-bench-resident-{}", std::process::id());
        for args in [
            &["netns", "add", &name][..],
            &["-n", &name, "link", "set", "lo", "up"],
        ] {
            let status = Command::new("ip").args(args).status();
            assert!(status.is_ok_and(|s| s.success()), "ip {args:?}");
        }
        let baseline = AgentProcess::start(bed, &binary, &netns_path(&name));
        agents.push((format!("baseline agent ({binary})"), baseline));
        resident = Some(name);
    }
    let mut samples: Vec<(Vec<Duration>, Vec<Duration>)> = vec![Default::default(); agents.len()];
    for round in 0..WARM_UP_RUNS + runs {
        for k in 0..agents.len() {
            let index = (round + k) % agents.len();
            let (took, cpu) = agents[index].1.timed_put(&format!("{round}-{index}"));
            if round >= WARM_UP_RUNS {
                samples[index].0.push(took);
                samples[index].1.push(cpu);
            }
        }
    }
    println!(
        "the hook's Put (typical policy, rules_in_force) into a fresh namespace, {runs} rounds: \
         round trip, and the agent's CPU time during it (in clock ticks, so only the mean)"
    );
    for ((name, _), (took, cpu)) in agents.iter().zip(&samples) {
        let took = as_ms(took);
        let cpu_mean = cpu.iter().sum::<Duration>().as_secs_f64() * 1e3 / cpu.len() as f64;
        println!(
            "{name:<44} p50 {:>5.2} ms  p10 {:>5.2} ms  p90 {:>5.2} ms  agent CPU mean {:>5.2} ms",
            median_ms(&took),
            percentile_ms(&took, 10),
            percentile_ms(&took, 90),
            cpu_mean,
        );
    }
    drop(agents);
    if let Some(name) = resident {
        let _ = Command::new("ip").args(["netns", "delete", &name]).status();
    }
}

/// One `runc run` of `bundle`, which must succeed: its wall-clock time and
/// the CPU time of runc and every process it waited for.
fn time_run(bundle: &Bundle) -> (Duration, Duration) {
    let cpu_before = children_cpu();
    let start = Instant::now();
    let (container, output) = bundle.run();
    let wall = start.elapsed();
    let cpu = children_cpu() - cpu_before;
    assert!(
        output.status.success(),
        "runc run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(container);
    (wall, cpu)
}

/// User and system time of every waited-for descendant so far (getrusage(2),
/// RUSAGE_CHILDREN: a child's figure includes the descendants it waited for).
fn children_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        assert_eq!(libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

fn as_ms(samples: &[Duration]) -> Vec<f64> {
    samples.iter().map(|d| d.as_secs_f64() * 1e3).collect()
}

fn differences(samples: &[Duration], baseline: &[Duration]) -> Vec<f64> {
    as_ms(samples)
        .iter()
        .zip(as_ms(baseline))
        .map(|(a, b)| a - b)
        .collect()
}

fn median_ms(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// The `p`th percentile (nearest rank).
fn percentile_ms(values: &[f64], p: usize) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (p * sorted.len()).div_ceil(100).max(1);
    sorted[rank - 1]
}
