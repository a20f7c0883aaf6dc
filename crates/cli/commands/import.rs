//! `pgtwig import --from postgres://…`: seed or refresh a branch from a real
//! database. `pg_dump` (directory format, parallel) reads the source —
//! which is never written to — and `pg_restore` (parallel) fills the app's
//! database (`database` in .pgtwig.toml, whatever the source calls its own)
//! in a copy of the branch built out of sight; the branch's other
//! databases come along as they are. Only a complete import replaces the
//! branch.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::str::FromStr;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Args;
use pgtwig_core::BranchName;

use crate::output;
use crate::progress::Bar;
use pgtwig_project::Project;

#[derive(Args)]
pub struct ImportArgs {
    /// The source database, e.g. postgres://user:password@host:5432/app (read only).
    #[arg(long = "from", value_name = "URL")]
    from: String,
    /// The branch to seed or refresh (default: the root branch).
    #[arg(long = "into", value_name = "BRANCH")]
    into: Option<BranchName>,
    /// The branch's database to fill (default: the app's, `database` in .pgtwig.toml).
    #[arg(long, value_name = "NAME")]
    database: Option<String>,
    /// Tables, views, functions… but no rows.
    #[arg(long)]
    schema_only: bool,
    /// Copy this table's definition but not its rows (pg_dump pattern; repeatable).
    #[arg(long, value_name = "PATTERN")]
    exclude_table_data: Vec<String>,
    /// Parallel jobs for dump and restore (default: number of CPUs).
    #[arg(long)]
    jobs: Option<usize>,
    /// Keep the branch's previous state as this branch when it has data (default:
    /// `<branch>-before-import`).
    #[arg(long, value_name = "NAME", conflicts_with = "replace")]
    keep_old: Option<BranchName>,
    /// Drop the branch's previous data instead of keeping it as a branch.
    #[arg(long)]
    replace: bool,
}

/// Where the branch's previous state goes: `--keep-old`, else `<branch>-before-import`;
/// nowhere with `--replace`.
fn keep_name(args: &ImportArgs, into: &BranchName) -> Result<Option<BranchName>> {
    if args.replace {
        return Ok(None);
    }
    if let Some(k) = &args.keep_old {
        return Ok(Some(k.clone()));
    }
    let name = format!("{into}-before-import");
    BranchName::parse(&name).map(Some).map_err(|e| {
        anyhow::anyhow!(
            "cannot keep the previous state of \"{into}\" as \"{name}\" ({e}); name a branch with \
             `--keep-old NAME`, or drop it with `--replace`"
        )
    })
}

/// Check the source answers, and say clearly why not.
fn probe_source(url: &str) -> Result<(String, i64)> {
    let config = postgres::Config::from_str(url).with_context(|| {
        "--from is not a PostgreSQL connection string (postgres://user:password@host:port/database)"
    })?;
    let mut client = config.connect(postgres::NoTls).map_err(|e| {
        let what = match e.code().map(|c| c.code()) {
            Some("28P01") | Some("28000") => {
                "authentication failed: check the user and password in --from".to_string()
            }
            Some("3D000") => "the database in --from does not exist".to_string(),
            _ => format!("cannot reach it: {e}"),
        };
        anyhow::anyhow!("source database: {what}")
    })?;
    let row = client.query_one(
        "select current_database()::text, (select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind in ('r', 'p') and n.nspname not in ('pg_catalog', 'information_schema'))",
        &[],
    )?;
    Ok((row.get(0), row.get(1)))
}

/// `pg_database_size` of the source's database, for the free-space check (None if it
/// cannot be read: the check then counts only the branch's clone).
fn source_bytes(url: &str) -> Option<u64> {
    let mut client = postgres::Config::from_str(url)
        .ok()?
        .connect(postgres::NoTls)
        .ok()?;
    let row = client
        .query_one("select pg_database_size(current_database())", &[])
        .ok()?;
    u64::try_from(row.get::<_, i64>(0)).ok()
}

/// Run a client tool, feeding each stderr line to `on_line`; returns the last lines on failure.
/// The tool dies with this command (even killed with `kill -9`: see `pgtwig_local::lifetime`);
/// `failpoint` is hit at its first line (crash tests).
fn run_tool(
    mut cmd: Command,
    failpoint: &str,
    mut on_line: impl FnMut(&str),
) -> Result<(), String> {
    pgtwig_local::lifetime::die_with_this_thread(&mut cmd, nix::sys::signal::Signal::SIGTERM);
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    let mut tail: Vec<String> = Vec::new();
    for (n, line) in BufReader::new(child.stderr.take().expect("piped"))
        .lines()
        .map_while(Result::ok)
        .enumerate()
    {
        if n == 0 {
            pgtwig_core::failpoint::hit(failpoint);
        }
        on_line(&line);
        if !line.contains(": processing")
            && !line.contains(": dumping")
            && !line.contains(": creating")
        {
            tail.push(line);
            if tail.len() > 8 {
                tail.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    if status.success() {
        Ok(())
    } else {
        Err(format!(
            "{:?} failed ({status}):\n{}",
            cmd.get_program(),
            tail.join("\n")
        ))
    }
}

pub fn run(args: ImportArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let backend = backend.local_only(
        "`pgtwig import`",
        "data goes into the Neon branch with pg_dump and pg_restore (or Neon's Import Data Assistant); \
         pgtwig then branches from it",
    )?;
    let into = args
        .into
        .clone()
        .unwrap_or_else(|| project.config.root_branch.clone());
    let keep = keep_name(&args, &into)?;
    // Checked before the long dump: the name for the previous state must be free.
    if let Some(k) = keep.as_ref().filter(|k| backend.exists(k)) {
        if backend.exists(&into) {
            bail!(
                "branch \"{k}\" already exists, so the previous state of \"{into}\" cannot be kept there (an \
                 earlier import may have kept it); delete it (`pgtwig branch delete {k}`), name another branch \
                 with `--keep-old NAME`, or drop the previous data with `--replace`"
            );
        }
    }
    let (database, tables) = probe_source(&args.from)?;
    // Before anything is written: the dump and the restore go to the disk the branches are on.
    backend.check_space_for_import(&into, source_bytes(&args.from))?;
    let pg = pgtwig_local::pgbin::newest()?;
    let jobs = args.jobs.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2)
    });
    let started = Instant::now();

    // 1. Dump, outside the project lock and out of sight (tmp/), read only.
    let work = tempdir_in(&project.home.tmp_dir())?;
    let dump = work.join("dump");
    let mut cmd = Command::new(pg.bin("pg_dump"));
    cmd.args(["--format=directory", "--verbose", "--no-owner", "--no-acl"])
        .arg(format!("--jobs={jobs}"))
        .arg("--file")
        .arg(&dump);
    if args.schema_only {
        cmd.arg("--schema-only");
    }
    for p in &args.exclude_table_data {
        cmd.arg(format!("--exclude-table-data={p}"));
    }
    cmd.arg("--dbname").arg(&args.from);
    // One step per table whose data is dumped (partitioned parents have none: the
    // estimate may be high; `Bar` never lets it be passed).
    let mut pb = Bar::new(if args.schema_only { 1 } else { tables as u64 }, "dump");
    let result = run_tool(cmd, "import.dumping", |line| {
        if line.contains("dumping contents of table") {
            pb.step();
            let size = pgtwig_core::fsutil::dir_size(&dump).unwrap_or(0);
            pb.set_message(output::size(size));
        }
    });
    pb.finish_and_clear();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&work);
        bail!("dumping the source failed; nothing was changed:\n{e}");
    }
    let dump_size = pgtwig_core::fsutil::dir_size(&dump).unwrap_or(0);
    let items = Command::new(pg.bin("pg_restore"))
        .arg("--list")
        .arg(&dump)
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter(|l| !l.starts_with(';'))
                .count()
        })
        .unwrap_or(1);

    // 2. Restore into a fresh cluster that replaces the branch only when complete.
    let mut pb = Bar::new(items as u64, "restore");
    pb.set_message(output::size(dump_size));
    // The source's database, whatever it is called, becomes the app's
    // (made empty by `replace_database`); the branch's others stay.
    let target = project.database(args.database.as_deref())?.name;
    // A database named like the source's, left on the branch by an older
    // pgtwig (which restored into the source's name): said, not dropped.
    let mut stale_namesake = false;
    let mut fill = |sock: &Path| -> Result<(), String> {
        if database != target {
            stale_namesake =
                pgtwig_local::databases::exists(sock, &database).map_err(|e| e.to_string())?;
        }
        let mut cmd = Command::new(pg.bin("pg_restore"));
        cmd.args(["--verbose", "--no-owner", "--no-acl", "--exit-on-error"])
            .arg(format!("--jobs={jobs}"))
            .arg("--host")
            .arg(sock)
            .args(["--port", &pgtwig_local::cluster::PORT.to_string()])
            .args(["--username", pgtwig_local::cluster::SUPERUSER])
            .args(["--dbname", &target])
            .arg(&dump);
        run_tool(cmd, "import.restoring", |line| {
            // One line per archive item: "creating …" for definitions, "processing data
            // …" for table data. Not "processing item …" too: with --jobs that is a
            // second line for the same item (the old count reached 27/17).
            if line.contains(": creating") || line.contains("processing data") {
                pb.step();
            }
        })?;
        pgtwig_core::failpoint::hit("import.before_publish");
        Ok(())
    };
    let result = backend.replace_database(&into, &target, keep.as_ref(), &mut fill);
    pb.finish_and_clear();
    let _ = std::fs::remove_dir_all(&work);
    let replaced = result
        .map_err(|e| anyhow::anyhow!("restoring failed; branch \"{into}\" was not changed: {e}"))?;
    let branch = &replaced.branch;
    println!(
        "Restored database \"{database}\" of the source into database \"{target}\" of branch \"{into}\" \
         ({} dumped{}; PostgreSQL {}, {}); its other databases are as they were",
        output::size(dump_size),
        if args.schema_only {
            ", schema only"
        } else {
            ""
        },
        branch.meta.pg_major,
        output::duration(started.elapsed())
    );
    if let Some(k) = &replaced.kept {
        println!(
            "Its previous state is kept as branch \"{k}\" (`pgtwig branch delete {k}` when you no longer need it; \
             `--replace` drops it instead)"
        );
    } else if replaced.dropped {
        println!("Its previous data in \"{target}\" was dropped (--replace)");
    }
    if stale_namesake {
        println!(
            "Branch \"{into}\" also has a database \"{database}\" (from an earlier import?); it was left as it was: \
             drop it if the app does not use it (`pgtwig anonymize --check` looks at it too)"
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn tempdir_in(dir: &Path) -> Result<std::path::PathBuf> {
    // "fill-…-<pid>": other commands leave it alone while we live.
    let d = dir.join(format!("fill-import-{}", std::process::id()));
    // The dump is production data: ours alone (0700), as root too.
    pgtwig_core::private::make_dir(&d, 0o700, None, None)
        .with_context(|| format!("cannot create {}", d.display()))?;
    Ok(d)
}
