//! The daemon's open-file limit. Every session holds two descriptors (client and server), and
//! the soft limit is often 1024 (systemd, most shells) while the hard limit is far higher; a
//! proxy that stays at the soft limit refuses clients long before the servers are full.

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (on macOS at most `OPEN_MAX`, which
/// `setrlimit` enforces there). Failure is logged, not fatal: the proxy then answers 53300
/// when it runs out.
pub fn raise() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return;
    };
    #[cfg(target_os = "macos")]
    let hard = hard.min(10240); // OPEN_MAX
    if soft >= hard {
        return;
    }
    match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
        Ok(()) => tracing::debug!("open-file limit raised from {soft} to {hard}"),
        Err(e) => tracing::warn!("cannot raise the open-file limit from {soft} to {hard}: {e}"),
    }
}
