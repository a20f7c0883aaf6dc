//! Branches made or changed out of sight before they appear: an
//! anonymized clone ([`LocalBackend::create_prepared`]), a branch whose
//! app database an import fills anew ([`LocalBackend::replace_database`])
//! and a reset ([`LocalBackend::reset`]). Each runs from a build folder in
//! `tmp/` and publishes by rename only when done.

use std::fs;
use std::path::Path;

use pgtwig_core::{failpoint, BranchName};

use crate::beneath;
use crate::clone::CloneMethod;
use crate::cluster;
use crate::engine::{
    io_err, now_rfc3339, remove_tree, sync_tree, write_meta, Branch, BranchMeta, CreateReport,
    Error, LocalBackend, Result,
};
use crate::pgbin;

/// What [`LocalBackend::replace_database`] did.
#[derive(Debug, Clone)]
pub struct Replaced {
    /// The branch, with its database filled anew.
    pub branch: Branch,
    /// Where its previous state was kept, when it held data.
    pub kept: Option<BranchName>,
    /// It held data, and that was dropped (no branch to keep it in was asked for).
    pub dropped: bool,
}

impl LocalBackend {
    /// Create `name` from `parent` and let `prepare` change it before it
    /// becomes visible: the clone is started from its build folder (socket
    /// folder passed to `prepare`), changed, stopped, and only then
    /// published. Built for anonymized branches, so it also leaves no old
    /// WAL behind: the server runs without WAL recycling, and after its
    /// clean shutdown every WAL segment before the last checkpoint is
    /// deleted, as is the build's server log. `prepare` should end with
    /// `CHECKPOINT` after `pg_switch_wal()`. A failing `prepare` leaves
    /// nothing behind.
    pub fn create_prepared(
        &self,
        name: &BranchName,
        parent: &BranchName,
        prepare: &mut dyn FnMut(&Path) -> std::result::Result<(), String>,
    ) -> Result<CreateReport> {
        // The clone under the project lock (a stopped parent must stay stopped while it is
        // copied); the long part, `prepare`, without it, beside other commands and the hook.
        let (parent_branch, unlocked) = {
            let _lock = self.lock_for_new(name)?;
            let parent_branch = self.get(parent)?;
            self.check_space_for_rewrite(name, &parent_branch)?;
            (parent_branch, self.new_build_dir_unlocked(name)?)
        };
        let build = unlocked.dir.clone();
        let result = (|| {
            let cloned = {
                let _lock = self.lock()?;
                self.build_clone(&parent_branch, &build)?
            };
            let pg = self.install_for(&parent_branch)?;
            let data = build.join("data");
            let log = build.join("prepare.log");
            let settings = [
                "wal_recycle=off",
                "wal_keep_size=0",
                "max_wal_senders=0",
                "archive_mode=off",
            ];
            self.with_build_server(name, &pg, &build, &log, &settings, |sock| {
                failpoint::hit("prepare.unlocked");
                prepare(sock).map_err(Error::Other)
            })?;
            let redo = cluster::redo_wal_file(&pg, &self.user, &data)?;
            // Through descriptors, never a link: the data directory is the
            // server user's and this may run as root (a pg_wal/archive_status
            // swapped for a link to /etc must not make root empty /etc).
            let wal = beneath::open_dir_beneath(&data, Path::new("pg_wal"))
                .map_err(io_err("reading pg_wal"))?;
            for (name, _) in beneath::list_dir(&wal).map_err(io_err("reading pg_wal"))? {
                let n = name.to_string_lossy();
                let old_segment = n.len() >= 24
                    && n[..24].bytes().all(|b| b.is_ascii_hexdigit())
                    && n[8..24] < redo[8..];
                if old_segment {
                    beneath::remove_at(&wal, &name)
                        .map_err(io_err(format!("removing old WAL {n}")))?;
                }
            }
            let status = beneath::open_at(&wal, std::ffi::OsStr::new("archive_status"), true)
                .map_err(io_err("reading archive_status"))?;
            for (name, _) in beneath::list_dir(&status).map_err(io_err("reading archive_status"))? {
                let _ = beneath::remove_at(&status, &name);
            }
            let _ = fs::remove_file(&log);
            let meta = BranchMeta {
                parent: Some(parent.clone()),
                created: now_rfc3339(),
                clone_method: cloned.method,
                pg_major: parent_branch.meta.pg_major,
                git_branch: None,
                expires: None,
                protected: false,
            };
            crate::databases::known::inherit(&parent_branch.dir, &build)
                .map_err(io_err("recording the branch's databases"))?;
            // Published under the lock, if nobody made the name meanwhile.
            let _lock = self.lock_for_new(name)?;
            let branch = self.publish(name, &build, &meta)?;
            Ok(cloned.report(branch))
        })();
        if result.is_err() {
            self.discard_build(&build, &build.join("prepare.log"));
        }
        drop(unlocked);
        result
    }

    /// Fill database `database` of branch `name` anew, keeping the branch's
    /// other databases as they are: the branch (as it is now; a fresh
    /// cluster when there is no such branch) is cloned into a build,
    /// started out of sight, `database` is made empty there and `fill` is
    /// given the build's socket folder to fill it; only when that succeeds
    /// and the build's server stopped cleanly does the build replace the
    /// branch. Until then the branch is untouched and in service; a
    /// failure leaves nothing behind. For `pgtwig import`. The long fill
    /// runs without the project lock (the clone and the swap take it), so
    /// what the branch's other databases get meanwhile is not carried
    /// over. A replaced running branch is started again.
    ///
    /// When `database` on the branch holds anything a user made
    /// ([`databases::has_user_objects`](crate::databases::has_user_objects)), the branch's
    /// previous state is kept as branch `keep` (as `reset --keep-old` does; taken: an error,
    /// before anything changes); `None` drops it.
    pub fn replace_database(
        &self,
        name: &BranchName,
        database: &str,
        keep: Option<&BranchName>,
        fill: &mut dyn FnMut(&Path) -> std::result::Result<(), String>,
    ) -> Result<Replaced> {
        let unlocked = self.new_build_dir_unlocked(name)?;
        let build = unlocked.dir.clone();
        let log = build.join("server.log");
        let result = (|| {
            let (pg, cloned) = {
                let _lock = self.lock()?;
                // A branch that exists but cannot be read is an error, not a
                // reason to start from an empty cluster (that would drop its other databases).
                let old = if self.exists(name) {
                    Some(self.get(name)?)
                } else {
                    None
                };
                match old {
                    Some(old) => {
                        let cloned = self.build_clone(&old, &build)?;
                        (self.install_for(&old)?, Some((old, cloned.method)))
                    }
                    None => {
                        let pg = pgbin::newest()?;
                        cluster::initdb(&pg, &self.user, &build.join("data"), &log)?;
                        (pg, None)
                    }
                }
            };
            let had_data = self.with_build_server(name, &pg, &build, &log, &[], |sock| {
                // The clone is the branch as it is: what it holds now is what would be lost.
                let had_data = cloned.is_some()
                    && crate::databases::has_user_objects(sock, database).map_err(|e| {
                        Error::Other(format!("looking into database \"{database}\": {e}"))
                    })?;
                crate::databases::recreate(sock, database).map_err(|e| {
                    Error::Other(format!("making database \"{database}\" empty: {e}"))
                })?;
                fill(sock).map_err(Error::Other)?;
                Ok(had_data)
            })?;
            Ok((pg, cloned, had_data))
        })();
        let (pg, cloned, had_data) = match result {
            Ok(r) => r,
            Err(e) => {
                self.discard_build(&build, &log);
                return Err(e);
            }
        };
        // Only the swap needs the lock: the long fill ran beside other commands.
        let _lock = self.lock()?;
        let keep = keep.filter(|_| had_data);
        if let Some(k) = keep.filter(|k| self.exists(k)) {
            self.discard_build(&build, &log);
            return Err(Error::Exists { name: k.clone() });
        }
        let meta = match cloned {
            // Still the same branch, refreshed: what it was made for stays.
            Some((old, method)) => BranchMeta {
                created: now_rfc3339(),
                clone_method: method,
                pg_major: pg.major,
                ..old.meta
            },
            None => BranchMeta {
                parent: None,
                created: now_rfc3339(),
                clone_method: CloneMethod::Initdb,
                pg_major: pg.major,
                git_branch: None,
                expires: None,
                protected: false,
            },
        };
        write_meta(&build, &meta)?;
        crate::databases::known::record(&build, &[database])
            .map_err(crate::engine::io_err("recording the branch's databases"))?;
        sync_tree(&build)?;
        let branch = if self.exists(name) {
            let was_running = self.swap_in(name, &build, keep)?;
            self.restart_after_swap(name, was_running)?;
            self.get(name)?
        } else {
            self.publish(name, &build, &meta)?
        };
        Ok(Replaced {
            branch,
            kept: keep.cloned(),
            dropped: had_data && keep.is_none(),
        })
    }

    /// Make sure branch `name` holds database `database` (starting the
    /// branch): the app's database on a branch made before `.pgtwig.toml`
    /// named it. Returns whether it had to be made.
    pub fn ensure_database(&self, name: &BranchName, database: &str) -> Result<bool> {
        let sock = self.start(name)?;
        let made = crate::databases::create_if_missing(&sock, database).map_err(|e| {
            Error::Other(format!(
                "creating database \"{database}\" on branch \"{name}\": {e}"
            ))
        })?;
        crate::databases::known::record(&self.get(name)?.dir, &[database])
            .map_err(crate::engine::io_err("recording the branch's databases"))?;
        Ok(made)
    }

    /// Whether pgtwig's record says branch `name` holds `database` (see
    /// [`databases::known`](crate::databases::known)); false when it does not know.
    pub fn recorded_database(&self, name: &BranchName, database: &str) -> bool {
        self.get(name)
            .ok()
            .and_then(|b| crate::databases::known::read(&b.dir))
            .is_some_and(|known| known.iter().any(|k| k == database))
    }

    /// Re-derive `name` from its parent's current state, under the same
    /// name. The old branch is removed, or kept as `keep_old`. A running
    /// branch is stopped for the swap and started again after. The clone of a
    /// running parent is made without the project lock (see
    /// [`build_clone_if_running`](Self::build_clone_if_running)); a stopped
    /// parent is copied under it, and the swap always runs under it.
    pub fn reset(&self, name: &BranchName, keep_old: Option<&BranchName>) -> Result<CreateReport> {
        let (_, parent) = self.reset_source(name, keep_old)?;
        self.check_space_for_clone(name, &parent)?;
        let unlocked = self.new_build_dir_unlocked(name)?;
        let build = unlocked.dir.clone();
        let result = (|| {
            let cloned = match self.build_clone_if_running(&parent, &build) {
                Ok(Some(c)) => c,
                // Stopped (now, or meanwhile: the daemon suspends idle branches): copy it
                // under the lock, so nobody starts it during the copy.
                first => {
                    if let Err(e) = first {
                        tracing::info!(
                            "cloning the running \"{}\" failed ({e}); cloning it again under the lock",
                            parent.name
                        );
                        remove_tree(&build)?;
                        self.make_build_dir(build.clone())?;
                    }
                    let _lock = self.lock()?;
                    let parent = self.get(&parent.name)?;
                    self.build_clone(&parent, &build)?
                }
            };
            let _lock = self.lock()?;
            // Again under the lock: the branch or its parent may have gone meanwhile.
            let (old, parent) = self.reset_source(name, keep_old)?;
            let meta = BranchMeta {
                parent: Some(parent.name.clone()),
                created: now_rfc3339(),
                clone_method: cloned.method,
                pg_major: parent.meta.pg_major,
                git_branch: old.meta.git_branch.clone(),
                expires: old.meta.expires.clone(),
                protected: old.meta.protected,
            };
            crate::databases::known::inherit(&parent.dir, &build)
                .map_err(io_err("recording the branch's databases"))?;
            write_meta(&build, &meta)?;
            sync_tree(&build)?;
            let was_running = self.swap_in(name, &build, keep_old)?;
            let branch = self.get(name)?;
            self.restart_after_swap(name, was_running)?;
            Ok(cloned.report(branch))
        })();
        if result.is_err() && build.exists() {
            self.discard_build(&build, &build.join("server.log"));
        }
        drop(unlocked);
        result
    }

    /// The branch to reset and its parent, or why it cannot be reset.
    fn reset_source(
        &self,
        name: &BranchName,
        keep_old: Option<&BranchName>,
    ) -> Result<(Branch, Branch)> {
        let old = self.get(name)?;
        let parent = match &old.meta.parent {
            None => {
                return Err(Error::NoParent {
                    name: name.clone(),
                    why: " (it is the root branch; refresh its data with an import instead)".into(),
                })
            }
            Some(p) if !self.exists(p) => {
                return Err(Error::NoParent {
                    name: name.clone(),
                    why: format!(
                        " (its parent \"{p}\" was deleted); delete it and create it again with `--from <another branch>`"
                    ),
                })
            }
            Some(p) => self.get(p)?,
        };
        if let Some(k) = keep_old {
            if self.exists(k) {
                return Err(Error::Exists { name: k.clone() });
            }
        }
        Ok((old, parent))
    }
}
