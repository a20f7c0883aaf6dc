//! pgtwig's project model, shared by every backend and by the CLI.
//!
//! - [`anonymize`]: `[anonymize]` masking rules and the SQL they become.
//! - [`check`]: `[check]`, the rules and thresholds of `pgtwig check`.
//! - [`config`]: `.pgtwig.toml`, the committed project configuration.
//! - [`home`]: where state lives (`PGTWIG_HOME`, else the platform data dir), one folder per project.
//! - [`names`]: database branch names, and how any git branch name maps to one.
//! - [`fsutil`]: crash-safe files (write, fsync, rename) and the per-project lock.
//! - [`private`]: files and folders nobody else can read or redirect (modes, `O_NOFOLLOW`).
//! - [`size`]: sizes in configuration and messages ("1GiB"), the free-space margin.
//! - [`rules`]: `[[map]]` rules, git branch → database branch.
//! - [`state`]: `state.json`, the active branch.
//! - [`trust`]: commands from the repository (`post_create`) run only once approved (`pgtwig trust`).
//! - [`failpoint`]: named pause points that tests use to kill a command mid-way.

pub mod anonymize;
pub mod check;
pub mod config;
pub mod failpoint;
pub mod fsutil;
pub mod home;
pub mod listen;
pub mod names;
pub mod private;
pub mod proxy_password;
pub mod rules;
pub mod size;
pub mod state;
pub mod trust;

pub use config::{BackendKind, Config, CONFIG_FILE};
pub use home::ProjectHome;
pub use listen::ListenAddr;
pub use names::BranchName;
