//! Test helpers: a small HTTP client for the stand-in's API, and real
//! PostgreSQL clients (tokio-postgres over rustls, psql) through its proxy.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgtwig_neon_standin::StandIn;
use reqwest::Method;
use serde_json::Value;

pub struct Api {
    base: String,
    key: String,
    http: reqwest::blocking::Client,
}

impl Api {
    pub fn new(s: &StandIn) -> Api {
        Api {
            base: format!("{}/projects/{}", s.api_base(), s.project_id()),
            key: s.api_key().to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
        }
    }

    /// (status, JSON body) of a request under the project.
    pub fn call(&self, method: Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .bearer_auth(&self.key);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().unwrap())
    }

    /// A call that must succeed; waits for the operations it started.
    pub fn ok(&self, method: Method, path: &str, body: Option<Value>) -> Value {
        let (status, v) = self.call(method.clone(), path, body);
        assert!(
            (200..300).contains(&status),
            "{method} {path}: {status} {v}"
        );
        self.wait(&v["operations"]);
        v
    }

    pub fn wait(&self, ops: &Value) {
        let deadline = Instant::now() + Duration::from_secs(10);
        for op in ops.as_array().into_iter().flatten() {
            let id = op["id"].as_str().unwrap();
            loop {
                let (_, v) = self.call(Method::GET, &format!("/operations/{id}"), None);
                if v["operation"]["status"] == "finished" {
                    break;
                }
                assert!(Instant::now() < deadline, "operation {id} never finished");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Create a branch with a read-write endpoint; returns (branch id, endpoint host).
    pub fn create(&self, name: &str, parent_id: Option<&str>) -> (String, String) {
        let mut branch = serde_json::json!({ "name": name });
        if let Some(p) = parent_id {
            branch["parent_id"] = p.into();
        }
        let v = self.ok(
            Method::POST,
            "/branches",
            Some(serde_json::json!({ "branch": branch, "endpoints": [{ "type": "read_write" }] })),
        );
        (
            v["branch"]["id"].as_str().unwrap().to_string(),
            v["endpoints"][0]["host"].as_str().unwrap().to_string(),
        )
    }
}

/// TLS that trusts only the stand-in's test CA, verifying the host name.
pub fn tls(s: &StandIn) -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(s.ca_pem_path()).unwrap();
    for c in rustls_pemfile::certs(&mut &pem[..]) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(cfg)
}

/// Connect through the proxy as a Neon client would: TLS to `host` (sent
/// as SNI and verified), TCP to the proxy address, SCRAM password.
pub fn connect(s: &StandIn, host: &str) -> Result<postgres::Client, postgres::Error> {
    let (user, password) = s.role();
    postgres::Config::new()
        .host(host)
        .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
        .port(s.proxy_addr().port())
        .user(user)
        .password(password)
        .dbname("neondb")
        .ssl_mode(postgres::config::SslMode::Require)
        .connect_timeout(Duration::from_secs(30))
        .connect(tls(s))
}

/// The first column of every row, as text.
pub fn column(c: &mut postgres::Client, sql: &str) -> Vec<String> {
    c.simple_query(sql)
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect()
}
