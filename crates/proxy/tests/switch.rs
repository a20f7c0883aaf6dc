//! Branch switches: idle sessions are closed with 57P01, transactions finish first, `Keep`
//! leaves sessions alone. Against real PostgreSQL 15 servers.

mod support;

use std::time::Duration;

use pgtwig_proxy::{OnSwitch, ProxyConfig};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_closes_an_idle_session_and_new_sessions_follow() {
    let env = Env::start(config()).await;
    let (client, conn) = env.connect("postgres").await;
    // Simple protocol, so tokio-postgres has no asynchronous statement Close in flight
    // (it would swallow the FATAL as that request's answer).
    assert_eq!(
        simple_value(&client, "select branch from marker").await,
        "main"
    );

    env.active.send("feature".into()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle session was not closed");
    let err = res
        .unwrap()
        .expect_err("connection should end with an error");
    let db = err.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "57P01");
    assert!(
        db.message().contains("\"main\"") && db.message().contains("\"feature\""),
        "{}",
        db.message()
    );
    assert!(client.is_closed());

    let (client, _conn) = env.connect("postgres").await;
    let r = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "feature");

    // psql sees the same message when its session is closed between commands: use a raw
    // check that psql run after the switch lands on feature.
    let out = env
        .psql("dbname=postgres", "select branch from marker")
        .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "feature");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_waits_for_the_transaction_to_end() {
    let env = Env::start(config()).await;
    env.main.psql("create table t(x int)");
    let (client, conn) = env.connect("postgres").await;
    client
        .batch_execute("begin; insert into t values (1)")
        .await
        .unwrap();

    env.active.send("feature".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!conn.is_finished(), "closed in the middle of a transaction");
    // Still on main, still in the transaction: an extended-protocol query and a simple one.
    client
        .execute("insert into t values ($1)", &[&2i32])
        .await
        .unwrap();
    let r = client
        .query_one("select count(*) from t", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 2);
    assert!(env.proxy.sessions()[0].in_transaction);
    client
        .batch_execute("commit")
        .await
        .expect("COMMIT must succeed");

    let res = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("not closed after commit");
    let err = res.unwrap().expect_err("connection should end with 57P01");
    assert_eq!(err.as_db_error().unwrap().code().code(), "57P01");
    assert_eq!(
        env.main
            .psql("select string_agg(x::text, ',' order by x) from t"),
        "1,2"
    );
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switch_back_before_idle_keeps_the_session() {
    let env = Env::start(config()).await;
    let (client, conn) = env.connect("postgres").await;
    client.batch_execute("begin").await.unwrap();
    env.active.send("feature".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    env.active.send("main".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    client.batch_execute("commit").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!conn.is_finished());
    let r = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "main");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_leaves_sessions_on_their_branch() {
    let env = Env::start(ProxyConfig {
        on_switch: OnSwitch::Keep,
        ..config()
    })
    .await;
    let (client, conn) = env.connect("postgres").await;
    env.active.send("feature".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "main");
    assert!(!conn.is_finished());
    let (client2, _c2) = env.connect("postgres").await;
    let r = client2
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "feature");
    let mut branches: Vec<String> = env.proxy.sessions().into_iter().map(|s| s.branch).collect();
    branches.sort();
    assert_eq!(branches, ["feature", "main"]);
}
