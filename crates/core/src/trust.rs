//! Commands from the repository run only once approved (direnv's `allow`).
//!
//! A committed `.pgtwig.toml` comes with every pull request, so its
//! `post_create` commands are someone else's code until the user approves
//! them: `pgtwig trust` records a hash of each exact command list, and a
//! checkout runs a list only when its hash is recorded. Approvals are kept
//! per repository — keyed by the canonical path of the git common dir, so
//! every work tree of one clone shares them, and a fork cloned elsewhere
//! does not — in the project's state folder, outside the repository
//! (`<project>/trust.json`, 0600). Every approved hash is kept, so switching
//! between branches whose lists differ never asks twice.
//!
//! Approval covers the commands' text, not what they read: a command such as
//! `./scripts/migrate` runs that script as the checked-out branch has it.
//!
//! A `[neon] api_url` other than Neon's own is approved the same way: pgtwig
//! sends the Neon API key there with every request.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::home::ProjectHome;
use crate::rules::RuleSource;

/// The approvals file inside a project's state folder.
pub const TRUST_FILE: &str = "trust.json";

/// Where a project's approvals live.
pub fn trust_path(home: &ProjectHome) -> PathBuf {
    home.dir().join(TRUST_FILE)
}

/// A kind of list a config can hold that needs approval. Part of the hash,
/// so a list approved as one kind is not taken as approved for another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommandKind {
    /// `post_create` of a `[[map]]` rule: run after a checkout made a branch.
    PostCreate,
    /// `[neon] api_url` when it is not Neon's own API (one entry): where the
    /// Neon API key is sent.
    NeonApiUrl,
    /// `{ sql = "…" }` masks of `[anonymize.columns]` ("schema.table.column = expression"
    /// each): SQL that `pgtwig anonymize` runs as the branch's superuser, which can do
    /// anything that user can (`COPY … TO PROGRAM` runs commands).
    AnonymizeSql,
    /// `[neon] connect` / `ca_file`: where connections to Neon endpoints go and which CAs
    /// vouch for them — together, a committed config could send the role's password to a
    /// host of its choosing.
    NeonEndpoint,
}

impl CommandKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CommandKind::PostCreate => "post_create",
            CommandKind::NeonApiUrl => "api_url",
            CommandKind::AnonymizeSql => "anonymize sql",
            CommandKind::NeonEndpoint => "neon endpoint",
        }
    }
}

/// One list of commands a config would run, and where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandList {
    pub kind: CommandKind,
    pub source: RuleSource,
    /// "[[map]] rule 2 (git = \"feature/*\", branch = \"{branch}\")": the rule
    /// as the user finds it in `source` (numbered within that file).
    pub rule: String,
    pub commands: Vec<String>,
}

impl CommandList {
    pub fn hash(&self) -> String {
        list_hash(self.kind, &self.commands)
    }
}

/// Every list `config` holds that needs approval — the commands it would
/// run, and a non-default Neon API it would send the key to: the one place
/// that knows which settings those are. Empty lists are left out (they run
/// nothing).
pub fn command_lists(config: &Config) -> Vec<CommandList> {
    let mut numbers: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut out = Vec::new();
    if let Some(neon) = &config.neon {
        if neon.api_url != crate::config::DEFAULT_NEON_API_URL {
            out.push(CommandList {
                kind: CommandKind::NeonApiUrl,
                // `[neon]` is only read from the committed file.
                source: RuleSource::Committed,
                rule: "[neon] (pgtwig sends your Neon API key there)".into(),
                commands: vec![neon.api_url.clone()],
            });
        }
    }
    if let Some(neon) = &config.neon {
        let mut endpoint = Vec::new();
        if let Some(c) = &neon.connect {
            endpoint.push(format!("connect = {c}"));
        }
        if let Some(ca) = &neon.ca_file {
            endpoint.push(format!("ca_file = {}", ca.display()));
        }
        if !endpoint.is_empty() {
            out.push(CommandList {
                kind: CommandKind::NeonEndpoint,
                source: RuleSource::Committed,
                rule: "[neon] (where pgtwig connects to Neon endpoints, and whom it trusts there)"
                    .into(),
                commands: endpoint,
            });
        }
    }
    let sql: Vec<String> = config
        .anonymize
        .columns
        .iter()
        .filter_map(|(column, rule)| match rule {
            crate::anonymize::MaskRule::Sql(e) => Some(format!(
                "{}.{}.{} = {e}",
                column.schema, column.table, column.column
            )),
            _ => None,
        })
        .collect();
    if !sql.is_empty() {
        out.push(CommandList {
            kind: CommandKind::AnonymizeSql,
            // Where each column was written is not kept: counted as the committed file's.
            source: RuleSource::Committed,
            rule: "[anonymize.columns] (SQL pgtwig anonymize runs as the superuser)".into(),
            commands: sql,
        });
    }
    for rule in &config.map {
        let number = numbers.entry(rule.source.file_name()).or_default();
        *number += 1;
        if rule.post_create.is_empty() {
            continue;
        }
        out.push(CommandList {
            kind: CommandKind::PostCreate,
            source: rule.source,
            rule: format!(
                "[[map]] rule {number} (git = {:?}, branch = {:?})",
                rule.git.as_str(),
                rule.branch.as_str()
            ),
            commands: rule.post_create.clone(),
        });
    }
    out
}

/// SHA-256 (hex) of one exact list: its kind, then each command with its
/// length in front, so order, whitespace and where one command ends all
/// count (`["a b"]`, `["a", "b"]` and `["b", "a"]` differ).
pub fn list_hash(kind: CommandKind, commands: &[String]) -> String {
    let mut h = Sha256::new();
    h.update(b"pgtwig command list v1\0");
    h.update(kind.as_str().as_bytes());
    h.update([0]);
    h.update((commands.len() as u64).to_be_bytes());
    for c in commands {
        h.update((c.len() as u64).to_be_bytes());
        h.update(c.as_bytes());
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Which repository approvals belong to: the canonical path of its git
/// common dir (the `.git` folder every linked work tree points to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RepoKey(String);

impl RepoKey {
    pub fn from_common_dir(common_dir: &Path) -> io::Result<RepoKey> {
        let canonical = common_dir.canonicalize()?;
        Ok(RepoKey(canonical.to_string_lossy().into_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One approved list. The commands are kept so `trust --list` can show
/// them; the hash is what a checkout compares.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    pub hash: String,
    pub kind: String,
    pub commands: Vec<String>,
    /// RFC 3339, UTC.
    pub approved_at: String,
    /// The work tree `pgtwig trust` ran in.
    pub work_tree: PathBuf,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TrustFile {
    #[serde(default)]
    repositories: BTreeMap<String, Vec<Approval>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    #[error("cannot read the approved commands in {path}: {source}")]
    Read { path: PathBuf, source: io::Error },
    #[error("{path} is damaged ({message}); delete it and approve again with `pgtwig trust`")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot write the approved commands to {path}: {source}")]
    Write { path: PathBuf, source: io::Error },
}

/// The approvals of one project (all its repositories), as read from disk.
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    file: TrustFile,
}

impl TrustStore {
    /// Read `path`; a missing file approves nothing.
    pub fn load(path: &Path) -> Result<TrustStore, TrustError> {
        let file = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TrustError::Invalid {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => TrustFile::default(),
            Err(source) => {
                return Err(TrustError::Read {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        Ok(TrustStore {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `commands` may run in `repo`. An empty list runs nothing,
    /// so it needs no approval.
    pub fn is_approved(&self, repo: &RepoKey, kind: CommandKind, commands: &[String]) -> bool {
        if commands.is_empty() {
            return true;
        }
        let hash = list_hash(kind, commands);
        self.approvals(repo).iter().any(|a| a.hash == hash)
    }

    /// The lists of `lists` not approved for `repo`.
    pub fn unapproved<'a>(&self, repo: &RepoKey, lists: &'a [CommandList]) -> Vec<&'a CommandList> {
        lists
            .iter()
            .filter(|l| !self.is_approved(repo, l.kind, &l.commands))
            .collect()
    }

    /// Record `list` for `repo`; false when it was already approved.
    pub fn approve(&mut self, repo: &RepoKey, list: &CommandList, work_tree: &Path) -> bool {
        if self.is_approved(repo, list.kind, &list.commands) {
            return false;
        }
        self.file
            .repositories
            .entry(repo.0.clone())
            .or_default()
            .push(Approval {
                hash: list.hash(),
                kind: list.kind.as_str().to_string(),
                commands: list.commands.clone(),
                approved_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now())
                    .to_string(),
                work_tree: work_tree.to_path_buf(),
            });
        true
    }

    pub fn approvals(&self, repo: &RepoKey) -> &[Approval] {
        self.file
            .repositories
            .get(&repo.0)
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Forget every approval for `repo`; returns how many there were.
    pub fn revoke(&mut self, repo: &RepoKey) -> usize {
        self.file
            .repositories
            .remove(&repo.0)
            .map_or(0, |v| v.len())
    }

    /// Write the file: whole or not at all (fsutil's atomic write), readable
    /// only by its owner. The folder is made if it is missing.
    pub fn save(&self) -> Result<(), TrustError> {
        let write = |source| TrustError::Write {
            path: self.path.clone(),
            source,
        };
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(write)?;
        }
        let mut text = serde_json::to_vec_pretty(&self.file).expect("serializable");
        text.push(b'\n');
        crate::fsutil::write_atomic(&self.path, &text).map_err(write)?;
        std::fs::set_permissions(&self.path, std::fs::Permissions::from_mode(0o600))
            .map_err(write)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(commands: &[&str]) -> CommandList {
        CommandList {
            kind: CommandKind::PostCreate,
            source: RuleSource::Committed,
            rule: "r".into(),
            commands: commands.iter().map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn the_hash_is_of_the_exact_list() {
        let h = |c: &[&str]| list(c).hash();
        assert_eq!(h(&["a", "b"]), h(&["a", "b"]));
        assert_eq!(h(&["a"]).len(), 64);
        let distinct = [
            h(&["a", "b"]),
            h(&["b", "a"]),
            h(&["a b"]),
            h(&["ab"]),
            h(&["a", "b "]),
            h(&["a", "b", ""]),
            h(&["a\0b"]),
            h(&["a"]),
            h(&[]),
        ];
        let unique: std::collections::HashSet<_> = distinct.iter().collect();
        assert_eq!(unique.len(), distinct.len(), "{distinct:?}");
        // Stable across versions (approvals on disk must keep matching); the
        // value was computed independently: sha256(b"pgtwig command list
        // v1\0post_create\0" + u64be(1) + u64be(7) + b"echo hi").
        assert_eq!(
            h(&["echo hi"]),
            "e8f1d3e84bfcac63ac6d09d1a882f8a942280d5f672a669c12b1b05e69e6d3b2"
        );
    }

    #[test]
    fn command_lists_name_their_rule_and_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(".pgtwig.toml"),
            "project = \"a\"\n[[map]]\ngit = \"main\"\nbranch = \"main\"\n\
             [[map]]\ngit = \"*\"\nbranch = \"{branch}\"\npost_create = [\"one\", \"two\"]\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join(".pgtwig.local.toml"),
            "[[map]]\ngit = \"mine/*\"\nbranch = \"me\"\npost_create = [\"three\"]\n",
        )
        .unwrap();
        let (config, _) = Config::discover(dir.path()).unwrap();
        let lists = command_lists(&config);
        assert_eq!(lists.len(), 2, "{lists:?}");
        assert_eq!(lists[0].source, RuleSource::Local);
        assert_eq!(lists[0].commands, ["three"]);
        assert_eq!(
            lists[0].rule,
            "[[map]] rule 1 (git = \"mine/*\", branch = \"me\")"
        );
        assert_eq!(lists[1].source, RuleSource::Committed);
        assert_eq!(lists[1].commands, ["one", "two"]);
        assert!(
            lists[1].rule.starts_with("[[map]] rule 2 "),
            "{}",
            lists[1].rule
        );

        // A Neon API other than Neon's own needs approval; the default does not.
        let mut config = config;
        config.neon = Some(crate::config::NeonConfig::new("p"));
        assert_eq!(command_lists(&config).len(), 2);
        config.neon.as_mut().unwrap().api_url = "https://neon.example/api/v2".into();
        let lists = command_lists(&config);
        assert_eq!(lists.len(), 3);
        assert_eq!(lists[0].kind, CommandKind::NeonApiUrl);
        assert_eq!(lists[0].commands, ["https://neon.example/api/v2"]);
        assert_ne!(
            lists[0].hash(),
            list_hash(CommandKind::PostCreate, &lists[0].commands),
            "a URL approved is not a command approved"
        );
    }

    #[test]
    fn approvals_are_per_repository_kept_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let repo_a = dir.path().join("a/.git");
        let repo_b = dir.path().join("b/.git");
        std::fs::create_dir_all(&repo_a).unwrap();
        std::fs::create_dir_all(&repo_b).unwrap();
        // A path that reaches the same folder another way is the same repository.
        let a = RepoKey::from_common_dir(&repo_a).unwrap();
        let a_again = RepoKey::from_common_dir(&dir.path().join("b/../a/.git")).unwrap();
        assert_eq!(a, a_again);
        let b = RepoKey::from_common_dir(&repo_b).unwrap();

        let path = dir.path().join("state/shop").join(TRUST_FILE);
        let mut store = TrustStore::load(&path).unwrap();
        let (one, two) = (list(&["one"]), list(&["two"]));
        assert!(!store.is_approved(&a, one.kind, &one.commands));
        assert!(store.is_approved(&a, CommandKind::PostCreate, &[]));
        assert!(store.approve(&a, &one, Path::new("/wt")));
        assert!(!store.approve(&a, &one, Path::new("/wt")), "once");
        assert!(store.approve(&a, &two, Path::new("/wt")));
        store.save().unwrap();

        let mut store = TrustStore::load(&path).unwrap();
        assert!(store.is_approved(&a, one.kind, &one.commands));
        assert!(store.is_approved(&a, two.kind, &two.commands), "both kept");
        assert!(
            !store.is_approved(&b, one.kind, &one.commands),
            "per repository"
        );
        assert_eq!(store.unapproved(&b, &[one.clone(), two.clone()]).len(), 2);
        assert_eq!(store.approvals(&a)[0].commands, ["one"]);
        assert_eq!(store.revoke(&a), 2);
        assert_eq!(store.revoke(&b), 0);
        store.save().unwrap();
        assert!(!TrustStore::load(&path)
            .unwrap()
            .is_approved(&a, one.kind, &one.commands));
    }

    #[test]
    fn the_file_is_private_and_written_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(TRUST_FILE);
        let repo = RepoKey::from_common_dir(dir.path()).unwrap();
        let mut store = TrustStore::load(&path).unwrap();
        store.approve(&repo, &list(&["x"]), dir.path());
        store.save().unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        // Rewritten by rename: no temp file left beside it, and the new content whole.
        store.approve(&repo, &list(&["y"]), dir.path());
        store.save().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, [TRUST_FILE]);
        let back = TrustStore::load(&path).unwrap();
        assert_eq!(back.approvals(&repo).len(), 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // A damaged file is an error that says what to do, not "nothing approved".
        std::fs::write(&path, "{ not json").unwrap();
        let e = TrustStore::load(&path).unwrap_err().to_string();
        assert!(e.contains("damaged") && e.contains("pgtwig trust"), "{e}");
    }
}
