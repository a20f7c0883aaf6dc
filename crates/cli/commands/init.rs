//! `pgtwig init`: configuration, state folder, root branch.

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use pgtwig_core::names::{self, BranchName};
use pgtwig_core::state::ProjectState;
use pgtwig_core::{Config, CONFIG_FILE};

use crate::commands::trust;
use pgtwig_project::backend::{Backend, Neon};
use pgtwig_project::{git_toplevel, Project};

#[derive(Args)]
pub struct InitArgs {
    /// Project name (default: the repository folder's name).
    #[arg(long)]
    name: Option<BranchName>,
    /// Name of the root branch (default: main, or the Neon project's default branch).
    #[arg(long)]
    root: Option<BranchName>,
    /// The app's database, made in the root branch (default: postgres; on Neon, neondb).
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Keep the branches in this Neon project (backend = "neon") instead of on this machine.
    #[arg(long, value_name = "PROJECT_ID")]
    neon_project: Option<String>,
    /// Neon's API (only for a regional or test API).
    #[arg(long, value_name = "URL", requires = "neon_project", hide = true)]
    neon_api_url: Option<String>,
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
    let adopted = config_path.exists();
    let config =
        if adopted {
            // Read as every other command does, .pgtwig.local.toml included.
            let (c, _) = Config::discover(&top)?;
            println!("Using existing {}", config_path.display());
            if let Some(wanted) = &args.database {
                if c.database.as_deref() != Some(wanted.as_str()) {
                    bail!(
                    "--database {wanted}: the existing {} says the app's database is \"{}\"{}; \
                     set `database = \"{wanted}\"` in it (and commit it) instead",
                    config_path.display(),
                    c.database(),
                    if c.database.is_none() { " (by default)" } else { "" }
                );
                }
            }
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
            if let Some(d) = &args.database {
                pgtwig_core::config::check_database_name(d)
                    .map_err(|e| anyhow::anyhow!("--database: {e}"))?;
                c.database = Some(d.clone());
            }
            if let Some(id) = &args.neon_project {
                c.backend = pgtwig_core::BackendKind::Neon;
                let mut neon = pgtwig_core::config::NeonConfig::new(id.clone());
                if let Some(url) = &args.neon_api_url {
                    pgtwig_core::config::check_neon_api_url(url)
                        .map_err(|e| anyhow::anyhow!("--neon-api-url: {e}"))?;
                    neon.api_url = url.clone();
                }
                c.neon = Some(neon);
                // The user typed --neon-api-url: approved before it is first used.
                trust::approve_written(&Project::at(c.clone(), top.clone())?)?;
                c.root_branch = match args.root.clone() {
                    Some(r) => r,
                    None => neon_default_branch(&c, &top)?,
                };
            }
            if let Some(root) = args.root {
                c.root_branch = root;
            }
            std::fs::write(&config_path, c.to_commented_toml())
                .with_context(|| format!("cannot write {}", config_path.display()))?;
            println!("Wrote {} (commit it)", config_path.display());
            c
        };
    let project = Project::at(config, top)?;
    if adopted {
        // Someone else's file (a clone, a pull request): its commands wait for `pgtwig trust`.
        trust::report_unapproved(&project)?;
    } else {
        trust::approve_written(&project)?;
    }
    let backend = match project.backend(true)? {
        Backend::Local(b) => b,
        Backend::Neon(n) => return init_neon(&project, &n),
    };
    // Before the first branch: whether it will be a clone or a full copy, and what to do.
    crate::commands::doctor::print_for_init(&project, &backend);
    let root = &project.config.root_branch;
    let database = project.config.database();
    if backend.exists(root) {
        backend.get(root)?;
        println!("Root branch \"{root}\" already exists");
        // Every branch has the app's database: a root made before the config named it gets it now.
        if backend.ensure_database(root, database)? {
            println!("Created database \"{database}\" (the app's) in root branch \"{root}\"");
        }
    } else {
        let started = std::time::Instant::now();
        let branch = backend.create_root(root, None, database)?;
        println!(
            "Created root branch \"{root}\" with database \"{database}\" (PostgreSQL {}, {})",
            branch.meta.pg_major,
            crate::output::duration(started.elapsed())
        );
    }
    write_state_and_hook(&project)?;
    println!("State lives in {}", project.home.dir().display());
    // Commands that work as printed: the branch may be stopped, and no proxy runs yet.
    println!("Connect: `pgtwig run -- psql` (starts the branch if it is stopped)");
    println!(
        "The app's DATABASE_URL, once `pgtwig up --detach` runs: postgres://postgres@{}/{database} \
         (`pgtwig env` prints it for .env files)",
        project.config.proxy.listen
    );
    if backend.server_user().switch {
        println!(
            "(running as root: PostgreSQL servers run as user `{}`)",
            backend.server_user().name
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// The Neon project's default branch, as the root of a new config.
fn neon_default_branch(config: &Config, top: &std::path::Path) -> Result<BranchName> {
    let project = Project::at(config.clone(), top.to_path_buf())?;
    let Backend::Neon(n) = project.backend(true)? else {
        unreachable!("a Neon config")
    };
    let branches = n.backend.client().list_branches(n.backend.project_id())?;
    let default = branches
        .iter()
        .find(|b| b.is_default())
        .or_else(|| branches.iter().find(|b| b.parent_id.is_none()))
        .context("the Neon project has no branches; create one in the Neon console")?;
    BranchName::parse(&default.name).with_context(|| {
        format!(
            "the Neon project's default branch \"{}\" is not a name pgtwig can use; pass --root with another branch",
            default.name
        )
    })
}

fn init_neon(project: &Project, neon: &Neon) -> Result<ExitCode> {
    let root = &project.config.root_branch;
    match neon.backend.find(root.as_str())? {
        Some(_) => println!(
            "Neon project {}: root branch \"{root}\"",
            neon.backend.project_id()
        ),
        None => {
            let names: Vec<String> = neon
                .backend
                .client()
                .list_branches(neon.backend.project_id())?
                .into_iter()
                .map(|b| b.name)
                .collect();
            bail!(
                "Neon project {} has no branch \"{root}\" (it has: {}); set root_branch in {} to one of them",
                neon.backend.project_id(),
                names.join(", "),
                project.root.join(CONFIG_FILE).display()
            );
        }
    }
    write_state_and_hook(project)?;
    println!("State lives in {}", project.home.dir().display());
    println!(
        "Start the proxy with `pgtwig up`; connect with your Neon role: postgres://ROLE:PASSWORD@{}/{}",
        project.config.proxy.listen, neon.database
    );
    Ok(ExitCode::SUCCESS)
}

fn write_state_and_hook(project: &Project) -> Result<()> {
    let root = &project.config.root_branch;
    let state_path = project.home.state_path();
    if !state_path.exists() {
        ProjectState {
            active: root.clone(),
            worktree: Some(project.root.clone()),
            worktrees: Default::default(),
        }
        .save(&state_path)
        .with_context(|| format!("cannot write {}", state_path.display()))?;
    }
    let local = pgtwig_core::config::LOCAL_CONFIG_FILE;
    match pgtwig_git::ensure_ignored(&project.root, local) {
        Ok(true) => {
            println!("Added {local} to .gitignore (your own overrides stay out of commits)")
        }
        Ok(false) => {}
        Err(e) => eprintln!("warning: cannot add {local} to .gitignore: {e}; add it yourself"),
    }
    let wt = pgtwig_git::Worktree::discover(&project.root)?;
    // Commands run without PGTWIG_HOME (another shell, an IDE, cron) find this state.
    wt.record_home(project.home.state_root())?;
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
    Ok(())
}
