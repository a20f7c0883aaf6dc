//! Which git work tree a client runs in, so one fixed port serves every work tree of the
//! project: each gets its own database branch.
//!
//! From the connection to the process, then to its working directory:
//! - Unix socket: the kernel gives the peer's pid (`SO_PEERCRED`).
//! - Loopback TCP: the proxy found the client socket's inode (netlink `sock_diag`); the process
//!   holding it is the one with a `socket:[inode]` link in `/proc/<pid>/fd`. Only processes
//!   of the socket's owner are searched, the processes that connected recently first (an app's
//!   pool connects from one pid again and again), then the processes started since the last
//!   search (pids grow until they wrap; a client that just started — psql, a test run — is
//!   one of them), and only then every process; so a lookup usually reads one fd folder.
//!   A client outside every work tree is then looked for among all the owner's processes,
//!   once: the process found is remembered with the recent ones, so its next connections
//!   (a benchmark, an app started elsewhere) cost one fd folder too, not a search of every
//!   process (at `pgbench -C` that search was ~0.9 ms of the daemon's CPU per connection).
//! - The work tree: walk up from `/proc/<pid>/cwd` to the first folder with `.git`; it counts
//!   only if its git common dir is this project's repository.
//!
//! Answers are cached per (pid, process start time), so a reused pid is never mistaken for
//! the process that had it before. The process facts come from `crate::process`: `/proc` on
//! Linux, libproc on macOS (where only Unix-socket clients, whose pid the kernel gives, are
//! found; a TCP client goes to the main work tree's branch and the daemon logs why).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::linked_worktrees::LinkedWorktrees;
#[cfg(target_os = "linux")]
use crate::process::{all_pids, fd_holding, holds, last_pid, owned_by};
use crate::process::{cwd, start_time};

/// Processes remembered as recent connectors, tried first.
const RECENT_PIDS: usize = 16;
/// Cached (pid → work tree) answers before the cache is cleared.
const MAX_CACHED: usize = 4096;
/// Pids started since the last search that are probed one by one before a full scan of
/// `/proc` (more than this many new tasks: the scan is as cheap).
const MAX_NEW_PIDS_PROBED: u32 = 256;

/// Finds clients' work trees for one repository.
pub struct WorktreeFinder {
    /// The repository's git common dir, canonical.
    common_dir: PathBuf,
    cache: Mutex<HashMap<(u32, u64), Option<PathBuf>>>,
    recent: Mutex<VecDeque<u32>>,
    /// Processes outside every work tree that held client sockets, tried after `recent`.
    outsiders: Mutex<VecDeque<u32>>,
    /// The descriptor each recent or outside process held its last client socket in.
    last_fd: Mutex<HashMap<u32, u32>>,
    /// Whether `<common dir>/worktrees` has entries.
    linked: LinkedWorktrees,
    /// The kernel's last allocated pid when processes were last searched: pids above it are
    /// processes (or threads) started since.
    searched_up_to: Mutex<Option<u32>>,
}

/// Why a client's work tree is not known (logged, shown by `status`).
pub type Unknown = String;

impl WorktreeFinder {
    /// For the repository whose git common dir is `common_dir`.
    pub fn new(common_dir: &Path) -> WorktreeFinder {
        let common_dir = pgtwig_core::fsutil::canonical(common_dir);
        WorktreeFinder {
            linked: LinkedWorktrees::new(&common_dir),
            common_dir,
            cache: Mutex::new(HashMap::new()),
            recent: Mutex::new(VecDeque::new()),
            outsiders: Mutex::new(VecDeque::new()),
            last_fd: Mutex::new(HashMap::new()),
            searched_up_to: Mutex::new(None),
        }
    }

    /// The work tree (its top folder, canonical) of the process `pid`.
    pub fn of_pid(&self, pid: u32) -> Result<PathBuf, Unknown> {
        let start = start_time(pid).ok_or_else(|| format!("process {pid} is gone"))?;
        if let Some(hit) = self.cached(pid, start) {
            return hit.ok_or_else(|| {
                format!("process {pid} does not run in a work tree of this project")
            });
        }
        let cwd = cwd(pid)
            .map_err(|e| format!("cannot read the working directory of process {pid}: {e}"))?;
        let found = self.worktree_of_dir(&cwd);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        if cache.len() >= MAX_CACHED {
            cache.clear();
        }
        cache.insert((pid, start), found.clone());
        found.ok_or_else(|| {
            format!(
                "process {pid} runs in {}, outside every work tree of this project",
                cwd.display()
            )
        })
    }

    fn cached(&self, pid: u32, start: u64) -> Option<Option<PathBuf>> {
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&(pid, start))
            .cloned()
    }

    /// The process of user `uid` holding the socket with `inode`. Linux only: elsewhere the
    /// proxy learns no socket inode (see `pgtwig_proxy::peer`): on macOS its lookup of a TCP
    /// client finds the process itself, and a Unix-socket client's pid comes straight from
    /// the kernel.
    #[cfg(not(target_os = "linux"))]
    pub fn pid_of_socket(&self, _uid: u32, _inode: u64) -> Result<u32, Unknown> {
        Err(
            "finding the process of a TCP client is implemented on Linux and macOS only; \
             connect through the proxy's Unix socket (`pgtwig status` shows it) to be routed \
             by work tree"
                .into(),
        )
    }

    /// The process of user `uid` holding the socket with `inode`.
    #[cfg(target_os = "linux")]
    pub fn pid_of_socket(&self, uid: u32, inode: u64) -> Result<u32, Unknown> {
        let link = format!("socket:[{inode}]");
        let recent: Vec<u32> = self
            .recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        let outsiders: Vec<u32> = self
            .outsiders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .copied()
            .collect();
        // `pid` if it holds the socket, its descriptor noted for the next lookup.
        let held_by = |pid: u32| {
            let hint = self
                .last_fd
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&pid)
                .copied();
            let fd = fd_holding(pid, &link, hint)?;
            let mut known = self.last_fd.lock().unwrap_or_else(|e| e.into_inner());
            if known.len() >= 4 * RECENT_PIDS {
                known.clear();
            }
            known.insert(pid, fd);
            Some(pid)
        };
        if let Some(pid) = outsiders.iter().find_map(|&pid| held_by(pid)) {
            // `of_pid` says it is outside (cached per process), or finds where it moved.
            return Ok(pid);
        }
        let found = recent.iter().find_map(|&pid| held_by(pid)).or_else(|| {
            // Only a process running in one of the repository's work trees can change
            // where the client goes, so only those are searched (one readlink of its cwd
            // each), newest first: a client that just connected is usually a process
            // that just started (psql, a test run), or else one found before (`recent`).
            let roots = self.worktree_roots();
            let candidate = |pid: u32| {
                owned_by(pid, uid)
                    && cwd(pid).is_ok_and(|cwd| roots.iter().any(|r| cwd.starts_with(r)))
                    && holds(pid, &link)
            };
            // Read before searching: a process started during the search is above it.
            let last = last_pid();
            let mut searched = self
                .searched_up_to
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let new_pids = match (*searched, last) {
                (Some(from), Some(to)) if from <= to && to - from <= MAX_NEW_PIDS_PROBED => {
                    Some((from + 1..=to).rev())
                }
                _ => None,
            };
            let found = new_pids
                .and_then(|mut pids| pids.find(|&pid| !recent.contains(&pid) && candidate(pid)))
                .or_else(|| {
                    let mut pids: Vec<u32> = all_pids().filter(|p| !recent.contains(p)).collect();
                    pids.sort_unstable_by(|a, b| b.cmp(a));
                    pids.into_iter().find(|&pid| candidate(pid))
                });
            if last.is_some() {
                *searched = last;
            }
            found
        });
        let pid = match found {
            Some(pid) => pid,
            None => {
                let outsider = all_pids()
                    .filter(|p| !recent.contains(p) && !outsiders.contains(p))
                    .find(|&pid| owned_by(pid, uid) && held_by(pid).is_some())
                    .ok_or_else(|| {
                        format!("no process of uid {uid} holds the client socket (inode {inode})")
                    })?;
                let mut outsiders = self.outsiders.lock().unwrap_or_else(|e| e.into_inner());
                outsiders.push_front(outsider);
                outsiders.truncate(RECENT_PIDS);
                return Ok(outsider);
            }
        };
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.retain(|&p| p != pid);
        recent.push_front(pid);
        recent.truncate(RECENT_PIDS);
        Ok(pid)
    }

    /// Whether the repository has linked work trees (`<common dir>/worktrees/*`, which git
    /// keeps one folder each for). Without any, every client goes to the main work tree's
    /// branch whichever process it is, so nothing needs looking up. See `linked_worktrees.rs`
    /// for how this costs no path walk per call.
    pub fn has_linked_worktrees(&self) -> bool {
        self.linked.any()
    }

    /// The top folders of the repository's work trees: the main one (the common dir's parent,
    /// unless the repository is bare) and each linked one (`<common>/worktrees/*/gitdir`).
    fn worktree_roots(&self) -> Vec<PathBuf> {
        let mut roots = Vec::new();
        if self.common_dir.file_name().is_some_and(|n| n == ".git") {
            if let Some(main) = self.common_dir.parent() {
                roots.push(main.to_path_buf());
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.common_dir.join("worktrees")) {
            for e in entries.flatten() {
                if let Ok(gitdir) = std::fs::read_to_string(e.path().join("gitdir")) {
                    if let Some(root) = Path::new(gitdir.trim()).parent() {
                        roots.push(pgtwig_core::fsutil::canonical(root));
                    }
                }
            }
        }
        roots
    }

    /// The work tree of this repository containing `dir`, if any.
    pub fn worktree_of_dir(&self, dir: &Path) -> Option<PathBuf> {
        let mut cur = Some(dir);
        while let Some(d) = cur {
            let dotgit = d.join(".git");
            if let Ok(meta) = std::fs::symlink_metadata(&dotgit) {
                let common = if meta.is_dir() {
                    Some(dotgit)
                } else {
                    linked_common_dir(&dotgit)
                };
                let ours = common
                    .and_then(|c| c.canonicalize().ok())
                    .is_some_and(|c| c == self.common_dir);
                // The nearest work tree decides, ours or not (a nested repository is not ours).
                return ours.then(|| pgtwig_core::fsutil::canonical(d));
            }
            cur = d.parent();
        }
        None
    }
}

/// A linked work tree's `.git` file says `gitdir: <repo>/.git/worktrees/<name>`, whose
/// `commondir` file leads back to the repository's git dir.
fn linked_common_dir(dotgit_file: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dotgit_file).ok()?;
    let gitdir = text.trim().strip_prefix("gitdir:")?.trim();
    let gitdir = dotgit_file.parent()?.join(gitdir);
    match std::fs::read_to_string(gitdir.join("commondir")) {
        Ok(c) => Some(gitdir.join(c.trim())),
        Err(_) => Some(gitdir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    use crate::test_repo::{git, repo_with_a_commit};

    #[test]
    fn main_and_linked_work_trees_are_found_and_others_are_not() {
        let tmp = tempfile::tempdir().unwrap();
        let repo = repo_with_a_commit(tmp.path());
        let only_main = WorktreeFinder::new(&repo.join(".git"));
        assert!(!only_main.has_linked_worktrees());
        git(&repo, &["worktree", "add", "-q", "../wt2", "-b", "feature"]);
        assert!(
            only_main.has_linked_worktrees(),
            "seen as soon as git adds it"
        );
        git(&repo, &["worktree", "add", "-q", "../wt3", "-b", "other"]);
        git(&repo, &["worktree", "remove", "../wt3"]);
        assert!(only_main.has_linked_worktrees(), "wt2 is still there");
        std::fs::create_dir_all(repo.join("src/deep")).unwrap();
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        git(&other, &["init", "-q"]);

        let finder = WorktreeFinder::new(&repo.join(".git"));
        let canon = |p: &Path| p.canonicalize().unwrap();
        assert_eq!(
            finder.worktree_of_dir(&repo.join("src/deep")),
            Some(canon(&repo))
        );
        assert_eq!(
            finder.worktree_of_dir(&tmp.path().join("wt2")),
            Some(canon(&tmp.path().join("wt2")))
        );
        assert_eq!(finder.worktree_of_dir(&other), None, "another repository");
        assert_eq!(
            finder.worktree_of_dir(tmp.path()),
            None,
            "outside any work tree"
        );

        // A real process in wt2.
        let mut child = Command::new("sleep")
            .arg("30")
            .current_dir(tmp.path().join("wt2"))
            .spawn()
            .unwrap();
        assert_eq!(
            finder.of_pid(child.id()).unwrap(),
            canon(&tmp.path().join("wt2"))
        );
        // Cached: still the same answer.
        assert_eq!(
            finder.of_pid(child.id()).unwrap(),
            canon(&tmp.path().join("wt2"))
        );
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(finder.of_pid(child.id()).is_err(), "a gone process");
    }

    #[test]
    fn the_process_holding_a_socket_is_found_when_it_runs_in_a_work_tree() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let inode = std::fs::metadata(format!("/proc/self/fd/{}", client.as_raw_fd()))
            .unwrap()
            .ino();
        let me = nix::unistd::geteuid().as_raw();
        // This test process runs in the crate folder, inside the pgtwig checkout (a work tree
        // when tests run from git; skip the positive half where they do not).
        let cwd = std::env::current_dir().unwrap();
        let ours = std::process::Command::new("git")
            .args(["rev-parse", "--git-common-dir"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| cwd.join(String::from_utf8_lossy(&o.stdout).trim()));
        if let Some(common) = ours {
            let finder = WorktreeFinder::new(&common);
            finder.has_linked_worktrees(); // whatever the checkout has: no effect on the search
            assert_eq!(finder.pid_of_socket(me, inode).unwrap(), std::process::id());
            // Second time from the recent list.
            assert_eq!(finder.pid_of_socket(me, inode).unwrap(), std::process::id());
            assert!(finder.pid_of_socket(me, u64::MAX).is_err());
        }
        // A repository this process does not run in: the holder is found by a search of
        // every process of the user, remembered, and `of_pid` says it is outside.
        let finder = WorktreeFinder::new(Path::new("/nonexistent/.git"));
        let pid = finder.pid_of_socket(me, inode).unwrap();
        assert_eq!(pid, std::process::id());
        assert!(finder.outsiders.lock().unwrap().contains(&pid));
        assert!(finder
            .of_pid(pid)
            .unwrap_err()
            .contains("outside every work tree"));
        assert_eq!(finder.pid_of_socket(me, inode).unwrap(), pid, "remembered");
        assert!(
            finder.pid_of_socket(me, u64::MAX).is_err(),
            "held by nobody"
        );
    }

    /// A client started after a search is found among the pids allocated since.
    #[test]
    fn a_process_started_since_the_last_search_is_found() {
        use std::io::{BufRead, BufReader};
        let tmp = tempfile::tempdir().unwrap();
        let repo = tmp.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        git(&repo, &["init", "-q"]);
        let finder = WorktreeFinder::new(&repo.join(".git"));
        let me = nix::unistd::geteuid().as_raw();
        assert!(finder.pid_of_socket(me, u64::MAX).is_err());
        let searched = (*finder.searched_up_to.lock().unwrap()).expect("a search was made");

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut client = std::process::Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket,time\ns=socket.create_connection(('127.0.0.1',{port}))\nprint('up',flush=True)\ntime.sleep(60)"
                ),
            ])
            .current_dir(&repo)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(client.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (server_end, client_addr) = listener.accept().unwrap();
        let owner =
            pgtwig_proxy::peer::tcp_peer_owner(server_end.local_addr().unwrap(), client_addr)
                .unwrap()
                .expect("the client's socket");
        let found = finder.pid_of_socket(owner.uid, owner.inode);
        let _ = client.kill();
        let _ = client.wait();
        assert_eq!(found.unwrap(), client.id());
        assert!(client.id() > searched, "a new pid");
    }
}
