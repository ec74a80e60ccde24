//! Where an apply spends its time: one trace event per phase, with the
//! whole microseconds since the phase before it on the same thread.
//!
//! The events go to the target [`TARGET`] at trace level, so they cost one
//! check of a cached callsite interest when that level is off (the default).
//! `NETLEASH_LOG=netleash::kernel::phases=trace netleash apply …` prints them;
//! the apply benchmark's `--phases` collects them over many applies and
//! reports the median of each phase (docs/benchmarks.md).
//!
//! An apply runs on one thread from start to end (a one-shot apply visits
//! the namespace on the calling thread, `netns::visit`), so the clock is
//! per thread: [`begin`] starts it, every [`mark`] reports the time since
//! the previous mark (or the beginning) and restarts it, and [`end`] stops
//! it, so that the transactions a thread commits outside an apply (DNS
//! element updates) report nothing.

use std::cell::Cell;
use std::time::Instant;

/// The tracing target of the phase events.
pub const TARGET: &str = "netleash::kernel::phases";

thread_local! {
    /// When the current phase on this thread began; `None` outside an apply.
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// Whether anyone listens for phase events (one cached callsite check).
fn listened() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::TRACE)
}

/// Start the phase clock of this thread (the beginning of an apply).
pub fn begin() {
    if listened() {
        LAST.with(|last| last.set(Some(Instant::now())));
    }
}

/// Stop the phase clock of this thread (the end of an apply).
pub fn end() {
    LAST.with(|last| last.set(None));
}

/// End the phase `phase`: report the microseconds since the previous mark
/// or [`begin`], and start the next phase. Nothing is reported on a thread
/// whose clock was not started.
pub fn mark(phase: &'static str) {
    if !listened() {
        return;
    }
    let now = Instant::now();
    if let Some(before) = LAST.with(|last| last.replace(Some(now))) {
        let micros = u64::try_from(now.duration_since(before).as_micros()).unwrap_or(u64::MAX);
        tracing::trace!(target: TARGET, phase, micros, "apply phase");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// The text of the phase events logged while `work` runs.
    fn logged(work: impl FnOnce()) -> String {
        let text = Arc::new(Mutex::new(Vec::<u8>::new()));
        let sink = Arc::clone(&text);
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter(format!("{TARGET}=trace"))
            .with_ansi(false)
            .without_time()
            .with_writer(move || Writer(Arc::clone(&sink)))
            .finish();
        tracing::subscriber::with_default(subscriber, work);
        String::from_utf8(text.lock().unwrap().clone()).unwrap()
    }

    struct Writer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Writer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn each_mark_reports_its_phase_between_begin_and_end() {
        let text = logged(|| {
            begin();
            mark("first");
            std::thread::sleep(std::time::Duration::from_millis(2));
            mark("second");
            end();
            mark("after the end");
        });
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].contains(r#"phase="first""#), "{text}");
        assert!(lines[1].contains(r#"phase="second""#), "{text}");
        // The second phase lasted the 2 ms pause at least.
        let micros: u64 = lines[1]
            .split("micros=")
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no micros in {:?}", lines[1]));
        assert!(micros >= 2_000, "{micros}");
    }

    #[test]
    fn nothing_is_reported_without_a_begin_or_a_listener() {
        // A fresh thread: its clock was never started.
        let text = std::thread::spawn(|| logged(|| mark("orphan")))
            .join()
            .unwrap();
        assert_eq!(text, "");
        // No listener: begin does not start the clock, so a mark under a
        // listener afterwards reports nothing either.
        let text = std::thread::spawn(|| {
            begin();
            logged(|| mark("unheard"))
        })
        .join()
        .unwrap();
        assert_eq!(text, "");
    }
}
