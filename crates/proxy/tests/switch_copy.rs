//! A branch switch in the middle of COPY: the COPY finishes on the old branch, then the session
//! gets FATAL 57P01 at its first ReadyForQuery after it — never an abrupt close. psql `\copy`
//! and tokio-postgres `copy_in` / `copy_out`, both directions. Real PostgreSQL 15 servers.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SWITCHED: &str =
    "terminating connection: pgtwig switched the active branch from \"main\" to \"feature\"";

/// Switches to feature and waits until new sessions land there.
async fn switch_to_feature(env: &Env) {
    env.active.send("feature".into()).unwrap();
    assert_eq!(
        env.psql_ok("dbname=postgres", "select branch from marker")
            .await,
        "feature"
    );
}

/// The connection task's end must be 57P01 with the switch message.
async fn expect_switched(
    conn: tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
    what: &str,
) {
    let end = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap_or_else(|_| panic!("{what}: the session was not closed after the COPY"))
        .unwrap();
    let err = end.expect_err("the session should end with 57P01");
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{what}: closed without an error message: {err:?}"));
    assert_eq!(db.code().code(), "57P01", "{what}");
    assert_eq!(db.message(), SWITCHED, "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_copy_in_during_a_switch() {
    let env = Env::start(config()).await;
    env.main.psql("create table t(x int, s text)");
    let (client, conn) = env.connect("postgres").await;
    let sink = client.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(sink);
    for i in 0..1000 {
        sink.feed(Bytes::from(format!("{i}\tbefore\n")))
            .await
            .unwrap();
    }
    sink.flush().await.unwrap();
    switch_to_feature(&env).await;
    for i in 1000..2000 {
        sink.feed(Bytes::from(format!("{i}\tafter\n")))
            .await
            .unwrap();
    }
    assert_eq!(sink.finish().await.unwrap(), 2000, "the COPY finished");
    expect_switched(conn, "copy_in").await;
    assert_eq!(env.main.psql("select count(*) from t"), "2000");
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_copy_out_during_a_switch() {
    let env = Env::start(config()).await;
    let (client, conn) = env.connect("postgres").await;
    let stream = client
        .copy_out("copy (select g, repeat('x', 500) from generate_series(1, 20000) g) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut bytes = 0;
    // Part of it, then the switch while the server is still sending.
    while bytes < 100_000 {
        bytes += stream.next().await.unwrap().unwrap().len();
    }
    switch_to_feature(&env).await;
    let mut lines = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
        bytes += chunk.len();
    }
    assert!(
        bytes > 20000 * 500,
        "the whole COPY arrived ({bytes} bytes)"
    );
    assert!(lines > 0);
    // The FATAL is the answer to the next query (unless that comes after the proxy's grace
    // period: then the connection task has it).
    let err = client
        .simple_query("select 1")
        .await
        .expect_err("a query after the switch must fail");
    match err.as_db_error() {
        Some(db) => {
            assert_eq!((db.code().code(), db.message()), ("57P01", SWITCHED));
            let end = tokio::time::timeout(Duration::from_secs(5), conn).await;
            assert!(end.is_ok(), "the connection did not end");
        }
        None => expect_switched(conn, "copy_out").await,
    }
    env.wait_drained().await;
}

/// psql through the proxy with `script` written to its stdin (which stays open).
async fn psql_script(env: &Env, script: &str) -> tokio::process::Child {
    let mut child = tokio::process::Command::new("psql")
        .arg(env.conninfo("postgres"))
        .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .as_mut()
        .unwrap()
        .write_all(script.as_bytes())
        .await
        .unwrap();
    child
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_from_stdin_during_a_switch() {
    let env = Env::start(config()).await;
    env.main.psql("create table t(x int)");
    let mut child = psql_script(&env, "\\copy t from stdin\n1\n2\n").await;
    // Wait until the COPY is under way on main.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while env
        .main
        .psql("select count(*) from pg_stat_activity where query like 'COPY%' and state = 'active'")
        != "1"
    {
        assert!(std::time::Instant::now() < deadline, "COPY never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    switch_to_feature(&env).await;
    let mut stdin = child.stdin.take().unwrap();
    stdin
        .write_all(b"3\n\\.\nselect 'after copy';\n")
        .await
        .unwrap();
    drop(stdin);
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("psql hung")
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(SWITCHED), "psql was not told why: {stderr}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("after copy"),
        "the query after the COPY ran"
    );
    assert_eq!(env.main.psql("select count(*) from t"), "3");
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_copy_to_stdout_during_a_switch() {
    let env = Env::start(config()).await;
    let mut child = psql_script(
        &env,
        "\\copy (select g, repeat('x', 500) from generate_series(1, 20000) g) to stdout\n\
         select 'after copy';\n",
    )
    .await;
    drop(child.stdin.take());
    let mut stdout = child.stdout.take().unwrap();
    let mut got = vec![0u8; 200_000];
    stdout.read_exact(&mut got).await.unwrap();
    // psql is blocked on its stdout pipe, mid-COPY.
    switch_to_feature(&env).await;
    stdout.read_to_end(&mut got).await.unwrap();
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("psql hung")
        .unwrap();
    let lines = got.iter().filter(|&&b| b == b'\n').count();
    assert_eq!(lines, 20000, "the whole COPY arrived");
    assert!(!String::from_utf8_lossy(&got).contains("after copy"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains(SWITCHED), "psql was not told why: {stderr}");
    env.wait_drained().await;
}

/// Reads backend messages until one of type `ty` (included).
async fn read_until(s: &mut tokio::net::TcpStream, ty: u8) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    loop {
        let msgs = split_messages(&got);
        if msgs.iter().any(|(t, _)| *t == ty) {
            return msgs;
        }
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .unwrap_or_else(|_| panic!("no '{}' within 10 s: {msgs:?}", ty as char))
            .unwrap();
        assert!(n > 0, "closed before '{}': {msgs:?}", ty as char);
        got.extend_from_slice(&chunk[..n]);
    }
}

/// libpq reads whatever has arrived with a ReadyForQuery and takes an ErrorResponse it finds
/// while idle for a notice: its next query then fails with "server closed the connection
/// unexpectedly" and no SQLSTATE (psycopg after a COPY or COMMIT did). So the FATAL of a
/// session closed at a ReadyForQuery must not follow it at once: it answers the client's
/// next message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fatal_answers_the_next_message_not_the_ready_for_query() {
    use support::pgtls::{query_packet, startup};
    let env = Env::start(config()).await;
    env.main.psql("create table t(x int)");
    for case in ["copy", "transaction"] {
        env.active.send("main".into()).unwrap();
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
            .await
            .unwrap();
        startup(&mut s, "postgres").await;
        if case == "copy" {
            s.write_all(&query_packet("copy t from stdin"))
                .await
                .unwrap();
            read_until(&mut s, b'G').await;
        } else {
            s.write_all(&query_packet("begin")).await.unwrap();
            read_until(&mut s, b'Z').await;
        }
        switch_to_feature(&env).await;
        // End the COPY / the transaction.
        let mut end = Vec::new();
        if case == "copy" {
            end.extend_from_slice(&[b'd', 0, 0, 0, 6, b'1', b'\n', b'c', 0, 0, 0, 4]);
        } else {
            end.extend_from_slice(&query_packet("commit"));
        }
        s.write_all(&end).await.unwrap();
        let msgs = read_until(&mut s, b'Z').await;
        assert_eq!(msgs.last().unwrap(), &(b'Z', b"I".to_vec()), "{case}");
        let mut b = [0u8; 64];
        assert!(
            tokio::time::timeout(Duration::from_millis(200), s.read(&mut b))
                .await
                .is_err(),
            "{case}: the proxy sent something right after the final ReadyForQuery"
        );
        s.write_all(&query_packet("select 1")).await.unwrap();
        let msgs = read_messages(&mut s).await;
        assert_eq!(msgs.len(), 1, "{case}: {msgs:?}");
        let e = error_fields(&msgs[0].1);
        assert_eq!((msgs[0].0, e[&b'C'].as_str()), (b'E', "57P01"), "{case}");
        assert_eq!(e[&b'M'], SWITCHED, "{case}");
    }
    assert_eq!(env.main.psql("select count(*) from t"), "1");
    env.wait_drained().await;
}
