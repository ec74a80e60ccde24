//! The world's authoritative DNS zone, its answering logic, and a client to
//! query it from the sandbox. Messages are encoded with hickory-proto.

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};

use super::probe::{self, Exchange, Outcome, Verdict};
use super::{Error, Transport};

/// One record of the zone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZoneRecord {
    A(Ipv4Addr),
    Aaaa(Ipv6Addr),
    /// An alias; the target need not be in the zone (then the answer is NXDOMAIN
    /// with the CNAME, as RFC 6604 §2 describes for the last name of a chain).
    Cname(String),
}

impl ZoneRecord {
    fn record_type(&self) -> RecordType {
        match self {
            ZoneRecord::A(_) => RecordType::A,
            ZoneRecord::Aaaa(_) => RecordType::AAAA,
            ZoneRecord::Cname(_) => RecordType::CNAME,
        }
    }
}

/// A query the server received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryLogEntry {
    pub name: String,
    pub record_type: RecordType,
    pub from: SocketAddr,
}

#[derive(Debug, Default)]
struct ZoneData {
    /// Normalized name → its records, each with its TTL.
    names: BTreeMap<String, Vec<(ZoneRecord, u32)>>,
    queries: Vec<QueryLogEntry>,
}

/// The names the world's DNS server answers for, shared with the server
/// threads: a change is visible to the next query. Any other name is NXDOMAIN.
/// By convention tests register names under `.test` (RFC 6761 §6.2).
#[derive(Debug, Clone, Default)]
pub struct Zone {
    data: Arc<Mutex<ZoneData>>,
}

/// Lowercase, without the trailing dot: the form names are stored and logged in.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

impl Zone {
    fn lock(&self) -> MutexGuard<'_, ZoneData> {
        // A panicking test thread may poison the lock; the data stays consistent
        // because every update is a single insert or remove.
        self.data
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Replace every record of `name` with `records`, all with `ttl`.
    pub fn set(&self, name: &str, records: &[ZoneRecord], ttl: u32) {
        let records = records.iter().map(|record| (record.clone(), ttl)).collect();
        self.lock().names.insert(normalize(name), records);
    }

    /// Remove `name`: it answers NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        self.lock().names.remove(&normalize(name));
    }

    /// The queries received so far, oldest first.
    pub fn queries(&self) -> Vec<QueryLogEntry> {
        self.lock().queries.clone()
    }

    /// The response to the wire-format `request` from `from`, or `None` when
    /// it is not even a DNS header (then there is no id to answer to).
    pub(super) fn answer(&self, request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
        let request = match Message::from_vec(request) {
            Ok(message) => message,
            // RFC 1035 §4.1.1: FORMERR when the header parses but the rest does not.
            Err(_) if request.len() >= 12 => {
                let id = u16::from_be_bytes([request[0], request[1]]);
                return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                    .to_vec()
                    .ok();
            }
            Err(_) => return None,
        };
        let id = request.metadata.id;
        if request.metadata.message_type != MessageType::Query
            || request.metadata.op_code != OpCode::Query
            || request.queries.len() != 1
        {
            return Message::error_msg(id, request.metadata.op_code, ResponseCode::NotImp)
                .to_vec()
                .ok();
        }
        let query = request.queries[0].clone();
        let mut response = Message::response(id, OpCode::Query);
        response.metadata.authoritative = true;
        response.metadata.recursion_desired = request.metadata.recursion_desired;
        response.add_query(query.clone());

        let data = {
            let mut data = self.lock();
            data.queries.push(QueryLogEntry {
                name: normalize(&query.name().to_ascii()),
                record_type: query.query_type(),
                from,
            });
            data.names.clone()
        };
        let (answers, exists) = resolve(&data, query.name(), query.query_type());
        if !exists {
            response.metadata.response_code = ResponseCode::NXDomain;
        }
        for record in answers {
            response.add_answer(record);
        }
        response.to_vec().ok()
    }
}

/// The answer records for `name`/`record_type`, following CNAMEs within the
/// zone (RFC 1034 §4.3.2 step 3a), and whether the last name of the chain
/// exists (if not, the response code is NXDOMAIN, RFC 6604 §2).
fn resolve(
    names: &BTreeMap<String, Vec<(ZoneRecord, u32)>>,
    name: &Name,
    record_type: RecordType,
) -> (Vec<Record>, bool) {
    let mut answers = Vec::new();
    let mut owner = name.clone();
    // A bound on the chain, so a CNAME loop in a test's zone cannot hang the server.
    for _ in 0..8 {
        let Some(records) = names.get(&normalize(&owner.to_ascii())) else {
            return (answers, false);
        };
        let alias = records.iter().find_map(|(record, ttl)| match record {
            ZoneRecord::Cname(target) if record_type != RecordType::CNAME => Some((target, *ttl)),
            _ => None,
        });
        if let Some((target, ttl)) = alias {
            let Ok(target) = Name::from_ascii(format!("{}.", normalize(target))) else {
                return (answers, true);
            };
            answers.push(Record::from_rdata(
                owner.clone(),
                ttl,
                RData::CNAME(CNAME(target.clone())),
            ));
            owner = target;
            continue;
        }
        for (record, ttl) in records {
            if record.record_type() != record_type {
                continue;
            }
            let rdata = match record {
                ZoneRecord::A(v4) => RData::A(A(*v4)),
                ZoneRecord::Aaaa(v6) => RData::AAAA(AAAA(*v6)),
                ZoneRecord::Cname(target) => {
                    match Name::from_ascii(format!("{}.", normalize(target))) {
                        Ok(target) => RData::CNAME(CNAME(target)),
                        Err(_) => continue,
                    }
                }
            };
            answers.push(Record::from_rdata(owner.clone(), *ttl, rdata));
        }
        return (answers, true);
    }
    (answers, true)
}

/// The parts of a DNS response the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsReply {
    pub response_code: ResponseCode,
    /// (owner name, record, TTL), in answer order; names normalized.
    pub answers: Vec<(String, ZoneRecord, u32)>,
}

impl DnsReply {
    /// The A and AAAA addresses in the answer.
    pub fn addresses(&self) -> Vec<std::net::IpAddr> {
        self.answers
            .iter()
            .filter_map(|(_, record, _)| match record {
                ZoneRecord::A(v4) => Some((*v4).into()),
                ZoneRecord::Aaaa(v6) => Some((*v6).into()),
                ZoneRecord::Cname(_) => None,
            })
            .collect()
    }
}

/// Ask `server` for `name`/`record_type`, in the calling thread's namespace.
pub fn query(
    server: SocketAddr,
    name: &str,
    record_type: RecordType,
    transport: Transport,
    timeout: Duration,
) -> Result<Exchange<DnsReply>, Error> {
    let qname =
        Name::from_ascii(format!("{}.", normalize(name))).map_err(|source| Error::DnsName {
            name: name.to_string(),
            source,
        })?;
    let id = query_id();
    let mut request = Message::new(id, MessageType::Query, OpCode::Query);
    request.metadata.recursion_desired = true;
    request.add_query(Query::query(qname, record_type));
    let wire = request.to_vec().map_err(|source| Error::DnsEncode {
        name: name.to_string(),
        source,
    })?;

    let exchange = match transport {
        Transport::Udp => probe::udp_exchange(server, &wire, timeout)?,
        Transport::Tcp => tcp_exchange(server, &wire, timeout)?,
    };
    let Some(raw) = exchange.reply else {
        return Ok(Exchange {
            outcome: exchange.outcome,
            reply: None,
        });
    };
    let response = Message::from_vec(&raw).map_err(|source| Error::DnsDecode {
        peer: server,
        source,
    })?;
    if response.metadata.id != id {
        return Err(Error::DnsIdMismatch {
            peer: server,
            sent: id,
            received: response.metadata.id,
        });
    }
    let answers = response
        .answers
        .iter()
        .filter_map(|record| {
            let owner = normalize(&record.name.to_ascii());
            let parsed = match &record.data {
                RData::A(a) => ZoneRecord::A(a.0),
                RData::AAAA(aaaa) => ZoneRecord::Aaaa(aaaa.0),
                RData::CNAME(cname) => ZoneRecord::Cname(normalize(&cname.0.to_ascii())),
                _ => return None,
            };
            Some((owner, parsed, record.ttl))
        })
        .collect();
    let reply = DnsReply {
        response_code: response.metadata.response_code,
        answers,
    };
    Ok(Exchange {
        outcome: exchange.outcome,
        reply: Some(reply),
    })
}

/// A query id that differs from one query to the next (RFC 5452 §4.3 wants
/// them unpredictable against spoofing; inside a testbed distinct is enough).
fn query_id() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.subsec_nanos());
    (nanos as u16) ^ NEXT.fetch_add(1, Ordering::Relaxed).rotate_left(7)
}

/// One length-prefixed DNS message over TCP and its response.
fn tcp_exchange(
    server: SocketAddr,
    wire: &[u8],
    timeout: Duration,
) -> Result<Exchange<Vec<u8>>, Error> {
    let started = Instant::now();
    let mut stream = match probe::tcp_connect_stream(server, timeout)? {
        Ok(stream) => stream,
        Err(verdict) => return Ok(Exchange::failed(verdict, started)),
    };
    let io_error = |stage| {
        move |source| Error::Io {
            peer: server,
            stage,
            source,
        }
    };
    let mut framed = (wire.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(wire);
    stream.write_all(&framed).map_err(io_error("send query"))?;
    let reply = read_framed(&mut stream).map_err(io_error("read response"))?;
    let outcome = Outcome {
        verdict: Verdict::Connected,
        elapsed: started.elapsed(),
    };
    Ok(Exchange {
        outcome,
        reply: Some(reply),
    })
}

/// Read one length-prefixed DNS message (RFC 1035 §4.2.2).
pub(super) fn read_framed(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut length = [0; 2];
    stream.read_exact(&mut length)?;
    let mut message = vec![0; u16::from_be_bytes(length) as usize];
    stream.read_exact(&mut message)?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ask(zone: &Zone, name: &str, record_type: RecordType) -> Message {
        let mut request = Message::new(7, MessageType::Query, OpCode::Query);
        request.add_query(Query::query(Name::from_ascii(name).unwrap(), record_type));
        let from: SocketAddr = "192.0.2.2:5353".parse().unwrap();
        let response = zone.answer(&request.to_vec().unwrap(), from).unwrap();
        Message::from_vec(&response).unwrap()
    }

    #[test]
    fn answers_registered_names_and_nxdomain_otherwise() {
        let zone = Zone::default();
        zone.set(
            "api.test",
            &[ZoneRecord::A(Ipv4Addr::new(198, 51, 100, 10))],
            30,
        );
        let found = ask(&zone, "API.test.", RecordType::A);
        assert_eq!(found.metadata.id, 7);
        assert_eq!(found.metadata.response_code, ResponseCode::NoError);
        assert_eq!(found.answers.len(), 1);
        assert_eq!(found.answers[0].ttl, 30);
        assert_eq!(
            found.answers[0].data,
            RData::A(A(Ipv4Addr::new(198, 51, 100, 10)))
        );

        // Present with no AAAA: NOERROR with an empty answer (NODATA).
        let nodata = ask(&zone, "api.test.", RecordType::AAAA);
        assert_eq!(nodata.metadata.response_code, ResponseCode::NoError);
        assert!(nodata.answers.is_empty());

        let missing = ask(&zone, "other.test.", RecordType::A);
        assert_eq!(missing.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(zone.queries().len(), 3);
        assert_eq!(zone.queries()[0].name, "api.test");
    }

    #[test]
    fn follows_cnames_and_reports_a_dangling_target_as_nxdomain() {
        let zone = Zone::default();
        zone.set("www.test", &[ZoneRecord::Cname("api.test".into())], 60);
        zone.set(
            "api.test",
            &[ZoneRecord::A(Ipv4Addr::new(203, 0, 113, 5))],
            5,
        );
        let chained = ask(&zone, "www.test.", RecordType::A);
        assert_eq!(chained.answers.len(), 2);
        assert_eq!(chained.answers[0].record_type(), RecordType::CNAME);
        assert_eq!(
            chained.answers[1].data,
            RData::A(A(Ipv4Addr::new(203, 0, 113, 5)))
        );

        zone.remove("api.test");
        let dangling = ask(&zone, "www.test.", RecordType::A);
        assert_eq!(dangling.metadata.response_code, ResponseCode::NXDomain);
        assert_eq!(dangling.answers.len(), 1);
    }

    #[test]
    fn a_cname_loop_ends() {
        let zone = Zone::default();
        zone.set("a.test", &[ZoneRecord::Cname("b.test".into())], 1);
        zone.set("b.test", &[ZoneRecord::Cname("a.test".into())], 1);
        let looped = ask(&zone, "a.test.", RecordType::A);
        assert_eq!(looped.answers.len(), 8);
    }
}
