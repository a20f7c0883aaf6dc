//! Who runs the PostgreSQL servers.
//!
//! `initdb` and `postgres` refuse to run as root. When pgtwig itself runs as
//! root (CI, containers, sudo), it runs the server binaries as an
//! unprivileged user instead, and makes that user own the folders its
//! servers write (`data/`, `wal-archive/`) — only those: the folders around
//! them stay root's, passable by that user's group (see
//! [`ServerUser::own_folder`] and `crate::ownership`). The user is
//! `PGTWIG_SERVER_USER` if set, else the owner of the state folder when that
//! is not root, else `postgres` (which every PostgreSQL package creates).
//! Run as anyone else, servers run as that same user and nothing changes.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use nix::unistd::{Gid, Uid, User};

pub const SERVER_USER_ENV: &str = "PGTWIG_SERVER_USER";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// True when pgtwig must switch to this user for server commands.
    pub switch: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ServerUserError {
    #[error(
        "pgtwig is running as root and PostgreSQL refuses to run as root, but no unprivileged user to run it as was \
         found ({0}); create the `postgres` user (installing the postgresql package does), set {SERVER_USER_ENV} to \
         an existing user, or run pgtwig as a normal user"
    )]
    NoUser(String),
    #[error(
        "the PostgreSQL servers run as user `{user}` (pgtwig is running as root), but `{user}` cannot enter {dir}; \
         set PGTWIG_HOME to a folder it can reach (e.g. /var/lib/pgtwig), or run pgtwig as a normal user"
    )]
    Unreachable { user: String, dir: String },
}

impl ServerUser {
    /// The user pgtwig runs as (for files that are pgtwig's own, such as
    /// the daemon's control socket when no local server is involved).
    pub fn current() -> ServerUser {
        let euid = Uid::effective();
        ServerUser {
            name: User::from_uid(euid)
                .ok()
                .flatten()
                .map(|u| u.name)
                .unwrap_or_else(|| euid.to_string()),
            uid: euid.as_raw(),
            gid: Gid::effective().as_raw(),
            switch: false,
        }
    }

    /// Decide who runs servers whose state lives under `home`.
    pub fn resolve(home: &Path) -> Result<ServerUser, ServerUserError> {
        if !Uid::effective().is_root() {
            return Ok(ServerUser::current());
        }
        let lookup = |name: &str| -> Result<Option<User>, ServerUserError> {
            User::from_name(name)
                .map_err(|e| ServerUserError::NoUser(format!("looking up `{name}`: {e}")))
        };
        let user = if let Ok(name) = std::env::var(SERVER_USER_ENV) {
            match lookup(&name)? {
                Some(u) if !u.uid.is_root() => u,
                Some(_) => {
                    return Err(ServerUserError::NoUser(format!(
                        "{SERVER_USER_ENV}={name} is root"
                    )))
                }
                None => {
                    return Err(ServerUserError::NoUser(format!(
                        "{SERVER_USER_ENV}={name} does not exist"
                    )))
                }
            }
        } else if let Some(owner) =
            state_folder_owner(home).and_then(|uid| User::from_uid(uid).ok().flatten())
        {
            owner
        } else {
            lookup("postgres")?
                .ok_or_else(|| ServerUserError::NoUser("no `postgres` user".into()))?
        };
        Ok(ServerUser {
            name: user.name,
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            switch: true,
        })
    }

    /// A command that runs as this user.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new(program);
        if self.switch {
            cmd.uid(self.uid).gid(self.gid);
            // Servers must not inherit root's idea of home or user.
            cmd.env("USER", &self.name).env("LOGNAME", &self.name);
            if let Ok(Some(u)) = User::from_uid(Uid::from_raw(self.uid)) {
                cmd.env("HOME", u.dir);
            }
            // initdb and postgres look at their working directory; root's may be unreadable.
            cmd.current_dir("/");
        }
        cmd
    }

    /// The group that may pass through pgtwig's folders: this user's, when
    /// it is not pgtwig's own (see [`own_folder`](Self::own_folder)).
    pub fn pass_through(&self) -> Option<u32> {
        self.switch.then_some(self.gid)
    }

    /// Make the existing `dir` a folder of pgtwig's own that this user only
    /// passes through: the project folder, `branches/`, `tmp/`, a branch
    /// folder, a build, `bases/`. Mode 0700; when pgtwig runs as root and
    /// servers as this user, root's with this user's group and mode 0710:
    /// the server reaches the folders it writes inside (`data/`,
    /// `wal-archive/`) but cannot list, create, rename or replace anything
    /// here. That is what makes `server.log` safe to open as root: were the
    /// branch folder the server user's, it could swap the log for a link to
    /// any file and have root append to it on the next start. The group is
    /// the server user's own (`postgres` on every distribution); give a
    /// [`SERVER_USER_ENV`] user a group of its own too, since members of
    /// that group could pass through as well (though read nothing: every
    /// file here is 0600 and the server's folders are 0700).
    pub fn own_folder(&self, dir: &Path) -> std::io::Result<()> {
        let (mode, uid) = pgtwig_core::home::folder_mode(self.pass_through());
        pgtwig_core::private::secure_dir(dir, mode, uid, self.pass_through())
    }

    /// Make the existing `dir` a folder this user writes (`wal-archive/`):
    /// its own, mode 0700.
    pub fn server_folder(&self, dir: &Path) -> std::io::Result<()> {
        pgtwig_core::private::secure_dir(
            dir,
            0o700,
            self.switch.then_some(self.uid),
            self.switch.then_some(self.gid),
        )
    }

    /// Where this user owns files pgtwig writes for it (uid, gid).
    pub fn owner(&self) -> Option<(u32, u32)> {
        self.switch.then_some((self.uid, self.gid))
    }

    /// Give `path` (not following symlinks) to this user when switching.
    pub fn own(&self, path: &Path) -> std::io::Result<()> {
        if self.switch {
            std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid))?;
        }
        Ok(())
    }

    /// Check the user can traverse every ancestor of `dir` (which may not exist yet).
    pub fn check_reachable(&self, dir: &Path) -> Result<(), ServerUserError> {
        if !self.switch {
            return Ok(());
        }
        let groups = user_groups(self);
        let mut cur = Some(dir);
        while let Some(p) = cur {
            if let Ok(meta) = std::fs::metadata(p) {
                let mode = meta.mode();
                let ok = if meta.uid() == self.uid {
                    mode & 0o100 != 0
                } else if groups.contains(&meta.gid()) {
                    mode & 0o010 != 0
                } else {
                    mode & 0o001 != 0
                };
                if !ok {
                    return Err(ServerUserError::Unreachable {
                        user: self.name.clone(),
                        dir: p.display().to_string(),
                    });
                }
            }
            cur = p.parent();
        }
        Ok(())
    }
}

fn user_groups(user: &ServerUser) -> Vec<u32> {
    let mut groups = vec![user.gid];
    if let Ok(cname) = std::ffi::CString::new(user.name.clone()) {
        if let Ok(list) = nix::unistd::getgrouplist(&cname, Gid::from_raw(user.gid)) {
            groups.extend(list.into_iter().map(|g| g.as_raw()));
        }
    }
    groups
}

/// The owner of the state folder, when that is not root: the nearest
/// existing folder at or above `dir` that root does not own. Folders root
/// made on the way (the project folder itself is always root's when pgtwig
/// runs as root, see `own_folder`) are passed over, so the answer is the
/// same before `pgtwig init` and after.
fn state_folder_owner(dir: &Path) -> Option<Uid> {
    dir.ancestors()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| Uid::from_raw(m.uid()))
        .find(|uid| !uid.is_root())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run as root, servers run as the state folder's owner, before the
    /// project folder exists (`pgtwig init`) and after root made it.
    #[test]
    fn the_state_folders_owner_runs_servers_before_and_after_init() {
        if !Uid::effective().is_root() || std::env::var_os(SERVER_USER_ENV).is_some() {
            eprintln!("SKIPPED: needs root and no {SERVER_USER_ENV}");
            return;
        }
        let nobody = User::from_name("nobody").unwrap().expect("user nobody");
        let d = tempfile::tempdir().unwrap();
        let home = d.path().join("state");
        std::fs::create_dir(&home).unwrap();
        std::os::unix::fs::chown(&home, Some(nobody.uid.as_raw()), None).unwrap();
        let project = home.join("shop");
        assert_eq!(
            ServerUser::resolve(&project).unwrap().uid,
            nobody.uid.as_raw()
        );
        std::fs::create_dir(&project).unwrap();
        assert_eq!(
            ServerUser::resolve(&project).unwrap().uid,
            nobody.uid.as_raw()
        );
    }
}
