//! The relay: after startup, bytes flow both ways as they come, in one task per session.
//!
//! Both directions are driven by one hand-written future (like tokio's `copy_bidirectional`),
//! so a session costs one task and no locks. Each direction reads into its own buffer and
//! writes what it read in one write. Server→client bytes go through [`BackendScanner`] (see
//! `scan.rs`) to track `ReadyForQuery` status and swap `BackendKeyData`'s secret for a proxy-made one;
//! client→server bytes go through [`FrontendScanner`], which only observes.
//!
//! The state and both streams are [`Inner`]; the task holds a [`Relay`] (`lending.rs`),
//! which lends `Inner` to the io_uring thread (`ring.rs`) once the session has settled and
//! has no TLS, and takes it back for anything but relaying. Both paths call the same
//! [`Inner::took_from_server`] / [`Inner::took_from_client`] on every read.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

mod goodbye;
mod lending;
#[cfg(target_os = "linux")]
mod ring;

pub use lending::Relay;

/// Descriptors the relay's ring thread keeps open for the life of the process once it has
/// started (see `ring.rs`), for leak checks.
pub fn ring_kept_descriptors() -> usize {
    #[cfg(target_os = "linux")]
    return ring::kept_descriptors();
    #[cfg(not(target_os = "linux"))]
    0
}

/// Most io_uring threads a process runs (`ProxyConfig::io_uring_threads`): past a few,
/// sessions batch less per `io_uring_enter` and the threads only compete with the servers
/// and clients for CPUs.
pub const MAX_IO_URING_THREADS: usize = 4;

/// Sessions on each io_uring thread the process may start, in order (empty where io_uring
/// is not used): one entry per ring, up to one per CPU.
pub fn ring_loads() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    return ring::loads();
    #[cfg(not(target_os = "linux"))]
    Vec::new()
}

/// Sessions whose data path was lent to the ring thread so far in this process, and how many
/// of them came back; `(0, 0)` where io_uring is not used.
pub fn ring_counts() -> (u64, u64) {
    #[cfg(target_os = "linux")]
    return ring::counts();
    #[cfg(not(target_os = "linux"))]
    (0, 0)
}

use crate::cancel::{CancelMap, CancelTarget, ProxyKey};
use crate::pool::{Greeting, Parked, Pool, MAX_GREETING};
use crate::router::UpstreamAddr;
use crate::scan::{BackendEvents, BackendScanner, FrontendScanner, ProtocolError};
use crate::stream::{ClientStream, UpstreamStream};

const S2C_BUF: usize = 32 * 1024;
const C2S_BUF: usize = 16 * 1024;
// The early bytes of a session (`Inner::hold_early_client_bytes`) fit the client buffer.
const _: () = assert!(crate::inbox::READ_AHEAD <= C2S_BUF);
/// Relay buffers kept per thread for the next sessions, of each size (16 × 48 KiB at most).
const MAX_SPARE_BUFFERS: usize = 16;
/// ReadyForQuery messages a session must have seen before its data path moves to the ring
/// thread: a client that connects for one query (greeting, answer) never pays for the move.
const OFFLOAD_AFTER_READY: u32 = 3;

thread_local! {
    /// Buffers of ended sessions, by size: a connect-per-transaction client would otherwise
    /// have 48 KiB allocated and zeroed for every connection. What a buffer held is never
    /// sent again: only bytes read in the session that has it are written.
    static SPARE_BUFFERS: std::cell::RefCell<Vec<Box<[u8]>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// How long the proxy spends on goodbyes (final error message, Terminate) before dropping.
const GOODBYE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a switched session's FATAL waits for the client's next message (see
/// `Relay::await_next_client_message`); within [`GOODBYE_TIMEOUT`].
const SWITCH_FATAL_GRACE: Duration = Duration::from_millis(500);
/// `Terminate` ('X').
const TERMINATE: [u8; 5] = [b'X', 0, 0, 0, 4];

/// Why a relay ended.
#[derive(Debug)]
pub enum RelayEnd {
    /// The client closed its connection or sent Terminate.
    ClientClosed,
    /// The server closed its connection; everything it sent has been passed on.
    ServerClosed,
    /// The session was closed at a transaction boundary because the active branch changed;
    /// the string is the FATAL message for the client.
    Switched(String),
    /// Reading or writing the client failed.
    ClientError(io::Error),
    /// Reading or writing the server failed.
    ServerError(io::Error),
    /// The client broke the message framing.
    ClientProtocol(ProtocolError),
    /// The server broke the message framing.
    ServerProtocol(ProtocolError),
}

struct Dir {
    buf: Box<[u8]>,
    /// Bytes before this were written to the destination.
    written: usize,
    /// Bytes before this may be written.
    ready: usize,
    /// Bytes before this were read from the source.
    end: usize,
    need_flush: bool,
    eof: bool,
}

impl Dir {
    fn new(size: usize) -> Self {
        let spare = SPARE_BUFFERS.with(|spare| {
            let mut spare = spare.borrow_mut();
            let i = spare.iter().position(|b| b.len() == size)?;
            Some(spare.swap_remove(i))
        });
        Dir {
            buf: spare.unwrap_or_else(|| vec![0; size].into_boxed_slice()),
            written: 0,
            ready: 0,
            end: 0,
            need_flush: false,
            eof: false,
        }
    }

    /// Writes `written..ready` and flushes. Pending until all of it is out.
    fn poll_drain<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        while self.written < self.ready {
            let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.written..self.ready]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        if self.need_flush {
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.need_flush = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Moves unwritten bytes to the front so the next read has room.
    fn compact(&mut self) {
        if self.written == self.end {
            self.written = 0;
            self.ready = 0;
            self.end = 0;
        } else if self.written > 0 {
            self.buf.copy_within(self.written..self.end, 0);
            self.ready -= self.written;
            self.end -= self.written;
            self.written = 0;
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        // `try_with`: a thread being torn down has no spare list any more.
        let _ = SPARE_BUFFERS.try_with(|spare| {
            let mut spare = spare.borrow_mut();
            if spare.len() < 2 * MAX_SPARE_BUFFERS {
                spare.push(buf);
            }
        });
    }
}

/// Transaction status byte of the last `ReadyForQuery`, shared with `Proxy::sessions`.
pub type SharedStatus = Arc<AtomicU8>;

/// Per-session state the server→client events update.
struct SessionState {
    status: u8,
    shared_status: SharedStatus,
    cancel: Arc<CancelMap>,
    upstream: UpstreamAddr,
    keys: Keys,
    close_at_idle: Option<String>,
    stopped_msg: Option<String>,
    /// Server bytes before the first ReadyForQuery, while they are being captured.
    capturing: Option<Vec<u8>>,
    /// The captured greeting, if the server trusted the startup packet (AuthenticationOk
    /// first): such a connection may be parked for reuse, and a fresh session on it moved.
    greeting: Option<Arc<Greeting>>,
    /// The server's real cancel key.
    real_key: Option<(u32, Vec<u8>)>,
    /// The client's Terminate was kept from the server so the connection can be reused.
    x_withheld: bool,
    /// Server connection reuse is on: withhold the client's Terminate.
    reusable: bool,
    /// The client has sent something since the relay started.
    client_spoke: bool,
    /// ReadyForQuery messages seen (saturating): a session past a few stays, and is worth
    /// lending to the ring thread (see [`OFFLOAD_AFTER_READY`]).
    ready_seen: u32,
}

struct Events<'a> {
    st: &'a mut SessionState,
    fe: &'a mut FrontendScanner,
}

impl BackendEvents for Events<'_> {
    fn ready_for_query(&mut self, status: u8) -> bool {
        self.fe.ready_seen();
        self.st.ready_seen = self.st.ready_seen.saturating_add(1);
        if status != self.st.status {
            self.st.status = status;
            self.st.shared_status.store(status, Ordering::Relaxed);
        }
        if status == b'I' && self.fe.quiescent() {
            if let Some(msg) = self.st.close_at_idle.take() {
                self.st.stopped_msg = Some(msg);
                return true;
            }
        }
        false
    }

    fn backend_key_data(&mut self, body: &mut [u8]) {
        // The scanner only reports 8-byte bodies (pid, 4-byte secret).
        let real = (
            u32::from_be_bytes([body[0], body[1], body[2], body[3]]),
            body[4..8].to_vec(),
        );
        self.st.swap_key(body, real);
    }

    fn copy_in_response(&mut self) {
        self.fe.copy_in_started();
    }

    fn authentication(&mut self, body: &mut [u8]) {
        // Only a TLS upstream can offer channel binding this proxy cannot carry.
        if matches!(self.st.upstream, crate::UpstreamAddr::Tls { .. })
            && crate::scan::hide_channel_binding(body)
        {
            tracing::debug!("hid SCRAM-SHA-256-PLUS from the client (TLS upstream)");
        }
    }
}

impl SessionState {
    /// Registers a proxy key for the server's `real` key and writes its secret into `body`
    /// (the BackendKeyData body; the pid stays the server's, see `cancel.rs`).
    fn swap_key(&mut self, body: &mut [u8], real: (u32, Vec<u8>)) {
        let key = self.cancel.register(CancelTarget {
            addr: self.upstream.clone(),
            pid: real.0,
            secret: real.1.clone(),
        });
        body[..4].copy_from_slice(&real.0.to_be_bytes());
        body[4..].copy_from_slice(&key.secret.to_be_bytes());
        self.keys.0.push(key);
        self.real_key = Some(real);
    }
}

/// A session's relay state and its two streams, on the tokio task (streams registered
/// there) or lent to the ring thread (streams as bare descriptors, see `ring.rs`).
pub(crate) struct Inner {
    client: ClientStream,
    server: UpstreamStream,
    s2c: Dir,
    c2s: Dir,
    be: BackendScanner,
    fe: FrontendScanner,
    st: SessionState,
    activity: Option<Arc<crate::spin::Activity>>,
    /// Parked server connections, closed before a statement about a database reaches the
    /// server (see [`Pool::release_before_database_ddl`]).
    pool: Option<Arc<Pool>>,
    /// Bytes the ring read from the client (at `c2s.buf[c2s.end..]`) after it was asked to
    /// give the session back, not yet taken in: taken in once the controls that asked are
    /// applied (see [`Inner::take_held_client_bytes`]). `Some(0)`: the client's end of stream.
    held_from_client: Option<usize>,
    /// What the session's task watches for controls, as it last looked at them: on the ring
    /// a change there holds the client's next bytes back and gives the session back, so the
    /// task applies the control first (see [`ControlWatch`]).
    watches: Vec<Box<dyn ControlWatch>>,
}

/// A source of controls (the active branch of the session's scope, its branch's drains) as
/// the session's task last saw it: `changed` says whether something came since. The ring
/// thread runs apart from the task, so without this it could pass on a query the client sent
/// after a switch before the task had even seen the switch; the epoll path looks at controls
/// before data on the task itself.
pub(crate) trait ControlWatch: Send + Sync {
    fn changed(&self) -> bool;
}

impl<T: Send + Sync> ControlWatch for tokio::sync::watch::Receiver<T> {
    fn changed(&self) -> bool {
        self.has_changed().unwrap_or(false)
    }
}

impl Inner {
    /// The pool whose parked connections this session's statements may need gone.
    pub fn set_pool(&mut self, pool: Arc<Pool>) {
        self.pool = Some(pool);
    }

    /// Reports every wake-up of this session to `activity` (for busy-polling).
    pub fn set_activity(&mut self, activity: Option<Arc<crate::spin::Activity>>) {
        self.activity = activity;
    }

    /// Starts relaying between `client` and `server` (whose startup message was already sent).
    /// The server's greeting is kept (to move a fresh session, see [`Relay::move_to`]); with
    /// `reusable` the connection is also parked for reuse when the client leaves (`pool.rs`).
    pub fn new(
        client: ClientStream,
        server: UpstreamStream,
        upstream: UpstreamAddr,
        cancel: Arc<CancelMap>,
        shared_status: SharedStatus,
        reusable: bool,
    ) -> Self {
        Inner {
            client,
            server,
            s2c: Dir::new(S2C_BUF),
            c2s: Dir::new(C2S_BUF),
            be: BackendScanner::default(),
            fe: FrontendScanner::default(),
            st: SessionState {
                status: 0,
                shared_status,
                cancel: cancel.clone(),
                upstream,
                keys: Keys(Vec::new(), cancel.clone()),
                close_at_idle: None,
                stopped_msg: None,
                capturing: Some(Vec::new()),
                greeting: None,
                real_key: None,
                x_withheld: false,
                reusable,
                client_spoke: false,
                ready_seen: 0,
            },
            activity: None,
            pool: None,
            held_from_client: None,
            watches: Vec::new(),
        }
    }

    /// Whether a control source changed since the task last looked (see [`ControlWatch`]).
    pub(crate) fn controls_changed(&self) -> bool {
        self.watches.iter().any(|w| w.changed())
    }

    pub(crate) fn set_watches(&mut self, watches: Vec<Box<dyn ControlWatch>>) {
        self.watches = watches;
    }

    /// Bytes the client sent right after its startup packet, without waiting (read with
    /// it, see `inbox.rs`): relayed as if just read, before anything read later.
    pub(crate) fn hold_early_client_bytes(&mut self, early: &[u8]) {
        debug_assert!(self.held_from_client.is_none() && self.c2s.end == 0);
        let d = &mut self.c2s;
        d.buf[d.end..d.end + early.len()].copy_from_slice(early);
        self.held_from_client = Some(early.len());
    }

    /// Takes in what the ring read from the client while giving the session back. Called
    /// after the controls that recalled it: a switch asked for before the client's next
    /// query finds the session idle and closes it, and the query never reaches the old
    /// branch's server — as on the epoll path, where controls are looked at before data.
    pub(crate) fn take_held_client_bytes(&mut self) -> Result<(), RelayEnd> {
        match self.held_from_client.take() {
            Some(n) => self.took_from_client(n),
            None => Ok(()),
        }
    }

    /// Starts a session on a parked server connection: the client gets the original greeting
    /// with a new proxy-made cancel key, then ReadyForQuery `I`.
    pub fn resume(
        client: ClientStream,
        parked: Parked,
        upstream: UpstreamAddr,
        cancel: Arc<CancelMap>,
        shared_status: SharedStatus,
    ) -> Self {
        let mut relay = Inner::new(client, parked.server, upstream, cancel, shared_status, true);
        relay.st.capturing = None;
        let g = &parked.greeting.bytes;
        let d = &mut relay.s2c;
        d.buf[..g.len()].copy_from_slice(g);
        d.buf[g.len()..g.len() + 6].copy_from_slice(b"Z\0\0\0\x05I");
        d.ready = g.len() + 6;
        d.end = d.ready;
        d.need_flush = true;
        if let Some(off) = parked.greeting.key_offset {
            relay.st.swap_key(&mut d.buf[off..off + 8], parked.real_key);
        }
        relay.st.status = b'I';
        relay.st.shared_status.store(b'I', Ordering::Relaxed);
        relay.st.greeting = Some(parked.greeting);
        relay
    }

    /// True when the session is between transactions with nothing in flight.
    pub fn is_idle(&self) -> bool {
        self.st.status == b'I'
            && self.fe.quiescent()
            && self.be.at_boundary()
            && self.s2c.end == self.s2c.ready
    }

    /// Asks the session to close with a FATAL `message`: right away if idle, else at its
    /// next `ReadyForQuery` with status `I`.
    pub fn close_when_idle(&mut self, message: String) {
        if self.is_idle() {
            // Ends once what the client is owed (a replayed greeting) is written.
            self.st.stopped_msg = Some(message);
        } else {
            self.st.close_at_idle = Some(message);
        }
    }

    /// True when the session can move to another server unnoticed: the server trusted the
    /// startup packet, its whole greeting is with the client, and the client has sent
    /// nothing since (so no state of its own exists on the server).
    pub fn is_fresh(&self) -> bool {
        !self.st.client_spoke
            && self.st.greeting.is_some()
            && self.st.real_key.is_some()
            && self.st.status == b'I'
            && self.be.at_boundary()
            && self.s2c.written == self.s2c.end
    }

    /// Moves a [fresh](Self::is_fresh) session to `to` (a trusted connection that has
    /// answered the same startup packet and is idle, see `pool::open_trusted`). The client
    /// keeps the greeting it has; its cancel key now reaches the new server. Returns the
    /// old server connection, as fresh as it was, for parking or closing.
    pub fn move_to(&mut self, to: Parked, upstream: UpstreamAddr) -> Option<Parked> {
        let old_server = std::mem::replace(&mut self.server, to.server);
        let old = match (
            self.st.greeting.replace(to.greeting),
            self.st.real_key.replace(to.real_key.clone()),
        ) {
            (Some(greeting), Some(real_key)) => Some(Parked {
                server: old_server,
                greeting,
                real_key,
                since: Instant::now(),
            }),
            // Not fresh after all (the caller checks): dropping the connection closes it.
            _ => None,
        };
        self.st.upstream = upstream;
        if let Some(key) = self.st.keys.0.last() {
            self.st.cancel.retarget(
                *key,
                CancelTarget {
                    addr: self.st.upstream.clone(),
                    pid: to.real_key.0,
                    secret: to.real_key.1,
                },
            );
        }
        self.st.close_at_idle = None;
        self.st.stopped_msg = None;
        self.s2c.eof = false;
        old
    }

    /// Withdraws a pending [`close_when_idle`](Self::close_when_idle) (the branch became
    /// active again before the session got idle).
    pub fn cancel_close(&mut self) {
        self.st.close_at_idle = None;
    }

    fn poll_s2c(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let d = &mut self.s2c;
            if let Err(e) = ready!(d.poll_drain(cx, &mut self.client)) {
                return Poll::Ready(RelayEnd::ClientError(e));
            }
            if let Some(msg) = self.st.stopped_msg.take() {
                return Poll::Ready(RelayEnd::Switched(msg));
            }
            if d.eof {
                return Poll::Ready(RelayEnd::ServerClosed);
            }
            d.compact();
            let mut rb = ReadBuf::new(&mut d.buf[d.end..]);
            if let Err(e) = ready!(Pin::new(&mut self.server).poll_read(cx, &mut rb)) {
                return Poll::Ready(RelayEnd::ServerError(e));
            }
            let n = rb.filled().len();
            if let Err(end) = self.took_from_server(n) {
                return Poll::Ready(end);
            }
        }
    }

    /// Takes in `n` bytes just read from the server to `s2c.buf[s2c.end..]` (0: end of
    /// stream): scans them and makes what may go to the client ready.
    fn took_from_server(&mut self, n: usize) -> Result<(), RelayEnd> {
        let d = &mut self.s2c;
        if n == 0 {
            d.eof = true;
            return Ok(());
        }
        d.end += n;
        let mut ev = Events {
            st: &mut self.st,
            fe: &mut self.fe,
        };
        match self.be.scan(&mut d.buf[d.ready..d.end], &mut ev) {
            Ok(s) => {
                if let Some(g) = self.st.capturing.as_mut() {
                    // Keep the greeting, up to (not including) the first ReadyForQuery.
                    let upto = s.first_ready_end.map_or(s.safe, |e| e - 6);
                    g.extend_from_slice(&d.buf[d.ready..d.ready + upto]);
                    if s.first_ready_end.is_some() || g.len() > MAX_GREETING {
                        let g = self.st.capturing.take().unwrap_or_default();
                        self.st.greeting = Greeting::trusted(g).map(Arc::new);
                    }
                }
                d.ready += s.safe;
                if s.stop {
                    // Nothing after the final ReadyForQuery goes to the client.
                    d.end = d.ready;
                }
            }
            Err(e) => return Err(RelayEnd::ServerProtocol(e)),
        }
        d.need_flush = true;
        Ok(())
    }

    fn poll_c2s(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        loop {
            let d = &mut self.c2s;
            if let Err(e) = ready!(d.poll_drain(cx, &mut self.server)) {
                return Poll::Ready(RelayEnd::ServerError(e));
            }
            if d.eof || self.fe.terminated {
                return Poll::Ready(RelayEnd::ClientClosed);
            }
            d.compact();
            let mut rb = ReadBuf::new(&mut d.buf[d.end..]);
            if let Err(e) = ready!(Pin::new(&mut self.client).poll_read(cx, &mut rb)) {
                return Poll::Ready(RelayEnd::ClientError(e));
            }
            let n = rb.filled().len();
            if let Err(end) = self.took_from_client(n) {
                return Poll::Ready(end);
            }
        }
    }

    /// Takes in `n` bytes just read from the client to `c2s.buf[c2s.end..]` (0: end of
    /// stream): checks their framing and makes what may go to the server ready.
    fn took_from_client(&mut self, n: usize) -> Result<(), RelayEnd> {
        let d = &mut self.c2s;
        if n == 0 {
            d.eof = true;
            return Ok(());
        }
        self.st.client_spoke = true;
        match self.fe.observe(&d.buf[d.end..d.end + n]) {
            // Bytes after a Terminate are dropped. A reusable connection does not get
            // the Terminate itself (if it came whole in this read).
            Ok(pass) => {
                let chunk = &d.buf[d.end..d.end + pass];
                if let Some(pool) = &self.pool {
                    pool.release_before_database_ddl(&self.st.upstream, chunk);
                }
                if self.fe.terminated
                    && self.st.reusable
                    && self.st.greeting.is_some()
                    && chunk.ends_with(&TERMINATE)
                {
                    d.end += pass - TERMINATE.len();
                    self.st.x_withheld = true;
                } else {
                    d.end += pass;
                }
            }
            Err(e) => return Err(RelayEnd::ClientProtocol(e)),
        }
        d.ready = d.end;
        d.need_flush = true;
        Ok(())
    }

    /// True when the session may be lent to the ring thread: both streams plain, nothing
    /// waiting to be written, no close pending, and past [`OFFLOAD_AFTER_READY`] ready
    /// messages (a connect-per-query client would only pay for the move).
    fn may_go_to_ring(&self) -> bool {
        self.st.ready_seen >= OFFLOAD_AFTER_READY
            && self.st.close_at_idle.is_none()
            && self.st.stopped_msg.is_none()
            && self.s2c.written == self.s2c.end
            && self.c2s.written == self.c2s.end
            && !self.s2c.eof
            && !self.c2s.eof
            && !self.fe.terminated
            && matches!(self.client, ClientStream::Plain(_) | ClientStream::Unix(_))
            && matches!(
                self.server,
                UpstreamStream::Unix(_) | UpstreamStream::Tcp(_)
            )
    }

    fn poll_local(&mut self, cx: &mut Context<'_>) -> Poll<RelayEnd> {
        if let Some(a) = &self.activity {
            a.touch();
        }
        // Early bytes (`hold_early_client_bytes`); those the ring held are taken when it
        // gives the session back.
        if let Err(end) = self.take_held_client_bytes() {
            return Poll::Ready(end);
        }
        if let Poll::Ready(end) = self.poll_s2c(cx) {
            return Poll::Ready(end);
        }
        self.poll_c2s(cx)
    }
}

/// The session's proxy-made cancel keys, removed from the map when the session ends.
struct Keys(Vec<ProxyKey>, Arc<CancelMap>);

impl Drop for Keys {
    fn drop(&mut self) {
        for key in self.0.drain(..) {
            self.1.remove(key);
        }
    }
}
