//! One port, a branch per work tree: real git work trees, real `git worktree add` and
//! `git checkout` (the hook provisions and switches), psql started inside each work tree at
//! the same time, and a client outside every work tree.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::held::{marker_from, Held};
use common::{git, up, Fs, TestEnv};

fn status_json(env: &TestEnv) -> serde_json::Value {
    serde_json::from_str(&env.ok(&["status", "--json"])).unwrap()
}

/// Project "shop" (committed .pgtwig.toml), its root "main" holding table marker = 'main'.
fn committed_project_with_marker() -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[proxy]\nsuspend_timeout = \"0\"\n",
    )
    .unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table marker(branch text); insert into marker values ('main')",
    );
    git(&env, &["add", ".pgtwig.toml"]);
    git(&env, &["commit", "-qm", "pgtwig"]);
    env
}

#[test]
fn each_work_tree_reaches_its_own_branch_on_one_port() {
    let env = committed_project_with_marker();
    let d = up(&env);

    // `git worktree add` runs the hook in the new tree: it gets a branch of its own.
    let wt2 = env.repo.parent().unwrap().join("wt2");
    let out = git(
        &env,
        &[
            "worktree",
            "add",
            "-q",
            wt2.to_str().unwrap(),
            "-b",
            "feature-x",
        ],
    );
    assert!(out.contains("feature-x"), "{out}");
    env.ok(&["branch", "start", "feature-x"]);
    env.psql("feature-x", "update marker set branch = 'feature-x'");
    let wt3 = env.repo.parent().unwrap().join("wt3");
    git(
        &env,
        &[
            "worktree",
            "add",
            "-q",
            wt3.to_str().unwrap(),
            "-b",
            "feature-y",
        ],
    );
    env.ok(&["branch", "start", "feature-y"]);
    env.psql("feature-y", "update marker set branch = 'feature-y'");

    // The same port, three work trees, a session held open in each at once.
    let mut in_main = Held::open(&d, &env.repo.join("."));
    let mut in_wt2 = Held::open(&d, &wt2);
    let mut in_wt3 = Held::open(&d, &wt3.join("."));
    assert_eq!(
        in_main.query("select branch from marker").as_deref(),
        Some("main")
    );
    assert_eq!(
        in_wt2.query("select branch from marker").as_deref(),
        Some("feature-x")
    );
    assert_eq!(
        in_wt3.query("select branch from marker").as_deref(),
        Some("feature-y")
    );
    // From a subfolder, and from outside every work tree (the main tree's branch).
    std::fs::create_dir_all(wt2.join("src/app")).unwrap();
    assert_eq!(marker_from(&d, &wt2.join("src/app")), "feature-x");
    assert_eq!(marker_from(&d, Path::new("/")), "main");

    // status: work trees → branch → sessions, and why the outsider went to main's.
    let status = status_json(&env);
    let trees = &status["daemon"]["worktrees"];
    let canon = |p: &Path| p.canonicalize().unwrap().display().to_string();
    assert!(
        trees
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["path"] == canon(&wt2) && t["branch"] == "feature-x"),
        "{trees}"
    );
    let sessions = status["daemon"]["sessions"].as_array().unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s["worktree"] == canon(&wt3) && s["branch"] == "feature-y"),
        "{sessions:?}"
    );

    // A checkout in wt2 moves wt2 only: main's and wt3's sessions stay where they are.
    let out = Command::new("git")
        .args(["checkout", "-q", "-b", "feature-z"])
        .current_dir(&wt2)
        .env("PGTWIG_HOME", &env.home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    env.ok(&["branch", "start", "feature-z"]);
    env.psql("feature-z", "update marker set branch = 'feature-z'");
    assert_eq!(marker_from(&d, &wt2), "feature-z");
    assert_eq!(
        in_main.query("select branch from marker").as_deref(),
        Some("main")
    );
    assert_eq!(
        in_wt3.query("select branch from marker").as_deref(),
        Some("feature-y")
    );
    // wt2's idle session was ended at its boundary with 57P01 (psql reports it on stderr).
    assert_eq!(in_wt2.query("select branch from marker"), None);
    let stderr = in_wt2.ended_saying();
    assert!(
        stderr.contains("switched the active branch from \"feature-x\" to \"feature-z\""),
        "{stderr}"
    );

    // `pgtwig use` in a work tree changes that work tree only; --worktree names another.
    let out = Command::new(common::BIN)
        .args(["use", "feature-x"])
        .current_dir(&wt3)
        .env("PGTWIG_HOME", &env.home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(marker_from(&d, &wt3), "feature-x");
    assert_eq!(marker_from(&d, &env.repo), "main");
    env.ok(&["use", "feature-y", "--worktree", wt3.to_str().unwrap()]);
    assert_eq!(marker_from(&d, &wt3), "feature-y");
    // Pinning still wins.
    let pinned = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres@main",
            d.port
        ))
        .args(["-X", "-A", "-t", "-w", "-c", "select branch from marker"])
        .current_dir(&wt3)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&pinned.stdout).trim(), "main");

    // A checkout that skips the hook, in a linked work tree: the daemon follows it there.
    let out = Command::new("git")
        .args([
            "-c",
            "core.hooksPath=/nonexistent",
            "checkout",
            "-q",
            "-b",
            "feature-w",
        ])
        .current_dir(&wt3)
        .env("PGTWIG_HOME", &env.home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = status_json(&env);
        let followed = status["daemon"]["worktrees"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["path"] == canon(&wt3) && t["branch"] == "feature-w");
        if followed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the daemon did not follow wt3's checkout: {status}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(marker_from(&d, &wt3), "main", "feature-w is a copy of main");
    assert_eq!(marker_from(&d, &wt2), "feature-z");

    let canon_wt2 = canon(&wt2);
    // The text status names the work trees too.
    let text = env.ok(&["status"]);
    assert!(
        text.contains(&format!("{} → feature-z", canon(&wt2))),
        "{text}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while !status_json(&env)["daemon"]["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["branch"] != "feature-x")
    {
        assert!(
            Instant::now() < deadline,
            "wt2's old session is still listed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A removed work tree's branch is a gc candidate, and its entry goes.
    drop(in_wt3);
    let out = Command::new("git")
        .args(["worktree", "remove", "--force", wt2.to_str().unwrap()])
        .current_dir(&env.repo)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let dry = env.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains("would delete feature-z") && dry.contains("was removed"),
        "{dry}"
    );
    assert!(!dry.contains("feature-y"), "wt3's branch stays: {dry}");
    let out = env.ok(&["gc"]);
    assert!(out.contains("deleted feature-z"), "{out}");
    assert!(!env.project_dir().join("branches/feature-z").exists());
    let status = status_json(&env);
    assert!(
        !status["daemon"]["worktrees"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["path"] == canon_wt2),
        "{status}"
    );
    drop(d);
}

/// A work tree made while no hook ran and no daemon watched (here: hooks off, daemon down)
/// gets its branch from the daemon on its first client, by the same policy as the hook.
#[test]
fn a_work_tree_nobody_provisioned_gets_its_branch_on_first_connect() {
    let env = committed_project_with_marker();
    let wt2 = env.repo.parent().unwrap().join("wt2");
    git(
        &env,
        &[
            "-c",
            "core.hooksPath=/nonexistent",
            "worktree",
            "add",
            "-q",
            wt2.to_str().unwrap(),
            "-b",
            "feature-q",
        ],
    );
    assert!(
        !env.ok(&["branch", "list"]).contains("feature-q"),
        "no hook ran, so no branch yet"
    );
    let d = up(&env);

    // The first client in wt2 makes wt2's branch (a copy of main) and lands on it.
    assert_eq!(marker_from(&d, &wt2), "main");
    let canon = wt2.canonicalize().unwrap().display().to_string();
    let status = status_json(&env);
    assert!(
        status["daemon"]["worktrees"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t["path"] == canon && t["branch"] == "feature-q"),
        "{status}"
    );
    env.psql("feature-q", "update marker set branch = 'feature-q'");
    assert_eq!(marker_from(&d, &wt2), "feature-q");
    assert_eq!(marker_from(&d, &env.repo), "main");
    // Through the proxy's Unix socket too: there the kernel names the client's pid.
    let socket = status["daemon"]["unix_socket"]
        .as_str()
        .unwrap()
        .to_string();
    let socket_dir = Path::new(&socket).parent().unwrap().display().to_string();
    for (cwd, want) in [(&wt2, "feature-q"), (&env.repo, "main")] {
        let out = Command::new("psql")
            .arg(format!(
                "host={socket_dir} port={} user=postgres dbname=postgres",
                d.port
            ))
            .args(["-X", "-A", "-t", "-w", "-c", "select branch from marker"])
            .current_dir(cwd)
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            want,
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = std::fs::read_to_string(
        std::env::temp_dir().join(format!("pgtwig-test-daemon-{}.log", d.port)),
    )
    .unwrap();
    assert!(
        log.contains("first client in") && log.contains("created database branch \"feature-q\""),
        "{log}"
    );
}
