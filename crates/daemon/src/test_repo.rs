//! Real git repositories for the daemon's unit tests.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `git args` in `dir` (with an identity, so commits work on a machine without one).
pub(crate) fn git(dir: &Path, args: &[&str]) {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
}

/// `<parent>/repo`: a repository on branch `main` with one (empty) commit.
pub(crate) fn repo_with_a_commit(parent: &Path) -> PathBuf {
    let repo = parent.join("repo");
    std::fs::create_dir(&repo).unwrap();
    git(&repo, &["init", "-q", "-b", "main"]);
    git(&repo, &["commit", "-q", "--allow-empty", "-m", "x"]);
    repo
}
