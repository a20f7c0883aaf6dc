//! How commands reach the project's running daemon (the daemon crate owns its paths and
//! control protocol; the project crate, which the daemon itself uses, cannot).

use anyhow::{bail, Result};
use pgtwig_core::BranchName;
use pgtwig_daemon::control::{self, ClientError, Request};
use pgtwig_daemon::DaemonPaths;
use pgtwig_project::Backend;

/// How long a command waits for the daemon to answer a control request.
pub const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The daemon's files for a backend.
pub trait DaemonOf {
    fn daemon_paths(&self) -> Result<DaemonPaths>;
}

impl DaemonOf for Backend {
    fn daemon_paths(&self) -> Result<DaemonPaths> {
        match self {
            Backend::Local(b) => DaemonPaths::for_backend(b),
            Backend::Neon(n) => DaemonPaths::for_neon(&n.backend),
        }
    }
}

/// Tells a running daemon that state.json changed (an active branch, a work tree); no daemon
/// is fine. `branch` names the change in the error.
pub fn tell_active_changed(backend: &Backend, branch: &BranchName) -> Result<()> {
    let paths = backend.daemon_paths()?;
    match control::request(&paths.control, &Request::ActiveChanged, CONTROL_TIMEOUT) {
        Ok(_) | Err(ClientError::NotRunning) => Ok(()),
        Err(e) => {
            bail!("the active branch is now \"{branch}\", but the daemon did not take it: {e}")
        }
    }
}
