//! End to end: `pgtwig check` running real migrations from real frameworks (Django from
//! PyPI, Knex from npm; both installed by .ci/run) against a throwaway clone of a branch
//! holding a 200,000-row table: a volatile default rewrites the table (rule fails, exit 1),
//! a plain CREATE INDEX is flagged, CREATE INDEX CONCURRENTLY is clean (exit 0). The branch
//! itself never changes and no clone is left behind — also when the command fails or
//! pgtwig is stopped or killed.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::{wait_for, Fs, TestEnv};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const ROWS: u32 = 200_000;

/// Says why a framework test cannot run; fails under CI=true.
fn missing(test: &str, why: &str) {
    let why = format!("{test}: {why}");
    assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
    eprintln!("SKIPPED: {why}");
}

/// A project whose root `main` holds database `app` (copy-on-write when the machine can).
fn project() -> TestEnv {
    let env = TestEnv::new(Fs::Reflink)
        .or_else(|| TestEnv::new(Fs::Plain))
        .unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\ndatabase = \"app\"\n",
    )
    .unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env
}

fn check(env: &TestEnv, args: &[&str], command: &[&str], extra_env: &[(&str, &str)]) -> Output {
    let mut all = vec!["check"];
    all.extend_from_slice(args);
    all.push("--");
    all.extend_from_slice(command);
    let mut cmd = env.cmd(&all);
    cmd.env("PYTHONDONTWRITEBYTECODE", "1");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
}

fn json_of(out: &Output, code: i32) -> serde_json::Value {
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn rules(report: &serde_json::Value) -> Vec<String> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["rule"].as_str().unwrap().to_string())
        .collect()
}

/// Nothing of a clone left: no build in tmp/, no extra branch.
fn assert_no_clone_left(env: &TestEnv, branches: usize) {
    let left = env.tmp_entries();
    assert!(left.is_empty(), "left in tmp/: {left:?}");
    assert_eq!(env.list_json().len(), branches, "{:?}", env.list_json());
}

fn python() -> PathBuf {
    std::env::var_os("PGTWIG_TEST_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(ROOT).join("target/client-venv/bin/python"))
}

#[test]
fn django_migrations_through_check() {
    let py = python();
    let importable = Command::new(&py)
        .args(["-c", "import django, psycopg"])
        .status()
        .is_ok_and(|s| s.success());
    if !importable {
        return missing(
            "django_migrations_through_check",
            &format!(
                "no Django in {}; python3 -m venv target/client-venv && target/client-venv/bin/pip install \
                 -r tests/clients/python/requirements.txt (.ci/run does)",
                py.display()
            ),
        );
    }
    let env = project();
    let manage = Path::new(ROOT).join("tests/migrations/django/manage.py");
    let manage = manage.to_str().unwrap();
    // main: the model's table, migrated by Django itself, then 200k rows.
    let out = Command::new(&py)
        .args([manage, "migrate", "shop", "0001", "-v", "0"])
        .env("DATABASE_URL", env.url("main"))
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.psql(
        "main",
        &format!(
            "insert into shop_item(name) select 'item ' || g from generate_series(1, {ROWS}) g"
        ),
    );
    let migrate = [py.to_str().unwrap(), manage, "migrate", "shop"];

    // A volatile database default: the table is rewritten, the rule fails.
    let out = check(
        &env,
        &["--json"],
        &migrate,
        &[("SHOP_MIGRATIONS", "rewrite")],
    );
    let report = json_of(&out, 1);
    assert_eq!(report["branch"], "main");
    let rewrite = report["rewrites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["relation"] == "public.shop_item")
        .unwrap_or_else(|| panic!("no rewrite of shop_item: {report:#}"));
    assert_eq!(rewrite["kind"], "table");
    assert!(rewrite["rows"].as_f64().unwrap() > 150_000.0, "{rewrite}");
    assert_ne!(rewrite["relfilenode_before"], rewrite["relfilenode_after"]);
    let stmt = &report["statements"][rewrite["statement"].as_u64().unwrap() as usize];
    let text = stmt["text"].as_str().unwrap().to_uppercase();
    assert!(
        text.contains("ADD COLUMN") && text.contains("RANDOM()"),
        "{stmt}"
    );
    assert!(
        stmt["locks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["relation"] == "public.shop_item" && l["mode"] == "AccessExclusiveLock"),
        "the rewrite's ACCESS EXCLUSIVE lock was not seen: {stmt}"
    );
    assert!(
        rules(&report).contains(&"table-rewrite".to_string()),
        "{report:#}"
    );
    // The branch itself never saw the migration.
    assert_eq!(
        env.psql(
            "main",
            "select count(*) from information_schema.columns where table_name = 'shop_item' and column_name = 'score'"
        ),
        "0"
    );
    assert_eq!(
        env.psql("main", "select max(id) from shop_item"),
        ROWS.to_string()
    );
    assert_no_clone_left(&env, 1);

    // The same, for a pull request comment.
    let out = check(
        &env,
        &["--format", "markdown"],
        &migrate,
        &[("SHOP_MIGRATIONS", "rewrite")],
    );
    assert_eq!(out.status.code(), Some(1));
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(
        md.starts_with("<!-- pgtwig check -->\n### pgtwig check: ❌ failed"),
        "{md}"
    );
    assert!(md.contains("| level | rule | relation | finding |"), "{md}");
    assert!(
        md.contains("| FAIL | `table-rewrite` | `public.shop_item` |"),
        "{md}"
    );
    assert!(md.contains("<details><summary>"), "{md}");

    // A plain CREATE INDEX on the 200k rows: flagged.
    let out = check(&env, &["--json"], &migrate, &[("SHOP_MIGRATIONS", "index")]);
    let report = json_of(&out, 1);
    assert_eq!(rules(&report), ["index-without-concurrently"], "{report:#}");
    assert_eq!(report["findings"][0]["relation"], "public.shop_item");

    // CONCURRENTLY: clean.
    let out = check(
        &env,
        &["--json"],
        &migrate,
        &[("SHOP_MIGRATIONS", "concurrent")],
    );
    let report = json_of(&out, 0);
    assert!(rules(&report).is_empty(), "{report:#}");
    assert!(
        report["statements"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["text"]
                .as_str()
                .unwrap()
                .to_uppercase()
                .contains("CREATE INDEX CONCURRENTLY")),
        "{report:#}"
    );
    assert_no_clone_left(&env, 1);
}

#[test]
fn knex_migrations_through_check() {
    let node_dir = Path::new(ROOT).join("tests/clients/node");
    let knex = node_dir.join("node_modules/.bin/knex");
    let node_ok = Command::new("node")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !node_ok || !knex.exists() {
        return missing(
            "knex_migrations_through_check",
            "no node or no knex in tests/clients/node; cd tests/clients/node && npm ci (.ci/run does)",
        );
    }
    let env = project();
    env.psql(
        "main",
        &format!(
            "create table items(id bigserial primary key, name text not null); \
             insert into items(name) select 'item ' || g from generate_series(1, {ROWS}) g"
        ),
    );
    let run = |dir: &str| {
        format!(
            "exec {} --cwd {} migrate:latest --client pg --connection \"$DATABASE_URL\" --migrations-directory {}",
            knex.display(),
            node_dir.display(),
            Path::new(ROOT).join("tests/migrations/knex").join(dir).display()
        )
    };

    let out = check(&env, &["--json"], &["sh", "-c", &run("rewrite")], &[]);
    let report = json_of(&out, 1);
    assert!(
        rules(&report).contains(&"table-rewrite".to_string()),
        "{report:#}"
    );
    // Knex's own bookkeeping shows up with the rows it wrote (pg_stat_statements).
    let bookkeeping = report["statements"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| {
            s["text"]
                .as_str()
                .unwrap()
                .starts_with("insert into \"knex_migrations\"")
        })
        .unwrap_or_else(|| panic!("{report:#}"));
    assert_eq!(bookkeeping["rows"], 1, "{bookkeeping}");

    // Concurrently, kept as a branch: clean, and the kept branch has the index.
    let out = check(
        &env,
        &["--json", "--keep", "checked"],
        &["sh", "-c", &run("concurrent")],
        &[],
    );
    let report = json_of(&out, 0);
    assert!(rules(&report).is_empty(), "{report:#}");
    assert_eq!(report["kept"], "checked");
    env.ok(&["branch", "start", "checked"]);
    assert_eq!(
        env.psql(
            "checked",
            "select count(*) from pg_indexes where indexname = 'items_name_idx'"
        ),
        "1"
    );
    assert_eq!(
        env.psql(
            "main",
            "select count(*) from pg_indexes where indexname = 'items_name_idx'"
        ),
        "0"
    );
    assert_no_clone_left(&env, 2);
}

#[test]
fn rules_on_plain_sql_and_config() {
    let env = project();
    env.psql(
        "main",
        &format!(
            "create table t(id int primary key, a text, b int); create table parent(id int primary key); \
             insert into parent values (1); \
             insert into t select g, case when g % 2 = 0 then 'x' end, 1 from generate_series(1, {ROWS}) g"
        ),
    );
    let sql = "alter table t add constraint t_b_fk foreign key (b) references parent(id); \
               alter table t alter column b set not null; \
               alter table t rename column id to ident; \
               alter table t drop column a";
    let out = check(
        &env,
        &["--json"],
        &["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        &[],
    );
    let report = json_of(&out, 1);
    let found = rules(&report);
    for rule in [
        "constraint-without-not-valid",
        "set-not-null",
        "rename-column",
        "drop-with-data",
    ] {
        assert!(
            found.contains(&rule.to_string()),
            "{rule} missing: {report:#}"
        );
    }
    let drop = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rule"] == "drop-with-data")
        .unwrap();
    assert!(
        drop["message"].as_str().unwrap().contains("public.t.a"),
        "{drop}"
    );
    let rename = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["rule"] == "rename-column")
        .unwrap();
    assert_eq!(rename["level"], "warn");

    // ACCESS EXCLUSIVE held past max_lock (1 s) by a transaction that sleeps after its ALTER.
    let slow = [
        "psql",
        "-X",
        "-q",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        "begin",
        "-c",
        "alter table t add column c int",
        "-c",
        "select pg_sleep(1.3)",
        "-c",
        "commit",
    ];
    let report = json_of(&check(&env, &["--json"], &slow, &[]), 1);
    assert_eq!(rules(&report), ["long-lock"], "{report:#}");
    let i = report["findings"][0]["statement"].as_u64().unwrap() as usize;
    let stmt = &report["statements"][i];
    assert_eq!(stmt["text"], "alter table t add column c int", "{report:#}");
    let held = stmt["locks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "public.t" && l["mode"] == "AccessExclusiveLock")
        .unwrap_or_else(|| panic!("{stmt}"))["held_ms"]
        .as_u64()
        .unwrap();
    assert!((1000..5000).contains(&held), "held {held} ms");

    // The safe way of the same, and [check] turning the rename off: clean.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\ndatabase = \"app\"\n[check]\nmax_lock = \"5s\"\n[check.rules]\nrename-column = \"off\"\n",
    )
    .unwrap();
    let sql =
        "alter table t add constraint t_b_fk foreign key (b) references parent(id) not valid; \
               alter table t validate constraint t_b_fk; \
               alter table t add constraint t_b_nn check (b is not null) not valid; \
               alter table t validate constraint t_b_nn; \
               alter table t alter column b set not null; \
               alter table t rename column id to ident";
    let out = check(
        &env,
        &["--json"],
        &["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", sql],
        &[],
    );
    let report = json_of(&out, 0);
    assert!(rules(&report).is_empty(), "{report:#}");
    // max_lock = "5s": the same 1.3 s lock passes.
    let report = json_of(&check(&env, &["--json"], &slow, &[]), 0);
    assert!(rules(&report).is_empty(), "{report:#}");

    // A bad [check] value is named.
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[check.rules]\ntable-rewrite = \"sometimes\"\n",
    )
    .unwrap();
    let err = String::from_utf8(check(&env, &[], &["true"], &[]).stderr).unwrap();
    assert!(
        err.contains("sometimes") && err.contains("table-rewrite"),
        "{err}"
    );
}

#[test]
fn bad_input_and_interruptions() {
    let env = project();
    env.psql("main", "create table t(a int); insert into t values (1)");

    // `--` missing.
    let out = env.run(&["check", "psql", "-c", "select 1"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("-- <COMMAND>"), "{err}");

    // A missing branch.
    let out = check(&env, &["--branch", "nope"], &["true"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("branch \"nope\" does not exist"), "{err}");

    // A failing command: its exit code and last lines, the clone gone, nothing kept.
    let out = check(
        &env,
        &["--keep", "never"],
        &[
            "sh",
            "-c",
            "psql -X -q -c 'drop table t'; echo first line; echo 'it went wrong' >&2; exit 3",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("the command failed (exit code 3)"), "{err}");
    assert!(
        err.contains("last lines of its output:\n  first line\n  it went wrong"),
        "{err}"
    );
    assert_eq!(env.psql("main", "select count(*) from t"), "1");
    assert_no_clone_left(&env, 1);

    // Stopped (SIGTERM): passed on to the command, the clone removed, exit 2.
    let marker = env.repo.join("started");
    let mut child = env
        .cmd(&[
            "check",
            "--",
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 60", marker.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for(60, "the command to start", || {
        std::fs::read_to_string(&marker).is_ok_and(|t| t.ends_with('\n'))
    });
    assert_eq!(
        env.tmp_entries()
            .iter()
            .filter(|e| e.starts_with("build-"))
            .count(),
        2,
        "{:?}",
        env.tmp_entries()
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "pgtwig check did not end after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_no_clone_left(&env, 1);

    // Killed outright: the next command that takes the project lock stops and removes the clone.
    std::fs::remove_file(&marker).unwrap();
    let mut child = env
        .cmd(&[
            "check",
            "--",
            "sh",
            "-c",
            &format!("echo $$ > {}; exec sleep 60", marker.display()),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for(60, "the command to start", || {
        std::fs::read_to_string(&marker).is_ok_and(|t| t.ends_with('\n'))
    });
    let sleeper: i32 = std::fs::read_to_string(&marker)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let build: Vec<_> = env
        .tmp_entries()
        .into_iter()
        .filter(|e| e.starts_with("build-") && !e.ends_with(".lock"))
        .collect();
    assert_eq!(build.len(), 1, "{:?}", env.tmp_entries());
    let pid_file = env
        .project_dir()
        .join("tmp")
        .join(&build[0])
        .join("data/postmaster.pid");
    let server: i32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(sleeper),
        nix::sys::signal::Signal::SIGKILL,
    );
    // The server dies with pgtwig (Linux: PR_SET_PDEATHSIG) or is stopped by the next
    // lock holder, which removes the clone either way.
    env.ok(&["branch", "stop", "main"]); // takes the lock
    assert_no_clone_left(&env, 1);
    wait_for(30, "the clone's server to stop", || !alive(server));
}

/// Whether process `pid` runs (a zombie, dead but not yet reaped by its new parent, does not).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().to_string())
        })
        .is_some_and(|rest| !rest.starts_with('Z'))
}
