//! A minimal HTTP/1.1 server on std threads, enough for a JSON API: one
//! thread per connection (so a daemon and a CLI can call at once, and a
//! slow branch copy does not hold up other requests), `Content-Length`
//! bodies, one request per connection answered with `Connection: close`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

pub struct Request {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    pub authorization: String,
    /// The JSON body, `Null` when there is none.
    pub body: Value,
}

impl Request {
    /// The path without the query.
    pub fn path(&self) -> &str {
        self.target.split_once('?').map_or(&self.target, |(p, _)| p)
    }

    /// A query parameter, percent-decoded.
    pub fn query(&self, name: &str) -> Option<String> {
        let (_, q) = self.target.split_once('?')?;
        q.split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| percent_decode(v))
    }
}

pub struct Response {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Value,
}

impl Response {
    pub fn ok(body: Value) -> Response {
        Response::with(200, body)
    }

    pub fn with(status: u16, body: Value) -> Response {
        Response {
            status,
            headers: Vec::new(),
            body,
        }
    }

    /// Neon's error shape: `{"code": …, "message": …}`.
    pub fn error(status: u16, message: impl Into<String>) -> Response {
        let code = match status {
            400 | 422 => "BAD_REQUEST",
            401 => "UNAUTHORIZED",
            403 => "FORBIDDEN",
            404 => "NOT_FOUND",
            429 => "TOO_MANY_REQUESTS",
            _ => "INTERNAL_ERROR",
        };
        Response::with(status, json!({"code": code, "message": message.into()}))
    }
}

pub type Handler = Arc<dyn Fn(Request) -> Response + Send + Sync>;

/// Accept connections until `stop` is set (the owner then connects once to
/// wake the blocked `accept`).
pub fn serve(listener: TcpListener, handler: Handler, stop: Arc<AtomicBool>) {
    for stream in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(stream) = stream else { continue };
        let handler = handler.clone();
        std::thread::spawn(move || connection(stream, &handler));
    }
}

fn connection(mut stream: TcpStream, handler: &Handler) {
    // A client that stalls mid-request must not pin a thread forever.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let req = match read_request(&stream) {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(msg) => {
            write_response(&mut stream, &Response::error(400, msg));
            return;
        }
    };
    // A handler bug answers 500 instead of dropping the connection, so the
    // failing test shows the panic message.
    let resp = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| handler(req)))
        .unwrap_or_else(|p| {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            Response::error(500, format!("stand-in bug: {msg}"))
        });
    write_response(&mut stream, &resp);
}

fn read_request(stream: &TcpStream) -> Result<Option<Request>, String> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(format!("bad request line {line:?}"));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut authorization = String::new();
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).map_err(|e| e.to_string())? == 0 || h.trim().is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => len = value.parse().map_err(|_| "bad Content-Length")?,
            "authorization" => authorization = value.to_string(),
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err("chunked bodies are not supported; send Content-Length".into())
            }
            _ => {}
        }
    }
    let mut body = vec![0; len];
    reader.read_exact(&mut body).map_err(|e| e.to_string())?;
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        serde_json::from_slice(&body).map_err(|e| format!("the body is not JSON: {e}"))?
    };
    Ok(Some(Request {
        method,
        target,
        authorization,
        body,
    }))
}

fn write_response(stream: &mut TcpStream, resp: &Response) {
    let text = resp.body.to_string();
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        resp.status,
        reason(resp.status),
        text.len()
    );
    for (name, value) in &resp.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(text.as_bytes());
    let _ = stream.flush();
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        201 => "Created",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        422 => "Unprocessable Entity",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                    (Some(h), Some(l)) => {
                        out.push((h * 16 + l) as u8);
                        i += 3;
                        continue;
                    }
                    _ => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::percent_decode;

    #[test]
    fn decodes_percent_escapes() {
        assert_eq!(percent_decode("a%2Fb%20c"), "a/b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
