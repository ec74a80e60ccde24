//! Where an apply spends its time: one trace event per phase, with the
//! microseconds since the phase before it on the same thread.
//!
//! The events go to the target [`TARGET`] at trace level, so they cost one
//! check of a cached callsite interest when that level is off (the default).
//! `NETLEASH_LOG=netleash::kernel::phases=trace netleash apply …` prints them;
//! the apply benchmark's `--phases` collects them over many applies and
//! reports the median of each phase (docs/benchmarks.md).
//!
//! An apply runs on one thread from start to end (a one-shot apply visits
//! the namespace on the calling thread, `netns::visit`), so the clock is
//! per thread: [`begin`] starts it, and every [`mark`] reports the time since
//! the previous mark (or the beginning) and restarts it.

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

/// End the phase `phase`: report the microseconds since the previous mark
/// or [`begin`], and start the next phase. Nothing is reported on a thread
/// whose clock was not started.
pub fn mark(phase: &'static str) {
    if !listened() {
        return;
    }
    let now = Instant::now();
    if let Some(before) = LAST.with(|last| last.replace(Some(now))) {
        let micros = now.duration_since(before).as_secs_f64() * 1e6;
        tracing::trace!(target: TARGET, phase, micros, "apply phase");
    }
}
