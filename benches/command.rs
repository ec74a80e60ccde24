//! The commands as a user runs them, process against process: `netleash
//! apply POLICY --netns NAME` against `nft -f FILE` with the same ruleset
//! (`netleash compile POLICY`, which replaces the table as one
//! transaction), each timed from spawn to exit, in rounds that interleave:
//!
//! - *re-apply*: a policy change in a namespace that has the table (the two
//!   policies differ in two entries; each command alternates between them
//!   in a namespace of its own);
//! - *create*: the first apply, into a namespace created just before
//!   (untimed) with no table.
//!
//! Both commands are started from a thread that is in the target namespace
//! for nft (as `ip netns exec` would leave it, without that command's own
//! cost), and from the benchmark's own thread for netleash, which enters
//! the namespace itself (`--netns`). A pause of 40 ms comes before each
//! timed command, so that no command waits for the kernel's clean-up after
//! the one before (closing an nf_tables socket after a commit that replaced
//! something waits for an RCU grace period, see
//! `netns::close_sockets_after_exit`: with it, `netleash` leaves that wait
//! to a child after it has exited; `nft` waits at exit).
//!
//! Run as root: `cargo bench --bench command` (`-- --rounds N`, default 60).
//! `NETLEASH_BENCH_BIN` times another netleash binary (default: the one
//! cargo built for the benchmark), and `NETLEASH_BENCH_BASELINE_BIN` adds a
//! second netleash binary to the same rounds (e.g. an earlier build). Each
//! binary is copied into the benchmark's temporary directory and run from
//! there, so that both start from files written the same way: the same
//! bytes start about 0.3 ms slower from the file the linker wrote in
//! `target/release` than from a copy of it (measured on ext4). The
//! namespaces are created and deleted by the benchmark; no packet is sent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use netleash::netns;

const FIRST: &str = r#"{"type": "limited", "allowed_hosts": [
    "https://api.example.com", "pypi.org", "198.51.100.10", "198.51.100.11:8443",
    "203.0.113.0/28", "[2001:db8::7]:443"]}"#;
const SECOND: &str = r#"{"type": "limited", "allowed_hosts": [
    "https://api.example.com", "pypi.org", "198.51.100.12", "198.51.100.11:8443",
    "203.0.113.16/28", "[2001:db8::7]:443"]}"#;

const SETTLE: Duration = Duration::from_millis(40);

#[path = "support/netns.rs"]
mod support_netns;
use support_netns::Netns;

impl Netns {
    fn new(tag: &str) -> Netns {
        Netns::named(format!("nlcmd-{tag}-{}", std::process::id()))
    }
}

/// Wall time of `command` from spawn to exit; panics if it fails.
fn timed(mut command: Command) -> Duration {
    let start = Instant::now();
    let output = command.output().expect("run the command");
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "{command:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    elapsed
}

fn netleash_apply(binary: &str, policy: &Path, ns: &Netns) -> Duration {
    let mut command = Command::new(binary);
    command.args(["apply", "--resolver", "192.0.2.53", "--netns", &ns.0]);
    command.arg(policy);
    timed(command)
}

fn nft_apply(script: &Path, ns: &Netns) -> Duration {
    netns::run_in(&ns.target(), || {
        let mut command = Command::new("nft");
        command.arg("-f").arg(script);
        timed(command)
    })
    .expect("enter the namespace")
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

fn ms(value: Duration) -> String {
    format!("{:.3}", value.as_secs_f64() * 1e3)
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the command benchmark needs root (it creates network namespaces)"
    );
    let args: Vec<String> = std::env::args().collect();
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--rounds takes a number"))
        .unwrap_or(60);
    let binary = std::env::var("NETLEASH_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_netleash").into());

    let dir = tempfile::tempdir().expect("temporary directory");
    let write = |name: &str, text: &str| -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path
    };
    let policies = [write("first.json", FIRST), write("second.json", SECOND)];
    let scripts: Vec<PathBuf> = policies
        .iter()
        .enumerate()
        .map(|(i, policy)| {
            let output = Command::new(&binary)
                .args(["compile", "--resolver", "192.0.2.53"])
                .arg(policy)
                .output()
                .expect("run netleash compile");
            assert!(output.status.success(), "netleash compile failed");
            write(
                &format!("policy{i}.nft"),
                &String::from_utf8_lossy(&output.stdout),
            )
        })
        .collect();

    let baseline = std::env::var("NETLEASH_BENCH_BASELINE_BIN").ok();
    let copy = |name: &str, from: &str| -> String {
        let path = dir.path().join(name);
        std::fs::copy(from, &path).unwrap_or_else(|e| panic!("copy {from}: {e}"));
        path.to_string_lossy().into_owned()
    };
    let mut binaries = vec![copy("netleash", &binary)];
    binaries.extend(baseline.as_deref().map(|b| copy("baseline", b)));
    let namespaces: Vec<Netns> = (0..binaries.len())
        .map(|i| Netns::new(&format!("netleash{i}")))
        .collect();
    let nft_ns = Netns::new("nft");
    // The first apply of each creates the table; the rounds then re-apply.
    for (binary, ns) in binaries.iter().zip(&namespaces) {
        netleash_apply(binary, &policies[0], ns);
    }
    nft_apply(&scripts[0], &nft_ns);

    // Per binary, then nft last: re-apply and create samples.
    let mut reapply = vec![Vec::new(); binaries.len() + 1];
    let mut create = vec![Vec::new(); binaries.len() + 1];
    let nft = binaries.len();
    for round in 0..rounds {
        let which = (round + 1) % 2;
        for (i, (binary, ns)) in binaries.iter().zip(&namespaces).enumerate() {
            std::thread::sleep(SETTLE);
            reapply[i].push(netleash_apply(binary, &policies[which], ns));
        }
        std::thread::sleep(SETTLE);
        reapply[nft].push(nft_apply(&scripts[which], &nft_ns));
        for (i, binary) in binaries.iter().enumerate() {
            let fresh = Netns::new(&format!("fresh{i}-{round}"));
            std::thread::sleep(SETTLE);
            create[i].push(netleash_apply(binary, &policies[which], &fresh));
        }
        let fresh = Netns::new(&format!("fresh-nft-{round}"));
        std::thread::sleep(SETTLE);
        create[nft].push(nft_apply(&scripts[which], &fresh));
    }
    println!("commands, spawn to exit, {rounds} interleaved rounds, medians in ms");
    println!("  netleash: {binary}");
    if let Some(baseline) = &baseline {
        println!("  baseline: {baseline}");
    }
    println!(
        "          |  netleash apply |          nft -f | netleash/nft{}",
        if baseline.is_some() {
            " |        baseline | baseline/nft"
        } else {
            ""
        }
    );
    for (kind, samples) in [("re-apply", &mut reapply), ("create", &mut create)] {
        let medians: Vec<Duration> = samples.iter_mut().map(|s| median(s)).collect();
        let ratio = |i: usize| medians[i].as_secs_f64() / medians[nft].as_secs_f64();
        let mut line = format!(
            "{kind:>9} | {:>15} | {:>15} | {:>11.3}x",
            ms(medians[0]),
            ms(medians[nft]),
            ratio(0)
        );
        if baseline.is_some() {
            line.push_str(&format!(" | {:>15} | {:>11.3}x", ms(medians[1]), ratio(1)));
        }
        println!("{line}");
    }
}
