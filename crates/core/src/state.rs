//! `state.json`: project-wide state that is not configuration — which
//! branch the proxy routes to. Written atomically; read by the daemon.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::fsutil;
use crate::names::BranchName;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProjectState {
    /// The branch new proxy connections go to.
    pub active: BranchName,
    /// The git work tree whose checkouts switch `active` (set by `init` and
    /// `up`); checkouts in other worktrees of the repository only create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worktree: Option<std::path::PathBuf>,
}

impl ProjectState {
    pub fn load(path: &Path) -> Result<ProjectState, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        serde_json::from_str(&text).map_err(|e| {
            format!(
                "{} is corrupt ({e}); set the active branch again with `pgtwig use <branch>`",
                path.display()
            )
        })
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let mut json = serde_json::to_vec_pretty(self)?;
        json.push(b'\n');
        fsutil::write_atomic(path, &json)
    }
}
