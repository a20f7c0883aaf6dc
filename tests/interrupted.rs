//! Killing a command at any step leaves no half-made branch visible and the
//! parent intact; the next command cleans up.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{Fs, TestEnv};

/// Run `pgtwig args` until it reaches `failpoint`, then SIGKILL it.
fn kill_at(env: &TestEnv, args: &[&str], failpoint: &str) {
    let mut child = env
        .cmd(args)
        .env("PGTWIG_FAILPOINT", failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(stderr).lines() {
        let line = line.unwrap();
        if line.contains(&format!("failpoint {failpoint} reached")) {
            child.kill().unwrap();
            child.wait().unwrap();
            return;
        }
        seen.push(line);
    }
    panic!(
        "pgtwig {args:?} ended without reaching {failpoint}: {seen:?} {:?}",
        child.wait()
    );
}

fn names(env: &TestEnv) -> Vec<String> {
    env.list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn killed_creates_leave_nothing_and_the_parent_intact() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table t as select g from generate_series(1, 1000) g",
    );

    for point in [
        "create.in_backup",
        "create.before_backup_stop",
        "create.before_publish",
    ] {
        kill_at(&env, &["branch", "create", "half"], point);
        assert_eq!(names(&env), vec!["main"], "after a kill at {point}");
        assert!(
            env.tmp_entries().is_empty(),
            "the next command cleaned tmp/ after {point}: {:?}",
            env.tmp_entries()
        );
        // The parent keeps serving, its data unchanged, and is not left in backup mode:
        // the killed command's backup session is gone.
        assert_eq!(env.psql("main", "select count(*) from t"), "1000");
        common::wait_for(10, "the aborted backup session to end", || {
            env.psql(
                "main",
                "select count(*) from pg_stat_activity where application_name = 'pgtwig clone'",
            ) == "0"
        });
    }
    // A create after all that works, and sees the parent's data.
    env.ok(&["branch", "create", "half"]);
    env.ok(&["branch", "start", "half"]);
    assert_eq!(env.psql("half", "select count(*) from t"), "1000");

    // Stopped parent: killed before publishing.
    env.ok(&["branch", "stop", "main"]);
    kill_at(
        &env,
        &["branch", "create", "half2"],
        "create.before_publish",
    );
    assert_eq!(names(&env), vec!["half", "main"]);
    assert!(env.tmp_entries().is_empty());
    env.ok(&["branch", "start", "main"]);
    assert_eq!(env.psql("main", "select count(*) from t"), "1000");

    // Killed right after publishing: the branch is complete and usable.
    kill_at(&env, &["branch", "create", "whole"], "create.after_publish");
    env.ok(&["branch", "start", "whole"]);
    assert_eq!(env.psql("whole", "select count(*) from t"), "1000");
}

#[test]
fn a_killed_reset_is_undone_or_finished() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table t(v text); insert into t values ('parent')",
    );
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["branch", "start", "dev"]);
    env.psql("dev", "insert into t values ('dev only')");

    // Killed after the old branch was moved aside and before the new one
    // went in: the next command puts the old one back.
    kill_at(&env, &["branch", "reset", "dev"], "reset.old_moved_aside");
    assert_eq!(names(&env), vec!["dev", "main"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    env.ok(&["branch", "start", "dev"]);
    assert_eq!(
        env.psql("dev", "select count(*) from t"),
        "2",
        "dev's own data is back"
    );

    // With --keep-old the old state ends up under the new name.
    kill_at(
        &env,
        &["branch", "reset", "dev", "--keep-old", "dev-old"],
        "reset.old_moved_aside",
    );
    assert_eq!(
        names(&env),
        vec!["dev", "main"],
        "undone: dev is back as it was"
    );
    env.ok(&["branch", "start", "dev"]);
    assert_eq!(env.psql("dev", "select count(*) from t"), "2");
    env.ok(&["branch", "reset", "dev", "--keep-old", "dev-old"]);
    assert_eq!(names(&env), vec!["dev", "dev-old", "main"]);
    assert_eq!(env.psql("dev", "select count(*) from t"), "1");
}
