//! Scale to zero: stop a branch's server once it has had no sessions for
//! `suspend_timeout`. A server with clients that did not come through the
//! proxy (psql straight to its socket) is left running.

use std::sync::Arc;
use std::time::Duration;

use pgtwig_core::BranchName;
use pgtwig_local::LocalBackend;

use crate::router::Activity;

pub async fn run(
    backend: Arc<LocalBackend>,
    proxy: Arc<pgtwig_proxy::Proxy>,
    activity: Arc<Activity>,
    timeout: Duration,
) {
    if timeout.is_zero() {
        return;
    }
    let tick = (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30));
    loop {
        tokio::time::sleep(tick).await;
        // Branches started by someone else (`pgtwig branch start`) are
        // tracked from when they are first seen running.
        if let Ok(names) = backend.names() {
            for n in names {
                if backend.ready_socket(&n).is_some() {
                    activity.track(n.as_str());
                }
            }
        }
        for (branch, seen) in activity.snapshot() {
            if seen.sessions > 0 || seen.last_seen.elapsed() < timeout {
                continue;
            }
            let gate = activity.gate(&branch);
            let _held = gate.lock().await;
            // Re-check under the gate: a session may have arrived.
            let Some(now) = activity
                .snapshot()
                .into_iter()
                .find(|(b, _)| *b == branch)
                .map(|(_, a)| a)
            else {
                continue;
            };
            if now.sessions > 0 || now.last_seen.elapsed() < timeout {
                continue;
            }
            let Ok(name) = BranchName::parse(&branch) else {
                continue;
            };
            activity.forget_ready(&branch);
            let Some(socket) = backend.ready_socket(&name) else {
                activity.forget(&branch);
                continue;
            };
            // Idle server connections the proxy keeps for reuse are not
            // clients: close them before counting who is connected.
            if proxy.release_pooled(&pgtwig_proxy::UpstreamAddr::Unix(socket.clone())) > 0 {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            match direct_clients(&socket).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::debug!(
                        "branch \"{branch}\" idle through the proxy but has {n} direct client(s)"
                    );
                    continue;
                }
                Err(e) => {
                    tracing::warn!(
                        "cannot check branch \"{branch}\" for clients before suspending: {e}"
                    );
                    continue;
                }
            }
            let b = backend.clone();
            let n2 = name.clone();
            match tokio::task::spawn_blocking(move || b.stop(&n2)).await {
                Ok(Ok(_)) => {
                    tracing::info!(
                        "suspended branch \"{branch}\" after {:?} without sessions",
                        timeout
                    );
                    activity.forget(&branch);
                }
                Ok(Err(e)) => tracing::warn!("suspending branch \"{branch}\": {e}"),
                Err(e) => tracing::warn!("suspending branch \"{branch}\": {e}"),
            }
        }
    }
}

/// Client sessions on the server other than ours.
async fn direct_clients(socket: &std::path::Path) -> Result<i64, tokio_postgres::Error> {
    let dir = socket.parent().unwrap_or(socket);
    let (client, conn) = tokio_postgres::Config::new()
        .host_path(dir)
        .port(pgtwig_local::cluster::PORT)
        .user(pgtwig_local::cluster::SUPERUSER)
        .dbname("postgres")
        .application_name("pgtwig suspend check")
        .connect(tokio_postgres::NoTls)
        .await?;
    tokio::spawn(conn);
    let row = client
        .query_one(
            "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()",
            &[],
        )
        .await?;
    Ok(row.get(0))
}
