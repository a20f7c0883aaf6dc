//! Clients see the server's real backend pid (only the cancel secret is proxy-made): the pid
//! in BackendKeyData is `pg_backend_pid()`, the pid of the session's own NOTIFYs, and what
//! `pg_terminate_backend` needs; cancel requests still reach the right backend, with and
//! without TLS, on fresh and reused server connections. Against real PostgreSQL 15 servers.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use pgtwig_proxy::ProxyConfig;
use support::pgtls::*;
use support::*;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

async fn tls_env() -> (Env, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        ..config()
    })
    .await;
    (env, dir)
}

/// A raw protocol connection through the proxy (TLS after SSLRequest when `tls_cert` is
/// given), past startup; returns it with the (pid, secret) of its BackendKeyData.
async fn raw_session(port: u16, tls_cert: Option<&Path>) -> (Box<dyn Io>, i32, i32) {
    let mut s: Box<dyn Io> = match tls_cert {
        Some(cert) => Box::new(
            connect_sslrequest(port, client_config(cert, &[]))
                .await
                .unwrap(),
        ),
        None => Box::new(
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .unwrap(),
        ),
    };
    let (pid, secret) = startup(&mut s, "postgres").await;
    (s, pid, secret)
}

/// The first column of the first row of `sql` on a raw connection.
async fn raw_value(s: &mut Box<dyn Io>, sql: &str) -> String {
    let msgs = simple_query(s, sql).await;
    data_rows(&msgs)
        .first()
        .and_then(|r| r[0].clone())
        .unwrap_or_else(|| panic!("no value from {sql}: {msgs:?}"))
}

/// Pids of the NotificationResponses among `msgs`, with their payloads.
fn notifications(msgs: &[(u8, Vec<u8>)]) -> Vec<(i32, String)> {
    msgs.iter()
        .filter(|(t, _)| *t == b'A')
        .map(|(_, b)| {
            let pid = i32::from_be_bytes(b[..4].try_into().unwrap());
            let mut parts = b[4..].split(|&c| c == 0);
            let _channel = parts.next();
            (
                pid,
                String::from_utf8_lossy(parts.next().unwrap()).into_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_carries_the_real_pid_fresh_and_reused_with_and_without_tls() {
    let (env, dir) = tls_env().await;
    let cert = dir.path().join("cert.pem");
    for tls in [None, Some(cert.as_path())] {
        let mut seen = Vec::new();
        for round in ["fresh", "reused"] {
            let what = format!("{round}, tls {}", tls.is_some());
            let (mut s, pid, secret) = raw_session(env.port, tls).await;
            assert_eq!(
                raw_value(&mut s, "select pg_backend_pid()").await,
                pid.to_string(),
                "{what}"
            );
            // The session's own NOTIFY carries that pid: self-filtering works.
            let msgs = simple_query(&mut s, "listen c; notify c, 'mine'").await;
            assert_eq!(notifications(&msgs), [(pid, "mine".to_string())], "{what}");
            terminate(&mut s).await;
            seen.push((pid, secret));
            env.wait_pooled(1).await;
        }
        assert_eq!(
            seen[0].0, seen[1].0,
            "the second session reused the first's server"
        );
        assert_ne!(
            seen[0].1, seen[1].1,
            "a reused connection gets a new secret"
        );
        // Forget the parked connection so the TLS round starts fresh.
        env.proxy.release_pooled(&env.main.addr());
    }
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_pids_tell_own_from_other_sessions() {
    let env = Env::start(config()).await;
    let (mut a, a_pid, _) = raw_session(env.port, None).await;
    let (mut b, b_pid, _) = raw_session(env.port, None).await;
    assert_ne!(a_pid, b_pid);
    simple_query(&mut a, "listen c").await;
    simple_query(&mut b, "notify c, 'from b'").await;
    let msgs = simple_query(&mut a, "notify c, 'from a'").await;
    let got = notifications(&msgs);
    assert_eq!(
        got,
        [(b_pid, "from b".to_string()), (a_pid, "from a".to_string())]
    );
    terminate(&mut a).await;
    terminate(&mut b).await;
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_backend_by_the_pid_the_client_was_given() {
    let env = Env::start(config()).await;
    let (mut a, a_pid, _) = raw_session(env.port, None).await;
    let (mut b, _, _) = raw_session(env.port, None).await;
    let (mut c, c_pid, _) = raw_session(env.port, None).await;
    // b ends a by the pid a was told.
    assert_eq!(
        raw_value(&mut b, &format!("select pg_terminate_backend({a_pid})")).await,
        "t"
    );
    let msgs = read_messages(&mut a).await;
    let e = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .unwrap_or_else(|| panic!("a was not terminated: {msgs:?}"));
    assert_eq!(error_fields(&e.1)[&b'C'], "57P01");
    // c ends itself the way apps do with their own backend pid.
    c.write_all(&query_packet(&format!(
        "select pg_terminate_backend({c_pid})"
    )))
    .await
    .unwrap();
    let msgs = read_messages(&mut c).await;
    assert!(
        msgs.iter()
            .any(|(t, b)| *t == b'E' && error_fields(b)[&b'C'] == "57P01"),
        "{msgs:?}"
    );
    // Nothing else was hit: b still works, and the server has exactly b left.
    assert_eq!(raw_value(&mut b, "select 1").await, "1");
    assert_eq!(
        env.main.psql(
            "select count(*) from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid()"
        ),
        "1"
    );
    terminate(&mut b).await;
    env.wait_drained().await;
}

async fn wait_for_query(env: &Env, sql: &str) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let pid = env.main.psql(&format!(
            "select pid from pg_stat_activity where query = '{sql}' and state = 'active'"
        ));
        if !pid.is_empty() {
            return pid.parse().unwrap();
        }
        assert!(Instant::now() < deadline, "{sql} never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokio_postgres_cancel_fresh_and_reused_with_and_without_tls() {
    let (env, dir) = tls_env().await;
    let cert = dir.path().join("cert.pem");
    let rustls_cfg = (*client_config(&cert, &[])).clone();
    for tls in [false, true] {
        let mut pids = Vec::new();
        for round in ["fresh", "reused"] {
            let what = format!("{round}, tls {tls}");
            let conninfo = format!(
                "host=localhost port={} user=postgres dbname=postgres sslmode={}",
                env.port,
                if tls { "require" } else { "disable" }
            );
            let connector = tokio_postgres_rustls::MakeRustlsConnect::new(rustls_cfg.clone());
            let (client, conn) = if tls {
                let (c, conn) = tokio_postgres::connect(&conninfo, connector.clone())
                    .await
                    .unwrap();
                (c, tokio::spawn(conn))
            } else {
                let (c, conn) = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls)
                    .await
                    .unwrap();
                (c, tokio::spawn(conn))
            };
            let token = client.cancel_token();
            let sql = "select pg_sleep(60)";
            let sleeper = tokio::spawn(async move { (client.simple_query(sql).await, client) });
            pids.push(wait_for_query(&env, sql).await);
            if tls {
                token.cancel_query(connector).await.unwrap();
            } else {
                token.cancel_query(tokio_postgres::NoTls).await.unwrap();
            }
            let (r, client) = tokio::time::timeout(Duration::from_secs(10), sleeper)
                .await
                .unwrap_or_else(|_| panic!("{what}: not cancelled"))
                .unwrap();
            assert_eq!(code(&r.unwrap_err()), "57014", "{what}");
            assert_eq!(simple_value(&client, "select 1").await, "1", "{what}");
            drop(client);
            conn.await.unwrap().unwrap();
            env.wait_pooled(1).await;
        }
        assert_eq!(
            pids[0], pids[1],
            "tls {tls}: the second session was not reused"
        );
        env.proxy.release_pooled(&env.main.addr());
    }
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_ctrl_c_fresh_and_reused_with_and_without_tls() {
    let (env, _dir) = tls_env().await;
    for sslmode in ["disable", "require"] {
        let mut pids = Vec::new();
        for round in ["fresh", "reused"] {
            let sql = "select pg_sleep(60)";
            let child = tokio::process::Command::new("psql")
                .arg(format!(
                    "host=127.0.0.1 port={} user=postgres dbname=postgres sslmode={sslmode}",
                    env.port
                ))
                .args(["-X", "-c", sql])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            pids.push(wait_for_query(&env, sql).await);
            unsafe {
                libc::kill(child.id().unwrap() as i32, libc::SIGINT);
            }
            let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
                .await
                .unwrap_or_else(|_| panic!("{sslmode}, {round}: psql did not end after SIGINT"))
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(
                stderr.contains("canceling statement due to user request"),
                "{sslmode}, {round}: {stderr}"
            );
            env.wait_pooled(1).await;
        }
        assert_eq!(
            pids[0], pids[1],
            "{sslmode}: the second psql was not reused"
        );
        env.proxy.release_pooled(&env.main.addr());
    }
    env.wait_drained().await;
}

/// libpq 17's cancel API (psycopg's `cancel_safe`) sends the CancelRequest inside TLS and
/// reads until the stream ends: the proxy must end it with a close_notify, as PostgreSQL
/// does, not a bare TCP close ("SSL error: unexpected eof while reading").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_request_inside_tls_is_forwarded_and_closed_cleanly() {
    let (env, dir) = tls_env().await;
    let cert = dir.path().join("cert.pem");
    let (mut s, pid, secret) = raw_session(env.port, Some(&cert)).await;
    let sql = "select pg_sleep(60)";
    s.write_all(&query_packet(sql)).await.unwrap();
    wait_for_query(&env, sql).await;
    let mut canceller = connect_sslrequest(env.port, client_config(&cert, &[]))
        .await
        .unwrap();
    let mut req = bytes::BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(pid, secret, &mut req);
    canceller.write_all(&req).await.unwrap();
    canceller.flush().await.unwrap();
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), canceller.read_to_end(&mut rest))
        .await
        .expect("the proxy did not close the cancel connection");
    assert!(
        end.is_ok() && rest.is_empty(),
        "cancel connection ended with {end:?}, {rest:?}"
    );
    let msgs = tokio::time::timeout(Duration::from_secs(10), read_until_ready(&mut s))
        .await
        .expect("the query was not cancelled");
    assert!(
        msgs.iter()
            .any(|(t, b)| *t == b'E' && error_fields(b)[&b'C'] == "57014"),
        "{msgs:?}"
    );
    terminate(&mut s).await;
    env.wait_drained().await;
}

/// Fake servers whose BackendKeyData body is not protocol 3.0's 8 bytes (none, short, long,
/// a protocol 3.2 key of 256 bytes): each ends the session with 08P01, no key passed on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_backend_key_data_is_a_protocol_error() {
    let env = Env::start(config()).await;
    for body_len in [0usize, 4, 7, 9, 12, 260] {
        let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = fake.local_addr().unwrap().port();
        env.router.branches.lock().unwrap().insert(
            "fake".into(),
            Ok(pgtwig_proxy::UpstreamAddr::Tcp {
                host: "127.0.0.1".into(),
                port,
            }),
        );
        let server = tokio::spawn(async move {
            let (mut s, _) = fake.accept().await.unwrap();
            let mut len = [0u8; 4];
            s.read_exact(&mut len).await.unwrap();
            let mut body = vec![0u8; u32::from_be_bytes(len) as usize - 4];
            s.read_exact(&mut body).await.unwrap();
            let mut out = vec![b'R', 0, 0, 0, 8, 0, 0, 0, 0];
            out.push(b'K');
            out.extend_from_slice(&(body_len as u32 + 4).to_be_bytes());
            out.extend((0..body_len).map(|i| i as u8 | 1));
            out.extend_from_slice(b"Z\0\0\0\x05I");
            s.write_all(&out).await.unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest).await;
        });
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
            .await
            .unwrap();
        s.write_all(&startup_packet("postgres@fake")).await.unwrap();
        let msgs = read_messages(&mut s).await;
        // The bad key is not passed on; the session ends with a FATAL error (what came before
        // it in the same read, AuthenticationOk here, may be dropped with it).
        assert!(msgs.iter().all(|m| m.0 != b'K'), "{body_len}: {msgs:?}");
        let last = msgs
            .last()
            .unwrap_or_else(|| panic!("{body_len}: nothing from the proxy"));
        assert_eq!(last.0, b'E', "{body_len}: {msgs:?}");
        let e = error_fields(&last.1);
        assert_eq!(e[&b'C'], "08P01", "{body_len}");
        assert!(e[&b'D'].contains("BackendKeyData"), "{body_len}: {e:?}");
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the proxy did not close the server connection")
            .unwrap();
        env.wait_drained().await;
    }
}
