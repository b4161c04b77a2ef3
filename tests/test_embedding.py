"""EmbeddingTable: gather and bag pooling over float32, float16 and row-wise int8 storage.

Every kernel result is checked against an independent reference (a NumPy loop in float64, or
torch.nn.functional.embedding_bag) at every SIMD level the CPU supports (the ``simd`` fixture).
"""
from __future__ import annotations

import mmap

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rec_engine import EmbeddingTable

DIMS = [1, 7, 8, 15, 16, 17, 33, 1023]   # (8 and 16: one vector a row at avx2 and avx512)
STORAGES = ["float32", "float16", "int8"]
MODES = ["sum", "mean", "max"]
RTOL = 1e-5
ATOL = 1e-5


# ----------------------------------------------------------------------------- helpers
def random_weights(rng, rows, dim):
    return rng.standard_normal((rows, dim)).astype(np.float32)


def make_table(w, storage):
    """A table of ``w`` stored as ``storage`` and the float64 values it holds, computed in NumPy."""
    if storage == "float32":
        return EmbeddingTable(w), w.astype(np.float64)
    if storage == "float16":
        w16 = w.astype(np.float16)
        return EmbeddingTable(w16), w16.astype(np.float64)
    table = EmbeddingTable.quantize(w, "int8")
    return table, dequantize(table.weights, table.scale_bias)


def dequantize(codes, scale_bias):
    sb = scale_bias.astype(np.float64)
    return sb[:, :1] * codes.astype(np.float64) + sb[:, 1:2]


def random_bags(rng, n_rows, n_bags, max_len, *, allow_empty=True):
    """Variable-length bags: (indices int64, offsets of n_bags entries, offsets of n_bags + 1 entries)."""
    lo = 0 if allow_empty else 1
    lengths = rng.integers(lo, max_len + 1, size=n_bags)
    if allow_empty and n_bags >= 3:
        lengths[[0, n_bags // 2, n_bags - 1]] = 0  # empty bags at the start, middle and end
    full = np.zeros(n_bags + 1, dtype=np.int64)
    np.cumsum(lengths, out=full[1:])
    indices = rng.integers(0, n_rows, size=int(full[-1])).astype(np.int64)
    return indices, full[:-1].copy(), full


def ref_pool(values, indices, full_offsets, mode, psw=None):
    """embedding_bag in float64 with a plain loop; empty bags give zeros in every mode."""
    n_bags = len(full_offsets) - 1
    out = np.zeros((n_bags, values.shape[1]), dtype=np.float64)
    for b in range(n_bags):
        lo, hi = int(full_offsets[b]), int(full_offsets[b + 1])
        if hi == lo:
            continue
        rows = values[indices[lo:hi]]
        if psw is not None:
            rows = rows * np.asarray(psw[lo:hi], dtype=np.float64)[:, None]
        if mode == "sum":
            out[b] = rows.sum(axis=0)
        elif mode == "mean":
            out[b] = rows.mean(axis=0)
        else:
            out[b] = rows.max(axis=0)
    return out


def torch_bag(values, indices, offsets=None, mode="sum", psw=None, include_last_offset=False):
    """torch.nn.functional.embedding_bag on copies of the inputs (float64 weights)."""
    weight = torch.from_numpy(np.array(values, dtype=np.float64))
    inp = torch.from_numpy(np.array(indices, dtype=np.int64))
    offs = None if offsets is None else torch.from_numpy(np.array(offsets, dtype=np.int64))
    w = None if psw is None else torch.from_numpy(np.array(psw, dtype=np.float64))
    out = F.embedding_bag(inp, weight, offs, mode=mode, per_sample_weights=w,
                          include_last_offset=include_last_offset)
    return out.numpy()


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    assert actual.dtype == np.float32
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- gather
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dim", DIMS)
def test_gather_returns_the_stored_rows_for_every_storage_and_dim(simd, rng, storage, dim):
    w = random_weights(rng, 50, dim)
    table, values = make_table(w, storage)
    ids = rng.integers(0, 50, size=37)
    ids[:3] = [0, 49, 0]  # first and last row, and a repeat
    out = table.gather(ids)
    assert_close(out, values[ids])


@pytest.mark.parametrize("storage", STORAGES)
def test_gather_large_batch_uses_parallel_path_and_matches_reference(simd, rng, storage):
    w = random_weights(rng, 3000, 64)
    table, values = make_table(w, storage)
    ids = rng.integers(0, 3000, size=6000)
    out = table.gather(ids)
    assert_close(out, values[ids])
    np.testing.assert_array_equal(out, table.gather(ids, num_threads=1))


def test_gather_float32_is_bit_exact_copy_of_rows(simd, rng):
    w = random_weights(rng, 40, 17)
    ids = rng.integers(0, 40, size=100)
    np.testing.assert_array_equal(EmbeddingTable(w).gather(ids), w[ids])


def test_float16_gather_equals_float16_values_upcast_exactly(simd, rng):
    w16 = random_weights(rng, 40, 33).astype(np.float16)
    w16[0, :4] = [np.float16(6.0e-8), np.float16(-6.1e-5), np.float16(65504.0), np.float16(0.0)]  # subnormal, max
    ids = np.arange(40)
    np.testing.assert_array_equal(EmbeddingTable(w16).gather(ids), w16.astype(np.float32))


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_gather_accepts_int32_and_int64_ids_with_same_result(simd, rng, id_dtype):
    w = random_weights(rng, 20, 7)
    ids = rng.integers(0, 20, size=15).astype(id_dtype)
    np.testing.assert_array_equal(EmbeddingTable(w).gather(ids), w[ids.astype(np.int64)])


@pytest.mark.parametrize("id_dtype", [np.int8, np.uint8, np.int16, np.uint16, np.uint32, np.uint64])
def test_gather_widens_other_integer_id_dtypes(rng, id_dtype):
    w = random_weights(rng, 20, 7)
    ids = np.array([0, 19, 3, 3], dtype=id_dtype)
    np.testing.assert_array_equal(EmbeddingTable(w).gather(ids), w[ids.astype(np.int64)])


@pytest.mark.parametrize("shape", [(3, 4), (2, 3, 5), (1,), (0, 4)])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_gather_keeps_the_shape_of_ids(simd, rng, shape, id_dtype):
    w = random_weights(rng, 30, 15)
    ids = rng.integers(0, 30, size=shape).astype(id_dtype)
    out = EmbeddingTable(w).gather(ids)
    assert out.shape == shape + (15,)
    np.testing.assert_array_equal(out, w[ids])


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_gather_of_a_scalar_id_returns_one_row_of_shape_dim(rng, id_dtype):
    # ids of shape () give shape () + (dim,), as for any other shape of ids.
    w = random_weights(rng, 30, 15)
    table = EmbeddingTable(w)
    for ids in (id_dtype(4), np.array(4, dtype=id_dtype)):
        out = table.gather(ids)
        assert out.shape == (15,)
        np.testing.assert_array_equal(out, w[4])


def test_gather_accepts_python_lists():
    w = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(EmbeddingTable(w).gather([[3, 0], [1, 1]]), w[[[3, 0], [1, 1]]])


def test_gather_of_non_contiguous_ids(simd, rng):
    w = random_weights(rng, 30, 16)
    ids = rng.integers(0, 30, size=(10, 6))[:, ::2]
    assert not ids.flags.c_contiguous
    np.testing.assert_array_equal(EmbeddingTable(w).gather(ids), w[ids])


# ----------------------------------------------------------------------------- pooling vs NumPy
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dim", DIMS)
def test_pool_every_mode_matches_numpy_reference(simd, rng, storage, dim):
    w = random_weights(rng, 60, dim)
    table, values = make_table(w, storage)
    n_bags = 9 if dim == 1023 else 25
    indices, offsets, full = random_bags(rng, 60, n_bags, 12)
    for mode in MODES:
        out = table.pool(indices, offsets, mode=mode)
        assert_close(out, ref_pool(values, indices, full, mode))


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_one_column_float32_pooling_is_bit_identical_to_a_wider_tables_first_column(simd, rng, id_dtype):
    # a one-column float32 table (a linear model's weights) pools in scalar code: the same fma chain as
    # the vector path, so every bag equals column 0 of a 16-column table holding the same first column
    w16 = random_weights(rng, 500, 16) * rng.uniform(1e-3, 1e3, size=(500, 1)).astype(np.float32)
    one, wide = EmbeddingTable(np.ascontiguousarray(w16[:, :1])), EmbeddingTable(w16)
    indices, offsets, flat = random_bags(rng, 500, 300, 9)     # (empty bags among them)
    indices = indices.astype(id_dtype)
    psw = rng.uniform(-3.0, 3.0, size=indices.shape[0]).astype(np.float32)
    for mode, weights in (("sum", None), ("sum", psw), ("mean", None)):
        a = one.pool(indices, offsets, per_sample_weights=weights, mode=mode)
        b = wide.pool(indices, offsets, per_sample_weights=weights, mode=mode)
        np.testing.assert_array_equal(a[:, 0], b[:, 0])
        sel = rng.choice(len(offsets), 40)                  # and through pool_select, with a second table
        out1, out16 = np.zeros((40, 1), np.float32), np.zeros((40, 16), np.float32)
        if mode == "sum":
            wide.pool_select(indices, flat, weights, sel, np.arange(40), out16, second=one, second_out=out1)
            np.testing.assert_array_equal(out1[:, 0], b[sel, 0])
            np.testing.assert_array_equal(out16, b[sel])


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dim", DIMS)
def test_pool_sum_with_per_sample_weights_matches_numpy_reference(simd, rng, storage, dim):
    w = random_weights(rng, 60, dim)
    table, values = make_table(w, storage)
    indices, offsets, full = random_bags(rng, 60, 20, 10)
    psw = rng.uniform(-2.0, 2.0, size=indices.shape[0]).astype(np.float32)
    out = table.pool(indices, offsets, per_sample_weights=psw, mode="sum")
    assert_close(out, ref_pool(values, indices, full, "sum", psw))


@pytest.mark.parametrize("storage", STORAGES)
def test_pool_large_batch_runs_parallel_and_matches_reference(simd, rng, storage):
    # 5000 bags x ~20 ids x 64 dims: well above the parallel threshold.
    w = random_weights(rng, 10000, 64)
    table, values = make_table(w, storage)
    indices, offsets, full = random_bags(rng, 10000, 5000, 40)
    psw = rng.uniform(0.0, 1.0, size=indices.shape[0]).astype(np.float32)
    for mode in MODES:
        out = table.pool(indices, offsets, mode=mode)
        assert_close(out, torch_bag(values, indices, offsets, mode=mode))
        np.testing.assert_array_equal(out, table.pool(indices, offsets, mode=mode, num_threads=1))
    out = table.pool(indices, offsets, per_sample_weights=psw)
    assert_close(out, torch_bag(values, indices, offsets, psw=psw))


def test_pool_fixed_size_large_batch_matches_vectorized_numpy(simd, rng):
    w = random_weights(rng, 10000, 64)
    idx = rng.integers(0, 10000, size=(5000, 20))
    table = EmbeddingTable(w)
    rows = w.astype(np.float64)[idx]
    assert_close(table.pool(idx, mode="sum"), rows.sum(axis=1))
    assert_close(table.pool(idx, mode="mean"), rows.mean(axis=1))
    assert_close(table.pool(idx, mode="max"), rows.max(axis=1))


def test_int8_table_from_raw_codes_pools_as_scale_times_code_plus_bias(simd, rng):
    rows, dim = 40, 17
    codes = rng.integers(0, 256, size=(rows, dim)).astype(np.uint8)
    sb = np.stack([rng.uniform(0.001, 0.05, rows), rng.uniform(-3, 3, rows)], axis=1).astype(np.float32)
    table = EmbeddingTable(codes, sb)
    assert table.dtype == "int8"
    values = dequantize(codes, sb)
    ids = np.arange(rows)
    assert_close(table.gather(ids), values)
    indices, offsets, full = random_bags(rng, rows, 15, 8)
    psw = rng.uniform(-1, 1, size=indices.shape[0]).astype(np.float32)
    for mode in MODES:
        assert_close(table.pool(indices, offsets, mode=mode), ref_pool(values, indices, full, mode))
    assert_close(table.pool(indices, offsets, psw), ref_pool(values, indices, full, "sum", psw))


@pytest.mark.parametrize("dim", DIMS)
def test_int8_quantization_is_within_half_a_step_of_the_original(simd, rng, dim):
    w = random_weights(rng, 30, dim) * rng.uniform(0.01, 10, size=(30, 1)).astype(np.float32)
    w[0] = 0.5  # constant row: scale 0, must come back exactly
    table = EmbeddingTable.quantize(w, "int8")
    assert table.dtype == "int8"
    assert table.weights.dtype == np.uint8 and table.weights.shape == w.shape
    assert table.scale_bias.dtype == np.float32 and table.scale_bias.shape == (30, 2)
    scale = table.scale_bias[:, 0].astype(np.float64)
    np.testing.assert_allclose(scale, (w.max(axis=1).astype(np.float64) - w.min(axis=1)) / 255, rtol=1e-5)
    np.testing.assert_array_equal(table.scale_bias[:, 1], w.min(axis=1))
    deq = table.to_numpy()
    assert_close(deq, dequantize(table.weights, table.scale_bias))
    slack = 8 * np.finfo(np.float32).eps * np.abs(w).max(axis=1, keepdims=True)
    err = np.abs(deq.astype(np.float64) - w)
    assert (err <= scale[:, None] / 2 + slack).all()
    np.testing.assert_array_equal(deq[0], w[0])


@pytest.mark.parametrize("storage", STORAGES)
def test_quantize_reports_storage_and_to_numpy_returns_float32(rng, storage):
    w = random_weights(rng, 12, 9)
    table = EmbeddingTable.quantize(w, storage)
    assert table.dtype == storage
    assert table.shape == (12, 9) and table.rows == 12 and table.dim == 9 and len(table) == 12
    out = table.to_numpy()
    assert out.dtype == np.float32 and out.shape == (12, 9)
    np.testing.assert_allclose(out, w, atol=(w.max() - w.min()) / 255)


def test_quantize_float16_equals_table_of_float16_values(simd, rng):
    w = random_weights(rng, 25, 33)
    a = EmbeddingTable.quantize(w, "float16")
    assert a.weights.dtype == np.float16
    np.testing.assert_array_equal(a.weights, w.astype(np.float16))
    np.testing.assert_array_equal(a.to_numpy(), w.astype(np.float16).astype(np.float32))


def test_pool_max_picks_largest_even_when_all_values_are_negative(simd, rng):
    w = -np.abs(random_weights(rng, 20, 17)) - 1.0
    table = EmbeddingTable(w)
    indices, offsets, full = random_bags(rng, 20, 10, 5)
    out = table.pool(indices, offsets, mode="max")
    assert_close(out, ref_pool(w.astype(np.float64), indices, full, "max"))
    nonempty = np.diff(full) > 0
    assert (out[nonempty] < 0).all()
    assert (out[~nonempty] == 0).all()


# ----------------------------------------------------------------------------- torch parity
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("include_last_offset", [False, True])
@pytest.mark.parametrize("dim", [1, 16, 33])
def test_pool_with_offsets_matches_torch_embedding_bag(simd, rng, storage, include_last_offset, dim):
    w = random_weights(rng, 80, dim)
    table, values = make_table(w, storage)
    indices, offsets, full = random_bags(rng, 80, 30, 9)
    offs = full if include_last_offset else offsets
    for mode in MODES:
        out = table.pool(indices, offs, mode=mode, include_last_offset=include_last_offset)
        expected = torch_bag(values, indices, offs, mode=mode, include_last_offset=include_last_offset)
        assert_close(out, expected)


@pytest.mark.parametrize("include_last_offset", [False, True])
def test_pool_per_sample_weights_matches_torch_embedding_bag(simd, rng, include_last_offset):
    w = random_weights(rng, 80, 17)
    indices, offsets, full = random_bags(rng, 80, 30, 9)
    offs = full if include_last_offset else offsets
    psw = rng.standard_normal(indices.shape[0]).astype(np.float32)
    out = EmbeddingTable(w).pool(indices, offs, psw, "sum", include_last_offset=include_last_offset)
    expected = torch_bag(w, indices, offs, "sum", psw, include_last_offset=include_last_offset)
    assert_close(out, expected)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("bag_len", [1, 5, 17])
def test_pool_2d_indices_fixed_bags_match_torch_embedding_bag(simd, rng, storage, bag_len):
    w = random_weights(rng, 50, 15)
    table, values = make_table(w, storage)
    idx = rng.integers(0, 50, size=(11, bag_len))
    for mode in MODES:
        assert_close(table.pool(idx, mode=mode), torch_bag(values, idx, mode=mode))
    psw = rng.standard_normal(idx.shape).astype(np.float32)
    assert_close(table.pool(idx, per_sample_weights=psw), torch_bag(values, idx, psw=psw))


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_pool_2d_indices_of_int32_and_int64_agree(simd, rng, id_dtype):
    w = random_weights(rng, 50, 16)
    idx = rng.integers(0, 50, size=(8, 4))
    expected = torch_bag(w, idx, mode="mean")
    assert_close(EmbeddingTable(w).pool(idx.astype(id_dtype), mode="mean"), expected)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
def test_empty_bags_give_zeros_in_every_mode_like_torch(simd, rng, storage, mode):
    w = random_weights(rng, 10, 17) - 5.0  # all negative: max of an empty bag must not leak -inf or a row
    table, values = make_table(w, storage)
    indices = np.array([3, 4, 5], dtype=np.int64)
    offsets = np.array([0, 0, 2, 2, 3, 3], dtype=np.int64)  # bags 0, 2, 4 and 5 are empty
    out = table.pool(indices, offsets, mode=mode)
    expected = torch_bag(values, indices, offsets, mode=mode)
    assert_close(out, expected)
    for b in (0, 2, 4, 5):
        np.testing.assert_array_equal(out[b], 0.0)
    assert np.isfinite(out).all()


@pytest.mark.parametrize("mode", MODES)
def test_all_bags_empty_give_zeros(simd, rng, mode):
    table = EmbeddingTable(random_weights(rng, 5, 7))
    out = table.pool(np.array([], dtype=np.int64), np.zeros(4, dtype=np.int64), mode=mode)
    assert out.shape == (4, 7)
    np.testing.assert_array_equal(out, 0.0)
    out2 = table.pool(np.zeros((3, 0), dtype=np.int64), mode=mode)
    assert out2.shape == (3, 7)
    np.testing.assert_array_equal(out2, 0.0)


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_pool_accepts_int32_and_int64_indices_and_offsets(simd, rng, id_dtype):
    w = random_weights(rng, 40, 16)
    indices, offsets, full = random_bags(rng, 40, 12, 6)
    out = EmbeddingTable(w).pool(indices.astype(id_dtype), offsets.astype(id_dtype), mode="sum")
    assert_close(out, torch_bag(w, indices, offsets, mode="sum"))


def test_pool_with_zero_bags_returns_empty_result(rng):
    table = EmbeddingTable(random_weights(rng, 5, 7))
    out = table.pool(np.array([], dtype=np.int64), np.array([], dtype=np.int64))
    assert out.shape == (0, 7) and out.dtype == np.float32
    out = table.pool(np.array([], dtype=np.int64), np.array([0], dtype=np.int64), include_last_offset=True)
    assert out.shape == (0, 7)


# ----------------------------------------------------------------------------- zero-copy
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_contiguous_float_weights_are_shared_not_copied(rng, dtype):
    w = random_weights(rng, 20, 9).astype(dtype)
    table = EmbeddingTable(w)
    assert np.shares_memory(table.weights, w)
    assert table.weights.dtype == dtype
    assert table.nbytes == w.nbytes


def test_int8_codes_and_scale_bias_are_shared_not_copied(rng):
    codes = rng.integers(0, 256, size=(10, 7)).astype(np.uint8)
    sb = np.ones((10, 2), dtype=np.float32)
    table = EmbeddingTable(codes, sb)
    assert np.shares_memory(table.weights, codes)
    assert np.shares_memory(table.scale_bias, sb)
    assert table.nbytes == codes.nbytes + sb.nbytes


def test_shared_weights_are_read_live_by_the_kernels(rng):
    w = random_weights(rng, 6, 5)
    table = EmbeddingTable(w)
    w[2] = 42.0  # proves no private copy exists
    np.testing.assert_array_equal(table.gather([2])[0], np.full(5, 42.0, dtype=np.float32))


def _mmap_buffer(arr):
    base = arr
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_load_memory_maps_npy_without_copy_and_gives_right_results(simd, rng, tmp_path, dtype):
    w = random_weights(rng, 300, 33).astype(dtype)
    path = tmp_path / "table.npy"
    np.save(path, w)
    table = EmbeddingTable.load(path)
    weights = table.weights
    assert weights.dtype == dtype and weights.shape == (300, 33)
    assert not weights.flags.writeable  # the read-only mapping itself, not a private copy
    buf = _mmap_buffer(weights)
    assert buf is not None, "weights are not backed by a memory map"
    assert np.shares_memory(weights, np.frombuffer(buf, dtype=np.uint8))
    values = w.astype(np.float64)
    ids = rng.integers(0, 300, size=50)
    assert_close(table.gather(ids), values[ids])
    indices, offsets, full = random_bags(rng, 300, 20, 8)
    for mode in MODES:
        assert_close(table.pool(indices, offsets, mode=mode), ref_pool(values, indices, full, mode))
    # The kernels read the mapped pages: a write through another mapping of the file shows up.
    rw = np.load(path, mmap_mode="r+")
    rw[7] = 3.0
    rw.flush()
    del rw
    np.testing.assert_array_equal(table.gather([7])[0], np.full(33, 3.0, dtype=np.float32))


def test_table_over_caller_memmap_shares_memory(rng, tmp_path):
    w = random_weights(rng, 40, 16)
    path = tmp_path / "w.npy"
    np.save(path, w)
    mm = np.load(path, mmap_mode="r")
    table = EmbeddingTable(mm)
    assert np.shares_memory(table.weights, mm)
    np.testing.assert_array_equal(table.to_numpy(), w)


def test_load_int8_table_with_scale_bias_memory_maps_both(simd, rng, tmp_path):
    w = random_weights(rng, 50, 17)
    q = EmbeddingTable.quantize(w, "int8")
    np.save(tmp_path / "codes.npy", q.weights)
    np.save(tmp_path / "sb.npy", q.scale_bias)
    table = EmbeddingTable.load(tmp_path / "codes.npy", scale_bias=tmp_path / "sb.npy")
    assert table.dtype == "int8"
    assert _mmap_buffer(table.weights) is not None
    assert _mmap_buffer(table.scale_bias) is not None
    values = dequantize(q.weights, q.scale_bias)
    indices, offsets, full = random_bags(rng, 50, 15, 6)
    assert_close(table.pool(indices, offsets, mode="mean"), ref_pool(values, indices, full, "mean"))


def test_load_without_mmap_reads_into_memory_and_is_correct(rng, tmp_path):
    w = random_weights(rng, 30, 7)
    path = tmp_path / "w.npy"
    np.save(path, w)
    table = EmbeddingTable.load(path, mmap=False)
    assert not isinstance(table.weights, np.memmap)
    np.testing.assert_array_equal(table.to_numpy(), w)


def test_float64_weights_are_converted_to_float32_and_correct(simd, rng):
    w64 = rng.standard_normal((30, 17))
    table = EmbeddingTable(w64)
    assert table.dtype == "float32" and table.weights.dtype == np.float32
    assert not np.shares_memory(table.weights, w64)
    expected = w64.astype(np.float32)
    np.testing.assert_array_equal(table.to_numpy(), expected)
    indices, offsets, full = random_bags(rng, 30, 10, 5)
    assert_close(table.pool(indices, offsets), ref_pool(expected.astype(np.float64), indices, full, "sum"))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.uint8])
@pytest.mark.parametrize("layout", ["strided", "fortran"])
def test_non_contiguous_weights_are_copied_and_correct(simd, rng, dtype, layout):
    base = rng.integers(0, 256, size=(20, 34)).astype(dtype) if dtype == np.uint8 else \
        random_weights(rng, 20, 34).astype(dtype)
    w = base[:, ::2] if layout == "strided" else np.asfortranarray(base[:, :17])
    assert not w.flags.c_contiguous
    sb = np.stack([np.full(20, 0.1), np.linspace(-1, 1, 20)], axis=1).astype(np.float32) \
        if dtype == np.uint8 else None
    table = EmbeddingTable(w, sb)
    assert table.weights.flags.c_contiguous and table.weights.dtype == dtype
    assert not np.shares_memory(table.weights, w)
    values = dequantize(w, sb) if dtype == np.uint8 else w.astype(np.float64)
    assert_close(table.to_numpy(), values)
    indices, offsets, full = random_bags(rng, 20, 8, 6)
    assert_close(table.pool(indices, offsets, mode="max"), ref_pool(values, indices, full, "max"))


def test_byte_swapped_weights_and_ids_are_converted_and_correct(simd, rng):
    w = random_weights(rng, 12, 9)
    ids = rng.integers(0, 12, size=7)
    table = EmbeddingTable(w.astype(w.dtype.newbyteorder()))
    assert table.weights.dtype.isnative
    ids_swapped = ids.astype(np.dtype(np.int64).newbyteorder())
    np.testing.assert_array_equal(table.gather(ids_swapped), w[ids])
    full = np.array([0, 3, 7])
    expected = torch_bag(w, ids, full[:-1], mode="sum")
    out = table.pool(ids_swapped, full[:-1].astype(np.dtype(np.int64).newbyteorder()), mode="sum")
    assert_close(out, expected)


def test_integer_weights_are_converted_to_float32():
    w = np.arange(12, dtype=np.int16).reshape(3, 4)
    table = EmbeddingTable(w)
    assert table.dtype == "float32"
    np.testing.assert_array_equal(table.to_numpy(), w.astype(np.float32))


# ----------------------------------------------------------------------------- bad input
@pytest.fixture
def table(rng):
    return EmbeddingTable(random_weights(rng, 10, 7))


@pytest.mark.parametrize("bad", [-1, 10, 1000, np.iinfo(np.int64).min])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_gather_out_of_range_id_raises_index_error_naming_position(table, bad, id_dtype):
    if id_dtype == np.int32 and not np.iinfo(np.int32).min <= bad <= np.iinfo(np.int32).max:
        bad = np.iinfo(np.int32).min
    ids = np.array([0, 3, bad, 1], dtype=id_dtype)
    with pytest.raises(IndexError, match=r"\[2\]"):
        table.gather(ids)


def test_gather_out_of_range_in_2d_ids_names_flat_position(table):
    with pytest.raises(IndexError, match=r"\[4\]"):
        table.gather(np.array([[0, 1, 2], [3, 10, 5]]))


@pytest.mark.parametrize("bad", [-1, 10])
def test_pool_out_of_range_index_raises_index_error_naming_position(table, bad):
    indices = np.array([0, 1, 2, bad, 4], dtype=np.int64)
    with pytest.raises(IndexError, match=r"\[3\]"):
        table.pool(indices, np.array([0, 2]))
    with pytest.raises(IndexError, match=r"\[3\]"):
        table.pool(indices.reshape(1, 5), mode="max")


def test_uint64_id_beyond_int64_raises_index_error(table):
    with pytest.raises(IndexError):
        table.gather(np.array([2**63 + 5], dtype=np.uint64))


@pytest.mark.parametrize("ids", [np.array([0.0, 1.0]), np.array([1.5]), np.array([True, False]), ["a"]])
def test_non_integer_ids_raise_type_error(table, ids):
    with pytest.raises(TypeError):
        table.gather(ids)
    with pytest.raises(TypeError):
        table.pool(ids, np.array([0]))


def test_float_offsets_raise_type_error(table):
    with pytest.raises(TypeError):
        table.pool(np.array([0, 1]), np.array([0.0, 1.0]))


@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), ()])
def test_weights_with_wrong_ndim_raise_value_error(shape):
    with pytest.raises(ValueError):
        EmbeddingTable(np.zeros(shape, dtype=np.float32))


@pytest.mark.parametrize("dtype", [np.complex64, np.bool_, object])
def test_weights_of_non_real_dtype_raise_type_error(dtype):
    with pytest.raises(TypeError):
        EmbeddingTable(np.zeros((3, 2), dtype=dtype))


def test_decreasing_offsets_raise_value_error_naming_position(table):
    with pytest.raises(ValueError, match=r"offsets\[2\]"):
        table.pool(np.arange(5), np.array([0, 3, 1]))
    with pytest.raises(ValueError, match=r"offsets\[2\]"):
        table.pool(np.arange(5), np.array([0, 3, 1, 5]), include_last_offset=True)


def test_first_offset_not_zero_raises_value_error(table):
    with pytest.raises(ValueError, match="offsets"):
        table.pool(np.arange(5), np.array([1, 3]))
    with pytest.raises(ValueError, match="offsets"):
        table.pool(np.arange(5), np.array([2, 3, 5]), include_last_offset=True)


def test_offsets_past_the_end_raise_index_error(table):
    with pytest.raises(IndexError):
        table.pool(np.arange(5), np.array([0, 6]))
    with pytest.raises(IndexError):
        table.pool(np.arange(5), np.array([0, 2, 6]), include_last_offset=True)


def test_last_offset_short_of_the_end_with_include_last_offset_raises(table):
    with pytest.raises((IndexError, ValueError)):
        table.pool(np.arange(5), np.array([0, 2, 4]), include_last_offset=True)


def test_include_last_offset_with_no_offsets_raises_value_error(table):
    with pytest.raises(ValueError):
        table.pool(np.arange(3), np.array([], dtype=np.int64), include_last_offset=True)


def test_1d_indices_without_offsets_and_2d_with_offsets_raise_value_error(table):
    with pytest.raises(ValueError):
        table.pool(np.arange(3))
    with pytest.raises(ValueError):
        table.pool(np.zeros((2, 2), dtype=np.int64), np.array([0, 2]))
    with pytest.raises(ValueError):
        table.pool(np.zeros((2, 2, 2), dtype=np.int64))


@pytest.mark.parametrize("mode", ["mean", "max"])
def test_per_sample_weights_with_mean_or_max_raise_value_error(table, mode):
    with pytest.raises(ValueError):
        table.pool(np.arange(4), np.array([0, 2]), np.ones(4, dtype=np.float32), mode)


@pytest.mark.parametrize("n", [0, 3, 5])
def test_per_sample_weights_of_wrong_length_raise_value_error(table, n):
    with pytest.raises(ValueError):
        table.pool(np.arange(4), np.array([0, 2]), np.ones(n, dtype=np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_per_sample_weight_raises_value_error(table, bad):
    psw = np.array([1.0, 2.0, bad, 0.5], dtype=np.float32)
    with pytest.raises(ValueError, match=r"\[2\]"):
        table.pool(np.arange(4), np.array([0, 2]), psw)


@pytest.mark.parametrize("mode", ["avg", "SUM", "", "min"])
def test_unknown_mode_raises_value_error(table, mode):
    with pytest.raises(ValueError, match="mode"):
        table.pool(np.arange(4), np.array([0, 2]), mode=mode)


def test_uint8_weights_without_scale_bias_raise_value_error():
    with pytest.raises(ValueError, match="scale_bias"):
        EmbeddingTable(np.zeros((4, 3), dtype=np.uint8))


@pytest.mark.parametrize("shape", [(4, 3), (5, 2), (3, 2), (8,), (4, 2, 1)])
def test_scale_bias_of_wrong_shape_raises_value_error(shape):
    with pytest.raises(ValueError):
        EmbeddingTable(np.zeros((4, 3), dtype=np.uint8), np.ones(shape, dtype=np.float32))


def test_non_finite_scale_bias_raises_value_error():
    sb = np.ones((4, 2), dtype=np.float32)
    sb[1, 0] = np.nan
    with pytest.raises(ValueError):
        EmbeddingTable(np.zeros((4, 3), dtype=np.uint8), sb)


def test_scale_bias_with_float_weights_raises_value_error():
    with pytest.raises(ValueError):
        EmbeddingTable(np.zeros((4, 3), dtype=np.float32), np.ones((4, 2), dtype=np.float32))


@pytest.mark.parametrize("dtype", ["int4", "fp8", "float64", "", "INT8"])
def test_quantize_unknown_dtype_raises_value_error(dtype):
    with pytest.raises(ValueError, match="dtype"):
        EmbeddingTable.quantize(np.ones((3, 3), dtype=np.float32), dtype)


def test_quantize_non_finite_weights_raises_value_error():
    w = np.ones((3, 3), dtype=np.float32)
    w[1, 1] = np.inf
    with pytest.raises(ValueError):
        EmbeddingTable.quantize(w, "int8")


@pytest.mark.parametrize("num_threads", [0, -1])
def test_non_positive_num_threads_raises_value_error(table, num_threads):
    with pytest.raises(ValueError):
        table.gather([0], num_threads=num_threads)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("ids", [[], np.array([], dtype=np.int32), np.zeros(0, dtype=np.int64)])
def test_empty_ids_give_empty_result_of_shape_0_by_dim(rng, storage, ids):
    table, _ = make_table(random_weights(rng, 6, 17), storage)
    out = table.gather(ids)
    assert out.shape == (0, 17) and out.dtype == np.float32


def test_empty_table_with_empty_ids_works_and_any_id_is_out_of_range():
    table = EmbeddingTable(np.zeros((0, 8), dtype=np.float32))
    assert table.rows == 0 and table.dim == 8
    assert table.gather(np.array([], dtype=np.int64)).shape == (0, 8)
    assert table.to_numpy().shape == (0, 8)
    out = table.pool(np.array([], dtype=np.int64), np.array([0, 0]))
    assert out.shape == (2, 8)
    np.testing.assert_array_equal(out, 0.0)
    with pytest.raises(IndexError):
        table.gather([0])


@pytest.mark.parametrize("storage", STORAGES)
def test_empty_table_quantizes_and_gathers_nothing(storage):
    table = EmbeddingTable.quantize(np.zeros((0, 5), dtype=np.float32), storage)
    assert table.shape == (0, 5)
    assert table.gather([]).shape == (0, 5)


def test_zero_dim_table_returns_zero_width_results(rng):
    table = EmbeddingTable(np.zeros((4, 0), dtype=np.float32))
    assert table.gather([1, 3]).shape == (2, 0)
    assert table.pool(np.array([0, 1, 2]), np.array([0, 1])).shape == (2, 0)
    with pytest.raises(IndexError):
        table.gather([4])


# ----------------------------------------------------------------------------- threads
def test_concurrent_calls_on_one_table_from_many_threads_are_correct(simd, rng):
    from concurrent.futures import ThreadPoolExecutor

    w = random_weights(rng, 2000, 64)
    table = EmbeddingTable.quantize(w, "int8")
    values = dequantize(table.weights, table.scale_bias)
    jobs = [random_bags(np.random.default_rng(seed), 2000, 600, 20) for seed in range(8)]

    def run(job):
        indices, offsets, _ = job
        return table.pool(indices, offsets, mode="mean"), table.gather(indices)

    with ThreadPoolExecutor(max_workers=4) as ex:
        results = list(ex.map(run, jobs))
    for (indices, offsets, full), (pooled, gathered) in zip(jobs, results):
        assert_close(pooled, torch_bag(values, indices, offsets, mode="mean"))
        assert_close(gathered, values[indices])


# ----------------------------------------------------------------------------- inputs untouched
@pytest.mark.parametrize("storage", STORAGES)
def test_callers_arrays_are_never_modified(simd, rng, storage):
    w = random_weights(rng, 40, 17)
    if storage == "float32":
        args = (w,)
    elif storage == "float16":
        args = (w.astype(np.float16),)
    else:
        q = EmbeddingTable.quantize(w, "int8")
        args = (q.weights.copy(), q.scale_bias.copy())
    before_args = [a.copy() for a in args]
    table = EmbeddingTable(*args)
    indices, offsets, full = random_bags(rng, 40, 12, 6)
    ids2d = rng.integers(0, 40, size=(4, 5)).astype(np.int32)
    psw = rng.standard_normal(indices.shape[0]).astype(np.float32)
    inputs = [indices, offsets, full, ids2d, psw]
    before = [a.copy() for a in inputs]
    table.gather(indices)
    table.gather(ids2d)
    for mode in MODES:
        table.pool(indices, offsets, mode=mode)
        table.pool(indices, full, mode=mode, include_last_offset=True)
        table.pool(ids2d, mode=mode)
    table.pool(indices, offsets, psw)
    for a, b in zip(args, before_args):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(inputs, before):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == b.dtype


def test_quantize_does_not_modify_the_input(rng):
    w = random_weights(rng, 10, 9)
    before = w.copy()
    for storage in STORAGES:
        EmbeddingTable.quantize(w, storage)
    np.testing.assert_array_equal(w, before)


def test_results_are_fresh_arrays_not_views_of_the_table(rng):
    w = random_weights(rng, 10, 7)
    table = EmbeddingTable(w)
    out = table.gather([1, 2])
    out[:] = -1.0
    np.testing.assert_array_equal(table.gather([1, 2]), w[[1, 2]])
    assert not np.shares_memory(out, w)


def test_quantize_int8_of_a_range_overflowing_float32_raises_value_error():
    w = np.array([[-3e38, 3e38, 0.0]], dtype=np.float32)
    with pytest.raises(ValueError, match="overflows float32"):
        EmbeddingTable.quantize(w, "int8")


# ------------------------------------------------------------------ register-blocked row loops
# The pooling kernel keeps a bag's sum in registers, 64 floats at a time (4 x 16 AVX-512 lanes, 8 x 8
# AVX2 lanes), with a masked last register: dims around those block edges exercise every shape.
BLOCK_DIMS = [1, 8, 9, 31, 47, 63, 64, 65, 100, 127, 128, 129, 200]


@pytest.mark.parametrize("dim", BLOCK_DIMS)
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
def test_pool_at_register_block_edges_matches_numpy_reference(simd, rng, storage, mode, dim):
    w = random_weights(rng, 97, dim)
    table, values = make_table(w, storage)
    indices, offsets, full = random_bags(rng, 97, 23, 40)
    got = table.pool(indices, offsets, mode=mode)
    assert_close(got, ref_pool(values, indices, full, mode), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dim", [16, 65, 129])
@pytest.mark.parametrize("storage", STORAGES)
def test_pool_weighted_at_register_block_edges_matches_numpy_reference(simd, rng, storage, dim):
    w = random_weights(rng, 50, dim)
    table, values = make_table(w, storage)
    indices, offsets, full = random_bags(rng, 50, 31, 25)
    psw = rng.standard_normal(indices.shape[0]).astype(np.float32)
    got = table.pool(indices, offsets, psw, mode="sum")
    assert_close(got, ref_pool(values, indices, full, "sum", psw), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("mode", MODES)
def test_pool_is_bit_identical_for_any_thread_count(simd, rng, storage, mode):
    """Bags are split over threads in static, id-balanced ranges; each bag is summed the same way."""
    w = random_weights(rng, 5000, 64)
    table, _ = make_table(w, storage)
    indices, offsets, _ = random_bags(rng, 5000, 3001, 60)  # uneven lengths, empty bags
    one = table.pool(indices, offsets, mode=mode, num_threads=1)
    for nt in (2, 3, 7):
        np.testing.assert_array_equal(table.pool(indices, offsets, mode=mode, num_threads=nt), one)


@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
def test_pool_2d_request_path_equals_1d_offsets_path(simd, rng, id_dtype):
    """The fast path (2-D C-contiguous int32/int64 ids, no offsets) gives the 1-D path's bits."""
    table = EmbeddingTable(random_weights(rng, 1000, 16))
    ids = rng.integers(0, 1000, (26, 20)).astype(id_dtype)
    flat_offsets = np.arange(0, 26 * 20, 20)
    expected = table.pool(ids.reshape(-1), flat_offsets)
    np.testing.assert_array_equal(table.pool(ids), expected)
    np.testing.assert_array_equal(table.pool(np.asfortranarray(ids)), expected)  # copied, same answer
    np.testing.assert_array_equal(table.pool(ids[:, ::1].tolist()), expected)


def test_core_pool_takes_2d_ids_without_offsets_and_offsets_without_last(rng):
    table = EmbeddingTable(random_weights(rng, 100, 8))
    core = table._table
    ids = rng.integers(0, 100, (5, 3))
    full = np.arange(0, 16, 3, dtype=np.int64)
    expected = core.pool(ids.reshape(-1), full)
    np.testing.assert_array_equal(core.pool(ids), expected)
    np.testing.assert_array_equal(core.pool(ids.reshape(-1), full[:-1], None, "sum", 0, False), expected)
    with pytest.raises(IndexError, match="past the end"):
        core.pool(ids.reshape(-1), np.array([0, 16], dtype=np.int64), None, "sum", 0, False)
    with pytest.raises(TypeError, match="offsets"):
        core.pool(ids.reshape(-1), full.astype(np.int32))
    with pytest.raises(ValueError, match="2 dimensions"):
        core.pool(ids.reshape(-1))


def test_pool_2d_request_path_reports_out_of_range_ids(rng):
    table = EmbeddingTable(random_weights(rng, 10, 4))
    ids = np.zeros((3, 4), dtype=np.int64)
    ids[2, 1] = 10
    with pytest.raises(IndexError, match=r"indices\[9\] = 10"):
        table.pool(ids)


@pytest.mark.parametrize("storage", ["float32", "float16", "int8"])
def test_pool_into_out_fills_and_returns_that_array(rng, storage):
    from rec_engine import _core

    w = rng.normal(size=(300, 12)).astype(np.float32)
    table = EmbeddingTable(w) if storage == "float32" else EmbeddingTable.quantize(w, storage)
    core = table._table
    idx = rng.integers(0, 300, 40)
    offsets = np.array([0, 3, 3, 17, 40], np.int64)
    want = table.pool(idx, offsets, mode="sum", include_last_offset=True)
    out = np.full((4, 12), np.nan, np.float32)
    got = core.pool(idx, offsets, None, "sum", 1, True, out)
    assert got is out
    np.testing.assert_array_equal(out, want)
    out2 = np.empty((4, 12), np.float32)
    core.pool(idx[::-1].copy(), offsets, None, "mean", 1, True, out2)
    np.testing.assert_array_equal(out2, table.pool(idx[::-1], offsets, mode="mean", include_last_offset=True))
    np.testing.assert_array_equal(out, want)                 # the first buffer is untouched
    for bad, exc, match in [(np.empty((3, 12), np.float32), ValueError, r"out must have shape \(4, 12\)"),
                            (np.empty((4, 12), np.float64), TypeError, "out must be a C-contiguous float32"),
                            (np.empty((12, 4), np.float32).T, TypeError, "not C-contiguous"),
                            (np.empty(48, np.float32), ValueError, "out must have 2 dimensions"),
                            ([[0.0] * 12] * 4, TypeError, "out must be a numpy.ndarray")]:
        with pytest.raises(exc, match=match):
            core.pool(idx, offsets, None, "sum", 1, True, bad)
    frozen = np.zeros((4, 12), np.float32)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        core.pool(idx, offsets, None, "sum", 1, True, frozen)
    assert not frozen.any()
    assert isinstance(_core.EmbeddingTable, type)
