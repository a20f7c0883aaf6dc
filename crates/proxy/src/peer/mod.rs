//! Who is at the other end of a connection the proxy accepted.
//!
//! A loopback TCP client may skip the proxy password when the socket it connected with belongs
//! to the OS user running the daemon. TCP carries no credentials, so the owner is looked up in
//! the kernel's socket table: the client's own socket is the one whose *local* address is the
//! peer address `accept()` returned and whose *remote* address is the proxy socket's local
//! address. Its owner is the user that created it (the kernel's `sk_uid`, what `ss -e` and
//! `/proc/net/tcp` show), and its inode identifies it (`fstat` of the client's descriptor gives
//! the same number).
//!
//! On Linux the lookup is one `SOCK_DIAG_BY_FAMILY` request on a `NETLINK_SOCK_DIAG` socket
//! ([`tcp_peer_owner_netlink`], a few system calls, independent of how many sockets are open);
//! when netlink is unavailable or answers an error it falls back to scanning `/proc/net/tcp`
//! and `/proc/net/tcp6` ([`tcp_peer_owner_proc_net`], linear in the number of sockets). Both
//! see only the caller's network namespace. On macOS, which keeps no owner for a TCP socket
//! and has no table to query by address, the socket is searched for among the descriptors of
//! the user's own processes through libproc (`libproc.rs`, as `lsof -i` does); found there, it
//! is the user's, and the holding process is known at once. Elsewhere [`tcp_peer_owner`] finds
//! nothing.
//!
//! Unix-domain sockets carry credentials: [`unix_peer`] reads them (`SO_PEERCRED`,
//! `getpeereid`).
//!
//! Nothing here waits for anything: the netlink answer is queued before the request's `sendto`
//! returns (~10 µs in all), and `/proc` files are generated in memory — but reading them walks
//! the kernel's whole TCP hash table, milliseconds of CPU (see BENCHMARKS.md), so code on an
//! async runtime that may take the fallback should run the lookup on a blocking thread.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;

#[cfg(target_os = "macos")]
mod libproc;
#[cfg(target_os = "linux")]
mod proc_net;
#[cfg(target_os = "linux")]
mod sock_diag;
#[cfg(any(target_os = "macos", test))]
mod socket_fdinfo;

/// The owner of the client end of a TCP connection the proxy accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerOwner {
    /// The user that created the client's socket (in the caller's user namespace).
    pub uid: u32,
    /// The client socket's inode number (`st_ino` of its descriptor); 0 where the lookup
    /// finds the process instead (macOS).
    pub inode: u64,
    /// The process holding the client's socket, where the lookup finds it on the way (macOS);
    /// on Linux the daemon finds it from the inode, and only when it needs it.
    pub pid: Option<u32>,
}

/// Finds the owner of the client's end of an accepted TCP connection.
///
/// `accepted_local` is the proxy socket's local address (the listener side), `client` the peer
/// address `accept()` returned. Finds the socket whose local address is `client` and whose
/// remote address is `accepted_local` (the client's own socket) and returns its owner. IPv4-mapped
/// IPv6 addresses (`::ffff:127.0.0.1`, as a dual-stack listener reports IPv4 clients) are
/// treated as the IPv4 addresses they carry.
///
/// `Ok(None)` when no such socket is visible (the client is in another network namespace or on
/// another machine, or closed in the meantime) or when it has no owner any more (its process
/// closed it: `TIME_WAIT` or orphaned). Only meaningful when `client` is a local address: for a
/// remote client the socket found, if any, would be an unrelated local one.
///
/// Linux: netlink `sock_diag`, falling back to `/proc/net/tcp{,6}` when netlink fails (an
/// error is returned only when both fail). A netlink "no such socket" is checked in `/proc`
/// until netlink has found a socket once in this process, because a kernel without the
/// `tcp_diag` module answers every request that way.
#[cfg(target_os = "linux")]
pub fn tcp_peer_owner(
    accepted_local: SocketAddr,
    client: SocketAddr,
) -> io::Result<Option<PeerOwner>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    // Set once netlink has found a socket: from then on its "not found" is trusted.
    static NETLINK_FINDS_TCP_SOCKETS: AtomicBool = AtomicBool::new(false);

    let Some(pair) = ConnectionPair::new(accepted_local, client) else {
        return Ok(None);
    };
    match sock_diag::lookup(&pair) {
        Ok(Lookup::Owner(owner)) => {
            NETLINK_FINDS_TCP_SOCKETS.store(true, Ordering::Relaxed);
            Ok(Some(owner))
        }
        Ok(Lookup::NoOwner) => {
            NETLINK_FINDS_TCP_SOCKETS.store(true, Ordering::Relaxed);
            Ok(None)
        }
        Ok(Lookup::NotFound) if NETLINK_FINDS_TCP_SOCKETS.load(Ordering::Relaxed) => Ok(None),
        Ok(Lookup::NotFound) => proc_net::lookup(&pair).map(Lookup::into_owner),
        Err(netlink_err) => match proc_net::lookup(&pair) {
            Ok(found) => {
                tracing::debug!("sock_diag lookup failed ({netlink_err}); used /proc/net/tcp");
                Ok(found.into_owner())
            }
            Err(proc_err) => Err(io::Error::new(
                proc_err.kind(),
                format!(
                    "cannot find the owner of the TCP connection from {client}: \
                     netlink sock_diag failed ({netlink_err}) and so did reading \
                     /proc/net/tcp ({proc_err})"
                ),
            )),
        },
    }
}

/// Finds the owner of the client's end of an accepted TCP connection (the addresses as on
/// Linux): on macOS, a process of the user running this one that holds the socket;
/// `Ok(None)` when none does (another user's client, or one in a VM).
#[cfg(target_os = "macos")]
pub fn tcp_peer_owner(
    accepted_local: SocketAddr,
    client: SocketAddr,
) -> io::Result<Option<PeerOwner>> {
    // SAFETY: geteuid cannot fail.
    let uid = unsafe { libc::geteuid() };
    Ok(
        libproc::holder(uid, client, accepted_local)?.map(|pid| PeerOwner {
            uid,
            inode: 0,
            pid: Some(pid),
        }),
    )
}

/// Finds the owner of the client's end of an accepted TCP connection.
///
/// Not implemented on this system: always `Ok(None)`, so the proxy asks such clients for the
/// password.
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub fn tcp_peer_owner(
    _accepted_local: SocketAddr,
    _client: SocketAddr,
) -> io::Result<Option<PeerOwner>> {
    Ok(None)
}

/// [`tcp_peer_owner`] through netlink `sock_diag` only (one exact `SOCK_DIAG_BY_FAMILY`
/// request); errors when netlink is unavailable or answers anything but the socket or "no such
/// socket".
#[cfg(target_os = "linux")]
pub fn tcp_peer_owner_netlink(
    accepted_local: SocketAddr,
    client: SocketAddr,
) -> io::Result<Option<PeerOwner>> {
    match ConnectionPair::new(accepted_local, client) {
        Some(pair) => sock_diag::lookup(&pair).map(Lookup::into_owner),
        None => Ok(None),
    }
}

/// Descriptors the lookups keep open between calls (the netlink socket, reused): 0 or 1. For
/// tests that count a process's descriptors.
#[cfg(target_os = "linux")]
pub fn kept_descriptors() -> usize {
    sock_diag::kept_descriptors()
}

/// Descriptors the lookups keep open between calls: none on this system.
#[cfg(not(target_os = "linux"))]
pub fn kept_descriptors() -> usize {
    0
}

/// [`tcp_peer_owner`] through `/proc/net/tcp` and `/proc/net/tcp6` only (a scan of every TCP
/// socket in the network namespace).
#[cfg(target_os = "linux")]
pub fn tcp_peer_owner_proc_net(
    accepted_local: SocketAddr,
    client: SocketAddr,
) -> io::Result<Option<PeerOwner>> {
    match ConnectionPair::new(accepted_local, client) {
        Some(pair) => proc_net::lookup(&pair).map(Lookup::into_owner),
        None => Ok(None),
    }
}

/// The client socket to look for, with IPv4-mapped IPv6 addresses turned into IPv4 ones.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
#[derive(Debug, Clone, Copy)]
struct ConnectionPair {
    /// The client socket's local address (what `accept()` returned as the peer).
    client: SocketAddr,
    /// The client socket's remote address (the proxy socket's local address).
    server: SocketAddr,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl ConnectionPair {
    /// `None` when the two addresses are of different families, which no TCP connection has.
    fn new(accepted_local: SocketAddr, client: SocketAddr) -> Option<Self> {
        let client = canonical(client);
        let server = canonical(accepted_local);
        (client.is_ipv4() == server.is_ipv4()).then_some(Self { client, server })
    }
}

/// `::ffff:a.b.c.d` as `a.b.c.d` (the scope id of an IPv4-mapped address means nothing).
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
fn canonical(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V6(ip) => match ip.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), addr.port()),
            None => addr,
        },
        IpAddr::V4(_) => addr,
    }
}

/// What a socket-table lookup found.
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lookup {
    /// The socket, held by a process.
    Owner(PeerOwner),
    /// The socket, but no process holds it any more (inode 0: `TIME_WAIT`, or closed while the
    /// connection winds down); the uid the kernel shows for it means nothing.
    NoOwner,
    /// No such socket in this network namespace.
    NotFound,
}

#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
impl Lookup {
    fn from_row(uid: u32, inode: u64) -> Self {
        if inode == 0 {
            Lookup::NoOwner
        } else {
            Lookup::Owner(PeerOwner {
                uid,
                inode,
                pid: None,
            })
        }
    }

    fn into_owner(self) -> Option<PeerOwner> {
        match self {
            Lookup::Owner(owner) => Some(owner),
            Lookup::NoOwner | Lookup::NotFound => None,
        }
    }
}

/// Credentials of the process at the other end of a Unix-domain socket, as the kernel recorded
/// them when that process connected (or created the socket pair).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// Effective user id.
    pub uid: u32,
    /// Effective group id.
    pub gid: u32,
    /// Process id (Linux `SO_PEERCRED`, macOS `LOCAL_PEERPID`); `None` where the system does
    /// not say (the other BSDs' `getpeereid`).
    pub pid: Option<u32>,
}

/// Reads the credentials of the peer of a connected Unix-domain socket (`SO_PEERCRED` on Linux,
/// `getpeereid` on macOS and the BSDs).
pub fn unix_peer(stream: &impl AsRawFd) -> io::Result<UnixPeer> {
    peer_credentials(stream.as_raw_fd())
}

#[cfg(any(target_os = "linux", target_os = "android"))]
fn peer_credentials(fd: std::os::fd::RawFd) -> io::Result<UnixPeer> {
    // SAFETY: ucred is plain integers; all zeroes is a valid value.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `cred` and `len` are valid for writes and `len` is the size of `cred`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixPeer {
        uid: cred.uid,
        gid: cred.gid,
        // 0 when the peer is not a process the kernel can name (e.g. in another pid namespace).
        pid: u32::try_from(cred.pid).ok().filter(|&pid| pid != 0),
    })
}

#[cfg(any(
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
))]
fn peer_credentials(fd: std::os::fd::RawFd) -> io::Result<UnixPeer> {
    let mut uid: libc::uid_t = 0;
    let mut gid: libc::gid_t = 0;
    // SAFETY: `uid` and `gid` are valid for writes.
    if unsafe { libc::getpeereid(fd, &mut uid, &mut gid) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixPeer {
        uid,
        gid,
        pid: peer_pid(fd),
    })
}

/// The pid of a Unix-domain socket's peer (macOS `LOCAL_PEERPID`), for routing by work tree.
#[cfg(target_vendor = "apple")]
fn peer_pid(fd: std::os::fd::RawFd) -> Option<u32> {
    let mut pid: libc::pid_t = 0;
    let mut len = std::mem::size_of::<libc::pid_t>() as libc::socklen_t;
    // SAFETY: `pid` is valid for `len` bytes of writes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_LOCAL,
            libc::LOCAL_PEERPID,
            (&mut pid as *mut libc::pid_t).cast(),
            &mut len,
        )
    };
    (rc == 0)
        .then_some(pid)
        .and_then(|p| u32::try_from(p).ok())
        .filter(|&p| p != 0)
}

/// The BSDs say who, not which process.
#[cfg(all(
    not(target_vendor = "apple"),
    not(target_os = "linux"),
    not(target_os = "android")
))]
fn peer_pid(_fd: std::os::fd::RawFd) -> Option<u32> {
    None
}

#[cfg(not(any(
    target_os = "linux",
    target_os = "android",
    target_vendor = "apple",
    target_os = "freebsd",
    target_os = "openbsd",
    target_os = "netbsd",
    target_os = "dragonfly"
)))]
fn peer_credentials(_fd: std::os::fd::RawFd) -> io::Result<UnixPeer> {
    Err(io::Error::new(
        io::ErrorKind::Unsupported,
        "reading a Unix socket peer's credentials is not implemented on this system",
    ))
}
