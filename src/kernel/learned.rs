//! The elements the DNS layer learned at run time, across a re-apply.
//!
//! A generation swap keeps the sets with `flags timeout` (the `dns_*` sets)
//! and what they learned, but a table replaced or created as a whole starts
//! with them empty: a connection that a client opens right after would be
//! rejected until the proxy or the resolver loop learned the address again.
//! An enforcement reads what is learned, and whether the table in force is
//! the policy already, from one read of the table
//! ([`Session::held_and_enforces`]), decides what the new policy still
//! allows, and applies the new policy with those elements in the transaction
//! that puts it in force ([`Session::apply_carrying`]), so there is no moment
//! in which a still-allowed address is missing; it then forgets what the new
//! policy no longer allows.
//!
//! After a restart with the same policy the table in force is kept as it is:
//! the kernel never loses an element at all.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::elements::{self, SetUpdate};
use super::generation;
use super::netlink::Transaction;
use super::readback::{self, Detail};
use super::{ApplyReport, Error, Session};
use crate::policy::Proto;
use crate::ruleset::{Element, Ruleset};

/// An element of a set with `flags timeout`, as the kernel holds it now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldElement {
    pub set: String,
    pub element: Element,
    /// Time left before the kernel removes it; `None` if it has no timeout.
    pub expires_in: Option<Duration>,
}

impl Session {
    /// From one read of the table: every element of its timeout sets (the
    /// DNS-derived sets) with the time each has left, and whether the table
    /// in force is exactly `ruleset` (same digest, sets, chains, rules and
    /// static elements) whatever those sets have learned meanwhile (the
    /// read-back never compares their elements). No table: nothing held, and
    /// not in force.
    pub fn held_and_enforces(
        &mut self,
        ruleset: &Ruleset,
    ) -> Result<(Vec<HeldElement>, bool), Error> {
        let Some(table) = readback::read_table(&mut self.netlink, Detail::Full)?.table else {
            return Ok((Vec::new(), false));
        };
        let ruleset = generation::entry_form(ruleset);
        Ok((
            timed_in(&table)?,
            readback::differences(&ruleset, &table)?.is_empty(),
        ))
    }

    /// [`Session::apply`], with `carried` element additions to the new
    /// policy's sets in the transaction that puts it in force (the swap, the
    /// edit in place, or the transaction that creates or replaces the
    /// table): packets see the
    /// old policy with its elements, or the new one with the carried
    /// elements, never the new one without them. The DNS-derived sets are
    /// persistent across a swap, so for them the carried additions refresh
    /// what is there; after a whole replacement they are what is there.
    pub fn apply_carrying(
        &mut self,
        ruleset: &Ruleset,
        carried: &[SetUpdate],
    ) -> Result<ApplyReport, Error> {
        self.apply_verified(ruleset, ruleset, carried)
    }
}

/// The elements of `table`'s timeout sets, with the time each has left.
fn timed_in(table: &readback::KernelTable) -> Result<Vec<HeldElement>, Error> {
    let mut held = Vec::new();
    for set in table.sets.iter().filter(|s| s.timeout() && !s.interval()) {
        for raw in &set.elements {
            let Some(element) = decode(&raw.key) else {
                return Err(Error::Malformed(format!(
                    "an element of set {:?} has a key of {} bytes",
                    set.name,
                    raw.key.len()
                )));
            };
            held.push(HeldElement {
                set: set.name.clone(),
                element,
                expires_in: raw.expiration_ms.map(Duration::from_millis),
            });
        }
    }
    Ok(held)
}

/// Add `carried` to `transaction`, which puts generation `generation` of
/// `ruleset` in force (sets by model name; a persistent set keeps its name).
pub(super) fn add_carried(
    transaction: &mut Transaction,
    ruleset: &Ruleset,
    generation: u32,
    carried: &[SetUpdate],
) -> Result<(), Error> {
    let naming = generation::Naming::new(ruleset, generation);
    for update in carried {
        let Some(set) = ruleset.set(&update.set) else {
            return Err(Error::NoSuchSet {
                set: update.set.clone(),
                known: ruleset.sets.iter().map(|s| s.name.clone()).collect(),
            });
        };
        elements::add_update(
            transaction,
            &naming.set(&update.set),
            update,
            set.key,
            set.interval,
            set.timeout,
        )?;
    }
    Ok(())
}

/// The model element of a key of a non-interval set: an address (4 or 16
/// bytes), or `address . protocol . port` with each field in whole 32-bit
/// registers (12 or 24 bytes; see `elements`). `None` for any other key.
fn decode(key: &[u8]) -> Option<Element> {
    let addr = |bytes: &[u8]| -> Option<IpAddr> {
        match bytes.len() {
            4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(bytes).ok()?))),
            16 => Some(IpAddr::V6(Ipv6Addr::from(
                <[u8; 16]>::try_from(bytes).ok()?,
            ))),
            _ => None,
        }
    };
    match key.len() {
        4 | 16 => Some(Element::Addr(IpNet::from(addr(key)?))),
        12 | 24 => {
            let (address, fields) = key.split_at(key.len() - 8);
            let proto = match i32::from(fields[0]) {
                libc::IPPROTO_TCP => Proto::Tcp,
                libc::IPPROTO_UDP => Proto::Udp,
                _ => return None,
            };
            let port = u16::from_be_bytes([fields[4], fields[5]]);
            Some(Element::AddrProtoPort(
                IpNet::from(addr(address)?),
                proto,
                port,
            ))
        }
        _ => None,
    }
}

/// Updates that add `held` elements back with the time they have left,
/// grouped into one update per set and remaining time (an update carries one
/// timeout). Elements without a timeout are left out: a timeout set's
/// learned elements always have one.
pub fn carry_updates(held: &[HeldElement]) -> Vec<SetUpdate> {
    let mut grouped: BTreeMap<(String, Duration), Vec<Element>> = BTreeMap::new();
    for element in held {
        if let Some(left) = element.expires_in {
            grouped
                .entry((element.set.clone(), left))
                .or_default()
                .push(element.element);
        }
    }
    grouped
        .into_iter()
        .map(|((set, timeout), elements)| SetUpdate {
            set,
            change: elements::SetChange::Add {
                elements,
                timeout: Some(timeout),
            },
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ffi::RawElement;

    #[test]
    fn keys_decode_to_the_elements_they_encode() {
        use crate::ruleset::{Family, SetKey};
        let cases = [
            (
                SetKey::Addr(Family::V4),
                Element::Addr("192.0.2.7/32".parse().unwrap()),
            ),
            (
                SetKey::Addr(Family::V6),
                Element::Addr("2001:db8::7/128".parse().unwrap()),
            ),
            (
                SetKey::AddrProtoPort(Family::V4),
                Element::AddrProtoPort("192.0.2.7/32".parse().unwrap(), Proto::Tcp, 443),
            ),
            (
                SetKey::AddrProtoPort(Family::V6),
                Element::AddrProtoPort("2001:db8::7/128".parse().unwrap(), Proto::Udp, 53),
            ),
        ];
        for (key, element) in cases {
            let encoded: Vec<RawElement> = elements::encode("s", key, false, &element).unwrap();
            assert_eq!(decode(&encoded[0].key), Some(element));
        }
        assert_eq!(decode(&[1, 2, 3]), None);
    }

    #[test]
    fn carried_elements_keep_the_time_they_have_left() {
        let held = |addr: &str, left: u64| HeldElement {
            set: "dns_v4".into(),
            element: Element::Addr(format!("{addr}/32").parse().unwrap()),
            expires_in: Some(Duration::from_millis(left)),
        };
        let updates = carry_updates(&[
            held("192.0.2.1", 5_000),
            held("192.0.2.2", 5_000),
            held("192.0.2.3", 900),
        ]);
        assert_eq!(updates.len(), 2);
        let timeouts: Vec<Option<Duration>> = updates
            .iter()
            .map(|u| match &u.change {
                elements::SetChange::Add { timeout, .. } => *timeout,
                elements::SetChange::Delete { .. } => None,
            })
            .collect();
        assert_eq!(
            timeouts,
            vec![
                Some(Duration::from_millis(900)),
                Some(Duration::from_millis(5_000))
            ]
        );
    }
}
