//! The proxy's port on every address it listens on (127.0.0.1 and ::1 for `localhost`), and who
//! holds it: the listening socket in `/proc/net/tcp{,6}`, its inode found among the open files
//! of `/proc/<pid>/fd` (as `ss -p` does), or this project's daemon by its status.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use pgtwig_core::ListenAddr;
use serde_json::json;

use super::{Check, DaemonSeen, Finding, Status};

/// A process listening on a TCP port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// None when the socket was seen but not its process (another user's, without root).
    pub pid: Option<u32>,
    pub name: Option<String>,
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.name, self.pid) {
            (Some(n), Some(p)) => write!(f, "process {n} (pid {p})"),
            (None, Some(p)) => write!(f, "pid {p}"),
            _ => write!(
                f,
                "another process (another user's: `sudo ss -ltnp` names it)"
            ),
        }
    }
}

/// Who listens on TCP `port` at `addr` (any address when None): Linux only, None elsewhere or
/// when nobody does.
pub fn holder(port: u16, addr: Option<IpAddr>) -> Option<Holder> {
    let mut inodes = Vec::new();
    for (table, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        // An IPv6 address is only in tcp6; an IPv4 one in tcp, or in tcp6 as a dual-stack `::`.
        if addr.is_some_and(|a| a.is_ipv6() && !v6) {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; inode is field 9.
            if f.len() <= 9 || f[3] != "0A" {
                continue;
            }
            let Some((ip, p)) = f[1].rsplit_once(':') else {
                continue;
            };
            if u16::from_str_radix(p, 16).ok() != Some(port) {
                continue;
            }
            let wildcard = ip.bytes().all(|b| b == b'0');
            let matches = match addr {
                None => true,
                Some(a) => wildcard || parse_proc_ip(ip) == Some(a),
            };
            if matches {
                inodes.push(format!("socket:[{}]", f[9]));
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc.file_name().to_string_lossy().into_owned();
        let Ok(pid_number) = pid.parse::<u32>() else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    let name = std::fs::read_to_string(proc.path().join("comm")).ok();
                    return Some(Holder {
                        pid: Some(pid_number),
                        name: name.map(|n| n.trim().to_string()),
                    });
                }
            }
        }
    }
    Some(Holder {
        pid: None,
        name: None,
    })
}

/// An address as /proc/net/tcp{,6} writes it: the bytes of each 32-bit word in host order
/// (little-endian on the machines pgtwig runs on).
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let words: Vec<u32> = (0..hex.len() / 8)
        .map(|i| u32::from_str_radix(&hex[i * 8..i * 8 + 8], 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    match bytes.len() {
        4 => Some(IpAddr::from(<[u8; 4]>::try_from(bytes).ok()?)),
        16 => Some(IpAddr::from(<[u8; 16]>::try_from(bytes).ok()?)),
        _ => None,
    }
}

/// Whether `addr` is free. On Linux from the kernel's socket table, without binding it: a
/// bind, however brief, could make a `pgtwig up` starting that moment fail. Elsewhere by
/// binding it.
fn probe(addr: SocketAddr) -> std::io::Result<()> {
    use std::io::{Error, ErrorKind};
    if cfg!(target_os = "linux") && Path::new("/proc/net/tcp").exists() {
        if addr.is_ipv6() && !Path::new("/proc/net/tcp6").exists() {
            return Err(Error::from(ErrorKind::AddrNotAvailable));
        }
        return match holder(addr.port(), Some(addr.ip())) {
            Some(_) => Err(Error::from(ErrorKind::AddrInUse)),
            None => Ok(()),
        };
    }
    pgtwig_proxy::bind_tcp(addr).map(drop)
}

/// One address of the proxy's `listen`.
fn address(addr: SocketAddr, daemon: &DaemonSeen) -> (Status, String, serde_json::Value) {
    let ours = match daemon {
        DaemonSeen::Running { pid, addresses, .. } => {
            Some((*pid, addresses.iter().any(|a| *a == addr.to_string())))
        }
        _ => None,
    };
    match probe(addr) {
        Ok(()) => (
            Status::Ok,
            format!("{addr} is free"),
            json!({ "address": addr.to_string(), "free": true }),
        ),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            let who = holder(addr.port(), Some(addr.ip()));
            let details = json!({
                "address": addr.to_string(), "free": false,
                "holder_pid": who.as_ref().and_then(|h| h.pid),
                "holder_name": who.as_ref().and_then(|h| h.name.clone()),
            });
            let by_daemon = match (ours, &who) {
                (Some((pid, listed)), Some(h)) => h.pid == Some(pid) || (h.pid.is_none() && listed),
                (Some((_, listed)), None) => listed,
                _ => false,
            };
            if by_daemon {
                let pid = ours.map(|(p, _)| p).unwrap_or_default();
                return (
                    Status::Ok,
                    format!("{addr} is this project's proxy (pid {pid})"),
                    details,
                );
            }
            let who = who.map(|h| format!(" by {h}")).unwrap_or_default();
            (Status::Fix, format!("{addr} is taken{who}"), details)
        }
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable && addr.is_ipv6() => (
            Status::Ok,
            format!("{addr}: this machine has no IPv6 loopback (127.0.0.1 alone is used)"),
            json!({ "address": addr.to_string(), "free": null }),
        ),
        Err(e) => (
            Status::Warn,
            format!("{addr} cannot be bound: {e}"),
            json!({ "address": addr.to_string(), "free": null, "error": e.to_string() }),
        ),
    }
}

/// The proxy's port: free (or the daemon's) on every address of `listen`.
pub fn check(listen: &ListenAddr, daemon: &DaemonSeen) -> Finding {
    let addrs = match listen.socket_addrs() {
        Ok(a) => a,
        Err(e) => {
            return Finding::ok(
                Check::Port,
                format!("listen = \"{listen}\": {e}"),
                json!({}),
            )
            .needs(
                Status::Fix,
                "correct `listen` under [proxy] in .pgtwig.toml".into(),
            )
        }
    };
    let seen: Vec<_> = addrs.into_iter().map(|a| address(a, daemon)).collect();
    let status = seen.iter().map(|s| s.0).max().unwrap_or(Status::Ok);
    let summary = format!(
        "port {} ({listen}): {}",
        listen.port,
        seen.iter()
            .map(|s| s.1.as_str())
            .collect::<Vec<_>>()
            .join("; ")
    );
    let details = json!({
        "listen": listen.to_string(),
        "addresses": seen.iter().map(|s| s.2.clone()).collect::<Vec<_>>(),
    });
    let finding = Finding::ok(Check::Port, summary, details);
    match status {
        Status::Ok => finding,
        status => {
            let other = if listen.port == 6432 { 6433 } else { 6432 };
            finding.needs(
                status,
                format!(
                    "stop that program, or give pgtwig another port: `listen = \"{}:{other}\"` under [proxy] in \
                     .pgtwig.toml (the app's DATABASE_URL then names port {other}), or `pgtwig up --port {other}`",
                    listen.host
                ),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_net_addresses() {
        assert_eq!(
            parse_proc_ip("0100007F"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_proc_ip("00000000000000000000000001000000"),
            Some("::1".parse().unwrap())
        );
    }

    #[test]
    fn names_the_holder_of_a_taken_port() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let listen: ListenAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let f = check(&listen, &DaemonSeen::NotRunning);
        assert_eq!(f.status, Status::Fix, "{f:?}");
        assert!(
            f.summary.contains(&format!("pid {}", std::process::id())),
            "{}",
            f.summary
        );
        // The same socket reported by the daemon as its own is fine.
        let f = check(
            &listen,
            &DaemonSeen::Running {
                pid: std::process::id(),
                addresses: vec![format!("127.0.0.1:{port}")],
                main_worktree: None,
            },
        );
        assert_eq!(f.status, Status::Ok, "{f:?}");
        drop(taken);
        assert_eq!(check(&listen, &DaemonSeen::NotRunning).status, Status::Ok);
    }
}
