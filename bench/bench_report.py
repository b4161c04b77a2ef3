"""``rec-engine report`` (:func:`rec_engine.report.feedback_metrics`) on a million events, in one run.

A script, not a pytest-benchmark suite (it holds no ``bench_*`` functions, so pytest collects nothing):

    PYTHONPATH=python:.devpath .venv/bin/python bench/bench_report.py [--impressions 250000] [--shown 10]
        [--clicks 750000] [--catalogue 100000] [--reps 3] [--db PATH] [--baseline OLD_REPORT_PY]
        [--json bench/results/report.json]

The store: ``--impressions`` impressions of ``--shown`` items each, drawn from a ``--catalogue`` of string
item keys (``"sku-000123"``, popularity skewed), by two model versions over a week, each with its request
id, scores and small attrs (as serving writes them); and ``--clicks`` clicks: most on an item their
impression showed (a third of those duplicates), some without a request id, on a request id no impression
has, or on an item not shown. 1M events by default. The rows are the ones :meth:`SqliteEventStore.append`
writes (same serialization), inserted with ``executemany`` into a store's file in a temporary folder, once
(``--db PATH``: kept there and reused by the next run, so two versions of the code can be timed on the
same file).

Timed, each the median of ``--reps`` runs:

- ``store.read()`` of every event (the ``Event`` objects the report used to be built on);
- ``store.scan(...)`` of the columns the report reads (when the store has ``scan``);
- ``feedback_metrics(store)``, all of it; and with ``since``/``until`` (the middle five days), with a given
  catalogue size and with an item popularity mapping.

``--baseline PATH``: the ``report.py`` of another version of rec_engine (e.g. ``git show
<commit>:python/rec_engine/report.py > /tmp/report_old.py``), loaded as a module of the installed package and
timed the same way on the same store, its runs taking turns with the current version's (the machine is shared
and its speed moves); the table then gives ``baseline / current`` per case, and their rows must be equal.

Prints a Markdown table; the JSON (default ``bench/results/report.json``, git-ignored) holds every run and
the conditions (CPU, cores, Python, SQLite, load).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import sqlite3
import sys
import tempfile
import time

import numpy as np

from rec_engine.events import SqliteEventStore, _dumps
from rec_engine.report import feedback_metrics

T0 = 1_717_200_000.0                     # 2024-06-01 UTC
DAY = 86400.0
INSERT = ("INSERT INTO events (ts, kind, user, item, request_id, version, value, items, scores, attrs, origin) "
          "VALUES (?,?,?,?,?,?,?,?,?,?,?)")


def build(path, n_imp, shown, n_clicks, catalogue, seed=0) -> int:
    """Write the benchmark's events into a new store at ``path``; returns how many."""
    rng = np.random.default_rng(seed)
    with SqliteEventStore(path):            # the schema, as the store creates it
        pass
    # impressions: a week, in time order; items without repeats within a list, skewed popularity
    ts_imp = np.sort(T0 + rng.uniform(0, 7 * DAY, n_imp))
    weights = 1.0 / np.arange(1, catalogue + 1) ** 0.8
    weights /= weights.sum()
    draw = rng.choice(catalogue, size=(n_imp, shown * 2), p=weights)
    lists = []
    for row in draw.tolist():
        seen = list(dict.fromkeys(row))[:shown]
        while len(seen) < shown:                   # (rare) a list with too many repeats: top it up
            x = int(rng.integers(catalogue))
            if x not in seen:
                seen.append(x)
        lists.append(seen)
    users = rng.integers(0, 50_000, n_imp).tolist()
    versions = np.where(rng.random(n_imp) < 0.5, "v1", "v2").tolist()
    scores = np.round(np.sort(rng.random((n_imp, shown)), axis=1)[:, ::-1], 6).tolist()
    rows = []
    for j in range(n_imp):
        items = [f"sku-{i:06d}" for i in lists[j]]
        rows.append((float(ts_imp[j]), "impression", f"user-{users[j]}", None, f"req-{j:08d}", versions[j], None,
                     _dumps(items), _dumps(scores[j]), _dumps({"page": "home", "n": shown}), "bench"))
    # clicks: on a random impression's item (position-biased), some seconds to hours later
    imp_of = rng.integers(0, n_imp, n_clicks)
    pos = np.minimum(rng.geometric(0.3, n_clicks) - 1, shown - 1)
    late = rng.exponential(600.0, n_clicks)
    odd = rng.random(n_clicks)
    clicks = []
    for j, (k, p, dt, o) in enumerate(zip(imp_of.tolist(), pos.tolist(), late.tolist(), odd.tolist())):
        item, rid = f"sku-{lists[k][p]:06d}", f"req-{k:08d}"
        if o < 0.02:
            rid = None                                   # no request id
        elif o < 0.03:
            rid = f"nope-{j}"                            # a request id no impression has
        elif o < 0.04:
            item = f"sku-{int(rng.integers(catalogue)):06d}"   # (mostly) an item not shown
        clicks.append((float(ts_imp[k]) + dt, "click", f"user-{users[k]}", item, rid, None, None, None, None,
                       None, "bench"))
    rows += clicks
    rows.sort(key=lambda r: r[0])                        # the store's order: arrival, about time order
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(INSERT, rows)
    conn.close()
    return len(rows)


def timed(fn, reps, base=None):
    """``reps`` timings of ``fn`` (and of ``base``, taking turns with it, when given): (runs, base runs, out)."""
    runs, base_runs, out = [], [], None
    for _ in range(reps):
        if base is not None:
            t0 = time.perf_counter()
            want = base()
            base_runs.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
        if base is not None:
            _check_equal(out, want)
    return runs, base_runs, out


def _check_equal(got, want):
    """The current rows against the baseline's: the same rows, floats to 1e-9 relative (the novelty sums are
    exactly rounded now (math.fsum); earlier versions summed a few hundred thousand terms in order, off by
    about 1e-12 relative on these data)."""
    assert [(r["version"], r["day"]) for r in got] == [(r["version"], r["day"]) for r in want]
    for g, w in zip(got, want):
        for k, v in w.items():
            if isinstance(v, float):
                assert abs(g[k] - v) <= 1e-9 * max(1.0, abs(v)), (g["version"], g["day"], k, g[k], v)
            else:
                assert g[k] == v, (g["version"], g["day"], k, g[k], v)
    assert got.unattributed == want.unattributed and got.n_items == want.n_items


def load_baseline(path):
    """``report.py`` of another version, as a module of the rec_engine package (its relative imports work)."""
    spec = importlib.util.spec_from_file_location("rec_engine._bench_baseline_report", path)
    mod = importlib.util.module_from_spec(spec)
    mod.__package__ = "rec_engine"
    spec.loader.exec_module(mod)
    return mod


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--impressions", type=int, default=250_000)
    ap.add_argument("--shown", type=int, default=10)
    ap.add_argument("--clicks", type=int, default=750_000)
    ap.add_argument("--catalogue", type=int, default=100_000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", default=None, metavar="REPORT_PY",
                    help="report.py of another version, timed in turns with this one on the same store")
    ap.add_argument("--db", default=None, help="keep the store here and reuse it when it exists (default: a "
                                               "temporary folder, removed at the end)")
    ap.add_argument("--json", metavar="PATH", default=os.path.join(os.path.dirname(__file__), "results", "report.json"),
                    help="where the JSON goes ('' for none)")
    args = ap.parse_args()

    work = None
    if args.db:
        path = args.db
    else:
        work = tempfile.mkdtemp(prefix="bench_report_")
        path = os.path.join(work, "events.db")
    t_run = time.perf_counter()
    rows = []
    try:
        t_build = None
        if not os.path.exists(path):
            t0 = time.perf_counter()
            build(path, args.impressions, args.shown, args.clicks, args.catalogue)
            t_build = time.perf_counter() - t0
        base = None if args.baseline is None else load_baseline(args.baseline).feedback_metrics
        with SqliteEventStore(path) as st:
            n = st.count()
            size_mb = os.path.getsize(path) / 1e6
            runs, _, got = timed(lambda: sum(1 for _ in st.read()), args.reps)
            assert got == n
            rows.append(dict(case="store.read() every event", runs=runs))
            if hasattr(st, "scan"):
                cols = ("ts", "kind", "item", "request_id", "version", "value", "items")
                runs, _, got = timed(lambda: sum(1 for _ in st.scan(cols)), args.reps)
                assert got == n
                rows.append(dict(case=f"store.scan({', '.join(cols)})", runs=runs))
            pop = {f"sku-{i:06d}": int(c) for i, c in
                   enumerate(np.random.default_rng(9).integers(0, 1000, args.catalogue).tolist())}
            since, until = T0 + DAY, T0 + 6 * DAY
            full = None
            for case, kw in (("feedback_metrics(store)", {}),
                             ("feedback_metrics(since=, until=) middle 5 days", dict(since=since, until=until)),
                             ("feedback_metrics(n_items=)", dict(n_items=args.catalogue)),
                             ("feedback_metrics(item_popularity=dict)", dict(item_popularity=pop))):
                runs, base_runs, got = timed(lambda: feedback_metrics(st, **kw), args.reps,
                                             None if base is None else (lambda: base(st, **kw)))
                rows.append(dict(case=case, runs=runs, rows=len(got), baseline_runs=base_runs or None))
                full = got if full is None else full
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        r["median_s"] = float(np.median(r["runs"]))
        r["events_per_s"] = n / r["median_s"]
        if r.get("baseline_runs"):
            r["baseline_median_s"] = float(np.median(r["baseline_runs"]))
            r["speedup"] = r["baseline_median_s"] / r["median_s"]
    totals = [r for r in full if r["day"] == "total"]
    cond = {"cpu": _cpu(), "cores": os.cpu_count(), "python": sys.version.split()[0],
            "sqlite": sqlite3.sqlite_version, "loadavg": os.getloadavg(), "events": n, "db_mb": size_mb,
            "impressions": args.impressions, "shown": args.shown, "clicks": args.clicks,
            "catalogue": args.catalogue, "reps": args.reps, "build_seconds": t_build, "baseline": args.baseline,
            "run_seconds": time.perf_counter() - t_run}
    print(f"\n## rec-engine report on {n:,} events ({args.impressions:,} impressions x {args.shown} items from "
          f"{args.catalogue:,}, {args.clicks:,} clicks; {size_mb:.0f} MB; {cond['cpu']}, {cond['cores']} cores, "
          f"SQLite {cond['sqlite']}, load {cond['loadavg'][0]:.2f}; median of {args.reps})\n")
    print("| case | median s | runs s | events/s | baseline median s | baseline runs s | baseline / current |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        b = r.get("baseline_runs")
        extra = (f"{r['baseline_median_s']:.3f} | {' '.join(f'{x:.2f}' for x in b)} | {r['speedup']:.2f}x" if b
                 else "- | - | -")
        print(f"| {r['case']} | {r['median_s']:.3f} | {' '.join(f'{x:.2f}' for x in r['runs'])} | "
              f"{r['events_per_s']:,.0f} | {extra} |")
    print("\ntotals: " + "; ".join(f"{t['version']}: {t['impressions']:,} impressions, {t['clicks']:,} clicks, "
                                   f"CTR {t['ctr']:.4f}, coverage {t['coverage']:.3f}, novelty {t['novelty']:.3f}"
                                   for t in totals))
    print(f"(run time {cond['run_seconds']:.0f} s" + ("" if t_build is None else f", building the store "
                                                      f"{t_build:.0f} s") + ")")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"conditions": cond, "cases": rows, "rows": list(full), "unattributed": full.unattributed},
                      f, indent=1)
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


if __name__ == "__main__":
    main()
