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

pub mod control;
pub mod head_watch;
pub mod neon_router;
pub mod port;
pub mod router;
pub mod suspend;

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
    worktree: Option<(PathBuf, PathBuf)>,
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
    let listener = port::bind(settings.listen)?;
    if !settings.listen.ip().is_loopback() {
        tracing::warn!(
            "listening on {} (not loopback): other machines can reach your branches through pgtwig",
            settings.listen
        );
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
        listener,
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
    listener: std::net::TcpListener,
    paths: &DaemonPaths,
    history_retention: Duration,
    worktree: Option<(PathBuf, PathBuf)>,
    client_tls: bool,
    on_ready: impl FnOnce(&DaemonStatus),
) -> Result<()> {
    let home = backend.home().clone();
    let (active_tx, active_rx) = watch::channel(state.active.to_string());
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
            ));
            (
                router.clone() as Arc<dyn pgtwig_proxy::Router>,
                None,
                Some(router),
            )
        }
    };
    let proxy = Arc::new(Proxy::new(proxy_config, router, active_rx.clone()));
    listener.set_nonblocking(true)?;
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let local_addr = listener.local_addr()?;
    tokio::spawn(proxy.clone().serve(listener));
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
    if let Some((root, head)) = worktree {
        tokio::spawn(head_watch::run(root, head));
    }

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
        listen: local_addr,
        settings: settings.clone(),
        client_tls,
        stop_tx,
    });
    tokio::spawn(control_loop(control, ctx.clone()));

    on_ready(&ctx.status());
    tracing::info!(
        "proxy listening on {local_addr}, routing to branch \"{}\"",
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
    tracing::info!("daemon stopped");
    Ok(())
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
    listen: SocketAddr,
    settings: ProxySettings,
    client_tls: bool,
    stop_tx: mpsc::Sender<bool>,
}

impl ControlCtx {
    fn status(&self) -> DaemonStatus {
        let now = SystemTime::now();
        DaemonStatus {
            pid: std::process::id(),
            listen: self.listen.to_string(),
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
                })
                .collect(),
        }
    }

    /// Hold off new sessions to `branch`, end its sessions at their next
    /// transaction boundary and wait (bounded) until they are gone. The
    /// returned guard keeps new sessions waiting.
    async fn drain(&self, branch: &str) -> (Response, tokio::sync::OwnedMutexGuard<()>) {
        let gate = self.activity.gate(branch).lock_owned().await;
        self.activity.forget_ready(branch);
        self.proxy.close_sessions_on(
            branch,
            format!(
                "terminating connection: pgtwig is resetting or deleting database branch \"{branch}\"; reconnect to continue"
            ),
        );
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

    async fn handle(&self, req: Request) -> Response {
        match req {
            Request::Ping => Response::Ok {
                pid: std::process::id(),
            },
            Request::Status => Response::Status(self.status()),
            Request::ActiveChanged => match ProjectState::load(&self.home.state_path()) {
                Ok(state) => {
                    let new = state.active.to_string();
                    let old = self.active_tx.send_replace(new.clone());
                    if old != new {
                        tracing::info!("active branch: \"{old}\" → \"{new}\"");
                    }
                    Response::Ok {
                        pid: std::process::id(),
                    }
                }
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
                Ok(Request::Drain { branch }) => {
                    let (response, gate) = ctx.drain(&branch).await;
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
