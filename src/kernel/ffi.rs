//! The one module that calls libnftnl directly (through `nftnl_sys`), for what
//! the safe `nftnl` API lacks: chains with user data (the digest comment), sets with
//! flags, concatenated keys and their field description, set elements with
//! interval ends, range ends and timeouts, element messages with add/create/
//! destroy semantics, and the dump requests; and the one copy of a rule
//! message that `kernel::rule_message` wrote without libnftnl into the batch
//! ([`RuleMsg`]). The kernel's answers are parsed without libnftnl, by
//! `kernel::attributes`; libnftnl's parsers stay here for its tests only, and
//! so do its expression objects, against which the rule messages are
//! compared ([`reference`]).
//!
//! Every object here owns one libnftnl allocation and frees it on drop. All
//! netlink messages are written into buffers of at least
//! [`nftnl::nft_nlmsg_maxsize`] bytes (the contract of [`NlMsg::write`]).

use std::cell::Cell;
use std::ffi::{CStr, CString, c_char, c_void};
use std::ptr::NonNull;

use nftnl::nftnl_sys as sys;
use nftnl::{MsgType, NlMsg, ProtoFamily};

/// `NFT_SET_CONCAT` (linux/netfilter/nf_tables.h, kernel 5.6): the set key is a
/// concatenation described by `NFTA_SET_DESC_CONCAT`; with `NFT_SET_INTERVAL`
/// the kernel picks the pipapo backend.
pub const NFT_SET_CONCAT: u32 = 0x80;
/// `NFT_MSG_DESTROYSETELEM` (kernel 6.3): delete elements, ignoring absent ones.
pub const NFT_MSG_DESTROYSETELEM: u16 = 30;
/// `NFT_USERDATA_MAXLEN` (linux/netfilter/nf_tables.h): most user data bytes an object may carry.
pub const USERDATA_MAXLEN: usize = 256;

/// A set element in the kernel's encoding (see `kernel::elements`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RawElement {
    /// `NFTA_SET_ELEM_KEY`.
    pub key: Vec<u8>,
    /// `NFTA_SET_ELEM_KEY_END`: inclusive end of a range in a concatenated interval (pipapo) set.
    pub key_end: Option<Vec<u8>>,
    /// `NFT_SET_ELEM_INTERVAL_END`: this element closes the range opened by the previous start
    /// element of a non-concatenated interval (rbtree) set; it is the first key after the range.
    pub interval_end: bool,
    /// `NFTA_SET_ELEM_TIMEOUT` in milliseconds.
    pub timeout_ms: Option<u64>,
    /// `NFTA_SET_ELEM_EXPIRATION` in milliseconds (time left).
    pub expiration_ms: Option<u64>,
}

/// What to do with the elements of an element message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElementOp {
    /// `NFT_MSG_NEWSETELEM` with `NLM_F_EXCL`: an element that exists already is an error.
    Create,
    /// `NFT_MSG_NEWSETELEM` without `NLM_F_EXCL` (nft's `add element`): an existing element
    /// is kept, and since kernel 6.10 its timeout and expiration are updated.
    Add,
    /// `NFT_MSG_DESTROYSETELEM`: remove the elements, absent ones are not an error.
    Destroy,
    /// `NFT_MSG_DELSETELEM`: remove the elements; an absent one is an error
    /// (`ENOENT`) and the whole transaction is dropped. Every kernel has it.
    Delete,
}

/// Abort like `nftnl` itself does when libnftnl cannot allocate a few bytes:
/// there is no way to continue sensibly (the allocations here are tiny).
fn allocated<T>(ptr: *mut T) -> NonNull<T> {
    NonNull::new(ptr).unwrap_or_else(|| std::process::abort())
}

/// Encode one `nftnl_udata` TLV record (type, length, value): the format libnftnl
/// and nft use for comments in table, set and rule user data.
pub fn udata_record(kind: u8, value: &[u8]) -> Vec<u8> {
    let mut record = Vec::with_capacity(2 + value.len());
    record.push(kind);
    record.push(u8::try_from(value.len()).expect("user data record longer than 255 bytes"));
    record.extend_from_slice(value);
    record
}

/// The value of the first record of `kind` in a user data blob, if any.
pub fn udata_find(blob: &[u8], kind: u8) -> Option<&[u8]> {
    let mut rest = blob;
    while rest.len() >= 2 {
        let (record_kind, len) = (rest[0], usize::from(rest[1]));
        let value = rest.get(2..2 + len)?;
        if record_kind == kind {
            return Some(value);
        }
        rest = &rest[2 + len..];
    }
    None
}

/// A NUL-terminated string record value as text.
pub fn udata_string(value: &[u8]) -> String {
    let text = value.strip_suffix(&[0]).unwrap_or(value);
    String::from_utf8_lossy(text).into_owned()
}

/// Write an nfnetlink message header for the nf_tables subsystem into `buf`.
///
/// # Safety
/// `buf` must be valid for writes of at least `nft_nlmsg_maxsize()` bytes.
unsafe fn header(
    buf: *mut c_void,
    kind: u16,
    family: u16,
    flags: u16,
    seq: u32,
) -> *mut libc::nlmsghdr {
    // SAFETY: the caller guarantees `buf` has room for the largest message;
    // nftnl_nlmsg_build_hdr writes only the nlmsghdr and nfgenmsg into it.
    unsafe { sys::nftnl_nlmsg_build_hdr(buf.cast::<c_char>(), kind, family, flags, seq) }
}

const INET: u16 = ProtoFamily::Inet as u16;

// ---------------------------------------------------------------------------
// Table
// ---------------------------------------------------------------------------

/// `table inet NAME`, with an optional comment in its user data
/// (`NFTNL_UDATA_TABLE_COMMENT`, what nft shows as `comment "..."`).
pub struct TableMsg {
    table: NonNull<sys::nftnl_table>,
    /// Whether an `Add` carries `NLM_F_EXCL`: the kernel then refuses it
    /// with `EEXIST` if the table exists (`nf_tables_newtable`), instead of
    /// leaving the table as it is.
    exclusive: bool,
}

impl TableMsg {
    pub fn new(name: &CStr, comment: Option<&CStr>) -> TableMsg {
        // SAFETY: nftnl_table_alloc returns a fresh, zeroed table or NULL (handled by `allocated`).
        let table = allocated(unsafe { sys::nftnl_table_alloc() });
        let raw = table.as_ptr();
        // SAFETY: `raw` is a valid table we own; the setters copy the string and integers.
        unsafe {
            sys::nftnl_table_set_u32(raw, sys::NFTNL_TABLE_FAMILY as u16, u32::from(INET));
            sys::nftnl_table_set_str(raw, sys::NFTNL_TABLE_NAME as u16, name.as_ptr());
            sys::nftnl_table_set_u32(raw, sys::NFTNL_TABLE_FLAGS as u16, 0);
        }
        if let Some(comment) = comment {
            let udata = udata_record(
                sys::NFTNL_UDATA_TABLE_COMMENT as u8,
                comment.to_bytes_with_nul(),
            );
            assert!(
                udata.len() <= USERDATA_MAXLEN,
                "table comment longer than the kernel allows"
            );
            // SAFETY: `udata` is a live buffer of exactly `udata.len()` bytes; libnftnl copies it.
            let rc = unsafe {
                sys::nftnl_table_set_data(
                    raw,
                    sys::NFTNL_TABLE_USERDATA as u16,
                    udata.as_ptr().cast::<c_void>(),
                    udata.len() as u32,
                )
            };
            if rc < 0 {
                std::process::abort();
            }
        }
        TableMsg {
            table,
            exclusive: false,
        }
    }

    /// The same message, whose `Add` creates the table or fails with
    /// `EEXIST`: for a transaction planned on the assumption that there is
    /// no table, which the kernel then checks.
    pub fn exclusive(mut self) -> TableMsg {
        self.exclusive = true;
        self
    }
}

// SAFETY: a table message is a header plus a name, flags and at most
// USERDATA_MAXLEN bytes of user data: far below nft_nlmsg_maxsize().
unsafe impl NlMsg for TableMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (kind, flags) = match msg_type {
            MsgType::Add if self.exclusive => (
                libc::NFT_MSG_NEWTABLE,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            MsgType::Add => (libc::NFT_MSG_NEWTABLE, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELTABLE, libc::NLM_F_ACK),
        };
        // SAFETY: the NlMsg contract gives a buffer of nft_nlmsg_maxsize() bytes; the
        // table pointer is valid while `self` lives.
        unsafe {
            let nlh = header(buf, kind as u16, INET, flags as u16, seq);
            sys::nftnl_table_nlmsg_build_payload(nlh, self.table.as_ptr());
        }
    }
}

impl Drop for TableMsg {
    fn drop(&mut self) {
        // SAFETY: we own the table and free it exactly once.
        unsafe { sys::nftnl_table_free(self.table.as_ptr()) };
    }
}

// ---------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------

/// The hook of a base chain, as the kernel takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseHook {
    /// `NF_INET_*` hook number.
    pub hook: u32,
    pub priority: i32,
    /// `NF_ACCEPT` / `NF_DROP`.
    pub policy: u32,
    /// `NFTA_CHAIN_TYPE`: `filter` or `nat`.
    pub chain_type: &'static CStr,
}

/// `chain inet TABLE NAME`: a regular chain, or a base chain of type
/// `filter`, with an optional comment in its user data
/// (`NFTNL_UDATA_CHAIN_COMMENT`, what nft shows as `comment "..."`; kernel 5.10+).
///
/// Sent as `NFT_MSG_NEWCHAIN` without `NLM_F_EXCL`, it creates the chain, or,
/// for a base chain that exists with the same hook, priority and type,
/// updates its policy in place (`nf_tables_updchain`); the kernel ignores a
/// new comment on an existing chain.
pub struct ChainMsg {
    chain: NonNull<sys::nftnl_chain>,
}

impl ChainMsg {
    pub fn new(table: &CStr, name: &CStr, base: Option<BaseHook>, comment: Option<&CStr>) -> Self {
        // SAFETY: nftnl_chain_alloc returns a fresh, zeroed chain or NULL (handled by `allocated`).
        let chain = allocated(unsafe { sys::nftnl_chain_alloc() });
        let raw = chain.as_ptr();
        // SAFETY: `raw` is a valid chain we own; the setters copy strings and integers.
        unsafe {
            sys::nftnl_chain_set_u32(raw, sys::NFTNL_CHAIN_FAMILY as u16, u32::from(INET));
            sys::nftnl_chain_set_str(raw, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
            sys::nftnl_chain_set_str(raw, sys::NFTNL_CHAIN_NAME as u16, name.as_ptr());
            if let Some(base) = base {
                sys::nftnl_chain_set_u32(raw, sys::NFTNL_CHAIN_HOOKNUM as u16, base.hook);
                sys::nftnl_chain_set_s32(raw, sys::NFTNL_CHAIN_PRIO as u16, base.priority);
                sys::nftnl_chain_set_str(
                    raw,
                    sys::NFTNL_CHAIN_TYPE as u16,
                    base.chain_type.as_ptr(),
                );
                sys::nftnl_chain_set_u32(raw, sys::NFTNL_CHAIN_POLICY as u16, base.policy);
            }
        }
        if let Some(comment) = comment {
            let udata = udata_record(
                sys::NFTNL_UDATA_CHAIN_COMMENT as u8,
                comment.to_bytes_with_nul(),
            );
            assert!(
                udata.len() <= USERDATA_MAXLEN,
                "chain comment longer than the kernel allows"
            );
            // SAFETY: `udata` is a live buffer of exactly `udata.len()` bytes; libnftnl copies it.
            let rc = unsafe {
                sys::nftnl_chain_set_data(
                    raw,
                    sys::NFTNL_CHAIN_USERDATA as u16,
                    udata.as_ptr().cast::<c_void>(),
                    udata.len() as u32,
                )
            };
            if rc < 0 {
                std::process::abort();
            }
        }
        ChainMsg { chain }
    }
}

// SAFETY: a chain message is a header, names, hook attributes and at most
// USERDATA_MAXLEN bytes of user data: far below nft_nlmsg_maxsize().
unsafe impl NlMsg for ChainMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (kind, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWCHAIN, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELCHAIN, libc::NLM_F_ACK),
        };
        // SAFETY: the NlMsg contract gives a buffer of nft_nlmsg_maxsize() bytes; the
        // chain pointer is valid while `self` lives.
        unsafe {
            let nlh = header(buf, kind as u16, INET, flags as u16, seq);
            sys::nftnl_chain_nlmsg_build_payload(nlh, self.chain.as_ptr());
        }
    }
}

impl Drop for ChainMsg {
    fn drop(&mut self) {
        // SAFETY: we own the chain and free it exactly once.
        unsafe { sys::nftnl_chain_free(self.chain.as_ptr()) };
    }
}

// ---------------------------------------------------------------------------
// Sets and elements
// ---------------------------------------------------------------------------

/// Everything the kernel needs to create a set.
#[derive(Debug, Clone)]
pub struct SetDefinition {
    /// A name, or `__set%d` for an anonymous set (the kernel picks the number).
    pub name: CString,
    /// Transaction-local id: lookups and element messages in the same batch refer to the set by it.
    pub id: u32,
    /// `NFT_SET_*` flags.
    pub flags: u32,
    /// nft's datatype id of the key (opaque to the kernel, used by `nft list`).
    pub key_type: u32,
    /// Key length in bytes; each concatenated field is padded to 4 bytes.
    pub key_len: u32,
    /// Byte lengths of the fields of a concatenated key (`NFTA_SET_DESC_CONCAT`), else empty.
    pub field_lens: Vec<u8>,
    /// nft's `NFTNL_UDATA_SET_KEYBYTEORDER` (1 host, 2 big endian), so `nft list` prints keys right.
    pub key_byteorder: u32,
}

/// A set, as a `NFT_MSG_NEWSET` message and as the container of the elements
/// that go into element messages.
pub struct SetMsg {
    set: NonNull<sys::nftnl_set>,
    elements: usize,
}

impl SetMsg {
    /// A set to create.
    pub fn new(table: &CStr, definition: &SetDefinition) -> SetMsg {
        let set = SetMsg::existing(table, &definition.name);
        let raw = set.set.as_ptr();
        // SAFETY: `raw` is a valid set we own; integer setters copy their value.
        unsafe {
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_ID as u16, definition.id);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_FLAGS as u16, definition.flags);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_KEY_TYPE as u16, definition.key_type);
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_KEY_LEN as u16, definition.key_len);
        }
        if !definition.field_lens.is_empty() {
            // libnftnl keeps at most NFT_REG32_COUNT (16) field lengths and counts
            // them up to the first zero, so at most 15 may be passed.
            assert!(definition.field_lens.len() < 16 && !definition.field_lens.contains(&0));
            // SAFETY: `field_lens` is a live buffer of its length (< 16 bytes, the size of
            // libnftnl's field_len array); libnftnl copies it.
            let rc = unsafe {
                sys::nftnl_set_set_data(
                    raw,
                    sys::NFTNL_SET_DESC_CONCAT as u16,
                    definition.field_lens.as_ptr().cast::<c_void>(),
                    definition.field_lens.len() as u32,
                )
            };
            if rc < 0 {
                std::process::abort();
            }
        }
        let udata = udata_record(
            sys::NFTNL_UDATA_SET_KEYBYTEORDER as u8,
            &definition.key_byteorder.to_ne_bytes(),
        );
        // SAFETY: `udata` is a live buffer of its length; libnftnl copies it.
        let rc = unsafe {
            sys::nftnl_set_set_data(
                raw,
                sys::NFTNL_SET_USERDATA as u16,
                udata.as_ptr().cast(),
                udata.len() as u32,
            )
        };
        if rc < 0 {
            std::process::abort();
        }
        set
    }

    /// A reference to an existing set, to carry element messages.
    pub fn existing(table: &CStr, name: &CStr) -> SetMsg {
        // SAFETY: nftnl_set_alloc returns a fresh, zeroed set or NULL (handled by `allocated`).
        let set = allocated(unsafe { sys::nftnl_set_alloc() });
        let raw = set.as_ptr();
        // SAFETY: `raw` is a valid set we own; string setters copy the string.
        unsafe {
            sys::nftnl_set_set_u32(raw, sys::NFTNL_SET_FAMILY as u16, u32::from(INET));
            sys::nftnl_set_set_str(raw, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
            sys::nftnl_set_set_str(raw, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        }
        SetMsg { set, elements: 0 }
    }

    /// Append an element to the set's element list (sent by [`SetMsg::element_messages`]).
    /// Elements pushed so far.
    pub fn element_count(&self) -> usize {
        self.elements
    }

    pub fn push(&mut self, element: &RawElement) {
        // SAFETY: nftnl_set_elem_alloc returns a fresh element or NULL (handled by `allocated`).
        let elem = allocated(unsafe { sys::nftnl_set_elem_alloc() }).as_ptr();
        // SAFETY: `elem` is a valid element; key buffers are live slices of their length
        // (at most 64 bytes, the size of libnftnl's data register); libnftnl copies them.
        // nftnl_set_elem_add hands the element to the set, which frees it.
        unsafe {
            set_elem_bytes(elem, sys::NFTNL_SET_ELEM_KEY, &element.key);
            if let Some(end) = &element.key_end {
                set_elem_bytes(elem, sys::NFTNL_SET_ELEM_KEY_END, end);
            }
            if element.interval_end {
                sys::nftnl_set_elem_set_u32(
                    elem,
                    sys::NFTNL_SET_ELEM_FLAGS as u16,
                    libc::NFT_SET_ELEM_INTERVAL_END as u32,
                );
            }
            if let Some(timeout) = element.timeout_ms {
                sys::nftnl_set_elem_set_u64(elem, sys::NFTNL_SET_ELEM_TIMEOUT as u16, timeout);
            }
            if let Some(expiration) = element.expiration_ms {
                sys::nftnl_set_elem_set_u64(
                    elem,
                    sys::NFTNL_SET_ELEM_EXPIRATION as u16,
                    expiration,
                );
            }
            sys::nftnl_set_elem_add(self.set.as_ptr(), elem);
        }
        self.elements += 1;
    }

    /// The element messages for the elements pushed so far. Add them to a
    /// batch while [`ElementMessages::has_more`] holds: libnftnl packs as many
    /// elements into each message as fit in a netlink attribute (64 KiB).
    pub fn element_messages(&self, op: ElementOp) -> ElementMessages<'_> {
        // SAFETY: the set is valid; the iterator borrows its element list, and
        // `ElementMessages` borrows `self`, so the set outlives the iterator.
        let iter = allocated(unsafe { sys::nftnl_set_elems_iter_create(self.set.as_ptr()) });
        ElementMessages {
            set: self,
            iter,
            op,
            more: Cell::new(self.elements > 0),
        }
    }
}

/// # Safety
/// `elem` must be a valid element and `bytes` at most 64 bytes long.
unsafe fn set_elem_bytes(elem: *mut sys::nftnl_set_elem, attr: u32, bytes: &[u8]) {
    assert!(
        bytes.len() <= 64,
        "set key longer than an nftables data register"
    );
    // SAFETY: see the function contract; libnftnl copies `bytes.len()` bytes.
    let rc = unsafe {
        sys::nftnl_set_elem_set(elem, attr as u16, bytes.as_ptr().cast(), bytes.len() as u32)
    };
    if rc < 0 {
        std::process::abort();
    }
}

// SAFETY: a set message holds a header, names, a few integers, the concat
// description and a short user data record: far below nft_nlmsg_maxsize().
unsafe impl NlMsg for SetMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (kind, flags) = match msg_type {
            MsgType::Add => (libc::NFT_MSG_NEWSET, libc::NLM_F_CREATE | libc::NLM_F_ACK),
            MsgType::Del => (libc::NFT_MSG_DELSET, libc::NLM_F_ACK),
        };
        // SAFETY: the NlMsg contract gives a buffer of nft_nlmsg_maxsize() bytes; the set is valid.
        unsafe {
            let nlh = header(buf, kind as u16, INET, flags as u16, seq);
            sys::nftnl_set_nlmsg_build_payload(nlh, self.set.as_ptr());
        }
    }
}

impl Drop for SetMsg {
    fn drop(&mut self) {
        // SAFETY: we own the set (and through it its elements) and free it exactly once.
        unsafe { sys::nftnl_set_free(self.set.as_ptr()) };
    }
}

/// Successive element messages of one set; see [`SetMsg::element_messages`].
pub struct ElementMessages<'a> {
    set: &'a SetMsg,
    iter: NonNull<sys::nftnl_set_elems_iter>,
    op: ElementOp,
    more: Cell<bool>,
}

impl ElementMessages<'_> {
    /// Whether elements remain that no message written so far carries.
    pub fn has_more(&self) -> bool {
        self.more.get()
    }
}

// SAFETY: nftnl_set_elems_nlmsg_build_payload_iter stops adding elements once
// the element list attribute would exceed 64 KiB (its length is 16 bits), and
// backs off the element that overflowed, so a message never exceeds
// nft_nlmsg_maxsize() = 64 KiB + one page.
unsafe impl NlMsg for ElementMessages<'_> {
    /// Writes the next message; `msg_type` is ignored, the operation was chosen
    /// when the messages were created.
    unsafe fn write(&self, buf: *mut c_void, seq: u32, _msg_type: MsgType) {
        let (kind, flags) = match self.op {
            ElementOp::Create => (
                libc::NFT_MSG_NEWSETELEM as u16,
                libc::NLM_F_CREATE | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            ElementOp::Add => (
                libc::NFT_MSG_NEWSETELEM as u16,
                libc::NLM_F_CREATE | libc::NLM_F_ACK,
            ),
            ElementOp::Destroy => (NFT_MSG_DESTROYSETELEM, libc::NLM_F_ACK),
            ElementOp::Delete => (libc::NFT_MSG_DELSETELEM as u16, libc::NLM_F_ACK),
        };
        // SAFETY: the NlMsg contract gives a buffer of nft_nlmsg_maxsize() bytes; the
        // iterator is valid and its set outlives it (borrowed by `self`).
        let rc = unsafe {
            let nlh = header(buf, kind, INET, flags as u16, seq);
            sys::nftnl_set_elems_nlmsg_build_payload_iter(nlh, self.iter.as_ptr())
        };
        // 1: the message is full and elements remain; 0: all elements are written.
        self.more.set(rc > 0);
        let _ = self.set;
    }
}

impl Drop for ElementMessages<'_> {
    fn drop(&mut self) {
        // SAFETY: we own the iterator and destroy it exactly once; its set is still alive.
        unsafe { sys::nftnl_set_elems_iter_destroy(self.iter.as_ptr()) };
    }
}

/// A message written without `NLM_F_ACK`: nfnetlink reports a failed
/// message whatever its flags (`nfnetlink_rcv_batch` queues an answer when
/// `NLM_F_ACK` is set *or* the message failed), so in a batch whose end is
/// acknowledged, per-message success answers are only overhead: one skb
/// for the kernel and one receive call each.
///
/// With `echo`, the message carries `NLM_F_ECHO`: at commit, the kernel sends
/// every object the message created, changed or deleted back to this socket,
/// as it then holds it (`nf_tables_*_notify` with `ctx->report` set from
/// `nlmsg_report()`, the same `nf_tables_fill_*` encoders a dump uses, queued
/// on the notify list and sent by `nft_commit_notify` before the batch's
/// acknowledgements). This is what `nft --echo` asks for.
pub struct WithoutAck<'a, T: NlMsg> {
    pub message: &'a T,
    pub echo: bool,
}

// SAFETY: writes exactly what the wrapped message writes (which upholds the
// size contract), then changes two flag bits in the header it wrote.
unsafe impl<T: NlMsg> NlMsg for WithoutAck<'_, T> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // SAFETY: same buffer contract as ours; the wrapped message starts with an
        // nlmsghdr at `buf` (every nf_tables message does), and `buf` is aligned for
        // it because nftnl_batch hands out NLMSG_ALIGNed positions.
        unsafe {
            self.message.write(buf, seq, msg_type);
            let nlh = buf.cast::<libc::nlmsghdr>();
            (*nlh).nlmsg_flags &= !(libc::NLM_F_ACK as u16);
            if self.echo {
                (*nlh).nlmsg_flags |= libc::NLM_F_ECHO as u16;
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Rules
// ---------------------------------------------------------------------------

/// A rule message's attributes (`NFTA_RULE_*`), written by
/// `rule_message::RuleWriter`, at most 64 KiB of them.
pub struct RuleMsg {
    attributes: Vec<u8>,
}

impl RuleMsg {
    /// `attributes` must fit in a message: at most `u16::MAX` bytes.
    pub fn new(attributes: Vec<u8>) -> RuleMsg {
        assert!(
            attributes.len() <= usize::from(u16::MAX),
            "a rule message's attributes fit a netlink attribute"
        );
        RuleMsg { attributes }
    }
}

// SAFETY: writes a header and at most u16::MAX bytes of attributes, within
// the nft_nlmsg_maxsize() bytes (u16::MAX plus a page) the contract gives.
unsafe impl NlMsg for RuleMsg {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        // The flags nft and libnftnl send with a new rule: append it to the
        // chain.
        let (kind, flags) = match msg_type {
            MsgType::Add => (
                libc::NFT_MSG_NEWRULE,
                libc::NLM_F_CREATE | libc::NLM_F_APPEND | libc::NLM_F_EXCL | libc::NLM_F_ACK,
            ),
            MsgType::Del => (libc::NFT_MSG_DELRULE, libc::NLM_F_ACK),
        };
        // SAFETY: `buf` holds nft_nlmsg_maxsize() bytes (the NlMsg contract):
        // the header takes NLMSG_HDRLEN plus the 4-byte nfgenmsg, and the
        // attributes (at most u16::MAX bytes, `RuleMsg::new`) go right
        // after it, at the 4-byte aligned end of the message, without
        // overlapping `self.attributes`, which is memory of our own.
        unsafe {
            let nlh = header(buf, kind as u16, INET, flags as u16, seq);
            let end = (*nlh).nlmsg_len as usize;
            std::ptr::copy_nonoverlapping(
                self.attributes.as_ptr(),
                nlh.cast::<u8>().add(end),
                self.attributes.len(),
            );
            (*nlh).nlmsg_len += self.attributes.len() as u32;
        }
    }
}

// ---------------------------------------------------------------------------
// The reference for rule messages
// ---------------------------------------------------------------------------

/// libnftnl expression objects for what nftnl's safe API lacks (or only
/// offers on register 1), and the bytes of a message: the reference that
/// `rule_message`'s tests compare the rules it writes against, byte for
/// byte.
#[cfg(test)]
pub mod reference {
    use super::*;
    use nftnl::expr::Expression;

    /// The bytes `message` writes as a new object with sequence number 1.
    pub fn message_bytes(message: &impl NlMsg) -> Vec<u8> {
        let size = nftnl::nft_nlmsg_maxsize() as usize;
        // u64 words: a buffer aligned for an nlmsghdr.
        let mut buffer = vec![0u64; size.div_ceil(8)];
        let start = buffer.as_mut_ptr().cast::<u8>();
        // SAFETY: `buffer` holds nft_nlmsg_maxsize() bytes, aligned for an
        // nlmsghdr (the NlMsg contract); the message's length is read from
        // the header it wrote and is within the buffer.
        unsafe {
            message.write(start.cast(), 1, MsgType::Add);
            let length = (*start.cast::<libc::nlmsghdr>()).nlmsg_len as usize;
            assert!(length <= size, "a message longer than its buffer");
            std::slice::from_raw_parts(start, length).to_vec()
        }
    }

    fn new_expr(name: &CStr) -> NonNull<sys::nftnl_expr> {
        // SAFETY: `name` is a NUL-terminated expression name; NULL is handled by `allocated`.
        allocated(unsafe { sys::nftnl_expr_alloc(name.as_ptr()) })
    }

    /// `meta load KEY => reg DREG`.
    pub struct MetaLoad {
        pub key: u32,
        pub dreg: u32,
    }

    impl Expression for MetaLoad {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"meta");
            // SAFETY: `expr` is a valid meta expression; integer setters copy their value.
            unsafe {
                sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_META_KEY as u16, self.key);
                sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_META_DREG as u16, self.dreg);
            }
            expr
        }
    }

    /// `payload load LEN b @ BASE header + OFFSET => reg DREG`.
    pub struct PayloadLoad {
        pub base: u32,
        pub offset: u32,
        pub len: u32,
        pub dreg: u32,
    }

    impl Expression for PayloadLoad {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"payload");
            // SAFETY: `expr` is a valid payload expression; integer setters copy their value.
            unsafe {
                let raw = expr.as_ptr();
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_PAYLOAD_BASE as u16, self.base);
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_PAYLOAD_OFFSET as u16, self.offset);
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_PAYLOAD_LEN as u16, self.len);
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_PAYLOAD_DREG as u16, self.dreg);
            }
            expr
        }
    }

    /// `lookup reg SREG set NAME`.
    pub struct Lookup {
        pub sreg: u32,
        pub set: CString,
        /// The set's transaction id, for a set created in the same batch (an
        /// existing set is found by name).
        pub set_id: Option<u32>,
    }

    impl Expression for Lookup {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"lookup");
            // SAFETY: `expr` is a valid lookup expression; the set name is NUL-terminated and copied.
            unsafe {
                let raw = expr.as_ptr();
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_LOOKUP_SREG as u16, self.sreg);
                sys::nftnl_expr_set_str(raw, sys::NFTNL_EXPR_LOOKUP_SET as u16, self.set.as_ptr());
                if let Some(set_id) = self.set_id {
                    sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_LOOKUP_SET_ID as u16, set_id);
                }
            }
            expr
        }
    }

    /// `log group GROUP prefix PREFIX`: the packet goes to nflog group GROUP.
    pub struct Log {
        pub group: u16,
        pub prefix: CString,
    }

    impl Expression for Log {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"log");
            // SAFETY: `expr` is a valid log expression; the group is a u16 attribute in
            // libnftnl (NFTNL_EXPR_LOG_GROUP) and the prefix is NUL-terminated and copied.
            unsafe {
                let raw = expr.as_ptr();
                sys::nftnl_expr_set_u16(raw, sys::NFTNL_EXPR_LOG_GROUP as u16, self.group);
                sys::nftnl_expr_set_str(
                    raw,
                    sys::NFTNL_EXPR_LOG_PREFIX as u16,
                    self.prefix.as_ptr(),
                );
            }
            expr
        }
    }

    /// `immediate reg DREG DATA`: loads constant data into a register (the
    /// verdict form is nftnl's `Verdict`).
    pub struct ImmediateData {
        pub dreg: u32,
        pub data: Vec<u8>,
    }

    impl Expression for ImmediateData {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"immediate");
            // SAFETY: `expr` is a valid immediate expression; libnftnl copies the
            // data (at most 16 bytes, one register; the caller passes 2).
            unsafe {
                let raw = expr.as_ptr();
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_IMM_DREG as u16, self.dreg);
                sys::nftnl_expr_set(
                    raw,
                    sys::NFTNL_EXPR_IMM_DATA as u16,
                    self.data.as_ptr().cast(),
                    self.data.len() as u32,
                );
            }
            expr
        }
    }

    /// `redir proto_min reg SREG flags FLAGS`: redirect to the port in SREG on
    /// the host itself (nft_redir).
    pub struct Redirect {
        pub sreg_proto_min: u32,
        pub flags: u32,
    }

    impl Expression for Redirect {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"redir");
            // SAFETY: `expr` is a valid redir expression; integer setters copy their value.
            unsafe {
                let raw = expr.as_ptr();
                sys::nftnl_expr_set_u32(
                    raw,
                    sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN as u16,
                    self.sreg_proto_min,
                );
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_REDIR_FLAGS as u16, self.flags);
            }
            expr
        }
    }

    /// `ct set KEY with reg SREG`: sets conntrack metadata (e.g. the zone) from a register.
    pub struct CtSet {
        pub key: u32,
        pub sreg: u32,
    }

    impl Expression for CtSet {
        fn to_expr(&self, _rule: &nftnl::Rule) -> NonNull<sys::nftnl_expr> {
            let expr = new_expr(c"ct");
            // SAFETY: `expr` is a valid ct expression; integer setters copy their value.
            unsafe {
                let raw = expr.as_ptr();
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_CT_KEY as u16, self.key);
                sys::nftnl_expr_set_u32(raw, sys::NFTNL_EXPR_CT_SREG as u16, self.sreg);
            }
            expr
        }
    }
}

// ---------------------------------------------------------------------------
// Dump requests
// ---------------------------------------------------------------------------

/// Which objects of the table a request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    /// `NFT_MSG_GETGEN`: the ruleset generation id, which every commit changes.
    Generation,
    /// `NFT_MSG_GETTABLE` for one table: the table, or ENOENT.
    Table,
    /// `NFT_MSG_GETSET` dump of the table's sets.
    Sets,
    /// `NFT_MSG_GETSETELEM` dump of one set's elements.
    Elements(&'a CStr),
    /// `NFT_MSG_GETCHAIN` dump.
    Chains,
    /// `NFT_MSG_GETRULE` dump of one chain's rules (`NFTA_RULE_CHAIN` in the
    /// request: `nf_tables_dump_rules` then visits that chain only).
    ChainRules(&'a CStr),
    /// `NFT_MSG_GETRULE` dump of every rule of the table.
    Rules,
}

/// Write `request` for table `table` into `buf` and return its length.
pub fn write_request(buf: &mut [u8], request: Request<'_>, table: &CStr, seq: u32) -> usize {
    assert!(
        buf.len() >= nftnl::nft_nlmsg_maxsize() as usize,
        "request buffer too small"
    );
    assert!(
        buf.as_ptr().cast::<libc::nlmsghdr>().is_aligned(),
        "request buffer not aligned"
    );
    let dump = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    let buf_ptr = buf.as_mut_ptr().cast::<c_void>();
    // SAFETY: `buf` is aligned and at least nft_nlmsg_maxsize() bytes (asserted);
    // every object built here is valid, filled with copied strings, and freed
    // after its payload has been written.
    unsafe {
        let nlh = match request {
            Request::Generation => header(
                buf_ptr,
                libc::NFT_MSG_GETGEN as u16,
                ProtoFamily::Unspec as u16,
                libc::NLM_F_REQUEST as u16,
                seq,
            ),
            Request::Table => {
                let nlh = header(
                    buf_ptr,
                    libc::NFT_MSG_GETTABLE as u16,
                    INET,
                    libc::NLM_F_REQUEST as u16,
                    seq,
                );
                let object = allocated(sys::nftnl_table_alloc()).as_ptr();
                sys::nftnl_table_set_str(object, sys::NFTNL_TABLE_NAME as u16, table.as_ptr());
                sys::nftnl_table_nlmsg_build_payload(nlh, object);
                sys::nftnl_table_free(object);
                nlh
            }
            Request::Sets => {
                let nlh = header(buf_ptr, libc::NFT_MSG_GETSET as u16, INET, dump, seq);
                let object = allocated(sys::nftnl_set_alloc()).as_ptr();
                sys::nftnl_set_set_str(object, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
                sys::nftnl_set_nlmsg_build_payload(nlh, object);
                sys::nftnl_set_free(object);
                nlh
            }
            Request::Elements(set) => {
                let nlh = header(buf_ptr, libc::NFT_MSG_GETSETELEM as u16, INET, dump, seq);
                let object = allocated(sys::nftnl_set_alloc()).as_ptr();
                sys::nftnl_set_set_str(object, sys::NFTNL_SET_TABLE as u16, table.as_ptr());
                sys::nftnl_set_set_str(object, sys::NFTNL_SET_NAME as u16, set.as_ptr());
                sys::nftnl_set_elems_nlmsg_build_payload(nlh, object);
                sys::nftnl_set_free(object);
                nlh
            }
            Request::Chains => {
                let nlh = header(buf_ptr, libc::NFT_MSG_GETCHAIN as u16, INET, dump, seq);
                let object = allocated(sys::nftnl_chain_alloc()).as_ptr();
                sys::nftnl_chain_set_str(object, sys::NFTNL_CHAIN_TABLE as u16, table.as_ptr());
                sys::nftnl_chain_nlmsg_build_payload(nlh, object);
                sys::nftnl_chain_free(object);
                nlh
            }
            Request::Rules => {
                let nlh = header(buf_ptr, libc::NFT_MSG_GETRULE as u16, INET, dump, seq);
                let object = allocated(sys::nftnl_rule_alloc()).as_ptr();
                sys::nftnl_rule_set_str(object, sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
                sys::nftnl_rule_nlmsg_build_payload(nlh, object);
                sys::nftnl_rule_free(object);
                nlh
            }
            Request::ChainRules(chain) => {
                let nlh = header(buf_ptr, libc::NFT_MSG_GETRULE as u16, INET, dump, seq);
                let object = allocated(sys::nftnl_rule_alloc()).as_ptr();
                sys::nftnl_rule_set_str(object, sys::NFTNL_RULE_TABLE as u16, table.as_ptr());
                sys::nftnl_rule_set_str(object, sys::NFTNL_RULE_CHAIN as u16, chain.as_ptr());
                sys::nftnl_rule_nlmsg_build_payload(nlh, object);
                sys::nftnl_rule_free(object);
                nlh
            }
        };
        (*nlh).nlmsg_len as usize
    }
}

// ---------------------------------------------------------------------------
// libnftnl's parsers for the kernel's answers, kept for the tests
// ---------------------------------------------------------------------------

/// Objects the kernel's answers are parsed into (by [`super::attributes`]),
/// under the names other modules know them by.
pub use super::attributes::{ParsedSet, Reference};

/// libnftnl's parsers, which read the kernel's answers before
/// [`super::attributes`] did: the tests parse real kernel messages with both
/// and check that the results are the same.
#[cfg(test)]
pub mod nftnl_parsers {
    use super::*;
    use crate::kernel::attributes::{
        BitwiseData, ExprData, ParsedChain, ParsedExpr, ParsedRule, ParsedTable,
    };

    /// A whole netlink message from a receive buffer, checked to be safe to hand
    /// to libnftnl's parsers.
    fn message_header(message: &[u8]) -> Option<*const libc::nlmsghdr> {
        let nlh = message.as_ptr().cast::<libc::nlmsghdr>();
        if message.len() < size_of::<libc::nlmsghdr>() || !nlh.is_aligned() {
            return None;
        }
        // SAFETY: `message` is aligned and holds at least a header (checked above).
        let len = unsafe { (*nlh).nlmsg_len } as usize;
        (len >= size_of::<libc::nlmsghdr>() && len <= message.len()).then_some(nlh)
    }

    /// # Safety
    /// `ptr` must be NULL or point to a NUL-terminated string.
    unsafe fn owned_str(ptr: *const c_char) -> String {
        if ptr.is_null() {
            return String::new();
        }
        // SAFETY: non-NULL and NUL-terminated by the function contract.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }

    /// # Safety
    /// `ptr` must be NULL or point to `len` readable bytes.
    unsafe fn owned_bytes(ptr: *const c_void, len: u32) -> Vec<u8> {
        if ptr.is_null() {
            return Vec::new();
        }
        // SAFETY: `ptr` points to `len` readable bytes by the function contract.
        unsafe { std::slice::from_raw_parts(ptr.cast::<u8>(), len as usize) }.to_vec()
    }

    /// `NFT_MSG_NEWGEN`: the generation id.
    pub fn parse_generation(message: &[u8]) -> Option<u32> {
        let nlh = message_header(message)?;
        // SAFETY: `nlh` is a complete, aligned message (checked); the gen object is
        // allocated, filled by the parser and freed here.
        unsafe {
            let object = allocated(sys::nftnl_gen_alloc()).as_ptr();
            let ok = sys::nftnl_gen_nlmsg_parse(nlh, object) >= 0
                && sys::nftnl_gen_is_set(object, sys::NFTNL_GEN_ID as u16);
            let id = sys::nftnl_gen_get_u32(object, sys::NFTNL_GEN_ID as u16);
            sys::nftnl_gen_free(object);
            ok.then_some(id)
        }
    }

    pub fn parse_table(message: &[u8]) -> Option<ParsedTable> {
        let nlh = message_header(message)?;
        // SAFETY: `nlh` is a complete, aligned message (checked); getters return
        // pointers into the table object, copied before it is freed.
        unsafe {
            let object = allocated(sys::nftnl_table_alloc()).as_ptr();
            let parsed = (sys::nftnl_table_nlmsg_parse(nlh, object) >= 0).then(|| {
                let mut len = 0u32;
                let data = if sys::nftnl_table_is_set(object, sys::NFTNL_TABLE_USERDATA as u16) {
                    sys::nftnl_table_get_data(object, sys::NFTNL_TABLE_USERDATA as u16, &mut len)
                } else {
                    std::ptr::null()
                };
                ParsedTable {
                    name: owned_str(sys::nftnl_table_get_str(
                        object,
                        sys::NFTNL_TABLE_NAME as u16,
                    )),
                    family: sys::nftnl_table_get_u32(object, sys::NFTNL_TABLE_FAMILY as u16),
                    userdata: owned_bytes(data, len),
                }
            });
            sys::nftnl_table_free(object);
            parsed
        }
    }

    pub fn parse_set(message: &[u8]) -> Option<ParsedSet> {
        let nlh = message_header(message)?;
        // SAFETY: `nlh` is a complete, aligned message (checked); strings are copied
        // before the set object is freed.
        unsafe {
            let object = allocated(sys::nftnl_set_alloc()).as_ptr();
            let parsed = (sys::nftnl_set_nlmsg_parse(nlh, object) >= 0).then(|| ParsedSet {
                table: owned_str(sys::nftnl_set_get_str(object, sys::NFTNL_SET_TABLE as u16)),
                name: owned_str(sys::nftnl_set_get_str(object, sys::NFTNL_SET_NAME as u16)),
                family: sys::nftnl_set_get_u32(object, sys::NFTNL_SET_FAMILY as u16),
                flags: sys::nftnl_set_get_u32(object, sys::NFTNL_SET_FLAGS as u16),
                key_type: sys::nftnl_set_get_u32(object, sys::NFTNL_SET_KEY_TYPE as u16),
                key_len: sys::nftnl_set_get_u32(object, sys::NFTNL_SET_KEY_LEN as u16),
            });
            sys::nftnl_set_free(object);
            parsed
        }
    }

    /// One `NFT_MSG_NEWSETELEM` message of an element dump: the set name and its elements.
    pub fn parse_elements(message: &[u8]) -> Option<(String, Vec<RawElement>)> {
        let nlh = message_header(message)?;
        unsafe extern "C" fn collect(
            elem: *mut sys::nftnl_set_elem,
            data: *mut c_void,
        ) -> libc::c_int {
            // SAFETY: `data` is the `Vec<RawElement>` passed to nftnl_set_elem_foreach
            // below, alive and exclusively borrowed for the duration of the call; `elem`
            // is a valid element of the parsed set; data getters return pointers into it.
            unsafe {
                let out = &mut *data.cast::<Vec<RawElement>>();
                let bytes = |attr: u32| -> Option<Vec<u8>> {
                    if !sys::nftnl_set_elem_is_set(elem, attr as u16) {
                        return None;
                    }
                    let mut len = 0u32;
                    let ptr = sys::nftnl_set_elem_get(elem, attr as u16, &mut len);
                    Some(owned_bytes(ptr, len))
                };
                let u64_attr = |attr: u32| {
                    sys::nftnl_set_elem_is_set(elem, attr as u16)
                        .then(|| sys::nftnl_set_elem_get_u64(elem, attr as u16))
                };
                let flags = if sys::nftnl_set_elem_is_set(elem, sys::NFTNL_SET_ELEM_FLAGS as u16) {
                    sys::nftnl_set_elem_get_u32(elem, sys::NFTNL_SET_ELEM_FLAGS as u16)
                } else {
                    0
                };
                out.push(RawElement {
                    key: bytes(sys::NFTNL_SET_ELEM_KEY).unwrap_or_default(),
                    key_end: bytes(sys::NFTNL_SET_ELEM_KEY_END),
                    interval_end: flags & libc::NFT_SET_ELEM_INTERVAL_END as u32 != 0,
                    timeout_ms: u64_attr(sys::NFTNL_SET_ELEM_TIMEOUT),
                    expiration_ms: u64_attr(sys::NFTNL_SET_ELEM_EXPIRATION),
                });
            }
            0
        }
        let mut elements: Vec<RawElement> = Vec::new();
        // SAFETY: `nlh` is a complete, aligned message (checked); the set object is
        // allocated, filled by the parser, walked with `collect` (which only touches
        // `elements`, passed as its data pointer) and freed here.
        unsafe {
            let object = allocated(sys::nftnl_set_alloc()).as_ptr();
            let ok = sys::nftnl_set_elems_nlmsg_parse(nlh, object) >= 0;
            let name = owned_str(sys::nftnl_set_get_str(object, sys::NFTNL_SET_NAME as u16));
            if ok {
                sys::nftnl_set_elem_foreach(
                    object,
                    Some(collect),
                    (&mut elements as *mut Vec<RawElement>).cast(),
                );
            }
            sys::nftnl_set_free(object);
            ok.then_some((name, elements))
        }
    }

    pub fn parse_chain(message: &[u8]) -> Option<ParsedChain> {
        let nlh = message_header(message)?;
        // SAFETY: `nlh` is a complete, aligned message (checked); strings are copied
        // before the chain object is freed.
        unsafe {
            let object = allocated(sys::nftnl_chain_alloc()).as_ptr();
            let is_set = |attr: u32| sys::nftnl_chain_is_set(object, attr as u16);
            let parsed = (sys::nftnl_chain_nlmsg_parse(nlh, object) >= 0).then(|| ParsedChain {
                table: owned_str(sys::nftnl_chain_get_str(
                    object,
                    sys::NFTNL_CHAIN_TABLE as u16,
                )),
                name: owned_str(sys::nftnl_chain_get_str(
                    object,
                    sys::NFTNL_CHAIN_NAME as u16,
                )),
                family: sys::nftnl_chain_get_u32(object, sys::NFTNL_CHAIN_FAMILY as u16),
                hook: is_set(sys::NFTNL_CHAIN_HOOKNUM)
                    .then(|| sys::nftnl_chain_get_u32(object, sys::NFTNL_CHAIN_HOOKNUM as u16)),
                priority: is_set(sys::NFTNL_CHAIN_PRIO)
                    .then(|| sys::nftnl_chain_get_s32(object, sys::NFTNL_CHAIN_PRIO as u16)),
                policy: is_set(sys::NFTNL_CHAIN_POLICY)
                    .then(|| sys::nftnl_chain_get_u32(object, sys::NFTNL_CHAIN_POLICY as u16)),
                chain_type: is_set(sys::NFTNL_CHAIN_TYPE).then(|| {
                    owned_str(sys::nftnl_chain_get_str(
                        object,
                        sys::NFTNL_CHAIN_TYPE as u16,
                    ))
                }),
                userdata: if is_set(sys::NFTNL_CHAIN_USERDATA) {
                    let mut len = 0u32;
                    let data = sys::nftnl_chain_get_data(
                        object,
                        sys::NFTNL_CHAIN_USERDATA as u16,
                        &mut len,
                    );
                    owned_bytes(data, len)
                } else {
                    Vec::new()
                },
            });
            sys::nftnl_chain_free(object);
            parsed
        }
    }

    /// What libnftnl read of the attributes of an expression named `name`
    /// (its counts and references aside), as `attributes` reads them.
    ///
    /// # Safety
    /// `expr` must be a valid expression of a parsed rule.
    unsafe fn expression_data(expr: *mut sys::nftnl_expr, name: &str) -> ExprData {
        // SAFETY: `expr` is valid (function contract); getters of a set
        // attribute return pointers into it, copied here.
        unsafe {
            let set = |attr: u32| sys::nftnl_expr_is_set(expr, attr as u16);
            let u32_of = |attr: u32| set(attr).then(|| sys::nftnl_expr_get_u32(expr, attr as u16));
            let u32_or_0 = |attr: u32| u32_of(attr).unwrap_or_default();
            let u16_of = |attr: u32| set(attr).then(|| sys::nftnl_expr_get_u16(expr, attr as u16));
            let u8_of = |attr: u32| set(attr).then(|| sys::nftnl_expr_get_u8(expr, attr as u16));
            let bytes = |attr: u32| {
                set(attr).then(|| {
                    let mut len = 0u32;
                    owned_bytes(sys::nftnl_expr_get(expr, attr as u16, &mut len), len)
                })
            };
            let bytes_or_empty = |attr: u32| bytes(attr).unwrap_or_default();
            match name {
                "lookup" => ExprData::Lookup {
                    sreg: u32_or_0(sys::NFTNL_EXPR_LOOKUP_SREG),
                    dreg: u32_of(sys::NFTNL_EXPR_LOOKUP_DREG),
                    flags: u32_or_0(sys::NFTNL_EXPR_LOOKUP_FLAGS),
                    anonymous: None,
                },
                "immediate" => ExprData::Immediate {
                    dreg: u32_or_0(sys::NFTNL_EXPR_IMM_DREG),
                    value: bytes(sys::NFTNL_EXPR_IMM_DATA),
                    verdict: u32_of(sys::NFTNL_EXPR_IMM_VERDICT).map(|v| v as i32),
                },
                "meta" => ExprData::Meta {
                    key: u32_or_0(sys::NFTNL_EXPR_META_KEY),
                    dreg: u32_of(sys::NFTNL_EXPR_META_DREG),
                    sreg: u32_of(sys::NFTNL_EXPR_META_SREG),
                },
                "payload" => ExprData::Payload {
                    base: u32_or_0(sys::NFTNL_EXPR_PAYLOAD_BASE),
                    offset: u32_or_0(sys::NFTNL_EXPR_PAYLOAD_OFFSET),
                    len: u32_or_0(sys::NFTNL_EXPR_PAYLOAD_LEN),
                    dreg: u32_of(sys::NFTNL_EXPR_PAYLOAD_DREG),
                    sreg: u32_of(sys::NFTNL_EXPR_PAYLOAD_SREG),
                    csum_type: u32_or_0(sys::NFTNL_EXPR_PAYLOAD_CSUM_TYPE),
                    csum_offset: u32_or_0(sys::NFTNL_EXPR_PAYLOAD_CSUM_OFFSET),
                    csum_flags: u32_or_0(sys::NFTNL_EXPR_PAYLOAD_FLAGS),
                },
                "cmp" => ExprData::Cmp {
                    sreg: u32_or_0(sys::NFTNL_EXPR_CMP_SREG),
                    op: u32_or_0(sys::NFTNL_EXPR_CMP_OP),
                    data: bytes_or_empty(sys::NFTNL_EXPR_CMP_DATA),
                },
                "bitwise" => ExprData::Bitwise(Box::new(BitwiseData {
                    sreg: u32_or_0(sys::NFTNL_EXPR_BITWISE_SREG),
                    dreg: u32_or_0(sys::NFTNL_EXPR_BITWISE_DREG),
                    len: u32_or_0(sys::NFTNL_EXPR_BITWISE_LEN),
                    op: u32_or_0(sys::NFTNL_EXPR_BITWISE_OP),
                    mask: bytes_or_empty(sys::NFTNL_EXPR_BITWISE_MASK),
                    xor: bytes_or_empty(sys::NFTNL_EXPR_BITWISE_XOR),
                    data: bytes_or_empty(sys::NFTNL_EXPR_BITWISE_DATA),
                    // libnftnl 1.2.4 predates NFTA_BITWISE_SREG2 (Linux 6.13).
                    sreg2: None,
                })),
                "ct" => ExprData::Ct {
                    key: u32_or_0(sys::NFTNL_EXPR_CT_KEY),
                    dreg: u32_of(sys::NFTNL_EXPR_CT_DREG),
                    sreg: u32_of(sys::NFTNL_EXPR_CT_SREG),
                    direction: u8_of(sys::NFTNL_EXPR_CT_DIR),
                },
                "log" => ExprData::Log {
                    group: u16_of(sys::NFTNL_EXPR_LOG_GROUP),
                    prefix: set(sys::NFTNL_EXPR_LOG_PREFIX).then(|| {
                        owned_str(sys::nftnl_expr_get_str(
                            expr,
                            sys::NFTNL_EXPR_LOG_PREFIX as u16,
                        ))
                    }),
                    snaplen: u32_or_0(sys::NFTNL_EXPR_LOG_SNAPLEN),
                    qthreshold: u16_of(sys::NFTNL_EXPR_LOG_QTHRESHOLD).unwrap_or_default(),
                    level: u32_of(sys::NFTNL_EXPR_LOG_LEVEL),
                    flags: u32_or_0(sys::NFTNL_EXPR_LOG_FLAGS),
                },
                "reject" => ExprData::Reject {
                    kind: u32_or_0(sys::NFTNL_EXPR_REJECT_TYPE),
                    code: u8_of(sys::NFTNL_EXPR_REJECT_CODE),
                },
                "redir" => ExprData::Redir {
                    proto_min: u32_of(sys::NFTNL_EXPR_REDIR_REG_PROTO_MIN),
                    proto_max: u32_of(sys::NFTNL_EXPR_REDIR_REG_PROTO_MAX),
                    flags: u32_or_0(sys::NFTNL_EXPR_REDIR_FLAGS),
                },
                _ => ExprData::Opaque,
            }
        }
    }

    pub fn parse_rule(message: &[u8]) -> Option<ParsedRule> {
        let nlh = message_header(message)?;
        // SAFETY: `nlh` is a complete, aligned message (checked); strings and user data
        // are copied, and the expression iterator is destroyed, before the rule is freed.
        unsafe {
            let object = allocated(sys::nftnl_rule_alloc()).as_ptr();
            if sys::nftnl_rule_nlmsg_parse(nlh, object) < 0 {
                sys::nftnl_rule_free(object);
                return None;
            }
            let mut len = 0u32;
            let data = if sys::nftnl_rule_is_set(object, sys::NFTNL_RULE_USERDATA as u16) {
                sys::nftnl_rule_get_data(object, sys::NFTNL_RULE_USERDATA as u16, &mut len)
            } else {
                std::ptr::null()
            };
            let mut expressions = Vec::new();
            let iter = allocated(sys::nftnl_expr_iter_create(object)).as_ptr();
            let mut expr = sys::nftnl_expr_iter_next(iter);
            while !expr.is_null() {
                let name = owned_str(sys::nftnl_expr_get_str(expr, sys::NFTNL_EXPR_NAME as u16));
                let counter = (name == "counter").then(|| {
                    (
                        sys::nftnl_expr_get_u64(expr, sys::NFTNL_EXPR_CTR_PACKETS as u16),
                        sys::nftnl_expr_get_u64(expr, sys::NFTNL_EXPR_CTR_BYTES as u16),
                    )
                });
                let attr = |attr: u32| sys::nftnl_expr_is_set(expr, attr as u16);
                let text = |attr: u32| owned_str(sys::nftnl_expr_get_str(expr, attr as u16));
                let reference = match name.as_str() {
                    "lookup" if attr(sys::NFTNL_EXPR_LOOKUP_SET) => {
                        Some(Reference::Set(text(sys::NFTNL_EXPR_LOOKUP_SET)))
                    }
                    "immediate" if attr(sys::NFTNL_EXPR_IMM_CHAIN) => {
                        let chain = text(sys::NFTNL_EXPR_IMM_CHAIN);
                        let verdict =
                            sys::nftnl_expr_get_u32(expr, sys::NFTNL_EXPR_IMM_VERDICT as u16)
                                as i32;
                        Some(if verdict == libc::NFT_GOTO {
                            Reference::Goto(chain)
                        } else {
                            Reference::Jump(chain)
                        })
                    }
                    _ => None,
                };
                let data = expression_data(expr, &name);
                expressions.push(ParsedExpr {
                    name,
                    counter,
                    reference,
                    data,
                });
                expr = sys::nftnl_expr_iter_next(iter);
            }
            sys::nftnl_expr_iter_destroy(iter);
            let parsed = ParsedRule {
                table: owned_str(sys::nftnl_rule_get_str(
                    object,
                    sys::NFTNL_RULE_TABLE as u16,
                )),
                chain: owned_str(sys::nftnl_rule_get_str(
                    object,
                    sys::NFTNL_RULE_CHAIN as u16,
                )),
                family: sys::nftnl_rule_get_u32(object, sys::NFTNL_RULE_FAMILY as u16),
                handle: sys::nftnl_rule_get_u64(object, sys::NFTNL_RULE_HANDLE as u16),
                userdata: owned_bytes(data, len),
                expressions,
            };
            sys::nftnl_rule_free(object);
            Some(parsed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn udata_round_trip() {
        let blob = [udata_record(1, b"x\0"), udata_record(0, b"sha256:ab\0")].concat();
        assert_eq!(
            udata_find(&blob, 0).map(udata_string).as_deref(),
            Some("sha256:ab")
        );
        assert_eq!(udata_find(&blob, 1).map(udata_string).as_deref(), Some("x"));
        assert_eq!(udata_find(&blob, 2), None);
        // A truncated record is not read past the end.
        assert_eq!(udata_find(&[0, 9, b'a'], 0), None);
    }
}
