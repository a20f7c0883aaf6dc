//! `pgtwig init`: configuration, state folder, root branch.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use pgtwig_core::names::{self, BranchName};
use pgtwig_core::state::ProjectState;
use pgtwig_core::{Config, CONFIG_FILE};

use crate::project::{git_toplevel, Project};

#[derive(Args)]
pub struct InitArgs {
    /// Project name (default: the repository folder's name).
    #[arg(long)]
    name: Option<BranchName>,
    /// Name of the root branch (default: main).
    #[arg(long)]
    root: Option<BranchName>,
}

pub fn run(args: InitArgs) -> Result<ExitCode> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let Some(top) = git_toplevel(&cwd) else {
        bail!(
            "{} is not inside a git repository; run `git init` first (pgtwig follows git branches)",
            cwd.display()
        );
    };
    let config_path = top.join(CONFIG_FILE);
    let config = if config_path.exists() {
        // Read as every other command does, .pgtwig.local.toml included.
        let (c, _) = Config::discover(&top)?;
        println!("Using existing {}", config_path.display());
        c
    } else {
        let project = match args.name {
            Some(n) => n,
            None => names::from_git(
                &top.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            ),
        };
        let mut c = Config::new(project);
        if let Some(root) = args.root {
            c.root_branch = root;
        }
        std::fs::write(&config_path, c.to_commented_toml())
            .with_context(|| format!("cannot write {}", config_path.display()))?;
        println!("Wrote {} (commit it)", config_path.display());
        c
    };
    let project = Project::at(config, top)?;
    let backend = project.local(true)?;
    let root = &project.config.root_branch;
    if backend.exists(root) {
        backend.get(root)?;
        println!("Root branch \"{root}\" already exists");
    } else {
        let started = std::time::Instant::now();
        let branch = backend.create_root(root, None)?;
        println!(
            "Created root branch \"{root}\" (PostgreSQL {}, {})",
            branch.meta.pg_major,
            crate::output::duration(started.elapsed())
        );
    }
    let state_path = project.home.state_path();
    if !state_path.exists() {
        ProjectState {
            active: root.clone(),
            worktree: Some(project.root.clone()),
        }
        .save(&state_path)
        .with_context(|| format!("cannot write {}", state_path.display()))?;
    }
    let wt = pgtwig_git::Worktree::discover(&project.root)?;
    let exe = std::env::current_exe().context("cannot find the pgtwig executable")?;
    match pgtwig_git::install_hook(&wt, &exe)? {
        pgtwig_git::HookChange::Installed { path, chained } => println!(
            "Installed the git hook {}{}: `git checkout` now switches database branches",
            path.display(),
            if chained {
                " (your existing hook still runs first)"
            } else {
                ""
            }
        ),
        pgtwig_git::HookChange::Updated { path } => {
            println!("Git hook {} is installed", path.display())
        }
        _ => {}
    }
    println!("State lives in {}", project.home.dir().display());
    println!(
        "Connect straight to it: psql \"{}\"",
        backend.url(root, "postgres")?
    );
    if backend.server_user().switch {
        println!(
            "(running as root: PostgreSQL servers run as user `{}`)",
            backend.server_user().name
        );
    }
    Ok(ExitCode::SUCCESS)
}
