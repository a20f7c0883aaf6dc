//! Branches made while the parent is under write load are consistent:
//! every one starts, its pgbench balances add up, and amcheck finds nothing.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::{Fs, TestEnv};

const CHECK_INDEXES: &str =
    "select count(*) from (select bt_index_check(c.oid, true) from pg_index i \
     join pg_class c on c.oid = i.indexrelid join pg_am a on a.oid = c.relam \
     where a.amname = 'btree' and c.relnamespace = 'public'::regnamespace) s";

#[test]
fn branches_of_a_parent_under_pgbench_load_are_consistent() {
    let env = TestEnv::new(Fs::Reflink).or_else(|| {
        eprintln!("(running on the plain file system instead)");
        TestEnv::new(Fs::Plain)
    });
    let env = env.unwrap();
    env.init();
    env.ok(&["branch", "start", "main"]);
    let url = env.url("main");
    env.psql("main", "create extension amcheck");
    let init = Command::new("pgbench")
        .args(["-i", "-q", "-s", "5", &url])
        .output()
        .unwrap();
    assert!(
        init.status.success(),
        "{}",
        String::from_utf8_lossy(&init.stderr)
    );

    let mut load = Command::new("pgbench")
        .args(["-c", "4", "-j", "2", "-T", "60", "-n", &url])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the load get going, then branch several times while it runs.
    common::wait_for(30, "pgbench to commit transactions", || {
        env.psql("main", "select count(*) from pgbench_history")
            .parse::<u64>()
            .unwrap()
            > 200
    });
    let names = ["load-1", "load-2", "load-3"];
    for name in names {
        let out = env.ok(&["branch", "create", name]);
        assert!(out.contains("of the running parent"), "{out}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        load.try_wait().unwrap().is_none(),
        "pgbench must still be running while branches are made"
    );
    let _ = load.kill();
    let _ = load.wait();

    for name in names {
        env.ok(&["branch", "start", name]);
        let sums = env.psql(
            name,
            "select (select sum(abalance) from pgbench_accounts) || ' ' || (select sum(delta) from pgbench_history) \
             || ' ' || (select count(*) from pgbench_history)",
        );
        let parts: Vec<&str> = sums.split(' ').collect();
        assert_eq!(
            parts[0], parts[1],
            "branch {name}: sum(abalance) vs sum(delta): {sums}"
        );
        assert!(
            parts[2].parse::<u64>().unwrap() > 200,
            "branch {name} has the load's history: {sums}"
        );
        assert_eq!(
            env.psql(name, CHECK_INDEXES),
            "3",
            "branch {name}: amcheck over the pgbench indexes"
        );
        assert_eq!(
            env.psql(name, "select count(*) from pgbench_accounts"),
            "500000"
        );
    }
    // The parent was never stopped, and is consistent too.
    let parent = env.psql(
        "main",
        "select (select sum(abalance) from pgbench_accounts) = (select sum(delta) from pgbench_history)",
    );
    assert_eq!(parent, "t");
}
