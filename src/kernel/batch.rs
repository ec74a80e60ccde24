//! The ruleset model as ONE nftnl batch that replaces the `inet netleash`
//! table in one transaction:
//!
//! 1. `add table` (so that the delete cannot fail when the table is absent),
//! 2. `delete table` (removes the old table with everything in it),
//! 3. `add table` with the digest as its comment,
//! 4. the sets and their elements, 5. the chains, 6. the rules.
//!
//! The kernel applies all of it at commit or none of it, so packets see
//! either the old table or the new one: never an empty or half-built table.
//!
//! Each rule is first planned as a list of [`Expr`]s (the same list the
//! read-back compares against), laid out as nft 1.0.6 lays out the same rule
//! (checked with `nft --debug=netlink`).

use std::collections::BTreeMap;
use std::ffi::CString;

use nftnl::expr::{Bitwise, Cmp, CmpOp, Conntrack, Counter, IcmpCode, RejectionType, Verdict};
use nftnl::{MsgType, ProtoFamily};

use super::elements::{self, datatype};
use super::ffi::{self, ElementOp, SetDefinition, SetMsg, TableMsg};
use super::netlink::{Object, Transaction};
use super::{Error, table_name};
use crate::ruleset::{
    Action, BaseChain, ChainKind, ChainPolicy, Family, Hook, Match, RejectKind, Rule, Ruleset,
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

/// Offsets of the IPv4 and IPv6 destination address in their headers (RFC 791, RFC 8200).
const IPV4_DADDR_OFFSET: u32 = 16;
const IPV6_DADDR_OFFSET: u32 = 24;
/// Offset of the destination port in TCP and UDP headers, and of the type in ICMPv6.
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

fn load_daddr(family: Family, dreg: u32) -> Expr {
    let (offset, len) = match family {
        Family::V4 => (IPV4_DADDR_OFFSET, 4),
        Family::V6 => (IPV6_DADDR_OFFSET, 16),
    };
    Expr::Payload {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset,
        len,
        dreg,
    }
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
                // address . l4proto . dport, each field in its own 32-bit registers,
                // matching the key layout of the concatenated set.
                family_guard(*family, &mut plan);
                let after_addr = match family {
                    Family::V4 => 1,
                    Family::V6 => 4,
                };
                plan.push(load_daddr(*family, REG_1));
                plan.push(Expr::Meta {
                    key: libc::NFT_META_L4PROTO as u32,
                    dreg: reg32(after_addr),
                });
                plan.push(load_transport(TH_DPORT_OFFSET, 2, reg32(after_addr + 1)));
                plan.push(Expr::Lookup {
                    set: set.clone(),
                    sreg: REG_1,
                });
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
            // saddr . l4proto . sport, laid out like a daddr . l4proto . dport key.
            family_guard(*family, plan);
            let (offset, len, after_addr) = match family {
                Family::V4 => (IPV4_SADDR_OFFSET, 4, 1),
                Family::V6 => (IPV6_SADDR_OFFSET, 16, 4),
            };
            plan.push(Expr::Payload {
                base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
                offset,
                len,
                dreg: REG_1,
            });
            plan.push(Expr::Meta {
                key: libc::NFT_META_L4PROTO as u32,
                dreg: reg32(after_addr),
            });
            plan.push(load_transport(TH_SPORT_OFFSET, 2, reg32(after_addr + 1)));
            plan.push(Expr::Lookup {
                set: set.clone(),
                sreg: REG_1,
            });
        }
        other => unreachable!("not a DNS proxy match: {other:?}"),
    }
}

/// Offsets of the source address (RFC 791, RFC 8200) and port.
const IPV4_SADDR_OFFSET: u32 = 12;
const IPV6_SADDR_OFFSET: u32 = 8;
const TH_SPORT_OFFSET: u32 = 0;

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
const NF_NAT_RANGE_PROTO_SPECIFIED: u32 = 1 << 1;

/// The kernel names of a rule's expressions, in order (what the read-back checks).
pub fn expression_names(rule: &Rule) -> Vec<&'static str> {
    plan_rule(rule).iter().map(Expr::kernel_name).collect()
}

fn cstring(text: &str) -> Result<CString, Error> {
    CString::new(text).map_err(|_| Error::InvalidName {
        name: text.to_string(),
    })
}

/// The transaction that replaces the whole table with `ruleset`.
pub fn replace_table(ruleset: &Ruleset) -> Result<Transaction, Error> {
    let table = table_name();
    let digest = cstring(&ruleset.digest)?;
    let mut transaction = Transaction::new();
    transaction.add(&TableMsg::new(&table, None), MsgType::Add, Object::Table);
    transaction.add(&TableMsg::new(&table, None), MsgType::Del, Object::Table);
    transaction.add(
        &TableMsg::new(&table, Some(&digest)),
        MsgType::Add,
        Object::Table,
    );

    let mut next_set_id = 1u32;
    let mut set_ids: BTreeMap<&str, u32> = BTreeMap::new();
    for set in &ruleset.sets {
        let definition = elements::set_definition(set, next_set_id)?;
        set_ids.insert(&set.name, next_set_id);
        next_set_id += 1;
        let mut message = SetMsg::new(&table, &definition);
        transaction.add(&message, MsgType::Add, Object::Set(set.name.clone()));
        for element in elements::encode_all(set)? {
            message.push(&element);
        }
        transaction.add_elements(
            &message,
            ElementOp::Create,
            Object::Elements(set.name.clone()),
        );
    }

    // Chains and rules go through the safe nftnl API, which needs its own table handle.
    let nftnl_table = nftnl::Table::new(&table, ProtoFamily::Inet);
    let mut chains = Vec::with_capacity(ruleset.chains.len());
    for chain in &ruleset.chains {
        let mut object = nftnl::Chain::new(cstring(&chain.name)?, &nftnl_table);
        if let Some(BaseChain {
            kind,
            hook,
            priority,
            policy,
        }) = chain.base
        {
            object.set_hook(
                match hook {
                    Hook::Output => nftnl::Hook::Out,
                    Hook::Forward => nftnl::Hook::Forward,
                    Hook::Prerouting => nftnl::Hook::PreRouting,
                },
                priority,
            );
            object.set_type(match kind {
                ChainKind::Filter | ChainKind::Raw => nftnl::ChainType::Filter,
                // The kernel has taken nat chains in inet tables since Linux 5.2.
                ChainKind::Nat => nftnl::ChainType::Nat,
            });
            object.set_policy(match policy {
                ChainPolicy::Accept => nftnl::Policy::Accept,
                ChainPolicy::Drop => nftnl::Policy::Drop,
            });
        }
        transaction.add(&object, MsgType::Add, Object::Chain(chain.name.clone()));
        chains.push(object);
    }

    // Rules after all chains, so every jump target exists when its rule is added.
    for (chain, object) in ruleset.chains.iter().zip(&chains) {
        for rule in &chain.rules {
            let rule_object = Object::Rule {
                chain: chain.name.clone(),
                id: rule.id.clone(),
            };
            let mut nft_rule = nftnl::Rule::new(object);
            for expr in plan_rule(rule) {
                add_expr(
                    &mut nft_rule,
                    &expr,
                    &set_ids,
                    &mut next_set_id,
                    &mut transaction,
                    chain,
                    rule,
                )?;
            }
            nft_rule
                .set_comment(cstring(&rule.id)?)
                .map_err(|_| Error::InvalidName {
                    name: rule.id.clone(),
                })?;
            transaction.add(&nft_rule, MsgType::Add, rule_object);
        }
    }
    Ok(transaction)
}

/// Add one planned expression to `rule`. An anonymous set is added to the
/// transaction first, with its elements, so the rule can refer to it.
fn add_expr(
    rule: &mut nftnl::Rule<'_>,
    expr: &Expr,
    set_ids: &BTreeMap<&str, u32>,
    next_set_id: &mut u32,
    transaction: &mut Transaction,
    chain: &crate::ruleset::Chain,
    model_rule: &Rule,
) -> Result<(), Error> {
    match expr {
        Expr::Meta { key, dreg } => rule.add_expr(&ffi::MetaLoad {
            key: *key,
            dreg: *dreg,
        }),
        Expr::Payload {
            base,
            offset,
            len,
            dreg,
        } => rule.add_expr(&ffi::PayloadLoad {
            base: *base,
            offset: *offset,
            len: *len,
            dreg: *dreg,
        }),
        Expr::CmpEq(data) => rule.add_expr(&Cmp::new(CmpOp::Eq, data.as_slice())),
        Expr::CmpNeq(data) => rule.add_expr(&Cmp::new(CmpOp::Neq, data.as_slice())),
        Expr::Bitwise { mask, xor } => {
            rule.add_expr(&Bitwise::new(mask.as_slice(), xor.as_slice()))
        }
        Expr::CtState => rule.add_expr(&Conntrack::State),
        Expr::Lookup { set, sreg } => {
            let set_id = *set_ids.get(set.as_str()).ok_or_else(|| Error::UnknownSet {
                set: set.clone(),
                rule: model_rule.id.clone(),
            })?;
            rule.add_expr(&ffi::Lookup {
                sreg: *sreg,
                set: cstring(set)?,
                set_id,
                invert: false,
            })
        }
        Expr::LookupAnonymous(anonymous) => {
            let set_id = *next_set_id;
            *next_set_id += 1;
            let definition = SetDefinition {
                // The kernel replaces %d with a free number (nf_tables_set_alloc_name).
                name: c"__set%d".to_owned(),
                id: set_id,
                flags: (libc::NFT_SET_ANONYMOUS | libc::NFT_SET_CONSTANT) as u32,
                key_type: anonymous.key_type,
                key_len: anonymous.key_len,
                field_lens: Vec::new(),
                key_byteorder: elements::BYTEORDER_BIG_ENDIAN,
            };
            let table = table_name();
            let mut message = SetMsg::new(&table, &definition);
            let object = Object::AnonymousSet {
                chain: chain.name.clone(),
                rule: model_rule.id.clone(),
            };
            transaction.add(&message, MsgType::Add, object.clone());
            for key in &anonymous.keys {
                message.push(&ffi::RawElement {
                    key: key.clone(),
                    key_end: None,
                    interval_end: false,
                    timeout_ms: None,
                    expiration_ms: None,
                });
            }
            transaction.add_elements(&message, ElementOp::Create, object);
            rule.add_expr(&ffi::Lookup {
                sreg: REG_1,
                set: definition.name,
                set_id,
                invert: false,
            })
        }
        Expr::Counter => rule.add_expr(&Counter),
        Expr::Log { group, prefix } => rule.add_expr(&ffi::Log {
            group: *group,
            prefix: cstring(prefix)?,
        }),
        Expr::Reject(RejectKind::TcpReset) => {
            rule.add_expr(&Verdict::Reject(RejectionType::TcpRst))
        }
        // In an inet table this is NFT_REJECT_ICMPX_UNREACH with the
        // admin-prohibited code: ICMP type 3 code 13, or ICMPv6 type 1 code 1.
        Expr::Reject(RejectKind::IcmpxAdminProhibited) => rule.add_expr(&Verdict::Reject(
            RejectionType::Icmp(IcmpCode::AdminProhibited),
        )),
        Expr::Accept => rule.add_expr(&Verdict::Accept),
        Expr::Drop => rule.add_expr(&Verdict::Drop),
        Expr::Jump(target) => rule.add_expr(&Verdict::Jump {
            chain: cstring(target)?,
        }),
        Expr::Immediate { dreg, data } => rule.add_expr(&ffi::ImmediateData {
            dreg: *dreg,
            data: data.clone(),
        }),
        Expr::Redirect { sreg } => rule.add_expr(&ffi::Redirect {
            sreg_proto_min: *sreg,
            flags: NF_NAT_RANGE_PROTO_SPECIFIED,
        }),
        Expr::CtSet { key, sreg } => rule.add_expr(&ffi::CtSet {
            key: *key,
            sreg: *sreg,
        }),
    }
    Ok(())
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

    #[test]
    fn a_rule_naming_an_unknown_set_is_refused_before_sending() {
        let mut ruleset = crate::ruleset::compile(&policy(), &CompileOptions::default());
        ruleset.sets.retain(|s| s.name != "allow_v4");
        let err = replace_table(&ruleset).err().expect("must fail");
        assert!(err.to_string().contains("allow_v4"), "{err}");
    }
}
