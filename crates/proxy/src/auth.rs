//! Who may use the proxy: the daemon's own OS user gets in as it would on a branch's private
//! socket; everyone else proves they know the proxy password with SCRAM-SHA-256.
//!
//! Why: the branch servers trust their private Unix socket (only their owner, and root, can
//! reach it). A proxy that relays any TCP client there would hand that trust to every local
//! account, container and process. So, as PostgreSQL's own `peer` method does on a Unix
//! socket, the proxy first asks the kernel who owns the connecting socket:
//! - Unix socket: `SO_PEERCRED` ([`crate::peer::unix_peer`]);
//! - loopback TCP: the client socket's owner from the kernel's socket table
//!   ([`crate::peer::tcp_peer_owner`]);
//! - anything else (another address, an owner that cannot be found): unknown.
//!
//! The owner is admitted without a password; anyone else gets `AuthenticationSASL` and must
//! complete SCRAM-SHA-256 against [`ClientAuth::secret`] before the session is routed, so an
//! unauthenticated client can neither reach nor wake a branch. Refusals are `ErrorResponse`s
//! naming the way in ([`ClientAuth::hint`]): 28P01 for a wrong password, 28000 for a client
//! that cannot do SCRAM the way the proxy offers it.

use std::net::SocketAddr;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::error::{sqlstate, PgError};
use crate::scram::{ScramError, ScramSecret, ServerExchange, MAX_CLIENT_MESSAGE, MECHANISM};

/// How the proxy authenticates clients (see the module docs).
#[derive(Debug, Clone)]
pub struct ClientAuth {
    /// The OS user admitted without a password (the daemon's own).
    pub owner_uid: u32,
    /// Everyone else must know the password behind this verifier.
    pub secret: ScramSecret,
    /// The HINT of an authentication failure: how to get the password (e.g. "`pgtwig url`
    /// prints a DATABASE_URL with it").
    pub hint: String,
}

/// Where a client connected from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientPeer {
    /// TCP; `local` is the proxy's end.
    Tcp {
        /// The proxy's address of this connection.
        local: SocketAddr,
        /// The client's address.
        remote: SocketAddr,
    },
    /// The proxy's Unix socket, with the peer's credentials when the kernel gave them.
    Unix {
        /// Peer uid.
        uid: Option<u32>,
        /// Peer pid.
        pid: Option<u32>,
    },
}

impl std::fmt::Display for ClientPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientPeer::Tcp { remote, .. } => write!(f, "{remote}"),
            ClientPeer::Unix { pid: Some(pid), .. } => write!(f, "unix socket (pid {pid})"),
            ClientPeer::Unix { .. } => f.write_str("unix socket"),
        }
    }
}

/// Who the kernel says is connecting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// The client's socket belongs to `uid`.
    User {
        /// Owner of the client socket.
        uid: u32,
        /// The client socket's inode (loopback TCP), to find the process holding it.
        socket_inode: Option<u64>,
        /// The client process (Unix socket: the kernel says).
        pid: Option<u32>,
    },
    /// Not determinable; the reason is logged.
    Unknown(String),
}

/// Asks the kernel who owns the client's end. A blocking call (one netlink round trip, or a
/// read of the socket table): cheap, but run off the relay thread by the caller.
pub fn identify(peer: &ClientPeer) -> PeerIdentity {
    match *peer {
        ClientPeer::Unix {
            uid: Some(uid),
            pid,
        } => PeerIdentity::User {
            uid,
            socket_inode: None,
            pid,
        },
        ClientPeer::Unix { uid: None, .. } => {
            PeerIdentity::Unknown("the kernel gave no peer credentials".into())
        }
        ClientPeer::Tcp { local, remote } => {
            if !is_loopback(remote) {
                return PeerIdentity::Unknown(format!("{} is not a loopback address", remote.ip()));
            }
            match crate::peer::tcp_peer_owner(local, remote) {
                Ok(Some(owner)) => PeerIdentity::User {
                    uid: owner.uid,
                    socket_inode: Some(owner.inode).filter(|_| owner.pid.is_none()),
                    pid: owner.pid,
                },
                Ok(None) => PeerIdentity::Unknown(format!(
                    "no socket of this machine is {remote} (another network namespace?)"
                )),
                Err(e) => PeerIdentity::Unknown(format!("looking up the owner of {remote}: {e}")),
            }
        }
    }
}

/// 127.0.0.0/8, ::1, and IPv4-mapped loopback (what a dual-stack socket reports).
fn is_loopback(addr: SocketAddr) -> bool {
    match addr.ip() {
        std::net::IpAddr::V4(v4) => v4.is_loopback(),
        std::net::IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// `AuthenticationSASL` (R, 10) code.
const AUTH_SASL: u32 = 10;
/// `AuthenticationSASLContinue` (R, 11) code.
const AUTH_SASL_CONTINUE: u32 = 11;
/// `AuthenticationSASLFinal` (R, 12) code.
const AUTH_SASL_FINAL: u32 = 12;
/// The frontend message type of SASLInitialResponse and SASLResponse.
const SASL_RESPONSE: u8 = b'p';
/// Frontend `Terminate`.
const TERMINATE: u8 = b'X';

/// Why [`authenticate`] did not let the client in.
#[derive(Debug)]
pub enum AuthFailure {
    /// Tell the client this, then close.
    Refused(PgError),
    /// The client went away (e.g. libpq with no password closes when asked for one).
    Closed,
}

impl From<std::io::Error> for AuthFailure {
    fn from(_: std::io::Error) -> Self {
        AuthFailure::Closed
    }
}

/// Runs SCRAM-SHA-256 with the client for startup user `user`. On success the client has
/// seen `AuthenticationSASLFinal`; the upstream's `AuthenticationOk` (relayed next) ends
/// authentication for it.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    auth: &ClientAuth,
    user: &str,
) -> Result<(), AuthFailure> {
    let failed = |e: ScramError| -> AuthFailure {
        let err = match e {
            ScramError::WrongProof => PgError::fatal(
                sqlstate::INVALID_PASSWORD,
                format!("password authentication failed for user \"{user}\""),
            ),
            ScramError::Unsupported(why) => PgError::fatal(
                sqlstate::INVALID_AUTHORIZATION,
                format!("SCRAM authentication failed for user \"{user}\": {why}"),
            ),
            ScramError::Malformed(why) => PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                format!("malformed SCRAM message: {why}"),
            ),
        };
        AuthFailure::Refused(err.hint(auth.hint.clone()))
    };
    let mut mechanisms = MECHANISM.as_bytes().to_vec();
    mechanisms.extend_from_slice(b"\0\0");
    write_auth(stream, AUTH_SASL, &mechanisms).await?;

    let initial = read_sasl_response(stream, auth, user).await?;
    let (mechanism, data) = parse_initial_response(&initial).map_err(failed)?;
    if mechanism != MECHANISM.as_bytes() {
        return Err(failed(ScramError::Unsupported(
            "the client chose a mechanism the proxy did not offer",
        )));
    }
    let mut exchange = ServerExchange::new(&auth.secret);
    let server_first = exchange.client_first(data).map_err(failed)?;
    write_auth(stream, AUTH_SASL_CONTINUE, &server_first).await?;

    let client_final = read_sasl_response(stream, auth, user).await?;
    let server_final = exchange.client_final(&client_final).map_err(failed)?;
    write_auth(stream, AUTH_SASL_FINAL, &server_final).await?;
    Ok(())
}

async fn write_auth<S: AsyncWrite + Unpin>(
    stream: &mut S,
    code: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut msg = Vec::with_capacity(9 + data.len());
    msg.push(b'R');
    msg.extend_from_slice(&(8 + data.len() as u32).to_be_bytes());
    msg.extend_from_slice(&code.to_be_bytes());
    msg.extend_from_slice(data);
    stream.write_all(&msg).await?;
    stream.flush().await
}

/// Reads one SASL response ('p') body; anything else is a refusal.
async fn read_sasl_response<S: AsyncRead + Unpin>(
    stream: &mut S,
    auth: &ClientAuth,
    user: &str,
) -> Result<Vec<u8>, AuthFailure> {
    let mut header = [0u8; 5];
    stream.read_exact(&mut header).await?;
    let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    match header[0] {
        SASL_RESPONSE => {}
        TERMINATE => return Err(AuthFailure::Closed),
        _ => {
            return Err(AuthFailure::Refused(
                PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!(
                    "password authentication failed for user \"{user}\": expected a SASL response"
                ),
                )
                .hint(auth.hint.clone()),
            ))
        }
    }
    // The initial response adds the mechanism name and a length word to the SCRAM message.
    if !(4..=4 + 64 + MAX_CLIENT_MESSAGE).contains(&len) {
        return Err(AuthFailure::Refused(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            "invalid SASL response length",
        )));
    }
    let mut body = vec![0u8; len - 4];
    stream.read_exact(&mut body).await?;
    Ok(body)
}

/// SASLInitialResponse: mechanism (C string), Int32 length (-1: none), data.
fn parse_initial_response(body: &[u8]) -> Result<(&[u8], &[u8]), ScramError> {
    let nul = body
        .iter()
        .position(|&b| b == 0)
        .ok_or(ScramError::Malformed("no mechanism name"))?;
    let (mechanism, rest) = (&body[..nul], &body[nul + 1..]);
    let len_word: [u8; 4] = rest
        .get(..4)
        .and_then(|w| w.try_into().ok())
        .ok_or(ScramError::Malformed("no initial response length"))?;
    let data = &rest[4..];
    if i32::from_be_bytes(len_word) as i64 != data.len() as i64 {
        return Err(ScramError::Malformed(
            "initial response length does not match",
        ));
    }
    Ok((mechanism, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_includes_mapped_addresses() {
        assert!(is_loopback("127.0.0.1:1".parse().unwrap()));
        assert!(is_loopback("127.8.0.1:1".parse().unwrap()));
        assert!(is_loopback("[::1]:1".parse().unwrap()));
        assert!(is_loopback("[::ffff:127.0.0.1]:1".parse().unwrap()));
        assert!(!is_loopback("10.0.0.1:1".parse().unwrap()));
        assert!(!is_loopback("[::ffff:10.0.0.1]:1".parse().unwrap()));
    }

    #[test]
    fn a_non_loopback_peer_is_unknown() {
        let peer = ClientPeer::Tcp {
            local: "10.1.0.1:5432".parse().unwrap(),
            remote: "10.1.0.2:40000".parse().unwrap(),
        };
        assert!(matches!(identify(&peer), PeerIdentity::Unknown(_)));
    }

    #[test]
    fn initial_response_layout() {
        let mut body = b"SCRAM-SHA-256\0".to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"abc");
        assert_eq!(
            parse_initial_response(&body).unwrap(),
            (&b"SCRAM-SHA-256"[..], &b"abc"[..])
        );
        body.push(b'x');
        assert!(parse_initial_response(&body).is_err());
        assert!(parse_initial_response(b"SCRAM").is_err());
    }
}
