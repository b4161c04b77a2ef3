"""Fuzz every entry point of the compiled core rec_engine._core (see python/rec_engine/_core.pyi).

Each input picks one entry point, a SIMD level and a thread count, and builds its arguments from the
bytes: shapes (0 included), float values (NaN, inf, huge and denormal included), ids (negative, past the
end, near int64's limits), offsets / indptr that decrease or overrun, wrong dtypes and layouts now and
then. The contract: the call returns, or raises ValueError / TypeError / IndexError / RecEngineError
(the documented mapping of bad input); every other exception, a crash, or an ASan / UBSan report is a
finding. Cheap invariants of successful answers are checked too (ids in range, scores sorted, gather equal
to indexing), so a wrong answer is a finding as well.

Run through scripts/fuzz.sh (the ASan core, the right LD_PRELOAD); by hand:
    python fuzz/fuzz_core.py -max_total_time=20 [corpus_dir]
"""
from __future__ import annotations

import os
import sys

import atheris

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import unexpected  # noqa: E402

import numpy as np  # noqa: E402

with atheris.instrument_imports(include=["rec_engine"]):
    from rec_engine import _core

ALLOWED = (ValueError, TypeError, IndexError, _core.RecEngineError)
LEVELS = _core.supported_simd_levels()
SPECIAL_F = [0.0, -0.0, 1.0, -1.0, np.nan, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 1e30, 65504.0, 7.0]
SPECIAL_I = [0, 1, -1, 2, 3, 7, 63, 64, 65, 255, 2**31 - 1, -2**31, 2**31, 2**63 - 1, -2**63, 2**32]

OPS = ["topk", "topk_quantized", "quantize_items", "gather", "pool", "table", "normalized_adjacency",
       "spmm", "lightgcn_propagate", "keyindex_ints", "keyindex_strings", "simd"]


class Gen:
    """Arguments from the fuzz bytes."""

    def __init__(self, data: bytes):
        self.p = atheris.FuzzedDataProvider(data)

    def int(self, lo: int, hi: int) -> int:
        return self.p.ConsumeIntInRange(lo, hi)

    def bool(self) -> bool:
        return self.p.ConsumeBool()

    def pick(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def size(self, hi: int = 9) -> int:
        return self.int(0, hi)

    def floats(self, shape, dtype=np.float32) -> np.ndarray:
        n = int(np.prod(shape)) if len(shape) else 1
        mode = self.int(0, 3)
        if mode == 0:      # small integers: many ties
            vals = [float(self.int(-3, 3)) for _ in range(n)]
        elif mode == 1:    # special values mixed in
            vals = [self.pick(SPECIAL_F) if self.int(0, 7) == 0 else self.p.ConsumeRegularFloat() for _ in range(n)]
        else:
            vals = [self.p.ConsumeProbability() * 4 - 2 for _ in range(n)]
        with np.errstate(all="ignore"):
            return np.asarray(vals, dtype=np.float64).astype(dtype).reshape(shape)

    def ids(self, n: int, bound: int, dtype=np.int64) -> np.ndarray:
        """n ids, mostly in [0, bound), sometimes out of range (negative, bound, extremes)."""
        info = np.iinfo(dtype)
        out = []
        for _ in range(n):
            r = self.int(0, 15)
            if r == 0:
                v = self.pick(SPECIAL_I)
            elif r == 1:
                v = bound + self.int(0, 2)
            elif r == 2:
                v = -self.int(1, 3)
            else:
                v = self.int(0, max(bound - 1, 0))
            out.append(min(max(v, info.min), info.max))
        return np.asarray(out, dtype=dtype)

    def indptr(self, n_lists: int, total: int) -> np.ndarray:
        """A CSR indptr of n_lists lists over total entries: usually valid, sometimes broken."""
        cuts = sorted(self.int(0, total) for _ in range(max(n_lists - 1, 0)))
        ip = [0] + cuts + [total] if n_lists >= 1 else [0]
        if self.int(0, 7) == 0 and ip:
            i = self.int(0, len(ip) - 1)
            ip[i] = self.pick([-1, total + 1, total + 100, 2**62, -2**62, ip[i] - 1])
        return np.asarray(ip, dtype=np.int64)

    def maybe_break(self, a: np.ndarray) -> np.ndarray:
        """Now and then a wrong dtype, byte order or layout (the core must answer TypeError)."""
        r = self.int(0, 31)
        if r == 0 and a.ndim >= 1 and a.shape[0] >= 2:
            return a[::2]
        if r == 1:
            return a.astype(a.dtype.newbyteorder(">"))
        if r == 2:
            return a.astype(np.float64 if a.dtype.kind == "f" else np.int16)
        if r == 3 and a.ndim == 2:
            return np.asfortranarray(a) if a.shape[0] > 1 and a.shape[1] > 1 else a
        if r == 4:  # unaligned but contiguous
            buf = np.zeros(a.nbytes + 1, np.uint8)
            v = buf[1:].view(a.dtype).reshape(a.shape)
            v[...] = a
            return v
        return a

    def threads(self) -> int:
        return self.pick([0, 1, 2, 3, -1])


def check_topk(ids: np.ndarray, scores: np.ndarray, n: int, k: int, b: int) -> None:
    assert ids.shape == scores.shape == (b, min(k, n)), (ids.shape, scores.shape, b, k, n)
    assert ((ids >= -1) & (ids < n)).all(), ids
    with np.errstate(invalid="ignore"):
        d = np.diff(scores, axis=1)
    assert not (d > 0).any(), scores       # best first (NaN items are refused by the core)


def op_topk(g: Gen) -> None:
    b, n, d = g.size(5), g.size(70), g.int(0, 20)
    q = g.maybe_break(g.floats((b, d)))
    x = g.maybe_break(g.floats((n, d)))
    k = g.pick([0, 1, 2, 5, 10, n, n + 1, 2**31, 2**62, -1])
    metric = g.pick(["ip", "cosine", "dot", "l2"])
    kw = {}
    if g.bool():
        m = g.size(12)
        kw["exclude_indptr"], kw["exclude_ids"] = g.indptr(b + g.pick([0, 0, 0, 1, -1]), m), g.ids(m, n)
    if g.bool():
        m = g.size(12)
        kw["candidates_indptr"], kw["candidates_ids"] = g.indptr(b, m), g.ids(m, n)
    ids, scores = _core.topk(q, x, k, metric, num_threads=g.threads(), **kw)
    check_topk(ids, scores, x.shape[0], k, q.shape[0])   # (a sliced empty array is still contiguous)


def op_quantize(g: Gen):
    n, d = g.size(140), g.int(0, 40)
    x = g.maybe_break(g.floats((n, d)))
    prec = g.pick(["int8", "bf16", "fp8"])
    return x, prec, _core.quantize_items(x, prec, num_threads=g.threads())


def op_topk_quantized(g: Gen) -> None:
    x, prec, (packed, corr, scale) = op_quantize(g)
    n, d = x.shape
    b = g.size(4)
    q = g.maybe_break(g.floats((b, d)))
    if g.int(0, 7) == 0:          # arrays that do not match the items
        packed = packed[: max(packed.shape[0] - 1, 0)].copy()
    k = g.pick([0, 1, 3, 10, n, n + 1, 2**40])
    shortlist = g.pick([0, 1, 5, 64, n, -1, 2**62])
    kw = {}
    if g.bool():
        m = g.size(10)
        kw["exclude_indptr"], kw["exclude_ids"] = g.indptr(b, m), g.ids(m, n)
    if g.bool():                  # the exact mode: the items' norms (sometimes of the wrong length)
        norm = _core.quantized_norms(x, prec) if x.dtype == np.float32 and x.ndim == 2 else np.ones(n, np.float32)
        if g.int(0, 7) == 0:
            norm = norm[: max(norm.shape[0] - 1, 0)].copy()
        kw["norm"], kw["norm_max"] = norm, float(norm.max()) if norm.size else 0.0
        kw["scale_max"] = float(scale[:n].max()) if n and scale.size >= n else 0.0
        kw["norm_all_max"], kw["scale_all_max"] = kw["norm_max"], kw["scale_max"]
    ids, scores, _ = _core.topk_quantized(q, x, packed, corr, scale, prec, k, shortlist, num_threads=g.threads(),
                                          **kw)
    check_topk(ids, scores, n, k, q.shape[0])


def make_table(g: Gen):
    rows, dim = g.size(40), g.int(0, 20)
    kind = g.pick(["float32", "float16", "int8"])
    if kind == "int8":
        w = np.frombuffer(g.p.ConsumeBytes(rows * dim).ljust(rows * dim, b"\0"), np.uint8).reshape(rows, dim).copy()
        sb = g.floats((rows + g.pick([0, 0, 0, 1]), 2))
        return _core.EmbeddingTable(g.maybe_break(w), g.maybe_break(sb)), w, rows
    w = g.floats((rows, dim), np.float16 if kind == "float16" else np.float32)
    sb = g.floats((rows, 2)) if g.int(0, 15) == 0 else None
    return _core.EmbeddingTable(g.maybe_break(w), sb), w, rows


def op_gather(g: Gen) -> None:
    t, w, rows = make_table(g)
    ids = g.maybe_break(g.ids(g.size(30), rows, g.pick([np.int32, np.int64])))
    out = t.gather(ids, g.threads())
    assert out.shape == (ids.shape[0], t.dim)
    if t.storage == "float32":
        np.testing.assert_array_equal(out, np.asarray(t.weights)[ids])


def op_pool(g: Gen) -> None:
    t, w, rows = make_table(g)
    dtype = g.pick([np.int32, np.int64])
    mode = g.pick(["sum", "mean", "max", "min"])
    last = g.bool()
    kw = {}
    if g.int(0, 3) == 0:          # fixed-size bags: 2-D indices, no offsets
        bags, length = g.size(6), g.size(5)
        idx = g.maybe_break(g.ids(bags * length, rows, dtype).reshape(bags, length))
        offsets = None
        n_idx = bags * length
    else:
        n_idx, bags = g.size(30), g.size(8)
        idx = g.maybe_break(g.ids(n_idx, rows, dtype))
        offsets = g.indptr(bags, n_idx)
        if not last:
            offsets = offsets[:-1].copy()
    if g.int(0, 3) == 0:
        kw["weights"] = g.maybe_break(g.floats((n_idx + g.pick([0, 0, 0, 1]),)))
    if g.int(0, 5) == 0:
        nb = idx.shape[0] if offsets is None else (offsets.shape[0] - (1 if last else 0))
        kw["out"] = g.maybe_break(np.zeros((max(nb, 0) + g.pick([0, 0, 1]), t.dim), np.float32))
    out = t.pool(idx, offsets, mode=mode, num_threads=g.threads(), include_last_offset=last, **kw)
    assert out.ndim == 2 and out.shape[1] == t.dim


def op_table(g: Gen) -> None:
    t, _, _ = make_table(g)
    _ = (t.rows, t.dim, t.storage, t.weights, t.scale_bias)


def op_adjacency(g: Gen) -> None:
    n_users = g.pick([0, 1, 3, 10, 2**31 - 1, 2**31, 2**62, 2**63 - 1, -1])
    n_items = g.pick([0, 1, 4, 10, 2**31 - 1, 2**62, 2**63 - 1, -1])
    if 10**5 < n_users + n_items <= 2**31 - 1 and min(n_users, n_items) >= 0:
        return      # a valid request for 2^31 nodes allocates their 16 GB: size, not a bug
    m = g.size(30)
    dtype = g.pick([np.int32, np.int64])
    u = g.maybe_break(g.ids(m, max(min(n_users, 12), 0), dtype))
    i = g.maybe_break(g.ids(m + g.pick([0, 0, 0, 1]), max(min(n_items, 12), 0), g.pick([dtype, dtype, np.int32])))
    indptr, indices, data = _core.normalized_adjacency(u, i, n_users, n_items, g.threads())
    assert indptr.shape[0] == n_users + n_items + 1 and indptr[-1] == indices.shape[0] == data.shape[0]


def make_csr(g: Gen, n_rows: int, n_cols: int):
    nnz = g.size(40)
    indptr = g.indptr(n_rows, nnz)
    indices = g.ids(nnz, n_cols, np.int32)
    data = g.floats((nnz + g.pick([0, 0, 0, 1]),))
    return g.maybe_break(indptr), g.maybe_break(indices), g.maybe_break(data)


def op_spmm(g: Gen) -> None:
    n_rows, n_cols, d = g.size(12), g.size(12), g.int(0, 17)
    indptr, indices, data = make_csr(g, n_rows, n_cols)
    dense = g.maybe_break(g.floats((n_cols + g.pick([0, 0, 0, 1]), d)))
    nc = g.pick([n_cols, n_cols, n_cols, n_cols + 1, -1, 2**62])
    out = _core.spmm(indptr, indices, data, nc, dense, g.threads())
    assert out.shape == (indptr.shape[0] - 1, d)


def op_propagate(g: Gen) -> None:
    n, d = g.size(12), g.int(0, 17)
    indptr, indices, data = make_csr(g, n + g.pick([0, 0, 0, 1]), n)
    emb = g.maybe_break(g.floats((n, d)))
    lw = g.maybe_break(g.floats((g.size(5),)))
    out = _core.lightgcn_propagate(indptr, indices, data, emb, lw, g.threads())
    assert out.shape == (n, d)


def op_keys_ints(g: Gen) -> None:
    n = g.size(30)
    keys = g.maybe_break(np.asarray([g.pick(SPECIAL_I) if g.int(0, 3) == 0 else g.int(-5, 40) for _ in range(n)],
                                    dtype=np.int64))
    ki = _core.KeyIndex(keys)
    n = keys.shape[0]               # (maybe_break may have sliced an empty array)
    assert len(ki) == n and not ki.holds_strings
    probes = [g.pick(SPECIAL_I + [2**64, -2**70, "a", 1.5, True, None]) if g.int(0, 3) == 0 else g.int(-5, 40)
              for _ in range(g.size(10))]
    for p in probes[:3]:
        r = ki.find(p)
        assert -1 <= r < n
    arr = g.bool()
    out = ki.lookup(np.asarray([p for p in probes if isinstance(p, int) and -2**63 <= p < 2**63], np.int64)
                    if arr else probes)
    assert ((out >= -1) & (out < n)).all()
    if g.int(0, 7) == 0:
        ki.strings(g.ids(g.size(3), n))


def op_keys_strings(g: Gen) -> None:
    blob = g.p.ConsumeBytes(g.size(60))
    n = g.size(10)
    offsets = g.indptr(n, len(blob))
    if g.int(0, 7) == 0:
        offsets = offsets[:-1].copy() if offsets.shape[0] > 1 else np.zeros(0, np.int64)
    b = g.maybe_break(np.frombuffer(blob, np.uint8).copy())
    ki = _core.KeyIndex(b, g.maybe_break(offsets))
    n = len(ki)
    probes = [g.p.ConsumeUnicodeNoSurrogates(g.size(6)) if g.int(0, 7) else g.pick([1, "\ud800", b"x", None])
              for _ in range(g.size(6))]
    for p in probes[:3]:
        assert -1 <= ki.find(p) < n
    out = ki.lookup(probes)
    assert ((out >= -1) & (out < n)).all()
    ids = g.ids(g.size(5), n)
    s = ki.strings(ids)             # stored keys that are not UTF-8 raise UnicodeDecodeError, a ValueError
    assert len(s) == ids.shape[0]


def op_simd(g: Gen) -> None:
    _core.set_simd_level(g.pick(LEVELS + ["avx9", "", "SCALAR"]))
    _ = (_core.simd_level(), _core.best_simd_level(), _core.openmp_enabled(), _core.default_num_threads())


DISPATCH = {"topk": op_topk, "topk_quantized": op_topk_quantized, "quantize_items": op_quantize,
            "gather": op_gather, "pool": op_pool, "table": op_table, "normalized_adjacency": op_adjacency,
            "spmm": op_spmm, "lightgcn_propagate": op_propagate, "keyindex_ints": op_keys_ints,
            "keyindex_strings": op_keys_strings, "simd": op_simd}


def test_one(data: bytes) -> None:
    g = Gen(data)
    op = OPS[g.int(0, len(OPS) - 1)]
    _core.set_simd_level(g.pick(LEVELS))
    try:
        DISPATCH[op](g)
    except ALLOWED:
        pass
    except Exception as e:  # noqa: BLE001 - anything else is a finding
        unexpected(e, f"core.{op}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one)
    atheris.Fuzz()
