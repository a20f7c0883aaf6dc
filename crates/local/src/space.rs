//! Disk space: checked before every build, and shown per branch.
//!
//! A build (`branch create`, `pr open`, a checkout's auto-create, `reset`,
//! `import`, `anonymize`, `--at`, a history base) writes to the file system
//! that also holds the running branches. PostgreSQL PANICs when it cannot
//! write WAL, so the build, not a running parent, must be the one to stop:
//! before building, pgtwig estimates what the build may write and refuses
//! (naming what is free, what it needs and how to free space) when less
//! than a margin would remain — 5 % of the file system, at least 1 GiB and at most 10 GiB, or
//! `free_space_margin` in `.pgtwig.toml`, or `PGTWIG_FREE_SPACE_MARGIN`.
//!
//! What a branch costs is measured from the extent map ([`crate::fiemap`]):
//! its own bytes (blocks no other file shares: what its writes cost since it
//! was cloned), the bytes it still shares with its parent or other clones,
//! and its history's own bytes (WAL archive and base snapshots).

use std::io;
use std::path::Path;
use std::time::Duration;

use pgtwig_core::size::{human, FreeSpaceMargin};
use pgtwig_core::BranchName;

use crate::cluster::ClusterError;
use crate::engine::{Branch, Error, LocalBackend, Result};
use crate::fiemap::{self, Method, Usage};
use crate::history::Base;

/// The margin is at least this much …
pub const MIN_MARGIN: u64 = 1 << 30;
/// … and this share (in percent) of the file system …
pub const MARGIN_PERCENT: u64 = 5;
/// … but never more than this by default: on a 1 TB laptop disk 5 % would be 50 GiB, and
/// pgtwig would refuse branches on a disk with room for hundreds of them. What the margin
/// guards against — a running branch's next WAL segments and checkpoints — fits in far less.
pub const MAX_DEFAULT_MARGIN: u64 = 10 << 30;
/// Overrides `free_space_margin` (a size, or "off"); for tests on small file systems.
pub const MARGIN_ENV: &str = "PGTWIG_FREE_SPACE_MARGIN";
/// What a copy-on-write clone writes besides copies of WAL: metadata, the
/// backup label and, at its first start, crash recovery's new WAL segments
/// and checkpoint (a few 16 MiB segments).
pub const CLONE_OVERHEAD: u64 = 64 << 20;
/// What `initdb` writes for a new cluster (about 40 MiB), rounded up.
pub const NEW_CLUSTER: u64 = 64 << 20;
/// The most WAL a build's server keeps at once while it rewrites data
/// (PostgreSQL's default `max_wal_size`): import and anonymize write WAL in
/// proportion to the data, but checkpoints recycle it beyond this.
pub const WAL_PEAK: u64 = 1 << 30;

/// Free and total bytes of a file system (as an unprivileged user sees them:
/// the servers do not run as root).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FreeSpace {
    pub available: u64,
    pub total: u64,
}

/// `statvfs` of the file system holding `path`.
pub fn free_space(path: &Path) -> io::Result<FreeSpace> {
    let s = nix::sys::statvfs::statvfs(path).map_err(io::Error::from)?;
    let unit = s.fragment_size() as u64;
    Ok(FreeSpace {
        available: s.blocks_available() as u64 * unit,
        total: s.blocks() as u64 * unit,
    })
}

/// The default margin on a file system of `total` bytes.
pub fn default_margin(total: u64) -> u64 {
    (total / 100 * MARGIN_PERCENT).clamp(MIN_MARGIN, MAX_DEFAULT_MARGIN)
}

/// A build whose server runs is stopped when free space falls below the margin divided
/// by this: its estimate was wrong, and the rest of the margin is the running branches'.
pub const BUILD_STOP_DIVISOR: u64 = 2;
/// How often a running build's free space is looked at.
const BUILD_WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Watches free space while a build's server runs (see [`LocalBackend::watch_build`]).
/// Dropping it (or [`finish`](Self::finish)) ends the watch at once.
pub(crate) struct BuildWatch {
    /// Closed to end the watch: the thread wakes from its wait then, not 200 ms later.
    _done: std::sync::mpsc::Sender<()>,
    thread: std::thread::JoinHandle<Option<String>>,
}

impl BuildWatch {
    /// Stop watching; why the build was stopped, if it was.
    pub(crate) fn finish(self) -> Option<String> {
        let BuildWatch { _done, thread } = self;
        drop(_done);
        thread.join().ok().flatten()
    }
}

/// What a build may write, and why, for messages.
#[derive(Debug, Clone)]
pub struct Need {
    pub bytes: u64,
    pub why: String,
}

/// The margin in force and where it comes from.
#[derive(Debug, Clone)]
pub struct Margin {
    pub bytes: u64,
    pub source: String,
}

/// A build refused for lack of space (see [`Error::NoSpace`]).
#[derive(Debug)]
pub struct NoSpace {
    pub building: String,
    pub free: FreeSpace,
    pub need: Need,
    pub margin: Margin,
    pub folder: std::path::PathBuf,
    /// Own bytes of all branches' history, what `gc --history` can free.
    pub history: Option<u64>,
}

impl std::fmt::Display for NoSpace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "not enough free disk space to build {}: {} free on the file system of {} (of {}), building it \
             may write up to {} ({}), and pgtwig keeps at least {} free ({}) so that running branches never \
             run out of space. Nothing was changed. To free space: `pgtwig gc --history` removes point-in-time \
             history older than history_retention (`--older-than 0` all of it",
            self.building,
            human(self.free.available),
            self.folder.display(),
            human(self.free.total),
            human(self.need.bytes),
            self.need.why,
            human(self.margin.bytes),
            self.margin.source,
        )?;
        if let Some(h) = self.history {
            write!(f, "; the history holds {} now", human(h))?;
        }
        write!(
            f,
            "), `pgtwig branch delete NAME` removes a branch (`pgtwig branch list` shows what each one owns)"
        )
    }
}

/// What one branch costs on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BranchUsage {
    /// Bytes of its data directory no other file shares: what deleting it frees.
    pub own: u64,
    /// Bytes of its data directory still shared with its parent, clones or its history.
    pub shared: u64,
    /// Own bytes of its WAL archive and base snapshots: what `gc --history --older-than 0`
    /// frees. Blocks the bases still share with the data (or with each other) are not in it.
    pub history: u64,
    pub method: Method,
}

fn both(a: Method, b: Method) -> Method {
    if a == Method::Fiemap && b == Method::Fiemap {
        Method::Fiemap
    } else {
        Method::AllocatedBlocks
    }
}

fn io_error(what: &str, path: &Path) -> impl FnOnce(io::Error) -> Error {
    let what = format!("{what} {}", path.display());
    move |source| Error::Io { what, source }
}

fn resolve_margin(setting: Option<FreeSpaceMargin>, source: String, total: u64) -> Option<Margin> {
    match setting {
        Some(FreeSpaceMargin::Off) => None,
        Some(FreeSpaceMargin::Bytes(bytes)) => Some(Margin {
            bytes,
            source: format!("{source}; default {MARGIN_PERCENT} % of the file system, at least 1 GiB and at most 10 GiB"),
        }),
        None => Some(Margin {
            bytes: default_margin(total),
            source: format!(
                "{MARGIN_PERCENT} % of the file system, at least 1 GiB and at most 10 GiB; set free_space_margin in .pgtwig.toml to change it"
            ),
        }),
    }
}

/// Size of the WAL archive's segments from `first` (a WAL file name) on.
fn archived_wal_from(branch_dir: &Path, first: &str) -> u64 {
    let Ok(rd) = std::fs::read_dir(crate::history::archive_dir(branch_dir)) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.len() == 24 && first.len() == 24 && n[8..] >= first[8..]
        })
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// The margin setting in force — `PGTWIG_FREE_SPACE_MARGIN`, else `configured`
/// (`free_space_margin` in `.pgtwig.toml`; `None`: the default) — and where it comes from.
fn margin_setting(
    configured: Option<FreeSpaceMargin>,
) -> Result<(Option<FreeSpaceMargin>, String)> {
    Ok(match std::env::var(MARGIN_ENV) {
        // Set and empty is unset, as for PGTWIG_HOME.
        Ok(text) if !text.trim().is_empty() => (
            Some(
                text.parse::<FreeSpaceMargin>()
                    .map_err(|e| Error::Other(format!("{MARGIN_ENV}={text}: {e}")))?,
            ),
            MARGIN_ENV.to_string(),
        ),
        _ => (configured, "free_space_margin in .pgtwig.toml".into()),
    })
}

/// The margin a project whose `.pgtwig.toml` says `configured` keeps on a file system of
/// `total` bytes (`None` when the check is off), without opening its state (`pgtwig doctor`
/// before `init`).
pub fn margin_in_force(configured: Option<FreeSpaceMargin>, total: u64) -> Result<Option<Margin>> {
    let (setting, source) = margin_setting(configured)?;
    Ok(resolve_margin(setting, source, total))
}

impl LocalBackend {
    /// The margin to keep free (`free_space_margin` in `.pgtwig.toml`); `None`: the default.
    pub fn set_free_space_margin(&mut self, margin: Option<FreeSpaceMargin>) {
        self.free_space_margin = margin;
    }

    /// `history_retention` of `.pgtwig.toml`: what a failed start prunes to.
    pub fn set_history_retention(&mut self, retention: Duration) {
        self.history_retention = retention;
    }

    /// Free space where branches are built (the project's `tmp/`, beside `branches/`).
    pub fn free_space(&self) -> Result<FreeSpace> {
        let dir = self.home.tmp_dir();
        free_space(&dir).map_err(io_error("reading the free space of", &dir))
    }

    /// The margin setting in force (environment first, then `.pgtwig.toml`; `None`: the
    /// default) and where it comes from.
    fn margin_setting(&self) -> Result<(Option<FreeSpaceMargin>, String)> {
        margin_setting(self.free_space_margin)
    }

    /// The margin in force on a file system of `total` bytes; `None` when checks are off.
    pub fn margin(&self, total: u64) -> Result<Option<Margin>> {
        let (setting, source) = self.margin_setting()?;
        Ok(resolve_margin(setting, source, total))
    }

    /// Refuse to build `building` (e.g. `branch "x"`) when what it needs (`need`, estimated
    /// only when the check is on) would leave less than the margin free.
    pub(crate) fn check_space(
        &self,
        building: &str,
        need: impl FnOnce() -> Result<Need>,
    ) -> Result<()> {
        let (setting, source) = self.margin_setting()?;
        if setting == Some(FreeSpaceMargin::Off) {
            return Ok(());
        }
        let free = self.free_space()?;
        let Some(margin) = resolve_margin(setting, source, free.total) else {
            return Ok(());
        };
        let need = need()?;
        if free.available >= need.bytes.saturating_add(margin.bytes) {
            return Ok(());
        }
        let history = self.history_bytes().ok();
        Err(Error::NoSpace(Box::new(NoSpace {
            building: building.to_string(),
            free,
            need,
            margin,
            folder: self.home.dir().to_path_buf(),
            history,
        })))
    }

    /// While the build server of `data` runs, look at free space every 200 ms and, when it
    /// falls below the margin / [`BUILD_STOP_DIVISOR`], stop that server at once (immediate
    /// shutdown): whatever the estimate said, a build never takes the space running
    /// branches need. `None` when the check is off. [`BuildWatch::finish`] says why it
    /// stopped the build.
    pub(crate) fn watch_build(&self, building: &str, data: &Path) -> Result<Option<BuildWatch>> {
        use std::sync::mpsc::RecvTimeoutError;
        let (setting, source) = self.margin_setting()?;
        if setting == Some(FreeSpaceMargin::Off) {
            return Ok(None);
        }
        let dir = self.home.tmp_dir();
        let free = free_space(&dir).map_err(io_error("reading the free space of", &dir))?;
        let Some(margin) = resolve_margin(setting, source, free.total) else {
            return Ok(None);
        };
        let floor = margin.bytes / BUILD_STOP_DIVISOR;
        let (done, wait) = std::sync::mpsc::channel::<()>();
        let (building, data, folder) = (
            building.to_string(),
            data.to_path_buf(),
            self.home.dir().to_path_buf(),
        );
        let thread = std::thread::Builder::new()
            .name("pgtwig-build-watch".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = wait.recv_timeout(BUILD_WATCH_INTERVAL) {
                    let Ok(now) = free_space(&dir) else { continue };
                    if now.available < floor && crate::cluster::stop_immediately(&data) {
                        return Some(format!(
                            "stopped building {building}: free space on the file system of {} fell to {}, \
                             below half of the {} pgtwig keeps free for running branches ({}). The build \
                             was thrown away and nothing was changed; free space (`pgtwig gc --history`, \
                             `pgtwig branch delete NAME`) and run it again",
                            folder.display(),
                            human(now.available),
                            human(margin.bytes),
                            margin.source
                        ));
                    }
                }
                None
            })
            .map_err(|e| Error::Io {
                what: "starting the free-space watch".into(),
                source: e,
            })?;
        Ok(Some(BuildWatch {
            _done: done,
            thread,
        }))
    }

    /// Whether builds here are copy-on-write (probed once).
    fn clones_share_blocks(&self) -> bool {
        *self
            .reflink
            .get_or_init(|| crate::clone::supports_reflink(&self.home.tmp_dir()))
    }

    /// What cloning `parent` may write: its WAL and [`CLONE_OVERHEAD`] when clones are
    /// copy-on-write, its whole data directory when they are full copies.
    pub(crate) fn clone_need(&self, parent: &Branch) -> Need {
        let data = parent.data_dir();
        if self.clones_share_blocks() {
            let wal = pgtwig_core::fsutil::dir_size(&data.join("pg_wal")).unwrap_or(0);
            Need {
                bytes: wal + CLONE_OVERHEAD,
                why: format!(
                    "a copy-on-write clone of \"{}\": its WAL, {}, and {} for the clone's first start",
                    parent.name,
                    human(wal),
                    human(CLONE_OVERHEAD)
                ),
            }
        } else {
            let size = pgtwig_core::fsutil::dir_size(&data).unwrap_or(0);
            Need {
                bytes: size + CLONE_OVERHEAD,
                why: format!(
                    "a full copy of \"{}\" ({}): this file system cannot clone copy-on-write",
                    parent.name,
                    human(size)
                ),
            }
        }
    }

    /// [`check_space`](Self::check_space) for a clone of `parent` named `name`.
    pub(crate) fn check_space_for_clone(&self, name: &BranchName, parent: &Branch) -> Result<()> {
        self.check_space(
            &format!("branch \"{name}\""),
            || Ok(self.clone_need(parent)),
        )
    }

    /// For a build that clones `parent` and then rewrites its data (anonymize: masking,
    /// then `VACUUM FULL` of every table): the clone, a new copy of the data, and the WAL
    /// that writing it keeps at most ([`WAL_PEAK`]).
    pub(crate) fn check_space_for_rewrite(&self, name: &BranchName, parent: &Branch) -> Result<()> {
        self.check_space(&format!("branch \"{name}\""), || {
            let clone = self.clone_need(parent);
            let data = pgtwig_core::fsutil::dir_size(&parent.data_dir()).unwrap_or(0);
            let wal = data.min(WAL_PEAK);
            Ok(Need {
                bytes: clone.bytes + data + wal,
                why: format!(
                    "{}; then a rewrite of its data, {}, and up to {} of WAL while writing it",
                    clone.why,
                    human(data),
                    human(wal)
                ),
            })
        })
    }

    /// For a branch recovered from `base` of `parent` (`--at`): the clone of the base, and
    /// what replaying the archived WAL from the base on may write (at most that WAL again).
    pub(crate) fn check_space_for_recovery(
        &self,
        name: &BranchName,
        parent: &Branch,
        base: &Base,
    ) -> Result<()> {
        self.check_space(&format!("branch \"{name}\""), || {
            let wal = archived_wal_from(&parent.dir, &base.start_wal);
            Ok(Need {
                bytes: wal + CLONE_OVERHEAD,
                why: format!(
                    "a copy-on-write clone of a base of \"{}\", {} for its first start, and the pages that \
                     replaying {} of archived WAL rewrites",
                    parent.name,
                    human(CLONE_OVERHEAD),
                    human(wal)
                ),
            })
        })
    }

    /// For `pgtwig import` into `into`, before anything is dumped: the dump (at most the
    /// source's size — pg_dump compresses and leaves indexes out), the restored data (the
    /// source's size again), the WAL the restore keeps at most ([`WAL_PEAK`]), and the
    /// clone of the branch the data goes into (or a new cluster). `source_bytes`:
    /// `pg_database_size` of the source, when known.
    pub fn check_space_for_import(
        &self,
        into: &BranchName,
        source_bytes: Option<u64>,
    ) -> Result<()> {
        self.check_space(&format!("the import into \"{into}\""), || {
            let base = if self.exists(into) {
                self.clone_need(&self.get(into)?)
            } else {
                Need {
                    bytes: NEW_CLUSTER,
                    why: format!("a new cluster, {}", human(NEW_CLUSTER)),
                }
            };
            Ok(match source_bytes {
                Some(src) => Need {
                    bytes: base.bytes + 2 * src + src.min(WAL_PEAK),
                    why: format!(
                        "the dump and the restored data of a {} source database, up to {} of WAL while \
                         restoring, and {}",
                        human(src),
                        human(src.min(WAL_PEAK)),
                        base.why
                    ),
                },
                None => Need {
                    why: format!("{}; the source's size is not known", base.why),
                    ..base
                },
            })
        })
    }

    /// For a new root cluster (`initdb`).
    pub(crate) fn check_space_for_new_cluster(&self, name: &BranchName) -> Result<()> {
        self.check_space(&format!("branch \"{name}\""), || {
            Ok(Need {
                bytes: NEW_CLUSTER,
                why: "a new cluster (initdb)".into(),
            })
        })
    }

    /// What branch `name` costs on disk (see [`BranchUsage`]).
    pub fn usage(&self, name: &BranchName) -> Result<BranchUsage> {
        let dir = self.branch_dir(name);
        let measure = |p: &Path| fiemap::tree_usage(p).map_err(io_error("measuring", p));
        let (data, m1) = measure(&dir.join("data"))?;
        let (archive, m2) = measure(&crate::history::archive_dir(&dir))?;
        let (bases, m3) = measure(&crate::history::bases_dir(&dir))?;
        Ok(BranchUsage {
            own: data.own,
            shared: data.shared,
            history: archive.own + bases.own,
            method: both(both(m1, m2), m3),
        })
    }

    /// Own bytes of every branch's history.
    pub fn history_bytes(&self) -> Result<u64> {
        let mut total = Usage::default();
        for name in self.names()? {
            let dir = self.branch_dir(&name);
            for part in [
                crate::history::archive_dir(&dir),
                crate::history::bases_dir(&dir),
            ] {
                let (u, _) = fiemap::tree_usage(&part).map_err(io_error("measuring", &part))?;
                total.add(u);
            }
        }
        Ok(total.own)
    }

    /// A start of `name` failed with `source` (under the project lock): prune every branch's
    /// history to `history_retention` and, when that freed anything, try once more
    /// (`retry`). Otherwise the error, saying so when the disk is (nearly) full.
    pub(crate) fn after_failed_start(
        &self,
        name: &BranchName,
        source: ClusterError,
        retry: impl FnOnce() -> std::result::Result<(), ClusterError>,
    ) -> Result<()> {
        // Anything removed may be enough, even when it frees no block: a base sharing
        // blocks with the branch makes every write to them need a new one (copy-on-write).
        let (removed, freed) = match self.prune_all_history_locked(self.history_retention, false) {
            Ok(pruned) => pruned.iter().fold((0, 0), |(n, b), (_, p)| {
                (n + p.bases + p.wal_files, b + p.bytes)
            }),
            Err(e) => {
                tracing::warn!("pruning history after the failed start of \"{name}\": {e}");
                (0, 0)
            }
        };
        let source = if removed > 0 {
            tracing::warn!(
                "branch \"{name}\" did not start; pruned history older than history_retention \
                 ({removed} files or bases, {} of their own) and trying again",
                human(freed)
            );
            // XFS frees unlinked files' blocks in the background; a sync releases them now.
            let _ = crate::engine::sync_tree(&self.home.tmp_dir());
            match retry() {
                Ok(()) => return Ok(()),
                Err(again) => again,
            }
        } else {
            source
        };
        // Said first: the server's log may not show it (it could not be written either).
        let low = self.free_space().ok().and_then(|free| {
            let keep = match self.margin(free.total) {
                Ok(Some(m)) => m.bytes,
                _ => CLONE_OVERHEAD,
            };
            (free.available < keep).then(|| {
                format!(
                    "the file system of {} has only {} free (pgtwig keeps {}): free space with `pgtwig gc \
                     --history --older-than 0` (point-in-time history{}) or `pgtwig branch delete NAME`, then start \
                     the branch again",
                    self.home.dir().display(),
                    human(free.available),
                    human(keep),
                    self.history_bytes()
                        .map(|h| format!(", {} now", human(h)))
                        .unwrap_or_default()
                )
            })
        });
        Err(match low {
            Some(note) => Error::StartFailedLowSpace {
                name: name.clone(),
                source: Box::new(source),
                note,
            },
            None => Error::StartFailed {
                name: name.clone(),
                source,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_margin_is_five_percent_within_one_to_ten_gib() {
        assert_eq!(default_margin(300 << 20), 1 << 30);
        assert_eq!(default_margin(10 << 30), 1 << 30);
        assert_eq!(default_margin(100 << 30), 5 << 30);
        assert_eq!(default_margin(1 << 40), 10 << 30);
    }

    #[test]
    fn free_space_is_read() {
        let d = tempfile::tempdir().unwrap();
        let f = free_space(d.path()).unwrap();
        assert!(f.total > 0 && f.available <= f.total, "{f:?}");
    }

    #[test]
    fn the_refusal_says_what_is_free_needed_and_how_to_free_it() {
        let e = NoSpace {
            building: "branch \"x\"".into(),
            free: FreeSpace {
                available: 100 << 20,
                total: 400 << 20,
            },
            need: Need {
                bytes: 80 << 20,
                why: "a copy-on-write clone of \"main\"".into(),
            },
            margin: Margin {
                bytes: 1 << 30,
                source: "5 % of the file system, at least 1 GiB and at most 10 GiB".into(),
            },
            folder: "/var/lib/pgtwig/shop".into(),
            history: Some(30 << 20),
        }
        .to_string();
        for part in [
            "branch \"x\"",
            "100.0 MiB free",
            "of 400.0 MiB",
            "up to 80.0 MiB",
            "at least 1.0 GiB free",
            "Nothing was changed",
            "`pgtwig gc --history`",
            "the history holds 30.0 MiB",
            "`pgtwig branch delete NAME`",
        ] {
            assert!(e.contains(part), "{part:?} missing from: {e}");
        }
    }
}
