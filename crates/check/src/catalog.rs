//! What the app's database holds before and after the command: relations with their
//! relfilenode (a changed one is a rewrite) and row estimates, columns with their null
//! fraction, and FK/CHECK constraints. Row counts are the planner's, after an `ANALYZE` of
//! the clone (exact for tables of up to 30,000 rows, sampled above): counting every table
//! of a production-sized clone would cost more than the migration.

use std::collections::BTreeMap;

use postgres::Client;

const USER_SCHEMAS: &str = "n.nspname NOT IN ('pg_catalog', 'information_schema') \
     AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'";

#[derive(Debug, Clone)]
pub struct Relation {
    pub oid: u32,
    /// `schema.name`.
    pub name: String,
    /// pg_class.relkind: r table, p partitioned, m materialized view, i index.
    pub kind: char,
    pub relfilenode: u32,
    /// Planner estimate; 0 for empty tables (and indexes).
    pub rows: f64,
    /// The table an index is on.
    pub table: Option<u32>,
}

#[derive(Debug, Clone)]
pub struct Column {
    pub name: String,
    pub not_null: bool,
    /// From pg_stats; None when the column has no statistics.
    pub null_frac: Option<f64>,
}

#[derive(Debug, Clone)]
pub struct Constraint {
    pub table: u32,
    pub name: String,
    /// 'f' foreign key, 'c' check.
    pub kind: char,
    pub validated: bool,
    pub definition: String,
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    pub relations: BTreeMap<u32, Relation>,
    /// (table oid, attnum) → column.
    pub columns: BTreeMap<(u32, i16), Column>,
    pub constraints: Vec<Constraint>,
}

impl Catalog {
    pub fn read(client: &mut Client) -> Result<Catalog, postgres::Error> {
        let mut catalog = Catalog::default();
        let sql = format!(
            "SELECT c.oid, n.nspname || '.' || c.relname, c.relkind::text, c.relfilenode, \
                    greatest(c.reltuples, 0)::float8, i.indrelid \
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_index i ON i.indexrelid = c.oid \
             WHERE c.relkind IN ('r', 'p', 'm', 'i') AND {USER_SCHEMAS}"
        );
        for row in client.query(&sql, &[])? {
            let kind: String = row.get(2);
            let oid: u32 = row.get(0);
            catalog.relations.insert(
                oid,
                Relation {
                    oid,
                    name: row.get(1),
                    kind: kind.chars().next().unwrap_or('?'),
                    relfilenode: row.get(3),
                    rows: row.get(4),
                    table: row.get(5),
                },
            );
        }
        let sql = format!(
            "SELECT a.attrelid, a.attnum, a.attname::text, a.attnotnull, s.null_frac::float8 \
             FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             LEFT JOIN pg_stats s ON s.schemaname = n.nspname AND s.tablename = c.relname \
                  AND s.attname = a.attname AND NOT s.inherited \
             WHERE a.attnum > 0 AND NOT a.attisdropped AND c.relkind IN ('r', 'p') AND {USER_SCHEMAS}"
        );
        for row in client.query(&sql, &[])? {
            catalog.columns.insert(
                (row.get(0), row.get(1)),
                Column {
                    name: row.get(2),
                    not_null: row.get(3),
                    null_frac: row.get(4),
                },
            );
        }
        let sql = format!(
            "SELECT con.conrelid, con.conname::text, con.contype::text, con.convalidated, \
                    pg_get_constraintdef(con.oid) \
             FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid \
             JOIN pg_namespace n ON n.oid = c.relnamespace \
             WHERE con.contype IN ('f', 'c') AND {USER_SCHEMAS}"
        );
        for row in client.query(&sql, &[])? {
            let kind: String = row.get(2);
            catalog.constraints.push(Constraint {
                table: row.get(0),
                name: row.get(1),
                kind: kind.chars().next().unwrap_or('?'),
                validated: row.get(3),
                definition: row.get(4),
            });
        }
        Ok(catalog)
    }

    /// Rows of table `oid` (0 when unknown).
    pub fn rows(&self, oid: u32) -> f64 {
        self.relations.get(&oid).map_or(0.0, |r| r.rows)
    }

    pub fn name(&self, oid: u32) -> Option<&str> {
        self.relations.get(&oid).map(|r| r.name.as_str())
    }

    pub fn constraint(&self, table: u32, name: &str) -> Option<&Constraint> {
        self.constraints
            .iter()
            .find(|c| c.table == table && c.name == name)
    }
}
