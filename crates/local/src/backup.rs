//! A consistent clone of a *running* cluster, without stopping it or
//! touching its sessions: PostgreSQL's non-exclusive backup API, the way
//! `pg_basebackup` uses it.
//!
//! 1. In one session, `pg_backup_start(label, fast => true)` (PG 15+;
//!    `pg_start_backup(label, true, false)` before): a checkpoint, and full
//!    page writes forced so pages torn by copying under load are repaired
//!    by WAL replay.
//! 2. Clone the files, leaving out what a base backup leaves out (below).
//!    `global/pg_control` last.
//! 3. `pg_backup_stop()` returns the `backup_label` text; it goes into the
//!    clone, which makes the clone start recovery at the backup's checkpoint.
//! 4. Clone the WAL segments from the backup's start onwards; managed
//!    clusters keep `wal_keep_size` of WAL so they are still there.
//!
//! Started, the clone replays WAL to the end of what was copied and opens.
//! If pgtwig dies between 1 and 3 the session ends and PostgreSQL aborts
//! the backup by itself: the parent is never left in backup mode.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("cannot connect to the running parent through {socket_dir}: {source}")]
    Connect {
        socket_dir: PathBuf,
        source: postgres::Error,
    },
    #[error("{step} on the parent failed: {source}")]
    Sql {
        step: &'static str,
        source: postgres::Error,
    },
}

/// An open backup on a running cluster. Dropping it without [`finish`]
/// closes the session, which aborts the backup.
///
/// [`finish`]: BackupSession::finish
pub struct BackupSession {
    client: postgres::Client,
    major: u32,
}

/// What `pg_backup_stop` hands back.
pub struct BackupEnd {
    pub backup_label: String,
    /// Non-empty only when the cluster has tablespaces.
    pub tablespace_map: Option<String>,
}

impl BackupSession {
    pub fn begin(socket_dir: &Path, major: u32, label: &str) -> Result<BackupSession, BackupError> {
        let mut client = crate::cluster::client_config(socket_dir, "postgres", "pgtwig clone")
            .connect(postgres::NoTls)
            .map_err(|source| BackupError::Connect {
                socket_dir: socket_dir.to_path_buf(),
                source,
            })?;
        let sql = if major >= 15 {
            "SELECT pg_backup_start($1, true)::text"
        } else {
            "SELECT pg_start_backup($1, true, false)::text"
        };
        client
            .query_one(sql, &[&label])
            .map_err(|source| BackupError::Sql {
                step: "starting the backup",
                source,
            })?;
        Ok(BackupSession { client, major })
    }

    pub fn finish(mut self) -> Result<BackupEnd, BackupError> {
        // wait_for_archive = false: the clone gets its WAL by copy right
        // after, so waiting for the archiver (up to a second or more with
        // archive_mode on) would only slow every branch down.
        let sql = if self.major >= 15 {
            "SELECT labelfile, spcmapfile FROM pg_backup_stop(false)"
        } else {
            "SELECT labelfile, spcmapfile FROM pg_stop_backup(false, false)"
        };
        let row = self
            .client
            .query_one(sql, &[])
            .map_err(|source| BackupError::Sql {
                step: "stopping the backup",
                source,
            })?;
        let backup_label: String = row.get(0);
        let map: Option<String> = row.get(1);
        Ok(BackupEnd {
            backup_label,
            tablespace_map: map.filter(|m| !m.trim().is_empty()),
        })
    }
}

/// The WAL file a backup starts in, from the label's
/// `START WAL LOCATION: 0/2000028 (file 000000010000000000000002)` line.
pub fn start_wal_file(backup_label: &str) -> Option<String> {
    backup_label
        .lines()
        .find_map(|l| l.strip_prefix("START WAL LOCATION:"))
        .and_then(|rest| rest.split("(file ").nth(1))
        .map(|f| f.trim_end_matches(')').trim().to_string())
}

/// Whether a `pg_wal` entry named `name` is needed by a clone whose replay
/// starts in WAL file `first`. A WAL file name is timeline, log and
/// segment, 8 hex digits each; what matters is the position, the last 16
/// digits. Timeline history files are always kept.
pub fn wal_needed(name: &str, first: &str) -> bool {
    if name.ends_with(".history") {
        return true;
    }
    let is_segment = name.len() == 24 && name.bytes().all(|b| b.is_ascii_hexdigit());
    is_segment && first.len() == 24 && name[8..] >= first[8..]
}

/// Entries of a live data directory a clone must leave out (as a base
/// backup does), by path relative to the data directory.
pub fn live_exclusion(rel: &Path, is_dir: bool) -> crate::clone::Visit {
    use crate::clone::Visit;
    let s = rel.to_string_lossy();
    if is_dir {
        return match s.as_ref() {
            // Runtime state rebuilt at start, or WAL handled separately.
            "pg_wal" | "pg_dynshmem" | "pg_notify" | "pg_serial" | "pg_snapshots"
            | "pg_stat_tmp" | "pg_subtrans" | "pg_replslot" => Visit::EmptyDir,
            _ if rel
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("pgsql_tmp")) =>
            {
                Visit::EmptyDir
            }
            _ => Visit::Clone,
        };
    }
    let name = rel
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    match (s.as_ref(), name.as_ref()) {
        (
            "postmaster.pid" | "postmaster.opts" | "backup_label" | "tablespace_map"
            | "current_logfiles" | "backup_label.old",
            _,
        ) => Visit::Skip,
        // Cloned last, after every data file.
        ("global/pg_control", _) => Visit::Skip,
        (_, "pg_internal.init") => Visit::Skip,
        _ => Visit::Clone,
    }
}

/// Entries of a stopped data directory a clone leaves out: the pid and
/// options files of its last run, and replication slots (a clone must not
/// hold WAL for consumers of its parent).
pub fn stopped_exclusion(rel: &Path, is_dir: bool) -> crate::clone::Visit {
    use crate::clone::Visit;
    let s = rel.to_string_lossy();
    match (s.as_ref(), is_dir) {
        ("pg_replslot", true) => Visit::EmptyDir,
        ("postmaster.pid" | "postmaster.opts", false) => Visit::Skip,
        _ => Visit::Clone,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_start_wal_file() {
        let label = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\nCHECKPOINT LOCATION: 0/2000060\n";
        assert_eq!(
            start_wal_file(label).as_deref(),
            Some("000000010000000000000002")
        );
        assert_eq!(start_wal_file("nothing"), None);
    }

    #[test]
    fn wal_selection_compares_positions_not_timelines() {
        let first = "000000010000000000000005";
        assert!(wal_needed("000000010000000000000005", first));
        assert!(wal_needed("000000020000000000000006", first));
        assert!(wal_needed("000000010000000100000000", first));
        assert!(!wal_needed("000000010000000000000004", first));
        assert!(wal_needed("00000002.history", first));
        assert!(!wal_needed("archive_status", first));
        assert!(!wal_needed("000000010000000000000005.partial", first));
    }
}
