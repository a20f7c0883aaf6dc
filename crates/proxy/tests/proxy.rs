//! End-to-end tests of the proxy against real PostgreSQL 15 servers.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use pgtwig_proxy::{ProxyConfig, RouteError, UpstreamAddr};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_pgbench_and_tokio_postgres_reach_the_active_branch() {
    let env = Env::start(config()).await;

    assert_eq!(
        env.psql_ok("dbname=postgres", "select branch from marker")
            .await,
        "main"
    );
    env.wait_drained().await;

    let (client, conn) = env.connect("postgres").await;
    let row = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "main");
    // Startup parameters pass through unchanged.
    let (client2, conn2) = {
        let (c, conn) = tokio_postgres::connect(
            &format!(
                "{} application_name=twigtest options='-c work_mem=7MB'",
                env.conninfo("postgres")
            ),
            tokio_postgres::NoTls,
        )
        .await
        .unwrap();
        (c, tokio::spawn(conn))
    };
    let row = client2
        .query_one(
            "select current_setting('application_name'), current_setting('work_mem')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "twigtest");
    assert_eq!(row.get::<_, String>(1), "7MB");
    let sessions = env.proxy.sessions();
    assert_eq!(sessions.len(), 2);
    assert!(sessions
        .iter()
        .all(|s| s.branch == "main" && !s.pinned && !s.in_transaction));
    assert!(sessions
        .iter()
        .any(|s| s.application_name.as_deref() == Some("twigtest")));
    client.batch_execute("begin").await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        env.proxy
            .sessions()
            .iter()
            .filter(|s| s.in_transaction)
            .count(),
        1
    );
    client.batch_execute("rollback").await.unwrap();
    drop(client);
    drop(client2);
    conn.await.unwrap().unwrap();
    conn2.await.unwrap().unwrap();

    // pgbench: initialise and run through the proxy.
    let pgbench = |args: &[&str]| {
        let mut cmd = tokio::process::Command::new("pgbench");
        cmd.args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.port.to_string(),
            "-U",
            "postgres",
        ]);
        cmd.args(args);
        cmd.arg("postgres");
        cmd.output()
    };
    let out = pgbench(&["-i", "-s", "1", "-q"]).await.unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = pgbench(&["-c", "4", "-j", "2", "-T", "2"]).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let processed: u64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(processed > 50, "{stdout}");
    // The data landed on main only.
    assert_eq!(
        env.main.psql("select count(*) from pgbench_history"),
        processed.to_string()
    );
    assert_eq!(
        env.feature
            .psql("select count(*) from pg_tables where tablename = 'pgbench_history'"),
        "0"
    );
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_database_name_goes_to_that_branch() {
    let env = Env::start(config()).await;
    assert_eq!(
        env.psql_ok(
            "dbname=postgres@feature",
            "select branch, current_database() from marker"
        )
        .await,
        "feature|postgres"
    );

    let (pinned, pinned_conn) = env.connect("postgres@feature").await;
    let (pinned_main, _c) = env.connect("postgres@main").await;
    assert_eq!(env.proxy.sessions().iter().filter(|s| s.pinned).count(), 2);
    assert!(env
        .proxy
        .sessions()
        .iter()
        .all(|s| s.database.as_deref() == Some("postgres")));
    // A switch does not touch pinned sessions, whichever branch they are on.
    env.active.send("feature".into()).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = pinned
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "feature");
    let r = pinned_main
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "main");
    assert!(!pinned_conn.is_finished());
    // A pin to a branch that does not exist.
    let err = tokio_postgres::connect(&env.conninfo("postgres@nope"), tokio_postgres::NoTls)
        .await
        .err()
        .unwrap();
    assert_eq!(code(&err), "3D000");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_errors_reach_the_client_with_sqlstates() {
    let env = Env::start(config()).await;
    {
        let mut b = env.router.branches.lock().unwrap();
        b.insert(
            "broken".into(),
            Err(RouteError::StartFailed {
                branch: "broken".into(),
                detail: "see /var/log/broken.log".into(),
            }),
        );
        b.insert(
            "weird".into(),
            Err(RouteError::Other("something odd".into())),
        );
        b.insert(
            "gone".into(),
            Ok(UpstreamAddr::Unix(
                "/tmp/pgtwig-no-such-dir/.s.PGSQL.1".into(),
            )),
        );
    }
    for (branch, want) in [
        ("nope", "3D000"),
        ("broken", "57P03"),
        ("weird", "XX000"),
        ("gone", "08006"),
    ] {
        let err = tokio_postgres::connect(
            &env.conninfo(&format!("postgres@{branch}")),
            tokio_postgres::NoTls,
        )
        .await
        .err()
        .unwrap_or_else(|| panic!("{branch} connected"));
        assert_eq!(code(&err), want, "{branch}: {err}");
        let db = err.as_db_error().unwrap();
        match branch {
            "nope" => assert_eq!(
                db.hint(),
                Some("create it with `pgtwig branch create nope`")
            ),
            "broken" => assert_eq!(db.detail(), Some("see /var/log/broken.log")),
            "gone" => assert!(
                db.detail().unwrap().contains("pgtwig-no-such-dir"),
                "{db:?}"
            ),
            _ => {}
        }
    }
    // The active branch missing: psql prints the message and hint.
    env.router.branches.lock().unwrap().remove("main");
    let out = env.psql("dbname=postgres", "select 1").await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("database branch \"main\" does not exist"),
        "{stderr}"
    );
    assert!(stderr.contains("pgtwig branch create main"), "{stderr}");
    assert_eq!(env.router.calls.load(Ordering::SeqCst), 5);
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_the_proxy_with_tokio_postgres() {
    let env = Env::start(config()).await;
    let (client, _conn) = env.connect("postgres").await;
    let token = client.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(60)").await;
        (r, client)
    });
    // Wait until the query runs on main.
    let main = &env.main;
    let deadline = Instant::now() + Duration::from_secs(10);
    while main.psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'")
        != "1"
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (r, client) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .unwrap()
        .unwrap();
    let err = r.expect_err("query should be cancelled");
    assert_eq!(code(&err), "57014");
    assert!(started.elapsed() < Duration::from_secs(20));
    // The session is still usable.
    let r = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "main");
    assert_eq!(env.proxy.cancel_keys(), 1);
    drop(client);
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_through_the_proxy_with_psql_sigint() {
    let env = Env::start(config()).await;
    let child = tokio::process::Command::new("psql")
        .arg(env.conninfo("postgres"))
        .args(["-X", "-c", "select pg_sleep(60)"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .main
        .psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'")
        != "1"
    {
        assert!(Instant::now() < deadline, "psql's query never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    unsafe {
        libc::kill(child.id().unwrap() as i32, libc::SIGINT);
    }
    let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
        .await
        .expect("psql did not end after SIGINT")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_with_sslmode_require() {
    let tls_dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(tls_dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        ..config()
    })
    .await;
    assert_eq!(
        env.psql_ok(
            "dbname=postgres sslmode=require",
            "select branch from marker"
        )
        .await,
        "main"
    );
    let out = env
        .psql("dbname=postgres sslmode=require", "\\conninfo")
        .await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("SSL connection (protocol: TLSv1.3"),
        "{stdout}"
    );
    // verify-ca against the generated certificate works too.
    let cert = tls_dir.path().join("cert.pem");
    assert_eq!(
        env.psql_ok(
            &format!(
                "dbname=postgres@feature sslmode=verify-full sslrootcert={}",
                cert.display()
            ),
            "select branch from marker"
        )
        .await,
        "feature"
    );
    // Without TLS on the client side the proxy still serves plain connections.
    env.psql_ok("dbname=postgres sslmode=disable", "select 1")
        .await;

    // tokio-postgres over rustls, trusting the generated certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &std::fs::read(&cert).unwrap()[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let client_cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tls = tokio_postgres_rustls::MakeRustlsConnect::new(client_cfg.clone());
    let (client, conn) = tokio_postgres::connect(
        &format!(
            "host=localhost port={} user=postgres dbname=postgres sslmode=require",
            env.port
        ),
        tls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    let r = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "main");
    // A larger result through TLS.
    let r = client
        .query_one(
            "select sum(length(repeat('x', g))) from generate_series(1, 2000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(r.get::<_, i64>(0), 2001000);
    let rows = client
        .query("select repeat('y', 10000) from generate_series(1, 50)", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 50);
    // Cancel over TLS: SSLRequest, then the CancelRequest inside TLS.
    let token = client.cancel_token();
    let sleeper =
        tokio::spawn(async move { (client.simple_query("select pg_sleep(30)").await, client) });
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .main
        .psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'")
        != "1"
    {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    token
        .cancel_query(tokio_postgres_rustls::MakeRustlsConnect::new(client_cfg))
        .await
        .unwrap();
    let (r, client) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code(&r.unwrap_err()), "57014");
    // (Simple protocol: an extended-protocol query would leave tokio-postgres sending an
    // asynchronous Close for its statement, racing with the FATAL below.)
    client.batch_execute("select 1").await.unwrap();
    // Switching closes TLS sessions the same way.
    env.active.send("feature".into()).unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(code(&err), "57P01", "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_negotiation_and_encryption_requests() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start(config()).await;
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    // GSSENCRequest → N, SSLRequest (no TLS configured) → N.
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap();
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    // Protocol 3.2 with a _pq_ option, as a PG18 client may send.
    let mut body = Vec::new();
    body.extend_from_slice(&((3u32 << 16) | 2).to_be_bytes());
    for (k, v) in [
        ("user", "postgres"),
        ("database", "postgres"),
        ("_pq_.something", "on"),
    ] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    s.write_all(&((body.len() + 4) as u32).to_be_bytes())
        .await
        .unwrap();
    s.write_all(&body).await.unwrap();
    // Read until ReadyForQuery.
    let mut got = Vec::new();
    let msgs = loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
        let msgs = split_messages(&got);
        if msgs.iter().any(|(t, _)| *t == b'Z') {
            break msgs;
        }
    };
    assert_eq!(msgs[0].0, b'v', "NegotiateProtocolVersion first");
    let v = &msgs[0].1;
    assert_eq!(&v[..4], &0u32.to_be_bytes(), "minor version 0");
    assert_eq!(&v[4..8], &1u32.to_be_bytes());
    assert_eq!(&v[8..], b"_pq_.something\0");
    assert_eq!(msgs[1].0, b'R');
    let k = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    assert_eq!(k.1.len(), 8);
    // The pid the client sees is the server's own (only the secret is proxy-made).
    let pid = u32::from_be_bytes(k.1[..4].try_into().unwrap());
    let real: Vec<String> = env
        .main
        .psql("select pid from pg_stat_activity where backend_type = 'client backend'")
        .lines()
        .map(str::to_string)
        .collect();
    assert!(real.contains(&pid.to_string()), "{pid} is not in {real:?}");
    assert_eq!(msgs.last().unwrap(), &(b'Z', b"I".to_vec()));
    // A query on the raw connection, then Terminate.
    let sql = b"select branch from marker\0";
    let mut q = vec![b'Q'];
    q.extend_from_slice(&((sql.len() + 4) as u32).to_be_bytes());
    q.extend_from_slice(sql);
    s.write_all(&q).await.unwrap();
    let mut got = Vec::new();
    loop {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        got.extend_from_slice(&chunk[..n]);
        if split_messages(&got).iter().any(|(t, _)| *t == b'Z') {
            break;
        }
    }
    let row = split_messages(&got)
        .into_iter()
        .find(|(t, _)| *t == b'D')
        .unwrap();
    assert!(row.1.ends_with(b"main"));
    s.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .unwrap()
        .unwrap();
    assert!(rest.is_empty());
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_going_away_gives_the_client_an_error() {
    let env = Env::start(config()).await;
    let (client, conn) = env.connect("postgres").await;
    client.query_one("select 1", &[]).await.unwrap();
    // Kill the backend from another session: Postgres sends FATAL 57P01 itself.
    env.main.psql("select pg_terminate_backend(pid) from pg_stat_activity where backend_type = 'client backend' and pid <> pg_backend_pid()");
    let err = tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .unwrap()
        .unwrap()
        .unwrap_err();
    assert_eq!(err.as_db_error().unwrap().code().code(), "57P01");
    env.wait_drained().await;
}

/// A client may send its first messages right behind the startup packet without waiting for
/// the greeting, as PostgreSQL's own receive buffer allows: the proxy reads them with the
/// startup packet and relays them after it, to a new server connection and to a parked one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_sent_with_the_startup_packet_are_relayed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start(config()).await;
    for round in ["new server connection", "parked server connection"] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
            .await
            .unwrap();
        let mut together = pgtls::startup_packet("postgres");
        together.extend(pgtls::query_packet("select branch from marker"));
        together.extend(pgtls::query_packet("select 40 + 2"));
        s.write_all(&together).await.unwrap();
        // The greeting and both answers: three ReadyForQuery.
        let mut got = Vec::new();
        let answers = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                let msgs = split_messages(&got);
                if msgs.iter().filter(|(t, _)| *t == b'Z').count() == 3 {
                    return msgs;
                }
                let mut chunk = [0u8; 8192];
                let n = s.read(&mut chunk).await.unwrap();
                assert!(n > 0, "{round}: closed after {msgs:?}");
                got.extend_from_slice(&chunk[..n]);
            }
        })
        .await
        .expect("the greeting and two answers within 10 s");
        assert_eq!(
            answers.first().map(|m| m.0),
            Some(b'R'),
            "{round}: {answers:?}"
        );
        assert_eq!(
            pgtls::data_rows(&answers),
            [[Some("main".to_string())], [Some("42".to_string())]],
            "{round}"
        );
        s.write_all(&pgtls::terminate_packet()).await.unwrap();
        let mut rest = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        env.wait_drained().await;
        env.wait_pooled(1).await;
    }
}

/// A router that handed out the socket of a server stopped since (a cache) hears so from
/// `Router::unreachable` and routes the session once more: the client never sees the stale
/// address, whether its socket file is gone or left behind refusing connections. A router
/// that knows nothing better leaves the client with 08006.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_route_is_routed_again_once() {
    let env = Env::start(config()).await;
    let dir = tempfile::tempdir().unwrap();
    let refusing = dir.path().join(".s.PGSQL.1");
    drop(std::os::unix::net::UnixListener::bind(&refusing).unwrap());
    let gone = dir.path().join("gone/.s.PGSQL.1");
    for stale in [&gone, &refusing] {
        env.router
            .stale
            .lock()
            .unwrap()
            .insert("main".to_string(), UpstreamAddr::Unix(stale.to_path_buf()));
        let calls = env.router.calls.load(Ordering::SeqCst);
        let (client, _conn) = env.connect("postgres").await;
        assert_eq!(
            simple_value(&client, "select branch from marker").await,
            "main"
        );
        assert_eq!(
            env.router.calls.load(Ordering::SeqCst),
            calls + 2,
            "{stale:?}"
        );
        assert!(env.router.stale.lock().unwrap().is_empty());
    }
    // Not forgotten (the real address is unreachable too): one error, no loop.
    env.router
        .branches
        .lock()
        .unwrap()
        .insert("main".to_string(), Ok(UpstreamAddr::Unix(gone.clone())));
    let calls = env.router.calls.load(Ordering::SeqCst);
    let err = tokio_postgres::connect(&env.conninfo("postgres"), tokio_postgres::NoTls)
        .await
        .err()
        .expect("no server there");
    assert_eq!(code(&err), "08006", "{err}");
    assert_eq!(env.router.calls.load(Ordering::SeqCst), calls + 1);
}
