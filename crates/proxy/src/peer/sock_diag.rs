//! The socket lookup through netlink `sock_diag` (Linux): one exact `SOCK_DIAG_BY_FAMILY`
//! request, answered with the socket's `inet_diag_msg` or an error.
//!
//! The kernel finds the socket with the same hash lookup an incoming packet uses, so the cost
//! does not grow with the number of open sockets. The structures are those of
//! `<linux/inet_diag.h>` and `<linux/sock_diag.h>` (stable kernel ABI); `libc` provides the
//! netlink header and constants but not these.

use std::io;
use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::{ConnectionPair, Lookup};

/// `SOCK_DIAG_BY_FAMILY` from `<linux/sock_diag.h>`: the request (and reply) message type.
const SOCK_DIAG_BY_FAMILY: u16 = 20;
/// `INET_DIAG_NOCOOKIE` from `<linux/inet_diag.h>`: match any socket cookie.
const INET_DIAG_NOCOOKIE: u32 = !0;
/// Every TCP state (`idiag_states` is a bit mask of `1 << TCP_*`).
const ALL_TCP_STATES: u32 = !0;
/// `TCP_TIME_WAIT` from `<net/tcp_states.h>`: a socket its process has closed.
const TCP_TIME_WAIT: u8 = 6;
/// The sequence number of every request (each is answered before the next is sent).
const REQUEST_SEQUENCE: u32 = 1;
/// Room for one reply: an `inet_diag_msg` with the attributes the kernel always adds (a few
/// hundred bytes); a netlink message never exceeds 8 KiB (`NLMSG_GOODSIZE` with 4 KiB pages).
const RECV_BUFFER_LEN: usize = 8192;

/// `struct inet_diag_sockid`: a socket's addresses as the kernel matches them.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct InetDiagSockId {
    /// Local port, network byte order.
    idiag_sport: u16,
    /// Remote port, network byte order.
    idiag_dport: u16,
    /// Local address (`__be32[4]`): the address bytes in network order; IPv4 uses the first 4.
    idiag_src: [u8; 16],
    /// Remote address, same layout.
    idiag_dst: [u8; 16],
    /// Interface index the socket is bound to (0: any); needed for link-local IPv6.
    idiag_if: u32,
    /// Socket cookie, or `INET_DIAG_NOCOOKIE` twice.
    idiag_cookie: [u32; 2],
}

/// `struct inet_diag_req_v2`: which sockets to report.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct InetDiagReqV2 {
    sdiag_family: u8,
    sdiag_protocol: u8,
    /// Extra attributes wanted (`1 << (INET_DIAG_* - 1)`); none.
    idiag_ext: u8,
    pad: u8,
    idiag_states: u32,
    id: InetDiagSockId,
}

/// `struct inet_diag_msg`: one socket, as the kernel reports it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct InetDiagMsg {
    idiag_family: u8,
    idiag_state: u8,
    idiag_timer: u8,
    idiag_retrans: u8,
    id: InetDiagSockId,
    idiag_expires: u32,
    idiag_rqueue: u32,
    idiag_wqueue: u32,
    idiag_uid: u32,
    /// 0 when no process holds the socket (`TIME_WAIT`, orphaned).
    idiag_inode: u32,
}

/// A whole request as sent: netlink header, then the request.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct DiagRequest {
    header: libc::nlmsghdr,
    body: InetDiagReqV2,
}

// The kernel's layouts (checked so a field change here cannot slip through unnoticed).
const _: () = {
    assert!(size_of::<InetDiagSockId>() == 48);
    assert!(offset_of!(InetDiagSockId, idiag_src) == 4);
    assert!(offset_of!(InetDiagSockId, idiag_if) == 36);
    assert!(size_of::<InetDiagReqV2>() == 56);
    assert!(size_of::<InetDiagMsg>() == 72);
    assert!(offset_of!(InetDiagMsg, idiag_uid) == 64);
    assert!(size_of::<libc::nlmsghdr>() == 16);
    // No padding: the request is sent as its bytes.
    assert!(size_of::<DiagRequest>() == 16 + 56);
};

/// The netlink socket of the last successful lookup, kept for the next one (a lookup runs for
/// every TCP connection; opening and closing a socket each time was a tenth of its system
/// calls). A lookup takes it out while it runs (concurrent ones open their own), and every
/// request's one reply is received before the socket is put back, so nothing stale waits on
/// it; after any failure it is dropped. One descriptor at most, process-wide.
static NETLINK_SOCKET: std::sync::Mutex<Option<OwnedFd>> = std::sync::Mutex::new(None);

/// How many descriptors the lookup keeps open between calls (0 or 1).
pub(super) fn kept_descriptors() -> usize {
    NETLINK_SOCKET
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .is_some() as usize
}

/// Looks the client socket of `pair` up with one exact request.
pub(super) fn lookup(pair: &ConnectionPair) -> io::Result<Lookup> {
    let kept = NETLINK_SOCKET
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    let socket = match kept {
        Some(socket) => socket,
        None => open_netlink_socket()?,
    };
    let request = exact_request(pair);
    let mut buffer = [0u8; RECV_BUFFER_LEN];
    let result = send_request(&socket, &request)
        .and_then(|()| receive_reply(&socket, &mut buffer))
        .and_then(|reply| parse_reply(reply, &request, pair));
    if result.is_ok() {
        let mut kept = NETLINK_SOCKET.lock().unwrap_or_else(|e| e.into_inner());
        // Another lookup's socket may be back first: one is enough (this one closes).
        if kept.is_none() {
            *kept = Some(socket);
        }
    }
    result
}

fn open_netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain system call; the descriptor is owned right away.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn exact_request(pair: &ConnectionPair) -> DiagRequest {
    let (family, client_ip, server_ip) = match (pair.client.ip(), pair.server.ip()) {
        (IpAddr::V4(client), IpAddr::V4(server)) => {
            let (mut c, mut s) = ([0u8; 16], [0u8; 16]);
            c[..4].copy_from_slice(&client.octets());
            s[..4].copy_from_slice(&server.octets());
            (libc::AF_INET, c, s)
        }
        (client, server) => (libc::AF_INET6, ipv6_octets(client), ipv6_octets(server)),
    };
    let interface = match pair.client {
        SocketAddr::V6(v6) => v6.scope_id(),
        SocketAddr::V4(_) => 0,
    };
    DiagRequest {
        header: libc::nlmsghdr {
            nlmsg_len: size_of::<DiagRequest>() as u32,
            nlmsg_type: SOCK_DIAG_BY_FAMILY,
            // No NLM_F_DUMP: an exact lookup of one socket.
            nlmsg_flags: libc::NLM_F_REQUEST as u16,
            nlmsg_seq: REQUEST_SEQUENCE,
            nlmsg_pid: 0,
        },
        body: InetDiagReqV2 {
            sdiag_family: family as u8,
            sdiag_protocol: libc::IPPROTO_TCP as u8,
            idiag_ext: 0,
            pad: 0,
            idiag_states: ALL_TCP_STATES,
            // The client socket: local = the client's address, remote = the proxy's.
            id: InetDiagSockId {
                idiag_sport: pair.client.port().to_be(),
                idiag_dport: pair.server.port().to_be(),
                idiag_src: client_ip,
                idiag_dst: server_ip,
                idiag_if: interface,
                idiag_cookie: [INET_DIAG_NOCOOKIE; 2],
            },
        },
    }
}

fn ipv6_octets(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
    }
}

fn send_request(socket: &OwnedFd, request: &DiagRequest) -> io::Result<()> {
    // SAFETY: all zeroes is a valid sockaddr_nl (its padding is private); pid 0 = the kernel.
    let mut kernel: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    kernel.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: `request` is `size_of::<DiagRequest>()` initialised bytes (no padding, asserted
    // above) and `kernel` a sockaddr_nl of the size given.
    let sent = unsafe {
        libc::sendto(
            socket.as_raw_fd(),
            (request as *const DiagRequest).cast(),
            size_of::<DiagRequest>(),
            0,
            (&kernel as *const libc::sockaddr_nl).cast(),
            size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    if sent as usize != size_of::<DiagRequest>() {
        return Err(io::Error::other("netlink sent a partial sock_diag request"));
    }
    Ok(())
}

/// The kernel handles the request inside `sendto`, so the reply is already queued: receive
/// without waiting, and treat "nothing there" as a failure rather than block the caller.
fn receive_reply<'b>(socket: &OwnedFd, buffer: &'b mut [u8]) -> io::Result<&'b [u8]> {
    // SAFETY: `buffer` is valid for `buffer.len()` bytes of writes.
    let received = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buffer.as_mut_ptr().cast(),
            buffer.len(),
            libc::MSG_DONTWAIT | libc::MSG_TRUNC,
        )
    };
    if received < 0 {
        let err = io::Error::last_os_error();
        return Err(if err.kind() == io::ErrorKind::WouldBlock {
            io::Error::other("netlink sock_diag sent no answer")
        } else {
            err
        });
    }
    // With MSG_TRUNC `recv` returns the message's full length.
    let received = received as usize;
    if received > buffer.len() {
        return Err(io::Error::other(format!(
            "netlink sock_diag answer of {received} bytes exceeds the {} bytes expected at most",
            buffer.len()
        )));
    }
    Ok(&buffer[..received])
}

fn parse_reply(reply: &[u8], request: &DiagRequest, pair: &ConnectionPair) -> io::Result<Lookup> {
    let header: libc::nlmsghdr = read_struct(reply, 0)
        .ok_or_else(|| io::Error::other("netlink sock_diag answer shorter than its header"))?;
    if (header.nlmsg_len as usize) > reply.len() {
        return Err(io::Error::other("netlink sock_diag answer truncated"));
    }
    if header.nlmsg_seq != request.header.nlmsg_seq {
        return Err(io::Error::other(format!(
            "netlink sock_diag answered sequence {} to request {}",
            header.nlmsg_seq, request.header.nlmsg_seq
        )));
    }
    let payload = size_of::<libc::nlmsghdr>();
    if header.nlmsg_type == libc::NLMSG_ERROR as u16 {
        let error: libc::nlmsgerr = read_struct(reply, payload)
            .ok_or_else(|| io::Error::other("netlink sock_diag error message too short"))?;
        return match -error.error {
            // What an exact lookup answers for no such socket (and, alas, a kernel without
            // the tcp_diag handler for any request: the caller deals with that).
            libc::ENOENT => Ok(Lookup::NotFound),
            0 => Err(io::Error::other(
                "netlink sock_diag acknowledged without an answer",
            )),
            errno => Err(io::Error::from_raw_os_error(errno)),
        };
    }
    if header.nlmsg_type != SOCK_DIAG_BY_FAMILY {
        return Err(io::Error::other(format!(
            "netlink sock_diag answered message type {}",
            header.nlmsg_type
        )));
    }
    let message: InetDiagMsg = read_struct(&reply[..header.nlmsg_len as usize], payload)
        .ok_or_else(|| io::Error::other("netlink sock_diag answer too short for a socket"))?;
    // An exact lookup can also return a listening socket on the client's address; only the
    // client socket itself, with both ends as asked, is an answer.
    let asked = |found: SocketAddr, asked: SocketAddr| {
        (found.ip(), found.port()) == (asked.ip(), asked.port())
    };
    match socket_addresses(&message) {
        Some((local, remote)) if asked(local, pair.client) && asked(remote, pair.server) => {}
        _ => return Ok(Lookup::NotFound),
    }
    if message.idiag_state == TCP_TIME_WAIT {
        return Ok(Lookup::NoOwner);
    }
    Ok(Lookup::from_row(
        message.idiag_uid,
        u64::from(message.idiag_inode),
    ))
}

/// The socket's (local, remote) addresses, IPv4-mapped ones as IPv4 (an IPv6 socket connected
/// to `::ffff:127.0.0.1` is found by an IPv4 request and reported as IPv6).
fn socket_addresses(message: &InetDiagMsg) -> Option<(SocketAddr, SocketAddr)> {
    let id = &message.id;
    let address = |bytes: &[u8; 16], port: u16| -> Option<SocketAddr> {
        let ip = match i32::from(message.idiag_family) {
            libc::AF_INET => IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]]),
            libc::AF_INET6 => Ipv6Addr::from(*bytes).to_canonical(),
            _ => return None,
        };
        Some(SocketAddr::new(ip, u16::from_be(port)))
    };
    let local = address(&id.idiag_src, id.idiag_sport)?;
    let remote = address(&id.idiag_dst, id.idiag_dport)?;
    Some((local, remote))
}

/// Structs made of integers only, for which any bit pattern is a valid value.
trait PlainData: Copy {}
impl PlainData for libc::nlmsghdr {}
impl PlainData for libc::nlmsgerr {}
impl PlainData for InetDiagMsg {}

/// Copies a `T` out of `bytes` at `offset` (netlink data carries no alignment promise to us).
fn read_struct<T: PlainData>(bytes: &[u8], offset: usize) -> Option<T> {
    let end = offset.checked_add(size_of::<T>())?;
    let source = bytes.get(offset..end)?;
    // SAFETY: `source` holds `size_of::<T>()` bytes, and any bit pattern is a valid `T`.
    Some(unsafe { std::ptr::read_unaligned(source.as_ptr().cast::<T>()) })
}
