//! Checkouts that skip hooks (IDEs, some git tools, `git -c core.hooksPath=`)
//! still switch: the daemon watches the HEAD file of the work tree it was
//! started in and, when it changes, runs the same `pgtwig hook
//! post-checkout` the git hook runs — after a pause, because git writes
//! HEAD before it runs the hook, and the hook (which reports to the user
//! in the terminal) should do the work; the daemon then finds the branch
//! already active and does nothing.

use std::path::PathBuf;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Set for a hook run that may wait for the project lock as long as it takes (the git hook
/// itself waits at most a second, then leaves the switch to the watcher).
pub const HOOK_WAITS_ENV: &str = "PGTWIG_HOOK_WAITS";

/// How long a checkout's own hook gets before the daemon follows HEAD.
const HOOK_GRACE: Duration = Duration::from_millis(1500);

pub async fn run(worktree: PathBuf, head_file: PathBuf) {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let Some(dir) = head_file.parent().map(|p| p.to_path_buf()) else {
        return;
    };
    let watcher = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        // Only writes count: every read of HEAD (git's, the hook's) is an
        // access event too, and would wake us in a loop.
        if let Ok(ev) = ev {
            let written = matches!(
                ev.kind,
                notify::EventKind::Modify(_) | notify::EventKind::Create(_)
            );
            if written
                && ev
                    .paths
                    .iter()
                    .any(|p| p.file_name().is_some_and(|n| n == "HEAD"))
            {
                let _ = tx.send(());
            }
        }
    });
    let mut watcher = match watcher {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(
                "cannot watch {} for checkouts: {e}; only the git hook will switch branches",
                dir.display()
            );
            return;
        }
    };
    if let Err(e) = watcher.watch(&dir, RecursiveMode::NonRecursive) {
        tracing::warn!(
            "cannot watch {} for checkouts: {e}; only the git hook will switch branches",
            dir.display()
        );
        return;
    }
    while rx.recv().await.is_some() {
        // Let git finish and its hook run first; fold bursts (rebase).
        tokio::time::sleep(HOOK_GRACE).await;
        while rx.try_recv().is_ok() {}
        // The hook is idempotent: with the right branch already active it
        // does nothing, so there is no need to compare HEAD contents.
        let Ok(exe) = std::env::current_exe() else {
            continue;
        };
        let out = tokio::process::Command::new(exe)
            .args(["hook", "post-checkout", "0", "0", "1"])
            .current_dir(&worktree)
            // Unlike git's hook, the watcher may wait for a busy project: it finishes what
            // the hook skipped.
            .env(HOOK_WAITS_ENV, "1")
            .output()
            .await;
        match out {
            Ok(o) => {
                for line in String::from_utf8_lossy(&o.stdout).lines() {
                    tracing::info!("HEAD changed: {line}");
                }
                // What the hook reports on stderr went wrong or was skipped
                // (e.g. post_create commands not approved): a warning.
                for line in String::from_utf8_lossy(&o.stderr).lines() {
                    tracing::warn!("HEAD changed: {line}");
                }
            }
            Err(e) => tracing::warn!("HEAD changed but pgtwig could not follow it: {e}"),
        }
    }
    drop(watcher);
}
