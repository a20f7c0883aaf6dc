//! A hand-made PostgreSQL 17-style TLS client (no PG17 libpq here): TLS with ALPN over
//! rustls, directly (`sslnegotiation=direct`) or after an SSLRequest, then protocol 3.0
//! messages built with `postgres-protocol`.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::split_messages;

pub const ALPN: &[u8] = b"postgresql";

/// A client configuration trusting `cert` (the proxy's generated `cert.pem`), offering
/// `alpn` (empty: no ALPN extension).
pub fn client_config(cert: &Path, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut &std::fs::read(cert).unwrap()[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A client configuration good only for making ClientHellos (trusts nothing).
pub fn hello_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

fn localhost() -> ServerName<'static> {
    ServerName::try_from("localhost").unwrap()
}

/// `sslnegotiation=direct`: TCP, then a ClientHello straight away.
pub async fn connect_direct(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(localhost(), tcp)
        .await
}

/// `sslnegotiation=postgres`: SSLRequest, expect `S`, then the TLS handshake.
pub async fn connect_sslrequest(
    port: u16,
    cfg: Arc<rustls::ClientConfig>,
) -> io::Result<TlsStream<TcpStream>> {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await?;
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await?;
    assert_eq!(&answer, b"S");
    tokio_rustls::TlsConnector::from(cfg)
        .connect(localhost(), tcp)
        .await
}

/// The ClientHello `cfg` would send, as raw TLS records.
pub fn client_hello(cfg: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut conn = rustls::ClientConnection::new(cfg, localhost()).unwrap();
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).unwrap();
    }
    assert_eq!(out[0], 0x16);
    out
}

/// The TLS alert a failed handshake received, if that is how it failed.
pub fn alert_received(e: &io::Error) -> Option<rustls::AlertDescription> {
    match e.get_ref()?.downcast_ref::<rustls::Error>()? {
        rustls::Error::AlertReceived(a) => Some(*a),
        _ => None,
    }
}

pub fn startup_packet(database: &str) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frontend::startup_message(
        [
            ("user", "postgres"),
            ("database", database),
            ("application_name", "pg17-direct"),
        ],
        &mut buf,
    )
    .unwrap();
    buf.to_vec()
}

pub fn query_packet(sql: &str) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frontend::query(sql, &mut buf).unwrap();
    buf.to_vec()
}

pub fn terminate_packet() -> Vec<u8> {
    let mut buf = BytesMut::new();
    frontend::terminate(&mut buf);
    buf.to_vec()
}

pub fn cancel_packet(pid: i32, secret: i32) -> Vec<u8> {
    let mut buf = BytesMut::new();
    frontend::cancel_request(pid, secret, &mut buf);
    buf.to_vec()
}

/// Reads backend messages until ReadyForQuery (included) or EOF; (type, body) pairs.
pub async fn read_until_ready<S: AsyncRead + Unpin>(s: &mut S) -> Vec<(u8, Vec<u8>)> {
    let mut got = Vec::new();
    let read = async {
        loop {
            let msgs = split_messages(&got);
            if msgs.iter().any(|(t, _)| *t == b'Z') {
                return msgs;
            }
            let mut chunk = [0u8; 8192];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return msgs,
                Ok(n) => got.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("no ReadyForQuery within 10 s")
}

/// Runs `sql` with the simple query protocol; returns the messages up to ReadyForQuery.
pub async fn simple_query<S: AsyncRead + AsyncWrite + Unpin>(
    s: &mut S,
    sql: &str,
) -> Vec<(u8, Vec<u8>)> {
    s.write_all(&query_packet(sql)).await.unwrap();
    s.flush().await.unwrap();
    read_until_ready(s).await
}

/// The text columns of the DataRows among `msgs`, decoded with postgres-protocol.
pub fn data_rows(msgs: &[(u8, Vec<u8>)]) -> Vec<Vec<Option<String>>> {
    use fallible_iterator::FallibleIterator;
    use postgres_protocol::message::backend::Message;
    let mut rows = Vec::new();
    for (t, body) in msgs {
        if *t != b'D' {
            continue;
        }
        let mut raw = BytesMut::new();
        raw.extend_from_slice(&[*t]);
        raw.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        raw.extend_from_slice(body);
        let Some(Message::DataRow(row)) = Message::parse(&mut raw).unwrap() else {
            panic!("not a DataRow");
        };
        let buf = row.buffer();
        let cols: Vec<Option<String>> = row
            .ranges()
            .map(|r| Ok(r.map(|r| String::from_utf8(buf[r].to_vec()).unwrap())))
            .collect()
            .unwrap();
        rows.push(cols);
    }
    rows
}

/// Startup inside an established TLS stream: sends the StartupMessage and checks the
/// answer is AuthenticationOk ... ReadyForQuery `I` (trust). Returns the proxy-made
/// (pid, secret) from BackendKeyData.
pub async fn startup<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S, database: &str) -> (i32, i32) {
    s.write_all(&startup_packet(database)).await.unwrap();
    s.flush().await.unwrap();
    let msgs = read_until_ready(s).await;
    assert_eq!(
        msgs.first().map(|m| m.0),
        Some(b'R'),
        "expected AuthenticationOk first: {msgs:?}"
    );
    assert_eq!(msgs[0].1, 0u32.to_be_bytes());
    assert_eq!(msgs.last().unwrap(), &(b'Z', b"I".to_vec()));
    let k = msgs
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    (
        i32::from_be_bytes(k.1[..4].try_into().unwrap()),
        i32::from_be_bytes(k.1[4..8].try_into().unwrap()),
    )
}

/// Sends Terminate and waits for the proxy to close (TLS close_notify or EOF).
pub async fn terminate<S: AsyncRead + AsyncWrite + Unpin>(s: &mut S) {
    s.write_all(&terminate_packet()).await.unwrap();
    s.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the proxy did not close after Terminate");
    assert!(rest.is_empty(), "{rest:?}");
}
