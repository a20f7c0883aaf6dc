//! A pgtwig project as the commands and the daemon see it, and the policy both follow.
//!
//! - [`Project`]: `.pgtwig.toml` found from a folder upwards, and the project's state folder.
//! - [`backend`]: the local and Neon backends behind one set of operations.
//! - [`checkout`]: what a git checkout in a work tree means — which database branch its
//!   `[[map]]` rules give, making it (and running the approved `post_create` commands), and
//!   recording it as that work tree's active branch. The git hook (through the CLI) and the
//!   daemon's HEAD watcher both call it; the daemon never re-runs the CLI binary.
//! - [`doctor`]: what this machine and project need (`pgtwig doctor`, and `init`'s checks).
//! - [`gc`]: which branches `pgtwig gc` may collect and why.
//! - [`in_use`]: deleting or resetting a branch some work tree is on (`--force`, fallbacks).
//! - [`approval`]: whether commands that came with the repository were approved
//!   (`pgtwig trust`).
//!
//! Nothing here prints: results come back as values, and what a person should read on the
//! way comes through a [`Report`].

pub mod approval;
pub mod backend;
pub mod checkout;
pub mod doctor;
pub mod gc;
pub mod in_use;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use pgtwig_core::{home, Config, ProjectHome};

pub use backend::{already_exists, Backend, Neon};

/// Where what a person should read goes while policy runs: the terminal for the git hook
/// (stdout for what happened, stderr for what was skipped or went wrong), the daemon's log
/// for its HEAD watcher.
pub trait Report {
    /// Something that happened ("created database branch ...").
    fn info(&mut self, line: &str);
    /// Something skipped or gone wrong that did not stop the command.
    fn warn(&mut self, line: &str);
    /// Whether commands run on the way (`post_create`) hand their output to this report
    /// line by line (the daemon's log) rather than writing to the terminal themselves.
    fn captures_command_output(&self) -> bool {
        false
    }
}

/// A [`Report`] that keeps the lines, for tests and callers that print them later.
#[derive(Default, Debug)]
pub struct Lines {
    pub info: Vec<String>,
    pub warn: Vec<String>,
}

impl Report for Lines {
    fn info(&mut self, line: &str) {
        self.info.push(line.to_string());
    }
    fn warn(&mut self, line: &str) {
        self.warn.push(line.to_string());
    }
}

/// The OS user's name, for `{user}` in `[[map]]` templates.
pub fn user_name() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "dev".into())
}

/// A duration for people: "1.5 s", "120 ms".
pub fn human_duration(d: Duration) -> String {
    if d.as_secs() >= 1 {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} ms", d.as_millis())
    }
}

pub struct Project {
    pub config: Config,
    /// The folder holding `.pgtwig.toml` (the repository's work tree).
    pub root: PathBuf,
    pub home: ProjectHome,
}

impl Project {
    /// The project of the current directory.
    pub fn discover() -> Result<Project> {
        let cwd = std::env::current_dir().context("cannot read the current directory")?;
        Project::discover_in(&cwd)
    }

    /// The project of folder `dir` (e.g. a work tree the daemon saw a checkout in): the
    /// `.pgtwig.toml` checked out there.
    pub fn discover_in(dir: &Path) -> Result<Project> {
        let (config, root) = Config::discover(dir)?;
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

impl Project {
    /// Every branch has the app's database: a new branch whose parent is not known to hold it
    /// (made before `database` named it in .pgtwig.toml, or by an older pgtwig) is checked,
    /// starting it, and the database is made there when missing, saying so. A branch whose
    /// record says it has it costs nothing. Neon branches carry their parent's databases.
    pub fn ensure_app_database(
        &self,
        backend: &Backend,
        name: &pgtwig_core::BranchName,
        report: &mut dyn Report,
    ) -> Result<()> {
        let Backend::Local(b) = backend else {
            return Ok(());
        };
        let database = self.config.database();
        if b.recorded_database(name, database) {
            return Ok(());
        }
        if b.ensure_database(name, database)? {
            report.info(&format!(
                "created database \"{database}\" on \"{name}\" (the app's, from .pgtwig.toml; its parent has none)"
            ));
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
