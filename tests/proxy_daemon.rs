//! End to end: `pgtwig up` with real clients through the proxy, switching
//! with `pgtwig use`, waking and suspending branches, errors as
//! ErrorResponses.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, up, Daemon, Fs, TestEnv};

/// A project with branches main and dev, each with a marker row naming it.
fn project() -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[proxy]\nsuspend_timeout = \"1s\"\n",
    )
    .unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "create table marker(branch text)");
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["branch", "start", "dev"]);
    env.psql("main", "insert into marker values ('main')");
    env.psql("dev", "insert into marker values ('dev')");
    env
}

fn url(d: &Daemon, db: &str) -> String {
    format!("postgres://postgres@127.0.0.1:{}/{db}", d.port)
}

fn connect(d: &Daemon, db: &str) -> postgres::Client {
    postgres::Client::connect(&url(d, db), postgres::NoTls).unwrap()
}

fn connect_err(d: &Daemon, db: &str) -> postgres::Error {
    match postgres::Client::connect(&url(d, db), postgres::NoTls) {
        Ok(_) => panic!("connecting to {db} should fail"),
        Err(e) => e,
    }
}

fn marker(c: &mut postgres::Client) -> String {
    c.query_one("select branch from marker", &[])
        .unwrap()
        .get(0)
}

#[test]
fn routes_to_the_active_branch_and_follows_use() {
    let env = project();
    let d = up(&env);
    assert_eq!(
        common::psql(&url(&d, "postgres"), "select branch from marker"),
        "main"
    );
    // TLS termination for sslmode=require clients.
    assert_eq!(
        common::psql(
            &format!("{}?sslmode=require", url(&d, "postgres")),
            "select branch from marker"
        ),
        "main"
    );

    // An idle session on main, watched through its connection future,
    // which is where an ErrorResponse sent to an idle client surfaces.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (idle, idle_conn) = rt
        .block_on(tokio_postgres::connect(
            &url(&d, "postgres"),
            tokio_postgres::NoTls,
        ))
        .unwrap();
    let idle_conn = rt.spawn(idle_conn);
    let row = rt
        .block_on(idle.query_one("select branch from marker", &[]))
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "main");
    let mut pinned = connect(&d, "postgres@main");

    let out = env.ok(&["use", "dev"]);
    assert!(out.contains("\"dev\" (was \"main\")"), "{out}");
    // When `use` returns, new connections already land on dev.
    assert_eq!(
        common::psql(&url(&d, "postgres"), "select branch from marker"),
        "dev"
    );
    // The idle session on main was closed with 57P01, naming both branches.
    let ended =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), idle_conn).await });
    let err = ended
        .expect("the idle session is closed")
        .unwrap()
        .unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err}"));
    assert_eq!(db.code().code(), "57P01", "{db:?}");
    assert!(
        db.message().contains("\"main\"") && db.message().contains("\"dev\""),
        "{db:?}"
    );
    // The pinned session stays on main.
    assert_eq!(marker(&mut pinned), "main");

    let status: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(status["active"], "dev");
    let sessions = status["daemon"]["sessions"].as_array().unwrap();
    assert!(
        sessions
            .iter()
            .any(|s| s["branch"] == "main" && s["pinned"] == true),
        "{status}"
    );

    // Errors are ErrorResponses with the right SQLSTATE.
    let err = connect_err(&d, "postgres@nosuch");
    assert_eq!(err.code().map(|c| c.code()), Some("3D000"), "{err}");
    let err = env.fails(&["use", "nosuch"]);
    assert!(err.contains("does not exist"), "{err}");
}

#[test]
fn wakes_stopped_branches_once_and_suspends_idle_ones() {
    let env = project();
    env.ok(&["branch", "stop", "main"]);
    env.ok(&["branch", "stop", "dev"]);
    let d = up(&env);
    // 50 concurrent first connections to a stopped branch: all served, one postmaster.
    let log = env.project_dir().join("branches/main/server.log");
    let starts_before = std::fs::read_to_string(&log)
        .unwrap()
        .matches("ready to accept connections")
        .count();
    let handles: Vec<_> = (0..50)
        .map(|_| {
            let u = url(&d, "postgres");
            std::thread::spawn(move || {
                let mut c = postgres::Client::connect(&u, postgres::NoTls).unwrap();
                let pid: i32 = c.query_one("select pg_backend_pid()", &[]).unwrap().get(0);
                let branch: String = c
                    .query_one("select branch from marker", &[])
                    .unwrap()
                    .get(0);
                (pid, branch)
            })
        })
        .collect();
    let results: Vec<(i32, String)> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(results.iter().all(|(_, b)| b == "main"));
    let starts_after = std::fs::read_to_string(&log)
        .unwrap()
        .matches("ready to accept connections")
        .count();
    assert_eq!(
        starts_after - starts_before,
        1,
        "exactly one server start for 50 concurrent connections"
    );
    assert_eq!(env.branch_json("main")["running"], true);
    // Idle for suspend_timeout (1 s here) with no sessions: stopped.
    let deadline = Instant::now() + Duration::from_secs(20);
    while env.branch_json("main")["running"] == true {
        assert!(Instant::now() < deadline, "main was not suspended");
        std::thread::sleep(Duration::from_millis(200));
    }
    // And woken again by the next connection.
    assert_eq!(
        common::psql(&url(&d, "postgres"), "select branch from marker"),
        "main"
    );
}

#[test]
fn a_branch_that_cannot_start_gets_57p03_and_a_taken_port_a_clear_error() {
    let env = project();
    env.ok(&["branch", "stop", "dev"]);
    let conf = env.project_dir().join("branches/dev/data/postgresql.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("\nshared_buffers = 'lots'\n");
    std::fs::write(&conf, text).unwrap();
    let d = up(&env);
    let err = connect_err(&d, "postgres@dev");
    let db = err.as_db_error().expect("an ErrorResponse");
    assert_eq!(db.code().code(), "57P03");
    assert!(db.detail().unwrap_or("").contains("server.log"), "{db:?}");
    // The proxy is still fine for other branches.
    assert_eq!(
        common::psql(&url(&d, "postgres"), "select branch from marker"),
        "main"
    );

    // A second daemon on the same project is refused; on a taken port too.
    let out = env.run(&["up", "--port", &d.port.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("already running") || err.contains("already in use"),
        "{err}"
    );
    let other = TestEnv::new(Fs::Plain).unwrap();
    other.init();
    let out = other.run(&["up", "--port", &d.port.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!(
            "port {} is already in use by process pgtwig",
            d.port
        )),
        "{err}"
    );
}

#[test]
fn up_detach_and_down() {
    let env = project();
    let port = free_port();
    let out = env.ok(&["up", "--detach", "--port", &port.to_string()]);
    assert!(out.contains("daemon running"), "{out}");
    let u = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    assert_eq!(common::psql(&u, "select branch from marker"), "main");
    let out = env.ok(&["down"]);
    assert!(out.contains("stopped"), "{out}");
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens after down"
    );
    assert_eq!(
        env.branch_json("main")["running"],
        false,
        "down stops the branches"
    );
    let out = env.ok(&["down"]);
    assert!(out.contains("not running"), "{out}");
}

#[test]
fn reset_with_open_sessions_closes_them_at_transaction_boundaries() {
    let env = project();
    env.ok(&["use", "dev"]);
    let d = up(&env);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect_async = |db: &str| {
        let (client, conn) = rt
            .block_on(tokio_postgres::connect(&url(&d, db), tokio_postgres::NoTls))
            .unwrap();
        (client, rt.spawn(conn))
    };
    // An idle session, and one in the middle of a transaction, both on dev.
    let (_idle, idle_conn) = connect_async("postgres");
    let (busy, busy_conn) = connect_async("postgres");
    rt.block_on(busy.batch_execute("begin; insert into marker values ('in flight')"))
        .unwrap();

    let reset = {
        // dev is the active branch: a reset under the running app is asked for with --force.
        let cmd = env.cmd(&[
            "branch",
            "reset",
            "dev",
            "--force",
            "--keep-old",
            "dev-before",
        ]);
        std::thread::spawn(move || {
            let mut cmd = cmd;
            cmd.output().unwrap()
        })
    };
    // The idle session is closed at once with 57P01, naming the branch.
    let ended =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), idle_conn).await });
    let err = ended.expect("idle session closed").unwrap().unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err}"));
    assert_eq!(db.code().code(), "57P01");
    assert!(
        db.message()
            .contains("resetting database branch \"dev\" to a fresh copy of \"main\""),
        "{db:?}"
    );
    // The transaction is not cut: the reset waits for it.
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        !reset.is_finished(),
        "reset must wait for the open transaction"
    );
    rt.block_on(busy.batch_execute("insert into marker values ('still in flight')"))
        .unwrap();
    rt.block_on(busy.batch_execute("commit")).unwrap();
    let ended =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), busy_conn).await });
    let err = ended
        .expect("busy session closed after commit")
        .unwrap()
        .unwrap_err();
    assert_eq!(
        err.as_db_error().map(|e| e.code().code()),
        Some("57P01"),
        "{err}"
    );

    let out = reset.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The committed transaction is in the old state (kept), the reset branch is
    // its parent's again, and new sessions work.
    env.ok(&["branch", "start", "dev-before"]);
    assert_eq!(env.psql("dev-before", "select count(*) from marker"), "3");
    assert_eq!(
        common::psql(
            &url(&d, "postgres"),
            "select string_agg(branch, ',') from marker"
        ),
        "main"
    );
}

#[test]
fn server_connections_are_reused_unless_turned_off() {
    let env = project();
    let pid = |d: &Daemon| -> i32 {
        let mut c = connect(d, "postgres");
        let pid = c.query_one("select pg_backend_pid()", &[]).unwrap().get(0);
        c.execute("create temp table scratch(x int)", &[]).unwrap();
        drop(c);
        std::thread::sleep(Duration::from_millis(300));
        pid
    };
    {
        let d = up(&env);
        let first = pid(&d);
        // The same server process, reset: the temp table is gone.
        let mut c = connect(&d, "postgres");
        let again: i32 = c.query_one("select pg_backend_pid()", &[]).unwrap().get(0);
        assert_eq!(again, first, "a trust-authenticated connection is reused");
        let temp: i64 = c
            .query_one(
                "select count(*) from pg_class where relname = 'scratch' and relpersistence = 't'",
                &[],
            )
            .unwrap()
            .get(0);
        assert_eq!(temp, 0, "DISCARD ALL ran between the sessions");
    }
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[proxy]\nsuspend_timeout = \"1s\"\nreuse_connections = false\n",
    )
    .unwrap();
    let d = up(&env);
    let first = pid(&d);
    assert_ne!(
        pid(&d),
        first,
        "reuse_connections = false: a fresh server process each time"
    );
}

/// `gc` drains like `branch delete`: a session open on the collected branch is ended with
/// 57P01 saying why, a transaction in flight finishes first, and the branch goes.
#[test]
fn gc_ends_the_sessions_of_a_collected_branch_at_transaction_boundaries() {
    let env = project();
    env.ok(&["pr", "open", "9", "--ttl", "1s"]);
    let d = up(&env);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect_async = |db: &str| {
        let (client, conn) = rt
            .block_on(tokio_postgres::connect(&url(&d, db), tokio_postgres::NoTls))
            .unwrap();
        (client, rt.spawn(conn))
    };
    let (idle, idle_conn) = connect_async("postgres@pr-9");
    rt.block_on(idle.simple_query("select 1")).unwrap();
    let (busy, busy_conn) = connect_async("postgres@pr-9");
    rt.block_on(busy.batch_execute("begin; insert into marker values ('in flight')"))
        .unwrap();
    common::wait_for(10, "pr-9 to expire", || {
        env.ok(&["gc", "--dry-run"]).contains("would delete pr-9")
    });

    let gc = {
        let mut cmd = env.cmd(&["gc"]);
        std::thread::spawn(move || cmd.output().unwrap())
    };
    let ended =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), idle_conn).await });
    let err = ended.expect("idle session closed").unwrap().unwrap_err();
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err}"));
    assert_eq!(db.code().code(), "57P01");
    assert!(
        db.message()
            .contains("pgtwig gc is deleting database branch \"pr-9\" (expired at"),
        "{db:?}"
    );
    // The transaction is not cut: gc waits for it, then its session is ended too.
    rt.block_on(busy.batch_execute("insert into marker values ('still in flight')"))
        .unwrap();
    assert!(!gc.is_finished(), "gc waits for the open transaction");
    rt.block_on(busy.batch_execute("commit")).unwrap();
    let ended =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), busy_conn).await });
    let err = ended.expect("busy session closed").unwrap().unwrap_err();
    assert_eq!(err.as_db_error().map(|e| e.code().code()), Some("57P01"));
    let out = gc.join().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("deleted pr-9"));
    assert!(env.list_json().iter().all(|b| b["name"] != "pr-9"));
}
