//! What the daemon asks the OS about a client's process: when it started (so a reused pid is
//! never taken for the process that had it before), its working directory, and on Linux which
//! process holds a socket. `/proc` on Linux, libproc on macOS.

#[cfg(target_os = "linux")]
pub use linux::*;
#[cfg(target_os = "macos")]
pub use macos::*;

#[cfg(target_os = "linux")]
mod linux {
    use std::os::unix::fs::MetadataExt;

    /// The working directory of `pid`.
    pub fn cwd(pid: u32) -> std::io::Result<std::path::PathBuf> {
        std::fs::read_link(format!("/proc/{pid}/cwd"))
    }

    /// Room for `/proc/<pid>/stat` (52 numbers and a command name of at most 64 bytes).
    const STAT_LEN: usize = 1024;

    /// Field 22 of `/proc/<pid>/stat`: start time in clock ticks since boot.
    pub fn start_time(pid: u32) -> Option<u64> {
        use std::io::Read;
        // One read into a buffer (a proc file is produced whole on the first read), not
        // `read_to_string`'s size probe and doubling reads: this runs for every connection.
        let mut buf = [0u8; STAT_LEN];
        let n = std::fs::File::open(format!("/proc/{pid}/stat"))
            .ok()?
            .read(&mut buf)
            .ok()?;
        let stat = std::str::from_utf8(&buf[..n]).ok()?;
        // The command name (field 2) may hold spaces and parentheses: count from the last ')'.
        let rest = stat.rsplit_once(')')?.1;
        rest.split_whitespace().nth(19)?.parse().ok()
    }

    /// Every process id, unordered (no per-process system call: the uid is checked later, and
    /// only for the processes looked at).
    pub fn all_pids() -> impl Iterator<Item = u32> {
        std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
    }

    /// The pid the kernel allocated last in this pid namespace (`/proc/sys/kernel/ns_last_pid`).
    pub fn last_pid() -> Option<u32> {
        std::fs::read_to_string("/proc/sys/kernel/ns_last_pid")
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn owned_by(pid: u32, uid: u32) -> bool {
        std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == uid)
    }

    pub fn holds(pid: u32, link: &str) -> bool {
        fd_holding(pid, link, None).is_some()
    }

    /// The descriptor of `pid` whose link reads `link` (`socket:[inode]`), trying `hint` (the
    /// one found last time) first: a process that connects again and again usually gets the
    /// same descriptor number back, and then this is one `readlink`, not a folder read and a
    /// `readlink` per descriptor.
    pub fn fd_holding(pid: u32, link: &str, hint: Option<u32>) -> Option<u32> {
        let is_it = |path: &std::path::Path| std::fs::read_link(path).is_ok_and(|t| t == *link);
        if let Some(fd) = hint {
            if is_it(std::path::Path::new(&format!("/proc/{pid}/fd/{fd}"))) {
                return Some(fd);
            }
        }
        let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?;
        fds.flatten().find_map(|entry| {
            let fd: u32 = entry.file_name().to_str()?.parse().ok()?;
            (Some(fd) != hint && is_it(&entry.path())).then_some(fd)
        })
    }
}

#[cfg(target_os = "macos")]
mod macos {
    /// Start time of `pid` in microseconds since the epoch (libproc `PROC_PIDTBSDINFO`).
    pub fn start_time(pid: u32) -> Option<u64> {
        let mut info: libc::proc_bsdinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_bsdinfo>() as libc::c_int;
        // SAFETY: `info` is valid for `size` bytes of writes.
        let n = unsafe {
            libc::proc_pidinfo(
                pid as libc::c_int,
                libc::PROC_PIDTBSDINFO,
                0,
                (&mut info as *mut libc::proc_bsdinfo).cast(),
                size,
            )
        };
        (n == size).then(|| info.pbi_start_tvsec * 1_000_000 + info.pbi_start_tvusec)
    }

    /// The working directory of `pid` (libproc `PROC_PIDVNODEPATHINFO`).
    pub fn cwd(pid: u32) -> std::io::Result<std::path::PathBuf> {
        use std::os::unix::ffi::OsStrExt;
        let mut info: libc::proc_vnodepathinfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::proc_vnodepathinfo>() as libc::c_int;
        // SAFETY: `info` is valid for `size` bytes of writes.
        let n = unsafe {
            libc::proc_pidinfo(
                pid as libc::c_int,
                libc::PROC_PIDVNODEPATHINFO,
                0,
                (&mut info as *mut libc::proc_vnodepathinfo).cast(),
                size,
            )
        };
        if n != size {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: vip_path is MAXPATHLEN (32 × 32) bytes the kernel filled with a C string.
        let bytes: &[u8] = unsafe {
            std::slice::from_raw_parts(info.pvi_cdir.vip_path.as_ptr().cast::<u8>(), 32 * 32)
        };
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        if len == 0 {
            return Err(std::io::Error::other(
                "the kernel gave no working directory",
            ));
        }
        Ok(std::path::PathBuf::from(std::ffi::OsStr::from_bytes(
            &bytes[..len],
        )))
    }
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
mod other {
    pub fn start_time(_pid: u32) -> Option<u64> {
        None
    }
    pub fn cwd(_pid: u32) -> std::io::Result<std::path::PathBuf> {
        Err(std::io::Error::new(
            std::io::ErrorKind::Unsupported,
            "reading another process's working directory is not implemented on this system",
        ))
    }
}
#[cfg(not(any(target_os = "linux", target_os = "macos")))]
pub use other::*;
