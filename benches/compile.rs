//! Policy compiler benchmark: compile a policy of 10, 1,000 and 10,000
//! allowed hosts (a mix of names, wildcards, literals and CIDRs of both
//! families, with and without ports) and render it as `nft -f` text.
//! Goal: at most 5 ms for 10,000 hosts. Results: docs/benchmarks.md.
//!
//! Freeing the result is not timed (`iter_with_large_drop`): it is not on the
//! path from a policy to its ruleset.
//!
//! Each case is measured twice: in wall-clock time (what a user waits for)
//! and in the benchmark thread's CPU time, which other processes on a busy
//! machine do not inflate (the compiler is single-threaded and does no I/O,
//! so on an idle machine the two agree).

use std::hint::black_box;

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use netleash::ruleset::{compile, render};

#[path = "../tests/integration/fixtures.rs"]
#[allow(dead_code)]
mod fixtures;

fn compile_and_render<M: Measurement>(c: &mut Criterion<M>, clock: &str) {
    let options = fixtures::options();
    let mut group = c.benchmark_group(format!("policy-compiler-{clock}"));
    for hosts in [10, 1_000, 10_000] {
        let policy = fixtures::generated(hosts);
        group.bench_with_input(
            BenchmarkId::new("compile+render-nft", hosts),
            &policy,
            |b, policy| {
                b.iter_with_large_drop(|| {
                    let ruleset = compile(black_box(policy), &options);
                    let text = render::nft(&ruleset);
                    (ruleset, text)
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("compile", hosts), &policy, |b, policy| {
            b.iter_with_large_drop(|| compile(black_box(policy), &options))
        });
    }
    group.finish();
}

fn wall(c: &mut Criterion<WallTime>) {
    compile_and_render(c, "wall");
}

fn cpu(c: &mut Criterion<ThreadCpuTime>) {
    compile_and_render(c, "cpu");
}

/// CPU time of the calling thread (`CLOCK_THREAD_CPUTIME_ID`, clock_gettime(2)), in nanoseconds.
struct ThreadCpuTime;

fn thread_cpu_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; this clock always exists on Linux.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

impl Measurement for ThreadCpuTime {
    type Intermediate = u64;
    type Value = u64;

    fn start(&self) -> u64 {
        thread_cpu_nanos()
    }
    fn end(&self, start: u64) -> u64 {
        thread_cpu_nanos() - start
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, value: &u64) -> f64 {
        *value as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        &Nanoseconds
    }
}

/// Formats nanoseconds as ns, µs or ms, like criterion's wall-time output.
struct Nanoseconds;

impl ValueFormatter for Nanoseconds {
    fn scale_values(&self, typical: f64, values: &mut [f64]) -> &'static str {
        let (divisor, unit) = match typical {
            t if t < 1e3 => (1.0, "ns"),
            t if t < 1e6 => (1e3, "µs"),
            _ => (1e6, "ms"),
        };
        values.iter_mut().for_each(|v| *v /= divisor);
        unit
    }

    fn scale_throughputs(
        &self,
        _typical: f64,
        _throughput: &Throughput,
        _values: &mut [f64],
    ) -> &'static str {
        // No throughput is configured for these benchmarks.
        "ns"
    }

    fn scale_for_machines(&self, _values: &mut [f64]) -> &'static str {
        "ns"
    }
}

criterion_group!(wall_time, wall);
criterion_group! {
    name = cpu_time;
    config = Criterion::default().with_measurement(ThreadCpuTime);
    targets = cpu
}
criterion_main!(wall_time, cpu_time);
