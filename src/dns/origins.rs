//! Which allowed name each learned address came from, so that a denied
//! connection can be logged with the hostname its address was resolved from.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// Default number of addresses remembered. At [`super::answer::MAX_ADDRESSES_PER_NAME`]
/// addresses per name this holds 2,000 fully-used names; in practice (a few
/// addresses per name) tens of thousands. About 100 bytes per entry.
pub const ORIGINS_CAPACITY: usize = 65_536;

#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    /// Matches the newest queue slot of this address.
    generation: u64,
}

#[derive(Debug, Default)]
struct Inner {
    by_address: HashMap<IpAddr, Entry>,
    /// Addresses in the order they were last recorded, oldest first; a slot
    /// whose generation is no longer the entry's is a leftover of an earlier
    /// recording and is skipped.
    order: VecDeque<(IpAddr, u64)>,
    next_generation: u64,
}

/// A bounded map address → the name it was last learned for. When full, the
/// address recorded longest ago is dropped first.
#[derive(Debug)]
pub struct AddressOrigins {
    inner: Mutex<Inner>,
    capacity: usize,
}

impl Default for AddressOrigins {
    fn default() -> Self {
        AddressOrigins::new(ORIGINS_CAPACITY)
    }
}

impl AddressOrigins {
    pub fn new(capacity: usize) -> Self {
        AddressOrigins {
            inner: Mutex::new(Inner::default()),
            capacity: capacity.max(1),
        }
    }

    /// Records that `addresses` were learned for `name`.
    pub fn record(&self, name: &str, addresses: impl IntoIterator<Item = IpAddr>) {
        let name: Arc<str> = Arc::from(name);
        let mut inner = self.lock();
        for addr in addresses {
            let generation = inner.next_generation;
            inner.next_generation += 1;
            inner.by_address.insert(
                addr,
                Entry {
                    name: name.clone(),
                    generation,
                },
            );
            inner.order.push_back((addr, generation));
            while inner.by_address.len() > self.capacity {
                let Some((oldest, generation)) = inner.order.pop_front() else {
                    break;
                };
                if inner
                    .by_address
                    .get(&oldest)
                    .is_some_and(|e| e.generation == generation)
                {
                    inner.by_address.remove(&oldest);
                }
            }
            // Re-recorded addresses leave stale slots behind; drop them once
            // they outnumber the live ones so the queue stays bounded.
            if inner.order.len() > 2 * self.capacity {
                let Inner {
                    by_address, order, ..
                } = &mut *inner;
                order.retain(|(addr, generation)| {
                    by_address
                        .get(addr)
                        .is_some_and(|e| e.generation == *generation)
                });
            }
        }
    }

    /// The name `addr` was last learned for.
    pub fn name_of(&self, addr: IpAddr) -> Option<Arc<str>> {
        self.lock()
            .by_address
            .get(&addr)
            .map(|entry| entry.name.clone())
    }

    pub fn len(&self) -> usize {
        self.lock().by_address.len()
    }

    /// How many distinct names the remembered addresses were learned for.
    pub fn name_count(&self) -> usize {
        let inner = self.lock();
        let names: std::collections::HashSet<&str> =
            inner.by_address.values().map(|e| &*e.name).collect();
        names.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the maps consistent; poisoning is ignored.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn the_latest_name_of_an_address_wins() {
        let origins = AddressOrigins::new(10);
        origins.record("a.org", [ip(1), ip(2)]);
        origins.record("b.org", [ip(2)]);
        assert_eq!(origins.name_of(ip(1)).as_deref(), Some("a.org"));
        assert_eq!(origins.name_of(ip(2)).as_deref(), Some("b.org"));
        assert_eq!(origins.name_of(ip(3)), None);
        assert_eq!(origins.name_count(), 2);
    }

    #[test]
    fn the_oldest_recording_is_dropped_when_full() {
        let origins = AddressOrigins::new(2);
        origins.record("a.org", [ip(1)]);
        origins.record("b.org", [ip(2)]);
        origins.record("a.org", [ip(1)]); // ip(1) is now newer than ip(2)
        origins.record("c.org", [ip(3)]);
        assert_eq!(origins.len(), 2);
        assert_eq!(origins.name_of(ip(2)), None);
        assert_eq!(origins.name_of(ip(1)).as_deref(), Some("a.org"));
        assert_eq!(origins.name_of(ip(3)).as_deref(), Some("c.org"));
    }

    #[test]
    fn re_recording_does_not_grow_the_queue_without_bound() {
        let origins = AddressOrigins::new(4);
        for _ in 0..1_000 {
            origins.record("a.org", [ip(1), ip(2)]);
        }
        assert_eq!(origins.len(), 2);
        assert!(origins.lock().order.len() <= 8);
    }
}
