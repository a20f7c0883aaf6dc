//! The per-project proxy password: what every client that is not the daemon's own OS user
//! (another account, a container, another machine) must know to connect through the proxy.
//!
//! Made on first use from the system's random source, kept in `<project>/proxy.password`
//! (mode 0600, the project folder is private too) and shown by `pgtwig url`. pgtwig refuses to
//! use a password file that others could read or that someone else owns: whoever could read
//! it could connect as the superuser of every branch.

use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use crate::ProjectHome;

/// File name in the project's state folder.
pub const PASSWORD_FILE: &str = "proxy.password";
/// Characters in a generated password: 32 of 62 letters and digits is ~190 bits, and needs no
/// escaping in a URL.
const PASSWORD_LEN: usize = 32;
const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// Where the project's proxy password is kept.
pub fn path(home: &ProjectHome) -> PathBuf {
    home.dir().join(PASSWORD_FILE)
}

/// The project's proxy password, made (atomically, once, however many processes ask at the
/// same time) when there is none yet.
pub fn load_or_create(home: &ProjectHome) -> Result<String, String> {
    let file = path(home);
    match read_private(&file) {
        Ok(Some(pw)) => return Ok(pw),
        Ok(None) => {}
        Err(e) => return Err(e),
    }
    std::fs::create_dir_all(home.dir())
        .map_err(|e| format!("cannot create {}: {e}", home.dir().display()))?;
    let password = generate()?;
    // Written under a temporary name, then linked into place: link fails when another
    // process won the race, and nobody ever reads a half-written password.
    // Unique per process and thread: racing makers must not share (and delete) one temp file.
    static ATTEMPT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let attempt = ATTEMPT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = home
        .dir()
        .join(format!(".{PASSWORD_FILE}.{}.{attempt}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(nix::libc::O_NOFOLLOW)
            .open(&tmp)?;
        f.write_all(format!("{password}\n").as_bytes())?;
        f.sync_all()
    };
    let linked = write().and_then(|()| std::fs::hard_link(&tmp, &file));
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(password),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => read_private(&file)?
            .ok_or_else(|| format!("{} vanished while being made", file.display())),
        Err(e) => Err(format!("cannot write {}: {e}", file.display())),
    }
}

/// Reads the password file if there is one; refuses one that is not private.
fn read_private(file: &Path) -> Result<Option<String>, String> {
    let mut f = match std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(format!(
                "cannot read the proxy password {}: {e}",
                file.display()
            ))
        }
    };
    let meta = f
        .metadata()
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    if meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "the proxy password {} is readable by others or not yours (mode {:o}, owner uid {}); \
             anyone who can read it can connect as the superuser of every branch. \
             Run `chmod 600 {}` if it is yours, or delete it to make a new one",
            file.display(),
            meta.mode() & 0o777,
            meta.uid(),
            file.display()
        ));
    }
    let mut text = String::new();
    f.read_to_string(&mut text)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let pw = text.trim().to_string();
    if pw.is_empty() {
        return Err(format!(
            "the proxy password file {} is empty; delete it to make a new one",
            file.display()
        ));
    }
    Ok(Some(pw))
}

fn generate() -> Result<String, String> {
    let mut out = String::with_capacity(PASSWORD_LEN);
    let mut random = std::fs::File::open("/dev/urandom")
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    // Rejection sampling keeps every character equally likely.
    let limit = 256 - 256 % ALPHABET.len();
    let mut buf = [0u8; 64];
    while out.len() < PASSWORD_LEN {
        random
            .read_exact(&mut buf)
            .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
        for &b in &buf {
            if (b as usize) < limit && out.len() < PASSWORD_LEN {
                out.push(ALPHABET[b as usize % ALPHABET.len()] as char);
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn made_once_private_and_stable() {
        let dir = tempfile::tempdir().unwrap();
        let home = ProjectHome::new(dir.path(), &crate::BranchName::parse("p").unwrap());
        let a = load_or_create(&home).unwrap();
        assert_eq!(a.len(), PASSWORD_LEN);
        assert!(a.bytes().all(|b| b.is_ascii_alphanumeric()));
        assert_eq!(load_or_create(&home).unwrap(), a);
        let mode = std::fs::metadata(path(&home)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let other = ProjectHome::new(dir.path(), &crate::BranchName::parse("q").unwrap());
        assert_ne!(load_or_create(&other).unwrap(), a);
    }

    #[test]
    fn a_readable_password_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let home = ProjectHome::new(dir.path(), &crate::BranchName::parse("p").unwrap());
        load_or_create(&home).unwrap();
        std::fs::set_permissions(path(&home), std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = load_or_create(&home).unwrap_err();
        assert!(
            err.contains("readable by others") && err.contains("chmod 600"),
            "{err}"
        );
    }

    #[test]
    fn concurrent_first_use_agrees() {
        let dir = tempfile::tempdir().unwrap();
        let home = ProjectHome::new(dir.path(), &crate::BranchName::parse("p").unwrap());
        let results: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| load_or_create(&home).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| r == &results[0]));
    }
}
