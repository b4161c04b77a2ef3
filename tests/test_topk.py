"""Top-k against a full sort: exact on integer data (ties included), within float tolerance otherwise."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import rec_engine
from rec_engine import IdLists, topk
from rec_engine import _core


def reference(q, x, k, metric="ip", exclude=None, candidates=None):
    """Full scores in float64 and a stable sort: higher score first, then lower id."""
    q = np.atleast_2d(np.asarray(q, dtype=np.float64))
    x = np.asarray(x, dtype=np.float64)
    s = q @ x.T
    if metric == "cosine":
        qn = np.linalg.norm(q, axis=1)
        xn = np.linalg.norm(x, axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            s = s / np.outer(np.where(qn > 0, qn, np.inf), np.where(xn > 0, xn, np.inf))
    width = min(k, x.shape[0])
    ids = np.full((q.shape[0], width), -1, dtype=np.int64)
    scores = np.full((q.shape[0], width), -np.inf)
    for b in range(q.shape[0]):
        allowed = np.ones(x.shape[0], bool) if candidates is None else np.isin(np.arange(x.shape[0]), candidates[b])
        if exclude is not None:
            allowed[np.asarray(exclude[b], dtype=np.int64)] = False
        idx = np.flatnonzero(allowed)
        order = idx[np.lexsort((idx, -s[b, idx]))][:width]
        ids[b, :order.size] = order
        scores[b, :order.size] = s[b, order]
    return ids, scores, s


def assert_topk_close(res, q, x, k, metric="ip", exclude=None, candidates=None, tol=2e-4):
    """Returned ids are eligible, distinct, sorted, and their exact scores are the k best (within tol)."""
    ref_ids, ref_scores, full = reference(q, x, k, metric, exclude, candidates)
    ids, scores = np.atleast_2d(res.ids), np.atleast_2d(res.scores)
    assert ids.shape == ref_ids.shape and scores.shape == ref_ids.shape
    for b in range(ids.shape[0]):
        valid = ids[b] >= 0
        assert np.array_equal(valid, ref_ids[b] >= 0), "number of results differs from the reference"
        got = ids[b][valid]
        assert len(set(got.tolist())) == got.size
        if exclude is not None:
            assert not np.isin(got, exclude[b]).any()
        if candidates is not None:
            assert np.isin(got, candidates[b]).all()
        np.testing.assert_allclose(scores[b][valid], full[b, got], rtol=tol, atol=tol)
        np.testing.assert_allclose(np.sort(full[b, got])[::-1], ref_scores[b][valid], rtol=tol, atol=tol)
        assert np.all(np.diff(scores[b][valid]) <= 0), "scores are not sorted best first"
        assert np.all(np.isneginf(scores[b][~valid]))


def int_data(rng, b, n, d, lo=-3, hi=3):
    q = rng.integers(lo, hi + 1, size=(b, d)).astype(np.float32)
    x = rng.integers(lo, hi + 1, size=(n, d)).astype(np.float32)
    return q, x


@pytest.mark.parametrize("b,n,d,k", [(1, 1, 1, 1), (3, 300, 7, 5), (2, 1000, 16, 50), (5, 257, 17, 300),
                                     (70, 600, 33, 10), (4, 64, 15, 64), (1, 5000, 8, 100)])
def test_integer_scores_match_full_sort_exactly_including_ties(simd, rng, b, n, d, k):
    q, x = int_data(rng, b, n, d)
    res = topk(q, x, k)
    ref_ids, ref_scores, _ = reference(q, x, k)
    np.testing.assert_array_equal(res.ids, ref_ids)
    np.testing.assert_array_equal(res.scores, ref_scores.astype(np.float32))


@pytest.mark.parametrize("metric", ["ip", "cosine"])
@pytest.mark.parametrize("b,n,d,k", [(1, 2000, 64, 10), (8, 3000, 1, 7), (16, 1500, 23, 100), (33, 400, 1023, 5)])
def test_random_float_data_matches_reference(simd, rng, metric, b, n, d, k):
    q = rng.normal(size=(b, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    assert_topk_close(topk(q, x, k, metric=metric), q, x, k, metric)


def test_single_query_gives_1d_results_equal_to_batch_row(rng):
    q, x = int_data(rng, 4, 500, 9)
    batch = topk(q, x, 12)
    for b in range(4):
        one = topk(q[b], x, 12)
        assert one.ids.shape == (12,) and one.scores.shape == (12,)
        np.testing.assert_array_equal(one.ids, batch.ids[b])
        np.testing.assert_array_equal(one.scores, batch.scores[b])


def test_k_larger_than_corpus_returns_every_item(rng):
    q, x = int_data(rng, 3, 10, 4)
    res = topk(q, x, 1000)
    assert res.ids.shape == (3, 10)
    assert all(sorted(row) == list(range(10)) for row in res.ids.tolist())


def test_k_zero_and_empty_inputs_give_empty_results(rng):
    q, x = int_data(rng, 3, 10, 4)
    assert topk(q, x, 0).ids.shape == (3, 0)
    assert topk(q[:0], x, 5).ids.shape == (0, 5)
    empty = topk(q, x[:0], 5)
    assert empty.ids.shape == (3, 0) and empty.scores.dtype == np.float32


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_exclusion_skips_items_and_pads_with_minus_one(simd, rng, metric):
    q = rng.normal(size=(5, 16)).astype(np.float32)
    x = rng.normal(size=(40, 16)).astype(np.float32)
    exclude = [rng.choice(40, size=s, replace=False) for s in (0, 3, 20, 39, 40)]
    res = topk(q, x, 10, metric=metric, exclude=exclude)
    assert_topk_close(res, q, x, 10, metric, exclude=exclude)
    assert (res.ids[3, 1:] == -1).all() and res.ids[3, 0] >= 0
    assert (res.ids[4] == -1).all() and np.isneginf(res.scores[4]).all()


def test_exclusion_accepts_idlists_and_repeated_ids(rng):
    q, x = int_data(rng, 3, 50, 5)
    lists = [[1, 1, 2], [], [49, 0, 49]]
    a = topk(q, x, 8, exclude=lists)
    b = topk(q, x, 8, exclude=IdLists.from_lists(lists))
    np.testing.assert_array_equal(a.ids, b.ids)
    assert_topk_close(a, q, x, 8, exclude=lists)


def test_candidates_restrict_scoring_and_count_duplicates_once(simd, rng):
    q = rng.normal(size=(4, 24)).astype(np.float32)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    cands = [rng.integers(0, 300, size=s) for s in (50, 5, 0, 200)]
    cands[1] = np.array([7, 7, 7, 3, 3])
    res = topk(q, x, 10, candidates=cands)
    assert_topk_close(res, q, x, 10, candidates=cands)
    assert (res.ids[1, :2] >= 0).all() and (res.ids[1, 2:] == -1).all()
    assert (res.ids[2] == -1).all()


def test_candidates_with_exclusion_and_cosine(rng):
    q = rng.normal(size=(6, 10)).astype(np.float32)
    x = rng.normal(size=(100, 10)).astype(np.float32)
    cands = [rng.choice(100, 30, replace=False) for _ in range(6)]
    excl = [c[:10] for c in cands]
    for metric in ("ip", "cosine"):
        res = topk(q, x, 25, metric=metric, candidates=cands, exclude=excl)
        assert_topk_close(res, q, x, 25, metric, exclude=excl, candidates=cands)


def test_cosine_with_zero_vectors_scores_zero(rng):
    x = rng.normal(size=(20, 6)).astype(np.float32)
    x[3] = 0
    res = topk(np.zeros(6, np.float32), x, 20, metric="cosine")
    assert (res.scores == 0).all() and res.ids.tolist() == list(range(20))
    res = topk(x[5], x, 20, metric="cosine")
    assert res.scores[list(res.ids).index(3)] == 0
    assert res.ids[0] == 5 and res.scores[0] == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("b,n", [(1, 60000), (3, 60000), (64, 20000), (300, 5000), (2000, 300)])
def test_parallel_and_serial_runs_agree_bitwise(rng, b, n):
    """Item-split (small batches) and query-split (large batches) runs equal the serial run."""
    q = rng.normal(size=(b, 48)).astype(np.float32)
    x = rng.normal(size=(n, 48)).astype(np.float32)
    excl = [rng.choice(n, 50, replace=False) for _ in range(b)]
    serial = topk(q, x, 100, exclude=excl, num_threads=1)
    parallel = topk(q, x, 100, exclude=excl, num_threads=2)
    np.testing.assert_array_equal(serial.ids, parallel.ids)
    np.testing.assert_array_equal(serial.scores, parallel.scores)
    assert_topk_close(parallel, q, x, 100, exclude=excl)


def test_more_queries_than_one_selection_group(rng):
    q, x = int_data(rng, 1100, 300, 6)
    res = topk(q, x, 3)
    ref_ids, _, _ = reference(q, x, 3)
    np.testing.assert_array_equal(res.ids, ref_ids)


def test_scalar_and_simd_levels_agree(rng):
    q = rng.normal(size=(9, 37)).astype(np.float32)
    x = rng.normal(size=(2000, 37)).astype(np.float32)
    before = rec_engine.simd_level()
    results = {}
    try:
        for level in rec_engine.supported_simd_levels():
            rec_engine.set_simd_level(level)
            results[level] = topk(q, x, 20)
    finally:
        rec_engine.set_simd_level(before)
    base = results["scalar"]
    for level, res in results.items():
        np.testing.assert_allclose(res.scores, base.scores, rtol=1e-5, atol=1e-5, err_msg=level)


def test_inputs_are_not_modified(rng):
    q = rng.normal(size=(3, 8)).astype(np.float32)
    x = rng.normal(size=(100, 8)).astype(np.float32)
    excl = [np.array([5, 1, 3]), np.array([9]), np.array([], dtype=np.int64)]
    copies = (q.copy(), x.copy(), [e.copy() for e in excl])
    topk(q, x, 10, metric="cosine", exclude=excl, candidates=[np.arange(50)] * 3)
    np.testing.assert_array_equal(q, copies[0])
    np.testing.assert_array_equal(x, copies[1])
    for e, c in zip(excl, copies[2]):
        np.testing.assert_array_equal(e, c)


def test_other_dtypes_and_layouts_are_converted(rng):
    q = rng.normal(size=(3, 8))
    x = rng.normal(size=(100, 16))[:, ::2]  # float64, not contiguous
    res = topk(q, x, 5)
    assert_topk_close(res, q.astype(np.float32), x.astype(np.float32), 5)
    res_list = topk(q.tolist(), x, 5, exclude=[[1], [2], [3]])
    assert res_list.ids.shape == (3, 5)


# ---------------------------------------------------------------------------------------- bad input
@pytest.fixture
def data(rng):
    return rng.normal(size=(2, 8)).astype(np.float32), rng.normal(size=(30, 8)).astype(np.float32)


def test_negative_k_is_a_value_error(data):
    with pytest.raises(ValueError, match="k must be >= 0"):
        topk(*data, -1)


@pytest.mark.parametrize("k", [2.5, True, "3", None])
def test_non_integer_k_is_a_type_error(data, k):
    with pytest.raises(TypeError, match="k must be an integer"):
        topk(*data, k)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_query_is_rejected_with_its_position(data, bad):
    q, x = data
    q = q.copy()
    q[1, 3] = bad
    with pytest.raises(ValueError, match=r"queries\[1, 3\] is not finite"):
        topk(q, x, 5)


def test_nan_in_items_is_reported_not_ranked(data):
    q, x = data
    x = x.copy()
    x[17, 2] = np.nan
    with pytest.raises(ValueError, match="item 17 gives a NaN score"):
        topk(q, x, 5)
    with pytest.raises(ValueError, match="item 17"):
        topk(q, x, 5, candidates=[[17, 3], [1]])


def test_mismatched_dims_and_wrong_ndim_are_value_errors(data):
    q, x = data
    with pytest.raises(ValueError, match="dimension 8 but items have dimension 7"):
        topk(q, x[:, :7], 5)
    with pytest.raises(ValueError, match="1-D .* or 2-D"):
        topk(q.reshape(2, 2, 4), x, 5)
    with pytest.raises(ValueError, match="items must have 2 dimensions"):
        topk(q, x[0], 5)


def test_unknown_metric_is_a_value_error(data):
    with pytest.raises(ValueError, match="metric must be one of"):
        topk(*data, 5, metric="l2")


@pytest.mark.parametrize("bad_id,pos", [(30, 1), (-1, 1), (10**12, 1)])
def test_excluded_ids_out_of_range_name_query_and_position(data, bad_id, pos):
    with pytest.raises(IndexError, match=rf"exclude of query 1, position {pos}: item id {bad_id} is out of range for 30"):
        topk(*data, 5, exclude=[[0], [3, bad_id]])


def test_candidate_ids_out_of_range_are_index_errors(data):
    with pytest.raises(IndexError, match="candidates of query 0, position 0"):
        topk(*data, 5, candidates=[[99], [1]])


def test_exclusion_lists_must_match_query_count_and_be_integers(data):
    with pytest.raises(ValueError, match="exclude has 1 lists for 2 queries"):
        topk(*data, 5, exclude=[[1]])
    with pytest.raises(TypeError, match="integer ids"):
        topk(*data, 5, exclude=[[1.5], [2.0]])
    with pytest.raises(TypeError, match="sequence of 2 id lists"):
        topk(*data, 5, exclude=np.array([1, 2]))


def test_non_numeric_arrays_are_type_errors(data):
    q, x = data
    with pytest.raises(TypeError, match="queries must hold real numbers"):
        topk(q.astype(complex), x, 5)
    with pytest.raises(TypeError, match="items must hold real numbers"):
        topk(q, np.array([["a"] * 8]), 5)


def test_core_rejects_wrong_dtype_and_layout_without_copying(data):
    q, x = data
    with pytest.raises(TypeError, match="queries must be a C-contiguous float32 array, got float64"):
        _core.topk(q.astype(np.float64), x, 5)
    with pytest.raises(TypeError, match="items must be a C-contiguous float32 array, got .*not C-contiguous"):
        _core.topk(q, np.asfortranarray(x), 5)
    with pytest.raises(TypeError, match="exclude_ids must be a C-contiguous int64"):
        _core.topk(q, x, 5, "ip", np.array([0, 1, 1]), np.array([1], dtype=np.int32))


def test_malformed_idlists_are_value_errors():
    with pytest.raises(ValueError, match="non-decreasing"):
        IdLists([0, 2, 1, 3], [1, 2, 3])
    with pytest.raises(ValueError, match="start at 0 and end at len"):
        IdLists([0, 2], [1, 2, 3])


# ---------------------------------------------------------------------------------------- properties
@settings(max_examples=150, deadline=None)
@given(data=st.data(), b=st.integers(1, 5), n=st.integers(1, 80), d=st.integers(1, 20),
       k=st.integers(0, 90), with_exclude=st.booleans(), with_candidates=st.booleans())
def test_property_same_result_as_a_full_sort(data, b, n, d, k, with_exclude, with_candidates):
    ints = st.integers(-3, 3)
    q = np.array(data.draw(st.lists(ints, min_size=b * d, max_size=b * d)), np.float32).reshape(b, d)
    x = np.array(data.draw(st.lists(ints, min_size=n * d, max_size=n * d)), np.float32).reshape(n, d)
    id_list = st.lists(st.integers(0, n - 1), max_size=2 * n)
    exclude = [np.array(data.draw(id_list), np.int64) for _ in range(b)] if with_exclude else None
    candidates = [np.array(data.draw(id_list), np.int64) for _ in range(b)] if with_candidates else None
    res = topk(q, x, k, exclude=exclude, candidates=candidates)
    ref_ids, ref_scores, _ = reference(q, x, k, exclude=exclude, candidates=candidates)
    np.testing.assert_array_equal(res.ids, ref_ids)
    np.testing.assert_array_equal(res.scores, ref_scores.astype(np.float32))


# ------------------------------------------------------------------------------ floors from a sample
# Tables of at least 65,536 items and k >= 64 start each query's selection at a floor taken from a scored
# sample of the table (16 blocks of 128 items); a query whose selection does not fill above its floor is
# scanned again without one. These check that the answers stay exact whatever the sample looks like.
@pytest.mark.parametrize("b", [1, 2, 5, 40])
@pytest.mark.parametrize("k", [64, 500])
def test_large_k_on_a_large_table_is_exact(simd, rng, b, k):
    n, d = 70_000, 8
    q, x = int_data(rng, b, n, d, -4, 4)                          # integer scores: many ties at every floor
    excl = [rng.choice(n, int(rng.integers(0, 400)), replace=False) for _ in range(b)]
    for exclude in (None, excl):
        res = topk(q, x, k, exclude=exclude)
        ref_ids, ref_scores, _ = reference(q, x, k, exclude=exclude)
        np.testing.assert_array_equal(res.ids, ref_ids)
        np.testing.assert_array_equal(res.scores, ref_scores.astype(np.float32))


@pytest.mark.parametrize("order", ["ascending", "descending", "sample_blocks_best"])
def test_a_sample_that_overestimates_the_floor_falls_back_to_the_full_scan(rng, order):
    """Items ordered by their score, or the sampled blocks holding the best items: the floor lets fewer
    than k items in, and the query is scanned again without it (same answer as the plain reference)."""
    n, d, k = 66_000, 4, 300
    q = rng.normal(size=(3, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    s = x @ q[0]
    if order == "ascending":
        x = x[np.argsort(s, kind="stable")]
    elif order == "descending":
        x = x[np.argsort(-s, kind="stable")]
    else:       # the best items exactly where the sample looks: 16 blocks of 128 spread over the table
        best = np.argsort(-s, kind="stable")[:16 * 128]
        rest = np.setdiff1d(np.arange(n), best)
        x2 = x[rest].copy()
        out = np.empty_like(x)
        starts = [(n - 128) * blk // 15 for blk in range(16)]
        taken = np.zeros(n, bool)
        for blk, st0 in enumerate(starts):
            out[st0:st0 + 128] = x[best[blk * 128:(blk + 1) * 128]]
            taken[st0:st0 + 128] = True
        out[~taken] = x2[:(~taken).sum()]
        x = out
    for threads in (1, 2):
        assert_topk_close(topk(q, x, k, num_threads=threads), q, x, k)
        ref_ids, _, _ = reference(q, x, k)
        np.testing.assert_array_equal(topk(q[:1], x, k, num_threads=threads).ids, ref_ids[:1])
