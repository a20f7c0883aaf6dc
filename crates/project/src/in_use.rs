//! No silent misroute: deleting or resetting a branch that is some work tree's active
//! branch. Without `--force` it is refused, naming the work trees, and nothing changes.
//! With it, a delete moves each of those work trees to the parent its `[[map]]` rule gives
//! (else the root) before the branch goes, and the branch's sessions are ended with a
//! message naming both branches; a reset keeps them on the same name and tells the sessions
//! their data is being replaced.

use anyhow::{bail, Result};
use pgtwig_core::rules;
use pgtwig_core::state::{ProjectState, WorktreeOn};
use pgtwig_core::{BranchName, Config};

use crate::backend::Backend;
use crate::checkout::record_active;
use crate::Project;

/// What is about to happen to the branch.
pub enum Change {
    Delete,
    /// Re-derived from `parent` (when known).
    Reset {
        parent: Option<String>,
    },
}

/// A work tree whose active branch is the one being changed, and where it goes.
pub struct Affected {
    pub worktree: WorktreeOn,
    /// The branch it falls back to (for a reset: the same one).
    pub fallback: BranchName,
}

/// The work trees on `name`, refusing the change unless `force`. `command` is how the
/// user reruns it with `--force` (e.g. "pgtwig branch delete x").
pub fn check(
    project: &Project,
    backend: &Backend,
    name: &BranchName,
    change: &Change,
    force: bool,
    command: &str,
) -> Result<Vec<Affected>> {
    // The root is never deleted or reset, and a missing branch is reported as such: the
    // command's own error says so.
    if *name == project.config.root_branch || !backend.exists(name).unwrap_or(false) {
        return Ok(Vec::new());
    }
    let Ok(state) = ProjectState::load(&project.home.state_path()) else {
        return Ok(Vec::new());
    };
    let on = state.worktrees_on(name);
    if on.is_empty() {
        return Ok(Vec::new());
    }
    let mut affected = Vec::new();
    for worktree in on {
        let fallback = match change {
            Change::Reset { .. } => name.clone(),
            Change::Delete => fallback_of(project, backend, &worktree, name),
        };
        affected.push(Affected { worktree, fallback });
    }
    if force {
        return Ok(affected);
    }
    let whose = affected
        .iter()
        .map(|a| a.worktree.to_string())
        .collect::<Vec<_>>()
        .join(" and of ");
    match change {
        Change::Delete => {
            let falls = affected
                .iter()
                .map(|a| format!("{} falls back to \"{}\"", a.worktree, a.fallback))
                .collect::<Vec<_>>()
                .join(", ");
            bail!(
                "branch \"{name}\" is the active branch of {whose}: deleting it would leave the app there \
                 on a branch that no longer exists. Nothing was changed. Switch that work tree first \
                 (check out another git branch there, or `pgtwig use BRANCH --worktree PATH`), or run \
                 `{command} --force`: then {falls}, and the sessions on \"{name}\" are ended at their \
                 next transaction boundary"
            )
        }
        Change::Reset { parent } => bail!(
            "branch \"{name}\" is the active branch of {whose}: a reset replaces its data under the \
             running app with a fresh copy of {}. Nothing was changed. Run `{command} --force` to go \
             ahead: the work tree stays on \"{name}\" and its sessions are ended at their next \
             transaction boundary, to reconnect to the fresh copy",
            parent
                .as_deref()
                .map(|p| format!("\"{p}\""))
                .unwrap_or_else(|| "its parent".into())
        ),
    }
}

/// Where `worktree` goes when `gone` is deleted: its own `.pgtwig.toml`'s rule for the git
/// branch checked out there, else the root.
fn fallback_of(
    project: &Project,
    backend: &Backend,
    worktree: &WorktreeOn,
    gone: &BranchName,
) -> BranchName {
    let dir = worktree.dir.as_deref().unwrap_or(&project.root);
    let config = Config::discover(dir)
        .map(|(c, _)| c)
        .unwrap_or_else(|_| project.config.clone());
    let git = pgtwig_git::Worktree::discover(dir)
        .and_then(|w| w.head())
        .ok()
        .and_then(|h| match h {
            pgtwig_git::Head::Branch(b) => Some(b),
            pgtwig_git::Head::Detached => None,
        });
    rules::fallback(
        &config.map,
        git.as_deref(),
        &crate::user_name(),
        &project.config.root_branch,
        gone,
        |p| backend.exists(p).unwrap_or(false),
    )
}

/// Move the affected work trees to their fallbacks in state.json before the branch is
/// deleted, so reconnecting sessions land on the fallback; `tell_daemon` is called after
/// each move (the daemon must route there before the branch goes).
pub fn move_away(
    project: &Project,
    backend: &Backend,
    affected: &[Affected],
    tell_daemon: &dyn Fn(&BranchName) -> Result<()>,
) -> Result<()> {
    for a in affected {
        let dir = if a.worktree.main {
            None
        } else {
            a.worktree.dir.as_deref()
        };
        record_active(project, backend, &a.fallback, dir)?;
        tell_daemon(&a.fallback)?;
    }
    Ok(())
}

/// What the branch's sessions are told when they are ended.
pub fn drain_message(name: &BranchName, change: &Change, affected: &[Affected]) -> String {
    match change {
        Change::Delete if affected.is_empty() => {
            format!("pgtwig is deleting database branch \"{name}\"; reconnect to continue")
        }
        Change::Delete => format!(
            "pgtwig is deleting database branch \"{name}\"; {}; reconnect to continue",
            affected
                .iter()
                .map(|a| format!("{} now uses \"{}\"", a.worktree, a.fallback))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Change::Reset { parent } => format!(
            "pgtwig is resetting database branch \"{name}\" to a fresh copy of {}; reconnect to continue",
            parent
                .as_deref()
                .map(|p| format!("\"{p}\""))
                .unwrap_or_else(|| "its parent".into())
        ),
    }
}

/// What the user is told after a forced delete, a line per work tree.
pub fn moved_lines(name: &BranchName, affected: &[Affected]) -> Vec<String> {
    affected
        .iter()
        .map(|a| {
            format!(
                "{} now uses branch \"{}\" (its branch \"{name}\" was deleted)",
                capitalized(&a.worktree.to_string()),
                a.fallback
            )
        })
        .collect()
}

fn capitalized(text: &str) -> String {
    let mut c = text.chars();
    match c.next() {
        Some(f) => f.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
