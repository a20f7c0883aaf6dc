//! Reaching into the server user's trees (data directories) without
//! following links: pgtwig may be root there, and the server user owns
//! every entry, so each is opened from its folder's descriptor with
//! `O_NOFOLLOW` and removed with `unlinkat` — what was checked is what is
//! used, and a link swapped in is refused instead of followed.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Dir,
    File,
    Symlink,
    Other,
}

/// The entries of an open folder, with their kinds (never following links).
pub(crate) fn list_dir(dir: &fs::File) -> io::Result<Vec<(OsString, Kind)>> {
    use nix::dir::{Dir, Type};
    use nix::fcntl::OFlag;
    use nix::sys::stat::Mode;
    use std::os::unix::ffi::OsStrExt;
    let mut d = Dir::openat(
        dir,
        ".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in d.iter() {
        let entry = entry?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        let kind = match entry.file_type() {
            Some(t) => Some(t),
            // Some file systems do not say: ask without following.
            None => nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                .ok()
                .map(|st| match st.st_mode & nix::libc::S_IFMT {
                    nix::libc::S_IFDIR => Type::Directory,
                    nix::libc::S_IFLNK => Type::Symlink,
                    nix::libc::S_IFREG => Type::File,
                    _ => Type::Socket,
                }),
        };
        let kind = match kind {
            Some(Type::Directory) => Kind::Dir,
            Some(Type::File) => Kind::File,
            Some(Type::Symlink) => Kind::Symlink,
            // Vanished (fstatat failed) or not a file: left out.
            _ => Kind::Other,
        };
        out.push((name.to_os_string(), kind));
    }
    Ok(out)
}

/// Open a folder by path, refusing a link at its end.
pub(crate) fn open_dir(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| crate::clone::with_path(e, "opening", path))
}

/// Open `name` in `dir`, a folder (`want_dir`) or a file, never through a link.
pub(crate) fn open_at(dir: &fs::File, name: &OsStr, want_dir: bool) -> io::Result<fs::File> {
    use nix::fcntl::OFlag;
    let mut flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK;
    if want_dir {
        flags |= OFlag::O_DIRECTORY;
    }
    match nix::fcntl::openat(dir, name, flags, nix::sys::stat::Mode::empty()) {
        Ok(fd) => Ok(fs::File::from(fd)),
        // O_DIRECTORY on a link says "not a directory": say what it is.
        Err(nix::errno::Errno::ENOTDIR)
            if want_dir
                && nix::sys::stat::fstatat(dir, name, nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW)
                    .is_ok_and(|st| st.st_mode & nix::libc::S_IFMT == nix::libc::S_IFLNK) =>
        {
            Err(nix::errno::Errno::ELOOP.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Open the folder `rel` under `root`, following no link below `root`.
pub(crate) fn open_dir_beneath(root: &Path, rel: &Path) -> io::Result<fs::File> {
    let mut dir = open_dir(root)?;
    for part in rel.iter() {
        dir = open_at(&dir, part, true)
            .map_err(|e| crate::clone::with_path(e, "opening", &root.join(rel)))?;
    }
    Ok(dir)
}

/// Remove the entry `name` (not a folder) from the open folder `dir`; a
/// link is removed itself, never what it names.
pub(crate) fn remove_at(dir: &fs::File, name: &OsStr) -> io::Result<()> {
    nix::unistd::unlinkat(dir, name, nix::unistd::UnlinkatFlags::NoRemoveDir)
        .map_err(io::Error::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_behind_links_are_refused_and_links_removed_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let outside = d.path().join("etc");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("passwd"), "keep").unwrap();
        let data = d.path().join("data");
        fs::create_dir_all(data.join("pg_wal")).unwrap();
        std::os::unix::fs::symlink(&outside, data.join("pg_wal/archive_status")).unwrap();
        std::os::unix::fs::symlink(outside.join("passwd"), data.join("pg_wal/seg")).unwrap();

        let wal = open_dir_beneath(&data, Path::new("pg_wal")).unwrap();
        let err = open_at(&wal, OsStr::new("archive_status"), true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(nix::libc::ELOOP));
        assert!(open_dir_beneath(&data, Path::new("pg_wal/archive_status")).is_err());
        let mut names = list_dir(&wal).unwrap();
        names.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            names,
            vec![
                (OsString::from("archive_status"), Kind::Symlink),
                (OsString::from("seg"), Kind::Symlink)
            ]
        );
        remove_at(&wal, OsStr::new("seg")).unwrap();
        assert!(!data.join("pg_wal/seg").exists());
        assert_eq!(fs::read_to_string(outside.join("passwd")).unwrap(), "keep");
    }
}
