pub mod branch;
pub mod daemon;
pub mod git;
pub mod init;
