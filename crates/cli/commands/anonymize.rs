//! `pgtwig anonymize`: a branch with personal data masked, and no trace of
//! the original values anywhere in its files (design notes: PII survives in
//! dead tuples, statistics and WAL unless rewritten).

use std::path::Path;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Args;
use pgtwig_core::anonymize::pii::{self, Kind};
use pgtwig_core::anonymize::{self, AnonymizeConfig};
use pgtwig_core::BranchName;
use pgtwig_local::LocalBackend;

use pgtwig_project::{Database, Project};

#[derive(Args)]
pub struct AnonymizeArgs {
    /// The branch holding the original data (default: the root branch).
    #[arg(long = "from", value_name = "BRANCH")]
    from: Option<BranchName>,
    /// The anonymized branch to make.
    #[arg(
        long = "into",
        value_name = "BRANCH",
        required_unless_present = "check"
    )]
    into: Option<BranchName>,
    /// Only list columns that look like personal data and have no rule (exit 1 if any).
    #[arg(long)]
    check: bool,
    /// Database the rules apply to (default: the app's, `database` in .pgtwig.toml).
    #[arg(long)]
    database: Option<String>,
}

fn connect(socket_dir: &Path, database: &str) -> Result<postgres::Client, postgres::Error> {
    pgtwig_local::cluster::client_config(socket_dir, database, "pgtwig anonymize")
        .connect(postgres::NoTls)
}

/// A per-project secret keying the fakes, made on first use.
fn salt(project: &Project) -> Result<String> {
    let path = project.home.dir().join("anonymize.salt");
    if let Ok(s) = std::fs::read_to_string(&path) {
        return Ok(s.trim().to_string());
    }
    let mut bytes = [0u8; 16];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    let salt: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    pgtwig_core::fsutil::write_atomic(&path, salt.as_bytes())?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(salt)
}

pub fn run(args: AnonymizeArgs) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let backend = backend.local_only(
        "`pgtwig anonymize`",
        "Neon makes anonymized branches itself (Create branch → Anonymized data in the console); \
         point root_branch or your [[map]] parents at that branch",
    )?;
    let from = args
        .from
        .clone()
        .unwrap_or_else(|| project.config.root_branch.clone());
    let rules = &project.config.anonymize;
    let database = project.database(args.database.as_deref())?;
    if args.check {
        return check(backend, &from, &database, rules);
    }
    pgtwig_project::approval::require_approved_anonymize_sql(&project)?;
    let into = args.into.expect("clap requires --into");
    if rules.columns.is_empty() {
        bail!("no masking rules: add them under [anonymize.columns] in .pgtwig.toml (`pgtwig anonymize --check` lists columns that look like personal data)");
    }
    let statements = anonymize::update_statements(rules, &salt(&project)?);
    println!("Masking {database} of \"{from}\"");
    warn_unmasked_databases(backend, &from, &database.name)?;
    let database = database.name;
    let started = std::time::Instant::now();
    let mut prepare = |socket_dir: &Path| -> Result<(), String> {
        let mut client = connect(socket_dir, &database)
            .map_err(|e| format!("connecting to \"{database}\": {e}"))?;
        apply(&mut client, rules, &statements).map_err(|e| format!("{e:#}"))
    };
    let report = backend.create_prepared(&into, &from, &mut prepare)?;
    println!(
        "Created anonymized branch \"{into}\" from \"{from}\": {} column(s) in {} table(s) of database \"{database}\" masked, tables rewritten, old WAL discarded ({})",
        rules.columns.len(),
        statements.len(),
        crate::output::duration(started.elapsed())
    );
    let _ = report;
    Ok(ExitCode::SUCCESS)
}

fn apply(
    client: &mut postgres::Client,
    rules: &AnonymizeConfig,
    statements: &[(String, String, String)],
) -> Result<()> {
    // Every rule must name a real column: a typo would leave data unmasked.
    for col in rules.columns.keys() {
        let found = client.query_one(
            "select count(*) from pg_attribute a join pg_class c on c.oid = a.attrelid \
             join pg_namespace n on n.oid = c.relnamespace \
             where n.nspname = $1 and c.relname = $2 and a.attname = $3 and a.attnum > 0 and not a.attisdropped",
            &[&col.schema, &col.table, &col.column],
        )?;
        if found.get::<_, i64>(0) == 0 {
            bail!(
                "the rule for {}.{}.{} names no existing column; nothing was created",
                col.schema,
                col.table,
                col.column
            );
        }
    }
    let mut tx = client.transaction()?;
    // No user triggers or foreign-key checks fire for the masking updates.
    tx.batch_execute("SET LOCAL session_replication_role = replica")?;
    // A line per table and step: masking a large table takes a while, and silence
    // reads as a hang.
    let count = statements.len();
    for (n, (schema, table, sql)) in statements.iter().enumerate() {
        let started = std::time::Instant::now();
        tx.batch_execute(sql)
            .with_context(|| format!("masking {schema}.{table}"))?;
        eprintln!(
            "pgtwig: masked {schema}.{table} ({}/{count}, {})",
            n + 1,
            crate::output::duration(started.elapsed())
        );
    }
    tx.commit()?;
    // Rewrite the tables (old row versions hold the originals), refresh and
    // rewrite statistics (their samples hold values too), then move WAL on
    // and checkpoint so the caller can drop every older WAL segment.
    for (n, (schema, table, _)) in statements.iter().enumerate() {
        let started = std::time::Instant::now();
        let t = format!("{}.{}", anonymize::ident(schema), anonymize::ident(table));
        // One statement per call: several in one call form an implicit
        // transaction block, where VACUUM cannot run.
        client.batch_execute(&format!("VACUUM FULL {t}"))?;
        client.batch_execute(&format!("ANALYZE {t}"))?;
        eprintln!(
            "pgtwig: rewrote {schema}.{table} without the old row versions ({}/{count}, {})",
            n + 1,
            crate::output::duration(started.elapsed())
        );
    }
    eprintln!("pgtwig: clearing statistics samples and old WAL");
    for sql in [
        "VACUUM FULL pg_catalog.pg_statistic",
        "VACUUM FULL pg_catalog.pg_statistic_ext_data",
        "SELECT pg_switch_wal()",
        "CHECKPOINT",
    ] {
        client.batch_execute(sql)?;
    }
    Ok(())
}

/// Columns of the database at `client` whose names look like personal data, with the kind
/// (see `pgtwig_core::anonymize::pii`).
fn pii_looking_columns(
    client: &mut postgres::Client,
) -> Result<Vec<(String, String, String, Kind)>> {
    Ok(client
        .query(
            "select n.nspname::text, c.relname::text, a.attname::text from pg_attribute a \
             join pg_class c on c.oid = a.attrelid join pg_namespace n on n.oid = c.relnamespace \
             where c.relkind in ('r', 'p') and a.attnum > 0 and not a.attisdropped \
             and n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast') order by 1, 2, 3",
            &[],
        )?
        .into_iter()
        .filter_map(|r| {
            let column: String = r.get(2);
            pii::classify(&column).map(|kind| (r.get(0), r.get(1), column, kind))
        })
        .collect())
}

/// Say which other databases of `from` hold columns that look like personal
/// data: the anonymized branch gets them as they are (the rules are about
/// `ruled` only).
fn warn_unmasked_databases(backend: &LocalBackend, from: &BranchName, ruled: &str) -> Result<()> {
    let sock = backend.start(from)?;
    let databases = pgtwig_local::databases::list_for_data(&sock)
        .with_context(|| format!("listing the databases of \"{from}\""))?;
    for database in databases.iter().filter(|d| *d != ruled) {
        let mut client = connect(&sock, database)
            .with_context(|| format!("connecting to \"{database}\" on \"{from}\""))?;
        let columns = pii_looking_columns(&mut client)?;
        if !columns.is_empty() {
            let names: Vec<String> = columns
                .iter()
                .map(|(s, t, c, _)| format!("{s}.{t}.{c}"))
                .collect();
            eprintln!(
                "pgtwig: warning: database \"{database}\" of \"{from}\" has columns that look like personal data \
                 ({}); they are copied unmasked (the rules apply to database \"{ruled}\"); drop what the branch does not need",
                names.join(", ")
            );
        }
    }
    Ok(())
}

/// `--check`: in the database the rules apply to, every PII-looking column
/// without a rule; in each other database of the branch (not a template),
/// every PII-looking column, as `anonymize` copies those unmasked. Reported
/// per database; exit 1 when any is found.
fn check(
    backend: &LocalBackend,
    from: &BranchName,
    ruled: &Database,
    rules: &AnonymizeConfig,
) -> Result<ExitCode> {
    let sock = backend.start(from)?;
    let databases = pgtwig_local::databases::list_for_data(&sock)
        .with_context(|| format!("listing the databases of \"{from}\""))?;
    if !databases.contains(&ruled.name) {
        bail!(
            "branch \"{from}\" has no {ruled}; it has: {} (name the app's with `database` in .pgtwig.toml, or pass --database)",
            databases.join(", ")
        );
    }
    // The ruled database first: it is the one the rules are about.
    let mut order: Vec<&String> = databases.iter().filter(|d| **d == ruled.name).collect();
    order.extend(databases.iter().filter(|d| **d != ruled.name));
    let mut found = false;
    for database in order {
        let mut client = connect(&sock, database)
            .with_context(|| format!("connecting to \"{database}\" on \"{from}\""))?;
        let columns = pii_looking_columns(&mut client)?;
        if *database == ruled.name {
            let unruled: Vec<String> = columns
                .iter()
                .filter(|(s, t, c, _)| {
                    !rules
                        .columns
                        .keys()
                        .any(|k| k.schema == *s && k.table == *t && k.column == *c)
                })
                // A line to paste under [anonymize.columns], and what it seems to be.
                .map(|(s, t, c, kind)| {
                    format!(
                        "\"{s}.{t}.{c}\" = {}    # {}",
                        kind.suggested_rule(c),
                        kind.describe()
                    )
                })
                .collect();
            if unruled.is_empty() {
                println!(
                    "{ruled} on \"{from}\": every column that looks like personal data has a masking rule"
                );
            } else {
                found = true;
                println!(
                    "{ruled} on \"{from}\": columns that look like personal data and have no rule in [anonymize.columns] \
                     (suggested rules; check each):"
                );
                for c in &unruled {
                    println!("  {c}");
                }
            }
        } else if columns.is_empty() {
            println!("database \"{database}\" on \"{from}\": no column looks like personal data");
        } else {
            found = true;
            println!(
                "database \"{database}\" on \"{from}\": columns that look like personal data; `pgtwig anonymize` masks \
                 database \"{}\" only and would copy these as they are (drop what the branch does not need):",
                ruled.name
            );
            for (s, t, c, kind) in &columns {
                println!("  \"{s}.{t}.{c}\" ({})", kind.describe());
            }
        }
    }
    Ok(if found {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}
