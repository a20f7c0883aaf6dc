pub mod anonymize;
pub mod branch;
pub mod daemon;
pub mod diff;
pub mod git;
pub mod import;
pub mod init;
pub mod trust;
