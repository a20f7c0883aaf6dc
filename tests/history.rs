//! Point-in-time branches: recover a dropped table by branching from before
//! the drop. Needs a copy-on-write file system (history bases are reflink
//! snapshots); `.ci/run` provides one.

mod common;

use std::time::Duration;

use common::{Fs, TestEnv};

#[test]
fn branch_from_a_minute_ago_brings_back_a_dropped_table() {
    let Some(env) = TestEnv::new(Fs::Reflink) else {
        return;
    };
    env.init();
    env.ok(&["branch", "start", "main"]); // takes the first history base, in the background
    let bases = env.project_dir().join("branches/main/bases");
    common::wait_for(30, "a history base after start", || {
        std::fs::read_dir(&bases)
            .map(|d| {
                d.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
            })
            .unwrap_or(false)
    });
    std::thread::sleep(Duration::from_millis(1200));
    env.psql(
        "main",
        "create table precious as select g from generate_series(1, 1000) g",
    );
    env.psql(
        "main",
        "create table other(x int); insert into other values (1)",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let before_drop = env.psql(
        "main",
        "select to_char(now() at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1200));
    env.psql("main", "drop table precious; insert into other values (2)");

    let out = env.ok(&[
        "branch",
        "create",
        "rescue",
        "--from",
        "main",
        "--at",
        &before_drop,
    ]);
    assert!(out.contains("Created branch \"rescue\""), "{out}");
    env.ok(&["branch", "start", "rescue"]);
    assert_eq!(env.psql("rescue", "select count(*) from precious"), "1000");
    assert_eq!(
        env.psql("rescue", "select string_agg(x::text, ',') from other"),
        "1",
        "nothing after the target"
    );
    // The rescued branch is an ordinary writable branch.
    env.psql("rescue", "insert into other values (3)");
    // The parent is untouched.
    assert_eq!(
        env.psql(
            "main",
            "select count(*) from pg_class where relname = 'precious'"
        ),
        "0"
    );

    // Outside the history kept: a clear error, nothing created.
    let err = env.fails(&[
        "branch",
        "create",
        "ancient",
        "--from",
        "main",
        "--at",
        "2001-01-01T00:00:00Z",
    ]);
    assert!(err.contains("the earliest point available is"), "{err}");
    let err = env.fails(&["branch", "create", "x", "--at", "yesterday-ish"]);
    assert!(err.contains("neither a time"), "{err}");
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["main", "rescue"]);
}
