//! Keeping a file of the user's own out of commits: `.pgtwig.local.toml` holds one
//! developer's overrides, so `pgtwig init` lists it in the repository's `.gitignore`.

use std::io;
use std::path::Path;

/// Adds `/name` to `.gitignore` in the work tree `root` (made when missing) unless a line
/// there already names it (`name` or `/name`). Returns whether it was added.
pub fn ensure_ignored(root: &Path, name: &str) -> io::Result<bool> {
    let path = root.join(".gitignore");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e),
    };
    let anchored = format!("/{name}");
    if text
        .lines()
        .map(str::trim)
        .any(|l| l == name || l == anchored)
    {
        return Ok(false);
    }
    let mut out = text;
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&anchored);
    out.push('\n');
    std::fs::write(&path, out)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_once_keeping_what_was_there() {
        let d = tempfile::tempdir().unwrap();
        assert!(ensure_ignored(d.path(), ".pgtwig.local.toml").unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join(".gitignore")).unwrap(),
            "/.pgtwig.local.toml\n"
        );
        assert!(!ensure_ignored(d.path(), ".pgtwig.local.toml").unwrap());
        std::fs::write(d.path().join(".gitignore"), "target\n.pgtwig.local.toml").unwrap();
        assert!(!ensure_ignored(d.path(), ".pgtwig.local.toml").unwrap());
        std::fs::write(d.path().join(".gitignore"), "target").unwrap();
        assert!(ensure_ignored(d.path(), ".pgtwig.local.toml").unwrap());
        assert_eq!(
            std::fs::read_to_string(d.path().join(".gitignore")).unwrap(),
            "target\n/.pgtwig.local.toml\n"
        );
    }
}
