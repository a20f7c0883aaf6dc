//! Point-in-time branches: recover a dropped table by branching from before
//! the drop. Needs a copy-on-write file system (history bases are reflink
//! snapshots); `.ci/run` provides one.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Fs, TestEnv};

/// Start main, which takes the first history base in the background, and wait for it.
fn start_with_a_base(env: &TestEnv) {
    env.ok(&["branch", "start", "main"]);
    let bases = env.project_dir().join("branches/main/bases");
    common::wait_for(30, "a history base after start", || {
        std::fs::read_dir(&bases)
            .map(|d| {
                d.flatten().any(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                        && e.path().join("base.json").exists()
                })
            })
            .unwrap_or(false)
    });
}

#[test]
fn branch_from_a_minute_ago_brings_back_a_dropped_table() {
    let Some(env) = TestEnv::new(Fs::Reflink) else {
        return;
    };
    env.init();
    start_with_a_base(&env);
    std::thread::sleep(Duration::from_millis(1200));
    env.psql(
        "main",
        "create table precious as select g from generate_series(1, 1000) g",
    );
    env.psql(
        "main",
        "create table other(x int); insert into other values (1)",
    );
    std::thread::sleep(Duration::from_millis(1200));
    let before_drop = env.psql(
        "main",
        "select to_char(now() at time zone 'utc', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
    );
    std::thread::sleep(Duration::from_millis(1200));
    env.psql("main", "drop table precious; insert into other values (2)");

    let out = env.ok(&[
        "branch",
        "create",
        "rescue",
        "--from",
        "main",
        "--at",
        &before_drop,
    ]);
    assert!(out.contains("Created branch \"rescue\""), "{out}");
    env.ok(&["branch", "start", "rescue"]);
    assert_eq!(env.psql("rescue", "select count(*) from precious"), "1000");
    assert_eq!(
        env.psql("rescue", "select string_agg(x::text, ',') from other"),
        "1",
        "nothing after the target"
    );
    // The rescued branch is an ordinary writable branch.
    env.psql("rescue", "insert into other values (3)");
    // The parent is untouched.
    assert_eq!(
        env.psql(
            "main",
            "select count(*) from pg_class where relname = 'precious'"
        ),
        "0"
    );

    // Outside the history kept: a clear error, nothing created.
    let err = env.fails(&[
        "branch",
        "create",
        "ancient",
        "--from",
        "main",
        "--at",
        "2001-01-01T00:00:00Z",
    ]);
    assert!(err.contains("the earliest point available is"), "{err}");
    let err = env.fails(&["branch", "create", "x", "--at", "yesterday-ish"]);
    assert!(err.contains("neither a time"), "{err}");
    let names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, vec!["main", "rescue"]);
}

/// The real binaries, hard-linked (or copied) into a folder only their owner can enter — as
/// `/root/.cargo/bin` is — so servers running as another user cannot reach them.
fn private_binaries(dir: &Path) -> PathBuf {
    let bin = dir.join("private-bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o700)).unwrap();
    for name in ["pgtwig", "pgtwig-archive-wal"] {
        let src = Path::new(common::BIN).with_file_name(name);
        if std::fs::hard_link(&src, bin.join(name)).is_err() {
            std::fs::copy(&src, bin.join(name)).unwrap();
        }
    }
    bin.join("pgtwig")
}

/// The archiver working for `archive`: (pid, the WAL file it archives).
fn archiver_process(archive: &Path) -> Option<(i32, String)> {
    let dir = archive.to_str().unwrap();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let args: Vec<String> = cmdline
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        (args.len() >= 4 && args[0].ends_with("/pgtwig-archive-wal") && args[1] == dir)
            .then(|| (pid, args[3].clone()))
    })
}

fn segments(archive: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(archive)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.len() == 24 && n.bytes().all(|b| b.is_ascii_hexdigit()))
        .collect();
    names.sort();
    names
}

/// An archiver killed after its copy, before its rename, leaves no partial
/// segment under the real name; PostgreSQL runs it again, which succeeds, and
/// archiving goes on (pg_wal does not keep the segments). pgtwig runs from a
/// folder the server user cannot enter: the servers run the project's copy.
#[test]
fn archiving_recovers_from_an_archiver_killed_before_its_rename() {
    let env = TestEnv::new(Fs::Plain).expect("a plain file system is always there");
    env.init();
    let scratch = env.home.parent().unwrap().to_path_buf();
    let pgtwig = private_binaries(&scratch);
    // The once-marker is created by the archiver, as the server user.
    let marker_dir = scratch.join("failpoint");
    std::fs::create_dir(&marker_dir).unwrap();
    std::fs::set_permissions(&marker_dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = Command::new(&pgtwig)
        .args(["branch", "start", "main"])
        .current_dir(&env.repo)
        .env("PGTWIG_HOME", &env.home)
        .env("PGTWIG_FAILPOINT", "archive.before_rename")
        .env("PGTWIG_FAILPOINT_ONCE", marker_dir.join("once"))
        .env_remove("PGTWIG_LOG")
        .output()
        .unwrap();
    assert!(out.status.success(), "start: {out:?}");

    // The servers' copy of the archiver: pgtwig's, which they can run but not change.
    let copy = env.project_dir().join("bin/pgtwig-archive-wal");
    let meta = std::fs::metadata(&copy).unwrap();
    assert_eq!(meta.uid(), nix::unistd::geteuid().as_raw());
    assert_eq!(
        meta.mode() & 0o022,
        0,
        "writable by others: {:o}",
        meta.mode()
    );
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        std::fs::read(pgtwig.with_file_name("pgtwig-archive-wal")).unwrap()
    );

    env.psql(
        "main",
        "create table t as select g from generate_series(1, 50000) g",
    );
    env.psql("main", "select pg_switch_wal()");
    let branch = env.project_dir().join("branches/main");
    let archive = branch.join("wal-archive");
    common::wait_for(30, "the archiver at its failpoint", || {
        std::fs::read_to_string(branch.join("server.log"))
            .is_ok_and(|l| l.contains("failpoint archive.before_rename reached"))
    });
    let (pid, name) = archiver_process(&archive).expect("the archiver's process");
    assert!(archive.join(format!("{name}.tmp")).exists());
    assert!(
        !archive.join(&name).exists(),
        "renamed before the failpoint"
    );
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    // PostgreSQL starts its archiver again (its postmaster does on a wake-up — each connection
    // here is one — at most every 10 s); that attempt, past the once-marker, succeeds.
    common::wait_for(90, "the killed segment archived", || {
        env.psql("main", "select last_archived_wal from pg_stat_archiver") == name
    });
    assert!(!archive.join(format!("{name}.tmp")).exists());
    env.psql(
        "main",
        "insert into t select g from generate_series(1, 50000) g",
    );
    let last = env.psql("main", "select pg_walfile_name(pg_switch_wal())");
    common::wait_for(60, "archiving to catch up", || {
        archive.join(&last).exists()
            && env.psql(
                "main",
                "select count(*) from pg_ls_archive_statusdir() where name like '%.ready'",
            ) == "0"
    });
    assert_eq!(
        env.psql(
            "main",
            "select last_archived_wal >= '{last}' from pg_stat_archiver"
                .replace("{last}", &last)
                .as_str()
        ),
        "t"
    );

    // Every archived segment reads back whole, the one whose archiver was killed included.
    let all = segments(&archive);
    assert!(all.contains(&name), "{all:?}");
    let waldump = pgtwig_local::pgbin::newest().unwrap().bin("pg_waldump");
    let out = Command::new(waldump)
        .arg("--path")
        .arg(&archive)
        .args([all.first().unwrap(), all.last().unwrap()])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pg_waldump: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        dump.lines().rev().take(5).collect::<Vec<_>>().join("\n")
    );
    assert!(dump.contains("SWITCH"), "{}", &dump[..dump.len().min(2000)]);
    env.ok(&["branch", "stop", "main"]);
}

/// pgtwig run as a normal user: the servers run as that user, and the project's copy of the
/// archiver is that user's own (0700). Run as root, the test makes such a user.
#[test]
fn a_normal_users_servers_archive_through_its_own_copy() {
    let root = nix::unistd::geteuid().is_root();
    let account = root.then(|| common::os_user::OsUser::create("pgtwig-test-archive"));
    let (uid, gid) = account.as_ref().map(|a| (a.uid, a.gid)).unwrap_or((
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    ));
    let dir = tempfile::Builder::new()
        .prefix("pgtwig-test-user-")
        .tempdir()
        .unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
    let repo = dir.path().join("shop");
    let as_user = |program: &str, args: &[&str]| {
        let mut c = Command::new(program);
        c.args(args)
            .current_dir(if repo.exists() { &repo } else { dir.path() })
            .env("HOME", dir.path())
            .env("PGTWIG_HOME", dir.path().join("state"))
            .env_remove("PGTWIG_SERVER_USER")
            .env_remove("PGTWIG_FAILPOINT");
        if root {
            c.uid(uid).gid(gid).env_remove("XDG_RUNTIME_DIR");
        }
        let out = c.output().unwrap();
        assert!(out.status.success(), "{program} {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    as_user("git", &["init", "-q", "-b", "main", repo.to_str().unwrap()]);
    as_user(common::BIN, &["init"]);
    // Stop the server whatever happens, so that the user can be removed.
    struct Stop<'a>(&'a dyn Fn());
    impl Drop for Stop<'_> {
        fn drop(&mut self) {
            (self.0)()
        }
    }
    let stop = || {
        let _ = std::panic::catch_unwind(|| as_user(common::BIN, &["branch", "stop", "main"]));
    };
    let _stop = Stop(&stop);
    as_user(common::BIN, &["branch", "start", "main"]);
    let url = as_user(common::BIN, &["branch", "url", "main"]);
    common::psql(url.trim(), "create table t as select 1 as x");
    let file = common::psql(url.trim(), "select pg_walfile_name(pg_switch_wal())");
    let project = dir.path().join("state/shop");
    let archived = project.join("branches/main/wal-archive").join(&file);
    common::wait_for(30, "the segment archived", || archived.exists());
    let copy = std::fs::metadata(project.join("bin/pgtwig-archive-wal")).unwrap();
    assert_eq!(copy.uid(), uid);
    assert_eq!(copy.mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(&archived).unwrap().uid(), uid);
}

fn tables(env: &TestEnv, branch: &str) -> String {
    env.psql(
        branch,
        "select coalesce(string_agg(relname, ',' order by relname), '') from pg_class \
         where relkind = 'r' and relnamespace = 'public'::regnamespace",
    )
}

/// `--at` with an offset, an LSN and a relative time each land where they say, and print the
/// point reached; a zone-less time, the future, a point before the history and a point past
/// the end of the WAL are refused with what to do; a replay that runs out of archive says so.
#[test]
fn at_takes_offsets_lsns_and_relative_times_and_refuses_what_it_cannot_reach() {
    let Some(env) = TestEnv::new(Fs::Reflink) else {
        return;
    };
    env.init();
    start_with_a_base(&env);
    // Distinct times: after the base, between a and b, and well after b.
    std::thread::sleep(Duration::from_millis(1200));
    env.psql("main", "create table a(x int)");
    let after_a = env.psql("main", "select pg_current_wal_lsn()");
    std::thread::sleep(Duration::from_millis(1200));
    let between = std::time::SystemTime::now();
    std::thread::sleep(Duration::from_millis(1200));
    env.psql("main", "create table b(x int)");
    std::thread::sleep(Duration::from_millis(2500));

    // 2026-12-02T01:19:00.123+01:00: the same instant, written in another zone.
    let in_plus_one = humantime::format_rfc3339_millis(between + Duration::from_secs(3600))
        .to_string()
        .replace('Z', "+01:00");
    let out = env.ok(&["branch", "create", "offset", "--at", &in_plus_one]);
    assert!(out.contains("Created branch \"offset\""), "{out}");
    assert!(out.contains("It holds \"main\" as of "), "{out}");
    assert!(out.contains("WAL replayed up to LSN "), "{out}");
    let out = env.ok(&["branch", "create", "by-lsn", "--at", &after_a]);
    assert!(out.contains(&format!("as of LSN {after_a}")), "{out}");
    let out = env.ok(&["branch", "create", "relative", "--at", "2 seconds ago"]);
    assert!(
        out.contains("the last transaction in it committed at"),
        "{out}"
    );
    for (branch, expected) in [("offset", "a"), ("by-lsn", "a"), ("relative", "a,b")] {
        env.ok(&["branch", "start", branch]);
        assert_eq!(tables(&env, branch), expected, "branch {branch}");
    }

    let refused = |at: &str| env.fails(&["branch", "create", "refused", "--at", at]);
    let err = refused("2026-11-28T10:15:00");
    assert!(err.contains("has no time zone"), "{err}");
    assert!(err.contains("2026-11-28T10:15:00Z for UTC"), "{err}");
    let err = refused("2099-01-01T00:00:00+01:00");
    assert!(err.contains("is in the future"), "{err}");
    assert!(err.contains("the latest point available is now"), "{err}");
    let err = refused("now-10m");
    assert!(err.contains("the earliest point available is"), "{err}");
    let err = refused("FF/0");
    assert!(err.contains("after the latest point available"), "{err}");
    assert!(err.contains("(LSN "), "{err}");

    // A stopped parent: started to archive its last WAL (its unfinished segment is not
    // archived otherwise), stopped again.
    env.ok(&["branch", "stop", "main"]);
    env.ok(&["branch", "create", "from-stopped", "--at", "now"]);
    assert!(!env.branch_json("main")["running"].as_bool().unwrap());
    env.ok(&["branch", "start", "from-stopped"]);
    assert_eq!(tables(&env, "from-stopped"), "a,b");
    env.ok(&["branch", "start", "main"]);

    // A segment missing from the archive: the replay runs out before the target.
    env.psql("main", "create table c(x int)");
    let gone = env.psql("main", "select pg_walfile_name(pg_switch_wal())");
    env.psql("main", "create table d(x int)");
    let last = env.psql("main", "select pg_walfile_name(pg_switch_wal())");
    let archive = env.project_dir().join("branches/main/wal-archive");
    common::wait_for(30, "the segments archived", || archive.join(&last).exists());
    std::fs::remove_file(archive.join(&gone)).unwrap();
    let err = refused("now");
    assert!(err.contains("ends before that point"), "{err}");
    assert!(
        err.contains("the latest point available from this history"),
        "{err}"
    );
    assert!(!err.contains("FATAL"), "{err}");

    let mut names: Vec<String> = env
        .list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    assert_eq!(
        names,
        vec!["by-lsn", "from-stopped", "main", "offset", "relative"]
    );
    assert!(
        env.tmp_entries().iter().all(|e| !e.starts_with("build-")),
        "{:?}",
        env.tmp_entries()
    );
}

/// Neon takes the same `--at` inputs: the instant is sent in UTC whatever zone it was written
/// in, and a zone-less or future time is refused before anything is asked of Neon.
#[test]
fn at_on_neon_sends_the_instant_in_utc_and_refuses_the_same_inputs() {
    let env = TestEnv::new(Fs::Plain).expect("a plain file system is always there");
    let cloud = pgtwig_neon_standin::StandIn::api_only();
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!(
            "project = \"shop\"\nbackend = \"neon\"\nroot_branch = \"main\"\n\
             [neon]\nproject_id = \"{}\"\napi_url = \"{}\"\n",
            cloud.project_id(),
            cloud.api_base(),
        ),
    )
    .unwrap();
    let run = |args: &[&str]| {
        env.cmd(args)
            .env("NEON_API_KEY", cloud.api_key())
            .output()
            .unwrap()
    };
    assert!(run(&["trust"]).status.success());

    let an_hour_ago = std::time::SystemTime::now() - Duration::from_secs(3600);
    let an_hour_ago = std::time::UNIX_EPOCH
        + Duration::from_secs(
            an_hour_ago
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        );
    let in_plus_two = humantime::format_rfc3339_seconds(an_hour_ago + Duration::from_secs(7200))
        .to_string()
        .replace('Z', "+02:00");
    let out = run(&["branch", "create", "feat", "--at", &in_plus_two]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("as of "), "{stdout}");
    let sent = cloud.branch_json("feat").unwrap()["parent_timestamp"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        humantime::parse_rfc3339(&sent).unwrap(),
        an_hour_ago,
        "{sent}"
    );
    let out = run(&["branch", "create", "rel", "--at", "now-5m"]);
    assert!(out.status.success(), "{out:?}");

    for (at, says) in [
        ("2026-11-28T10:15:00", "has no time zone"),
        ("2099-01-01T00:00:00Z", "is in the future"),
    ] {
        let out = run(&["branch", "create", "refused", "--at", at]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{at}: {err}");
    }
    assert!(cloud.branch_json("refused").is_none());
}
