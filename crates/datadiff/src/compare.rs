//! One table compared across two branches: both sides' rows (all of them, or
//! only those in the block ranges that differ) streamed in the same key
//! order and merged, by primary key (a row hash per key) or, without one, as
//! multisets of rows.

use std::cmp::Ordering;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::Transaction;
use serde_json::{json, Map, Value};

use crate::blocks::BlockRange;
use crate::catalog::{quote_ident, Table};

/// Which rows of the table are read.
pub enum Rows<'r> {
    All,
    /// Only the tuples in these heap blocks (TID range scans).
    Blocks(&'r [BlockRange]),
}

/// How the two sides are lined up.
pub struct Plan {
    /// Columns in both sides, in side a's order: what is compared.
    pub columns: Vec<String>,
    /// Primary key columns (with `integer`: ordered as numbers); empty: multiset.
    pub key: Vec<(String, bool)>,
}

#[derive(Debug, Default)]
pub struct Counts {
    pub added: u64,
    pub removed: u64,
    pub changed: u64,
    pub samples: Vec<Value>,
}

fn source(table: &Table, rows: &Rows) -> String {
    match rows {
        Rows::All => table.sql_name.clone(),
        Rows::Blocks(ranges) => {
            let parts: Vec<String> = ranges
                .iter()
                .map(|r| {
                    let upper = r
                        .end
                        .map(|e| format!(" AND ctid < '({e},0)'"))
                        .unwrap_or_default();
                    format!(
                        "SELECT * FROM {} WHERE ctid >= '({},0)'{upper}",
                        table.sql_name, r.start
                    )
                })
                .collect();
            format!("({})", parts.join(" UNION ALL "))
        }
    }
}

fn select_list(plan: &Plan) -> String {
    plan.columns
        .iter()
        .map(|c| format!("s.{}", quote_ident(c)))
        .collect::<Vec<_>>()
        .join(", ")
}

fn cmp_keys(key: &[(String, bool)], a: &[String], b: &[String]) -> Ordering {
    for (i, (_, integer)) in key.iter().enumerate() {
        let o = if *integer {
            match (a[i].parse::<i64>(), b[i].parse::<i64>()) {
                (Ok(x), Ok(y)) => x.cmp(&y),
                _ => a[i].as_bytes().cmp(b[i].as_bytes()),
            }
        } else {
            a[i].as_bytes().cmp(b[i].as_bytes())
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// Compare `table` (as `ta` sees it) with `tb`'s, reading `rows` of each.
pub fn compare(
    ta: &mut Transaction<'_>,
    tb: &mut Transaction<'_>,
    (table_a, table_b): (&Table, &Table),
    plan: &Plan,
    rows: &Rows,
    limit: usize,
) -> Result<Counts, postgres::Error> {
    if plan.key.is_empty() {
        return compare_multisets(ta, tb, (table_a, table_b), plan, rows, limit);
    }
    let order: Vec<String> = plan
        .key
        .iter()
        .map(|(k, integer)| {
            if *integer {
                format!("s.{}", quote_ident(k))
            } else {
                format!("s.{}::text COLLATE \"C\"", quote_ident(k))
            }
        })
        .collect();
    let keys: Vec<String> = plan
        .key
        .iter()
        .map(|(k, _)| format!("s.{}::text", quote_ident(k)))
        .collect();
    let sql = |t: &Table| {
        format!(
            "SELECT {}, md5(ROW({})::text) FROM {} s ORDER BY {}",
            keys.join(", "),
            select_list(plan),
            source(t, rows),
            order.join(", ")
        )
    };
    let n = plan.key.len();
    let read = |row: postgres::Row| -> (Vec<String>, String) {
        ((0..n).map(|i| row.get(i)).collect(), row.get(n))
    };
    let no_params: Vec<String> = Vec::new();
    // An index scan in key order rather than sorting the whole table.
    let whole = matches!(rows, Rows::All);
    if whole {
        ta.batch_execute("SET LOCAL enable_sort = off")?;
        tb.batch_execute("SET LOCAL enable_sort = off")?;
    }
    let mut counts = Counts::default();
    // (change, key) of the rows to show, fetched once the merge is done.
    let mut pending: Vec<(&'static str, Vec<String>)> = Vec::new();
    {
        let mut ia = ta
            .query_raw(&sql(table_a), &no_params)?
            .map(|r| Ok(read(r)));
        let mut ib = tb
            .query_raw(&sql(table_b), &no_params)?
            .map(|r| Ok(read(r)));
        let (mut a, mut b) = (ia.next()?, ib.next()?);
        loop {
            let which = match (&a, &b) {
                (None, None) => break,
                (Some(_), None) => Ordering::Less,
                (None, Some(_)) => Ordering::Greater,
                (Some((ka, _)), Some((kb, _))) => cmp_keys(&plan.key, ka, kb),
            };
            match which {
                Ordering::Less => {
                    counts.removed += 1;
                    if pending.len() < limit {
                        pending.push(("removed", a.take().unwrap().0));
                    }
                    a = ia.next()?;
                }
                Ordering::Greater => {
                    counts.added += 1;
                    if pending.len() < limit {
                        pending.push(("added", b.take().unwrap().0));
                    }
                    b = ib.next()?;
                }
                Ordering::Equal => {
                    let (ka, ha) = a.take().unwrap();
                    if b.as_ref().unwrap().1 != ha {
                        counts.changed += 1;
                        if pending.len() < limit {
                            pending.push(("changed", ka));
                        }
                    }
                    a = ia.next()?;
                    b = ib.next()?;
                }
            }
        }
    }
    if whole {
        ta.batch_execute("SET LOCAL enable_sort = on")?;
        tb.batch_execute("SET LOCAL enable_sort = on")?;
    }
    for (change, key) in pending {
        let row_a = if change == "added" {
            None
        } else {
            row_by_key(ta, table_a, plan, &key)?
        };
        let row_b = if change == "removed" {
            None
        } else {
            row_by_key(tb, table_b, plan, &key)?
        };
        counts
            .samples
            .push(keyed_sample(change, plan, &key, row_a, row_b));
    }
    Ok(counts)
}

fn keyed_sample(
    change: &str,
    plan: &Plan,
    key: &[String],
    row_a: Option<Value>,
    row_b: Option<Value>,
) -> Value {
    let key_obj: Map<String, Value> = plan
        .key
        .iter()
        .zip(key)
        .map(|((k, _), v)| {
            let from_row = row_a
                .as_ref()
                .or(row_b.as_ref())
                .and_then(|r| r.get(k))
                .cloned();
            (
                k.clone(),
                from_row.unwrap_or_else(|| Value::String(v.clone())),
            )
        })
        .collect();
    match (change, row_a, row_b) {
        ("changed", Some(Value::Object(a)), Some(Value::Object(b))) => {
            let columns: Map<String, Value> = plan
                .columns
                .iter()
                .filter(|c| a.get(*c) != b.get(*c))
                .map(|c| (c.clone(), json!({"from": a.get(c), "to": b.get(c)})))
                .collect();
            json!({"change": "changed", "key": key_obj, "columns": columns})
        }
        (_, a, b) => json!({"change": change, "key": key_obj, "row": b.or(a)}),
    }
}

/// The compared columns of the row with primary key `key`, as JSON.
fn row_by_key(
    tx: &mut Transaction<'_>,
    table: &Table,
    plan: &Plan,
    key: &[String],
) -> Result<Option<Value>, postgres::Error> {
    let conditions: Vec<String> = plan
        .key
        .iter()
        .enumerate()
        .map(|(i, (k, _))| {
            let type_name = table.column(k).map_or("text", |c| c.type_name.as_str());
            format!("s.{} = ${}::text::{type_name}", quote_ident(k), i + 1)
        })
        .collect();
    let sql = format!(
        "SELECT to_jsonb(pgtwig_row)::text FROM (SELECT {} FROM {} s WHERE {}) pgtwig_row",
        select_list(plan),
        table.sql_name,
        conditions.join(" AND ")
    );
    let params: Vec<&(dyn ToSql + Sync)> = key.iter().map(|k| k as &(dyn ToSql + Sync)).collect();
    let row = tx.query_opt(&sql, &params)?;
    Ok(row.and_then(|r| serde_json::from_str(&r.get::<_, String>(0)).ok()))
}

/// Tables without a primary key: each distinct row with how many times it occurs.
fn compare_multisets(
    ta: &mut Transaction<'_>,
    tb: &mut Transaction<'_>,
    (table_a, table_b): (&Table, &Table),
    plan: &Plan,
    rows: &Rows,
    limit: usize,
) -> Result<Counts, postgres::Error> {
    let sql = |t: &Table| {
        format!(
            "SELECT j, count(*) FROM (SELECT to_jsonb(pgtwig_row)::text AS j FROM (SELECT {} FROM {} s) pgtwig_row) y \
             GROUP BY j ORDER BY j COLLATE \"C\"",
            select_list(plan),
            source(t, rows)
        )
    };
    let read = |row: postgres::Row| -> (String, i64) { (row.get(0), row.get(1)) };
    let no_params: Vec<String> = Vec::new();
    let mut counts = Counts::default();
    let sample = |counts: &mut Counts, change: &str, row: &str, n: i64| {
        if counts.samples.len() < limit {
            let row: Value = serde_json::from_str(row).unwrap_or(Value::String(row.into()));
            counts
                .samples
                .push(json!({"change": change, "row": row, "count": n}));
        }
    };
    let mut ia = ta
        .query_raw(&sql(table_a), &no_params)?
        .map(|r| Ok(read(r)));
    let mut ib = tb
        .query_raw(&sql(table_b), &no_params)?
        .map(|r| Ok(read(r)));
    let (mut a, mut b) = (ia.next()?, ib.next()?);
    loop {
        let which = match (&a, &b) {
            (None, None) => break,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((ja, _)), Some((jb, _))) => ja.as_bytes().cmp(jb.as_bytes()),
        };
        match which {
            Ordering::Less => {
                let (j, n) = a.take().unwrap();
                counts.removed += n as u64;
                sample(&mut counts, "removed", &j, n);
                a = ia.next()?;
            }
            Ordering::Greater => {
                let (j, n) = b.take().unwrap();
                counts.added += n as u64;
                sample(&mut counts, "added", &j, n);
                b = ib.next()?;
            }
            Ordering::Equal => {
                let ((j, na), (_, nb)) = (a.take().unwrap(), b.take().unwrap());
                if na > nb {
                    counts.removed += (na - nb) as u64;
                    sample(&mut counts, "removed", &j, na - nb);
                } else if nb > na {
                    counts.added += (nb - na) as u64;
                    sample(&mut counts, "added", &j, nb - na);
                }
                a = ia.next()?;
                b = ib.next()?;
            }
        }
    }
    Ok(counts)
}

/// A table in one branch only: all its rows added (or removed).
pub fn one_side(
    tx: &mut Transaction<'_>,
    table: &Table,
    change: &str,
    limit: usize,
) -> Result<Counts, postgres::Error> {
    let n: i64 = tx
        .query_one(&format!("SELECT count(*) FROM {}", table.sql_name), &[])?
        .get(0);
    let mut counts = Counts::default();
    if change == "added" {
        counts.added = n as u64;
    } else {
        counts.removed = n as u64;
    }
    let rows = tx.query(
        &format!(
            "SELECT to_jsonb(s)::text FROM {} s LIMIT {limit}",
            table.sql_name
        ),
        &[],
    )?;
    for r in rows {
        let row: Value = serde_json::from_str(&r.get::<_, String>(0)).unwrap_or(Value::Null);
        counts.samples.push(json!({"change": change, "row": row}));
    }
    Ok(counts)
}
