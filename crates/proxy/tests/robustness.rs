//! Bad clients: malformed, oversized, silent and vanishing ones. The proxy answers with an
//! ErrorResponse where it can, stays up, and leaks no file descriptors. One test in its own
//! binary so the process's fd count is not disturbed by other tests.

mod support;

use std::time::{Duration, Instant};

use pgtwig_proxy::ProxyConfig;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn expect_error(env: &Env, send: &[u8]) -> std::collections::HashMap<u8, String> {
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(send).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(
        msgs.len(),
        1,
        "expected exactly one ErrorResponse, got {msgs:?}"
    );
    assert_eq!(msgs[0].0, b'E');
    error_fields(&msgs[0].1)
}

fn startup(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut p = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    p.extend(body);
    p
}

async fn proxy_works(env: &Env) {
    let (client, _conn) = env.connect("postgres").await;
    let r = client
        .query_one("select branch from marker", &[])
        .await
        .unwrap();
    assert_eq!(r.get::<_, String>(0), "main");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_clients_get_errors_and_leak_nothing() {
    let env = Env::start(ProxyConfig {
        startup_timeout: Duration::from_millis(500),
        ..config()
    })
    .await;
    // Warm up (lazily created runtime resources), then take the baseline.
    proxy_works(&env).await;
    env.wait_drained().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(env.proxy.pooled_connections(), 1);
    let baseline = fd_count();
    let baseline_fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .map(|e| format!("{:?}", std::fs::read_link(e.unwrap().path())))
        .collect();

    // Length word too small, too large, and an HTTP request (whose "length" is huge).
    for bad in [
        &[0u8, 0, 0, 3, 1, 2, 3, 4][..],
        &[0, 0, 0x4e, 0x21, 0, 3, 0, 0],
        b"GET / HTTP/1.1\r\n\r\n",
    ] {
        let f = expect_error(&env, bad).await;
        assert_eq!(f[&b'C'], "08P01", "{f:?}");
        assert_eq!(f[&b'M'], "invalid length of startup packet");
    }
    // Oversized but well-formed startup packet (above the 10 000-byte cap).
    let big = "x".repeat(12_000);
    let f = expect_error(
        &env,
        &startup(3 << 16, &[("user", "postgres"), ("options", &big)]),
    )
    .await;
    assert_eq!(f[&b'C'], "08P01");
    // Malformed parameter list.
    let mut p = startup(3 << 16, &[("user", "postgres")]);
    let n = p.len();
    p[n - 1] = b'x';
    let f = expect_error(&env, &p).await;
    assert_eq!(f[&b'C'], "08P01", "{f:?}");
    assert!(
        f[&b'M'].starts_with("invalid startup packet layout"),
        "{f:?}"
    );
    // Unsupported protocol version.
    let f = expect_error(&env, &startup(2 << 16, &[("user", "postgres")])).await;
    assert_eq!(f[&b'C'], "0A000");
    // A second SSLRequest after the first was refused.
    let ssl = [0u8, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&ssl).await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N");
    s.write_all(&ssl).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_fields(&msgs[0].1)[&b'C'], "08P01");
    drop(s);

    // Plaintext sent behind an SSLRequest, before its answer: refused once the request is
    // answered, as PostgreSQL does (it came before the encryption it asked for).
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    let mut behind = ssl.to_vec();
    behind.extend(startup(3 << 16, &[("user", "postgres")]));
    s.write_all(&behind).await.unwrap();
    let mut b = [0u8; 1];
    s.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"N", "the request is answered first");
    let msgs = read_messages(&mut s).await;
    let f = error_fields(&msgs.last().expect("an ErrorResponse").1);
    assert_eq!(f[&b'C'], "08P01", "{msgs:?}");
    assert_eq!(f[&b'M'], "received unencrypted data after SSL request");
    drop(s);

    // A client that sends nothing times out with an error.
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let f = error_fields(&msgs[0].1);
    assert_eq!(f[&b'C'], "08P01");
    assert_eq!(f[&b'M'], "timeout waiting for startup packet");
    drop(s);
    // One that sends half a startup packet and stalls times out too.
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    let p = startup(3 << 16, &[("user", "postgres")]);
    s.write_all(&p[..6]).await.unwrap();
    let msgs = read_messages(&mut s).await;
    assert_eq!(error_fields(&msgs[0].1)[&b'C'], "08P01");
    drop(s);

    // Clients that disconnect mid-startup, at every stage.
    for cut in [0, 2, 4, 6, p.len() - 1] {
        let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
        s.write_all(&p[..cut]).await.unwrap();
        drop(s);
    }
    // A direct TLS ClientHello (PG17 sslnegotiation=direct) while TLS is not configured:
    // closed without a word, as PostgreSQL 17 with ssl=off does — no plaintext
    // ErrorResponse a TLS client could not read.
    let hello = pgtls::client_hello(pgtls::hello_config(&[pgtls::ALPN]));
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&hello).await.unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .expect("a direct TLS connection without TLS configured is closed");
    assert!(got.is_empty(), "{got:?}");
    drop(s);
    // SSLRequest then gone; TLS is not configured so 'N' then EOF.
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&ssl).await.unwrap();
    drop(s);
    // Gone after authentication, in the middle of a query, and in the middle of a message.
    {
        let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
        s.write_all(&startup(
            3 << 16,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await
        .unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await.unwrap();
        s.write_all(b"Q\0\0\0\x19select pg_sleep(0.2)\0")
            .await
            .unwrap();
        s.write_all(b"Q\0\0\0\x40sel").await.unwrap();
        drop(s);
    }
    // Garbage after authentication: a message with an invalid length.
    {
        let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
        s.write_all(&startup(
            3 << 16,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await
        .unwrap();
        let mut got = Vec::new();
        while !split_messages(&got).iter().any(|(t, _)| *t == b'Z') {
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            got.extend_from_slice(&buf[..n]);
        }
        s.write_all(&[b'Q', 0, 0, 0, 1]).await.unwrap();
        let msgs = read_messages(&mut s).await;
        let e = msgs
            .iter()
            .find(|(t, _)| *t == b'E')
            .expect("an error for the garbage");
        assert_eq!(error_fields(&e.1)[&b'C'], "08P01");
    }
    // Many connections at once that vanish.
    let mut v = Vec::new();
    for _ in 0..50 {
        v.push(TcpStream::connect(("127.0.0.1", env.port)).await.unwrap());
    }
    drop(v);
    // A cancel request with an unknown key is ignored.
    let mut s = TcpStream::connect(("127.0.0.1", env.port)).await.unwrap();
    s.write_all(&[0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2])
        .await
        .unwrap();
    assert!(read_messages(&mut s).await.is_empty());
    drop(s);

    // Still up, and back to the baseline.
    proxy_works(&env).await;
    env.assert_nothing_leaked(baseline, &format!("baseline: {baseline_fds:?}"))
        .await;
}
