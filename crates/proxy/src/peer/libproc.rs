//! macOS: the process holding the client end of a TCP connection, found as `lsof -i` finds
//! it, through libproc: the processes of a user (`proc_listpids(PROC_UID_ONLY)`), each one's
//! descriptors (`proc_pidinfo(PROC_PIDLISTFDS)`) and each socket's addresses
//! (`proc_pidfdinfo(PROC_PIDFDSOCKETINFO)`, read by `socket_fdinfo.rs`).
//!
//! macOS has no socket table to query by address (Linux's `sock_diag`) and no socket owner
//! recorded for TCP; what a process of the user holds is all the kernel tells another process
//! of the same user (other users' descriptors answer `EPERM`). So a socket found here belongs
//! to a process of the user, and one not found is "unknown" (the client is asked for the
//! password). A full search costs a system call per process and per socket descriptor, so the
//! processes that held a client socket last are tried first: an app that connects again is
//! found at its first look.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::sync::Mutex;

use super::socket_fdinfo::{tcp_endpoints, NEEDED, SOCKET_FDINFO_SIZE};

/// `proc_listpids` type: processes whose effective uid is `typeinfo` (`<sys/proc_info.h>`).
const PROC_UID_ONLY: u32 = 4;
/// `proc_pidfdinfo` flavor filling a `socket_fdinfo`.
const PROC_PIDFDSOCKETINFO: libc::c_int = 3;
/// Processes remembered as recent holders of client sockets, tried first.
const RECENT_HOLDERS: usize = 16;
/// Room beyond the current count when listing pids or descriptors (they change meanwhile).
const LIST_SLACK: usize = 32;

static RECENT: Mutex<VecDeque<u32>> = Mutex::new(VecDeque::new());

/// The pid of the process of `uid` holding the TCP socket whose local address is `client` and
/// whose remote address is `server`; `None` when no process of `uid` holds it.
pub(super) fn holder(uid: u32, client: SocketAddr, server: SocketAddr) -> io::Result<Option<u32>> {
    let want = (canonical(client), canonical(server));
    let recent: Vec<u32> = RECENT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .copied()
        .collect();
    // A recent pid may have been reused by another user's process since: checked.
    let found = match recent
        .iter()
        .copied()
        .find(|&pid| effective_uid(pid) == Some(uid) && holds(pid, want))
    {
        Some(pid) => Some(pid),
        None => pids_of(uid)?
            .into_iter()
            .filter(|pid| !recent.contains(pid))
            .find(|&pid| holds(pid, want)),
    };
    if let Some(pid) = found {
        let mut recent = RECENT.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|&p| p != pid);
        recent.push_front(pid);
        recent.truncate(RECENT_HOLDERS);
    }
    Ok(found)
}

/// The effective uid of `pid` (libproc `PROC_PIDTBSDINFO`), `None` if it is gone.
fn effective_uid(pid: u32) -> Option<u32> {
    let pid = libc::c_int::try_from(pid).ok()?;
    // SAFETY: proc_bsdinfo is plain integers and bytes; all zeroes is a valid value.
    let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
    // SAFETY: `info` is valid for `size` bytes of writes.
    let n = unsafe {
        libc::proc_pidinfo(
            pid,
            libc::PROC_PIDTBSDINFO,
            0,
            (&mut info as *mut libc::proc_bsdinfo).cast(),
            size,
        )
    };
    (n == size).then_some(info.pbi_uid)
}

fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The processes whose effective uid is `uid`.
fn pids_of(uid: u32) -> io::Result<Vec<u32>> {
    // SAFETY: a null buffer asks for the size needed.
    let needed = unsafe { libc::proc_listpids(PROC_UID_ONLY, uid, std::ptr::null_mut(), 0) };
    if needed < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut pids: Vec<libc::c_int> = vec![0; needed as usize / 4 + LIST_SLACK];
    let bytes = (pids.len() * 4) as libc::c_int;
    // SAFETY: `pids` is valid for `bytes` bytes of writes.
    let n = unsafe { libc::proc_listpids(PROC_UID_ONLY, uid, pids.as_mut_ptr().cast(), bytes) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    pids.truncate(n as usize / 4);
    Ok(pids
        .into_iter()
        .filter_map(|p| u32::try_from(p).ok())
        .filter(|&p| p != 0)
        .collect())
}

/// Whether `pid` holds a TCP socket with the addresses `want` (local, remote). A process that
/// is gone or not ours holds nothing.
fn holds(pid: u32, want: (SocketAddr, SocketAddr)) -> bool {
    let Ok(pid) = libc::c_int::try_from(pid) else {
        return false;
    };
    socket_descriptors(pid).into_iter().any(|fd| {
        let mut info = FdInfoBuffer([0; BUFFER]);
        // SAFETY: `info` is valid for BUFFER bytes of writes.
        let n = unsafe {
            libc::proc_pidfdinfo(
                pid,
                fd,
                PROC_PIDFDSOCKETINFO,
                info.0.as_mut_ptr().cast(),
                BUFFER as libc::c_int,
            )
        };
        n >= NEEDED as libc::c_int
            && tcp_endpoints(&info.0[..(n as usize).min(BUFFER)])
                .is_some_and(|(local, remote)| (canonical(local), canonical(remote)) == want)
    })
}

/// Bigger than `socket_fdinfo` (the kernel copies out exactly its size and refuses less),
/// aligned as the struct is.
const BUFFER: usize = SOCKET_FDINFO_SIZE + 232;
#[repr(C, align(8))]
struct FdInfoBuffer([u8; BUFFER]);

/// The socket descriptors of `pid` (none if it is gone or not ours).
fn socket_descriptors(pid: libc::c_int) -> Vec<libc::c_int> {
    let entry = std::mem::size_of::<libc::proc_fdinfo>();
    // SAFETY: a null buffer asks for the size needed.
    let needed =
        unsafe { libc::proc_pidinfo(pid, libc::PROC_PIDLISTFDS, 0, std::ptr::null_mut(), 0) };
    if needed <= 0 {
        return Vec::new();
    }
    let mut fds: Vec<libc::proc_fdinfo> = Vec::with_capacity(needed as usize / entry + LIST_SLACK);
    let bytes = (fds.capacity() * entry) as libc::c_int;
    // SAFETY: `fds` has room for `bytes` bytes; the kernel writes whole entries and says how
    // many bytes it wrote.
    let n = unsafe {
        libc::proc_pidinfo(
            pid,
            libc::PROC_PIDLISTFDS,
            0,
            fds.as_mut_ptr().cast(),
            bytes,
        )
    };
    if n <= 0 {
        return Vec::new();
    }
    // SAFETY: the kernel initialised `n` bytes, whole entries, within the capacity.
    unsafe { fds.set_len((n as usize / entry).min(fds.capacity())) };
    fds.into_iter()
        .filter(|f| f.proc_fdtype == libc::PROX_FDTYPE_SOCKET as u32)
        .map(|f| f.proc_fd)
        .collect()
}
