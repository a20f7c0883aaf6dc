//! `[anonymize]` in `.pgtwig.toml`: masking rules per `schema.table.column`,
//! turned into SQL that runs inside the database being anonymized.
//!
//! ```toml
//! [anonymize]
//! refuse_root_children = true        # branches may not derive from the root (PII) directly
//! country = "DE"                     # phone fakes in this country's E.164 shape
//! [anonymize.columns]
//! "public.users.email" = "email"     # email | name | first_name | last_name | full_name |
//!                                    # username | phone | hash | null
//! "public.users.first_name" = "name" # `name` follows the column: a first name here
//! "public.users.mobile" = { phone = "GB" }
//! "public.users.country" = { constant = "XX" }
//! "public.users.card" = { keep_first = 4 }
//! "public.users.salary" = { sql = "round(salary, -3)" }
//! ```
//!
//! Fakes are deterministic — derived from a keyed hash of the original
//! value — so the same input always maps to the same output (joins across
//! tables still match) and distinct inputs stay distinct for `email`,
//! `phone` and `hash` (unique columns stay unique).

pub mod fakes;
pub mod pii;

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer};

use fakes::NamePart;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MaskRule {
    Email,
    /// The part of a name the column holds (see [`NamePart::of_column`]).
    Name,
    /// One part whatever the column is called.
    NamePart(NamePart),
    Username,
    /// A phone number; in the E.164 shape of this country (ISO 3166-1 alpha-2) when one is
    /// set here or in `[anonymize] country`.
    Phone(Option<String>),
    Hash,
    Null,
    Constant(String),
    KeepFirst(u32),
    Sql(String),
}

const RULES_HELP: &str = "use one of \"email\", \"name\", \"first_name\", \"last_name\", \"full_name\", \
     \"username\", \"phone\", \"hash\", \"null\", { phone = \"GB\" }, { constant = \"…\" }, { keep_first = N } \
     or { sql = \"…\" }";

impl<'de> Deserialize<'de> for MaskRule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = toml::Value::deserialize(d)?;
        match &v {
            toml::Value::String(s) => match s.as_str() {
                "email" => Ok(MaskRule::Email),
                "name" => Ok(MaskRule::Name),
                "first_name" => Ok(MaskRule::NamePart(NamePart::First)),
                "last_name" => Ok(MaskRule::NamePart(NamePart::Last)),
                "full_name" => Ok(MaskRule::NamePart(NamePart::Full)),
                "username" => Ok(MaskRule::Username),
                "phone" => Ok(MaskRule::Phone(None)),
                "hash" => Ok(MaskRule::Hash),
                "null" => Ok(MaskRule::Null),
                other => Err(D::Error::custom(format!(
                    "unknown masking rule \"{other}\"; {RULES_HELP}"
                ))),
            },
            toml::Value::Table(t) if t.len() == 1 => {
                let (k, val) = t.iter().next().expect("one entry");
                match (k.as_str(), val) {
                    ("constant", toml::Value::String(c)) => Ok(MaskRule::Constant(c.clone())),
                    ("keep_first", toml::Value::Integer(n)) if *n >= 0 => {
                        Ok(MaskRule::KeepFirst(*n as u32))
                    }
                    ("sql", toml::Value::String(e)) => Ok(MaskRule::Sql(e.clone())),
                    ("phone", toml::Value::String(c)) => {
                        check_country(c).map_err(D::Error::custom)?;
                        Ok(MaskRule::Phone(Some(c.clone())))
                    }
                    _ => Err(D::Error::custom(format!(
                        "unknown masking rule {v}; {RULES_HELP}"
                    ))),
                }
            }
            _ => Err(D::Error::custom(format!(
                "unknown masking rule {v}; {RULES_HELP}"
            ))),
        }
    }
}

/// A `schema.table.column` key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ColumnRef {
    pub schema: String,
    pub table: String,
    pub column: String,
}

impl<'de> Deserialize<'de> for ColumnRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let parts: Vec<&str> = s.split('.').collect();
        match parts.as_slice() {
            [schema, table, column] if parts.iter().all(|p| !p.is_empty()) => Ok(ColumnRef {
                schema: schema.to_string(),
                table: table.to_string(),
                column: column.to_string(),
            }),
            _ => Err(serde::de::Error::custom(format!(
                "\"{s}\" is not schema.table.column (e.g. \"public.users.email\")"
            ))),
        }
    }
}

/// A country with a phone shape, or an error listing them.
fn check_country(country: &str) -> Result<(), String> {
    if fakes::has_phone_shape(country) {
        Ok(())
    } else {
        Err(format!(
            "no phone number shape for country \"{country}\"; use one of {} (ISO 3166-1 codes), or \
             leave it out for a national-looking number",
            fakes::phone_countries().join(", ")
        ))
    }
}

fn country_field<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let c = String::deserialize(d)?;
    check_country(&c).map_err(serde::de::Error::custom)?;
    Ok(Some(c))
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnonymizeConfig {
    /// Refuse to make branches straight from the root branch (it holds PII);
    /// derive them from the anonymized branch instead.
    #[serde(default)]
    pub refuse_root_children: bool,
    /// The country whose E.164 shape `phone` fakes take (a rule's own `{ phone = "…" }`
    /// wins); none: a national-looking number.
    #[serde(default, deserialize_with = "country_field")]
    pub country: Option<String>,
    #[serde(default)]
    pub columns: BTreeMap<ColumnRef, MaskRule>,
}

/// `"name"` → `"name"` with inner quotes doubled: a safe SQL identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A SQL string literal.
pub fn literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The SQL expression replacing column `c` under `rule`; `salt` keys the hashes so fakes
/// cannot be reversed by hashing guesses without it; `country` is `[anonymize] country`.
pub fn expression(rule: &MaskRule, column: &str, salt: &str, country: Option<&str>) -> String {
    let c = ident(column);
    let keyed = format!("md5({} || {c}::text)", literal(salt));
    let when = |e: String| format!("CASE WHEN {c} IS NULL THEN NULL ELSE {e} END");
    match rule {
        MaskRule::Email => when(format!(
            "'user_' || substr({keyed}, 1, 20) || '@example.com'"
        )),
        MaskRule::Name => when(fakes::name(NamePart::of_column(column), &keyed)),
        MaskRule::NamePart(part) => when(fakes::name(*part, &keyed)),
        MaskRule::Username => when(fakes::username(&keyed)),
        MaskRule::Phone(own) => when(fakes::phone(own.as_deref().or(country), &keyed)),
        MaskRule::Hash => when(format!(
            "encode(sha256(convert_to({} || {c}::text, 'UTF8')), 'hex')",
            literal(salt)
        )),
        MaskRule::Null => "NULL".into(),
        MaskRule::Constant(v) => literal(v),
        MaskRule::KeepFirst(n) => when(format!(
            "left({c}::text, {n}) || repeat('*', greatest(length({c}::text) - {n}, 0))"
        )),
        MaskRule::Sql(e) => format!("({e})"),
    }
}

/// One UPDATE per table, setting every masked column of it at once.
pub fn update_statements(config: &AnonymizeConfig, salt: &str) -> Vec<(String, String, String)> {
    let mut by_table: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for (col, rule) in &config.columns {
        by_table
            .entry((col.schema.clone(), col.table.clone()))
            .or_default()
            .push(format!(
                "{} = {}",
                ident(&col.column),
                expression(rule, &col.column, salt, config.country.as_deref())
            ));
    }
    by_table
        .into_iter()
        .map(|((schema, table), sets)| {
            let sql = format!(
                "UPDATE {}.{} SET {}",
                ident(&schema),
                ident(&table),
                sets.join(", ")
            );
            (schema, table, sql)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_with_helpful_errors() {
        let c: AnonymizeConfig = toml::from_str(
            "[columns]\n\"public.users.email\" = \"email\"\n\"public.users.card\" = { keep_first = 4 }\n",
        )
        .unwrap();
        assert_eq!(c.columns.len(), 2);
        let e = toml::from_str::<AnonymizeConfig>("[columns]\n\"public.users.email\" = \"mask\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown masking rule \"mask\"")
                && e.contains("keep_first")
                && e.contains("line 2"),
            "{e}"
        );
        let e = toml::from_str::<AnonymizeConfig>("[columns]\n\"users.email\" = \"email\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("schema.table.column"), "{e}");
    }

    #[test]
    fn one_update_per_table_with_quoted_names() {
        let c: AnonymizeConfig = toml::from_str(
            "[columns]\n\"public.users.email\" = \"email\"\n\"public.users.note\" = \"null\"\n\"s.T\\\"x.c\" = { constant = \"it's\" }\n",
        )
        .unwrap();
        let stmts = update_statements(&c, "salt");
        assert_eq!(stmts.len(), 2);
        assert!(
            stmts[0]
                .2
                .starts_with("UPDATE \"public\".\"users\" SET \"email\" = CASE"),
            "{}",
            stmts[0].2
        );
        assert!(stmts[0].2.contains("\"note\" = NULL"));
        assert!(
            stmts[1].2.contains("\"T\"\"x\"") && stmts[1].2.contains("'it''s'"),
            "{}",
            stmts[1].2
        );
    }
}
