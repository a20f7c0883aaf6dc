//! Where pgtwig keeps state: `PGTWIG_HOME`, else the folder `pgtwig init`
//! recorded in the repository's git config (`pgtwig.home`), else the platform's data
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
//!
//! The project folder is private: 0700, or — when pgtwig runs as root and
//! the servers as another user — root's with that user's group and 0710,
//! so the server user can pass through to the folders it writes (a
//! branch's `data/`, `wal-archive/`) but can neither list nor change
//! anything else. Every file pgtwig writes here is 0600 (see
//! [`crate::private`]).

use std::path::{Path, PathBuf};

use crate::names::BranchName;
use crate::private;

pub const HOME_ENV: &str = "PGTWIG_HOME";
/// The git config key (in the repository's shared config) where `pgtwig init` records the
/// state root, so a shell, IDE or cron job without `PGTWIG_HOME` finds the same state.
pub const GIT_CONFIG_KEY: &str = "pgtwig.home";

/// Where the state root was found, for messages that must say where pgtwig looked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HomeSource {
    /// The `PGTWIG_HOME` variable.
    Env,
    /// `pgtwig.home` in this git config file.
    Recorded { config_file: PathBuf },
    /// The platform default (neither of the above was set).
    Default,
}

impl std::fmt::Display for HomeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HomeSource::Env => write!(f, "from {HOME_ENV}"),
            HomeSource::Recorded { config_file } => write!(
                f,
                "recorded as {GIT_CONFIG_KEY} in {} ({HOME_ENV} is not set)",
                config_file.display()
            ),
            HomeSource::Default => write!(
                f,
                "the default: {HOME_ENV} is not set and the repository records no {GIT_CONFIG_KEY}"
            ),
        }
    }
}

/// The state root for all projects and where it came from.
#[derive(Debug, Clone)]
pub struct StateRoot {
    pub dir: PathBuf,
    pub source: HomeSource,
}

/// The state root: `PGTWIG_HOME`, else `recorded` (the repository's `pgtwig.home` and the
/// git config file holding it), else the platform default.
pub fn locate(recorded: Option<(PathBuf, PathBuf)>) -> Result<StateRoot, String> {
    if let Some(h) = std::env::var_os(HOME_ENV).filter(|h| !h.is_empty()) {
        return Ok(StateRoot {
            dir: absolute(PathBuf::from(h))?,
            source: HomeSource::Env,
        });
    }
    if let Some((dir, config_file)) = recorded {
        return Ok(StateRoot {
            dir: absolute(dir)?,
            source: HomeSource::Recorded { config_file },
        });
    }
    Ok(StateRoot {
        dir: default_home()?,
        source: HomeSource::Default,
    })
}

/// The state root from `PGTWIG_HOME` or the platform default (no repository consulted).
pub fn pgtwig_home() -> Result<PathBuf, String> {
    locate(None).map(|r| r.dir)
}

fn absolute(p: PathBuf) -> Result<PathBuf, String> {
    Ok(if p.is_absolute() {
        p
    } else {
        std::env::current_dir().map_err(|e| e.to_string())?.join(p)
    })
}

fn default_home() -> Result<PathBuf, String> {
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
    source: Option<HomeSource>,
}

impl ProjectHome {
    pub fn new(home: &Path, project: &BranchName) -> ProjectHome {
        ProjectHome {
            dir: home.join(project.as_str()),
            source: None,
        }
    }

    /// Notes where the state root came from (see [`locate`]).
    pub fn with_source(mut self, source: HomeSource) -> ProjectHome {
        self.source = Some(source);
        self
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The folder holding every project's state (what `PGTWIG_HOME` names).
    pub fn state_root(&self) -> &Path {
        self.dir.parent().unwrap_or(&self.dir)
    }

    /// "pgtwig has no state for this project in …": where it looked, where that came from,
    /// and what to do (not only `pgtwig init`, which would make a second, empty project).
    pub fn missing_state_message(&self) -> String {
        let came_from = match &self.source {
            Some(s) => format!(" (the state folder {s})"),
            None => String::new(),
        };
        format!(
            "pgtwig has no state for this project in {}{came_from}. If this project was set up \
             with its state elsewhere, point pgtwig at that folder: set {HOME_ENV}, or record it for \
             the repository with `git config {GIT_CONFIG_KEY} FOLDER`. Only if the project was never \
             set up on this machine, run `pgtwig init` in the repository",
            self.dir.display()
        )
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

    /// Create the project folder if missing and make it and the files pgtwig
    /// keeps at its top private (an existing project made by an older pgtwig
    /// is tightened). `pass_through` is the group of a server user other than
    /// us that must reach folders inside (see the module notes): the folder
    /// is then ours, that group's, mode 0710; otherwise 0700.
    pub fn make_private(&self, pass_through: Option<u32>) -> std::io::Result<()> {
        if let Some(parent) = self.dir.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let (mode, uid) = folder_mode(pass_through);
        private::make_dir(&self.dir, mode, uid, pass_through)?;
        for name in TOP_FILES {
            private::secure_file(&self.dir.join(name))?;
        }
        let tls = self.dir.join("tls");
        if tls.is_dir() {
            private::secure_dir(&tls, 0o700, uid, None)?;
            for name in ["cert.pem", "key.pem"] {
                private::secure_file(&tls.join(name))?;
            }
        }
        Ok(())
    }
}

/// Files pgtwig keeps at the top of a project folder, tightened to 0600 by
/// [`ProjectHome::make_private`] in projects made before they were
/// private from the start.
const TOP_FILES: &[&str] = &[
    "lock",
    "lock.holder",
    "state.json",
    "daemon.lock",
    "daemon.pid",
    "daemon.log",
    "neon-branches.json",
    "anonymize.salt",
];

/// Mode and owner of a folder pgtwig keeps: 0700, or 0710 (owner root,
/// since only root runs servers as someone else) when the server user's
/// group `pass_through` must traverse it.
pub fn folder_mode(pass_through: Option<u32>) -> (u32, Option<u32>) {
    match pass_through {
        Some(_) => (0o710, Some(nix::unistd::geteuid().as_raw())),
        None => (0o700, None),
    }
}
