// CREATE INDEX CONCURRENTLY cannot run in a transaction: knex's per-migration opt-out.
exports.config = { transaction: false };
exports.up = (knex) => knex.raw('CREATE INDEX CONCURRENTLY items_name_idx ON items (name)');
exports.down = (knex) => knex.raw('DROP INDEX items_name_idx');
