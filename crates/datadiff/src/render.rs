//! A data diff for people: plain text for the terminal, GitHub-flavoured
//! markdown for a pull request comment.

use serde_json::Value;

use crate::{DataDiff, Method, TableDiff};

fn method_line(diff: &DataDiff) -> String {
    match (diff.method, &diff.why_full) {
        (Method::Extents, _) => {
            "extent-aware: blocks both branches still share were skipped".into()
        }
        (Method::Full, Some(why)) => format!("full comparison of every row ({why})"),
        (Method::Full, None) => "full comparison of every row".into(),
    }
}

fn table_summary(t: &TableDiff) -> String {
    let by = if t.key.is_empty() {
        "no primary key: rows as a multiset".to_string()
    } else {
        format!("by {}", t.key.join(", "))
    };
    let only = match t.only_in {
        Some("a") => "; only in the first branch",
        Some(_) => "; only in the second branch",
        None => "",
    };
    let read = match (t.blocks_read, t.blocks_total) {
        (Some(r), Some(n)) if t.method == Method::Extents => format!("; read {r} of {n} blocks"),
        _ => String::new(),
    };
    let note = t
        .note
        .as_ref()
        .map(|n| format!("; {n}"))
        .unwrap_or_default();
    format!("{by}{only}{read}{note}")
}

/// A value as JSON, long ones cut (the JSON output has them whole).
fn short(v: &Value) -> String {
    const MAX: usize = 80;
    let s = v.to_string();
    if s.chars().count() <= MAX {
        return s;
    }
    let head: String = s.chars().take(MAX - 20).collect();
    format!("{head}… ({} characters)", s.chars().count())
}

/// One sample as a line: `~ id=3: name "a" → "b"`, `+ id=4: {...}`; the
/// key's columns in key order.
pub fn sample_line(sample: &Value, key_order: &[String]) -> String {
    let change = sample["change"].as_str().unwrap_or("?");
    let sign = match change {
        "added" => "+",
        "removed" => "-",
        _ => "~",
    };
    let key = match sample.get("key").and_then(Value::as_object) {
        Some(k) => key_order
            .iter()
            .map(|c| format!("{c}={}", short(k.get(c).unwrap_or(&Value::Null))))
            .collect::<Vec<_>>()
            .join(", "),
        None => String::new(),
    };
    let body = if let Some(cols) = sample.get("columns").and_then(Value::as_object) {
        cols.iter()
            .map(|(c, ft)| format!("{c} {} → {}", short(&ft["from"]), short(&ft["to"])))
            .collect::<Vec<_>>()
            .join(", ")
    } else {
        let times = match sample.get("count").and_then(Value::as_i64) {
            Some(n) if n > 1 => format!(" ×{n}"),
            _ => String::new(),
        };
        format!("{}{times}", short(&sample["row"]))
    };
    if key.is_empty() {
        format!("{sign} {body}")
    } else {
        format!("{sign} {key}: {body}")
    }
}

pub fn text(diff: &DataDiff, a: &str, b: &str) -> String {
    if diff.is_empty() {
        return format!(
            "No data differences between \"{a}\" and \"{b}\" ({} tables; {})\n",
            diff.tables_compared,
            method_line(diff)
        );
    }
    let mut out = format!("--- {a}\n+++ {b}\n({})\n", method_line(diff));
    for t in &diff.tables {
        out.push_str(&format!(
            "{}: {} added, {} removed, {} changed ({})\n",
            t.table,
            t.added,
            t.removed,
            t.changed,
            table_summary(t)
        ));
        for s in &t.samples {
            out.push_str(&format!("  {}\n", sample_line(s, &t.key)));
        }
    }
    out
}

fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

pub fn markdown(diff: &DataDiff, a: &str, b: &str, database: &str) -> String {
    let mut out = format!(
        "### Data diff: `{}` → `{}` (database `{}`)\n\n",
        cell(a),
        cell(b),
        cell(database)
    );
    if diff.is_empty() {
        out.push_str(&format!(
            "No data differences ({} tables; {}).\n",
            diff.tables_compared,
            method_line(diff)
        ));
        return out;
    }
    out.push_str(&format!("_{}_\n\n", method_line(diff)));
    out.push_str("| Table | Added | Removed | Changed | Compared |\n|---|---:|---:|---:|---|\n");
    for t in &diff.tables {
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            cell(&t.table),
            t.added,
            t.removed,
            t.changed,
            cell(&table_summary(t))
        ));
    }
    let with_samples: Vec<&TableDiff> = diff
        .tables
        .iter()
        .filter(|t| !t.samples.is_empty())
        .collect();
    if !with_samples.is_empty() {
        out.push_str("\n<details><summary>Sample rows</summary>\n\n");
        for t in with_samples {
            out.push_str(&format!("`{}`\n\n```diff\n", cell(&t.table)));
            for s in &t.samples {
                out.push_str(&sample_line(s, &t.key).replace("```", "` ` `"));
                out.push('\n');
            }
            out.push_str("```\n\n");
        }
        out.push_str("</details>\n");
    }
    out
}
