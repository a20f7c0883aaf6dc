//! Who owns the other end of a connection (placeholder until the sock_diag lookup lands).

use std::net::SocketAddr;

/// The owner of the client end of a TCP connection the proxy accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerOwner {
    /// Owner uid.
    pub uid: u32,
    /// Socket inode.
    pub inode: u64,
}

/// Credentials of the process at the other end of a Unix-domain socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnixPeer {
    /// Peer uid.
    pub uid: u32,
    /// Peer pid, where the OS tells.
    pub pid: Option<u32>,
}

/// The owner of the client socket of an accepted TCP connection.
pub fn tcp_peer_owner(
    _accepted_local: SocketAddr,
    _client: SocketAddr,
) -> std::io::Result<Option<PeerOwner>> {
    Ok(None)
}

/// Peer credentials of a Unix-domain socket.
pub fn unix_peer(stream: &impl std::os::fd::AsFd) -> std::io::Result<UnixPeer> {
    let cred = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)?;
    Ok(UnixPeer {
        uid: cred.uid(),
        pid: u32::try_from(cred.pid()).ok(),
    })
}
