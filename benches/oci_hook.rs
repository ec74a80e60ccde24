//! Container start overhead of `netleash hook`: `runc run` of a trivial
//! container (`/bin/true` in a fresh network namespace), without a hook and
//! with `netleash hook --standalone` at createRuntime enforcing a typical
//! policy, interleaved run by run so both see the same machine load.
//!
//! `cargo bench --bench oci_hook` as root; `NETLEASH_BENCH_RUNS` sets the
//! number of runs of each kind (default 60). Needs runc and busybox-static.

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
const DEFAULT_RUNS: usize = 60;

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

    let plain = Bundle::new("nameserver 192.0.2.53\n");
    plain.configure(&["/bin/true"], &Network::Fresh, &[], None);
    let hooked = Bundle::new("nameserver 192.0.2.53\n");
    hooked.configure(
        &["/bin/true"],
        &Network::Fresh,
        &[("netleash.policy", TYPICAL_POLICY)],
        Some(&["--standalone"]),
    );

    for _ in 0..WARM_UP_RUNS {
        time_run(&plain);
        time_run(&hooked);
    }
    let (mut without, mut with) = (Vec::new(), Vec::new());
    for i in 0..runs {
        // Alternate which goes first, so neither always follows the other.
        if i % 2 == 0 {
            without.push(time_run(&plain));
            with.push(time_run(&hooked));
        } else {
            with.push(time_run(&hooked));
            without.push(time_run(&plain));
        }
    }
    let (without_median, with_median) = (median(&mut without), median(&mut with));
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("runc run /bin/true, fresh network namespace, {runs} interleaved runs each");
    println!(
        "without hook: median {:.2} ms (p10 {:.2}, p90 {:.2})",
        ms(without_median),
        ms(percentile(&without, 10)),
        ms(percentile(&without, 90))
    );
    println!(
        "with hook:    median {:.2} ms (p10 {:.2}, p90 {:.2})",
        ms(with_median),
        ms(percentile(&with, 10)),
        ms(percentile(&with, 90))
    );
    println!(
        "added by the hook: {:.2} ms; ratio {:.3}",
        ms(with_median) - ms(without_median),
        with_median.as_secs_f64() / without_median.as_secs_f64()
    );
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
