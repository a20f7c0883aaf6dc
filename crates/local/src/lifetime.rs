//! Processes that must not outlive the command that started them: the server a build runs
//! (import, anonymize, `branch create --at`, a new root) and import's `pg_dump` /
//! `pg_restore`. A command killed with `kill -9` runs no cleanup of its own, so the kernel
//! has to do it: on Linux each such process asks, between `fork` and `exec`, for a signal
//! when its parent goes (`PR_SET_PDEATHSIG`).
//!
//! What prctl(2) says, and why this is safe here:
//! - The setting is cleared when the process changes credentials (setuid/setgid) and when it
//!   executes a set-user-ID binary. Servers run as another user when pgtwig is root
//!   (`server_user`): std's `Command` switches uid and gid *before* it runs `pre_exec`
//!   closures, so the signal is asked for after the switch and survives; `postgres`,
//!   `pg_dump` and `pg_restore` are not set-user-ID binaries.
//! - The "parent" is the *thread* that forked. Call [`die_with_this_thread`] only for a
//!   process whose starting thread outlives it: a build's server is stopped before the
//!   function that started it returns (`LocalBackend::with_build_server`), and the import's
//!   tools are waited for by the thread that spawned them. Branch servers, which must keep
//!   running after `pgtwig branch start` exits (and after the daemon's worker threads come
//!   and go), never get it.
//! - The signal is not sent when the parent died before the child asked for it: the child
//!   checks its parent is still the one that forked it, and otherwise fails to start.
//! - PostgreSQL runs in the foreground (pgtwig starts `postgres`, not `pg_ctl`, see
//!   `cluster`), so the postmaster's parent is pgtwig itself. Its signal is `SIGQUIT`
//!   (immediate shutdown: the postmaster ends its backends, removes `postmaster.pid` and
//!   exits; a build's data is thrown away anyway). `pg_dump` and `pg_restore` get `SIGTERM`,
//!   on which they cancel their queries, pass the signal to their parallel workers and exit.
//!
//! Elsewhere (macOS) nothing asks the kernel, and the next command that takes the project
//! lock stops a server still running on a dead command's build before deleting it (see
//! `build::recover_interrupted`).

use std::process::Command;

use nix::sys::signal::Signal;

/// Make the process `cmd` starts get `signal` when the calling thread (or the whole
/// process) ends. See the module notes for which processes may have it.
pub fn die_with_this_thread(cmd: &mut Command, signal: Signal) -> &mut Command {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        let parent = nix::unistd::getpid();
        // SAFETY: the closure runs in the forked child before exec and only makes two
        // system calls; it allocates nothing and takes no lock.
        unsafe {
            cmd.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(signal)
                    .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
                if nix::unistd::getppid() != parent {
                    // The parent died between fork and prctl: nobody would send the signal.
                    return Err(std::io::Error::from_raw_os_error(
                        nix::errno::Errno::ESRCH as i32,
                    ));
                }
                Ok(())
            });
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = signal;
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn alive(pid: i32) -> bool {
        // A zombie (not yet reaped) has ended: look at its state, not only its pid.
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| !rest.starts_with('Z')))
            .unwrap_or(false)
    }

    /// The child dies when the thread that started it ends, also when it runs as the
    /// server user (a uid switch before the prctl call must not clear it).
    #[test]
    #[cfg(target_os = "linux")]
    fn a_child_dies_with_the_thread_that_started_it_as_the_server_user_too() {
        let dir = tempfile::tempdir().unwrap();
        let user = crate::server_user::ServerUser::resolve(dir.path()).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let starter = std::thread::spawn(move || {
            let mut cmd = user.command(std::path::Path::new("/bin/sleep"));
            cmd.arg("60");
            let child = die_with_this_thread(&mut cmd, Signal::SIGTERM)
                .spawn()
                .unwrap();
            tx.send(child.id() as i32).unwrap();
            // Keep the thread (the child's parent) until told to end, without reaping.
            done_rx.recv().unwrap();
            drop(child); // not waited for: a Child's drop neither kills nor reaps
        });
        let pid = rx.recv().unwrap();
        assert!(alive(pid), "sleep started");
        std::thread::sleep(Duration::from_millis(200));
        assert!(alive(pid), "sleep runs while its thread lives");
        done_tx.send(()).unwrap();
        starter.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "pid {pid} outlived the thread that started it"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Reap it (its parent is this process).
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid), None);
    }
}
