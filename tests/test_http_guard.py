"""Tokens, rate limits, body and header deadlines, the bundle root (rec_engine.http_guard), through a real server."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import socket
import time

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the HTTP service needs the serve extra")
uvicorn = pytest.importorskip("uvicorn", reason="the HTTP service needs the serve extra")

from rec_engine.engine import Engine  # noqa: E402
from rec_engine.http_guard import (  # noqa: E402
    OPEN_PATHS, WRITE_PATHS, Guard, RateLimiter, bundle_under, protocol_class)
from rec_engine.service import create_app  # noqa: E402

from test_service import running  # noqa: E402

WRITE, READ = "w-token", "r-token"
CTX = {"hour": 9.0, "device": "android"}


def bearer(t):
    return {"Authorization": f"Bearer {t}"}


# ---- the rate limiter against a step-by-step reference -------------------------------------------------------

def _reference_bucket(times, rate, burst):
    """Token bucket simulated exactly: allowed flags for requests at ``times`` (sorted)."""
    tokens, last, out = burst, times[0], []
    for t in times:
        tokens = min(burst, tokens + (t - last) * rate)
        last = t
        if tokens >= 1:
            tokens -= 1
            out.append(True)
        else:
            out.append(False)
    return out


@pytest.mark.parametrize("rate,burst", [(1.0, 1.0), (5.0, 3.0), (100.0, 50.0), (0.5, 2.0)])
def test_rate_limiter_matches_a_reference_bucket(rate, burst):
    rng = np.random.default_rng(int(rate * 10 + burst))
    times = np.cumsum(rng.exponential(1.0 / (rate * 1.7), size=400))
    lim = RateLimiter(rate, burst)
    got = [lim.take("c", now=float(t)) == 0.0 for t in times]
    assert got == _reference_bucket(list(times), rate, burst)
    assert 0 < sum(got) < len(got)                # both outcomes happened


def test_rate_limiter_wait_is_the_time_to_the_next_token_and_clients_are_separate():
    lim = RateLimiter(2.0, 1.0)
    assert lim.take("a", now=10.0) == 0.0
    assert lim.take("a", now=10.1) == pytest.approx(0.4)
    assert lim.take("b", now=10.1) == 0.0        # another client has its own bucket
    assert lim.take("a", now=10.5) == 0.0


def test_rate_limiter_keeps_at_most_max_clients():
    lim = RateLimiter(1.0, 1.0, max_clients=8)
    for i in range(100):
        lim.take(f"c{i}", now=0.0)
    assert len(lim) == 8
    assert lim.take("c99", now=0.0) > 0           # the most recent ones are kept


@pytest.mark.parametrize("kwargs", [dict(rate=0), dict(rate=-1), dict(rate=float("nan")), dict(rate=True),
                                    dict(rate=1, burst=0.5), dict(rate=1, burst=float("inf")),
                                    dict(rate=1, max_clients=0)])
def test_rate_limiter_settings_are_checked(kwargs):
    with pytest.raises(ValueError):
        RateLimiter(**kwargs)


@pytest.mark.parametrize("kwargs", [dict(token=""), dict(read_token=3), dict(max_body=0), dict(max_body=True),
                                    dict(body_timeout_s=0), dict(body_timeout_s=float("inf"))])
def test_guard_settings_are_checked(kwargs):
    with pytest.raises(ValueError):
        Guard(None, **kwargs)


def test_header_timeout_is_checked_and_classes_pickle_by_name():
    import pickle

    for bad in (0, -1, float("nan"), True, "1"):
        with pytest.raises(ValueError):
            protocol_class(bad)
    cls = protocol_class(2.5)
    assert protocol_class(2.5) is cls and pickle.loads(pickle.dumps(cls)) is cls
    import rec_engine.http_guard as g
    assert getattr(g, "HeaderDeadline_7250ms")._header_timeout_s == 7.25     # made on first use, as a worker does


# ---- tokens ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guarded(trained):
    engine = Engine.load(trained.bundle("pipe_a"), num_threads=1)
    with running(create_app(engine, token=WRITE, read_token=READ)) as client:
        yield client, engine
    engine.close()


READS = [("POST", "/recommend", {"user": 4, "k": 3, "context": CTX}), ("GET", "/metrics", None),
         ("POST", "/similar_items", {"item": 1, "k": 3})]


@pytest.mark.parametrize("method,path,body", READS)
def test_reads_need_the_read_or_the_write_token(guarded, method, path, body):
    client, _ = guarded
    for headers in ({}, bearer("nope"), bearer(READ + "x"), {"Authorization": READ + " extra"}):
        st, out = client.request(method, path, body, headers=headers)
        assert st == 401 and "read token" in out["detail"], (headers, st, out)
    assert client.request(method, path, body, headers=bearer(READ))[0] == 200
    assert client.request(method, path, body, headers=bearer(WRITE))[0] == 200


def test_writes_need_the_write_token_and_the_read_token_is_not_enough(guarded):
    client, engine = guarded
    before = engine.online.items(5)
    for headers in ({}, bearer(READ), bearer("nope")):
        st, out = client.request("POST", "/observe", {"user": 5, "items": [2]}, headers=headers)
        assert st == 401 and "write token" in out["detail"]
        st, _ = client.request("POST", "/feedback", {"user": 5, "item": 2}, headers=headers)
        assert st == 401
    assert engine.online.items(5) == before                  # nothing refused was recorded
    st, out = client.request("POST", "/observe", {"user": 5, "items": [2]}, headers=bearer(WRITE))
    assert st == 200 and engine.online.items(5)[-1] == 2


def test_open_paths_need_no_token_and_every_write_path_is_guarded(guarded):
    client, _ = guarded
    st, body = client.request("GET", "/healthz")
    assert st == 200 and body["status"] == "ok"
    st, schema = client.request("GET", "/openapi.json")
    assert st == 200 and "paths" in schema
    served = set(schema["paths"])
    assert {"/observe", "/feedback", "/forget", "/swap", "/ab", "/items", "/items/remove"} <= WRITE_PATHS
    assert WRITE_PATHS <= served and OPEN_PATHS - {"/openapi.json"} <= served
    for path in WRITE_PATHS:
        assert client.request("POST", path, {}, headers=bearer(READ))[0] == 401, path


# ---- rate limit, body and header deadlines ----------------------------------------------------------------

def test_rate_limit_gives_429_with_retry_after_and_spares_healthz(trained):
    engine = Engine.load(trained.bundle("pipe_a"), num_threads=1)
    try:
        with running(create_app(engine, rate_limit=2.0, rate_burst=4)) as client:
            codes = [client.request("POST", "/recommend", {"user": 1, "k": 2, "context": CTX})[0] for _ in range(8)]
            assert codes[:4] == [200] * 4 and 429 in codes[4:]
            conn = http.client.HTTPConnection("127.0.0.1", client.port, timeout=10)
            conn.request("POST", "/recommend", body=json.dumps({"user": 1, "k": 2}),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = json.loads(resp.read())
            assert resp.status == 429 and int(resp.getheader("Retry-After")) >= 1 and "rate limit" in body["detail"]
            conn.close()
            assert all(client.request("GET", "/healthz")[0] == 200 for _ in range(10))
            time.sleep(1.1)                               # tokens come back at the configured rate
            assert client.request("POST", "/recommend", {"user": 1, "k": 2, "context": CTX})[0] == 200
    finally:
        engine.close()


def _raw(port, data: bytes, wait: float) -> tuple[bytes, float]:
    """Send ``data`` and read until the server closes (or ``wait`` s pass): (what came back, seconds taken)."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        if data:
            s.sendall(data)
        got = b""
        try:
            while True:
                part = s.recv(65536)
                if not part:
                    break
                got += part
        except socket.timeout:
            pass
    return got, time.monotonic() - t0


def test_a_slow_body_gets_408_and_a_slow_head_is_cut_off(trained):
    engine = Engine.load(trained.bundle("pipe_a"), num_threads=1)
    try:
        app = create_app(engine, body_timeout_s=0.5)
        with running(app, http=protocol_class(0.6), timeout_keep_alive=30) as client:
            # a body announced as 200 bytes, of which 10 arrive
            head = (b"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 200\r\n\r\n{\"user\": 1")
            got, took = _raw(client.port, head, wait=10)
            assert got.startswith(b"HTTP/1.1 408") and b"not received within" in got and took < 5
            # a head that never completes, and a connection that sends nothing: closed by the deadline
            for data in (b"POST /recommend HTTP/1.1\r\nHost: x\r\n", b""):
                got, took = _raw(client.port, data, wait=10)
                assert got == b"" and 0.4 < took < 5, (data, took)
            # a second request on a kept-alive connection gets the same deadline for its head
            with socket.create_connection(("127.0.0.1", client.port), timeout=10) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while b"\r\n\r\n" not in got or len(got.split(b"\r\n\r\n", 1)[1]) < int(
                        got.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0]):
                    got += s.recv(65536)          # the whole first answer (head and body may come apart)
                assert got.startswith(b"HTTP/1.1 200")
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
                t0 = time.monotonic()
                assert s.recv(65536) == b"" and time.monotonic() - t0 < 5
            # requests that arrive in time are answered
            assert client.request("POST", "/recommend", {"user": 1, "k": 2, "context": CTX})[0] == 200
    finally:
        engine.close()


# ---- the bundle root --------------------------------------------------------------------------------------

def test_bundle_under_resolves_symlinks_and_dotdots(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    assert bundle_under(root / "a", root) == os.path.realpath(root / "a")
    for bad in (tmp_path / "outside", root / ".." / "outside", root / "link", "/etc", str(root) + "x"):
        with pytest.raises(PermissionError, match="bundle root"):
            bundle_under(bad, root)


def test_swap_and_ab_load_only_bundles_under_the_root(trained, tmp_path):
    root = tmp_path / "bundles"
    root.mkdir()
    shutil.copytree(trained.bundle("pipe_a"), root / "a")
    shutil.copytree(trained.bundle("pipe_b"), tmp_path / "b_outside")
    os.symlink(tmp_path / "b_outside", root / "b_link")
    engine = Engine.load(root / "a", num_threads=1)
    try:
        with running(create_app(engine, token=WRITE, bundle_root=root)) as client:
            served = engine.version
            for target in (tmp_path / "b_outside", root / "b_link", root / ".." / "b_outside", "/etc", "a\x00b"):
                for path, body in (("/swap", {"bundle": str(target)}), ("/ab", {"bundle": str(target), "fraction": 0.5})):
                    st, out = client.request("POST", path, body, headers=bearer(WRITE))
                    assert st == 403, (path, target, st, out)
                    assert engine.version == served and engine.ab is None
            shutil.copytree(trained.bundle("pipe_b"), root / "b")
            st, out = client.request("POST", "/swap", {"bundle": str(root / "b")}, headers=bearer(WRITE))
            assert st == 200 and engine.version != served
    finally:
        engine.close()


def test_malloc_settings_respect_the_environment(monkeypatch):
    from rec_engine.service import limit_malloc_arenas, trim_heap

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas() is False             # the operator's setting wins
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    import platform
    got = limit_malloc_arenas(8)                      # glibc: taken; elsewhere: nothing to do
    assert got is (platform.libc_ver()[0] == "glibc")
    trim_heap()
