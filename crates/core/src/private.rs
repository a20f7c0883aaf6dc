//! Files and folders nobody else can read or redirect.
//!
//! A project's state folder holds what other users of the machine must not
//! see (server logs record failed `ALTER ROLE … PASSWORD` statements) and
//! files that pgtwig opens with its own rights — root's, when it runs as
//! root. So: folders 0700 (0710 where the server user must pass through,
//! see `pgtwig_local::server_user`), files 0600, and every file pgtwig opens
//! for writing is opened without following a symbolic link at its end
//! (`O_NOFOLLOW`) and checked to be a plain file of its own with one name
//! (no hard link to something else) before a byte is written. A planted
//! link is an error naming it, never followed.
//!
//! Everything here works on an open descriptor (`fchmod`, `fchown`,
//! `fstat`), so what is checked is what is changed.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use nix::libc;

/// Mode of every file pgtwig writes in a state folder.
pub const FILE_MODE: u32 = 0o600;

/// Open flags for any file pgtwig creates or opens in a state folder: no
/// link followed at the end of the path, and no blocking on a FIFO someone
/// planted (std adds `O_CLOEXEC` itself).
const SAFE_FLAGS: i32 = libc::O_NOFOLLOW | libc::O_NONBLOCK;

fn is_link_error(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::ELOOP)
}

/// The error for a symbolic link found where pgtwig keeps a file of its own.
fn link_refused(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is a symbolic link; remove it. pgtwig does not follow links in its state folder \
             (one could make it write or read a file elsewhere)",
            path.display()
        ),
    )
}

/// The error for something other than a plain file of ours with one name.
fn not_plain(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is {why}, not a file pgtwig made; remove it and retry",
            path.display()
        ),
    )
}

fn with_path(path: &Path, what: &str) -> impl FnOnce(io::Error) -> io::Error {
    let path = path.to_path_buf();
    let what = what.to_string();
    move |e| {
        if is_link_error(&e) {
            link_refused(&path)
        } else {
            io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
        }
    }
}

fn open_safely(path: &Path, options: &mut OpenOptions) -> io::Result<File> {
    options
        .custom_flags(SAFE_FLAGS)
        .mode(FILE_MODE)
        .open(path)
        .map_err(with_path(path, "opening"))
}

/// Check an opened file is a plain file with one name, owned by us (or by
/// one of `also_owners`), then clear `O_NONBLOCK` so whoever gets the
/// descriptor (a server's stdout) sees an ordinary file.
fn check_plain(file: &File, path: &Path, also_owners: &[u32]) -> io::Result<()> {
    let meta = file.metadata()?;
    if !meta.file_type().is_file() {
        return Err(not_plain(path, "not a regular file"));
    }
    if meta.nlink() != 1 {
        return Err(not_plain(path, "a hard link"));
    }
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me && !also_owners.contains(&meta.uid()) {
        return Err(not_plain(path, &format!("owned by uid {}", meta.uid())));
    }
    use std::os::fd::AsFd;
    let fd = file.as_fd();
    let flags = nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_GETFL).map_err(io::Error::from)?;
    let flags = nix::fcntl::OFlag::from_bits_retain(flags) & !nix::fcntl::OFlag::O_NONBLOCK;
    nix::fcntl::fcntl(fd, nix::fcntl::FcntlArg::F_SETFL(flags)).map_err(io::Error::from)?;
    Ok(())
}

fn restrict_mode(file: &File, mode: u32) -> io::Result<()> {
    if file.metadata()?.mode() & 0o7777 != mode {
        file.set_permissions(fs::Permissions::from_mode(mode))?;
    }
    Ok(())
}

/// Open (creating it 0600 if missing) a file of ours to append to: a
/// server's `server.log`, the daemon's `daemon.log`, a lock file. A
/// symbolic link there is an error naming it; so is anything but a plain
/// file of ours with one name.
pub fn open_append(path: &Path) -> io::Result<File> {
    let file = open_safely(path, OpenOptions::new().create(true).append(true))?;
    check_plain(&file, path, &[])?;
    restrict_mode(&file, FILE_MODE)?;
    Ok(file)
}

/// Open a file of ours for reading without following a link at its end
/// (reading a log for an error message must not show another file).
pub fn open_read(path: &Path) -> io::Result<File> {
    let file = open_safely(path, OpenOptions::new().read(true))?;
    check_plain(&file, path, &[])?;
    Ok(file)
}

/// Read a file of ours to a string, without following a link at its end.
pub fn read_to_string(path: &Path) -> io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    open_read(path)?
        .read_to_string(&mut text)
        .map_err(with_path(path, "reading"))?;
    Ok(text)
}

/// How [`write_file`] treats what is already there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteMode {
    /// Replace the content (the file is created when missing).
    Replace,
    /// Add at the end (the file is created when missing).
    Append,
}

/// Write `bytes` into `path` with pgtwig's rights but without following a
/// link or writing through a hard link, in a folder another user (the
/// server user) owns: created 0600 when missing; an existing file must be
/// ours or `owner`'s, and is given to `owner` (uid, gid) after writing.
/// For the few files pgtwig writes inside a data directory.
pub fn write_file(
    path: &Path,
    bytes: &[u8],
    how: WriteMode,
    owner: Option<(u32, u32)>,
) -> io::Result<()> {
    let mut options = OpenOptions::new();
    options.create(true);
    match how {
        WriteMode::Replace => options.write(true),
        WriteMode::Append => options.append(true),
    };
    let mut file = open_safely(path, &mut options)?;
    let also: Vec<u32> = owner.map(|(uid, _)| uid).into_iter().collect();
    check_plain(&file, path, &also)?;
    if how == WriteMode::Replace {
        // Truncated only now that it is known to be ours: O_TRUNC would have
        // emptied a hard-linked file before the check.
        file.set_len(0)?;
    }
    file.write_all(bytes).map_err(with_path(path, "writing"))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&file, Some(uid), Some(gid))
            .map_err(with_path(path, "changing the owner of"))?;
    }
    Ok(())
}

/// Create `path` as a new file (0600) that must not exist yet, without
/// following a link; for temp files that are renamed into place.
pub fn create_new(path: &Path) -> io::Result<File> {
    open_safely(path, OpenOptions::new().write(true).create_new(true))
}

/// [`secure_dir`], creating the folder first when it is missing.
pub fn make_dir(path: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    match fs::create_dir(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(with_path(path, "creating")(e)),
    }
    secure_dir(path, mode, uid, gid)
}

/// Give the existing folder `path` exactly `mode`, and owner `uid` / group
/// `gid` where given (new folders get them right after `mkdir`; an existing
/// project made by an older pgtwig is tightened). A symbolic link there is
/// an error naming it; a missing folder is `NotFound`.
pub fn secure_dir(path: &Path, mode: u32, uid: Option<u32>, gid: Option<u32>) -> io::Result<()> {
    let dir = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| {
            if is_link_error(&e) || e.raw_os_error() == Some(libc::ENOTDIR) {
                match fs::symlink_metadata(path) {
                    Ok(m) if m.file_type().is_symlink() => link_refused(path),
                    _ => not_plain(path, "not a folder"),
                }
            } else if e.kind() == io::ErrorKind::NotFound {
                e
            } else {
                with_path(path, "opening")(e)
            }
        })?;
    let meta = dir.metadata()?;
    let wrong_uid = uid.is_some_and(|u| u != meta.uid());
    let wrong_gid = gid.is_some_and(|g| g != meta.gid());
    if wrong_uid || wrong_gid {
        std::os::unix::fs::fchown(&dir, uid, gid)
            .map_err(with_path(path, "changing the owner of"))?;
    }
    // After fchown: changing the owner clears set-id bits.
    restrict_mode(&dir, mode).map_err(with_path(path, "setting the mode of"))?;
    Ok(())
}

/// Tighten an existing file of ours to 0600 (a project made by an older
/// pgtwig). Missing files are fine. Links, hard links and other users'
/// files are left alone here: whoever opens them next refuses them with a
/// clear error.
pub fn secure_file(path: &Path) -> io::Result<()> {
    let file = match open_safely(path, OpenOptions::new().read(true)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(_) if fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink()) => {
            return Ok(())
        }
        Err(e) => return Err(e),
    };
    if check_plain(&file, path, &[]).is_err() {
        return Ok(());
    }
    restrict_mode(&file, FILE_MODE).map_err(with_path(path, "setting the mode of"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn logs_are_private_and_links_refused() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("server.log");
        open_append(&log).unwrap().write_all(b"one\n").unwrap();
        assert_eq!(mode(&log), 0o600);
        open_append(&log).unwrap().write_all(b"two\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "one\ntwo\n");

        let target = dir.path().join("elsewhere");
        fs::write(&target, "untouched").unwrap();
        let target_mode = mode(&target);
        let link = dir.path().join("planted.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let err = open_append(&link).unwrap_err().to_string();
        assert!(
            err.contains("planted.log is a symbolic link; remove it"),
            "{err}"
        );
        assert!(read_to_string(&link).is_err());
        assert!(write_file(&link, b"x", WriteMode::Append, None).is_err());
        secure_file(&link).unwrap();
        assert_eq!(fs::read_to_string(&target).unwrap(), "untouched");
        assert_eq!(mode(&target), target_mode);
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
    }

    #[test]
    fn hard_links_are_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target");
        fs::write(&target, "keep me").unwrap();
        let linked = dir.path().join("linked");
        fs::hard_link(&target, &linked).unwrap();
        let err = write_file(&linked, b"gone", WriteMode::Replace, None).unwrap_err();
        assert!(err.to_string().contains("a hard link"), "{err}");
        assert_eq!(fs::read_to_string(&target).unwrap(), "keep me");
        assert!(open_append(&linked).is_err());
    }

    #[test]
    fn write_file_replaces_and_appends() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("conf");
        write_file(&p, b"long content", WriteMode::Replace, None).unwrap();
        write_file(&p, b"short", WriteMode::Replace, None).unwrap();
        write_file(&p, b"+more", WriteMode::Append, None).unwrap();
        assert_eq!(fs::read_to_string(&p).unwrap(), "short+more");
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn folders_are_tightened_and_files_too() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("project");
        fs::create_dir(&d).unwrap();
        fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
        let f = d.join("state.json");
        fs::write(&f, "{}").unwrap();
        fs::set_permissions(&f, fs::Permissions::from_mode(0o644)).unwrap();
        secure_dir(&d, 0o700, None, None).unwrap();
        secure_file(&f).unwrap();
        secure_file(&d.join("missing")).unwrap();
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(&f), 0o600);
        make_dir(&d.join("new"), 0o710, None, None).unwrap();
        assert_eq!(
            secure_dir(&d.join("missing"), 0o700, None, None)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(mode(&d.join("new")), 0o710);

        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&d, &link).unwrap();
        let err = secure_dir(&link, 0o700, None, None).unwrap_err();
        assert!(err.to_string().contains("is a symbolic link"), "{err}");
    }
}
