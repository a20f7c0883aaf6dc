//! The ring thread: the data path of settled plain sessions on io_uring (Linux).
//!
//! An epoll relay pays three system calls per message (`epoll_wait`, `recv`, `send`); here a
//! message costs one `io_uring_enter`. Each direction keeps one receive in flight; when it
//! completes, the bytes go through the same scanners as on the tokio task
//! ([`Inner::took_from_server`], [`Inner::took_from_client`]), and what may pass is sent with
//! the next receive linked behind it (`IOSQE_IO_LINK`), so the kernel starts that receive
//! only once the whole send is done. Sends are `MSG_WAITALL` (the kernel finishes short
//! sends itself, and a send that still ends short fails the link) and post no completion on
//! success (`IOSQE_CQE_SKIP_SUCCESS`): a receive that completes proves the send before it
//! went out whole. Measured with `examples/uring_relay.rs` before this was built: 18 against
//! 22 µs of relay CPU per transaction at `pgbench -S -c 8` (see `BENCH_NOTES.md`).
//!
//! The ring only relays. Whatever else a session meets goes back to its tokio task, which
//! carries on where the ring stopped (bytes read and scanned but not yet written are written
//! there): end of stream, an error, the client's Terminate, a full buffer, and every
//! control (a branch switch, a drain), which the task asks for with a recall. To give a
//! session back, the ring cancels what it has in flight on the session's two descriptors,
//! takes in what completed meanwhile, and sends the state and descriptors back over a
//! oneshot channel. TLS sessions never come here (their bytes need rustls).
//!
//! One ring thread by default; `ProxyConfig::io_uring_threads` allows more (up to
//! [`MAX_IO_URING_THREADS`]), each started when a session first needs it: a session goes to
//! an idle ring, or a new one, before it shares a busy one. Measured at `pgbench -S -c 8` on
//! 2 vCPUs (`BENCH_NOTES.md`): one ring for every session makes the fewest wake-ups (15–20 µs
//! of relay CPU per transaction, below PgBouncer's 19–25); two relay in parallel, which
//! sometimes raised TPS (0.70 of direct TCP against 0.54) and sometimes not (0.62 both), at
//! 22–29 µs, above PgBouncer's every time. Where `io_uring_setup` fails (an old kernel, a
//! seccomp profile, `kernel.io_uring_disabled`), [`RingHandle::pick`] is `None` and every
//! session stays on epoll; the daemon logs which.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use io_uring::{opcode, squeue, types, IoUring};
use tokio::sync::oneshot;

use super::{Inner, RelayEnd, MAX_IO_URING_THREADS};

/// Submission queue entries of the ring: a session has at most 2 linked pairs and 2 cancels
/// in flight, and a full queue is submitted and retried.
const RING_ENTRIES: u32 = 1024;

/// `user_data` of the wake-up descriptor's read; sessions use `id << OP_BITS | op`.
const WAKE: u64 = u64::MAX;
const OP_BITS: u32 = 3;
const C2S_RECV: u64 = 0;
const C2S_SEND: u64 = 1;
const S2C_RECV: u64 = 2;
const S2C_SEND: u64 = 3;
const CANCEL: u64 = 4;

/// A session lent to the ring, with how to give it back.
pub(crate) struct Lent {
    pub id: u64,
    pub inner: Box<Inner>,
    /// Blocking descriptors (io_uring waits for them itself).
    pub client: OwnedFd,
    pub server: OwnedFd,
    pub back: oneshot::Sender<Returned>,
}

/// A session given back: its state, its descriptors (still blocking), and how it ended if it
/// ended on the ring with an error.
pub(crate) struct Returned {
    pub inner: Box<Inner>,
    pub client: OwnedFd,
    pub server: OwnedFd,
    pub end: Option<RelayEnd>,
}

/// Sessions lent to the ring so far, in this process.
static LENT: AtomicU64 = AtomicU64::new(0);
/// Sessions given back so far.
static RETURNED: AtomicU64 = AtomicU64::new(0);

/// (lent, given back) sessions so far in this process.
pub(crate) fn counts() -> (u64, u64) {
    (
        LENT.load(Ordering::Relaxed),
        RETURNED.load(Ordering::Relaxed),
    )
}

enum Msg {
    Lend(Box<Lent>),
    Recall(u64),
    /// The session's task is gone: end it.
    Abandon(u64),
}

#[derive(Default)]
struct Queue {
    msgs: Vec<Msg>,
    /// The ring thread has stopped: nothing more is taken.
    stopped: bool,
}

/// The process's ring threads, each started when a session first needs it (see the module
/// documentation for why several).
struct Rings {
    slots: Box<[OnceLock<Option<RingHandle>>]>,
}

static RINGS: OnceLock<Rings> = OnceLock::new();

fn rings() -> &'static Rings {
    RINGS.get_or_init(|| Rings {
        slots: (0..MAX_IO_URING_THREADS).map(|_| OnceLock::new()).collect(),
    })
}

/// Descriptors the ring threads keep for the life of the process once started (each its
/// ring and its wake-up eventfd), for leak checks.
pub(crate) fn kept_descriptors() -> usize {
    RINGS.get().map_or(0, |r| {
        r.slots
            .iter()
            .filter(|s| s.get().is_some_and(|r| r.is_some()))
            .count()
            * 2
    })
}

/// Sessions on each ring the process may start (0 for one not started), in order.
pub(crate) fn loads() -> Vec<usize> {
    rings()
        .slots
        .iter()
        .map(|s| s.get().and_then(|r| r.as_ref()).map_or(0, |r| r.load()))
        .collect()
}

/// The way to one ring thread.
pub(crate) struct RingHandle {
    queue: Arc<Mutex<Queue>>,
    /// An eventfd the ring always has a read on: a write wakes the thread. Shared with the
    /// thread, not duplicated: each ring thread keeps two descriptors, as
    /// [`kept_descriptors`] says.
    wake: Arc<OwnedFd>,
    /// Sessions on this ring now (the thread counts down as it gives them back).
    load: Arc<AtomicUsize>,
}

impl RingHandle {
    /// The ring a session should be lent to, among the first `threads`: an idle one, a new
    /// one rather than a busy one, else the least loaded, so that concurrent sessions are
    /// relayed in parallel while one session costs one thread. `None` where io_uring cannot
    /// be set up (said once, in the log).
    pub fn pick(threads: usize) -> Option<&'static RingHandle> {
        let mut best: Option<&'static RingHandle> = None;
        for (index, slot) in rings().slots.iter().enumerate().take(threads.max(1)) {
            let ring = match slot.get() {
                Some(Some(ring)) => ring,
                // The first ring could not be set up: io_uring is not available.
                Some(None) if index == 0 => return None,
                Some(None) => continue,
                // Not started yet: an idle ring of its own rather than a share of a busy one.
                None => return Self::start_in(index, slot).or(best),
            };
            let load = ring.load();
            if load == 0 {
                return Some(ring);
            }
            if best.is_none_or(|b| load < b.load()) {
                best = Some(ring);
            }
        }
        best
    }

    fn load(&self) -> usize {
        self.load.load(Ordering::Relaxed)
    }

    fn start_in(
        index: usize,
        slot: &'static OnceLock<Option<RingHandle>>,
    ) -> Option<&'static RingHandle> {
        slot.get_or_init(|| match start() {
            Ok(handle) => {
                tracing::debug!("relaying settled plain sessions on io_uring (ring {index})");
                Some(handle)
            }
            Err(e) if index == 0 => {
                tracing::info!("io_uring is not available ({e}); relaying with epoll only");
                None
            }
            Err(e) => {
                tracing::warn!("could not start io_uring ring {index} ({e}); using the others");
                None
            }
        })
        .as_ref()
    }

    /// Hands `lent` to the ring thread, or gives it back if the ring has stopped.
    pub fn lend(&self, lent: Lent) -> Result<(), Lent> {
        // Counted before it is sent: the ring thread counts it down when it gives it back.
        self.load.fetch_add(1, Ordering::Relaxed);
        match self.send(Msg::Lend(Box::new(lent))) {
            Ok(()) => {
                LENT.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(Msg::Lend(lent)) => {
                self.load.fetch_sub(1, Ordering::Relaxed);
                Err(*lent)
            }
            Err(_) => unreachable!("send returns the message it was given"),
        }
    }

    /// Asks for session `id` back (ignored if it already came back).
    pub fn recall(&self, id: u64) {
        let _ = self.send(Msg::Recall(id));
    }

    /// Ends session `id`, whose task is gone.
    pub fn abandon(&self, id: u64) {
        let _ = self.send(Msg::Abandon(id));
    }

    fn send(&self, msg: Msg) -> Result<(), Msg> {
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if queue.stopped {
            return Err(msg);
        }
        let first = queue.msgs.is_empty();
        queue.msgs.push(msg);
        drop(queue);
        if first {
            let one = 1u64.to_ne_bytes();
            // SAFETY: an 8-byte write to an eventfd we own. It cannot fail short of the
            // counter overflowing, which 2^64 wake-ups never reach.
            unsafe { libc::write(self.wake.as_raw_fd(), one.as_ptr().cast(), 8) };
        }
        Ok(())
    }
}

/// Starts the ring thread. The ring is made there: with `IORING_SETUP_SINGLE_ISSUER` the
/// thread that makes it is the only one that may submit.
fn start() -> io::Result<RingHandle> {
    // SAFETY: eventfd returns a new descriptor or -1.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours, just made.
    let wake = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
    let thread_wake = wake.clone();
    let queue: Arc<Mutex<Queue>> = Arc::default();
    let thread_queue = queue.clone();
    let load = Arc::new(AtomicUsize::new(0));
    let thread_load = load.clone();
    let (made_tx, made_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("pgtwig-ring".into())
        .spawn(move || {
            // DEFER_TASKRUN: completions are processed only when this thread waits for them,
            // not in interrupts of whatever runs meanwhile.
            let ring = IoUring::builder()
                .setup_single_issuer()
                .setup_defer_taskrun()
                .build(RING_ENTRIES)
                .or_else(|_| IoUring::new(RING_ENTRIES));
            match ring {
                Ok(ring) => {
                    let _ = made_tx.send(Ok(()));
                    RingLoop::new(ring, thread_wake, thread_queue, thread_load).run()
                }
                Err(e) => {
                    let _ = made_tx.send(Err(e));
                }
            }
        })?;
    made_rx
        .recv()
        .map_err(|_| io::Error::other("the ring thread died while starting"))??;
    Ok(RingHandle { queue, wake, load })
}

/// Ops in flight for one direction.
#[derive(Default, Clone, Copy)]
struct InFlight {
    recv: bool,
    send: bool,
}

/// One direction of a session.
#[derive(Clone, Copy)]
enum Way {
    ClientToServer,
    ServerToClient,
}

impl Way {
    fn recv_op(self) -> u64 {
        match self {
            Way::ClientToServer => C2S_RECV,
            Way::ServerToClient => S2C_RECV,
        }
    }

    fn send_op(self) -> u64 {
        match self {
            Way::ClientToServer => C2S_SEND,
            Way::ServerToClient => S2C_SEND,
        }
    }

    fn dir(self, inner: &mut Inner) -> &mut super::Dir {
        match self {
            Way::ClientToServer => &mut inner.c2s,
            Way::ServerToClient => &mut inner.s2c,
        }
    }

    /// How a failed receive from this way's source ends the session.
    fn source_error(self, e: io::Error) -> RelayEnd {
        match self {
            Way::ClientToServer => RelayEnd::ClientError(e),
            Way::ServerToClient => RelayEnd::ServerError(e),
        }
    }

    /// How a failed send to this way's destination ends the session.
    fn destination_error(self, e: io::Error) -> RelayEnd {
        match self {
            Way::ClientToServer => RelayEnd::ServerError(e),
            Way::ServerToClient => RelayEnd::ClientError(e),
        }
    }
}

struct Slot {
    lent: Box<Lent>,
    c2s: InFlight,
    s2c: InFlight,
    /// Giving the session back: nothing new is started.
    leaving: bool,
    /// Cancels (and retry timers) submitted and not yet completed.
    cancels: u8,
    end: Option<RelayEnd>,
}

type Pending = Vec<squeue::Entry>;

impl Slot {
    fn new(lent: Box<Lent>) -> Self {
        Slot {
            lent,
            c2s: InFlight::default(),
            s2c: InFlight::default(),
            leaving: false,
            cancels: 0,
            end: None,
        }
    }

    fn idle(&self) -> bool {
        !(self.c2s.recv || self.c2s.send || self.s2c.recv || self.s2c.send)
    }

    /// Ready to go back: leaving, with nothing in flight.
    fn done(&self) -> bool {
        self.leaving && self.idle() && self.cancels == 0
    }

    fn complete(&mut self, id: u64, op: u64, res: i32, pending: &mut Pending) {
        match op {
            C2S_RECV => self.received(Way::ClientToServer, id, res, pending),
            S2C_RECV => self.received(Way::ServerToClient, id, res, pending),
            C2S_SEND => self.send_failed(Way::ClientToServer, id, res, pending),
            S2C_SEND => self.send_failed(Way::ServerToClient, id, res, pending),
            _ => {
                self.cancels = self.cancels.saturating_sub(1);
                if self.leaving && self.cancels == 0 && !self.idle() {
                    // A receive linked behind a send cannot be cancelled before it starts,
                    // and a send is left to finish: look again shortly.
                    pending.push(
                        opcode::Timeout::new(&CANCEL_RETRY)
                            .build()
                            .user_data(id << OP_BITS | CANCEL),
                    );
                    self.cancels += 1;
                    self.cancel_receives(id, pending);
                }
            }
        }
    }

    fn flight(&mut self, way: Way) -> &mut InFlight {
        match way {
            Way::ClientToServer => &mut self.c2s,
            Way::ServerToClient => &mut self.s2c,
        }
    }

    /// A receive of `way` completed with `res`.
    fn received(&mut self, way: Way, id: u64, res: i32, pending: &mut Pending) {
        let flight = self.flight(way);
        flight.recv = false;
        // A send that fails posts its completion before the receive linked behind it is
        // cancelled; one that succeeds posts none. So a send still counted in flight when
        // its receive completes (or is cancelled by a recall after it started) went out whole.
        if std::mem::take(&mut flight.send) {
            let d = way.dir(&mut self.lent.inner);
            d.written = d.ready;
        }
        let inner = &mut self.lent.inner;
        let taken = match (res, way) {
            (r, _) if r == -libc::ECANCELED => Ok(()),
            (r, _) if r < 0 => Err(way.source_error(io::Error::from_raw_os_error(-r))),
            // Read after a recall (a cancel that came too early for a receive linked behind
            // a send, retried later), or after a control the task has not seen yet: the
            // controls come first, on the task.
            (n, Way::ClientToServer)
                if inner.held_from_client.is_none()
                    && (self.leaving || inner.controls_changed()) =>
            {
                inner.held_from_client = Some(n as usize);
                if !self.leaving {
                    self.leave(id, pending);
                }
                return;
            }
            (n, Way::ClientToServer) => inner.took_from_client(n as usize),
            (n, Way::ServerToClient) => inner.took_from_server(n as usize),
        };
        if let Err(end) = taken {
            self.end.get_or_insert(end);
            self.leave(id, pending);
        } else if !self.leaving {
            self.next(way, id, pending);
        }
    }

    /// A send of `way` completed: only one that did not go out whole does (sends are never
    /// cancelled: how much of a cancelled send went out is not reported).
    fn send_failed(&mut self, way: Way, id: u64, res: i32, pending: &mut Pending) {
        self.flight(way).send = false;
        let e = if res < 0 {
            io::Error::from_raw_os_error(-res)
        } else {
            io::ErrorKind::WriteZero.into()
        };
        self.end.get_or_insert(way.destination_error(e));
        self.leave(id, pending);
    }

    /// Starts the next step of `way`: the send of what is ready (if anything), then a
    /// receive. Gives the session back when its source ended, a close is due, or the buffer
    /// is full.
    fn next(&mut self, way: Way, id: u64, pending: &mut Pending) {
        let inner = &mut self.lent.inner;
        let ended = match way {
            Way::ClientToServer => inner.c2s.eof || inner.fe.terminated,
            Way::ServerToClient => {
                inner.s2c.eof || inner.st.stopped_msg.is_some() || inner.st.close_at_idle.is_some()
            }
        };
        if ended {
            return self.leave(id, pending);
        }
        let (client, server) = (self.lent.client.as_raw_fd(), self.lent.server.as_raw_fd());
        let (from, to) = match way {
            Way::ClientToServer => (client, server),
            Way::ServerToClient => (server, client),
        };
        match arm(way.dir(inner), from, to, id, way, pending) {
            Some(flight) => *self.flight(way) = flight,
            None => self.leave(id, pending),
        }
    }

    /// Stops starting anything for the session and cancels its receives.
    fn leave(&mut self, id: u64, pending: &mut Pending) {
        if !self.leaving {
            self.leaving = true;
            self.cancel_receives(id, pending);
        }
    }

    /// Cancels the receives in flight. A receive is cancelled whole or completes whole, so
    /// no byte is lost either way.
    fn cancel_receives(&mut self, id: u64, pending: &mut Pending) {
        for way in [Way::ClientToServer, Way::ServerToClient] {
            if self.flight(way).recv {
                let op = way.recv_op();
                pending.push(
                    opcode::AsyncCancel2::new(types::CancelBuilder::user_data(id << OP_BITS | op))
                        .build()
                        .user_data(id << OP_BITS | CANCEL),
                );
                self.cancels += 1;
            }
        }
    }

    /// Gives the session back to its task (or, if the task is gone, closes it here).
    fn give_back(self, load: &AtomicUsize) {
        load.fetch_sub(1, Ordering::Relaxed);
        let Slot { lent, end, .. } = self;
        let Lent {
            inner,
            client,
            server,
            back,
            ..
        } = *lent;
        RETURNED.fetch_add(1, Ordering::Relaxed);
        let _ = back.send(Returned {
            inner,
            client,
            server,
            end,
        });
    }
}

/// How long a leaving session waits before cancelling again what a cancel missed.
static CANCEL_RETRY: types::Timespec = types::Timespec::new().nsec(5_000_000);

struct RingLoop {
    ring: IoUring,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<OwnedFd>,
    load: Arc<AtomicUsize>,
    wake_buf: Box<[u8; 8]>,
    sessions: HashMap<u64, Slot, BuildHasherDefault<IdHasher>>,
    pending: Pending,
    completions: Vec<(u64, i32)>,
}

impl RingLoop {
    fn new(
        ring: IoUring,
        wake: Arc<OwnedFd>,
        queue: Arc<Mutex<Queue>>,
        load: Arc<AtomicUsize>,
    ) -> Self {
        RingLoop {
            ring,
            queue,
            wake,
            load,
            wake_buf: Box::new([0; 8]),
            sessions: HashMap::default(),
            pending: Vec::new(),
            completions: Vec::new(),
        }
    }

    fn arm_wake(&mut self) {
        let e = opcode::Read::new(
            types::Fd(self.wake.as_raw_fd()),
            self.wake_buf.as_mut_ptr(),
            8,
        )
        .build()
        .user_data(WAKE);
        self.pending.push(e);
    }

    fn run(mut self) {
        self.arm_wake();
        loop {
            self.push_pending();
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // The completion queue is full: reap, then submit again.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return self.stop(e),
            }
            self.completions.clear();
            self.completions
                .extend(self.ring.completion().map(|c| (c.user_data(), c.result())));
            for i in 0..self.completions.len() {
                let (data, res) = self.completions[i];
                if data == WAKE {
                    self.take_messages();
                    self.arm_wake();
                    continue;
                }
                let id = data >> OP_BITS;
                let Some(slot) = self.sessions.get_mut(&id) else {
                    continue;
                };
                slot.complete(id, data & ((1 << OP_BITS) - 1), res, &mut self.pending);
                if slot.done() {
                    if let Some(slot) = self.sessions.remove(&id) {
                        slot.give_back(&self.load);
                    }
                }
            }
        }
    }

    /// The ring failed (nothing a session could do about it): every session ends with an
    /// error, and no session is lent any more. What the kernel may still write into lives
    /// on: buffers of sessions with operations in flight are leaked, their sockets shut
    /// down so those operations end.
    fn stop(mut self, e: io::Error) {
        tracing::error!("io_uring_enter failed: {e}; this ring takes no more sessions");
        // Never the least loaded again, so never picked while another ring runs.
        self.load.store(usize::MAX / 2, Ordering::Relaxed);
        let mut queue = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        queue.stopped = true;
        // Sessions lent but not yet taken have nothing in flight: dropped, they end as
        // lost ones (their tasks see the ring gone).
        drop(std::mem::take(&mut queue.msgs));
        drop(queue);
        for (_, slot) in self.sessions.drain() {
            let in_flight = !slot.idle();
            let Lent {
                inner,
                client,
                server,
                back,
                ..
            } = *slot.lent;
            for fd in [&client, &server] {
                // SAFETY: shutdown on a descriptor we own.
                unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
            if in_flight {
                std::mem::forget(inner);
            }
            drop(back);
        }
    }

    fn push_pending(&mut self) {
        while !self.pending.is_empty() {
            let mut sq = self.ring.submission();
            let mut pushed = 0;
            for e in &self.pending {
                // SAFETY: every buffer an entry points into is a session's boxed buffer (or
                // the wake buffer, or a static timespec), which stays where it is until the
                // entry has completed: a session leaves the ring only with nothing in flight.
                if unsafe { sq.push(e) }.is_err() {
                    break;
                }
                pushed += 1;
            }
            drop(sq);
            self.pending.drain(..pushed);
            if !self.pending.is_empty() {
                let _ = self.ring.submit();
            }
        }
    }

    fn take_messages(&mut self) {
        let msgs = std::mem::take(&mut self.queue.lock().unwrap_or_else(|p| p.into_inner()).msgs);
        for msg in msgs {
            match msg {
                Msg::Lend(lent) => {
                    let id = lent.id;
                    let mut slot = Slot::new(lent);
                    slot.next(Way::ClientToServer, id, &mut self.pending);
                    slot.next(Way::ServerToClient, id, &mut self.pending);
                    if slot.done() {
                        slot.give_back(&self.load);
                    } else {
                        self.sessions.insert(id, slot);
                    }
                }
                Msg::Recall(id) | Msg::Abandon(id) => {
                    let abandon = matches!(msg, Msg::Abandon(_));
                    let Some(slot) = self.sessions.get_mut(&id) else {
                        continue;
                    };
                    if abandon {
                        // Its task is gone: end the sends too (nobody resumes the session).
                        for fd in [&slot.lent.client, &slot.lent.server] {
                            // SAFETY: shutdown on a descriptor the session owns.
                            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                        }
                    }
                    slot.leave(id, &mut self.pending);
                    if slot.done() {
                        if let Some(slot) = self.sessions.remove(&id) {
                            slot.give_back(&self.load);
                        }
                    }
                }
            }
        }
    }
}

/// Session ids are sequential: spread them over the hash (Fibonacci hashing) instead of
/// paying for SipHash on every completion.
#[derive(Default)]
struct IdHasher(u64);

impl std::hash::Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 << 8 | u64::from(*b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, id: u64) {
        self.0 = id.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}

/// Queues the send of `d`'s ready bytes (if any) with a receive linked behind it, after
/// moving unwritten bytes to the front. `None` when the buffer is full with nothing to send.
fn arm(
    d: &mut super::Dir,
    from: RawFd,
    to: RawFd,
    id: u64,
    way: Way,
    pending: &mut Pending,
) -> Option<InFlight> {
    d.compact();
    d.need_flush = false;
    if d.end == d.buf.len() {
        return None;
    }
    let mut flight = InFlight {
        recv: true,
        send: false,
    };
    if d.written < d.ready {
        let chunk = &d.buf[d.written..d.ready];
        pending.push(
            opcode::Send::new(types::Fd(to), chunk.as_ptr(), chunk.len() as u32)
                .flags(libc::MSG_NOSIGNAL | libc::MSG_WAITALL)
                .build()
                .flags(squeue::Flags::IO_LINK | squeue::Flags::SKIP_SUCCESS)
                .user_data(id << OP_BITS | way.send_op()),
        );
        flight.send = true;
    }
    let room = &mut d.buf[d.end..];
    pending.push(
        opcode::Recv::new(types::Fd(from), room.as_mut_ptr(), room.len() as u32)
            .build()
            .user_data(id << OP_BITS | way.recv_op()),
    );
    Some(flight)
}
