//! Computes: one real PostgreSQL server per endpoint, each on its own
//! loopback port with TLS (a `*.neon.test` certificate from a test CA) and
//! SCRAM passwords, like a Neon compute behind Neon's proxy.
//!
//! A branch's data is a plain data directory. A new branch copies its
//! parent's current state: `pg_basebackup` when the parent runs (consistent
//! without stopping it), a file copy when it is stopped. That is a full
//! copy where Neon shares pages copy-on-write, and it is always the
//! parent's *current* state: point in time is not simulated.
//!
//! Administration (roles, base backups) goes over a Unix socket with
//! `trust`, as the superuser `cloud_admin` (Neon's name for it); TCP only
//! takes TLS with a password.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use pgtwig_local::cluster;
use pgtwig_local::pgbin::{self, PgInstall};
use pgtwig_local::server_user::ServerUser;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};

use crate::state::{DATABASE, PASSWORD, ROLE};

/// The superuser of every compute, reached only over the Unix socket.
pub const ADMIN: &str = "cloud_admin";

const START_TIMEOUT: Duration = Duration::from_secs(60);
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// Appended to the root compute's `postgresql.conf`; copies inherit it.
/// Small and unsynced: these are throwaway test servers, always stopped
/// cleanly, and many may run at once on a small machine.
const SETTINGS: &str = "
# --- pgtwig neon stand-in compute ---
ssl = on
password_encryption = 'scram-sha-256'
fsync = off
synchronous_commit = off
shared_buffers = 16MB
max_connections = 40
max_wal_senders = 4
max_wal_size = 256MB
dynamic_shared_memory_type = posix
log_line_prefix = '%m [%p] %q%u@%d '
";

/// TCP takes only TLS with a SCRAM password, as Neon's computes do; the
/// Unix socket (a private folder) trusts, for the stand-in's own use.
const HBA: &str = "\
# --- pgtwig neon stand-in: TLS + SCRAM over TCP, trust on the private socket ---
local   all          all                    trust
local   replication  all                    trust
hostssl all          all    127.0.0.1/32    scram-sha-256
";

pub struct Computes {
    pg: PgInstall,
    user: ServerUser,
    /// Branch data directories (the server user's).
    data_root: PathBuf,
    logs: PathBuf,
    /// Short, under /tmp: a socket path is limited to ~107 bytes.
    socket_dir: tempfile::TempDir,
    pub ca_pem: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn fail(what: impl std::fmt::Display, e: impl std::fmt::Display) -> String {
    format!("{what}: {e}")
}

impl Computes {
    /// Find the binaries, decide the server user, lay out `dir` and write
    /// the certificates. Panics with what to fix: this is test setup.
    pub fn setup(dir: &Path) -> Computes {
        let pg = pgbin::for_major(15)
            .or_else(|_| pgbin::newest())
            .unwrap_or_else(|e| panic!("neon stand-in: {e}"));
        fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        let dir = fs::canonicalize(dir).expect("canonical dir");
        let user = ServerUser::resolve(&dir).unwrap_or_else(|e| panic!("neon stand-in: {e}"));
        make_traversable(&user, &dir);
        let data_root = dir.join("data");
        let logs = dir.join("logs");
        let tls = dir.join("tls");
        for d in [&data_root, &logs, &tls] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("creating {}: {e}", d.display()));
        }
        fs::set_permissions(&data_root, fs::Permissions::from_mode(0o700)).expect("chmod data");
        user.own(&data_root).expect("chown data");
        let socket_dir = tempfile::Builder::new()
            .prefix("pgtwig-neon-")
            .tempdir_in("/tmp")
            .expect("socket dir");
        user.own(socket_dir.path()).expect("chown socket dir");
        let (ca_pem, cert, key) = write_certificates(&user, &tls);
        Computes {
            pg,
            user,
            data_root,
            logs,
            socket_dir,
            ca_pem,
            cert,
            key,
        }
    }

    /// Where the data directory of a branch's `generation`-th copy lives.
    pub fn data_dir(&self, branch_id: &str, generation: u64) -> PathBuf {
        self.data_root.join(format!("{branch_id}-{generation}"))
    }

    fn log_for(&self, data: &Path) -> PathBuf {
        let name = data.file_name().map(|n| n.to_string_lossy().into_owned());
        self.logs.join(format!("{}.log", name.unwrap_or_default()))
    }

    /// initdb the root branch, start it, create `neondb_owner` and `neondb`.
    /// Returns the port it runs on.
    pub fn init_root(&self, data: &Path) -> Result<u16, String> {
        let out = self
            .user
            .command(&self.pg.bin("initdb"))
            .arg("-D")
            .arg(data)
            .args(["-U", ADMIN, "--auth=trust", "--encoding=UTF8", "--locale=C"])
            // Unsynced: saves most of initdb's time, and it is a test server.
            .args(["--no-sync", "--no-instructions"])
            .env_remove("PGDATA")
            .stdin(Stdio::null())
            .output()
            .map_err(|e| fail("running initdb", e))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let conf = data.join("postgresql.conf");
        let mut text = fs::read_to_string(&conf).map_err(|e| fail("reading postgresql.conf", e))?;
        text.push_str(SETTINGS);
        text.push_str(&format!(
            "ssl_cert_file = '{}'\nssl_key_file = '{}'\n",
            self.cert.display(),
            self.key.display()
        ));
        fs::write(&conf, text).map_err(|e| fail("writing postgresql.conf", e))?;
        fs::write(data.join("pg_hba.conf"), HBA).map_err(|e| fail("writing pg_hba.conf", e))?;
        let port = self.start(data)?;
        // Neon's owner role is no superuser: it belongs to neon_superuser,
        // which holds the predefined roles an application owner needs.
        // One statement at a time: CREATE DATABASE refuses to run in the
        // implicit transaction of a multi-statement query.
        let statements = [
            "CREATE ROLE neon_superuser NOLOGIN CREATEDB CREATEROLE".to_string(),
            "GRANT pg_read_all_data, pg_write_all_data, pg_monitor, pg_signal_backend \
             TO neon_superuser WITH ADMIN OPTION"
                .to_string(),
            format!(
                "CREATE ROLE {ROLE} LOGIN CREATEDB CREATEROLE PASSWORD '{PASSWORD}' \
                 IN ROLE neon_superuser"
            ),
            format!("CREATE DATABASE {DATABASE} OWNER {ROLE}"),
        ];
        let mut admin = self.admin(port, "postgres")?;
        for sql in &statements {
            admin
                .batch_execute(sql)
                .map_err(|e| fail(format!("running {sql:?}"), pg_error(&e)))?;
        }
        Ok(port)
    }

    /// A superuser session over the Unix socket.
    pub fn admin(&self, port: u16, database: &str) -> Result<postgres::Client, String> {
        postgres::Config::new()
            .host_path(self.socket_dir.path())
            .port(port)
            .user(ADMIN)
            .dbname(database)
            .application_name("neon-standin")
            .connect(postgres::NoTls)
            .map_err(|e| fail("connecting over the Unix socket", pg_error(&e)))
    }

    /// Start the compute of `data` on a free loopback port; returns the port.
    pub fn start(&self, data: &Path) -> Result<u16, String> {
        let log = self.log_for(data);
        let mut last = String::new();
        // Another process may take the free port before the server binds it.
        for _ in 0..3 {
            let port = free_port();
            let settings = [
                format!("port={port}"),
                "listen_addresses=127.0.0.1".to_string(),
            ];
            let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
            match cluster::start_with(
                &self.pg,
                &self.user,
                data,
                self.socket_dir.path(),
                &log,
                START_TIMEOUT,
                &settings,
            ) {
                Ok(()) => return Ok(port),
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }

    /// Stop the compute of `data` (fast shutdown: sessions end) if it runs.
    pub fn stop(&self, data: &Path) -> Result<(), String> {
        cluster::stop(data, &self.log_for(data), STOP_TIMEOUT).map_err(|e| e.to_string())
    }

    /// Make `dst` a copy of `src`'s current state. `running` is the port of
    /// `src`'s compute when it runs.
    pub fn copy(&self, src: &Path, running: Option<u16>, dst: &Path) -> Result<(), String> {
        let out = match running {
            // Streams the WAL written meanwhile, so the copy is consistent;
            // a fast checkpoint, and no fsync (test servers).
            Some(port) => self
                .user
                .command(&self.pg.bin("pg_basebackup"))
                .arg("-h")
                .arg(self.socket_dir.path())
                .args(["-p", &port.to_string(), "-U", ADMIN])
                .arg("-D")
                .arg(dst)
                .args(["-X", "stream", "-c", "fast", "--no-sync"])
                .stdin(Stdio::null())
                .output(),
            // A cleanly stopped data directory is consistent as it is;
            // `cp -a` keeps owners and modes (and reflinks where it can).
            None => Command::new("cp")
                .args(["-a", "--reflink=auto"])
                .arg(src)
                .arg(dst)
                .stdin(Stdio::null())
                .output(),
        }
        .map_err(|e| fail("copying a branch", e))?;
        if !out.status.success() {
            let _ = fs::remove_dir_all(dst);
            return Err(format!(
                "copying {} to {} failed: {}",
                src.display(),
                dst.display(),
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(())
    }

    /// Stop and delete a data directory.
    pub fn remove(&self, data: &Path) -> Result<(), String> {
        self.stop(data)?;
        match fs::remove_dir_all(data) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(fail(format!("removing {}", data.display()), e))
            }
            _ => Ok(()),
        }
    }
}

/// A client error with the server's message (`Display` alone says "db error").
fn pg_error(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// A free loopback port, never 5432 (a real local server may want it).
fn free_port() -> u16 {
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("binding a loopback port");
        let port = l.local_addr().expect("local addr").port();
        if port != 5432 {
            return port;
        }
    }
}

/// Tests hand us fresh temporary folders (mode 0700, root's): let the
/// server user pass through `dir`, and through its ancestors inside the
/// temporary folder that we own (execute only, no listing). Folders
/// elsewhere (a home folder, say) are not ours to open up: if the server
/// user cannot reach `dir` through them, say so.
fn make_traversable(user: &ServerUser, dir: &Path) {
    if !user.switch {
        return;
    }
    let me = nix::unistd::geteuid().as_raw();
    let tmp = fs::canonicalize(std::env::temp_dir()).unwrap_or_else(|_| "/tmp".into());
    let mut cur = Some(dir);
    while let Some(p) = cur {
        if p != dir && (!p.starts_with(&tmp) || p == tmp) {
            break;
        }
        if let Ok(meta) = fs::metadata(p) {
            if meta.uid() == me && meta.mode() & 0o001 == 0 {
                let mode = (meta.mode() & 0o7777) | 0o001;
                let _ = fs::set_permissions(p, fs::Permissions::from_mode(mode));
            }
        }
        cur = p.parent();
    }
    user.check_reachable(dir)
        .unwrap_or_else(|e| panic!("neon stand-in: {e}"));
}

/// A test CA and a `*.neon.test` server certificate signed by it. Returns
/// (CA PEM, server certificate, server key) paths.
fn write_certificates(user: &ServerUser, tls: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgtwig neon stand-in CA");
    let ca_key = KeyPair::generate().expect("CA key");
    let ca = ca_params.self_signed(&ca_key).expect("CA certificate");
    // Neon computes answer for their endpoint host; the IP and localhost let
    // a test verify a direct connection too.
    let names = ["*.neon.test", "localhost", "127.0.0.1"].map(String::from);
    let mut srv_params = CertificateParams::new(names.to_vec()).expect("server params");
    srv_params
        .distinguished_name
        .push(DnType::CommonName, "*.neon.test");
    let srv_key = KeyPair::generate().expect("server key");
    let srv = srv_params
        .signed_by(&srv_key, &ca, &ca_key)
        .expect("server certificate");
    let (ca_pem, cert, key) = (
        tls.join("ca.pem"),
        tls.join("server.crt"),
        tls.join("server.key"),
    );
    fs::write(&ca_pem, ca.pem()).expect("writing ca.pem");
    fs::write(&cert, srv.pem()).expect("writing server.crt");
    fs::write(&key, srv_key.serialize_pem()).expect("writing server.key");
    // PostgreSQL refuses a key others can read; it must be the server's.
    fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod key");
    user.own(&key).expect("chown key");
    for f in [&ca_pem, &cert] {
        fs::set_permissions(f, fs::Permissions::from_mode(0o644)).expect("chmod cert");
    }
    fs::set_permissions(tls, fs::Permissions::from_mode(0o755)).expect("chmod tls");
    (ca_pem, cert, key)
}
