//! Git integration: the post-checkout hook's command, `uninstall`,
//! per-pull-request branches (`pr open/close`) and `gc`.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Subcommand;
use pgtwig_core::state::ProjectState;
use pgtwig_core::BranchName;
use pgtwig_git::{HookChange, Worktree};
use pgtwig_project::{Backend, Project};

use crate::daemon_link::DaemonOf;
use crate::output;

#[derive(Subcommand)]
pub enum HookCommand {
    /// Called by git's post-checkout hook: switch to (or create) the branch's database.
    PostCheckout {
        #[arg(default_value = "0")]
        previous: String,
        #[arg(default_value = "0")]
        new: String,
        /// 1 for a branch checkout, 0 for a file checkout.
        #[arg(default_value = "1")]
        branch_flag: String,
    },
}

/// The hook never fails a checkout: any error is one line on stderr.
pub fn hook(cmd: HookCommand) -> Result<ExitCode> {
    let HookCommand::PostCheckout { branch_flag, .. } = cmd;
    if branch_flag != "1" {
        return Ok(ExitCode::SUCCESS);
    }
    if let Err(e) = follow_checkout() {
        if let Some(pgtwig_local::Error::Busy { holder }) = e.downcast_ref::<pgtwig_local::Error>()
        {
            // Never hold a checkout up behind a long command: say what was skipped and let a
            // process of its own (and the daemon's HEAD watcher) finish the switch.
            let finisher = finish_in_background();
            eprintln!(
                "pgtwig: busy with {holder}; the database branch will follow this checkout when it \
                 is done{}",
                match finisher {
                    Ok(()) => " (in the background)".to_string(),
                    Err(e) => format!(
                        " — run `pgtwig hook post-checkout` here then, or let the daemon's HEAD \
                         watcher do it (cannot wait in the background: {e})"
                    ),
                }
            );
        } else {
            eprintln!("pgtwig: {}", one_line(&format!("{e:#}")));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// How long the git hook waits for the project lock before it leaves the switch to
/// [`finish_in_background`].
const HOOK_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Set for the hook's background run, which may wait for the project lock as long as it
/// takes.
const HOOK_WAITS_ENV: &str = "PGTWIG_HOOK_WAITS";

/// Run this hook again, detached, waiting for the lock as long as it takes; its output goes
/// to the daemon's log.
fn finish_in_background() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["hook", "post-checkout", "0", "0", "1"])
        .env(HOOK_WAITS_ENV, "1")
        .stdin(std::process::Stdio::null())
        .process_group(0);
    let log = Project::discover()
        .and_then(|p| p.backend(false))
        .and_then(|b| b.daemon_paths())
        .ok()
        .and_then(|paths| pgtwig_core::private::open_append(&paths.log).ok());
    match log {
        Some(log) => {
            cmd.stdout(log.try_clone()?).stderr(log);
        }
        None => {
            cmd.stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null());
        }
    }
    cmd.spawn()?;
    Ok(())
}

/// A multi-line error (toml's come with a source snippet) as one line:
/// its first line and its last, which says what is wrong.
fn one_line(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    match lines.as_slice() {
        [] => String::new(),
        [only] => only.to_string(),
        [first, .., last] => format!("{first}: {last}"),
    }
}

/// Make the database follow the checked-out git branch of this work tree.
fn follow_checkout() -> Result<()> {
    let project = Project::discover()?;
    let mut backend = project.backend(false)?;
    if let Backend::Local(b) = &mut backend {
        if std::env::var_os(HOOK_WAITS_ENV).is_none() {
            b.set_lock_wait(Some(HOOK_LOCK_WAIT));
        }
    }
    let cwd = std::env::current_dir()?;
    let outcome = pgtwig_project::checkout::follow(
        &project,
        &backend,
        &cwd,
        &mut output::Terminal::stdout(),
    )?;
    if let pgtwig_project::checkout::Outcome::Active { branch, .. } = &outcome {
        if outcome.changed() {
            crate::daemon_link::tell_active_changed(&backend, branch)?;
        }
    }
    Ok(())
}

/// Record the work tree the daemon follows (the main one); returns it and its repository.
pub fn follow_worktree(
    project: &Project,
    backend: &Backend,
) -> Result<Option<pgtwig_daemon::FollowedWorktree>> {
    let Ok(wt) = Worktree::discover(&std::env::current_dir()?) else {
        return Ok(None);
    };
    let Some(root) = wt.root().map(Path::to_path_buf) else {
        return Ok(None);
    };
    let path = project.home.state_path();
    let _lock = backend.lock()?;
    let mut state = ProjectState::load(&path).map_err(anyhow::Error::msg)?;
    if state.worktree.as_deref() != Some(root.as_path()) {
        state.worktree = Some(root.clone());
        state.save(&path)?;
    }
    Ok(Some(pgtwig_daemon::FollowedWorktree {
        root,
        head_file: wt.head_file(),
        common_dir: wt.common_dir().to_path_buf(),
    }))
}

pub fn uninstall() -> Result<ExitCode> {
    let wt = Worktree::discover(&std::env::current_dir()?)?;
    match pgtwig_git::uninstall_hook(&wt)? {
        HookChange::Removed { path, restored } => println!(
            "Removed the pgtwig hook {}{}",
            path.display(),
            if restored {
                " and restored the hook that was there before"
            } else {
                ""
            }
        ),
        _ => println!("No pgtwig hook is installed"),
    }
    println!("Branches and their data are untouched; `pgtwig init` installs the hook again.");
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum PrCommand {
    /// Create branch pr-NUMBER (once) and print its connection string.
    Open {
        number: u64,
        /// Parent branch (default: "staging" if it exists, else the root).
        #[arg(long = "from", value_name = "PARENT")]
        from: Option<BranchName>,
        /// Delete it with `pgtwig gc` after this long (e.g. 7d, 12h).
        #[arg(long)]
        ttl: Option<String>,
        /// Database name in the printed URL (default: the app's, `database` in .pgtwig.toml).
        #[arg(long)]
        database: Option<String>,
    },
    /// Delete branch pr-NUMBER (if it exists).
    Close {
        number: u64,
        /// Also when it is a work tree's active branch (that work tree falls back to its
        /// rule's parent, else the root).
        #[arg(long)]
        force: bool,
    },
}

pub fn pr(cmd: PrCommand) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    match cmd {
        PrCommand::Open {
            number,
            from,
            ttl,
            database,
        } => {
            let name = BranchName::parse(&format!("pr-{number}"))?;
            let expires = match ttl {
                Some(t) => {
                    let d = humantime::parse_duration(&t).with_context(|| {
                        format!("invalid --ttl \"{t}\"; write e.g. 7d, 36h or 90m")
                    })?;
                    Some(humantime::format_rfc3339_seconds(SystemTime::now() + d).to_string())
                }
                None => None,
            };
            if backend.exists(&name)? {
                eprintln!("Branch \"{name}\" is already open");
            } else {
                let staging = BranchName::parse("staging")?;
                let parent = match from {
                    Some(p) => p,
                    None if backend.exists(&staging)? => staging,
                    None => project.config.root_branch.clone(),
                };
                project.check_parent(&parent)?;
                let started = Instant::now();
                let how = backend.create(&name, &parent, None, expires)?;
                eprintln!(
                    "Created branch \"{name}\" from \"{parent}\" ({how}, {})",
                    output::duration(started.elapsed())
                );
                // stderr too: stdout is the URL.
                project.ensure_app_database(&backend, &name, &mut output::Terminal::stderr())?;
            }
            let database = project.database(database.as_deref())?;
            // stderr: stdout is the URL.
            eprintln!("pgtwig: {database}");
            let url = backend.url(&name, &database.name)?;
            if let Some(out) = std::env::var_os("GITHUB_OUTPUT").filter(|o| !o.is_empty()) {
                use std::io::Write;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&out)
                    .with_context(|| {
                        format!(
                            "cannot write GITHUB_OUTPUT {}",
                            PathBuf::from(&out).display()
                        )
                    })?;
                writeln!(f, "database_url={url}\nbranch={name}")?;
            }
            println!("{url}");
        }
        PrCommand::Close { number, force } => {
            let name = BranchName::parse(&format!("pr-{number}"))?;
            if backend.exists(&name)? {
                // As `branch delete`: refused for a work tree's active branch unless forced;
                // sessions end at a transaction boundary first.
                crate::commands::branch::delete_guarded(
                    &project,
                    &backend,
                    &name,
                    force,
                    &format!("pgtwig pr close {number}"),
                )?;
            } else {
                println!("Branch \"{name}\" is already closed");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub fn gc(dry_run: bool) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let plan = pgtwig_project::gc::plan(&project, &backend)?;
    for k in &plan.keep {
        println!("keep   {} ({}, but {})", k.name, k.reason, k.kept_because);
    }
    if plan.delete.is_empty() {
        println!("Nothing to collect");
    }
    if !dry_run
        && !plan.removed_worktrees.is_empty()
        && pgtwig_project::gc::forget_removed_worktrees(&project, &backend)?
    {
        let control = backend.daemon_paths()?.control;
        let _ = pgtwig_daemon::control::request(
            &control,
            &pgtwig_daemon::control::Request::ActiveChanged,
            crate::daemon_link::CONTROL_TIMEOUT,
        );
    }
    for d in plan.delete {
        if dry_run {
            println!("would delete {} ({})", d.name, d.reason);
        } else {
            super::branch::delete_collected(&project, &backend, &d.name, &d.reason)?;
            println!("deleted {} ({})", d.name, d.reason);
        }
    }
    Ok(ExitCode::SUCCESS)
}
