//! Proxy-made cancel keys.
//!
//! Clients never see a server's real (pid, secret): the relay replaces each `BackendKeyData`
//! with a key made here and records key → (upstream address, real pid, real secret). A
//! `CancelRequest` reaching the proxy is forwarded to the right upstream with the real key.
//! Keys are removed when their session ends.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use ring::rand::{SecureRandom, SystemRandom};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::router::UpstreamAddr;
use crate::startup::CANCEL_REQUEST_CODE;
use crate::stream::connect_upstream;

/// Where a cancel request must really go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelTarget {
    /// The branch server's address.
    pub addr: UpstreamAddr,
    /// The server's backend pid.
    pub pid: u32,
    /// The server's secret key (4 bytes for protocol 3.0).
    pub secret: Vec<u8>,
}

/// A key the proxy handed out: (pid, secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxyKey {
    /// Proxy-made process id (positive, unique among live sessions).
    pub pid: u32,
    /// Random secret.
    pub secret: u32,
}

/// Map of live proxy-made keys.
pub struct CancelMap {
    keys: Mutex<HashMap<u32, (u32, CancelTarget)>>,
    next_pid: AtomicU32,
    rng: SystemRandom,
}

impl Default for CancelMap {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelMap {
    /// An empty map; pids start at a random point.
    pub fn new() -> Self {
        let rng = SystemRandom::new();
        let mut b = [0u8; 4];
        let _ = rng.fill(&mut b);
        CancelMap {
            keys: Mutex::new(HashMap::new()),
            next_pid: AtomicU32::new(u32::from_be_bytes(b) & 0x3fff_ffff),
            rng,
        }
    }

    fn random_u32(&self) -> u32 {
        let mut b = [0u8; 4];
        // SystemRandom only fails if the OS RNG is unavailable; a zero secret still works.
        let _ = self.rng.fill(&mut b);
        u32::from_be_bytes(b)
    }

    /// Makes a new key for `target`.
    pub fn register(&self, target: CancelTarget) -> ProxyKey {
        let secret = self.random_u32();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            // Positive i32 range, never 0: libpq and drivers treat the pid as a signed int.
            let pid = self.next_pid.fetch_add(1, Ordering::Relaxed) & 0x7fff_ffff;
            if pid == 0 || keys.contains_key(&pid) {
                continue;
            }
            keys.insert(pid, (secret, target));
            return ProxyKey { pid, secret };
        }
    }

    /// Forgets `key` (its session ended).
    pub fn remove(&self, key: ProxyKey) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys.get(&key.pid).is_some_and(|(s, _)| *s == key.secret) {
            keys.remove(&key.pid);
        }
    }

    /// The real target of a cancel request carrying (`pid`, `secret`), if the key is live.
    pub fn lookup(&self, pid: u32, secret: &[u8]) -> Option<CancelTarget> {
        let secret: [u8; 4] = secret.try_into().ok()?;
        let secret = u32::from_be_bytes(secret);
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let (s, target) = keys.get(&pid)?;
        // Constant-time-ish comparison is unnecessary for a u32 compare on localhost, but
        // avoid short-circuiting anyway.
        ((s ^ secret) == 0).then(|| target.clone())
    }

    /// Number of live keys.
    pub fn live_keys(&self) -> usize {
        self.keys.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Encodes a protocol 3.0 `CancelRequest` (or a longer-key one for other secret lengths).
pub fn encode_cancel_request(pid: u32, secret: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(12 + secret.len());
    out.extend_from_slice(&((12 + secret.len()) as u32).to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(secret);
    out
}

/// Sends the real cancel request to the upstream and waits (briefly) for it to close the
/// connection, as libpq does, so the cancel has been processed when this returns.
pub async fn forward_cancel(target: &CancelTarget) -> std::io::Result<()> {
    let fut = async {
        let mut s = connect_upstream(&target.addr).await?;
        s.write_all(&encode_cancel_request(target.pid, &target.secret))
            .await?;
        let mut b = [0u8; 1];
        let _ = s.read(&mut b).await;
        Ok(())
    };
    match tokio::time::timeout(Duration::from_secs(5), fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "cancel request timed out",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(pid: u32) -> CancelTarget {
        CancelTarget {
            addr: UpstreamAddr::Tcp {
                host: "127.0.0.1".into(),
                port: 1,
            },
            pid,
            secret: vec![1, 2, 3, 4],
        }
    }

    #[test]
    fn register_lookup_remove() {
        let m = CancelMap::new();
        let a = m.register(target(10));
        let b = m.register(target(11));
        assert_ne!(a.pid, b.pid);
        assert!(a.pid > 0 && a.pid <= i32::MAX as u32);
        assert_eq!(m.lookup(a.pid, &a.secret.to_be_bytes()), Some(target(10)));
        assert_eq!(
            m.lookup(a.pid, &a.secret.wrapping_add(1).to_be_bytes()),
            None
        );
        assert_eq!(m.lookup(a.pid, &[1, 2, 3]), None);
        m.remove(a);
        assert_eq!(m.lookup(a.pid, &a.secret.to_be_bytes()), None);
        assert_eq!(m.live_keys(), 1);
        m.remove(b);
        assert_eq!(m.live_keys(), 0);
    }

    #[test]
    fn cancel_request_matches_postgres_protocol() {
        let mut theirs = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(1234, 0x01020304, &mut theirs);
        assert_eq!(encode_cancel_request(1234, &[1, 2, 3, 4]), theirs.to_vec());
    }
}
