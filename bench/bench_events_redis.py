"""The Redis Streams event store shared by replicas: how long until one replica sees another's event, and how
fast appends go.

A plain script (pytest collects nothing from it: no ``bench_*`` functions, all work under ``__main__``).
It starts its own ``redis-server`` on a free loopback port in a temporary folder (``--save "" --appendonly
no``), or uses ``--url``. Fixed counts, loopback only:

- **Replica delay**: replica A (this process) appends one click at a time, stamped ``ts=time.time()``, one
  every ``--interval-ms`` (so events do not pile up into batches); replica B (another process, its own
  :class:`RedisEventStore` on the same stream) follows with ``events_after`` and records, per event,
  ``time.time() - event.ts`` when it receives it. Three ways of following:
  ``poll``: ``events_after`` in a tight loop; ``poll 1 ms``: sleeping 1 ms after an empty answer;
  ``block``: ``events_after(cursor, wait_s=1.0)`` (XREAD BLOCK: Redis answers when an entry arrives).
  B's CPU time per second of following is recorded too (what the tight loop costs).
- **Append throughput**: sequential ``append`` calls of batch 1 and batch 100 (one MULTI/EXEC per call, one
  round trip), each timed; events/s and p50/p99 per call. Then ``append(wait=False)`` of single events and a
  final ``flush`` (the writer thread groups whatever is waiting into one transaction).
- **Bulk reads**: ``load_state()`` and ``read()`` over the stream of the append runs.

Output: a Markdown table on stdout and every number in ``bench/results/events_redis.json``.

    ./dev.sh .venv/bin/python bench/bench_events_redis.py                 # 2,000 events per delay variant
    ./dev.sh .venv/bin/python bench/bench_events_redis.py --events 500    # quick
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(folder: str) -> tuple[subprocess.Popen, str]:
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server), or pass --url")
    port = _free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", folder, "--save", "",
                             "--appendonly", "no", "--daemonize", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("redis-server did not start")
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def _pct(x, q) -> float:
    return float(np.percentile(np.asarray(x, dtype=np.float64), q))


# ---------------------------------------------------------------------------------- replica delay
def follow(url: str, stream: str, mode: str, n: int, ready, out) -> None:
    """Replica B: follow the stream until ``n`` events arrived; send back the delays (seconds) and CPU/s."""
    from rec_engine.events_redis import RedisEventStore

    store = RedisEventStore(url, stream=stream)
    _, cursor = store.events_after(None)
    ready.set()
    delays: list[float] = []
    polls = 0
    t0, c0 = time.monotonic(), time.process_time()
    while len(delays) < n:
        got, cursor = store.events_after(cursor, wait_s=1.0 if mode == "block" else None)
        now = time.time()
        polls += 1
        delays.extend(now - e.ts for e in got)
        if not got and mode == "poll 1 ms":
            time.sleep(0.001)
    wall, cpu = time.monotonic() - t0, time.process_time() - c0
    store.close()
    out.put({"delays": delays, "polls": polls, "cpu_per_s": cpu / wall})


def measure_delay(url: str, mode: str, n: int, interval_s: float) -> dict:
    from rec_engine.events import Event
    from rec_engine.events_redis import RedisEventStore

    stream = f"bench:{uuid.uuid4().hex[:8]}"
    ctx = mp.get_context("spawn")
    ready, out = ctx.Event(), ctx.Queue()
    proc = ctx.Process(target=follow, args=(url, stream, mode, n, ready, out), daemon=True)
    proc.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the follower did not start")
        a = RedisEventStore(url, stream=stream)
        nxt = time.perf_counter()
        for i in range(n):
            wait = nxt - time.perf_counter()         # paced: one event per interval, no pile-up into batches
            if wait > 0:
                time.sleep(wait)
            nxt += interval_s
            a.append([Event("click", i % 100, i, ts=time.time())])
        got = out.get(timeout=120)
        a._r.delete(stream, f"{stream}:meta")
        a.close()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.terminate()
    d = np.asarray(got["delays"]) * 1000
    return {"mode": mode, "events": n, "interval_ms": interval_s * 1000, "median_ms": float(np.median(d)),
            "p99_ms": _pct(d, 99), "max_ms": float(d.max()), "polls": got["polls"],
            "follower_cpu_per_s": got["cpu_per_s"]}


# ---------------------------------------------------------------------------------- appends and reads
def measure_appends(url: str, batch: int, calls: int, stream: str) -> dict:
    from rec_engine.events import Event
    from rec_engine.events_redis import RedisEventStore

    rng = np.random.default_rng(batch)
    with RedisEventStore(url, stream=stream) as s:
        batches = [[Event("click", int(rng.integers(10_000)), int(rng.integers(100_000)), ts=time.time(),
                          request_id=f"r{j}", attrs={"pos": j % 10}) for j in range(batch)] for _ in range(calls)]
        times = np.empty(calls)
        t0 = time.perf_counter()
        for i, b in enumerate(batches):
            t = time.perf_counter()
            s.append(b)
            times[i] = time.perf_counter() - t
        wall = time.perf_counter() - t0
    return {"run": f"append batch {batch}", "calls": calls, "events": calls * batch,
            "events_per_s": calls * batch / wall, "p50_ms": _pct(times, 50) * 1000, "p99_ms": _pct(times, 99) * 1000}


def measure_nowait(url: str, n: int, stream: str) -> dict:
    from rec_engine.events import Event
    from rec_engine.events_redis import RedisEventStore

    with RedisEventStore(url, stream=stream) as s:
        evs = [Event("click", i % 10_000, i, ts=time.time()) for i in range(n)]
        times = np.empty(n)
        t0 = time.perf_counter()
        for i, e in enumerate(evs):
            t = time.perf_counter()
            s.append([e], wait=False)
            times[i] = time.perf_counter() - t
        s.flush()
        wall = time.perf_counter() - t0
    return {"run": "append batch 1, wait=False, then flush", "calls": n, "events": n, "events_per_s": n / wall,
            "p50_ms": _pct(times, 50) * 1000, "p99_ms": _pct(times, 99) * 1000}


def measure_reads(url: str, stream: str) -> list[dict]:
    from rec_engine.events_redis import RedisEventStore

    out = []
    with RedisEventStore(url, stream=stream) as s:
        n = s.count()
        for name, fn in (("load_state()", lambda: sum(map(len, s.load_state().values()))),
                         ("read() all", lambda: sum(1 for _ in s.read())),
                         ("read(user=7)", lambda: sum(1 for _ in s.read(user=7)))):
            t = time.perf_counter()
            got = fn()
            wall = time.perf_counter() - t
            out.append({"run": name, "stream_events": n, "returned": got, "seconds": wall,
                        "events_per_s": n / wall})
        s._r.delete(stream, f"{stream}:meta")
    return out


# ---------------------------------------------------------------------------------- report
def machine(url: str) -> dict:
    import redis

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    client = redis.Redis.from_url(url)
    server = client.info("server")
    client.close()
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "redis_py": redis.__version__,
            "redis_server": server.get("redis_version"), "loadavg": os.getloadavg()}


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = ["# Redis Streams event store: replica delay and append throughput", "",
             f"{m['cpu']}, {m['cores']} cores (load average at start {m['loadavg'][0]:.1f}); redis-server "
             f"{m['redis_server']} on loopback without persistence, redis-py {m['redis_py']}, Python {m['python']}; "
             f"started {result['started']}.", "",
             "## Replica delay (A appends an event stamped with its ts; B, another process, receives it)", "",
             "| B follows by | events | A's interval ms | median ms | p99 ms | max ms | B's polls | B's CPU s/s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["delay"]:
        lines.append(f"| {r['mode']} | {r['events']} | {r['interval_ms']:.0f} | {r['median_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} | {r['max_ms']:.2f} | {r['polls']} | {r['follower_cpu_per_s']:.2f} |")
    lines += ["", "## Appends (one caller, sequential calls; each call one MULTI/EXEC round trip)", "",
              "| run | calls | events | events/s | p50 ms per call | p99 ms per call |", "|---|---:|---:|---:|---:|---:|"]
    for r in result["append"]:
        lines.append(f"| {r['run']} | {r['calls']} | {r['events']} | {r['events_per_s']:,.0f} | {r['p50_ms']:.3f} | "
                     f"{r['p99_ms']:.3f} |")
    lines += ["", "## Bulk reads (server-side filtered pages of 10,000 entries)", "",
              "| read | stream events | returned | seconds | stream events/s |", "|---|---:|---:|---:|---:|"]
    for r in result["reads"]:
        lines.append(f"| {r['run']} | {r['stream_events']} | {r['returned']} | {r['seconds']:.3f} | "
                     f"{r['events_per_s']:,.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", help="an existing Redis (default: start a private redis-server on loopback)")
    ap.add_argument("--events", type=int, default=2000, help="events per replica-delay variant")
    ap.add_argument("--interval-ms", type=float, default=2.0, help="A's pace in the delay runs")
    ap.add_argument("--calls", type=int, default=5000, help="append calls at batch 1 (batch 100: calls / 20)")
    args = ap.parse_args()
    proc = None
    with tempfile.TemporaryDirectory() as folder:
        url = args.url
        if url is None:
            proc, url = start_redis(folder)
        try:
            result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(url),
                      "settings": vars(args) | {"url": url}}
            result["delay"] = [measure_delay(url, mode, args.events, args.interval_ms / 1000)
                               for mode in ("poll", "poll 1 ms", "block")]
            stream = f"bench:{uuid.uuid4().hex[:8]}"
            result["append"] = [measure_appends(url, 1, args.calls, stream),
                                measure_appends(url, 100, max(1, args.calls // 20), stream),
                                measure_nowait(url, args.calls * 4, stream)]
            result["reads"] = measure_reads(url, stream)
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(10)
    text = markdown(result)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "events_redis.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {RESULTS / 'events_redis.json'}")


if __name__ == "__main__":
    main()
