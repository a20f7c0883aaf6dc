//! Branches of one project on this machine.
//!
//! A branch is a folder `branches/<name>/` holding `branch.json` (its
//! metadata), `data/` (a PostgreSQL data directory) and `server.log`. The
//! folder's name is the branch's name, so a single rename publishes,
//! renames or removes a branch atomically.
//!
//! Crash safety: every change of `branches/` runs under the project lock. A
//! new branch is built in `tmp/` and renamed into `branches/` only when
//! complete, after its files are flushed. Long builds (import, anonymize,
//! point-in-time recovery, the clone of a running parent for a reset) run
//! without the project lock, which they take only to publish; each holds a
//! lock file of its own beside its build folder while it lives. Whatever is
//! in `tmp/` when the project lock is next taken and whose own lock is free
//! was left by a command that died, and is cleaned up (or, for a reset cut
//! short after moving the old branch aside, moved back).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pgtwig_core::fsutil::{self, ProjectLock};
use pgtwig_core::{failpoint, BranchName, ProjectHome};
use serde::{Deserialize, Serialize};

use crate::backup;
use crate::clone::CloneMethod;
use crate::cluster::{self, Status};
use crate::pgbin::{self, PgInstall};
use crate::server_user::ServerUser;

const META_FILE: &str = "branch.json";

/// What `branch.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BranchMeta {
    /// The branch this one was derived from; None for the root.
    pub parent: Option<BranchName>,
    /// RFC 3339, UTC.
    pub created: String,
    pub clone_method: CloneMethod,
    /// PostgreSQL major version of the data directory.
    pub pg_major: u32,
    /// The git branch this branch was made for, when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git_branch: Option<String>,
    /// RFC 3339; `pgtwig gc` deletes the branch after this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<String>,
    /// Made by a `protected = true` rule: `gc` keeps it whatever `.pgtwig.toml` is checked
    /// out later.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub protected: bool,
}

#[derive(Debug, Clone)]
pub struct Branch {
    pub name: BranchName,
    pub meta: BranchMeta,
    pub dir: PathBuf,
}

impl Branch {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("server.log")
    }
}

/// A branch and how it is doing right now.
#[derive(Debug, Clone)]
pub struct BranchStatus {
    pub name: BranchName,
    /// None when its metadata cannot be read (see `problem`).
    pub meta: Option<BranchMeta>,
    pub running: bool,
    /// Logical size of the data directory in bytes.
    pub size: u64,
    pub problem: Option<String>,
}

/// The outcome of building a branch, for the user.
#[derive(Debug, Clone)]
pub struct CreateReport {
    pub branch: Branch,
    /// The parent was running and was cloned through the backup API.
    pub parent_was_running: bool,
    /// Why copy-on-write was not possible, when it was not.
    pub fallback_reason: Option<String>,
    pub files: u64,
    pub bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{message}")]
    NotInitialized { dir: PathBuf, message: String },
    #[error("branch \"{name}\" does not exist{}", pgtwig_core::names::not_found_advice(name.as_str(), known))]
    NotFound {
        name: BranchName,
        known: Vec<String>,
    },
    #[error("branch \"{name}\" already exists; pick another name, or `pgtwig branch reset {name}` to re-derive it from its parent")]
    Exists { name: BranchName },
    #[error("\"{name}\" is the project's root branch and cannot be {action}; every other branch derives from it")]
    IsRoot {
        name: BranchName,
        action: &'static str,
    },
    #[error("branch \"{name}\" has no parent to reset from{}", .why)]
    NoParent { name: BranchName, why: String },
    #[error("metadata of branch \"{name}\" ({path}) is missing or corrupt: {why}. Its data was not touched; restore the file, or remove the branch with `pgtwig branch delete {name}`")]
    CorruptMeta {
        name: BranchName,
        path: PathBuf,
        why: String,
    },
    #[error("branch \"{name}\" could not be started: {source}")]
    StartFailed {
        name: BranchName,
        #[source]
        source: cluster::ClusterError,
    },
    /// [`StartFailed`](Error::StartFailed) on a (nearly) full file system: `note` (first, as
    /// the proxy tells clients the first line) says how to free space.
    #[error("branch \"{name}\" could not be started: {note}\n{source}")]
    StartFailedLowSpace {
        name: BranchName,
        #[source]
        source: Box<cluster::ClusterError>,
        note: String,
    },
    /// A build refused: it would leave less than the free-space margin (see `space`).
    #[error("{0}")]
    NoSpace(Box<crate::space::NoSpace>),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error(transparent)]
    Backup(#[from] backup::BackupError),
    #[error(transparent)]
    PgBin(#[from] pgbin::PgBinError),
    #[error(transparent)]
    ServerUser(#[from] crate::server_user::ServerUserError),
    /// The project lock stayed taken for the time this command may wait (the hook, a wake).
    #[error("pgtwig is busy with {holder}; try again when it is done")]
    Busy { holder: String },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{0}")]
    Other(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
    let what = what.into();
    move |source| Error::Io { what, source }
}

/// How long a server may take to start (crash recovery after a clone of a
/// busy parent replays WAL) or to stop (a checkpoint).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(300);
pub(crate) const STOP_TIMEOUT: Duration = Duration::from_secs(120);
/// `history_retention` until [`LocalBackend::set_history_retention`] says otherwise (the
/// configuration's default).
const DEFAULT_HISTORY_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The local backend for one project.
pub struct LocalBackend {
    pub(crate) home: ProjectHome,
    pub(crate) user: ServerUser,
    /// How long [`lock`](Self::lock) waits before [`Error::Busy`]; `None`: as long as it takes.
    lock_wait: Option<Duration>,
    /// The same for [`start`](Self::start) alone (the daemon's wake-on-connect).
    start_lock_wait: Option<Duration>,
    /// `free_space_margin` of `.pgtwig.toml` (see `space`); `None`: the default.
    pub(crate) free_space_margin: Option<pgtwig_core::size::FreeSpaceMargin>,
    /// `history_retention` of `.pgtwig.toml`, for pruning after a failed start.
    pub(crate) history_retention: Duration,
    /// Whether clones here are copy-on-write, once probed.
    pub(crate) reflink: std::sync::OnceLock<bool>,
}

impl LocalBackend {
    /// Open a project's state; `create` makes its folders when missing
    /// (`pgtwig init`), otherwise a missing folder is [`Error::NotInitialized`].
    pub fn open(home: ProjectHome, create: bool) -> Result<LocalBackend> {
        let user = ServerUser::resolve(home.dir())?;
        if !create && !home.branches_dir().is_dir() {
            return Err(Error::NotInitialized {
                dir: home.dir().to_path_buf(),
                message: home.missing_state_message(),
            });
        }
        let backend = LocalBackend {
            home,
            user,
            lock_wait: None,
            start_lock_wait: None,
            free_space_margin: None,
            history_retention: DEFAULT_HISTORY_RETENTION,
            reflink: std::sync::OnceLock::new(),
        };
        // Before anything in the project is opened: see `ownership`.
        backend.secure_project()?;
        backend.user.check_reachable(&backend.home.branches_dir())?;
        // Finish or undo what a killed command left, so that even read-only
        // commands never show a half-made or half-reset branch. If another
        // command holds the lock it is mid-change; leave its work alone.
        if let Some(_lock) = ProjectLock::try_acquire(&backend.home.lock_path()).map_err(io_err(
            format!("locking {}", backend.home.lock_path().display()),
        ))? {
            backend.recover_interrupted()?;
        }
        Ok(backend)
    }

    pub fn home(&self) -> &ProjectHome {
        &self.home
    }
    pub fn server_user(&self) -> &ServerUser {
        &self.user
    }

    /// Wait at most `wait` for the project lock from now on, then fail with
    /// [`Error::Busy`] (the git hook: it must never hold a checkout up).
    pub fn set_lock_wait(&mut self, wait: Option<Duration>) {
        self.lock_wait = wait;
    }

    /// [`set_lock_wait`](Self::set_lock_wait) for starting branches only (the daemon's
    /// wake-on-connect; its other work may wait).
    pub fn set_start_lock_wait(&mut self, wait: Option<Duration>) {
        self.start_lock_wait = wait;
    }

    /// Take the project lock and clean what interrupted commands left.
    pub fn lock(&self) -> Result<ProjectLock> {
        self.lock_waiting(self.lock_wait)
    }

    fn lock_waiting(&self, wait: Option<Duration>) -> Result<ProjectLock> {
        let path = self.home.lock_path();
        let what = || format!("locking {}", path.display());
        let lock = match wait {
            None => ProjectLock::acquire(&path).map_err(io_err(what()))?,
            Some(wait) => ProjectLock::acquire_within(&path, wait)
                .map_err(io_err(what()))?
                .map_err(|holder| Error::Busy { holder })?,
        };
        self.recover_interrupted()?;
        Ok(lock)
    }

    pub(crate) fn branch_dir(&self, name: &BranchName) -> PathBuf {
        self.home.branch_dir(name)
    }

    pub fn exists(&self, name: &BranchName) -> bool {
        self.branch_dir(name).is_dir()
    }

    /// Names of all branches, sorted.
    pub fn names(&self) -> Result<Vec<BranchName>> {
        let dir = self.home.branches_dir();
        let mut names: Vec<BranchName> = fs::read_dir(&dir)
            .map_err(io_err(format!("reading {}", dir.display())))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| BranchName::parse(&e.file_name().to_string_lossy()).ok())
            .collect();
        names.sort();
        Ok(names)
    }

    fn not_found(&self, name: &BranchName) -> Error {
        Error::NotFound {
            name: name.clone(),
            known: self
                .names()
                .unwrap_or_default()
                .iter()
                .map(|n| n.to_string())
                .collect(),
        }
    }

    /// A branch with its metadata.
    pub fn get(&self, name: &BranchName) -> Result<Branch> {
        let dir = self.branch_dir(name);
        if !dir.is_dir() {
            return Err(self.not_found(name));
        }
        let path = dir.join(META_FILE);
        let corrupt = |why: String| Error::CorruptMeta {
            name: name.clone(),
            path: path.clone(),
            why,
        };
        let text =
            pgtwig_core::private::read_to_string(&path).map_err(|e| corrupt(e.to_string()))?;
        let meta: BranchMeta = serde_json::from_str(&text).map_err(|e| corrupt(e.to_string()))?;
        Ok(Branch {
            name: name.clone(),
            meta,
            dir,
        })
    }

    pub fn status_of(&self, name: &BranchName) -> Result<BranchStatus> {
        let dir = self.branch_dir(name);
        if !dir.is_dir() {
            return Err(self.not_found(name));
        }
        let (meta, problem) = match self.get(name) {
            Ok(b) => (Some(b.meta), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let data = dir.join("data");
        Ok(BranchStatus {
            name: name.clone(),
            meta,
            running: cluster::status(&data).is_running(),
            size: fsutil::dir_size(&data).unwrap_or(0),
            problem,
        })
    }

    pub fn list(&self) -> Result<Vec<BranchStatus>> {
        self.names()?.iter().map(|n| self.status_of(n)).collect()
    }

    /// Where a branch's server listens (its socket folder; port 5432).
    pub fn socket_dir(&self, name: &BranchName) -> Result<PathBuf> {
        Ok(cluster::socket_dir_for(&self.user, &self.branch_dir(name))?)
    }

    /// The socket file of a branch whose server is up and accepting
    /// connections, read from its `postmaster.pid` (no lock, no process).
    pub fn ready_socket(&self, name: &BranchName) -> Option<PathBuf> {
        match cluster::status(&self.branch_dir(name).join("data")) {
            Status::Running {
                ready: true,
                socket_dir,
                port,
                ..
            } => Some(socket_dir.join(format!(".s.PGSQL.{port}"))),
            _ => None,
        }
    }

    /// Where a branch's server writes its log.
    pub fn log_path(&self, name: &BranchName) -> PathBuf {
        self.branch_dir(name).join("server.log")
    }

    /// A libpq connection string straight to the branch's socket.
    pub fn url(&self, name: &BranchName, database: &str) -> Result<String> {
        self.get(name)?;
        let sock = self.socket_dir(name)?;
        Ok(format!(
            "postgresql://{}@/{}?host={}",
            cluster::SUPERUSER,
            database,
            sock.display()
        ))
    }

    pub(crate) fn install_for(&self, branch: &Branch) -> Result<PgInstall> {
        let major = pgbin::data_dir_major(&branch.data_dir()).unwrap_or(branch.meta.pg_major);
        Ok(pgbin::for_major(major)?)
    }

    /// Start a branch's server if it is not running; returns its socket folder.
    pub fn start(&self, name: &BranchName) -> Result<PathBuf> {
        let _lock = self.lock_waiting(self.start_lock_wait.or(self.lock_wait))?;
        self.start_locked(name)
    }

    pub(crate) fn start_locked(&self, name: &BranchName) -> Result<PathBuf> {
        let branch = self.get(name)?;
        let sock = self.socket_dir(name)?;
        if let Status::Running { ready: true, .. } = cluster::status(&branch.data_dir()) {
            return Ok(sock);
        }
        let pg = self.install_for(&branch)?;
        let archive = self.archive_settings(&branch.dir)?;
        let settings: Vec<&str> = archive.iter().map(String::as_str).collect();
        let start = || {
            cluster::start_with(
                &pg,
                &self.user,
                &branch.data_dir(),
                &sock,
                &branch.log_path(),
                START_TIMEOUT,
                &settings,
            )
        };
        if let Err(source) = start() {
            // A full disk is the likeliest cause: history goes first (see `space`).
            self.after_failed_start(name, source, start)?;
        }
        Ok(sock)
    }

    /// Stop a branch's server (fast shutdown). Returns whether it was running.
    pub fn stop(&self, name: &BranchName) -> Result<bool> {
        let _lock = self.lock()?;
        self.stop_locked(name)
    }

    pub(crate) fn stop_locked(&self, name: &BranchName) -> Result<bool> {
        let dir = self.branch_dir(name);
        if !dir.is_dir() {
            return Err(self.not_found(name));
        }
        let data = dir.join("data");
        let was = cluster::status(&data).is_running();
        cluster::stop(&data, &dir.join("server.log"), STOP_TIMEOUT)?;
        Ok(was)
    }

    /// Create the root branch with `initdb`, holding the app's `database`
    /// (made before the branch appears, so every branch derived from it has
    /// it; "postgres" is initdb's own).
    pub fn create_root(
        &self,
        name: &BranchName,
        git_branch: Option<String>,
        database: &str,
    ) -> Result<Branch> {
        let _lock = self.lock_for_new(name)?;
        self.check_space_for_new_cluster(name)?;
        let pg = pgbin::newest()?;
        let build = self.new_build_dir(name)?;
        let log = build.join("server.log");
        let made = (|| {
            cluster::initdb(&pg, &self.user, &build.join("data"), &log)?;
            if database != "postgres" {
                self.with_build_server(name, &pg, &build, &log, &[], |sock| {
                    crate::databases::create_if_missing(sock, database)
                        .map_err(|e| Error::Other(format!("creating database \"{database}\": {e}")))
                })?;
            }
            Ok(())
        })();
        if let Err(e) = made {
            self.discard_build(&build, &log);
            return Err(e);
        }
        let meta = BranchMeta {
            parent: None,
            created: now_rfc3339(),
            clone_method: CloneMethod::Initdb,
            pg_major: pg.major,
            git_branch,
            expires: None,
            protected: false,
        };
        crate::databases::known::record(&build, &["postgres", database])
            .map_err(io_err("recording the branch's databases"))?;
        self.publish(name, &build, &meta)
    }

    /// Create `name` as a copy-on-write clone of `parent`.
    pub fn create(
        &self,
        name: &BranchName,
        parent: &BranchName,
        git_branch: Option<String>,
    ) -> Result<CreateReport> {
        self.create_with(name, parent, git_branch, None)
    }

    /// [`create`](Self::create) with an expiry time (RFC 3339) for `gc`.
    pub fn create_with(
        &self,
        name: &BranchName,
        parent: &BranchName,
        git_branch: Option<String>,
        expires: Option<String>,
    ) -> Result<CreateReport> {
        self.create_recorded(name, parent, git_branch, expires, false)
    }

    /// [`create_with`](Self::create_with), recording whether the rule that made it
    /// protects it (kept by `gc` whatever configuration is checked out later).
    pub fn create_recorded(
        &self,
        name: &BranchName,
        parent: &BranchName,
        git_branch: Option<String>,
        expires: Option<String>,
        protected: bool,
    ) -> Result<CreateReport> {
        let _lock = self.lock_for_new(name)?;
        let parent_branch = self.get(parent)?;
        self.check_space_for_clone(name, &parent_branch)?;
        let build = self.new_build_dir(name)?;
        let cloned = self.build_clone(&parent_branch, &build)?;
        let meta = BranchMeta {
            parent: Some(parent.clone()),
            created: now_rfc3339(),
            clone_method: cloned.method,
            pg_major: parent_branch.meta.pg_major,
            git_branch,
            expires,
            protected,
        };
        crate::databases::known::inherit(&parent_branch.dir, &build)
            .map_err(io_err("recording the branch's databases"))?;
        failpoint::hit("create.before_publish");
        let branch = self.publish(name, &build, &meta)?;
        failpoint::hit("create.after_publish");
        Ok(cloned.report(branch))
    }

    /// Put the finished build `build` in place of existing branch `name`
    /// (stopped first): old aside, new in, old removed or kept as
    /// `keep_old`. An interruption anywhere is finished or undone by
    /// recover_interrupted(). Returns whether the old one was running.
    pub(crate) fn swap_in(
        &self,
        name: &BranchName,
        build: &Path,
        keep_old: Option<&BranchName>,
    ) -> Result<bool> {
        let tmp = self.home.tmp_dir();
        // Recorded before it stops: if this command dies before starting it again, the next
        // holder of the lock does (see `build::restart_after_swap`).
        let restart = crate::build::restart_marker(&tmp, name);
        let running = cluster::status(&self.branch_dir(name).join("data")).is_running();
        if running {
            fsutil::write_atomic(&restart, b"").map_err(io_err("recording that it runs"))?;
        }
        let was_running = self.stop_locked(name)? || running;
        let aside = tmp.join(format!("old-{name}"));
        if let Some(k) = keep_old {
            fsutil::write_atomic(&tmp.join(format!("old-{name}.keep")), k.as_str().as_bytes())
                .map_err(io_err("recording the replacement"))?;
        }
        let dir = self.branch_dir(name);
        fs::rename(&dir, &aside).map_err(io_err("moving the old branch aside"))?;
        failpoint::hit("reset.old_moved_aside");
        fs::rename(build, &dir).map_err(io_err("publishing the new branch"))?;
        fsutil::sync_dir(&self.home.branches_dir()).map_err(io_err("syncing"))?;
        match keep_old {
            Some(k) => {
                fs::rename(&aside, self.branch_dir(k)).map_err(io_err("keeping the old branch"))?;
                fsutil::sync_dir(&self.home.branches_dir()).map_err(io_err("syncing"))?;
            }
            None => remove_tree(&aside)?,
        }
        let _ = fs::remove_file(tmp.join(format!("old-{name}.keep")));
        Ok(was_running)
    }

    /// Delete a branch and its data. Its children are untouched: clones
    /// share no files with their parent.
    pub fn delete(&self, name: &BranchName, root: &BranchName) -> Result<()> {
        let _lock = self.lock()?;
        if name == root {
            return Err(Error::IsRoot {
                name: name.clone(),
                action: "deleted",
            });
        }
        let dir = self.branch_dir(name);
        if !dir.is_dir() {
            return Err(self.not_found(name));
        }
        self.stop_locked(name)?;
        let doomed = self
            .home
            .tmp_dir()
            .join(format!("delete-{name}-{}", std::process::id()));
        fs::rename(&dir, &doomed).map_err(io_err(format!("removing {}", dir.display())))?;
        fsutil::sync_dir(&self.home.branches_dir()).map_err(io_err("syncing"))?;
        remove_tree(&doomed)
    }
}

pub(crate) fn write_meta(dir: &Path, meta: &BranchMeta) -> Result<()> {
    let mut json = serde_json::to_vec_pretty(meta).map_err(|e| Error::Other(e.to_string()))?;
    json.push(b'\n');
    fsutil::write_atomic(&dir.join(META_FILE), &json).map_err(io_err("writing branch metadata"))
}

/// Write a file (0600, the server user's) into a data directory, which the
/// server user owns: no link followed, no hard link written through.
pub(crate) fn write_private(user: &ServerUser, path: &Path, text: &str) -> Result<()> {
    use pgtwig_core::private::{write_file, WriteMode};
    write_file(path, text.as_bytes(), WriteMode::Replace, user.owner()).map_err(io_err(format!(
        "writing {} into the data directory",
        path.file_name().unwrap_or_default().to_string_lossy()
    )))
}

/// Flush a finished build to disk before it is published, so a power cut
/// cannot leave a visible branch with missing data: one `syncfs` of its
/// file system on Linux, `sync` elsewhere.
pub(crate) fn sync_tree(dir: &Path) -> Result<()> {
    #[cfg(target_os = "linux")]
    {
        let f = fs::File::open(dir).map_err(io_err(format!("opening {}", dir.display())))?;
        nix::unistd::syncfs(&f).map_err(|e| Error::Io {
            what: "flushing the new branch".into(),
            source: e.into(),
        })?;
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = dir;
        nix::unistd::sync();
    }
    Ok(())
}

pub(crate) fn remove_tree(path: &Path) -> Result<()> {
    match fs::remove_dir_all(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::Io {
            what: format!("removing {}", path.display()),
            source: e,
        }),
    }
}

pub fn now_rfc3339() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}
