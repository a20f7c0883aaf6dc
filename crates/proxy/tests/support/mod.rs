//! Test support: real PostgreSQL 15 clusters ("branches") and a test router.
//!
//! Tests run as root here; initdb and postgres refuse root, so when the effective uid is 0 the
//! server binaries run as the `postgres` user and the cluster directory is chowned to it.
#![allow(dead_code)]

pub mod pgtls;

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgtwig_proxy::{
    OnSwitch, Proxy, ProxyConfig, Route, RouteError, RouteFuture, Router, UpstreamAddr,
};
use tokio::sync::watch;

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// (uid, gid) to run server binaries as, when we are root. Looked up once: tests start
/// clusters from several threads, and `getpwnam`'s static buffer is not thread-safe (CI once
/// chowned a socket directory to a uid read mid-overwrite, and PostgreSQL could not lock it).
fn server_user() -> Option<(u32, u32)> {
    static SERVER_USER: std::sync::OnceLock<Option<(u32, u32)>> = std::sync::OnceLock::new();
    *SERVER_USER.get_or_init(|| {
        if !nix::unistd::geteuid().is_root() {
            return None;
        }
        let user = nix::unistd::User::from_name("postgres")
            .expect("look up the `postgres` user")
            .expect("running as root needs a `postgres` user");
        Some((user.uid.as_raw(), user.gid.as_raw()))
    })
}

fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn chown(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

/// A free loopback TCP port (not 5432).
pub fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port != 5432 {
            return port;
        }
    }
}

/// A running PostgreSQL 15 cluster listening on a Unix socket only, with a table
/// `marker(branch text)` holding its name. Stopped (SIGINT) and removed on drop.
pub struct Cluster {
    pub name: String,
    pub dir: PathBuf,
    pub sock_dir: PathBuf,
    pub port: u16,
    child: Child,
}

impl Cluster {
    pub fn start(name: &str) -> Cluster {
        Cluster::start_with(name, |_| {}, &[])
    }

    /// Like [`start`](Self::start), with `prepare(data_dir)` run after initdb
    /// (as root; files it writes are given to the server user) and extra
    /// `-c` settings, e.g. TLS on a loopback TCP port.
    pub fn start_with(name: &str, prepare: impl FnOnce(&Path), extra: &[&str]) -> Cluster {
        let base = tempfile::Builder::new()
            .prefix("pgtwig-proxy-test-")
            .tempdir_in("/tmp")
            .unwrap()
            .keep();
        chown(&base);
        let data = base.join("data");
        let sock_dir = base.join("s");
        std::fs::create_dir(&sock_dir).unwrap();
        chown(&sock_dir);
        let out = as_server_user(
            Command::new(format!("{PG_BIN}/initdb"))
                .args([
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "-N",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "-D",
                ])
                .arg(&data),
        )
        .output()
        .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        prepare(&data);
        if let Ok(entries) = std::fs::read_dir(&data) {
            for e in entries.flatten() {
                chown(&e.path());
            }
        }
        let port = free_port();
        let log = std::fs::File::create(base.join("log")).unwrap();
        chown(&base.join("log"));
        let child = as_server_user(
            Command::new(format!("{PG_BIN}/postgres"))
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock_dir)
                .args(["-p", &port.to_string()])
                .args([
                    "-c",
                    "listen_addresses=",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_connections=40",
                ])
                .args(["-c", &format!("cluster_name={name}")])
                .args(extra.iter().flat_map(|e| ["-c", e]))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log),
        )
        .spawn()
        .unwrap();
        let c = Cluster {
            name: name.to_string(),
            dir: base,
            sock_dir,
            port,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = Command::new("pg_isready")
                .arg("-h")
                .arg(&c.sock_dir)
                .args(["-p", &port.to_string(), "-q"])
                .status()
                .unwrap()
                .success();
            if ok {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{name} did not start: {}",
                c.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        c.psql(&format!(
            "create table marker(branch text); insert into marker values ('{name}')"
        ));
        c
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    pub fn socket_path(&self) -> PathBuf {
        self.sock_dir.join(format!(".s.PGSQL.{}", self.port))
    }

    pub fn addr(&self) -> UpstreamAddr {
        UpstreamAddr::Unix(self.socket_path())
    }

    /// Runs SQL directly (not through the proxy) and returns unaligned tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg("-h")
            .arg(&self.sock_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "psql on {}: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGINT);
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Routes by branch name to a fixed table; counts calls and live leases.
pub struct TestRouter {
    pub active: watch::Receiver<String>,
    pub branches: Mutex<HashMap<String, Result<UpstreamAddr, RouteError>>>,
    pub calls: AtomicUsize,
    pub leases: Arc<AtomicUsize>,
    /// Addresses handed out before the real ones, as a cache of a server since stopped
    /// would: `unreachable` forgets them.
    pub stale: Mutex<HashMap<String, UpstreamAddr>>,
}

pub struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Router for TestRouter {
    fn route(&self, pinned: Option<&str>) -> RouteFuture<'_> {
        let branch = pinned
            .map(str::to_string)
            .unwrap_or_else(|| self.active.borrow().clone());
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let stale = self.stale.lock().unwrap().get(&branch).cloned();
            let entry = stale
                .map(Ok)
                .or_else(|| self.branches.lock().unwrap().get(&branch).cloned());
            match entry {
                None => Err(RouteError::BranchMissing { branch }),
                Some(Err(e)) => Err(e),
                Some(Ok(addr)) => {
                    self.leases.fetch_add(1, Ordering::SeqCst);
                    Ok(Route {
                        branch,
                        addr,
                        lease: Box::new(Lease(self.leases.clone())),
                        follow: None,
                        scope: None,
                    })
                }
            }
        })
    }

    fn unreachable(&self, route: &Route) -> bool {
        let mut stale = self.stale.lock().unwrap();
        let held = stale.get(&route.branch) == Some(&route.addr);
        if held {
            stale.remove(&route.branch);
        }
        held
    }
}

/// Two clusters ("main", "feature") behind a proxy on a free loopback port.
pub struct Env {
    pub main: Cluster,
    pub feature: Cluster,
    pub proxy: Arc<Proxy>,
    pub router: Arc<TestRouter>,
    pub active: watch::Sender<String>,
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Env {
    pub async fn start(config: ProxyConfig) -> Env {
        let (main, feature) = tokio::task::spawn_blocking(|| {
            let f = std::thread::spawn(|| Cluster::start("feature"));
            (Cluster::start("main"), f.join().unwrap())
        })
        .await
        .unwrap();
        Self::with_clusters(config, main, feature).await
    }

    pub async fn with_clusters(config: ProxyConfig, main: Cluster, feature: Cluster) -> Env {
        let (tx, rx) = watch::channel("main".to_string());
        let mut branches = HashMap::new();
        branches.insert("main".to_string(), Ok(main.addr()));
        branches.insert("feature".to_string(), Ok(feature.addr()));
        let router = Arc::new(TestRouter {
            active: rx.clone(),
            branches: Mutex::new(branches),
            calls: AtomicUsize::new(0),
            leases: Arc::new(AtomicUsize::new(0)),
            stale: Mutex::default(),
        });
        let proxy = Arc::new(Proxy::new(config, router.clone(), rx));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn({
            let proxy = proxy.clone();
            async move {
                proxy.serve(listener).await.unwrap();
            }
        });
        Env {
            main,
            feature,
            proxy,
            router,
            active: tx,
            port,
            task,
        }
    }

    pub fn conninfo(&self, dbname: &str) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname={dbname} sslmode=disable",
            self.port
        )
    }

    /// tokio-postgres connection through the proxy; the connection task's result is returned
    /// by the handle.
    pub async fn connect(
        &self,
        dbname: &str,
    ) -> (
        tokio_postgres::Client,
        tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    ) {
        let (client, conn) = tokio_postgres::connect(&self.conninfo(dbname), tokio_postgres::NoTls)
            .await
            .unwrap();
        (client, tokio::spawn(conn))
    }

    /// psql through the proxy (`conninfo` extra keywords appended).
    pub async fn psql(&self, extra: &str, sql: &str) -> std::process::Output {
        tokio::process::Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres {extra}",
                self.port
            ))
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .output()
            .await
            .unwrap()
    }

    /// Runs `sql` through psql like [`Env::psql`], asserts it succeeded (showing psql's
    /// errors if not) and returns its output, trimmed.
    pub async fn psql_ok(&self, extra: &str, sql: &str) -> String {
        let out = self.psql(extra, sql).await;
        assert!(
            out.status.success(),
            "psql \"{extra}\" -c \"{sql}\" failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// After misbehaving clients: waits until the proxy is drained, this process is back to
    /// at most `baseline_fds` open file descriptors, and the main server has no client
    /// backends but the proxy's parked, reusable connections. Panics after 5 s of each with
    /// what is left (and `context`).
    pub async fn assert_nothing_leaked(&self, baseline_fds: usize, context: &str) {
        self.wait_drained().await;
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let now = fd_count();
            // A parked, reusable server connection holds its socket: whether a clean
            // client exit left one depends on how its Terminate arrived. The peer lookup
            // keeps its netlink socket for the next connection, the relay's ring thread its
            // ring and eventfd.
            let kept = self.proxy.pooled_connections()
                + pgtwig_proxy::peer::kept_descriptors()
                + pgtwig_proxy::ring_kept_descriptors();
            if now <= baseline_fds + kept {
                break;
            }
            if Instant::now() > deadline {
                let fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
                    .unwrap()
                    .map(|e| format!("{:?}", std::fs::read_link(e.unwrap().path())))
                    .collect();
                panic!(
                    "fd count {now} did not return to {baseline_fds}: {fds:?}, pooled {}\n{context}",
                    self.proxy.pooled_connections()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let q = "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()";
        while self.main.psql(q) != self.proxy.pooled_connections().to_string() {
            assert!(
                Instant::now() < deadline,
                "server backends left: {}",
                self.main.psql("select query from pg_stat_activity")
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (5 s at most) until the proxy keeps `n` server connections for reuse.
    pub async fn wait_pooled(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.proxy.pooled_connections() != n {
            assert!(
                Instant::now() < deadline,
                "{} pooled connections, expected {n}",
                self.proxy.pooled_connections()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the proxy has no sessions and the router no leases.
    pub async fn wait_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !(self.proxy.sessions().is_empty()
            && self.router.leases.load(Ordering::SeqCst) == 0
            && self.proxy.cancel_keys() == 0)
        {
            assert!(
                Instant::now() < deadline,
                "sessions not drained: {:?}, leases {}",
                self.proxy.sessions(),
                self.router.leases.load(Ordering::SeqCst)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn config() -> ProxyConfig {
    ProxyConfig {
        on_switch: OnSwitch::CloseIdle,
        ..ProxyConfig::default()
    }
}

/// The SQLSTATE of a tokio-postgres error.
pub fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("no SQLSTATE: {e}"))
}

/// Reads backend messages from a raw stream until EOF; returns them as (type, body).
pub async fn read_messages<R: tokio::io::AsyncRead + Unpin>(r: &mut R) -> Vec<(u8, Vec<u8>)> {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut all)).await;
    split_messages(&all)
}

pub fn split_messages(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 5 {
        let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
        if b.len() < 1 + len {
            break;
        }
        out.push((b[0], b[5..1 + len].to_vec()));
        b = &b[1 + len..];
    }
    out
}

/// Fields of an ErrorResponse body by tag.
pub fn error_fields(body: &[u8]) -> HashMap<u8, String> {
    let mut out = HashMap::new();
    let mut b = body;
    while let Some((&tag, rest)) = b.split_first() {
        if tag == 0 {
            break;
        }
        let end = rest.iter().position(|&c| c == 0).unwrap();
        out.insert(tag, String::from_utf8_lossy(&rest[..end]).into_owned());
        b = &rest[end + 1..];
    }
    out
}

/// Open file descriptors of this process.
pub fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").unwrap().count()
}

/// First column of the first row of `sql`, run with the simple query protocol.
pub async fn simple_value(client: &tokio_postgres::Client, sql: &str) -> String {
    let msgs = client.simple_query(sql).await.unwrap();
    msgs.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .unwrap()
}
