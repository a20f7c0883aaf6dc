//! psql through the proxy from inside a folder (a work tree, or outside every one): one-shot
//! queries and sessions held open, for the tests that route by work tree.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::Daemon;

/// The branch marker (`select branch from marker`) as seen by psql run in `cwd` through the
/// proxy.
pub fn marker_from(d: &Daemon, cwd: &Path) -> String {
    let out = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            d.port
        ))
        .args(["-X", "-A", "-t", "-w", "-c", "select branch from marker"])
        .current_dir(cwd)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql in {}: {}",
        cwd.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// A psql session held open in `cwd`, fed one statement at a time.
pub struct Held {
    pub child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
}

impl Held {
    pub fn open(d: &Daemon, cwd: &Path) -> Held {
        let mut child = Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=postgres dbname=postgres",
                d.port
            ))
            .args(["-X", "-A", "-t", "-w", "-q"])
            .current_dir(cwd)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = BufReader::new(child.stdout.take().unwrap());
        Held { child, out }
    }

    /// Runs `sql` (one row, one column) and returns its value, or None when the session ended.
    pub fn query(&mut self, sql: &str) -> Option<String> {
        let stdin = self.child.stdin.as_mut().unwrap();
        if writeln!(stdin, "{sql};").is_err() {
            return None;
        }
        let _ = stdin.flush();
        let mut line = String::new();
        match self.out.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim().to_string()),
        }
    }

    /// What psql printed on stderr once the session ended.
    pub fn ended_saying(mut self) -> String {
        drop(self.child.stdin.take());
        let mut err = String::new();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        err
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
