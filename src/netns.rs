//! Run work inside a network namespace without changing the caller's own.
//!
//! A network namespace is entered with `setns(fd, CLONE_NEWNET)` by one
//! thread: namespaces are a property of a thread (task), so the rest of the
//! process never leaves its own namespace (setns(2): "CLONE_NEWNET ... the
//! calling thread"). Either a fresh thread that exists only for that piece
//! of work enters ([`run_in`]), so the calling thread never moves, or the
//! calling thread enters and goes back before the call returns ([`visit`],
//! which aborts the process rather than leave a thread in a sandbox's
//! namespace). A socket keeps the namespace it was created in for its
//! whole life (socket(7), network_namespaces(7)), so a socket opened through
//! [`run_in`] or [`visit`] can be used from any thread afterwards: this is
//! how one process serves many sandboxes.

use std::fmt;
use std::fs::File;
use std::io;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

/// Where `ip netns add NAME` mounts its namespaces (iproute2 `NETNS_RUN_DIR`).
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// A network namespace to act in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A name under /run/netns (as `ip netns add NAME` creates).
    Name(String),
    /// A path to a namespace file (a bind mount or /proc/PID/ns/net).
    Path(PathBuf),
    /// The network namespace of a process: /proc/PID/ns/net.
    Pid(u32),
}

impl Target {
    /// The namespace file this target names. Fails only for a name that
    /// cannot be a file name under /run/netns.
    pub fn path(&self) -> Result<PathBuf, Error> {
        match self {
            Target::Name(name) => {
                // iproute2 refuses the same names: they would escape /run/netns.
                if name.is_empty()
                    || name == "."
                    || name == ".."
                    || name.contains('/')
                    || name.contains('\0')
                {
                    return Err(Error::InvalidName { name: name.clone() });
                }
                Ok(Path::new(NETNS_RUN_DIR).join(name))
            }
            Target::Path(path) => Ok(path.clone()),
            Target::Pid(pid) => Ok(PathBuf::from(format!("/proc/{pid}/ns/net"))),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Name(name) => write!(f, "network namespace {name:?}"),
            Target::Path(path) => write!(f, "network namespace {}", path.display()),
            Target::Pid(pid) => write!(f, "network namespace of process {pid}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "{name:?} is not a valid network namespace name: it must be a file name under {NETNS_RUN_DIR} \
         (no '/', not '.' or '..'); give a path with --netns /path/to/ns instead"
    )]
    InvalidName { name: String },
    #[error(
        "network namespace {name:?} does not exist ({path} is missing); list the namespaces with \
         `ip netns list`, or create it with `ip netns add {name}`"
    )]
    NoSuchName { name: String, path: PathBuf },
    #[error("process {pid} does not exist ({path} is missing); list processes with `ps -e`")]
    NoSuchProcess { pid: u32, path: PathBuf },
    #[error("namespace file {path} does not exist; list named namespaces with `ip netns list`")]
    NoSuchPath { path: PathBuf },
    #[error("cannot open namespace file {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a network namespace (setns refused it with EINVAL)")]
    NotNetworkNamespace { path: PathBuf },
    #[error("cannot enter the network namespace {path} (entering needs CAP_SYS_ADMIN)")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start a thread to work in the network namespace {path}")]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the work in the network namespace {path} panicked: {message}")]
    Panicked { path: PathBuf, message: String },
    #[error("cannot open a socket in the network namespace {path}")]
    Socket {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Open the namespace file of `target`, with errors that say how to find a valid one.
fn open(target: &Target) -> Result<(PathBuf, File), Error> {
    let path = target.path()?;
    match File::open(&path) {
        Ok(file) => Ok((path, file)),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Err(match target {
            Target::Name(name) => Error::NoSuchName {
                name: name.clone(),
                path,
            },
            Target::Pid(pid) => Error::NoSuchProcess { pid: *pid, path },
            Target::Path(_) => Error::NoSuchPath { path },
        }),
        Err(source) => Err(Error::Open { path, source }),
    }
}

/// Run `f` on a new thread that has entered `target`'s network namespace and
/// return its result. The calling thread's namespace is never changed; the
/// worker thread ends with `f`, so no thread is ever left in the wrong namespace.
/// A caller that is already in that namespace (see [`enter_for_good`]) runs
/// `f` itself: no thread is needed to be there.
pub fn run_in<T: Send>(target: &Target, f: impl FnOnce() -> T + Send) -> Result<T, Error> {
    let (path, file) = open(target)?;
    if is_callers_namespace(&file) {
        return Ok(f());
    }
    let thread_path = path.clone();
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("netleash-netns".into())
            .spawn_scoped(scope, move || -> Result<T, Error> {
                enter(&file, &thread_path)?;
                Ok(f())
            })
            .map_err(|source| Error::Spawn {
                path: path.clone(),
                source,
            })?;
        worker.join().map_err(|panic| Error::Panicked {
            path: path.clone(),
            message: panic_message(&panic),
        })
    })?
}

/// Run `work` on the calling thread inside `target`'s network namespace (a
/// [`visit`]: the thread goes back into its own namespace before this
/// returns), and hand the second of its two results (what the work leaves
/// behind, e.g. a socket) to [`drop_in_background`]: the caller does not wait
/// for that clean-up. For one-shot work whose clean-up blocks: closing a
/// netfilter socket shortly after a commit waits for an RCU grace period
/// (see `kernel::Session::close_in_background`).
///
/// No thread is started: a thread's start and end (stack, guard page,
/// signal stack, two context switches) cost a cold one-shot apply about
/// 80 µs more than the two `setns` calls of a visit (measured: 140–150 µs
/// against 55–62 µs, each after a 20 ms pause).
///
/// A panic in `work` is caught (after the thread went back) and returned as
/// [`Error::Panicked`].
pub fn visit_then_drop<T, L: Send + 'static>(
    target: &Target,
    work: impl FnOnce() -> (T, L),
) -> Result<T, Error> {
    let path = target.path()?;
    let outcome = visit(target, || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work))
    })?;
    match outcome {
        Ok((result, leftover)) => {
            drop_in_background(leftover);
            Ok(result)
        }
        Err(panic) => Err(Error::Panicked {
            path,
            message: panic_message(&panic),
        }),
    }
}

/// How many values may wait for the background dropper before a value is
/// dropped on a thread of its own instead: each netfilter socket's close can
/// wait one RCU grace period (about 10 ms), so a burst of one-shot applies
/// would otherwise hold a queue of open sockets.
const DROPS_QUEUED_AT_MOST: usize = 8;

/// A lane of background drops: one thread, started at the first use, that
/// drops what it is sent in order, and the number of values sent and not
/// yet dropped. Separate lanes keep quick drops (a file written) from
/// waiting behind slow ones (a socket closed).
pub struct BackgroundDropper {
    name: &'static str,
    lane: std::sync::OnceLock<Option<DropLane>>,
}

struct DropLane {
    queue: mpsc::Sender<Box<dyn Send>>,
    queued: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

/// The lane that closes sockets ([`drop_in_background`]).
static SOCKETS: BackgroundDropper = BackgroundDropper::new("netleash-drop");

impl BackgroundDropper {
    /// A lane whose thread is named `name`.
    pub const fn new(name: &'static str) -> BackgroundDropper {
        BackgroundDropper {
            name,
            lane: std::sync::OnceLock::new(),
        }
    }

    /// Drop `value` on another thread, without the caller waiting: this
    /// lane's thread, or, when it has [`DROPS_QUEUED_AT_MOST`] values
    /// waiting already, a thread of its own. If no thread can be started,
    /// `value` is dropped here. The threads are detached: if the process
    /// exits first, the kernel closes what they still hold.
    pub fn drop<L: Send + 'static>(&self, value: L) {
        use std::sync::atomic::Ordering;
        let lane = self.lane.get_or_init(|| {
            let (queue, values) = mpsc::channel::<Box<dyn Send>>();
            let queued = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let done = queued.clone();
            std::thread::Builder::new()
                .name(self.name.into())
                .spawn(move || {
                    run_as_batch();
                    for value in values {
                        drop(value);
                        done.fetch_sub(1, Ordering::Release);
                    }
                })
                .ok()
                .map(|_| DropLane { queue, queued })
        });
        let value = match lane {
            Some(lane) if lane.queued.fetch_add(1, Ordering::AcqRel) < DROPS_QUEUED_AT_MOST => {
                match lane.queue.send(Box::new(value)) {
                    Ok(()) => return,
                    Err(mpsc::SendError(value)) => {
                        lane.queued.fetch_sub(1, Ordering::Release);
                        value
                    }
                }
            }
            Some(lane) => {
                lane.queued.fetch_sub(1, Ordering::Release);
                Box::new(value)
            }
            None => Box::new(value),
        };
        // Busy or gone: a thread of its own, or (none can be started) right here.
        let _ = std::thread::Builder::new()
            .name(self.name.into())
            .spawn(move || {
                run_as_batch();
                drop(value)
            });
    }
}

/// Make the calling thread `SCHED_BATCH`: the scheduler never lets a batch
/// thread preempt the thread that woke it (Linux's fair class skips wake-up
/// preemption for any policy but `SCHED_NORMAL`), so handing a value to a
/// lane does not put its drop (a file written, a socket closed) in the
/// middle of the apply that handed it over. It still gets its fair share of
/// CPU time. On failure the thread stays as it was.
fn run_as_batch() {
    let parameters = libc::sched_param { sched_priority: 0 };
    // SAFETY: pid 0 is the calling thread (sched_setscheduler(2) acts on a
    // thread id); `parameters` is a valid sched_param that outlives the call.
    let _ = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &parameters) };
}

/// Drop `value` (a socket, or what holds one) on the process's socket lane
/// (see [`BackgroundDropper::drop`]), without the caller waiting. In a
/// process that called [`close_sockets_after_exit`], `value` is kept instead,
/// and its sockets are closed by a child after the process has exited.
pub fn drop_in_background<L: Send + 'static>(value: L) {
    use std::sync::atomic::Ordering;
    if CLOSE_AFTER_EXIT.load(Ordering::Acquire) {
        KEPT_UNTIL_EXIT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .push(Box::new(value));
        return;
    }
    SOCKETS.drop(value);
}

/// Set by [`close_sockets_after_exit`].
static CLOSE_AFTER_EXIT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What [`drop_in_background`] keeps in a process that closes its sockets
/// after exit. A static is never dropped: the values stay open until exit.
static KEPT_UNTIL_EXIT: std::sync::Mutex<Vec<Box<dyn Send>>> = std::sync::Mutex::new(Vec::new());

/// For a short-lived command that changes nf_tables (`netleash apply`,
/// `remove`, the standalone hook): make its nf_tables sockets close after it
/// has exited, so that its caller does not wait for the kernel's clean-up.
///
/// Closing a `NETLINK_NETFILTER` socket (its `NETLINK_URELEASE` notifier,
/// `nft_rcv_nl_event`) flushes nf_tables' destroy work whenever the
/// (system-wide) destroy list is not empty: one RCU grace period, 10–30 ms
/// here, after any commit that deleted or replaced something, in any
/// namespace. A process's exit closes its sockets before its parent learns
/// of the exit, so a re-apply through the command line took about 25 ms
/// where the apply itself took 1 ms (and `nft -f` waits the same way).
///
/// From this call on, [`drop_in_background`] keeps what it is given until
/// exit (or [`close_kept_now`]), and an exit handler first closes every
/// descriptor of the process but its nf_tables sockets (so a caller reading
/// the command's output sees its end at once, and a runtime waiting for a
/// hook's pipes is not held up), then starts a child that inherits the
/// sockets and nothing else, waits until the process has exited (the end of
/// a pipe whose write end the process holds), and exits, closing the
/// sockets. The rules are committed and verified before any of this: only
/// the kernel's freeing of what they replaced is left to the child.
/// Measured (`cargo bench --bench command`): a re-apply through the command
/// line went from 23.7–28.0 ms to 5.0 ms, against 16.6–20.0 ms for `nft -f`.
pub fn close_sockets_after_exit() {
    use std::sync::atomic::Ordering;
    static AT_EXIT: std::sync::Once = std::sync::Once::new();
    AT_EXIT.call_once(|| {
        // SAFETY: atexit stores a plain function pointer; the handler takes
        // no arguments and does not unwind (see `hand_sockets_over`).
        if unsafe { libc::atexit(hand_sockets_over_at_exit) } == 0 {
            CLOSE_AFTER_EXIT.store(true, Ordering::Release);
        }
    });
}

/// Close, here and now, what [`drop_in_background`] kept until exit: for a
/// command whose kernel work left the kernel nothing to free (a table
/// created, nothing replaced), so that closing its sockets waits for
/// nothing of its own, and handing them over would only cost the exit a
/// child. Closing still waits if another process's commit left the kernel
/// something to free a moment ago.
pub fn close_kept_now() {
    let kept = std::mem::take(
        &mut *KEPT_UNTIL_EXIT
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()),
    );
    drop(kept);
}

extern "C" fn hand_sockets_over_at_exit() {
    // Never unwind out of an exit handler: a panic here would abort.
    let _ = std::panic::catch_unwind(hand_sockets_over);
}

/// The exit handler of [`close_sockets_after_exit`]. Runs after the exit
/// handlers registered later (atexit(3) runs them in reverse order), e.g.
/// the last-apply file writes that `netleash apply` waits for, and after
/// Rust has flushed standard output (when `main` returned, or in
/// `std::process::exit`): the process has nothing left to write.
fn hand_sockets_over() {
    let kept = KEPT_UNTIL_EXIT
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if kept.is_empty() {
        return;
    }
    // The process closes everything but its nf_tables sockets first, so the
    // child inherits nothing else: no standard output a caller is reading
    // to its end, no pipe a runtime waits on.
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let descriptors: Vec<libc::c_int> = entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    for fd in descriptors {
        if !is_netfilter_socket(fd) {
            // SAFETY: the process is exiting and has written all it had to
            // (see above); a descriptor that is already closed (the
            // listing's own) fails with EBADF.
            unsafe { libc::close(fd) };
        }
    }
    // The child reads `alive` until the process has exited: the process
    // holds its write end until then.
    let mut alive = [0 as libc::c_int; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(alive.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return;
    }
    let [read_end, write_end] = alive;
    // The child shares the process's memory (CLONE_VM, as posix_spawn's
    // child does) instead of copying it: no page tables to copy, no
    // copy-on-write faults while the process exits, and the memory is
    // unmapped by the child, later. It gets a copy of the descriptor table
    // (no CLONE_FILES), which by now holds the sockets and the pipe only,
    // and is a process of its own (no CLONE_THREAD): the process's exit
    // does not end it. It runs `linger` on a stack of its own that is
    // never freed, and touches nothing else of the process's memory but
    // the two descriptors, which are leaked for it (`Box::leak`).
    const STACK: usize = 64 * 1024;
    // SAFETY: a fresh anonymous mapping; its address is checked below.
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        // No child: the process closes its sockets itself as it exits.
        return;
    }
    let ends: &'static [libc::c_int; 2] = Box::leak(Box::new([read_end, write_end]));
    // SAFETY: `linger` only makes system calls (close, read, exit) on the
    // leaked descriptors, on the stack mapped above (whose top is passed:
    // stacks grow down on every architecture Linux runs netleash on).
    let child = unsafe {
        libc::clone(
            linger,
            stack.cast::<u8>().add(STACK).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            std::ptr::from_ref(ends).cast_mut().cast(),
        )
    };
    if child > 0 {
        // SAFETY: the process's copy of the read end; the write end stays
        // open until the process exits.
        unsafe { libc::close(read_end) };
    }
}

/// The child of [`hand_sockets_over`]: waits until the process has exited
/// (end of file on the pipe, whose write end only the process holds once
/// the child has closed its own copy), then exits, and the kernel closes
/// the sockets it holds.
extern "C" fn linger(ends: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `ends` is the leaked `[read end, write end]` of
    // `hand_sockets_over`, never freed.
    let [read_end, write_end] = unsafe { *ends.cast::<[libc::c_int; 2]>() };
    // SAFETY: closes the child's copy of the write end.
    unsafe { libc::close(write_end) };
    let mut byte = 0u8;
    // SAFETY: reads at most one byte into `byte`, on the child's stack. Any
    // end (end of file, or an error) ends the wait.
    while unsafe { libc::read(read_end, (&raw mut byte).cast(), 1) } > 0 {}
    // SAFETY: ends the child at once (no exit handlers: they are the
    // process's, and it is running them or has run them).
    unsafe { libc::_exit(0) }
}

/// Whether `fd` is an nf_tables (`NETLINK_NETFILTER`) socket.
fn is_netfilter_socket(fd: libc::c_int) -> bool {
    let option = |name| {
        let mut value: libc::c_int = 0;
        let mut length = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `length` bytes into `value`; a
        // descriptor that is no socket fails with ENOTSOCK.
        let result = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&raw mut value).cast(),
                &raw mut length,
            )
        };
        (result == 0).then_some(value)
    };
    option(libc::SO_DOMAIN) == Some(libc::AF_NETLINK)
        && option(libc::SO_PROTOCOL) == Some(libc::NETLINK_NETFILTER)
}

/// Run `f` on the calling thread inside `target`'s network namespace, then
/// move the thread back into its own: no thread is started, so this costs
/// two `setns` calls (microseconds) instead of a thread's start and end.
/// For blocking work on a thread that must not run anything else meanwhile
/// (from async code: inside `tokio::task::block_in_place`). Sockets opened
/// by `f` stay in `target`'s namespace (socket(7)).
///
/// The thread goes back also when `f` panics. If it cannot go back, the
/// process aborts: a thread left in a sandbox's namespace would open the
/// sockets of whatever it runs next there.
pub fn visit<T>(target: &Target, f: impl FnOnce() -> T) -> Result<T, Error> {
    let (path, file) = open(target)?;
    let home = Home::take()?;
    // setns either moves the thread or fails leaving it where it was.
    // Entering the namespace the thread is in already changes nothing, so
    // the two are compared (two fstat calls) only when setns refuses: it
    // needs CAP_SYS_ADMIN, which a visit of one's own namespace must not.
    if let Err(err) = enter(&file, &path) {
        let same = same_namespace(&file, &home.file);
        home.give_back();
        return if same { Ok(f()) } else { Err(err) };
    }
    let _back = GoBack(Some(home));
    Ok(f())
}

thread_local! {
    /// The calling thread's own network namespace, opened at its first
    /// [`visit`] and kept for the next: between visits a thread is in its
    /// own namespace (a visit always goes back, or the process aborts), so
    /// the handle stays true until the thread leaves it for good
    /// ([`enter_for_good`] drops it). Opening it is a procfs path walk,
    /// about 35 µs of a one-shot apply's 1 ms, paid once per thread.
    static HOME: std::cell::RefCell<Option<File>> = const { std::cell::RefCell::new(None) };
    /// Whether the calling thread is inside a [`visit`]: a visit within a
    /// visit must come back to the namespace it started in (the outer
    /// visit's target), not to [`HOME`], so it opens that afresh.
    static VISITING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The namespace a [`visit`] comes back to, taken out of [`HOME`] for the
/// visit's length.
struct Home {
    file: File,
    /// Whether the handle goes back into [`HOME`] after the visit: false
    /// for a visit within a visit.
    kept: bool,
}

impl Home {
    fn take() -> Result<Home, Error> {
        let kept = !VISITING.replace(true);
        let cached = if kept { HOME.take() } else { None };
        let file = match cached {
            Some(file) => file,
            None => File::open(OWN_NAMESPACE).map_err(|source| {
                // No visit after all: VISITING back to what it was.
                VISITING.set(!kept);
                Error::Open {
                    path: PathBuf::from(OWN_NAMESPACE),
                    source,
                }
            })?,
        };
        Ok(Home { file, kept })
    }

    /// End the visit: the handle is kept for the thread's next one.
    fn give_back(self) {
        if self.kept {
            VISITING.set(false);
            HOME.set(Some(self.file));
        }
    }
}

/// Moves the calling thread back into the namespace it holds when dropped.
struct GoBack(Option<Home>);

impl Drop for GoBack {
    fn drop(&mut self) {
        let Some(home) = self.0.take() else { return };
        // SAFETY: the descriptor is owned by `home.file` for the whole call;
        // setns only reads it and changes the calling thread's namespace.
        if unsafe { libc::setns(home.file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!(
                "netleash: cannot move a thread back into its own network namespace ({}); aborting \
                 rather than working in a sandbox's",
                io::Error::last_os_error()
            );
            std::process::abort();
        }
        home.give_back();
    }
}

/// Move the calling thread into `target`'s network namespace for the rest
/// of its life. Only for a short-lived process whose one thread does nothing
/// but work in that namespace before it exits (the OCI hook): work through
/// [`run_in`] then needs no thread of its own.
pub fn enter_for_good(target: &Target) -> Result<(), Error> {
    let (path, file) = open(target)?;
    enter(&file, &path)?;
    // The thread's own namespace is now `target`'s: a handle kept from an
    // earlier visit would take a later visit back to the old one.
    drop(HOME.take());
    Ok(())
}

/// Whether `file` is the calling thread's own network namespace: two
/// namespace files name the same namespace exactly when their device and
/// inode numbers are equal (namespaces(7), "The /proc/[pid]/ns/ directory").
fn is_callers_namespace(file: &File) -> bool {
    File::open(OWN_NAMESPACE).is_ok_and(|own| same_namespace(file, &own))
}

/// The calling thread's own network namespace (`proc_pid_ns(5)`).
const OWN_NAMESPACE: &str = "/proc/thread-self/ns/net";

/// Whether two open namespace files name the same namespace: exactly when
/// their device and inode numbers are equal (namespaces(7), "The
/// /proc/[pid]/ns/ directory"). Two `fstat` calls, no path walk.
fn same_namespace(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt as _;
    match (a.metadata(), b.metadata()) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

/// `ioctl_ns(2)` NS_GET_NSTYPE, `_IO(0xb7, 0x3)`: the type of the namespace
/// an nsfs file refers to, as a `CLONE_NEW*` flag (Linux 4.11).
const NS_GET_NSTYPE: libc::c_ulong = 0xb703;

/// Checks that `file` (opened from `path`) is a network namespace without
/// entering it: one ioctl on the calling thread instead of a thread that
/// enters the namespace. A file that is not a namespace at all fails the
/// ioctl with ENOTTY (`ioctl_ns(2)`); another kind of namespace reports its
/// own `CLONE_NEW*` flag.
pub fn check_network_namespace(file: &File, path: &Path) -> Result<(), Error> {
    // SAFETY: NS_GET_NSTYPE takes no argument and only reads the open
    // file descriptor, which `file` owns for the duration of the call.
    let kind = unsafe { libc::ioctl(file.as_raw_fd(), NS_GET_NSTYPE as _) };
    if kind == libc::CLONE_NEWNET {
        return Ok(());
    }
    let source = io::Error::last_os_error();
    let path = path.to_path_buf();
    Err(
        if kind >= 0 || source.raw_os_error() == Some(libc::ENOTTY) {
            Error::NotNetworkNamespace { path }
        } else {
            Error::Open { path, source }
        },
    )
}

/// Move the calling thread into the namespace `file` (opened from `path`).
/// Only for threads that exist for work in that namespace.
fn enter(file: &File, path: &Path) -> Result<(), Error> {
    // SAFETY: `file` is an open file descriptor, borrowed for the duration
    // of the call; setns only reads it. CLONE_NEWNET makes the
    // kernel check that it refers to a network namespace. setns changes the
    // namespace of the calling thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        let source = io::Error::last_os_error();
        let path = path.to_path_buf();
        return Err(if source.raw_os_error() == Some(libc::EINVAL) {
            Error::NotNetworkNamespace { path }
        } else {
            Error::Enter { path, source }
        });
    }
    Ok(())
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(text) = panic.downcast_ref::<&str>() {
        (*text).to_string()
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text.clone()
    } else {
        "(no message)".to_string()
    }
}

/// What a [`SocketFactory`] opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SocketKind {
    Udp,
    Tcp,
}

/// A request to the factory thread: the socket to open and where the answer goes.
struct SocketRequest {
    family: IpAddr,
    kind: SocketKind,
    mark: Option<u32>,
    reply: mpsc::SyncSender<io::Result<socket2::Socket>>,
}

/// A thread that lives inside one network namespace and opens sockets there
/// on request, for a caller that needs sockets in the namespace often (the
/// sidecar's upstream queries): a channel round trip per socket instead of a
/// thread per socket. The thread ends when the factory is dropped.
#[derive(Debug)]
pub struct SocketFactory {
    requests: mpsc::Sender<SocketRequest>,
    path: PathBuf,
}

impl SocketFactory {
    /// Start the factory thread in `target`; fails if the namespace cannot be entered.
    pub fn start(target: &Target) -> Result<SocketFactory, Error> {
        let (path, file) = open(target)?;
        let (requests, incoming) = mpsc::channel::<SocketRequest>();
        let (ready, entered) = mpsc::sync_channel(1);
        let thread_path = path.clone();
        std::thread::Builder::new()
            .name("netleash-sockets".into())
            .spawn(move || {
                let result = enter(&file, &thread_path);
                let failed = result.is_err();
                let _ = ready.send(result);
                if failed {
                    return;
                }
                for request in incoming {
                    let _ =
                        request
                            .reply
                            .send(new_socket(request.family, request.kind, request.mark));
                }
            })
            .map_err(|source| Error::Spawn {
                path: path.clone(),
                source,
            })?;
        match entered.recv() {
            Ok(result) => result?,
            Err(_) => {
                return Err(Error::Panicked {
                    path,
                    message: "the socket thread ended before entering the namespace".into(),
                });
            }
        }
        Ok(SocketFactory { requests, path })
    }

    /// A new, unbound socket of `kind` for addresses of `family`'s family,
    /// inside the namespace, close-on-exec, with `SO_MARK` set to `mark` if
    /// given (socket(7): the mark is matched by `meta mark` in nftables).
    pub fn open(
        &self,
        family: IpAddr,
        kind: SocketKind,
        mark: Option<u32>,
    ) -> io::Result<socket2::Socket> {
        let gone = || {
            io::Error::other(format!(
                "the socket thread for {} ended",
                self.path.display()
            ))
        };
        let (reply, answer) = mpsc::sync_channel(1);
        self.requests
            .send(SocketRequest {
                family,
                kind,
                mark,
                reply,
            })
            .map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// The namespace file this factory opens sockets in.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

fn new_socket(family: IpAddr, kind: SocketKind, mark: Option<u32>) -> io::Result<socket2::Socket> {
    let domain = match family {
        IpAddr::V4(_) => socket2::Domain::IPV4,
        IpAddr::V6(_) => socket2::Domain::IPV6,
    };
    let (kind, protocol) = match kind {
        SocketKind::Udp => (socket2::Type::DGRAM, socket2::Protocol::UDP),
        SocketKind::Tcp => (socket2::Type::STREAM, socket2::Protocol::TCP),
    };
    // socket2 opens it close-on-exec.
    let socket = socket2::Socket::new(domain, kind, Some(protocol))?;
    if let Some(mark) = mark {
        // SO_MARK needs CAP_NET_ADMIN in the namespace's user namespace (socket(7)).
        socket.set_mark(mark)?;
    }
    Ok(socket)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Values handed to `drop_in_background` are dropped on other threads,
    /// the caller never waits for a drop, and a dropper busy with slow drops
    /// (a socket close can wait an RCU grace period) does not queue more than
    /// `DROPS_QUEUED_AT_MOST`: the rest get threads of their own. Every
    /// thread that drops is `SCHED_BATCH`, so that it never preempts the
    /// thread that handed the value over.
    #[test]
    fn background_drops_never_block_the_caller_and_spill_over_to_more_threads() {
        struct SlowDrop(
            mpsc::Receiver<()>,
            mpsc::Sender<(std::thread::ThreadId, bool, i32)>,
        );
        impl Drop for SlowDrop {
            fn drop(&mut self) {
                let released = self.0.recv_timeout(Duration::from_secs(5)).is_ok();
                // SAFETY: sched_getscheduler only reads the calling thread's policy.
                let policy = unsafe { libc::sched_getscheduler(0) };
                self.1
                    .send((std::thread::current().id(), released, policy))
                    .unwrap();
            }
        }
        let count = DROPS_QUEUED_AT_MOST + 4;
        let (dropped_tx, dropped_rx) = mpsc::channel();
        let mut releases = Vec::new();
        for _ in 0..count {
            let (release, released) = mpsc::channel();
            releases.push(release);
            // A drop on this thread would wait for a release that comes only
            // after the loop, and report that it was not released.
            drop_in_background(SlowDrop(released, dropped_tx.clone()));
        }
        for release in releases {
            release.send(()).unwrap();
        }
        let caller = std::thread::current().id();
        let mut threads = std::collections::BTreeSet::new();
        for _ in 0..count {
            let (thread, released, policy) = dropped_rx
                .recv_timeout(Duration::from_secs(10))
                .expect("every value is dropped");
            assert!(released, "a drop waited for the caller");
            assert_eq!(
                policy,
                libc::SCHED_BATCH,
                "a value was dropped by a thread that can preempt its caller"
            );
            assert_ne!(thread, caller, "a value was dropped by the caller");
            threads.insert(format!("{thread:?}"));
        }
        assert!(
            threads.len() >= 2,
            "{count} slow drops all queued on one thread"
        );
    }

    #[test]
    fn target_paths() {
        assert_eq!(
            Target::Name("sbx-1".into()).path().unwrap(),
            PathBuf::from("/run/netns/sbx-1")
        );
        assert_eq!(
            Target::Pid(42).path().unwrap(),
            PathBuf::from("/proc/42/ns/net")
        );
        assert_eq!(
            Target::Path("/x/y".into()).path().unwrap(),
            PathBuf::from("/x/y")
        );
    }

    /// The device and inode of the calling thread's network namespace.
    fn own_namespace() -> (u64, u64) {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::metadata("/proc/thread-self/ns/net").expect("own namespace");
        (meta.dev(), meta.ino())
    }

    #[test]
    fn a_thread_that_entered_for_good_works_there_itself() {
        // A namespace of its own for a helper thread (unshare(2) needs CAP_SYS_ADMIN).
        let (path_tx, path_rx) = mpsc::channel();
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            // SAFETY: unshare changes only the calling thread's network namespace.
            let rc = unsafe { libc::unshare(libc::CLONE_NEWNET) };
            assert_eq!(
                rc,
                0,
                "unshare: {} (run as root)",
                io::Error::last_os_error()
            );
            let tid = unsafe { libc::gettid() };
            path_tx
                .send((own_namespace(), format!("/proc/self/task/{tid}/ns/net")))
                .unwrap();
            let _ = done_rx.recv();
        });
        let (theirs, path) = path_rx.recv().expect("the holder's namespace");
        assert_ne!(theirs, own_namespace());
        let target = Target::Path(path.into());
        // From elsewhere: on a thread of its own.
        let caller = std::thread::current().id();
        let worker = run_in(&target, || (std::thread::current().id(), own_namespace())).unwrap();
        assert_ne!(worker.0, caller);
        assert_eq!(worker.1, theirs);
        // Work with a clean-up: on the calling thread, which is back home
        // when it has the answer, before the clean-up ends. The leftover's
        // drop waits for the caller to have the answer; if the call waited
        // for the drop instead, the drop times out and says so.
        struct Leftover(
            mpsc::Receiver<()>,
            mpsc::Sender<(std::thread::ThreadId, bool)>,
        );
        impl Drop for Leftover {
            fn drop(&mut self) {
                let answered_first = self.0.recv_timeout(Duration::from_secs(5)).is_ok();
                self.1
                    .send((std::thread::current().id(), answered_first))
                    .unwrap();
            }
        }
        let home = own_namespace();
        let (go_tx, go_rx) = mpsc::channel();
        let (dropped_tx, dropped_rx) = mpsc::channel();
        let answer = visit_then_drop(&target, move || {
            (
                (std::thread::current().id(), own_namespace()),
                Leftover(go_rx, dropped_tx),
            )
        })
        .unwrap();
        assert_eq!(answer, (caller, theirs));
        assert_eq!(own_namespace(), home, "the caller did not go back");
        go_tx.send(()).unwrap();
        let (dropped_on, answered_first) = dropped_rx.recv().expect("the leftover is dropped");
        assert!(answered_first, "the caller waited for the clean-up");
        assert_ne!(dropped_on, caller, "the leftover was dropped by the caller");
        let err = visit_then_drop(&target, || -> ((), ()) { panic!("cleaning up") }).unwrap_err();
        assert!(
            matches!(&err, Error::Panicked { message, .. } if message == "cleaning up"),
            "{err}"
        );
        assert_eq!(own_namespace(), home, "a panicking work did not go back");
        // A visit: on the calling thread, which then is back home.
        let visited = visit(&target, || (std::thread::current().id(), own_namespace())).unwrap();
        assert_eq!(visited, (caller, theirs));
        assert_eq!(own_namespace(), home, "the visit did not go back");
        // Also when the work panics.
        let panicked = std::panic::catch_unwind(|| visit(&target, || panic!("in the namespace")));
        assert!(panicked.is_err());
        assert_eq!(own_namespace(), home, "a panicking visit did not go back");
        // A visit within a visit comes back to the outer visit's namespace,
        // not to the thread's own (which the thread keeps between visits).
        let home_file = File::open(OWN_NAMESPACE).unwrap();
        let home_target = Target::Path(format!("/proc/self/fd/{}", home_file.as_raw_fd()).into());
        let nested = visit(&target, || {
            let inner = visit(&home_target, own_namespace).unwrap();
            (inner, own_namespace())
        })
        .unwrap();
        assert_eq!(
            nested,
            (home, theirs),
            "the inner visit went back elsewhere"
        );
        assert_eq!(own_namespace(), home, "the outer visit did not go back");
        // After entering for good: on the calling thread.
        let entered = std::thread::spawn(move || {
            // A visit first, so that the thread has kept its first home.
            visit(&target, || ()).unwrap();
            enter_for_good(&target).unwrap();
            let me = std::thread::current().id();
            let work = run_in(&target, || (std::thread::current().id(), own_namespace())).unwrap();
            // A visit now comes back to the namespace entered for good.
            let visited = visit(&home_target, own_namespace).unwrap();
            (me, work, visited, own_namespace())
        })
        .join()
        .unwrap();
        assert_eq!(entered.0, entered.1.0, "run_in started a thread");
        assert_eq!(entered.1.1, theirs);
        assert_eq!(entered.2, home);
        assert_eq!(
            entered.3, theirs,
            "a visit went back to the namespace left for good"
        );
        done_tx.send(()).unwrap();
        holder.join().unwrap();
    }

    #[test]
    fn the_namespace_type_is_checked_without_entering() {
        let own = File::open("/proc/thread-self/ns/net").expect("own namespace");
        check_network_namespace(&own, Path::new("/proc/thread-self/ns/net")).unwrap();
        // Another kind of namespace, and a file that is no namespace at all.
        for path in ["/proc/self/ns/uts", "/proc/self/status"] {
            let file = File::open(path).expect(path);
            let err = check_network_namespace(&file, Path::new(path)).unwrap_err();
            assert!(
                matches!(err, Error::NotNetworkNamespace { .. }),
                "{path}: {err}"
            );
        }
    }

    #[test]
    fn names_that_escape_the_run_dir_are_refused() {
        for name in ["", ".", "..", "a/b", "../etc"] {
            let err = Target::Name(name.into()).path().unwrap_err();
            assert!(matches!(err, Error::InvalidName { .. }), "{name:?}: {err}");
        }
    }

    #[test]
    fn a_missing_name_says_how_to_list_namespaces() {
        let err = run_in(&Target::Name("netleash-no-such-namespace".into()), || ()).unwrap_err();
        assert!(matches!(err, Error::NoSuchName { .. }));
        assert!(err.to_string().contains("ip netns list"), "{err}");
    }

    #[test]
    fn a_missing_process_is_named() {
        // Larger than the kernel's PID_MAX_LIMIT (2^22), so never a live process.
        let err = run_in(&Target::Pid(u32::MAX), || ()).unwrap_err();
        assert!(
            matches!(err, Error::NoSuchProcess { pid: u32::MAX, .. }),
            "{err}"
        );
    }

    #[test]
    fn a_file_that_is_not_a_namespace_is_refused() {
        // Entering needs CAP_SYS_ADMIN; as non-root the open or setns fails
        // with EPERM instead, which is also a refusal.
        let err = run_in(&Target::Path("/proc/self/status".into()), || ()).unwrap_err();
        assert!(
            matches!(err, Error::NotNetworkNamespace { .. } | Error::Enter { .. }),
            "{err}"
        );
    }
}
