"""rec_engine kernels side by side with the tools people use today, in one pytest-benchmark run.

Groups (each times rec_engine and its baselines on the same data, one after the other):

- topk single k=10 / k=100: 1 query against N items x 64 (N = --bench-items, 200k by default), 50
  excluded ids: rec_engine.topk vs NumPy (matmul + argpartition + sort) vs torch (mv + topk) vs FAISS
  IndexFlatIP (search k + 50, then drop the excluded ids).
- topk batch k=10 / k=100: 256 queries, 50 excluded per query: the same four, and "rec_engine bf16
  screen": an exact ItemIndex(precision="bf16", copy=False), which keeps no bf16 copy but converts each
  panel of the float32 items as the batch's scan reaches it (what a float32 Engine's batches of 64 users
  or more use); its answer is checked as the exact scan's.
- in both top-k groups, "rec_engine int8" and "rec_engine bf16": rec_engine.topk on an ItemIndex
  (reduced-precision scan, exact=False: the shortlist trusted and re-scored in float32), each checked for recall@k >= 0.99
  against the exact result (recorded in extra_info["recall"]) and compared with the fastest baseline.
- embedding_bag {float32,float16,int8} {sum,mean}: 4096 bags x 20 ids over a 1M x 64 table:
  rec_engine (table in that storage) vs torch embedding_bag on the float32 table (the reference),
  torch on a float16 table / FBGEMM's int8 row-wise op on the same codes, and NumPy (take + sum).
- request lookup: 26 bags x 20 ids on a 100k x 16 table, one call: rec_engine vs torch embedding_bag.
- topk sweep: latency against corpus size and batch size (for bench/report.py's plots).
- spmm / lightgcn: a Gowalla-sized random bipartite graph (29,858 users, 40,981 items, 810,128
  interactions, power-law item popularity), 64 dims: rec_engine vs torch.sparse CSR vs SciPy CSR.

Every implementation's answer is checked once, outside the timed part, against an exact float64
reference (so rec_engine and each baseline agree with each other), so no benchmark times a wrong answer.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

# --- FAISS: make its bundled OpenBLAS use the AVX-512 kernels ---------------------------------------
# faiss-cpu wheels ship their own OpenBLAS (0.3.15 in faiss-cpu 1.15), which reads OPENBLAS_CORETYPE
# once, when `import faiss` loads it. On this CPU (AMD Zen 4) it otherwise picks its "Zen" kernels and
# batch search is several times slower. The environment of this workplace may set OPENBLAS_CORETYPE for
# other reasons (old OpenBLAS builds misbehave on some CPUs); we override it only around the faiss import
# and put the previous value back, so NumPy's and SciPy's own OpenBLAS are not affected (NumPy's is loaded
# already, by conftest; SciPy's loads later with the restored environment). The core each OpenBLAS
# picked is printed in the ratio table header ("OpenBLAS cores"). Nothing else may import faiss before
# this point, so conftest.py does not.
assert "faiss" not in sys.modules, "faiss was imported before bench_kernels could set OPENBLAS_CORETYPE"
_saved_coretype = os.environ.get("OPENBLAS_CORETYPE")
os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
try:
    import faiss
except ImportError:  # not installed: the faiss benchmarks skip with a visible reason
    faiss = None
finally:
    if _saved_coretype is None:
        os.environ.pop("OPENBLAS_CORETYPE", None)
    else:
        os.environ["OPENBLAS_CORETYPE"] = _saved_coretype
if faiss is not None:
    # Batches of 20 queries or more use FAISS's BLAS path (sgemm + heap), its fast path for batches.
    faiss.cvar.distance_compute_blas_threshold = 20

import scipy.sparse as sp  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import rec_engine  # noqa: E402

DIM = 64
N_EXCLUDED = 50
BATCH = 256
BAGS, BAG_LEN = 4096, 20
TOL_TOPK = 1e-3  # absolute, on scores of magnitude ~10 (float32 dot products of 64 N(0,1) pairs)

# Rounds per implementation and case, in all (at least 20: medians are taken over 20
# repetitions or more). They are split into PASSES interleaved passes: the implementations of a case
# take turns (rec_engine, numpy, torch, faiss, rec_engine, numpy, ...), each pass a benchmark of its own
# whose first, untimed call checks the answer and warms up; the ratio table merges the passes of an
# implementation. Taking turns spreads the slow phases of this shared machine over everyone instead of
# letting one of them land on a single implementation.
ROUNDS_TOPK_SINGLE = 60
ROUNDS_TOPK_BATCH = 20
ROUNDS_BAG = 100
ROUNDS_BAG_NUMPY = 20
ROUNDS_REQUEST = 5000
ROUNDS_SPMM = 40
ROUNDS_LIGHTGCN = 20
PASSES = 4
PASSES_SLOW = 2  # topk batch and LightGCN: fewer, longer passes


@pytest.fixture(scope="module", autouse=True)
def _threads(threads):
    """Every library on the same thread count: rec_engine gets num_threads= in each call. (Left set at
    the end, so the ratio table header reports the counts used.)"""
    torch.set_num_threads(threads)
    if faiss is not None:
        faiss.omp_set_num_threads(threads)


def passes(cases, n):
    """Parameters ``(*case, pass, impl)``: for each case, ``n`` passes over its implementations in turn."""
    return [(*case[:-1], p, impl) for case in cases for p in range(n) for impl in case[-1]]


def run(benchmark, group, impl, fn, check, rounds, threads, n_passes, pass_no, warmup_rounds=0, **info):
    """Check ``fn``'s answer once (untimed, it also warms up), then time ``rounds / n_passes`` rounds of
    one call each."""
    benchmark.group = group
    benchmark.extra_info.update(impl=impl, threads=threads, simd=rec_engine.simd_level(), pass_no=pass_no,
                                passes=n_passes, **info)
    found = check(fn())
    if isinstance(found, dict):   # e.g. the recall of a reduced-precision search
        benchmark.extra_info.update(found)
    benchmark.pedantic(fn, rounds=-(-rounds // n_passes), iterations=1, warmup_rounds=warmup_rounds)


def need_faiss():
    if faiss is None:
        pytest.skip("faiss not installed (pip install faiss-cpu)")


# ==================================================================================== top-k
class TopkCase:
    """Queries, items, excluded ids in every form a library takes, and the exact float64 k-th scores."""

    def __init__(self, n_items, n_queries, ks, seed):
        rng = np.random.default_rng(seed)
        self.items = rng.standard_normal((n_items, DIM), dtype=np.float32)
        self.queries = rng.standard_normal((n_queries, DIM), dtype=np.float32)
        self.excluded = np.stack([np.sort(rng.choice(n_items, N_EXCLUDED, replace=False))
                                  for _ in range(n_queries)])  # (B, 50) int64
        self.exclude_lists = rec_engine.IdLists(np.arange(0, (n_queries + 1) * N_EXCLUDED, N_EXCLUDED),
                                                self.excluded.reshape(-1))
        self.rows = np.repeat(np.arange(n_queries), N_EXCLUDED)
        self.items_t = torch.from_numpy(self.items)
        self.queries_t = torch.from_numpy(self.queries)
        self.rows_t = torch.from_numpy(self.rows)
        self.excluded_t = torch.from_numpy(self.excluded.reshape(-1))
        # exact k-th best score of every query (float64, excluded items at -inf), chunked over queries
        self.kth = {k: np.empty(n_queries) for k in ks}
        x64 = self.items.astype(np.float64)
        for lo in range(0, n_queries, 32):
            s = self.queries[lo:lo + 32].astype(np.float64) @ x64.T
            s[np.repeat(np.arange(s.shape[0]), N_EXCLUDED), self.excluded[lo:lo + 32].reshape(-1)] = -np.inf
            for k in ks:
                self.kth[k][lo:lo + 32] = -np.partition(-s, k - 1, axis=1)[:, k - 1]
        self._item_index = {}
        self.faiss_index = None
        if faiss is not None:
            self.faiss_index = faiss.IndexFlatIP(DIM)
            self.faiss_index.add(self.items)

    def check(self, k, ids, scores=None):
        """``ids`` (B, k) are k distinct, non-excluded items, each within TOL of the exact top k, best first."""
        ids = np.atleast_2d(np.asarray(ids))
        b = self.queries.shape[0]
        assert ids.shape == (b, k), ids.shape
        assert (ids >= 0).all() and (ids < self.items.shape[0]).all()
        assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all(), "duplicate ids in a result"
        assert not (ids[:, :, None] == self.excluded[:, None, :]).any(), "an excluded id was returned"
        exact = np.einsum("bd,bkd->bk", self.queries.astype(np.float64), self.items[ids].astype(np.float64))
        assert (exact >= self.kth[k][:, None] - TOL_TOPK).all(), "a returned item is not in the exact top k"
        assert (np.diff(exact, axis=1) <= TOL_TOPK).all(), "results are not best first"
        if scores is not None:
            np.testing.assert_allclose(np.atleast_2d(np.asarray(scores, dtype=np.float64)), exact, rtol=0, atol=TOL_TOPK)


    def screen(self):
        """The exact bf16 ItemIndex without a copy (built once, outside the timing)."""
        if "screen" not in self._item_index:
            self._item_index["screen"] = rec_engine.ItemIndex(self.items, "bf16", copy=False)
        return self._item_index["screen"]

    def item_index(self, precision):
        """The items as a ``rec_engine.ItemIndex`` of that precision (built once, outside the timing)."""
        if precision not in self._item_index:
            self._item_index[precision] = rec_engine.ItemIndex(self.items, precision, exact=False)
        return self._item_index[precision]

    def check_recall(self, k, ids, scores):
        """A reduced-precision result: k distinct non-excluded ids, best first, exact float32 scores, and
        recall@k against the exact top k of at least MIN_RECALL; returns ``{"recall": ...}``."""
        ids = np.atleast_2d(np.asarray(ids))
        assert ids.shape == (self.queries.shape[0], k), ids.shape
        assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all(), "duplicate ids in a result"
        assert not (ids[:, :, None] == self.excluded[:, None, :]).any(), "an excluded id was returned"
        exact = np.einsum("bd,bkd->bk", self.queries.astype(np.float64), self.items[ids].astype(np.float64))
        np.testing.assert_allclose(np.atleast_2d(np.asarray(scores, dtype=np.float64)), exact, rtol=0, atol=TOL_TOPK)
        assert (np.diff(exact, axis=1) <= TOL_TOPK).all(), "results are not best first"
        recall = float((exact >= self.kth[k][:, None] - TOL_TOPK).mean())
        assert recall >= MIN_RECALL, f"recall@{k} {recall:.4f} < {MIN_RECALL}"
        return {"recall": recall}


def faiss_filtered(index, queries, excluded, k):
    """FAISS has no per-query exclusion for a flat index: search k + 50, drop the excluded, keep k."""
    scores, ids = index.search(queries, k + N_EXCLUDED)
    hit = (ids[:, :, None] == excluded[:, None, :]).any(axis=2)
    keep = np.argsort(hit, axis=1, kind="stable")[:, :k]  # first k survivors, still best first
    return np.take_along_axis(ids, keep, 1), np.take_along_axis(scores, keep, 1)


@pytest.fixture(scope="module")
def single_case(pytestconfig):
    return TopkCase(pytestconfig.getoption("--bench-items"), 1, (10, 100), seed=1)


@pytest.fixture(scope="module")
def batch_case(pytestconfig):
    return TopkCase(pytestconfig.getoption("--bench-items"), BATCH, (10, 100), seed=2)


# "rec_engine int8" / "rec_engine bf16": rec_engine.topk on an ItemIndex (reduced-precision scan, shortlist
# re-scored exactly); the ratio table compares them with the fastest baseline and records their recall.
TOPK_IMPLS = ["rec_engine", "rec_engine int8", "rec_engine bf16", "numpy", "torch", "faiss"]
MIN_RECALL = 0.99


@pytest.mark.parametrize("k,pass_no,impl", passes([(10, TOPK_IMPLS), (100, TOPK_IMPLS)], PASSES))
def bench_topk_single(benchmark, single_case, threads, k, pass_no, impl):
    c = single_case
    q, x, ex = c.queries[0], c.items, c.excluded[0]
    group = f"topk single k={k} (1 query, {x.shape[0]} x {DIM}, {N_EXCLUDED} excluded)"
    if impl == "rec_engine":
        def fn():
            return rec_engine.topk(q, x, k, exclude=ex, num_threads=threads)
        check = lambda r: c.check(k, r.ids, r.scores)  # noqa: E731
    elif impl.startswith("rec_engine "):
        index = c.item_index(impl.split()[1])

        def fn():
            return rec_engine.topk(q, index, k, exclude=ex, num_threads=threads)
        check = lambda r: c.check_recall(k, r.ids, r.scores)  # noqa: E731
    elif impl == "numpy":
        def fn():
            s = x @ q
            s[ex] = -np.inf
            part = np.argpartition(s, s.shape[0] - k)[-k:]
            return part[np.argsort(-s[part], kind="stable")]
        check = lambda r: c.check(k, r)  # noqa: E731
    elif impl == "torch":
        qt, xt, ext = c.queries_t[0], c.items_t, c.excluded_t

        def fn():
            s = torch.mv(xt, qt)
            s[ext] = -torch.inf
            return torch.topk(s, k)
        check = lambda r: c.check(k, r.indices.numpy(), r.values.numpy())  # noqa: E731
    else:
        need_faiss()
        qq, exx = c.queries[:1], c.excluded[:1]

        def fn():
            return faiss_filtered(c.faiss_index, qq, exx, k)
        check = lambda r: c.check(k, r[0], r[1])  # noqa: E731
    run(benchmark, group, impl, fn, check, ROUNDS_TOPK_SINGLE, threads, PASSES, pass_no, k=k, items=x.shape[0])


BATCH_IMPLS = TOPK_IMPLS + ["rec_engine bf16 screen"]


@pytest.mark.parametrize("k,pass_no,impl", passes([(10, BATCH_IMPLS), (100, BATCH_IMPLS)], PASSES_SLOW))
def bench_topk_batch(benchmark, batch_case, threads, k, pass_no, impl):
    c = batch_case
    q, x = c.queries, c.items
    group = f"topk batch k={k} ({q.shape[0]} queries, {x.shape[0]} x {DIM}, {N_EXCLUDED} excluded per query)"
    if impl == "rec_engine":
        def fn():
            return rec_engine.topk(q, x, k, exclude=c.exclude_lists, num_threads=threads)
        check = lambda r: c.check(k, r.ids, r.scores)  # noqa: E731
    elif impl == "rec_engine bf16 screen":
        index = c.screen()

        def fn():
            return rec_engine.topk(q, index, k, exclude=c.exclude_lists, num_threads=threads)
        check = lambda r: c.check(k, r.ids, r.scores)  # noqa: E731
    elif impl.startswith("rec_engine "):
        index = c.item_index(impl.split()[1])

        def fn():
            return rec_engine.topk(q, index, k, exclude=c.exclude_lists, num_threads=threads)
        check = lambda r: c.check_recall(k, r.ids, r.scores)  # noqa: E731
    elif impl == "numpy":
        cols = c.excluded.reshape(-1)

        def fn():
            s = q @ x.T
            s[c.rows, cols] = -np.inf
            part = np.argpartition(s, s.shape[1] - k, axis=1)[:, -k:]
            order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
            return np.take_along_axis(part, order, 1)
        check = lambda r: c.check(k, r)  # noqa: E731
    elif impl == "torch":
        def fn():
            s = torch.mm(c.queries_t, c.items_t.T)
            s[c.rows_t, c.excluded_t] = -torch.inf
            return torch.topk(s, k, dim=1)
        check = lambda r: c.check(k, r.indices.numpy(), r.values.numpy())  # noqa: E731
    else:
        need_faiss()

        def fn():
            return faiss_filtered(c.faiss_index, q, c.excluded, k)
        check = lambda r: c.check(k, r[0], r[1])  # noqa: E731
    run(benchmark, group, impl, fn, check, ROUNDS_TOPK_BATCH, threads, PASSES_SLOW, pass_no, k=k, items=x.shape[0], batch=q.shape[0])


# ============================================================================== embedding bag
class BagCase:
    def __init__(self, rows, seed):
        rng = np.random.default_rng(seed)
        self.w32 = rng.standard_normal((rows, DIM), dtype=np.float32)
        self.ids = rng.integers(0, rows, (BAGS, BAG_LEN), dtype=np.int64)
        self.ids_t = torch.from_numpy(self.ids)
        self.flat_t = self.ids_t.reshape(-1)
        self.offsets_t = torch.arange(0, BAGS * BAG_LEN, BAG_LEN, dtype=torch.int64)
        self.tables = {"float32": rec_engine.EmbeddingTable(self.w32),
                       "float16": rec_engine.EmbeddingTable.quantize(self.w32, "float16"),
                       "int8": rec_engine.EmbeddingTable.quantize(self.w32, "int8")}
        self.w32_t = torch.from_numpy(self.w32)
        self.w16 = self.tables["float16"].weights  # the table's own float16 array
        self.w16_t = torch.from_numpy(self.w16)
        codes, sb = self.tables["int8"].weights, self.tables["int8"].scale_bias
        self.codes, self.sb = codes, sb
        # FBGEMM's row-wise 8-bit layout: the codes, then float32 scale and bias, on each row; the same
        # codes as rec_engine's table, so both dequantize to the same values.
        self.fbgemm_packed = torch.from_numpy(np.concatenate([codes, sb.view(np.uint8)], axis=1))
        self._refs = {}

    def dequantized(self, dtype, ids):
        """float64 values of rows ``ids`` as stored in the ``dtype`` table."""
        if dtype == "float32":
            return self.w32[ids].astype(np.float64)
        if dtype == "float16":
            return self.w16[ids].astype(np.float64)
        sb = self.sb[ids].astype(np.float64)
        return self.codes[ids].astype(np.float64) * sb[..., :1] + sb[..., 1:]

    def reference(self, dtype, mode):
        key = (dtype, mode)
        if key not in self._refs:
            rows = self.dequantized(dtype, self.ids)
            self._refs[key] = rows.sum(axis=1) if mode == "sum" else rows.mean(axis=1)
        return self._refs[key]


@pytest.fixture(scope="module")
def bag_case(pytestconfig):
    return BagCase(pytestconfig.getoption("--bench-table-rows"), seed=3)


BAG_CASES = [(dtype, mode, ["rec_engine", "torch-f32"]
                            + (["torch-f16"] if dtype == "float16" else [])
                            + (["torch-int8-fbgemm"] if dtype == "int8" else [])
                            + ["numpy"])
             for dtype in ("float32", "float16", "int8")
             for mode in ("sum", "mean")]


@pytest.mark.parametrize("dtype,mode,pass_no,impl", passes(BAG_CASES, PASSES))
def bench_embedding_bag(benchmark, bag_case, threads, dtype, mode, pass_no, impl):
    c = bag_case
    rows = c.w32.shape[0]
    group = f"embedding_bag {dtype} {mode} ({rows} x {DIM} table, {BAGS} bags x {BAG_LEN} ids)"
    ref_dtype, atol, rounds = dtype, 1e-4, ROUNDS_BAG
    if impl == "rec_engine":
        table = c.tables[dtype]

        def fn():
            return table.pool(c.ids, mode=mode, num_threads=threads)
    elif impl == "torch-f32":  # the reference: torch on the float32 table, whatever rec_engine stores
        ref_dtype = "float32"

        def fn():
            return F.embedding_bag(c.ids_t, c.w32_t, mode=mode)
    elif impl == "torch-f16":
        atol = 0.05  # torch returns float16: ~3 significant digits on sums of magnitude ~5-20

        def fn():
            return F.embedding_bag(c.ids_t, c.w16_t, mode=mode)
    elif impl == "torch-int8-fbgemm":
        op = getattr(getattr(torch.ops, "quantized", None), "embedding_bag_byte_rowwise_offsets", None)
        if op is None:
            pytest.skip("this torch build has no quantized::embedding_bag_byte_rowwise_offsets (FBGEMM)")
        # The op takes a mode argument but always sums (torch 2.13 returns sums for mode=1, "mean"), so
        # mean is its sum scaled by 1 / bag length, as glue code would do it.
        if mode == "sum":
            def fn():
                return op(c.fbgemm_packed, c.flat_t, c.offsets_t, False, 0, False, None, None, False)
        else:
            def fn():
                return op(c.fbgemm_packed, c.flat_t, c.offsets_t, False, 0, False, None, None, False).mul_(1.0 / BAG_LEN)
    else:
        rounds = ROUNDS_BAG_NUMPY
        if dtype == "float32":
            def fn():
                g = c.w32[c.ids]
                return g.sum(axis=1) if mode == "sum" else g.mean(axis=1)
        elif dtype == "float16":
            def fn():
                g = c.w16[c.ids].astype(np.float32)
                return g.sum(axis=1) if mode == "sum" else g.mean(axis=1)
        else:
            def fn():
                sb = c.sb[c.ids]
                g = c.codes[c.ids].astype(np.float32) * sb[..., :1] + sb[..., 1:]
                return g.sum(axis=1) if mode == "sum" else g.mean(axis=1)

    def check(r):
        r = r.float().numpy() if isinstance(r, torch.Tensor) else r
        assert r.shape == (BAGS, DIM)
        np.testing.assert_allclose(r, c.reference(ref_dtype, mode), rtol=1e-5, atol=atol)

    run(benchmark, group, impl, fn, check, rounds, threads, PASSES, pass_no, dtype=dtype, mode=mode, rows=rows)


# ============================================================================= request lookup
@pytest.fixture(scope="module")
def request_case():
    rng = np.random.default_rng(4)
    w = rng.standard_normal((100_000, 16), dtype=np.float32)
    ids = rng.integers(0, w.shape[0], (26, BAG_LEN), dtype=np.int64)
    ref = w[ids].astype(np.float64).sum(axis=1)
    return w, ids, ref, rec_engine.EmbeddingTable(w), torch.from_numpy(w), torch.from_numpy(ids)


@pytest.mark.parametrize("pass_no,impl", passes([(["rec_engine", "torch"],)], PASSES))
def bench_request_lookup(benchmark, request_case, threads, pass_no, impl):
    w, ids, ref, table, w_t, ids_t = request_case
    group = f"request lookup (26 bags x {BAG_LEN} ids, {w.shape[0]} x {w.shape[1]} table, one call)"
    if impl == "rec_engine":
        def fn():
            return table.pool(ids, mode="sum", num_threads=threads)
    else:
        def fn():
            return F.embedding_bag(ids_t, w_t, mode="sum")

    def check(r):
        r = r.numpy() if isinstance(r, torch.Tensor) else r
        np.testing.assert_allclose(r, ref, rtol=1e-5, atol=1e-5)

    run(benchmark, group, impl, fn, check, ROUNDS_REQUEST, threads, PASSES, pass_no, warmup_rounds=200)


# ================================================================================ propagation
N_USERS, N_ITEMS, N_INTERACTIONS = 29_858, 40_981, 810_128  # the Gowalla training split's sizes
N_LAYERS = 3


class GraphCase:
    def __init__(self, seed):
        rng = np.random.default_rng(seed)
        # power-law item popularity (p ~ rank^-0.8, ranks shuffled), uniform users; distinct pairs
        p = 1.0 / np.arange(1, N_ITEMS + 1) ** 0.8
        p /= p.sum()
        perm = rng.permutation(N_ITEMS)
        keys = np.zeros(0, dtype=np.int64)
        while keys.size < N_INTERACTIONS:
            n = N_INTERACTIONS - keys.size
            u = rng.integers(0, N_USERS, 2 * n)
            i = perm[rng.choice(N_ITEMS, 2 * n, p=p)]
            keys = np.unique(np.concatenate([keys, u * N_ITEMS + i]))
        keys = rng.permutation(keys)[:N_INTERACTIONS]
        self.users, self.items = keys // N_ITEMS, keys % N_ITEMS
        self.adj = rec_engine.normalized_adjacency(self.users, self.items, N_USERS, N_ITEMS)
        n = self.adj.shape[0]
        self.x = (0.1 * rng.standard_normal((n, DIM))).astype(np.float32)
        self.scipy_adj = self.adj.to_scipy()
        self.torch_adj = torch.sparse_csr_tensor(
            torch.from_numpy(self.adj.indptr.astype(np.int32)), torch.from_numpy(self.adj.indices),
            torch.from_numpy(self.adj.data), size=self.adj.shape, check_invariants=True)
        self.x_t = torch.from_numpy(self.x)
        # float64 references
        a64 = self.scipy_adj.astype(np.float64)
        h = self.x.astype(np.float64)
        acc = h.copy()
        self.ref_spmm = a64 @ h
        for _ in range(N_LAYERS):
            h = a64 @ h
            acc += h
        self.ref_lightgcn = acc / (N_LAYERS + 1)
        # the normalized adjacency itself, checked once against SciPy
        deg_u = np.bincount(self.users, minlength=N_USERS).astype(np.float64)
        deg_i = np.bincount(self.items, minlength=N_ITEMS).astype(np.float64)
        val = 1.0 / np.sqrt(deg_u[self.users] * deg_i[self.items])
        half = sp.csr_matrix((val, (self.users, N_USERS + self.items)), shape=(n, n))
        diff = (half + half.T) - a64
        assert abs(diff).max() < 1e-6, "normalized_adjacency disagrees with D^-1/2 A D^-1/2"

    @property
    def label(self):
        return f"{self.adj.shape[0]} nodes, {self.adj.nnz} nnz, d={DIM}"


@pytest.fixture(scope="module")
def graph_case():
    return GraphCase(seed=5)


GRAPH_IMPLS = ["rec_engine", "torch", "scipy"]


def _check_dense(ref):
    def check(r):
        r = r.numpy() if isinstance(r, torch.Tensor) else r
        np.testing.assert_allclose(r, ref, rtol=1e-4, atol=1e-6)
    return check


@pytest.mark.parametrize("pass_no,impl", passes([(GRAPH_IMPLS,)], PASSES))
def bench_spmm(benchmark, graph_case, threads, pass_no, impl):
    g = graph_case
    if impl == "rec_engine":
        def fn():
            return rec_engine.spmm(g.adj, g.x, num_threads=threads)
    elif impl == "torch":
        def fn():
            return g.torch_adj @ g.x_t
    else:  # SciPy's CSR x dense product is single-threaded
        def fn():
            return g.scipy_adj @ g.x
    run(benchmark, f"spmm ({g.label})", impl, fn, _check_dense(g.ref_spmm), ROUNDS_SPMM, threads, PASSES, pass_no)


@pytest.mark.parametrize("pass_no,impl", passes([(GRAPH_IMPLS,)], PASSES_SLOW))
def bench_lightgcn(benchmark, graph_case, threads, pass_no, impl):
    g = graph_case
    if impl == "rec_engine":
        def fn():
            return rec_engine.propagate(g.adj, g.x, N_LAYERS, num_threads=threads)
    elif impl == "torch":
        def fn():
            h = g.x_t
            acc = h.clone()
            for _ in range(N_LAYERS):
                h = g.torch_adj @ h
                acc += h
            return acc.div_(N_LAYERS + 1)
    else:
        def fn():
            h = g.x
            acc = h.copy()
            for _ in range(N_LAYERS):
                h = g.scipy_adj @ h
                acc += h
            acc /= N_LAYERS + 1
            return acc
    run(benchmark, f"lightgcn {N_LAYERS} layers, layer mean ({g.label})", impl, fn,
        _check_dense(g.ref_lightgcn), ROUNDS_LIGHTGCN, threads, PASSES_SLOW, pass_no)


# ============================================================================ size sweeps (plots)
# Latency against corpus size and against batch size, for bench/report.py's plots: k=10, no exclusion,
# few rounds (these are curves, the ratio groups above are the precise comparisons).
SWEEP_ITEMS = (10_000, 100_000, 1_000_000)
SWEEP_BATCHES = (1, 16, 64, 256)
SWEEP_BATCH_ITEMS = 100_000
ROUNDS_SWEEP = 20
SWEEP_IMPLS = ["rec_engine", "numpy", "torch"]


@pytest.fixture(scope="module")
def sweep_data():
    rng = np.random.default_rng(6)
    items = rng.standard_normal((max(SWEEP_ITEMS), DIM), dtype=np.float32)
    queries = rng.standard_normal((max(SWEEP_BATCHES), DIM), dtype=np.float32)
    return items, queries


def _sweep_fn(impl, q, x, k, threads):
    if impl == "rec_engine":
        return lambda: rec_engine.topk(q, x, k, num_threads=threads).ids
    if impl == "numpy":
        def fn():
            s = q @ x.T
            part = np.argpartition(-s, k - 1, axis=1)[:, :k]
            order = np.argsort(-np.take_along_axis(s, part, 1), axis=1, kind="stable")
            return np.take_along_axis(part, order, 1)
        return fn
    qt, xt = torch.from_numpy(q), torch.from_numpy(x)
    return lambda: torch.topk(qt @ xt.T, k, dim=1)


def _sweep_check(q, x, k):
    kth = -np.partition(-(q.astype(np.float64) @ x.astype(np.float64).T), k - 1, axis=1)[:, k - 1]

    def check(r):
        ids = np.atleast_2d(r.numpy() if isinstance(r, torch.Tensor) else np.asarray(r))
        exact = np.einsum("bd,bkd->bk", q.astype(np.float64), x[ids].astype(np.float64))
        assert (exact >= kth[:, None] - TOL_TOPK).all()
    return check


@pytest.mark.parametrize("n_items,pass_no,impl", passes([(n, SWEEP_IMPLS) for n in SWEEP_ITEMS], 1))
def bench_topk_size_sweep(benchmark, sweep_data, threads, n_items, pass_no, impl):
    x, q = sweep_data[0][:n_items], sweep_data[1][:1]
    fn = _sweep_fn(impl, q, x, 10, threads)
    if impl == "torch":
        inner = fn
        fn = lambda: inner().indices  # noqa: E731
    run(benchmark, f"topk sweep items={n_items} (1 query, k=10)", impl, fn, _sweep_check(q, x, 10),
        ROUNDS_SWEEP, threads, 1, pass_no, items=n_items, batch=1, sweep="items")


@pytest.mark.parametrize("batch,pass_no,impl", passes([(b, SWEEP_IMPLS) for b in SWEEP_BATCHES], 1))
def bench_topk_batch_sweep(benchmark, sweep_data, threads, batch, pass_no, impl):
    x, q = sweep_data[0][:SWEEP_BATCH_ITEMS], sweep_data[1][:batch]
    fn = _sweep_fn(impl, q, x, 10, threads)
    if impl == "torch":
        inner = fn
        fn = lambda: inner().indices  # noqa: E731
    run(benchmark, f"topk sweep batch={batch} ({SWEEP_BATCH_ITEMS} items, k=10)", impl, fn,
        _sweep_check(q, x, 10), ROUNDS_SWEEP, threads, 1, pass_no, items=SWEEP_BATCH_ITEMS, batch=batch,
        sweep="batch")
