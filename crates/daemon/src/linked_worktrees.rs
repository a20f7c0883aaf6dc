//! Whether a repository has linked work trees (`<common dir>/worktrees/*`, one folder each),
//! asked on every connection: without any, every client goes to the main work tree's branch
//! and nothing about the client needs looking up.
//!
//! On Linux the answer is kept until inotify reports a change to `<common dir>` (the
//! `worktrees` folder made or removed) or inside `worktrees` (a work tree added or removed).
//! The inotify descriptor is read without blocking on each call, so an unchanged repository
//! costs one `read` that finds nothing, and the answer is never stale: the kernel queues the
//! event as `git worktree add` makes the folder, before that command returns and so before
//! any client can start in the new work tree. (A `stat` of the folder each time, as before,
//! cost two path walks per connection at `pgbench -C`.) Where inotify is not available (no
//! Linux, or out of inotify instances) the folder's modification time is checked instead.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

/// Whether `<common dir>/worktrees` has entries, remembered between calls.
pub struct LinkedWorktrees {
    /// `<common dir>/worktrees`.
    dir: PathBuf,
    state: Mutex<State>,
}

struct State {
    /// The folder's modification time when last read, and whether it had entries.
    by_mtime: Option<(SystemTime, bool)>,
    #[cfg(target_os = "linux")]
    watch: Option<watch::Watch>,
    /// False until the first call (which sets the watch up).
    #[cfg(target_os = "linux")]
    started: bool,
}

impl LinkedWorktrees {
    /// For the repository whose git common dir is `common_dir`.
    pub fn new(common_dir: &Path) -> LinkedWorktrees {
        LinkedWorktrees {
            dir: common_dir.join("worktrees"),
            state: Mutex::new(State {
                by_mtime: None,
                #[cfg(target_os = "linux")]
                watch: None,
                #[cfg(target_os = "linux")]
                started: false,
            }),
        }
    }

    /// Whether the repository has a linked work tree now.
    pub fn any(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        #[cfg(target_os = "linux")]
        if let Some(linked) = state.watched(&self.dir) {
            return linked;
        }
        self.by_mtime(&mut state)
    }

    fn by_mtime(&self, state: &mut State) -> bool {
        let modified = std::fs::metadata(&self.dir).and_then(|m| m.modified()).ok();
        match (state.by_mtime, modified) {
            (_, None) => false,
            (Some((at, linked)), Some(now)) if at == now => linked,
            (_, Some(now)) => {
                let linked = has_entries(&self.dir);
                state.by_mtime = Some((now, linked));
                linked
            }
        }
    }
}

#[cfg(target_os = "linux")]
impl State {
    /// The answer through the watch (set up on the first call); `None` without one.
    fn watched(&mut self, dir: &Path) -> Option<bool> {
        if !std::mem::replace(&mut self.started, true) {
            self.watch = watch::Watch::start(dir);
        }
        let watch = self.watch.as_mut()?;
        match watch.changed(dir) {
            Ok(false) if watch.known.is_some() => watch.known,
            Ok(_) => {
                let linked = has_entries(dir);
                watch.known = Some(linked);
                Some(linked)
            }
            Err(e) => {
                tracing::debug!("inotify on {}: {e}; checking by time", dir.display());
                self.watch = None;
                None
            }
        }
    }
}

fn has_entries(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_some())
}

#[cfg(target_os = "linux")]
mod watch {
    use std::ffi::OsStr;
    use std::io;
    use std::path::Path;

    use inotify::{EventMask, Inotify, WatchDescriptor, WatchMask};

    /// Room for the events one read returns; more wait for the next read (and any event
    /// means the folder is read again, so how many there were does not matter).
    const EVENT_BUFFER_LEN: usize = 4096;

    /// What changes the answer: an entry made, removed or renamed.
    fn entry_changes() -> WatchMask {
        WatchMask::CREATE | WatchMask::DELETE | WatchMask::MOVED_FROM | WatchMask::MOVED_TO
    }

    pub(super) struct Watch {
        inotify: Inotify,
        /// On `<common dir>/worktrees`, while it exists.
        worktrees: Option<WatchDescriptor>,
        /// The answer since the last change; `None` until first read.
        pub(super) known: Option<bool>,
    }

    impl Watch {
        /// Watches `<common dir>` (for `worktrees` itself) and `worktrees` if it exists.
        pub(super) fn start(worktrees: &Path) -> Option<Watch> {
            let common = worktrees.parent()?;
            let inotify = Inotify::init()
                .map_err(|e| tracing::debug!("no inotify for {}: {e}", common.display()))
                .ok()?;
            inotify
                .watches()
                .add(common, entry_changes() | WatchMask::ONLYDIR)
                .map_err(|e| tracing::debug!("cannot watch {}: {e}", common.display()))
                .ok()?;
            let mut watch = Watch {
                inotify,
                worktrees: None,
                known: None,
            };
            watch.watch_worktrees(worktrees);
            Some(watch)
        }

        fn watch_worktrees(&mut self, worktrees: &Path) {
            self.worktrees = self
                .inotify
                .watches()
                .add(worktrees, entry_changes() | WatchMask::ONLYDIR)
                .ok();
        }

        /// Whether anything that may change the answer happened since the last call. Reads
        /// every queued event; on a change to `worktrees` itself, watches it anew.
        pub(super) fn changed(&mut self, worktrees: &Path) -> io::Result<bool> {
            let mut changed = false;
            let mut rewatch = false;
            let mut buffer = [0u8; EVENT_BUFFER_LEN];
            loop {
                let events = match self.inotify.read_events(&mut buffer) {
                    Ok(events) => events,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                };
                for event in events {
                    let about_worktrees = event.name == Some(OsStr::new("worktrees"));
                    let inside = self.worktrees.as_ref() == Some(&event.wd);
                    if event.mask.contains(EventMask::Q_OVERFLOW) || about_worktrees {
                        changed = true;
                        rewatch = true;
                    } else if inside {
                        changed = true;
                        if event.mask.contains(EventMask::IGNORED) {
                            rewatch = true;
                        }
                    }
                }
            }
            if rewatch {
                self.watch_worktrees(worktrees);
            }
            Ok(changed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_repo::{git, repo_with_a_commit};

    #[test]
    fn follows_work_trees_added_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo_with_a_commit(tmp.path());
        let linked = LinkedWorktrees::new(&repo.join(".git"));
        assert!(!linked.any());
        assert!(!linked.any(), "asked again, nothing changed");
        git(&repo, &["worktree", "add", "-q", "../wt2", "-b", "feature"]);
        assert!(linked.any(), "seen as soon as git adds it");
        git(&repo, &["worktree", "add", "-q", "../wt3", "-b", "other"]);
        git(&repo, &["worktree", "remove", "../wt3"]);
        assert!(linked.any(), "wt2 is still there");
        git(&repo, &["worktree", "remove", "../wt2"]);
        assert!(!linked.any(), "the last one removed");
        // git removes the empty `worktrees` folder with the last one; it comes back.
        git(&repo, &["worktree", "add", "-q", "../wt4", "-b", "again"]);
        assert!(linked.any(), "a folder made anew is watched anew");
        git(&repo, &["worktree", "remove", "../wt4"]);
        assert!(!linked.any());
    }

    #[test]
    fn without_watch_the_time_decides() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo_with_a_commit(tmp.path());
        let linked = LinkedWorktrees::new(&repo.join(".git"));
        let mut state = linked.state.lock().unwrap();
        assert!(!linked.by_mtime(&mut state));
        git(&repo, &["worktree", "add", "-q", "../wt2", "-b", "feature"]);
        assert!(linked.by_mtime(&mut state));
    }
}
