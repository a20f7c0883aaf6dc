//! Branches recovered to a past point of their parent (`branch create --at`).
//!
//! Under the project lock: the parent's WAL up to now is put in its archive
//! (a transaction — so a commit record stamped after any target in the past
//! exists — then `pg_switch_wal()`, waiting for the archiver; a stopped parent
//! is started for this and stopped again), which is also the latest point
//! available; a target after it is refused, naming it. The newest base that
//! ended before the target is cloned. Without the lock: a server on the clone
//! replays the archive to the target (`restore_command`, `recovery_target_*`
//! passed with `-c` for that run only, nothing written into the data
//! directory) and promotes; the point it reached is read back, it is
//! stopped, and the branch is published under the lock.

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use pgtwig_core::BranchName;

use crate::clone::{Cloner, Visit};
use crate::cluster;
use crate::engine::{
    io_err, write_private, Branch, BranchMeta, CreateReport, Error, LocalBackend, Result,
};
use crate::history::{archive_dir, base_for, bases, from_epoch, pg_err, Lsn, Target};
use crate::point_in_time::format_utc;
use crate::wal_archive;

/// How long the parent's archiver may take for the segment just switched.
const ARCHIVE_WAIT: Duration = Duration::from_secs(60);
/// How long replaying the archive may take.
const RECOVERY_WAIT: Duration = Duration::from_secs(300);

/// A point in a branch's WAL history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub lsn: Lsn,
    pub time: SystemTime,
}

/// What a recovery reached.
#[derive(Debug, Clone)]
pub struct Reached {
    /// The end of the last WAL record replayed.
    pub lsn: Lsn,
    /// When the last transaction replayed committed; None when none was
    /// (the target is right after the base).
    pub last_commit: Option<SystemTime>,
    /// The base it started from ended here.
    pub base_end: SystemTime,
}

/// The outcome of [`LocalBackend::create_at`].
#[derive(Debug, Clone)]
pub struct AtReport {
    pub report: CreateReport,
    pub target: Target,
    pub reached: Reached,
}

impl LocalBackend {
    /// Create `name` as `parent` was at `target`, from a base and the WAL archive.
    pub fn create_at(
        &self,
        name: &BranchName,
        parent: &BranchName,
        target: &Target,
    ) -> Result<AtReport> {
        // Under the project lock until the base is cloned; the recovery (replaying WAL, the
        // long part) runs without it, and publishing takes it again.
        let mut lock = Some(self.lock_for_new(name)?);
        let parent_branch = self.get(parent)?;
        let all = bases(&parent_branch.dir);
        let Some(earliest) = all.first() else {
            return Err(Error::Other(format!(
                "cannot branch \"{parent}\" at {}: it has no history yet (history is kept from its starts on a \
                 copy-on-write file system, a base at most hourly)",
                target.describe()
            )));
        };
        let Some(base) = base_for(&all, target).cloned() else {
            let at = match target {
                Target::Time(_) => format_utc(earliest.ended),
                Target::Lsn(_) => format!(
                    "LSN {}",
                    all.iter()
                        .map(|b| b.end_lsn)
                        .min()
                        .unwrap_or(earliest.end_lsn)
                ),
            };
            return Err(Error::Other(format!(
                "cannot branch \"{parent}\" at {}: the earliest point available is {at}; history is kept for \
                 history_retention",
                target.describe()
            )));
        };
        self.check_space_for_recovery(name, &parent_branch, &base)?;
        let latest = self.archive_until_now(&parent_branch)?;
        let past_the_end = match target {
            Target::Time(t) => *t > latest.time,
            Target::Lsn(l) => *l > latest.lsn,
        };
        if past_the_end {
            return Err(Error::Other(format!(
                "cannot branch \"{parent}\" at {}: that is after the latest point available, {} (LSN {})",
                target.describe(),
                format_utc(latest.time),
                latest.lsn
            )));
        }
        let unlocked = self.new_build_dir_unlocked(name)?;
        let build = unlocked.dir.clone();
        let result = (|| {
            let mut cloner = Cloner::new(&self.user);
            let data = build.join("data");
            cloner
                .clone_tree(&base.data, &data, &|_, _| Visit::Clone)
                .map_err(io_err("cloning the base"))?;
            cloner
                .give_to_server(&data)
                .map_err(io_err("giving the clone to the server user"))?;
            lock = None;
            write_private(&self.user, &data.join("recovery.signal"), "")?;
            let archive = archive_dir(&parent_branch.dir);
            let settings = recovery_settings(&archive, target);
            let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
            let pg = self.install_for(&parent_branch)?;
            let log = build.join("server.log");
            let replay = self.with_build_server(name, &pg, &build, &log, &settings, |sock| {
                wait_promoted(sock, &data).map_err(Error::Other)?;
                let mut c = cluster::client_config(sock, "postgres", "pgtwig history")
                    .connect(postgres::NoTls)
                    .map_err(pg_err)?;
                let row = c
                    .query_one(
                        "select pg_last_wal_replay_lsn()::text, \
                         extract(epoch from pg_last_xact_replay_timestamp())::float8",
                        &[],
                    )
                    .map_err(pg_err)?;
                let lsn: Option<String> = row.get(0);
                Ok(Reached {
                    lsn: lsn.as_deref().and_then(Lsn::parse).unwrap_or(base.end_lsn),
                    last_commit: row.get::<_, Option<f64>>(1).map(from_epoch),
                    base_end: base.ended,
                })
            });
            let reached = replay.map_err(|e| recovery_failed(e, &log, parent, target, &archive))?;
            let meta = BranchMeta {
                parent: Some(parent.clone()),
                created: crate::engine::now_rfc3339(),
                clone_method: cloner.method(),
                pg_major: parent_branch.meta.pg_major,
                git_branch: None,
                expires: None,
                protected: false,
            };
            let _lock = self.lock_for_new(name)?;
            let branch = self.publish(name, &build, &meta)?;
            Ok(AtReport {
                report: CreateReport {
                    branch,
                    // A clone of a base, not of the parent itself.
                    parent_was_running: false,
                    fallback_reason: cloner.fallback_reason.take(),
                    files: cloner.files,
                    bytes: cloner.bytes,
                },
                target: target.clone(),
                reached,
            })
        })();
        drop(lock);
        if result.is_err() {
            self.discard_build(&build, &build.join("server.log"));
        }
        drop(unlocked);
        result
    }

    /// Put `parent`'s WAL up to now into its archive and return that point
    /// (under the project lock). A stopped parent is started for it (its
    /// last, unfinished segment is not archived otherwise) and stopped again.
    fn archive_until_now(&self, parent: &Branch) -> Result<Point> {
        let was_running = self.ready_socket(&parent.name).is_some();
        let sock_dir = if was_running {
            self.socket_dir(&parent.name)?
        } else {
            self.start_locked(&parent.name)?
        };
        let point = archive_switch(&sock_dir, parent);
        if !was_running {
            self.stop_locked(&parent.name)?;
        }
        point
    }
}

/// See [`LocalBackend::archive_until_now`].
fn archive_switch(sock_dir: &Path, parent: &Branch) -> Result<Point> {
    let mut c = cluster::client_config(sock_dir, "postgres", "pgtwig history")
        .connect(postgres::NoTls)
        .map_err(pg_err)?;
    // A commit stamped now: recovery to a time before it stops there
    // instead of running out of WAL ("recovery ended before configured
    // recovery target was reached") when nothing was committed since.
    c.batch_execute("select txid_current()").map_err(pg_err)?;
    let row = c
        .query_one(
            "select pg_walfile_name(w), w::text, extract(epoch from clock_timestamp())::float8 \
             from pg_switch_wal() w",
            &[],
        )
        .map_err(pg_err)?;
    let file: String = row.get(0);
    let lsn: String = row.get(1);
    let point = Point {
        lsn: Lsn::parse(&lsn).ok_or_else(|| Error::Other(format!("unexpected LSN {lsn}")))?,
        time: from_epoch(row.get(2)),
    };
    let archived = archive_dir(&parent.dir).join(&file);
    let deadline = Instant::now() + ARCHIVE_WAIT;
    while !archived.exists() {
        if Instant::now() > deadline {
            let failed: Option<(Option<String>, Option<String>)> = c
                .query_opt(
                    "select last_failed_wal, last_failed_time::text from pg_stat_archiver",
                    &[],
                )
                .ok()
                .flatten()
                .map(|r| (r.get(0), r.get(1)));
            let why = match failed {
                Some((Some(f), Some(t))) => format!(
                    "archiving last failed for {f} at {t}; the reason is in {}",
                    parent.log_path().display()
                ),
                _ => format!("see {}", parent.log_path().display()),
            };
            return Err(Error::Other(format!(
                "WAL file {file} of \"{}\" was not archived within {} s ({why}); history after its last \
                 archived segment is not available until archiving works again",
                parent.name,
                ARCHIVE_WAIT.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(point)
}

/// `-c` settings for the recovery run: read the parent's archive, stop at
/// the target, promote.
fn recovery_settings(archive: &Path, target: &Target) -> Vec<String> {
    let target = match target {
        // "2026-11-28 10:15:00.123456+00": the form recovery_target_time accepts.
        Target::Time(t) => format!(
            "recovery_target_time={}",
            humantime::format_rfc3339_micros(*t)
                .to_string()
                .replace('T', " ")
                .replace('Z', "+00")
        ),
        Target::Lsn(l) => format!("recovery_target_lsn={l}"),
    };
    vec![
        format!("restore_command={}", wal_archive::restore_command(archive)),
        target,
        "recovery_target_action=promote".into(),
    ]
}

/// A recovery that did not reach its target, said plainly: the archive
/// ran out (a segment is missing), or what else the server log says.
fn recovery_failed(
    e: Error,
    log: &Path,
    parent: &BranchName,
    target: &Target,
    archive: &Path,
) -> Error {
    let text = cluster::log_tail(log, 0);
    if text.contains("recovery ended before configured recovery target was reached") {
        let after = |key: &str| {
            text.lines()
                .rev()
                .find_map(|l| l.split_once(key).map(|(_, r)| r.trim().to_string()))
        };
        let reached = match (
            after("redo done at "),
            after("last completed transaction was at log time "),
        ) {
            (Some(lsn), Some(t)) => format!(
                "replay reached {} (the last transaction there committed at {t})",
                lsn.split_whitespace().next().unwrap_or(&lsn)
            ),
            (Some(lsn), None) => format!(
                "replay reached {}",
                lsn.split_whitespace().next().unwrap_or(&lsn)
            ),
            _ => "replay ran out of WAL".into(),
        };
        return Error::Other(format!(
            "cannot branch \"{parent}\" at {}: its WAL archive ({}) ends before that point: {reached}, the latest \
             point available from this history. A segment is missing there (archiving failed, see the server \
             log of \"{parent}\", or it was removed); nothing was created",
            target.describe(),
            archive.display()
        ));
    }
    Error::Other(format!(
        "recovering \"{parent}\" to {} failed: {e}\nServer log:\n{text}",
        target.describe()
    ))
}

/// Poll until the recovering server has promoted (or died).
fn wait_promoted(sock: &Path, data: &Path) -> std::result::Result<(), String> {
    let deadline = Instant::now() + RECOVERY_WAIT;
    loop {
        if !cluster::status(data).is_running() {
            return Err("the server stopped during recovery".into());
        }
        if let Ok(mut c) =
            cluster::client_config(sock, "postgres", "pgtwig history").connect(postgres::NoTls)
        {
            if let Ok(row) = c.query_one("select pg_is_in_recovery()", &[]) {
                if !row.get::<_, bool>(0) {
                    return Ok(());
                }
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "still recovering after {} s",
                RECOVERY_WAIT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
