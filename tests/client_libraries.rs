//! End to end: real client libraries from the package registries through
//! the proxy (issue 13). Each driver under tests/clients/ is a small script
//! that runs one library through prepared statements, COPY both ways,
//! LISTEN/NOTIFY with pid checks, cancel, terminate-by-pid and a branch
//! switch, comparing with direct connections where the answer must be the
//! same, and prints one JSON result. Each runs with sslmode=disable and
//! sslmode=require.
//!
//! The libraries come from `.ci/run` (a venv under target/, `npm ci` in
//! tests/clients/node, Debian's JDBC driver); a test whose library is
//! missing says how to install it and, under CI=true, fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{up, Daemon, Fs, TestEnv, BIN};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// A project with branches main and dev, each with a marker row naming it.
fn project() -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), "project = \"shop\"\n").unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql("main", "create table marker(branch text)");
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["branch", "start", "dev"]);
    env.psql("main", "insert into marker values ('main')");
    env.psql("dev", "insert into marker values ('dev')");
    env
}

/// Says why a library test cannot run; fails under CI=true.
fn missing(test: &str, why: &str) {
    let why = format!("{test}: {why}");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("SKIPPED: {why}");
}

/// Run one driver against the proxy in `sslmode`; returns its JSON result.
fn run_driver(env: &TestEnv, d: &Daemon, mut cmd: Command, sslmode: &str) -> serde_json::Value {
    let direct = serde_json::json!({ "main": env.url("main"), "dev": env.url("dev") });
    let proxy = format!(
        "postgresql://postgres@127.0.0.1:{}/postgres?sslmode={sslmode}",
        d.port
    );
    cmd.current_dir(&env.repo)
        .env("PGTWIG_HOME", &env.home)
        .env("PROXY_URL", &proxy)
        .env("SSLMODE", sslmode)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env("DIRECT_URLS", direct.to_string())
        .env("PGTWIG_USE", serde_json::json!([BIN, "use"]).to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let what = format!("{cmd:?} ({sslmode})");
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    // Read both pipes while waiting, so a chatty driver never blocks.
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).map(|_| s)
    });
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).map(|_| s)
    });
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after 180 s; stderr: {:?}", err.join());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out.join().unwrap().unwrap();
    let err = err.join().unwrap().unwrap();
    assert!(status.success(), "{what} failed ({status}):\n{err}\n{out}");
    let last = out.lines().last().unwrap_or_default();
    let result: serde_json::Value = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{what}: last line is not JSON ({e}): {out}\n{err}"));
    eprintln!("{what}: {result}");
    result
}

/// Every check a driver must have passed, in both sslmodes.
fn assert_passed(result: &serde_json::Value, expected: &[&str]) {
    let passed: Vec<&str> = result["passed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for name in expected {
        assert!(passed.contains(name), "check {name} did not run: {result}");
    }
}

/// The whole list, in both sslmodes, against one project and daemon.
fn run_both_sslmodes(make: impl Fn() -> Command, expected: &[&str]) {
    let env = project();
    let d = up(&env);
    for sslmode in ["disable", "require"] {
        let result = run_driver(&env, &d, make(), sslmode);
        assert_eq!(result["sslmode"], sslmode);
        assert_passed(&result, expected);
    }
}

/// The Python to run the drivers with: PGTWIG_TEST_PYTHON, or the venv .ci/run makes.
fn python() -> PathBuf {
    std::env::var_os("PGTWIG_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("target/client-venv/bin/python"))
}

/// That Python, if it can import `module`.
fn python_with(test: &str, module: &str) -> Option<PathBuf> {
    let how = "create it with: python3 -m venv target/client-venv && \
               target/client-venv/bin/pip install -r tests/clients/python/requirements.txt (.ci/run does)";
    let py = python();
    if !py.exists() {
        missing(test, &format!("no Python at {}; {how}", py.display()));
        return None;
    }
    let ok = Command::new(&py)
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        missing(
            test,
            &format!("{} cannot import {module}; {how}", py.display()),
        );
        return None;
    }
    Some(py)
}

fn script(lang: &str, name: &str) -> PathBuf {
    Path::new(ROOT).join("tests/clients").join(lang).join(name)
}

#[test]
fn psycopg3_sync_async_and_pipeline() {
    let Some(py) = python_with("psycopg3_sync_async_and_pipeline", "psycopg") else {
        return;
    };
    run_both_sslmodes(
        || {
            let mut c = Command::new(&py);
            c.arg(script("python", "psycopg_client.py"));
            c
        },
        &[
            "tls",
            "pid_fresh",
            "pid_reused",
            "prepared_on_server",
            "pipeline_results",
            "pipeline_error",
            "copy_text_roundtrip",
            "copy_binary_in",
            "notify_pid_other",
            "notify_pid_self",
            "cancel",
            "terminate_by_pid",
            "switch_admin_shutdown",
            "switch_fresh_moved",
            "async_pipeline",
            "async_copy_pipe",
            "async_notify_pid",
            "async_cancel",
        ],
    );
}

/// The TLS COPY stall of issue 13: a libpq-based async client (psycopg over the system's
/// libpq) reading a COPY TO STDOUT after a pause, 200 times per sslmode; see the driver.
#[test]
fn libpq_async_copy_never_stalls() {
    let Some(py) = python_with("libpq_async_copy_never_stalls", "psycopg") else {
        return;
    };
    run_both_sslmodes(
        || {
            let mut c = Command::new(&py);
            c.arg(script("python", "libpq_async_copy.py"))
                .env("PSYCOPG_IMPL", "python");
            c
        },
        &["libpq_impl", "copy_out_after_pause"],
    );
}

#[test]
fn asyncpg() {
    let Some(py) = python_with("asyncpg", "asyncpg") else {
        return;
    };
    run_both_sslmodes(
        || {
            let mut c = Command::new(&py);
            c.arg(script("python", "asyncpg_client.py"));
            c
        },
        &[
            "tls",
            "pid_fresh",
            "pid_reused",
            "prepared_on_server",
            "statement_cache",
            "copy_records_in",
            "copy_text_out",
            "copy_binary_out",
            "copy_text_in",
            "copy_pipe",
            "notify_pid_other",
            "notify_pid_self",
            "cancel",
            "cancel_reached_backend",
            "terminate_running",
            "terminate_by_pid",
            "switch_admin_shutdown",
            "switch_fresh_moved",
        ],
    );
}

/// node, if it is there and `npm ci` has installed tests/clients/node.
fn node_with_modules(test: &str) -> Option<PathBuf> {
    let how = "install them with: (cd tests/clients/node && npm ci) (.ci/run does)";
    let dir = Path::new(ROOT).join("tests/clients/node");
    let ok = Command::new("node")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !ok {
        missing(test, &format!("no node on PATH; {how}"));
        return None;
    }
    for module in ["pg", "pg-query-stream", "pg-copy-streams"] {
        if !dir
            .join("node_modules")
            .join(module)
            .join("package.json")
            .exists()
        {
            missing(test, &format!("node module {module} is missing; {how}"));
            return None;
        }
    }
    Some(dir)
}

#[test]
fn node_postgres_with_query_and_copy_streams() {
    let Some(dir) = node_with_modules("node_postgres_with_query_and_copy_streams") else {
        return;
    };
    run_both_sslmodes(
        || {
            let mut c = Command::new("node");
            c.arg(dir.join("pg_client.js"));
            c
        },
        &[
            "tls",
            "pid_fresh",
            "pid_reused",
            "prepared_results",
            "prepared_on_server",
            "query_stream",
            "pipeline_results",
            "pipeline_error",
            "copy_in",
            "copy_out",
            "copy_pipe",
            "notify_pid_other",
            "notify_pid_self",
            "cancel",
            "terminate_running",
            "terminate_by_pid",
            "switch_admin_shutdown",
            "switch_fresh_moved",
        ],
    );
}

/// Debian's pgjdbc jar (libpostgresql-jdbc-java), and javac to build the driver.
fn jdbc_jar(test: &str) -> Option<PathBuf> {
    let how = "install them with: apt-get install -y libpostgresql-jdbc-java default-jdk-headless (.ci/run does)";
    let jar = std::env::var_os("PGTWIG_TEST_JDBC_JAR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/share/java/postgresql.jar"));
    if !jar.exists() {
        missing(test, &format!("no pgjdbc at {}; {how}", jar.display()));
        return None;
    }
    let javac = Command::new("javac")
        .arg("-version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !javac {
        missing(test, &format!("no javac on PATH; {how}"));
        return None;
    }
    Some(jar)
}

#[test]
fn jdbc_prepare_threshold_batch_and_copy_manager() {
    let Some(jar) = jdbc_jar("jdbc_prepare_threshold_batch_and_copy_manager") else {
        return;
    };
    let classes = tempfile::tempdir().unwrap();
    let out = Command::new("javac")
        .arg("-d")
        .arg(classes.path())
        .arg("-cp")
        .arg(&jar)
        .arg(script("java", "JdbcClient.java"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "javac JdbcClient.java: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let classpath = format!("{}:{}", classes.path().display(), jar.display());
    run_both_sslmodes(
        || {
            let mut c = Command::new("java");
            c.args(["-cp", &classpath, "JdbcClient"]);
            c
        },
        &[
            "tls",
            "pid_fresh",
            "pid_reused",
            "batch",
            "prepared_results",
            "prepared_server_side",
            "prepared_on_server",
            "batch_error",
            "batch_recovers",
            "copy_in",
            "copy_out",
            "copy_pipe",
            "notify_pid_other",
            "notify_pid_self",
            "cancel",
            "terminate_running",
            "terminate_by_pid",
            "switch_admin_shutdown",
            "switch_fresh_default_has_history",
            "switch_fresh_moved",
        ],
    );
}
