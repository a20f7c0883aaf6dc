//! The daemon's control socket: how `pgtwig use`, `status` and `down` talk
//! to a running daemon. One JSON request line, one JSON response line, over
//! a Unix socket in the runtime folder (never TCP).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "request", rename_all = "kebab-case")]
pub enum Request {
    Ping,
    /// Re-read `state.json`: the active branch changed.
    ActiveChanged,
    Status,
    /// Close the branch's sessions at their next transaction boundary and
    /// hold off new ones until this control connection closes (used around
    /// reset and delete).
    Drain {
        branch: String,
        /// What the sessions are told, after "terminating connection: " (default: that the
        /// branch is being reset or deleted).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        why: Option<String>,
    },
    /// Stop the daemon; `stop_branches` also stops every running branch.
    Shutdown {
        stop_branches: bool,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "response", rename_all = "kebab-case")]
pub enum Response {
    Ok { pid: u32 },
    Status(Box<DaemonStatus>),
    Error { message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct DaemonStatus {
    pub pid: u32,
    /// The configured address with the port in use, e.g. "localhost:5432".
    pub listen: String,
    /// Every TCP address bound, e.g. ["127.0.0.1:5432", "[::1]:5432"].
    #[serde(default)]
    pub addresses: Vec<String>,
    /// The proxy's Unix socket (`.s.PGSQL.<port>`): `psql -h <its folder>`.
    #[serde(default)]
    pub unix_socket: Option<String>,
    /// Who must authenticate with the proxy password.
    #[serde(default)]
    pub password_required: String,
    pub active: String,
    pub tls: bool,
    pub on_switch: String,
    pub suspend_timeout_secs: u64,
    pub sessions: Vec<SessionStatus>,
    /// The main work tree (its branch is `active`).
    #[serde(default)]
    pub main_worktree: Option<String>,
    /// Every other work tree with a branch of its own.
    #[serde(default)]
    pub worktrees: Vec<WorktreeStatus>,
}

/// A work tree and its active branch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct WorktreeStatus {
    pub path: String,
    pub branch: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct SessionStatus {
    pub branch: String,
    pub client: String,
    pub user: Option<String>,
    pub database: Option<String>,
    pub application_name: Option<String>,
    pub pinned: bool,
    pub in_transaction: bool,
    pub seconds: u64,
    /// The client's work tree, or why it went to the main work tree's branch.
    #[serde(default)]
    pub worktree: Option<String>,
}

/// Where a project's control socket lives: the runtime folder (short path,
/// see `pgtwig_local::cluster::socket_dir_for`), named by the project folder.
pub fn socket_path(runtime_base: &Path, project_dir: &Path) -> PathBuf {
    runtime_base.join(format!(
        "daemon-{}.sock",
        pgtwig_core::names::short_hash(&project_dir.to_string_lossy())
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No daemon listens (not started, or exited).
    #[error("the pgtwig daemon is not running")]
    NotRunning,
    #[error("talking to the pgtwig daemon at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the pgtwig daemon answered: {0}")]
    Daemon(String),
}

/// Send one request and wait for the answer (blocking; for the CLI).
pub fn request(path: &Path, req: &Request, timeout: Duration) -> Result<Response, ClientError> {
    exchange(path, req, timeout).map(|(r, _)| r)
}

/// Drain `branch` (see [`Request::Drain`]); the daemon holds new sessions
/// off until the returned connection is dropped.
pub fn drain(path: &Path, branch: &str, timeout: Duration) -> Result<UnixStream, ClientError> {
    drain_saying(path, branch, None, timeout)
}

/// [`drain`], telling the sessions `why` (e.g. where their work tree goes now).
pub fn drain_saying(
    path: &Path,
    branch: &str,
    why: Option<String>,
    timeout: Duration,
) -> Result<UnixStream, ClientError> {
    exchange(
        path,
        &Request::Drain {
            branch: branch.to_string(),
            why,
        },
        timeout,
    )
    .map(|(_, s)| s)
}

fn exchange(
    path: &Path,
    req: &Request,
    timeout: Duration,
) -> Result<(Response, UnixStream), ClientError> {
    let io = |source| ClientError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Err(ClientError::NotRunning)
        }
        Err(e) => return Err(io(e)),
    };
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut line = serde_json::to_string(req).expect("requests serialize");
    line.push('\n');
    stream.write_all(line.as_bytes()).map_err(io)?;
    let mut answer = String::new();
    BufReader::new(&stream).read_line(&mut answer).map_err(io)?;
    if answer.is_empty() {
        // The daemon closes without answering only when it is going away.
        return Err(ClientError::NotRunning);
    }
    match serde_json::from_str(&answer) {
        Ok(Response::Error { message }) => Err(ClientError::Daemon(message)),
        Ok(r) => Ok((r, stream)),
        Err(e) => Err(ClientError::Daemon(format!(
            "unreadable answer {answer:?}: {e}"
        ))),
    }
}
