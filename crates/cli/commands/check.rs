//! `pgtwig check -- COMMAND...`: run a migration against a throwaway clone and judge it
//! (see `pgtwig_check`). Exit 0 clean, 1 when a rule fails, 2 on error.

use std::ffi::OsString;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use pgtwig_core::BranchName;
use pgtwig_project::{Backend, Project};

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Human,
    Json,
    Markdown,
}

#[derive(Args)]
pub struct CheckArgs {
    /// The branch to clone (default: this work tree's active branch). It is never written.
    #[arg(long)]
    branch: Option<BranchName>,
    /// Keep the clone afterwards as this branch.
    #[arg(long, value_name = "NAME")]
    keep: Option<BranchName>,
    /// The database the command migrates (default: the app's, `database` in .pgtwig.toml).
    #[arg(long)]
    database: Option<String>,
    /// Print the report as JSON (same as --format json).
    #[arg(long)]
    json: bool,
    /// human (default), json, or markdown (GitHub-flavoured, for a pull request comment).
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// The migration command, after `--`, e.g. `-- ./manage.py migrate`.
    #[arg(last = true, required = true, value_name = "COMMAND")]
    command: Vec<OsString>,
}

pub fn run(args: CheckArgs) -> Result<ExitCode> {
    let format = match (args.json, args.format) {
        (true, Some(f)) if f != Format::Json => bail!(
            "--json and --format {} contradict each other; give one",
            match f {
                Format::Human => "human",
                _ => "markdown",
            }
        ),
        (true, _) => Format::Json,
        (false, f) => f.unwrap_or(Format::Human),
    };
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let local = match &backend {
        Backend::Local(b) => b,
        Backend::Neon(_) => bail!(
            "pgtwig check works with the local backend only: {}",
            pgtwig_check::NEON_UNSUPPORTED
        ),
    };
    let branch = match args.branch {
        Some(b) => b,
        None => {
            let state = project.load_state()?;
            let worktree = super::daemon::current_worktree();
            state.branch_of(worktree.as_deref()).clone()
        }
    };
    let database = project.database(args.database.as_deref())?;
    eprintln!("pgtwig check: running the command on a clone of \"{branch}\", {database}");
    let request = pgtwig_check::CheckRequest {
        branch,
        database: database.name,
        command: args.command,
        dir: std::env::current_dir().context("cannot read the current directory")?,
        keep: args.keep,
        config: project.config.check.clone(),
    };
    let report = pgtwig_check::check(local, &request).map_err(anyhow::Error::msg)?;
    match format {
        Format::Human => print!("{}", pgtwig_check::render::human(&report)),
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Markdown => print!("{}", pgtwig_check::render::markdown(&report)),
    }
    Ok(ExitCode::from(report.exit_code()))
}
