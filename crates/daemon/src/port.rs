//! Binding the proxy's port, with an error that says who holds it.

use std::net::SocketAddr;

use pgtwig_core::ListenAddr;

/// Bind every address of `listen` (both 127.0.0.1 and ::1 for `localhost`). A port taken on
/// any of them is an error naming the holder; for `localhost`, a machine without IPv6
/// (binding ::1 is EADDRNOTAVAIL) gets 127.0.0.1 alone, with a warning.
pub fn bind_all(listen: &ListenAddr) -> anyhow::Result<Vec<std::net::TcpListener>> {
    let addrs = listen.socket_addrs().map_err(anyhow::Error::msg)?;
    let mut listeners = Vec::with_capacity(addrs.len());
    let mut port = listen.port;
    for mut addr in addrs {
        // Port 0: the first bind picks one, the others must use the same.
        addr.set_port(port);
        match bind(addr) {
            Ok(l) => {
                port = l.local_addr()?.port();
                listeners.push(l);
            }
            Err(e)
                if listen.host.eq_ignore_ascii_case("localhost")
                    && addr.is_ipv6()
                    && e.downcast_ref::<std::io::Error>()
                        .is_some_and(|e| e.kind() == std::io::ErrorKind::AddrNotAvailable) =>
            {
                tracing::warn!("not listening on {addr}: this machine has no IPv6 loopback");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(listeners)
}

/// Bind `addr`; when taken, name the port and, on Linux, the process that
/// listens on it (found through /proc, as `ss -p` does).
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    match pgtwig_proxy::bind_tcp(addr) {
        Ok(l) => Ok(l),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let holder = holder(addr.port())
                .map(|h| format!(" by {h}"))
                .unwrap_or_default();
            anyhow::bail!(
                "cannot listen on {addr}: port {} is already in use{holder}. Stop that program, or pick another \
                 port with `pgtwig up --port N` or `listen` under [proxy] in .pgtwig.toml",
                addr.port()
            )
        }
        Err(e) => Err(anyhow::Error::new(e).context(format!("cannot listen on {addr}"))),
    }
}

/// "process NAME (pid N)" listening on TCP `port`, when it can be found (the lookup
/// `pgtwig doctor` uses too).
pub fn holder(port: u16) -> Option<String> {
    pgtwig_project::doctor::port::holder(port, None).map(|h| h.to_string())
}
