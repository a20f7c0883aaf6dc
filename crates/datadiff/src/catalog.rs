//! The tables of one side of a data diff, read in the diff's snapshot.

use postgres::Transaction;

/// An ordinary table of the compared database.
#[derive(Debug, Clone)]
pub struct Table {
    /// `schema.name`, as printed and matched by `--table`.
    pub name: String,
    /// Quoted for SQL.
    pub sql_name: String,
    /// `p` permanent, `u` unlogged (its buffers are not written at a checkpoint).
    pub persistence: String,
    /// The main fork under the data directory (`pg_relation_filepath`).
    pub relpath: Option<String>,
    /// SELECT allowed and no row-level security policy hiding rows from this role.
    pub readable: bool,
    /// Primary key columns in key order; empty when it has none.
    pub primary_key: Vec<String>,
    pub columns: Vec<Column>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// `format_type`, to cast a key's text back to its type.
    pub type_name: String,
    /// int2, int4 or int8: keys compared as numbers, in index order.
    pub integer: bool,
}

impl Table {
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

const TABLES_SQL: &str = "
SELECT n.nspname::text, c.relname::text, c.relpersistence::text, pg_relation_filepath(c.oid),
       has_table_privilege(c.oid, 'SELECT')
         AND NOT (c.relrowsecurity
                  AND (c.relforcerowsecurity OR NOT pg_has_role(c.relowner, 'USAGE'))
                  AND NOT (SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user)),
       coalesce((SELECT array_agg(a.attname::text ORDER BY k.ord)
                   FROM pg_index i, unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord), pg_attribute a
                  WHERE i.indrelid = c.oid AND i.indisprimary
                    AND a.attrelid = c.oid AND a.attnum = k.attnum), '{}'),
       coalesce((SELECT array_agg(a.attname::text ORDER BY a.attnum) FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'),
       coalesce((SELECT array_agg(format_type(a.atttypid, a.atttypmod) ORDER BY a.attnum) FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}'),
       coalesce((SELECT array_agg(a.atttypid IN (20, 21, 23) ORDER BY a.attnum) FROM pg_attribute a
                  WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped), '{}')
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind = 'r' AND c.relpersistence <> 't'
   AND n.nspname NOT IN ('pg_catalog', 'information_schema')
   AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp\\_%'
 ORDER BY 1, 2";

/// The database's ordinary tables (not the catalogs), sorted by name.
pub fn tables(tx: &mut Transaction<'_>) -> Result<Vec<Table>, postgres::Error> {
    let mut out = Vec::new();
    for row in tx.query(TABLES_SQL, &[])? {
        let schema: String = row.get(0);
        let name: String = row.get(1);
        let names: Vec<String> = row.get(6);
        let types: Vec<String> = row.get(7);
        let integer: Vec<bool> = row.get(8);
        out.push(Table {
            name: format!("{schema}.{name}"),
            sql_name: format!("{}.{}", quote_ident(&schema), quote_ident(&name)),
            persistence: row.get(2),
            relpath: row.get(3),
            readable: row.get(4),
            primary_key: row.get(5),
            columns: names
                .into_iter()
                .zip(types)
                .zip(integer)
                .map(|((name, type_name), integer)| Column {
                    name,
                    type_name,
                    integer,
                })
                .collect(),
        });
    }
    Ok(out)
}

/// Whether `--table` `pattern` names `table`: `schema.name`, or `name` in any schema.
pub fn matches(table: &Table, pattern: &str) -> bool {
    table.name == pattern
        || table
            .name
            .split_once('.')
            .is_some_and(|(_, name)| name == pattern)
}
