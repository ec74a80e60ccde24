//! Generations: how `apply` changes the policy in force without a moment in
//! which packets meet neither the old nor the new policy.
//!
//! Replacing the whole table in one transaction is atomic for netlink but not
//! for packets: its base chains are deleted and created again, and the kernel
//! unregisters and registers their netfilter hooks during the commit, so a
//! packet can pass while no hook of the table is registered, or meet a new
//! base chain before its rules. What the kernel does switch atomically are
//! rules: every rule carries a generation mask, the commit builds each
//! changed chain's next rule blob and then flips the generation cursor once
//! (`nf_tables_commit`, steps 2 and 3), and `nft_do_chain` reads the cursor
//! once per packet. So the table is split in two kinds of objects:
//!
//! - **persistent** objects are created once and then kept: the table, its
//!   base chains (`output`, `forward`; only their policy is updated in place,
//!   `nf_tables_updchain`), and the DNS-derived sets (`SetRole::DnsAllow`),
//!   which keep the addresses the DNS layer learned across a re-apply;
//! - **generation** objects are everything else: the regular chains and the
//!   static sets, created under the name `MODEL.gN` for generation N
//!   (`egress.g7`, `allow_v4.g7`). No model name contains a dot, so the
//!   suffix cannot be confused with a model name, and nft accepts and prints
//!   such names.
//!
//! Each base chain holds exactly one rule, its *entry rule*, a jump into the
//! generation in force, whose comment is the rule id and the digest of the
//! policy in force ([`entry_comment`]): the kernel cannot change a chain's or
//! table's comment in place, but every change of policy replaces the entry
//! rules. The generation's chains carry its *shape digest* ([`shape`]) and a
//! tag of the policy it was staged for ([`generation_comment`]), fixed when it
//! is staged. Changing the policy from generation N to M takes three
//! transactions:
//!
//! 1. *stage*: create generation M (sets with their elements, chains, rules)
//!    and any persistent set the new model adds. Nothing jumps to it yet.
//!    A static set that generation N holds exactly (`Swap::reuse`: as a
//!    session's last verification found it, or as read before the stage) is
//!    not created again: M's rules look up N's set under its name
//!    (`allow_v4.g3` from `egress.g7`), and the read-back strips any
//!    generation up to the one in force from a set's name.
//!    This must be its own transaction: a set backend makes the elements of a
//!    new set visible only when it commits the set (pipapo swaps in its new
//!    lookup table in `nft_set_commit_update`), which runs after the
//!    generation cursor has flipped; a rule switched in the same transaction
//!    would look into a still empty set for a moment.
//!    A static set that generation N holds with a few elements more or
//!    fewer (`Swap::edit`, see below) is kept the same way.
//! 2. *swap*: replace each base chain's rule by a jump into generation M. Rule
//!    changes are generation-masked, so each packet sees either the old jump
//!    or the new one. The elements of the sets changed in place are removed
//!    and added in this transaction.
//! 3. after the table has been read back and verified, *clean up*: delete
//!    generation N and every other object no base chain reaches any more
//!    (a set M kept is reached). If
//!    verification fails, a swap back to generation N (which still exists)
//!    rolls back instead, gives the sets changed in place their previous
//!    elements back in the same transaction, and deletes generation M.
//!
//! A set changed in place saves the kernel an insertion per element (for a
//! large allowlist, most of an apply): when the elements the set in force
//! holds are known, and fewer elements change than stay ([`kept_in_swap`]),
//! generation M keeps N's set, and the swap transaction removes the elements
//! the model dropped, then adds the new ones (removals first: an interval set
//! refuses an addition that overlaps an element still active in the next
//! generation; an rbtree range always goes with its end element, whose
//! absence would open the range to the top of the address space). The
//! elements are known either from a session's last verification (the model
//! set each set was verified to hold) or, in an apply without that memory (a
//! one-shot `netleash apply`), from reading every static set's elements
//! before the stage: the edit is then decided in the kernel's encoding, and
//! removes exactly what was read and the model does not have, also elements
//! the model cannot express (another program's). What packets see follows
//! from `nf_tables_commit`, which first
//! flips the generation cursor and then runs each set's
//! `nft_set_commit_update`:
//!
//! - every backend (hash, rbtree, pipapo) marks a removed element inactive in
//!   the next generation and checks the cursor on lookup, so removed elements
//!   stop matching exactly when M's rules start (no moment in which the new
//!   policy allows what it removed);
//! - hash and rbtree elements added are generation-masked as well, so they
//!   start matching exactly then too;
//! - pipapo (the concatenated interval sets, `address . protocol . port`
//!   ranges) inserts added elements into a clone of its lookup table and
//!   swaps the clone in only in `nft_set_commit_update`, a moment after the
//!   flip: during that moment a brand-new entry is refused. That fails
//!   closed (a connection attempt dropped or retried), never open. The same
//!   holds for the elements a rollback puts back.
//!
//! The edited set's elements are never taken from the edit: the verification
//! compares with the model what the kernel says the set holds, as for a
//! created set. For a change of a few elements (`batch::edit_is_echoed`) the
//! kernel echoes each element it removed and added, and the set is composed
//! from the elements it held (known at the generation id the transaction
//! carried) and the echo (`readback::compose`: a removal of an element not
//! held makes the apply read the table instead); a larger change is read
//! back.
//!
//! A base chain's policy decides only packets that fall off the end of its
//! rules. The compiler gives a base chain the policy drop exactly when its
//! `egress` chain ends in a rule that denies everything left (limited mode),
//! so while such a generation is in force the policy never decides. A policy
//! that becomes accept is therefore changed in the stage transaction (the old
//! generation still decides every packet), and one that becomes drop in the
//! swap transaction (the kernel updates the policy after the new rules are in
//! force, and they decide every packet).
//!
//! Every transaction carries the ruleset generation id it was built against,
//! so a concurrent change (another `apply`, a DNS set update) makes the kernel
//! refuse it cleanly (`ERESTART`) instead of applying it to a table that is no
//! longer what was read.
//!
//! **Edits in place.** A policy that differs from the one in force only in the
//! elements of static sets (and its digest) is put in force without a new
//! generation ([`Approach::Edit`], decided by [`approach`], see
//! [`why_not_edit`]): one transaction, carrying the ruleset generation id like
//! every other, removes and adds those sets' elements (removals first, as in a
//! swap) and replaces each entry rule by a jump into the same generation that
//! carries the new digest. No chain, rule or set is created, nothing is left
//! to clean up, and the generation's rules keep their counters. What packets
//! see is the argument above for sets changed in place in the swap
//! transaction, with nothing else changing: the entry rules are replaced by
//! generation-masked rule changes (each packet sees the old or the new one,
//! and both jump into the same chains); hash and rbtree elements removed and
//! added are generation-masked, so they stop and start matching exactly when
//! the cursor flips; pipapo additions become visible a moment after it (fail
//! closed), and a pipapo set that would lose an element is never edited (a
//! swap creates it again). The verification is a swap's, and a difference is
//! undone by one transaction: the element changes reversed and the previous
//! entry rules (so the previous digest) put back.
//!
//! A table an earlier netleash wrote in generations has the policy digest as
//! its generation's chains' comment and entry rules with their id alone: its
//! digest is read from the chains, its shape is unknown, so its next apply
//! swaps (once). A table in any other shape (written by an earlier netleash
//! that replaced the whole table, by nft, or half changed by another program)
//! is replaced as a whole once, with a warning; from then on re-applies swap
//! generations or edit them in place.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::ffi::CStr;

use super::ffi::RawElement;
use super::readback::{KernelChain, KernelSet, KernelTable};
use super::{elements, ffi};
use crate::ruleset::{
    Action, Chain, ChainKind, ChainPolicy, Element, Hook, Rule, Ruleset, Set, SetKey, SetRole,
};

/// Separates a model name from its generation number in kernel names.
pub const SEPARATOR: &str = ".g";

/// The kernel name of generation object `model` in `generation`.
pub fn name(model: &str, generation: u32) -> String {
    format!("{model}{SEPARATOR}{generation}")
}

/// `("allow_v4", 7)` for `allow_v4.g7`; `None` for a name without a generation.
pub fn split(kernel: &str) -> Option<(&str, u32)> {
    let (model, digits) = kernel.rsplit_once(SEPARATOR)?;
    let canonical = !model.is_empty()
        && !digits.is_empty()
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit());
    if !canonical {
        return None;
    }
    digits.parse().ok().map(|generation| (model, generation))
}

/// Whether a model set keeps its name and its elements across generations:
/// the DNS-derived sets, which the DNS layer fills at run time.
pub fn persistent_set(set: &Set) -> bool {
    set.role == SetRole::DnsAllow
}

/// The form of `ruleset` that the kernel holds: every base chain with one
/// rule, a jump into a regular chain. The compiler's `output` and `forward`
/// chains already are (`jump egress`); a base chain with rules of its own
/// (the DNS proxy's `dns-redirect`, `dns-zone-output`, `dns-zone-replies`)
/// gets them moved into a regular chain `NAME-body`, which is a generation
/// object like `egress`, so they are swapped with the generation too. Rules in
/// a regular chain run in the hook of the base chain that jumps to them: a
/// `redirect` reached from a nat base chain is valid
/// (`nft_chain_validate_dependency` checks the base chain the walk started
/// from), and a `ct zone set` reached from a raw-priority chain still runs
/// before conntrack.
pub fn entry_form(ruleset: &Ruleset) -> Cow<'_, Ruleset> {
    let is_entry = |chain: &Chain| {
        matches!(chain.rules.as_slice(), [rule]
            if rule.matches.is_empty() && matches!(rule.actions.as_slice(), [Action::Jump(_)]))
    };
    if ruleset
        .chains
        .iter()
        .all(|chain| chain.base.is_none() || is_entry(chain))
    {
        return Cow::Borrowed(ruleset);
    }
    let mut form = ruleset.clone();
    let (mut regular, mut bases): (Vec<Chain>, Vec<Chain>) =
        form.chains.drain(..).partition(|c| c.base.is_none());
    for base in bases.iter_mut().filter(|c| !is_entry(c)) {
        let body = format!("{}{BODY_SUFFIX}", base.name);
        regular.push(Chain {
            name: body.clone(),
            base: None,
            rules: std::mem::take(&mut base.rules),
        });
        base.rules = vec![Rule {
            id: body.clone(),
            description: format!("{} traffic goes through its rules in {body}", base.name),
            matches: Vec::new(),
            actions: vec![Action::Jump(body)],
        }];
    }
    regular.extend(bases);
    form.chains = regular;
    Cow::Owned(form)
}

/// Suffix of the regular chain that holds a base chain's own rules.
pub const BODY_SUFFIX: &str = "-body";

/// The kernel names of a model's objects in one generation.
pub struct Naming<'a> {
    ruleset: &'a Ruleset,
    pub generation: u32,
    /// Sets kept from an earlier generation: model name → kernel name.
    reuse: Option<&'a BTreeMap<String, String>>,
}

impl<'a> Naming<'a> {
    pub fn new(ruleset: &'a Ruleset, generation: u32) -> Naming<'a> {
        Naming {
            ruleset,
            generation,
            reuse: None,
        }
    }

    /// The names of generation `swap.to`, whose sets in `swap.reuse` are kept.
    pub fn of_swap(ruleset: &'a Ruleset, swap: &'a Swap) -> Naming<'a> {
        Naming {
            ruleset,
            generation: swap.to,
            reuse: Some(&swap.reuse),
        }
    }

    /// Whether model set `set` is kept from an earlier generation.
    pub fn reused(&self, set: &str) -> bool {
        self.reuse.is_some_and(|reuse| reuse.contains_key(set))
    }

    /// The kernel name of model set `set`: persistent sets keep their name,
    /// and so do sets kept from an earlier generation.
    pub fn set(&self, set: &str) -> String {
        if let Some(kernel) = self.reuse.and_then(|reuse| reuse.get(set)) {
            return kernel.clone();
        }
        match self.ruleset.set(set) {
            Some(model) if persistent_set(model) => set.to_string(),
            _ => name(set, self.generation),
        }
    }

    /// The kernel name of model chain `chain`: base chains keep their name.
    pub fn chain(&self, chain: &str) -> String {
        match self.ruleset.chain(chain) {
            Some(model) if model.base.is_some() => chain.to_string(),
            _ => name(chain, self.generation),
        }
    }
}

pub fn hook_number(hook: Hook) -> u32 {
    match hook {
        Hook::Output => libc::NF_INET_LOCAL_OUT as u32,
        Hook::Forward => libc::NF_INET_FORWARD as u32,
        Hook::Prerouting => libc::NF_INET_PRE_ROUTING as u32,
    }
}

/// The kernel's name of a base chain type (`NFTA_CHAIN_TYPE`): a raw chain
/// is a filter chain at the raw priority. The kernel has taken nat chains in
/// inet tables since Linux 5.2.
pub fn chain_type(kind: ChainKind) -> &'static CStr {
    match kind {
        ChainKind::Filter | ChainKind::Raw => c"filter",
        ChainKind::Nat => c"nat",
    }
}

pub fn policy_number(policy: ChainPolicy) -> u32 {
    match policy {
        ChainPolicy::Accept => libc::NF_ACCEPT as u32,
        ChainPolicy::Drop => libc::NF_DROP as u32,
    }
}

/// How a base chain enters the generation in force, to go back to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryRule {
    /// The base chain.
    pub chain: String,
    pub hook: ffi::BaseHook,
    /// The rule's id (the first word of its comment).
    pub id: Option<String>,
    /// The policy digest its comment carries after the id (see
    /// [`entry_comment`]); `None` for a rule an earlier netleash wrote.
    pub digest: Option<String>,
    /// The kernel name of the chain it jumps to.
    pub target: String,
}

/// What a generation swap does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Swap {
    /// The generation in force.
    pub from: u32,
    /// The generation to create.
    pub to: u32,
    /// Persistent sets of the model that do not exist yet (model names).
    pub create: Vec<String>,
    /// Base chains whose policy becomes accept (changed in the stage transaction).
    pub loosen: Vec<String>,
    /// Base chains whose policy becomes drop (changed in the swap transaction).
    pub tighten: Vec<String>,
    /// The base chains' rules and hooks as they are, for a rollback.
    pub previous: Vec<EntryRule>,
    /// The comment of generation `from`'s chains ([`generation_comment`]),
    /// or for a generation an earlier netleash staged, the digest of the
    /// policy it was staged for. It tells generation `from`
    /// apart from another of the same number (see `kernel::generation_is_there`).
    pub from_comment: Option<String>,
    /// The digest of the policy in force when the swap was planned. An edit
    /// in place changes the elements of generation `from`'s sets without
    /// changing its number, but always with another digest (or the same
    /// policy again): a swap retried after another commit goes on only while
    /// this digest is still in force, so that the sets it keeps from `from`
    /// still hold what it planned with.
    pub from_digest: Option<String>,
    /// Static sets of the model that the generation in force already holds
    /// exactly (same definition, same elements, as read back with the
    /// ruleset generation id the stage carries): model name → kernel name.
    /// Generation `to` looks them up instead of creating them again. Sharing
    /// an unchanged set between two generations is atomic for packets: no
    /// transaction of the swap changes it, so the old and the new rules see
    /// the same elements. Only sets created in this swap are new, and the
    /// stage commits them before anything looks them up. The sets of
    /// `edit` are kept too, and changed in place.
    pub reuse: BTreeMap<String, String>,
    /// Static sets of `reuse` that the generation in force holds with a few
    /// elements more or fewer than the model's, by model name: the swap
    /// transaction removes and adds those elements (see the module docs),
    /// and a rollback puts them back.
    pub edit: BTreeMap<String, SetEdit>,
}

/// How a kept set changes in place, in the kernel's encoding: the elements
/// to remove (as the kernel holds them) and those to add (the model's
/// elements encoded as for a created set, [`elements::encode`]), each list
/// in order. An rbtree range is its start and its end element in the same
/// list, so a range is never left without its end (which would open it to
/// the top of the address space).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SetEdit {
    pub remove: Vec<RawElement>,
    pub add: Vec<RawElement>,
}

impl SetEdit {
    /// Whether the set already holds exactly the model set.
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty()
    }
}

/// The edit that turns `kernel`, a static set in force whose elements were
/// read, into model set `set`, if it is worth making in place: the set has
/// the same key and flags, and fewer elements change than stay (ranges count
/// once). A set changed more than that is created again (creating costs an
/// insertion per element, an edit one per change; both read every element
/// back to verify). An empty edit means the set holds exactly the model set
/// (the same definition, the same elements one for one) and is kept as it is.
///
/// What the set holds is known in one of two ways:
/// - a session knows the model set `kernel` was verified to hold
///   (`verified_as`): the edit is the difference of the two model sets,
///   encoded (the kernel holds exactly the encoding of the verified set);
/// - otherwise (a one-shot apply) from the elements read: a model element
///   stays if the kernel holds every element of its encoding (an rbtree
///   range: its start and its end), and is added otherwise; every element
///   read that no staying model element encodes is removed exactly as read,
///   also one the model's encoding cannot express (an element another
///   program added, a start without its end), so the set ends up holding
///   exactly the model's encoding.
///
/// A concatenated interval set (pipapo) is edited only when it loses no
/// element: `nft_pipapo_remove` finds an element by testing the set's rules
/// one by one against the lookup table, so one removal costs about as much as
/// creating the whole set (measured at 5,000 elements, kernel 6.18: 13 ms
/// either way), while an addition costs what it costs in a created set.
/// (The compiler no longer emits such a set: addresses allowed on a port get
/// an address set per protocol and port, an rbtree. A model may still hold one.)
///
/// The model set must list its elements strictly sorted (the compiler sorts
/// and merges them): a model that lists an element twice is never edited,
/// since creating it fails, and so must changing a set into it.
/// Whether a swap keeps a set that `change` turns into the model's
/// ([`approach`] applies this to every static set's [`set_change`]).
fn kept_in_swap(change: &Change) -> bool {
    change.edit.is_empty() || change.changed < change.kept
}

/// More element changes than stay that an edit in place of the whole
/// generation ([`Approach::Edit`]) still makes, per set: its alternative is
/// not creating one set again but staging a whole generation (every rule,
/// an insertion per element of each set created, and a cleanup
/// transaction), which costs more than this many element changes. 64 is
/// more than a typical policy's allowlist holds, so any change to one is an
/// edit.
const EDIT_SLACK: usize = 64;

/// The change that turns `kernel` into model set `set` in place, whatever
/// its size, if it can be made in place at all (a swap makes it when
/// [`kept_in_swap`]).
fn set_change(set: &Set, kernel: &KernelSet) -> Result<Option<Change>, super::Error> {
    if !kernel.elements_read || persistent_set(set) {
        return Ok(None);
    }
    if kernel.verified_as.as_ref() == Some(set) {
        return Ok(Some(Change {
            edit: SetEdit::default(),
            kept: set.elements.len(),
            changed: 0,
        }));
    }
    if !set.elements.windows(2).all(|w| w[0] < w[1]) {
        return Ok(None);
    }
    let change = match &kernel.verified_as {
        Some(held) => edit_from_verified(set, held)?,
        None => edit_from_read(set, kernel)?,
    };
    let Some(change) = change else {
        return Ok(None);
    };
    let pipapo = set.interval && matches!(set.key, SetKey::AddrProtoPort(_));
    if pipapo && !change.edit.remove.is_empty() {
        return Ok(None);
    }
    Ok(Some(change))
}

/// An edit, with the number of model elements it keeps and the number it
/// changes (a removed range counts once).
struct Change {
    edit: SetEdit,
    kept: usize,
    changed: usize,
}

/// The edit from model set `held`, which the set was verified to hold, to `set`.
fn edit_from_verified(set: &Set, held: &Set) -> Result<Option<Change>, super::Error> {
    let same_shape = held.key == set.key
        && held.interval == set.interval
        && held.timeout == set.timeout
        && !persistent_set(held);
    if !same_shape || !held.elements.windows(2).all(|w| w[0] < w[1]) {
        return Ok(None);
    }
    let (mut remove, mut add) = (Vec::new(), Vec::new());
    let (mut was, mut will) = (
        held.elements.iter().peekable(),
        set.elements.iter().peekable(),
    );
    loop {
        match (was.peek(), will.peek()) {
            (None, None) => break,
            (Some(old), Some(new)) if old == new => {
                was.next();
                will.next();
            }
            (Some(old), Some(new)) if old < new => remove.extend(was.next()),
            (Some(_), None) => remove.extend(was.next()),
            (_, Some(_)) => add.extend(will.next()),
        }
    }
    let encode = |elements: &[&Element]| -> Result<Vec<RawElement>, super::Error> {
        let mut encoded = Vec::new();
        for element in elements {
            encoded.extend(elements::encode(&set.name, set.key, set.interval, element)?);
        }
        Ok(encoded)
    };
    Ok(Some(Change {
        kept: held.elements.len() - remove.len(),
        changed: remove.len() + add.len(),
        edit: SetEdit {
            remove: encode(&remove)?,
            add: encode(&add)?,
        },
    }))
}

/// An element as the comparison sees it: key, key end and interval-end flag
/// (a static set's elements carry no timeout).
type ElementKey<'e> = (&'e [u8], Option<&'e [u8]>, bool);

fn element_key(element: &RawElement) -> ElementKey<'_> {
    (
        element.key.as_slice(),
        element.key_end.as_deref(),
        element.interval_end,
    )
}

/// The edit from the elements `kernel` was read to hold to model set `set`.
fn edit_from_read(set: &Set, kernel: &KernelSet) -> Result<Option<Change>, super::Error> {
    let definition = elements::set_definition(set, 0)?;
    let same_shape = kernel.flags == definition.flags
        && kernel.key_type == definition.key_type
        && kernel.key_len == definition.key_len;
    if !same_shape {
        return Ok(None);
    }
    // Each distinct element read, by the index of its first listing (a
    // dump can list an element twice, see `elements::logical_count`).
    let mut held: HashMap<ElementKey<'_>, usize> = HashMap::with_capacity(kernel.elements.len());
    for (index, raw) in kernel.elements.iter().enumerate() {
        held.entry(element_key(raw)).or_insert(index);
    }
    // Which of them a staying model element encodes.
    let mut staying = vec![false; kernel.elements.len()];
    let (mut add, mut kept, mut added) = (Vec::new(), 0, 0);
    for element in &set.elements {
        let encoded = elements::encode(&set.name, set.key, set.interval, element)?;
        let found: Option<Vec<usize>> = encoded
            .iter()
            .map(|raw| held.get(&element_key(raw)).copied())
            .collect();
        match found {
            Some(found) => {
                for index in found {
                    // Two model elements with an element in common overlap:
                    // not a set the kernel would create, so not edited into.
                    if std::mem::replace(&mut staying[index], true) {
                        return Ok(None);
                    }
                }
                kept += 1;
            }
            None => {
                add.extend(encoded);
                added += 1;
            }
        }
    }
    let mut remove: Vec<RawElement> = kernel
        .elements
        .iter()
        .enumerate()
        .filter(|(index, raw)| !staying[*index] && held.get(&element_key(raw)) == Some(index))
        .map(|(_, raw)| RawElement {
            timeout_ms: None,
            expiration_ms: None,
            ..raw.clone()
        })
        .collect();
    // In the order the model encodes them (ascending, a range's start before
    // its end), not the order read: removed in the order an rbtree dump
    // lists them (descending, each end before its start), the end elements
    // stayed in the set on Linux 6.18 when removed with DESTROYSETELEM, which
    // passes over an element it does not find, and the verification found
    // them. (Removals are DELSETELEM now, which would fail instead.)
    remove.sort();
    Ok(Some(Change {
        kept,
        changed: added + elements::logical_count(&remove),
        edit: SetEdit { remove, add },
    }))
}

/// How `apply` gets from the table in force to the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Approach {
    /// There is no table: create it, with generation 1.
    Create,
    /// The table cannot switch generations: replace it as a whole, once.
    Replace {
        reason: String,
    },
    Swap(Swap),
    /// The model differs from the generation in force only in the elements
    /// of static sets and in its digest: one transaction changes those
    /// sets in place and replaces the entry rules (with the new digest),
    /// see the module docs. A [`Swap`] with `to == from`: every static set
    /// is kept (`reuse`), `edit` holds the element changes, and nothing is
    /// created, loosened or tightened.
    Edit(Swap),
}

/// The highest generation number any object of the table carries.
fn highest_generation(table: &KernelTable) -> u32 {
    let chains = table
        .chains
        .iter()
        .chain(&table.leftover_chains)
        .map(|c| c.kernel_name.as_str());
    let sets = table
        .sets
        .iter()
        .chain(&table.leftover_sets)
        .map(|s| s.kernel_name.as_str());
    chains
        .chain(sets)
        .filter_map(|name| split(name).map(|(_, generation)| generation))
        .max()
        .unwrap_or(0)
}

fn find_set<'t>(table: &'t KernelTable, kernel_name: &str) -> Option<&'t KernelSet> {
    table
        .sets
        .iter()
        .chain(&table.leftover_sets)
        .find(|s| s.kernel_name == kernel_name)
}

/// Decide how to apply `model` over `table` (the table as read, `None` if absent).
pub fn approach(model: &Ruleset, table: Option<&KernelTable>) -> Result<Approach, super::Error> {
    let Some(table) = table else {
        return Ok(Approach::Create);
    };
    let replace = |reason: String| Ok(Approach::Replace { reason });
    let Some(from) = table.generation else {
        return replace(
            "its base chains do not jump into a netleash generation (it was written by an earlier \
             netleash or by another program)"
                .into(),
        );
    };
    let kernel_bases: Vec<&KernelChain> =
        table.chains.iter().filter(|c| c.hook.is_some()).collect();
    let model_bases: Vec<_> = model
        .chains
        .iter()
        .filter_map(|c| c.base.map(|base| (c, base)))
        .collect();
    let mut previous = Vec::new();
    let (mut loosen, mut tighten) = (Vec::new(), Vec::new());
    for (chain, base) in &model_bases {
        let Some(kernel) = kernel_bases.iter().find(|k| k.kernel_name == chain.name) else {
            return replace(format!("it has no base chain {:?}", chain.name));
        };
        let same_hook = kernel.hook == Some(hook_number(base.hook))
            && kernel.priority == Some(base.priority)
            && kernel.chain_type.as_deref() == chain_type(base.kind).to_str().ok();
        if !same_hook {
            return replace(format!(
                "its base chain {:?} has another hook, priority or type",
                chain.name
            ));
        }
        let [rule] = kernel.rules.as_slice() else {
            return replace(format!(
                "its base chain {:?} holds {} rules instead of one jump",
                chain.name,
                kernel.rules.len()
            ));
        };
        let target = match rule.expressions.as_slice() {
            [expr] => match &expr.reference {
                Some(ffi::Reference::Jump(target)) => Some(target.clone()),
                _ => None,
            },
            _ => None,
        };
        let Some(target) = target else {
            return replace(format!(
                "the rule of its base chain {:?} is not a plain jump",
                chain.name
            ));
        };
        let policy = kernel.policy.unwrap_or(libc::NF_ACCEPT as u32);
        let wanted = policy_number(base.policy);
        if policy != wanted {
            if base.policy == ChainPolicy::Accept {
                loosen.push(chain.name.clone());
            } else {
                tighten.push(chain.name.clone());
            }
        }
        previous.push(EntryRule {
            chain: chain.name.clone(),
            hook: ffi::BaseHook {
                hook: hook_number(base.hook),
                priority: base.priority,
                policy,
                chain_type: chain_type(base.kind),
            },
            id: rule.id.clone(),
            digest: rule.digest.clone(),
            target,
        });
    }
    if let Some(extra) = kernel_bases
        .iter()
        .find(|k| model.chain(&k.kernel_name).is_none_or(|c| c.base.is_none()))
    {
        return replace(format!(
            "it has a base chain {:?} the policy does not have",
            extra.kernel_name
        ));
    }
    if let Some(chain) = table
        .chains
        .iter()
        .find(|c| c.hook.is_none() && split(&c.kernel_name).is_none_or(|(_, g)| g != from))
    {
        return replace(format!(
            "the policy in force reaches chain {:?}, which is not of its generation {from}",
            chain.kernel_name
        ));
    }

    // For an edit of the generation in force: changed in place up to
    // `EDIT_SLACK` changes more than stay. For a swap: kept as it is if it
    // holds the model set exactly, kept and changed in place if it holds a
    // few elements more or fewer ([`kept_in_swap`]), which is always within
    // the edit's slack: a swap keeps the edit's sets but `not_kept_in_swap`.
    let (mut reuse, mut edit) = (BTreeMap::new(), BTreeMap::new());
    let mut not_kept_in_swap = Vec::new();
    for set in model.sets.iter().filter(|s| !persistent_set(s)) {
        let Some(kernel) = table.sets.iter().find(|k| k.name == set.name) else {
            continue;
        };
        let Some(change) = set_change(set, kernel)? else {
            continue;
        };
        if change.changed > change.kept + EDIT_SLACK {
            continue;
        }
        if !kept_in_swap(&change) {
            not_kept_in_swap.push(set.name.clone());
        }
        reuse.insert(set.name.clone(), kernel.kernel_name.clone());
        if !change.edit.is_empty() {
            edit.insert(set.name.clone(), change.edit);
        }
    }
    let mut create = Vec::new();
    for set in model.sets.iter().filter(|s| persistent_set(s)) {
        match find_set(table, &set.name) {
            None => create.push(set.name.clone()),
            Some(kernel) => {
                let definition = elements::set_definition(set, 0)?;
                let same = kernel.flags == definition.flags
                    && kernel.key_type == definition.key_type
                    && kernel.key_len == definition.key_len;
                if !same {
                    return replace(format!(
                        "its set {:?} has another type or other flags than the policy's",
                        set.name
                    ));
                }
            }
        }
    }
    let Some(to) = highest_generation(table).checked_add(1) else {
        return replace("its generation numbers are exhausted".into());
    };
    let in_place = Swap {
        from,
        to: from,
        create,
        loosen,
        tighten,
        previous,
        from_comment: table.generation_comment.clone(),
        from_digest: table.digest.clone(),
        reuse,
        edit,
    };
    if let Some(reason) = why_not_edit(model, table, &in_place)? {
        tracing::debug!("generation {from} is swapped, not edited in place: {reason}");
        let mut swap = Swap { to, ..in_place };
        for name in &not_kept_in_swap {
            swap.reuse.remove(name);
            swap.edit.remove(name);
        }
        return Ok(Approach::Swap(swap));
    }
    Ok(Approach::Edit(in_place))
}

/// Why `swap` (planned by [`approach`] from `table`) cannot be an edit in
/// place of the generation in force, or `None` if it can: the generation
/// in force was staged for a model of the same shape ([`shape`]: the same
/// chains, rules, set definitions, base chain policies and persistent sets),
/// nothing else is in the table (no leftovers, no set or chain the model
/// lacks), and what differs from the model is at most the policy digest and
/// the elements of static sets that can be changed in place (`set_change`,
/// with at most [`EDIT_SLACK`] changes more than stay).
///
/// The shape digest decides it before anything is committed, and covers
/// what the verification after the commit does not read back (a set's
/// default timeout, its role): two models of the same shape have rules that
/// are equal in every byte, and the table's rules are those the generation
/// was staged with, as its last verification found them (or as read, in an
/// apply without memory of the table).
fn why_not_edit(
    model: &Ruleset,
    table: &KernelTable,
    swap: &Swap,
) -> Result<Option<String>, super::Error> {
    let in_force = table.generation_comment.as_deref().and_then(comment_shape);
    if in_force != Some(shape(model).as_str()) {
        return Ok(Some(
            "its rules, chains or set definitions differ from the policy's".into(),
        ));
    }
    if !swap.loosen.is_empty() || !swap.tighten.is_empty() {
        return Ok(Some("a base chain policy changes".into()));
    }
    if !swap.create.is_empty() {
        return Ok(Some("a DNS-derived set is missing".into()));
    }
    if !table.leftover_chains.is_empty() || !table.leftover_sets.is_empty() {
        return Ok(Some(
            "what is left of earlier generations is to be deleted".into(),
        ));
    }
    if let Some(set) = model
        .sets
        .iter()
        .find(|s| !persistent_set(s) && !swap.reuse.contains_key(&s.name))
    {
        return Ok(Some(format!(
            "set {:?} changes in more elements than stay, or is created again",
            set.name
        )));
    }
    // The elements of every static set were compared above (each is in
    // `swap.reuse`, its change computed by `set_change`); the rest is
    // compared here, without encoding every element again.
    let differences = super::readback::differences_but_elements(model, table)?;
    Ok(differences
        .iter()
        .find(|d| !matches!(d, super::Difference::Digest { .. }))
        .map(|d| format!("the table in force differs in more than elements: {d}")))
}

/// The comment prefix of a generation's shape digest.
pub const SHAPE_PREFIX: &str = "shape ";

/// What separates the shape digest from the staged policy's tag in a
/// generation's comment ([`generation_comment`]).
const STAGED: &str = " staged ";

/// The comment of the chains of `ruleset`'s generation: its shape digest
/// ([`shape`]) and, after ` staged `, the first 16 hex digits of the digest of
/// the policy it was staged for (`shape sha256:… staged sha256:0123…`, 108
/// bytes: nft reads back comments of up to 128). The shape decides whether a
/// policy can be put in force by an edit in place; the tag tells apart two
/// generations of the same number and shape that two concurrent applies
/// staged for different policies (one staged after a third apply's cleanup
/// deleted the other's), so that a swap never goes into another apply's
/// generation (see `kernel::generation_is_there`). It is fixed when the
/// generation is staged: after an edit in place the policy in force is the
/// one its entry rules name, not the one it was staged for.
pub fn generation_comment(ruleset: &Ruleset) -> String {
    let digest = &ruleset.digest;
    let tag = digest.get(..digest.find(':').map_or(0, |colon| colon + 1) + 16);
    format!("{}{STAGED}{}", shape(ruleset), tag.unwrap_or(digest))
}

/// The shape digest in a generation's comment, if it has one (a generation
/// an earlier netleash staged carries the policy digest instead).
pub fn comment_shape(comment: &str) -> Option<&str> {
    comment.starts_with(SHAPE_PREFIX).then(|| {
        comment
            .split_once(STAGED)
            .map_or(comment, |(shape, _)| shape)
    })
}

/// The shape digest of `ruleset` (in its [`entry_form`]), which its
/// generation's chains carry in their comment ([`generation_comment`]):
/// `shape sha256:HEX` over
/// everything the kernel gets of it but the elements of its static sets
/// (chains and their rules, every set's definition, the persistent sets,
/// the base chains' hooks and policies), and over the netleash version that
/// lays it out. Two models with the same shape digest put the same rules,
/// byte for byte, into the kernel, so one can replace the other by changing
/// set elements alone ([`Approach::Edit`]).
///
/// The encoding is what the model's derived `Hash` writes, fed to SHA-256
/// instead of a hasher: every field, enums with their discriminant, lists
/// with their length, strings with a terminator (a prefix-free encoding, so
/// two different shapes never write the same bytes). It costs a few
/// microseconds where formatting the model's `Debug` text cost 13 µs warm
/// and about 50 µs in a cold apply (a fresh namespace's, measured). A
/// different netleash or compiler version may encode differently: that can
/// only make a digest differ (a swap instead of an edit), never make two
/// shapes equal.
pub fn shape(ruleset: &Ruleset) -> String {
    use sha2::{Digest, Sha256};
    use std::hash::{Hash, Hasher};

    /// A `Hasher` that feeds what it is given to SHA-256.
    struct Feed(Sha256);
    impl Hasher for Feed {
        fn write(&mut self, bytes: &[u8]) {
            self.0.update(bytes);
        }
        fn finish(&self) -> u64 {
            0
        }
    }

    let mut feed = Feed(Sha256::new());
    feed.write(b"netleash generation shape v2\0");
    env!("CARGO_PKG_VERSION").hash(&mut feed);
    ruleset.mode.hash(&mut feed);
    ruleset.sets.len().hash(&mut feed);
    for set in &ruleset.sets {
        if persistent_set(set) {
            set.hash(&mut feed);
        } else {
            // Every field but the elements (named, so that a new field
            // cannot be left out unnoticed).
            let Set {
                name,
                key,
                role,
                interval,
                timeout,
                elements: _,
            } = set;
            (name, key, role, interval, timeout).hash(&mut feed);
        }
    }
    ruleset.chains.hash(&mut feed);
    format!("{SHAPE_PREFIX}sha256:{}", hex::encode(feed.0.finalize()))
}

/// The comment of a base chain's entry rule: the rule's id, a space, and
/// the digest of the policy in force (`output-egress sha256:HEX`). The entry
/// rules are replaced by every swap and every edit, so they, not the
/// generation's chains (whose comment the kernel cannot change), say which
/// policy is in force. Rule ids have no spaces.
pub fn entry_comment(id: &str, digest: Option<&str>) -> String {
    match digest {
        Some(digest) => format!("{id} {digest}"),
        None => id.to_string(),
    }
}

/// A rule comment split into its id and the policy digest an entry rule
/// carries after it (see [`entry_comment`]).
pub fn split_entry_comment(comment: &str) -> (&str, Option<&str>) {
    match comment.split_once(' ') {
        Some((id, digest)) if digest.starts_with("sha256:") => (id, Some(digest)),
        _ => (comment, None),
    }
}

/// Kernel names of the objects a cleanup deletes: chains in the order to
/// delete them (a chain before the chains it jumps to), then sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Deletions {
    pub chains: Vec<String>,
    pub sets: Vec<String>,
}

impl Deletions {
    pub fn is_empty(&self) -> bool {
        self.chains.is_empty() && self.sets.is_empty()
    }

    /// Every object no base chain reaches: what is left of earlier
    /// generations. The kernel lists chains in the order they were created,
    /// and a generation's chains are created before the chains that jump to
    /// them, so they are deleted in reverse.
    pub fn leftovers(table: &KernelTable) -> Deletions {
        Deletions {
            chains: table
                .leftover_chains
                .iter()
                .rev()
                .map(|c| c.kernel_name.clone())
                .collect(),
            sets: table
                .leftover_sets
                .iter()
                .map(|s| s.kernel_name.clone())
                .collect(),
        }
    }

    /// What `swap` to a generation of `model` leaves unreachable in `table`
    /// (the table as read before the swap): the generation in force, the
    /// persistent sets the model no longer has, and the leftovers; not the
    /// sets the new generation keeps.
    pub fn after_swap(table: &KernelTable, model: &Ruleset, swap: &Swap) -> Deletions {
        let kept = |kernel_name: &str| {
            model.set(kernel_name).is_some_and(persistent_set)
                || swap.reuse.values().any(|reused| reused == kernel_name)
        };
        let mut deletions = Deletions::leftovers(table);
        deletions.sets.retain(|name| !kept(name));
        deletions.chains.extend(
            table
                .chains
                .iter()
                .rev()
                .filter(|c| c.hook.is_none())
                .map(|c| c.kernel_name.clone()),
        );
        deletions.sets.extend(
            table
                .sets
                .iter()
                .filter(|s| !kept(&s.kernel_name))
                .map(|s| s.kernel_name.clone()),
        );
        deletions
    }
}

/// The model names of kernel names, sorted and without duplicates, for messages.
pub fn model_names<'a>(kernel_names: impl Iterator<Item = &'a str>) -> Vec<String> {
    let mut names: BTreeMap<String, ()> = BTreeMap::new();
    for name in kernel_names {
        let model = split(name).map_or(name, |(model, _)| model);
        names.insert(model.to_string(), ());
    }
    names.into_keys().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_names_split_back_into_model_names() {
        assert_eq!(name("allow_v4_tcp_443", 12), "allow_v4_tcp_443.g12");
        assert_eq!(
            split("allow_v4_tcp_443.g12"),
            Some(("allow_v4_tcp_443", 12))
        );
        assert_eq!(split("egress.g1"), Some(("egress", 1)));
        for plain in [
            "egress",
            "dns_v4",
            "a.g",
            ".g3",
            "a.g03",
            "a.g0x",
            "a.g-1",
            "a.g99999999999",
        ] {
            assert_eq!(split(plain), None, "{plain}");
        }
    }

    fn allow_set(nets: &[&str]) -> Set {
        Set {
            name: "allow_v4".into(),
            key: crate::ruleset::SetKey::Addr(crate::ruleset::Family::V4),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements: nets
                .iter()
                .map(|n| Element::Addr(n.parse().unwrap()))
                .collect(),
        }
    }

    /// Kernel set `allow_v4.g1`, verified to hold `held`.
    fn verified(held: &Set) -> KernelSet {
        KernelSet {
            verified_as: Some(held.clone()),
            ..read(held)
        }
    }

    /// Kernel set `allow_v4.g1` as a one-shot apply reads it: holding the
    /// encoding of `held`, in the order an rbtree dump lists it (descending),
    /// with no model set it was verified to hold.
    fn read(held: &Set) -> KernelSet {
        let mut elements = elements::encode_all(held).unwrap();
        elements.reverse();
        KernelSet {
            name: held.name.clone(),
            kernel_name: "allow_v4.g1".into(),
            flags: elements::set_definition(held, 0).unwrap().flags,
            key_type: elements::datatype::IPADDR,
            key_len: 4,
            elements,
            elements_read: true,
            verified_as: None,
        }
    }

    fn encoded(set: &Set, nets: &[&str]) -> Vec<RawElement> {
        let mut encoded = Vec::new();
        for net in nets {
            let element = Element::Addr(net.parse().unwrap());
            encoded.extend(elements::encode(&set.name, set.key, set.interval, &element).unwrap());
        }
        encoded
    }

    /// The edit a swap makes of `kernel` to turn it into `set`, if it keeps
    /// the set.
    fn edit(set: &Set, kernel: &KernelSet) -> Option<SetEdit> {
        set_change(set, kernel)
            .unwrap()
            .filter(kept_in_swap)
            .map(|change| change.edit)
    }

    #[test]
    fn a_set_is_edited_in_place_only_when_fewer_elements_change_than_stay() {
        let held = allow_set(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32", "10.0.0.4/32"]);
        // The same edits whether the set was verified or only read.
        for kernel in [verified(&held), read(&held)] {
            // One replaced: two changes, three stay. Each range goes with
            // its end element.
            let one = allow_set(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32", "10.0.0.9/32"]);
            assert_eq!(
                edit(&one, &kernel),
                Some(SetEdit {
                    remove: encoded(&one, &["10.0.0.4/32"]),
                    add: encoded(&one, &["10.0.0.9/32"]),
                })
            );
            // Two replaced: four changes, two stay.
            let two = allow_set(&["10.0.0.1/32", "10.0.0.2/32", "10.0.0.8/32", "10.0.0.9/32"]);
            assert_eq!(edit(&two, &kernel), None);
            // A model listing an element twice is created (and refused), not edited.
            let twice = allow_set(&["10.0.0.1/32", "10.0.0.1/32", "10.0.0.2/32", "10.0.0.3/32"]);
            assert_eq!(edit(&twice, &kernel), None);
            // Another key or flags: created again.
            let mut single = one.clone();
            single.interval = false;
            assert_eq!(edit(&single, &kernel), None);
            // Unchanged, also when empty: kept as it is.
            assert_eq!(edit(&held, &kernel), Some(SetEdit::default()));
            let empty = allow_set(&[]);
            let empty_kernel = KernelSet {
                verified_as: kernel.verified_as.as_ref().map(|_| empty.clone()),
                ..read(&empty)
            };
            assert_eq!(edit(&empty, &empty_kernel), Some(SetEdit::default()));
            // Elements not read: unknown.
            let unread = KernelSet {
                elements_read: false,
                ..kernel.clone()
            };
            assert_eq!(edit(&one, &unread), None);
        }
    }

    #[test]
    fn a_read_set_loses_exactly_what_it_holds_beyond_the_model() {
        let held = allow_set(&[
            "10.0.0.0/30",
            "10.0.1.0/32",
            "10.0.2.0/32",
            "10.0.3.0/32",
            "10.0.4.0/32",
        ]);
        let mut kernel = read(&held);
        // Another program added a range start without its end (open to the
        // top of the address space): the model cannot express it, and it goes.
        let stray = RawElement {
            key: vec![192, 0, 2, 1],
            key_end: None,
            interval_end: false,
            timeout_ms: None,
            expiration_ms: None,
        };
        kernel.elements.push(stray.clone());
        // A range that grows keeps neither its start nor its end: both go,
        // and the grown range is added whole.
        let grown = allow_set(&[
            "10.0.0.0/29",
            "10.0.1.0/32",
            "10.0.2.0/32",
            "10.0.3.0/32",
            "10.0.4.0/32",
        ]);
        let change = edit(&grown, &kernel).expect("three changes, four stay");
        // In ascending order (a range's start before its end), whatever the
        // order read.
        let mut gone = encoded(&held, &["10.0.0.0/30"]);
        gone.push(stray);
        assert_eq!(change.remove, gone);
        assert_eq!(change.add, encoded(&grown, &["10.0.0.0/29"]));
        // A set that holds an element twice, as a dump that met a hash
        // resize lists it, loses nothing for it.
        let mut twice = read(&held);
        twice.elements.push(twice.elements[0].clone());
        let change = edit(&grown, &twice).unwrap();
        assert_eq!(change.remove.len(), 2, "{change:?}");
    }

    #[test]
    fn a_concatenated_interval_set_is_edited_in_place_only_when_it_loses_nothing() {
        let ported = |nets: &[&str]| Set {
            name: "concatenated_v4".into(),
            key: SetKey::AddrProtoPort(crate::ruleset::Family::V4),
            elements: nets
                .iter()
                .map(|n| Element::AddrProtoPort(n.parse().unwrap(), crate::policy::Proto::Tcp, 443))
                .collect(),
            ..allow_set(&[])
        };
        let held = ported(&["10.0.0.0/30", "10.0.1.0/30", "10.0.2.0/30", "10.0.3.0/30"]);
        let concatenated = KernelSet {
            key_type: elements::set_definition(&held, 0).unwrap().key_type,
            key_len: 12,
            ..read(&held)
        };
        let added = ported(&[
            "10.0.0.0/30",
            "10.0.1.0/30",
            "10.0.2.0/30",
            "10.0.3.0/30",
            "10.0.9.0/30",
        ]);
        let replaced = ported(&["10.0.0.0/30", "10.0.1.0/30", "10.0.2.0/30", "10.0.9.0/30"]);
        let verified = KernelSet {
            verified_as: Some(held.clone()),
            ..concatenated.clone()
        };
        for kernel in [verified, concatenated] {
            assert_eq!(
                edit(&added, &kernel).map(|edit| (edit.remove.len(), edit.add.len())),
                Some((0, 1))
            );
            assert_eq!(edit(&replaced, &kernel), None);
        }
    }

    #[test]
    fn a_generation_comment_carries_the_shape_and_the_staged_policy() {
        let mut model = Ruleset {
            mode: crate::policy::Mode::Limited,
            digest: format!("sha256:{}", "ab".repeat(32)),
            sets: vec![allow_set(&["10.0.0.1/32"])],
            chains: vec![],
            names: vec![],
        };
        let comment = generation_comment(&model);
        assert_eq!(
            comment,
            format!("{} staged sha256:{}", shape(&model), "ab".repeat(8))
        );
        assert!(
            comment.len() <= 128,
            "nft reads back comments of up to 128 bytes"
        );
        assert_eq!(comment_shape(&comment), Some(shape(&model).as_str()));
        // An earlier netleash's comment, the policy digest: no shape.
        assert_eq!(comment_shape(&model.digest), None);
        // Other elements, the same shape; another set definition, another.
        let same = shape(&model);
        model.sets[0] = allow_set(&["10.0.0.2/32"]);
        assert_eq!(shape(&model), same);
        model.sets[0].interval = false;
        assert_ne!(shape(&model), same);
    }

    #[test]
    fn model_names_strip_generations_and_deduplicate() {
        assert_eq!(
            model_names(["allow_v4.g3", "allow_v4.g4", "dns_v4"].into_iter()),
            vec!["allow_v4".to_string(), "dns_v4".to_string()]
        );
    }
}
