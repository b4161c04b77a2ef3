"""ItemIndex's exact mode: the reduced-precision shortlist is checked against a bound on its error, and the
queries that fail are scanned again, so the ids and scores equal the float32 scan's.

The reference is the float32 scorer the re-scoring uses (``topk`` with every item as a candidate: the packed
FMA chain, the same sums as a batch's full scan), compared bit for bit. Data are chosen so that the check
fails often (near-duplicate items, ties, a few items of a much larger scale, shortlists of only k) and so
that it passes (Gaussian items, the default shortlist)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import rec_engine

from rec_engine import _core, topk
from rec_engine.topk import ItemIndex

PRECISIONS = ["int8", "bf16"]


def reference(q, x, k, ex):
    """topk over every item as a candidate: the re-scoring's float32 sums."""
    return topk(q, x, k, exclude=ex, candidates=[np.arange(x.shape[0])] * q.shape[0])


def assert_exact(q, idx, k, ex, threads=2):
    res = topk(q, idx, k, exclude=ex, num_threads=threads)
    ref = reference(q, idx.items, k, ex)
    np.testing.assert_array_equal(res.ids, ref.ids)
    np.testing.assert_array_equal(res.scores, ref.scores)
    return res


def maxima(idx):
    return dict(zip(("norm_max", "scale_max", "norm_all_max", "scale_all_max"), idx._maxima))


def clustered(rng, n, d, n_centres=20, noise=1e-3):
    """Items that are tiny perturbations of a few centres: hundreds of scores within the bound of the k-th."""
    centres = rng.normal(size=(n_centres, d))
    return (centres[rng.integers(0, n_centres, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("nq", [1, 3, 4, 9])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_clustered_items_with_shortlist_k_are_exact(simd, rng, precision, nq, k):
    x = clustered(rng, 3000, 24)
    q = rng.normal(size=(nq, 24)).astype(np.float32)
    ex = [rng.choice(3000, 40, replace=False) for _ in range(nq)]
    idx = ItemIndex(x, precision, shortlist=k)
    assert_exact(q, idx, k, ex)
    # a shortlist of k among near-duplicates cannot be proven: every query was scanned again
    assert idx.rescans == nq and idx.queries == nq


@pytest.mark.parametrize("precision", PRECISIONS)
def test_trusted_shortlist_of_clustered_items_misses(rng, precision):
    # what the check is for: the same short shortlist, trusted, gets some of these wrong
    x = clustered(rng, 3000, 24)
    q = rng.normal(size=(16, 24)).astype(np.float32)
    trusted = topk(q, ItemIndex(x, precision, shortlist=10, exact=False), 10)
    assert (trusted.ids != reference(q, x, 10, None).ids).any()


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("nq", [1, 2, 5])
@pytest.mark.parametrize("n,d", [(1, 3), (63, 8), (65, 17), (2000, 64), (4099, 33)])
def test_gaussian_items_default_shortlist_are_exact(simd, rng, precision, nq, n, d):
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    ex = [rng.choice(n, min(n - 1, 20), replace=False) for _ in range(nq)]
    idx = ItemIndex(x, precision)
    for k in (1, 7, 50, n, n + 3):
        assert_exact(q, idx, k, ex, threads=1)
        assert_exact(q, idx, k, ex, threads=2)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_default_shortlist_passes_the_check_on_gaussian_items(rng, precision):
    # where the bound is tight enough for the default shortlist, nothing is scanned twice
    x = rng.normal(size=(60000, 64)).astype(np.float32)
    q = rng.normal(size=(16, 64)).astype(np.float32)
    ex = [rng.choice(60000, 50, replace=False) for _ in range(16)]
    idx = ItemIndex(x, precision)
    for k in (10, 100):
        assert_exact(q, idx, k, ex)
    assert idx.queries == 32 and idx.rescans <= 1


@pytest.mark.parametrize("precision", PRECISIONS)
def test_ties_keep_the_lowest_ids(simd, rng, precision):
    # small integers: many exactly equal float32 scores, at the k-th place too
    x = rng.integers(-2, 3, size=(1500, 6)).astype(np.float32)
    q = rng.integers(-2, 3, size=(6, 6)).astype(np.float32)
    q[0] = 0.0  # a zero query: every score is 0, the answer is the k lowest eligible ids
    ex = [rng.choice(1500, 30, replace=False) for _ in range(6)]
    idx = ItemIndex(x, precision, shortlist=40)
    res = assert_exact(q, idx, 25, ex)
    keep = np.setdiff1d(np.arange(1500), ex[0])[:25]
    np.testing.assert_array_equal(res.ids[0], keep)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_items_of_very_different_scales(simd, rng, precision):
    # a few items 1e3 times larger and many tiny ones: the per-item scales and norms, and their maxima
    x = rng.normal(size=(5000, 32)).astype(np.float32)
    x[rng.choice(5000, 30, replace=False)] *= 1e3
    x[rng.choice(5000, 2000, replace=False)] *= 1e-6
    q = rng.normal(size=(7, 32)).astype(np.float32)
    q[3] *= 1e-20  # a query near the bottom of float's range (denormal products in bf16)
    ex = [rng.choice(5000, 10, replace=False) for _ in range(7)]
    idx = ItemIndex(x, precision, shortlist=60)
    for k in (5, 40):
        assert_exact(q, idx, k, ex)


@pytest.mark.parametrize("precision", ["bf16"])
def test_the_check_is_what_makes_a_short_list_exact(rng, precision):
    # norms of 0 (a lie) make every bf16 check pass (int8's bound also holds the item scales): the short
    # shortlist is then trusted and misses items, so the rescans above come from the check, not the scan
    x = clustered(rng, 3000, 24)
    q = rng.normal(size=(4, 24)).astype(np.float32)
    idx = ItemIndex(x, precision, shortlist=10)
    ids, scores, rescans = _core.topk_quantized(q, x, idx.packed, idx.corr, idx.scale, precision, 10, 12,
                                                norm=np.zeros(3000, np.float32), norm_max=0.0, scale_max=0.0,
                                                norm_all_max=0.0, scale_all_max=0.0)
    ref = reference(q, x, 10, None)
    assert rescans == 0 and (ids != ref.ids).any()
    ids, scores, rescans = _core.topk_quantized(q, x, idx.packed, idx.corr, idx.scale, precision, 10, 12,
                                                norm=idx.norm, heavy=idx.heavy, **maxima(idx))
    assert rescans == 4
    np.testing.assert_array_equal(ids, ref.ids)
    np.testing.assert_array_equal(scores, ref.scores)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_norms_bound_the_rows(rng, precision):
    x = rng.normal(size=(777, 19)).astype(np.float32) * rng.uniform(1e-3, 1e3, size=(777, 1)).astype(np.float32)
    norm = _core.quantized_norms(x, precision)
    true = np.sqrt((x.astype(np.float64) ** 2).sum(axis=1))
    assert norm.dtype == np.float32 and norm.shape == (777,)
    assert (norm.astype(np.float64) >= true).all()
    np.testing.assert_allclose(norm, true, rtol=1e-6)


def test_from_arrays_is_exact_and_counts(rng):
    x = clustered(rng, 2000, 16)
    built = ItemIndex(x, "int8")
    idx = ItemIndex.from_arrays(x, "int8", built.packed, built.corr, built.scale, shortlist=5)
    np.testing.assert_array_equal(idx.norm, built.norm)
    q = rng.normal(size=(3, 16)).astype(np.float32)
    assert_exact(q, idx, 5, None)
    assert idx.queries == 3 and idx.rescans == 3
    trusted = ItemIndex.from_arrays(x, "int8", built.packed, built.corr, built.scale, exact=False)
    assert trusted.norm is None and trusted.shortlist(5) == 37 and idx.shortlist(5) == 5
    assert ItemIndex(x, "int8").shortlist(100) == 464 and ItemIndex(x, "bf16").shortlist(100) == 264
    assert "exact=True" in repr(built)


def test_errors(rng):
    x = rng.normal(size=(100, 8)).astype(np.float32)
    q = rng.normal(size=(2, 8)).astype(np.float32)
    idx = ItemIndex(x, "int8")
    with pytest.raises(TypeError, match="exact must be a bool"):
        ItemIndex(x, "int8", exact="yes")
    args = (q, x, idx.packed, idx.corr, idx.scale, "int8", 5, 10)
    with pytest.raises(ValueError, match="one value per item"):
        _core.topk_quantized(*args, norm=idx.norm[:-1], norm_max=1.0, scale_max=1.0)
    with pytest.raises(ValueError, match="norm_max and scale_max"):
        _core.topk_quantized(*args, norm=idx.norm, norm_max=float("nan"), scale_max=1.0)
    with pytest.raises(ValueError, match="norm_max and scale_max"):
        _core.topk_quantized(*args, norm=idx.norm, norm_max=1.0, scale_max=-1.0)
    with pytest.raises(ValueError, match="at most norm_all_max"):
        _core.topk_quantized(*args, norm=idx.norm, norm_max=2.0, scale_max=1.0, norm_all_max=1.0)
    for bad in ([5, 3], [0, 100], [-1]):
        with pytest.raises(ValueError, match="increasing item ids"):
            _core.topk_quantized(*args, norm=idx.norm, heavy=np.array(bad, np.int64), **maxima(idx))
    with pytest.raises(TypeError):
        _core.topk_quantized(*args, norm=idx.norm.astype(np.float64), norm_max=1.0, scale_max=1.0)
    # an infinite maximum proves nothing: every query is scanned in float32, still exact
    ids, scores, rescans = _core.topk_quantized(*args, norm=idx.norm, norm_max=float("inf"), scale_max=1.0)
    assert rescans == 2
    np.testing.assert_array_equal(ids, reference(q, x, 5, None).ids)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_subnormal_and_tiny_items_and_queries(simd, rng, precision):
    # rows whose largest value is below 3.7e-37 (127 / max overflows float: the int8 codes come from double),
    # rows of subnormals, and queries of them: scales and products underflow, bf16 instructions flush them
    x = rng.normal(size=(700, 16)).astype(np.float32)
    x[:200] *= np.float32(1e-39)
    x[200:260] *= np.float32(1e-44)
    q = rng.normal(size=(5, 16)).astype(np.float32)
    q[1] *= np.float32(1e-39)
    q[2] = 0.0
    idx = ItemIndex(x, precision, shortlist=30)
    if precision == "int8":
        codes = idx.packed.view(np.int8)
        assert np.abs(codes.astype(np.int64)).max() <= 127 and np.isfinite(idx.scale).all()
    ex = [rng.choice(700, 5, replace=False) for _ in range(5)]
    for k in (3, 25, 300):
        assert_exact(q, idx, k, ex)
    tiny = ItemIndex(x[:260], precision, shortlist=20)   # every item tiny: many exact ties at 0
    assert_exact(q, tiny, 10, None)


# ------------------------------------------------- near float32's limits (cases found by review), outliers


@pytest.mark.parametrize("level", ["scalar", "avx2", "avx512"])
def test_values_near_float_limits_stay_exact(level, rng):
    import rec_engine
    if level not in rec_engine.supported_simd_levels():
        pytest.skip(f"{level} not supported here")
    before = rec_engine.simd_level()
    rec_engine.set_simd_level(level)
    try:
        cases = []
        r = np.random.default_rng(732)
        n = 29
        cases.append(("int8", (r.uniform(.5, 3, (n, 1)) * 1e36).astype(np.float32), np.ones((1, 1), np.float32), 6, 7))
        cases.append(("bf16", np.array([[3.397e38, 1], [0, .5]], np.float32), np.array([[0, 1]], np.float32), 1, 2))
        cases.append(("bf16", np.array([[0, 1e20], [3.397e38, 0], [3.397e38, 1e30]], np.float32),
                      np.array([[-1e-30, 1]], np.float32), 1, 2))
        cases.append(("bf16", np.array([[0, 2e37], [0, 0], [3e38, 0], [0, 0]], np.float32),
                      np.array([[1e-38, 1e-37]], np.float32), 1, 2))
        cases.append(("bf16", np.array([[0, 3e18], [0, 0], [1e20, 0], [0, 0]], np.float32),
                      np.array([[4.5e-41, 1e-39]], np.float32), 1, 2))
        cases.append(("int8", np.array([[0, 3e18], [0, 0], [1e20, 0], [0, 0]], np.float32),
                      np.array([[4.5e-41, 1e-39]], np.float32), 1, 2))
        for precision, x, q, k, sl in cases:
            idx = ItemIndex(x, precision, shortlist=sl)
            with np.errstate(over="ignore", invalid="ignore"):
                ref = topk(q, x, k, candidates=[np.arange(len(x))] * len(q))
                res = topk(q, idx, k)
            np.testing.assert_array_equal(res.ids, ref.ids, err_msg=f"{precision} {x[:2]}")
            np.testing.assert_array_equal(res.scores, ref.scores)
    finally:
        rec_engine.set_simd_level(before)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_an_outsized_item_is_heavy_not_a_rescan_for_every_query(rng, precision):
    # one item 100x the others' norm: re-scored for every query (ItemIndex.heavy) instead of widening every
    # bound to its size, which failed every check (and took three scans per query)
    x = rng.normal(size=(20000, 32)).astype(np.float32)
    x[1234] *= 100.0
    x[77] *= 30.0
    q = rng.normal(size=(12, 32)).astype(np.float32)
    q[5] = -x[1234] / 100.0     # a query for which the outsized item scores worst, not best
    idx = ItemIndex(x, precision)
    assert idx.heavy.tolist() == [77, 1234]
    assert idx._maxima[0] < float(idx.norm[77]) < idx._maxima[2] == float(idx.norm[1234])
    ex = [np.array([1234])] + [np.zeros(0, np.int64)] * 11    # the first query excludes it
    for k in (1, 10, 100):
        res = assert_exact(q, idx, k, ex)
        assert 1234 not in res.ids[0] and 1234 in res.ids[1:].ravel()
    assert idx.rescans == 0


@pytest.mark.parametrize("precision", PRECISIONS)
def test_zero_dimension_items(precision):
    # every score 0 and tied: the check cannot pass, and the rescan copies empty query rows (found by fuzzing)
    x, q = np.zeros((10, 0), np.float32), np.zeros((2, 0), np.float32)
    res = topk(q, ItemIndex(x, precision, shortlist=4), 3, exclude=[np.array([1]), np.zeros(0, np.int64)])
    assert res.ids.tolist() == [[0, 2, 3], [0, 1, 2]] and (res.scores == 0).all()


@pytest.mark.parametrize("precision", PRECISIONS)
def test_batches_of_long_shortlists_scan_in_float32_with_the_same_answer(rng, precision):
    x = clustered(rng, 20000, 16)
    q = rng.normal(size=(16, 16)).astype(np.float32)
    ex = [rng.choice(20000, 30, replace=False) for _ in range(16)]
    long = ItemIndex(x, precision, shortlist=2000)            # 16 x 2000 entries: the float32 scan
    assert_exact(q, long, 100, ex)
    assert long.rescans == 0
    for b in (1, 3, 12):                                      # fewer entries: the reduced-precision scan
        assert_exact(q[:b], long, 100, ex[:b])


def test_one_query_with_a_very_long_shortlist_keeps_the_rescoring_scores(rng):
    # 1 x 30000 entries: still the reduced-precision scan (a lone float32 query would stream, and sum in
    # another order than the re-scoring)
    x = rng.normal(size=(40000, 24)).astype(np.float32)
    q = rng.normal(size=(1, 24)).astype(np.float32)
    assert_exact(q, ItemIndex(x, "int8", shortlist=30000), 50, None)


def best_in_sampled_panels(x, q):
    """A copy of items ``x`` (n >= 65,536) whose 128 panels sampled for the floors hold query ``q``'s best items:
    its floor lands far too high, its selection does not fill, and its check fails or holds on the floor."""
    n_panels = -(-len(x) // 64)
    rows = np.concatenate([np.arange(p * 64, p * 64 + 64) for p in (s * (n_panels - 1) // 128 for s in range(128))])
    best = np.argsort(-(x @ q), kind="stable")
    best = best[~np.isin(best, rows)][:len(rows)]
    x2 = x.copy()
    x2[rows], x2[best] = x[best], x[rows]
    return x2


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("nq", [1, 2, 3])
def test_large_tables_start_at_a_floor_and_stay_exact(rng, precision, nq):
    # 65,536 items or more, 1-3 queries, a shortlist of 64 or more: the selections start at a floor taken
    # from 128 sampled panels (at avx512 with VNNI / BF16)
    n, d = 70_000, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    ex = [rng.choice(n, 50, replace=False) for _ in range(nq)]
    idx = ItemIndex(x, precision)
    for k in (16, 100, 300):
        assert_exact(q, idx, k, ex)
    # the sampled panels made to hold the first query's best items: its floor lands far too high, its
    # selection does not fill, and the check, bounded by the floor, fails or holds; the answer stays exact
    idx2 = ItemIndex(best_in_sampled_panels(x, q[0]), precision)
    for k in (16, 100, 300):
        assert_exact(q, idx2, k, ex)
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    if rec_engine.simd_level() == "avx512" and ("avx512_vnni" if precision == "int8" else "avx512_bf16") in flags:
        assert idx2.rescans >= 1   # the floors were taken, and the far too high one failed its check
