//! The only module that talks netlink: applies a [`crate::ruleset::Ruleset`]
//! as one nftnl batch, reads it back, and updates set elements.
//!
//! A [`Session`] is a netfilter netlink socket opened inside the target
//! network namespace (by a thread that enters it, [`netns::run_in`]); a
//! socket stays in the namespace it was created in, so the session then
//! works from any thread without entering the namespace again. The free
//! functions open a session for one call.
//!
//! - [`apply`] replaces the `inet netleash` table in one transaction and
//!   verifies what the kernel then holds against the model;
//! - [`status`] reads the table back: digest, set sizes, counters;
//! - [`plan`] is `apply --dry-run`: what would change, checked by the kernel
//!   without committing;
//! - [`update_elements`] adds, refreshes and removes set elements without
//!   touching the rules (the DNS layer drives it);
//! - [`remove`] deletes the table.
//!
//! Modules: `batch` builds the transaction, `elements` encodes set elements,
//! `readback` reads and compares, `netlink` is the socket, and `ffi` is the
//! only place that calls libnftnl directly.

mod batch;
mod elements;
mod ffi;
mod learned;
mod netlink;
mod readback;

use std::ffi::CString;
use std::io;

pub use elements::{SetChange, SetUpdate};
pub use learned::{HeldElement, carry_updates};
pub use readback::{ChainStatus, Difference, RuleCounter, SetStatus, TableStatus};

use crate::netns;
use crate::ruleset::{Ruleset, TABLE_NAME};
use netlink::Netlink;

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
        "the nftables ruleset kept changing while it was read ({attempts} attempts); try again"
    )]
    Unstable { attempts: usize },
    #[error("there is no table inet {TABLE_NAME} in this network namespace; apply a policy first")]
    NoTable,
    #[error(
        "table inet {TABLE_NAME} is missing right after the kernel accepted it; another program removed it"
    )]
    MissingAfterApply,
    #[error(
        "the kernel accepted the transaction, but the table it now holds does not match the policy \
         ({} difference(s)): {}",
        .differences.len(),
        .differences.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
    )]
    Verify { differences: Vec<Difference> },
    #[error("{name:?} cannot be an nftables name: it contains a NUL byte or is too long")]
    InvalidName { name: String },
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

/// What `apply` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyReport {
    /// The digest of the ruleset now in force, as read back from the kernel.
    pub digest: String,
    /// Named sets and their elements (ranges count once), as read back.
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
    /// How the table in force differs from `ruleset`; empty if the table is
    /// absent (everything would be created) or already enforces `ruleset`.
    pub differences: Vec<Difference>,
}

/// A netfilter netlink socket in one network namespace, for a caller that
/// acts there repeatedly (e.g. the agent serving a sandbox): no thread and no
/// socket per call. The socket holds a reference to the namespace, so drop
/// the session when the sandbox ends.
pub struct Session {
    netlink: Netlink,
}

impl Session {
    /// Open a session in `target` (the socket is created by a thread that
    /// enters the namespace; the caller's namespace never changes).
    pub fn open(target: &netns::Target) -> Result<Session, Error> {
        let netlink = netns::run_in(target, Netlink::open)??;
        Ok(Session { netlink })
    }

    /// Replace the `inet netleash` table with `ruleset`, in one netlink
    /// transaction, then read it back and verify it.
    ///
    /// If the kernel rejects any part of the transaction, nothing changes: the
    /// table in force before stays in force, and the error names the object
    /// the kernel rejected. A verification error means the kernel committed
    /// but holds something else than the model (another program changed it in
    /// between, or a bug): the error lists every difference.
    pub fn apply(&mut self, ruleset: &Ruleset) -> Result<ApplyReport, Error> {
        let transaction = batch::replace_table(ruleset)?;
        match self.netlink.commit(transaction) {
            // Lost answers: the read-back below decides what is in force.
            Ok(()) | Err(Error::AcksLost) => {}
            Err(err) => return Err(err),
        }
        let table = readback::read_table(&mut self.netlink)?.ok_or(Error::MissingAfterApply)?;
        let differences = readback::differences(ruleset, &table)?;
        if !differences.is_empty() {
            return Err(Error::Verify { differences });
        }
        Ok(learned::report(&table))
    }

    /// Compare the table in force with `ruleset`, and have the kernel check
    /// the transaction that would replace it without committing it. Nothing changes.
    pub fn plan(&mut self, ruleset: &Ruleset) -> Result<Plan, Error> {
        let transaction = batch::replace_table(ruleset)?;
        let current = readback::read_table(&mut self.netlink)?;
        let differences = match &current {
            Some(table) => readback::differences(ruleset, table)?,
            None => Vec::new(),
        };
        self.netlink.check(transaction)?;
        Ok(Plan {
            current: current.as_ref().map(TableStatus::of),
            differences,
        })
    }

    /// Delete the `inet netleash` table. Returns whether it existed.
    pub fn remove(&mut self) -> Result<bool, Error> {
        if readback::read_table(&mut self.netlink)?.is_none() {
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
        Ok(readback::read_table(&mut self.netlink)?
            .as_ref()
            .map(TableStatus::of))
    }

    /// Apply element changes to named sets of the table, in one transaction
    /// (all or nothing), without touching rules or other sets.
    pub fn update_elements(&mut self, updates: &[SetUpdate]) -> Result<(), Error> {
        elements::update(&mut self.netlink, updates)
    }

    /// Close the session without waiting for the kernel.
    ///
    /// Closing a netfilter socket shortly after a commit in its namespace
    /// waits until the kernel has freed what the commit replaced: nf_tables'
    /// NETLINK_URELEASE handler takes the namespace's commit mutex and flushes
    /// the pending destroy work, one RCU grace period (about 10 ms here).
    /// Nothing here depends on that wait, so a helper thread does it.
    pub fn close_in_background(self) {
        // If no thread can be started, the closure (and the session) is dropped here instead.
        let _ = std::thread::Builder::new()
            .name("netleash-close".into())
            .spawn(move || drop(self));
    }
}

/// Replace the `inet netleash` table in `target` with `ruleset`: [`Session::apply`] in a
/// session of its own.
pub fn apply(target: &netns::Target, ruleset: &Ruleset) -> Result<ApplyReport, Error> {
    let mut session = Session::open(target)?;
    let result = session.apply(ruleset);
    session.close_in_background();
    result
}

/// [`Session::plan`] in a session of its own (`apply --dry-run`).
pub fn plan(target: &netns::Target, ruleset: &Ruleset) -> Result<Plan, Error> {
    let mut session = Session::open(target)?;
    let result = session.plan(ruleset);
    session.close_in_background();
    result
}

/// Delete the `inet netleash` table in `target`. Returns whether it existed.
pub fn remove(target: &netns::Target) -> Result<bool, Error> {
    let mut session = Session::open(target)?;
    let result = session.remove();
    session.close_in_background();
    result
}

/// The table in `target` as the kernel holds it, or `None` if there is none.
pub fn status(target: &netns::Target) -> Result<Option<TableStatus>, Error> {
    let mut session = Session::open(target)?;
    let result = session.status();
    session.close_in_background();
    result
}

/// [`Session::update_elements`] in a session of its own.
pub fn update_elements(target: &netns::Target, updates: &[SetUpdate]) -> Result<(), Error> {
    let mut session = Session::open(target)?;
    let result = session.update_elements(updates);
    session.close_in_background();
    result
}
