//! TLS to the upstream (how the proxy reaches Neon): a local PostgreSQL
//! with `ssl = on` and a certificate from a test CA. The certificate is
//! verified for the server name, which is also sent as SNI; a mismatch is
//! refused and the client gets a proper error.

mod support;

use std::collections::HashMap;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex};

use pgtwig_proxy::{Proxy, ProxyConfig, UpstreamAddr, UpstreamTls};
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use support::{Cluster, TestRouter};
use tokio::sync::watch;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_upstream_verifies_the_server_name() {
    // A test CA and a server certificate for "localhost".
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let srv_key = KeyPair::generate().unwrap();
    let srv = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&srv_key, &ca, &ca_key)
        .unwrap();
    let (cert_pem, key_pem) = (srv.pem(), srv_key.serialize_pem());
    let cluster = tokio::task::spawn_blocking(move || {
        Cluster::start_with(
            "tls",
            |data| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::write(data.join("server.crt"), &cert_pem).unwrap();
                std::fs::write(data.join("server.key"), &key_pem).unwrap();
                std::fs::set_permissions(
                    data.join("server.key"),
                    std::fs::Permissions::from_mode(0o600),
                )
                .unwrap();
                let hba = data.join("pg_hba.conf");
                let text = std::fs::read_to_string(&hba).unwrap();
                std::fs::write(&hba, format!("hostssl all all 127.0.0.1/32 trust\n{text}"))
                    .unwrap();
            },
            &["ssl=on", "listen_addresses=127.0.0.1"],
        )
    })
    .await
    .unwrap();

    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).unwrap();
    let tls = UpstreamTls::with_roots(roots);
    let upstream = |name: &str| UpstreamAddr::Tls {
        host: "127.0.0.1".into(),
        port: cluster.port,
        server_name: name.into(),
        tls: tls.clone(),
    };
    let (_tx, rx) = watch::channel("main".to_string());
    let router = Arc::new(TestRouter {
        active: rx.clone(),
        branches: Mutex::new(HashMap::from([
            ("main".to_string(), Ok(upstream("localhost"))),
            ("impostor".to_string(), Ok(upstream("other.example"))),
        ])),
        calls: AtomicUsize::new(0),
        leases: Arc::new(AtomicUsize::new(0)),
        stale: Mutex::default(),
    });
    let proxy = Arc::new(Proxy::new(ProxyConfig::default(), router, rx));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(proxy.serve(listener));

    // Through the proxy (plain to the proxy), TLS from the proxy to the server.
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres");
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let row = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert!(row.get::<_, bool>(0), "the server side of the proxy is TLS");

    // A certificate that is not valid for the name asked for is refused.
    let url = format!("host=127.0.0.1 port={port} user=postgres dbname=postgres@impostor");
    let err = match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
        Ok(_) => panic!("a certificate for another name must be refused"),
        Err(e) => e,
    };
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("expected an ErrorResponse, got {err}"));
    assert_eq!(db.code().code(), "08006", "{db:?}");
    assert!(db.detail().unwrap_or("").contains("TLS"), "{db:?}");
}
