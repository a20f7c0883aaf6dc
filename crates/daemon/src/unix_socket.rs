//! Where the proxy's Unix socket lives: `/tmp/pgtwig-<uid>-proxy-<hash>/.s.PGSQL.<port>`, so
//! `psql -h /tmp/pgtwig-<uid>-proxy-<hash> -p <port>` reaches it.
//!
//! Not inside pgtwig's private runtime folder: like PostgreSQL's own `/var/run/postgresql`,
//! the folder is traversable (0711) and the socket open to everyone (0666), and who gets in is
//! decided per connection from the peer's credentials (`SO_PEERCRED`): the daemon's user as
//! is, everyone else with the proxy password. The folder is made by the daemon and must be its
//! own (a folder someone else made in /tmp could hold a socket impersonating the proxy).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// Creates (or checks) the socket's folder for the project in `project_dir` and returns the
/// socket's path for `port`.
pub fn path(project_dir: &Path, port: u16) -> Result<PathBuf> {
    let uid = nix::unistd::geteuid().as_raw();
    let hash = pgtwig_core::names::short_hash(&project_dir.to_string_lossy());
    let dir = PathBuf::from(format!("/tmp/pgtwig-{uid}-proxy-{hash}"));
    match std::fs::create_dir(&dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let meta = std::fs::symlink_metadata(&dir)
                .with_context(|| format!("reading {}", dir.display()))?;
            if !meta.is_dir() || meta.uid() != uid || meta.mode() & 0o022 != 0 {
                bail!(
                    "{} must be a folder of yours that only you can write to (it is not: another user \
                     may have made it to intercept connections); remove it and retry",
                    dir.display()
                );
            }
        }
        Err(e) => return Err(e).with_context(|| format!("creating {}", dir.display())),
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting the mode of {}", dir.display()))?;
    Ok(dir.join(format!(".s.PGSQL.{port}")))
}
