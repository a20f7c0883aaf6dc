//! Where pgtwig keeps state: `PGTWIG_HOME`, else the platform's data
//! directory (`~/.local/share/pgtwig` on Linux, `~/Library/Application
//! Support/pgtwig` on macOS). Root gets `/var/lib/pgtwig`, because the
//! PostgreSQL servers then run as an unprivileged user who cannot enter
//! `/root`. One folder per project:
//!
//! ```text
//! <home>/<project>/
//!     lock            the project lock (see fsutil::ProjectLock)
//!     state.json      project-wide state (the active branch, …)
//!     branches/<name>/branch.json, data/, server.log
//!     tmp/            branches being built; removed if a command died
//! ```

use std::path::{Path, PathBuf};

use crate::names::BranchName;

pub const HOME_ENV: &str = "PGTWIG_HOME";

/// The state root for all projects.
pub fn pgtwig_home() -> Result<PathBuf, String> {
    if let Some(h) = std::env::var_os(HOME_ENV).filter(|h| !h.is_empty()) {
        let h = PathBuf::from(h);
        return Ok(if h.is_absolute() {
            h
        } else {
            std::env::current_dir().map_err(|e| e.to_string())?.join(h)
        });
    }
    if nix::unistd::geteuid().is_root() {
        return Ok(PathBuf::from("/var/lib/pgtwig"));
    }
    dirs::data_dir().map(|d| d.join("pgtwig")).ok_or_else(|| {
        format!(
            "cannot find your data directory; set {HOME_ENV} to where pgtwig should keep its state"
        )
    })
}

/// One project's state folder and the paths inside it.
#[derive(Debug, Clone)]
pub struct ProjectHome {
    dir: PathBuf,
}

impl ProjectHome {
    pub fn new(home: &Path, project: &BranchName) -> ProjectHome {
        ProjectHome {
            dir: home.join(project.as_str()),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn lock_path(&self) -> PathBuf {
        self.dir.join("lock")
    }
    pub fn state_path(&self) -> PathBuf {
        self.dir.join("state.json")
    }
    pub fn branches_dir(&self) -> PathBuf {
        self.dir.join("branches")
    }
    pub fn branch_dir(&self, name: &BranchName) -> PathBuf {
        self.branches_dir().join(name.as_str())
    }
    pub fn tmp_dir(&self) -> PathBuf {
        self.dir.join("tmp")
    }
}
