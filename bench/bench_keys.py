"""Key maps at catalogue scale: build time, memory and look-up latency of :class:`rec_engine.KeyMap`
beside a plain Python dict (the baseline a service would write), and beside the ranking stage they serve.

    .venv/bin/python bench/bench_keys.py [--keys 10000000] [--rounds 2000] [--json out.json]

Per key type (strings "sku-<n>" and int64 keys spread over the whole int64 range):

- build: ``KeyMap.from_arrays`` over stored arrays (what ``Engine.load`` does: the core builds its hash
  index; the arrays themselves are memory-mapped in a bundle) vs ``{key: i}``; the process's RSS growth.
- look-ups of 500 random candidate keys (a request's ``candidates=``) and the keys of 10 result ids
  (a response), median and p99 over ``--rounds`` rounds.
- the ranking stage of ``Engine.recommend`` for 500 candidates (DeepFM, 26 fields, the engine
  benchmark's pipeline over 100k items): the time the key look-ups are to stay far below.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

from rec_engine import KeyMap


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _timed(fn, rounds: int) -> tuple[float, float]:
    """(median, p99) in microseconds."""
    fn()
    t = np.empty(rounds)
    for r in range(rounds):
        t0 = time.perf_counter()
        fn()
        t[r] = time.perf_counter() - t0
    return float(np.median(t) * 1e6), float(np.percentile(t, 99) * 1e6)


def bench_kind(kind: str, n: int, rounds: int, rng: np.random.Generator) -> dict:
    if kind == "str":
        keys = [f"sku-{i}" for i in range(n)]
        encoded = [k.encode() for k in keys]
        offsets = np.zeros(n + 1, np.int64)
        np.cumsum([len(b) for b in encoded], out=offsets[1:])
        arrays = {"item_keys_utf8": np.frombuffer(b"".join(encoded), np.uint8), "item_keys_offsets": offsets}
        del encoded
    else:
        ints = rng.choice(np.iinfo(np.int64).max, size=n, replace=False).astype(np.int64)
        arrays = {"item_keys": ints}
        keys = ints.tolist()
    row = {"kind": kind, "keys": n, "storage_mb": sum(a.nbytes for a in arrays.values()) / 2**20}
    rss = _rss_mb()
    t0 = time.perf_counter()
    km = KeyMap.from_arrays(arrays, "item", n)
    row["keymap_build_s"], row["keymap_index_mb"] = time.perf_counter() - t0, _rss_mb() - rss
    rss = _rss_mb()
    t0 = time.perf_counter()
    ref = {k: i for i, k in enumerate(keys)}
    row["dict_build_s"], row["dict_mb"] = time.perf_counter() - t0, _rss_mb() - rss
    cands = [keys[i] for i in rng.integers(0, n, 500)]
    result_ids = rng.integers(0, n, 10).astype(np.int64)
    assert km.ids(cands).tolist() == [ref[k] for k in cands]
    row["keymap_500_lookup_us"] = _timed(lambda: km.ids(cands), rounds)
    row["dict_500_lookup_us"] = _timed(lambda: np.array([ref[k] for k in cands], np.int64), rounds)
    row["keymap_10_keys_us"] = _timed(lambda: km.keys(result_ids), rounds)
    del ref
    return row


def ranking_ms(rounds: int) -> tuple[float, float]:
    """(median, p99) ms of the Engine's ranking stage for 500 candidates."""
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_engine import build_pipeline

    from rec_engine import Engine

    root = Path(__file__).parent / "results" / "keys_bundles"
    path = root / "pipe_100000"
    if not path.exists():
        build_pipeline(path, 10000, 100000)
    with Engine.load(path, num_threads=1) as e:
        ctx_fields = e._version.ranking.context_fields
        ctx = {f: 1 for f in ctx_fields}
        t = [e.recommend(u % 10000, k=10, context=ctx, n_candidates=500).timings["ranking_ms"]
             for u in range(min(rounds, 300))]
    return float(np.median(t)), float(np.percentile(t, 99))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keys", type=int, default=10_000_000)
    ap.add_argument("--rounds", type=int, default=2000)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    rows = [bench_kind(kind, args.keys, args.rounds, rng) for kind in ("str", "int")]
    rank = ranking_ms(args.rounds)
    print(f"{'keys':>10} {'kind':>4} | {'KeyMap build s':>14} {'index MB':>8} | {'dict build s':>12} {'dict MB':>8} | "
          f"{'500 look-ups us (KeyMap / dict), median p99':>44} | {'10 keys us':>10}")
    for r in rows:
        lk, dk, kk = r["keymap_500_lookup_us"], r["dict_500_lookup_us"], r["keymap_10_keys_us"]
        print(f"{r['keys']:>10} {r['kind']:>4} | {r['keymap_build_s']:>14.2f} {r['keymap_index_mb']:>8.0f} | "
              f"{r['dict_build_s']:>12.2f} {r['dict_mb']:>8.0f} | "
              f"{lk[0]:>9.1f} {lk[1]:>7.1f} / {dk[0]:>9.1f} {dk[1]:>7.1f} ({dk[0] / lk[0]:.2f}x)   | {kk[0]:>10.1f}")
    print(f"ranking stage, 500 candidates (DeepFM, 26 fields): median {rank[0]:.2f} ms, p99 {rank[1]:.2f} ms")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "ranking_ms": rank}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
