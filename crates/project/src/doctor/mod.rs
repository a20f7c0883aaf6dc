//! `pgtwig doctor`: what this machine and project need for pgtwig to work well, each finding
//! with what to do. `pgtwig init` runs the machine's checks ([`machine`]) before it makes the
//! root branch, so the copy-on-write verdict comes before the first full copy.
//!
//! - server binaries: which PostgreSQL installations pgtwig finds, and their versions;
//! - copy-on-write: a real clone (FICLONE) in the state folder, its file system, and where it
//!   cannot clone the commands that put a reflink store (a sparse XFS image) there
//!   ([`copy_on_write`]);
//! - free space against the margin builds keep ([`pgtwig_local::space`]);
//! - the proxy's port on every address it listens on, and who holds it ([`port`]);
//! - the git hook: installed, calling a pgtwig that exists, chaining the hook that was there;
//! - the daemon: running, and for which work tree (the CLI asks it; see [`DaemonSeen`]).
//!
//! A finding is [`Status::Fix`] when something does not work until it is fixed (the command
//! then exits 1), [`Status::Warn`] when pgtwig works but worse than it could (full copies, no
//! daemon), [`Status::Ok`] otherwise.

pub mod copy_on_write;
pub mod port;

use std::path::{Path, PathBuf};

use pgtwig_core::size::human;
use serde::Serialize;
use serde_json::json;

use crate::Project;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Check {
    Project,
    ServerBinaries,
    CopyOnWrite,
    FreeSpace,
    Port,
    Hook,
    Daemon,
}

impl Check {
    pub fn label(self) -> &'static str {
        match self {
            Check::Project => "project",
            Check::ServerBinaries => "server binaries",
            Check::CopyOnWrite => "copy-on-write",
            Check::FreeSpace => "free space",
            Check::Port => "port",
            Check::Hook => "git hook",
            Check::Daemon => "daemon",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Status {
    Ok,
    /// Works, but not as well as it could.
    Warn,
    /// Does not work until fixed.
    Fix,
}

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: Check,
    pub status: Status,
    /// One line: what was found.
    pub summary: String,
    /// What to do about it, in words (not for [`Status::Ok`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// The exact commands to run, in order, when there are some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub commands: Vec<String>,
    /// What was measured, for `--json`.
    pub details: serde_json::Value,
}

impl Finding {
    fn ok(check: Check, summary: String, details: serde_json::Value) -> Finding {
        Finding {
            check,
            status: Status::Ok,
            summary,
            fix: None,
            commands: vec![],
            details,
        }
    }

    fn needs(mut self, status: Status, fix: String) -> Finding {
        self.status = status;
        self.fix = Some(fix);
        self
    }
}

/// Whether any finding needs fixing (`pgtwig doctor` exits 1 then).
pub fn needs_fixing(findings: &[Finding]) -> bool {
    findings.iter().any(|f| f.status == Status::Fix)
}

/// The daemon as the CLI found it on its control socket (this crate cannot reach it: the
/// daemon crate depends on this one).
#[derive(Debug, Clone)]
pub enum DaemonSeen {
    Running {
        pid: u32,
        /// Every TCP address it listens on.
        addresses: Vec<String>,
        /// The work tree it follows (HEAD watch; clients it cannot place go to its branch).
        main_worktree: Option<PathBuf>,
    },
    NotRunning,
    /// The control socket is there but did not answer.
    Unreachable(String),
}

/// What this machine offers the project: server binaries, copy-on-write, free space, the port
/// (the state folder may not exist yet: before `pgtwig init`, the folder it will be made in).
pub fn machine(project: &Project, daemon: &DaemonSeen) -> Vec<Finding> {
    if project.config.backend == pgtwig_core::BackendKind::Neon {
        // Neon keeps the branches: no servers, clones or disk here.
        return vec![port::check(&project.config.proxy.listen, daemon)];
    }
    vec![
        server_binaries(),
        copy_on_write::check(project.home.state_root()),
        free_space(project),
        port::check(&project.config.proxy.listen, daemon),
    ]
}

/// Every check: [`machine`], then the project's own (initialised, hook, daemon). `config_found`
/// is false when there is no `.pgtwig.toml` yet (the defaults were checked).
pub fn all(project: &Project, config_found: bool, daemon: &DaemonSeen) -> Vec<Finding> {
    let mut findings = vec![initialized(project, config_found)];
    findings.extend(machine(project, daemon));
    if config_found {
        findings.push(hook(project));
        findings.push(daemon_finding(project, daemon));
    }
    findings
}

fn initialized(project: &Project, config_found: bool) -> Finding {
    let state = project.home.state_path();
    let details = json!({
        "root": project.root,
        "config_found": config_found,
        "state_folder": project.home.dir(),
    });
    if !config_found {
        return Finding::ok(
            Check::Project,
            format!(
                "no {} in {} yet (checked with the defaults)",
                pgtwig_core::CONFIG_FILE,
                project.root.display()
            ),
            details,
        )
        .needs(Status::Fix, "set pgtwig up in this repository".into())
        .with_commands(vec!["pgtwig init".into()]);
    }
    if !state.exists() {
        return Finding::ok(
            Check::Project,
            format!(
                "project \"{}\" has no state in {}",
                project.config.project,
                project.home.dir().display()
            ),
            details,
        )
        .needs(Status::Fix, project.home.missing_state_message());
    }
    Finding::ok(
        Check::Project,
        format!(
            "project \"{}\", state in {}",
            project.config.project,
            project.home.dir().display()
        ),
        details,
    )
}

impl Finding {
    fn with_commands(mut self, commands: Vec<String>) -> Finding {
        self.commands = commands;
        self
    }
}

fn server_binaries() -> Finding {
    match pgtwig_local::pgbin::discover_all() {
        Ok(all) => {
            let newest = &all[0];
            let list: Vec<String> = all
                .iter()
                .map(|i| format!("{} ({})", i.version, i.bindir.display()))
                .collect();
            Finding::ok(
                Check::ServerBinaries,
                format!(
                    "PostgreSQL {} for new branches; found {}",
                    newest.version,
                    list.join(", ")
                ),
                json!({ "installations": all.iter().map(|i| json!({
                    "bindir": i.bindir, "major": i.major, "version": i.version,
                })).collect::<Vec<_>>() }),
            )
        }
        Err(e) => Finding::ok(
            Check::ServerBinaries,
            "no usable PostgreSQL server binaries".into(),
            json!({ "installations": [] }),
        )
        .needs(Status::Fix, e.to_string()),
    }
}

/// The nearest folder of `path` (itself or an ancestor) that exists.
pub(crate) fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.is_dir())
        .unwrap_or(Path::new("/"))
}

fn free_space(project: &Project) -> Finding {
    let folder = existing_ancestor(project.home.dir());
    let free = match pgtwig_local::space::free_space(folder) {
        Ok(f) => f,
        Err(e) => {
            return Finding::ok(
                Check::FreeSpace,
                format!("cannot read the free space of {}: {e}", folder.display()),
                json!({ "folder": folder }),
            )
            .needs(
                Status::Warn,
                "check that the state folder is readable".into(),
            )
        }
    };
    let margin =
        match pgtwig_local::space::margin_in_force(project.config.free_space_margin, free.total) {
            Ok(m) => m,
            Err(e) => {
                return Finding::ok(Check::FreeSpace, e.to_string(), json!({ "folder": folder }))
                    .needs(Status::Fix, "correct the margin setting".into())
            }
        };
    let details = json!({
        "folder": folder,
        "available_bytes": free.available,
        "total_bytes": free.total,
        "margin_bytes": margin.as_ref().map(|m| m.bytes),
    });
    let summary = format!(
        "{} free of {} on the file system of {}",
        human(free.available),
        human(free.total),
        folder.display()
    );
    let Some(margin) = margin else {
        return Finding::ok(
            Check::FreeSpace,
            format!("{summary}; the free-space check is off"),
            details,
        );
    };
    let advice = "free space: `pgtwig gc --history` removes point-in-time history, `pgtwig branch delete NAME` \
                  a branch (`pgtwig branch list` shows what each one owns)";
    if free.available < margin.bytes {
        Finding::ok(
            Check::FreeSpace,
            format!(
                "{summary}, less than the {} pgtwig keeps free ({}): every build is refused",
                human(margin.bytes),
                margin.source
            ),
            details,
        )
        .needs(Status::Fix, advice.into())
    } else if free.available < margin.bytes.saturating_mul(2) {
        Finding::ok(
            Check::FreeSpace,
            format!(
                "{summary}, close to the {} pgtwig keeps free: large builds will be refused",
                human(margin.bytes)
            ),
            details,
        )
        .needs(Status::Warn, advice.into())
    } else {
        Finding::ok(
            Check::FreeSpace,
            format!("{summary} (builds keep {} free)", human(margin.bytes)),
            details,
        )
    }
}

fn hook(project: &Project) -> Finding {
    let wt = match pgtwig_git::Worktree::discover(&project.root) {
        Ok(wt) => wt,
        Err(e) => {
            return Finding::ok(
                Check::Hook,
                format!("cannot open the git repository: {e}"),
                json!({}),
            )
            .needs(
                Status::Fix,
                "run pgtwig inside the repository's work tree".into(),
            )
        }
    };
    let state = match pgtwig_git::hook_state(&wt) {
        Ok(s) => s,
        Err(e) => {
            return Finding::ok(
                Check::Hook,
                format!("cannot read the git hook: {e}"),
                json!({}),
            )
            .needs(
                Status::Fix,
                "check core.hooksPath and the hooks folder".into(),
            )
        }
    };
    let path = state.path.display().to_string();
    match state.kind {
        pgtwig_git::HookKind::Missing => Finding::ok(
            Check::Hook,
            format!("no post-checkout hook at {path}: `git checkout` does not switch database branches"),
            json!({ "path": state.path, "installed": false }),
        )
        .needs(Status::Fix, "install pgtwig's hook".into())
        .with_commands(vec!["pgtwig init".into()]),
        pgtwig_git::HookKind::Foreign => Finding::ok(
            Check::Hook,
            format!("{path} is another program's hook, not pgtwig's: `git checkout` does not switch database branches"),
            json!({ "path": state.path, "installed": false }),
        )
        .needs(
            Status::Fix,
            "`pgtwig init` installs pgtwig's hook and keeps this one, which still runs first".into(),
        )
        .with_commands(vec!["pgtwig init".into()]),
        pgtwig_git::HookKind::Ours {
            program,
            chained,
            executable,
        } => {
            let details = json!({
                "path": state.path, "installed": true, "program": program,
                "chained": chained, "executable": executable,
            });
            if !executable {
                return Finding::ok(Check::Hook, format!("{path} is pgtwig's hook but not executable: git skips it"), details)
                    .needs(Status::Fix, "make it executable".into())
                    .with_commands(vec![format!("chmod +x {}", shell_word(&path))]);
            }
            if let Some(p) = program.as_ref().filter(|p| !p.is_file()) {
                return Finding::ok(
                    Check::Hook,
                    format!("{path} calls {}, which is gone (it falls back to `pgtwig` on PATH)", p.display()),
                    details,
                )
                .needs(Status::Warn, "point the hook at this pgtwig".into())
                .with_commands(vec!["pgtwig init".into()]);
            }
            let chain = match &chained {
                Some(c) => format!("; your previous hook {} still runs first", c.display()),
                None => String::new(),
            };
            Finding::ok(Check::Hook, format!("installed at {path}{chain}"), details)
        }
    }
}

fn daemon_finding(project: &Project, daemon: &DaemonSeen) -> Finding {
    match daemon {
        DaemonSeen::Running {
            pid,
            addresses,
            main_worktree,
        } => {
            let details = json!({
                "running": true, "pid": pid, "addresses": addresses, "main_worktree": main_worktree,
            });
            let follows = match main_worktree {
                Some(w) if same_folder(w, &project.root) => "follows this work tree".to_string(),
                Some(w) => format!(
                    "follows work tree {} (clients here reach this work tree's branch by their working directory)",
                    w.display()
                ),
                None => "follows no work tree".to_string(),
            };
            Finding::ok(
                Check::Daemon,
                format!("running (pid {pid}) on {}; {follows}", addresses.join(" and ")),
                details,
            )
        }
        DaemonSeen::NotRunning => Finding::ok(
            Check::Daemon,
            "not running: the app's DATABASE_URL reaches nothing".into(),
            json!({ "running": false }),
        )
        .needs(Status::Warn, "start the proxy".into())
        .with_commands(vec!["pgtwig up --detach".into()]),
        DaemonSeen::Unreachable(why) => Finding::ok(
            Check::Daemon,
            format!("its control socket does not answer: {why}"),
            json!({ "running": null }),
        )
        .needs(
            Status::Fix,
            "restart it: `pgtwig down`, then `pgtwig up --detach` (daemon.log in the state folder says what happened)".into(),
        ),
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// `s` as one word for sh (quoted only when it must be).
pub(crate) fn shell_word(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@%,".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
