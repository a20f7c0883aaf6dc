//! What `pgtwig status` says about the current work tree: its checked-out git branch, the
//! `[[map]]` rule that matched it, and whether `pgtwig use` overrode that rule.
//!
//! state.json records only the branch each work tree is on, not how it got there, so an
//! override is inferred: the rule's answer for the checked-out git branch differs from the
//! recorded branch (a checkout always records the rule's answer; only `use`, or a `[[map]]`
//! edited since, leaves another one).

use std::collections::HashMap;

use anyhow::Result;
use pgtwig_core::rules::{self, CreatePolicy};
use pgtwig_git::{Head, Worktree};
use serde::Serialize;

use pgtwig_project::{user_name, Backend, Project};

#[derive(Debug, Serialize)]
pub struct Checkout {
    /// The work tree's top folder (None: not in a work tree of the repository).
    pub worktree: Option<String>,
    /// The checked-out git branch (None: detached HEAD or no work tree).
    pub git_branch: Option<String>,
    /// The database branch state.json records for this work tree.
    pub branch: String,
    /// The `[[map]]` rule that matches `git_branch`, as "rule 2 in .pgtwig.toml (git = …)".
    pub rule: Option<String>,
    /// The database branch that rule gives.
    pub rule_branch: Option<String>,
    /// The work tree is on another branch than its rule gives (`pgtwig use`).
    pub overridden: bool,
    /// One line for people.
    pub summary: String,
}

pub fn of_current(project: &Project, backend: &Backend) -> Result<Checkout> {
    let state = project.load_state()?;
    let wt = Worktree::discover(&std::env::current_dir()?).ok();
    let root = wt
        .as_ref()
        .and_then(|w| w.root())
        .map(pgtwig_core::fsutil::canonical);
    let branch = state.branch_of(root.as_deref()).clone();
    let head = wt.as_ref().and_then(|w| w.head().ok());
    let mut out = Checkout {
        worktree: root.as_ref().map(|r| r.display().to_string()),
        git_branch: None,
        branch: branch.to_string(),
        rule: None,
        rule_branch: None,
        overridden: false,
        summary: String::new(),
    };
    let git = match head {
        Some(Head::Branch(g)) => g,
        Some(Head::Detached) => {
            out.summary = format!(
                "git: detached HEAD (rebase, bisect, a tag): the work tree stays on \"{branch}\""
            );
            return Ok(out);
        }
        None => {
            out.summary = format!("not in a git work tree: the main work tree's \"{branch}\"");
            return Ok(out);
        }
    };
    out.git_branch = Some(git.clone());
    let map = &project.config.map;
    let Some((number, rule)) = rules::matching_rule(map, &git) else {
        out.summary = format!(
            "git branch \"{git}\"; no [[map]] rule matches it, so checkouts leave the work tree on \"{branch}\""
        );
        return Ok(out);
    };
    out.rule = Some(match rule {
        Some(r) => format!(
            "rule {number} in {} (git = \"{}\", branch = \"{}\")",
            r.source.file_name(),
            r.git.as_str(),
            r.branch.as_str()
        ),
        None => "the built-in rule (no [[map]]: git = \"*\", branch = \"{branch}\")".into(),
    });
    let holders = holders(backend)?;
    let target = rules::resolve(map, &git, &user_name(), &project.config.root_branch, |n| {
        holders.get(n.as_str()).cloned()
    })
    .expect("a matching rule resolves");
    out.rule_branch = Some(target.branch.to_string());
    let rule_text = out.rule.clone().unwrap_or_default();
    out.overridden = target.branch != branch;
    out.summary = if !out.overridden {
        format!("git branch \"{git}\" → \"{branch}\" by {rule_text}")
    } else if target.create == CreatePolicy::Never && !holders.contains_key(target.branch.as_str())
    {
        format!(
            "git branch \"{git}\": {rule_text} gives \"{}\", which does not exist (create = \"never\"), \
             so the work tree stays on \"{branch}\"",
            target.branch
        )
    } else {
        format!(
            "git branch \"{git}\": {rule_text} gives \"{}\", but `pgtwig use` set \"{branch}\" \
             (`pgtwig use {}` goes back; the next checkout follows the rule again)",
            target.branch, target.branch
        )
    };
    Ok(out)
}

/// Every database branch and the git branch it was made for (for [`rules::resolve`]).
fn holders(backend: &Backend) -> Result<HashMap<String, Option<String>>> {
    Ok(match backend {
        Backend::Local(b) => b
            .list()?
            .into_iter()
            .map(|b| {
                let git = b.meta.and_then(|m| m.git_branch);
                (b.name.to_string(), git)
            })
            .collect(),
        Backend::Neon(n) => n
            .backend
            .list()?
            .into_iter()
            .map(|b| (b.branch.name, b.git_branch))
            .collect(),
    })
}
