//! pgtwig's git side: which branch is checked out, the `post-checkout` hook
//! that switches databases, and which local branches exist (for `gc`).
//!
//! The hook respects `core.hooksPath`, never overwrites a hook it did not
//! write (the existing one is kept beside it and called first, so husky or
//! lefthook setups keep working), is idempotent, and uninstalls cleanly.
//! [`ensure_ignored`] keeps the user's own `.pgtwig.local.toml` out of commits.

mod ignore;

pub use ignore::ensure_ignored;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use git2::Repository;

/// Marks a hook pgtwig wrote.
const MARKER: &str = "# pgtwig-hook v1";
/// The git config key holding the state root (see `pgtwig_core::home`).
const HOME_KEY: &str = "pgtwig.home";
/// Where a pre-existing hook is kept while pgtwig's is installed.
const CHAINED: &str = "post-checkout.pgtwig-chained";

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("{0} is not inside a git repository")]
    NotARepo(PathBuf),
    #[error("git: {0}")]
    Git(#[from] git2::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Conflict(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> GitError {
    let what = what.into();
    move |source| GitError::Io { what, source }
}

/// What HEAD points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Head {
    /// A branch (possibly without commits yet).
    Branch(String),
    /// Detached (rebase, bisect, a checked-out tag or commit).
    Detached,
}

/// A work tree of a repository.
pub struct Worktree {
    repo: Repository,
}

impl Worktree {
    pub fn discover(start: &Path) -> Result<Worktree, GitError> {
        let repo =
            Repository::discover(start).map_err(|_| GitError::NotARepo(start.to_path_buf()))?;
        Ok(Worktree { repo })
    }

    /// The top folder of the work tree.
    pub fn root(&self) -> Option<&Path> {
        self.repo.workdir()
    }

    /// This work tree's git dir (for a linked worktree, `.git/worktrees/<name>`).
    pub fn git_dir(&self) -> &Path {
        self.repo.path()
    }

    /// The git dir shared by every work tree of this clone (`.git` of the
    /// main work tree): what identifies the repository on this machine.
    pub fn common_dir(&self) -> &Path {
        self.repo.commondir()
    }

    /// The file whose changes mean "something was checked out".
    pub fn head_file(&self) -> PathBuf {
        self.repo.path().join("HEAD")
    }

    pub fn head(&self) -> Result<Head, GitError> {
        let head = self.repo.find_reference("HEAD")?;
        Ok(match head.symbolic_target() {
            Some(target) => match target.strip_prefix("refs/heads/") {
                Some(b) => Head::Branch(b.to_string()),
                None => Head::Detached,
            },
            None => Head::Detached,
        })
    }

    /// The state root `pgtwig init` recorded for this repository (`pgtwig.home` in the
    /// shared config, seen from every work tree) and the config file holding it.
    pub fn recorded_home(&self) -> Option<(PathBuf, PathBuf)> {
        // The repository's own config only: that is where `init` writes, and what the
        // messages name.
        let config = self
            .repo
            .config()
            .ok()?
            .open_level(git2::ConfigLevel::Local)
            .ok()?;
        let dir = config.get_path(HOME_KEY).ok()?;
        Some((dir, self.repo.commondir().join("config")))
    }

    /// Record `dir` as this repository's state root (in the shared config, so that every
    /// work tree sees it).
    pub fn record_home(&self, dir: &Path) -> Result<(), GitError> {
        let text = dir.to_str().ok_or_else(|| {
            GitError::Conflict(format!(
                "the state folder {} is not valid UTF-8 and cannot be recorded in git config",
                dir.display()
            ))
        })?;
        let mut local = self.repo.config()?.open_level(git2::ConfigLevel::Local)?;
        if local.get_string(HOME_KEY).ok().as_deref() != Some(text) {
            local.set_str(HOME_KEY, text)?;
        }
        Ok(())
    }

    /// Names of local branches.
    pub fn local_branches(&self) -> Result<Vec<String>, GitError> {
        let mut out = Vec::new();
        for b in self.repo.branches(Some(git2::BranchType::Local))? {
            let (b, _) = b?;
            if let Some(name) = b.name()? {
                out.push(name.to_string());
            }
        }
        Ok(out)
    }

    /// Where hooks live: `core.hooksPath` (relative to the work tree top
    /// when relative), else the common git dir's `hooks/` (shared by all
    /// worktrees).
    pub fn hooks_dir(&self) -> Result<PathBuf, GitError> {
        if let Ok(p) = self.repo.config()?.get_path("core.hooksPath") {
            if p.is_absolute() {
                return Ok(p);
            }
            let base = self.root().unwrap_or(self.repo.path());
            return Ok(base.join(p));
        }
        Ok(self.repo.commondir().join("hooks"))
    }
}

/// The result of installing or removing the hook, for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookChange {
    Installed { path: PathBuf, chained: bool },
    Updated { path: PathBuf },
    Removed { path: PathBuf, restored: bool },
    NotInstalled,
}

fn hook_script(pgtwig: &Path) -> String {
    format!(
        r#"#!/bin/sh
{MARKER}
# Switches the database branch with the git branch (pgtwig.dev). Installed by
# `pgtwig init`; `pgtwig uninstall` removes it and restores any hook that was here.
status=0
chained="$(dirname "$0")/{CHAINED}"
if [ -x "$chained" ]; then
    "$chained" "$@" || status=$?
fi
pgtwig='{exe}'
[ -x "$pgtwig" ] || pgtwig=pgtwig
# Never fails or blocks the checkout: pgtwig prints one line on error.
"$pgtwig" hook post-checkout "$@" || true
exit $status
"#,
        exe = pgtwig.display().to_string().replace('\'', "'\\''")
    )
}

fn is_ours(path: &Path) -> bool {
    fs::read_to_string(path).is_ok_and(|t| t.contains(MARKER))
}

/// Install the post-checkout hook calling `pgtwig` (an absolute path).
pub fn install_hook(wt: &Worktree, pgtwig: &Path) -> Result<HookChange, GitError> {
    let dir = wt.hooks_dir()?;
    fs::create_dir_all(&dir).map_err(io(format!("creating {}", dir.display())))?;
    let hook = dir.join("post-checkout");
    let chained_path = dir.join(CHAINED);
    let script = hook_script(pgtwig);
    let existed = hook.exists() || fs::symlink_metadata(&hook).is_ok();
    if existed && is_ours(&hook) {
        if fs::read_to_string(&hook).ok().as_deref() != Some(script.as_str()) {
            write_executable(&hook, &script)?;
        }
        return Ok(HookChange::Updated { path: hook });
    }
    let chained = if existed {
        if fs::symlink_metadata(&chained_path).is_ok() {
            return Err(GitError::Conflict(format!(
                "{} exists and so does {}; move one of them away and run `pgtwig init` again",
                hook.display(),
                chained_path.display()
            )));
        }
        fs::rename(&hook, &chained_path).map_err(io(format!("keeping {}", hook.display())))?;
        true
    } else {
        false
    };
    write_executable(&hook, &script)?;
    Ok(HookChange::Installed {
        path: hook,
        chained,
    })
}

/// What is in the work tree's `post-checkout` hook, for `pgtwig doctor`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookState {
    /// Where the hook is (or would be): `core.hooksPath` or the common git dir's `hooks/`.
    pub path: PathBuf,
    pub kind: HookKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookKind {
    /// No `post-checkout` hook.
    Missing,
    /// A hook that is not pgtwig's: checkouts do not switch database branches.
    Foreign,
    /// pgtwig's hook, calling `program` (the pgtwig that installed it); `chained` is the hook
    /// that was there before and still runs first; `executable` is false when a file mode
    /// change made git skip it.
    Ours {
        program: Option<PathBuf>,
        chained: Option<PathBuf>,
        executable: bool,
    },
}

/// The work tree's `post-checkout` hook: missing, someone else's, or pgtwig's (and what it
/// calls and chains).
pub fn hook_state(wt: &Worktree) -> Result<HookState, GitError> {
    let dir = wt.hooks_dir()?;
    let path = dir.join("post-checkout");
    let kind = match fs::read_to_string(&path) {
        Err(_) if fs::symlink_metadata(&path).is_err() => HookKind::Missing,
        Ok(text) if text.contains(MARKER) => {
            use std::os::unix::fs::PermissionsExt;
            let program = text.lines().find_map(|l| {
                let quoted = l.strip_prefix("pgtwig='")?.strip_suffix('\'')?;
                Some(PathBuf::from(quoted.replace("'\\''", "'")))
            });
            let chained = dir.join(CHAINED);
            HookKind::Ours {
                program,
                chained: fs::symlink_metadata(&chained).is_ok().then_some(chained),
                executable: fs::metadata(&path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0),
            }
        }
        _ => HookKind::Foreign,
    };
    Ok(HookState { path, kind })
}

/// Remove pgtwig's hook and put back the one it chained, if any.
pub fn uninstall_hook(wt: &Worktree) -> Result<HookChange, GitError> {
    let dir = wt.hooks_dir()?;
    let hook = dir.join("post-checkout");
    if !is_ours(&hook) {
        return Ok(HookChange::NotInstalled);
    }
    fs::remove_file(&hook).map_err(io(format!("removing {}", hook.display())))?;
    let chained = dir.join(CHAINED);
    let restored = fs::symlink_metadata(&chained).is_ok();
    if restored {
        fs::rename(&chained, &hook).map_err(io(format!("restoring {}", hook.display())))?;
    }
    Ok(HookChange::Removed {
        path: hook,
        restored,
    })
}

fn write_executable(path: &Path, text: &str) -> Result<(), GitError> {
    let tmp = path.with_extension("pgtwig-tmp");
    fs::write(&tmp, text).map_err(io(format!("writing {}", tmp.display())))?;
    fs::set_permissions(&tmp, fs::Permissions::from_mode(0o755))
        .map_err(io("making the hook executable"))?;
    fs::rename(&tmp, path).map_err(io(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hook_state_names_the_program_and_the_chained_hook() {
        let d = tempfile::tempdir().unwrap();
        Repository::init(d.path()).unwrap();
        let wt = Worktree::discover(d.path()).unwrap();
        assert_eq!(hook_state(&wt).unwrap().kind, HookKind::Missing);
        let hooks = wt.hooks_dir().unwrap();
        fs::create_dir_all(&hooks).unwrap();
        fs::write(hooks.join("post-checkout"), "#!/bin/sh\necho mine\n").unwrap();
        assert_eq!(hook_state(&wt).unwrap().kind, HookKind::Foreign);
        let exe = Path::new("/opt/it's/pgtwig");
        install_hook(&wt, exe).unwrap();
        assert_eq!(
            hook_state(&wt).unwrap().kind,
            HookKind::Ours {
                program: Some(exe.to_path_buf()),
                chained: Some(hooks.join(CHAINED)),
                executable: true,
            }
        );
    }

    #[test]
    fn install_chains_and_uninstall_restores() {
        let d = tempfile::tempdir().unwrap();
        Repository::init(d.path()).unwrap();
        let wt = Worktree::discover(d.path()).unwrap();
        let hooks = wt.hooks_dir().unwrap();
        fs::create_dir_all(&hooks).unwrap();
        fs::write(hooks.join("post-checkout"), "#!/bin/sh\necho mine\n").unwrap();
        let exe = Path::new("/usr/local/bin/pgtwig");
        assert!(matches!(
            install_hook(&wt, exe).unwrap(),
            HookChange::Installed { chained: true, .. }
        ));
        assert!(matches!(
            install_hook(&wt, exe).unwrap(),
            HookChange::Updated { .. }
        ));
        assert!(fs::read_to_string(hooks.join(CHAINED))
            .unwrap()
            .contains("echo mine"));
        assert!(matches!(
            uninstall_hook(&wt).unwrap(),
            HookChange::Removed { restored: true, .. }
        ));
        assert_eq!(
            fs::read_to_string(hooks.join("post-checkout")).unwrap(),
            "#!/bin/sh\necho mine\n"
        );
        assert_eq!(uninstall_hook(&wt).unwrap(), HookChange::NotInstalled);
    }

    #[test]
    fn head_of_an_unborn_branch() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::init(d.path()).unwrap();
        repo.set_head("refs/heads/trunk").unwrap();
        let wt = Worktree::discover(d.path()).unwrap();
        assert_eq!(wt.head().unwrap(), Head::Branch("trunk".into()));
    }
}
