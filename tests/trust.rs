//! Commands from the repository run only once approved: real git
//! repositories, real `git checkout` and `git worktree add` running the real
//! hook, real PostgreSQL branches (copy-on-write), the real daemon following
//! HEAD. A `post_create` list runs only after `pgtwig trust` approved that
//! exact list; unapproved, the branch is still made and active, and the
//! output says what was skipped and how to approve it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use common::{git, up, Fs, TestEnv};

/// A committed `.pgtwig.toml` whose post_create writes `version` into
/// `../markers/<branch>` (outside the repository) and records it in a table
/// of the new branch, so a run is visible on disk and in the database.
fn config(version: &str) -> String {
    format!(
        "project = \"shop\"\n[[map]]\ngit = \"*\"\nbranch = \"{{branch}}\"\n\
         post_create = [\"echo {version} > ../markers/$PGTWIG_BRANCH\", \
         \"psql \\\"$DATABASE_URL\\\" -qc 'create table made_by_post_create()'\"]\n"
    )
}

fn commit_config(env: &TestEnv, version: &str) {
    std::fs::write(env.repo.join(".pgtwig.toml"), config(version)).unwrap();
    git(env, &["add", ".pgtwig.toml"]);
    git(env, &["commit", "-qm", &format!("pgtwig config {version}")]);
}

fn reflink_env() -> Option<TestEnv> {
    let env = TestEnv::new(Fs::Reflink);
    if env.is_none() && std::env::var("CI").as_deref() == Ok("true") {
        panic!(
            "CI=true: the trust tests need PGTWIG_TEST_REFLINK_DIR on a copy-on-write file system"
        );
    }
    env
}

fn markers(env: &TestEnv) -> PathBuf {
    env.repo.parent().unwrap().join("markers")
}

/// What post_create wrote for `branch`, if it ran.
fn marker(env: &TestEnv, branch: &str) -> Option<String> {
    std::fs::read_to_string(markers(env).join(branch))
        .ok()
        .map(|s| s.trim().to_string())
}

fn made_by_post_create(env: &TestEnv, branch: &str) -> bool {
    // A skipped list leaves the new branch stopped.
    env.ok(&["branch", "start", branch]);
    env.psql(
        branch,
        "select count(*) from pg_class where relname = 'made_by_post_create'",
    ) == "1"
}

fn active(env: &TestEnv) -> String {
    let state: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(env.project_dir().join("state.json")).unwrap(),
    )
    .unwrap();
    state["active"].as_str().unwrap().to_string()
}

/// The output of a checkout whose list was skipped names the commands and
/// the command that approves them, for the work tree it ran in.
fn assert_skipped(out: &str, version: &str, branch: &str, work_tree: &Path) {
    assert!(
        out.contains(&format!("did not run post_create for \"{branch}\""))
            && out.contains("from .pgtwig.toml are not approved")
            && out.contains(&format!("echo {version} > ../markers/$PGTWIG_BRANCH"))
            && out.contains(&format!("`pgtwig trust` in {}", work_tree.display())),
        "{out}"
    );
}

#[test]
fn post_create_runs_only_once_approved() {
    let Some(env) = reflink_env() else { return };
    std::fs::create_dir(markers(&env)).unwrap();
    commit_config(&env, "v1");

    // init adopts a committed config: it does not approve its commands, and says how.
    let out = env.init();
    assert!(
        out.contains("Not approved yet in this repository")
            && out.contains("echo v1 > ../markers/$PGTWIG_BRANCH")
            && out.contains(&format!("run `pgtwig trust` in {}", env.repo.display())),
        "{out}"
    );

    // Not approved: the branch is made and active, the commands do not run,
    // the output says what was skipped; the checkout succeeds (git() asserts it).
    let out = git(&env, &["checkout", "-b", "feature/a"]);
    assert!(
        out.contains("created database branch \"feature-a\""),
        "{out}"
    );
    assert_skipped(&out, "v1", "feature-a", &env.repo);
    assert_eq!(active(&env), "feature-a");
    assert_eq!(marker(&env, "feature-a"), None);
    assert!(!made_by_post_create(&env, "feature-a"));

    // `pgtwig trust` shows what it approves and where it comes from.
    let out = env.ok(&["trust"]);
    assert!(
        out.contains(
            ".pgtwig.toml, [[map]] rule 1 (git = \"*\", branch = \"{branch}\"), post_create:"
        ) && out.contains("echo v1 > ../markers/$PGTWIG_BRANCH")
            && out.contains("create table made_by_post_create()")
            && out.contains("Approved 1 command list(s)"),
        "{out}"
    );
    let trust_file = env.project_dir().join("trust.json");
    let mode = std::fs::metadata(&trust_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{}", trust_file.display());
    assert!(
        env.ok(&["trust"]).contains("(already approved)"),
        "approving twice is harmless"
    );

    // Approved: a new branch's checkout runs it.
    let out = git(&env, &["checkout", "-b", "feature/b"]);
    assert!(!out.contains("did not run"), "{out}");
    assert_eq!(marker(&env, "feature-b").as_deref(), Some("v1"));
    assert!(made_by_post_create(&env, "feature-b"));

    // A commit changes the list: not run until approved again.
    commit_config(&env, "v2");
    let out = git(&env, &["checkout", "-b", "feature/c"]);
    assert_skipped(&out, "v2", "feature-c", &env.repo);
    assert_eq!(marker(&env, "feature-c"), None);
    assert_eq!(active(&env), "feature-c");
    let out = env.ok(&["trust", "--list"]);
    assert!(
        out.contains("echo v1") && out.contains("Not approved yet") && out.contains("echo v2"),
        "{out}"
    );
    env.ok(&["trust"]);
    git(&env, &["checkout", "-b", "feature/d"]);
    assert_eq!(marker(&env, "feature-d").as_deref(), Some("v2"));

    // Back on main (the v1 list): still approved, nothing asked again.
    git(&env, &["checkout", "main"]);
    let out = git(&env, &["checkout", "-b", "feature/e"]);
    assert!(!out.contains("did not run"), "{out}");
    assert_eq!(marker(&env, "feature-e").as_deref(), Some("v1"));

    // A reset copies the parent afresh, without what post_create added; --post-create runs the
    // rule's (approved) commands again.
    env.ok(&["branch", "reset", "feature-e", "--force"]);
    assert!(!made_by_post_create(&env, "feature-e"));
    std::fs::remove_file(markers(&env).join("feature-e")).unwrap();
    let out = env.ok(&["branch", "reset", "feature-e", "--force", "--post-create"]);
    assert!(out.contains("post_create (database \"postgres\")"), "{out}");
    assert_eq!(marker(&env, "feature-e").as_deref(), Some("v1"));
    assert!(made_by_post_create(&env, "feature-e"));
    let err = env.fails(&["branch", "reset", "main", "--post-create"]);
    assert!(err.contains("root branch"), "{err}");

    // A second work tree of the same clone shares the approvals (they are
    // keyed by the git common dir), and says so from there too.
    let side = env.repo.parent().unwrap().join("side");
    let out = git(
        &env,
        &[
            "worktree",
            "add",
            "-b",
            "side",
            side.to_str().unwrap(),
            "main",
        ],
    );
    assert!(!out.contains("did not run"), "{out}");
    assert_eq!(marker(&env, "side").as_deref(), Some("v1"));
    let listed = env
        .cmd(&["trust", "--list"])
        .current_dir(&side)
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert!(
        listed.contains("echo v1")
            && listed.contains("echo v2")
            && !listed.contains("Not approved"),
        "{listed}"
    );

    // Revoked: skipped again, in every work tree.
    let out = env.ok(&["trust", "--revoke"]);
    assert!(out.contains("Forgot 2 approved command list(s)"), "{out}");
    let out = git(&env, &["checkout", "-b", "feature/f", "main"]);
    assert_skipped(&out, "v1", "feature-f", &env.repo);
    assert_eq!(marker(&env, "feature-f"), None);
    assert!(env
        .ok(&["trust", "--list"])
        .contains("No commands are approved"));
}

/// A checkout that skips hooks is followed by the daemon, which runs the
/// same check: the skipped list is a warning in its log, not silence.
#[test]
fn the_daemon_following_head_skips_unapproved_commands_loudly() {
    let Some(env) = reflink_env() else { return };
    std::fs::create_dir(markers(&env)).unwrap();
    commit_config(&env, "v1");
    env.init();
    let d = up(&env);
    git(
        &env,
        &[
            "-c",
            "core.hooksPath=/dev/null",
            "checkout",
            "-b",
            "feature/h",
        ],
    );
    // The daemon arms its HEAD watcher just after it starts listening, so
    // the first write may come too early: write HEAD again (the same
    // branch) until it is followed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    'followed: loop {
        let retry = std::time::Instant::now() + std::time::Duration::from_secs(4);
        while std::time::Instant::now() < retry {
            if active(&env) == "feature-h" {
                break 'followed;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the daemon did not follow a hook-less checkout"
        );
        git(&env, &["symbolic-ref", "HEAD", "refs/heads/feature/h"]);
    }
    let log = std::env::temp_dir().join(format!("pgtwig-test-daemon-{}.log", d.port));
    common::wait_for(10, "the daemon to log the skipped commands", || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("`pgtwig trust` in"))
    });
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("WARN")
            && text.contains("did not run post_create for \"feature-h\"")
            && text.contains("echo v1 > ../markers/$PGTWIG_BRANCH"),
        "{text}"
    );
    assert_eq!(marker(&env, "feature-h"), None);
    assert!(!made_by_post_create(&env, "feature-h"));
}

/// The Neon API key goes with every API request: `[neon] api_url` must be
/// https, or http to this machine only.
#[test]
fn neon_api_url_must_not_send_the_key_in_clear() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let write = |url: &str| {
        std::fs::write(
            env.repo.join(".pgtwig.toml"),
            format!(
                "project = \"shop\"\nbackend = \"neon\"\n[neon]\nproject_id = \"p\"\napi_url = \"{url}\"\n"
            ),
        )
        .unwrap();
    };
    // `init` refuses such a URL before writing anything.
    let e = env.fails(&[
        "init",
        "--neon-project",
        "p",
        "--neon-api-url",
        "http://10.1.2.3/api/v2",
    ]);
    assert!(
        e.contains("--neon-api-url") && e.contains("unencrypted to 10.1.2.3"),
        "{e}"
    );
    assert!(!env.repo.join(".pgtwig.toml").exists());
    write("http://api.neon.example/api/v2");
    let e = env.fails(&["branch", "list"]);
    assert!(
        e.contains(".pgtwig.toml")
            && e.contains("line 5")
            && e.contains("api_url")
            && e.contains("unencrypted to api.neon.example")
            && e.contains("use https://"),
        "{e}"
    );
    // Accepted: https anywhere, http on loopback (any command that reads
    // the configuration; `trust --list` does not go on to the API).
    for url in [
        "https://neon.example/api/v2",
        "http://127.0.0.1:9/api/v2",
        "http://127.5.0.1:9/api/v2",
        "http://[::1]:9/api/v2",
        "http://localhost:9/api/v2",
    ] {
        write(url);
        env.ok(&["trust", "--list"]);
    }
}
