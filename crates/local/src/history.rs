//! History: branches as their parent was at a past point (`branch create
//! --at`).
//!
//! Every managed server archives its WAL into `<branch>/wal-archive/`
//! (`archive_command`, see [`crate::wal_archive`]), and on start pgtwig takes
//! a *base*: a consistent copy-on-write snapshot of the running cluster (the
//! same backup-API clone a new branch gets) in `<branch>/bases/<unix time>/`,
//! at most one per [`BASE_INTERVAL`], flushed before it is renamed into place.
//! Each base records where its backup *ended* (`base.json`): only from there
//! on is it consistent, so a branch at T starts from the newest base that
//! ended before T and replays the archive up to T (see `crate::recovery`).
//! Bases and WAL older than `history_retention` are pruned, keeping the one
//! base that still reaches back to the retention boundary. Bases are only
//! taken where clones are copy-on-write: on other file systems they would
//! cost a full copy each.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgtwig_core::{fsutil, BranchName};
use serde::{Deserialize, Serialize};

use crate::clone::{self, CloneMethod};
use crate::cluster;
use crate::engine::{io_err, remove_tree, sync_tree, Branch, Error, LocalBackend, Result};
pub use crate::point_in_time::{Lsn, Target};
use crate::wal_archive;

/// At most one base per this long (a start after that takes a new one).
pub const BASE_INTERVAL: Duration = Duration::from_secs(3600);

/// What a base records of itself, beside its `data/`.
const BASE_FILE: &str = "base.json";

pub(crate) fn archive_dir(branch_dir: &Path) -> PathBuf {
    branch_dir.join("wal-archive")
}

pub(crate) fn bases_dir(branch_dir: &Path) -> PathBuf {
    branch_dir.join("bases")
}

impl LocalBackend {
    /// `-c` settings that make a server archive its WAL into its branch
    /// folder, through the project's copy of the archiver (installed or
    /// refreshed here). Passed at every start, never written into the data
    /// directory: a branch made by an older pgtwig gets this command on its
    /// next start.
    pub(crate) fn archive_settings(&self, branch_dir: &Path) -> Result<Vec<String>> {
        let dir = archive_dir(branch_dir);
        if !dir.exists() {
            fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
            self.user
                .server_folder(&dir)
                .map_err(io_err("giving the WAL archive to the server user"))?;
        }
        let source = wal_archive::locate_archiver().map_err(Error::Other)?;
        let bin = wal_archive::install_archiver(self.home.dir(), &self.user, &source).map_err(
            io_err(format!(
                "copying {} into {}",
                source.display(),
                self.home.dir().join("bin").display()
            )),
        )?;
        Ok(vec![
            "archive_mode=on".into(),
            format!(
                "archive_command={}",
                wal_archive::archive_command(&bin, &dir)
            ),
        ])
    }
}

/// What pruning one branch's history removed (or would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub bases: usize,
    pub wal_files: usize,
    /// Own bytes of what was removed (blocks shared with other files are not freed).
    pub bytes: u64,
}

/// A base: when its backup started and ended, and where its data directory is.
#[derive(Debug, Clone)]
pub struct Base {
    pub started: SystemTime,
    /// From here on the base is consistent: the earliest point it can be
    /// recovered to.
    pub ended: SystemTime,
    pub end_lsn: Lsn,
    pub start_wal: String,
    pub data: PathBuf,
}

/// `base.json`: the parent's WAL position and clock right after its
/// `pg_backup_stop` returned — at or after the backup's real end.
#[derive(Debug, Serialize, Deserialize)]
struct BaseRecord {
    backup_end: String,
    backup_end_lsn: String,
}

fn label_line<'a>(label: &'a str, key: &str) -> Option<&'a str> {
    label
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// `2026-12-02 00:19:00 UTC` (backup_label, backup history files).
fn label_time(text: &str, key: &str) -> Option<SystemTime> {
    let t = label_line(text, key)?;
    let t = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim();
    humantime::parse_rfc3339_weak(t).ok()
}

/// `0/2000028 (file 000000010000000000000002)`.
fn label_lsn(text: &str, key: &str) -> Option<Lsn> {
    Lsn::parse(label_line(text, key)?.split_whitespace().next()?)
}

/// Where a base made by an older pgtwig (no `base.json`) ended: the backup
/// history file its backup left in the archive (times in whole seconds,
/// so one is added), else — nothing better being known — its start.
fn legacy_end(archive: &Path, label: &str, start_wal: &str) -> (SystemTime, Lsn) {
    let start = label_line(label, "START WAL LOCATION:");
    let history = fs::read_dir(archive)
        .into_iter()
        .flatten()
        .flatten()
        .find_map(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            if !(n.starts_with(start_wal) && n.ends_with(".backup")) {
                return None;
            }
            let text = fs::read_to_string(e.path()).ok()?;
            (label_line(&text, "START WAL LOCATION:") == start).then_some(text)
        });
    let started = label_time(label, "START TIME:").unwrap_or(UNIX_EPOCH);
    let start_lsn = label_lsn(label, "START WAL LOCATION:").unwrap_or(Lsn(0));
    history
        .and_then(|h| {
            Some((
                label_time(&h, "STOP TIME:")? + Duration::from_secs(1),
                label_lsn(&h, "STOP WAL LOCATION:")?,
            ))
        })
        .unwrap_or((started, start_lsn))
}

/// The bases of a branch, oldest first.
pub fn bases(branch_dir: &Path) -> Vec<Base> {
    let mut out = Vec::new();
    let Ok(rd) = fs::read_dir(bases_dir(branch_dir)) else {
        return out;
    };
    for e in rd.flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let data = e.path().join("data");
        let Ok(label) = fs::read_to_string(data.join("backup_label")) else {
            continue;
        };
        let (Some(started), Some(start_wal)) = (
            label_time(&label, "START TIME:"),
            crate::backup::start_wal_file(&label),
        ) else {
            continue;
        };
        let recorded = pgtwig_core::private::read_to_string(&e.path().join(BASE_FILE))
            .ok()
            .and_then(|t| serde_json::from_str::<BaseRecord>(&t).ok())
            .and_then(|r| {
                Some((
                    humantime::parse_rfc3339_weak(&r.backup_end).ok()?,
                    Lsn::parse(&r.backup_end_lsn)?,
                ))
            });
        let (ended, end_lsn) =
            recorded.unwrap_or_else(|| legacy_end(&archive_dir(branch_dir), &label, &start_wal));
        out.push(Base {
            started,
            ended,
            end_lsn,
            start_wal,
            data,
        });
    }
    out.sort_by_key(|b| b.ended);
    out
}

/// The newest base from which `target` can be reached (ended at or before it).
pub fn base_for<'a>(all: &'a [Base], target: &Target) -> Option<&'a Base> {
    all.iter().rev().find(|b| match target {
        Target::Time(t) => b.ended <= *t,
        Target::Lsn(l) => b.end_lsn <= *l,
    })
}

/// How many of `bases` (oldest first, by end) pruning what is older than `older_than` at
/// `now` removes: every base that ended before the boundary but the newest of them, which
/// still reaches back to it; all of them when `older_than` is zero.
fn bases_to_prune(bases: &[Base], older_than: Duration, now: SystemTime) -> usize {
    if older_than.is_zero() {
        return bases.len();
    }
    let boundary = now.checked_sub(older_than).unwrap_or(UNIX_EPOCH);
    bases.iter().rposition(|b| b.ended <= boundary).unwrap_or(0)
}

/// Whether archived file `name` is a WAL segment (possibly `.partial`) that no kept base
/// needs: one before `first_kept`, the start WAL file of the oldest kept base, or any
/// when no base is kept (WAL without a base to replay it onto serves nothing). Timeline
/// history files always stay.
fn wal_unneeded(name: &str, first_kept: Option<&str>) -> bool {
    let segment = name.len() >= 24 && name[..24].bytes().all(|b| b.is_ascii_hexdigit());
    if !segment || name.ends_with(".history") {
        return false;
    }
    match first_kept {
        None => true,
        // Log and segment, not the timeline: what matters is the position.
        Some(first) => first.len() == 24 && name[8..24] < first[8..],
    }
}

pub(crate) fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub(crate) fn from_epoch(secs: f64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs_f64(secs.max(0.0))
}

impl LocalBackend {
    /// Take a base of a running branch if the newest is older than
    /// [`BASE_INTERVAL`], and prune history older than `retention`
    /// (`Duration::ZERO`: keep no history). Does nothing where clones are
    /// not copy-on-write. Returns whether a base was taken.
    pub fn snapshot_if_due(&self, name: &BranchName, retention: Duration) -> Result<bool> {
        let _lock = self.lock()?;
        let branch = self.get(name)?;
        if retention.is_zero()
            || !clone::supports_reflink(&branch.dir)
            || self.ready_socket(name).is_none()
        {
            // No base now, but what was archived still goes when it is older than retention.
            self.prune_history(&branch, retention, false)?;
            return Ok(false);
        }
        let now = SystemTime::now();
        let existing = bases(&branch.dir);
        let mut due = existing
            .iter()
            .map(|b| b.started)
            .max()
            .is_none_or(|t| now.duration_since(t).unwrap_or_default() >= BASE_INTERVAL);
        if due {
            // A base holds blocks the branch then overwrites: not on a (nearly) full disk.
            if let Err(e) = self.check_space(&format!("a history base of \"{name}\""), || {
                Ok(self.clone_need(&branch))
            }) {
                tracing::warn!("no history base taken: {e}");
                due = false;
            }
        }
        if due && !self.take_base(&branch, now)? {
            return Ok(false);
        }
        self.prune_history(&branch, retention, false)?;
        Ok(due)
    }

    /// Clone the running `branch` into a new base. False (nothing kept)
    /// when the clone was not copy-on-write or the branch stopped meanwhile.
    fn take_base(&self, branch: &Branch, now: SystemTime) -> Result<bool> {
        let dir = bases_dir(&branch.dir);
        if !dir.exists() {
            fs::create_dir(&dir).map_err(io_err("creating bases"))?;
            self.user
                .own_folder(&dir)
                .map_err(io_err("making bases private"))?;
        }
        let build = dir.join(format!("tmp-{}", std::process::id()));
        let _ = remove_tree(&build);
        fs::create_dir(&build).map_err(io_err("creating a base"))?;
        // pgtwig's like the branch folder; only its data/ is the server user's.
        self.user
            .own_folder(&build)
            .map_err(io_err("making the base private"))?;
        let kept = (|| {
            let made = self.build_clone(branch, &build)?;
            if made.method != CloneMethod::CopyOnWrite || !made.parent_was_running {
                return Ok(false);
            }
            // Asked after pg_backup_stop returned, so at or after the backup's end.
            let Some(sock) = self.ready_socket(&branch.name) else {
                return Ok(false);
            };
            let sock_dir = sock.parent().unwrap_or(&sock).to_path_buf();
            let mut c = cluster::client_config(&sock_dir, "postgres", "pgtwig history")
                .connect(postgres::NoTls)
                .map_err(pg_err)?;
            let row = c
                .query_one(
                    "select pg_current_wal_insert_lsn()::text, \
                     extract(epoch from clock_timestamp())::float8",
                    &[],
                )
                .map_err(pg_err)?;
            let record = BaseRecord {
                backup_end_lsn: row.get(0),
                backup_end: humantime::format_rfc3339_micros(from_epoch(row.get(1))).to_string(),
            };
            let mut json =
                serde_json::to_vec_pretty(&record).map_err(|e| Error::Other(e.to_string()))?;
            json.push(b'\n');
            fsutil::write_atomic(&build.join(BASE_FILE), &json)
                .map_err(io_err("recording the base's end"))?;
            // Flushed before it is published: a base renamed into place and
            // then lost to a power cut would be a history that lies.
            sync_tree(&build)?;
            let published = dir.join(secs(now).to_string());
            fs::rename(&build, &published).map_err(io_err("keeping the base"))?;
            fsutil::sync_dir(&dir).map_err(io_err("flushing bases/"))?;
            Ok(true)
        })();
        if !matches!(kept, Ok(true)) {
            let _ = remove_tree(&build);
        }
        kept
    }

    /// Remove a branch's history older than `older_than` (or say what would go, `dry_run`):
    /// every base started before the boundary except the newest of them (it still reaches
    /// back to the boundary; with `older_than` zero it goes too), the WAL no kept base needs
    /// (all of it when none is kept), and bases a killed snapshot left half made. Under the
    /// project lock.
    pub(crate) fn prune_history(
        &self,
        branch: &Branch,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<Pruned> {
        let all = bases(&branch.dir);
        let keep_from = bases_to_prune(&all, older_than, SystemTime::now());
        let mut pruned = Pruned::default();
        let own = |p: &Path| {
            crate::fiemap::tree_usage(p)
                .map(|(u, _)| u.own)
                .unwrap_or(0)
        };
        let mut doomed: Vec<PathBuf> = all[..keep_from]
            .iter()
            .map(|b| b.data.parent().expect("base folder").to_path_buf())
            .collect();
        pruned.bases = doomed.len();
        // `tmp-<pid>`: a snapshot works under the project lock, so one seen here was killed.
        if let Ok(rd) = fs::read_dir(bases_dir(&branch.dir)) {
            doomed.extend(
                rd.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("tmp-"))
                    .map(|e| e.path()),
            );
        }
        for dir in &doomed {
            pruned.bytes += own(dir);
            if !dry_run {
                remove_tree(dir)?;
            }
        }
        let first_kept = all.get(keep_from).map(|b| b.start_wal.as_str());
        if let Ok(rd) = fs::read_dir(archive_dir(&branch.dir)) {
            for e in rd.flatten() {
                if wal_unneeded(&e.file_name().to_string_lossy(), first_kept) {
                    pruned.wal_files += 1;
                    pruned.bytes += own(&e.path());
                    if !dry_run {
                        let _ = fs::remove_file(e.path());
                    }
                }
            }
        }
        Ok(pruned)
    }

    /// [`prune_history`](Self::prune_history) of every branch (`pgtwig gc --history`).
    pub fn prune_all_history(
        &self,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<Vec<(BranchName, Pruned)>> {
        let _lock = self.lock()?;
        self.prune_all_history_locked(older_than, dry_run)
    }

    pub(crate) fn prune_all_history_locked(
        &self,
        older_than: Duration,
        dry_run: bool,
    ) -> Result<Vec<(BranchName, Pruned)>> {
        let mut out = Vec::new();
        for name in self.names()? {
            // A branch whose metadata is unreadable still has a folder: prune it too.
            let branch = match self.get(&name) {
                Ok(b) => b,
                Err(_) => continue,
            };
            out.push((name, self.prune_history(&branch, older_than, dry_run)?));
        }
        Ok(out)
    }
}

pub(crate) fn pg_err(e: postgres::Error) -> Error {
    Error::Other(e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn label(start: &str, file: &str, time: &str) -> String {
        format!(
            "START WAL LOCATION: {start} (file {file})\nCHECKPOINT LOCATION: {start}\n\
             BACKUP METHOD: streamed\nBACKUP FROM: primary\nSTART TIME: {time}\nLABEL: pgtwig\n"
        )
    }

    fn base(branch: &Path, dir: &str, label_text: &str, record: Option<(&str, &str)>) {
        let data = branch.join("bases").join(dir).join("data");
        fs::create_dir_all(&data).unwrap();
        fs::write(data.join("backup_label"), label_text).unwrap();
        if let Some((end, lsn)) = record {
            let json = format!("{{\"backup_end\": \"{end}\", \"backup_end_lsn\": \"{lsn}\"}}");
            fs::write(branch.join("bases").join(dir).join(BASE_FILE), json).unwrap();
        }
    }

    fn t(s: &str) -> SystemTime {
        humantime::parse_rfc3339(s).unwrap()
    }

    /// The base for T is the newest that *ended* before T: a base that
    /// started before T but ended after it cannot reach it.
    #[test]
    fn the_base_for_a_point_is_the_newest_that_ended_before_it() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        fs::create_dir_all(archive_dir(b)).unwrap();
        let seg2 = "000000010000000000000002";
        let seg5 = "000000010000000000000005";
        base(
            b,
            "1000",
            &label("0/2000028", seg2, "2026-12-02 10:00:00 UTC"),
            Some(("2026-12-02T10:00:05Z", "0/2000100")),
        );
        base(
            b,
            "2000",
            &label("0/5000028", seg5, "2026-12-02 11:00:00 UTC"),
            Some(("2026-12-02T11:00:30Z", "0/5000200")),
        );
        let all = bases(b);
        assert_eq!(all.len(), 2);
        let pick = |target: Target| base_for(&all, &target).map(|b| b.start_wal.clone());
        assert_eq!(
            pick(Target::Time(t("2026-12-02T11:00:10Z"))),
            Some(seg2.into())
        );
        assert_eq!(
            pick(Target::Time(t("2026-12-02T11:00:30Z"))),
            Some(seg5.into())
        );
        assert_eq!(pick(Target::Time(t("2026-12-02T10:00:01Z"))), None);
        assert_eq!(pick(Target::Lsn(Lsn(0x5000100))), Some(seg2.into()));
        assert_eq!(pick(Target::Lsn(Lsn(0x5000200))), Some(seg5.into()));
    }

    /// A base of an older pgtwig has no base.json: its end comes from the
    /// backup history file in the archive (whole seconds, so one more), else
    /// its start.
    #[test]
    fn an_older_base_ends_where_its_backup_history_file_says() {
        let d = tempfile::tempdir().unwrap();
        let b = d.path();
        let archive = archive_dir(b);
        fs::create_dir_all(&archive).unwrap();
        let seg = "000000010000000000000002";
        base(
            b,
            "1000",
            &label("0/2000028", seg, "2026-12-02 10:00:00 UTC"),
            None,
        );
        fs::write(
            archive.join(format!("{seg}.00000028.backup")),
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n\
             STOP WAL LOCATION: 0/2000138 (file 000000010000000000000002)\n\
             START TIME: 2026-12-02 10:00:00 UTC\nSTOP TIME: 2026-12-02 10:00:07 UTC\n",
        )
        .unwrap();
        let all = bases(b);
        assert_eq!(all[0].ended, t("2026-12-02T10:00:08Z"));
        assert_eq!(all[0].end_lsn, Lsn(0x2000138));
        fs::remove_file(archive.join(format!("{seg}.00000028.backup"))).unwrap();
        let all = bases(b);
        assert_eq!(all[0].ended, t("2026-12-02T10:00:00Z"));
        assert_eq!(all[0].end_lsn, Lsn(0x2000028));
    }
}

#[cfg(test)]
mod pruning_tests {
    use super::*;

    /// A base that ended when it started (pruning goes by the end).
    fn base(started: u64, start_wal: &str) -> Base {
        let at = UNIX_EPOCH + Duration::from_secs(started);
        Base {
            started: at,
            ended: at,
            end_lsn: Lsn(0),
            start_wal: start_wal.into(),
            data: PathBuf::from(format!("/b/{started}/data")),
        }
    }

    #[test]
    fn pruning_keeps_the_base_that_reaches_back_to_the_boundary() {
        let now = UNIX_EPOCH + Duration::from_secs(10_000);
        let all = [
            base(1_000, "000000010000000000000002"),
            base(5_000, "000000010000000000000008"),
            base(9_000, "00000001000000000000000F"),
        ];
        let hour = Duration::from_secs(3600);
        // Boundary 6400: the base of 5000 still covers it; the one of 1000 goes.
        assert_eq!(bases_to_prune(&all, hour, now), 1);
        // Boundary 9500: only the newest base is needed.
        assert_eq!(bases_to_prune(&all, Duration::from_secs(500), now), 2);
        // Everything is younger than a day: nothing goes.
        assert_eq!(bases_to_prune(&all, 24 * hour, now), 0);
        // "0": all of it.
        assert_eq!(bases_to_prune(&all, Duration::ZERO, now), 3);
        assert_eq!(bases_to_prune(&[], hour, now), 0);
    }

    #[test]
    fn wal_goes_when_no_kept_base_needs_it() {
        let first = Some("000000010000000000000008");
        assert!(wal_unneeded("000000010000000000000007", first));
        assert!(!wal_unneeded("000000010000000000000008", first));
        assert!(!wal_unneeded("000000020000000000000009", first));
        // An older timeline's segment before the base is as unneeded.
        assert!(wal_unneeded("000000020000000000000003", first));
        assert!(wal_unneeded("000000010000000000000003.partial", first));
        assert!(!wal_unneeded("00000002.history", first));
        assert!(!wal_unneeded("archive_status", first));
        // No base kept: every segment goes, history files stay.
        assert!(wal_unneeded("00000001000000000000000F", None));
        assert!(!wal_unneeded("00000002.history", None));
        assert!(!wal_unneeded(".tmp-000000010000000000000001", None));
    }
}
