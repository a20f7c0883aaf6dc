//! The startup phase's message formats: the client's first packet (SSLRequest, GSSENCRequest,
//! CancelRequest or StartupMessage — or a TLS ClientHello, see [`TLS_HANDSHAKE_RECORD`]),
//! pinning (`dbname=app@branch`), protocol negotiation, and the startup message the proxy
//! forwards upstream. Pure functions, no I/O.

use crate::error::{sqlstate, PgError};

/// `SSLRequest` request code.
pub const SSL_REQUEST_CODE: u32 = 80877103;
/// `GSSENCRequest` request code.
pub const GSSENC_REQUEST_CODE: u32 = 80877104;
/// `CancelRequest` request code.
pub const CANCEL_REQUEST_CODE: u32 = 80877102;
/// Protocol 3.0, the only version the proxy speaks to upstreams.
pub const PROTOCOL_3_0: u32 = 3 << 16;
/// First byte of a TLS handshake record: a client opening with a ClientHello (PostgreSQL 17
/// `sslnegotiation=direct`) instead of a startup packet. Never the first byte of a startup
/// packet's length word, which would then be over 369 MB.
pub const TLS_HANDSHAKE_RECORD: u8 = 0x16;

/// Smallest first packet: length word plus a request code.
const MIN_PACKET: usize = 8;

/// One parameter of a startup message, bytes as sent (Postgres does not require UTF-8 here).
pub type Param = (Vec<u8>, Vec<u8>);

/// The client's first packet (or the first one after TLS negotiation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// Client wants TLS.
    SslRequest,
    /// Client wants GSSAPI encryption (always refused with `N`).
    GssEncRequest,
    /// Cancel the query running on the session with this key.
    Cancel {
        /// Process id from BackendKeyData.
        pid: u32,
        /// Secret key (4 bytes in protocol 3.0, up to 256 in 3.2).
        secret: Vec<u8>,
    },
    /// A real startup message.
    Startup(Startup),
}

/// A parsed `StartupMessage`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    /// Protocol major version (3).
    pub major: u16,
    /// Protocol minor version (0, or 2 for PG18 clients asking for 3.2).
    pub minor: u16,
    /// Parameters in the order sent.
    pub params: Vec<Param>,
}

impl Startup {
    /// The value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.params
            .iter()
            .find(|(k, _)| k == name.as_bytes())
            .map(|(_, v)| v.as_slice())
    }

    /// The value of parameter `name`, lossily decoded for display.
    pub fn get_str(&self, name: &str) -> Option<String> {
        self.get(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }
}

/// Checks the length word of a first packet; returns the body length (after the length word).
pub fn check_length(len_word: [u8; 4], max_packet: usize) -> Result<usize, PgError> {
    let len = u32::from_be_bytes(len_word) as usize;
    if len < MIN_PACKET || len > max_packet {
        return Err(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "invalid length of startup packet",
        ));
    }
    Ok(len - 4)
}

fn malformed(what: &str) -> PgError {
    PgError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("invalid startup packet layout: {what}"),
    )
}

/// Parses the body of a first packet (everything after the length word).
pub fn parse_first_packet(body: &[u8]) -> Result<FirstPacket, PgError> {
    if body.len() < 4 {
        return Err(malformed("too short"));
    }
    let code = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
    let rest = &body[4..];
    match code {
        SSL_REQUEST_CODE | GSSENC_REQUEST_CODE => {
            if !rest.is_empty() {
                return Err(malformed("unexpected bytes after the request code"));
            }
            Ok(if code == SSL_REQUEST_CODE {
                FirstPacket::SslRequest
            } else {
                FirstPacket::GssEncRequest
            })
        }
        CANCEL_REQUEST_CODE => {
            if rest.len() < 8 || rest.len() > 4 + 256 {
                return Err(malformed("bad CancelRequest length"));
            }
            let pid = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
            Ok(FirstPacket::Cancel {
                pid,
                secret: rest[4..].to_vec(),
            })
        }
        _ => {
            let major = (code >> 16) as u16;
            let minor = (code & 0xffff) as u16;
            if major != 3 {
                return Err(PgError::fatal(
                    sqlstate::FEATURE_NOT_SUPPORTED,
                    format!(
                        "unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0"
                    ),
                ));
            }
            Ok(FirstPacket::Startup(Startup {
                major,
                minor,
                params: parse_params(rest)?,
            }))
        }
    }
}

fn parse_params(mut rest: &[u8]) -> Result<Vec<Param>, PgError> {
    let mut params = Vec::new();
    loop {
        let Some(nul) = rest.iter().position(|&b| b == 0) else {
            return Err(malformed("missing terminator"));
        };
        if nul == 0 {
            // The empty name ending the list must be the last byte.
            if rest.len() != 1 {
                return Err(malformed("bytes after the parameter list"));
            }
            return Ok(params);
        }
        let name = rest[..nul].to_vec();
        rest = &rest[nul + 1..];
        let Some(vnul) = rest.iter().position(|&b| b == 0) else {
            return Err(malformed("parameter without a value"));
        };
        params.push((name, rest[..vnul].to_vec()));
        rest = &rest[vnul + 1..];
    }
}

/// Splits a pinned database name `app@branch` into (`app`, `branch`).
///
/// The last `@` separates; both sides must be non-empty and the branch must be UTF-8,
/// otherwise the name is not a pin and is forwarded unchanged.
pub fn split_pin(database: &[u8]) -> Option<(&[u8], &str)> {
    let at = database.iter().rposition(|&b| b == b'@')?;
    let (db, branch) = (&database[..at], &database[at + 1..]);
    if db.is_empty() || branch.is_empty() {
        return None;
    }
    Some((db, std::str::from_utf8(branch).ok()?))
}

/// What the proxy does with a client's startup message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartupPlan {
    /// The startup packet (length word included) to send upstream: protocol 3.0, pin stripped,
    /// `_pq_.` options removed, everything else unchanged and in order.
    pub upstream_packet: Vec<u8>,
    /// The branch named with `dbname=app@branch`, if any.
    pub pinned: Option<String>,
    /// A `NegotiateProtocolVersion` message to send the client first, if it asked for more
    /// than 3.0 or sent `_pq_.` options.
    pub negotiate: Option<Vec<u8>>,
}

/// Decides how to forward a startup message.
pub fn plan_startup(startup: &Startup) -> StartupPlan {
    let mut pinned = None;
    let mut unrecognized: Vec<&[u8]> = Vec::new();
    let mut params: Vec<(&[u8], &[u8])> = Vec::with_capacity(startup.params.len());
    for (k, v) in &startup.params {
        if k.starts_with(b"_pq_.") {
            unrecognized.push(k);
            continue;
        }
        if k == b"database" {
            if let Some((db, branch)) = split_pin(v) {
                pinned = Some(branch.to_owned());
                params.push((k, db));
                continue;
            }
        }
        params.push((k, v));
    }
    let negotiate = (startup.minor > 0 || !unrecognized.is_empty())
        .then(|| negotiate_protocol_version(0, &unrecognized));
    StartupPlan {
        upstream_packet: encode_startup(&params),
        pinned,
        negotiate,
    }
}

/// Encodes a protocol 3.0 `StartupMessage`.
pub fn encode_startup(params: &[(&[u8], &[u8])]) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    out.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
    out.push(0);
    let len = out.len() as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Encodes `NegotiateProtocolVersion` ('v').
pub fn negotiate_protocol_version(minor: u32, unrecognized: &[&[u8]]) -> Vec<u8> {
    let mut out = vec![b'v', 0, 0, 0, 0];
    out.extend_from_slice(&minor.to_be_bytes());
    out.extend_from_slice(&(unrecognized.len() as u32).to_be_bytes());
    for o in unrecognized {
        out.extend_from_slice(o);
        out.push(0);
    }
    let len = (out.len() - 1) as u32;
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_body(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
        let mut p = encode_startup(
            &params
                .iter()
                .map(|(k, v)| (k.as_bytes(), v.as_bytes()))
                .collect::<Vec<_>>(),
        );
        p[4..8].copy_from_slice(&version.to_be_bytes());
        p.split_off(4)
    }

    #[test]
    fn encode_matches_postgres_protocol() {
        let mut theirs = bytes::BytesMut::new();
        postgres_protocol::message::frontend::startup_message(
            [("user", "u"), ("database", "d")],
            &mut theirs,
        )
        .unwrap();
        assert_eq!(
            encode_startup(&[(b"user", b"u"), (b"database", b"d")]),
            theirs.to_vec()
        );
    }

    #[test]
    fn parses_requests() {
        assert_eq!(
            parse_first_packet(&SSL_REQUEST_CODE.to_be_bytes()).unwrap(),
            FirstPacket::SslRequest
        );
        assert_eq!(
            parse_first_packet(&GSSENC_REQUEST_CODE.to_be_bytes()).unwrap(),
            FirstPacket::GssEncRequest
        );
        let mut buf = bytes::BytesMut::new();
        postgres_protocol::message::frontend::cancel_request(42, 7, &mut buf);
        assert_eq!(
            check_length(buf[..4].try_into().unwrap(), 10_000).unwrap(),
            12
        );
        assert_eq!(
            parse_first_packet(&buf[4..]).unwrap(),
            FirstPacket::Cancel {
                pid: 42,
                secret: 7i32.to_be_bytes().to_vec()
            }
        );
    }

    #[test]
    fn rejects_bad_lengths() {
        assert_eq!(
            check_length(3u32.to_be_bytes(), 10_000).unwrap_err().code,
            "08P01"
        );
        assert_eq!(
            check_length(10_001u32.to_be_bytes(), 10_000)
                .unwrap_err()
                .code,
            "08P01"
        );
        assert_eq!(
            check_length(u32::MAX.to_be_bytes(), 10_000)
                .unwrap_err()
                .code,
            "08P01"
        );
        assert_eq!(check_length(8u32.to_be_bytes(), 10_000).unwrap(), 4);
    }

    #[test]
    fn rejects_malformed_params() {
        let mut body = startup_body(PROTOCOL_3_0, &[("user", "u")]);
        body.pop(); // drop the terminator
        assert_eq!(parse_first_packet(&body).unwrap_err().code, "08P01");
        let mut body = PROTOCOL_3_0.to_be_bytes().to_vec();
        body.extend_from_slice(b"user\0");
        assert_eq!(parse_first_packet(&body).unwrap_err().code, "08P01");
        let mut body = startup_body(PROTOCOL_3_0, &[("user", "u")]);
        body.push(b'x');
        assert_eq!(parse_first_packet(&body).unwrap_err().code, "08P01");
        let body = startup_body(2 << 16, &[("user", "u")]);
        assert_eq!(parse_first_packet(&body).unwrap_err().code, "0A000");
        let mut ssl = SSL_REQUEST_CODE.to_be_bytes().to_vec();
        ssl.push(0);
        assert!(parse_first_packet(&ssl).is_err());
        assert!(parse_first_packet(&[1, 2]).is_err());
    }

    #[test]
    fn pin_syntax() {
        assert_eq!(split_pin(b"app@main"), Some((&b"app"[..], "main")));
        assert_eq!(split_pin(b"a@b@feat/x"), Some((&b"a@b"[..], "feat/x")));
        assert_eq!(split_pin(b"app"), None);
        assert_eq!(split_pin(b"app@"), None);
        assert_eq!(split_pin(b"@main"), None);
    }

    #[test]
    fn plan_strips_pin_and_keeps_other_params() {
        let body = startup_body(
            PROTOCOL_3_0,
            &[
                ("user", "me"),
                ("database", "app@feature"),
                ("application_name", "psql"),
                ("options", "-c search_path=x"),
            ],
        );
        let FirstPacket::Startup(s) = parse_first_packet(&body).unwrap() else {
            panic!()
        };
        let plan = plan_startup(&s);
        assert_eq!(plan.pinned.as_deref(), Some("feature"));
        assert_eq!(plan.negotiate, None);
        let expect = encode_startup(&[
            (b"user", b"me"),
            (b"database", b"app"),
            (b"application_name", b"psql"),
            (b"options", b"-c search_path=x"),
        ]);
        assert_eq!(plan.upstream_packet, expect);
    }

    #[test]
    fn unpinned_startup_is_forwarded_byte_for_byte() {
        let body = startup_body(PROTOCOL_3_0, &[("user", "me"), ("database", "app")]);
        let FirstPacket::Startup(s) = parse_first_packet(&body).unwrap() else {
            panic!()
        };
        let plan = plan_startup(&s);
        assert_eq!(plan.pinned, None);
        assert_eq!(&plan.upstream_packet[4..], &body[..]);
    }

    #[test]
    fn protocol_3_2_is_negotiated_down() {
        let body = startup_body(
            (3 << 16) | 2,
            &[("user", "me"), ("_pq_.test_opt", "1"), ("database", "d")],
        );
        let FirstPacket::Startup(s) = parse_first_packet(&body).unwrap() else {
            panic!()
        };
        assert_eq!((s.major, s.minor), (3, 2));
        let plan = plan_startup(&s);
        assert_eq!(
            plan.upstream_packet,
            encode_startup(&[(b"user", b"me"), (b"database", b"d")])
        );
        let expect: Vec<u8> = [
            &b"v"[..],
            &(4u32 + 4 + 4 + 14).to_be_bytes(),
            &0u32.to_be_bytes(),
            &1u32.to_be_bytes(),
            b"_pq_.test_opt\0",
        ]
        .concat();
        assert_eq!(plan.negotiate.unwrap(), expect);
    }
}
