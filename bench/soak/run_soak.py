"""Soak test of the real server on loopback: 16 locust clients for 5 minutes, a swap every 10 s.

One command (a plain script; pytest collects nothing from it):

    /work/dev.sh python bench/soak/run_soak.py                  # 300 s of load (about 6 minutes in all)
    /work/dev.sh python bench/soak/run_soak.py --run-time 30    # a short run to try it

What it does:

1. Builds two pipeline bundles (LightGCN retrieval + DeepFM ranking) with the project's own synthetic world
   and training (``rec-engine demo --out DIR --items N``, about 25 s each on 2 cores): ``big`` with
   ``--big-items`` items (1000) and ``small`` with ``--small-items`` (600), the same 2000 users and item
   keys ``sku-0000`` ... (so the small catalogue's keys are the first ones of the big one), both of
   dimension 32. They go into ``<tmp>/bundles/{big,small}``; ``<tmp>/bundles`` is the server's bundle root.
2. Starts ``rec-engine serve <tmp>/bundles/big`` (one worker, the defaults) as a subprocess with a write
   token (``--token-env``) and a SQLite event store (``--events <tmp>/events.db``).
3. Runs locust headless (``bench/soak/locustfile.py``: ``--users 16 --spawn-rate 16 --run-time T``):
   /recommend, /observe, /feedback, POST /items (with vectors), POST /items/remove, every request with
   ``Authorization: Bearer <token>``; meanwhile a thread POSTs /swap every ``--swap-every`` seconds,
   alternating small / big (so the catalogue size changes with every swap; each swap is checked by
   /healthz's item count) and another reads the server's VmRSS from /proc/PID/status every second.
4. Stops the server (SIGINT), counts the events in its store against those it acknowledged, and writes
   ``bench/latest/SOAK.md`` and ``bench/latest/soak.json``.

It fails (exit 1) on any error: a non-2xx answer or a transport error on any endpoint (every request is
designed to be valid, see the locustfile; no status is "expected"), a /recommend answer holding an item
whose removal was acknowledged before it was sent, a swap that did not change the catalogue size, fewer
stored events than acknowledged ones, the server dying, or RSS growth from the end of the warm-up (first
``--warmup`` s) to the end of the load at or above ``--max-growth`` percent (5).
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import resource
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOKEN_ENV = "REC_ENGINE_SOAK_TOKEN"


def _env() -> dict:
    env = dict(os.environ)
    paths = [str(ROOT / "python"), str(ROOT / ".devpath")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def build_bundles(tmp: Path, big: int, small: int, seed: int) -> dict:
    """Two pipelines from the synthetic world (rec-engine demo's training), moved under one bundle root."""
    root = tmp / "bundles"
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in (("big", big), ("small", small)):
        work = tmp / f"train-{name}"
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "rec_engine.cli", "demo", "--out", str(work), "--items", str(n),
               "--seed", str(seed), "--requests", "10"]
        with open(tmp / f"train-{name}.log", "w") as log:
            subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)
        shutil.move(str(work / "pipeline"), str(root / name))
        meta = json.loads((root / name / "retrieval" / "manifest.json").read_text())["meta"]
        out[name] = {"path": str(root / name), "items": int(meta["n_items"]), "users": int(meta["n_users"]),
                     "dim": int(meta["dim"]), "train_s": round(time.perf_counter() - t0, 1)}
        print(f"bundle {name}: {out[name]}", flush=True)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body: dict | None, token: str, timeout: float = 60.0):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {token}"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=headers)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw.decode(errors="replace")
    finally:
        conn.close()


_RSS_FIELDS = ("VmRSS", "RssAnon", "RssFile")


def _rss_kb(pid: int) -> tuple | None:
    """(VmRSS, RssAnon, RssFile) of ``pid`` in KiB: the heap and the mapped files (bundle tables, libraries)."""
    got = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in _RSS_FIELDS:
                    got[name] = int(line.split()[1])
    except OSError:
        return None
    return tuple(got.get(n, 0) for n in _RSS_FIELDS) if "VmRSS" in got else None


def _cpu_s(pid: int) -> float | None:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


class Sampler(threading.Thread):
    """VmRSS of ``pid`` every ``every`` s: [(seconds since ``t0``, KiB), ...]."""

    def __init__(self, pid: int, t0: float, every: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.t0, self.every = pid, t0, every
        self.samples: list[tuple[float, int]] = []
        self.parts: list[tuple[int, int]] = []       # (RssAnon, RssFile) beside each sample
        self.stop = threading.Event()

    def run(self):
        nxt = time.monotonic()
        while not self.stop.is_set():
            got = _rss_kb(self.pid)
            if got is not None:
                self.samples.append((round(time.monotonic() - self.t0, 2), got[0]))
                self.parts.append(got[1:])
            nxt += self.every
            self.stop.wait(max(0.0, nxt - time.monotonic()))


class Swapper(threading.Thread):
    """POST /swap every ``every`` s, alternating between the bundles; /healthz's item count after each."""

    def __init__(self, port: int, token: str, order: list[tuple[str, str, int]], t0: float, every: float,
                 until: float):
        super().__init__(daemon=True)
        self.port, self.token, self.order, self.t0, self.every, self.until = port, token, order, t0, every, until
        self.records: list[dict] = []
        self.stop = threading.Event()

    def run(self):
        n = 0
        while True:
            due = self.t0 + self.every * (n + 1)
            if due > self.until or self.stop.wait(max(0.0, due - time.monotonic())):
                return
            name, path, want = self.order[n % len(self.order)]
            rec = {"t": round(time.monotonic() - self.t0, 2), "to": name}
            t = time.perf_counter()
            try:
                status, out = _call(self.port, "POST", "/swap", {"bundle": path}, self.token)
                rec.update(status=status, ms=round((time.perf_counter() - t) * 1e3, 2))
                if status != 200:
                    rec["error"] = str(out)[:300]
                hs, health = _call(self.port, "GET", "/healthz", None, self.token, timeout=30)
                items = health.get("items") if hs == 200 and isinstance(health, dict) else None
                rec.update(items=items, version=health.get("version") if isinstance(health, dict) else None,
                           base_items=want)
            except OSError as e:
                rec.update(status=0, ms=round((time.perf_counter() - t) * 1e3, 2), error=f"{type(e).__name__}: {e}")
            self.records.append(rec)
            n += 1


def _pct(x: np.ndarray, q: float) -> float:
    return float(np.percentile(x, q)) if len(x) else float("nan")


def summarize(raw: dict, swaps: list[dict], run_s: float) -> list[dict]:
    rows = []
    order = ["/recommend", "/observe", "/feedback", "/items", "/items/remove"]
    names = order + sorted(set(raw["requests"]) - set(order))
    for name in names:
        recs = raw["requests"].get(name, [])
        lat = np.array([r[1] for r in recs], np.float64)
        fails = sum(1 for r in recs if r[3] or not 200 <= r[2] < 300)
        statuses: dict = {}
        for r in recs:
            statuses[str(r[2])] = statuses.get(str(r[2]), 0) + 1
        rows.append({"endpoint": name, "count": len(recs), "failures": fails, "p50_ms": _pct(lat, 50),
                     "p99_ms": _pct(lat, 99), "max_ms": float(lat.max()) if len(lat) else float("nan"),
                     "rps": len(recs) / run_s, "statuses": statuses})
    lat = np.array([s["ms"] for s in swaps], np.float64)
    rows.append({"endpoint": "/swap", "count": len(swaps),
                 "failures": sum(1 for s in swaps if s.get("status") != 200 or s.get("error")),
                 "p50_ms": _pct(lat, 50), "p99_ms": _pct(lat, 99),
                 "max_ms": float(lat.max()) if len(lat) else float("nan"), "rps": len(swaps) / run_s,
                 "statuses": {str(s.get("status")): sum(1 for x in swaps if x.get("status") == s.get("status"))
                              for s in swaps}})
    return rows


def stored_events(db: Path) -> dict:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return {k: n for k, n in con.execute("SELECT kind, count(*) FROM events GROUP BY kind")}
    finally:
        con.close()


def write_report(res: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "soak.json").write_text(json.dumps(res, indent=1) + "\n")
    r, b = res["rss"], res["bundles"]
    total = sum(x["count"] for x in res["endpoints"])
    fails = sum(x["failures"] for x in res["endpoints"])
    lines = [
        "# Soak: the real server under 16 clients with a swap every 10 s",
        "",
        f"{res['date']}, {res['machine']}. Command: `{res['command']}`.",
        "",
        f"`rec-engine serve` (one worker, defaults, `--token-env`, `--events` SQLite) on loopback; locust "
        f"{res['locust_version']} headless, {res['users']} closed-loop clients (wait {res['wait_ms']} ms) for "
        f"{res['run_time_s']} s mixing /recommend (10), /observe (3), /feedback (3), POST /items with vectors (1) "
        f"and POST /items/remove (1) (task weights), every request with the write token; a /swap every "
        f"{res['swap_every_s']} s alternating the pipelines `big` ({b['big']['items']} items) and `small` "
        f"({b['small']['items']} items), both LightGCN (dim {b['big']['dim']}) + DeepFM from `rec-engine demo` "
        f"(synthetic world, {b['big']['users']} users). Latencies are the client's, per request, exact "
        f"(not locust's rounded buckets).",
        "",
        "| endpoint | requests | failures | p50 ms | p99 ms | max ms | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for x in res["endpoints"]:
        lines.append(f"| {x['endpoint']} | {x['count']:,} | {x['failures']} | {x['p50_ms']:.2f} | {x['p99_ms']:.2f} "
                     f"| {x['max_ms']:.1f} | {x['rps']:.1f} |")
    lines.append(f"| **all** | {total:,} | {fails} | | | | {total / res['run_time_s']:.1f} |")
    sizes = [s.get("items") for s in res["swaps"]]
    lines += [
        "",
        f"- **Errors: {fails}** (non-2xx or transport errors, every endpoint; no status counts as expected). "
        f"Statuses seen: {json.dumps({x['endpoint']: x['statuses'] for x in res['endpoints']})}.",
        f"- **Swaps:** {len(res['swaps'])}, catalogue size after each (/healthz, base + items added online): "
        f"{', '.join(str(s) for s in sizes)}; every swap changed the size: {res['checks']['swaps_changed_size']}.",
        f"- **Removed items in answers:** {res['checks']['stale_removed']} of {res['checks']['answers_checked']:,} "
        f"/recommend answers held an item whose removal was acknowledged before the request was sent.",
        f"- **Event store:** acknowledged {json.dumps(res['checks']['acked'])}; stored "
        f"{json.dumps(res['checks']['stored'])}; none lost: {res['checks']['events_ok']}.",
        f"- **CPU:** the server {res['server_cpu_s']:.0f} s over the run ({res['server_cpu_s'] / res['run_time_s']:.2f} "
        f"cores), locust {res['client_cpu_s']:.0f} s ({res['client_cpu_s'] / res['run_time_s']:.2f} cores), on "
        f"{os.cpu_count()} cores: the clients share the machine, so latencies include waiting for a core.",
        f"- **RSS** (VmRSS every second): {r['start_mb']:.1f} MiB after load, {r['warm_mb']:.1f} MiB at the end of "
        f"the warm-up ({r['warmup_s']} s), **{r['end_mb']:.1f} MiB at the end**, max {r['max_mb']:.1f} MiB: "
        f"**growth {r['growth_pct']:+.2f}%** from the warm-up's end (limit {res['max_growth_pct']}%). Per 30 s: "
        f"{', '.join(f'{m:.1f}' for m in r['per_30s_mb'])} MiB. Of it, the heap (RssAnon) "
        f"{r['anon_warm_mb']:.1f} -> {r['anon_end_mb']:.1f} MiB and mapped files (RssFile: bundle tables, "
        f"libraries) {r['file_warm_mb']:.1f} -> {r['file_end_mb']:.1f} MiB.",
        f"- **Server log:** {res['server_log']['tracebacks']} tracebacks, {res['server_log']['error_lines']} ERROR "
        f"lines; exit code after SIGINT {res['server_exit']}.",
        "",
        f"**Result: {'PASS' if res['ok'] else 'FAIL'}**" + ("" if res["ok"] else f" ({'; '.join(res['why'])})"),
        "",
    ]
    (out_dir / "SOAK.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-time", type=int, default=300, help="seconds of load (default 300)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds of warm-up before the RSS baseline (default 30, or a third of a shorter run)")
    ap.add_argument("--users", type=int, default=16)
    ap.add_argument("--swap-every", type=float, default=10.0)
    ap.add_argument("--wait-ms", type=float, default=0.0, help="each client's pause between requests")
    ap.add_argument("--big-items", type=int, default=1000)
    ap.add_argument("--small-items", type=int, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bundles", type=Path, default=None,
                    help="reuse <DIR>/big and <DIR>/small from an earlier run (--keep) instead of training")
    ap.add_argument("--max-growth", type=float, default=5.0, help="RSS growth limit in percent")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "latest")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (bundles, logs, store)")
    args = ap.parse_args(argv)
    warmup = args.warmup if args.warmup is not None else min(30.0, args.run_time / 3)

    tmp = Path(tempfile.mkdtemp(prefix="rec_engine_soak_"))
    print(f"working in {tmp}", flush=True)
    server = None
    try:
        if args.bundles:
            bundles = {}
            for name in ("big", "small"):
                path = (tmp / "bundles" / name)
                path.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(args.bundles / name, path)
                meta = json.loads((path / "retrieval" / "manifest.json").read_text())["meta"]
                bundles[name] = {"path": str(path), "items": int(meta["n_items"]), "users": int(meta["n_users"]),
                                 "dim": int(meta["dim"]), "train_s": None}
        else:
            bundles = build_bundles(tmp, args.big_items, args.small_items, args.seed)
        big, small = bundles["big"], bundles["small"]
        if big["dim"] != small["dim"] or big["users"] != small["users"] or big["items"] == small["items"]:
            raise SystemExit(f"the bundles must share dim and users and differ in items: {bundles}")

        token = secrets.token_urlsafe(24)
        port = _free_port()
        events_db = tmp / "events.db"
        env = _env()
        env[TOKEN_ENV] = token
        cmd = [sys.executable, "-m", "rec_engine.cli", "serve", big["path"], "--host", "127.0.0.1", "--port",
               str(port), "--token-env", TOKEN_ENV, "--events", str(events_db), "--log-level", "warning"]
        server_log = open(tmp / "server.log", "w")
        server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        deadline = time.monotonic() + 180
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the server exited with {server.returncode}: see {tmp / 'server.log'}")
            try:
                status, health = _call(port, "GET", "/healthz", None, token, timeout=5)
                if status == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not answer /healthz within 180 s")
            time.sleep(0.5)
        print(f"server pid {server.pid} on port {port}: {health}", flush=True)

        raw_path = tmp / "locust_raw.json"
        lenv = dict(env)
        lenv.update(SOAK_TOKEN=token, SOAK_RAW=str(raw_path), SOAK_USERS=str(big["users"]),
                    SOAK_SHARED_ITEMS=str(small["items"]), SOAK_DIM=str(big["dim"]), SOAK_WAIT_MS=str(args.wait_ms))
        lenv.pop(TOKEN_ENV, None)
        locust = str(Path(sys.executable).with_name("locust"))
        lcmd = [locust, "-f", str(HERE / "locustfile.py"), "--headless", "--users", str(args.users),
                "--spawn-rate", str(args.users), "--run-time", f"{args.run_time}s", "--host",
                f"http://127.0.0.1:{port}", "--csv", str(tmp / "locust"), "--only-summary", "--stop-timeout", "30",
                "--loglevel", "WARNING"]
        cpu0 = _cpu_s(server.pid)
        t0 = time.monotonic()
        sampler = Sampler(server.pid, t0)
        sampler.start()
        swapper = Swapper(port, token, [("small", small["path"], small["items"]), ("big", big["path"], big["items"])],
                          t0, args.swap_every, t0 + args.run_time - 1)
        swapper.start()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        with open(tmp / "locust.log", "w") as llog:
            lp = subprocess.run(lcmd, stdout=llog, stderr=subprocess.STDOUT, env=lenv, cwd=ROOT,
                                timeout=args.run_time + 120)
        t_end = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
        cpu1 = _cpu_s(server.pid)
        swapper.stop.set()
        swapper.join(timeout=120)
        sampler.stop.set()
        sampler.join(timeout=5)
        print(f"locust exited with {lp.returncode} after {t_end:.1f} s", flush=True)

        status, health_end = _call(port, "GET", "/healthz", None, token, timeout=10)
        alive = status == 200 and server.poll() is None
        server.send_signal(signal.SIGINT)
        try:
            server_exit = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server_exit = "killed after 60 s"
        server_log.close()
        log_text = (tmp / "server.log").read_text(errors="replace")

        raw = json.loads(raw_path.read_text())
        rows = summarize(raw, swapper.records, args.run_time)
        samples = [(t, kb) for t, kb in sampler.samples if t <= args.run_time + 0.5]
        ts = np.array([t for t, _ in samples])
        kbs = np.array([kb for _, kb in samples], np.float64)
        i_warm = int(np.searchsorted(ts, warmup))
        warm, end = kbs[min(i_warm, len(kbs) - 1)], kbs[-1]
        per30 = [kbs[(ts >= a) & (ts < a + 30)].mean() / 1024 for a in range(0, args.run_time, 30)
                 if ((ts >= a) & (ts < a + 30)).any()]
        parts = np.array(sampler.parts[:len(samples)], np.float64) / 1024
        rss = {"warmup_s": warmup, "start_mb": kbs[0] / 1024, "warm_mb": warm / 1024, "end_mb": end / 1024,
               "anon_warm_mb": parts[min(i_warm, len(parts) - 1), 0], "anon_end_mb": parts[-1, 0],
               "file_warm_mb": parts[min(i_warm, len(parts) - 1), 1], "file_end_mb": parts[-1, 1],
               "max_mb": kbs.max() / 1024, "growth_pct": (end - warm) / warm * 100, "per_30s_mb": per30,
               "samples": [[t, kb] for t, kb in samples]}
        stored = stored_events(events_db)
        acked = raw["checks"]["acked"]
        events_ok = all(stored.get(k, 0) >= n for k, n in acked.items())
        sizes = [s.get("items") for s in swapper.records]
        changed = all(a != b for a, b in zip([health["items"]] + sizes[:-1], sizes)) and all(
            s is not None for s in sizes)
        checks = {"stale_removed": raw["checks"]["stale_removed"], "stale_examples": raw["checks"]["stale_examples"],
                  "answers_checked": raw["checks"]["answers_checked"], "acked": acked, "stored": stored,
                  "events_ok": events_ok, "swaps_changed_size": changed}
        why = []
        n_fail = sum(r["failures"] for r in rows)
        if n_fail:
            why.append(f"{n_fail} failed requests")
        if checks["stale_removed"]:
            why.append(f"{checks['stale_removed']} answers held removed items")
        if not changed:
            why.append("a swap did not change the catalogue size")
        if not events_ok:
            why.append("the store holds fewer events than were acknowledged")
        if not alive:
            why.append("the server was not answering at the end")
        if rss["growth_pct"] >= args.max_growth:
            why.append(f"RSS growth {rss['growth_pct']:.2f}% >= {args.max_growth}%")
        import locust as _locust

        res = {
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
            "command": "/work/dev.sh python bench/soak/run_soak.py" + (" " + " ".join(argv if argv is not None
                                                                                     else sys.argv[1:])).rstrip(),
            "locust_version": _locust.__version__, "users": args.users, "run_time_s": args.run_time,
            "wait_ms": args.wait_ms, "swap_every_s": args.swap_every, "bundles": bundles, "server_cmd": cmd[1:],
            "endpoints": rows, "swaps": swapper.records, "rss": rss, "checks": checks,
            "errors": raw["errors"], "health_start": health, "health_end": health_end,
            "server_cpu_s": (cpu1 or 0) - (cpu0 or 0), "client_cpu_s": client_cpu, "server_exit": server_exit,
            "server_log": {"tracebacks": log_text.count("Traceback"),
                           "error_lines": sum(1 for ln in log_text.splitlines() if "ERROR" in ln),
                           "tail": log_text[-3000:]},
            "locust_exit": lp.returncode, "max_growth_pct": args.max_growth, "ok": not why, "why": why,
        }
        write_report(res, args.out_dir)
        print((args.out_dir / "SOAK.md").read_text())
        return 0 if not why else 1
    finally:
        if server is not None and server.poll() is None:
            server.kill()
            server.wait()
        if args.keep:
            print(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
