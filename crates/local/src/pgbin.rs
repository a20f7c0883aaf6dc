//! Finding PostgreSQL server binaries (`initdb`, `postgres`).
//!
//! Looked for, in order: `PGTWIG_PG_BIN` (used alone when set), every
//! directory on `PATH`, `pg_config --bindir`, Debian's
//! `/usr/lib/postgresql/<ver>/bin`, RHEL's `/usr/pgsql-<ver>/bin`, Homebrew
//! (`/opt/homebrew`, `/usr/local`) and Postgres.app. Of the installations
//! found, the newest supported major version wins for new clusters; an
//! existing cluster is always run with binaries of its own major version
//! (its `PG_VERSION` file), because a data directory only opens with those.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Major versions pgtwig manages.
pub const SUPPORTED: std::ops::RangeInclusive<u32> = 13..=18;

pub const PG_BIN_ENV: &str = "PGTWIG_PG_BIN";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgInstall {
    pub bindir: PathBuf,
    pub major: u32,
    /// Full version string, e.g. "15.18".
    pub version: String,
}

impl PgInstall {
    pub fn bin(&self, name: &str) -> PathBuf {
        self.bindir.join(name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PgBinError {
    #[error(
        "no PostgreSQL server binaries found (looked for `initdb` and `postgres` on PATH, in `pg_config --bindir`, \
         /usr/lib/postgresql/*/bin, /usr/pgsql-*/bin, Homebrew and Postgres.app); install them \
         (Debian/Ubuntu: `sudo apt-get install postgresql`; macOS: `brew install postgresql@17`) \
         or set {PG_BIN_ENV} to the directory holding them{}",
        if .found_unsupported.is_empty() { String::new() } else { format!(". Found only unsupported versions: {}", .found_unsupported.join(", ")) }
    )]
    NotFound { found_unsupported: Vec<String> },
    #[error(
        "{PG_BIN_ENV}={dir} does not hold a usable PostgreSQL {SUPPORTED:?} installation: {why}"
    )]
    BadOverride { dir: PathBuf, why: String },
    #[error(
        "this branch's data directory is PostgreSQL {major}, but no PostgreSQL {major} server binaries were found \
         (found: {found}); install them (Debian: `apt-get install postgresql-{major}`; macOS: `brew install postgresql@{major}`) \
         or set {PG_BIN_ENV}"
    )]
    MissingMajor { major: u32, found: String },
}

/// Inspect one directory: does it hold a server installation, and which version?
/// A directory of symlinks to single programs (`/usr/local/bin/postgres ->
/// /usr/lib/postgresql/15/bin/postgres`) resolves to the real bindir, which
/// holds the other programs pgtwig needs too.
pub fn probe(dir: &Path) -> Result<PgInstall, String> {
    probe_bindir(&real_bindir(dir))
}

fn real_bindir(dir: &Path) -> PathBuf {
    std::fs::canonicalize(dir.join("postgres"))
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| dir.to_path_buf())
}

fn probe_bindir(dir: &Path) -> Result<PgInstall, String> {
    for tool in ["initdb", "postgres", "pg_controldata"] {
        if !dir.join(tool).is_file() {
            return Err(format!("no `{tool}` in {}", dir.display()));
        }
    }
    let out = Command::new(dir.join("postgres"))
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}/postgres: {e}", dir.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    let version = text
        .split_whitespace()
        .nth(2)
        .ok_or_else(|| format!("unexpected `postgres --version` output: {text:?}"))?
        .to_string();
    let major = version
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|m| m.parse().ok())
        .ok_or_else(|| format!("cannot read a version from {version:?}"))?;
    Ok(PgInstall {
        bindir: dir.to_path_buf(),
        major,
        version,
    })
}

fn candidate_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        if out.status.success() {
            dirs.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
    }
    let globs: [(&str, &str); 6] = [
        ("/usr/lib/postgresql", "bin"),
        ("/usr/local/opt", "bin"),
        ("/opt/homebrew/opt", "bin"),
        ("/Applications/Postgres.app/Contents/Versions", "bin"),
        ("/usr", "bin"), // /usr/pgsql-<ver>/bin on RHEL
        ("/opt/homebrew/Cellar", ""),
    ];
    for (parent, sub) in globs {
        let Ok(entries) = std::fs::read_dir(parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let relevant = match parent {
                "/usr" => name.starts_with("pgsql-"),
                "/usr/local/opt" | "/opt/homebrew/opt" => name.starts_with("postgresql"),
                "/opt/homebrew/Cellar" => {
                    // Cellar/postgresql@17/<version>/bin
                    if name.starts_with("postgresql") {
                        if let Ok(vers) = std::fs::read_dir(e.path()) {
                            dirs.extend(vers.flatten().map(|v| v.path().join("bin")));
                        }
                    }
                    false
                }
                _ => true,
            };
            if relevant {
                dirs.push(e.path().join(sub));
            }
        }
    }
    dirs.push(PathBuf::from("/opt/homebrew/bin"));
    dirs.push(PathBuf::from("/usr/local/bin"));
    dirs
}

/// Every supported installation found, newest first (deduplicated by bindir).
pub fn discover_all() -> Result<Vec<PgInstall>, PgBinError> {
    if let Some(dir) = std::env::var_os(PG_BIN_ENV).filter(|d| !d.is_empty()) {
        let dir = PathBuf::from(dir);
        let install = probe(&dir).map_err(|why| PgBinError::BadOverride {
            dir: dir.clone(),
            why,
        })?;
        if !SUPPORTED.contains(&install.major) {
            return Err(PgBinError::BadOverride {
                dir,
                why: format!("it is version {}", install.version),
            });
        }
        return Ok(vec![install]);
    }
    let mut found: Vec<PgInstall> = Vec::new();
    let mut unsupported = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for dir in candidate_dirs() {
        // Resolve symlinked programs first so each installation runs
        // `postgres --version` once (it costs a process start).
        let dir = real_bindir(&dir);
        if !dir.join("postgres").is_file() || !seen.insert(dir.clone()) {
            continue;
        }
        if let Ok(install) = probe_bindir(&dir) {
            if SUPPORTED.contains(&install.major) {
                found.push(install);
            } else {
                unsupported.push(format!(
                    "{} in {}",
                    install.version,
                    install.bindir.display()
                ));
            }
        }
    }
    if found.is_empty() {
        return Err(PgBinError::NotFound {
            found_unsupported: unsupported,
        });
    }
    // Newest major first; within a major, keep discovery order (PATH first).
    found.sort_by_key(|i| std::cmp::Reverse(i.major));
    Ok(found)
}

/// The installation for new clusters: the newest supported one.
pub fn newest() -> Result<PgInstall, PgBinError> {
    Ok(discover_all()?.remove(0))
}

/// The installation for an existing cluster of major version `major`.
pub fn for_major(major: u32) -> Result<PgInstall, PgBinError> {
    let all = discover_all()?;
    let found = all
        .iter()
        .map(|i| i.version.clone())
        .collect::<Vec<_>>()
        .join(", ");
    all.into_iter()
        .find(|i| i.major == major)
        .ok_or(PgBinError::MissingMajor { major, found })
}

/// The major version a data directory was made with (its `PG_VERSION`).
pub fn data_dir_major(data_dir: &Path) -> std::io::Result<u32> {
    let text = std::fs::read_to_string(data_dir.join("PG_VERSION"))?;
    text.trim().parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("PG_VERSION holds {text:?}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_an_installation_on_this_machine() {
        let all = discover_all().expect("the test machine has PostgreSQL server binaries");
        assert!(SUPPORTED.contains(&all[0].major));
        assert!(all.windows(2).all(|w| w[0].major >= w[1].major));
    }

    #[test]
    fn probe_rejects_a_directory_without_servers() {
        let d = tempfile::tempdir().unwrap();
        assert!(probe(d.path()).unwrap_err().contains("initdb"));
    }
}
