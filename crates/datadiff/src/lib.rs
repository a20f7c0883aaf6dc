//! Row-level differences between two database branches, at a cost
//! proportional to what changed.
//!
//! Both sides are read in one REPEATABLE READ snapshot each. On copy-on-write
//! clones the server is made to write its dirty buffers (CHECKPOINT), then the
//! extent maps of each table's segment files say which heap blocks are still
//! stored at the same physical place in both branches: those are the same
//! bytes and are skipped. Only the other blocks are read (TID range scans, the
//! same block ranges in both branches); since the skipped blocks hold the
//! same rows in both, the table's difference is the difference of the rows
//! read. Without extent maps (a full copy, Neon) or with `full`, every table
//! is read whole in key order and compared by row hash.
//!
//! Rows are compared by primary key (added, removed, changed, with the changed
//! columns in the samples); a table without one, as a multiset of rows.

pub mod blocks;
mod catalog;
mod compare;
pub mod render;

use std::path::Path;

use postgres::{Client, IsolationLevel, Transaction};
use serde::Serialize;
use serde_json::Value;

use crate::blocks::{blocks_in, differing_blocks, file_map};
use crate::catalog::Table;
use crate::compare::{Plan, Rows};

/// One branch's side of the diff.
pub struct Side<'a> {
    /// The branch's name, for messages.
    pub label: &'a str,
    pub client: &'a mut Client,
    /// The cluster's data directory, when its files can be read here (local
    /// branches): what lets the diff skip shared blocks.
    pub data_dir: Option<&'a Path>,
}

#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Only this table (`schema.name`, or `name` in any schema).
    pub table: Option<String>,
    /// Sample rows per table.
    pub limit: usize,
    /// Compare every row even where blocks are shared.
    pub full: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    /// Blocks shared by both branches' files were skipped.
    Extents,
    /// Every row was read and compared by hash, in key order.
    Full,
}

#[derive(Debug, Clone, Serialize)]
pub struct DataDiff {
    pub method: Method,
    /// Why the extent-aware comparison did not run, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub why_full: Option<String>,
    /// Tables compared (including those without a difference).
    pub tables_compared: usize,
    /// Tables that differ.
    pub tables: Vec<TableDiff>,
}

impl DataDiff {
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct TableDiff {
    /// `schema.name`.
    pub table: String,
    pub method: Method,
    /// Primary key columns rows were matched by; empty: compared as multisets.
    pub key: Vec<String>,
    /// `"a"` or `"b"` when the table exists in one branch only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub only_in: Option<&'static str>,
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    /// Heap blocks read and the table's size in blocks (extent-aware diff).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks_read: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks_total: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    pub samples: Vec<Value>,
}

impl TableDiff {
    pub fn is_empty(&self) -> bool {
        self.added == 0 && self.removed == 0 && self.changed == 0
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--table {pattern}: no table of that name in \"{a}\" or \"{b}\"{}", known_list(.known))]
    NoSuchTable {
        pattern: String,
        a: String,
        b: String,
        known: Vec<String>,
    },
    #[error("cannot read every row of {} in branch \"{branch}\" (no SELECT privilege, or row-level security hides rows from this role); grant SELECT (and BYPASSRLS), or compare other tables with --table", .tables.join(", "))]
    Unreadable { branch: String, tables: Vec<String> },
    #[error("{what} in branch \"{branch}\": {source}")]
    Query {
        what: String,
        branch: String,
        #[source]
        source: postgres::Error,
    },
}

fn known_list(known: &[String]) -> String {
    if known.is_empty() {
        "; the database has no tables".into()
    } else {
        format!(" (tables: {})", known.join(", "))
    }
}

fn snapshot<'c>(side: &'c mut Side<'_>) -> Result<(Transaction<'c>, Vec<Table>), Error> {
    let query = |source| Error::Query {
        what: "reading the list of tables".into(),
        branch: side.label.to_string(),
        source,
    };
    let mut tx = side
        .client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(query)?;
    let tables = catalog::tables(&mut tx).map_err(query)?;
    Ok((tx, tables))
}

/// How `b`'s rows differ from `a`'s.
pub fn diff(mut a: Side<'_>, mut b: Side<'_>, options: &Options) -> Result<DataDiff, Error> {
    let (label_a, label_b) = (a.label.to_string(), b.label.to_string());
    let (dir_a, dir_b) = (a.data_dir, b.data_dir);
    let (mut ta, tables_a) = snapshot(&mut a)?;
    let (mut tb, tables_b) = snapshot(&mut b)?;
    let pick = |tables: Vec<Table>| -> Vec<Table> {
        match &options.table {
            Some(p) => tables
                .into_iter()
                .filter(|t| catalog::matches(t, p))
                .collect(),
            None => tables,
        }
    };
    let known: Vec<String> = {
        let mut k: Vec<String> = tables_a
            .iter()
            .chain(&tables_b)
            .map(|t| t.name.clone())
            .collect();
        k.sort();
        k.dedup();
        k
    };
    let (tables_a, tables_b) = (pick(tables_a), pick(tables_b));
    if let Some(pattern) = &options.table {
        if tables_a.is_empty() && tables_b.is_empty() {
            return Err(Error::NoSuchTable {
                pattern: pattern.clone(),
                a: label_a,
                b: label_b,
                known,
            });
        }
    }
    for (tables, branch) in [(&tables_a, &label_a), (&tables_b, &label_b)] {
        let unreadable: Vec<String> = tables
            .iter()
            .filter(|t| !t.readable)
            .map(|t| t.name.clone())
            .collect();
        if !unreadable.is_empty() {
            return Err(Error::Unreadable {
                branch: branch.clone(),
                tables: unreadable,
            });
        }
    }

    let mut why_full = None;
    let mut dirs = match (dir_a, dir_b) {
        _ if options.full => {
            why_full = Some("--full".to_string());
            None
        }
        (Some(x), Some(y)) => Some((x, y)),
        _ => {
            why_full = Some("the branches' files are not on this machine (Neon)".to_string());
            None
        }
    };
    if dirs.is_some() {
        // Block numbers are computed for PostgreSQL's default page and segment sizes.
        for (tx, branch) in [(&mut ta, &label_a), (&mut tb, &label_b)] {
            let sizes = tx
                .query_one(
                    "SELECT current_setting('block_size')::int8, \
                            current_setting('segment_size', true)",
                    &[],
                )
                .map_err(|source| Error::Query {
                    what: "reading block_size".into(),
                    branch: branch.clone(),
                    source,
                })?;
            let (block, segment): (i64, Option<String>) = (sizes.get(0), sizes.get(1));
            if block as u64 != blocks::BLOCK_SIZE || segment.as_deref() != Some("1GB") {
                why_full = Some(format!(
                    "\"{branch}\" was built with block_size {block}, segment_size {}",
                    segment.unwrap_or_default()
                ));
                dirs = None;
            }
        }
    }
    if dirs.is_some() {
        // Dirty buffers written and fsynced: the extent maps show every change
        // made before the snapshots (later ones are invisible to them anyway).
        for (tx, branch) in [(&mut ta, &label_a), (&mut tb, &label_b)] {
            let savepoint =
                |tx: &mut Transaction<'_>| tx.batch_execute("SAVEPOINT pgtwig_checkpoint");
            savepoint(tx).map_err(|source| Error::Query {
                what: "starting the diff".into(),
                branch: branch.clone(),
                source,
            })?;
            if let Err(e) = tx.batch_execute("CHECKPOINT") {
                why_full = Some(format!("CHECKPOINT failed in \"{branch}\": {e}"));
                dirs = None;
                tx.batch_execute("ROLLBACK TO SAVEPOINT pgtwig_checkpoint")
                    .map_err(|source| Error::Query {
                        what: "after a failed CHECKPOINT".into(),
                        branch: branch.clone(),
                        source,
                    })?;
                break;
            }
        }
    }
    let mut out = DataDiff {
        method: Method::Full,
        why_full: None,
        tables_compared: 0,
        tables: Vec::new(),
    };
    let mut any_skipped = false;
    let mut any_blocks = false;
    let mut names: Vec<&String> = tables_a.iter().chain(&tables_b).map(|t| &t.name).collect();
    names.sort();
    names.dedup();
    for name in names {
        let in_a = tables_a.iter().find(|t| &t.name == name);
        let in_b = tables_b.iter().find(|t| &t.name == name);
        let query = |branch: &str| {
            let (what, branch) = (format!("comparing {name}"), branch.to_string());
            move |source| Error::Query {
                what,
                branch,
                source,
            }
        };
        out.tables_compared += 1;
        let table = match (in_a, in_b) {
            (Some(t), None) => {
                let c = compare::one_side(&mut ta, t, "removed", options.limit)
                    .map_err(query(&label_a))?;
                one_sided(t, "a", c)
            }
            (None, Some(t)) => {
                let c = compare::one_side(&mut tb, t, "added", options.limit)
                    .map_err(query(&label_b))?;
                one_sided(t, "b", c)
            }
            (Some(x), Some(y)) => {
                let plan = plan(x, y);
                let mut note = (plan.columns.len() < x.columns.len().max(y.columns.len()))
                    .then(|| format!("columns differ; compared {}", plan.columns.join(", ")));
                let mut ranges = None;
                if let Some((da, db)) = dirs {
                    if x.persistence != "p" || y.persistence != "p" {
                        note = Some(
                            "unlogged: read whole (a checkpoint does not write its buffers)".into(),
                        );
                    } else if let (Some(pa), Some(pb)) = (&x.relpath, &y.relpath) {
                        match (file_map(da, pa), file_map(db, pb)) {
                            (Ok(Some(ma)), Ok(Some(mb))) => {
                                ranges = Some(differing_blocks(&ma, &mb))
                            }
                            (Ok(None), _) | (_, Ok(None)) => {
                                why_full = Some("the file system has no extent map".into());
                                dirs = None;
                            }
                            (Err(e), _) | (_, Err(e)) => {
                                why_full = Some(format!("cannot read the relation files: {e}"));
                                dirs = None;
                            }
                        }
                    }
                }
                let (rows, read, total, method) = match &ranges {
                    Some((r, total)) => {
                        let read = blocks_in(r, *total);
                        any_blocks |= *total > 0;
                        any_skipped |= read < *total;
                        // Mostly changed (a rewrite, VACUUM FULL, a full copy): the
                        // ordered whole-table comparison reads no more and sorts less.
                        if read * 2 > *total {
                            (Rows::All, Some(*total), Some(*total), Method::Full)
                        } else {
                            (Rows::Blocks(r), Some(read), Some(*total), Method::Extents)
                        }
                    }
                    None => (Rows::All, None, None, Method::Full),
                };
                let counts = if matches!(&ranges, Some((r, _)) if r.is_empty()) {
                    compare::Counts::default()
                } else {
                    compare::compare(&mut ta, &mut tb, (x, y), &plan, &rows, options.limit)
                        .map_err(query(&format!("{label_a}\" and \"{label_b}")))?
                };
                TableDiff {
                    table: name.clone(),
                    method,
                    key: plan.key.iter().map(|(k, _)| k.clone()).collect(),
                    only_in: None,
                    added: counts.added,
                    removed: counts.removed,
                    changed: counts.changed,
                    blocks_read: read,
                    blocks_total: total,
                    note,
                    samples: counts.samples,
                }
            }
            (None, None) => unreachable!("listed from the two sides"),
        };
        if !table.is_empty() {
            out.tables.push(table);
        }
    }
    if any_skipped {
        out.method = Method::Extents;
    } else if why_full.is_none() && any_blocks {
        why_full = Some("no block is shared by the two branches' files (a full copy?)".into());
    } else if why_full.is_none() {
        // Nothing to read at all: empty tables only.
        out.method = Method::Extents;
    }
    out.why_full = if out.method == Method::Full {
        why_full
    } else {
        None
    };
    Ok(out)
}

fn one_sided(t: &Table, side: &'static str, c: compare::Counts) -> TableDiff {
    TableDiff {
        table: t.name.clone(),
        method: Method::Full,
        key: t.primary_key.clone(),
        only_in: Some(side),
        added: c.added,
        removed: c.removed,
        changed: 0,
        blocks_read: None,
        blocks_total: None,
        note: None,
        samples: c.samples,
    }
}

/// Compare the columns both sides have; by primary key when both have the same one.
fn plan(a: &Table, b: &Table) -> Plan {
    let columns: Vec<String> = a
        .columns
        .iter()
        .filter(|c| b.column(&c.name).is_some())
        .map(|c| c.name.clone())
        .collect();
    let same_key = !a.primary_key.is_empty()
        && a.primary_key == b.primary_key
        && a.primary_key.iter().all(|k| columns.contains(k));
    let key = if same_key {
        a.primary_key
            .iter()
            .map(|k| {
                let integer = a.column(k).is_some_and(|c| c.integer)
                    && b.column(k).is_some_and(|c| c.integer);
                (k.clone(), integer)
            })
            .collect()
    } else {
        Vec::new()
    };
    Plan { columns, key }
}
