//! `pgtwig diff A B`: the schema difference between two branches.

use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;
use pgtwig_core::BranchName;
use pgtwig_schema::{SchemaDiff, Snapshot};

use pgtwig_project::Backend;
use pgtwig_project::Project;

#[derive(Args)]
pub struct DiffArgs {
    /// The branch to compare from (e.g. the parent).
    a: BranchName,
    /// The branch to compare to (e.g. the pull request's).
    b: BranchName,
    /// Database to compare in both branches (default: the app's, `database` in .pgtwig.toml).
    #[arg(long)]
    database: Option<String>,
    /// Print the difference as JSON (added, removed, changed).
    #[arg(long)]
    json: bool,
}

fn snapshot(backend: &Backend, branch: &BranchName, database: &str) -> Result<Snapshot> {
    let connected = match backend {
        Backend::Local(b) => {
            let socket_dir = b.start(branch)?;
            pgtwig_local::cluster::client_config(&socket_dir, database, "pgtwig diff")
                .connect(postgres::NoTls)
                .map_err(anyhow::Error::from)
        }
        Backend::Neon(n) => n.connect(branch, database, "pgtwig diff"),
    };
    let mut client = connected.map_err(|e| {
        let missing = e
            .downcast_ref::<postgres::Error>()
            .and_then(|e| e.code())
            .is_some_and(|c| c.code() == "3D000");
        if missing {
            anyhow::anyhow!(
                "branch \"{branch}\" has no database \"{database}\"; compare another with --database, \
                 or name the app's with `database` in .pgtwig.toml"
            )
        } else {
            e.context(format!(
                "cannot connect to database \"{database}\" on branch \"{branch}\""
            ))
        }
    })?;
    Snapshot::read(&mut client)
        .with_context(|| format!("reading the schema of branch \"{branch}\""))
}

/// Exit status 0 when the schemas are the same, 1 when they differ (so CI
/// can flag a pull request's migrations); errors exit 2.
pub fn run(args: DiffArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let database = project.database(args.database.as_deref())?;
    eprintln!(
        "pgtwig diff: comparing {database} of \"{}\" and \"{}\"",
        args.a, args.b
    );
    let database = database.name;
    let a = snapshot(&backend, &args.a, &database)?;
    let b = snapshot(&backend, &args.b, &database)?;
    let diff = SchemaDiff::between(&a, &b);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&diff)?);
    } else if diff.is_empty() {
        println!(
            "No schema differences between \"{}\" and \"{}\" (database \"{}\")",
            args.a, args.b, database
        );
    } else {
        print!("{}", diff.unified(args.a.as_str(), args.b.as_str()));
    }
    Ok(if diff.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
