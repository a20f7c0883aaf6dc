//! A session that has sent nothing since its greeting when the active branch changes is moved
//! to the new branch without the client noticing; one with any history still gets 57P01.
//! A checkout storm gives connect-per-query clients no errors. Real PostgreSQL 15 servers.

mod support;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtwig_proxy::ProxyConfig;
use support::*;

/// Switches to `branch` and waits until new sessions land there.
async fn switch_to(env: &Env, branch: &str) {
    env.active.send(branch.into()).unwrap();
    assert_eq!(
        env.psql_ok("dbname=postgres", "select branch from marker")
            .await,
        branch
    );
}

async fn wait_sessions_on(env: &Env, branch: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let on: Vec<_> = env
            .proxy
            .sessions()
            .into_iter()
            .filter(|s| s.branch == branch)
            .collect();
        if on.len() == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} sessions on {branch}: {:?}",
            env.proxy.sessions()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn moved_and_kept(config: ProxyConfig) {
    let env = Env::start(config).await;
    let (fresh, fresh_conn) = env.connect("postgres").await;
    let (used, used_conn) = env.connect("postgres").await;
    assert_eq!(
        simple_value(&used, "select branch from marker").await,
        "main"
    );
    switch_to(&env, "feature").await;
    // The session with history is closed as before.
    let err = tokio::time::timeout(Duration::from_secs(5), used_conn)
        .await
        .expect("the used session was not closed")
        .unwrap()
        .expect_err("57P01 expected");
    assert_eq!(code(&err), "57P01");
    // The fresh one was moved: registered on feature, its queries run there (extended
    // protocol too), and its cancel key reaches the new server.
    wait_sessions_on(&env, "feature", 1).await;
    let r = fresh
        .query_one("select branch from marker", &[])
        .await
        .expect("the fresh session must work after the switch");
    assert_eq!(r.get::<_, String>(0), "feature");
    let token = fresh.cancel_token();
    let sleeper = tokio::spawn(async move {
        let r = fresh.simple_query("select pg_sleep(60)").await;
        (r, fresh)
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while env.feature.psql(
        "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)' and state = 'active'",
    ) != "1"
    {
        assert!(Instant::now() < deadline, "the sleep never ran on feature");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, fresh) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("not cancelled")
        .unwrap();
    assert_eq!(code(&r.unwrap_err()), "57014");
    // Now it has history: the next switch closes it.
    env.active.send("main".into()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), fresh_conn)
        .await
        .expect("the session was not closed after it had run queries")
        .unwrap()
        .expect_err("57P01 expected");
    assert_eq!(code(&err), "57P01");
    drop(fresh);
    env.wait_drained().await;
    // The old server connection of the moved session went to the pool or was closed: no
    // backend is left on main but parked ones.
    let q = "select count(*) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()";
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let on_main: usize = env.main.psql(q).parse().unwrap();
        let on_feature: usize = env.feature.psql(q).parse().unwrap();
        if on_main + on_feature == env.proxy.pooled_connections() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "backends left: {on_main} on main, {on_feature} on feature, {} parked",
            env.proxy.pooled_connections()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_session_is_moved_and_a_used_one_closed() {
    moved_and_kept(config()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_session_is_moved_with_reuse_off() {
    moved_and_kept(ProxyConfig {
        pool_idle_timeout: None,
        ..config()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_still_starting_when_the_branch_switches_is_moved() {
    // Switch while the session is being routed and greeted: it lands on main, gets main's
    // greeting, and is moved before its first query.
    let env = Env::start(config()).await;
    let router = env.router.clone();
    let connecting = tokio::spawn({
        let conninfo = env.conninfo("postgres");
        async move { tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await }
    });
    // The router has been asked: the session is routed to main.
    let deadline = Instant::now() + Duration::from_secs(5);
    while router.calls.load(Ordering::SeqCst) == 0 {
        assert!(Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    env.active.send("feature".into()).unwrap();
    let (client, conn) = connecting.await.unwrap().unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(
        simple_value(&client, "select branch from marker").await,
        "feature"
    );
    assert!(!conn.is_finished());
}

/// Connect-per-query clients while the active branch flips back and forth: no query fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkout_storm_gives_connect_per_query_clients_no_errors() {
    let env = Arc::new(Env::start(config()).await);
    let stop = Arc::new(AtomicBool::new(false));
    let queries = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for c in 0..4 {
        let (env, stop, queries) = (env.clone(), stop.clone(), queries.clone());
        clients.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let (client, conn) =
                    match tokio_postgres::connect(&env.conninfo("postgres"), tokio_postgres::NoTls)
                        .await
                    {
                        Ok(x) => x,
                        Err(e) => {
                            errors.push(format!("connect: {e}"));
                            continue;
                        }
                    };
                let conn = tokio::spawn(conn);
                // Half simple, half extended protocol in one round trip (Parse, Bind,
                // Execute, Sync: what libpq's PQexecParams sends). A client that prepares in
                // one round trip and executes in another has history after the first: a
                // switch in between closes it (see the crate docs).
                let branch = if c % 2 == 0 {
                    client
                        .simple_query("select branch from marker")
                        .await
                        .map(|m| match &m[1] {
                            tokio_postgres::SimpleQueryMessage::Row(r) => {
                                r.get(0).unwrap().to_string()
                            }
                            other => panic!("{other:?}"),
                        })
                } else {
                    client
                        .query_typed("select branch from marker", &[])
                        .await
                        .map(|rows| rows[0].get::<_, String>(0))
                };
                match branch {
                    Ok(b) => assert!(b == "main" || b == "feature", "{b}"),
                    Err(e) => errors.push(format!("query: {e} ({:?})", e.code())),
                }
                queries.fetch_add(1, Ordering::Relaxed);
                drop(client);
                let _ = conn.await;
            }
            errors
        }));
    }
    let started = Instant::now();
    let mut switches = 0;
    while started.elapsed() < Duration::from_secs(8) {
        let to = if switches % 2 == 0 { "feature" } else { "main" };
        env.active.send(to.into()).unwrap();
        switches += 1;
        // A few queries per branch, at varying points of the clients' sessions.
        let q = queries.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(5);
        while queries.load(Ordering::Relaxed) < q + 3 + switches % 5 {
            assert!(Instant::now() < deadline, "clients made no progress");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut errors = Vec::new();
    for c in clients {
        errors.extend(c.await.unwrap());
    }
    let total = queries.load(Ordering::Relaxed);
    eprintln!("{switches} switches, {total} queries");
    assert!(switches >= 50, "only {switches} switches");
    assert!(
        errors.is_empty(),
        "{} of {total} queries failed across {switches} switches: {:?}",
        errors.len(),
        &errors[..errors.len().min(5)]
    );
}
