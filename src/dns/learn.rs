//! The boundary between DNS and the kernel: which set elements an answer
//! yields, and the [`AddressSink`] that writes them into the sets.
//!
//! The DNS layer never talks netlink. The sidecar gives it a sink that adds
//! elements with a timeout to the sandbox's `dns_*` sets; tests give it a
//! [`RecordingSink`].

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use tokio::sync::Semaphore;

use crate::dns::answer::AnswerAddress;
use crate::dns::ttl::TtlPolicy;
use crate::policy::Ports;
use crate::ruleset::{Element, NameBinding};

/// One element to add to a `SetRole::DnsAllow` set, with its timeout.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Learned {
    pub set: String,
    pub element: Element,
    pub timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("adding {count} learned elements to the DNS sets")]
    Learn {
        count: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("removing {count} elements from the DNS sets")]
    Forget {
        count: usize,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// What an [`AddressSink`] returns: a boxed future so that sinks can be used
/// as `Arc<dyn AddressSink>` (one per sandbox) and may await (a netlink
/// round trip on a blocking thread, a gate in a test).
pub type SinkFuture<'a> = Pin<Box<dyn Future<Output = Result<(), Error>> + Send + 'a>>;

/// Where learned addresses go.
///
/// Contract: when the future of [`AddressSink::learn`] resolves to `Ok`, every
/// element of the batch is in its set (so a packet to it sent afterwards is
/// accepted). Adding an element that is already present must leave it with
/// at least the new timeout: refreshed, or kept because its known expiry
/// already reaches as far (within the one-second granularity of TTLs; see
/// `sandbox`). A batch is applied as a whole or not at all.
pub trait AddressSink: Send + Sync {
    fn learn<'a>(&'a self, batch: &'a [Learned]) -> SinkFuture<'a>;

    /// Removes elements before their timeout (a reload that no longer allows
    /// a name). Elements that are not present are ignored.
    fn forget<'a>(&'a self, batch: &'a [(String, Element)]) -> SinkFuture<'a>;
}

/// The set and element an address of a name goes into under one binding:
/// `Ports::Any` → the address (a /32 or /128) in the binding's address set;
/// `Ports::Only` → one `address . proto . port` element per allowed port in
/// its `_ports` set.
pub fn elements_for(binding: &NameBinding, addr: IpAddr) -> Vec<(String, Element)> {
    let net = IpNet::from(addr);
    let set = match addr {
        IpAddr::V4(_) => &binding.set_v4,
        IpAddr::V6(_) => &binding.set_v6,
    };
    match &binding.ports {
        Ports::Any => vec![(set.clone(), Element::Addr(net))],
        Ports::Only(specs) => specs
            .iter()
            .map(|spec| {
                (
                    set.clone(),
                    Element::AddrProtoPort(net, spec.proto, spec.port),
                )
            })
            .collect(),
    }
}

/// Every element the addresses of a name yield under all the bindings that
/// allow it, each with the timeout the TTL policy gives its TTL. An element
/// produced twice (two bindings with the same set) keeps the longer timeout.
/// Sorted by set and element, so batches are deterministic.
pub fn learned_for(
    bindings: &[&NameBinding],
    addresses: &[AnswerAddress],
    policy: &TtlPolicy,
) -> Vec<Learned> {
    let mut batch = LearnedBatch::default();
    for address in addresses {
        let timeout = policy.element_timeout(Duration::from_secs(u64::from(address.ttl)));
        for binding in bindings {
            for (set, element) in elements_for(binding, address.addr) {
                batch.add(set, element, timeout);
            }
        }
    }
    batch.into_sorted()
}

/// Set elements gathered for one write, each once, with the longest timeout
/// it was given: an element produced twice (two bindings with the same set,
/// or two names with the same address) keeps the longer timeout.
#[derive(Debug, Default)]
pub struct LearnedBatch {
    timeouts: HashMap<(String, Element), Duration>,
}

impl LearnedBatch {
    /// Adds `element` of `set` with `timeout`, or lengthens its timeout.
    pub fn add(&mut self, set: String, element: Element, timeout: Duration) {
        let slot = self.timeouts.entry((set, element)).or_insert(timeout);
        *slot = (*slot).max(timeout);
    }

    pub fn is_empty(&self) -> bool {
        self.timeouts.is_empty()
    }

    /// The elements sorted by set and element, so batches are deterministic.
    pub fn into_sorted(self) -> Vec<Learned> {
        let mut batch: Vec<Learned> = self
            .timeouts
            .into_iter()
            .map(|((set, element), timeout)| Learned {
                set,
                element,
                timeout,
            })
            .collect();
        batch.sort_by(|a, b| (&a.set, &a.element).cmp(&(&b.set, &b.element)));
        batch
    }
}

/// One call of [`RecordingSink::learn`].
#[derive(Debug, Clone)]
pub struct LearnCall {
    /// When the batch was in the sets (the moment `learn` resolved).
    pub at: Instant,
    pub batch: Vec<Learned>,
}

#[derive(Debug, Default)]
struct Recorded {
    learned: Vec<LearnCall>,
    forgotten: Vec<(String, Element)>,
}

/// A sink that records what it is given, for tests and dry runs. It can be
/// made to fail, or gated so that every `learn` waits for a release.
#[derive(Debug, Default)]
pub struct RecordingSink {
    recorded: Mutex<Recorded>,
    failing: AtomicBool,
    gate: Option<Arc<Semaphore>>,
}

/// Releases gated `learn` calls of a [`RecordingSink::gated`] sink.
#[derive(Debug, Clone)]
pub struct SinkGate(Arc<Semaphore>);

impl SinkGate {
    /// Lets `calls` pending or future `learn` calls complete.
    pub fn release(&self, calls: usize) {
        self.0.add_permits(calls);
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the recording sink was told to fail")]
struct InjectedFailure;

impl RecordingSink {
    pub fn new() -> Self {
        RecordingSink::default()
    }

    /// A sink whose `learn` calls only complete when released through the gate.
    pub fn gated() -> (Self, SinkGate) {
        let gate = Arc::new(Semaphore::new(0));
        (
            RecordingSink {
                gate: Some(gate.clone()),
                ..RecordingSink::default()
            },
            SinkGate(gate),
        )
    }

    /// Makes every following `learn` fail (and record nothing) or succeed again.
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::SeqCst);
    }

    pub fn calls(&self) -> Vec<LearnCall> {
        self.lock().learned.clone()
    }

    pub fn forgotten(&self) -> Vec<(String, Element)> {
        self.lock().forgotten.clone()
    }

    /// The addresses learned so far (any set), in first-learned order.
    pub fn addresses(&self) -> Vec<IpAddr> {
        let mut seen: Vec<IpAddr> = Vec::new();
        for call in &self.lock().learned {
            for learned in &call.batch {
                let addr = learned.element.net().addr();
                if !seen.contains(&addr) {
                    seen.push(addr);
                }
            }
        }
        seen
    }

    /// The last call that carried an element with address `addr`.
    pub fn last_learned(&self, addr: IpAddr) -> Option<(Instant, Learned)> {
        let recorded = self.lock();
        recorded.learned.iter().rev().find_map(|call| {
            call.batch
                .iter()
                .find(|l| l.element.net().addr() == addr)
                .map(|l| (call.at, l.clone()))
        })
    }

    fn lock(&self) -> MutexGuard<'_, Recorded> {
        // A panic while holding this lock can only come from a test's own
        // assertion; the data is still consistent, so poisoning is ignored.
        self.recorded
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl AddressSink for RecordingSink {
    fn learn<'a>(&'a self, batch: &'a [Learned]) -> SinkFuture<'a> {
        Box::pin(async move {
            if let Some(gate) = &self.gate {
                // The semaphore is never closed, so acquiring cannot fail.
                if let Ok(permit) = gate.acquire().await {
                    permit.forget();
                }
            }
            if self.failing.load(Ordering::SeqCst) {
                return Err(Error::Learn {
                    count: batch.len(),
                    source: Box::new(InjectedFailure),
                });
            }
            self.lock().learned.push(LearnCall {
                at: Instant::now(),
                batch: batch.to_vec(),
            });
            Ok(())
        })
    }

    fn forget<'a>(&'a self, batch: &'a [(String, Element)]) -> SinkFuture<'a> {
        Box::pin(async move {
            self.lock().forgotten.extend_from_slice(batch);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::dns::names::tests::binding;
    use crate::policy::{PortSpec, Proto, Target};

    fn addr(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn any_port_maps_to_one_host_address_per_family() {
        let b = binding(Target::Name("x.org".into()), Ports::Any);
        assert_eq!(
            elements_for(&b, addr("192.0.2.1")),
            vec![(
                "dns_v4".into(),
                Element::Addr("192.0.2.1/32".parse().unwrap())
            )]
        );
        assert_eq!(
            elements_for(&b, addr("2001:db8::1")),
            vec![(
                "dns_v6".into(),
                Element::Addr("2001:db8::1/128".parse().unwrap())
            )]
        );
    }

    #[test]
    fn ported_binding_maps_to_one_element_per_port_spec() {
        let ports = Ports::Only(BTreeSet::from([
            PortSpec {
                proto: Proto::Tcp,
                port: 443,
            },
            PortSpec {
                proto: Proto::Udp,
                port: 443,
            },
            PortSpec {
                proto: Proto::Tcp,
                port: 80,
            },
        ]));
        let b = binding(Target::Name("x.org".into()), ports);
        let net: IpNet = "192.0.2.1/32".parse().unwrap();
        assert_eq!(
            elements_for(&b, addr("192.0.2.1")),
            vec![
                (
                    "dns_v4_ports".into(),
                    Element::AddrProtoPort(net, Proto::Tcp, 80)
                ),
                (
                    "dns_v4_ports".into(),
                    Element::AddrProtoPort(net, Proto::Tcp, 443)
                ),
                (
                    "dns_v4_ports".into(),
                    Element::AddrProtoPort(net, Proto::Udp, 443)
                ),
            ]
        );
    }

    #[test]
    fn learned_batch_spans_all_bindings_with_policy_timeouts() {
        let exact = binding(
            Target::Name("api.x.org".into()),
            Ports::Only(BTreeSet::from([PortSpec {
                proto: Proto::Tcp,
                port: 443,
            }])),
        );
        let wildcard = binding(Target::Wildcard("x.org".into()), Ports::Any);
        let addresses = [
            AnswerAddress {
                addr: addr("192.0.2.1"),
                ttl: 0,
            },
            AnswerAddress {
                addr: addr("2001:db8::1"),
                ttl: 100_000,
            },
        ];
        let batch = learned_for(&[&exact, &wildcard], &addresses, &TtlPolicy::default());
        let got: Vec<(&str, String, u64)> = batch
            .iter()
            .map(|l| {
                (
                    l.set.as_str(),
                    format!("{:?}", l.element),
                    l.timeout.as_secs(),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ("dns_v4", "Addr(192.0.2.1/32)".into(), 90),
                (
                    "dns_v4_ports",
                    "AddrProtoPort(192.0.2.1/32, Tcp, 443)".into(),
                    90
                ),
                ("dns_v6", "Addr(2001:db8::1/128)".into(), 3_660),
                (
                    "dns_v6_ports",
                    "AddrProtoPort(2001:db8::1/128, Tcp, 443)".into(),
                    3_660
                ),
            ]
        );
    }

    #[test]
    fn an_element_produced_twice_keeps_the_longer_timeout() {
        let b = binding(Target::Name("x.org".into()), Ports::Any);
        let addresses = [
            AnswerAddress {
                addr: addr("192.0.2.1"),
                ttl: 40,
            },
            AnswerAddress {
                addr: addr("192.0.2.1"),
                ttl: 400,
            },
        ];
        let batch = learned_for(&[&b, &b], &addresses, &TtlPolicy::default());
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].timeout, Duration::from_secs(460));
    }

    #[tokio::test]
    async fn recording_sink_records_fails_and_gates() {
        let sink = RecordingSink::new();
        let one = [Learned {
            set: "dns_v4".into(),
            element: Element::Addr("192.0.2.1/32".parse().unwrap()),
            timeout: Duration::from_secs(90),
        }];
        sink.learn(&one).await.unwrap();
        assert_eq!(sink.addresses(), vec![addr("192.0.2.1")]);
        sink.set_failing(true);
        assert!(sink.learn(&one).await.is_err());
        assert_eq!(sink.calls().len(), 1);

        let (gated, gate) = RecordingSink::gated();
        let gated = Arc::new(gated);
        let task = tokio::spawn({
            let gated = gated.clone();
            let one = one.clone();
            async move { gated.learn(&one).await.is_ok() }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            gated.calls().is_empty(),
            "a gated learn completes only when released"
        );
        gate.release(1);
        assert!(task.await.unwrap());
        assert_eq!(gated.calls().len(), 1);
    }
}
