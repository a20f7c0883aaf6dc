//! Cost of `pgtwig_proxy::peer::tcp_peer_owner` with many TCP sockets open (Linux).
//!
//! ```text
//! cargo run --release -p pgtwig-proxy --example peer_lookup [-- CONNECTIONS]
//! ```
//! Opens CONNECTIONS (default 2,000) loopback connections and keeps them open (twice as many
//! sockets: both ends), then times lookups of one of them through netlink `sock_diag` and
//! through `/proc/net/tcp`, and of an address pair that matches nothing (a miss reads the
//! whole table). The same with a single connection shows how `/proc` grows with the table.

#[cfg(target_os = "linux")]
fn main() -> std::io::Result<()> {
    linux::main()
}

#[cfg(not(target_os = "linux"))]
fn main() {
    eprintln!("peer_lookup measures the Linux lookups; tcp_peer_owner finds nothing elsewhere");
}

#[cfg(target_os = "linux")]
mod linux {
    use std::io;
    use std::net::{SocketAddr, TcpListener, TcpStream};
    use std::time::Instant;

    use pgtwig_proxy::peer::{tcp_peer_owner_netlink, tcp_peer_owner_proc_net, PeerOwner};

    /// Connections kept open while measuring, unless given on the command line.
    const DEFAULT_CONNECTIONS: usize = 2_000;
    /// Lookups timed per netlink row.
    const NETLINK_LOOKUPS: usize = 20_000;
    /// Lookups timed per `/proc` row (each reads up to the whole table).
    const PROC_LOOKUPS: usize = 2_000;
    /// File descriptors needed beyond the connections' two each.
    const SPARE_FDS: u64 = 64;

    type Lookup = fn(SocketAddr, SocketAddr) -> io::Result<Option<PeerOwner>>;

    /// The accepted and client ends of the open connections, and one connection's addresses.
    struct OpenConnections {
        _ends: Vec<(TcpStream, TcpStream)>,
        target: (SocketAddr, SocketAddr),
        miss: (SocketAddr, SocketAddr),
    }

    fn open(connections: usize) -> io::Result<OpenConnections> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let mut ends = Vec::with_capacity(connections);
        let mut target = None;
        for index in 0..connections {
            let client = TcpStream::connect(listener.local_addr()?)?;
            let (accepted, client_addr) = listener.accept()?;
            if index == connections / 2 {
                target = Some((accepted.local_addr()?, client_addr));
            }
            ends.push((client, accepted));
        }
        let target = target.expect("at least one connection");
        // Nobody's client socket: the listener's port as the client end.
        let miss = (target.0, listener.local_addr()?);
        Ok(OpenConnections {
            _ends: ends,
            target,
            miss,
        })
    }

    /// Mean and 99th percentile in µs of `count` calls of `lookup(pair)`, checking each answer.
    fn time(
        lookup: Lookup,
        pair: (SocketAddr, SocketAddr),
        count: usize,
        want_found: bool,
    ) -> io::Result<(f64, f64)> {
        let mut micros = Vec::with_capacity(count);
        for _ in 0..count {
            let start = Instant::now();
            let found = lookup(pair.0, pair.1)?;
            micros.push(start.elapsed().as_secs_f64() * 1e6);
            assert_eq!(found.is_some(), want_found, "lookup of {pair:?}");
        }
        micros.sort_by(f64::total_cmp);
        let mean = micros.iter().sum::<f64>() / count as f64;
        let p99 = micros[(count * 99 / 100).min(count - 1)];
        Ok((mean, p99))
    }

    /// Rows in `/proc/net/tcp` and `tcp6`: every TCP socket of the namespace, other programs'
    /// and `TIME_WAIT` ones included.
    fn tcp_table_rows() -> io::Result<usize> {
        let mut rows = 0;
        for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
            rows += std::fs::read_to_string(table)?
                .lines()
                .count()
                .saturating_sub(1);
        }
        Ok(rows)
    }

    fn raise_fd_limit(needed: u64) -> io::Result<()> {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `limit` is valid for writes.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur >= needed {
            return Ok(());
        }
        if limit.rlim_max < needed {
            return Err(io::Error::other(format!(
                "{needed} file descriptors needed, the hard limit is {}: raise it (ulimit -Hn)",
                limit.rlim_max
            )));
        }
        limit.rlim_cur = needed;
        // SAFETY: `limit` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn main() -> io::Result<()> {
        let connections = match std::env::args().nth(1) {
            Some(n) => n
                .parse()
                .map_err(|e| io::Error::other(format!("CONNECTIONS: {e}")))?,
            None => DEFAULT_CONNECTIONS,
        };
        raise_fd_limit(connections as u64 * 2 + SPARE_FDS)?;
        let sizes: Vec<usize> = if connections == 1 {
            vec![1]
        } else {
            vec![1, connections]
        };
        println!("| open connections | TCP table rows | path | lookup | mean µs | p99 µs |");
        println!("| --- | --- | --- | --- | --- | --- |");
        for size in sizes {
            let open = open(size)?;
            let rows_now = tcp_table_rows()?;
            let rows: [(&str, Lookup, usize); 2] = [
                ("netlink", tcp_peer_owner_netlink, NETLINK_LOOKUPS),
                ("/proc/net/tcp", tcp_peer_owner_proc_net, PROC_LOOKUPS),
            ];
            for (path, lookup, count) in rows {
                for (kind, pair, want_found) in
                    [("found", open.target, true), ("miss", open.miss, false)]
                {
                    let (mean, p99) = time(lookup, pair, count, want_found)?;
                    println!("| {size} | {rows_now} | {path} | {kind} | {mean:.1} | {p99:.1} |");
                }
            }
        }
        Ok(())
    }
}
