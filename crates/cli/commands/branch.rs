//! `pgtwig branch …`: create, list, delete, reset, start, stop, url.

use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Result};
use clap::Subcommand;
use pgtwig_core::BranchName;
use pgtwig_daemon::DaemonPaths;
use pgtwig_local::point_in_time::{format_utc, Target};
use pgtwig_local::recovery::AtReport;
use pgtwig_local::{CloneMethod, CreateReport, LocalBackend};
use pgtwig_neon::PointInTime;
use serde_json::json;

use pgtwig_core::state::ProjectState;

use crate::daemon_link::DaemonOf;
use crate::output;
use pgtwig_project::backend::{Backend, Neon};
use pgtwig_project::in_use::{self, Change};
use pgtwig_project::Project;

#[derive(Subcommand)]
pub enum BranchCommand {
    /// Create a branch: a copy-on-write clone of its parent's current state.
    Create {
        name: BranchName,
        /// The branch to derive from (default: the root branch).
        #[arg(long = "from", value_name = "PARENT")]
        from: Option<BranchName>,
        /// As the parent was then, within history_retention: a time with its zone
        /// (2026-11-28T10:15:00Z, 2026-11-28T10:15:00+01:00), relative (now-10m,
        /// "10 minutes ago") or an LSN (0/3000060).
        #[arg(long, value_name = "TIME|LSN")]
        at: Option<String>,
    },
    /// List branches as their parent tree: git branch, running, sessions, protected/TTL, own and
    /// shared bytes, history (--json: every field).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Delete a branch and its data (never the root; children keep working).
    Delete {
        name: BranchName,
        /// Also when it is a work tree's active branch: that work tree falls back to the
        /// parent its [[map]] rule gives (else the root) and its sessions are ended.
        #[arg(long)]
        force: bool,
    },
    /// Re-derive a branch from its parent's current state, under the same name.
    Reset {
        name: BranchName,
        /// Also when it is a work tree's active branch: its data is replaced under the
        /// running app, whose sessions are ended at their next transaction boundary.
        #[arg(long)]
        force: bool,
        /// Keep the old state as a new branch with this name instead of deleting it.
        #[arg(long, value_name = "NEW")]
        keep_old: Option<BranchName>,
        /// Then run the post_create commands of the [[map]] rule that made it again
        /// (migrations, seeds), if `pgtwig trust` approved them.
        #[arg(long)]
        post_create: bool,
    },
    /// Start a branch's PostgreSQL server.
    Start { name: BranchName },
    /// Take a history base snapshot of a running branch if one is due (run in the background by `start`).
    #[command(hide = true)]
    Snapshot { name: BranchName },
    /// Stop a branch's PostgreSQL server (fast shutdown).
    Stop { name: BranchName },
    /// Print a connection string straight to a branch's server (its Unix socket).
    Url {
        name: BranchName,
        /// Database name in the URL (default: the app's, `database` in .pgtwig.toml).
        #[arg(long)]
        database: Option<String>,
    },
}

pub fn run(cmd: BranchCommand) -> Result<ExitCode> {
    let project = Project::discover()?;
    match project.backend(false)? {
        whole @ Backend::Local(_) => run_local(cmd, &project, &whole),
        whole @ Backend::Neon(_) => run_neon(cmd, &project, &whole),
    }
}

fn run_local(cmd: BranchCommand, project: &Project, whole: &Backend) -> Result<ExitCode> {
    let Backend::Local(backend) = whole else {
        unreachable!("run_local is called with the local backend")
    };
    match cmd {
        BranchCommand::Create { name, from, at } => {
            let parent = from.unwrap_or_else(|| project.config.root_branch.clone());
            project.check_parent(&parent)?;
            let started = Instant::now();
            match at {
                Some(at) => {
                    let target = Target::parse(&at).map_err(anyhow::Error::msg)?;
                    let made = backend.create_at(&name, &parent, &target)?;
                    print_built("Created", &made.report, &parent, started, backend)?;
                    print_reached(&made, &parent);
                }
                None => {
                    let report = backend.create(&name, &parent, None)?;
                    print_built("Created", &report, &parent, started, backend)?;
                }
            }
            project.ensure_app_database(whole, &name, &mut output::Terminal::stdout())?;
        }
        BranchCommand::List { json } => return super::branch_list::list(backend, project, json),
        BranchCommand::Delete { name, force } => {
            delete_guarded(
                project,
                whole,
                &name,
                force,
                &format!("pgtwig branch delete {name}"),
            )?;
        }
        BranchCommand::Reset {
            name,
            force,
            keep_old,
            post_create,
        } => {
            let started = Instant::now();
            let change = Change::Reset {
                parent: backend
                    .get(&name)
                    .ok()
                    .and_then(|b| b.meta.parent)
                    .map(|p| p.to_string()),
            };
            let command = format!("pgtwig branch reset {name}");
            let affected = in_use::check(project, whole, &name, &change, force, &command)?;
            let _drained = drain_sessions(
                &DaemonPaths::for_backend(backend)?,
                backend.exists(&name),
                &name,
                project,
                Some(in_use::drain_message(&name, &change, &affected)),
            )?;
            let report = backend.reset(&name, keep_old.as_ref())?;
            let parent = report
                .branch
                .meta
                .parent
                .clone()
                .expect("a reset branch has a parent");
            print_built("Reset", &report, &parent, started, backend)?;
            after_reset(project, whole, &name, keep_old.as_ref(), post_create)?;
        }
        BranchCommand::Start { name } => {
            let started = Instant::now();
            backend.start(&name)?;
            // History for `branch create --at`: a base snapshot, at most
            // hourly, taken in the background so `start` returns at once.
            spawn_snapshot(&name);
            println!(
                "Branch \"{name}\" is running ({})",
                output::duration(started.elapsed())
            );
        }
        BranchCommand::Snapshot { name } => {
            backend.snapshot_if_due(&name, project.config.history_retention)?;
        }
        BranchCommand::Stop { name } => {
            if backend.stop(&name)? {
                println!("Stopped branch \"{name}\"");
            } else {
                println!("Branch \"{name}\" was not running");
            }
        }
        BranchCommand::Url { name, database } => {
            let database = project.database(database.as_deref())?;
            // stderr: stdout is the URL, for `psql "$(pgtwig branch url x)"`.
            eprintln!("pgtwig: {database}");
            println!("{}", backend.url(&name, &database.name)?)
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn run_neon(cmd: BranchCommand, project: &Project, whole: &Backend) -> Result<ExitCode> {
    let Backend::Neon(neon) = whole else {
        unreachable!("run_neon is called with the Neon backend")
    };
    let neon: &Neon = neon;
    let backend = &neon.backend;
    match cmd {
        BranchCommand::Create { name, from, at } => {
            let parent = from.unwrap_or_else(|| project.config.root_branch.clone());
            project.check_parent(&parent)?;
            let (at, target) = match at {
                Some(text) => {
                    let (at, target) = neon_point_in_time(&text)?;
                    (at, Some(target))
                }
                None => (PointInTime::Head, None),
            };
            let started = Instant::now();
            let made = backend.create(name.as_str(), parent.as_str(), at, None, None)?;
            println!(
                "Created Neon branch \"{name}\" from \"{parent}\"{}{} ({})",
                target
                    .map(|t| format!(" as of {}", t.describe()))
                    .unwrap_or_default(),
                made.endpoint
                    .as_ref()
                    .map(|e| format!(", compute {}", e.host))
                    .unwrap_or_default(),
                output::duration(started.elapsed())
            );
        }
        BranchCommand::List { json } => return list_neon(neon, project, json),
        BranchCommand::Delete { name, force } => {
            delete_guarded(
                project,
                whole,
                &name,
                force,
                &format!("pgtwig branch delete {name}"),
            )?;
        }
        BranchCommand::Reset {
            name,
            force,
            keep_old,
            post_create,
        } => {
            let started = Instant::now();
            let change = Change::Reset {
                parent: backend
                    .list()
                    .ok()
                    .and_then(|all| all.into_iter().find(|b| b.branch.name == name.as_str()))
                    .and_then(|b| b.parent_name),
            };
            let command = format!("pgtwig branch reset {name}");
            let affected = in_use::check(project, whole, &name, &change, force, &command)?;
            let _drained = drain_sessions(
                &DaemonPaths::for_neon(&neon.backend)?,
                true,
                &name,
                project,
                Some(in_use::drain_message(&name, &change, &affected)),
            )?;
            let b = backend.reset(name.as_str(), keep_old.as_ref().map(|k| k.as_str()))?;
            println!(
                "Reset Neon branch \"{name}\" to the current state of \"{}\" ({})",
                b.parent_name.as_deref().unwrap_or("its parent"),
                output::duration(started.elapsed())
            );
            after_reset(project, whole, &name, keep_old.as_ref(), post_create)?;
        }
        BranchCommand::Start { name } => {
            let started = Instant::now();
            let (_, endpoint) = backend.endpoint(name.as_str())?;
            let woke = backend.wake(&endpoint)?;
            println!(
                "Neon compute of branch \"{name}\" is {} ({})",
                if woke { "started" } else { "already running" },
                output::duration(started.elapsed())
            );
        }
        BranchCommand::Snapshot { .. } => {}
        BranchCommand::Stop { name } => {
            bail!(
                "`pgtwig branch stop {name}` works with the local backend only; Neon suspends a compute itself \
                 after its suspend_timeout without connections ([neon] suspend_timeout in .pgtwig.toml)"
            )
        }
        BranchCommand::Url { name, database } => {
            let database = project.database(database.as_deref())?;
            eprintln!("pgtwig: {database}");
            println!("{}", neon.url(&name, &database.name)?)
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What both backends' `branch reset` do once the branch is reset: name the kept previous
/// state, and with `--post-create` run the rule's approved commands again.
fn after_reset(
    project: &Project,
    whole: &Backend,
    name: &BranchName,
    keep_old: Option<&BranchName>,
    post_create: bool,
) -> Result<()> {
    if let Some(k) = keep_old {
        println!("Its previous state is kept as branch \"{k}\"");
    }
    if post_create {
        pgtwig_project::checkout::rerun_post_create(
            project,
            whole,
            name,
            &mut output::Terminal::stdout(),
        )?;
    }
    Ok(())
}

/// `--at` for Neon: a time (sent as RFC 3339 UTC) or an LSN.
fn neon_point_in_time(text: &str) -> Result<(PointInTime, Target)> {
    let target = Target::parse(text).map_err(anyhow::Error::msg)?;
    let at = match &target {
        Target::Time(t) => PointInTime::Timestamp(humantime::format_rfc3339_micros(*t).to_string()),
        Target::Lsn(l) => PointInTime::Lsn(l.to_string()),
    };
    Ok((at, target))
}

/// The point a local point-in-time branch was recovered to.
fn print_reached(made: &AtReport, parent: &BranchName) {
    let r = &made.reached;
    let last = match r.last_commit {
        Some(t) => format!("the last transaction in it committed at {}", format_utc(t)),
        None => format!(
            "no transaction committed between its base ({}) and then",
            format_utc(r.base_end)
        ),
    };
    println!(
        "It holds \"{parent}\" as of {}: WAL replayed up to LSN {}, {last}",
        made.target.describe(),
        r.lsn
    );
}

fn list_neon(neon: &Neon, project: &Project, as_json: bool) -> Result<ExitCode> {
    let branches = neon.backend.list()?;
    if as_json {
        let items: Vec<_> = branches
            .iter()
            .map(|b| {
                json!({
                    "name": b.branch.name,
                    "parent": b.parent_name,
                    "parent_exists": b.branch.parent_id.as_ref().map(|_| b.parent_name.is_some()),
                    "root": b.branch.name == project.config.root_branch.as_str(),
                    "created": b.branch.created_at,
                    "running": b.compute_state() == "active",
                    "compute": b.compute_state(),
                    "host": b.endpoint.as_ref().map(|e| e.host.clone()),
                    "expires": b.branch.expires_at,
                    "git_branch": b.git_branch,
                    "protected": b.protected,
                    "neon_id": b.branch.id,
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&items)?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut rows = vec![vec![
        "BRANCH".to_string(),
        "GIT BRANCH".into(),
        "COMPUTE".into(),
        "KEPT".into(),
        "CREATED".into(),
    ]];
    let family: Vec<(String, Option<String>)> = branches
        .iter()
        .map(|b| (b.branch.name.clone(), b.parent_name.clone()))
        .collect();
    for (i, drawn) in crate::tree::layout(&family, project.config.root_branch.as_str()) {
        let b = &branches[i];
        let mut name = format!("{drawn}{}", b.branch.name);
        if b.branch.name == project.config.root_branch.as_str() {
            name.push_str(" (root)");
        }
        if let (Some(id), None) = (&b.branch.parent_id, &b.parent_name) {
            name.push_str(&format!(" (from {id} (deleted))"));
        }
        let kept = match (b.protected, &b.branch.expires_at) {
            (true, Some(e)) => format!("protected, until {e}"),
            (true, None) => "protected".into(),
            (false, Some(e)) => format!("until {e}"),
            (false, None) => "-".into(),
        };
        rows.push(vec![
            name,
            b.git_branch.clone().unwrap_or_else(|| "-".into()),
            b.compute_state().to_string(),
            kept,
            b.branch.created_at.clone().unwrap_or_default(),
        ]);
    }
    output::table(&rows);
    Ok(ExitCode::SUCCESS)
}

fn spawn_snapshot(name: &BranchName) {
    use std::os::unix::process::CommandExt;
    let Ok(exe) = std::env::current_exe() else {
        return;
    };
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["branch", "snapshot", name.as_str()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0);
    let _ = cmd.spawn();
}

/// Delete `name`, refusing (unless `force`) when it is some work tree's active branch; with
/// `force` those work trees first fall back (see [`in_use`]). `command` reruns it.
pub fn delete_guarded(
    project: &Project,
    backend: &Backend,
    name: &BranchName,
    force: bool,
    command: &str,
) -> Result<()> {
    let exists = backend.exists(name)?;
    let affected = in_use::check(project, backend, name, &Change::Delete, force, command)?;
    in_use::move_away(project, backend, &affected, &|fallback| {
        crate::daemon_link::tell_active_changed(backend, fallback)
    })?;
    let _drained = drain_sessions(
        &backend.daemon_paths()?,
        exists,
        name,
        project,
        Some(in_use::drain_message(name, &Change::Delete, &affected)),
    )?;
    backend.delete(name, &project.config.root_branch)?;
    forget_removed_worktrees(project, backend, name);
    let what = match backend {
        Backend::Local(_) => "branch",
        Backend::Neon(_) => "Neon branch",
    };
    println!("Deleted {what} \"{name}\"");
    for line in in_use::moved_lines(name, &affected) {
        println!("{line}");
    }
    Ok(())
}

/// Delete `name` for `gc` (which never picks a work tree's active branch): with the proxy
/// running its sessions are ended at their transaction boundaries first, saying `reason`,
/// and new ones held off until it is gone — as `branch delete` does.
pub fn delete_collected(
    project: &Project,
    backend: &Backend,
    name: &BranchName,
    reason: &str,
) -> Result<()> {
    let why = format!(
        "pgtwig gc is deleting database branch \"{name}\" ({reason}); reconnect to continue"
    );
    let _drained = drain_sessions(
        &backend.daemon_paths()?,
        backend.exists(name)?,
        name,
        project,
        Some(why),
    )?;
    backend.delete(name, &project.config.root_branch)?;
    Ok(())
}

/// Entries of removed work trees that pointed at the deleted branch route nobody; drop them.
fn forget_removed_worktrees(project: &Project, backend: &Backend, name: &BranchName) {
    let path = project.home.state_path();
    let Ok(_lock) = backend.lock() else { return };
    if let Ok(mut state) = ProjectState::load(&path) {
        let before = state.worktrees.len();
        state.forget_removed_on(name);
        if state.worktrees.len() != before {
            let _ = state.save(&path);
        }
    }
}

/// With the proxy running, end the branch's sessions at their transaction
/// boundaries and hold new ones off while the returned guard lives, so a
/// reset or delete never cuts a transaction short.
pub fn drain_sessions(
    paths: &DaemonPaths,
    exists: bool,
    name: &BranchName,
    project: &Project,
    why: Option<String>,
) -> Result<Option<std::os::unix::net::UnixStream>> {
    if *name == project.config.root_branch || !exists {
        return Ok(None); // refused below with the usual message
    }
    match pgtwig_daemon::control::drain_saying(
        &paths.control,
        name.as_str(),
        why,
        std::time::Duration::from_secs(90),
    ) {
        Ok(stream) => Ok(Some(stream)),
        Err(pgtwig_daemon::control::ClientError::NotRunning) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn print_built(
    verb: &str,
    r: &CreateReport,
    parent: &BranchName,
    started: Instant,
    backend: &LocalBackend,
) -> Result<()> {
    let how = match r.branch.meta.clone_method {
        CloneMethod::CopyOnWrite => "copy-on-write clone",
        _ => "full copy",
    };
    let live = if r.parent_was_running {
        " of the running parent"
    } else {
        ""
    };
    println!(
        "{verb} branch \"{}\" from \"{parent}\": {how}{live}, {} files, {} ({})",
        r.branch.name,
        r.files,
        output::size(r.bytes),
        output::duration(started.elapsed())
    );
    if let Some(reason) = &r.fallback_reason {
        println!(
            "note: the file system under {} cannot clone files copy-on-write ({reason}), so the data was copied in full. \
             Put PGTWIG_HOME on XFS (reflink=1), btrfs or APFS for instant, space-free branches.",
            backend.home().dir().display()
        );
    }
    Ok(())
}
