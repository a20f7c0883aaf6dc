//! Named pause points for crash tests.
//!
//! Set `PGTWIG_FAILPOINT=<name>` and the process, on reaching [`hit`] with that
//! name, prints `pgtwig: failpoint <name> reached` to stderr and sleeps until
//! it is killed. Tests use it to kill a command at a precise step and then
//! check that nothing half-made is visible. With `PGTWIG_FAILPOINT_ONCE=<file>`
//! too, only the process that creates `<file>` pauses and later ones pass —
//! for a program that is run again after it was killed (the WAL archiver,
//! which PostgreSQL retries). Unset, it costs one env lookup.

use std::io::Write;

/// The environment variable naming the failpoint to stop at.
pub const ENV: &str = "PGTWIG_FAILPOINT";
/// A file whose creation (first come) arms the failpoint once.
pub const ONCE_ENV: &str = "PGTWIG_FAILPOINT_ONCE";

/// Pause forever here if `PGTWIG_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if std::env::var_os(ENV).is_some_and(|v| v == name) {
        if let Some(marker) = std::env::var_os(ONCE_ENV).filter(|m| !m.is_empty()) {
            let first = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&marker)
                .is_ok();
            if !first {
                return;
            }
        }
        let mut err = std::io::stderr();
        let _ = writeln!(err, "pgtwig: failpoint {name} reached");
        let _ = err.flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
