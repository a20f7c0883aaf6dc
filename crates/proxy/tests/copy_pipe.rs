//! No stall piping COPY between two sessions: `COPY (...) TO STDOUT` on one connection
//! streamed straight into `COPY t FROM STDIN` on another, many times, over TLS and without,
//! with the proxy on a multi-thread runtime and on its own current-thread runtime (as the
//! daemon runs it). Each iteration has a deadline: a stall fails the test with where it was.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use pgtwig_proxy::{Proxy, ProxyConfig};
use support::*;

/// Serves `proxy` on a new loopback port from a current-thread runtime on its own thread.
fn serve_on_own_thread(proxy: Arc<Proxy>) -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            let _ = proxy.serve(listener).await;
        });
    });
    port
}

async fn connect(
    port: u16,
    tls: Option<&rustls::ClientConfig>,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Result<(), tokio_postgres::Error>>,
) {
    let conninfo = format!(
        "host=localhost port={port} user=postgres dbname=postgres sslmode={}",
        if tls.is_some() { "require" } else { "disable" }
    );
    match tls {
        Some(cfg) => {
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new(cfg.clone());
            let (c, conn) = tokio_postgres::connect(&conninfo, connector).await.unwrap();
            (c, tokio::spawn(conn))
        }
        None => {
            let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                .await
                .unwrap();
            (c, tokio::spawn(conn))
        }
    }
}

/// Pipes `rows` rows of `width` bytes from a COPY TO STDOUT on `from` into a COPY FROM STDIN
/// on `to`; returns the rows copied.
async fn pipe_once(
    from: &tokio_postgres::Client,
    to: &tokio_postgres::Client,
    rows: usize,
    width: usize,
) -> u64 {
    let source = from
        .copy_out(&format!(
            "copy (select g, repeat(md5(g::text), {}) from generate_series(1, {rows}) g) to stdout",
            width / 32
        ))
        .await
        .unwrap();
    let sink = to.copy_in("copy t from stdin").await.unwrap();
    futures_util::pin_mut!(source, sink);
    while let Some(chunk) = source.next().await {
        sink.feed(chunk.unwrap()).await.unwrap();
    }
    sink.finish().await.unwrap()
}

async fn pipe_many(port: u16, tls: Option<&rustls::ClientConfig>, what: &str) {
    let (from, _c1) = connect(port, tls).await;
    let (to, _c2) = connect(port, tls).await;
    // Mixed sizes: rows smaller and larger than the relay's buffers and TLS records.
    let shapes = [(200, 64), (50, 20_000), (20, 70_000), (400, 1_000)];
    let started = Instant::now();
    let mut total = 0;
    for i in 0..ITERATIONS {
        let (rows, width) = shapes[i % shapes.len()];
        let n = tokio::time::timeout(Duration::from_secs(20), pipe_once(&from, &to, rows, width))
            .await
            .unwrap_or_else(|_| {
                panic!("{what}: iteration {i} ({rows} rows of {width} bytes) stalled")
            });
        assert_eq!(n, rows as u64, "{what}: iteration {i}");
        total += n;
    }
    let count: i64 = to
        .query_one("select count(*) from t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count as u64, total, "{what}");
    to.batch_execute("truncate t").await.unwrap();
    eprintln!("{what}: {ITERATIONS} iterations in {:?}", started.elapsed());
}

const ITERATIONS: usize = 200;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn piping_copy_between_sessions_never_stalls() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        ..config()
    })
    .await;
    env.main.psql("create table t(x int, s text)");
    let client_tls = (*support::pgtls::client_config(&dir.path().join("cert.pem"), &[])).clone();
    let own_thread = serve_on_own_thread(env.proxy.clone());
    for (port, runtime) in [(env.port, "multi-thread"), (own_thread, "current-thread")] {
        pipe_many(port, None, &format!("{runtime}, sslmode=disable")).await;
        pipe_many(
            port,
            Some(&client_tls),
            &format!("{runtime}, sslmode=require"),
        )
        .await;
    }
}

/// A read from a TLS client never leaves records for the client stuck in the TLS layer:
/// rustls answers a KeyUpdate with the next record it sends rather than queueing one on its
/// own (checked here: nothing arrives until the next query), and the session goes on with the
/// new keys both ways.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_update_keeps_the_session_working() {
    use support::pgtls::*;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        ..config()
    })
    .await;
    let cfg = client_config(&dir.path().join("cert.pem"), &[]);
    let mut s = connect_sslrequest(env.port, cfg).await.unwrap();
    startup(&mut s, "postgres").await;
    assert_eq!(
        data_rows(&simple_query(&mut s, "select 1").await),
        [[Some("1".into())]]
    );
    s.get_mut().1.refresh_traffic_keys().unwrap();
    s.flush().await.unwrap();
    let mut b = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), s.get_ref().0.peek(&mut b))
            .await
            .is_err(),
        "the proxy's TLS layer answered a KeyUpdate on its own: a read can queue TLS \
         output, which the relay must then flush"
    );
    for i in 2..50 {
        let rows = data_rows(&simple_query(&mut s, &format!("select {i}")).await);
        assert_eq!(rows, [[Some(i.to_string())]]);
    }
    terminate(&mut s).await;
    env.wait_drained().await;
}

/// The same with libpq (OpenSSL on the client side): psql running 200 `\copy ... to stdout`
/// piped into one psql `\copy t from stdin`, through the proxy in both sslmodes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_pipe_between_sessions_never_stalls() {
    use std::process::Stdio;
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        ..config()
    })
    .await;
    env.main.psql("create table t(x int, s text)");
    let shapes = [(200, 64), (50, 20_000), (20, 70_000), (400, 1_000)];
    let mut script = String::new();
    let mut expected = 0;
    for i in 0..ITERATIONS {
        let (rows, width) = shapes[i % shapes.len()];
        script.push_str(&format!(
            "\\copy (select g, repeat(md5(g::text), {}) from generate_series(1, {rows}) g) to stdout\n",
            width / 32
        ));
        expected += rows;
    }
    for sslmode in ["disable", "require"] {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode}",
            env.port
        );
        let mut from = tokio::process::Command::new("psql")
            .arg(&conninfo)
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let out: Stdio = from.stdout.take().unwrap().try_into().unwrap();
        let into = tokio::process::Command::new("psql")
            .arg(&conninfo)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-c",
                "\\copy t from stdin",
            ])
            .stdin(out)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = from.stdin.take().unwrap();
        stdin.write_all(script.as_bytes()).await.unwrap();
        drop(stdin);
        let started = Instant::now();
        let done = tokio::time::timeout(Duration::from_secs(60), into.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("sslmode={sslmode}: the psql pipe stalled"))
            .unwrap();
        assert!(
            done.status.success(),
            "sslmode={sslmode}: {}",
            String::from_utf8_lossy(&done.stderr)
        );
        assert!(from.wait().await.unwrap().success());
        assert_eq!(
            env.main.psql("select count(*) from t"),
            expected.to_string(),
            "sslmode={sslmode}"
        );
        env.main.psql("truncate t");
        eprintln!("psql pipe, sslmode={sslmode}: {:?}", started.elapsed());
    }
}
