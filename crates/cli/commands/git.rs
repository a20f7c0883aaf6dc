//! Git integration: the post-checkout hook's command, `uninstall`,
//! per-pull-request branches (`pr open/close`) and `gc`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Instant, SystemTime};

use anyhow::{Context, Result};
use clap::Subcommand;
use pgtwig_core::rules::{self, CreatePolicy};
use pgtwig_core::state::ProjectState;
use pgtwig_core::BranchName;
use pgtwig_git::{Head, HookChange, Worktree};
use pgtwig_local::LocalBackend;

use crate::backend::{already_exists, Backend};
use crate::commands::daemon::set_active;
use crate::output;
use crate::project::Project;

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

/// Run this hook again, detached, waiting for the lock as long as it takes; its output goes
/// to the daemon's log.
fn finish_in_background() -> Result<()> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["hook", "post-checkout", "0", "0", "1"])
        .env(pgtwig_daemon::head_watch::HOOK_WAITS_ENV, "1")
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

pub(crate) fn user_name() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .ok()
        .filter(|u| !u.is_empty())
        .or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
                .map(|u| u.name)
        })
        .unwrap_or_else(|| "dev".into())
}

/// Make the database follow the checked-out git branch.
fn follow_checkout() -> Result<()> {
    let project = Project::discover()?;
    let mut backend = project.backend(false)?;
    if let Backend::Local(b) = &mut backend {
        if std::env::var_os(pgtwig_daemon::head_watch::HOOK_WAITS_ENV).is_none() {
            b.set_lock_wait(Some(HOOK_LOCK_WAIT));
        }
    }
    let cwd = std::env::current_dir()?;
    let wt = Worktree::discover(&cwd)?;
    let Head::Branch(git) = wt.head()? else {
        // Detached HEAD (rebase, bisect): keep the current database branch.
        return Ok(());
    };
    let state = project.load_state()?;
    let holders = Holders::of(&backend)?;
    let Some(target) = rules::resolve(
        &project.config.map,
        &git,
        &user_name(),
        &project.config.root_branch,
        |name| holders.holder(name),
    ) else {
        println!(
            "pgtwig: no [[map]] rule matches git branch \"{git}\"; staying on database branch \"{}\"",
            state.active
        );
        return Ok(());
    };
    if holders.holder(&target.branch).is_none() {
        if target.create == CreatePolicy::Never {
            println!(
                "pgtwig: database branch \"{}\" does not exist (create = \"never\" for git branch \"{git}\"); \
                 staying on \"{}\"",
                target.branch, state.active
            );
            return Ok(());
        }
        project.check_parent(&target.parent)?;
        let started = Instant::now();
        let made = match backend.create_recorded(
            &target.branch,
            &target.parent,
            Some(git.clone()),
            None,
            target.protected,
        ) {
            Ok(how) => Some(how),
            // Made meanwhile by another pgtwig (the daemon following HEAD).
            Err(e) if already_exists(&e) => None,
            Err(e) => return Err(e),
        };
        if let Some(how) = made {
            println!(
                "pgtwig: created database branch \"{}\" from \"{}\" for git branch \"{git}\" ({how}, {})",
                target.branch,
                target.parent,
                output::duration(started.elapsed())
            );
            run_post_create(&project, &backend, &target);
        }
    }
    // Each work tree has its own active branch: clients running in it are routed there.
    let root = wt.root().map(pgtwig_core::fsutil::canonical);
    let main = root.as_deref().is_none_or(|r| state.is_main_worktree(r));
    let (old, new) = set_active(&project, &backend, &target.branch, root.as_deref())?;
    if old.as_ref() != Some(&new) {
        if main {
            println!("pgtwig: database branch \"{new}\"");
        } else {
            println!(
                "pgtwig: database branch \"{new}\" for work tree {}",
                root.as_deref()
                    .map(|r| r.display().to_string())
                    .unwrap_or_default()
            );
        }
    }
    Ok(())
}

/// Which database branches exist and the git branch each was made for, for
/// collision-free git mapping (one listing, not a lookup per name).
enum Holders<'a> {
    Local(&'a LocalBackend),
    Listed(HashMap<String, Option<String>>),
}

impl<'a> Holders<'a> {
    fn of(backend: &'a Backend) -> Result<Holders<'a>> {
        Ok(match backend {
            Backend::Local(b) => Holders::Local(b),
            Backend::Neon(n) => Holders::Listed(
                n.backend
                    .list()?
                    .into_iter()
                    .map(|b| (b.branch.name, b.git_branch))
                    .collect(),
            ),
        })
    }

    /// `None`: no such branch; `Some(git)`: it exists, made for `git`.
    fn holder(&self, name: &BranchName) -> Option<Option<String>> {
        match self {
            Holders::Local(backend) => {
                if !backend.exists(name) {
                    return None;
                }
                Some(backend.get(name).ok().and_then(|b| b.meta.git_branch))
            }
            Holders::Listed(map) => map.get(name.as_str()).cloned(),
        }
    }
}

/// Run `post_create` commands with DATABASE_URL straight at the new branch,
/// if `pgtwig trust` approved this exact list (they come with the
/// repository, so with every pull request). A failure is reported; the
/// branch stays.
fn run_post_create(project: &Project, backend: &Backend, target: &rules::Target) {
    let (branch, commands) = (&target.branch, &target.post_create);
    if commands.is_empty()
        || !crate::commands::trust::may_run(project, branch, target.source.file_name(), commands)
    {
        return;
    }
    let database = project.config.database();
    let url = match post_create_url(backend, branch, database) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("pgtwig: cannot run post_create for \"{branch}\": {e:#}");
            return;
        }
    };
    for cmd in commands {
        println!("pgtwig: post_create (database \"{database}\"): {cmd}");
        let status = Command::new("sh")
            .args(["-c", cmd])
            .current_dir(&project.root)
            .env("DATABASE_URL", &url)
            .env("PGTWIG_BRANCH", branch.as_str())
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => {
                eprintln!("pgtwig: post_create command `{cmd}` failed ({s}); branch \"{branch}\" was kept");
                return;
            }
            Err(e) => {
                eprintln!("pgtwig: cannot run post_create command `{cmd}`: {e}; branch \"{branch}\" was kept");
                return;
            }
        }
    }
}

/// DATABASE_URL for post_create: the app's database on the new branch,
/// made there first when the branch's parent predates `database` in
/// .pgtwig.toml (migrations must not run into a database that is not there).
fn post_create_url(backend: &Backend, branch: &BranchName, database: &str) -> Result<String> {
    if let Backend::Local(b) = backend {
        if b.ensure_database(branch, database)? {
            println!(
                "pgtwig: created database \"{database}\" on \"{branch}\" (the app's, from .pgtwig.toml; its parent has none)"
            );
        }
    }
    backend.url(branch, database)
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

/// What `gc` needs to know of a branch, on either backend.
struct GcCandidate {
    name: String,
    git_branch: Option<String>,
    expires: Option<String>,
    /// Recorded when it was made by a `protected = true` rule.
    protected: bool,
}

fn gc_candidates(backend: &Backend) -> Result<Vec<GcCandidate>> {
    Ok(match backend {
        Backend::Local(b) => b
            .list()?
            .into_iter()
            .filter_map(|b| {
                let meta = b.meta?;
                Some(GcCandidate {
                    name: b.name.to_string(),
                    git_branch: meta.git_branch,
                    expires: meta.expires,
                    protected: meta.protected,
                })
            })
            .collect(),
        Backend::Neon(n) => n
            .backend
            .list()?
            .into_iter()
            .map(|b| GcCandidate {
                name: b.branch.name,
                git_branch: b.git_branch,
                expires: b.branch.expires_at,
                protected: b.protected,
            })
            .collect(),
    })
}

pub fn gc(dry_run: bool) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let git_branches = Worktree::discover(&project.root)
        .and_then(|wt| wt.local_branches())
        .ok();
    let protected = rules::protected_names(&project.config.map);
    let state = ProjectState::load(&project.home.state_path()).ok();
    // Branches of work trees that were removed (`git worktree remove`) are candidates too.
    let removed = state
        .as_ref()
        .map(|s| s.removed_worktrees())
        .unwrap_or_default();
    let now = SystemTime::now();
    let mut doomed = Vec::new();
    for b in gc_candidates(&backend)? {
        // Names pgtwig could not have made (Neon branches made elsewhere) are not its to collect.
        let Ok(name) = BranchName::parse(&b.name) else {
            continue;
        };
        if name == project.config.root_branch || protected.contains(&name) {
            continue;
        }
        // A branch made by a rule with `protected = true` and a template
        // (e.g. "dev-{user}") is protected too.
        let by_protected_rule = b.git_branch.as_deref().is_some_and(|g| {
            rules::resolve(
                &project.config.map,
                g,
                &user_name(),
                &project.config.root_branch,
                |_| None,
            )
            .is_some_and(|t| t.protected && t.branch == name)
        });
        if by_protected_rule {
            continue;
        }
        let expired = b
            .expires
            .as_deref()
            .and_then(|e| humantime::parse_rfc3339_weak(e).ok())
            .is_some_and(|t| t < now);
        let git_gone = match (&b.git_branch, &git_branches) {
            (Some(g), Some(list)) => !list.contains(g),
            _ => false,
        };
        let of_removed = removed
            .iter()
            .find(|(_, branch)| *branch == name)
            .map(|(dir, _)| dir);
        let reason = if expired {
            format!("expired at {}", b.expires.unwrap_or_default())
        } else if git_gone {
            format!(
                "git branch \"{}\" no longer exists",
                b.git_branch.unwrap_or_default()
            )
        } else if let Some(dir) = of_removed {
            format!("its work tree {} was removed", dir.display())
        } else {
            continue;
        };
        // The record of how it was made wins over the configuration checked out now (an
        // older commit may not have the rule that protects it).
        if b.protected {
            println!("keep   {name} ({reason}, but a protected = true rule made it)");
            continue;
        }
        if let Some(on) = state.as_ref().map(|s| s.worktrees_on(&name)) {
            if let Some(first) = on.first() {
                println!("keep   {name} ({reason}, but it is the active branch of {first})");
                continue;
            }
        }
        doomed.push((name, reason));
    }
    if doomed.is_empty() {
        println!("Nothing to collect");
    }
    if !dry_run && !removed.is_empty() {
        forget_removed_worktrees(&project, &backend)?;
    }
    for (name, reason) in doomed {
        if dry_run {
            println!("would delete {name} ({reason})");
        } else {
            super::branch::delete_collected(&project, &backend, &name, &reason)?;
            println!("deleted {name} ({reason})");
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Drops the state.json entries of removed work trees and tells a running daemon.
fn forget_removed_worktrees(project: &Project, backend: &Backend) -> Result<()> {
    let path = project.home.state_path();
    let changed = {
        let _lock = backend.lock()?;
        let mut state = ProjectState::load(&path).map_err(anyhow::Error::msg)?;
        let changed = state.forget_removed();
        if changed {
            state.save(&path)?;
        }
        changed
    };
    if changed {
        let control = backend.daemon_paths()?.control;
        let _ = pgtwig_daemon::control::request(
            &control,
            &pgtwig_daemon::control::Request::ActiveChanged,
            std::time::Duration::from_secs(10),
        );
    }
    Ok(())
}
