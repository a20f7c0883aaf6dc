//! Mapping git branches to database branches: `[[map]]` rules in
//! `.pgtwig.toml` (and, tried first, in the git-ignored `.pgtwig.local.toml`).
//!
//! First match wins. `git` is a glob on the git branch name (`*` also
//! matches `/`, so `"*"` is every branch); `branch` is a template where
//! `{branch}` is the git branch name made valid (`feature/login` →
//! `feature-login`) and `{user}` the developer's user name made valid.
//! Without rules, every git branch gets a database branch of its own name,
//! derived from the root and created on first checkout.

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::names::{self, BranchName};

/// Whether a missing database branch is made on first checkout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CreatePolicy {
    #[default]
    Auto,
    Never,
}

/// A glob on git branch names, checked when the config is read.
#[derive(Debug, Clone)]
pub struct GitPattern {
    text: String,
    matcher: GlobMatcher,
}

impl GitPattern {
    /// The glob as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl PartialEq for GitPattern {
    fn eq(&self, other: &Self) -> bool {
        self.text == other.text
    }
}
impl Eq for GitPattern {}

impl TryFrom<String> for GitPattern {
    type Error = String;
    fn try_from(text: String) -> Result<Self, String> {
        let glob = Glob::new(&text).map_err(|e| format!("invalid git pattern \"{text}\": {e}"))?;
        Ok(GitPattern {
            matcher: glob.compile_matcher(),
            text,
        })
    }
}

impl From<GitPattern> for String {
    fn from(p: GitPattern) -> String {
        p.text
    }
}

impl Serialize for GitPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GitPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        GitPattern::try_from(String::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// A database branch name template: checked when the config is read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(into = "String")]
pub struct BranchTemplate(String);

impl From<BranchTemplate> for String {
    fn from(t: BranchTemplate) -> String {
        t.0
    }
}

impl<'de> Deserialize<'de> for BranchTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let rest = text.replace("{branch}", "").replace("{user}", "");
        if rest.contains('{') || rest.contains('}') {
            return Err(serde::de::Error::custom(format!(
                "branch template \"{text}\" uses an unknown placeholder; the placeholders are {{branch}} and {{user}}"
            )));
        }
        let sample = text.replace("{branch}", "b").replace("{user}", "u");
        BranchName::parse(&sample).map_err(|e| {
            serde::de::Error::custom(format!(
                "branch template \"{text}\" does not make a valid branch name: {e}"
            ))
        })?;
        Ok(BranchTemplate(text))
    }
}

impl BranchTemplate {
    /// The template as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_fixed(&self) -> bool {
        !self.0.contains('{')
    }
}

/// Which file a `[[map]]` rule was read from: the committed `.pgtwig.toml`
/// or the developer's git-ignored `.pgtwig.local.toml`. Told to the user
/// when pgtwig asks to approve a rule's commands (see `trust`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuleSource {
    #[default]
    Committed,
    Local,
}

impl RuleSource {
    pub fn file_name(self) -> &'static str {
        match self {
            RuleSource::Committed => crate::config::CONFIG_FILE,
            RuleSource::Local => crate::config::LOCAL_CONFIG_FILE,
        }
    }
}

/// One `[[map]]` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapRule {
    pub git: GitPattern,
    pub branch: BranchTemplate,
    /// The branch a new one derives from (default: the root branch).
    #[serde(default)]
    pub parent: Option<BranchName>,
    #[serde(default)]
    pub create: CreatePolicy,
    /// Shell commands run after the branch is made, with DATABASE_URL set to it.
    #[serde(default)]
    pub post_create: Vec<String>,
    /// Never deleted by `pgtwig gc`.
    #[serde(default)]
    pub protected: bool,
    /// Set by `Config::discover`, not written in the file.
    #[serde(skip)]
    pub source: RuleSource,
}

/// What a git branch maps to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub branch: BranchName,
    pub parent: BranchName,
    pub create: CreatePolicy,
    pub post_create: Vec<String>,
    pub protected: bool,
    /// The file the matching rule (and so `post_create`) came from.
    pub source: RuleSource,
}

/// The database branch for `git_branch`. `holder` tells who holds an
/// existing name (see [`names::unique_for_git`]). None when no rule matches.
pub fn resolve(
    rules: &[MapRule],
    git_branch: &str,
    user: &str,
    root: &BranchName,
    holder: impl Fn(&BranchName) -> Option<Option<String>>,
) -> Option<Target> {
    let default_rule;
    let rules = if rules.is_empty() {
        default_rule = [MapRule {
            git: GitPattern::try_from("*".to_string()).expect("valid"),
            branch: BranchTemplate("{branch}".into()),
            parent: None,
            create: CreatePolicy::Auto,
            post_create: vec![],
            protected: false,
            source: RuleSource::Committed,
        }];
        &default_rule[..]
    } else {
        rules
    };
    let rule = rules.iter().find(|r| r.git.matcher.is_match(git_branch))?;
    let user = names::from_git(user);
    let name = if rule.branch.0 == "{branch}" {
        names::unique_for_git(git_branch, holder)
    } else {
        let mapped = names::from_git(git_branch);
        let text = rule
            .branch
            .0
            .replace("{branch}", mapped.as_str())
            .replace("{user}", user.as_str());
        BranchName::parse(&text).unwrap_or_else(|_| names::from_git(&text))
    };
    Some(Target {
        parent: rule.parent.clone().unwrap_or_else(|| root.clone()),
        create: rule.create,
        post_create: rule.post_create.clone(),
        protected: rule.protected || name == *root,
        source: rule.source,
        branch: name,
    })
}

/// The rule [`resolve`] uses for `git_branch`, and its number (1-based) among the rules of
/// its file, for saying which one matched; None when none does (with no rules at all the
/// built-in `git = "*"` applies: `Some((0, None))`).
pub fn matching_rule<'a>(
    rules: &'a [MapRule],
    git_branch: &str,
) -> Option<(usize, Option<&'a MapRule>)> {
    if rules.is_empty() {
        return Some((0, None));
    }
    let rule = rules.iter().find(|r| r.git.matcher.is_match(git_branch))?;
    let number = rules
        .iter()
        .filter(|r| r.source == rule.source)
        .position(|r| std::ptr::eq(r, rule))
        .expect("the rule is among the rules")
        + 1;
    Some((number, Some(rule)))
}

/// Where a work tree goes when its active branch `gone` is deleted: the parent the
/// `[[map]]` rule for its checked-out git branch gives (`git_branch`; `None` when HEAD is
/// detached), else the root — and the root too when that parent is `gone` itself or does
/// not exist.
pub fn fallback(
    rules: &[MapRule],
    git_branch: Option<&str>,
    user: &str,
    root: &BranchName,
    gone: &BranchName,
    exists: impl Fn(&BranchName) -> bool,
) -> BranchName {
    git_branch
        .and_then(|g| resolve(rules, g, user, root, |_| None))
        .map(|t| t.parent)
        .filter(|p| p != gone && exists(p))
        .unwrap_or_else(|| root.clone())
}

/// Names of branches that fixed-name protected rules cover.
pub fn protected_names(rules: &[MapRule]) -> Vec<BranchName> {
    rules
        .iter()
        .filter(|r| r.protected && r.branch.is_fixed())
        .filter_map(|r| BranchName::parse(&r.branch.0).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_text: &str) -> Vec<MapRule> {
        #[derive(Deserialize)]
        struct W {
            map: Vec<MapRule>,
        }
        toml::from_str::<W>(toml_text).unwrap().map
    }

    fn root() -> BranchName {
        BranchName::parse("main").unwrap()
    }

    #[test]
    fn the_matching_rule_is_numbered_within_its_file() {
        let mut r = rules(
            r#"
            [[map]]
            git = "mine/*"
            branch = "{branch}"
            [[map]]
            git = "main"
            branch = "main"
            [[map]]
            git = "*"
            branch = "dev-{user}"
            "#,
        );
        r[0].source = RuleSource::Local;
        let (n, rule) = matching_rule(&r, "feature/x").unwrap();
        assert_eq!((n, rule.unwrap().git.as_str()), (2, "*"));
        let (n, rule) = matching_rule(&r, "mine/y").unwrap();
        assert_eq!((n, rule.unwrap().source), (1, RuleSource::Local));
        assert_eq!(matching_rule(&[], "anything"), Some((0, None)));
        assert_eq!(matching_rule(&r[..2], "feature/x"), None);
    }

    #[test]
    fn first_match_wins_and_templates_expand() {
        let r = rules(
            r#"
            [[map]]
            git = "main"
            branch = "main"
            [[map]]
            git = "release/*"
            branch = "staging"
            protected = true
            [[map]]
            git = "dependabot/*"
            branch = "{branch}"
            create = "never"
            [[map]]
            git = "*"
            branch = "dev-{user}"
            parent = "anon"
            "#,
        );
        let t = resolve(&r, "release/1.2", "Alice", &root(), |_| None).unwrap();
        assert_eq!(
            (t.branch.as_str(), t.parent.as_str(), t.protected),
            ("staging", "main", true)
        );
        let t = resolve(&r, "feature/login", "Alice Smith", &root(), |_| None).unwrap();
        assert_eq!(
            (t.branch.as_str(), t.parent.as_str()),
            ("dev-alice-smith", "anon")
        );
        let t = resolve(&r, "dependabot/npm/x", "a", &root(), |_| None).unwrap();
        assert_eq!(
            (t.branch.as_str(), t.create),
            ("dependabot-npm-x", CreatePolicy::Never)
        );
        assert!(
            resolve(&r, "main", "a", &root(), |_| None)
                .unwrap()
                .protected
        );
        assert_eq!(
            protected_names(&r),
            vec![BranchName::parse("staging").unwrap()]
        );
    }

    #[test]
    fn a_deleted_branch_falls_back_to_its_rules_parent() {
        let r = rules(
            r#"
            [[map]]
            git = "feature/*"
            branch = "{branch}"
            parent = "anon"
            "#,
        );
        let gone = BranchName::parse("feature-a").unwrap();
        let anon = BranchName::parse("anon").unwrap();
        let fb = |git: Option<&str>, exists: bool| {
            fallback(&r, git, "a", &root(), &gone, |_| exists).to_string()
        };
        assert_eq!(fb(Some("feature/a"), true), "anon");
        // The parent is gone too, no rule matches, or HEAD is detached: the root.
        assert_eq!(fb(Some("feature/a"), false), "main");
        assert_eq!(fb(Some("hotfix"), true), "main");
        assert_eq!(fb(None, true), "main");
        // Deleting the parent itself never falls back onto it.
        assert_eq!(
            fallback(&r, Some("feature/a"), "a", &root(), &anon, |_| true).as_str(),
            "main"
        );
    }

    #[test]
    fn no_rules_means_a_branch_per_git_branch() {
        let t = resolve(&[], "feature/login", "a", &root(), |_| None).unwrap();
        assert_eq!(
            (t.branch.as_str(), t.parent.as_str(), t.create),
            ("feature-login", "main", CreatePolicy::Auto)
        );
        // A name already made for another git branch is not shared.
        let t = resolve(&[], "feature/login", "a", &root(), |_| {
            Some(Some("feature-login".into()))
        })
        .unwrap();
        assert!(t.branch.as_str().starts_with("feature-login-"));
    }

    #[test]
    fn bad_rules_are_refused_with_reasons() {
        #[derive(Debug, Deserialize)]
        #[allow(dead_code)]
        struct W {
            map: Vec<MapRule>,
        }
        let e = toml::from_str::<W>("[[map]]\ngit = \"[\"\nbranch = \"x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("invalid git pattern") && e.contains("line 2"),
            "{e}"
        );
        let e = toml::from_str::<W>("[[map]]\ngit = \"*\"\nbranch = \"{branhc}\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("placeholders are {branch} and {user}"), "{e}");
        let e =
            toml::from_str::<W>("[[map]]\ngit = \"*\"\nbranch = \"x\"\ncreate = \"sometimes\"\n")
                .unwrap_err()
                .to_string();
        assert!(e.contains("auto") && e.contains("never"), "{e}");
        let e = toml::from_str::<W>("[[map]]\ngit = \"*\"\nbranch = \"x\"\nparnet = \"y\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("parnet") && e.contains("line 4"), "{e}");
    }
}
