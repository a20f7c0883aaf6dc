//! The proxy's own authentication (`ProxyConfig::client_auth`): the owner's Unix-socket and
//! loopback clients in without a password, everyone else through SCRAM-SHA-256 against the
//! proxy password, with real servers, psql and tokio-postgres.

mod support;

use std::time::Duration;

use pgtwig_proxy::{ClientAuth, ProxyConfig, ScramSecret};
use support::*;

const PASSWORD: &str = "proxy-pässword-1";

fn auth(owner_uid: u32) -> ClientAuth {
    ClientAuth {
        owner_uid,
        secret: ScramSecret::from_password(PASSWORD),
        hint: "run `pgtwig url`".into(),
    }
}

/// No client here is the owner (uid u32::MAX is nobody's): every TCP client must do SCRAM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_are_not_the_owner_need_the_proxy_password() {
    let tls_dir = tempfile::tempdir().unwrap();
    let env = Env::start(ProxyConfig {
        client_auth: Some(auth(u32::MAX)),
        tls: Some(pgtwig_proxy::load_or_create_tls(tls_dir.path()).unwrap()),
        ..config()
    })
    .await;
    let baseline = fd_count();

    // Right password: psql (plain and TLS) and tokio-postgres get in and reach the branch.
    let with_pw = format!("dbname=postgres password={PASSWORD}");
    assert_eq!(
        env.psql_ok(&with_pw, "select branch from marker").await,
        "main"
    );
    assert_eq!(
        env.psql_ok(
            &format!("{with_pw} sslmode=require"),
            "select branch from marker"
        )
        .await,
        "main"
    );
    let (client, conn) = tokio_postgres::connect(
        &format!("{} password={PASSWORD}", env.conninfo("postgres")),
        tokio_postgres::NoTls,
    )
    .await
    .unwrap();
    let conn = tokio::spawn(conn);
    assert_eq!(
        simple_value(&client, "select branch from marker").await,
        "main"
    );
    drop(client);
    conn.await.unwrap().unwrap();

    // Wrong password: 28P01 with the hint, from both clients.
    let Err(err) = tokio_postgres::connect(
        &format!("{} password=wrong", env.conninfo("postgres")),
        tokio_postgres::NoTls,
    )
    .await
    else {
        panic!("a wrong password got in")
    };
    assert_eq!(code(&err), "28P01", "{err}");
    let out = env.psql("dbname=postgres password=wrong", "select 1").await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("password authentication failed for user \"postgres\"")
            && stderr.contains("run `pgtwig url`"),
        "{stderr}"
    );

    // No password: the proxy asked for one (libpq gives up on its side).
    let out = tokio::process::Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            env.port
        ))
        .args(["-w", "-c", "select 1"])
        .env_remove("PGPASSWORD")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no password supplied"), "{stderr}");

    // A client insisting on channel binding is refused by itself: the proxy offers none.
    let out = env
        .psql(
            &format!("{with_pw} sslmode=require channel_binding=require"),
            "select 1",
        )
        .await;
    assert!(!out.status.success());

    // The branch's server never saw an unauthenticated client.
    let log = env.main.log();
    assert!(!log.contains("password=wrong"), "{log}");
    env.assert_nothing_leaked(baseline, "after password clients")
        .await;
}

/// A raw client that answers AuthenticationSASL with something else gets 28000, not a
/// dropped socket; one that says Terminate is let go quietly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_will_not_do_scram_gets_an_error() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start(ProxyConfig {
        client_auth: Some(auth(u32::MAX)),
        ..config()
    })
    .await;
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", env.port))
        .await
        .unwrap();
    let mut startup = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        [("user", "postgres"), ("database", "postgres")],
        &mut startup,
    )
    .unwrap();
    tcp.write_all(&startup).await.unwrap();
    let mut header = [0u8; 9];
    tcp.read_exact(&mut header).await.unwrap();
    assert_eq!(header[0], b'R');
    assert_eq!(
        u32::from_be_bytes(header[5..9].try_into().unwrap()),
        10,
        "AuthenticationSASL"
    );
    let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut mechanisms = vec![0u8; len - 8];
    tcp.read_exact(&mut mechanisms).await.unwrap();
    assert_eq!(mechanisms, b"SCRAM-SHA-256\0\0");
    // A PasswordMessage in clear instead of SASL.
    let mut pw = bytes::BytesMut::new();
    postgres_protocol::message::frontend::password_message(b"guess", &mut pw).unwrap();
    // Same type byte 'p' as a SASL response, but no mechanism: malformed → 08P01.
    tcp.write_all(&pw).await.unwrap();
    let messages = tokio::time::timeout(Duration::from_secs(5), read_messages(&mut tcp))
        .await
        .unwrap();
    let (kind, body) = messages.last().unwrap();
    assert_eq!(*kind, b'E');
    let fields = error_fields(body);
    assert!(
        matches!(fields[&b'C'].as_str(), "08P01" | "28000"),
        "{fields:?}"
    );
    env.wait_drained().await;
}
