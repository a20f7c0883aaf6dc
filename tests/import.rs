//! `pgtwig import`: seeding and refreshing a branch from a real database.

mod common;

use std::io::{BufRead, BufReader};
use std::process::Stdio;

use common::{Fs, TestEnv};

/// A "production" database: another cluster with an `app` database.
fn production() -> (TestEnv, String) {
    let prod = TestEnv::new(Fs::Plain).unwrap();
    prod.init();
    prod.ok(&["branch", "start", "main"]);
    prod.psql("main", "create database app");
    let url = prod
        .ok(&["branch", "url", "main", "--database", "app"])
        .trim()
        .to_string();
    common::psql(
        &url,
        "create table users(id int primary key, email text unique); \
         insert into users select g, 'u' || g || '@x' from generate_series(1, 1000) g; \
         create table logs(id bigserial primary key, line text); \
         insert into logs(line) select 'log ' || g from generate_series(1, 1000) g; \
         create view user_count as select count(*) from users",
    );
    (prod, url)
}

#[test]
fn import_seeds_refreshes_and_leaves_the_branch_alone_on_failure() {
    let (_prod, src) = production();
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let out = env.ok(&[
        "import",
        "--from",
        &src,
        "--exclude-table-data",
        "public.logs",
    ]);
    // No `database` in the config: the app's is `postgres`, whatever the source calls its own.
    assert!(
        out.contains(
            "Restored database \"app\" of the source into database \"postgres\" of branch \"main\""
        ),
        "{out}"
    );
    env.ok(&["branch", "start", "main"]);
    let app = env.url("main");
    assert_eq!(
        common::psql(
            &app,
            "select (select count(*) from users) || ' ' || (select count(*) from logs)"
        ),
        "1000 0"
    );
    assert_eq!(common::psql(&app, "select * from user_count"), "1000");
    // The source was only read.
    assert_eq!(common::psql(&src, "select count(*) from logs"), "1000");

    // Refresh while the branch runs: it is replaced, and running again.
    common::psql(&src, "insert into users values (1001, 'new@x')");
    env.ok(&["import", "--from", &src, "--replace"]);
    assert_eq!(env.branch_json("main")["running"], true);
    assert_eq!(
        common::psql(
            &app,
            "select (select count(*) from users) || ' ' || (select count(*) from logs)"
        ),
        "1001 1000"
    );

    // Schema only, into another branch.
    env.ok(&["import", "--from", &src, "--into", "empty", "--schema-only"]);
    env.ok(&["branch", "start", "empty"]);
    let empty = env.url("empty");
    assert_eq!(common::psql(&empty, "select count(*) from users"), "0");

    // Failures: clear errors, the branch untouched, nothing left behind.
    let err = env.fails(&["import", "--from", "postgres://postgres@127.0.0.1:1/app"]);
    assert!(err.contains("source database: cannot reach it"), "{err}");
    let bad_db = src.replace("/app?", "/nosuch?");
    let err = env.fails(&["import", "--from", &bad_db]);
    assert!(
        err.contains("the database in --from does not exist"),
        "{err}"
    );
    let err = env.fails(&["import", "--from", "not a url"]);
    assert!(err.contains("not a PostgreSQL connection string"), "{err}");

    // Killed just before the new cluster replaces the branch.
    let mut child = env
        .cmd(&["import", "--from", &src, "--replace"])
        .env("PGTWIG_FAILPOINT", "import.before_publish")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        if line
            .unwrap()
            .contains("failpoint import.before_publish reached")
        {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(
        common::psql(&app, "select count(*) from users"),
        "1001",
        "the branch kept serving its data"
    );
    env.ok(&["branch", "list"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
}

#[test]
fn wrong_password_and_unreadable_tables_are_clear_errors() {
    let (prod, src) = production();
    // A role that must give a password, and one that may not read `logs`.
    prod.psql(
        "main",
        "create role pwuser login password 'right'; create role limited login;",
    );
    common::psql(
        &src,
        "grant select on users to limited; grant usage on schema public to limited",
    );
    let hba = prod.project_dir().join("branches/main/data/pg_hba.conf");
    let text = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(&hba, format!("local all pwuser scram-sha-256\n{text}")).unwrap();
    prod.psql("main", "select pg_reload_conf()");

    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let wrong = src.replace("postgresql://postgres@", "postgresql://pwuser:wrong@");
    let err = env.fails(&["import", "--from", &wrong]);
    assert!(
        err.contains("authentication failed: check the user and password"),
        "{err}"
    );
    let limited = src.replace("postgresql://postgres@", "postgresql://limited@");
    let err = env.fails(&["import", "--from", &limited]);
    assert!(
        err.contains("dumping the source failed; nothing was changed")
            && err.contains("permission denied"),
        "{err}"
    );
    // Nothing half-made: the root is still the empty cluster init made.
    assert_eq!(env.list_json().len(), 1);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
}

#[test]
fn import_into_a_branch_with_data_keeps_its_previous_state_as_a_branch() {
    let (_prod, src) = production();
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let names = |env: &TestEnv| -> Vec<String> {
        env.list_json()
            .iter()
            .map(|b| b["name"].as_str().unwrap().to_string())
            .collect()
    };
    // Into the empty root: nothing to keep, nothing said about it.
    let out = env.ok(&["import", "--from", &src]);
    assert!(!out.contains("previous"), "{out}");
    assert_eq!(names(&env), vec!["main"]);

    // Again, now that main has data: its previous state becomes main-before-import.
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "insert into users values (5000, 'only-in-main@x')");
    common::psql(&src, "insert into users values (1001, 'new@x')");
    let out = env.ok(&["import", "--from", &src]);
    assert!(
        out.contains("Its previous state is kept as branch \"main-before-import\""),
        "{out}"
    );
    assert_eq!(names(&env), vec!["main", "main-before-import"]);
    assert_eq!(env.branch_json("main")["running"], true, "main runs again");
    assert_eq!(
        env.psql(
            "main",
            "select count(*) || ' ' || count(*) filter (where id = 5000) from users"
        ),
        "1001 0"
    );
    env.ok(&["branch", "start", "main-before-import"]);
    assert_eq!(
        env.psql(
            "main-before-import",
            "select count(*) || ' ' || count(*) filter (where id = 5000) from users"
        ),
        "1001 1",
        "the kept branch has main's data as it was, its own row too"
    );

    // The default name is taken: refused before anything runs, with what to do.
    let err = env.fails(&["import", "--from", &src]);
    assert!(
        err.contains("branch \"main-before-import\" already exists")
            && err.contains("--keep-old NAME")
            && err.contains("--replace"),
        "{err}"
    );
    assert_eq!(names(&env), vec!["main", "main-before-import"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());

    // Another name, then dropping it.
    let out = env.ok(&["import", "--from", &src, "--keep-old", "snap"]);
    assert!(out.contains("kept as branch \"snap\""), "{out}");
    let out = env.ok(&["import", "--from", &src, "--replace"]);
    assert!(
        out.contains("previous data in \"postgres\" was dropped"),
        "{out}"
    );
    assert_eq!(names(&env), vec!["main", "main-before-import", "snap"]);
    assert_eq!(env.psql("main", "select count(*) from users"), "1001");

    let err = env.fails(&["import", "--from", &src, "--replace", "--keep-old", "x"]);
    assert!(err.contains("cannot be used with"), "{err}");
}
