//! Which branches `pgtwig gc` may collect, and why: the git branch a branch was made for is
//! gone, its TTL passed, or its work tree was removed. Never the root, a branch a
//! `protected` rule names or made (as recorded in its metadata when it was made, whatever
//! `.pgtwig.toml` is checked out now), or a work tree's active branch.

use std::path::PathBuf;
use std::time::SystemTime;

use anyhow::Result;
use pgtwig_core::rules;
use pgtwig_core::state::ProjectState;
use pgtwig_core::BranchName;
use pgtwig_git::Worktree;

use crate::backend::Backend;
use crate::{user_name, Project};

/// A branch gc would delete.
#[derive(Debug)]
pub struct Doomed {
    pub name: BranchName,
    /// Why it is a candidate ("git branch \"x\" no longer exists").
    pub reason: String,
}

/// A candidate gc keeps after all.
#[derive(Debug)]
pub struct Kept {
    pub name: BranchName,
    pub reason: String,
    /// Why it stays ("a protected = true rule made it").
    pub kept_because: String,
}

/// What `gc` would do.
#[derive(Debug, Default)]
pub struct Plan {
    pub delete: Vec<Doomed>,
    pub keep: Vec<Kept>,
    /// Work trees that were removed (`git worktree remove`) and still have a state entry.
    pub removed_worktrees: Vec<(PathBuf, BranchName)>,
}

/// What gc needs to know of a branch, on either backend.
struct Candidate {
    name: String,
    git_branch: Option<String>,
    expires: Option<String>,
    /// Recorded when it was made by a `protected = true` rule.
    protected: bool,
}

fn candidates(backend: &Backend) -> Result<Vec<Candidate>> {
    Ok(match backend {
        Backend::Local(b) => b
            .list()?
            .into_iter()
            .filter_map(|b| {
                let meta = b.meta?;
                Some(Candidate {
                    name: b.name.to_string(),
                    git_branch: meta.git_branch,
                    expires: meta.expires,
                    protected: meta.protected,
                })
            })
            .collect(),
        Backend::Neon(n) => n
            .backend
            .list()?
            .into_iter()
            .map(|b| Candidate {
                name: b.branch.name,
                git_branch: b.git_branch,
                expires: b.branch.expires_at,
                protected: b.protected,
            })
            .collect(),
    })
}

/// Decides what gc collects now; deletes nothing.
pub fn plan(project: &Project, backend: &Backend) -> Result<Plan> {
    let git_branches = Worktree::discover(&project.root)
        .and_then(|wt| wt.local_branches())
        .ok();
    let protected = rules::protected_names(&project.config.map);
    let state = ProjectState::load(&project.home.state_path()).ok();
    let removed = state
        .as_ref()
        .map(|s| s.removed_worktrees())
        .unwrap_or_default();
    let now = SystemTime::now();
    let mut plan = Plan::default();
    for b in candidates(backend)? {
        // Names pgtwig could not have made (Neon branches made elsewhere) are not its to collect.
        let Ok(name) = BranchName::parse(&b.name) else {
            continue;
        };
        if name == project.config.root_branch || protected.contains(&name) {
            continue;
        }
        // A branch made by a rule with `protected = true` and a template (e.g. "dev-{user}")
        // is protected too.
        let by_protected_rule = b.git_branch.as_deref().is_some_and(|g| {
            rules::resolve(
                &project.config.map,
                g,
                &user_name(),
                &project.config.root_branch,
                |_| None,
            )
            .is_some_and(|t| t.protected && t.branch == name)
        });
        if by_protected_rule {
            continue;
        }
        let expired = b
            .expires
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339_weak(e).ok())
            .is_some_and(|t| t < now);
        let git_gone = match (&b.git_branch, &git_branches) {
            (Some(g), Some(list)) => !list.contains(g),
            _ => false,
        };
        let of_removed = removed
            .iter()
            .find(|(_, branch)| *branch == name)
            .map(|(dir, _)| dir);
        let reason = if expired {
            format!("expired at {}", b.expires.unwrap_or_default())
        } else if git_gone {
            format!(
                "git branch \"{}\" no longer exists",
                b.git_branch.unwrap_or_default()
            )
        } else if let Some(dir) = of_removed {
            format!("its work tree {} was removed", dir.display())
        } else {
            continue;
        };
        // The record of how it was made wins over the configuration checked out now (an
        // older commit may not have the rule that protects it).
        if b.protected {
            plan.keep.push(Kept {
                name,
                reason,
                kept_because: "a protected = true rule made it".into(),
            });
            continue;
        }
        if let Some(first) = state
            .as_ref()
            .and_then(|s| s.worktrees_on(&name).into_iter().next())
        {
            plan.keep.push(Kept {
                name,
                reason,
                kept_because: format!("it is the active branch of {first}"),
            });
            continue;
        }
        plan.delete.push(Doomed { name, reason });
    }
    plan.removed_worktrees = removed;
    Ok(plan)
}

/// Drops the state.json entries of removed work trees; true when there were any (a running
/// daemon must be told, to stop routing by them).
pub fn forget_removed_worktrees(project: &Project, backend: &Backend) -> Result<bool> {
    let path = project.home.state_path();
    let _lock = backend.lock()?;
    let mut state = ProjectState::load(&path).map_err(anyhow::Error::msg)?;
    let changed = state.forget_removed();
    if changed {
        state.save(&path)?;
    }
    Ok(changed)
}
