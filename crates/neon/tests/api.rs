//! The client against a stand-in for Neon's API, written from Neon's API v2
//! reference (request and response shapes, operations that finish later,
//! 429 with Retry-After, 5xx, pagination). No network reaches Neon here.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgtwig_neon::{ApiKey, NeonClient, NeonError, NewBranch, PointInTime};
use serde_json::{json, Value};

#[derive(Default)]
struct State {
    branches: Vec<Value>,
    operations: HashMap<String, Instant>, // id -> finishes at
    next: u32,
    /// Answer the next N requests with 429 (Retry-After: 1), then one 503.
    throttle: u32,
    fail_once: bool,
    requests: Vec<String>,
    restored: Vec<String>,
}

struct StandIn {
    base: String,
    state: Arc<Mutex<State>>,
}

fn respond(stream: &mut std::net::TcpStream, status: u16, extra: &str, body: &Value) {
    let text = body.to_string();
    let _ = write!(
        stream,
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{text}",
        text.len()
    );
}

fn start() -> StandIn {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/api/v2", listener.local_addr().unwrap());
    let state = Arc::new(Mutex::new(State::default()));
    let st = state.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let mut auth = String::new();
            let mut len = 0usize;
            loop {
                let mut h = String::new();
                reader.read_line(&mut h).unwrap();
                if h == "\r\n" || h.is_empty() {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                if lower.starts_with("authorization:") {
                    auth = h["authorization:".len()..].trim().to_string();
                }
            }
            let mut body = vec![0; len];
            reader.read_exact(&mut body).unwrap();
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let mut parts = line.split_whitespace();
            let (method, target) = (
                parts.next().unwrap().to_string(),
                parts.next().unwrap().to_string(),
            );
            let mut s = st.lock().unwrap();
            s.requests.push(format!("{method} {target}"));
            if auth != "Bearer test-key" {
                respond(
                    &mut stream,
                    401,
                    "",
                    &json!({"message": "authentication required"}),
                );
                continue;
            }
            if s.throttle > 0 {
                s.throttle -= 1;
                respond(
                    &mut stream,
                    429,
                    "Retry-After: 1\r\n",
                    &json!({"message": "rate limited"}),
                );
                continue;
            }
            if s.fail_once {
                s.fail_once = false;
                respond(&mut stream, 503, "", &json!({"message": "unavailable"}));
                continue;
            }
            let path = target.trim_start_matches("/api/v2");
            let (path, query) = path.split_once('?').unwrap_or((path, ""));
            let seg: Vec<&str> = path.trim_matches('/').split('/').collect();
            if seg.len() < 2 || seg[0] != "projects" {
                respond(&mut stream, 404, "", &json!({"message": "not found"}));
                continue;
            }
            if seg[1] == "forbidden" {
                respond(&mut stream, 403, "", &json!({"message": "forbidden"}));
                continue;
            }
            if seg[1] != "proj-1" {
                respond(
                    &mut stream,
                    404,
                    "",
                    &json!({"message": "project not found"}),
                );
                continue;
            }
            let new_op = |s: &mut State, action: &str| {
                s.next += 1;
                let id = format!("op-{}", s.next);
                s.operations
                    .insert(id.clone(), Instant::now() + Duration::from_millis(300));
                json!({"id": id, "action": action, "status": "running"})
            };
            match (method.as_str(), &seg[2..]) {
                ("POST", ["branches"]) => {
                    let name = body["branch"]["name"].as_str().unwrap_or("").to_string();
                    if s.branches.iter().any(|b| b["name"] == name.as_str()) {
                        respond(
                            &mut stream,
                            422,
                            "",
                            &json!({"message": format!("branch {name} already exists")}),
                        );
                        continue;
                    }
                    s.next += 1;
                    let id = format!("br-{}", s.next);
                    let branch = json!({"id": id, "name": name, "parent_id": body["branch"]["parent_id"],
                        "current_state": "init", "created_at": "2026-11-28T00:00:00Z",
                        "expires_at": body["branch"]["expires_at"],
                        "parent_timestamp": body["branch"]["parent_timestamp"]});
                    s.branches.push(branch.clone());
                    let ep = json!({"id": format!("ep-{id}"), "host": format!("ep-{id}.us-east-2.aws.neon.tech"),
                        "branch_id": id, "type": body["endpoints"][0]["type"]});
                    let ops = json!([
                        new_op(&mut s, "create_branch"),
                        new_op(&mut s, "start_compute")
                    ]);
                    respond(
                        &mut stream,
                        201,
                        "",
                        &json!({"branch": branch, "endpoints": [ep], "operations": ops}),
                    );
                }
                ("GET", ["branches"]) => {
                    // Pages of 2, to exercise pagination.
                    let start: usize = query
                        .split('&')
                        .find_map(|kv| kv.strip_prefix("cursor="))
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(0);
                    let page: Vec<Value> = s.branches.iter().skip(start).take(2).cloned().collect();
                    let next = if start + 2 < s.branches.len() {
                        json!((start + 2).to_string())
                    } else {
                        Value::Null
                    };
                    respond(
                        &mut stream,
                        200,
                        "",
                        &json!({"branches": page, "pagination": {"next": next}}),
                    );
                }
                ("GET", ["branches", id]) => match s.branches.iter().find(|b| b["id"] == *id) {
                    Some(b) => respond(&mut stream, 200, "", &json!({"branch": b})),
                    None => respond(
                        &mut stream,
                        404,
                        "",
                        &json!({"message": "branch not found"}),
                    ),
                },
                ("GET", ["branches", id, "endpoints"]) => respond(
                    &mut stream,
                    200,
                    "",
                    &json!({"endpoints": [{"id": format!("ep-{id}"), "host": format!("ep-{id}.neon.tech"), "branch_id": id, "type": "read_write"}]}),
                ),
                ("DELETE", ["branches", id]) => {
                    let before = s.branches.len();
                    let id = id.to_string();
                    s.branches.retain(|b| b["id"] != id.as_str());
                    if s.branches.len() == before {
                        respond(
                            &mut stream,
                            404,
                            "",
                            &json!({"message": "branch not found"}),
                        );
                    } else {
                        let op = new_op(&mut s, "delete_timeline");
                        respond(
                            &mut stream,
                            200,
                            "",
                            &json!({"branch": {"id": id}, "operations": [op]}),
                        );
                    }
                }
                ("POST", ["branches", id, "restore"]) => {
                    let id = id.to_string();
                    s.restored.push(format!(
                        "{id}<-{}",
                        body["source_branch_id"].as_str().unwrap_or("?")
                    ));
                    let op = new_op(&mut s, "reset_branch");
                    respond(
                        &mut stream,
                        200,
                        "",
                        &json!({"branch": {"id": id}, "operations": [op]}),
                    );
                }
                ("GET", ["operations", id]) => {
                    let status = match s.operations.get(*id) {
                        Some(t) if Instant::now() >= *t => "finished",
                        Some(_) => "running",
                        None => "failed",
                    };
                    respond(
                        &mut stream,
                        200,
                        "",
                        &json!({"operation": {"id": id, "action": "x", "status": status}}),
                    );
                }
                _ => respond(&mut stream, 404, "", &json!({"message": "no such route"})),
            }
        }
    });
    StandIn { base, state }
}

fn client(s: &StandIn) -> NeonClient {
    let mut c = NeonClient::new(&s.base, ApiKey::new("test-key"));
    c.retry_budget = Duration::from_secs(20);
    c
}

fn new_branch<'a>(name: &'a str, parent: Option<&'a str>) -> NewBranch<'a> {
    NewBranch {
        name,
        parent_id: parent,
        at: PointInTime::Head,
        suspend_timeout_seconds: Some(300),
        expires_at: None,
    }
}

#[test]
fn create_waits_for_operations_then_list_get_reset_delete() {
    let s = start();
    let c = client(&s);
    let started = Instant::now();
    let (main, eps) = c
        .create_branch("proj-1", &new_branch("main", None))
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the operations"
    );
    assert_eq!(
        eps[0].host,
        format!("ep-{}.us-east-2.aws.neon.tech", main.id)
    );
    let mut at = new_branch("feature", Some(&main.id));
    at.at = PointInTime::Timestamp("2026-11-28T00:00:00Z".into());
    at.expires_at = Some("2026-12-05T00:00:00Z".into());
    let (feature, _) = c.create_branch("proj-1", &at).unwrap();
    assert_eq!(feature.expires_at.as_deref(), Some("2026-12-05T00:00:00Z"));
    for n in ["a", "b", "c"] {
        c.create_branch("proj-1", &new_branch(n, Some(&main.id)))
            .unwrap();
    }
    let all = c.list_branches("proj-1").unwrap();
    assert_eq!(all.len(), 5, "all pages followed");
    assert_eq!(
        c.find_branch("proj-1", "feature").unwrap().unwrap().id,
        feature.id
    );
    assert_eq!(
        c.get_branch("proj-1", &feature.id)
            .unwrap()
            .parent_id
            .as_deref(),
        Some(main.id.as_str())
    );
    assert_eq!(c.endpoints("proj-1", &feature.id).unwrap().len(), 1);
    c.reset_to_parent("proj-1", &feature).unwrap();
    assert_eq!(
        s.state.lock().unwrap().restored,
        vec![format!("{}<-{}", feature.id, main.id)]
    );
    c.delete_branch("proj-1", &feature.id).unwrap();
    assert!(c.find_branch("proj-1", "feature").unwrap().is_none());
    // The request for a timestamped branch carried parent_timestamp.
    let branches = &s.state.lock().unwrap().branches;
    assert!(branches.iter().all(|b| b["name"] != "feature"));
}

#[test]
fn retries_429_with_retry_after_and_5xx() {
    let s = start();
    s.state.lock().unwrap().throttle = 2;
    s.state.lock().unwrap().fail_once = true;
    let c = client(&s);
    let started = Instant::now();
    c.create_branch("proj-1", &new_branch("main", None))
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "honoured Retry-After twice"
    );
    let posts = s
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .filter(|r| r.starts_with("POST"))
        .count();
    assert_eq!(posts, 4, "2 throttled + 1 failed + 1 served");
}

#[test]
fn errors_say_what_to_check_and_never_show_the_key() {
    let s = start();
    let bad = NeonClient::new(&s.base, ApiKey::new("wrong-secret-key"));
    let e = bad.list_branches("proj-1").unwrap_err();
    assert!(matches!(e, NeonError::Unauthorized));
    assert!(
        !e.to_string().contains("wrong-secret-key")
            && !format!("{bad:?}").contains("wrong-secret-key")
    );
    let c = client(&s);
    let e = c.list_branches("no-such-project").unwrap_err().to_string();
    assert!(e.contains("404") && e.contains("project id"), "{e}");
    let e = c.list_branches("forbidden").unwrap_err().to_string();
    assert!(e.contains("403") && e.contains("forbidden"), "{e}");
    c.create_branch("proj-1", &new_branch("dup", None)).unwrap();
    let e = c
        .create_branch("proj-1", &new_branch("dup", None))
        .unwrap_err()
        .to_string();
    assert!(e.contains("422") && e.contains("already exists"), "{e}");
    let gone = NeonClient::new("http://127.0.0.1:1/api/v2", ApiKey::new("k"));
    let mut gone = gone;
    gone.retry_budget = Duration::from_millis(500);
    let e = gone.list_branches("proj-1").unwrap_err().to_string();
    assert!(e.contains("cannot reach the Neon API"), "{e}");
}
