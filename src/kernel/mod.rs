//! The only module that talks netlink: applies a [`crate::ruleset::Ruleset`]
//! in generations (see [`generation`]), reads it back, and updates set elements.
//!
//! A [`Session`] is a netfilter netlink socket opened inside the target
//! network namespace (by a thread that enters it, [`netns::run_in`]); a
//! socket stays in the namespace it was created in, so the session then
//! works from any thread without entering the namespace again. The free
//! functions work in a session of their own: the calling thread enters the
//! namespace, does the work and goes back ([`netns::visit_then_drop`]), and
//! another thread closes the socket without the caller waiting.
//!
//! - [`apply`] puts a new generation of the `inet netleash` table in force
//!   atomically for packets, verifies what the kernel then holds against the
//!   model, and rolls back to the previous generation if it does not match;
//! - [`status`] reads the table back: digest, generation, set sizes, counters;
//! - [`plan`] is `apply --dry-run`: what would change, checked by the kernel
//!   without committing;
//! - [`update_elements`] adds, refreshes and removes set elements without
//!   touching the rules (the DNS layer drives it);
//! - [`remove`] deletes the table.
//!
//! Modules: `generation` decides how a policy replaces the one in force,
//! `batch` builds the transactions, `elements` encodes set elements,
//! `readback` reads and compares, `netlink` is the socket, and `ffi` is the
//! only place that calls libnftnl directly. `last_apply` keeps what a
//! one-shot apply verified in a file, for the next one-shot apply in the
//! same namespace to plan from. `nflog` is apart from all of
//! them: it subscribes to the nflog group the `deny` chain logs to and parses
//! the denied packets (the sidecar's denied-connection log).

mod attributes;
mod batch;
mod elements;
mod expressions;
mod ffi;
mod generation;
pub mod last_apply;
mod learned;
mod netlink;
pub mod nflog;
pub mod phases;
mod readback;
mod rule_message;

use std::ffi::CString;
use std::io;

pub use elements::{ElementWriter, SetChange, SetUpdate};
pub use learned::{HeldElement, carry_updates};
pub use readback::{ChainStatus, CountedVerdict, Difference, RuleCounter, SetStatus, TableStatus};

use crate::netns;
use crate::ruleset::{Ruleset, TABLE_NAME};
use batch::Creation;
use generation::{Approach, Deletions, Swap};
use netlink::{Echo, Netlink, Transaction};
use readback::{Detail, ElementPlan, KernelTable, Snapshot};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Netns(#[from] netns::Error),
    #[error(
        "cannot open a netfilter netlink socket (nftables needs CAP_NET_ADMIN in the namespace)"
    )]
    Socket(#[source] io::Error),
    #[error("cannot send the transaction to the kernel")]
    Send(#[source] io::Error),
    #[error("cannot receive the kernel's answer")]
    Receive(#[source] io::Error),
    #[error(
        "the kernel rejected {object}{detail}; the whole transaction was dropped and nothing changed{also}"
    )]
    Rejected {
        object: String,
        /// The kernel's extended ack text, in parentheses, if any.
        detail: String,
        /// Other objects the kernel rejected in the same transaction.
        also: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the kernel's answers to the transaction were lost (socket receive buffer overrun), so whether it \
         was applied is unknown; run `netleash status` to see what is in force"
    )]
    AcksLost,
    #[error("the kernel did not acknowledge {first}, so whether it was applied is unknown")]
    Unacknowledged { first: String },
    #[error("unexpected answer from the kernel: {0}")]
    Malformed(String),
    #[error("cannot read {what} of table inet {TABLE_NAME} from the kernel")]
    Dump {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(
        "the nftables ruleset kept changing while netleash read or changed it ({attempts} attempts); \
         nothing of this apply is in force; try again"
    )]
    Unstable { attempts: usize },
    #[error(
        "the nftables ruleset changed since netleash read it, so the kernel refused the transaction \
         and nothing changed"
    )]
    RulesetChanged,
    #[error("there is no table inet {TABLE_NAME} in this network namespace; apply a policy first")]
    NoTable,
    #[error(
        "table inet {TABLE_NAME} is missing right after the kernel accepted it; another program removed it"
    )]
    MissingAfterApply,
    #[error(
        "the kernel accepted the transaction, but the table it then held did not match the policy \
         ({} difference(s)): {}; {rollback}",
        .differences.len(),
        .differences.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Verify {
        differences: Vec<Difference>,
        /// What happened to the previous policy.
        rollback: String,
    },
    #[error("{name:?} cannot be an nftables name: it contains a NUL byte or is too long")]
    InvalidName { name: String },
    #[error(
        "a rule of chain {chain:?} takes {bytes} bytes, more than one netlink attribute \
         holds (65,535); split its matches over several rules"
    )]
    RuleTooLarge { chain: String, bytes: usize },
    #[error("cannot put {element} into set {set:?}: {reason}")]
    InvalidElement {
        set: String,
        element: String,
        reason: String,
    },
    #[error("table inet {TABLE_NAME} has no set {set:?} (its sets: {})", .known.join(", "))]
    NoSuchSet { set: String, known: Vec<String> },
    #[error("rule {rule:?} looks up set {set:?}, which the ruleset does not define")]
    UnknownSet { set: String, rule: String },
    #[error("cannot set up the netfilter netlink socket for nflog group {group}")]
    NflogSocket {
        group: u16,
        #[source]
        source: io::Error,
    },
    #[error("cannot listen to nflog group {group}{hint}")]
    NflogBind {
        group: u16,
        /// What to do about it, starting with ": ", or empty.
        hint: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot read denied packets from nflog group {group}")]
    NflogReceive {
        group: u16,
        #[source]
        source: io::Error,
    },
}

impl Error {
    /// The errno of a kernel rejection, if this is one.
    pub fn kernel_errno(&self) -> Option<i32> {
        match self {
            Error::Rejected { source, .. } => source.raw_os_error(),
            _ => None,
        }
    }
}

fn table_name() -> CString {
    CString::new(TABLE_NAME).expect("the table name has no NUL byte")
}

/// What `snapshot` knew of the sets `swap` changes in place, as the
/// verification may use it: no longer the model set each was verified to
/// hold, and for a set whose changes the kernel does not echo
/// ([`batch::edit_is_echoed`]), no elements either: what the kernel made of
/// the change is then read back. An echoed change is composed with the
/// elements the set held (`readback::compose`): what the kernel says it
/// removed and added, never what the transaction asked for.
fn forget_edited(snapshot: &mut Snapshot, swap: &Swap) {
    if let Some(before) = &mut snapshot.table {
        for set in &mut before.sets {
            let Some((_, edit)) = swap
                .edit
                .iter()
                .find(|(name, _)| swap.reuse.get(*name) == Some(&set.kernel_name))
            else {
                continue;
            };
            set.verified_as = None;
            if !batch::edit_is_echoed(edit) {
                set.elements = Vec::new();
                set.elements_read = false;
            }
        }
    }
}

/// How `apply` puts a policy in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Method {
    /// There was no table: it is created with generation 1.
    Create,
    /// The table was in another shape (see [`generation`]) and is replaced
    /// as a whole, once, with generation 1.
    Replace { reason: String },
    /// Generation `to` is staged and swapped in for generation `from`.
    Swap { from: u32, to: u32 },
    /// Generation `generation` stays in force and is edited in place, in
    /// one transaction: the policy differs from it only in the elements of
    /// static sets (`removed` and `added` elements, ranges counted once)
    /// and in its digest (see [`generation`]). Its rules keep their counters.
    Edit {
        generation: u32,
        added: usize,
        removed: usize,
    },
}

impl Method {
    /// The method of `edit`, an `Approach::Edit`.
    fn edit_of(edit: &Swap) -> Method {
        let count = |elements: fn(&generation::SetEdit) -> &Vec<ffi::RawElement>| {
            edit.edit
                .values()
                .map(|change| elements::logical_count(elements(change)))
                .sum()
        };
        Method::Edit {
            generation: edit.to,
            added: count(|change| &change.add),
            removed: count(|change| &change.remove),
        }
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Method::Create => write!(f, "created the table (generation 1)"),
            Method::Replace { reason } => write!(
                f,
                "replaced the table as a whole (generation 1), because {reason}"
            ),
            Method::Swap { from, to } => write!(f, "swapped generation {from} for {to}"),
            Method::Edit {
                generation,
                added,
                removed,
            } => write!(
                f,
                "edited generation {generation} in place ({added} element(s) added, {removed} \
                 removed; rules and counters kept)"
            ),
        }
    }
}

/// How an apply knew the table it changed, before its first transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKnown {
    /// Read from the kernel.
    Read,
    /// Remembered by the session from its previous apply.
    Session,
    /// Recalled from the file the previous verified apply in the network
    /// namespace left (see [`last_apply`]).
    LastApply,
    /// Assumed absent, unread, because no verified apply in the namespace
    /// left a file (see [`last_apply`]): a namespace that has never had a
    /// table. The create that followed asked the kernel to refuse it if the
    /// table existed (`NLM_F_EXCL`), and the kernel did not.
    AssumedAbsent,
}

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The digest of the ruleset now in force, as read back from the kernel.
    pub digest: String,
    /// The generation now in force.
    pub generation: u32,
    pub method: Method,
    /// How often the kernel refused a transaction because the ruleset had
    /// changed since it was read, and the apply started over.
    pub restarts: usize,
    /// How the table was known to the attempt that succeeded (an attempt
    /// that planned from memory the kernel refused counts in `restarts`).
    pub table_known: TableKnown,
    /// Named sets, and the elements (ranges count once) of the sets the
    /// policy fixes, as verified; the DNS-derived sets' elements, learned at
    /// run time, are not counted.
    pub sets: usize,
    pub elements: usize,
    /// Rules in all chains, as read back.
    pub rules: usize,
}

/// What `apply` would change (`apply --dry-run`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// The table in force, if any.
    pub current: Option<TableStatus>,
    /// How the policy in force differs from `ruleset`; empty if the table is
    /// absent (everything would be created) or already enforces `ruleset`.
    pub differences: Vec<Difference>,
    /// How `apply` would put `ruleset` in force.
    pub method: Method,
}

/// How often `apply` starts over when the kernel refuses a transaction
/// because the ruleset changed since it was read (a DNS set update in
/// between is enough), and how often one step of a generation swap is retried.
const ATTEMPTS: usize = 5;

/// The ruleset generation id after one more commit: the kernel skips 0
/// (`nf_tables_commit`: `while (++base_seq == 0)`), which means "no check".
fn next_genid(genid: u32) -> u32 {
    match genid.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

/// The ruleset generation id before `genid`: [`next_genid`] backwards.
fn previous_genid(genid: u32) -> u32 {
    match genid.wrapping_sub(1) {
        0 => u32::MAX,
        previous => previous,
    }
}

/// A netfilter netlink socket in one network namespace, for a caller that
/// acts there repeatedly (e.g. the agent serving a sandbox): no thread and no
/// socket per call. The socket holds a reference to the namespace, so drop
/// the session when the sandbox ends.
pub struct Session {
    netlink: Netlink,
    /// The table after this session's last apply, as its verification read
    /// it (the sets in force with their elements), and the ruleset generation
    /// id that goes with it, so the next apply plans without reading the
    /// table first, keeps the sets that it does not change, and changes in
    /// place those it changes in a few elements (`generation::kept_in_swap`,
    /// from the model set each was verified to hold). Its transactions carry
    /// that id: if anything else committed since, the kernel refuses them and
    /// the apply reads the table and starts over. Without it (a new session,
    /// or a one-shot [`apply`] without a usable [`last_apply`] file, from
    /// which it recalls this) the apply reads the table with the elements
    /// of every static set, and keeps and changes in place from those.
    known: Option<Snapshot>,
    /// How the last apply's verification got the table it compared.
    verified_from: Option<VerifiedFrom>,
    /// Whether `known` was recalled from the namespace's file (see
    /// [`last_apply`]) rather than left by this session's last apply.
    recalled: bool,
    /// How the last apply's last attempt knew the table it planned from.
    planned_from: Option<TableKnown>,
    /// Whether the next apply may assume that there is no table, without
    /// reading (see [`TableKnown::AssumedAbsent`]): set by a one-shot
    /// [`apply`] that found no last-apply file, used once.
    assume_absent: bool,
}

/// Where a verification got the table it compared with the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum VerifiedFrom {
    /// The kernel's echo of the transactions, composed with the table
    /// before them (plus a dump of the elements of the sets they created).
    Echo,
    /// Dumps of the table.
    Read,
}

impl Session {
    /// Open a session in `target` (the socket is created by a thread that
    /// enters the namespace; the caller's namespace never changes).
    pub fn open(target: &netns::Target) -> Result<Session, Error> {
        netns::run_in(target, Session::open_here)?
    }

    /// Open a session in the calling thread's network namespace: for a
    /// caller already inside the sandbox's namespace, e.g. a
    /// [`netns::run_in`] visit that opens all of a sandbox's sockets at once.
    pub fn open_here() -> Result<Session, Error> {
        Ok(Session {
            netlink: Netlink::open()?,
            known: None,
            verified_from: None,
            recalled: false,
            planned_from: None,
            assume_absent: false,
        })
    }

    /// Put `ruleset` in force in the `inet netleash` table, atomically for
    /// packets, then read it back and verify it (see [`generation`]).
    ///
    /// If the kernel rejects a transaction, the policy in force before stays
    /// in force, and the error names the object the kernel rejected. If the
    /// kernel accepted everything but the table then differs from the model
    /// (another program changed it in between, or a bug), the previous
    /// generation is put back in force and the error lists every difference.
    pub fn apply(&mut self, ruleset: &Ruleset) -> Result<ApplyReport, Error> {
        phases::begin();
        let applied = self.apply_verified(ruleset, ruleset, &[]);
        phases::end();
        applied
    }

    /// [`Session::apply`], verified against `expected` instead of `ruleset`
    /// (they differ only in tests that make verification fail on purpose).
    fn apply_verified(
        &mut self,
        ruleset: &Ruleset,
        expected: &Ruleset,
        carried: &[SetUpdate],
    ) -> Result<ApplyReport, Error> {
        let ruleset = &*generation::entry_form(ruleset);
        let expected = &*generation::entry_form(expected);
        // A namespace that has never had a table: create it without reading
        // first, and let the kernel check the assumption. Refused (the table
        // exists), the apply reads the table and plans as usual.
        if std::mem::take(&mut self.assume_absent) && self.known.is_none() {
            self.planned_from = Some(TableKnown::AssumedAbsent);
            if let Some(mut report) = self.create_assumed_absent(ruleset, expected, carried)? {
                report.table_known = TableKnown::AssumedAbsent;
                return Ok(report);
            }
            tracing::debug!(
                "table inet {TABLE_NAME} exists though no last apply file says so; reading it"
            );
        }
        for restarts in 0..ATTEMPTS {
            let recalled = std::mem::take(&mut self.recalled);
            let (snapshot, known) = match self.known.take() {
                Some(known) if recalled => (known, TableKnown::LastApply),
                Some(known) => (known, TableKnown::Session),
                // With the elements of every static set, of any size: a set
                // that already holds what the model says is kept rather
                // than created again (`Swap::reuse`), and one that holds a
                // few elements more or fewer is changed in place
                // (`Swap::edit`, decided from the elements read).
                None => (
                    readback::read_table_to_change(&mut self.netlink, &compared_elements(ruleset))?,
                    TableKnown::Read,
                ),
            };
            phases::mark("read table");
            self.planned_from = Some(known);
            let approach = generation::approach(ruleset, snapshot.table.as_ref())?;
            phases::mark("plan");
            let outcome = match approach {
                Approach::Create => {
                    self.apply_whole(ruleset, expected, carried, snapshot.genid, Method::Create)
                }
                Approach::Replace { reason } => {
                    tracing::warn!(
                        "replacing table inet {TABLE_NAME} as a whole, once, because {reason}; \
                         packets may meet no table for a moment"
                    );
                    self.apply_whole(
                        ruleset,
                        expected,
                        carried,
                        snapshot.genid,
                        Method::Replace { reason },
                    )
                }
                Approach::Swap(swap) => self.apply_swap(ruleset, expected, carried, snapshot, swap),
                Approach::Edit(edit) => self.apply_edit(ruleset, expected, carried, snapshot, edit),
            };
            match outcome {
                Ok(mut report) => {
                    report.restarts = restarts;
                    report.table_known = known;
                    return Ok(report);
                }
                Err(Error::RulesetChanged) => self.known = None,
                Err(err) => {
                    self.known = None;
                    return Err(err);
                }
            }
        }
        Err(Error::Unstable { attempts: ATTEMPTS })
    }

    /// Commit `transaction`, which must find the ruleset at generation id
    /// `genid`. Lost answers count as success: the read-back that follows
    /// every change decides what is in force.
    fn commit_at(&mut self, mut transaction: Transaction, genid: u32) -> Result<(), Error> {
        transaction.expect_generation(genid);
        match self.netlink.commit(transaction) {
            Ok(()) | Err(Error::AcksLost) => Ok(()),
            Err(err) => Err(err),
        }
    }

    /// [`Session::commit_at`], returning what the kernel echoed of
    /// `transaction`, or `None` if its answers were lost.
    fn commit_echoed_at(
        &mut self,
        mut transaction: Transaction,
        genid: u32,
    ) -> Result<Option<Echo>, Error> {
        transaction.expect_generation(genid);
        match self.netlink.commit_echoed(transaction) {
            Ok(echo) => Ok(Some(echo)),
            Err(Error::AcksLost) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// The table after transactions that carried the ruleset generation ids
    /// `genid`, `next_genid(genid)`, ..., composed from `before` (the table
    /// at `genid`) and their echoes (see [`readback::compose`]), and compared
    /// with `expected`. The elements of the sets the transactions created are
    /// not echoed: they are read, and the reading counts only if the ruleset
    /// generation id is still the one the last transaction left (no commit
    /// since, so they are what the transaction created). `None` if an echo
    /// was lost or does not tell the whole policy in force, or something
    /// committed since: the caller then reads the table.
    fn compose_and_compare(
        &mut self,
        expected: &Ruleset,
        genid: u32,
        before: Option<&KernelTable>,
        echoes: &[Option<Echo>],
    ) -> Result<Option<(u32, KernelTable, Vec<Difference>)>, Error> {
        // Generation id 0 is "no check": the chain of ids proves nothing then.
        if genid == 0 {
            return Ok(None);
        }
        let Some(echoes) = echoes
            .iter()
            .map(Option::as_ref)
            .collect::<Option<Vec<&Echo>>>()
        else {
            return Ok(None);
        };
        let Some((mut table, echoed)) = readback::compose(before, &echoes) else {
            return Ok(None);
        };
        phases::mark("compose from echo");
        // Elements that a reading would not read (the DNS-derived sets') are
        // not part of what is known, also when echoed.
        let skip = compared_elements(expected).skip;
        let after = echoes.iter().fold(genid, |id, _| next_genid(id));
        let mut read = false;
        for set in &mut table.sets {
            if skip.contains(&set.name) {
                set.elements.clear();
                set.elements_read = false;
            } else if !set.elements_read {
                if readback::read_elements(&mut self.netlink, set)? {
                    return Ok(None);
                }
                set.elements_read = true;
                read = true;
            }
        }
        let mut differences = readback::differences(expected, &table)?;
        // A new set whose echoed elements are not the model's is dumped, and
        // what the dump finds is what counts: the echo spared a dump only
        // where it showed what was expected.
        let mut redo = false;
        for set in &mut table.sets {
            let differs = differences.iter().any(
                |d| matches!(d, Difference::SetElements { set: name, .. } if *name == set.name),
            );
            if differs && echoed.contains(&set.kernel_name) {
                if readback::read_elements(&mut self.netlink, set)? {
                    return Ok(None);
                }
                read = true;
                redo = true;
            }
        }
        if redo {
            differences = readback::differences(expected, &table)?;
        }
        if read && readback::generation_id(&mut self.netlink)? != after {
            return Ok(None);
        }
        phases::mark("compare");
        Ok(Some((after, table, differences)))
    }

    /// Read the table and compare the policy in force with `expected`, which
    /// this apply just put in force as generation `generation`, its entry
    /// rules carrying `digest`. If another generation is in force, or
    /// another digest (another apply edited the generation in place), another
    /// apply came after this one: this one is superseded, and starts over
    /// (`RulesetChanged`) rather than rolling the other one back.
    fn read_and_compare(
        &mut self,
        expected: &Ruleset,
        generation: u32,
        digest: &str,
        plan: &ElementPlan,
    ) -> Result<(u32, KernelTable, Vec<Difference>), Error> {
        let snapshot = readback::read_table_with(&mut self.netlink, plan)?;
        let table = snapshot.table.ok_or(Error::MissingAfterApply)?;
        if table.generation != Some(generation) || table.digest.as_deref() != Some(digest) {
            return Err(Error::RulesetChanged);
        }
        let differences = readback::differences(expected, &table)?;
        phases::mark("verify by reading");
        Ok((snapshot.genid, table, differences))
    }

    /// What an apply that verified `table` against `expected`, without a
    /// difference, reports. A compared set holds exactly its model set's
    /// elements (as sets; ranges once each), so it is counted from the
    /// model: counting its elements (sorted, to count each once, see
    /// `elements::logical_count`) took 0.6 ms of an edit at 10,005.
    fn report(
        table: &KernelTable,
        expected: &Ruleset,
        generation: u32,
        method: Method,
    ) -> ApplyReport {
        ApplyReport {
            digest: table.digest.clone().unwrap_or_default(),
            generation,
            method,
            restarts: 0,
            table_known: TableKnown::Read,
            sets: table.sets.len(),
            elements: table
                .sets
                .iter()
                .map(|s| match expected.set(&s.name) {
                    Some(model)
                        if s.elements_read && model.role != crate::ruleset::SetRole::DnsAllow =>
                    {
                        model.elements.len()
                    }
                    _ => elements::logical_count(&s.elements),
                })
                .sum(),
            rules: table.chains.iter().map(|c| c.rules.len()).sum(),
        }
    }

    /// Create the table, or replace it as a whole, with generation 1.
    fn apply_whole(
        &mut self,
        ruleset: &Ruleset,
        expected: &Ruleset,
        carried: &[SetUpdate],
        genid: u32,
        method: Method,
    ) -> Result<ApplyReport, Error> {
        let mut transaction = match method {
            Method::Create => batch::create_table(ruleset, Creation::Absent)?,
            _ => batch::replace_table(ruleset)?,
        };
        learned::add_carried(&mut transaction, ruleset, 1, carried)?;
        phases::mark("build");
        let echo = self.commit_echoed_at(transaction, genid)?;
        // Created onto no table (the transaction carried the id of the
        // reading that found none): the echo is the whole table.
        let echoed_whole = (method == Method::Create).then_some(genid);
        self.verify_whole(ruleset, expected, echo, echoed_whole, method)
    }

    /// Create the table without reading it first, in a transaction whose
    /// table message carries `NLM_F_EXCL` and no generation id: the kernel
    /// refuses the whole transaction if the table exists, and nothing else
    /// can be in it if it does not. Then verify as after a create. `None`
    /// if the kernel refused because the table exists (nothing changed).
    fn create_assumed_absent(
        &mut self,
        ruleset: &Ruleset,
        expected: &Ruleset,
        carried: &[SetUpdate],
    ) -> Result<Option<ApplyReport>, Error> {
        let mut transaction = batch::create_table(ruleset, Creation::Exclusive)?;
        learned::add_carried(&mut transaction, ruleset, 1, carried)?;
        phases::mark("build");
        let echo = match self.netlink.commit_echoed(transaction) {
            Ok(echo) => Some(echo),
            Err(Error::AcksLost) => None,
            Err(err) if err.kernel_errno() == Some(libc::EEXIST) => return Ok(None),
            Err(err) => return Err(err),
        };
        // The echo is the whole table, committed at the generation id its
        // `NFT_MSG_NEWGEN` names: composed from nothing, as after a create
        // onto a table read as absent at the id before.
        let echoed_whole = echo
            .as_ref()
            .and_then(Echo::generation_after)
            .map(previous_genid);
        self.verify_whole(ruleset, expected, echo, echoed_whole, Method::Create)
            .map(Some)
    }

    /// Verify a table created or replaced as a whole by one transaction:
    /// from its echo composed from nothing when `echoed_whole` is the ruleset
    /// generation id the transaction committed at (a create onto no table),
    /// else by reading the table.
    fn verify_whole(
        &mut self,
        ruleset: &Ruleset,
        expected: &Ruleset,
        echo: Option<Echo>,
        echoed_whole: Option<u32>,
        method: Method,
    ) -> Result<ApplyReport, Error> {
        let composed = match echoed_whole {
            Some(genid) => self.compose_and_compare(expected, genid, None, &[echo])?,
            None => None,
        };
        let (genid, table, differences) = match composed {
            Some(composed) => {
                self.verified_from = Some(VerifiedFrom::Echo);
                composed
            }
            None => {
                self.verified_from = Some(VerifiedFrom::Read);
                self.read_and_compare(expected, 1, &ruleset.digest, &compared_elements(expected))?
            }
        };
        if !differences.is_empty() {
            return Err(Error::Verify {
                differences,
                rollback:
                    "there is no earlier generation to go back to, so this one stays in force"
                        .into(),
            });
        }
        let report = Session::report(&table, expected, 1, method);
        let mut table = table;
        readback::mark_verified(&mut table, expected);
        self.known = Some(Snapshot {
            genid,
            table: Some(table),
        });
        Ok(report)
    }

    /// Stage generation `swap.to`, swap it in, verify, then delete what is
    /// left of the previous generation (or roll back to it).
    fn apply_swap(
        &mut self,
        ruleset: &Ruleset,
        expected: &Ruleset,
        carried: &[SetUpdate],
        snapshot: Snapshot,
        swap: Swap,
    ) -> Result<ApplyReport, Error> {
        let stage = batch::stage(ruleset, &swap)?;
        phases::mark("build stage");
        let stage_echo = self.commit_echoed_at(stage, snapshot.genid)?;
        // If the swap fails, the staged generation stays behind: nothing
        // jumps into it, so it changes no packet's fate, and the next apply's
        // cleanup deletes it. (Deleting it here could race with another
        // apply that staged a generation of the same number meanwhile.)
        let staged_at = next_genid(snapshot.genid);
        let (swapped_at, swap_echo) = self.swap_in(ruleset, &swap, carried, staged_at)?;
        // The elements of the sets changed in place are what they held,
        // changed as the kernel echoed, or (a larger change) read back:
        // never taken from the edit.
        let mut snapshot = snapshot;
        forget_edited(&mut snapshot, &swap);
        // Verified from the echo of stage and swap when nothing else
        // committed in between (the swap carried the id the stage left).
        let composed = if swapped_at == staged_at {
            self.compose_and_compare(
                expected,
                snapshot.genid,
                snapshot.table.as_ref(),
                &[stage_echo, swap_echo],
            )?
        } else {
            None
        };
        let (genid, table, differences) = match composed {
            Some(composed) => {
                self.verified_from = Some(VerifiedFrom::Echo);
                composed
            }
            None => {
                self.verified_from = Some(VerifiedFrom::Read);
                let digest = &ruleset.digest;
                self.read_after_swap(expected, &snapshot, &swap, digest, staged_at, swapped_at)?
            }
        };
        if !differences.is_empty() {
            let rollback = self.roll_back(ruleset, &swap, genid);
            return Err(Error::Verify {
                differences,
                rollback,
            });
        }
        let report = Session::report(
            &table,
            expected,
            swap.to,
            Method::Swap {
                from: swap.from,
                to: swap.to,
            },
        );
        let mut table = table;
        readback::mark_verified(&mut table, expected);
        phases::mark("report");
        self.known = self.clean_up(table, genid, swap.to);
        phases::mark("clean up");
        Ok(report)
    }

    /// Edit generation `edit.to` (`== edit.from`, an `Approach::Edit`) in
    /// place: one transaction that changes the elements of the sets in
    /// `edit.edit` and replaces each base chain's entry rule by one that
    /// jumps into the same generation and carries the digest of `ruleset`
    /// (see [`generation`]). Then verify, as after a swap (from the echo
    /// composed with the table before, or by reading); on a difference, undo
    /// the element changes and put the previous entry rules (the previous
    /// digest) back, in one transaction.
    fn apply_edit(
        &mut self,
        ruleset: &Ruleset,
        expected: &Ruleset,
        carried: &[SetUpdate],
        snapshot: Snapshot,
        edit: Swap,
    ) -> Result<ApplyReport, Error> {
        let mut transaction = batch::swap(ruleset, &edit)?;
        // Carried DNS elements go in with the edit, as with a swap.
        learned::add_carried(&mut transaction, ruleset, edit.to, carried)?;
        phases::mark("build edit");
        let echo = self.commit_echoed_at(transaction, snapshot.genid)?;
        // What the kernel made of the element changes is composed from its
        // echo or (a larger change) read back, never taken from the edit.
        let mut snapshot = snapshot;
        forget_edited(&mut snapshot, &edit);
        let composed =
            self.compose_and_compare(expected, snapshot.genid, snapshot.table.as_ref(), &[echo])?;
        let (genid, table, differences) = match composed {
            Some(composed) => {
                self.verified_from = Some(VerifiedFrom::Echo);
                composed
            }
            None => {
                self.verified_from = Some(VerifiedFrom::Read);
                let edited_at = snapshot.genid;
                let digest = &ruleset.digest;
                self.read_after_swap(expected, &snapshot, &edit, digest, edited_at, edited_at)?
            }
        };
        if !differences.is_empty() {
            let rollback = self.roll_back_edit(ruleset, &edit, genid);
            return Err(Error::Verify {
                differences,
                rollback,
            });
        }
        let report = Session::report(&table, expected, edit.to, Method::edit_of(&edit));
        let mut table = table;
        readback::mark_verified(&mut table, expected);
        // Nothing to clean up: the edit created nothing, and an edit is
        // only planned over a table without leftovers.
        self.known = Some(Snapshot {
            genid,
            table: Some(table),
        });
        Ok(report)
    }

    /// Undo the edit in place `edit` of generation `edit.to`, which put
    /// `ruleset`'s digest in force: give the edited sets their previous
    /// elements and the entry rules their previous digest back, in one
    /// transaction (the same generation-masked changes as the edit, in
    /// reverse). Returns what happened, for the verification error.
    fn roll_back_edit(&mut self, ruleset: &Ruleset, edit: &Swap, mut genid: u32) -> String {
        let previous = edit.from_digest.as_deref().unwrap_or("(no digest)");
        let mut outcome = Err(Error::Unstable { attempts: ATTEMPTS });
        for _ in 0..ATTEMPTS {
            outcome = batch::swap_back(edit, &Deletions::default())
                .and_then(|transaction| self.commit_at(transaction, genid));
            if !matches!(outcome, Err(Error::RulesetChanged)) {
                break;
            }
            // Something else committed: undo only while this edit is still
            // what is in force.
            let now = match readback::read_table(&mut self.netlink, Detail::Shape) {
                Ok(now) => now,
                Err(err) => {
                    outcome = Err(err);
                    break;
                }
            };
            let intact = now.table.as_ref().is_some_and(|table| {
                table.generation == Some(edit.to)
                    && table.digest.as_deref() == Some(ruleset.digest.as_str())
            });
            if !intact {
                self.known = None;
                return format!(
                    "another program changed the table meanwhile, so it is left as it is now \
                     (this apply had edited generation {} in place)",
                    edit.to
                );
            }
            genid = now.genid;
        }
        self.known = None;
        match outcome {
            Ok(()) => format!(
                "the previous policy ({previous}) was put back in force: generation {} got its \
                 previous set elements back",
                edit.to
            ),
            Err(err) => format!(
                "undoing the edit of generation {} failed too, so it stays in force as edited: {err}",
                edit.to
            ),
        }
    }

    /// Read the table after the swap to `swap.to` (when its echo cannot be
    /// used) and compare it with `expected`.
    fn read_after_swap(
        &mut self,
        expected: &Ruleset,
        snapshot: &Snapshot,
        swap: &Swap,
        digest: &str,
        staged_at: u32,
        swapped_at: u32,
    ) -> Result<(u32, KernelTable, Vec<Difference>), Error> {
        let mut plan = compared_elements(expected);
        // The sets kept from the previous generation hold what was read
        // before the stage (which carried that reading's generation id), and
        // neither the stage nor the swap changes them (the sets the swap
        // changed in place are not among them: their elements are not
        // known any more, see `apply_swap`). If nothing else
        // committed in between (the table is read at the id right after
        // the swap), that is what they still hold; otherwise they are read.
        if swapped_at == staged_at
            && let Some(before) = &snapshot.table
        {
            plan.known = before
                .sets
                .iter()
                .filter(|set| {
                    set.elements_read && swap.reuse.values().any(|k| *k == set.kernel_name)
                })
                .map(|set| (set.kernel_name.clone(), set.elements.clone()))
                .collect();
            plan.known_at = Some(next_genid(swapped_at));
        }
        self.read_and_compare(expected, swap.to, digest, &plan)
    }

    /// The swap transaction, retried while only other changes (e.g. DNS set
    /// updates) came between the stage and the swap: the generation in force
    /// is still `swap.from` and the staged one is complete. Returns the
    /// ruleset generation id the committed swap carried, and its echo.
    fn swap_in(
        &mut self,
        ruleset: &Ruleset,
        swap: &Swap,
        carried: &[SetUpdate],
        mut genid: u32,
    ) -> Result<(u32, Option<Echo>), Error> {
        for _ in 0..ATTEMPTS {
            let mut transaction = batch::swap(ruleset, swap)?;
            // Carried elements go into the (persistent) DNS sets with the
            // swap: hash set elements are generation-masked like rules, so
            // packets see them together with the new generation.
            learned::add_carried(&mut transaction, ruleset, swap.to, carried)?;
            phases::mark("build swap");
            match self.commit_echoed_at(transaction, genid) {
                Err(Error::RulesetChanged) => {}
                other => return other.map(|echo| (genid, echo)),
            }
            let now = readback::read_table(&mut self.netlink, Detail::Shape)?;
            // Still generation `from` with the policy planned from (not
            // edited in place since), and the staged generation complete.
            let intact = now.table.as_ref().is_some_and(|table| {
                table.generation == Some(swap.from)
                    && table.digest == swap.from_digest
                    && generation_is_there(
                        table,
                        ruleset,
                        swap.to,
                        Some(&generation::generation_comment(ruleset)),
                    )
            });
            if !intact {
                return Err(Error::RulesetChanged);
            }
            genid = now.genid;
        }
        Err(Error::Unstable { attempts: ATTEMPTS })
    }

    /// Delete every leftover of `table` (read right after the swap to
    /// `generation`). Returns what the session then knows of the table.
    /// A failure here changes no packet's fate (nothing reaches leftovers),
    /// so it is logged, and the next apply deletes them.
    fn clean_up(
        &mut self,
        mut table: KernelTable,
        mut genid: u32,
        generation: u32,
    ) -> Option<Snapshot> {
        for _ in 0..ATTEMPTS {
            let deletions = Deletions::leftovers(&table);
            let result = if deletions.is_empty() {
                Ok(())
            } else {
                batch::delete(&deletions).and_then(|tx| self.commit_at(tx, genid))
            };
            match result {
                Ok(()) => {
                    if !deletions.is_empty() {
                        genid = next_genid(genid);
                    }
                    table.leftover_chains.clear();
                    table.leftover_sets.clear();
                    return Some(Snapshot {
                        genid,
                        table: Some(table),
                    });
                }
                Err(Error::RulesetChanged) => {
                    match readback::read_table(&mut self.netlink, Detail::Shape) {
                        Ok(Snapshot {
                            genid: now,
                            table: Some(now_table),
                        }) if now_table.generation == Some(generation) => {
                            genid = now;
                            table = now_table;
                        }
                        _ => return None,
                    }
                }
                Err(err) => {
                    tracing::warn!(
                        "generation {generation} is in force, but what is left of earlier ones \
                         could not be deleted (the next apply deletes it): {err}"
                    );
                    return None;
                }
            }
        }
        None
    }

    /// Put generation `swap.from` back in force and delete generation
    /// `swap.to`. Returns what happened, for the verification error.
    fn roll_back(&mut self, ruleset: &Ruleset, swap: &Swap, mut genid: u32) -> String {
        let attempt = |session: &mut Session, genid: u32| -> Result<(), Error> {
            let mut genid = genid;
            // A policy that goes back to accept changes before the swap back:
            // the failed generation has policy drop and decides every packet.
            let loosen: Vec<_> = swap
                .previous
                .iter()
                .filter(|entry| swap.tighten.contains(&entry.chain))
                .cloned()
                .collect();
            if !loosen.is_empty() {
                session.commit_at(batch::policies(&loosen)?, genid)?;
                genid = next_genid(genid);
            }
            session.commit_at(batch::swap_back(swap, &staged(ruleset, swap))?, genid)
        };
        let mut outcome = Err(Error::Unstable { attempts: ATTEMPTS });
        for _ in 0..ATTEMPTS {
            outcome = attempt(self, genid);
            if !matches!(outcome, Err(Error::RulesetChanged)) {
                break;
            }
            // Something else committed: go back only while the failed
            // generation is still in force and the previous one is complete.
            let now = match readback::read_table(&mut self.netlink, Detail::Shape) {
                Ok(now) => now,
                Err(err) => {
                    outcome = Err(err);
                    break;
                }
            };
            // Still this apply's generation and policy (not edited in place
            // by another apply since), and the previous generation complete.
            let intact = now.table.as_ref().is_some_and(|table| {
                table.generation == Some(swap.to)
                    && table.digest.as_deref() == Some(ruleset.digest.as_str())
                    && generation_is_there(table, ruleset, swap.from, swap.from_comment.as_deref())
            });
            if !intact {
                self.known = None;
                return format!(
                    "another program changed the table meanwhile, so it is left as it is now \
                     (generation {} was put in force by this apply)",
                    swap.to
                );
            }
            genid = now.genid;
        }
        self.known = None;
        match outcome {
            Ok(()) => format!(
                "the previous policy (generation {}) was put back in force and generation {} deleted",
                swap.from, swap.to
            ),
            Err(err) => format!(
                "putting the previous policy (generation {}) back failed too, so generation {} stays \
                 in force: {err}",
                swap.from, swap.to
            ),
        }
    }

    /// Compare the table in force with `ruleset`, and have the kernel check
    /// the transactions that would put it in force, as one, without
    /// committing it. Nothing changes.
    pub fn plan(&mut self, ruleset: &Ruleset) -> Result<Plan, Error> {
        let ruleset = &*generation::entry_form(ruleset);
        for _ in 0..ATTEMPTS {
            let snapshot = readback::read_table(&mut self.netlink, Detail::Full)?;
            let table = snapshot.table.as_ref();
            let differences = match table {
                Some(table) => readback::differences(ruleset, table)?,
                None => Vec::new(),
            };
            let (mut transaction, method) = match generation::approach(ruleset, table)? {
                Approach::Create => (
                    batch::create_table(ruleset, Creation::Absent)?,
                    Method::Create,
                ),
                Approach::Replace { reason } => {
                    (batch::replace_table(ruleset)?, Method::Replace { reason })
                }
                Approach::Edit(edit) => (batch::swap(ruleset, &edit)?, Method::edit_of(&edit)),
                Approach::Swap(swap) => {
                    let table = table.expect("a swap is only planned over a table");
                    let deletions = Deletions::after_swap(table, ruleset, &swap);
                    (
                        batch::swap_check(ruleset, &swap, &deletions)?,
                        Method::Swap {
                            from: swap.from,
                            to: swap.to,
                        },
                    )
                }
            };
            transaction.expect_generation(snapshot.genid);
            match self.netlink.check(transaction) {
                Err(Error::RulesetChanged) => continue,
                Err(err) => return Err(err),
                Ok(()) => {}
            }
            return Ok(Plan {
                current: table.map(TableStatus::of),
                differences,
                method,
            });
        }
        Err(Error::Unstable { attempts: ATTEMPTS })
    }

    /// Delete the `inet netleash` table. Returns whether it existed.
    pub fn remove(&mut self) -> Result<bool, Error> {
        self.known = None;
        if readback::read_table(&mut self.netlink, Detail::Shape)?
            .table
            .is_none()
        {
            return Ok(false);
        }
        match self.netlink.commit(batch::delete_table()) {
            Ok(()) => Ok(true),
            // Removed by someone else since we looked: absent is not an error.
            Err(err) if err.kernel_errno() == Some(libc::ENOENT) => Ok(false),
            Err(err) => Err(err),
        }
    }

    /// The table as the kernel holds it, or `None` if there is none.
    pub fn status(&mut self) -> Result<Option<TableStatus>, Error> {
        Ok(readback::read_table(&mut self.netlink, Detail::Full)?
            .table
            .as_ref()
            .map(TableStatus::of))
    }

    /// Apply element changes to named sets of the policy in force (by model
    /// name), in one transaction (all or nothing), without touching rules or
    /// other sets.
    pub fn update_elements(&mut self, updates: &[SetUpdate]) -> Result<(), Error> {
        self.known = None;
        elements::update(&mut self.netlink, updates)
    }

    /// Close the session without waiting for the kernel.
    ///
    /// Closing a netfilter socket shortly after a commit in its namespace
    /// waits until the kernel has freed what the commit replaced: nf_tables'
    /// NETLINK_URELEASE handler takes the namespace's commit mutex and flushes
    /// the pending destroy work, one RCU grace period (about 10 ms here).
    /// Nothing here depends on that wait, so another thread does it
    /// ([`netns::drop_in_background`]).
    pub fn close_in_background(self) {
        netns::drop_in_background(self);
    }
}

/// The kernel names of the regular chains of `ruleset`'s generation
/// `generation`, in the order to delete them. (The chains of the previous
/// generation have the same model names: every compiled ruleset has the same
/// chains.)
fn staged_chains(ruleset: &Ruleset, generation: u32) -> Vec<String> {
    let naming = generation::Naming::new(ruleset, generation);
    ruleset
        .chains
        .iter()
        .rev()
        .filter(|c| c.base.is_none())
        .map(|c| naming.chain(&c.name))
        .collect()
}

/// Whether every regular chain of generation `generation` is among the
/// leftovers of `table`, each with `comment` as its comment (what it was
/// staged with, `generation::generation_comment`: its shape and the policy
/// it was staged for; or what an earlier netleash wrote there). Generation
/// numbers alone do not identify a generation: two concurrent applies can
/// stage the same number one after the other, after a third deleted the
/// first one's as a leftover, and the shape alone does not tell apart two
/// policies that differ in elements.
fn generation_is_there(
    table: &KernelTable,
    ruleset: &Ruleset,
    generation: u32,
    comment: Option<&str>,
) -> bool {
    staged_chains(ruleset, generation).iter().all(|name| {
        table
            .leftover_chains
            .iter()
            .any(|c| c.kernel_name == *name && c.comment.as_deref() == comment)
    })
}

/// The objects an apply of `swap` staged: generation `swap.to` of `ruleset`
/// and the persistent sets it created, in the order to delete them.
fn staged(ruleset: &Ruleset, swap: &Swap) -> Deletions {
    let naming = generation::Naming::of_swap(ruleset, swap);
    Deletions {
        chains: staged_chains(ruleset, swap.to),
        // Not the sets kept from the previous generation: it still uses them.
        sets: ruleset
            .sets
            .iter()
            .filter(|s| !naming.reused(&s.name))
            .filter(|s| !generation::persistent_set(s) || swap.create.contains(&s.name))
            .map(|s| naming.set(&s.name))
            .collect(),
    }
}

/// The elements a reading for `ruleset` needs: those of every set in force
/// but the DNS-derived ones, whose elements are learned at run time and not
/// compared (see [`readback::differences`]). An apply without memory of the
/// table reads them before the stage too, for every static set whatever its
/// size: a set read costs a dump, and one kept or changed in place saves
/// the kernel an insertion per element it keeps (measured with the apply
/// benchmark, two policies two entries apart, release profile: a one-shot
/// apply took 5.2 ms instead of 5.5–5.7 at 1,005 elements, and 37–38 ms
/// instead of 40 at 10,005, than when it created the large sets again).
fn compared_elements(ruleset: &Ruleset) -> ElementPlan {
    ElementPlan {
        read: true,
        skip: ruleset
            .sets
            .iter()
            .filter(|set| generation::persistent_set(set))
            .map(|set| set.name.clone())
            .collect(),
        ..ElementPlan::default()
    }
}

/// Run `work` in a session of its own in `target`: the calling thread
/// enters the namespace, opens the socket, does the work and goes back (a
/// [`netns::visit_then_drop`]); the socket is closed on another thread
/// without the caller waiting (see [`Session::close_in_background`] for why
/// closing can take milliseconds).
fn in_own_session<T>(
    target: &netns::Target,
    work: impl FnOnce(&mut Session) -> Result<T, Error>,
) -> Result<T, Error> {
    netns::visit_then_drop(target, move || match Session::open_here() {
        Ok(mut session) => {
            let result = work(&mut session);
            (result, Some(session))
        }
        Err(err) => (Err(err), None),
    })?
}

/// Put `ruleset` in force in `target`: [`Session::apply`] in a session of
/// its own, which plans from what the previous verified apply in that
/// namespace left (see [`last_apply`]) instead of reading the table, and
/// leaves what it verified for the next.
///
/// The file is written on a thread of its own ([`last_apply::Pending::write_in_background`],
/// apart from the one that closes sockets, whose closes can wait for the
/// kernel): the caller does not wait for it, and a process that exits right
/// after (`netleash apply`) waits for it at exit (see [`last_apply::Pending`]). Measured in the apply benchmark's one-shot
/// applies (pause before each, fast bench build): the write takes about
/// 0.09 ms for a typical policy (a 2.7 KiB file on tmpfs: encoding,
/// checksum, create, rename), 0.25 ms at 1,005 elements and 1.6 ms at
/// 10,005, which before the answer would add 7 % to a typical one-shot
/// apply (about 1.2 ms); after it, the caller does not wait, and the
/// `netleash apply` process exits as late as if it had written first.
pub fn apply(target: &netns::Target, ruleset: &Ruleset) -> Result<ApplyReport, Error> {
    phases::begin();
    let applied = netns::visit_then_drop(target, || {
        phases::mark("enter namespace");
        let mut session = match Session::open_here() {
            Ok(session) => session,
            Err(err) => return (Err(err), None),
        };
        phases::mark("open socket");
        let store = last_apply::Store::configured();
        let identity = last_apply::Identity::of_socket(session.netlink.socket_fd())
            .inspect_err(|err| tracing::debug!("the table is read, not recalled: {err}"))
            .ok();
        let mut existed = false;
        if let Some(identity) = &identity {
            // A file an earlier apply of this process is still writing (a
            // fraction of a millisecond, on its own thread) is waited for,
            // so that back-to-back applies find it; never for long.
            last_apply::wait_for_writes(std::time::Duration::from_millis(100));
            match store.recall(identity) {
                Ok(recalled) => {
                    existed = recalled.is_some();
                    session.recalled = existed;
                    // No file: no verified apply has been here (or its
                    // file is gone), so most likely there is no table.
                    session.assume_absent = !existed;
                    session.known = recalled;
                }
                Err(err) => tracing::debug!("the table is read, not recalled: {err}"),
            }
        }
        phases::mark("recall last apply");
        // Not `Session::apply`: that would start the phase clock again.
        let mut result = session.apply_verified(ruleset, ruleset, &[]);
        // A remembered table that the kernel's generation id check let
        // through, yet a transaction planned from it was rejected or what
        // it committed failed verification: the file was false (see
        // `last_apply`). The policy in force is the previous one (a
        // rejected transaction changes nothing; a failed verification was
        // rolled back), so apply again from a reading, as without a file.
        if session.planned_from == Some(TableKnown::LastApply)
            && matches!(result, Err(Error::Rejected { .. } | Error::Verify { .. }))
            && let Err(err) = &result
        {
            tracing::debug!(
                "an apply planned from the namespace's last apply file failed ({err}); \
                 applying again from a reading of the table"
            );
            session.known = None;
            result = session.apply_verified(ruleset, ruleset, &[]);
        }
        let keep = match &result {
            Ok(report) => {
                tracing::debug!(
                    "table inet {TABLE_NAME} was {} before the apply",
                    match report.table_known {
                        TableKnown::LastApply => "recalled from the last apply's file",
                        TableKnown::Session => "remembered by the session",
                        TableKnown::Read => "read from the kernel",
                        TableKnown::AssumedAbsent => {
                            "assumed absent (no last apply file; the kernel's exclusive create \
                             confirmed it)"
                        }
                    }
                );
                session.known.take().map(|known| (known, !existed))
            }
            Err(_) => None,
        };
        if let Some(identity) = identity {
            last_apply::Pending::new(store, identity, keep).write_in_background();
            phases::mark("hand the last apply file over");
        }
        (result, Some(session))
    });
    phases::mark("leave namespace");
    phases::end();
    applied?
}

/// [`Session::plan`] in a session of its own (`apply --dry-run`).
pub fn plan(target: &netns::Target, ruleset: &Ruleset) -> Result<Plan, Error> {
    in_own_session(target, |session| session.plan(ruleset))
}

/// Delete the `inet netleash` table in `target`, and the file the last
/// apply there left (see [`last_apply`]). Returns whether the table existed.
pub fn remove(target: &netns::Target) -> Result<bool, Error> {
    in_own_session(target, |session| {
        // Before the table: a file left behind would only be refused by the
        // kernel (the removal moves the generation id on), but it is garbage.
        // After this process's own pending writes: a file an apply of this
        // process is still writing would land after the removal.
        match last_apply::Identity::of_socket(session.netlink.socket_fd()) {
            Ok(identity) => {
                last_apply::wait_for_writes(std::time::Duration::from_millis(100));
                last_apply::Store::configured().forget(&identity);
            }
            Err(err) => tracing::debug!("cannot tell which last apply file to remove: {err}"),
        }
        session.remove()
    })
}

/// The table in `target` as the kernel holds it, or `None` if there is none.
pub fn status(target: &netns::Target) -> Result<Option<TableStatus>, Error> {
    in_own_session(target, Session::status)
}

/// [`Session::update_elements`] in a session of its own.
pub fn update_elements(target: &netns::Target, updates: &[SetUpdate]) -> Result<(), Error> {
    in_own_session(target, |session| session.update_elements(updates))
}

/// Against the real kernel, in a network namespace of their own: what the
/// public API cannot reach (a verification that fails on purpose, a
/// transaction with a stale generation id). They need root and FAIL without it.
#[cfg(test)]
mod tests {
    use std::process::Command;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::policy::{CompileOptions, Dialect, HostRule, Mode, Policy, Ports, Source, Target};
    use crate::ruleset::SetRole;

    static COUNTER: AtomicUsize = AtomicUsize::new(0);

    /// A network namespace for one test, deleted on drop.
    struct Netns(String);

    impl Netns {
        fn new(tag: &str) -> Netns {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let euid = unsafe { libc::geteuid() };
            assert_eq!(
                euid, 0,
                "these kernel tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); CI runs as root"
            );
            let name = format!(
                "nlu-{tag}-{}-{}",
                std::process::id(),
                COUNTER.fetch_add(1, Ordering::SeqCst)
            );
            let status = Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("run ip");
            assert!(status.success(), "ip netns add {name} failed");
            Netns(name)
        }

        fn target(&self) -> netns::Target {
            netns::Target::Name(self.0.clone())
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// An address learned into `dns_v4`, as the DNS layer writes it: a
    /// commit that changes no policy.
    fn learned_dns_v4() -> SetUpdate {
        SetUpdate {
            set: "dns_v4".into(),
            change: SetChange::Add {
                elements: vec![crate::ruleset::Element::Addr(
                    "192.0.2.7/32".parse().unwrap(),
                )],
                timeout: None,
            },
        }
    }

    fn compile(mode: Mode, nets: &[&str]) -> Ruleset {
        let entries: Vec<(String, Ports)> = nets
            .iter()
            .map(|net| (net.to_string(), Ports::Any))
            .collect();
        compile_entries(mode, &entries)
    }

    /// A policy that allows `entries` (a net and its ports each).
    fn compile_entries(mode: Mode, entries: &[(String, Ports)]) -> Ruleset {
        let rules = entries
            .iter()
            .map(|(net, ports)| HostRule {
                target: Target::Net(net.parse().unwrap()),
                ports: ports.clone(),
                sources: [Source::AllowedHosts].into(),
                entry: net.clone(),
            })
            .collect();
        let policy = Policy {
            mode,
            dialect: Dialect::Limited,
            rules,
            blocklist: vec![crate::policy::BlockEntry {
                net: "169.254.0.0/16".parse().unwrap(),
                reason: "link-local".into(),
            }],
            warnings: vec![],
        };
        crate::ruleset::compile(&policy, &CompileOptions::default())
    }

    /// The kernel names of every set and chain of the table.
    fn kernel_names(session: &mut Session) -> Vec<String> {
        let table = readback::read_table(&mut session.netlink, Detail::Shape)
            .unwrap()
            .table
            .unwrap();
        let sets = table.sets.iter().chain(&table.leftover_sets);
        let chains = table.chains.iter().chain(&table.leftover_chains);
        sets.map(|s| s.kernel_name.clone())
            .chain(chains.map(|c| c.kernel_name.clone()))
            .collect()
    }

    /// The differences and the rollback text of a verification error.
    fn verify_error(err: Error) -> (Vec<Difference>, String) {
        match err {
            Error::Verify {
                differences,
                rollback,
            } => {
                assert!(!differences.is_empty());
                (differences, rollback)
            }
            other => panic!("expected a verification error, got {other}"),
        }
    }

    fn rollback_text(err: Error) -> String {
        verify_error(err).1
    }

    #[test]
    fn a_failed_verification_puts_the_previous_generation_back() {
        let ns = Netns::new("rollback");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        // It allows IPv6 too: another rule, so a generation swap (policies
        // that differ in elements alone are an edit in place).
        let b = compile(Mode::Limited, &["203.0.113.0/24", "2001:db8::/32"]);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        session.update_elements(&[learned_dns_v4()]).unwrap();

        // Generation 2 holds `b`, but is verified against `a`: it must not stay.
        let dumps = session.netlink.element_dumps;
        let err = session.apply_verified(&b, &a, &[]).unwrap_err();
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        // The new allow set's echoed elements are not `a`'s, so it was dumped
        // and the dump decided (see `compose_and_compare`).
        assert!(
            session.netlink.element_dumps > dumps,
            "a new set whose echo differs from the model was not dumped"
        );
        let rollback = rollback_text(err);
        assert!(
            rollback.contains("generation 1) was put back in force and generation 2 deleted"),
            "{rollback}"
        );
        let status = session.status().unwrap().unwrap();
        assert_eq!(status.generation, Some(1));
        assert_eq!(status.digest.as_deref(), Some(a.digest.as_str()));
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        let dns = status.sets.iter().find(|s| s.name == "dns_v4").unwrap();
        assert_eq!(dns.elements, 1, "the learned address survives the rollback");
        let names = kernel_names(&mut session);
        assert!(
            names.iter().all(|n| !n.ends_with(".g2")),
            "generation 2 is deleted: {names:?}"
        );
        // The policy in force is exactly `a` again, and the next apply swaps from it.
        assert_in_force(&mut session, &a);
        let report = session.apply(&b).unwrap();
        assert_eq!(report.method, Method::Swap { from: 1, to: 2 });
        session.close_in_background();
    }

    /// What the session composed from the kernel's echo after its last
    /// apply is what a full dump of the table reads: the same chains with
    /// the same rules (handles, expressions, references), the same sets
    /// with the same definitions and (for the compared sets) elements.
    fn assert_echo_matches_dump(session: &mut Session) {
        let known = session.known.clone().expect("the session knows the table");
        let composed = known.table.unwrap();
        let snapshot = readback::read_table(&mut session.netlink, Detail::Full).unwrap();
        assert_eq!(snapshot.genid, known.genid, "no commit since the apply");
        let read = snapshot.table.unwrap();
        assert_eq!(composed.digest, read.digest);
        assert_eq!(composed.generation, read.generation);
        assert_eq!(composed.chains, read.chains);
        assert!(read.leftover_chains.is_empty() && read.leftover_sets.is_empty());
        assert_eq!(composed.sets.len(), read.sets.len());
        for set in &composed.sets {
            let twin = read.sets.iter().find(|r| r.kernel_name == set.kernel_name);
            let twin = twin.unwrap_or_else(|| panic!("{} is not in the dump", set.kernel_name));
            assert_eq!(
                (set.flags, set.key_type, set.key_len),
                (twin.flags, twin.key_type, twin.key_len)
            );
            if set.elements_read {
                let mut composed = set.elements.clone();
                let mut read = twin.elements.clone();
                composed.sort();
                read.sort();
                assert_eq!(composed, read, "elements of {}", set.kernel_name);
            }
        }
    }

    #[test]
    fn creation_and_swaps_are_verified_from_the_kernels_echo() {
        let ns = Netns::new("echo");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        let b = compile(Mode::Limited, &["203.0.113.0/24", "2001:db8::/32"]);
        let open = compile(Mode::Unrestricted, &[]);
        let mut session = Session::open(&ns.target()).unwrap();
        let report = session.apply(&a).unwrap();
        assert_eq!(report.method, Method::Create);
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        // The new sets are small: their elements were echoed, not dumped.
        assert!(
            a.sets
                .iter()
                .any(|s| s.role != SetRole::DnsAllow && !s.elements.is_empty())
        );
        assert_eq!(
            session.netlink.element_dumps, 0,
            "a new small set was dumped"
        );
        assert_echo_matches_dump(&mut session);
        // Swaps with a remembered table, a base chain policy loosened, then tightened.
        for (model, to) in [(&b, 2), (&open, 3), (&a, 4)] {
            let report = session.apply(model).unwrap();
            assert_eq!(report.method, Method::Swap { from: to - 1, to });
            assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
            assert_echo_matches_dump(&mut session);
            assert_in_force(&mut session, model);
        }
        // A one-shot apply reads the table first, then verifies from the echo too.
        let mut other = Session::open(&ns.target()).unwrap();
        other.apply(&b).unwrap();
        assert_eq!(other.verified_from, Some(VerifiedFrom::Echo));
        assert_echo_matches_dump(&mut other);
        other.close_in_background();
        session.close_in_background();
    }

    #[test]
    fn sets_changed_in_a_few_elements_are_verified_from_the_echo_of_each_element() {
        let ns = Netns::new("echoedit");
        // `b` moves one address and one range (start and end element) of
        // allow_v4: an edit in place of generation 1.
        let a = compile(
            Mode::Limited,
            &["192.0.2.1/32", "10.2.0.0/30", "198.51.100.0/24"],
        );
        let b = compile(
            Mode::Limited,
            &["192.0.2.2/32", "10.2.0.8/30", "198.51.100.0/24"],
        );
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        for (model, removed) in [(&b, 2), (&a, 2)] {
            let dumps = session.netlink.element_dumps;
            let report = session.apply(model).unwrap();
            assert_eq!(
                report.method,
                Method::Edit {
                    generation: 1,
                    added: 2,
                    removed
                }
            );
            assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
            assert_eq!(
                session.netlink.element_dumps, dumps,
                "a set changed in a few elements was dumped"
            );
            assert_echo_matches_dump(&mut session);
            assert_in_force(&mut session, model);
        }
        // The same in a swap (another rule too): the sets of `large` that
        // change in one element are kept and changed in place.
        let report = session.apply(&large(0, false)).unwrap();
        assert_eq!(report.method, Method::Swap { from: 1, to: 2 });
        let moved = with_other_rule(large(1, false));
        let dumps = session.netlink.element_dumps;
        let report = session.apply(&moved).unwrap();
        assert_eq!(report.method, Method::Swap { from: 2, to: 3 });
        assert_eq!(kernel_set(&mut session, "allow_v4"), "allow_v4.g2");
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        assert_eq!(
            session.netlink.element_dumps, dumps,
            "a set changed in place in a swap was dumped"
        );
        assert_echo_matches_dump(&mut session);
        assert_in_force(&mut session, &moved);
        // A change of more elements than are echoed (70: 30 out, 40 in, of
        // 150) is read back, and what the session then knows is what a dump
        // reads.
        let nets = |range: std::ops::Range<u32>| -> Vec<String> {
            // Apart, so that none merge into a larger prefix.
            range
                .map(|i| format!("10.{}.{}.0/24", 100 + i / 100, (i % 100) * 2))
                .collect()
        };
        let wide = nets(0..150);
        let wide = compile(
            Mode::Limited,
            &wide.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let narrower = nets(30..190);
        let narrower = compile(
            Mode::Limited,
            &narrower.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let mut fresh = Session::open(&ns.target()).unwrap();
        fresh.apply(&wide).unwrap();
        let dumps = fresh.netlink.element_dumps;
        let report = fresh.apply(&narrower).unwrap();
        assert_eq!(
            report.method,
            Method::Edit {
                generation: 4,
                added: 40,
                removed: 30
            }
        );
        assert!(
            fresh.netlink.element_dumps > dumps,
            "a change of 70 elements was taken from the echo"
        );
        assert_echo_matches_dump(&mut fresh);
        assert_in_force(&mut fresh, &narrower);
        fresh.close_in_background();
        session.close_in_background();
    }

    #[test]
    fn an_extra_chain_in_the_echo_fails_verification_and_rolls_back() {
        let ns = Netns::new("echoextra");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        let b = compile(Mode::Limited, &["203.0.113.0/24"]);
        // What the kernel gets: `b`, with a chain the model does not have,
        // jumped into first thing from `egress`.
        let mut extra = b.clone();
        extra.chains.insert(
            0,
            crate::ruleset::Chain {
                name: "extra".into(),
                base: None,
                rules: vec![crate::ruleset::Rule {
                    id: "extra-accept".into(),
                    description: "accepts everything".into(),
                    matches: vec![],
                    actions: vec![crate::ruleset::Action::Accept],
                }],
            },
        );
        let egress = extra
            .chains
            .iter_mut()
            .find(|c| c.name == "egress")
            .unwrap();
        egress.rules.insert(
            0,
            crate::ruleset::Rule {
                id: "to-extra".into(),
                description: "jumps into extra".into(),
                matches: vec![],
                actions: vec![crate::ruleset::Action::Jump("extra".into())],
            },
        );
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        let err = session.apply_verified(&extra, &b, &[]).unwrap_err();
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        let (differences, rollback) = verify_error(err);
        assert!(
            differences.contains(&Difference::ExtraChain("extra".into())),
            "{differences:?}"
        );
        assert!(
            differences
                .iter()
                .any(|d| matches!(d, Difference::Rules { chain, .. } if chain == "egress")),
            "{differences:?}"
        );
        assert!(rollback.contains("was put back"), "{rollback}");
        assert_in_force(&mut session, &a);
        session.close_in_background();
    }

    /// The policy in force is exactly `model`, as read back in full.
    fn assert_in_force(session: &mut Session, model: &Ruleset) {
        let table = readback::read_table(&mut session.netlink, Detail::Full)
            .unwrap()
            .table
            .unwrap();
        assert_eq!(readback::differences(model, &table).unwrap(), vec![]);
    }

    /// The kernel name of the set in force with model name `set`.
    fn kernel_set(session: &mut Session, set: &str) -> String {
        let table = readback::read_table(&mut session.netlink, Detail::Shape)
            .unwrap()
            .table
            .unwrap();
        let found: Vec<&readback::KernelSet> =
            table.sets.iter().filter(|s| s.name == set).collect();
        assert_eq!(found.len(), 1, "{:?}", table.sets);
        found[0].kernel_name.clone()
    }

    #[test]
    fn an_unchanged_set_is_kept_and_a_changed_one_created_again() {
        let ns = Netns::new("reuse");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        // It allows IPv6 too: another rule, so a generation swap (policies
        // that differ in elements alone are an edit in place).
        let b = compile(Mode::Limited, &["203.0.113.0/24", "2001:db8::/32"]);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        let report = session.apply(&b).unwrap();
        assert_eq!(report.method, Method::Swap { from: 1, to: 2 });
        assert_eq!(kernel_set(&mut session, "allow_v4"), "allow_v4.g2");
        assert_eq!(kernel_set(&mut session, "blocklist_v4"), "blocklist_v4.g1");
        // A one-shot apply (no memory) reads the elements and keeps it too.
        let report = apply(&ns.target(), &a).unwrap();
        assert_eq!(report.method, Method::Swap { from: 2, to: 3 });
        assert_eq!(kernel_set(&mut session, "allow_v4"), "allow_v4.g3");
        assert_eq!(kernel_set(&mut session, "blocklist_v4"), "blocklist_v4.g1");
        let status = session.status().unwrap().unwrap();
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        assert_in_force(&mut session, &a);
        session.close_in_background();
    }

    #[test]
    fn verification_compares_the_sets_kept_from_the_previous_generation() {
        let ns = Netns::new("reusecheck");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        let b = compile(Mode::Limited, &["203.0.113.0/24"]);
        // What `b` would be with another blocklist: the kernel keeps `a`'s
        // blocklist set for `b`, which must not pass for this one.
        let mut other_blocklist = b.clone();
        other_blocklist
            .sets
            .iter_mut()
            .find(|s| s.name == "blocklist_v4")
            .unwrap()
            .elements = vec![crate::ruleset::Element::Addr(
            "192.0.2.0/24".parse().unwrap(),
        )];
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        let err = session
            .apply_verified(&b, &other_blocklist, &[])
            .unwrap_err();
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        let (differences, rollback) = verify_error(err);
        assert!(
            differences
                .iter()
                .any(|d| matches!(d, Difference::SetElements { set, .. } if set == "blocklist_v4")),
            "{differences:?}"
        );
        assert!(rollback.contains("was put back"), "{rollback}");
        // The rollback deleted what it created, not the set generation 1 still uses.
        let status = session.status().unwrap().unwrap();
        assert_eq!(status.generation, Some(1));
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        assert_in_force(&mut session, &a);
        session.close_in_background();
    }

    /// A limited policy with large static sets of each backend: single
    /// IPv4 and IPv6 addresses and IPv4 ranges on any port, and IPv4 ranges
    /// on tcp/443 (interval sets, rbtree), and the same ranges on tcp/443
    /// in a concatenated interval set (pipapo, [`with_concatenated_twin`]).
    /// `large(0, false)` is the base. `moved` replaces that many of
    /// its single addresses of each family by others. `added` adds a range
    /// on tcp/443 and one that touches two ranges of the base (it merges
    /// with the one below into a /29 and ends where the one above starts).
    fn large(moved: u32, added: bool) -> Ruleset {
        large_of(30, moved, added)
    }

    /// [`large`] with `count` (at least 2) single addresses of each family
    /// and ranges on tcp/443.
    fn large_of(count: u32, moved: u32, added: bool) -> Ruleset {
        let https = Ports::only([(crate::policy::Proto::Tcp, 443)]);
        let mut entries: Vec<(String, Ports)> = Vec::new();
        for i in 0..count {
            let (v4, v6) = if i < moved {
                (9, "2001:db8:9")
            } else {
                (1, "2001:db8:1")
            };
            entries.push((
                format!("10.{v4}.{}.{}/32", i / 100, (i % 100) * 2),
                Ports::Any,
            ));
            entries.push((format!("{v6}::{:x}/128", i * 2), Ports::Any));
            entries.push((format!("11.{}.{}.0/30", i / 200, i % 200), https.clone()));
        }
        entries.push(("10.2.0.0/30".into(), Ports::Any));
        entries.push(("10.2.0.8/30".into(), Ports::Any));
        if added {
            entries.push(("10.2.0.4/30".into(), Ports::Any));
            entries.push(("11.9.0.0/30".into(), https.clone()));
        }
        with_concatenated_twin(compile_entries(Mode::Limited, &entries))
    }

    /// The concatenated interval set of [`with_concatenated_twin`].
    const CONCATENATED: &str = "concatenated_v4";

    /// `model` with a concatenated interval set (`address . protocol .
    /// port`, pipapo in the kernel) that holds the ranges of
    /// `allow_v4_tcp_443` on tcp/443, and an allow rule that looks it up.
    /// The compiler gives ranges on a port an address set of their own (an
    /// rbtree), but the kernel module still applies, edits and verifies any
    /// model, and a pipapo set is edited by its own rule
    /// (`generation::kept_in_swap`).
    fn with_concatenated_twin(mut model: Ruleset) -> Ruleset {
        use crate::ruleset::{Action, Element, Family, Match, Rule, Set, SetKey, SetRole};
        let elements = model
            .set("allow_v4_tcp_443")
            .unwrap()
            .elements
            .iter()
            .map(|e| Element::AddrProtoPort(e.net(), crate::policy::Proto::Tcp, 443))
            .collect();
        model.sets.push(Set {
            name: CONCATENATED.into(),
            key: SetKey::AddrProtoPort(Family::V4),
            role: SetRole::StaticAllow,
            interval: true,
            timeout: false,
            elements,
        });
        let egress = model
            .chains
            .iter_mut()
            .find(|c| c.name == "egress")
            .unwrap();
        let default_deny = egress.rules.len() - 1;
        egress.rules.insert(
            default_deny,
            Rule {
                id: "allow-concatenated-v4".into(),
                description: "IPv4 ranges on tcp/443, in a concatenated interval set".into(),
                matches: vec![Match::DaddrProtoPortInSet {
                    family: Family::V4,
                    set: CONCATENATED.into(),
                }],
                actions: vec![Action::Counter, Action::Accept],
            },
        );
        model
    }

    /// `model` with a rule that differs from [`with_concatenated_twin`]'s: its
    /// lookup in the concatenated set counts no packets. Two policies that
    /// differ in a rule (as well as in elements) are a generation swap, not
    /// an edit in place of the generation in force.
    fn with_other_rule(mut model: Ruleset) -> Ruleset {
        let rule = model
            .chains
            .iter_mut()
            .flat_map(|c| c.rules.iter_mut())
            .find(|r| r.id == "allow-concatenated-v4")
            .unwrap();
        rule.actions
            .retain(|a| *a != crate::ruleset::Action::Counter);
        model
    }

    /// The model names of the sets `large` changes, each with at least 30 elements.
    const LARGE_SETS: [&str; 4] = ["allow_v4", "allow_v6", "allow_v4_tcp_443", CONCATENATED];

    /// Each large set of `a` holds at least `at_least` elements, and `b`'s
    /// differs from it.
    fn assert_large_sets_differ(a: &Ruleset, b: &Ruleset, at_least: usize) {
        for set in LARGE_SETS {
            let (was, will) = (a.set(set).unwrap(), b.set(set).unwrap());
            assert!(
                was.elements.len() >= at_least && was.elements != will.elements,
                "{set}"
            );
        }
    }

    /// After applies that changed the sets in place: the allowlists (the
    /// one on tcp/443 too) and the blocklist are still generation 1's
    /// kernel sets, the concatenated one is generation `ports`'s (created
    /// again whenever it lost an element), they hold `model`'s elements
    /// (read back in full), and nothing is left behind.
    fn assert_changed_in_place(session: &mut Session, model: &Ruleset, ports: u32) {
        for set in ["allow_v4", "allow_v6", "allow_v4_tcp_443", "blocklist_v4"] {
            assert_eq!(kernel_set(session, set), format!("{set}.g1"));
        }
        assert_eq!(
            kernel_set(session, CONCATENATED),
            format!("{CONCATENATED}.g{ports}")
        );
        assert_in_force(session, model);
        let status = session.status().unwrap().unwrap();
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
    }

    /// `err` is the failed verification of an apply from generation 1 (`a`)
    /// to 2, which changed the large sets in place: generation 1 is back in
    /// force with its own kernel sets and elements, and generation 2 is gone.
    fn assert_rolled_back_to(session: &mut Session, err: Error, a: &Ruleset) {
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        let (differences, rollback) = verify_error(err);
        for set in LARGE_SETS {
            assert!(
                differences
                    .iter()
                    .any(|d| matches!(d, Difference::SetElements { set: s, .. } if s == set)),
                "{set}: {differences:?}"
            );
        }
        assert!(
            rollback.contains("generation 1) was put back in force and generation 2 deleted"),
            "{rollback}"
        );
        let status = session.status().unwrap().unwrap();
        assert_eq!(status.generation, Some(1));
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        for set in LARGE_SETS {
            assert_eq!(kernel_set(session, set), format!("{set}.g1"));
        }
        // Every element of `a` is back, and none that `a` lacks.
        assert_in_force(session, a);
    }

    #[test]
    fn a_set_changed_in_a_few_elements_is_changed_in_place() {
        let ns = Netns::new("inplace");
        let (a, b) = (large(0, false), with_other_rule(large(1, true)));
        assert_large_sets_differ(&a, &b, 30);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        // The kernel generation of the concatenated set after each swap: a
        // concatenated interval set is changed in place only when it loses
        // no element (see `generation::kept_in_swap`).
        for (model, to, ports) in [(&b, 2, 1), (&a, 3, 3), (&b, 4, 3)] {
            let report = session.apply(model).unwrap();
            assert_eq!(report.method, Method::Swap { from: to - 1, to });
            assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
            assert_echo_matches_dump(&mut session);
            assert_changed_in_place(&mut session, model, ports);
        }
        // A one-shot apply knows no verified elements, and decides from the
        // elements it reads: the same edits, and the concatenated interval
        // set, which loses an element, is created again.
        apply(&ns.target(), &a).unwrap();
        assert_changed_in_place(&mut session, &a, 5);
        session.close_in_background();
    }

    /// A chain's kernel name, its rules' handles and their counters (packets, bytes).
    type ChainRules = (String, Vec<u64>, Vec<(u64, u64)>);

    /// The rules of the generation chains in force, by chain.
    fn generation_rules(session: &mut Session) -> Vec<ChainRules> {
        let table = readback::read_table(&mut session.netlink, Detail::Shape)
            .unwrap()
            .table
            .unwrap();
        table
            .chains
            .iter()
            .filter(|c| c.hook.is_none())
            .map(|c| {
                let handles = c.rules.iter().map(|r| r.handle).collect();
                let counters = c
                    .rules
                    .iter()
                    .flat_map(|r| &r.expressions)
                    .filter_map(|e| e.counter)
                    .collect();
                (c.kernel_name.clone(), handles, counters)
            })
            .collect()
    }

    #[test]
    fn an_element_only_change_edits_the_generation_in_force_in_one_transaction() {
        let ns = Netns::new("edit");
        // `b` moves an address of each family and adds two ranges; `c`
        // only moves the addresses: element changes alone, each way.
        let (a, b, c) = (large(0, false), large(1, true), large(1, false));
        assert_large_sets_differ(&a, &b, 30);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        let rules = generation_rules(&mut session);
        let genid = readback::generation_id(&mut session.netlink).unwrap();
        let report = session.apply(&b).unwrap();
        // allow_v4: 10.1.0.0 and 10.2.0.0/30 out, 10.9.0.0 and 10.2.0.0/29
        // in; allow_v6: one out, one in; 11.9.0.0/30 into allow_v4_tcp_443
        // and the concatenated set.
        assert_eq!(
            report.method,
            Method::Edit {
                generation: 1,
                added: 5,
                removed: 3
            }
        );
        assert_eq!(
            readback::generation_id(&mut session.netlink).unwrap(),
            next_genid(genid),
            "an edit is one transaction"
        );
        assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
        assert_echo_matches_dump(&mut session);
        assert_eq!(report.digest, b.digest);
        assert_changed_in_place(&mut session, &b, 1);
        assert_eq!(
            generation_rules(&mut session),
            rules,
            "the generation's rules, their handles and counters are kept"
        );
        // The concatenated set would lose an element: a swap.
        let report = session.apply(&a).unwrap();
        assert_eq!(report.method, Method::Swap { from: 1, to: 2 });
        for (model, known) in [(&c, TableKnown::Session), (&a, TableKnown::Session)] {
            let report = session.apply(model).unwrap();
            assert_eq!(
                (report.method, report.table_known),
                (
                    Method::Edit {
                        generation: 2,
                        added: 2,
                        removed: 2
                    },
                    known
                )
            );
            assert_echo_matches_dump(&mut session);
            assert_changed_in_place(&mut session, model, 2);
        }
        // An apply without memory of the table decides the same from what it reads.
        let mut other = Session::open(&ns.target()).unwrap();
        let report = other.apply(&c).unwrap();
        assert_eq!(
            (report.method, report.table_known),
            (
                Method::Edit {
                    generation: 2,
                    added: 2,
                    removed: 2
                },
                TableKnown::Read
            )
        );
        assert_echo_matches_dump(&mut other);
        other.close_in_background();
        // The policy in force again: an edit that changes nothing but the
        // entry rules, one transaction.
        let genid = readback::generation_id(&mut session.netlink).unwrap();
        let report = session.apply(&c).unwrap();
        assert_eq!(
            report.method,
            Method::Edit {
                generation: 2,
                added: 0,
                removed: 0
            }
        );
        assert_eq!(
            readback::generation_id(&mut session.netlink).unwrap(),
            next_genid(genid)
        );
        assert_changed_in_place(&mut session, &c, 2);
        session.close_in_background();
    }

    #[test]
    fn a_failed_verification_of_an_edit_gives_back_the_elements_and_the_digest() {
        let ns = Netns::new("editback");
        let (a, b) = (large(0, false), large(1, false));
        apply(&ns.target(), &a).unwrap();
        // With and without memory of the table.
        for remembered in [true, false] {
            let mut session = Session::open(&ns.target()).unwrap();
            if remembered {
                assert_eq!(
                    session.apply(&a).unwrap().method,
                    Method::Edit {
                        generation: 1,
                        added: 0,
                        removed: 0
                    }
                );
            }
            // The edit puts `b`'s elements and digest in force, but is
            // verified against `a`: neither may stay.
            let err = session.apply_verified(&b, &a, &[]).unwrap_err();
            assert_eq!(session.verified_from, Some(VerifiedFrom::Echo));
            let (differences, rollback) = verify_error(err);
            assert!(
                differences.contains(&Difference::Digest {
                    kernel: Some(b.digest.clone()),
                    model: a.digest.clone()
                }),
                "{differences:?}"
            );
            for set in ["allow_v4", "allow_v6"] {
                assert!(
                    differences
                        .iter()
                        .any(|d| matches!(d, Difference::SetElements { set: s, .. } if s == set)),
                    "{set}: {differences:?}"
                );
            }
            assert!(
                rollback.contains(&format!(
                    "the previous policy ({}) was put back in force: generation 1 got its previous \
                     set elements back",
                    a.digest
                )),
                "{rollback}"
            );
            let status = session.status().unwrap().unwrap();
            assert_eq!(
                (status.generation, status.digest.as_deref()),
                (Some(1), Some(a.digest.as_str()))
            );
            assert_changed_in_place(&mut session, &a, 1);
            session.close_in_background();
        }
        // The next apply reads the table and edits it.
        let mut session = Session::open(&ns.target()).unwrap();
        let report = session.apply(&b).unwrap();
        assert!(
            matches!(report.method, Method::Edit { generation: 1, .. }),
            "{:?}",
            report.method
        );
        assert_changed_in_place(&mut session, &b, 1);
        session.close_in_background();
    }

    #[test]
    fn a_stale_edit_is_refused_by_the_kernel_and_planned_again() {
        let ns = Netns::new("editstale");
        let (a, b) = (large(0, false), large(1, false));
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        // Another program adds an address to a set the session knows.
        nft(
            &ns,
            &[
                "add",
                "element",
                "inet",
                TABLE_NAME,
                "allow_v4.g1",
                "{ 192.0.2.1 }",
            ],
        );
        // The edit planned from the session's memory carries its generation
        // id: the kernel refuses it, and the apply reads the table and edits
        // again, removing the address no policy has.
        let report = session.apply(&b).unwrap();
        assert_eq!((report.restarts, report.table_known), (1, TableKnown::Read));
        assert_eq!(
            report.method,
            Method::Edit {
                generation: 1,
                added: 2,
                removed: 3
            }
        );
        assert_changed_in_place(&mut session, &b, 1);
        session.close_in_background();
    }

    #[test]
    fn a_one_shot_apply_changes_a_large_set_in_a_few_elements_in_place() {
        let ns = Netns::new("oneshotedit");
        let (a, b) = (
            large_of(100, 0, false),
            with_other_rule(large_of(100, 1, true)),
        );
        assert_large_sets_differ(&a, &b, 100);
        assert_eq!(apply(&ns.target(), &a).unwrap().method, Method::Create);
        // Another program adds an address to the allowlist in force: the
        // model does not have it, and the edit removes it as read.
        let status = Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft", "add", "element", "inet"])
            .args([TABLE_NAME, "allow_v4.g1", "{ 192.0.2.1 }"])
            .status()
            .expect("run nft");
        assert!(status.success());
        // Each apply a session of its own, without memory of the table. The
        // kernel generation of the concatenated set after each: changed in
        // place only when it loses no element.
        let mut observer = Session::open(&ns.target()).unwrap();
        for (model, to, ports) in [(&b, 2, 1), (&a, 3, 3), (&b, 4, 3)] {
            let mut one_shot = Session::open(&ns.target()).unwrap();
            let report = one_shot.apply(model).unwrap();
            assert_eq!(report.method, Method::Swap { from: to - 1, to });
            assert_eq!(report.restarts, 0);
            assert_eq!(one_shot.verified_from, Some(VerifiedFrom::Echo));
            assert_echo_matches_dump(&mut one_shot);
            one_shot.close_in_background();
            assert_changed_in_place(&mut observer, model, ports);
        }
        // Through `kernel::apply` as well.
        let report = apply(&ns.target(), &a).unwrap();
        assert_eq!(report.method, Method::Swap { from: 4, to: 5 });
        assert_changed_in_place(&mut observer, &a, 5);
        observer.close_in_background();
    }

    #[test]
    fn a_one_shot_rollback_gives_the_sets_changed_in_place_their_elements_back() {
        let ns = Netns::new("oneshotback");
        let (a, b) = (
            large_of(100, 0, false),
            with_other_rule(large_of(100, 1, true)),
        );
        apply(&ns.target(), &a).unwrap();
        // A session without memory changes the sets of `a` into those of `b`
        // in place, decided from what it read, but verifies against `a`:
        // neither generation 2 nor the changed elements may stay.
        let mut session = Session::open(&ns.target()).unwrap();
        let err = session.apply_verified(&b, &a, &[]).unwrap_err();
        assert_rolled_back_to(&mut session, err, &a);
        session.close_in_background();
    }

    #[test]
    fn a_set_changed_in_many_elements_is_created_again() {
        let ns = Netns::new("manychanged");
        // 16 of 30 addresses moved: more elements change than stay.
        let (a, b) = (large(0, false), with_other_rule(large(16, false)));
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        session.apply(&b).unwrap();
        for set in ["allow_v4", "allow_v6"] {
            assert_eq!(kernel_set(&mut session, set), format!("{set}.g2"));
        }
        for set in ["allow_v4_tcp_443", CONCATENATED, "blocklist_v4"] {
            assert_eq!(kernel_set(&mut session, set), format!("{set}.g1"));
        }
        assert_in_force(&mut session, &b);
        session.close_in_background();
    }

    #[test]
    fn a_rollback_gives_the_sets_changed_in_place_their_elements_back() {
        let ns = Netns::new("inplaceback");
        let (a, b) = (large(0, false), with_other_rule(large(1, true)));
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        // Generation 2 changes the sets of `a` into those of `b` in place,
        // but is verified against `a`: it must not stay, and neither must
        // the changed elements.
        let err = session.apply_verified(&b, &a, &[]).unwrap_err();
        assert_rolled_back_to(&mut session, err, &a);
        // The session forgot the table; the next apply reads it and swaps.
        let report = session.apply(&b).unwrap();
        assert_eq!(report.method, Method::Swap { from: 1, to: 2 });
        assert_in_force(&mut session, &b);
        session.close_in_background();
    }

    #[test]
    fn a_set_changed_by_another_program_is_not_kept() {
        let ns = Netns::new("tampered");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        // It allows IPv6 too: another rule, so a generation swap (policies
        // that differ in elements alone are an edit in place).
        let b = compile(Mode::Limited, &["203.0.113.0/24", "2001:db8::/32"]);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        let status = Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft", "delete", "element", "inet"])
            .args([TABLE_NAME, "blocklist_v4.g1", "{ 169.254.0.0/16 }"])
            .status()
            .expect("run nft");
        assert!(status.success());
        // The session's memory is stale: its stage is refused, it reads the
        // table, and creates the changed set again instead of keeping it.
        let report = session.apply(&b).unwrap();
        assert_eq!(report.restarts, 1);
        assert_eq!(kernel_set(&mut session, "blocklist_v4"), "blocklist_v4.g2");
        assert_in_force(&mut session, &b);
        session.close_in_background();
    }

    #[test]
    fn a_rollback_to_an_accept_policy_restores_it() {
        let ns = Netns::new("rollpolicy");
        let open = compile(Mode::Unrestricted, &[]);
        let limited = compile(Mode::Limited, &["198.51.100.0/24"]);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&open).unwrap();
        let rollback = rollback_text(session.apply_verified(&limited, &open, &[]).unwrap_err());
        assert!(rollback.contains("was put back"), "{rollback}");
        let status = session.status().unwrap().unwrap();
        assert_eq!(status.generation, Some(1));
        let policies: Vec<Option<&str>> = status
            .chains
            .iter()
            .filter(|c| c.hook.is_some())
            .map(|c| c.policy.as_deref())
            .collect();
        assert_eq!(policies, [Some("accept"), Some("accept")]);
        let names = kernel_names(&mut session);
        assert!(
            names
                .iter()
                .all(|n| !n.ends_with(".g2") && !n.starts_with("dns_")),
            "generation 2 and the DNS sets it created are deleted: {names:?}"
        );
        session.close_in_background();
    }

    /// The namespace's identity and the file the last one-shot apply there
    /// left, once its write (after the answer) is done.
    fn last_apply_file(ns: &Netns) -> (last_apply::Identity, Option<Snapshot>) {
        assert!(
            last_apply::wait_for_writes(std::time::Duration::from_secs(5)),
            "the write after the answer did not finish"
        );
        let identity = netns::run_in(&ns.target(), last_apply::Identity::here)
            .unwrap()
            .unwrap();
        let recalled = last_apply::Store::configured().recall(&identity).unwrap();
        (identity, recalled)
    }

    /// Run `nft ARGS` in the namespace (another program changing the ruleset).
    fn nft(ns: &Netns, args: &[&str]) {
        let status = Command::new("ip")
            .args(["netns", "exec", &ns.0, "nft"])
            .args(args)
            .status()
            .expect("run nft");
        assert!(status.success(), "nft {args:?}");
    }

    #[test]
    fn a_one_shot_apply_plans_from_the_table_the_previous_one_verified() {
        let ns = Netns::new("lastapply");
        let other = Netns::new("lastapplyother");
        let (a, b) = (large(0, false), with_other_rule(large(1, true)));
        // No file yet: created without reading first.
        let report = apply(&ns.target(), &a).unwrap();
        assert_eq!(
            (report.method, report.table_known),
            (Method::Create, TableKnown::AssumedAbsent)
        );
        let (identity, file) = last_apply_file(&ns);
        let file = file.expect("the verified table is kept");
        let mut observer = Session::open(&ns.target()).unwrap();
        assert_eq!(
            file.genid,
            readback::generation_id(&mut observer.netlink).unwrap()
        );
        // Another namespace has another file, and its own.
        apply(&other.target(), &b).unwrap();
        let (other_identity, other_file) = last_apply_file(&other);
        assert_ne!(other_identity.cookie, identity.cookie);
        assert_ne!(other_file.unwrap().table, file.table);
        // Each next apply plans from the file, changes the large sets in
        // place as a session would, and leaves its own table behind.
        for (model, to, ports) in [(&b, 2, 1), (&a, 3, 3), (&b, 4, 3)] {
            let report = apply(&ns.target(), model).unwrap();
            assert_eq!(report.method, Method::Swap { from: to - 1, to });
            assert_eq!(
                (report.table_known, report.restarts),
                (TableKnown::LastApply, 0)
            );
            assert_changed_in_place(&mut observer, model, ports);
            let (_, file) = last_apply_file(&ns);
            let file = file.expect("kept");
            assert_eq!(
                file.genid,
                readback::generation_id(&mut observer.netlink).unwrap()
            );
            assert_eq!(file.table.unwrap().generation, Some(to));
        }
        // `remove` removes the file with the table.
        assert!(remove(&ns.target()).unwrap());
        assert_eq!(last_apply_file(&ns).1, None);
        let report = apply(&ns.target(), &a).unwrap();
        assert_eq!(
            (report.method, report.table_known),
            (Method::Create, TableKnown::AssumedAbsent)
        );
        observer.close_in_background();
    }

    #[test]
    fn a_file_made_stale_by_another_commit_is_refused_by_the_kernel() {
        let ns = Netns::new("laststale");
        let (a, b) = (large(0, false), with_other_rule(large(1, true)));
        apply(&ns.target(), &a).unwrap();
        assert!(last_apply_file(&ns).1.is_some());
        // Another program adds an element to a set the file says it knows.
        nft(
            &ns,
            &[
                "add",
                "element",
                "inet",
                TABLE_NAME,
                "allow_v4.g1",
                "{ 192.0.2.1 }",
            ],
        );
        // The stage planned from the file carries its generation id: the
        // kernel refuses it, and the apply reads the table and starts over,
        // removing the element no policy has.
        let report = apply(&ns.target(), &b).unwrap();
        assert_eq!((report.table_known, report.restarts), (TableKnown::Read, 1));
        let mut observer = Session::open(&ns.target()).unwrap();
        assert_changed_in_place(&mut observer, &b, 1);
        // Also after a DNS element update through netleash.
        update_elements(&ns.target(), &[learned_dns_v4()]).unwrap();
        let report = apply(&ns.target(), &a).unwrap();
        assert_eq!((report.table_known, report.restarts), (TableKnown::Read, 1));
        assert_changed_in_place(&mut observer, &a, 3);
        // And the file that apply left is used again.
        let report = apply(&ns.target(), &b).unwrap();
        assert_eq!(
            (report.table_known, report.restarts),
            (TableKnown::LastApply, 0)
        );
        assert_changed_in_place(&mut observer, &b, 3);
        observer.close_in_background();
    }

    #[test]
    fn a_false_file_at_the_current_generation_id_fails_the_transaction_and_the_apply_reads() {
        let ns = Netns::new("lastfalse");
        let (a, b) = (large(0, false), with_other_rule(large(1, true)));
        apply(&ns.target(), &a).unwrap();
        let (identity, file) = last_apply_file(&ns);
        let mut file = file.unwrap();
        // The kernel's allow_v4 loses the address `b` moves elsewhere, and
        // the file is rewritten to claim the generation id that follows,
        // with the table as it was: false, but at the current id.
        nft(
            &ns,
            &[
                "delete",
                "element",
                "inet",
                TABLE_NAME,
                "allow_v4.g1",
                "{ 10.1.0.0 }",
            ],
        );
        let mut observer = Session::open(&ns.target()).unwrap();
        file.genid = readback::generation_id(&mut observer.netlink).unwrap();
        last_apply::Store::configured()
            .keep(&identity, &file, false)
            .unwrap();
        // The kernel lets the stage through (right id), but the swap's
        // edit deletes 10.1.0.0 from allow_v4, which is not there: the
        // kernel rejects the swap (ENOENT) and nothing changes; the apply
        // forgets the file and applies again from a reading.
        let report = apply(&ns.target(), &b).unwrap();
        assert_eq!(report.table_known, TableKnown::Read);
        // Generation 2, staged by the rejected attempt, is left behind; the
        // apply from the reading stages 3 and then deletes what is left.
        assert_eq!(report.method, Method::Swap { from: 1, to: 3 });
        assert_in_force(&mut observer, &b);
        let status = observer.status().unwrap().unwrap();
        assert!(status.leftovers.is_empty(), "{:?}", status.leftovers);
        observer.close_in_background();
    }

    #[test]
    fn a_failed_one_shot_apply_removes_the_file() {
        let ns = Netns::new("lastfailed");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        apply(&ns.target(), &a).unwrap();
        assert!(last_apply_file(&ns).1.is_some());
        // A set that lists an element twice: the kernel rejects its creation.
        let mut broken = compile(Mode::Limited, &["203.0.113.0/24"]);
        let allow = broken
            .sets
            .iter_mut()
            .find(|s| s.name == "allow_v4")
            .unwrap();
        allow.elements.push(allow.elements[0]);
        let err = apply(&ns.target(), &broken).unwrap_err();
        assert!(err.kernel_errno().is_some(), "{err}");
        assert_eq!(last_apply_file(&ns).1, None);
        // The next apply reads the table, which is still `a`'s.
        let mut observer = Session::open(&ns.target()).unwrap();
        assert_in_force(&mut observer, &a);
        let report = apply(&ns.target(), &a).unwrap();
        assert_eq!((report.table_known, report.restarts), (TableKnown::Read, 0));
        observer.close_in_background();
    }

    #[test]
    fn a_transaction_built_at_an_old_generation_id_is_refused_and_changes_nothing() {
        let ns = Netns::new("genid");
        let a = compile(Mode::Limited, &["198.51.100.0/24"]);
        let mut session = Session::open(&ns.target()).unwrap();
        session.apply(&a).unwrap();
        let read_at = readback::generation_id(&mut session.netlink).unwrap();
        // Any commit in between (here an element update) moves the generation id on.
        session.update_elements(&[learned_dns_v4()]).unwrap();
        assert_ne!(
            readback::generation_id(&mut session.netlink).unwrap(),
            read_at
        );
        let mut stale = batch::delete_table();
        stale.expect_generation(read_at);
        assert!(matches!(
            session.netlink.commit(stale),
            Err(Error::RulesetChanged)
        ));
        let mut current = batch::delete_table();
        current.expect_generation(readback::generation_id(&mut session.netlink).unwrap());
        assert!(
            session.status().unwrap().is_some(),
            "the refused delete changed nothing"
        );
        session.netlink.commit(current).unwrap();
        assert!(session.status().unwrap().is_none());
        session.close_in_background();
    }
}
