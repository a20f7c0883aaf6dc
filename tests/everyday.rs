//! End to end, everyday use (issue 16): `env` and `run` against real branches, the daemon
//! log's lines, "did you mean", the branch tree and `status`'s git facts.

mod common;

use common::{git, Fs, TestEnv};

/// A table whose one row says which branch this is.
fn mark(env: &TestEnv, branch: &str) {
    env.psql(
        branch,
        &format!("create table if not exists marker(v text); delete from marker; insert into marker values ('{branch}')"),
    );
}

#[test]
fn env_and_run_reach_this_worktrees_branch() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    mark(&env, "main");
    env.ok(&["branch", "create", "dev"]);
    env.ok(&["branch", "start", "dev"]);
    mark(&env, "dev");
    env.ok(&["use", "dev"]);
    env.ok(&["branch", "stop", "dev"]);

    // No proxy: `run` starts the work tree's branch and connects straight to it.
    let out = env.run(&[
        "run",
        "--",
        "sh",
        "-c",
        "psql \"$DATABASE_URL\" -XAtc 'select v from marker'",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "dev");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("the proxy is not running"),
        "{out:?}"
    );
    // libpq's variables too: plain `psql` works.
    let out = env.ok(&["run", "--", "psql", "-XAtc", "select v from marker"]);
    assert_eq!(out.trim(), "dev");
    // The command's exit code is pgtwig's.
    env.ok_code(&["run", "--", "sh", "-c", "exit 7"], 7);
    // Killed by a signal: 128 + its number, as a shell says.
    env.ok_code(&["run", "--", "sh", "-c", "kill -TERM $$"], 143);
    // `env` without a proxy: the URL still (for .env files), and what to run.
    let out = env.run(&["env"]);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("pgtwig up --detach"),
        "{out:?}"
    );

    // With the proxy: `env`'s URL goes through it, to this work tree's branch.
    let daemon = common::up(&env);
    let out = env.run(&["env"]);
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let url = stdout
        .trim()
        .strip_prefix("DATABASE_URL=")
        .unwrap_or_else(|| panic!("env printed {stdout:?}"));
    assert!(url.contains(&format!(":{}/", daemon.port)), "{url}");
    assert_eq!(common::psql(url, "select v from marker"), "dev");
    let export = env.ok(&["env", "--export"]);
    assert_eq!(export.trim(), format!("export DATABASE_URL='{url}'"));
    // `run` through the proxy: the same URL, and a switch moves it.
    let out = env.ok(&["run", "--", "sh", "-c", "echo \"$DATABASE_URL\""]);
    assert_eq!(out.trim(), url);
    env.ok(&["use", "main"]);
    let out = env.ok(&["run", "--", "psql", "-XAtc", "select v from marker"]);
    assert_eq!(out.trim(), "main");
    drop(daemon);
}

#[test]
fn init_connect_hint_works_as_printed() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    let out = env.init();
    let hint = out
        .lines()
        .find(|l| l.starts_with("Connect:"))
        .unwrap_or_else(|| panic!("no connect hint in {out}"));
    assert!(hint.contains("`pgtwig run -- psql`"), "{hint}");
    // The root branch is stopped after init; the hint's command still works.
    assert_eq!(env.branch_json("main")["running"], false);
    let out = env.ok(&["run", "--", "psql", "-XAtc", "select 40 + 2"]);
    assert_eq!(out.trim(), "42");
}

#[test]
fn daemon_log_lines_are_timestamped_without_colour_and_a_second_up_names_the_first() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let port = common::free_port();
    env.ok(&["up", "--detach", "--port", &port.to_string()]);
    let log_path = env.project_dir().join("daemon.log");
    let log = std::fs::read_to_string(&log_path).unwrap();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "the daemon logged nothing");
    for line in &lines {
        assert!(
            !line.contains('\u{1b}'),
            "ANSI code in daemon.log: {line:?}"
        );
        let stamp = line.split_whitespace().next().unwrap();
        humantime::parse_rfc3339(stamp)
            .unwrap_or_else(|e| panic!("{stamp:?} of {line:?} is not RFC 3339: {e}"));
    }
    let second = env.fails(&["up", "--detach", "--port", &common::free_port().to_string()]);
    assert!(
        second.contains("already running for project \"shop\"")
            && second.contains("pid ")
            && second.contains(&format!("127.0.0.1:{port}"))
            && !second.contains('\u{1b}'),
        "{second}"
    );
    env.ok(&["down"]);
}

#[test]
fn a_mistyped_branch_name_gets_did_you_mean() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    env.ok(&["branch", "create", "feature-add-col"]);
    let err = env.fails(&["use", "feature-ad-col"]);
    assert!(
        err.contains("did you mean \"feature-add-col\"") && !err.contains("branch create"),
        "{err}"
    );
    let err = env.fails(&["branch", "start", "featre-add-col"]);
    assert!(err.contains("did you mean \"feature-add-col\""), "{err}");
    let err = env.fails(&["branch", "create", "x", "--from", "mian"]);
    assert!(err.contains("did you mean \"main\""), "{err}");
    // Nothing near: the list and how to create it, as before.
    let err = env.fails(&["use", "release-2026"]);
    assert!(
        err.contains("pgtwig branch create release-2026") && !err.contains("did you mean"),
        "{err}"
    );
}

/// The row of `branch list` whose tree cell ends with `name` (after the drawing).
fn row<'a>(listing: &'a str, drawn: &str) -> &'a str {
    listing
        .lines()
        .find(|l| l.starts_with(drawn))
        .unwrap_or_else(|| panic!("no row starting {drawn:?} in\n{listing}"))
}

#[test]
fn branch_list_draws_the_family_and_status_says_which_rule_and_override() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    git(&env, &["commit", "-q", "--allow-empty", "-m", "init"]);
    env.ok(&["branch", "create", "anon"]);
    env.ok(&["branch", "create", "dev-alice", "--from", "anon"]);
    // The hook makes feature-login for the git branch.
    git(&env, &["checkout", "-q", "-b", "feature/login"]);
    let daemon = common::up(&env);
    let mut session = common::held::Held::open(&daemon, &env.repo);
    assert_eq!(session.query("select 1").as_deref(), Some("1"));

    let listing = env.ok(&["branch", "list"]);
    let header = listing.lines().next().unwrap();
    for column in [
        "BRANCH",
        "GIT BRANCH",
        "STATE",
        "SESSIONS",
        "KEPT",
        "OWN",
        "SHARED",
    ] {
        assert!(header.contains(column), "{header}");
    }
    let lines: Vec<&str> = listing.lines().skip(1).take(4).collect();
    assert!(lines[0].starts_with("main (root) "), "{listing}");
    assert!(lines[1].starts_with("├─ anon "), "{listing}");
    assert!(lines[2].starts_with("│  └─ dev-alice "), "{listing}");
    assert!(lines[3].starts_with("└─ feature-login "), "{listing}");
    let login = row(&listing, "└─ feature-login ");
    let cells: Vec<&str> = login.split_whitespace().collect();
    assert_eq!(
        &cells[2..6],
        &["feature/login", "running", "1", "-"],
        "git branch, state, sessions, kept: {login}"
    );
    let alice: Vec<&str> = row(&listing, "│  └─ dev-alice ")
        .split_whitespace()
        .collect();
    assert_eq!(&alice[3..6], &["-", "stopped", "0"], "{listing}");
    // --json keeps every field, sessions included.
    let login = env.branch_json("feature-login");
    assert_eq!(login["sessions"], 1);
    assert_eq!(login["git_branch"], "feature/login");
    assert_eq!(env.branch_json("dev-alice")["parent"], "anon");
    for field in [
        "own_bytes",
        "shared_bytes",
        "protected",
        "expires",
        "running",
    ] {
        assert!(login.get(field).is_some(), "{field} missing: {login}");
    }

    // status: the git branch, the rule, no override.
    let status = env.ok(&["status"]);
    assert!(
        status.contains(
            "git branch \"feature/login\" → \"feature-login\" by rule 1 in .pgtwig.toml (git = \"*\""
        ),
        "{status}"
    );
    // `use` overrides the rule, and status says so.
    env.ok(&["use", "dev-alice"]);
    let status = env.ok(&["status"]);
    assert!(
        status.contains("gives \"feature-login\", but `pgtwig use` set \"dev-alice\""),
        "{status}"
    );
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(json["checkout"]["git_branch"], "feature/login");
    assert_eq!(json["checkout"]["branch"], "dev-alice");
    assert_eq!(json["checkout"]["rule_branch"], "feature-login");
    assert_eq!(json["checkout"]["overridden"], true);
    // A checkout follows the rule again.
    git(&env, &["checkout", "-q", "main"]);
    let json: serde_json::Value = serde_json::from_str(&env.ok(&["status", "--json"])).unwrap();
    assert_eq!(json["checkout"]["branch"], "main");
    assert_eq!(json["checkout"]["overridden"], false);
    drop(session);
    drop(daemon);
}

/// Two `up --detach` at once: one daemon runs, and the other command names it (pid, address,
/// project) instead of printing the winner's log lines as its error.
#[test]
fn the_up_that_loses_the_race_names_the_winner() {
    let env = TestEnv::new(Fs::Plain).unwrap();
    env.init();
    let ports = [common::free_port(), common::free_port()];
    let children: Vec<_> = ports
        .iter()
        .map(|p| {
            env.cmd(&["up", "--detach", "--port", &p.to_string()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    let lost: Vec<_> = outs.iter().filter(|o| !o.status.success()).collect();
    assert_eq!((won.len(), lost.len()), (1, 1), "{outs:?}");
    let winner = String::from_utf8_lossy(&won[0].stdout);
    let pid = winner
        .split("(pid ")
        .nth(1)
        .and_then(|r| r.split(')').next())
        .unwrap_or_else(|| panic!("winner said {winner}"));
    let err = String::from_utf8_lossy(&lost[0].stderr);
    assert!(
        err.contains(&format!("pid {pid}"))
            && err.contains("project \"shop\"")
            && err.contains("127.0.0.1:")
            && !err.contains(" INFO "),
        "the loser said: {err}"
    );
    env.ok(&["down"]);
}
