//! Putting what was observed together: each logged statement with its rows (by query id),
//! the locks it took (by session and time) and the relations it rewrote.

use std::collections::HashMap;
use std::time::SystemTime;

use crate::catalog::Catalog;
use crate::observe::{LockSamples, LoggedStatement};
use crate::{Rewrite, Statement, StatementLock};

/// The DDL and DML statements (with locks and rewrites), how many others ran, and the rewrites.
pub fn assemble(
    logged: &[LoggedStatement],
    samples: &LockSamples,
    rows_by_query: &HashMap<i64, (i64, i64)>,
    before: &Catalog,
    after: &Catalog,
) -> (Vec<Statement>, usize, Vec<Rewrite>) {
    let mut statements = Vec::new();
    let mut pids_and_times = Vec::new();
    let mut other = 0;
    for s in logged {
        let Some(kind) = classify(&s.text) else {
            other += 1;
            continue;
        };
        let (rows, calls) = match rows_by_query.get(&s.query_id) {
            // Utility statements count 0 rows unless they move data (CREATE TABLE AS, COPY).
            Some((r, c)) if s.query_id != 0 && (kind == "dml" || *r > 0) => (Some(*r), Some(*c)),
            _ => (None, None),
        };
        statements.push(Statement {
            kind,
            text: s.text.clone(),
            started: humantime::format_rfc3339_millis(s.start).to_string(),
            duration_ms: s.duration.as_secs_f64() * 1000.0,
            rows,
            calls,
            locks: Vec::new(),
            rewrote: Vec::new(),
            error: s.error.clone(),
        });
        pids_and_times.push((s.pid, s.start, s.end));
    }

    // Each lock to the statement of its session that was running (or next finished) when
    // it was first seen: the one that took it.
    let name_of = |oid: u32| {
        after
            .name(oid)
            .or_else(|| before.name(oid))
            .map(str::to_string)
            .unwrap_or_else(|| format!("relation {oid} (made and dropped by the command)"))
    };
    let table_of = |oid: u32| {
        let rel = after
            .relations
            .get(&oid)
            .or_else(|| before.relations.get(&oid));
        rel.and_then(|r| r.table).unwrap_or(oid)
    };
    // The last statement of that session to start before the lock was first seen: the one
    // running then, or (when the lock outlived it, in its transaction) the one before.
    let owner = |pid: i32, at: SystemTime| {
        pids_and_times
            .iter()
            .rposition(|(p, start, _)| *p == pid && *start <= at)
    };
    let mut lock_owner: HashMap<u32, usize> = HashMap::new();
    for l in &samples.locks {
        // Relations the command made (a new index, the new heap of a rewrite) hold no one up.
        if !before.relations.contains_key(&l.relation) {
            continue;
        }
        let Some(i) = owner(l.pid, l.first_seen) else {
            continue;
        };
        if l.mode == "AccessExclusiveLock" {
            lock_owner.entry(l.relation).or_insert(i);
        }
        statements[i].locks.push(StatementLock {
            relation: name_of(l.relation),
            mode: l.mode.clone(),
            held_ms: l.held().as_millis() as u64,
            table_rows: before.rows(table_of(l.relation)),
        });
    }

    let mut rewrites = Vec::new();
    for (oid, old) in &before.relations {
        let Some(new) = after.relations.get(oid) else {
            continue;
        };
        if old.relfilenode == new.relfilenode || old.relfilenode == 0 {
            continue;
        }
        let kind = match old.kind {
            'i' => "index",
            'm' => "materialized view",
            _ => "table",
        };
        let rows = before.rows(old.table.unwrap_or(*oid));
        // The longest DDL statement naming the table (a rewrite takes time in proportion to
        // its rows), else the one that took ACCESS EXCLUSIVE on it first.
        let table = old.table.unwrap_or(*oid);
        let table_name = before.name(table).unwrap_or(&old.name);
        let short = table_name.rsplit('.').next().unwrap_or("").to_lowercase();
        let statement = statements
            .iter()
            .enumerate()
            .filter(|(_, s)| s.kind == "ddl" && s.text.to_lowercase().contains(&short))
            .max_by(|(_, a), (_, b)| a.duration_ms.total_cmp(&b.duration_ms))
            .map(|(i, _)| i)
            .or_else(|| lock_owner.get(&table).copied());
        if let Some(i) = statement {
            statements[i].rewrote.push(old.name.clone());
        }
        rewrites.push(Rewrite {
            relation: old.name.clone(),
            kind,
            rows,
            relfilenode_before: old.relfilenode,
            relfilenode_after: new.relfilenode,
            statement,
        });
    }

    (statements, other, rewrites)
}

/// "ddl", "dml", or None for everything else (queries, transaction control, settings).
fn classify(text: &str) -> Option<&'static str> {
    let mut t = text.trim_start();
    // Leading comments (framework banners) and parentheses.
    loop {
        if let Some(rest) = t.strip_prefix("--") {
            t = rest.split_once('\n').map_or("", |(_, r)| r).trim_start();
        } else if let Some(rest) = t.strip_prefix("/*") {
            t = rest.split_once("*/").map_or("", |(_, r)| r).trim_start();
        } else if let Some(rest) = t.strip_prefix('(') {
            t = rest.trim_start();
        } else {
            break;
        }
    }
    let word: String = t
        .chars()
        .take_while(|c| c.is_ascii_alphabetic())
        .collect::<String>()
        .to_ascii_uppercase();
    match word.as_str() {
        "CREATE" | "ALTER" | "DROP" | "TRUNCATE" | "COMMENT" | "GRANT" | "REVOKE" | "REINDEX"
        | "CLUSTER" | "VACUUM" | "REFRESH" | "DO" => Some("ddl"),
        "INSERT" | "UPDATE" | "DELETE" | "COPY" | "MERGE" => Some("dml"),
        "WITH" => {
            let l = t.to_ascii_uppercase();
            (l.contains("INSERT ") || l.contains("UPDATE ") || l.contains("DELETE "))
                .then_some("dml")
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::classify;

    #[test]
    fn classifies_statements_past_comments() {
        assert_eq!(
            classify("-- banner\n/* x */ ALTER TABLE t ADD c int"),
            Some("ddl")
        );
        assert_eq!(classify("create index concurrently i on t(a)"), Some("ddl"));
        assert_eq!(classify("(insert into t values (1))"), Some("dml"));
        assert_eq!(
            classify("WITH x AS (DELETE FROM t RETURNING 1) SELECT 1"),
            Some("dml")
        );
        assert_eq!(classify("with x as (select 1) select * from x"), None);
        assert_eq!(classify("BEGIN"), None);
        assert_eq!(classify("SET search_path = public"), None);
    }
}
