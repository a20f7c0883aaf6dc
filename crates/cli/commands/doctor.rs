//! `pgtwig doctor [--json]`: prints the checks of `pgtwig_project::doctor`; exit 1 when
//! something needs fixing. Also what `pgtwig init` prints before it makes the root branch.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use pgtwig_core::{names, Config, CONFIG_FILE};
use pgtwig_daemon::control::{self, ClientError, Request, Response};
use pgtwig_daemon::DaemonPaths;
use pgtwig_local::LocalBackend;
use pgtwig_project::doctor::{self, Check, DaemonSeen, Finding, Status};
use pgtwig_project::{git_toplevel, Project};

use crate::daemon_link::{DaemonOf, CONTROL_TIMEOUT};

#[derive(Args)]
pub struct DoctorArgs {
    /// Print the findings as JSON ({"ok": bool, "findings": [...]}).
    #[arg(long)]
    json: bool,
}

pub fn run(args: DoctorArgs) -> Result<ExitCode> {
    let (project, config_found) = project_or_defaults()?;
    let daemon = if config_found {
        match project.backend(false) {
            Ok(backend) => daemon_seen(backend.daemon_paths().ok()),
            Err(_) => DaemonSeen::NotRunning,
        }
    } else {
        DaemonSeen::NotRunning
    };
    let findings = doctor::all(&project, config_found, &daemon);
    let broken = doctor::needs_fixing(&findings);
    if args.json {
        let out = serde_json::json!({ "ok": !broken, "findings": findings });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "pgtwig doctor: project \"{}\" in {}",
            project.config.project,
            project.root.display()
        );
        for f in &findings {
            print_finding(f);
        }
        let fix = findings.iter().filter(|f| f.status == Status::Fix).count();
        let warn = findings.iter().filter(|f| f.status == Status::Warn).count();
        match (fix, warn) {
            (0, 0) => println!("Everything pgtwig needs is in place."),
            (0, w) => println!("pgtwig works; {w} thing(s) could be better (warn above)."),
            (f, _) => println!("{f} thing(s) need fixing (fix above)."),
        }
    }
    Ok(if broken {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

/// The project of the current directory; before `pgtwig init`, the one `init` would make
/// (defaults), and false.
fn project_or_defaults() -> Result<(Project, bool)> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let top = git_toplevel(&cwd);
    let has_config = cwd.ancestors().any(|d| d.join(CONFIG_FILE).is_file());
    match top {
        Some(top) if !has_config => {
            let name = names::from_git(
                &top.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
            Ok((Project::at(Config::new(name), top)?, false))
        }
        None if !has_config => anyhow::bail!(
            "{} is not inside a git repository; run `pgtwig doctor` in the repository you use pgtwig with \
             (`git init` first for a new one)",
            cwd.display()
        ),
        _ => Ok((Project::discover()?, true)),
    }
}

/// What the daemon's control socket says.
fn daemon_seen(paths: Option<DaemonPaths>) -> DaemonSeen {
    let Some(paths) = paths else {
        return DaemonSeen::NotRunning;
    };
    match control::request(&paths.control, &Request::Status, CONTROL_TIMEOUT) {
        Ok(Response::Status(s)) => DaemonSeen::Running {
            pid: s.pid,
            addresses: s.addresses.clone(),
            main_worktree: s.main_worktree.as_ref().map(Into::into),
        },
        Ok(other) => DaemonSeen::Unreachable(format!("unexpected answer {other:?}")),
        Err(ClientError::NotRunning) => DaemonSeen::NotRunning,
        Err(e) => DaemonSeen::Unreachable(e.to_string()),
    }
}

fn print_finding(f: &Finding) {
    let tag = match f.status {
        Status::Ok => "ok  ",
        Status::Warn => "warn",
        Status::Fix => "fix ",
    };
    println!("  {tag}  {:<16} {}", f.check.label(), f.summary);
    print_advice(f, "                          ");
}

fn print_advice(f: &Finding, indent: &str) {
    if let Some(fix) = &f.fix {
        println!("{indent}→ {fix}");
    }
    for c in &f.commands {
        println!("{indent}    {c}");
    }
}

/// `pgtwig init`'s checks, before the root branch: the copy-on-write verdict always, the rest
/// only when they need something.
pub fn print_for_init(project: &Project, backend: &LocalBackend) {
    let daemon = daemon_seen(DaemonPaths::for_backend(backend).ok());
    for f in doctor::machine(project, &daemon) {
        if f.check == Check::CopyOnWrite {
            println!("Copy-on-write: {}", f.summary);
            print_advice(&f, "  ");
        } else if f.status != Status::Ok {
            let tag = if f.status == Status::Fix {
                "needs fixing"
            } else {
                "note"
            };
            println!("{} ({tag}): {}", capitalized(f.check.label()), f.summary);
            print_advice(&f, "  ");
        }
    }
}

fn capitalized(s: &str) -> String {
    let mut c = s.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => String::new(),
    }
}
