//! `pgtwig diff A B`: the schema difference between two branches;
//! `pgtwig diff --data A B`: their rows (see pgtwig_datadiff).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
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
    #[arg(long, conflicts_with = "format")]
    json: bool,
    /// `markdown`: GitHub-flavoured, for a pull request comment.
    #[arg(long, value_enum)]
    format: Option<Format>,
    /// Compare the rows of every table (added, removed, changed by primary key) instead of the schema.
    #[arg(long)]
    data: bool,
    /// With --data: only this table (`schema.name`, or `name` in any schema).
    #[arg(long, requires = "data")]
    table: Option<String>,
    /// With --data: sample rows shown per table.
    #[arg(long, default_value_t = 5, requires = "data")]
    limit: usize,
    /// With --data: read and compare every row, even blocks both branches still share.
    #[arg(long, requires = "data")]
    full: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Text,
    Markdown,
}

fn connect(backend: &Backend, branch: &BranchName, database: &str) -> Result<postgres::Client> {
    let connected = match backend {
        Backend::Local(b) => {
            let socket_dir = b.start(branch)?;
            pgtwig_local::cluster::client_config(&socket_dir, database, "pgtwig diff")
                .connect(postgres::NoTls)
                .map_err(anyhow::Error::from)
        }
        Backend::Neon(n) => n.connect(branch, database, "pgtwig diff"),
    };
    connected.map_err(|e| {
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
    })
}

/// Where a local branch's files are, for the extent-aware data diff.
fn data_dir(backend: &Backend, branch: &BranchName) -> Result<Option<PathBuf>> {
    Ok(match backend {
        Backend::Local(b) => Some(b.get(branch)?.data_dir()),
        Backend::Neon(_) => None,
    })
}

/// Exit status 0 when the branches are the same, 1 when they differ (so CI
/// can flag a pull request's migrations); errors exit 2.
pub fn run(args: DiffArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let database = project.database(args.database.as_deref())?;
    eprintln!(
        "pgtwig diff{}: comparing {database} of \"{}\" and \"{}\"",
        if args.data { " --data" } else { "" },
        args.a,
        args.b
    );
    let database = database.name;
    let differ = if args.data {
        data(&args, &backend, &database)?
    } else {
        schema(&args, &backend, &database)?
    };
    Ok(if differ {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn schema(args: &DiffArgs, backend: &Backend, database: &str) -> Result<bool> {
    let snapshot = |branch: &BranchName| -> Result<Snapshot> {
        let mut client = connect(backend, branch, database)?;
        Snapshot::read(&mut client)
            .with_context(|| format!("reading the schema of branch \"{branch}\""))
    };
    let a = snapshot(&args.a)?;
    let b = snapshot(&args.b)?;
    let diff = SchemaDiff::between(&a, &b);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&diff)?);
    } else if args.format == Some(Format::Markdown) {
        print!(
            "{}",
            diff.markdown(args.a.as_str(), args.b.as_str(), database)
        );
    } else if diff.is_empty() {
        println!(
            "No schema differences between \"{}\" and \"{}\" (database \"{}\")",
            args.a, args.b, database
        );
    } else {
        print!("{}", diff.unified(args.a.as_str(), args.b.as_str()));
    }
    Ok(!diff.is_empty())
}

fn data(args: &DiffArgs, backend: &Backend, database: &str) -> Result<bool> {
    let (dir_a, dir_b) = (data_dir(backend, &args.a)?, data_dir(backend, &args.b)?);
    let mut client_a = connect(backend, &args.a, database)?;
    let mut client_b = connect(backend, &args.b, database)?;
    let options = pgtwig_datadiff::Options {
        table: args.table.clone(),
        limit: args.limit,
        full: args.full,
    };
    let diff = pgtwig_datadiff::diff(
        pgtwig_datadiff::Side {
            label: args.a.as_str(),
            client: &mut client_a,
            data_dir: dir_a.as_deref(),
        },
        pgtwig_datadiff::Side {
            label: args.b.as_str(),
            client: &mut client_b,
            data_dir: dir_b.as_deref(),
        },
        &options,
    )?;
    let (a, b) = (args.a.as_str(), args.b.as_str());
    if args.json {
        println!("{}", serde_json::to_string_pretty(&diff)?);
    } else if args.format == Some(Format::Markdown) {
        print!(
            "{}",
            pgtwig_datadiff::render::markdown(&diff, a, b, database)
        );
    } else {
        print!("{}", pgtwig_datadiff::render::text(&diff, a, b));
    }
    Ok(!diff.is_empty())
}
