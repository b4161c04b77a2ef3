"""Graph propagation: normalized_adjacency, spmm, propagate and CsrMatrix against SciPy/NumPy references.

Kernel results are checked at every SIMD level the CPU supports (the ``simd`` fixture).
"""
from __future__ import annotations


import numpy as np
import pytest
import scipy.sparse as sp

from rec_engine import CsrMatrix, normalized_adjacency, propagate, spmm
from rec_engine.graph import LightGCNFoldIn

DIMS = [1, 7, 16, 17, 64]
RTOL = 1e-5
ATOL = 1e-5


# ----------------------------------------------------------------------------- references
def ref_adjacency(users, items, n_users, n_items):
    """D^-1/2 A D^-1/2 of the deduplicated bipartite graph, as a float64 scipy CSR matrix."""
    u = np.asarray(users, dtype=np.int64)
    i = np.asarray(items, dtype=np.int64)
    r = sp.coo_matrix((np.ones(u.shape[0]), (u, i)), shape=(n_users, n_items)).tocsr()
    r.sum_duplicates()
    r.data[:] = 1.0  # repeated interactions count once
    a = sp.bmat([[sp.csr_matrix((n_users, n_users)), r], [r.T, sp.csr_matrix((n_items, n_items))]]).tocsr()
    deg = np.asarray(a.sum(axis=1)).ravel()
    inv = np.zeros_like(deg)
    inv[deg > 0] = 1.0 / np.sqrt(deg[deg > 0])
    d = sp.diags(inv)
    out = (d @ a @ d).tocsr()
    out.sort_indices()
    return out


def ref_propagate(a, x, n_layers, layer_weights=None):
    """sum_l w_l A^l x in float64 with a plain loop."""
    a = sp.csr_matrix(a, dtype=np.float64)
    e = np.asarray(x, dtype=np.float64)
    w = np.full(n_layers + 1, 1.0 / (n_layers + 1)) if layer_weights is None else \
        np.asarray(layer_weights, dtype=np.float64)
    out = w[0] * e
    for l in range(1, n_layers + 1):
        e = a @ e
        out = out + w[l] * e
    return out


def random_interactions(rng, n_users, n_items, n):
    return rng.integers(0, n_users, size=n), rng.integers(0, n_items, size=n)


def random_csr(rng, n_rows, n_cols, density, empty_rows=()):
    m = sp.random(n_rows, n_cols, density=density, format="csr", dtype=np.float32, random_state=rng)
    m.data[:] = rng.standard_normal(m.data.shape[0]).astype(np.float32)
    if len(empty_rows):
        m = m.tolil()
        for r in empty_rows:
            m.rows[r] = []
            m.data[r] = []
        m = m.tocsr()
    return m


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def assert_csr_matches(adj, ref):
    assert isinstance(adj, CsrMatrix)
    assert adj.shape == ref.shape
    assert adj.indptr.dtype == np.int64 and adj.indices.dtype == np.int32 and adj.data.dtype == np.float32
    np.testing.assert_array_equal(adj.indptr, ref.indptr)
    np.testing.assert_array_equal(adj.indices, ref.indices)
    np.testing.assert_allclose(adj.data, ref.data, rtol=1e-6, atol=0)


def assert_rows_sorted(adj):
    for r in range(adj.shape[0]):
        cols = adj.indices[adj.indptr[r]:adj.indptr[r + 1]]
        assert (np.diff(cols) > 0).all(), f"row {r} is not strictly sorted: {cols}"


# ----------------------------------------------------------------------------- normalized_adjacency
def test_normalized_adjacency_matches_dense_numpy_reference(rng):
    n_users, n_items = 6, 9
    users, items = random_interactions(rng, n_users, n_items, 25)
    adj = normalized_adjacency(users, items, n_users, n_items)
    n = n_users + n_items
    dense = np.zeros((n, n))
    dense[users, n_users + items] = 1.0
    dense[n_users + items, users] = 1.0
    deg = dense.sum(axis=1)
    inv = np.where(deg > 0, 1.0 / np.sqrt(np.where(deg > 0, deg, 1.0)), 0.0)
    expected = inv[:, None] * dense * inv[None, :]
    np.testing.assert_allclose(adj.to_scipy().toarray(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("sizes", [(1, 1, 1), (5, 7, 20), (40, 30, 300), (200, 150, 2000)])
def test_normalized_adjacency_matches_scipy_reference(rng, sizes):
    n_users, n_items, n = sizes
    users, items = random_interactions(rng, n_users, n_items, n)
    adj = normalized_adjacency(users, items, n_users, n_items)
    assert_csr_matches(adj, ref_adjacency(users, items, n_users, n_items))


def test_repeated_interactions_count_once(rng):
    users = np.array([0, 0, 0, 1, 1, 2])
    items = np.array([1, 1, 1, 0, 1, 1])
    adj = normalized_adjacency(users, items, 3, 2)
    assert_csr_matches(adj, ref_adjacency(users, items, 3, 2))
    assert adj.nnz == 2 * 4  # 4 distinct edges, both directions
    m = adj.to_scipy()
    # user 0 has degree 1 (item 1 counted once), item 1 (node 3 + 1) has degree 3 (users 0, 1, 2).
    np.testing.assert_allclose(m[0, 4], 1 / np.sqrt(1 * 3), rtol=1e-6)
    np.testing.assert_allclose(m[4, 0], 1 / np.sqrt(3 * 1), rtol=1e-6)
    dup = normalized_adjacency(np.tile(users, 5), np.tile(items, 5), 3, 2)
    np.testing.assert_array_equal(dup.indptr, adj.indptr)
    np.testing.assert_array_equal(dup.indices, adj.indices)
    np.testing.assert_array_equal(dup.data, adj.data)


def test_nodes_without_edges_have_empty_rows(rng):
    n_users, n_items = 10, 12
    users = np.array([0, 2, 2, 5, 9])
    items = np.array([1, 1, 3, 11, 3])
    adj = normalized_adjacency(users, items, n_users, n_items)
    assert_csr_matches(adj, ref_adjacency(users, items, n_users, n_items))
    row_len = np.diff(adj.indptr)
    lonely_users = sorted(set(range(n_users)) - set(users.tolist()))
    lonely_items = sorted(set(range(n_items)) - set(items.tolist()))
    assert (row_len[lonely_users] == 0).all()
    assert (row_len[[n_users + i for i in lonely_items]] == 0).all()
    assert (row_len[users] > 0).all() and (row_len[n_users + items] > 0).all()
    # no column refers to a lonely node either
    assert not np.isin(adj.indices, lonely_users + [n_users + i for i in lonely_items]).any()


def test_sizes_default_to_max_id_plus_one(rng):
    users, items = np.array([0, 4, 2]), np.array([6, 0, 3])
    adj = normalized_adjacency(users, items)
    assert adj.shape == (5 + 7, 5 + 7)
    assert_csr_matches(adj, ref_adjacency(users, items, 5, 7))


def test_no_interactions_give_an_all_empty_matrix():
    adj = normalized_adjacency(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 3, 4)
    assert adj.shape == (7, 7) and adj.nnz == 0
    np.testing.assert_array_equal(adj.indptr, np.zeros(8, dtype=np.int64))
    empty = normalized_adjacency([], [])
    assert empty.shape == (0, 0) and empty.nnz == 0


@pytest.mark.parametrize("user_dtype,item_dtype", [(np.int64, np.int64), (np.int32, np.int64),
                                                   (np.int64, np.int32), (np.uint16, np.int64)])
def test_int64_and_mixed_id_dtypes_give_the_reference_adjacency(rng, user_dtype, item_dtype):
    users, items = random_interactions(rng, 30, 40, 200)
    adj = normalized_adjacency(users.astype(user_dtype), items.astype(item_dtype), 30, 40)
    assert_csr_matches(adj, ref_adjacency(users, items, 30, 40))


def test_int32_ids_give_the_same_adjacency_as_int64(rng):
    users, items = random_interactions(rng, 30, 40, 200)
    u32, i32 = users.astype(np.int32), items.astype(np.int32)
    adj = normalized_adjacency(u32, i32, 30, 40)
    assert_csr_matches(adj, ref_adjacency(users, items, 30, 40))
    np.testing.assert_array_equal(u32, users.astype(np.int32))  # inputs untouched
    with pytest.raises(IndexError, match=r"users\[1\]"):
        normalized_adjacency(np.array([0, 5], np.int32), np.array([0, 0], np.int32), 3, 2)
    with pytest.raises(IndexError, match=r"items\[1\]"):
        normalized_adjacency(np.array([0, 0], np.int32), np.array([0, -1], np.int32), 3, 2)


def test_adjacency_is_symmetric_with_sorted_rows_and_bipartite(rng):
    n_users, n_items = 50, 70
    users, items = random_interactions(rng, n_users, n_items, 400)
    adj = normalized_adjacency(users, items, n_users, n_items)
    assert adj.shape == (n_users + n_items, n_users + n_items)
    m = adj.to_scipy()
    assert abs(m - m.T).max() == 0.0
    assert_rows_sorted(adj)
    dense = m.toarray()
    assert (dense[:n_users, :n_users] == 0).all() and (dense[n_users:, n_users:] == 0).all()
    assert (adj.data > 0).all() and (adj.data <= 1).all()


def test_normalized_adjacency_on_large_graph_runs_parallel_and_matches_scipy(rng):
    n_users, n_items = 3000, 5000
    users, items = random_interactions(rng, n_users, n_items, 60000)
    adj = normalized_adjacency(users, items, n_users, n_items)
    ref = ref_adjacency(users, items, n_users, n_items)
    assert_csr_matches(adj, ref)
    serial = normalized_adjacency(users, items, n_users, n_items, num_threads=1)
    np.testing.assert_array_equal(serial.indptr, adj.indptr)
    np.testing.assert_array_equal(serial.indices, adj.indices)
    np.testing.assert_array_equal(serial.data, adj.data)


# ----------------------------------------------------------------------------- CsrMatrix
def test_csr_from_scipy_and_back_round_trips_without_sharing(rng):
    m = random_csr(rng, 9, 13, 0.3).astype(np.float64)
    c = CsrMatrix.from_scipy(m)
    assert c.shape == (9, 13) and c.nnz == m.nnz
    assert c.indptr.dtype == np.int64 and c.indices.dtype == np.int32 and c.data.dtype == np.float32
    back = c.to_scipy()
    np.testing.assert_array_equal(back.toarray(), m.toarray().astype(np.float32))
    assert not np.shares_memory(back.data, c.data)
    assert not np.shares_memory(back.indices, c.indices)
    assert not np.shares_memory(back.indptr, c.indptr)


@pytest.mark.parametrize("fmt", ["coo", "csc", "lil", "dok"])
def test_csr_from_any_scipy_format(rng, fmt):
    m = random_csr(rng, 8, 5, 0.4)
    c = CsrMatrix.from_scipy(m.asformat(fmt))
    np.testing.assert_array_equal(c.to_scipy().toarray(), m.toarray())


# ----------------------------------------------------------------------------- spmm
SHAPES = [(1, 1), (7, 15), (33, 17), (16, 16), (100, 3), (3, 100), (64, 200)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", DIMS)
def test_spmm_matches_scipy(simd, rng, shape, dim):
    n_rows, n_cols = shape
    empty = [0, n_rows - 1] if n_rows > 2 else []
    m = random_csr(rng, n_rows, n_cols, 0.3, empty_rows=empty)
    x = rng.standard_normal((n_cols, dim)).astype(np.float32)
    expected = m.astype(np.float64) @ x.astype(np.float64)
    out = spmm(CsrMatrix.from_scipy(m), x)
    assert_close(out, expected)
    for r in empty:
        np.testing.assert_array_equal(out[r], 0.0)


@pytest.mark.parametrize("kind", ["csr_matrix", "csr_array", "coo_matrix", "csc_matrix"])
def test_spmm_accepts_scipy_sparse_directly(simd, rng, kind):
    m = random_csr(rng, 20, 30, 0.2)
    x = rng.standard_normal((30, 17)).astype(np.float32)
    adj = getattr(sp, kind)(m)
    assert_close(spmm(adj, x), m.astype(np.float64) @ x.astype(np.float64))


def test_matmul_operator_equals_spmm(simd, rng):
    m = random_csr(rng, 25, 18, 0.25)
    x = rng.standard_normal((18, 33)).astype(np.float32)
    adj = CsrMatrix.from_scipy(m)
    out = adj @ x
    assert_close(out, m.astype(np.float64) @ x.astype(np.float64))
    np.testing.assert_array_equal(out, spmm(adj, x))


def test_spmm_with_unsorted_and_duplicate_columns_sums_entries(simd, rng):
    # A hand-made CSR with columns out of order and a repeated column within a row.
    indptr = np.array([0, 3, 3, 5], dtype=np.int64)
    indices = np.array([2, 0, 2, 1, 0], dtype=np.int32)
    data = np.array([1.5, -2.0, 0.5, 3.0, 1.0], dtype=np.float32)
    adj = CsrMatrix(indptr, indices, data, (3, 3))
    x = rng.standard_normal((3, 17)).astype(np.float32)
    expected = sp.csr_matrix((data.astype(np.float64), indices, indptr), shape=(3, 3)) @ x.astype(np.float64)
    assert_close(spmm(adj, x), expected)


def test_spmm_converts_float64_and_non_contiguous_dense(simd, rng):
    m = random_csr(rng, 12, 10, 0.3)
    x64 = rng.standard_normal((10, 34))
    expected = m.astype(np.float64) @ x64[:, ::2].astype(np.float32).astype(np.float64)
    assert_close(spmm(m, x64[:, ::2]), expected)
    assert_close(spmm(m, np.asfortranarray(x64.astype(np.float32))),
                 m.astype(np.float64) @ x64.astype(np.float32).astype(np.float64))


def test_spmm_with_zero_rows_columns_or_dim_gives_right_shapes(rng):
    x = rng.standard_normal((5, 7)).astype(np.float32)
    out = spmm(sp.csr_matrix((0, 5), dtype=np.float32), x)
    assert out.shape == (0, 7)
    out = spmm(sp.csr_matrix((4, 0), dtype=np.float32), np.zeros((0, 7), dtype=np.float32))
    assert out.shape == (4, 7)
    np.testing.assert_array_equal(out, 0.0)
    m = random_csr(rng, 4, 5, 0.5)
    out = spmm(m, np.zeros((5, 0), dtype=np.float32))
    assert out.shape == (4, 0)


def test_spmm_all_empty_rows_give_zeros(simd, rng):
    m = sp.csr_matrix((6, 4), dtype=np.float32)
    x = rng.standard_normal((4, 17)).astype(np.float32)
    out = spmm(m, x)
    assert out.shape == (6, 17)
    np.testing.assert_array_equal(out, 0.0)


def test_spmm_on_large_graph_runs_parallel_and_matches_scipy(simd, rng):
    n_users, n_items = 3000, 5000
    users, items = random_interactions(rng, n_users, n_items, 60000)
    adj = normalized_adjacency(users, items, n_users, n_items)
    x = rng.standard_normal((n_users + n_items, 64)).astype(np.float32)
    ref = ref_adjacency(users, items, n_users, n_items)
    out = spmm(adj, x)
    assert_close(out, ref @ x.astype(np.float64))
    np.testing.assert_array_equal(out, spmm(adj, x, num_threads=1))
    rect = random_csr(rng, 4000, 3000, 0.005)
    y = rng.standard_normal((3000, 33)).astype(np.float32)
    assert_close(spmm(rect, y), rect.astype(np.float64) @ y.astype(np.float64))


# ----------------------------------------------------------------------------- propagate
@pytest.fixture
def small_graph(rng):
    n_users, n_items = 20, 30
    users, items = random_interactions(rng, n_users, n_items, 120)
    users[:2] = 19  # keep the last user connected
    adj = normalized_adjacency(users, items, n_users, n_items)
    return adj, ref_adjacency(users, items, n_users, n_items)


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
@pytest.mark.parametrize("dim", DIMS)
def test_propagate_default_is_mean_of_layers_like_reference_loop(simd, rng, small_graph, n_layers, dim):
    adj, ref = small_graph
    x = rng.standard_normal((adj.shape[0], dim)).astype(np.float32)
    out = propagate(adj, x, n_layers)
    assert_close(out, ref_propagate(ref, x, n_layers))


@pytest.mark.parametrize("n_layers", [1, 2, 3, 4])
def test_propagate_with_custom_layer_weights_matches_reference_loop(simd, rng, small_graph, n_layers):
    adj, ref = small_graph
    x = rng.standard_normal((adj.shape[0], 17)).astype(np.float32)
    w = rng.uniform(-1.0, 2.0, size=n_layers + 1)
    out = propagate(adj, x, n_layers, layer_weights=w)
    assert_close(out, ref_propagate(ref, x, n_layers, w.astype(np.float32)))


def test_propagate_default_has_three_layers(simd, rng, small_graph):
    adj, ref = small_graph
    x = rng.standard_normal((adj.shape[0], 16)).astype(np.float32)
    assert_close(propagate(adj, x), ref_propagate(ref, x, 3))


def test_propagate_with_zero_layers_returns_weighted_input(simd, rng, small_graph):
    adj, _ = small_graph
    x = rng.standard_normal((adj.shape[0], 17)).astype(np.float32)
    np.testing.assert_array_equal(propagate(adj, x, 0), x)
    out = propagate(adj, x, 0, layer_weights=[0.25])
    assert_close(out, 0.25 * x.astype(np.float64))


def test_propagate_only_last_layer_weight_equals_repeated_spmm(simd, rng, small_graph):
    adj, _ = small_graph
    x = rng.standard_normal((adj.shape[0], 33)).astype(np.float32)
    out = propagate(adj, x, 2, layer_weights=[0.0, 0.0, 1.0])
    assert_close(out, spmm(adj, spmm(adj, x)).astype(np.float64))


def test_propagate_accepts_scipy_sparse_adjacency(simd, rng):
    m = random_csr(rng, 40, 40, 0.1, empty_rows=[3, 39])
    x = rng.standard_normal((40, 7)).astype(np.float32)
    assert_close(propagate(m, x, 2), ref_propagate(m, x, 2))
    assert_close(propagate(sp.csr_array(m), x, 2), ref_propagate(m, x, 2))


def test_propagate_on_large_graph_runs_parallel_and_matches_reference(simd, rng):
    n_users, n_items = 3000, 5000
    users, items = random_interactions(rng, n_users, n_items, 60000)
    adj = normalized_adjacency(users, items, n_users, n_items)
    ref = ref_adjacency(users, items, n_users, n_items)
    x = (0.1 * rng.standard_normal((n_users + n_items, 64))).astype(np.float32)
    out = propagate(adj, x, 3)
    assert_close(out, ref_propagate(ref, x, 3))
    np.testing.assert_array_equal(out, propagate(adj, x, 3, num_threads=1))


def test_propagate_on_empty_graph_returns_first_weight_times_input(simd, rng):
    adj = normalized_adjacency(np.array([], dtype=np.int64), np.array([], dtype=np.int64), 4, 5)
    x = rng.standard_normal((9, 7)).astype(np.float32)
    assert_close(propagate(adj, x, 3), x.astype(np.float64) / 4)


# ----------------------------------------------------------------------------- bad input
def _csr(indptr, indices, data, shape):
    return CsrMatrix(np.asarray(indptr, dtype=np.int64), np.asarray(indices, dtype=np.int32),
                     np.asarray(data, dtype=np.float32), shape)


@pytest.mark.parametrize("bad", [3, 100, -1])
def test_csr_column_out_of_range_raises_index_error(bad):
    adj = _csr([0, 2, 3], [0, bad, 1], [1, 1, 1], (2, 3))
    with pytest.raises(IndexError, match=r"indices\[1\]"):
        spmm(adj, np.ones((3, 4), dtype=np.float32))
    square = _csr([0, 2, 3, 3], [0, bad, 1], [1, 1, 1], (3, 3))
    with pytest.raises(IndexError, match=r"indices\[1\]"):
        propagate(square, np.ones((3, 4), dtype=np.float32), 2)


def test_decreasing_indptr_raises_value_error():
    adj = _csr([0, 2, 1, 3], [0, 1, 2], [1, 1, 1], (3, 3))
    with pytest.raises(ValueError, match="indptr"):
        spmm(adj, np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="indptr"):
        propagate(adj, np.ones((3, 4), dtype=np.float32), 1)


def test_indptr_not_starting_at_zero_raises_value_error():
    adj = _csr([1, 2, 3], [0, 1, 2], [1, 1, 1], (2, 3))
    with pytest.raises(ValueError):
        spmm(adj, np.ones((3, 4), dtype=np.float32))


def test_indptr_end_not_matching_stored_values_raises_value_error():
    adj = _csr([0, 1, 5], [0, 1, 2], [1, 1, 1], (2, 3))
    with pytest.raises(ValueError):
        spmm(adj, np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="same length"):  # caught when the CsrMatrix is built
        adj = _csr([0, 1, 3], [0, 1, 2], [1, 1], (2, 3))
        spmm(adj, np.ones((3, 4), dtype=np.float32))


def test_propagate_with_non_square_adjacency_raises_value_error(rng):
    m = random_csr(rng, 5, 6, 0.5)
    with pytest.raises(ValueError, match="square"):
        propagate(m, np.ones((5, 4), dtype=np.float32), 2)
    with pytest.raises(ValueError, match="square"):
        propagate(m, np.ones((6, 4), dtype=np.float32), 2)


@pytest.mark.parametrize("rows", [4, 6, 0])
def test_embeddings_rows_mismatch_raises_value_error(rng, rows):
    m = random_csr(rng, 5, 5, 0.5)
    with pytest.raises(ValueError):
        propagate(m, np.ones((rows, 3), dtype=np.float32), 2)
    with pytest.raises(ValueError):
        spmm(m, np.ones((rows, 3), dtype=np.float32))


@pytest.mark.parametrize("shape", [(5,), (5, 3, 1)])
def test_dense_of_wrong_ndim_raises_value_error(rng, shape):
    m = random_csr(rng, 5, 5, 0.5)
    with pytest.raises(ValueError):
        spmm(m, np.ones(shape, dtype=np.float32))
    with pytest.raises(ValueError):
        propagate(m, np.ones(shape, dtype=np.float32), 1)


@pytest.mark.parametrize("n_weights", [1, 2, 4, 5])
def test_layer_weights_of_wrong_length_raise_value_error(rng, small_graph, n_weights):
    adj, _ = small_graph
    x = np.ones((adj.shape[0], 3), dtype=np.float32)
    with pytest.raises(ValueError, match="layer_weights"):
        propagate(adj, x, 2, layer_weights=np.ones(n_weights))


def test_layer_weights_of_wrong_ndim_raise_value_error(small_graph):
    adj, _ = small_graph
    with pytest.raises(ValueError):
        propagate(adj, np.ones((adj.shape[0], 3), dtype=np.float32), 1, layer_weights=np.ones((2, 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_layer_weight_raises_value_error(small_graph, bad):
    adj, _ = small_graph
    with pytest.raises(ValueError, match=r"layer_weights\[1\]"):
        propagate(adj, np.ones((adj.shape[0], 3), dtype=np.float32), 2, layer_weights=[0.5, bad, 0.5])


@pytest.mark.parametrize("n_layers,exc", [(-1, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)])
def test_bad_n_layers_raises(small_graph, n_layers, exc):
    adj, _ = small_graph
    with pytest.raises(exc):
        propagate(adj, np.ones((adj.shape[0], 3), dtype=np.float32), n_layers)


def test_users_or_items_out_of_range_raise_index_error():
    with pytest.raises(IndexError, match=r"users\[2\]"):
        normalized_adjacency(np.array([0, 1, 3]), np.array([0, 1, 1]), 3, 2)
    with pytest.raises(IndexError, match=r"items\[1\]"):
        normalized_adjacency(np.array([0, 1, 2]), np.array([0, 2, 1]), 3, 2)
    with pytest.raises(IndexError, match=r"users\[0\]"):
        normalized_adjacency(np.array([-1, 1]), np.array([0, 1]), 3, 2)
    with pytest.raises(IndexError, match=r"items\[1\]"):
        normalized_adjacency(np.array([0, 1]), np.array([0, -5]), 3, 2)


def test_users_and_items_of_different_length_raise_value_error():
    with pytest.raises(ValueError):
        normalized_adjacency(np.array([0, 1, 2]), np.array([0, 1]), 3, 2)


@pytest.mark.parametrize("users", [np.array([0.0, 1.0]), np.array([True, False]), ["a", "b"]])
def test_non_integer_user_ids_raise_type_error(users):
    with pytest.raises(TypeError):
        normalized_adjacency(users, np.array([0, 1]), 3, 2)
    with pytest.raises(TypeError):
        normalized_adjacency(np.array([0, 1]), users, 3, 2)


def test_negative_size_raises_value_error():
    with pytest.raises(ValueError, match="n_users"):
        normalized_adjacency([0, 1], [0, 0], -1, 1)
    with pytest.raises(ValueError, match="n_items"):
        normalized_adjacency([0, 1], [0, 0], 2, -1)


@pytest.mark.parametrize("size", [2.0, True, "2"])
def test_non_integer_size_raises_type_error(size):
    with pytest.raises(TypeError):
        normalized_adjacency([0, 1], [0, 0], size, 1)


def test_two_dimensional_ids_raise_value_error():
    with pytest.raises(ValueError):
        normalized_adjacency(np.zeros((2, 2), dtype=np.int64), np.zeros((2, 2), dtype=np.int64), 1, 1)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, object, np.bool_])
def test_dense_of_non_real_dtype_raises_type_error(rng, dtype):
    m = random_csr(rng, 4, 4, 0.5)
    x = np.ones((4, 3), dtype=dtype)
    with pytest.raises(TypeError):
        spmm(m, x)
    with pytest.raises(TypeError):
        propagate(m, x, 1)


@pytest.mark.parametrize("adj", [np.eye(3, dtype=np.float32), [[1.0, 0.0], [0.0, 1.0]], None, "csr"])
def test_non_sparse_adjacency_raises_type_error(adj):
    x = np.ones((3, 2), dtype=np.float32)
    with pytest.raises(TypeError):
        spmm(adj, x)
    with pytest.raises(TypeError):
        propagate(adj, x, 1)


# ----------------------------------------------------------------------------- inputs untouched
def test_input_arrays_are_unchanged_after_calls(simd, rng):
    users = rng.integers(0, 40, size=300)  # int32 ids are checked in a child process (see above)
    items = rng.integers(0, 60, size=300)
    u0, i0 = users.copy(), items.copy()
    adj = normalized_adjacency(users, items, 40, 60)
    np.testing.assert_array_equal(users, u0)
    np.testing.assert_array_equal(items, i0)
    parts = (adj.indptr.copy(), adj.indices.copy(), adj.data.copy())
    x = rng.standard_normal((100, 17)).astype(np.float32)
    w = np.array([0.4, 0.3, 0.2, 0.1], dtype=np.float32)
    x0, w0 = x.copy(), w.copy()
    spmm(adj, x)
    adj @ x
    propagate(adj, x, 3)
    propagate(adj, x, 3, layer_weights=w)
    np.testing.assert_array_equal(x, x0)
    np.testing.assert_array_equal(w, w0)
    for a, b in zip((adj.indptr, adj.indices, adj.data), parts):
        np.testing.assert_array_equal(a, b)
    m = random_csr(rng, 30, 30, 0.2)
    m0 = m.copy()
    y = rng.standard_normal((30, 7)).astype(np.float32)
    spmm(m, y)
    propagate(m, y, 2)
    np.testing.assert_array_equal(m.indptr, m0.indptr)
    np.testing.assert_array_equal(m.indices, m0.indices)
    np.testing.assert_array_equal(m.data, m0.data)


def test_results_are_fresh_arrays(rng, small_graph):
    adj, _ = small_graph
    x = rng.standard_normal((adj.shape[0], 7)).astype(np.float32)
    for out in (spmm(adj, x), propagate(adj, x, 0), propagate(adj, x, 2)):
        assert out.dtype == np.float32 and out.flags.c_contiguous and out.flags.writeable
        assert not np.shares_memory(out, x)


def test_csr_matrix_whose_shape_disagrees_with_indptr_is_rejected():
    with pytest.raises(ValueError, match="indptr has 3 entries for 5 rows"):
        CsrMatrix(np.array([0, 1, 2], np.int64), np.array([0, 1], np.int32), np.ones(2, np.float32), (5, 3))
    with pytest.raises(TypeError, match="CsrMatrix.indices must be a 1-D C-contiguous int32"):
        CsrMatrix(np.array([0, 1, 2], np.int64), np.array([0, 1]), np.ones(2, np.float32), (2, 3))


# ------------------------------------------------------------ register-blocked row loops
@pytest.mark.parametrize("dim", [1, 9, 17, 63, 64, 65, 129])
@pytest.mark.parametrize("n_layers", [0, 1, 2, 3, 4])
def test_propagate_at_register_block_edges_matches_reference(simd, rng, dim, n_layers):
    users, items = random_interactions(rng, 40, 60, 500)
    adj = normalized_adjacency(users, items, 40, 60)
    x = rng.standard_normal((100, dim)).astype(np.float32)
    lw = rng.uniform(0.1, 1.0, n_layers + 1).astype(np.float32)
    got = propagate(adj, x, n_layers, lw)
    np.testing.assert_allclose(got, ref_propagate(adj.to_scipy(), x, n_layers, lw), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dim", [16, 64, 65])
def test_spmm_and_propagate_are_bit_identical_for_any_thread_count(simd, rng, dim):
    """Rows are split in nnz-balanced ranges over threads; each row is computed the same way."""
    users, items = random_interactions(rng, 3000, 4000, 60000)
    adj = normalized_adjacency(users, items, 3000, 4000)
    x = rng.standard_normal((7000, dim)).astype(np.float32)
    s1, p1 = spmm(adj, x, num_threads=1), propagate(adj, x, 3, num_threads=1)
    for nt in (2, 3, 5):
        np.testing.assert_array_equal(spmm(adj, x, num_threads=nt), s1)
        np.testing.assert_array_equal(propagate(adj, x, 3, num_threads=nt), p1)


def test_csr_transpose_equals_scipy_with_sorted_rows(rng):
    m = CsrMatrix.from_scipy(random_csr(rng, 40, 25, 0.2, empty_rows=(0, 7)))
    t = m.transpose()
    ref = m.to_scipy().T.tocsr()
    ref.sort_indices()
    assert t.shape == (25, 40)
    np.testing.assert_array_equal(t.indptr, ref.indptr)
    np.testing.assert_array_equal(t.indices, ref.indices)
    np.testing.assert_array_equal(t.data, ref.data)


@pytest.mark.parametrize("n_layers, layer_weights", [(3, None), (2, [0.5, 0.3, 0.2]), (1, None), (0, None)])
def test_lightgcn_fold_in_is_one_row_of_the_propagation(rng, n_layers, layer_weights):
    """A train user given its own items gets its propagated vector; a new user (or new edges) gets the row
    of a propagation over the graph with those edges added, the other nodes' layers kept."""
    n_users, n_items, d = 30, 20, 8
    users, items = random_interactions(rng, n_users, n_items, 150)
    users, items = np.concatenate([users, [5, 5]]), np.concatenate([items, items[:2]])      # repeats count once
    adj = normalized_adjacency(users, items, n_users, n_items)
    ego = rng.standard_normal((n_users + n_items, d)).astype(np.float32)
    fold = LightGCNFoldIn(adj, ego[:n_users], ego[n_users:], n_layers, layer_weights)
    full = propagate(adj, ego, n_layers, layer_weights)
    for u in (0, 5, 29):
        own = items[users == u]
        np.testing.assert_allclose(fold.user_vector(u, own), full[u], rtol=1e-5, atol=1e-6)
    # an unknown user with items [1, 2, 3]: the one-hop-exact layer 1 of a graph where it is a new node
    new = np.array([1, 2, 3, 3])
    adj2 = ref_adjacency(np.concatenate([users, [n_users] * 4]), np.concatenate([items, new]), n_users + 1, n_items)
    ego2 = np.concatenate([ego[:n_users], np.zeros((1, d), np.float32), ego[n_users:]])
    layer1 = (adj2 @ ego2)[n_users]
    got = fold.user_vector(-1, new)
    w = np.full(n_layers + 1, 1 / (n_layers + 1)) if layer_weights is None else np.asarray(layer_weights)
    if n_layers == 1:
        np.testing.assert_allclose(got, w[1] * layer1, rtol=1e-5, atol=1e-6)
    assert got.shape == (d,) and got.dtype == np.float32
    with pytest.raises(ValueError, match="layer_weights"):
        LightGCNFoldIn(adj, ego[:n_users], ego[n_users:], 2, [1.0])
