"""psycopg 3 through the pgtwig proxy: sync and async, pipeline mode,
prepared statements, COPY both ways, LISTEN/NOTIFY pids, cancel,
terminate-by-pid, TLS and a branch switch. See harness.py for the contract."""

import asyncio
import threading
import time

import psycopg
from psycopg import errors

from harness import (DIRECT_URLS, PROXY_URL, SSLMODE, check, done, other_branch, passed,
                     use, wait_until)


def connect(url=PROXY_URL):
    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def one(conn, sql, params=None):
    return conn.execute(sql, params).fetchone()[0]


def backend_is(direct, pid, state):
    return one(direct, "select count(*) from pg_stat_activity where pid = %s and state = %s",
               (pid, state)) == 1


def error_class(f):
    try:
        f()
    except psycopg.Error as e:
        return type(e).__name__, e.sqlstate
    return None, None


branch = one(connect(), "select branch from marker")
direct = psycopg.connect(DIRECT_URLS[branch], autocommit=True)

# TLS is what was asked for, and the server sees the proxy, not the client.
c = connect()
check("tls", c.pgconn.ssl_in_use == (SSLMODE == "require"), f"ssl_in_use={c.pgconn.ssl_in_use}")

# The backend pid is the server's own, on a fresh and on a reused server
# connection (the proxy reuses server connections after DISCARD ALL).
for round_ in ("fresh", "reused"):
    c = connect()
    pid = one(c, "select pg_backend_pid()")
    check(f"pid_{round_}", c.info.backend_pid == pid, f"info.backend_pid={c.info.backend_pid} server={pid}")
    check(f"pid_{round_}_real", one(direct, "select count(*) from pg_stat_activity where pid = %s", (pid,)) == 1)
    c.close()

# Prepared statements: psycopg's own (prepare=True, server-side after the
# first use) and SQL PREPARE/EXECUTE.
c = connect()
c.execute("create temp table items(id int primary key, name text)")
for i in range(5):
    c.execute("insert into items values (%s, %s)", (i, f"n{i}"), prepare=True)
names = [one(c, "select name from items where id = %s", (i,)) for i in range(5)]
check("prepared_results", names == [f"n{i}" for i in range(5)], names)
check("prepared_on_server", one(c, "select count(*) from pg_prepared_statements where name like '_pg3_%%'") >= 1)
c.execute("prepare byid(int) as select name from items where id = $1")
check("sql_prepare", one(c, "execute byid(3)") == "n3")

# Pipeline mode: many statements in flight, results in order; an error in
# the pipeline aborts the rest and the connection recovers.
with c.pipeline():
    curs = [c.execute("select %s::int * 2", (i,)) for i in range(50)]
check("pipeline_results", [cur.fetchone()[0] for cur in curs] == [i * 2 for i in range(50)])
try:
    with c.pipeline():
        c.execute("select 1")
        c.execute("select 1/0")
        c.execute("select 2")
    check("pipeline_error", False, "division by zero not raised")
except errors.DivisionByZero:
    passed.append("pipeline_error")
check("pipeline_recovers", one(c, "select 42") == 42)

# COPY both ways, text and binary, with rows large enough to span messages.
rows = [(i, "x" * (i % 3000)) for i in range(2000)]
with c.cursor() as cur:
    cur.execute("create temp table big(id int, body text)")
    with cur.copy("copy big from stdin") as copy:
        for r in rows:
            copy.write_row(r)
    with cur.copy("copy big to stdout") as copy:
        out = [(int(a), b) for a, b in copy.rows()]
    check("copy_text_roundtrip", out == rows, f"{len(out)} rows back")
    with cur.copy("copy big to stdout (format binary)") as copy:
        copy.set_types(["int4", "text"])
        out = list(copy.rows())
    check("copy_binary_out", out == rows)
    cur.execute("truncate big")
    with cur.copy("copy big from stdin (format binary)") as copy:
        copy.set_types(["int4", "text"])
        for r in rows:
            copy.write_row(r)
    check("copy_binary_in", one(c, "select count(*) from big") == len(rows))

# LISTEN/NOTIFY: the notification's pid is the sender's backend_pid, both
# for another connection's NOTIFY and for our own (what apps filter on).
listener, sender = connect(), connect()
listener.execute("listen ch")
sender.execute("notify ch, 'from-sender'")
listener.execute("notify ch, 'from-self'")
got = {n.payload: n.pid for n in listener.notifies(timeout=10, stop_after=2)}
check("notify_pid_other", got.get("from-sender") == sender.info.backend_pid, got)
check("notify_pid_self", got.get("from-self") == listener.info.backend_pid, got)

# Cancel: a long query is cancelled through the proxy's BackendKeyData.
c = connect()
pid = c.info.backend_pid


def cancel_when_running():
    wait_until(10, "pg_sleep to run", lambda: backend_is(direct, pid, "active"))
    c.cancel_safe(timeout=10)


t = threading.Thread(target=cancel_when_running)
t.start()
start = time.monotonic()
cls, state = error_class(lambda: c.execute("select pg_sleep(60)"))
t.join()
check("cancel", (cls, state) == ("QueryCanceled", "57014") and time.monotonic() - start < 20, (cls, state))
check("cancel_then_usable", one(c, "select 1") == 1)


# Terminate by pid: another connection's backend_pid, through the proxy and
# direct; the victim sees the same error either way.
def terminate(victim_url, killer):
    victim = psycopg.connect(victim_url, autocommit=True)
    victim_pid = victim.info.backend_pid
    check("terminate_returns_true", one(killer, "select pg_terminate_backend(%s)", (victim_pid,)) is True)
    wait_until(10, "the victim backend to exit",
               lambda: one(direct, "select count(*) from pg_stat_activity where pid = %s", (victim_pid,)) == 0)
    return error_class(lambda: victim.execute("select 1"))


via_direct = terminate(DIRECT_URLS[branch], direct)
via_proxy = terminate(PROXY_URL, connect())
check("terminate_by_pid", via_proxy == via_direct and via_direct[1] == "57P01",
      f"proxy {via_proxy}, direct {via_direct}")

# A branch switch: a session with history gets 57P01 (AdminShutdown) at
# its next query; one that has sent nothing yet is moved silently.
used = connect()
one(used, "select 1")
fresh = connect()
use(other_branch(branch))
cls, state = error_class(lambda: used.execute("select 1"))
check("switch_admin_shutdown", (cls, state) == ("AdminShutdown", "57P01"), (cls, state))
check("switch_fresh_moved", one(fresh, "select branch from marker") == other_branch(branch))
check("switch_new_sessions", one(connect(), "select branch from marker") == other_branch(branch))
branch = other_branch(branch)
direct = psycopg.connect(DIRECT_URLS[branch], autocommit=True)


# The async API: prepared, pipeline, COPY piped between two connections
# (the TLS stall of issue 13), NOTIFY pids and cancel.
async def async_checks():
    connect_async = lambda: psycopg.AsyncConnection.connect(PROXY_URL, autocommit=True)  # noqa: E731
    a, b = await connect_async(), await connect_async()
    check("async_pid", a.info.backend_pid == (await (await a.execute("select pg_backend_pid()")).fetchone())[0])
    for i in range(3):
        cur = await a.execute("select %s::int + 1", (i,), prepare=True)
        assert (await cur.fetchone())[0] == i + 1
    passed.append("async_prepared")
    async with a.pipeline():
        curs = [await a.execute("select %s::text", (str(i),)) for i in range(20)]
    check("async_pipeline", [(await c.fetchone())[0] for c in curs] == [str(i) for i in range(20)])

    await a.execute("create temp table src as select g as id, repeat('y', 5000) as body from generate_series(1, 500) g")
    await b.execute("create temp table dst(id int, body text)")
    for _ in range(20):
        await b.execute("truncate dst")
        async with a.cursor().copy("copy src to stdout") as out, b.cursor().copy("copy dst from stdin") as into:
            async for chunk in out:
                await into.write(chunk)
        n = (await (await b.execute("select count(*) from dst")).fetchone())[0]
        assert n == 500, f"piped COPY gave {n} rows"
    passed.append("async_copy_pipe")

    await a.execute("listen ach")
    await b.execute("notify ach, 'x'")
    async for n in a.notifies(timeout=10, stop_after=1):
        check("async_notify_pid", n.pid == b.info.backend_pid, (n.pid, b.info.backend_pid))

    pid = b.info.backend_pid

    async def cancel_when_running():
        await asyncio.to_thread(wait_until, 10, "pg_sleep to run", lambda: backend_is(direct, pid, "active"))
        await b.cancel_safe(timeout=10)

    task = asyncio.create_task(cancel_when_running())
    try:
        await b.execute("select pg_sleep(60)")
        check("async_cancel", False, "not cancelled")
    except errors.QueryCanceled:
        passed.append("async_cancel")
    await task


asyncio.run(async_checks())
done(branch_after=branch)
