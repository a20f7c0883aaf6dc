//! Branches made or changed out of sight before they appear: an
//! anonymized clone ([`LocalBackend::create_prepared`]), a fresh cluster
//! filled by an import ([`LocalBackend::fill_fresh`]) and a reset
//! ([`LocalBackend::reset`]). Both run a server
//! from the build folder in `tmp/` and publish by rename only when done.

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
            (self.get(parent)?, self.new_build_dir_unlocked(name)?)
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

    /// Make `name` a fresh cluster filled by `fill` (given the socket folder
    /// of the new cluster, running from its build folder), replacing the
    /// branch of that name if there is one — atomically: until `fill`
    /// succeeds and the new cluster is stopped cleanly, the old branch is
    /// untouched and in service; a failure leaves nothing behind. For
    /// `pgtwig import`. A replaced running branch is started again.
    pub fn fill_fresh(
        &self,
        name: &BranchName,
        fill: &mut dyn FnMut(&Path) -> std::result::Result<(), String>,
    ) -> Result<Branch> {
        let pg = pgbin::newest()?;
        let unlocked = self.new_build_dir_unlocked(name)?;
        let build = unlocked.dir.clone();
        let result = (|| {
            let data = build.join("data");
            let log = build.join("server.log");
            cluster::initdb(&pg, &self.user, &data, &log)?;
            self.with_build_server(name, &pg, &build, &log, &[], |sock| {
                fill(sock).map_err(Error::Other)
            })
        })();
        if let Err(e) = result {
            self.discard_build(&build, &build.join("server.log"));
            return Err(e);
        }
        // Only the swap needs the lock: the long fill ran beside other commands.
        let _lock = self.lock()?;
        let old = self.get(name).ok();
        let meta = BranchMeta {
            parent: old.as_ref().and_then(|b| b.meta.parent.clone()),
            created: now_rfc3339(),
            clone_method: CloneMethod::Initdb,
            pg_major: pg.major,
            git_branch: old.as_ref().and_then(|b| b.meta.git_branch.clone()),
            expires: None,
            protected: old.as_ref().is_some_and(|b| b.meta.protected),
        };
        write_meta(&build, &meta)?;
        sync_tree(&build)?;
        if old.is_some() || self.exists(name) {
            let was_running = self.swap_in(name, &build, None)?;
            if was_running {
                self.start_locked(name)?;
            }
            self.get(name)
        } else {
            self.publish(name, &build, &meta)
        }
    }

    /// Re-derive `name` from its parent's current state, under the same
    /// name. The old branch is removed, or kept as `keep_old`. A running
    /// branch is stopped for the swap and started again after. The clone of a
    /// running parent is made without the project lock (see
    /// [`build_clone_if_running`](Self::build_clone_if_running)); a stopped
    /// parent is copied under it, and the swap always runs under it.
    pub fn reset(&self, name: &BranchName, keep_old: Option<&BranchName>) -> Result<CreateReport> {
        let (_, parent) = self.reset_source(name, keep_old)?;
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
            write_meta(&build, &meta)?;
            sync_tree(&build)?;
            let was_running = self.swap_in(name, &build, keep_old)?;
            let branch = self.get(name)?;
            if was_running {
                self.start_locked(name)?;
            }
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
