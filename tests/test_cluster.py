"""The sharded catalogue (rec_engine.cluster) against the single-process Engine over the same bundle.

In one process (no Ray needed): shard scans merged equal one scan; a ShardedEngine over in-process shards
answers exactly what Engine answers. On a local Ray cluster (skipped without ray): the Serve application
answers exactly what Engine answers, a swap under load loses no request, and an observe on one ingress
replica is seen by another (Redis stream)."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
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
REDIS_SERVER = shutil.which("redis-server")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    redis = pytest.importorskip("redis", reason="the Redis event store needs the redis package")
    d = tmp_path_factory.mktemp("redis")
    port = _free_port()
    proc = subprocess.Popen([REDIS_SERVER, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(d), "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cluster(trained, redis_url, tmp_path_factory):
    """One Serve application for the module: 3 shards, 2 ingress replicas, on a 2-CPU local Ray cluster;
    the bundle is a model home (its CURRENT is what the swap test changes)."""
    ray = pytest.importorskip("ray", reason="the cluster tests need Ray Serve (pip install 'rec_engine[cluster]')")
    serve = pytest.importorskip("ray.serve", reason="the cluster tests need Ray Serve (pip install 'ray[serve]')")
    from rec_engine.cluster import deploy

    pythonpath = os.pathsep.join([os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
                                 + [os.path.dirname(os.path.dirname(__import__("rec_engine").__file__))])
    env = {"env_vars": {"PYTHONPATH": pythonpath}}     # rec_engine importable in the workers (a source checkout)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False, runtime_env=env)
    stream = f"test:{uuid.uuid4().hex[:10]}"
    opts = dict(shards=3, replicas=2, events=redis_url, stream=stream, ingress_cpus=0.25, shard_cpus=0.25,
                follow_events_s=0.02, name="test_cluster", route_prefix=None, runtime_env=env)
    try:
        handle = deploy(trained.bundle("pipe_a"), **opts)
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
        deploy(trained.bundle("pipe_b"), **opts)         # only user_config changes: reconfigure in place
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


def test_the_cli_prints_the_serve_config_and_checks_its_options(trained, capsys):
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
    with pytest.raises(SystemExit, match="shards"):
        main(["cluster", bundle, "--shards", "0"])
