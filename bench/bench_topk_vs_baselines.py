"""Top-k latency, recall and peak memory, every row beside NumPy, PyTorch and FAISS (tuned), in one run.

A script, not a pytest-benchmark suite (it holds no ``bench_*`` functions, so pytest collects nothing):

    PYTHONPATH=... python bench/bench_topk_vs_baselines.py [--bench-items 1000000] [--reps 20] [--threads 2] [--json PATH]

Rows: 1 query and 256 queries against N x 64 float32 items, k = 10 and 100, 50 excluded ids per query;
rec_engine exact float32 and the reduced-precision ItemIndex modes (int8, bf16; with ``exact=False``, the
shortlist of ``k + max(32, k // 4)`` trusted and re-scored in float32; ``bench/bench_scan.py`` times the
default exact mode beside it) with their recall@k against the exact result, on Gaussian items and on
clustered items.
Implementations take turns within each repetition (interleaved), the median of ``--reps`` repetitions
is reported with p90 and p99, and ratios are against the fastest baseline of the row. Peak memory of one
batch call per implementation is measured in a fresh subprocess (VmHWM delta: C++ allocations included).
``--json PATH`` also writes every row (median, p90, p99, q/s, ratio, recall), the peak memory and the run
conditions (SIMD level, threads, load average) as JSON for a report script.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

DIM, N_EX, BATCH = 64, 50, 256


def load_faiss():
    saved = os.environ.get("OPENBLAS_CORETYPE")
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    try:
        import faiss
    except ImportError:
        return None
    finally:
        if saved is None:
            os.environ.pop("OPENBLAS_CORETYPE", None)
        else:
            os.environ["OPENBLAS_CORETYPE"] = saved
    faiss.cvar.distance_compute_blas_threshold = 20
    return faiss


def make_data(n, seed, clustered):
    rng = np.random.default_rng(seed)
    if clustered:  # 1000 Gaussian clusters, queries drawn near cluster centres
        centres = rng.standard_normal((1000, DIM), dtype=np.float32)
        x = centres[rng.integers(0, 1000, n)] + 0.5 * rng.standard_normal((n, DIM), dtype=np.float32)
        q = centres[rng.integers(0, 1000, BATCH)] + 0.5 * rng.standard_normal((BATCH, DIM), dtype=np.float32)
    else:
        x = rng.standard_normal((n, DIM), dtype=np.float32)
        q = rng.standard_normal((BATCH, DIM), dtype=np.float32)
    ex = np.stack([np.sort(rng.choice(n, N_EX, replace=False)) for _ in range(BATCH)])
    return np.ascontiguousarray(x), np.ascontiguousarray(q), ex


def impls(x, q, ex, k, single, threads, faiss, index, torch):
    import rec_engine
    from rec_engine.topk import IdLists
    qs = q[:1] if single else q
    exs = ex[:1] if single else ex
    lists = IdLists(np.arange(0, (exs.shape[0] + 1) * N_EX, N_EX), exs.reshape(-1))
    rows = np.repeat(np.arange(qs.shape[0]), N_EX)
    out = {}
    if single:
        out["rec_engine f32"] = lambda: rec_engine.topk(qs[0], x, k, exclude=exs[0], num_threads=threads)
        for name, idx in index.items():
            out[f"rec_engine {name}"] = (lambda idx=idx: rec_engine.topk(qs[0], idx, k, exclude=exs[0], num_threads=threads))

        def np_single():
            s = x @ qs[0]
            s[exs[0]] = -np.inf
            part = np.argpartition(s, s.shape[0] - k)[-k:]
            return part[np.argsort(-s[part], kind="stable")]
        out["numpy"] = np_single
        xt, qt, et = torch.from_numpy(x), torch.from_numpy(qs[0]), torch.from_numpy(exs[0])

        def torch_single():
            s = torch.mv(xt, qt)
            s[et] = -torch.inf
            return torch.topk(s, k)
        out["torch"] = torch_single
    else:
        out["rec_engine f32"] = lambda: rec_engine.topk(qs, x, k, exclude=lists, num_threads=threads)
        for name, idx in index.items():
            out[f"rec_engine {name}"] = (lambda idx=idx: rec_engine.topk(qs, idx, k, exclude=lists, num_threads=threads))

        def np_batch():
            s = qs @ x.T
            s[rows, exs.reshape(-1)] = -np.inf
            part = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
            order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
            return np.take_along_axis(part, order, 1)
        out["numpy"] = np_batch
        xt, qt = torch.from_numpy(x), torch.from_numpy(qs)
        rt, et = torch.from_numpy(rows), torch.from_numpy(exs.reshape(-1))

        def torch_batch():
            s = torch.mm(qt, xt.T)
            s[rt, et] = -torch.inf
            return torch.topk(s, k, dim=1)
        out["torch"] = torch_batch
    if faiss is not None:
        fi = faiss.IndexFlatIP(DIM)
        fi.add(x)

        def faiss_search():
            scores, ids = fi.search(qs, k + N_EX)
            hit = (ids[:, :, None] == exs[:, None, :]).any(axis=2)
            keep = np.argsort(hit, axis=1, kind="stable")[:, :k]
            return np.take_along_axis(ids, keep, 1)
        out["faiss (tuned)"] = faiss_search
    return out


def recall(res_ids, ref_ids, k):
    a, b = np.atleast_2d(res_ids), np.atleast_2d(ref_ids)
    return float(np.mean([len(set(r.tolist()) & set(s.tolist())) / k for r, s in zip(a, b)]))


def peak_memory_child(args):
    """In a fresh process: VmHWM before and after one batch call of one implementation (MiB)."""
    impl, n, k, threads = args.peak_child.split(",")
    n, k, threads = int(n), int(k), int(threads)
    import torch
    torch.set_num_threads(threads)
    faiss = load_faiss() if impl.startswith("faiss") else None
    x, q, ex = make_data(n, 0, False)
    index = {}
    if impl in ("rec_engine int8", "rec_engine bf16"):
        from rec_engine.topk import ItemIndex
        index[impl.split()[1]] = ItemIndex(x, impl.split()[1], exact=False)
    fns = impls(x, q, ex, k, False, threads, faiss, index, torch)
    fn = fns[impl]

    def hwm():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                return int(line.split()[1]) / 1024
    before = hwm()
    fn()
    print(f"{hwm() - before:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench-items", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ks", default="10,100")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    ap.add_argument("--peak-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peak_child:
        return peak_memory_child(args)
    import torch
    faiss = load_faiss()
    import rec_engine
    from rec_engine.topk import ItemIndex
    torch.set_num_threads(args.threads)
    if faiss is not None:
        faiss.omp_set_num_threads(args.threads)
    print(f"rec_engine simd={rec_engine.simd_level()} threads={args.threads} items={args.bench_items} x {DIM} "
          f"reps={args.reps} (median, p90); load average {os.getloadavg()}")
    report = {"simd": rec_engine.simd_level(), "threads": args.threads, "items": args.bench_items, "dim": DIM,
              "excluded_per_query": N_EX, "reps": args.reps, "load_average_start": list(os.getloadavg()),
              "faiss": faiss is not None, "rows": [], "peak_memory_mib": {}}
    print("implicit: skipped (not installed)")
    if faiss is None:
        print("faiss: skipped (not installed)")
    ks = [int(v) for v in args.ks.split(",")]
    for clustered in (False, True):
        x, q, ex = make_data(args.bench_items, 0, clustered)
        t0 = time.perf_counter()
        index = {p: ItemIndex(x, p, exact=False) for p in ("int8", "bf16")}
        print(f"\n=== items: {'clustered' if clustered else 'gaussian'}  (ItemIndex build int8+bf16: "
              f"{time.perf_counter() - t0:.2f} s)")
        for single in (True, False):
            for k in ks:
                fns = impls(x, q, ex, k, single, args.threads, faiss, index, torch)
                if clustered:  # timing rows on Gaussian items only; clustered: recall of the reduced modes
                    fns = {n: f for n, f in fns.items() if n.startswith("rec_engine")}
                times = {n: [] for n in fns}
                ref = fns["rec_engine f32"]().ids
                rec = {n: recall(fns[n]().ids, ref, k) for n in fns if n.startswith("rec_engine ") and n != "rec_engine f32"}
                reps = args.reps if not clustered else 3
                for _ in range(reps):
                    for n, f in fns.items():
                        a = time.perf_counter()
                        f()
                        times[n].append(time.perf_counter() - a)
                med = {n: float(np.median(t)) for n, t in times.items()}
                base = [n for n in med if not n.startswith("rec_engine")]
                best = min(base, key=med.get) if base else None
                label = "1 query" if single else f"{BATCH} queries"
                print(f"-- {label}, k={k}, {N_EX} excluded per query")
                for n in fns:
                    t = np.array(times[n])
                    qps = (1 if single else BATCH) / med[n]
                    ratio = f"{med[best] / med[n]:5.2f}x vs {best}" if best else ""
                    r = f"recall@k {rec[n]:.4f}" if n in rec else ""
                    print(f"   {n:16s} {med[n] * 1e3:9.2f} ms  p90 {np.percentile(t, 90) * 1e3:9.2f} ms  "
                          f"{qps:9.0f} q/s  {ratio:24s} {r}")
                    report["rows"].append({
                        "items": "clustered" if clustered else "gaussian", "queries": 1 if single else BATCH,
                        "k": k, "impl": n, "median_ms": med[n] * 1e3, "p90_ms": float(np.percentile(t, 90)) * 1e3,
                        "p99_ms": float(np.percentile(t, 99)) * 1e3, "qps": qps, "reps": reps,
                        "best_baseline": best, "ratio_vs_best_baseline": med[best] / med[n] if best else None,
                        "recall_at_k": rec.get(n)})
        if not clustered and not args.no_memory:
            print("-- peak memory of one 256-query k=100 call (VmHWM delta in a fresh process, MiB)")
            for impl in ("rec_engine f32", "rec_engine int8", "rec_engine bf16", "numpy", "torch", "faiss (tuned)"):
                out = subprocess.run([sys.executable, __file__, "--peak-child",
                                      f"{impl},{args.bench_items},100,{args.threads}"],
                                     capture_output=True, text=True)
                print(f"   {impl:16s} {out.stdout.strip() or out.stderr.strip()[-200:]}")
                try:
                    report["peak_memory_mib"][impl] = float(out.stdout.strip())
                except ValueError:
                    report["peak_memory_mib"][impl] = None
    report["load_average_end"] = list(os.getloadavg())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
