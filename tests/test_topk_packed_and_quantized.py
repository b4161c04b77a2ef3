"""The packed (register-blocked) full-scan path and the reduced-precision ItemIndex modes."""
from __future__ import annotations

import numpy as np
import pytest

import rec_engine
from rec_engine import topk
from rec_engine.topk import ItemIndex

from test_topk import assert_topk_close, int_data, reference


@pytest.mark.parametrize("d", [1, 3, 7, 15, 16, 17, 31, 63, 64, 65, 130])
@pytest.mark.parametrize("n", [1, 63, 64, 65, 1000])
def test_awkward_sizes_match_reference(simd, rng, d, n):
    q = rng.normal(size=(13, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    assert_topk_close(topk(q, x, 7), q, x, 7)
    qi, xi = int_data(rng, 8, n, d)
    res = topk(qi, xi, 9)
    ref_ids, ref_scores, _ = reference(qi, xi, 9)
    np.testing.assert_array_equal(res.ids, ref_ids)
    np.testing.assert_array_equal(res.scores, ref_scores.astype(np.float32))


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_scores_do_not_depend_on_threads_or_candidates(simd, rng, metric):
    q = rng.normal(size=(50, 40)).astype(np.float32)
    x = rng.normal(size=(3000, 40)).astype(np.float32)
    batch = topk(q, x, 20, metric=metric, num_threads=2)
    serial = topk(q, x, 20, metric=metric, num_threads=1)
    np.testing.assert_array_equal(batch.ids, serial.ids)
    np.testing.assert_array_equal(batch.scores, serial.scores)
    for b in (0, 7, 49):
        # a lone query streams the rows as they are (another summation order than a batch's packed panels):
        # the same items, scores equal up to the last bit
        for threads in (1, 2):
            one = topk(q[b], x, 20, metric=metric, num_threads=threads)
            np.testing.assert_array_equal(one.ids, batch.ids[b])
            np.testing.assert_allclose(one.scores, batch.scores[b], rtol=1e-6, atol=1e-6)
        lone = topk(q[b], x, 20, metric=metric, num_threads=1)
        np.testing.assert_array_equal(topk(q[b], x, 20, metric=metric, num_threads=2).scores, lone.scores)
        cand = topk(q[b], x, 20, metric=metric, candidates=np.arange(3000))
        np.testing.assert_array_equal(cand.ids, batch.ids[b])
        np.testing.assert_array_equal(cand.scores, batch.scores[b])


# ------------------------------------------------------------------ 1-3 queries: the streaming scan
# (at avx512 the rows are scored 16 at a time straight from the row-major table, compared with each
# query's threshold in SIMD; at scalar/avx2 the dot_tile blocks). Brute force in NumPy is the reference.


@pytest.mark.parametrize("nq", [1, 2, 3])
@pytest.mark.parametrize("n,d", [(1, 5), (15, 16), (17, 64), (1000, 64), (4099, 48), (2053, 37), (700, 130)])
@pytest.mark.parametrize("k", [1, 10, 500])
def test_small_batches_match_numpy_brute_force(simd, rng, nq, n, d, k):
    q = rng.normal(size=(nq, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    ex = [rng.choice(n, min(n - 1, 50), replace=False) for _ in range(nq)]
    for metric in ("ip", "cosine"):
        res = topk(q, x, k, metric=metric, exclude=ex)
        assert_topk_close(res, q, x, k, metric=metric, exclude=ex)
        two = topk(q, x, k, metric=metric, exclude=ex, num_threads=2)
        np.testing.assert_array_equal(two.ids, res.ids)
        np.testing.assert_array_equal(two.scores, res.scores)
        for b in range(nq):  # a query alone scores exactly as inside a batch of 2 or 3
            one = topk(q[b], x, k, metric=metric, exclude=ex[b])
            np.testing.assert_array_equal(one.ids, res.ids[b])
            np.testing.assert_array_equal(one.scores, res.scores[b])


@pytest.mark.parametrize("nq", [1, 2, 3])
@pytest.mark.parametrize("n", [63, 1001, 5000])
def test_small_batches_integer_ties_are_exact(simd, rng, nq, n):
    # small integer values: float32 sums are exact, so ids (ties by lower id) and scores equal the reference
    qi, xi = int_data(rng, nq, n, 20, lo=-1, hi=1)
    ex = [np.arange(b, n, 5) for b in range(nq)]
    for k in (7, 500):
        res = topk(qi, xi, k, exclude=ex, num_threads=2)
        ref_ids, ref_scores, _ = reference(qi, xi, k, exclude=ex)
        np.testing.assert_array_equal(res.ids, ref_ids)
        np.testing.assert_array_equal(res.scores, ref_scores.astype(np.float32))


def test_small_batch_nan_item_is_reported(simd, rng):
    x = rng.normal(size=(3000, 64)).astype(np.float32)
    x[1777, 5] = np.nan
    x[2900, 0] = np.nan
    for nq in (1, 2, 3):
        q = rng.normal(size=(nq, 64)).astype(np.float32)
        for threads in (1, 2):
            with pytest.raises(ValueError, match="item 1777 gives a NaN score"):
                topk(q, x, 500, num_threads=threads)


def test_simd_levels_agree_in_subprocesses_via_environment(rng, tmp_path):
    # REC_ENGINE_SIMD picks the level at start-up; every level gives the reference ids (k = 500, 1-3 queries)
    import os
    import subprocess
    import sys
    q = rng.normal(size=(3, 64)).astype(np.float32)
    x = rng.normal(size=(5003, 64)).astype(np.float32)
    np.save(tmp_path / "q.npy", q)
    np.save(tmp_path / "x.npy", x)
    code = (
        "import sys, numpy as np, rec_engine\n"
        "q = np.load(sys.argv[1]); x = np.load(sys.argv[2])\n"
        "out = {}\n"
        "for b in (1, 2, 3):\n"
        "    r = rec_engine.topk(q[:b], x, 500, exclude=[np.arange(0, 5003, 11)] * b, num_threads=2)\n"
        "    out[f'ids{b}'] = r.ids; out[f'scores{b}'] = r.scores\n"
        "np.savez(sys.argv[3], level=rec_engine.simd_level(), **out)\n"
    )
    results = {}
    for level in rec_engine.supported_simd_levels():
        path = tmp_path / f"{level}.npz"
        env = dict(os.environ, REC_ENGINE_SIMD=level)
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "q.npy"), str(tmp_path / "x.npy"), str(path)],
                       env=env, check=True, timeout=120)
        results[level] = np.load(path)
        assert str(results[level]["level"]) == level
    ex = [np.arange(0, 5003, 11)] * 3
    for level, r in results.items():
        for b in (1, 2, 3):
            assert_topk_close(rec_engine.TopK(r[f"ids{b}"], r[f"scores{b}"]), q[:b], x, 500, exclude=ex[:b])
            np.testing.assert_allclose(r[f"scores{b}"], results["scalar"][f"scores{b}"], rtol=1e-5, atol=1e-5,
                                       err_msg=level)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("nq", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 63, 65, 1000, 4099])
def test_item_index_small_batches_with_negative_scores_ignore_the_padding(simd, rng, precision, nq, n):
    # every true score is negative: the zero-padded items of the last panel (score 0) would beat them
    # all if the scan did not drop them
    x = np.abs(rng.normal(size=(n, 32))).astype(np.float32) + 0.1
    q = -np.abs(rng.normal(size=(nq, 32))).astype(np.float32)
    ex = [rng.choice(n, min(n - 1, 5), replace=False) for _ in range(nq)]
    for k in (1, 10, 500):
        res = topk(q, ItemIndex(x, precision, shortlist=n), k, exclude=ex, num_threads=2)
        # the shortlist is re-scored by the candidates scorer: the same sums as candidates = every item
        exact = topk(q, x, k, exclude=ex, candidates=[np.arange(n)] * nq)
        np.testing.assert_array_equal(res.ids, exact.ids)
        np.testing.assert_array_equal(res.scores, exact.scores)
        assert_topk_close(res, q, x, k, exclude=ex)
        assert res.ids.max() < n


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_item_index_with_full_shortlist_equals_exact(simd, rng, precision):
    q = rng.normal(size=(9, 33)).astype(np.float32)
    x = rng.normal(size=(700, 33)).astype(np.float32)
    ex = [rng.choice(700, 50, replace=False) for _ in range(9)]
    exact = topk(q, x, 15, exclude=ex)
    res = topk(q, ItemIndex(x, precision, shortlist=700), 15, exclude=ex)
    np.testing.assert_array_equal(res.ids, exact.ids)
    np.testing.assert_array_equal(res.scores, exact.scores)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
def test_item_index_trusted_default_shortlist_has_high_recall_and_exact_scores(simd, rng, precision):
    q = rng.normal(size=(16, 64)).astype(np.float32)
    x = rng.normal(size=(20000, 64)).astype(np.float32)
    ex = [rng.choice(20000, 50, replace=False) for _ in range(16)]
    exact = topk(q, x, 10, exclude=ex)
    idx = ItemIndex(x, precision, exact=False)
    assert idx.shortlist(10) == 42 and idx.norm is None
    res = topk(q, idx, 10, exclude=ex)
    hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), exact.ids.tolist())])
    assert hits >= 0.99
    for b in range(16):
        assert not np.isin(res.ids[b], ex[b]).any()
        full = x[res.ids[b]] @ q[b]
        np.testing.assert_allclose(res.scores[b], full, rtol=1e-4, atol=1e-4)
        assert np.all(np.diff(res.scores[b]) <= 0)


def test_item_index_single_query_edge_cases_and_errors(rng):
    x = rng.normal(size=(30, 5)).astype(np.float32)
    idx = ItemIndex(x, "int8")
    res = topk(x[3], idx, 100)
    assert res.ids.shape == (30,) and sorted(res.ids.tolist()) == list(range(30))
    assert topk(x[:0], idx, 5).ids.shape == (0, 5)
    assert topk(x[:2], idx, 0).ids.shape == (2, 0)
    r = topk(x[3], idx, 30, exclude=np.arange(25))
    assert (r.ids[5:] == -1).all() and np.isneginf(r.scores[5:]).all()
    with pytest.raises(ValueError, match="metric='ip' only"):
        topk(x[3], idx, 5, metric="cosine")
    cand = topk(x[3], idx, 3, candidates=[1, 2, 3])  # candidates: the exact path
    assert sorted(cand.ids.tolist()) == [1, 2, 3]
    bad = x.copy()
    bad[4, 2] = np.nan
    with pytest.raises(ValueError, match=r"items\[4, 2\] is not finite"):
        ItemIndex(bad, "bf16")
    with pytest.raises(ValueError, match="precision must be"):
        ItemIndex(x, "int4")


def test_item_index_levels_agree(rng):
    q = rng.normal(size=(5, 19)).astype(np.float32)
    x = rng.normal(size=(900, 19)).astype(np.float32)
    before = rec_engine.simd_level()
    out = {}
    try:
        for level in rec_engine.supported_simd_levels():
            rec_engine.set_simd_level(level)
            out[level] = [topk(q, ItemIndex(x, p, shortlist=200), 8) for p in ("int8", "bf16")]
    finally:
        rec_engine.set_simd_level(before)
    for level, res in out.items():
        for a, b in zip(res, out["scalar"]):
            np.testing.assert_array_equal(a.ids, b.ids, err_msg=level)
            np.testing.assert_allclose(a.scores, b.scores, rtol=1e-5, atol=1e-5, err_msg=level)


def _bf16(a):
    u = a.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def _int8(a):
    m = np.abs(a).max(axis=1, keepdims=True)
    inv = np.where(m > 0, np.float32(127) / np.where(m > 0, m, 1), 0).astype(np.float32)
    return np.clip(np.rint(a * inv), -127, 127).astype(np.int64), (m / np.float32(127)).astype(np.float32)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("n, d", [(64, 64), (1000, 64), (3001, 19)])
def test_item_index_shortlist_matches_numpy_reduced_scores(simd, rng, precision, n, d):
    # shortlist = k: the returned ids are the top-k by the reduced-precision score (every scorer, every level)
    q = rng.normal(size=(7, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    res = topk(q, ItemIndex(x, precision, shortlist=10, exact=False), 10)
    if precision == "int8":
        xi, xs = _int8(x)
        qi, _ = _int8(q)
        s = (qi @ xi.T).astype(np.float32) * xs[:, 0][None, :]
        ref = np.lexsort((np.broadcast_to(np.arange(n), s.shape), -s), axis=1)[:, :10]
        for b in range(7):
            assert set(res.ids[b].tolist()) == set(ref[b].tolist())
    else:
        s = _bf16(q).astype(np.float64) @ _bf16(x).astype(np.float64).T
        ref = np.argsort(-s, axis=1)[:, :10]
        hits = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids.tolist(), ref.tolist())])
        assert hits >= 0.97


@pytest.mark.parametrize("nq", [1, 2, 3])
@pytest.mark.parametrize("d", [64, 19])
def test_streamed_int8_scan_ranks_by_the_integer_scores(simd, rng, nq, d):
    """1-3 queries take the streamed int8 scan, whose AVX-512 kernel reads no per-item correction: it sums
    q . (x + 128) from -128 sum(q). Queries of one sign make that sum large, so any error in it would move
    the top 50 of the reduced scores; the ids must be exactly those of NumPy's integer products."""
    n = 5000
    q = np.abs(rng.normal(size=(nq, d))).astype(np.float32) * rng.choice([-1, 1], size=(nq, 1)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.2, 3.0, size=(n, 1)).astype(np.float32)
    res = topk(q, ItemIndex(x, "int8", shortlist=50, exact=False), 50)
    xi, xs = _int8(x)
    qi, _ = _int8(q)
    s = (qi @ xi.T).astype(np.float64) * xs[:, 0][None, :]
    for b in range(nq):
        order = np.argsort(-s[b], kind="stable")
        assert s[b, order[49]] > s[b, order[50]]          # no tie at the boundary: the set is defined
        assert set(res.ids[b].tolist()) == set(order[:50].tolist())


@pytest.mark.parametrize("nq", [1, 9])
@pytest.mark.parametrize("threads", [1, 2])
def test_all_tied_scores_keep_the_lowest_ids(simd, rng, nq, threads):
    # every score equal: the selections are cut back many times, always at a tie
    x = np.ones((5000, 8), np.float32)
    x[::7] = 2.0  # a few better items, ids 0, 7, 14, ...
    q = np.ones((nq, 8), np.float32)
    ex = [np.array([7, 3, 4999]) for _ in range(nq)]
    res = topk(q, x, 900, exclude=ex, num_threads=threads)
    best = [i for i in range(0, 5000, 7) if i != 7]
    rest = [i for i in range(5000) if i % 7 and i != 3][:900 - len(best)]
    for b in range(nq):
        np.testing.assert_array_equal(res.ids[b], best + rest)
    res8 = topk(q, ItemIndex(x, "int8"), 100, exclude=ex, num_threads=threads)
    for b in range(nq):
        np.testing.assert_array_equal(res8.ids[b], best[:100])


@pytest.mark.parametrize("n_excluded", [0, 1, 40, 600, 2900])
def test_exclusion_lists_of_any_length_match_numpy(simd, rng, n_excluded):
    # long lists fill each query's Bloom filter (every lookup then goes to the sorted list): the result
    # must not depend on how full it is
    q = rng.normal(size=(11, 24)).astype(np.float32)
    x = rng.normal(size=(3000, 24)).astype(np.float32)
    ex = [rng.choice(3000, n_excluded, replace=False) for _ in range(11)]
    s = q.astype(np.float64) @ x.T.astype(np.float64)
    for b in range(11):
        s[b, ex[b]] = -np.inf
    want = np.argsort(-s, axis=1, kind="stable")[:, :20]
    for items in (x, ItemIndex(x, "int8", shortlist=3000), ItemIndex(x, "bf16", shortlist=3000)):
        res = topk(q, items, 20, exclude=ex)
        np.testing.assert_array_equal(res.ids, want)
        assert not any(np.isin(res.ids[b], ex[b]).any() for b in range(11))
    one = topk(q[3], x, 20, exclude=ex[3])
    np.testing.assert_array_equal(one.ids, want[3])


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="needs Linux /proc for VmHWM")
@pytest.mark.parametrize("mode", ["f32", "int8", "bf16"])
def test_batch_topk_peak_memory_stays_near_inputs_and_outputs(mode):
    """256 queries x 200k items, k=100: a B x N score matrix would be 205 MB; the scan must stay within a few
    MB of its inputs and outputs (peak resident memory of a fresh process, C++ allocations included)."""
    import os
    import subprocess
    import sys
    code = f"""
import numpy as np, rec_engine
from rec_engine.topk import ItemIndex
def hwm():
    for line in open('/proc/self/status'):
        if line.startswith('VmHWM'):
            return int(line.split()[1]) / 1024
rng = np.random.default_rng(0)
x = rng.standard_normal((200_000, 64), dtype=np.float32)
q = rng.standard_normal((256, 64), dtype=np.float32)
ex = [rng.choice(200_000, 50, replace=False) for _ in range(256)]
items = x if "{mode}" == "f32" else ItemIndex(x, "{mode}")
rec_engine.topk(q[:8], items, 100, exclude=ex[:8])          # warm: code, thread pools, allocator
before = hwm()
res = rec_engine.topk(q, items, 100, exclude=ex)
print(hwm() - before, res.ids.shape)
"""
    env = dict(os.environ)
    if "libclang_rt.asan" in env.get("LD_PRELOAD", ""):
        # under ASan (scripts/sanitize.sh preloads its runtime) freed blocks wait in its quarantine, so the peak
        # would follow what the call allocated in all (int8 on an Intel Xeon: 29.4 MiB) rather than what it
        # held at once, which is what this test bounds: no quarantine in the measured process
        env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS", ""), "quarantine_size_mb=0"]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    grew, shape = out.stdout.split(maxsplit=1)
    assert shape.strip() == "(256, 100)"
    # outputs: 256 x 100 x (8 + 4) bytes = 0.3 MB; per-thread selections and panels: a few MB
    assert float(grew) < 24, f"peak memory grew by {float(grew):.1f} MiB during the call"
