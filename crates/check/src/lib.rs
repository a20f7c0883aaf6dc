//! `pgtwig check`: what a migration will do to production-like data, found by running it.
//!
//! The command (`./manage.py migrate`, `npx knex migrate:latest`, ...) runs against a
//! throwaway copy-on-write clone of a branch, with `DATABASE_URL` (and `PGHOST`, `PGPORT`,
//! `PGUSER`, `PGDATABASE`) pointing at the clone's app database. The branch itself is only
//! cloned, never written. Around the command:
//!
//! - [`catalog`]: the app database's relations (relfilenode, row estimates after `ANALYZE`),
//!   columns and constraints, before and after — rewrites, new indexes and constraints,
//!   drops and renames come from comparing the two;
//! - [`observe`]: every statement from the server log (`log_min_duration_statement = 0`
//!   on pgtwig's own clone server), rows from pg_stat_statements, and held locks from a
//!   connection sampling `pg_locks` (see there for why this and not event triggers, and
//!   for the resolution);
//! - [`rules`]: the findings, each `fail` or `warn` as `[check]` in `.pgtwig.toml` says;
//! - [`render`]: a table for people, markdown for a pull request comment (JSON is serde's).
//!
//! The clone lives in the project's `tmp/` as an unlocked build (see
//! `pgtwig_local::scratch`): removed when the check ends — also when the command fails or
//! pgtwig gets SIGINT/SIGTERM (passed on to the command, then the clone is removed) — and,
//! if pgtwig is killed outright, by the next pgtwig command that takes the project lock.
//! `--keep NAME` publishes it as a branch instead.

mod attribute;
pub mod catalog;
mod command;
pub mod observe;
pub mod render;
pub mod rules;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use pgtwig_core::check::{CheckConfig, Level};
use pgtwig_core::BranchName;
use pgtwig_local::scratch::ScratchServer;
use pgtwig_local::LocalBackend;
use serde::Serialize;

use catalog::Catalog;
pub use rules::Finding;

/// What to check.
pub struct CheckRequest {
    /// The branch to clone (never written).
    pub branch: BranchName,
    /// The app's database on it.
    pub database: String,
    /// The command and its arguments.
    pub command: Vec<OsString>,
    /// Run it here (the work tree).
    pub dir: PathBuf,
    /// Keep the clone as this branch.
    pub keep: Option<BranchName>,
    pub config: CheckConfig,
}

/// A lock a statement took, and for how long it was seen held (until its transaction ended).
#[derive(Debug, Clone, Serialize)]
pub struct StatementLock {
    pub relation: String,
    /// "AccessExclusiveLock", "ShareLock", ...
    pub mode: String,
    /// From its first to its last sample: the real time is longer by up to two sample intervals.
    pub held_ms: u64,
    /// Rows of the table (of an index's table) before the command.
    #[serde(skip)]
    pub table_rows: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Statement {
    /// "ddl" or "dml".
    pub kind: &'static str,
    pub text: String,
    /// RFC 3339, UTC.
    pub started: String,
    pub duration_ms: f64,
    /// Rows affected (pg_stat_statements), summed over `calls` runs of the same statement.
    pub rows: Option<i64>,
    pub calls: Option<i64>,
    pub locks: Vec<StatementLock>,
    /// Relations this statement rewrote (new relfilenode).
    pub rewrote: Vec<String>,
    pub error: Option<String>,
}

/// A relation whose relfilenode changed.
#[derive(Debug, Clone, Serialize)]
pub struct Rewrite {
    pub relation: String,
    /// "table", "index" or "materialized view".
    pub kind: &'static str,
    /// Rows before the command (of an index: of its table).
    pub rows: f64,
    pub relfilenode_before: u32,
    pub relfilenode_after: u32,
    /// Index into the statements, when known.
    pub statement: Option<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LockSampling {
    pub interval_ms: u64,
    /// The longest gap between two samples seen: locks held shorter than this may be missed.
    pub worst_gap_ms: u64,
    pub samples: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct CheckReport {
    pub branch: String,
    pub database: String,
    pub command: Vec<String>,
    pub duration_ms: u64,
    /// DDL and DML statements, in the order they finished.
    pub statements: Vec<Statement>,
    /// Other statements (SELECT, SET, BEGIN, ...), counted only.
    pub other_statements: usize,
    pub rewrites: Vec<Rewrite>,
    pub lock_sampling: LockSampling,
    /// Where rows affected came from; None: not recorded (no pg_stat_statements).
    pub rows_source: Option<&'static str>,
    pub findings: Vec<Finding>,
    pub failed: bool,
    /// The branch the clone was kept as (`--keep`).
    pub kept: Option<String>,
}

impl CheckReport {
    /// 1 when a rule at `fail` found something, else 0.
    pub fn exit_code(&self) -> u8 {
        u8::from(self.failed)
    }
}

/// Run the check. Errors (the command failed, was interrupted, a branch is missing) come
/// back as text for people, after the clone was removed.
pub fn check(backend: &LocalBackend, req: &CheckRequest) -> Result<CheckReport, String> {
    let t0 = std::time::Instant::now();
    let pgss = std::cell::Cell::new(false);
    let (mut report, kept) = backend
        .with_scratch_clone(
            &req.branch,
            req.keep.as_ref(),
            |setup| {
                let has = setup.pkglibdir.join("pg_stat_statements.so").exists()
                    || setup.pkglibdir.join("pg_stat_statements.dylib").exists();
                pgss.set(has && setup.shared_preload_libraries.is_some());
                observe::server_settings(
                    setup
                        .shared_preload_libraries
                        .as_deref()
                        .filter(|_| pgss.get()),
                )
            },
            |server| observe_command(server, req, pgss.get()),
        )
        .map_err(|e| e.to_string())?;
    report.duration_ms = t0.elapsed().as_millis() as u64;
    report.kept = kept.map(|b| b.name.to_string());
    Ok(report)
}

fn connect(server: &ScratchServer, database: &str) -> Result<postgres::Client, String> {
    pgtwig_local::cluster::client_config(server.socket_dir, database, observe::APP_NAME)
        .connect(postgres::NoTls)
        .map_err(|e| format!("connecting to database \"{database}\" of the clone: {e}"))
}

/// A libpq URL to the clone's socket (percent-encoded where a URL needs it).
fn database_url(socket_dir: &Path, database: &str) -> String {
    fn enc(s: &str) -> String {
        s.bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect()
    }
    format!(
        "postgresql://{}@/{}?host={}",
        pgtwig_local::cluster::SUPERUSER,
        enc(database),
        enc(&socket_dir.to_string_lossy())
    )
}

fn observe_command(
    server: &ScratchServer,
    req: &CheckRequest,
    pgss: bool,
) -> Result<CheckReport, String> {
    let branch = &req.branch;
    let db = &req.database;
    let mut app = connect(server, db).map_err(|e| {
        if e.contains("3D000") || e.contains("does not exist") {
            format!("branch \"{branch}\" has no database \"{db}\"; name the app's with `database` in .pgtwig.toml")
        } else {
            e
        }
    })?;
    // Row estimates for every table: our own clone, so nothing the branch sees.
    app.batch_execute("ANALYZE")
        .map_err(|e| format!("ANALYZE on the clone: {e}"))?;
    let database_oid: u32 = app
        .query_one(
            "SELECT oid FROM pg_database WHERE datname = current_database()",
            &[],
        )
        .map_err(|e| e.to_string())?
        .get(0);
    let before = Catalog::read(&mut app).map_err(|e| format!("reading the catalog: {e}"))?;
    drop(app);
    let mut admin = connect(server, "postgres")?;
    let made_pgss = if pgss {
        let had: bool = admin
            .query_one(
                "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'pg_stat_statements')",
                &[],
            )
            .map_err(|e| e.to_string())?
            .get(0);
        admin
            .batch_execute(
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
            )
            .map_err(|e| format!("setting up pg_stat_statements on the clone: {e}"))?;
        !had
    } else {
        false
    };
    let log_start = std::fs::metadata(server.log).map(|m| m.len()).unwrap_or(0);
    let sampler = observe::LockSampler::start(
        server.socket_dir,
        database_oid,
        req.config.lock_sample_interval,
    )?;
    let url = database_url(server.socket_dir, db);
    let env = [
        ("DATABASE_URL", url),
        ("PGHOST", server.socket_dir.to_string_lossy().into_owned()),
        ("PGPORT", pgtwig_local::cluster::PORT.to_string()),
        ("PGUSER", pgtwig_local::cluster::SUPERUSER.to_string()),
        ("PGDATABASE", db.clone()),
    ];
    let finished = command::run(&req.command, &req.dir, &env);
    let samples = sampler.finish();
    let finished = finished?;
    if finished.interrupted {
        return Err("interrupted: the command was stopped and its clone removed; the branch was not touched".into());
    }
    if !finished.status.success() {
        let code = finished
            .status
            .code()
            .map(|c| format!("exit code {c}"))
            .unwrap_or_else(|| format!("{}", finished.status));
        let mut msg = format!(
            "the command failed ({code}); its clone was removed and branch \"{branch}\" was not touched"
        );
        if !finished.tail.is_empty() {
            msg.push_str(&format!(
                "\nlast lines of its output:\n  {}",
                finished.tail.join("\n  ")
            ));
        }
        return Err(msg);
    }
    let samples = samples?;
    let mut rows_by_query: HashMap<i64, (i64, i64)> = HashMap::new();
    if pgss {
        for row in admin
            .query(
                "SELECT queryid, sum(rows)::int8, sum(calls)::int8 FROM pg_stat_statements \
                 WHERE dbid = $1 AND queryid IS NOT NULL GROUP BY queryid",
                &[&database_oid],
            )
            .map_err(|e| format!("reading pg_stat_statements: {e}"))?
        {
            rows_by_query.insert(row.get(0), (row.get(1), row.get(2)));
        }
        if made_pgss {
            admin
                .batch_execute("DROP EXTENSION pg_stat_statements")
                .map_err(|e| e.to_string())?;
        }
    }
    drop(admin);
    let after = {
        let mut app = connect(server, db)?;
        Catalog::read(&mut app)
            .map_err(|e| format!("reading the catalog after the command: {e}"))?
    };
    let log = read_from(server.log, log_start)?;
    let logged = observe::statements(&log, db);

    let (statements, other, rewrites) =
        attribute::assemble(&logged, &samples, &rows_by_query, &before, &after);

    let findings = rules::judge(&req.config, &before, &after, &statements, &rewrites);
    let failed = findings.iter().any(|f| f.level == Level::Fail);
    let interval = req.config.lock_sample_interval;
    Ok(CheckReport {
        branch: branch.to_string(),
        database: db.clone(),
        command: req
            .command
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect(),
        duration_ms: 0,
        statements,
        other_statements: other,
        rewrites,
        lock_sampling: LockSampling {
            interval_ms: interval.as_millis() as u64,
            worst_gap_ms: samples.worst_gap.max(interval).as_millis() as u64,
            samples: samples.samples,
        },
        rows_source: pgss.then_some("pg_stat_statements"),
        findings,
        failed,
        kept: None,
    })
}

fn read_from(path: &Path, offset: u64) -> Result<String, String> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path)
        .map_err(|e| format!("reading the clone's log {}: {e}", path.display()))?;
    f.seek(SeekFrom::Start(offset)).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes).map_err(|e| e.to_string())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// Why a check cannot run on Neon.
pub const NEON_UNSUPPORTED: &str =
    "Neon has no local server to observe: pgtwig check reads the clone's server log and samples its locks, \
     which needs a branch of the local backend";
