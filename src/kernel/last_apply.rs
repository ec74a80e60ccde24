//! What the last verified apply in a network namespace knew of the table,
//! kept in a file, so that the next one-shot apply there (`netleash apply`,
//! [`super::apply`]) plans from it instead of reading the table first (a
//! consistent reading costs about ten netlink round trips: the ruleset
//! generation id, the table, sets, chains, rules, and the elements of every
//! static set).
//!
//! # Why a remembered table is safe to plan from
//!
//! A file holds a `readback::Snapshot`: the table as an apply verified it, and the
//! ruleset generation id (`NFT_MSG_GETGEN`) it was valid at. It is only ever
//! used as `Session::known` is: every transaction planned from it carries
//! that id in its batch begin message (`NFNLA_BATCH_GENID`, see
//! `netlink::Transaction::expect_generation`), and the kernel checks it
//! before it looks at any message of the batch: `nfnetlink_rcv_batch` calls
//! `nf_tables_valid_genid`, which takes the namespace's commit mutex and
//! accepts only `genid == 0 || nft_net->base_seq == genid`, else the batch
//! is answered `-ERESTART` and nothing of it is processed; an accepted batch
//! keeps the mutex until it commits or aborts, so nothing commits between
//! the check and the batch. `base_seq` is nf_tables' per-namespace ruleset
//! generation (`nft_pernet(net)->base_seq`, what `NFT_MSG_GETGEN` answers),
//! and every commit in the namespace increments it (`nf_tables_commit`:
//! `while (++base_seq == 0)`), whatever it changes and whoever commits it
//! (`nft`, another netleash, a DNS element update). So if anything changed
//! the ruleset since the snapshot was taken, the kernel refuses the first
//! transaction built from it (`Error::RulesetChanged`), nothing changes, and
//! the apply reads the table and starts over, as without a file. If the
//! kernel accepts it, the ruleset is the one the snapshot describes, and the
//! apply then verifies what it committed as a session does (from the
//! kernel's echo composed with the snapshot, or by reading). (Elements that
//! time out are the only change without a commit: only the DNS-derived sets
//! have timeouts, and their elements are never part of a snapshot.)
//!
//! What makes a file describe *this* namespace's ruleset at that id:
//! - the namespace: its cookie (`SO_NETNS_COOKIE`, Linux 5.14), a 64-bit
//!   number the kernel gives each network namespace from a global counter
//!   when it sets it up (net/core/net_namespace.c), so never to another one
//!   until reboot, names the file and is checked in it; generation ids of
//!   different namespaces are unrelated (each starts over), so a file of
//!   another namespace must never be used;
//! - the boot: `/proc/sys/kernel/random/boot_id`, since cookies start over at
//!   every boot (the default directory is on tmpfs and empty after a reboot
//!   anyway, but an overridden one may not be);
//! - the program: a format number and the netleash version, since another
//!   version may read or mean the table differently;
//! - an id that is not 0: 0 tells the kernel "no check" (`genid == 0 ||`),
//!   so such a snapshot is never written nor used;
//! - a SHA-256 of the body in the header: a file damaged on disk is not used.
//!
//! What the generation id cannot catch is a file whose *content* is false
//! while its id is the current one: only someone who can write the
//! directory can make one, and the directory is root's alone (mode 0700,
//! checked on every use: a directory another user owns, or others can
//! write, is not used), i.e. someone who could change the ruleset directly.
//! Verification compares what the kernel echoed of this apply's own
//! transactions, composed with the snapshot, so a false snapshot is caught
//! only where the kernel or the echo contradicts it: a transaction that
//! deletes an object or element the kernel does not hold, or creates one it
//! already holds, is rejected (the kernel test
//! `a_false_file_at_the_current_generation_id_fails_the_transaction_and_the_apply_reads`),
//! and an echo that does not fit the snapshot makes the apply read the
//! table. What the transactions do not touch (a set kept as it is, rules the
//! swap leaves alone) is believed, as a session believes its own memory. A
//! transaction the kernel rejects, or a verification that fails, after
//! planning from a file makes the one-shot apply try once more from a
//! reading (`super::apply`), and a failed apply removes the file.
//!
//! # No file
//!
//! A namespace without a file has most likely never had a table (a new
//! sandbox), so the one-shot apply creates the table without reading first
//! (`TableKnown::AssumedAbsent`), which saves two round trips (the
//! generation id and the table). The assumption is the kernel's to check:
//! the table message carries `NLM_F_EXCL`, so if the table exists
//! (another program's, a session's, which leaves no file, or one whose file
//! is gone) `nf_tables_newtable` answers `EEXIST` and the whole
//! transaction is dropped; the apply then reads the table and plans as
//! usual. If it does not exist, nothing else of the create's can either
//! (every object is in the table), so the kernel's echo is the whole table,
//! and it is verified as after a create onto a table read as absent, at the
//! generation id the echoed `NFT_MSG_NEWGEN` names (the kernel test
//! `a_table_without_a_last_apply_file_is_read_not_created_again` shows that
//! without `NLM_F_EXCL` another program's chain would stay, unseen).
//!
//! # The files
//!
//! One file per namespace, named by its cookie, in [`DEFAULT_DIR`] (tmpfs:
//! gone at reboot), or the directory [`DIR_VARIABLE`] names. A file is
//! written to a temporary name and renamed (atomic), so a reader sees the
//! new file, the previous one or none, never a part. Reading, parsing or writing
//! never fails an apply: a failure is logged at debug level and the apply
//! reads the table instead. A file that cannot be used (corrupt, truncated,
//! of another version, boot or namespace) is removed. Namespaces come and go
//! without telling netleash, so the directory is bounded: when a write
//! creates a new file and the directory then holds more than [`MAX_FILES`],
//! the older half (lowest cookies: cookies grow with each new namespace) is
//! deleted. A file larger than [`MAX_BYTES`] is not written (see there).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::ffi::RawElement;
use super::readback::{KernelTable, Snapshot};

/// The environment variable that names another directory for the files
/// (tests use one of their own). It is created (mode 0700) if missing.
pub const DIR_VARIABLE: &str = "NETLEASH_LAST_APPLY_DIR";

/// Where the files are unless [`DIR_VARIABLE`] says otherwise: under the
/// agent's runtime directory, on tmpfs.
pub const DEFAULT_DIR: &str = "/run/netleash/last-apply";

/// The file format; a file of another format is removed, not read.
/// Format 2: rule expressions with every attribute and the anonymous sets'
/// elements. Format 3: entry rules carry the policy digest and a table its
/// generation's shape digest (an edit in place keeps the generation).
const FORMAT: u32 = 3;

/// The netleash version that writes and reads the files.
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Most files the directory holds before a new one makes it delete the
/// older half. A file is a few kilobytes for a typical policy.
pub const MAX_FILES: usize = 512;

/// Largest file written; a larger table is read by the next apply instead.
/// Recalling is quicker than reading at every size measured (apply
/// benchmark, release profile, one-shot applies: 42 ms → 34.5 ms at 10,005
/// elements, whose file is 320 KiB and loads in about 2 ms; 6.0 → 5.4 ms at
/// 1,005; a typical policy's file is 2.7 KiB), so the bound is for the
/// directory's size, which is memory on tmpfs: at most [`MAX_FILES`] files
/// of this size (typical: [`MAX_FILES`] × 3 KiB).
pub const MAX_BYTES: usize = 384 * 1024;

/// The fewest bytes an element takes in a file (a length and four key
/// bytes, three flags): a table with more elements than `MAX_BYTES` over
/// this is not even encoded.
const MIN_ELEMENT_BYTES: usize = 8;

/// `SO_NETNS_COOKIE` (include/uapi/asm-generic/socket.h; the same on x86
/// and arm): the cookie of the socket's network namespace, a u64.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Why a file was not used or not written: logged at debug level, never
/// returned by an apply.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot tell the network namespace's cookie (SO_NETNS_COOKIE needs Linux 5.14)")]
    Cookie(#[source] io::Error),
    #[error("cannot read the boot id from /proc/sys/kernel/random/boot_id")]
    BootId(#[source] io::Error),
    #[error("cannot create or check the directory {path}")]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "the directory {path} is not root's alone (owner uid {uid}, mode {mode:o}), so its files are \
         not used"
    )]
    Unsafe { path: PathBuf, uid: u32, mode: u32 },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a file of this format: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{path} was written {what}")]
    Other { path: PathBuf, what: String },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Which network namespace, in which boot: what a file must have been
/// written for to be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub cookie: u64,
    pub boot_id: String,
}

impl Identity {
    /// The identity of the calling thread's network namespace (a socket is
    /// created in the namespace of the thread that creates it), from a
    /// throwaway socket.
    pub fn here() -> Result<Identity, Error> {
        // SAFETY: socket has no memory preconditions; the descriptor it
        // returns is owned by the OwnedFd below and closed once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(Error::Cookie(io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Identity::of_socket(std::os::fd::AsFd::as_fd(&socket))
    }

    /// The identity of the network namespace `socket` was created in (one
    /// system call: a one-shot apply asks its own netlink socket).
    pub fn of_socket(socket: std::os::fd::BorrowedFd<'_>) -> Result<Identity, Error> {
        Ok(Identity {
            cookie: namespace_cookie(socket).map_err(Error::Cookie)?,
            boot_id: boot_id()?,
        })
    }
}

/// The cookie of the network namespace `socket` was created in.
fn namespace_cookie(socket: std::os::fd::BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: `socket` is a live descriptor for the call; `cookie` is a
    // writable u64 and `len` says so; the kernel writes at most `len` bytes
    // and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&socket),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<u64>() {
        return Err(io::Error::other(format!(
            "SO_NETNS_COOKIE answered {len} bytes instead of 8"
        )));
    }
    Ok(cookie)
}

/// This boot's id, read once per process.
fn boot_id() -> Result<String, Error> {
    static BOOT_ID: OnceLock<Result<String, io::ErrorKind>> = OnceLock::new();
    BOOT_ID
        .get_or_init(|| {
            fs::read_to_string("/proc/sys/kernel/random/boot_id")
                .map(|id| id.trim().to_string())
                .map_err(|err| err.kind())
        })
        .clone()
        .map_err(|kind| Error::BootId(kind.into()))
}

/// The start of a file: what it was written for, and the checksum of the
/// rest (the table).
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    /// First: see [`parse`].
    format: u32,
    netleash: String,
    boot_id: String,
    netns_cookie: u64,
    genid: u32,
    /// SHA-256 of the table (everything after the header).
    sha256: [u8; 32],
}

/// The directory of the files.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// [`DIR_VARIABLE`] if set (and not empty), else [`DEFAULT_DIR`].
    pub fn configured() -> Store {
        match std::env::var_os(DIR_VARIABLE) {
            Some(dir) if !dir.is_empty() => Store::at(dir),
            _ => Store::at(DEFAULT_DIR),
        }
    }

    pub fn at(dir: impl Into<PathBuf>) -> Store {
        Store { dir: dir.into() }
    }

    pub fn file(&self, identity: &Identity) -> PathBuf {
        self.dir.join(format!("{:016x}", identity.cookie))
    }

    /// Whether the directory is root's alone, as it must be for its files
    /// to be believed: owned by this (root) user and closed to others.
    fn check_dir(&self) -> Result<(), Error> {
        let metadata = fs::metadata(&self.dir).map_err(|source| Error::Directory {
            path: self.dir.clone(),
            source,
        })?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let euid = unsafe { libc::geteuid() };
        if !metadata.is_dir() || metadata.uid() != euid || metadata.mode() & 0o077 != 0 {
            return Err(Error::Unsafe {
                path: self.dir.clone(),
                uid: metadata.uid(),
                mode: metadata.mode() & 0o7777,
            });
        }
        Ok(())
    }

    /// The snapshot the file of `identity` holds, if it is one to use.
    /// `Ok(None)`: there is no file. A file that cannot be used is removed.
    pub fn recall(&self, identity: &Identity) -> Result<Option<Snapshot>, Error> {
        let path = self.file(identity);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(Error::Read { path, source }),
        };
        self.check_dir()?;
        match parse(&path, &bytes, identity) {
            Ok(snapshot) => Ok(Some(snapshot)),
            Err(err) => {
                let _ = fs::remove_file(&path);
                Err(err)
            }
        }
    }

    /// Write `snapshot` as the file of `identity`. `new`: there was no file
    /// for it before (then the directory may need pruning).
    pub fn keep(&self, identity: &Identity, snapshot: &Snapshot, new: bool) -> Result<(), Error> {
        let path = self.file(identity);
        let Some(table) = snapshot.table.as_ref().filter(|_| snapshot.genid != 0) else {
            // Nothing to plan from, or an id the kernel would not check.
            self.forget(identity);
            return Ok(());
        };
        let elements: usize = table.sets.iter().map(|s| s.elements.len()).sum();
        if elements > MAX_BYTES / MIN_ELEMENT_BYTES {
            self.forget(identity);
            return Ok(());
        }
        let bytes = render(identity, snapshot.genid, table).map_err(|err| Error::Invalid {
            path: path.clone(),
            reason: err.to_string(),
        })?;
        if bytes.len() > MAX_BYTES {
            self.forget(identity);
            return Ok(());
        }
        self.make_dir()?;
        // Unique to this write: two applies in one namespace may write at once.
        static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let temporary = self.dir.join(format!(
            ".{:016x}.{}.{}.tmp",
            identity.cookie,
            std::process::id(),
            WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let write = || -> io::Result<()> {
            let mut file = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temporary)?;
            file.write_all(&bytes)?;
            // Not renamed over the old file: ext4 flushes a file renamed over
            // another (`auto_da_alloc`, Documentation/admin-guide/ext4.rst),
            // which made the write 0.2–0.5 ms instead of 40 µs where /run
            // is not tmpfs. A reader in between finds no file, and its
            // exclusive create is refused (see "No file" above): it reads
            // the table.
            match fs::remove_file(&path) {
                Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
            fs::rename(&temporary, &path)
        };
        if let Err(source) = write() {
            let _ = fs::remove_file(&temporary);
            return Err(Error::Write { path, source });
        }
        if new {
            self.prune(&path);
        }
        Ok(())
    }

    /// Remove the file of `identity`, if any.
    pub fn forget(&self, identity: &Identity) {
        let path = self.file(identity);
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => tracing::debug!("cannot remove {}: {err}", path.display()),
        }
    }

    /// Create the directory (and its parents) root-only if missing, and
    /// check that it is root's alone.
    fn make_dir(&self) -> Result<(), Error> {
        match self.check_dir() {
            Err(Error::Directory { source, .. }) if source.kind() == io::ErrorKind::NotFound => {}
            checked => return checked,
        }
        if let Err(source) = fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
        {
            return Err(Error::Directory {
                path: self.dir.clone(),
                source,
            });
        }
        self.check_dir()
    }

    /// If the directory holds more than [`MAX_FILES`] files, delete the
    /// older half (the lowest cookies), never `keep`, and every stray
    /// temporary file. Runs only when a write created a new file, so a
    /// directory listing is paid once per namespace, not per apply.
    fn prune(&self, keep: &Path) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let names: Vec<std::ffi::OsString> = entries
            .filter_map(|entry| entry.ok().map(|e| e.file_name()))
            .collect();
        if names.len() <= MAX_FILES {
            return;
        }
        let mut files: Vec<(u64, &std::ffi::OsString)> = Vec::new();
        for name in &names {
            match name.to_str().and_then(|n| u64::from_str_radix(n, 16).ok()) {
                Some(cookie) => files.push((cookie, name)),
                // A temporary file another writer is renaming may go too:
                // its rename then fails, which only costs that write.
                None => {
                    let _ = fs::remove_file(self.dir.join(name));
                }
            }
        }
        files.sort_unstable();
        let older_half = files.len() / 2;
        for (_, name) in &files[..older_half] {
            let path = self.dir.join(name);
            if path != keep {
                let _ = fs::remove_file(path);
            }
        }
        tracing::debug!(
            "{} held {} files; deleted the {older_half} of the oldest namespaces",
            self.dir.display(),
            names.len()
        );
    }
}

/// The file for `table` at generation id `genid` in `identity`: the
/// header, then the table, both in postcard's binary form.
fn render(identity: &Identity, genid: u32, table: &KernelTable) -> postcard::Result<Vec<u8>> {
    let body = postcard::to_stdvec(table)?;
    let header = Header {
        format: FORMAT,
        netleash: VERSION.into(),
        boot_id: identity.boot_id.clone(),
        netns_cookie: identity.cookie,
        genid,
        sha256: Sha256::digest(&body).into(),
    };
    let mut bytes = postcard::to_stdvec(&header)?;
    bytes.extend_from_slice(&body);
    Ok(bytes)
}

/// The snapshot in file `bytes`, if it was written by this version for
/// `identity` and is whole.
fn parse(path: &Path, bytes: &[u8], identity: &Identity) -> Result<Snapshot, Error> {
    let invalid = |reason: String| Error::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let other = |what: String| Error::Other {
        path: path.to_path_buf(),
        what,
    };
    // The format number comes first, so that a file of another format is
    // told apart before its header is read as this format's.
    let (format, _) =
        postcard::take_from_bytes::<u32>(bytes).map_err(|err| invalid(format!("header: {err}")))?;
    if format != FORMAT {
        return Err(other(format!(
            "in format {format} (this is format {FORMAT})"
        )));
    }
    let (header, body) = postcard::take_from_bytes::<Header>(bytes)
        .map_err(|err| invalid(format!("header: {err}")))?;
    if header.netleash != VERSION {
        return Err(other(format!(
            "by netleash {} (this is netleash {VERSION})",
            header.netleash
        )));
    }
    if header.boot_id != identity.boot_id {
        return Err(other(format!("in another boot ({})", header.boot_id)));
    }
    if header.netns_cookie != identity.cookie {
        return Err(other(format!(
            "for another network namespace (cookie {})",
            header.netns_cookie
        )));
    }
    if header.genid == 0 {
        return Err(invalid("generation id 0 (\"no check\")".into()));
    }
    if <[u8; 32]>::from(Sha256::digest(body)) != header.sha256 {
        return Err(invalid("the table does not match its checksum".into()));
    }
    let table: KernelTable =
        postcard::from_bytes(body).map_err(|err| invalid(format!("table: {err}")))?;
    Ok(Snapshot {
        genid: header.genid,
        table: Some(table),
    })
}

/// A set element as a tuple, without field names: key, key end, interval
/// end flag, timeout, time left. (`RawElement` lives in `ffi`, which knows
/// nothing of files.)
type ElementFields = (Vec<u8>, Option<Vec<u8>>, bool, Option<u64>, Option<u64>);

impl Serialize for RawElement {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        (
            &self.key,
            &self.key_end,
            self.interval_end,
            self.timeout_ms,
            self.expiration_ms,
        )
            .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RawElement {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let (key, key_end, interval_end, timeout_ms, expiration_ms) =
            ElementFields::deserialize(deserializer)?;
        Ok(RawElement {
            key,
            key_end,
            interval_end,
            timeout_ms,
            expiration_ms,
        })
    }
}

/// Writes still under way after their apply answered (see [`Pending`]),
/// and a way to wait for them.
static PENDING: Mutex<usize> = Mutex::new(0);
static PENDING_DONE: Condvar = Condvar::new();

/// How long a process that exits waits for its writes at most: a write is
/// tens of microseconds; this only bounds a stuck file system.
const EXIT_WAIT: Duration = Duration::from_secs(1);

/// Wait until no write is under way, or `timeout` passed. Returns whether
/// none is.
pub fn wait_for_writes(timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let mut pending = PENDING
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    while *pending > 0 {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        pending = match PENDING_DONE.wait_timeout(pending, left) {
            Ok((pending, _)) => pending,
            Err(poisoned) => poisoned.into_inner().0,
        };
    }
    true
}

extern "C" fn wait_for_writes_at_exit() {
    wait_for_writes(EXIT_WAIT);
}

/// What an apply leaves for after its answer: write the table it verified
/// as the namespace's file, or remove the file. Counted from creation (so a
/// caller that got the answer and waits with [`wait_for_writes`] waits for
/// it) until done, on drop.
pub struct Pending {
    store: Store,
    identity: Identity,
    /// The table to keep (and whether it makes a new file), or `None` to forget.
    keep: Option<(Snapshot, bool)>,
}

impl Pending {
    pub fn new(store: Store, identity: Identity, keep: Option<(Snapshot, bool)>) -> Pending {
        // A process that exits right after its apply (`netleash apply`)
        // waits for the write at exit: returning from `main` and
        // `std::process::exit` both call exit(3), which runs atexit handlers
        // before the other threads are killed.
        static AT_EXIT: Once = Once::new();
        AT_EXIT.call_once(|| {
            // SAFETY: atexit stores a plain function pointer; the handler
            // takes no arguments, does not unwind (it never panics: a
            // poisoned lock is taken over) and only waits on a condvar.
            unsafe { libc::atexit(wait_for_writes_at_exit) };
        });
        *PENDING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) += 1;
        Pending {
            store,
            identity,
            keep,
        }
    }

    /// Write (or remove) the file on the process's file lane, a thread of
    /// its own: not behind the sockets that one-shot applies leave to close
    /// (`netns::drop_in_background`), whose closes can each wait an RCU
    /// grace period, so that the next apply in the namespace finds the file.
    pub fn write_in_background(self) {
        static FILES: crate::netns::BackgroundDropper =
            crate::netns::BackgroundDropper::new("netleash-file");
        FILES.drop(self);
    }

    fn finish(&mut self) {
        let outcome = match self.keep.take() {
            Some((snapshot, new)) => self.store.keep(&self.identity, &snapshot, new),
            None => {
                self.store.forget(&self.identity);
                Ok(())
            }
        };
        if let Err(err) = outcome {
            tracing::debug!("the table this apply verified is not kept for the next: {err}");
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish();
        let mut pending = PENDING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *pending -= 1;
        PENDING_DONE.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::attributes::{ExprData, ParsedExpr, Reference};
    use crate::kernel::readback::{KernelChain, KernelRule, KernelSet};

    fn identity() -> Identity {
        Identity {
            cookie: 0x1234,
            boot_id: "boot-a".into(),
        }
    }

    fn table(elements: usize) -> KernelTable {
        let raw: Vec<RawElement> = (0..elements)
            .flat_map(|i| {
                let start = (0x0a00_0000u32 + (i as u32) * 4).to_be_bytes().to_vec();
                let end = (0x0a00_0000u32 + (i as u32) * 4 + 2).to_be_bytes().to_vec();
                [
                    RawElement {
                        key: start,
                        key_end: None,
                        interval_end: false,
                        timeout_ms: None,
                        expiration_ms: None,
                    },
                    RawElement {
                        key: end,
                        key_end: None,
                        interval_end: true,
                        timeout_ms: None,
                        expiration_ms: None,
                    },
                ]
            })
            .collect();
        KernelTable {
            digest: Some("sha256:abc".into()),
            generation_comment: Some("shape sha256:def staged sha256:abc".into()),
            generation: Some(3),
            sets: vec![KernelSet {
                name: "allow_v4".into(),
                kernel_name: "allow_v4.g2".into(),
                flags: 0x7,
                key_type: 7,
                key_len: 4,
                elements: raw,
                elements_read: true,
                verified_as: Some(crate::ruleset::Set {
                    name: "allow_v4".into(),
                    key: crate::ruleset::SetKey::Addr(crate::ruleset::Family::V4),
                    role: crate::ruleset::SetRole::StaticAllow,
                    interval: true,
                    timeout: false,
                    elements: vec![crate::ruleset::Element::AddrProtoPort(
                        "10.0.0.0/30".parse().unwrap(),
                        crate::policy::Proto::Tcp,
                        443,
                    )],
                }),
            }],
            chains: vec![KernelChain {
                name: "egress".into(),
                kernel_name: "egress.g3".into(),
                hook: None,
                priority: None,
                policy: None,
                chain_type: None,
                comment: Some("sha256:abc".into()),
                rules: vec![KernelRule {
                    id: Some("allow-1".into()),
                    digest: None,
                    handle: 42,
                    expressions: vec![ParsedExpr {
                        name: "lookup".into(),
                        counter: Some((1, 2)),
                        reference: Some(Reference::Set("allow_v4.g2".into())),
                        data: ExprData::Lookup {
                            sreg: 1,
                            dreg: None,
                            flags: 0,
                            anonymous: None,
                        },
                    }],
                }],
            }],
            leftover_sets: vec![],
            leftover_chains: vec![],
        }
    }

    fn snapshot(elements: usize) -> Snapshot {
        Snapshot {
            genid: 77,
            table: Some(table(elements)),
        }
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::at(dir.path().join("last-apply"));
        (dir, store)
    }

    #[test]
    fn a_kept_table_is_recalled_as_it_was() {
        let (_dir, store) = store();
        assert!(store.recall(&identity()).unwrap().is_none());
        store.keep(&identity(), &snapshot(10), true).unwrap();
        assert_eq!(store.recall(&identity()).unwrap(), Some(snapshot(10)));
        let mode = fs::metadata(&store.dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        let mode = fs::metadata(store.file(&identity())).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn elements_round_trip() {
        let cases = [
            RawElement {
                key: vec![10, 0, 0, 1],
                key_end: None,
                interval_end: false,
                timeout_ms: None,
                expiration_ms: None,
            },
            RawElement {
                key: vec![10, 0, 0, 0, 6, 0, 0, 0, 1, 187, 0, 0],
                key_end: Some(vec![10, 0, 0, 3, 6, 0, 0, 0, 1, 187, 0, 0]),
                interval_end: false,
                timeout_ms: Some(30_000),
                expiration_ms: Some(29_123),
            },
            RawElement {
                key: vec![],
                key_end: Some(vec![]),
                interval_end: true,
                timeout_ms: None,
                expiration_ms: Some(0),
            },
        ];
        for element in cases {
            let bytes = postcard::to_stdvec(&element).unwrap();
            let back: RawElement = postcard::from_bytes(&bytes).unwrap();
            assert_eq!(back, element);
        }
        // An IPv4 range's end: one length byte, four key bytes, three flags.
        let end = RawElement {
            key: vec![10, 0, 0, 4],
            key_end: None,
            interval_end: true,
            timeout_ms: None,
            expiration_ms: None,
        };
        assert_eq!(
            postcard::to_stdvec(&end).unwrap(),
            [4, 10, 0, 0, 4, 0, 1, 0, 0]
        );
    }

    /// Write a file for `identity` at `genid`, as a writer of `format`
    /// and `version` would.
    fn write_raw(store: &Store, identity: &Identity, header: Header, body: &[u8]) {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&store.dir)
            .unwrap();
        let mut bytes = postcard::to_stdvec(&header).unwrap();
        bytes.extend_from_slice(body);
        fs::write(store.file(identity), bytes).unwrap();
    }

    fn header(body: &[u8]) -> Header {
        Header {
            format: FORMAT,
            netleash: VERSION.into(),
            boot_id: identity().boot_id,
            netns_cookie: identity().cookie,
            genid: 77,
            sha256: Sha256::digest(body).into(),
        }
    }

    /// `file` under `identity()`'s name is not used, and removed.
    fn assert_refused(store: &Store, header: Header, body: &[u8], why: &str) {
        write_raw(store, &identity(), header, body);
        let err = store.recall(&identity()).unwrap_err();
        assert!(err.to_string().contains(why), "{err}");
        assert!(!store.file(&identity()).exists(), "{why}: not removed");
        assert!(store.recall(&identity()).unwrap().is_none());
    }

    #[test]
    fn a_file_of_another_version_boot_or_namespace_is_not_used_and_removed() {
        let (_dir, store) = store();
        let body = postcard::to_stdvec(&table(3)).unwrap();
        // The good one is used (so what follows fails for its one difference).
        write_raw(&store, &identity(), header(&body), &body);
        assert_eq!(store.recall(&identity()).unwrap(), Some(snapshot(3)));
        let cases = [
            (
                Header {
                    format: FORMAT + 1,
                    ..header(&body)
                },
                "in format",
            ),
            (
                Header {
                    netleash: "0.0.0-other".into(),
                    ..header(&body)
                },
                "by netleash 0.0.0-other",
            ),
            (
                Header {
                    boot_id: "boot-b".into(),
                    ..header(&body)
                },
                "in another boot",
            ),
            (
                Header {
                    netns_cookie: 0x1235,
                    ..header(&body)
                },
                "another network namespace",
            ),
            (
                Header {
                    genid: 0,
                    ..header(&body)
                },
                "generation id 0",
            ),
        ];
        for (header, why) in cases {
            assert_refused(&store, header, &body, why);
        }
    }

    #[test]
    fn a_corrupt_or_truncated_file_is_not_used_and_removed() {
        let (_dir, store) = store();
        store.keep(&identity(), &snapshot(10), true).unwrap();
        let whole = fs::read(store.file(&identity())).unwrap();
        let body_len = postcard::to_stdvec(&table(10)).unwrap().len();
        let header_len = whole.len() - body_len;
        // Cut in the table, cut in the header, one byte of an element changed.
        let cut_body = whole[..whole.len() - 7].to_vec();
        let cut_header = whole[..header_len / 2].to_vec();
        let mut flipped = whole.clone();
        let at = header_len
            + whole[header_len..]
                .windows(5)
                .position(|w| w == [4, 10, 0, 0, 4])
                .unwrap();
        flipped[at + 4] = 5;
        for (bytes, why) in [
            (cut_body, "checksum"),
            (cut_header, "header"),
            (flipped, "checksum"),
            (vec![], "header"),
        ] {
            fs::write(store.file(&identity()), &bytes).unwrap();
            let err = store.recall(&identity()).unwrap_err();
            assert!(err.to_string().contains(why), "{why}: {err}");
            assert!(!store.file(&identity()).exists());
        }
        // A body with a valid checksum that is not a table is refused too.
        let body = [1, 200, 200, 200, 200, 200];
        assert_refused(&store, header(&body), &body, "table:");
    }

    #[test]
    fn a_directory_others_can_enter_is_not_used() {
        let (_dir, store) = store();
        store.keep(&identity(), &snapshot(1), true).unwrap();
        fs::set_permissions(
            &store.dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let err = store.recall(&identity()).unwrap_err();
        assert!(matches!(err, Error::Unsafe { .. }), "{err}");
        assert!(store.keep(&identity(), &snapshot(1), false).is_err());
    }

    #[test]
    fn generation_id_zero_and_a_missing_table_are_not_kept() {
        let (_dir, store) = store();
        store.keep(&identity(), &snapshot(1), true).unwrap();
        let zero = Snapshot {
            genid: 0,
            ..snapshot(1)
        };
        store.keep(&identity(), &zero, false).unwrap();
        assert!(!store.file(&identity()).exists());
        store.keep(&identity(), &snapshot(1), true).unwrap();
        let none = Snapshot {
            genid: 5,
            table: None,
        };
        store.keep(&identity(), &none, false).unwrap();
        assert!(!store.file(&identity()).exists());
    }

    #[test]
    fn a_table_whose_file_would_exceed_max_bytes_is_not_kept() {
        let (_dir, store) = store();
        // 15,000 ranges (30,000 elements, about 270 KiB) are kept.
        store.keep(&identity(), &snapshot(15_000), true).unwrap();
        let size = fs::metadata(store.file(&identity())).unwrap().len() as usize;
        assert!(size > MAX_BYTES / 2 && size <= MAX_BYTES, "{size}");
        assert_eq!(store.recall(&identity()).unwrap(), Some(snapshot(15_000)));
        // 23,000 ranges encode to more than MAX_BYTES: the old file goes too.
        const { assert!(2 * 23_000 <= MAX_BYTES / MIN_ELEMENT_BYTES) };
        store.keep(&identity(), &snapshot(23_000), false).unwrap();
        assert!(!store.file(&identity()).exists());
        // 25,000 ranges are more elements than MAX_BYTES can hold: not encoded.
        const { assert!(2 * 25_000 > MAX_BYTES / MIN_ELEMENT_BYTES) };
        store.keep(&identity(), &snapshot(15_000), true).unwrap();
        store.keep(&identity(), &snapshot(25_000), false).unwrap();
        assert!(!store.file(&identity()).exists());
    }

    #[test]
    fn the_directory_keeps_at_most_max_files_and_the_newest_namespaces() {
        let (_dir, store) = store();
        let small = snapshot(0);
        let of = |cookie: u64| Identity {
            cookie,
            ..identity()
        };
        for cookie in 1..=MAX_FILES as u64 {
            store.keep(&of(cookie), &small, true).unwrap();
        }
        // A stray temporary file of a writer that died.
        fs::write(store.dir.join(".0000000000000003.99.0.tmp"), b"x").unwrap();
        let count = || fs::read_dir(&store.dir).unwrap().count();
        assert_eq!(count(), MAX_FILES + 1);
        // Rewriting a namespace's file does not prune.
        store.keep(&of(1), &small, false).unwrap();
        assert_eq!(count(), MAX_FILES + 1);
        // A new namespace's file does: the older half goes, the temporary too.
        let newest = MAX_FILES as u64 + 1;
        store.keep(&of(newest), &small, true).unwrap();
        let files = MAX_FILES + 1;
        assert_eq!(count(), files - files / 2);
        assert!(store.recall(&of(1)).unwrap().is_none());
        assert!(store.recall(&of(newest)).unwrap().is_some());
        assert!(store.recall(&of(newest - 1)).unwrap().is_some());
    }

    #[test]
    fn the_identity_of_a_namespace_is_the_same_each_time() {
        let here = Identity::here().expect("SO_NETNS_COOKIE (Linux 5.14)");
        assert_eq!(Identity::here().unwrap(), here);
        assert_eq!(here.boot_id.len(), 36, "{}", here.boot_id);
    }
}
