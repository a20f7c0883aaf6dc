//! The proxy's listening sockets (TCP and Unix) and the accept loop, including what happens
//! when the process runs out of file descriptors.
//!
//! Out of descriptors, `accept` fails with EMFILE and the client would wait in the backlog
//! until its own timeout, then see a dropped connection. Two defences, so every client gets
//! an answer:
//! - **A session budget** ([`SessionBudget`]): each session costs two descriptors (client and
//!   server), so the proxy admits at most (soft `RLIMIT_NOFILE` − descriptors open at start −
//!   [`FD_HEADROOM`]) / 2 sessions at once, as PgBouncer's `max_client_conn` does; the one over
//!   it is accepted and told `53300 too many connections`. The headroom keeps descriptors for
//!   what the daemon itself needs (starting a branch, reading its pid file, the control socket).
//! - **A reserved descriptor** (`/dev/null`) per listener for when something else used them up
//!   anyway: on EMFILE the proxy closes the reserve, accepts the waiting client with the freed
//!   descriptor, answers it 53300, closes it, and takes the reserve again.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, UnixListener};

use crate::auth::ClientPeer;
use crate::error::{sqlstate, PgError};
use crate::stream::ClientStream;
use crate::unix_conn::UnixConn;
use crate::Proxy;

/// Pending connections the kernel queues per listener (capped by `net.core.somaxconn`): a
/// burst of hundreds of connects (a test suite, a pool filling up) must not be refused.
pub const LISTEN_BACKLOG: i32 = 4096;
/// Pause after an accept error that is not about descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
/// How long a client refused for lack of descriptors gets to read its error.
const REFUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Descriptors kept free for the daemon's own work beyond the sessions' two each.
pub const FD_HEADROOM: u64 = 16;

/// How many sessions may run at once given the open-file limit (see the module docs).
pub(crate) struct SessionBudget {
    max: usize,
    running: std::sync::atomic::AtomicUsize,
}

/// Counts one session against the budget until dropped.
pub(crate) struct BudgetSlot(Arc<SessionBudget>);

impl Drop for BudgetSlot {
    fn drop(&mut self) {
        self.0
            .running
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

impl SessionBudget {
    /// The budget for the current soft limit and the descriptors open now.
    pub(crate) fn from_limits() -> SessionBudget {
        let soft = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE)
            .map(|(soft, _)| soft)
            .unwrap_or(1024);
        let open = open_descriptors().unwrap_or(64);
        let max = (soft.saturating_sub(open + FD_HEADROOM) / 2).max(1);
        SessionBudget {
            max: usize::try_from(max).unwrap_or(usize::MAX),
            running: Default::default(),
        }
    }

    /// A slot for one more session, or None when the budget is spent. `parked`: idle server
    /// connections kept for reuse, one descriptor each.
    fn claim(self: &Arc<Self>, parked: usize) -> Option<BudgetSlot> {
        use std::sync::atomic::Ordering;
        let mut now = self.running.load(Ordering::Relaxed);
        loop {
            if now + parked.div_ceil(2) >= self.max {
                return None;
            }
            match self.running.compare_exchange_weak(
                now,
                now + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(BudgetSlot(self.clone())),
                Err(actual) => now = actual,
            }
        }
    }

    /// The most sessions at once.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// Descriptors this process has open (Linux `/proc/self/fd`, macOS `/dev/fd`).
fn open_descriptors() -> Option<u64> {
    let dir = if cfg!(target_os = "linux") {
        "/proc/self/fd"
    } else {
        "/dev/fd"
    };
    Some(std::fs::read_dir(dir).ok()?.count() as u64)
}

/// A socket the proxy accepts clients on.
pub enum Listener {
    /// TCP (loopback, or a configured address).
    Tcp(TcpListener),
    /// A Unix-domain socket (`.s.PGSQL.<port>` in a private folder); peers are identified by
    /// `SO_PEERCRED`.
    Unix(UnixListener),
}

/// Binds TCP `addr` with [`LISTEN_BACKLOG`] (IPv6 addresses only for IPv6, so that
/// 127.0.0.1 and ::1 can be bound side by side). Call inside a tokio runtime.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = socket2::Domain::for_address(addr);
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Binds a Unix socket at `path` (a stale socket file there is replaced) with file `mode`
/// (who may connect at all; 0666 when every connection is checked by its credentials).
pub fn bind_unix(path: &Path, mode: u32) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(_) => {}
    }
    let socket = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
    socket.bind(&socket2::SockAddr::unix(path)?)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The reserved descriptor (see the module docs).
struct Reserve(Mutex<Option<std::fs::File>>);

impl Reserve {
    fn take() -> Reserve {
        Reserve(Mutex::new(std::fs::File::open("/dev/null").ok()))
    }
    /// Frees the reserved descriptor; false when there was none.
    fn release(&self) -> bool {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .is_some()
    }
    fn restore(&self) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = std::fs::File::open("/dev/null").ok();
        }
    }
}

fn out_of_descriptors(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}

/// The error a client gets when the proxy has no descriptor for it.
pub(crate) fn too_many_connections() -> PgError {
    PgError::fatal(
        sqlstate::TOO_MANY_CONNECTIONS,
        "sorry, too many clients already: the pgtwig proxy is out of file descriptors",
    )
    .hint(
        "close idle connections, or raise the daemon's open-file limit (ulimit -n) and restart it",
    )
}

/// Accepts on `listener` until the listener itself fails for good.
pub(crate) async fn accept_loop(
    proxy: Arc<Proxy>,
    listener: Listener,
    budget: Arc<SessionBudget>,
) -> io::Result<()> {
    let reserve = Arc::new(Reserve::take());
    // A listener bound to one address accepts every connection on it: no `getsockname` per
    // connection then (one system call of the ~25 a connect-per-query client costs).
    let bound = match &listener {
        Listener::Tcp(l) => l.local_addr().ok().filter(|a| !a.ip().is_unspecified()),
        Listener::Unix(_) => None,
    };
    loop {
        let accepted = match &listener {
            Listener::Tcp(l) => l.accept().await.and_then(|(tcp, remote)| {
                let _ = tcp.set_nodelay(true);
                let local = match bound {
                    Some(local) => local,
                    None => tcp.local_addr()?,
                };
                Ok((ClientStream::Plain(tcp), ClientPeer::Tcp { local, remote }))
            }),
            Listener::Unix(l) => l.accept().await.and_then(|(unix, _)| {
                let cred = crate::peer::unix_peer(&unix).ok();
                let peer = ClientPeer::Unix {
                    uid: cred.map(|c| c.uid),
                    pid: cred.and_then(|c| c.pid),
                };
                Ok((ClientStream::Unix(UnixConn::from_tokio(unix)?), peer))
            }),
        };
        match accepted {
            Ok((client, peer)) => match budget.claim(proxy.pool.len()) {
                Some(slot) => {
                    let proxy = proxy.clone();
                    tokio::spawn(async move {
                        crate::session::run(proxy, client, peer).await;
                        drop(slot);
                    });
                }
                None => {
                    tracing::warn!(
                        "{} sessions, the most the open-file limit allows: refusing {peer} with 53300",
                        budget.max()
                    );
                    tokio::spawn(refuse(client));
                }
            },
            Err(e) if out_of_descriptors(&e) && reserve.release() => {
                tracing::warn!("out of file descriptors: refusing a client with 53300 ({e})");
                let refused = match &listener {
                    Listener::Tcp(l) => l.accept().await.map(|(s, _)| ClientStream::Plain(s)),
                    Listener::Unix(l) => l
                        .accept()
                        .await
                        .and_then(|(s, _)| Ok(ClientStream::Unix(UnixConn::from_tokio(s)?))),
                };
                let reserve = reserve.clone();
                tokio::spawn(async move {
                    if let Ok(client) = refused {
                        refuse(client).await;
                    }
                    reserve.restore();
                });
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(ACCEPT_RETRY).await;
                reserve.restore();
            }
        }
    }
}

/// Answers a client the proxy cannot serve: `N` to an SSLRequest (it cannot afford a TLS
/// handshake), then 53300 once the startup packet is in.
async fn refuse(mut client: ClientStream) {
    let talk = async {
        let mut first = [0u8; 8];
        client.read_exact(&mut first).await?;
        let len = u32::from_be_bytes([first[0], first[1], first[2], first[3]]) as usize;
        let code = u32::from_be_bytes([first[4], first[5], first[6], first[7]]);
        if len == 8 && code == crate::startup::SSL_REQUEST_CODE {
            client.write_all(b"N").await?;
        }
        client.write_all(&too_many_connections().encode()).await?;
        client.flush().await?;
        client.shutdown().await?;
        // Read what the client still sends (its startup packet) until it closes: closing
        // with unread data would reset the connection and could lose the error.
        let mut sink = [0u8; 512];
        while client.read(&mut sink).await? > 0 {}
        Ok::<(), io::Error>(())
    };
    let _ = tokio::time::timeout(REFUSE_TIMEOUT, talk).await;
}
