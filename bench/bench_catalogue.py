"""The living catalogue's cost on a large catalogue: add_items / remove_items latency, and recommend before
and after many additions (issue 16's benchmark).

A plain script (not collected by pytest), on the 1M-item pipeline bundle that ``bench_engine.py`` builds and
caches (``bench/results/engine_bundles/``; run ``bench_engine.py`` once first, or point ``--bundle`` at any
pipeline bundle with a vector retrieval stage):

    ./dev.sh .venv/bin/python bench/bench_catalogue.py [--bundle PATH] [--added 100000] [--requests 300]

It loads the engine (one core thread, one ONNX Runtime thread, the float32 scan), times ``recommend``
(k=10, the bundle's candidate count ranked), then ``add_items`` of 1 item (the first call separately: it
copies the scanned table and the ranking item store into growable buffers once) and of 1,000 items,
adds items up to ``--added`` in all, times ``recommend`` again and ``remove_items`` of one item. New items
get random vectors of the item table's scale and no features (missing values). Prints a Markdown table and
writes ``bench/results/catalogue.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = HERE / "results" / "engine_bundles" / "deepfm-mf-1000000items-100000users-v1"


def _stats(ts: list[float]) -> dict:
    a = np.asarray(ts) * 1e3
    return {"n": len(a), "median_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99)),
            "mean_ms": float(a.mean())}


def _recommend(engine, users, requests: int) -> dict:
    ts = []
    for j in range(requests):
        t0 = time.perf_counter()
        engine.recommend(users[j % len(users)], k=10)
        ts.append(time.perf_counter() - t0)
    return _stats(ts[min(20, requests // 10):])          # the first calls warm caches


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=str(DEFAULT_BUNDLE))
    ap.add_argument("--added", type=int, default=100_000, help="items added in all before the second timing")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--json", default=str(HERE / "results" / "catalogue.json"))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE.parent / "python"))
    from rec_engine.engine import Engine

    if not Path(args.bundle).exists():
        print(f"no bundle at {args.bundle}: run bench/bench_engine.py once (it builds and caches it)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    e = Engine.load(args.bundle, num_threads=1, ort_threads=1)
    load_s = time.perf_counter() - t0
    r = e._version.retrieval
    n0, d = e.n_items, r.items.shape[1]
    scale = float(np.std(r.items[:10000]))
    rng = np.random.default_rng(0)
    users = [e.user_keys.key(int(u)) for u in rng.integers(0, r.n_users, 64)]
    next_key = [10**12]

    as_str = e.item_keys.kind == "str"

    def keys(m):
        k = list(range(next_key[0], next_key[0] + m))
        if as_str:
            k = [f"new-{x}" for x in k]
        next_key[0] += m
        return k

    def vecs(m):
        return (rng.standard_normal((m, d)) * scale).astype(np.float32)

    rows = {"load_s": load_s, "n_items": n0, "dim": d}
    rows["recommend_before"] = _recommend(e, users, args.requests)
    t0 = time.perf_counter()
    e.add_items(keys(1), vectors=vecs(1))
    rows["add_first_ms"] = (time.perf_counter() - t0) * 1e3
    ts = []
    for _ in range(200):
        v1, k1 = vecs(1), keys(1)
        t0 = time.perf_counter()
        e.add_items(k1, vectors=v1)
        ts.append(time.perf_counter() - t0)
    rows["add_1"] = _stats(ts)
    ts = []
    for _ in range(20):
        vm, km = vecs(1000), keys(1000)
        t0 = time.perf_counter()
        e.add_items(km, vectors=vm)
        ts.append(time.perf_counter() - t0)
    rows["add_1000"] = _stats(ts)
    while e.n_items - n0 < args.added:
        m = min(10_000, args.added - (e.n_items - n0))
        e.add_items(keys(m), vectors=vecs(m))
    rows["added"] = e.n_items - n0
    rows["recommend_after"] = _recommend(e, users, args.requests)
    ts = []
    for j in range(50):
        t0 = time.perf_counter()
        e.remove_items([e.item_keys.key(500 + j)])
        ts.append(time.perf_counter() - t0)
    rows["remove_1"] = _stats(ts)
    rows["recommend_after_removals"] = _recommend(e, users, args.requests)
    e.close()
    rows["machine"] = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "load": os.getloadavg()[0], "python": platform.python_version()}
    print(f"\n## Living catalogue on {n0:,} items x {d} ({Path(args.bundle).name}); load {load_s:.1f} s, "
          f"machine load {rows['machine']['load']:.2f}\n")
    print("| operation | median ms | p99 ms | calls |\n|---|---:|---:|---:|")
    for name, key in [("recommend (k=10, ranked), before", "recommend_before"),
                      ("add_items, 1 item", "add_1"), ("add_items, 1,000 items", "add_1000"),
                      (f"recommend after {rows['added']:,} additions", "recommend_after"),
                      ("remove_items, 1 item", "remove_1"),
                      ("recommend after 50 removals", "recommend_after_removals")]:
        s = rows[key]
        print(f"| {name} | {s['median_ms']:.3f} | {s['p99_ms']:.3f} | {s['n']} |")
    print(f"| add_items, the first call (copies the table into a growable buffer) | {rows['add_first_ms']:.1f} | | 1 |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(rows, indent=2))
    print(f"\n(JSON: {args.json})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
