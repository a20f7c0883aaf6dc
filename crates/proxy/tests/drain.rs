//! Drains (`Proxy::close_sessions_on`, for a branch about to be reset or deleted) reach every
//! session of the branch, however many drains of other branches come at once; and an upstream
//! that never answers is a clear 08006 within the connect limit. Against real PostgreSQL 15.

mod support;

use std::time::{Duration, Instant};

use pgtwig_proxy::{ProxyConfig, UpstreamAddr, UpstreamTls};
use support::*;

/// Current-thread runtime: no session task runs while the drains are sent, so each session
/// finds all of them pending at once (a broadcast channel of 64 would have dropped the one
/// that concerns it).
#[tokio::test]
async fn a_drain_reaches_every_session_behind_more_than_64_other_drains() {
    let env = Env::start(config()).await;
    let mut sessions = Vec::new();
    for _ in 0..4 {
        let (client, conn) = env.connect("postgres").await;
        assert_eq!(
            simple_value(&client, "select branch from marker").await,
            "main"
        );
        sessions.push((client, conn));
    }
    let (feature_client, feature_conn) = env.connect("postgres@feature").await;
    assert_eq!(
        simple_value(&feature_client, "select branch from marker").await,
        "feature"
    );

    env.proxy.close_sessions_on(
        "main",
        "terminating connection: pgtwig is deleting database branch \"main\"".into(),
    );
    for i in 0..200 {
        env.proxy
            .close_sessions_on(&format!("other-{i}"), "not for these sessions".into());
    }

    for (client, conn) in sessions {
        let res = tokio::time::timeout(Duration::from_secs(5), conn)
            .await
            .expect("a session of the drained branch was not closed");
        let err = res.unwrap().expect_err("closed with an error");
        let db = err.as_db_error().expect("a server error");
        assert_eq!(db.code().code(), "57P01");
        assert!(db.message().contains("deleting database branch \"main\""));
        assert!(client.is_closed());
    }
    // A session of another branch stays.
    assert_eq!(
        simple_value(&feature_client, "select branch from marker").await,
        "feature"
    );
    assert!(!feature_conn.is_finished());

    // Sessions that start after the drain are not drained by it.
    let (client, conn) = env.connect("postgres").await;
    assert_eq!(
        simple_value(&client, "select branch from marker").await,
        "main"
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        simple_value(&client, "select branch from marker").await,
        "main"
    );
    assert!(!conn.is_finished());
}

/// Connects to branch `branch` through the proxy and returns the error, and how long it took.
async fn refused(env: &Env, branch: &str) -> (tokio_postgres::Error, Duration) {
    let started = Instant::now();
    let res = tokio_postgres::connect(
        &env.conninfo(&format!("postgres@{branch}")),
        tokio_postgres::NoTls,
    )
    .await;
    let err = res.err().expect("the connection is refused");
    (err, started.elapsed())
}

/// An upstream that accepts TCP but never answers (here: never answers the SSLRequest that
/// starts TLS) and one whose TCP connect never completes (its accept queue is full): the client
/// gets 08006 saying what timed out, within the limit (`ProxyConfig::upstream_connect_timeout`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_that_never_answers_is_08006_within_the_limit() {
    let limit = Duration::from_millis(1500);
    let env = Env::start(ProxyConfig {
        upstream_connect_timeout: limit,
        ..config()
    })
    .await;
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    // Accepts, holds the connections, never writes a byte.
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    env.router.branches.lock().unwrap().insert(
        "silent".into(),
        Ok(UpstreamAddr::Tls {
            host: "127.0.0.1".into(),
            port,
            server_name: "silent.example".into(),
            tls: UpstreamTls::with_roots(rustls::RootCertStore::empty()),
        }),
    );
    let (err, took) = refused(&env, "silent").await;
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a server error: {err}"));
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(
        db.message()
            .contains("could not connect to the server of database branch \"silent\""),
        "{db:?}"
    );
    let detail = db.detail().unwrap_or_default();
    assert!(
        detail.contains("TLS handshake") && detail.contains("did not finish within 1.5s"),
        "{detail}"
    );
    assert!(
        took >= limit && took < limit + Duration::from_secs(3),
        "answered after {took:?} (limit {limit:?})"
    );
    holder.abort();

    // A listener that never accepts, its queue full: connecting hangs (SYNs are dropped).
    let full = FullListener::new();
    env.router.branches.lock().unwrap().insert(
        "unreachable".into(),
        Ok(UpstreamAddr::Tcp {
            host: "127.0.0.1".into(),
            port: full.port,
        }),
    );
    let (err, took) = refused(&env, "unreachable").await;
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("a server error: {err}"));
    assert_eq!(db.code().code(), "08006", "{db:?}");
    let detail = db.detail().unwrap_or_default();
    assert!(
        detail.contains("TCP connect") && detail.contains("did not finish within 1.5s"),
        "{detail}"
    );
    assert!(
        took >= limit && took < limit + Duration::from_secs(3),
        "{took:?}"
    );
    env.wait_drained().await;
}

/// A loopback listener with a backlog of 0 that never accepts, filled until one more connect
/// does not complete.
struct FullListener {
    fd: i32,
    port: u16,
    _filled: Vec<std::net::TcpStream>,
}

impl FullListener {
    fn new() -> FullListener {
        unsafe {
            let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
            assert!(fd >= 0);
            let mut addr: libc::sockaddr_in = std::mem::zeroed();
            addr.sin_family = libc::AF_INET as libc::sa_family_t;
            addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
            let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
            assert_eq!(
                libc::bind(fd, &addr as *const _ as *const libc::sockaddr, len),
                0
            );
            assert_eq!(libc::listen(fd, 0), 0);
            let mut bound: libc::sockaddr_in = std::mem::zeroed();
            let mut blen = len;
            libc::getsockname(fd, &mut bound as *mut _ as *mut libc::sockaddr, &mut blen);
            let port = u16::from_be(bound.sin_port);
            let target = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            let mut filled = Vec::new();
            for _ in 0..16 {
                match std::net::TcpStream::connect_timeout(&target, Duration::from_millis(300)) {
                    Ok(s) => filled.push(s),
                    Err(_) => {
                        return FullListener {
                            fd,
                            port,
                            _filled: filled,
                        }
                    }
                }
            }
            panic!("a listener with backlog 0 kept accepting connections");
        }
    }
}

impl Drop for FullListener {
    fn drop(&mut self) {
        unsafe {
            libc::close(self.fd);
        }
    }
}
