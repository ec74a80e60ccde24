//! `netleash sidecar` end to end: the binary runs against the testbed's
//! sandbox namespace with the world's DNS server as its upstream, and real
//! packets from inside the sandbox judge it. Privileged: every test fails
//! (never skips) without root.
//!
//! The sidecar is a child process; the [`support::LoggedChild`] it runs in kills it
//! on drop, and the testbed's Drop deletes the namespaces, so a failed test leaves nothing.

use std::io::{Read as _, Write as _};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, ExitStatus};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use netleash::denial_log::{DENIED_MESSAGE, NO_DNS_ANSWER};
use netleash::kernel::nflog::{Delivery, Family, NflogListener};
use netleash::testbed::{
    self, BULK_RANGE_V4, DnsReply, Exchange, RESOLVER_V4, Testbed, Transport, Verdict, ZoneRecord,
};
use serde_json::Value;

use crate::support::{
    self, LineMissing, LoggedChild, REJECT_WITHIN, TIMEOUT, addr, assert_reachable,
    assert_rejected, exec_in, netleash_table, probe_while, write_policy,
};

/// How long the sidecar may take to say it is ready.
const READY_WITHIN: Duration = Duration::from_secs(20);

/// The world's DNS server, which every test's sidecar uses as its upstream.
const UPSTREAM: &str = "198.51.100.53";

/// An address where nothing serves DNS; a query sent there only gets an
/// answer if it is redirected to the proxy.
const NOT_A_RESOLVER: &str = "203.0.113.5";

/// TTL settings that make learned addresses expire within seconds:
/// element timeout = clamp(TTL, 1 s, 2 s) + 1 s.
const SHORT_TTLS: [&str; 6] = ["--ttl-min", "1s", "--ttl-max", "2s", "--ttl-grace", "1s"];

/// A running `netleash sidecar`, killed on drop.
struct Sidecar {
    process: LoggedChild,
    /// The health endpoint's address.
    health: SocketAddr,
}

impl Sidecar {
    /// Start the sidecar for `policy` in the testbed's sandbox and wait until it is ready.
    fn start(bed: &Testbed, policy: &Path, extra: &[&str]) -> Sidecar {
        support::require_root();
        let mut args = vec![
            "sidecar",
            policy.to_str().expect("policy path is UTF-8"),
            "--netns",
            bed.sandbox(),
            "--upstream",
            UPSTREAM,
            "--health",
            "127.0.0.1:0",
            "--log",
            "netleash=debug",
        ];
        args.extend_from_slice(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_netleash"));
        command.args(&args);
        let mut sidecar = Sidecar {
            process: LoggedChild::spawn(command, "sidecar"),
            health: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        let ready = sidecar.wait_for_line("ready:", READY_WITHIN);
        let health = ready
            .split("health on http://")
            .nth(1)
            .and_then(|rest| rest.split('/').next())
            .and_then(|at| at.parse().ok())
            .unwrap_or_else(|| panic!("no health address in {ready:?}"));
        sidecar.health = health;
        sidecar
    }

    /// The first stdout line containing `needle`, waiting up to `limit`.
    fn wait_for_line(&mut self, needle: &str, limit: Duration) -> String {
        match self.process.wait_for_line(needle, limit) {
            Ok(line) => line,
            Err(LineMissing::Exited(status)) => panic!(
                "the sidecar exited ({status}) before saying {needle:?}:\n{}",
                self.logs()
            ),
            Err(LineMissing::TimedOut) => panic!(
                "the sidecar did not say {needle:?} within {limit:?}:\n{}",
                self.logs()
            ),
        }
    }

    /// How many stdout lines contain `needle`.
    fn count_lines(&self, needle: &str) -> usize {
        self.process
            .stdout()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// The JSON log events (`--log-json`) on stderr whose message is `message`.
    fn json_events(&self, message: &str) -> Vec<Value> {
        self.process.json_events(message)
    }

    fn logs(&self) -> String {
        self.process.logs()
    }

    fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which we have not waited for.
        let rc = unsafe { libc::kill(self.process.child.id() as libc::pid_t, signal) };
        assert_eq!(rc, 0, "kill({}, {signal})", self.process.child.id());
    }

    fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let started = Instant::now();
        loop {
            if let Some(status) = self.process.child.try_wait().expect("wait for the sidecar") {
                return status;
            }
            assert!(
                started.elapsed() < limit,
                "the sidecar did not exit within {limit:?}:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `GET /healthz`: the status code and the JSON body.
    fn health(&self) -> (u16, Value) {
        let mut stream = TcpStream::connect_timeout(&self.health, TIMEOUT)
            .unwrap_or_else(|err| panic!("connect to the health endpoint: {err}\n{}", self.logs()));
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        stream
            .write_all(b"GET /healthz HTTP/1.0\r\nHost: sidecar\r\n\r\n")
            .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let status = response
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
        let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json = serde_json::from_str(body)
            .unwrap_or_else(|err| panic!("health body is not JSON ({err}): {body:?}"));
        (status, json)
    }
}

/// A policy file allowing `hosts` (allowed_hosts grammar).
fn policy(dir: &Path, name: &str, hosts: &[&str]) -> std::path::PathBuf {
    let json = serde_json::json!({"type": "limited", "allowed_hosts": hosts}).to_string();
    write_policy(dir, name, &json)
}

fn a(text: &str) -> ZoneRecord {
    match addr(text) {
        IpAddr::V4(v4) => ZoneRecord::A(v4),
        IpAddr::V6(v6) => ZoneRecord::Aaaa(v6),
    }
}

/// A DNS query from the sandbox to `server` port 53.
fn query(
    bed: &Testbed,
    server: &str,
    name: &str,
    record_type: RecordType,
    transport: Transport,
) -> Exchange<DnsReply> {
    bed.dns_query(addr(server), name, record_type, transport, TIMEOUT)
        .unwrap_or_else(|err| {
            panic!(
                "query {name} at {server}: {}",
                netleash::cli::render_error(&err)
            )
        })
}

/// The answer to a query that must be answered.
fn answered(bed: &Testbed, server: &str, name: &str, record_type: RecordType) -> DnsReply {
    let exchange = query(bed, server, name, record_type, Transport::Udp);
    exchange.reply.unwrap_or_else(|| {
        panic!(
            "{name} {record_type} at {server} got no answer: {}",
            exchange.outcome
        )
    })
}

/// In the sandbox: resolve `name` at `server` and connect to its first
/// address on `port` at once. Returns the address and the connect verdict.
fn resolve_and_connect(bed: &Testbed, server: IpAddr, name: &str, port: u16) -> (IpAddr, Verdict) {
    let name = name.to_string();
    bed.in_sandbox(move || {
        let exchange = testbed::dns_query(
            SocketAddr::new(server, testbed::DNS_PORT),
            &name,
            RecordType::A,
            Transport::Udp,
            TIMEOUT,
        )
        .expect("query from the sandbox");
        let reply = exchange
            .reply
            .unwrap_or_else(|| panic!("{name}: no answer ({})", exchange.outcome));
        assert_eq!(
            reply.response_code,
            ResponseCode::NoError,
            "{name}: {reply:?}"
        );
        let to = *reply
            .addresses()
            .first()
            .unwrap_or_else(|| panic!("{name}: no address in {reply:?}"));
        let outcome = testbed::probe::tcp_connect(SocketAddr::new(to, port), TIMEOUT)
            .expect("connect from the sandbox");
        (to, outcome.verdict)
    })
    .expect("run in the sandbox")
}

/// Wait until `check` holds, up to `limit`.
fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The element timeouts of a set, as `nft -j list set` shows them (seconds), by address.
fn element_timeouts(bed: &Testbed, set: &str) -> Vec<(String, u64)> {
    let output = exec_in(
        bed.sandbox(),
        &["nft", "-j", "list", "set", "inet", "netleash", set],
        None,
    );
    assert!(output.status.success(), "{}", support::describe(&output));
    let json: Value = serde_json::from_slice(&output.stdout).expect("nft -j is JSON");
    let elements = json["nftables"]
        .as_array()
        .and_then(|items| items.iter().find_map(|item| item["set"]["elem"].as_array()))
        .cloned()
        .unwrap_or_default();
    elements
        .iter()
        .filter_map(|element| {
            let element = &element["elem"];
            Some((
                element["val"].as_str()?.to_string(),
                element["timeout"].as_u64()?,
            ))
        })
        .collect()
}

#[test]
fn a_name_resolved_through_the_proxy_is_reachable_at_once_and_others_are_refused() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    let zone = bed.zone();
    zone.set("allowed.test", &[a("198.51.100.10")], 300);
    zone.set("app.wild.test", &[a("198.51.100.11")], 300);
    zone.set("v6.wild.test", &[a("2001:db8:100::11")], 300);
    zone.set("denied.test", &[a("203.0.113.20")], 300);
    let file = policy(dir.path(), "p.json", &["allowed.test", "*.wild.test"]);
    let sidecar = Sidecar::start(&bed, &file, &[]);

    // Before any query for it, the wildcard name's address is not allowed.
    assert_rejected(&bed, "198.51.100.11", 443);
    // Queried at the world's resolver address directly: redirected to the
    // proxy, answered, and the first SYN right after goes through.
    let (to, verdict) = resolve_and_connect(&bed, RESOLVER_V4, "app.wild.test", 443);
    assert_eq!((to, verdict), (addr("198.51.100.11"), Verdict::Connected));
    assert_reachable(&bed, "198.51.100.11", 80);

    // The exact name was resolved by the resolver loop before the proxy answered.
    assert_reachable(&bed, "198.51.100.10", 443);

    // AAAA over IPv6: redirected to the proxy at ::1.
    let reply = answered(&bed, "2001:db8:100::53", "v6.wild.test", RecordType::AAAA);
    assert_eq!(reply.addresses(), vec![addr("2001:db8:100::11")]);
    assert_reachable(&bed, "2001:db8:100::11", 443);

    // A name the policy does not allow is REFUSED, wherever it is sent, over
    // UDP and TCP, and never reaches the upstream.
    for server in [UPSTREAM, NOT_A_RESOLVER, "2001:db8:100::53"] {
        for transport in [Transport::Udp, Transport::Tcp] {
            let reply = query(&bed, server, "denied.test", RecordType::A, transport)
                .reply
                .unwrap_or_else(|| panic!("denied.test at {server} over {transport:?}: no answer"));
            assert_eq!(
                reply.response_code,
                ResponseCode::Refused,
                "{server} {transport:?}"
            );
            assert!(reply.answers.is_empty());
        }
    }
    assert!(
        !zone.queries().iter().any(|q| q.name == "denied.test"),
        "a refused name was forwarded upstream: {:?}",
        zone.queries()
    );
    assert_rejected(&bed, "203.0.113.20", 443);

    // An allowed name asked at an address with no DNS server at all is
    // answered too: every port-53 packet goes to the proxy.
    for transport in [Transport::Udp, Transport::Tcp] {
        let reply = query(
            &bed,
            NOT_A_RESOLVER,
            "allowed.test",
            RecordType::A,
            transport,
        )
        .reply
        .unwrap_or_else(|| {
            panic!("allowed.test at {NOT_A_RESOLVER} over {transport:?}: no answer")
        });
        assert_eq!(reply.addresses(), vec![addr("198.51.100.10")]);
    }
    // The upstream saw the proxy's queries, never a client's: they all came
    // from the sandbox's own address (the proxy's marked sockets there).
    for entry in zone.queries() {
        assert!(
            matches!(entry.from.ip(), ip if ip == IpAddr::from(testbed::SANDBOX_V4) || ip == IpAddr::from(testbed::SANDBOX_V6)),
            "{entry:?}"
        );
    }

    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
    assert_eq!(health["healthy"], true);
    assert_eq!(health["table"]["in_force"], true);
    assert_eq!(health["proxy"]["answers"], true);
    assert!(
        health["proxy"]["refused"].as_u64().unwrap() >= 6,
        "{health:#}"
    );
    assert!(
        health["learned"]["names"].as_u64().unwrap() >= 3,
        "{health:#}"
    );
}

#[test]
fn dns_over_tls_stays_blocked_even_to_an_allowed_address_and_health_sees_a_missing_table() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    bed.zone().set("a.fresh.test", &[a("198.51.100.11")], 300);
    let file = policy(dir.path(), "p.json", &["allowed.test", "*.fresh.test"]);
    let dot = bed
        .world_tcp_listener("198.51.100.10:853".parse().unwrap())
        .expect("a DNS-over-TLS listener in the world");
    dot.set_nonblocking(true).unwrap();
    let mut sidecar = Sidecar::start(&bed, &file, &[]);

    // The name is allowed on every port, but not on 853 (RFC 7858), and
    // neither is the resolver.
    assert_reachable(&bed, "198.51.100.10", 443);
    for ip in ["198.51.100.10", UPSTREAM, NOT_A_RESOLVER] {
        let outcome = support::connect(&bed, ip, 853);
        assert!(
            outcome.rejected_within(REJECT_WITHIN),
            "{ip} port 853: {outcome}"
        );
    }
    assert_eq!(
        dot.accept().map(|_| ()).unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock,
        "a DNS-over-TLS connection reached the world"
    );

    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
    // The rule counters: the one allowed connection's SYN was counted by an
    // allow rule, the three rejected SYNs by the deny rules.
    let counted = |verdict: &str| health["table"][verdict]["packets"].as_u64();
    assert!(counted("allowed").is_some_and(|n| n >= 1), "{health:#}");
    assert!(counted("denied").is_some_and(|n| n >= 3), "{health:#}");
    // Someone deletes the table: the health check says so.
    let output = exec_in(
        bed.sandbox(),
        &["nft", "delete", "table", "inet", "netleash"],
        None,
    );
    assert!(output.status.success(), "{}", support::describe(&output));
    let (status, health) = sidecar.health();
    assert_eq!(status, 503, "{health:#}");
    assert_eq!(health["healthy"], false);
    assert_eq!(health["table"]["in_force"], false);
    assert_eq!(health["proxy"]["answers"], true);
    // Without the table the proxy cannot write a fresh answer's address into
    // the sets: the client gets SERVFAIL, not an address it could not reach.
    // (A name under a wildcard, so the resolver loop has not resolved it
    // before; the redirect went with the table, so the query goes to the
    // proxy's own address.)
    let proxy = SocketAddr::from(([127, 0, 0, 1], netleash::cli::sidecar::DEFAULT_PROXY_PORT));
    let exchange = testbed::run_in_netns(bed.sandbox(), || {
        testbed::dns_query(
            proxy,
            "a.fresh.test",
            RecordType::A,
            Transport::Udp,
            TIMEOUT,
        )
    })
    .unwrap()
    .unwrap();
    let reply = exchange.reply.expect("the proxy answers");
    assert_eq!(reply.response_code, ResponseCode::ServFail, "{:?}", reply);
    assert!(reply.answers.is_empty());
    eventually(
        Duration::from_secs(5),
        "the write failure is logged",
        || {
            sidecar
                .logs()
                .contains("could not write the answer's addresses into the sets")
        },
    );

    // SIGHUP with the same policy puts the table back.
    sidecar.signal(libc::SIGHUP);
    sidecar.wait_for_line("reloaded policy", Duration::from_secs(10));
    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "198.51.100.10", 853);
    // The name refused a moment ago is answered and reachable now.
    let reply = answered(&bed, UPSTREAM, "a.fresh.test", RecordType::A);
    assert_eq!(reply.response_code, ResponseCode::NoError, "{reply:?}");
    assert_eq!(reply.addresses(), [addr("198.51.100.11")]);
    assert_reachable(&bed, "198.51.100.11", 443);
}

#[test]
fn rotation_makes_the_new_address_reachable_and_the_old_one_expire() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("rotate.test", &[a("198.51.100.10")], 1);
    let file = policy(dir.path(), "p.json", &["rotate.test"]);
    let _sidecar = Sidecar::start(&bed, &file, &SHORT_TTLS);

    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "198.51.100.11", 443);
    // Each element lives 2 s; the resolver loop re-adds it before that, and
    // re-adding refreshes its timeout, so it outlives its timeout many times.
    std::thread::sleep(Duration::from_secs(5));
    assert_reachable(&bed, "198.51.100.10", 443);

    bed.zone().set("rotate.test", &[a("198.51.100.11")], 1);
    eventually(
        Duration::from_secs(8),
        "the new address becomes reachable",
        || support::connect(&bed, "198.51.100.11", 443).verdict == Verdict::Connected,
    );
    eventually(Duration::from_secs(8), "the old address expires", || {
        support::connect(&bed, "198.51.100.10", 443).rejected_within(REJECT_WITHIN)
    });
    assert_rejected(&bed, "198.51.100.10", 443);
    let reply = answered(&bed, UPSTREAM, "rotate.test", RecordType::A);
    assert_eq!(reply.addresses(), vec![addr("198.51.100.11")]);
    assert_reachable(&bed, "198.51.100.11", 443);
}

#[test]
fn ttl_zero_and_huge_ttls_are_clamped_in_the_kernel() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("zero.test", &[a("198.51.100.10")], 0);
    bed.zone()
        .set("huge.test", &[a("198.51.100.11")], 1_000_000);
    bed.zone().set("app.wild.test", &[a("203.0.113.20")], 0);
    let file = policy(
        dir.path(),
        "p.json",
        &["zero.test", "huge.test", "*.wild.test"],
    );
    let _sidecar = Sidecar::start(&bed, &file, &[]);
    answered(&bed, UPSTREAM, "app.wild.test", RecordType::A);

    // The documented defaults: clamp(TTL, 30 s, 1 h) + 60 s grace.
    let timeouts = element_timeouts(&bed, "dns_v4");
    let of = |ip: &str| {
        timeouts
            .iter()
            .find(|(addr, _)| addr == ip)
            .map(|(_, timeout)| *timeout)
            .unwrap_or_else(|| panic!("{ip} is not in dns_v4: {timeouts:?}"))
    };
    assert_eq!(of("198.51.100.10"), 90, "TTL 0 (resolver loop)");
    assert_eq!(of("203.0.113.20"), 90, "TTL 0 (proxy)");
    assert_eq!(of("198.51.100.11"), 3_660, "TTL 1,000,000");
}

#[test]
fn an_upstream_outage_keeps_working_addresses() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("steady.test", &[a("198.51.100.10")], 2);
    let file = policy(dir.path(), "p.json", &["steady.test"]);
    // Elements live clamp(2 s) + 8 s = 10 s; a failed lookup takes 3 attempts
    // of 2 s, which the grace period must cover (the default grace is 60 s).
    let ttls = ["--ttl-min", "2s", "--ttl-max", "2s", "--ttl-grace", "8s"];
    let sidecar = Sidecar::start(&bed, &file, &ttls);
    assert_reachable(&bed, "198.51.100.10", 443);

    support::nft_load(
        bed.world(),
        "table inet outage {\n chain input {\n type filter hook input priority 0; policy accept;\n \
         udp dport 53 drop\n tcp dport 53 drop\n }\n}\n",
    );
    // Longer than an element's whole timeout since the last answer.
    std::thread::sleep(Duration::from_secs(14));
    assert_reachable(&bed, "198.51.100.10", 443);
    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
    assert!(
        health["resolver"]["failing"].as_u64().unwrap() > 0,
        "{health:#}"
    );
    assert!(
        health["resolver"]["stale"].as_u64().unwrap() > 0,
        "{health:#}"
    );
}

#[test]
fn a_thousand_fresh_names_connect_on_their_first_syn() {
    const NAMES: u32 = 1_000;
    const PORT: u16 = 8080;
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.add_world_range(BULK_RANGE_V4.parse().unwrap())
        .expect("add the bulk range to the world");
    let listener = bed
        .world_tcp_listener(SocketAddr::from(([0, 0, 0, 0], PORT)))
        .expect("a listener for the bulk range");
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let bulk = |i: u32| {
        let n = i + 1;
        IpAddr::from([198, 18, (n >> 8) as u8, n as u8])
    };
    for i in 0..NAMES {
        let IpAddr::V4(v4) = bulk(i) else {
            unreachable!()
        };
        bed.zone()
            .set(&format!("n{i}.bulk.test"), &[ZoneRecord::A(v4)], 300);
    }
    let file = policy(dir.path(), "p.json", &["*.bulk.test"]);
    let sidecar = Sidecar::start(&bed, &file, &[]);

    let started = Instant::now();
    let failures = bed
        .in_sandbox(move || {
            let mut failures = Vec::new();
            for i in 0..NAMES {
                let name = format!("n{i}.bulk.test");
                let exchange = testbed::dns_query(
                    SocketAddr::new(RESOLVER_V4, testbed::DNS_PORT),
                    &name,
                    RecordType::A,
                    Transport::Udp,
                    TIMEOUT,
                )
                .expect("query from the sandbox");
                let Some(to) = exchange.reply.and_then(|r| r.addresses().first().copied()) else {
                    failures.push(format!("{name}: no address ({})", exchange.outcome));
                    continue;
                };
                if to != bulk(i) {
                    failures.push(format!("{name}: answered {to}"));
                    continue;
                }
                let outcome = testbed::probe::tcp_connect(SocketAddr::new(to, PORT), TIMEOUT)
                    .expect("connect from the sandbox");
                if outcome.verdict != Verdict::Connected {
                    failures.push(format!("{name} ({to}): {outcome}"));
                }
            }
            failures
        })
        .expect("run in the sandbox");
    let elapsed = started.elapsed();
    assert!(
        failures.is_empty(),
        "{} of {NAMES} fresh names failed their first connection: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    eventually(
        Duration::from_secs(5),
        "the world accepted every connection",
        || accepted.load(Ordering::Relaxed) == u64::from(NAMES),
    );
    let (_, health) = sidecar.health();
    assert!(
        health["learned"]["addresses"].as_u64().unwrap() >= u64::from(NAMES),
        "{health:#}"
    );
    eprintln!("{NAMES} names resolved and connected in {elapsed:?}");
}

#[test]
fn sighup_reloads_keeping_what_is_still_allowed_and_a_bad_policy_changes_nothing() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    let zone = bed.zone();
    zone.set("app.wild.test", &[a("198.51.100.11")], 300);
    zone.set("gone.test", &[a("198.51.100.10")], 300);
    zone.set("new.test", &[a("203.0.113.20")], 300);
    let file = policy(dir.path(), "p.json", &["*.wild.test", "gone.test"]);
    let mut sidecar = Sidecar::start(&bed, &file, &[]);
    let (to, verdict) = resolve_and_connect(&bed, RESOLVER_V4, "app.wild.test", 443);
    assert_eq!((to, verdict), (addr("198.51.100.11"), Verdict::Connected));
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "203.0.113.20", 443);
    let first_digest = sidecar.health().1["digest"].clone();

    policy(dir.path(), "p.json", &["*.wild.test", "new.test"]);
    // The address learned for the wildcard is never lost during the reload.
    let (probes, wrong) = probe_while(&bed, &[(addr("198.51.100.11"), true)], 443, || {
        sidecar.signal(libc::SIGHUP);
        sidecar.wait_for_line("reloaded policy", Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(300));
    });
    assert!(probes > 0);
    assert!(
        wrong.is_empty(),
        "{} wrong verdicts during the reload, the first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
    assert_ne!(health["digest"], first_digest);
    assert_eq!(health["table"]["in_force"], true);

    // What the new policy no longer allows is forgotten at once; what it
    // adds is resolved and reachable.
    assert_rejected(&bed, "198.51.100.10", 443);
    let refused = answered(&bed, UPSTREAM, "gone.test", RecordType::A);
    assert_eq!(refused.response_code, ResponseCode::Refused);
    assert_reachable(&bed, "203.0.113.20", 443);
    assert_reachable(&bed, "198.51.100.11", 443);

    // A policy that does not load changes nothing.
    std::fs::write(&file, r#"{"type": "limited", "allowed_hosts": ["#).unwrap();
    sidecar.signal(libc::SIGHUP);
    sidecar.wait_for_line("reload failed", Duration::from_secs(10));
    let (status, after) = sidecar.health();
    assert_eq!(status, 200, "{after:#}");
    assert_eq!(after["digest"], health["digest"]);
    assert_eq!(after["table"]["digest"], health["digest"]);
    assert_reachable(&bed, "203.0.113.20", 443);
    assert_reachable(&bed, "198.51.100.11", 443);
    assert_rejected(&bed, "198.51.100.10", 443);
}

#[test]
fn kill_9_and_a_restart_never_break_connections_to_allowed_addresses() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("steady.test", &[a("198.51.100.10")], 300);
    bed.zone().set("app.wild.test", &[a("198.51.100.11")], 300);
    bed.zone()
        .set("other.wild.test", &[a("2001:db8:100::11")], 300);
    let file = policy(dir.path(), "p.json", &["steady.test", "*.wild.test"]);
    let mut first = Sidecar::start(&bed, &file, &[]);
    answered(&bed, UPSTREAM, "app.wild.test", RecordType::A);

    let expectations = [
        (addr("198.51.100.10"), true),
        (addr("198.51.100.11"), true),
        (addr("203.0.113.20"), false),
    ];
    let mut second = None;
    let (probes, wrong) = probe_while(&bed, &expectations, 443, || {
        std::thread::sleep(Duration::from_millis(200));
        first.signal(libc::SIGKILL);
        first.wait_exit(Duration::from_secs(5));
        second = Some(Sidecar::start(&bed, &file, &[]));
        std::thread::sleep(Duration::from_millis(300));
    });
    let second = second.expect("the sidecar restarted");
    assert!(probes > 10, "only {probes} probes ran");
    assert!(
        wrong.is_empty(),
        "{} wrong verdicts of {probes} during kill -9 and restart, the first: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert_eq!(
        second.count_lines("is already in force"),
        1,
        "the restart should keep the table in force:\n{}",
        second.logs()
    );
    let (status, health) = second.health();
    assert_eq!(status, 200, "{health:#}");
    // The killed sidecar's nflog subscription died with its socket.
    assert_eq!(health["denials"]["listening"], true, "{health:#}");
    let reply = answered(&bed, UPSTREAM, "other.wild.test", RecordType::AAAA);
    assert_eq!(reply.addresses(), vec![addr("2001:db8:100::11")]);
    assert_reachable(&bed, "2001:db8:100::11", 443);
}

#[test]
fn sigterm_stops_the_sidecar_and_leaves_the_rules_in_force() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("steady.test", &[a("198.51.100.10")], 300);
    let file = policy(dir.path(), "p.json", &["steady.test"]);
    let mut sidecar = Sidecar::start(&bed, &file, &[]);
    assert_reachable(&bed, "198.51.100.10", 443);
    let digest = sidecar.health().1["digest"]
        .as_str()
        .expect("a digest")
        .to_string();

    sidecar.signal(libc::SIGTERM);
    let status = sidecar.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status}\n{}", sidecar.logs());
    sidecar.wait_for_line(
        "the rules stay in force (fail closed)",
        Duration::from_secs(1),
    );

    let table = netleash_table(bed.sandbox()).expect("the table stays after SIGTERM");
    assert!(table.contains(&digest), "{table}");
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "203.0.113.20", 443);
    // DNS is still redirected to the proxy's port, where nothing answers now.
    let exchange = query(&bed, UPSTREAM, "steady.test", RecordType::A, Transport::Udp);
    assert!(
        exchange.reply.is_none(),
        "DNS was answered with no proxy running: {:?}",
        exchange.reply
    );
}

/// The proxy's upstream connections are tracked apart from the sandbox's, so
/// a sandbox socket that takes over a source port the proxy used (its
/// connection still in conntrack) is redirected like any other, instead of
/// passing to the upstream as part of the proxy's connection.
#[test]
fn a_sandbox_socket_reusing_a_proxy_source_port_is_still_redirected() {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::Name;

    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("allowed.test", &[a("198.51.100.10")], 300);
    bed.zone().set("denied.test", &[a("203.0.113.20")], 300);
    let file = policy(dir.path(), "p.json", &["allowed.test"]);
    let _sidecar = Sidecar::start(&bed, &file, &[]);
    answered(&bed, NOT_A_RESOLVER, "allowed.test", RecordType::A);

    // The source ports of the proxy's and the resolver loop's upstream
    // queries, as the upstream saw them; conntrack still holds their connections.
    let mut ports: Vec<u16> = bed
        .zone()
        .queries()
        .iter()
        .filter(|q| q.from.ip() == IpAddr::from(testbed::SANDBOX_V4))
        .map(|q| q.from.port())
        .collect();
    ports.sort_unstable();
    ports.dedup();
    assert!(
        !ports.is_empty(),
        "the upstream saw no query from the sandbox"
    );

    let answers = bed
        .in_sandbox(move || {
            let mut answers = Vec::new();
            for port in ports {
                // Ports the proxy still holds open cannot be taken; the closed
                // ones (the resolver loop opens one socket per query) can.
                let Ok(socket) = std::net::UdpSocket::bind(("0.0.0.0", port)) else {
                    continue;
                };
                socket.set_read_timeout(Some(TIMEOUT)).unwrap();
                let mut query = Message::new(port, MessageType::Query, OpCode::Query);
                query.add_query(Query::query(
                    Name::from_ascii("denied.test.").unwrap(),
                    RecordType::A,
                ));
                socket
                    .send_to(&query.to_vec().unwrap(), (RESOLVER_V4, 53))
                    .unwrap();
                let mut buffer = [0u8; 512];
                let answer = socket.recv(&mut buffer).map(|length| {
                    Message::from_vec(&buffer[..length])
                        .expect("a DNS answer")
                        .metadata
                        .response_code
                });
                answers.push((port, answer.map_err(|e| e.to_string())));
            }
            answers
        })
        .expect("run in the sandbox");
    assert!(
        !answers.is_empty(),
        "no source port of the proxy's upstream queries was free to reuse"
    );
    for (port, answer) in &answers {
        assert_eq!(
            answer.as_ref(),
            Ok(&ResponseCode::Refused),
            "a query from reused source port {port} was not answered by the proxy"
        );
    }
    assert!(
        !bed.zone().queries().iter().any(|q| q.name == "denied.test"),
        "a query from a reused source port reached the upstream: {:?}",
        bed.zone().queries()
    );
}

#[test]
fn an_unrestricted_policy_leaves_dns_alone() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("any.test", &[a("203.0.113.20")], 300);
    let file = write_policy(dir.path(), "p.json", r#"{"type": "unrestricted"}"#);
    let sidecar = Sidecar::start(&bed, &file, &[]);
    // No redirect: the world's server answers, for any name, and an address
    // with no DNS server gives no answer.
    let reply = answered(&bed, UPSTREAM, "any.test", RecordType::A);
    assert_eq!(reply.addresses(), vec![addr("203.0.113.20")]);
    let exchange = query(
        &bed,
        NOT_A_RESOLVER,
        "any.test",
        RecordType::A,
        Transport::Udp,
    );
    assert!(exchange.reply.is_none(), "{:?}", exchange.reply);
    assert_reachable(&bed, "203.0.113.20", 443);
    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
}

/// Bad input is refused before anything is touched: no namespace is needed
/// to see it, and none is created or changed.
#[test]
fn bad_input_is_refused_with_exit_code_2_before_anything_changes() {
    let dir = tempfile::tempdir().unwrap();
    let bad_policy = write_policy(
        dir.path(),
        "bad.json",
        r#"{"type": "limited", "allowed_hosts": [1]}"#,
    );
    let good_policy = policy(dir.path(), "good.json", &["allowed.test"]);
    let no_nameserver = write_policy(dir.path(), "resolv.conf", "search example\n");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec![bad_policy.to_str().unwrap(), "--upstream", UPSTREAM],
            "allowed_hosts",
        ),
        (
            vec![
                good_policy.to_str().unwrap(),
                "--upstream",
                "resolver.example",
            ],
            "IP:PORT",
        ),
        (
            vec![
                good_policy.to_str().unwrap(),
                "--upstream",
                UPSTREAM,
                "--proxy-mark",
                "0",
            ],
            "not be 0",
        ),
        (
            vec![
                good_policy.to_str().unwrap(),
                "--resolv-conf",
                no_nameserver.to_str().unwrap(),
            ],
            "names no nameserver",
        ),
    ];
    for (args, expected) in cases {
        let mut all = vec!["sidecar"];
        all.extend(&args);
        all.extend(["--netns", "netleash-test-no-such-namespace"]);
        let output = support::netleash(&all);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{args:?}: {}",
            support::describe(&output)
        );
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!support::netns_exists("netleash-test-no-such-namespace"));
    }
}

/// The denied-connection lines of `events` to `dst` port `port`.
fn denials_to<'a>(events: &'a [Value], dst: &str, port: u16) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|event| event["fields"]["dst"] == dst && event["fields"]["port"] == port)
        .collect()
}

#[test]
fn a_denied_connection_is_logged_once_with_the_host_its_address_was_resolved_for() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("app.wild.test", &[a("198.51.100.11")], 300);
    let file = policy(dir.path(), "p.json", &["*.wild.test:443"]);
    let sidecar = Sidecar::start(&bed, &file, &["--log-json"]);

    // Allowed: the name resolved through the proxy, then port 443.
    let (to, verdict) = resolve_and_connect(&bed, RESOLVER_V4, "app.wild.test", 443);
    assert_eq!((to, verdict), (addr("198.51.100.11"), Verdict::Connected));
    // Denied twice: the resolved address on a port the policy does not allow.
    assert_rejected(&bed, "198.51.100.11", 8443);
    assert_rejected(&bed, "198.51.100.11", 8443);
    // Denied once: an address no DNS answer named, on the allowed port; and
    // one over IPv6.
    assert_rejected(&bed, "203.0.113.20", 443);
    assert_rejected(&bed, "2001:db8:100::10", 8443);

    eventually(
        Duration::from_secs(5),
        "three denied-connection lines and four denied packets",
        || {
            sidecar.json_events(DENIED_MESSAGE).len() >= 3
                && sidecar.health().1["denials"]["packets"].as_u64() >= Some(4)
        },
    );
    // Room for a wrong third line to arrive (the kernel batches for 100 ms).
    std::thread::sleep(Duration::from_millis(500));
    let events = sidecar.json_events(DENIED_MESSAGE);

    let resolved = denials_to(&events, "198.51.100.11", 8443);
    assert_eq!(resolved.len(), 1, "{events:#?}");
    let fields = &resolved[0]["fields"];
    assert_eq!(fields["host"], "app.wild.test", "{fields:#}");
    assert_eq!(fields["proto"], "tcp", "{fields:#}");
    assert_eq!(fields["sandbox"], bed.sandbox(), "{fields:#}");
    assert_eq!(fields["src"], testbed::SANDBOX_V4.to_string(), "{fields:#}");
    assert!(fields.get("note").is_none(), "{fields:#}");
    assert_eq!(resolved[0]["level"], "WARN");

    let literal = denials_to(&events, "203.0.113.20", 443);
    assert_eq!(literal.len(), 1, "{events:#?}");
    let fields = &literal[0]["fields"];
    assert!(fields.get("host").is_none(), "{fields:#}");
    assert_eq!(fields["note"], NO_DNS_ANSWER, "{fields:#}");

    let ipv6 = denials_to(&events, "2001:db8:100::10", 8443);
    assert_eq!(ipv6.len(), 1, "{events:#?}");
    assert_eq!(ipv6[0]["fields"]["src"], testbed::SANDBOX_V6.to_string());
    assert_eq!(ipv6[0]["fields"]["note"], NO_DNS_ANSWER);

    assert!(
        denials_to(&events, "198.51.100.11", 443).is_empty(),
        "the allowed connection was logged as denied: {events:#?}"
    );
    assert_eq!(events.len(), 3, "{events:#?}");

    let (status, health) = sidecar.health();
    assert_eq!(status, 200, "{health:#}");
    let denials = &health["denials"];
    assert_eq!(denials["listening"], true, "{denials:#}");
    assert_eq!(denials["nflog_group"], 4711, "{denials:#}");
    assert!(denials["error"].is_null(), "{denials:#}");
    for (counter, expected) in [
        ("packets", 4),
        ("logged", 3),
        ("repeated", 1),
        ("suppressed", 0),
        ("unreadable", 0),
        ("foreign", 0),
        ("overruns", 0),
    ] {
        assert_eq!(denials[counter], expected, "{counter}: {denials:#}");
    }
}

#[test]
fn a_sidecar_that_cannot_read_nflog_enforces_all_the_same() {
    let bed = support::testbed();
    let dir = tempfile::tempdir().unwrap();
    bed.zone().set("steady.test", &[a("198.51.100.10")], 300);
    let file = policy(dir.path(), "p.json", &["steady.test"]);
    // Another listener holds the group in the sandbox's namespace first.
    let sandbox = netleash::netns::Target::Name(bed.sandbox().to_string());
    let mut other = NflogListener::open(&sandbox, 4711).unwrap_or_else(|err| {
        panic!(
            "listen to nflog 4711 in the sandbox: {}",
            netleash::cli::render_error(&err)
        )
    });
    let mut sidecar = Sidecar::start(&bed, &file, &[]);
    let off = sidecar.wait_for_line("the denied-connection log is off", Duration::from_secs(1));
    assert!(off.contains("another program already listens"), "{off}");

    assert_reachable(&bed, "198.51.100.10", 443);
    assert_rejected(&bed, "203.0.113.20", 443);
    let (status, health) = sidecar.health();
    assert_eq!(
        status, 200,
        "the sidecar is healthy without its log: {health:#}"
    );
    assert_eq!(health["denials"]["listening"], false, "{health:#}");
    assert!(
        health["denials"]["error"]
            .as_str()
            .is_some_and(|error| error.contains("nflog group 4711")),
        "{health:#}"
    );

    // The other listener got the denied packet, parsed from the kernel's bytes.
    let started = Instant::now();
    let denied = loop {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the other listener received no denied packet"
        );
        let delivery = other.receive().expect("read nflog");
        if let Some(Delivery::Messages(messages)) = delivery
            && let Some(packet) = messages
                .into_iter()
                .flatten()
                .find(|p| p.dst == addr("203.0.113.20"))
        {
            break packet;
        }
    };
    assert_eq!(denied.family, Family::Ipv4);
    assert_eq!((denied.l4proto, denied.dport), (6, Some(443)));
    assert_eq!(denied.src, IpAddr::from(testbed::SANDBOX_V4));
    assert_eq!(denied.prefix, "netleash deny ");
}
