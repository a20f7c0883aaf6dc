//! How a relay ends: what is left goes out, the client gets a FATAL where one is due and the
//! server a Terminate where the client did not send one, or — a clean exit from an idle,
//! reusable session — the server connection is reset and handed back for parking.

use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Inner, RelayEnd, GOODBYE_TIMEOUT, SWITCH_FATAL_GRACE, TERMINATE};
use crate::error::{sqlstate, PgError};
use crate::pool::Parked;

impl Inner {
    /// Says goodbye according to how the relay ended: passes on what is left, sends the
    /// client a FATAL error where one is due and the server a Terminate where the client
    /// did not, then closes both. Bounded by a short timeout.
    ///
    /// When the client left cleanly from an idle, reusable session, the server connection
    /// is reset with `DISCARD ALL` and returned for parking instead.
    pub async fn finish(mut self, end: &RelayEnd) -> Option<Parked> {
        if self.reusable_after(end) && crate::pool::reset(&mut self.server).await {
            let Inner { server, st, .. } = self;
            return Some(Parked {
                server,
                greeting: st.greeting.clone()?,
                real_key: st.real_key.clone()?,
                since: Instant::now(),
            });
        }
        let _ = tokio::time::timeout(GOODBYE_TIMEOUT, self.goodbye(end)).await;
        None
    }

    fn reusable_after(&self, end: &RelayEnd) -> bool {
        matches!(end, RelayEnd::ClientClosed)
            && self.st.x_withheld
            && self.st.greeting.is_some()
            && self.st.real_key.is_some()
            && self.st.status == b'I'
            && self.fe.awaiting_ready == 0
            && !self.fe.open_batch
            && self.be.at_boundary()
            && self.s2c.written == self.s2c.end
    }

    async fn goodbye(&mut self, end: &RelayEnd) {
        let client_msg: Option<PgError> = match end {
            RelayEnd::Switched(msg) => Some(PgError::fatal(sqlstate::ADMIN_SHUTDOWN, msg.clone())),
            RelayEnd::ServerClosed if self.be.last_type() == b'E' && self.be.at_boundary() => None,
            RelayEnd::ServerClosed => Some(
                PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "the database branch's server closed the connection unexpectedly",
                )
                .detail(format!("upstream {}", self.st.upstream)),
            ),
            RelayEnd::ServerError(e) => Some(
                PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    "lost the connection to the database branch's server",
                )
                .detail(format!("upstream {}: {e}", self.st.upstream)),
            ),
            RelayEnd::ServerProtocol(e) => Some(
                PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "protocol error from the server",
                )
                .detail(e.to_string()),
            ),
            RelayEnd::ClientProtocol(e) => Some(
                PgError::fatal(sqlstate::PROTOCOL_VIOLATION, "invalid frontend message")
                    .detail(e.to_string()),
            ),
            RelayEnd::ClientClosed => None,
            RelayEnd::ClientError(e) => {
                tracing::debug!("client connection failed: {e}");
                None
            }
        };
        let client_alive = !matches!(end, RelayEnd::ClientClosed | RelayEnd::ClientError(_));
        let server_alive = !matches!(end, RelayEnd::ServerClosed | RelayEnd::ServerError(_));
        if server_alive {
            // Send Terminate unless the client already did (it was forwarded), and only at a
            // message boundary so the server does not read it as part of another message.
            if (!self.fe.terminated || self.st.x_withheld) && self.fe.at_boundary() {
                let _ = self.server.write_all(&TERMINATE).await;
            }
            let _ = self.server.shutdown().await;
        }
        if client_alive {
            let s2c = &self.s2c;
            let pending = &s2c.buf[s2c.written..s2c.ready];
            if !pending.is_empty() {
                let _ = self.client.write_all(pending).await;
            }
            let switched = matches!(end, RelayEnd::Switched(_));
            if switched {
                let _ = self.client.flush().await;
            }
            // A FATAL in the middle of a server message would garble it: only at a boundary.
            if let Some(err) = client_msg.filter(|_| self.be.at_boundary() || switched) {
                if !switched || self.await_next_client_message().await {
                    let _ = self.client.write_all(&err.encode()).await;
                }
            }
            let _ = self.client.flush().await;
            let _ = self.client.shutdown().await;
        }
    }

    /// A switched session's FATAL must not reach the client together with the ReadyForQuery
    /// before it: libpq reads both in one go, takes an ErrorResponse that arrives while it is
    /// idle for a notice, and its next query fails with "server closed the connection
    /// unexpectedly" and no SQLSTATE (psycopg after COPY or COMMIT did). So the FATAL waits for
    /// the client's next message, and becomes its answer as when a server was terminated
    /// while the client was idle, or [`SWITCH_FATAL_GRACE`] if none comes (by then the
    /// client is idle and will find it with its next query). False if the client left.
    async fn await_next_client_message(&mut self) -> bool {
        let mut buf = [0u8; 512];
        match tokio::time::timeout(SWITCH_FATAL_GRACE, self.client.read(&mut buf)).await {
            Err(_elapsed) => true,
            Ok(Ok(n)) => n > 0 && buf[0] != b'X',
            Ok(Err(_)) => false,
        }
    }
}
