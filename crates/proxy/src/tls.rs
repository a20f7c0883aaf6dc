//! TLS termination: a self-signed certificate for `localhost` made on first use, ALPN
//! `postgresql`, and PostgreSQL 17's direct TLS handshake (`sslnegotiation=direct`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The ALPN protocol name of the PostgreSQL protocol (PostgreSQL 17, `PG_ALPN_PROTOCOL`).
pub(crate) const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// A fatal `no_application_protocol` alert (RFC 7301 section 3.2) as a plaintext TLS record:
/// content type alert (21), legacy record version TLS 1.2, length 2, level fatal (2),
/// description 120. Sent in answer to a ClientHello, before anything is encrypted.
const NO_APPLICATION_PROTOCOL_ALERT: [u8; 7] = [0x15, 0x03, 0x03, 0x00, 0x02, 0x02, 120];

/// `config` (a copy when it differs) speaking TLS as PostgreSQL does:
/// - advertising exactly ALPN `postgresql`, as PostgreSQL 17 does on both TLS paths. rustls
///   then answers a client that offers ALPN but not `postgresql` with a
///   `no_application_protocol` alert — PostgreSQL's `alpn_cb` does the same — and accepts a
///   client that offers no ALPN at all (libpq before 17, most drivers);
/// - records of at most [`MAX_RECORD_PLAINTEXT`], never rustls's default 16 kB (see there).
pub(crate) fn as_postgresql_does(config: Arc<rustls::ServerConfig>) -> Arc<rustls::ServerConfig> {
    if config.alpn_protocols.len() == 1
        && config.alpn_protocols[0] == ALPN_POSTGRESQL
        && config.max_fragment_size == Some(MAX_RECORD_PLAINTEXT)
    {
        return config;
    }
    let mut copy = (*config).clone();
    copy.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
    copy.max_fragment_size = Some(MAX_RECORD_PLAINTEXT);
    Arc::new(copy)
}

/// The most plaintext the proxy puts in one TLS record: 8 kB, as PostgreSQL does (its send
/// buffer is 8 kB). libpq before 18 reads at most its buffer's free space per
/// `PQconsumeInput`, which it keeps at 8 kB or more: of a bigger record the rest stays inside
/// OpenSSL, where the socket shows nothing, and an async client that waits for its socket
/// before reading again (psycopg async) waits for data it already has — the last records of
/// a COPY TO STDOUT then never arrive (issue 13's TLS stall; tests/client_libraries.rs
/// `libpq_async_copy_never_stalls`). With records no bigger than the free space libpq
/// guarantees, every read takes a whole record.
pub(crate) const MAX_RECORD_PLAINTEXT: usize = 8192;

/// How a direct TLS handshake ended.
pub(crate) enum Direct {
    /// TLS is up with ALPN `postgresql`; the startup packet follows inside it.
    Accepted(Box<TlsStream<TcpStream>>),
    /// The ClientHello did not offer ALPN `postgresql`: it got a `no_application_protocol`
    /// alert. `alpn` is what it offered, for the log.
    NoAlpn {
        /// The protocols offered (`None`: no ALPN extension).
        alpn: Option<Vec<String>>,
    },
}

/// Runs the server side of a direct TLS handshake (PostgreSQL 17 `sslnegotiation=direct`: the
/// client opens with a ClientHello instead of an SSLRequest) on `tcp`, whose first bytes,
/// `prefix`, were already read while looking for a startup packet's length word.
///
/// The ClientHello must offer ALPN `postgresql`. PostgreSQL 17 checks that only after the
/// handshake and then closes without a word if ALPN was not used; here a ClientHello without
/// it is refused before any key exchange with the alert PostgreSQL sends when ALPN is offered
/// without `postgresql` — so the client learns why, and no TLS session is set up for nothing.
/// `config` must advertise ALPN `postgresql` (see [`as_postgresql_does`]).
pub(crate) async fn accept_direct(
    config: Arc<rustls::ServerConfig>,
    tcp: TcpStream,
    prefix: &[u8],
) -> io::Result<Direct> {
    let mut acceptor = rustls::server::Acceptor::default();
    // The bytes already read go to rustls first. They may hold the whole ClientHello (the
    // startup read takes what has come, see `inbox.rs`): then the handshake goes on from
    // it, else the acceptor reads the rest from the socket.
    let mut rest = prefix;
    while !rest.is_empty() {
        if acceptor.read_tls(&mut rest)? == 0 {
            break;
        }
    }
    let start = match acceptor.accept() {
        Ok(Some(accepted)) => tokio_rustls::StartHandshake::from_parts(accepted, tcp),
        Ok(None) => tokio_rustls::LazyConfigAcceptor::new(acceptor, tcp).await?,
        Err((e, mut alert)) => {
            let mut tcp = tcp;
            let mut bytes = Vec::new();
            let _ = alert.write_all(&mut bytes);
            // Best effort, as above: the client is told why, if it still listens.
            let _ = tcp.write_all(&bytes).await;
            return Err(io::Error::new(io::ErrorKind::InvalidData, e));
        }
    };
    let offered: Option<Vec<&[u8]>> = start.client_hello().alpn().map(|a| a.collect());
    if !offered
        .as_ref()
        .is_some_and(|a| a.contains(&ALPN_POSTGRESQL))
    {
        let alpn = offered.map(|a| {
            a.iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect()
        });
        let mut tcp = start.io;
        // Best effort: the client may already be gone.
        let _ = tcp.write_all(&NO_APPLICATION_PROTOCOL_ALERT).await;
        let _ = tcp.shutdown().await;
        return Ok(Direct::NoAlpn { alpn });
    }
    let tls = start.into_stream(config).await?;
    debug_assert_eq!(tls.get_ref().1.alpn_protocol(), Some(ALPN_POSTGRESQL));
    Ok(Direct::Accepted(Box::new(tls)))
}

/// Certificate file name inside the TLS directory.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file name inside the TLS directory (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// Loads `cert.pem`/`key.pem` from `dir`, or first generates a self-signed certificate for
/// `localhost`, `127.0.0.1` and `::1` there (key written with mode 0600), and returns a rustls
/// server configuration for it (advertising ALPN `postgresql`).
pub fn load_or_create_tls(dir: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if !cert_path.exists() || !key_path.exists() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
            "::1".to_string(),
        ])
        .context("generating a self-signed certificate")?;
        // Write the key first and the certificate last: the certificate's presence marks a
        // complete pair. Both go through a temporary name so a crash leaves no half file.
        write_file(&key_path, ck.key_pair.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, ck.cert.pem().as_bytes(), 0o644)?;
    }
    server_config(&cert_path, &key_path)
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(data)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("renaming to {}", path.display()))?;
    Ok(())
}

fn server_config(cert_path: &Path, key_path: &Path) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut &fs::read(cert_path)?[..])
        .collect::<Result<_, _>>()
        .with_context(|| format!("reading {}", cert_path.display()))?;
    if certs.is_empty() {
        return Err(anyhow!("no certificate in {}", cert_path.display()));
    }
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut &fs::read(key_path)?[..])
        .with_context(|| format!("reading {}", key_path.display()))?
        .ok_or_else(|| anyhow!("no private key in {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .context("TLS certificate")?;
    Ok(as_postgresql_does(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        let config = load_or_create_tls(&tls_dir).unwrap();
        assert_eq!(config.alpn_protocols, vec![b"postgresql".to_vec()]);
        let cert1 = fs::read(tls_dir.join(CERT_FILE)).unwrap();
        let mode = fs::metadata(tls_dir.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        load_or_create_tls(&tls_dir).unwrap();
        assert_eq!(fs::read(tls_dir.join(CERT_FILE)).unwrap(), cert1);
    }

    #[test]
    fn garbage_files_are_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CERT_FILE), "nope").unwrap();
        fs::write(dir.path().join(KEY_FILE), "nope").unwrap();
        assert!(load_or_create_tls(dir.path()).is_err());
    }

    #[test]
    fn alpn_and_record_size_are_set_once() {
        let dir = tempfile::tempdir().unwrap();
        let config = load_or_create_tls(dir.path()).unwrap();
        assert_eq!(config.max_fragment_size, Some(MAX_RECORD_PLAINTEXT));
        assert!(Arc::ptr_eq(&config, &as_postgresql_does(config.clone())));
        let mut other = (*config).clone();
        other.alpn_protocols = vec![b"h2".to_vec(), b"postgresql".to_vec()];
        other.max_fragment_size = None;
        let fixed = as_postgresql_does(Arc::new(other));
        assert_eq!(fixed.alpn_protocols, vec![b"postgresql".to_vec()]);
        assert_eq!(fixed.max_fragment_size, Some(MAX_RECORD_PLAINTEXT));
    }
}
