//! Schema snapshots and their differences, for `pgtwig diff A B`.
//!
//! A snapshot is a sorted set of objects read from the catalogs of one
//! database — tables, columns, indexes, constraints, functions, views,
//! sequences, extensions — each with a key (kind and qualified name) and a
//! definition in PostgreSQL's own words (`pg_get_indexdef`,
//! `pg_get_constraintdef`, `pg_get_viewdef`, `pg_get_functiondef`), so two
//! branches compare object by object and a difference reads like a
//! migration. System schemas are left out.

use std::collections::BTreeMap;

use serde::Serialize;

/// One schema object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Object {
    pub kind: &'static str,
    /// Qualified name, e.g. `public.users.email` for a column.
    pub name: String,
    pub definition: String,
}

/// All objects of one database, keyed by (kind, name).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Snapshot {
    pub objects: BTreeMap<(String, String), Object>,
}

const USER_SCHEMAS: &str = "n.nspname not in ('pg_catalog', 'information_schema', 'pg_toast') \
     and n.nspname not like 'pg_temp_%' and n.nspname not like 'pg_toast_temp_%'";

/// Objects that belong to an extension are the extension's business.
const NOT_FROM_EXTENSION: &str =
    "not exists (select 1 from pg_depend d where d.classid = 'pg_class'::regclass \
     and d.objid = c.oid and d.deptype = 'e')";

impl Snapshot {
    /// Read the schema of the database `client` is connected to.
    pub fn read(client: &mut postgres::Client) -> Result<Snapshot, postgres::Error> {
        let mut snap = Snapshot::default();
        let queries: [(&'static str, String); 8] = [
            (
                "table",
                format!(
                    "select n.nspname || '.' || c.relname, case c.relkind when 'p' then 'partitioned table' \
                     else 'table' end from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                     where c.relkind in ('r', 'p') and {USER_SCHEMAS} and {NOT_FROM_EXTENSION}"
                ),
            ),
            (
                "column",
                format!(
                    "select n.nspname || '.' || c.relname || '.' || a.attname, \
                     format_type(a.atttypid, a.atttypmod) \
                     || case when a.attnotnull then ' not null' else '' end \
                     || coalesce(' default ' || pg_get_expr(ad.adbin, ad.adrelid), '') \
                     from pg_attribute a join pg_class c on c.oid = a.attrelid \
                     join pg_namespace n on n.oid = c.relnamespace \
                     left join pg_attrdef ad on ad.adrelid = a.attrelid and ad.adnum = a.attnum \
                     where a.attnum > 0 and not a.attisdropped and c.relkind in ('r', 'p', 'v', 'm', 'f') \
                     and {USER_SCHEMAS} and {NOT_FROM_EXTENSION}"
                ),
            ),
            (
                "index",
                format!(
                    "select n.nspname || '.' || c.relname, pg_get_indexdef(c.oid) from pg_class c \
                     join pg_namespace n on n.oid = c.relnamespace where c.relkind in ('i', 'I') \
                     and {USER_SCHEMAS} and {NOT_FROM_EXTENSION}"
                ),
            ),
            (
                "constraint",
                format!(
                    "select n.nspname || '.' || c.relname || '.' || k.conname, pg_get_constraintdef(k.oid) \
                     from pg_constraint k join pg_class c on c.oid = k.conrelid \
                     join pg_namespace n on n.oid = c.relnamespace where {USER_SCHEMAS}"
                ),
            ),
            (
                "view",
                format!(
                    "select n.nspname || '.' || c.relname, \
                     case c.relkind when 'm' then 'materialized: ' else '' end \
                     || regexp_replace(pg_get_viewdef(c.oid), '\\s+', ' ', 'g') \
                     from pg_class c join pg_namespace n on n.oid = c.relnamespace \
                     where c.relkind in ('v', 'm') and {USER_SCHEMAS} and {NOT_FROM_EXTENSION}"
                ),
            ),
            (
                "sequence",
                format!(
                    "select n.nspname || '.' || c.relname, format_type(s.seqtypid, null) from pg_class c \
                     join pg_namespace n on n.oid = c.relnamespace join pg_sequence s on s.seqrelid = c.oid \
                     where {USER_SCHEMAS} and {NOT_FROM_EXTENSION}"
                ),
            ),
            (
                "function",
                format!(
                    "select n.nspname || '.' || p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')', \
                     case when p.prokind = 'a' then 'aggregate' \
                     else regexp_replace(pg_get_functiondef(p.oid), '\\s+', ' ', 'g') end \
                     from pg_proc p join pg_namespace n on n.oid = p.pronamespace where {USER_SCHEMAS} \
                     and not exists (select 1 from pg_depend d where d.classid = 'pg_proc'::regclass \
                     and d.objid = p.oid and d.deptype = 'e')"
                ),
            ),
            (
                "extension",
                "select extname, extversion from pg_extension where extname <> 'plpgsql'".to_string(),
            ),
        ];
        for (kind, sql) in queries {
            for row in client.query(sql.as_str(), &[])? {
                let name: String = row.get(0);
                let definition: Option<String> = row.get(1);
                snap.objects.insert(
                    (kind.to_string(), name.clone()),
                    Object {
                        kind,
                        name,
                        definition: definition.unwrap_or_default(),
                    },
                );
            }
        }
        Ok(snap)
    }
}

/// How `b` differs from `a`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SchemaDiff {
    /// In `b` only.
    pub added: Vec<Object>,
    /// In `a` only.
    pub removed: Vec<Object>,
    /// In both, defined differently.
    pub changed: Vec<Change>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: &'static str,
    pub name: String,
    pub from: String,
    pub to: String,
}

impl SchemaDiff {
    pub fn between(a: &Snapshot, b: &Snapshot) -> SchemaDiff {
        let mut diff = SchemaDiff::default();
        for (key, obj) in &a.objects {
            match b.objects.get(key) {
                None => diff.removed.push(obj.clone()),
                Some(other) if other.definition != obj.definition => diff.changed.push(Change {
                    kind: obj.kind,
                    name: obj.name.clone(),
                    from: obj.definition.clone(),
                    to: other.definition.clone(),
                }),
                Some(_) => {}
            }
        }
        for (key, obj) in &b.objects {
            if !a.objects.contains_key(key) {
                diff.added.push(obj.clone());
            }
        }
        diff
    }

    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }

    /// A unified-diff-like rendering, in snapshot order (by kind, then name).
    pub fn unified(&self, a_label: &str, b_label: &str) -> String {
        let mut lines: Vec<((&str, &str), String)> = Vec::new();
        for o in &self.removed {
            lines.push((
                (o.kind, &o.name),
                format!("- {} {}: {}", o.kind, o.name, o.definition),
            ));
        }
        for o in &self.added {
            lines.push((
                (o.kind, &o.name),
                format!("+ {} {}: {}", o.kind, o.name, o.definition),
            ));
        }
        for c in &self.changed {
            lines.push((
                (c.kind, &c.name),
                format!(
                    "- {} {}: {}\n+ {} {}: {}",
                    c.kind, c.name, c.from, c.kind, c.name, c.to
                ),
            ));
        }
        lines.sort_by(|x, y| x.0.cmp(&y.0));
        let mut out = format!("--- {a_label}\n+++ {b_label}\n");
        for (_, l) in lines {
            out.push_str(&l);
            out.push('\n');
        }
        out
    }
}

impl SchemaDiff {
    /// GitHub-flavoured markdown for a pull request comment: a summary line
    /// and the unified rendering in a `diff` block (red/green on GitHub).
    pub fn markdown(&self, a_label: &str, b_label: &str, database: &str) -> String {
        let tick = |s: &str| s.replace('`', "'");
        let mut out = format!(
            "### Schema diff: `{}` → `{}` (database `{}`)\n\n",
            tick(a_label),
            tick(b_label),
            tick(database)
        );
        if self.is_empty() {
            out.push_str("No schema differences.\n");
            return out;
        }
        out.push_str(&format!(
            "{} added, {} removed, {} changed.\n\n```diff\n",
            self.added.len(),
            self.removed.len(),
            self.changed.len()
        ));
        // A fence inside a definition (a function body) must not end the block.
        out.push_str(&self.unified(a_label, b_label).replace("```", "` ` `"));
        out.push_str("```\n");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(items: &[(&'static str, &str, &str)]) -> Snapshot {
        let mut s = Snapshot::default();
        for (kind, name, def) in items {
            s.objects.insert(
                (kind.to_string(), name.to_string()),
                Object {
                    kind,
                    name: name.to_string(),
                    definition: def.to_string(),
                },
            );
        }
        s
    }

    #[test]
    fn added_removed_changed() {
        let a = snap(&[
            ("table", "public.t", "table"),
            ("column", "public.t.x", "integer"),
            ("view", "public.v", "SELECT 1"),
        ]);
        let b = snap(&[
            ("table", "public.t", "table"),
            ("column", "public.t.x", "bigint"),
            ("index", "public.i", "CREATE INDEX i ON t (x)"),
        ]);
        let d = SchemaDiff::between(&a, &b);
        assert_eq!(d.added.len(), 1);
        assert_eq!(d.removed[0].name, "public.v");
        assert_eq!(
            (d.changed[0].from.as_str(), d.changed[0].to.as_str()),
            ("integer", "bigint")
        );
        let text = d.unified("main", "feature");
        assert!(text.starts_with("--- main\n+++ feature\n"), "{text}");
        assert!(
            text.contains("- column public.t.x: integer\n+ column public.t.x: bigint"),
            "{text}"
        );
        assert!(SchemaDiff::between(&a, &a).is_empty());
        let md = d.markdown("main", "feature", "app");
        assert!(md.starts_with("### Schema diff: `main` → `feature` (database `app`)\n\n1 added, 1 removed, 1 changed.\n\n```diff\n--- main\n"), "{md}");
        assert!(
            md.ends_with("+ index public.i: CREATE INDEX i ON t (x)\n```\n")
                || md.contains("+ column public.t.x: bigint\n"),
            "{md}"
        );
        assert!(SchemaDiff::between(&a, &a)
            .markdown("a", "b", "app")
            .contains("No schema differences."));
    }
}
