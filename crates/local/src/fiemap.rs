//! Which bytes of a file are its own and which it shares with other files
//! (copy-on-write clones), from the kernel's extent map: the `FS_IOC_FIEMAP`
//! ioctl (Linux; XFS, btrfs, ext4 …), whose extents carry
//! `FIEMAP_EXTENT_SHARED` when their blocks are also another file's.
//!
//! On copy-on-write file systems the apparent size says nothing about what a
//! branch costs: a fresh clone of a 1 GiB cluster has 1 GiB of files and owns
//! almost none of their blocks. [`extents`] gives a file's extent list (with
//! the shared flag and physical offsets, which a data diff can use to skip
//! ranges two branches still share), [`usage_of_file`] sums own and shared
//! bytes, and [`tree_usage`] does it for a folder. Where the file system has
//! no extent map (tmpfs, macOS, some network file systems) the allocated
//! blocks (`st_blocks`) are counted as own, and [`Method`] says so.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

use crate::beneath::{list_dir, open_at, open_dir, Kind};

/// `_IOWR('f', 11, struct fiemap)` from `<linux/fs.h>`.
#[cfg(target_os = "linux")]
const FS_IOC_FIEMAP: u64 = 0xC020_660B;
/// The extent is the file's last.
pub const FIEMAP_EXTENT_LAST: u32 = 0x0001;
/// Location not known yet (with `DELALLOC`).
pub const FIEMAP_EXTENT_UNKNOWN: u32 = 0x0002;
/// Written to the page cache, blocks not allocated yet: the file's own.
pub const FIEMAP_EXTENT_DELALLOC: u32 = 0x0004;
/// Allocated but never written (`fallocate`): reads as zeros, still the file's own space.
pub const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x0800;
/// The blocks are also another file's (a reflink clone, a snapshot).
pub const FIEMAP_EXTENT_SHARED: u32 = 0x2000;

/// Extents asked for per ioctl call.
const EXTENTS_PER_CALL: usize = 256;

/// One extent of a file: `length` bytes at offset `logical` in the file,
/// stored at byte `physical` of the device (0 when not known yet).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub physical: u64,
    pub length: u64,
    /// `FIEMAP_EXTENT_*` bits.
    pub flags: u32,
}

impl Extent {
    /// Its blocks are also another file's.
    pub fn shared(&self) -> bool {
        self.flags & FIEMAP_EXTENT_SHARED != 0
    }
}

/// How own and shared bytes were measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Method {
    /// From the extent map: shared extents are told apart.
    Fiemap,
    /// The file system has no extent map: allocated blocks, all counted as own.
    AllocatedBlocks,
}

/// Bytes a file (or a tree) owns alone, and bytes it shares with other files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub own: u64,
    pub shared: u64,
}

impl Usage {
    pub fn add(&mut self, other: Usage) {
        self.own += other.own;
        self.shared += other.shared;
    }
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct RawExtent {
    fe_logical: u64,
    fe_physical: u64,
    fe_length: u64,
    fe_reserved64: [u64; 2],
    fe_flags: u32,
    fe_reserved: [u32; 3],
}

#[repr(C)]
struct RawRequest {
    fm_start: u64,
    fm_length: u64,
    fm_flags: u32,
    fm_mapped_extents: u32,
    fm_extent_count: u32,
    fm_reserved: u32,
    fm_extents: [RawExtent; EXTENTS_PER_CALL],
}

/// The extent list of an open regular file, in file order; `None` when its
/// file system has no extent map. Holes are absent. Data still in the page
/// cache shows as `DELALLOC` extents (not flushed first: this only reads).
pub fn extents(file: &fs::File) -> io::Result<Option<Vec<Extent>>> {
    #[cfg(target_os = "linux")]
    {
        let mut out = Vec::new();
        let mut start = 0u64;
        loop {
            let mut req = Box::new(RawRequest {
                fm_start: start,
                fm_length: u64::MAX - start,
                fm_flags: 0,
                fm_mapped_extents: 0,
                fm_extent_count: EXTENTS_PER_CALL as u32,
                fm_reserved: 0,
                fm_extents: [RawExtent::default(); EXTENTS_PER_CALL],
            });
            // SAFETY: `req` is a `struct fiemap` followed by room for
            // `fm_extent_count` extents, as the ioctl expects, and lives
            // across the call.
            let rc = unsafe {
                nix::libc::ioctl(
                    file.as_raw_fd(),
                    FS_IOC_FIEMAP as _,
                    &mut *req as *mut RawRequest,
                )
            };
            if rc < 0 {
                let e = io::Error::last_os_error();
                return match e.raw_os_error() {
                    Some(nix::libc::EOPNOTSUPP | nix::libc::ENOTTY | nix::libc::ENOSYS) => Ok(None),
                    _ => Err(e),
                };
            }
            let mapped = (req.fm_mapped_extents as usize).min(EXTENTS_PER_CALL);
            if mapped == 0 {
                return Ok(Some(out));
            }
            let mut last = false;
            for raw in &req.fm_extents[..mapped] {
                out.push(Extent {
                    logical: raw.fe_logical,
                    physical: raw.fe_physical,
                    length: raw.fe_length,
                    flags: raw.fe_flags,
                });
                last |= raw.fe_flags & FIEMAP_EXTENT_LAST != 0;
            }
            let tail = out.last().expect("mapped > 0");
            let next = tail.logical.saturating_add(tail.length);
            if last || next <= start {
                return Ok(Some(out));
            }
            start = next;
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        Ok(None)
    }
}

/// Own and shared bytes of an open regular file.
pub fn usage_of_file(file: &fs::File) -> io::Result<(Usage, Method)> {
    match extents(file)? {
        Some(list) => Ok((sum(&list), Method::Fiemap)),
        None => Ok((allocated(file)?, Method::AllocatedBlocks)),
    }
}

/// Own and shared bytes of an extent list.
pub fn sum(extents: &[Extent]) -> Usage {
    let mut u = Usage::default();
    for e in extents {
        if e.shared() {
            u.shared += e.length;
        } else {
            u.own += e.length;
        }
    }
    u
}

fn allocated(file: &fs::File) -> io::Result<Usage> {
    use std::os::unix::fs::MetadataExt;
    Ok(Usage {
        own: file.metadata()?.blocks() * 512,
        shared: 0,
    })
}

/// Own and shared bytes of every regular file under `dir` (`dir` itself
/// included when it is a file). Follows no link, and files that vanish
/// while it walks (a running server drops temp files) are skipped: the
/// figure is advisory. A missing `dir` is zero. The method is
/// [`Method::AllocatedBlocks`] when any file had to be counted that way.
pub fn tree_usage(dir: &Path) -> io::Result<(Usage, Method)> {
    let mut total = Usage::default();
    let mut method = Method::Fiemap;
    let root = match open_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((total, method)),
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOTDIR) => {
            let file = fs::File::open(dir)?;
            return usage_of_file(&file);
        }
        Err(e) => return Err(e),
    };
    let mut stack = vec![root];
    while let Some(folder) = stack.pop() {
        for (name, kind) in list_dir(&folder)? {
            let opened = match kind {
                Kind::Dir => open_at(&folder, &name, true),
                Kind::File => open_at(&folder, &name, false),
                Kind::Symlink | Kind::Other => continue,
            };
            let file = match opened {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(named(e, &name)),
            };
            if kind == Kind::Dir {
                stack.push(file);
                continue;
            }
            let (u, m) = usage_of_file(&file).map_err(|e| named(e, &name))?;
            total.add(u);
            if m == Method::AllocatedBlocks {
                method = m;
            }
        }
    }
    Ok((total, method))
}

fn named(e: io::Error, name: &OsStr) -> io::Error {
    io::Error::new(
        e.kind(),
        format!("reading the extents of {}: {e}", name.to_string_lossy()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    /// Where reflinks work, if anywhere: PGTWIG_TEST_REFLINK_DIR, as the end-to-end tests.
    fn reflink_dir() -> Option<tempfile::TempDir> {
        let base = std::env::var_os("PGTWIG_TEST_REFLINK_DIR")?;
        let d = tempfile::tempdir_in(base).ok()?;
        crate::clone::supports_reflink(d.path()).then_some(d)
    }

    fn write_synced(path: &Path, bytes: &[u8]) {
        let mut f = fs::File::create(path).unwrap();
        f.write_all(bytes).unwrap();
        f.sync_all().unwrap();
    }

    #[test]
    fn a_written_file_owns_its_blocks() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("f");
        write_synced(&p, &vec![1u8; 1 << 20]);
        let f = fs::File::open(&p).unwrap();
        let (u, method) = usage_of_file(&f).unwrap();
        assert!(u.own >= 1 << 20, "{u:?} ({method:?})");
        assert_eq!(u.shared, 0);
        if method == Method::Fiemap {
            let list = extents(&f).unwrap().unwrap();
            assert!(!list.is_empty());
            assert_eq!(list[0].logical, 0);
            assert!(list.last().unwrap().flags & FIEMAP_EXTENT_LAST != 0);
            assert_eq!(
                list.iter().map(|e| e.length).sum::<u64>(),
                u.own,
                "sum() adds up the list"
            );
        }
    }

    #[test]
    fn holes_are_not_counted() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sparse");
        let mut f = fs::File::create(&p).unwrap();
        f.seek(SeekFrom::Start(64 << 20)).unwrap();
        f.write_all(&[9u8; 4096]).unwrap();
        f.sync_all().unwrap();
        let (u, method) = usage_of_file(&fs::File::open(&p).unwrap()).unwrap();
        assert!(u.own >= 4096, "{u:?}");
        assert!(
            u.own < 1 << 20,
            "a 64 MiB hole is no data ({method:?}): {u:?}"
        );
        if method == Method::Fiemap {
            let list = extents(&fs::File::open(&p).unwrap()).unwrap().unwrap();
            assert!(list[0].logical >= 60 << 20, "{list:?}");
        }
    }

    /// More extents than one ioctl call returns: every one is read.
    #[test]
    fn many_extents_are_all_read() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("striped");
        let mut f = fs::File::create(&p).unwrap();
        // 600 separate 4 KiB pieces, 64 KiB apart: at least 600 extents.
        for i in 0..600u64 {
            f.seek(SeekFrom::Start(i * 65536)).unwrap();
            f.write_all(&[7u8; 4096]).unwrap();
        }
        f.sync_all().unwrap();
        let f = fs::File::open(&p).unwrap();
        let Some(list) = extents(&f).unwrap() else {
            eprintln!("SKIPPED: {} has no extent map", d.path().display());
            return;
        };
        assert!(list.len() >= 600, "{} extents", list.len());
        assert!(list.windows(2).all(|w| w[0].logical < w[1].logical));
        assert_eq!(sum(&list).own, 600 * 4096);
    }

    #[test]
    fn a_reflink_clone_shares_until_written() {
        let Some(d) = reflink_dir() else {
            eprintln!(
                "SKIPPED: set PGTWIG_TEST_REFLINK_DIR to a folder on XFS (reflink=1) or btrfs"
            );
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must test reflinks"
            );
            return;
        };
        let a = d.path().join("a");
        let b = d.path().join("b");
        write_synced(&a, &vec![3u8; 4 << 20]);
        reflink_copy::reflink(&a, &b).unwrap();
        let (ub, m) = usage_of_file(&fs::File::open(&b).unwrap()).unwrap();
        assert_eq!(m, Method::Fiemap);
        assert_eq!(ub.own, 0, "{ub:?}");
        assert_eq!(ub.shared, 4 << 20);
        let (ua, _) = usage_of_file(&fs::File::open(&a).unwrap()).unwrap();
        assert_eq!(ua.shared, 4 << 20, "the source shares too: {ua:?}");
        // Same physical blocks: what a data diff relies on.
        let ea = extents(&fs::File::open(&a).unwrap()).unwrap().unwrap();
        let eb = extents(&fs::File::open(&b).unwrap()).unwrap().unwrap();
        assert_eq!(
            ea.iter().map(|e| e.physical).collect::<Vec<_>>(),
            eb.iter().map(|e| e.physical).collect::<Vec<_>>()
        );
        // Overwrite 1 MiB of the clone: that much becomes its own.
        let mut f = fs::OpenOptions::new().write(true).open(&b).unwrap();
        f.seek(SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&vec![4u8; 1 << 20]).unwrap();
        f.sync_all().unwrap();
        let (ub, _) = usage_of_file(&fs::File::open(&b).unwrap()).unwrap();
        assert_eq!(ub.own, 1 << 20, "{ub:?}");
        assert_eq!(ub.shared, 3 << 20);
        let (tree, _) = tree_usage(d.path()).unwrap();
        assert_eq!(
            tree.own,
            2 << 20,
            "b's new 1 MiB, and the 1 MiB of a that b no longer shares: {tree:?}"
        );
        assert_eq!(tree.shared, (3 << 20) * 2);
    }

    /// tmpfs has no extent map: allocated blocks, all own, and the method says so.
    #[test]
    fn without_an_extent_map_allocated_blocks_count() {
        let shm = Path::new("/dev/shm");
        if !shm.is_dir() {
            eprintln!("SKIPPED: no /dev/shm");
            return;
        }
        let d = tempfile::tempdir_in(shm).unwrap();
        let p = d.path().join("f");
        write_synced(&p, &vec![5u8; 256 << 10]);
        let f = fs::File::open(&p).unwrap();
        assert!(
            extents(&f).unwrap().is_none(),
            "tmpfs gained FIEMAP; pick another file system for this test"
        );
        let (u, m) = tree_usage(d.path()).unwrap();
        assert_eq!(m, Method::AllocatedBlocks);
        assert_eq!(u.own, 256 << 10);
        assert_eq!(u.shared, 0);
    }

    #[test]
    fn trees_follow_no_link_and_a_missing_folder_is_empty() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        write_synced(&outside.path().join("big"), &vec![1u8; 2 << 20]);
        fs::create_dir(d.path().join("sub")).unwrap();
        write_synced(&d.path().join("sub/small"), &vec![1u8; 8192]);
        std::os::unix::fs::symlink(outside.path(), d.path().join("link")).unwrap();
        std::os::unix::fs::symlink(outside.path().join("big"), d.path().join("sub/big")).unwrap();
        let (u, _) = tree_usage(d.path()).unwrap();
        assert!(u.own >= 8192 && u.own < 1 << 20, "{u:?}");
        assert_eq!(
            tree_usage(&d.path().join("nothing")).unwrap().0,
            Usage::default()
        );
    }
}
