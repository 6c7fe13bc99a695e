"""psycopg 3 through odissey in transaction pooling: server-side prepared
statements (prepare_threshold=0 prepares on first use) and pipeline mode,
with several connections sharing few server connections.

Usage: python3 psycopg_check.py PORT. Exits non-zero with a message on
any failure.
"""
import sys
import threading

import psycopg

PORT = int(sys.argv[1])
DSN = f"host=127.0.0.1 port={PORT} dbname=test user=trust_user sslmode=disable"
errors = []


def worker(k: int) -> None:
    try:
        with psycopg.connect(DSN, autocommit=True, prepare_threshold=0) as conn:
            conn.execute("select set_config('application_name', %s, false)", (f"psy{k}",))
            for i in range(50):
                row = conn.execute("select %s::int + %s::int", (i, k), prepare=True).fetchone()
                assert row == (i + k,), row
                name = conn.execute("select current_setting('application_name')").fetchone()[0]
                assert name == f"psy{k}", name
            # Pipeline mode: several statements, one sync, results in order.
            with conn.pipeline():
                curs = [conn.execute("select %s::int * 2", (i,), prepare=True) for i in range(20)]
            assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(20)]
            # A transaction with prepared statements and an error inside.
            with conn.transaction():
                conn.execute("insert into psy values (%s)", (k,), prepare=True)
            try:
                with conn.transaction():
                    conn.execute("insert into psy values (%s)", (k + 1000,), prepare=True)
                    conn.execute("select 1/0")
            except psycopg.errors.DivisionByZero:
                pass
            else:
                raise AssertionError("division by zero did not fail")
            n = conn.execute("select count(*) from psy where k = %s", (k,), prepare=True).fetchone()[0]
            assert n == 1, n
    except Exception as e:  # report every client's failure
        errors.append(f"client {k}: {type(e).__name__}: {e}")


with psycopg.connect(DSN, autocommit=True) as setup:
    setup.execute("drop table if exists psy")
    setup.execute("create table psy (k int)")

threads = [threading.Thread(target=worker, args=(k,)) for k in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()

with psycopg.connect(DSN, autocommit=True) as check:
    total = check.execute("select count(*) from psy").fetchone()[0]
    if total != 6:
        errors.append(f"expected 6 committed rows, found {total}")

if errors:
    print("\n".join(errors), file=sys.stderr)
    sys.exit(1)
print("ok")
