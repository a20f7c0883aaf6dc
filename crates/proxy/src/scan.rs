//! Message-header scanning for the relay, like PgBouncer's sbuf: bytes are relayed as they
//! come, but the 5-byte headers (type byte + length) are read so the proxy knows where each
//! message starts. Pure code over byte slices; the I/O lives in `relay.rs`.
//!
//! * [`BackendScanner`] (server→client) reports `ReadyForQuery` with its status byte and lets
//!   the caller rewrite `BackendKeyData` in place. Those two messages are small, so when one is
//!   split across reads the scanner holds it back (reports a shorter safe prefix) until it is
//!   complete; every other message passes through as soon as its bytes arrive. An incomplete
//!   header (< 5 bytes) is held back too.
//! * [`FrontendScanner`] (client→server) only observes: it counts messages that will be
//!   answered with a `ReadyForQuery` (Query, Sync, FunctionCall — but not the Syncs a server
//!   ignores in COPY FROM STDIN mode), notices Terminate, and
//!   knows whether the client is at a message boundary. It never holds bytes back.

use std::fmt;

/// The largest message the backend scanner may hold back (an authentication request read
/// whole; also the size of a protocol 3.2 `BackendKeyData` with a 256-byte key).
pub const MAX_HELD_MESSAGE: usize = 1 + 4 + 4 + 256;

/// The peer broke the message framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProtocolError(pub String);

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ProtocolError {}

/// Callbacks for the server→client messages the proxy cares about.
pub trait BackendEvents {
    /// A `ReadyForQuery` with status `I`, `T` or `E`. Return `true` to stop relaying right
    /// after this message (the session is being closed at a transaction boundary).
    fn ready_for_query(&mut self, status: u8) -> bool;
    /// A `BackendKeyData`; `body` is (pid, 4-byte secret), always 8 bytes (other lengths are
    /// a [`ProtocolError`]), and may be rewritten in place.
    fn backend_key_data(&mut self, body: &mut [u8]);
    /// An authentication request (`R`) small enough to be held whole; `body` (the int32 code
    /// and its data) may be rewritten in place (same length).
    fn authentication(&mut self, _body: &mut [u8]) {}
    /// A `CopyInResponse` header: the server is in COPY FROM STDIN mode (passed on unheld).
    fn copy_in_response(&mut self) {}
}

/// The SASL mechanism that binds SCRAM to the TLS channel.
const SCRAM_PLUS: &[u8] = b"SCRAM-SHA-256-PLUS";
/// What it is renamed to: the same length, a name no client knows, so clients ignore it.
const SCRAM_PLUS_HIDDEN: &[u8] = b"pgtwig-no-cb-proxy";

/// In an `AuthenticationSASL` body (code 10, then mechanism names), hide
/// `SCRAM-SHA-256-PLUS`: channel binding ties SCRAM to one TLS connection, and a proxy that
/// opens its own TLS to the server puts a different one on each side. libpq refuses a server
/// offering it over a plain connection, and a TLS client would bind to the wrong certificate.
/// Hidden, clients choose plain SCRAM-SHA-256, which passes through. Returns whether the body
/// changed.
pub fn hide_channel_binding(body: &mut [u8]) -> bool {
    if body.len() < 4 || body[..4] != [0, 0, 0, 10] {
        return false;
    }
    let mut changed = false;
    for name in body[4..].split_mut(|&b| b == 0) {
        if name == SCRAM_PLUS {
            name.copy_from_slice(SCRAM_PLUS_HIDDEN);
            changed = true;
        }
    }
    changed
}

/// Result of one [`BackendScanner::scan`] call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// How many bytes from the start of the slice may be sent to the client now.
    pub safe: usize,
    /// The events asked to stop after the last safe byte.
    pub stop: bool,
    /// End offset of the first `ReadyForQuery` in the slice, if any.
    pub first_ready_end: Option<usize>,
}

/// Server→client header scanner.
#[derive(Debug, Default)]
pub struct BackendScanner {
    /// Body bytes of the current message not yet seen.
    remaining: usize,
    /// Type byte of the last message whose header was seen.
    last_type: u8,
}

impl BackendScanner {
    /// Type byte of the last message header seen (0 if none).
    pub fn last_type(&self) -> u8 {
        self.last_type
    }

    /// True when the scanned bytes end exactly at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.remaining == 0
    }

    /// Scans `buf`, which starts right after the last safe byte of the previous call.
    /// Bytes past `safe` must be kept and passed again (with more appended) next time.
    pub fn scan<E: BackendEvents>(
        &mut self,
        buf: &mut [u8],
        events: &mut E,
    ) -> Result<Scanned, ProtocolError> {
        let mut pos = 0;
        let mut first_ready_end = None;
        loop {
            if self.remaining > 0 {
                let n = self.remaining.min(buf.len() - pos);
                pos += n;
                self.remaining -= n;
                if self.remaining > 0 {
                    return Ok(Scanned {
                        safe: pos,
                        stop: false,
                        first_ready_end,
                    });
                }
            }
            let rest = &buf[pos..];
            if rest.len() < 5 {
                return Ok(Scanned {
                    safe: pos,
                    stop: false,
                    first_ready_end,
                });
            }
            let ty = rest[0];
            let len = u32::from_be_bytes([rest[1], rest[2], rest[3], rest[4]]) as usize;
            if len < 4 {
                return Err(ProtocolError(format!(
                    "server sent message '{}' with invalid length {len}",
                    ty.escape_ascii()
                )));
            }
            match ty {
                // Held whole so they can be read (and BackendKeyData or an authentication
                // request rewritten) in place. An 'R' too big to hold (SASL data) is passed on
                // unread like any other message.
                b'Z' | b'K' | b'R' if ty != b'R' || len < MAX_HELD_MESSAGE => {
                    let total = 1 + len;
                    if ty == b'K' && len != 12 {
                        // Protocol 3.0 keys are (pid, 4-byte secret), and the proxy never
                        // negotiates a newer protocol: anything else cannot be swapped.
                        return Err(ProtocolError(format!(
                            "server sent BackendKeyData with a {}-byte body \
                             (protocol 3.0 has 8: pid and a 4-byte secret)",
                            len - 4
                        )));
                    }
                    if total > MAX_HELD_MESSAGE || (ty == b'Z' && len != 5) {
                        return Err(ProtocolError(format!(
                            "server sent message '{}' with invalid length {len}",
                            ty as char
                        )));
                    }
                    if rest.len() < total {
                        // Hold the whole message back until it is complete.
                        return Ok(Scanned {
                            safe: pos,
                            stop: false,
                            first_ready_end,
                        });
                    }
                    self.last_type = ty;
                    let body = &mut buf[pos + 5..pos + total];
                    pos += total;
                    match ty {
                        b'Z' => {
                            first_ready_end.get_or_insert(pos);
                            if events.ready_for_query(body[0]) {
                                return Ok(Scanned {
                                    safe: pos,
                                    stop: true,
                                    first_ready_end,
                                });
                            }
                        }
                        b'K' => events.backend_key_data(body),
                        _ => events.authentication(body),
                    }
                }
                _ => {
                    if ty == b'G' {
                        events.copy_in_response();
                    }
                    self.last_type = ty;
                    pos += 5;
                    self.remaining = len - 4;
                }
            }
        }
    }
}

/// Client→server observer.
#[derive(Debug, Default)]
pub struct FrontendScanner {
    hdr: [u8; 5],
    hdr_len: usize,
    remaining: usize,
    /// Query/Sync/FunctionCall messages sent whose `ReadyForQuery` has not been seen yet.
    pub awaiting_ready: u64,
    /// An extended-protocol batch (Parse/Bind/...) was started and not yet ended by Sync.
    pub open_batch: bool,
    /// The client sent Terminate.
    pub terminated: bool,
    /// Syncs since the last Execute or Query: if that started a COPY FROM STDIN, the server
    /// ignores them (see [`FrontendScanner::copy_in_started`]).
    syncs_since_execute: u64,
    /// The server answered with CopyInResponse and the client has not ended the COPY yet.
    in_copy_in: bool,
}

impl FrontendScanner {
    /// True when the observed bytes end at a message boundary.
    pub fn at_boundary(&self) -> bool {
        self.hdr_len == 0 && self.remaining == 0
    }

    /// Observes bytes sent by the client; returns how many of them belong to messages up to
    /// and including a Terminate (all of them if there was none).
    pub fn observe(&mut self, buf: &[u8]) -> Result<usize, ProtocolError> {
        let mut pos = 0;
        while pos < buf.len() {
            if self.terminated {
                return Ok(pos);
            }
            if self.remaining > 0 {
                let n = self.remaining.min(buf.len() - pos);
                pos += n;
                self.remaining -= n;
                continue;
            }
            let n = (5 - self.hdr_len).min(buf.len() - pos);
            self.hdr[self.hdr_len..self.hdr_len + n].copy_from_slice(&buf[pos..pos + n]);
            self.hdr_len += n;
            pos += n;
            if self.hdr_len < 5 {
                break;
            }
            self.hdr_len = 0;
            let ty = self.hdr[0];
            let len =
                u32::from_be_bytes([self.hdr[1], self.hdr[2], self.hdr[3], self.hdr[4]]) as usize;
            if len < 4 {
                return Err(ProtocolError(format!(
                    "client sent message '{}' with invalid length {len}",
                    ty.escape_ascii()
                )));
            }
            self.remaining = len - 4;
            match ty {
                b'Q' => {
                    self.awaiting_ready += 1;
                    self.syncs_since_execute = 0;
                }
                b'F' => self.awaiting_ready += 1,
                b'S' => {
                    self.awaiting_ready += 1;
                    self.syncs_since_execute += 1;
                    self.open_batch = false;
                }
                b'E' => {
                    self.open_batch = true;
                    self.syncs_since_execute = 0;
                }
                b'P' | b'B' | b'D' | b'C' | b'H' => self.open_batch = true,
                // CopyDone / CopyFail: the server leaves COPY FROM STDIN mode, in which it
                // ignored every Sync (libpq and tokio-postgres send one right after the
                // Execute, and another after CopyDone): those get no ReadyForQuery.
                b'c' | b'f' if self.in_copy_in => {
                    self.in_copy_in = false;
                    self.awaiting_ready =
                        self.awaiting_ready.saturating_sub(self.syncs_since_execute);
                    self.syncs_since_execute = 0;
                }
                b'X' => self.terminated = true,
                _ => {}
            }
        }
        Ok(pos)
    }

    /// Records a `CopyInResponse` from the server: the Syncs the client sent since the
    /// Execute (or Query) that started the COPY will be ignored by the server.
    pub fn copy_in_started(&mut self) {
        self.in_copy_in = true;
    }

    /// Records a `ReadyForQuery` from the server.
    pub fn ready_seen(&mut self) {
        self.awaiting_ready = self.awaiting_ready.saturating_sub(1);
    }

    /// True when nothing the client sent is still waiting for an answer.
    pub fn quiescent(&self) -> bool {
        self.awaiting_ready == 0 && !self.open_batch && self.at_boundary() && !self.terminated
    }
}

#[cfg(test)]
mod sasl_tests {
    #[test]
    fn channel_binding_is_hidden_in_place() {
        let mut body = [
            &[0u8, 0, 0, 10][..],
            b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0",
        ]
        .concat();
        let len = body.len();
        assert!(super::hide_channel_binding(&mut body));
        assert_eq!(body.len(), len);
        assert_eq!(&body[4..], b"pgtwig-no-cb-proxy\0SCRAM-SHA-256\0\0");
        // Other authentication requests are left alone.
        let mut md5 = [0u8, 0, 0, 5, 1, 2, 3, 4];
        assert!(!super::hide_channel_binding(&mut md5));
        let mut plain = [&[0u8, 0, 0, 10][..], b"SCRAM-SHA-256\0\0"].concat();
        assert!(!super::hide_channel_binding(&mut plain));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Rec {
        ready: Vec<u8>,
        keys: Vec<Vec<u8>>,
        stop_on_idle: bool,
    }

    impl BackendEvents for Rec {
        fn ready_for_query(&mut self, status: u8) -> bool {
            self.ready.push(status);
            self.stop_on_idle && status == b'I'
        }
        fn backend_key_data(&mut self, body: &mut [u8]) {
            self.keys.push(body.to_vec());
            body.copy_from_slice(&[0, 0, 0, 9, 0, 0, 0, 8]);
        }
    }

    fn msg(ty: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![ty];
        v.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn stream() -> Vec<u8> {
        [
            msg(b'R', &[0, 0, 0, 0]),
            msg(b'S', b"client_encoding\0UTF8\0"),
            msg(b'K', &[0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]),
            msg(b'Z', b"I"),
            msg(b'T', &[0; 30]),
            msg(b'D', &[7; 100]),
            msg(b'C', b"SELECT 1\0"),
            msg(b'Z', b"T"),
        ]
        .concat()
    }

    /// Feeds `input` in chunks of `chunk` bytes the way the relay does (keeping unsafe tails).
    fn feed(input: &[u8], chunk: usize, rec: &mut Rec) -> (Vec<u8>, bool) {
        let mut sc = BackendScanner::default();
        let mut out = Vec::new();
        let mut pending: Vec<u8> = Vec::new();
        for c in input.chunks(chunk) {
            pending.extend_from_slice(c);
            let r = sc.scan(&mut pending, rec).unwrap();
            assert!(pending.len() - r.safe <= MAX_HELD_MESSAGE);
            out.extend_from_slice(&pending[..r.safe]);
            pending.drain(..r.safe);
            if r.stop {
                return (out, true);
            }
        }
        assert!(pending.is_empty());
        (out, false)
    }

    #[test]
    fn every_split_point_gives_the_same_events_and_bytes() {
        let input = stream();
        let mut expect = input.clone();
        let kpos = input.iter().position(|&b| b == b'K').unwrap();
        expect[kpos + 5..kpos + 13].copy_from_slice(&[0, 0, 0, 9, 0, 0, 0, 8]);
        for chunk in 1..=input.len() {
            let mut rec = Rec::default();
            let (out, stopped) = feed(&input, chunk, &mut rec);
            assert!(!stopped);
            assert_eq!(rec.ready, b"IT", "chunk {chunk}");
            assert_eq!(rec.keys, vec![vec![0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef]]);
            assert_eq!(out, expect, "chunk {chunk}");
        }
    }

    #[test]
    fn stop_cuts_right_after_ready_for_query() {
        let mut input = stream();
        input.extend(msg(b'A', b"notify"));
        let mut rec = Rec {
            stop_on_idle: true,
            ..Default::default()
        };
        let (out, stopped) = feed(&input, 7, &mut rec);
        assert!(stopped);
        let first_z = input.windows(6).position(|w| w == msg(b'Z', b"I")).unwrap();
        assert_eq!(out.len(), first_z + 6);
    }

    #[test]
    fn reports_the_end_of_the_first_ready_for_query() {
        let input = stream();
        let mut sc = BackendScanner::default();
        let mut buf = input.clone();
        let r = sc.scan(&mut buf, &mut Rec::default()).unwrap();
        let first_z = input.windows(6).position(|w| w == msg(b'Z', b"I")).unwrap();
        assert_eq!(r.first_ready_end, Some(first_z + 6));
        assert_eq!(r.safe, input.len());
    }

    #[test]
    fn rejects_bad_lengths() {
        let mut sc = BackendScanner::default();
        let mut rec = Rec::default();
        assert!(sc.scan(&mut [b'D', 0, 0, 0, 3], &mut rec).is_err());
        let mut sc = BackendScanner::default();
        assert!(sc.scan(&mut msg(b'Z', b"II"), &mut rec).is_err());
        let mut sc = BackendScanner::default();
        let mut huge = vec![b'K'];
        huge.extend_from_slice(&100_000u32.to_be_bytes());
        assert!(sc.scan(&mut huge, &mut rec).is_err());
        // BackendKeyData bodies other than 8 bytes (pid + 4-byte secret) are refused.
        for body in [&[0u8; 4][..], &[0; 7], &[0; 9], &[0; 36]] {
            let mut sc = BackendScanner::default();
            let e = sc.scan(&mut msg(b'K', body), &mut rec).unwrap_err();
            assert!(e.0.contains("BackendKeyData"), "{e}");
        }
        assert!(rec.keys.is_empty());
    }

    #[test]
    fn large_messages_pass_without_holding_back() {
        let mut sc = BackendScanner::default();
        let mut rec = Rec::default();
        let big = msg(b'D', &vec![1; 100_000]);
        let mut part = big[..1000].to_vec();
        let r = sc.scan(&mut part, &mut rec).unwrap();
        assert_eq!(r.safe, 1000);
        assert!(!sc.at_boundary());
        let mut rest = big[1000..].to_vec();
        assert_eq!(sc.scan(&mut rest, &mut rec).unwrap().safe, rest.len());
        assert!(sc.at_boundary());
        assert_eq!(sc.last_type(), b'D');
    }

    #[test]
    fn frontend_counts_syncs_and_terminate_across_splits() {
        let input = [
            msg(b'Q', b"select 1\0"),
            msg(b'P', b"\0select 2\0\0\0"),
            msg(b'B', &[0; 10]),
            msg(b'E', &[0; 9]),
            msg(b'S', b""),
            msg(b'X', b""),
            msg(b'Q', b"ignored\0"),
        ]
        .concat();
        let x_end = input.len() - msg(b'Q', b"ignored\0").len();
        for chunk in 1..=input.len() {
            let mut fe = FrontendScanner::default();
            let mut passed = 0;
            let mut states = Vec::new();
            for c in input.chunks(chunk) {
                passed += fe.observe(c).unwrap();
                states.push(fe.open_batch);
            }
            assert_eq!(passed, x_end, "chunk {chunk}");
            assert_eq!(fe.awaiting_ready, 2);
            assert!(fe.terminated);
            assert!(!fe.open_batch);
            fe.ready_seen();
            fe.ready_seen();
            fe.ready_seen();
            assert_eq!(fe.awaiting_ready, 0);
        }
    }

    #[test]
    fn syncs_during_copy_in_expect_no_ready_for_query() {
        // tokio-postgres / libpq extended COPY FROM STDIN: Bind, Execute, Sync, then the data,
        // CopyDone and another Sync. The server ignores the first Sync (it came in COPY
        // mode) and answers the second with the only ReadyForQuery.
        let mut fe = FrontendScanner::default();
        fe.observe(&[msg(b'B', &[0; 8]), msg(b'E', &[0; 5]), msg(b'S', b"")].concat())
            .unwrap();
        fe.copy_in_started();
        fe.observe(&[msg(b'd', b"1\n"), msg(b'c', b""), msg(b'S', b"")].concat())
            .unwrap();
        fe.ready_seen();
        assert!(fe.quiescent(), "awaiting {}", fe.awaiting_ready);
        // Simple-protocol COPY: nothing to discount.
        fe.observe(&msg(b'Q', b"copy t from stdin\0")).unwrap();
        fe.copy_in_started();
        fe.observe(&[msg(b'd', b"1\n"), msg(b'c', b"")].concat())
            .unwrap();
        assert_eq!(fe.awaiting_ready, 1);
        fe.ready_seen();
        assert!(fe.quiescent());
        // A CopyFail nobody asked for (the COPY never started) changes nothing.
        fe.observe(&[msg(b'f', b"x\0"), msg(b'S', b"")].concat())
            .unwrap();
        assert_eq!(fe.awaiting_ready, 1);
    }

    #[test]
    fn frontend_quiescence() {
        let mut fe = FrontendScanner::default();
        assert!(fe.quiescent());
        let q = msg(b'Q', b"select 1\0");
        fe.observe(&q[..3]).unwrap();
        assert!(!fe.quiescent());
        fe.observe(&q[3..]).unwrap();
        assert!(!fe.quiescent());
        fe.ready_seen();
        assert!(fe.quiescent());
        fe.observe(&msg(b'P', b"\0x\0\0\0")).unwrap();
        assert!(!fe.quiescent(), "open extended batch");
        assert!(fe.observe(&[b'Q', 0, 0, 0, 1]).is_err());
    }
}
