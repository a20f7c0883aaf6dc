//! End to end with real git: checkouts switch the database branch (hook
//! and HEAD watching), auto-creation, chained hooks, core.hooksPath,
//! detached HEAD, worktrees, pull-request branches, gc, bad config.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{git, up, Daemon, Fs, TestEnv};

/// A repository with one commit, made with git2, and pgtwig initialised.
fn repo_env(extra_config: &str) -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    {
        let repo = git2::Repository::open(&env.repo).unwrap();
        let sig = git2::Signature::now("t", "t@example.com").unwrap();
        std::fs::write(env.repo.join("README"), "x").unwrap();
        let mut index = repo.index().unwrap();
        index.add_path(Path::new("README")).unwrap();
        index.write().unwrap();
        let tree = repo.find_tree(index.write_tree().unwrap()).unwrap();
        repo.commit(Some("HEAD"), &sig, &sig, "init", &tree, &[])
            .unwrap();
    }
    if !extra_config.is_empty() {
        std::fs::write(
            env.repo.join(".pgtwig.toml"),
            format!("project = \"shop\"\n{extra_config}"),
        )
        .unwrap();
    }
    env
}

fn active(env: &TestEnv) -> String {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.project_dir().join("state.json")).unwrap(),
    )
    .unwrap();
    state["active"].as_str().unwrap().to_string()
}

fn which_branch(d: &Daemon) -> String {
    common::psql(
        &format!("postgres://postgres@127.0.0.1:{}/postgres", d.port),
        "select coalesce((select branch from marker), 'none')",
    )
}

#[test]
fn checkout_switches_and_auto_creates() {
    let env = repo_env("[[map]]\ngit = \"*\"\nbranch = \"{branch}\"\npost_create = [\"psql \\\"$DATABASE_URL\\\" -qc 'create table made_by_post_create()'\", \"exit 3\"]\n");
    let out = env.init();
    assert!(out.contains("Installed the git hook"), "{out}");
    // The config's commands run once approved (tests/trust.rs tests the rest).
    assert!(out.contains("run `pgtwig trust`"), "{out}");
    env.ok(&["trust"]);
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table marker(branch text); insert into marker values ('main')",
    );
    let d = up(&env);
    assert_eq!(which_branch(&d), "main");

    // A new git branch: its database branch is made from main, post_create runs
    // (a failing command is reported, the branch kept), and the proxy routes to it
    // by the time `git checkout` returns.
    let out = git(&env, &["checkout", "-b", "feature/login"]);
    assert!(
        out.contains("created database branch \"feature-login\" from \"main\""),
        "{out}"
    );
    assert!(
        out.contains("post_create command `exit 3` failed") && out.contains("was kept"),
        "{out}"
    );
    assert_eq!(active(&env), "feature-login");
    assert_eq!(
        env.branch_json("feature-login")["git_branch"],
        "feature/login"
    );
    env.psql("feature-login", "update marker set branch = 'feature'");
    assert_eq!(
        env.psql(
            "feature-login",
            "select count(*) from pg_class where relname = 'made_by_post_create'"
        ),
        "1"
    );
    assert_eq!(which_branch(&d), "feature");

    git(&env, &["checkout", "main"]);
    assert_eq!(which_branch(&d), "main");
    git(&env, &["checkout", "feature/login"]);
    assert_eq!(which_branch(&d), "feature");

    // Detached HEAD (rebase, bisect) keeps the current database branch.
    git(&env, &["checkout", "--detach", "main"]);
    assert_eq!(active(&env), "feature-login");
    assert_eq!(which_branch(&d), "feature");

    // A checkout that skips hooks is followed by the daemon watching HEAD.
    git(
        &env,
        &["-c", "core.hooksPath=/dev/null", "checkout", "main"],
    );
    common::wait_for(10, "the daemon to follow a hook-less checkout", || {
        active(&env) == "main"
    });
    assert_eq!(which_branch(&d), "main");
}

#[test]
fn hook_chains_respects_hookspath_and_never_fails_a_checkout() {
    let env = repo_env("");
    // A pre-existing hook, in a core.hooksPath folder (as husky sets up).
    git(&env, &["config", "core.hooksPath", ".githooks"]);
    let hooks = env.repo.join(".githooks");
    std::fs::create_dir(&hooks).unwrap();
    std::fs::write(
        hooks.join("post-checkout"),
        "#!/bin/sh\necho \"$3\" >> \"$(git rev-parse --show-toplevel)/chained.log\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(
        hooks.join("post-checkout"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    let out = env.init();
    assert!(
        out.contains(".githooks/post-checkout") && out.contains("existing hook still runs"),
        "{out}"
    );
    let again = env.init();
    assert!(
        again.contains("is installed"),
        "init is idempotent: {again}"
    );
    assert!(!env.repo.join(".git/hooks/post-checkout").exists());

    git(&env, &["checkout", "-q", "-b", "dev"]);
    assert_eq!(
        std::fs::read_to_string(env.repo.join("chained.log")).unwrap(),
        "1\n",
        "the old hook ran once"
    );
    assert_eq!(active(&env), "dev", "switched without a daemon running");

    // With the state broken, the checkout still succeeds; pgtwig says one line.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\nbogus = 1\n",
    )
    .unwrap();
    let out = Command::new("git")
        .args(["checkout", "main"])
        .current_dir(&env.repo)
        .env("PGTWIG_HOME", &env.home)
        .output()
        .unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("pgtwig: ") && err.contains("bogus"), "{err}");
    std::fs::write(env.repo.join(".pgtwig.toml"), "project = \"shop\"\n").unwrap();

    // Uninstall restores the old hook.
    let out = env.ok(&["uninstall"]);
    assert!(out.contains("restored"), "{out}");
    let hook = std::fs::read_to_string(hooks.join("post-checkout")).unwrap();
    assert!(
        hook.contains("chained.log") && !hook.contains("pgtwig"),
        "{hook}"
    );
}

#[test]
fn rules_never_create_and_worktrees() {
    let env = repo_env("[[map]]\ngit = \"main\"\nbranch = \"main\"\n[[map]]\ngit = \"dependabot/*\"\nbranch = \"{branch}\"\ncreate = \"never\"\n[[map]]\ngit = \"*\"\nbranch = \"dev-{user}\"\n");
    env.init();
    let out = git(&env, &["checkout", "-b", "dependabot/npm/lodash"]);
    assert!(
        out.contains("create = \"never\"") && out.contains("staying on \"main\""),
        "{out}"
    );
    assert_eq!(active(&env), "main");
    git(&env, &["checkout", "-b", "feature/a"]);
    let dev = active(&env);
    assert!(dev.starts_with("dev-"), "{dev}");
    git(&env, &["checkout", "-b", "feature/b"]);
    assert_eq!(
        active(&env),
        dev,
        "one branch per developer, shared by their git branches"
    );

    // A second work tree: its checkouts make and switch its own branch; the
    // main work tree keeps its own (tests/worktrees.rs routes clients by it).
    git(&env, &["checkout", "main"]);
    let wt = env.repo.parent().unwrap().join("wt");
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[[map]]\ngit = \"*\"\nbranch = \"{branch}\"\n",
    )
    .unwrap();
    // The configuration is committed, as it would be, so the new work tree has it.
    git(&env, &["add", ".pgtwig.toml"]);
    git(
        &env,
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.com",
            "commit",
            "-qm",
            "pgtwig",
        ],
    );
    let out = git(
        &env,
        &["worktree", "add", "-b", "side", wt.to_str().unwrap()],
    );
    assert!(
        out.contains("database branch \"side\" for work tree"),
        "{out}"
    );
    assert!(env.project_dir().join("branches/side").exists());
    assert_eq!(active(&env), "main");
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.project_dir().join("state.json")).unwrap(),
    )
    .unwrap();
    let wt_key = wt.canonicalize().unwrap().display().to_string();
    assert_eq!(state["worktrees"][&wt_key], "side", "{state}");
}

#[test]
fn pull_request_branches_and_gc() {
    let env = repo_env("");
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table marker(branch text); insert into marker values ('main')",
    );
    let gh = env.repo.parent().unwrap().join("github_output");
    let out = env
        .cmd(&["pr", "open", "42", "--ttl", "1s"])
        .env("GITHUB_OUTPUT", &gh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert_eq!(common::psql(&url, "select branch from marker"), "main");
    let written = std::fs::read_to_string(&gh).unwrap();
    assert!(
        written.contains(&format!("database_url={url}")) && written.contains("branch=pr-42"),
        "{written}"
    );
    // Idempotent.
    assert_eq!(env.ok(&["pr", "open", "42"]).trim(), url);
    assert_eq!(env.list_json().len(), 2);
    env.ok(&["pr", "close", "42"]);
    assert!(env.ok(&["pr", "close", "42"]).contains("already closed"));
    assert_eq!(env.list_json().len(), 1);

    // gc: expired PR branches and branches of deleted git branches go;
    // the root, protected and active branches stay.
    env.ok(&["pr", "open", "7", "--ttl", "1s"]);
    env.ok(&["pr", "open", "8", "--ttl", "7d"]);
    git(&env, &["checkout", "-q", "-b", "gone"]);
    git(&env, &["checkout", "-q", "-b", "kept"]);
    git(&env, &["checkout", "-q", "main"]);
    git(&env, &["branch", "-q", "-D", "gone"]);
    std::thread::sleep(Duration::from_millis(1100));
    let dry = env.ok(&["gc", "--dry-run"]);
    assert!(
        dry.contains("would delete gone") && dry.contains("would delete pr-7"),
        "{dry}"
    );
    assert!(
        !dry.contains("pr-8") && !dry.contains("kept") && !dry.contains(" main"),
        "{dry}"
    );
    assert_eq!(env.list_json().len(), 5, "dry run deletes nothing");
    env.ok(&["gc"]);
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["kept", "main", "pr-8"]);

    // A protected template rule keeps its branches even when their git branch is gone.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[[map]]\ngit = \"*\"\nbranch = \"dev-{user}\"\nprotected = true\n",
    )
    .unwrap();
    git(&env, &["checkout", "-q", "-b", "feature/a"]);
    git(&env, &["checkout", "-q", "kept"]);
    git(&env, &["branch", "-q", "-D", "feature/a"]);
    let dev: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .filter(|n| n.starts_with("dev-"))
        .collect();
    assert_eq!(dev.len(), 1, "{dev:?}");
    env.ok(&["use", "main"]); // so that "active" is not what keeps it
    let out = env.ok(&["gc"]);
    assert!(!out.contains(&dev[0]), "{out}");
    assert!(env.project_dir().join("branches").join(&dev[0]).exists());
}

#[test]
fn bad_rules_are_errors_naming_the_key_and_line() {
    let env = repo_env("[[map]]\ngit = \"*\"\nbranch = \"{branch}\"\nparnet = \"main\"\n");
    let err = env.fails(&["init"]);
    assert!(err.contains("parnet") && err.contains("line 5"), "{err}");
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[[map]]\ngit = \"*\"\nbranch = \"Dev {user}\"\n",
    )
    .unwrap();
    let err = env.fails(&["init"]);
    assert!(
        err.contains("does not make a valid branch name") && err.contains("line 4"),
        "{err}"
    );
    std::fs::write(
        env.repo.join(".pgtwig.local.toml"),
        "[[map]]\ngit = \"*\"\nbranch = \"x\"\ncreate = \"maybe\"\n",
    )
    .unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), "project = \"shop\"\n").unwrap();
    let err = env.fails(&["init"]);
    assert!(
        err.contains(".pgtwig.local.toml") && err.contains("maybe") && err.contains("never"),
        "{err}"
    );
}
