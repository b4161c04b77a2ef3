"""The SQLite event store's write and read speed, beside raw ``sqlite3`` writing the same rows, in one run.

A script, not a pytest-benchmark suite (it holds no ``bench_*`` functions, so pytest collects nothing):

    PYTHONPATH=python:.devpath .venv/bin/python bench/bench_events.py [--seconds 0.6] [--rounds 3]
        [--state-events 1000000] [--users 10000] [--dir /tmp] [--json bench/results/events.json]

Writes (each case ``--rounds`` rounds of ``--seconds``, cases interleaved round by round, each on its own
database file in ``--dir``; latency is one ``append`` call, or one transaction for raw sqlite3):

- ``store batch 1``: ``SqliteEventStore.append([event])`` from one thread, and from 8 threads at once
  (group commit: the writer thread commits every append waiting in one transaction);
- ``store batch 100``: ``append`` of 100 events from one thread;
- each with ``durable=False`` (``synchronous=NORMAL``) and ``durable=True`` (``FULL``: an fsync per commit);
- ``raw sqlite3``: one connection to the same schema in WAL mode, ``synchronous`` NORMAL / FULL, the same
  rows already serialized, ``BEGIN IMMEDIATE; INSERT; COMMIT`` per row and per 100 rows (``executemany``).
  The store's extra cost is validation, the hand-off to its writer thread and the wake-up of the caller.

Reads, on a store of ``--state-events`` interactions (clicks, conversions, ratings) by ``--users`` users
over 100k items, written by one batched ``append`` (timed too):

- ``load_state()`` (the online state in bulk) and ``load_state(since=)`` of the newest half;
- ``read()`` of every event, ``read(user=)`` of one user, ``read(kinds="rating")``, ``count()``,
  ``events_after`` of 1000 events another store object wrote.

Prints a Markdown table; the JSON (default ``bench/results/events.json``, git-ignored) holds every row and
the run conditions (CPU, cores, Python, SQLite, the filesystem of ``--dir``, load).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sqlite3
import sys
import tempfile
import threading
import time

import numpy as np

from rec_engine.events import _CREATE, Event, SqliteEventStore, _dumps

T0 = 1_700_000_000.0
INSERT = ("INSERT INTO events (ts, kind, user, item, request_id, version, value, items, scores, attrs, origin) "
          "VALUES (?,?,?,?,?,?,?,?,?,?,?)")


def event_pool(n=1000, seed=0):
    """Feedback as serving sends it: clicks, conversions and ratings with a request id and small attrs."""
    r = random.Random(seed)
    out = []
    for i in range(n):
        kind = r.choice(["click", "click", "click", "conversion", "rating"])
        value = None if kind == "click" else float(r.randint(1, 5))
        out.append(Event(kind, f"user-{r.randrange(10_000)}", f"sku-{r.randrange(100_000)}", ts=T0 + i,
                         request_id=f"req-{i:08d}", version="v7", value=value, attrs={"pos": r.randrange(10)}))
    return out


def row_of(e: Event, origin="bench"):
    """The row the store writes for ``e`` (already serialized, as raw sqlite3 gets it)."""
    return (e.ts, e.kind, e.user, e.item, e.request_id, e.version, e.value, None, None, _dumps(e.attrs), origin)


# ------------------------------------------------------------------------------------------------ write cases
class StoreCase:
    def __init__(self, name, path, durable, batch, threads, pool):
        self.name, self.batch, self.threads, self.pool = name, batch, threads, pool
        self.kind, self.durable, self.impl = "store", durable, "SqliteEventStore.append"
        self.store = SqliteEventStore(path, durable=durable)
        self.lat, self.events, self.wall = [], 0, 0.0

    def run(self, seconds):
        stop = time.perf_counter() + seconds
        lats = [[] for _ in range(self.threads)]

        def work(t):
            pool, b, k, lat = self.pool, self.batch, t * 97, lats[t]
            while time.perf_counter() < stop:
                batch = [pool[(k + j) % len(pool)] for j in range(b)]
                k += b
                t0 = time.perf_counter()
                self.store.append(batch)
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        if self.threads == 1:
            work(0)
        else:
            ths = [threading.Thread(target=work, args=(t,)) for t in range(self.threads)]
            for th in ths:
                th.start()
            for th in ths:
                th.join()
        self.wall += time.perf_counter() - t0
        for lat in lats:
            self.lat += lat
            self.events += len(lat) * self.batch

    def close(self):
        self.store.close()


class RawCase:
    def __init__(self, name, path, durable, batch, pool):
        self.name, self.batch, self.threads = name, batch, 1
        self.kind, self.durable = "raw", durable
        self.impl = f"sqlite3 WAL synchronous={'FULL' if durable else 'NORMAL'}"
        self.rows = [row_of(e) for e in pool]
        self.conn = sqlite3.connect(path, isolation_level=None)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        self.conn.executescript(_CREATE)
        self.lat, self.events, self.wall = [], 0, 0.0

    def run(self, seconds):
        conn, rows, b, k = self.conn, self.rows, self.batch, 0
        stop = time.perf_counter() + seconds
        t_start = time.perf_counter()
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            if b == 1:
                conn.execute(INSERT, rows[k % len(rows)])
            else:
                conn.executemany(INSERT, [rows[(k + j) % len(rows)] for j in range(b)])
            conn.execute("COMMIT")
            self.lat.append(time.perf_counter() - t0)
            k += b
            self.events += b
        self.wall += time.perf_counter() - t_start

    def close(self):
        self.conn.close()


def stats(lat):
    a = np.asarray(lat)
    return float(np.median(a)) * 1e3, float(np.percentile(a, 99)) * 1e3


# ------------------------------------------------------------------------------------------------ reads
def timed(fn, reps):
    ts, out = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return ts, out


def read_cases(path, n_events, n_users, reps):
    r = np.random.default_rng(1)
    users = r.integers(0, n_users, n_events)
    items = r.integers(0, 100_000, n_events)
    kinds = r.choice(3, n_events, p=[0.8, 0.1, 0.1])
    names = ("click", "conversion", "rating")
    t0 = time.perf_counter()
    events = [Event(names[k], f"user-{u}", f"sku-{i}", ts=T0 + j, value=None if k == 0 else 4.0)
              for j, (u, i, k) in enumerate(zip(users.tolist(), items.tolist(), kinds.tolist()))]
    t_make = time.perf_counter() - t0
    rows = []
    with SqliteEventStore(path) as s:
        t0 = time.perf_counter()
        s.append(events)
        t_append = time.perf_counter() - t0
        del events
        rows.append(dict(case=f"append {n_events:,} events in one call", seconds=t_append,
                         events=n_events, note=f"(building the Event objects: {t_make:.1f} s, not counted)"))
        size_mb = sum(os.path.getsize(f"{path}{x}") for x in ("", "-wal") if os.path.exists(f"{path}{x}")) / 1e6

        ts, state = timed(s.load_state, reps)
        assert len(state) == n_users and sum(map(len, state.values())) == n_events
        rows.append(dict(case=f"load_state() ({n_users:,} users)", seconds=float(np.median(ts)),
                         events=n_events, runs=ts))
        since = T0 + n_events // 2
        ts, state = timed(lambda: s.load_state(since=since), reps)
        n_half = sum(map(len, state.values()))
        rows.append(dict(case="load_state(since=) newest half", seconds=float(np.median(ts)), events=n_half, runs=ts))
        del state

        ts, n = timed(lambda: sum(1 for _ in s.read()), max(1, reps - 1))
        rows.append(dict(case="read() every event", seconds=float(np.median(ts)), events=n, runs=ts))
        ts, n = timed(lambda: sum(1 for _ in s.read(kinds="rating")), reps)
        rows.append(dict(case='read(kinds="rating")', seconds=float(np.median(ts)), events=n, runs=ts))
        probe = [f"user-{u}" for u in r.integers(0, n_users, 200).tolist()]
        lat, got = [], 0
        for u in probe:
            t0 = time.perf_counter()
            got += sum(1 for _ in s.read(user=u))
            lat.append(time.perf_counter() - t0)
        med, p99 = stats(lat)
        rows.append(dict(case="read(user=) one user", seconds=med / 1e3, p99_ms=p99, events=got // len(probe),
                         note=f"median of {len(probe)} users, ~{got // len(probe)} events each"))
        ts, n = timed(s.count, reps)
        rows.append(dict(case="count()", seconds=float(np.median(ts)), events=n, runs=ts))
        with SqliteEventStore(path) as other:
            _, cur = s.events_after(None)
            other.append(event_pool(1000, seed=5))
            t0 = time.perf_counter()
            got, cur = s.events_after(cur)
            dt = time.perf_counter() - t0
            assert len(got) == 1000
        rows.append(dict(case="events_after (1,000 new events of another store)", seconds=dt, events=1000))
    return rows, size_mb


# ------------------------------------------------------------------------------------------------ main
def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=0.6, help="length of one round of one write case")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--state-events", type=int, default=1_000_000)
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--read-reps", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where the database files go (default: a temporary folder)")
    ap.add_argument("--json", metavar="PATH", default=os.path.join(os.path.dirname(__file__), "results", "events.json"),
                    help="where the JSON goes ('' for none)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="bench_events_", dir=args.dir)
    t_run = time.perf_counter()
    try:
        pool = event_pool()
        cases = []
        for durable in (False, True):
            d = "durable" if durable else "default"
            p = lambda name: os.path.join(work, f"{name}-{d}.db")       # noqa: E731
            cases += [StoreCase(f"store batch 1, 1 thread, {d}", p("s1"), durable, 1, 1, pool),
                      StoreCase(f"store batch 1, 8 threads, {d}", p("s8"), durable, 1, 8, pool),
                      StoreCase(f"store batch 100, 1 thread, {d}", p("s100"), durable, 100, 1, pool),
                      RawCase(f"raw sqlite3 commit per row, {d}", p("r1"), durable, 1, pool),
                      RawCase(f"raw sqlite3 commit per 100, {d}", p("r100"), durable, 100, pool)]
        for c in cases:                                   # warm-up (file creation, first pages)
            c.run(0.05)
            c.lat, c.events, c.wall = [], 0, 0.0
        for _ in range(args.rounds):
            for c in cases:
                c.run(args.seconds)
        for c in cases:
            c.close()
        write_rows = []
        for c in cases:
            med, p99 = stats(c.lat)
            write_rows.append(dict(case=c.name, impl=c.impl, durable=c.durable, batch=c.batch, threads=c.threads,
                                   events_per_s=c.events / c.wall, median_ms=med, p99_ms=p99, calls=len(c.lat),
                                   events=c.events))
        read_rows, size_mb = read_cases(os.path.join(work, "state.db"), args.state_events, args.users, args.read_reps)
        fs = _filesystem(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    cond = {"cpu": _cpu(), "cores": os.cpu_count(), "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version, "filesystem": fs, "loadavg": os.getloadavg(),
            "seconds_per_round": args.seconds, "rounds": args.rounds, "state_events": args.state_events,
            "users": args.users, "state_db_mb": size_mb, "run_seconds": time.perf_counter() - t_run}
    print(f"\n## Event store writes ({args.rounds} interleaved rounds of {args.seconds} s per case; "
          f"{cond['cpu']}, {cond['cores']} cores, SQLite {cond['sqlite']}, {fs}, load {cond['loadavg'][0]:.2f})\n")
    print("| case | events/s | median ms | p99 ms | calls |")
    print("|---|---:|---:|---:|---:|")
    for r in write_rows:
        print(f"| {r['case']} | {r['events_per_s']:,.0f} | {r['median_ms']:.3f} | {r['p99_ms']:.3f} | {r['calls']:,} |")
    print(f"\n## Event store reads ({args.state_events:,} interactions, {args.users:,} users, "
          f"{size_mb:.0f} MB on disk)\n")
    print("| case | seconds | events | events/s |")
    print("|---|---:|---:|---:|")
    for r in read_rows:
        eps = None if r["case"] == "count()" else r["events"] / r["seconds"]
        extra = f" (p99 {r['p99_ms']:.2f} ms)" if "p99_ms" in r else ""
        print(f"| {r['case']}{extra} | {r['seconds']:.4f} | {r['events']:,} | {'' if eps is None else f'{eps:,.0f}'} |")
        r["events_per_s"] = eps
    for r in read_rows:
        if r.get("note"):
            print(f"\n- {r['case']}: {r['note']}", end="")
    print(f"\n\n(run time {cond['run_seconds']:.0f} s)")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"conditions": cond, "writes": write_rows, "reads": read_rows}, f, indent=1)
        print(f"(JSON: {args.json})")


def _cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path):
    """The filesystem type and device the database files were on (fsync cost depends on it)."""
    best = ("?", "?", "")
    try:
        with open("/proc/mounts") as f:
            for line in f:
                dev, mnt, fstype = line.split()[:3]
                if os.path.realpath(path).startswith(mnt.rstrip("/") + "/") and len(mnt) > len(best[2]):
                    best = (fstype, dev, mnt)
    except OSError:
        pass
    return f"{best[0]} on {best[1]}"


if __name__ == "__main__":
    main()
