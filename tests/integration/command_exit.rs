//! A short-lived command that changed nf_tables (`netleash apply`) leaves
//! the closing of its nf_tables sockets to a child that outlives it
//! (`netns::close_sockets_after_exit`): closing such a socket waits for the
//! kernel to free what a commit replaced (one RCU grace period). That child
//! must hold nothing else of the command: a caller reading the command's
//! output (a shell, an OCI runtime running the hook) sees the end of it as
//! soon as the command has exited. Needs root; fails without it.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};

use crate::support::{testbed, write_policy};

const FIRST: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "203.0.113.0/28"]}"#;
const SECOND: &str = r#"{"type": "limited", "allowed_hosts": ["198.51.100.10", "203.0.113.16/28", "[2001:db8::7]:443"]}"#;

/// Everything left in `pipe` once its writers are gone, or an error naming
/// `what` if a writer still holds it open: the read end is non-blocking, so
/// an open write end shows as EAGAIN instead of end of file.
fn drain_closed(mut pipe: impl std::io::Read + AsRawFd, what: &str) -> String {
    // SAFETY: fcntl on a descriptor `pipe` owns for this whole function.
    let flags = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_GETFL) };
    assert!(flags >= 0, "F_GETFL on {what}");
    // SAFETY: as above; adds O_NONBLOCK to the flags just read.
    let set = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) };
    assert_eq!(set, 0, "F_SETFL on {what}");
    let mut text = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match pipe.read(&mut buffer) {
            Ok(0) => return String::from_utf8_lossy(&text).into_owned(),
            Ok(read) => text.extend_from_slice(&buffer[..read]),
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => panic!(
                "{what} is still open after the command exited ({err}): a process it left \
                 behind holds it; read so far: {}",
                String::from_utf8_lossy(&text)
            ),
        }
    }
}

#[test]
fn a_reapply_leaves_its_sockets_to_a_child_that_holds_nothing_else() {
    // The testbed's sandbox namespace (deleted with the testbed, also on a
    // panic); no packet is sent.
    let bed = testbed();
    let ns = bed.sandbox();
    let dir = tempfile::tempdir().unwrap();
    let first = write_policy(dir.path(), "first.json", FIRST);
    let second = write_policy(dir.path(), "second.json", SECOND);
    for (round, policy) in [&first, &second, &first].into_iter().enumerate() {
        let mut child = Command::new(env!("CARGO_BIN_EXE_netleash"))
            .args(["apply", policy.to_str().unwrap(), "--netns", ns])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run netleash");
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        // The outputs are a few lines: the pipes' buffers hold them, so the
        // command cannot block on a full pipe before it exits.
        let status = child.wait().unwrap();
        let out = drain_closed(stdout, "the command's standard output");
        let err = drain_closed(stderr, "the command's standard error");
        assert!(status.success(), "round {round}: {status}\n{out}{err}");
        // A re-apply replaced a generation: the kernel had something to free
        // when the sockets were closed.
        let expected = if round == 0 {
            "created the table"
        } else {
            "swapped generation"
        };
        assert!(out.contains(expected), "round {round}: {out}{err}");
    }
    // The sockets the commands left behind were closed: the table is what
    // the last apply put in force, and the namespace takes further changes.
    let status = Command::new(env!("CARGO_BIN_EXE_netleash"))
        .args(["status", "--netns", ns])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(status.status.success(), "{text}");
    let removed = Command::new(env!("CARGO_BIN_EXE_netleash"))
        .args(["remove", "--netns", ns])
        .output()
        .unwrap();
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
}
