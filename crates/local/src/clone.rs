//! Cloning a directory tree copy-on-write, or by full copy where the file
//! system cannot share blocks.
//!
//! Reflinks (FICLONE on XFS and btrfs, clonefile on APFS) through the
//! `reflink-copy` crate: a clone of any size costs metadata only. The first
//! file decides: if the file system refuses to clone it, every file is
//! copied instead (with `copy_file_range` where the kernel offers it) and the
//! caller reports that to the user. Modes are preserved and, when pgtwig
//! runs as root, ownership goes to the server user.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::server_user::ServerUser;

/// How a branch's files came to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CloneMethod {
    /// Made by `initdb` (a root branch).
    Initdb,
    /// Copy-on-write clone: shares blocks with its parent until written.
    CopyOnWrite,
    /// Full copy: the file system could not clone.
    FullCopy,
}

impl CloneMethod {
    pub fn describe(self) -> &'static str {
        match self {
            CloneMethod::Initdb => "new cluster",
            CloneMethod::CopyOnWrite => "copy-on-write",
            CloneMethod::FullCopy => "full copy",
        }
    }
}

/// What to do with one entry while walking the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    Clone,
    /// Leave it out entirely.
    Skip,
    /// A directory: create it empty, leave out what it holds.
    EmptyDir,
}

/// Clones files one by one and remembers which method worked.
pub struct Cloner<'a> {
    user: &'a ServerUser,
    /// None until the first file decides.
    method: Option<CloneMethod>,
    /// Why copy-on-write was not used, for the user.
    pub fallback_reason: Option<String>,
    pub files: u64,
    pub bytes: u64,
    /// A live source may drop files while we walk it (temp files, dropped
    /// tables); the backup's WAL replay accounts for them.
    pub tolerate_vanishing: bool,
}

impl<'a> Cloner<'a> {
    pub fn new(user: &'a ServerUser) -> Self {
        Cloner {
            user,
            method: None,
            fallback_reason: None,
            files: 0,
            bytes: 0,
            tolerate_vanishing: false,
        }
    }

    /// The method used so far: copy-on-write if nothing had to be copied.
    pub fn method(&self) -> CloneMethod {
        self.method.unwrap_or(CloneMethod::CopyOnWrite)
    }

    /// Force full copies (used when the caller knows clones cannot work).
    pub fn force_copy(&mut self, reason: String) {
        self.method = Some(CloneMethod::FullCopy);
        self.fallback_reason = Some(reason);
    }

    /// Clone one regular file. Returns false if the source vanished (and
    /// vanishing is tolerated).
    pub fn clone_file(&mut self, src: &Path, dst: &Path) -> io::Result<bool> {
        let meta = match fs::symlink_metadata(src) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.tolerate_vanishing => {
                return Ok(false)
            }
            Err(e) => return Err(with_path(e, "reading", src)),
        };
        let result = match self.method {
            Some(CloneMethod::FullCopy) => fs::copy(src, dst).map(|_| ()),
            _ => match reflink_copy::reflink(src, dst) {
                Ok(()) => {
                    self.method = Some(CloneMethod::CopyOnWrite);
                    Ok(())
                }
                Err(e) if self.method.is_none() && refuses_reflink(&e) => {
                    let _ = fs::remove_file(dst);
                    self.method = Some(CloneMethod::FullCopy);
                    self.fallback_reason = Some(e.to_string());
                    fs::copy(src, dst).map(|_| ())
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => {}
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    && self.tolerate_vanishing
                    && !src.exists() =>
            {
                let _ = fs::remove_file(dst);
                return Ok(false);
            }
            Err(e) => return Err(with_path(e, "cloning", src)),
        }
        // Both reflink_copy::reflink and fs::copy carry the source's mode over.
        self.user
            .own(dst)
            .map_err(|e| with_path(e, "changing owner of", dst))?;
        self.files += 1;
        self.bytes += meta.len();
        Ok(true)
    }

    /// Create `dst` as a directory with `src`'s mode, owned by the server user.
    pub fn make_dir(&self, src: &Path, dst: &Path) -> io::Result<()> {
        let mode = fs::metadata(src)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o700);
        fs::create_dir(dst).map_err(|e| with_path(e, "creating", dst))?;
        fs::set_permissions(dst, fs::Permissions::from_mode(mode))?;
        self.user
            .own(dst)
            .map_err(|e| with_path(e, "changing owner of", dst))
    }

    /// Clone the tree under `src` into `dst` (which must not exist).
    /// `visit(relative_path, is_dir)` chooses what to leave out.
    pub fn clone_tree(
        &mut self,
        src: &Path,
        dst: &Path,
        visit: &dyn Fn(&Path, bool) -> Visit,
    ) -> io::Result<()> {
        self.make_dir(src, dst)?;
        self.walk(src, dst, Path::new(""), visit)
    }

    fn walk(
        &mut self,
        src_root: &Path,
        dst_root: &Path,
        rel: &Path,
        visit: &dyn Fn(&Path, bool) -> Visit,
    ) -> io::Result<()> {
        let dir = src_root.join(rel);
        let entries = match fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.tolerate_vanishing => {
                return Ok(())
            }
            Err(e) => return Err(with_path(e, "reading", &dir)),
        };
        for entry in entries {
            let entry = entry?;
            let rel_child = rel.join(entry.file_name());
            let ft = match entry.file_type() {
                Ok(ft) => ft,
                Err(e) if e.kind() == io::ErrorKind::NotFound && self.tolerate_vanishing => {
                    continue
                }
                Err(e) => return Err(e),
            };
            let src = src_root.join(&rel_child);
            let dst = dst_root.join(&rel_child);
            match visit(&rel_child, ft.is_dir()) {
                Visit::Skip => continue,
                Visit::EmptyDir => {
                    self.make_dir(&src, &dst)?;
                    continue;
                }
                Visit::Clone => {}
            }
            if ft.is_dir() {
                self.make_dir(&src, &dst)?;
                self.walk(src_root, dst_root, &rel_child, visit)?;
            } else if ft.is_symlink() {
                let target = fs::read_link(&src)?;
                std::os::unix::fs::symlink(&target, &dst)
                    .map_err(|e| with_path(e, "creating", &dst))?;
                self.user.own(&dst)?;
            } else if ft.is_file() {
                self.clone_file(&src, &dst)?;
            }
            // Sockets, fifos and devices have no place in a data directory: left out.
        }
        Ok(())
    }
}

/// Errors that mean "this file system (or this pair of places) cannot clone".
fn refuses_reflink(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), Unsupported | CrossesDevices | InvalidInput)
        || matches!(e.raw_os_error(), Some(code) if code == nix::libc::EOPNOTSUPP || code == nix::libc::EXDEV || code == nix::libc::EINVAL || code == nix::libc::ENOTTY || code == nix::libc::ENOSYS)
}

fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// Whether `dir`'s file system can clone files copy-on-write (probes with a
/// small file pair, then removes them).
pub fn supports_reflink(dir: &Path) -> bool {
    let a = dir.join(format!(".pgtwig-reflink-probe-{}", std::process::id()));
    let b = dir.join(format!(
        ".pgtwig-reflink-probe-{}.clone",
        std::process::id()
    ));
    let ok = fs::write(&a, b"probe").is_ok() && reflink_copy::reflink(&a, &b).is_ok();
    let _ = fs::remove_file(&a);
    let _ = fs::remove_file(&b);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> ServerUser {
        ServerUser {
            name: "me".into(),
            uid: 0,
            gid: 0,
            switch: false,
        }
    }

    #[test]
    fn clones_a_tree_with_modes_and_skips() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("base/1")).unwrap();
        fs::create_dir_all(src.join("pg_wal")).unwrap();
        fs::write(src.join("base/1/123"), vec![7u8; 100_000]).unwrap();
        fs::write(src.join("pg_wal/000000010000000000000001"), b"wal").unwrap();
        fs::write(src.join("postmaster.pid"), b"1").unwrap();
        fs::set_permissions(src.join("base/1/123"), fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::symlink("base", src.join("link")).unwrap();
        let user = me();
        let mut c = Cloner::new(&user);
        c.clone_tree(
            &src,
            &d.path().join("dst"),
            &|rel, _| match rel.to_str().unwrap() {
                "postmaster.pid" => Visit::Skip,
                "pg_wal" => Visit::EmptyDir,
                _ => Visit::Clone,
            },
        )
        .unwrap();
        let dst = d.path().join("dst");
        assert_eq!(
            fs::read(dst.join("base/1/123")).unwrap(),
            vec![7u8; 100_000]
        );
        assert_eq!(
            fs::metadata(dst.join("base/1/123"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        assert!(!dst.join("postmaster.pid").exists());
        assert!(
            dst.join("pg_wal").is_dir()
                && fs::read_dir(dst.join("pg_wal")).unwrap().next().is_none()
        );
        assert_eq!(fs::read_link(dst.join("link")).unwrap(), Path::new("base"));
        assert_eq!(c.files, 1);
        // Writing the clone never changes the source.
        fs::write(dst.join("base/1/123"), b"changed").unwrap();
        assert_eq!(
            fs::read(src.join("base/1/123")).unwrap(),
            vec![7u8; 100_000]
        );
        assert_eq!(
            c.method() == CloneMethod::CopyOnWrite,
            supports_reflink(d.path())
        );
    }
}
