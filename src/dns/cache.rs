//! The answer cache shared by the proxies of all sandboxes and the resolver
//! loop, so that one upstream lookup per name and type per TTL serves them
//! all.
//!
//! An entry is an upstream answer for one (name, type) together with the
//! addresses extracted from it. It lives exactly as long as the answer's
//! smallest TTL (RFC 2181 §5.2, §8): answers with TTL 0 are never stored
//! (RFC 1035 §3.2.1). Served answers get their TTLs lowered by the time spent
//! in the cache (RFC 1035 §7.4). Only positive answers are stored; negative
//! answers are cheap to ask again and must not hide a name that just appeared.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use hickory_proto::op::Message;
use hickory_proto::rr::RecordType;

use crate::dns::answer::AnswerAddress;

/// Default number of entries. One entry is one answer (a few hundred bytes to
/// a few KiB); 10,000 covers every exact name of large policies plus the
/// wildcard children a fleet of sandboxes asks for, in a few MiB.
pub const CACHE_CAPACITY: usize = 10_000;

/// What an entry answers. `dnssec_ok` is part of the key because an answer to
/// a query with the DO bit carries RRSIGs a query without it must not get
/// (RFC 4035 §3.2.1).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    /// Normalized (see `names::normalize_query_name`).
    pub name: String,
    pub record_type: RecordType,
    pub dnssec_ok: bool,
}

#[derive(Debug, Clone)]
pub struct CachedAnswer {
    /// The upstream's answer as received (header, all sections, no OPT).
    pub message: Arc<Message>,
    /// The addresses extracted for the queried name, TTLs as received.
    pub addresses: Arc<[AnswerAddress]>,
    /// The answer's lifetime in the cache: its smallest TTL, in seconds.
    pub ttl: u32,
    pub stored: Instant,
}

impl CachedAnswer {
    pub fn new(message: Message, addresses: Vec<AnswerAddress>, ttl: u32, stored: Instant) -> Self {
        CachedAnswer {
            message: Arc::new(message),
            addresses: addresses.into(),
            ttl,
            stored,
        }
    }

    fn elapsed_secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.stored).as_secs()).unwrap_or(u32::MAX)
    }

    /// How long this answer may still be served.
    pub fn remaining(&self, now: Instant) -> Duration {
        (self.stored + Duration::from_secs(u64::from(self.ttl))).saturating_duration_since(now)
    }

    /// The addresses with their TTLs lowered by the time spent in the cache.
    pub fn addresses_at(&self, now: Instant) -> Vec<AnswerAddress> {
        let elapsed = self.elapsed_secs(now);
        self.addresses
            .iter()
            .map(|a| AnswerAddress {
                addr: a.addr,
                ttl: a.ttl.saturating_sub(elapsed),
            })
            .collect()
    }

    /// The message with every record's TTL lowered by the time spent in the
    /// cache (RFC 1035 §7.4: a cached RR is served with its remaining TTL).
    pub fn message_at(&self, now: Instant) -> Message {
        let elapsed = self.elapsed_secs(now);
        let mut message = Message::clone(&self.message);
        for record in message
            .answers
            .iter_mut()
            .chain(message.authorities.iter_mut())
            .chain(message.additionals.iter_mut())
        {
            record.decrement_ttl(elapsed);
        }
        message
    }
}

/// A thread-safe, bounded answer cache. Cheap to share (`Arc`).
#[derive(Debug)]
pub struct AnswerCache {
    entries: Mutex<HashMap<CacheKey, CachedAnswer>>,
    capacity: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// Counters for status and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
}

impl Default for AnswerCache {
    fn default() -> Self {
        AnswerCache::new(CACHE_CAPACITY)
    }
}

impl AnswerCache {
    pub fn new(capacity: usize) -> Self {
        AnswerCache {
            entries: Mutex::new(HashMap::new()),
            capacity: capacity.max(1),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The entry for `key` if it has not expired at `now`.
    pub fn get(&self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        let found = self
            .lock()
            .get(key)
            .filter(|entry| !entry.remaining(now).is_zero())
            .cloned();
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores an answer; one with TTL 0 is not stored. When the cache is
    /// full, expired entries go first, then the entry closest to expiry (it
    /// is the least valuable: it would be asked again soonest anyway).
    pub fn insert(&self, key: CacheKey, answer: CachedAnswer) {
        if answer.ttl == 0 {
            return;
        }
        let now = answer.stored;
        let mut entries = self.lock();
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, entry| !entry.remaining(now).is_zero());
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, entry)| entry.remaining(now))
                    .map(|(k, _)| k.clone());
                if let Some(soonest) = soonest {
                    entries.remove(&soonest);
                }
            }
        }
        entries.insert(key, answer);
    }

    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.lock().len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<CacheKey, CachedAnswer>> {
        // Every critical section leaves the map consistent; a panic elsewhere
        // while holding it cannot corrupt it, so poisoning is ignored.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::OpCode;

    use super::*;
    use crate::dns::answer::tests::a;

    fn key(name: &str) -> CacheKey {
        CacheKey {
            name: name.into(),
            record_type: RecordType::A,
            dnssec_ok: false,
        }
    }

    fn answer(ttl: u32, stored: Instant) -> CachedAnswer {
        let mut message = Message::response(1, OpCode::Query);
        message.add_answer(a("x.org.", ttl, [192, 0, 2, 1]));
        let addresses = vec![AnswerAddress {
            addr: "192.0.2.1".parse().unwrap(),
            ttl,
        }];
        CachedAnswer::new(message, addresses, ttl, stored)
    }

    #[test]
    fn entries_live_for_their_ttl_with_ttls_counting_down() {
        let cache = AnswerCache::new(10);
        let t0 = Instant::now();
        cache.insert(key("x.org"), answer(60, t0));
        let later = t0 + Duration::from_secs(45);
        let hit = cache.get(&key("x.org"), later).expect("fresh entry");
        assert_eq!(hit.remaining(later), Duration::from_secs(15));
        assert_eq!(hit.addresses_at(later)[0].ttl, 15);
        assert_eq!(hit.message_at(later).answers[0].ttl, 15);
        assert!(
            cache
                .get(&key("x.org"), t0 + Duration::from_secs(60))
                .is_none()
        );
        assert!(cache.get(&key("y.org"), t0).is_none());
        assert_eq!(
            cache.stats(),
            CacheStats {
                entries: 1,
                hits: 1,
                misses: 2
            }
        );
    }

    #[test]
    fn ttl_zero_is_never_stored() {
        let cache = AnswerCache::new(10);
        cache.insert(key("x.org"), answer(0, Instant::now()));
        assert_eq!(cache.stats().entries, 0);
    }

    #[test]
    fn a_full_cache_drops_expired_then_soonest_expiring_entries() {
        let cache = AnswerCache::new(2);
        let t0 = Instant::now();
        cache.insert(key("short.org"), answer(10, t0));
        cache.insert(key("long.org"), answer(1_000, t0));
        cache.insert(key("new.org"), answer(500, t0 + Duration::from_secs(1)));
        let now = t0 + Duration::from_secs(2);
        assert!(cache.get(&key("short.org"), now).is_none());
        assert!(cache.get(&key("long.org"), now).is_some());
        assert!(cache.get(&key("new.org"), now).is_some());
        assert_eq!(cache.stats().entries, 2);
    }
}
