//! Direct TLS (`sslnegotiation=direct`) clients the proxy refuses or times out: without ALPN
//! `postgresql`, with a broken or stalled ClientHello, silent or oversized after the
//! handshake. The proxy stays up and leaks no file descriptors. One test in its own binary
//! so the process's fd count is not disturbed by other tests. (Every client socket is dropped
//! explicitly: a shadowed binding would stay open, in CLOSE_WAIT, until the end of the test.)

mod support;

use std::time::{Duration, Instant};

use pgtwig_proxy::ProxyConfig;
use rustls::AlertDescription;
use support::pgtls::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TIMEOUT: Duration = Duration::from_millis(500);

/// Everything the proxy sends on a raw connection until it closes (a reset counts as closed).
async fn read_raw(s: &mut TcpStream) -> Vec<u8> {
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("the proxy did not close the connection");
    got
}

async fn direct_works(env: &Env, cfg: &std::sync::Arc<rustls::ClientConfig>) {
    let mut s = connect_direct(env.port, cfg.clone()).await.unwrap();
    startup(&mut s, "postgres").await;
    let msgs = simple_query(&mut s, "select branch from marker").await;
    assert_eq!(data_rows(&msgs), vec![vec![Some("main".to_string())]]);
    terminate(&mut s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_direct_tls_clients_leak_nothing() {
    let tls_dir = tempfile::tempdir().unwrap();
    let tls = pgtwig_proxy::load_or_create_tls(tls_dir.path()).unwrap();
    let env = Env::start(ProxyConfig {
        tls: Some(tls),
        startup_timeout: TIMEOUT,
        ..config()
    })
    .await;
    let cert = tls_dir.path().join("cert.pem");
    let good = client_config(&cert, &[ALPN]);
    // Warm up (lazily created runtime resources), then take the baseline.
    direct_works(&env, &good).await;
    env.wait_drained().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(env.proxy.pooled_connections(), 1);
    let baseline = fd_count();

    // No ALPN, and only other protocols: refused during the handshake with
    // no_application_protocol.
    for alpn in [&[][..], &[&b"h2"[..], b"http/1.1"][..]] {
        let e = connect_direct(env.port, client_config(&cert, alpn))
            .await
            .unwrap_err();
        assert_eq!(
            alert_received(&e),
            Some(AlertDescription::NoApplicationProtocol),
            "ALPN {alpn:?}: {e:?}"
        );
    }
    // The same refusal seen on the wire: one plaintext alert record, then EOF.
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&client_hello(hello_config(&[]))).await.unwrap();
    assert_eq!(
        read_raw(&mut s).await,
        [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120]
    );
    drop(s);

    // Starts like TLS but is not (a ClientHello of length 0): a TLS alert, never a
    // PostgreSQL ErrorResponse the client could not read.
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&[0x16, 0x03, 0x01, 0x00, 0x04, 0x01, 0x00, 0x00, 0x00])
        .await
        .unwrap();
    let got = read_raw(&mut s).await;
    assert_eq!(got.first(), Some(&0x15), "expected a TLS alert: {got:?}");
    drop(s);

    // Half a ClientHello, then silence: closed at the startup timeout, without a word.
    let hello = client_hello(hello_config(&[ALPN]));
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&hello[..hello.len() / 2]).await.unwrap();
    assert!(read_raw(&mut s).await.is_empty());
    let took = started.elapsed();
    drop(s);
    assert!(took >= TIMEOUT && took < Duration::from_secs(3), "{took:?}");
    // Gone after 3 bytes, half a ClientHello, or a whole one.
    for cut in [3, hello.len() / 2, hello.len()] {
        let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
        s.write_all(&hello[..cut]).await.unwrap();
        drop(s);
    }

    // Handshake done, then no startup packet: the timeout error arrives inside TLS.
    let started = Instant::now();
    let mut s = connect_direct(env.port, good.clone()).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    let f = error_fields(&msgs[0].1);
    assert_eq!(f[&b'C'], "08P01");
    assert_eq!(f[&b'M'], "timeout waiting for startup packet");
    drop(s);
    // Handshake done, then an oversized startup packet: the size limit holds inside TLS.
    let mut s = connect_direct(env.port, good.clone()).await.unwrap();
    s.write_all(&[0, 1, 0, 0, 0, 3, 0, 0]).await.unwrap();
    s.flush().await.unwrap();
    let msgs = read_messages(&mut s).await;
    let f = error_fields(&msgs[0].1);
    assert_eq!(f[&b'C'], "08P01");
    assert_eq!(f[&b'M'], "invalid length of startup packet");
    drop(s);
    // A second SSLRequest inside direct TLS (the first got `N`) is a protocol violation.
    let mut s = connect_direct(env.port, good.clone()).await.unwrap();
    let ssl = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    s.write_all(&ssl).await.unwrap();
    s.flush().await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&ssl).await.unwrap();
    s.flush().await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_fields(&msgs[0].1)[&b'C'], "08P01");
    drop(s);
    // Handshake done, then gone; and gone in the middle of the startup packet.
    drop(connect_direct(env.port, good.clone()).await.unwrap());
    let mut s = connect_direct(env.port, good.clone()).await.unwrap();
    s.write_all(&startup_packet("postgres")[..10])
        .await
        .unwrap();
    s.flush().await.unwrap();
    drop(s);
    // Many at once that vanish mid-handshake.
    let mut v = Vec::new();
    for _ in 0..30 {
        let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
        s.write_all(&hello[..hello.len() / 3]).await.unwrap();
        v.push(s);
    }
    drop(v);

    // Still up, and back to the baseline.
    direct_works(&env, &good).await;
    env.assert_nothing_leaked(baseline, "").await;
}
