"""The whole service over HTTP: ``rec-engine serve`` beside a peer service written the plain way.

A plain script (pytest collects nothing from it). Both services answer ``POST /recommend`` with
``{"user": U, "k": 10, "context": {...}}`` for the pipeline bundle of ``bench_engine.py`` (an ``mf``
retrieval stage over N items x 64, the user's 50 seen items excluded, 500 candidates ranked by an untrained
DeepFM over 26 fields, top 10):

- ``rec_engine wW cX``: ``rec-engine serve BUNDLE --workers W --coalesce-us X`` in a subprocess
  (``--threads 1 --ort-threads 1``, the server defaults; ``X = 0``: coalescing off).
- ``peer wW``: FastAPI + uvicorn (``--workers W``) over :class:`PeerPipeline`: FAISS ``IndexFlatIP`` over
  the same item vectors (``search(k = 500 + seen)``, the seen items dropped), then the features gathered
  with NumPy and the same ``dense.onnx`` in ONNX Runtime by ``bench_engine.PlainPipeline``'s code (imported,
  not copied), sigmoid, top 10. FAISS on 1 OpenMP thread (``OMP_NUM_THREADS=1`` for both servers: the
  setting reaches every request thread), ONNX Runtime on 1, like the server's defaults.

Before timing, both services must return the same top items for a few requests. Then, for each client
count (1, 2, 4, 8, 16), every service in turn gets a fixed number of seconds of load from that many
closed-loop clients (threads of this process, each with one keep-alive connection, sending pre-encoded
requests over a raw socket and reading the answer by its Content-Length), on loopback only. Latency is
measured per request by the client; throughput is answered requests / seconds. The clients' own CPU time
(this process) and the servers' (their processes, from /proc) are recorded per request, so a client that
became the bottleneck would show.

Memory: ``rec-engine serve --workers N`` for N = 1, 2, 4, each worker warmed by requests, then RSS and PSS
from ``/proc/PID/smaps_rollup`` of every worker (and the multi-process parent); the peer's processes
are measured after their load runs.

Output: a Markdown table on stdout and in ``bench/results/http.md``, every number in
``bench/results/http.json``, a plot of throughput and p99 against clients in
``bench/latest/http_throughput.png`` (``--plot``).

    ./dev.sh .venv/bin/python bench/bench_http.py                       # 1M items, 5 s per point
    REC_BENCH_ENGINE_ITEMS=100000 ./dev.sh .venv/bin/python bench/bench_http.py --seconds 2   # quick
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from bench_engine import CONTEXT_FIELDS, K, PlainPipeline, Settings, _requests, cached_pipeline  # noqa: E402

PEER_ENV = "REC_BENCH_PEER_SETTINGS"
N_AGREE = 5


# ======================================================================================= the peer
class PeerPipeline(PlainPipeline):
    """The plain service's request path: FAISS ``IndexFlatIP`` retrieval, then ``PlainPipeline``'s ranking
    (its feature stores, bag sums, context encoding and ONNX session)."""

    def __init__(self, path: Path, ort_threads: int = 1, faiss_threads: int = 1):
        import faiss

        super().__init__(path, ort_threads)
        faiss.omp_set_num_threads(faiss_threads)
        self.index = faiss.IndexFlatIP(self.items.shape[1])
        self.index.add(np.ascontiguousarray(self.items, dtype=np.float32))
        del self.items                     # FAISS holds its own copy

    def retrieve(self, user: int) -> np.ndarray:
        seen = self.seen_items[self.seen_indptr[user]:self.seen_indptr[user + 1]]
        n = min(self.n_candidates, self.index.ntotal)
        _, ids = self.index.search(self.users[user][None], n + len(seen))
        ids = ids[0]
        return ids[(ids >= 0) & ~np.isin(ids, seen)][:n]

    def rank(self, user: int, cand: np.ndarray, context, k: int):
        """``PlainPipeline.recommend``'s ranking stage for the candidates ``cand``."""
        emb, lin = self.features(user, cand, context)
        (logit,) = self.session.run(["logit"], {"emb": emb, "lin": lin})
        probs = (1.0 / (1.0 + np.exp(-logit.astype(np.float64)))).astype(np.float32)
        order = np.lexsort((cand, -probs))[:k]
        return cand[order], probs[order]

    def recommend(self, user: int, context, k: int = K):
        items, probs = self.rank(user, self.retrieve(user), context, k)
        return items, probs, {}


def _peer_request_model():
    from typing import Any, Dict, Optional

    from pydantic import create_model

    return create_model("PeerRequest", user=(int, ...), k=(int, K), context=(Optional[Dict[str, Any]], None))


def peer_app(bundle: str):
    """FastAPI app of the plain service (sync handler: uvicorn's thread pool runs requests in parallel)."""
    from fastapi import FastAPI, HTTPException

    pipe = PeerPipeline(Path(bundle))
    Req = _peer_request_model()
    app = FastAPI(docs_url=None, redoc_url=None)

    def recommend(req):
        if not 0 <= req.user < len(pipe.seen_indptr) - 1:
            raise HTTPException(400, detail="unknown user")
        items, probs, _ = pipe.recommend(req.user, req.context or {}, req.k)
        return {"user": req.user, "items": items.tolist(), "scores": probs.tolist()}

    recommend.__annotations__ = {"req": Req}     # a real class (this module's annotations are strings)
    app.post("/recommend")(recommend)

    @app.get("/healthz")
    def healthz():
        return {"status": "ok", "pid": os.getpid()}

    return app


def _peer_app_from_env():
    return peer_app(json.loads(os.environ[PEER_ENV])["bundle"])


def run_peer_server(bundle: str, port: int, workers: int) -> None:
    import uvicorn

    if workers == 1:
        uvicorn.run(peer_app(bundle), host="127.0.0.1", port=port, log_level="warning")
    else:
        os.environ[PEER_ENV] = json.dumps({"bundle": bundle})
        uvicorn.run("bench_http:_peer_app_from_env", factory=True, host="127.0.0.1", port=port, workers=workers,
                    log_level="warning", app_dir=str(HERE))


# ================================================================================== processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ)
    paths = [str(ROOT / "python"), str(ROOT / ".devpath"), str(HERE)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env.setdefault("OMP_WAIT_POLICY", "passive")
    # OpenMP's thread count is per thread: faiss.omp_set_num_threads(1) at start does not reach the server's
    # request threads, whose FAISS searches would each start a team of every core (oversubscribed under
    # concurrency). rec_engine passes its thread count to every call; both servers get the same setting.
    env["OMP_NUM_THREADS"] = "1"
    return env


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def descendants(pid: int) -> list[int]:
    """``pid``'s live descendants (from /proc)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            st = _stat(int(d))
            if st is not None:
                parent[int(d)] = int(st[1])
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def cpu_seconds(pids) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        st = _stat(pid)
        if st is not None:
            total += (int(st[11]) + int(st[12])) / tick      # utime + stime
    return total


def machine_cpu() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    idle = f[3] + (f[4] if len(f) > 4 else 0)
    steal = f[7] if len(f) > 7 else 0
    return (sum(f[:8]) - idle - steal) / tick, steal / tick


def smaps_rollup(pid: int) -> dict:
    """RSS, PSS, shared and private memory of ``pid`` in MiB (from /proc/PID/smaps_rollup)."""
    vals = {}
    with open(f"/proc/{pid}/smaps_rollup") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                vals[parts[0].rstrip(":")] = int(parts[1]) / 1024
    return {"rss_mib": vals.get("Rss", 0.0), "pss_mib": vals.get("Pss", 0.0),
            "shared_mib": vals.get("Shared_Clean", 0.0) + vals.get("Shared_Dirty", 0.0),
            "private_mib": vals.get("Private_Clean", 0.0) + vals.get("Private_Dirty", 0.0),
            "anon_mib": vals.get("Anonymous", 0.0)}


class Server:
    """A server subprocess on a free loopback port."""

    def __init__(self, name: str, cmd: list[str], log: Path):
        self.name, self.port, self.log = name, _free_port(), log
        self.cmd = cmd + ["--port", str(self.port)]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self._out, stderr=subprocess.STDOUT, env=_env(), cwd=ROOT)

    def wait_ready(self, timeout: float = 600) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            try:
                if request(self.port, "GET", "/healthz")[0] == 200:
                    return
            except (OSError, ValueError):      # not up yet, or a proxy's plain-text answer before the app runs
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} did not start within {timeout} s")

    def pids(self) -> list[int]:
        return [self.proc.pid] + descendants(self.proc.pid)

    def workers(self) -> list[int]:
        """The processes that serve: the server itself (one process) or its worker children."""
        kids = [p for p in descendants(self.proc.pid) if "spawn_main" in _cmdline(p)]
        return kids or [self.proc.pid]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rec_server(bundle: Path, workers: int, coalesce_us: int, max_batch: int, log_dir: Path,
               int8: bool = False, index8: bool = False) -> Server:
    """``int8``: ``--index int8 --ranking-precision int8``; ``index8``: ``--index int8`` alone (the exact
    mode's candidates and the float32 model: the peer's answers)."""
    tag = " int8" if int8 else " idx8" if index8 else ""
    name = f"rec_engine w{workers} c{coalesce_us}{tag}"
    cmd = [sys.executable, "-m", "rec_engine.cli", "serve", str(bundle), "--workers", str(workers),
           "--coalesce-us", str(coalesce_us), "--max-batch", str(max_batch), "--threads", "1", "--ort-threads", "1",
           "--log-level", "warning"] + (["--index", "int8"] if int8 or index8 else []) + (
               ["--ranking-precision", "int8"] if int8 else [])
    return Server(name, cmd, log_dir / f"server-rec-w{workers}-c{coalesce_us}{tag.replace(' ', '-')}.log")


def peer_server(bundle: Path, workers: int, log_dir: Path) -> Server:
    cmd = [sys.executable, str(HERE / "bench_http.py"), "--peer-server", str(bundle), "--workers", str(workers)]
    return Server(f"peer w{workers}", cmd, log_dir / f"server-peer-w{workers}.log")


# ==================================================================================== the client
def request(port: int, method: str, path: str, body=None, timeout: float = 60):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read().decode())
    finally:
        conn.close()


def _encode(body: dict) -> bytes:
    data = json.dumps(body, separators=(",", ":")).encode()
    return (b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(data), data))


def _client(port: int, reqs: list[bytes], start: threading.Barrier, stop_at: list, lat: list, errors: list):
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    buf = b""
    j = 0
    perf = time.perf_counter
    try:
        start.wait()
        end = stop_at[0]
        while True:
            t = perf()
            if t >= end:
                break
            sock.sendall(reqs[j % len(reqs)])
            j += 1
            while True:
                head_end = buf.find(b"\r\n\r\n")
                if head_end >= 0:
                    break
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buf += chunk
            head = buf[:head_end].lower()
            at = head.find(b"content-length:")
            length = int(head[at + 15:head.find(b"\r\n", at) if head.find(b"\r\n", at) >= 0 else None])
            need = head_end + 4 + length
            while len(buf) < need:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ConnectionError("the server closed the connection")
                buf += chunk
            status = int(buf[9:12])
            buf = buf[need:]
            lat.append(perf() - t)
            if status != 200:
                errors.append(status)
    finally:
        sock.close()


def load(port: int, bodies: list[dict], clients: int, seconds: float, server_pids: list[int]) -> dict:
    """``clients`` closed-loop clients for ``seconds``; latencies, throughput, client and server CPU."""
    per_client = [[_encode(bodies[(c * 997 + j) % len(bodies)]) for j in range(len(bodies))] for c in range(clients)]
    lats = [[] for _ in range(clients)]
    errors: list = []
    start = threading.Barrier(clients + 1)
    stop_at = [0.0]
    threads = [threading.Thread(target=_client, args=(port, per_client[c], start, stop_at, lats[c], errors), daemon=True)
               for c in range(clients)]
    for t in threads:
        t.start()
    time.sleep(0.2)                             # connections open
    srv0, cli0, (busy0, steal0) = cpu_seconds(server_pids), time.process_time(), machine_cpu()
    t0 = time.perf_counter()
    stop_at[0] = t0 + seconds
    start.wait()
    for t in threads:
        t.join(seconds + 120)
    wall = time.perf_counter() - t0
    srv1, cli1, (busy1, steal1) = cpu_seconds(server_pids), time.process_time(), machine_cpu()
    all_lat = np.concatenate([np.asarray(x, np.float64) for x in lats]) * 1e3
    n = len(all_lat)
    return {"clients": clients, "seconds": wall, "requests": n, "errors": len(errors),
            "throughput_rps": n / wall, "p50_ms": float(np.percentile(all_lat, 50)) if n else None,
            "p99_ms": float(np.percentile(all_lat, 99)) if n else None,
            "mean_ms": float(all_lat.mean()) if n else None,
            "client_cpu_us_per_req": (cli1 - cli0) / max(n, 1) * 1e6,
            "client_cpu_share": (cli1 - cli0) / wall / (os.cpu_count() or 1),
            "server_cpu_ms_per_req": (srv1 - srv0) / max(n, 1) * 1e3,
            "server_cores": (srv1 - srv0) / wall, "client_cores": (cli1 - cli0) / wall,
            # what else ran on the machine meanwhile (other users of the shared cores), and hypervisor steal
            "other_cores": max(0.0, (busy1 - busy0) - (srv1 - srv0) - (cli1 - cli0)) / wall,
            "steal_cores": (steal1 - steal0) / wall}


# ===================================================================================== the run
def _bodies(settings: Settings, n: int) -> list[dict]:
    reqs = _requests(dataclasses.replace(settings, rounds=n))
    return [{"user": u, "k": K, "context": ctx} for u, ctx in reqs]


def check_agreement(servers: list[Server], bodies: list[dict]) -> None:
    for body in bodies[:N_AGREE]:
        answers = {s.name: request(s.port, "POST", "/recommend", body) for s in servers}
        for name, (status, out) in answers.items():
            if status != 200:
                raise RuntimeError(f"{name} answered {status}: {out}")
        ref_name = servers[0].name
        ref = answers[ref_name][1]
        for name, (_, out) in answers.items():
            if name.endswith(" int8"):   # int8 ranking moves probabilities by ~1e-4: most of the top 10 agree
                shared = len(set(out["items"]) & set(ref["items"]))
                if shared < len(ref["items"]) - 2:
                    raise RuntimeError(f"user {body['user']}: {name} shares {shared} of the top {len(ref['items'])}")
                continue
            if out["items"] != ref["items"]:
                raise RuntimeError(f"user {body['user']}: {name} returned {out['items']}, {ref_name} {ref['items']}")
            if not np.allclose(out["scores"], ref["scores"], rtol=0, atol=1e-5):
                raise RuntimeError(f"user {body['user']}: {name} scores {out['scores']} vs {ref['scores']}")


def warm_every_worker(server: Server, bodies: list[dict], per_worker: int = 30, timeout: float = 300) -> dict:
    """Requests over new connections until every worker process has answered ``per_worker`` of them."""
    import http.client

    workers = set(server.workers())
    counts = {p: 0 for p in workers}
    deadline = time.monotonic() + timeout
    j = 0
    while min(counts.values()) < per_worker and time.monotonic() < deadline:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        try:
            conn.request("GET", "/healthz")
            pid = json.loads(conn.getresponse().read())["pid"]
            for _ in range(5):
                body = json.dumps(bodies[j % len(bodies)]).encode()
                j += 1
                conn.request("POST", "/recommend", body=body, headers={"Content-Type": "application/json"})
                conn.getresponse().read()
            counts[pid] = counts.get(pid, 0) + 5
        finally:
            conn.close()
    return counts


def memory_of(server: Server) -> dict:
    workers = server.workers()
    out = {"workers": [dict(pid=p, **smaps_rollup(p)) for p in workers]}
    if workers != [server.proc.pid]:
        out["parent"] = dict(pid=server.proc.pid, **smaps_rollup(server.proc.pid))
    procs = out["workers"] + ([out["parent"]] if "parent" in out else [])
    out["total_pss_mib"] = sum(p["pss_mib"] for p in procs)
    out["total_rss_mib"] = sum(p["rss_mib"] for p in procs)
    return out


def machine() -> dict:
    import rec_engine

    cpu = ""
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), "")
    except OSError:
        pass
    versions = {}
    for mod in ("numpy", "onnxruntime", "faiss", "fastapi", "uvicorn", "pydantic"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:       # noqa: BLE001
            versions[mod] = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "simd": rec_engine.simd_level(), "python": platform.python_version(),
            "versions": versions, "OMP_WAIT_POLICY": _env().get("OMP_WAIT_POLICY"),
            "OMP_NUM_THREADS": _env().get("OMP_NUM_THREADS")}


def markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [f"# HTTP: rec-engine serve beside a plain FastAPI + FAISS + ONNX Runtime service", "",
             f"{s['items']} items x 64, {s['candidates']} candidates ranked by DeepFM (26 fields), k={K}; "
             f"{s['seconds']:.0f} s per point, closed-loop keep-alive clients on loopback; {m['cpu']}, "
             f"{m['cores']} cores, SIMD {m['simd']}; versions {m['versions']}; started {result['started']}.", "",
             "ratio = throughput / peer w1 throughput at the same client count (p99 ratio: peer p99 / this p99; "
             "above 1 is better for both)", "",
             "server / client / other cores: CPU time per second of the run of the server's processes, of the "
             "load clients (this process) and of everything else on the machine (other users of the shared cores)", "",
             "| service | clients | req/s | p50 ms | p99 ms | errors | thr. ratio | p99 ratio | server CPU ms/req "
             "| client CPU us/req | server / client / other cores |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    peer = {r["clients"]: r for r in result["runs"] if r["service"] == "peer w1"}
    for r in sorted(result["runs"], key=lambda r: (r["service"], r["clients"])):
        p = peer.get(r["clients"])
        thr = f"{r['throughput_rps'] / p['throughput_rps']:.2f}x" if p and p["throughput_rps"] else ""
        p99 = f"{p['p99_ms'] / r['p99_ms']:.2f}x" if p and r["p99_ms"] else ""
        lines.append(f"| {r['service']} | {r['clients']} | {r['throughput_rps']:.1f} | {r['p50_ms']:.1f} | "
                     f"{r['p99_ms']:.1f} | {r['errors']} | {thr} | {p99} | {r['server_cpu_ms_per_req']:.1f} | "
                     f"{r['client_cpu_us_per_req']:.0f} | {r['server_cores']:.2f} / {r['client_cores']:.2f} / "
                     f"{r['other_cores']:.2f} |")
    if result.get("coalescing"):
        lines += ["", "Coalesced batches (from each rec_engine server's /metrics at the end; with several workers, the "
                  "counts of the one worker that answered): "
                  + "; ".join(f"{k}: {v}" for k, v in result["coalescing"].items())]
    if result.get("memory"):
        lines += ["", "## Memory (MiB, /proc/PID/smaps_rollup, after every worker answered requests)", "",
                  "| service | process | RSS | PSS | shared | private | anonymous |", "|---|---|---:|---:|---:|---:|---:|"]
        for name, mem in result["memory"].items():
            for j, w in enumerate(mem["workers"]):
                lines.append(f"| {name} | worker {j + 1} | {w['rss_mib']:.0f} | {w['pss_mib']:.0f} | "
                             f"{w['shared_mib']:.0f} | {w['private_mib']:.0f} | {w['anon_mib']:.0f} |")
            if "parent" in mem:
                w = mem["parent"]
                lines.append(f"| {name} | parent | {w['rss_mib']:.0f} | {w['pss_mib']:.0f} | {w['shared_mib']:.0f} | "
                             f"{w['private_mib']:.0f} | {w['anon_mib']:.0f} |")
            lines.append(f"| {name} | **all (sum of PSS)** | | **{mem['total_pss_mib']:.0f}** | | | |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        return f"no plot: {e}"
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in dict.fromkeys(r["service"] for r in result["runs"]):
        rows = sorted((r for r in result["runs"] if r["service"] == name), key=lambda r: r["clients"])
        x = [r["clients"] for r in rows]
        style = "--" if name.startswith("peer") else "-"
        a.plot(x, [r["throughput_rps"] for r in rows], style, marker="o", label=name)
        b.plot(x, [r["p99_ms"] for r in rows], style, marker="o", label=name)
    for ax, title, unit in ((a, "throughput", "requests / s"), (b, "p99 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8, 16], ["1", "2", "4", "8", "16"])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(unit)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    b.set_yscale("log")
    a.legend(fontsize=8)
    s = result["settings"]
    fig.suptitle(f"POST /recommend over HTTP, {s['items']} items, 500 candidates ranked by DeepFM "
                 f"({result['machine']['cores']} cores, {s['seconds']:.0f} s per point)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="load per point (default 5)")
    ap.add_argument("--clients", default="1,2,4,8,16")
    ap.add_argument("--workers", default="1,2", help="rec_engine worker counts to time (default 1,2)")
    ap.add_argument("--coalesce-us", default="0,2000", help="coalescing windows to time (0 = off)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--int8-workers", default="",
                    help="also time rec_engine with --index int8 --ranking-precision int8 at these worker counts "
                         "(the last --coalesce-us window; default none)")
    ap.add_argument("--index8-workers", default="",
                    help="also time rec_engine with --index int8 alone (exact candidates, float32 ranking: the same "
                         "answers) at these worker counts (the last --coalesce-us window; default none)")
    ap.add_argument("--peer-workers", default="1,2", help="worker counts of the peer (default 1,2)")
    ap.add_argument("--memory-workers", default="1,2,4", help="worker counts for the memory table ('' = none)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--plot", default=str(HERE / "latest" / "http_throughput.png"))
    ap.add_argument("--peer-server", metavar="BUNDLE", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peer_server:
        run_peer_server(args.peer_server, args.port, int(args.workers))
        return 0

    settings = Settings.from_env(2)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    bundle = cached_pipeline(settings)
    bodies = _bodies(settings, 4000)
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": machine(), "runs": [], "memory": {},
              "settings": {"items": settings.n_items, "users": settings.n_users, "candidates": 500, "k": K,
                           "seconds": args.seconds, "clients": _ints(args.clients), "max_batch": args.max_batch,
                           "bundle": str(bundle), "context_fields": [f[0] for f in CONTEXT_FIELDS]}}
    print(f"bundle {bundle}; {result['machine']}", flush=True)

    servers: list[Server] = []
    try:
        for w in _ints(args.peer_workers):
            servers.append(peer_server(bundle, w, out))
        for w in _ints(args.workers):
            for c in _ints(args.coalesce_us):
                servers.append(rec_server(bundle, w, c, args.max_batch, out))
        for w in _ints(args.int8_workers):
            servers.append(rec_server(bundle, w, _ints(args.coalesce_us)[-1], args.max_batch, out, int8=True))
        for w in _ints(args.index8_workers):
            servers.append(rec_server(bundle, w, _ints(args.coalesce_us)[-1], args.max_batch, out, index8=True))
        for s in servers:                              # one at a time: loading is I/O and CPU heavy
            t = time.perf_counter()
            s.wait_ready()
            print(f"{s.name}: ready in {time.perf_counter() - t:.1f} s (port {s.port})", flush=True)
        servers.sort(key=lambda s: not s.name.startswith("rec_engine"))     # the rec_engine reference first
        check_agreement(servers, bodies)
        print(f"all {len(servers)} services agree on the top {K} items of {N_AGREE} requests", flush=True)
        for s in servers:                              # warm-up: pages of the tables, sessions, every worker
            warm_every_worker(s, bodies, per_worker=10)
            load(s.port, bodies, 4, min(2.0, args.seconds), s.pids())
        for clients in _ints(args.clients):
            for s in servers:
                r = load(s.port, bodies, clients, args.seconds, s.pids())
                r["service"] = s.name
                result["runs"].append(r)
                print(f"{s.name:<22} clients {clients:>2}: {r['throughput_rps']:7.1f} req/s  p50 {r['p50_ms']:7.1f} ms"
                      f"  p99 {r['p99_ms']:7.1f} ms  errors {r['errors']}  server CPU {r['server_cpu_ms_per_req']:.1f}"
                      f" ms/req  client CPU {r['client_cpu_us_per_req']:.0f} us/req  cores server/client/other "
                      f"{r['server_cores']:.2f}/{r['client_cores']:.2f}/{r['other_cores']:.2f}", flush=True)
        coalescing = {}
        for s in servers:
            if s.name.startswith("peer"):
                result["memory"][s.name + " (after load)"] = memory_of(s)
            elif not s.name.endswith(" c0"):
                import http.client
                conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=30)
                conn.request("GET", "/metrics")
                text = conn.getresponse().read().decode()
                conn.close()
                got = {ln.split(" ")[0]: float(ln.split(" ")[1]) for ln in text.splitlines()
                       if ln.startswith("rec_engine_batch_size_count") or ln.startswith("rec_engine_batch_size_sum")}
                n = got.get("rec_engine_batch_size_count", 0.0)
                coalescing[s.name] = (f"{n:.0f} batches, mean size {got.get('rec_engine_batch_size_sum', 0) / n:.1f}"
                                      if n else "no batches (one worker's /metrics)")
        result["coalescing"] = coalescing
    finally:
        for s in servers:
            s.stop()

    for w in _ints(args.memory_workers):
        s = rec_server(bundle, w, 0, args.max_batch, out)
        try:
            s.wait_ready()
            counts = warm_every_worker(s, bodies, per_worker=30)
            result["memory"][f"rec_engine w{w}"] = memory_of(s)
            result["memory"][f"rec_engine w{w}"]["warm_requests"] = counts
            mem = result["memory"][f"rec_engine w{w}"]
            print(f"rec_engine w{w}: " + ", ".join(f"RSS {x['rss_mib']:.0f} PSS {x['pss_mib']:.0f}" for x in mem["workers"])
                  + f" MiB; all PSS {mem['total_pss_mib']:.0f} MiB", flush=True)
        finally:
            s.stop()

    text = markdown(result)
    print(text)
    (out / "http.md").write_text(text)
    (out / "http.json").write_text(json.dumps(result, indent=1))
    if args.plot:
        msg = plot(result, Path(args.plot))
        print(msg or f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
