//! What finding a client's work tree costs per connection (issue 12), with many processes on the
//! machine: `cargo run --release -p pgtwig-daemon --example worktree_lookup [-- PROCESSES]`.
//!
//! Starts PROCESSES (default 1,000) idle processes of this user, then client processes that
//! each hold a loopback TCP connection with their cwd in a work tree of a fresh repository.
//! Times, per lookup:
//! - new process: a client started since the daemon's last search (psql, a test run, a
//!   freshly started app): found among the pids allocated since;
//! - full scan: a fresh finder (the daemon's first lookup, or a long-running process's first
//!   connection after many others started): every process of the user is a candidate;
//! - warm: the holder connected recently and its work tree is cached (an app's pool, a test
//!   suite: one process connecting again and again).

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use pgtwig_daemon::client_worktree::WorktreeFinder;

fn main() {
    let processes: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let tmp = tempfile::tempdir().unwrap();
    let repo = tmp.path().join("repo");
    std::fs::create_dir(&repo).unwrap();
    let git = |args: &[&str]| {
        assert!(Command::new("git")
            .args(["-c", "user.name=b", "-c", "user.email=b@example.com"])
            .args(args)
            .current_dir(&repo)
            .output()
            .unwrap()
            .status
            .success())
    };
    git(&["init", "-q", "-b", "main"]);
    git(&["commit", "-q", "--allow-empty", "-m", "x"]);

    let mut idle: Vec<_> = (0..processes)
        .map(|_| {
            Command::new("sleep")
                .arg("600")
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // A client: holds one connection, says when it is connected.
    let connect = || {
        let mut client = Command::new("python3")
            .args([
                "-c",
                &format!(
                    "import socket,sys,time\ns=socket.create_connection(('127.0.0.1',{port}))\nprint('up',flush=True)\ntime.sleep(600)"
                ),
            ])
            .current_dir(&repo)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(client.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let (server_end, client_addr) = listener.accept().unwrap();
        let owner =
            pgtwig_proxy::peer::tcp_peer_owner(server_end.local_addr().unwrap(), client_addr)
                .unwrap()
                .expect("the client's socket");
        (client, server_end, owner)
    };
    // New processes: the finder has searched before; each client starts after that.
    let finder = WorktreeFinder::new(&repo.join(".git"));
    let (mut first, _conn, owner) = connect();
    finder.pid_of_socket(owner.uid, owner.inode).unwrap();
    let _ = first.kill();
    let _ = first.wait();
    let mut new = Vec::new();
    for _ in 0..50 {
        let (mut client, _conn, owner) = connect();
        let t = Instant::now();
        let pid = finder.pid_of_socket(owner.uid, owner.inode).unwrap();
        let wt = finder.of_pid(pid).unwrap();
        new.push(t.elapsed());
        assert!(wt.ends_with("repo"));
        let _ = client.kill();
        let _ = client.wait();
    }
    let (mut client, _conn, owner) = connect();
    let uid = std::fs::metadata("/proc/self").unwrap().uid();
    let processes_of_user = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| e.metadata().is_ok_and(|m| m.uid() == uid))
        .count();

    let rounds = 200;
    let mut cold = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let finder = WorktreeFinder::new(&repo.join(".git"));
        let t = Instant::now();
        let pid = finder.pid_of_socket(owner.uid, owner.inode).unwrap();
        let wt = finder.of_pid(pid).unwrap();
        cold.push(t.elapsed());
        assert!(wt.ends_with("repo"));
    }
    let finder = WorktreeFinder::new(&repo.join(".git"));
    let pid = finder.pid_of_socket(owner.uid, owner.inode).unwrap();
    finder.of_pid(pid).unwrap();
    let mut warm = Vec::with_capacity(rounds * 10);
    for _ in 0..rounds * 10 {
        let t = Instant::now();
        let pid = finder.pid_of_socket(owner.uid, owner.inode).unwrap();
        finder.of_pid(pid).unwrap();
        warm.push(t.elapsed());
    }
    let report = |name: &str, v: &mut Vec<std::time::Duration>| {
        v.sort();
        let mean = v.iter().sum::<std::time::Duration>() / v.len() as u32;
        let p99 = v[v.len() * 99 / 100];
        println!(
            "{name:<11} {:>9.1} µs median {:>9.1} µs mean {:>9.1} µs p99 ({} lookups)",
            v[v.len() / 2].as_secs_f64() * 1e6,
            mean.as_secs_f64() * 1e6,
            p99.as_secs_f64() * 1e6,
            v.len()
        );
    };
    println!(
        "{processes} idle processes started; {processes_of_user} processes of uid {uid} on the machine"
    );
    report("new process", &mut new);
    report("full scan", &mut cold);
    report("warm", &mut warm);
    let _ = client.kill();
    for p in &mut idle {
        let _ = p.kill();
    }
    for p in &mut idle {
        let _ = p.wait();
    }
    let _ = client.wait();
}
