//! A client for Neon's API v2 (<https://api-docs.neon.tech>): the branch
//! operations pgtwig needs — create (from a parent, optionally at a time or
//! LSN, with a read-write endpoint), list (all pages), get, delete, restore
//! from the parent — and waiting for the operations a call starts.
//!
//! Transient failures (429, 5xx, connection errors) are retried with
//! backoff, honouring `Retry-After`. 401/403/404/422 become errors that say
//! what to check. The API key comes from `NEON_API_KEY` or neonctl's
//! credentials file, and never appears in errors, logs or `Debug` output.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::blocking::{Client, Response};
use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

pub const DEFAULT_BASE_URL: &str = "https://console.neon.tech/api/v2";

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
    #[error("Neon has no {what} (404): check the project id in .pgtwig.toml and the branch name")]
    NotFound { what: String },
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
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: String,
    pub host: String,
    #[serde(default)]
    pub branch_id: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
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
        let Some(parent) = &branch.parent_id else {
            return Err(NeonError::Invalid {
                what: format!("resetting branch \"{}\"", branch.name),
                message: "it has no parent".into(),
            });
        };
        let what = format!("resetting branch \"{}\"", branch.name);
        let body = json!({ "source_branch_id": parent });
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
        StatusCode::NOT_FOUND => NeonError::NotFound { what: what.into() },
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
