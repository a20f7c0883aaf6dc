//! The two ends of a session: the client (plain TCP or TLS over TCP) and the upstream server
//! (Unix socket or TCP). Enums rather than trait objects so the relay's hot path has no
//! dynamic dispatch.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::unix_conn::UnixConn;
use tokio_rustls::server::TlsStream;

use crate::router::UpstreamAddr;

/// The client side of a session.
pub enum ClientStream {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS terminated by the proxy.
    Tls(Box<TlsStream<TcpStream>>),
    /// The proxy's Unix socket (libpq never asks for TLS there).
    Unix(UnixConn),
    /// Placeholder while the stream is being upgraded to TLS.
    Closed,
}

/// The upstream side of a session.
pub enum UpstreamStream {
    /// Unix-domain socket.
    Unix(UnixConn),
    /// TCP.
    Tcp(TcpStream),
    /// TLS over TCP.
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    /// Placeholder while the relay's state is lent to the ring thread.
    Closed,
}

/// Connects to `addr`, with `TCP_NODELAY` for TCP. The connect, and for TLS the handshake
/// (SSLRequest included), may each take up to `limit`; past it the error (`TimedOut`) says
/// which step did not finish.
pub async fn connect_upstream(addr: &UpstreamAddr, limit: Duration) -> io::Result<UpstreamStream> {
    match addr {
        UpstreamAddr::Unix(path) => Ok(UpstreamStream::Unix(
            within(limit, "the Unix socket connect", UnixConn::connect(path)).await?,
        )),
        UpstreamAddr::Tcp { host, port } => {
            let connect = TcpStream::connect((host.as_str(), *port));
            let s = within(limit, "the TCP connect", connect).await?;
            s.set_nodelay(true)?;
            Ok(UpstreamStream::Tcp(s))
        }
        // Boxed: the TLS handshake's state is most of this future's size, and every session
        // future holds room for it (a larger task to allocate and move for every connection).
        UpstreamAddr::Tls {
            host,
            port,
            server_name,
            tls,
        } => Box::pin(connect_tls(host, *port, server_name, tls, limit)).await,
    }
}

/// TCP, an SSLRequest, then TLS verified for `server_name` (see [`connect_upstream`]).
async fn connect_tls(
    host: &str,
    port: u16,
    server_name: &str,
    tls: &crate::router::UpstreamTls,
    limit: Duration,
) -> io::Result<UpstreamStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let connect = TcpStream::connect((host, port));
    let mut s = within(limit, "the TCP connect", connect).await?;
    s.set_nodelay(true)?;
    let handshake = async {
        let mut request = bytes::BytesMut::new();
        postgres_protocol::message::frontend::ssl_request(&mut request);
        s.write_all(&request).await?;
        let mut answer = [0u8; 1];
        s.read_exact(&mut answer).await?;
        if answer[0] != b'S' {
            return Err(io::Error::other(format!(
                "{host}:{port} does not accept TLS"
            )));
        }
        let name = rustls::pki_types::ServerName::try_from(server_name.to_string())
            .map_err(|e| io::Error::other(format!("invalid server name {server_name:?}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(tls.0.clone())
            .connect(name, s)
            .await
            .map_err(|e| io::Error::other(format!("TLS with {server_name}: {e}")))?;
        Ok(UpstreamStream::Tls(Box::new(tls)))
    };
    within(limit, "the TLS handshake", handshake).await
}

/// `step` bounded by `limit`: past it, a `TimedOut` error naming the step and the limit.
async fn within<T>(
    limit: Duration,
    step: &str,
    work: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::time::timeout(limit, work).await.unwrap_or_else(|_| {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{step} did not finish within {}s", limit.as_secs_f64()),
        ))
    })
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "stream closed")
}

macro_rules! delegate {
    ($self:ident, $s:ident => $e:expr, $closed:expr) => {
        match $self.get_mut() {
            ClientStream::Plain($s) => {
                let $s = Pin::new($s);
                $e
            }
            ClientStream::Tls($s) => {
                let $s = Pin::new(&mut **$s);
                $e
            }
            ClientStream::Unix($s) => {
                let $s = Pin::new($s);
                $e
            }
            ClientStream::Closed => $closed,
        }
    };
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_read(cx, buf), Poll::Ready(Err(closed())))
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        delegate!(self, s => s.poll_write(cx, buf), Poll::Ready(Err(closed())))
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_flush(cx), Poll::Ready(Ok(())))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        delegate!(self, s => s.poll_shutdown(cx), Poll::Ready(Ok(())))
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_read(cx, buf),
            UpstreamStream::Closed => Poll::Ready(Err(closed())),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_write(cx, buf),
            UpstreamStream::Closed => Poll::Ready(Err(closed())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_flush(cx),
            UpstreamStream::Closed => Poll::Ready(Ok(())),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(&mut **s).poll_shutdown(cx),
            UpstreamStream::Closed => Poll::Ready(Ok(())),
        }
    }
}
