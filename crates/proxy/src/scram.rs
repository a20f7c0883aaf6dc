//! The server half of SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL speaks it: pure message
//! logic, no I/O (`auth.rs` carries the messages).
//!
//! The secret is PostgreSQL's own verifier format
//! (`SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>`), derived from the password by
//! `postgres_protocol::password::scram_sha_256` (SASLprep, random salt) so the proxy never keeps
//! the password itself in memory after start. Channel binding is not offered (the proxy
//! advertises `SCRAM-SHA-256` only): a client that insists on `-PLUS` is refused.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use ring::{digest, hmac};
use subtle::ConstantTimeEq as _;

/// The mechanism the proxy offers in `AuthenticationSASL`.
pub const MECHANISM: &str = "SCRAM-SHA-256";
/// Bytes of randomness in the server's part of the nonce (PostgreSQL uses 18).
const SERVER_NONCE_LEN: usize = 18;
/// Longest client message accepted (client-first or client-final); real ones are ~100 bytes.
pub const MAX_CLIENT_MESSAGE: usize = 1024;

/// A SCRAM-SHA-256 verifier: what the server needs to check a password, not the password.
#[derive(Clone)]
pub struct ScramSecret {
    iterations: u32,
    salt: Vec<u8>,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramSecret(..)")
    }
}

impl ScramSecret {
    /// The verifier of `password` (SASLprep-normalized, fresh random salt, 4096 iterations).
    pub fn from_password(password: &str) -> ScramSecret {
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        ScramSecret::parse(&verifier).expect("postgres-protocol writes valid verifiers")
    }

    /// Parses PostgreSQL's verifier text (`rolpassword` of a SCRAM role).
    pub fn parse(verifier: &str) -> Option<ScramSecret> {
        let rest = verifier.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored, server) = keys.split_once(':')?;
        Some(ScramSecret {
            iterations: iterations.parse().ok().filter(|&i| i > 0)?,
            salt: BASE64.decode(salt).ok()?,
            stored_key: BASE64.decode(stored).ok()?.try_into().ok()?,
            server_key: BASE64.decode(server).ok()?.try_into().ok()?,
        })
    }
}

/// Why an exchange failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ScramError {
    /// The client's message does not follow RFC 5802 (SQLSTATE 08P01).
    Malformed(&'static str),
    /// The client asked for something the proxy does not offer, e.g. channel binding (28000).
    Unsupported(&'static str),
    /// The proof is wrong: wrong password (28P01).
    WrongProof,
}

/// One exchange, server side: `client_first`, then `client_final`.
pub struct ServerExchange<'a> {
    secret: &'a ScramSecret,
    server_nonce: String,
    /// Set by `client_first`.
    state: Option<FirstDone>,
}

struct FirstDone {
    gs2_header: String,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> ServerExchange<'a> {
    /// A new exchange with a random server nonce.
    pub fn new(secret: &'a ScramSecret) -> ServerExchange<'a> {
        let mut raw = [0u8; SERVER_NONCE_LEN];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw)
            .expect("the system's random number generator");
        ServerExchange::with_nonce(secret, BASE64.encode(raw))
    }

    /// A new exchange with a given server nonce (tests).
    pub fn with_nonce(secret: &'a ScramSecret, server_nonce: String) -> ServerExchange<'a> {
        ServerExchange {
            secret,
            server_nonce,
            state: None,
        }
    }

    /// Takes the client-first-message (`n,,n=user,r=nonce`), returns the server-first-message.
    pub fn client_first(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        // gs2-header: cbind-flag "," [authzid] ","
        let mut parts = text.splitn(3, ',');
        let flag = parts.next().unwrap_or_default();
        let authzid = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
        let bare = parts.next().ok_or(ScramError::Malformed("no GS2 header"))?;
        match flag {
            // "n": the client cannot bind; "y": it can but thinks we cannot (we offered no -PLUS).
            "n" | "y" => {}
            f if f.starts_with("p=") => {
                return Err(ScramError::Unsupported(
                    "channel binding was requested, but the proxy did not offer SCRAM-SHA-256-PLUS",
                ))
            }
            _ => return Err(ScramError::Malformed("bad channel-binding flag")),
        }
        if !authzid.is_empty() {
            return Err(ScramError::Unsupported(
                "authorization identities are not supported",
            ));
        }
        // client-first-message-bare: [reserved-mext ","] username "," nonce ["," extensions]
        if bare.starts_with("m=") {
            return Err(ScramError::Unsupported(
                "mandatory SCRAM extensions are not supported",
            ));
        }
        let mut attrs = bare.split(',');
        // PostgreSQL ignores the SCRAM user name (the startup packet's user counts); so do we.
        attrs
            .next()
            .filter(|a| a.starts_with("n="))
            .ok_or(ScramError::Malformed("no user name attribute"))?;
        let client_nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .filter(|n| !n.is_empty() && n.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b','))
            .ok_or(ScramError::Malformed("no valid nonce"))?;
        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            BASE64.encode(&self.secret.salt),
            self.secret.iterations
        );
        self.state = Some(FirstDone {
            gs2_header: format!("{flag},{authzid},"),
            client_first_bare: bare.to_string(),
            server_first: server_first.clone(),
            nonce,
        });
        Ok(server_first.into_bytes())
    }

    /// Takes the client-final-message (`c=...,r=...,p=...`), checks the proof and returns the
    /// server-final-message (`v=...`) the client uses to check the server.
    pub fn client_final(&mut self, message: &[u8]) -> Result<Vec<u8>, ScramError> {
        let first = self
            .state
            .take()
            .ok_or(ScramError::Malformed("client-final before client-first"))?;
        let text = std::str::from_utf8(message).map_err(|_| ScramError::Malformed("not UTF-8"))?;
        let (without_proof, proof) = text
            .rsplit_once(",p=")
            .ok_or(ScramError::Malformed("no proof"))?;
        let mut attrs = without_proof.split(',');
        let binding = attrs
            .next()
            .and_then(|a| a.strip_prefix("c="))
            .ok_or(ScramError::Malformed("no channel binding attribute"))?;
        if BASE64.decode(binding).ok().as_deref() != Some(first.gs2_header.as_bytes()) {
            return Err(ScramError::Malformed(
                "channel binding attribute does not match the GS2 header",
            ));
        }
        let nonce = attrs
            .next()
            .and_then(|a| a.strip_prefix("r="))
            .ok_or(ScramError::Malformed("no nonce"))?;
        if nonce != first.nonce {
            return Err(ScramError::Malformed("nonce does not match"));
        }
        let proof: [u8; 32] = BASE64
            .decode(proof)
            .ok()
            .and_then(|p| p.try_into().ok())
            .ok_or(ScramError::Malformed("proof is not 32 bytes of base64"))?;
        let auth_message = format!(
            "{},{},{without_proof}",
            first.client_first_bare, first.server_first
        );
        let stored = hmac::Key::new(hmac::HMAC_SHA256, &self.secret.stored_key);
        let client_signature = hmac::sign(&stored, auth_message.as_bytes());
        let mut client_key = proof;
        for (k, s) in client_key.iter_mut().zip(client_signature.as_ref()) {
            *k ^= s;
        }
        let computed = digest::digest(&digest::SHA256, &client_key);
        if !bool::from(computed.as_ref().ct_eq(&self.secret.stored_key)) {
            return Err(ScramError::WrongProof);
        }
        let server = hmac::Key::new(hmac::HMAC_SHA256, &self.secret.server_key);
        let server_signature = hmac::sign(&server, auth_message.as_bytes());
        Ok(format!("v={}", BASE64.encode(server_signature.as_ref())).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256};

    /// Runs postgres-protocol's client half against our server half.
    fn exchange(client_password: &str, secret: &ScramSecret) -> Result<(), ScramError> {
        let mut client =
            ScramSha256::new(client_password.as_bytes(), ChannelBinding::unsupported());
        let mut server = ServerExchange::new(secret);
        let server_first = server.client_first(client.message())?;
        client
            .update(&server_first)
            .expect("client accepts server-first");
        let server_final = server.client_final(client.message())?;
        client
            .finish(&server_final)
            .expect("client verifies the server signature");
        Ok(())
    }

    #[test]
    fn right_password_passes_and_the_client_verifies_the_server() {
        let secret = ScramSecret::from_password("s3cret pässword");
        exchange("s3cret pässword", &secret).unwrap();
    }

    #[test]
    fn wrong_password_is_a_wrong_proof() {
        let secret = ScramSecret::from_password("right");
        assert_eq!(exchange("wrong", &secret), Err(ScramError::WrongProof));
    }

    #[test]
    fn verifier_round_trip() {
        let v = postgres_protocol::password::scram_sha_256(b"pw");
        let s = ScramSecret::parse(&v).unwrap();
        assert_eq!(s.iterations, 4096);
        assert!(ScramSecret::parse("md5abc").is_none());
        assert!(ScramSecret::parse("SCRAM-SHA-256$0:AAAA$AAAA:AAAA").is_none());
    }

    #[test]
    fn channel_binding_and_bad_messages_are_refused() {
        let secret = ScramSecret::from_password("pw");
        let mut s = ServerExchange::new(&secret);
        assert!(matches!(
            s.client_first(b"p=tls-server-end-point,,n=,r=abc"),
            Err(ScramError::Unsupported(_))
        ));
        let mut s = ServerExchange::new(&secret);
        assert!(matches!(
            s.client_first(b"n,,n=,"),
            Err(ScramError::Malformed(_))
        ));
        let mut s = ServerExchange::new(&secret);
        assert!(matches!(
            s.client_first(b"garbage"),
            Err(ScramError::Malformed(_))
        ));
        let mut s = ServerExchange::new(&secret);
        assert!(matches!(
            s.client_first(b"n,a=x,n=,r=abc"),
            Err(ScramError::Unsupported(_))
        ));
        let mut s = ServerExchange::new(&secret);
        assert!(matches!(
            s.client_final(b"c=biws,r=x,p=AAAA"),
            Err(ScramError::Malformed(_))
        ));
    }

    #[test]
    fn a_replayed_or_altered_final_message_is_refused() {
        let secret = ScramSecret::from_password("pw");
        let mut client = ScramSha256::new(b"pw", ChannelBinding::unsupported());
        let mut server = ServerExchange::with_nonce(&secret, "SERVERNONCE".into());
        let first = server.client_first(client.message()).unwrap();
        client.update(&first).unwrap();
        let fin = String::from_utf8(client.message().to_vec()).unwrap();
        let altered = fin.replace("SERVERNONCE", "SERVERNONCF");
        assert_eq!(
            server.client_final(altered.as_bytes()),
            Err(ScramError::Malformed("nonce does not match"))
        );
        // The state is consumed: the same exchange cannot be tried twice.
        assert!(server.client_final(fin.as_bytes()).is_err());
    }
}
