//! An io_uring relay, as a reference point for `bench/proxy.sh`: TCP in, a Unix socket out,
//! one thread, no parsing. Each direction is a receive linked to the send of what it got,
//! so a message costs one `io_uring_enter` (which also waits for the next completion)
//! instead of an event loop's `epoll_wait` + `recv` + `send`. It measures what fewer system
//! calls per message could gain over the epoll relay, before anything is built on it.
//!
//! Usage: `uring_relay LISTEN_ADDR UNIX_SOCKET_PATH`

use std::collections::HashMap;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;

use io_uring::{opcode, squeue, types, IoUring};

const BUF: usize = 16 * 1024;
const ACCEPT: u64 = u64::MAX;

/// One direction of one session: reads `from`, writes `to`.
struct Pipe {
    from: RawFd,
    to: RawFd,
    buf: Box<[u8]>,
    /// Bytes received.
    len: usize,
    /// The other direction's key (to close both).
    peer: u64,
}

// Keys: 2 per session, even = client→server, odd = server→client. The low bit of user_data
// tells receive (0) from send (1): user_data = key << 1 | op.
fn recv(p: &mut Pipe, key: u64) -> squeue::Entry {
    opcode::Recv::new(types::Fd(p.from), p.buf.as_mut_ptr(), BUF as u32)
        .build()
        .user_data(key << 1)
}

/// The send of what was received, linked to the next receive into the same buffer (which
/// starts only once the send is done). MSG_WAITALL: the kernel retries short sends, so a
/// success is the whole message and posts no completion (CQE_SKIP_SUCCESS).
fn send(p: &Pipe, key: u64) -> squeue::Entry {
    opcode::Send::new(types::Fd(p.to), p.buf.as_ptr(), p.len as u32)
        .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
        .build()
        .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
        .user_data(key << 1 | 1)
}

fn main() -> std::io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream] = &args[..] else {
        eprintln!("usage: uring_relay LISTEN_ADDR UNIX_SOCKET_PATH");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(listen)?;
    let mut ring = IoUring::new(1024)?;
    let mut pipes: HashMap<u64, Pipe> = HashMap::new();
    let mut next_key = 0u64;
    let mut pending: Vec<squeue::Entry> = vec![opcode::Accept::new(
        types::Fd(listener.as_raw_fd()),
        std::ptr::null_mut(),
        std::ptr::null_mut(),
    )
    .build()
    .user_data(ACCEPT)];
    loop {
        {
            let mut sq = ring.submission();
            for e in pending.drain(..) {
                // SAFETY: every buffer a pending entry points into lives in `pipes` (boxed,
                // so it does not move) until the entry's completion is handled.
                unsafe { sq.push(&e).expect("submission queue full") };
            }
        }
        match ring.submit_and_wait(1) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => other?,
        };
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        for (data, res) in done {
            if data == ACCEPT {
                if res >= 0 {
                    let client = res;
                    let one: libc::c_int = 1;
                    // SAFETY: setting an int option on a socket we own.
                    unsafe {
                        libc::setsockopt(
                            client,
                            libc::IPPROTO_TCP,
                            libc::TCP_NODELAY,
                            (&one as *const libc::c_int).cast(),
                            4,
                        )
                    };
                    let server = UnixStream::connect(upstream)?.into_raw_fd();
                    let (a, b) = (next_key, next_key + 1);
                    next_key += 2;
                    for (key, from, to, peer) in [(a, client, server, b), (b, server, client, a)] {
                        let mut p = Pipe {
                            from,
                            to,
                            buf: vec![0; BUF].into_boxed_slice(),
                            len: 0,
                            peer,
                        };
                        pending.push(recv(&mut p, key));
                        pipes.insert(key, p);
                    }
                }
                pending.push(
                    opcode::Accept::new(
                        types::Fd(listener.as_raw_fd()),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                    )
                    .build()
                    .user_data(ACCEPT),
                );
                continue;
            }
            let (key, is_send) = (data >> 1, data & 1 == 1);
            let Some(p) = pipes.get_mut(&key) else {
                continue;
            };
            if res <= 0 {
                // End of stream or error: close the session (both directions).
                let (from, to, peer) = (p.from, p.to, p.peer);
                pipes.remove(&key);
                if pipes.remove(&peer).is_some() {
                    // SAFETY: closing the session's two descriptors once.
                    unsafe {
                        libc::close(from);
                        libc::close(to);
                    }
                }
                continue;
            }
            // Only failed sends complete (handled above), so this is a receive.
            debug_assert!(!is_send);
            p.len = res as usize;
            pending.push(send(p, key));
            pending.push(recv(p, key));
        }
    }
}
