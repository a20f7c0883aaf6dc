//! The "Neon proxy": one address for every endpoint, routing by the TLS
//! server name (SNI) the client sends, like Neon's proxy does. TLS is not
//! terminated here: the proxy reads the ClientHello only far enough to see
//! the name, wakes the endpoint's compute if it is suspended, then hands the
//! buffered bytes to the compute (after its own SSLRequest) and relays. The
//! client thus does TLS and SCRAM with the real PostgreSQL server.
//!
//! Not simulated: cancel requests (they carry no server name, and the keys
//! are inside TLS), Neon's own error messages for unknown endpoints (there
//! is no way to answer inside a TLS stream the proxy does not terminate, so
//! the connection is closed).

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::cloud::Inner;
use crate::state::HOST_SUFFIX;

const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;
const CANCEL_REQUEST: u32 = 80877102;
/// TLS record type of handshake messages, and the ClientHello's type.
const TLS_HANDSHAKE: u8 = 22;
const CLIENT_HELLO: u8 = 1;
/// A ClientHello is a few hundred bytes (post-quantum key shares: ~1.5 KB).
const MAX_HELLO: usize = 64 * 1024;

pub fn serve(listener: TcpListener, inner: Arc<Inner>, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let inner = inner.clone();
        std::thread::spawn(move || {
            let _ = connection(stream, &inner);
        });
    }
}

fn connection(mut client: TcpStream, inner: &Inner) -> io::Result<()> {
    // The handshake must come promptly; the relay afterwards has no limit.
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    let _ = client.set_nodelay(true);
    let mut first = [0u8; 8];
    let tls_start = loop {
        client.read_exact(&mut first)?;
        if first[0] == TLS_HANDSHAKE {
            // Direct TLS (PostgreSQL 17's sslnegotiation=direct): no SSLRequest.
            break first.to_vec();
        }
        let len = u32::from_be_bytes(first[..4].try_into().expect("4 bytes"));
        match u32::from_be_bytes(first[4..].try_into().expect("4 bytes")) {
            SSL_REQUEST if len == 8 => {
                client.write_all(b"S")?;
                break Vec::new();
            }
            // No GSSAPI here: the client goes on with SSLRequest or startup.
            GSSENC_REQUEST if len == 8 => client.write_all(b"N")?,
            CANCEL_REQUEST => return Ok(()),
            _ => {
                client.write_all(&error_response(
                    "08P01",
                    "Neon requires TLS: connect with sslmode=require (or stricter)",
                ))?;
                return Ok(());
            }
        }
    };
    let hello = read_client_hello(&mut client, tls_start)?;
    let Some(name) = server_name(&hello) else {
        // Neon answers with an error asking for SNI; we cannot inside TLS.
        return Ok(());
    };
    let Some(endpoint_id) = endpoint_for(&name) else {
        return Ok(());
    };
    let Ok(Some(port)) = inner.ensure_running(&endpoint_id, true) else {
        return Ok(());
    };
    let mut server = TcpStream::connect(("127.0.0.1", port))?;
    let _ = server.set_nodelay(true);
    server.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])?;
    let mut answer = [0u8; 1];
    server.read_exact(&mut answer)?;
    if answer[0] != b'S' {
        return Ok(());
    }
    server.write_all(&hello)?;
    client.set_read_timeout(None)?;
    relay(client, server)
}

/// Copy both ways until either side closes, then close both.
fn relay(client: TcpStream, server: TcpStream) -> io::Result<()> {
    let (mut c_read, mut s_write) = (client.try_clone()?, server.try_clone()?);
    let up = std::thread::spawn(move || {
        let _ = io::copy(&mut c_read, &mut s_write);
        let _ = s_write.shutdown(Shutdown::Both);
        let _ = c_read.shutdown(Shutdown::Both);
    });
    let (mut s_read, mut c_write) = (server, client);
    let _ = io::copy(&mut s_read, &mut c_write);
    let _ = c_write.shutdown(Shutdown::Both);
    let _ = s_read.shutdown(Shutdown::Both);
    let _ = up.join();
    Ok(())
}

/// Read TLS records until the whole ClientHello message is in; returns
/// every byte read (records included), to be replayed to the compute.
fn read_client_hello(client: &mut TcpStream, mut buf: Vec<u8>) -> io::Result<Vec<u8>> {
    let bad = |what: &str| io::Error::new(io::ErrorKind::InvalidData, what.to_string());
    let mut handshake = Vec::new();
    let mut pos = 0;
    loop {
        fill(client, &mut buf, pos + 5)?;
        if buf[pos] != TLS_HANDSHAKE {
            return Err(bad("not a TLS handshake"));
        }
        let len = u16::from_be_bytes([buf[pos + 3], buf[pos + 4]]) as usize;
        fill(client, &mut buf, pos + 5 + len)?;
        handshake.extend_from_slice(&buf[pos + 5..pos + 5 + len]);
        pos += 5 + len;
        if handshake.len() >= 4 {
            if handshake[0] != CLIENT_HELLO {
                return Err(bad("the first handshake message is not a ClientHello"));
            }
            let need = u32::from_be_bytes([0, handshake[1], handshake[2], handshake[3]]) as usize;
            if handshake.len() >= 4 + need {
                return Ok(buf);
            }
        }
        if buf.len() > MAX_HELLO {
            return Err(bad("ClientHello too large"));
        }
    }
}

fn fill(client: &mut TcpStream, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    if buf.len() < want {
        let start = buf.len();
        buf.resize(want, 0);
        client.read_exact(&mut buf[start..])?;
    }
    Ok(())
}

/// The host_name of the server_name extension (RFC 6066) in the TLS
/// records holding a ClientHello, lowercased.
pub fn server_name(records: &[u8]) -> Option<String> {
    // Reassemble the handshake payload from the records.
    let mut msg = Vec::new();
    let mut r = records;
    while r.len() >= 5 {
        let len = u16::from_be_bytes([r[3], r[4]]) as usize;
        msg.extend_from_slice(r.get(5..5 + len)?);
        r = &r[5 + len..];
    }
    let mut p = Parser(msg.get(4..)?); // past type and length
    p.take(2 + 32)?; // legacy_version, random
    let n = p.u8()? as usize;
    p.take(n)?; // session id
    let n = p.u16()? as usize;
    p.take(n)?; // cipher suites
    let n = p.u8()? as usize;
    p.take(n)?; // compression methods
    let n = p.u16()? as usize;
    let mut ext = Parser(p.take(n)?);
    while let (Some(kind), Some(len)) = (ext.u16(), ext.u16()) {
        let body = ext.take(len as usize)?;
        if kind != 0 {
            continue;
        }
        let mut list = Parser(body);
        let n = list.u16()? as usize;
        let mut names = Parser(list.take(n)?);
        while let Some(name_type) = names.u8() {
            let n = names.u16()? as usize;
            let name = names.take(n)?;
            if name_type == 0 {
                return std::str::from_utf8(name).ok().map(str::to_ascii_lowercase);
            }
        }
    }
    None
}

struct Parser<'a>(&'a [u8]);

impl<'a> Parser<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2).map(|b| u16::from_be_bytes([b[0], b[1]]))
    }
}

/// `ep-misty-2.neon.test` (or Neon's pooled `ep-misty-2-pooler.neon.test`)
/// → `ep-misty-2`.
pub fn endpoint_for(host: &str) -> Option<String> {
    let label = host.strip_suffix(HOST_SUFFIX)?;
    if label.contains('.') || !label.starts_with("ep-") {
        return None;
    }
    Some(label.strip_suffix("-pooler").unwrap_or(label).to_string())
}

/// A PostgreSQL ErrorResponse (severity FATAL) as the protocol frames it.
fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut fields = Vec::new();
    for (tag, value) in [
        (b'S', "FATAL"),
        (b'V', "FATAL"),
        (b'C', code),
        (b'M', message),
    ] {
        fields.push(tag);
        fields.extend_from_slice(value.as_bytes());
        fields.push(0);
    }
    fields.push(0);
    let mut out = vec![b'E'];
    out.extend_from_slice(&(fields.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&fields);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ClientHello record carrying `name` as SNI.
    fn hello_with(name: &str) -> Vec<u8> {
        let mut sni = Vec::new();
        sni.extend_from_slice(&((name.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(name.len() as u16).to_be_bytes());
        sni.extend_from_slice(name.as_bytes());
        let mut ext = vec![0, 0];
        ext.extend_from_slice(&(sni.len() as u16).to_be_bytes());
        ext.extend_from_slice(&sni);
        let mut body = vec![3, 3];
        body.extend_from_slice(&[7; 32]);
        body.extend_from_slice(&[0, 0, 2, 0x13, 0x01, 1, 0]);
        body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
        body.extend_from_slice(&ext);
        let mut msg = vec![CLIENT_HELLO, 0];
        msg.extend_from_slice(&(body.len() as u16).to_be_bytes());
        msg.extend_from_slice(&body);
        let mut rec = vec![TLS_HANDSHAKE, 3, 1];
        rec.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        rec.extend_from_slice(&msg);
        rec
    }

    #[test]
    fn reads_the_server_name() {
        let rec = hello_with("EP-Misty-2.neon.test");
        assert_eq!(server_name(&rec).as_deref(), Some("ep-misty-2.neon.test"));
        // Split over two records.
        let (a, b) = rec[5..].split_at(20);
        let mut two = vec![TLS_HANDSHAKE, 3, 1, 0, a.len() as u8];
        two.extend_from_slice(a);
        two.extend_from_slice(&[TLS_HANDSHAKE, 3, 1]);
        two.extend_from_slice(&(b.len() as u16).to_be_bytes());
        two.extend_from_slice(b);
        assert_eq!(server_name(&two).as_deref(), Some("ep-misty-2.neon.test"));
        assert_eq!(server_name(&rec[..rec.len() - 3]), None, "truncated");
    }

    #[test]
    fn maps_hosts_to_endpoints() {
        assert_eq!(endpoint_for("ep-a-1.neon.test").as_deref(), Some("ep-a-1"));
        assert_eq!(
            endpoint_for("ep-a-1-pooler.neon.test").as_deref(),
            Some("ep-a-1")
        );
        assert_eq!(endpoint_for("x.ep-a-1.neon.test"), None);
        assert_eq!(endpoint_for("ep-a-1.neon.tech"), None);
    }
}
