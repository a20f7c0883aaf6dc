//! OS users made for one test and removed after it (tests that are about permissions run as
//! root and need a second, real account).

use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A user made with `useradd` (its own group, no home, no login), removed on drop.
pub struct OsUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    /// Makes user `name` (one left by a killed run is replaced).
    pub fn create(name: &str) -> OsUser {
        let _ = Command::new("userdel").arg(name).output();
        run_user_tool(
            "useradd",
            &[
                "--system",
                "--user-group",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                name,
            ],
        );
        let user = nix::unistd::User::from_name(name)
            .unwrap()
            .unwrap_or_else(|| panic!("useradd made no user {name}"));
        OsUser {
            name: name.to_string(),
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
        }
    }
}

impl Drop for OsUser {
    fn drop(&mut self) {
        run_user_tool("userdel", &[&self.name]);
    }
}

/// Runs `useradd` or `userdel`, one at a time in this process and again while another process
/// holds the password file lock (both exit 1 then, and 10 for the group file).
fn run_user_tool(tool: &str, args: &[&str]) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    const LOCKED_EXIT_CODES: [i32; 2] = [1, 10];
    const LOCK_DEADLINE: Duration = Duration::from_secs(30);
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let deadline = Instant::now() + LOCK_DEADLINE;
    loop {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let locked = out
            .status
            .code()
            .is_some_and(|c| LOCKED_EXIT_CODES.contains(&c))
            && stderr.contains("lock");
        if !locked || Instant::now() >= deadline {
            // A panic inside a drop while unwinding would abort: say it and go on there.
            if std::thread::panicking() || tool == "userdel" {
                eprintln!("{tool} {args:?} failed ({}): {stderr}", out.status);
                return;
            }
            panic!("{tool} {args:?} failed ({}): {stderr}", out.status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
