//! Crash-safe file helpers and the per-project lock.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use crate::private;

/// Write `bytes` to `path` so that a crash leaves either the old or the new
/// content, never a mix: write a sibling temp file, fsync it, rename it over
/// `path`, then fsync the directory so the rename itself is durable. The
/// temp file is made new (`O_EXCL`, `O_NOFOLLOW`) with mode 0600, so the
/// result is private and nothing planted under the temp name is written
/// through.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    {
        let mut f = match private::create_new(&tmp) {
            // Left by a killed process that had our pid: the name, not the
            // file, is removed (unlink never follows a link).
            Err(e) if fs::symlink_metadata(&tmp).is_ok() => {
                fs::remove_file(&tmp).map_err(|_| e)?;
                private::create_new(&tmp)?
            }
            other => other?,
        };
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)
}

/// `path` with symbolic links and `..` resolved, or `path` itself when it cannot be (it is
/// gone): the one spelling of a folder used as a key (work trees in state.json).
pub fn canonical(path: &Path) -> std::path::PathBuf {
    path.canonicalize().unwrap_or_else(|_| path.to_path_buf())
}

/// Fsync a directory, making renames and creations inside it durable.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// An exclusive lock on one project's state. The CLI, the git hook and the
/// daemon all take it before changing branches, so they never interleave.
/// Released when dropped (or when the process dies: it is an OS file lock,
/// `flock` on Unix, so a killed hook never leaves it held).
#[derive(Debug)]
pub struct ProjectLock {
    file: File,
    path: PathBuf,
}

impl ProjectLock {
    /// Block until the lock at `path` is ours.
    pub fn acquire(path: &Path) -> io::Result<ProjectLock> {
        let file = open_lock_file(path)?;
        file.lock()?;
        Ok(ProjectLock::held(file, path))
    }

    /// Take the lock only if nobody holds it.
    pub fn try_acquire(path: &Path) -> io::Result<Option<ProjectLock>> {
        let file = open_lock_file(path)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(ProjectLock::held(file, path))),
            Err(fs::TryLockError::WouldBlock) => Ok(None),
            Err(fs::TryLockError::Error(e)) => Err(e),
        }
    }

    /// Take the lock, waiting at most `wait`; `Err(holder)` when it stayed taken, with what
    /// holds it (see [`ProjectLock::holder`]).
    pub fn acquire_within(
        path: &Path,
        wait: std::time::Duration,
    ) -> io::Result<Result<ProjectLock, String>> {
        let deadline = std::time::Instant::now() + wait;
        loop {
            if let Some(lock) = ProjectLock::try_acquire(path)? {
                return Ok(Ok(lock));
            }
            if std::time::Instant::now() >= deadline {
                return Ok(Err(ProjectLock::holder(path)));
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// What holds the lock at `path`, as its holder recorded it ("`pgtwig anonymize …`
    /// (pid 123)"), for "pgtwig is busy with …" messages.
    pub fn holder(path: &Path) -> String {
        private::read_to_string(&holder_path(path))
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .unwrap_or_else(|| "another command".into())
    }

    fn held(file: File, path: &Path) -> ProjectLock {
        // Best effort: only read when someone waits for the lock.
        let args: Vec<String> = std::env::args().skip(1).collect();
        let what = format!("`pgtwig {}` (pid {})", args.join(" "), std::process::id());
        let _ = write_atomic(&holder_path(path), what.as_bytes());
        ProjectLock {
            file,
            path: path.to_path_buf(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Where the holder of the lock at `path` says who it is: `lock` → `lock.holder`.
fn holder_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".holder");
    path.with_file_name(name)
}

/// A lock file is private (0600) like everything in the state folder, and
/// never a link to somewhere else.
fn open_lock_file(path: &Path) -> io::Result<File> {
    private::open_append(path)
}

impl Drop for ProjectLock {
    fn drop(&mut self) {
        let _ = self.file.unlock();
    }
}

/// Total logical size in bytes of the files under `dir` (like `du
/// --apparent-size`). Copy-on-write clones share blocks, so this is the size
/// a full copy would take, not what the clone costs.
pub fn dir_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = match fs::read_dir(&d) {
            Ok(e) => e,
            // Files can vanish under a running server; size is advisory.
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = match entry.metadata() {
                Ok(m) => m,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.len();
            }
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_atomic_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("meta.json");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("meta.json")]);
    }

    #[test]
    fn write_atomic_is_private_and_follows_no_planted_temp() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.json");
        let outside = dir.path().join("outside");
        fs::write(&outside, "untouched").unwrap();
        let tmp_name = dir
            .path()
            .join(format!(".state.json.tmp-{}", std::process::id()));
        std::os::unix::fs::symlink(&outside, &tmp_name).unwrap();
        write_atomic(&p, b"{}").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"{}");
        assert_eq!(
            fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(fs::read_to_string(&outside).unwrap(), "untouched");
        assert!(fs::symlink_metadata(&tmp_name).is_err());
    }

    #[test]
    fn lock_is_exclusive() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("lock");
        let held = ProjectLock::acquire(&p).unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&p).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(ProjectLock::try_acquire(&p).unwrap().is_none());
        drop(held);
        assert!(ProjectLock::try_acquire(&p).unwrap().is_some());
    }
}
