//! Who can connect through the proxy, end to end with real accounts: the daemon's own user
//! without a password (TCP on 127.0.0.1 and ::1, and the Unix socket), another OS user made by
//! the test only with the proxy password, a "container" in a network namespace only with the
//! password; and the proxy under descriptor pressure (600 sessions with a 1024 soft limit, a
//! burst of 500 connects, 53300 when it really runs out).

mod common;

use std::os::unix::process::CommandExt;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::os_user::OsUser;
use common::{free_port, up, Fs, TestEnv, BIN};

/// Root is needed to make users, run processes as them and make network namespaces. Tests
/// run as root here and in CI; elsewhere say why nothing ran (and fail under CI).
fn require_root(test: &str) -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    let why = format!("{test}: needs root (to create OS users and network namespaces)");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("SKIPPED: {why}");
    false
}

/// psql (never prompting) as `user` (None: the test's own user, the daemon's).
fn psql_as(user: Option<&OsUser>, conninfo: &str, password: Option<&str>) -> Output {
    let mut cmd = Command::new("psql");
    cmd.arg(conninfo)
        .args([
            "-X",
            "-A",
            "-t",
            "-w",
            "-c",
            "select 'in as ' || current_user",
        ])
        .env_remove("PGPASSWORD")
        .env("PGCONNECT_TIMEOUT", "10")
        .stdin(Stdio::null());
    if let Some(pw) = password {
        cmd.env("PGPASSWORD", pw);
    }
    if let Some(u) = user {
        cmd.uid(u.uid).gid(u.gid).env("HOME", "/").current_dir("/");
    }
    cmd.output().unwrap()
}

fn assert_in(out: &Output, what: &str) {
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("in as postgres"),
        "{what}: expected to get in: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_refused(out: &Output, expected: &str, what: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains(expected),
        "{what}: expected a refusal containing {expected:?}; got status {:?}, stdout {:?}, stderr {stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The password in a `pgtwig url` line.
fn password_of(url: &str) -> String {
    let creds = url.split_once("://").unwrap().1.rsplit_once('@').unwrap().0;
    creds.split_once(':').unwrap().1.to_string()
}

fn project(extra_proxy: &str) -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!("project = \"shop\"\n[proxy]\nsuspend_timeout = \"0\"\n{extra_proxy}"),
    )
    .unwrap();
    env.init();
    env
}

#[test]
fn only_the_daemons_user_gets_in_without_the_proxy_password() {
    if !require_root("only_the_daemons_user_gets_in_without_the_proxy_password") {
        return;
    }
    let env = project("");
    let d = up(&env);
    let other = OsUser::create(&format!("pgtwig-t{}", std::process::id() % 100_000));
    let url = env.ok(&["url"]);
    let url = url.trim();
    assert!(
        url.starts_with("postgres://postgres:")
            && url.ends_with(&format!("@localhost:{}/postgres", d.port)),
        "{url}"
    );
    let password = password_of(url);
    let status = env.ok(&["status", "--json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let socket = status["daemon"]["unix_socket"]
        .as_str()
        .unwrap()
        .to_string();
    let socket_dir = std::path::Path::new(&socket)
        .parent()
        .unwrap()
        .display()
        .to_string();
    assert_eq!(
        status["daemon"]["addresses"],
        serde_json::json!([format!("127.0.0.1:{}", d.port), format!("[::1]:{}", d.port)])
    );

    for host in ["127.0.0.1", "::1"] {
        let conninfo = format!("host={host} port={} user=postgres dbname=postgres", d.port);
        // The daemon's own user: no password, as on a branch's private socket.
        assert_in(
            &psql_as(None, &conninfo, None),
            &format!("own user over {host}"),
        );
        // Another account: asked for the password, refused with a wrong one, in with the right one.
        assert_refused(
            &psql_as(Some(&other), &conninfo, None),
            "no password supplied",
            &format!("other user without a password over {host}"),
        );
        assert_refused(
            &psql_as(Some(&other), &conninfo, Some("wrong")),
            "password authentication failed for user \"postgres\"",
            &format!("other user with a wrong password over {host}"),
        );
        assert_in(
            &psql_as(Some(&other), &conninfo, Some(&password)),
            &format!("other user with the proxy password over {host}"),
        );
    }
    // The whole URL works for another account as it is (what a container or tool is given).
    assert_in(
        &psql_as(Some(&other), url, None),
        "other user with `pgtwig url`",
    );

    // The Unix socket: peer credentials decide.
    let conninfo = format!(
        "host={socket_dir} port={} user=postgres dbname=postgres",
        d.port
    );
    assert_in(
        &psql_as(None, &conninfo, None),
        "own user on the Unix socket",
    );
    assert_refused(
        &psql_as(Some(&other), &conninfo, None),
        "no password supplied",
        "other user on the Unix socket without a password",
    );
    assert_refused(
        &psql_as(Some(&other), &conninfo, Some("wrong")),
        "password authentication failed",
        "other user on the Unix socket with a wrong password",
    );
    assert_in(
        &psql_as(Some(&other), &conninfo, Some(&password)),
        "other user on the Unix socket with the password",
    );

    // The password is private, and a readable one stops the daemon from starting.
    let pw_file = env.project_dir().join("proxy.password");
    let mode = std::fs::metadata(&pw_file).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );
    drop(d);
    std::fs::set_permissions(
        &pw_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )
    .unwrap();
    let out = env.run(&["up", "--port", &free_port().to_string()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && stderr.contains("readable by others")
            && stderr.contains("chmod 600"),
        "{stderr}"
    );
}

/// Starts `pgtwig up --port` under `limits` (sh `ulimit` arguments); returns the child after
/// its first line (it listens) and the port.
fn up_with_limits(env: &TestEnv, limits: &str) -> (std::process::Child, u16) {
    use std::io::{BufRead, BufReader};
    let port = free_port();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg(format!("ulimit {limits} && exec \"$0\" up --port {port}"))
        .arg(BIN)
        .current_dir(&env.repo)
        .env("PGTWIG_HOME", &env.home)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert!(
        line.contains(&format!("127.0.0.1:{port}")),
        "daemon said {line:?}"
    );
    std::thread::spawn(move || std::io::copy(&mut out, &mut std::io::sink()));
    (child, port)
}

struct Killed(std::process::Child);
impl Drop for Killed {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = self.0.wait();
    }
}

fn soft_nofile(pid: u32) -> u64 {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    line.split_whitespace().nth(3).unwrap().parse().unwrap()
}

async fn connect(port: u16) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=30"),
        tokio_postgres::NoTls,
    )
    .await?;
    tokio::spawn(conn);
    Ok(client)
}

#[test]
fn six_hundred_sessions_with_a_1024_soft_limit_and_a_burst_of_500_connects() {
    let env = project("");
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "alter system set max_connections = 700");
    env.ok(&["branch", "stop", "main"]);
    env.ok(&["branch", "start", "main"]);
    assert_eq!(env.psql("main", "show max_connections"), "700");
    let (child, port) = up_with_limits(&env, "-Sn 1024");
    let daemon = Killed(child);
    assert!(
        soft_nofile(daemon.0.id()) > 1024,
        "the daemon kept the 1024 soft limit"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // 600 at once, all held open.
        let tasks: Vec<_> = (0..600).map(|_| tokio::spawn(connect(port))).collect();
        let mut clients = Vec::new();
        for t in tasks {
            let client = t
                .await
                .unwrap()
                .expect("one of 600 sessions failed to connect");
            clients.push(client);
        }
        for c in clients.iter().step_by(50) {
            let row = c.query_one("select 1", &[]).await.unwrap();
            assert_eq!(row.get::<_, i32>(0), 1);
        }
        let n: i64 = clients[0]
            .query_one(
                "select count(*) from pg_stat_activity where backend_type = 'client backend'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(n >= 600, "only {n} server sessions");
        drop(clients);

        // A burst of 500 connects, each a query and gone.
        let tasks: Vec<_> = (0..500)
            .map(|_| {
                tokio::spawn(async move {
                    let c = connect(port).await?;
                    c.simple_query("select 1").await.map(|_| ())
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap().expect("a connect of the burst failed");
        }
    });
    drop(daemon);
}

#[test]
fn a_proxy_out_of_descriptors_answers_53300() {
    let env = project("reuse_connections = false\n");
    env.ok(&["branch", "start", "main"]);
    // Soft and hard: nothing to raise to.
    let (child, port) = up_with_limits(&env, "-n 48");
    let daemon = Killed(child);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut held = Vec::new();
        let mut refusals = 0;
        for _ in 0..60 {
            match connect(port).await {
                Ok(c) => held.push(c),
                Err(e) => {
                    let code = e.code().map(|c| c.code().to_string());
                    assert_eq!(
                        code.as_deref(),
                        Some("53300"),
                        "out of descriptors must be 53300, got: {e:?}"
                    );
                    refusals += 1;
                }
            }
        }
        assert!(
            !held.is_empty() && refusals > 0,
            "held {}, refused {refusals}",
            held.len()
        );
        // Once sessions end, new ones get in again.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match connect(port).await {
                Ok(c) => {
                    c.simple_query("select 1").await.unwrap();
                    break;
                }
                Err(e) => assert!(Instant::now() < deadline, "no recovery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    drop(daemon);
}

/// A network namespace joined to this one by a veth pair: a stand-in for a container on a
/// Docker bridge (no other traffic, removed after).
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    fn create() -> Netns {
        let tag = std::process::id() % 10_000;
        let n = Netns {
            name: format!("pgtwig-t{tag}"),
            host_if: format!("pgtw-h{tag}"),
            host_ip: format!("10.231.{}.1", tag % 250),
        };
        let peer_if = format!("pgtw-c{tag}");
        let peer_ip = format!("10.231.{}.2", tag % 250);
        n.cleanup();
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().unwrap();
            assert!(out.status.success(), "ip {args:?}: {out:?}");
        };
        ip(&["netns", "add", &n.name]);
        ip(&[
            "link", "add", &n.host_if, "type", "veth", "peer", "name", &peer_if,
        ]);
        ip(&["link", "set", &peer_if, "netns", &n.name]);
        ip(&[
            "addr",
            "add",
            &format!("{}/30", n.host_ip),
            "dev",
            &n.host_if,
        ]);
        ip(&["link", "set", &n.host_if, "up"]);
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &n.name, "ip"];
            all.extend_from_slice(args);
            ip(&all);
        };
        inside(&["addr", "add", &format!("{peer_ip}/30"), "dev", &peer_if]);
        inside(&["link", "set", &peer_if, "up"]);
        inside(&["link", "set", "lo", "up"]);
        n
    }

    fn cleanup(&self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }

    /// psql inside the namespace, as root there (root is no one's peer across a network).
    fn psql(&self, conninfo: &str) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "psql", conninfo])
            .args([
                "-X",
                "-A",
                "-t",
                "-w",
                "-c",
                "select 'in as ' || current_user",
            ])
            .env_remove("PGPASSWORD")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        self.cleanup();
    }
}

#[test]
fn a_container_on_a_bridge_address_needs_the_password() {
    if !require_root("a_container_on_a_bridge_address_needs_the_password") {
        return;
    }
    let ns = Netns::create();
    let port = free_port();
    let env = project(&format!("listen = \"{}:{port}\"\n", ns.host_ip));
    // The warning reaches the terminal even when the daemon goes to the background.
    let out = env.run(&["up", "--detach"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "up --detach: {stderr}");
    assert!(
        stderr.contains("not loopback") && stderr.contains("proxy password"),
        "no warning on the terminal: {stderr}"
    );
    let url = env.ok(&["url", "--host", &ns.host_ip]);
    let url = url.trim().to_string();
    assert!(url.contains(&format!("@{}:{port}/", ns.host_ip)), "{url}");

    let conninfo = format!(
        "host={} port={port} user=postgres dbname=postgres",
        ns.host_ip
    );
    assert_refused(
        &ns.psql(&conninfo),
        "no password supplied",
        "container without the password",
    );
    assert_refused(
        &ns.psql(&format!("{conninfo} password=wrong")),
        "password authentication failed",
        "container with a wrong password",
    );
    assert_in(&ns.psql(&url), "container with `pgtwig url`");
    env.ok(&["down"]);
}
