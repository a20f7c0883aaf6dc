// node-postgres (pg, pg-query-stream, pg-copy-streams) through the pgtwig
// proxy: prepared statements, pipeline mode, cursors, COPY both ways,
// LISTEN/NOTIFY pids, cancel, terminate-by-pid, TLS and a branch switch.
// The environment is the one tests/clients/python/harness.py describes; the
// last line printed is one JSON object with the checks passed.
'use strict'

const { execFileSync } = require('node:child_process')
const { pipeline } = require('node:stream/promises')
const { Readable } = require('node:stream')
const pg = require('pg')
const QueryStream = require('pg-query-stream')
const copy = require('pg-copy-streams')

const SSLMODE = process.env.SSLMODE
const DIRECT_URLS = JSON.parse(process.env.DIRECT_URLS)
const PGTWIG_USE = JSON.parse(process.env.PGTWIG_USE)
const passed = []

function check (name, ok, detail) {
  if (!ok) throw new Error(`${name}: ${typeof detail === 'string' ? detail : JSON.stringify(detail)}`)
  passed.push(name)
}

// pg reads sslmode=require as verify-full; the proxy's certificate is its
// own, so ask for TLS without verification as libpq's require does.
function proxyConfig (extra = {}) {
  const url = new URL(process.env.PROXY_URL)
  url.searchParams.delete('sslmode')
  return { connectionString: url.toString(), ssl: SSLMODE === 'require' ? { rejectUnauthorized: false } : false, ...extra }
}

async function connect (config = proxyConfig()) {
  const c = new pg.Client(config)
  c.errors = []
  c.ended = false
  c.on('error', (e) => c.errors.push(e))
  c.on('end', () => { c.ended = true })
  await c.connect()
  return c
}

const direct = (branch) => connect({ connectionString: DIRECT_URLS[branch] })
const one = async (c, sql, values) => Object.values((await c.query(sql, values)).rows[0])[0]

async function waitUntil (secs, what, f) {
  const deadline = Date.now() + secs * 1000
  while (!(await f())) {
    if (Date.now() > deadline) throw new Error(`timed out after ${secs}s waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
}

async function errorOf (promise) {
  try {
    await promise
    return null
  } catch (e) {
    return { code: e.code ?? null, message: e.message }
  }
}

const other = (b) => (b === 'main' ? 'dev' : 'main')

async function main () {
  let branch = await one(await connect(), 'select branch from marker')
  const d = await direct(branch)
  const stateOf = async (pid) => (await d.query('select state from pg_stat_activity where pid = $1', [pid])).rows[0]?.state ?? null

  let c = await connect()
  check('tls', Boolean(c.connection.stream.encrypted) === (SSLMODE === 'require'), `encrypted=${c.connection.stream.encrypted}`)
  await c.end()

  for (const round of ['fresh', 'reused']) {
    c = await connect()
    const pid = await one(c, 'select pg_backend_pid()')
    check(`pid_${round}`, c.processID === pid, { processID: c.processID, server: pid })
    check(`pid_${round}_real`, (await stateOf(pid)) !== null)
    await c.end()
  }

  // Prepared statements: named queries are parsed once per connection.
  c = await connect()
  await c.query('create temp table items(id int primary key, name text)')
  for (let i = 0; i < 5; i++) {
    await c.query({ name: 'ins', text: 'insert into items values ($1, $2)', values: [i, `n${i}`] })
  }
  const names = []
  for (let i = 0; i < 5; i++) names.push(await one(c, { name: 'byid', text: 'select name from items where id = $1', values: [i] }))
  check('prepared_results', JSON.stringify(names) === JSON.stringify([0, 1, 2, 3, 4].map((i) => `n${i}`)), names)
  check('prepared_on_server', Number(await one(c, "select count(*) from pg_prepared_statements where name in ('ins', 'byid')")) === 2)

  // A cursor through pg-query-stream (portal with row limits).
  let streamed = 0
  for await (const row of c.query(new QueryStream('select g from generate_series(1, 10000) g', [], { batchSize: 100 }))) {
    streamed += row.g
  }
  check('query_stream', streamed === 10000 * 10001 / 2, streamed)

  // Pipeline mode: all queries on the wire at once, answers in order.
  const p = await connect(proxyConfig({ pipeline: true }))
  const results = await Promise.all([...Array(50).keys()].map((i) => one(p, 'select $1::int * 2 as v', [i])))
  check('pipeline_results', results.every((v, i) => v === i * 2), results)
  const mixed = await Promise.allSettled([one(p, 'select 1 as v'), one(p, 'select 1/0 as v'), one(p, 'select 3 as v')])
  check('pipeline_error', mixed[1].status === 'rejected' && mixed[1].reason.code === '22012', mixed)
  check('pipeline_recovers', (await one(p, 'select 42 as v')) === 42)
  await p.end()

  // COPY both ways with pg-copy-streams, rows spanning messages.
  const rows = [...Array(2000).keys()].map((i) => `${i}\t${'x'.repeat(i % 3000)}\n`)
  await c.query('create temp table big(id int, body text)')
  await pipeline(Readable.from(rows), c.query(copy.from('copy big from stdin')))
  check('copy_in', Number(await one(c, 'select count(*) from big')) === rows.length)
  const chunks = []
  await pipeline(c.query(copy.to('copy big to stdout')), async function * (source) { for await (const chunk of source) chunks.push(chunk) })
  check('copy_out', Buffer.concat(chunks).toString() === rows.join(''), `${Buffer.concat(chunks).length} bytes back`)

  // COPY streamed from one connection straight into another (the TLS stall).
  const a = await connect()
  const b = await connect()
  await a.query("create temp table src as select g as id, repeat('y', 5000) as body from generate_series(1, 500) g")
  await b.query('create temp table dst(id int, body text)')
  for (let i = 0; i < 20; i++) {
    await b.query('truncate dst')
    await pipeline(a.query(copy.to('copy src to stdout')), b.query(copy.from('copy dst from stdin')))
    const n = Number(await one(b, 'select count(*) from dst'))
    if (n !== 500) throw new Error(`piped COPY gave ${n} rows`)
  }
  passed.push('copy_pipe')

  // LISTEN/NOTIFY: the pid is the sender's processID, ours included.
  const got = {}
  await a.query('listen ch')
  const both = new Promise((resolve) => a.on('notification', (n) => { got[n.payload] = n.processId; if (Object.keys(got).length === 2) resolve() }))
  await b.query("notify ch, 'from-other'")
  await a.query("notify ch, 'from-self'")
  await Promise.race([both, new Promise((resolve, reject) => setTimeout(() => reject(new Error(`notifications: ${JSON.stringify(got)}`)), 10000))])
  check('notify_pid_other', got['from-other'] === b.processID, got)
  check('notify_pid_self', got['from-self'] === a.processID, got)

  // Cancel through the proxy with the BackendKeyData the client was given.
  const victim = await connect()
  const query = new pg.Query('select pg_sleep(60)')
  const ended = new Promise((resolve) => { query.on('error', resolve); query.on('end', () => resolve(null)) })
  victim.query(query)
  await waitUntil(10, 'pg_sleep to run', async () => (await stateOf(victim.processID)) === 'active')
  new pg.Client(proxyConfig()).cancel(victim, query)
  const err = await Promise.race([ended, new Promise((resolve) => setTimeout(() => resolve('timeout'), 10000))])
  check('cancel', err && err.code === '57014', err && err.message)
  check('cancel_then_usable', (await one(victim, 'select 1 as v')) === 1)

  // Terminate by pid, under a running query and while idle, direct and
  // through the proxy: the client sees the same either way.
  async function terminateRunning (config, killer) {
    const v = await connect(config)
    const running = errorOf(v.query('select pg_sleep(60)'))
    await waitUntil(10, 'pg_sleep to run', async () => (await stateOf(v.processID)) === 'active')
    await killer.query('select pg_terminate_backend($1)', [v.processID])
    return running
  }
  async function terminateIdle (config, killer) {
    const v = await connect(config)
    check('terminate_returns_true', (await one(killer, 'select pg_terminate_backend($1)', [v.processID])) === true)
    await waitUntil(10, 'the victim to see its connection end', () => v.ended)
    return { event: v.errors.map((e) => e.code ?? e.message), next: await errorOf(v.query('select 1')) }
  }
  const runningDirect = await terminateRunning({ connectionString: DIRECT_URLS[branch] }, d)
  const runningProxy = await terminateRunning(proxyConfig(), await connect())
  check('terminate_running', JSON.stringify(runningDirect) === JSON.stringify(runningProxy) && runningDirect.code === '57P01',
    { proxy: runningProxy, direct: runningDirect })
  const idleDirect = await terminateIdle({ connectionString: DIRECT_URLS[branch] }, d)
  const idleProxy = await terminateIdle(proxyConfig(), await connect())
  check('terminate_by_pid', JSON.stringify(idleDirect) === JSON.stringify(idleProxy), { proxy: idleProxy, direct: idleDirect })

  // A branch switch: 57P01 for a session with history, a fresh one moved.
  const used = await connect()
  await used.query('select 1')
  const fresh = await connect()
  execFileSync(PGTWIG_USE[0], [...PGTWIG_USE.slice(1), other(branch)])
  const switched = await errorOf(used.query('select 1'))
  check('switch_admin_shutdown', switched && switched.code === '57P01', switched)
  check('switch_fresh_moved', (await one(fresh, 'select branch from marker')) === other(branch))
  check('switch_new_sessions', (await one(await connect(), 'select branch from marker')) === other(branch))
  branch = other(branch)

  console.log(JSON.stringify({ sslmode: SSLMODE, passed, branch_after: branch }))
  process.exit(0)
}

main().catch((e) => {
  console.error(e.stack || e)
  process.exit(1)
})
