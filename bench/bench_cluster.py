"""The sharded Ray Serve application (``rec-engine cluster``) beside the single-process server.

A plain script (pytest collects nothing from it); needs Ray Serve (``pip install '.[cluster]'``) and the
benchmark's pipeline bundle (``bench_engine.cached_pipeline``: ``mf`` retrieval over N items x 64, 50 seen
items per user, 500 candidates ranked by an untrained DeepFM over 26 fields, top 10).

1. **Shard scans** (one process, no Ray): the core's exact top-500 over a shard of S rows x 64 (float32, the
   query's excluded ids cut to the shard), one thread, for several S, single queries and batches of 16;
   and the bytes a shard's request and answer take (pickled, as Ray sends them). This is what the sizing
   plan of the README extrapolates from. Then **batched shard scans** on the bundle's own table (1 shard of
   all N rows, memory-mapped): ``ShardScanner.scan_many`` (what a shard replica runs on the scan requests it
   coalesced, ``--shard-batch``: single queries 3 at a time, exact) at batch sizes 1, 4 and 16, per
   query, beside the core's packed path on the same 16 queries (one call; not used: its last bit can differ).
2. **HTTP** (closed-loop keep-alive clients on loopback, ``bench_http.load``): ``rec-engine serve --workers 1
   --coalesce-us 0`` (the single-process server) and ``python -m rec_engine.cluster`` with M shards and R
   ingress replicas, each with shard batching off and on (``--shard-batch``), at 1, 2 and 4 clients; every service must first give the same answers for a few users.
   Per service: the engine's own ``retrieval_ms`` over sequential requests (single process: the local scan;
   cluster: the fan-out to the shards and the merge), so the fan-out's overhead shows beside the scan.
3. **Memory**: RSS and PSS (``/proc/PID/smaps_rollup``) of every Serve replica process (ingress, shards).

Output: Markdown on stdout and in ``bench/latest/CLUSTER.md``, numbers in ``bench/results/cluster.json``.

    PYTHONPATH=python:.devpath /work/venv-ray/bin/python bench/bench_cluster.py               # 1M items
    REC_BENCH_ENGINE_ITEMS=100000 ... bench/bench_cluster.py --seconds 2                        # quick
    ... bench/bench_cluster.py --clusters 2x1 --shard-batch 1,16 --clients 1,4 --scan-rows 1000000
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_engine import K, N_CANDIDATES, SEEN_PER_USER, Settings, cached_pipeline  # noqa: E402
from bench_http import (Server, _bodies, _cmdline, check_agreement, load, machine, rec_server, request,  # noqa: E402
                        smaps_rollup)


# ============================================================================== 1. shard scans
def scan_times(rows_list: list[int], dim: int = 64, n: int = N_CANDIDATES, reps: int = 30) -> list[dict]:
    import rec_engine
    from rec_engine.topk import TopK, topk

    rng = np.random.default_rng(0)
    out = []
    for rows in rows_list:
        x = rng.standard_normal((rows, dim), dtype=np.float32)
        q = rng.standard_normal((16, dim), dtype=np.float32)
        ex = [np.sort(rng.choice(rows, SEEN_PER_USER, replace=False)) for _ in range(16)]
        topk(q[0], x, n, exclude=ex[0], num_threads=1)             # pages in
        t = []
        for j in range(reps):
            t0 = time.perf_counter()
            topk(q[j % 16], x, n, exclude=ex[j % 16], num_threads=1)
            t.append(time.perf_counter() - t0)
        tb = []
        for _ in range(max(3, reps // 8)):
            t0 = time.perf_counter()
            topk(q, x, n, exclude=ex, num_threads=1)
            tb.append(time.perf_counter() - t0)
        res = topk(q[0], x, n, exclude=ex[0], num_threads=1)
        req = pickle.dumps(("/bundles/v1", "0123456789ab", q[0], n, ex[0]), protocol=5)
        ans = pickle.dumps(TopK(res.ids, res.scores), protocol=5)
        out.append({"rows": rows, "dim": dim, "mb": rows * dim * 4 / 2**20,
                    "single_ms_p50": float(np.median(t) * 1e3), "single_ms_p99": float(np.percentile(t, 99) * 1e3),
                    "batch16_ms_per_query": float(np.median(tb) * 1e3 / 16),
                    "gb_per_s": rows * dim * 4 / np.median(t) / 1e9,
                    "request_bytes": len(req), "answer_bytes": len(ans), "simd": rec_engine.simd_level()})
        del x
    return out


def batch_scan_times(bundle: Path, sizes=(1, 4, 16), n: int = N_CANDIDATES, reps: int = 24) -> list[dict]:
    """Per-query time of ``ShardScanner.scan_many`` over the whole retrieval table of ``bundle`` (one shard,
    memory-mapped, one thread) for batches of ``sizes`` single queries (50 excluded ids each), and of the core's
    packed path (one ``topk`` call on the largest batch)."""
    from rec_engine.cluster import ShardScanner, version_id
    from rec_engine.topk import topk

    s = ShardScanner(0, 1, verify=False)
    info = s.load(bundle)
    rows, dim = info["n_items"], info["dim"]
    vid = version_id(bundle)
    rng = np.random.default_rng(1)
    q = rng.standard_normal((max(sizes), dim), dtype=np.float32)
    ex = [np.sort(rng.choice(rows, SEEN_PER_USER, replace=False)) for _ in range(max(sizes))]
    s.scan_many([(bundle, vid, q[0], n, ex[0])])                   # pages in
    out = []
    for b in sizes:
        reqs = [(bundle, vid, q[j], n, ex[j]) for j in range(b)]
        t = []
        for _ in range(max(3, reps // b)):
            t0 = time.perf_counter()
            s.scan_many(reqs)
            t.append(time.perf_counter() - t0)
        out.append({"batch": b, "rows": rows, "path": "scan_many (exact)", "ms_per_call": float(np.median(t) * 1e3),
                    "ms_per_query": float(np.median(t) * 1e3 / b)})
    items = s._get(bundle, vid).items
    t = []
    for _ in range(3):
        t0 = time.perf_counter()
        topk(q, items, n, exclude=ex, num_threads=1)
        t.append(time.perf_counter() - t0)
    out.append({"batch": max(sizes), "rows": rows, "path": "core packed path (not used)",
                "ms_per_call": float(np.median(t) * 1e3), "ms_per_query": float(np.median(t) * 1e3 / max(sizes))})
    return out


# ============================================================================== 2. the services
class ClusterServer(Server):
    def wait_ready(self, timeout: float = 900) -> None:
        """Until ``/healthz`` answers JSON (the Serve proxy answers plain text before the app runs)."""
        super().wait_ready(timeout)


def cluster_server(bundle: Path, shards: int, replicas: int, log_dir: Path, cpus: int, batch: int = 1) -> Server:
    cmd = [sys.executable, "-m", "rec_engine.cluster", str(bundle), "--shards", str(shards), "--replicas",
           str(replicas), "--num-cpus", str(cpus), "--ingress-cpus", "1", "--shard-cpus", "1", "--no-verify",
           "--shard-batch", str(batch)]
    return ClusterServer(f"cluster M{shards} R{replicas} batch {batch}", cmd,
                         log_dir / f"server-cluster-m{shards}-r{replicas}-b{batch}.log")


def engine_timings(server: Server, bodies: list[dict], n: int = 40) -> dict:
    """Median of the engine's own stage timings over ``n`` sequential requests (after 5 warm-ups)."""
    got: dict = {}
    for j, body in enumerate(bodies[:n + 5]):
        status, out = request(server.port, "POST", "/recommend", body)
        if status != 200:
            raise RuntimeError(f"{server.name} answered {status}: {out}")
        if j >= 5:
            for key, val in (out.get("timings") or {}).items():
                got.setdefault(key, []).append(val)
    return {k: float(np.median(v)) for k, v in got.items()}


def replica_memory() -> list[dict]:
    """RSS / PSS of every Ray Serve replica process on this machine (by its process title)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        cmd = _cmdline(int(d.name))
        if "ServeReplica" not in cmd:
            continue
        role = "shard" if ":shard" in cmd else "ingress" if ":ingress" in cmd else "other"
        mem = smaps_rollup(int(d.name))
        out.append({"pid": int(d.name), "role": role, "title": cmd.strip()[:80], **mem})
    return out


def shard_stats(shards: int) -> list[dict]:
    """The shard replicas' counters (``batches``, ``batched_requests``) of the running application, read by a
    short driver process that joins the local Ray cluster."""
    import subprocess

    code = ("import json, ray; from ray import serve; ray.init(address='auto', log_to_driver=False, "
            "configure_logging=False); print(json.dumps([serve.get_deployment_handle(f'shard{i}', "
            f"app_name='rec_engine').stats.remote().result() for i in range({shards})]))")
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=180, check=True)
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError) as e:
        print(f"shard stats: {e}", flush=True)
        return []


def _ray_stop() -> None:
    import subprocess

    ray = Path(sys.executable).parent / "ray"
    if ray.exists():
        subprocess.run([str(ray), "stop", "--force"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


# ============================================================================== report
def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# rec-engine cluster vs the single-process server ({result['date']})", "",
             f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores; {result['n_items']:,} items x 64, "
             f"{N_CANDIDATES} candidates ranked by DeepFM, k={K}; {result['seconds']} s per point, closed-loop "
             "keep-alive clients on loopback (bench/bench_cluster.py). Every service gave the same answers "
             "before timing.", "",
             f"Machine load while it ran: load average {result.get('loadavg_before', '?')} before, "
             f"{result.get('loadavg_after', '?')} after; \"other\" below: cores busy with other jobs during a point.", "",
             "## Throughput (req/s) and latency (ms, p50 / p99)", "",
             "| service | " + " | ".join(f"{c} client{'s' if c > 1 else ''}" for c in result["clients"]) + " |",
             "|---|" + "---|" * len(result["clients"])]
    for name, rows in result["http"].items():
        cells = [f"{r['throughput_rps']:.1f}, {r['p50_ms']:.1f} / {r['p99_ms']:.1f}" + (f" ({r['errors']} errors)"
                 if r["errors"] else "") for r in rows]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Other jobs' cores during each point (of the machine's; hypervisor steal in brackets):", "",
              "| service | " + " | ".join(str(c) for c in result["clients"]) + " |",
              "|---|" + "---|" * len(result["clients"])]
    for name, rows in result["http"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r.get('other_cores', 0):.2f} ({r.get('steal_cores', 0):.2f})"
                                               for r in rows) + " |")
    lines += ["", "Server CPU per request (ms, all processes of the service):", "",
              "| service | " + " | ".join(str(c) for c in result["clients"]) + " |",
              "|---|" + "---|" * len(result["clients"])]
    for name, rows in result["http"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r['server_cpu_ms_per_req']:.1f}" for r in rows) + " |")
    lines += ["", "## The fan-out's overhead (engine timings, median of 40 sequential requests, ms)", "",
              "| service | retrieval (scan, or fan-out + merge) | ranking | total in the engine | HTTP p50 at 1 client |",
              "|---|---|---|---|---|"]
    for name, t in result["timings"].items():
        p50 = result["http"][name][0]["p50_ms"]
        lines.append(f"| {name} | {t.get('retrieval_ms', float('nan')):.2f} | {t.get('ranking_ms', float('nan')):.2f} "
                     f"| {t.get('total_ms', float('nan')):.2f} | {p50:.2f} |")
    lines += ["", "## Shard scans (one process, one thread, top-500 of S rows x 64 float32, 50 excluded ids)", "",
              "| rows S | MiB | single query p50 / p99 (ms) | GB/s | per query in a batch of 16 (ms) | request / answer bytes |",
              "|---|---|---|---|---|---|"]
    for s in result["scans"]:
        lines.append(f"| {s['rows']:,} | {s['mb']:.0f} | {s['single_ms_p50']:.2f} / {s['single_ms_p99']:.2f} | "
                     f"{s['gb_per_s']:.1f} | {s['batch16_ms_per_query']:.2f} | {s['request_bytes']} / {s['answer_bytes']} |")
    if result.get("shard_batches"):
        lines += ["", "Coalesced scans over the whole run (all shards; warm-up, checks and every client count):", "",
                  "| service | scan requests | scans (scan_many calls) | requests per scan |", "|---|---|---|---|"]
        for name, b in result["shard_batches"].items():
            lines.append(f"| {name} | {b['requests']} | {b['batches']} | {b['requests'] / max(b['batches'], 1):.2f} |")
    if result.get("batch_scans"):
        b0 = result["batch_scans"][0]
        lines += ["", f"## Batched shard scans ({b0['rows']:,} rows x 64 of the bundle's table, memory-mapped, one "
                      f"thread, top-{N_CANDIDATES}, 50 excluded ids per query)", "",
                  "| path | batch | ms per call | ms per query |", "|---|---|---|---|"]
        for r in result["batch_scans"]:
            lines.append(f"| {r['path']} | {r['batch']} | {r['ms_per_call']:.2f} | {r['ms_per_query']:.2f} |")
    lines += ["", "## Memory of the Serve replicas (MiB, /proc/PID/smaps_rollup, after the load)", "",
              "| service | process | RSS | PSS | anonymous |", "|---|---|---|---|---|"]
    for name, procs in result["memory"].items():
        for p in sorted(procs, key=lambda p: p["title"]):
            lines.append(f"| {name} | {p['role']} ({p['title'].split()[0]}) | {p.get('rss_mib', 0):.0f} | "
                         f"{p.get('pss_mib', 0):.0f} | {p.get('anon_mib', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", default="1,2,4")
    ap.add_argument("--clusters", default="1x1,2x1,2x2", help="MxR pairs: shards x ingress replicas")
    ap.add_argument("--scan-rows", default="250000,500000,1000000,2000000,4000000")
    ap.add_argument("--ray-cpus", type=int, default=8, help="logical CPUs of the local Ray cluster")
    ap.add_argument("--shard-batch", default="1,16", help="--shard-batch values to run each cluster with")
    ap.add_argument("--rounds", type=int, default=1, help="run every cluster configuration this many times, "
                    "interleaved (a loaded machine's noise shows between rounds)")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    settings = Settings.from_env(topk_threads=1)
    print(f"bundle: {settings.n_items:,} items (built once, cached) ...", flush=True)
    bundle = cached_pipeline(settings)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "n_items": settings.n_items,
              "seconds": args.seconds, "clients": clients, "http": {}, "timings": {}, "memory": {},
              "loadavg_before": " ".join(f"{x:.2f}" for x in os.getloadavg())}
    print("shard scans ...", flush=True)
    result["scans"] = scan_times([int(r) for r in args.scan_rows.split(",") if r])
    result["batch_scans"] = batch_scan_times(bundle)
    for r in result["batch_scans"]:
        print(f"{r['path']} batch {r['batch']}: {r['ms_per_query']:.2f} ms/query", flush=True)
    bodies = _bodies(settings, 400)
    log_dir = HERE / "results" / "cluster_logs"
    log_dir.mkdir(parents=True, exist_ok=True)

    def measure(server) -> None:
        """The server's stage timings, then its throughput and latency at each client count."""
        result["timings"][server.name] = engine_timings(server, bodies)
        result["http"][server.name] = []
        for c in clients:
            r = load(server.port, bodies, c, args.seconds, server.pids())
            print(server.name, c, f"{r['throughput_rps']:.1f} req/s p99 {r['p99_ms']:.1f} ms", flush=True)
            result["http"][server.name].append(r)

    single = rec_server(bundle, 1, 0, 32, log_dir)
    try:
        single.wait_ready()
        measure(single)
        runs = [(*(int(x) for x in p.split("x")), int(b), r) for r in range(args.rounds)
                for p in args.clusters.split(",") for b in args.shard_batch.split(",")]
        for shards, replicas, batch, rnd in runs:
            srv = cluster_server(bundle, shards, replicas, log_dir, args.ray_cpus, batch)
            if args.rounds > 1:
                srv.name += f" (round {rnd + 1})"
            try:
                srv.wait_ready(timeout=900)
                check_agreement([single, srv], bodies)
                measure(srv)
                result["memory"][srv.name] = replica_memory()
                st = shard_stats(shards)
                if st:
                    result.setdefault("shard_batches", {})[srv.name] = {
                        "batches": sum(x.get("batches", 0) for x in st),
                        "requests": sum(x.get("batched_requests", 0) for x in st)}
            finally:
                srv.stop()
                _ray_stop()
    finally:
        single.stop()
    result["loadavg_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    md = markdown(result)
    print(md)
    (HERE / "latest").mkdir(exist_ok=True)
    (HERE / "latest" / "CLUSTER.md").write_text(md)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "cluster.json").write_text(json.dumps(result, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
