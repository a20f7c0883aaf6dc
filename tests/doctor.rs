//! `pgtwig doctor` and `init`'s checks: the copy-on-write verdict on a reflink folder and on a
//! plain one, the commands it gives where the state folder cannot clone (run here as given:
//! they make a loop-mounted XFS at the state folder, and the next branch is a clone), the port
//! and who holds it, the hook and the daemon.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{free_port, Fs, TestEnv};
use serde_json::Value;

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// `.pgtwig.toml` with the proxy on a free port (5432 may be taken on a test machine), adopted
/// by `init`.
fn configure(env: &TestEnv) -> u16 {
    let port = free_port();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!("project = \"shop\"\n\n[proxy]\nlisten = \"localhost:{port}\"\n"),
    )
    .unwrap();
    port
}

/// `pgtwig doctor --json`: its exit code and what it said.
fn doctor(env: &TestEnv) -> (i32, Value) {
    let out = env.run(&["doctor", "--json"]);
    let json: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "doctor --json printed no JSON ({e}): {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), json)
}

fn finding<'a>(report: &'a Value, check: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["check"] == check)
        .unwrap_or_else(|| panic!("no {check} finding in {report:#}"))
}

#[test]
fn the_copy_on_write_verdict_differs_between_a_reflink_folder_and_a_plain_one() {
    let reflink = match TestEnv::new(Fs::Reflink) {
        Some(env) => env,
        None => {
            assert!(
                !in_ci(),
                "CI must run the reflink doctor test (PGTWIG_TEST_REFLINK_DIR)"
            );
            return;
        }
    };
    let plain = TestEnv::new(Fs::Plain).unwrap();
    let plain_fs = finding(&doctor(&plain).1, "copy-on-write")["details"]["reflink"].clone();
    if plain_fs == true {
        assert!(
            !in_ci(),
            "CI's temp folder must be a file system that cannot clone"
        );
        eprintln!("SKIPPED: the temp folder clones, so there is no plain folder to compare with");
        return;
    }
    for (env, clones) in [(&reflink, true), (&plain, false)] {
        configure(env);
        let init = env.init();
        let verdict = if clones {
            "Copy-on-write: yes"
        } else {
            "Copy-on-write: no"
        };
        assert!(init.contains(verdict), "init said: {init}");
        // Up front: before the root branch is made.
        assert!(
            init.find(verdict).unwrap() < init.find("Created root branch").unwrap(),
            "{init}"
        );
        let (code, report) = doctor(env);
        let cow = finding(&report, "copy-on-write");
        assert_eq!(cow["details"]["reflink"], clones, "{cow:#}");
        if clones {
            assert_eq!(cow["status"], "ok", "{cow:#}");
            assert_eq!(cow["details"]["file_system"], "xfs", "{cow:#}");
            assert!(cow.get("commands").is_none(), "{cow:#}");
        } else {
            assert_eq!(cow["status"], "warn", "{cow:#}");
            let commands: Vec<&str> = cow["commands"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap())
                .collect();
            assert!(
                commands
                    .iter()
                    .any(|c| c.contains("mkfs.xfs -q -m reflink=1")),
                "{commands:?}"
            );
            let state = env.home.to_str().unwrap();
            assert!(
                commands
                    .iter()
                    .any(|c| c.contains(&format!("mount -o loop {state}.xfs {state}"))),
                "{commands:?}"
            );
        }
        // Working, no daemon: a warning, not a failure.
        assert_eq!(code, 0, "{report:#}");
        assert_eq!(report["ok"], true);
        assert_eq!(finding(&report, "daemon")["status"], "warn");
        assert_eq!(finding(&report, "hook")["status"], "ok");
        let binaries = finding(&report, "server-binaries");
        assert_eq!(binaries["status"], "ok");
        assert!(
            binaries["details"]["installations"][0]["version"]
                .as_str()
                .is_some_and(|v| !v.is_empty()),
            "{binaries:#}"
        );
    }
}

#[test]
fn port_holders_hook_and_daemon_are_named() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    // Before init: the defaults are checked and the project is what needs fixing.
    let (code, report) = doctor(&env);
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(finding(&report, "project")["status"], "fix");
    assert_eq!(finding(&report, "project")["commands"][0], "pgtwig init");

    let port = configure(&env);
    env.init();
    // Someone else on the proxy's port: named with its pid, and exit 1.
    let squatter = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let (code, report) = doctor(&env);
    let found = finding(&report, "port");
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(found["status"], "fix");
    let summary = found["summary"].as_str().unwrap();
    assert!(
        summary.contains(&format!("127.0.0.1:{port} is taken by process doctor-")),
        "{summary}"
    );
    assert!(
        summary.contains(&format!("(pid {})", std::process::id())),
        "{summary}"
    );
    assert!(
        found["fix"].as_str().unwrap().contains("--port"),
        "{found:#}"
    );
    let text = String::from_utf8(env.run(&["doctor"]).stdout).unwrap();
    assert!(text.contains("need fixing"), "{text}");
    drop(squatter);

    // The project's own daemon on it is fine, and it says which work tree it follows.
    let daemon = env
        .cmd(&["up", "--port", &port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let daemon = common::Daemon {
        child: daemon,
        port,
    };
    // Ready when its control socket answers (it listens on TCP a moment before).
    common::wait_for(30, "the daemon to answer `status`", || {
        let out = env.run(&["status", "--json"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|s| s["daemon"].is_object())
    });
    let (code, report) = doctor(&env);
    assert_eq!(code, 0, "{report:#}");
    let port_finding = finding(&report, "port");
    assert_eq!(port_finding["status"], "ok", "{port_finding:#}");
    assert!(
        port_finding["summary"]
            .as_str()
            .unwrap()
            .contains("this project's proxy"),
        "{port_finding:#}"
    );
    let d = finding(&report, "daemon");
    assert_eq!(d["status"], "ok", "{d:#}");
    assert_eq!(d["details"]["pid"], daemon.child.id());
    assert!(
        d["summary"]
            .as_str()
            .unwrap()
            .contains("follows this work tree"),
        "{d:#}"
    );
    drop(daemon);

    // A hook that is not pgtwig's: checkouts would not switch.
    let hook = env.repo.join(".git/hooks/post-checkout");
    std::fs::write(&hook, "#!/bin/sh\necho mine\n").unwrap();
    let (code, report) = doctor(&env);
    assert_eq!(code, 1);
    let h = finding(&report, "hook");
    assert_eq!(h["status"], "fix", "{h:#}");
    assert_eq!(h["commands"][0], "pgtwig init");
    // What it says to run fixes it, keeping the other hook (chained).
    env.init();
    let h = finding(&doctor(&env).1, "hook").clone();
    assert_eq!(h["status"], "ok", "{h:#}");
    assert!(h["details"]["chained"].is_string(), "{h:#}");
}

/// The state folder mounted by the doctor's commands: unmounted (and the test folder removed)
/// when the test ends, after its servers stopped.
struct Mounted {
    state: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while is_mount_point(&self.state) {
            let ok = Command::new("umount")
                .arg(&self.state)
                .status()
                .is_ok_and(|s| s.success());
            if !ok && std::time::Instant::now() > deadline {
                let _ = Command::new("umount").arg("-l").arg(&self.state).status();
                break;
            }
            if !ok {
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        }
        if let Some(test_folder) = self.state.parent() {
            let _ = std::fs::remove_dir_all(test_folder);
        }
    }
}

fn is_mount_point(path: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let path = path.to_string_lossy();
    mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(path.as_ref()))
}

#[test]
fn the_commands_doctor_gives_make_the_state_folder_clone() {
    let plain = std::env::temp_dir();
    if pgtwig_local_clones(&plain) {
        assert!(
            !in_ci(),
            "CI's temp folder must be a file system that cannot clone"
        );
        eprintln!("SKIPPED: the temp folder clones already");
        return;
    }
    let root = nix::unistd::geteuid().is_root();
    let mkfs = Command::new("sh")
        .args([
            "-c",
            "command -v mkfs.xfs || test -x /usr/sbin/mkfs.xfs || test -x /sbin/mkfs.xfs",
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root || !mkfs {
        assert!(
            !in_ci(),
            "CI must run the reflink store test as root with xfsprogs"
        );
        eprintln!("SKIPPED: mounting the XFS image needs root and mkfs.xfs (xfsprogs)");
        return;
    }
    // Dropped last: the servers (stopped by TestEnv's drop) are gone before the unmount.
    let mounted;
    let env = TestEnv::new(Fs::Plain).unwrap();
    mounted = Mounted {
        state: env.home.clone(),
    };
    configure(&env);
    let (_, report) = doctor(&env);
    let cow = finding(&report, "copy-on-write");
    assert_eq!(cow["details"]["reflink"], false, "{cow:#}");
    let commands: Vec<String> = cow["commands"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_string())
        .collect();
    assert!(!commands.is_empty(), "{cow:#}");
    for c in &commands {
        let out = Command::new("sh")
            .args(["-c", c])
            .current_dir(&env.repo)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{c}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        is_mount_point(&mounted.state),
        "{commands:?} mounted nothing"
    );

    let (_, report) = doctor(&env);
    let cow = finding(&report, "copy-on-write");
    assert_eq!(cow["status"], "ok", "{cow:#}");
    assert_eq!(cow["details"]["file_system"], "xfs", "{cow:#}");
    let init = env.init();
    assert!(init.contains("Copy-on-write: yes"), "{init}");
    env.ok(&["branch", "create", "feature"]);
    assert_eq!(env.branch_json("feature")["clone_method"], "copy-on-write");
}

/// Whether `dir` clones files (cp --reflink=always of a probe file).
fn pgtwig_local_clones(dir: &Path) -> bool {
    let a = dir.join(format!("pgtwig-doctor-probe-{}", std::process::id()));
    let b = dir.join(format!("pgtwig-doctor-probe-{}.c", std::process::id()));
    std::fs::write(&a, b"x").unwrap();
    let ok = Command::new("cp")
        .arg("--reflink=always")
        .arg(&a)
        .arg(&b)
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let _ = std::fs::remove_file(&a);
    let _ = std::fs::remove_file(&b);
    ok
}
