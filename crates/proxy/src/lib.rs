//! pgtwig's local Postgres-protocol proxy.
//!
//! An application keeps one fixed `DATABASE_URL` pointing at the proxy on localhost; the proxy
//! sends each new session to the *active* database branch (a `tokio::sync::watch` channel the
//! daemon updates when git switches branches), or to a branch the client names explicitly.
//!
//! # What happens to a connection
//! 1. **Startup.** The first packet is read with its length capped
//!    ([`ProxyConfig::max_startup_packet`]) and within [`ProxyConfig::startup_timeout`].
//!    `SSLRequest` is answered `S` and TLS is terminated with [`ProxyConfig::tls`] (a
//!    self-signed `localhost` certificate from [`load_or_create_tls`]), or `N` without TLS;
//!    `GSSENCRequest` is answered `N`. Protocol 3.0 is spoken; a client asking for a newer
//!    minor version (PG18's 3.2) or sending `_pq_.` options gets `NegotiateProtocolVersion`
//!    down to 3.0 and the options are dropped. Malformed or oversized packets get a FATAL
//!    `ErrorResponse` (08P01), never a silent close. A client opening with a TLS ClientHello
//!    instead (PostgreSQL 17 `sslnegotiation=direct`) gets TLS first; see "TLS" below.
//! 2. **Routing.** [`Router::route`] picks the upstream; [`RouteError`]s become FATAL errors
//!    (3D000, 57P03, XX000); an unreachable upstream gives 08006 with the address in DETAIL.
//! 3. **Auth passes through.** The client's startup parameters (user, database,
//!    application_name, options, ...) are forwarded unchanged except for the pin suffix, and
//!    the authentication exchange is relayed as is: the proxy never sees passwords in clear
//!    unless the client sends them so.
//! 4. **Relay.** Bytes flow as they come; server→client message headers are read to follow
//!    `ReadyForQuery` status and to swap `BackendKeyData`'s secret for a proxy-made one.
//!    A session without TLS that has answered a few queries is lent to one of the process's
//!    io_uring threads ([`ProxyConfig::io_uring`], [`ProxyConfig::io_uring_threads`],
//!    `relay/ring.rs`): the same scanners, one system call per message. It comes back to its
//!    task for switches, drains and its end.
//!
//! # TLS: `sslmode` and PostgreSQL 17's `sslnegotiation=direct`
//! Both ways of starting TLS are served, with the same certificate, timeout and size limits:
//! - **SSLRequest** (every libpq; `sslnegotiation=postgres`, the default): `S`, then the TLS
//!   handshake.
//! - **Direct** (libpq 17+ `sslnegotiation=direct`): the client opens with a TLS ClientHello
//!   (first byte `0x16`) instead of a startup packet. The ClientHello must offer ALPN
//!   `postgresql`; one that does not is refused with a `no_application_protocol` alert
//!   (PostgreSQL 17 refuses it too, after the handshake). The startup packet (or a
//!   CancelRequest — libpq 17 sends those the same way) then comes inside TLS.
//!   Without [`ProxyConfig::tls`] a ClientHello is closed without a word, as PostgreSQL 17
//!   with `ssl = off` does.
//!
//! The server advertises ALPN `postgresql` on both paths ([`Proxy::new`] sets it on the
//! configuration it is given), so clients that send ALPN get it back; clients that send no
//! ALPN (libpq before 17, tokio-postgres, JDBC, ...) are accepted after SSLRequest as before,
//! and ones offering only other protocols get `no_application_protocol` there too, as from
//! PostgreSQL 17.
//!
//! # Pinning: `dbname=app@branch`
//! A database name with an `@` suffix pins the session to that branch regardless of the
//! active one: `psql "host=localhost port=5433 dbname=app@main"` connects to database `app` on
//! branch `main` (the server sees `database=app`). The last `@` separates; an empty side means
//! no pin. Pinned sessions are never closed by branch switches.
//!
//! # Branch switches
//! When the active branch changes, new sessions go to the new branch at once. With
//! [`OnSwitch::CloseIdle`] (the default), an unpinned session on another branch is closed at a
//! transaction boundary: immediately if it is idle (its last `ReadyForQuery` was `I` and it
//! has sent nothing since), else right after its next `ReadyForQuery` `I` — a transaction in
//! progress commits or rolls back first. It gets `FATAL 57P01 terminating connection: pgtwig
//! switched the active branch from "a" to "b"` and the server gets a Terminate. With
//! [`OnSwitch::Keep`] sessions stay where they are.
//!
//! A COPY in progress finishes on the old branch first (FROM STDIN and TO STDOUT, simple or
//! extended protocol); the 57P01 comes at the ReadyForQuery after it.
//!
//! The FATAL never travels with the ReadyForQuery before it: libpq reads both at once, takes
//! an ErrorResponse that arrives while it is idle for a notice, and its next query would fail
//! with "server closed the connection unexpectedly" and no SQLSTATE. It is sent as the answer
//! to the client's next message instead (as when a server is terminated while its client is
//! idle), or after half a second without one; a client sending Terminate gets none.
//!
//! **Fresh sessions are moved, not closed.** A session whose client has sent nothing since
//! its greeting (a connect-per-query client that has just connected) has no state on its
//! server, so it is moved to the new branch instead: a parked connection for the same startup
//! packet, or a new one to which the proxy sends the client's startup packet again. Only when
//! the new server trusts it (`AuthenticationOk` first, as for reuse) is the session moved;
//! otherwise, or when the new branch cannot be routed to, it gets the 57P01. The client keeps
//! the greeting it has (the old server's ParameterStatus values and backend pid, so a moved
//! session's `pg_backend_pid()` differs from its BackendKeyData pid); its cancel key is
//! pointed at the new server. The old, unused server connection is parked for reuse. A
//! session that has sent anything — even only a Parse/Describe to prepare a statement it
//! executes in a second round trip — has history and gets 57P01 at its next boundary.
//!
//! # Server connection reuse
//! With [`ProxyConfig::pool_idle_timeout`] set (the default), a server connection whose
//! client sent Terminate while idle is reset with `DISCARD ALL` and kept for the next client
//! sending the *identical* startup packet to the same upstream, as PgBouncer's session
//! pooling does; this makes connect-per-transaction workloads several times faster. Only
//! connections the server admitted without any credentials (trust: `AuthenticationOk` was its
//! first answer) are reused, so reuse never lets a client skip authentication. A reused
//! session looks fresh (settings, temp tables, prepared statements, locks and LISTENs are
//! gone) but keeps its backend pid, which is the server's real one as on a fresh connection
//! (the secret is new each time). Two things survive `DISCARD ALL` (as with PgBouncer): a
//! custom placeholder setting once set reads `''` instead of NULL, and a library loaded with
//! `LOAD` stays loaded (`tests/reuse.rs` checks both); [`ProxyConfig::pool_idle_timeout`]
//! `None` avoids them.
//!
//! # Performance
//! One task per session drives both directions (no locks, one write per read, no
//! per-message allocation); Unix sockets wake it only for reading (`unix_conn.rs`).
//! [`ProxyConfig::busy_poll`] (off by default) keeps the runtime polling briefly after
//! traffic instead of sleeping, only where a trial shows that it makes clients faster. Run
//! `serve` on its own current-thread runtime.
//! Measured figures: `BENCH_NOTES.md` in this crate.
//!
//! # Backend pids and cancel requests
//! `BackendKeyData` carries the server's real backend pid, so what a client was told agrees
//! with `pg_backend_pid()`, the pid of `NotificationResponse`s (apps ignoring their own
//! NOTIFYs) and `pg_terminate_backend(pid)` / `pg_cancel_backend(pid)` run from any session.
//! Only the secret is proxy-made: a `CancelRequest` sent to the proxy (psql's Ctrl-C,
//! `cancel_token().cancel_query()`) is looked up by (pid, secret) and forwarded to the
//! session's server with the real secret. Secrets are drawn so no two live keys share a
//! (pid, secret) pair, which keeps sessions on different hosts with the same pid apart. A
//! `BackendKeyData` that is not protocol 3.0's 8 bytes ends the session with 08P01.

#![warn(missing_docs)]

mod auth;
mod cancel;
mod error;
mod inbox;
mod listen;
pub mod peer;
mod pool;
mod relay;
mod router;
mod scan;
mod scram;
mod session;
mod spin;
mod startup;
mod stream;
mod tls;
mod unix_conn;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio::sync::watch;

pub use auth::PeerIdentity;
pub use auth::{ClientAuth, ClientPeer};
pub use error::{sqlstate, PgError};
pub use listen::{bind_tcp, bind_unix, Listener, LISTEN_BACKLOG};
pub use relay::{ring_counts, ring_kept_descriptors, ring_loads, MAX_IO_URING_THREADS};
pub use router::{ClientInfo, Route, RouteError, RouteFuture, Router, UpstreamAddr, UpstreamTls};
pub use scram::ScramSecret;
pub use session::switch_message;
pub use tls::load_or_create_tls;

/// What happens to existing unpinned sessions on another branch when the active branch changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnSwitch {
    /// Close them at their next transaction boundary with FATAL 57P01 (default).
    #[default]
    CloseIdle,
    /// Leave them on the branch they are on.
    Keep,
}

/// Proxy settings.
#[derive(Clone)]
pub struct ProxyConfig {
    /// TLS for clients, after `SSLRequest` or direct (`sslnegotiation=direct`); `None`
    /// answers `N` to `SSLRequest` and closes direct TLS connections. Its ALPN protocols are
    /// set to exactly `postgresql` by [`Proxy::new`].
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Behaviour on branch switches.
    pub on_switch: OnSwitch,
    /// How long a client may take to finish the startup handshake (default 10 s).
    pub startup_timeout: Duration,
    /// Largest accepted startup packet in bytes (default 10 000, like Postgres).
    pub max_startup_packet: usize,
    /// How long connecting to an upstream may take: the TCP (or Unix socket) connect, and for
    /// a TLS upstream the SSLRequest answer and TLS handshake, each (default 10 s). Past it
    /// the client gets FATAL 08006 saying which step did not finish.
    pub upstream_connect_timeout: Duration,
    /// How long to keep a *trust-authenticated* server connection after its client leaves,
    /// for the next client with the identical startup packet (default 30 s; `None` turns
    /// reuse off). See "Server connection reuse" in the crate docs.
    pub pool_idle_timeout: Option<Duration>,
    /// Keep polling for this long after any session activity before sleeping (default
    /// `None`: never). An idle proxy still sleeps; an active one spends CPU to skip
    /// wake-ups, which on a VM where waking an idle vCPU is slow makes a single
    /// connection's round trips faster than direct TCP, and elsewhere only costs CPU (see
    /// `BENCH_NOTES.md`). So spinning starts only after a trial on this machine showed it
    /// makes clients faster, is tried again every 10 s, and pauses while the CPUs are
    /// saturated (see `spin.rs`).
    pub busy_poll: Option<Duration>,
    /// Relay settled plain sessions on io_uring (default `true`; Linux, where
    /// `io_uring_setup` works): one system call per message instead of three. Sessions over
    /// TLS, and everything but relaying, stay on the runtime (see `relay/ring.rs`).
    pub io_uring: bool,
    /// How many io_uring threads sessions may be spread over (default 1; at most
    /// [`MAX_IO_URING_THREADS`]): each session goes to an idle ring before it shares a busy
    /// one. More threads relay concurrent sessions in parallel, which can raise throughput
    /// when the CPUs are contended, at more CPU per transaction (fewer messages per wake-up);
    /// one is the cheapest (see `BENCH_NOTES.md`). The rings are the process's, shared by
    /// every proxy in it.
    pub io_uring_threads: usize,
    /// Client authentication: `Some` admits only the owner without a password and makes
    /// everyone else pass SCRAM-SHA-256 (see "Who gets in" in the crate docs); `None` relays
    /// the upstream's own authentication (upstreams that check passwords themselves, such as
    /// Neon).
    pub client_auth: Option<ClientAuth>,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            tls: None,
            on_switch: OnSwitch::CloseIdle,
            startup_timeout: Duration::from_secs(10),
            max_startup_packet: 10_000,
            upstream_connect_timeout: Duration::from_secs(10),
            pool_idle_timeout: Some(Duration::from_secs(30)),
            busy_poll: None,
            io_uring: true,
            io_uring_threads: 1,
            client_auth: None,
        }
    }
}

impl std::fmt::Debug for ProxyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyConfig")
            .field("tls", &self.tls.is_some())
            .field("on_switch", &self.on_switch)
            .field("startup_timeout", &self.startup_timeout)
            .field("max_startup_packet", &self.max_startup_packet)
            .field("upstream_connect_timeout", &self.upstream_connect_timeout)
            .field("pool_idle_timeout", &self.pool_idle_timeout)
            .field("busy_poll", &self.busy_poll)
            .field("io_uring", &self.io_uring)
            .field("io_uring_threads", &self.io_uring_threads)
            .field(
                "client_auth",
                &self.client_auth.as_ref().map(|a| a.owner_uid),
            )
            .finish()
    }
}

/// A live session, for `pgtwig status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// Proxy-assigned session id.
    pub id: u64,
    /// The branch the session is on.
    pub branch: String,
    /// Where the client connected from.
    pub client_addr: ClientPeer,
    /// What the router routed by (e.g. the client's work tree), if anything.
    pub scope: Option<String>,
    /// When the session was routed.
    pub started: SystemTime,
    /// The client named the branch (`dbname=app@branch`).
    pub pinned: bool,
    /// The last `ReadyForQuery` said `T` or `E` (inside a transaction block).
    pub in_transaction: bool,
    /// `user` startup parameter.
    pub user: Option<String>,
    /// Database name (pin suffix removed; defaults to the user name like Postgres).
    pub database: Option<String>,
    /// `application_name` startup parameter.
    pub application_name: Option<String>,
}

pub(crate) struct SessionRecord {
    branch: String,
    client_addr: ClientPeer,
    scope: Option<String>,
    started: SystemTime,
    pinned: bool,
    user: Option<String>,
    database: Option<String>,
    application_name: Option<String>,
    status: Arc<AtomicU8>,
}

/// Removes a session from the registry when dropped.
pub(crate) struct Registration<'a> {
    proxy: &'a Proxy,
    id: u64,
}

impl Registration<'_> {
    /// The session moved to `branch`.
    pub(crate) fn set_branch(&self, branch: &str) {
        let mut sessions = self
            .proxy
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(r) = sessions.get_mut(&self.id) {
            r.branch = branch.to_string();
        }
    }
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        self.proxy
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.id);
    }
}

/// The proxy. Create with [`Proxy::new`], run with [`Proxy::serve`].
pub struct Proxy {
    config: ProxyConfig,
    router: Arc<dyn Router>,
    active: watch::Receiver<String>,
    cancel: Arc<cancel::CancelMap>,
    pool: Arc<pool::Pool>,
    activity: Option<Arc<spin::Activity>>,
    sessions: Mutex<HashMap<u64, SessionRecord>>,
    next_id: AtomicU64,
    /// Per branch, its latest drain (see [`Proxy::close_sessions_on`]): a watch, so a session
    /// that looks late still sees it (a broadcast channel drops what a slow receiver has not
    /// read). Drains are numbered from `drain_seq`: a session acts on one numbered after the
    /// moment it started routing.
    drains: Mutex<HashMap<String, watch::Sender<Drain>>>,
    drain_seq: AtomicU64,
}

/// A branch's latest drain: its number (0: none yet) and the FATAL message.
#[derive(Debug, Clone, Default)]
pub(crate) struct Drain {
    pub(crate) seq: u64,
    pub(crate) message: String,
}

impl Proxy {
    /// A proxy routing with `router`; `active` carries the active branch's name. A TLS
    /// configuration's ALPN protocols become exactly `postgresql` (a copy is made if needed).
    pub fn new(
        mut config: ProxyConfig,
        router: Arc<dyn Router>,
        active: watch::Receiver<String>,
    ) -> Self {
        config.tls = config.tls.map(tls::as_postgresql_does);
        Proxy {
            pool: Arc::new(pool::Pool::new(config.pool_idle_timeout)),
            activity: config.busy_poll.map(|_| Arc::default()),
            config,
            router,
            active,
            cancel: Arc::new(cancel::CancelMap::new()),
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            drains: Mutex::new(HashMap::new()),
            drain_seq: AtomicU64::new(0),
        }
    }

    /// The number of the latest drain: read it before routing a session, and drains numbered
    /// after it concern that session (see [`Proxy::drains_of`]).
    pub(crate) fn drain_seq(&self) -> u64 {
        self.drain_seq.load(Ordering::SeqCst)
    }

    /// A watch of `branch`'s latest drain.
    pub(crate) fn drains_of(&self, branch: &str) -> watch::Receiver<Drain> {
        let mut drains = self.drains.lock().unwrap_or_else(|e| e.into_inner());
        drains
            .entry(branch.to_string())
            .or_insert_with(|| watch::channel(Drain::default()).0)
            .subscribe()
    }

    /// Ends every session on `branch`, pinned ones included, at its next
    /// transaction boundary — right away when idle, after COMMIT/ROLLBACK
    /// otherwise — with FATAL 57P01 `message`; their server connections are
    /// not kept for reuse. For a branch whose server is about to be reset or
    /// deleted. Sessions still to be routed are not affected: hold them off
    /// in the [`Router`] meanwhile.
    pub fn close_sessions_on(&self, branch: &str, message: String) {
        let mut drains = self.drains.lock().unwrap_or_else(|e| e.into_inner());
        let drain = Drain {
            seq: self.drain_seq.fetch_add(1, Ordering::SeqCst) + 1,
            message,
        };
        match drains.get(branch) {
            Some(tx) => {
                tx.send_replace(drain);
            }
            None => {
                drains.insert(branch.to_string(), watch::channel(drain).0);
            }
        }
    }

    /// Accepts connections on `listener` forever; see [`Proxy::serve_all`].
    pub async fn serve(self: Arc<Self>, listener: TcpListener) -> std::io::Result<()> {
        self.serve_all(vec![Listener::Tcp(listener)]).await
    }

    /// Accepts connections on every listener forever, one task per connection. Accept errors
    /// are logged and retried after a short pause; when the process is out of file
    /// descriptors, the waiting client is accepted with a reserved one and told 53300 (see
    /// `listen.rs`). A bad client only ever ends its own task. Dropping the future stops
    /// accepting (sessions already running go on).
    pub async fn serve_all(self: Arc<Self>, listeners: Vec<Listener>) -> std::io::Result<()> {
        // The busy-poll loop runs inside this future (not a spawned task), so dropping
        // `serve` stops it too; so do the accept loops, owned by the JoinSet.
        let activity = self.activity.clone();
        let window = self.config.busy_poll;
        let spinner = async move {
            match (window, activity) {
                (Some(window), Some(activity)) => activity.spin(window).await,
                _ => std::future::pending().await,
            }
        };
        tokio::pin!(spinner);
        let budget = Arc::new(listen::SessionBudget::from_limits());
        tracing::debug!(
            "at most {} sessions at once (open-file limit)",
            budget.max()
        );
        let mut accepting = tokio::task::JoinSet::new();
        for listener in listeners {
            accepting.spawn(listen::accept_loop(self.clone(), listener, budget.clone()));
        }
        let mut sweep = tokio::time::interval(Duration::from_secs(5));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => self.pool.sweep(),
                () = &mut spinner => {}
                Some(done) = accepting.join_next() => {
                    if let Ok(Err(e)) = done {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Live sessions (routed and relaying), oldest first.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let sessions = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<SessionInfo> = sessions
            .iter()
            .map(|(&id, r)| SessionInfo {
                id,
                branch: r.branch.clone(),
                client_addr: r.client_addr,
                scope: r.scope.clone(),
                started: r.started,
                pinned: r.pinned,
                in_transaction: matches!(r.status.load(Ordering::Relaxed), b'T' | b'E'),
                user: r.user.clone(),
                database: r.database.clone(),
                application_name: r.application_name.clone(),
            })
            .collect();
        out.sort_by_key(|s| s.id);
        out
    }

    /// Number of live cancel keys (one per session past authentication).
    pub fn cancel_keys(&self) -> usize {
        self.cancel.live_keys()
    }

    /// Number of idle server connections kept for reuse.
    pub fn pooled_connections(&self) -> usize {
        self.pool.len()
    }

    /// Closes the idle server connections kept for reuse to `addr` (returns how many). Call
    /// it before stopping or deleting a branch's server: parked connections hold no
    /// [`Route::lease`], and a smart shutdown would wait for them.
    pub fn release_pooled(&self, addr: &UpstreamAddr) -> usize {
        self.pool.release(addr)
    }

    pub(crate) fn register_session(&self, record: SessionRecord) -> Registration<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, record);
        Registration { proxy: self, id }
    }
}
