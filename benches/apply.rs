//! Apply latency: netleash against `nft -f` with the same ruleset, side by
//! side in one run, at 10, 1,000 and 10,000 set elements. Every timed apply
//! puts in force the other of two policies: a policy change.
//!
//! - *session* and *one-shot* (the `edit` columns) alternate two policies that
//!   differ in two entries alone, one of each half (`allow_v4` and
//!   `allow_v4_tcp_443` each lose one element and gain one): the rules are
//!   the same, so each apply is an edit in place of the generation in force
//!   (`kernel::Method::Edit`: one transaction that changes the elements and
//!   the entry rules' digest, then verification). A session knows the sets'
//!   elements from its last verification, a one-shot apply from the file the
//!   previous one-shot apply in its namespace left (`kernel::last_apply`; it
//!   reads them without one).
//! - *swap session* and *swap one-shot* alternate the first of these policies
//!   with the second plus one entry on another port (tcp/8443: a set and a
//!   rule more), so each apply must stage a generation and swap it in
//!   (`kernel::Method::Swap`: stage, swap, verification, cleanup), with the
//!   sets that change in a few elements kept and edited in the swap.
//!
//! Each kind runs in a network namespace this benchmark creates and deletes
//! (one each for the session, one-shot, swap session, swap one-shot and nft
//! applies), so that every round changes its own previous policy, with the
//! session's memory of the table intact.
//!
//! A fourth kind of apply, *fresh*, is the one-shot apply into a network
//! namespace created just before (untimed) and holding no table: what
//! `netleash hook --standalone` does in a new container's namespace (a
//! table created, not a swap).
//!
//! Besides wall-clock medians, it reports the median CPU time (user +
//! system, `getrusage(RUSAGE_SELF)`) of the session and one-shot applies:
//! on a shared machine wall time includes waiting for a CPU.
//!
//! Run as root: `cargo bench --bench apply`. Optional: `-- --quick` for fewer
//! rounds, `-- --elements N` for one size (10, 1000 or 10000), `-- --profile
//! N` for N back-to-back session applies of the typical policy (or of the
//! size `--elements` names) and nothing else (to run under `perf record`),
//! `-- --profile-one-shot N` the same with one-shot applies; add `--settle`
//! to pause before each of them as the timed rounds do, and `--swap` to
//! alternate the swap pair instead of the edit pair. `-- --profile-fresh
//! N` times N fresh applies the same way. With `--phases`, these three
//! also report where the time goes: the median time of each phase of an
//! apply, from the trace events of `kernel::phases` (a phase that occurs
//! more than once in an apply, such as the kernel commit of each of a swap's
//! transactions, is summed over the apply).
//!
//! The nft text is rendered from the model here, in the benchmark only
//! (`ruleset::render::nft` is not part of this branch). Before timing, the
//! benchmark applies the text with nft and has netleash's verifier compare
//! the kernel's table with the model: both sides must enforce the same table.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use ipnet::IpNet;
use netleash::kernel;
use netleash::netns::Target;
use netleash::policy::{
    BlockEntry, CompileOptions, Dialect, HostRule, Mode, Policy, PortSpec, Ports, Proto, Source,
    Target as Dest,
};
use netleash::ruleset::{self, Action, Element, Family, Match, RejectKind, Ruleset, SetKey};

#[path = "support/netns.rs"]
mod support_netns;
use support_netns::Netns;

impl Netns {
    fn new(tag: &str) -> Netns {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "the apply benchmark needs root (it creates network namespaces)"
        );
        Netns::named(format!("nlbench-{tag}-{}", std::process::id()))
    }

    /// A namespace for one fresh round, numbered `round`.
    fn fresh(round: usize) -> Netns {
        Netns::named(format!("nlbench-fresh-{}-{round}", std::process::id()))
    }
}

/// A limited policy with `elements` static set elements: half single IPv4
/// addresses on any port, half IPv4 /30 ranges on tcp/443, plus the usual
/// blocklist and resolvers. For 10 elements this is a typical sandbox policy.
/// Variant 1 differs from variant 0 in two entries, one of each half, so
/// that applying one after the other changes both sets of allowed addresses.
fn policy(elements: usize, variant: usize) -> (Policy, CompileOptions) {
    let mut rules = Vec::new();
    for i in 0..elements {
        let (base, step, prefix, ports) = if i % 2 == 0 {
            (Ipv4Addr::new(10, 0, 0, 0), 4, 32, Ports::Any)
        } else {
            let only = [PortSpec {
                proto: Proto::Tcp,
                port: 443,
            }]
            .into();
            (Ipv4Addr::new(11, 0, 0, 0), 8, 30, Ports::Only(only))
        };
        let mut addr = Ipv4Addr::from(u32::from(base) + step * (i / 2) as u32);
        if variant == 1 && i < 2 {
            addr = Ipv4Addr::from(u32::from(addr) + (1 << 24) * 2);
        }
        let net: IpNet = format!("{addr}/{prefix}").parse().unwrap();
        rules.push(HostRule {
            target: Dest::Net(net),
            ports,
            sources: [Source::AllowedHosts].into(),
            entry: net.to_string(),
        });
    }
    rules.sort_by(|a, b| a.target.cmp(&b.target));
    let blocklist = ["169.254.0.0/16", "100.64.0.0/10", "fd00:ec2::254/128"]
        .iter()
        .map(|n| BlockEntry {
            net: n.parse().unwrap(),
            reason: "metadata".into(),
        })
        .collect();
    let policy = Policy {
        mode: Mode::Limited,
        dialect: Dialect::Limited,
        rules,
        blocklist,
        warnings: vec![],
    };
    let options = CompileOptions {
        resolvers: vec!["192.0.2.53".parse().unwrap()],
        nflog_group: 4711,
        proxy: None,
    };
    (policy, options)
}

/// The second policy of the swap pair: `policy(elements, 1)` and one entry
/// allowed on tcp/8443, which no other entry has: a set and a rule more than
/// `policy(elements, 0)`, so changing one into the other swaps generations.
fn policy_with_another_rule(elements: usize) -> (Policy, CompileOptions) {
    let (mut policy, options) = policy(elements, 1);
    let net: IpNet = "12.0.0.0/30".parse().unwrap();
    policy.rules.push(HostRule {
        target: Dest::Net(net),
        ports: Ports::Only(
            [PortSpec {
                proto: Proto::Tcp,
                port: 8443,
            }]
            .into(),
        ),
        sources: [Source::AllowedHosts].into(),
        entry: net.to_string(),
    });
    policy.rules.sort_by(|a, b| a.target.cmp(&b.target));
    (policy, options)
}

/// The edit pair (`swap == false`) or the swap pair of models at `elements`.
fn pair(elements: usize, swap: bool) -> [Ruleset; 2] {
    let compile = |(policy, options): (Policy, CompileOptions)| ruleset::compile(&policy, &options);
    let second = if swap {
        policy_with_another_rule(elements)
    } else {
        policy(elements, 1)
    };
    [compile(policy(elements, 0)), compile(second)]
}

fn element_text(element: &Element) -> String {
    let net = |n: &IpNet| {
        if n.prefix_len() == n.max_prefix_len() {
            n.addr().to_string()
        } else {
            n.to_string()
        }
    };
    match element {
        Element::Addr(n) => net(n),
        Element::AddrProtoPort(n, proto, port) => format!("{} . {proto} . {port}", net(n)),
    }
}

fn list<T: ToString>(items: &[T]) -> String {
    let items: Vec<String> = items.iter().map(ToString::to_string).collect();
    if items.len() == 1 {
        items[0].clone()
    } else {
        format!("{{ {} }}", items.join(", "))
    }
}

/// The model as an `nft -f` script that replaces the table atomically.
fn nft_text(ruleset: &Ruleset) -> String {
    let mut text = String::new();
    let _ = writeln!(
        text,
        "table inet netleash\ndelete table inet netleash\ntable inet netleash {{"
    );
    let _ = writeln!(text, "  comment \"{}\"", ruleset.digest);
    for set in &ruleset.sets {
        let addr = |f: Family| {
            if f == Family::V4 {
                "ipv4_addr"
            } else {
                "ipv6_addr"
            }
        };
        let key = match set.key {
            SetKey::Addr(f) => addr(f).to_string(),
            SetKey::AddrProtoPort(f) => format!("{} . inet_proto . inet_service", addr(f)),
        };
        let _ = write!(text, "  set {} {{ type {key};", set.name);
        let flags: Vec<&str> = [(set.interval, "interval"), (set.timeout, "timeout")]
            .iter()
            .filter_map(|(on, name)| on.then_some(*name))
            .collect();
        if !flags.is_empty() {
            let _ = write!(text, " flags {};", flags.join(","));
        }
        if !set.elements.is_empty() {
            let elements: Vec<String> = set.elements.iter().map(element_text).collect();
            let _ = write!(text, " elements = {{ {} }};", elements.join(", "));
        }
        let _ = writeln!(text, " }}");
    }
    for chain in &ruleset.chains {
        let _ = writeln!(text, "  chain {} {{", chain.name);
        if let Some(base) = chain.base {
            let hook = if base.hook == ruleset::Hook::Output {
                "output"
            } else {
                "forward"
            };
            let policy = if base.policy == ruleset::ChainPolicy::Drop {
                "drop"
            } else {
                "accept"
            };
            let _ = writeln!(
                text,
                "    type filter hook {hook} priority {}; policy {policy};",
                base.priority
            );
        }
        for rule in &chain.rules {
            let mut words: Vec<String> = Vec::new();
            for condition in &rule.matches {
                words.push(match condition {
                    Match::OifLoopback => "oif \"lo\"".into(),
                    Match::CtEstablishedRelated => "ct state established,related".into(),
                    Match::Icmpv6Types(types) => format!("icmpv6 type {}", list(types)),
                    Match::L4ProtoIn(protos) => format!("meta l4proto {}", list(protos)),
                    Match::DportIn(ports) => format!("th dport {}", list(ports)),
                    Match::DaddrInSet { family, set } => {
                        format!(
                            "{} daddr @{set}",
                            if *family == Family::V4 { "ip" } else { "ip6" }
                        )
                    }
                    Match::DaddrProtoPortInSet { family, set } => format!(
                        "{} daddr . meta l4proto . th dport @{set}",
                        if *family == Family::V4 { "ip" } else { "ip6" }
                    ),
                    Match::Daddr(addr) => {
                        format!("{} daddr {addr}", if addr.is_ipv4() { "ip" } else { "ip6" })
                    }
                    Match::SaddrProtoSportInSet { family, set } => format!(
                        "{} saddr . meta l4proto . th sport @{set}",
                        if *family == Family::V4 { "ip" } else { "ip6" }
                    ),
                    Match::MarkIs(mark) => format!("meta mark {mark:#x}"),
                    Match::MarkIsNot(mark) => format!("meta mark != {mark:#x}"),
                });
            }
            for action in &rule.actions {
                words.push(match action {
                    Action::Counter => "counter".into(),
                    Action::Log { group, prefix } => {
                        format!("log group {group} prefix \"{prefix}\"")
                    }
                    Action::Accept => "accept".into(),
                    Action::Drop => "drop".into(),
                    Action::Reject(RejectKind::TcpReset) => "reject with tcp reset".into(),
                    Action::Reject(RejectKind::IcmpxAdminProhibited) => {
                        "reject with icmpx admin-prohibited".into()
                    }
                    Action::Jump(target) => format!("jump {target}"),
                    Action::Redirect(port) => format!("redirect to :{port}"),
                    Action::CtZoneSet(zone) => format!("ct zone set {zone}"),
                });
            }
            let _ = writeln!(text, "    {} comment \"{}\"", words.join(" "), rule.id);
        }
        let _ = writeln!(text, "  }}");
    }
    let _ = writeln!(text, "}}");
    text
}

/// Differences that only reflect how nft 1.0.6 encodes the same table:
/// a leading interval end element at the all-zero address in interval sets
/// (a lower bound older kernels needed; no key can match it), and a
/// `byteorder` expression on the 1-byte `meta l4proto` field of a
/// concatenated lookup (length 1, so it converts nothing).
fn nft_habit(difference: &kernel::Difference) -> bool {
    match difference {
        kernel::Difference::SetElements {
            only_model,
            only_kernel,
            ..
        } => {
            only_model.is_empty()
                && only_kernel.len() == 1
                && ["0.0.0.0 (interval end)", ":: (interval end)"]
                    .contains(&only_kernel[0].as_str())
        }
        kernel::Difference::RuleExpressions { kernel, model, .. } => {
            let without: Vec<&String> = kernel.iter().filter(|e| *e != "byteorder").collect();
            without == model.iter().collect::<Vec<_>>()
        }
        _ => false,
    }
}

/// The phase events (`kernel::phases`) of each apply, when `--phases` asks
/// for them: per phase, its time summed over each apply, and how often it
/// occurred in the last apply.
struct Phases {
    enabled: bool,
    /// Phases in the order they first occurred, with one sum per apply.
    sums: Vec<(String, Vec<f64>)>,
    occurrences: Vec<usize>,
}

/// The events of the apply being collected: (phase, microseconds).
static PHASE_EVENTS: std::sync::Mutex<Vec<(String, f64)>> = std::sync::Mutex::new(Vec::new());

/// A tracing layer that keeps every phase event in [`PHASE_EVENTS`].
struct PhaseLayer;

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for PhaseLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        #[derive(Default)]
        struct Fields {
            phase: String,
            micros: f64,
        }
        impl tracing::field::Visit for Fields {
            fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
                if field.name() == "phase" {
                    self.phase = value.to_string();
                }
            }
            fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
                if field.name() == "micros" {
                    self.micros = value as f64;
                }
            }
            fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
        }
        let mut fields = Fields::default();
        event.record(&mut fields);
        PHASE_EVENTS
            .lock()
            .unwrap()
            .push((fields.phase, fields.micros));
    }
}

impl Phases {
    /// Listen for phase events if `args` hold `--phases`.
    fn start(args: &[String]) -> Phases {
        let enabled = args.iter().any(|a| a == "--phases");
        if enabled {
            use tracing_subscriber::layer::SubscriberExt as _;
            let only_phases = tracing_subscriber::filter::Targets::new()
                .with_target(kernel::phases::TARGET, tracing::Level::TRACE);
            let subscriber = tracing_subscriber::registry().with(
                tracing_subscriber::Layer::with_filter(PhaseLayer, only_phases),
            );
            tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        }
        Phases {
            enabled,
            sums: Vec::new(),
            occurrences: Vec::new(),
        }
    }

    /// Run one apply and keep its phases.
    fn collect<T>(&mut self, apply: impl FnOnce() -> T) -> T {
        PHASE_EVENTS.lock().unwrap().clear();
        let result = apply();
        if self.enabled {
            let events = std::mem::take(&mut *PHASE_EVENTS.lock().unwrap());
            let applies = self.sums.first().map_or(0, |(_, sums)| sums.len());
            self.occurrences.iter_mut().for_each(|n| *n = 0);
            for (phase, micros) in events {
                let index = match self.sums.iter().position(|(name, _)| *name == phase) {
                    Some(index) => index,
                    None => {
                        // A phase first seen now took no time in earlier applies.
                        self.sums.push((phase, vec![0.0; applies]));
                        self.occurrences.push(0);
                        self.sums.len() - 1
                    }
                };
                let sums = &mut self.sums[index].1;
                if sums.len() == applies {
                    sums.push(0.0);
                }
                sums[applies] += micros;
                self.occurrences[index] += 1;
            }
            for (_, sums) in &mut self.sums {
                sums.resize(applies + 1, 0.0);
            }
        }
        result
    }

    fn print(&mut self) {
        if !self.enabled {
            return;
        }
        println!("phases (median per apply, ms; times per apply):");
        let mut total = 0.0;
        for ((phase, sums), occurrences) in self.sums.iter_mut().zip(&self.occurrences) {
            sums.sort_by(f64::total_cmp);
            let p50 = sums[sums.len() / 2] / 1000.0;
            total += p50;
            println!("  {phase:<30} {p50:>7.3}  x{occurrences}");
        }
        println!("  {:<30} {total:>7.3}", "(sum of the medians)");
    }
}

fn median(samples: &mut [Duration]) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn percentile(samples: &[Duration], p: f64) -> Duration {
    samples[((samples.len() - 1) as f64 * p).round() as usize]
}

/// User + system CPU time of this process so far (all its threads).
fn cpu_time() -> Duration {
    // SAFETY: rusage is plain data; getrusage only writes the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_SELF, &mut usage), 0);
        usage
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
}

/// Wall-clock and CPU time of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration, Duration) {
    let (cpu, start) = (cpu_time(), Instant::now());
    let value = f();
    let wall = start.elapsed();
    (value, wall, cpu_time().saturating_sub(cpu))
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

/// Pause between isolated rounds, so each starts after the kernel has freed
/// what the previous round replaced (see `Session::close_in_background`).
const SETTLE: Duration = Duration::from_millis(40);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    // `--elements N`: only the size with N policy entries (10, 1000 or 10000).
    let only: Option<usize> = args
        .iter()
        .position(|a| a == "--elements")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("--elements takes a number"));
    let ns = Netns::new("netleash");
    let target = ns.target();
    // `--profile N`: N session applies back to back; `--profile-one-shot N`:
    // N one-shot applies (`kernel::apply`) back to back. The typical policy,
    // or the size `--elements` names.
    // `--profile-fresh N`: N one-shot applies, each into a network namespace
    // created just before (untimed) and deleted after.
    if let Some(rounds) = args
        .iter()
        .position(|a| a == "--profile-fresh")
        .and_then(|i| args.get(i + 1))
    {
        let rounds: usize = rounds.parse().expect("--profile-fresh takes a number");
        let (policy, options) = policy(only.unwrap_or(10), 0);
        let model = ruleset::compile(&policy, &options);
        let mut phases = Phases::start(&args);
        let (mut wall, mut cpu): (Vec<Duration>, Vec<Duration>) = (0..rounds)
            .map(|round| {
                let fresh = Netns::fresh(round);
                let target = fresh.target();
                std::thread::sleep(SETTLE);
                let (_, wall, cpu) =
                    phases.collect(|| timed(|| kernel::apply(&target, &model).expect("apply")));
                (wall, cpu)
            })
            .unzip();
        println!(
            "{rounds} fresh applies: median {} ms, CPU {} ms",
            ms(median(&mut wall)),
            ms(median(&mut cpu))
        );
        phases.print();
        return;
    }
    for (flag, one_shot) in [("--profile", false), ("--profile-one-shot", true)] {
        let Some(rounds) = args
            .iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
        else {
            continue;
        };
        let rounds: usize = rounds.parse().expect("--profile takes a number");
        // `--settle`: a pause before each apply, as in the timed rounds.
        let settle = args.iter().any(|a| a == "--settle");
        let models = pair(only.unwrap_or(10), args.iter().any(|a| a == "--swap"));
        let mut session = kernel::Session::open(&target).expect("open a session");
        if one_shot {
            kernel::apply(&target, &models[1]).expect("apply");
        }
        let mut phases = Phases::start(&args);
        let (mut wall, mut cpu): (Vec<Duration>, Vec<Duration>) = (0..rounds)
            .map(|round| {
                let model = &models[round % 2];
                if settle {
                    std::thread::sleep(SETTLE);
                }
                let (_, wall, cpu) = phases.collect(|| {
                    if one_shot {
                        timed(|| kernel::apply(&target, model).expect("apply"))
                    } else {
                        timed(|| session.apply(model).expect("apply"))
                    }
                });
                (wall, cpu)
            })
            .unzip();
        let kind = if one_shot { "one-shot" } else { "session" };
        let pacing = if settle {
            "each after a pause"
        } else {
            "back to back"
        };
        println!(
            "{rounds} {kind} applies {pacing}: median {} ms, CPU {} ms",
            ms(median(&mut wall)),
            ms(median(&mut cpu))
        );
        phases.print();
        return;
    }
    // The one-shot applies get a namespace of their own: an apply through
    // another socket in the session's namespace would make the session's
    // memory of the table stale, and every session round would start with a
    // refused stage and a read (which is what a session does when another
    // program changed the table, not what an agent's re-apply costs).
    let one_shot_ns = Netns::new("oneshot");
    let one_shot_target = one_shot_ns.target();
    let nft_ns = Netns::new("nft");
    let nft_target = nft_ns.target();
    let swap_ns = Netns::new("swap");
    let swap_target = swap_ns.target();
    let swap_one_shot_ns = Netns::new("swaponeshot");
    let swap_one_shot_target = swap_one_shot_ns.target();
    let dir = std::env::temp_dir().join(format!("netleash-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();

    println!(
        "apply latency in network namespaces {} (session), {} (one-shot) and {} (nft); medians (p90) in ms",
        ns.0, one_shot_ns.0, nft_ns.0
    );
    println!(
        "  session:  kernel::Session::apply on an open session (a long-lived agent's path), policies two elements \
         apart: an edit in place"
    );
    println!(
        "  one-shot: kernel::apply (thread, namespace entry, socket, last apply file per call), the same: an edit \
         in place"
    );
    println!(
        "  swap:     session / one-shot with policies that also differ in a rule (a set on tcp/8443): a \
         generation swap"
    );
    println!(
        "  nft -f:   nft spawned inside its namespace, replacing the table (add, delete, add)"
    );
    println!(
        "  rounds of these five are interleaved, each {} ms after the previous one;",
        SETTLE.as_millis()
    );
    println!(
        "  back-to-back: session rounds without pauses (the kernel frees each replaced table meanwhile)"
    );
    println!(
        "  fresh:    kernel::apply into a namespace created just before, with no table (creates it)"
    );
    println!(
        "  cpu:      median user+system CPU time of the session / one-shot / fresh applies (edit) and the \
         session / one-shot swaps"
    );
    println!(
        "{:>8} {:>6} | {:>17} | {:>17} | {:>17} | {:>17} | {:>17} | {:>11} {:>12} | {:>17} | {:>17} | {:>23} | {:>15}",
        "elements",
        "rounds",
        "session (edit)",
        "one-shot (edit)",
        "swap session",
        "swap one-shot",
        "nft -f",
        "session/nft",
        "one-shot/nft",
        "back-to-back",
        "fresh",
        "cpu session/1-shot/fresh",
        "cpu swap s/1-s"
    );
    for (elements, rounds) in [(10, 200), (1_000, 100), (10_000, 30)] {
        if only.is_some_and(|n| n != elements) {
            continue;
        }
        let rounds = if quick { rounds / 10 } else { rounds };
        // Every timed apply puts in force the other of two policies: a policy
        // change, as an agent applies it, not a repetition of the same one.
        let mut models = Vec::new();
        let mut scripts = Vec::new();
        for variant in 0..2 {
            let (policy, options) = policy(elements, variant);
            let model = ruleset::compile(&policy, &options);
            let script = dir.join(format!("ruleset-{elements}-{variant}.nft"));
            std::fs::write(&script, nft_text(&model)).unwrap();

            // Both sides must produce the same table: apply with nft, verify with netleash.
            netns::run_nft(&nft_target, &script);
            let plan = kernel::plan(&nft_target, &model).expect("read back nft's table");
            let real: Vec<String> = plan
                .differences
                .iter()
                .filter(|d| !nft_habit(d))
                .map(ToString::to_string)
                .collect();
            assert!(
                real.is_empty(),
                "nft's table differs from the model: {real:?}"
            );
            models.push(model);
            scripts.push(script);
        }
        assert_ne!(models[0].digest, models[1].digest);
        let swaps = pair(elements, true);
        assert_eq!(swaps[0], models[0]);
        std::thread::sleep(SETTLE);
        let model = |round: usize| &models[round % 2];
        let swap_model = |round: usize| &swaps[round % 2];
        let script = |round: usize| &scripts[round % 2];

        let mut session = kernel::Session::open(&target).expect("open a session");
        let mut swap_session = kernel::Session::open(&swap_target).expect("open a session");
        // Untimed: the first apply creates the table (or swaps from the previous size).
        session.apply(model(1)).expect("netleash apply");
        kernel::apply(&one_shot_target, model(1)).expect("netleash apply");
        swap_session.apply(swap_model(1)).expect("netleash apply");
        kernel::apply(&swap_one_shot_target, swap_model(1)).expect("netleash apply");
        let edited = |report: kernel::ApplyReport| {
            assert!(
                matches!(report.method, kernel::Method::Edit { .. }),
                "a timed apply of the edit pair must be an edit in place: {:?}",
                report.method
            );
        };
        let swapped = |report: kernel::ApplyReport| {
            assert!(
                matches!(report.method, kernel::Method::Swap { .. }),
                "a timed apply of the swap pair must be a generation swap: {:?}",
                report.method
            );
        };
        let mut back_to_back = Vec::with_capacity(rounds);
        for round in 0..rounds {
            let start = Instant::now();
            let report = session.apply(model(round)).expect("netleash apply");
            back_to_back.push(start.elapsed());
            edited(report);
        }

        let (mut settled, mut one_shot, mut nft) = (Vec::new(), Vec::new(), Vec::new());
        let (mut swap_settled, mut swap_one_shot) = (Vec::new(), Vec::new());
        let mut fresh = Vec::new();
        let (mut settled_cpu, mut one_shot_cpu, mut fresh_cpu) =
            (Vec::new(), Vec::new(), Vec::new());
        let (mut swap_settled_cpu, mut swap_one_shot_cpu) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            // The session continues its alternation from the back-to-back rounds.
            std::thread::sleep(SETTLE);
            let (report, wall, cpu) = timed(|| session.apply(model(rounds + round)));
            settled.push(wall);
            settled_cpu.push(cpu);
            edited(report.expect("netleash apply"));
            std::thread::sleep(SETTLE);
            let (report, wall, cpu) = timed(|| kernel::apply(&one_shot_target, model(round)));
            one_shot.push(wall);
            one_shot_cpu.push(cpu);
            edited(report.expect("netleash apply"));
            std::thread::sleep(SETTLE);
            let (report, wall, cpu) = timed(|| swap_session.apply(swap_model(round)));
            swap_settled.push(wall);
            swap_settled_cpu.push(cpu);
            swapped(report.expect("netleash apply"));
            std::thread::sleep(SETTLE);
            let (report, wall, cpu) =
                timed(|| kernel::apply(&swap_one_shot_target, swap_model(round)));
            swap_one_shot.push(wall);
            swap_one_shot_cpu.push(cpu);
            swapped(report.expect("netleash apply"));
            std::thread::sleep(SETTLE);
            let start = Instant::now();
            netns::run_nft(&nft_target, script(round));
            nft.push(start.elapsed());
            let fresh_ns = Netns::fresh(round);
            let fresh_target = fresh_ns.target();
            std::thread::sleep(SETTLE);
            let (report, wall, cpu) = timed(|| kernel::apply(&fresh_target, model(round)));
            fresh.push(wall);
            fresh_cpu.push(cpu);
            let report = report.expect("netleash apply");
            assert_eq!(
                report.method,
                kernel::Method::Create,
                "a fresh namespace has no table"
            );
        }
        drop(session);
        drop(swap_session);
        let stats = |samples: &mut Vec<Duration>| {
            let p50 = median(samples);
            (
                p50,
                format!("{:>7} ({:>7})", ms(p50), ms(percentile(samples, 0.9))),
            )
        };
        let (_, back_to_back) = stats(&mut back_to_back);
        let (_, fresh) = stats(&mut fresh);
        let cpu = format!(
            "{} / {} / {}",
            ms(median(&mut settled_cpu)),
            ms(median(&mut one_shot_cpu)),
            ms(median(&mut fresh_cpu))
        );
        let swap_cpu = format!(
            "{} / {}",
            ms(median(&mut swap_settled_cpu)),
            ms(median(&mut swap_one_shot_cpu))
        );
        let (_, swap_session) = stats(&mut swap_settled);
        let (_, swap_one_shot) = stats(&mut swap_one_shot);
        let (session_p50, session) = stats(&mut settled);
        let (one_shot_p50, one_shot) = stats(&mut one_shot);
        let (nft_p50, nft) = stats(&mut nft);
        println!(
            "{:>8} {:>6} | {session:>17} | {one_shot:>17} | {swap_session:>17} | {swap_one_shot:>17} | {nft:>17} | {:>10.3}x {:>11.3}x | {back_to_back:>17} | {fresh:>17} | {cpu:>23} | {swap_cpu:>15}",
            model(0)
                .sets
                .iter()
                .map(|s| s.elements.len())
                .sum::<usize>(),
            rounds,
            session_p50.as_secs_f64() / nft_p50.as_secs_f64(),
            one_shot_p50.as_secs_f64() / nft_p50.as_secs_f64(),
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

mod netns {
    use super::*;

    /// `nft -f SCRIPT`, spawned from a thread inside the namespace (a child
    /// inherits the network namespace of the thread that forks it).
    pub fn run_nft(target: &Target, script: &std::path::Path) {
        let status = netleash::netns::run_in(target, || {
            Command::new("nft").arg("-f").arg(script).status()
        })
        .expect("enter the namespace")
        .expect("run nft");
        assert!(status.success(), "nft -f {} failed", script.display());
    }
}
