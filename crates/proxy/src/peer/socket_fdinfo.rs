//! Which TCP connection a macOS descriptor is: the few fields of `struct socket_fdinfo`
//! (`<sys/proc_info.h>`, what `proc_pidfdinfo(PROC_PIDFDSOCKETINFO)` fills in) that say so,
//! read by offset from the bytes the kernel wrote. Pure, so it is compiled and tested on every
//! system; `libproc.rs` makes the calls on macOS.
//!
//! The offsets, from the XNU header (the same on arm64 and x86_64: both LP64, natural
//! alignment, nothing packed):
//!
//! - `socket_fdinfo` = `proc_fileinfo pfi` (24 bytes: u32, u32, off_t, i32, u32) then
//!   `socket_info psi`, at 24.
//! - `socket_info` = `vinfo_stat soi_stat` (136), `soi_so` and `soi_pcb` (u64 each: 136, 144),
//!   `soi_type` 152, `soi_protocol` 156, `soi_family` 160, eight shorts (164–179),
//!   `soi_oobmark` 180, two `sockbuf_info` (24 each: 184, 208), `soi_kind` 232, `rfu_1` 236,
//!   then the union `soi_proto` at 240, whose TCP member `tcp_sockinfo` starts with
//!   `in_sockinfo tcpsi_ini`.
//! - `in_sockinfo` = `insi_fport` 0, `insi_lport` 4 (ints holding the `u_short` port in
//!   network byte order), `insi_gencnt` 8, `insi_flags` 16, `insi_flow` 20, `insi_vflag` 24,
//!   `insi_ip_ttl` 25, `rfu_1` 28, `insi_faddr` 32 and `insi_laddr` 48 (16 bytes each: an
//!   `in6_addr`, or for IPv4 an `in4in6_addr`, three padding words then the address).
//!
//! The whole struct is 792 bytes (the union's largest member is `un_sockinfo`, 528); the
//! caller passes a larger buffer, and only the bytes up to the local address are needed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// `sizeof(struct socket_fdinfo)` on 64-bit macOS. The kernel refuses a smaller buffer.
pub(crate) const SOCKET_FDINFO_SIZE: usize = 792;

const PSI: usize = 24;
const SOI_FAMILY: usize = PSI + 160;
const SOI_KIND: usize = PSI + 232;
const TCPSI_INI: usize = PSI + 240;
const INSI_FPORT: usize = TCPSI_INI;
const INSI_LPORT: usize = TCPSI_INI + 4;
const INSI_VFLAG: usize = TCPSI_INI + 24;
const INSI_FADDR: usize = TCPSI_INI + 32;
const INSI_LADDR: usize = TCPSI_INI + 48;
/// Bytes the fields read here need.
pub(crate) const NEEDED: usize = INSI_LADDR + 16;

/// `soi_kind` of a TCP socket (`SOCKINFO_TCP`).
const SOCKINFO_TCP: i32 = 2;
/// macOS's address families.
const AF_INET: i32 = 2;
const AF_INET6: i32 = 30;
/// `insi_vflag` bits.
const INI_IPV4: u8 = 0x1;
const INI_IPV6: u8 = 0x2;

/// The local and remote addresses of the TCP socket `info` describes (the bytes
/// `proc_pidfdinfo` wrote), or `None` when it is not a TCP socket over IPv4 or IPv6.
/// IPv4-mapped IPv6 addresses come back as the IPv4 addresses they carry.
pub(crate) fn tcp_endpoints(info: &[u8]) -> Option<(SocketAddr, SocketAddr)> {
    if info.len() < NEEDED || int(info, SOI_KIND) != SOCKINFO_TCP {
        return None;
    }
    let family = int(info, SOI_FAMILY);
    let vflag = info[INSI_VFLAG];
    let ip = |at: usize| -> Option<IpAddr> {
        let bytes: [u8; 16] = info[at..at + 16].try_into().ok()?;
        if family == AF_INET || (vflag & INI_IPV4 != 0 && vflag & INI_IPV6 == 0) {
            let v4: [u8; 4] = bytes[12..16].try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(v4)))
        } else if family == AF_INET6 {
            Some(IpAddr::V6(Ipv6Addr::from(bytes)).to_canonical())
        } else {
            None
        }
    };
    let port = |at: usize| u16::from_be(int(info, at) as u16);
    let local = SocketAddr::new(ip(INSI_LADDR)?, port(INSI_LPORT));
    let remote = SocketAddr::new(ip(INSI_FADDR)?, port(INSI_FPORT));
    Some((local, remote))
}

fn int(info: &[u8], at: usize) -> i32 {
    i32::from_ne_bytes([info[at], info[at + 1], info[at + 2], info[at + 3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `socket_fdinfo` as the kernel writes it for a TCP socket.
    fn tcp_info(family: i32, vflag: u8, local: (IpAddr, u16), remote: (IpAddr, u16)) -> Vec<u8> {
        let mut b = vec![0u8; SOCKET_FDINFO_SIZE];
        b[SOI_FAMILY..SOI_FAMILY + 4].copy_from_slice(&family.to_ne_bytes());
        b[SOI_KIND..SOI_KIND + 4].copy_from_slice(&SOCKINFO_TCP.to_ne_bytes());
        // The kernel copies the network-order u_short into an int.
        let port = |p: u16| i32::from(p.to_be()).to_ne_bytes();
        b[INSI_LPORT..INSI_LPORT + 4].copy_from_slice(&port(local.1));
        b[INSI_FPORT..INSI_FPORT + 4].copy_from_slice(&port(remote.1));
        b[INSI_VFLAG] = vflag;
        let mut put = |at: usize, ip: IpAddr| match ip {
            IpAddr::V4(v4) => b[at + 12..at + 16].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => b[at..at + 16].copy_from_slice(&v6.octets()),
        };
        put(INSI_LADDR, local.0);
        put(INSI_FADDR, remote.0);
        b
    }

    // The fields read lie inside the struct, where the header puts them.
    const _: () = assert!(NEEDED <= SOCKET_FDINFO_SIZE && INSI_LADDR == 312);

    #[test]
    fn ipv4_ipv6_and_mapped_connections() {
        let v4 = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let v6 = IpAddr::V6(Ipv6Addr::LOCALHOST);
        // A dual-stack socket talking IPv4: an AF_INET6 socket with IPv4-mapped addresses,
        // read back as the IPv4 addresses they carry.
        let mapped = IpAddr::V6(Ipv4Addr::LOCALHOST.to_ipv6_mapped());
        for (family, vflag, sent, read) in [
            (AF_INET, INI_IPV4, v4, v4),
            (AF_INET6, INI_IPV6, v6, v6),
            (AF_INET6, INI_IPV6, mapped, v4),
        ] {
            let info = tcp_info(family, vflag, (sent, 54321), (sent, 5432));
            assert_eq!(
                tcp_endpoints(&info),
                Some((SocketAddr::new(read, 54321), SocketAddr::new(read, 5432))),
                "{sent} (family {family}, vflag {vflag})"
            );
        }
    }

    #[test]
    fn not_tcp_or_too_short() {
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let mut info = tcp_info(AF_INET, INI_IPV4, (lo, 1), (lo, 2));
        assert!(tcp_endpoints(&info[..NEEDED - 1]).is_none());
        info[SOI_KIND] = 1; // SOCKINFO_IN: UDP and raw sockets
        assert!(tcp_endpoints(&info).is_none());
    }
}
