"""The TLS COPY stall of issue 13, as a libpq-based async client meets it.

libpq (before PostgreSQL 18) reads at most the free space of its buffer per
PQconsumeInput, which it keeps at 8 kB or more; a TLS record with more
plaintext than that leaves the rest inside OpenSSL, where the socket gives no
sign of it. An async client that waits for its socket before the next
PQconsumeInput (psycopg async, and any libpq event-loop integration) then
waits for data it already has. PostgreSQL never sends such records (its send
buffer is 8 kB), so this shows only behind a proxy that does: the last
records of a COPY TO STDOUT that the proxy sent in one go were never read.

This driver uses psycopg's pure-Python implementation over the system's libpq
(PSYCOPG_IMPL=python, set by the Rust test) and waits for its socket without
psycopg's 0.1 s periodic wake-up, which would turn the stall into a delay.
Each iteration pauses before reading so the proxy's buffers fill and it sends
the largest records it ever does. See harness.py for the contract."""

import asyncio
import os

import psycopg

from harness import PROXY_URL, check, done

# Wait for the socket as an event loop does: only a readable socket wakes it.
psycopg.AsyncConnection.wait.__defaults__ = (3600.0, None)

ITERATIONS = int(os.environ.get("COPY_ITERATIONS", "200"))
ROWS = 300


async def main():
    check("libpq_impl", psycopg.pq.__impl__ == "python", psycopg.pq.__impl__)
    conn = await psycopg.AsyncConnection.connect(PROXY_URL, autocommit=True)
    for i in range(ITERATIONS):
        # Row widths vary so the records' ends fall everywhere in libpq's buffer.
        width = (i * 397) % 3000 + 50

        async def copy_out():
            rows = 0
            sql = f"copy (select g, repeat('x', {width}) from generate_series(1, {ROWS}) g) to stdout"
            async with conn.cursor().copy(sql) as copy:
                await asyncio.sleep(0.05)
                async for _ in copy.rows():
                    rows += 1
            return rows

        try:
            rows = await asyncio.wait_for(copy_out(), 20)
        except asyncio.TimeoutError:
            raise AssertionError(
                f"COPY TO STDOUT stalled in iteration {i} (rows of {width} bytes): the client "
                f"waited for its socket while the data was already in its TLS layer")
        assert rows == ROWS, f"iteration {i}: {rows} rows"
    check("copy_out_after_pause", True)
    done(iterations=ITERATIONS, libpq=psycopg.pq.version())


asyncio.run(main())
