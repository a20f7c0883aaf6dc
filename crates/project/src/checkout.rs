//! What a git checkout in a work tree means for its database branch, done in one place for
//! the git hook (through the CLI) and the daemon's HEAD watcher: the `[[map]]` rules of the
//! `.pgtwig.toml` checked out there give the branch; a missing one is made from the rule's
//! parent (unless `create = "never"`), its approved `post_create` commands run against the
//! app's database, and it becomes that work tree's active branch in `state.json`.
//!
//! Telling a running daemon is the caller's part ([`Outcome::changed`]): the CLI sends it a
//! control request, the daemon reloads its own routes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use pgtwig_core::rules::{self, CreatePolicy};
use pgtwig_core::state::ProjectState;
use pgtwig_core::BranchName;
use pgtwig_git::{Head, Worktree};
use pgtwig_local::LocalBackend;

use crate::backend::{already_exists, Backend};
use crate::{human_duration, user_name, Project, Report};

/// What following a checkout did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A detached HEAD (rebase, bisect): the work tree keeps its branch.
    Detached,
    /// No rule matches the git branch: the work tree keeps its branch.
    NoRule,
    /// The rule's branch does not exist and its rule says `create = "never"`.
    NotCreated,
    /// The work tree is on `branch` now (made by this call when `created`).
    Active {
        branch: BranchName,
        /// Its branch before, when it had one.
        old: Option<BranchName>,
        created: bool,
        /// The work tree's top folder (None: not found, the main one is meant).
        worktree: Option<PathBuf>,
        /// Whether that is the repository's main work tree.
        main: bool,
    },
}

impl Outcome {
    /// Whether the work tree's active branch changed: a running daemon must be told.
    pub fn changed(&self) -> bool {
        matches!(self, Outcome::Active { branch, old, .. } if old.as_ref() != Some(branch))
    }
}

/// Follows the checkout in the work tree containing `dir`: see the module documentation.
/// Errors (a busy project, a failed create) leave the work tree's branch as it was.
pub fn follow(
    project: &Project,
    backend: &Backend,
    dir: &Path,
    report: &mut dyn Report,
) -> Result<Outcome> {
    let wt = Worktree::discover(dir)?;
    let Head::Branch(git) = wt.head()? else {
        return Ok(Outcome::Detached);
    };
    let state = project.load_state()?;
    let root = wt.root().map(pgtwig_core::fsutil::canonical);
    let current = state.branch_of(root.as_deref());
    let holders = Holders::of(backend)?;
    let Some(target) = rules::resolve(
        &project.config.map,
        &git,
        &user_name(),
        &project.config.root_branch,
        |name| holders.holder(name),
    ) else {
        report.info(&format!(
            "no [[map]] rule matches git branch \"{git}\"; staying on database branch \"{current}\""
        ));
        return Ok(Outcome::NoRule);
    };
    let mut created = false;
    if holders.holder(&target.branch).is_none() {
        if target.create == CreatePolicy::Never {
            report.info(&format!(
                "database branch \"{}\" does not exist (create = \"never\" for git branch \"{git}\"); \
                 staying on \"{current}\"",
                target.branch
            ));
            return Ok(Outcome::NotCreated);
        }
        project.check_parent(&target.parent)?;
        let started = Instant::now();
        match backend.create_recorded(
            &target.branch,
            &target.parent,
            Some(git.clone()),
            None,
            target.protected,
        ) {
            Ok(how) => {
                created = true;
                report.info(&format!(
                    "created database branch \"{}\" from \"{}\" for git branch \"{git}\" ({how}, {})",
                    target.branch,
                    target.parent,
                    human_duration(started.elapsed())
                ));
                if let Err(e) = project.ensure_app_database(backend, &target.branch, report) {
                    report.warn(&format!("{e:#}"));
                }
                run_post_create(project, backend, &target, report);
            }
            // Made meanwhile by another pgtwig (the hook and the HEAD watcher race).
            Err(e) if already_exists(&e) => {}
            Err(e) => return Err(e),
        }
    }
    let main = root.as_deref().is_none_or(|r| state.is_main_worktree(r));
    let (old, branch) = record_active(project, backend, &target.branch, root.as_deref())?;
    if old.as_ref() != Some(&branch) {
        match (&root, main) {
            (Some(r), false) => report.info(&format!(
                "database branch \"{branch}\" for work tree {}",
                r.display()
            )),
            _ => report.info(&format!("database branch \"{branch}\"")),
        }
    }
    Ok(Outcome::Active {
        branch,
        old,
        created,
        worktree: root,
        main,
    })
}

/// Makes `branch` the active branch of work tree `worktree` (None or the main one: the
/// project's) in `state.json`; returns the work tree's branch before and after. The daemon
/// is not told here (see the module documentation).
pub fn record_active(
    project: &Project,
    backend: &Backend,
    branch: &BranchName,
    worktree: Option<&Path>,
) -> Result<(Option<BranchName>, BranchName)> {
    match backend {
        Backend::Local(b) => drop(b.get(branch)?),
        Backend::Neon(n) => drop(n.backend.get(branch.as_str())?),
    }
    let path = project.home.state_path();
    let _lock = backend.lock()?;
    let mut state = ProjectState::load(&path).unwrap_or_else(|_| ProjectState::new(branch.clone()));
    let old = state.set_branch(worktree, branch.clone());
    state
        .save(&path)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok((old, branch.clone()))
}

/// Runs again the `post_create` commands of the `[[map]]` rule that made branch `name` (the
/// git branch recorded when it was made, through the rules checked out now), as a checkout
/// does when it makes the branch: approved lists only, DATABASE_URL at its app database.
/// For `branch reset --post-create`: a reset copies the parent afresh, without what the
/// commands added. An error when no rule made `name` or its rule has no commands.
pub fn rerun_post_create(
    project: &Project,
    backend: &Backend,
    name: &BranchName,
    report: &mut dyn Report,
) -> Result<()> {
    let git = match backend {
        Backend::Local(b) => b.get(name)?.meta.git_branch,
        Backend::Neon(n) => n
            .backend
            .list()?
            .into_iter()
            .find(|b| b.branch.name == name.as_str())
            .and_then(|b| b.git_branch),
    };
    let Some(git) = git else {
        anyhow::bail!(
            "branch \"{name}\" was not made by a [[map]] rule (no git branch is recorded for it), so it \
             has no post_create commands to run again"
        );
    };
    let holders = Holders::of(backend)?;
    let target = rules::resolve(
        &project.config.map,
        &git,
        &user_name(),
        &project.config.root_branch,
        |b| holders.holder(b),
    )
    .filter(|t| t.branch == *name);
    let Some(target) = target.filter(|t| !t.post_create.is_empty()) else {
        anyhow::bail!(
            "no [[map]] rule in the .pgtwig.toml checked out here makes branch \"{name}\" (for git branch \
             \"{git}\") with post_create commands; nothing to run again"
        );
    };
    project.ensure_app_database(backend, name, report)?;
    run_post_create(project, backend, &target, report);
    Ok(())
}

/// Which database branches exist and the git branch each was made for, for collision-free
/// git mapping (one listing, not a lookup per name).
enum Holders<'a> {
    Local(&'a LocalBackend),
    Listed(HashMap<String, Option<String>>),
}

impl<'a> Holders<'a> {
    fn of(backend: &'a Backend) -> Result<Holders<'a>> {
        Ok(match backend {
            Backend::Local(b) => Holders::Local(b),
            Backend::Neon(n) => Holders::Listed(
                n.backend
                    .list()?
                    .into_iter()
                    .map(|b| (b.branch.name, b.git_branch))
                    .collect(),
            ),
        })
    }

    /// `None`: no such branch; `Some(git)`: it exists, made for `git`.
    fn holder(&self, name: &BranchName) -> Option<Option<String>> {
        match self {
            Holders::Local(backend) => {
                if !backend.exists(name) {
                    return None;
                }
                Some(backend.get(name).ok().and_then(|b| b.meta.git_branch))
            }
            Holders::Listed(map) => map.get(name.as_str()).cloned(),
        }
    }
}

/// Runs `post_create` commands with DATABASE_URL straight at the new branch, if `pgtwig
/// trust` approved this exact list (they come with the repository, so with every pull
/// request). A failure is reported; the branch stays.
fn run_post_create(
    project: &Project,
    backend: &Backend,
    target: &rules::Target,
    report: &mut dyn Report,
) {
    let (branch, commands) = (&target.branch, &target.post_create);
    if commands.is_empty()
        || !crate::approval::may_run(project, branch, target.source.file_name(), commands, report)
    {
        return;
    }
    let database = project.config.database();
    let url = match backend.url(branch, database) {
        Ok(u) => u,
        Err(e) => {
            report.warn(&format!("cannot run post_create for \"{branch}\": {e:#}"));
            return;
        }
    };
    for cmd in commands {
        report.info(&format!("post_create (database \"{database}\"): {cmd}"));
        let mut command = Command::new("sh");
        command
            .args(["-c", cmd])
            .current_dir(&project.root)
            .env("DATABASE_URL", &url)
            .env("PGTWIG_BRANCH", branch.as_str());
        let status = if report.captures_command_output() {
            command.output().map(|out| {
                for line in String::from_utf8_lossy(&out.stdout).lines() {
                    report.info(&format!("  {line}"));
                }
                for line in String::from_utf8_lossy(&out.stderr).lines() {
                    report.warn(&format!("  {line}"));
                }
                out.status
            })
        } else {
            command.status()
        };
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                report.warn(&format!(
                    "post_create command `{cmd}` failed ({s}); branch \"{branch}\" was kept"
                ));
                return;
            }
            Err(e) => {
                report.warn(&format!(
                    "cannot run post_create command `{cmd}`: {e}; branch \"{branch}\" was kept"
                ));
                return;
            }
        }
    }
}
