//! The Neon backend end to end: real git checkouts, the real `pgtwig`
//! binary and daemon, real PostgreSQL computes, against the stand-in for
//! Neon's cloud (its HTTP API written from Neon's API reference, and an
//! SNI-routing proxy in front of one real PostgreSQL per endpoint, with
//! TLS from a test CA). The same workflow as the local backend's
//! git_workflows test, plus what only Neon has: cold starts, expiry.

mod common;

use std::path::Path;

use common::{git, up, Daemon, Fs, TestEnv};
use pgtwig_neon_standin::StandIn;

struct NeonEnv {
    env: TestEnv,
    cloud: StandIn,
}

impl NeonEnv {
    /// The cloud, a repository with one commit and a Neon config.
    fn new(extra_config: &str) -> NeonEnv {
        let env = TestEnv::new(Fs::Plain).unwrap();
        let cloud = StandIn::with_computes(&env.repo.parent().unwrap().join("neon"));
        // Every pgtwig this test starts, git hooks included, finds the key here.
        std::env::set_var("NEON_API_KEY", cloud.api_key());
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
        std::fs::write(
            env.repo.join(".pgtwig.toml"),
            format!(
                "project = \"shop\"\nbackend = \"neon\"\nroot_branch = \"main\"\n\
                 [neon]\nproject_id = \"{}\"\napi_url = \"{}\"\nconnect = \"{}\"\nca_file = \"{}\"\n{extra_config}",
                cloud.project_id(),
                cloud.api_base(),
                cloud.proxy_addr(),
                cloud.ca_pem_path().display(),
            ),
        )
        .unwrap();
        // The stand-in's api_url is not Neon's: it gets the key (and the
        // config's post_create runs) once approved, as a user would.
        let out = env.ok(&["trust"]);
        assert!(out.contains(&cloud.api_base()), "{out}");
        NeonEnv { env, cloud }
    }

    /// psql straight to a branch's compute (not through pgtwig).
    fn direct(&self, branch: &str, sql: &str) -> String {
        common::psql(&self.cloud.direct_url(branch, "neondb"), sql)
    }

    /// The app's one fixed DATABASE_URL, through the proxy (plaintext on
    /// loopback; SCRAM passes through to the compute).
    fn app_url(&self, d: &Daemon, database: &str) -> String {
        let (role, password) = self.cloud.role();
        format!(
            "postgres://{role}:{password}@127.0.0.1:{}/{database}",
            d.port
        )
    }

    fn which(&self, d: &Daemon) -> String {
        common::psql(
            &self.app_url(d, "neondb"),
            "select coalesce((select branch from marker), 'none')",
        )
    }

    fn names(&self) -> Vec<String> {
        self.env
            .list_json()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect()
    }
}

#[test]
fn git_checkouts_follow_neon_branches_through_the_proxy() {
    let n = NeonEnv::new(
        "[[map]]\ngit = \"*\"\nbranch = \"{branch}\"\n\
         post_create = [\"psql \\\"$DATABASE_URL\\\" -qc 'create table made_by_post_create()'\"]\n",
    );
    let env = &n.env;
    let out = env.init();
    assert!(
        out.contains("Neon project proj-1: root branch \"main\"")
            && out.contains("Installed the git hook"),
        "{out}"
    );
    n.direct(
        "main",
        "create table marker(branch text); insert into marker values ('main')",
    );
    let d = up(env);
    assert_eq!(n.which(&d), "main");

    // A new git branch: a Neon branch made from main, post_create run
    // against it (a URL with the password, reaching the compute), and the
    // proxy routes to it once `git checkout` returns.
    let out = git(env, &["checkout", "-b", "feature/login"]);
    assert!(
        out.contains(
            "created database branch \"feature-login\" from \"main\" for git branch \"feature/login\" (Neon branch"
        ),
        "{out}"
    );
    assert!(n
        .cloud
        .branch_names()
        .contains(&"feature-login".to_string()));
    assert_eq!(
        n.direct(
            "feature-login",
            "select count(*) from pg_class where relname = 'made_by_post_create'"
        ),
        "1"
    );
    assert_eq!(n.which(&d), "main", "the branch starts as a copy of main");
    common::psql(
        &n.app_url(&d, "neondb"),
        "update marker set branch = 'feature'",
    );
    assert_eq!(n.which(&d), "feature");
    assert_eq!(n.direct("main", "select branch from marker"), "main");
    let listed = env.branch_json("feature-login");
    assert_eq!(listed["git_branch"], "feature/login");
    assert_eq!(listed["parent"], "main");

    git(env, &["checkout", "main"]);
    assert_eq!(n.which(&d), "main");
    git(env, &["checkout", "feature/login"]);
    assert_eq!(n.which(&d), "feature");

    // Neon suspended the compute: the next connection waits for the cold
    // start instead of failing.
    n.cloud.suspend("feature-login");
    let starts = n.cloud.compute_starts("feature-login");
    assert_eq!(n.which(&d), "feature");
    assert!(n.cloud.compute_starts("feature-login") > starts);

    // A pinned connection ignores the active branch; a missing branch is 3D000.
    assert_eq!(
        common::psql(&n.app_url(&d, "neondb@main"), "select branch from marker"),
        "main"
    );
    let out = std::process::Command::new("psql")
        .args([&n.app_url(&d, "neondb@nope"), "-X", "-At", "-c", "select 1"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("\"nope\" does not exist"),
        "{err}"
    );

    // A branch whose compute was deleted in Neon's console: 57P03 saying so.
    env.ok(&["branch", "create", "nocompute"]);
    n.cloud.remove_compute("nocompute");
    let err = postgres::Client::connect(&n.app_url(&d, "neondb@nocompute"), postgres::NoTls)
        .err()
        .expect("no compute to route to");
    let db = err
        .as_db_error()
        .expect("an ErrorResponse, not a dropped socket");
    assert_eq!(db.code().code(), "57P03", "{db}");
    assert!(
        db.message().contains("\"nocompute\" could not be started")
            && db
                .detail()
                .is_some_and(|d| d.contains("no read-write compute")),
        "{db:?}"
    );
    env.ok(&["branch", "delete", "nocompute"]);

    // status on Neon: the backend, the active branch, the open session.
    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["backend"], "neon");
    assert_eq!(status["active"], "feature-login");
    assert!(status["running"]
        .as_array()
        .unwrap()
        .iter()
        .any(|b| b == "feature-login"));

    // diff compares the schemas over verified TLS; exit 1 when they differ.
    common::psql(
        &n.app_url(&d, "neondb"),
        "create table invoices(id int primary key)",
    );
    let out = env.ok_code(&["diff", "main", "feature-login"], 1);
    assert!(out.contains("invoices"), "{out}");

    // Reset of the active branch needs --force (its data is replaced under the app).
    let err = env.fails(&["branch", "reset", "feature-login"]);
    assert!(
        err.contains("is the active branch of the main work tree")
            && err.contains("fresh copy of \"main\""),
        "{err}"
    );
    // With it and the daemon running: sessions drained, the branch back to main's data.
    let out = env.ok(&[
        "branch",
        "reset",
        "feature-login",
        "--force",
        "--keep-old",
        "feature-old",
    ]);
    assert!(out.contains("Reset Neon branch \"feature-login\""), "{out}");
    assert_eq!(n.which(&d), "main");
    assert!(n.names().contains(&"feature-old".to_string()));
    env.ok(&["branch", "delete", "feature-old"]);

    // gc: the git branch is gone, so its database branch goes (not the active one).
    git(env, &["checkout", "-q", "main"]);
    git(env, &["branch", "-q", "-D", "feature/login"]);
    let out = env.ok(&["gc"]);
    assert!(out.contains("deleted feature-login"), "{out}");
    assert_eq!(n.names(), vec!["main"]);
    assert!(!n
        .cloud
        .branch_names()
        .contains(&"feature-login".to_string()));
    // The root is never deleted.
    let err = env.fails(&["branch", "delete", "main"]);
    assert!(err.contains("root branch"), "{err}");
}

#[test]
fn pull_request_branches_on_neon() {
    let n = NeonEnv::new("");
    let env = &n.env;
    env.init();
    n.direct(
        "main",
        "create table marker(branch text); insert into marker values ('main')",
    );
    // A staging branch is the parent of PR branches when there is one.
    env.ok(&["branch", "create", "staging"]);
    n.direct("staging", "update marker set branch = 'staging'");

    let gh = env.repo.parent().unwrap().join("github_output");
    let out = env
        .cmd(&["pr", "open", "42", "--ttl", "7d"])
        .env("GITHUB_OUTPUT", &gh)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(
        url.contains(n.cloud.role().1),
        "a usable URL carries the password"
    );
    assert_eq!(common::psql(&url, "select branch from marker"), "staging");
    assert!(std::fs::read_to_string(&gh)
        .unwrap()
        .contains(&format!("database_url={url}")));
    // TTL → Neon's branch expiry.
    let pr = env.branch_json("pr-42");
    assert!(
        pr["expires"].as_str().is_some_and(|e| e.starts_with("20")),
        "{pr}"
    );
    assert_eq!(pr["parent"], "staging");
    // Idempotent, then closed.
    assert_eq!(env.ok(&["pr", "open", "42"]).trim(), url);
    // `branch url` names the same database ([neon] database) as `pr open`.
    assert_eq!(env.ok(&["branch", "url", "pr-42"]).trim(), url);
    assert!(url.contains("/neondb"), "{url}");
    env.ok(&["pr", "close", "42"]);
    assert!(env.ok(&["pr", "close", "42"]).contains("already closed"));
    assert!(!n.cloud.branch_names().contains(&"pr-42".to_string()));
}

#[test]
fn neon_errors_say_what_to_do_and_never_show_the_key() {
    let n = NeonEnv::new("");
    let env = &n.env;
    // No key anywhere.
    let out = env
        .cmd(&["branch", "list"])
        .env_remove("NEON_API_KEY")
        .env("XDG_CONFIG_HOME", env.repo.parent().unwrap())
        .env("HOME", env.repo.parent().unwrap())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("NEON_API_KEY"),
        "{err}"
    );
    // A wrong key: 401, named, and the key itself never printed.
    let out = env
        .cmd(&["branch", "list", "--json"])
        .env("NEON_API_KEY", "secret-wrong-key-123")
        .output()
        .unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success() && all.contains("401"), "{all}");
    assert!(!all.contains("secret-wrong-key-123"), "{all}");
    // A branch that does not exist, and commands that are the local backend's.
    env.init();
    let err = env.fails(&["use", "nope"]);
    assert!(err.contains("\"nope\" does not exist"), "{err}");
    // A typo of an existing one: the nearest name.
    let err = env.fails(&["use", "mian"]);
    assert!(err.contains("did you mean \"main\""), "{err}");
    let err = env.fails(&["branch", "stop", "main"]);
    assert!(err.contains("Neon suspends"), "{err}");
    let err = env.fails(&["import", "--from", "postgres://x@127.0.0.1:1/x"]);
    assert!(err.contains("local backend only"), "{err}");
    // The API busy for a moment: retried, not failed.
    n.cloud.throttle(2);
    assert!(env.ok(&["branch", "list"]).contains("main (root)"));

    // backend = "neon" without a [neon] section.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\nbackend = \"neon\"\n",
    )
    .unwrap();
    let err = env.fails(&["branch", "list"]);
    assert!(
        err.contains("[neon]") && err.contains("project_id"),
        "{err}"
    );
}

/// A committed api_url that is not Neon's own could send the API key to any
/// host: no request goes there until `pgtwig trust` approved it.
#[test]
fn a_committed_api_url_gets_no_key_until_approved() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let cloud = StandIn::api_only();
    std::env::set_var("NEON_API_KEY", cloud.api_key());
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!(
            "project = \"shop\"\nbackend = \"neon\"\n[neon]\nproject_id = \"{}\"\napi_url = \"{}\"\n",
            cloud.project_id(),
            cloud.api_base()
        ),
    )
    .unwrap();
    let out = env.ok(&["trust", "--list"]);
    assert!(
        out.contains("Not approved yet") && out.contains(&cloud.api_base()),
        "{out}"
    );
    for args in [&["init"][..], &["branch", "list"]] {
        let err = env.fails(args);
        assert!(
            err.contains(&format!(
                "api_url in .pgtwig.toml is \"{}\"",
                cloud.api_base()
            )) && err.contains("not Neon's own API")
                && err.contains(&format!("`pgtwig trust` in {}", env.repo.display())),
            "{args:?}: {err}"
        );
    }
    assert_eq!(cloud.requests().len(), 0, "the key went nowhere");
    let out = env.ok(&["trust"]);
    assert!(
        out.contains(".pgtwig.toml, [neon] (pgtwig sends your Neon API key there), api_url:")
            && out.contains(&cloud.api_base()),
        "{out}"
    );
    env.init();
    assert!(env.ok(&["branch", "list"]).contains("main (root)"));
    assert!(!cloud.requests().is_empty());
}

#[test]
fn init_with_a_neon_project_writes_a_config_that_works() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let cloud = StandIn::api_only();
    std::env::set_var("NEON_API_KEY", cloud.api_key());
    let api = cloud.api_base();

    // A project id Neon does not know: the error names it, and no config is left behind.
    let err = env.fails(&[
        "init",
        "--neon-project",
        "no-such-project",
        "--neon-api-url",
        &api,
    ]);
    assert!(err.contains("no-such-project"), "{err}");
    assert!(!env.repo.join(".pgtwig.toml").exists());

    let out = env.ok(&[
        "init",
        "--neon-project",
        cloud.project_id(),
        "--neon-api-url",
        &api,
    ]);
    assert!(
        out.contains("Neon project proj-1: root branch \"main\""),
        "the root is the project's default branch: {out}"
    );
    let config = std::fs::read_to_string(env.repo.join(".pgtwig.toml")).unwrap();
    assert!(config.contains("backend = \"neon\""), "{config}");
    assert!(config.contains("root_branch = \"main\""), "{config}");
    // The API it was made with is the one later commands use.
    assert!(config.contains(&format!("api_url = \"{api}\"")), "{config}");
    let before = cloud.requests().len();
    assert!(env.ok(&["branch", "list"]).contains("main (root)"));
    assert!(
        cloud.requests().len() > before,
        "branch list asked the stand-in"
    );
}

#[test]
fn the_top_level_database_is_the_apps_on_neon_too() {
    let n = NeonEnv::new("");
    let env = &n.env;
    n.direct("main", "create database app");
    let path = env.repo.join(".pgtwig.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(
        &path,
        text.replace(
            "root_branch = \"main\"\n",
            "root_branch = \"main\"\ndatabase = \"app\"\n",
        ),
    )
    .unwrap();
    env.ok(&["branch", "create", "feat"]);
    let out = env.run(&["branch", "url", "feat"]);
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(url.contains("/app"), "{url}");
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("database \"app\" (the app's, from .pgtwig.toml)"),
        "{out:?}"
    );
    assert_eq!(common::psql(&url, "select current_database()"), "app");
    // `diff` compares it: a table made there shows, one in neondb does not.
    let feat_url = url.clone();
    common::psql(&feat_url, "create table only_in_app(id int)");
    let out = env.ok_code(&["diff", "main", "feat"], 1);
    assert!(out.contains("+ table public.only_in_app"), "{out}");
    // Both spellings may be set only to the same name.
    std::fs::write(
        &path,
        std::fs::read_to_string(&path)
            .unwrap()
            .replace("[neon]\n", "[neon]\ndatabase = \"neondb\"\n"),
    )
    .unwrap();
    let err = env.fails(&["branch", "url", "feat"]);
    assert!(err.contains("keep one"), "{err}");
}
