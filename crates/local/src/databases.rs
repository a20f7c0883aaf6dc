//! The databases inside a branch's cluster: the app's own (named by
//! `database` in `.pgtwig.toml`) and whatever else the branch holds.
//!
//! pgtwig talks to them as the superuser over the branch's (or a build's)
//! private socket, connected to `template1`: it always exists, and it is
//! never the app's database (`database` may not name a template), so the
//! app's can be dropped and made again from there. New databases are made
//! from `template0`, as `pg_restore` expects: nothing a user added to
//! `template1` ends up in them twice.

use std::path::Path;

use crate::cluster;

fn admin(socket_dir: &Path, app: &str) -> Result<postgres::Client, postgres::Error> {
    cluster::client_config(socket_dir, "template1", app).connect(postgres::NoTls)
}

/// A quoted SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether `database` exists on the server at `socket_dir`.
pub fn exists(socket_dir: &Path, database: &str) -> Result<bool, postgres::Error> {
    let mut c = admin(socket_dir, "pgtwig")?;
    let row = c.query_one(
        "select count(*) from pg_database where datname = $1",
        &[&database],
    )?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Create `database`, empty, unless it exists; returns whether it was made.
pub fn create_if_missing(socket_dir: &Path, database: &str) -> Result<bool, postgres::Error> {
    if exists(socket_dir, database)? {
        return Ok(false);
    }
    let mut c = admin(socket_dir, "pgtwig")?;
    c.batch_execute(&format!(
        "CREATE DATABASE {} TEMPLATE template0",
        ident(database)
    ))?;
    Ok(true)
}

/// Replace `database` with an empty one (its sessions are ended first);
/// made if it did not exist. For an import into a build, out of sight.
pub fn recreate(socket_dir: &Path, database: &str) -> Result<(), postgres::Error> {
    let mut c = admin(socket_dir, "pgtwig import")?;
    // One statement per call: DROP/CREATE DATABASE refuse a transaction block.
    c.batch_execute(&format!(
        "DROP DATABASE IF EXISTS {} WITH (FORCE)",
        ident(database)
    ))?;
    c.batch_execute(&format!(
        "CREATE DATABASE {} TEMPLATE template0",
        ident(database)
    ))?;
    Ok(())
}

/// Whether `database` exists and holds anything a user made: a table, view, sequence or
/// foreign table outside the system schemas. What `pgtwig import` keeps before replacing it.
pub fn has_user_objects(socket_dir: &Path, database: &str) -> Result<bool, postgres::Error> {
    if !exists(socket_dir, database)? {
        return Ok(false);
    }
    let mut c = cluster::client_config(socket_dir, database, "pgtwig").connect(postgres::NoTls)?;
    let row = c.query_one(
        "select count(*) from pg_class c join pg_namespace n on n.oid = c.relnamespace \
         where c.relkind in ('r', 'p', 'v', 'm', 'S', 'f') \
         and n.nspname not in ('pg_catalog', 'information_schema') and n.nspname not like 'pg\\_%'",
        &[],
    )?;
    Ok(row.get::<_, i64>(0) > 0)
}

/// Every database a client could hold data in: not a template, and
/// accepting connections; sorted by name.
pub fn list_for_data(socket_dir: &Path) -> Result<Vec<String>, postgres::Error> {
    let mut c = admin(socket_dir, "pgtwig")?;
    Ok(c.query(
        "select datname::text from pg_database where not datistemplate and datallowconn order by 1",
        &[],
    )?
    .into_iter()
    .map(|r| r.get(0))
    .collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn identifiers_are_quoted() {
        assert_eq!(super::ident("app"), "\"app\"");
        assert_eq!(super::ident("a\"b"), "\"a\"\"b\"");
    }
}

/// The databases pgtwig knows a branch holds, kept in `databases.json` beside its `data/`
/// so that making a branch need not start it to learn whether the app's database is there:
/// the root records what it was made with, a clone inherits its parent's record, an import
/// and [`LocalBackend::ensure_database`](crate::LocalBackend::ensure_database) add theirs. A
/// branch without a record (made by an older pgtwig, or by a build that keeps none) is
/// unknown, and the caller checks on the running server.
pub mod known {
    use std::path::Path;

    const FILE: &str = "databases.json";

    /// The record in branch (or build) folder `dir`; None when there is none.
    pub fn read(dir: &Path) -> Option<Vec<String>> {
        let text = std::fs::read_to_string(dir.join(FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Adds `databases` to the record in `dir` (made when missing).
    pub fn record(dir: &Path, databases: &[&str]) -> std::io::Result<()> {
        let mut known = read(dir).unwrap_or_default();
        for d in databases {
            if !known.iter().any(|k| k == d) {
                known.push(d.to_string());
            }
        }
        known.sort();
        let text = serde_json::to_string(&known).map_err(std::io::Error::other)?;
        pgtwig_core::fsutil::write_atomic(&dir.join(FILE), text.as_bytes())
    }

    /// Copies the record of branch folder `from` into build folder `to`, if there is one.
    pub fn inherit(from: &Path, to: &Path) -> std::io::Result<()> {
        match read(from) {
            Some(known) => record(to, &known.iter().map(String::as_str).collect::<Vec<_>>()),
            None => Ok(()),
        }
    }
}
