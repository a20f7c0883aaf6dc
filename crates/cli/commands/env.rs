//! `pgtwig env` and `pgtwig run -- CMD`: this work tree's DATABASE_URL for `.env` files,
//! direnv and one-off commands.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use pgtwig_core::state::ProjectState;
use pgtwig_core::BranchName;

use crate::commands::url::{proxy_url, running_proxy_port};
use pgtwig_project::Backend;
use pgtwig_project::Project;

#[derive(Args)]
pub struct EnvArgs {
    /// Print `export DATABASE_URL='…'` (for `eval "$(pgtwig env --export)"` in a shell or .envrc).
    #[arg(long)]
    export: bool,
    /// Database in the URL (default: the project's).
    #[arg(long)]
    database: Option<String>,
}

#[derive(Args)]
pub struct RunArgs {
    /// Database in the URL (default: the project's).
    #[arg(long)]
    database: Option<String>,
    /// The command and its arguments, after `--`.
    #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

/// `DATABASE_URL=…` through the proxy: the same URL whichever branch is active, so a
/// `.env` file written once stays right after every checkout.
pub fn env(args: EnvArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let (url, database) = proxy_url(&project, &backend, None, args.database.as_deref(), None)?;
    if running_proxy_port(&project, &backend)?.is_none() {
        eprintln!(
            "pgtwig: the proxy is not running, so this URL answers only once it does: start it with \
             `pgtwig up --detach` (or use `pgtwig run -- CMD`, which works without it)"
        );
    }
    eprintln!(
        "pgtwig: {database}; from this work tree it reaches branch \"{}\" (now; it follows checkouts)",
        worktree_branch(&project)?
    );
    println!("{}", env_line(&url, args.export));
    Ok(ExitCode::SUCCESS)
}

/// Run a command with DATABASE_URL set: through the proxy when it runs, else straight to
/// this work tree's branch (started if it was stopped). Its exit code is ours.
pub fn run(args: RunArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let url = if running_proxy_port(&project, &backend)?.is_some() {
        proxy_url(&project, &backend, None, args.database.as_deref(), None)?.0
    } else {
        let branch = worktree_branch(&project)?;
        let database = project.database(args.database.as_deref())?;
        if let Backend::Local(local) = &backend {
            local.start(&branch)?;
        }
        eprintln!(
            "pgtwig: the proxy is not running: {} connects straight to branch \"{branch}\" ({database})",
            args.command[0]
        );
        backend.url(&branch, &database.name)?
    };
    let mut command = std::process::Command::new(&args.command[0]);
    command.args(&args.command[1..]).env("DATABASE_URL", &url);
    // libpq's own variables too, so `pgtwig run -- psql` (which ignores DATABASE_URL) works.
    for (name, value) in libpq_variables(&url)? {
        command.env(name, value);
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("cannot run {:?}", args.command[0]))?;
    // Ctrl-C is the command's to handle (the terminal sends it to both of us): we wait and
    // pass on how it ended. Ignored only now, after exec, so the command does not inherit it.
    // SAFETY: changing signal dispositions; no handler runs.
    unsafe {
        nix::libc::signal(nix::libc::SIGINT, nix::libc::SIG_IGN);
        nix::libc::signal(nix::libc::SIGQUIT, nix::libc::SIG_IGN);
    }
    let status = child.wait().context("waiting for the command")?;
    Ok(exit_code_of(status))
}

/// The child's exit code; killed by a signal, 128 + its number, as shells report it.
fn exit_code_of(status: std::process::ExitStatus) -> ExitCode {
    match (status.code(), status.signal()) {
        (Some(code), _) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        (None, Some(signal)) => ExitCode::from(u8::try_from(128 + signal).unwrap_or(255)),
        (None, None) => ExitCode::FAILURE,
    }
}

/// The branch the proxy gives clients of the current work tree (state.json).
fn worktree_branch(project: &Project) -> Result<BranchName> {
    let path = project.home.state_path();
    let state = ProjectState::load(&path).map_err(|e| {
        anyhow::anyhow!(
            "cannot read {} ({e}); run `pgtwig init` in the repository first",
            path.display()
        )
    })?;
    let worktree = crate::commands::daemon::current_worktree();
    Ok(state.branch_of(worktree.as_deref()).clone())
}

/// PGHOST, PGPORT, PGUSER, PGPASSWORD and PGDATABASE for the connection `url` names.
fn libpq_variables(url: &str) -> Result<Vec<(&'static str, String)>> {
    use std::str::FromStr;
    let config = postgres::Config::from_str(url)
        .with_context(|| format!("pgtwig made a connection string it cannot read: {url}"))?;
    let mut vars = Vec::new();
    match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => vars.push(("PGHOST", h.clone())),
        Some(postgres::config::Host::Unix(p)) => vars.push(("PGHOST", p.display().to_string())),
        None => {}
    }
    if let Some(port) = config.get_ports().first() {
        vars.push(("PGPORT", port.to_string()));
    }
    if let Some(user) = config.get_user() {
        vars.push(("PGUSER", user.to_string()));
    }
    if let Some(password) = config.get_password() {
        vars.push(("PGPASSWORD", String::from_utf8_lossy(password).into_owned()));
    }
    if let Some(db) = config.get_dbname() {
        vars.push(("PGDATABASE", db.to_string()));
    }
    Ok(vars)
}

/// `DATABASE_URL=url` for .env files; `export DATABASE_URL='url'` for shells.
fn env_line(url: &str, export: bool) -> String {
    if export {
        format!("export DATABASE_URL='{}'", url.replace('\'', "'\\''"))
    } else {
        format!("DATABASE_URL={url}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpq_variables_from_proxy_and_socket_urls() {
        let v = libpq_variables("postgres://postgres:s3cret@localhost:6543/app%40dev").unwrap();
        assert_eq!(
            v,
            vec![
                ("PGHOST", "localhost".to_string()),
                ("PGPORT", "6543".into()),
                ("PGUSER", "postgres".into()),
                ("PGPASSWORD", "s3cret".into()),
                ("PGDATABASE", "app@dev".into()),
            ]
        );
        let v = libpq_variables("postgresql://postgres@/app?host=/tmp/sock").unwrap();
        assert_eq!(v[0], ("PGHOST", "/tmp/sock".to_string()));
        assert!(v.contains(&("PGDATABASE", "app".to_string())), "{v:?}");
    }

    #[test]
    fn env_lines_for_dotenv_and_shells() {
        assert_eq!(
            env_line("postgres://u:p@localhost:5432/app", false),
            "DATABASE_URL=postgres://u:p@localhost:5432/app"
        );
        assert_eq!(
            env_line("postgres://u:it's@h/app", true),
            "export DATABASE_URL='postgres://u:it'\\''s@h/app'"
        );
    }
}
