//! Checkouts that skip hooks (IDEs, some git tools, `git -c core.hooksPath=`)
//! still switch: the daemon watches the HEAD file of every work tree of the
//! repository (the main one's, and `<common dir>/worktrees/<name>/HEAD` of
//! each linked one) and, when one changes, follows the checkout in that work
//! tree with the same policy the git hook uses (`pgtwig_project::checkout`,
//! called in-process) — after a pause, because git writes HEAD before it runs
//! the hook, and the hook (which reports to the user in the terminal) should
//! do the work; the daemon then finds the branch already active and does
//! nothing. Unlike the hook, it waits for a busy project as long as it takes:
//! it finishes what the hook skipped.
//!
//! The watch is armed by [`arm`] before the daemon says it is ready, so a
//! checkout right after `pgtwig up` returns is not missed.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// How long a checkout's own hook gets before the daemon follows HEAD.
const HOOK_GRACE: Duration = Duration::from_millis(1500);

/// An armed watch; [`Armed::run`] follows it.
pub struct Armed {
    watcher: notify::RecommendedWatcher,
    changed: mpsc::UnboundedReceiver<PathBuf>,
    /// `<common dir>/worktrees`, watched recursively once it exists.
    linked: PathBuf,
    main_root: PathBuf,
    main_git_dir: PathBuf,
}

/// Starts watching the HEAD files of the repository whose main work tree is `root` (git dir
/// `git_dir`, common dir `common_dir`). None (after a warning) when the OS will not watch.
pub fn arm(root: &Path, git_dir: &Path, common_dir: &Path) -> Option<Armed> {
    let (tx, changed) = mpsc::unbounded_channel::<PathBuf>();
    let linked = common_dir.join("worktrees");
    let linked_made = linked.clone();
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only writes count: every read of HEAD (git's, the hook's) is an
        // access event too, and would wake us in a loop.
        if let Ok(ev) = ev {
            let written = matches!(
                ev.kind,
                notify::EventKind::Modify(_) | notify::EventKind::Create(_)
            );
            if written {
                for p in ev.paths {
                    // HEAD files, and the first `git worktree add` making worktrees/.
                    if p.file_name().is_some_and(|n| n == "HEAD") || p == linked_made {
                        let _ = tx.send(p);
                    }
                }
            }
        }
    });
    let warn = |dir: &Path, e: &dyn std::fmt::Display| {
        tracing::warn!(
            "cannot watch {} for checkouts: {e}; only the git hook will switch branches",
            dir.display()
        );
    };
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            warn(git_dir, &e);
            return None;
        }
    };
    if let Err(e) = watcher.watch(git_dir, RecursiveMode::NonRecursive) {
        warn(git_dir, &e);
        return None;
    }
    // Linked work trees: their HEADs are in <common>/worktrees/<name>/. Made on demand by
    // `git worktree add`, so watch the parent while it is missing (see `Armed::run`).
    let target = if linked.is_dir() { &linked } else { common_dir };
    let mode = if linked.is_dir() {
        RecursiveMode::Recursive
    } else {
        RecursiveMode::NonRecursive
    };
    if let Err(e) = watcher.watch(target, mode) {
        warn(target, &e);
    }
    Some(Armed {
        watcher,
        changed,
        linked,
        main_root: root.to_path_buf(),
        main_git_dir: git_dir.to_path_buf(),
    })
}

impl Armed {
    /// Follows checkouts until the daemon stops; `took` is called after a work tree's
    /// branch changed (the daemon re-reads state.json and routes by it).
    pub async fn run(mut self, took: impl Fn() + Send + 'static) {
        while let Some(first) = self.changed.recv().await {
            // Let git finish and its hook run first; fold bursts (rebase).
            tokio::time::sleep(HOOK_GRACE).await;
            let mut heads = BTreeSet::from([first]);
            while let Ok(p) = self.changed.try_recv() {
                heads.insert(p);
            }
            if heads.remove(&self.linked) {
                // The first linked work tree: from now on watch all of them, and look at
                // each once (its HEAD was written before the watch).
                if let Err(e) = self.watcher.watch(&self.linked, RecursiveMode::Recursive) {
                    tracing::warn!("cannot watch {}: {e}", self.linked.display());
                }
                if let Ok(entries) = std::fs::read_dir(&self.linked) {
                    heads.extend(entries.flatten().map(|e| e.path().join("HEAD")));
                }
            }
            let worktrees: BTreeSet<PathBuf> = heads
                .iter()
                .filter_map(|h| self.worktree_of_head(h))
                .collect();
            for worktree in worktrees {
                if follow(worktree).await {
                    took();
                }
            }
        }
    }

    /// The work tree whose HEAD file is `head`: the main one, or the linked one whose
    /// `<common>/worktrees/<name>/gitdir` names its `.git` file.
    fn worktree_of_head(&self, head: &Path) -> Option<PathBuf> {
        let dir = head.parent()?;
        if dir == self.main_git_dir {
            return Some(self.main_root.clone());
        }
        let gitdir = std::fs::read_to_string(dir.join("gitdir")).ok()?;
        Some(Path::new(gitdir.trim()).parent()?.to_path_buf())
    }
}

/// The daemon's log as the checkout policy's report: each line says which work tree and
/// what started it.
pub(crate) struct Log<'a> {
    worktree: &'a Path,
    cause: &'static str,
}

impl<'a> Log<'a> {
    pub(crate) fn new(worktree: &'a Path, cause: &'static str) -> Log<'a> {
        Log { worktree, cause }
    }
}

impl pgtwig_project::Report for Log<'_> {
    fn info(&mut self, line: &str) {
        tracing::info!("{} in {}: {line}", self.cause, self.worktree.display());
    }
    fn warn(&mut self, line: &str) {
        tracing::warn!("{} in {}: {line}", self.cause, self.worktree.display());
    }
    fn captures_command_output(&self) -> bool {
        true
    }
}

/// Follows the checkout in `worktree` (on the blocking pool: it may wait for the project
/// lock and make a branch). Following is idempotent: with the right branch already active
/// it does nothing, so there is no need to compare HEAD contents. True when the work tree's
/// branch changed.
async fn follow(worktree: PathBuf) -> bool {
    if !worktree.is_dir() {
        return false;
    }
    let done = tokio::task::spawn_blocking(move || {
        let mut log = Log::new(&worktree, "HEAD changed");
        let result = pgtwig_project::Project::discover_in(&worktree).and_then(|project| {
            let backend = project.backend(false)?;
            pgtwig_project::checkout::follow(&project, &backend, &worktree, &mut log)
        });
        match result {
            Ok(outcome) => outcome.changed(),
            Err(e) => {
                tracing::warn!(
                    "HEAD changed in {} but pgtwig could not follow it: {e:#}",
                    worktree.display()
                );
                false
            }
        }
    })
    .await;
    done.unwrap_or(false)
}
