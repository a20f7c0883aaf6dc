//! History: branches as their parent was at a past time (`branch create
//! --at`).
//!
//! Every managed server archives its WAL into `<branch>/wal-archive/`
//! (`archive_command`), and on start pgtwig takes a *base*: a consistent
//! copy-on-write snapshot of the running cluster (the same backup-API clone
//! a new branch gets) in `<branch>/bases/<unix time>/`, at most one per
//! [`BASE_INTERVAL`]. A branch at time T is the newest base started before
//! T, replayed from the archive up to T (`recovery_target_time`), then
//! promoted. Bases and WAL older than `history_retention` are pruned,
//! keeping the one base that still reaches back to the retention boundary.
//! Bases are only taken where clones are copy-on-write: on other file
//! systems they would cost a full copy each.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgtwig_core::BranchName;

use crate::clone::{self, CloneMethod, Cloner, Visit};
use crate::cluster;
use crate::engine::{
    io_err, remove_tree, write_private, Branch, BranchMeta, CreateReport, Error, LocalBackend,
    Result,
};
use crate::server_user::ServerUser;

/// At most one base per this long (a start after that takes a new one).
pub const BASE_INTERVAL: Duration = Duration::from_secs(3600);

pub(crate) fn archive_dir(branch_dir: &Path) -> PathBuf {
    branch_dir.join("wal-archive")
}

pub(crate) fn bases_dir(branch_dir: &Path) -> PathBuf {
    branch_dir.join("bases")
}

/// `-c` settings that make a server archive its WAL into its branch folder.
pub fn archive_settings(user: &ServerUser, branch_dir: &Path) -> Result<Vec<String>> {
    let dir = archive_dir(branch_dir);
    if !dir.exists() {
        fs::create_dir(&dir).map_err(io_err(format!("creating {}", dir.display())))?;
        user.server_folder(&dir)
            .map_err(io_err("giving the WAL archive to the server user"))?;
    }
    let d = dir.display().to_string().replace('\'', "");
    Ok(vec![
        "archive_mode=on".into(),
        format!("archive_command=test ! -f '{d}/%f' && cp '%p' '{d}/%f'"),
    ])
}

/// What pruning one branch's history removed (or would remove).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub bases: usize,
    pub wal_files: usize,
    /// Own bytes of what was removed (blocks shared with other files are not freed).
    pub bytes: u64,
}

/// A base: when its backup started, and where its data directory is.
#[derive(Debug, Clone)]
pub struct Base {
    pub started: SystemTime,
    pub start_wal: String,
    pub data: PathBuf,
}

fn label_time(label: &str) -> Option<SystemTime> {
    let t = label
        .lines()
        .find_map(|l| l.strip_prefix("START TIME:"))?
        .trim();
    let t = t.trim_end_matches(|c: char| c.is_ascii_alphabetic()).trim(); // "... UTC"
    humantime::parse_rfc3339_weak(t).ok()
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
        if let (Some(started), Some(start_wal)) =
            (label_time(&label), crate::backup::start_wal_file(&label))
        {
            out.push(Base {
                started,
                start_wal,
                data,
            });
        }
    }
    out.sort_by_key(|b| b.started);
    out
}

/// Where the target of a point-in-time branch is.
#[derive(Debug, Clone)]
pub enum Target {
    Time(SystemTime),
    Lsn(String),
}

impl Target {
    /// `2026-11-28T10:15:00Z`, `2026-11-28 10:15:00` (UTC) or an LSN `0/3000060`.
    pub fn parse(s: &str) -> std::result::Result<Target, String> {
        if let Some((hi, lo)) = s.split_once('/') {
            if !hi.is_empty()
                && !lo.is_empty()
                && (hi.to_owned() + lo).bytes().all(|b| b.is_ascii_hexdigit())
            {
                return Ok(Target::Lsn(s.to_string()));
            }
        }
        humantime::parse_rfc3339_weak(s.trim_end_matches(" UTC"))
            .map(Target::Time)
            .map_err(|_| {
                format!("--at \"{s}\" is neither a time (2026-11-28T10:15:00Z, UTC) nor an LSN (0/3000060)")
            })
    }
}

/// How many of `bases` (oldest first) pruning what is older than `older_than` at `now`
/// removes: every base started before the boundary but the newest of them, which still
/// reaches back to it; all of them when `older_than` is zero.
fn bases_to_prune(bases: &[Base], older_than: Duration, now: SystemTime) -> usize {
    if older_than.is_zero() {
        return bases.len();
    }
    let boundary = now.checked_sub(older_than).unwrap_or(UNIX_EPOCH);
    bases
        .iter()
        .rposition(|b| b.started <= boundary)
        .unwrap_or(0)
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

fn secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
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
            .last()
            .is_none_or(|b| now.duration_since(b.started).unwrap_or_default() >= BASE_INTERVAL);
        if due {
            // A base holds blocks the branch then overwrites: not on a (nearly) full disk.
            if let Err(e) = self.check_space(&format!("a history base of \"{name}\""), || {
                Ok(self.clone_need(&branch))
            }) {
                tracing::warn!("no history base taken: {e}");
                due = false;
            }
        }
        if due {
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
            let made = self.build_clone(&branch, &build);
            match made {
                Ok(c) if c.method == CloneMethod::CopyOnWrite => {
                    fs::rename(&build, dir.join(secs(now).to_string()))
                        .map_err(io_err("keeping the base"))?;
                }
                Ok(_) | Err(_) => {
                    let _ = remove_tree(&build);
                    made?;
                    return Ok(false);
                }
            }
        }
        self.prune_history(&branch, retention, false)?;
        Ok(due)
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

    /// Create `name` as `parent` was at `target`, from a base and the WAL archive.
    pub fn create_at(
        &self,
        name: &BranchName,
        parent: &BranchName,
        target: &Target,
    ) -> Result<CreateReport> {
        // Under the project lock until the base is cloned; the recovery (replaying WAL, the
        // long part) runs without it, and publishing takes it again.
        let mut lock = Some(self.lock_for_new(name)?);
        let parent_branch = self.get(parent)?;
        let all = bases(&parent_branch.dir);
        let base = match target {
            Target::Time(t) => all.iter().rev().find(|b| b.started <= *t),
            // An LSN target: the newest base whose start is not after it.
            Target::Lsn(_) => all.first(),
        };
        let Some(base) = base.cloned() else {
            let earliest = all
                .first()
                .map(|b| format!("the earliest point available is {}", humantime::format_rfc3339_seconds(b.started)))
                .unwrap_or_else(|| {
                    "it has no history yet (history is kept from its starts on a copy-on-write file system)".into()
                });
            return Err(Error::Other(format!(
                "cannot branch \"{parent}\" at that point: {earliest}; history is kept for history_retention"
            )));
        };
        self.check_space_for_recovery(name, &parent_branch, &base)?;
        // Make sure the WAL up to now is in the archive.
        if let Some(sock) = self.ready_socket(parent) {
            let dir = sock.parent().unwrap_or(&sock).to_path_buf();
            let mut c = cluster::client_config(&dir, "postgres", "pgtwig history")
                .connect(postgres::NoTls)
                .map_err(pg_err)?;
            let file: String = c
                .query_one("select pg_walfile_name(pg_switch_wal())", &[])
                .map_err(pg_err)?
                .get(0);
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !archive_dir(&parent_branch.dir).join(&file).exists() {
                if std::time::Instant::now() > deadline {
                    return Err(Error::Other(format!(
                        "WAL file {file} of \"{parent}\" was not archived within 60 s"
                    )));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
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
            let archive = archive_dir(&parent_branch.dir)
                .display()
                .to_string()
                .replace('\'', "");
            let target_setting = match target {
                // "2026-11-28 10:15:00.123456+00": the form recovery_target_time accepts.
                Target::Time(t) => format!(
                    "recovery_target_time = '{}'",
                    humantime::format_rfc3339_micros(*t)
                        .to_string()
                        .replace('T', " ")
                        .replace('Z', "+00")
                ),
                Target::Lsn(l) => format!("recovery_target_lsn = '{l}'"),
            };
            // Appended without reading it back, and never through a link:
            // the data directory is the server user's.
            let recovery = format!(
                "\n# pgtwig: point-in-time recovery (removed once done)\nrestore_command = 'cp \"{archive}/%f\" \"%p\"'\n{target_setting}\nrecovery_target_action = 'promote'\n"
            );
            pgtwig_core::private::write_file(
                &data.join("postgresql.auto.conf"),
                recovery.as_bytes(),
                pgtwig_core::private::WriteMode::Append,
                self.user.owner(),
            )
            .map_err(io_err("writing recovery settings"))?;
            write_private(&self.user, &data.join("recovery.signal"), "")?;
            let pg = self.install_for(&parent_branch)?;
            let log = build.join("server.log");
            let recovered = self.with_build_server(name, &pg, &build, &log, &[], |sock| {
                let recovered = wait_promoted(sock, &data);
                if recovered.is_ok() {
                    let mut c = cluster::client_config(sock, "postgres", "pgtwig history")
                        .connect(postgres::NoTls)
                        .map_err(pg_err)?;
                    for setting in [
                        "restore_command",
                        "recovery_target_time",
                        "recovery_target_lsn",
                        "recovery_target_action",
                    ] {
                        c.batch_execute(&format!("ALTER SYSTEM RESET {setting}"))
                            .map_err(pg_err)?;
                    }
                }
                Ok(recovered)
            })?;
            recovered.map_err(|why| {
                Error::Other(format!(
                    "recovering \"{parent}\" to that point failed: {why}; it may be later than the latest WAL \
                     archived. Server log: {}",
                    cluster::log_tail(&log, 0)
                ))
            })?;
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
            Ok(CreateReport {
                branch,
                parent_was_running: self.ready_socket(parent).is_some(),
                fallback_reason: cloner.fallback_reason.take(),
                files: cloner.files,
                bytes: cloner.bytes,
            })
        })();
        drop(lock);
        if result.is_err() {
            self.discard_build(&build, &build.join("server.log"));
        }
        drop(unlocked);
        result
    }
}

fn pg_err(e: postgres::Error) -> Error {
    Error::Other(e.to_string())
}

/// Poll until the recovering server has promoted (or died).
fn wait_promoted(sock: &Path, data: &Path) -> std::result::Result<(), String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
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
        if std::time::Instant::now() > deadline {
            return Err("still recovering after 300 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base(started: u64, start_wal: &str) -> Base {
        Base {
            started: UNIX_EPOCH + Duration::from_secs(started),
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
