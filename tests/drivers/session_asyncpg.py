"""Session fidelity through odissey with asyncpg (tests/session.rs).

Usage: python3 session_asyncpg.py CASE POOLER_PORT PG_PORT

POOLER_PORT is odissey (route test/trust_user), PG_PORT the PostgreSQL
cluster behind it (used directly to learn what PostgreSQL itself says).
Exits non-zero with every failure on stderr.
"""
import asyncio
import sys

import asyncpg

from session_common import CLIENTS, ROUNDS, Tally, finish

CASE = sys.argv[1]
POOLER = int(sys.argv[2])
PG = int(sys.argv[3])


async def connect(port, **kw):
    return await asyncpg.connect(
        host="127.0.0.1", port=port, database="test", user="trust_user", ssl=False, timeout=10, **kw
    )


class Ready:
    """Every client sets its session before any client reads; a client that
    fails before it is ready counts down too, so the others never wait."""

    def __init__(self, n):
        self.left = n
        self.event = asyncio.Event()

    def count_down(self):
        self.left -= 1
        if self.left <= 0:
            self.event.set()


class Gate:
    def __init__(self, ready):
        self.ready = ready
        self.passed = False

    async def wait(self):
        self.passed = True
        self.ready.count_down()
        await asyncio.wait_for(self.ready.event.wait(), 60)


async def connect_pooled(**kw):
    """A login through odissey; asyncpg's bare AttributeError when a
    ParameterStatus it needs is missing from the greeting is explained."""
    try:
        return await connect(POOLER, **kw)
    except AttributeError as e:
        raise RuntimeError(
            f"asyncpg login through odissey failed: AttributeError: {e} "
            f"(the greeting lacked ParameterStatus {e})"
        ) from e


async def run_clients(tally, n, body):
    """body(k, ready) for clients 0..n-1 as tasks; failures are tallied."""
    latch = Ready(n)

    async def wrap(k):
        ready = Gate(latch)
        try:
            await asyncio.wait_for(body(k, ready), 120)
        except Exception as e:
            if not ready.passed:
                latch.count_down()
            tally.error(f"client {k}: {type(e).__name__}: {e}")

    await asyncio.gather(*(wrap(k) for k in range(n)))


async def server_settings_case():
    """Clients 0-3 log in with server_settings statement_timeout=1500 and
    jit=off (startup parameters); clients 4-7 with none and must read
    PostgreSQL's defaults. Transaction pooling, reads interleaved."""
    d = await connect(PG)
    defaults = (await d.fetchval("SHOW statement_timeout"), await d.fetchval("SHOW jit"))
    await d.close()
    print(f"PostgreSQL defaults: statement_timeout, jit = {defaults}")
    tally = Tally("asyncpg server_settings={'statement_timeout': '1500', 'jit': 'off'} (clients 0-3)")

    async def body(k, ready):
        if k < 4:
            conn = await connect_pooled(server_settings={"statement_timeout": "1500", "jit": "off"})
            expected = ("1500ms", "off")
        else:
            conn = await connect_pooled()
            expected = defaults
        try:
            await ready.wait()
            for r in range(ROUNDS):
                row = await conn.fetchrow(
                    "SELECT current_setting('statement_timeout'), current_setting('jit'), pg_backend_pid()"
                )
                tally.read(k, r, (row[0], row[1]), expected, row[2])
        finally:
            await conn.close()

    await run_clients(tally, CLIENTS, body)
    return tally.report()


async def session_pid_case():
    """Session pooling: conn.get_server_pid() (BackendKeyData) is the
    backend's pid."""
    tally = Tally("session pooling: conn.get_server_pid() = SELECT pg_backend_pid()")

    async def body(k, ready):
        conn = await connect_pooled()
        try:
            given = conn.get_server_pid()
            await ready.wait()
            for r in range(5):
                pid = await conn.fetchval("SELECT pg_backend_pid()")
                tally.read(k, r, given, pid, pid)
        finally:
            await conn.close()

    await run_clients(tally, 4, body)
    return tally.report(need_sharing=False)


def describe(e):
    return (type(e).__name__, getattr(e, "sqlstate", None), str(e))


async def bad_setting_case():
    """server_settings={'statement_timeout': 'abc'}: PostgreSQL refuses the
    login; through odissey the login must fail with the same SQLSTATE and
    message."""
    settings = {"statement_timeout": "abc"}
    try:
        await (await connect(PG, server_settings=settings)).close()
        return [f"PostgreSQL accepted server_settings={settings}: the test expects it to refuse"]
    except asyncpg.PostgresError as e:
        want = describe(e)
    print(f"PostgreSQL: {want}")
    try:
        conn = await connect(POOLER, server_settings=settings)
    except Exception as e:
        got = describe(e)
        print(f"odissey: {got}")
        if got != want:
            return [f"login with server_settings={settings} failed with {got}, PostgreSQL: {want}"]
        return []
    then = "and then"
    try:
        then += f" SHOW statement_timeout read {await conn.fetchval('SHOW statement_timeout')!r}"
    except Exception as e:
        then += f" SHOW statement_timeout failed: {describe(e)}"
    await conn.close()
    return [f"login with server_settings={settings} succeeded through odissey ({then}); PostgreSQL refuses it: {want}"]


async def timeouts_case():
    """asyncpg's own timeout= (a CancelRequest when it fires, often as the
    reply arrives): clients 0-3 run pg_sleep(0.05) with timeouts around
    0.05 s, so their cancels race their replies; clients 4-7 run
    pg_sleep(0.1) with no timeout and must never be cancelled. Transaction
    pooling, 2 servers for 8 clients. A timed-out connection stays usable."""
    tally = Tally("asyncpg timeout= cancels only its own query")
    stats = {"timeouts": 0, "sleeps": 0}

    async def body(k, ready):
        conn = await connect_pooled()
        try:
            await ready.wait()
            for r in range(ROUNDS):
                if k < 4:
                    try:
                        await conn.fetchval("SELECT pg_sleep(0.05)", timeout=0.03 + 0.01 * (r % 5))
                    except asyncio.TimeoutError:
                        stats["timeouts"] += 1
                    except asyncpg.QueryCanceledError:
                        # The cancel of its own timed-out query may land on
                        # its next one: PostgreSQL does the same directly.
                        pass
                    tally.read(k, r, await conn.fetchval("SELECT 1", timeout=30), 1, None)
                else:
                    try:
                        await conn.fetchval("SELECT pg_sleep(0.1)")
                        got = "ran"
                    except asyncpg.PostgresError as e:
                        got = f"{type(e).__name__}: {e}"
                    stats["sleeps"] += 1
                    tally.read(k, r, got, "ran", await conn.fetchval("SELECT pg_backend_pid()"))
        finally:
            await conn.close()

    await run_clients(tally, CLIENTS, body)
    print(f"{stats['timeouts']} timeouts fired; {stats['sleeps']} sleeps of the other clients")
    out = tally.report()
    if stats["timeouts"] < 10:
        out.append(f"only {stats['timeouts']} timeouts fired: the test proves little")
    return out


CASES = {
    "timeouts": timeouts_case,
    "server_settings": server_settings_case,
    "session_pid": session_pid_case,
    "bad_setting": bad_setting_case,
}

if __name__ == "__main__":
    if CASE not in CASES:
        print(f"unknown case {CASE!r}; cases: {', '.join(CASES)}", file=sys.stderr)
        sys.exit(2)
    finish(asyncio.run(CASES[CASE]()))
