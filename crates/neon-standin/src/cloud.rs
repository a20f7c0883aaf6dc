//! The cloud's operations — create, delete and restore branches, start and
//! suspend computes — over the shared state and (when there are any) the
//! real computes. Both the HTTP API and the SNI proxy call these.
//!
//! Locking: `state` is held only briefly, so listings and the proxy's
//! lookups never wait on a copy. Everything that starts, stops or copies a
//! server holds `compute_lock` (one at a time, which keeps the reasoning
//! simple: whoever holds it re-reads the state it acts on, since a branch
//! may have been deleted or restored while it waited).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use serde_json::{json, Value};

use crate::compute::Computes;
use crate::state::{branch_json, endpoint_json, now, State};

pub enum CloudError {
    /// 400: the request itself is wrong.
    BadRequest(String),
    /// 404
    NotFound(String),
    /// 422: the request conflicts with the project's state.
    Conflict(String),
    /// 500: a compute failed (the message says what the server logged).
    Internal(String),
}

pub struct Inner {
    pub state: Mutex<State>,
    pub computes: Option<Computes>,
    compute_lock: Mutex<()>,
    /// Set by `stop_all`: a connection still arriving must not start a
    /// compute after the stand-in was dropped.
    closed: AtomicBool,
}

/// What `POST /branches` asks for.
pub struct NewBranch {
    pub name: Option<String>,
    pub parent_id: Option<String>,
    pub parent_timestamp: Option<String>,
    pub parent_lsn: Option<String>,
    pub expires_at: Option<String>,
    /// `Some(suspend_timeout_seconds)` when a read-write endpoint is asked for.
    pub endpoint: Option<i64>,
}

fn relock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking test thread must not wedge every later request.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Inner {
    pub fn new(state: State, computes: Option<Computes>) -> Inner {
        Inner {
            state: Mutex::new(state),
            computes,
            compute_lock: Mutex::new(()),
            closed: AtomicBool::new(false),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        relock(&self.state)
    }

    fn compute_guard(&self) -> MutexGuard<'_, ()> {
        relock(&self.compute_lock)
    }

    /// The compute lock, unless the stand-in is shutting down.
    fn compute_guard_open(&self) -> Result<MutexGuard<'_, ()>, String> {
        let g = self.compute_guard();
        if self.closed.load(Ordering::SeqCst) {
            return Err("the stand-in is shutting down".into());
        }
        Ok(g)
    }

    /// Create the default branch "main" with an endpoint (and, with
    /// computes, initdb its data and start it).
    pub fn create_root(&self) -> Result<(), String> {
        let data = {
            let mut s = self.lock();
            let b = s.add_branch("main", None);
            b.default = true;
            let id = b.id.clone();
            s.add_endpoint(&id, 300);
            let gen = s.next_seq();
            let data = self.computes.as_ref().map(|c| c.data_dir(&id, gen));
            // Recorded before initdb, so `stop_all` stops a half-made root.
            s.branch_mut(&id).expect("root").data = data.clone();
            data
        };
        let port = match (&self.computes, &data) {
            (Some(c), Some(d)) => Some(c.init_root(d)?),
            _ => None,
        };
        let mut s = self.lock();
        let ep = s.endpoints.last_mut().expect("root endpoint");
        ep.port = port;
        ep.active = true;
        ep.starts = 1;
        ep.last_active = Some(now());
        Ok(())
    }

    /// `POST /branches`: returns (branch, endpoints, operations).
    pub fn create_branch(&self, new: NewBranch) -> Result<(Value, Value, Value), CloudError> {
        let (branch_id, endpoint_id, dst, ops) = {
            let mut s = self.lock();
            let parent = match &new.parent_id {
                Some(p) => s
                    .branch(p)
                    .ok_or_else(|| CloudError::NotFound(format!("branch {p} not found")))?,
                None => s.default_branch().ok_or_else(|| {
                    CloudError::Conflict("the project has no default branch".into())
                })?,
            };
            let parent_id = parent.id.clone();
            if let Some(name) = &new.name {
                if s.branch_by_name(name).is_some() {
                    return Err(CloudError::Conflict(format!(
                        "branch with name \"{name}\" already exists"
                    )));
                }
            }
            let with_computes = self.computes.is_some();
            let b = s.add_branch(new.name.as_deref().unwrap_or(""), Some(parent_id));
            if b.name.is_empty() {
                // Neon names an unnamed branch after its id.
                b.name = b.id.clone();
            }
            b.parent_timestamp = new.parent_timestamp;
            b.parent_lsn = new.parent_lsn;
            b.expires_at = new.expires_at;
            if with_computes {
                b.state = "init";
            }
            let branch_id = b.id.clone();
            let endpoint_id = new
                .endpoint
                .map(|t| s.add_endpoint(&branch_id, t).id.clone());
            let mut ops = vec![s.new_op("create_timeline", &branch_id, None)];
            if let Some(e) = &endpoint_id {
                ops.push(s.new_op("start_compute", &branch_id, Some(e)));
            }
            let gen = s.next_seq();
            let dst = self.computes.as_ref().map(|c| c.data_dir(&branch_id, gen));
            (branch_id, endpoint_id, dst, ops)
        };
        if let (Some(c), Some(dst)) = (&self.computes, dst) {
            let built = self.build_branch(c, &branch_id, endpoint_id.as_deref(), &dst);
            if let Err(e) = built {
                let _g = self.compute_guard();
                let _ = c.remove(&dst);
                let mut s = self.lock();
                s.branches.retain(|b| b.id != branch_id);
                s.endpoints.retain(|e| e.branch_id != branch_id);
                return Err(CloudError::Internal(e));
            }
        } else if let Some(e) = &endpoint_id {
            let mut s = self.lock();
            let ep = s.endpoint_mut(e).expect("just added");
            ep.active = true;
            ep.starts = 1;
            ep.last_active = Some(now());
        }
        let s = self.lock();
        let branch = s.branch(&branch_id).map(branch_json).unwrap_or(Value::Null);
        let endpoints: Vec<Value> = s
            .endpoints
            .iter()
            .filter(|e| e.branch_id == branch_id)
            .map(endpoint_json)
            .collect();
        Ok((branch, json!(endpoints), json!(ops)))
    }

    /// Copy the parent's current state into `dst` and start the endpoint.
    fn build_branch(
        &self,
        c: &Computes,
        branch_id: &str,
        endpoint_id: Option<&str>,
        dst: &Path,
    ) -> Result<(), String> {
        let _g = self.compute_guard_open()?;
        let (src, running) = {
            let s = self.lock();
            let b = s.branch(branch_id).ok_or("the branch was deleted")?;
            let parent = b
                .parent_id
                .as_deref()
                .and_then(|p| s.branch(p))
                .ok_or("the parent branch was deleted")?;
            let running = s.endpoint_of(&parent.id).and_then(|e| e.port);
            (
                parent.data.clone().ok_or("the parent has no data")?,
                running,
            )
        };
        c.copy(&src, running, dst)?;
        let port = match endpoint_id {
            Some(_) => Some(c.start(dst)?),
            None => None,
        };
        let mut s = self.lock();
        let b = s.branch_mut(branch_id).ok_or("the branch was deleted")?;
        b.data = Some(dst.to_path_buf());
        b.state = "ready";
        if let Some(e) = endpoint_id.and_then(|e| s.endpoint_mut(e)) {
            e.port = port;
            e.active = true;
            e.starts += 1;
            e.last_active = Some(now());
        }
        Ok(())
    }

    /// `DELETE /branches/{id}`: returns (branch, operations).
    pub fn delete_branch(&self, id: &str) -> Result<(Value, Value), CloudError> {
        let (branch, data, ops) = {
            let mut s = self.lock();
            let b = s
                .branch(id)
                .ok_or_else(|| CloudError::NotFound(format!("branch {id} not found")))?;
            if b.default {
                return Err(CloudError::Conflict(
                    "the default branch cannot be deleted".into(),
                ));
            }
            if s.has_children(id) {
                return Err(CloudError::Conflict(
                    "branch has children; delete them first".into(),
                ));
            }
            let (json, data) = (branch_json(b), b.data.clone());
            let mut ops = Vec::new();
            if let Some(e) = s.endpoint_of(id).map(|e| e.id.clone()) {
                ops.push(s.new_op("suspend_compute", id, Some(&e)));
            }
            ops.push(s.new_op("delete_timeline", id, None));
            // Gone from the state first: the proxy stops routing to it, and
            // a compute-lock holder that re-reads sees it deleted.
            s.branches.retain(|b| b.id != id);
            s.endpoints.retain(|e| e.branch_id != id);
            (json, data, ops)
        };
        if let (Some(c), Some(data)) = (&self.computes, data) {
            let _g = self.compute_guard();
            c.remove(&data).map_err(CloudError::Internal)?;
        }
        Ok((branch, json!(ops)))
    }

    /// `POST /branches/{id}/restore` from another branch's head.
    pub fn restore(
        &self,
        id: &str,
        source_id: &str,
        preserve_under_name: Option<String>,
    ) -> Result<(Value, Value), CloudError> {
        let (ops, dst) = {
            let mut s = self.lock();
            if s.branch(id).is_none() {
                return Err(CloudError::NotFound(format!("branch {id} not found")));
            }
            if source_id == id {
                return Err(CloudError::BadRequest(
                    "restoring a branch from its own history needs source_timestamp or \
                     source_lsn, which the stand-in does not simulate"
                        .into(),
                ));
            }
            if s.branch(source_id).is_none() {
                return Err(CloudError::NotFound(format!(
                    "source branch {source_id} not found"
                )));
            }
            if s.has_children(id) && preserve_under_name.is_none() {
                return Err(CloudError::BadRequest(
                    "the branch has children: preserve_under_name is required".into(),
                ));
            }
            if let Some(p) = &preserve_under_name {
                if s.branch_by_name(p).is_some() {
                    return Err(CloudError::Conflict(format!(
                        "branch with name \"{p}\" already exists"
                    )));
                }
            }
            s.restored.push(format!("{id}<-{source_id}"));
            let ep = s.endpoint_of(id).map(|e| e.id.clone());
            let mut ops = Vec::new();
            if let Some(e) = &ep {
                ops.push(s.new_op("suspend_compute", id, Some(e)));
            }
            ops.push(s.new_op("create_timeline", id, None));
            if let Some(e) = &ep {
                ops.push(s.new_op("start_compute", id, Some(e)));
            }
            let gen = s.next_seq();
            (ops, self.computes.as_ref().map(|c| c.data_dir(id, gen)))
        };
        let _g = self.compute_guard_open().map_err(CloudError::Internal)?;
        let mut old = match (&self.computes, &dst) {
            (Some(c), Some(dst)) => self.restore_data(c, id, source_id, dst)?,
            _ => None,
        };
        if preserve_under_name.is_none() {
            if let (Some(c), Some(o)) = (&self.computes, old.take()) {
                c.remove(&o).map_err(CloudError::Internal)?;
            }
        }
        let mut s = self.lock();
        let at = now();
        let parent = s.branch(id).and_then(|b| b.parent_id.clone());
        if let Some(p) = preserve_under_name {
            let kept = s.add_branch(&p, parent);
            kept.data = old;
            let kept_id = kept.id.clone();
            // Neon moves the children to the preserved (old) state.
            for b in s.branches.iter_mut() {
                if b.parent_id.as_deref() == Some(id) {
                    b.parent_id = Some(kept_id.clone());
                }
            }
        }
        let b = s
            .branch_mut(id)
            .ok_or_else(|| CloudError::NotFound(format!("branch {id} not found")))?;
        b.last_reset_at = Some(at.clone());
        b.updated_at = at;
        Ok((branch_json(b), json!(ops)))
    }

    /// The compute side of a restore (compute lock held): copy the source
    /// into `dst`, swap it in, restart the endpoint if it ran. Returns the
    /// old data directory when it is to be preserved, else deletes it.
    fn restore_data(
        &self,
        c: &Computes,
        id: &str,
        source_id: &str,
        dst: &Path,
    ) -> Result<Option<PathBuf>, CloudError> {
        let gone = || CloudError::NotFound(format!("branch {id} not found"));
        let (src, src_port, old, was_running) = {
            let s = self.lock();
            let b = s.branch(id).ok_or_else(gone)?;
            let src = s.branch(source_id).ok_or_else(gone)?;
            (
                src.data.clone(),
                s.endpoint_of(source_id).and_then(|e| e.port),
                b.data.clone(),
                s.endpoint_of(id).is_some_and(|e| e.port.is_some()),
            )
        };
        let src = src.ok_or_else(|| CloudError::Internal("the source has no data".into()))?;
        // Copy first: the source may be this branch's parent, and the old
        // state stays served until the new one is ready.
        c.copy(&src, src_port, dst).map_err(CloudError::Internal)?;
        if let Some(old) = &old {
            c.stop(old).map_err(CloudError::Internal)?;
        }
        let port = if was_running {
            Some(c.start(dst).map_err(CloudError::Internal)?)
        } else {
            None
        };
        let mut s = self.lock();
        if let Some(b) = s.branch_mut(id) {
            b.data = Some(dst.to_path_buf());
        }
        if let Some(e) = s.endpoints.iter_mut().find(|e| e.branch_id == id) {
            e.port = port;
            e.active = port.is_some();
            if port.is_some() {
                e.starts += 1;
                e.last_active = Some(now());
            }
        }
        Ok(old)
    }

    /// Make sure the endpoint's compute runs; returns its port (`None` in
    /// API-only mode, where only the endpoint's state changes). `cold`
    /// adds the configured cold-start delay when it has to start.
    pub fn ensure_running(&self, endpoint_id: &str, cold: bool) -> Result<Option<u16>, CloudError> {
        let gone = || CloudError::NotFound(format!("endpoint {endpoint_id} not found"));
        let delay = {
            let mut s = self.lock();
            let delay = s.cold_start;
            let ep = s.endpoint_mut(endpoint_id).ok_or_else(gone)?;
            if let Some(p) = ep.port {
                return Ok(Some(p));
            }
            if self.computes.is_none() {
                if !ep.active {
                    ep.active = true;
                    ep.starts += 1;
                }
                ep.last_active = Some(now());
                return Ok(None);
            }
            delay
        };
        if cold {
            std::thread::sleep(delay);
        }
        let c = self.computes.as_ref().expect("computes mode");
        let _g = self.compute_guard_open().map_err(CloudError::Internal)?;
        let data = {
            let s = self.lock();
            let ep = s.endpoint(endpoint_id).ok_or_else(gone)?;
            if let Some(p) = ep.port {
                return Ok(Some(p));
            }
            s.branch(&ep.branch_id)
                .and_then(|b| b.data.clone())
                .ok_or_else(gone)?
        };
        let port = c.start(&data).map_err(CloudError::Internal)?;
        let mut s = self.lock();
        let ep = s.endpoint_mut(endpoint_id).ok_or_else(gone)?;
        ep.port = Some(port);
        ep.active = true;
        ep.starts += 1;
        ep.last_active = Some(now());
        Ok(Some(port))
    }

    /// Stop the endpoint's compute; its state becomes "idle".
    pub fn suspend(&self, endpoint_id: &str) -> Result<(), CloudError> {
        let gone = || CloudError::NotFound(format!("endpoint {endpoint_id} not found"));
        let _g = self.compute_guard();
        let data = {
            let s = self.lock();
            let ep = s.endpoint(endpoint_id).ok_or_else(gone)?;
            s.branch(&ep.branch_id).and_then(|b| b.data.clone())
        };
        if let (Some(c), Some(data)) = (&self.computes, data) {
            c.stop(&data).map_err(CloudError::Internal)?;
        }
        let mut s = self.lock();
        let ep = s.endpoint_mut(endpoint_id).ok_or_else(gone)?;
        ep.port = None;
        ep.active = false;
        Ok(())
    }

    /// Stop every compute (in parallel: each fast shutdown takes a moment).
    pub fn stop_all(&self) {
        let Some(c) = &self.computes else { return };
        let _g = self.compute_guard();
        self.closed.store(true, Ordering::SeqCst);
        let dirs: Vec<PathBuf> = self
            .lock()
            .branches
            .iter()
            .filter_map(|b| b.data.clone())
            .collect();
        std::thread::scope(|scope| {
            for d in &dirs {
                scope.spawn(move || {
                    let _ = c.stop(d);
                });
            }
        });
        let mut s = self.lock();
        for e in s.endpoints.iter_mut() {
            e.port = None;
            e.active = false;
        }
    }
}
