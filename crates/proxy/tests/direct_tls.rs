//! PostgreSQL 17's `sslnegotiation=direct` (a TLS ClientHello instead of an SSLRequest) and
//! ALPN `postgresql` on both TLS paths, against real PostgreSQL 15 servers. There is no
//! PG17 libpq here, so the direct client is rustls with ALPN plus protocol messages from
//! postgres-protocol (tests/support/pgtls.rs); psql 15 and tokio-postgres cover the
//! SSLRequest path without ALPN.

mod support;

use std::time::{Duration, Instant};

use pgtwig_proxy::ProxyConfig;
use rustls::AlertDescription;
use support::pgtls::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn tls_env() -> (tempfile::TempDir, Env) {
    let tls_dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(tls_dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        ..config()
    })
    .await;
    (tls_dir, env)
}

fn has_complete(msgs: &[(u8, Vec<u8>)], tag: &[u8]) -> bool {
    msgs.iter()
        .any(|(t, b)| *t == b'C' && b.strip_suffix(b"\0") == Some(tag))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_tls_with_alpn_like_libpq_17() {
    let (tls_dir, env) = tls_env().await;
    let cert = tls_dir.path().join("cert.pem");
    let cfg = client_config(&cert, &[ALPN]);

    // ClientHello first, no SSLRequest; the certificate verifies for "localhost".
    let mut s = connect_direct(env.port, cfg.clone()).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN));
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let (pid, secret) = startup(&mut s, "postgres").await;
    let msgs = simple_query(&mut s, "select 1").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("1".to_string())]]);
    assert!(has_complete(&msgs, b"SELECT 1"), "{msgs:?}");
    assert_eq!(msgs.last().unwrap(), &(b'Z', b"I".to_vec()));
    let msgs = simple_query(&mut s, "select branch from marker").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("main".to_string())]]);
    let sessions = env.proxy.sessions();
    assert_eq!(sessions.len(), 1);
    assert_eq!(sessions[0].application_name.as_deref(), Some("pg17-direct"));
    assert_eq!(sessions[0].branch, "main");

    // A pinned database name over direct TLS; after the handshake an SSLRequest and a
    // GSSENCRequest each get `N`, as from PostgreSQL 17 (TLS is already in use).
    let mut p = connect_direct(env.port, cfg.clone()).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    postgres_protocol::message::frontend::ssl_request(&mut buf);
    const GSSENC_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    for request in [&buf[..], &GSSENC_REQUEST] {
        p.write_all(request).await.unwrap();
        p.flush().await.unwrap();
        let mut answer = [0u8; 1];
        p.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"N");
    }
    startup(&mut p, "postgres@feature").await;
    let msgs = simple_query(&mut p, "select branch from marker").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("feature".to_string())]]);
    terminate(&mut p).await;

    // Cancel the way libpq 17 sends it with sslnegotiation=direct: a new direct TLS
    // connection carrying the CancelRequest with the proxy-made key.
    s.write_all(&query_packet("select pg_sleep(30)"))
        .await
        .unwrap();
    s.flush().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while env
        .main
        .psql("select count(*) from pg_stat_activity where query = 'select pg_sleep(30)'")
        != "1"
    {
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    let mut c = connect_direct(env.port, cfg.clone()).await.unwrap();
    c.write_all(&cancel_packet(pid, secret)).await.unwrap();
    c.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut rest))
        .await
        .expect("the proxy keeps a cancel connection open");
    assert!(rest.is_empty());
    let msgs = read_until_ready(&mut s).await;
    let err = msgs
        .iter()
        .find(|(t, _)| *t == b'E')
        .unwrap_or_else(|| panic!("no error after the cancel: {msgs:?}"));
    assert_eq!(error_fields(&err.1)[&b'C'], "57014");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The session carries on, then ends cleanly.
    let msgs = simple_query(&mut s, "select 2").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("2".to_string())]]);
    terminate(&mut s).await;
    env.wait_drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_on_the_sslrequest_path_and_clients_without_it() {
    let (tls_dir, env) = tls_env().await;
    let cert = tls_dir.path().join("cert.pem");

    // A client offering ALPN after SSLRequest gets "postgresql" back, as from PostgreSQL 17.
    let mut s = connect_sslrequest(env.port, client_config(&cert, &[ALPN]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN));
    startup(&mut s, "postgres").await;
    let msgs = simple_query(&mut s, "select 1").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("1".to_string())]]);
    terminate(&mut s).await;

    // One offering no ALPN (libpq before 17, most drivers) is accepted as before.
    let mut s = connect_sslrequest(env.port, client_config(&cert, &[]))
        .await
        .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), None);
    startup(&mut s, "postgres").await;
    let msgs = simple_query(&mut s, "select branch from marker").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("main".to_string())]]);
    terminate(&mut s).await;

    // Offering other protocols too: "postgresql" is chosen, directly and after SSLRequest.
    let both = client_config(&cert, &[b"h2", ALPN]);
    let mut s = connect_direct(env.port, both.clone()).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN));
    startup(&mut s, "postgres").await;
    terminate(&mut s).await;
    let mut s = connect_sslrequest(env.port, both).await.unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(ALPN));
    startup(&mut s, "postgres").await;
    terminate(&mut s).await;

    // Offering only other protocols after SSLRequest: no_application_protocol, as
    // PostgreSQL 17's ALPN callback answers.
    let e = connect_sslrequest(env.port, client_config(&cert, &[b"h2"]))
        .await
        .unwrap_err();
    assert_eq!(
        alert_received(&e),
        Some(AlertDescription::NoApplicationProtocol),
        "{e:?}"
    );

    // psql 15 (libpq 15: SSLRequest, no ALPN) with sslmode=require.
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

    // tokio-postgres over rustls with sslmode=require, without and with ALPN.
    for alpn in [&[][..], &[ALPN][..]] {
        let tls =
            tokio_postgres_rustls::MakeRustlsConnect::new((*client_config(&cert, alpn)).clone());
        let (client, conn) = tokio_postgres::connect(
            &format!(
                "host=localhost port={} user=postgres dbname=postgres@feature sslmode=require",
                env.port
            ),
            tls,
        )
        .await
        .unwrap();
        let conn = tokio::spawn(conn);
        assert_eq!(
            simple_value(&client, "select branch from marker").await,
            "feature"
        );
        drop(client);
        conn.await.unwrap().unwrap();
    }
    env.wait_drained().await;
}
