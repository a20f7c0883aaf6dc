//! The cheapest user-space relay there is, as a reference point for `bench/proxy.sh`: TCP in,
//! a Unix socket out, one blocking thread per direction that writes whatever it reads. No
//! protocol parsing, no routing, no TLS, no cancel keys. Whatever this costs, any user-space
//! proxy (pgtwig's, PgBouncer) costs at least as much: it bounds what a better relay loop
//! could gain.
//!
//! Usage: `minimal_relay LISTEN_ADDR UNIX_SOCKET_PATH`

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;

fn pump(mut from: impl Read, mut to: impl Write) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn relay(client: TcpStream, upstream: &str) -> std::io::Result<()> {
    client.set_nodelay(true)?;
    let server = UnixStream::connect(upstream)?;
    let (client2, server2) = (client.try_clone()?, server.try_clone()?);
    std::thread::spawn(move || {
        pump(&client, &server);
        let _ = server.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        pump(&server2, &client2);
        let _ = client2.shutdown(Shutdown::Write);
    });
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, listen, upstream] = &args[..] else {
        eprintln!("usage: minimal_relay LISTEN_ADDR UNIX_SOCKET_PATH");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(listen).unwrap_or_else(|e| {
        eprintln!("minimal_relay: cannot listen on {listen}: {e}");
        std::process::exit(1);
    });
    for client in listener.incoming().flatten() {
        if let Err(e) = relay(client, upstream) {
            eprintln!("minimal_relay: {e}");
        }
    }
}
