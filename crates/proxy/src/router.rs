//! The routing interface the daemon implements: which upstream server a new session goes to.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;

/// Where a branch's Postgres server listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum UpstreamAddr {
    /// Full path of the socket file, e.g. `/tmp/x/.s.PGSQL.5432`.
    Unix(PathBuf),
    /// A TCP address.
    Tcp {
        /// Host name or IP address.
        host: String,
        /// Port.
        port: u16,
    },
    /// TCP, then TLS after an `SSLRequest`, verifying the server's
    /// certificate for `server_name`, which is also sent as SNI (Neon routes
    /// by it).
    Tls {
        /// Host name or IP address to connect to.
        host: String,
        /// Port.
        port: u16,
        /// The name the certificate must be valid for.
        server_name: String,
        /// Trust roots and settings.
        tls: UpstreamTls,
    },
}

/// rustls client settings for TLS upstreams. Compared and hashed by
/// identity, so an [`UpstreamAddr`] stays usable as a map key.
#[derive(Clone)]
pub struct UpstreamTls(pub std::sync::Arc<rustls::ClientConfig>);

impl UpstreamTls {
    /// Verify against `roots` (e.g. a private CA).
    pub fn with_roots(roots: rustls::RootCertStore) -> UpstreamTls {
        let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("rustls defaults")
        .with_root_certificates(roots)
        .with_no_client_auth();
        // As libpq 17 does: PostgreSQL 17 checks it when a client offers
        // ALPN, older servers and Neon ignore it.
        config.alpn_protocols = vec![crate::tls::ALPN_POSTGRESQL.to_vec()];
        UpstreamTls(std::sync::Arc::new(config))
    }

    /// Verify against the Mozilla roots (public services such as Neon).
    pub fn public_roots() -> UpstreamTls {
        let mut roots = rustls::RootCertStore::empty();
        roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        UpstreamTls::with_roots(roots)
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(&self.0, &other.0)
    }
}
impl Eq for UpstreamTls {}
impl std::hash::Hash for UpstreamTls {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        std::sync::Arc::as_ptr(&self.0).hash(state)
    }
}
impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UpstreamTls")
    }
}

impl fmt::Display for UpstreamAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamAddr::Unix(p) => write!(f, "unix:{}", p.display()),
            UpstreamAddr::Tcp { host, port } => write!(f, "{host}:{port}"),
            UpstreamAddr::Tls {
                host,
                port,
                server_name,
                ..
            } => write!(f, "tls:{host}:{port} ({server_name})"),
        }
    }
}

/// The answer of a [`Router`]: where a session goes.
pub struct Route {
    /// The database branch this session lands on.
    pub branch: String,
    /// Where that branch's server listens.
    pub addr: UpstreamAddr,
    /// Dropped when the session ends (lets the daemon count sessions and suspend idle servers).
    pub lease: Box<dyn Any + Send + Sync>,
    /// The branch this session's scope routes to from now on, when it is not the proxy's
    /// one active branch (e.g. the active branch of the client's work tree): a change
    /// switches the session as a change of the active branch does. `None`: the proxy's.
    pub follow: Option<tokio::sync::watch::Receiver<String>>,
    /// What the router routed by (e.g. the client's work tree), for `status`.
    pub scope: Option<String>,
}

impl Route {
    /// A route to `branch` at `addr` that follows the proxy's active branch.
    pub fn new(branch: String, addr: UpstreamAddr, lease: Box<dyn Any + Send + Sync>) -> Route {
        Route {
            branch,
            addr,
            lease,
            follow: None,
            scope: None,
        }
    }
}

/// What the proxy knows of a client when it routes it.
#[derive(Debug, Clone)]
pub struct ClientInfo {
    /// Where it connected from.
    pub peer: crate::ClientPeer,
    /// Who the kernel says owns its socket.
    pub identity: crate::auth::PeerIdentity,
}

impl fmt::Debug for Route {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Route")
            .field("branch", &self.branch)
            .field("addr", &self.addr)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

/// Why a session could not be routed. Each becomes a FATAL `ErrorResponse` to the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    /// SQLSTATE 3D000, with a hint on how to create the branch.
    BranchMissing {
        /// The branch that was asked for.
        branch: String,
    },
    /// SQLSTATE 57P03; `detail` should say where the server log is.
    StartFailed {
        /// The branch whose server failed to start.
        branch: String,
        /// Shown as the error's DETAIL.
        detail: String,
    },
    /// SQLSTATE 53300: the daemon is out of file descriptors (or another resource a session
    /// needs); the string says which.
    TooManyConnections(String),
    /// SQLSTATE XX000.
    Other(String),
}

impl fmt::Display for RouteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteError::BranchMissing { branch } => {
                write!(f, "database branch \"{branch}\" does not exist")
            }
            RouteError::StartFailed { branch, detail } => {
                write!(
                    f,
                    "database branch \"{branch}\" could not be started: {detail}"
                )
            }
            RouteError::TooManyConnections(m) => write!(f, "too many connections: {m}"),
            RouteError::Other(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for RouteError {}

/// Boxed future returned by [`Router::route`].
pub type RouteFuture<'a> = Pin<Box<dyn Future<Output = Result<Route, RouteError>> + Send + 'a>>;

/// Decides where new sessions go. Implemented by the daemon.
pub trait Router: Send + Sync + 'static {
    /// `pinned` is the branch the client named explicitly (`dbname=app@branch`), else `None`
    /// meaning the active branch. May take a while (it may start a stopped server); many
    /// concurrent calls are fine.
    fn route(&self, pinned: Option<&str>) -> RouteFuture<'_>;

    /// [`Router::route`] for a known client: routers that route by who connects (the
    /// daemon: by the client's work tree) override this; the default ignores the client.
    fn route_client<'a>(&'a self, pinned: Option<&str>, client: &ClientInfo) -> RouteFuture<'a> {
        let _ = client;
        self.route(pinned)
    }

    /// The server `route` named could not be reached (its socket is gone or refuses
    /// connections). True when the router had the address from what it remembered and has
    /// now forgotten it, so that routing again looks afresh (and may start the server);
    /// the proxy then routes the session once more. The default remembers nothing.
    fn unreachable(&self, route: &Route) -> bool {
        let _ = route;
        false
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn upstream_tls_offers_alpn_postgresql() {
        let tls = super::UpstreamTls::with_roots(rustls::RootCertStore::empty());
        assert_eq!(tls.0.alpn_protocols, vec![b"postgresql".to_vec()]);
    }
}
