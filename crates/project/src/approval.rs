//! Commands and hosts that came with the repository run (or get the Neon API key) only once
//! the user approved them with `pgtwig trust` (the direnv model: approvals are keyed by the
//! repository and the exact list, and kept outside it).

use std::path::Path;

use anyhow::{Context, Result};
use pgtwig_core::trust::{self, CommandKind, RepoKey, TrustStore};
use pgtwig_core::BranchName;

use crate::{Project, Report};

/// The repository `root` belongs to, as approvals are keyed.
pub fn repo_key(root: &Path) -> Result<RepoKey> {
    let wt = pgtwig_git::Worktree::discover(root)?;
    RepoKey::from_common_dir(wt.common_dir())
        .with_context(|| format!("cannot resolve {}", wt.common_dir().display()))
}

/// Whether `commands` (a `post_create` list from `source`) may run in the work tree at
/// `project.root`. When not, says what was skipped and how to approve it (a warning) and
/// never fails: the checkout goes on without them.
pub fn may_run(
    project: &Project,
    branch: &BranchName,
    source: &'static str,
    commands: &[String],
    report: &mut dyn Report,
) -> bool {
    let checked = repo_key(&project.root).and_then(|repo| {
        let store = TrustStore::load(&trust::trust_path(&project.home))?;
        Ok(store.is_approved(&repo, CommandKind::PostCreate, commands))
    });
    let why = match checked {
        Ok(true) => return true,
        Ok(false) => "are not approved for this repository".to_string(),
        Err(e) => format!("cannot be checked ({e:#})"),
    };
    report.warn(&format!(
        "did not run post_create for \"{branch}\": these commands from {source} {why}:"
    ));
    for c in commands {
        report.warn(&format!("    {c}"));
    }
    report.warn(&format!(
        "review them, then approve with `pgtwig trust` in {}; branch \"{branch}\" was made without them \
         (`pgtwig branch url {branch}` is the DATABASE_URL to run them by hand)",
        project.root.display()
    ));
    false
}

/// A `[neon] api_url` other than Neon's own gets the API key only once approved: a
/// committed config could otherwise send it to any https host.
pub fn require_approved_api_url(project: &Project, api_url: &str) -> Result<()> {
    if api_url == pgtwig_core::config::DEFAULT_NEON_API_URL {
        return Ok(());
    }
    let repo = repo_key(&project.root)?;
    let store = TrustStore::load(&trust::trust_path(&project.home))?;
    if store.is_approved(&repo, CommandKind::NeonApiUrl, &[api_url.to_string()]) {
        return Ok(());
    }
    anyhow::bail!(
        "[neon] api_url in {} is \"{api_url}\", not Neon's own API ({}), and pgtwig would send your Neon API key \
         there; if you trust that host, approve it with `pgtwig trust` in {}",
        pgtwig_core::CONFIG_FILE,
        pgtwig_core::config::DEFAULT_NEON_API_URL,
        project.root.display()
    )
}

/// `{ sql = "…" }` masks run as the branch's superuser (which can run programs: `COPY … TO
/// PROGRAM`), so a committed config's SQL runs only once `pgtwig trust` approved that exact
/// list, like `post_create`. Refused otherwise, listing the SQL and how to approve it.
pub fn require_approved_anonymize_sql(project: &Project) -> Result<()> {
    let lists = trust::command_lists(&project.config);
    let Some(sql) = lists.iter().find(|l| l.kind == CommandKind::AnonymizeSql) else {
        return Ok(());
    };
    let repo = repo_key(&project.root)?;
    let store = TrustStore::load(&trust::trust_path(&project.home))?;
    if store.is_approved(&repo, CommandKind::AnonymizeSql, &sql.commands) {
        return Ok(());
    }
    anyhow::bail!(
        "[anonymize.columns] in {} has SQL masks, which pgtwig runs as the branch's superuser, and they are \
         not approved for this repository:\n    {}\nNothing was changed. Review them, then approve with \
         `pgtwig trust` in {}",
        pgtwig_core::CONFIG_FILE,
        sql.commands.join("\n    "),
        project.root.display()
    )
}

/// `[neon] connect` and `ca_file` decide where the role's password goes: a committed config's
/// values are used only once `pgtwig trust` approved them.
pub fn require_approved_neon_endpoint(project: &Project) -> Result<()> {
    let lists = trust::command_lists(&project.config);
    let Some(endpoint) = lists.iter().find(|l| l.kind == CommandKind::NeonEndpoint) else {
        return Ok(());
    };
    let repo = repo_key(&project.root)?;
    let store = TrustStore::load(&trust::trust_path(&project.home))?;
    if store.is_approved(&repo, CommandKind::NeonEndpoint, &endpoint.commands) {
        return Ok(());
    }
    anyhow::bail!(
        "[neon] in {} sets {}: pgtwig would send the Neon role's password there; if you trust it, \
         approve it with `pgtwig trust` in {}",
        pgtwig_core::CONFIG_FILE,
        endpoint.commands.join(" and "),
        project.root.display()
    )
}
