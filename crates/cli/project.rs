//! Finding the project the command is about: `.pgtwig.toml` from the
//! working directory upwards, and its state folder.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use pgtwig_core::{home, Config, ProjectHome};

pub struct Project {
    pub config: Config,
    /// The folder holding `.pgtwig.toml` (the repository's work tree).
    pub root: PathBuf,
    pub home: ProjectHome,
}

impl Project {
    pub fn discover() -> Result<Project> {
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        let (config, root) = Config::discover(&cwd)?;
        Project::at(config, root)
    }

    /// The project configured by `config` in work tree `root`; its state is under
    /// `PGTWIG_HOME`, else the folder `init` recorded in the repository's git config, else
    /// the platform default.
    pub fn at(config: Config, root: PathBuf) -> Result<Project> {
        let recorded = pgtwig_git::Worktree::discover(&root)
            .ok()
            .and_then(|w| w.recorded_home());
        let state = home::locate(recorded).map_err(anyhow::Error::msg)?;
        let home = ProjectHome::new(&state.dir, &config.project).with_source(state.source);
        Ok(Project { config, root, home })
    }

    /// The project's state.json; a missing one is the "no state for this project" error.
    pub fn load_state(&self) -> Result<pgtwig_core::state::ProjectState> {
        let path = self.home.state_path();
        if !path.exists() {
            anyhow::bail!(self.home.missing_state_message());
        }
        pgtwig_core::state::ProjectState::load(&path).map_err(anyhow::Error::msg)
    }

    /// Refuse `parent` for a new branch when it is the root and the project
    /// says the root holds personal data (`[anonymize] refuse_root_children`).
    pub fn check_parent(&self, parent: &pgtwig_core::BranchName) -> Result<()> {
        if self.config.anonymize.refuse_root_children && *parent == self.config.root_branch {
            anyhow::bail!(
                "branch \"{parent}\" holds personal data and this project refuses branches made straight from it \
                 ([anonymize] refuse_root_children in .pgtwig.toml); derive from the anonymized branch instead \
                 (e.g. `--from anon`, made with `pgtwig anonymize --into anon`)"
            );
        }
        Ok(())
    }
}

/// The database a command looks at, and why that one.
pub struct Database {
    pub name: String,
    /// Said after the name: where it came from.
    pub why: &'static str,
}

impl std::fmt::Display for Database {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "database \"{}\" ({})", self.name, self.why)
    }
}

impl Project {
    /// `--database` when given, else the app's database (`database` in
    /// .pgtwig.toml; see `Config::database` for the defaults).
    pub fn database(&self, flag: Option<&str>) -> Result<Database> {
        if let Some(name) = flag {
            pgtwig_core::config::check_database_name(name)
                .map_err(|e| anyhow::anyhow!("--database: {e}"))?;
            return Ok(Database {
                name: name.to_string(),
                why: "--database",
            });
        }
        let explicit = self.config.database.is_some()
            || self
                .config
                .neon
                .as_ref()
                .is_some_and(|n| n.database.is_some());
        Ok(Database {
            name: self.config.database().to_string(),
            why: if explicit {
                "the app's, from .pgtwig.toml"
            } else {
                "the default; name the app's with `database = \"...\"` in .pgtwig.toml"
            },
        })
    }
}

/// The top of the git work tree containing `start`: the nearest folder with
/// a `.git` entry (a folder, or a file for worktrees and submodules).
pub fn git_toplevel(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .find(|d| d.join(".git").exists())
        .map(Path::to_path_buf)
}
