"""Several server processes (``rec-engine serve --workers N``) and request coalescing (:class:`Coalescer`)."""
from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
pytest.importorskip("uvicorn", reason="the HTTP service needs the serve extra")

from rec_engine.engine import Engine  # noqa: E402
from rec_engine.service import Coalescer, create_app  # noqa: E402
from test_service import _free_port, running  # noqa: E402

CONTEXTS = [None, {}, {"hour": 9.0, "device": "android"}, {"hour": 3.0}, {"device": "ios"},
            {"hour": 21.0, "device": "never-seen"}]


def _get(conn: http.client.HTTPConnection, method: str, path: str, body=None, token: str | None = None):
    auth = {} if token is None else {"Authorization": f"Bearer {token}"}
    conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                 headers={"Content-Type": "application/json", **auth})
    resp = conn.getresponse()
    return resp.status, json.loads(resp.read().decode())


def _parent_pid(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as fh:
        return int(fh.read().rsplit(")", 1)[1].split()[1])


# ---------------------------------------------------------------------------------- workers
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_two_workers_start_and_both_answer(trained, tmp_path):
    port = _free_port()
    log = tmp_path / "server.log"
    cmd = [sys.executable, "-m", "rec_engine.cli", "serve", str(trained.bundle("pipe_a")), "--port", str(port),
           "--workers", "2", "--log-level", "warning", "--event-log", str(tmp_path / "events.jsonl")]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "REC_ENGINE_TOKEN": "w", "REC_ENGINE_READ_TOKEN": "r"})
    try:
        answers = {}                          # worker pid -> its /recommend answer
        refused = {}                          # worker pid -> (recommend, observe) statuses without / with a read token
        deadline = time.monotonic() + 60
        while len(answers) < 2:
            assert proc.poll() is None, f"the server exited: {log.read_text()}"
            assert time.monotonic() < deadline, f"not two workers answering after 60 s: {answers.keys()}"
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            try:                              # a new connection each time: the kernel picks the worker
                status, health = _get(conn, "GET", "/healthz")
                status_r, rec = _get(conn, "POST", "/recommend", {"user": 7, "k": 5}, token="r")
                refused[health["pid"]] = (_get(conn, "POST", "/recommend", {"user": 7, "k": 5})[0],
                                          _get(conn, "POST", "/observe", {"user": 7, "items": [1]}, token="r")[0])
            except OSError:
                time.sleep(0.2)
                continue
            finally:
                conn.close()
            assert status == 200 and status_r == 200
            answers.setdefault(health["pid"], rec)
        pids = sorted(answers)
        assert proc.pid not in pids and all(_parent_pid(p) == proc.pid for p in pids)
        first, second = (answers[p] for p in pids)
        assert first["items"] == second["items"] and first["version"] == second["version"]
        assert all(refused[p] == (401, 401) for p in pids), refused      # every worker holds the tokens
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        status, _ = _get(conn, "POST", "/observe", {"user": 7, "items": [1]}, token="w")
        assert status == 200
        status, body = _get(conn, "POST", "/swap", {"bundle": str(trained.bundle("pipe_b"))}, token="w")
        conn.close()
        assert status == 409 and "several worker processes" in body["detail"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_refuses_bad_worker_counts_and_missing_bundles(tmp_path, capsys):
    from rec_engine.cli import main

    assert main(["serve", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
    assert main(["serve", str(tmp_path / "missing"), "--workers", "2"]) == 2
    assert "not a bundle directory" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--coalesce-linger-us", "-5"]) == 2
    assert "--coalesce-linger-us must be >= 0" in capsys.readouterr().err
    from rec_engine.service import serve
    with pytest.raises(ValueError, match="coalesce_linger_us"):
        serve(str(tmp_path), coalesce_linger_us=1.5)


# -------------------------------------------------------------------------------- coalescing
@pytest.fixture(scope="module")
def engine(trained):
    with Engine.load(trained.bundle("pipe_a"), num_threads=1) as e:
        yield e


def _same(got, want):
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-6, atol=1e-6)
    assert got.fallback == want.fallback and got.version == want.version and got.user == want.user


def _run_concurrently(fn, args_list, threads=16):
    barrier = threading.Barrier(min(threads, len(args_list)))

    def call(args):
        try:
            barrier.wait(timeout=5)
        except threading.BrokenBarrierError:
            pass
        return fn(*args)

    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(call, args_list))


@pytest.mark.parametrize("with_contexts", [False, True], ids=["no-context", "contexts"])
def test_coalesced_answers_are_the_single_calls_answers(engine, with_contexts):
    rng = np.random.default_rng(3)
    co = Coalescer(engine, window_us=20_000, max_batch=8, idle_start=False)
    reqs = []
    for j in range(48):
        user = int(rng.integers(0, 400)) if j % 7 else 10_000 + j      # some unknown users: the fallback
        ctx = CONTEXTS[int(rng.integers(0, len(CONTEXTS)))] if with_contexts else None
        reqs.append((user, int(rng.choice([3, 10])), bool(rng.integers(0, 2)), ctx))

    def one(user, k, exclude_seen, ctx):
        return co.recommend(user, k, exclude_seen=exclude_seen, context=ctx)

    got = _run_concurrently(one, reqs)
    for (user, k, exclude_seen, ctx), rec in zip(reqs, got):
        _same(rec, engine.recommend(user, k, exclude_seen=exclude_seen, context=ctx))
    assert co.stats["batched"] + co.stats["singles"] >= len(reqs)
    if not with_contexts or co.per_user_contexts:
        assert co.stats["batches"] >= 1 and co.stats["batched"] >= 2     # batches were really formed


class _StubEngine:
    """Records when and with what its calls run; answers instantly."""

    def __init__(self):
        self.calls = []

    def recommend(self, user, k=10, *, exclude_seen=True, n_candidates=None, context=None):
        self.calls.append(("single", time.perf_counter(), [user]))
        if user == "boom":
            raise ValueError("boom")
        return ("rec", user, k, context)

    def recommend_batch(self, users, k=10, *, exclude_seen=True, exclude=None, candidates=None, context=None,
                        contexts=None, n_candidates=None):
        self.calls.append(("batch", time.perf_counter(), list(users)))
        if "boom" in users:
            raise ValueError("boom")
        return [("rec", u, k, c) for u, c in zip(users, contexts)]


def test_a_lone_request_waits_at_most_the_window():
    stub = _StubEngine()
    co = Coalescer(stub, window_us=50_000, max_batch=8, idle_start=False)
    t = time.perf_counter()
    assert co.recommend(1, 5, context={"a": 1}) == ("rec", 1, 5, {"a": 1})
    elapsed = time.perf_counter() - t
    assert 0.045 <= elapsed < 0.5 and [c[0] for c in stub.calls] == ["single"]


def test_a_request_that_finds_the_coalescer_idle_starts_at_once():
    """idle_start (the default): nothing in flight, so nothing could join; requests that come while another
    is in flight still wait for company."""
    stub = _StubEngine()
    co = Coalescer(stub, window_us=2_000_000, max_batch=8)
    t = time.perf_counter()
    assert co.recommend(1, 5) == ("rec", 1, 5, None)
    assert time.perf_counter() - t < 1.0 and [c[0] for c in stub.calls] == ["single"]
    release = threading.Event()
    slow = _StubEngine()
    slow_single = slow.recommend

    def held(user, *a, **kw):        # the first request holds the engine until released
        if user == "first":
            release.wait(10)
        return slow_single(user, *a, **kw)

    slow.recommend = held
    co = Coalescer(slow, window_us=2_000_000, max_batch=3)
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(co.recommend, "first", 5)
        time.sleep(0.2)                                # "first" is in flight: the next two wait and pair up
        later = [pool.submit(co.recommend, u, 5) for u in (7, 8)]
        time.sleep(0.2)
        assert not any(f.done() for f in later)        # waiting for the window or a full batch
        release.set()
        assert first.result(10) == ("rec", "first", 5, None)
        assert [f.result(10) for f in later] == [("rec", 7, 5, None), ("rec", 8, 5, None)]
    assert [c[0] for c in slow.calls] == ["single", "batch"] and slow.calls[1][2] == [7, 8]


def test_an_open_batch_starts_when_the_running_call_ends_not_at_the_window():
    """idle_start: the batch that collected requests while a call ran starts as soon as that call ends (the
    cores are free), long before its window."""
    release = threading.Event()
    slow = _StubEngine()
    single = slow.recommend

    def held(user, *a, **kw):
        if user == "first":
            release.wait(10)
        return single(user, *a, **kw)

    slow.recommend = held
    window = 1.5
    co = Coalescer(slow, window_us=int(window * 1e6), max_batch=8)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(co.recommend, "first", 5)
        time.sleep(0.1)
        later = [pool.submit(co.recommend, u, 5) for u in (7, 8, 9)]
        time.sleep(0.1)
        t_release = time.perf_counter()
        release.set()
        assert [f.result(10) for f in later] == [("rec", u, 5, None) for u in (7, 8, 9)]
        assert first.result(10) == ("rec", "first", 5, None)
    assert [(c[0], c[2]) for c in slow.calls] == [("single", ["first"]), ("batch", [7, 8, 9])]
    started = slow.calls[1][1] - t_release
    assert started < 0.5 * window, f"the batch started {started:.2f} s after the running call ended"


class _ThreadedStub(_StubEngine):
    """A stub whose batches get other threads than its single calls (Engine(batch_threads=...))."""

    num_threads, batch_threads = 1, 2


def test_a_lone_request_takes_the_batch_path_when_batches_get_more_threads():
    for stub, kind in ((_StubEngine(), "single"), (_ThreadedStub(), "batch")):
        co = Coalescer(stub, window_us=2_000_000, max_batch=8)
        t = time.perf_counter()
        assert co.recommend(3, 5, context={"a": 1}) == ("rec", 3, 5, {"a": 1})
        assert time.perf_counter() - t < 1.0                       # started at once either way
        assert [c[0] for c in stub.calls] == [kind] and stub.calls[0][2] == [3]


def test_engine_batch_threads(trained):
    """batch_threads: recommend_batch's threads, checked; answers equal single calls whatever the threads."""
    path = trained.bundle("pipe_a")
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="batch_threads"):
            Engine.load(path, num_threads=1, batch_threads=bad)
        with pytest.raises(ValueError, match="batch_threads"):      # what serve --workers N checks once
            Engine.check_options(batch_threads=bad)
    with Engine.load(path, num_threads=1, batch_threads=2) as e:
        assert e.num_threads == 1 and e.batch_threads == 2
        users = list(range(0, 300, 7)) + [10_001]
        for rec, u in zip(e.recommend_batch(users, 10), users):
            _same(rec, e.recommend(u, 10))
    with Engine.load(path, num_threads=1) as e:
        assert e.batch_threads == 1


class _SlowStub(_StubEngine):
    """Every call takes ``seconds`` (the engine's work), whatever its size."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def recommend(self, user, *a, **kw):
        time.sleep(self.seconds)
        return super().recommend(user, *a, **kw)

    def recommend_batch(self, users, *a, **kw):
        time.sleep(self.seconds)
        return super().recommend_batch(users, *a, **kw)


def _closed_loop(co, clients: int, rounds: int, think_s: float):
    """``clients`` threads, each sending its next request ``think_s`` after its answer came."""
    def client(c):
        for r in range(rounds):
            assert co.recommend(c * 1000 + r, 5) == ("rec", c * 1000 + r, 5, None)
            time.sleep(think_s)

    with ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client, c) for c in range(clients)]:
            f.result(60)


def test_clients_that_come_back_together_share_batches():
    """Two closed-loop clients: without linger they take turns (a call of one at a time, the other waiting for
    it); with it, the request that would start alone waits for the other client's next request."""
    sizes = {}
    for linger in (0, 200_000):
        stub = _SlowStub(0.02)
        co = Coalescer(stub, window_us=1_000_000, max_batch=8, linger_us=linger)
        _closed_loop(co, clients=2, rounds=12, think_s=0.002)
        sizes[linger] = [len(c[2]) for c in stub.calls]
        assert sum(sizes[linger]) == 24
    assert sizes[200_000].count(2) >= 9, sizes[200_000]      # pairs after the first answer
    assert sizes[0].count(2) < sizes[200_000].count(2), sizes[0]   # turns, mostly, without it


def test_answered_clients_are_awaited_before_they_see_their_answers(monkeypatch):
    """The count of awaited clients is raised before a batch's requests are released: a client that comes
    back at once is counted as arrived, so the next batch does not wait the linger for it (a slow step
    between the answer and the count would otherwise lose the arrivals made in between)."""
    ended = Coalescer._ended

    def slow_ended(self, answered=0):
        time.sleep(0.05)
        ended(self, answered)

    monkeypatch.setattr(Coalescer, "_ended", slow_ended)
    stub = _SlowStub(0.0)
    co = Coalescer(stub, window_us=5_000_000, max_batch=8, linger_us=1_000_000)
    t = time.perf_counter()
    _closed_loop(co, clients=3, rounds=5, think_s=0.0)
    assert time.perf_counter() - t < 2.5          # lost arrivals: ~1 s of linger a round, 5 s or more
    assert sum(len(c[2]) for c in stub.calls) == 15


def test_linger_adds_no_wait_for_a_lone_client_and_is_bounded():
    stub = _SlowStub(0.0)
    co = Coalescer(stub, window_us=5_000_000, max_batch=8, linger_us=2_000_000)
    t = time.perf_counter()
    _closed_loop(co, clients=1, rounds=10, think_s=0.0)        # its own next request is the one awaited
    assert time.perf_counter() - t < 1.0
    # three requests answered together, then only one of their clients comes back: it waits for the others
    # at most linger_us (not the window), then goes alone
    stub = _SlowStub(0.05)
    co = Coalescer(stub, window_us=5_000_000, max_batch=3, linger_us=300_000)
    got = _run_concurrently(lambda u: co.recommend(u, 5), [(u,) for u in range(3)], threads=3)
    assert sorted(g[1] for g in got) == [0, 1, 2] and len(stub.calls) >= 1
    t = time.perf_counter()
    assert co.recommend(9, 5) == ("rec", 9, 5, None)
    assert 0.1 < time.perf_counter() - t < 2.0


def test_a_full_batch_goes_at_once_and_every_wait_is_bounded():
    stub = _StubEngine()
    co = Coalescer(stub, window_us=10_000_000, max_batch=4, idle_start=False)   # 10 s: only a full batch leaves early
    t = time.perf_counter()
    got = _run_concurrently(lambda u: co.recommend(u, 5, context={"u": u}), [(u,) for u in range(4)], threads=4)
    assert time.perf_counter() - t < 5
    assert got == [("rec", u, 5, {"u": u}) for u in range(4)]
    assert [c[0] for c in stub.calls] == ["batch"] and sorted(stub.calls[0][2]) == [0, 1, 2, 3]

    stub.calls.clear()
    co = Coalescer(stub, window_us=30_000, max_batch=64, idle_start=False)
    waits = []

    def timed(u):
        t0 = time.perf_counter()
        out = co.recommend(u, 5, context=None)
        waits.append(time.perf_counter() - t0)
        return out

    got = _run_concurrently(timed, [(u,) for u in range(12)], threads=12)
    assert got == [("rec", u, 5, None) for u in range(12)]
    assert max(waits) < 0.030 + 0.25, f"a request waited {max(waits) * 1e3:.1f} ms with a 30 ms window"


def test_a_failing_batch_is_answered_request_by_request():
    stub = _StubEngine()
    co = Coalescer(stub, window_us=10_000_000, max_batch=4, idle_start=False)
    users = [0, "boom", 2, 3]

    def one(u):
        try:
            return co.recommend(u, 5)
        except ValueError as e:
            return str(e)

    got = _run_concurrently(one, [(u,) for u in users], threads=4)
    assert got == [("rec", 0, 5, None), "boom", ("rec", 2, 5, None), ("rec", 3, 5, None)]
    assert co.stats["fallbacks"] == 1 and [c[0] for c in stub.calls].count("single") == 4


def test_coalescer_settings_are_checked(engine):
    with pytest.raises(ValueError, match="window_us"):
        Coalescer(engine, window_us=-1)
    with pytest.raises(ValueError, match="max_batch"):
        Coalescer(engine, window_us=10, max_batch=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="linger_us"):
            Coalescer(engine, window_us=10, linger_us=bad)


def test_a_bad_request_in_a_coalesced_batch_gets_its_4xx_and_the_others_succeed(engine):
    ctx = {"hour": 9.0, "device": "android"}
    good = [{"user": u, "k": 5, "context": ctx} for u in (1, 2, 3, 4, 5, 6)]
    bad = [({"user": "not-an-int", "k": 5, "context": ctx}, 400, "user must be an integer key"),
           ({"user": 8, "k": 5, "context": {"colour": 1}}, 400, "colour")]
    app = create_app(engine, coalesce_us=200_000, max_batch=len(good) + len(bad), coalesce_idle_start=False)
    with running(app) as client:
        bodies = good + [b for b, _, _ in bad]
        got = _run_concurrently(lambda b: client.request("POST", "/recommend", b), [(b,) for b in bodies])
        for body, (status, out) in zip(good, got):
            assert status == 200, out
            assert out["items"] == engine.recommend(body["user"], 5, context=ctx).items.tolist()
        for (_, want_status, fragment), (status, out) in zip(bad, got[len(good):]):
            assert status == want_status and fragment in out["detail"]
        co = app.state.coalescer
        assert co.stats["fallbacks"] >= 1
        # requests with exclude or candidates lists bypass the batcher and still work
        status, out = client.request("POST", "/recommend", {"user": 1, "k": 3, "exclude": [1, 2], "context": ctx})
        assert status == 200 and len(out["items"]) == 3
