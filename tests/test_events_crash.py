"""Crash test of the SQLite event store: a writer process is killed with SIGKILL at random times, again and
again on one database file, and after every kill the store opens and holds exactly the acknowledged events.

The writer (a small script run with this interpreter) appends deterministic batches (random sizes 1-20, the
sizes drawn from a seeded generator per thread) in a loop, from one thread or several, with ``durable``
on in some runs, and prints every acknowledged batch (thread, first sequence number, size, ids) to stdout
once ``append`` has returned. The parent replays the same generators, so it knows each thread's batch in
flight at the kill. After each kill it checks, per writer thread: every acknowledged event is stored with
the id the writer was given and exactly the content it sent; nothing else is stored but, at most, the
whole next batch (a transaction commits whole or not at all); nothing of earlier runs changed. What the
test asserts does not depend on when the kill lands.
"""
from __future__ import annotations

import inspect
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from rec_engine.events import Event, SqliteEventStore

RUNS = 60
T0 = 1_700_000_000.0


def make_batch(run, thread, seq, n):
    """The events a writer thread sends as its batch starting at sequence number ``seq`` (deterministic)."""
    out = []
    for s in range(seq, seq + n):
        rid = f"{run}:{thread}:{s}"
        user = s % 13 if s % 2 else f"user-{s % 7}"
        if s % 5 == 0:
            out.append(Event("impression", user, items=(s, f"i{s}", s + 1), scores=(0.5, 0.25, 0.125), ts=T0 + s,
                             request_id=rid, version="v1"))
        elif s % 5 == 1:
            out.append(Event("rating", user, f"i{s}", value=float(s % 5), ts=T0 + s, request_id=rid))
        else:
            out.append(Event("click", user, s, ts=T0 + s, request_id=rid, attrs={"run": run, "pos": s % 10}))
    return out


def batch_sizes(seed, thread):
    r = random.Random(seed * 1000 + thread)
    while True:
        yield r.randint(1, 20)


WRITER = """
import os, random, sys, threading
from rec_engine.events import Event, SqliteEventStore
T0 = %r

%s
%s
path, run, seed, durable, n_threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", \\
    int(sys.argv[5])
sys.stdin.readline()                       # imports are done; start when the parent says so
store = SqliteEventStore(path, durable=durable)
os.write(1, b"S\\n")


def work(t):
    seq = 0
    for n in batch_sizes(seed, t):
        ids = store.append(make_batch(run, t, seq, n))
        os.write(1, f"A {t} {seq} {n} {ids[0]} {ids[-1]}\\n".encode())   # one write: one whole line
        seq += n


threads = [threading.Thread(target=work, args=(t,), daemon=True) for t in range(n_threads)]
for th in threads:
    th.start()
for th in threads:
    th.join()
""" % (T0, inspect.getsource(make_batch), inspect.getsource(batch_sizes))


class Writer:
    """One writer process, started early (its imports overlap the previous run's check) and released by go()."""

    def __init__(self, script, path, run, seed, durable, n_threads):
        self.run, self.seed, self.durable, self.n_threads = run, seed, durable, n_threads
        self.proc = subprocess.Popen([sys.executable, str(script), str(path), str(run), str(seed),
                                      "1" if durable else "0", str(n_threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=os.environ.copy())
        self.out = bytearray()
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        while True:
            chunk = self.proc.stdout.read1(65536)
            if not chunk:
                return
            self.out += chunk
            if not self.started.is_set() and b"S\n" in self.out:
                self.started.set()

    def go(self):
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()
        if not self.started.wait(30):
            self.proc.kill()
            raise AssertionError(f"writer of run {self.run} did not start: {self.proc.stderr.read().decode()}")

    def kill_after(self, seconds):
        time.sleep(max(0.0, seconds))
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()
        err = self.proc.stderr.read().decode()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()
        assert self.proc.returncode == -signal.SIGKILL, f"writer of run {self.run} died by itself: {err}"
        assert not err, err

    def acknowledged(self):
        """{thread: [(seq, n, first_id, last_id), ...]} from the whole lines printed (a torn last one is not
        an acknowledgement: that batch is in flight)."""
        lines = bytes(self.out).split(b"\n")[:-1]
        assert lines[0] == b"S"
        acked = {t: [] for t in range(self.n_threads)}
        for line in lines[1:]:
            tag, t, seq, n, first, last = line.split()
            assert tag == b"A"
            acked[int(t)].append((int(seq), int(n), int(first), int(last)))
        return acked


def check_run(store, w, after_id):
    """The events of run ``w.run`` as stored (ids > after_id) against what the writer acknowledged."""
    acked = w.acknowledged()
    stored = {}
    for e in store.read(after_id=after_id):
        run, t, seq = map(int, e.request_id.split(":"))
        assert run == w.run, f"an event of run {run} appeared after run {w.run}'s kill"
        stored.setdefault(t, []).append((seq, e))
    n_acked = n_in_flight = 0
    ids = []
    for t in range(w.n_threads):
        sizes = batch_sizes(w.seed, t)
        expect, seq = {}, 0
        for (a_seq, n, first, last) in acked[t]:
            assert (a_seq, n) == (seq, next(sizes)) and last - first + 1 == n
            for i, e in enumerate(make_batch(w.run, t, seq, n)):
                expect[seq + i] = (first + i, e)
            seq += n
        got = stored.get(t, [])
        assert [s for s, _ in got] == sorted(s for s, _ in got)        # ids follow the thread's order
        n_acked += len(expect)
        if len(got) > len(expect):                   # the batch in flight made it, whole
            n = next(sizes)
            assert [s for s, _ in got] == list(range(seq + n)), (t, seq, n, len(got))
            extra = make_batch(w.run, t, seq, n)
            in_flight_ids = [e.id for s, e in got[len(expect):]]
            assert in_flight_ids == list(range(in_flight_ids[0], in_flight_ids[0] + n))
            for i, e in enumerate(extra):
                expect[seq + i] = (in_flight_ids[i], e)
            n_in_flight += n
        assert [s for s, _ in got] == sorted(expect), f"thread {t}: lost or invented events"
        for s, e in got:
            eid, want = expect[s]
            assert e.id == eid and e == want, (s, e, want)
            ids.append(eid)
    return n_acked, n_in_flight, ids


def table_digest(path):
    con = sqlite3.connect(path)
    try:
        return con.execute("SELECT COUNT(*), COALESCE(SUM(id), 0), COALESCE(MAX(id), 0) FROM events").fetchone()
    finally:
        con.close()


@pytest.mark.slow
def test_sigkilled_writers_lose_no_acknowledged_event_and_invent_none(tmp_path):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    path = tmp_path / "events.db"
    plan = random.Random(20240515)
    runs = [dict(run=i, seed=plan.randrange(2**30), durable=plan.random() < 0.3,
                 n_threads=4 if i % 3 == 2 else 1, kill_after=plan.uniform(0.05, 0.4)) for i in range(RUNS)]
    count = id_sum = max_id = 0
    totals = dict(acked=0, in_flight=0, runs_with_in_flight=0)
    t_start = time.monotonic()
    phases = dict(start=0.0, check=0.0)
    nxt = Writer(script, path, **{k: runs[0][k] for k in ("run", "seed", "durable", "n_threads")})
    for i, spec in enumerate(runs):
        w = nxt
        t0 = time.monotonic()
        w.go()
        t_go = time.monotonic()
        phases["start"] += t_go - t0
        if i + 1 < RUNS:                               # the next writer imports while this one runs
            nxt = Writer(script, path, **{k: runs[i + 1][k] for k in ("run", "seed", "durable", "n_threads")})
        w.kill_after(spec["kill_after"] - (time.monotonic() - t_go))
        t_check = time.monotonic()
        with SqliteEventStore(path) as store:         # opens after the crash (recovery)
            n_acked, n_in_flight, ids = check_run(store, w, max_id)
        totals["acked"] += n_acked
        totals["in_flight"] += n_in_flight
        totals["runs_with_in_flight"] += n_in_flight > 0
        assert len(set(ids)) == len(ids) and all(x > max_id for x in ids)
        count, id_sum = count + len(ids), id_sum + sum(ids)
        max_id = max([max_id] + ids)
        assert table_digest(path) == (count, id_sum, max_id), "earlier runs' events changed"
        phases["check"] += time.monotonic() - t_check
    # one full pass at the end: every run's events, in id order, as sent
    with SqliteEventStore(path) as store:
        got = list(store.read())
    assert len(got) == count and [e.id for e in got] == sorted(e.id for e in got)
    assert all(e == make_batch(*map(int, e.request_id.split(":")), 1)[0] for e in got)
    assert totals["acked"] > 0
    spent = ", ".join(f"{k} {v:.1f} s" for k, v in phases.items())
    print(f"{RUNS} kills in {time.monotonic() - t_start:.1f} s ({spent}): {totals}")
