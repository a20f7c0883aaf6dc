//! One port, a branch per work tree: which branch a client goes to, given the work tree it
//! runs in (see `client_worktree`), and the channels that switch its sessions when that work
//! tree's branch changes.
//!
//! The main work tree's branch is the project's `active` branch (the proxy's own channel);
//! every other work tree of the repository has its own entry in `state.json` and its own
//! channel here. A client whose work tree cannot be found — a container, a process outside
//! every work tree, a failed lookup — or whose work tree has no branch of its own yet goes to
//! the main work tree's branch, and the daemon log and `pgtwig status` say so.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use pgtwig_core::state::ProjectState;
use pgtwig_proxy::{ClientInfo, PeerIdentity};
use tokio::sync::watch;

use crate::client_worktree::WorktreeFinder;

/// Distinct fallback reasons logged at info level before they are only logged at debug.
const MAX_LOGGED_REASONS: usize = 64;

/// Where a client's sessions go and what they follow.
pub struct Resolved {
    /// The branch of the client's work tree, when it is not the main one's.
    pub follow: Option<watch::Receiver<String>>,
    /// The client's work tree for `status`, or why it routes to the main one's branch.
    pub scope: Option<String>,
}

/// The work trees the daemon routes by.
pub struct WorktreeRoutes {
    finder: Option<WorktreeFinder>,
    main: Option<PathBuf>,
    channels: Mutex<HashMap<PathBuf, watch::Sender<String>>>,
    logged: Mutex<HashSet<String>>,
}

impl WorktreeRoutes {
    /// For the repository with git common dir `common_dir` whose main work tree is `main`;
    /// `None`: the daemon runs outside a repository and routes everyone to the active branch.
    pub fn new(repo: Option<(&Path, &Path)>) -> WorktreeRoutes {
        WorktreeRoutes {
            finder: repo.map(|(common, _)| WorktreeFinder::new(common)),
            main: repo.map(|(_, main)| pgtwig_core::fsutil::canonical(main)),
            channels: Mutex::new(HashMap::new()),
            logged: Mutex::new(HashSet::new()),
        }
    }

    /// Takes the work trees' branches from `state` (after `pgtwig use` or a checkout).
    pub fn update(&self, state: &ProjectState) {
        let mut channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        // A removed work tree's entry is gone from the state (`gc`): stop routing by it.
        channels.retain(|dir, _| state.worktrees.contains_key(dir));
        for (dir, branch) in &state.worktrees {
            if self.main.as_deref() == Some(dir.as_path()) {
                continue;
            }
            match channels.get(dir) {
                Some(tx) => {
                    let old = tx.send_replace(branch.to_string());
                    if old != branch.as_str() {
                        tracing::info!(
                            "work tree {}: branch \"{old}\" → \"{branch}\"",
                            dir.display()
                        );
                    }
                }
                None => {
                    channels.insert(dir.clone(), watch::channel(branch.to_string()).0);
                }
            }
        }
    }

    /// Every work tree with a branch of its own, and that branch.
    pub fn list(&self) -> Vec<(PathBuf, String)> {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<_> = channels
            .iter()
            .map(|(d, tx)| (d.clone(), tx.borrow().clone()))
            .collect();
        out.sort();
        out
    }

    /// The main work tree, if the daemon knows it.
    pub fn main(&self) -> Option<&Path> {
        self.main.as_deref()
    }

    /// Where `client`'s unpinned sessions go.
    pub fn resolve(&self, client: &ClientInfo) -> Resolved {
        let Some(finder) = &self.finder else {
            return Resolved {
                follow: None,
                scope: None,
            };
        };
        let found = match &client.identity {
            PeerIdentity::User { pid: Some(pid), .. } => finder.of_pid(*pid),
            PeerIdentity::User {
                uid,
                socket_inode: Some(inode),
                ..
            } => finder
                .pid_of_socket(*uid, *inode)
                .and_then(|pid| finder.of_pid(pid)),
            PeerIdentity::User { .. } => Err("the kernel did not say which process it is".into()),
            PeerIdentity::Unknown(why) => Err(why.clone()),
        };
        let dir = match found {
            Ok(dir) => dir,
            Err(why) => return self.fallback(why),
        };
        if self.main.as_deref() == Some(dir.as_path()) {
            return Resolved {
                follow: None,
                scope: Some(dir.display().to_string()),
            };
        }
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        match channels.get(&dir) {
            Some(tx) => Resolved {
                follow: Some(tx.subscribe()),
                scope: Some(dir.display().to_string()),
            },
            None => {
                drop(channels);
                self.fallback(format!(
                    "work tree {} has no database branch of its own yet (check out a branch there, \
                     or run `pgtwig use BRANCH` in it)",
                    dir.display()
                ))
            }
        }
    }

    fn fallback(&self, why: String) -> Resolved {
        let first = {
            let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
            logged.len() < MAX_LOGGED_REASONS && logged.insert(why.clone())
        };
        if first {
            tracing::info!("{why}: routed to the main work tree's branch");
        } else {
            tracing::debug!("{why}: routed to the main work tree's branch");
        }
        Resolved {
            follow: None,
            scope: Some(format!("main work tree's branch ({why})")),
        }
    }
}
