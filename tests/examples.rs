//! The examples stay true: every example configuration parses, and the
//! example app's walkthrough (examples/app/README.md) works through the real
//! proxy and real git checkouts.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::{Fs, TestEnv};

#[test]
fn every_example_configuration_parses() {
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut seen = 0;
    for dir in std::fs::read_dir(&examples).unwrap().flatten() {
        for file in [".pgtwig.toml", ".pgtwig.local.toml.example"] {
            let path = dir.path().join(file);
            if !path.exists() {
                continue;
            }
            seen += 1;
            let text = std::fs::read_to_string(&path).unwrap();
            let text = if file == ".pgtwig.toml" {
                text
            } else {
                // A local file only holds rules; check them in a full config.
                format!("project = \"x\"\n{text}")
            };
            if let Err(e) = pgtwig_core::Config::parse(&text, &path) {
                panic!("{e}");
            }
        }
    }
    assert!(
        seen >= 5,
        "expected the workflow examples, found {seen} configurations"
    );
}

/// The example app's binary, built alongside pgtwig by `cargo test --workspace`.
fn app_binary() -> Option<PathBuf> {
    let bin = Path::new(common::BIN).with_file_name("pgtwig-example-app");
    bin.exists().then_some(bin)
}

#[test]
fn the_example_app_follows_git_checkouts() {
    let Some(app) = app_binary() else {
        eprintln!("SKIPPED: pgtwig-example-app is not built (run the tests with `cargo test --workspace`)");
        return;
    };
    let env = TestEnv::new(Fs::Plain).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!(
            "project = \"shop\"\ndatabase = \"app\"\n[proxy]\nlisten = \"127.0.0.1:{port}\"\n[[map]]\ngit = \"*\"\nbranch = \"{{branch}}\"\n\
             post_create = [\"'{}' migrate\"]\n",
            app.display()
        ),
    )
    .unwrap();
    common::git(&env, &["commit", "-q", "--allow-empty", "-m", "init"]);
    env.init();
    // post_create migrates new branches once approved.
    env.ok(&["trust"]);
    let mut daemon = env
        .cmd(&["up"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(daemon.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    // The URL the README gives: the proxy, and the app's database.
    let url = format!("postgres://postgres@127.0.0.1:{port}/app");
    let run = |args: &[&str]| {
        let out = Command::new(&app)
            .args(args)
            .env("DATABASE_URL", &url)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "app {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };

    run(&["migrate"]);
    run(&["add", "buy milk"]);
    let out = common::git(&env, &["checkout", "-b", "feature/x"]);
    assert!(out.contains("post_create"), "{out}");
    run(&["add", "try the feature"]);
    let list = run(&["list"]);
    assert!(
        list.contains("branch feature-x")
            && list.contains("buy milk")
            && list.contains("try the feature"),
        "{list}"
    );
    common::git(&env, &["checkout", "main"]);
    let list = run(&["list"]);
    assert!(
        list.contains("branch main")
            && list.contains("buy milk")
            && !list.contains("try the feature"),
        "{list}"
    );

    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = daemon.wait();
}
