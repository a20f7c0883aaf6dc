pub mod branch;
pub mod init;
