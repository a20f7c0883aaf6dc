//! The HTTP client for Neon's API v2: requests, retries, errors, and the
//! shapes pgtwig reads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// An API key that prints as `***`.
#[derive(Clone)]
pub struct ApiKey(String);

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl ApiKey {
    pub fn new(key: impl Into<String>) -> ApiKey {
        ApiKey(key.into())
    }

    /// `NEON_API_KEY`, else `access_token` in neonctl's
    /// `<config dir>/neonctl/credentials.json`.
    pub fn from_environment() -> Result<ApiKey, NeonError> {
        if let Ok(k) = std::env::var("NEON_API_KEY") {
            if !k.trim().is_empty() {
                return Ok(ApiKey(k.trim().to_string()));
            }
        }
        let path = dirs::config_dir().map(|d| d.join("neonctl").join("credentials.json"));
        if let Some(p) = &path {
            if let Ok(text) = std::fs::read_to_string(p) {
                if let Some(t) = serde_json::from_str::<Value>(&text)
                    .ok()
                    .and_then(|v| v["access_token"].as_str().map(str::to_string))
                {
                    return Ok(ApiKey(t));
                }
            }
        }
        Err(NeonError::NoApiKey { looked_in: path })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NeonError {
    #[error("no Neon API key: set NEON_API_KEY (create one at https://console.neon.tech/app/settings/api-keys){}",
        .looked_in.as_ref().map(|p| format!(", or log in with neonctl (looked in {})", p.display())).unwrap_or_default())]
    NoApiKey { looked_in: Option<PathBuf> },
    #[error("Neon refused the API key (401): check NEON_API_KEY is current and not revoked")]
    Unauthorized,
    #[error("Neon denied {what} (403): the API key has no access to project {project}; check the key's organization and project")]
    Forbidden { what: String, project: String },
    #[error("Neon answered 404 Not Found to {what} in project {project}: check the project id ([neon] project_id in .pgtwig.toml, or --neon-project) and the branch name")]
    NotFound { what: String, project: String },
    #[error("Neon rejected {what} (422): {message}")]
    Invalid { what: String, message: String },
    #[error("Neon API error on {what} ({status}): {message}")]
    Api {
        what: String,
        status: u16,
        message: String,
    },
    #[error("cannot reach the Neon API at {base}: {message}")]
    Unreachable { base: String, message: String },
    #[error("Neon operation {id} ({action}) {status}")]
    OperationFailed {
        id: String,
        action: String,
        status: String,
    },
    #[error("Neon operations did not finish within {0:?}")]
    Timeout(Duration),
    #[error("database branch \"{name}\" does not exist in Neon project {project}{}",
        match pgtwig_core::names::did_you_mean(name, .known.iter().map(String::as_str)) {
            Some(meant) => format!("; did you mean \"{meant}\"? (`pgtwig branch list` shows them all)"),
            None => "; `pgtwig branch list` shows the branches".to_string(),
        })]
    NoBranch {
        name: String,
        project: String,
        /// The project's branch names, for a "did you mean" (empty when not listed).
        known: Vec<String>,
    },
    #[error("database branch \"{name}\" already exists in Neon project {project}")]
    Exists { name: String, project: String },
    /// pgtwig refuses the operation; the message says why and what to do.
    #[error("{0}")]
    Refused(String),
    #[error("cannot keep pgtwig's notes on Neon branches in {path}: {message}")]
    Notes { path: String, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Branch {
    pub id: String,
    pub name: String,
    #[serde(default)]
    pub parent_id: Option<String>,
    #[serde(default)]
    pub created_at: Option<String>,
    #[serde(default)]
    pub current_state: Option<String>,
    #[serde(default)]
    pub expires_at: Option<String>,
    /// The project's default branch (older API versions say `primary`).
    #[serde(default)]
    pub default: bool,
    #[serde(default)]
    pub primary: bool,
}

impl Branch {
    pub fn is_default(&self) -> bool {
        self.default || self.primary
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub host: String,
    #[serde(default)]
    pub branch_id: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// "active", "idle" (suspended) or "init".
    #[serde(default)]
    pub current_state: Option<String>,
}

impl Endpoint {
    pub fn is_read_write(&self) -> bool {
        self.kind.as_deref().is_none_or(|k| k == "read_write")
    }
}

/// A Postgres role of a branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Role {
    pub name: String,
    #[serde(default)]
    pub protected: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    pub id: String,
    #[serde(default)]
    pub action: String,
    pub status: String,
}

/// Where a new branch starts from its parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PointInTime {
    Head,
    Timestamp(String),
    Lsn(String),
}

/// Options for [`NeonClient::create_branch`].
#[derive(Debug, Clone)]
pub struct NewBranch<'a> {
    pub name: &'a str,
    pub parent_id: Option<&'a str>,
    pub at: PointInTime,
    /// Seconds of inactivity before Neon suspends the compute.
    pub suspend_timeout_seconds: Option<u64>,
    /// RFC 3339: Neon deletes the branch then (branch expiration).
    pub expires_at: Option<String>,
}

pub struct NeonClient {
    base: String,
    key: ApiKey,
    http: Client,
    /// Total time spent retrying one call before giving up.
    pub retry_budget: Duration,
    /// How long to wait for operations to finish.
    pub operation_timeout: Duration,
}

impl std::fmt::Debug for NeonClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeonClient")
            .field("base", &self.base)
            .field("key", &self.key)
            .finish()
    }
}

impl NeonClient {
    pub fn new(base: &str, key: ApiKey) -> NeonClient {
        NeonClient {
            base: base.trim_end_matches('/').to_string(),
            key,
            http: Client::builder()
                .timeout(Duration::from_secs(60))
                .user_agent(concat!("pgtwig/", env!("CARGO_PKG_VERSION")))
                .build()
                .expect("an HTTP client"),
            retry_budget: Duration::from_secs(120),
            operation_timeout: Duration::from_secs(300),
        }
    }

    /// Send a request, retrying 429/5xx/connection errors with backoff.
    fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        what: &str,
        project: &str,
    ) -> Result<Value, NeonError> {
        let url = format!("{}{path}", self.base);
        let started = Instant::now();
        let mut delay = Duration::from_millis(250);
        loop {
            let mut req = self
                .http
                .request(method.clone(), &url)
                .bearer_auth(&self.key.0)
                .header("Accept", "application/json");
            if let Some(b) = body {
                req = req.json(b);
            }
            let wait = match req.send() {
                Ok(resp) if resp.status().is_success() => {
                    return resp.json::<Value>().map_err(|e| NeonError::Api {
                        what: what.into(),
                        status: 200,
                        message: format!("unreadable response: {e}"),
                    });
                }
                Ok(resp)
                    if resp.status() == StatusCode::TOO_MANY_REQUESTS
                        || resp.status().is_server_error() =>
                {
                    let after = retry_after(&resp).unwrap_or(delay);
                    if started.elapsed() + after > self.retry_budget {
                        return Err(error_for(resp, what, project));
                    }
                    after
                }
                Ok(resp) => return Err(error_for(resp, what, project)),
                Err(e) => {
                    if started.elapsed() + delay > self.retry_budget {
                        return Err(NeonError::Unreachable {
                            base: self.base.clone(),
                            message: e.without_url().to_string(),
                        });
                    }
                    delay
                }
            };
            std::thread::sleep(wait);
            delay = (delay * 2).min(Duration::from_secs(10));
        }
    }

    /// Create a branch with a read-write endpoint; waits for its operations.
    pub fn create_branch(
        &self,
        project: &str,
        new: &NewBranch,
    ) -> Result<(Branch, Vec<Endpoint>), NeonError> {
        let mut branch = json!({ "name": new.name });
        if let Some(p) = new.parent_id {
            branch["parent_id"] = json!(p);
        }
        match &new.at {
            PointInTime::Head => {}
            PointInTime::Timestamp(t) => branch["parent_timestamp"] = json!(t),
            PointInTime::Lsn(l) => branch["parent_lsn"] = json!(l),
        }
        if let Some(e) = &new.expires_at {
            branch["expires_at"] = json!(e);
        }
        let mut endpoint = json!({ "type": "read_write" });
        if let Some(s) = new.suspend_timeout_seconds {
            endpoint["suspend_timeout_seconds"] = json!(s);
        }
        let body = json!({ "branch": branch, "endpoints": [endpoint] });
        let what = format!("creating branch \"{}\"", new.name);
        let v = self.call(
            Method::POST,
            &format!("/projects/{project}/branches"),
            Some(&body),
            &what,
            project,
        )?;
        self.wait(project, &v["operations"])?;
        let branch: Branch = parse(&v["branch"], &what)?;
        let endpoints: Vec<Endpoint> = parse(&v["endpoints"], &what)?;
        Ok((branch, endpoints))
    }

    /// All branches of the project, following pagination cursors.
    pub fn list_branches(&self, project: &str) -> Result<Vec<Branch>, NeonError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/projects/{project}/branches?limit=100&cursor={c}"),
                None => format!("/projects/{project}/branches?limit=100"),
            };
            let v = self.call(Method::GET, &path, None, "listing branches", project)?;
            let page: Vec<Branch> = parse(&v["branches"], "listing branches")?;
            let empty = page.is_empty();
            out.extend(page);
            let next = v["pagination"]["next"]
                .as_str()
                .or_else(|| v["pagination"]["cursor"].as_str())
                .map(str::to_string);
            match next {
                Some(n) if !empty && Some(&n) != cursor.as_ref() => cursor = Some(n),
                _ => return Ok(out),
            }
        }
    }

    pub fn get_branch(&self, project: &str, branch_id: &str) -> Result<Branch, NeonError> {
        let what = format!("branch {branch_id}");
        let v = self.call(
            Method::GET,
            &format!("/projects/{project}/branches/{branch_id}"),
            None,
            &what,
            project,
        )?;
        parse(&v["branch"], &what)
    }

    /// The branch called `name`, if any.
    pub fn find_branch(&self, project: &str, name: &str) -> Result<Option<Branch>, NeonError> {
        Ok(self
            .list_branches(project)?
            .into_iter()
            .find(|b| b.name == name))
    }

    pub fn delete_branch(&self, project: &str, branch_id: &str) -> Result<(), NeonError> {
        let what = format!("deleting branch {branch_id}");
        let v = self.call(
            Method::DELETE,
            &format!("/projects/{project}/branches/{branch_id}"),
            None,
            &what,
            project,
        )?;
        self.wait(project, &v["operations"])
    }

    /// Reset a branch to its parent's current state (Neon's restore from the parent).
    pub fn reset_to_parent(&self, project: &str, branch: &Branch) -> Result<(), NeonError> {
        self.restore_from_parent(project, branch, None)
    }

    /// [`reset_to_parent`](Self::reset_to_parent), keeping the old state as
    /// a new branch called `preserve_under_name` when given.
    pub fn restore_from_parent(
        &self,
        project: &str,
        branch: &Branch,
        preserve_under_name: Option<&str>,
    ) -> Result<(), NeonError> {
        let Some(parent) = &branch.parent_id else {
            return Err(NeonError::Invalid {
                what: format!("resetting branch \"{}\"", branch.name),
                message: "it has no parent".into(),
            });
        };
        let what = format!("resetting branch \"{}\"", branch.name);
        let mut body = json!({ "source_branch_id": parent });
        if let Some(p) = preserve_under_name {
            body["preserve_under_name"] = json!(p);
        }
        let v = self.call(
            Method::POST,
            &format!("/projects/{project}/branches/{}/restore", branch.id),
            Some(&body),
            &what,
            project,
        )?;
        self.wait(project, &v["operations"])
    }

    pub fn endpoints(&self, project: &str, branch_id: &str) -> Result<Vec<Endpoint>, NeonError> {
        let what = format!("endpoints of branch {branch_id}");
        let v = self.call(
            Method::GET,
            &format!("/projects/{project}/branches/{branch_id}/endpoints"),
            None,
            &what,
            project,
        )?;
        parse(&v["endpoints"], &what)
    }

    /// Every endpoint of the project (one call, for listings).
    pub fn list_endpoints(&self, project: &str) -> Result<Vec<Endpoint>, NeonError> {
        let v = self.call(
            Method::GET,
            &format!("/projects/{project}/endpoints"),
            None,
            "listing endpoints",
            project,
        )?;
        parse(&v["endpoints"], "listing endpoints")
    }

    pub fn get_endpoint(&self, project: &str, endpoint_id: &str) -> Result<Endpoint, NeonError> {
        let what = format!("endpoint {endpoint_id}");
        let v = self.call(
            Method::GET,
            &format!("/projects/{project}/endpoints/{endpoint_id}"),
            None,
            &what,
            project,
        )?;
        parse(&v["endpoint"], &what)
    }

    /// Start a suspended compute and wait until it runs.
    pub fn start_endpoint(&self, project: &str, endpoint_id: &str) -> Result<(), NeonError> {
        let what = format!("starting endpoint {endpoint_id}");
        let v = self.call(
            Method::POST,
            &format!("/projects/{project}/endpoints/{endpoint_id}/start"),
            None,
            &what,
            project,
        )?;
        self.wait(project, &v["operations"])
    }

    pub fn roles(&self, project: &str, branch_id: &str) -> Result<Vec<Role>, NeonError> {
        let what = format!("roles of branch {branch_id}");
        let v = self.call(
            Method::GET,
            &format!("/projects/{project}/branches/{branch_id}/roles"),
            None,
            &what,
            project,
        )?;
        parse(&v["roles"], &what)
    }

    /// A connection string with the role's password, straight to the branch's endpoint.
    pub fn connection_uri(
        &self,
        project: &str,
        branch_id: &str,
        database: &str,
        role: &str,
    ) -> Result<String, NeonError> {
        let what = format!("the connection string of branch {branch_id}");
        let v = self.call(
            Method::GET,
            &format!(
                "/projects/{project}/connection_uri?branch_id={}&database_name={}&role_name={}",
                query_value(branch_id),
                query_value(database),
                query_value(role)
            ),
            None,
            &what,
            project,
        )?;
        parse(&v["uri"], &what)
    }

    /// Wait until every operation in `ops` has finished (or one failed).
    pub fn wait(&self, project: &str, ops: &Value) -> Result<(), NeonError> {
        let ops: Vec<Operation> = serde_json::from_value(ops.clone()).unwrap_or_default();
        let deadline = Instant::now() + self.operation_timeout;
        for mut op in ops {
            let mut delay = Duration::from_millis(100);
            loop {
                match op.status.as_str() {
                    "finished" | "skipped" => break,
                    "failed" | "error" | "cancelled" => {
                        return Err(NeonError::OperationFailed {
                            id: op.id,
                            action: op.action,
                            status: op.status,
                        })
                    }
                    _ => {}
                }
                if Instant::now() > deadline {
                    return Err(NeonError::Timeout(self.operation_timeout));
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(2));
                let what = format!("operation {}", op.id);
                let v = self.call(
                    Method::GET,
                    &format!("/projects/{project}/operations/{}", op.id),
                    None,
                    &what,
                    project,
                )?;
                op = parse(&v["operation"], &what)?;
            }
        }
        Ok(())
    }
}

fn parse<T: serde::de::DeserializeOwned>(v: &Value, what: &str) -> Result<T, NeonError> {
    serde_json::from_value(v.clone()).map_err(|e| NeonError::Api {
        what: what.into(),
        status: 200,
        message: format!("unexpected response shape: {e}"),
    })
}

/// Percent-encode a query parameter value (RFC 3986 unreserved kept).
fn query_value(v: &str) -> String {
    let mut out = String::new();
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn retry_after(resp: &Response) -> Option<Duration> {
    let v = resp.headers().get("retry-after")?.to_str().ok()?;
    v.trim().parse::<u64>().ok().map(Duration::from_secs)
}

fn error_for(resp: Response, what: &str, project: &str) -> NeonError {
    let status = resp.status();
    let message = resp
        .json::<Value>()
        .ok()
        .and_then(|v| v["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| status.canonical_reason().unwrap_or("").to_string());
    match status {
        StatusCode::UNAUTHORIZED => NeonError::Unauthorized,
        StatusCode::FORBIDDEN => NeonError::Forbidden {
            what: what.into(),
            project: project.into(),
        },
        StatusCode::NOT_FOUND => NeonError::NotFound {
            what: what.into(),
            project: project.into(),
        },
        StatusCode::UNPROCESSABLE_ENTITY | StatusCode::BAD_REQUEST | StatusCode::CONFLICT => {
            NeonError::Invalid {
                what: what.into(),
                message,
            }
        }
        s => NeonError::Api {
            what: what.into(),
            status: s.as_u16(),
            message,
        },
    }
}
