pub mod branch;
pub mod daemon;
pub mod init;
