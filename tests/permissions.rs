//! End to end: a project's state is private, and the server user cannot
//! make pgtwig (root) write or read files elsewhere. Real servers, real
//! accounts: `postgres` (the server user when pgtwig runs as root),
//! `nobody` (another user), and a user made here for a run without root.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{Fs, TestEnv, BIN};

/// These tests need root (to act as other users). Without it they say why,
/// and fail under CI.
fn running_as_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    eprintln!("SKIPPED: the permission tests act as other users and need root");
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI must run the permission tests as root"
    );
    false
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

fn user(name: &str) -> nix::unistd::User {
    nix::unistd::User::from_name(name)
        .unwrap()
        .unwrap_or_else(|| panic!("no user `{name}` on this machine"))
}

/// Run `program args` as `who` (uid and primary group, no other groups).
fn run_as(who: &nix::unistd::User, program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .uid(who.uid.as_raw())
        .gid(who.gid.as_raw())
        .current_dir("/")
        .output()
        .unwrap()
}

fn assert_refused(out: &Output, what: &str) {
    assert!(
        !out.status.success(),
        "{what} should have been refused: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("Permission denied"), "{what}: {err}");
}

/// The folders and files of a fresh root-run project with `main` started.
fn folders(env: &TestEnv) -> Vec<PathBuf> {
    let p = env.project_dir();
    vec![
        p.clone(),
        p.join("branches"),
        p.join("tmp"),
        p.join("branches/main"),
    ]
}

fn files(env: &TestEnv) -> Vec<PathBuf> {
    let p = env.project_dir();
    vec![
        p.join("lock"),
        p.join("state.json"),
        p.join("branches/main/branch.json"),
        p.join("branches/main/server.log"),
    ]
}

#[test]
fn project_state_is_private_from_other_users() {
    if !running_as_root() {
        return;
    }
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    // The daemon's files too (pid, lock, log of a detached daemon).
    let port = common::free_port();
    env.ok(&["up", "--detach", "--port", &port.to_string()]);
    let p = env.project_dir();
    let daemon_files = [
        p.join("daemon.pid"),
        p.join("daemon.lock"),
        p.join("daemon.log"),
    ];
    for f in &daemon_files {
        assert_eq!(mode(f), 0o600, "{}", f.display());
    }
    // Its control socket is not in the server user's runtime folder, where
    // that user could talk to it or replace it.
    let servers_runtime = PathBuf::from(format!("/tmp/pgtwig-{}", user("postgres").uid));
    let hash = pgtwig_core::names::short_hash(&p.to_string_lossy());
    let in_servers_folder = servers_runtime.join(format!("daemon-{hash}.sock"));
    assert!(
        !in_servers_folder.exists(),
        "{} is the server user's",
        in_servers_folder.display()
    );
    assert!(env.ok(&["status"]).contains("main"));
    env.ok(&["down", "--keep-running"]);

    // Root's, the server user's group, 0710: the server passes through, nobody else.
    let postgres = user("postgres");
    for dir in folders(&env) {
        let meta = std::fs::symlink_metadata(&dir).unwrap();
        assert_eq!(mode(&dir), 0o710, "{}", dir.display());
        assert_eq!(meta.uid(), 0, "{} is root's", dir.display());
        assert_eq!(meta.gid(), postgres.gid.as_raw(), "{}", dir.display());
    }
    for f in &files(&env) {
        assert_eq!(mode(f), 0o600, "{}", f.display());
        assert_eq!(std::fs::metadata(f).unwrap().uid(), 0, "{}", f.display());
    }
    // The folders the server writes are its own, and only its own.
    for dir in [
        p.join("branches/main/data"),
        p.join("branches/main/wal-archive"),
    ] {
        let meta = std::fs::metadata(&dir).unwrap();
        assert_eq!(meta.uid(), postgres.uid.as_raw(), "{}", dir.display());
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }

    // Another user can neither list the project folder nor read its files.
    let nobody = user("nobody");
    assert_refused(
        &run_as(&nobody, "ls", &[p.to_str().unwrap()]),
        "listing the project folder as nobody",
    );
    for f in files(&env) {
        assert_refused(
            &run_as(&nobody, "cat", &[f.to_str().unwrap()]),
            &format!("reading {} as nobody", f.display()),
        );
    }
    // The server user passes through but cannot list or read either.
    assert_refused(
        &run_as(
            &postgres,
            "ls",
            &[p.join("branches/main").to_str().unwrap()],
        ),
        "listing a branch folder as postgres",
    );
    assert_refused(
        &run_as(
            &postgres,
            "cat",
            &[p.join("branches/main/server.log").to_str().unwrap()],
        ),
        "reading server.log as postgres",
    );
}

#[test]
fn the_server_user_cannot_redirect_the_server_log() {
    if !running_as_root() {
        return;
    }
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    let branch = env.project_dir().join("branches/main");
    let log = branch.join("server.log");
    let outside = env.home.parent().unwrap();
    // Root would create this one (create+append) or append to that one.
    let to_create = outside.join("created-by-root");
    let to_append = outside.join("appended-by-root");
    std::fs::write(&to_append, "untouched\n").unwrap();
    let before: Vec<String> = std::fs::read_dir(&branch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();

    let postgres = user("postgres");
    let log_s = log.to_str().unwrap();
    for target in [&to_create, &to_append] {
        assert_refused(
            &run_as(&postgres, "ln", &["-sfn", target.to_str().unwrap(), log_s]),
            "replacing server.log with a link as postgres",
        );
    }
    assert_refused(
        &run_as(
            &postgres,
            "mv",
            &[log_s, branch.join("moved").to_str().unwrap()],
        ),
        "moving server.log away as postgres",
    );
    assert_refused(
        &run_as(
            &postgres,
            "touch",
            &[branch.join("new-entry").to_str().unwrap()],
        ),
        "creating an entry in the branch folder as postgres",
    );
    assert_refused(
        &run_as(&postgres, "rm", &["-f", log_s]),
        "removing server.log as postgres",
    );

    env.ok(&["branch", "stop", "main"]);
    env.ok(&["branch", "start", "main"]);
    assert!(
        std::fs::symlink_metadata(&log)
            .unwrap()
            .file_type()
            .is_file(),
        "server.log is still a plain file"
    );
    assert!(
        !to_create.exists(),
        "nothing was created outside the state folder"
    );
    assert_eq!(std::fs::read_to_string(&to_append).unwrap(), "untouched\n");
    let after: Vec<String> = std::fs::read_dir(&branch)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(before.len(), after.len(), "{before:?} → {after:?}");
    assert_eq!(env.psql("main", "select 1"), "1");
}

#[test]
fn a_planted_log_link_is_refused_not_followed() {
    if !running_as_root() {
        return;
    }
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let log = env.project_dir().join("branches/main/server.log");
    let victim = env.home.parent().unwrap().join("victim");
    std::fs::write(&victim, "untouched\n").unwrap();
    // As if an attacker had planted it before the folder was root's.
    std::fs::remove_file(&log).unwrap();
    std::os::unix::fs::symlink(&victim, &log).unwrap();

    let err = env.fails(&["branch", "start", "main"]);
    assert!(
        err.contains(&format!("{} is a symbolic link; remove it", log.display())),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
    assert!(std::fs::symlink_metadata(&log)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(env.branch_json("main")["running"], false);

    // Once the link is gone the branch starts, with a fresh private log.
    std::fs::remove_file(&log).unwrap();
    env.ok(&["branch", "start", "main"]);
    assert_eq!(mode(&log), 0o600);
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched\n");
}

#[test]
fn a_project_made_before_is_tightened_when_opened() {
    if !running_as_root() {
        return;
    }
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    env.ok(&["branch", "stop", "main"]);
    // What an older pgtwig left: open folders, a branch folder the server
    // user owns, readable files.
    let postgres = user("postgres");
    let p = env.project_dir();
    let chmod = |path: PathBuf, m: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(m)).unwrap();
    };
    for dir in folders(&env) {
        chmod(dir, 0o755);
    }
    std::os::unix::fs::chown(
        p.join("branches/main"),
        Some(postgres.uid.as_raw()),
        Some(postgres.gid.as_raw()),
    )
    .unwrap();
    for f in files(&env) {
        chmod(f, 0o644);
    }

    env.ok(&["branch", "list"]);
    for dir in folders(&env) {
        assert_eq!(mode(&dir), 0o710, "{}", dir.display());
        assert_eq!(
            std::fs::metadata(&dir).unwrap().uid(),
            0,
            "{}",
            dir.display()
        );
    }
    for f in files(&env) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }
    env.ok(&["branch", "start", "main"]);
    assert_eq!(env.psql("main", "select 1"), "1");
}

#[test]
fn a_link_in_a_data_directory_does_not_make_root_copy_its_target() {
    if !running_as_root() {
        return;
    }
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let secret = env.home.parent().unwrap().join("root-only");
    std::fs::write(&secret, "root's secret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    // As the server user, a link named like a WAL segment a clone copies.
    let planted = env
        .project_dir()
        .join("branches/main/data/pg_wal/0000000100000000000000FF");
    let out = run_as(
        &user("postgres"),
        "ln",
        &["-s", secret.to_str().unwrap(), planted.to_str().unwrap()],
    );
    assert!(out.status.success(), "planting as postgres: {out:?}");

    let err = env.fails(&["branch", "create", "dev"]);
    assert!(
        err.contains("0000000100000000000000FF is a symbolic link"),
        "{err}"
    );
    assert!(env.list_json().iter().all(|b| b["name"] != "dev"));
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    std::fs::remove_file(&planted).unwrap();
    env.ok(&["branch", "create", "dev"]);
}

#[test]
fn a_forged_postmaster_pid_does_not_make_root_signal_another_process() {
    if !running_as_root() {
        return;
    }
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    // A process that is not the branch's server: root's own.
    let mut bystander = Command::new("sleep").arg("120").spawn().unwrap();
    let pid = bystander.id();
    let data = env.project_dir().join("branches/main/data");
    let pid_file = data.join("postmaster.pid");
    // Written as the server user, whose file it is.
    let text = format!("{pid}\n{}\n0\n5432\n/tmp\n\n0 0\nready\n", data.display());
    let out = Command::new("sh")
        .args(["-c", "cat > \"$0\"", pid_file.to_str().unwrap()])
        .uid(user("postgres").uid.as_raw())
        .gid(user("postgres").gid.as_raw())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(text.as_bytes())?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(
        out.status.success(),
        "writing postmaster.pid as postgres: {out:?}"
    );

    let err = env.fails(&["branch", "stop", "main"]);
    assert!(
        err.contains(&format!(
            "names pid {pid}, which is not the server of this data directory"
        )),
        "{err}"
    );
    assert!(
        bystander.try_wait().unwrap().is_none(),
        "the other process was not signalled"
    );
    let _ = bystander.kill();
    let _ = bystander.wait();
    std::fs::remove_file(&pid_file).unwrap();
    env.ok(&["branch", "start", "main"]);
}

/// A user made for one test, removed (with its servers stopped) after.
struct TempUser {
    name: String,
    user: nix::unistd::User,
    dir: tempfile::TempDir,
    _account: common::os_user::OsUser,
}

impl TempUser {
    fn new(name: &str) -> TempUser {
        let account = common::os_user::OsUser::create(name);
        let dir = tempfile::Builder::new()
            .prefix("pgtwig-test-user-")
            .tempdir()
            .unwrap();
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        let user = user(name);
        std::os::unix::fs::chown(dir.path(), Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .unwrap();
        TempUser {
            name: name.to_string(),
            user,
            dir,
            _account: account,
        }
    }

    /// `pgtwig args` in `repo` as this user, with its own home and state folder.
    fn pgtwig(&self, repo: &Path, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .current_dir(repo)
            .uid(self.user.uid.as_raw())
            .gid(self.user.gid.as_raw())
            .env("HOME", self.dir.path())
            .env("USER", &self.name)
            .env("PGTWIG_HOME", self.dir.path().join("state"))
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("PGTWIG_SERVER_USER")
            .env_remove("PGTWIG_FAILPOINT")
            .output()
            .unwrap()
    }

    fn ok(&self, repo: &Path, args: &[&str]) {
        let out = self.pgtwig(repo, args);
        assert!(
            out.status.success(),
            "pgtwig {args:?} as {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let data = self.dir.path().join("state/shop/branches/main/data");
        if let Ok(text) = std::fs::read_to_string(data.join("postmaster.pid")) {
            if let Some(pid) = text.lines().next().and_then(|l| l.trim().parse().ok()) {
                let pid = nix::unistd::Pid::from_raw(pid);
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGQUIT);
                common::wait_for(10, "the server to exit", || {
                    nix::sys::signal::kill(pid, None).is_err()
                });
            }
        }
        let _ = std::fs::remove_dir_all(format!("/tmp/pgtwig-{}", self.user.uid));
        // The account itself goes with `_account`.
    }
}

#[test]
fn a_project_of_a_normal_user_is_private() {
    if !running_as_root() {
        return;
    }
    let who = TempUser::new(&format!("pgtwig-perm-{}", std::process::id() % 100_000));
    let repo = who.dir.path().join("shop");
    std::fs::create_dir(&repo).unwrap();
    std::os::unix::fs::chown(
        &repo,
        Some(who.user.uid.as_raw()),
        Some(who.user.gid.as_raw()),
    )
    .unwrap();
    let out = Command::new("git")
        .args(["init", "-q", "-b", "main"])
        .current_dir(&repo)
        .uid(who.user.uid.as_raw())
        .gid(who.user.gid.as_raw())
        .env("HOME", who.dir.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "git init: {out:?}");
    who.ok(&repo, &["init"]);
    who.ok(&repo, &["branch", "start", "main"]);
    who.ok(&repo, &["branch", "stop", "main"]);

    let p = who.dir.path().join("state/shop");
    for dir in [
        p.clone(),
        p.join("branches"),
        p.join("tmp"),
        p.join("branches/main"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
        assert_eq!(
            std::fs::metadata(&dir).unwrap().uid(),
            who.user.uid.as_raw(),
            "{}",
            dir.display()
        );
    }
    for f in [
        "lock",
        "state.json",
        "branches/main/branch.json",
        "branches/main/server.log",
    ] {
        assert_eq!(mode(&p.join(f)), 0o600, "{f}");
    }
    let nobody = user("nobody");
    assert_refused(
        &run_as(&nobody, "ls", &[p.to_str().unwrap()]),
        "listing another user's project folder",
    );
}
