//! `pgtwig branch list` for the local backend: the parent tree with what each branch is for
//! (git branch), whether it runs and with how many sessions, what keeps or ends it
//! (protected, TTL) and the disk it takes (own, shared, history bytes).

use std::collections::HashMap;
use std::process::ExitCode;

use anyhow::Result;
use pgtwig_daemon::control::{self, Request, Response};
use pgtwig_daemon::DaemonPaths;
use pgtwig_local::space::BranchUsage;
use pgtwig_local::LocalBackend;
use serde_json::json;

use crate::daemon_link::CONTROL_TIMEOUT;
use crate::output;
use pgtwig_project::Project;

/// Sessions per branch through the proxy; None when no daemon answers (nothing to count).
fn sessions_by_branch(backend: &LocalBackend) -> Option<HashMap<String, usize>> {
    let paths = DaemonPaths::for_backend(backend).ok()?;
    match control::request(&paths.control, &Request::Status, CONTROL_TIMEOUT) {
        Ok(Response::Status(s)) => {
            let mut counts = HashMap::new();
            for session in &s.sessions {
                *counts.entry(session.branch.clone()).or_insert(0) += 1;
            }
            Some(counts)
        }
        _ => None,
    }
}

/// "protected", "until 2026-12-09T10:00:00Z", "protected, until …" or "-".
fn keep_text(protected: bool, expires: Option<&str>) -> String {
    match (protected, expires) {
        (true, Some(e)) => format!("protected, until {e}"),
        (true, None) => "protected".into(),
        (false, Some(e)) => format!("until {e}"),
        (false, None) => "-".into(),
    }
}

pub fn list(backend: &LocalBackend, project: &Project, as_json: bool) -> Result<ExitCode> {
    let branches = backend.list()?;
    let mut problems: Vec<String> = branches.iter().filter_map(|b| b.problem.clone()).collect();
    // Own bytes from the extent map: apparent sizes say nothing on copy-on-write.
    let usages: Vec<Option<BranchUsage>> = branches
        .iter()
        .map(|b| match backend.usage(&b.name) {
            Ok(u) => Some(u),
            Err(e) => {
                problems.push(format!("measuring branch \"{}\": {e}", b.name));
                None
            }
        })
        .collect();
    let sessions = sessions_by_branch(backend);
    let sessions_of = |name: &str| sessions.as_ref().map(|s| s.get(name).copied().unwrap_or(0));
    if as_json {
        let items: Vec<_> = branches
            .iter()
            .zip(&usages)
            .map(|(b, u)| {
                let m = b.meta.as_ref();
                json!({
                    "name": b.name,
                    "parent": m.and_then(|m| m.parent.clone()),
                    "parent_exists": m.and_then(|m| m.parent.as_ref()).map(|p| backend.exists(p)),
                    "root": b.name == project.config.root_branch,
                    "created": m.map(|m| m.created.clone()),
                    "running": b.running,
                    "sessions": sessions_of(b.name.as_str()),
                    "size_bytes": b.size,
                    "own_bytes": u.map(|u| u.own),
                    "shared_bytes": u.map(|u| u.shared),
                    "history_bytes": u.map(|u| u.history),
                    "own_bytes_method": u.map(|u| u.method),
                    "clone_method": m.map(|m| m.clone_method),
                    "pg_major": m.map(|m| m.pg_major),
                    "git_branch": m.and_then(|m| m.git_branch.clone()),
                    "expires": m.and_then(|m| m.expires.clone()),
                    "protected": m.map(|m| m.protected),
                    "problem": b.problem,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
    } else {
        let family: Vec<(String, Option<String>)> = branches
            .iter()
            .map(|b| {
                let parent = b.meta.as_ref().and_then(|m| m.parent.as_ref());
                (b.name.to_string(), parent.map(|p| p.to_string()))
            })
            .collect();
        let mut rows = vec![vec![
            "BRANCH".to_string(),
            "GIT BRANCH".into(),
            "STATE".into(),
            "SESSIONS".into(),
            "KEPT".into(),
            "OWN".into(),
            "SHARED".into(),
            "HISTORY".into(),
            "CLONE".into(),
        ]];
        let estimated = usages
            .iter()
            .flatten()
            .any(|u| u.method == pgtwig_local::fiemap::Method::AllocatedBlocks);
        for (i, drawn) in crate::tree::layout(&family, project.config.root_branch.as_str()) {
            let (b, u) = (&branches[i], &usages[i]);
            let mut name = format!("{drawn}{}", b.name);
            if b.name == project.config.root_branch {
                name.push_str(" (root)");
            }
            let (git, kept, method) = match &b.meta {
                Some(m) => {
                    // A top that is not the root: its parent is gone (children keep working).
                    if let Some(p) = m.parent.as_ref().filter(|p| !backend.exists(p)) {
                        name.push_str(&format!(" (from {p} (deleted))"));
                    }
                    (
                        m.git_branch.clone().unwrap_or_else(|| "-".into()),
                        keep_text(m.protected, m.expires.as_deref()),
                        m.clone_method.describe().to_string(),
                    )
                }
                None => ("?".into(), "?".into(), "metadata unreadable".into()),
            };
            rows.push(vec![
                name,
                git,
                if b.running { "running" } else { "stopped" }.into(),
                sessions_of(b.name.as_str())
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "-".into()),
                kept,
                u.map(|u| output::size(u.own)).unwrap_or_else(|| "?".into()),
                u.map(|u| output::size(u.shared))
                    .unwrap_or_else(|| "?".into()),
                u.map(|u| output::size(u.history))
                    .unwrap_or_else(|| "?".into()),
                method,
            ]);
        }
        output::table(&rows);
        if sessions.is_none() {
            println!("(SESSIONS: the proxy is not running, so no session goes through it)");
        }
        if estimated {
            println!(
                "(this file system does not say which blocks are shared: OWN counts every allocated block)"
            );
        }
        if let Ok(free) = backend.free_space() {
            let kept = match backend.margin(free.total) {
                Ok(Some(m)) => format!("; builds keep {} free", output::size(m.bytes)),
                _ => String::new(),
            };
            println!(
                "{} free of {} on the file system of {}{kept}",
                output::size(free.available),
                output::size(free.total),
                backend.home().dir().display()
            );
        }
    }
    for p in &problems {
        eprintln!("error: {p}");
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn kept_says_protected_and_ttl() {
        assert_eq!(super::keep_text(false, None), "-");
        assert_eq!(super::keep_text(true, None), "protected");
        assert_eq!(
            super::keep_text(false, Some("2026-12-09T10:00:00Z")),
            "until 2026-12-09T10:00:00Z"
        );
    }
}
