//! The HTTP routes of Neon's API v2 the stand-in serves, with the request
//! and response shapes of Neon's reference (https://api-docs.neon.tech):
//! authentication, the test knobs (429 with `Retry-After`, one 503), the
//! project check (403 for "forbidden", 404 for any other unknown id), then
//! one handler per route.

use serde_json::{json, Value};

use crate::cloud::{CloudError, Inner, NewBranch};
use crate::http::{Request, Response};
use crate::state::{
    branch_json, database_json, endpoint_json, op_json, project_json, role_json, State, API_KEY,
    DATABASE, HOST_SUFFIX, PASSWORD, PROJECT_ID, ROLE,
};

const PREFIX: &str = "/api/v2";

pub fn handle(inner: &Inner, req: Request) -> Response {
    {
        let mut s = inner.lock();
        s.requests.push(format!("{} {}", req.method, req.target));
        if req.authorization != format!("Bearer {API_KEY}") {
            return Response::error(401, "authentication required");
        }
        if s.throttle > 0 {
            s.throttle -= 1;
            let mut r = Response::error(429, "rate limit exceeded");
            r.headers.push(("Retry-After", "1".into()));
            return r;
        }
        if s.fail_once {
            s.fail_once = false;
            return Response::error(503, "service temporarily unavailable");
        }
    }
    let Some(path) = req.path().strip_prefix(PREFIX) else {
        return Response::error(404, "not found");
    };
    let seg: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let seg: Vec<&str> = seg.iter().map(String::as_str).collect();
    match seg.as_slice() {
        ["projects", "forbidden", ..] => {
            Response::error(403, "you have no access to project forbidden")
        }
        ["projects", p, ..] if *p != PROJECT_ID => {
            Response::error(404, format!("project {p} not found"))
        }
        ["projects", _, rest @ ..] => route(inner, &req, rest),
        _ => Response::error(404, "not found"),
    }
}

fn route(inner: &Inner, req: &Request, rest: &[&str]) -> Response {
    let result = match (req.method.as_str(), rest) {
        ("GET", []) => Ok(Response::ok(json!({ "project": project_json() }))),
        ("GET", ["branches"]) => Ok(list_branches(&inner.lock(), req)),
        ("POST", ["branches"]) => create_branch(inner, &req.body),
        ("GET", ["branches", id]) => with_branch(
            inner,
            id,
            |s, b| json!({ "branch": branch_json(s.branch(b).expect("checked")) }),
        ),
        ("DELETE", ["branches", id]) => inner
            .delete_branch(id)
            .map(|(b, ops)| Response::ok(json!({ "branch": b, "operations": ops }))),
        ("POST", ["branches", id, "restore"]) => restore(inner, id, &req.body),
        ("GET", ["branches", id, "endpoints"]) => with_branch(inner, id, |s, b| {
            let eps: Vec<Value> = s
                .endpoints
                .iter()
                .filter(|e| e.branch_id == b)
                .map(endpoint_json)
                .collect();
            json!({ "endpoints": eps })
        }),
        ("GET", ["branches", id, "roles"]) => with_branch(
            inner,
            id,
            |s, b| json!({ "roles": [role_json(b, &s.branch(b).expect("checked").created_at)] }),
        ),
        ("GET", ["branches", id, "roles", ROLE]) => with_branch(
            inner,
            id,
            |s, b| json!({ "role": role_json(b, &s.branch(b).expect("checked").created_at) }),
        ),
        ("GET", ["branches", id, "roles", ROLE, "reveal_password"]) => {
            with_branch(inner, id, |_, _| json!({ "password": PASSWORD }))
        }
        ("GET", ["branches", _, "roles", role, ..]) => {
            Err(CloudError::NotFound(format!("role {role} not found")))
        }
        ("GET", ["branches", id, "databases"]) => with_branch(
            inner,
            id,
            |s, b| json!({ "databases": [database_json(b, &s.branch(b).expect("checked").created_at)] }),
        ),
        ("GET", ["endpoints"]) => {
            let s = inner.lock();
            let eps: Vec<Value> = s.endpoints.iter().map(endpoint_json).collect();
            Ok(Response::ok(json!({ "endpoints": eps })))
        }
        ("GET", ["endpoints", eid]) => match inner.lock().endpoint(eid) {
            Some(e) => Ok(Response::ok(json!({ "endpoint": endpoint_json(e) }))),
            None => Err(CloudError::NotFound(format!("endpoint {eid} not found"))),
        },
        ("POST", ["endpoints", eid, "start"]) => inner
            .ensure_running(eid, false)
            .map(|_| endpoint_change(inner, eid, "start_compute")),
        ("POST", ["endpoints", eid, "suspend"]) => inner
            .suspend(eid)
            .map(|_| endpoint_change(inner, eid, "suspend_compute")),
        ("GET", ["connection_uri"]) => connection_uri(&inner.lock(), req),
        ("GET", ["operations", op]) => match inner.lock().operations.get(*op) {
            Some(o) => Ok(Response::ok(json!({ "operation": op_json(op, o) }))),
            None => Err(CloudError::NotFound(format!("operation {op} not found"))),
        },
        _ => Err(CloudError::NotFound(format!(
            "no route for {} {}",
            req.method,
            req.path()
        ))),
    };
    result.unwrap_or_else(|e| match e {
        CloudError::BadRequest(m) => Response::error(400, m),
        CloudError::NotFound(m) => Response::error(404, m),
        CloudError::Conflict(m) => Response::error(422, m),
        CloudError::Internal(m) => Response::error(500, m),
    })
}

/// Answer from the state when branch `id` exists, else 404.
fn with_branch(
    inner: &Inner,
    id: &str,
    f: impl FnOnce(&State, &str) -> Value,
) -> Result<Response, CloudError> {
    let s = inner.lock();
    if s.branch(id).is_none() {
        return Err(CloudError::NotFound(format!("branch {id} not found")));
    }
    Ok(Response::ok(f(&s, id)))
}

/// Pages of at most `page_size` (small by default, so clients must follow
/// `pagination.next`). The cursor is the creation number of the page's
/// last branch.
fn list_branches(s: &State, req: &Request) -> Response {
    let limit = req
        .query("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .unwrap_or(usize::MAX)
        .clamp(1, s.page_size.max(1));
    let after: u64 = req
        .query("cursor")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let rest: Vec<_> = s.branches.iter().filter(|b| b.seq > after).collect();
    let page: Vec<Value> = rest.iter().take(limit).map(|b| branch_json(b)).collect();
    let next = if rest.len() > limit {
        json!(rest[limit - 1].seq.to_string())
    } else {
        Value::Null
    };
    Response::ok(json!({ "branches": page, "pagination": { "next": next } }))
}

fn text(v: &Value) -> Option<String> {
    v.as_str().map(str::to_string)
}

fn create_branch(inner: &Inner, body: &Value) -> Result<Response, CloudError> {
    let b = &body["branch"];
    if b["parent_timestamp"].is_string() && b["parent_lsn"].is_string() {
        return Err(CloudError::BadRequest(
            "parent_lsn and parent_timestamp are mutually exclusive".into(),
        ));
    }
    let mut endpoint = None;
    if let Some(eps) = body["endpoints"].as_array() {
        if eps.len() > 1 {
            return Err(CloudError::BadRequest(
                "a branch can have one read_write endpoint (read_only is not simulated)".into(),
            ));
        }
        for e in eps {
            if e["type"].as_str() != Some("read_write") {
                return Err(CloudError::BadRequest(format!(
                    "endpoint type {} is not simulated (only read_write)",
                    e["type"]
                )));
            }
            endpoint = Some(e["suspend_timeout_seconds"].as_i64().unwrap_or(300));
        }
    }
    let (branch, endpoints, operations) = inner.create_branch(NewBranch {
        name: text(&b["name"]),
        parent_id: text(&b["parent_id"]),
        parent_timestamp: text(&b["parent_timestamp"]),
        parent_lsn: text(&b["parent_lsn"]),
        expires_at: text(&b["expires_at"]),
        endpoint,
    })?;
    let branch_id = branch["id"].as_str().unwrap_or_default();
    let created = branch["created_at"].as_str().unwrap_or_default();
    let uris: Vec<Value> = endpoints
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let host = e["host"].as_str().unwrap_or_default();
            json!({
                "connection_uri": uri(host, DATABASE),
                "connection_parameters": {
                    "database": DATABASE, "role": ROLE, "password": PASSWORD,
                    "host": host, "pooler_host": pooler(host),
                },
            })
        })
        .collect();
    Ok(Response::with(
        201,
        json!({
            "branch": branch,
            "endpoints": endpoints,
            "operations": operations,
            "roles": [role_json(branch_id, created)],
            "databases": [database_json(branch_id, created)],
            "connection_uris": uris,
        }),
    ))
}

fn restore(inner: &Inner, id: &str, body: &Value) -> Result<Response, CloudError> {
    let Some(source) = body["source_branch_id"].as_str() else {
        return Err(CloudError::BadRequest(
            "source_branch_id is required".into(),
        ));
    };
    if body["source_timestamp"].is_string() || body["source_lsn"].is_string() {
        return Err(CloudError::BadRequest(
            "source_timestamp / source_lsn: point in time is not simulated by the stand-in".into(),
        ));
    }
    let preserve = text(&body["preserve_under_name"]).filter(|n| !n.is_empty());
    let (branch, ops) = inner.restore(id, source, preserve)?;
    Ok(Response::ok(json!({ "branch": branch, "operations": ops })))
}

fn endpoint_change(inner: &Inner, eid: &str, action: &str) -> Response {
    let mut s = inner.lock();
    let Some(branch_id) = s.endpoint(eid).map(|e| e.branch_id.clone()) else {
        return Response::error(404, format!("endpoint {eid} not found"));
    };
    let op = s.new_op(action, &branch_id, Some(eid));
    let ep = s.endpoint(eid).map(endpoint_json).unwrap_or(Value::Null);
    Response::ok(json!({ "endpoint": ep, "operations": [op] }))
}

fn uri(host: &str, database: &str) -> String {
    format!("postgresql://{ROLE}:{PASSWORD}@{host}/{database}?sslmode=require")
}

/// Neon's pooled host: `-pooler` after the endpoint id.
fn pooler(host: &str) -> String {
    match host.split_once('.') {
        Some((ep, domain)) => format!("{ep}-pooler.{domain}"),
        None => host.to_string(),
    }
}

/// `GET /connection_uri`: roles and databases are not read from the compute,
/// so only `neondb_owner` is known; any database name is accepted.
fn connection_uri(s: &State, req: &Request) -> Result<Response, CloudError> {
    let (Some(database), Some(role)) = (req.query("database_name"), req.query("role_name")) else {
        return Err(CloudError::BadRequest(
            "database_name and role_name are required".into(),
        ));
    };
    if role != ROLE {
        return Err(CloudError::NotFound(format!("role {role} not found")));
    }
    let branch = match req.query("branch_id") {
        Some(id) => s.branch(&id),
        None => s.default_branch(),
    }
    .ok_or_else(|| CloudError::NotFound("branch not found".into()))?;
    let ep = match req.query("endpoint_id") {
        Some(eid) => s.endpoint(&eid).filter(|e| e.branch_id == branch.id),
        None => s.endpoint_of(&branch.id),
    }
    .ok_or_else(|| CloudError::NotFound(format!("branch {} has no endpoint", branch.id)))?;
    let pooled = req.query("pooled").is_some_and(|p| p == "true");
    let host = if pooled {
        pooler(&ep.host())
    } else {
        ep.host()
    };
    debug_assert!(host.ends_with(HOST_SUFFIX));
    Ok(Response::ok(json!({ "uri": uri(&host, &database) })))
}
