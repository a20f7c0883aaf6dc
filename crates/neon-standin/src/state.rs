//! What the stand-in's "cloud" knows: branches, endpoints, operations, and
//! the knobs tests turn. Rendered as JSON in the shapes of Neon's API v2
//! reference (Branch, Endpoint, Operation, Project objects).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Value};

pub const PROJECT_ID: &str = "proj-1";
pub const API_KEY: &str = "test-key";
pub const ROLE: &str = "neondb_owner";
pub const DATABASE: &str = "neondb";
/// Neon's generated passwords start with `npg_`; a fixed one keeps
/// `role()` a `&'static str`.
pub const PASSWORD: &str = "npg_StandIn4Tests";
pub const HOST_SUFFIX: &str = ".neon.test";
/// How long an operation reports "running" before "finished".
pub const OPERATION_TIME: Duration = Duration::from_millis(300);

/// Words for ids, so ids read like Neon's (`br-wispy-meadow-…`) and tests
/// cannot rely on them being numbers.
const WORDS: [&str; 8] = [
    "misty", "quiet", "bold", "frosty", "autumn", "silent", "wild", "lucky",
];

pub struct BranchRec {
    pub id: String,
    pub name: String,
    pub parent_id: Option<String>,
    /// Creation order; pagination cursors are built from it, so deleting a
    /// branch between two pages does not shift the next page.
    pub seq: u64,
    pub default: bool,
    /// "init" while its data is being copied, then "ready".
    pub state: &'static str,
    pub created_at: String,
    pub updated_at: String,
    pub expires_at: Option<String>,
    pub parent_timestamp: Option<String>,
    pub parent_lsn: Option<String>,
    pub last_reset_at: Option<String>,
    /// The data directory (computes mode only).
    pub data: Option<PathBuf>,
}

pub struct EndpointRec {
    pub id: String,
    pub branch_id: String,
    pub suspend_timeout_seconds: i64,
    /// "active" or "idle"; in computes mode active exactly when `port` is set.
    pub active: bool,
    /// The running compute's TCP port.
    pub port: Option<u16>,
    pub starts: usize,
    pub created_at: String,
    pub last_active: Option<String>,
}

impl EndpointRec {
    pub fn host(&self) -> String {
        format!("{}{HOST_SUFFIX}", self.id)
    }
}

pub struct OpRec {
    pub action: String,
    pub branch_id: String,
    pub endpoint_id: Option<String>,
    pub started: Instant,
    pub created_at: String,
}

pub struct State {
    pub branches: Vec<BranchRec>,
    pub endpoints: Vec<EndpointRec>,
    pub operations: HashMap<String, OpRec>,
    seq: u64,
    pub throttle: u32,
    pub fail_once: bool,
    pub requests: Vec<String>,
    pub restored: Vec<String>,
    pub page_size: usize,
    pub cold_start: Duration,
}

pub fn now() -> String {
    humantime::format_rfc3339_seconds(SystemTime::now()).to_string()
}

impl State {
    pub fn new() -> State {
        State {
            branches: Vec::new(),
            endpoints: Vec::new(),
            operations: HashMap::new(),
            seq: 0,
            throttle: 0,
            fail_once: false,
            requests: Vec::new(),
            restored: Vec::new(),
            // Small pages, so clients must follow cursors.
            page_size: 2,
            cold_start: Duration::from_millis(500),
        }
    }

    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// `br-misty-3`, `ep-bold-4`: a prefix, a word, a unique number.
    pub fn new_id(&mut self, prefix: &str) -> String {
        let n = self.next_seq();
        format!("{prefix}-{}-{n}", WORDS[n as usize % WORDS.len()])
    }

    pub fn add_branch(&mut self, name: &str, parent_id: Option<String>) -> &mut BranchRec {
        let id = self.new_id("br");
        let seq = self.seq;
        let at = now();
        self.branches.push(BranchRec {
            id,
            name: name.to_string(),
            parent_id,
            seq,
            default: false,
            state: "ready",
            created_at: at.clone(),
            updated_at: at,
            expires_at: None,
            parent_timestamp: None,
            parent_lsn: None,
            last_reset_at: None,
            data: None,
        });
        self.branches.last_mut().expect("just pushed")
    }

    pub fn add_endpoint(&mut self, branch_id: &str, suspend_timeout_seconds: i64) -> &EndpointRec {
        let id = self.new_id("ep");
        self.endpoints.push(EndpointRec {
            id,
            branch_id: branch_id.to_string(),
            suspend_timeout_seconds,
            active: false,
            port: None,
            starts: 0,
            created_at: now(),
            last_active: None,
        });
        self.endpoints.last().expect("just pushed")
    }

    pub fn branch(&self, id: &str) -> Option<&BranchRec> {
        self.branches.iter().find(|b| b.id == id)
    }

    pub fn branch_mut(&mut self, id: &str) -> Option<&mut BranchRec> {
        self.branches.iter_mut().find(|b| b.id == id)
    }

    pub fn branch_by_name(&self, name: &str) -> Option<&BranchRec> {
        self.branches.iter().find(|b| b.name == name)
    }

    pub fn default_branch(&self) -> Option<&BranchRec> {
        self.branches.iter().find(|b| b.default)
    }

    pub fn endpoint(&self, id: &str) -> Option<&EndpointRec> {
        self.endpoints.iter().find(|e| e.id == id)
    }

    pub fn endpoint_mut(&mut self, id: &str) -> Option<&mut EndpointRec> {
        self.endpoints.iter_mut().find(|e| e.id == id)
    }

    /// The branch's read-write endpoint (Neon allows one per branch).
    pub fn endpoint_of(&self, branch_id: &str) -> Option<&EndpointRec> {
        self.endpoints.iter().find(|e| e.branch_id == branch_id)
    }

    pub fn has_children(&self, branch_id: &str) -> bool {
        self.branches
            .iter()
            .any(|b| b.parent_id.as_deref() == Some(branch_id))
    }

    /// Record an operation; it reports "running" for [`OPERATION_TIME`].
    pub fn new_op(&mut self, action: &str, branch_id: &str, endpoint_id: Option<&str>) -> Value {
        let n = self.next_seq();
        // Neon's operation ids are UUIDs.
        let id = format!("00000000-0000-4000-8000-{n:012x}");
        let rec = OpRec {
            action: action.to_string(),
            branch_id: branch_id.to_string(),
            endpoint_id: endpoint_id.map(str::to_string),
            started: Instant::now(),
            created_at: now(),
        };
        let v = op_json(&id, &rec);
        self.operations.insert(id, rec);
        v
    }
}

pub fn op_json(id: &str, op: &OpRec) -> Value {
    let elapsed = op.started.elapsed();
    let status = if elapsed >= OPERATION_TIME {
        "finished"
    } else {
        "running"
    };
    json!({
        "id": id,
        "project_id": PROJECT_ID,
        "branch_id": op.branch_id,
        "endpoint_id": op.endpoint_id,
        "action": op.action,
        "status": status,
        "failures_count": 0,
        "created_at": op.created_at,
        "updated_at": op.created_at,
        "total_duration_ms": elapsed.min(OPERATION_TIME).as_millis() as u64,
    })
}

pub fn branch_json(b: &BranchRec) -> Value {
    let mut v = json!({
        "id": b.id,
        "project_id": PROJECT_ID,
        "name": b.name,
        "current_state": b.state,
        "state_changed_at": b.updated_at,
        "default": b.default,
        "primary": b.default,
        "protected": false,
        "logical_size": 30 * 1024 * 1024,
        "creation_source": "console",
        "created_at": b.created_at,
        "updated_at": b.updated_at,
    });
    let optional = [
        ("parent_id", &b.parent_id),
        ("parent_timestamp", &b.parent_timestamp),
        ("parent_lsn", &b.parent_lsn),
        ("expires_at", &b.expires_at),
        ("last_reset_at", &b.last_reset_at),
    ];
    for (key, value) in optional {
        if let Some(s) = value {
            v[key] = json!(s);
        }
    }
    v
}

pub fn endpoint_json(e: &EndpointRec) -> Value {
    json!({
        "id": e.id,
        "host": e.host(),
        "project_id": PROJECT_ID,
        "branch_id": e.branch_id,
        "type": "read_write",
        "current_state": if e.active { "active" } else { "idle" },
        "region_id": "aws-us-east-2",
        "autoscaling_limit_min_cu": 0.25,
        "autoscaling_limit_max_cu": 0.25,
        "suspend_timeout_seconds": e.suspend_timeout_seconds,
        "pooler_enabled": false,
        "pooler_mode": "transaction",
        "disabled": false,
        "passwordless_access": false,
        "provisioner": "k8s-neonvm",
        "proxy_host": HOST_SUFFIX.trim_start_matches('.'),
        "settings": {},
        "creation_source": "console",
        "created_at": e.created_at,
        "updated_at": e.last_active.as_deref().unwrap_or(&e.created_at),
        "last_active": e.last_active,
    })
}

pub fn project_json() -> Value {
    json!({
        "id": PROJECT_ID,
        "name": "pgtwig stand-in",
        "region_id": "aws-us-east-2",
        "platform_id": "aws",
        "pg_version": 15,
        "proxy_host": HOST_SUFFIX.trim_start_matches('.'),
        "history_retention_seconds": 86400,
        "provisioner": "k8s-neonvm",
        "store_passwords": true,
        "creation_source": "console",
        "created_at": "2026-01-01T00:00:00Z",
        "updated_at": "2026-01-01T00:00:00Z",
    })
}

pub fn role_json(branch_id: &str, created_at: &str) -> Value {
    json!({
        "branch_id": branch_id,
        "name": ROLE,
        "protected": false,
        "created_at": created_at,
        "updated_at": created_at,
    })
}

pub fn database_json(branch_id: &str, created_at: &str) -> Value {
    json!({
        "id": 1,
        "branch_id": branch_id,
        "name": DATABASE,
        "owner_name": ROLE,
        "created_at": created_at,
        "updated_at": created_at,
    })
}
