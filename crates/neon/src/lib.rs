//! A client for Neon's API v2 (<https://api-docs.neon.tech>): the branch
//! operations pgtwig needs — create (from a parent, optionally at a time or
//! LSN, with a read-write endpoint), list (all pages), get, delete, restore
//! from the parent — and waiting for the operations a call starts.
//!
//! Transient failures (429, 5xx, connection errors) are retried with
//! backoff, honouring `Retry-After`. 401/403/404/422 become errors that say
//! what to check. The API key comes from `NEON_API_KEY` or neonctl's
//! credentials file, and never appears in errors, logs or `Debug` output.
//!
//! - [`client`]: the HTTP client and the API's shapes.
//! - [`backend`]: pgtwig's branch operations on a Neon project (names,
//!   parents, git branches, endpoints), used by the CLI and the daemon.

pub mod backend;
pub mod client;

pub use backend::{NeonBackend, NeonBranch};
pub use client::*;
