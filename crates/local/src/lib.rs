//! pgtwig's local backend: database branches that are managed PostgreSQL
//! clusters on this machine, each cloned copy-on-write from its parent.
//!
//! - [`pgbin`]: finding server binaries, by major version.
//! - [`server_user`]: who runs the servers (not root).
//! - `ownership`: which folder of a project is whose, and tightening
//!   projects made by an older pgtwig.
//! - [`cluster`]: initdb, start, stop and status of one cluster.
//! - [`databases`]: the databases in a cluster (the app's, the others).
//! - `beneath`: reaching into the server user's data directories without
//!   following links.
//! - [`clone`]: copy-on-write (or full) copies of a directory tree.
//! - [`fiemap`]: which bytes of a file are its own and which it shares
//!   with clones (the kernel's extent map).
//! - [`space`]: free space before a build, and what each branch and its
//!   history cost on disk.
//! - [`backup`]: consistent clones of a running cluster (backup API).
//! - [`prepared`]: branches changed out of sight (anonymize, import).
//! - [`wal_archive`]: the archiver that servers run (`pgtwig-archive-wal`),
//!   and quoting paths into archive and restore commands.
//! - [`history`]: base snapshots and the WAL archive of a branch.
//! - [`point_in_time`]: what `--at` accepts (times with zones, relative, LSNs).
//! - [`recovery`]: branches as of a past point (`branch create --at`).
//! - [`scratch`]: throwaway clones run with extra settings (`pgtwig check`).
//! - [`lifetime`]: processes that die with the command that started them
//!   (a build's server, import's pg_dump/pg_restore).
//! - `build`: building a branch in `tmp/` (clone, publish) and cleaning
//!   up after a command that died mid-build.
//! - [`engine`]: branches — create, list, delete, reset, start, stop —
//!   crash-safe under the project lock.

pub mod backup;
mod beneath;
mod build;
pub mod clone;
pub mod cluster;
pub mod databases;
pub mod engine;
pub mod fiemap;
pub mod history;
pub mod lifetime;
mod ownership;
pub mod pgbin;
pub mod point_in_time;
pub mod prepared;
pub mod recovery;
pub mod scratch;
pub mod server_user;
pub mod space;
pub mod wal_archive;

pub use clone::CloneMethod;
pub use engine::{Branch, BranchMeta, BranchStatus, CreateReport, Error, LocalBackend};
