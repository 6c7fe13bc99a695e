"""psycopg 3 listeners through transaction pooling (odissey port in argv[1],
PostgreSQL's in argv[2]): 10 autocommit connections and one in psycopg's
default transactions LISTEN, another notifies;
each listener's conn.notifies() gets every notification once, in order."""
import sys

import psycopg

POOLER = f"host=127.0.0.1 port={sys.argv[1]} dbname=test user=trust_user"

listeners = [psycopg.connect(POOLER, autocommit=True) for _ in range(10)]
for conn in listeners:
    conn.execute("LISTEN psy_jobs")
# psycopg's default (no autocommit): the LISTEN runs inside a transaction
# and takes effect at COMMIT, as on PostgreSQL.
default = psycopg.connect(POOLER)
default.execute("LISTEN psy_jobs")
default.commit()
listeners.append(default)
with psycopg.connect(POOLER, autocommit=True) as notifier:
    for i in range(5):
        notifier.execute("SELECT pg_notify('psy_jobs', %s)", (f"p{i}",))
failures = 0
for k, conn in enumerate(listeners):
    got = [(n.channel, n.payload) for n in conn.notifies(timeout=5, stop_after=5)]
    want = [("psy_jobs", f"p{i}") for i in range(5)]
    if got != want:
        print(f"listener {k}: got {got}, want {want}")
        failures += 1
    conn.execute("UNLISTEN psy_jobs")
    conn.commit()
    conn.close()
print(f"psycopg listeners: {failures} failure(s)")
sys.exit(1 if failures else 0)
