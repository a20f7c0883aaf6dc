//! `pgtwig-archive-wal DIR %p %f`: the `archive_command` of pgtwig's managed
//! servers. Copies WAL file `%p` into archive folder `DIR` as `%f`, flushed
//! and renamed into place (see the `pgtwig-archive-wal` crate). Exit 0 when the
//! file is archived (or already was, with the same content); 1 with the
//! reason on stderr — the server log — otherwise, and PostgreSQL retries.

use std::path::Path;
use std::process::ExitCode;

use pgtwig_archive_wal::{archive_segment, Archived};

fn main() -> ExitCode {
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    let [dir, segment, name] = args.as_slice() else {
        eprintln!("usage: pgtwig-archive-wal ARCHIVE_DIR %p %f (PostgreSQL's archive_command)");
        return ExitCode::from(2);
    };
    let name = name.to_string_lossy();
    match archive_segment(Path::new(segment), Path::new(dir), &name) {
        Ok(Archived::ReplacedPartial) => {
            eprintln!("pgtwig-archive-wal: replaced a truncated copy of {name} left by an interrupted archiver");
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pgtwig-archive-wal: archiving {name} failed: {e}");
            ExitCode::FAILURE
        }
    }
}
