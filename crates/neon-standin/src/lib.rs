//! For tests only: a stand-in for Neon's cloud, because no network reaches
//! Neon from the tests. Only the HTTP API is simulated, written from Neon's
//! API v2 reference; every branch's compute is a real PostgreSQL server,
//! reached through an SNI-routing proxy like Neon's.
//!
//! - [`StandIn::api_only`]: the API alone (branches, endpoints, operations,
//!   roles, connection strings); endpoints have hosts but nothing listens.
//! - [`StandIn::with_computes`]: the API, a PostgreSQL server per endpoint
//!   (TLS with a `*.neon.test` certificate from a test CA, SCRAM password
//!   for `neondb_owner`), and the proxy at [`StandIn::proxy_addr`].
//!
//! Modules: [`state`](crate::state) (what the cloud knows, as JSON),
//! `cloud` (create/delete/restore/start/suspend), `api` (the routes),
//! `http` (the HTTP/1.1 server), `compute` (the servers), `sni_proxy`.
//!
//! What is not simulated: point in time (a branch at a timestamp or LSN is
//! accepted and recorded, but copies the parent's current state), read-only
//! endpoints, auto-suspend (tests call [`StandIn::suspend`]), branch
//! expiry (`expires_at` is recorded, nothing is deleted), cancel requests
//! through the proxy, roles and databases beyond `neondb_owner` and
//! `neondb` in API listings, copy-on-write storage (branches are full
//! copies, ~1 s each).
//!
//! A test process killed outright (SIGKILL) leaves its computes running:
//! PostgreSQL has no way to follow its parent's death. Dropping the
//! `StandIn`, panics included, stops them.

mod api;
mod cloud;
mod compute;
mod http;
mod sni_proxy;
mod state;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;

use cloud::{CloudError, Inner, NewBranch};
use state::{State, API_KEY, PASSWORD, PROJECT_ID, ROLE};

/// A running stand-in. Dropping it stops every compute and the servers.
pub struct StandIn {
    inner: Arc<Inner>,
    api_addr: SocketAddr,
    proxy_addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl StandIn {
    /// HTTP API only, no computes: branches get endpoints with hosts but
    /// nothing listens. The root branch "main" is the default branch.
    pub fn api_only() -> StandIn {
        StandIn::start(None)
    }

    /// The API plus a real PostgreSQL compute per endpoint behind the SNI
    /// proxy; `dir` holds data directories, certificates and logs. The root
    /// branch "main" gets a running compute with database `neondb` owned by
    /// `neondb_owner` (password, SCRAM). Panics when the setup fails.
    pub fn with_computes(dir: &Path) -> StandIn {
        StandIn::start(Some(compute::Computes::setup(dir)))
    }

    fn start(computes: Option<compute::Computes>) -> StandIn {
        let inner = Arc::new(Inner::new(State::new(), computes));
        if let Err(e) = inner.create_root() {
            inner.stop_all();
            panic!("neon stand-in: creating the root branch: {e}");
        }
        let stop = Arc::new(AtomicBool::new(false));
        let api = TcpListener::bind("127.0.0.1:0").expect("binding the API port");
        let proxy = TcpListener::bind("127.0.0.1:0").expect("binding the proxy port");
        let (api_addr, proxy_addr) = (
            api.local_addr().expect("API address"),
            proxy.local_addr().expect("proxy address"),
        );
        let handler: http::Handler = {
            let inner = inner.clone();
            Arc::new(move |req| api::handle(&inner, req))
        };
        let threads = vec![
            {
                let stop = stop.clone();
                std::thread::spawn(move || http::serve(api, handler, stop))
            },
            {
                let (inner, stop) = (inner.clone(), stop.clone());
                std::thread::spawn(move || sni_proxy::serve(proxy, inner, stop))
            },
        ];
        StandIn {
            inner,
            api_addr,
            proxy_addr,
            stop,
            threads,
        }
    }

    /// The API's base URL, e.g. `http://127.0.0.1:PORT/api/v2`.
    pub fn api_base(&self) -> String {
        format!("http://{}/api/v2", self.api_addr)
    }

    /// The only API key accepted (`Authorization: Bearer test-key`).
    pub fn api_key(&self) -> &'static str {
        API_KEY
    }

    /// The only project ("forbidden" answers 403, any other id 404).
    pub fn project_id(&self) -> &'static str {
        PROJECT_ID
    }

    /// The SNI-routing "Neon proxy" for every endpoint host.
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_addr
    }

    /// The test CA (PEM) that signed the computes' `*.neon.test`
    /// certificate. Panics in API-only mode (there are no certificates).
    pub fn ca_pem_path(&self) -> PathBuf {
        self.computes("ca_pem_path").ca_pem.clone()
    }

    /// The role and password of every branch (`neondb_owner`, …).
    pub fn role(&self) -> (&'static str, &'static str) {
        (ROLE, PASSWORD)
    }

    /// A libpq URL straight to the branch's compute (TCP, `sslmode=require`),
    /// bypassing the proxy, for test assertions. Starts the compute if it
    /// is suspended (that counts in [`compute_starts`](Self::compute_starts)).
    pub fn direct_url(&self, branch_name: &str, database: &str) -> String {
        self.computes("direct_url");
        let ep = self.endpoint_of(branch_name);
        let port = self
            .inner
            .ensure_running(&ep, false)
            .unwrap_or_else(|e| panic!("starting {branch_name}: {}", message(e)))
            .expect("computes mode");
        format!("postgresql://{ROLE}:{PASSWORD}@127.0.0.1:{port}/{database}?sslmode=require")
    }

    /// `"METHOD /target"` of every API request so far, in order (the target
    /// as sent, e.g. `GET /api/v2/projects/proj-1/branches?limit=100`).
    pub fn requests(&self) -> Vec<String> {
        self.inner.lock().requests.clone()
    }

    /// Answer the next `n` requests (after authentication) with 429 and
    /// `Retry-After: 1`.
    pub fn throttle(&self, n: u32) {
        self.inner.lock().throttle = n;
    }

    /// Answer the next request (after authentication and throttling) 503.
    pub fn fail_once(&self) {
        self.inner.lock().fail_once = true;
    }

    /// Stop the branch's compute; its endpoint's `current_state` becomes
    /// "idle" until the proxy (or `POST …/start`, or `direct_url`) wakes it.
    pub fn suspend(&self, branch_name: &str) {
        let ep = self.endpoint_of(branch_name);
        if let Err(e) = self.inner.suspend(&ep) {
            panic!("suspending {branch_name}: {}", message(e));
        }
    }

    /// Delete the branch's compute, as Neon's "Delete compute" does: the
    /// branch and its data stay, with no endpoint to connect to.
    pub fn remove_compute(&self, branch_name: &str) {
        self.suspend(branch_name);
        let ep = self.endpoint_of(branch_name);
        self.inner.lock().endpoints.retain(|e| e.id != ep);
    }

    /// How many times the branch's compute was started: its first start at
    /// creation (or a restore's restart) and every wake after a suspend.
    /// In API-only mode, every change of the endpoint from idle to active.
    pub fn compute_starts(&self, branch_name: &str) -> usize {
        let ep = self.endpoint_of(branch_name);
        self.inner.lock().endpoint(&ep).map_or(0, |e| e.starts)
    }

    /// The extra delay the proxy adds when it wakes a suspended compute
    /// (default 500 ms), on top of the server's real start time.
    pub fn set_cold_start(&self, d: Duration) {
        self.inner.lock().cold_start = d;
    }

    /// Every branch's name, in creation order.
    pub fn branch_names(&self) -> Vec<String> {
        self.inner
            .lock()
            .branches
            .iter()
            .map(|b| b.name.clone())
            .collect()
    }

    /// Create a branch (of `parent`'s name, else of the default branch)
    /// with a read-write endpoint, as `POST /branches` does but without an
    /// HTTP request: to seed a project, e.g. many branches for pagination.
    /// Returns the branch id.
    pub fn create_branch(&self, name: &str, parent: Option<&str>) -> String {
        let parent_id =
            parent.map(|p| self.branch_id(p).unwrap_or_else(|| panic!("no branch {p}")));
        let (branch, _, _) = self
            .inner
            .create_branch(NewBranch {
                name: Some(name.to_string()),
                parent_id,
                parent_timestamp: None,
                parent_lsn: None,
                expires_at: None,
                endpoint: Some(300),
            })
            .unwrap_or_else(|e| panic!("creating branch {name}: {}", message(e)));
        branch["id"].as_str().expect("an id").to_string()
    }

    /// The id of the branch called `name`.
    pub fn branch_id(&self, name: &str) -> Option<String> {
        self.inner.lock().branch_by_name(name).map(|b| b.id.clone())
    }

    /// The branch as the API shows it (Neon's Branch object), including
    /// what was recorded from the request (`parent_timestamp`, `parent_lsn`,
    /// `expires_at`).
    pub fn branch_json(&self, name: &str) -> Option<Value> {
        self.inner
            .lock()
            .branch_by_name(name)
            .map(state::branch_json)
    }

    /// The endpoint host of the branch (`ep-….neon.test`): the TLS server
    /// name to connect to [`proxy_addr`](Self::proxy_addr) with.
    pub fn endpoint_host(&self, branch_name: &str) -> Option<String> {
        let s = self.inner.lock();
        let b = s.branch_by_name(branch_name)?;
        s.endpoint_of(&b.id).map(|e| e.host())
    }

    /// Every restore so far, as `"<branch id><-<source branch id>"`.
    pub fn restored(&self) -> Vec<String> {
        self.inner.lock().restored.clone()
    }

    /// How many branches a page of `GET /branches` holds at most (default 2,
    /// so clients must follow cursors; a smaller `limit` wins).
    pub fn set_page_size(&self, n: usize) {
        self.inner.lock().page_size = n.max(1);
    }

    /// The branch's data directory (computes mode), e.g. to check a delete
    /// removed it.
    pub fn data_dir(&self, branch_name: &str) -> Option<PathBuf> {
        self.inner
            .lock()
            .branch_by_name(branch_name)
            .and_then(|b| b.data.clone())
    }

    fn endpoint_of(&self, branch_name: &str) -> String {
        let s = self.inner.lock();
        let b = s
            .branch_by_name(branch_name)
            .unwrap_or_else(|| panic!("neon stand-in: no branch {branch_name}"));
        s.endpoint_of(&b.id)
            .unwrap_or_else(|| panic!("neon stand-in: branch {branch_name} has no endpoint"))
            .id
            .clone()
    }

    fn computes(&self, what: &str) -> &compute::Computes {
        self.inner
            .computes
            .as_ref()
            .unwrap_or_else(|| panic!("{what} needs StandIn::with_computes"))
    }
}

fn message(e: CloudError) -> String {
    match e {
        CloudError::BadRequest(m)
        | CloudError::NotFound(m)
        | CloudError::Conflict(m)
        | CloudError::Internal(m) => m,
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocked accepts so the threads see `stop`.
        for addr in [self.api_addr, self.proxy_addr] {
            let _ = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        }
        self.inner.stop_all();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}
