//! Busy-polling (opt-in) changes when the proxy looks at its sockets, never what it relays:
//! a client's queries through the first trial (phases without and with spinning) and past
//! it all get their own answers. Against a real PostgreSQL 15 server.

mod support;

use std::time::{Duration, Instant};

use pgtwig_proxy::ProxyConfig;
use support::*;

#[tokio::test(flavor = "current_thread")]
async fn sessions_get_their_answers_while_the_proxy_tries_spinning() {
    let env = Env::start(ProxyConfig {
        busy_poll: Some(Duration::from_micros(200)),
        ..config()
    })
    .await;
    let (a, a_conn) = env.connect("postgres").await;
    let (b, b_conn) = env.connect("postgres").await;
    // A trial takes 600 ms; keep two sessions busy through it and after.
    let until = Instant::now() + Duration::from_millis(1500);
    let mut n = 0i64;
    while Instant::now() < until {
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&n];
        let (ra, rb) = tokio::join!(
            a.query_one("select $1::int8 * 2", &params),
            b.query_one("select $1::int8 + 1", &params)
        );
        assert_eq!(ra.unwrap().get::<_, i64>(0), n * 2);
        assert_eq!(rb.unwrap().get::<_, i64>(0), n + 1);
        n += 1;
    }
    assert!(n > 100, "only {n} round trips in 1.5 s");
    // A switch still closes an idle session at once, with 57P01. (A simple query last, so
    // no statement Close is in flight to take the FATAL as its answer.)
    assert_eq!(simple_value(&a, "select branch from marker").await, "main");
    env.active.send("feature".into()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(10), a_conn)
        .await
        .expect("the idle session was closed after the switch")
        .unwrap()
        .expect_err("closed with an error");
    assert_eq!(code(&err), "57P01");
    drop(b);
    b_conn.await.unwrap().ok();
}
