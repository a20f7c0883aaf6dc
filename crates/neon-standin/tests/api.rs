//! The HTTP API alone (no computes): shapes, errors, pagination, the test
//! knobs, and concurrent requests, through a plain HTTP client.

mod support;

use std::time::{Duration, Instant};

use pgtwig_neon_standin::StandIn;
use reqwest::Method;
use serde_json::{json, Value};
use support::Api;

#[test]
fn authentication_and_projects() {
    let s = StandIn::api_only();
    let http = reqwest::blocking::Client::new();
    let url = |p: &str| format!("{}/projects/{p}", s.api_base());
    let resp = http.get(url("proj-1")).send().unwrap();
    assert_eq!(resp.status().as_u16(), 401);
    let body: Value = resp.json().unwrap();
    assert!(body["message"].is_string(), "{body}");
    let get = |p: &str| {
        let r = http.get(url(p)).bearer_auth(s.api_key()).send().unwrap();
        (r.status().as_u16(), r.json::<Value>().unwrap())
    };
    let (status, v) = get("proj-1");
    assert_eq!(status, 200);
    assert_eq!(v["project"]["id"], "proj-1");
    assert!(v["project"]["region_id"].is_string() && v["project"]["created_at"].is_string());
    assert_eq!(get("forbidden").0, 403);
    assert_eq!(get("other").0, 404);
    assert_eq!(s.requests()[0], "GET /api/v2/projects/proj-1");
}

#[test]
fn branches_endpoints_and_operations() {
    let s = StandIn::api_only();
    let api = Api::new(&s);
    let main_id = s.branch_id("main").unwrap();
    let v = api.ok(Method::GET, &format!("/branches/{main_id}"), None);
    assert_eq!(v["branch"]["default"], true);
    assert!(v["branch"].get("parent_id").is_none());

    let (status, v) = api.call(
        Method::POST,
        "/branches",
        Some(json!({
            "branch": { "name": "dev", "parent_timestamp": "2026-11-28T00:00:00Z",
                        "expires_at": "2026-12-05T00:00:00Z" },
            "endpoints": [{ "type": "read_write", "suspend_timeout_seconds": 60 }],
        })),
    );
    assert_eq!(status, 201, "{v}");
    let dev_id = v["branch"]["id"].as_str().unwrap().to_string();
    assert!(dev_id.starts_with("br-"), "{dev_id}");
    assert_eq!(v["branch"]["parent_id"], main_id.as_str(), "default parent");
    assert_eq!(v["branch"]["parent_timestamp"], "2026-11-28T00:00:00Z");
    assert_eq!(v["branch"]["expires_at"], "2026-12-05T00:00:00Z");
    let ep = &v["endpoints"][0];
    let ep_id = ep["id"].as_str().unwrap();
    assert!(ep_id.starts_with("ep-"));
    assert_eq!(ep["host"], format!("{ep_id}.neon.test"));
    assert_eq!(ep["suspend_timeout_seconds"], 60);
    assert_eq!(ep["current_state"], "active");
    let actions: Vec<&str> = v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["create_timeline", "start_compute"]);
    assert!(v["operations"]
        .as_array()
        .unwrap()
        .iter()
        .all(|o| o["status"] == "running"));
    let op = v["operations"][0]["id"].as_str().unwrap();
    std::thread::sleep(Duration::from_millis(350));
    let v = api.ok(Method::GET, &format!("/operations/{op}"), None);
    assert_eq!(v["operation"]["status"], "finished");

    // Errors: duplicate name, unknown parent, default branch, children.
    let (status, v) = api.call(
        Method::POST,
        "/branches",
        Some(json!({"branch": {"name": "dev"}})),
    );
    assert_eq!(status, 422);
    assert!(v["message"].as_str().unwrap().contains("already exists"));
    let (status, _) = api.call(
        Method::POST,
        "/branches",
        Some(json!({"branch": {"name": "x", "parent_id": "br-nope-0"}})),
    );
    assert_eq!(status, 404);
    let (status, v) = api.call(Method::DELETE, &format!("/branches/{main_id}"), None);
    assert_eq!(status, 422, "{v}");
    let (child_id, _) = api.create("child", Some(&dev_id));
    let (status, v) = api.call(Method::DELETE, &format!("/branches/{dev_id}"), None);
    assert_eq!(status, 422);
    assert!(v["message"]
        .as_str()
        .unwrap()
        .contains("branch has children"));

    // Roles, databases, connection strings.
    let v = api.ok(Method::GET, &format!("/branches/{dev_id}/roles"), None);
    assert_eq!(v["roles"][0]["name"], "neondb_owner");
    let v = api.ok(Method::GET, &format!("/branches/{dev_id}/databases"), None);
    assert_eq!(v["databases"][0]["name"], "neondb");
    assert_eq!(v["databases"][0]["owner_name"], "neondb_owner");
    let v = api.ok(
        Method::GET,
        &format!("/connection_uri?branch_id={dev_id}&database_name=neondb&role_name=neondb_owner&pooled=true"),
        None,
    );
    let (_, password) = s.role();
    assert_eq!(
        v["uri"],
        format!(
            "postgresql://neondb_owner:{password}@{ep_id}-pooler.neon.test/neondb?sslmode=require"
        )
    );

    // Suspend and start an endpoint (state only, without computes).
    assert_eq!(s.compute_starts("dev"), 1);
    s.suspend("dev");
    let v = api.ok(Method::GET, &format!("/endpoints/{ep_id}"), None);
    assert_eq!(v["endpoint"]["current_state"], "idle");
    let v = api.ok(Method::POST, &format!("/endpoints/{ep_id}/start"), None);
    assert_eq!(v["endpoint"]["current_state"], "active");
    assert_eq!(s.compute_starts("dev"), 2);
    let v = api.ok(Method::GET, "/endpoints", None);
    assert_eq!(v["endpoints"].as_array().unwrap().len(), 3);

    // Restore: children need preserve_under_name, and move to the kept state.
    let body = json!({ "source_branch_id": main_id });
    let (status, _) = api.call(
        Method::POST,
        &format!("/branches/{dev_id}/restore"),
        Some(body),
    );
    assert_eq!(status, 400);
    let body = json!({ "source_branch_id": main_id, "preserve_under_name": "dev-old" });
    let v = api.ok(
        Method::POST,
        &format!("/branches/{dev_id}/restore"),
        Some(body),
    );
    assert!(v["branch"]["last_reset_at"].is_string());
    let old = s.branch_json("dev-old").unwrap();
    let child = api.ok(Method::GET, &format!("/branches/{child_id}"), None);
    assert_eq!(child["branch"]["parent_id"], old["id"]);
    assert_eq!(s.restored(), [format!("{dev_id}<-{main_id}")]);
    api.ok(Method::DELETE, &format!("/branches/{dev_id}"), None);
    assert_eq!(s.branch_names(), ["main", "child", "dev-old"]);
}

#[test]
fn pagination_follows_cursors() {
    let s = StandIn::api_only();
    for i in 0..6 {
        s.create_branch(&format!("b{i}"), None);
    }
    let api = Api::new(&s);
    let mut names = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &cursor {
            Some(c) => format!("/branches?limit=100&cursor={c}"),
            None => "/branches?limit=100".to_string(),
        };
        let v = api.ok(Method::GET, &path, None);
        pages += 1;
        let page = v["branches"].as_array().unwrap();
        assert!(page.len() <= 2, "small pages");
        names.extend(page.iter().map(|b| b["name"].as_str().unwrap().to_string()));
        if pages == 1 {
            // Deleting a branch already listed does not shift later pages.
            let id = s.branch_id("b0").unwrap();
            api.ok(Method::DELETE, &format!("/branches/{id}"), None);
        }
        match v["pagination"]["next"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(names, ["main", "b0", "b1", "b2", "b3", "b4", "b5"]);
    assert_eq!(pages, 4);
    s.set_page_size(100);
    let v = api.ok(Method::GET, "/branches?limit=3", None);
    assert_eq!(v["branches"].as_array().unwrap().len(), 3, "limit wins");
}

#[test]
fn throttling_failures_and_concurrent_requests() {
    let s = StandIn::api_only();
    let http = reqwest::blocking::Client::new();
    let url = format!("{}/projects/proj-1/branches", s.api_base());
    s.throttle(2);
    s.fail_once();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let r = http.get(&url).bearer_auth(s.api_key()).send().unwrap();
        let after = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        seen.push((r.status().as_u16(), after));
    }
    let one = Some("1".to_string());
    assert_eq!(
        seen,
        [(429, one.clone()), (429, one), (503, None), (200, None)]
    );

    // A slow client does not hold up the others: one connection per thread.
    let slow = std::net::TcpStream::connect(s.api_base()[7..].split('/').next().unwrap()).unwrap();
    let started = Instant::now();
    std::thread::scope(|scope| {
        for _ in 0..8 {
            scope.spawn(|| {
                let r = http.get(&url).bearer_auth(s.api_key()).send().unwrap();
                assert_eq!(r.status().as_u16(), 200);
            });
        }
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(slow);
}
