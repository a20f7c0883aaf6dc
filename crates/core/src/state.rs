//! `state.json`: project-wide state that is not configuration — which
//! branch the proxy routes to. Written atomically; read by the daemon.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::names::BranchName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectState {
    /// The branch of the main work tree: where new proxy connections go unless they come
    /// from another work tree of the repository (or pin a branch).
    pub active: BranchName,
    /// The main work tree, whose checkouts switch `active` (set by `init` and `up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<std::path::PathBuf>,
    /// The active branch of every other work tree (its top folder, canonical), set by
    /// checkouts there and `pgtwig use` run there: clients running in that work tree go to it.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub worktrees: std::collections::BTreeMap<std::path::PathBuf, BranchName>,
}

impl ProjectState {
    /// A state whose main work tree's branch is `active`.
    pub fn new(active: BranchName) -> ProjectState {
        ProjectState {
            active,
            worktree: None,
            worktrees: Default::default(),
        }
    }

    /// True when `dir` is the main work tree (or no main work tree is recorded).
    pub fn is_main_worktree(&self, dir: &Path) -> bool {
        match &self.worktree {
            None => true,
            Some(main) => same_dir(main, dir),
        }
    }

    /// The active branch of work tree `dir`: its own, else the main work tree's.
    pub fn branch_of(&self, dir: Option<&Path>) -> &BranchName {
        match dir {
            Some(d) if !self.is_main_worktree(d) => self
                .worktrees
                .iter()
                .find(|(w, _)| same_dir(w, d))
                .map(|(_, b)| b)
                .unwrap_or(&self.active),
            _ => &self.active,
        }
    }

    /// Makes `branch` the active branch of work tree `dir` (None: the main one); returns the
    /// one it replaces.
    pub fn set_branch(&mut self, dir: Option<&Path>, branch: BranchName) -> Option<BranchName> {
        match dir {
            Some(d) if !self.is_main_worktree(d) => {
                let key = crate::fsutil::canonical(d);
                let old = self.worktrees.insert(key, branch);
                old.or_else(|| Some(self.active.clone()))
            }
            _ => Some(std::mem::replace(&mut self.active, branch)),
        }
    }
}

/// A work tree whose active branch is a given branch (see [`ProjectState::worktrees_on`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorktreeOn {
    /// Its top folder; `None` for the main work tree when none is recorded.
    pub dir: Option<std::path::PathBuf>,
    pub main: bool,
}

impl std::fmt::Display for WorktreeOn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.dir, self.main) {
            (Some(d), true) => write!(f, "the main work tree {}", d.display()),
            (None, _) => write!(f, "the main work tree"),
            (Some(d), false) => write!(f, "work tree {}", d.display()),
        }
    }
}

impl ProjectState {
    /// The work trees whose active branch is `branch`: the main one, and every other one
    /// that still exists (a removed work tree's entry routes nobody).
    pub fn worktrees_on(&self, branch: &BranchName) -> Vec<WorktreeOn> {
        let mut on = Vec::new();
        if self.active == *branch {
            on.push(WorktreeOn {
                dir: self.worktree.clone(),
                main: true,
            });
        }
        for (dir, b) in &self.worktrees {
            if b == branch && dir.is_dir() && !self.is_main_worktree(dir) {
                on.push(WorktreeOn {
                    dir: Some(dir.clone()),
                    main: false,
                });
            }
        }
        on
    }

    /// The work trees with a branch of their own whose folder is gone (`git worktree remove`),
    /// and that branch.
    pub fn removed_worktrees(&self) -> Vec<(std::path::PathBuf, BranchName)> {
        self.worktrees
            .iter()
            .filter(|(dir, _)| !dir.is_dir())
            .map(|(d, b)| (d.clone(), b.clone()))
            .collect()
    }

    /// Drops the entries of every work tree whose folder is gone; true if there were any.
    pub fn forget_removed(&mut self) -> bool {
        let before = self.worktrees.len();
        self.worktrees.retain(|dir, _| dir.is_dir());
        self.worktrees.len() != before
    }

    /// Drops the entries of work trees that no longer exist and point at `branch`.
    pub fn forget_removed_on(&mut self, branch: &BranchName) {
        self.worktrees.retain(|dir, b| b != branch || dir.is_dir());
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

impl ProjectState {
    pub fn load(path: &Path) -> Result<ProjectState, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is corrupt ({e}); set the active branch again with `pgtwig use <branch>`",
                path.display()
            )
        })
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut json = serde_json::to_vec_pretty(self)?;
        json.push(b'\n');
        fsutil::write_atomic(path, &json)
    }
}
