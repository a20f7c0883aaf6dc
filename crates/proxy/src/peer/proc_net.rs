//! The socket lookup through `/proc/net/tcp` and `/proc/net/tcp6` (Linux), for kernels or
//! sandboxes without netlink `sock_diag`. Reads every row up to the match: linear in the
//! number of TCP sockets of the network namespace.
//!
//! A row (`tcp4_seq_show` / `tcp6_seq_show` in the kernel):
//! ```text
//!   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
//!    0: 0100007F:1538 0100007F:A1B2 01 00000000:00000000 00:00000000 00000000  1000        0 123456 ...
//! ```
//! An address is `%08X` of each 32-bit word of the address as it is in memory (network byte
//! order) read as a host-order integer: one word for IPv4, four for IPv6 — so on a
//! little-endian machine each group of 4 bytes appears reversed. The port is `%04X` of the port
//! number itself.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;

use super::{ConnectionPair, Lookup};

/// IPv4 sockets (and nothing else).
const PROC_NET_TCP: &str = "/proc/net/tcp";
/// IPv6 sockets, including IPv6 sockets connected to IPv4-mapped addresses.
const PROC_NET_TCP6: &str = "/proc/net/tcp6";
/// Read size: the kernel fills each `read` from its socket tables, so fewer, larger reads cost
/// less (a row is 150 bytes; 64 KiB is ~430 rows).
const READ_BUFFER_LEN: usize = 64 * 1024;

/// Column positions in a row split on whitespace.
const LOCAL_ADDRESS_COLUMN: usize = 1;
const REMOTE_ADDRESS_COLUMN: usize = 2;
const UID_COLUMN: usize = 7;
const INODE_COLUMN: usize = 9;

/// Looks the client socket of `pair` up in `/proc/net/tcp` (IPv4 clients) and `/proc/net/tcp6`
/// (IPv6 clients, and IPv4 ones whose socket is an IPv6 socket using a mapped address).
pub(super) fn lookup(pair: &ConnectionPair) -> io::Result<Lookup> {
    let tables: &[&str] = if pair.client.is_ipv4() {
        &[PROC_NET_TCP, PROC_NET_TCP6]
    } else {
        &[PROC_NET_TCP6]
    };
    for table in tables {
        match lookup_in(Path::new(table), pair)? {
            Lookup::NotFound => continue,
            found => return Ok(found),
        }
    }
    Ok(Lookup::NotFound)
}

fn lookup_in(table: &Path, pair: &ConnectionPair) -> io::Result<Lookup> {
    let file = match File::open(table) {
        Ok(file) => file,
        // No IPv6 in this kernel: no tcp6 table, and no IPv6 sockets either.
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Lookup::NotFound),
        Err(err) => {
            return Err(io::Error::new(
                err.kind(),
                format!("{}: {err}", table.display()),
            ))
        }
    };
    let mut reader = BufReader::with_capacity(READ_BUFFER_LEN, file);
    let mut line = String::new();
    // The first line is the column titles.
    reader.read_line(&mut line)?;
    let mut line_number = 1;
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(Lookup::NotFound);
        }
        line_number += 1;
        let row = parse_row(&line).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} line {line_number} is not a socket row: {:?}",
                    table.display(),
                    line.trim_end()
                ),
            )
        })?;
        if same_endpoint(row.local, pair.client) && same_endpoint(row.remote, pair.server) {
            return Ok(Lookup::from_row(row.uid, row.inode));
        }
    }
}

/// Address and port, ignoring IPv6 flow and scope (the table shows neither), with IPv4-mapped
/// addresses as IPv4.
fn same_endpoint(row: SocketAddr, wanted: SocketAddr) -> bool {
    (row.ip(), row.port()) == (wanted.ip(), wanted.port())
}

/// The columns of one row that the lookup needs.
#[derive(Debug, PartialEq, Eq)]
struct Row {
    local: SocketAddr,
    remote: SocketAddr,
    uid: u32,
    inode: u64,
}

fn parse_row(line: &str) -> Option<Row> {
    let columns: Vec<&str> = line.split_whitespace().take(INODE_COLUMN + 1).collect();
    if columns.len() <= INODE_COLUMN {
        return None;
    }
    Some(Row {
        local: parse_address(columns[LOCAL_ADDRESS_COLUMN])?,
        remote: parse_address(columns[REMOTE_ADDRESS_COLUMN])?,
        uid: columns[UID_COLUMN].parse().ok()?,
        inode: columns[INODE_COLUMN].parse().ok()?,
    })
}

/// `0100007F:1538` or `00000000000000000000000001000000:1538`, as the module comment says;
/// IPv4-mapped IPv6 addresses come back as IPv4.
fn parse_address(field: &str) -> Option<SocketAddr> {
    let (address, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match address.len() {
        8 => IpAddr::V4(Ipv4Addr::from(parse_word(address)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (word, bytes) in octets.chunks_exact_mut(4).enumerate() {
                bytes.copy_from_slice(&parse_word(&address[word * 8..word * 8 + 8])?);
            }
            Ipv6Addr::from(octets).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// Eight hex digits of a host-order `u32` → the 4 bytes it holds in memory.
fn parse_word(hex: &str) -> Option<[u8; 4]> {
    if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Formats as the kernel does (`%08X` of host-order words), the inverse of `parse_word`.
    fn kernel_hex(octets: &[u8]) -> String {
        octets
            .chunks_exact(4)
            .map(|word| format!("{:08X}", u32::from_ne_bytes(word.try_into().unwrap())))
            .collect()
    }

    #[test]
    fn addresses_are_read_in_host_order_per_word() {
        let v4: Ipv4Addr = "127.1.2.3".parse().unwrap();
        let field = format!("{}:{:04X}", kernel_hex(&v4.octets()), 5432);
        if cfg!(target_endian = "little") {
            assert_eq!(field, "0302017F:1538");
        }
        assert_eq!(parse_address(&field), Some(SocketAddr::from((v4, 5432))));

        let v6: Ipv6Addr = "2001:db8::1:2:3".parse().unwrap();
        let field = format!("{}:{:04X}", kernel_hex(&v6.octets()), 65535);
        if cfg!(target_endian = "little") {
            assert_eq!(field, "B80D0120000000000100000003000200:FFFF");
        }
        assert_eq!(parse_address(&field), Some(SocketAddr::from((v6, 65535))));

        if cfg!(target_endian = "little") {
            // As the kernel shows ::1.
            assert_eq!(
                parse_address("00000000000000000000000001000000:1538"),
                Some(SocketAddr::from((Ipv6Addr::LOCALHOST, 5432)))
            );
        }

        let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        let field = format!("{}:0050", kernel_hex(&mapped.octets()));
        assert_eq!(
            parse_address(&field),
            Some(SocketAddr::from((Ipv4Addr::LOCALHOST, 80)))
        );
    }

    #[test]
    fn a_kernel_row_gives_addresses_uid_and_inode() {
        let row = "   3: 0100007F:D431 0100007F:1538 01 00000000:00000000 00:00000000 00000000  \
                   1000        0 4242 1 0000000000000000 20 4 30 10 -1\n";
        let parsed = parse_row(row).unwrap();
        if cfg!(target_endian = "little") {
            assert_eq!(parsed.local, "127.0.0.1:54321".parse().unwrap());
            assert_eq!(parsed.remote, "127.0.0.1:5432".parse().unwrap());
        }
        assert_eq!((parsed.uid, parsed.inode), (1000, 4242));
        assert_eq!(parse_row("  sl  local_address rem_address   st"), None);
        assert_eq!(parse_address("0100007F"), None);
        assert_eq!(parse_address("+100007F:0050"), None);
    }
}
