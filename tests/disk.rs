//! A full disk harms no branch: on a small loop-mounted XFS (reflink=1) made
//! by the test, a build that would leave less than the free-space margin is
//! refused with a clear error while the parent keeps serving; a parent that
//! its own writes brought down starts again once pgtwig prunes its history;
//! `gc --history` frees what the history holds; `branch list` tells a fresh
//! clone's own bytes from its parent's.
//!
//! Needs root (mount). Under CI=true a failing mount fails the test;
//! elsewhere it prints why and skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::TestEnv;

const MIB: u64 = 1 << 20;
/// The margin these tests configure: the default (at least 1 GiB) is more than the file system.
const MARGIN: u64 = 64 * MIB;

/// A loop-mounted XFS under a temp folder; unmounted (and its image removed) when dropped.
struct LoopXfs {
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl LoopXfs {
    fn new(size_mib: u64) -> Option<LoopXfs> {
        let dir = tempfile::Builder::new()
            .prefix("pgtwig-disk-")
            .tempdir()
            .unwrap();
        // The servers run as another user: they must pass through.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let image = dir.path().join("xfs.img");
        let mount = dir.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        std::fs::File::create(&image)
            .unwrap()
            .set_len(size_mib * MIB)
            .unwrap();
        let steps: [(&str, Vec<&str>); 2] = [
            (
                "mkfs.xfs",
                vec!["-q", "-m", "reflink=1", image.to_str().unwrap()],
            ),
            (
                "mount",
                vec![
                    "-o",
                    "loop",
                    image.to_str().unwrap(),
                    mount.to_str().unwrap(),
                ],
            ),
        ];
        for (tool, args) in steps {
            let out = Command::new(tool).args(&args).output();
            let why = match out {
                Ok(o) if o.status.success() => continue,
                Ok(o) => format!(
                    "{tool} {}: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                Err(e) => format!("{tool}: {e}"),
            };
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI must run the disk-full tests (as root, with mkfs.xfs): {why}"
            );
            eprintln!("SKIPPED: cannot make a loop-mounted XFS ({why}); run as root with xfsprogs");
            return None;
        }
        std::fs::set_permissions(&mount, std::fs::Permissions::from_mode(0o755)).unwrap();
        Some(LoopXfs { _dir: dir, mount })
    }

    fn available(&self) -> u64 {
        let s = nix::sys::statvfs::statvfs(&self.mount).unwrap();
        s.blocks_available() as u64 * s.fragment_size() as u64
    }

    /// Fill the file system until `leave` bytes are free (one fallocate-d file).
    fn fill_leaving(&self, leave: u64) -> PathBuf {
        let filler = self.mount.join("filler");
        let mut len = self.available().saturating_sub(leave);
        // XFS needs some blocks for the file's own metadata: shrink until it fits.
        loop {
            let out = Command::new("fallocate")
                .args(["-l", &len.to_string()])
                .arg(&filler)
                .output()
                .unwrap();
            if out.status.success() {
                return filler;
            }
            assert!(len > MIB, "fallocate failed: {out:?}");
            len -= MIB;
        }
    }
}

impl LoopXfs {
    /// Fill the file system to the last block it gives out: fallocate what it says is free,
    /// then write until a write fails (XFS first gives back the blocks it preallocated
    /// beyond the end of growing files, which statvfs counts as used).
    fn fill_up(&self) -> Vec<PathBuf> {
        use std::io::Write;
        let mut files = vec![self.fill_leaving(MIB)];
        let last = self.mount.join("filler-written");
        let mut f = std::fs::File::create(&last).unwrap();
        let chunk = vec![0xA5u8; 64 * 1024];
        let mut small = false;
        loop {
            let piece = if small { &chunk[..4096] } else { &chunk[..] };
            match f.write_all(piece).and_then(|()| f.sync_data()) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) && !small => small = true,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
                Err(e) => panic!("filling {}: {e}", last.display()),
            }
        }
        files.push(last);
        assert!(self.available() < MIB, "{} still free", self.available());
        files
    }
}

impl Drop for LoopXfs {
    fn drop(&mut self) {
        // A background `pgtwig branch snapshot` may still be closing files.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = Command::new("umount")
                .arg(&self.mount)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if Instant::now() > deadline {
                let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A project on `xfs` whose .pgtwig.toml (written before `init`, which adopts it) keeps
/// `margin` free and history as `retention` says.
fn project_on(xfs: &LoopXfs, retention: &str, margin: u64) -> TestEnv {
    let mut env = TestEnv::new_in(&xfs.mount);
    env.free_space_margin = None;
    std::fs::write(
        env.repo.join(".pgtwig.toml"),
        format!(
            "project = \"shop\"\nfree_space_margin = \"{}MiB\"\nhistory_retention = \"{retention}\"\n",
            margin / MIB
        ),
    )
    .unwrap();
    env.init();
    env
}

fn own_bytes(env: &TestEnv, branch: &str) -> (u64, u64, u64) {
    let b = env.branch_json(branch);
    assert_eq!(b["own_bytes_method"], "fiemap", "{b}");
    (
        b["own_bytes"].as_u64().unwrap(),
        b["shared_bytes"].as_u64().unwrap(),
        b["history_bytes"].as_u64().unwrap(),
    )
}

fn has_base(branch_dir: &Path) -> bool {
    std::fs::read_dir(branch_dir.join("bases"))
        .map(|d| {
            d.flatten().any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .bytes()
                    .all(|b| b.is_ascii_digit())
            })
        })
        .unwrap_or(false)
}

#[test]
fn a_build_that_would_fill_the_disk_is_refused_and_the_parent_keeps_serving() {
    let Some(xfs) = LoopXfs::new(448) else {
        return;
    };
    let env = project_on(&xfs, "24h", MARGIN);
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table orders as select g as id, repeat('x', 200) as note from generate_series(1, 20000) g",
    );
    let mut toml = std::fs::OpenOptions::new()
        .append(true)
        .open(env.repo.join(".pgtwig.toml"))
        .unwrap();
    std::io::Write::write_all(
        &mut toml,
        b"[anonymize.columns]\n\"public.orders.note\" = \"hash\"\n",
    )
    .unwrap();
    env.ok(&["branch", "create", "dev", "--from", "main"]);
    let main_dir = env.project_dir().join("branches/main");
    common::wait_for(60, "a history base of main (for --at)", || {
        has_base(&main_dir)
    });
    let daemon = common::up(&env);
    let through_proxy = format!(
        "postgres://postgres@127.0.0.1:{}/postgres?sslmode=disable",
        daemon.port
    );
    assert_eq!(
        common::psql(&through_proxy, "select count(*) from orders"),
        "20000"
    );

    // Less than the margin left: refused, saying what is free, what it needs and what to do.
    let before_fill = xfs.available();
    let filler = xfs.fill_leaving(MARGIN / 2);
    let out = env.run(&["branch", "create", "x", "--from", "main"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    for part in [
        "not enough free disk space to build branch \"x\"",
        " free on the file system of ",
        "may write up to ",
        "copy-on-write clone of \"main\"",
        "at least 64.0 MiB free (free_space_margin in .pgtwig.toml",
        "Nothing was changed",
        "`pgtwig gc --history`",
        "`pgtwig branch delete NAME`",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(
        !env.project_dir().join("branches/x").exists(),
        "no branch appeared"
    );
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());

    // The parent serves (and writes) as before, through the proxy and directly.
    common::psql(
        &through_proxy,
        "insert into orders select g, 'after' from generate_series(20001, 20100) g",
    );
    assert_eq!(env.psql("main", "select count(*) from orders"), "20100");
    assert_eq!(
        common::psql(
            &through_proxy,
            "select count(*) from orders where note = 'after'"
        ),
        "100"
    );
    // Every other build is refused the same way, before it writes anything.
    let now = humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string();
    let main_url = env.url("main");
    for (args, building) in [
        (vec!["pr", "open", "7", "--from", "main"], "branch \"pr-7\""),
        (vec!["branch", "reset", "dev"], "branch \"dev\""),
        (
            vec!["anonymize", "--from", "main", "--into", "anon"],
            "branch \"anon\"",
        ),
        (
            vec!["import", "--from", &main_url, "--into", "imported"],
            "the import into \"imported\"",
        ),
        (
            vec!["branch", "create", "old", "--from", "main", "--at", &now],
            "branch \"old\"",
        ),
    ] {
        let err = env.fails(&args);
        assert!(
            err.contains(&format!("not enough free disk space to build {building}")),
            "{args:?}: {err}"
        );
    }
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());

    // Nothing to delete by hand: remove the filler and the same command works.
    std::fs::remove_file(&filler).unwrap();
    common::wait_for(30, "XFS to release the filler's blocks", || {
        xfs.available() + 32 * MIB > before_fill
    });
    let out = env.ok(&["branch", "create", "x", "--from", "main"]);
    assert!(out.contains("Created branch \"x\""), "{out}");
    env.ok(&["branch", "start", "x"]);
    assert_eq!(env.psql("x", "select count(*) from orders"), "20100");
    drop(daemon);
}

#[test]
fn a_branch_that_cannot_start_on_a_full_disk_starts_once_its_history_is_pruned() {
    let Some(xfs) = LoopXfs::new(400) else {
        return;
    };
    let env = project_on(&xfs, "24h", MARGIN);
    env.ok(&["branch", "start", "main"]); // takes a history base in the background
    let main_dir = env.project_dir().join("branches/main");
    common::wait_for(60, "a history base of main", || has_base(&main_dir));
    env.psql(
        "main",
        "create table t as select g as id, repeat('y', 400) as pad from generate_series(1, 40000) g",
    );
    env.psql("main", "checkpoint");
    // A base that shares t's blocks with main (the one taken at start predates t).
    std::fs::remove_dir_all(main_dir.join("bases")).unwrap();
    env.ok(&["branch", "snapshot", "main"]);
    assert!(has_base(&main_dir));
    // Committed, not yet checkpointed: the next start replays it into t's pages, and
    // writing a page the base still shares needs a new block.
    env.psql("main", "update t set pad = repeat('u', 400)");
    let pid: i32 = std::fs::read_to_string(main_dir.join("data/postmaster.pid"))
        .unwrap()
        .lines()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    // The server dies as in a crash (immediate shutdown: no checkpoint).
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGQUIT,
    )
    .unwrap();
    common::wait_for(30, "main's server to be gone", || {
        env.branch_json("main")["running"] == false
    });
    // History older than the base goes now (history_retention = "24h" keeps the base).
    env.ok(&["gc", "--history"]);

    // Something else fills the disk: crash recovery cannot write, the start fails.
    let fillers = xfs.fill_up();
    let out = env.run(&["branch", "start", "main"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "main started on a full disk: {out:?}"
    );
    for part in [
        "branch \"main\" could not be started",
        " free (pgtwig keeps 64.0 MiB)",
        "`pgtwig gc --history --older-than 0`",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(
        has_base(&main_dir),
        "history younger than history_retention stays"
    );

    // With history_retention = "0" the failed start prunes all of it and tries again:
    // main comes back with what it had committed, and nobody deleted anything by hand.
    let toml = env.repo.join(".pgtwig.toml");
    let text = std::fs::read_to_string(&toml)
        .unwrap()
        .replace("history_retention = \"24h\"", "history_retention = \"0\"");
    std::fs::write(&toml, text).unwrap();
    let out = env.run(&["branch", "start", "main"]);
    assert!(
        out.status.success(),
        "main did not start after pruning: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!has_base(&main_dir), "the history was pruned");
    assert_eq!(
        env.psql("main", "select count(*) from t where pad like 'u%'"),
        "40000"
    );
    drop(fillers);
}

#[test]
fn own_bytes_tell_a_clone_from_its_parent_and_gc_history_frees_space() {
    let Some(xfs) = LoopXfs::new(400) else {
        return;
    };
    // A smaller margin: this test writes more, and fills nothing.
    let env = project_on(&xfs, "24h", 16 * MIB);
    // The environment variable overrides the configuration (and is named in the refusal).
    let out = env
        .cmd(&["branch", "create", "nope", "--from", "main"])
        .env("PGTWIG_FREE_SPACE_MARGIN", "100GiB")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("at least 100.0 GiB free (PGTWIG_FREE_SPACE_MARGIN"),
        "{err}"
    );

    env.ok(&["branch", "start", "main"]);
    let main_dir = env.project_dir().join("branches/main");
    common::wait_for(60, "a history base of main", || has_base(&main_dir));
    env.psql(
        "main",
        "create table big as select g as id, repeat('b', 400) as pad from generate_series(1, 20000) g; checkpoint",
    );
    // A base that holds `big` (the one taken at start predates it).
    std::fs::remove_dir_all(main_dir.join("bases")).unwrap();
    env.ok(&["branch", "snapshot", "main"]);
    assert!(has_base(&main_dir));

    // History: main's base keeps the blocks main rewrites.
    env.psql("main", "vacuum full big");
    env.psql("main", "checkpoint");
    let (_, _, history) = own_bytes(&env, "main");
    assert!(history > 6 * MIB, "{history}");
    let listing = env.ok(&["branch", "list"]);
    assert!(
        listing.contains("OWN") && listing.contains("HISTORY") && listing.contains(" free of "),
        "{listing}"
    );

    // A dry run removes nothing.
    let out = env.ok(&["gc", "--history", "--older-than", "0", "--dry-run"]);
    assert!(
        out.contains("Would remove all point-in-time history"),
        "{out}"
    );
    assert!(has_base(&main_dir));
    // The default (history_retention = 24h) keeps this fresh history.
    let out = env.ok(&["gc", "--history"]);
    assert!(has_base(&main_dir), "{out}");

    let before = xfs.available();
    let out = env.ok(&["gc", "--history", "--older-than", "0"]);
    assert!(out.contains("Removed all point-in-time history"), "{out}");
    assert!(out.contains("main: 1 base snapshot"), "{out}");
    assert!(!has_base(&main_dir));
    let (_, _, history_after) = own_bytes(&env, "main");
    assert!(history_after < MIB, "{history_after}");
    common::wait_for(30, "XFS to release the history's blocks", || {
        xfs.available() > before + history * 8 / 10
    });
    assert_eq!(env.psql("main", "select count(*) from big"), "20000");

    // A fresh clone owns next to nothing; it shares the parent's blocks.
    let (main_own, main_shared, _) = own_bytes(&env, "main");
    assert!(
        main_own + main_shared > 10 * MIB,
        "{main_own} {main_shared}"
    );
    env.ok(&["branch", "create", "x", "--from", "main"]);
    let (x_own, x_shared, _) = own_bytes(&env, "x");
    assert!(
        x_own * 10 < main_own + main_shared,
        "a fresh clone owns {x_own} of its parent's {}",
        main_own + main_shared
    );
    assert!(x_shared > 8 * MIB, "{x_shared}");

    // Writes make it its own.
    env.ok(&["branch", "start", "x"]);
    env.psql("x", "update big set pad = repeat('c', 400)");
    env.psql("x", "checkpoint");
    // The kernel may still be writing the new blocks back (each one unshares an extent).
    let mut x_own_after = 0;
    let grew = (0..300).any(|_| {
        x_own_after = own_bytes(&env, "x").0;
        x_own_after > x_own + 6 * MIB || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            false
        }
    });
    assert!(
        grew,
        "30 s after rewriting 8 MiB the clone owns {x_own_after} (was {x_own})"
    );
    assert_eq!(
        env.psql("main", "select count(*) from big where pad like 'b%'"),
        "20000"
    );
    assert_eq!(
        env.psql("x", "select count(*) from big where pad like 'c%'"),
        "20000"
    );
}

/// The estimate is not a promise: a build whose server is running when free space falls
/// below half the margin is stopped at once and thrown away, and the parent keeps serving.
#[test]
fn a_build_running_when_the_disk_fills_is_stopped_and_thrown_away() {
    let Some(xfs) = LoopXfs::new(384) else {
        return;
    };
    let env = project_on(&xfs, "0", MARGIN);
    // One row whose masking takes 8 s: the build's server runs that long, out of sight.
    let mut toml = std::fs::OpenOptions::new()
        .append(true)
        .open(env.repo.join(".pgtwig.toml"))
        .unwrap();
    std::io::Write::write_all(
        &mut toml,
        b"[anonymize.columns]\n\"public.people.email\" = { sql = \"email || (select '' from pg_sleep(8))\" }\n",
    )
    .unwrap();
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table people(email text); insert into people values ('a@example.com')",
    );
    let child = env
        .cmd(&["anonymize", "--from", "main", "--into", "anon"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let tmp = env.project_dir().join("tmp");
    common::wait_for(60, "the anonymize build's server", || {
        std::fs::read_dir(&tmp)
            .map(|d| {
                d.flatten().any(|e| {
                    e.file_name().to_string_lossy().starts_with("build-anon-")
                        && e.path().join("data/postmaster.pid").exists()
                })
            })
            .unwrap_or(false)
    });
    let filler = xfs.fill_leaving(MARGIN / 4);
    let started = Instant::now();
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    for part in [
        "stopped building branch \"anon\"",
        "below half of the 64.0 MiB pgtwig keeps free",
        "nothing was changed",
    ] {
        assert!(err.contains(part), "{part:?} missing from: {err}");
    }
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "stopped at once, not after the masking: {:?}",
        started.elapsed()
    );
    assert!(!env.project_dir().join("branches/anon").exists());
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    assert_eq!(env.psql("main", "select count(*) from people"), "1");
    env.psql("main", "insert into people values ('b@example.com')");
    drop(filler);
}
