//! Cloning a directory tree copy-on-write, or by full copy where the file
//! system cannot share blocks.
//!
//! Reflinks (FICLONE on XFS and btrfs, clonefile on APFS) through the
//! `reflink-copy` crate: a clone of any size costs metadata only. The first
//! file decides: if the file system refuses to clone it, every file is
//! copied instead (with `copy_file_range` where the kernel offers it) and the
//! caller reports that to the user. Modes are preserved and, when pgtwig
//! runs as root, ownership goes to the server user once the clone is done
//! ([`Cloner::give_to_server`]).
//!
//! The source is the server user's tree and pgtwig may be root, so the
//! walk follows no link (every entry is opened from its folder's
//! descriptor with `O_NOFOLLOW`; links are cloned as links), and the clone
//! stays root's while it is filled, so the server user cannot plant a link
//! in it that root would then write through.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::beneath::{list_dir, open_at, open_dir, open_dir_beneath, Kind};
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

    /// Clone the regular file `rel` under the folder `src_root` to `dst`,
    /// following no symbolic link below `src_root`. Returns false if the
    /// source vanished (and vanishing is tolerated).
    pub fn clone_file(&mut self, src_root: &Path, rel: &Path, dst: &Path) -> io::Result<bool> {
        let src = src_root.join(rel);
        let (Some(folder), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(with_path(
                io::ErrorKind::InvalidInput.into(),
                "cloning",
                &src,
            ));
        };
        let dir = match open_dir_beneath(src_root, folder) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.tolerate_vanishing => {
                return Ok(false)
            }
            Err(e) => return Err(e),
        };
        self.clone_at(&dir, name, &src, dst)
    }

    /// Clone the regular file `name` in the open folder `dir` (`src` names
    /// it for messages), opened without following a link.
    fn clone_at(
        &mut self,
        dir: &fs::File,
        name: &OsStr,
        src: &Path,
        dst: &Path,
    ) -> io::Result<bool> {
        let file = match open_at(dir, name, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && self.tolerate_vanishing => {
                return Ok(false)
            }
            Err(e) => return Err(with_path(e, "opening", src)),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(with_path(
                io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
                "cloning",
                src,
            ));
        }
        let result = match self.method {
            Some(CloneMethod::FullCopy) => copy_open_file(&file, meta.permissions(), dst),
            _ => match reflink_copy::reflink_file_to_path(&file, dst) {
                Ok(()) => {
                    self.method = Some(CloneMethod::CopyOnWrite);
                    Ok(())
                }
                Err(e) if self.method.is_none() && refuses_reflink(&e) => {
                    let _ = fs::remove_file(dst);
                    self.method = Some(CloneMethod::FullCopy);
                    self.fallback_reason = Some(e.to_string());
                    copy_open_file(&file, meta.permissions(), dst)
                }
                Err(e) => Err(e),
            },
        };
        // The source is open: it cannot vanish any more.
        result.map_err(|e| with_path(e, "cloning", src))?;
        self.files += 1;
        self.bytes += meta.len();
        Ok(true)
    }

    /// Create `dst` as a directory with `src`'s mode. It stays pgtwig's
    /// until [`give_to_server`](Self::give_to_server): while pgtwig (root)
    /// fills it, the server user cannot plant links in it.
    pub fn make_dir(&self, src: &Path, dst: &Path) -> io::Result<()> {
        let mode = fs::symlink_metadata(src)
            .map(|m| m.permissions().mode() & 0o7777)
            .unwrap_or(0o700);
        make_dir_with_mode(mode, dst)
    }

    /// Clone the tree under `src` into `dst` (which must not exist).
    /// `visit(relative_path, is_dir)` chooses what to leave out. No link in
    /// the source is followed: the source tree is the server user's, and
    /// pgtwig may be root (a link swapped in for a data file must not make
    /// root copy a file of its own into a clone the server user can read).
    pub fn clone_tree(
        &mut self,
        src: &Path,
        dst: &Path,
        visit: &dyn Fn(&Path, bool) -> Visit,
    ) -> io::Result<()> {
        self.make_dir(src, dst)?;
        let root = open_dir(src)?;
        self.walk(&root, src, dst, Path::new(""), visit)
    }

    /// Hand a finished clone to the server user (when pgtwig runs as root),
    /// deepest entries first and `dst` last, without following links:
    /// until then only pgtwig could change anything in it.
    pub fn give_to_server(&self, dst: &Path) -> io::Result<()> {
        if !self.user.switch {
            return Ok(());
        }
        for entry in fs::read_dir(dst).map_err(|e| with_path(e, "reading", dst))? {
            let entry = entry?;
            let path = entry.path();
            if entry.file_type()?.is_dir() {
                self.give_to_server(&path)?;
            } else {
                self.user
                    .own(&path)
                    .map_err(|e| with_path(e, "changing owner of", &path))?;
            }
        }
        self.user
            .own(dst)
            .map_err(|e| with_path(e, "changing owner of", dst))
    }

    fn walk(
        &mut self,
        dir: &fs::File,
        src_root: &Path,
        dst_root: &Path,
        rel: &Path,
        visit: &dyn Fn(&Path, bool) -> Visit,
    ) -> io::Result<()> {
        let here = src_root.join(rel);
        let entries = list_dir(dir).map_err(|e| with_path(e, "reading", &here))?;
        for (name, kind) in entries {
            let rel_child = rel.join(&name);
            let src = src_root.join(&rel_child);
            let dst = dst_root.join(&rel_child);
            let is_dir = kind == Kind::Dir;
            match visit(&rel_child, is_dir) {
                Visit::Skip => continue,
                Visit::EmptyDir => {
                    self.make_dir(&src, &dst)?;
                    continue;
                }
                Visit::Clone => {}
            }
            match kind {
                Kind::Dir => {
                    let child = match open_at(dir, &name, true) {
                        Ok(c) => c,
                        Err(e)
                            if e.kind() == io::ErrorKind::NotFound && self.tolerate_vanishing =>
                        {
                            continue
                        }
                        Err(e) => return Err(with_path(e, "opening", &src)),
                    };
                    let mode = child.metadata()?.permissions().mode() & 0o7777;
                    make_dir_with_mode(mode, &dst)?;
                    self.walk(&child, src_root, dst_root, &rel_child, visit)?;
                }
                Kind::Symlink => {
                    let target = match nix::fcntl::readlinkat(dir, name.as_os_str()) {
                        Ok(t) => t,
                        Err(nix::errno::Errno::ENOENT) if self.tolerate_vanishing => continue,
                        Err(e) => return Err(with_path(e.into(), "reading", &src)),
                    };
                    std::os::unix::fs::symlink(&target, &dst)
                        .map_err(|e| with_path(e, "creating", &dst))?;
                }
                Kind::File => {
                    self.clone_at(dir, &name, &src, &dst)?;
                }
                // Sockets, fifos and devices have no place in a data directory: left out.
                Kind::Other => {}
            }
        }
        Ok(())
    }
}

fn make_dir_with_mode(mode: u32, dst: &Path) -> io::Result<()> {
    fs::create_dir(dst).map_err(|e| with_path(e, "creating", dst))?;
    fs::set_permissions(dst, fs::Permissions::from_mode(mode))
}

/// Copy an open file into a new file `dst` with the source's mode.
fn copy_open_file(from: &fs::File, mode: fs::Permissions, dst: &Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut to = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .mode(0o600)
        .open(dst)?;
    // From the start: a failed reflink attempt may not have moved it, but be sure.
    let mut reader = from;
    std::io::Seek::seek(&mut reader, io::SeekFrom::Start(0))?;
    io::copy(&mut reader, &mut to)?;
    to.set_permissions(mode)
}

/// Errors that mean "this file system (or this pair of places) cannot clone".
fn refuses_reflink(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    matches!(e.kind(), Unsupported | CrossesDevices | InvalidInput)
        || matches!(e.raw_os_error(), Some(code) if code == nix::libc::EOPNOTSUPP || code == nix::libc::EXDEV || code == nix::libc::EINVAL || code == nix::libc::ENOTTY || code == nix::libc::ENOSYS)
}

pub(crate) fn with_path(e: io::Error, what: &str, path: &Path) -> io::Error {
    if e.raw_os_error() == Some(nix::libc::ELOOP) {
        return io::Error::new(
            e.kind(),
            format!(
                "{} is a symbolic link (or passes through one), where a data directory has none; pgtwig \
                 does not follow it — remove it",
                path.display()
            ),
        );
    }
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

    /// The source is the server user's: a link in it is cloned as a link
    /// and never read through, in the tree walk or for a single file.
    #[test]
    fn links_in_the_source_are_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let secret_dir = d.path().join("root-only");
        fs::create_dir(&secret_dir).unwrap();
        fs::write(secret_dir.join("pg_control"), b"secret").unwrap();
        let src = d.path().join("src");
        fs::create_dir_all(src.join("base")).unwrap();
        fs::write(src.join("base/1"), b"data").unwrap();
        std::os::unix::fs::symlink(&secret_dir, src.join("global")).unwrap();
        std::os::unix::fs::symlink(secret_dir.join("pg_control"), src.join("base/2")).unwrap();
        let user = me();
        let mut c = Cloner::new(&user);
        let dst = d.path().join("dst");
        c.clone_tree(&src, &dst, &|_, _| Visit::Clone).unwrap();
        assert_eq!(c.files, 1, "only the plain file was cloned");
        assert!(fs::symlink_metadata(dst.join("global"))
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(fs::symlink_metadata(dst.join("base/2"))
            .unwrap()
            .file_type()
            .is_symlink());

        let err = c
            .clone_file(&src, Path::new("global/pg_control"), &d.path().join("copy"))
            .unwrap_err();
        assert!(
            err.to_string().contains("src/global is a symbolic link"),
            "{err}"
        );
        assert!(c
            .clone_file(&src, Path::new("base/2"), &d.path().join("copy"))
            .is_err());
        assert!(!d.path().join("copy").exists());
    }
}
