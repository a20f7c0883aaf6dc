//! Reading a client's first packets with as few receives as the bytes allow, and what was
//! read past them.
//!
//! Reading a length word and then a body costs two receives a packet; a connect-per-query
//! client sends two packets (SSLRequest, StartupMessage), so that was two system calls in
//! ~25 per connection. [`Inbox`] reads whatever has arrived, up to [`READ_AHEAD`] bytes in
//! all, and keeps what follows a packet (a direct TLS ClientHello goes to rustls whole or in
//! part, see `tls::accept_direct`). PostgreSQL keeps such bytes as
//! well (its receive buffer): after an SSLRequest or GSSENCRequest they are an error (they
//! came unencrypted before the encryption they asked for, see `session::handshake`); after
//! the StartupMessage they are the client's first messages, read from [`WithEarly`] by the
//! password exchange and then handed to the relay.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Most bytes read past the end of the packet being read; so also the most the client can
/// have sent ahead that the relay takes over (within its client buffer, `relay::C2S_BUF`).
/// A startup packet is a few hundred bytes; below 1 KiB the buffer is a small allocation for
/// glibc's malloc, which consolidates its free lists before every larger one.
pub(crate) const READ_AHEAD: usize = 512;

/// Bytes read from the client and not used yet: `buf[..filled]`.
pub(crate) struct Inbox {
    buf: Vec<u8>,
    filled: usize,
}

impl Inbox {
    pub(crate) fn new() -> Inbox {
        Inbox {
            buf: Vec::new(),
            filled: 0,
        }
    }

    /// Reads until at least `n` bytes are in, taking whatever else has come with them (up
    /// to `read_ahead` bytes in all, so never more than that past `n`). `UnexpectedEof`
    /// if the client closes first.
    pub(crate) async fn fill_to<R: AsyncRead + Unpin>(
        &mut self,
        stream: &mut R,
        n: usize,
        read_ahead: usize,
    ) -> io::Result<()> {
        if self.filled >= n {
            return Ok(());
        }
        debug_assert!(read_ahead <= READ_AHEAD);
        // Room for `n`, and for what came along up to `read_ahead` in all.
        self.buf.resize(n.max(read_ahead), 0);
        while self.filled < n {
            match stream.read(&mut self.buf[self.filled..]).await? {
                0 => return Err(io::ErrorKind::UnexpectedEof.into()),
                got => self.filled += got,
            }
        }
        Ok(())
    }

    /// The bytes in, not used yet.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[..self.filled]
    }

    /// Forgets the first `n` bytes (a packet that was used).
    pub(crate) fn consume(&mut self, n: usize) {
        self.buf.copy_within(n..self.filled, 0);
        self.filled -= n;
    }

    /// Everything in, not used yet; the inbox is then empty.
    pub(crate) fn take_all(&mut self) -> Vec<u8> {
        let rest = self.buf[..self.filled].to_vec();
        self.filled = 0;
        rest
    }
}

/// A client stream with bytes already read from it (`early`) in front: reads take those
/// first, then the stream's; writes go to the stream.
pub(crate) struct WithEarly<'a, S> {
    pub(crate) early: &'a mut Vec<u8>,
    pub(crate) stream: &'a mut S,
}

impl<S: AsyncRead + Unpin> AsyncRead for WithEarly<'_, S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.early.is_empty() {
            return Pin::new(&mut *this.stream).poll_read(cx, buf);
        }
        let n = this.early.len().min(buf.remaining());
        buf.put_slice(&this.early[..n]);
        this.early.drain(..n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WithEarly<'_, S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.get_mut().stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// A client that wrote `sent` in pieces of `split` bytes, then waits.
    async fn inbox_after(sent: &[u8], split: usize, n: usize) -> (Inbox, usize) {
        let (mut client, mut proxy) = tokio::io::duplex(4 * READ_AHEAD);
        for piece in sent.chunks(split) {
            client.write_all(piece).await.unwrap();
        }
        let mut inbox = Inbox::new();
        inbox.fill_to(&mut proxy, n, READ_AHEAD).await.unwrap();
        let filled = inbox.filled;
        (inbox, filled)
    }

    #[tokio::test]
    async fn reads_what_came_but_never_far_past_the_packet() {
        let sent: Vec<u8> = (0..3 * READ_AHEAD as u32).map(|i| i as u8).collect();
        for split in [1, 7, 8, 100, sent.len()] {
            let (inbox, filled) = inbox_after(&sent, split, 8).await;
            assert!(
                (8..=READ_AHEAD).contains(&filled),
                "split {split}: {filled}"
            );
            assert_eq!(inbox.bytes(), &sent[..filled]);
            let (inbox, filled) = inbox_after(&sent, split, 2 * READ_AHEAD).await;
            assert_eq!(filled, 2 * READ_AHEAD, "a long packet: nothing past it");
            assert_eq!(inbox.bytes(), &sent[..filled]);
        }
    }

    #[tokio::test]
    async fn a_smaller_read_ahead_is_kept_to() {
        let sent = [7u8; 100];
        let (mut client, mut proxy) = tokio::io::duplex(256);
        client.write_all(&sent).await.unwrap();
        let mut inbox = Inbox::new();
        inbox.fill_to(&mut proxy, 4, 8).await.unwrap();
        assert_eq!(inbox.bytes().len(), 8);
        inbox.fill_to(&mut proxy, 20, READ_AHEAD).await.unwrap();
        assert_eq!(inbox.bytes().len(), 100, "the rest, once more is wanted");
    }

    #[tokio::test]
    async fn consume_keeps_what_follows() {
        let sent = b"\0\0\0\x08abcdEXTRA";
        let (mut client, mut proxy) = tokio::io::duplex(64);
        client.write_all(sent).await.unwrap();
        let mut inbox = Inbox::new();
        inbox.fill_to(&mut proxy, 8, READ_AHEAD).await.unwrap();
        inbox.consume(8);
        assert_eq!(inbox.bytes(), b"EXTRA");
        // More asked for than came: the next read appends.
        client.write_all(b"MORE").await.unwrap();
        inbox.fill_to(&mut proxy, 9, READ_AHEAD).await.unwrap();
        assert_eq!(inbox.bytes(), b"EXTRAMORE");
        assert_eq!(inbox.take_all(), b"EXTRAMORE");
        assert!(inbox.bytes().is_empty());
        drop(client);
        let err = inbox.fill_to(&mut proxy, 1, READ_AHEAD).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[tokio::test]
    async fn early_bytes_are_read_first() {
        let (mut client, mut proxy) = tokio::io::duplex(64);
        client.write_all(b"later").await.unwrap();
        let mut early = b"first-".to_vec();
        let mut both = WithEarly {
            early: &mut early,
            stream: &mut proxy,
        };
        let mut got = [0u8; 11];
        both.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"first-later");
        both.write_all(b"reply").await.unwrap();
        let mut reply = [0u8; 5];
        client.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply, b"reply");
    }
}
