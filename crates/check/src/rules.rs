//! Rules in the spirit of squawk, judged on what the command really did to the clone's real
//! data: the catalog before and after, the statements logged and the locks sampled.

use pgtwig_core::check::{CheckConfig, Level, Rule};
use serde::Serialize;

use crate::catalog::Catalog;
use crate::{Rewrite, Statement};

#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub rule: &'static str,
    pub level: Level,
    /// `schema.table` (or `schema.table.column`).
    pub relation: String,
    pub message: String,
    /// Index into the report's statements, when known.
    pub statement: Option<usize>,
}

fn rows_text(rows: f64) -> String {
    let n = rows.round() as u64;
    if rows <= 30_000.0 {
        format!("{n} rows")
    } else {
        format!("about {n} rows")
    }
}

fn mentions(text: &str, word: &str) -> bool {
    let lower = text.to_lowercase();
    let word = word.to_lowercase();
    lower.contains(&word) || lower.contains(&format!("\"{word}\""))
}

/// The unqualified name of `schema.name`.
fn short(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(_, n)| n)
}

/// The first DDL statement whose text mentions `name` and passes `also`.
fn statement_naming(
    statements: &[Statement],
    name: &str,
    also: impl Fn(&str) -> bool,
) -> Option<usize> {
    statements
        .iter()
        .position(|s| s.kind == "ddl" && mentions(&s.text, short(name)) && also(&s.text))
}

pub fn judge(
    config: &CheckConfig,
    before: &Catalog,
    after: &Catalog,
    statements: &[Statement],
    rewrites: &[Rewrite],
) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut add = |rule: Rule, relation: &str, message: String, statement: Option<usize>| {
        let level = config.level(rule);
        if level != Level::Off {
            out.push(Finding {
                rule: rule.name(),
                level,
                relation: relation.to_string(),
                message,
                statement,
            });
        }
    };

    for r in rewrites
        .iter()
        .filter(|r| r.kind == "table" && r.rows > 0.0)
    {
        add(
            Rule::TableRewrite,
            &r.relation,
            format!(
                "rewrote {} ({}): the table is locked ACCESS EXCLUSIVE while every row is copied",
                r.relation,
                rows_text(r.rows)
            ),
            r.statement,
        );
    }

    for (i, s) in statements.iter().enumerate() {
        for l in &s.locks {
            if l.mode == "AccessExclusiveLock"
                && l.held_ms as u128 > config.max_lock.as_millis()
                && l.table_rows > 0.0
            {
                add(
                    Rule::LongLock,
                    &l.relation,
                    format!(
                        "held ACCESS EXCLUSIVE on {} ({}) for at least {} ms (max_lock {} ms): reads and writes of it wait that long",
                        l.relation,
                        rows_text(l.table_rows),
                        l.held_ms,
                        config.max_lock.as_millis()
                    ),
                    Some(i),
                );
            }
        }
    }

    for index in after.relations.values().filter(|r| r.kind == 'i') {
        if before.relations.contains_key(&index.oid) {
            continue;
        }
        let Some(table) = index.table.filter(|t| before.rows(*t) > 0.0) else {
            continue;
        };
        let concurrent = |t: &str| t.to_lowercase().contains("concurrently");
        let creating = |t: &str| {
            let l = t.to_lowercase();
            l.contains("create") && l.contains("index")
        };
        // By its name (also a constraint's: ADD PRIMARY KEY / UNIQUE name their index), else
        // a CREATE INDEX on its table.
        let by_name = statement_naming(statements, &index.name, |_| true);
        let table_name = before.name(table).unwrap_or("?").to_string();
        let stmt = by_name.or_else(|| statement_naming(statements, &table_name, creating));
        let was_concurrent = stmt.is_some_and(|i| concurrent(&statements[i].text));
        // A constraint's index (ADD PRIMARY KEY / UNIQUE) is built the same blocking way.
        if !was_concurrent {
            add(
                Rule::IndexWithoutConcurrently,
                &table_name,
                format!(
                    "built index {} without CONCURRENTLY on {} ({}): writes to the table wait until it is done",
                    index.name,
                    table_name,
                    rows_text(before.rows(table))
                ),
                stmt,
            );
        }
    }

    for c in &after.constraints {
        if before.rows(c.table) <= 0.0 || before.constraint(c.table, &c.name).is_some() {
            continue;
        }
        if !c.validated {
            continue; // NOT VALID, not validated yet: the safe first step
        }
        let validated_later = statements
            .iter()
            .any(|s| mentions(&s.text, "validate constraint") && mentions(&s.text, &c.name));
        if validated_later {
            continue;
        }
        let table = before.name(c.table).unwrap_or("?");
        let what = if c.kind == 'f' {
            "foreign key"
        } else {
            "CHECK constraint"
        };
        add(
            Rule::ConstraintWithoutNotValid,
            table,
            format!(
                "added {what} {} on {table} ({}) without NOT VALID: every row is checked under a lock that blocks writes; add it NOT VALID, then VALIDATE CONSTRAINT",
                c.name,
                rows_text(before.rows(c.table))
            ),
            statement_naming(statements, &c.name, |_| true),
        );
    }

    for ((table, attnum), col) in &after.columns {
        let Some(old) = before.columns.get(&(*table, *attnum)) else {
            continue;
        };
        let rows = before.rows(*table);
        let table_name = before.name(*table).unwrap_or("?");
        if col.not_null && !old.not_null && rows > 0.0 {
            let check_proves = |cat: &Catalog| {
                cat.constraints.iter().any(|c| {
                    c.table == *table
                        && c.kind == 'c'
                        && c.validated
                        && c.definition
                            .to_lowercase()
                            .contains(&format!("{} is not null", col.name.to_lowercase()))
                })
            };
            let validated = statements.iter().any(|s| {
                mentions(&s.text, "validate constraint") && mentions(&s.text, short(table_name))
            });
            if !check_proves(before) && !check_proves(after) && !validated {
                add(
                    Rule::SetNotNull,
                    table_name,
                    format!(
                        "SET NOT NULL on {table_name}.{} ({}) scans the table under ACCESS EXCLUSIVE; first add CHECK ({} IS NOT NULL) NOT VALID and VALIDATE it",
                        col.name,
                        rows_text(rows),
                        col.name
                    ),
                    statement_naming(statements, table_name, |t| mentions(t, "not null")),
                );
            }
        }
        if col.name != old.name {
            add(
                Rule::RenameColumn,
                table_name,
                format!(
                    "renamed column {table_name}.{} to {}: code deployed before this migration still reads \"{}\"",
                    old.name, col.name, old.name
                ),
                statement_naming(statements, table_name, |t| mentions(t, "rename")),
            );
        }
    }

    for ((table, attnum), col) in &before.columns {
        if after.columns.contains_key(&(*table, *attnum)) {
            continue;
        }
        let rows = before.rows(*table);
        let table_name = before.name(*table).unwrap_or("?");
        if !after.relations.contains_key(table) {
            continue; // the whole table went: reported below
        }
        let non_null = rows * (1.0 - col.null_frac.unwrap_or(0.0));
        if non_null >= 0.5 {
            add(
                Rule::DropWithData,
                table_name,
                format!(
                    "dropped column {table_name}.{} holding {} non-null values",
                    col.name,
                    rows_text(non_null).replace(" rows", "")
                ),
                statement_naming(statements, table_name, |t| mentions(t, "drop")),
            );
        }
    }
    for rel in before.relations.values() {
        if matches!(rel.kind, 'r' | 'm')
            && rel.rows > 0.0
            && !after.relations.contains_key(&rel.oid)
        {
            add(
                Rule::DropWithData,
                &rel.name,
                format!("dropped {} holding {}", rel.name, rows_text(rel.rows)),
                statement_naming(statements, &rel.name, |t| mentions(t, "drop")),
            );
        }
    }
    out
}
