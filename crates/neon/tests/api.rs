//! The client against the stand-in for Neon's API (`pgtwig-neon-standin`,
//! written from Neon's API v2 reference: request and response shapes,
//! operations that finish later, 429 with Retry-After, 5xx, pagination).
//! No network reaches Neon here.

use std::time::{Duration, Instant};

use pgtwig_neon::{ApiKey, NeonClient, NeonError, NewBranch, PointInTime};
use pgtwig_neon_standin::StandIn;

fn client(s: &StandIn) -> NeonClient {
    let mut c = NeonClient::new(&s.api_base(), ApiKey::new(s.api_key()));
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
    let s = StandIn::api_only();
    let c = client(&s);
    // The project starts with its default branch "main", as Neon's do.
    let main = c.find_branch("proj-1", "main").unwrap().unwrap();
    assert!(main.is_default());
    let mut at = new_branch("feature", Some(&main.id));
    at.at = PointInTime::Timestamp("2026-11-28T00:00:00Z".into());
    at.expires_at = Some("2026-12-05T00:00:00Z".into());
    let started = Instant::now();
    let (feature, eps) = c.create_branch("proj-1", &at).unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "waited for the operations"
    );
    assert_eq!(eps[0].host, format!("{}.neon.test", eps[0].id));
    assert_eq!(eps[0].branch_id.as_deref(), Some(feature.id.as_str()));
    assert!(eps[0].is_read_write());
    assert_eq!(feature.expires_at.as_deref(), Some("2026-12-05T00:00:00Z"));
    for n in ["a", "b", "c"] {
        c.create_branch("proj-1", &new_branch(n, Some(&main.id)))
            .unwrap();
    }
    let all = c.list_branches("proj-1").unwrap();
    assert_eq!(all.len(), 5, "all pages followed");
    let pages = s
        .requests()
        .iter()
        .filter(|r| r.starts_with("GET /api/v2/projects/proj-1/branches?"))
        .count();
    assert!(pages >= 3, "the stand-in's small pages were followed");
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
    assert_eq!(s.restored(), vec![format!("{}<-{}", feature.id, main.id)]);
    // The request for a timestamped branch carried parent_timestamp.
    assert_eq!(
        s.branch_json("feature").unwrap()["parent_timestamp"],
        "2026-11-28T00:00:00Z"
    );
    c.delete_branch("proj-1", &feature.id).unwrap();
    assert!(c.find_branch("proj-1", "feature").unwrap().is_none());
    assert!(s.branch_names().iter().all(|b| b != "feature"));
}

#[test]
fn endpoints_roles_and_connection_uri() {
    let s = StandIn::api_only();
    let c = client(&s);
    let (dev, eps) = c.create_branch("proj-1", &new_branch("dev", None)).unwrap();
    assert_eq!(
        dev.parent_id,
        s.branch_id("main"),
        "defaults to the default branch"
    );
    let ep = c.get_endpoint("proj-1", &eps[0].id).unwrap();
    assert_eq!(ep.current_state.as_deref(), Some("active"));
    s.suspend("dev");
    let ep = c.get_endpoint("proj-1", &eps[0].id).unwrap();
    assert_eq!(ep.current_state.as_deref(), Some("idle"));
    c.start_endpoint("proj-1", &ep.id).unwrap();
    assert_eq!(s.compute_starts("dev"), 2);
    assert_eq!(c.list_endpoints("proj-1").unwrap().len(), 2);
    let roles = c.roles("proj-1", &dev.id).unwrap();
    assert_eq!(roles[0].name, "neondb_owner");
    let (role, password) = s.role();
    let uri = c.connection_uri("proj-1", &dev.id, "neondb", role).unwrap();
    assert_eq!(
        uri,
        format!(
            "postgresql://{role}:{password}@{}/neondb?sslmode=require",
            ep.host
        )
    );
}

#[test]
fn retries_429_with_retry_after_and_5xx() {
    let s = StandIn::api_only();
    s.throttle(2);
    s.fail_once();
    let c = client(&s);
    let started = Instant::now();
    c.create_branch("proj-1", &new_branch("retried", None))
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "honoured Retry-After twice"
    );
    let posts = s
        .requests()
        .iter()
        .filter(|r| r.starts_with("POST"))
        .count();
    assert_eq!(posts, 4, "2 throttled + 1 failed + 1 served");
}

#[test]
fn errors_say_what_to_check_and_never_show_the_key() {
    let s = StandIn::api_only();
    let bad = NeonClient::new(&s.api_base(), ApiKey::new("wrong-secret-key"));
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
