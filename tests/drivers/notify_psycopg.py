"""psycopg 3 listeners through transaction pooling (odissey's port in
argv[1], listeners in argv[2]): half in autocommit, half in psycopg's
default transactions (the LISTEN takes effect at COMMIT), one more whose
LISTEN is rolled back. Prints "listening" once all are set and waits for a
line on stdin (the test looks at odissey meanwhile), then a notifier sends
20 notifications: every listener gets each once, in order, the rolled-back
one none; the first ten UNLISTEN and get no more, the others get the rest."""
import sys

import psycopg

POOLER = f"host=127.0.0.1 port={sys.argv[1]} dbname=test user=trust_user"
COUNT = int(sys.argv[2])
CH = "psy_jobs"

failures = 0


def fail(msg):
    global failures
    print(msg, flush=True)
    failures += 1


listeners = []
for k in range(COUNT):
    if k % 2 == 0:
        conn = psycopg.connect(POOLER, autocommit=True)
        conn.execute(f"LISTEN {CH}")
    else:
        # psycopg's default: BEGIN first, the LISTEN in the transaction.
        conn = psycopg.connect(POOLER)
        conn.execute(f"LISTEN {CH}")
        conn.commit()
    listeners.append(conn)
rolled = psycopg.connect(POOLER)
rolled.execute(f"LISTEN {CH}")
rolled.rollback()

print("listening", flush=True)
sys.stdin.readline()


def expect(conn, want, timeout=10):
    got = [(n.channel, n.payload)
           for n in conn.notifies(timeout=timeout, stop_after=len(want) or None)]
    return got == want, got


with psycopg.connect(POOLER, autocommit=True) as notifier:
    for i in range(20):
        if i % 2:
            notifier.execute("SELECT pg_notify(%s, %s)", (CH, f"p{i}"))
        else:
            notifier.execute(f"NOTIFY {CH}, 'p{i}'")
    want = [(CH, f"p{i}") for i in range(20)]
    for k, conn in enumerate(listeners):
        ok, got = expect(conn, want)
        if not ok:
            fail(f"listener {k}: got {got}, want {want}")
    ok, got = expect(rolled, [], timeout=0.5)
    if not ok:
        fail(f"the rolled-back LISTEN got {got}")
    for conn in listeners[:10]:
        conn.execute(f"UNLISTEN {CH}")
        conn.commit()
    for i in range(3):
        notifier.execute("SELECT pg_notify(%s, %s)", (CH, f"late{i}"))
    late = [(CH, f"late{i}") for i in range(3)]
    for k, conn in enumerate(listeners):
        if k < 10:
            ok, got = expect(conn, [], timeout=0.3)
        else:
            ok, got = expect(conn, late)
        if not ok:
            fail(f"listener {k} after the UNLISTENs: got {got}")
for conn in listeners + [rolled]:
    conn.close()
print(f"psycopg listeners: {failures} failure(s)", flush=True)
sys.exit(1 if failures else 0)
