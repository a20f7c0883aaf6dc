//! Cancel keys: the server's real pid, a proxy-made secret.
//!
//! Clients see each server's real backend pid in `BackendKeyData` (so `pg_backend_pid()`,
//! `NotificationResponse` pids and `pg_terminate_backend(pid)` agree with what they were
//! told), but never its real secret: the relay replaces the secret with one made here and
//! records (pid, proxy secret) → (upstream address, real pid, real secret). A
//! `CancelRequest` reaching the proxy is forwarded to the right upstream with the real key.
//! Keys are removed when their session ends.
//!
//! Local branches' servers share one machine's pid space, so their pids are unique, but
//! separate hosts (Neon computes) may hand out the same pid: the proxy secret is drawn so
//! that no two live keys share a (pid, secret) pair, which keeps such sessions apart.

use std::collections::HashMap;
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

/// A key the proxy handed out: (the server's pid, a proxy-made secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProxyKey {
    /// The server's real backend pid.
    pub pid: u32,
    /// Random secret, unique among live keys with this pid.
    pub secret: u32,
}

/// Random bytes fetched from the OS at once: a secret per session drawn with one
/// `getrandom` each was one system call in ~25 for a connect-per-query client. They are the
/// OS generator's bytes all the same, each handed out once.
const RANDOM_BATCH: usize = 256;

/// Map of live keys.
pub struct CancelMap {
    keys: Mutex<HashMap<ProxyKey, CancelTarget>>,
    rng: SystemRandom,
    /// OS random bytes not handed out yet: `batch[used..]`.
    random: Mutex<RandomBatch>,
}

struct RandomBatch {
    batch: [u8; RANDOM_BATCH],
    used: usize,
}

impl Default for CancelMap {
    fn default() -> Self {
        Self::new()
    }
}

impl CancelMap {
    /// An empty map.
    pub fn new() -> Self {
        CancelMap {
            keys: Mutex::new(HashMap::new()),
            rng: SystemRandom::new(),
            random: Mutex::new(RandomBatch {
                batch: [0; RANDOM_BATCH],
                used: RANDOM_BATCH,
            }),
        }
    }

    fn random_u32(&self) -> u32 {
        let mut r = self.random.lock().unwrap_or_else(|e| e.into_inner());
        if r.used + 4 > RANDOM_BATCH {
            // SystemRandom only fails if the OS RNG is unavailable; the uniqueness loop in
            // `register` still keeps keys apart then.
            let _ = self.rng.fill(&mut r.batch);
            r.used = 0;
        }
        let at = r.used;
        r.used += 4;
        let b = &mut r.batch[at..at + 4];
        let value = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
        // Handed out: not kept in memory any longer than needed.
        b.fill(0);
        value
    }

    /// Makes a new key for `target`: its real pid with a fresh secret.
    pub fn register(&self, target: CancelTarget) -> ProxyKey {
        let mut secret = self.random_u32();
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let key = ProxyKey {
                pid: target.pid,
                secret,
            };
            if let std::collections::hash_map::Entry::Vacant(e) = keys.entry(key) {
                e.insert(target);
                return key;
            }
            secret = secret.wrapping_add(self.random_u32() | 1);
        }
    }

    /// Points a live `key` at another server (its session moved there).
    pub fn retarget(&self, key: ProxyKey, target: CancelTarget) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(t) = keys.get_mut(&key) {
            *t = target;
        }
    }

    /// Forgets `key` (its session ended).
    pub fn remove(&self, key: ProxyKey) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&key);
    }

    /// The real target of a cancel request carrying (`pid`, `secret`), if the key is live.
    pub fn lookup(&self, pid: u32, secret: &[u8]) -> Option<CancelTarget> {
        let secret: [u8; 4] = secret.try_into().ok()?;
        let key = ProxyKey {
            pid,
            secret: u32::from_be_bytes(secret),
        };
        let keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.get(&key).cloned()
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
        let mut s = connect_upstream(&target.addr, Duration::from_secs(5)).await?;
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

    fn target(port: u16, pid: u32) -> CancelTarget {
        CancelTarget {
            addr: UpstreamAddr::Tcp {
                host: "127.0.0.1".into(),
                port,
            },
            pid,
            secret: vec![1, 2, 3, 4],
        }
    }

    #[test]
    fn secrets_stay_random_across_batches() {
        let map = CancelMap::new();
        // Several batches' worth: a refill that handed out stale or zeroed bytes would repeat.
        let drawn: std::collections::HashSet<u32> = (0..3 * RANDOM_BATCH / 4)
            .map(|_| map.random_u32())
            .collect();
        assert!(
            drawn.len() >= 3 * RANDOM_BATCH / 4 - 1,
            "{} distinct",
            drawn.len()
        );
    }

    #[test]
    fn register_lookup_remove() {
        let m = CancelMap::new();
        let a = m.register(target(1, 10));
        let b = m.register(target(1, 11));
        assert_eq!((a.pid, b.pid), (10, 11), "clients see the real pids");
        assert_eq!(m.lookup(10, &a.secret.to_be_bytes()), Some(target(1, 10)));
        assert_eq!(m.lookup(10, &a.secret.wrapping_add(1).to_be_bytes()), None);
        assert_eq!(m.lookup(11, &a.secret.to_be_bytes()), None);
        assert_eq!(m.lookup(10, &[1, 2, 3]), None);
        m.remove(a);
        assert_eq!(m.lookup(10, &a.secret.to_be_bytes()), None);
        assert_eq!(m.live_keys(), 1);
        m.remove(b);
        assert_eq!(m.live_keys(), 0);
    }

    #[test]
    fn the_same_pid_on_two_upstreams_stays_apart() {
        // Two hosts (Neon computes) may both have a backend 42.
        let m = CancelMap::new();
        let keys: Vec<ProxyKey> = (0..200)
            .map(|i| m.register(target(1 + (i % 2), 42)))
            .collect();
        assert_eq!(m.live_keys(), 200, "no key overwrote another");
        for (i, k) in keys.iter().enumerate() {
            assert_eq!(k.pid, 42);
            let t = m.lookup(42, &k.secret.to_be_bytes()).unwrap();
            assert_eq!(t, target(1 + (i as u16 % 2), 42));
        }
        m.remove(keys[0]);
        assert_eq!(
            m.lookup(42, &keys[1].secret.to_be_bytes()),
            Some(target(2, 42)),
            "removing one key leaves the other upstream's alone"
        );
    }

    #[test]
    fn cancel_request_matches_postgres_protocol() {
        let mut theirs = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(1234, 0x01020304, &mut theirs);
        assert_eq!(encode_cancel_request(1234, &[1, 2, 3, 4]), theirs.to_vec());
    }
}
