"""EmbeddingTable.pool_select: selected bags of a bag store sum-pooled into placed rows of ``out``.

Checked against a NumPy loop in float64 and, bit for bit, against ``EmbeddingTable.pool`` over the
taken bags, at every SIMD level the CPU supports (the ``simd`` fixture); then every error (with ``out``
left unchanged), many Python threads at once, and the GIL released while it runs.
"""
from __future__ import annotations


import numpy as np
import pytest
from test_embedding import make_table
from test_threads import run_in_threads, ticks_during

from rec_engine import EmbeddingTable

STORAGES = ["float32", "float16", "int8"]
SENTINEL = np.float32(-3.5)


# ----------------------------------------------------------------------------- helpers
def make_store(rng, n_rows, n_bags, max_len, id_dtype=np.int64):
    """A CSR bag store: (indices, offsets of n_bags + 1, weights), with some empty bags."""
    lengths = rng.integers(0, max_len + 1, size=n_bags)
    lengths[:: 7] = 0
    offsets = np.zeros(n_bags + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    indices = rng.integers(0, n_rows, size=int(offsets[-1])).astype(id_dtype)
    weights = rng.uniform(-2.0, 2.0, size=indices.shape[0]).astype(np.float32)
    return indices, offsets, weights


def make_selection(rng, n_bags, n_select, n_out):
    bags = rng.integers(0, n_bags, size=n_select).astype(np.int64)
    if n_select > 3:
        bags[1] = bags[0]  # a bag selected twice
    dest = rng.permutation(n_out)[:n_select].astype(np.int64)
    return bags, dest


def take(indices, offsets, weights, bags):
    """The taken bags as a new bag list (what EncodedBatch.take does)."""
    lo, hi = offsets[bags], offsets[bags + 1]
    lens = hi - lo
    toffs = np.zeros(len(bags) + 1, dtype=np.int64)
    np.cumsum(lens, out=toffs[1:])
    pos = np.repeat(lo - toffs[:-1], lens) + np.arange(int(toffs[-1]), dtype=np.int64)
    return indices[pos], toffs, (None if weights is None else weights[pos])


def ref_select(values, indices, offsets, weights, bags, dest, out):
    want = out.astype(np.float64)
    for b, r in zip(bags, dest):
        lo, hi = int(offsets[b]), int(offsets[b + 1])
        rows = values[indices[lo:hi]]
        if weights is not None:
            rows = rows * weights[lo:hi].astype(np.float64)[:, None]
        want[r] = rows.sum(axis=0)
    return want


def new_out(n_out, dim):
    return np.full((n_out, dim), SENTINEL, dtype=np.float32)


# ----------------------------------------------------------------------------- results
@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dim", [1, 7, 16, 33, 100])
@pytest.mark.parametrize("id_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("weighted", [False, True])
def test_pool_select_matches_numpy_and_pool_of_the_taken_bags(simd, rng, storage, dim, id_dtype, weighted):
    w = rng.standard_normal((200, dim)).astype(np.float32)
    table, values = make_table(w, storage)
    indices, offsets, weights = make_store(rng, 200, 300, 5, id_dtype)
    weights = weights if weighted else None
    for n_select in (0, 1, 63, 64, 65, 250):
        n_out = n_select + 11
        bags, dest = make_selection(rng, 300, n_select, n_out)
        out = new_out(n_out, dim)
        got = table.pool_select(indices, offsets, weights, bags, dest, out)
        assert got is out
        want = ref_select(values, indices, offsets, weights, bags, dest, new_out(n_out, dim))
        np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
        untouched = np.setdiff1d(np.arange(n_out), dest)
        assert (out[untouched] == SENTINEL).all()
        ti, to, tw = take(indices, offsets, weights, bags)
        pooled = table.pool(ti, to, tw, include_last_offset=True)
        np.testing.assert_array_equal(out[dest], pooled)


@pytest.mark.parametrize("storage", STORAGES)
@pytest.mark.parametrize("dims", [(16, 1), (7, 33), (1, 1)])
def test_pool_select_second_table_equals_two_calls(simd, rng, storage, dims):
    """second / second_out: the same bags from a second table (other rows, dim, storage) in the same call,
    bit for bit what two separate calls give; both checked against the float64 reference."""
    d1, d2 = dims
    t1, v1 = make_table(rng.standard_normal((300, d1)).astype(np.float32), storage)
    t2, v2 = make_table(rng.standard_normal((250, d2)).astype(np.float32), "float32")
    indices, offsets, weights = make_store(rng, 250, 400, 4)
    for n_select, threads in ((0, 1), (1, 1), (65, 1), (3000, 2)):
        n_out = n_select + 5
        bags, dest = make_selection(rng, 400, n_select, n_out)
        out, out2 = new_out(n_out, d1), new_out(n_out, d2)
        t1.pool_select(indices, offsets, weights, bags, dest, out, num_threads=threads, second=t2, second_out=out2)
        np.testing.assert_array_equal(out, t1.pool_select(indices, offsets, weights, bags, dest, new_out(n_out, d1)))
        np.testing.assert_array_equal(out2, t2.pool_select(indices, offsets, weights, bags, dest, new_out(n_out, d2)))
        np.testing.assert_allclose(out2, ref_select(v2, indices, offsets, weights, bags, dest, new_out(n_out, d2)),
                                   rtol=1e-5, atol=1e-5)


def test_pool_select_second_table_errors_leave_both_outputs_unchanged(case, rng):
    small = EmbeddingTable(rng.standard_normal((20, 1)).astype(np.float32))    # fewer rows than the ids reach
    big = EmbeddingTable(rng.standard_normal((50, 1)).astype(np.float32))
    c = case
    for second, second_out, err, match in (
            (big, None, ValueError, "together"),
            (None, new_out(10, 1), ValueError, "together"),
            ("table", new_out(10, 1), TypeError, "EmbeddingTable"),
            (big, new_out(9, 1), ValueError, "second_out"),
            (big, new_out(10, 2), ValueError, "second_out"),
            (big, new_out(10, 1).astype(np.float64), TypeError, "second_out"),
            (EmbeddingTable(np.zeros((50, 6), np.float32)), None, ValueError, "overlap"),
            (small, new_out(10, 1), IndexError, "out of range for a table of 20 rows")):
        out = new_out(10, 6)
        if match == "overlap":           # second_out a view of out's own memory
            second_out = out
        before2 = None if second_out is None else second_out.copy()
        with pytest.raises(err, match=match):
            c["table"].pool_select(c["indices"], c["offsets"], c["weights"], c["bags"], c["dest"], out,
                                   second=second, second_out=second_out)
        assert (out == SENTINEL).all()
        if before2 is not None and second_out.dtype == np.float32:
            np.testing.assert_array_equal(second_out, before2)
    ro = new_out(10, 1)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        c["table"].pool_select(c["indices"], c["offsets"], c["weights"], c["bags"], c["dest"], new_out(10, 6),
                               second=big, second_out=ro)


@pytest.mark.parametrize("storage", STORAGES)
def test_pool_select_large_selection_on_threads_equals_one_thread(simd, rng, storage):
    table, values = make_table(rng.standard_normal((5000, 32)).astype(np.float32), storage)
    indices, offsets, weights = make_store(rng, 5000, 40000, 4)
    bags, dest = make_selection(rng, 40000, 12000, 13000)
    one = table.pool_select(indices, offsets, weights, bags, dest, new_out(13000, 32), num_threads=1)
    many = table.pool_select(indices, offsets, weights, bags, dest, new_out(13000, 32), num_threads=4)
    np.testing.assert_array_equal(one, many)
    ti, to, tw = take(indices, offsets, weights, bags)
    np.testing.assert_array_equal(many[dest], table.pool(ti, to, tw, include_last_offset=True))


def test_pool_select_over_a_memory_mapped_store(tmp_path, rng):
    table, values = make_table(rng.standard_normal((100, 8)).astype(np.float32), "float32")
    indices, offsets, weights = make_store(rng, 100, 500, 3, np.int32)
    arrays = {}
    for name, a in (("indices", indices), ("offsets", offsets), ("weights", weights)):
        np.save(tmp_path / f"{name}.npy", a)
        arrays[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
    bags, dest = make_selection(rng, 500, 40, 50)
    out = table.pool_select(arrays["indices"], arrays["offsets"], arrays["weights"], bags, dest, new_out(50, 8))
    np.testing.assert_allclose(out, ref_select(values, indices, offsets, weights, bags, dest, new_out(50, 8)),
                               rtol=1e-5, atol=1e-5)


def test_pool_select_edge_cases(rng):
    table, values = make_table(rng.standard_normal((10, 1)).astype(np.float32), "float32")
    indices = np.array([3, 4, 9], dtype=np.int64)
    offsets = np.array([0, 0, 2, 2, 3], dtype=np.int64)  # bags: [], [3, 4], [], [9]
    # n_select 0: out unchanged
    out = new_out(4, 1)
    table.pool_select(indices, offsets, None, np.zeros(0, np.int64), np.zeros(0, np.int64), out)
    assert (out == SENTINEL).all()
    # empty bags give zeros; dim 1; the same bag twice
    out = new_out(5, 1)
    table.pool_select(indices, offsets, None, np.array([0, 1, 2, 3, 1]), np.array([4, 0, 1, 2, 3]), out)
    w = table.weights[:, 0]
    np.testing.assert_array_equal(out[:, 0], [w[3] + w[4], 0, w[9], w[3] + w[4], 0])
    # an empty store (offsets [0]) and no selection; an out with zero rows
    table.pool_select(np.zeros(0, np.int32), np.zeros(1, np.int64), None, np.zeros(0, np.int64),
                      np.zeros(0, np.int64), np.zeros((0, 1), np.float32))
    # a table of dim 0
    t0 = EmbeddingTable(np.zeros((10, 0), np.float32))
    got = t0.pool_select(indices, offsets, None, np.array([1]), np.array([0]), np.zeros((1, 0), np.float32))
    assert got.shape == (1, 0)


def test_pool_select_num_threads_argument(rng):
    table = EmbeddingTable(rng.standard_normal((10, 4)).astype(np.float32))
    indices, offsets = np.array([1, 2], np.int64), np.array([0, 2], np.int64)
    out = table.pool_select(indices, offsets, None, np.array([0]), np.array([0]), new_out(1, 4), num_threads=2)
    np.testing.assert_array_equal(out[0], table.weights[1] + table.weights[2])
    with pytest.raises(ValueError):
        table.pool_select(indices, offsets, None, np.array([0]), np.array([0]), new_out(1, 4), num_threads=0)


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def case(rng):
    table = EmbeddingTable(rng.standard_normal((50, 6)).astype(np.float32))
    indices, offsets, weights = make_store(rng, 50, 40, 4)
    offsets[:] = np.arange(41) * 2  # every bag has two ids
    indices = rng.integers(0, 50, size=80).astype(np.int64)
    weights = rng.uniform(-1, 1, size=80).astype(np.float32)
    bags = np.array([3, 7, 3, 39], dtype=np.int64)
    dest = np.array([0, 5, 2, 9], dtype=np.int64)
    return dict(table=table, indices=indices, offsets=offsets, weights=weights, bags=bags, dest=dest)


def call(c, **over):
    a = {**c, **over}
    out = a.pop("out", None)
    if out is None:
        out = new_out(10, 6)
    before = out.copy()
    try:
        a["table"].pool_select(a["indices"], a["offsets"], a["weights"], a["bags"], a["dest"], out)
    finally:
        np.testing.assert_array_equal(out, before)  # nothing written when it raises


@pytest.mark.parametrize("name, bad", [
    ("indices", lambda c: c["indices"].astype(np.float64)),
    ("indices", lambda c: c["indices"].astype(np.uint32)),
    ("indices", lambda c: list(c["indices"])),
    ("offsets", lambda c: c["offsets"].astype(np.int32)),
    ("weights", lambda c: c["weights"].astype(np.float64)),
    ("bags", lambda c: c["bags"].astype(np.int32)),
    ("dest", lambda c: c["dest"].astype(np.uint64)),
    ("out", lambda c: new_out(10, 6).astype(np.float64)),
    ("out", lambda c: new_out(10, 12)[:, ::2]),
    ("indices", lambda c: np.repeat(c["indices"], 2)[::2]),
])
def test_pool_select_wrong_dtype_or_layout_is_a_type_error(case, name, bad):
    with pytest.raises(TypeError, match=name):
        call(case, **{name: bad(case)})


@pytest.mark.parametrize("over", [
    lambda c: dict(dest=c["dest"][:3]),                            # bags and dest lengths differ
    lambda c: dict(weights=c["weights"][:-1]),                     # one weight per index
    lambda c: dict(offsets=np.zeros(0, np.int64)),                 # offsets needs n_bags + 1 entries
    lambda c: dict(indices=c["indices"].reshape(40, 2)),           # indices 1-D
    lambda c: dict(bags=c["bags"].reshape(2, 2), dest=c["dest"].reshape(2, 2)),
    lambda c: dict(out=new_out(60, 1)),                            # out 2-D with dim columns
    lambda c: dict(out=new_out(10, 5)),
    lambda c: dict(out=np.full(60, SENTINEL, np.float32)),
])
def test_pool_select_wrong_shape_is_a_value_error(case, over):
    with pytest.raises(ValueError):
        call(case, **over(case))


def test_pool_select_read_only_out_is_a_value_error(case):
    out = new_out(10, 6)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        call(case, out=out)


@pytest.mark.parametrize("over, match", [
    (lambda c: dict(bags=np.array([3, 7, 3, 40])), "bags\\[3\\] = 40"),
    (lambda c: dict(bags=np.array([-1, 7, 3, 39])), "bags\\[0\\] = -1"),
    (lambda c: dict(dest=np.array([0, 5, 2, 10])), "dest\\[3\\] = 10"),
    (lambda c: dict(dest=np.array([0, -1, 2, 9])), "dest\\[1\\] = -1"),
    (lambda c: dict(indices=np.where(np.arange(80) == 79, 50, c["indices"])), "indices\\[79\\] = 50"),
    (lambda c: dict(indices=np.where(np.arange(80) == 6, -1, c["indices"]).astype(np.int32)), "indices\\[6\\] = -1"),
])
def test_pool_select_out_of_range_is_an_index_error(case, over, match):
    with pytest.raises(IndexError, match=match):
        call(case, **over(case))


def test_pool_select_checks_only_the_selected_bags(case):
    # a bad id, a NaN weight and bad offsets in bags that are not selected do not matter
    idx = case["indices"].copy()
    idx[0] = 1000          # bag 0
    w = case["weights"].copy()
    w[2] = np.nan          # bag 1
    offs = case["offsets"].copy()
    offs[11] = 0           # bag 10 decreases (bag 11 too: it starts at 0, and stays valid)
    out = new_out(10, 6)
    case["table"].pool_select(idx, offs, w, case["bags"], case["dest"], out)
    assert np.isfinite(out[case["dest"]]).all()


@pytest.mark.parametrize("over, match", [
    (lambda c: dict(dest=np.array([0, 5, 0, 9])), "dest\\[2\\] = 0"),
    (lambda c: dict(weights=np.where(np.arange(80) == 15, np.nan, c["weights"]).astype(np.float32)),
     "weights\\[15\\]"),
    (lambda c: dict(weights=np.where(np.arange(80) == 78, np.inf, c["weights"]).astype(np.float32)),
     "weights\\[78\\]"),
    (lambda c: dict(offsets=np.where(np.arange(41) == 8, 3, c["offsets"])), "bag 7"),       # 14..3: decreasing
    (lambda c: dict(offsets=np.where(np.arange(41) == 40, 81, c["offsets"])), "bag 39"),    # past the ids
    (lambda c: dict(offsets=np.where(np.arange(41) == 3, -2, c["offsets"])), "bag 3"),      # negative
])
def test_pool_select_bad_values_are_value_errors(case, over, match):
    with pytest.raises(ValueError, match=match):
        call(case, **over(case))


def test_pool_select_error_late_in_a_large_selection_leaves_out_unchanged(rng):
    table = EmbeddingTable(rng.standard_normal((100, 8)).astype(np.float32))
    indices, offsets, weights = make_store(rng, 100, 5000, 3)
    bags, dest = make_selection(rng, 5000, 4000, 4000)
    dest[-1] = dest[0]
    out = new_out(4000, 8)
    with pytest.raises(ValueError, match="dest"):
        table.pool_select(indices, offsets, weights, bags, dest, out)
    assert (out == SENTINEL).all()


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_pool_select_errors_in_several_shares_report_what_the_sequential_checks_find_first(rng, threads):
    """Each thread checks its share of a large selection: with problems in several shares, the error is the
    one a sequential pass finds first (any bag's bad offsets before any bad id or weight, then the lowest
    selected position), on any number of threads, and nothing is written."""
    # (64 + 1 columns: enough work for the threads, each then checking its own share)
    table = EmbeddingTable(rng.standard_normal((100, 64)).astype(np.float32))
    linear = EmbeddingTable(rng.standard_normal((100, 1)).astype(np.float32))
    indices, offsets, weights = make_store(rng, 100, 5000, 3)
    n = 4000
    bags = rng.permutation(5000)[:n].astype(np.int64)       # distinct bags: one problem belongs to one position
    dest = rng.permutation(n).astype(np.int64)
    nonempty = [i for i in range(n) if offsets[bags[i] + 1] > offsets[bags[i]]]
    early, mid, late = nonempty[100], nonempty[len(nonempty) // 2], nonempty[-50]

    def with_bad_id(idx, at):
        idx = idx.copy()
        idx[offsets[bags[at]]] = 100
        return idx

    def with_bad_offsets(offs, at):
        offs = offs.copy()
        offs[bags[at] + 1] = offs[bags[at]] - 1         # the bag's end before its start
        return offs

    def run(idx, offs, w):
        out, lin = new_out(n, 64), new_out(n, 1)
        with pytest.raises((IndexError, ValueError)) as err:
            table.pool_select(idx, offs, w, bags, dest, out, num_threads=threads, second=linear, second_out=lin)
        assert (out == SENTINEL).all() and (lin == SENTINEL).all()
        return str(err.value)

    # ids bad early and late: the early one
    msg = run(with_bad_id(with_bad_id(indices, late), early), offsets, weights)
    assert f"bags[{early}]" in msg and "out of range" in msg
    # a bad id early, bad offsets late: the offsets (they are all checked before any id)
    msg = run(with_bad_id(indices, early), with_bad_offsets(offsets, late), weights)
    assert msg.startswith(f"bag {bags[late]} (bags[{late}]) has offsets")
    # a NaN weight in the middle, a bad id late: the weight
    w = weights.copy()
    w[offsets[bags[mid]]] = np.nan
    msg = run(with_bad_id(indices, late), offsets, w)
    assert f"bags[{mid}]" in msg and "not finite" in msg
    # and with nothing wrong, the threads' shares pool what one thread does
    out1, outn = new_out(n, 64), new_out(n, 64)
    table.pool_select(indices, offsets, weights, bags, dest, out1, num_threads=1)
    table.pool_select(indices, offsets, weights, bags, dest, outn, num_threads=threads)
    np.testing.assert_array_equal(outn, out1)


# ----------------------------------------------------------------------------- threads and the GIL
def test_pool_select_from_four_python_threads_matches_the_reference(rng):
    table, values = make_table(rng.standard_normal((3000, 16)).astype(np.float32), "float16")
    indices, offsets, weights = make_store(rng, 3000, 20000, 3, np.int32)
    sels = [make_selection(rng, 20000, 2000, 2600) for _ in range(4)]
    wants = [ref_select(values, indices, offsets, weights, b, d, new_out(2600, 16)) for b, d in sels]
    serial = [table.pool_select(indices, offsets, weights, b, d, new_out(2600, 16)) for b, d in sels]

    def work(i):
        bags, dest = sels[i]
        return [table.pool_select(indices, offsets, weights, bags, dest, new_out(2600, 16)) for _ in range(10)]

    for i, reps in enumerate(run_in_threads(4, work)):
        for got in reps:
            np.testing.assert_allclose(got, wants[i], rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(got, serial[i])


def test_pool_select_releases_the_gil(rng):
    """A pure-Python thread keeps running while another thread is inside a long pool_select call
    (the approach of test_threads.test_kernels_release_the_gil_while_they_run)."""
    # 30000 selections of 1000-id bags (repeats of 1000 stored bags): 30M row adds of dim 128, ~0.4 s on
    # one core of the dev machine, from small arrays
    table = EmbeddingTable(rng.standard_normal((20000, 128)).astype(np.float32))
    indices = rng.integers(0, 20000, size=1000 * 1000).astype(np.int32)
    offsets = np.arange(1001, dtype=np.int64) * 1000
    bags, dest = make_selection(rng, 1000, 30000, 30000)
    out = np.empty((30000, 128), np.float32)
    took, inside = ticks_during(lambda: table.pool_select(indices, offsets, None, bags, dest, out, num_threads=1))
    if took < 0.1:
        pytest.skip(f"the call took {took:.3f} s, too short to observe the GIL")
    assert inside >= 0.2 * (took - 0.04) / 0.001, (inside, took)
