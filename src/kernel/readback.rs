//! Read the `inet netleash` table back from the kernel (netlink dumps parsed
//! by libnftnl) and compare it with the model.
//!
//! A read is consistent: the ruleset generation id is read before and after
//! the dumps, and the read is repeated if anything committed in between
//! (every nf_tables commit bumps the generation; a dump that raced with a
//! commit is also flagged `NLM_F_DUMP_INTR`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::batch;
use super::elements::{self, describe_raw};
use super::ffi::{self, ParsedExpr, ParsedSet, RawElement, Request};
use super::netlink::Netlink;
use super::{Error, table_name};
use crate::ruleset::{ChainKind, ChainPolicy, Hook, Ruleset, TABLE_NAME};

/// How often a read is retried when the ruleset changes under it.
const READ_ATTEMPTS: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelSet {
    pub name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    pub elements: Vec<RawElement>,
}

impl KernelSet {
    pub fn interval(&self) -> bool {
        self.flags & libc::NFT_SET_INTERVAL as u32 != 0
    }

    pub fn timeout(&self) -> bool {
        self.flags & libc::NFT_SET_TIMEOUT as u32 != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelRule {
    /// The rule's comment: netleash's rule id.
    pub id: Option<String>,
    pub handle: u64,
    pub expressions: Vec<ParsedExpr>,
}

impl KernelRule {
    /// The rule id, or its handle for a rule without one (not written by netleash).
    pub fn label(&self) -> String {
        self.id
            .clone()
            .unwrap_or_else(|| format!("(handle {})", self.handle))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelChain {
    pub name: String,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<u32>,
    pub chain_type: Option<String>,
    pub rules: Vec<KernelRule>,
}

/// The table as the kernel holds it. Anonymous sets are left out: they belong to their rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelTable {
    /// The table comment: the digest of the policy in force.
    pub digest: Option<String>,
    pub sets: Vec<KernelSet>,
    pub chains: Vec<KernelChain>,
}

fn malformed(what: &str) -> Error {
    Error::Malformed(format!("cannot parse a {what} message from the kernel"))
}

fn generation(netlink: &mut Netlink) -> Result<u32, Error> {
    let mut id = None;
    let table = table_name();
    let answer = netlink.dump(Request::Generation, &table, &mut |message| {
        id = Some(ffi::parse_generation(message).ok_or_else(|| malformed("generation"))?);
        Ok(())
    })?;
    answer.map_err(|errno| Error::Dump {
        what: "the ruleset generation",
        source: std::io::Error::from_raw_os_error(errno),
    })?;
    id.ok_or_else(|| malformed("generation"))
}

/// The named sets of the table (without elements). Fails with `NoTable` if the table is absent.
pub fn read_sets(netlink: &mut Netlink) -> Result<Vec<ParsedSet>, Error> {
    let table = table_name();
    let mut sets = Vec::new();
    let answer = netlink.dump(Request::Sets, &table, &mut |message| {
        let set = ffi::parse_set(message).ok_or_else(|| malformed("set"))?;
        if set.table == TABLE_NAME
            && set.family == libc::NFPROTO_INET as u32
            && set.flags & libc::NFT_SET_ANONYMOUS as u32 == 0
        {
            sets.push(set);
        }
        Ok(())
    })?;
    match answer {
        Ok(_) => Ok(sets),
        Err(libc::ENOENT) => Err(Error::NoTable),
        Err(errno) => Err(Error::Dump {
            what: "the sets",
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Read the whole table, consistently; `None` if it does not exist.
pub fn read_table(netlink: &mut Netlink) -> Result<Option<KernelTable>, Error> {
    for _ in 0..READ_ATTEMPTS {
        let before = generation(netlink)?;
        let (table, interrupted) = match read_table_once(netlink)? {
            Some((table, interrupted)) => (Some(table), interrupted),
            None => (None, false),
        };
        if !interrupted && generation(netlink)? == before {
            return Ok(table);
        }
    }
    Err(Error::Unstable {
        attempts: READ_ATTEMPTS,
    })
}

fn read_table_once(netlink: &mut Netlink) -> Result<Option<(KernelTable, bool)>, Error> {
    let table = table_name();
    let mut parsed_table = None;
    let answer = netlink.dump(Request::Table, &table, &mut |message| {
        parsed_table = Some(ffi::parse_table(message).ok_or_else(|| malformed("table"))?);
        Ok(())
    })?;
    match answer {
        Ok(_) => {}
        Err(libc::ENOENT) => return Ok(None),
        Err(errno) => {
            return Err(Error::Dump {
                what: "the table",
                source: std::io::Error::from_raw_os_error(errno),
            });
        }
    }
    let parsed_table = parsed_table.ok_or_else(|| malformed("table"))?;
    let digest = ffi::udata_find(
        &parsed_table.userdata,
        nftnl::nftnl_sys::NFTNL_UDATA_TABLE_COMMENT as u8,
    )
    .map(ffi::udata_string);
    let mut interrupted = false;

    let mut sets = Vec::new();
    for set in read_sets(netlink)? {
        let name = std::ffi::CString::new(set.name.clone()).map_err(|_| malformed("set"))?;
        let mut elements = Vec::new();
        let answer = netlink.dump(Request::Elements(&name), &table, &mut |message| {
            let (_, parsed) =
                ffi::parse_elements(message).ok_or_else(|| malformed("set element"))?;
            elements.extend(parsed);
            Ok(())
        })?;
        interrupted |= answer.map_err(|errno| Error::Dump {
            what: "set elements",
            source: std::io::Error::from_raw_os_error(errno),
        })?;
        sets.push(KernelSet {
            name: set.name,
            flags: set.flags,
            key_type: set.key_type,
            key_len: set.key_len,
            elements,
        });
    }

    let mut chains = Vec::new();
    let answer = netlink.dump(Request::Chains, &table, &mut |message| {
        let chain = ffi::parse_chain(message).ok_or_else(|| malformed("chain"))?;
        if chain.table == TABLE_NAME && chain.family == libc::NFPROTO_INET as u32 {
            chains.push(KernelChain {
                name: chain.name,
                hook: chain.hook,
                priority: chain.priority,
                policy: chain.policy,
                chain_type: chain.chain_type,
                rules: Vec::new(),
            });
        }
        Ok(())
    })?;
    interrupted |= answer.map_err(|errno| Error::Dump {
        what: "the chains",
        source: std::io::Error::from_raw_os_error(errno),
    })?;

    let mut rules: Vec<ffi::ParsedRule> = Vec::new();
    let answer = netlink.dump(Request::Rules, &table, &mut |message| {
        let rule = ffi::parse_rule(message).ok_or_else(|| malformed("rule"))?;
        if rule.table == TABLE_NAME && rule.family == libc::NFPROTO_INET as u32 {
            rules.push(rule);
        }
        Ok(())
    })?;
    interrupted |= answer.map_err(|errno| Error::Dump {
        what: "the rules",
        source: std::io::Error::from_raw_os_error(errno),
    })?;
    // The dump lists each chain's rules in chain order.
    for rule in rules {
        let id = ffi::udata_find(
            &rule.userdata,
            nftnl::nftnl_sys::NFTNL_UDATA_RULE_COMMENT as u8,
        )
        .map(ffi::udata_string);
        let kernel_rule = KernelRule {
            id,
            handle: rule.handle,
            expressions: rule.expressions,
        };
        match chains.iter_mut().find(|c| c.name == rule.chain) {
            Some(chain) => chain.rules.push(kernel_rule),
            None => {
                return Err(Error::Malformed(format!(
                    "rule in unknown chain {:?}",
                    rule.chain
                )));
            }
        }
    }
    Ok(Some((
        KernelTable {
            digest,
            sets,
            chains,
        },
        interrupted,
    )))
}

/// One way in which the kernel's table differs from the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Difference {
    Digest {
        kernel: Option<String>,
        model: String,
    },
    MissingSet(String),
    ExtraSet(String),
    SetDefinition {
        set: String,
        kernel: String,
        model: String,
    },
    SetElements {
        set: String,
        only_model: Vec<String>,
        only_kernel: Vec<String>,
    },
    MissingChain(String),
    ExtraChain(String),
    ChainDefinition {
        chain: String,
        kernel: String,
        model: String,
    },
    Rules {
        chain: String,
        kernel: Vec<String>,
        model: Vec<String>,
    },
    RuleExpressions {
        chain: String,
        rule: String,
        kernel: Vec<String>,
        model: Vec<String>,
    },
}

/// Shows at most a few examples of a list.
fn examples(items: &[String]) -> String {
    const SHOWN: usize = 3;
    let mut text = items
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if items.len() > SHOWN {
        text.push_str(&format!(", … ({} in all)", items.len()));
    }
    text
}

impl fmt::Display for Difference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Difference::Digest { kernel, model } => write!(
                f,
                "table comment: the kernel has {}, the policy is {model}",
                kernel.as_deref().unwrap_or("no digest")
            ),
            Difference::MissingSet(set) => write!(f, "set {set:?} is missing in the kernel"),
            Difference::ExtraSet(set) => {
                write!(f, "set {set:?} is in the kernel but not in the policy")
            }
            Difference::SetDefinition { set, kernel, model } => {
                write!(
                    f,
                    "set {set:?} is {kernel} in the kernel, {model} in the policy"
                )
            }
            Difference::SetElements {
                set,
                only_model,
                only_kernel,
            } => {
                write!(f, "set {set:?}:")?;
                if !only_model.is_empty() {
                    write!(
                        f,
                        " {} element(s) missing in the kernel ({})",
                        only_model.len(),
                        examples(only_model)
                    )?;
                }
                if !only_kernel.is_empty() {
                    write!(
                        f,
                        " {} element(s) only in the kernel ({})",
                        only_kernel.len(),
                        examples(only_kernel)
                    )?;
                }
                Ok(())
            }
            Difference::MissingChain(chain) => {
                write!(f, "chain {chain:?} is missing in the kernel")
            }
            Difference::ExtraChain(chain) => {
                write!(f, "chain {chain:?} is in the kernel but not in the policy")
            }
            Difference::ChainDefinition {
                chain,
                kernel,
                model,
            } => {
                write!(
                    f,
                    "chain {chain:?} is {kernel} in the kernel, {model} in the policy"
                )
            }
            Difference::Rules {
                chain,
                kernel,
                model,
            } => write!(
                f,
                "chain {chain:?} has rules [{}] in the kernel, [{}] in the policy",
                kernel.join(", "),
                model.join(", ")
            ),
            Difference::RuleExpressions {
                chain,
                rule,
                kernel,
                model,
            } => write!(
                f,
                "rule {rule:?} in chain {chain:?} has expressions [{}] in the kernel, [{}] in the policy",
                kernel.join(" "),
                model.join(" ")
            ),
        }
    }
}

fn set_shape(flags: u32, key_type: u32, key_len: u32) -> String {
    let mut words = Vec::new();
    if flags & libc::NFT_SET_INTERVAL as u32 != 0 {
        words.push("interval".to_string());
    }
    if flags & libc::NFT_SET_TIMEOUT as u32 != 0 {
        words.push("timeout".to_string());
    }
    if flags & ffi::NFT_SET_CONCAT != 0 {
        words.push("concat".to_string());
    }
    let flags = if words.is_empty() {
        "no flags".to_string()
    } else {
        format!("flags {}", words.join(","))
    };
    format!("key type {key_type} of {key_len} bytes with {flags}")
}

fn chain_shape(
    hook: Option<u32>,
    priority: Option<i32>,
    policy: Option<u32>,
    chain_type: Option<&str>,
) -> String {
    match hook {
        None => "a regular chain".to_string(),
        Some(hook) => format!(
            "a {} chain on hook {} priority {} policy {}",
            chain_type.unwrap_or("?"),
            hook_name(hook),
            priority.unwrap_or_default(),
            policy.map(policy_name).unwrap_or("?")
        ),
    }
}

/// The kernel's name of a base chain type (`NFTA_CHAIN_TYPE`).
fn chain_type_name(kind: ChainKind) -> &'static str {
    match kind {
        ChainKind::Filter | ChainKind::Raw => "filter",
        ChainKind::Nat => "nat",
    }
}

pub fn hook_name(hook: u32) -> &'static str {
    match hook as i32 {
        libc::NF_INET_PRE_ROUTING => "prerouting",
        libc::NF_INET_LOCAL_IN => "input",
        libc::NF_INET_FORWARD => "forward",
        libc::NF_INET_LOCAL_OUT => "output",
        libc::NF_INET_POST_ROUTING => "postrouting",
        _ => "other",
    }
}

pub fn policy_name(policy: u32) -> &'static str {
    match policy as i32 {
        libc::NF_ACCEPT => "accept",
        libc::NF_DROP => "drop",
        _ => "other",
    }
}

/// Every difference between the kernel's table and the model. Empty means the
/// kernel enforces exactly the model: same digest, same sets with the same
/// flags, keys and elements, same chains, same rules (by id, in order) made
/// of the same expressions.
pub fn differences(model: &Ruleset, kernel: &KernelTable) -> Result<Vec<Difference>, Error> {
    let mut found = Vec::new();
    if kernel.digest.as_deref() != Some(model.digest.as_str()) {
        found.push(Difference::Digest {
            kernel: kernel.digest.clone(),
            model: model.digest.clone(),
        });
    }

    let kernel_sets: BTreeMap<&str, &KernelSet> =
        kernel.sets.iter().map(|s| (s.name.as_str(), s)).collect();
    for set in &model.sets {
        let Some(ks) = kernel_sets.get(set.name.as_str()) else {
            found.push(Difference::MissingSet(set.name.clone()));
            continue;
        };
        let definition = elements::set_definition(set, 0)?;
        let want = set_shape(definition.flags, definition.key_type, definition.key_len);
        let have = set_shape(ks.flags, ks.key_type, ks.key_len);
        if want != have {
            found.push(Difference::SetDefinition {
                set: set.name.clone(),
                kernel: have,
                model: want,
            });
            continue;
        }
        // Compare keys, ends and interval-end flags; timeouts change with time.
        let strip = |e: &RawElement| RawElement {
            timeout_ms: None,
            expiration_ms: None,
            ..e.clone()
        };
        let want: BTreeSet<RawElement> = elements::encode_all(set)?.iter().map(strip).collect();
        let have: BTreeSet<RawElement> = ks.elements.iter().map(strip).collect();
        if want != have {
            found.push(Difference::SetElements {
                set: set.name.clone(),
                only_model: want.difference(&have).map(describe_raw).collect(),
                only_kernel: have.difference(&want).map(describe_raw).collect(),
            });
        }
    }
    for set in &kernel.sets {
        if model.set(&set.name).is_none() {
            found.push(Difference::ExtraSet(set.name.clone()));
        }
    }

    for chain in &model.chains {
        let Some(kc) = kernel.chains.iter().find(|c| c.name == chain.name) else {
            found.push(Difference::MissingChain(chain.name.clone()));
            continue;
        };
        let want = match chain.base {
            None => chain_shape(None, None, None, None),
            Some(base) => chain_shape(
                Some(match base.hook {
                    Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
                    Hook::Forward => libc::NF_INET_FORWARD as u32,
                    Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
                }),
                Some(base.priority),
                Some(match base.policy {
                    ChainPolicy::Accept => libc::NF_ACCEPT as u32,
                    ChainPolicy::Drop => libc::NF_DROP as u32,
                }),
                Some(chain_type_name(base.kind)),
            ),
        };
        let have = chain_shape(kc.hook, kc.priority, kc.policy, kc.chain_type.as_deref());
        if want != have {
            found.push(Difference::ChainDefinition {
                chain: chain.name.clone(),
                kernel: have,
                model: want,
            });
        }
        let want_ids: Vec<String> = chain.rules.iter().map(|r| r.id.clone()).collect();
        let have_ids: Vec<String> = kc.rules.iter().map(KernelRule::label).collect();
        if want_ids != have_ids {
            found.push(Difference::Rules {
                chain: chain.name.clone(),
                kernel: have_ids,
                model: want_ids,
            });
            continue;
        }
        for (rule, kr) in chain.rules.iter().zip(&kc.rules) {
            let want: Vec<String> = batch::expression_names(rule)
                .into_iter()
                .map(String::from)
                .collect();
            let have: Vec<String> = kr.expressions.iter().map(|e| e.name.clone()).collect();
            if want != have {
                found.push(Difference::RuleExpressions {
                    chain: chain.name.clone(),
                    rule: rule.id.clone(),
                    kernel: have,
                    model: want,
                });
            }
        }
    }
    for chain in &kernel.chains {
        if model.chain(&chain.name).is_none() {
            found.push(Difference::ExtraChain(chain.name.clone()));
        }
    }
    Ok(found)
}

/// One named set in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SetStatus {
    pub name: String,
    /// Elements (ranges count once).
    pub elements: usize,
    pub interval: bool,
    pub timeout: bool,
}

/// One chain in `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainStatus {
    pub name: String,
    /// `output`/`forward` for a base chain.
    pub hook: Option<String>,
    pub policy: Option<String>,
    pub rules: usize,
}

/// The counter of one rule that counts (the deny rules).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleCounter {
    pub chain: String,
    pub rule: String,
    pub packets: u64,
    pub bytes: u64,
}

/// What `netleash status` reports about the table in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableStatus {
    /// Digest of the policy in force (the table comment), if the table has one.
    pub digest: Option<String>,
    pub sets: Vec<SetStatus>,
    pub chains: Vec<ChainStatus>,
    /// Packet and byte counters of every rule with a counter, by rule id.
    pub counters: Vec<RuleCounter>,
}

impl TableStatus {
    pub fn of(table: &KernelTable) -> TableStatus {
        let sets = table
            .sets
            .iter()
            .map(|s| SetStatus {
                name: s.name.clone(),
                elements: elements::logical_count(&s.elements),
                interval: s.interval(),
                timeout: s.timeout(),
            })
            .collect();
        let chains = table
            .chains
            .iter()
            .map(|c| ChainStatus {
                name: c.name.clone(),
                hook: c.hook.map(|h| hook_name(h).to_string()),
                policy: c.policy.map(|p| policy_name(p).to_string()),
                rules: c.rules.len(),
            })
            .collect();
        let mut counters = Vec::new();
        for chain in &table.chains {
            for rule in &chain.rules {
                for (packets, bytes) in rule.expressions.iter().filter_map(|e| e.counter) {
                    counters.push(RuleCounter {
                        chain: chain.name.clone(),
                        rule: rule.label(),
                        packets,
                        bytes,
                    });
                }
            }
        }
        TableStatus {
            digest: table.digest.clone(),
            sets,
            chains,
            counters,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{CompileOptions, Dialect, Mode, Policy};

    fn ruleset() -> Ruleset {
        let policy = Policy {
            mode: Mode::Unrestricted,
            dialect: Dialect::Unrestricted,
            rules: vec![],
            blocklist: vec![crate::policy::BlockEntry {
                net: "169.254.0.0/16".parse().unwrap(),
                reason: "link-local".into(),
            }],
            warnings: vec![],
        };
        crate::ruleset::compile(&policy, &CompileOptions::default())
    }

    /// The kernel table that exactly matches a model, built from the model's own encoding.
    fn mirror(model: &Ruleset) -> KernelTable {
        KernelTable {
            digest: Some(model.digest.clone()),
            sets: model
                .sets
                .iter()
                .map(|s| {
                    let d = elements::set_definition(s, 0).unwrap();
                    KernelSet {
                        name: s.name.clone(),
                        flags: d.flags,
                        key_type: d.key_type,
                        key_len: d.key_len,
                        elements: elements::encode_all(s).unwrap(),
                    }
                })
                .collect(),
            chains: model
                .chains
                .iter()
                .map(|c| KernelChain {
                    name: c.name.clone(),
                    hook: c.base.map(|b| match b.hook {
                        Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
                        Hook::Forward => libc::NF_INET_FORWARD as u32,
                        Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
                    }),
                    priority: c.base.map(|b| b.priority),
                    policy: c.base.map(|b| match b.policy {
                        ChainPolicy::Accept => libc::NF_ACCEPT as u32,
                        ChainPolicy::Drop => libc::NF_DROP as u32,
                    }),
                    chain_type: c.base.map(|b| chain_type_name(b.kind).to_string()),
                    rules: c
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| KernelRule {
                            id: Some(r.id.clone()),
                            handle: i as u64,
                            expressions: batch::expression_names(r)
                                .into_iter()
                                .map(|n| ParsedExpr {
                                    name: n.into(),
                                    counter: None,
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn an_exact_mirror_has_no_differences() {
        let model = ruleset();
        assert_eq!(differences(&model, &mirror(&model)).unwrap(), vec![]);
    }

    #[test]
    fn a_missing_interval_end_is_a_difference() {
        let model = ruleset();
        let mut kernel = mirror(&model);
        let blocklist = kernel
            .sets
            .iter_mut()
            .find(|s| s.name == "blocklist_v4")
            .unwrap();
        blocklist.elements.retain(|e| !e.interval_end);
        let found = differences(&model, &kernel).unwrap();
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].to_string().contains("169.254.0.0 (interval end)")
                || found[0].to_string().contains("169.255.0.0")
        );
    }

    #[test]
    fn reordered_rules_and_other_digests_are_differences() {
        let model = ruleset();
        let mut kernel = mirror(&model);
        kernel.digest = Some("sha256:other".into());
        let egress = kernel
            .chains
            .iter_mut()
            .find(|c| c.name == "egress")
            .unwrap();
        egress.rules.swap(0, 1);
        let found = differences(&model, &kernel).unwrap();
        assert!(matches!(found[0], Difference::Digest { .. }));
        assert!(
            found
                .iter()
                .any(|d| matches!(d, Difference::Rules { chain, .. } if chain == "egress"))
        );
    }

    #[test]
    fn status_counts_ranges_once() {
        let model = ruleset();
        let status = TableStatus::of(&mirror(&model));
        let blocklist = status
            .sets
            .iter()
            .find(|s| s.name == "blocklist_v4")
            .unwrap();
        assert_eq!(blocklist.elements, 1);
    }
}
