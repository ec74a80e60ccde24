//! Read the `inet netleash` table back from the kernel (netlink dumps parsed
//! by `attributes`) and compare it with the model.
//!
//! A read is consistent: the ruleset generation id is read before and after
//! the dumps, and the read is repeated if anything committed in between
//! (every nf_tables commit bumps the generation; a dump that raced with a
//! commit is also flagged `NLM_F_DUMP_INTR`). The id is returned with the
//! table, so a transaction built from the reading can carry it (see
//! `netlink::Transaction::expect_generation`).
//!
//! The table is read as the policy in force: what its base chains reach
//! through jumps and set lookups, named by model name (the generation suffix
//! of the generation in force stripped, see `kernel::generation`). Objects
//! nothing reaches (what is left of other generations) are listed apart:
//! they do not affect any packet.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;

use super::attributes::{self, AnonymousContents, ExprData, ParsedExpr, ParsedSet, Reference};
use super::elements::{self, describe_raw};
use super::ffi::{self, RawElement, Request};
use super::generation;
use super::netlink::{Echo, Netlink};
use super::rule_message::is_anonymous_set;
use super::{Error, batch, expressions, table_name};
use crate::ruleset::{ChainKind, Ruleset, SetRole, TABLE_NAME};

/// How often a read is retried when the ruleset changes under it.
const READ_ATTEMPTS: usize = 5;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KernelSet {
    /// The model name (for a leftover, the kernel name).
    pub name: String,
    /// The name in the kernel.
    pub kernel_name: String,
    pub flags: u32,
    pub key_type: u32,
    pub key_len: u32,
    /// Empty when the set's elements were not read (a leftover's elements
    /// are never read).
    pub elements: Vec<RawElement>,
    /// Whether `elements` are what the kernel holds (read, or known, see
    /// [`ElementPlan::known`]) at the reading's ruleset generation id.
    pub elements_read: bool,
    /// The model set a verification found this set to hold exactly (set by
    /// `kernel::Session` after a verification without differences), so that
    /// the next apply can tell an unchanged set by comparing models instead
    /// of encoding and comparing elements.
    pub verified_as: Option<crate::ruleset::Set>,
}

impl KernelSet {
    /// A set as listed, under its kernel name, its elements not read yet.
    fn listed(set: ParsedSet) -> KernelSet {
        KernelSet {
            name: set.name.clone(),
            kernel_name: set.name,
            flags: set.flags,
            key_type: set.key_type,
            key_len: set.key_len,
            elements: Vec::new(),
            elements_read: false,
            verified_as: None,
        }
    }

    pub fn interval(&self) -> bool {
        self.flags & libc::NFT_SET_INTERVAL as u32 != 0
    }

    pub fn timeout(&self) -> bool {
        self.flags & libc::NFT_SET_TIMEOUT as u32 != 0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KernelRule {
    /// The rule's comment up to its first space: netleash's rule id.
    pub id: Option<String>,
    /// The policy digest a base chain's entry rule carries in its comment
    /// after the id (see `generation::entry_comment`).
    pub digest: Option<String>,
    pub handle: u64,
    /// The expressions; their references carry kernel names.
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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KernelChain {
    /// The model name (for a leftover, the kernel name).
    pub name: String,
    /// The name in the kernel.
    pub kernel_name: String,
    pub hook: Option<u32>,
    pub priority: Option<i32>,
    pub policy: Option<u32>,
    pub chain_type: Option<String>,
    /// The chain's comment: a generation's chains carry the policy digest.
    pub comment: Option<String>,
    pub rules: Vec<KernelRule>,
}

impl KernelChain {
    /// A chain as listed, under its kernel name, its rules not read yet.
    fn listed(chain: attributes::ParsedChain) -> KernelChain {
        let comment = ffi::udata_find(
            &chain.userdata,
            nftnl::nftnl_sys::NFTNL_UDATA_CHAIN_COMMENT as u8,
        )
        .map(ffi::udata_string);
        KernelChain {
            name: chain.name.clone(),
            kernel_name: chain.name,
            hook: chain.hook,
            priority: chain.priority,
            policy: chain.policy,
            chain_type: chain.chain_type,
            comment,
            rules: Vec::new(),
        }
    }
}

/// The table as the kernel holds it. Anonymous sets are left out: they belong to their rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct KernelTable {
    /// The digest of the policy in force: the digest the base chains'
    /// entry rules carry (all must agree; see `generation::entry_comment`);
    /// for a table an earlier netleash wrote in generations, whose entry
    /// rules carry none, the comment of the chain they jump into; for a
    /// table not written in generations, the table's comment.
    pub digest: Option<String>,
    /// The comment the chains of the generation in force carry (all must
    /// agree): its shape digest and the policy it was staged for
    /// (`generation::generation_comment`), or for a generation an earlier
    /// netleash staged, the digest of the policy it was staged for.
    pub generation_comment: Option<String>,
    /// The generation in force, if the base chains jump into one.
    pub generation: Option<u32>,
    /// The sets the base chains reach, in the kernel's order.
    pub sets: Vec<KernelSet>,
    /// The base chains and the chains they reach, in the kernel's order.
    pub chains: Vec<KernelChain>,
    /// Sets and chains nothing reaches, by kernel name, in the kernel's order.
    pub leftover_sets: Vec<KernelSet>,
    pub leftover_chains: Vec<KernelChain>,
}

impl KernelTable {
    /// The model name of an object of the generation in force.
    pub fn model_name<'a>(&self, kernel_name: &'a str) -> &'a str {
        match (generation::split(kernel_name), self.generation) {
            (Some((model, of)), Some(in_force)) if of == in_force => model,
            _ => kernel_name,
        }
    }

    /// The model name of a set the generation in force looks up: a set whose
    /// definition and elements did not change is kept from the generation
    /// that created it (see `generation::Swap::reuse`), so any generation
    /// suffix up to the one in force is stripped. What such a set holds is
    /// compared like any other set in force.
    pub fn set_model_name<'a>(&self, kernel_name: &'a str) -> &'a str {
        match (generation::split(kernel_name), self.generation) {
            (Some((model, of)), Some(in_force)) if of <= in_force => model,
            _ => kernel_name,
        }
    }
}

/// A consistent reading of the table and the ruleset generation id it was read at.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// The ruleset generation id (`NFT_MSG_GETGEN`) the reading is valid for.
    pub genid: u32,
    /// The table, or `None` if there is none.
    pub table: Option<KernelTable>,
}

/// How much of the table to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detail {
    /// Sets, chains and rules, without set elements (enough to plan a change).
    Shape,
    /// Everything, elements included (to verify or report).
    Full,
}

/// Whose elements a reading of the table gets, among the sets in force
/// (leftovers' elements are never read: they are deleted, not compared).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ElementPlan {
    /// Whether to read elements at all.
    pub read: bool,
    /// Sets whose elements are not read, by model name (the DNS-derived
    /// sets, whose elements are not compared).
    pub skip: BTreeSet<String>,
    /// Elements the kernel is known to hold, by kernel name, as long as the
    /// ruleset generation id is `known_at`: no commit, so no change, since
    /// they were read. Taken instead of read when the reading finds that id.
    pub known: BTreeMap<String, Vec<RawElement>>,
    pub known_at: Option<u32>,
}

impl ElementPlan {
    fn of(detail: Detail) -> ElementPlan {
        ElementPlan {
            read: detail == Detail::Full,
            ..ElementPlan::default()
        }
    }
}

fn malformed(what: &str) -> Error {
    Error::Malformed(format!("cannot parse a {what} message from the kernel"))
}

pub fn generation_id(netlink: &mut Netlink) -> Result<u32, Error> {
    let mut id = None;
    let table = table_name();
    let answer = netlink.dump(Request::Generation, &table, &mut |message| {
        id = Some(attributes::parse_generation(message).ok_or_else(|| malformed("generation"))?);
        Ok(())
    })?;
    answer.map_err(|errno| Error::Dump {
        what: "the ruleset generation",
        source: std::io::Error::from_raw_os_error(errno),
    })?;
    id.ok_or_else(|| malformed("generation"))
}

/// The named sets of the table (without elements), by kernel name. Fails
/// with `NoTable` if the table is absent.
pub fn read_sets(netlink: &mut Netlink) -> Result<Vec<ParsedSet>, Error> {
    Ok(read_all_sets(netlink)?.0)
}

/// The named sets and the anonymous sets of the table (without elements),
/// by kernel name. Fails with `NoTable` if the table is absent.
fn read_all_sets(netlink: &mut Netlink) -> Result<(Vec<ParsedSet>, Vec<ParsedSet>), Error> {
    let table = table_name();
    let mut sets = Vec::new();
    let mut anonymous = Vec::new();
    let answer = netlink.dump(Request::Sets, &table, &mut |message| {
        let set = attributes::parse_set(message).ok_or_else(|| malformed("set"))?;
        if set.table == TABLE_NAME && set.family == libc::NFPROTO_INET as u32 {
            if set.flags & libc::NFT_SET_ANONYMOUS as u32 == 0 {
                sets.push(set);
            } else {
                anonymous.push(set);
            }
        }
        Ok(())
    })?;
    match answer {
        Ok(_) => Ok((sets, anonymous)),
        Err(libc::ENOENT) => Err(Error::NoTable),
        Err(errno) => Err(Error::Dump {
            what: "the sets",
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// Read the whole table, consistently.
pub fn read_table(netlink: &mut Netlink, detail: Detail) -> Result<Snapshot, Error> {
    read_table_with(netlink, &ElementPlan::of(detail))
}

/// Read the table, consistently, with the elements `plan` asks for.
pub fn read_table_with(netlink: &mut Netlink, plan: &ElementPlan) -> Result<Snapshot, Error> {
    read(netlink, plan, Confirm::Yes)
}

/// Read the table with the elements `plan` asks for, to build a transaction
/// that carries the snapshot's generation id: the id is read before the
/// dumps and not confirmed after them, since if anything committed during
/// the read, the kernel refuses that transaction (`RulesetChanged`), and
/// the caller reads again. A snapshot whose transaction the kernel accepted
/// was therefore consistent. Saves one round trip.
pub fn read_table_to_change(netlink: &mut Netlink, plan: &ElementPlan) -> Result<Snapshot, Error> {
    read(netlink, plan, Confirm::No)
}

/// Whether a reading confirms the generation id after its dumps.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Confirm {
    Yes,
    No,
}

fn read(netlink: &mut Netlink, plan: &ElementPlan, confirm: Confirm) -> Result<Snapshot, Error> {
    for _ in 0..READ_ATTEMPTS {
        let before = generation_id(netlink)?;
        let (table, interrupted) = match read_table_once(netlink)? {
            Some((mut raw, mut interrupted)) => {
                let mut anonymous = std::mem::take(&mut raw.anonymous);
                let mut table = in_force(raw);
                // A reading that reads elements is compared with a model,
                // also one to change the table: whether a change can be an
                // edit in place depends on every rule being the model's,
                // the contents of its anonymous sets included.
                if plan.read {
                    interrupted |= read_anonymous(netlink, &mut table, &mut anonymous)?;
                }
                let known_now = plan.known_at == Some(before);
                for set in table.sets.iter_mut().filter(|_| plan.read) {
                    if plan.skip.contains(&set.name) {
                        continue;
                    }
                    match plan.known.get(&set.kernel_name).filter(|_| known_now) {
                        Some(known) => set.elements = known.clone(),
                        None => interrupted |= read_elements(netlink, set)?,
                    }
                    set.elements_read = true;
                }
                (Some(table), interrupted)
            }
            None => (None, false),
        };
        if !interrupted && (confirm == Confirm::No || generation_id(netlink)? == before) {
            return Ok(Snapshot {
                genid: before,
                table,
            });
        }
    }
    Err(Error::Unstable {
        attempts: READ_ATTEMPTS,
    })
}

/// The table as listed by the kernel: every object under its kernel name.
#[derive(Clone, Default)]
struct RawTable {
    comment: Option<String>,
    sets: Vec<KernelSet>,
    chains: Vec<KernelChain>,
    /// The anonymous sets, their elements not read (see [`attach_anonymous`]).
    anonymous: Vec<KernelSet>,
}

/// Read the elements of the anonymous sets among `anonymous` that the rules
/// of `table` look up, and attach them to those lookups. Returns whether a
/// dump was interrupted; a lookup of an anonymous set that is not listed
/// (created since the sets were listed) is an interruption too.
fn read_anonymous(
    netlink: &mut Netlink,
    table: &mut KernelTable,
    anonymous: &mut [KernelSet],
) -> Result<bool, Error> {
    let mut interrupted = false;
    for set in anonymous.iter_mut() {
        if looks_up(table, &set.kernel_name) {
            interrupted |= read_elements(netlink, set)?;
            set.elements_read = true;
        }
    }
    Ok(interrupted | !attach_anonymous(table, anonymous))
}

/// Whether a rule of `table` looks up set `name`.
fn looks_up(table: &KernelTable, name: &str) -> bool {
    table
        .chains
        .iter()
        .flat_map(|c| &c.rules)
        .flat_map(|r| &r.expressions)
        .any(|e| matches!(&e.reference, Some(Reference::Set(set)) if set == name))
}

/// Attach to each lookup of an anonymous set in `table` what the set holds,
/// from `anonymous` (sets whose elements were read). Returns whether every
/// such lookup got its set's contents.
fn attach_anonymous(table: &mut KernelTable, anonymous: &[KernelSet]) -> bool {
    let mut complete = true;
    for expr in table
        .chains
        .iter_mut()
        .flat_map(|c| &mut c.rules)
        .flat_map(|r| &mut r.expressions)
    {
        let (
            Some(Reference::Set(name)),
            ExprData::Lookup {
                anonymous: slot, ..
            },
        ) = (&expr.reference, &mut expr.data)
        else {
            continue;
        };
        if !is_anonymous_set(name) || slot.is_some() {
            continue;
        }
        match anonymous
            .iter()
            .find(|s| s.kernel_name == *name && s.elements_read)
        {
            Some(set) => {
                // In key order: an echo and a dump list them in other orders.
                let mut elements = set.elements.clone();
                elements.sort_unstable();
                *slot = Some(Box::new(AnonymousContents {
                    flags: set.flags,
                    key_type: set.key_type,
                    key_len: set.key_len,
                    elements,
                }))
            }
            None => complete = false,
        }
    }
    complete
}

/// Read the elements of `set` into it. Returns whether the dump was interrupted.
pub fn read_elements(netlink: &mut Netlink, set: &mut KernelSet) -> Result<bool, Error> {
    let table = table_name();
    let name = std::ffi::CString::new(set.kernel_name.clone()).map_err(|_| malformed("set"))?;
    let mut elements = Vec::new();
    let answer = netlink.dump(Request::Elements(&name), &table, &mut |message| {
        let (_, parsed) =
            attributes::parse_elements(message).ok_or_else(|| malformed("set element"))?;
        elements.extend(parsed);
        Ok(())
    })?;
    set.elements = elements;
    // A set deleted since the sets were listed is an interruption too.
    dump_result(answer, "set elements")
}

/// Whether a table-wide dump was interrupted; a table deleted meanwhile
/// (ENOENT) counts as an interruption, which the generation check repeats.
fn dump_result(answer: Result<bool, i32>, what: &'static str) -> Result<bool, Error> {
    match answer {
        Ok(interrupted) => Ok(interrupted),
        Err(libc::ENOENT) => Ok(true),
        Err(errno) => Err(Error::Dump {
            what,
            source: std::io::Error::from_raw_os_error(errno),
        }),
    }
}

/// The table's sets (without elements), chains and rules, and whether a dump was interrupted.
fn read_table_once(netlink: &mut Netlink) -> Result<Option<(RawTable, bool)>, Error> {
    let table = table_name();
    let mut parsed_table = None;
    let answer = netlink.dump(Request::Table, &table, &mut |message| {
        parsed_table = Some(attributes::parse_table(message).ok_or_else(|| malformed("table"))?);
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
    let comment = ffi::udata_find(
        &parsed_table.userdata,
        nftnl::nftnl_sys::NFTNL_UDATA_TABLE_COMMENT as u8,
    )
    .map(ffi::udata_string);
    let mut interrupted = false;
    let (sets, anonymous) = match read_all_sets(netlink) {
        Ok(sets) => sets,
        // The table was deleted since it was read: read again.
        Err(Error::NoTable) => return Ok(Some((RawTable::default(), true))),
        Err(err) => return Err(err),
    };
    let sets = sets.into_iter().map(KernelSet::listed).collect();
    let anonymous = anonymous.into_iter().map(KernelSet::listed).collect();

    let mut chains = Vec::new();
    let answer = netlink.dump(Request::Chains, &table, &mut |message| {
        let chain = attributes::parse_chain(message).ok_or_else(|| malformed("chain"))?;
        if chain.table == TABLE_NAME && chain.family == libc::NFPROTO_INET as u32 {
            chains.push(KernelChain::listed(chain));
        }
        Ok(())
    })?;
    interrupted |= dump_result(answer, "the chains")?;

    // A table with the regular chains of one generation at most (what an
    // apply leaves) is read in one rule dump: every chain's rules are the
    // policy in force, or nearly. Otherwise (right after a swap, both
    // generations are there) only the rules of the chains the base chains
    // reach are read, chain by chain, following jumps: the rules of other
    // chains decide no packet and are never compared.
    let generations: BTreeSet<u32> = chains
        .iter()
        .filter(|c| c.hook.is_none())
        .filter_map(|c| generation::split(&c.kernel_name).map(|(_, g)| g))
        .collect();
    if generations.len() <= 1 {
        let mut stray = None;
        let answer = netlink.dump(Request::Rules, &table, &mut |message| {
            let rule = attributes::parse_rule(message).ok_or_else(|| malformed("rule"))?;
            let chain = chains.iter_mut().find(|c| {
                rule.table == TABLE_NAME
                    && rule.family == libc::NFPROTO_INET as u32
                    && c.kernel_name == rule.chain
            });
            match chain {
                Some(chain) => chain.rules.push(kernel_rule(rule)),
                None => stray = Some(rule.chain),
            }
            Ok(())
        })?;
        // A rule of a chain created since the chains were listed: read again.
        interrupted |= dump_result(answer, "the rules")? || stray.is_some();
        return Ok(Some((
            RawTable {
                comment,
                sets,
                chains,
                anonymous,
            },
            interrupted,
        )));
    }
    let mut queue: Vec<usize> = (0..chains.len())
        .filter(|&i| chains[i].hook.is_some())
        .collect();
    let mut visited: BTreeSet<usize> = queue.iter().copied().collect();
    while let Some(index) = queue.pop() {
        let chain = &mut chains[index];
        let name =
            std::ffi::CString::new(chain.kernel_name.clone()).map_err(|_| malformed("chain"))?;
        let mut stray = false;
        let answer = netlink.dump(Request::ChainRules(&name), &table, &mut |message| {
            let rule = attributes::parse_rule(message).ok_or_else(|| malformed("rule"))?;
            if rule.table != TABLE_NAME
                || rule.family != libc::NFPROTO_INET as u32
                || rule.chain != chain.kernel_name
            {
                stray = true;
                return Ok(());
            }
            chain.rules.push(kernel_rule(rule));
            Ok(())
        })?;
        if stray {
            return Err(Error::Malformed(format!(
                "the kernel answered a dump of chain {:?} with rules of another chain",
                chain.kernel_name
            )));
        }
        // A chain deleted since the chains were listed is an interruption.
        interrupted |= dump_result(answer, "the rules")?;
        let targets: Vec<String> = chain_references(chain).map(str::to_string).collect();
        for target in targets {
            match chains.iter().position(|c| c.kernel_name == target) {
                Some(reached) if visited.insert(reached) => queue.push(reached),
                Some(_) => {}
                // A chain created after the chains were listed: read again.
                None => interrupted = true,
            }
        }
    }
    Ok(Some((
        RawTable {
            comment,
            sets,
            chains,
            anonymous,
        },
        interrupted,
    )))
}

/// The table after committed transactions, composed from `before` (the
/// table as it was at the ruleset generation id the first of them carried)
/// and what the kernel echoed of each (see `netlink::Echo`), or `None` if
/// the echo does not tell the whole policy in force.
///
/// Why this is the table the kernel holds: each transaction carried the
/// generation id the previous one left (`NFNL_BATCH_GENID`), so the kernel
/// committed the first onto exactly `before`, and nothing else committed in
/// between; and each commit echoed every object it created, changed or
/// deleted, encoded by the same `nf_tables_fill_*` functions as a dump,
/// from the objects as committed. A new chain starts empty and holds the
/// rules echoed for it, in order (rules are appended); a base chain holds
/// what `before` read minus the echoed deletions plus the echoed additions.
/// The comparison with the model that follows is the same as after a dump:
/// a chain reached that the model does not have, a lookup into another set,
/// a missing element all show.
///
/// What the echo cannot tell makes this `None`, and the caller reads the
/// table instead: a chain reached whose rules `before` did not read (a
/// leftover of another generation), a change to an object `before` does
/// not know, an echo it cannot parse, a table not written in generations.
///
/// A set the transactions created holds the elements echoed for it, if any
/// were: the kernel notifies every element it commits into a set when the
/// element message asked for an echo (`nf_tables_setelem_notify`), which
/// `netlink::Transaction::add_new_set_elements` does for small sets. Such a
/// set comes back with `elements_read` true, and its name in the second
/// result, so that the caller can dump it after all should it not hold what
/// the model says. A created set with no element echoed (a large one, or an
/// empty one) comes back with `elements_read` false, for the caller to read.
pub fn compose(
    before: Option<&KernelTable>,
    echoes: &[&Echo],
) -> Option<(KernelTable, BTreeSet<String>)> {
    let mut raw = RawTable::default();
    // Sets created by these transactions, and those of them whose elements
    // were echoed.
    let mut created: BTreeSet<String> = BTreeSet::new();
    let mut echoed: BTreeSet<String> = BTreeSet::new();
    // Chains whose every rule is known: read in `before`, or created in the echo.
    let mut rules_known: BTreeSet<String> = BTreeSet::new();
    if let Some(before) = before {
        before.generation?;
        for chain in &before.chains {
            rules_known.insert(chain.kernel_name.clone());
            raw.chains.push(KernelChain {
                name: chain.kernel_name.clone(),
                ..chain.clone()
            });
        }
        for chain in &before.leftover_chains {
            raw.chains.push(KernelChain {
                name: chain.kernel_name.clone(),
                rules: Vec::new(),
                ..chain.clone()
            });
        }
        for set in before.sets.iter().chain(&before.leftover_sets) {
            raw.sets.push(KernelSet {
                name: set.kernel_name.clone(),
                ..set.clone()
            });
        }
    }
    let ours =
        |table: &str, family: u32| table == TABLE_NAME && family == libc::NFPROTO_INET as u32;
    for message in echoes.iter().flat_map(|echo| echo.messages()) {
        match i32::from(Echo::kind(message)?) {
            // The table itself: created (there was none before) or unchanged.
            libc::NFT_MSG_NEWTABLE | libc::NFT_MSG_NEWGEN => {}
            libc::NFT_MSG_NEWCHAIN => {
                let chain = attributes::parse_chain(message)?;
                if !ours(&chain.table, chain.family) {
                    return None;
                }
                let chain = KernelChain::listed(chain);
                match raw.chains.iter_mut().find(|c| c.kernel_name == chain.name) {
                    // An update (a base chain's policy): the echo is the chain as committed.
                    Some(existing) => {
                        existing.hook = chain.hook.or(existing.hook);
                        existing.priority = chain.priority.or(existing.priority);
                        existing.policy = chain.policy.or(existing.policy);
                        existing.chain_type = chain.chain_type.or(existing.chain_type.take());
                        existing.comment = chain.comment.or(existing.comment.take());
                    }
                    None => {
                        rules_known.insert(chain.name.clone());
                        raw.chains.push(chain);
                    }
                }
            }
            libc::NFT_MSG_DELCHAIN => {
                let chain = attributes::parse_chain(message)?;
                raw.chains.retain(|c| c.kernel_name != chain.name);
                rules_known.remove(&chain.name);
            }
            libc::NFT_MSG_NEWRULE | libc::NFT_MSG_DELRULE => {
                let rule = attributes::parse_rule(message)?;
                if !ours(&rule.table, rule.family) {
                    return None;
                }
                let known = rules_known.contains(&rule.chain);
                let chain = raw
                    .chains
                    .iter_mut()
                    .find(|c| c.kernel_name == rule.chain)?;
                if i32::from(Echo::kind(message)?) == libc::NFT_MSG_DELRULE {
                    let count = chain.rules.len();
                    chain.rules.retain(|r| r.handle != rule.handle);
                    if known && chain.rules.len() == count {
                        return None;
                    }
                } else if known {
                    chain.rules.push(kernel_rule(rule));
                }
            }
            libc::NFT_MSG_NEWSET => {
                let set = attributes::parse_set(message)?;
                if !ours(&set.table, set.family) {
                    return None;
                }
                if set.flags & libc::NFT_SET_ANONYMOUS as u32 != 0 {
                    // Its elements follow (`batch` has them echoed): it
                    // starts empty.
                    let mut set = KernelSet::listed(set);
                    set.elements_read = true;
                    raw.anonymous.push(set);
                    continue;
                }
                if raw.sets.iter().any(|s| s.kernel_name == set.name) {
                    return None;
                }
                // Its elements are known only if they are echoed (below).
                created.insert(set.name.clone());
                raw.sets.push(KernelSet::listed(set));
            }
            libc::NFT_MSG_DELSET => {
                let set = attributes::parse_set(message)?;
                created.remove(&set.name);
                echoed.remove(&set.name);
                raw.sets.retain(|s| s.kernel_name != set.name);
            }
            libc::NFT_MSG_NEWSETELEM => {
                let (name, elements) = attributes::parse_elements(message)?;
                match raw.sets.iter_mut().find(|s| s.kernel_name == name) {
                    // A new set starts empty: it holds what is echoed for it.
                    Some(set) if created.contains(&name) => {
                        set.elements.extend(elements);
                        set.elements_read = true;
                        echoed.insert(name);
                    }
                    Some(set) if set.elements_read => set.elements.extend(elements),
                    // Elements of a set whose elements are not compared (a
                    // DNS-derived set).
                    Some(_) => {}
                    None => match raw.anonymous.iter_mut().find(|s| s.kernel_name == name) {
                        Some(set) => set.elements.extend(elements),
                        None => return None,
                    },
                }
            }
            // Elements removed from a set changed in place (echoed only
            // when the additions are too, `batch::edit_is_echoed`): each is
            // one the set held, else the echo does not fit what is known.
            libc::NFT_MSG_DELSETELEM => {
                let (name, elements) = attributes::parse_elements(message)?;
                let set = raw.sets.iter_mut().find(|s| s.kernel_name == name)?;
                if set.elements_read {
                    for element in &elements {
                        let held = set
                            .elements
                            .iter()
                            .position(|e| compared(e) == compared(element))?;
                        set.elements.swap_remove(held);
                    }
                }
            }
            _ => return None,
        }
    }
    let anonymous = std::mem::take(&mut raw.anonymous);
    let mut table = in_force(raw);
    // A lookup of an anonymous set that this echo did not create (or whose
    // elements it did not show) cannot be verified from it.
    let complete = attach_anonymous(&mut table, &anonymous);
    (complete
        && table
            .chains
            .iter()
            .all(|c| rules_known.contains(&c.kernel_name)))
    .then_some((table, echoed))
}

/// A rule as read, with its comment as its id (and digest, see
/// `generation::split_entry_comment`).
fn kernel_rule(rule: attributes::ParsedRule) -> KernelRule {
    let comment = ffi::udata_find(
        &rule.userdata,
        nftnl::nftnl_sys::NFTNL_UDATA_RULE_COMMENT as u8,
    )
    .map(ffi::udata_string);
    let (id, digest) = match comment.as_deref().map(generation::split_entry_comment) {
        Some((id, digest)) => (Some(id.to_string()), digest.map(str::to_string)),
        None => (None, None),
    };
    KernelRule {
        id,
        digest,
        handle: rule.handle,
        expressions: rule.expressions,
    }
}

/// The chains a chain's rules jump or go to, by kernel name.
fn chain_references(chain: &KernelChain) -> impl Iterator<Item = &str> {
    chain
        .rules
        .iter()
        .flat_map(|r| &r.expressions)
        .filter_map(|e| match &e.reference {
            Some(Reference::Jump(target) | Reference::Goto(target)) => Some(target.as_str()),
            _ => None,
        })
}

/// The value every item of `items` has, if there is at least one and they
/// all agree.
fn unanimous<T: PartialEq>(mut items: impl Iterator<Item = T>) -> Option<T> {
    let first = items.next()?;
    items.all(|item| item == first).then_some(first)
}

/// Split a raw table into what its base chains reach (the policy in force,
/// by model name) and the leftovers.
fn in_force(raw: RawTable) -> KernelTable {
    let RawTable {
        comment,
        sets,
        chains,
        anonymous: _,
    } = raw;
    let bases: Vec<&KernelChain> = chains.iter().filter(|c| c.hook.is_some()).collect();
    let entries: Vec<&str> = bases.iter().flat_map(|c| chain_references(c)).collect();
    let generation = unanimous(
        entries
            .iter()
            .map(|name| generation::split(name).map(|(_, g)| g)),
    )
    .flatten();

    let mut reached: BTreeSet<String> = bases.iter().map(|c| c.kernel_name.clone()).collect();
    let mut queue: Vec<String> = reached.iter().cloned().collect();
    while let Some(name) = queue.pop() {
        if let Some(chain) = chains.iter().find(|c| c.kernel_name == name) {
            for target in chain_references(chain) {
                if reached.insert(target.to_string()) {
                    queue.push(target.to_string());
                }
            }
        }
    }
    let looked_up: BTreeSet<String> = chains
        .iter()
        .filter(|c| reached.contains(&c.kernel_name))
        .flat_map(|c| &c.rules)
        .flat_map(|r| &r.expressions)
        .filter_map(|e| match &e.reference {
            Some(Reference::Set(set)) => Some(set.clone()),
            _ => None,
        })
        .collect();
    // The comment of the generation's chains, if they all carry the same.
    let generation_comment = unanimous(
        chains
            .iter()
            .filter(|c| c.hook.is_none() && reached.contains(&c.kernel_name))
            .map(|c| c.comment.as_deref()),
    )
    .flatten()
    .filter(|_| generation.is_some())
    .map(str::to_string);
    let entry_digest = unanimous(
        bases
            .iter()
            .flat_map(|c| &c.rules)
            .map(|r| r.digest.as_deref()),
    );
    let digest = match (generation, entry_digest) {
        (None, _) => comment,
        (Some(_), Some(Some(digest))) => Some(digest.to_string()),
        // Written by an earlier netleash, whose generation's chains carry
        // the digest of the policy in force.
        (Some(_), Some(None)) => generation_comment
            .clone()
            .filter(|comment| generation::comment_shape(comment).is_none()),
        // Entry rules that disagree: no digest is in force.
        _ => None,
    };

    let mut table = KernelTable {
        digest,
        generation_comment,
        generation,
        sets: Vec::new(),
        chains: Vec::new(),
        leftover_sets: Vec::new(),
        leftover_chains: Vec::new(),
    };
    for mut chain in chains {
        if reached.contains(&chain.kernel_name) {
            chain.name = table.model_name(&chain.kernel_name).to_string();
            table.chains.push(chain);
        } else {
            table.leftover_chains.push(chain);
        }
    }
    for mut set in sets {
        if looked_up.contains(&set.kernel_name) {
            set.name = table.set_model_name(&set.kernel_name).to_string();
            table.sets.push(set);
        } else {
            table.leftover_sets.push(set);
        }
    }
    table
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
    /// A rule whose expressions differ: the kernel's and the model's, in
    /// nft's `--debug=netlink` notation, those at the positions where they
    /// differ (`#N` first), or all if their numbers differ.
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
                "policy digest: the kernel has {}, the policy is {model}",
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
                kernel.join("; "),
                model.join("; ")
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
    generation::chain_type(kind).to_str().unwrap_or("?")
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

/// Every difference between the policy in force and the model. Empty means
/// the kernel enforces exactly the model: same digest, same sets with the
/// same flags, keys and elements (the DNS-derived sets' elements aside), same
/// chains, same rules (by id, in order) made of the same expressions that
/// refer to the same sets and chains. Leftovers are not compared: nothing
/// reaches them.
pub fn differences(model: &Ruleset, kernel: &KernelTable) -> Result<Vec<Difference>, Error> {
    compare(model, kernel, Elements::Compared)
}

/// [`differences`] without comparing any set's elements: how the table in
/// force differs from the model in everything else (to decide an edit in
/// place, whose element changes are computed set by set, see
/// `generation::approach`).
pub fn differences_but_elements(
    model: &Ruleset,
    kernel: &KernelTable,
) -> Result<Vec<Difference>, Error> {
    compare(model, kernel, Elements::Skipped)
}

/// Whether [`compare`] compares the static sets' elements.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Elements {
    Compared,
    Skipped,
}

fn compare(
    model: &Ruleset,
    kernel: &KernelTable,
    elements: Elements,
) -> Result<Vec<Difference>, Error> {
    let mut found = Vec::new();
    if kernel.digest.as_deref() != Some(model.digest.as_str()) {
        found.push(Difference::Digest {
            kernel: kernel.digest.clone(),
            model: model.digest.clone(),
        });
    }

    let mut kernel_sets: BTreeMap<&str, &KernelSet> = BTreeMap::new();
    for set in &kernel.sets {
        // Two sets in force under one model name (e.g. `allow_v4.g3` and
        // `allow_v4.g5`): the model has one, so the second is extra.
        if kernel_sets.insert(set.name.as_str(), set).is_some() {
            found.push(Difference::ExtraSet(set.kernel_name.clone()));
        }
    }
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
        // The DNS-derived sets are filled at run time and keep what they
        // learned across a re-apply: only their definition is the model's.
        if set.role == SetRole::DnsAllow || elements == Elements::Skipped {
            continue;
        }
        let model_elements = elements::encode_all(set)?;
        if let Some((only_model, only_kernel)) = element_differences(&model_elements, &ks.elements)
        {
            found.push(Difference::SetElements {
                set: set.name.clone(),
                only_model,
                only_kernel,
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
                Some(generation::hook_number(base.hook)),
                Some(base.priority),
                Some(generation::policy_number(base.policy)),
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
            let want = batch::plan_rule(rule);
            if !expressions::same_rule(kernel, &kr.expressions, &want) {
                let (have, want) =
                    expressions::describe_differences(kernel, &kr.expressions, &want);
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

/// What the comparison sees of an element: its key, end and interval-end
/// flag (its timeout and expiration change with time).
type Compared<'a> = (&'a [u8], Option<&'a [u8]>, bool);

fn compared(element: &RawElement) -> Compared<'_> {
    (
        &element.key,
        element.key_end.as_deref(),
        element.interval_end,
    )
}

/// An element as [`describe_raw`] needs it, from what the comparison saw.
fn uncompared((key, key_end, interval_end): Compared<'_>) -> RawElement {
    RawElement {
        key: key.to_vec(),
        key_end: key_end.map(<[u8]>::to_vec),
        interval_end,
        timeout_ms: None,
        expiration_ms: None,
    }
}

/// How the elements `model` encodes to differ from those of `kernel`, as
/// (elements only the model has, elements only the kernel has), each sorted
/// and described, or `None` if they are the same set. Equal sorted lists are
/// the common case and cost no allocation per element; only lists that
/// differ are compared as sets (a duplicate alone is no difference).
fn element_differences(
    model: &[RawElement],
    kernel: &[RawElement],
) -> Option<(Vec<String>, Vec<String>)> {
    let mut want: Vec<Compared<'_>> = model.iter().map(compared).collect();
    let mut have: Vec<Compared<'_>> = kernel.iter().map(compared).collect();
    want.sort_unstable();
    have.sort_unstable();
    if want == have {
        return None;
    }
    let want: BTreeSet<Compared<'_>> = want.into_iter().collect();
    let have: BTreeSet<Compared<'_>> = have.into_iter().collect();
    if want == have {
        return None;
    }
    let describe = |only: std::collections::btree_set::Difference<'_, Compared<'_>>| {
        only.map(|element| describe_raw(&uncompared(*element)))
            .collect()
    };
    Some((
        describe(want.difference(&have)),
        describe(have.difference(&want)),
    ))
}

/// Record on each static set of `table` the model set of `model` it was
/// just verified to hold exactly (`differences(model, table)` was empty).
pub fn mark_verified(table: &mut KernelTable, model: &Ruleset) {
    for set in &mut table.sets {
        set.verified_as = model
            .set(&set.name)
            .filter(|m| m.role != SetRole::DnsAllow && set.elements_read)
            .cloned();
    }
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

/// The counter of one rule that counts: the deny rules and the allow rules.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RuleCounter {
    pub chain: String,
    pub rule: String,
    /// What the rule does with what it counts, as read from the kernel.
    pub verdict: CountedVerdict,
    pub packets: u64,
    pub bytes: u64,
}

/// What a counting rule does with the packets it counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CountedVerdict {
    /// The rule accepts (the allow rules: packets that open a connection).
    Allowed,
    /// The rule jumps to the deny chain (logged and rejected).
    Denied,
}

impl CountedVerdict {
    /// A counting rule that jumps or goes to another chain denies: in a
    /// netleash table the only such rules jump to the deny chain
    /// (`compile::deny_actions`); one that does not ends in accept.
    fn of(rule: &KernelRule) -> CountedVerdict {
        let leaves = rule
            .expressions
            .iter()
            .any(|e| matches!(e.reference, Some(Reference::Jump(_) | Reference::Goto(_))));
        if leaves {
            CountedVerdict::Denied
        } else {
            CountedVerdict::Allowed
        }
    }
}

/// What `netleash status` reports about the table in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableStatus {
    /// Digest of the policy in force, if the table has one.
    pub digest: Option<String>,
    /// The generation in force (see `kernel::generation`), if the table is
    /// written in generations.
    pub generation: Option<u32>,
    /// Sets and chains no base chain reaches, by kernel name: normally none
    /// (an apply deletes them once its new generation is verified).
    pub leftovers: Vec<String>,
    /// The sets and chains in force, by model name.
    pub sets: Vec<SetStatus>,
    pub chains: Vec<ChainStatus>,
    /// Packet and byte counters of every rule with a counter, by rule id.
    pub counters: Vec<RuleCounter>,
}

impl TableStatus {
    /// The packets and bytes of every rule counter with `verdict`, summed.
    pub fn counted(&self, verdict: CountedVerdict) -> (u64, u64) {
        self.counters
            .iter()
            .filter(|c| c.verdict == verdict)
            .fold((0, 0), |(packets, bytes), c| {
                (packets + c.packets, bytes + c.bytes)
            })
    }

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
                        verdict: CountedVerdict::of(rule),
                        packets,
                        bytes,
                    });
                }
            }
        }
        let leftovers = table
            .leftover_chains
            .iter()
            .map(|c| format!("chain {}", c.kernel_name))
            .chain(
                table
                    .leftover_sets
                    .iter()
                    .map(|s| format!("set {}", s.kernel_name)),
            )
            .collect();
        TableStatus {
            digest: table.digest.clone(),
            generation: table.generation,
            leftovers,
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

    /// Element lists compare as sets: order, timeouts and duplicates are no
    /// difference; a missing or extra element, or one that differs only in
    /// its interval-end flag, is, and each side's extras are described.
    #[test]
    fn element_differences_compare_as_sets_and_describe_each_side() {
        let element = |key: [u8; 4], interval_end: bool, timeout_ms: Option<u64>| RawElement {
            key: key.to_vec(),
            key_end: None,
            interval_end,
            timeout_ms,
            expiration_ms: timeout_ms,
        };
        let a = element([10, 0, 0, 1], false, None);
        let b = element([10, 0, 0, 2], true, None);
        let c = element([10, 0, 0, 3], false, None);
        let timed_b = element([10, 0, 0, 2], true, Some(5_000));
        assert_eq!(
            element_differences(&[a.clone(), b.clone()], &[timed_b, a.clone()]),
            None
        );
        assert_eq!(
            element_differences(&[a.clone(), b.clone()], &[b.clone(), a.clone(), a.clone()]),
            None
        );
        let (only_model, only_kernel) =
            element_differences(&[a.clone(), b.clone()], &[a.clone(), c.clone()]).unwrap();
        assert_eq!(only_model, vec![describe_raw(&b)]);
        assert_eq!(only_kernel, vec![describe_raw(&c)]);
        let not_an_end = element([10, 0, 0, 2], false, None);
        let (only_model, only_kernel) =
            element_differences(&[a.clone(), b.clone()], &[a, not_an_end.clone()]).unwrap();
        assert_eq!(only_model, vec![describe_raw(&b)]);
        assert_eq!(only_kernel, vec![describe_raw(&not_an_end)]);
    }

    fn ruleset() -> Ruleset {
        let policy = Policy {
            mode: Mode::Unrestricted,
            dialect: Dialect::Unrestricted,
            rules: vec![],
            // One entry per family: an empty blocklist set would be left out.
            blocklist: ["169.254.0.0/16", "fe80::/10"]
                .into_iter()
                .map(|net| crate::policy::BlockEntry {
                    net: net.parse().unwrap(),
                    reason: "link-local".into(),
                })
                .collect(),
            warnings: vec![],
        };
        crate::ruleset::compile(&policy, &CompileOptions::default())
    }

    /// The kernel table that exactly matches a model, built from the model's
    /// own encoding: in generation `generation` (`None`: under model names,
    /// as an earlier netleash or nft wrote it).
    fn raw_mirror(model: &Ruleset, generation: Option<u32>) -> RawTable {
        let naming = generation.map(|g| generation::Naming::new(model, g));
        let set_name = |name: &str| naming.as_ref().map_or(name.to_string(), |n| n.set(name));
        let chain_name = |name: &str| naming.as_ref().map_or(name.to_string(), |n| n.chain(name));
        RawTable {
            anonymous: Vec::new(),
            comment: generation.is_none().then(|| model.digest.clone()),
            sets: model
                .sets
                .iter()
                .map(|s| {
                    let d = elements::set_definition(s, 0).unwrap();
                    KernelSet {
                        name: set_name(&s.name),
                        kernel_name: set_name(&s.name),
                        flags: d.flags,
                        key_type: d.key_type,
                        key_len: d.key_len,
                        elements: elements::encode_all(s).unwrap(),
                        elements_read: true,
                        verified_as: None,
                    }
                })
                .collect(),
            chains: model
                .chains
                .iter()
                .map(|c| KernelChain {
                    name: chain_name(&c.name),
                    kernel_name: chain_name(&c.name),
                    hook: c.base.map(|b| generation::hook_number(b.hook)),
                    priority: c.base.map(|b| b.priority),
                    policy: c.base.map(|b| generation::policy_number(b.policy)),
                    chain_type: c.base.map(|b| chain_type_name(b.kind).to_string()),
                    comment: (generation.is_some() && c.base.is_none())
                        .then(|| generation::generation_comment(model)),
                    rules: c
                        .rules
                        .iter()
                        .enumerate()
                        .map(|(i, r)| KernelRule {
                            id: Some(r.id.clone()),
                            digest: (generation.is_some() && c.base.is_some())
                                .then(|| model.digest.clone()),
                            handle: i as u64,
                            expressions: batch::plan_rule(r)
                                .iter()
                                .map(|e| {
                                    let mut expr = expressions::expected(e);
                                    expr.reference = match expr.reference {
                                        Some(Reference::Set(set)) if is_anonymous_set(&set) => {
                                            Some(Reference::Set(set))
                                        }
                                        Some(Reference::Set(set)) => {
                                            Some(Reference::Set(set_name(&set)))
                                        }
                                        Some(Reference::Jump(chain)) => {
                                            Some(Reference::Jump(chain_name(&chain)))
                                        }
                                        other => other,
                                    };
                                    expr
                                })
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn mirror(model: &Ruleset) -> KernelTable {
        in_force(raw_mirror(model, Some(3)))
    }

    /// `model` with one more blocklist entry per family: other elements, the
    /// same rules.
    fn with_more_blocked(model: &Ruleset) -> Ruleset {
        let mut more = model.clone();
        for set in more
            .sets
            .iter_mut()
            .filter(|s| s.name.starts_with("blocklist_"))
        {
            let net = if set.name.ends_with("v4") {
                "192.0.2.0/24"
            } else {
                "2001:db8::/32"
            };
            set.elements
                .push(crate::ruleset::Element::Addr(net.parse().unwrap()));
            set.elements.sort();
        }
        more.digest = "sha256:more".into();
        more
    }

    /// `model` with the counter of its first counting rule left out: a
    /// change of rules.
    fn without_a_counter(mut model: Ruleset) -> Ruleset {
        let rule = model
            .chains
            .iter_mut()
            .flat_map(|c| c.rules.iter_mut())
            .find(|r| r.actions.contains(&crate::ruleset::Action::Counter))
            .expect("a counting rule");
        rule.actions
            .retain(|a| *a != crate::ruleset::Action::Counter);
        model
    }

    #[test]
    fn only_a_change_in_elements_is_an_edit_in_place() {
        use generation::Approach;
        let model = ruleset();
        let table = mirror(&model);
        assert_eq!(
            table.generation_comment,
            Some(generation::generation_comment(&model))
        );
        // The same policy: an edit of generation 3 that changes nothing.
        let Approach::Edit(same) = generation::approach(&model, Some(&table)).unwrap() else {
            panic!("the same policy is not an edit");
        };
        assert_eq!((same.from, same.to), (3, 3));
        assert!(same.edit.is_empty());
        assert_eq!(
            same.previous[0].digest.as_deref(),
            Some(model.digest.as_str())
        );
        // Other elements: an edit of both blocklists, kept under their names.
        let more = with_more_blocked(&model);
        assert_eq!(generation::shape(&more), generation::shape(&model));
        let Approach::Edit(edit) = generation::approach(&more, Some(&table)).unwrap() else {
            panic!("a change in elements alone is not an edit");
        };
        assert_eq!(
            edit.edit.keys().collect::<Vec<_>>(),
            ["blocklist_v4", "blocklist_v6"]
        );
        assert_eq!(edit.reuse["blocklist_v4"], "blocklist_v4.g3");
        // Another rule: a swap to generation 4.
        let other_rule = without_a_counter(more.clone());
        assert_ne!(generation::shape(&other_rule), generation::shape(&model));
        assert!(matches!(
            generation::approach(&other_rule, Some(&table)).unwrap(),
            Approach::Swap(swap) if (swap.from, swap.to) == (3, 4)
        ));
        // A leftover to delete: a swap, whose cleanup deletes it.
        let mut raw = raw_mirror(&model, Some(3));
        raw.chains.extend(
            raw_mirror(&model, Some(2))
                .chains
                .into_iter()
                .filter(|c| c.hook.is_none()),
        );
        assert!(matches!(
            generation::approach(&more, Some(&in_force(raw))).unwrap(),
            Approach::Swap(_)
        ));
    }

    #[test]
    fn a_set_whose_every_element_changes_is_edited_in_place_but_created_again_by_a_swap() {
        use generation::Approach;
        let model = ruleset();
        let table = mirror(&model);
        // Every element of blocklist_v4 replaced: more change than stay,
        // within an edit's slack.
        let mut replaced = model.clone();
        let set = replaced
            .sets
            .iter_mut()
            .find(|s| s.name == "blocklist_v4")
            .expect("a blocklist_v4 set");
        assert!(!set.elements.is_empty());
        set.elements = vec![crate::ruleset::Element::Addr(
            "192.0.2.0/24".parse().unwrap(),
        )];
        replaced.digest = "sha256:replaced".into();
        let Approach::Edit(edit) = generation::approach(&replaced, Some(&table)).unwrap() else {
            panic!("a change in elements alone is not an edit");
        };
        assert_eq!(edit.reuse["blocklist_v4"], "blocklist_v4.g3");
        assert!(edit.edit.contains_key("blocklist_v4"));
        // With a rule changed too: a swap, which creates that set again and
        // keeps the others as they are.
        let replaced = without_a_counter(replaced);
        let Approach::Swap(swap) = generation::approach(&replaced, Some(&table)).unwrap() else {
            panic!("a change of rules is not a swap");
        };
        assert_eq!((swap.from, swap.to), (3, 4));
        assert!(!swap.reuse.contains_key("blocklist_v4"));
        assert!(!swap.edit.contains_key("blocklist_v4"));
        assert_eq!(swap.reuse["blocklist_v6"], "blocklist_v6.g3");
        assert!(swap.edit.is_empty());
    }

    #[test]
    fn a_table_with_the_digest_on_its_chains_is_read_and_swapped() {
        // As an earlier netleash wrote it: the digest as the generation's
        // chains' comment, entry rules with their id alone.
        let model = ruleset();
        let mut raw = raw_mirror(&model, Some(3));
        for chain in &mut raw.chains {
            if chain.hook.is_none() {
                chain.comment = Some(model.digest.clone());
            }
            for rule in &mut chain.rules {
                rule.digest = None;
            }
        }
        let table = in_force(raw);
        assert_eq!(table.digest.as_deref(), Some(model.digest.as_str()));
        assert_eq!(differences(&model, &table).unwrap(), vec![]);
        // Its shape is unknown: even the same policy swaps (once).
        let approach = generation::approach(&model, Some(&table)).unwrap();
        let generation::Approach::Swap(swap) = approach else {
            panic!("{approach:?}");
        };
        assert_eq!(swap.from_comment.as_deref(), Some(model.digest.as_str()));
        // Entry rules that disagree: no digest is in force.
        let mut raw = raw_mirror(&model, Some(3));
        let entry = raw.chains.iter_mut().find(|c| c.hook.is_some()).unwrap();
        entry.rules[0].digest = Some("sha256:other".into());
        assert_eq!(in_force(raw).digest, None);
    }

    #[test]
    fn the_policy_in_force_is_read_by_model_name_and_older_generations_are_leftovers() {
        let model = ruleset();
        let mut raw = raw_mirror(&model, Some(3));
        let older = raw_mirror(&model, Some(2));
        raw.sets.extend(
            older
                .sets
                .into_iter()
                .filter(|s| s.kernel_name.contains(".g")),
        );
        raw.chains
            .extend(older.chains.into_iter().filter(|c| c.hook.is_none()));
        let table = in_force(raw);
        assert_eq!(table.generation, Some(3));
        assert_eq!(table.digest.as_deref(), Some(model.digest.as_str()));
        let names: Vec<&str> = table.chains.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["deny", "egress", "output", "forward"]);
        let leftovers: Vec<&str> = table
            .leftover_chains
            .iter()
            .map(|c| c.kernel_name.as_str())
            .collect();
        assert_eq!(leftovers, ["deny.g2", "egress.g2"]);
        assert_eq!(table.leftover_sets.len(), 2, "{:?}", table.leftover_sets);
        assert_eq!(differences(&model, &table).unwrap(), vec![]);
    }

    #[test]
    fn a_set_kept_from_an_earlier_generation_is_read_by_model_name_and_only_once() {
        let model = ruleset();
        let mut raw = raw_mirror(&model, Some(3));
        // The generation in force looks up blocklist_v4 as created by generation 2.
        let rename = |name: &mut String| {
            if name == "blocklist_v4.g3" {
                *name = "blocklist_v4.g2".into();
            }
        };
        for set in &mut raw.sets {
            rename(&mut set.name);
            rename(&mut set.kernel_name);
        }
        for rule in raw.chains.iter_mut().flat_map(|c| &mut c.rules) {
            for expr in &mut rule.expressions {
                if let Some(Reference::Set(set)) = &mut expr.reference {
                    rename(set);
                }
            }
        }
        let table = in_force(raw.clone());
        assert!(table.sets.iter().any(|s| s.name == "blocklist_v4"));
        assert_eq!(differences(&model, &table).unwrap(), vec![]);

        // A second set in force under the same model name is one too many.
        let mut second = raw
            .sets
            .iter()
            .find(|s| s.kernel_name == "blocklist_v4.g2")
            .unwrap()
            .clone();
        second.name = "blocklist_v4.g1".into();
        second.kernel_name = "blocklist_v4.g1".into();
        raw.sets.push(second);
        let deny = raw
            .chains
            .iter_mut()
            .find(|c| c.kernel_name == "egress.g3")
            .unwrap();
        let mut extra = deny.rules[2].clone();
        for expr in &mut extra.expressions {
            if let Some(Reference::Set(set)) = &mut expr.reference {
                *set = "blocklist_v4.g1".into();
            }
        }
        deny.rules.push(extra);
        let found = differences(&model, &in_force(raw)).unwrap();
        assert!(
            found.contains(&Difference::ExtraSet("blocklist_v4.g1".into())),
            "{found:?}"
        );
    }

    #[test]
    fn a_table_under_model_names_is_read_as_it_is() {
        let model = ruleset();
        let table = in_force(raw_mirror(&model, None));
        assert_eq!(table.generation, None);
        assert_eq!(table.digest.as_deref(), Some(model.digest.as_str()));
        assert!(table.leftover_chains.is_empty() && table.leftover_sets.is_empty());
        assert_eq!(differences(&model, &table).unwrap(), vec![]);
    }

    #[test]
    fn a_lookup_into_another_set_is_a_difference() {
        let model = ruleset();
        let mut raw = raw_mirror(&model, Some(3));
        let egress = raw
            .chains
            .iter_mut()
            .find(|c| c.kernel_name == "egress.g3")
            .unwrap();
        let lookup = egress.rules[2]
            .expressions
            .iter_mut()
            .find(|e| e.name == "lookup")
            .unwrap();
        lookup.reference = Some(Reference::Set("blocklist_v6.g3".into()));
        let found = differences(&model, &in_force(raw)).unwrap();
        // blocklist_v4 is no longer reached, and the rule refers to the wrong set.
        assert!(
            matches!(&found[..], [
                Difference::MissingSet(set),
                Difference::RuleExpressions { rule, kernel, .. },
            ] if set == "blocklist_v4" && rule == "blocklist-v4"
                && kernel == &["#3 lookup reg 1 @blocklist_v6"]),
            "{found:?}"
        );
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
