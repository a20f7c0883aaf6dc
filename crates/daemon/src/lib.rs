//! pgtwig's daemon: one per project. It runs the proxy on the configured
//! address, routes new sessions to the active branch (woken on demand),
//! suspends idle branches, and answers `pgtwig use / status / down` on a
//! control socket.
//!
//! - [`router`]: active/pinned branch → upstream socket; wake on connect.
//! - [`neon_router`]: the same for Neon branches (TLS to their endpoints).
//! - [`suspend`]: scale to zero after `suspend_timeout` without sessions.
//! - [`control`]: the control socket protocol, server side here, client side
//!   for the CLI.
//! - [`head_watch`]: follow checkouts that skip the git hook.
//! - [`port`]: binding the proxy port with a useful error.

pub mod client_worktree;
pub mod control;
pub mod fd_limit;
pub mod head_watch;
mod linked_worktrees;
pub mod neon_router;
pub mod port;
mod process;
pub mod router;
pub mod suspend;
#[cfg(test)]
mod test_repo;
pub mod unix_socket;
pub mod worktree_routes;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use pgtwig_core::config::{OnSwitch, ProxyConfig as ProxySettings};
use pgtwig_core::fsutil::ProjectLock;
use pgtwig_core::state::ProjectState;
use pgtwig_core::{BackendKind, ProjectHome};
use pgtwig_local::LocalBackend;
use pgtwig_neon::NeonBackend;
use pgtwig_proxy::{Proxy, ProxyConfig, UpstreamTls};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::{mpsc, watch};

use control::{DaemonStatus, Request, Response, SessionStatus};
use neon_router::NeonRouter;
use router::{Activity, LocalRouter};

/// Where the daemon's branches live.
pub enum Branches {
    Local(LocalBackend),
    Neon {
        backend: NeonBackend,
        /// `[neon] connect`: reach endpoints here instead of their hosts.
        connect: Option<(String, u16)>,
        /// Trust roots for the endpoints' certificates.
        tls: UpstreamTls,
    },
}

impl Branches {
    fn home(&self) -> &ProjectHome {
        match self {
            Branches::Local(b) => b.home(),
            Branches::Neon { backend, .. } => backend.home(),
        }
    }

    fn kind(&self) -> BackendKind {
        match self {
            Branches::Local(_) => BackendKind::Local,
            Branches::Neon { .. } => BackendKind::Neon,
        }
    }

    fn paths(&self) -> Result<DaemonPaths> {
        match self {
            Branches::Local(b) => DaemonPaths::for_backend(b),
            Branches::Neon { backend, .. } => DaemonPaths::for_neon(backend),
        }
    }
}

/// The work tree the daemon was started in (the project's main one) and its repository.
pub struct FollowedWorktree {
    /// Its top folder.
    pub root: PathBuf,
    /// Its HEAD file (watched for checkouts that skip the hook).
    pub head_file: PathBuf,
    /// The repository's git common dir: clients in any work tree of it are routed by it.
    pub common_dir: PathBuf,
}

/// Paths of a project's daemon files.
pub struct DaemonPaths {
    /// Held (flock) for the daemon's whole life: one daemon per project.
    pub lock: PathBuf,
    pub pid: PathBuf,
    pub log: PathBuf,
    pub control: PathBuf,
}

impl DaemonPaths {
    /// The control socket is in pgtwig's own runtime folder, not the
    /// servers' user's: only pgtwig talks on it, and in a folder the server
    /// user owns (pgtwig running as root) that user could send `down` or
    /// `use`, or put a socket of its own in its place.
    pub fn for_backend(backend: &LocalBackend) -> Result<DaemonPaths> {
        let user = pgtwig_local::server_user::ServerUser::current();
        let base = pgtwig_local::cluster::runtime_base(&user)?;
        Ok(DaemonPaths::at(backend.home().dir(), &base))
    }

    /// Neon runs no local servers: the control socket is in pgtwig's own
    /// runtime folder too.
    pub fn for_neon(backend: &NeonBackend) -> Result<DaemonPaths> {
        let user = pgtwig_local::server_user::ServerUser::current();
        let base = pgtwig_local::cluster::runtime_base(&user)?;
        Ok(DaemonPaths::at(backend.home().dir(), &base))
    }

    fn at(dir: &std::path::Path, base: &std::path::Path) -> DaemonPaths {
        DaemonPaths {
            lock: dir.join("daemon.lock"),
            pid: dir.join("daemon.pid"),
            log: dir.join("daemon.log"),
            control: control::socket_path(base, dir),
        }
    }
}

/// Run the daemon until Ctrl-C, SIGTERM or `pgtwig down`. `on_ready` is
/// called once it listens (the CLI prints where).
pub fn run(
    backend: Branches,
    settings: ProxySettings,
    history_retention: Duration,
    worktree: Option<FollowedWorktree>,
    on_ready: impl FnOnce(&DaemonStatus),
) -> Result<()> {
    let paths = backend.paths()?;
    let Some(_daemon_lock) = ProjectLock::try_acquire(&paths.lock)? else {
        let pid = std::fs::read_to_string(&paths.pid).unwrap_or_default();
        anyhow::bail!(
            "a pgtwig daemon is already running for this project (pid {}); stop it with `pgtwig down`",
            pid.trim()
        );
    };
    pgtwig_core::fsutil::write_atomic(&paths.pid, format!("{}\n", std::process::id()).as_bytes())?;
    let state = ProjectState::load(&backend.home().state_path()).map_err(anyhow::Error::msg)?;
    fd_limit::raise();
    let client_auth = client_auth(&backend)?;
    let listeners = port::bind_all(&settings.listen)?;
    if let Some(warning) = exposure_warning(&settings.listen, client_auth.is_some()) {
        tracing::warn!("{warning}");
    }
    let client_tls = settings.tls_enabled(backend.kind());
    if client_tls && backend.kind() == BackendKind::Neon {
        tracing::warn!(
            "[proxy] tls = true with Neon: clients that use TLS to pgtwig must set channel_binding=disable, \
             because SCRAM channel binding cannot cross a proxy that terminates TLS"
        );
    }
    let proxy_config = ProxyConfig {
        tls: if client_tls {
            Some(
                pgtwig_proxy::load_or_create_tls(&backend.home().dir().join("tls"))
                    .context("preparing TLS")?,
            )
        } else {
            None
        },
        on_switch: match settings.on_switch {
            OnSwitch::CloseIdle => pgtwig_proxy::OnSwitch::CloseIdle,
            OnSwitch::Keep => pgtwig_proxy::OnSwitch::Keep,
        },
        // Server connections are kept for reuse only when the server let
        // the session in without a password; Neon always asks for one.
        pool_idle_timeout: if settings.reuse_connections {
            ProxyConfig::default().pool_idle_timeout
        } else {
            None
        },
        client_auth,
        // "0" in the config: no limit, as for the other durations there.
        upstream_connect_timeout: Some(settings.connect_timeout)
            .filter(|t| !t.is_zero())
            .unwrap_or(Duration::MAX),
        busy_poll: Some(settings.busy_poll).filter(|t| !t.is_zero()),
        io_uring: settings.io_uring,
        io_uring_threads: settings.io_uring_threads,
        ..ProxyConfig::default()
    };
    // One thread: on a laptop the proxy shares cores with Postgres and the
    // clients, and a second worker costs more in wake-ups than it gives
    // (crates/proxy/BENCH_NOTES.md). Starting and stopping servers runs on
    // tokio's blocking pool, so it never stalls the relay.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .thread_name("pgtwig-daemon")
        .build()?;
    let result = runtime.block_on(serve(
        backend,
        settings,
        proxy_config,
        state,
        listeners,
        &paths,
        history_retention,
        worktree,
        client_tls,
        on_ready,
    ));
    let _ = std::fs::remove_file(&paths.control);
    let _ = std::fs::remove_file(&paths.pid);
    // Sessions still open end here; servers keep running unless asked.
    runtime.shutdown_timeout(Duration::from_secs(1));
    result
}

// The daemon's parts, each prepared by `run` before the runtime exists.
#[allow(clippy::too_many_arguments)]
async fn serve(
    backend: Branches,
    settings: ProxySettings,
    proxy_config: ProxyConfig,
    state: ProjectState,
    listeners: Vec<std::net::TcpListener>,
    paths: &DaemonPaths,
    history_retention: Duration,
    worktree: Option<FollowedWorktree>,
    client_tls: bool,
    on_ready: impl FnOnce(&DaemonStatus),
) -> Result<()> {
    let home = backend.home().clone();
    let (active_tx, active_rx) = watch::channel(state.active.to_string());
    let worktrees = Arc::new(worktree_routes::WorktreeRoutes::new(
        worktree
            .as_ref()
            .map(|w| (w.common_dir.as_path(), w.root.as_path())),
    ));
    worktrees.update(&state);
    let activity = Arc::new(Activity::default());
    let (router, local, neon): (Arc<dyn pgtwig_proxy::Router>, _, _) = match backend {
        Branches::Local(b) => {
            let b = Arc::new(b);
            for name in b.names()? {
                if b.ready_socket(&name).is_some() {
                    activity.track(name.as_str());
                }
            }
            let router = LocalRouter {
                backend: b.clone(),
                active: active_rx.clone(),
                worktrees: worktrees.clone(),
                activity: activity.clone(),
                history_retention,
            };
            (Arc::new(router), Some(b), None)
        }
        Branches::Neon {
            backend,
            connect,
            tls,
        } => {
            let router = Arc::new(NeonRouter::new(
                Arc::new(backend),
                active_rx.clone(),
                activity.clone(),
                connect,
                tls,
                worktrees.clone(),
            ));
            (
                router.clone() as Arc<dyn pgtwig_proxy::Router>,
                None,
                Some(router),
            )
        }
    };
    let proxy = Arc::new(Proxy::new(proxy_config, router, active_rx.clone()));
    let mut addresses = Vec::new();
    let mut accept = Vec::new();
    for l in listeners {
        addresses.push(l.local_addr()?);
        accept.push(pgtwig_proxy::Listener::Tcp(
            tokio::net::TcpListener::from_std(l)?,
        ));
    }
    let port = addresses.first().map_or(settings.listen.port, |a| a.port());
    let unix_socket = unix_socket::path(home.dir(), port)?;
    let unix = pgtwig_proxy::bind_unix(&unix_socket, 0o666).with_context(|| {
        format!(
            "cannot create the proxy's Unix socket {}",
            unix_socket.display()
        )
    })?;
    accept.push(pgtwig_proxy::Listener::Unix(
        tokio::net::UnixListener::from_std(unix)?,
    ));
    tokio::spawn(proxy.clone().serve_all(accept));
    if let Some(b) = &local {
        // History for long-running branches: a base at most hourly and
        // pruning to history_retention happen here too, not only at start.
        if !history_retention.is_zero() {
            tokio::spawn(history_snapshots(b.clone(), history_retention));
        }
        // Neon suspends its computes itself.
        tokio::spawn(suspend::run(
            b.clone(),
            proxy.clone(),
            activity.clone(),
            settings.suspend_timeout,
        ));
    }
    // Armed here, before the daemon says it is ready: a checkout right after `pgtwig up`
    // returns must not be missed.
    let watch = worktree
        .as_ref()
        .and_then(|w| head_watch::arm(&w.root, w.head_file.parent()?, &w.common_dir));

    let _ = std::fs::remove_file(&paths.control);
    let control = UnixListener::bind(&paths.control).with_context(|| {
        format!(
            "cannot create the control socket {}",
            paths.control.display()
        )
    })?;
    let (stop_tx, mut stop_rx) = mpsc::channel::<bool>(1);
    let ctx = Arc::new(ControlCtx {
        activity: activity.clone(),
        home,
        local: local.clone(),
        neon,
        proxy: proxy.clone(),
        active_tx,
        worktrees,
        listen: pgtwig_core::ListenAddr {
            port,
            ..settings.listen.clone()
        },
        addresses,
        unix_socket: unix_socket.clone(),
        settings: settings.clone(),
        client_tls,
        stop_tx,
    });
    tokio::spawn(control_loop(control, ctx.clone()));
    if let Some(armed) = watch {
        let ctx = ctx.clone();
        tokio::spawn(armed.run(move || {
            if let Err(e) = ctx.take_state() {
                tracing::warn!("cannot read the state after a checkout: {e}");
            }
        }));
    }

    on_ready(&ctx.status());
    tracing::info!(
        "proxy listening on {} and {}, routing to branch \"{}\"",
        ctx.addresses_text(),
        unix_socket.display(),
        state.active
    );

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    let stop_branches = tokio::select! {
        _ = tokio::signal::ctrl_c() => false,
        _ = sigterm.recv() => false,
        s = stop_rx.recv() => s.unwrap_or(false),
    };
    if let (true, Some(b)) = (stop_branches, local) {
        tokio::task::spawn_blocking(move || -> Result<()> {
            for name in b.names()? {
                if b.ready_socket(&name).is_some() {
                    b.stop(&name)?;
                }
            }
            Ok(())
        })
        .await??;
    }
    let _ = std::fs::remove_file(&unix_socket);
    tracing::info!("daemon stopped");
    Ok(())
}

/// How clients authenticate. Local branches trust their private socket, so the proxy itself
/// admits only the daemon's own user without a password (see pgtwig_proxy's `auth`); Neon
/// checks every login itself, so credentials pass through.
fn client_auth(backend: &Branches) -> Result<Option<pgtwig_proxy::ClientAuth>> {
    match backend {
        Branches::Neon { .. } => Ok(None),
        Branches::Local(b) => {
            let password = pgtwig_core::proxy_password::load_or_create(b.home())
                .map_err(anyhow::Error::msg)
                .context(
                    "the proxy password protects every branch; pgtwig does not start without it",
                )?;
            Ok(Some(pgtwig_proxy::ClientAuth {
                owner_uid: nix::unistd::geteuid().as_raw(),
                secret: pgtwig_proxy::ScramSecret::from_password(&password),
                hint: "clients of other OS users, containers and other machines need the proxy password: \
                       `pgtwig url` prints a DATABASE_URL with it"
                    .into(),
            }))
        }
    }
}

/// What to tell the user about who can reach the proxy at `listen`, when it is more than
/// this machine.
pub fn exposure_warning(listen: &pgtwig_core::ListenAddr, password: bool) -> Option<String> {
    if listen.is_loopback() {
        return None;
    }
    Some(if password {
        format!(
            "listening on {listen} (not loopback): other machines can reach the proxy; every client \
             there must give the proxy password (`pgtwig url` prints it), and gets superuser on your branches with it"
        )
    } else {
        format!(
            "listening on {listen} (not loopback): other machines can reach the proxy; Neon checks \
             their logins"
        )
    })
}

/// Every 10 minutes: history bases of running local branches (see
/// pgtwig_local::history).
async fn history_snapshots(backend: Arc<LocalBackend>, retention: Duration) {
    loop {
        tokio::time::sleep(Duration::from_secs(600)).await;
        let b = backend.clone();
        let _ = tokio::task::spawn_blocking(move || {
            for name in b.names().unwrap_or_default() {
                if b.ready_socket(&name).is_some() {
                    if let Err(e) = b.snapshot_if_due(&name, retention) {
                        tracing::warn!("no history snapshot of \"{name}\": {e}");
                    }
                }
            }
        })
        .await;
    }
}

/// How long a reset or delete waits for open transactions on the branch.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(60);

struct ControlCtx {
    activity: Arc<Activity>,
    home: ProjectHome,
    local: Option<Arc<LocalBackend>>,
    neon: Option<Arc<NeonRouter>>,
    proxy: Arc<Proxy>,
    active_tx: watch::Sender<String>,
    worktrees: Arc<worktree_routes::WorktreeRoutes>,
    listen: pgtwig_core::ListenAddr,
    addresses: Vec<SocketAddr>,
    unix_socket: PathBuf,
    settings: ProxySettings,
    client_tls: bool,
    stop_tx: mpsc::Sender<bool>,
}

impl ControlCtx {
    fn addresses_text(&self) -> String {
        let list: Vec<String> = self.addresses.iter().map(|a| a.to_string()).collect();
        list.join(" and ")
    }

    /// Who must give the proxy password (for `status`).
    fn proxy_password_required(&self) -> String {
        if self.local.is_some() {
            "every client that is not this daemon's OS user".into()
        } else {
            "no: Neon checks every login".into()
        }
    }

    fn status(&self) -> DaemonStatus {
        let now = SystemTime::now();
        DaemonStatus {
            pid: std::process::id(),
            listen: self.listen.to_string(),
            addresses: self.addresses.iter().map(|a| a.to_string()).collect(),
            unix_socket: Some(self.unix_socket.display().to_string()),
            password_required: self.proxy_password_required(),
            active: self.active_tx.borrow().clone(),
            tls: self.client_tls,
            on_switch: match self.settings.on_switch {
                OnSwitch::CloseIdle => "close-idle".into(),
                OnSwitch::Keep => "keep".into(),
            },
            suspend_timeout_secs: self.settings.suspend_timeout.as_secs(),
            sessions: self
                .proxy
                .sessions()
                .into_iter()
                .map(|s| SessionStatus {
                    branch: s.branch,
                    client: s.client_addr.to_string(),
                    user: s.user,
                    database: s.database,
                    application_name: s.application_name,
                    pinned: s.pinned,
                    in_transaction: s.in_transaction,
                    seconds: now.duration_since(s.started).unwrap_or_default().as_secs(),
                    worktree: s.scope,
                })
                .collect(),
            main_worktree: self.worktrees.main().map(|m| m.display().to_string()),
            worktrees: self
                .worktrees
                .list()
                .into_iter()
                .map(|(path, branch)| control::WorktreeStatus {
                    path: path.display().to_string(),
                    branch,
                })
                .collect(),
        }
    }

    /// Hold off new sessions to `branch`, end its sessions at their next
    /// transaction boundary and wait (bounded) until they are gone. The
    /// returned guard keeps new sessions waiting.
    async fn drain(
        &self,
        branch: &str,
        why: Option<String>,
    ) -> (Response, tokio::sync::OwnedMutexGuard<()>) {
        let gate = self.activity.gate(branch).lock_owned().await;
        self.activity.forget_ready(branch);
        let why = why.unwrap_or_else(|| {
            format!(
                "pgtwig is resetting or deleting database branch \"{branch}\"; reconnect to continue"
            )
        });
        self.proxy
            .close_sessions_on(branch, format!("terminating connection: {why}"));
        let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
        while self.proxy.sessions().iter().any(|s| s.branch == branch) {
            if tokio::time::Instant::now() > deadline {
                tracing::warn!(
                    "sessions on \"{branch}\" still in a transaction after {DRAIN_TIMEOUT:?}; they will be cut"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let (Some(local), Ok(name)) = (&self.local, pgtwig_core::BranchName::parse(branch)) {
            if let Some(socket) = local.ready_socket(&name) {
                self.proxy
                    .release_pooled(&pgtwig_proxy::UpstreamAddr::Unix(socket));
            }
        }
        if let Some(neon) = &self.neon {
            // Reset or deleted: look its endpoint up again next time.
            neon.forget(branch);
        }
        (
            Response::Ok {
                pid: std::process::id(),
            },
            gate,
        )
    }

    /// Routes by state.json as it is now (after `pgtwig use`, a checkout, gc).
    fn take_state(&self) -> Result<(), String> {
        let state = ProjectState::load(&self.home.state_path())?;
        let new = state.active.to_string();
        let old = self.active_tx.send_replace(new.clone());
        if old != new {
            tracing::info!("active branch: \"{old}\" → \"{new}\"");
        }
        self.worktrees.update(&state);
        Ok(())
    }

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::Ok {
                pid: std::process::id(),
            },
            Request::Status => Response::Status(Box::new(self.status())),
            Request::ActiveChanged => match self.take_state() {
                Ok(()) => Response::Ok {
                    pid: std::process::id(),
                },
                Err(message) => Response::Error { message },
            },
            Request::Drain { .. } => Response::Error {
                message: "drain is answered by the control loop".into(),
            },
            Request::Shutdown { stop_branches } => {
                let _ = self.stop_tx.send(stop_branches).await;
                Response::Ok {
                    pid: std::process::id(),
                }
            }
        }
    }
}

async fn control_loop(listener: UnixListener, ctx: Arc<ControlCtx>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let (read, mut write) = stream.into_split();
            let mut line = String::new();
            let mut reader = BufReader::new(read.take(64 * 1024));
            if reader.read_line(&mut line).await.is_err() {
                return;
            }
            let request = serde_json::from_str::<Request>(&line);
            let mut held = None;
            let response = match request {
                Ok(Request::Drain { branch, why }) => {
                    let (response, gate) = ctx.drain(&branch, why).await;
                    held = Some(gate);
                    response
                }
                Ok(req) => ctx.handle(req).await,
                Err(e) => Response::Error {
                    message: format!("bad request: {e}"),
                },
            };
            let mut out = serde_json::to_string(&response).unwrap_or_default();
            out.push('\n');
            let _ = write.write_all(out.as_bytes()).await;
            if let Some(gate) = held {
                // New sessions to the branch wait until the caller is done
                // (closes the connection, or dies).
                let mut rest = Vec::new();
                let _ = reader.read_to_end(&mut rest).await;
                drop(gate);
            }
        });
    }
}
