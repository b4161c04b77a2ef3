"""ItemIndex(copy=False): an exact bf16 index that keeps no bf16 copy. A batch converts each panel of the
float32 items as its scan reaches it, then checks and re-scores its shortlists as the stored bf16 index does;
its ids and scores must equal the float32 scan's, bit for bit. Also the floors that the batches of a stored
int8 / bf16 index now start from over large tables.

The reference (test_item_index_exact.assert_exact) is the float32 scorer the re-scoring uses (``topk`` with every
item as a candidate: the packed FMA chain, the same sums as a batch's full scan)."""
from __future__ import annotations

import os

import numpy as np
import pytest

import rec_engine
from rec_engine import topk
from rec_engine.topk import ItemIndex
from test_item_index_exact import assert_exact, best_in_sampled_panels, clustered


def converts() -> bool:
    """Whether batches really scan converted bf16 panels here (avx512 with AVX512-BF16), not float32."""
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    return rec_engine.simd_level() == "avx512" and "avx512_bf16" in flags


@pytest.mark.parametrize("n,d", [(1, 3), (63, 8), (65, 17), (5000, 64), (4099, 33), (3000, 100), (70_000, 7)])
@pytest.mark.parametrize("nq", [1, 3, 4, 9, 70])
def test_screen_equals_the_float32_scan(simd, rng, n, d, nq):
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    ex = [rng.choice(n, min(n, 20), replace=False) for _ in range(nq)]
    idx = ItemIndex(x, "bf16", copy=False)
    assert idx.packed is None and idx.corr is None and idx.scale is None and not idx.copy
    assert "copy=False" in repr(idx) and idx.norm.shape == (n,)
    for k in (1, 10, 100, 500):
        assert_exact(q, idx, k, ex)


@pytest.mark.parametrize("nq", [4, 9])
def test_screen_shortlists_are_checked(rng, nq):
    # near-duplicate items with a shortlist of only k: no check can pass, every query is scanned again (which
    # shows that the batch was screened in bf16, not scanned in float32 outright), and the answer stays exact
    x = clustered(rng, 3000, 24)
    q = rng.normal(size=(nq, 24)).astype(np.float32)
    ex = [rng.choice(3000, 40, replace=False) for _ in range(nq)]
    for k in (1, 10, 100):
        idx = ItemIndex(x, "bf16", copy=False, shortlist=k)
        assert_exact(q, idx, k, ex)
        assert idx.rescans == (nq if converts() else 0) and idx.queries == nq


def test_screen_of_a_large_table_starts_at_floors_and_stays_exact(rng):
    # 65,536 items or more: the selections start at floors from 128 sampled panels, converted for the purpose.
    # The sampled panels are made to hold the first query's best items, so its floor lands far too high; its
    # check then fails and the query is scanned again
    n, d, nq = 70_000, 16, 8
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    ex = [rng.choice(n, 50, replace=False) for _ in range(nq)]
    for k in (16, 100, 300):
        assert_exact(q, ItemIndex(x, "bf16", copy=False), k, ex)
    idx2 = ItemIndex(best_in_sampled_panels(x, q[0]), "bf16", copy=False)
    for k in (16, 100, 300):
        assert_exact(q, idx2, k, ex)
    if converts():
        assert idx2.rescans >= 1


def test_more_queries_than_a_group_leave_a_short_last_group(rng):
    # 1,026 queries: a group of 1,024, then one of 2, which a stored index would stream from its copy; without
    # one it is scanned from converted panels too
    n, d = 70_000, 8
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(1026, d)).astype(np.float32)
    assert_exact(q, ItemIndex(x, "bf16", copy=False), 20, None)


def test_outsized_items_are_heavy_and_tiny_values_stay_exact(rng):
    x = rng.normal(size=(20000, 32)).astype(np.float32)
    x[1234] *= 100.0
    x[77] *= 30.0
    x[5:9] = 1e-39                     # subnormal values: the conversion flushes them to zero
    x[9, :3] = [1e-45, -1e-44, 2e-40]
    q = rng.normal(size=(12, 32)).astype(np.float32)
    q[3, :5] = 1e-40
    idx = ItemIndex(x, "bf16", copy=False)
    assert idx.heavy.tolist() == [77, 1234]
    ex = [np.array([1234])] + [np.zeros(0, np.int64)] * 11
    for k in (1, 10, 100):
        res = assert_exact(q, idx, k, ex)
        assert 1234 not in res.ids[0] and 1234 in res.ids[1:].ravel()
    assert idx.rescans == 0


def test_values_bf16_cannot_hold_take_the_float32_scan():
    # items near float32's limit round to inf in bf16: their norms send the batch to the float32 scan
    x = np.array([[3.397e38, 1], [0, .5], [1e30, 1e30], [0, 0], [-3e38, 2]], np.float32)
    q = np.array([[0, 1], [0, -1], [1e-30, 1], [1e-38, 1e-37]], np.float32)
    idx = ItemIndex(x, "bf16", copy=False, shortlist=2)
    with np.errstate(over="ignore", invalid="ignore"):
        assert_exact(q, idx, 1, None)
        assert_exact(q, idx, 3, [np.array([0]), np.array([1]), np.zeros(0, np.int64), np.array([4])])


def test_screen_errors(rng):
    x = rng.normal(size=(100, 8)).astype(np.float32)
    with pytest.raises(ValueError, match="copy=False"):
        ItemIndex(x, "int8", copy=False)
    with pytest.raises(ValueError, match="copy=False"):
        ItemIndex(x, "bf16", copy=False, exact=False)
    with pytest.raises(TypeError, match="copy"):
        ItemIndex(x, "bf16", copy="no")
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[40, 3] = bad
        with pytest.raises(ValueError, match="finite"):
            ItemIndex(y, "bf16", copy=False)
    idx = ItemIndex(x, "bf16", copy=False)
    with pytest.raises(ValueError):
        topk(rng.normal(size=(5, 7)).astype(np.float32), idx, 3)
    with pytest.raises(IndexError):
        topk(rng.normal(size=(5, 8)).astype(np.float32), idx, 3, exclude=[np.array([100])] + [np.zeros(0, np.int64)] * 4)
    with pytest.raises(ValueError):
        topk(np.full((5, 8), np.nan, np.float32), idx, 3)
    with pytest.raises(ValueError, match="int8 index needs"):
        rec_engine._core.topk_quantized(x[:5], x, None, None, None, "int8", 3, 10)


@pytest.mark.parametrize("precision", ["int8", "bf16"])
@pytest.mark.parametrize("nq", [4, 40])
def test_stored_index_batches_start_at_floors_and_stay_exact(rng, precision, nq):
    # a stored index's batch over 65,536 items or more: floors for its packed scan as well (no longer the
    # float32 scan for long shortlists)
    n, d = 70_000, 16
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    ex = [rng.choice(n, 50, replace=False) for _ in range(nq)]
    idx = ItemIndex(x, precision)
    for k in (16, 100, 300, 700):
        assert_exact(q, idx, k, ex)


def test_zero_dimension_items_and_numpy_bools():
    # d = 0: nothing to convert (every score 0, tied); exact=np.True_ is a bool like True
    x, q = np.zeros((10, 0), np.float32), np.zeros((5, 0), np.float32)
    idx = ItemIndex(x, "bf16", copy=False, exact=np.True_, shortlist=4)
    res = topk(q, idx, 3, exclude=[np.array([1])] + [np.zeros(0, np.int64)] * 4)
    assert res.ids.tolist() == [[0, 2, 3]] + [[0, 1, 2]] * 4 and (res.scores == 0).all()
    assert rec_engine._core.reduced_kernels("bf16") in (True, False)
    with pytest.raises(ValueError):
        rec_engine._core.reduced_kernels("fp8")


@pytest.mark.parametrize("copy", [True, False])
def test_long_shortlists_of_many_queries_are_scanned_in_groups(rng, copy):
    # 100 queries x a 100,000-item shortlist on 2 threads: 6.4 MB of selection entries a query, so the batch
    # is scanned in groups of ~40 queries (selections held at once: about 256 MB at most); the same answer
    n, d = 140_000, 4
    x = rng.normal(size=(n, d)).astype(np.float32)
    q = rng.normal(size=(100, d)).astype(np.float32)
    ex = [rng.choice(n, 10, replace=False) for _ in range(100)]
    idx = ItemIndex(x, "bf16", copy=copy, shortlist=100_000)
    res = topk(q, idx, 5, exclude=ex, num_threads=2)
    ref = topk(q, x, 5, exclude=ex, num_threads=2)     # (a batch: the packed path's sums, as the re-scoring's)
    np.testing.assert_array_equal(res.ids, ref.ids)
    np.testing.assert_array_equal(res.scores, ref.scores)
