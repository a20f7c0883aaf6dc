//! `pgtwig_proxy::peer` against real sockets: connections made by this process and by a child
//! process running as a user created for the test.
#![cfg(target_os = "linux")]

use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgtwig_proxy::peer::{
    tcp_peer_owner, tcp_peer_owner_netlink, tcp_peer_owner_proc_net, unix_peer, PeerOwner,
};

/// How long a child may take to start and connect.
const CONNECT_DEADLINE: Duration = Duration::from_secs(20);
/// Debian's interpreter, reachable by any user (a pyenv shim under /root is not).
const PYTHON: &str = "/usr/bin/python3";

/// Connects to `argv[2]` (a Unix socket path, or `host port` for TCP) and holds the connection
/// until stdin is closed.
const CONNECT_AND_HOLD: &str = r#"
import socket, sys
kind = sys.argv[1]
if kind == "unix":
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[2])
else:
    s = socket.socket(socket.AF_INET6 if kind == "tcp6" else socket.AF_INET, socket.SOCK_STREAM)
    s.connect((sys.argv[2], int(sys.argv[3])))
sys.stdin.read()
"#;

type Lookup = fn(SocketAddr, SocketAddr) -> std::io::Result<Option<PeerOwner>>;
const PATHS: [(&str, Lookup); 3] = [
    ("netlink", tcp_peer_owner_netlink),
    ("/proc/net", tcp_peer_owner_proc_net),
    ("combined", tcp_peer_owner),
];

/// A test that cannot take its real path says why; under CI it fails instead.
fn cannot_run(why: &str) {
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{why}");
    }
    eprintln!("SKIPPED: {why}");
}

fn euid() -> u32 {
    unsafe { libc::geteuid() }
}

fn inode_of(fd: &impl AsRawFd) -> u64 {
    let mut stat: libc::stat = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut stat) }, 0);
    stat.st_ino
}

/// Accepts one connection, failing with the child's error output if it exits first.
fn accept_within<T>(
    mut accept: impl FnMut() -> std::io::Result<T>,
    mut child: Option<&mut HoldingChild>,
) -> T {
    let deadline = Instant::now() + CONNECT_DEADLINE;
    loop {
        match accept() {
            Ok(accepted) => return accepted,
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(err) => panic!("accept failed: {err}"),
        }
        if let Some(child) = child.as_deref_mut() {
            child.fail_if_exited();
        }
        assert!(
            Instant::now() < deadline,
            "no connection within {CONNECT_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A connection from this process, both ends open.
struct Connection {
    client: TcpStream,
    _accepted: TcpStream,
    /// The proxy side's local address.
    accepted_local: SocketAddr,
    /// The client address `accept()` returned.
    client_addr: SocketAddr,
}

fn loopback_connection(listen: &str, connect_host: &str) -> Connection {
    let listener = TcpListener::bind(listen).unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let client = TcpStream::connect((connect_host, port)).unwrap();
    let (accepted, client_addr) = accept_within(|| listener.accept(), None);
    Connection {
        client,
        accepted_local: accepted.local_addr().unwrap(),
        _accepted: accepted,
        client_addr,
    }
}

fn ipv6_loopback_available() -> bool {
    match TcpListener::bind("[::1]:0") {
        Ok(_) => true,
        Err(err) => {
            cannot_run(&format!("no IPv6 loopback here ({err})"));
            false
        }
    }
}

fn assert_found_everywhere(accepted_local: SocketAddr, client_addr: SocketAddr, want: PeerOwner) {
    for (path, lookup) in PATHS {
        let found = lookup(accepted_local, client_addr)
            .unwrap_or_else(|e| panic!("{path} lookup of {client_addr} failed: {e}"));
        assert_eq!(
            found,
            Some(want),
            "{path} lookup of the client {client_addr} → {accepted_local}"
        );
    }
}

fn assert_found_by_this_process(listen: &str, connect_host: &str) -> SocketAddr {
    let connection = loopback_connection(listen, connect_host);
    let want = PeerOwner {
        uid: euid(),
        inode: inode_of(&connection.client),
        pid: None,
    };
    assert_found_everywhere(connection.accepted_local, connection.client_addr, want);
    connection.client_addr
}

#[test]
fn ipv4_loopback_client_of_this_process() {
    assert_found_by_this_process("127.0.0.1:0", "127.0.0.1");
}

#[test]
fn ipv6_loopback_client_of_this_process() {
    if ipv6_loopback_available() {
        assert_found_by_this_process("[::1]:0", "::1");
    }
}

#[test]
fn ipv4_client_of_a_dual_stack_listener_is_found_through_its_mapped_address() {
    if !ipv6_loopback_available() {
        return;
    }
    // An IPv4 socket, and an IPv6 socket connecting to the mapped address: the kernel files the
    // second in /proc/net/tcp6 and reports it as IPv6 over netlink.
    for connect_host in ["127.0.0.1", "::ffff:127.0.0.1"] {
        let client_addr = assert_found_by_this_process("[::]:0", connect_host);
        assert_eq!(
            client_addr.ip().to_string(),
            "::ffff:127.0.0.1",
            "the dual-stack listener should report the IPv4 client as mapped (is \
             net.ipv6.bindv6only set?)"
        );
    }
}

#[test]
fn unknown_connections_and_closed_clients_have_no_owner() {
    let Connection {
        client,
        _accepted,
        accepted_local,
        client_addr,
    } = loopback_connection("127.0.0.1:0", "127.0.0.1");
    let unused: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let other_family: SocketAddr = "[::1]:1".parse().unwrap();
    // The kernel's exact lookup falls back to listening sockets on the "local" address asked:
    // a listener is nobody's client socket.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let listening = listener.local_addr().unwrap();
    for (path, lookup) in PATHS {
        assert_eq!(
            lookup(unused, listening).unwrap(),
            None,
            "{path}: a listener"
        );
        assert_eq!(
            lookup(accepted_local, unused).unwrap(),
            None,
            "{path}: unused port"
        );
        assert_eq!(
            lookup(unused, client_addr).unwrap(),
            None,
            "{path}: wrong server end"
        );
        assert_eq!(
            lookup(accepted_local, other_family).unwrap(),
            None,
            "{path}: mixed"
        );
    }
    // Closing orphans the client socket at once (FIN_WAIT, then TIME_WAIT: inode 0, and a uid
    // of 0 that must not be taken for root's).
    drop(client);
    for (path, lookup) in PATHS {
        assert_eq!(
            lookup(accepted_local, client_addr).unwrap(),
            None,
            "{path}: closed"
        );
    }
}

/// A system user made for one test, removed on drop (also when the test panics).
struct TestUser {
    name: String,
    uid: u32,
    gid: u32,
}

impl TestUser {
    fn create() -> Option<TestUser> {
        if euid() != 0 {
            cannot_run("creating a test user needs root");
            return None;
        }
        static USERS_MADE: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let unique = nanos ^ std::process::id() ^ USERS_MADE.fetch_add(1, Ordering::Relaxed);
        let name = format!("pgtwig-peer-test-{unique:08x}");
        run_user_tool(
            "useradd",
            &[
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ],
        );
        // Made at once, so that a failure below still removes the user.
        let mut user = TestUser {
            name,
            uid: 0,
            gid: 0,
        };
        let id = |flag: &str| -> u32 {
            let out = Command::new("id")
                .args([flag, &user.name])
                .output()
                .unwrap();
            assert!(out.status.success(), "id {flag} {}", user.name);
            String::from_utf8(out.stdout)
                .unwrap()
                .trim()
                .parse()
                .unwrap()
        };
        let (uid, gid) = (id("-u"), id("-g"));
        assert_ne!(uid, 0);
        (user.uid, user.gid) = (uid, gid);
        Some(user)
    }

    /// Runs the connecting script as this user.
    fn connect_and_hold(&self, args: &[&str]) -> HoldingChild {
        assert!(
            Path::new(PYTHON).exists(),
            "{PYTHON} is needed to connect as another user"
        );
        let child = Command::new(PYTHON)
            .arg("-c")
            .arg(CONNECT_AND_HOLD)
            .args(args)
            .uid(self.uid)
            .gid(self.gid)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start python3");
        HoldingChild(child)
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        run_user_tool("userdel", &[&self.name]);
    }
}

/// Runs `useradd` or `userdel`, one at a time in this process and again while another process
/// holds the password file lock (both exit 1 then, and 10 for the group file).
fn run_user_tool(tool: &str, args: &[&str]) {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    const LOCKED_EXIT_CODES: [i32; 2] = [1, 10];
    const LOCK_DEADLINE: Duration = Duration::from_secs(30);
    let _turn = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let deadline = Instant::now() + LOCK_DEADLINE;
    loop {
        let out = Command::new(tool)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("run {tool}: {e}"));
        if out.status.success() {
            return;
        }
        let stderr = String::from_utf8_lossy(&out.stderr);
        let locked = out
            .status
            .code()
            .is_some_and(|c| LOCKED_EXIT_CODES.contains(&c))
            && stderr.contains("lock");
        if !locked || Instant::now() >= deadline {
            // A panic inside a drop while unwinding would abort: say it and go on there.
            if std::thread::panicking() {
                eprintln!("{tool} {args:?} failed ({}): {stderr}", out.status);
                return;
            }
            panic!("{tool} {args:?} failed ({}): {stderr}", out.status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child holding a connection until dropped (stdin closed, then killed if need be).
struct HoldingChild(Child);

impl HoldingChild {
    fn fail_if_exited(&mut self) {
        if let Ok(Some(status)) = self.0.try_wait() {
            let mut stderr = String::new();
            if let Some(mut err) = self.0.stderr.take() {
                let _ = err.read_to_string(&mut stderr);
            }
            panic!("the connecting child exited ({status}) before connecting: {stderr}");
        }
    }

    /// Inodes of the sockets the child holds, from /proc/PID/fd (`socket:[N]`).
    fn socket_inodes(&self) -> Vec<u64> {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.0.id())).unwrap();
        fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let target = target.to_str()?.to_owned();
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .parse()
                    .ok()
            })
            .collect()
    }
}

impl Drop for HoldingChild {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn tcp_client_of_another_user_is_that_user() {
    let Some(user) = TestUser::create() else {
        return;
    };
    let mut cases = vec![("127.0.0.1:0", "tcp", "127.0.0.1")];
    if ipv6_loopback_available() {
        cases.push(("[::1]:0", "tcp6", "::1"));
        cases.push(("[::]:0", "tcp", "127.0.0.1"));
    }
    for (listen, kind, host) in cases {
        let listener = TcpListener::bind(listen).unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port().to_string();
        let mut child = user.connect_and_hold(&[kind, host, &port]);
        let (accepted, client_addr) = accept_within(|| listener.accept(), Some(&mut child));
        let accepted_local = accepted.local_addr().unwrap();
        for (path, lookup) in PATHS {
            let owner = lookup(accepted_local, client_addr)
                .unwrap_or_else(|e| panic!("{path} lookup failed: {e}"))
                .unwrap_or_else(|| panic!("{path}: no owner for {client_addr} ({listen})"));
            assert_eq!(
                owner.uid, user.uid,
                "{path}: uid of {client_addr} ({listen})"
            );
            assert!(
                child.socket_inodes().contains(&owner.inode),
                "{path}: inode {} is not the child's socket ({listen})",
                owner.inode
            );
        }
    }
}

#[test]
fn unix_socket_peer_is_the_connecting_process() {
    // A pair made here: both ends are this process.
    let (one, _other) = UnixStream::pair().unwrap();
    let peer = unix_peer(&one).unwrap();
    assert_eq!((peer.uid, peer.pid), (euid(), Some(std::process::id())));
    assert_eq!(peer.gid, unsafe { libc::getegid() });

    let Some(user) = TestUser::create() else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let path = dir.path().join("proxy.sock");
    let listener = UnixListener::bind(&path).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let mut child = user.connect_and_hold(&["unix", path.to_str().unwrap()]);
    let (accepted, _) = accept_within(|| listener.accept(), Some(&mut child));
    let peer = unix_peer(&accepted).unwrap();
    assert_eq!(peer.uid, user.uid);
    assert_eq!(peer.gid, user.gid);
    assert_eq!(peer.pid, Some(child.0.id()));
}
