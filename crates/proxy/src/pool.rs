//! Reuse of trust-authenticated server connections (like PgBouncer's session pooling, which
//! is what makes connect-per-transaction workloads fast).
//!
//! A server connection may be handed to a later client only when that is exactly what a fresh
//! connection would give it: the server admitted the original client with `AuthenticationOk`
//! straight away (trust: no credentials were exchanged, so the same startup packet from the
//! proxy would be admitted again), the later client sends the very same startup packet
//! (user, database, options, application_name, ...), and the session was reset with
//! `DISCARD ALL` after its client sent Terminate at a transaction boundary. The new client
//! gets the original greeting (ParameterStatus values are those of the startup packet again
//! after the reset) with a fresh proxy-made cancel key. Connections that authenticated with
//! a password are never reused.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::router::UpstreamAddr;
use crate::stream::UpstreamStream;

/// Largest greeting (server messages from AuthenticationOk up to the first ReadyForQuery)
/// the proxy keeps for replay.
pub const MAX_GREETING: usize = 8 * 1024;
/// `AuthenticationOk`.
pub const AUTH_OK: [u8; 9] = [b'R', 0, 0, 0, 8, 0, 0, 0, 0];
/// Parked connections kept per (upstream, startup packet).
const MAX_PER_KEY: usize = 32;

/// The server's answer to a startup packet, minus the final ReadyForQuery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// The messages, as sent by the server.
    pub bytes: Vec<u8>,
    /// Offset of the BackendKeyData body (pid, secret) in `bytes`, if there is one.
    pub key_offset: Option<usize>,
}

impl Greeting {
    /// A greeting if `bytes` is a trust greeting (starts with AuthenticationOk, well framed,
    /// small enough); `None` means the connection must not be reused.
    pub fn trusted(bytes: Vec<u8>) -> Option<Greeting> {
        if !bytes.starts_with(&AUTH_OK) || bytes.len() > MAX_GREETING {
            return None;
        }
        let mut pos = 0;
        let mut key_offset = None;
        while pos < bytes.len() {
            let hdr = bytes.get(pos..pos + 5)?;
            let len = u32::from_be_bytes([hdr[1], hdr[2], hdr[3], hdr[4]]) as usize;
            if len < 4 || pos + 1 + len > bytes.len() {
                return None;
            }
            match hdr[0] {
                b'K' if len == 12 => key_offset = Some(pos + 5),
                // Anything that is not part of a normal trust greeting: do not reuse.
                b'R' if pos != 0 => return None,
                b'R' | b'S' | b'N' | b'K' => {}
                _ => return None,
            }
            pos += 1 + len;
        }
        Some(Greeting { bytes, key_offset })
    }
}

/// An idle, reset server connection.
pub struct Parked {
    /// The connection.
    pub server: UpstreamStream,
    /// What the server said at startup.
    pub greeting: std::sync::Arc<Greeting>,
    /// The server's real (pid, secret).
    pub real_key: (u32, Vec<u8>),
    /// When it was parked.
    pub since: Instant,
}

/// Closes a parked connection politely: a non-blocking Terminate (5 bytes to an idle
/// socket), then the drop closes it.
fn close(p: Parked) {
    let x = [b'X', 0, 0, 0, 4];
    let _ = match &p.server {
        UpstreamStream::Unix(s) => s.try_write(&x),
        UpstreamStream::Tcp(s) => s.try_write(&x),
        UpstreamStream::Tls(_) | UpstreamStream::Closed => Ok(0), // dropped without a Terminate
    };
}

type Key = (UpstreamAddr, Vec<u8>);
type Idle = HashMap<Key, Vec<Parked>>;

/// Parked connections by (upstream, startup packet).
pub struct Pool {
    idle: Mutex<Idle>,
    timeout: Option<Duration>,
    /// How many connections `idle` holds, for lock-free checks on the relay's path.
    parked: AtomicUsize,
    /// Statements that may be about a database seen so far (see
    /// [`Pool::release_before_database_ddl`]); changed only under the `idle` lock.
    database_ddl: AtomicU64,
}

impl Pool {
    /// A pool keeping connections `timeout` long; `None` keeps none.
    pub fn new(timeout: Option<Duration>) -> Self {
        Pool {
            idle: Mutex::new(HashMap::new()),
            timeout,
            parked: AtomicUsize::new(0),
            database_ddl: AtomicU64::new(0),
        }
    }

    /// How many statements that may be about a database have been seen: a session takes
    /// this when it starts and passes it to [`Pool::put`] when it ends.
    pub fn database_ddl_seen(&self) -> u64 {
        self.database_ddl.load(Ordering::SeqCst)
    }

    /// Whether reuse is on.
    pub fn enabled(&self) -> bool {
        self.timeout.is_some()
    }

    /// Parks `conn` (closes it when reuse is off). `ddl_seen` is [`Pool::database_ddl_seen`]
    /// as its session started: if a statement about a database has come since, the
    /// connection is closed instead. Such a statement releases what is parked, but a session
    /// still ending then (its client gone, its server being reset) parks later, and the
    /// statement (`DROP DATABASE` of the database it is connected to) would wait for it and
    /// fail with 55006 — as Django's test runner did through the proxy.
    pub fn put(&self, addr: UpstreamAddr, startup: Vec<u8>, conn: Parked, ddl_seen: u64) {
        if !self.enabled() {
            close(conn);
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if self.database_ddl.load(Ordering::SeqCst) != ddl_seen {
            drop(idle);
            tracing::debug!("not parking a connection to {addr}: a statement on a database came");
            close(conn);
            return;
        }
        let list = idle.entry((addr, startup)).or_default();
        if list.len() < MAX_PER_KEY {
            list.push(conn);
            self.parked.fetch_add(1, Ordering::Relaxed);
        } else {
            close(conn);
        }
    }

    /// A live parked connection for (`addr`, `startup`), most recently parked first.
    pub fn take(&self, addr: &UpstreamAddr, startup: &[u8]) -> Option<Parked> {
        let timeout = self.timeout?;
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let key = (addr.clone(), startup.to_vec());
        let list = idle.get_mut(&key)?;
        let mut found = None;
        while let Some(p) = list.pop() {
            self.parked.fetch_sub(1, Ordering::Relaxed);
            if p.since.elapsed() < timeout && is_quiet(&p.server) {
                found = Some(p);
                break;
            }
            close(p);
        }
        if list.is_empty() {
            idle.remove(&key);
        }
        found
    }

    /// Closes connections parked longer than the timeout (and dead ones).
    pub fn sweep(&self) {
        let Some(timeout) = self.timeout else { return };
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.retain(|_, list| {
            for p in std::mem::take(list) {
                if p.since.elapsed() < timeout && is_quiet(&p.server) {
                    list.push(p);
                } else {
                    self.parked.fetch_sub(1, Ordering::Relaxed);
                    close(p);
                }
            }
            !list.is_empty()
        });
    }

    /// Closes every parked connection to `addr`; returns how many.
    pub fn release(&self, addr: &UpstreamAddr) -> usize {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.release_locked(&mut idle, addr)
    }

    fn release_locked(&self, idle: &mut MutexGuard<'_, Idle>, addr: &UpstreamAddr) -> usize {
        let mut n = 0;
        idle.retain(|(a, _), list| {
            if a == addr {
                n += list.len();
                self.parked.fetch_sub(list.len(), Ordering::Relaxed);
                list.drain(..).for_each(close);
                false
            } else {
                true
            }
        });
        n
    }

    /// Number of parked connections.
    pub fn len(&self) -> usize {
        self.parked.load(Ordering::Relaxed)
    }

    /// Closes the connections parked to `addr` before `client_bytes` reach its server, when
    /// they may be about a whole database (any mention of `database`, in any case: `DROP
    /// DATABASE`, `ALTER DATABASE … RENAME`, `CREATE DATABASE … TEMPLATE`). PostgreSQL refuses
    /// those while another session is connected to the database (55006), and waits up to 5 s
    /// for such sessions to exit: so a parked connection, which its client believes closed,
    /// must be gone by then, or e.g. Django's test runner cannot drop the test database it
    /// has just used (it did, through the proxy). Sessions ending meanwhile do not park (see
    /// [`Pool::put`]). Mentions of the word elsewhere only cost reuse.
    pub fn release_before_database_ddl(&self, addr: &UpstreamAddr, client_bytes: &[u8]) {
        if self.enabled() && mentions_database(client_bytes) {
            let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            // Counted under the lock that `put` checks it under: a `put` either comes before
            // (and its connection is released here) or sees the count changed.
            self.database_ddl.fetch_add(1, Ordering::SeqCst);
            let n = self.release_locked(&mut idle, addr);
            drop(idle);
            if n > 0 {
                tracing::debug!(
                    "closed {n} parked connection(s) to {addr} before a statement on a database"
                );
            }
        }
    }
}

/// `bytes` contain `database` in any ASCII case.
fn mentions_database(bytes: &[u8]) -> bool {
    const WORD: &[u8] = b"database";
    bytes
        .windows(WORD.len())
        .any(|w| w.eq_ignore_ascii_case(WORD))
}

/// Opens a server connection to `addr` for a session moving there: sends `startup` and reads
/// the greeting up to the first ReadyForQuery. `None` unless the server trusted it
/// (AuthenticationOk first, a BackendKeyData, ReadyForQuery `I`, nothing after): a server
/// that asks for a password, refuses or says anything else gets the session its 57P01
/// instead. The server's pid comes from the greeting.
pub async fn open_trusted(
    addr: &UpstreamAddr,
    startup: &[u8],
    connect_limit: std::time::Duration,
) -> Option<Parked> {
    let fut = async {
        let mut server = crate::stream::connect_upstream(addr, connect_limit)
            .await
            .ok()?;
        server.write_all(startup).await.ok()?;
        let mut buf = Vec::with_capacity(512);
        loop {
            let mut chunk = [0u8; 1024];
            let n = server.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let ready = first_ready_for_query(&buf)?;
            let Some(end) = ready else { continue };
            if buf[end - 1] != b'I' || buf.len() != end {
                return None;
            }
            buf.truncate(end - 6);
            let greeting = Greeting::trusted(buf)?;
            let off = greeting.key_offset?;
            let k = &greeting.bytes[off..off + 8];
            let real_key = (
                u32::from_be_bytes([k[0], k[1], k[2], k[3]]),
                k[4..8].to_vec(),
            );
            return Some(Parked {
                server,
                greeting: std::sync::Arc::new(greeting),
                real_key,
                since: Instant::now(),
            });
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .ok()
        .flatten()
}

/// The end of the first complete ReadyForQuery in `buf` (`Some(None)`: none yet); `None`
/// when the bytes cannot be a greeting (bad framing, too long).
fn first_ready_for_query(buf: &[u8]) -> Option<Option<usize>> {
    let mut pos = 0;
    while buf.len() >= pos + 5 {
        let len =
            u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]]) as usize;
        if len < 4 || pos + 1 + len > MAX_GREETING + 6 {
            return None;
        }
        if buf.len() < pos + 1 + len {
            break;
        }
        pos += 1 + len;
        if buf[pos - 1 - len] == b'Z' {
            return (len == 5).then_some(Some(pos));
        }
    }
    (buf.len() <= MAX_GREETING + 6).then_some(None)
}

/// True when an idle server connection has said nothing (not closed, no FATAL pending).
fn is_quiet(s: &UpstreamStream) -> bool {
    let mut b = [0u8; 1];
    let r = match s {
        UpstreamStream::Unix(s) => s.try_read(&mut b),
        UpstreamStream::Tcp(s) => s.try_read(&mut b),
        // Cannot peek under TLS: never reused.
        UpstreamStream::Tls(_) | UpstreamStream::Closed => return false,
    };
    matches!(r, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
}

/// Resets a session for the next client: `DISCARD ALL`, then expects CommandComplete and
/// ReadyForQuery `I` (notices and ParameterStatus in between are fine, errors are not).
pub async fn reset(server: &mut UpstreamStream) -> bool {
    let fut = async {
        server.write_all(b"Q\0\0\0\x10DISCARD ALL\0").await.ok()?;
        let mut buf = Vec::with_capacity(256);
        loop {
            let mut chunk = [0u8; 512];
            let n = server.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
            let mut pos = 0;
            while buf.len() >= pos + 5 {
                let len =
                    u32::from_be_bytes([buf[pos + 1], buf[pos + 2], buf[pos + 3], buf[pos + 4]])
                        as usize;
                if !(4..=64 * 1024).contains(&len) {
                    return None;
                }
                if buf.len() < pos + 1 + len {
                    break;
                }
                match buf[pos] {
                    b'C' | b'S' | b'N' | b'A' => {}
                    b'Z' => {
                        // Nothing may follow the final ReadyForQuery.
                        return (len == 5 && buf[pos + 5] == b'I' && buf.len() == pos + 6)
                            .then_some(());
                    }
                    _ => return None,
                }
                pos += 1 + len;
            }
        }
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), fut).await,
        Ok(Some(()))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![ty];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn only_trust_greetings_are_reusable() {
        let g = [
            AUTH_OK.to_vec(),
            msg(b'S', b"a\0b\0"),
            msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2]),
        ]
        .concat();
        let k_at = AUTH_OK.len() + msg(b'S', b"a\0b\0").len() + 5;
        assert_eq!(Greeting::trusted(g.clone()).unwrap().key_offset, Some(k_at));
        // A password exchange first.
        let pw = [msg(b'R', &[0, 0, 0, 3]), g.clone()].concat();
        assert!(Greeting::trusted(pw).is_none());
        // SASL final message after AuthenticationOk, or an error: not reusable.
        assert!(Greeting::trusted([g.clone(), msg(b'R', &[0, 0, 0, 12])].concat()).is_none());
        assert!(Greeting::trusted([g.clone(), msg(b'E', b"\0")].concat()).is_none());
        // Truncated.
        assert!(Greeting::trusted(g[..g.len() - 1].to_vec()).is_none());
    }

    #[test]
    fn finds_the_first_ready_for_query() {
        let g = [AUTH_OK.to_vec(), msg(b'K', &[0, 0, 0, 1, 0, 0, 0, 2])].concat();
        let z = msg(b'Z', b"I");
        let all = [g.clone(), z.clone()].concat();
        for cut in 0..all.len() {
            assert_eq!(first_ready_for_query(&all[..cut]), Some(None), "cut {cut}");
        }
        assert_eq!(first_ready_for_query(&all), Some(Some(all.len())));
        assert_eq!(first_ready_for_query(&[b'Z', 0, 0, 0, 3]), None);
        assert_eq!(first_ready_for_query(&vec![b'S'; MAX_GREETING + 10]), None);
    }

    #[test]
    fn discard_all_query_is_well_formed() {
        let q = b"Q\0\0\0\x10DISCARD ALL\0";
        assert_eq!(q.len(), 1 + 0x10);
    }
}
