//! `[check]` in `.pgtwig.toml`: thresholds of `pgtwig check` and which of its rules fail the
//! check, only warn, or are off.
//!
//! ```toml
//! [check]
//! max_lock = "1s"                 # an ACCESS EXCLUSIVE lock held longer than this fails
//! [check.rules]
//! rename-column = "warn"          # fail | warn | off
//! ```

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The rules `pgtwig check` applies, by the name `[check.rules]` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// A table with rows was rewritten (relfilenode changed): ALTER TYPE, a volatile
    /// default, VACUUM FULL, CLUSTER, TRUNCATE.
    TableRewrite,
    /// An ACCESS EXCLUSIVE lock on a table with rows held longer than `max_lock`.
    LongLock,
    /// `CREATE INDEX` without `CONCURRENTLY` on a table with rows.
    IndexWithoutConcurrently,
    /// A foreign key or CHECK constraint added to a table with rows without `NOT VALID`.
    ConstraintWithoutNotValid,
    /// `SET NOT NULL` on a table with rows without a validated CHECK (col IS NOT NULL).
    SetNotNull,
    /// A dropped column or table that held data.
    DropWithData,
    /// A renamed column: code deployed before the migration still reads the old name.
    RenameColumn,
}

impl Rule {
    pub const ALL: [Rule; 7] = [
        Rule::TableRewrite,
        Rule::LongLock,
        Rule::IndexWithoutConcurrently,
        Rule::ConstraintWithoutNotValid,
        Rule::SetNotNull,
        Rule::DropWithData,
        Rule::RenameColumn,
    ];

    /// The name in `[check.rules]` and in the output.
    pub fn name(self) -> &'static str {
        match self {
            Rule::TableRewrite => "table-rewrite",
            Rule::LongLock => "long-lock",
            Rule::IndexWithoutConcurrently => "index-without-concurrently",
            Rule::ConstraintWithoutNotValid => "constraint-without-not-valid",
            Rule::SetNotNull => "set-not-null",
            Rule::DropWithData => "drop-with-data",
            Rule::RenameColumn => "rename-column",
        }
    }

    fn default_level(self) -> Level {
        match self {
            Rule::RenameColumn => Level::Warn,
            _ => Level::Fail,
        }
    }
}

/// What a rule's finding does to the check's exit status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// Reported, exit 1.
    Fail,
    /// Reported, exit 0.
    Warn,
    /// Not reported.
    Off,
}

/// `[check]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckConfig {
    /// An ACCESS EXCLUSIVE lock on a table with rows held longer than this is `long-lock`.
    #[serde(with = "crate::config::duration_text")]
    pub max_lock: Duration,
    /// How often the lock-sampling connection looks at `pg_locks`: the resolution of every
    /// lock duration reported ("1ms" to "1s").
    #[serde(with = "crate::config::duration_text")]
    pub lock_sample_interval: Duration,
    /// Per rule: fail, warn or off; rules not named keep their default (all fail but
    /// `rename-column`, which warns).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rules: BTreeMap<Rule, Level>,
}

impl Default for CheckConfig {
    fn default() -> Self {
        CheckConfig {
            max_lock: Duration::from_secs(1),
            lock_sample_interval: Duration::from_millis(10),
            rules: BTreeMap::new(),
        }
    }
}

impl CheckConfig {
    pub fn level(&self, rule: Rule) -> Level {
        self.rules
            .get(&rule)
            .copied()
            .unwrap_or(rule.default_level())
    }

    /// Values serde cannot judge alone.
    pub fn validate(&self) -> Result<(), String> {
        let i = self.lock_sample_interval;
        if i < Duration::from_millis(1) || i > Duration::from_secs(1) {
            return Err(format!(
                "[check] lock_sample_interval = \"{}\" must be between \"1ms\" and \"1s\"",
                humantime::format_duration(i)
            ));
        }
        if self.max_lock.is_zero() {
            return Err(
                "[check] max_lock = \"0\" would fail every lock; write e.g. \"1s\" or \"200ms\""
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_overrides() {
        let c: CheckConfig = toml::from_str("").unwrap();
        assert_eq!(c.max_lock, Duration::from_secs(1));
        assert_eq!(c.level(Rule::TableRewrite), Level::Fail);
        assert_eq!(c.level(Rule::RenameColumn), Level::Warn);
        let c: CheckConfig = toml::from_str(
            "max_lock = \"200ms\"\n[rules]\ntable-rewrite = \"warn\"\nrename-column = \"off\"\n",
        )
        .unwrap();
        assert_eq!(c.max_lock, Duration::from_millis(200));
        assert_eq!(c.level(Rule::TableRewrite), Level::Warn);
        assert_eq!(c.level(Rule::RenameColumn), Level::Off);
        assert_eq!(c.level(Rule::LongLock), Level::Fail);
    }

    #[test]
    fn bad_values_are_named() {
        let e = toml::from_str::<CheckConfig>("[rules]\nno-such-rule = \"fail\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("no-such-rule"), "{e}");
        let e = toml::from_str::<CheckConfig>("[rules]\ntable-rewrite = \"maybe\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe"), "{e}");
        let c: CheckConfig = toml::from_str("lock_sample_interval = \"5s\"").unwrap();
        assert!(c.validate().unwrap_err().contains("lock_sample_interval"));
        let c: CheckConfig = toml::from_str("max_lock = \"0\"").unwrap();
        assert!(c.validate().unwrap_err().contains("max_lock"));
    }
}
