//! Which heap blocks two branches' copies of a relation may differ in, from
//! the extent maps of their segment files: a block stored at the same
//! physical place in both files is the same bytes (a copy-on-write clone
//! that neither side has written since), every other block must be read.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

use pgtwig_local::fiemap::{self, FIEMAP_EXTENT_DELALLOC, FIEMAP_EXTENT_UNKNOWN};

/// PostgreSQL's default `BLCKSZ`.
pub const BLOCK_SIZE: u64 = 8192;
/// PostgreSQL's default `RELSEG_SIZE` × `BLCKSZ`: files `N`, `N.1`, `N.2` … of 1 GiB.
pub const SEGMENT_BYTES: u64 = 1 << 30;
/// Runs of shared blocks this short between two ranges to read are read too:
/// fewer, longer TID range scans (shared blocks add the same rows to both sides).
const MERGE_GAP_BLOCKS: u32 = 16;

/// A relation's main fork as one byte space: its extents with offsets from
/// the start of the first segment, and its length.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileMap {
    /// (logical, physical, length) in bytes, sorted by logical.
    pub extents: Vec<(u64, u64, u64)>,
    pub len: u64,
}

/// Blocks `start..end` (`end` None: to the end of the relation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRange {
    pub start: u32,
    pub end: Option<u32>,
}

/// The extent map of a relation whose main fork is `relpath` (as
/// `pg_relation_filepath` gives it) under `data_dir`; `None` when the file
/// system has no extent map. Each segment is fsynced first so that blocks the
/// server wrote but the kernel has not yet written back (and so not yet
/// moved off the shared extent) show where they will be.
pub fn file_map(data_dir: &Path, relpath: &str) -> io::Result<Option<FileMap>> {
    if relpath.split('/').any(|p| p == ".." || p.is_empty()) || relpath.starts_with('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("unexpected relation path {relpath:?}"),
        ));
    }
    let mut map = FileMap::default();
    for segment in 0u64.. {
        let path: PathBuf = if segment == 0 {
            data_dir.join(relpath)
        } else {
            data_dir.join(format!("{relpath}.{segment}"))
        };
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && segment > 0 => break,
            Err(e) => return Err(io::Error::new(e.kind(), format!("{}: {e}", path.display()))),
        };
        file.sync_all()
            .map_err(|e| io::Error::new(e.kind(), format!("fsync {}: {e}", path.display())))?;
        let len = file.metadata()?.len();
        let Some(extents) = fiemap::extents(&file)? else {
            return Ok(None);
        };
        let base = segment * SEGMENT_BYTES;
        for e in extents {
            // Not placed yet: nothing to compare its place with.
            if e.flags & (FIEMAP_EXTENT_DELALLOC | FIEMAP_EXTENT_UNKNOWN) != 0 || e.physical == 0 {
                continue;
            }
            let length = e.length.min(len.saturating_sub(e.logical));
            if length > 0 {
                map.extents.push((base + e.logical, e.physical, length));
            }
        }
        map.len = base + len;
        if len < SEGMENT_BYTES {
            break;
        }
    }
    Ok(Some(map))
}

/// Byte ranges stored at the same physical place in both maps.
fn identical_bytes(a: &FileMap, b: &FileMap) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < a.extents.len() && j < b.extents.len() {
        let (la, pa, na) = a.extents[i];
        let (lb, pb, nb) = b.extents[j];
        let lo = la.max(lb);
        let hi = (la + na).min(lb + nb);
        if lo < hi && pa + (lo - la) == pb + (lo - lb) {
            match out.last_mut() {
                Some(last) if last.1 == lo => last.1 = hi,
                _ => out.push((lo, hi)),
            }
        }
        if la + na <= lb + nb {
            i += 1;
        } else {
            j += 1;
        }
    }
    out
}

/// The blocks to read in both branches (sorted, merged), and how many blocks
/// the larger side has.
pub fn differing_blocks(a: &FileMap, b: &FileMap) -> (Vec<BlockRange>, u64) {
    let total = a.len.max(b.len).div_ceil(BLOCK_SIZE);
    let mut same: Vec<(u64, u64)> = Vec::new();
    for (lo, hi) in identical_bytes(a, b) {
        let first = lo.div_ceil(BLOCK_SIZE);
        let last = hi / BLOCK_SIZE;
        if first < last {
            same.push((first, last));
        }
    }
    let mut ranges: Vec<BlockRange> = Vec::new();
    let mut at = 0u64;
    let mut push = |start: u64, end: u64| {
        let start = start as u32;
        let end = if end >= total { None } else { Some(end as u32) };
        if let Some(last) = ranges.last_mut() {
            if let Some(prev_end) = last.end {
                if start - prev_end <= MERGE_GAP_BLOCKS {
                    last.end = end;
                    return;
                }
            }
        }
        ranges.push(BlockRange { start, end });
    };
    for (first, last) in same {
        if first > at {
            push(at, first);
        }
        at = at.max(last);
    }
    if at < total {
        push(at, total);
    }
    (ranges, total)
}

/// How many blocks `ranges` cover of a relation of `total` blocks.
pub fn blocks_in(ranges: &[BlockRange], total: u64) -> u64 {
    ranges
        .iter()
        .map(|r| u64::from(r.end.map_or(total as u32, |e| e)).saturating_sub(u64::from(r.start)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: u64 = BLOCK_SIZE;

    #[test]
    fn shared_extents_are_skipped_and_written_blocks_read() {
        // 10 blocks shared, then block 3 rewritten in b (moved to physical 9000*B).
        let a = FileMap {
            extents: vec![(0, 1000 * B, 10 * B)],
            len: 10 * B,
        };
        let b = FileMap {
            extents: vec![
                (0, 1000 * B, 3 * B),
                (3 * B, 9000 * B, B),
                (4 * B, 1004 * B, 6 * B),
            ],
            len: 10 * B,
        };
        let (ranges, total) = differing_blocks(&a, &b);
        assert_eq!(total, 10);
        assert_eq!(
            ranges,
            vec![BlockRange {
                start: 3,
                end: Some(4)
            }]
        );
        assert_eq!(differing_blocks(&a, &a).0, vec![]);
    }

    #[test]
    fn appended_blocks_and_unaligned_extents_are_read_to_the_end() {
        let a = FileMap {
            extents: vec![(0, 1000 * B, 4 * B)],
            len: 4 * B,
        };
        // b grew by 2 blocks; its 4 kB-aligned extent split covers half of block 1.
        let b = FileMap {
            extents: vec![
                (0, 1000 * B, B + 4096),
                (B + 4096, 77 * B, 4096),
                (2 * B, 1002 * B, 4 * B),
            ],
            len: 6 * B,
        };
        let (ranges, total) = differing_blocks(&a, &b);
        assert_eq!(total, 6);
        assert_eq!(
            ranges,
            vec![BlockRange {
                start: 1,
                end: None
            }],
            "block 1, and 4..6 merged across the short shared gap"
        );
        assert_eq!(blocks_in(&ranges, total), 5);
    }

    #[test]
    fn different_files_are_read_whole() {
        let a = FileMap {
            extents: vec![(0, 10 * B, 4 * B)],
            len: 4 * B,
        };
        let b = FileMap {
            extents: vec![(0, 50 * B, 4 * B)],
            len: 4 * B,
        };
        assert_eq!(
            differing_blocks(&a, &b).0,
            vec![BlockRange {
                start: 0,
                end: None
            }]
        );
    }
}
