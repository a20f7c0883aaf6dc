//! [`Relay`]: a session's relay as its tokio task holds it. The state ([`Inner`]) is on the
//! task, or lent to the ring thread (`ring.rs`) once the session has settled and both of its
//! streams are plain. Controls that arrive while it is away (a branch switch, a drain) recall
//! it, and are applied when it is back, where the epoll path carries on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use super::{ControlWatch, Inner, RelayEnd, SharedStatus};
use crate::cancel::CancelMap;
use crate::pool::{Parked, Pool};
use crate::router::UpstreamAddr;
use crate::stream::{ClientStream, UpstreamStream};

#[cfg(target_os = "linux")]
use super::ring::{Lent, Returned, RingHandle};
#[cfg(target_os = "linux")]
use std::os::fd::OwnedFd;

/// A running session: a future that relays until one side ends.
pub struct Relay {
    /// The state, while it is on this task.
    local: Option<Box<Inner>>,
    /// The state is on the ring thread.
    #[cfg(target_os = "linux")]
    away: Option<Away>,
    /// Sessions may be lent to the first this many rings (`ProxyConfig::io_uring_threads`;
    /// 0: never, `ProxyConfig::io_uring` off or the ring unavailable).
    ring: usize,
    /// Controls that came while the state was away, in order.
    controls: Vec<Control>,
    /// How the session ended where no state was left to carry on with.
    failed: Option<RelayEnd>,
    /// Control watches that came while the state was away, for when it is back.
    #[cfg(target_os = "linux")]
    watches: Option<Vec<Box<dyn ControlWatch>>>,
}

#[cfg(target_os = "linux")]
struct Away {
    id: u64,
    /// The ring thread the state is on.
    ring: &'static RingHandle,
    back: tokio::sync::oneshot::Receiver<Returned>,
    client: Kind,
    server: Kind,
    recalled: bool,
}

/// What a lent descriptor was, to make it that again.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy)]
enum Kind {
    Tcp,
    Unix,
}

enum Control {
    CloseWhenIdle(String),
    CancelClose,
}

/// Ids of lent sessions (for recalls).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl Relay {
    fn wrap(inner: Inner) -> Self {
        Relay {
            local: Some(Box::new(inner)),
            #[cfg(target_os = "linux")]
            away: None,
            ring: 0,
            controls: Vec::new(),
            failed: None,
            #[cfg(target_os = "linux")]
            watches: None,
        }
    }

    /// The control sources the session's task watches, as it has just looked at them (its
    /// scope's active branch while it follows switches, its branch's drains): a session on
    /// the ring gives the client's next bytes back to the task when one of them changes, so
    /// a switch is applied before a query that came after it (see [`ControlWatch`]).
    pub(crate) fn watch_controls(&mut self, watches: Vec<Box<dyn ControlWatch>>) {
        match &mut self.local {
            Some(inner) => inner.set_watches(watches),
            #[cfg(target_os = "linux")]
            None => self.watches = Some(watches),
            #[cfg(not(target_os = "linux"))]
            None => {}
        }
    }

    /// See [`Inner::new`].
    pub fn new(
        client: ClientStream,
        server: UpstreamStream,
        upstream: UpstreamAddr,
        cancel: Arc<CancelMap>,
        shared_status: SharedStatus,
        reusable: bool,
    ) -> Self {
        Self::wrap(Inner::new(
            client,
            server,
            upstream,
            cancel,
            shared_status,
            reusable,
        ))
    }

    /// See [`Inner::resume`].
    pub fn resume(
        client: ClientStream,
        parked: Parked,
        upstream: UpstreamAddr,
        cancel: Arc<CancelMap>,
        shared_status: SharedStatus,
    ) -> Self {
        Self::wrap(Inner::resume(
            client,
            parked,
            upstream,
            cancel,
            shared_status,
        ))
    }

    /// See [`Inner::hold_early_client_bytes`]; for a new relay (its state is here).
    pub fn hold_early_client_bytes(&mut self, early: &[u8]) {
        if let Some(inner) = &mut self.local {
            inner.hold_early_client_bytes(early);
        }
    }

    /// The pool whose parked connections this session's statements may need gone.
    pub fn set_pool(&mut self, pool: Arc<Pool>) {
        if let Some(inner) = &mut self.local {
            inner.set_pool(pool);
        }
    }

    /// Reports every wake-up of this session to `activity` (for busy-polling).
    pub fn set_activity(&mut self, activity: Option<Arc<crate::spin::Activity>>) {
        if let Some(inner) = &mut self.local {
            inner.set_activity(activity);
        }
    }

    /// Lets the session's data path move to the ring thread once it settles (where io_uring
    /// works; elsewhere this changes nothing).
    pub fn set_ring(&mut self, threads: usize) {
        self.ring = if cfg!(target_os = "linux") {
            threads
        } else {
            0
        };
    }

    /// See [`Inner::close_when_idle`]; while the state is on the ring it is recalled first.
    pub fn close_when_idle(&mut self, message: String) {
        match &mut self.local {
            Some(inner) => inner.close_when_idle(message),
            None => {
                self.controls.push(Control::CloseWhenIdle(message));
                self.recall();
            }
        }
    }

    /// See [`Inner::cancel_close`].
    pub fn cancel_close(&mut self) {
        match &mut self.local {
            Some(inner) => inner.cancel_close(),
            // Only a close that came while away is there to withdraw.
            None if !self.controls.is_empty() => self.controls.push(Control::CancelClose),
            None => {}
        }
    }

    /// See [`Inner::is_fresh`] (false while the state is away: it is not, after an end).
    pub fn is_fresh(&self) -> bool {
        self.local.as_ref().is_some_and(|i| i.is_fresh())
    }

    /// See [`Inner::move_to`].
    pub fn move_to(&mut self, to: Parked, upstream: UpstreamAddr) -> Option<Parked> {
        self.local.as_mut()?.move_to(to, upstream)
    }

    /// See [`Inner::finish`]; a session whose state is away gets it back first.
    pub async fn finish(mut self, end: &RelayEnd) -> Option<Parked> {
        #[cfg(target_os = "linux")]
        if self.away.is_some() {
            self.recall();
            // Ends with the state back (or with nothing to finish).
            let _ = std::future::poll_fn(|cx| self.poll_back(cx)).await;
        }
        let inner = self.local.take()?;
        (*inner).finish(end).await
    }

    fn recall(&mut self) {
        #[cfg(target_os = "linux")]
        if let Some(away) = &mut self.away {
            if !std::mem::replace(&mut away.recalled, true) {
                away.ring.recall(away.id);
            }
        }
    }

    /// Lends the state to the ring thread. False (state still here) when the ring is not
    /// available.
    #[cfg(target_os = "linux")]
    fn lend(&mut self) -> bool {
        let Some(ring) = RingHandle::pick(self.ring) else {
            self.ring = 0;
            return false;
        };
        let Some(mut inner) = self.local.take() else {
            return false;
        };
        let client = std::mem::replace(&mut inner.client, ClientStream::Closed);
        let server = std::mem::replace(&mut inner.server, UpstreamStream::Closed);
        let (client, server) = match (client, server) {
            (
                c @ (ClientStream::Plain(_) | ClientStream::Unix(_)),
                s @ (UpstreamStream::Tcp(_) | UpstreamStream::Unix(_)),
            ) => (c, s),
            (c, s) => {
                // Not lendable (the caller checks): put them back.
                inner.client = c;
                inner.server = s;
                self.local = Some(inner);
                return false;
            }
        };
        // A stream given up for its descriptor cannot be put back: a failure ends the session.
        let ((client_kind, client), (server_kind, server)) =
            match (client_descriptor(client), server_descriptor(server)) {
                (Ok(c), Ok(s)) => (c, s),
                (Err(e), _) => {
                    self.failed = Some(RelayEnd::ClientError(e));
                    return false;
                }
                (_, Err(e)) => {
                    self.failed = Some(RelayEnd::ServerError(e));
                    return false;
                }
            };
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let (back_tx, back) = tokio::sync::oneshot::channel();
        let lent = Lent {
            id,
            inner,
            client,
            server,
            back: back_tx,
        };
        if let Err(lent) = ring.lend(lent) {
            // The ring stopped: carry on here.
            self.ring = 0;
            let mut inner = lent.inner;
            match restore(client_kind, lent.client, server_kind, lent.server) {
                Ok((client, server)) => {
                    inner.client = client;
                    inner.server = server;
                    self.local = Some(inner);
                }
                Err(e) => {
                    self.local = Some(inner);
                    self.failed = Some(RelayEnd::ServerError(e));
                }
            }
            return false;
        }
        self.away = Some(Away {
            id,
            ring,
            back,
            client: client_kind,
            server: server_kind,
            recalled: false,
        });
        true
    }

    /// Waits for the state to come back from the ring, and takes it in: its descriptors
    /// registered here again, the controls that came meanwhile applied. Ready with how the
    /// session ended on the ring, if it did.
    #[cfg(target_os = "linux")]
    fn poll_back(&mut self, cx: &mut Context<'_>) -> Poll<Option<RelayEnd>> {
        let Some(away) = &mut self.away else {
            return Poll::Ready(None);
        };
        let returned = std::task::ready!(Pin::new(&mut away.back).poll(cx));
        let (client_kind, server_kind) = (away.client, away.server);
        self.away = None;
        let Ok(Returned {
            mut inner,
            client,
            server,
            end,
        }) = returned
        else {
            return Poll::Ready(Some(RelayEnd::ServerError(io::Error::other(
                "the relay's ring thread stopped",
            ))));
        };
        let streams = restore(client_kind, client, server_kind, server);
        match streams {
            Ok((client, server)) => {
                inner.client = client;
                inner.server = server;
            }
            Err(e) => return Poll::Ready(Some(end.unwrap_or(RelayEnd::ServerError(e)))),
        }
        for control in self.controls.drain(..) {
            match control {
                Control::CloseWhenIdle(message) => inner.close_when_idle(message),
                Control::CancelClose => inner.cancel_close(),
            }
        }
        if let Some(watches) = self.watches.take() {
            inner.set_watches(watches);
        }
        let held = inner.take_held_client_bytes();
        self.local = Some(inner);
        Poll::Ready(end.or(held.err()))
    }
}

/// A plain client stream's descriptor, no longer registered here, blocking.
#[cfg(target_os = "linux")]
fn client_descriptor(stream: ClientStream) -> io::Result<(Kind, OwnedFd)> {
    match stream {
        ClientStream::Plain(s) => Ok((Kind::Tcp, blocking(s.into_std()?)?)),
        ClientStream::Unix(s) => Ok((Kind::Unix, blocking(s.into_std())?)),
        _ => Err(io::Error::other("only plain client streams go to the ring")),
    }
}

/// A plain upstream stream's descriptor, as [`client_descriptor`].
#[cfg(target_os = "linux")]
fn server_descriptor(stream: UpstreamStream) -> io::Result<(Kind, OwnedFd)> {
    match stream {
        UpstreamStream::Tcp(s) => Ok((Kind::Tcp, blocking(s.into_std()?)?)),
        UpstreamStream::Unix(s) => Ok((Kind::Unix, blocking(s.into_std())?)),
        _ => Err(io::Error::other(
            "only plain upstream streams go to the ring",
        )),
    }
}

/// The lent descriptors as the streams they were, registered with this task's runtime.
#[cfg(target_os = "linux")]
fn restore(
    client_kind: Kind,
    client: OwnedFd,
    server_kind: Kind,
    server: OwnedFd,
) -> io::Result<(ClientStream, UpstreamStream)> {
    let client = match client_kind {
        Kind::Tcp => ClientStream::Plain(tokio::net::TcpStream::from_std(tcp(client)?)?),
        Kind::Unix => ClientStream::Unix(crate::unix_conn::UnixConn::from_std(
            std::os::unix::net::UnixStream::from(client),
        )?),
    };
    let server = match server_kind {
        Kind::Tcp => UpstreamStream::Tcp(tokio::net::TcpStream::from_std(tcp(server)?)?),
        Kind::Unix => UpstreamStream::Unix(crate::unix_conn::UnixConn::from_std(
            std::os::unix::net::UnixStream::from(server),
        )?),
    };
    Ok((client, server))
}

#[cfg(target_os = "linux")]
fn tcp(fd: OwnedFd) -> io::Result<std::net::TcpStream> {
    let s = std::net::TcpStream::from(fd);
    s.set_nonblocking(true)?;
    Ok(s)
}

/// A descriptor for io_uring: blocking (io_uring then waits for it itself instead of
/// answering `EAGAIN`, as it may for a non-blocking file).
#[cfg(target_os = "linux")]
fn blocking<S: Into<OwnedFd>>(s: S) -> io::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let fd: OwnedFd = s.into();
    let mut off: libc::c_int = 0;
    // SAFETY: FIONBIO on a descriptor we own, with a valid int.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONBIO, &mut off) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(fd)
}

impl Future for Relay {
    type Output = RelayEnd;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        let this = self.get_mut();
        loop {
            if let Some(end) = this.failed.take() {
                return Poll::Ready(end);
            }
            #[cfg(target_os = "linux")]
            if this.away.is_some() {
                if let Some(end) = std::task::ready!(this.poll_back(cx)) {
                    return Poll::Ready(end);
                }
            }
            let Some(inner) = this.local.as_mut() else {
                return Poll::Ready(RelayEnd::ServerError(io::Error::other(
                    "the relay's state was lost",
                )));
            };
            #[cfg(target_os = "linux")]
            if this.ring > 0 && inner.may_go_to_ring() && (this.lend() || this.failed.is_some()) {
                continue;
            }
            if let Some(inner) = this.local.as_mut() {
                return inner.poll_local(cx);
            }
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // A dropped session (its task ended) must not keep relaying on the ring.
        #[cfg(target_os = "linux")]
        if let Some(away) = &self.away {
            away.ring.abandon(away.id);
        }
    }
}
