"""asyncpg listeners (Connection.add_listener) through transaction pooling
(odissey's port in argv[1], listeners in argv[2]). Prints "listening" once
all are set and waits for a line on stdin, then a notifier sends 20
notifications: every listener gets each once, in order, from the
notifier's backend; the first ten remove their listener and get no more."""
import asyncio
import sys

import asyncpg

PORT = int(sys.argv[1])
COUNT = int(sys.argv[2])
CH = "apg_jobs"


async def main():
    failures = 0
    got = [[] for _ in range(COUNT)]
    conns = []
    callbacks = []
    for k in range(COUNT):
        conn = await asyncpg.connect(host="127.0.0.1", port=PORT,
                                     database="test", user="trust_user")

        def cb(_conn, pid, channel, payload, k=k):
            got[k].append((channel, payload, pid))

        await conn.add_listener(CH, cb)
        conns.append(conn)
        callbacks.append(cb)
    print("listening", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    notifier = await asyncpg.connect(host="127.0.0.1", port=PORT,
                                     database="test", user="trust_user")
    pids = set()
    for i in range(20):
        # Each NOTIFY is its own transaction, maybe on another server:
        # the pid a notification carries is the notifying backend's.
        pid = await notifier.fetchval(
            "SELECT pg_backend_pid() FROM (SELECT pg_notify($1, $2)) n",
            CH, f"a{i}")
        pids.add(pid)
    want = [(CH, f"a{i}") for i in range(20)]

    async def settle(k, n):
        for _ in range(100):
            if len(got[k]) >= n:
                return
            await asyncio.sleep(0.05)

    for k in range(COUNT):
        await settle(k, 20)
        if [(c, p) for c, p, _ in got[k]] != want:
            print(f"listener {k}: got {got[k]}", flush=True)
            failures += 1
        elif not all(pid in pids for _, _, pid in got[k]):
            print(f"listener {k}: pids {[p for *_, p in got[k]]} not the notifier's {pids}",
                  flush=True)
            failures += 1
        got[k].clear()
    for k in range(10):
        await conns[k].remove_listener(CH, callbacks[k])
    for i in range(3):
        await notifier.execute(f"NOTIFY {CH}, 'late{i}'")
    late = [(CH, f"late{i}") for i in range(3)]
    for k in range(10, COUNT):
        await settle(k, 3)
    await asyncio.sleep(0.3)
    for k in range(COUNT):
        have = [(c, p) for c, p, _ in got[k]]
        if have != ([] if k < 10 else late):
            print(f"listener {k} after remove_listener: got {have}", flush=True)
            failures += 1
    for conn in conns + [notifier]:
        await conn.close()
    print(f"asyncpg listeners: {failures} failure(s)", flush=True)
    return failures


sys.exit(1 if asyncio.run(main()) else 0)
