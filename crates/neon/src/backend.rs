//! pgtwig's branch operations on a Neon project: what the CLI and the daemon
//! call when `backend = "neon"`. Neon holds the branches and their data;
//! pgtwig keeps one small file of notes Neon has no field for (which git
//! branch made a branch), so `gc` can collect branches whose git branch is
//! gone.
//!
//! Names are Neon's branch names. Neon makes and deletes a branch in one
//! step, so a crash can never leave half a branch; the notes are written
//! before a branch is made and are harmless when it never was.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use pgtwig_core::fsutil::{write_atomic, ProjectLock};
use pgtwig_core::ProjectHome;
use serde::{Deserialize, Serialize};

use crate::client::{Branch, Endpoint, NeonClient, NeonError, NewBranch, PointInTime};

/// A Neon branch as pgtwig shows it.
#[derive(Debug, Clone)]
pub struct NeonBranch {
    pub branch: Branch,
    /// The parent's name; `None` for the root (or a parent since deleted, see `parent_id`).
    pub parent_name: Option<String>,
    /// Its read-write compute, if it has one.
    pub endpoint: Option<Endpoint>,
    /// The git branch whose checkout made it.
    pub git_branch: Option<String>,
    /// Made by a `protected = true` rule: `gc` keeps it.
    pub protected: bool,
}

impl NeonBranch {
    /// "active", "idle" (suspended by Neon), "init", or "no compute".
    pub fn compute_state(&self) -> &str {
        match &self.endpoint {
            Some(e) => e.current_state.as_deref().unwrap_or("unknown"),
            None => "no compute",
        }
    }
}

/// The notes file: branch name → what Neon does not keep for us.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Notes {
    #[serde(default)]
    branches: BTreeMap<String, Note>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct Note {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    git_branch: Option<String>,
    /// Made by a `protected = true` rule (recorded then, so that `gc` does not depend on
    /// the configuration checked out later).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    protected: bool,
}

pub struct NeonBackend {
    client: NeonClient,
    project: String,
    home: ProjectHome,
    /// For new branches' computes (Neon's default when `None`).
    pub suspend_timeout: Option<Duration>,
}

impl std::fmt::Debug for NeonBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NeonBackend")
            .field("project", &self.project)
            .field("client", &self.client)
            .finish()
    }
}

impl NeonBackend {
    /// `home` is the project's local state folder (created if missing): the
    /// active branch, the daemon's files and the notes live there.
    pub fn new(
        client: NeonClient,
        project_id: &str,
        home: ProjectHome,
    ) -> Result<NeonBackend, NeonError> {
        // No local servers: the folder is ours alone (0700, files 0600).
        home.make_private(None).map_err(|e| NeonError::Notes {
            path: home.dir().display().to_string(),
            message: e.to_string(),
        })?;
        Ok(NeonBackend {
            client,
            project: project_id.to_string(),
            home,
            suspend_timeout: None,
        })
    }

    pub fn project_id(&self) -> &str {
        &self.project
    }
    pub fn client(&self) -> &NeonClient {
        &self.client
    }
    pub fn home(&self) -> &ProjectHome {
        &self.home
    }

    /// The project lock (the same one the local backend uses): state.json
    /// and the notes change under it.
    pub fn lock(&self) -> Result<ProjectLock, NeonError> {
        ProjectLock::acquire(&self.home.lock_path()).map_err(|e| NeonError::Notes {
            path: self.home.lock_path().display().to_string(),
            message: e.to_string(),
        })
    }

    fn notes_path(&self) -> PathBuf {
        self.home.dir().join("neon-branches.json")
    }

    fn read_notes(&self) -> Notes {
        std::fs::read(self.notes_path())
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    fn update_notes(&self, change: impl FnOnce(&mut Notes)) -> Result<(), NeonError> {
        let _lock = self.lock()?;
        let mut notes = self.read_notes();
        change(&mut notes);
        let bytes = serde_json::to_vec_pretty(&notes).expect("notes serialize");
        write_atomic(&self.notes_path(), &bytes).map_err(|e| NeonError::Notes {
            path: self.notes_path().display().to_string(),
            message: e.to_string(),
        })
    }

    /// Every branch of the project with its parent's name and its compute.
    pub fn list(&self) -> Result<Vec<NeonBranch>, NeonError> {
        let branches = self.client.list_branches(&self.project)?;
        let endpoints = self.client.list_endpoints(&self.project)?;
        let notes = self.read_notes();
        let names: BTreeMap<&str, &str> = branches
            .iter()
            .map(|b| (b.id.as_str(), b.name.as_str()))
            .collect();
        Ok(branches
            .iter()
            .map(|b| NeonBranch {
                parent_name: b
                    .parent_id
                    .as_deref()
                    .and_then(|p| names.get(p))
                    .map(|n| n.to_string()),
                endpoint: endpoints
                    .iter()
                    .find(|e| e.branch_id.as_deref() == Some(&b.id) && e.is_read_write())
                    .cloned(),
                git_branch: notes
                    .branches
                    .get(&b.name)
                    .and_then(|n| n.git_branch.clone()),
                protected: notes.branches.get(&b.name).is_some_and(|n| n.protected),
                branch: b.clone(),
            })
            .collect())
    }

    pub fn find(&self, name: &str) -> Result<Option<Branch>, NeonError> {
        self.client.find_branch(&self.project, name)
    }

    pub fn get(&self, name: &str) -> Result<Branch, NeonError> {
        match self.find(name)? {
            Some(b) => Ok(b),
            None => Err(NeonError::NoBranch {
                name: name.into(),
                project: self.project.clone(),
                known: self
                    .client
                    .list_branches(&self.project)
                    .map(|all| all.into_iter().map(|b| b.name).collect())
                    .unwrap_or_default(),
            }),
        }
    }

    pub fn exists(&self, name: &str) -> Result<bool, NeonError> {
        Ok(self.find(name)?.is_some())
    }

    /// The git branch recorded for `name`, if pgtwig made it for one.
    pub fn git_branch(&self, name: &str) -> Option<String> {
        self.read_notes()
            .branches
            .get(name)
            .and_then(|n| n.git_branch.clone())
    }

    /// Make branch `name` from `parent` (at its head, a time or an LSN)
    /// with a read-write compute; Neon deletes it at `expires_at` if given.
    pub fn create(
        &self,
        name: &str,
        parent: &str,
        at: PointInTime,
        git_branch: Option<String>,
        expires_at: Option<String>,
    ) -> Result<NeonBranch, NeonError> {
        self.create_recorded(name, parent, at, git_branch, expires_at, false)
    }

    /// [`create`](Self::create), recording whether the rule that made it protects it.
    pub fn create_recorded(
        &self,
        name: &str,
        parent: &str,
        at: PointInTime,
        git_branch: Option<String>,
        expires_at: Option<String>,
        protected: bool,
    ) -> Result<NeonBranch, NeonError> {
        let all = self.client.list_branches(&self.project)?;
        if all.iter().any(|b| b.name == name) {
            return Err(NeonError::Exists {
                name: name.into(),
                project: self.project.clone(),
            });
        }
        let Some(parent_branch) = all.iter().find(|b| b.name == parent) else {
            return Err(NeonError::NoBranch {
                name: parent.into(),
                project: self.project.clone(),
                known: all.iter().map(|b| b.name.clone()).collect(),
            });
        };
        if git_branch.is_some() || protected {
            let g = git_branch.clone();
            self.update_notes(|n| {
                n.branches.insert(
                    name.into(),
                    Note {
                        git_branch: g,
                        protected,
                    },
                );
            })?;
        }
        let made = self.client.create_branch(
            &self.project,
            &NewBranch {
                name,
                parent_id: Some(&parent_branch.id),
                at,
                suspend_timeout_seconds: self.suspend_timeout.map(|d| d.as_secs()),
                expires_at,
            },
        );
        match made {
            Ok((branch, endpoints)) => Ok(NeonBranch {
                branch,
                parent_name: Some(parent.into()),
                endpoint: endpoints.into_iter().find(Endpoint::is_read_write),
                git_branch,
                protected,
            }),
            Err(e) => {
                let _ = self.update_notes(|n| {
                    n.branches.remove(name);
                });
                Err(e)
            }
        }
    }

    /// Delete branch `name`; never `root`. Neon refuses branches with children.
    pub fn delete(&self, name: &str, root: &str) -> Result<(), NeonError> {
        if name == root {
            return Err(NeonError::Refused(format!(
                "\"{name}\" is the root branch; pgtwig never deletes it"
            )));
        }
        let branch = self.get(name)?;
        if branch.is_default() {
            return Err(NeonError::Refused(format!(
                "\"{name}\" is the Neon project's default branch; pgtwig never deletes it"
            )));
        }
        self.client.delete_branch(&self.project, &branch.id)?;
        self.update_notes(|n| {
            n.branches.remove(name);
        })
    }

    /// Re-derive `name` from its parent's current state (Neon's restore).
    /// The old state is kept as branch `keep_old` when given.
    pub fn reset(&self, name: &str, keep_old: Option<&str>) -> Result<NeonBranch, NeonError> {
        let branch = self.get(name)?;
        if branch.parent_id.is_none() {
            return Err(NeonError::Refused(format!(
                "\"{name}\" has no parent to reset to (it is a root branch)"
            )));
        }
        if let Some(k) = keep_old {
            if self.exists(k)? {
                return Err(NeonError::Exists {
                    name: k.into(),
                    project: self.project.clone(),
                });
            }
        }
        self.client
            .restore_from_parent(&self.project, &branch, keep_old)?;
        self.list()?
            .into_iter()
            .find(|b| b.branch.name == name)
            .ok_or_else(|| NeonError::NoBranch {
                name: name.into(),
                project: self.project.clone(),
                known: Vec::new(),
            })
    }

    /// The branch and its read-write compute.
    pub fn endpoint(&self, name: &str) -> Result<(Branch, Endpoint), NeonError> {
        let branch = self.get(name)?;
        let endpoint = self
            .client
            .endpoints(&self.project, &branch.id)?
            .into_iter()
            .find(Endpoint::is_read_write)
            .ok_or_else(|| {
                NeonError::Refused(format!(
                    "Neon branch \"{name}\" has no read-write compute; add one in the Neon console \
                     (Branches → {name} → Add compute) or with `neonctl branches add-compute {name}`"
                ))
            })?;
        Ok((branch, endpoint))
    }

    /// Start the compute if Neon suspended it, and wait until it runs.
    /// `endpoint` is as just read (from [`endpoint`](Self::endpoint)), so
    /// its state is current. Returns whether it had to be started.
    pub fn wake(&self, endpoint: &Endpoint) -> Result<bool, NeonError> {
        if endpoint.current_state.as_deref() == Some("active") {
            return Ok(false);
        }
        self.client.start_endpoint(&self.project, &endpoint.id)?;
        Ok(true)
    }

    /// A connection string with a password, straight to the branch's
    /// compute. `role`: the configured one, else the branch's only role.
    pub fn connection_uri(
        &self,
        name: &str,
        database: &str,
        role: Option<&str>,
    ) -> Result<String, NeonError> {
        let branch = self.get(name)?;
        let role = match role {
            Some(r) => r.to_string(),
            None => {
                let roles: Vec<_> = self
                    .client
                    .roles(&self.project, &branch.id)?
                    .into_iter()
                    .filter(|r| !r.protected)
                    .collect();
                match roles.as_slice() {
                    [only] => only.name.clone(),
                    [] => {
                        return Err(NeonError::Refused(format!(
                            "Neon branch \"{name}\" has no role to connect as; create one in the Neon console"
                        )))
                    }
                    many => {
                        return Err(NeonError::Refused(format!(
                            "Neon branch \"{name}\" has several roles ({}); set `role = \"...\"` under [neon] in .pgtwig.toml",
                            many.iter().map(|r| r.name.as_str()).collect::<Vec<_>>().join(", ")
                        )))
                    }
                }
            }
        };
        self.client
            .connection_uri(&self.project, &branch.id, database, &role)
    }
}
