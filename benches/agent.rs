//! Host agent at scale: 500 sandboxes sharing one 50-name policy.
//!
//! Run as root: `cargo bench --bench agent` (`-- --sandboxes N --periods P`
//! to change the defaults of 500 and 3).
//!
//! Set-up, all in namespaces this benchmark creates and deletes: a testbed
//! (its world namespace runs the test DNS server at 198.51.100.53, whose
//! query log counts the upstream queries) and N bare sandbox namespaces
//! (`ip netns add`, loopback up, no link: a sandbox needs none, its DNS goes
//! to the proxy in its own namespace and upstream queries leave from the
//! agent's). The agent (the release binary) runs in the world namespace with
//! that server as upstream. The 50 names answer A and AAAA with TTL 10 s, and
//! the agent clamps TTLs to exactly 10 s, so one TTL period is 10 s.
//!
//! Measured: each Put's round trip through the API (the reply comes once the
//! rules are in force and the proxy is bound), the agent's VmRSS and VmHWM
//! after all Puts, and the upstream queries the DNS server received during
//! the Puts and in each of the following TTL periods.

use std::io::{BufRead as _, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use netleash::agent::protocol::{self, Put, Reply, ReplyWhen, Request};
use netleash::testbed::{Testbed, ZoneRecord, netns_path};

const NAMES: usize = 50;
const TTL_SECS: u32 = 10;

/// The bare sandbox namespaces, deleted on drop.
struct Sandboxes(Vec<String>);

impl Sandboxes {
    fn create(count: usize) -> Sandboxes {
        let prefix = format!("nlbench-agent-{}", std::process::id());
        let names: Vec<String> = (0..count).map(|i| format!("{prefix}-{i}")).collect();
        let batch: String = names.iter().map(|n| format!("netns add {n}\n")).collect();
        let sandboxes = Sandboxes(names);
        run_ip_batch(&batch);
        for name in &sandboxes.0 {
            let status = Command::new("ip")
                .args(["-n", name, "link", "set", "lo", "up"])
                .status()
                .expect("run ip");
            assert!(status.success(), "ip -n {name} link set lo up");
        }
        sandboxes
    }
}

impl Drop for Sandboxes {
    fn drop(&mut self) {
        let batch: String = self
            .0
            .iter()
            .map(|n| format!("netns delete {n}\n"))
            .collect();
        run_ip_batch(&batch);
    }
}

fn run_ip_batch(batch: &str) {
    use std::io::Write as _;
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("run ip -batch");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(batch.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "ip -batch failed");
}

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort_unstable();
    values[values.len() / 2]
}

fn argument(name: &str, default: usize) -> usize {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|at| args.get(at + 1))
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the agent benchmark needs root (it creates network namespaces)"
    );
    let count = argument("--sandboxes", 500);
    let periods = argument("--periods", 3);

    let bed = Testbed::new().expect("build the testbed");
    let names: Vec<String> = (0..NAMES).map(|i| format!("n{i}.bench.test")).collect();
    for (i, name) in names.iter().enumerate() {
        let v4 = Ipv4Addr::new(198, 18, 0, i as u8 + 1);
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0x18, 0, 0, 0, 0, i as u16 + 1);
        bed.zone()
            .set(name, &[ZoneRecord::A(v4), ZoneRecord::Aaaa(v6)], TTL_SECS);
    }
    let policy = serde_json::json!({"type": "limited", "allowed_hosts": names}).to_string();

    let created = Instant::now();
    let sandboxes = Sandboxes::create(count);
    println!(
        "created {count} namespaces in {:.1} s",
        created.elapsed().as_secs_f64()
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let socket = dir.path().join("agent.sock");
    let ttl = format!("{TTL_SECS}s");
    let mut child = Command::new("ip")
        .args(["netns", "exec", bed.world(), env!("CARGO_BIN_EXE_netleash")])
        .arg("agent")
        .arg("--socket")
        .arg(&socket)
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .args(["--upstream", "198.51.100.53", "--log", "warn"])
        .args(["--ttl-min", &ttl, "--ttl-max", &ttl])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let mut ready = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut ready)
        .expect("the agent's ready line");
    assert!(ready.contains("ready:"), "{ready}");
    let pid = child.id();
    let _agent = AgentProcess(child);
    let (rss_idle, _) = memory(pid);

    let mut puts = Vec::with_capacity(count);
    let started = Instant::now();
    for (i, name) in sandboxes.0.iter().enumerate() {
        let request = Request::Put(Put {
            id: format!("sbx-{i}"),
            netns: netns_path(name),
            pid: None,
            policy: policy.clone(),
            origin: "bench policy".into(),
            agent: None,
            reply_when: ReplyWhen::default(),
        });
        let at = Instant::now();
        let reply = protocol::call(&socket, &request, Duration::from_secs(60))
            .unwrap_or_else(|e| panic!("put {i}: {}", netleash::cli::render_error(&e)));
        puts.push(at.elapsed());
        if let Reply::Sandbox(status) = reply {
            assert_eq!(
                status.set_sizes.get("dns_v4"),
                Some(&(NAMES as u64)),
                "sandbox {i} does not have every name's address: {status:?}"
            );
        }
    }
    let total = started.elapsed();
    let first = puts[0];
    let (rss, hwm) = memory(pid);
    let queries_during_puts = bed.zone().queries().len();

    let mut per_period = Vec::new();
    for _ in 0..periods {
        let before = bed.zone().queries();
        std::thread::sleep(Duration::from_secs(u64::from(TTL_SECS)));
        let after = bed.zone().queries();
        let new = &after[before.len()..];
        let of = |t: RecordType| new.iter().filter(|q| q.record_type == t).count();
        per_period.push((new.len(), of(RecordType::A), of(RecordType::AAAA)));
    }
    let list = protocol::call(&socket, &Request::List, Duration::from_secs(60)).expect("list");
    let listed = match list {
        Reply::Sandboxes(all) => all.len(),
        _ => 0,
    };

    println!("sandboxes: {count} ({listed} listed), names per policy: {NAMES}, TTL {TTL_SECS} s");
    println!(
        "put: total {:.2} s, median {:.2} ms, first {:.2} ms (resolves the 50 names), p90 {:.2} ms",
        total.as_secs_f64(),
        median(&mut puts.clone()).as_secs_f64() * 1e3,
        first.as_secs_f64() * 1e3,
        {
            let mut sorted = puts.clone();
            sorted.sort_unstable();
            sorted[sorted.len() * 9 / 10].as_secs_f64() * 1e3
        }
    );
    println!(
        "agent memory: VmRSS {:.1} MiB idle, {:.1} MiB with {count} sandboxes; VmHWM {:.1} MiB",
        rss_idle as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!("upstream queries during the puts: {queries_during_puts}");
    for (i, (all, a, aaaa)) in per_period.iter().enumerate() {
        println!(
            "upstream queries in TTL period {}: {all} ({a} A, {aaaa} AAAA; goal {NAMES} names, not {})",
            i + 1,
            NAMES * count
        );
    }
}
