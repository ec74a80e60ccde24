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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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
    stored_answer: Arc<StoredAnswer>,
    /// The answer's lifetime in the cache: its smallest TTL, in seconds.
    pub ttl: u32,
    pub stored: Instant,
}

/// The parts of an entry shared by every copy handed out by [`AnswerCache::get`].
#[derive(Debug)]
struct StoredAnswer {
    /// The upstream's answer as received (header, all sections, no OPT).
    message: Message,
    /// The addresses extracted for the queried name, TTLs as received.
    addresses: Box<[AnswerAddress]>,
    /// The answer in wire form for replies to hits, built at the first hit
    /// (entries the resolver loop stores and nobody asks for never pay for
    /// it); `None` if it could not be built, and hits are encoded in full.
    reply: OnceLock<Option<ReplyTemplate>>,
}

impl CachedAnswer {
    pub fn new(message: Message, addresses: Vec<AnswerAddress>, ttl: u32, stored: Instant) -> Self {
        CachedAnswer {
            stored_answer: Arc::new(StoredAnswer {
                message,
                addresses: addresses.into(),
                reply: OnceLock::new(),
            }),
            ttl,
            stored,
        }
    }

    /// Whole seconds spent in the cache at `now`.
    pub fn elapsed_secs(&self, now: Instant) -> u32 {
        u32::try_from(now.saturating_duration_since(self.stored).as_secs()).unwrap_or(u32::MAX)
    }

    /// How long this answer may still be served.
    pub fn remaining(&self, now: Instant) -> Duration {
        (self.stored + Duration::from_secs(u64::from(self.ttl))).saturating_duration_since(now)
    }

    /// The addresses with their TTLs lowered by the time spent in the cache.
    pub fn addresses_at(&self, now: Instant) -> Vec<AnswerAddress> {
        let elapsed = self.elapsed_secs(now);
        self.stored_answer
            .addresses
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
        let mut message = self.stored_answer.message.clone();
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

    /// The reply template of this answer, built by `build` from the stored
    /// message on the first call (for every copy of the entry).
    pub fn reply_template(
        &self,
        build: impl FnOnce(&Message) -> Option<ReplyTemplate>,
    ) -> Option<&ReplyTemplate> {
        self.stored_answer
            .reply
            .get_or_init(|| build(&self.stored_answer.message))
            .as_ref()
    }
}

/// The DNS header's length (RFC 1035 §4.1.1).
const HEADER_LEN: usize = 12;
/// The RD bit in the header's third byte (RFC 1035 §4.1.1).
const RD_BIT: u8 = 0x01;

/// A cached answer encoded once, as the reply to a query with the entry's own
/// question, id 0, RD clear and no OPT record. The reply to a hit is this
/// with the client's id, RD bit and question bytes put in, every record's TTL
/// lowered by the entry's age, and an OPT record appended if the client sent
/// one: the same message as encoding the reply in full, at the cost of a copy.
///
/// The client's question has the same length as the template's (same labels,
/// letter case aside), so every offset after it, compression pointers
/// included (RFC 1035 §4.1.4), stays valid. A pointer into the question then
/// reads the client's letter case, as the question itself does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyTemplate {
    wire: Box<[u8]>,
    /// Where the question (name, type, class) ends.
    question_end: usize,
    /// Where each record's TTL field starts, all sections in order.
    ttl_offsets: Box<[usize]>,
}

impl ReplyTemplate {
    /// Indexes an encoded reply with one question. `None` if it is not one
    /// (more or fewer questions, a record running past the end or bytes
    /// after the last record).
    pub fn new(wire: Vec<u8>) -> Option<Self> {
        let count = |at: usize| usize::from(u16::from_be_bytes([wire[at], wire[at + 1]]));
        if wire.len() < HEADER_LEN || count(4) != 1 {
            return None;
        }
        let records = count(6) + count(8) + count(10);
        let question_end = skip_name(&wire, HEADER_LEN)? + 4;
        let mut at = question_end;
        let mut ttl_offsets = Vec::with_capacity(records);
        for _ in 0..records {
            // NAME, then TYPE (2), CLASS (2), TTL (4), RDLENGTH (2), RDATA.
            let ttl_at = skip_name(&wire, at)? + 4;
            let rdata_at = ttl_at + 6;
            if rdata_at > wire.len() {
                return None;
            }
            ttl_offsets.push(ttl_at);
            at = rdata_at + count(ttl_at + 4);
        }
        if at != wire.len() {
            return None;
        }
        Some(ReplyTemplate {
            wire: wire.into(),
            question_end,
            ttl_offsets: ttl_offsets.into(),
        })
    }

    /// The question as encoded: name, type and class.
    pub fn question(&self) -> &[u8] {
        &self.wire[HEADER_LEN..self.question_end]
    }

    /// The reply's length, without an OPT record.
    pub fn len(&self) -> usize {
        self.wire.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wire.is_empty()
    }

    /// The reply to a query with `id`, RD bit `recursion_desired` and the
    /// encoded `question` (which must have the template's length), `elapsed`
    /// seconds after the answer was stored, with `opt` (an encoded OPT
    /// record) appended to the additional section.
    pub fn reply(
        &self,
        id: u16,
        recursion_desired: bool,
        question: &[u8],
        elapsed: u32,
        opt: Option<&[u8]>,
    ) -> Vec<u8> {
        assert_eq!(question.len(), self.question().len(), "question length");
        let mut reply = Vec::with_capacity(self.wire.len() + opt.map_or(0, <[u8]>::len));
        reply.extend_from_slice(&id.to_be_bytes());
        reply.extend_from_slice(&self.wire[2..HEADER_LEN]);
        if recursion_desired {
            reply[2] |= RD_BIT;
        }
        reply.extend_from_slice(question);
        reply.extend_from_slice(&self.wire[self.question_end..]);
        for &at in &*self.ttl_offsets {
            let field: [u8; 4] = reply[at..at + 4].try_into().expect("4 bytes");
            let ttl = u32::from_be_bytes(field).saturating_sub(elapsed);
            reply[at..at + 4].copy_from_slice(&ttl.to_be_bytes());
        }
        if let Some(opt) = opt {
            let additionals = u16::from_be_bytes([reply[10], reply[11]]) + 1;
            reply[10..12].copy_from_slice(&additionals.to_be_bytes());
            reply.extend_from_slice(opt);
        }
        reply
    }
}

/// The offset after the encoded name at `at`: labels ending with the root
/// label or a compression pointer (RFC 1035 §4.1.4). `None` if it runs past
/// the end or uses a reserved label type.
fn skip_name(wire: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let length = *wire.get(at)?;
        match length & 0xC0 {
            0x00 if length == 0 => return Some(at + 1),
            0x00 => at += 1 + usize::from(length),
            0xC0 => return (at + 2 <= wire.len()).then_some(at + 2),
            _ => return None,
        }
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
        let found = self.find(key, now);
        if found.is_none() {
            self.misses.fetch_add(1, Ordering::Relaxed);
        }
        found
    }

    /// Like [`AnswerCache::get`], but a miss is not counted: for a first
    /// look whose caller, on a miss, goes on to [`AnswerCache::get`] the
    /// same key (which counts it).
    pub fn get_counting_hits(&self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        self.find(key, now)
    }

    fn find(&self, key: &CacheKey, now: Instant) -> Option<CachedAnswer> {
        let found = self
            .lock()
            .get(key)
            .filter(|entry| !entry.remaining(now).is_zero())
            .cloned();
        if found.is_some() {
            self.hits.fetch_add(1, Ordering::Relaxed);
        }
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
    use hickory_proto::rr::Name;

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
    fn a_reply_template_indexes_every_ttl_and_rejects_what_it_cannot_patch() {
        let t0 = Instant::now();
        let entry = answer(300, t0);
        let mut message = entry.message_at(t0);
        message.add_query(hickory_proto::op::Query::query(
            Name::from_ascii("x.org.").unwrap(),
            RecordType::A,
        ));
        message.add_additional(a("ns.x.org.", 20, [192, 0, 2, 53]));
        let wire = message.to_vec().unwrap();
        let template = ReplyTemplate::new(wire.clone()).expect("a template");
        assert_eq!(template.len(), wire.len());
        let question = template.question().to_vec();
        assert_eq!(question.len(), "x.org.".len() + 1 + 4);
        // 30 s later: 300 → 270, 20 → 0; RD set, id and OPT put in.
        let opt = [0, 0, 41, 4, 208, 0, 0, 0, 0, 0, 0];
        let reply = template.reply(0xabcd, true, &question, 30, Some(&opt));
        let decoded = Message::from_vec(&reply).unwrap();
        assert_eq!(decoded.metadata.id, 0xabcd);
        assert!(decoded.metadata.recursion_desired);
        assert_eq!(decoded.answers[0].ttl, 270);
        assert_eq!(decoded.additionals[0].ttl, 0);
        assert!(decoded.edns.is_some());
        // Not one question, bytes after the last record, a record cut short.
        let mut two_questions = wire.clone();
        two_questions[5] = 2;
        assert!(ReplyTemplate::new(two_questions).is_none());
        let mut trailing = wire.clone();
        trailing.push(0);
        assert!(ReplyTemplate::new(trailing).is_none());
        assert!(ReplyTemplate::new(wire[..wire.len() - 1].to_vec()).is_none());
        assert!(ReplyTemplate::new(wire[..5].to_vec()).is_none());
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
