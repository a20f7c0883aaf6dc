// A column with a volatile default: PostgreSQL 15 rewrites the table.
exports.up = (knex) =>
  knex.schema.alterTable('items', (t) => {
    t.float('score').defaultTo(knex.raw('random()'));
  });
exports.down = (knex) => knex.schema.alterTable('items', (t) => t.dropColumn('score'));
