//! `[proxy] listen`: where the proxy accepts clients, written `host:port`.
//!
//! `localhost` means both loopback addresses, 127.0.0.1 and ::1: where `localhost` resolves to
//! `::1` first (macOS, many Linux setups) an app would otherwise reach whatever else listens on
//! `[::1]:5432` — another PostgreSQL — without a word. An IP literal means exactly that
//! address; another host name means every address it resolves to.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, ToSocketAddrs};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A listen address as written in `.pgtwig.toml` or `pgtwig up --listen`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// TCP port.
    pub port: u16,
}

impl ListenAddr {
    /// `localhost:5432`, the default.
    pub fn localhost(port: u16) -> ListenAddr {
        ListenAddr {
            host: "localhost".into(),
            port,
        }
    }

    /// Parses `host:port`, `[v6]:port` or `v6` … with a port.
    pub fn parse(text: &str) -> Result<ListenAddr, String> {
        let text = text.trim();
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(ListenAddr {
                host: addr.ip().to_string(),
                port: addr.port(),
            });
        }
        let bad = || {
            format!(
                "invalid listen address \"{text}\"; write host:port, e.g. \"localhost:5432\", \"127.0.0.1:5432\" or \"[::1]:5432\""
            )
        };
        let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        if host.is_empty() || host.contains(':') || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        Ok(ListenAddr {
            host: host.to_string(),
            port,
        })
    }

    /// The socket addresses to bind, in order.
    pub fn socket_addrs(&self) -> Result<Vec<SocketAddr>, String> {
        if self.host.eq_ignore_ascii_case("localhost") {
            return Ok(vec![
                SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), self.port),
                SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), self.port),
            ]);
        }
        if let Ok(ip) = self.host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, self.port)]);
        }
        let mut addrs: Vec<SocketAddr> = (self.host.as_str(), self.port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve listen host \"{}\": {e}", self.host))?
            .collect();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(format!("listen host \"{}\" has no addresses", self.host));
        }
        Ok(addrs)
    }

    /// True when every address to bind is a loopback address (nothing outside this machine
    /// can connect).
    pub fn is_loopback(&self) -> bool {
        self.socket_addrs()
            .map(|a| a.iter().all(|a| a.ip().is_loopback()))
            .unwrap_or(false)
    }

    /// The host part for a URL (`[::1]` bracketed).
    pub fn url_host(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        }
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.url_host(), self.port)
    }
}

impl std::str::FromStr for ListenAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ListenAddr::parse(s)
    }
}

impl Serialize for ListenAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ListenAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        ListenAddr::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn localhost_is_both_loopback_addresses() {
        let l = ListenAddr::parse("localhost:5432").unwrap();
        assert_eq!(
            l.socket_addrs().unwrap(),
            vec![
                "127.0.0.1:5432".parse::<SocketAddr>().unwrap(),
                "[::1]:5432".parse().unwrap()
            ]
        );
        assert!(l.is_loopback());
        assert_eq!(l.to_string(), "localhost:5432");
    }

    #[test]
    fn literals_and_errors() {
        let v6 = ListenAddr::parse("[::1]:6000").unwrap();
        assert_eq!(v6.host, "::1");
        assert_eq!(v6.to_string(), "[::1]:6000");
        assert!(v6.is_loopback());
        let any = ListenAddr::parse("0.0.0.0:5432").unwrap();
        assert!(!any.is_loopback());
        for bad in ["localhost", "::1:5432x", ":5432", "host:99999", "a b:1"] {
            assert!(ListenAddr::parse(bad).is_err(), "{bad}");
        }
    }
}
