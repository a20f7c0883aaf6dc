//! Shared helpers for end-to-end tests: a real git repository, a private
//! PGTWIG_HOME, the real `pgtwig` binary, real PostgreSQL servers (stopped
//! when the test ends) and psql.
#![allow(dead_code)]

pub mod held;
pub mod os_user;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pgtwig");

pub struct TestEnv {
    _tmp: tempfile::TempDir,
    pub repo: PathBuf,
    pub home: PathBuf,
    /// `PGTWIG_FREE_SPACE_MARGIN` for every command: [`TEST_FREE_SPACE_MARGIN`] unless a test
    /// wants the configuration's (`None`).
    pub free_space_margin: Option<String>,
}

/// The default margin is 5 % of the file system (up to 10 GiB): tests of
/// everything but the free-space check must not fail because the machine is short of that.
pub const TEST_FREE_SPACE_MARGIN: &str = "256MiB";

/// Where the state goes: the plain file system, or one that can reflink.
pub enum Fs {
    Plain,
    Reflink,
}

impl TestEnv {
    /// A git repository and a state folder under a fresh temp folder.
    /// Returns None (after printing why) when `Fs::Reflink` is asked for and
    /// no copy-on-write file system is available.
    pub fn new(fs: Fs) -> Option<TestEnv> {
        let base = match fs {
            Fs::Plain => std::env::temp_dir(),
            Fs::Reflink => match reflink_dir() {
                Some(d) => d,
                None => {
                    eprintln!(
                        "SKIPPED: no copy-on-write file system (set PGTWIG_TEST_REFLINK_DIR to a folder on XFS with \
                         reflink=1, btrfs or APFS; .ci/run prepares one)"
                    );
                    return None;
                }
            },
        };
        Some(TestEnv::new_in(&base))
    }

    /// [`new`](Self::new) under a folder of the caller's (a file system the test mounted).
    pub fn new_in(base: &Path) -> TestEnv {
        // Also for the tests that run pgtwig (or git, whose hook runs it) without `cmd`:
        // once, before this test spawns anything; `cmd` sets or removes it per command.
        static MARGIN: std::sync::Once = std::sync::Once::new();
        MARGIN.call_once(|| std::env::set_var("PGTWIG_FREE_SPACE_MARGIN", TEST_FREE_SPACE_MARGIN));
        let tmp = tempfile::Builder::new()
            .prefix("pgtwig-test-")
            .tempdir_in(base)
            .unwrap();
        // The servers may run as another user (tests run as root in CI): let them in.
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let repo = tmp.path().join("shop");
        let home = tmp.path().join("home");
        std::fs::create_dir(&repo).unwrap();
        let out = Command::new("git")
            .args(["init", "-q", "-b", "main"])
            .current_dir(&repo)
            .output()
            .unwrap();
        assert!(out.status.success(), "git init: {out:?}");
        TestEnv {
            _tmp: tmp,
            repo,
            home,
            free_space_margin: Some(TEST_FREE_SPACE_MARGIN.into()),
        }
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(BIN);
        c.args(args)
            .current_dir(&self.repo)
            .env("PGTWIG_HOME", &self.home)
            .env_remove("PGTWIG_FAILPOINT")
            .env_remove("PGTWIG_LOG");
        match &self.free_space_margin {
            Some(m) => c.env("PGTWIG_FREE_SPACE_MARGIN", m),
            None => c.env_remove("PGTWIG_FREE_SPACE_MARGIN"),
        };
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "pgtwig {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require exit status `code`; returns stdout.
    pub fn ok_code(&self, args: &[&str], code: i32) -> String {
        let out = self.run(args);
        assert_eq!(
            out.status.code(),
            Some(code),
            "pgtwig {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "pgtwig {args:?} should have failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8(out.stderr).unwrap()
    }

    pub fn init(&self) -> String {
        self.ok(&["init"])
    }

    pub fn project_dir(&self) -> PathBuf {
        self.home.join("shop")
    }

    pub fn url(&self, branch: &str) -> String {
        self.ok(&["branch", "url", branch]).trim().to_string()
    }

    /// Run SQL with psql against a branch; returns unaligned output.
    pub fn psql(&self, branch: &str, sql: &str) -> String {
        psql(&self.url(branch), sql)
    }

    pub fn list_json(&self) -> Vec<serde_json::Value> {
        serde_json::from_str(&self.ok(&["branch", "list", "--json"])).unwrap()
    }

    pub fn branch_json(&self, name: &str) -> serde_json::Value {
        self.list_json()
            .into_iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("branch {name} not listed"))
    }

    pub fn tmp_entries(&self) -> Vec<String> {
        match std::fs::read_dir(self.project_dir().join("tmp")) {
            Ok(rd) => rd
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect(),
            Err(_) => vec![],
        }
    }
}

impl Drop for TestEnv {
    /// Stop every server this test started (immediate shutdown: SIGQUIT).
    fn drop(&mut self) {
        let mut pids = vec![];
        for dir in [
            self.project_dir().join("branches"),
            self.project_dir().join("tmp"),
        ] {
            let Ok(rd) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in rd.flatten() {
                if let Ok(text) = std::fs::read_to_string(e.path().join("data/postmaster.pid")) {
                    if let Some(pid) = text
                        .lines()
                        .next()
                        .and_then(|l| l.trim().parse::<i32>().ok())
                    {
                        let _ = nix::sys::signal::kill(
                            nix::unistd::Pid::from_raw(pid),
                            nix::sys::signal::Signal::SIGQUIT,
                        );
                        pids.push(pid);
                    }
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        for pid in pids {
            while nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
                && Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

pub fn psql(url: &str, sql: &str) -> String {
    let out = Command::new("psql")
        .args([url, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "psql {sql:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A folder on a copy-on-write file system, if there is one.
pub fn reflink_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("PGTWIG_TEST_REFLINK_DIR").map(PathBuf::from)?;
    let a = dir.join(format!("probe-{}", std::process::id()));
    let b = dir.join(format!("probe-{}.c", std::process::id()));
    std::fs::write(&a, b"x").ok()?;
    let ok = Command::new("cp")
        .arg("--reflink=always")
        .arg(&a)
        .arg(&b)
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    if ok {
        Some(dir)
    } else {
        eprintln!("PGTWIG_TEST_REFLINK_DIR={} cannot reflink", dir.display());
        None
    }
}

/// Wait until `f` is true or panic after `secs`.
pub fn wait_for(secs: u64, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn path_str(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A `pgtwig up` started for a test; SIGTERM and reaped when dropped. Its
/// stderr (the daemon log) goes to a file named by the port in the temp dir.
pub struct Daemon {
    pub child: std::process::Child,
    pub port: u16,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.child.wait();
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Start `pgtwig up` on a free port and wait until it listens.
pub fn up(env: &TestEnv) -> Daemon {
    use std::io::{BufRead, BufReader};
    let port = free_port();
    let log = std::env::temp_dir().join(format!("pgtwig-test-daemon-{port}.log"));
    let mut child = env
        .cmd(&["up", "--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    out.read_line(&mut line).unwrap();
    // Keep draining what it prints so it never writes into a closed pipe.
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    assert!(
        line.contains(&format!("127.0.0.1:{port}")),
        "daemon said: {line:?}"
    );
    Daemon { child, port }
}

/// Run real git in the test's repository; its hook runs the test's pgtwig.
/// Returns stdout and stderr together (hooks print to either).
pub fn git(env: &TestEnv, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(&env.repo)
        .env("PGTWIG_HOME", &env.home)
        .env(
            "PGTWIG_FREE_SPACE_MARGIN",
            env.free_space_margin.as_deref().unwrap_or(""),
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}
