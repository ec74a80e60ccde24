//! A small authoritative-style DNS server on 127.0.0.1 (UDP and TCP on the
//! same port) whose records, TTLs and failures a test changes while it runs,
//! and which counts every query it gets. Used by the DNS integration tests
//! and by `benches/dns_proxy.rs` (included there with `#[path]`).

#![allow(dead_code)] // each includer uses a different part

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::svcb::{IpHint, SVCB, SvcParamKey, SvcParamValue};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::task::JoinHandle;

/// How the server treats queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    Answer,
    /// Drops every query (an unreachable upstream).
    Silent,
    /// Answers every query with SERVFAIL.
    ServFail,
}

/// One query as the server received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// Lowercase, no trailing dot.
    pub name: String,
    pub record_type: RecordType,
    pub tcp: bool,
    /// The query's source address.
    pub peer: SocketAddr,
    /// (payload size, number of options) of the query's OPT record.
    pub edns: Option<(u16, usize)>,
}

#[derive(Debug)]
struct Zone {
    records: HashMap<(String, RecordType), Vec<Record>>,
    cnames: HashMap<String, Record>,
    truncate_udp: HashSet<String>,
    behaviour: Behaviour,
    received: Vec<Received>,
}

#[derive(Debug)]
pub struct TestUpstream {
    pub addr: SocketAddr,
    zone: Arc<Mutex<Zone>>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for TestUpstream {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn key(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

fn fqdn(name: &str) -> Name {
    Name::from_ascii(format!("{}.", key(name))).expect("test names are valid")
}

impl TestUpstream {
    /// Binds UDP and TCP on the same free port of 127.0.0.1 and serves.
    pub async fn start() -> TestUpstream {
        let (udp, tcp) = loop {
            let udp = UdpSocket::bind("127.0.0.1:0")
                .await
                .expect("bind UDP on loopback");
            let port = udp.local_addr().expect("local address").port();
            if let Ok(tcp) = TcpListener::bind(("127.0.0.1", port)).await {
                break (udp, tcp);
            }
        };
        let addr = udp.local_addr().expect("local address");
        let zone = Arc::new(Mutex::new(Zone {
            records: HashMap::new(),
            cnames: HashMap::new(),
            truncate_udp: HashSet::new(),
            behaviour: Behaviour::Answer,
            received: Vec::new(),
        }));
        let udp_task = tokio::spawn(serve_udp(Arc::new(udp), zone.clone()));
        let tcp_task = tokio::spawn(serve_tcp(tcp, zone.clone()));
        TestUpstream {
            addr,
            zone,
            tasks: vec![udp_task, tcp_task],
        }
    }

    fn zone(&self) -> MutexGuard<'_, Zone> {
        self.zone
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replaces the A records of `name`.
    pub fn set_a(&self, name: &str, ttl: u32, addresses: &[Ipv4Addr]) {
        let records = addresses
            .iter()
            .map(|a| Record::from_rdata(fqdn(name), ttl, RData::A(A(*a))))
            .collect();
        self.zone()
            .records
            .insert((key(name), RecordType::A), records);
    }

    /// Replaces the AAAA records of `name`.
    pub fn set_aaaa(&self, name: &str, ttl: u32, addresses: &[Ipv6Addr]) {
        let records = addresses
            .iter()
            .map(|a| Record::from_rdata(fqdn(name), ttl, RData::AAAA(AAAA(*a))))
            .collect();
        self.zone()
            .records
            .insert((key(name), RecordType::AAAA), records);
    }

    pub fn set_cname(&self, name: &str, ttl: u32, target: &str) {
        let record = Record::from_rdata(fqdn(name), ttl, RData::CNAME(CNAME(fqdn(target))));
        self.zone().cnames.insert(key(name), record);
    }

    /// One ServiceMode HTTPS record (priority 1, target ".") with these hints.
    pub fn set_https(&self, name: &str, ttl: u32, v4: &[Ipv4Addr], v6: &[Ipv6Addr]) {
        let params = vec![
            (
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(v4.iter().map(|a| A(*a)).collect())),
            ),
            (
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(v6.iter().map(|a| AAAA(*a)).collect())),
            ),
        ];
        let record = Record::from_rdata(
            fqdn(name),
            ttl,
            RData::HTTPS(HTTPS(SVCB::new(1, Name::root(), params))),
        );
        self.zone()
            .records
            .insert((key(name), RecordType::HTTPS), vec![record]);
    }

    /// UDP answers for `name` come back truncated (TC=1, no records).
    pub fn truncate_over_udp(&self, name: &str) {
        self.zone().truncate_udp.insert(key(name));
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        self.zone().behaviour = behaviour;
    }

    pub fn received(&self) -> Vec<Received> {
        self.zone().received.clone()
    }

    /// Queries received for `name` (any type, any transport).
    pub fn queries_for(&self, name: &str) -> usize {
        let name = key(name);
        self.zone()
            .received
            .iter()
            .filter(|r| r.name == name)
            .count()
    }
}

async fn serve_udp(socket: Arc<UdpSocket>, zone: Arc<Mutex<Zone>>) {
    let mut buffer = vec![0u8; 65_535];
    loop {
        let Ok((length, peer)) = socket.recv_from(&mut buffer).await else {
            continue;
        };
        if let Some(reply) = answer(&zone, &buffer[..length], peer, false) {
            let _ = socket.send_to(&reply, peer).await;
        }
    }
}

async fn serve_tcp(listener: TcpListener, zone: Arc<Mutex<Zone>>) {
    loop {
        let Ok((stream, peer)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(serve_connection(stream, peer, zone.clone()));
    }
}

async fn serve_connection(mut stream: TcpStream, peer: SocketAddr, zone: Arc<Mutex<Zone>>) {
    loop {
        let mut length = [0u8; 2];
        if stream.read_exact(&mut length).await.is_err() {
            return;
        }
        let mut query = vec![0u8; usize::from(u16::from_be_bytes(length))];
        if stream.read_exact(&mut query).await.is_err() {
            return;
        }
        let Some(reply) = answer(&zone, &query, peer, true) else {
            continue;
        };
        let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

fn answer(zone: &Mutex<Zone>, packet: &[u8], peer: SocketAddr, tcp: bool) -> Option<Vec<u8>> {
    let query = Message::from_vec(packet).ok()?;
    let question = query.queries.first()?.clone();
    let name = key(&question.name().to_ascii());
    let mut zone = zone.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    zone.received.push(Received {
        name: name.clone(),
        record_type: question.query_type(),
        tcp,
        peer,
        edns: query
            .edns
            .as_ref()
            .map(|e| (e.max_payload(), e.options().as_ref().len())),
    });
    let mut reply = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
    reply.metadata.recursion_desired = query.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.add_query(question.clone());
    if query.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(1_232);
        reply.set_edns(edns);
    }
    match zone.behaviour {
        Behaviour::Silent => return None,
        Behaviour::ServFail => {
            reply.metadata.response_code = ResponseCode::ServFail;
            return reply.to_vec().ok();
        }
        Behaviour::Answer => {}
    }
    if !tcp && zone.truncate_udp.contains(&name) {
        reply.metadata.truncation = true;
        return reply.to_vec().ok();
    }
    let mut current = name.clone();
    let mut known = false;
    for _ in 0..32 {
        let Some(cname) = zone.cnames.get(&current) else {
            break;
        };
        reply.add_answer(cname.clone());
        known = true;
        let RData::CNAME(target) = &cname.data else {
            break;
        };
        current = key(&target.0.to_ascii());
    }
    if let Some(records) = zone.records.get(&(current.clone(), question.query_type())) {
        reply.add_answers(records.iter().cloned());
    }
    known |= zone.records.keys().any(|(n, _)| *n == current);
    reply.metadata.authoritative = true;
    if !known {
        reply.metadata.response_code = ResponseCode::NXDomain;
    }
    if reply.answers.is_empty() {
        // RFC 2308 §3: a negative answer carries the zone's SOA, whose
        // minimum is the negative TTL.
        let soa = SOA::new(
            fqdn("test"),
            fqdn("hostmaster.test"),
            1,
            3_600,
            600,
            86_400,
            60,
        );
        reply.add_authority(Record::from_rdata(fqdn("test"), 60, RData::SOA(soa)));
    }
    reply.to_vec().ok()
}
