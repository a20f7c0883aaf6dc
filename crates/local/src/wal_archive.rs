//! The archive and restore commands of managed servers, and the archiver
//! they run.
//!
//! Every managed server's `archive_command` is pgtwig's own small program,
//! `pgtwig-archive-wal DIR %p %f` (the `pgtwig-archive-wal` crate: flushed
//! copy to a temp name, rename, flushed folder; the same content already
//! there is success, other content an error in the server log).
//!
//! The program must be executable by the server user, who may not reach the
//! `pgtwig` binary (pgtwig running as root from `/root/.cargo/bin`). So it is
//! a separate, small binary installed beside `pgtwig`, and each start copies
//! it into the project: `<project>/bin/pgtwig-archive-wal`, pgtwig's (root's
//! with the server user's group, 0750, in a folder the server user passes
//! through but cannot change), refreshed whenever the installed one differs
//! ([`install_archiver`]).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use pgtwig_core::{fsutil, private};

use crate::server_user::ServerUser;

/// The archiver's file name, beside `pgtwig` and in `<project>/bin/`.
pub const ARCHIVER: &str = "pgtwig-archive-wal";
/// Where to find the archiver when it is not beside the running program
/// (a program other than `pgtwig` using this crate).
pub const ARCHIVER_ENV: &str = "PGTWIG_ARCHIVE_WAL";

/// `s` as one word for `/bin/sh` (PostgreSQL runs archive and restore
/// commands through it): in single quotes, each `'` written as `'\''`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `s` taken literally by PostgreSQL's `%` substitution in archive and
/// restore commands.
fn percent_literal(s: &str) -> String {
    s.replace('%', "%%")
}

fn literal_word(path: &Path) -> String {
    percent_literal(&shell_quote(&path.to_string_lossy()))
}

/// `archive_command`: the archiver `bin` into `dir`.
pub fn archive_command(bin: &Path, dir: &Path) -> String {
    format!("{} {} %p %f", literal_word(bin), literal_word(dir))
}

/// `restore_command` reading from archive `dir`. A plain copy: PostgreSQL
/// restores into a temp name of its own and checks what it reads.
pub fn restore_command(dir: &Path) -> String {
    format!("cp {}/%f %p", literal_word(dir))
}

/// Where the archiver beside the running program is: [`ARCHIVER_ENV`], else
/// the folder of the running program (an installed `pgtwig`, or
/// `target/<profile>/` in development), or its parent for a test binary in
/// `target/<profile>/deps/`.
pub fn locate_archiver() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os(ARCHIVER_ENV).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{ARCHIVER_ENV}={} is not a file", p.display()))
        };
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot tell where pgtwig is: {e}"))?;
    let dir = exe.parent().unwrap_or(Path::new("/"));
    // A test binary of this workspace runs from target/<profile>/deps/.
    let test_binary = dir.file_name().is_some_and(|n| n == "deps");
    // pipx and `uv tool` put a symlink to the environment's pgtwig on PATH, and macOS's
    // current_exe names the symlink: the archiver is beside the file it points to.
    let resolved = std::fs::canonicalize(&exe)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf));
    let candidates = [
        Some(dir),
        dir.parent().filter(|_| test_binary),
        resolved.as_deref(),
    ];
    let found = candidates
        .into_iter()
        .flatten()
        .map(|d| d.join(ARCHIVER))
        .find(|p| p.is_file());
    found.ok_or_else(|| {
        format!(
            "{ARCHIVER}, the program that archives WAL for `branch create --at`, is not beside {}; it is \
             built and installed with pgtwig (its wheel, `pipx install .`, `cargo build` and \
             `cargo install --locked --path .` carry both; `cargo run` builds only pgtwig), or set {ARCHIVER_ENV} to it",
            exe.display()
        )
    })
}

/// Copy the archiver `source` to `<project>/bin/` (see the module notes)
/// unless an identical copy is there; returns the copy's path. Replaced by
/// rename, so running servers keep the old one until their next command.
pub fn install_archiver(project: &Path, user: &ServerUser, source: &Path) -> io::Result<PathBuf> {
    let bin = project.join("bin");
    match fs::create_dir(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    user.own_folder(&bin)?;
    let dst = bin.join(ARCHIVER);
    let (mode, group) = match user.pass_through() {
        Some(gid) => (0o750, Some(gid)),
        None => (0o700, None),
    };
    let wanted = fs::read(source)?;
    if let Ok(mut f) = private::open_read(&dst) {
        let mut have = Vec::new();
        if f.read_to_end(&mut have).is_ok() && have == wanted {
            use std::os::unix::fs::MetadataExt;
            let meta = f.metadata()?;
            if meta.mode() & 0o7777 == mode && group.is_none_or(|g| g == meta.gid()) {
                return Ok(dst);
            }
        }
    }
    let tmp = bin.join(format!(".{ARCHIVER}.tmp-{}", std::process::id()));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = private::create_new(&tmp)?;
        f.write_all(&wanted)?;
        if let Some(gid) = group {
            std::os::unix::fs::fchown(&f, None, Some(gid))?;
        }
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
    }
    if let Err(e) = fs::rename(&tmp, &dst) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    fsutil::sync_dir(&bin)?;
    Ok(dst)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_quote_paths_with_spaces_quotes_and_percent_signs() {
        let bin = Path::new("/var/lib/it's here/bin/pgtwig-archive-wal");
        let dir = Path::new("/var/lib/it's here/100% sure/wal-archive");
        assert_eq!(
            archive_command(bin, dir),
            r"'/var/lib/it'\''s here/bin/pgtwig-archive-wal' '/var/lib/it'\''s here/100%% sure/wal-archive' %p %f"
        );
        assert_eq!(
            restore_command(dir),
            r"cp '/var/lib/it'\''s here/100%% sure/wal-archive'/%f %p"
        );
        // What /bin/sh makes of it, once PostgreSQL replaced %f, %p and %%.
        let cmd = restore_command(dir)
            .replace("%f", "F")
            .replace("%p", "P")
            .replace("%%", "%");
        let out = std::process::Command::new("/bin/sh")
            .args(["-c", &format!("printf '%s\\n' {}", &cmd[3..])])
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "/var/lib/it's here/100% sure/wal-archive/F\nP\n"
        );
    }
}
