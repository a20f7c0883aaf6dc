//! The relay's io_uring data path (`relay/ring.rs`): a settled plain session is lent to the
//! ring thread, relays large results, COPY and cancels there, and comes back to its task
//! for a branch switch and for its goodbye (its server connection then parked for reuse).
//! Against real PostgreSQL 15 servers.
//!
//! The ring's counters are per process, so the tests here take turns.

mod support;

use std::time::{Duration, Instant};

use futures_util::SinkExt;
use pgtwig_proxy::ring_counts;
use support::*;

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Waits (5 s at most) until `f(lent, returned)` holds.
async fn wait_ring(what: &str, f: impl Fn(u64, u64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (lent, returned) = ring_counts();
        if f(lent, returned) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {lent} sessions lent to the ring, {returned} given back"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Settles a session: enough round trips for the relay to lend it to the ring.
async fn settle(client: &tokio_postgres::Client, before: u64) {
    for _ in 0..4 {
        assert_eq!(
            simple_value(client, "select branch from marker").await,
            "main"
        );
    }
    wait_ring("a settled session goes to the ring", |lent, _| {
        lent > before
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_on_the_ring_relays_everything_and_comes_back_for_a_switch() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::start(config()).await;
    env.main.psql("create table t(x int, pad text)");
    let (lent0, returned0) = ring_counts();
    let (client, conn) = env.connect("postgres").await;
    settle(&client, lent0).await;
    assert_eq!(ring_counts().1, returned0, "nothing came back yet");

    // A result far larger than the relay's buffers (and the socket buffers): every byte
    // arrives, in order.
    let rows = client
        .query(
            "select i, repeat(md5(i::text), 8) from generate_series(1, 50000) i",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 50000);
    for (n, row) in rows.iter().enumerate().step_by(997) {
        let i: i32 = row.get(0);
        assert_eq!(i as usize, n + 1);
        let pad: String = row.get(1);
        assert_eq!(pad.len(), 256);
    }

    // COPY in, larger than the buffers too.
    let sink = client
        .copy_in("copy t from stdin")
        .await
        .expect("COPY starts");
    let mut sink = Box::pin(sink);
    for chunk in 0..20 {
        let mut data = String::new();
        for i in 0..2000 {
            data.push_str(&format!("{}\t{}\n", chunk * 2000 + i, "y".repeat(100)));
        }
        sink.send(bytes::Bytes::from(data)).await.unwrap();
    }
    assert_eq!(sink.as_mut().finish().await.unwrap(), 40000);
    assert_eq!(
        simple_value(&client, "select count(distinct x) from t").await,
        "40000"
    );

    // A cancel reaches the query of a session on the ring, and the session goes on.
    let token = client.cancel_token();
    let sleeper = client.simple_query("select pg_sleep(30)");
    let cancel = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    };
    let (slept, ()) = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::join!(sleeper, cancel)
    })
    .await
    .expect("the cancel reached the server");
    assert_eq!(code(&slept.expect_err("cancelled")), "57014");
    assert_eq!(simple_value(&client, "select 1").await, "1");
    assert_eq!(
        ring_counts().1,
        returned0,
        "all of that happened on the ring"
    );

    // A switch recalls the session; it ends with 57P01 like any idle session.
    env.active.send("feature".into()).unwrap();
    let res = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("the session on the ring was closed for the switch");
    let err = res.unwrap().expect_err("ends with an error");
    assert_eq!(code(&err), "57P01");
    wait_ring("the session came back for the switch", |_, returned| {
        returned > returned0
    })
    .await;
    let (client, _conn) = env.connect("postgres").await;
    assert_eq!(
        simple_value(&client, "select branch from marker").await,
        "feature"
    );
    drop(client);
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_leaves_from_the_ring_parks_its_server_connection() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::start(config()).await;
    let (lent0, returned0) = ring_counts();
    let (client, conn) = env.connect("postgres").await;
    settle(&client, lent0).await;
    let pid = simple_value(&client, "select pg_backend_pid()").await;
    drop(client);
    conn.await.unwrap().expect("a clean goodbye");
    wait_ring("the session came back to say goodbye", |_, returned| {
        returned > returned0
    })
    .await;
    env.wait_pooled(1).await;
    // The next client gets the same server connection, reset.
    let (client, _conn) = env.connect("postgres").await;
    assert_eq!(simple_value(&client, "select pg_backend_pid()").await, pid);
    drop(client);
    env.wait_drained().await;
}

/// A switch that comes before the next query of a session on the ring closes the session
/// before that query reaches the old branch: the query gets 57P01, never an answer from
/// "main". The ring relays apart from the session's task, so it looks at the task's control
/// sources before it passes on client bytes (JDBC's `pgtwig use` check once got an answer
/// from the old branch under load).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_right_after_a_switch_is_not_answered_by_the_old_branch() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::start(config()).await;
    for round in 0..10 {
        let (lent0, _) = ring_counts();
        let (client, conn) = env.connect("postgres").await;
        let conn = tokio::spawn(conn);
        settle(&client, lent0).await;
        env.active.send("feature".into()).unwrap();
        match client.simple_query("select branch from marker").await {
            Err(e) => assert_eq!(code(&e), "57P01", "round {round}: {e:?}"),
            Ok(rows) => panic!("round {round}: answered after the switch: {rows:?}"),
        }
        let _ = conn.await;
        env.active.send("main".into()).unwrap();
        env.wait_drained().await;
    }
}

/// With two io_uring threads allowed, two sessions on the ring at once are on two rings, each
/// relaying its own results; a session that comes after them goes to a ring left idle, not
/// to a new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_sessions_are_spread_over_the_rings() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::start(pgtwig_proxy::ProxyConfig {
        io_uring_threads: 2,
        ..config()
    })
    .await;
    let (lent0, returned0) = ring_counts();
    let (first, first_conn) = env.connect("postgres").await;
    settle(&first, lent0).await;
    let (second, second_conn) = env.connect("postgres").await;
    settle(&second, lent0 + 1).await;
    let rings = pgtwig_proxy::ring_loads();
    assert_eq!(
        rings[..2],
        [1, 1],
        "one session on each of two rings: {rings:?}"
    );
    assert!(rings[2..].iter().all(|&n| n == 0), "{rings:?}");
    for (client, n) in [(&first, 1), (&second, 2), (&first, 3)] {
        let sql = format!("select repeat('x', {n} * 100000)");
        assert_eq!(simple_value(client, &sql).await.len(), n * 100_000);
    }
    drop(first);
    drop(second);
    first_conn.await.unwrap().expect("a clean goodbye");
    second_conn.await.unwrap().expect("a clean goodbye");
    wait_ring("both sessions came back", |_, returned| {
        returned >= returned0 + 2
    })
    .await;
    let started = pgtwig_proxy::ring_kept_descriptors();
    let (third, _third_conn) = env.connect("postgres").await;
    settle(&third, lent0 + 2).await;
    assert_eq!(
        pgtwig_proxy::ring_kept_descriptors(),
        started,
        "no ring started while one was idle"
    );
    assert_eq!(pgtwig_proxy::ring_loads().iter().sum::<usize>(), 1);
    drop(third);
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_io_uring_off_no_session_goes_to_the_ring() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let env = Env::start(pgtwig_proxy::ProxyConfig {
        io_uring: false,
        ..config()
    })
    .await;
    let before = ring_counts();
    let (client, _conn) = env.connect("postgres").await;
    for _ in 0..10 {
        assert_eq!(
            simple_value(&client, "select branch from marker").await,
            "main"
        );
    }
    assert_eq!(ring_counts(), before);
}

/// A session on the ring whose task goes away (its runtime shut down, as when the daemon
/// stops) is ended there: the client sees its connection close and the server's backend
/// exits, instead of the ring relaying for a session nobody owns.
#[test]
fn a_session_on_the_ring_ends_with_its_task() {
    let proxy_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let _turn = client_rt.block_on(ONE_AT_A_TIME.lock());
    let env = proxy_rt.block_on(Env::start(config()));
    let (lent0, _) = ring_counts();
    let (client, conn) = client_rt.block_on(async {
        let (client, conn) = env.connect("postgres").await;
        settle(&client, lent0).await;
        (client, conn)
    });
    let backends = "select count(*) from pg_stat_activity where backend_type = 'client backend' \
                    and pid <> pg_backend_pid()";
    assert_eq!(env.main.psql(backends), "1");
    drop(proxy_rt);
    client_rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("the client's connection was closed")
            .unwrap()
            .expect_err("closed without a goodbye");
        assert!(client.is_closed());
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while env.main.psql(backends) != "0" {
        assert!(Instant::now() < deadline, "the server backend did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}
