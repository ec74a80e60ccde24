//! The nfnetlink_log subscriber: receives the packets the `deny` chain logs
//! to an nflog group and parses them into [`DeniedPacket`]s.
//!
//! How the kernel delivers them (net/netfilter/nfnetlink_log.c):
//! - a `NETLINK_NETFILTER` socket sends `NFULNL_MSG_CONFIG` with
//!   `NFULNL_CFG_CMD_BIND` for a group (the group is `nfgenmsg.res_id`); the
//!   kernel creates the group's instance in the socket's network namespace
//!   (instances are per namespace) and from then on unicasts every packet
//!   logged to that group to the socket's port id. A group has one listener:
//!   a bind by another socket fails with `EPERM` (`inst->peer_portid` differs).
//! - `nft`'s `log group N` always uses the nfnetlink_log logger
//!   (`NF_LOG_TYPE_ULOG`), so no per-family `NFULNL_CFG_CMD_PF_BIND` is needed;
//!   loading a ruleset with such a rule already loads nfnetlink_log, and a
//!   config message for its subsystem loads it too (`nfnetlink_rcv_msg`
//!   requests `nfnetlink-subsys-4`); if it cannot, the bind fails with
//!   `EINVAL`, and the error says to load nfnetlink_log.
//! - packets are batched into one skb until `QTHRESH` messages are queued or
//!   `TIMEOUT` (1/100 s) passes; a batch of several ends with `NLMSG_DONE`.
//! - closing the socket (also by the process dying) destroys the instance
//!   (`NETLINK_URELEASE`), so a restarted listener can bind again at once.
//! - when the socket's receive buffer overflows, the kernel drops the batch
//!   and the next `recv` fails with `ENOBUFS` (netlink(7)).
//!
//! Every message is parsed in safe Rust from the bytes: `nlmsghdr`,
//! `nfgenmsg`, the `NFULA_*` attributes, and the copied network header
//! (`NFULA_PAYLOAD` starts at the IPv4/IPv6 header at the hooks netleash logs in).

use std::io::{self, Read as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};

use super::Error;
use crate::netns;

/// Bytes of each logged packet the kernel copies: an IPv6 header (40), a
/// few extension headers and the L4 ports fit; IPv4 needs at most 60 + 4.
pub const COPY_RANGE: u32 = 128;

/// The kernel sends a batch after this long (in 1/100 s) even if it is not
/// full: a denied connection is logged within 100 ms.
const FLUSH_TIMEOUT_CENTISECONDS: u32 = 10;

/// The kernel sends a batch once this many packets are queued: under a flood
/// of denied packets one `recv` takes many of them.
const QUEUE_THRESHOLD: u32 = 32;

/// Kernel receive buffer asked for (capped by `net.core.rmem_max`): room for
/// bursts while the listener is busy; beyond it batches are lost (counted).
const SOCKET_RECEIVE_BUFFER: usize = 1 << 20;

/// First size of the buffer one batch is read into. The kernel builds a
/// batch in an skb of the instance's `nlbufsiz`, by default `NLMSG_GOODSIZE`
/// (at most 8 KiB), unless one packet's message is larger (not with
/// [`COPY_RANGE`] bytes copied); `nfulnl_set_nlbufsiz` allows up to 128 KiB.
/// A longer datagram still arrives whole: [`NflogListener::receive`] peeks
/// at its length and grows the buffer first.
const RECEIVE_BUFFER_LEN: usize = 16 * 1024;

/// How long opening waits for the kernel's answer to the bind. nfnetlink
/// answers inside `sendmsg`, so this only guards against a broken kernel.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Sequence number of the bind request.
const BIND_SEQUENCE: u32 = 1;

// linux/netlink.h and linux/netfilter/nfnetlink*.h values not in libc as u16.
const NLMSG_HEADER_LEN: usize = 16;
const NFGENMSG_LEN: usize = 4;
const NLA_HEADER_LEN: usize = 4;
/// `NLA_TYPE_MASK`: an attribute type without `NLA_F_NESTED`/`NLA_F_NET_BYTEORDER`.
const NLA_TYPE_MASK: u16 = 0x3fff;
const NLMSG_ERROR: u16 = libc::NLMSG_ERROR as u16;
/// `nfnl_msg_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_PACKET)`.
const ULOG_PACKET: u16 = ((libc::NFNL_SUBSYS_ULOG as u16) << 8) | libc::NFULNL_MSG_PACKET as u16;
/// `nfnl_msg_type(NFNL_SUBSYS_ULOG, NFULNL_MSG_CONFIG)`.
const ULOG_CONFIG: u16 = ((libc::NFNL_SUBSYS_ULOG as u16) << 8) | libc::NFULNL_MSG_CONFIG as u16;
/// The kernel-internal `ENOTSUPP`, which nfnetlink_log returns for unknown commands.
const ENOTSUPP: i32 = 524;

/// The address family of a logged packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    Ipv4,
    Ipv6,
}

/// One packet the `deny` chain logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedPacket {
    pub family: Family,
    /// The transport protocol number (IANA), after any IPv6 extension headers.
    pub l4proto: u8,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The destination port, for TCP, UDP, UDP-Lite, SCTP and DCCP when the
    /// copied bytes reach it and the packet is not a later fragment.
    pub dport: Option<u16>,
    /// The rule's log prefix (`NFULA_PREFIX`) without its NUL; empty if none.
    pub prefix: String,
}

/// What one `recv` brought.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// The logged packets of one batch; a message that cannot be read is an
    /// `Err` with the reason.
    Messages(Vec<Result<DeniedPacket, &'static str>>),
    /// The receive buffer overflowed and the kernel dropped at least one batch.
    Overrun,
}

/// A subscription to one nflog group in one network namespace. It is read
/// with blocking calls that return at least every [`RECEIVE_POLL`], so the
/// thread that owns it can also do periodic work and notice a stop.
pub struct NflogListener {
    socket: Socket,
    group: u16,
    buffer: Vec<u8>,
}

/// The longest [`NflogListener::receive`] blocks without a packet.
pub const RECEIVE_POLL: Duration = Duration::from_millis(200);

impl NflogListener {
    /// Opens a netfilter netlink socket inside `target` and binds nflog
    /// `group` there, copying [`COPY_RANGE`] bytes of each packet. Fails if
    /// another program already listens to the group in that namespace.
    pub fn open(target: &netns::Target, group: u16) -> Result<NflogListener, Error> {
        netns::run_in(target, || NflogListener::open_here(group))?
    }

    /// [`NflogListener::open`] in the calling thread's network namespace (a
    /// caller already inside it). The socket stays in the namespace it was
    /// created in (socket(7)), so any thread may read it afterwards.
    pub fn open_here(group: u16) -> Result<NflogListener, Error> {
        let socket = Socket::new(
            Domain::from(libc::AF_NETLINK),
            Type::RAW,
            Some(Protocol::from(libc::NETLINK_NETFILTER)),
        )
        .map_err(Error::Socket)?;
        let nflog_socket = |source| Error::NflogSocket { group, source };
        // Best effort: the kernel caps it at net.core.rmem_max.
        let _ = socket.set_recv_buffer_size(SOCKET_RECEIVE_BUFFER);
        socket
            .set_read_timeout(Some(ACK_TIMEOUT))
            .map_err(nflog_socket)?;
        // Unbound: the kernel binds the socket to a free port id on this
        // first send (netlink(7), autobind), and unicasts the group to it.
        socket
            .send(&config_message(group, BIND_SEQUENCE))
            .map_err(|source| bind_error(group, source))?;
        let mut buffer = vec![0u8; RECEIVE_BUFFER_LEN];
        loop {
            let length = (&socket)
                .read(&mut buffer)
                .map_err(|source| bind_error(group, source))?;
            match acknowledgement(&buffer[..length], BIND_SEQUENCE) {
                Some(0) => break,
                Some(errno) => {
                    return Err(bind_error(group, io::Error::from_raw_os_error(errno)));
                }
                None => continue,
            }
        }
        socket
            .set_read_timeout(Some(RECEIVE_POLL))
            .map_err(nflog_socket)?;
        Ok(NflogListener {
            socket,
            group,
            buffer,
        })
    }

    /// The group this listener is bound to.
    pub fn group(&self) -> u16 {
        self.group
    }

    /// Waits up to [`RECEIVE_POLL`] for the next batch; `None` if none came.
    pub fn receive(&mut self) -> Result<Option<Delivery>, Error> {
        match self.receive_datagram() {
            Ok(length) => Ok(Some(Delivery::Messages(parse_delivery(
                &self.buffer[..length],
            )))),
            Err(error) if error.raw_os_error() == Some(libc::ENOBUFS) => {
                Ok(Some(Delivery::Overrun))
            }
            Err(error)
                if matches!(
                    error.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) =>
            {
                Ok(None)
            }
            Err(source) => Err(Error::NflogReceive {
                group: self.group,
                source,
            }),
        }
    }
}

impl NflogListener {
    /// Reads the next datagram whole: a peek with `MSG_TRUNC` returns its
    /// real length without taking it (netlink(7)), and the buffer grows to
    /// it first. Blocks up to the socket's read timeout.
    fn receive_datagram(&mut self) -> io::Result<usize> {
        let pending = self
            .socket
            .recv_with_flags(&mut [], libc::MSG_PEEK | libc::MSG_TRUNC)?;
        if pending > self.buffer.len() {
            self.buffer.resize(pending, 0);
        }
        (&self.socket).read(&mut self.buffer)
    }
}

/// The bind failure, with what to do about it.
fn bind_error(group: u16, source: io::Error) -> Error {
    let hint = match source.raw_os_error() {
        Some(libc::EPERM | libc::EBUSY) => format!(
            ": another program already listens to nflog group {group} in this namespace \
             (ulogd, `tcpdump -i nflog:{group}`, another netleash sidecar), or this process \
             lacks CAP_NET_ADMIN there; stop the other listener or give the policy another \
             group with --nflog-group"
        ),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOENT | libc::EPROTONOSUPPORT | ENOTSUPP) => {
            ": the kernel has no nfnetlink_log; load it with `modprobe nfnetlink_log` \
             (CONFIG_NETFILTER_NETLINK_LOG)"
                .to_string()
        }
        Some(libc::EAGAIN) => format!(": the kernel did not answer within {ACK_TIMEOUT:?}"),
        _ => String::new(),
    };
    Error::NflogBind {
        group,
        hint,
        source,
    }
}

fn align4(length: usize) -> usize {
    (length + 3) & !3
}

fn push_attribute(message: &mut Vec<u8>, kind: i32, value: &[u8]) {
    let length = (NLA_HEADER_LEN + value.len()) as u16;
    message.extend_from_slice(&length.to_ne_bytes());
    message.extend_from_slice(&(kind as u16).to_ne_bytes());
    message.extend_from_slice(value);
    message.resize(align4(message.len()), 0);
}

/// `NFULNL_MSG_CONFIG` for `group`: bind, copy [`COPY_RANGE`] bytes of each
/// packet, and the batching limits. One message: the kernel creates the
/// instance for the bind, then applies the other attributes to it
/// (`nfulnl_recv_config`). Integers in attributes are big-endian there.
fn config_message(group: u16, sequence: u32) -> Vec<u8> {
    let mut message = vec![0u8; NLMSG_HEADER_LEN];
    // nfgenmsg: family AF_UNSPEC, version NFNETLINK_V0, res_id = group.
    message.extend_from_slice(&[libc::AF_UNSPEC as u8, libc::NFNETLINK_V0 as u8]);
    message.extend_from_slice(&group.to_be_bytes());
    push_attribute(
        &mut message,
        libc::NFULA_CFG_CMD,
        &[libc::NFULNL_CFG_CMD_BIND as u8],
    );
    // struct nfulnl_msg_config_mode { __be32 copy_range; __u8 copy_mode; __u8 _pad; } packed.
    let mut mode = COPY_RANGE.to_be_bytes().to_vec();
    mode.extend_from_slice(&[libc::NFULNL_COPY_PACKET as u8, 0]);
    push_attribute(&mut message, libc::NFULA_CFG_MODE, &mode);
    push_attribute(
        &mut message,
        libc::NFULA_CFG_QTHRESH,
        &QUEUE_THRESHOLD.to_be_bytes(),
    );
    push_attribute(
        &mut message,
        libc::NFULA_CFG_TIMEOUT,
        &FLUSH_TIMEOUT_CENTISECONDS.to_be_bytes(),
    );
    let length = message.len() as u32;
    let kind = ULOG_CONFIG;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    message[0..4].copy_from_slice(&length.to_ne_bytes());
    message[4..6].copy_from_slice(&kind.to_ne_bytes());
    message[6..8].copy_from_slice(&flags.to_ne_bytes());
    message[8..12].copy_from_slice(&sequence.to_ne_bytes());
    // nlmsg_pid 0: the kernel fills in the sender's port id.
    message
}

fn u16_ne(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn u32_ne(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn u16_be(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

/// One netlink message: its type, sequence number and the bytes after the header.
struct Message<'a> {
    kind: u16,
    sequence: u32,
    body: &'a [u8],
}

/// The netlink messages of one datagram, in order; stops at the first
/// message whose length does not fit (and yields `Err` for it).
fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>, &'static str>> {
    let mut at = 0;
    std::iter::from_fn(move || {
        if at + NLMSG_HEADER_LEN > datagram.len() {
            return None;
        }
        let length = u32_ne(datagram, at)? as usize;
        if length < NLMSG_HEADER_LEN || at + length > datagram.len() {
            at = datagram.len();
            return Some(Err("a netlink message longer than the datagram"));
        }
        let message = Message {
            kind: u16_ne(datagram, at + 4)?,
            sequence: u32_ne(datagram, at + 8)?,
            body: &datagram[at + NLMSG_HEADER_LEN..at + length],
        };
        at += align4(length);
        Some(Ok(message))
    })
}

/// The errno of the acknowledgement for `sequence` in `datagram` (0 for
/// success), if it has one. `nlmsgerr.error` is a negative errno.
fn acknowledgement(datagram: &[u8], sequence: u32) -> Option<i32> {
    messages(datagram).flatten().find_map(|message| {
        if message.kind != NLMSG_ERROR || message.sequence != sequence {
            return None;
        }
        let error = i32::from_ne_bytes(message.body.get(0..4)?.try_into().ok()?);
        Some(-error)
    })
}

/// The logged packets of one datagram from the kernel. Messages of other
/// types (`NLMSG_DONE` closing a batch, stray acknowledgements) are skipped.
pub fn parse_delivery(datagram: &[u8]) -> Vec<Result<DeniedPacket, &'static str>> {
    messages(datagram)
        .filter_map(|message| match message {
            Ok(message) if message.kind == ULOG_PACKET => Some(parse_packet_message(message.body)),
            Ok(_) => None,
            Err(reason) => Some(Err(reason)),
        })
        .collect()
}

/// One `NFULNL_MSG_PACKET` body: `nfgenmsg` and the `NFULA_*` attributes.
fn parse_packet_message(body: &[u8]) -> Result<DeniedPacket, &'static str> {
    let nfgen_family = *body.first().ok_or("no nfgenmsg header")?;
    if body.len() < NFGENMSG_LEN {
        return Err("no nfgenmsg header");
    }
    let mut prefix = String::new();
    let mut payload = None;
    let mut at = NFGENMSG_LEN;
    while at + NLA_HEADER_LEN <= body.len() {
        let length = u16_ne(body, at).ok_or("truncated attribute")? as usize;
        let kind = u16_ne(body, at + 2).ok_or("truncated attribute")? & NLA_TYPE_MASK;
        if length < NLA_HEADER_LEN || at + length > body.len() {
            return Err("an attribute longer than its message");
        }
        let value = &body[at + NLA_HEADER_LEN..at + length];
        match i32::from(kind) {
            libc::NFULA_PREFIX => {
                let text = value.split(|&b| b == 0).next().unwrap_or_default();
                prefix = String::from_utf8_lossy(text).into_owned();
            }
            libc::NFULA_PAYLOAD => payload = Some(value),
            _ => {}
        }
        at += align4(length);
    }
    let payload = payload.ok_or("no payload (NFULA_PAYLOAD): the group copies no packet bytes")?;
    let header = parse_network_header(payload)?;
    let expected = match header.family {
        Family::Ipv4 => libc::NFPROTO_IPV4,
        Family::Ipv6 => libc::NFPROTO_IPV6,
    };
    if i32::from(nfgen_family) != expected {
        return Err("the payload's IP version differs from the message's family");
    }
    Ok(DeniedPacket {
        family: header.family,
        l4proto: header.l4proto,
        src: header.src,
        dst: header.dst,
        dport: header.dport,
        prefix,
    })
}

struct NetworkHeader {
    family: Family,
    l4proto: u8,
    src: IpAddr,
    dst: IpAddr,
    dport: Option<u16>,
}

/// Whether the transport header starts with source and destination port
/// (TCP, UDP, DCCP, SCTP, UDP-Lite: RFC 9293, 768, 4340, 9260, 3828).
fn has_ports(l4proto: u8) -> bool {
    matches!(l4proto, 6 | 17 | 33 | 132 | 136)
}

/// The destination port at `at` in `packet` if the protocol has ports and
/// the copied bytes reach it.
fn destination_port(packet: &[u8], at: usize, l4proto: u8) -> Option<u16> {
    has_ports(l4proto).then(|| u16_be(packet, at + 2)).flatten()
}

/// The IPv4 or IPv6 header at the start of `packet`, and the destination port.
fn parse_network_header(packet: &[u8]) -> Result<NetworkHeader, &'static str> {
    match packet.first().map(|byte| byte >> 4) {
        Some(4) => parse_ipv4(packet),
        Some(6) => parse_ipv6(packet),
        Some(_) => Err("the payload is neither IPv4 nor IPv6"),
        None => Err("an empty payload"),
    }
}

/// RFC 791: IHL in 32-bit words, protocol at byte 9, addresses at 12 and 16,
/// fragment offset in the low 13 bits of bytes 6-7 (only the first fragment
/// carries the transport header).
fn parse_ipv4(packet: &[u8]) -> Result<NetworkHeader, &'static str> {
    if packet.len() < 20 {
        return Err("a truncated IPv4 header");
    }
    let header_length = usize::from(packet[0] & 0x0f) * 4;
    if header_length < 20 {
        return Err("an IPv4 header length below 20 bytes");
    }
    let l4proto = packet[9];
    let src = Ipv4Addr::new(packet[12], packet[13], packet[14], packet[15]);
    let dst = Ipv4Addr::new(packet[16], packet[17], packet[18], packet[19]);
    let fragment_offset = u16_be(packet, 6).unwrap_or(0) & 0x1fff;
    let dport = if fragment_offset == 0 {
        destination_port(packet, header_length, l4proto)
    } else {
        None
    };
    Ok(NetworkHeader {
        family: Family::Ipv4,
        l4proto,
        src: src.into(),
        dst: dst.into(),
        dport,
    })
}

/// The most extension headers walked before giving up on finding the port.
const MAX_EXTENSION_HEADERS: usize = 8;

/// RFC 8200: a 40-byte header with Next Header at byte 6 and the addresses
/// at 8 and 24, then a chain of extension headers. Hop-by-hop (0), routing
/// (43) and destination options (60) are (length + 1) * 8 bytes, a fragment
/// header (44) is 8 (only offset 0 carries the transport header), and an
/// authentication header (51, RFC 4302) is (length + 2) * 4. Anything else
/// ends the chain: it is the transport protocol, or one whose port netleash
/// does not look for (ESP, No Next Header, unknown), which gets no port.
fn parse_ipv6(packet: &[u8]) -> Result<NetworkHeader, &'static str> {
    if packet.len() < 40 {
        return Err("a truncated IPv6 header");
    }
    let address = |at: usize| -> IpAddr {
        let bytes: [u8; 16] = packet[at..at + 16].try_into().expect("16 bytes");
        Ipv6Addr::from(bytes).into()
    };
    let (src, dst) = (address(8), address(24));
    let mut next = packet[6];
    let mut at = 40;
    let mut dport = None;
    let mut transport_found = false;
    for _ in 0..MAX_EXTENSION_HEADERS {
        let length = match next {
            0 | 43 | 60 => packet.get(at + 1).map(|&l| (usize::from(l) + 1) * 8),
            44 => {
                let Some(offset) = u16_be(packet, at + 2) else {
                    break;
                };
                if offset >> 3 != 0 {
                    // A later fragment: the transport header is in the first.
                    next = packet[at];
                    break;
                }
                Some(8)
            }
            51 => packet.get(at + 1).map(|&l| (usize::from(l) + 2) * 4),
            _ => {
                transport_found = true;
                break;
            }
        };
        // Truncated inside the extension chain: the protocol stays the
        // extension header's number and there is no port.
        let (Some(length), Some(&following)) = (length, packet.get(at)) else {
            break;
        };
        next = following;
        at += length;
    }
    if transport_found {
        dport = destination_port(packet, at, next);
    }
    Ok(NetworkHeader {
        family: Family::Ipv6,
        l4proto: next,
        src,
        dst,
        dport,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A netlink message of `kind` with `nfgenmsg` for `family` and `attributes`.
    fn nfnl_message(kind: u16, family: i32, group: u16, attributes: &[(i32, &[u8])]) -> Vec<u8> {
        let mut message = vec![0u8; NLMSG_HEADER_LEN];
        message.extend_from_slice(&[family as u8, 0]);
        message.extend_from_slice(&group.to_be_bytes());
        for (attribute, value) in attributes {
            push_attribute(&mut message, *attribute, value);
        }
        let length = message.len() as u32;
        message[0..4].copy_from_slice(&length.to_ne_bytes());
        message[4..6].copy_from_slice(&kind.to_ne_bytes());
        message
    }

    fn packet_message(family: i32, payload: Option<&[u8]>) -> Vec<u8> {
        // struct nfulnl_msg_packet_hdr { __be16 hw_protocol; __u8 hook; __u8 _pad; }
        let header = [0x08, 0x00, 3, 0];
        let mut attributes: Vec<(i32, &[u8])> = vec![
            (libc::NFULA_PACKET_HDR, &header),
            (libc::NFULA_PREFIX, b"netleash deny \0"),
        ];
        if let Some(payload) = payload {
            attributes.push((libc::NFULA_PAYLOAD, payload));
        }
        nfnl_message(ULOG_PACKET, family, 4711, &attributes)
    }

    fn ipv4_tcp(dst: [u8; 4], dport: u16) -> Vec<u8> {
        let mut packet = vec![0x45, 0, 0, 60, 0, 0, 0x40, 0, 64, 6, 0, 0];
        packet.extend_from_slice(&[192, 0, 2, 2]);
        packet.extend_from_slice(&dst);
        // TCP: source port 40000, destination port, sequence number...
        packet.extend_from_slice(&40000u16.to_be_bytes());
        packet.extend_from_slice(&dport.to_be_bytes());
        packet.extend_from_slice(&[0; 16]);
        packet
    }

    fn ipv6_header(next: u8, dst: Ipv6Addr) -> Vec<u8> {
        let mut packet = vec![0x60, 0, 0, 0, 0, 16, next, 64];
        packet.extend_from_slice(&"2001:db8:1::2".parse::<Ipv6Addr>().unwrap().octets());
        packet.extend_from_slice(&dst.octets());
        packet
    }

    fn udp(dport: u16) -> Vec<u8> {
        let mut header = 5353u16.to_be_bytes().to_vec();
        header.extend_from_slice(&dport.to_be_bytes());
        header.extend_from_slice(&[0, 8, 0, 0]);
        header
    }

    #[test]
    fn an_ipv4_tcp_packet_gives_its_addresses_port_and_prefix() {
        let message = packet_message(
            libc::NFPROTO_IPV4,
            Some(&ipv4_tcp([198, 51, 100, 10], 8080)),
        );
        let parsed = parse_delivery(&message);
        assert_eq!(
            parsed,
            vec![Ok(DeniedPacket {
                family: Family::Ipv4,
                l4proto: 6,
                src: "192.0.2.2".parse().unwrap(),
                dst: "198.51.100.10".parse().unwrap(),
                dport: Some(8080),
                prefix: "netleash deny ".into(),
            })]
        );
    }

    #[test]
    fn an_ipv6_udp_packet_behind_extension_headers_gives_its_port() {
        let dst: Ipv6Addr = "2001:db8:100::10".parse().unwrap();
        // Hop-by-hop (8 bytes) → destination options (16 bytes) → UDP.
        let mut packet = ipv6_header(0, dst);
        packet.extend_from_slice(&[60, 0, 0, 0, 0, 0, 0, 0]);
        packet.extend_from_slice(&[17, 1]);
        packet.extend_from_slice(&[0; 14]);
        packet.extend_from_slice(&udp(443));
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&packet)));
        let packet = parsed[0].clone().unwrap();
        assert_eq!(packet.family, Family::Ipv6);
        assert_eq!(
            (packet.l4proto, packet.dst, packet.dport),
            (17, dst.into(), Some(443))
        );
        assert_eq!(packet.src, "2001:db8:1::2".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn a_plain_ipv6_udp_packet_gives_its_port() {
        let dst: Ipv6Addr = "2001:db8:100::11".parse().unwrap();
        let mut packet = ipv6_header(17, dst);
        packet.extend_from_slice(&udp(53));
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&packet)));
        assert_eq!(parsed[0].as_ref().unwrap().dport, Some(53));
    }

    #[test]
    fn ipv6_later_fragments_and_unknown_headers_have_no_port() {
        let dst: Ipv6Addr = "2001:db8:100::10".parse().unwrap();
        // Fragment header, offset 8 (not the first fragment), next UDP.
        let mut fragment = ipv6_header(44, dst);
        fragment.extend_from_slice(&[17, 0, 0, 8 << 3, 0, 0, 0, 1]);
        fragment.extend_from_slice(&udp(443));
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&fragment)));
        let packet = parsed[0].as_ref().unwrap();
        assert_eq!((packet.l4proto, packet.dport), (17, None));

        // ESP (50): the ports are encrypted.
        let mut esp = ipv6_header(50, dst);
        esp.extend_from_slice(&[0; 16]);
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&esp)));
        let packet = parsed[0].as_ref().unwrap();
        assert_eq!((packet.l4proto, packet.dport), (50, None));

        // The first fragment (offset 0) carries the transport header.
        let mut first = ipv6_header(44, dst);
        first.extend_from_slice(&[6, 0, 0, 1, 0, 0, 0, 1]);
        first.extend_from_slice(&udp(8443));
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&first)));
        let packet = parsed[0].as_ref().unwrap();
        assert_eq!((packet.l4proto, packet.dport), (6, Some(8443)));
    }

    #[test]
    fn a_payload_cut_inside_the_network_header_is_unreadable() {
        let packet = ipv4_tcp([198, 51, 100, 10], 8080);
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV4, Some(&packet[..19])));
        assert_eq!(parsed, vec![Err("a truncated IPv4 header")]);
        let ipv6 = ipv6_header(6, Ipv6Addr::LOCALHOST);
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&ipv6[..39])));
        assert_eq!(parsed, vec![Err("a truncated IPv6 header")]);
    }

    #[test]
    fn a_payload_cut_before_the_port_has_addresses_but_no_port() {
        let packet = ipv4_tcp([198, 51, 100, 10], 8080);
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV4, Some(&packet[..23])));
        let packet = parsed[0].as_ref().unwrap();
        assert_eq!(packet.dst, "198.51.100.10".parse::<IpAddr>().unwrap());
        assert_eq!((packet.l4proto, packet.dport), (6, None));

        // Cut inside a hop-by-hop header: the protocol stays the extension's.
        let mut ipv6 = ipv6_header(0, Ipv6Addr::LOCALHOST);
        ipv6.push(17);
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&ipv6)));
        let packet = parsed[0].as_ref().unwrap();
        assert_eq!((packet.l4proto, packet.dport), (0, None));
    }

    #[test]
    fn a_message_without_payload_is_unreadable() {
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV4, None));
        assert_eq!(parsed.len(), 1);
        assert!(parsed[0].as_ref().unwrap_err().contains("NFULA_PAYLOAD"));
    }

    #[test]
    fn a_family_that_disagrees_with_the_payload_is_unreadable() {
        let packet = ipv4_tcp([198, 51, 100, 10], 8080);
        let parsed = parse_delivery(&packet_message(libc::NFPROTO_IPV6, Some(&packet)));
        assert!(parsed[0].is_err());
    }

    #[test]
    fn a_batch_yields_every_packet_and_skips_its_done_message() {
        let mut batch = packet_message(libc::NFPROTO_IPV4, Some(&ipv4_tcp([198, 51, 100, 10], 1)));
        batch.extend(packet_message(
            libc::NFPROTO_IPV4,
            Some(&ipv4_tcp([203, 0, 113, 20], 2)),
        ));
        batch.extend(nfnl_message(libc::NLMSG_DONE as u16, 0, 0, &[]));
        let ports: Vec<_> = parse_delivery(&batch)
            .into_iter()
            .map(|packet| packet.unwrap().dport)
            .collect();
        assert_eq!(ports, vec![Some(1), Some(2)]);
    }

    #[test]
    fn a_message_longer_than_its_datagram_is_reported_once() {
        let mut message =
            packet_message(libc::NFPROTO_IPV4, Some(&ipv4_tcp([198, 51, 100, 10], 1)));
        let length = message.len();
        message.truncate(length - 8);
        let parsed = parse_delivery(&message);
        assert_eq!(parsed.len(), 1);
        assert!(parsed[0].is_err());
    }

    #[test]
    fn the_bind_request_carries_the_group_command_and_copy_mode() {
        let message = config_message(4711, 9);
        assert_eq!(u32_ne(&message, 0).unwrap() as usize, message.len());
        assert_eq!(u16_ne(&message, 4).unwrap(), 0x0401);
        assert_eq!(u32_ne(&message, 8).unwrap(), 9);
        // nfgenmsg: AF_UNSPEC, version 0, group 4711 big-endian.
        assert_eq!(&message[16..20], &[0, 0, 0x12, 0x67]);
        // First attribute: NFULA_CFG_CMD (1) = NFULNL_CFG_CMD_BIND (1).
        assert_eq!(u16_ne(&message, 20).unwrap(), 5);
        assert_eq!(u16_ne(&message, 22).unwrap(), 1);
        assert_eq!(message[24], 1);
        // Second: NFULA_CFG_MODE (2) = copy range 128, NFULNL_COPY_PACKET.
        assert_eq!(u16_ne(&message, 28).unwrap(), 10);
        assert_eq!(u16_ne(&message, 30).unwrap(), 2);
        assert_eq!(&message[32..38], &[0, 0, 0, 128, 2, 0]);
    }

    #[test]
    fn acknowledgements_are_matched_by_sequence() {
        let ack = |sequence: u32, error: i32| {
            let mut message = vec![0u8; NLMSG_HEADER_LEN];
            message.extend_from_slice(&error.to_ne_bytes());
            message.extend_from_slice(&[0; 16]);
            let length = message.len() as u32;
            message[0..4].copy_from_slice(&length.to_ne_bytes());
            message[4..6].copy_from_slice(&NLMSG_ERROR.to_ne_bytes());
            message[8..12].copy_from_slice(&sequence.to_ne_bytes());
            message
        };
        let mut datagram = ack(7, -libc::EPERM);
        datagram.extend(ack(1, 0));
        assert_eq!(acknowledgement(&datagram, 1), Some(0));
        assert_eq!(acknowledgement(&datagram, 7), Some(libc::EPERM));
        assert_eq!(acknowledgement(&datagram, 2), None);
    }
}
