//! End to end: the local engine through the real `pgtwig` binary, with real
//! PostgreSQL servers and psql.

mod common;

use common::{Fs, TestEnv};

#[test]
fn init_creates_config_root_branch_and_state() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let out = env.init();
    assert!(out.contains("Created root branch \"main\""), "{out}");
    assert!(
        out.contains(env.project_dir().to_str().unwrap()),
        "init says where state lives: {out}"
    );
    let config = std::fs::read_to_string(env.repo.join(".pgtwig.toml")).unwrap();
    assert!(
        config.contains("project = \"shop\"") && config.contains("backend = \"local\""),
        "{config}"
    );
    let main = env.branch_json("main");
    assert_eq!(main["root"], true);
    assert_eq!(main["clone_method"], "initdb");
    assert_eq!(main["running"], false);
    assert!(main["size_bytes"].as_u64().unwrap() > 1_000_000);
    // Idempotent: a second init changes nothing.
    let again = env.init();
    assert!(again.contains("already exists"), "{again}");
    assert_eq!(env.list_json().len(), 1);
    // The state file names the root as the active branch.
    let state = std::fs::read_to_string(env.project_dir().join("state.json")).unwrap();
    assert!(state.contains("\"active\": \"main\""), "{state}");
    // Running as root: data belongs to the unprivileged server user.
    if nix::unistd::geteuid().is_root() {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(env.project_dir().join("branches/main/data")).unwrap();
        assert_ne!(meta.uid(), 0, "the data directory must not belong to root");
    }
}

#[test]
fn branches_are_isolated_and_survive_their_parent() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "create table items(id int primary key, what text); insert into items values (1, 'from main')");

    // A branch of a running parent.
    let out = env.ok(&["branch", "create", "dev"]);
    assert!(out.contains("of the running parent"), "{out}");
    assert_eq!(env.branch_json("dev")["parent"], "main");
    env.ok(&["branch", "start", "dev"]);
    assert_eq!(env.psql("dev", "select what from items"), "from main");

    // Writes on each side are invisible on the other.
    env.psql("dev", "insert into items values (2, 'from dev')");
    env.psql("main", "insert into items values (3, 'from main later')");
    assert_eq!(
        env.psql(
            "dev",
            "select string_agg(id::text, ',' order by id) from items"
        ),
        "1,2"
    );
    assert_eq!(
        env.psql(
            "main",
            "select string_agg(id::text, ',' order by id) from items"
        ),
        "1,3"
    );

    // A branch of a branch, from a stopped parent this time.
    let out = env.ok(&["branch", "stop", "dev"]);
    assert!(out.contains("Stopped"), "{out}");
    let out = env.ok(&["branch", "create", "dev-child", "--from", "dev"]);
    assert!(!out.contains("running parent"), "{out}");
    env.ok(&["branch", "start", "dev-child"]);
    assert_eq!(
        env.psql(
            "dev-child",
            "select string_agg(id::text, ',' order by id) from items"
        ),
        "1,2"
    );

    // Deleting the parent leaves the child working.
    env.ok(&["branch", "delete", "dev"]);
    assert!(!env.project_dir().join("branches/dev").exists());
    env.ok(&["branch", "stop", "dev-child"]);
    env.ok(&["branch", "start", "dev-child"]);
    assert_eq!(env.psql("dev-child", "select count(*) from items"), "2");
    let child = env.branch_json("dev-child");
    assert_eq!(child["parent"], "dev");
    assert_eq!(child["parent_exists"], false);
    let listing = env.ok(&["branch", "list"]);
    assert!(listing.contains("dev (deleted)"), "{listing}");
    // …but it cannot be reset any more, and says why.
    let err = env.fails(&["branch", "reset", "dev-child"]);
    assert!(err.contains("parent \"dev\" was deleted"), "{err}");
    assert_eq!(env.psql("dev-child", "select count(*) from items"), "2");
}

#[test]
fn reset_rederives_from_parent_and_can_keep_the_old_state() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table t(v text); insert into t values ('v1')",
    );
    env.ok(&["branch", "create", "shared"]);
    env.ok(&["branch", "start", "shared"]);
    env.psql("shared", "insert into t values ('drift')");
    env.psql("main", "insert into t values ('v2')");

    let out = env.ok(&["branch", "reset", "shared", "--keep-old", "shared-before"]);
    assert!(
        out.contains("Reset branch \"shared\" from \"main\""),
        "{out}"
    );
    // Running before the reset, running after it, with the parent's current data.
    assert_eq!(env.branch_json("shared")["running"], true);
    assert_eq!(
        env.psql("shared", "select string_agg(v, ',' order by v) from t"),
        "v1,v2"
    );
    env.ok(&["branch", "start", "shared-before"]);
    assert_eq!(
        env.psql(
            "shared-before",
            "select string_agg(v, ',' order by v) from t"
        ),
        "drift,v1"
    );

    // Without --keep-old the old state is gone.
    env.psql("shared", "insert into t values ('x')");
    env.ok(&["branch", "reset", "shared"]);
    assert_eq!(env.psql("shared", "select count(*) from t"), "2");
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["main", "shared", "shared-before"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());

    // The root has no parent to reset from.
    let err = env.fails(&["branch", "reset", "main"]);
    assert!(err.contains("no parent") && err.contains("root"), "{err}");
}

#[test]
fn copy_on_write_path_is_taken_on_a_reflink_file_system() {
    let Some(env) = TestEnv::new(Fs::Reflink) else {
        return;
    };
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table big as select g, repeat('x', 500) pad from generate_series(1, 50000) g",
    );
    let out = env.ok(&["branch", "create", "cow"]);
    assert!(out.contains("copy-on-write clone"), "{out}");
    assert!(!out.contains("note:"), "{out}");
    assert_eq!(env.branch_json("cow")["clone_method"], "copy-on-write");
    env.ok(&["branch", "stop", "main"]);
    let out = env.ok(&["branch", "create", "cow2"]);
    assert!(out.contains("copy-on-write clone"), "{out}");
    env.ok(&["branch", "start", "cow2"]);
    assert_eq!(env.psql("cow2", "select count(*) from big"), "50000");
}

#[test]
fn full_copy_fallback_on_a_plain_file_system_says_so() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    if common::reflink_dir().is_some_and(|d| env.home.starts_with(d)) {
        eprintln!("SKIPPED: the temp folder itself can reflink");
        return;
    }
    env.init();
    let out = env.ok(&["branch", "create", "copy"]);
    if out.contains("copy-on-write clone") {
        eprintln!(
            "SKIPPED: the temp folder's file system can reflink, so there is no fallback to see"
        );
        return;
    }
    assert!(out.contains("full copy"), "{out}");
    assert!(
        out.contains("note: the file system") && out.contains("copied in full"),
        "{out}"
    );
    assert_eq!(env.branch_json("copy")["clone_method"], "full-copy");
    env.ok(&["branch", "start", "copy"]);
    assert_eq!(env.psql("copy", "select 1"), "1");
}
