//! Which folder of a project is whose.
//!
//! ```text
//! <project>/                 pgtwig's (0700; as root: root, server group, 0710)
//!     branches/, tmp/        pgtwig's, the same
//!     branches/<name>/       pgtwig's, the same — so server.log, opened by
//!                            pgtwig, cannot be swapped by the server user
//!         branch.json, server.log   pgtwig's, 0600
//!         data/              the server user's, 0700 (PostgreSQL checks it)
//!         wal-archive/       the server user's, 0700 (archive_command writes it)
//!         bases/, bases/<t>/ pgtwig's, as branches/<name>/; bases/<t>/data the server user's
//! ```
//!
//! Other users reach nothing; the server user reaches only what it writes.
//! A project made by an older pgtwig (branch folders owned by the server
//! user, files 0644) is tightened by [`LocalBackend::secure_project`] each
//! time it is opened. That is a few system calls per branch, and it runs
//! before anything in a branch folder is opened, so a link planted there
//! while the folder was the server user's is refused by whatever opens it
//! (see `pgtwig_core::private`).

use std::fs;
use std::io;
use std::path::Path;

use pgtwig_core::private;

use crate::engine::{io_err, LocalBackend, Result};

/// The folders inside a branch folder that are pgtwig's, and the one the
/// server writes.
const OWN_SUBFOLDERS: &[&str] = &["bases"];
const SERVER_SUBFOLDERS: &[&str] = &["wal-archive"];
const BRANCH_FILES: &[&str] = &["branch.json", "server.log"];

impl LocalBackend {
    /// Make the project folder, `branches/`, `tmp/` and every branch folder
    /// private (see the module notes); `branches/` and `tmp/` are created
    /// when missing.
    pub(crate) fn secure_project(&self) -> Result<()> {
        let home = &self.home;
        home.make_private(self.user.pass_through())
            .map_err(io_err(format!("making {} private", home.dir().display())))?;
        for dir in [home.branches_dir(), home.tmp_dir()] {
            match fs::create_dir(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err(format!("creating {}", dir.display()))(e)),
            }
            self.user
                .own_folder(&dir)
                .map_err(io_err(format!("making {} private", dir.display())))?;
        }
        let branches = home.branches_dir();
        let entries =
            fs::read_dir(&branches).map_err(io_err(format!("reading {}", branches.display())))?;
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                self.secure_branch(&entry.path())?;
            }
        }
        Ok(())
    }

    /// One branch folder (or one left in `tmp/` by a reset): the folder
    /// first, so the server user can change nothing in it while its files
    /// are looked at. A folder that vanished meanwhile (a concurrent delete
    /// or reset) is fine: it is never created here.
    pub(crate) fn secure_branch(&self, dir: &Path) -> Result<()> {
        let gone = |e: &io::Error| e.kind() == io::ErrorKind::NotFound;
        let what = || format!("making {} private", dir.display());
        match self.user.own_folder(dir) {
            Err(e) if gone(&e) => return Ok(()),
            other => other.map_err(io_err(what()))?,
        }
        for name in OWN_SUBFOLDERS {
            let sub = dir.join(name);
            match self.user.own_folder(&sub) {
                Err(e) if gone(&e) => continue,
                other => other.map_err(io_err(what()))?,
            }
            for base in fs::read_dir(&sub).into_iter().flatten().flatten() {
                if base.file_type().is_ok_and(|t| t.is_dir()) {
                    match self.user.own_folder(&base.path()) {
                        Err(e) if gone(&e) => {}
                        other => other.map_err(io_err(what()))?,
                    }
                }
            }
        }
        for name in SERVER_SUBFOLDERS {
            match self.user.server_folder(&dir.join(name)) {
                Err(e) if gone(&e) => {}
                other => other.map_err(io_err(what()))?,
            }
        }
        for name in BRANCH_FILES {
            private::secure_file(&dir.join(name)).map_err(io_err(what()))?;
        }
        Ok(())
    }
}
