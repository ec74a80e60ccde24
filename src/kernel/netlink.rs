//! The netfilter netlink socket: sends one batch as one transaction, maps the
//! kernel's acknowledgements back to the objects of the batch, and runs dumps.
//!
//! How nfnetlink answers a batch (net/netfilter/nfnetlink.c, `nfnetlink_rcv_batch`):
//! every message is processed, its error (or, with `NLM_F_ACK`, its success)
//! is queued, and only after the batch end the transaction is committed (or
//! aborted if any message failed, or if the batch end is missing) and the
//! queued acknowledgements are delivered. All of this happens synchronously
//! inside `sendmsg`, so by the time it returns every answer is waiting in the
//! socket's receive queue. A commit failure is reported against the batch
//! begin message. Since kernel 6.10 batch begin and end are acknowledged too
//! (nftnl then gives them sequence numbers), so an acknowledged batch end
//! proves the kernel saw the whole batch.

use std::collections::BTreeSet;
use std::ffi::CStr;
use std::fmt;
use std::io;
use std::os::fd::AsRawFd;

use nftnl::{Batch, FinalizedBatch, MsgType, NlMsg};

use super::Error;
use super::ffi::{self, ElementOp, Request, SetMsg};

/// One object of a batch, so a kernel error can name what it rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Object {
    Table,
    Set(String),
    Elements(String),
    AnonymousSet {
        chain: String,
        rule: String,
    },
    Chain(String),
    Rule {
        chain: String,
        id: String,
    },
    /// Deleting all rules of a chain (`NFT_MSG_DELRULE` without a handle).
    Flush(String),
    /// Deleting a set or chain, by its name in the kernel.
    Deletion {
        kind: &'static str,
        name: String,
    },
}

impl fmt::Display for Object {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Object::Table => write!(f, "table inet {}", crate::ruleset::TABLE_NAME),
            Object::Set(name) => write!(f, "set {name:?}"),
            Object::Elements(name) => write!(f, "the elements of set {name:?}"),
            Object::AnonymousSet { chain, rule } => {
                write!(f, "the anonymous set of rule {rule:?} in chain {chain:?}")
            }
            Object::Chain(name) => write!(f, "chain {name:?}"),
            Object::Rule { chain, id } => write!(f, "rule {id:?} in chain {chain:?}"),
            Object::Flush(chain) => write!(f, "the removal of the rules of chain {chain:?}"),
            Object::Deletion { kind, name } => write!(f, "the deletion of {kind} {name:?}"),
        }
    }
}

/// A batch under construction, with the object behind every message.
pub struct Transaction {
    batch: Batch,
    objects: Vec<Object>,
    /// The ruleset generation id the transaction was built against, sent as
    /// `NFNL_BATCH_GENID` in the batch begin message: the kernel then refuses
    /// the whole batch with `ERESTART` if any commit happened since
    /// (`nf_tables_valid_genid`, kernel 4.17+), so a transaction built from a
    /// stale reading of the table never applies.
    generation: Option<u32>,
    /// Whether its messages carry `NLM_F_ECHO` (see [`Transaction::echoed`]).
    echo: bool,
    /// The indexes in `objects` of `NFT_MSG_DESTROYSETELEM` messages, which
    /// kernels before 6.3 do not know (see [`kernel_too_old_hint`]).
    destroys: BTreeSet<usize>,
}

impl Default for Transaction {
    fn default() -> Self {
        Self::new()
    }
}

impl Transaction {
    pub fn new() -> Transaction {
        Transaction {
            batch: Batch::new(),
            objects: Vec::new(),
            generation: None,
            echo: false,
            destroys: BTreeSet::new(),
        }
    }

    /// A transaction whose messages ask the kernel to echo what they change
    /// (see [`ffi::WithoutAck`]); [`Netlink::commit_echoed`] returns it.
    pub fn echoed() -> Transaction {
        Transaction {
            echo: true,
            ..Transaction::new()
        }
    }

    /// Have the kernel refuse the transaction unless the ruleset generation
    /// id is still `generation` (see [`Transaction::generation`]). Id 0 means
    /// "no check" to the kernel, so it is never sent.
    pub fn expect_generation(&mut self, generation: u32) {
        self.generation = (generation != 0).then_some(generation);
    }

    /// Add one message. It is sent without `NLM_F_ACK`: the kernel answers
    /// only if it fails (see [`ffi::WithoutAck`]).
    pub fn add(&mut self, message: &impl NlMsg, kind: MsgType, object: Object) {
        self.add_message(message, kind, object, self.echo);
    }

    fn add_message(&mut self, message: &impl NlMsg, kind: MsgType, object: Object, echo: bool) {
        self.batch.add(&ffi::WithoutAck { message, echo }, kind);
        self.objects.push(object);
    }

    /// Add all element messages of `set` (as many as its elements need),
    /// not echoed: the kernel would build one notification per element (at
    /// 10,000 elements, more work than dumping them). See
    /// [`Transaction::add_elements_echoed`] for a few elements, and
    /// [`Transaction::add_new_set_elements`] for a new set's.
    pub fn add_elements(&mut self, set: &SetMsg, op: ElementOp, object: Object) {
        self.add_elements_echoed(set, op, object, false);
    }

    /// [`Transaction::add_elements`], and if `echo` (in an echoed
    /// transaction) the kernel echoes each element it adds or deletes
    /// (`nf_tables_setelem_notify`, one message each, encoded like a
    /// dump's): for the few elements of a set changed in place, whose
    /// verification then composes the set from the elements it held and the
    /// echo instead of dumping it (see `readback::compose`).
    pub fn add_elements_echoed(&mut self, set: &SetMsg, op: ElementOp, object: Object, echo: bool) {
        let echo = echo && self.echo;
        let messages = set.element_messages(op);
        while messages.has_more() {
            if op == ElementOp::Destroy {
                self.destroys.insert(self.objects.len());
            }
            self.add_message(&messages, MsgType::Add, object.clone(), echo);
        }
    }

    /// Add the elements of `set`, a named set this transaction creates, with
    /// `ElementOp::Create`. In an echoed transaction they are echoed when the
    /// set has at most [`ECHOED_ELEMENTS_MAX`] elements: the kernel then
    /// notifies each element it commits (`nf_tables_setelem_notify`, one
    /// message each, encoded like a dump's), and the verification takes the
    /// new set's elements from the echo instead of dumping the set (see
    /// `readback::compose`). A larger set's elements are not echoed.
    pub fn add_new_set_elements(&mut self, set: &SetMsg, object: Object) {
        let echo = self.echo && set.element_count() <= ECHOED_ELEMENTS_MAX;
        let messages = set.element_messages(ElementOp::Create);
        while messages.has_more() {
            self.add_message(&messages, MsgType::Add, object.clone(), echo);
        }
    }

    /// Number of object messages (without batch begin and end).
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// The objects of the transaction, in order.
    #[cfg(test)]
    pub fn objects(&self) -> &[Object] {
        &self.objects
    }
}

/// What the kernel echoed of a committed transaction (messages sent with
/// `NLM_F_ECHO`): one `NFT_MSG_NEW*`/`NFT_MSG_DEL*` message per object the
/// commit created, changed or deleted, in commit order, as the kernel holds
/// the object (see [`ffi::WithoutAck`]).
pub struct Echo {
    datagrams: Vec<(AlignedBuffer, usize)>,
    /// The sequence numbers of the transaction's object messages: an echo
    /// carries the number of the message that caused it.
    seqs: std::ops::Range<u32>,
}

impl Echo {
    /// The echoed messages, in the order the kernel sent them, each a whole
    /// netlink message aligned for libnftnl's parsers: those numbered as the
    /// transaction's object messages, and the element notifications (added
    /// and deleted), which the kernel numbers 0 (`nf_tables_setelem_notify`
    /// fills them with sequence number 0). A seq-0 message can only be this
    /// transaction's echo: the socket joins no multicast group, and whatever
    /// was queued before the transaction was sent is dropped first
    /// (`Netlink::discard_pending`).
    pub fn messages(&self) -> impl Iterator<Item = &[u8]> {
        self.datagrams.iter().flat_map(move |(buffer, len)| {
            mnl::NlMessages::new(&buffer.bytes()[..*len])
                .filter_map(Result::ok)
                .filter(move |message| {
                    Header::read(message).is_some_and(|h| {
                        let element = h.seq == 0
                            && matches!(
                                i32::from(h.kind & 0xff),
                                libc::NFT_MSG_NEWSETELEM | libc::NFT_MSG_DELSETELEM
                            );
                        (self.seqs.contains(&h.seq) || element)
                            && !matches!(i32::from(h.kind), libc::NLMSG_ERROR | libc::NLMSG_DONE)
                    })
                })
        })
    }

    /// The ruleset generation id the transaction's commit left, from the
    /// `NFT_MSG_NEWGEN` message the kernel sends with the echo: the commit
    /// moves the id on, then notifies (`nf_tables_commit`, then
    /// `nf_tables_gen_notify` with the new `base_seq`), under the commit
    /// mutex, so it is this commit's id, not a later one's. `None` if it
    /// was not sent.
    pub fn generation_after(&self) -> Option<u32> {
        self.messages()
            .filter(|message| Echo::kind(message) == Some(libc::NFT_MSG_NEWGEN as u16))
            .find_map(super::attributes::parse_generation)
    }

    /// The nf_tables message type of an echoed message (`NFT_MSG_NEWRULE`, ...).
    pub fn kind(message: &[u8]) -> Option<u16> {
        Header::read(message).map(|h| h.kind & 0xff)
    }
}

/// `nlmsghdr` + `nfgenmsg`: the length of nftnl's batch begin message.
const BATCH_BEGIN_LEN: usize = 20;

/// The batch begin message `first_page` starts with, rewritten to carry the
/// attribute `NFNL_BATCH_GENID` (a big-endian u32, `nfnetlink_rcv_skb_batch`).
/// Returns the new message; the rest of the batch follows `first_page[20..]`.
fn batch_begin_with_generation(first_page: &[u8], generation: u32) -> Result<Vec<u8>, Error> {
    let header = Header::read(first_page)
        .ok_or_else(|| Error::Malformed("batch without a begin message".into()))?;
    if i32::from(header.kind) != libc::NFNL_MSG_BATCH_BEGIN
        || header.len as usize != BATCH_BEGIN_LEN
    {
        return Err(Error::Malformed(
            "the batch does not start with a plain batch begin message".into(),
        ));
    }
    let mut begin = first_page[..BATCH_BEGIN_LEN].to_vec();
    let attribute_len: u16 = 4 + 4;
    begin.extend_from_slice(&attribute_len.to_ne_bytes());
    begin.extend_from_slice(&(libc::NFNL_BATCH_GENID as u16).to_ne_bytes());
    begin.extend_from_slice(&generation.to_be_bytes());
    let total = begin.len() as u32;
    begin[..4].copy_from_slice(&total.to_ne_bytes());
    Ok(begin)
}

/// Whether a batch is committed, or only checked by the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Send the batch end: the kernel commits if every message was accepted.
    Commit,
    /// Leave the batch end out: the kernel validates every message and then
    /// aborts (what `nft --check` does), so nothing changes.
    CheckOnly,
}

/// Size of the buffer of one dump (request and answers): at least
/// `nft_nlmsg_maxsize()` (64 KiB + one page), also for 64 KiB pages, which
/// `ffi::write_request` asserts; checked when the socket is opened. A
/// receive this large also lets the kernel fill dump datagrams of up to
/// 32 KiB (`netlink_recvmsg` remembers the largest receive, capped at
/// `SKB_WITH_OVERHEAD(32768)`; `netlink_dump` sizes a dump's datagram by it,
/// and nf_tables asks for no larger `min_dump_alloc`), so big sets dump in
/// few reads, and every dump datagram fits: each is read with one `recv`
/// ([`receive_whole`]; one that did not fit would be an error, never a cut
/// message). The answers to `Request::Table` and `Request::Generation` are
/// single messages of at most `NLMSG_GOODSIZE`. Not one per session (a
/// sandbox's session spends nearly all its life waiting between small
/// transactions, and an agent holds hundreds of sessions): dumps borrow one
/// from [`DUMP_BUFFERS`].
const DUMP_BUFFER_LEN: usize = 1 << 17;

/// The dump buffers not in use, shared by every session of the process
/// ([`DUMP_BUFFERS`]). A buffer of [`DUMP_BUFFER_LEN`] is above glibc's mmap
/// threshold (128 KiB), so allocating one per dump maps, faults in and
/// unmaps fresh pages each time, and an apply runs about ten dumps. At most
/// `kept` buffers are kept. Their contents need no clearing: only the bytes
/// a `recv` wrote are ever read.
struct DumpBuffers {
    kept: usize,
    idle: std::sync::Mutex<Vec<AlignedBuffer>>,
}

/// As many as dumps that run at once, in practice: one per thread that
/// applies (an agent's concurrent Puts).
static DUMP_BUFFERS: DumpBuffers = DumpBuffers::new(4);

impl DumpBuffers {
    const fn new(kept: usize) -> DumpBuffers {
        DumpBuffers {
            kept,
            idle: std::sync::Mutex::new(Vec::new()),
        }
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuffer>> {
        // A panic while the lock was held cannot leave the list inconsistent.
        self.idle
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn take(&self) -> AlignedBuffer {
        let kept = self.idle().pop();
        kept.unwrap_or_else(|| AlignedBuffer::zeroed(DUMP_BUFFER_LEN))
    }

    /// Keep `buffer` for the next dump, unless enough are kept already, or
    /// it is not of the dump size.
    fn give_back(&self, buffer: AlignedBuffer) {
        if buffer.len() != DUMP_BUFFER_LEN {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < self.kept {
            idle.push(buffer);
        }
    }
}

/// First size of the buffer acknowledgements are read into. With
/// `NETLINK_CAP_ACK` an acknowledgement carries no copy of the request, only
/// `nlmsgerr` and the extended-ack attributes (a short message, an offset):
/// well under 1 KiB, one per datagram (`netlink_ack`). Acknowledgements are
/// read with one `recv` each ([`receive_whole`]); one that does not
/// fit is an error, never a partial read.
const ACK_BUFFER_LEN: usize = 4096;

/// A receive buffer aligned for `nlmsghdr` (4 bytes; 8 is used), so that
/// messages in it can be handed to libnftnl's parsers in place.
struct AlignedBuffer {
    words: Box<[u64]>,
}

impl AlignedBuffer {
    /// A zeroed buffer of at least `len` bytes.
    fn zeroed(len: usize) -> AlignedBuffer {
        AlignedBuffer {
            words: vec![0u64; len.div_ceil(size_of::<u64>())].into_boxed_slice(),
        }
    }

    fn len(&self) -> usize {
        self.words.len() * size_of::<u64>()
    }

    fn bytes(&self) -> &[u8] {
        // SAFETY: the words are initialized memory of exactly `len()` bytes,
        // borrowed for as long as the slice; every byte pattern is a valid u8.
        unsafe { std::slice::from_raw_parts(self.words.as_ptr().cast(), self.len()) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, borrowed mutably and exclusively; any bytes
        // written are valid u64 words.
        unsafe { std::slice::from_raw_parts_mut(self.words.as_mut_ptr().cast(), self.len()) }
    }
}

/// Reads the next datagram on `fd` into `buffer`, growing the buffer first
/// if the datagram is longer, so that no message is ever cut: a peek with
/// `MSG_TRUNC` returns the datagram's real length without taking it
/// (netlink(7), `netlink_recvmsg`). `flags` apply to both reads (e.g.
/// `MSG_DONTWAIT`). Returns the datagram's length.
fn receive_datagram(fd: i32, buffer: &mut AlignedBuffer, flags: i32) -> io::Result<usize> {
    let bytes = buffer.bytes_mut();
    // SAFETY: the descriptor is a live socket; zero bytes are written.
    let pending = unsafe {
        libc::recv(
            fd,
            bytes.as_mut_ptr().cast(),
            0,
            flags | libc::MSG_PEEK | libc::MSG_TRUNC,
        )
    };
    if pending < 0 {
        return Err(io::Error::last_os_error());
    }
    if pending as usize > buffer.len() {
        *buffer = AlignedBuffer::zeroed(pending as usize);
    }
    let bytes = buffer.bytes_mut();
    // SAFETY: the descriptor is a live socket and `bytes` is writable for its
    // whole length, which is passed along.
    let received = unsafe { libc::recv(fd, bytes.as_mut_ptr().cast(), bytes.len(), flags) };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(received as usize)
}

/// Reads the next datagram on `fd` into `buffer` with ONE `recv` (half the
/// system calls of [`receive_datagram`]), for datagrams known to fit:
/// acknowledgements, which with `NETLINK_CAP_ACK` always fit
/// [`ACK_BUFFER_LEN`] (see there), on the path of every learned address; and
/// dump answers, which fit [`DUMP_BUFFER_LEN`] (see there). With `MSG_TRUNC`
/// the kernel returns the datagram's real length (`netlink_recvmsg`), so a
/// datagram that did not fit is reported as an error instead of being read
/// cut. Returns the datagram's length.
fn receive_whole(fd: i32, buffer: &mut AlignedBuffer, flags: i32) -> io::Result<usize> {
    let bytes = buffer.bytes_mut();
    // SAFETY: the descriptor is a live socket and `bytes` is writable for its
    // whole length, which is passed along.
    let received = unsafe {
        libc::recv(
            fd,
            bytes.as_mut_ptr().cast(),
            bytes.len(),
            flags | libc::MSG_TRUNC,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    if received as usize > bytes.len() {
        return Err(io::Error::other(format!(
            "a datagram of {received} bytes did not fit the {}-byte buffer",
            bytes.len()
        )));
    }
    Ok(received as usize)
}

/// The kernel socket receive buffer a new socket is taken to have: less
/// than Linux's default (`net.core.rmem_default`, 208 KiB unless changed).
/// It holds the answers to a typical policy's transactions (creating the
/// table of the apply benchmark's typical policy is budgeted 124 KiB below),
/// so a socket asks for more (`SO_RCVBUFFORCE`) only when a transaction
/// needs it, and a one-shot apply spares the system call. Were the default
/// lowered below it, an echo that overflows the buffer is lost (ENOBUFS),
/// and the apply reads the table instead.
const ASSUMED_SOCKET_RECEIVE_BUFFER: usize = 192 << 10;
/// Bytes of receive buffer accounted per acknowledgement (skb truesize of a small message).
const RECEIVE_BUFFER_PER_ACK: usize = 2048;
/// The most elements of a new set, or element changes of a set changed in
/// place, that an echoed transaction has the kernel echo
/// ([`Transaction::add_new_set_elements`], `batch::edit_is_echoed`). Below
/// it, an element's notification (a few hundred bytes of skb, parsed here)
/// costs less than dumping the set afterwards (a request, two reads, and a
/// generation id check after all dumps); far above it, the notifications
/// cost more than the dump.
pub const ECHOED_ELEMENTS_MAX: usize = 64;

/// Bytes of receive buffer accounted per byte of an echoed batch: an echoed
/// object is about as long as its message (the kernel adds its handle), and
/// notifications are packed into skbs of `NLMSG_GOODSIZE` whose truesize is
/// larger. Too small a buffer only loses the echo (ENOBUFS), which the
/// caller then replaces by reading the table.
const ECHO_BYTES_PER_BATCH_BYTE: usize = 4;

/// A netfilter netlink socket in the namespace of the thread that opened it.
pub struct Netlink {
    socket: mnl::Socket,
    /// Where acknowledgements are read; allocated at the first transaction.
    acks: Option<AlignedBuffer>,
    seq: u32,
    receive_buffer: usize,
    /// The send buffer size last set (0: the kernel's default).
    send_buffer: usize,
    /// How many dumps of a set's elements this socket ran (tests check that
    /// the elements of new small sets come from the echo instead).
    pub element_dumps: usize,
}

/// One acknowledgement (`NLMSG_ERROR`) from the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Ack {
    seq: u32,
    /// 0 for success, else a negative errno.
    error: i32,
    /// The extended ack message (`NLMSGERR_ATTR_MSG`), if the kernel gave one.
    message: Option<String>,
}

fn set_socket_option(socket: &mnl::Socket, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the descriptor is the live socket owned by `socket`; `value` is a
    // c_int that outlives the call, and its size is passed along.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Set a socket buffer size, beyond `net.core.[rw]mem_max` if privileged
/// (SO_*BUFFORCE needs CAP_NET_ADMIN, which nftables needs anyway).
fn set_buffer(socket: &mnl::Socket, force: i32, plain: i32, bytes: usize) -> io::Result<()> {
    let bytes = i32::try_from(bytes).unwrap_or(i32::MAX);
    set_socket_option(socket, libc::SOL_SOCKET, force, bytes)
        .or_else(|_| set_socket_option(socket, libc::SOL_SOCKET, plain, bytes))
}

// SAFETY: a `Netlink` exclusively owns its libmnl socket (a file descriptor
// plus its bound address; libmnl keeps no thread-local state and has no
// thread affinity) and its buffers, and every method takes `&mut self` or
// works on owned data, so moving it to another thread is sound. It is not
// `Sync`.
unsafe impl Send for Netlink {}

impl Netlink {
    /// Open a netfilter netlink socket in the current thread's network namespace.
    pub fn open() -> Result<Netlink, Error> {
        assert!(DUMP_BUFFER_LEN >= nftnl::nft_nlmsg_maxsize() as usize);
        // Not bound: the kernel binds a netlink socket to a free port id at
        // its first send (`netlink_autobind`), which spares a bind and the
        // getsockname that would follow it; nothing here needs the port id.
        let socket = mnl::Socket::open(mnl::Bus::Netfilter).map_err(Error::Socket)?;
        // Error acknowledgements without a copy of the failed message (which can
        // be a 64 KiB element list), and with the kernel's text when it has one.
        set_socket_option(&socket, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1)
            .map_err(Error::Socket)?;
        set_socket_option(&socket, libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1)
            .map_err(Error::Socket)?;
        Ok(Netlink {
            socket,
            acks: None,
            // Batches number their messages from 1; requests use numbers far above.
            seq: 1 << 30,
            receive_buffer: ASSUMED_SOCKET_RECEIVE_BUFFER,
            send_buffer: 0,
            element_dumps: 0,
        })
    }

    /// The socket, for questions about it rather than netfilter (e.g. its
    /// network namespace's cookie).
    pub fn socket_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        // SAFETY: the descriptor is the live socket `self` owns, and the
        // borrow ends before `self` can close it.
        unsafe { std::os::fd::BorrowedFd::borrow_raw(self.socket.as_raw_fd()) }
    }

    /// Send `transaction` as one batch and wait for the kernel's verdict.
    /// On any error the kernel has aborted the whole transaction.
    pub fn commit(&mut self, transaction: Transaction) -> Result<(), Error> {
        self.send_batch(transaction, Commit::Commit).map(drop)
    }

    /// [`Netlink::commit`], returning what the kernel echoed of a transaction
    /// built with [`Transaction::echoed`]. Lost answers (`AcksLost`) mean a
    /// lost echo too.
    pub fn commit_echoed(&mut self, transaction: Transaction) -> Result<Echo, Error> {
        self.send_batch(transaction, Commit::Commit)
    }

    /// Send `transaction` as one batch without its end, so the kernel checks
    /// every message and then aborts: nothing changes.
    pub fn check(&mut self, transaction: Transaction) -> Result<(), Error> {
        self.send_batch(transaction, Commit::CheckOnly).map(drop)
    }

    fn send_batch(&mut self, transaction: Transaction, mode: Commit) -> Result<Echo, Error> {
        let Transaction {
            batch,
            objects,
            generation,
            echo,
            destroys,
        } = transaction;
        let batch: FinalizedBatch = batch.finalize();
        let seqs = batch.sequence_numbers();
        // nftnl numbers batch begin and end too when the kernel acknowledges them.
        let framed = (seqs.len() - objects.len()) / 2 == 1;
        let first_object_seq = seqs.start + u32::from(framed);
        let end_seq = seqs.end - 1;

        let mut pages: Vec<&[u8]> = batch.iter().collect();
        if mode == Commit::CheckOnly {
            let last = pages
                .pop()
                .ok_or_else(|| Error::Malformed("empty batch".into()))?;
            pages.push(without_batch_end(last)?);
        }
        let begin;
        if let Some(generation) = generation {
            let first = pages
                .first()
                .copied()
                .ok_or_else(|| Error::Malformed("empty batch".into()))?;
            begin = batch_begin_with_generation(first, generation)?;
            pages[0] = &first[BATCH_BEGIN_LEN..];
            pages.insert(0, &begin);
        }
        let total: usize = pages.iter().map(|p| p.len()).sum();

        // Answers: batch begin and end, plus one per failed message at most;
        // and an echo of every object but set elements.
        let acks_expected = objects.len() + 2;
        let echo_bytes = if echo {
            total * ECHO_BYTES_PER_BATCH_BYTE
        } else {
            0
        };
        let needed = acks_expected * RECEIVE_BUFFER_PER_ACK + echo_bytes;
        if needed > self.receive_buffer {
            self.receive_buffer = needed;
            set_buffer(
                &self.socket,
                libc::SO_RCVBUFFORCE,
                libc::SO_RCVBUF,
                self.receive_buffer,
            )
            .map_err(Error::Socket)?;
        }
        // Every batch numbers its messages from 1, so an answer left queued
        // by an earlier one (anything the kernel sent after the batch end's
        // acknowledgement, where `drain` stops) would pass for an answer to
        // this one: it is dropped first.
        self.discard_pending()?;
        super::phases::mark("prepare the send");
        // The whole batch goes in ONE sendmsg: nfnetlink processes one skb as one
        // batch, and a batch split over several sends would be aborted. The
        // kernel checks and commits it within the send (`nfnetlink_rcv_batch`
        // runs in the sender's context).
        match self.send_pages(&pages, total) {
            // A batch longer than the send buffer is refused before the
            // kernel looks at it (`netlink_sendmsg`: EMSGSIZE when `len >
            // sk_sndbuf - 32`). The default buffer (`net.core.wmem_default`,
            // 208 KiB unless changed) holds a typical batch, so the buffer is
            // raised only when a send is refused for its size, and the send
            // repeated.
            Err(Error::Send(err))
                if err.raw_os_error() == Some(libc::EMSGSIZE)
                    && total + 4096 > self.send_buffer =>
            {
                set_buffer(
                    &self.socket,
                    libc::SO_SNDBUFFORCE,
                    libc::SO_SNDBUF,
                    total + 4096,
                )
                .map_err(Error::Socket)?;
                self.send_buffer = total + 4096;
                self.send_pages(&pages, total)?;
            }
            sent => sent?,
        }
        super::phases::mark("kernel commit");

        // The kernel acknowledges the batch end last, after every other answer.
        let last = (framed && mode == Commit::Commit).then_some(end_seq);
        let (acks, overrun, datagrams) = self.drain(last, echo)?;
        super::phases::mark("read the answers");
        let describe = |seq: u32| -> String {
            if seq >= first_object_seq && ((seq - first_object_seq) as usize) < objects.len() {
                objects[(seq - first_object_seq) as usize].to_string()
            } else if framed && seq == end_seq {
                "the end of the transaction".to_string()
            } else {
                "the transaction as a whole (its commit)".to_string()
            }
        };
        let failures: Vec<&Ack> = acks.iter().filter(|a| a.error != 0).collect();
        if failures.iter().any(|a| a.error == -libc::ERESTART) {
            return Err(Error::RulesetChanged);
        }
        if let Some(first) = failures.first() {
            let others: BTreeSet<String> = failures[1..].iter().map(|a| describe(a.seq)).collect();
            let destroy = first.seq >= first_object_seq
                && destroys.contains(&((first.seq - first_object_seq) as usize));
            let hint = if destroy {
                kernel_too_old_hint(-first.error, &kernel_release())
            } else {
                None
            };
            return Err(Error::Rejected {
                object: describe(first.seq),
                detail: first
                    .message
                    .clone()
                    .into_iter()
                    .chain(hint)
                    .map(|m| format!(" ({m})"))
                    .collect(),
                also: if others.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; also rejected: {}",
                        others.into_iter().collect::<Vec<_>>().join(", ")
                    )
                },
                source: io::Error::from_raw_os_error(-first.error),
            });
        }
        if overrun {
            return Err(Error::AcksLost);
        }
        let echoed = Echo {
            datagrams,
            seqs: first_object_seq..first_object_seq + objects.len() as u32,
        };
        // Object messages carry no NLM_F_ACK, so success is silent. When the
        // kernel acknowledges the batch end, that answer proves it processed
        // and committed the whole batch; older kernels only report failures.
        if framed && mode == Commit::Commit && !acks.iter().any(|a| a.seq == end_seq) {
            return Err(Error::Unacknowledged {
                first: describe(end_seq),
            });
        }
        Ok(echoed)
    }

    fn send_pages(&self, pages: &[&[u8]], total: usize) -> Result<(), Error> {
        let mut iov: Vec<libc::iovec> = pages
            .iter()
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: sockaddr_nl is plain data; all-zero is a valid value, completed below.
        let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: msghdr is plain data; all-zero is a valid value, completed below.
        let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
        message.msg_name = (&mut kernel as *mut libc::sockaddr_nl).cast();
        message.msg_namelen = size_of::<libc::sockaddr_nl>() as u32;
        message.msg_iov = iov.as_mut_ptr();
        message.msg_iovlen = iov.len();
        // SAFETY: the descriptor is our live socket; `message` points to `kernel`
        // and to `iov`, whose entries point into `pages`, all alive for the call;
        // sendmsg only reads them.
        let sent = unsafe { libc::sendmsg(self.socket.as_raw_fd(), &message, 0) };
        if sent < 0 {
            return Err(Error::Send(io::Error::last_os_error()));
        }
        if sent as usize != total {
            return Err(Error::Send(io::Error::other(format!(
                "sent {sent} of {total} bytes"
            ))));
        }
        Ok(())
    }

    /// Drop every datagram queued on the socket, without waiting.
    fn discard_pending(&mut self) -> Result<(), Error> {
        let fd = self.socket.as_raw_fd();
        let buffer = self
            .acks
            .get_or_insert_with(|| AlignedBuffer::zeroed(ACK_BUFFER_LEN));
        loop {
            match receive_datagram(fd, buffer, libc::MSG_DONTWAIT) {
                Ok(_) => {}
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) => return Ok(()),
                    Some(libc::EINTR | libc::ENOBUFS) => {}
                    _ => return Err(Error::Receive(err)),
                },
            }
        }
    }

    /// Receive everything queued on the socket without waiting: the answers
    /// to a batch are all queued before `sendmsg` returns. Stops early once
    /// the answer numbered `last` is in, since nothing follows it. Returns
    /// the acknowledgements, whether the receive queue overflowed (ENOBUFS),
    /// and, with `keep_echo`, a copy of every datagram that held anything else
    /// (the echo of the transaction).
    #[allow(clippy::type_complexity)]
    fn drain(
        &mut self,
        last: Option<u32>,
        keep_echo: bool,
    ) -> Result<(Vec<Ack>, bool, Vec<(AlignedBuffer, usize)>), Error> {
        let mut acks = Vec::new();
        let mut echoed = Vec::new();
        let mut overrun = false;
        let fd = self.socket.as_raw_fd();
        let buffer = self
            .acks
            .get_or_insert_with(|| AlignedBuffer::zeroed(ACK_BUFFER_LEN));
        loop {
            let n = match receive_whole(fd, buffer, libc::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(err) => match err.raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOBUFS) => {
                        overrun = true;
                        continue;
                    }
                    _ => return Err(Error::Receive(err)),
                },
            };
            let mut complete = false;
            let mut other = false;
            for message in mnl::NlMessages::new(&buffer.bytes()[..n]) {
                let message = message.map_err(Error::Receive)?;
                match parse_ack(message) {
                    Some(ack) => {
                        complete |= Some(ack.seq) == last;
                        acks.push(ack);
                    }
                    None => other = true,
                }
            }
            if other && keep_echo {
                let mut copy = AlignedBuffer::zeroed(n);
                copy.bytes_mut()[..n].copy_from_slice(&buffer.bytes()[..n]);
                echoed.push((copy, n));
            }
            if complete {
                break;
            }
        }
        Ok((acks, overrun, echoed))
    }

    /// Send `request` and hand every answer message to `each`. Returns
    /// `Ok(Err(errno))` when the kernel answered with an error (e.g. ENOENT for
    /// a missing table), and whether the dump was interrupted by a concurrent
    /// change (`NLM_F_DUMP_INTR`).
    pub fn dump(
        &mut self,
        request: Request<'_>,
        table: &CStr,
        each: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<Result<bool, i32>, Error> {
        if matches!(request, Request::Elements(_)) {
            self.element_dumps += 1;
        }
        let mut buffer = DUMP_BUFFERS.take();
        let result = self.dump_with(&mut buffer, request, table, each);
        DUMP_BUFFERS.give_back(buffer);
        result
    }

    /// [`Netlink::dump`] in `buffer` (of [`DUMP_BUFFER_LEN`]).
    fn dump_with(
        &mut self,
        buffer: &mut AlignedBuffer,
        request: Request<'_>,
        table: &CStr,
        each: &mut dyn FnMut(&[u8]) -> Result<(), Error>,
    ) -> Result<Result<bool, i32>, Error> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        // The request is written into the buffer the answers then overwrite
        // (libmnl writes every header and padding byte of it, so what an
        // earlier dump left there does not matter).
        let len = ffi::write_request(buffer.bytes_mut(), request, table, seq);
        self.socket
            .send(&buffer.bytes()[..len])
            .map_err(Error::Send)?;
        let multipart = !matches!(request, Request::Table | Request::Generation);
        let mut interrupted = false;
        let fd = self.socket.as_raw_fd();
        loop {
            let n = match receive_whole(fd, buffer, 0) {
                Ok(n) => n,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(Error::Receive(err)),
            };
            for message in mnl::NlMessages::new(&buffer.bytes()[..n]) {
                let message = message.map_err(Error::Receive)?;
                let header = Header::read(message)
                    .ok_or_else(|| Error::Malformed("short netlink message".into()))?;
                if header.seq != seq {
                    continue; // a late answer to something else
                }
                if header.flags & libc::NLM_F_DUMP_INTR as u16 != 0 {
                    interrupted = true;
                }
                match i32::from(header.kind) {
                    libc::NLMSG_DONE => return Ok(Ok(interrupted)),
                    libc::NLMSG_ERROR => {
                        let ack = parse_ack(message)
                            .ok_or_else(|| Error::Malformed("short error message".into()))?;
                        return Ok(if ack.error == 0 {
                            Ok(interrupted)
                        } else {
                            Err(-ack.error)
                        });
                    }
                    _ => {
                        each(message)?;
                        if !multipart {
                            return Ok(Ok(interrupted));
                        }
                    }
                }
            }
        }
    }
}

/// What to say when the kernel refuses an `NFT_MSG_DESTROYSETELEM` message
/// with `errno`: kernels before 6.3 do not know that message type, and
/// nfnetlink answers a type it has no handler for with `EINVAL`
/// (`nfnetlink_rcv_batch`). `release` is the running kernel's, as
/// `uname -r` prints it.
fn kernel_too_old_hint(errno: i32, release: &str) -> Option<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().ok());
    let (Some(Some(major)), Some(Some(minor))) = (numbers.next(), numbers.next()) else {
        return None;
    };
    (errno == libc::EINVAL && (major, minor) < (6, 3)).then(|| {
        format!(
            "this kernel, Linux {release}, is older than 6.3, which netleash needs to remove \
             learned addresses (NFT_MSG_DESTROYSETELEM); run it on Linux 6.3 or later"
        )
    })
}

/// The running kernel's release, as `uname -r` prints it, or "" if unknown.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|release| release.trim().to_string())
        .unwrap_or_default()
}

/// The fields of an `nlmsghdr` this module needs, read without unsafe code.
struct Header {
    len: u32,
    kind: u16,
    flags: u16,
    seq: u32,
}

impl Header {
    fn read(message: &[u8]) -> Option<Header> {
        let u32_at = |at: usize| {
            message
                .get(at..at + 4)
                .map(|b| u32::from_ne_bytes(b.try_into().unwrap()))
        };
        let u16_at = |at: usize| {
            message
                .get(at..at + 2)
                .map(|b| u16::from_ne_bytes(b.try_into().unwrap()))
        };
        Some(Header {
            len: u32_at(0)?,
            kind: u16_at(4)?,
            flags: u16_at(6)?,
            seq: u32_at(8)?,
        })
    }
}

/// `NLM_F_ACK_TLVS` (linux/netlink.h): extended ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLM_F_CAPPED` (linux/netlink.h): the copy of the request is only its header.
const NLM_F_CAPPED: u16 = 0x100;
/// `NLMSGERR_ATTR_MSG` (linux/netlink.h): a text message.
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Parse an `NLMSG_ERROR` message: `nlmsghdr`, then `struct nlmsgerr { int
/// error; struct nlmsghdr msg; }` (plus the request payload unless capped),
/// then extended ack attributes if flagged.
fn parse_ack(message: &[u8]) -> Option<Ack> {
    let header = Header::read(message)?;
    if i32::from(header.kind) != libc::NLMSG_ERROR {
        return None;
    }
    let error = i32::from_ne_bytes(message.get(16..20)?.try_into().ok()?);
    let mut message_text = None;
    if header.flags & NLM_F_ACK_TLVS != 0 {
        let request_len = if header.flags & NLM_F_CAPPED != 0 || error == 0 {
            16
        } else {
            Header::read(&message[20..])?.len as usize
        };
        let mut at = 20 + request_len.next_multiple_of(4);
        let end = (header.len as usize).min(message.len());
        while at + 4 <= end {
            let len = usize::from(u16::from_ne_bytes(message[at..at + 2].try_into().ok()?));
            let kind = u16::from_ne_bytes(message[at + 2..at + 4].try_into().ok()?);
            if len < 4 || at + len > end {
                break;
            }
            if kind & 0x3fff == NLMSGERR_ATTR_MSG {
                message_text = Some(ffi::udata_string(&message[at + 4..at + len]));
            }
            at += len.next_multiple_of(4);
        }
    }
    Some(Ack {
        seq: header.seq,
        error,
        message: message_text,
    })
}

/// The last page of a batch without its final batch end message (for a
/// check-only batch). The end message is located by walking the headers.
fn without_batch_end(page: &[u8]) -> Result<&[u8], Error> {
    let mut at = 0;
    let mut last = None;
    while at + 16 <= page.len() {
        let header =
            Header::read(&page[at..]).ok_or_else(|| Error::Malformed("batch page".into()))?;
        if header.len < 16 {
            return Err(Error::Malformed(
                "batch message shorter than its header".into(),
            ));
        }
        last = Some((at, header.kind));
        at += (header.len as usize).next_multiple_of(4);
    }
    match last {
        Some((start, kind)) if i32::from(kind) == libc::NFNL_MSG_BATCH_END => Ok(&page[..start]),
        _ => Err(Error::Malformed(
            "the batch does not end with a batch end message".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refused_destroy_on_a_kernel_before_6_3_says_so() {
        let hint = kernel_too_old_hint(libc::EINVAL, "6.1.0-18-amd64").expect("6.1 is too old");
        assert_eq!(
            hint,
            "this kernel, Linux 6.1.0-18-amd64, is older than 6.3, which netleash needs to remove \
             learned addresses (NFT_MSG_DESTROYSETELEM); run it on Linux 6.3 or later"
        );
        assert!(kernel_too_old_hint(libc::EINVAL, "5.15.0-91-generic").is_some());
        // A kernel that knows the message, another error, or no release.
        assert_eq!(kernel_too_old_hint(libc::EINVAL, "6.3.0"), None);
        assert_eq!(kernel_too_old_hint(libc::EINVAL, "6.18.44-fc-v782"), None);
        assert_eq!(kernel_too_old_hint(libc::ENOENT, "6.1.0"), None);
        assert_eq!(kernel_too_old_hint(libc::EINVAL, ""), None);
        assert_eq!(kernel_too_old_hint(libc::EINVAL, "six"), None);
    }

    #[test]
    fn destroy_messages_are_known_by_their_place_in_the_transaction() {
        let table = std::ffi::CString::new("netleash").unwrap();
        let set = std::ffi::CString::new("dns_v4").unwrap();
        let mut transaction = Transaction::new();
        let mut message = SetMsg::existing(&table, &set);
        message.push(&ffi::RawElement {
            key: vec![192, 0, 2, 1],
            key_end: None,
            interval_end: false,
            timeout_ms: None,
            expiration_ms: None,
        });
        transaction.add_elements(&message, ElementOp::Add, Object::Elements("dns_v4".into()));
        transaction.add_elements(
            &message,
            ElementOp::Destroy,
            Object::Elements("dns_v4".into()),
        );
        assert_eq!(
            transaction.destroys.iter().copied().collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn dump_buffers_are_reused_and_at_most_so_many_kept() {
        let buffers = DumpBuffers::new(2);
        let taken: Vec<AlignedBuffer> = (0..3).map(|_| buffers.take()).collect();
        assert!(taken.iter().all(|b| b.len() == DUMP_BUFFER_LEN));
        for buffer in taken {
            buffers.give_back(buffer);
        }
        let kept: Vec<*const u64> = buffers.idle().iter().map(|b| b.words.as_ptr()).collect();
        assert_eq!(kept.len(), 2, "kept more or fewer than the limit");
        // What is taken next is a kept buffer (a live one, so not a new
        // allocation at a reused address).
        let next = buffers.take();
        assert!(
            kept.contains(&next.words.as_ptr()),
            "a kept buffer was not reused"
        );
        assert_eq!(buffers.idle().len(), 1);
        // A buffer of another size (an acknowledgement's) is not kept.
        buffers.give_back(AlignedBuffer::zeroed(ACK_BUFFER_LEN));
        assert_eq!(buffers.idle().len(), 1);
    }

    fn header(len: u32, kind: u16, flags: u16, seq: u32) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(len.to_ne_bytes());
        bytes.extend(kind.to_ne_bytes());
        bytes.extend(flags.to_ne_bytes());
        bytes.extend(seq.to_ne_bytes());
        bytes.extend(0u32.to_ne_bytes());
        bytes
    }

    #[test]
    fn parses_an_extended_error_ack() {
        let text = b"Set element exists\0";
        let attr_len = 4 + text.len();
        let total = 16 + 4 + 16 + attr_len.next_multiple_of(4);
        let mut message = header(
            total as u32,
            libc::NLMSG_ERROR as u16,
            NLM_F_CAPPED | NLM_F_ACK_TLVS,
            7,
        );
        message.extend((-libc::EEXIST).to_ne_bytes());
        message.extend(header(200, 12, 0, 7));
        message.extend((attr_len as u16).to_ne_bytes());
        message.extend(NLMSGERR_ATTR_MSG.to_ne_bytes());
        message.extend(text);
        message.resize(total, 0);
        let ack = parse_ack(&message).unwrap();
        assert_eq!(
            ack,
            Ack {
                seq: 7,
                error: -libc::EEXIST,
                message: Some("Set element exists".into())
            }
        );
    }

    #[test]
    fn the_batch_begin_carries_the_generation_id_big_endian() {
        let mut transaction = Transaction::new();
        transaction.add(
            &ffi::TableMsg::new(c"netleash", None),
            MsgType::Add,
            Object::Table,
        );
        let batch = transaction.batch.finalize();
        let first = batch.iter().next().unwrap();
        let begin = batch_begin_with_generation(first, 0x0102_0304).unwrap();
        let header = Header::read(&begin).unwrap();
        assert_eq!(header.len, 28);
        assert_eq!(i32::from(header.kind), libc::NFNL_MSG_BATCH_BEGIN);
        assert_eq!(
            begin[4..20],
            first[4..20],
            "type, flags, seq and nfgenmsg are kept"
        );
        assert_eq!(begin[20..22], 8u16.to_ne_bytes());
        assert_eq!(begin[22..24], (libc::NFNL_BATCH_GENID as u16).to_ne_bytes());
        assert_eq!(begin[24..], [1, 2, 3, 4]);
        assert!(batch_begin_with_generation(&first[BATCH_BEGIN_LEN..], 1).is_err());
    }

    #[test]
    fn a_check_only_batch_drops_exactly_the_batch_end() {
        let mut transaction = Transaction::new();
        let table = ffi::TableMsg::new(c"netleash", None);
        transaction.add(&table, MsgType::Add, Object::Table);
        let batch = transaction.batch.finalize();
        let pages: Vec<&[u8]> = batch.iter().collect();
        let last = pages.last().unwrap();
        let trimmed = without_batch_end(last).unwrap();
        assert_eq!(
            last.len() - trimmed.len(),
            20,
            "batch end is nlmsghdr + nfgenmsg"
        );
        assert_eq!(
            without_batch_end(trimmed).unwrap_err().to_string(),
            Error::Malformed("the batch does not end with a batch end message".into()).to_string()
        );
    }

    #[test]
    fn a_datagram_longer_than_the_buffer_arrives_whole_and_the_buffer_stays_aligned() {
        // A datagram socket pair stands in for netlink: MSG_PEEK | MSG_TRUNC
        // returns the real length there too (unix(7)).
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let sent: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let small = [7u8; 100];
        for datagram in [&sent[..], &small[..]] {
            // SAFETY: fds[1] is the live socket; `datagram` is readable for its length.
            let n = unsafe { libc::send(fds[1], datagram.as_ptr().cast(), datagram.len(), 0) };
            assert_eq!(n as usize, datagram.len());
        }
        let mut buffer = AlignedBuffer::zeroed(ACK_BUFFER_LEN);
        let n = receive_datagram(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap();
        assert_eq!(&buffer.bytes()[..n], &sent[..]);
        assert!(buffer.len() >= sent.len());
        assert!(
            buffer
                .bytes()
                .as_ptr()
                .cast::<libc::nlmsghdr>()
                .is_aligned()
        );
        // The next, shorter datagram is read on its own.
        let n = receive_datagram(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap();
        assert_eq!(&buffer.bytes()[..n], &small[..]);
        let empty = receive_datagram(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap_err();
        assert_eq!(empty.raw_os_error(), Some(libc::EAGAIN));
        for fd in fds {
            // SAFETY: closing the descriptors this test opened.
            unsafe { libc::close(fd) };
        }
    }

    #[test]
    fn an_acknowledgement_is_read_in_one_call_and_one_too_long_is_an_error() {
        let mut fds = [0i32; 2];
        // SAFETY: socketpair writes two descriptors into `fds`.
        let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM, 0, fds.as_mut_ptr()) };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let small = [7u8; 36];
        let long = vec![9u8; ACK_BUFFER_LEN + 1];
        for datagram in [&small[..], &long[..], &small[..]] {
            // SAFETY: fds[1] is the live socket; `datagram` is readable for its length.
            let n = unsafe { libc::send(fds[1], datagram.as_ptr().cast(), datagram.len(), 0) };
            assert_eq!(n as usize, datagram.len());
        }
        let mut buffer = AlignedBuffer::zeroed(ACK_BUFFER_LEN);
        let n = receive_whole(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap();
        assert_eq!(&buffer.bytes()[..n], &small[..]);
        let error = receive_whole(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap_err();
        assert!(error.to_string().contains("did not fit"), "{error}");
        // The datagram after it is read whole.
        let n = receive_whole(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap();
        assert_eq!(&buffer.bytes()[..n], &small[..]);
        let empty = receive_whole(fds[0], &mut buffer, libc::MSG_DONTWAIT).unwrap_err();
        assert_eq!(empty.raw_os_error(), Some(libc::EAGAIN));
        for fd in fds {
            // SAFETY: closing the descriptors this test opened.
            unsafe { libc::close(fd) };
        }
    }
}
