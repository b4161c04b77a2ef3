"""Single-query and small-batch top-k scans against a plain read of the same bytes, in one run.

A script, not a pytest-benchmark suite (it holds no ``bench_*`` functions, so pytest collects nothing):

    PYTHONPATH=python:.devpath .venv/bin/python bench/bench_scan.py [--bench-items 1000000] [--reps 30]
        [--threads 2] [--ks 10,100,500] [--batches 1,2,3] [--json bench/results/scan.json]

A scan of N x 64 float32 items for one query is memory-bound: its floor is the time to read the table
once. So every scan is timed beside a plain read of a table of the same byte size with the same threads
(``torch.sum`` over a float32 tensor, ``torch.set_num_threads(--threads)``), and the table gives the
**fraction of the plain read** (plain-read median / scan median; 1.0 = at the memory wall) and the
scan's GB/s (table bytes / median):

- ``rec_engine f32``: ``rec_engine.topk(q, items, k, exclude=50 ids)`` for 1, 2 and 3 queries (a batch
  of B reads the table once), k = 10, 100, 500 (500 is the engine's default candidate count); against
  ``torch.sum`` of the float32 items themselves.
- ``numpy``: ``items @ q``, the excluded ids set to -inf, ``argpartition`` + ``argsort`` of the k best
  (one query; the usual baseline).
- ``rec_engine int8`` / ``bf16``: ``rec_engine.topk(q, ItemIndex(items, precision, exact=False), k,
  exclude=...)`` (reduced-precision scan, shortlist of ``k + max(32, k // 4)`` trusted and re-scored in
  float32), and ``... exact``: the default exact mode over the same arrays (a ``4 k + 64`` / ``2 k + 64``
  shortlist checked against its error bound; the JSON counts the queries rescanned), 1 query; against
  ``torch.sum`` of a random
  float32 tensor with the byte size of the index the scan reads (int8: N x 64 codes + 8 bytes of scale
  and correction per item; bf16: N x 64 x 2 bytes). Their recall@k against the exact float32 top k is
  measured on ``--recall-queries`` single queries (with the same 50 exclusions).

Implementations take turns within each repetition (interleaved: the machine is shared and its speed
moves), every one gets an untimed warm-up call, and the median and p99 of ``--reps`` repetitions are
reported. Before every timed call an untimed read of another buffer (``--flush-mb``, default 128 MB, four
times a 32 MB L3) evicts what the previous call left in the caches, so each call reads its table from
memory whatever ran before it (the int8 table, 68 MB, is only about twice such an L3: without the flush
a scan that followed a scan of the same table found part of it still cached). The read is NumPy's, on one
thread (``--flush-with numpy``, the default): a read by torch's threads (``--flush-with torch``) leaves those
threads awake for the plain read that follows, while rec_engine's sleep (``OMP_WAIT_POLICY=passive``), which
put every rec_engine row about 0.1-0.2 ms behind (int8 at 0.84-0.87 of the plain read with the torch flush,
0.94 with NumPy's or none). OpenBLAS's threads busy-wait about 0.1 s after each call (its thread timeout,
2^28 cycles) and take a core from whatever runs next: the rows after the NumPy baseline's ran at 0.56 of
the plain read instead of 0.88. So the script sets ``OPENBLAS_THREAD_TIMEOUT=4`` (2^4 cycles: they sleep at
once; NumPy's matvec then wakes them on each call, 7.9 ms instead of 7.7) unless the environment sets it.
The JSON (default ``bench/results/scan.json``, git-ignored) holds every row and the run
conditions; the Markdown table goes to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")     # before NumPy loads OpenBLAS (see above)

import numpy as np  # noqa: E402

N_EX = 50


def recall(got, ref):
    return len(set(got.tolist()) & set(ref.tolist())) / max(1, len(ref))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-items", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="10,100,500")
    ap.add_argument("--batches", default="1,2,3")
    ap.add_argument("--recall-queries", type=int, default=50)
    ap.add_argument("--no-reduced", action="store_true", help="skip the int8 / bf16 rows")
    ap.add_argument("--flush-mb", type=int, default=128, help="untimed read between timed calls (0: none)")
    ap.add_argument("--flush-with", choices=("numpy", "torch"), default="numpy",
                    help="who reads the flush buffer: NumPy on one thread (default) or torch's threads, which the "
                         "plain read then finds awake")
    ap.add_argument("--json", metavar="PATH", default=os.path.join(os.path.dirname(__file__), "results", "scan.json"),
                    help="where the JSON goes ('' for none)")
    args = ap.parse_args()

    import torch

    import rec_engine

    torch.set_num_threads(args.threads)
    n, d, nt = args.bench_items, args.dim, args.threads
    ks = [int(v) for v in args.ks.split(",")]
    batches = [int(v) for v in args.batches.split(",")]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((max(batches), d), dtype=np.float32)
    ex = np.sort(rng.choice(n, N_EX, replace=False))
    tx = torch.from_numpy(x)

    # (name, group, bytes, fn); group names the plain read the row is compared with.
    rows = []
    reads = {"f32": (x.nbytes, lambda: tx.sum())}
    rows.append(("torch sum f32 (plain read)", "f32", x.nbytes, reads["f32"][1]))
    for k in ks:
        for b in batches:
            q = queries[0] if b == 1 else queries[:b]
            e = ex if b == 1 else [ex] * b
            rows.append((f"rec_engine f32 k={k} B={b}", "f32", x.nbytes,
                         lambda q=q, e=e, k=k: rec_engine.topk(q, x, k, exclude=e, num_threads=nt)))
        def np_topk(k=k):
            s = x @ queries[0]
            s[ex] = -np.inf
            part = np.argpartition(s, -k)[-k:]
            return part[np.argsort(-s[part], kind="stable")]
        rows.append((f"numpy matvec+argpartition k={k} B=1", "f32", x.nbytes, np_topk))
    index = {}
    if not args.no_reduced:
        for precision in ("int8", "bf16"):
            idx = rec_engine.ItemIndex(x, precision, num_threads=nt, exact=False)
            # the exact mode over the same arrays (+ its norms: 4 bytes per item, read only for the shortlist)
            idx_exact = rec_engine.ItemIndex.from_arrays(x, precision, idx.packed, idx.corr, idx.scale, num_threads=nt)
            index[precision] = idx
            index[f"{precision} exact"] = idx_exact
            nbytes = idx.packed.nbytes + (idx.corr.nbytes + idx.scale.nbytes if precision == "int8" else 0)
            plain = torch.from_numpy(rng.standard_normal(nbytes // 4, dtype=np.float32))
            reads[precision] = (nbytes, lambda plain=plain: plain.sum())
            rows.append((f"torch sum {precision}-size (plain read)", precision, nbytes, reads[precision][1]))
            for k in ks:
                for tag, ix in (("", idx), (" exact", idx_exact)):
                    rows.append((f"rec_engine {precision}{tag} k={k} B=1", precision, nbytes,
                                 lambda ix=ix, k=k: rec_engine.topk(queries[0], ix, k, exclude=ex, num_threads=nt)))

    times = [[] for _ in rows]
    for _, _, _, fn in rows:
        fn()
    flush_buf = None
    if args.flush_mb > 0:
        flush_buf = (torch.ones(args.flush_mb * (1 << 20) // 4) if args.flush_with == "torch"
                     else np.ones(args.flush_mb * (1 << 20) // 4, np.float32))
    for _ in range(args.reps):
        for i, (_, _, _, fn) in enumerate(rows):
            if flush_buf is not None:
                flush_buf.sum()
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    med = {rows[i][0]: float(np.median(t)) for i, t in enumerate(times)}
    plain_med = {g: med[name] for name, g, _, _ in rows if "plain read" in name}

    recalls = {}
    if index:
        rq = rng.standard_normal((args.recall_queries, d), dtype=np.float32)
        for k in ks:
            exact = [rec_engine.topk(q, x, k, exclude=ex, num_threads=nt).ids for q in rq]
            for precision, idx in index.items():
                got = [rec_engine.topk(q, idx, k, exclude=ex, num_threads=nt).ids for q in rq]
                recalls[f"{precision} k={k}"] = float(np.mean([recall(g, r) for g, r in zip(got, exact)]))

    out_rows = []
    for i, (name, group, nbytes, _) in enumerate(rows):
        t = np.asarray(times[i])
        m = float(np.median(t))
        row = {"case": name, "plain_read": group, "bytes": nbytes, "median_ms": m * 1e3,
               "p99_ms": float(np.percentile(t, 99)) * 1e3, "gb_s": nbytes / m / 1e9,
               "fraction_of_plain_read": plain_med[group] / m, "rounds": len(t)}
        for precision in index:
            if name.startswith(f"rec_engine {precision} k="):
                row["recall_at_k"] = recalls.get(f"{precision} k={name.split('k=')[1].split()[0]}")
                if index[precision].exact:
                    row["rescans"] = index[precision].rescans
                    row["queries"] = index[precision].queries
        out_rows.append(row)

    cond = {"items": n, "dim": d, "threads": nt, "reps": args.reps, "excluded": N_EX, "flush_mb": args.flush_mb,
            "flush_with": args.flush_with, "openblas_thread_timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT"),
            "simd_level": rec_engine.simd_level(), "cpu": platform.processor() or platform.machine(),
            "loadavg": os.getloadavg(), "torch": torch.__version__, "numpy": np.__version__,
            "python": sys.version.split()[0]}
    print(f"\n## Scans vs a plain read ({n} x {d} float32, {nt} threads, {N_EX} excluded ids, "
          f"{args.reps} interleaved reps, SIMD {cond['simd_level']}, load {cond['loadavg'][0]:.2f})\n")
    print("| case | median ms | p99 ms | GB/s | fraction of the plain read | recall@k |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in out_rows:
        rc = f"{r['recall_at_k']:.4f}" if r.get("recall_at_k") is not None else ""
        print(f"| {r['case']} | {r['median_ms']:.2f} | {r['p99_ms']:.2f} | {r['gb_s']:.1f} | "
              f"{r['fraction_of_plain_read']:.2f} | {rc} |")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"conditions": cond, "rows": out_rows}, f, indent=1)
        print(f"\n(JSON: {args.json})")


if __name__ == "__main__":
    main()
