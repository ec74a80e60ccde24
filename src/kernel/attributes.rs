//! Safe parsers for the nf_tables messages the kernel answers with: the
//! objects of a dump, and the kernel's echo of a transaction. They walk the
//! netlink attributes directly (no libnftnl object is allocated, and only
//! the attributes the read-back uses are decoded), and return what
//! libnftnl's parsers returned for the same message (the tests check both
//! on real kernel messages).
//!
//! Layout (linux/netlink.h, linux/netfilter/nfnetlink.h): an `nlmsghdr` (16
//! bytes), an `nfgenmsg` (4 bytes: family, version, resource id), then
//! attributes. An attribute is a 4-byte header (`nla_len` in native byte
//! order, counting the header, then `nla_type`, whose two top bits are the
//! `NLA_F_NESTED` / `NLA_F_NET_BYTEORDER` flags) and its payload; the next
//! one starts at `nla_len` rounded up to `NLA_ALIGNTO` (4). Integers in
//! nf_tables payloads are big endian; strings end with a NUL.
//!
//! Malformed input (an attribute shorter than its header, or longer than
//! what encloses it, an integer of the wrong size) makes a parser return
//! `None`; nothing is read outside the message. libnftnl was more lenient
//! (it stopped silently at a truncated attribute), which never matters for
//! what the kernel sends.

use super::ffi::RawElement;

/// `sizeof(struct nlmsghdr)`.
const NLMSG_HDRLEN: usize = 16;
/// `sizeof(struct nfgenmsg)`.
const NFGENMSG_LEN: usize = 4;
/// `NLA_HDRLEN`.
const NLA_HDRLEN: usize = 4;
/// `NLA_ALIGNTO`.
const NLA_ALIGNTO: usize = 4;
/// Most bytes of an `NFTA_DATA_VALUE` (`NFT_DATA_VALUE_MAXLEN`, what
/// libnftnl's `union nftnl_data_reg` holds).
const DATA_VALUE_MAXLEN: usize = 64;

// Attribute types of linux/netfilter/nf_tables.h (stable kernel ABI; the
// libc crate does not carry them).
pub(super) const NFTA_LIST_ELEM: usize = 1;

const NFTA_TABLE_NAME: usize = 1;
const NFTA_TABLE_USERDATA: usize = 6;
const NFTA_TABLE_MAX: usize = 7;

const NFTA_CHAIN_TABLE: usize = 1;
const NFTA_CHAIN_NAME: usize = 3;
const NFTA_CHAIN_HOOK: usize = 4;
const NFTA_CHAIN_POLICY: usize = 5;
const NFTA_CHAIN_TYPE: usize = 7;
const NFTA_CHAIN_USERDATA: usize = 12;
const NFTA_CHAIN_MAX: usize = 12;

const NFTA_HOOK_HOOKNUM: usize = 1;
const NFTA_HOOK_PRIORITY: usize = 2;
const NFTA_HOOK_MAX: usize = 4;

pub(super) const NFTA_RULE_TABLE: usize = 1;
pub(super) const NFTA_RULE_CHAIN: usize = 2;
const NFTA_RULE_HANDLE: usize = 3;
pub(super) const NFTA_RULE_EXPRESSIONS: usize = 4;
pub(super) const NFTA_RULE_USERDATA: usize = 7;
const NFTA_RULE_MAX: usize = 11;

pub(super) const NFTA_EXPR_NAME: usize = 1;
pub(super) const NFTA_EXPR_DATA: usize = 2;
const NFTA_EXPR_MAX: usize = 2;

const NFTA_COUNTER_BYTES: usize = 1;
const NFTA_COUNTER_PACKETS: usize = 2;
const NFTA_COUNTER_MAX: usize = 3;

pub(super) const NFTA_LOOKUP_SET: usize = 1;
pub(super) const NFTA_LOOKUP_SREG: usize = 2;
pub(super) const NFTA_LOOKUP_SET_ID: usize = 4;
const NFTA_LOOKUP_DREG: usize = 3;
const NFTA_LOOKUP_FLAGS: usize = 5;
const NFTA_LOOKUP_MAX: usize = 5;

pub(super) const NFTA_IMMEDIATE_DREG: usize = 1;
pub(super) const NFTA_IMMEDIATE_DATA: usize = 2;
const NFTA_IMMEDIATE_MAX: usize = 2;

pub(super) const NFTA_META_DREG: usize = 1;
pub(super) const NFTA_META_KEY: usize = 2;
const NFTA_META_SREG: usize = 3;
const NFTA_META_MAX: usize = 3;

pub(super) const NFTA_PAYLOAD_DREG: usize = 1;
pub(super) const NFTA_PAYLOAD_BASE: usize = 2;
pub(super) const NFTA_PAYLOAD_OFFSET: usize = 3;
pub(super) const NFTA_PAYLOAD_LEN: usize = 4;
const NFTA_PAYLOAD_SREG: usize = 5;
const NFTA_PAYLOAD_CSUM_TYPE: usize = 6;
const NFTA_PAYLOAD_CSUM_OFFSET: usize = 7;
const NFTA_PAYLOAD_CSUM_FLAGS: usize = 8;
const NFTA_PAYLOAD_MAX: usize = 8;

pub(super) const NFTA_CMP_SREG: usize = 1;
pub(super) const NFTA_CMP_OP: usize = 2;
pub(super) const NFTA_CMP_DATA: usize = 3;
const NFTA_CMP_MAX: usize = 3;

pub(super) const NFTA_BITWISE_SREG: usize = 1;
pub(super) const NFTA_BITWISE_DREG: usize = 2;
pub(super) const NFTA_BITWISE_LEN: usize = 3;
pub(super) const NFTA_BITWISE_MASK: usize = 4;
pub(super) const NFTA_BITWISE_XOR: usize = 5;
const NFTA_BITWISE_OP: usize = 6;
const NFTA_BITWISE_DATA: usize = 7;
/// `NFTA_BITWISE_SREG2` (Linux 6.13): the second operand register of the
/// boolean operations between two registers.
const NFTA_BITWISE_SREG2: usize = 8;
const NFTA_BITWISE_MAX: usize = 8;

pub(super) const NFTA_CT_DREG: usize = 1;
pub(super) const NFTA_CT_KEY: usize = 2;
const NFTA_CT_DIRECTION: usize = 3;
pub(super) const NFTA_CT_SREG: usize = 4;
const NFTA_CT_MAX: usize = 4;

pub(super) const NFTA_LOG_GROUP: usize = 1;
pub(super) const NFTA_LOG_PREFIX: usize = 2;
const NFTA_LOG_SNAPLEN: usize = 3;
const NFTA_LOG_QTHRESHOLD: usize = 4;
const NFTA_LOG_LEVEL: usize = 5;
const NFTA_LOG_FLAGS: usize = 6;
const NFTA_LOG_MAX: usize = 6;

pub(super) const NFTA_REJECT_TYPE: usize = 1;
pub(super) const NFTA_REJECT_ICMP_CODE: usize = 2;
const NFTA_REJECT_MAX: usize = 2;

pub(super) const NFTA_REDIR_REG_PROTO_MIN: usize = 1;
const NFTA_REDIR_REG_PROTO_MAX: usize = 2;
pub(super) const NFTA_REDIR_FLAGS: usize = 3;
const NFTA_REDIR_MAX: usize = 3;

pub(super) const NFTA_DATA_VALUE: usize = 1;
pub(super) const NFTA_DATA_VERDICT: usize = 2;
const NFTA_DATA_MAX: usize = 2;

pub(super) const NFTA_VERDICT_CODE: usize = 1;
pub(super) const NFTA_VERDICT_CHAIN: usize = 2;
const NFTA_VERDICT_MAX: usize = 3;

const NFTA_SET_TABLE: usize = 1;
const NFTA_SET_NAME: usize = 2;
const NFTA_SET_FLAGS: usize = 3;
const NFTA_SET_KEY_TYPE: usize = 4;
const NFTA_SET_KEY_LEN: usize = 5;
const NFTA_SET_MAX: usize = 18;

const NFTA_SET_ELEM_LIST_SET: usize = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: usize = 3;
const NFTA_SET_ELEM_LIST_MAX: usize = 4;

const NFTA_SET_ELEM_KEY: usize = 1;
const NFTA_SET_ELEM_FLAGS: usize = 3;
const NFTA_SET_ELEM_TIMEOUT: usize = 4;
const NFTA_SET_ELEM_EXPIRATION: usize = 5;
const NFTA_SET_ELEM_KEY_END: usize = 10;
const NFTA_SET_ELEM_MAX: usize = 11;

const NFTA_GEN_ID: usize = 1;
const NFTA_GEN_MAX: usize = 3;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedTable {
    pub name: String,
    pub family: u32,
    pub userdata: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedSet {
    pub table: String,
    pub name: String,
    pub family: u32,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedChain {
    pub table: String,
    pub name: String,
    pub family: u32,
    /// `NF_INET_*` hook number of a base chain.
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    /// `NF_ACCEPT` / `NF_DROP`.
    pub policy: Option<u32>,
    pub chain_type: Option<String>,
    /// The chain's user data (its comment), empty if it has none.
    pub userdata: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParsedExpr {
    /// The expression's kernel name (`meta`, `cmp`, `lookup`, `counter`, ...).
    pub name: String,
    /// `(packets, bytes)` of a `counter` expression.
    pub counter: Option<(u64, u64)>,
    /// What the expression refers to by name: the set of a `lookup`, the
    /// target chain of an `immediate` jump or goto.
    pub reference: Option<Reference>,
    /// Every other attribute that decides what the expression matches or
    /// does (see [`ExprData`]).
    pub data: ExprData,
}

/// The attributes of an expression's `NFTA_EXPR_DATA` that decide what it
/// matches or does, as the kernel dumps them (`nft_*_dump` in
/// net/netfilter/), registers as numbered in the message. An optional
/// attribute the kernel leaves out when it is 0 reads as 0. A counter's
/// counts (in [`ParsedExpr::counter`]) and the name a lookup or a verdict
/// refers to (in [`ParsedExpr::reference`]) are not repeated here.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ExprData {
    /// An expression without other attributes (`counter`), or one this
    /// program never writes, whose attributes are not decoded.
    #[default]
    Opaque,
    /// `meta`: load `key` into `dreg`, or (`sreg`) set it.
    Meta {
        key: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
    },
    /// `payload`: load `len` bytes at `offset` of header `base` into
    /// `dreg`, or (`sreg`, with a checksum update) write them.
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
        csum_type: u32,
        csum_offset: u32,
        csum_flags: u32,
    },
    /// `cmp`: compare `sreg` with `data` by `op` (`NFT_CMP_*`).
    Cmp { sreg: u32, op: u32, data: Vec<u8> },
    /// `bitwise` (boxed: the largest kind, and one of the rarest, which
    /// would make every expression larger).
    Bitwise(Box<BitwiseData>),
    /// `ct`: load `key` (of `direction`) into `dreg`, or (`sreg`) set it.
    Ct {
        key: u32,
        dreg: Option<u32>,
        sreg: Option<u32>,
        direction: Option<u8>,
    },
    /// `lookup`: `sreg` in the set, inverted if `flags` has
    /// `NFT_LOOKUP_F_INV` ("not in set"); `dreg` for a map.
    Lookup {
        sreg: u32,
        dreg: Option<u32>,
        flags: u32,
        /// What the anonymous set looked up holds, once the read-back has
        /// read it (a rule message names the set, `__set%d`, and nothing
        /// more); `None` as parsed, and for a named set.
        anonymous: Option<Box<AnonymousContents>>,
    },
    /// `log`: to nflog `group` (`NF_LOG_TYPE_ULOG`) or syslog at `level`
    /// (`NF_LOG_TYPE_LOG`).
    Log {
        group: Option<u16>,
        prefix: Option<String>,
        snaplen: u32,
        qthreshold: u16,
        level: Option<u32>,
        flags: u32,
    },
    /// `reject`: `kind` is `NFT_REJECT_*`; `code` comes with the ICMP kinds.
    Reject { kind: u32, code: Option<u8> },
    /// `immediate`: a value into `dreg`, or a verdict (`dreg` is
    /// `NFT_REG_VERDICT`) with its code (`NF_ACCEPT`, `NFT_JUMP`, ...).
    Immediate {
        dreg: u32,
        value: Option<Vec<u8>>,
        verdict: Option<i32>,
    },
    /// `redir`: the port range from registers, and `NF_NAT_RANGE_*` flags.
    Redir {
        proto_min: Option<u32>,
        proto_max: Option<u32>,
        flags: u32,
    },
}

/// `bitwise`: `dreg = (sreg & mask) ^ xor` over `len` bytes for `op` 0
/// (`NFT_BITWISE_MASK_XOR`); the shifts and boolean operations take `data`
/// or `sreg2`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BitwiseData {
    pub sreg: u32,
    pub dreg: u32,
    pub len: u32,
    pub op: u32,
    pub mask: Vec<u8>,
    pub xor: Vec<u8>,
    pub data: Vec<u8>,
    pub sreg2: Option<u32>,
}

/// An anonymous set (`{ 53, 853 }` in nft), as read with the rule that
/// looks it up: it belongs to that rule, and its kernel name changes with
/// every rule that creates one.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AnonymousContents {
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub elements: Vec<RawElement>,
}

/// A reference by name from an expression to another object of the table.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Reference {
    /// `lookup` in the named set (anonymous sets are named `__set<N>`).
    Set(String),
    /// `jump CHAIN` (`NFT_JUMP`).
    Jump(String),
    /// `goto CHAIN` (`NFT_GOTO`).
    Goto(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRule {
    pub table: String,
    pub chain: String,
    pub family: u32,
    pub handle: u64,
    pub userdata: Vec<u8>,
    pub expressions: Vec<ParsedExpr>,
}

/// The attributes of one nesting level, in order: `(type, payload)` with the
/// flag bits masked off the type, or `None` for a malformed attribute (after
/// which the iteration ends).
struct Attributes<'a> {
    rest: &'a [u8],
}

impl<'a> Attributes<'a> {
    fn new(bytes: &'a [u8]) -> Attributes<'a> {
        Attributes { rest: bytes }
    }
}

impl<'a> Iterator for Attributes<'a> {
    type Item = Option<(usize, &'a [u8])>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let rest = std::mem::take(&mut self.rest);
        let Some(header) = rest.first_chunk::<NLA_HDRLEN>() else {
            return Some(None);
        };
        let len = usize::from(u16::from_ne_bytes([header[0], header[1]]));
        let kind = u16::from_ne_bytes([header[2], header[3]]) & libc::NLA_TYPE_MASK as u16;
        // `len` counts the header: shorter is malformed (`get` is then None,
        // as the range starts after it ends), longer than what is left too.
        let Some(payload) = rest.get(NLA_HDRLEN..len) else {
            return Some(None);
        };
        // The last attribute's padding may be missing (nothing follows it).
        let next = len.next_multiple_of(NLA_ALIGNTO);
        self.rest = rest.get(next..).unwrap_or_default();
        Some(Some((usize::from(kind), payload)))
    }
}

/// The payloads of the attributes of one nesting level by type, for the
/// types up to `MAX` (the last of a type wins, others are ignored, as in
/// libmnl's `mnl_attr_parse`), or `None` if an attribute is malformed.
fn by_type<const N: usize>(bytes: &[u8]) -> Option<[Option<&[u8]>; N]> {
    let mut table = [None; N];
    for attribute in Attributes::new(bytes) {
        let (kind, payload) = attribute?;
        if let Some(slot) = table.get_mut(kind) {
            *slot = Some(payload);
        }
    }
    Some(table)
}

/// The `nfgen_family` and the top-level attributes (types up to `N - 1`) of
/// one whole nf_tables message; `message` may be followed by others.
fn message<const N: usize>(message: &[u8]) -> Option<(u32, [Option<&[u8]>; N])> {
    let len = u32::from_ne_bytes(*message.first_chunk::<4>()?) as usize;
    let message = message.get(..len)?;
    let family = *message.get(NLMSG_HDRLEN)?;
    let body = message.get(NLMSG_HDRLEN + NFGENMSG_LEN..)?;
    Some((u32::from(family), by_type(body)?))
}

/// An attribute that, when present, must decode with `read`: `None` when it
/// is present and does not (malformed), else `Some` of the decoded value.
fn optional<'a, T>(
    attribute: Option<&'a [u8]>,
    read: impl FnOnce(&'a [u8]) -> Option<T>,
) -> Option<Option<T>> {
    match attribute {
        Some(payload) => read(payload).map(Some),
        None => Some(None),
    }
}

/// A string attribute: up to its NUL (the kernel always sends one). Empty
/// is malformed (libmnl's `MNL_TYPE_STRING` check).
fn string(payload: &[u8]) -> Option<String> {
    if payload.is_empty() {
        return None;
    }
    let text = payload
        .iter()
        .position(|&b| b == 0)
        .map_or(payload, |end| &payload[..end]);
    Some(String::from_utf8_lossy(text).into_owned())
}

/// A big-endian u32 attribute of exactly 4 bytes.
fn be32(payload: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(payload.try_into().ok()?))
}

/// A big-endian u64 attribute of exactly 8 bytes.
fn be64(payload: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(payload.try_into().ok()?))
}

/// The elements of an `NFTA_*` list attribute (each an `NFTA_LIST_ELEM`;
/// another type is malformed, as in libnftnl), parsed with `each`.
fn list<'a, T>(bytes: &'a [u8], mut each: impl FnMut(&'a [u8]) -> Option<T>) -> Option<Vec<T>> {
    // Sized first (walking the headers costs little): the items are large
    // (a `ParsedExpr` is ~180 bytes), and growing the vector moves them.
    let mut items = Vec::with_capacity(Attributes::new(bytes).count());
    for attribute in Attributes::new(bytes) {
        match attribute? {
            (NFTA_LIST_ELEM, element) => items.push(each(element)?),
            _ => return None,
        }
    }
    Some(items)
}

/// `NFT_MSG_NEWGEN`: the generation id.
pub fn parse_generation(bytes: &[u8]) -> Option<u32> {
    record(bytes);
    let (_, generation) = message::<{ NFTA_GEN_MAX + 1 }>(bytes)?;
    be32(generation[NFTA_GEN_ID]?)
}

pub fn parse_table(bytes: &[u8]) -> Option<ParsedTable> {
    record(bytes);
    let (family, table) = message::<{ NFTA_TABLE_MAX + 1 }>(bytes)?;
    Some(ParsedTable {
        name: optional(table[NFTA_TABLE_NAME], string)?.unwrap_or_default(),
        family,
        userdata: table[NFTA_TABLE_USERDATA].unwrap_or_default().to_vec(),
    })
}

pub fn parse_set(bytes: &[u8]) -> Option<ParsedSet> {
    record(bytes);
    let (family, set) = message::<{ NFTA_SET_MAX + 1 }>(bytes)?;
    let number = |kind: usize| optional(set[kind], be32).map(Option::unwrap_or_default);
    Some(ParsedSet {
        table: optional(set[NFTA_SET_TABLE], string)?.unwrap_or_default(),
        name: optional(set[NFTA_SET_NAME], string)?.unwrap_or_default(),
        family,
        flags: number(NFTA_SET_FLAGS)?,
        key_type: number(NFTA_SET_KEY_TYPE)?,
        key_len: number(NFTA_SET_KEY_LEN)?,
    })
}

/// One `NFT_MSG_NEWSETELEM` message of an element dump or echo: the set name
/// and its elements, in message order.
pub fn parse_elements(bytes: &[u8]) -> Option<(String, Vec<RawElement>)> {
    record(bytes);
    let (_, elements) = message::<{ NFTA_SET_ELEM_LIST_MAX + 1 }>(bytes)?;
    let name = optional(elements[NFTA_SET_ELEM_LIST_SET], string)?.unwrap_or_default();
    let parsed = match elements[NFTA_SET_ELEM_LIST_ELEMENTS] {
        Some(nested) => list(nested, element)?,
        None => Vec::new(),
    };
    Some((name, parsed))
}

/// One `NFTA_LIST_ELEM` of `NFTA_SET_ELEM_LIST_ELEMENTS`.
fn element(bytes: &[u8]) -> Option<RawElement> {
    let element = by_type::<{ NFTA_SET_ELEM_MAX + 1 }>(bytes)?;
    let flags = optional(element[NFTA_SET_ELEM_FLAGS], be32)?.unwrap_or_default();
    Some(RawElement {
        // A key without a value is an empty key, as libnftnl read it.
        key: optional(element[NFTA_SET_ELEM_KEY], data_value)?
            .flatten()
            .unwrap_or_default(),
        key_end: optional(element[NFTA_SET_ELEM_KEY_END], data_value)?
            .map(Option::unwrap_or_default),
        interval_end: flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0,
        timeout_ms: optional(element[NFTA_SET_ELEM_TIMEOUT], be64)?,
        expiration_ms: optional(element[NFTA_SET_ELEM_EXPIRATION], be64)?,
    })
}

/// The `NFTA_DATA_VALUE` of an `NFTA_DATA_*` nest (a set key): `Some(None)`
/// if it has none. A value that is empty or longer than any register, or a
/// verdict (no set of this program has verdict keys), is malformed.
fn data_value(bytes: &[u8]) -> Option<Option<Vec<u8>>> {
    let data = by_type::<{ NFTA_DATA_MAX + 1 }>(bytes)?;
    if data[NFTA_DATA_VERDICT].is_some() {
        return None;
    }
    optional(data[NFTA_DATA_VALUE], |value| {
        (1..=DATA_VALUE_MAXLEN)
            .contains(&value.len())
            .then(|| value.to_vec())
    })
}

pub fn parse_chain(bytes: &[u8]) -> Option<ParsedChain> {
    record(bytes);
    let (family, chain) = message::<{ NFTA_CHAIN_MAX + 1 }>(bytes)?;
    let hook = optional(chain[NFTA_CHAIN_HOOK], by_type::<{ NFTA_HOOK_MAX + 1 }>)?;
    let hook_attribute = |kind: usize| hook.and_then(|hook| hook[kind]);
    Some(ParsedChain {
        table: optional(chain[NFTA_CHAIN_TABLE], string)?.unwrap_or_default(),
        name: optional(chain[NFTA_CHAIN_NAME], string)?.unwrap_or_default(),
        family,
        hook: optional(hook_attribute(NFTA_HOOK_HOOKNUM), be32)?,
        // The priority is a signed 32-bit number sent as a big-endian u32.
        priority: optional(hook_attribute(NFTA_HOOK_PRIORITY), be32)?.map(|p| p as i32),
        policy: optional(chain[NFTA_CHAIN_POLICY], be32)?,
        chain_type: optional(chain[NFTA_CHAIN_TYPE], string)?,
        userdata: chain[NFTA_CHAIN_USERDATA].unwrap_or_default().to_vec(),
    })
}

pub fn parse_rule(bytes: &[u8]) -> Option<ParsedRule> {
    record(bytes);
    let (family, rule) = message::<{ NFTA_RULE_MAX + 1 }>(bytes)?;
    let expressions = match rule[NFTA_RULE_EXPRESSIONS] {
        Some(nested) => list(nested, expression)?,
        None => Vec::new(),
    };
    Some(ParsedRule {
        table: optional(rule[NFTA_RULE_TABLE], string)?.unwrap_or_default(),
        chain: optional(rule[NFTA_RULE_CHAIN], string)?.unwrap_or_default(),
        family,
        handle: optional(rule[NFTA_RULE_HANDLE], be64)?.unwrap_or_default(),
        userdata: rule[NFTA_RULE_USERDATA].unwrap_or_default().to_vec(),
        expressions,
    })
}

/// One `NFTA_LIST_ELEM` of `NFTA_RULE_EXPRESSIONS`: its name, and the
/// attributes of its `NFTA_EXPR_DATA` for every expression this program
/// writes (the data of others is not decoded: it never equals a model's).
fn expression(bytes: &[u8]) -> Option<ParsedExpr> {
    let expression = by_type::<{ NFTA_EXPR_MAX + 1 }>(bytes)?;
    let name = string(expression[NFTA_EXPR_NAME]?)?;
    let data = expression[NFTA_EXPR_DATA].unwrap_or_default();
    let mut counter = None;
    let mut reference = None;
    let parsed = match name.as_str() {
        "counter" => {
            let attributes = by_type::<{ NFTA_COUNTER_MAX + 1 }>(data)?;
            let number = |kind| zero_if_absent(attributes[kind], be64);
            counter = Some((number(NFTA_COUNTER_PACKETS)?, number(NFTA_COUNTER_BYTES)?));
            ExprData::Opaque
        }
        "lookup" => {
            let attributes = by_type::<{ NFTA_LOOKUP_MAX + 1 }>(data)?;
            reference = optional(attributes[NFTA_LOOKUP_SET], string)?.map(Reference::Set);
            ExprData::Lookup {
                sreg: zero_if_absent(attributes[NFTA_LOOKUP_SREG], be32)?,
                dreg: optional(attributes[NFTA_LOOKUP_DREG], be32)?,
                flags: zero_if_absent(attributes[NFTA_LOOKUP_FLAGS], be32)?,
                anonymous: None,
            }
        }
        "immediate" => {
            let attributes = by_type::<{ NFTA_IMMEDIATE_MAX + 1 }>(data)?;
            let (value, verdict) =
                optional(attributes[NFTA_IMMEDIATE_DATA], immediate_data)?.unwrap_or_default();
            reference = verdict.as_ref().and_then(|(_, target)| target.clone());
            ExprData::Immediate {
                dreg: zero_if_absent(attributes[NFTA_IMMEDIATE_DREG], be32)?,
                value,
                verdict: verdict.map(|(code, _)| code),
            }
        }
        "meta" => {
            let attributes = by_type::<{ NFTA_META_MAX + 1 }>(data)?;
            ExprData::Meta {
                key: zero_if_absent(attributes[NFTA_META_KEY], be32)?,
                dreg: optional(attributes[NFTA_META_DREG], be32)?,
                sreg: optional(attributes[NFTA_META_SREG], be32)?,
            }
        }
        "payload" => {
            let attributes = by_type::<{ NFTA_PAYLOAD_MAX + 1 }>(data)?;
            let number = |kind: usize| zero_if_absent(attributes[kind], be32);
            ExprData::Payload {
                base: number(NFTA_PAYLOAD_BASE)?,
                offset: number(NFTA_PAYLOAD_OFFSET)?,
                len: number(NFTA_PAYLOAD_LEN)?,
                dreg: optional(attributes[NFTA_PAYLOAD_DREG], be32)?,
                sreg: optional(attributes[NFTA_PAYLOAD_SREG], be32)?,
                csum_type: number(NFTA_PAYLOAD_CSUM_TYPE)?,
                csum_offset: number(NFTA_PAYLOAD_CSUM_OFFSET)?,
                csum_flags: number(NFTA_PAYLOAD_CSUM_FLAGS)?,
            }
        }
        "cmp" => {
            let attributes = by_type::<{ NFTA_CMP_MAX + 1 }>(data)?;
            ExprData::Cmp {
                sreg: zero_if_absent(attributes[NFTA_CMP_SREG], be32)?,
                op: zero_if_absent(attributes[NFTA_CMP_OP], be32)?,
                data: value_data(attributes[NFTA_CMP_DATA])?,
            }
        }
        "bitwise" => {
            let attributes = by_type::<{ NFTA_BITWISE_MAX + 1 }>(data)?;
            let number = |kind: usize| zero_if_absent(attributes[kind], be32);
            ExprData::Bitwise(Box::new(BitwiseData {
                sreg: number(NFTA_BITWISE_SREG)?,
                dreg: number(NFTA_BITWISE_DREG)?,
                len: number(NFTA_BITWISE_LEN)?,
                op: number(NFTA_BITWISE_OP)?,
                mask: value_data(attributes[NFTA_BITWISE_MASK])?,
                xor: value_data(attributes[NFTA_BITWISE_XOR])?,
                data: value_data(attributes[NFTA_BITWISE_DATA])?,
                sreg2: optional(attributes[NFTA_BITWISE_SREG2], be32)?,
            }))
        }
        "ct" => {
            let attributes = by_type::<{ NFTA_CT_MAX + 1 }>(data)?;
            ExprData::Ct {
                key: zero_if_absent(attributes[NFTA_CT_KEY], be32)?,
                dreg: optional(attributes[NFTA_CT_DREG], be32)?,
                sreg: optional(attributes[NFTA_CT_SREG], be32)?,
                direction: optional(attributes[NFTA_CT_DIRECTION], u8_exact)?,
            }
        }
        "log" => {
            let attributes = by_type::<{ NFTA_LOG_MAX + 1 }>(data)?;
            ExprData::Log {
                group: optional(attributes[NFTA_LOG_GROUP], be16)?,
                prefix: optional(attributes[NFTA_LOG_PREFIX], string)?,
                snaplen: zero_if_absent(attributes[NFTA_LOG_SNAPLEN], be32)?,
                qthreshold: zero_if_absent(attributes[NFTA_LOG_QTHRESHOLD], be16)?,
                level: optional(attributes[NFTA_LOG_LEVEL], be32)?,
                flags: zero_if_absent(attributes[NFTA_LOG_FLAGS], be32)?,
            }
        }
        "reject" => {
            let attributes = by_type::<{ NFTA_REJECT_MAX + 1 }>(data)?;
            ExprData::Reject {
                kind: zero_if_absent(attributes[NFTA_REJECT_TYPE], be32)?,
                code: optional(attributes[NFTA_REJECT_ICMP_CODE], u8_exact)?,
            }
        }
        "redir" => {
            let attributes = by_type::<{ NFTA_REDIR_MAX + 1 }>(data)?;
            ExprData::Redir {
                proto_min: optional(attributes[NFTA_REDIR_REG_PROTO_MIN], be32)?,
                proto_max: optional(attributes[NFTA_REDIR_REG_PROTO_MAX], be32)?,
                flags: zero_if_absent(attributes[NFTA_REDIR_FLAGS], be32)?,
            }
        }
        _ => ExprData::Opaque,
    };
    Some(ParsedExpr {
        name,
        counter,
        reference,
        data: parsed,
    })
}

/// An optional number attribute that reads as 0 when absent, `None` when malformed.
fn zero_if_absent<T: Default>(
    attribute: Option<&[u8]>,
    read: impl FnOnce(&[u8]) -> Option<T>,
) -> Option<T> {
    optional(attribute, read).map(Option::unwrap_or_default)
}

/// A big-endian u16 attribute of exactly 2 bytes.
fn be16(payload: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes(payload.try_into().ok()?))
}

/// A u8 attribute of exactly 1 byte.
fn u8_exact(payload: &[u8]) -> Option<u8> {
    match payload {
        [byte] => Some(*byte),
        _ => None,
    }
}

/// The value of an optional `NFTA_DATA_*` nest of a value (`cmp` data,
/// `bitwise` mask): empty when absent; a verdict or malformed value is
/// malformed.
fn value_data(attribute: Option<&[u8]>) -> Option<Vec<u8>> {
    Some(
        optional(attribute, data_value)?
            .flatten()
            .unwrap_or_default(),
    )
}

/// A verdict code, and the chain of a jump or goto.
type ImmediateVerdict = (i32, Option<Reference>);

/// The `NFTA_IMMEDIATE_DATA` nest: its value, and its verdict with the
/// chain a jump or goto refers to. As libnftnl: a verdict without a code,
/// an unknown code, a jump or goto without a chain, or a value that is
/// empty or longer than any register, is malformed.
fn immediate_data(bytes: &[u8]) -> Option<(Option<Vec<u8>>, Option<ImmediateVerdict>)> {
    let data = by_type::<{ NFTA_DATA_MAX + 1 }>(bytes)?;
    let value = match data[NFTA_DATA_VALUE] {
        Some(value) if !(1..=DATA_VALUE_MAXLEN).contains(&value.len()) => return None,
        value => value.map(<[u8]>::to_vec),
    };
    let Some(verdict) = data[NFTA_DATA_VERDICT] else {
        return Some((value, None));
    };
    let verdict = by_type::<{ NFTA_VERDICT_MAX + 1 }>(verdict)?;
    let code = be32(verdict[NFTA_VERDICT_CODE]?)? as i32;
    let chain = || string(verdict[NFTA_VERDICT_CHAIN]?);
    let target = match code {
        libc::NFT_JUMP => Some(Reference::Jump(chain()?)),
        libc::NFT_GOTO => Some(Reference::Goto(chain()?)),
        libc::NF_ACCEPT
        | libc::NF_DROP
        | libc::NF_QUEUE
        | libc::NFT_CONTINUE
        | libc::NFT_BREAK
        | libc::NFT_RETURN => None,
        _ => return None,
    };
    Some((value, Some((code, target))))
}

/// Test builds keep a copy of every message parsed on the thread while
/// [`tests::Recording`] is active, to parse it again with libnftnl.
#[cfg(test)]
fn record(bytes: &[u8]) {
    tests::RECORDED.with_borrow_mut(|recorded| {
        if let Some(recorded) = recorded {
            recorded.push(bytes.to_vec());
        }
    });
}

#[cfg(not(test))]
fn record(_: &[u8]) {}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;
    use std::collections::BTreeSet;
    use std::ffi::CStr;
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use super::*;
    use crate::kernel::ffi::{Request, nftnl_parsers as nftnl};
    use crate::kernel::{Session, SetChange, SetUpdate};
    use crate::netns;
    use crate::policy::{
        CompileOptions, Dialect, HostRule, Mode, Policy, PortSpec, Ports, Proto, ProxyOptions,
        Source, Target,
    };
    use crate::ruleset::{Element, Ruleset};
    use crate::testbed::Testbed;

    thread_local! {
        /// The messages parsed on this thread while a [`Recording`] lives.
        pub(super) static RECORDED: RefCell<Option<Vec<Vec<u8>>>> = const { RefCell::new(None) };
    }

    /// Keeps a copy of every message the parsers see on this thread.
    struct Recording;

    impl Recording {
        fn start() -> Recording {
            RECORDED.set(Some(Vec::new()));
            Recording
        }

        fn finish(self) -> Vec<Vec<u8>> {
            RECORDED.take().unwrap_or_default()
        }
    }

    impl Drop for Recording {
        fn drop(&mut self) {
            RECORDED.set(None);
        }
    }

    /// `message` in a buffer aligned for `nlmsghdr`, as libnftnl's parsers need it.
    fn aligned(message: &[u8]) -> Vec<u64> {
        let mut words = vec![0u64; message.len().div_ceil(8)];
        for (word, chunk) in words.iter_mut().zip(message.chunks(8)) {
            let mut bytes = [0u8; 8];
            bytes[..chunk.len()].copy_from_slice(chunk);
            *word = u64::from_ne_bytes(bytes);
        }
        words
    }

    fn bytes_of(words: &[u64], len: usize) -> &[u8] {
        assert!(len <= words.len() * 8);
        // SAFETY: `words` is a live buffer of `words.len() * 8` initialised
        // bytes, at least `len` (checked); u8 has no alignment requirement.
        unsafe { std::slice::from_raw_parts(words.as_ptr().cast::<u8>(), len) }
    }

    /// The nf_tables message type of a message (`NFT_MSG_*`).
    fn kind(message: &[u8]) -> i32 {
        i32::from(u16::from_ne_bytes([message[4], message[5]]) & 0xff)
    }

    /// Parse `message` with both parsers and assert they agree; add what
    /// the message showed to `seen`.
    fn cross_check(message: &[u8], seen: &mut BTreeSet<String>) {
        let words = aligned(message);
        let copy = bytes_of(&words, message.len());
        let kind = kind(message);
        let mut saw = |what: &str| {
            seen.insert(what.to_string());
        };
        match kind {
            libc::NFT_MSG_NEWGEN => {
                let parsed = parse_generation(message);
                assert_eq!(parsed, nftnl::parse_generation(copy));
                assert!(parsed.is_some());
                saw("generation");
            }
            libc::NFT_MSG_NEWTABLE | libc::NFT_MSG_DELTABLE => {
                let parsed = parse_table(message).expect("a table");
                assert_eq!(Some(&parsed), nftnl::parse_table(copy).as_ref());
                if !parsed.userdata.is_empty() {
                    saw("table with userdata");
                }
                saw("table");
            }
            libc::NFT_MSG_NEWCHAIN | libc::NFT_MSG_DELCHAIN => {
                let parsed = parse_chain(message).expect("a chain");
                assert_eq!(Some(&parsed), nftnl::parse_chain(copy).as_ref());
                saw(if parsed.hook.is_some() {
                    "base chain"
                } else {
                    "regular chain"
                });
                if parsed.priority.is_some_and(|p| p < 0) {
                    saw("negative priority");
                }
                if !parsed.userdata.is_empty() {
                    saw("chain with userdata");
                }
                if kind == libc::NFT_MSG_DELCHAIN {
                    saw("deleted chain");
                }
            }
            libc::NFT_MSG_NEWRULE | libc::NFT_MSG_DELRULE => {
                let parsed = parse_rule(message).expect("a rule");
                assert_eq!(Some(&parsed), nftnl::parse_rule(copy).as_ref());
                saw(if parsed.userdata.is_empty() {
                    "rule without userdata"
                } else {
                    "rule with userdata"
                });
                if kind == libc::NFT_MSG_DELRULE {
                    saw("deleted rule");
                }
                for expression in &parsed.expressions {
                    saw(&format!("expression {}", expression.name));
                    match &expression.data {
                        ExprData::Lookup { flags, .. } if flags & 1 != 0 => saw("inverted lookup"),
                        ExprData::Log { level: Some(_), .. } => saw("syslog"),
                        ExprData::Log { group: Some(_), .. } => saw("nflog"),
                        ExprData::Meta { sreg: Some(_), .. } => saw("meta set"),
                        ExprData::Ct { sreg: Some(_), .. } => saw("ct set"),
                        ExprData::Ct {
                            direction: Some(_), ..
                        } => saw("ct direction"),
                        ExprData::Payload { sreg: Some(_), .. } => saw("payload write"),
                        ExprData::Reject { code: Some(_), .. } => saw("reject code"),
                        ExprData::Immediate { value: Some(_), .. } => saw("immediate value"),
                        _ => {}
                    }
                    match (&expression.counter, &expression.reference) {
                        (Some((0, 0)), _) => saw("zero counter"),
                        (Some(_), _) => saw("counter"),
                        (_, Some(Reference::Set(_))) => saw("lookup"),
                        (_, Some(Reference::Jump(_))) => saw("jump"),
                        (_, Some(Reference::Goto(_))) => saw("goto"),
                        (None, None) => {}
                    }
                }
            }
            libc::NFT_MSG_NEWSET | libc::NFT_MSG_DELSET => {
                let parsed = parse_set(message).expect("a set");
                assert_eq!(Some(&parsed), nftnl::parse_set(copy).as_ref());
                for (flag, what) in [
                    (libc::NFT_SET_INTERVAL as u32, "interval set"),
                    (crate::kernel::ffi::NFT_SET_CONCAT, "concatenated set"),
                    (libc::NFT_SET_TIMEOUT as u32, "timeout set"),
                    (libc::NFT_SET_ANONYMOUS as u32, "anonymous set"),
                ] {
                    if parsed.flags & flag != 0 {
                        saw(what);
                    }
                }
                if kind == libc::NFT_MSG_DELSET {
                    saw("deleted set");
                }
            }
            libc::NFT_MSG_NEWSETELEM | libc::NFT_MSG_DELSETELEM => {
                let parsed = parse_elements(message).expect("elements");
                assert_eq!(Some(&parsed), nftnl::parse_elements(copy).as_ref());
                for element in &parsed.1 {
                    saw("element");
                    if element.interval_end {
                        saw("interval end");
                    }
                    if element.key_end.is_some() {
                        saw("range end");
                    }
                    if element.timeout_ms.is_some() {
                        saw("timeout");
                    }
                    if element.expiration_ms.is_some() {
                        saw("expiration");
                    }
                }
            }
            other => panic!("unexpected message type {other}"),
        }
    }

    fn net_rule(net: &str, ports: Ports) -> HostRule {
        HostRule {
            target: Target::Net(net.parse().unwrap()),
            ports,
            sources: [Source::AllowedHosts].into(),
            entry: net.to_string(),
        }
    }

    /// A limited policy with every kind of set the compiler makes
    /// (interval, concatenated interval, concatenated, timeout) and the
    /// DNS proxy's chains.
    fn ruleset(nets: &[&str]) -> Ruleset {
        let https = Ports::Only(
            [PortSpec {
                proto: Proto::Tcp,
                port: 443,
            }]
            .into(),
        );
        let mut rules: Vec<HostRule> = nets.iter().map(|n| net_rule(n, Ports::Any)).collect();
        rules.push(net_rule("203.0.113.0/24", https.clone()));
        rules.push(net_rule("2001:db8:5::/48", https));
        let policy = Policy {
            mode: Mode::Limited,
            dialect: Dialect::Limited,
            rules,
            blocklist: vec![crate::policy::BlockEntry {
                net: "169.254.0.0/16".parse().unwrap(),
                reason: "link-local".into(),
            }],
            warnings: vec![],
        };
        let options = CompileOptions {
            resolvers: vec![
                "192.0.2.53".parse().unwrap(),
                "2001:db8::53".parse().unwrap(),
            ],
            nflog_group: 4711,
            proxy: Some(ProxyOptions {
                port: 5353,
                mark: 0x4e4c,
                upstreams: vec!["192.0.2.54:53".parse().unwrap()],
                zone: 7,
            }),
        };
        crate::ruleset::compile(&policy, &options)
    }

    /// A table the compiler would not make, written by nft: gotos, counters
    /// with counts, a rule without user data, a negative base chain
    /// priority, elements with an expiration, a table comment, an inverted
    /// lookup, a syslog log, meta and ct set, a ct load with a direction,
    /// and a payload write with a checksum update.
    const OTHER_TABLE: &str = r#"
table inet other {
    comment "not netleash's"
    set ranges {
        type ipv4_addr
        flags interval
        elements = { 10.0.0.0/8, 192.0.2.1, 198.51.100.0-198.51.100.99 }
    }
    set services {
        type ipv4_addr . inet_service
        flags interval
        elements = { 10.0.0.0/8 . 80-90, 192.0.2.1 . 443 }
    }
    set learned {
        type ipv4_addr
        flags timeout
        elements = { 192.0.2.9 timeout 1h expires 30m, 192.0.2.10 }
    }
    chain target {
        counter packets 7 bytes 420 accept
    }
    chain entry {
        type filter hook output priority -5; policy accept;
        ip daddr @ranges counter packets 1 bytes 60 goto target
        ip daddr . tcp dport @services jump target comment "with user data"
        ip daddr { 192.0.2.77, 192.0.2.78 } drop
        ip saddr != @ranges log prefix "other " level warn flags all drop
        meta mark set 0x1
        ct mark set 0x2
        ct original ip saddr 10.0.0.1 accept
        tcp dport 80 tcp dport set 8080
        return
    }
}
"#;

    fn nft(namespace: &str, script: &str) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", namespace, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("run nft");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success(), "nft -f failed");
    }

    /// Every message of a dump of `request` in `table`, cross-checked.
    fn dump(
        session: &mut Session,
        request: Request<'_>,
        table: &CStr,
        seen: &mut BTreeSet<String>,
    ) -> usize {
        let mut count = 0;
        let answer = session
            .netlink
            .dump(request, table, &mut |message| {
                cross_check(message, seen);
                assert_cuts_are_malformed(message);
                count += 1;
                Ok(())
            })
            .unwrap();
        answer.expect("the dump succeeds");
        count
    }

    /// A netlink attribute, padded to `NLA_ALIGNTO`.
    fn attribute(kind: usize, payload: &[u8]) -> Vec<u8> {
        let len = u16::try_from(NLA_HDRLEN + payload.len()).unwrap();
        let mut bytes = [
            &len.to_ne_bytes()[..],
            &(kind as u16).to_ne_bytes(),
            payload,
        ]
        .concat();
        bytes.resize(bytes.len().next_multiple_of(NLA_ALIGNTO), 0);
        bytes
    }

    fn nested(kind: usize, children: &[Vec<u8>]) -> Vec<u8> {
        attribute(kind | libc::NLA_F_NESTED as usize, &children.concat())
    }

    fn text(kind: usize, value: &str) -> Vec<u8> {
        attribute(kind, &[value.as_bytes(), &[0]].concat())
    }

    /// An nf_tables message of type `kind` (family inet) with `attributes`,
    /// and where each of its top-level attributes ends.
    fn nft_message(kind: i32, attributes: &[Vec<u8>]) -> (Vec<u8>, Vec<usize>) {
        let mut ends = vec![NLMSG_HDRLEN + NFGENMSG_LEN];
        for attribute in attributes {
            ends.push(ends.last().unwrap() + attribute.len());
        }
        let len = *ends.last().unwrap() as u32;
        let kind = (libc::NFNL_SUBSYS_NFTABLES << 8 | kind) as u16;
        let header = [
            &len.to_ne_bytes()[..],
            &kind.to_ne_bytes(),
            &0u16.to_ne_bytes(),
            &1u32.to_ne_bytes(),
            &0u32.to_ne_bytes(),
            &[libc::NFPROTO_INET as u8, 0, 0, 0],
        ]
        .concat();
        ([header, attributes.concat()].concat(), ends)
    }

    fn expression(name: &str, data: &[Vec<u8>]) -> Vec<u8> {
        nested(
            NFTA_LIST_ELEM,
            &[text(NFTA_EXPR_NAME, name), nested(NFTA_EXPR_DATA, data)],
        )
    }

    fn verdict(code: i32, chain: &str) -> Vec<u8> {
        let verdict = nested(
            NFTA_DATA_VERDICT,
            &[
                attribute(NFTA_VERDICT_CODE, &code.to_be_bytes()),
                text(NFTA_VERDICT_CHAIN, chain),
            ],
        );
        expression(
            "immediate",
            &[
                attribute(1, &0u32.to_be_bytes()),
                nested(NFTA_IMMEDIATE_DATA, &[verdict]),
            ],
        )
    }

    /// A rule with a counter, a lookup, a payload load, a jump, a goto and user data.
    fn rule_message() -> (Vec<u8>, Vec<usize>) {
        let expressions = [
            expression(
                "payload",
                &[attribute(1, &1u32.to_be_bytes()), attribute(2, &[0; 4])],
            ),
            expression(
                "lookup",
                &[
                    text(NFTA_LOOKUP_SET, "allow_v4.g1"),
                    attribute(2, &1u32.to_be_bytes()),
                ],
            ),
            expression(
                "counter",
                &[
                    attribute(NFTA_COUNTER_BYTES, &180u64.to_be_bytes()),
                    attribute(NFTA_COUNTER_PACKETS, &3u64.to_be_bytes()),
                ],
            ),
            verdict(libc::NFT_JUMP, "deny.g1"),
            verdict(libc::NFT_GOTO, "elsewhere"),
            verdict(libc::NF_ACCEPT, ""),
        ];
        nft_message(
            libc::NFT_MSG_NEWRULE,
            &[
                text(NFTA_RULE_TABLE, "netleash"),
                text(NFTA_RULE_CHAIN, "egress.g1"),
                attribute(NFTA_RULE_HANDLE, &42u64.to_be_bytes()),
                nested(NFTA_RULE_EXPRESSIONS, &expressions),
                attribute(NFTA_RULE_USERDATA, &[0, 3, b'i', b'd', 0]),
            ],
        )
    }

    /// Elements with a range end, an interval end flag, a timeout and an expiration.
    fn elements_message() -> (Vec<u8>, Vec<usize>) {
        let key = |kind: usize, value: &[u8]| nested(kind, &[attribute(NFTA_DATA_VALUE, value)]);
        let elements = [
            nested(
                NFTA_LIST_ELEM,
                &[
                    key(NFTA_SET_ELEM_KEY, &[192, 0, 2, 0, 6, 0, 0, 0, 1, 187, 0, 0]),
                    key(
                        NFTA_SET_ELEM_KEY_END,
                        &[192, 0, 2, 255, 6, 0, 0, 0, 1, 187, 0, 0],
                    ),
                ],
            ),
            nested(
                NFTA_LIST_ELEM,
                &[
                    key(NFTA_SET_ELEM_KEY, &[198, 51, 100, 0]),
                    attribute(
                        NFTA_SET_ELEM_FLAGS,
                        &(libc::NFT_SET_ELEM_INTERVAL_END as u32).to_be_bytes(),
                    ),
                ],
            ),
            nested(
                NFTA_LIST_ELEM,
                &[
                    key(NFTA_SET_ELEM_KEY, &[192, 0, 2, 7]),
                    attribute(NFTA_SET_ELEM_TIMEOUT, &300_000u64.to_be_bytes()),
                    attribute(NFTA_SET_ELEM_EXPIRATION, &299_000u64.to_be_bytes()),
                ],
            ),
        ];
        nft_message(
            libc::NFT_MSG_NEWSETELEM,
            &[
                text(1, "netleash"),
                text(NFTA_SET_ELEM_LIST_SET, "dns_v4_ports"),
                nested(NFTA_SET_ELEM_LIST_ELEMENTS, &elements),
            ],
        )
    }

    #[test]
    fn a_rule_message_gives_every_field_the_read_back_uses() {
        let (message, _) = rule_message();
        let parsed = parse_rule(&message).expect("a rule");
        let plain = |name: &str, data| ParsedExpr {
            name: name.into(),
            counter: None,
            reference: None,
            data,
        };
        let immediate = |code, reference| ParsedExpr {
            reference,
            ..plain(
                "immediate",
                ExprData::Immediate {
                    dreg: 0,
                    value: None,
                    verdict: Some(code),
                },
            )
        };
        let expected = ParsedRule {
            table: "netleash".into(),
            chain: "egress.g1".into(),
            family: libc::NFPROTO_INET as u32,
            handle: 42,
            userdata: vec![0, 3, b'i', b'd', 0],
            expressions: vec![
                plain(
                    "payload",
                    ExprData::Payload {
                        base: 0,
                        offset: 0,
                        len: 0,
                        dreg: Some(1),
                        sreg: None,
                        csum_type: 0,
                        csum_offset: 0,
                        csum_flags: 0,
                    },
                ),
                ParsedExpr {
                    reference: Some(Reference::Set("allow_v4.g1".into())),
                    ..plain(
                        "lookup",
                        ExprData::Lookup {
                            sreg: 1,
                            dreg: None,
                            flags: 0,
                            anonymous: None,
                        },
                    )
                },
                ParsedExpr {
                    counter: Some((3, 180)),
                    ..plain("counter", ExprData::Opaque)
                },
                immediate(libc::NFT_JUMP, Some(Reference::Jump("deny.g1".into()))),
                immediate(libc::NFT_GOTO, Some(Reference::Goto("elsewhere".into()))),
                immediate(libc::NF_ACCEPT, None),
            ],
        };
        assert_eq!(parsed, expected);
        // libnftnl reads the hand-made message the same way.
        let mut seen = BTreeSet::new();
        cross_check(&message, &mut seen);
        assert!(
            seen.contains("goto") && seen.contains("counter"),
            "{seen:?}"
        );
    }

    /// A rule message holding `expressions`.
    fn rule_with(expressions: &[Vec<u8>]) -> Vec<u8> {
        nft_message(
            libc::NFT_MSG_NEWRULE,
            &[
                text(NFTA_RULE_TABLE, "netleash"),
                text(NFTA_RULE_CHAIN, "egress.g1"),
                attribute(NFTA_RULE_HANDLE, &7u64.to_be_bytes()),
                nested(NFTA_RULE_EXPRESSIONS, expressions),
            ],
        )
        .0
    }

    fn be32_attribute(kind: usize, value: u32) -> Vec<u8> {
        attribute(kind, &value.to_be_bytes())
    }

    fn value_nest(kind: usize, value: &[u8]) -> Vec<u8> {
        nested(kind, &[attribute(NFTA_DATA_VALUE, value)])
    }

    /// Every attribute of every kind of expression netleash writes, and of
    /// the kinds nft writes when it changes them (a payload write, meta and
    /// ct set, syslog), parsed as the kernel dumps them, and as libnftnl
    /// parses them.
    #[test]
    fn every_attribute_of_every_expression_netleash_writes_is_parsed() {
        let reg1 = libc::NFT_REG_1 as u32;
        let reg32_4 = libc::NFT_REG32_00 as u32 + 4;
        let cases: Vec<(Vec<u8>, ExprData, Option<Reference>)> = vec![
            (
                expression(
                    "meta",
                    &[
                        be32_attribute(NFTA_META_KEY, libc::NFT_META_L4PROTO as u32),
                        be32_attribute(NFTA_META_DREG, reg32_4),
                    ],
                ),
                ExprData::Meta {
                    key: libc::NFT_META_L4PROTO as u32,
                    dreg: Some(reg32_4),
                    sreg: None,
                },
                None,
            ),
            (
                expression(
                    "meta",
                    &[
                        be32_attribute(NFTA_META_KEY, libc::NFT_META_MARK as u32),
                        be32_attribute(NFTA_META_SREG, reg1),
                    ],
                ),
                ExprData::Meta {
                    key: libc::NFT_META_MARK as u32,
                    dreg: None,
                    sreg: Some(reg1),
                },
                None,
            ),
            (
                expression(
                    "payload",
                    &[
                        be32_attribute(NFTA_PAYLOAD_DREG, reg1),
                        be32_attribute(NFTA_PAYLOAD_BASE, 1),
                        be32_attribute(NFTA_PAYLOAD_OFFSET, 16),
                        be32_attribute(NFTA_PAYLOAD_LEN, 4),
                    ],
                ),
                ExprData::Payload {
                    base: 1,
                    offset: 16,
                    len: 4,
                    dreg: Some(reg1),
                    sreg: None,
                    csum_type: 0,
                    csum_offset: 0,
                    csum_flags: 0,
                },
                None,
            ),
            (
                expression(
                    "payload",
                    &[
                        be32_attribute(NFTA_PAYLOAD_SREG, reg1),
                        be32_attribute(NFTA_PAYLOAD_BASE, 2),
                        be32_attribute(NFTA_PAYLOAD_OFFSET, 2),
                        be32_attribute(NFTA_PAYLOAD_LEN, 2),
                        be32_attribute(NFTA_PAYLOAD_CSUM_TYPE, 1),
                        be32_attribute(NFTA_PAYLOAD_CSUM_OFFSET, 16),
                        be32_attribute(NFTA_PAYLOAD_CSUM_FLAGS, 1),
                    ],
                ),
                ExprData::Payload {
                    base: 2,
                    offset: 2,
                    len: 2,
                    dreg: None,
                    sreg: Some(reg1),
                    csum_type: 1,
                    csum_offset: 16,
                    csum_flags: 1,
                },
                None,
            ),
            (
                expression(
                    "cmp",
                    &[
                        be32_attribute(NFTA_CMP_SREG, reg1),
                        be32_attribute(NFTA_CMP_OP, libc::NFT_CMP_NEQ as u32),
                        value_nest(NFTA_CMP_DATA, &[1, 187]),
                    ],
                ),
                ExprData::Cmp {
                    sreg: reg1,
                    op: libc::NFT_CMP_NEQ as u32,
                    data: vec![1, 187],
                },
                None,
            ),
            (
                expression(
                    "bitwise",
                    &[
                        be32_attribute(NFTA_BITWISE_SREG, reg1),
                        be32_attribute(NFTA_BITWISE_DREG, reg1),
                        be32_attribute(NFTA_BITWISE_LEN, 4),
                        be32_attribute(NFTA_BITWISE_OP, 0),
                        value_nest(NFTA_BITWISE_MASK, &[6, 0, 0, 0]),
                        value_nest(NFTA_BITWISE_XOR, &[0, 0, 0, 0]),
                    ],
                ),
                ExprData::Bitwise(Box::new(BitwiseData {
                    sreg: reg1,
                    dreg: reg1,
                    len: 4,
                    op: 0,
                    mask: vec![6, 0, 0, 0],
                    xor: vec![0; 4],
                    data: vec![],
                    sreg2: None,
                })),
                None,
            ),
            (
                expression(
                    "ct",
                    &[
                        be32_attribute(NFTA_CT_KEY, libc::NFT_CT_SRC as u32),
                        be32_attribute(NFTA_CT_DREG, reg1),
                        attribute(NFTA_CT_DIRECTION, &[1]),
                    ],
                ),
                ExprData::Ct {
                    key: libc::NFT_CT_SRC as u32,
                    dreg: Some(reg1),
                    sreg: None,
                    direction: Some(1),
                },
                None,
            ),
            (
                expression(
                    "ct",
                    &[
                        be32_attribute(NFTA_CT_KEY, libc::NFT_CT_ZONE as u32),
                        be32_attribute(NFTA_CT_SREG, reg1),
                    ],
                ),
                ExprData::Ct {
                    key: libc::NFT_CT_ZONE as u32,
                    dreg: None,
                    sreg: Some(reg1),
                    direction: None,
                },
                None,
            ),
            (
                expression(
                    "lookup",
                    &[
                        text(NFTA_LOOKUP_SET, "allow_v4.g1"),
                        be32_attribute(NFTA_LOOKUP_SREG, reg1),
                        be32_attribute(NFTA_LOOKUP_FLAGS, libc::NFT_LOOKUP_F_INV as u32),
                    ],
                ),
                ExprData::Lookup {
                    sreg: reg1,
                    dreg: None,
                    flags: libc::NFT_LOOKUP_F_INV as u32,
                    anonymous: None,
                },
                Some(Reference::Set("allow_v4.g1".into())),
            ),
            (
                expression(
                    "log",
                    &[
                        text(NFTA_LOG_PREFIX, "netleash deny "),
                        attribute(NFTA_LOG_GROUP, &4711u16.to_be_bytes()),
                        be32_attribute(NFTA_LOG_SNAPLEN, 64),
                        attribute(NFTA_LOG_QTHRESHOLD, &2u16.to_be_bytes()),
                    ],
                ),
                ExprData::Log {
                    group: Some(4711),
                    prefix: Some("netleash deny ".into()),
                    snaplen: 64,
                    qthreshold: 2,
                    level: None,
                    flags: 0,
                },
                None,
            ),
            (
                expression(
                    "log",
                    &[
                        be32_attribute(NFTA_LOG_LEVEL, 4),
                        be32_attribute(NFTA_LOG_FLAGS, 1),
                    ],
                ),
                ExprData::Log {
                    group: None,
                    prefix: None,
                    snaplen: 0,
                    qthreshold: 0,
                    level: Some(4),
                    flags: 1,
                },
                None,
            ),
            (
                expression(
                    "reject",
                    &[
                        be32_attribute(NFTA_REJECT_TYPE, libc::NFT_REJECT_ICMPX_UNREACH as u32),
                        attribute(NFTA_REJECT_ICMP_CODE, &[3]),
                    ],
                ),
                ExprData::Reject {
                    kind: libc::NFT_REJECT_ICMPX_UNREACH as u32,
                    code: Some(3),
                },
                None,
            ),
            (
                expression(
                    "reject",
                    &[be32_attribute(
                        NFTA_REJECT_TYPE,
                        libc::NFT_REJECT_TCP_RST as u32,
                    )],
                ),
                ExprData::Reject {
                    kind: libc::NFT_REJECT_TCP_RST as u32,
                    code: None,
                },
                None,
            ),
            (
                expression(
                    "immediate",
                    &[
                        be32_attribute(NFTA_IMMEDIATE_DREG, reg1),
                        value_nest(NFTA_IMMEDIATE_DATA, &[4, 29]),
                    ],
                ),
                ExprData::Immediate {
                    dreg: reg1,
                    value: Some(vec![4, 29]),
                    verdict: None,
                },
                None,
            ),
            (
                verdict(libc::NF_DROP, ""),
                ExprData::Immediate {
                    dreg: 0,
                    value: None,
                    verdict: Some(libc::NF_DROP),
                },
                None,
            ),
            (
                expression(
                    "redir",
                    &[
                        be32_attribute(NFTA_REDIR_REG_PROTO_MIN, reg1),
                        be32_attribute(NFTA_REDIR_REG_PROTO_MAX, reg1),
                        be32_attribute(NFTA_REDIR_FLAGS, 2),
                    ],
                ),
                ExprData::Redir {
                    proto_min: Some(reg1),
                    proto_max: Some(reg1),
                    flags: 2,
                },
                None,
            ),
            // An expression netleash never writes: its name, nothing more.
            (
                expression("fib", &[be32_attribute(1, reg1)]),
                ExprData::Opaque,
                None,
            ),
        ];
        let messages: Vec<&Vec<u8>> = cases.iter().map(|(bytes, _, _)| bytes).collect();
        for (bytes, data, reference) in &cases {
            let name = string(&bytes[8..]).unwrap();
            let message = rule_with(std::slice::from_ref(bytes));
            let parsed = parse_rule(&message).expect("a rule");
            let expected = ParsedExpr {
                name,
                counter: None,
                reference: reference.clone(),
                data: data.clone(),
            };
            assert_eq!(parsed.expressions, [expected]);
            // libnftnl reads the same.
            cross_check(&message, &mut BTreeSet::new());
        }
        // All in one rule, in order.
        let all: Vec<Vec<u8>> = messages.into_iter().cloned().collect();
        let parsed = parse_rule(&rule_with(&all)).expect("a rule");
        assert_eq!(parsed.expressions.len(), cases.len());
    }

    /// An attribute of the wrong size, or a verdict of an unknown code, is malformed.
    #[test]
    fn expression_attributes_of_the_wrong_size_are_malformed() {
        let reg1 = libc::NFT_REG_1 as u32;
        let malformed = [
            expression("cmp", &[attribute(NFTA_CMP_OP, &[0, 0])]),
            expression("cmp", &[value_nest(NFTA_CMP_DATA, &[0; 65])]),
            expression("ct", &[attribute(NFTA_CT_DIRECTION, &[0, 0, 0, 1])]),
            expression("log", &[be32_attribute(NFTA_LOG_GROUP, 4711)]),
            expression("reject", &[be32_attribute(NFTA_REJECT_ICMP_CODE, 3)]),
            expression("lookup", &[attribute(NFTA_LOOKUP_FLAGS, &[1])]),
            expression("meta", &[attribute(NFTA_META_KEY, &[0; 8])]),
            expression(
                "immediate",
                &[nested(
                    NFTA_IMMEDIATE_DATA,
                    &[nested(
                        NFTA_DATA_VERDICT,
                        &[be32_attribute(NFTA_VERDICT_CODE, 7)],
                    )],
                )],
            ),
            expression("redir", &[attribute(NFTA_REDIR_FLAGS, &[2])]),
            expression(
                "payload",
                &[attribute(NFTA_PAYLOAD_DREG, &reg1.to_be_bytes()[..2])],
            ),
        ];
        // (libnftnl exits the process on these: "nf_tables kernel ABI is broken".)
        for bytes in &malformed {
            let message = rule_with(std::slice::from_ref(bytes));
            assert_eq!(parse_rule(&message), None, "{bytes:?}");
        }
    }

    #[test]
    fn an_element_message_gives_every_field_of_the_elements() {
        let (message, _) = elements_message();
        let (set, elements) = parse_elements(&message).expect("elements");
        assert_eq!(set, "dns_v4_ports");
        let element = |key: &[u8]| RawElement {
            key: key.to_vec(),
            key_end: None,
            interval_end: false,
            timeout_ms: None,
            expiration_ms: None,
        };
        let expected = vec![
            RawElement {
                key_end: Some(vec![192, 0, 2, 255, 6, 0, 0, 0, 1, 187, 0, 0]),
                ..element(&[192, 0, 2, 0, 6, 0, 0, 0, 1, 187, 0, 0])
            },
            RawElement {
                interval_end: true,
                ..element(&[198, 51, 100, 0])
            },
            RawElement {
                timeout_ms: Some(300_000),
                expiration_ms: Some(299_000),
                ..element(&[192, 0, 2, 7])
            },
        ];
        assert_eq!(elements, expected);
        let mut seen = BTreeSet::new();
        cross_check(&message, &mut seen);
        assert!(seen.contains("range end") && seen.contains("expiration"));
    }

    /// `message` cut to `len` bytes, its `nlmsg_len` saying so.
    fn cut(message: &[u8], len: usize) -> Vec<u8> {
        let mut cut = message[..len].to_vec();
        if let Some(header) = cut.first_chunk_mut::<4>() {
            *header = (len as u32).to_ne_bytes();
        }
        cut
    }

    /// The lengths a message with top-level attributes ending at `ends` can
    /// be cut to and still be whole: right after the `nfgenmsg`, or after an
    /// attribute, with or without (some of) its padding.
    fn whole_cuts(message: &[u8], ends: &[usize]) -> BTreeSet<usize> {
        let mut cuts = BTreeSet::from([ends[0]]);
        for pair in ends.windows(2) {
            let len = usize::from(u16::from_ne_bytes([message[pair[0]], message[pair[0] + 1]]));
            cuts.extend(pair[0] + len..=pair[1]);
        }
        cuts
    }

    /// Where the top-level attributes of a well-formed message end (padded),
    /// starting with the end of its `nfgenmsg`.
    fn attribute_ends(message: &[u8]) -> Vec<usize> {
        let mut ends = vec![NLMSG_HDRLEN + NFGENMSG_LEN];
        while *ends.last().unwrap() < message.len() {
            let at = *ends.last().unwrap();
            let len = usize::from(u16::from_ne_bytes([message[at], message[at + 1]]));
            ends.push((at + len).next_multiple_of(NLA_ALIGNTO).min(message.len()));
        }
        ends
    }

    /// Every cut of `message` (a real kernel message) parses to `None`,
    /// unless it falls between two top-level attributes.
    fn assert_cuts_are_malformed(message: &[u8]) {
        let whole = whole_cuts(message, &attribute_ends(message));
        for len in 0..message.len() {
            let cut = cut(message, len);
            let parsed = match kind(message) {
                // Without its id attribute a generation message is malformed too.
                libc::NFT_MSG_NEWGEN => {
                    assert!(parse_generation(&cut).is_none() || whole.contains(&len));
                    continue;
                }
                libc::NFT_MSG_NEWTABLE | libc::NFT_MSG_DELTABLE => parse_table(&cut).is_some(),
                libc::NFT_MSG_NEWCHAIN | libc::NFT_MSG_DELCHAIN => parse_chain(&cut).is_some(),
                libc::NFT_MSG_NEWRULE | libc::NFT_MSG_DELRULE => parse_rule(&cut).is_some(),
                libc::NFT_MSG_NEWSET | libc::NFT_MSG_DELSET => parse_set(&cut).is_some(),
                _ => parse_elements(&cut).is_some(),
            };
            assert_eq!(
                parsed,
                whole.contains(&len),
                "message type {} cut at {len}",
                kind(message)
            );
        }
    }

    #[test]
    fn a_message_cut_inside_an_attribute_is_malformed() {
        let (rule, rule_ends) = rule_message();
        let (elements, element_ends) = elements_message();
        let rule_cuts = whole_cuts(&rule, &rule_ends);
        for len in 0..rule.len() {
            let parsed = parse_rule(&cut(&rule, len));
            // Cut between two attributes, the message is whole (with fewer attributes).
            assert_eq!(
                parsed.is_some(),
                rule_cuts.contains(&len),
                "rule cut at {len}"
            );
        }
        let element_cuts = whole_cuts(&elements, &element_ends);
        for len in 0..elements.len() {
            let parsed = parse_elements(&cut(&elements, len));
            let whole = element_cuts.contains(&len);
            assert_eq!(parsed.is_some(), whole, "elements cut at {len}");
        }
        // A buffer shorter than the message's own length.
        assert_eq!(parse_rule(&rule[..rule.len() - 1]), None);
        assert_eq!(parse_elements(&elements[..elements.len() - 4]), None);
    }

    #[test]
    fn attribute_lengths_that_do_not_fit_are_malformed() {
        let (rule, starts) = rule_message();
        let with_len = |at: usize, len: u16| {
            let mut message = rule.clone();
            message[at..at + 2].copy_from_slice(&len.to_ne_bytes());
            message
        };
        assert!(parse_rule(&rule).is_some());
        // The first expression's list element: longer than the expression
        // list, and shorter than its own header.
        let first_expression = starts[3] + NLA_HDRLEN;
        let element_len = u16::from_ne_bytes([rule[first_expression], rule[first_expression + 1]]);
        assert_eq!(parse_rule(&with_len(first_expression, 2000)), None);
        assert_eq!(parse_rule(&with_len(first_expression, 2)), None);
        // Its name attribute, past the element's end.
        assert_eq!(
            parse_rule(&with_len(first_expression + 4, element_len)),
            None
        );
        // The handle attribute with a payload of 4 bytes instead of 8.
        assert_eq!(parse_rule(&with_len(starts[2], 8)), None);
        // A string attribute with no payload.
        assert_eq!(parse_rule(&with_len(starts[0], 4)), None);
    }

    #[test]
    fn kernel_messages_parse_as_libnftnl_parses_them() {
        let bed = Testbed::new().expect("a testbed (needs root)");
        let target = netns::Target::Name(bed.sandbox().to_string());
        let mut session = Session::open(&target).unwrap();
        let first = ruleset(&["198.51.100.0/24", "2001:db8:1::/48"]);
        let second = ruleset(&["198.51.100.0/25", "198.51.100.200/29", "2001:db8:2::/48"]);

        // Everything the applies, the set updates and the status parse
        // (dumps and echoes of creations, stages and swaps).
        let recording = Recording::start();
        session.apply(&first).unwrap();
        let learned = |set: &str, element: Element| SetUpdate {
            set: set.into(),
            change: SetChange::Add {
                elements: vec![element],
                timeout: Some(Duration::from_secs(300)),
            },
        };
        session
            .update_elements(&[
                learned("dns_v4", Element::Addr("192.0.2.7/32".parse().unwrap())),
                learned(
                    "dns_v4_ports",
                    Element::AddrProtoPort("192.0.2.8/32".parse().unwrap(), Proto::Tcp, 443),
                ),
            ])
            .unwrap();
        session.apply(&second).unwrap();
        session.apply(&first).unwrap();
        session.status().unwrap().expect("the table is there");
        let recorded = recording.finish();
        let mut seen = BTreeSet::new();
        for message in &recorded {
            cross_check(message, &mut seen);
            assert_cuts_are_malformed(message);
        }
        assert!(recorded.len() > 50, "{} messages", recorded.len());

        // What the compiler never makes, read by dumps.
        nft(bed.sandbox(), OTHER_TABLE);
        let other = c"other";
        assert_eq!(dump(&mut session, Request::Table, other, &mut seen), 1);
        assert!(dump(&mut session, Request::Chains, other, &mut seen) >= 2);
        assert!(dump(&mut session, Request::Rules, other, &mut seen) >= 5);
        assert!(dump(&mut session, Request::Sets, other, &mut seen) >= 3);
        for set in [c"ranges", c"services", c"learned"] {
            assert!(dump(&mut session, Request::Elements(set), other, &mut seen) >= 1);
        }

        let expected = [
            "generation",
            "table",
            "table with userdata",
            "base chain",
            "regular chain",
            "negative priority",
            "chain with userdata",
            "rule with userdata",
            "rule without userdata",
            "deleted rule",
            "counter",
            "zero counter",
            "lookup",
            "jump",
            "goto",
            "inverted lookup",
            "syslog",
            "nflog",
            "meta set",
            "ct set",
            "ct direction",
            "payload write",
            "reject code",
            "immediate value",
            "expression meta",
            "expression payload",
            "expression cmp",
            "expression bitwise",
            "expression ct",
            "expression lookup",
            "expression counter",
            "expression log",
            "expression reject",
            "expression immediate",
            "expression redir",
            "interval set",
            "concatenated set",
            "timeout set",
            "anonymous set",
            "element",
            "interval end",
            "range end",
            "timeout",
            "expiration",
        ];
        let missing: Vec<_> = expected.iter().filter(|w| !seen.contains(**w)).collect();
        assert!(
            missing.is_empty(),
            "not covered: {missing:?}; seen: {seen:?}"
        );
        drop(session);
        bed.close().unwrap();
    }
}
