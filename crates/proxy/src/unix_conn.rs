//! A Unix-socket stream that asks the event loop about writability only while a write waits.
//!
//! A Unix socket reports "writable" (a new `EPOLLOUT` edge) every time its peer *reads*: the
//! read frees send-buffer space and the kernel wakes the socket's waiters
//! (`unix_write_space`). A stream registered for both directions, as tokio's `UnixStream`
//! always is, therefore wakes the proxy once for every message the server reads, with nothing
//! to do. Measured with `strace` at `pgbench -S -c 1` through the proxy (server on its Unix
//! socket): 2.8 `epoll_wait` per transaction instead of PgBouncer's 2, and every extra one a
//! whole sleep and wake-up of the proxy thread, the costliest thing a relay does on a
//! virtual machine. TCP reports write space only after a write found the buffer full
//! (`SOCK_NOSPACE`), so TCP streams stay as tokio makes them.
//!
//! So the socket is registered for reading only. A write is tried directly; only when it
//! would block is a second registration made, on a duplicate of the descriptor, for
//! writability (the read registration, and whatever task waits on it, stay untouched). It is
//! dropped as soon as that write goes through: an idle or parked connection holds no extra
//! descriptor, and under sustained back-pressure (a large COPY) it costs four system calls
//! per write that had to wait for the server to drain a full socket buffer.

use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// See the module docs.
pub struct UnixConn {
    /// Registered for readability only.
    read: AsyncFd<std::os::unix::net::UnixStream>,
    /// A duplicate of the descriptor registered for writability, while a write waits.
    write_wait: Option<AsyncFd<OwnedFd>>,
}

impl UnixConn {
    /// Takes over a connected tokio stream (re-registering it for reading only).
    pub fn from_tokio(stream: tokio::net::UnixStream) -> io::Result<Self> {
        Self::from_std(stream.into_std()?)
    }

    /// Takes over a connected std stream (made non-blocking, registered for reading only).
    pub fn from_std(std: std::os::unix::net::UnixStream) -> io::Result<Self> {
        std.set_nonblocking(true)?;
        Ok(UnixConn {
            // SAFETY: the AsyncFd owns the stream, so its descriptor stays open and the
            // same until the AsyncFd is dropped.
            read: unsafe { AsyncFd::register_with_interest(std, Interest::READABLE)? },
            write_wait: None,
        })
    }

    /// Gives the stream up, no longer registered with the event loop (still non-blocking).
    pub fn into_std(self) -> std::os::unix::net::UnixStream {
        drop(self.write_wait);
        self.read.into_inner()
    }

    /// Connects to the socket at `path`.
    pub async fn connect(path: &Path) -> io::Result<Self> {
        Self::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    fn stream(&self) -> &std::os::unix::net::UnixStream {
        self.read.get_ref()
    }

    /// One non-blocking read (`WouldBlock` when there is nothing to read).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream().read(buf)
    }

    /// One non-blocking write (`WouldBlock` when the socket buffer is full).
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.stream().write(buf)
    }

    fn poll_write_waiting(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        loop {
            if self.write_wait.is_none() {
                let dup = self.stream().as_fd().try_clone_to_owned()?;
                // SAFETY: as in `from_tokio`: the AsyncFd owns the duplicate.
                let wait = unsafe { AsyncFd::register_with_interest(dup, Interest::WRITABLE)? };
                self.write_wait = Some(wait);
            }
            let Some(wait) = &self.write_wait else {
                unreachable!("registered just above");
            };
            let mut guard = ready!(wait.poll_write_ready(cx))?;
            match self.read.get_ref().write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                other => {
                    drop(guard);
                    self.write_wait = None;
                    return Poll::Ready(other);
                }
            }
        }
    }
}

impl AsRawFd for UnixConn {
    fn as_raw_fd(&self) -> RawFd {
        self.read.as_raw_fd()
    }
}

impl AsyncRead for UnixConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let mut guard = ready!(this.read.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let len = unfilled.len();
            match this.read.get_ref().read(unfilled) {
                Ok(n) => {
                    // A short read emptied the socket: the next read would only say
                    // WouldBlock (tokio's own streams skip that call the same way). Readiness
                    // that arrived meanwhile is kept: clearing is checked against its tick.
                    if n > 0 && n < len {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => guard.clear_ready(),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for UnixConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.write_wait.is_none() {
            match this.try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => return Poll::Ready(other),
            }
        }
        this.poll_write_waiting(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.stream().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn pair() -> (UnixConn, tokio::net::UnixStream) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        (UnixConn::from_tokio(a).unwrap(), b)
    }

    #[tokio::test]
    async fn a_blocked_write_waits_for_the_peer_and_leaves_no_registration() {
        let (mut conn, mut peer) = pair();
        // Far more than a Unix socket buffers: the writes must wait for the peer.
        let data: Vec<u8> = (0..4 * 1024 * 1024u32).map(|i| i as u8).collect();
        let writer = async {
            conn.write_all(&data).await.unwrap();
            conn.flush().await.unwrap();
            conn
        };
        let reader = async {
            let mut got = vec![0u8; data.len()];
            peer.read_exact(&mut got).await.unwrap();
            got
        };
        let (mut conn, got) = tokio::time::timeout(Duration::from_secs(20), async {
            tokio::join!(writer, reader)
        })
        .await
        .expect("the writer was woken when the peer read");
        assert!(got == data, "bytes arrived in order, none lost");
        assert!(
            conn.write_wait.is_none(),
            "no write registration (nor its descriptor) once no write waits"
        );
        conn.write_all(b"small").await.unwrap();
        assert!(conn.write_wait.is_none());
        let mut small = [0u8; 5];
        peer.read_exact(&mut small).await.unwrap();
        assert_eq!(&small, b"small");
    }

    #[tokio::test]
    async fn reads_see_data_that_came_after_a_short_read() {
        let (mut conn, mut peer) = pair();
        let mut buf = [0u8; 64];
        peer.write_all(b"one").await.unwrap();
        let n = conn.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"one");
        // The short read cleared readiness; the next message must still wake the reader.
        let later = async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            peer.write_all(b"two").await.unwrap();
            peer
        };
        let (n, mut peer) = tokio::time::timeout(Duration::from_secs(5), async {
            tokio::join!(conn.read(&mut buf), later)
        })
        .await
        .expect("woken for the second message");
        assert_eq!(&buf[..n.unwrap()], b"two");
        drop(peer.shutdown().await);
        drop(peer);
        assert_eq!(conn.read(&mut buf).await.unwrap(), 0, "end of stream");
    }
}
