//! Container start overhead of `netleash hook`: `runc run` of a trivial
//! container (`/bin/true` in a fresh network namespace), without a hook and
//! with `netleash hook --standalone` at createRuntime enforcing a typical
//! policy, interleaved run by run so all see the same machine load. Two more
//! kinds split the overhead: `/bin/true` as the hook (runc's own cost of
//! running a hook), and the netleash hook on a container without the
//! annotation (netleash's process start and reading the state and config).
//!
//! `cargo bench --bench oci_hook` as root; `NETLEASH_BENCH_RUNS` sets the
//! number of runs of each kind (default 40). Needs runc and busybox-static.

// Shared with the integration tests, which use the parts this file does not.
#[allow(dead_code)]
#[path = "../tests/integration/runc.rs"]
mod runc;

use std::time::{Duration, Instant};

use runc::{Bundle, Network};

/// A typical sandbox policy: a dozen entries of every kind. The names stay
/// blocked in standalone mode (a warning says so) but are compiled all the same.
const TYPICAL_POLICY: &str = r#"{"type": "limited", "allowed_hosts": [
    "api.example.com", "*.cdn.example.net", "https://registry.example.org",
    "198.51.100.10", "https://198.51.100.11", "203.0.113.0/28", "[2001:db8:100::10]:443",
    "2001:db8:200::/48", "192.0.2.80:8080", "http://updates.example.com",
    "198.51.100.20:5432", "mirror.example.com"]}"#;

const WARM_UP_RUNS: usize = 5;
const DEFAULT_RUNS: usize = 40;

/// One kind of container start the benchmark times.
struct Arm {
    name: &'static str,
    bundle: Bundle,
    samples: Vec<Duration>,
}

fn main() {
    // Criterion-style arguments (`--bench`) are ignored.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "the OCI hook benchmark runs containers with runc: run it as root"
    );
    let runs: usize = std::env::var("NETLEASH_BENCH_RUNS")
        .ok()
        .map(|n| n.parse().expect("NETLEASH_BENCH_RUNS is a number"))
        .unwrap_or(DEFAULT_RUNS);

    let arm = |name, annotations: &[(&str, &str)], hook: Option<&[&str]>| {
        let bundle = Bundle::new("nameserver 192.0.2.53\n");
        bundle.configure(&["/bin/true"], &Network::Fresh, annotations, hook);
        Arm {
            name,
            bundle,
            samples: Vec::new(),
        }
    };
    let policy = [("netleash.policy", TYPICAL_POLICY)];
    let mut arms = [
        arm("no hook", &[], None),
        // What runc itself spends on running a hook: /bin/true as the hook.
        arm("hook /bin/true", &[], None),
        // netleash's process start, state and config.json, no annotation.
        arm("netleash hook, no annotation", &[], Some(&["--standalone"])),
        arm(
            "netleash hook --standalone, typical policy",
            &policy,
            Some(&["--standalone"]),
        ),
    ];
    arms[1]
        .bundle
        .set_create_runtime_hook("/bin/true", &["true"]);

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
            arm.samples.push(time_run(&arm.bundle));
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("runc run /bin/true, fresh network namespace, {runs} interleaved runs of each kind");
    let baseline = median(&mut arms[0].samples.clone());
    for arm in &mut arms {
        let m = median(&mut arm.samples);
        println!(
            "{:<44} median {:6.2} ms (p10 {:6.2}, p90 {:6.2}); {:+6.2} ms, ratio {:.3}",
            arm.name,
            ms(m),
            ms(percentile(&arm.samples, 10)),
            ms(percentile(&arm.samples, 90)),
            ms(m) - ms(baseline),
            m.as_secs_f64() / baseline.as_secs_f64()
        );
    }
}

/// Wall-clock time of one `runc run` of `bundle`, which must succeed.
fn time_run(bundle: &Bundle) -> Duration {
    let start = Instant::now();
    let (container, output) = bundle.run();
    let elapsed = start.elapsed();
    assert!(
        output.status.success(),
        "runc run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    drop(container);
    elapsed
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    let n = samples.len();
    if n % 2 == 1 {
        samples[n / 2]
    } else {
        (samples[n / 2 - 1] + samples[n / 2]) / 2
    }
}

/// The `p`th percentile of sorted `samples` (nearest rank).
fn percentile(samples: &[Duration], p: usize) -> Duration {
    let rank = (p * samples.len()).div_ceil(100).max(1);
    samples[rank - 1]
}
