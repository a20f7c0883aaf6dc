//! `pgtwig gc --history`: free the disk space point-in-time history holds.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::output;
use pgtwig_project::Project;

/// "0", or a humantime duration ("90m", "3d").
fn parse_older_than(text: &str) -> Result<Duration> {
    if text.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(text.trim()).with_context(|| {
        format!("--older-than \"{text}\" is not a duration; write e.g. \"2h\", \"3d\" or \"0\" for all history")
    })
}

pub fn gc_history(older_than: Option<&str>, dry_run: bool) -> Result<ExitCode> {
    let project = Project::discover()?;
    let backend = project.backend(false)?;
    let backend = backend.local_only(
        "`pgtwig gc --history`",
        "Neon keeps a branch's history itself (the project's history retention, in Neon's console)",
    )?;
    let older_than = match older_than {
        Some(text) => parse_older_than(text)?,
        None => project.config.history_retention,
    };
    let before = backend.free_space()?;
    let pruned = backend.prune_all_history(older_than, dry_run)?;
    let what = if older_than.is_zero() {
        "all point-in-time history".to_string()
    } else {
        format!(
            "point-in-time history older than {}",
            humantime::format_duration(older_than)
        )
    };
    let total: u64 = pruned.iter().map(|(_, p)| p.bytes).sum();
    let touched: Vec<_> = pruned
        .iter()
        .filter(|(_, p)| p.bases > 0 || p.wal_files > 0 || p.bytes > 0)
        .collect();
    let verb = if dry_run { "Would remove" } else { "Removed" };
    if touched.is_empty() {
        println!("No {what} to remove");
    } else {
        println!("{verb} {what}:");
        for (name, p) in &touched {
            println!(
                "  {name}: {} base snapshot{}, {} WAL file{} ({})",
                p.bases,
                if p.bases == 1 { "" } else { "s" },
                p.wal_files,
                if p.wal_files == 1 { "" } else { "s" },
                output::size(p.bytes)
            );
        }
    }
    let margin = backend.margin(before.total)?;
    let kept = margin
        .map(|m| format!(" (pgtwig keeps {} free)", output::size(m.bytes)))
        .unwrap_or_default();
    let folder = backend.home().dir().display().to_string();
    if dry_run {
        println!(
            "That frees about {}; {} free now on the file system of {folder}{kept}",
            output::size(total),
            output::size(before.available),
        );
    } else {
        // The file system may release the blocks a moment later (XFS frees in the background).
        let after = backend.free_space()?;
        println!(
            "Freed {}; {} free on the file system of {folder}{kept}",
            output::size(total),
            output::size(after.available.max(before.available)),
        );
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn older_than_reads_durations_and_zero() {
        use std::time::Duration;
        assert_eq!(super::parse_older_than("0").unwrap(), Duration::ZERO);
        assert_eq!(
            super::parse_older_than("2h").unwrap(),
            Duration::from_secs(7200)
        );
        let e = super::parse_older_than("soon").unwrap_err().to_string();
        assert!(e.contains("\"0\" for all history"), "{e}");
    }
}
