//! The privileged test harness itself, with no netleash rules: the topology
//! works, the probes tell a reject from a drop, DNS answers are live, and
//! nothing outlives a testbed.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;
use netleash::testbed::{
    self, METADATA_V4, METADATA_V6, RESOLVER_V4, RESOLVER_V6, SANDBOX_V4, SANDBOX_V6, TCP_PORTS,
    Testbed, Transport, UDP_ECHO_PORT, Verdict, ZoneRecord,
};

use crate::support::{self, REJECT_WITHIN, TIMEOUT, addr, assert_reachable, connect};

#[test]
fn every_served_address_answers_http_on_every_port_and_udp_echo() {
    let bed = support::testbed();
    let served = testbed::served_addresses();
    assert!(served.iter().any(IpAddr::is_ipv4) && served.iter().any(IpAddr::is_ipv6));
    assert!(served.contains(&METADATA_V4) && served.contains(&METADATA_V6));
    for ip in &served {
        for port in TCP_PORTS {
            let at = SocketAddr::new(*ip, port);
            let before = bed.arrivals(Transport::Tcp, at);
            assert_reachable(&bed, &ip.to_string(), port);
            assert_eq!(
                bed.arrivals(Transport::Tcp, at),
                before + 1,
                "the world counted the connection to {at}"
            );
        }
        support::assert_udp_echoed(&bed, &ip.to_string(), UDP_ECHO_PORT);
    }
}

#[test]
fn a_closed_port_is_refused_at_once() {
    let bed = support::testbed();
    for ip in ["198.51.100.10", "2001:db8:100::10"] {
        let outcome = connect(&bed, ip, 81);
        assert_eq!(outcome.verdict, Verdict::Refused, "{ip} port 81: {outcome}");
        assert!(outcome.elapsed < REJECT_WITHIN, "{ip} port 81: {outcome}");
    }
}

/// A hand-written ruleset loaded with plain `nft -f` proves that the probes
/// see blocking, and tell its kinds apart, before netleash is involved at all.
#[test]
fn probes_tell_accept_reset_admin_prohibited_and_drop_apart() {
    let bed = support::testbed();
    support::nft_load(
        bed.sandbox(),
        "table inet harness_probe {\n\
         \tchain output {\n\
         \t\ttype filter hook output priority filter; policy accept;\n\
         \t\tip daddr 198.51.100.11 reject with icmp admin-prohibited\n\
         \t\tip daddr 203.0.113.5 meta l4proto tcp reject with tcp reset\n\
         \t\tip daddr 203.0.113.20 drop\n\
         \t\tip6 daddr 2001:db8:100::11 meta l4proto tcp reject with tcp reset\n\
         \t\tip6 daddr 2001:db8:100::10 tcp dport 8443 reject with icmpv6 admin-prohibited\n\
         \t\tip6 daddr 2001:db8:100::11 reject with icmpv6 admin-prohibited\n\
         \t}\n\
         }\n",
    );
    assert_reachable(&bed, "198.51.100.10", 443);
    assert_reachable(&bed, "2001:db8:100::10", 443);

    let unreachable = Verdict::Unreachable {
        errno: libc::EHOSTUNREACH,
    };
    for (ip, expected) in [
        ("198.51.100.11", unreachable),
        ("203.0.113.5", Verdict::Refused),
        ("2001:db8:100::11", Verdict::Refused),
    ] {
        support::assert_rejected(&bed, ip, 443);
        assert_eq!(connect(&bed, ip, 443).verdict, expected, "{ip}");
    }
    // A rejected datagram fails at once too: the reject drops the original
    // packet, so send(2) itself returns EPERM.
    support::assert_udp_rejected(&bed, "198.51.100.11", UDP_ECHO_PORT);
    support::assert_udp_rejected(&bed, "2001:db8:100::11", UDP_ECHO_PORT);

    // Observed on Linux 6.x: a locally generated ICMPv6 admin-prohibited
    // reaches a connecting TCP socket while connect(2) still holds it, so
    // tcp_v6_err records only a soft error and the verdict (EACCES) waits for
    // the SYN retransmission, about 1 s later (RFC 6298 initial RTO). Deny
    // rules must answer TCP with a reset; the probes make the difference visible.
    let slow = connect(&bed, "2001:db8:100::10", 8443);
    assert_eq!(
        slow.verdict,
        Verdict::Unreachable {
            errno: libc::EACCES
        },
        "{slow}"
    );
    assert!(!slow.rejected_within(REJECT_WITHIN), "{slow}");

    // A silent drop is not a reject: it times out, and the probes say so.
    let short = Duration::from_millis(300);
    let dropped = bed
        .tcp_connect(addr("203.0.113.20"), 443, short)
        .expect("probe");
    assert_eq!(dropped.verdict, Verdict::TimedOut, "{dropped}");
    assert!(dropped.elapsed >= short, "{dropped}");
    assert!(!dropped.rejected_within(REJECT_WITHIN));

    support::nft_load(bed.sandbox(), "delete table inet harness_probe\n");
    for ip in [
        "198.51.100.11",
        "203.0.113.5",
        "203.0.113.20",
        "2001:db8:100::11",
    ] {
        assert_reachable(&bed, ip, 443);
    }
    assert_reachable(&bed, "2001:db8:100::10", 8443);
}

#[test]
fn dns_answers_follow_the_zone_over_udp_and_tcp_on_both_resolvers() {
    let bed = support::testbed();
    let ask = |name: &str, record_type, server, transport| {
        let exchange = bed
            .dns_query(server, name, record_type, transport, TIMEOUT)
            .expect("dns query");
        exchange
            .reply
            .unwrap_or_else(|| panic!("no DNS answer for {name}: {}", exchange.outcome))
    };
    bed.zone().set(
        "api.test",
        &[ZoneRecord::A("198.51.100.10".parse().unwrap())],
        30,
    );
    bed.zone()
        .set("www.test", &[ZoneRecord::Cname("api.test".into())], 60);
    bed.zone().set(
        "v6.test",
        &[ZoneRecord::Aaaa("2001:db8:100::10".parse().unwrap())],
        10,
    );

    for server in [RESOLVER_V4, RESOLVER_V6] {
        for transport in [Transport::Udp, Transport::Tcp] {
            let reply = ask("api.test", RecordType::A, server, transport);
            assert_eq!(reply.response_code, ResponseCode::NoError);
            assert_eq!(
                reply.answers,
                vec![(
                    "api.test".into(),
                    ZoneRecord::A("198.51.100.10".parse().unwrap()),
                    30
                )]
            );

            let chained = ask("WWW.test.", RecordType::A, server, transport);
            assert_eq!(
                chained.answers[0],
                ("www.test".into(), ZoneRecord::Cname("api.test".into()), 60)
            );
            assert_eq!(chained.addresses(), vec![addr("198.51.100.10")]);

            let v6 = ask("v6.test", RecordType::AAAA, server, transport);
            assert_eq!(v6.addresses(), vec![addr("2001:db8:100::10")]);

            let missing = ask("nothing.test", RecordType::A, server, transport);
            assert_eq!(missing.response_code, ResponseCode::NXDomain);
            assert!(missing.answers.is_empty());
        }
    }

    // Changes are visible to the next query, TTL included.
    let moved = [
        ZoneRecord::A("203.0.113.5".parse().unwrap()),
        ZoneRecord::A("203.0.113.20".parse().unwrap()),
    ];
    bed.zone().set("api.test", &moved, 5);
    let reply = ask("api.test", RecordType::A, RESOLVER_V4, Transport::Udp);
    assert_eq!(
        reply.addresses(),
        vec![addr("203.0.113.5"), addr("203.0.113.20")]
    );
    assert!(reply.answers.iter().all(|(_, _, ttl)| *ttl == 5));
    bed.zone().remove("api.test");
    let gone = ask("api.test", RecordType::A, RESOLVER_V4, Transport::Udp);
    assert_eq!(gone.response_code, ResponseCode::NXDomain);

    // Every query came from the sandbox, over the link.
    let queries = bed.zone().queries();
    assert_eq!(queries.len(), 2 * 2 * 4 + 2);
    assert!(
        queries.iter().all(
            |query| [IpAddr::V4(SANDBOX_V4), IpAddr::V6(SANDBOX_V6)].contains(&query.from.ip())
        )
    );
}

#[test]
fn work_runs_in_the_sandbox_and_the_caller_never_moves() {
    use std::os::unix::fs::MetadataExt as _;
    let bed = support::testbed();
    let identity = |path: &str| {
        let meta = std::fs::metadata(path).unwrap_or_else(|err| panic!("stat {path}: {err}"));
        (meta.dev(), meta.ino())
    };
    let caller = identity("/proc/thread-self/ns/net");
    let sandbox = identity(testbed::netns_path(bed.sandbox()).to_str().unwrap());
    let world = identity(testbed::netns_path(bed.world()).to_str().unwrap());
    assert_ne!(sandbox, world);
    assert_ne!(caller, sandbox);
    let inside = bed
        .in_sandbox(|| identity("/proc/thread-self/ns/net"))
        .expect("run in the sandbox");
    assert_eq!(inside, sandbox);
    assert_eq!(
        bed.in_world(|| identity("/proc/thread-self/ns/net"))
            .expect("run in the world"),
        world
    );
    assert_eq!(identity("/proc/thread-self/ns/net"), caller);

    // The sandbox has exactly lo and its end of the veth pair; none of it is
    // in the caller's namespace.
    let links = support::exec_in(bed.sandbox(), &["ip", "-o", "link", "show"], None);
    let links = String::from_utf8_lossy(&links.stdout);
    assert_eq!(links.lines().count(), 2, "{links}");
    assert!(links.contains(testbed::SANDBOX_LINK), "{links}");
    for link in [testbed::SANDBOX_LINK, testbed::WORLD_LINK] {
        let here = std::process::Command::new("ip")
            .args(["link", "show", link])
            .output()
            .expect("run ip");
        assert!(
            !here.status.success(),
            "{link} exists in the caller's namespace"
        );
    }
}

#[test]
fn a_panic_in_sandbox_work_reaches_the_caller() {
    let bed = support::testbed();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _ = bed.in_sandbox(|| panic!("inside"));
    }));
    let message = caught.expect_err("the panic must propagate");
    assert_eq!(message.downcast_ref::<&str>(), Some(&"inside"));
    // The testbed is still usable afterwards.
    assert_reachable(&bed, "198.51.100.10", 80);
}

#[test]
fn close_and_drop_delete_the_namespaces_even_on_panic() {
    support::require_root();
    let closed = Testbed::new().expect("testbed");
    let names = [closed.sandbox().to_string(), closed.world().to_string()];
    assert!(names.iter().all(|name| support::netns_exists(name)));
    closed.close().expect("close");
    for name in &names {
        assert!(!support::netns_exists(name), "{name} survived close");
    }

    let mut panicked_names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let bed = Testbed::new().expect("testbed");
        panicked_names = vec![bed.sandbox().to_string(), bed.world().to_string()];
        panic!("a failing test");
    }));
    assert!(result.is_err());
    assert_eq!(panicked_names.len(), 2);
    for name in &panicked_names {
        assert!(!support::netns_exists(name), "{name} survived a panic");
    }
}

#[test]
fn testbeds_are_unique_and_isolated_from_each_other() {
    let first = support::testbed();
    let second = support::testbed();
    let names = [
        first.sandbox(),
        first.world(),
        second.sandbox(),
        second.world(),
    ];
    for (i, name) in names.iter().enumerate() {
        assert!(
            name.starts_with(&format!("nl-{}-", std::process::id())),
            "{name}"
        );
        assert!(!names[i + 1..].contains(name), "{name} is used twice");
    }
    // A rule in one sandbox does not touch the other.
    support::nft_load(
        first.sandbox(),
        "table inet harness_probe {\n\tchain output {\n\t\ttype filter hook output priority filter;\n\
         \t\tip daddr 198.51.100.10 reject with icmp admin-prohibited\n\t}\n}\n",
    );
    support::assert_rejected(&first, "198.51.100.10", 80);
    assert_reachable(&second, "198.51.100.10", 80);
}

#[test]
fn keep_leaves_the_namespaces_for_the_caller_to_delete() {
    let bed = support::testbed();
    let (sandbox, world) = bed.keep().expect("keep");
    for name in [&sandbox, &world] {
        assert!(support::netns_exists(name), "{name} was deleted");
        let output = std::process::Command::new("ip")
            .args(["netns", "delete", name])
            .output()
            .expect("ip");
        assert!(output.status.success(), "{}", support::describe(&output));
    }
}

/// The ruleset of the re-apply detector's self-tests: 198.51.100.11:443 is
/// rejected, everything else passes.
const BLOCK_ONE: &str = "table inet harness_probe {\n\
     \tchain output {\n\
     \t\ttype filter hook output priority filter; policy accept;\n\
     \t\tip daddr 198.51.100.11 tcp dport 443 reject with tcp reset\n\
     \t}\n\
     }\n";

/// [`support::probe_while`] with the expectations of [`BLOCK_ONE`] on port 443.
fn probe_block_one_while(bed: &Testbed, work: impl FnOnce()) -> (u64, Vec<String>) {
    let expectations = [
        (addr("198.51.100.10"), true),
        (addr("198.51.100.11"), false),
    ];
    support::probe_while(bed, &expectations, 443, work)
}

/// The re-apply test's connection loop reports no wrong verdict while the
/// rules stand still: a wrong verdict there is the apply's fault, not the
/// harness's (a loop that outran the world's accept queue once read as one).
#[test]
fn the_reapply_detector_is_quiet_while_rules_stand_still() {
    let bed = support::testbed();
    support::nft_load(bed.sandbox(), BLOCK_ONE);
    let (probes, wrong) = probe_block_one_while(&bed, || {
        std::thread::sleep(Duration::from_secs(3));
    });
    assert!(
        wrong.is_empty(),
        "{} wrong of {probes}: {:?}",
        wrong.len(),
        &wrong[..wrong.len().min(10)]
    );
    assert!(probes > 500, "only {probes} probes in 3 s");
}

/// ...and it does see a replace that is not atomic: here the table is gone
/// for 20 ms at a time, during which the blocked address connects.
#[test]
fn the_reapply_detector_sees_a_gap_in_the_rules() {
    let bed = support::testbed();
    support::nft_load(bed.sandbox(), BLOCK_ONE);
    let (_, wrong) = probe_block_one_while(&bed, || {
        for _ in 0..20 {
            support::nft_load(bed.sandbox(), "delete table inet harness_probe\n");
            std::thread::sleep(Duration::from_millis(20));
            support::nft_load(bed.sandbox(), BLOCK_ONE);
        }
    });
    assert!(
        wrong
            .iter()
            .any(|verdict| verdict.starts_with("198.51.100.11:443 (allowed: false): connected")),
        "the gaps went unnoticed: {wrong:?}"
    );
    assert!(
        wrong
            .iter()
            .all(|verdict| verdict.starts_with("198.51.100.11:443")),
        "{wrong:?}"
    );
}
