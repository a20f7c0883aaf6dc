//! Whether the state folder clones copy-on-write: a real clone of a probe file (FICLONE on
//! Linux, clonefile on macOS, as branches are cloned), the file system's type, and where it
//! cannot clone, the commands that give the state folder a file system that can — a sparse XFS
//! image with reflink, loop-mounted at the state folder, with one `sudo`. btrfs, APFS, XFS with
//! reflink and ZFS from 2.2 (block cloning) clone already.

use std::path::{Path, PathBuf};

use pgtwig_core::size::human;
use serde_json::json;

use super::{existing_ancestor, shell_word, Check, Finding, Status};

/// The largest image the advice makes: sparse, so it costs only what is written, but a store
/// bigger than the disk beneath would fail its servers' writes long after XFS said yes.
const MAX_IMAGE_GIB: u64 = 64;
const GIB: u64 = 1 << 30;

/// The file system holding `dir`, by name ("xfs", "ext4", "apfs", ...).
pub fn file_system(dir: &Path) -> String {
    #[cfg(target_os = "linux")]
    {
        let Ok(s) = nix::sys::statfs::statfs(dir) else {
            return "unknown".into();
        };
        // statfs(2)'s f_type magic numbers.
        #[allow(clippy::unnecessary_cast)]
        let magic = s.filesystem_type().0 as u64;
        match magic {
            0x5846_5342 => "xfs",
            0x9123_683e => "btrfs",
            0xef53 => "ext4",
            0x0102_1994 => "tmpfs",
            0x2fc1_2fc1 => "zfs",
            0x794c_7630 => "overlay",
            0xca45_1a4e => "bcachefs",
            0xf2f5_2010 => "f2fs",
            0x6969 => "nfs",
            0x6573_5546 => "fuse",
            0x0000_f15f => "ecryptfs",
            _ => return format!("unknown (type 0x{magic:x})"),
        }
        .into()
    }
    #[cfg(not(target_os = "linux"))]
    {
        nix::sys::statfs::statfs(dir)
            .map(|s| s.filesystem_type_name().to_string())
            .unwrap_or_else(|_| "unknown".into())
    }
}

/// Probe the state folder `state_root` (or, before it exists, the folder it will be made in).
pub fn check(state_root: &Path) -> Finding {
    let folder = existing_ancestor(state_root).to_path_buf();
    let fs = file_system(&folder);
    let mut details = json!({
        "state_folder": state_root,
        "probed_folder": folder,
        "file_system": fs,
    });
    let probe = folder.join(format!(".pgtwig-doctor-probe-{}", std::process::id()));
    let writable = std::fs::write(&probe, b"probe").is_ok();
    let _ = std::fs::remove_file(&probe);
    if !writable {
        details["reflink"] = serde_json::Value::Null;
        return Finding::ok(
            Check::CopyOnWrite,
            format!(
                "cannot tell: cannot write a probe file in {}",
                folder.display()
            ),
            details,
        )
        .needs(
            Status::Warn,
            format!(
                "run `pgtwig doctor` as the user who runs pgtwig, or make {} yours",
                state_root.display()
            ),
        );
    }
    let reflink = pgtwig_local::clone::supports_reflink(&folder);
    details["reflink"] = json!(reflink);
    let where_ = if folder == state_root {
        format!("{} ({fs})", folder.display())
    } else {
        format!(
            "{} ({fs}; {} does not exist yet)",
            folder.display(),
            state_root.display()
        )
    };
    if reflink {
        return Finding::ok(
            Check::CopyOnWrite,
            format!("yes: {where_} clones files, so a branch is a copy-on-write clone (instant, no extra disk until written)"),
            details,
        );
    }
    let summary = format!(
        "no: {where_} cannot clone files, so every branch is a full copy (time and disk in proportion to the database)"
    );
    let finding = Finding::ok(Check::CopyOnWrite, summary, details);
    if fs == "zfs" {
        return finding.needs(
            Status::Warn,
            "ZFS clones files from 2.2 on, with block cloning on: `zpool upgrade POOL` (feature@block_cloning) \
             and, on Linux, the module parameter zfs_bclone_enabled=1"
                .into(),
        )
        .with_xfs_store(state_root);
    }
    if cfg!(target_os = "macos") {
        return finding.needs(
            Status::Warn,
            format!(
                "APFS clones files: keep the state on an APFS volume, e.g. `diskutil apfs addVolume disk1 APFS pgtwig \
                 -mountpoint {}` (`diskutil list` names your APFS container), or set PGTWIG_HOME to a folder on one",
                shell_word(&state_root.to_string_lossy())
            ),
        );
    }
    finding.with_xfs_store(state_root)
}

impl Finding {
    /// The advice for Linux: a sparse XFS image with reflink beside the state folder, mounted
    /// on it. Keeps what the state folder holds (moved aside, copied back).
    fn with_xfs_store(mut self, state_root: &Path) -> Finding {
        let store = XfsStore::for_state_root(state_root);
        let mut fix = format!(
            "give the state folder a file system that clones: a sparse {} XFS image with reflink (it takes only \
             the space written), mounted at {}; btrfs, APFS and ZFS ≥ 2.2 clone too",
            human(store.size_gib * GIB),
            state_root.display()
        );
        if store.mkfs.is_none() {
            fix.push_str(
                ". mkfs.xfs is not installed: install xfsprogs first (Debian/Ubuntu: `sudo apt-get install xfsprogs`, \
                 Fedora: `sudo dnf install xfsprogs`)",
            );
        }
        if store.keeps_existing {
            fix.push_str(&format!(
                ". What {0} holds now is moved to {0}.before-xfs and copied back (stop the branches first: `pgtwig down`); \
                 delete {0}.before-xfs once the branches work",
                state_root.display()
            ));
        }
        fix.push_str(&format!(
            ". To mount it again after a reboot, add this line to /etc/fstab: {} {} xfs loop,nofail 0 0",
            store.image.display(),
            state_root.display()
        ));
        self.commands = store.commands();
        self.status = Status::Warn;
        self.fix = Some(match self.fix.take() {
            Some(before) => format!("{before}; or {fix}"),
            None => fix,
        });
        self
    }
}

/// The reflink store the advice makes.
struct XfsStore {
    state_root: PathBuf,
    /// Beside the state folder, not in it (the mount would hide it).
    image: PathBuf,
    size_gib: u64,
    /// mkfs.xfs, with its folder when that is not on PATH (/usr/sbin for most users).
    mkfs: Option<PathBuf>,
    /// The state folder holds something already: move it aside and copy it back.
    keeps_existing: bool,
}

impl XfsStore {
    fn for_state_root(state_root: &Path) -> XfsStore {
        let mut image = state_root.as_os_str().to_owned();
        image.push(".xfs");
        let image = PathBuf::from(image);
        let beneath = existing_ancestor(image.parent().unwrap_or(Path::new("/")));
        let available = pgtwig_local::space::free_space(beneath)
            .map(|f| f.available)
            .unwrap_or(0);
        let size_gib = (available / 10 * 8 / GIB).clamp(1, MAX_IMAGE_GIB);
        let keeps_existing = std::fs::read_dir(state_root).is_ok_and(|mut d| d.next().is_some());
        XfsStore {
            state_root: state_root.to_path_buf(),
            image,
            size_gib,
            mkfs: find_mkfs_xfs(),
            keeps_existing,
        }
    }

    fn commands(&self) -> Vec<String> {
        let state = shell_word(&self.state_root.to_string_lossy());
        let image = shell_word(&self.image.to_string_lossy());
        let aside = shell_word(&format!("{}.before-xfs", self.state_root.display()));
        let mkfs = self
            .mkfs
            .as_ref()
            .map(|m| shell_word(&m.to_string_lossy()))
            .unwrap_or_else(|| "mkfs.xfs".into());
        let uid = nix::unistd::getuid();
        let gid = nix::unistd::getgid();
        let mount = format!("mount -o loop {image} {state} && chown {uid}:{gid} {state}");
        // Root needs no sudo (and a container may have none).
        let mount = if uid.is_root() {
            format!("sh -c \"{mount}\"")
        } else {
            format!("sudo sh -c \"{mount}\"")
        };
        let mut commands = vec![];
        if self.keeps_existing {
            commands.push("pgtwig down".to_string());
            commands.push(format!("mv {state} {aside}"));
        }
        commands.extend([
            format!("mkdir -p {state}"),
            format!("truncate -s {}G {image}", self.size_gib),
            format!("{mkfs} -q -m reflink=1 {image}"),
            mount,
        ]);
        if self.keeps_existing {
            commands.push(format!("cp -a {aside}/. {state}/"));
        }
        commands
    }
}

/// mkfs.xfs on PATH, else in the sbin folders a user's PATH often lacks.
fn find_mkfs_xfs() -> Option<PathBuf> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default();
    if on_path.iter().any(|d| d.join("mkfs.xfs").is_file()) {
        return Some(PathBuf::from("mkfs.xfs"));
    }
    ["/usr/sbin", "/sbin", "/usr/local/sbin"]
        .iter()
        .map(|d| Path::new(d).join("mkfs.xfs"))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_mounts_at_the_state_folder_with_one_sudo_or_none() {
        let d = tempfile::tempdir().unwrap();
        let state = d.path().join("state");
        let store = XfsStore::for_state_root(&state);
        assert_eq!(store.image, d.path().join("state.xfs"));
        assert!(!store.keeps_existing);
        let commands = store.commands();
        assert_eq!(commands.len(), 4, "{commands:?}");
        assert!(commands[3].contains(&format!("mount -o loop {}", store.image.display())));
        let sudos = commands.iter().filter(|c| c.contains("sudo")).count();
        assert_eq!(sudos, usize::from(!nix::unistd::getuid().is_root()));

        std::fs::create_dir(&state).unwrap();
        std::fs::write(state.join("x"), b"x").unwrap();
        let commands = XfsStore::for_state_root(&state).commands();
        assert_eq!(commands[0], "pgtwig down");
        assert!(
            commands.last().unwrap().starts_with("cp -a "),
            "{commands:?}"
        );
    }
}
