//! The ruleset model as nftnl batches: the transactions of the generation
//! swap (see `kernel::generation`), and the whole-table transactions for a
//! first apply and for a table in another shape.
//!
//! The kernel applies each transaction at commit or not at all.
//!
//! Each rule is first planned as a list of [`Expr`]s (the same list the
//! read-back compares against), laid out as nft 1.0.6 lays out the same rule
//! (checked with `nft --debug=netlink`).

use std::collections::BTreeMap;
use std::ffi::CString;

use nftnl::{MsgType, ProtoFamily};

use super::elements::{self, datatype};
use super::ffi::{self, BaseHook, ChainMsg, ElementOp, SetDefinition, SetMsg, TableMsg};
use super::generation::{self, Deletions, EntryRule, Naming, SetEdit, Swap};
use super::netlink::{Object, Transaction};
use super::rule_message::{
    ANONYMOUS_SET_FLAGS, ANONYMOUS_SET_NAME, KernelNames, References, RuleWriter,
};
use super::{Error, table_name};
use crate::ruleset::{
    Action, BaseChain, Family, Match, RejectKind, Rule, Ruleset, Set, TABLE_NAME,
};

/// `NFT_REG_1`: the 16-byte register most expressions use.
const REG_1: u32 = libc::NFT_REG_1 as u32;

/// The 32-bit register `n` (`NFT_REG32_00 + n`). Register 1 overlaps 32-bit
/// registers 0..=3, so a concatenation starting with an address in register 1
/// continues at 32-bit register 1 (after an IPv4 address) or 4 (after IPv6).
fn reg32(n: u32) -> u32 {
    libc::NFT_REG32_00 as u32 + n
}

/// `LOOPBACK_IFINDEX` (include/net/net_namespace.h): the loopback device is
/// always interface 1 in every network namespace, which is what nft resolves
/// `oif "lo"` to.
const LOOPBACK_IFINDEX: u32 = 1;

/// `ct state` bits (include/uapi/linux/netfilter/nf_conntrack_common.h).
const CT_STATE_ESTABLISHED: u32 = 1 << 1;
const CT_STATE_RELATED: u32 = 1 << 2;

/// `IPPROTO_ICMPV6`.
const IPPROTO_ICMPV6: u8 = 58;

/// Offsets of the IPv4 and IPv6 source and destination address in their
/// headers (RFC 791, RFC 8200).
const IPV4_SADDR_OFFSET: u32 = 12;
const IPV4_DADDR_OFFSET: u32 = 16;
const IPV6_SADDR_OFFSET: u32 = 8;
const IPV6_DADDR_OFFSET: u32 = 24;
/// Offsets of the source and destination port in TCP and UDP headers, and of
/// the type in ICMPv6.
const TH_SPORT_OFFSET: u32 = 0;
const TH_DPORT_OFFSET: u32 = 2;
const ICMPV6_TYPE_OFFSET: u32 = 0;

/// Keys of an anonymous set (`{ a, b, c }` in nft) a rule looks up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnonymousSet {
    pub key_type: u32,
    pub key_len: u32,
    pub keys: Vec<Vec<u8>>,
}

/// One nftables expression of a planned rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    Meta {
        key: u32,
        dreg: u32,
    },
    Payload {
        base: u32,
        offset: u32,
        len: u32,
        dreg: u32,
    },
    CmpEq(Vec<u8>),
    CmpNeq(Vec<u8>),
    Bitwise {
        mask: Vec<u8>,
        xor: Vec<u8>,
    },
    CtState,
    Lookup {
        set: String,
        sreg: u32,
    },
    LookupAnonymous(AnonymousSet),
    Counter,
    Log {
        group: u16,
        prefix: String,
    },
    Reject(RejectKind),
    Accept,
    Drop,
    Jump(String),
    /// Constant data loaded into a register (`immediate reg N DATA`).
    Immediate {
        dreg: u32,
        data: Vec<u8>,
    },
    /// `redir proto_min reg SREG`: the port comes from SREG.
    Redirect {
        sreg: u32,
    },
    /// `ct set KEY with reg SREG`.
    CtSet {
        key: u32,
        sreg: u32,
    },
}

impl Expr {
    /// The expression's name in the kernel, as the read-back reports it.
    pub fn kernel_name(&self) -> &'static str {
        match self {
            Expr::Meta { .. } => "meta",
            Expr::Payload { .. } => "payload",
            Expr::CmpEq(_) | Expr::CmpNeq(_) => "cmp",
            Expr::Bitwise { .. } => "bitwise",
            Expr::CtState => "ct",
            Expr::Lookup { .. } | Expr::LookupAnonymous(_) => "lookup",
            Expr::Counter => "counter",
            Expr::Log { .. } => "log",
            Expr::Reject(_) => "reject",
            Expr::Accept | Expr::Drop | Expr::Jump(_) | Expr::Immediate { .. } => "immediate",
            Expr::Redirect { .. } => "redir",
            Expr::CtSet { .. } => "ct",
        }
    }
}

fn nfproto(family: Family) -> u8 {
    match family {
        Family::V4 => libc::NFPROTO_IPV4 as u8,
        Family::V6 => libc::NFPROTO_IPV6 as u8,
    }
}

/// `meta nfproto ipv4|ipv6`: in an inet table, the address family guard nft
/// adds before any `ip`/`ip6` header access.
fn family_guard(family: Family, plan: &mut Vec<Expr>) {
    plan.push(Expr::Meta {
        key: libc::NFT_META_NFPROTO as u32,
        dreg: REG_1,
    });
    plan.push(Expr::CmpEq(vec![nfproto(family)]));
}

/// Which end of a packet an address or port match reads.
#[derive(Clone, Copy)]
enum Endpoint {
    Source,
    Destination,
}

fn load_daddr(family: Family, dreg: u32) -> Expr {
    load_addr(Endpoint::Destination, family, dreg)
}

fn load_addr(endpoint: Endpoint, family: Family, dreg: u32) -> Expr {
    let (offset, len) = match (endpoint, family) {
        (Endpoint::Source, Family::V4) => (IPV4_SADDR_OFFSET, 4),
        (Endpoint::Destination, Family::V4) => (IPV4_DADDR_OFFSET, 4),
        (Endpoint::Source, Family::V6) => (IPV6_SADDR_OFFSET, 16),
        (Endpoint::Destination, Family::V6) => (IPV6_DADDR_OFFSET, 16),
    };
    Expr::Payload {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset,
        len,
        dreg,
    }
}

/// `ADDR . meta l4proto . PORT @set` for one end of the packet: each field in
/// its own 32-bit registers, matching the key layout of the concatenated set
/// (an IPv4 address fills one register, an IPv6 address four).
fn plan_addr_proto_port_lookup(
    endpoint: Endpoint,
    family: Family,
    set: &str,
    plan: &mut Vec<Expr>,
) {
    family_guard(family, plan);
    let after_addr = match family {
        Family::V4 => 1,
        Family::V6 => 4,
    };
    let port_offset = match endpoint {
        Endpoint::Source => TH_SPORT_OFFSET,
        Endpoint::Destination => TH_DPORT_OFFSET,
    };
    plan.push(load_addr(endpoint, family, REG_1));
    plan.push(Expr::Meta {
        key: libc::NFT_META_L4PROTO as u32,
        dreg: reg32(after_addr),
    });
    plan.push(load_transport(port_offset, 2, reg32(after_addr + 1)));
    plan.push(Expr::Lookup {
        set: set.to_string(),
        sreg: REG_1,
    });
}

fn load_transport(offset: u32, len: u32, dreg: u32) -> Expr {
    Expr::Payload {
        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
        offset,
        len,
        dreg,
    }
}

/// Compare register 1 with one key, or look it up in an anonymous set of several.
fn one_of(key_type: u32, key_len: u32, mut keys: Vec<Vec<u8>>, plan: &mut Vec<Expr>) {
    keys.sort();
    keys.dedup();
    if keys.len() == 1 {
        plan.push(Expr::CmpEq(keys.remove(0)));
    } else {
        plan.push(Expr::LookupAnonymous(AnonymousSet {
            key_type,
            key_len,
            keys,
        }));
    }
}

/// The expressions of one rule, in evaluation order.
pub fn plan_rule(rule: &Rule) -> Vec<Expr> {
    let mut plan = Vec::new();
    for condition in &rule.matches {
        match condition {
            Match::OifLoopback => {
                plan.push(Expr::Meta {
                    key: libc::NFT_META_OIF as u32,
                    dreg: REG_1,
                });
                plan.push(Expr::CmpEq(LOOPBACK_IFINDEX.to_ne_bytes().to_vec()));
            }
            Match::CtEstablishedRelated => {
                // ct state is a host-endian bitmask: match if any of the bits is set.
                plan.push(Expr::CtState);
                plan.push(Expr::Bitwise {
                    mask: (CT_STATE_ESTABLISHED | CT_STATE_RELATED)
                        .to_ne_bytes()
                        .to_vec(),
                    xor: 0u32.to_ne_bytes().to_vec(),
                });
                plan.push(Expr::CmpNeq(0u32.to_ne_bytes().to_vec()));
            }
            Match::Icmpv6Types(types) => {
                family_guard(Family::V6, &mut plan);
                plan.push(Expr::Meta {
                    key: libc::NFT_META_L4PROTO as u32,
                    dreg: REG_1,
                });
                plan.push(Expr::CmpEq(vec![IPPROTO_ICMPV6]));
                plan.push(load_transport(ICMPV6_TYPE_OFFSET, 1, REG_1));
                one_of(
                    datatype::ICMP6_TYPE,
                    1,
                    types.iter().map(|t| vec![*t]).collect(),
                    &mut plan,
                );
            }
            Match::L4ProtoIn(protos) => {
                plan.push(Expr::Meta {
                    key: libc::NFT_META_L4PROTO as u32,
                    dreg: REG_1,
                });
                let keys = protos
                    .iter()
                    .map(|p| vec![elements::proto_number(*p)])
                    .collect();
                one_of(datatype::INET_PROTOCOL, 1, keys, &mut plan);
            }
            Match::DportIn(ports) => {
                plan.push(load_transport(TH_DPORT_OFFSET, 2, REG_1));
                let keys = ports.iter().map(|p| p.to_be_bytes().to_vec()).collect();
                one_of(datatype::INET_SERVICE, 2, keys, &mut plan);
            }
            Match::DaddrInSet { family, set } => {
                family_guard(*family, &mut plan);
                plan.push(load_daddr(*family, REG_1));
                plan.push(Expr::Lookup {
                    set: set.clone(),
                    sreg: REG_1,
                });
            }
            Match::DaddrProtoPortInSet { family, set } => {
                plan_addr_proto_port_lookup(Endpoint::Destination, *family, set, &mut plan);
            }
            Match::Daddr(_)
            | Match::MarkIs(_)
            | Match::MarkIsNot(_)
            | Match::SaddrProtoSportInSet { .. } => plan_proxy_match(condition, &mut plan),
        }
    }
    for action in &rule.actions {
        if let Action::Redirect(_) | Action::CtZoneSet(_) = action {
            plan_proxy_action(action, &mut plan);
            continue;
        }
        plan.push(match action {
            Action::Counter => Expr::Counter,
            Action::Log { group, prefix } => Expr::Log {
                group: *group,
                prefix: prefix.clone(),
            },
            Action::Accept => Expr::Accept,
            Action::Drop => Expr::Drop,
            Action::Reject(kind) => Expr::Reject(*kind),
            Action::Jump(chain) => Expr::Jump(chain.clone()),
            Action::Redirect(_) | Action::CtZoneSet(_) => continue, // planned above
        });
    }
    plan
}
/// The matches of the DNS proxy's rules, laid out as nft 1.0.6 lays them out
/// (`nft --debug=netlink`): `meta load mark => reg 1; cmp [n]eq reg 1 MARK`
/// (the mark in host byte order), and for an address the family guard, the
/// destination address and a compare.
fn plan_proxy_match(condition: &Match, plan: &mut Vec<Expr>) {
    let mark = |plan: &mut Vec<Expr>| {
        plan.push(Expr::Meta {
            key: libc::NFT_META_MARK as u32,
            dreg: REG_1,
        })
    };
    match condition {
        Match::MarkIs(value) => {
            mark(plan);
            plan.push(Expr::CmpEq(value.to_ne_bytes().to_vec()));
        }
        Match::MarkIsNot(value) => {
            mark(plan);
            plan.push(Expr::CmpNeq(value.to_ne_bytes().to_vec()));
        }
        Match::Daddr(addr) => {
            let family = Family::of(addr);
            family_guard(family, plan);
            plan.push(load_daddr(family, REG_1));
            plan.push(Expr::CmpEq(match addr {
                std::net::IpAddr::V4(v4) => v4.octets().to_vec(),
                std::net::IpAddr::V6(v6) => v6.octets().to_vec(),
            }));
        }
        Match::SaddrProtoSportInSet { family, set } => {
            plan_addr_proto_port_lookup(Endpoint::Source, *family, set, plan);
        }
        other => unreachable!("not a DNS proxy match: {other:?}"),
    }
}

/// The actions of the DNS proxy's rules, as nft 1.0.6 sends them: the value
/// into register 1 (`immediate`), then the statement that reads it.
/// - `redirect to :PORT`: the port in network byte order, then `redir` with
///   NF_NAT_RANGE_PROTO_SPECIFIED;
/// - `ct zone set ZONE`: the zone as a host-order u16, then `ct set zone`.
fn plan_proxy_action(action: &Action, plan: &mut Vec<Expr>) {
    let (data, statement) = match action {
        Action::Redirect(port) => (port.to_be_bytes(), Expr::Redirect { sreg: REG_1 }),
        Action::CtZoneSet(zone) => (
            zone.to_ne_bytes(),
            Expr::CtSet {
                key: libc::NFT_CT_ZONE as u32,
                sreg: REG_1,
            },
        ),
        other => unreachable!("not a DNS proxy action: {other:?}"),
    };
    plan.push(Expr::Immediate {
        dreg: REG_1,
        data: data.to_vec(),
    });
    plan.push(statement);
}

/// `NF_NAT_RANGE_PROTO_SPECIFIED` (include/uapi/linux/netfilter/nf_nat.h).
pub(super) const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

fn cstring(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error::InvalidName {
        name: text.to_string(),
    })
}

/// The base chain definition of a model base chain.
fn base_hook(base: BaseChain) -> BaseHook {
    BaseHook {
        hook: generation::hook_number(base.hook),
        priority: base.priority,
        policy: generation::policy_number(base.policy),
        chain_type: generation::chain_type(base.kind),
    }
}

/// Builds one transaction for one generation of a model.
struct Builder<'a> {
    ruleset: &'a Ruleset,
    naming: Naming<'a>,
    table: CString,
    transaction: Transaction,
    /// Transaction-local ids of the sets created in this transaction, by model name.
    set_ids: BTreeMap<String, u32>,
    next_set_id: u32,
}

impl<'a> Builder<'a> {
    fn new(ruleset: &'a Ruleset, generation: u32) -> Builder<'a> {
        Builder::with_naming(ruleset, Naming::new(ruleset, generation))
    }

    /// A builder for generation `swap.to`, which keeps the sets of `swap.reuse`.
    fn for_swap(ruleset: &'a Ruleset, swap: &'a Swap) -> Builder<'a> {
        Builder::with_naming(ruleset, Naming::of_swap(ruleset, swap))
    }

    fn with_naming(ruleset: &'a Ruleset, naming: Naming<'a>) -> Builder<'a> {
        Builder {
            ruleset,
            naming,
            table: table_name(),
            // The kernel echoes what a generation's transactions create: the
            // verification reads the objects from that echo (see `readback::compose`).
            transaction: Transaction::echoed(),
            set_ids: BTreeMap::new(),
            next_set_id: 1,
        }
    }

    /// Create the model's sets for which `which` holds, with their elements.
    fn add_sets(&mut self, which: impl Fn(&Set) -> bool) -> Result<(), Error> {
        for set in self.ruleset.sets.iter().filter(|s| which(s)) {
            let mut definition = elements::set_definition(set, self.next_set_id)?;
            definition.name = cstring(&self.naming.set(&set.name))?;
            self.set_ids.insert(set.name.clone(), self.next_set_id);
            self.next_set_id += 1;
            let mut message = SetMsg::new(&self.table, &definition);
            self.transaction
                .add(&message, MsgType::Add, Object::Set(set.name.clone()));
            for element in elements::encode_all(set)? {
                message.push(&element);
            }
            self.transaction
                .add_new_set_elements(&message, Object::Elements(set.name.clone()));
        }
        Ok(())
    }

    /// Create the generation's regular chains, each with the generation's
    /// comment (`generation::generation_comment`: its shape digest and the
    /// policy it is staged for).
    fn add_regular_chains(&mut self) -> Result<(), Error> {
        let digest = cstring(&generation::generation_comment(self.ruleset))?;
        for chain in self.ruleset.chains.iter().filter(|c| c.base.is_none()) {
            let name = cstring(&self.naming.chain(&chain.name))?;
            let message = ChainMsg::new(&self.table, &name, None, Some(&digest));
            self.transaction
                .add(&message, MsgType::Add, Object::Chain(chain.name.clone()));
        }
        Ok(())
    }

    /// Create the base chains for which `which` holds, or update their
    /// policy if they exist with the same hook.
    fn add_base_chains(&mut self, which: impl Fn(&str) -> bool) -> Result<(), Error> {
        for chain in &self.ruleset.chains {
            let Some(base) = chain.base.filter(|_| which(&chain.name)) else {
                continue;
            };
            let message = ChainMsg::new(
                &self.table,
                &cstring(&chain.name)?,
                Some(base_hook(base)),
                None,
            );
            self.transaction
                .add(&message, MsgType::Add, Object::Chain(chain.name.clone()));
        }
        Ok(())
    }

    /// Add the rules of the model chains that are base chains (`base`) or
    /// regular chains (`!base`), in model order.
    fn add_rules(&mut self, base: bool) -> Result<(), Error> {
        let ruleset = self.ruleset;
        for chain in ruleset.chains.iter().filter(|c| c.base.is_some() == base) {
            let chain_name = self.naming.chain(&chain.name);
            for rule in &chain.rules {
                // A base chain's rule (its entry rule, a jump into the
                // generation) also says which policy is in force.
                let digest = base.then_some(ruleset.digest.as_str());
                let comment = generation::entry_comment(&rule.id, digest);
                let mut message = RuleWriter::new(TABLE_NAME, &chain_name, Some(&comment))?;
                let mut names = RuleNames {
                    builder: self,
                    chain,
                    rule,
                };
                for expr in plan_rule(rule) {
                    message.expression(&expr, &mut names)?;
                }
                self.transaction.add(
                    &message.finish()?,
                    MsgType::Add,
                    Object::Rule {
                        chain: chain.name.clone(),
                        id: rule.id.clone(),
                    },
                );
            }
        }
        Ok(())
    }

    /// Remove every rule of the model's base chains (`NFT_MSG_DELRULE` with a
    /// chain and no handle deletes all its rules, `nft_delrule_by_chain`).
    fn flush_base_chains(&mut self) -> Result<(), Error> {
        let nftnl_table = nftnl::Table::new(&self.table, ProtoFamily::Inet);
        for chain in self.ruleset.chains.iter().filter(|c| c.base.is_some()) {
            let handle = nftnl::Chain::new(cstring(&chain.name)?, &nftnl_table);
            let flush = nftnl::Rule::new(&handle);
            self.transaction
                .add(&flush, MsgType::Del, Object::Flush(chain.name.clone()));
        }
        Ok(())
    }

    /// Generation `swap.to`, the persistent sets it adds, and the base
    /// chain policies that become accept.
    fn add_stage(&mut self, swap: &Swap) -> Result<(), Error> {
        self.add_base_chains(|name| swap.loosen.iter().any(|c| c == name))?;
        let reused = |set: &Set| swap.reuse.contains_key(&set.name);
        self.add_sets(|set| {
            (!generation::persistent_set(set) && !reused(set)) || swap.create.contains(&set.name)
        })?;
        self.add_regular_chains()?;
        self.add_rules(false)
    }

    /// The element changes of the sets `swap` changes in place, each base
    /// chain's rules replaced by the model's, then the policies that become drop.
    fn add_swap(&mut self, swap: &Swap) -> Result<(), Error> {
        add_set_edits(&mut self.transaction, swap, Direction::Forward)?;
        self.flush_base_chains()?;
        self.add_rules(true)?;
        self.add_base_chains(|name| swap.tighten.iter().any(|c| c == name))
    }

    /// The table, its base chains, every set, and generation `generation`
    /// with the base chains jumping into it.
    fn add_everything(&mut self) -> Result<(), Error> {
        self.add_sets(|_| true)?;
        self.add_regular_chains()?;
        self.add_base_chains(|_| true)?;
        self.add_rules(false)?;
        self.add_rules(true)
    }
}

/// What the rule `rule` of `chain` refers to, as `builder`'s transaction
/// names it.
struct RuleNames<'b, 'a> {
    builder: &'b mut Builder<'a>,
    chain: &'a crate::ruleset::Chain,
    rule: &'a Rule,
}

impl References for RuleNames<'_, '_> {
    /// A named set by its generation's name, with its transaction id when
    /// the transaction creates it (a set created earlier, a persistent one,
    /// is found by name).
    fn named_set(&mut self, set: &str) -> Result<(String, Option<u32>), Error> {
        let builder = &*self.builder;
        if builder.ruleset.set(set).is_none() {
            return Err(Error::UnknownSet {
                set: set.to_string(),
                rule: self.rule.id.clone(),
            });
        }
        Ok((builder.naming.set(set), builder.set_ids.get(set).copied()))
    }

    /// The set is added to the transaction here, with its elements, before
    /// the rule that looks it up.
    fn anonymous_set(&mut self, anonymous: &AnonymousSet) -> Result<u32, Error> {
        let builder = &mut *self.builder;
        let set_id = builder.next_set_id;
        builder.next_set_id += 1;
        let definition = SetDefinition {
            name: cstring(ANONYMOUS_SET_NAME)?,
            id: set_id,
            flags: ANONYMOUS_SET_FLAGS,
            key_type: anonymous.key_type,
            key_len: anonymous.key_len,
            field_lens: Vec::new(),
            key_byteorder: elements::BYTEORDER_BIG_ENDIAN,
        };
        let mut message = SetMsg::new(&builder.table, &definition);
        let object = Object::AnonymousSet {
            chain: self.chain.name.clone(),
            rule: self.rule.id.clone(),
        };
        builder
            .transaction
            .add(&message, MsgType::Add, object.clone());
        for key in &anonymous.keys {
            message.push(&ffi::RawElement {
                key: key.clone(),
                key_end: None,
                interval_end: false,
                timeout_ms: None,
                expiration_ms: None,
            });
        }
        // Echoed, for the verification (`readback::compose`).
        builder.transaction.add_new_set_elements(&message, object);
        Ok(set_id)
    }

    fn chain(&self, chain: &str) -> String {
        self.builder.naming.chain(chain)
    }
}

/// What a create transaction knows of the table it creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Creation {
    /// Read as absent: the transaction carries the generation id of that
    /// reading, so the kernel refuses it if anything committed since.
    Absent,
    /// Assumed absent, unread: the table message carries `NLM_F_EXCL`, so
    /// the kernel refuses the whole transaction (`EEXIST`) if it exists.
    Exclusive,
}

/// The transaction that creates the table with `ruleset` as generation 1
/// (there is no table).
pub fn create_table(ruleset: &Ruleset, table: Creation) -> Result<Transaction, Error> {
    let mut builder = Builder::new(ruleset, 1);
    let message = TableMsg::new(&builder.table, None);
    let message = match table {
        Creation::Absent => message,
        Creation::Exclusive => message.exclusive(),
    };
    builder
        .transaction
        .add(&message, MsgType::Add, Object::Table);
    builder.add_everything()?;
    Ok(builder.transaction)
}

/// The transaction that replaces the whole table with `ruleset` as
/// generation 1: `add table` (so that the delete cannot fail), `delete
/// table`, then everything. Used once for a table in another shape; packets
/// may meet neither table for a moment while the base chains' hooks are
/// registered again during the commit.
pub fn replace_table(ruleset: &Ruleset) -> Result<Transaction, Error> {
    let mut builder = Builder::new(ruleset, 1);
    for kind in [MsgType::Add, MsgType::Del, MsgType::Add] {
        builder
            .transaction
            .add(&TableMsg::new(&builder.table, None), kind, Object::Table);
    }
    builder.add_everything()?;
    Ok(builder.transaction)
}

/// The stage transaction of `swap`: generation `swap.to` of `ruleset`, the
/// persistent sets it adds, and the base chain policies that become accept.
/// Nothing jumps into the new generation yet.
pub fn stage(ruleset: &Ruleset, swap: &Swap) -> Result<Transaction, Error> {
    let mut builder = Builder::for_swap(ruleset, swap);
    builder.add_stage(swap)?;
    Ok(builder.transaction)
}

/// The swap transaction of `swap`: the element changes of the sets it
/// changes in place, each base chain's rules replaced by the model's (a jump
/// into generation `swap.to`, with the model's digest), and the policies
/// that become drop. For an edit in place (`Approach::Edit`, `swap.to ==
/// swap.from`) this is the whole edit: the element changes, and entry rules
/// that jump into the same generation with the new digest.
pub fn swap(ruleset: &Ruleset, swap: &Swap) -> Result<Transaction, Error> {
    let mut builder = Builder::for_swap(ruleset, swap);
    builder.add_swap(swap)?;
    Ok(builder.transaction)
}

/// Whether [`add_set_edits`] makes the edits of a swap or undoes them.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Forward,
    Undo,
}

/// The element changes of the sets `swap` changes in place (`swap.edit`),
/// or (`Undo`) the changes that give them their previous elements back.
/// Every removal comes before every addition: an interval set's backend
/// refuses an addition that overlaps an element still active in the next
/// generation (`-EEXIST` or `-ENOTEMPTY` from `nft_rbtree_insert` and
/// `nft_pipapo_insert`), and a removed element is inactive in it from its
/// removal on. The elements are in the kernel's encoding
/// ([`generation::SetEdit`]): an rbtree range with its end element (without
/// it the range runs to the top of the address space, fail open), a pipapo
/// range with its key end. Removals are `DELSETELEM`: each element removed
/// is one the set holds at the ruleset generation id the transaction
/// carries, and one that is not there fails the transaction (`ENOENT`)
/// instead of passing unnoticed. Additions keep an existing element. The
/// verification then reads the changed sets back and compares them.
fn add_set_edits(
    transaction: &mut Transaction,
    swap: &Swap,
    direction: Direction,
) -> Result<(), Error> {
    let table = table_name();
    for removals in [true, false] {
        for (name, edit) in &swap.edit {
            let Some(kernel_name) = swap.reuse.get(name) else {
                return Err(Error::NoSuchSet {
                    set: name.clone(),
                    known: swap.reuse.keys().cloned().collect(),
                });
            };
            // Deletes, not destroys: they fail on an absent element instead
            // of passing over it, and every kernel has them (destroy needs
            // Linux 6.3).
            let (elements, op) = match (removals, direction) {
                (true, Direction::Forward) => (&edit.remove, ElementOp::Delete),
                (true, Direction::Undo) => (&edit.add, ElementOp::Delete),
                (false, Direction::Forward) => (&edit.add, ElementOp::Add),
                (false, Direction::Undo) => (&edit.remove, ElementOp::Add),
            };
            if elements.is_empty() {
                continue;
            }
            let mut message = SetMsg::existing(&table, &cstring(kernel_name)?);
            for element in elements {
                message.push(element);
            }
            let echo = direction == Direction::Forward && edit_is_echoed(edit);
            transaction.add_elements_echoed(&message, op, Object::Elements(name.clone()), echo);
        }
    }
    Ok(())
}

/// Whether the swap or edit transaction has the kernel echo the elements
/// it removes from and adds to a set changed in place by `edit` (in an
/// echoed transaction): when they are few, as for new sets
/// (`netlink::ECHOED_ELEMENTS_MAX`). Both or neither: the verification
/// composes the set from what it held, the removals and the additions, and
/// dumps a set whose edit was not echoed.
pub fn edit_is_echoed(edit: &SetEdit) -> bool {
    edit.remove.len() + edit.add.len() <= super::netlink::ECHOED_ELEMENTS_MAX
}

/// Stage, swap and cleanup of `swap` as one transaction, for the kernel to
/// check without committing (`apply --dry-run`): packets never meet it.
pub fn swap_check(
    ruleset: &Ruleset,
    swap: &Swap,
    deletions: &Deletions,
) -> Result<Transaction, Error> {
    let mut builder = Builder::for_swap(ruleset, swap);
    builder.add_stage(swap)?;
    builder.add_swap(swap)?;
    add_deletions(&mut builder.transaction, deletions)?;
    Ok(builder.transaction)
}

/// Base chain policy updates, on their own (the first step of a rollback
/// whose previous policy is accept).
pub fn policies(previous: &[EntryRule]) -> Result<Transaction, Error> {
    let table = table_name();
    let mut transaction = Transaction::new();
    for entry in previous {
        let message = ChainMsg::new(&table, &cstring(&entry.chain)?, Some(entry.hook), None);
        transaction.add(&message, MsgType::Add, Object::Chain(entry.chain.clone()));
    }
    Ok(transaction)
}

/// The rollback transaction of `swap`: each base chain jumps into the
/// generation it jumped into before (with its previous policy), the sets the
/// swap changed in place get their previous elements back (with the jump,
/// so the previous rules see them as they were), and `deletions` (the
/// generation that failed verification) are deleted.
pub fn swap_back(swap: &Swap, deletions: &Deletions) -> Result<Transaction, Error> {
    let table = table_name();
    let nftnl_table = nftnl::Table::new(&table, ProtoFamily::Inet);
    let mut transaction = Transaction::new();
    add_set_edits(&mut transaction, swap, Direction::Undo)?;
    for entry in &swap.previous {
        let handle = nftnl::Chain::new(cstring(&entry.chain)?, &nftnl_table);
        transaction.add(
            &nftnl::Rule::new(&handle),
            MsgType::Del,
            Object::Flush(entry.chain.clone()),
        );
        let id = entry.id.clone().unwrap_or_default();
        let comment =
            (!id.is_empty()).then(|| generation::entry_comment(&id, entry.digest.as_deref()));
        let mut rule = RuleWriter::new(TABLE_NAME, &entry.chain, comment.as_deref())?;
        rule.expression(&Expr::Jump(entry.target.clone()), &mut KernelNames)?;
        transaction.add(
            &rule.finish()?,
            MsgType::Add,
            Object::Rule {
                chain: entry.chain.clone(),
                id,
            },
        );
        let message = ChainMsg::new(&table, &cstring(&entry.chain)?, Some(entry.hook), None);
        transaction.add(&message, MsgType::Add, Object::Chain(entry.chain.clone()));
    }
    add_deletions(&mut transaction, deletions)?;
    Ok(transaction)
}

fn add_deletions(transaction: &mut Transaction, deletions: &Deletions) -> Result<(), Error> {
    let table = table_name();
    for chain in &deletions.chains {
        let message = ChainMsg::new(&table, &cstring(chain)?, None, None);
        transaction.add(
            &message,
            MsgType::Del,
            Object::Deletion {
                kind: "chain",
                name: chain.clone(),
            },
        );
    }
    for set in &deletions.sets {
        let message = SetMsg::existing(&table, &cstring(set)?);
        transaction.add(
            &message,
            MsgType::Del,
            Object::Deletion {
                kind: "set",
                name: set.clone(),
            },
        );
    }
    Ok(())
}

/// The transaction that deletes `deletions`: chains first (deleting a chain
/// deletes its rules, which releases the sets and chains they refer to), then sets.
pub fn delete(deletions: &Deletions) -> Result<Transaction, Error> {
    let mut transaction = Transaction::new();
    add_deletions(&mut transaction, deletions)?;
    Ok(transaction)
}

/// The transaction that deletes the table (it must exist).
pub fn delete_table() -> Transaction {
    let mut transaction = Transaction::new();
    transaction.add(
        &TableMsg::new(&table_name(), None),
        MsgType::Del,
        Object::Table,
    );
    transaction
}

/// One expression of each kind the compiler plans (each reject kind once):
/// the fixture of the tests that write expressions and compare them.
#[cfg(test)]
pub fn one_of_each_expression() -> Vec<Expr> {
    vec![
        Expr::Meta {
            key: libc::NFT_META_L4PROTO as u32,
            dreg: libc::NFT_REG32_00 as u32 + 4,
        },
        Expr::Payload {
            base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
            offset: 16,
            len: 4,
            dreg: libc::NFT_REG_1 as u32,
        },
        Expr::CmpEq(vec![1, 187]),
        Expr::CmpNeq(vec![0x6c, 0x6e, 0, 0]),
        Expr::Bitwise {
            mask: 6u32.to_ne_bytes().to_vec(),
            xor: 0u32.to_ne_bytes().to_vec(),
        },
        Expr::CtState,
        Expr::Lookup {
            set: "allow_v4".into(),
            sreg: libc::NFT_REG_1 as u32,
        },
        Expr::LookupAnonymous(AnonymousSet {
            key_type: 13,
            key_len: 2,
            keys: vec![vec![0, 53], vec![3, 85]],
        }),
        Expr::Counter,
        Expr::Log {
            group: 4711,
            prefix: "netleash deny ".into(),
        },
        Expr::Reject(RejectKind::TcpReset),
        Expr::Reject(RejectKind::IcmpxAdminProhibited),
        Expr::Accept,
        Expr::Drop,
        Expr::Jump("deny".into()),
        Expr::Immediate {
            dreg: libc::NFT_REG_1 as u32,
            data: vec![4, 29],
        },
        Expr::Redirect {
            sreg: libc::NFT_REG_1 as u32,
        },
        Expr::CtSet {
            key: libc::NFT_CT_ZONE as u32,
            sreg: libc::NFT_REG_1 as u32,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{
        CompileOptions, Dialect, HostRule, Mode, Policy, Ports, Proto, Source, Target,
    };

    fn policy() -> Policy {
        Policy {
            mode: Mode::Limited,
            dialect: Dialect::Limited,
            rules: vec![HostRule {
                target: Target::Net("198.51.100.0/24".parse().unwrap()),
                ports: Ports::Any,
                sources: [Source::AllowedHosts].into(),
                entry: "198.51.100.0/24".into(),
            }],
            blocklist: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn concatenated_lookups_lay_out_registers_like_nft() {
        let rule = Rule {
            id: "r".into(),
            description: String::new(),
            matches: vec![Match::DaddrProtoPortInSet {
                family: Family::V6,
                set: "s".into(),
            }],
            actions: vec![Action::Accept],
        };
        let plan = plan_rule(&rule);
        // nfproto guard, daddr -> reg 1 (32-bit regs 0..3), l4proto -> reg32 4, dport -> reg32 5.
        assert_eq!(
            plan[2],
            Expr::Payload {
                base: 1,
                offset: 24,
                len: 16,
                dreg: REG_1
            }
        );
        assert_eq!(
            plan[3],
            Expr::Meta {
                key: libc::NFT_META_L4PROTO as u32,
                dreg: 12
            }
        );
        assert_eq!(
            plan[4],
            Expr::Payload {
                base: 2,
                offset: 2,
                len: 2,
                dreg: 13
            }
        );
        assert_eq!(
            plan[5],
            Expr::Lookup {
                set: "s".into(),
                sreg: REG_1
            }
        );
    }

    #[test]
    fn several_values_become_an_anonymous_set_and_one_value_a_compare() {
        let rule = Rule {
            id: "r".into(),
            description: String::new(),
            matches: vec![
                Match::L4ProtoIn(vec![Proto::Udp, Proto::Tcp]),
                Match::DportIn(vec![53]),
            ],
            actions: vec![Action::Drop],
        };
        let plan = plan_rule(&rule);
        assert_eq!(
            plan[1],
            Expr::LookupAnonymous(AnonymousSet {
                key_type: 12,
                key_len: 1,
                keys: vec![vec![6], vec![17]]
            })
        );
        assert_eq!(plan[3], Expr::CmpEq(vec![0, 53]));
    }

    #[test]
    fn a_compiled_ruleset_builds_one_batch() {
        let ruleset = crate::ruleset::compile(&policy(), &CompileOptions::default());
        let transaction = replace_table(&ruleset).unwrap();
        let rules: usize = ruleset.chains.iter().map(|c| c.rules.len()).sum();
        // 3 table messages, a set message per set, element messages for
        // non-empty sets, chains, rules, and anonymous sets with their elements.
        assert!(transaction.len() >= 3 + ruleset.sets.len() + ruleset.chains.len() + rules);
    }

    fn swap_to(to: u32, create: &[&str]) -> Swap {
        Swap {
            from: to - 1,
            to,
            create: create.iter().map(|s| s.to_string()).collect(),
            loosen: vec![],
            tighten: vec!["output".into()],
            previous: vec![],
            from_comment: None,
            from_digest: None,
            reuse: BTreeMap::new(),
            edit: BTreeMap::new(),
        }
    }

    #[test]
    fn the_stage_creates_a_generation_that_nothing_jumps_into() {
        let ruleset = crate::ruleset::compile(&policy(), &CompileOptions::default());
        let transaction = stage(&ruleset, &swap_to(5, &["dns_v6"])).unwrap();
        let objects = transaction.objects();
        assert!(objects.contains(&Object::Set("allow_v4".into())));
        assert!(objects.contains(&Object::Set("dns_v6".into())));
        assert!(
            !objects.contains(&Object::Set("dns_v4".into())),
            "an existing persistent set is kept, not created"
        );
        assert!(objects.contains(&Object::Chain("egress".into())));
        for object in objects {
            assert!(
                !matches!(object, Object::Rule { chain, .. } | Object::Chain(chain) | Object::Flush(chain)
                    if chain == "output" || chain == "forward"),
                "the stage touched a base chain: {object:?}"
            );
        }
    }

    #[test]
    fn the_swap_replaces_the_base_chain_rules_and_tightens_after() {
        let ruleset = crate::ruleset::compile(&policy(), &CompileOptions::default());
        let transaction = swap(&ruleset, &swap_to(5, &[])).unwrap();
        assert_eq!(
            transaction.objects(),
            [
                Object::Flush("output".into()),
                Object::Flush("forward".into()),
                Object::Rule {
                    chain: "output".into(),
                    id: "output-egress".into()
                },
                Object::Rule {
                    chain: "forward".into(),
                    id: "forward-egress".into()
                },
                Object::Chain("output".into()),
            ]
        );
    }

    #[test]
    fn the_swap_removes_every_edited_element_before_it_adds_any() {
        let with_blocklist = Policy {
            blocklist: vec![crate::policy::BlockEntry {
                net: "169.254.0.0/16".parse().unwrap(),
                reason: "link-local".into(),
            }],
            ..policy()
        };
        let ruleset = crate::ruleset::compile(&with_blocklist, &CompileOptions::default());
        let mut edited = swap_to(5, &[]);
        // A range in the kernel's encoding: its start and its end element.
        let element = |net: &str| {
            let key = crate::ruleset::SetKey::Addr(Family::V4);
            let net = crate::ruleset::Element::Addr(net.parse().unwrap());
            elements::encode("allow_v4", key, true, &net).unwrap()
        };
        for (set, kernel) in [
            ("allow_v4", "allow_v4.g2"),
            ("blocklist_v4", "blocklist_v4.g3"),
        ] {
            edited.reuse.insert(set.into(), kernel.into());
            edited.edit.insert(
                set.into(),
                generation::SetEdit {
                    remove: element("192.0.2.0/24"),
                    add: element("203.0.113.0/24"),
                },
            );
        }
        let elements = |set: &str| Object::Elements(set.into());
        let transaction = swap(&ruleset, &edited).unwrap();
        assert_eq!(
            transaction.objects()[..5],
            [
                elements("allow_v4"),
                elements("blocklist_v4"),
                elements("allow_v4"),
                elements("blocklist_v4"),
                Object::Flush("output".into()),
            ]
        );
        // The rollback undoes them in the same order (its removals are the
        // swap's additions), first thing.
        let back = swap_back(&edited, &Deletions::default()).unwrap();
        assert_eq!(back.objects(), &transaction.objects()[..4]);
    }

    #[test]
    fn a_rule_naming_an_unknown_set_is_refused_before_sending() {
        let mut ruleset = crate::ruleset::compile(&policy(), &CompileOptions::default());
        ruleset.sets.retain(|s| s.name != "allow_v4");
        let err = replace_table(&ruleset).err().expect("must fail");
        assert!(err.to_string().contains("allow_v4"), "{err}");
    }
}
