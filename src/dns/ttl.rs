//! How long a learned address stays in a set, when a name is looked up again,
//! and how long last-known addresses survive an upstream outage.
//!
//! The kernel side of this is `flags timeout` on the DNS sets: every learned
//! element carries its own timeout and the kernel deletes it when that runs
//! out (nf_tables set GC). So "forgetting" an address never needs an action:
//! an address that is not refreshed expires by itself. That is also why a
//! timeout must never be shorter than the time a client may still legitimately
//! connect to the address it was just given.

use std::time::{Duration, Instant};

/// The shortest time an address stays allowed, whatever the answer's TTL.
///
/// A TTL of 0 means "do not cache" (RFC 1035 §3.2.1, RFC 2181 §8), but the
/// client that asked still connects to the address right after it got the
/// answer, and retries (TCP SYN retransmits at 1 s, 3 s, ...; happy-eyeballs
/// fallbacks) follow within seconds. 30 s covers a connect with its retries
/// and keeps the resolver loop from refreshing a TTL-0 name in a busy loop.
pub const MIN_TTL: Duration = Duration::from_secs(30);

/// The longest time an address stays allowed on one answer.
///
/// CDNs move names between addresses far more often than their TTLs (often a
/// day or more) suggest; an address the name no longer points to may belong to
/// another customer of the same CDN soon. One hour bounds how long a stale
/// address stays reachable, and the resolver loop refreshes well before it.
pub const MAX_TTL: Duration = Duration::from_secs(3_600);

/// Added to every element's timeout after clamping.
///
/// The client may connect at the very end of the TTL (its own cache is
/// allowed to serve the answer until the TTL runs out), and the refresh of the
/// resolver loop needs time to complete. Without a grace period an element
/// could expire between the client's cache hit and its SYN.
pub const GRACE: Duration = Duration::from_secs(60);

/// A refresh is scheduled at a random point in this fraction of the clamped
/// TTL: early enough that a slow or retried upstream query completes before
/// the elements expire (the grace period is the second safety margin), late
/// enough not to waste queries. The randomness spreads the refreshes of names
/// that were resolved together, so they do not hit the upstream in bursts.
pub const REFRESH_WINDOW: (f64, f64) = (0.70, 0.85);

/// First retry delay after an upstream failure.
pub const BACKOFF_INITIAL: Duration = Duration::from_secs(1);

/// Longest retry delay after repeated upstream failures. Short enough that a
/// name recovers within minutes after the upstream comes back.
pub const BACKOFF_MAX: Duration = Duration::from_secs(120);

/// How long after its answer expired a last-known address is still kept
/// (re-programmed on every failed retry) while the upstream does not answer.
///
/// RFC 8767 §5 (serving stale data) suggests a maximum stale timer of 1 to 3
/// days; netleash takes the low end because a stale address of a CDN may be
/// reused for another customer. During an outage shorter than this, the sets
/// never lose a working address; after it, they drain and connections fail
/// closed.
pub const STALE_LIMIT: Duration = Duration::from_secs(24 * 3_600);

/// How long to wait before looking again at a name that has no address of a
/// type (NODATA/NXDOMAIN) when the answer carries no SOA to say (RFC 2308 §5).
pub const NEGATIVE_TTL_DEFAULT: Duration = Duration::from_secs(300);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "invalid TTL policy: the minimum TTL ({min:?}) must be positive and not above the maximum ({max:?})"
    )]
    Bounds { min: Duration, max: Duration },
}

/// The TTL policy. [`TtlPolicy::default`] is the documented constants above;
/// tests shorten them to observe expiry and refreshes in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TtlPolicy {
    pub min_ttl: Duration,
    pub max_ttl: Duration,
    pub grace: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub stale_limit: Duration,
    pub negative_ttl_default: Duration,
}

impl Default for TtlPolicy {
    fn default() -> Self {
        TtlPolicy {
            min_ttl: MIN_TTL,
            max_ttl: MAX_TTL,
            grace: GRACE,
            backoff_initial: BACKOFF_INITIAL,
            backoff_max: BACKOFF_MAX,
            stale_limit: STALE_LIMIT,
            negative_ttl_default: NEGATIVE_TTL_DEFAULT,
        }
    }
}

impl TtlPolicy {
    /// Checks the invariants the other methods rely on.
    pub fn validate(&self) -> Result<(), Error> {
        if self.min_ttl.is_zero() || self.min_ttl > self.max_ttl {
            return Err(Error::Bounds {
                min: self.min_ttl,
                max: self.max_ttl,
            });
        }
        Ok(())
    }

    /// The answer's TTL clamped to `[min_ttl, max_ttl]`.
    pub fn clamp(&self, ttl: Duration) -> Duration {
        ttl.clamp(self.min_ttl, self.max_ttl)
    }

    /// The timeout of a set element learned from an answer with this TTL.
    pub fn element_timeout(&self, ttl: Duration) -> Duration {
        self.clamp(ttl) + self.grace
    }

    /// When to look a name up again after an answer with this TTL;
    /// `jitter` in `[0, 1)` picks the point inside [`REFRESH_WINDOW`].
    pub fn refresh_after(&self, ttl: Duration, jitter: f64) -> Duration {
        let (low, high) = REFRESH_WINDOW;
        self.clamp(ttl)
            .mul_f64(low + (high - low) * jitter.clamp(0.0, 1.0))
    }

    /// Whether a cached answer with `remaining` TTL is due for a refresh (it
    /// is inside the refresh window), so the resolver loop asks the upstream
    /// instead of taking it.
    pub fn due_for_refresh(&self, remaining: Duration, ttl: Duration) -> bool {
        remaining <= self.clamp(ttl).mul_f64(1.0 - REFRESH_WINDOW.1)
    }

    /// Delay before retry number `failures` (1 for the first retry):
    /// `backoff_initial * 2^(failures-1)`, capped at `backoff_max`, with
    /// "equal jitter" (half fixed, half random) so retries of many names that
    /// failed together spread out without ever retrying immediately.
    pub fn backoff(&self, failures: u32, jitter: f64) -> Duration {
        let exponent = failures.saturating_sub(1).min(20);
        let base = self
            .backoff_initial
            .saturating_mul(1 << exponent)
            .min(self.backoff_max);
        base.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    /// Until when the last-known addresses of an answer that expired at
    /// `expired_at` may still be kept while the upstream fails.
    pub fn stale_deadline(&self, expired_at: Instant) -> Instant {
        expired_at + self.stale_limit
    }

    /// The timeout to re-program a last-known address with after a failed
    /// refresh: long enough to survive until the next retry (plus the grace
    /// period for the retry itself), never past the stale deadline.
    pub fn stale_timeout(
        &self,
        next_retry: Duration,
        now: Instant,
        deadline: Instant,
    ) -> Option<Duration> {
        let left = deadline
            .checked_duration_since(now)
            .filter(|d| !d.is_zero())?;
        Some((next_retry + self.grace).min(left))
    }

    /// How long to wait before looking again at a name with no address of a
    /// type, given the negative TTL of the answer (RFC 2308) if it had one.
    pub fn negative_recheck(&self, negative_ttl: Option<Duration>, jitter: f64) -> Duration {
        self.refresh_after(negative_ttl.unwrap_or(self.negative_ttl_default), jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn ttl_zero_is_raised_to_the_minimum_plus_grace() {
        let policy = TtlPolicy::default();
        assert_eq!(policy.element_timeout(S(0)), MIN_TTL + GRACE);
        assert_eq!(policy.element_timeout(S(0)), S(90));
    }

    #[test]
    fn huge_ttl_is_capped_at_the_maximum_plus_grace() {
        let policy = TtlPolicy::default();
        assert_eq!(policy.element_timeout(S(7 * 86_400)), MAX_TTL + GRACE);
        assert_eq!(
            policy.element_timeout(Duration::from_secs(u64::from(u32::MAX))),
            S(3_660)
        );
    }

    #[test]
    fn ttl_inside_the_bounds_is_kept() {
        let policy = TtlPolicy::default();
        assert_eq!(policy.element_timeout(S(300)), S(360));
        assert_eq!(policy.clamp(S(30)), S(30));
        assert_eq!(policy.clamp(S(3_600)), S(3_600));
    }

    #[test]
    fn refresh_happens_inside_the_window_and_before_expiry() {
        let policy = TtlPolicy::default();
        for jitter in [0.0, 0.25, 0.5, 0.99, 1.0] {
            for ttl in [0, 1, 30, 300, 3_600, 86_400] {
                let refresh = policy.refresh_after(S(ttl), jitter);
                let clamped = policy.clamp(S(ttl));
                assert!(
                    refresh >= clamped.mul_f64(0.70) && refresh <= clamped.mul_f64(0.85),
                    "{ttl} {jitter}"
                );
                assert!(refresh < policy.element_timeout(S(ttl)));
            }
        }
        assert_eq!(policy.refresh_after(S(100), 0.0), S(70));
        assert_eq!(policy.refresh_after(S(100), 1.0), S(85));
    }

    #[test]
    fn refresh_due_only_at_the_end_of_the_ttl() {
        let policy = TtlPolicy::default();
        assert!(!policy.due_for_refresh(S(290), S(300)));
        assert!(!policy.due_for_refresh(S(46), S(300)));
        assert!(policy.due_for_refresh(S(45), S(300)));
        assert!(policy.due_for_refresh(S(0), S(300)));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let policy = TtlPolicy::default();
        assert_eq!(policy.backoff(1, 1.0), S(1));
        assert_eq!(policy.backoff(2, 1.0), S(2));
        assert_eq!(policy.backoff(3, 1.0), S(4));
        assert_eq!(policy.backoff(8, 1.0), S(120));
        assert_eq!(policy.backoff(1_000, 1.0), S(120));
        assert_eq!(policy.backoff(3, 0.0), S(2));
        assert_eq!(policy.backoff(0, 1.0), S(1));
    }

    #[test]
    fn stale_addresses_are_kept_until_the_deadline_only() {
        let policy = TtlPolicy::default();
        let expired = Instant::now();
        let deadline = policy.stale_deadline(expired);
        assert_eq!(deadline - expired, S(86_400));
        assert_eq!(policy.stale_timeout(S(4), expired, deadline), Some(S(64)));
        let almost = deadline - S(10);
        assert_eq!(policy.stale_timeout(S(4), almost, deadline), Some(S(10)));
        assert_eq!(policy.stale_timeout(S(4), deadline, deadline), None);
        assert_eq!(policy.stale_timeout(S(4), deadline + S(1), deadline), None);
    }

    #[test]
    fn negative_answers_are_rechecked_after_their_soa_ttl_or_the_default() {
        let policy = TtlPolicy::default();
        assert_eq!(policy.negative_recheck(None, 0.0), S(210));
        assert_eq!(policy.negative_recheck(Some(S(100)), 0.0), S(70));
    }

    #[test]
    fn inverted_bounds_are_rejected() {
        let policy = TtlPolicy {
            min_ttl: S(10),
            max_ttl: S(5),
            ..TtlPolicy::default()
        };
        assert!(policy.validate().is_err());
        let policy = TtlPolicy {
            min_ttl: S(0),
            ..TtlPolicy::default()
        };
        assert!(policy.validate().is_err());
        assert!(TtlPolicy::default().validate().is_ok());
    }
}
