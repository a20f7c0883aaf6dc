//! Binding the proxy's port, with an error that says who holds it.

use std::net::SocketAddr;

/// Bind `addr`; when taken, name the port and, on Linux, the process that
/// listens on it (found through /proc, as `ss -p` does).
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    match std::net::TcpListener::bind(addr) {
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
        Err(e) => anyhow::bail!("cannot listen on {addr}: {e}"),
    }
}

/// "process NAME (pid N)" listening on TCP `port`, when it can be found.
pub fn holder(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; inode is field 9.
            if f.len() > 9 && f[3] == "0A" {
                let p = f[1]
                    .rsplit(':')
                    .next()
                    .and_then(|h| u16::from_str_radix(h, 16).ok());
                if p == Some(port) {
                    inodes.push(format!("socket:[{}]", f[9]));
                }
            }
        }
    }
    if inodes.is_empty() {
        return None;
    }
    for proc in std::fs::read_dir("/proc").ok()?.flatten() {
        let pid = proc.file_name().to_string_lossy().into_owned();
        if !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(proc.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(target) = std::fs::read_link(fd.path()) {
                if inodes.iter().any(|i| target.as_os_str() == i.as_str()) {
                    let name =
                        std::fs::read_to_string(proc.path().join("comm")).unwrap_or_default();
                    return Some(format!("process {} (pid {pid})", name.trim()));
                }
            }
        }
    }
    Some("another process".into())
}
