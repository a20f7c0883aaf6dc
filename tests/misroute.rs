//! No silent misroute: deleting or resetting a work tree's active branch needs --force, and
//! then that work tree falls back to its rule's parent and its sessions are told both names.
//! Real git (checkouts and `git worktree add` run the hook), real servers, psql through the
//! proxy with its cwd in each work tree.

mod common;

use std::path::Path;
use std::process::Command;

use common::held::{marker_from, Held};
use common::{git, up, Fs, TestEnv};

const CONFIG: &str = r#"project = "shop"
[proxy]
suspend_timeout = "0"
on_switch = "keep"

[[map]]
git = "feature/*"
branch = "{branch}"
parent = "staging"

[[map]]
git = "*"
branch = "{branch}"
"#;

fn state(env: &TestEnv) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(env.project_dir().join("state.json")).unwrap()).unwrap()
}

fn names(env: &TestEnv) -> Vec<String> {
    env.list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

/// A project whose `feature/*` branches derive from `staging`, each branch holding a marker
/// row with its own name. The daemon is started after the checkouts (`up`), so that its HEAD
/// watcher's late follow-up of a checkout cannot land after the test's delete.
fn project() -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), CONFIG).unwrap();
    env.init();
    git(&env, &["add", ".pgtwig.toml"]);
    git(&env, &["commit", "-qm", "pgtwig"]);
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table marker(branch text); insert into marker values ('main')",
    );
    env.ok(&["branch", "create", "staging"]);
    env.ok(&["branch", "start", "staging"]);
    env.psql("staging", "update marker set branch = 'staging'");
    env
}

#[test]
fn deleting_the_main_work_trees_active_branch_needs_force_and_falls_back_to_the_rules_parent() {
    let env = project();
    let out = git(&env, &["checkout", "-q", "-b", "feature/a"]);
    assert!(out.contains("feature-a"), "{out}");
    env.ok(&["branch", "start", "feature-a"]);
    env.psql("feature-a", "update marker set branch = 'feature-a'");
    let d = up(&env);
    let mut held = Held::open(&d, &env.repo);
    assert_eq!(
        held.query("select branch from marker").as_deref(),
        Some("feature-a")
    );

    // Without --force: refused, naming the work tree and what to do; nothing changed.
    let err = env.fails(&["branch", "delete", "feature-a"]);
    assert!(
        err.contains("\"feature-a\" is the active branch of the main work tree"),
        "{err}"
    );
    assert!(err.contains("Nothing was changed"), "{err}");
    assert!(
        err.contains("pgtwig branch delete feature-a --force"),
        "{err}"
    );
    assert!(err.contains("falls back to \"staging\""), "{err}");
    assert!(names(&env).contains(&"feature-a".to_string()));
    assert_eq!(state(&env)["active"], "feature-a");
    assert_eq!(
        held.query("select branch from marker").as_deref(),
        Some("feature-a")
    );

    // A reset replaces the running app's data: --force too.
    let err = env.fails(&["branch", "reset", "feature-a"]);
    assert!(
        err.contains(
            "a reset replaces its data under the running app with a fresh copy of \"staging\""
        ),
        "{err}"
    );
    assert_eq!(
        held.query("select branch from marker").as_deref(),
        Some("feature-a")
    );

    // With --force: the work tree falls back to the rule's parent, the session hears both names.
    let out = env.ok(&["branch", "delete", "feature-a", "--force"]);
    assert!(
        out.contains("now uses branch \"staging\" (its branch \"feature-a\" was deleted)"),
        "{out}"
    );
    assert!(!names(&env).contains(&"feature-a".to_string()));
    assert_eq!(state(&env)["active"], "staging");
    assert_eq!(held.query("select branch from marker"), None);
    let said = held.ended_saying();
    assert!(
        said.contains("57P01") || said.contains("terminating connection"),
        "{said}"
    );
    assert!(
        said.contains("deleting database branch \"feature-a\"")
            && said.contains("now uses \"staging\""),
        "{said}"
    );
    assert_eq!(marker_from(&d, &env.repo), "staging");

    // Reset with --force keeps the work tree on the same name, with fresh data.
    let mut held = Held::open(&d, &env.repo);
    assert_eq!(
        held.query("select branch from marker").as_deref(),
        Some("staging")
    );
    env.ok(&["branch", "reset", "staging", "--force"]);
    assert_eq!(state(&env)["active"], "staging");
    assert_eq!(held.query("select branch from marker"), None);
    let said = held.ended_saying();
    assert!(
        said.contains("resetting database branch \"staging\" to a fresh copy of \"main\""),
        "{said}"
    );
    assert_eq!(marker_from(&d, &env.repo), "main");
    drop(d);
}

#[test]
fn deleting_a_second_work_trees_active_branch_needs_force_and_moves_only_that_work_tree() {
    let env = project();
    let wt2 = env.repo.parent().unwrap().join("wt2");
    let out = git(
        &env,
        &[
            "worktree",
            "add",
            "-q",
            wt2.to_str().unwrap(),
            "-b",
            "feature/b",
        ],
    );
    assert!(out.contains("feature-b"), "{out}");
    env.ok(&["branch", "start", "feature-b"]);
    env.psql("feature-b", "update marker set branch = 'feature-b'");
    let d = up(&env);
    assert_eq!(marker_from(&d, &wt2), "feature-b");
    assert_eq!(marker_from(&d, &env.repo), "main");
    let wt2_canon = wt2.canonicalize().unwrap();

    let err = env.fails(&["branch", "delete", "feature-b"]);
    assert!(
        err.contains(&format!(
            "\"feature-b\" is the active branch of work tree {}",
            wt2_canon.display()
        )),
        "{err}"
    );
    assert!(names(&env).contains(&"feature-b".to_string()));
    assert_eq!(marker_from(&d, &wt2), "feature-b");
    // The same for `pr close`-style deletes from the other work tree: the refusal is the same.
    let out = Command::new(common::BIN)
        .args(["branch", "delete", "feature-b"])
        .current_dir(&wt2)
        .env("PGTWIG_HOME", &env.home)
        .output()
        .unwrap();
    assert!(!out.status.success());

    let mut held = Held::open(&d, &wt2);
    assert_eq!(
        held.query("select branch from marker").as_deref(),
        Some("feature-b")
    );
    let out = env.ok(&["branch", "delete", "feature-b", "--force"]);
    assert!(
        out.contains(&format!(
            "Work tree {} now uses branch \"staging\"",
            wt2_canon.display()
        )),
        "{out}"
    );
    assert_eq!(held.query("select branch from marker"), None);
    let said = held.ended_saying();
    assert!(
        said.contains("deleting database branch \"feature-b\"") && said.contains("\"staging\""),
        "{said}"
    );
    assert_eq!(marker_from(&d, &wt2), "staging");
    // The main work tree was not touched.
    assert_eq!(marker_from(&d, &env.repo), "main");
    assert_eq!(state(&env)["active"], "main");
    drop(d);
}

#[test]
fn pr_close_of_an_active_branch_needs_force() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), CONFIG).unwrap();
    env.init();
    env.ok(&["pr", "open", "7"]);
    env.ok(&["use", "pr-7"]);
    let err = env.fails(&["pr", "close", "7"]);
    assert!(err.contains("pgtwig pr close 7 --force"), "{err}");
    assert!(names(&env).contains(&"pr-7".to_string()));
    let out = env.ok(&["pr", "close", "7", "--force"]);
    assert!(out.contains("now uses branch \"main\""), "{out}");
    assert_eq!(state(&env)["active"], "main");
}

#[test]
fn gc_keeps_a_branch_made_protected_with_an_older_config_checked_out() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    // The first commit's configuration has no rules; the second protects "dev".
    std::fs::write(env.repo.join(".pgtwig.toml"), "project = \"shop\"\n").unwrap();
    env.init();
    git(&env, &["add", ".pgtwig.toml"]);
    git(&env, &["commit", "-qm", "pgtwig"]);
    let old_commit = git(&env, &["rev-parse", "HEAD"]).trim().to_string();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[[map]]\ngit = \"dev\"\nbranch = \"dev\"\nprotected = true\n\
         [[map]]\ngit = \"*\"\nbranch = \"{branch}\"\n",
    )
    .unwrap();
    git(&env, &["commit", "-qam", "protect dev"]);
    // The hook makes both from the newer configuration; only dev's rule protects.
    git(&env, &["checkout", "-q", "-b", "dev"]);
    git(&env, &["checkout", "-q", "-b", "feature"]);
    assert_eq!(env.branch_json("dev")["protected"], true);
    assert_eq!(env.branch_json("feature")["protected"], false);
    git(&env, &["checkout", "-q", "main"]);
    git(&env, &["branch", "-q", "-D", "dev", "feature"]);
    // An older commit: its .pgtwig.toml knows nothing of the protection.
    git(&env, &["checkout", "-q", "--detach", &old_commit]);
    assert!(!std::fs::read_to_string(env.repo.join(".pgtwig.toml"))
        .unwrap()
        .contains("protected"));

    let dry = env.ok(&["gc", "--dry-run"]);
    assert!(dry.contains("would delete feature"), "{dry}");
    assert!(!dry.contains("would delete dev"), "{dry}");
    let out = env.ok(&["gc"]);
    assert!(
        out.contains(
            "keep   dev (git branch \"dev\" no longer exists, but a protected = true rule made it)"
        ),
        "{out}"
    );
    assert!(out.contains("deleted feature"), "{out}");
    let left = names(&env);
    assert!(left.contains(&"dev".to_string()), "{left:?}");
    assert!(!left.contains(&"feature".to_string()), "{left:?}");
}

/// `pgtwig ARGS` in `cwd` as a shell, IDE or cron job runs it: no PGTWIG_HOME, HOME elsewhere.
fn without_pgtwig_home(cwd: &Path, home: &Path, args: &[&str]) -> std::process::Output {
    Command::new(common::BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("PGTWIG_HOME")
        .env("HOME", home)
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap()
}

#[test]
fn the_state_is_found_through_git_config_without_pgtwig_home() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), "project = \"shop\"\n").unwrap();
    env.init();
    // init recorded the state root in the repository's shared git config.
    let recorded = git(&env, &["config", "--local", "pgtwig.home"]);
    assert_eq!(recorded.trim(), env.home.to_str().unwrap());
    git(&env, &["add", ".pgtwig.toml"]);
    git(&env, &["commit", "-qm", "pgtwig"]);
    let wt2 = env.repo.parent().unwrap().join("wt2");
    git(
        &env,
        &["worktree", "add", "-q", wt2.to_str().unwrap(), "-b", "side"],
    );
    let fake_home = env.repo.parent().unwrap().join("fake-home");
    std::fs::create_dir_all(&fake_home).unwrap();

    // From the repository and from the second work tree: the same project, its branches.
    for cwd in [&env.repo, &wt2] {
        let out = without_pgtwig_home(cwd, &fake_home, &["branch", "list", "--json"]);
        assert!(
            out.status.success(),
            "in {}: {}",
            cwd.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        let list: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
        let names: Vec<&str> = list.iter().map(|b| b["name"].as_str().unwrap()).collect();
        assert_eq!(names, vec!["main", "side"], "in {}", cwd.display());
    }
    // The hook too: a checkout without PGTWIG_HOME makes the branch in the same state.
    let out = Command::new("git")
        .args(["checkout", "-q", "-b", "feature"])
        .current_dir(&wt2)
        .env_remove("PGTWIG_HOME")
        .env("HOME", &fake_home)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        env.project_dir().join("branches/feature").is_dir(),
        "hook said: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!fake_home.join(".local/share/pgtwig").exists());

    // Pointing at a folder without this project's state: the error names the folder, where
    // that came from, and does not send the user straight to a second `pgtwig init`.
    let empty = env.repo.parent().unwrap().join("elsewhere");
    git(
        &env,
        &["config", "--local", "pgtwig.home", empty.to_str().unwrap()],
    );
    let out = without_pgtwig_home(&wt2, &fake_home, &["branch", "list"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "no state for this project in {}",
            empty.join("shop").display()
        )),
        "{err}"
    );
    assert!(
        err.contains("recorded as pgtwig.home in")
            && err.contains(".git/config")
            && err.contains("PGTWIG_HOME is not set"),
        "{err}"
    );
    assert!(
        err.contains("Only if the project was never set up on this machine, run `pgtwig init`"),
        "{err}"
    );
    let out = Command::new(common::BIN)
        .args(["branch", "list"])
        .current_dir(&env.repo)
        .env("PGTWIG_HOME", &empty)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("(the state folder from PGTWIG_HOME)"), "{err}");
}
