//! pgtwig's WAL archiver, PostgreSQL's `archive_command` for managed
//! branches (`pgtwig-archive-wal DIR %p %f`), so that a crash never leaves a
//! partial segment in the archive.
//!
//! [`archive_segment`] copies the segment to `DIR/<name>.tmp`, fsyncs it,
//! renames it to `DIR/<name>` and fsyncs `DIR`. A file already there with the
//! same content is success (the previous attempt died after the rename,
//! before PostgreSQL heard of it); one with other content is an error, which
//! the binary prints to stderr — the server log — as `pg_receivewal` and
//! pgBackRest do. Except a strict prefix of the segment: that is what the
//! `cp` of an older pgtwig left when it was killed, and it is completed.
//! The archiver runs as the server user in that user's own folder, never as
//! root, so it needs no guard against links planted by someone else.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The failpoint between the flushed copy and its rename.
pub const FAILPOINT_BEFORE_RENAME: &str = "archive.before_rename";

/// `pgtwig_core::failpoint::hit`, the same variables, without linking
/// pgtwig-core (see Cargo.toml).
fn failpoint(name: &str) {
    if std::env::var_os("PGTWIG_FAILPOINT").is_some_and(|v| v == name) {
        if let Some(marker) = std::env::var_os("PGTWIG_FAILPOINT_ONCE").filter(|m| !m.is_empty()) {
            let first = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_ok();
            if !first {
                return;
            }
        }
        eprintln!("pgtwig: failpoint {name} reached");
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}

/// What [`archive_segment`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Archived {
    Copied,
    /// The same content was already archived (a previous attempt that died
    /// after its rename).
    AlreadyThere,
    /// A truncated copy (an older pgtwig's `cp`, killed) was completed.
    ReplacedPartial,
}

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "{} is already in the WAL archive with different content than {}: this archive holds another \
         server's WAL under that name. Nothing was overwritten; archiving of this branch stops here and \
         pg_wal grows until that file is moved out of {}",
        archived.display(), segment.display(), dir.display()
    )]
    Different {
        archived: PathBuf,
        segment: PathBuf,
        dir: PathBuf,
    },
    #[error("\"{0}\" is not a WAL file name")]
    BadName(String),
}

fn io_at<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> ArchiveError + 'a {
    move |source| ArchiveError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Archive WAL file `segment` (PostgreSQL's `%p`) as `dir/name` (`%f`),
/// durably and atomically (see the module notes). PostgreSQL runs one
/// archiver per server and each branch has its own archive, so nobody
/// else writes `dir/name` or its temp name meanwhile.
pub fn archive_segment(segment: &Path, dir: &Path, name: &str) -> Result<Archived, ArchiveError> {
    if name.is_empty() || name.starts_with('.') || name.contains('/') || name.ends_with(".tmp") {
        return Err(ArchiveError::BadName(name.to_string()));
    }
    let dst = dir.join(name);
    let mut outcome = Archived::Copied;
    match fs::symlink_metadata(&dst) {
        Ok(_) => match compare(segment, &dst)? {
            Comparison::Same => {
                // The earlier attempt may have died before its flush.
                sync_file(&dst)?;
                sync_dir(dir).map_err(io_at("flushing", dir))?;
                return Ok(Archived::AlreadyThere);
            }
            Comparison::Prefix => outcome = Archived::ReplacedPartial,
            Comparison::Different => {
                return Err(ArchiveError::Different {
                    archived: dst,
                    segment: segment.to_path_buf(),
                    dir: dir.to_path_buf(),
                })
            }
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_at("looking at", &dst)(e)),
    }
    let tmp = dir.join(format!("{name}.tmp"));
    {
        let mut from = File::open(segment).map_err(io_at("opening", segment))?;
        // A temp file left by a killed attempt is overwritten, never followed.
        let mut to = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io_at("creating", &tmp))?;
        io::copy(&mut from, &mut to).map_err(io_at("copying into", &tmp))?;
        to.flush().map_err(io_at("writing", &tmp))?;
        to.sync_all().map_err(io_at("flushing", &tmp))?;
    }
    failpoint(FAILPOINT_BEFORE_RENAME);
    fs::rename(&tmp, &dst).map_err(io_at("renaming into place", &dst))?;
    sync_dir(dir).map_err(io_at("flushing", dir))?;
    Ok(outcome)
}

fn sync_file(path: &Path) -> Result<(), ArchiveError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io_at("flushing", path))
}

enum Comparison {
    Same,
    /// `archived` is shorter than `segment` and equal to its beginning.
    Prefix,
    Different,
}

fn compare(segment: &Path, archived: &Path) -> Result<Comparison, ArchiveError> {
    let mut a = File::open(segment).map_err(io_at("opening", segment))?;
    let mut b = File::open(archived).map_err(io_at("opening", archived))?;
    let (mut ba, mut bb) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
    loop {
        let na = read_full(&mut a, &mut ba).map_err(io_at("reading", segment))?;
        let nb = read_full(&mut b, &mut bb).map_err(io_at("reading", archived))?;
        let n = na.min(nb);
        if ba[..n] != bb[..n] {
            return Ok(Comparison::Different);
        }
        match (na == nb, nb < na) {
            (true, _) if na == 0 => return Ok(Comparison::Same),
            (true, _) => continue,
            (false, true) => return Ok(Comparison::Prefix),
            (false, false) => return Ok(Comparison::Different),
        }
    }
}

/// Read until `buf` is full or the file ends.
fn read_full(f: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("000000010000000000000003");
        fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn copies_then_accepts_the_same_and_refuses_other_content() {
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("archive");
        fs::create_dir(&archive).unwrap();
        let wal: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let seg = segment(d.path(), &wal);
        let name = "000000010000000000000003";
        assert_eq!(
            archive_segment(&seg, &archive, name).unwrap(),
            Archived::Copied
        );
        assert_eq!(fs::read(archive.join(name)).unwrap(), wal);
        // No temp file is left behind.
        assert_eq!(fs::read_dir(&archive).unwrap().count(), 1);
        assert_eq!(
            archive_segment(&seg, &archive, name).unwrap(),
            Archived::AlreadyThere
        );

        let mut other = wal.clone();
        other[150_000] ^= 1;
        let seg2 = segment(d.path(), &other);
        let err = archive_segment(&seg2, &archive, name).unwrap_err();
        assert!(matches!(err, ArchiveError::Different { .. }), "{err}");
        assert!(err.to_string().contains("different content"), "{err}");
        assert_eq!(fs::read(archive.join(name)).unwrap(), wal, "untouched");
    }

    #[test]
    fn a_killed_attempts_leftovers_are_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let archive = d.path().join("archive");
        fs::create_dir(&archive).unwrap();
        let wal: Vec<u8> = (0..100_000u32).map(|i| (i % 13) as u8).collect();
        let seg = segment(d.path(), &wal);
        let name = "000000010000000000000003";
        // A temp file of an attempt killed mid-copy, with garbage in it.
        fs::write(archive.join(format!("{name}.tmp")), b"garbage").unwrap();
        // The truncated file an older pgtwig's `cp` left when it was killed.
        fs::write(archive.join(name), &wal[..4096]).unwrap();
        assert_eq!(
            archive_segment(&seg, &archive, name).unwrap(),
            Archived::ReplacedPartial
        );
        assert_eq!(fs::read(archive.join(name)).unwrap(), wal);
        assert!(!archive.join(format!("{name}.tmp")).exists());
        // A longer file is not a prefix: refused.
        let short = segment(d.path(), &wal[..50_000]);
        assert!(archive_segment(&short, &archive, name).is_err());
    }

    #[test]
    fn names_that_are_not_wal_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        for bad in ["", "../x", ".hidden", "x.tmp"] {
            assert!(archive_segment(&d.path().join("a"), d.path(), bad).is_err());
        }
    }
}
