//! Throwaway clones for `pgtwig check`: a copy-on-write clone of a branch, run out of
//! sight from a build folder in `tmp/` with extra server settings, thrown away afterwards
//! or kept as a branch.
//!
//! Crash safety is the unlocked build's (see `build`): the folder holds its own flock
//! while this process lives, so nobody removes it meanwhile; when the process dies
//! (SIGKILL included) the next holder of the project lock stops its server and removes
//! it. The parent is cloned as `branch create` clones it and is never written.

use std::path::{Path, PathBuf};

use pgtwig_core::BranchName;

use crate::engine::{now_rfc3339, Branch, BranchMeta, Error, LocalBackend, Result};

/// What the settings of a scratch server can depend on, read before it starts.
pub struct ScratchSetup {
    /// PostgreSQL's library folder of the server binaries (`pg_config --pkglibdir`), to
    /// see which preloadable libraries ship with them.
    pub pkglibdir: PathBuf,
    /// The clone's own `shared_preload_libraries` (from its configuration files), so that
    /// an added library keeps the branch's; None when it cannot be read.
    pub shared_preload_libraries: Option<String>,
}

/// The running scratch server, as `work` sees it.
pub struct ScratchServer<'a> {
    /// Its socket folder (port 5432): `cluster::client_config` connects there.
    pub socket_dir: &'a Path,
    /// Its server log (pgtwig's file; the server writes to the descriptor it was given).
    pub log: &'a Path,
    pub pg_major: u32,
}

impl LocalBackend {
    /// Clone `parent` into `tmp/`, start the clone with `settings` (each `name=value`, given
    /// as `-c`), run `work` against it, stop it, and then remove it — or publish it as branch
    /// `keep` when given (checked up front: a taken name fails before anything is cloned).
    /// `settings_for` sees the clone's setup first (see [`ScratchSetup`]), so it can ask only
    /// for libraries that are there. Whatever `work` returns, the clone's server is stopped and, unless kept, the
    /// clone removed.
    pub fn with_scratch_clone<T>(
        &self,
        parent: &BranchName,
        keep: Option<&BranchName>,
        settings_for: impl FnOnce(&ScratchSetup) -> Vec<String>,
        work: impl FnOnce(&ScratchServer) -> std::result::Result<T, String>,
    ) -> Result<(T, Option<Branch>)> {
        let (parent_branch, unlocked) = {
            let _lock = match keep {
                Some(k) => self.lock_for_new(k)?,
                None => self.lock()?,
            };
            let parent_branch = self.get(parent)?;
            // As for any clone; what the command then writes is watched by the build server.
            self.check_space_for_clone(keep.unwrap_or(parent), &parent_branch)?;
            (parent_branch, self.new_build_dir_unlocked(parent)?)
        };
        let build = unlocked.dir.clone();
        let log = build.join("server.log");
        let result = (|| {
            let cloned = {
                let _lock = self.lock()?;
                // Again under the lock: the parent may have gone meanwhile.
                let parent_branch = self.get(parent)?;
                self.build_clone(&parent_branch, &build)?
            };
            let pg = self.install_for(&parent_branch)?;
            let setup = ScratchSetup {
                pkglibdir: pkglibdir(&pg.bindir),
                shared_preload_libraries: self.configured(
                    &pg,
                    &build.join("data"),
                    "shared_preload_libraries",
                ),
            };
            let mut settings = settings_for(&setup);
            // History is the kept branch's own business from its first real start.
            settings.push("archive_mode=off".into());
            let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
            let name = keep.unwrap_or(parent);
            let out = self.with_build_server(name, &pg, &build, &log, &settings, |sock| {
                work(&ScratchServer {
                    socket_dir: sock,
                    log: &log,
                    pg_major: pg.major,
                })
                .map_err(Error::Other)
            })?;
            let kept = match keep {
                None => None,
                Some(k) => {
                    let meta = BranchMeta {
                        parent: Some(parent.clone()),
                        created: now_rfc3339(),
                        clone_method: cloned.method,
                        pg_major: parent_branch.meta.pg_major,
                        git_branch: None,
                        expires: None,
                        protected: false,
                    };
                    crate::databases::known::inherit(&parent_branch.dir, &build)
                        .map_err(crate::engine::io_err("recording the branch's databases"))?;
                    let _lock = self.lock_for_new(k)?;
                    Some(self.publish(k, &build, &meta)?)
                }
            };
            Ok((out, kept))
        })();
        if result.as_ref().map_or(true, |(_, kept)| kept.is_none()) {
            self.discard_build(&build, &log);
        }
        drop(unlocked);
        result
    }
}

impl LocalBackend {
    /// A setting as the configuration files of data directory `data` give it (`postgres -C`,
    /// which reads them without starting a server).
    fn configured(&self, pg: &crate::pgbin::PgInstall, data: &Path, name: &str) -> Option<String> {
        let out = self
            .user
            .command(&pg.bin("postgres"))
            .arg("-D")
            .arg(data)
            .arg("-C")
            .arg(name)
            .env_remove("PGDATA")
            .stdin(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())?;
        Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

/// `<bindir>/../lib` on Debian's layout (/usr/lib/postgresql/15/{bin,lib}); `pg_config
/// --pkglibdir` elsewhere.
fn pkglibdir(bindir: &Path) -> PathBuf {
    let beside = bindir.with_file_name("lib");
    if beside.join("plpgsql.so").exists() || beside.join("plpgsql.dylib").exists() {
        return beside;
    }
    std::process::Command::new(bindir.join("pg_config"))
        .arg("--pkglibdir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        .unwrap_or(beside)
}
