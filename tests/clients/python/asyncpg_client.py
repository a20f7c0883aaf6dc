"""asyncpg through the pgtwig proxy: prepared statements (asyncpg prepares
everything), COPY both ways, LISTEN/NOTIFY pids, cancel, terminate-by-pid,
TLS and a branch switch. See harness.py for the contract."""

import asyncio
import io
import time

import asyncpg

from harness import (DIRECT_URLS, PROXY_URL, SSLMODE, check, done, other_branch, passed,
                     use, wait_until)


def connect(url=PROXY_URL):
    return asyncpg.connect(url, timeout=10)


async def error_class(coro):
    try:
        await coro
    except (asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError) as e:
        return type(e).__name__, getattr(e, "sqlstate", None)
    return None, None


async def wait_for(secs, what, f):
    deadline = time.monotonic() + secs
    while not await f():
        assert time.monotonic() < deadline, f"timed out after {secs}s waiting for {what}"
        await asyncio.sleep(0.02)


async def main():
    branch = await (await connect()).fetchval("select branch from marker")
    direct = await connect(DIRECT_URLS[branch])

    async def backend_state(pid):
        return await direct.fetchval("select state from pg_stat_activity where pid = $1", pid)

    c = await connect()
    ssl_object = c._transport.get_extra_info("ssl_object")
    check("tls", (ssl_object is not None) == (SSLMODE == "require"), f"ssl_object={ssl_object}")

    for round_ in ("fresh", "reused"):
        c = await connect()
        pid = await c.fetchval("select pg_backend_pid()")
        check(f"pid_{round_}", c.get_server_pid() == pid, f"get_server_pid={c.get_server_pid()} server={pid}")
        check(f"pid_{round_}_real", await backend_state(pid) is not None)
        await c.close()

    # Prepared statements: explicit, and the statement cache behind every query.
    c = await connect()
    await c.execute("create temp table items(id int primary key, name text)")
    await c.executemany("insert into items values ($1, $2)", [(i, f"n{i}") for i in range(100)])
    stmt = await c.prepare("select name from items where id = $1")
    check("prepared_results", [await stmt.fetchval(i) for i in range(5)] == [f"n{i}" for i in range(5)])
    check("prepared_on_server", await c.fetchval("select count(*) from pg_prepared_statements") >= 2)
    for i in range(3):
        assert await c.fetchval("select $1::int * 3", i) == i * 3
    passed.append("statement_cache")

    # COPY both ways: binary records in, text and binary out, text in.
    rows = [(i, "x" * (i % 3000)) for i in range(2000)]
    await c.execute("create temp table big(id int, body text)")
    await c.copy_records_to_table("big", records=rows)
    check("copy_records_in", await c.fetchval("select count(*) from big") == len(rows))
    out = io.BytesIO()
    await c.copy_from_table("big", output=out)
    text = out.getvalue()
    back = [(int(a), b) for a, b in (line.split("\t") for line in text.decode().splitlines())]
    check("copy_text_out", back == rows, f"{len(back)} rows back")
    out = io.BytesIO()
    await c.copy_from_query("select * from big", output=out, format="binary")
    check("copy_binary_out", len(out.getvalue()) > sum(len(b) for _, b in rows))
    await c.execute("truncate big")
    await c.copy_to_table("big", source=io.BytesIO(text))
    check("copy_text_in", [tuple(r) for r in await c.fetch("select * from big order by id")] == rows)

    # COPY streamed from one connection straight into another (the TLS
    # stall of issue 13): chunks go through a queue as they arrive.
    a, b = await connect(), await connect()
    await a.execute("create temp table src as select g as id, repeat('y', 5000) as body from generate_series(1, 500) g")
    await b.execute("create temp table dst(id int, body text)")
    for _ in range(20):
        await b.execute("truncate dst")
        queue = asyncio.Queue(maxsize=4)

        async def chunks():
            while (chunk := await queue.get()) is not None:
                yield chunk

        async def produce():
            await a.copy_from_table("src", output=queue.put)
            await queue.put(None)

        await asyncio.wait_for(asyncio.gather(produce(), b.copy_to_table("dst", source=chunks())), 60)
        n = await b.fetchval("select count(*) from dst")
        assert n == 500, f"piped COPY gave {n} rows"
    passed.append("copy_pipe")

    # LISTEN/NOTIFY: pids are the senders' server pids, our own included.
    listener, sender = await connect(), await connect()
    got = {}
    both = asyncio.get_running_loop().create_future()

    def on_notify(_conn, pid, _channel, payload):
        got[payload] = pid
        if len(got) == 2 and not both.done():
            both.set_result(None)

    await listener.add_listener("ch", on_notify)
    await sender.execute("notify ch, 'from-sender'")
    await listener.execute("notify ch, 'from-self'")
    await asyncio.wait_for(both, 10)
    check("notify_pid_other", got["from-sender"] == sender.get_server_pid(), got)
    check("notify_pid_self", got["from-self"] == listener.get_server_pid(), got)

    # Cancel: cancelling the task sends a CancelRequest through the proxy.
    c = await connect()
    pid = c.get_server_pid()
    task = asyncio.create_task(c.execute("select pg_sleep(60)"))
    await wait_for(10, "pg_sleep to run", lambda: _is(backend_state(pid), "active"))
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    start = time.monotonic()
    check("cancel", await asyncio.wait_for(c.fetchval("select 1"), 10) == 1 and time.monotonic() - start < 10)
    check("cancel_reached_backend", await backend_state(pid) == "idle", await backend_state(pid))
    cls = await error_class(c.fetchval("select pg_sleep(60)", timeout=0.5))
    # A query timeout is a cancel too: the connection stays usable at once.
    check("cancel_by_timeout", cls[0] == "TimeoutError", cls)
    check("cancel_by_timeout_usable", await asyncio.wait_for(c.fetchval("select 2"), 10) == 2)

    # Terminate by pid, through the proxy and direct: the same error.
    async def terminate(victim_url, killer):
        victim = await connect(victim_url)
        vpid = victim.get_server_pid()
        check("terminate_returns_true", await killer.fetchval("select pg_terminate_backend($1)", vpid) is True)
        await wait_for(10, "the victim backend to exit", lambda: _is(backend_state(vpid), None))
        # asyncpg takes the FATAL and the end of the stream as they come; wait for both so
        # direct and proxy are compared in the same state.
        await wait_for(10, "the victim to see its connection end", lambda: _true(victim.is_closed()))
        return await error_class(victim.fetchval("select 1"))

    # Terminated in the middle of a query: the FATAL is that query's answer.
    async def terminate_running(victim_url, killer):
        victim = await connect(victim_url)
        vpid = victim.get_server_pid()
        task = asyncio.create_task(error_class(victim.fetchval("select pg_sleep(60)")))
        await wait_for(10, "pg_sleep to run", lambda: _is(backend_state(vpid), "active"))
        await killer.fetchval("select pg_terminate_backend($1)", vpid)
        return await asyncio.wait_for(task, 10)

    running_direct = await terminate_running(DIRECT_URLS[branch], direct)
    running_proxy = await terminate_running(PROXY_URL, await connect())
    check("terminate_running", running_direct == running_proxy, f"proxy {running_proxy}, direct {running_direct}")

    via_direct = await terminate(DIRECT_URLS[branch], direct)
    via_proxy = await terminate(PROXY_URL, await connect())
    check("terminate_by_pid", via_proxy == via_direct, f"proxy {via_proxy}, direct {via_direct}")

    # A branch switch: AdminShutdownError for a session with history; a
    # session that has sent nothing is moved silently.
    used = await connect()
    await used.fetchval("select 1")
    fresh = await connect()
    await asyncio.to_thread(use, other_branch(branch))
    cls = await error_class(used.fetchval("select 1"))
    # The proxy's 57P01 answers the next query and the stream ends, as when a server is
    # terminated under a running query; asyncpg reports both alike (direct it says
    # ConnectionDoesNotExistError: the end of the stream wins over the FATAL before it).
    check("switch_admin_shutdown", cls == running_direct, f"switch {cls}, terminated direct {running_direct}")
    check("switch_fresh_moved", await fresh.fetchval("select branch from marker") == other_branch(branch))
    check("switch_new_sessions", await (await connect()).fetchval("select branch from marker") == other_branch(branch))
    done(branch_after=other_branch(branch), terminate_error=via_direct)


async def _true(value):
    return value


async def _is(coro, value):
    return await coro == value


asyncio.run(main())
