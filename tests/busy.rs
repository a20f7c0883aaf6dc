//! Nothing waits behind a long build: an anonymize builds without the project lock, so a
//! checkout's hook switches beside it; a command that does hold the lock makes the hook give
//! up after a moment, say so, and finish the switch in the background. Real git, real
//! servers; a long build is stood for by a build paused at a failpoint (so the order of
//! events is certain, not a matter of timing).

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{git, wait_for, Fs, TestEnv};

const CONFIG: &str = r#"project = "shop"
[anonymize.columns]
"public.users.email" = "email"
"#;

/// `pgtwig args` started and run until it reaches `failpoint` (where it pauses).
fn paused_at(env: &TestEnv, args: &[&str], failpoint: &str) -> Child {
    let mut child = env
        .cmd(args)
        .env("PGTWIG_FAILPOINT", failpoint)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        match lines.next() {
            Some(Ok(line)) if line.contains(&format!("failpoint {failpoint} reached")) => break,
            Some(Ok(_)) => continue,
            _ => panic!(
                "pgtwig {args:?} ended without reaching {failpoint}: {:?}",
                child.wait()
            ),
        }
    }
    child
}

/// A git checkout in the repository, with a deadline: a hook stuck on the lock fails the
/// test instead of hanging it. Returns what git and the hook printed.
fn checkout(env: &TestEnv, args: &[&str]) -> String {
    let mut child = Command::new("git")
        .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
        .args(args)
        .current_dir(&env.repo)
        .env("PGTWIG_HOME", &env.home)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("git {args:?} (its hook) did not return within 60 s: it waited for the project lock");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "git {args:?}: {out:?}");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn names(env: &TestEnv) -> Vec<String> {
    env.list_json()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect()
}

fn active(env: &TestEnv) -> String {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(env.project_dir().join("state.json")).unwrap())
            .unwrap();
    state["active"].as_str().unwrap().to_string()
}

fn project() -> TestEnv {
    let env = TestEnv::new(Fs::Plain).unwrap();
    std::fs::write(env.repo.join(".pgtwig.toml"), CONFIG).unwrap();
    env.init();
    git(&env, &["add", ".pgtwig.toml"]);
    git(&env, &["commit", "-qm", "pgtwig"]);
    env.ok(&["branch", "start", "main"]);
    env.psql(
        "main",
        "create table users(id int primary key, email text); \
         insert into users select g, 'person' || g || '@corp.example' from generate_series(1, 100) g",
    );
    env
}

#[test]
fn the_hook_switches_while_an_anonymize_builds() {
    let env = project();
    let mut anonymize = paused_at(&env, &["anonymize", "--into", "anon"], "prepare.unlocked");

    let out = checkout(&env, &["checkout", "-q", "-b", "feature"]);
    assert!(
        anonymize.try_wait().unwrap().is_none(),
        "the anonymize is still building when the hook has returned"
    );
    assert!(!out.contains("busy"), "{out}");
    assert!(names(&env).contains(&"feature".to_string()), "{out}");
    assert_eq!(active(&env), "feature");

    // Other lock holders leave the live build alone.
    env.ok(&["branch", "create", "other"]);
    let building: Vec<String> = env
        .tmp_entries()
        .into_iter()
        .filter(|e| e.starts_with("build-anon-") && !e.ends_with(".lock"))
        .collect();
    assert_eq!(building.len(), 1, "{:?}", env.tmp_entries());
    assert!(anonymize.try_wait().unwrap().is_none());

    // Its owner gone, the next lock holder cleans it up (its build server too).
    anonymize.kill().unwrap();
    anonymize.wait().unwrap();
    env.ok(&["branch", "delete", "other"]);
    assert!(env.tmp_entries().is_empty(), "{:?}", env.tmp_entries());
    assert!(!names(&env).contains(&"anon".to_string()));

    // Unpaused, it publishes under the lock as before.
    env.ok(&["anonymize", "--into", "anon"]);
    assert!(names(&env).contains(&"anon".to_string()));
    env.ok(&["branch", "start", "anon"]);
    assert_eq!(
        env.psql(
            "anon",
            "select count(*) from users where email like '%corp.example'"
        ),
        "0"
    );
}

#[test]
fn a_hook_behind_a_lock_holder_says_so_and_the_switch_follows_in_the_background() {
    let env = project();
    // A create paused while it holds the project lock.
    let mut holder = paused_at(&env, &["branch", "create", "half"], "create.before_publish");

    let out = checkout(&env, &["checkout", "-q", "-b", "feature"]);
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the lock holder still runs when the hook has returned"
    );
    assert!(
        out.contains("pgtwig: busy with `pgtwig branch create half`")
            && out.contains("the database branch will follow this checkout when it is done"),
        "{out}"
    );
    assert_eq!(active(&env), "main", "nothing switched yet");

    // The lock free again, the background run finishes the switch.
    holder.kill().unwrap();
    holder.wait().unwrap();
    wait_for(120, "the switch to follow the checkout", || {
        active(&env) == "feature"
    });
    assert!(names(&env).contains(&"feature".to_string()));
    assert!(!names(&env).contains(&"half".to_string()));
}

#[test]
fn a_connection_that_wakes_a_branch_behind_a_lock_holder_hears_busy_instead_of_waiting() {
    let env = project();
    env.ok(&["branch", "stop", "main"]);
    let d = common::up(&env);
    let mut holder = paused_at(&env, &["branch", "create", "half"], "create.before_publish");

    let mut psql = Command::new("psql")
        .arg(format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            d.port
        ))
        .args(["-X", "-A", "-t", "-w", "-c", "select count(*) from users"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while psql.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = psql.kill();
            panic!("the connection waited for the project lock for 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = psql.wait_with_output().unwrap();
    assert!(
        holder.try_wait().unwrap().is_none(),
        "the lock holder still runs when the client has its answer"
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("pgtwig is busy with `pgtwig branch create half`"),
        "{err}"
    );

    holder.kill().unwrap();
    holder.wait().unwrap();
    assert_eq!(
        common::psql(
            &format!("postgres://postgres@127.0.0.1:{}/postgres", d.port),
            "select count(*) from users"
        ),
        "100"
    );
    drop(d);
}
