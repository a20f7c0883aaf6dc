//! The report for people (a terminal table) and for a pull request (GitHub-flavoured
//! markdown). JSON is the report's serde form.

use std::fmt::Write;

use pgtwig_core::check::Level;

use crate::CheckReport;

/// The statement's first line, at most `max` characters.
fn short_text(text: &str, max: usize) -> String {
    let one: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if one.chars().count() > max {
        let cut: String = one.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        one
    }
}

/// The command as a shell would take it back.
fn command_text(argv: &[String]) -> String {
    argv.iter()
        .map(|a| {
            let plain = !a.is_empty()
                && a.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c));
            if plain {
                a.clone()
            } else {
                format!("'{}'", a.replace('\'', "'\\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn locks_text(s: &crate::Statement) -> String {
    s.locks
        .iter()
        .map(|l| {
            let mode = l
                .mode
                .trim_end_matches("Lock")
                .chars()
                .fold(String::new(), |mut acc, c| {
                    if c.is_uppercase() && !acc.is_empty() {
                        acc.push(' ');
                    }
                    acc.push(c.to_ascii_uppercase());
                    acc
                });
            format!("{mode} {} ≥{} ms", l.relation, l.held_ms)
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn rows_text(s: &crate::Statement) -> String {
    match (s.rows, s.calls) {
        (Some(r), Some(c)) if c > 1 => format!("{r} ({c} calls)"),
        (Some(r), _) => r.to_string(),
        _ => "-".into(),
    }
}

fn resolution(r: &CheckReport) -> String {
    format!(
        "locks sampled every {} ms ({} samples, longest gap {} ms): held times are lower bounds, and a lock held for less than that may not show",
        r.lock_sampling.interval_ms, r.lock_sampling.samples, r.lock_sampling.worst_gap_ms
    )
}

fn level(l: Level) -> &'static str {
    match l {
        Level::Fail => "FAIL",
        Level::Warn => "warn",
        Level::Off => "off",
    }
}

pub fn human(r: &CheckReport) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pgtwig check: `{}` on a clone of \"{}\" (database \"{}\"), {} ms",
        command_text(&r.command),
        r.branch,
        r.database,
        r.duration_ms
    );
    if r.statements.is_empty() {
        let _ = writeln!(
            out,
            "No DDL or DML statements ran ({} other statements).",
            r.other_statements
        );
    } else {
        let rows: Vec<[String; 6]> = r
            .statements
            .iter()
            .enumerate()
            .map(|(i, s)| {
                [
                    (i + 1).to_string(),
                    short_text(&s.text, 60),
                    format!("{:.1}", s.duration_ms),
                    rows_text(s),
                    if s.rewrote.is_empty() {
                        "-".into()
                    } else {
                        s.rewrote.join(", ")
                    },
                    if s.locks.is_empty() {
                        "-".into()
                    } else {
                        locks_text(s)
                    },
                ]
            })
            .collect();
        let head = ["#", "statement", "ms", "rows", "rewrote", "locks held"];
        let mut width = head.map(|h| h.chars().count());
        for row in &rows {
            for (w, c) in width.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |cells: &[String]| {
            cells
                .iter()
                .zip(width)
                .map(|(c, w)| format!("{c:<w$}"))
                .collect::<Vec<_>>()
                .join("  ")
                .trim_end()
                .to_string()
        };
        let _ = writeln!(out, "{}", line(&head.map(String::from)));
        for row in &rows {
            let _ = writeln!(out, "{}", line(row));
        }
        let _ = writeln!(
            out,
            "({} other statements: queries, transaction control, settings)",
            r.other_statements
        );
    }
    let _ = writeln!(out, "{}", resolution(r));
    if r.rows_source.is_none() {
        let _ = writeln!(out, "rows affected not recorded: pg_stat_statements does not ship with these server binaries");
    }
    if r.findings.is_empty() {
        let _ = writeln!(out, "No findings.");
    } else {
        let _ = writeln!(out, "Findings:");
        for f in &r.findings {
            let at = f
                .statement
                .map(|i| format!(" (statement {})", i + 1))
                .unwrap_or_default();
            let _ = writeln!(out, "  {} {}{at}: {}", level(f.level), f.rule, f.message);
        }
    }
    if let Some(k) = &r.kept {
        let _ = writeln!(out, "The clone was kept as branch \"{k}\".");
    }
    out
}

fn md_cell(text: &str) -> String {
    text.replace('|', "\\|").replace('\n', " ")
}

/// The first line of `--format markdown`: a workflow finds its earlier comment by it and
/// updates that one instead of adding another.
pub const MARKDOWN_MARKER: &str = "<!-- pgtwig check -->";

pub fn markdown(r: &CheckReport) -> String {
    let mut out = format!("{MARKDOWN_MARKER}\n");
    let verdict = if r.failed {
        "❌ failed"
    } else if r.findings.is_empty() {
        "✅ clean"
    } else {
        "⚠️ passed with warnings"
    };
    let _ = writeln!(out, "### pgtwig check: {verdict}\n");
    let _ = writeln!(
        out,
        "`{}` on a copy-on-write clone of `{}` (database `{}`), {} ms.\n",
        md_cell(&command_text(&r.command)),
        r.branch,
        r.database,
        r.duration_ms
    );
    if !r.findings.is_empty() {
        let _ = writeln!(
            out,
            "| level | rule | relation | finding |\n| --- | --- | --- | --- |"
        );
        for f in &r.findings {
            let _ = writeln!(
                out,
                "| {} | `{}` | `{}` | {} |",
                level(f.level),
                f.rule,
                md_cell(&f.relation),
                md_cell(&f.message)
            );
        }
        out.push('\n');
    }
    if !r.statements.is_empty() {
        let _ = writeln!(
            out,
            "<details><summary>{} statements</summary>\n\n| # | statement | ms | rows | rewrote | locks held |\n| --- | --- | ---: | ---: | --- | --- |",
            r.statements.len()
        );
        for (i, s) in r.statements.iter().enumerate() {
            let _ = writeln!(
                out,
                "| {} | `{}` | {:.1} | {} | {} | {} |",
                i + 1,
                md_cell(&short_text(&s.text, 80)).replace('`', "'"),
                s.duration_ms,
                rows_text(s),
                if s.rewrote.is_empty() {
                    "-".into()
                } else {
                    md_cell(&s.rewrote.join(", "))
                },
                if s.locks.is_empty() {
                    "-".into()
                } else {
                    md_cell(&locks_text(s))
                },
            );
        }
        let _ = writeln!(out, "\n</details>\n");
    }
    let _ = writeln!(out, "<sub>{}.</sub>", resolution(r));
    out
}
