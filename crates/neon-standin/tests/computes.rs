//! The stand-in with real computes, driven by real clients: the HTTP API
//! (reqwest), tokio-postgres over rustls and psql through the SNI proxy.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use pgtwig_neon_standin::StandIn;
use reqwest::Method;
use serde_json::json;
use support::{column, connect, Api};

fn start(dir: &std::path::Path) -> StandIn {
    let t = Instant::now();
    let s = StandIn::with_computes(dir);
    eprintln!("with_computes took {:?}", t.elapsed());
    s
}

#[test]
fn a_branch_copies_its_parent_then_diverges() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    let api = Api::new(&s);
    let main_host = s.endpoint_host("main").unwrap();
    let mut main = connect(&s, &main_host).unwrap();
    main.batch_execute("create table t(v text); insert into t values ('before')")
        .unwrap();

    // While the branch is being copied, the API still answers (it shows
    // the branch as "init") and new sessions reach running computes.
    let t = Instant::now();
    let (dev_id, dev_host) = std::thread::scope(|scope| {
        let creating = scope.spawn(|| api.create("dev", None));
        let mut seen_init = false;
        while !creating.is_finished() {
            let v = api.ok(Method::GET, "/branches?limit=100", None);
            let dev = v["branches"]
                .as_array()
                .unwrap()
                .iter()
                .find(|b| b["name"] == "dev");
            seen_init |= dev.is_some_and(|b| b["current_state"] == "init");
            if seen_init {
                let mut c = connect(&s, &main_host).unwrap();
                assert_eq!(column(&mut c, "select count(*) from t"), ["1"]);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let created = creating.join().unwrap();
        assert!(seen_init, "the listing answered during the creation");
        created
    });
    eprintln!("creating a branch took {:?}", t.elapsed());
    assert_ne!(dev_host, main_host);
    let v = api.ok(Method::GET, &format!("/branches/{dev_id}"), None);
    assert_eq!(
        v["branch"]["parent_id"],
        s.branch_id("main").unwrap().as_str()
    );
    assert_eq!(v["branch"]["current_state"], "ready");

    let mut dev = connect(&s, &dev_host).unwrap();
    assert_eq!(column(&mut dev, "select v from t"), ["before"]);
    dev.batch_execute("insert into t values ('dev-only')")
        .unwrap();
    main.batch_execute("insert into t values ('main-after')")
        .unwrap();
    assert_eq!(
        column(&mut main, "select v from t order by v"),
        ["before", "main-after"]
    );
    assert_eq!(
        column(&mut dev, "select v from t order by v"),
        ["before", "dev-only"]
    );
    // The session really is TLS to PostgreSQL, authenticated by SCRAM.
    assert_eq!(
        column(
            &mut dev,
            "select ssl::text from pg_stat_ssl where pid = pg_backend_pid()"
        ),
        ["true"]
    );

    // psql (libpq) verifying the certificate for the host it sends as SNI.
    let (user, password) = s.role();
    let out = Command::new("psql")
        .arg(format!(
            "host={dev_host} hostaddr=127.0.0.1 port={} user={user} dbname=neondb \
             sslmode=verify-full sslrootcert={}",
            s.proxy_addr().port(),
            s.ca_pem_path().display()
        ))
        .args(["-XAt", "-c", "select count(*) from t"])
        .env("PGPASSWORD", password)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "2");

    // The connection string the API hands out names the endpoint's host.
    let v = api.ok(
        Method::GET,
        &format!("/connection_uri?branch_id={dev_id}&database_name=neondb&role_name=neondb_owner"),
        None,
    );
    let uri = v["uri"].as_str().unwrap();
    assert!(uri.contains(&format!("@{dev_host}/neondb")), "{uri}");
    let parsed: postgres::Config = uri.parse().unwrap();
    let postgres::config::Host::Tcp(host) = &parsed.get_hosts()[0] else {
        panic!("{uri}")
    };
    let mut c = postgres::Config::new()
        .host(host)
        .hostaddr(std::net::Ipv4Addr::LOCALHOST.into())
        .port(s.proxy_addr().port())
        .user(parsed.get_user().unwrap())
        .password(parsed.get_password().unwrap())
        .dbname(parsed.get_dbname().unwrap())
        .ssl_mode(parsed.get_ssl_mode())
        .connect(support::tls(&s))
        .unwrap();
    assert_eq!(column(&mut c, "select count(*) from t"), ["2"]);

    // Straight to the compute, bypassing the proxy.
    let mut direct =
        postgres::Client::connect(&s.direct_url("dev", "neondb"), support::tls(&s)).unwrap();
    assert_eq!(column(&mut direct, "select count(*) from t"), ["2"]);

    // Without TLS the proxy answers like Neon: TLS is required.
    let err = postgres::Config::new()
        .host("127.0.0.1")
        .port(s.proxy_addr().port())
        .user(user)
        .dbname("neondb")
        .connect(postgres::NoTls)
        .err()
        .expect("a plaintext connection is refused");
    let db = err.as_db_error().unwrap_or_else(|| panic!("{err}"));
    assert_eq!(db.code().code(), "08P01");
    assert!(db.message().contains("requires TLS"), "{db:?}");
    // An endpoint that does not exist: the connection is closed.
    assert!(connect(&s, "ep-nosuch-99.neon.test").is_err());
}

#[test]
fn suspend_wake_restore_and_delete() {
    let dir = tempfile::tempdir().unwrap();
    let s = start(dir.path());
    s.set_cold_start(Duration::from_millis(200));
    let api = Api::new(&s);
    let main_id = s.branch_id("main").unwrap();
    let mut main = connect(&s, &s.endpoint_host("main").unwrap()).unwrap();
    main.batch_execute("create table t(v text); insert into t values ('main')")
        .unwrap();
    let (dev_id, dev_host) = api.create("dev", Some(&main_id));
    connect(&s, &dev_host)
        .unwrap()
        .batch_execute("insert into t values ('dev')")
        .unwrap();

    // Suspended: the endpoint is idle; a connection wakes it.
    let starts = s.compute_starts("dev");
    s.suspend("dev");
    let eps = api.ok(Method::GET, &format!("/branches/{dev_id}/endpoints"), None);
    assert_eq!(eps["endpoints"][0]["current_state"], "idle");
    let t = Instant::now();
    let mut dev = connect(&s, &dev_host).unwrap();
    assert!(
        t.elapsed() >= Duration::from_millis(200),
        "cold start delay"
    );
    eprintln!("waking took {:?}", t.elapsed());
    assert_eq!(s.compute_starts("dev"), starts + 1);
    assert_eq!(
        column(&mut dev, "select v from t order by v"),
        ["dev", "main"]
    );
    let ep_id = eps["endpoints"][0]["id"].as_str().unwrap();
    let ep = api.ok(Method::GET, &format!("/endpoints/{ep_id}"), None);
    assert_eq!(ep["endpoint"]["current_state"], "active");

    // Restore from the parent, keeping the old state as "dev-old".
    main.batch_execute("insert into t values ('main-2')")
        .unwrap();
    api.ok(
        Method::POST,
        &format!("/branches/{dev_id}/restore"),
        Some(json!({ "source_branch_id": main_id, "preserve_under_name": "dev-old" })),
    );
    assert!(
        dev.simple_query("select 1").is_err(),
        "sessions end when the compute restarts"
    );
    let mut dev = connect(&s, &dev_host).unwrap();
    assert_eq!(
        column(&mut dev, "select v from t order by v"),
        ["main", "main-2"]
    );
    assert_eq!(s.endpoint_host("dev").unwrap(), dev_host, "same endpoint");
    // The preserved state has no endpoint; a child of it shows its data
    // (copied from a stopped data directory).
    assert_eq!(s.endpoint_host("dev-old"), None);
    let old_id = s.branch_id("dev-old").unwrap();
    let (child_id, child_host) = api.create("dev-old-child", Some(&old_id));
    assert_eq!(
        column(
            &mut connect(&s, &child_host).unwrap(),
            "select v from t order by v"
        ),
        ["dev", "main"]
    );

    // Delete: not a branch with children, not the default branch.
    let (status, v) = api.call(Method::DELETE, &format!("/branches/{old_id}"), None);
    assert_eq!(status, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("has children"));
    let (status, _) = api.call(Method::DELETE, &format!("/branches/{main_id}"), None);
    assert_eq!(status, 422);
    let child_data = s.data_dir("dev-old-child").unwrap();
    api.ok(Method::DELETE, &format!("/branches/{child_id}"), None);
    assert!(!child_data.exists(), "its data directory is removed");
    assert!(connect(&s, &child_host).is_err(), "nothing routes to it");
    api.ok(Method::DELETE, &format!("/branches/{old_id}"), None);
    api.ok(Method::DELETE, &format!("/branches/{dev_id}"), None);
    assert_eq!(s.branch_names(), ["main"]);
    assert!(connect(&s, &dev_host).is_err());
}
