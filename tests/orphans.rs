//! A build killed with `kill -9` leaves no process behind: the server of an anonymize or
//! import build and import's pg_dump/pg_restore die with their command (PR_SET_PDEATHSIG),
//! the next command works, and the parent is undamaged. A killed reset or import does not
//! leave a formerly running branch stopped.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{Fs, TestEnv};

/// A live process of this project's builds: its pid and what it is.
#[derive(Debug)]
struct BuildProcess {
    /// Its pid and command line.
    what: String,
}

/// Every live (not zombie) process working on something under the project's `tmp/`: a
/// build's postmaster and backends (their working directory is the build's data folder), and
/// pg_dump/pg_restore (their command line names the dump folder there).
fn build_processes(env: &TestEnv) -> Vec<BuildProcess> {
    let tmp = std::fs::canonicalize(env.project_dir())
        .unwrap()
        .join("tmp");
    let tmp_text = tmp.to_string_lossy().into_owned();
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        if stat
            .rsplit_once(") ")
            .is_none_or(|(_, rest)| rest.starts_with('Z'))
        {
            continue;
        }
        let cmdline = std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        let in_build = std::fs::read_link(e.path().join("cwd")).is_ok_and(|c| c.starts_with(&tmp));
        let dump_tool = (cmdline.contains("pg_dump") || cmdline.contains("pg_restore"))
            && cmdline.contains(&tmp_text);
        if in_build || dump_tool {
            found.push(BuildProcess {
                what: format!("{pid}: {cmdline}"),
            });
        }
    }
    found
}

/// Start `pgtwig args` and return it once it reached `failpoint`.
fn run_to(env: &TestEnv, args: &[&str], failpoint: &str) -> Child {
    let mut child = env
        .cmd(args)
        .env("PGTWIG_FAILPOINT", failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut lines = BufReader::new(stderr).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains(&format!("failpoint {failpoint} reached")) {
            // Keep reading what it prints, so it never blocks on a full pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return child;
        }
        seen.push(line);
    }
    panic!(
        "pgtwig {args:?} ended without reaching {failpoint}: {seen:?} {:?}",
        child.wait()
    );
}

fn kill_9(mut child: Child) {
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Within 5 s of the kill, nothing of the build runs any more.
fn assert_all_gone_within_5s(env: &TestEnv, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = build_processes(env);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "5 s after killing {what}, these still run: {left:#?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_postmaster(p: &BuildProcess, tmp: &Path) -> bool {
    p.what.contains("postgres -D") && p.what.contains(&*tmp.to_string_lossy())
}

#[test]
fn a_killed_anonymize_leaves_no_server_and_the_next_one_works() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        "project = \"shop\"\n[anonymize.columns]\n\"public.users.email\" = \"email\"\n",
    )
    .unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create extension amcheck; create table users(id int primary key, email text); \
         insert into users select g, 'person' || g || '@corp.example' from generate_series(1, 500) g",
    );

    let child = run_to(
        &env,
        &["anonymize", "--from", "main", "--into", "anon"],
        "prepare.unlocked",
    );
    let tmp = std::fs::canonicalize(env.project_dir())
        .unwrap()
        .join("tmp");
    let running = build_processes(&env);
    assert!(
        running.iter().any(|p| is_postmaster(p, &tmp)),
        "the build's server runs at the failpoint: {running:#?}"
    );
    kill_9(child);
    assert_all_gone_within_5s(&env, "pgtwig anonymize");

    // The next command cleans up, the parent is as it was, and anonymize works.
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["main"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    assert_eq!(
        env.psql(
            "main",
            "select count(*) from users where email like 'person%@corp.example'"
        ),
        "500"
    );
    // amcheck finds nothing wrong with its index (an error fails psql).
    env.psql("main", "select bt_index_check('users_pkey', true)");
    env.ok(&["anonymize", "--from", "main", "--into", "anon"]);
    env.ok(&["branch", "start", "anon"]);
    assert_eq!(
        env.psql(
            "anon",
            "select count(*) from users where email like 'person%@corp.example'"
        ),
        "0"
    );
}

/// A "production" database to import from: another project's root with an `app` database.
fn production() -> (TestEnv, String) {
    let prod = TestEnv::new(Fs::Plain).unwrap();
    prod.init();
    prod.ok(&["branch", "start", "main"]);
    prod.psql("main", "create database app");
    let url = prod
        .ok(&["branch", "url", "main", "--database", "app"])
        .trim()
        .to_string();
    common::psql(
        &url,
        "create table users(id int primary key, email text); \
         insert into users select g, 'u' || g || '@x' from generate_series(1, 1000) g",
    );
    (prod, url)
}

#[test]
fn a_killed_import_leaves_no_dump_restore_or_server_and_the_branch_keeps_serving() {
    let (prod, src) = production();
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["import", "--from", &src]);
    env.ok(&["branch", "start", "main"]);
    assert_eq!(env.psql("main", "select count(*) from users"), "1000");

    // Killed while pg_dump runs: a session holding a lock on the source keeps pg_dump
    // waiting, so it is certainly alive when pgtwig is killed.
    let mut locker = std::process::Command::new("psql")
        .args([&src, "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let stdin = locker.stdin.as_mut().unwrap();
        writeln!(
            stdin,
            "begin; lock table users in access exclusive mode; select 'locked';"
        )
        .unwrap();
        stdin.flush().unwrap();
        let mut line = String::new();
        BufReader::new(locker.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
    }
    let child = run_to(&env, &["import", "--from", &src], "import.dumping");
    let running = build_processes(&env);
    assert!(
        running.iter().any(|p| p.what.contains("pg_dump")),
        "pg_dump runs at the failpoint: {running:#?}"
    );
    kill_9(child);
    assert_all_gone_within_5s(&env, "pgtwig import while dumping");
    drop(locker.stdin.take());
    locker.wait().unwrap();

    // Killed while pg_restore fills the build: its server and pg_restore go with it. The
    // failpoint stops pgtwig reading pg_restore's output, so a source with enough objects (its
    // `--verbose` lines overflow the pipe) keeps pg_restore waiting until the kill.
    prod.psql("main", "create database many");
    let many = prod
        .ok(&["branch", "url", "main", "--database", "many"])
        .trim()
        .to_string();
    common::psql(
        &many,
        "do $$ begin for i in 1..600 loop \
           execute format('create table %I (id int primary key)', \
             'a_table_with_a_name_long_enough_to_fill_the_pipe_quickly_' || i); \
         end loop; end $$",
    );
    let child = run_to(&env, &["import", "--from", &many], "import.restoring");
    let tmp = std::fs::canonicalize(env.project_dir())
        .unwrap()
        .join("tmp");
    let running = build_processes(&env);
    assert!(
        running.iter().any(|p| is_postmaster(p, &tmp)),
        "the build's server runs at the failpoint: {running:#?}"
    );
    assert!(
        running.iter().any(|p| p.what.contains("pg_restore")),
        "pg_restore runs at the failpoint: {running:#?}"
    );
    kill_9(child);
    assert_all_gone_within_5s(&env, "pgtwig import while restoring");

    // The branch kept serving its data, the next command cleans up, and an import works.
    assert_eq!(env.psql("main", "select count(*) from users"), "1000");
    env.ok(&["branch", "list"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    common::psql(&src, "insert into users values (1001, 'new@x')");
    env.ok(&["import", "--from", &src, "--replace"]);
    assert_eq!(env.psql("main", "select count(*) from users"), "1001");

    // Killed after swapping the new state in, before starting main again: the next command
    // starts it.
    common::psql(&src, "insert into users values (1002, 'newer@x')");
    kill_9(run_to(
        &env,
        &["import", "--from", &src, "--replace"],
        "swap.before_restart",
    ));
    assert_eq!(env.branch_json("main")["running"], true, "main runs again");
    assert_eq!(env.psql("main", "select count(*) from users"), "1002");
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
}

#[test]
fn a_killed_reset_or_import_leaves_a_running_branch_running() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table t(v text); insert into t values ('parent')",
    );
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["branch", "start", "dev"]);
    env.psql("dev", "insert into t values ('dev only')");

    // Killed with the old state moved aside: the next command puts it back and starts it.
    kill_9(run_to(
        &env,
        &["branch", "reset", "dev"],
        "reset.old_moved_aside",
    ));
    assert_eq!(env.branch_json("dev")["running"], true, "dev runs again");
    assert_eq!(env.psql("dev", "select count(*) from t"), "2");

    // Killed after the new state went in, before it was started: started by the next command.
    kill_9(run_to(
        &env,
        &["branch", "reset", "dev"],
        "swap.before_restart",
    ));
    assert_eq!(env.branch_json("dev")["running"], true, "dev runs again");
    assert_eq!(env.psql("dev", "select count(*) from t"), "1", "reset done");
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());

    // A stopped branch stays stopped.
    env.ok(&["branch", "stop", "dev"]);
    kill_9(run_to(
        &env,
        &["branch", "reset", "dev"],
        "swap.before_restart",
    ));
    assert_eq!(env.branch_json("dev")["running"], false);
}

/// Run `program` as the user that runs the branch servers (when the tests run as root).
fn as_server_user(program: &str) -> std::process::Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = std::process::Command::new(program);
    if nix::unistd::geteuid().is_root() {
        let pg = nix::unistd::User::from_name("postgres")
            .unwrap()
            .expect("a postgres user");
        cmd.uid(pg.uid.as_raw())
            .gid(pg.gid.as_raw())
            .current_dir("/");
    }
    cmd
}

/// What the next lock-taker does with a build whose command is gone but whose server was not
/// tied to it (macOS, or an older pgtwig): stops the server before deleting its folder. A
/// `postmaster.pid` naming a process that is not that folder's postmaster (a reused pid) is
/// stale: that process is not signalled.
#[test]
fn the_next_command_stops_a_leftover_build_server_and_signals_no_stranger() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let tmp = env.project_dir().join("tmp");
    let ghost = tmp.join("build-ghost-1-0");
    std::fs::create_dir(&ghost).unwrap();
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(env.project_dir().join("branches/main/data"))
        .arg(ghost.join("data"))
        .status()
        .unwrap();
    assert!(copied.success());
    let sock = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        sock.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o777),
    )
    .unwrap();
    let mut server = as_server_user("/usr/lib/postgresql/15/bin/postgres")
        .arg("-D")
        .arg(ghost.join("data"))
        .arg("-k")
        .arg(sock.path())
        .args(["-c", "listen_addresses="])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    common::wait_for(30, "the leftover server to be ready", || {
        std::fs::read_to_string(ghost.join("data/postmaster.pid"))
            .is_ok_and(|t| t.lines().nth(7).is_some_and(|l| l.trim() == "ready"))
    });

    // A stale build: its postmaster.pid names a live process of the server user that is no
    // postmaster of that folder.
    let stale = tmp.join("build-stale-2-0");
    std::fs::create_dir_all(stale.join("data")).unwrap();
    let mut stranger = as_server_user("sleep").arg("60").spawn().unwrap();
    std::fs::write(
        stale.join("data/postmaster.pid"),
        format!(
            "{}\n{}\n0\n5432\n\n\n0 0\nready\n",
            stranger.id(),
            stale.join("data").display()
        ),
    )
    .unwrap();

    env.ok(&["branch", "list"]);
    // The leftover server was stopped (the test is its parent: reap it), then its folder went.
    let deadline = Instant::now() + Duration::from_secs(5);
    let exit = loop {
        if let Some(exit) = server.try_wait().unwrap() {
            break exit;
        }
        assert!(Instant::now() < deadline, "the leftover server still runs");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        !ghost.exists(),
        "its folder was removed, after the server ({exit})"
    );
    assert!(!stale.exists(), "the stale build was removed");
    assert!(
        stranger.try_wait().unwrap().is_none(),
        "the process a stale postmaster.pid named was not signalled"
    );
    let _ = stranger.kill();
    let _ = stranger.wait();
}
