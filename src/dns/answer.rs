//! Which addresses a DNS answer makes reachable for the name that was asked.

use std::net::IpAddr;

use hickory_proto::op::Message;
use hickory_proto::rr::rdata::svcb::{SVCB, SvcParamValue};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// At most this many addresses are learned from one answer for one name.
///
/// Real answers carry a handful of A/AAAA records (large CDNs return up to
/// about 8-16 of each family, plus as many HTTPS hints); 32 covers them. The
/// cap bounds what one answer can write into the sets: an upstream (or a name
/// whose zone someone else controls, like a wildcard's children) must not be
/// able to open a whole address range by listing thousands of records.
pub const MAX_ADDRESSES_PER_NAME: usize = 32;

/// At most this many CNAME hops are followed from the queried name. Resolvers
/// use similar limits (BIND: 16, Unbound: 11) against CNAME loops.
pub const MAX_CNAME_CHAIN: usize = 16;

/// An address from an answer, with the TTL it may be used for: the smallest
/// TTL along the CNAME chain that led to it (RFC 2181 §5.2 treats each RRset
/// on the chain as a separate cacheable item, so the chain is only as fresh as
/// its shortest-lived link).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnswerAddress {
    pub addr: IpAddr,
    pub ttl: u32,
}

/// The addresses an answer yields for the name that was asked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Distinct addresses, in answer order, at most the cap.
    pub addresses: Vec<AnswerAddress>,
    /// Distinct addresses left out because of the cap.
    pub over_cap: usize,
    /// The names of the chain that was followed, starting with the queried
    /// name (at most `1 + MAX_CNAME_CHAIN`).
    pub chain: Vec<Name>,
}

/// The addresses of `qname` in `message`'s answer section: A and AAAA records
/// owned by `qname` or by a name its CNAME chain leads to, and the `ipv4hint` /
/// `ipv6hint` parameters of HTTPS and SVCB records owned by those names
/// (RFC 9460 §7.3). Records of other owners are ignored, so an answer cannot
/// make addresses reachable under a name that was not asked for. Only the
/// answer section counts (RFC 2181 §5.4.1 ranks additional data below it).
pub fn extract_addresses(message: &Message, qname: &Name, cap: usize) -> Extracted {
    let answers = &message.answers;
    let (chain, chain_ttls) = follow_cnames(answers, qname);
    let mut extracted = Extracted {
        chain,
        ..Extracted::default()
    };
    let mut seen: Vec<IpAddr> = Vec::new();
    for record in answers {
        let Some(position) = extracted
            .chain
            .iter()
            .position(|n| n.eq_ignore_root(&record.name))
        else {
            continue;
        };
        let ttl = record.ttl.min(chain_ttls[position]);
        for addr in record_addresses(record) {
            if seen.contains(&addr) {
                continue;
            }
            seen.push(addr);
            if extracted.addresses.len() < cap {
                extracted.addresses.push(AnswerAddress { addr, ttl });
            } else {
                extracted.over_cap += 1;
            }
        }
    }
    extracted
}

/// Follows CNAME records from `qname`. Returns the chain of names and, for
/// each, the smallest CNAME TTL on the way to it.
fn follow_cnames(answers: &[Record], qname: &Name) -> (Vec<Name>, Vec<u32>) {
    let mut chain = vec![qname.clone()];
    let mut ttls = vec![u32::MAX];
    while chain.len() <= MAX_CNAME_CHAIN {
        let current = &chain[chain.len() - 1];
        let next = answers.iter().find_map(|record| match &record.data {
            RData::CNAME(target) if record.name.eq_ignore_root(current) => {
                Some((target.0.clone(), record.ttl))
            }
            _ => None,
        });
        let Some((target, ttl)) = next else { break };
        if chain.iter().any(|n| n.eq_ignore_root(&target)) {
            break; // a loop: the names already on the chain are all there is
        }
        let ttl = ttl.min(ttls[ttls.len() - 1]);
        chain.push(target);
        ttls.push(ttl);
    }
    (chain, ttls)
}

fn record_addresses(record: &Record) -> Vec<IpAddr> {
    match &record.data {
        RData::A(a) => vec![IpAddr::V4(a.0)],
        RData::AAAA(aaaa) => vec![IpAddr::V6(aaaa.0)],
        RData::HTTPS(https) => svcb_hints(&https.0),
        RData::SVCB(svcb) => svcb_hints(svcb),
        _ => Vec::new(),
    }
}

/// The address hints of a ServiceMode record. An AliasMode record (priority
/// 0) carries no parameters that count (RFC 9460 §2.4.2).
fn svcb_hints(svcb: &SVCB) -> Vec<IpAddr> {
    if svcb.svc_priority == 0 {
        return Vec::new();
    }
    let mut hints = Vec::new();
    for (_, value) in &svcb.svc_params {
        match value {
            SvcParamValue::Ipv4Hint(v4) => hints.extend(v4.0.iter().map(|a| IpAddr::V4(a.0))),
            SvcParamValue::Ipv6Hint(v6) => hints.extend(v6.0.iter().map(|a| IpAddr::V6(a.0))),
            _ => {}
        }
    }
    hints
}

/// The time an answer may be cached: the smallest TTL in its answer section
/// (RFC 2181 §5.2, §8), `None` for an answer without records.
pub fn answer_ttl(message: &Message) -> Option<u32> {
    message
        .answers
        .iter()
        .filter(|r| r.record_type() != RecordType::OPT)
        .map(|r| r.ttl)
        .min()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_proto::op::{Message, OpCode};
    use hickory_proto::rr::rdata::svcb::{IpHint, SvcParamKey};
    use hickory_proto::rr::rdata::{A, AAAA, CNAME, HTTPS};

    use super::*;

    pub(crate) fn name(text: &str) -> Name {
        Name::from_ascii(text).unwrap()
    }

    pub(crate) fn a(owner: &str, ttl: u32, addr: [u8; 4]) -> Record {
        Record::from_rdata(name(owner), ttl, RData::A(A(Ipv4Addr::from(addr))))
    }

    fn aaaa(owner: &str, ttl: u32, addr: Ipv6Addr) -> Record {
        Record::from_rdata(name(owner), ttl, RData::AAAA(AAAA(addr)))
    }

    pub(crate) fn cname(owner: &str, ttl: u32, target: &str) -> Record {
        Record::from_rdata(name(owner), ttl, RData::CNAME(CNAME(name(target))))
    }

    fn https(owner: &str, ttl: u32, priority: u16, v4: &[[u8; 4]], v6: &[Ipv6Addr]) -> Record {
        let params = vec![
            (
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(v4.iter().map(|a| A(Ipv4Addr::from(*a))).collect())),
            ),
            (
                SvcParamKey::Ipv6Hint,
                SvcParamValue::Ipv6Hint(IpHint(v6.iter().map(|a| AAAA(*a)).collect())),
            ),
        ];
        let svcb = SVCB::new(priority, Name::root(), params);
        Record::from_rdata(name(owner), ttl, RData::HTTPS(HTTPS(svcb)))
    }

    fn message(answers: Vec<Record>) -> Message {
        let mut message = Message::response(7, OpCode::Query);
        message.add_answers(answers);
        message
    }

    fn addrs(extracted: &Extracted) -> Vec<(String, u32)> {
        extracted
            .addresses
            .iter()
            .map(|a| (a.addr.to_string(), a.ttl))
            .collect()
    }

    #[test]
    fn a_and_aaaa_of_the_queried_name() {
        let v6: Ipv6Addr = "2001:db8::1".parse().unwrap();
        let msg = message(vec![
            a("x.org.", 300, [192, 0, 2, 1]),
            aaaa("x.org.", 60, v6),
        ]);
        let got = extract_addresses(&msg, &name("X.Org."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(
            addrs(&got),
            vec![("192.0.2.1".into(), 300), ("2001:db8::1".into(), 60)]
        );
        assert_eq!(got.over_cap, 0);
    }

    #[test]
    fn cname_chain_is_followed_with_the_smallest_ttl() {
        let msg = message(vec![
            cname("www.x.org.", 30, "edge.cdn.net."),
            cname("edge.cdn.net.", 600, "e1.cdn.net."),
            a("e1.cdn.net.", 300, [198, 51, 100, 7]),
            a("e1.cdn.net.", 300, [198, 51, 100, 8]),
        ]);
        let got = extract_addresses(&msg, &name("www.x.org."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(
            addrs(&got),
            vec![("198.51.100.7".into(), 30), ("198.51.100.8".into(), 30)]
        );
        assert_eq!(
            got.chain,
            vec![
                name("www.x.org."),
                name("edge.cdn.net."),
                name("e1.cdn.net.")
            ]
        );
    }

    #[test]
    fn records_of_other_owners_are_ignored() {
        let msg = message(vec![
            a("x.org.", 300, [192, 0, 2, 1]),
            a("bank.example.", 300, [203, 0, 113, 9]),
            cname("other.example.", 300, "x.org."),
        ]);
        let got = extract_addresses(&msg, &name("x.org."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(addrs(&got), vec![("192.0.2.1".into(), 300)]);
    }

    #[test]
    fn cname_loops_and_overlong_chains_end() {
        let looped = message(vec![
            cname("a.x.", 10, "b.x."),
            cname("b.x.", 10, "a.x."),
            a("b.x.", 10, [192, 0, 2, 2]),
        ]);
        let got = extract_addresses(&looped, &name("a.x."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(got.chain.len(), 2);
        assert_eq!(addrs(&got), vec![("192.0.2.2".into(), 10)]);

        let mut records: Vec<Record> = (0..40)
            .map(|i| cname(&format!("n{i}.x."), 10, &format!("n{}.x.", i + 1)))
            .collect();
        records.push(a("n40.x.", 10, [192, 0, 2, 3]));
        let got = extract_addresses(&message(records), &name("n0.x."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(got.chain.len(), MAX_CNAME_CHAIN + 1);
        assert!(
            got.addresses.is_empty(),
            "the end of a chain longer than the limit is not reached"
        );
    }

    #[test]
    fn https_hints_count_and_alias_mode_does_not() {
        let v6: Ipv6Addr = "2001:db8::5".parse().unwrap();
        let msg = message(vec![
            https(
                "svc.x.org.",
                120,
                1,
                &[[192, 0, 2, 10], [192, 0, 2, 11]],
                &[v6],
            ),
            https("svc.x.org.", 120, 0, &[[192, 0, 2, 99]], &[]),
        ]);
        let got = extract_addresses(&msg, &name("svc.x.org."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(
            addrs(&got),
            vec![
                ("192.0.2.10".into(), 120),
                ("192.0.2.11".into(), 120),
                ("2001:db8::5".into(), 120)
            ]
        );
    }

    #[test]
    fn svcb_hints_count_too() {
        let svcb = SVCB::new(
            1,
            Name::root(),
            vec![(
                SvcParamKey::Ipv4Hint,
                SvcParamValue::Ipv4Hint(IpHint(vec![A(Ipv4Addr::new(192, 0, 2, 20))])),
            )],
        );
        let msg = message(vec![Record::from_rdata(
            name("_dns.x.org."),
            50,
            RData::SVCB(svcb),
        )]);
        let got = extract_addresses(&msg, &name("_dns.x.org."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(addrs(&got), vec![("192.0.2.20".into(), 50)]);
    }

    #[test]
    fn duplicates_count_once_and_the_cap_holds() {
        let mut records: Vec<Record> = (0..40u8).map(|i| a("big.x.", 60, [10, 0, 0, i])).collect();
        records.push(a("big.x.", 60, [10, 0, 0, 0]));
        let got = extract_addresses(&message(records), &name("big.x."), MAX_ADDRESSES_PER_NAME);
        assert_eq!(got.addresses.len(), MAX_ADDRESSES_PER_NAME);
        assert_eq!(got.over_cap, 40 - MAX_ADDRESSES_PER_NAME);
        assert_eq!(got.addresses[0].addr.to_string(), "10.0.0.0");
        assert_eq!(got.addresses[31].addr.to_string(), "10.0.0.31");
    }

    #[test]
    fn answer_ttl_is_the_smallest() {
        let msg = message(vec![
            cname("w.x.", 20, "e.x."),
            a("e.x.", 300, [192, 0, 2, 1]),
        ]);
        assert_eq!(answer_ttl(&msg), Some(20));
        assert_eq!(answer_ttl(&message(vec![])), None);
    }
}
