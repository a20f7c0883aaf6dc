//! `pgtwig up / down / use / status`: the daemon and the active branch.

use std::os::unix::process::CommandExt;
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use pgtwig_core::fsutil::ProjectLock;
use pgtwig_core::state::ProjectState;
use pgtwig_core::BranchName;
use pgtwig_daemon::control::{self, ClientError, Request, Response};
use pgtwig_daemon::{Branches, DaemonPaths};
use serde_json::json;

use pgtwig_project::Backend;
use pgtwig_project::Project;

const DETACHED_ENV: &str = "PGTWIG_DETACHED";
use crate::daemon_link::{DaemonOf, CONTROL_TIMEOUT};

#[derive(Args)]
pub struct UpArgs {
    /// Port to listen on (overrides `listen` in .pgtwig.toml; same address).
    #[arg(long)]
    port: Option<u16>,
    /// Address to listen on, e.g. localhost:5432 (127.0.0.1 and ::1), 127.0.0.1:5432 or
    /// 172.17.0.1:5432 for containers (overrides .pgtwig.toml).
    #[arg(long, conflicts_with = "port")]
    listen: Option<pgtwig_core::ListenAddr>,
    /// Run in the background; logs go to the project's daemon.log.
    #[arg(long, short)]
    detach: bool,
}

pub fn up(args: UpArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let mut settings = project.config.proxy.clone();
    if let Some(port) = args.port {
        settings.listen.port = port;
    }
    if let Some(listen) = &args.listen {
        settings.listen = listen.clone();
    }
    let paths = backend.daemon_paths()?;
    let detached = std::env::var_os(DETACHED_ENV).is_some();
    // On the terminal, not only in daemon.log: this is the moment the user decides.
    if let Some(warning) =
        pgtwig_daemon::exposure_warning(&settings.listen, matches!(backend, Backend::Local(_)))
    {
        if !detached {
            eprintln!("pgtwig: warning: {warning}");
        }
    }
    if args.detach {
        return detach(&paths, &args, project.config.project.as_str());
    }
    // The daemon follows the work tree it is started in (git worktrees of
    // one repository share a project).
    let worktree = crate::commands::git::follow_worktree(&project, &backend)?;
    let database = project.config.database();
    let url_hint = match &backend {
        Backend::Local(_) => format!(
            "postgres://postgres@{{listen}}/{database} (other users and containers: `pgtwig url`)"
        ),
        Backend::Neon(_) => format!(
            "postgres://ROLE:PASSWORD@{{listen}}/{database} (your Neon role and its password; \
             the same on every branch)"
        ),
    };
    let branches = match backend {
        Backend::Local(mut b) => {
            // A connection that wakes a stopped branch never waits long behind another
            // command: it gets "pgtwig is busy with …" instead.
            b.set_start_lock_wait(Some(Duration::from_secs(1)));
            Branches::Local(b)
        }
        Backend::Neon(n) => Branches::Neon {
            tls: n.upstream_tls()?,
            connect: n.connect.clone(),
            backend: n.backend,
        },
    };
    pgtwig_daemon::run(
        branches,
        settings,
        project.config.history_retention,
        worktree,
        |status| {
            if !detached {
                // Not println!: whoever started us may have stopped reading
                // stdout, and a daemon must not die of EPIPE.
                use std::io::Write;
                let _ = writeln!(
                    std::io::stdout(),
                    "pgtwig proxy on {} → branch \"{}\" (Ctrl-C to stop)\n  DATABASE_URL={}",
                    status.addresses.join(" and "),
                    status.active,
                    url_hint.replace("{listen}", &status.listen)
                );
            }
        },
    )?;
    Ok(ExitCode::SUCCESS)
}

/// Start `pgtwig up` again in its own session, logging to daemon.log, and
/// return once it answers on its control socket.
fn detach(paths: &DaemonPaths, args: &UpArgs, project: &str) -> Result<ExitCode> {
    if let Some(other) = other_daemon(paths, false) {
        bail!("a pgtwig daemon is already running for project \"{project}\": {other}; stop it with `pgtwig down`");
    }
    // 0600 and no link followed: the log may hold what clients sent.
    let log =
        pgtwig_core::private::open_append(&paths.log).context("cannot open the daemon's log")?;
    let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("up");
    if let Some(p) = args.port {
        cmd.args(["--port", &p.to_string()]);
    }
    if let Some(l) = &args.listen {
        cmd.args(["--listen", &l.to_string()]);
    }
    cmd.env(DETACHED_ENV, "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; it detaches the daemon from the
    // terminal so closing the shell does not stop it.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let mut child = cmd.spawn().context("cannot start the daemon")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            // Lost a race with another `up`: name the winner rather than show its log
            // lines (the log file is shared) as if they were our error.
            if let Some(other) = other_daemon(paths, true) {
                bail!(
                    "another pgtwig daemon started first and is running for project \"{project}\": {other}; \
                     this one exited. Use it as it is, or `pgtwig down` and `pgtwig up` again",
                );
            }
            let text = pgtwig_core::private::read_to_string(&paths.log).unwrap_or_default();
            let tail = text.get(log_start as usize..).unwrap_or("").trim();
            bail!("the daemon exited ({status}):\n{tail}");
        }
        if let Ok(Response::Ok { pid }) =
            control::request(&paths.control, &Request::Ping, CONTROL_TIMEOUT)
        {
            if let Ok(Response::Status(s)) =
                control::request(&paths.control, &Request::Status, CONTROL_TIMEOUT)
            {
                println!(
                    "pgtwig daemon running (pid {pid}) on {} → branch \"{}\"; logs: {}",
                    s.addresses.join(" and "),
                    s.active,
                    paths.log.display()
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if Instant::now() > deadline {
            bail!(
                "the daemon did not come up within 60 s; see {}",
                paths.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The daemon answering on this project's control socket, described: "pid 123, listening
/// on 127.0.0.1:5432 and [::1]:5432, work tree /src/app". After a `lost_race` (our daemon
/// exited), the winner may not answer yet, nor even have written its pid (it does right
/// after taking the daemon lock): it gets 2 s for that, and while that pid is alive up to
/// 5 s to answer; otherwise one question. (No probe of the daemon lock here: holding it even
/// briefly could make a starting daemon lose.)
fn other_daemon(paths: &DaemonPaths, lost_race: bool) -> Option<String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(5);
    loop {
        if let Ok(Response::Status(s)) =
            control::request(&paths.control, &Request::Status, CONTROL_TIMEOUT)
        {
            return Some(format!(
                "pid {}, listening on {}{}",
                s.pid,
                s.addresses.join(" and "),
                s.main_worktree
                    .map(|w| format!(", work tree {w}"))
                    .unwrap_or_default()
            ));
        }
        let recorded_alive = std::fs::read_to_string(&paths.pid)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(|pid| {
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
            });
        let may_be_starting = started.elapsed() < Duration::from_secs(2);
        if !lost_race || !(recorded_alive || may_be_starting) || Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Args)]
pub struct DownArgs {
    /// Leave the branches' servers running (default: stop them too).
    #[arg(long)]
    keep_running: bool,
}

pub fn down(args: DownArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let paths = backend.daemon_paths()?;
    // Neon suspends its computes itself.
    let stop_branches = !args.keep_running && matches!(backend, Backend::Local(_));
    let req = Request::Shutdown { stop_branches };
    match control::request(&paths.control, &req, Duration::from_secs(120)) {
        Ok(_) => {
            // Gone when its lock is free.
            let deadline = Instant::now() + Duration::from_secs(120);
            while ProjectLock::try_acquire(&paths.lock)?.is_none() {
                if Instant::now() > deadline {
                    bail!(
                        "the daemon did not exit within 120 s; see {}",
                        paths.log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            println!("pgtwig daemon stopped");
        }
        Err(ClientError::NotRunning) => {
            println!("pgtwig daemon is not running");
            if let (true, Backend::Local(backend)) = (stop_branches, &backend) {
                for name in backend.names()? {
                    if backend.ready_socket(&name).is_some() {
                        backend.stop(&name)?;
                        println!("Stopped branch \"{name}\"");
                    }
                }
            }
        }
        Err(e) => return Err(e.into()),
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
pub struct UseArgs {
    /// The branch new proxy connections from this work tree should go to.
    branch: BranchName,
    /// The work tree whose branch this sets (default: the one you are in).
    #[arg(long, value_name = "PATH")]
    worktree: Option<std::path::PathBuf>,
}

pub fn use_branch(args: UseArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let worktree = match &args.worktree {
        Some(p) => Some(
            pgtwig_git::Worktree::discover(p)?
                .root()
                .map(std::path::Path::to_path_buf)
                .with_context(|| format!("{} is not a git work tree", p.display()))?,
        ),
        None => current_worktree(),
    };
    let (old, new) = set_active(&project, &backend, &args.branch, worktree.as_deref())?;
    let place = worktree
        .as_ref()
        .map(|w| format!(" for work tree {}", w.display()))
        .unwrap_or_default();
    if old.as_ref() == Some(&new) {
        println!("Branch \"{new}\" is already the active branch{place}");
    } else {
        println!(
            "Active branch{place}: \"{new}\"{}",
            old.map(|o| format!(" (was \"{o}\")")).unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The top of the git work tree the current directory is in, if any.
pub fn current_worktree() -> Option<std::path::PathBuf> {
    let wt = pgtwig_git::Worktree::discover(&std::env::current_dir().ok()?).ok()?;
    wt.root().map(pgtwig_core::fsutil::canonical)
}

/// Makes `branch` work tree `worktree`'s active branch (None: the main one's) and tells a
/// running daemon; returns the work tree's branch before and after.
pub fn set_active(
    project: &Project,
    backend: &Backend,
    branch: &BranchName,
    worktree: Option<&std::path::Path>,
) -> Result<(Option<BranchName>, BranchName)> {
    let changed = pgtwig_project::checkout::record_active(project, backend, branch, worktree)?;
    crate::daemon_link::tell_active_changed(backend, branch)?;
    Ok(changed)
}

#[derive(Args)]
pub struct StatusArgs {
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let paths = backend.daemon_paths()?;
    let active = ProjectState::load(&project.home.state_path()).map(|s| s.active.to_string());
    let daemon = match control::request(&paths.control, &Request::Status, CONTROL_TIMEOUT) {
        Ok(Response::Status(s)) => Some(s),
        Ok(_) | Err(ClientError::NotRunning) => None,
        Err(e) => return Err(e.into()),
    };
    let running: Vec<String> = match &backend {
        Backend::Local(backend) => backend
            .names()?
            .into_iter()
            .filter(|n| backend.ready_socket(n).is_some())
            .map(|n| n.to_string())
            .collect(),
        // Neon's computes that run now (Neon suspends them on its own).
        Backend::Neon(n) => n
            .backend
            .list()?
            .into_iter()
            .filter(|b| b.compute_state() == "active")
            .map(|b| b.branch.name)
            .collect(),
    };
    let (kind, backend_name) = match &backend {
        Backend::Local(_) => ("local", "local".to_string()),
        Backend::Neon(n) => ("neon", format!("neon (project {})", n.backend.project_id())),
    };
    let database = project.database(None)?;
    let checkout = super::status_checkout::of_current(&project, &backend);
    if args.json {
        let out = json!({
            "project": project.config.project,
            "backend": kind,
            "active": active.as_ref().ok(),
            "checkout": checkout.as_ref().ok(),
            "database": database.name,
            "daemon": daemon,
            "running": running,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("Backend: {backend_name}");
    println!("App database: \"{}\" ({})", database.name, database.why);
    match &active {
        Ok(a) => println!("Active branch: {a}"),
        Err(e) => println!("Active branch: unknown ({e})"),
    }
    match &checkout {
        Ok(c) => println!(
            "This work tree{}: \"{}\"; {}",
            c.worktree
                .as_ref()
                .map(|w| format!(" ({w})"))
                .unwrap_or_default(),
            c.branch,
            c.summary
        ),
        Err(e) => println!("This work tree: unknown ({e:#})"),
    }
    match &daemon {
        Some(d) => {
            println!(
                "Proxy: listening on {} (pid {}), on switch: {}, suspend after: {}",
                d.addresses.join(" and "),
                d.pid,
                d.on_switch,
                if d.suspend_timeout_secs == 0 {
                    "never".to_string()
                } else {
                    format!("{} s idle", d.suspend_timeout_secs)
                }
            );
            if let Some(socket) = &d.unix_socket {
                println!("Proxy socket: {socket}");
            }
            if !d.password_required.is_empty() {
                println!("Password needed: {} (`pgtwig url`)", d.password_required);
            }
            if !d.worktrees.is_empty() || d.main_worktree.is_some() {
                println!("Work trees (clients are routed by the one they run in):");
                let count = |path: &str| {
                    d.sessions
                        .iter()
                        .filter(|s| s.worktree.as_deref() == Some(path))
                        .count()
                };
                if let (Some(main), Ok(a)) = (&d.main_worktree, &active) {
                    println!("  {main} → {a} (main; {} session(s))", count(main));
                }
                for w in &d.worktrees {
                    println!(
                        "  {} → {} ({} session(s))",
                        w.path,
                        w.branch,
                        count(&w.path)
                    );
                }
                let elsewhere = d
                    .sessions
                    .iter()
                    .filter(|s| {
                        s.worktree
                            .as_deref()
                            .is_some_and(|w| w.starts_with("main work tree's branch"))
                    })
                    .count();
                if elsewhere > 0 {
                    println!(
                        "  {elsewhere} session(s) from no known work tree, on the main one's branch (see below)"
                    );
                }
            }
        }
        None => println!("Proxy: not running (start it with `pgtwig up`)"),
    }
    if running.is_empty() {
        println!("Running branches: none");
    } else {
        println!("Running branches:");
        for b in &running {
            let sessions: Vec<_> = daemon
                .iter()
                .flat_map(|d| d.sessions.iter())
                .filter(|s| &s.branch == b)
                .collect();
            println!("  {b}: {} session(s) through the proxy", sessions.len());
            for s in sessions {
                println!(
                    "    {} user={} db={} app={}{}{} ({} s){}",
                    s.client,
                    s.user.as_deref().unwrap_or("?"),
                    s.database.as_deref().unwrap_or("?"),
                    s.application_name.as_deref().unwrap_or(""),
                    if s.pinned { " pinned" } else { "" },
                    if s.in_transaction {
                        " in transaction"
                    } else {
                        ""
                    },
                    s.seconds,
                    s.worktree
                        .as_deref()
                        .map(|w| format!(" — {w}"))
                        .unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
