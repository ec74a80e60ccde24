//! The DNS proxy's added latency, in process, on loopback.
//!
//! A test upstream (the integration tests' `TestUpstream`) and the proxy run
//! on a tokio runtime; a blocking client sends one UDP query at a time and
//! waits for the answer. Three paths:
//! - `direct`: client → upstream;
//! - `proxy_forward`: client → proxy → upstream (TTL 0 answers, so every
//!   query is forwarded and its address written through the sink);
//! - `proxy_cached`: client → proxy, answered from the shared cache (TTL 300),
//!   address still written through the sink.
//!
//! The sink is a no-op that confirms at once: this measures the proxy, not
//! the kernel's set update. First the per-query percentiles of sequential
//! queries are printed (p50 is the goal's measure), then criterion measures
//! the same three paths.
//!
//! `cargo bench --bench dns_proxy`

#[path = "../tests/integration/dns_upstream.rs"]
mod dns_upstream;

use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use netleash::dns::cache::AnswerCache;
use netleash::dns::learn::{AddressSink, Learned, SinkFuture};
use netleash::dns::names::AllowedNames;
use netleash::dns::origins::AddressOrigins;
use netleash::dns::proxy::{Proxy, ProxyConfig, ProxyHandle};
use netleash::policy::{Ports, Source, Target};
use netleash::ruleset::{Element, NameBinding};

use dns_upstream::TestUpstream;

/// Confirms every batch at once.
struct NullSink;

impl AddressSink for NullSink {
    fn learn<'a>(&'a self, batch: &'a [Learned]) -> SinkFuture<'a> {
        std::hint::black_box(batch);
        Box::pin(std::future::ready(Ok(())))
    }

    fn forget<'a>(&'a self, _batch: &'a [(String, Element)]) -> SinkFuture<'a> {
        Box::pin(std::future::ready(Ok(())))
    }
}

fn binding(name: &str) -> NameBinding {
    NameBinding {
        target: Target::Name(name.into()),
        ports: Ports::Any,
        sources: vec![Source::AllowedHosts],
        set_v4: "dns_v4".into(),
        set_v6: "dns_v6".into(),
    }
}

struct Setup {
    _upstream: TestUpstream,
    _proxy: ProxyHandle,
    upstream_addr: SocketAddr,
    proxy_addr: SocketAddr,
}

fn setup(runtime: &tokio::runtime::Runtime) -> Setup {
    runtime.block_on(async {
        let upstream = TestUpstream::start().await;
        upstream.set_a("forward.bench", 0, &[Ipv4Addr::new(192, 0, 2, 1)]);
        upstream.set_a("cached.bench", 300, &[Ipv4Addr::new(192, 0, 2, 2)]);
        let names = AllowedNames::new(vec![binding("forward.bench"), binding("cached.bench")]);
        let proxy = Arc::new(
            Proxy::new(
                ProxyConfig::new(vec![upstream.addr]),
                names,
                Arc::new(NullSink),
                Arc::new(AnswerCache::default()),
                Arc::new(AddressOrigins::default()),
            )
            .expect("proxy configuration"),
        );
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind UDP on loopback");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0").expect("bind TCP on loopback");
        let handle = proxy.spawn(udp, tcp).expect("proxy starts");
        Setup {
            upstream_addr: upstream.addr,
            proxy_addr: handle.udp_addr(),
            _upstream: upstream,
            _proxy: handle,
        }
    })
}

/// A blocking client that asks one question again and again.
struct Client {
    socket: UdpSocket,
    query: Vec<u8>,
    buffer: Vec<u8>,
}

impl Client {
    fn new(server: SocketAddr, name: &str) -> Client {
        let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
        socket.connect(server).expect("connect");
        socket
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut query = Message::query();
        query.metadata.recursion_desired = true;
        query.add_query(Query::query(
            Name::from_ascii(name).expect("name"),
            RecordType::A,
        ));
        Client {
            socket,
            query: query.to_vec().expect("encodable"),
            buffer: vec![0u8; 4_096],
        }
    }

    fn ask(&mut self) -> usize {
        self.socket.send(&self.query).expect("send");
        let length = self
            .socket
            .recv(&mut self.buffer)
            .expect("an answer within 2 s");
        assert!(length > 12, "a DNS answer");
        length
    }
}

/// Per-query latency of `queries` sequential queries (after a warm-up).
struct Latencies {
    p50: Duration,
    p90: Duration,
    p99: Duration,
    p999: Duration,
    mean: Duration,
}

fn measure(client: &mut Client, queries: usize) -> Latencies {
    for _ in 0..queries / 10 {
        client.ask();
    }
    let mut samples: Vec<Duration> = (0..queries)
        .map(|_| {
            let start = Instant::now();
            client.ask();
            start.elapsed()
        })
        .collect();
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let mean = samples.iter().sum::<Duration>() / samples.len() as u32;
    Latencies {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        p999: at(0.999),
        mean,
    }
}

fn main() {
    let benchmarking = std::env::args().any(|arg| arg == "--bench");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let setup = setup(&runtime);
    let paths = [
        ("direct", setup.upstream_addr, "forward.bench."),
        ("proxy_forward", setup.proxy_addr, "forward.bench."),
        ("proxy_cached", setup.proxy_addr, "cached.bench."),
    ];

    let queries = if benchmarking { 20_000 } else { 200 };
    let mut p50 = Vec::new();
    println!("sequential UDP queries on loopback, {queries} per path:");
    for (path, server, name) in paths {
        let l = measure(&mut Client::new(server, name), queries);
        println!(
            "  {path:<14} p50 {:>7.1} µs   p90 {:>7.1} µs   p99 {:>7.1} µs   p99.9 {:>7.1} µs   mean {:>7.1} µs",
            us(l.p50),
            us(l.p90),
            us(l.p99),
            us(l.p999),
            us(l.mean)
        );
        p50.push(l.p50);
    }
    println!(
        "  added by the proxy at p50: forwarded {:.1} µs, from cache {:.1} µs",
        us(p50[1]) - us(p50[0]),
        us(p50[2]) - us(p50[0])
    );

    let mut criterion = Criterion::default().configure_from_args();
    let mut group = criterion.benchmark_group("dns_proxy");
    for (path, server, name) in paths {
        let mut client = Client::new(server, name);
        group.bench_function(path, |b| b.iter(|| client.ask()));
    }
    group.finish();
    criterion.final_summary();
}

fn us(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1e6
}
