//! Named pause points for crash tests.
//!
//! Set `PGTWIG_FAILPOINT=<name>` and the process, on reaching [`hit`] with that
//! name, prints `pgtwig: failpoint <name> reached` to stderr and sleeps until
//! it is killed. Tests use it to kill a command at a precise step and then
//! check that nothing half-made is visible. Unset, it costs one env lookup.

use std::io::Write;

/// The environment variable naming the failpoint to stop at.
pub const ENV: &str = "PGTWIG_FAILPOINT";

/// Pause forever here if `PGTWIG_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if std::env::var_os(ENV).is_some_and(|v| v == name) {
        let mut err = std::io::stderr();
        let _ = writeln!(err, "pgtwig: failpoint {name} reached");
        let _ = err.flush();
        loop {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
    }
}
