//! Threads that enter a named network namespace.
//!
//! setns(2) with CLONE_NEWNET changes the network namespace of the calling
//! thread only, and is allowed in a multithreaded process (unlike
//! CLONE_NEWUSER or CLONE_NEWNS). A socket belongs to the namespace its
//! creating thread was in at socket(2) time, for its whole life. Threads
//! spawned by a thread inherit its namespaces (clone(2) copies the nsproxy).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::thread;

use super::Error;

/// Where `ip netns add NAME` bind-mounts a namespace.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

/// Move the calling thread into the network namespace at `path`.
pub(super) fn enter(path: &Path) -> Result<(), Error> {
    let enter_error = |source| Error::EnterNetns {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(enter_error)?;
    // SAFETY: setns(2) reads only the descriptor, which `file` keeps open for
    // the duration of the call; with CLONE_NEWNET it changes the network
    // namespace of this thread alone, which owns no sockets yet that could be
    // confused by the change.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(enter_error(std::io::Error::last_os_error()))
    }
}

/// Run `work` on a new thread inside the named network namespace and wait for
/// it. The caller's thread never changes namespace. A panic in `work` is
/// resumed on the caller's thread, so a failed assertion inside reads as one.
pub fn run_in_netns<T: Send, F: FnOnce() -> T + Send>(netns: &str, work: F) -> Result<T, Error> {
    let path = netns_path(netns);
    thread::scope(|scope| {
        let handle = thread::Builder::new()
            .name(format!("in-{netns}"))
            .spawn_scoped(scope, move || {
                enter(&path)?;
                Ok(work())
            })
            .map_err(|source| Error::Thread {
                netns: netns.to_string(),
                source,
            })?;
        match handle.join() {
            Ok(result) => result,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
