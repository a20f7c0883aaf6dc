//! TLS termination: a self-signed certificate for `localhost` made on first use.

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Certificate file name inside the TLS directory.
pub const CERT_FILE: &str = "cert.pem";
/// Private key file name inside the TLS directory (mode 0600).
pub const KEY_FILE: &str = "key.pem";

/// Loads `cert.pem`/`key.pem` from `dir`, or first generates a self-signed certificate for
/// `localhost`, `127.0.0.1` and `::1` there (key written with mode 0600), and returns a rustls
/// server configuration for it.
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
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn creates_once_then_reuses() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("tls");
        load_or_create_tls(&tls_dir).unwrap();
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
}
