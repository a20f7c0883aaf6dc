//! Routing proxy sessions to local branches: the active branch (or the one
//! a client pins), started on the first connection, with each session
//! counted so idle branches can be suspended.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgtwig_core::BranchName;
use pgtwig_local::LocalBackend;
use pgtwig_proxy::{ClientInfo, Route, RouteError, RouteFuture, Router, UpstreamAddr};
use tokio::sync::watch;

use crate::worktree_routes::WorktreeRoutes;

/// A value per branch remembered for a short while (a ready socket, a Neon
/// endpoint), so a burst of connections asks the slow source once.
pub(crate) struct Recent<T> {
    ttl: Duration,
    map: Mutex<HashMap<String, (T, Instant)>>,
}

impl<T: Clone> Recent<T> {
    pub(crate) fn new(ttl: Duration) -> Self {
        Recent {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// The value remembered for `branch`, if it is younger than the TTL.
    pub(crate) fn get(&self, branch: &str) -> Option<T> {
        let map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        map.get(branch)
            .filter(|(_, seen)| seen.elapsed() < self.ttl)
            .map(|(v, _)| v.clone())
    }

    pub(crate) fn put(&self, branch: &str, value: T) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(branch.to_string(), (value, Instant::now()));
    }

    pub(crate) fn forget(&self, branch: &str) {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(branch);
    }
}

impl<T: PartialEq> Recent<T> {
    /// Forgets `branch` if what is remembered for it is `value`; true if it was.
    pub(crate) fn forget_if(&self, branch: &str, value: &T) -> bool {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        let held = map.get(branch).is_some_and(|(v, _)| v == value);
        if held {
            map.remove(branch);
        }
        held
    }
}

/// Sessions and last use per branch, shared by the router (which counts)
/// and the suspender (which stops what nobody uses).
pub struct Activity {
    branches: Mutex<HashMap<String, BranchActivity>>,
    /// One async lock per branch: held while a branch starts, stops, or a
    /// session is being routed to it, so 50 concurrent first connections
    /// start one server, and a suspend never races a new session.
    gates: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Sockets of branches seen ready in the last [`READY_FOR`]: a burst of
    /// connections (a connection per transaction) skips re-reading
    /// `postmaster.pid` for each. Cleared before a stop, reset or delete.
    ready: Recent<PathBuf>,
}

/// How long a branch seen ready is trusted without looking again. Far below
/// any suspend timeout, so a cached branch is never one being suspended.
const READY_FOR: Duration = Duration::from_millis(250);

impl Default for Activity {
    fn default() -> Self {
        Activity {
            branches: Mutex::default(),
            gates: Mutex::default(),
            ready: Recent::new(READY_FOR),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct BranchActivity {
    pub sessions: usize,
    pub last_seen: Instant,
}

impl Activity {
    pub fn gate(&self, branch: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.gates
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(branch.to_string())
            .or_default()
            .clone()
    }

    /// Start tracking a running branch (no sessions yet) if it is not tracked.
    pub fn track(&self, branch: &str) {
        self.branches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(branch.to_string())
            .or_insert(BranchActivity {
                sessions: 0,
                last_seen: Instant::now(),
            });
    }

    pub fn forget(&self, branch: &str) {
        self.branches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(branch);
        self.forget_ready(branch);
    }

    /// The branch is about to stop or change: look at its server again.
    pub fn forget_ready(&self, branch: &str) {
        self.ready.forget(branch);
    }

    /// Not even a `stat` of the socket (it was two path walks per connection at
    /// `pgbench -C`): a server stopped behind the daemon's back (`pgtwig branch stop`)
    /// fails the connect instead, and [`LocalRouter`]'s `unreachable` forgets it.
    fn cached_ready(&self, branch: &str) -> Option<PathBuf> {
        self.ready.get(branch)
    }

    pub fn snapshot(&self) -> Vec<(String, BranchActivity)> {
        self.branches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    }

    pub(crate) fn lease(self: &Arc<Self>, branch: &str) -> SessionLease {
        let mut map = self.branches.lock().unwrap_or_else(|e| e.into_inner());
        let entry = map.entry(branch.to_string()).or_insert(BranchActivity {
            sessions: 0,
            last_seen: Instant::now(),
        });
        entry.sessions += 1;
        entry.last_seen = Instant::now();
        SessionLease {
            activity: self.clone(),
            branch: branch.to_string(),
        }
    }
}

/// Held by the proxy for the life of one session.
pub(crate) struct SessionLease {
    activity: Arc<Activity>,
    branch: String,
}

impl Drop for SessionLease {
    fn drop(&mut self) {
        let mut map = self
            .activity
            .branches
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(a) = map.get_mut(&self.branch) {
            a.sessions = a.sessions.saturating_sub(1);
            a.last_seen = Instant::now();
        }
    }
}

pub struct LocalRouter {
    pub backend: Arc<LocalBackend>,
    pub active: watch::Receiver<String>,
    /// The branch of each work tree, for clients running in one.
    pub worktrees: Arc<WorktreeRoutes>,
    pub activity: Arc<Activity>,
    /// For base snapshots after a wake (see pgtwig_local::history).
    pub history_retention: std::time::Duration,
}

impl LocalRouter {
    async fn route_to(&self, branch: String) -> Result<Route, RouteError> {
        if let Some(socket) = self.activity.cached_ready(&branch) {
            let lease = self.activity.lease(&branch);
            return Ok(Route {
                branch,
                addr: UpstreamAddr::Unix(socket),
                lease: Box::new(lease),
                follow: None,
                scope: None,
            });
        }
        let name = BranchName::parse(&branch).map_err(|_| RouteError::BranchMissing {
            branch: branch.clone(),
        })?;
        if !self.backend.exists(&name) {
            return Err(RouteError::BranchMissing { branch });
        }
        let gate = self.activity.gate(&branch);
        let _held = gate.lock().await;
        let socket = match self.backend.ready_socket(&name) {
            Some(s) => s,
            None => self.start(&name).await?,
        };
        self.activity.ready.put(&branch, socket.clone());
        let lease = self.activity.lease(&branch);
        Ok(Route {
            branch,
            addr: UpstreamAddr::Unix(socket),
            lease: Box::new(lease),
            follow: None,
            scope: None,
        })
    }

    async fn start(&self, name: &BranchName) -> Result<PathBuf, RouteError> {
        let backend = self.backend.clone();
        let owned = name.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || backend.start(&owned))
            .await
            .map_err(|e| RouteError::Other(format!("starting branch \"{name}\": {e}")))?;
        match result {
            Ok(dir) => {
                tracing::info!("started branch \"{name}\" in {:?}", started.elapsed());
                // History, off the connection's path.
                let (backend, owned, retention) =
                    (self.backend.clone(), name.clone(), self.history_retention);
                tokio::task::spawn_blocking(move || {
                    if let Err(e) = backend.snapshot_if_due(&owned, retention) {
                        tracing::warn!("no history snapshot of \"{owned}\": {e}");
                    }
                });
                Ok(dir.join(format!(".s.PGSQL.{}", pgtwig_local::cluster::PORT)))
            }
            Err(pgtwig_local::Error::NotFound { .. }) => Err(RouteError::BranchMissing {
                branch: name.to_string(),
            }),
            // Another command holds the project lock (an import's swap, a reset): not this
            // branch's fault, and its server log has nothing to say about it.
            Err(e @ pgtwig_local::Error::Busy { .. }) => Err(RouteError::StartFailed {
                branch: name.to_string(),
                detail: e.to_string(),
            }),
            Err(e) if out_of_descriptors(&e) => {
                tracing::warn!("cannot start branch \"{name}\": out of file descriptors ({e})");
                Err(RouteError::TooManyConnections(format!(
                    "pgtwig could not start database branch \"{name}\": {}",
                    first_line(&e.to_string())
                )))
            }
            Err(e) => {
                tracing::error!("branch \"{name}\" failed to start: {e}");
                Err(RouteError::StartFailed {
                    branch: name.to_string(),
                    detail: format!(
                        "{}; its server log is {}",
                        first_line(&e.to_string()),
                        self.backend.log_path(name).display()
                    ),
                })
            }
        }
    }
}

/// True when `e` (or what caused it) is EMFILE/ENFILE.
fn out_of_descriptors(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if matches!(
                io.raw_os_error(),
                Some(nix::libc::EMFILE) | Some(nix::libc::ENFILE)
            ) {
                return true;
            }
        }
        cur = err.source();
    }
    false
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

/// The branch a session asked for: the one it pinned, else the active one.
pub(crate) fn wanted_branch(pinned: Option<&str>, active: &watch::Receiver<String>) -> String {
    match pinned {
        Some(p) => p.to_string(),
        None => active.borrow().clone(),
    }
}

impl Router for LocalRouter {
    fn route(&self, pinned: Option<&str>) -> RouteFuture<'_> {
        Box::pin(self.route_to(wanted_branch(pinned, &self.active)))
    }

    fn route_client<'a>(&'a self, pinned: Option<&str>, client: &ClientInfo) -> RouteFuture<'a> {
        route_by_worktree(&self.worktrees, &self.active, pinned, client, |b| {
            Box::pin(self.route_to(b))
        })
    }

    fn unreachable(&self, route: &Route) -> bool {
        match &route.addr {
            UpstreamAddr::Unix(socket) => self.activity.ready.forget_if(&route.branch, socket),
            _ => false,
        }
    }
}

/// Routes an unpinned session to its work tree's branch (see `worktree_routes`), through
/// `route_to`; pinned sessions go where they asked.
pub(crate) fn route_by_worktree<'a>(
    worktrees: &Arc<WorktreeRoutes>,
    active: &watch::Receiver<String>,
    pinned: Option<&str>,
    client: &ClientInfo,
    route_to: impl FnOnce(String) -> RouteFuture<'a> + Send + 'a,
) -> RouteFuture<'a> {
    if let Some(p) = pinned {
        return route_to(p.to_string());
    }
    let mut resolved = worktrees.resolve(client);
    let Some(dir) = resolved.unprovisioned.take() else {
        let routed = route_to(branch_of(&resolved, active));
        return Box::pin(async move {
            let mut route = routed.await?;
            route.follow = resolved.follow;
            route.scope = resolved.scope;
            Ok(route)
        });
    };
    let (worktrees, active) = (worktrees.clone(), active.clone());
    Box::pin(async move {
        let resolved = worktrees.provision(dir).await;
        let mut route = route_to(branch_of(&resolved, &active)).await?;
        route.follow = resolved.follow;
        route.scope = resolved.scope;
        Ok(route)
    })
}

/// The branch a resolved client goes to now: its work tree's, else the main one's.
fn branch_of(
    resolved: &crate::worktree_routes::Resolved,
    active: &watch::Receiver<String>,
) -> String {
    match &resolved.follow {
        Some(rx) => rx.borrow().clone(),
        None => active.borrow().clone(),
    }
}

#[cfg(test)]
mod recent_tests {
    use super::*;

    #[test]
    fn remembers_until_the_ttl_or_forget() {
        let recent = Recent::new(Duration::from_millis(50));
        assert_eq!(recent.get("main"), None);
        recent.put("main", 1);
        recent.put("dev", 2);
        assert_eq!(recent.get("main"), Some(1));
        recent.forget("main");
        assert_eq!(recent.get("main"), None);
        assert_eq!(recent.get("dev"), Some(2), "other branches stay");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(recent.get("dev"), None, "older than the TTL");
    }
}
