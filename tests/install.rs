//! Installing pgtwig the way Python developers install their tools: the wheel maturin builds
//! from `pyproject.toml`, installed into a fresh virtualenv and run from a PATH without cargo
//! — `pgtwig --version`, then README's quick start (init in a fresh git repository, `up
//! --detach`, psql through the proxy, `down`). The wheel must carry both binaries: a managed
//! server archives its WAL with the `pgtwig-archive-wal` beside `pgtwig`.
//!
//! The wheel is built with `--profile dev`, not `--release`: the release profile would compile
//! every dependency again (minutes on a shared two-core machine), while the dev profile reuses
//! what `cargo test` built and only relinks `pgtwig`. What is tested — maturin's packaging of
//! both binaries, the install, finding the archiver — does not depend on the profile; the
//! release workflow builds `--release`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{free_port, psql, wait_for, Fs, TestEnv};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

fn in_ci() -> bool {
    std::env::var("CI").as_deref() == Ok("true")
}

/// Skip (printing why) or, under CI=true, fail.
fn cannot(why: &str) {
    assert!(!in_ci(), "CI must run the wheel test: {why}");
    eprintln!("SKIPPED: {why}");
}

fn show(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// maturin from PyPI, pinned in packaging/build-requirements.txt, in a venv under target/
/// (.ci/run makes it; made here when missing).
fn maturin() -> Result<PathBuf, String> {
    let venv = Path::new(MANIFEST_DIR).join("target/maturin-venv");
    let bin = venv.join("bin/maturin");
    let pinned =
        std::fs::read_to_string(Path::new(MANIFEST_DIR).join("packaging/build-requirements.txt"))
            .map_err(|e| format!("reading packaging/build-requirements.txt: {e}"))?;
    let want = pinned
        .lines()
        .find_map(|l| l.trim().strip_prefix("maturin=="))
        .ok_or("packaging/build-requirements.txt pins no maturin version")?
        .to_string();
    let have = Command::new(&bin)
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    if have.as_deref() == Some(&format!("maturin {want}")) {
        return Ok(bin);
    }
    let pip = venv.join("bin/pip");
    let steps: [(&str, Vec<&str>); 2] = [
        ("python3", vec!["-m", "venv", venv.to_str().unwrap()]),
        (
            pip.to_str().unwrap(),
            vec![
                "install",
                "-q",
                "--disable-pip-version-check",
                "-r",
                "packaging/build-requirements.txt",
            ],
        ),
    ];
    for (tool, args) in steps {
        let out = Command::new(tool)
            .args(&args)
            .current_dir(MANIFEST_DIR)
            .output()
            .map_err(|e| format!("{tool}: {e} (install Python 3 with venv)"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot install maturin from PyPI ({tool} {}): {}",
                args.join(" "),
                show(&out).trim()
            ));
        }
    }
    Ok(bin)
}

/// PATH without any folder that holds cargo or rustc: the installed pgtwig must not need them.
fn path_without_cargo(venv_bin: &Path) -> String {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs = vec![venv_bin.to_path_buf()];
    dirs.extend(
        std::env::split_paths(&current)
            .filter(|d| !d.join("cargo").exists() && !d.join("rustc").exists()),
    );
    std::env::join_paths(dirs).unwrap().into_string().unwrap()
}

/// `pgtwig down` when the test ends, however it ends.
struct Down<'a> {
    pgtwig: &'a Path,
    env: &'a TestEnv,
    path: &'a str,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        let _ = Command::new(self.pgtwig)
            .arg("down")
            .current_dir(&self.env.repo)
            .env("PATH", self.path)
            .env("PGTWIG_HOME", &self.env.home)
            .output();
    }
}

#[test]
fn the_wheel_installs_both_binaries_and_runs_the_quick_start_without_cargo() {
    let maturin = match maturin() {
        Ok(m) => m,
        Err(why) => return cannot(&why),
    };
    let scratch = tempfile::Builder::new()
        .prefix("pgtwig-wheel-")
        .tempdir()
        .unwrap();
    let wheels = scratch.path().join("wheels");
    let out = Command::new(&maturin)
        .args(["build", "--profile", "dev", "--out"])
        .arg(&wheels)
        .current_dir(MANIFEST_DIR)
        .output()
        .unwrap();
    assert!(out.status.success(), "maturin build: {}", show(&out));
    let wheel: Vec<PathBuf> = std::fs::read_dir(&wheels)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "whl"))
        .collect();
    assert_eq!(wheel.len(), 1, "one wheel expected: {wheel:?}");

    // A fresh virtualenv, nothing from PyPI: the wheel alone.
    let venv = scratch.path().join("venv");
    let out = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .output()
        .unwrap();
    assert!(out.status.success(), "python3 -m venv: {}", show(&out));
    let out = Command::new(venv.join("bin/pip"))
        .args(["install", "-q", "--disable-pip-version-check", "--no-index"])
        .arg(&wheel[0])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pip install the wheel: {}",
        show(&out)
    );
    let bin = venv.join("bin");
    let pgtwig = bin.join("pgtwig");
    for program in ["pgtwig", "pgtwig-archive-wal"] {
        assert!(
            bin.join(program).is_file(),
            "the wheel did not install {program}"
        );
    }

    // And what it puts under share/: the man pages (pipx links them into ~/.local/share/man)
    // and the completion scripts.
    for page in ["share/man/man1/pgtwig.1", "share/man/man1/pgtwig-doctor.1"] {
        assert!(
            venv.join(page).is_file(),
            "the wheel did not install {page}"
        );
    }
    assert!(venv
        .join("share/bash-completion/completions/pgtwig")
        .is_file());

    let path = path_without_cargo(&bin);
    let which = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .env("PATH", &path)
            .output()
            .unwrap()
    };
    assert!(!which("cargo").status.success(), "cargo is still on {path}");
    for tool in ["git", "psql"] {
        assert!(which(tool).status.success(), "{tool} is not on {path}");
    }
    let installed = String::from_utf8(which("pgtwig").stdout).unwrap();
    assert_eq!(installed.trim(), pgtwig.to_str().unwrap());

    let env = TestEnv::new(Fs::Plain).expect("a plain folder always works");
    let run = |args: &[&str]| -> Output {
        Command::new("pgtwig")
            .args(args)
            .current_dir(&env.repo)
            .env("PATH", &path)
            .env("PGTWIG_HOME", &env.home)
            .env("PGTWIG_FREE_SPACE_MARGIN", common::TEST_FREE_SPACE_MARGIN)
            .env_remove("PGTWIG_ARCHIVE_WAL")
            .env_remove("PGTWIG_LOG")
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| -> String {
        let out = run(args);
        assert!(out.status.success(), "pgtwig {args:?}: {}", show(&out));
        String::from_utf8(out.stdout).unwrap()
    };

    let version = ok(&["--version"]);
    assert_eq!(
        version.trim(),
        format!("pgtwig {}", env!("CARGO_PKG_VERSION"))
    );

    // README's quick start: init --database app, up, the app's URL.
    let init = ok(&["init", "--database", "app"]);
    assert!(init.contains("Created root branch \"main\""), "{init}");
    let port = free_port().to_string();
    ok(&["up", "--detach", "--port", &port]);
    let _down = Down {
        pgtwig: &pgtwig,
        env: &env,
        path: &path,
    };
    let url = format!("postgres://postgres@localhost:{port}/app");
    assert_eq!(psql(&url, "select current_database()"), "app");
    psql(
        &url,
        "create table orders (id int); insert into orders values (1)",
    );
    assert_eq!(psql(&url, "select count(*) from orders"), "1");

    // The server archives its WAL through the project's copy of the wheel's archiver.
    let copy = env.project_dir().join("bin/pgtwig-archive-wal");
    assert_eq!(
        std::fs::read(&copy).expect("the project's archiver copy"),
        std::fs::read(bin.join("pgtwig-archive-wal")).unwrap(),
        "the project's archiver is not the wheel's"
    );
    psql(&url, "select pg_switch_wal()");
    wait_for(30, "a WAL segment archived", || {
        psql(&url, "select archived_count from pg_stat_archiver") != "0"
    });
    assert_eq!(psql(&url, "select failed_count from pg_stat_archiver"), "0");

    ok(&["down"]);
    let status = ok(&["status"]);
    assert!(
        !status.contains(&format!(":{port}")),
        "the proxy still runs after down: {status}"
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port.parse::<u16>().unwrap())).is_err(),
        "port {port} still answers after down"
    );
}
