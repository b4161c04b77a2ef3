"""The sharded catalogue (rec_engine.cluster) against the single-process Engine over the same bundle.

In one process (no Ray needed): shard scans merged equal one scan; a ShardedEngine over in-process shards
answers exactly what Engine answers. On a local Ray cluster (skipped without ray): the Serve application
answers exactly what Engine answers, a swap under load loses no request, and an observe on one ingress
replica is seen by another (Redis stream)."""
from __future__ import annotations

import os
import threading
import time
import uuid

import numpy as np
import pytest

from rec_engine._core import RecEngineError
from rec_engine.bundle import BundleError
from rec_engine.cluster import (ShardedEngine, ShardScanner, load_slice, merge_topk, shard_bounds, split_exclude,
                                version_id)
from rec_engine.engine import Engine
from rec_engine.topk import TopK, topk

CTX = {"hour": 9.0, "device": "android"}
USERS = [0, 7, 123, 250, 399, 10_000]     # 10_000: unknown to the model (cold start)


# --------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("n,d,m,k", [(1, 3, 1, 5), (7, 5, 3, 10), (1000, 16, 4, 500), (5003, 17, 7, 37),
                                     (100, 8, 100, 9)])
def test_merged_shard_scans_equal_one_scan_ids_and_bits(rng, n, d, m, k):
    x = rng.standard_normal((n, d), dtype=np.float32)
    x[n // 2:n // 2 + 3] = x[0]                        # ties across shard borders: lower id first
    q = rng.standard_normal((3, d), dtype=np.float32)
    ex = [rng.choice(n, size=min(n, 4), replace=False) for _ in range(3)]
    b = shard_bounds(n, m)
    for single in (True, False):
        qq, ee = (q[0], ex[0]) if single else (q, ex)
        full = topk(qq, x, k, exclude=ee)
        parts = []
        for i in range(m):
            lo, hi = int(b[i]), int(b[i + 1])
            local = split_exclude(ee, not single, lo, hi)
            local = local - lo if single else [e - lo for e in local]
            r = topk(qq, x[lo:hi], k, exclude=local)
            parts.append(TopK(np.where(r.ids >= 0, r.ids + lo, -1), r.scores))
        got = merge_topk(parts, k)
        np.testing.assert_array_equal(got.ids, full.ids)
        np.testing.assert_array_equal(got.scores.view(np.int32), full.scores.view(np.int32))


def test_shard_bounds_cover_every_row_once_and_bad_counts_are_refused():
    for n, m in ((10, 3), (3, 5), (0, 2), (1_000_003, 16)):
        b = shard_bounds(n, m)
        assert b[0] == 0 and b[-1] == n and np.all(np.diff(b) >= 0) and np.diff(b).max() - np.diff(b).min() <= 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="shards"):
            shard_bounds(10, bad)


@pytest.fixture(scope="module")
def local_shards(trained):
    """Three in-process shards and the transport a ShardedEngine needs (direct calls)."""
    scanners = [ShardScanner(i, 3) for i in range(3)]

    def submit(i, path, version, q, n, exclude):
        s = scanners[i]
        return s.load(path, version) if q is None else s.scan(path, version, q, n, exclude)

    return scanners, submit, (lambda x: x)


def _same(rec, ref):
    assert rec.version == ref.version and rec.fallback == ref.fallback
    np.testing.assert_array_equal(rec.ids, ref.ids)
    np.testing.assert_array_equal(np.asarray(rec.scores, np.float32), ref.scores)


@pytest.mark.parametrize("bundle", ["pipe_a", "lightgcn"])
def test_sharded_engine_in_one_process_equals_engine(trained, local_shards, bundle):
    scanners, submit, wait = local_shards
    path = trained.bundle(bundle)
    with Engine.load(path) as ref, ShardedEngine(path, n_shards=3, submit=submit, wait=wait) as sharded:
        assert all(version_id(path) in s.versions for s in scanners)
        for user in USERS:
            for k in (1, 10, 60):
                _same(sharded.recommend(user, k, context=CTX), ref.recommend(user, k, context=CTX))
        _same(sharded.recommend(7, 10, exclude=[3, 150, 299], context=CTX),
              ref.recommend(7, 10, exclude=[3, 150, 299], context=CTX))
        for a, b in zip(sharded.recommend_batch(USERS, 10, context=CTX), ref.recommend_batch(USERS, 10, context=CTX)):
            _same(a, b)
        sharded.observe(7, [5, 200])                      # fold-in and seen set: the engine's own code
        ref.observe(7, [5, 200])
        _same(sharded.recommend(7, 10, context=CTX), ref.recommend(7, 10, context=CTX))


def test_items_added_online_are_scanned_by_the_ingress_and_merged(trained, local_shards):
    _, submit, wait = local_shards
    path = trained.bundle("lightgcn")
    with Engine.load(path) as ref, ShardedEngine(path, n_shards=3, submit=submit, wait=wait) as sharded:
        v = ref._version.retrieval.items
        new = np.stack([v[3] * 3.0, v[9] * 2.5]).astype(np.float32)     # vectors that rank high
        for e in (ref, sharded):
            e.add_items([100_000, 100_001], vectors=new)
        a, b = sharded.recommend(0, 20), ref.recommend(0, 20)
        _same(a, b)
        assert {100_000, 100_001} & set(a.items.tolist())


def test_batched_shard_scans_equal_single_scans_bit_for_bit(trained, rng):
    """ShardScanner.scan_many (what a shard replica runs on a coalesced batch) against one scan per request:
    random queries, random exclusion lists (empty, None, ids outside the shard, the whole shard), several n,
    requests of two versions and batches ([B, d]) mixed in, bad requests failing alone."""
    a, b = trained.bundle("lightgcn"), trained.bundle("pipe_b")
    va, vb = version_id(a), version_id(b)
    for shard in range(3):
        s = ShardScanner(shard, 3)
        lo, hi = s.load(a)["lo"], s.load(a)["hi"]
        n_items, d = s.load(a)["n_items"], s.load(a)["dim"]
        d_b = s.load(b)["dim"]
        for trial in range(6):
            reqs = []
            for j in range(int(rng.integers(1, 17))):
                path, version, dim = (a, va, d) if rng.random() < 0.8 else (b, vb, d_b)
                q = (rng.standard_normal(dim) * rng.choice([0.1, 1.0, 10.0])).astype(np.float32)
                kind = rng.integers(0, 5)
                ex = (None if kind == 0 else np.zeros(0, np.int64) if kind == 1 else
                      np.arange(lo, hi) if kind == 2 else rng.choice(n_items, size=int(rng.integers(1, 60)), replace=False))
                n = int(rng.choice([1, 10, 10, 10, 150]))
                if rng.random() < 0.1:                      # a batch, as recommend_batch sends
                    q = rng.standard_normal((5, dim)).astype(np.float32)
                    ex = None if ex is None else [ex] * 5
                reqs.append((path, version, q, n, ex))
            if trial == 5:                                  # bad ones: each fails alone, as its scan would
                reqs.insert(1, (a, va, np.ones(d + 1, np.float32), 10, None))
                reqs.insert(3, (a, "0123456789ab", np.ones(d, np.float32), 10, None))
                reqs.insert(4, (a, va, np.full(d, np.nan, np.float32), 10, None))
            got = s.scan_many(reqs)
            assert len(got) == len(reqs)
            for req, g in zip(reqs, got):
                try:
                    want = s.scan(*req)
                except Exception as e:                      # noqa: BLE001
                    assert isinstance(g, type(e)) and str(g) == str(e), (g, e)
                    continue
                assert isinstance(g, TopK), g
                np.testing.assert_array_equal(g.ids, want.ids)
                np.testing.assert_array_equal(g.scores.view(np.int32), want.scores.view(np.int32))


def test_a_shard_replica_coalesces_concurrent_scans_and_answers_each_exactly(trained, rng):
    """The Shard deployment's class without Ray: concurrent scan() calls are answered by one scan_many (a lone
    one at once), each answer its own scan's, an error only its own request's; batch=1 scans one by one."""
    import asyncio

    from rec_engine.cluster import Shard

    path = trained.bundle("lightgcn")
    vid = version_id(path)
    qs = [rng.standard_normal(16).astype(np.float32) for _ in range(10)]
    exs = [rng.choice(300, size=j * 3, replace=False) for j in range(10)]

    async def run(shard, bad=False):
        await shard.reconfigure({"bundle": str(path)})
        alone = await shard.scan(str(path), vid, qs[0], 10, exs[0])
        calls = [shard.scan(str(path), vid, q, 10, e) for q, e in zip(qs, exs)]
        if bad:
            calls.insert(3, shard.scan(str(path), vid, np.ones(17, np.float32), 10, None))
        return alone, await asyncio.gather(*calls, return_exceptions=True)

    for batch in (1, 8):
        shard = Shard(0, 3, batch=batch)
        alone, got = asyncio.run(run(shard, bad=batch > 1))
        if batch > 1:
            assert isinstance(got.pop(3), ValueError)
            # the lone scan alone, then 8 + 2 (the first caller's batch takes all that queued, up to 8)
            assert (shard.batches, shard.batched_requests) == (1 + 2, 1 + 11), (shard.batches, shard.batched_requests)
        else:
            assert shard.batches == 0
        for q, e, g in zip([qs[0]] + qs, [exs[0]] + exs, [alone] + got):
            want = shard.scanner.scan(path, vid, q, 10, e)
            np.testing.assert_array_equal(g.ids, want.ids)
            np.testing.assert_array_equal(g.scores.view(np.int32), want.scores.view(np.int32))
    with pytest.raises(ValueError, match="batch"):
        Shard(0, 3, batch=0)


def test_shard_refuses_bad_input_and_other_bundles(trained, tmp_path):
    with pytest.raises(ValueError, match="shard must be"):
        ShardScanner(3, 3)
    with pytest.raises(ValueError, match="keep"):
        ShardScanner(0, 2, keep=0)
    with pytest.raises(ValueError, match="scan_memory"):
        load_slice(trained.bundle("lightgcn"), 0, 2, scan_memory="swap")
    with pytest.raises(RecEngineError, match="no retrieval stage|not a retrieval model"):
        load_slice(trained.bundle("deepfm"), 0, 2)
    s = ShardScanner(0, 2)
    with pytest.raises(RecEngineError, match="asks for"):
        s.scan(trained.bundle("lightgcn"), "0123456789ab", np.ones(16, np.float32), 5)
    with pytest.raises(BundleError, match="not a readable bundle"):
        s.load(tmp_path)
    # ShardedEngine needs a float32 scan and a transport
    with pytest.raises(ValueError, match="float32"):
        ShardedEngine(trained.bundle("lightgcn"), n_shards=2, submit=lambda *a: None, wait=lambda x: x, index="int8")
    with pytest.raises(TypeError, match="callables"):
        ShardedEngine(trained.bundle("lightgcn"), n_shards=2, submit=None, wait=None)


def test_shards_of_another_bundle_or_shard_count_are_refused_at_load(trained):
    path = trained.bundle("lightgcn")
    wrong = [ShardScanner(i, 2) for i in range(2)]          # shards cut for 2, the engine asks 3 of them

    def submit(i, p, version, q, n, exclude):
        s = wrong[min(i, 1)]
        return s.load(p, version) if q is None else s.scan(p, version, q, n, exclude)

    with pytest.raises(RecEngineError, match="same --shards"):
        ShardedEngine(path, n_shards=3, submit=submit, wait=lambda x: x)


# --------------------------------------------------------------------------- on a local Ray cluster
from redis_fixture import free_port as _free_port, redis_url  # noqa: E402,F401 (fixture)

TOKENS = {"REC_ENGINE_TOKEN": "w-" + uuid.uuid4().hex, "REC_ENGINE_READ_TOKEN": "r-" + uuid.uuid4().hex}


@pytest.fixture(scope="module")
def cluster(trained, redis_url, tmp_path_factory):
    """One Serve application for the module: 3 shards (batched scans, at most 8), 2 ingress replicas, on a
    2-CPU local Ray cluster, HTTP on a free port under /rec with a write and a read token."""
    ray = pytest.importorskip("ray", reason="the cluster tests need Ray Serve (pip install 'rec_engine[cluster]')")
    serve = pytest.importorskip("ray.serve", reason="the cluster tests need Ray Serve (pip install 'ray[serve]')")
    from rec_engine.cluster import deploy

    pythonpath = os.pathsep.join([os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
                                 + [os.path.dirname(os.path.dirname(__import__("rec_engine").__file__))])
    env = {"env_vars": {"PYTHONPATH": pythonpath}}     # rec_engine importable in the workers (a source checkout)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=env)
    stream = f"test:{uuid.uuid4().hex[:10]}"
    port = _free_port()
    app_env = {"env_vars": {**env["env_vars"], **TOKENS}}
    opts = dict(shards=3, replicas=2, events=redis_url, stream=stream, ingress_cpus=0.25, shard_cpus=0.25,
                follow_events_s=0.02, name="test_cluster", route_prefix="/rec", runtime_env=app_env, shard_batch=8)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = deploy(trained.bundle("pipe_a"), **opts)
        opts["http_port"] = port
        yield handle, opts, serve
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas_answering(handle, call, want: int, tries: int = 60) -> dict:
    """Answers of ``call(handle)`` by replica until ``want`` replicas answered."""
    seen: dict = {}
    for _ in range(tries):
        r = call(handle)
        seen.setdefault(r["replica"], r)
        if len(seen) >= want:
            break
    return seen


def test_sharded_answers_equal_the_single_process_engine(trained, cluster):
    handle, _, _ = cluster
    with Engine.load(trained.bundle("pipe_a")) as ref:
        for user in USERS:
            for k in (1, 10, 50):
                got = handle.recommend.remote(user, k, context=CTX).result()
                want = ref.recommend(user, k, context=CTX)
                assert got["version"] == want.version and got["fallback"] == want.fallback
                assert got["ids"] == want.ids.tolist(), (user, k)
                np.testing.assert_array_equal(np.array(got["scores"], np.float32), want.scores)
        got = handle.recommend.remote(123, 10, exclude=[1, 2, 3], context=CTX).result()
        assert got["ids"] == ref.recommend(123, 10, exclude=[1, 2, 3], context=CTX).ids.tolist()
        batch = handle.recommend_batch.remote(USERS, 10, context=CTX).result()
        assert [b["ids"] for b in batch] == [r.ids.tolist() for r in ref.recommend_batch(USERS, 10, context=CTX)]
    # both ingress replicas answer (each with its own engine) and agree
    answers = _replicas_answering(handle, lambda h: h.recommend.remote(250, 10, context=CTX).result(), 2)
    assert len(answers) == 2 and len({tuple(a["ids"]) for a in answers.values()}) == 1


def test_concurrent_requests_are_batched_at_the_shards_and_answered_exactly(trained, cluster):
    handle, opts, serve = cluster
    users = [0, 7, 123, 250, 399, 10_000, 11, 42, 77, 300, 5, 199]
    with Engine.load(trained.bundle("pipe_a")) as ref:
        want = {(u, k): ref.recommend(u, k, context=CTX) for u in users for k in (5, 10)}
        want_batch = ref.recommend_batch(users[:6], 10, context=CTX)
    shard_handles = [serve.get_deployment_handle(f"shard{i}", app_name=opts["name"]) for i in range(3)]
    before = [h.stats.remote().result() for h in shard_handles]
    jobs = [(u, k) for u in users for k in (5, 10)] * 2
    out: dict = {}

    def one(j):
        u, k = jobs[j]
        out[j] = handle.recommend.remote(u, k, context=CTX)

    threads = [threading.Thread(target=one, args=(j,)) for j in range(len(jobs))]
    batch = handle.recommend_batch.remote(users[:6], 10, context=CTX)       # a [B, d] scan among them
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for j, (u, k) in enumerate(jobs):
        got, ref_rec = out[j].result(), want[(u, k)]
        assert got["ids"] == ref_rec.ids.tolist(), (u, k)
        np.testing.assert_array_equal(np.array(got["scores"], np.float32).view(np.int32),
                                      ref_rec.scores.view(np.int32))
    assert [b["ids"] for b in batch.result()] == [r.ids.tolist() for r in want_batch]
    after = [h.stats.remote().result() for h in shard_handles]
    grew = [(a["batched_requests"] - b["batched_requests"], a["batches"] - b["batches"]) for a, b in zip(after, before)]
    assert all(r >= len(jobs) // 2 for r, _ in grew), grew    # the scans went through the coalescer
    print("coalesced (requests, scans) per shard:", grew)     # e.g. [(45, 37), (45, 31), (45, 37)] here; how
    # many overlap depends on the machine's speed, so the coalescing itself is asserted in one process below


def _http(port, method, path, body=None, token=None):
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                 data=None if body is None else json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token else {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_needs_the_tokens(trained, cluster):
    _, opts, _ = cluster
    port, w, r = opts["http_port"], TOKENS["REC_ENGINE_TOKEN"], TOKENS["REC_ENGINE_READ_TOKEN"]
    body = {"user": 123, "k": 10, "context": CTX}
    assert _http(port, "GET", "/rec/healthz")[0] == 200                   # open
    for token in (None, "wrong", w[:-1]):
        status, out = _http(port, "POST", "/rec/recommend", body, token)
        assert status == 401 and "read token" in out["detail"], (token, status, out)
    with Engine.load(trained.bundle("pipe_a")) as ref:
        want = ref.recommend(123, 10, context=CTX).ids.tolist()
    for token in (r, w):                                                  # the read or the write token
        status, out = _http(port, "POST", "/rec/recommend", body, token)
        assert status == 200 and out["ids"] == want, (status, out)
    obs = {"user": 10_001, "items": [want[0]]}
    for token in (None, r, "wrong"):                                      # observe: the write token only
        status, out = _http(port, "POST", "/rec/observe", obs, token)
        assert status == 401 and "write token" in out["detail"], (token, status, out)
    assert _http(port, "POST", "/rec/observe", obs, w)[0] == 200


def test_bad_requests_get_clear_errors(cluster):
    handle, _, _ = cluster
    with pytest.raises(Exception, match="k must be >= 0"):
        handle.recommend.remote(0, -1).result()
    with pytest.raises(Exception, match="unknown item key"):
        handle.recommend.remote(0, 5, exclude=[10**9]).result()
    with pytest.raises(Exception, match="unknown options"):
        handle.recommend.remote(0, 5, colour="red").result()


def test_an_observe_on_one_replica_shows_on_another(trained, cluster):
    handle, _, _ = cluster
    user = 321
    first = handle.recommend.remote(user, 10, context=CTX).result()
    item = first["ids"][0]
    done = handle.observe.remote(user, [item]).result()
    with Engine.load(trained.bundle("pipe_a")) as ref:
        ref.observe(user, [item])
        want = ref.recommend(user, 10, context=CTX)
    assert item not in want.ids.tolist()
    # every replica (the one that stored it and the other, following the Redis stream) answers as the Engine
    # that observed it, within a few seconds
    deadline = time.monotonic() + 10
    ok: set = set()
    while len(ok) < 2 and time.monotonic() < deadline:
        got = handle.recommend.remote(user, 10, context=CTX).result()
        if got["ids"] == want.ids.tolist():
            ok.add(got["replica"])
    assert done["replica"] in ok and len(ok) == 2, f"replicas answering as after the observe: {ok}"


def test_a_swap_under_load_loses_no_request(trained, cluster, tmp_path):
    handle, opts, serve = cluster
    from rec_engine.cluster import deploy

    with Engine.load(trained.bundle("pipe_a")) as a, Engine.load(trained.bundle("pipe_b")) as b:
        want = {a.version: {u: a.recommend(u, 10, context=CTX).ids.tolist() for u in USERS[:4]},
                b.version: {u: b.recommend(u, 10, context=CTX).ids.tolist() for u in USERS[:4]}}
    assert want[a.version] != want[b.version]
    answers, errors, stop = [], [], threading.Event()

    def fire():
        j = 0
        while not stop.is_set():
            u = USERS[j % 4]
            j += 1
            try:
                answers.append((u, handle.recommend.remote(u, 10, context=CTX).result()))
            except Exception as e:      # noqa: BLE001 - every failure is counted
                errors.append(repr(e))

    before = _replicas_answering(handle, lambda h: h.stats.remote().result(), 2)
    threads = [threading.Thread(target=fire) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        t_swap = time.monotonic()
        deploy(trained.bundle("pipe_b"), **{k: v for k, v in opts.items() if k != "http_port"})   # reconfigure
        t_run = time.monotonic()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:        # until both replicas answer from the new version
            recent = {r["replica"] for _, r in answers[-20:] if r["version"] == b.version}
            if len(recent) == 2:
                break
            time.sleep(0.2)
        print(f"swap: serve.run {t_run - t_swap:.1f} s, both replicas on the new version after "
              f"{time.monotonic() - t_swap:.1f} s, {len(answers)} answers")
        time.sleep(0.5)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[:3]
    versions = [r["version"] for _, r in answers]
    assert versions[0] == a.version and versions[-1] == b.version and len(answers) > 20
    for u, r in answers:                          # every answer wholly from one version
        assert r["ids"] == want[r["version"]][u]
    # the swap reconfigured the replicas in place (no restart: the same replicas answer)
    after = _replicas_answering(handle, lambda h: h.stats.remote().result(), 2)
    assert all(s["version"] == b.version for s in after.values())
    assert set(after) == set(before), "the swap replaced the replicas instead of reconfiguring them"


def test_the_cli_prints_the_serve_config_and_checks_its_options(trained, capsys, monkeypatch):
    pytest.importorskip("ray.serve", reason="the cluster tests need Ray Serve (pip install 'rec_engine[cluster]')")
    import json

    from rec_engine.cli import main

    bundle = str(trained.bundle("pipe_a"))
    assert main(["cluster", bundle, "--shards", "3", "--replicas", "2", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)["applications"][0]
    names = [d["name"] for d in cfg["deployments"]]
    assert names.count("ingress") == 1 and sorted(n for n in names if n != "ingress") == ["shard0", "shard1", "shard2"]
    assert all(d["user_config"] == {"bundle": bundle} for d in cfg["deployments"])
    assert cfg["args"]["shards"] == 3 and cfg["args"]["replicas"] == 2
    assert cfg["args"]["shard_batch"] == 16 and "runtime_env" not in cfg
    with pytest.raises(SystemExit, match="shards"):
        main(["cluster", bundle, "--shards", "0"])
    with pytest.raises(SystemExit, match="shard.batch"):
        main(["cluster", bundle, "--shards", "2", "--shard-batch", "0"])
    # tokens reach the replicas through the runtime_env; the printed config holds placeholders, never them
    monkeypatch.setenv("REC_ENGINE_TOKEN", "secret-write-token")
    monkeypatch.setenv("REC_ENGINE_READ_TOKEN", "secret-read-token")
    assert main(["cluster", bundle, "--shards", "2", "--shard-batch", "1", "--print-config"]) == 0
    text = capsys.readouterr().out
    assert "secret" not in text
    cfg = json.loads(text)["applications"][0]
    assert cfg["runtime_env"] == {"env_vars": {"REC_ENGINE_TOKEN": "<REC_ENGINE_TOKEN>",
                                               "REC_ENGINE_READ_TOKEN": "<REC_ENGINE_READ_TOKEN>"}}
    assert cfg["args"]["shard_batch"] == 1
    from rec_engine.cluster import _guard_from_env

    with pytest.raises(ValueError, match="placeholder"):
        monkeypatch.setenv("REC_ENGINE_TOKEN", "<REC_ENGINE_TOKEN>")
        _guard_from_env()
