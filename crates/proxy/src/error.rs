//! Building Postgres `ErrorResponse` messages the proxy sends on its own behalf.
//!
//! Pure message formatting, no I/O. Every refusal the proxy makes reaches the client as a
//! well-formed `ErrorResponse` with a SQLSTATE, so libpq and drivers show a readable error
//! instead of "server closed the connection unexpectedly".

use crate::router::RouteError;

/// SQLSTATE codes the proxy uses.
pub mod sqlstate {
    /// `protocol_violation`: malformed or oversized startup packet, startup timeout.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `connection_failure`: the upstream went away.
    pub const CONNECTION_FAILURE: &str = "08006";
    /// `invalid_catalog_name`: the database branch does not exist.
    pub const INVALID_CATALOG_NAME: &str = "3D000";
    /// `cannot_connect_now`: the branch's server could not be started or reached.
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `admin_shutdown`: the session was closed because the active branch changed.
    pub const ADMIN_SHUTDOWN: &str = "57P01";
    /// `feature_not_supported`: e.g. an unsupported protocol major version.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
    /// `internal_error`.
    pub const INTERNAL_ERROR: &str = "XX000";
    /// `invalid_password`: the client's SCRAM proof did not match the proxy password.
    pub const INVALID_PASSWORD: &str = "28P01";
    /// `invalid_authorization_specification`: the client cannot authenticate the way the
    /// proxy asks (e.g. it insists on channel binding, or sent no SASL response).
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `too_many_connections`: the proxy is out of file descriptors.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
}

/// A Postgres error the proxy reports to a client (always `FATAL`: the connection closes after it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// Five-character SQLSTATE.
    pub code: &'static str,
    /// Primary message.
    pub message: String,
    /// Optional `DETAIL`.
    pub detail: Option<String>,
    /// Optional `HINT`.
    pub hint: Option<String>,
}

impl PgError {
    /// A FATAL error with `code` and `message`.
    pub fn fatal(code: &'static str, message: impl Into<String>) -> Self {
        PgError {
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    /// Adds a `DETAIL` field.
    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    /// Adds a `HINT` field.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Encodes the `ErrorResponse` ('E') message.
    pub fn encode(&self) -> Vec<u8> {
        let mut body = Vec::with_capacity(64 + self.message.len());
        push_field(&mut body, b'S', "FATAL");
        push_field(&mut body, b'V', "FATAL");
        push_field(&mut body, b'C', self.code);
        push_field(&mut body, b'M', &self.message);
        if let Some(d) = &self.detail {
            push_field(&mut body, b'D', d);
        }
        if let Some(h) = &self.hint {
            push_field(&mut body, b'H', h);
        }
        body.push(0);
        let mut out = Vec::with_capacity(body.len() + 5);
        out.push(b'E');
        out.extend_from_slice(&((body.len() + 4) as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }
}

fn push_field(buf: &mut Vec<u8>, tag: u8, value: &str) {
    buf.push(tag);
    // Postgres strings are NUL-terminated: an embedded NUL would cut the field short and
    // desynchronise the parser, so drop any.
    buf.extend(value.bytes().filter(|&b| b != 0));
    buf.push(0);
}

impl From<&RouteError> for PgError {
    fn from(e: &RouteError) -> Self {
        match e {
            RouteError::BranchMissing { branch } => PgError::fatal(
                sqlstate::INVALID_CATALOG_NAME,
                format!("database branch \"{branch}\" does not exist"),
            )
            .hint(format!("create it with `pgtwig branch create {branch}`")),
            RouteError::StartFailed { branch, detail } => PgError::fatal(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("the server of database branch \"{branch}\" could not be started"),
            )
            .detail(detail.clone()),
            RouteError::TooManyConnections(detail) => {
                crate::listen::too_many_connections().detail(detail.clone())
            }
            RouteError::Other(msg) => PgError::fatal(sqlstate::INTERNAL_ERROR, msg.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use postgres_protocol::message::backend::{ErrorFields, Message};

    fn parse(bytes: &[u8]) -> Vec<(u8, String)> {
        let mut buf = bytes::BytesMut::from(bytes);
        let msg = Message::parse(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let Message::ErrorResponse(body) = msg else {
            panic!("not an ErrorResponse")
        };
        let mut out = Vec::new();
        let mut fields = body.fields();
        while let Some(f) = fallible_next(&mut fields) {
            out.push((
                f.type_(),
                String::from_utf8(f.value_bytes().to_vec()).unwrap(),
            ));
        }
        out
    }

    fn fallible_next<'a>(
        it: &mut ErrorFields<'a>,
    ) -> Option<postgres_protocol::message::backend::ErrorField<'a>> {
        use fallible_iterator::FallibleIterator;
        it.next().unwrap()
    }

    #[test]
    fn encodes_fields_parsable_by_postgres_protocol() {
        let e = PgError::from(&RouteError::BranchMissing {
            branch: "feat".into(),
        });
        let fields = parse(&e.encode());
        assert!(fields.contains(&(b'C', "3D000".into())));
        assert!(fields.contains(&(b'S', "FATAL".into())));
        assert!(fields.contains(&(b'M', "database branch \"feat\" does not exist".into())));
        assert!(fields.contains(&(b'H', "create it with `pgtwig branch create feat`".into())));
    }

    #[test]
    fn strips_embedded_nuls() {
        let e = PgError::fatal(sqlstate::INTERNAL_ERROR, "a\0b").detail("x");
        let fields = parse(&e.encode());
        assert!(fields.contains(&(b'M', "ab".into())));
        assert!(fields.contains(&(b'D', "x".into())));
    }

    #[test]
    fn start_failed_maps_to_57p03() {
        let e = PgError::from(&RouteError::StartFailed {
            branch: "b".into(),
            detail: "see /x/log".into(),
        });
        assert_eq!(e.code, "57P03");
        assert_eq!(e.detail.as_deref(), Some("see /x/log"));
        assert_eq!(
            PgError::from(&RouteError::Other("boom".into())).code,
            "XX000"
        );
    }
}
