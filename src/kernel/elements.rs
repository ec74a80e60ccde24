//! Set keys and elements in the kernel's encoding, and incremental element
//! updates (the DNS layer adds and refreshes addresses with timeouts).
//!
//! Encoding rules (as nft 1.0.x sends them, checked with `nft --debug=netlink`):
//! - an address key is the address in network byte order (4 or 16 bytes);
//! - a concatenated key puts each field in its own 32-bit registers, padded
//!   with zeros: `ipv4_addr . inet_proto . inet_service` is 4 + 4 + 4 bytes
//!   (address, protocol byte + 3 zeros, port in network order + 2 zeros);
//! - a range in a non-concatenated interval set (the rbtree backend) is two
//!   elements: the start, and an end element flagged `NFT_SET_ELEM_INTERVAL_END`
//!   whose key is the first address *after* the range. Without that end the
//!   range runs to the top of the address space, so an allow set would allow
//!   everything above it: fail open. Only a range that ends at the top of the
//!   address space has no end element (there is no address after it);
//! - a range in a concatenated interval set (the pipapo backend) is one element
//!   with `NFTA_SET_ELEM_KEY_END`, the *last* key of the range (inclusive).

use std::ffi::CString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use ipnet::IpNet;

use super::ffi::{self, ElementOp, RawElement, SetDefinition, SetMsg};
use super::netlink::{Netlink, Object, Transaction};
use super::{Error, generation, table_name};
use crate::policy::Proto;
use crate::ruleset::{Element, Family, Set, SetKey};

/// nft datatype ids (nftables include/datatype.h), stored as a set's key type
/// so that `nft list` can print the keys; the kernel treats them as opaque.
pub mod datatype {
    pub const IPADDR: u32 = 7;
    pub const IP6ADDR: u32 = 8;
    pub const INET_PROTOCOL: u32 = 12;
    pub const INET_SERVICE: u32 = 13;
    pub const ICMP6_TYPE: u32 = 29;
    /// nft's `TYPE_BITS`: a concatenated type id is the field ids shifted together.
    pub const CONCAT_BITS: u32 = 6;
}

/// nft's byte order tags for `NFTNL_UDATA_SET_KEYBYTEORDER`.
pub const BYTEORDER_HOST: u32 = 1;
pub const BYTEORDER_BIG_ENDIAN: u32 = 2;

fn addr_len(family: Family) -> usize {
    match family {
        Family::V4 => 4,
        Family::V6 => 16,
    }
}

/// The kernel's description of a named set of the model.
pub fn set_definition(set: &Set, id: u32) -> Result<SetDefinition, Error> {
    let name = CString::new(set.name.as_str()).map_err(|_| Error::InvalidName {
        name: set.name.clone(),
    })?;
    let mut flags = 0;
    if set.interval {
        flags |= libc::NFT_SET_INTERVAL as u32;
    }
    if set.timeout {
        flags |= libc::NFT_SET_TIMEOUT as u32;
    }
    let definition = match set.key {
        SetKey::Addr(family) => SetDefinition {
            name,
            id,
            flags,
            key_type: match family {
                Family::V4 => datatype::IPADDR,
                Family::V6 => datatype::IP6ADDR,
            },
            key_len: addr_len(family) as u32,
            field_lens: Vec::new(),
            key_byteorder: BYTEORDER_BIG_ENDIAN,
        },
        SetKey::AddrProtoPort(family) => {
            // Only a concatenated *interval* set is flagged NFT_SET_CONCAT and
            // described field by field (the kernel then picks pipapo, which
            // needs the field lengths); the kernel refuses a field description
            // on a set without the flag, and hashes the whole key otherwise.
            let field_lens = if set.interval {
                flags |= ffi::NFT_SET_CONCAT;
                vec![addr_len(family) as u8, 1, 2]
            } else {
                Vec::new()
            };
            let addr_type = match family {
                Family::V4 => datatype::IPADDR,
                Family::V6 => datatype::IP6ADDR,
            };
            SetDefinition {
                name,
                id,
                flags,
                key_type: (((addr_type << datatype::CONCAT_BITS) | datatype::INET_PROTOCOL)
                    << datatype::CONCAT_BITS)
                    | datatype::INET_SERVICE,
                // Each field takes whole 32-bit registers (NFT_REG32_*).
                key_len: (addr_len(family) + 4 + 4) as u32,
                field_lens,
                // nft tags a concatenation as host byte order (its mixed fields are
                // converted one by one when printed).
                key_byteorder: BYTEORDER_HOST,
            }
        }
    };
    Ok(definition)
}

fn addr_bytes(addr: IpAddr) -> Vec<u8> {
    match addr {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

/// `meta l4proto` value of a protocol (IANA protocol numbers).
pub fn proto_number(proto: Proto) -> u8 {
    match proto {
        Proto::Tcp => libc::IPPROTO_TCP as u8,
        Proto::Udp => libc::IPPROTO_UDP as u8,
    }
}

fn concat_key(addr: IpAddr, proto: Proto, port: u16) -> Vec<u8> {
    let mut key = addr_bytes(addr);
    key.extend_from_slice(&[proto_number(proto), 0, 0, 0]);
    let port = port.to_be_bytes();
    key.extend_from_slice(&[port[0], port[1], 0, 0]);
    key
}

/// The address right after `addr`, or `None` at the top of the address space.
fn successor(addr: IpAddr) -> Option<IpAddr> {
    match addr {
        IpAddr::V4(v4) => u32::from(v4)
            .checked_add(1)
            .map(|n| IpAddr::V4(Ipv4Addr::from(n))),
        IpAddr::V6(v6) => u128::from(v6)
            .checked_add(1)
            .map(|n| IpAddr::V6(Ipv6Addr::from(n))),
    }
}

fn is_single(net: &IpNet) -> bool {
    net.prefix_len() == net.max_prefix_len()
}

/// Encode one model element for a set with key `key` and the interval flag
/// `interval`. See the module documentation for the rules.
pub fn encode(
    set: &str,
    key: SetKey,
    interval: bool,
    element: &Element,
) -> Result<Vec<RawElement>, Error> {
    let invalid = |reason: String| Error::InvalidElement {
        set: set.to_string(),
        element: describe_model(element),
        reason,
    };
    let net = element.net().trunc();
    if Family::of(&net.addr()) != key.family() {
        return Err(invalid(format!(
            "the set holds {} addresses",
            family_name(key.family())
        )));
    }
    if !interval && !is_single(&net) {
        return Err(invalid(
            "a range needs a set with the interval flag; this set holds single addresses".into(),
        ));
    }
    let raw = |key: Vec<u8>| RawElement {
        key,
        key_end: None,
        interval_end: false,
        timeout_ms: None,
        expiration_ms: None,
    };
    match (key, element) {
        (SetKey::Addr(_), Element::Addr(_)) => {
            let start = raw(addr_bytes(net.network()));
            if !interval {
                return Ok(vec![start]);
            }
            let mut encoded = vec![start];
            if let Some(after) = successor(net.broadcast()) {
                encoded.push(RawElement {
                    interval_end: true,
                    ..raw(addr_bytes(after))
                });
            }
            Ok(encoded)
        }
        (SetKey::AddrProtoPort(_), Element::AddrProtoPort(_, proto, port)) => {
            let mut element = raw(concat_key(net.network(), *proto, *port));
            if interval {
                element.key_end = Some(concat_key(net.broadcast(), *proto, *port));
            }
            Ok(vec![element])
        }
        (SetKey::Addr(_), Element::AddrProtoPort(..)) => Err(invalid(
            "the set's key is an address only; this element carries a protocol and port".into(),
        )),
        (SetKey::AddrProtoPort(_), Element::Addr(_)) => Err(invalid(
            "the set's key is address . protocol . port; this element has no protocol and port"
                .into(),
        )),
    }
}

/// Encode all elements of a model set, in order.
pub fn encode_all(set: &Set) -> Result<Vec<RawElement>, Error> {
    let mut encoded = Vec::with_capacity(set.elements.len() * 2);
    for element in &set.elements {
        encoded.extend(encode(&set.name, set.key, set.interval, element)?);
    }
    Ok(encoded)
}

fn family_name(family: Family) -> &'static str {
    match family {
        Family::V4 => "IPv4",
        Family::V6 => "IPv6",
    }
}

/// A model element as nft would write it.
pub fn describe_model(element: &Element) -> String {
    let net = |net: &IpNet| {
        if is_single(net) {
            net.addr().to_string()
        } else {
            net.to_string()
        }
    };
    match element {
        Element::Addr(n) => net(n),
        Element::AddrProtoPort(n, proto, port) => format!("{} . {proto} . {port}", net(n)),
    }
}

/// A kernel element as text, for messages (`10.0.0.0 . tcp . 443 - 10.0.0.255 . tcp . 443`).
pub fn describe_raw(element: &RawElement) -> String {
    let key = |bytes: &[u8]| -> String {
        let addr = match bytes.len() {
            4 | 12 => <[u8; 4]>::try_from(&bytes[..4])
                .map(|b| IpAddr::from(b).to_string())
                .ok(),
            16 | 24 => <[u8; 16]>::try_from(&bytes[..16])
                .map(|b| IpAddr::from(b).to_string())
                .ok(),
            _ => None,
        };
        match (addr, bytes.len()) {
            (Some(addr), 4 | 16) => addr,
            (Some(addr), len) => {
                let fields = &bytes[len - 8..];
                let proto = match fields[0] {
                    6 => "tcp".to_string(),
                    17 => "udp".to_string(),
                    other => other.to_string(),
                };
                format!(
                    "{addr} . {proto} . {}",
                    u16::from_be_bytes([fields[4], fields[5]])
                )
            }
            _ => hex::encode(bytes),
        }
    };
    let mut text = key(&element.key);
    if let Some(end) = &element.key_end {
        text.push_str(&format!(" - {}", key(end)));
    }
    if element.interval_end {
        text.push_str(" (interval end)");
    }
    text
}

/// Number of logical elements (ranges or keys) in a kernel element list:
/// interval end elements only close a range, and a key listed twice counts
/// once. A dump of a hash set is not a snapshot: nft_set_hash walks its
/// rhashtable, and a walk that meets a resize (the table grows in a deferred
/// worker after a burst of adds) rewinds to the start of the new table
/// (`rhashtable_walk_next`: "-EAGAIN if resize event occurred ... the
/// iterator will rewind back to the beginning"), so elements it had already
/// passed are listed again.
pub fn logical_count(elements: &[RawElement]) -> usize {
    let mut keys: Vec<(&[u8], Option<&[u8]>)> = elements
        .iter()
        .filter(|e| !e.interval_end)
        .map(|e| (e.key.as_slice(), e.key_end.as_deref()))
        .collect();
    keys.sort_unstable();
    keys.dedup();
    keys.len()
}

/// What an update does to the named set's elements.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetChange {
    /// Add the elements; with a timeout they expire after it. Adding an element
    /// that exists already is not an error: its timeout and expiration are
    /// reset to `timeout` (kernel 6.10+), which is how DNS answers refresh it.
    Add {
        elements: Vec<Element>,
        timeout: Option<Duration>,
    },
    /// Remove the elements; elements that are absent (e.g. already expired) are not an error.
    Delete { elements: Vec<Element> },
}

/// One change to one named set of the `inet netleash` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetUpdate {
    pub set: String,
    pub change: SetChange,
}

/// The kernel's description of an existing set, read back to encode updates.
#[derive(Debug, Clone, Copy)]
struct ExistingSet {
    key: SetKey,
    interval: bool,
    timeout: bool,
}

/// The model key of a kernel set, from its key length and concatenation.
fn model_key(key_len: u32, flags: u32, key_type: u32) -> Option<SetKey> {
    let concat = key_type >> datatype::CONCAT_BITS != 0 || flags & ffi::NFT_SET_CONCAT != 0;
    match (key_len, concat) {
        (4, false) => Some(SetKey::Addr(Family::V4)),
        (16, false) => Some(SetKey::Addr(Family::V6)),
        (12, true) => Some(SetKey::AddrProtoPort(Family::V4)),
        (24, true) => Some(SetKey::AddrProtoPort(Family::V6)),
        _ => None,
    }
}

/// The kernel name of the set `model_name` of the policy in force: a
/// persistent set (the DNS-derived ones) has its model name; a generation set
/// has its generation suffix (see `kernel::generation`), and if several
/// generations hold it (during another apply), the one the base chains reach.
fn kernel_set_name(
    netlink: &mut Netlink,
    sets: &[super::ffi::ParsedSet],
    model_name: &str,
) -> Result<Option<String>, Error> {
    if sets.iter().any(|s| s.name == model_name) {
        return Ok(Some(model_name.to_string()));
    }
    let generations: Vec<&str> = sets
        .iter()
        .map(|s| s.name.as_str())
        .filter(|name| generation::split(name).is_some_and(|(model, _)| model == model_name))
        .collect();
    match generations.as_slice() {
        [] => Ok(None),
        [only] => Ok(Some(only.to_string())),
        _ => {
            let snapshot = super::readback::read_table(netlink, super::readback::Detail::Shape)?;
            Ok(snapshot
                .table
                .and_then(|table| table.sets.into_iter().find(|s| s.name == model_name))
                .map(|s| s.kernel_name))
        }
    }
}

/// Apply `updates` in one transaction: all of them or none. Rules and other
/// sets are not touched. Sets are named by model name.
pub(super) fn update(netlink: &mut Netlink, updates: &[SetUpdate]) -> Result<(), Error> {
    if updates.is_empty() {
        return Ok(());
    }
    let sets = super::readback::read_sets(netlink)?;
    let transaction = update_transaction(netlink, &sets, updates)?;
    netlink.commit(transaction)
}

/// The transaction that applies `updates` to the table whose named sets are
/// `sets` (as read from the kernel).
fn update_transaction(
    netlink: &mut Netlink,
    sets: &[super::ffi::ParsedSet],
    updates: &[SetUpdate],
) -> Result<Transaction, Error> {
    let mut transaction = Transaction::new();
    for update in updates {
        let kernel = kernel_set_name(netlink, sets, &update.set)?
            .and_then(|kernel| sets.iter().find(|s| s.name == kernel))
            .and_then(|set| {
                let key = model_key(set.key_len, set.flags, set.key_type)?;
                let existing = ExistingSet {
                    key,
                    interval: set.flags & libc::NFT_SET_INTERVAL as u32 != 0,
                    timeout: set.flags & libc::NFT_SET_TIMEOUT as u32 != 0,
                };
                Some((set.name.clone(), existing))
            });
        let Some((kernel_name, set)) = kernel else {
            return Err(Error::NoSuchSet {
                set: update.set.clone(),
                known: generation::model_names(sets.iter().map(|s| s.name.as_str())),
            });
        };
        add_update(
            &mut transaction,
            &kernel_name,
            update,
            set.key,
            set.interval,
            set.timeout,
        )?;
    }
    Ok(transaction)
}

/// Add `update` to `transaction`, as the element messages of the set named
/// `kernel_name` in the kernel, whose key is `key` and whose interval and
/// timeout flags are `interval` and `timeout_flag` (see [`encode_update`]:
/// an interval element goes with its end, a concatenated range with its key end).
pub(super) fn add_update(
    transaction: &mut Transaction,
    kernel_name: &str,
    update: &SetUpdate,
    key: SetKey,
    interval: bool,
    timeout_flag: bool,
) -> Result<(), Error> {
    let name = CString::new(kernel_name).map_err(|_| Error::InvalidName {
        name: kernel_name.to_string(),
    })?;
    let (encoded, op) = encode_update(update, key, interval, timeout_flag)?;
    let mut message = SetMsg::existing(&table_name(), &name);
    for raw in &encoded {
        message.push(raw);
    }
    transaction.add_elements(&message, op, Object::Elements(update.set.clone()));
    Ok(())
}

/// Times an [`ElementWriter`] re-reads the sets and tries again after the
/// kernel refused a transaction because another commit came first.
const WRITER_ATTEMPTS: usize = 3;

/// A netfilter socket in one network namespace for element updates only,
/// which remembers the sets of the table between updates, so an update is
/// ONE netlink transaction (one `sendmsg`, the acknowledgements read without
/// waiting) instead of a read of the sets and then a transaction.
///
/// What it remembers is only used under the ruleset generation id it was
/// read at: every transaction carries that id (`NFNL_BATCH_GENID`), so the
/// kernel refuses it (`ERESTART`, nothing applied) if anything else was
/// committed since (`nf_tables_valid_genid`), e.g. a new policy that
/// replaced the sets; the writer then reads the sets again and retries. Its
/// own commit moves the id on by exactly one (`nf_tables_commit`), which
/// the writer follows without reading.
///
/// The socket stays in the namespace it was opened in (a netlink socket is
/// bound to the namespace of its creator), so any thread may use the writer.
pub struct ElementWriter {
    netlink: Netlink,
    known: Option<KnownSets>,
}

/// The named sets of the table at ruleset generation `genid`.
struct KnownSets {
    genid: u32,
    sets: Vec<super::ffi::ParsedSet>,
}

impl ElementWriter {
    /// Open a writer in `target` (the socket is created by a thread that
    /// enters the namespace; the caller's namespace never changes).
    pub fn open(target: &crate::netns::Target) -> Result<ElementWriter, Error> {
        crate::netns::run_in(target, ElementWriter::open_here)?
    }

    /// Open a writer in the calling thread's network namespace (a caller
    /// already inside it, like [`super::Session::open_here`]).
    pub fn open_here() -> Result<ElementWriter, Error> {
        Ok(ElementWriter {
            netlink: Netlink::open()?,
            known: None,
        })
    }

    /// Apply `updates` in one transaction (all or nothing), like
    /// [`super::Session::update_elements`]. Blocks for one netlink
    /// transaction (plus a read of the sets the first time and after a
    /// foreign commit); the kernel commits inside `sendmsg`.
    pub fn update(&mut self, updates: &[SetUpdate]) -> Result<(), Error> {
        if updates.is_empty() {
            return Ok(());
        }
        for _ in 0..WRITER_ATTEMPTS {
            let known = match self.known.take() {
                Some(known) => known,
                None => {
                    let genid = super::readback::generation_id(&mut self.netlink)?;
                    let sets = super::readback::read_sets(&mut self.netlink)?;
                    KnownSets { genid, sets }
                }
            };
            let mut transaction = update_transaction(&mut self.netlink, &known.sets, updates)?;
            transaction.expect_generation(known.genid);
            match self.netlink.commit(transaction) {
                Ok(()) => {
                    // Id 0 is never sent (it means "no check"), so sets read
                    // at 0 could not be checked: they are not kept.
                    let genid = super::next_genid(known.genid);
                    if known.genid != 0 {
                        self.known = Some(KnownSets { genid, ..known });
                    }
                    return Ok(());
                }
                Err(Error::RulesetChanged) => continue,
                // What is known is dropped: the next update reads again.
                Err(error) => return Err(error),
            }
        }
        Err(Error::RulesetChanged)
    }
}

/// The kernel elements of `update` to a set with key `key` and the interval
/// and timeout flags `interval` and `timeout_flag`, and the operation that
/// applies them.
pub(super) fn encode_update(
    update: &SetUpdate,
    key: SetKey,
    interval: bool,
    timeout_flag: bool,
) -> Result<(Vec<RawElement>, ElementOp), Error> {
    let (elements, op, timeout) = match &update.change {
        SetChange::Add { elements, timeout } => (elements, ElementOp::Add, *timeout),
        SetChange::Delete { elements } => (elements, ElementOp::Destroy, None),
    };
    if timeout.is_some() && !timeout_flag {
        return Err(Error::InvalidElement {
            set: update.set.clone(),
            element: elements.first().map(describe_model).unwrap_or_default(),
            reason: "the set has no timeout flag, so its elements cannot expire".into(),
        });
    }
    let timeout_ms = timeout.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX).max(1));
    let mut encoded = Vec::with_capacity(elements.len());
    for element in elements {
        for mut raw in encode(&update.set, key, interval, element)? {
            if !raw.interval_end {
                raw.timeout_ms = timeout_ms;
                // The expiration is what the kernel counts down; sending it
                // with the timeout refreshes an existing element even when
                // its timeout is unchanged.
                raw.expiration_ms = timeout_ms;
            }
            encoded.push(raw);
        }
    }
    Ok((encoded, op))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ruleset::SetRole;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn interval_set(family: Family, nets: &[&str]) -> Set {
        Set {
            name: "allow".into(),
            key: SetKey::Addr(family),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements: nets.iter().map(|n| Element::Addr(net(n))).collect(),
        }
    }

    /// Decode an rbtree element list back into inclusive ranges, the way the
    /// kernel's lookup sees it: a start covers every key up to (excluding) the
    /// next end element, or to the top of the address space if none follows.
    fn ranges(encoded: &[RawElement], top: &[u8]) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut out = Vec::new();
        let mut open: Option<Vec<u8>> = None;
        for element in encoded {
            if element.interval_end {
                let start = open.take().expect("an end element without a start");
                let mut last = element.key.clone();
                // the end element is the first key after the range: step back one.
                for byte in last.iter_mut().rev() {
                    if *byte == 0 {
                        *byte = 0xff;
                    } else {
                        *byte -= 1;
                        break;
                    }
                }
                out.push((start, last));
            } else {
                if let Some(start) = open.replace(element.key.clone()) {
                    // A start followed by another start: the first range has no
                    // end, and the kernel would extend it to the top.
                    out.push((start, top.to_vec()));
                }
            }
        }
        if let Some(start) = open {
            out.push((start, top.to_vec()));
        }
        out
    }

    #[test]
    fn every_interval_range_gets_its_end() {
        let set = interval_set(
            Family::V4,
            &[
                "10.0.0.0/8",
                "192.0.2.7/32",
                "198.51.100.0/24",
                "203.0.113.128/25",
            ],
        );
        let encoded = encode_all(&set).unwrap();
        // one start and one end per range, alternating
        assert_eq!(encoded.len(), 8);
        for pair in encoded.chunks(2) {
            assert!(!pair[0].interval_end && pair[1].interval_end, "{pair:?}");
        }
        let decoded = ranges(&encoded, &[255; 4]);
        let expected: Vec<(Vec<u8>, Vec<u8>)> = set
            .elements
            .iter()
            .map(|e| {
                (
                    addr_bytes(e.net().network()),
                    addr_bytes(e.net().broadcast()),
                )
            })
            .collect();
        assert_eq!(decoded, expected);
        // 198.51.100.0/24 ends at 198.51.100.255: its end element is 198.51.101.0.
        assert_eq!(encoded[5].key, vec![198, 51, 101, 0]);
    }

    #[test]
    fn only_a_range_at_the_top_of_the_address_space_has_no_end() {
        let set = interval_set(Family::V4, &["10.0.0.0/8", "240.0.0.0/4"]);
        let encoded = encode_all(&set).unwrap();
        assert_eq!(encoded.iter().filter(|e| e.interval_end).count(), 1);
        assert_eq!(
            ranges(&encoded, &[255; 4]).last().unwrap(),
            &(vec![240, 0, 0, 0], vec![255; 4])
        );

        let v6 = interval_set(Family::V6, &["2001:db8::/32", "ff00::/8"]);
        let encoded = encode_all(&v6).unwrap();
        assert_eq!(encoded.iter().filter(|e| e.interval_end).count(), 1);
        let mut end = vec![0x20, 0x01, 0x0d, 0xb9];
        end.extend([0; 12]);
        assert_eq!(encoded[1].key, end);
    }

    #[test]
    fn ipv6_ranges_get_their_ends() {
        let set = interval_set(
            Family::V6,
            &["2001:db8::/64", "2001:db8:1::1/128", "fe80::/10"],
        );
        let encoded = encode_all(&set).unwrap();
        assert_eq!(encoded.len(), 6);
        let decoded = ranges(&encoded, &[255; 16]);
        for (element, (start, last)) in set.elements.iter().zip(decoded) {
            assert_eq!(start, addr_bytes(element.net().network()));
            assert_eq!(last, addr_bytes(element.net().broadcast()));
        }
    }

    #[test]
    fn concatenated_ranges_carry_an_inclusive_key_end() {
        let element = Element::AddrProtoPort(net("10.0.0.0/24"), Proto::Tcp, 443);
        let encoded = encode(
            "concatenated_v4",
            SetKey::AddrProtoPort(Family::V4),
            true,
            &element,
        )
        .unwrap();
        assert_eq!(encoded.len(), 1);
        assert_eq!(
            encoded[0].key,
            vec![10, 0, 0, 0, 6, 0, 0, 0, 0x01, 0xbb, 0, 0]
        );
        assert_eq!(
            encoded[0].key_end.as_deref(),
            Some(&[10, 0, 0, 255, 6, 0, 0, 0, 0x01, 0xbb, 0, 0][..])
        );
        assert!(!encoded[0].interval_end);

        let single = Element::AddrProtoPort(net("2001:db8::1/128"), Proto::Udp, 53);
        let encoded = encode(
            "resolvers_v6_ports",
            SetKey::AddrProtoPort(Family::V6),
            false,
            &single,
        )
        .unwrap();
        assert_eq!(encoded[0].key.len(), 24);
        assert_eq!(&encoded[0].key[16..], &[17, 0, 0, 0, 0, 53, 0, 0]);
        assert_eq!(encoded[0].key_end, None);
    }

    #[test]
    fn wrong_elements_are_refused_with_the_set_named() {
        let range = Element::Addr(net("10.0.0.0/24"));
        let err = encode("dns_v4", SetKey::Addr(Family::V4), false, &range).unwrap_err();
        assert!(
            err.to_string().contains("dns_v4") && err.to_string().contains("interval"),
            "{err}"
        );
        let v6 = Element::Addr(net("2001:db8::1/128"));
        assert!(encode("dns_v4", SetKey::Addr(Family::V4), false, &v6).is_err());
        let ported = Element::AddrProtoPort(net("10.0.0.1/32"), Proto::Tcp, 1);
        assert!(encode("dns_v4", SetKey::Addr(Family::V4), false, &ported).is_err());
    }

    #[test]
    fn concatenated_definitions_describe_their_fields() {
        let set = Set {
            name: "concatenated_v6".into(),
            key: SetKey::AddrProtoPort(Family::V6),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements: vec![],
        };
        let definition = set_definition(&set, 3).unwrap();
        assert_eq!(definition.key_len, 24);
        assert_eq!(definition.field_lens, vec![16, 1, 2]);
        assert_eq!(
            definition.flags,
            libc::NFT_SET_INTERVAL as u32 | ffi::NFT_SET_CONCAT
        );
        assert_eq!(
            model_key(definition.key_len, definition.flags, definition.key_type),
            Some(set.key)
        );
    }

    #[test]
    fn raw_elements_describe_themselves() {
        let element = Element::AddrProtoPort(net("10.0.0.0/24"), Proto::Tcp, 443);
        let encoded = encode("s", SetKey::AddrProtoPort(Family::V4), true, &element).unwrap();
        assert_eq!(
            describe_raw(&encoded[0]),
            "10.0.0.0 . tcp . 443 - 10.0.0.255 . tcp . 443"
        );
    }

    #[test]
    fn a_key_a_dump_listed_twice_counts_once() {
        let element = |key: u8, interval_end: bool, expiration_ms: u64| RawElement {
            key: vec![192, 0, 2, key],
            key_end: None,
            interval_end,
            timeout_ms: Some(10_000),
            expiration_ms: Some(expiration_ms),
        };
        // Listed again after a resize rewound the walk, a moment later.
        let dumped = [
            element(1, false, 9_000),
            element(2, false, 9_000),
            element(1, false, 8_990),
        ];
        assert_eq!(logical_count(&dumped), 2);
        assert_eq!(
            logical_count(&[element(1, false, 1), element(2, true, 1)]),
            1
        );
    }
}
