//! Routing proxy sessions to Neon branches: the branch's read-write
//! endpoint over TLS, verified for the endpoint's host name, which is also
//! sent as SNI (Neon's proxy routes by it). The client's credentials pass
//! through: a Neon role has the same password on every branch.
//!
//! Neon suspends idle computes and wakes them on connect, which can take a
//! few seconds. The router looks the endpoint up (once per branch and
//! minute, under the branch's gate, so 50 concurrent first connections make
//! one API call), starts it through the API when Neon reports it idle, and
//! waits; the proxy's connect has no timeout shorter than Neon's wake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtwig_neon::{Endpoint, NeonBackend, NeonError};
use pgtwig_proxy::{Route, RouteError, RouteFuture, Router, UpstreamAddr, UpstreamTls};
use tokio::sync::watch;

use crate::router::{wanted_branch, Activity, Recent};

/// How long a looked-up endpoint is used without asking Neon again.
const ENDPOINT_TTL: Duration = Duration::from_secs(60);

pub struct NeonRouter {
    pub backend: Arc<NeonBackend>,
    pub active: watch::Receiver<String>,
    pub activity: Arc<Activity>,
    /// Connect here instead of the endpoint host (`[neon] connect`).
    pub connect: Option<(String, u16)>,
    pub tls: UpstreamTls,
    /// The branch of each work tree, for clients running in one.
    pub worktrees: Arc<crate::worktree_routes::WorktreeRoutes>,
    endpoints: Recent<Endpoint>,
}

impl NeonRouter {
    pub fn new(
        backend: Arc<NeonBackend>,
        active: watch::Receiver<String>,
        activity: Arc<Activity>,
        connect: Option<(String, u16)>,
        tls: UpstreamTls,
        worktrees: Arc<crate::worktree_routes::WorktreeRoutes>,
    ) -> NeonRouter {
        NeonRouter {
            backend,
            active,
            worktrees,
            activity,
            connect,
            tls,
            endpoints: Recent::new(ENDPOINT_TTL),
        }
    }

    /// Forget what is known about `branch` (reset, delete).
    pub fn forget(&self, branch: &str) {
        self.endpoints.forget(branch);
    }

    async fn route_to(&self, branch: String) -> Result<Route, RouteError> {
        let gate = self.activity.gate(&branch);
        let _held = gate.lock().await;
        let endpoint = match self.endpoints.get(&branch) {
            Some(e) => e,
            None => {
                let backend = self.backend.clone();
                let name = branch.clone();
                let started = Instant::now();
                let looked_up = tokio::task::spawn_blocking(move || {
                    let (_, endpoint) = backend.endpoint(&name)?;
                    let woke = backend.wake(&endpoint)?;
                    Ok::<_, NeonError>((endpoint, woke))
                })
                .await
                .map_err(|e| RouteError::Other(format!("looking up branch \"{branch}\": {e}")))?;
                match looked_up {
                    Ok((endpoint, woke)) => {
                        if woke {
                            tracing::info!(
                                "started Neon compute {} of branch \"{branch}\" in {:?}",
                                endpoint.id,
                                started.elapsed()
                            );
                        }
                        self.endpoints.put(&branch, endpoint.clone());
                        endpoint
                    }
                    Err(NeonError::NoBranch { .. }) => {
                        return Err(RouteError::BranchMissing { branch })
                    }
                    Err(e) => {
                        tracing::error!("branch \"{branch}\": {e}");
                        return Err(RouteError::StartFailed {
                            branch,
                            detail: e.to_string(),
                        });
                    }
                }
            }
        };
        let (host, port) = self
            .connect
            .clone()
            .unwrap_or_else(|| (endpoint.host.clone(), 5432));
        let lease = self.activity.lease(&branch);
        Ok(Route {
            branch,
            addr: UpstreamAddr::Tls {
                host,
                port,
                server_name: endpoint.host,
                tls: self.tls.clone(),
            },
            lease: Box::new(lease),
            follow: None,
            scope: None,
        })
    }
}

impl Router for NeonRouter {
    fn route(&self, pinned: Option<&str>) -> RouteFuture<'_> {
        Box::pin(self.route_to(wanted_branch(pinned, &self.active)))
    }

    fn route_client<'a>(
        &'a self,
        pinned: Option<&str>,
        client: &pgtwig_proxy::ClientInfo,
    ) -> RouteFuture<'a> {
        crate::router::route_by_worktree(&self.worktrees, &self.active, pinned, client, |b| {
            Box::pin(self.route_to(b))
        })
    }
}
