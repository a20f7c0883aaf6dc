//! Building branches out of sight: a fresh folder in `tmp/`, a clone of
//! the parent into it (through the backup API when the parent runs), a
//! server run from it while a build is changed (anonymize, import,
//! point-in-time recovery), publishing it by rename, and cleaning up after
//! a failed build or a command that died mid-build (see the crash-safety
//! notes in `engine`).

use std::fs;
use std::path::{Path, PathBuf};

use pgtwig_core::fsutil;
use pgtwig_core::{failpoint, BranchName};

use crate::backup::{self, BackupSession};
use crate::clone::{CloneMethod, Cloner, Visit};
use crate::cluster::{self, Status};
use crate::engine::{
    io_err, remove_tree, sync_tree, write_meta, write_private, Branch, BranchMeta, CreateReport,
    Error, LocalBackend, Result, START_TIMEOUT, STOP_TIMEOUT,
};

/// What cloning a parent produced (see `LocalBackend::build_clone`).
#[derive(Debug, Clone)]
pub(crate) struct Cloned {
    pub method: CloneMethod,
    pub parent_was_running: bool,
    pub fallback_reason: Option<String>,
    pub files: u64,
    pub bytes: u64,
}

impl Cloned {
    /// The report for the user once the clone is published as `branch`.
    pub fn report(self, branch: Branch) -> CreateReport {
        CreateReport {
            branch,
            parent_was_running: self.parent_was_running,
            fallback_reason: self.fallback_reason,
            files: self.files,
            bytes: self.bytes,
        }
    }
}

/// A build folder in `tmp/` worked on without the project lock (see the crash-safety notes
/// in `engine`): `<folder>.lock` beside it is flock-ed while this lives, so the next holder
/// of the project lock leaves the build alone exactly while its owner lives (a pid alone
/// could be reused). Dropping it removes the lock file; the folder is published or
/// discarded before.
pub(crate) struct UnlockedBuild {
    pub dir: PathBuf,
    lock_path: PathBuf,
    _held: fs::File,
}

impl Drop for UnlockedBuild {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.lock_path);
    }
}

/// How long a leftover build's server may take to go (immediate shutdown, then SIGKILL).
const LEFTOVER_STOP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// Stop a server still running on build folder `dir` (a dead command's, whose server did not
/// die with it — macOS, or a pgtwig from before servers did — or a failed build's), checking
/// that the pid in its `postmaster.pid` really is that folder's postmaster. An error: the
/// folder must stay, a server may still use it.
fn stop_leftover_server(dir: &Path) -> Result<()> {
    let data = dir.join("data");
    if !data.join("postmaster.pid").exists() {
        return Ok(());
    }
    cluster::stop_discarded(&data, LEFTOVER_STOP_TIMEOUT).map_err(|e| {
        Error::Other(format!(
            "left {} in place: its server may still run ({e})",
            dir.display()
        ))
    })
}

/// `tmp/old-<name>.restart`: branch `name` ran when a reset or an import stopped it to swap
/// in its new state; whoever takes the lock next starts it if the command died before it did.
pub(crate) fn restart_marker(tmp: &Path, name: &BranchName) -> PathBuf {
    tmp.join(format!("old-{name}.restart"))
}

/// The lock file of build folder `dir`.
fn build_lock_path(dir: &Path) -> PathBuf {
    let mut name = dir.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    dir.with_file_name(name)
}

/// Whether the build lock at `path` is free (its owner is gone); it stays ours while the
/// returned file is open.
fn take_build_lock(path: &Path) -> Option<fs::File> {
    let file = pgtwig_core::private::open_append(path).ok()?;
    file.try_lock().ok()?;
    Some(file)
}

impl LocalBackend {
    /// Take the project lock for making branch `name`, refusing a name
    /// already taken (checked under the lock, so two makers cannot race).
    pub(crate) fn lock_for_new(&self, name: &BranchName) -> Result<fsutil::ProjectLock> {
        let lock = self.lock()?;
        if self.exists(name) {
            return Err(Error::Exists { name: name.clone() });
        }
        Ok(lock)
    }

    /// Clean `tmp/` (call with the lock held). Returns what was done.
    pub(crate) fn recover_interrupted(&self) -> Result<Vec<String>> {
        let tmp = self.home.tmp_dir();
        let mut done = Vec::new();
        let entries = fs::read_dir(&tmp).map_err(io_err(format!("reading {}", tmp.display())))?;
        let mut names: Vec<String> = entries
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        for name in &names {
            let path = tmp.join(name);
            if !path.exists()
                || name.ends_with(".keep")
                || name.ends_with(".lock")
                || name.ends_with(".restart")
            {
                continue;
            }
            // A build worked on without the project lock: its own lock says whether its
            // owner lives.
            let own_lock = build_lock_path(&path);
            if own_lock.exists() {
                let Some(_free) = take_build_lock(&own_lock) else {
                    continue;
                };
                if let Err(e) = stop_leftover_server(&path) {
                    tracing::warn!("{e}");
                    continue;
                }
                remove_tree(&path)?;
                let _ = fs::remove_file(&own_lock);
                done.push(format!("removed {name}, left by an interrupted command"));
                continue;
            }
            if let Some(branch) = name.strip_prefix("old-") {
                // A reset moved the old branch aside and died.
                let target = self.home.branches_dir().join(branch);
                let keep_file = tmp.join(format!("{name}.keep"));
                let keep_as = fs::read_to_string(&keep_file)
                    .ok()
                    .map(|k| k.trim().to_string());
                if !target.exists() {
                    fs::rename(&path, &target).map_err(io_err("restoring a branch"))?;
                    // It may come from an older pgtwig, made before branch folders were pgtwig's.
                    self.secure_branch(&target)?;
                    done.push(format!(
                        "restored branch \"{branch}\" after an interrupted reset"
                    ));
                } else if let Some(k) =
                    keep_as.filter(|k| !self.home.branches_dir().join(k).exists())
                {
                    fs::rename(&path, self.home.branches_dir().join(&k))
                        .map_err(io_err("keeping the old branch"))?;
                    self.secure_branch(&self.home.branches_dir().join(&k))?;
                    done.push(format!(
                        "finished an interrupted reset: old \"{branch}\" kept as \"{k}\""
                    ));
                } else {
                    remove_tree(&path)?;
                }
                let _ = fs::remove_file(&keep_file);
                continue;
            }
            // An older pgtwig's import, filling its build without the lock and
            // without a lock file of its own: left alone while its process lives.
            if let Some(pid) = name
                .strip_prefix("fill-")
                .and_then(|r| r.rsplit('-').next())
                .and_then(|p| p.parse::<i32>().ok())
            {
                if pid == std::process::id() as i32
                    || nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                {
                    continue;
                }
            }
            // A build whose lock file is gone (its owner is too, see UnlockedBuild), or any
            // other leftover: never removed from under a server still running on it.
            if let Err(e) = stop_leftover_server(&path) {
                tracing::warn!("{e}");
                continue;
            }
            remove_tree(&path)?;
            done.push(format!("removed {name}, left by an interrupted command"));
        }
        for name in names.iter().filter(|n| n.ends_with(".keep")) {
            let _ = fs::remove_file(tmp.join(name));
        }
        // A reset or import stopped a running branch to swap it and died before starting it
        // again (the branch is back as it was, or in its new state): start it.
        for marker in names.iter().filter(|n| n.ends_with(".restart")) {
            let branch = marker
                .strip_prefix("old-")
                .and_then(|n| n.strip_suffix(".restart"))
                .and_then(|n| BranchName::parse(n).ok());
            if let Some(branch) = branch.filter(|b| self.exists(b)) {
                if !cluster::status(&self.branch_dir(&branch).join("data")).is_running() {
                    done.push(match self.start_locked(&branch) {
                        Ok(_) => format!(
                            "started branch \"{branch}\" again: an interrupted reset or import had stopped it"
                        ),
                        Err(e) => format!(
                            "branch \"{branch}\" ran before an interrupted reset or import, but could not be \
                             started again: {e}"
                        ),
                    });
                }
            }
            let _ = fs::remove_file(tmp.join(marker));
        }
        // Lock files of builds that are gone, whose owner is gone too.
        for name in names.iter().filter(|n| n.ends_with(".lock")) {
            let path = tmp.join(name);
            let build = path.with_extension("");
            if !build.exists() && take_build_lock(&path).is_some() {
                let _ = fs::remove_file(&path);
            }
        }
        if !done.is_empty() {
            fsutil::sync_dir(&self.home.branches_dir()).ok();
            for line in &done {
                tracing::warn!("{line}");
            }
        }
        Ok(done)
    }

    /// After [`swap_in`](Self::swap_in): start `name` again if it ran before, and forget that
    /// it has to be.
    pub(crate) fn restart_after_swap(&self, name: &BranchName, was_running: bool) -> Result<()> {
        failpoint::hit("swap.before_restart");
        let started = if was_running {
            self.start_locked(name).map(drop)
        } else {
            Ok(())
        };
        let _ = fs::remove_file(restart_marker(&self.home.tmp_dir(), name));
        started
    }

    /// A fresh, empty folder in `tmp/` to build a branch in (under the project
    /// lock: a leftover of the same name is from a dead process and goes).
    pub(crate) fn new_build_dir(&self, name: &BranchName) -> Result<PathBuf> {
        let dir = self.build_dir_path("new", name);
        if dir.exists() {
            remove_tree(&dir)?;
        }
        self.make_build_dir(dir)
    }

    /// A build folder in tmp/ to work on without the project lock (see
    /// [`UnlockedBuild`]); recover_interrupted() leaves it alone while it lives.
    pub(crate) fn new_build_dir_unlocked(&self, name: &BranchName) -> Result<UnlockedBuild> {
        use std::os::unix::fs::MetadataExt;
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        for _ in 0..8 {
            let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let dir = self
                .home
                .tmp_dir()
                .join(format!("build-{name}-{}-{seq}", std::process::id()));
            // The lock first: a build folder without one is a dead command's leftover.
            let lock_path = build_lock_path(&dir);
            let Some(held) = take_build_lock(&lock_path) else {
                continue;
            };
            // A lock holder cleaning tmp/ may have removed the file between our open and
            // our lock: then the lock is on a file nobody else can see. Try another name.
            let same = match (held.metadata(), fs::metadata(&lock_path)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if !same {
                continue;
            }
            let build = UnlockedBuild {
                dir: dir.clone(),
                lock_path,
                _held: held,
            };
            self.make_build_dir(dir)?;
            return Ok(build);
        }
        Err(Error::Other(format!(
            "cannot lock a new build folder in {}",
            self.home.tmp_dir().display()
        )))
    }

    fn build_dir_path(&self, kind: &str, name: &BranchName) -> PathBuf {
        self.home
            .tmp_dir()
            .join(format!("{kind}-{name}-{}", std::process::id()))
    }

    pub(crate) fn make_build_dir(&self, dir: PathBuf) -> Result<PathBuf> {
        fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        // pgtwig's, not the server user's: it becomes the branch folder (see `ownership`).
        self.user
            .own_folder(&dir)
            .map_err(io_err(format!("making {} private", dir.display())))?;
        Ok(dir)
    }

    /// Run `work` against a server started from `build/data` on a private
    /// socket, logging to `log`; the server is stopped cleanly whatever
    /// `work` returns. Shared by the builds that change a branch out of
    /// sight (anonymize, import, point-in-time recovery).
    pub(crate) fn with_build_server<T>(
        &self,
        name: &BranchName,
        pg: &crate::pgbin::PgInstall,
        build: &Path,
        log: &Path,
        settings: &[&str],
        work: impl FnOnce(&Path) -> Result<T>,
    ) -> Result<T> {
        let data = build.join("data");
        let sock = cluster::socket_dir_for(&self.user, build)?;
        // Dies with this thread (and the command): a killed build leaves no server behind.
        cluster::start_for_build(pg, &self.user, &data, &sock, log, START_TIMEOUT, settings)
            .map_err(|source| Error::StartFailed {
                name: name.clone(),
                source,
            })?;
        // The build writes beside running branches: stopped if free space runs low.
        let watch = self.watch_build(&format!("branch \"{name}\""), &data)?;
        let result = work(&sock);
        let tripped = watch.and_then(crate::space::BuildWatch::finish);
        let stopped = cluster::stop(&data, log, STOP_TIMEOUT);
        let _ = fs::remove_dir(&sock);
        if let Some(why) = tripped {
            return Err(Error::Other(why));
        }
        stopped?;
        result
    }

    /// Throw away a failed build: stop its server if one still runs (immediate shutdown: its
    /// data goes, so `_log` gets nothing worth reading), remove it.
    pub(crate) fn discard_build(&self, build: &Path, _log: &Path) {
        if let Err(e) = stop_leftover_server(build) {
            tracing::warn!("{e}");
            return;
        }
        let _ = remove_tree(build);
    }

    /// Write metadata, flush everything, and rename the build into place.
    pub(crate) fn publish(
        &self,
        name: &BranchName,
        build: &Path,
        meta: &BranchMeta,
    ) -> Result<Branch> {
        write_meta(build, meta)?;
        let t0 = std::time::Instant::now();
        sync_tree(build)?;
        tracing::debug!("flushed the new branch in {:?}", t0.elapsed());
        let dir = self.branch_dir(name);
        fs::rename(build, &dir).map_err(io_err(format!("publishing {}", dir.display())))?;
        fsutil::sync_dir(&self.home.branches_dir()).map_err(io_err("syncing"))?;
        Ok(Branch {
            name: name.clone(),
            meta: meta.clone(),
            dir,
        })
    }

    /// Clone `parent`'s data directory into `build/data`: through the backup
    /// API when it runs, directly when it is stopped.
    pub(crate) fn build_clone(&self, parent: &Branch, build: &Path) -> Result<Cloned> {
        Ok(self
            .clone_parent(parent, build, false)?
            .expect("a clone that may copy a stopped parent always happens"))
    }

    /// [`build_clone`](Self::build_clone) of a running parent only, safe without the project
    /// lock: the backup API gives a consistent copy whatever happens beside it, and a parent
    /// stopped or deleted meanwhile makes the clone fail cleanly. `None` (nothing done) when
    /// the parent is stopped: a plain copy needs the lock, so that nobody starts it meanwhile.
    pub(crate) fn build_clone_if_running(
        &self,
        parent: &Branch,
        build: &Path,
    ) -> Result<Option<Cloned>> {
        self.clone_parent(parent, build, true)
    }

    fn clone_parent(
        &self,
        parent: &Branch,
        build: &Path,
        running_only: bool,
    ) -> Result<Option<Cloned>> {
        let t0 = std::time::Instant::now();
        let src = parent.data_dir();
        let dst = build.join("data");
        let pg = self.install_for(parent)?;
        tracing::debug!("found server binaries in {:?}", t0.elapsed());
        let mut cloner = Cloner::new(&self.user);
        let status = cluster::status(&src);
        let running = status.is_running();
        if running_only && !running {
            return Ok(None);
        }
        let first_wal = if let Status::Running { socket_dir, .. } = status {
            cloner.tolerate_vanishing = true;
            let session = BackupSession::begin(&socket_dir, pg.major, "pgtwig branch clone")?;
            failpoint::hit("create.in_backup");
            cloner
                .clone_tree(&src, &dst, &backup::live_exclusion)
                .map_err(io_err(format!("cloning {}", src.display())))?;
            cloner
                .clone_file(
                    &src,
                    Path::new("global/pg_control"),
                    &dst.join("global/pg_control"),
                )
                .map_err(io_err("cloning pg_control"))?;
            failpoint::hit("create.before_backup_stop");
            let end = session.finish()?;
            write_private(&self.user, &dst.join("backup_label"), &end.backup_label)?;
            if let Some(map) = &end.tablespace_map {
                write_private(&self.user, &dst.join("tablespace_map"), map)?;
            }
            backup::start_wal_file(&end.backup_label).ok_or_else(|| {
                Error::Other(format!(
                    "unexpected backup_label from the parent:\n{}",
                    end.backup_label
                ))
            })?
        } else {
            let redo = cluster::redo_wal_file(&pg, &self.user, &src)?;
            cloner
                .clone_tree(&src, &dst, &|rel, is_dir| {
                    if is_dir && rel == Path::new("pg_wal") {
                        Visit::EmptyDir
                    } else {
                        backup::stopped_exclusion(rel, is_dir)
                    }
                })
                .map_err(io_err(format!("cloning {}", src.display())))?;
            redo
        };
        tracing::debug!("cloned data files in {:?}", t0.elapsed());
        // WAL last: for a live parent it now holds the backup's end.
        let wal_src = src.join("pg_wal");
        let wal_dst = dst.join("pg_wal");
        let archive_status = wal_dst.join("archive_status");
        if !archive_status.exists() {
            cloner
                .make_dir(&wal_src.join("archive_status"), &archive_status)
                .map_err(io_err("creating pg_wal/archive_status"))?;
        }
        let mut wal: Vec<String> = fs::read_dir(&wal_src)
            .map_err(io_err(format!("reading {}", wal_src.display())))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| backup::wal_needed(n, &first_wal))
            .collect();
        wal.sort();
        for name in &wal {
            cloner
                .clone_file(&src, &Path::new("pg_wal").join(name), &wal_dst.join(name))
                .map_err(io_err(format!("cloning WAL {name}")))?;
        }
        if !wal_dst.join(&first_wal).exists() {
            return Err(Error::Other(format!(
                "WAL file {first_wal} that the clone needs was already recycled by the parent \"{}\" \
                 (it writes WAL faster than wal_keep_size keeps it); nothing was created, try again",
                parent.name
            )));
        }
        cloner
            .give_to_server(&dst)
            .map_err(io_err("giving the clone to the server user"))?;
        Ok(Some(Cloned {
            method: cloner.method(),
            parent_was_running: running,
            fallback_reason: cloner.fallback_reason.take(),
            files: cloner.files,
            bytes: cloner.bytes,
        }))
    }
}
