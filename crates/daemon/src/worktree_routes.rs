//! One port, a branch per work tree: which branch a client goes to, given the work tree it
//! runs in (see `client_worktree`), and the channels that switch its sessions when that work
//! tree's branch changes.
//!
//! The main work tree's branch is the project's `active` branch (the proxy's own channel);
//! every other work tree of the repository has its own entry in `state.json` and its own
//! channel here. A client whose work tree cannot be found — a container, a process outside
//! every work tree, a failed lookup — or whose work tree has no branch of its own yet goes to
//! the main work tree's branch, and the daemon log and `pgtwig status` say so.
//!
//! A work tree of the repository with no branch of its own (made while the daemon was down,
//! or its hook skipped) is provisioned on its first client as the hook would: the checkout
//! policy (`pgtwig_project::checkout`) maps its HEAD through its `[[map]]` rules, making the
//! branch when the rule says so. It waits at most [`PROVISION_LOCK_WAIT`] for a busy project;
//! then the client goes to the main work tree's branch, saying why.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgtwig_core::state::ProjectState;
use pgtwig_proxy::{ClientInfo, PeerIdentity};
use tokio::sync::watch;

use crate::client_worktree::WorktreeFinder;

/// Distinct fallback reasons logged at info level before they are only logged at debug.
const MAX_LOGGED_REASONS: usize = 64;

/// How long provisioning a work tree's branch on its first client waits for the project
/// lock (as wake-on-connect does): a client is never held behind a long build.
pub const PROVISION_LOCK_WAIT: Duration = Duration::from_secs(1);

/// `status`'s scope of a session while the repository has no linked work tree (no process
/// is looked up then: see [`WorktreeFinder::has_linked_worktrees`]).
const ONLY_WORK_TREE: &str = "main work tree's branch (the repository has no other work tree)";

/// Where a client's sessions go and what they follow.
pub struct Resolved {
    /// The branch of the client's work tree, when it is not the main one's.
    pub follow: Option<watch::Receiver<String>>,
    /// The client's work tree for `status`, or why it routes to the main one's branch.
    pub scope: Option<String>,
    /// A work tree of the repository without a branch of its own yet: see [`WorktreeRoutes::provision`].
    pub unprovisioned: Option<PathBuf>,
}

/// The work trees the daemon routes by.
pub struct WorktreeRoutes {
    finder: Option<WorktreeFinder>,
    main: Option<PathBuf>,
    channels: Mutex<HashMap<PathBuf, watch::Sender<String>>>,
    logged: Mutex<HashSet<String>>,
    /// One provisioning per work tree at a time; later clients wait for it and take its branch.
    provisioning: Mutex<HashMap<PathBuf, Arc<tokio::sync::Mutex<()>>>>,
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
            provisioning: Mutex::new(HashMap::new()),
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
                unprovisioned: None,
            };
        };
        if !finder.has_linked_worktrees() {
            // One work tree: every client's sessions go to its branch, found or not.
            return Resolved {
                follow: None,
                scope: Some(ONLY_WORK_TREE.to_string()),
                unprovisioned: None,
            };
        }
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
                unprovisioned: None,
            };
        }
        self.of_worktree(&dir).unwrap_or(Resolved {
            follow: None,
            scope: None,
            unprovisioned: Some(dir),
        })
    }

    /// The route of a work tree with a branch of its own.
    fn of_worktree(&self, dir: &Path) -> Option<Resolved> {
        let channels = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        channels.get(dir).map(|tx| Resolved {
            follow: Some(tx.subscribe()),
            scope: Some(dir.display().to_string()),
            unprovisioned: None,
        })
    }

    /// Gives work tree `dir` its branch as the hook would (see the module documentation) and
    /// routes there; falls back to the main work tree's branch, saying why, when no branch
    /// results.
    pub async fn provision(self: Arc<Self>, dir: PathBuf) -> Resolved {
        let gate = {
            let mut map = self.provisioning.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(dir.clone()).or_default().clone()
        };
        let _turn = gate.lock().await;
        // Made by the client before us (or a checkout meanwhile).
        if let Some(resolved) = self.of_worktree(&dir) {
            return resolved;
        }
        let for_blocking = dir.clone();
        let done = tokio::task::spawn_blocking(move || provision_blocking(&for_blocking)).await;
        let why = match done {
            Ok(Ok(state)) => {
                self.update(&state);
                match self.of_worktree(&dir) {
                    Some(resolved) => return resolved,
                    None => "no branch resulted".to_string(),
                }
            }
            Ok(Err(why)) => why,
            Err(e) => format!("provisioning failed: {e}"),
        };
        self.fallback(format!(
            "work tree {} has no database branch of its own: {why}",
            dir.display()
        ))
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
            unprovisioned: None,
        }
    }
}

/// Follows the checkout of work tree `dir` with the hook's policy; the state after it, or why
/// the work tree has no branch of its own.
fn provision_blocking(dir: &Path) -> Result<ProjectState, String> {
    use pgtwig_project::checkout::Outcome;
    let project = pgtwig_project::Project::discover_in(dir).map_err(|e| format!("{e:#}"))?;
    let mut backend = project.backend(false).map_err(|e| format!("{e:#}"))?;
    if let pgtwig_project::Backend::Local(b) = &mut backend {
        b.set_lock_wait(Some(PROVISION_LOCK_WAIT));
    }
    let mut log = crate::head_watch::Log::new(dir, "first client");
    let outcome = pgtwig_project::checkout::follow(&project, &backend, dir, &mut log)
        .map_err(|e| format!("{e:#}"))?;
    match outcome {
        Outcome::Active { .. } => project.load_state().map_err(|e| format!("{e:#}")),
        Outcome::Detached => Err("its HEAD is detached".into()),
        Outcome::NoRule => Err("no [[map]] rule matches its git branch".into()),
        Outcome::NotCreated => {
            Err("its rule says create = \"never\" and the branch does not exist".into())
        }
    }
}
