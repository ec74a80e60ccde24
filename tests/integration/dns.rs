//! The DNS proxy and the resolver loop against a test upstream on loopback.
//! No privileges: every socket is on 127.0.0.1, every DNS server is
//! [`TestUpstream`], and addresses in answers (documentation ranges,
//! RFC 5737 / RFC 3849) are only data, never connected to.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Edns, Message, MessageType, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};
use netleash::dns::cache::AnswerCache;
use netleash::dns::learn::{AddressSink, RecordingSink};
use netleash::dns::names::AllowedNames;
use netleash::dns::origins::AddressOrigins;
use netleash::dns::proxy::{Proxy, ProxyConfig, ProxyHandle, Refusal};
use netleash::dns::resolver::{LookupStatus, ResolverHandle, ResolverLoop, ResolverLoopConfig};
use netleash::dns::ttl::TtlPolicy;
use netleash::policy::{
    CompileOptions, Dialect, HostRule, Mode, Policy, PortSpec, Ports, Proto, Source, Target,
};
use netleash::ruleset::{Element, Ruleset, SetKey, SetRole, compile};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

use crate::dns_upstream::{Behaviour, TestUpstream};

const WAIT: Duration = Duration::from_secs(5);

fn v4(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, last)
}

fn v6(last: u16) -> Ipv6Addr {
    Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

fn https_only() -> Ports {
    Ports::Only(BTreeSet::from([PortSpec {
        proto: Proto::Tcp,
        port: 443,
    }]))
}

/// The ruleset the real compiler makes of a limited policy with these rules.
fn ruleset(rules: &[(Target, Ports)]) -> Ruleset {
    let mut rules: Vec<HostRule> = rules
        .iter()
        .map(|(target, ports)| HostRule {
            target: target.clone(),
            ports: ports.clone(),
            sources: BTreeSet::from([Source::AllowedHosts]),
            entry: target.to_string(),
        })
        .collect();
    rules.sort_by(|a, b| a.target.cmp(&b.target));
    let policy = Policy {
        mode: Mode::Limited,
        dialect: Dialect::Limited,
        rules,
        blocklist: Vec::new(),
        warnings: Vec::new(),
    };
    compile(&policy, &CompileOptions::default())
}

fn exact(name: &str) -> (Target, Ports) {
    (Target::Name(name.into()), Ports::Any)
}

fn wildcard(suffix: &str) -> (Target, Ports) {
    (Target::Wildcard(suffix.into()), Ports::Any)
}

/// A proxy on 127.0.0.1 in front of a fresh test upstream.
struct ProxyWorld {
    upstream: TestUpstream,
    proxy: Arc<Proxy>,
    handle: ProxyHandle,
    sink: Arc<RecordingSink>,
    ruleset: Ruleset,
}

impl ProxyWorld {
    async fn start(rules: &[(Target, Ports)]) -> ProxyWorld {
        ProxyWorld::start_with(rules, RecordingSink::new(), |_| {}).await
    }

    async fn start_with(
        rules: &[(Target, Ports)],
        sink: RecordingSink,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> ProxyWorld {
        let upstream = TestUpstream::start().await;
        ProxyWorld::in_front_of(
            upstream,
            rules,
            sink,
            Arc::new(AnswerCache::default()),
            configure,
        )
    }

    fn in_front_of(
        upstream: TestUpstream,
        rules: &[(Target, Ports)],
        sink: RecordingSink,
        cache: Arc<AnswerCache>,
        configure: impl FnOnce(&mut ProxyConfig),
    ) -> ProxyWorld {
        let ruleset = ruleset(rules);
        let mut config = ProxyConfig::new(vec![upstream.addr]);
        config.upstream.timeout = Duration::from_millis(300);
        configure(&mut config);
        let sink = Arc::new(sink);
        let proxy = Arc::new(
            Proxy::new(
                config,
                AllowedNames::new(ruleset.names.clone()),
                sink.clone() as Arc<dyn AddressSink>,
                cache,
                Arc::new(AddressOrigins::default()),
            )
            .expect("valid proxy configuration"),
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP on loopback");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP on loopback");
        let handle = proxy.spawn(udp, tcp).expect("proxy starts");
        ProxyWorld {
            upstream,
            proxy,
            handle,
            sink,
            ruleset,
        }
    }

    async fn udp(&self, query: &Message) -> Message {
        udp_exchange(self.handle.udp_addr(), query)
            .await
            .expect("an answer over UDP")
    }

    async fn tcp(&self, query: &Message) -> Message {
        tcp_exchange(self.handle.tcp_addr(), query).await
    }
}

fn query(name: &str, record_type: RecordType) -> Message {
    let mut message = Message::query();
    message.metadata.recursion_desired = true;
    message.add_query(Query::query(
        Name::from_ascii(name).expect("valid name"),
        record_type,
    ));
    message
}

async fn udp_exchange(server: SocketAddr, query: &Message) -> Option<Message> {
    let socket = UdpSocket::bind("127.0.0.1:0").await.expect("client socket");
    socket
        .send_to(&query.to_vec().expect("encodable"), server)
        .await
        .expect("send");
    let mut buffer = vec![0u8; 65_535];
    let (length, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buffer))
        .await
        .ok()?
        .ok()?;
    Some(Message::from_vec(&buffer[..length]).expect("the proxy's answer parses"))
}

async fn tcp_exchange(server: SocketAddr, query: &Message) -> Message {
    let mut stream = TcpStream::connect(server)
        .await
        .expect("connect to the proxy");
    send_frame(&mut stream, &query.to_vec().expect("encodable")).await;
    read_answer(&mut stream).await
}

async fn send_frame(stream: &mut TcpStream, message: &[u8]) {
    let mut framed = (message.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(message);
    stream.write_all(&framed).await.expect("write to the proxy");
}

async fn read_answer(stream: &mut TcpStream) -> Message {
    let mut length = [0u8; 2];
    tokio::time::timeout(WAIT, stream.read_exact(&mut length))
        .await
        .expect("answer in time")
        .expect("length");
    let mut answer = vec![0u8; usize::from(u16::from_be_bytes(length))];
    stream.read_exact(&mut answer).await.expect("answer body");
    Message::from_vec(&answer).expect("the proxy's answer parses")
}

fn addresses(message: &Message) -> Vec<IpAddr> {
    message
        .answers
        .iter()
        .filter_map(|record| match &record.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
            _ => None,
        })
        .collect()
}

/// Waits until `check` holds, polling; fails the test after `limit`.
async fn eventually(limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < limit, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn allowed_name_is_answered_only_after_its_addresses_are_in_the_sets() {
    let (sink, gate) = RecordingSink::gated();
    let world = ProxyWorld::start_with(&[exact("api.test")], sink, |_| {}).await;
    world.upstream.set_a("api.test", 300, &[v4(10)]);

    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let sent = query("api.test.", RecordType::A);
    socket
        .send_to(&sent.to_vec().unwrap(), world.handle.udp_addr())
        .await
        .unwrap();
    let mut buffer = vec![0u8; 4_096];
    let early =
        tokio::time::timeout(Duration::from_millis(500), socket.recv_from(&mut buffer)).await;
    assert!(
        early.is_err(),
        "no answer may leave the proxy while the sink has not confirmed"
    );
    assert_eq!(
        world.upstream.queries_for("api.test"),
        1,
        "the query was forwarded meanwhile"
    );
    assert!(world.sink.calls().is_empty());

    gate.release(1);
    let (length, _) = tokio::time::timeout(WAIT, socket.recv_from(&mut buffer))
        .await
        .unwrap()
        .unwrap();
    let answered_at = Instant::now();
    let answer = Message::from_vec(&buffer[..length]).unwrap();
    assert_eq!(answer.metadata.id, sent.metadata.id);
    assert_eq!(answer.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&answer), vec![IpAddr::V4(v4(10))]);

    let (learned_at, learned) = world
        .sink
        .last_learned(IpAddr::V4(v4(10)))
        .expect("address learned");
    assert!(learned_at < answered_at);
    assert_eq!(learned.set, "dns_v4");
    assert_eq!(
        learned.element,
        Element::Addr("192.0.2.10/32".parse().unwrap())
    );
    assert_eq!(learned.timeout, Duration::from_secs(360));
    assert_eq!(
        world.proxy.origins().name_of(IpAddr::V4(v4(10))).as_deref(),
        Some("api.test")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_fresh_names_are_each_learned_before_their_answer() {
    let world = ProxyWorld::start(&[wildcard("fleet.test")]).await;
    let address = |i: u16| Ipv4Addr::new(198, 18, (i >> 8) as u8, i as u8);
    for i in 0..1_000u16 {
        world
            .upstream
            .set_a(&format!("n{i}.fleet.test"), 60, &[address(i)]);
    }
    let server = world.handle.udp_addr();
    let mut clients = tokio::task::JoinSet::new();
    for worker in 0..50u16 {
        clients.spawn(async move {
            let mut answered = Vec::new();
            for i in (worker..1_000).step_by(50) {
                let answer =
                    udp_exchange(server, &query(&format!("n{i}.fleet.test."), RecordType::A))
                        .await
                        .expect("an answer over UDP");
                answered.push((i, Instant::now(), addresses(&answer)));
            }
            answered
        });
    }
    let mut count = 0;
    while let Some(answered) = clients.join_next().await {
        for (i, at, got) in answered.unwrap() {
            assert_eq!(got, vec![IpAddr::V4(address(i))]);
            let (learned_at, _) = world.sink.last_learned(got[0]).expect("learned");
            assert!(learned_at < at, "n{i}: learned before the answer arrived");
            count += 1;
        }
    }
    assert_eq!(count, 1_000);
    assert_eq!(world.proxy.stats().forwarded, 1_000);
}

#[tokio::test]
async fn learned_elements_fit_the_sets_of_the_compiled_ruleset() {
    let world = ProxyWorld::start(&[
        (Target::Name("api.test".into()), https_only()),
        wildcard("cdn.test"),
    ])
    .await;
    world.upstream.set_a("api.test", 60, &[v4(11)]);
    world.upstream.set_aaaa("x.cdn.test", 60, &[v6(11)]);
    world.udp(&query("api.test.", RecordType::A)).await;
    world.udp(&query("x.cdn.test.", RecordType::AAAA)).await;
    let calls = world.sink.calls();
    let learned: Vec<_> = calls.iter().flat_map(|c| c.batch.clone()).collect();
    assert_eq!(learned.len(), 2);
    for item in &learned {
        let set = world
            .ruleset
            .set(&item.set)
            .expect("the element's set is in the ruleset");
        assert_eq!(set.role, SetRole::DnsAllow);
        assert!(set.timeout, "{} has the timeout flag", set.name);
        let key_fits = match (set.key, item.element) {
            (SetKey::Addr(family), Element::Addr(net)) => {
                family == netleash::ruleset::Family::of(&net.addr())
            }
            (SetKey::AddrProtoPort(family), Element::AddrProtoPort(net, _, _)) => {
                family == netleash::ruleset::Family::of(&net.addr())
            }
            _ => false,
        };
        assert!(key_fits, "{:?} fits the key of {}", item.element, set.name);
    }
    assert_eq!(
        learned[0].element,
        Element::AddrProtoPort("192.0.2.11/32".parse().unwrap(), Proto::Tcp, 443)
    );
    assert_eq!(
        learned[1].element,
        Element::Addr("2001:db8::b/128".parse().unwrap())
    );
}

#[tokio::test]
async fn allowed_name_over_tcp() {
    let world = ProxyWorld::start(&[exact("api.test")]).await;
    world.upstream.set_a("api.test", 300, &[v4(12)]);
    let sent = query("api.test.", RecordType::A);
    let answer = world.tcp(&sent).await;
    assert_eq!(answer.metadata.id, sent.metadata.id);
    assert_eq!(addresses(&answer), vec![IpAddr::V4(v4(12))]);
    assert_eq!(world.sink.addresses(), vec![IpAddr::V4(v4(12))]);
    assert_eq!(world.proxy.stats().tcp_queries, 1);
}

#[tokio::test]
async fn pipelined_tcp_queries_are_all_answered() {
    let world = ProxyWorld::start(&[exact("one.test"), exact("two.test")]).await;
    world.upstream.set_a("one.test", 300, &[v4(1)]);
    world.upstream.set_a("two.test", 300, &[v4(2)]);
    let mut stream = TcpStream::connect(world.handle.tcp_addr()).await.unwrap();
    let first = query("one.test.", RecordType::A);
    let second = query("two.test.", RecordType::A);
    send_frame(&mut stream, &first.to_vec().unwrap()).await;
    send_frame(&mut stream, &second.to_vec().unwrap()).await;
    let answers = [
        read_answer(&mut stream).await,
        read_answer(&mut stream).await,
    ];
    for (sent, address) in [(&first, v4(1)), (&second, v4(2))] {
        let answer = answers
            .iter()
            .find(|a| a.metadata.id == sent.metadata.id)
            .expect("answer by id");
        assert_eq!(addresses(answer), vec![IpAddr::V4(address)]);
    }
}

#[tokio::test]
async fn wildcard_children_are_allowed_and_its_apex_is_refused() {
    let world = ProxyWorld::start(&[wildcard("example.test")]).await;
    world.upstream.set_a("a.b.example.test", 300, &[v4(20)]);
    world.upstream.set_a("example.test", 300, &[v4(21)]);

    let child = world.udp(&query("A.B.Example.Test.", RecordType::A)).await;
    assert_eq!(child.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&child), vec![IpAddr::V4(v4(20))]);

    let apex = world.udp(&query("example.test.", RecordType::A)).await;
    assert_eq!(apex.metadata.response_code, ResponseCode::Refused);
    assert!(apex.answers.is_empty());
    assert_eq!(
        world.upstream.queries_for("example.test"),
        0,
        "the apex is never forwarded"
    );
    assert_eq!(world.sink.addresses(), vec![IpAddr::V4(v4(20))]);
}

#[tokio::test]
async fn names_not_allowed_are_refused_and_never_forwarded() {
    let world = ProxyWorld::start(&[exact("api.test"), wildcard("example.test")]).await;
    world
        .upstream
        .set_a("exfil-4a6f686e.evil.test", 300, &[v4(66)]);
    let udp = world
        .udp(&query("exfil-4a6f686e.evil.test.", RecordType::A))
        .await;
    let tcp = world
        .tcp(&query("exfil-4a6f686e.evil.test.", RecordType::TXT))
        .await;
    let lookalike = world.udp(&query("api.test.evil.", RecordType::A)).await;
    let suffix = world.udp(&query("notexample.test.", RecordType::A)).await;
    for answer in [&udp, &tcp, &lookalike, &suffix] {
        assert_eq!(answer.metadata.response_code, ResponseCode::Refused);
        assert!(answer.answers.is_empty());
        assert_eq!(answer.metadata.message_type, MessageType::Response);
    }
    assert!(
        world.upstream.received().is_empty(),
        "nothing reached the upstream: {:?}",
        world.upstream.received()
    );
    assert!(world.sink.calls().is_empty());
    assert_eq!(world.proxy.stats().refused, 4);
}

#[tokio::test]
async fn refusal_can_be_nxdomain() {
    let world = ProxyWorld::start_with(&[exact("api.test")], RecordingSink::new(), |config| {
        config.refusal = Refusal::NxDomain;
    })
    .await;
    let answer = world.udp(&query("other.test.", RecordType::A)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::NXDomain);
    assert_eq!(world.upstream.queries_for("other.test"), 0);
}

#[tokio::test]
async fn truncated_upstream_answer_is_retried_over_tcp() {
    let world = ProxyWorld::start(&[exact("big.test")]).await;
    world.upstream.set_a("big.test", 300, &[v4(30), v4(31)]);
    world.upstream.truncate_over_udp("big.test");
    let answer = world.udp(&query("big.test.", RecordType::A)).await;
    assert!(!answer.metadata.truncation);
    assert_eq!(
        addresses(&answer),
        vec![IpAddr::V4(v4(30)), IpAddr::V4(v4(31))]
    );
    let transports: Vec<bool> = world.upstream.received().iter().map(|r| r.tcp).collect();
    assert_eq!(
        transports,
        vec![false, true],
        "UDP first, then TCP after TC=1"
    );
    assert_eq!(
        world.sink.addresses(),
        vec![IpAddr::V4(v4(30)), IpAddr::V4(v4(31))]
    );
}

#[tokio::test]
async fn answer_too_large_for_the_client_is_truncated_and_complete_over_tcp() {
    let world = ProxyWorld::start(&[exact("many.test")]).await;
    let many: Vec<Ipv4Addr> = (1..=40).map(|i| Ipv4Addr::new(198, 51, 100, i)).collect();
    world.upstream.set_a("many.test", 300, &many);

    // No EDNS: the client takes 512 bytes over UDP; 40 A records do not fit.
    let over_udp = world.udp(&query("many.test.", RecordType::A)).await;
    assert!(
        over_udp.metadata.truncation,
        "TC=1 tells the client to retry over TCP"
    );
    assert!(over_udp.answers.is_empty());
    // The addresses are learned anyway, capped at 32 per name.
    assert_eq!(world.sink.addresses().len(), 32);
    assert_eq!(world.proxy.stats().addresses_over_cap, 8);

    let over_tcp = world.tcp(&query("many.test.", RecordType::A)).await;
    assert!(!over_tcp.metadata.truncation);
    assert_eq!(addresses(&over_tcp).len(), 40);
}

#[tokio::test]
async fn ttl_zero_and_huge_ttl_are_clamped() {
    let world = ProxyWorld::start(&[exact("zero.test"), exact("huge.test")]).await;
    world.upstream.set_a("zero.test", 0, &[v4(40)]);
    world.upstream.set_a("huge.test", 7 * 86_400, &[v4(41)]);
    let zero = world.udp(&query("zero.test.", RecordType::A)).await;
    assert_eq!(
        zero.answers[0].ttl, 0,
        "the client gets the upstream's TTL unchanged"
    );
    world.udp(&query("huge.test.", RecordType::A)).await;

    let (_, zero) = world.sink.last_learned(IpAddr::V4(v4(40))).unwrap();
    let (_, huge) = world.sink.last_learned(IpAddr::V4(v4(41))).unwrap();
    assert_eq!(
        zero.timeout,
        Duration::from_secs(30 + 60),
        "TTL 0 → minimum + grace"
    );
    assert_eq!(
        huge.timeout,
        Duration::from_secs(3_600 + 60),
        "a week → maximum + grace"
    );

    // TTL 0 is never cached: the next query goes upstream again.
    world.udp(&query("zero.test.", RecordType::A)).await;
    assert_eq!(world.upstream.queries_for("zero.test"), 2);
}

#[tokio::test]
async fn cname_chain_addresses_are_learned_under_the_queried_name() {
    let world = ProxyWorld::start(&[exact("www.test")]).await;
    world
        .upstream
        .set_cname("www.test", 120, "edge.cdn.example");
    world
        .upstream
        .set_cname("edge.cdn.example", 30, "e1.cdn.example");
    world.upstream.set_a("e1.cdn.example", 600, &[v4(50)]);
    let answer = world.udp(&query("www.test.", RecordType::A)).await;
    assert_eq!(answer.answers.len(), 3);
    let (_, learned) = world
        .sink
        .last_learned(IpAddr::V4(v4(50)))
        .expect("end of the chain learned");
    assert_eq!(
        learned.timeout,
        Duration::from_secs(30 + 60),
        "the chain's smallest TTL counts"
    );
    assert_eq!(
        world.proxy.origins().name_of(IpAddr::V4(v4(50))).as_deref(),
        Some("www.test")
    );
    // The chain's target names themselves stay not allowed.
    let direct = world.udp(&query("e1.cdn.example.", RecordType::A)).await;
    assert_eq!(direct.metadata.response_code, ResponseCode::Refused);
}

#[tokio::test]
async fn aaaa_and_https_hints_are_learned() {
    let world = ProxyWorld::start(&[exact("svc.test")]).await;
    world.upstream.set_aaaa("svc.test", 300, &[v6(1)]);
    world
        .upstream
        .set_https("svc.test", 300, &[v4(60), v4(61)], &[v6(2)]);
    let aaaa = world.udp(&query("svc.test.", RecordType::AAAA)).await;
    assert_eq!(addresses(&aaaa), vec![IpAddr::V6(v6(1))]);
    let https = world.udp(&query("svc.test.", RecordType::HTTPS)).await;
    assert_eq!(https.answers.len(), 1);
    assert_eq!(
        world.sink.addresses(),
        vec![
            IpAddr::V6(v6(1)),
            IpAddr::V4(v4(60)),
            IpAddr::V4(v4(61)),
            IpAddr::V6(v6(2))
        ]
    );
}

#[tokio::test]
async fn malformed_packets_are_dropped_and_the_proxy_keeps_answering() {
    let world = ProxyWorld::start(&[exact("api.test")]).await;
    world.upstream.set_a("api.test", 300, &[v4(70)]);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut response = query("api.test.", RecordType::A);
    response.metadata.message_type = MessageType::Response;
    let mut cut = query("api.test.", RecordType::A).to_vec().unwrap();
    cut.truncate(cut.len() - 3);
    let junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 5],
        vec![
            0x12, 0x34, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x3f,
        ],
        cut,
        (0..1_000u32).map(|i| (i * 7919 % 251) as u8).collect(),
        response.to_vec().unwrap(),
    ];
    for packet in &junk {
        socket
            .send_to(packet, world.handle.udp_addr())
            .await
            .unwrap();
    }
    let mut buffer = vec![0u8; 4_096];
    let nothing =
        tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buffer)).await;
    assert!(nothing.is_err(), "malformed packets get no answer");

    // A junk frame on a TCP connection, then a valid query on the same one.
    let mut stream = TcpStream::connect(world.handle.tcp_addr()).await.unwrap();
    send_frame(&mut stream, &[0xde, 0xad, 0xbe, 0xef]).await;
    let sent = query("api.test.", RecordType::A);
    send_frame(&mut stream, &sent.to_vec().unwrap()).await;
    let answer = read_answer(&mut stream).await;
    assert_eq!(answer.metadata.id, sent.metadata.id);

    let answer = world.udp(&query("api.test.", RecordType::A)).await;
    assert_eq!(addresses(&answer), vec![IpAddr::V4(v4(70))]);
    assert_eq!(
        world.proxy.stats().malformed,
        7,
        "6 over UDP, 1 over TCP: {:?}",
        world.proxy.stats()
    );
    assert!(
        world
            .upstream
            .received()
            .iter()
            .all(|r| r.name == "api.test")
    );
}

#[tokio::test]
async fn cached_answer_serves_repeated_queries_and_still_learns() {
    let world = ProxyWorld::start(&[exact("api.test")]).await;
    world.upstream.set_a("api.test", 300, &[v4(80)]);
    let first = world.udp(&query("api.test.", RecordType::A)).await;
    let sent = query("API.test.", RecordType::A);
    let second = world.udp(&sent).await;
    assert_eq!(
        world.upstream.queries_for("api.test"),
        1,
        "one upstream lookup per TTL"
    );
    assert_eq!(second.metadata.id, sent.metadata.id);
    assert!(
        second.queries[0].name().eq_case(sent.queries[0].name()),
        "the client's letter case is echoed"
    );
    assert_eq!(addresses(&second), addresses(&first));
    assert!(second.answers[0].ttl <= first.answers[0].ttl);
    assert_eq!(
        world.sink.calls().len(),
        2,
        "a cache hit still writes the sandbox's sets"
    );
    assert_eq!(world.proxy.stats().cache_hits, 1);
}

#[tokio::test]
async fn edns_options_are_not_forwarded_and_the_payload_is_capped() {
    let world = ProxyWorld::start(&[exact("api.test")]).await;
    world.upstream.set_a("api.test", 300, &[v4(90)]);
    let mut sent = query("api.test.", RecordType::A);
    let mut edns = Edns::new();
    edns.set_max_payload(4_096);
    edns.options_mut()
        .insert(EdnsOption::Unknown(u16::from(EdnsCode::Cookie), vec![7; 8]));
    edns.options_mut().insert(EdnsOption::Unknown(
        u16::from(EdnsCode::Subnet),
        vec![0, 1, 24, 0, 10, 0, 0],
    ));
    sent.set_edns(edns);
    let answer = world.udp(&sent).await;
    assert!(
        answer.edns.is_some(),
        "an EDNS query gets an EDNS answer (RFC 6891 §6.1.1)"
    );
    assert_eq!(world.upstream.received()[0].edns, Some((1_232, 0)));
}

#[tokio::test]
async fn upstream_sockets_are_reused_then_retired_for_fresh_source_ports() {
    let world = ProxyWorld::start(&[exact("api.test")]).await;
    world.upstream.set_a("api.test", 0, &[v4(91)]); // TTL 0: every query is forwarded
    for _ in 0..150 {
        world.udp(&query("api.test.", RecordType::A)).await;
    }
    let ports: Vec<u16> = world
        .upstream
        .received()
        .iter()
        .map(|r| r.peer.port())
        .collect();
    assert_eq!(ports.len(), 150);
    assert!(
        ports[..100].iter().all(|p| *p == ports[0]),
        "sequential queries share a pooled socket"
    );
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert!(distinct.len() <= 2, "{distinct:?}");
    assert!(
        ports[100..].iter().all(|p| *p == ports[100]),
        "a retired socket is replaced by one new socket"
    );
}

#[tokio::test]
async fn upstream_that_does_not_answer_gives_servfail_quickly() {
    let world = ProxyWorld::start_with(&[exact("api.test")], RecordingSink::new(), |config| {
        config.upstream.timeout = Duration::from_millis(100);
        config.upstream.attempts = 2;
    })
    .await;
    world.upstream.set_behaviour(Behaviour::Silent);
    let started = Instant::now();
    let answer = world.udp(&query("api.test.", RecordType::A)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(world.upstream.queries_for("api.test"), 2);
    assert_eq!(world.proxy.stats().upstream_failures, 1);
}

#[tokio::test]
async fn sink_failure_gives_servfail_instead_of_an_unreachable_address() {
    let sink = RecordingSink::new();
    sink.set_failing(true);
    let world = ProxyWorld::start_with(&[exact("api.test")], sink, |_| {}).await;
    world.upstream.set_a("api.test", 300, &[v4(95)]);
    let answer = world.udp(&query("api.test.", RecordType::A)).await;
    assert_eq!(answer.metadata.response_code, ResponseCode::ServFail);
    assert!(answer.answers.is_empty());
    assert_eq!(world.proxy.stats().learn_failures, 1);
    assert_eq!(world.proxy.origins().name_of(IpAddr::V4(v4(95))), None);
}

#[tokio::test]
async fn proxy_stops_on_request() {
    let world = ProxyWorld::start(&[exact("api.test")]).await;
    let ProxyWorld {
        handle, upstream, ..
    } = world;
    let udp = handle.udp_addr();
    handle.stop().await.expect("clean stop");
    upstream.set_a("api.test", 300, &[v4(1)]);
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    socket
        .send_to(&query("api.test.", RecordType::A).to_vec().unwrap(), udp)
        .await
        .unwrap();
    let mut buffer = vec![0u8; 512];
    let answer =
        tokio::time::timeout(Duration::from_millis(300), socket.recv_from(&mut buffer)).await;
    assert!(answer.is_err(), "a stopped proxy does not answer");
}

// ---- the resolver loop ----

/// A TTL policy in seconds instead of minutes, so refreshes, expiry and the
/// stale limit happen during a test.
fn fast_policy(stale_limit: Duration) -> TtlPolicy {
    TtlPolicy {
        min_ttl: Duration::from_secs(1),
        max_ttl: Duration::from_secs(3_600),
        grace: Duration::from_secs(1),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(400),
        stale_limit,
        negative_ttl_default: Duration::from_secs(1),
    }
}

struct LoopWorld {
    upstream: TestUpstream,
    sink: Arc<RecordingSink>,
    cache: Arc<AnswerCache>,
    handle: ResolverHandle,
}

impl LoopWorld {
    async fn start(
        rules: &[(Target, Ports)],
        policy: TtlPolicy,
        zone: impl FnOnce(&TestUpstream),
    ) -> LoopWorld {
        let upstream = TestUpstream::start().await;
        zone(&upstream);
        let sink = Arc::new(RecordingSink::new());
        let cache = Arc::new(AnswerCache::default());
        let mut config = ResolverLoopConfig::new(vec![upstream.addr]);
        config.ttl = policy;
        config.query_timeout = Duration::from_millis(200);
        config.query_retries = 0;
        let names = AllowedNames::new(ruleset(rules).names);
        let resolver = ResolverLoop::new(
            config,
            &names,
            sink.clone() as Arc<dyn AddressSink>,
            cache.clone(),
            Arc::new(AddressOrigins::default()),
        )
        .expect("valid resolver loop configuration");
        LoopWorld {
            upstream,
            sink,
            cache,
            handle: resolver.spawn(),
        }
    }

    fn status(&self, name: &str, record_type: RecordType) -> Option<LookupStatus> {
        self.handle
            .snapshot()
            .into_iter()
            .find(|s| s.name == name && s.record_type == record_type)
    }

    /// Whether `addr` is in the sets at `at` according to what was learned:
    /// some learn call before `at` whose timeout reaches past it.
    fn present_at(&self, addr: IpAddr, at: Instant) -> bool {
        self.sink.calls().iter().any(|call| {
            call.at <= at
                && call
                    .batch
                    .iter()
                    .any(|l| l.element.net().addr() == addr && call.at + l.timeout > at)
        })
    }
}

#[tokio::test]
async fn resolver_loop_programs_exact_names_with_cname_chains_and_aaaa() {
    let world = LoopWorld::start(
        &[exact("www.test"), wildcard("wild.test")],
        fast_policy(Duration::from_secs(60)),
        |up| {
            up.set_cname("www.test", 300, "edge.cdn.example");
            up.set_a("edge.cdn.example", 300, &[v4(100)]);
            up.set_aaaa("edge.cdn.example", 300, &[v6(100)]);
        },
    )
    .await;
    eventually(WAIT, "both families learned", || {
        world.sink.addresses().len() == 2
    })
    .await;
    let learned = world.sink.addresses();
    assert!(learned.contains(&IpAddr::V4(v4(100))) && learned.contains(&IpAddr::V6(v6(100))));
    let (_, element) = world.sink.last_learned(IpAddr::V4(v4(100))).unwrap();
    assert_eq!(element.set, "dns_v4");
    assert_eq!(element.timeout, Duration::from_secs(300 + 1));
    let status = world
        .status("www.test", RecordType::A)
        .expect("status of www.test A");
    assert_eq!(status.addresses, vec![IpAddr::V4(v4(100))]);
    assert_eq!(status.failures, 0);
    assert!(status.expires.is_some() && status.next_lookup.is_some());
    assert!(
        world
            .upstream
            .received()
            .iter()
            .all(|r| !r.name.ends_with("wild.test")),
        "wildcards are not enumerated"
    );
    world.handle.stop().await.expect("clean stop");
}

#[tokio::test]
async fn resolver_loop_fills_the_cache_the_proxy_answers_from() {
    let loop_world = LoopWorld::start(
        &[exact("shared.test")],
        fast_policy(Duration::from_secs(60)),
        |up| {
            up.set_a("shared.test", 300, &[v4(110)]);
        },
    )
    .await;
    eventually(WAIT, "the loop resolved the name", || {
        !loop_world.sink.addresses().is_empty()
    })
    .await;
    let upstream_queries = loop_world.upstream.queries_for("shared.test");
    assert!(loop_world.cache.stats().entries >= 1);

    let LoopWorld {
        upstream,
        cache,
        handle,
        ..
    } = loop_world;
    let proxy = ProxyWorld::in_front_of(
        upstream,
        &[exact("shared.test")],
        RecordingSink::new(),
        cache,
        |_| {},
    );
    let answer = proxy.udp(&query("shared.test.", RecordType::A)).await;
    assert_eq!(addresses(&answer), vec![IpAddr::V4(v4(110))]);
    assert_eq!(
        proxy.upstream.queries_for("shared.test"),
        upstream_queries,
        "served from the shared cache"
    );
    assert_eq!(
        proxy.sink.addresses(),
        vec![IpAddr::V4(v4(110))],
        "and learned for this sandbox"
    );
    handle.stop().await.unwrap();
}

#[tokio::test]
async fn resolver_loop_follows_rotation_and_lets_old_addresses_expire() {
    let world = LoopWorld::start(
        &[exact("rot.test")],
        fast_policy(Duration::from_secs(60)),
        |up| {
            up.set_a("rot.test", 1, &[v4(1)]);
        },
    )
    .await;
    eventually(WAIT, "first address learned", || {
        world.sink.last_learned(IpAddr::V4(v4(1))).is_some()
    })
    .await;
    // A second round proves the address is refreshed before it expires.
    eventually(WAIT, "first address refreshed", || {
        world
            .sink
            .calls()
            .iter()
            .filter(|c| {
                c.batch
                    .iter()
                    .any(|l| l.element.net().addr() == IpAddr::V4(v4(1)))
            })
            .count()
            >= 2
    })
    .await;

    world.upstream.set_a("rot.test", 1, &[v4(2)]);
    let rotated_at = Instant::now();
    eventually(WAIT, "new address learned", || {
        world.sink.last_learned(IpAddr::V4(v4(2))).is_some()
    })
    .await;
    // Let a few more refreshes happen: only the new address is written.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let (old_at, old) = world.sink.last_learned(IpAddr::V4(v4(1))).unwrap();
    assert!(
        old_at < rotated_at,
        "the old address was not written after the rotation"
    );
    let old_expiry = old_at + old.timeout;
    assert!(
        !world.present_at(IpAddr::V4(v4(1)), old_expiry + Duration::from_millis(1)),
        "the old address expires"
    );
    assert!(old_expiry < Instant::now(), "and has expired by now");
    assert!(
        world.present_at(IpAddr::V4(v4(2)), Instant::now()),
        "the new address is in the sets"
    );
    let status = world.status("rot.test", RecordType::A).unwrap();
    assert_eq!(status.addresses, vec![IpAddr::V4(v4(2))]);
    world.handle.stop().await.unwrap();
}

#[tokio::test]
async fn resolver_loop_keeps_last_known_addresses_through_an_outage() {
    let world = LoopWorld::start(
        &[exact("steady.test")],
        fast_policy(Duration::from_secs(60)),
        |up| {
            up.set_a("steady.test", 1, &[v4(7)]);
        },
    )
    .await;
    let address = IpAddr::V4(v4(7));
    eventually(WAIT, "address learned", || {
        world.sink.last_learned(address).is_some()
    })
    .await;
    let learned_at = world.sink.calls()[0].at;

    world.upstream.set_behaviour(Behaviour::Silent);
    let outage_started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await; // four answer lifetimes
    let status = world.status("steady.test", RecordType::A).unwrap();
    assert!(status.failures >= 2, "{status:?}");
    assert!(status.stale, "{status:?}");
    assert_eq!(status.addresses, vec![address]);
    assert!(status.last_error.is_some());
    // At every moment since it was first learned, the address was in the sets.
    let mut at = learned_at;
    while at < Instant::now() {
        assert!(
            world.present_at(address, at),
            "the address was missing {:?} into the outage",
            at.saturating_duration_since(outage_started)
        );
        at += Duration::from_millis(50);
    }

    world.upstream.set_behaviour(Behaviour::ServFail);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert!(
        world.present_at(address, Instant::now()),
        "SERVFAIL is an outage too"
    );

    world.upstream.set_a("steady.test", 1, &[v4(8)]);
    world.upstream.set_behaviour(Behaviour::Answer);
    eventually(Duration::from_secs(10), "recovery after the outage", || {
        world.sink.last_learned(IpAddr::V4(v4(8))).is_some()
    })
    .await;
    eventually(WAIT, "status recovered", || {
        world
            .status("steady.test", RecordType::A)
            .is_some_and(|s| s.failures == 0 && !s.stale)
    })
    .await;
    world.handle.stop().await.unwrap();
}

#[tokio::test]
async fn resolver_loop_stops_keeping_addresses_after_the_stale_limit() {
    let world = LoopWorld::start(
        &[exact("gone.test")],
        fast_policy(Duration::from_secs(2)),
        |up| {
            up.set_a("gone.test", 1, &[v4(9)]);
        },
    )
    .await;
    let address = IpAddr::V4(v4(9));
    eventually(WAIT, "address learned", || {
        world.sink.last_learned(address).is_some()
    })
    .await;
    world.upstream.set_behaviour(Behaviour::Silent);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (last_at, last) = world.sink.last_learned(address).unwrap();
    assert!(
        last_at + last.timeout < Instant::now(),
        "after the stale limit the address is left to expire"
    );
    assert!(
        world.present_at(address, last_at),
        "but it was kept for a while"
    );
    let status = world.status("gone.test", RecordType::A).unwrap();
    assert!(status.addresses.is_empty() && !status.stale, "{status:?}");
    world.handle.stop().await.unwrap();
}

#[tokio::test]
async fn resolver_loop_treats_a_missing_family_as_an_answer_not_an_outage() {
    let world = LoopWorld::start(
        &[exact("v4only.test")],
        fast_policy(Duration::from_secs(60)),
        |up| {
            up.set_a("v4only.test", 300, &[v4(5)]);
        },
    )
    .await;
    eventually(WAIT, "both lookups done", || {
        world.status("v4only.test", RecordType::AAAA).is_some()
            && world.status("v4only.test", RecordType::A).is_some()
    })
    .await;
    let aaaa = world.status("v4only.test", RecordType::AAAA).unwrap();
    assert_eq!(aaaa.failures, 0, "{aaaa:?}");
    assert!(aaaa.addresses.is_empty() && aaaa.last_error.is_none() && aaaa.last_success.is_some());
    world.handle.stop().await.unwrap();
}
