"""Shared bookkeeping of the session-fidelity driver scripts
(tests/session.rs): wrong reads are collected, never raised one by one,
so that a failing run says how many reads were wrong, what was read and
what was expected.
"""
import sys
import threading
from collections import defaultdict

CLIENTS = 8
ROUNDS = 40


class Tally:
    """Reads of a group of clients: each read is compared with what the
    client set; the backend pid of each read tells whether server
    connections were really shared (else the test would prove nothing)."""

    def __init__(self, what: str):
        self.what = what
        self.lock = threading.Lock()
        self.reads = 0
        self.wrong = defaultdict(int)  # client -> count
        self.samples = defaultdict(list)  # client -> [(round, got, expected, pid)]
        self.errors = []  # messages
        self.pid_clients = defaultdict(set)  # backend pid -> clients

    def read(self, client, rnd, got, expected, pid=None):
        with self.lock:
            self.reads += 1
            if pid is not None:
                self.pid_clients[pid].add(client)
            if got != expected:
                self.wrong[client] += 1
                if len(self.samples[client]) < 3:
                    self.samples[client].append((rnd, got, expected, pid))

    def error(self, msg):
        with self.lock:
            self.errors.append(msg)

    def shared(self) -> int:
        """How many backend pids served more than one client."""
        return sum(1 for c in self.pid_clients.values() if len(c) > 1)

    def report(self, need_sharing=True) -> list:
        """The failure lines (empty when all went well); prints a summary."""
        out = []
        total_wrong = sum(self.wrong.values())
        pids = {p: sorted(c) for p, c in self.pid_clients.items()}
        print(
            f"{self.what}: {self.reads} reads, {total_wrong} wrong, "
            f"server pids -> clients: {pids}"
        )
        if total_wrong:
            out.append(
                f"{self.what}: {total_wrong} of {self.reads} reads were wrong "
                f"(clients with wrong reads: {len(self.wrong)})"
            )
            for client in sorted(self.wrong):
                first = "; ".join(
                    f"round {r}: read {g!r}, expected {e!r}" + ("" if p is None else f" (backend pid {p})")
                    for r, g, e, p in self.samples[client]
                )
                out.append(f"  client {client}: {self.wrong[client]} wrong; first: {first}")
        for e in self.errors:
            out.append(f"{self.what}: {e}")
        readers = set().union(*self.pid_clients.values()) if self.pid_clients else set()
        # (With fewer than two clients reading, sharing is impossible; the
        # errors above say why the others did not read.)
        if need_sharing and len(readers) >= 2 and not self.shared():
            out.append(
                f"{self.what}: no server connection served two clients during the "
                f"reads ({pids}): transaction pooling with pool_size 2 must share "
                "them, and without sharing this test proves nothing"
            )
        return out


class Latch:
    """Lets every client set its session before any client reads, so that
    the reads of all clients interleave on the shared servers. A client
    that fails before it is ready counts down too (fail()), so that the
    others never wait for it."""

    def __init__(self, n: int):
        self.left = n
        self.cond = threading.Condition()

    def count_down(self):
        with self.cond:
            self.left -= 1
            self.cond.notify_all()

    def wait(self, timeout=60):
        """count_down, then wait for the others."""
        self.count_down()
        with self.cond:
            if not self.cond.wait_for(lambda: self.left <= 0, timeout):
                raise TimeoutError(f"the other clients were not ready within {timeout} s")


class Gate:
    """One client's view of a Latch: whether it already counted down."""

    def __init__(self, latch: Latch):
        self.latch = latch
        self.passed = False

    def wait(self):
        self.passed = True
        self.latch.wait()


def finish(failures):
    if failures:
        print("FAILED", file=sys.stderr)
        print("\n".join(failures), file=sys.stderr)
        sys.exit(1)
    print("ok")
