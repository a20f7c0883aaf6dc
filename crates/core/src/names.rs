//! Database branch names.
//!
//! A database branch name is used as a directory name (local backend) and as
//! a Neon branch name, so it is kept to a portable, case-insensitive-safe
//! alphabet: 1 to 63 characters of lowercase ASCII letters, digits, `-`, `_`
//! and `.`, starting with a letter or digit. Lowercase only, because macOS
//! file systems fold case and `Feature` and `feature` would share a folder.
//!
//! Any git branch name maps to a valid one with [`from_git`]:
//! `feature/login` → `feature-login`. Two git branches can map to the same
//! readable name (`feature/login`, `feature-login`, `Feature/Login`); the
//! caller resolves that with [`unique_for_git`], which keeps the readable
//! name for the first and adds a short hash of the git name for the others.

use std::fmt;

use sha2::{Digest, Sha256};

/// Longest branch name, matching Postgres identifier length so a branch name
/// can always be used where an identifier is.
pub const MAX_LEN: usize = 63;

/// A validated database branch name.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(try_from = "String", into = "String")]
pub struct BranchName(String);

/// Why a string is not a branch name. The message says what is allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("branch name is empty")]
    Empty,
    #[error("branch name \"{name}\" is {len} characters long; the limit is {MAX_LEN}")]
    TooLong { name: String, len: usize },
    #[error(
        "invalid branch name \"{name}\": {problem}; use lowercase letters, digits, '-', '_' and '.', \
         starting with a letter or digit{suggestion}"
    )]
    Invalid {
        name: String,
        problem: String,
        suggestion: String,
    },
}

impl BranchName {
    /// Validate a name typed by a user. Nothing is rewritten: a name that is
    /// not valid is refused, with the valid form suggested when there is one.
    pub fn parse(name: &str) -> Result<BranchName, NameError> {
        if name.is_empty() {
            return Err(NameError::Empty);
        }
        let invalid = |problem: String| {
            let mapped = from_git(name);
            let suggestion = if mapped.as_str() != name {
                format!(" (did you mean \"{mapped}\"?)")
            } else {
                String::new()
            };
            NameError::Invalid {
                name: name.to_string(),
                problem,
                suggestion,
            }
        };
        if let Some(c) = name.chars().find(|c| !is_name_char(*c)) {
            let problem = if c.is_ascii_uppercase() {
                "it has uppercase letters".to_string()
            } else if c.is_control() || c.is_whitespace() {
                format!("it contains {:?}", c)
            } else {
                format!("it contains '{c}'")
            };
            return Err(invalid(problem));
        }
        if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
            return Err(invalid("it must start with a letter or digit".into()));
        }
        if name.len() > MAX_LEN {
            return Err(NameError::TooLong {
                name: name.to_string(),
                len: name.len(),
            });
        }
        Ok(BranchName(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' || c == '.'
}

impl fmt::Display for BranchName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for BranchName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for BranchName {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        BranchName::parse(&s)
    }
}

impl From<BranchName> for String {
    fn from(b: BranchName) -> String {
        b.0
    }
}

impl std::str::FromStr for BranchName {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        BranchName::parse(s)
    }
}

/// The readable database branch name for a git branch name: lowercased,
/// every run of characters outside the alphabet becomes one `-`, leading
/// and trailing separators dropped. Too long, it is cut and a hash of the
/// full git name appended so distinct long names stay distinct.
pub fn from_git(git_branch: &str) -> BranchName {
    let mut out = String::with_capacity(git_branch.len());
    for c in git_branch.chars() {
        let c = c.to_ascii_lowercase();
        if is_name_char(c) {
            // Collapse separators so `a//b` and `a/-b` read as `a-b`.
            if c == '-' && out.ends_with('-') {
                continue;
            }
            out.push(c);
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let trimmed = out
        .trim_start_matches(|c: char| !c.is_ascii_alphanumeric())
        .trim_end_matches(['-', '.', '_']);
    let mut name = if trimmed.is_empty() {
        format!("branch-{}", short_hash(git_branch))
    } else {
        trimmed.to_string()
    };
    if name.len() > MAX_LEN {
        name.truncate(MAX_LEN - 7);
        let keep = name.trim_end_matches(['-', '.', '_']).len();
        name.truncate(keep);
        name = format!("{name}-{}", short_hash(git_branch));
    }
    BranchName(name)
}

/// The name to use for `git_branch`, given who already holds which name.
///
/// `holder(name)` answers for an existing database branch: `None` when the
/// name is free, `Some(None)` when it exists but was not made for a git
/// branch (made by hand: adopted), `Some(Some(g))` when it was made for git
/// branch `g`. A readable name held for a different git branch is not
/// shared: the new git branch gets the readable name plus a hash of itself.
pub fn unique_for_git(
    git_branch: &str,
    holder: impl Fn(&BranchName) -> Option<Option<String>>,
) -> BranchName {
    let readable = from_git(git_branch);
    match holder(&readable) {
        None | Some(None) => readable,
        Some(Some(g)) if g == git_branch => readable,
        Some(Some(_)) => {
            let hash = short_hash(git_branch);
            let mut base = readable.0.clone();
            base.truncate(MAX_LEN - 7);
            let keep = base.trim_end_matches(['-', '.', '_']).len();
            base.truncate(keep);
            BranchName(format!("{base}-{hash}"))
        }
    }
}

/// The existing branch a mistyped `name` most likely meant: the closest by edit distance
/// (Levenshtein, counting an adjacent swap as one edit) within a third of the name's length
/// (at least 1, at most 3), or one that differs only in `-`/`_`/`.`. Ties go to the first
/// in `known`.
pub fn did_you_mean<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let squash = |s: &str| -> String { s.chars().filter(|c| c.is_ascii_alphanumeric()).collect() };
    let limit = (name.chars().count() / 3).clamp(1, 3);
    let mut best: Option<(usize, &str)> = None;
    for candidate in known {
        if candidate == name {
            continue;
        }
        let distance = if squash(candidate) == squash(name) {
            0
        } else {
            edit_distance(name, candidate)
        };
        if distance <= limit && best.is_none_or(|(d, _)| distance < d) {
            best = Some((distance, candidate));
        }
    }
    best.map(|(_, c)| c)
}

/// Optimal-string-alignment distance: insertions, deletions, substitutions and swaps of two
/// neighbours, the typos people make in names.
pub fn edit_distance(a: &str, b: &str) -> usize {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    let mut rows = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for (j, cell) in rows[0].iter_mut().enumerate() {
        *cell = j;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let cost = usize::from(a[i - 1] != b[j - 1]);
            let mut d = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + cost);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = d;
        }
    }
    rows[a.len()][b.len()]
}

/// What to do about a branch name that names nothing: the near miss when there is one (a
/// typo should not be answered with "create it"), else the list and how to create it.
pub fn not_found_advice(name: &str, known: &[String]) -> String {
    if let Some(meant) = did_you_mean(name, known.iter().map(String::as_str)) {
        return format!("; did you mean \"{meant}\"? (`pgtwig branch list` shows them all)");
    }
    let listed = if known.is_empty() {
        String::new()
    } else {
        format!(" (branches: {})", known.join(", "))
    };
    format!("{listed}; see `pgtwig branch list`, or create it with `pgtwig branch create {name}`")
}

/// Six hex digits of SHA-256: stable across versions and platforms.
pub fn short_hash(s: &str) -> String {
    let digest = Sha256::digest(s.as_bytes());
    digest[..3].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_the_typo_not_a_stranger() {
        let known = ["main", "feature-add-col", "dev-alice", "anon"];
        assert_eq!(
            did_you_mean("feature-ad-col", known),
            Some("feature-add-col")
        );
        assert_eq!(
            did_you_mean("feature-add-cl", known),
            Some("feature-add-col")
        );
        assert_eq!(did_you_mean("dev-ailce", known), Some("dev-alice"));
        assert_eq!(did_you_mean("dev_alice", known), Some("dev-alice"));
        assert_eq!(did_you_mean("mian", known), Some("main"));
        assert_eq!(did_you_mean("release-2", known), None);
        assert_eq!(did_you_mean("x", known), None);
        assert_eq!(
            did_you_mean("main", known),
            None,
            "an exact match is no suggestion"
        );
    }

    #[test]
    fn edit_distance_counts_a_swap_as_one() {
        assert_eq!(edit_distance("abc", "abc"), 0);
        assert_eq!(edit_distance("abc", "acb"), 1);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "ab"), 2);
    }

    #[test]
    fn valid_names_pass() {
        for n in ["main", "dev", "pr-42", "feature-login", "v1.2_x", "0day"] {
            assert_eq!(BranchName::parse(n).unwrap().as_str(), n);
        }
    }

    #[test]
    fn invalid_names_are_refused_with_a_suggestion() {
        let e = BranchName::parse("feature/login").unwrap_err().to_string();
        assert!(
            e.contains("'/'") && e.contains("did you mean \"feature-login\""),
            "{e}"
        );
        let e = BranchName::parse("Main").unwrap_err().to_string();
        assert!(e.contains("uppercase") && e.contains("\"main\""), "{e}");
        assert_eq!(BranchName::parse(""), Err(NameError::Empty));
        assert!(BranchName::parse("-x").is_err());
        assert!(BranchName::parse(".hidden").is_err());
        assert!(BranchName::parse("a b").is_err());
        assert!(BranchName::parse("..").is_err());
        assert!(matches!(
            BranchName::parse(&"a".repeat(64)),
            Err(NameError::TooLong { len: 64, .. })
        ));
    }

    #[test]
    fn git_names_map_readably() {
        assert_eq!(from_git("feature/login").as_str(), "feature-login");
        assert_eq!(from_git("Feature/Login").as_str(), "feature-login");
        assert_eq!(from_git("fix//double--dash").as_str(), "fix-double-dash");
        assert_eq!(from_git("-/x/-").as_str(), "x");
        assert_eq!(from_git("user@{ü}").as_str(), "user");
        assert!(from_git("///").as_str().starts_with("branch-"));
    }

    #[test]
    fn every_git_name_maps_to_a_valid_name() {
        for g in [
            "a",
            "feature/x",
            "ü",
            "a..b",
            "@",
            "x.",
            "_a",
            &"long/".repeat(40),
            "x\ty",
        ] {
            let n = from_git(g);
            assert_eq!(BranchName::parse(n.as_str()).unwrap(), n, "for {g:?}");
        }
    }

    #[test]
    fn long_names_stay_distinct() {
        let a = from_git(&format!("{}a", "x".repeat(80)));
        let b = from_git(&format!("{}b", "x".repeat(80)));
        assert_ne!(a, b);
        assert!(a.as_str().len() <= MAX_LEN);
    }

    #[test]
    fn collisions_get_a_hash_and_owners_keep_their_name() {
        let held_by_other = |_: &BranchName| Some(Some("feature-login".to_string()));
        let n = unique_for_git("feature/login", held_by_other);
        assert!(
            n.as_str().starts_with("feature-login-")
                && n.as_str().len() == "feature-login-".len() + 6
        );
        let held_by_self = |_: &BranchName| Some(Some("feature/login".to_string()));
        assert_eq!(
            unique_for_git("feature/login", held_by_self).as_str(),
            "feature-login"
        );
        assert_eq!(
            unique_for_git("feature/login", |_| None).as_str(),
            "feature-login"
        );
        assert_eq!(
            unique_for_git("feature/login", |_| Some(None)).as_str(),
            "feature-login"
        );
    }
}
