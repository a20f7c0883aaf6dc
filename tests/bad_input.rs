//! Bad input gets a clear error, a non-zero exit, and loses nothing.

mod common;

use common::{Fs, TestEnv};

#[test]
fn unknown_duplicate_root_and_invalid_names() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "create", "dev"]);
    for args in [
        vec!["branch", "start", "nosuch"],
        vec!["branch", "stop", "nosuch"],
        vec!["branch", "delete", "nosuch"],
        vec!["branch", "reset", "nosuch"],
        vec!["branch", "url", "nosuch"],
        vec!["branch", "create", "x", "--from", "nosuch"],
    ] {
        let err = env.fails(&args);
        assert!(
            err.contains("branch \"nosuch\" does not exist") && err.contains("dev, main"),
            "{args:?}: {err}"
        );
    }
    let err = env.fails(&["branch", "create", "dev"]);
    assert!(err.contains("\"dev\" already exists"), "{err}");
    let err = env.fails(&["branch", "delete", "main"]);
    assert!(
        err.contains("root branch") && err.contains("cannot be deleted"),
        "{err}"
    );
    let err = env.fails(&["branch", "create", "feature/login"]);
    assert!(err.contains("did you mean \"feature-login\""), "{err}");
    let err = env.fails(&["branch", "reset", "dev", "--keep-old", "main"]);
    assert!(err.contains("\"main\" already exists"), "{err}");
    // Nothing was lost along the way.
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["dev", "main"]);
    assert!(env
        .project_dir()
        .join("branches/main/data/PG_VERSION")
        .exists());
}

#[test]
fn missing_or_corrupt_metadata_is_reported_and_data_kept() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "create", "broken"]);
    env.ok(&["branch", "create", "gone"]);
    let dir = env.project_dir().join("branches");
    std::fs::write(dir.join("broken/branch.json"), "{ not json").unwrap();
    std::fs::remove_file(dir.join("gone/branch.json")).unwrap();

    let out = env.run(&["branch", "list"]);
    assert!(!out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("main (root)") && stdout.contains("broken") && stdout.contains("gone"),
        "{stdout}"
    );
    assert!(
        stderr.contains("broken/branch.json") && stderr.contains("missing or corrupt"),
        "{stderr}"
    );
    assert!(stderr.contains("gone/branch.json"), "{stderr}");
    let err = env.fails(&["branch", "start", "broken"]);
    assert!(
        err.contains("metadata of branch \"broken\"") && err.contains("Its data was not touched"),
        "{err}"
    );
    let err = env.fails(&["branch", "create", "x", "--from", "gone"]);
    assert!(err.contains("metadata of branch \"gone\""), "{err}");
    assert!(
        dir.join("broken/data/PG_VERSION").exists() && dir.join("gone/data/PG_VERSION").exists()
    );
    // The way out the message names works.
    env.ok(&["branch", "delete", "broken"]);
    assert!(!dir.join("broken").exists());
}

#[test]
fn no_project_bad_config_and_no_state() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    // Outside any project.
    let err = env.fails(&["branch", "list"]);
    assert!(
        err.contains("no .pgtwig.toml") && err.contains("pgtwig init"),
        "{err}"
    );
    // init outside a git repository.
    let elsewhere = tempfile::tempdir().unwrap();
    let out = env
        .cmd(&["init"])
        .current_dir(elsewhere.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not inside a git repository"));
    // A config with a typo.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\nbakend = \"local\"\n",
    )
    .unwrap();
    let err = env.fails(&["branch", "list"]);
    assert!(err.contains("bakend") && err.contains("line 2"), "{err}");
    let err = env.fails(&["init"]);
    assert!(
        err.contains("bakend"),
        "init does not overwrite a broken config: {err}"
    );
    // A good config but no state yet.
    std::fs::write(env.repo.join(".pgtwig.toml"), "project = \"shop\"\n").unwrap();
    let err = env.fails(&["branch", "list"]);
    assert!(
        err.contains("no state for this project") && err.contains("run `pgtwig init`"),
        "{err}"
    );
    env.init();
    assert_eq!(env.list_json().len(), 1);
}
