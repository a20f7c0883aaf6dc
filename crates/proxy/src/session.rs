//! One client connection from accept to close: the startup handshake (TLS, cancel, protocol
//! negotiation), routing, connecting upstream, then the relay with branch-switch handling.

use std::io;
use std::sync::atomic::AtomicU8;
use std::sync::Arc;
use std::time::SystemTime;

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use crate::auth::{authenticate, identify, AuthFailure, ClientPeer, PeerIdentity};
use crate::cancel::forward_cancel;
use crate::error::{sqlstate, PgError};
use crate::inbox::{Inbox, WithEarly, READ_AHEAD};
use crate::relay::{Relay, RelayEnd};
use crate::router::ClientInfo;
use crate::startup::{
    check_length, parse_first_packet, plan_startup, FirstPacket, Startup, TLS_HANDSHAKE_RECORD,
};
use crate::stream::{connect_upstream, ClientStream};
use crate::{tls, OnSwitch, Proxy, SessionRecord};

/// What the startup handshake produced.
enum Handshake {
    /// The startup packet, and what the client sent after it without waiting (usually
    /// nothing).
    Startup(Startup, Vec<u8>),
    Cancel {
        pid: u32,
        secret: Vec<u8>,
    },
}

/// Reads first packets until a StartupMessage or CancelRequest, answering SSLRequest and
/// GSSENCRequest on the way, or first runs a direct TLS handshake when the client opens with
/// a ClientHello. Which requests are answered when follows PostgreSQL 17's
/// `ProcessStartupPacket`: each kind once; after `S` nothing more is negotiated; after direct
/// TLS an SSLRequest gets `N` (TLS is already in use) and a GSSENCRequest `N`.
async fn handshake(
    proxy: &Proxy,
    stream: &mut ClientStream,
    peer: &ClientPeer,
) -> Result<Handshake, HandshakeError> {
    let mut ssl_done = false;
    let mut gss_done = false;
    let mut first = true;
    // What was read past the packet in hand: see `inbox.rs`.
    let mut inbox = Inbox::new();
    loop {
        inbox.fill_to(stream, 4, READ_AHEAD).await?;
        if std::mem::take(&mut first) && inbox.bytes()[0] == TLS_HANDSHAKE_RECORD {
            let prefix = inbox.take_all();
            // Boxed, as the TLS accept below: rare, and most of the session future's size.
            Box::pin(direct_tls(proxy, stream, peer, &prefix)).await?;
            continue;
        }
        let b = inbox.bytes();
        let len = 4 + check_length([b[0], b[1], b[2], b[3]], proxy.config.max_startup_packet)?;
        inbox.fill_to(stream, len, READ_AHEAD).await?;
        let packet = parse_first_packet(&inbox.bytes()[4..len])?;
        inbox.consume(len);
        // Bytes behind an encryption request, sent before its answer (see below).
        let sent_ahead = !inbox.bytes().is_empty();
        match packet {
            FirstPacket::SslRequest if !ssl_done => {
                ssl_done = true;
                match &proxy.config.tls {
                    Some(cfg) if matches!(stream, ClientStream::Plain(_)) => {
                        stream.write_all(b"S").await?;
                        gss_done = true;
                        let ClientStream::Plain(tcp) =
                            std::mem::replace(stream, ClientStream::Closed)
                        else {
                            return Err(HandshakeError::Closed);
                        };
                        let acceptor = tokio_rustls::TlsAcceptor::from(cfg.clone());
                        let tls = Box::pin(acceptor.accept(tcp)).await?;
                        *stream = ClientStream::Tls(Box::new(tls));
                    }
                    // No TLS configured, or TLS already up (direct).
                    _ => stream.write_all(b"N").await?,
                }
                if sent_ahead {
                    return Err(sent_before_answer("SSL request"));
                }
            }
            FirstPacket::GssEncRequest if !gss_done => {
                gss_done = true;
                stream.write_all(b"N").await?;
                if sent_ahead {
                    return Err(sent_before_answer("GSSAPI encryption request"));
                }
            }
            FirstPacket::SslRequest | FirstPacket::GssEncRequest => {
                return Err(PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "unexpected encryption request during startup",
                )
                .into())
            }
            FirstPacket::Cancel { pid, secret } => return Ok(Handshake::Cancel { pid, secret }),
            FirstPacket::Startup(s) => return Ok(Handshake::Startup(s, inbox.take_all())),
        }
    }
}

/// Bytes that came behind an encryption request, before its answer: sent unencrypted before
/// the encryption they asked for, they may be a man in the middle's. Refused as PostgreSQL
/// (since 14.1) refuses them: once the request is answered (and TLS set up after `S`).
fn sent_before_answer(request: &str) -> HandshakeError {
    PgError::fatal(
        sqlstate::PROTOCOL_VIOLATION,
        format!("received unencrypted data after {request}"),
    )
    .detail(
        "This could be either a client-software bug or evidence of an attempted \
         man-in-the-middle attack.",
    )
    .into()
}

/// The client opened with a TLS record (`prefix`: its first bytes, already read). With TLS
/// configured, runs the handshake (ALPN `postgresql` required) and leaves `stream` as TLS;
/// the startup packet follows inside it, under the same timeout and size limit.
///
/// Without TLS the connection is closed without a word, as PostgreSQL 17 does with
/// `ssl = off` (`ProcessSSLStartup` rejects, the backend exits, nothing is written): a TLS
/// client could not read a plaintext ErrorResponse, and an `N` means nothing outside an
/// SSLRequest exchange.
async fn direct_tls(
    proxy: &Proxy,
    stream: &mut ClientStream,
    peer: &ClientPeer,
    prefix: &[u8],
) -> Result<(), HandshakeError> {
    let Some(cfg) = &proxy.config.tls else {
        tracing::debug!("closing {peer}: direct TLS connection, but TLS is not configured");
        return Err(HandshakeError::Closed);
    };
    let ClientStream::Plain(tcp) = std::mem::replace(stream, ClientStream::Closed) else {
        return Err(HandshakeError::Closed);
    };
    match tls::accept_direct(cfg.clone(), tcp, prefix).await {
        Ok(tls::Direct::Accepted(tls)) => {
            *stream = ClientStream::Tls(tls);
            Ok(())
        }
        Ok(tls::Direct::NoAlpn { alpn }) => {
            tracing::debug!(
                "refusing {peer}: direct TLS connection without ALPN \"postgresql\" \
                 (offered: {alpn:?})"
            );
            Err(HandshakeError::Closed)
        }
        Err(e) => {
            tracing::debug!("direct TLS handshake with {peer} failed: {e}");
            Err(HandshakeError::Closed)
        }
    }
}

enum HandshakeError {
    /// Tell the client, then close.
    Pg(PgError),
    /// The client went away or broke TLS: nothing to say.
    Closed,
}

impl From<PgError> for HandshakeError {
    fn from(e: PgError) -> Self {
        HandshakeError::Pg(e)
    }
}

impl From<io::Error> for HandshakeError {
    fn from(_: io::Error) -> Self {
        HandshakeError::Closed
    }
}

async fn send_error(stream: &mut ClientStream, err: &PgError) {
    let fut = async {
        stream.write_all(&err.encode()).await?;
        stream.flush().await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), fut).await;
}

/// Runs one client connection to the end. Never panics on client input; every refusal is an
/// ErrorResponse.
pub(crate) async fn run(proxy: Arc<Proxy>, mut client: ClientStream, peer: ClientPeer) {
    let hs = tokio::time::timeout(
        proxy.config.startup_timeout,
        handshake(&proxy, &mut client, &peer),
    )
    .await;
    let (startup, mut early) = match hs {
        Ok(Ok(Handshake::Startup(s, early))) => (s, early),
        Ok(Ok(Handshake::Cancel { pid, secret })) => {
            match proxy.cancel.lookup(pid, &secret) {
                Some(target) => {
                    if let Err(e) = forward_cancel(&target).await {
                        tracing::warn!("forwarding a cancel request to {}: {e}", target.addr);
                    }
                }
                None => tracing::debug!("cancel request for unknown key (pid {pid})"),
            }
            // Close as PostgreSQL does: over TLS with a close_notify. libpq 17's cancel API
            // (PQcancelCreate, psycopg's cancel_safe) sends the CancelRequest inside TLS and
            // waits for the end of the stream; a bare TCP close is an SSL error to it.
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), client.shutdown()).await;
            return;
        }
        Ok(Err(HandshakeError::Pg(e))) => {
            tracing::debug!("refusing {peer}: {}", e.message);
            send_error(&mut client, &e).await;
            return;
        }
        Ok(Err(HandshakeError::Closed)) => return,
        Err(_elapsed) => {
            let e = PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "timeout waiting for startup packet",
            );
            send_error(&mut client, &e).await;
            return;
        }
    };

    let plan = plan_startup(&startup);
    // PostgreSQL sends NegotiateProtocolVersion before anything else, authentication included.
    if let Some(nego) = &plan.negotiate {
        if client.write_all(nego).await.is_err() {
            return;
        }
    }
    // On macOS a TCP client's socket is searched for among the user's processes
    // (`peer/libproc.rs`), which can take milliseconds: not on the relay's thread.
    #[cfg(target_os = "macos")]
    let identity = tokio::task::spawn_blocking(move || identify(&peer))
        .await
        .unwrap_or_else(|e| crate::auth::PeerIdentity::Unknown(format!("peer lookup: {e}")));
    #[cfg(not(target_os = "macos"))]
    let identity = identify(&peer);
    if !admit(&proxy, &mut client, &mut early, &peer, &identity, &startup).await {
        return;
    }
    let client_info = ClientInfo { peer, identity };
    let pinned = plan.pinned.clone();
    // Read before routing: a drain of the branch this session lands on, made after this,
    // concerns it even when it comes between routing and the relay loop.
    let mut drains_since = proxy.drain_seq();
    let Some(mut route) =
        route_or_refuse(&proxy, &mut client, pinned.as_deref(), &client_info).await
    else {
        return;
    };
    let status = Arc::new(AtomicU8::new(0));
    // Before anything this session's client sends: see `Pool::put`.
    let ddl_seen = proxy.pool.database_ddl_seen();
    let reused = proxy.pool.take(&route.addr, &plan.upstream_packet);
    let mut relay = match reused {
        Some(parked) => Relay::resume(
            client,
            parked,
            route.addr.clone(),
            proxy.cancel.clone(),
            status.clone(),
        ),
        None => {
            let limit = proxy.config.upstream_connect_timeout;
            let mut rerouted = false;
            let mut server = loop {
                let e = match connect_upstream(&route.addr, limit).await {
                    Ok(s) => break s,
                    Err(e) => e,
                };
                if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) {
                    send_error(&mut client, &crate::listen::too_many_connections()).await;
                    return;
                }
                let gone = matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                );
                if gone
                    && !std::mem::replace(&mut rerouted, true)
                    && proxy.router.unreachable(&route)
                {
                    // A server stopped behind the router's back: route afresh (see
                    // `Router::unreachable`), once.
                    tracing::debug!("{} is gone; routing {peer} again", route.addr);
                    match route_or_refuse(&proxy, &mut client, pinned.as_deref(), &client_info)
                        .await
                    {
                        Some(r) => route = r,
                        None => return,
                    }
                    continue;
                }
                let err = PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!(
                        "could not connect to the server of database branch \"{}\"",
                        route.branch
                    ),
                )
                .detail(format!("connecting to {}: {e}", route.addr));
                send_error(&mut client, &err).await;
                return;
            };
            if server.write_all(&plan.upstream_packet).await.is_err() {
                let err = PgError::fatal(
                    sqlstate::CONNECTION_FAILURE,
                    format!("lost the server of database branch \"{}\"", route.branch),
                );
                send_error(&mut client, &err).await;
                return;
            }
            Relay::new(
                client,
                server,
                route.addr.clone(),
                proxy.cancel.clone(),
                status.clone(),
                proxy.pool.enabled(),
            )
        }
    };
    if !early.is_empty() {
        relay.hold_early_client_bytes(&early);
    }
    let record = SessionRecord {
        branch: route.branch.clone(),
        client_addr: client_info.peer,
        scope: route.scope.clone(),
        started: SystemTime::now(),
        pinned: pinned.is_some(),
        user: startup.get_str("user"),
        database: plan_database(&startup),
        application_name: startup.get_str("application_name"),
        status,
    };
    let registration = proxy.register_session(record);
    relay.set_activity(proxy.activity.clone());
    relay.set_pool(proxy.pool.clone());
    relay.set_ring(if proxy.config.io_uring {
        proxy.config.io_uring_threads
    } else {
        0
    });

    let watch_switch = pinned.is_none() && matches!(proxy.config.on_switch, OnSwitch::CloseIdle);
    // The branch this session's scope (e.g. its work tree) routes to now.
    let mut active: watch::Receiver<String> =
        route.follow.clone().unwrap_or_else(|| proxy.active.clone());
    let mut watching = watch_switch;
    if watching {
        let now = active.borrow_and_update().clone();
        if now != route.branch {
            // The active branch changed while this session was being routed.
            relay.close_when_idle(switch_message(&route.branch, &now));
        }
    }
    let mut draining = false;
    let mut drain = proxy.drains_of(&route.branch);
    let mut drain_pending = true; // look at the branch's latest drain first
    let end = loop {
        if std::mem::take(&mut drain_pending) && !draining {
            let latest = drain.borrow_and_update().clone();
            if latest.seq > drains_since {
                draining = true;
                relay.close_when_idle(latest.message);
            }
        }
        // What this loop looks at, as it has just looked at it: the ring checks it before it
        // passes on the client's next bytes.
        let mut watches: Vec<Box<dyn crate::relay::ControlWatch>> = Vec::new();
        if watching {
            watches.push(Box::new(active.clone()));
        }
        if !draining {
            watches.push(Box::new(drain.clone()));
        }
        relay.watch_controls(watches);
        tokio::select! {
            // Controls before data: a switch or drain that came before the client's next
            // bytes is applied before they are relayed (a fresh session is then moved, not
            // answered from the old branch).
            biased;
            // The proxy keeps every branch's sender: this never ends with an error.
            Ok(()) = drain.changed(), if !draining => drain_pending = true,
            changed = active.changed(), if watching => {
                if changed.is_err() {
                    watching = false;
                    continue;
                }
                let now = active.borrow_and_update().clone();
                if draining {
                    // Closing for a drain whatever becomes active.
                } else if now == route.branch {
                    relay.cancel_close();
                } else {
                    relay.close_when_idle(switch_message(&route.branch, &now));
                }
            }
            end = &mut relay => {
                if matches!(end, RelayEnd::Switched(_)) && !draining && relay.is_fresh() {
                    let since = proxy.drain_seq();
                    // Boxed: only after a switch, and larger than the rest of the session.
                    let moved = Box::pin(move_fresh(&proxy, &mut relay, &route, &client_info, &plan.upstream_packet, ddl_seen)).await;
                    match moved {
                        Moved::To(to) => {
                            tracing::debug!(
                                "fresh session {peer} moved from {} to {}",
                                route.branch,
                                to.branch
                            );
                            registration.set_branch(&to.branch);
                            route = to;
                            // From now on the new branch's drains concern it.
                            drain = proxy.drains_of(&route.branch);
                            drains_since = since;
                            drain_pending = true;
                            continue;
                        }
                        Moved::Stayed => continue,
                        Moved::Failed => {}
                    }
                }
                break end
            }
        }
    };
    match &end {
        RelayEnd::ClientClosed | RelayEnd::ServerClosed | RelayEnd::Switched(_) => {
            tracing::debug!("session {peer} on {} ended: {end:?}", route.branch)
        }
        _ => tracing::info!("session {peer} on {} ended: {end:?}", route.branch),
    }
    // The client is gone (or going): no longer a session, even while the server connection
    // is being reset for reuse.
    drop(registration);
    // A drained branch's server is about to stop: nothing to park for it.
    if let Some(parked) = relay.finish(&end).await.filter(|_| !draining) {
        proxy
            .pool
            .put(route.addr.clone(), plan.upstream_packet, parked, ddl_seen);
    }
    drop(route.lease);
}

/// Where the router sends this client; `None` once the client has been told why nowhere.
async fn route_or_refuse(
    proxy: &Proxy,
    client: &mut ClientStream,
    pinned: Option<&str>,
    client_info: &ClientInfo,
) -> Option<crate::Route> {
    match proxy.router.route_client(pinned, client_info).await {
        Ok(route) => Some(route),
        Err(e) => {
            send_error(client, &PgError::from(&e)).await;
            None
        }
    }
}

enum Moved {
    /// Now on this route's server.
    To(crate::Route),
    /// The active branch is this session's again: nothing to do.
    Stayed,
    /// Could not move: close the session as usual.
    Failed,
}

/// Moves a fresh session (see `Relay::is_fresh`) to where its client now routes (the active
/// branch of its work tree): a parked connection for the same startup packet or a new trusted
/// one, the client none the wiser. The old server connection, unused, is parked for the next
/// session on the old branch.
async fn move_fresh(
    proxy: &Proxy,
    relay: &mut Relay,
    from: &crate::Route,
    client: &ClientInfo,
    startup: &[u8],
    ddl_seen: u64,
) -> Moved {
    let to = match proxy.router.route_client(None, client).await {
        Ok(r) if r.branch == from.branch => return Moved::Stayed,
        Ok(r) => r,
        Err(e) => {
            tracing::debug!("not moving a fresh session to the active branch: {e}");
            return Moved::Failed;
        }
    };
    let conn = match proxy.pool.take(&to.addr, startup) {
        Some(parked) => Some(parked),
        None => {
            crate::pool::open_trusted(&to.addr, startup, proxy.config.upstream_connect_timeout)
                .await
        }
    };
    let Some(conn) = conn else {
        tracing::debug!(
            "not moving a fresh session to \"{}\": no trusted connection to {}",
            to.branch,
            to.addr
        );
        return Moved::Failed;
    };
    if let Some(old) = relay.move_to(conn, to.addr.clone()) {
        proxy
            .pool
            .put(from.addr.clone(), startup.to_vec(), old, ddl_seen);
    }
    Moved::To(to)
}

/// Lets the client in, or tells it why not (see `auth.rs`): the proxy's owner as is,
/// everyone else after SCRAM with the proxy password. True when the session may go on.
async fn admit(
    proxy: &Proxy,
    client: &mut ClientStream,
    early: &mut Vec<u8>,
    peer: &ClientPeer,
    identity: &PeerIdentity,
    startup: &Startup,
) -> bool {
    let Some(auth) = &proxy.config.client_auth else {
        return true;
    };
    let why = match identity {
        PeerIdentity::User { uid, .. } if *uid == auth.owner_uid => return true,
        PeerIdentity::User { uid, .. } => format!("uid {uid}"),
        PeerIdentity::Unknown(reason) => reason.clone(),
    };
    let user = startup.get_str("user").unwrap_or_default();
    // Boxed: the owner (the common case) never runs it.
    let outcome = tokio::time::timeout(
        proxy.config.startup_timeout,
        Box::pin(authenticate(
            &mut WithEarly {
                early,
                stream: client,
            },
            auth,
            &user,
        )),
    )
    .await;
    match outcome {
        Ok(Ok(())) => {
            tracing::debug!("{peer} ({why}) authenticated with the proxy password");
            true
        }
        Ok(Err(AuthFailure::Refused(e))) => {
            tracing::info!("refused {peer} ({why}): {}", e.message);
            send_error(client, &e).await;
            false
        }
        Ok(Err(AuthFailure::Closed)) => {
            tracing::debug!("{peer} ({why}) left when asked for the proxy password");
            false
        }
        Err(_elapsed) => {
            let e = PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "timeout waiting for the password exchange",
            );
            send_error(client, &e).await;
            false
        }
    }
}

fn plan_database(startup: &Startup) -> Option<String> {
    let db = startup.get("database").or_else(|| startup.get("user"))?;
    let db = crate::startup::split_pin(db).map(|(d, _)| d).unwrap_or(db);
    Some(String::from_utf8_lossy(db).into_owned())
}

/// The FATAL message a session gets when the active branch moves away from it.
pub fn switch_message(from: &str, to: &str) -> String {
    format!("terminating connection: pgtwig switched the active branch from \"{from}\" to \"{to}\"")
}
