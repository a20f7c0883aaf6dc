//! One managed PostgreSQL cluster: create it, start it, stop it, ask it.
//!
//! pgtwig runs `postgres` itself rather than through `pg_ctl`: pg_ctl polls
//! readiness every 100 ms, which alone would eat a third of the cold-start
//! budget. Readiness is read the same way pg_ctl reads it, from line 8 of
//! `postmaster.pid` ("ready"), polled every few milliseconds.
//!
//! Servers listen only on a Unix socket in a private runtime folder (see
//! [`socket_dir_for`]), never on TCP: the proxy is the way in.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use pgtwig_core::private;

use crate::pgbin::PgInstall;
use crate::server_user::ServerUser;

/// The superuser every managed cluster is created with.
pub const SUPERUSER: &str = "postgres";
/// Every branch listens on its own socket folder, so all can use one port
/// number; the socket file is `<dir>/.s.PGSQL.5432`.
pub const PORT: u16 = 5432;

/// Settings appended to `postgresql.conf` by `pgtwig init`. Small, because
/// a laptop runs many branches; WAL kept so a live clone finds the WAL it
/// needs (see `crate::backup`).
const MANAGED_SETTINGS: &str = "
# --- pgtwig managed cluster ---
# Reached only through its Unix socket (folder given at start) and the pgtwig proxy.
listen_addresses = ''
shared_buffers = 64MB
max_connections = 100
# Live clones replay WAL from the backup start: keep enough of it.
wal_keep_size = 256MB
max_wal_size = 1GB
# A branch must start fast and stay small.
max_wal_senders = 2
dynamic_shared_memory_type = posix
log_line_prefix = '%m [%p] %q%u@%d '
";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{program} failed ({status}):\n{output}")]
    Command {
        program: String,
        status: String,
        output: String,
    },
    #[error("the server for {data_dir} did not start: {why}\n--- last lines of {log} ---\n{tail}")]
    StartFailed {
        data_dir: PathBuf,
        log: PathBuf,
        why: String,
        tail: String,
    },
    #[error("the server for {data_dir} (pid {pid}) did not stop within {secs} s; see {log}")]
    StopTimeout {
        data_dir: PathBuf,
        pid: i32,
        secs: u64,
        log: PathBuf,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ClusterError {
    let what = what.into();
    move |source| ClusterError::Io { what, source }
}

/// How pgtwig itself connects to a managed server: its socket folder, the
/// superuser, no password (trust on a private socket). `app` names the
/// session in `pg_stat_activity`.
pub fn client_config(socket_dir: &Path, database: &str, app: &str) -> postgres::Config {
    let mut config = postgres::Config::new();
    config
        .host_path(socket_dir)
        .port(PORT)
        .user(SUPERUSER)
        .dbname(database)
        .application_name(app);
    config
}

/// Run `initdb` for a new cluster in `data_dir` (which must not exist).
pub fn initdb(
    pg: &PgInstall,
    user: &ServerUser,
    data_dir: &Path,
    log: &Path,
) -> Result<(), ClusterError> {
    fs::create_dir(data_dir).map_err(io_err(format!("creating {}", data_dir.display())))?;
    fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700))
        .map_err(io_err("setting mode"))?;
    user.own(data_dir).map_err(io_err(format!(
        "giving {} to {}",
        data_dir.display(),
        user.name
    )))?;
    let out = user
        .command(&pg.bin("initdb"))
        .arg("-D")
        .arg(data_dir)
        .args([
            "-U",
            SUPERUSER,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-instructions",
        ])
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .output()
        .map_err(io_err(format!("running {}", pg.bin("initdb").display())))?;
    {
        use std::io::Write;
        let mut log_file = private::open_append(log).map_err(io_err("cannot open the log"))?;
        let _ = log_file.write_all(&[&out.stdout[..], &out.stderr[..]].concat());
    }
    if !out.status.success() {
        return Err(ClusterError::Command {
            program: "initdb".into(),
            status: out.status.to_string(),
            output: String::from_utf8_lossy(&[&out.stdout[..], &out.stderr[..]].concat())
                .into_owned(),
        });
    }
    // Appended, not read back and rewritten: the data directory is the
    // server user's, and pgtwig may be root (no link followed either).
    private::write_file(
        &data_dir.join("postgresql.conf"),
        MANAGED_SETTINGS.as_bytes(),
        private::WriteMode::Append,
        user.owner(),
    )
    .map_err(io_err("writing postgresql.conf"))?;
    Ok(())
}

/// What `postmaster.pid` says about a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Stopped,
    /// A live postmaster; `ready` once it accepts connections.
    Running {
        pid: i32,
        socket_dir: PathBuf,
        port: u16,
        ready: bool,
    },
}

impl Status {
    pub fn is_running(&self) -> bool {
        matches!(self, Status::Running { .. })
    }
}

/// Read `postmaster.pid` (lines: pid, data dir, start time, port, socket
/// dir, listen address, shmem key, status) and check the pid is alive.
pub fn status(data_dir: &Path) -> Status {
    let Ok(text) = fs::read_to_string(data_dir.join("postmaster.pid")) else {
        return Status::Stopped;
    };
    let lines: Vec<&str> = text.lines().collect();
    let Some(pid) = lines.first().and_then(|l| l.trim().parse::<i32>().ok()) else {
        // Being written right now by a starting postmaster.
        return Status::Running {
            pid: 0,
            socket_dir: PathBuf::new(),
            port: PORT,
            ready: false,
        };
    };
    // Signal 0 only: status() is on the proxy's per-connection path. A
    // postmaster pgtwig started is reaped by a thread the moment it exits,
    // so a zombie does not linger here; stop() checks for one anyway.
    if !matches!(
        kill(Pid::from_raw(pid), None),
        Ok(()) | Err(nix::errno::Errno::EPERM)
    ) {
        return Status::Stopped;
    }
    Status::Running {
        pid,
        port: lines
            .get(3)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or(PORT),
        socket_dir: PathBuf::from(lines.get(4).map(|l| l.trim()).unwrap_or("")),
        ready: lines.get(7).is_some_and(|l| l.trim() == "ready"),
    }
}

fn process_alive(pid: i32) -> bool {
    match kill(Pid::from_raw(pid), None) {
        Ok(()) => !is_zombie(pid),
        Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// A zombie postmaster (exited, not yet reaped by its parent) is stopped.
fn is_zombie(pid: i32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
        .unwrap_or(false)
}

/// Start the cluster and wait until it accepts connections.
pub fn start(
    pg: &PgInstall,
    user: &ServerUser,
    data_dir: &Path,
    socket_dir: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<(), ClusterError> {
    start_with(pg, user, data_dir, socket_dir, log, timeout, &[])
}

/// [`start`] with extra `-c name=value` settings for this run only.
pub fn start_with(
    pg: &PgInstall,
    user: &ServerUser,
    data_dir: &Path,
    socket_dir: &Path,
    log: &Path,
    timeout: Duration,
    settings: &[&str],
) -> Result<(), ClusterError> {
    let spec = ServerSpec {
        pg,
        user,
        data_dir,
        socket_dir,
        log,
    };
    start_server(&spec, timeout, settings, Lifetime::Independent)
}

/// [`start_with`] for the server of a build, which must not outlive the calling thread: when
/// the command dies (even by `kill -9`) the server gets an immediate shutdown (see
/// `crate::lifetime`). Stop it before the calling thread ends.
pub fn start_for_build(
    pg: &PgInstall,
    user: &ServerUser,
    data_dir: &Path,
    socket_dir: &Path,
    log: &Path,
    timeout: Duration,
    settings: &[&str],
) -> Result<(), ClusterError> {
    let spec = ServerSpec {
        pg,
        user,
        data_dir,
        socket_dir,
        log,
    };
    start_server(&spec, timeout, settings, Lifetime::DiesWithCaller)
}

/// Which server, for [`start_server`].
struct ServerSpec<'a> {
    pg: &'a PgInstall,
    user: &'a ServerUser,
    data_dir: &'a Path,
    socket_dir: &'a Path,
    log: &'a Path,
}

/// Whether a server may outlive the command that starts it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Lifetime {
    /// A branch's server: runs until stopped (or suspended by the daemon).
    Independent,
    /// A build's server: immediate shutdown when the starting thread ends.
    DiesWithCaller,
}

fn start_server(
    spec: &ServerSpec<'_>,
    timeout: Duration,
    settings: &[&str],
    lifetime: Lifetime,
) -> Result<(), ClusterError> {
    let ServerSpec {
        pg,
        user,
        data_dir,
        socket_dir,
        log,
    } = *spec;
    // Opened by pgtwig (root, when servers run as another user) in a folder
    // the server user cannot change (see `crate::ownership`), without
    // following a link: the server only gets the open descriptor.
    let log_file = private::open_append(log).map_err(io_err("cannot open the server log"))?;
    let log_err = log_file
        .try_clone()
        .map_err(io_err("duplicating log handle"))?;
    let log_pos = log_file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = user.command(&pg.bin("postgres"));
    cmd.arg("-D").arg(data_dir).arg("-k").arg(socket_dir).args([
        "-p",
        &PORT.to_string(),
        "-c",
        "listen_addresses=",
    ]);
    // Crash recovery (every first start of a live clone) begins by fsyncing
    // each file of the data directory, over a second for a small cluster.
    // One syncfs does the same job; the clone was flushed when made anyway.
    if cfg!(target_os = "linux") && pg.major >= 14 {
        cmd.args(["-c", "recovery_init_sync_method=syncfs"]);
    }
    for setting in settings {
        cmd.args(["-c", setting]);
    }
    if lifetime == Lifetime::DiesWithCaller {
        crate::lifetime::die_with_this_thread(&mut cmd, Signal::SIGQUIT);
    }
    let mut child = cmd
        .env_remove("PGDATA")
        .stdin(Stdio::null())
        .stdout(log_file)
        .stderr(log_err)
        // Its own process group: a Ctrl-C meant for pgtwig must not stop branches.
        .process_group(0)
        .spawn()
        .map_err(io_err(format!("running {}", pg.bin("postgres").display())))?;
    let child_pid = child.id() as i32;
    let deadline = Instant::now() + timeout;
    let fail = |why: String| ClusterError::StartFailed {
        data_dir: data_dir.to_path_buf(),
        log: log.to_path_buf(),
        why,
        tail: log_tail(log, log_pos),
    };
    let mut delay = Duration::from_millis(2);
    loop {
        if let Ok(Some(exit)) = child.try_wait() {
            return Err(fail(format!("postgres exited ({exit})")));
        }
        if let Status::Running {
            pid, ready: true, ..
        } = status(data_dir)
        {
            if pid == child_pid {
                break;
            }
        }
        if Instant::now() > deadline {
            let _ = kill(Pid::from_raw(child_pid), Signal::SIGQUIT);
            return Err(fail(format!("not ready after {} s", timeout.as_secs())));
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(20));
    }
    // Reap it when it exits, so a long-lived caller (the daemon) collects no zombies.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    Ok(())
}

/// Stop the cluster with a fast shutdown (sessions are ended, the server
/// checkpoints and exits cleanly) and wait for it to be gone.
pub fn stop(data_dir: &Path, log: &Path, timeout: Duration) -> Result<(), ClusterError> {
    let Status::Running { pid, .. } = status(data_dir) else {
        return Ok(());
    };
    if pid == 0 {
        // Starting: give it a moment to write its pid, then retry once.
        std::thread::sleep(Duration::from_millis(200));
        return match status(data_dir) {
            Status::Running { pid, .. } if pid != 0 => stop(data_dir, log, timeout),
            _ => Ok(()),
        };
    }
    if !is_postmaster_of(pid, data_dir) {
        return Err(ClusterError::Io {
            what: format!(
                "{} names pid {pid}, which is not the server of this data directory (a process of \
                 another user, or a pid now used by another program); pgtwig does not signal it. If no \
                 server runs for {}, remove that postmaster.pid",
                data_dir.join("postmaster.pid").display(),
                data_dir.display()
            ),
            source: io::Error::from(io::ErrorKind::PermissionDenied),
        });
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGINT);
    let deadline = Instant::now() + timeout;
    while process_alive(pid) && data_dir.join("postmaster.pid").exists() {
        if Instant::now() > deadline {
            return Err(ClusterError::StopTimeout {
                data_dir: data_dir.to_path_buf(),
                pid,
                secs: timeout.as_secs(),
                log: log.to_path_buf(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    // The postmaster removes its pid file last; wait for the process too.
    while process_alive(pid) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// Stop the cluster at once (immediate shutdown, SIGQUIT: no checkpoint, nothing more
/// written), without waiting. For a build that must not write any more; it is discarded
/// after. Returns whether a server was signalled.
pub fn stop_immediately(data_dir: &Path) -> bool {
    match status(data_dir) {
        Status::Running { pid, .. } if pid != 0 && is_postmaster_of(pid, data_dir) => {
            kill(Pid::from_raw(pid), Signal::SIGQUIT).is_ok()
        }
        _ => false,
    }
}

/// Whether `pid` can be the postmaster of `data_dir`: a process whose working
/// directory is `data_dir` (a postmaster changes into its data directory
/// first thing) and, run as root, a process of the data directory's owner.
/// `postmaster.pid` is the server user's file and could name any process
/// (pid 1, too) for root to signal; a stale one may name a pid reused by
/// someone else — another branch's server, or one of the user's own programs.
fn is_postmaster_of(pid: i32, data_dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    if Path::new("/proc/self").exists() {
        let cwd = fs::read_link(format!("/proc/{pid}/cwd"));
        let here = fs::canonicalize(data_dir);
        match (cwd, here) {
            (Ok(cwd), Ok(here)) if cwd == here => {}
            _ => return false,
        }
    }
    if !nix::unistd::geteuid().is_root() {
        return true; // the kernel only lets us signal our own processes
    }
    let Ok(owner) = fs::metadata(data_dir).map(|m| m.uid()) else {
        return false;
    };
    // The real uid from /proc (its folder's owner is root for processes
    // that are not dumpable).
    match fs::read_to_string(format!("/proc/{pid}/status")) {
        Ok(status) => status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|ids| ids.split_whitespace().next())
            .and_then(|uid| uid.parse::<u32>().ok())
            .is_some_and(|uid| uid == owner),
        // No /proc (macOS): nothing to check against.
        Err(_) => !Path::new("/proc/self").exists(),
    }
}

/// Stop the server of a build that is thrown away (a dead command's leftover, a failed
/// build): immediate shutdown (`SIGQUIT`; its data does not matter), `SIGKILL` if it is still
/// there after half of `timeout`, and wait until it is gone. Only a process that is this data
/// directory's postmaster is signalled (see [`is_postmaster_of`]); a `postmaster.pid` naming
/// anything else is stale. An error means a server may still use the folder: do not delete it.
pub fn stop_discarded(data_dir: &Path, timeout: Duration) -> Result<(), ClusterError> {
    let deadline = Instant::now() + timeout;
    let pid = loop {
        match status(data_dir) {
            Status::Stopped => return Ok(()),
            // Being written by a starting postmaster: wait for its pid.
            Status::Running { pid: 0, .. } if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Status::Running { pid, .. } => break pid,
        }
    };
    if pid == 0 || !is_postmaster_of(pid, data_dir) {
        return Ok(()); // no live postmaster of this folder: the pid file is stale
    }
    let _ = kill(Pid::from_raw(pid), Signal::SIGQUIT);
    let escalate = Instant::now() + timeout / 2;
    let mut killed = false;
    while process_alive(pid) && is_postmaster_of(pid, data_dir) {
        if !killed && Instant::now() > escalate {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            killed = true;
        }
        if Instant::now() > deadline {
            return Err(ClusterError::StopTimeout {
                data_dir: data_dir.to_path_buf(),
                pid,
                secs: timeout.as_secs(),
                log: data_dir.join("postmaster.pid"),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

/// The last lines the server wrote since `from` (for error messages).
pub fn log_tail(log: &Path, from: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = private::open_read(log) {
        let len = f.metadata().map(|m| m.len()).unwrap_or(0);
        let start = from.min(len).max(len.saturating_sub(4096));
        let _ = f.seek(SeekFrom::Start(start));
        let _ = f.read_to_string(&mut text);
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(12)..].join("\n")
}

/// The private folder holding a branch's socket. Kept short and outside the
/// state folder because a socket path is limited to ~107 bytes: under
/// `$XDG_RUNTIME_DIR/pgtwig` (when pgtwig and the server are the same
/// user) or `/tmp/pgtwig-<uid>`, named by a hash of the branch folder.
pub fn socket_dir_for(user: &ServerUser, branch_dir: &Path) -> Result<PathBuf, ClusterError> {
    let base = runtime_base(user)?;
    let hash = pgtwig_core::names::short_hash(&branch_dir.to_string_lossy());
    let dir = base.join(hash);
    private_dir(user, &dir)?;
    Ok(dir)
}

/// The private runtime folder for sockets (branch servers, the daemon's
/// control socket), created 0700 for the server user when missing.
pub fn runtime_base(user: &ServerUser) -> Result<PathBuf, ClusterError> {
    let base = match std::env::var_os("XDG_RUNTIME_DIR").filter(|_| !user.switch) {
        Some(x) if !x.is_empty() && Path::new(&x).is_dir() => PathBuf::from(x).join("pgtwig"),
        _ => PathBuf::from(format!("/tmp/pgtwig-{}", user.uid)),
    };
    private_dir(user, &base)?;
    Ok(base)
}

/// Create `dir` (0700, the server user's) or check an existing one is
/// exactly that: a folder someone else made could let them intercept
/// connections.
fn private_dir(user: &ServerUser, dir: &Path) -> Result<(), ClusterError> {
    use std::os::unix::fs::MetadataExt;
    match fs::create_dir(dir) {
        Ok(()) => {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io_err("setting mode"))?;
            user.own(dir)
                .map_err(io_err(format!("giving {} to {}", dir.display(), user.name)))?;
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let meta =
                fs::symlink_metadata(dir).map_err(io_err(format!("reading {}", dir.display())))?;
            if !meta.is_dir() || meta.uid() != user.uid || meta.mode() & 0o077 != 0 {
                return Err(ClusterError::Io {
                    what: format!(
                        "socket folder {} must be a folder owned by {} with mode 0700; remove it and retry",
                        dir.display(),
                        user.name
                    ),
                    source: io::Error::from(io::ErrorKind::PermissionDenied),
                });
            }
        }
        Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
    }
    Ok(())
}

/// The WAL file holding the REDO point of the last checkpoint of a stopped
/// cluster (`pg_controldata`'s "Latest checkpoint's REDO WAL file"): a clone
/// of a stopped cluster needs WAL from there on, nothing older.
pub fn redo_wal_file(
    pg: &PgInstall,
    user: &ServerUser,
    data_dir: &Path,
) -> Result<String, ClusterError> {
    // As the server user: its data directory could hold a link in place of
    // pg_control, and root would read (and print) whatever it names.
    let out = user
        .command(&pg.bin("pg_controldata"))
        .arg(data_dir)
        .env("LC_ALL", "C")
        .output()
        .map_err(io_err(format!(
            "running {}",
            pg.bin("pg_controldata").display()
        )))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Latest checkpoint's REDO WAL file:"))
        .map(|f| f.trim().to_string())
        .filter(|_| out.status.success())
        .ok_or_else(|| ClusterError::Command {
            program: "pg_controldata".into(),
            status: out.status.to_string(),
            output: format!("{text}{}", String::from_utf8_lossy(&out.stderr)),
        })
}
