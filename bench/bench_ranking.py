"""Ranking alone: the engine's ``CtrRanker`` (C++ lookup + the ONNX dense part) beside the whole CTR model
in ONNX Runtime.

The model: an untrained DeepFM over 26 single-valued categorical fields (8 user fields, 12 item fields,
6 context fields; ``dim=16``, MLP 400-400-400), exported by ``export_ctr`` with feature stores for every
user and item (as ``bench_engine.py`` builds it, without training: latency does not depend on the
weights). Cases: 1, 64 and 500 candidates of one user in one context.

Implementations:

- ``onnxruntime-whole``: the same model exported whole (``torch.onnx.export(dynamo=True)``, dynamic batch):
  input ``ids`` int64 ``[B, 26]`` (global rows of the shared tables), the embedding and first-order
  gathers, the dense part and the sigmoid inside the graph; timed as ``session.run(["prob"], {"ids": ids})``
  on ids encoded beforehand (the baseline does no feature work at all).
- ``onnxruntime-whole-iobinding``: the same session called the fastest way ONNX Runtime offers: the ids
  copied into an input buffer bound once to an ``IOBinding``, the probabilities written into a bound
  output buffer and copied out (``session.run`` converts its feed and allocates its outputs on every call,
  ~7 us).
- ``rec_engine``: the bundle opened with ``load_ctr_scorer``, in two groups:
  ``ranking score_candidates ...``: ``ranker.score_candidates(user, candidates, context)`` (items and the
  user from the bundle's feature stores, context fields encoded from the request), and
  ``ranking encoded ...``: ``ranker(batch)`` on the same examples as an ``EncodedBatch`` encoded beforehand.

Both use ONNX Runtime with ``intra_op_num_threads`` = each value of ``REC_BENCH_RANKING_ORT_THREADS``
(comma-separated, default ``1``; e.g. ``1,2``) and one inter-op thread; the core pools on one thread (the
``CtrRanker`` default). Before timing, the probabilities of both paths must agree with the whole model's
within 1e-5. The implementations of a group take turns in 4 interleaved passes (see bench_kernels.py).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import rec_engine

SEED = 0
DIM = 16
MLP = (400, 400, 400)
N_USERS, N_ITEMS = 20_000, 100_000
BATCHES = (1, 64, 500)
PASSES = 4
ROUNDS = {1: 4000, 64: 1200, 500: 240}      # per implementation and group, all passes together
TOL = 1e-5
IMPLS = ("rec_engine", "onnxruntime-whole", "onnxruntime-whole-iobinding")
PATHS = ("score_candidates", "encoded")

# (name, vocabulary size; None = the number of users / items); each field has one hash bucket
USER_FIELDS = [("user_id", None), ("user_age", 7), ("user_gender", 3), ("user_city", 500), ("user_segment", 20),
               ("user_language", 30), ("user_tenure", 10), ("user_device_pref", 5)]
ITEM_FIELDS = [("item_id", None), ("item_category", 50), ("item_subcategory", 1000), ("item_brand", 20_000),
               ("item_seller", 50_000), ("item_color", 30), ("item_size", 12), ("item_shipping", 4),
               ("item_condition", 5), ("item_price_bucket", 20), ("item_rating_bucket", 10), ("item_age_bucket", 16)]
CONTEXT_FIELDS = [("hour", 24), ("weekday", 7), ("device", 5), ("platform", 3), ("page", 20), ("country", 60)]


def _ort_threads() -> list[int]:
    raw = os.environ.get("REC_BENCH_RANKING_ORT_THREADS") or "1"
    try:
        out = [int(x) for x in raw.split(",") if x.strip()]
    except ValueError:
        raise pytest.UsageError(f"REC_BENCH_RANKING_ORT_THREADS={raw!r}: expected integers like 1,2") from None
    if not out or min(out) < 1:
        raise pytest.UsageError(f"REC_BENCH_RANKING_ORT_THREADS={raw!r}: expected integers >= 1")
    return out


ORT_THREADS = _ort_threads()


class Model:
    """The ranking bundle, the whole-model ONNX file, and the requests (user, candidates, context) with
    their encodings for the other paths."""

    def __init__(self, work: Path):
        import torch
        from rec_engine.features import Field, Schema
        from rec_engine_train.export_ctr import export_ctr
        from rec_engine_train.models.ctr import CtrModel
        from rec_engine_train.onnx_export import export_onnx

        rng = np.random.default_rng(SEED)
        sizes = {"user_id": N_USERS, "item_id": N_ITEMS}
        fields = [Field(n, "categorical", vocab=tuple(str(i) for i in range(sizes.get(n) or s)), hash_buckets=1)
                  for n, s in USER_FIELDS + ITEM_FIELDS + CONTEXT_FIELDS]
        self.schema = Schema(fields)
        user_cols = {n: np.arange(N_USERS) if s is None else rng.integers(0, s, N_USERS) for n, s in USER_FIELDS}
        item_cols = {n: np.arange(N_ITEMS) if s is None else rng.integers(0, s, N_ITEMS) for n, s in ITEM_FIELDS}
        self.user_cols, self.item_cols = user_cols, item_cols
        torch.manual_seed(SEED)
        model = CtrModel("deepfm", self.schema, dim=DIM, params={"mlp": list(MLP), "init_std": 0.05})
        with torch.no_grad():   # untrained; first-order weights spread the scores
            model.linear.normal_(0.0, 0.3)
        self.bundle = export_ctr(model, work / "ranking", entity_features={"user": user_cols, "item": item_cols})

        class Whole(torch.nn.Module):
            """ids [B, F] int64 (global rows) -> click probability [B]: gathers + dense + sigmoid."""

            def __init__(self, m):
                super().__init__()
                self.embedding = torch.nn.Parameter(m.embedding.detach().clone())
                self.linear = torch.nn.Parameter(m.linear.detach()[:, 0].clone())
                self.dense = m.dense

            def forward(self, ids):
                emb = torch.nn.functional.embedding(ids, self.embedding)
                return torch.sigmoid(self.dense(emb, self.linear[ids]))

        proto = export_onnx(Whole(model), (torch.zeros(2, self.schema.n_fields, dtype=torch.int64),), ["ids"], "prob")
        self.whole_path = work / "whole.onnx"
        self.whole_path.write_bytes(proto)

        # one request per batch size: a user, candidates, a context
        self.requests = {}
        for b in BATCHES:
            user = int(rng.integers(0, N_USERS))
            cands = rng.choice(N_ITEMS, b, replace=False).astype(np.int64)
            ctx = {n: int(rng.integers(0, s)) for n, s in CONTEXT_FIELDS}
            cols = {n: np.asarray(user_cols[n])[np.full(b, user)] for n, _ in USER_FIELDS}
            cols.update({n: np.asarray(item_cols[n])[cands] for n, _ in ITEM_FIELDS})
            cols.update({n: np.full(b, v) for n, v in ctx.items()})
            batch = self.schema.encode(cols)
            assert batch.single_valued
            ids = np.ascontiguousarray(batch.indices.reshape(b, self.schema.n_fields))
            self.requests[b] = (user, cands, ctx, batch, ids)

    def rankers(self, ort_threads: int):
        import onnxruntime as ort
        from rec_engine_train.export_ctr import load_ctr_scorer

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = ort_threads
        opts.inter_op_num_threads = 1
        whole = ort.InferenceSession(str(self.whole_path), sess_options=opts, providers=["CPUExecutionProvider"])
        return load_ctr_scorer(self.bundle, intra_op_threads=ort_threads), whole


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    work = tmp_path_factory.mktemp("ranking")
    try:
        yield Model(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def sessions(model):
    """{ort_threads: (CtrRanker, whole-model session)}; checks once that every path agrees."""
    out = {}
    for t in ORT_THREADS:
        ranker, whole = model.rankers(t)
        for b, (user, cands, ctx, batch, ids) in model.requests.items():
            ref = whole.run(["prob"], {"ids": ids})[0]
            assert ref.shape == (b,)
            for got in (ranker.score_candidates(user, cands, ctx), ranker(batch)):
                assert got.dtype == np.float32 and got.shape == (b,)
                np.testing.assert_allclose(got, ref, rtol=0, atol=TOL)
        out[t] = (ranker, whole)
    return out


@pytest.mark.parametrize("ort_threads,batch,path,pass_no,impl",
                         [(t, b, path, p, i) for t in ORT_THREADS for b in BATCHES for path in PATHS
                          for p in range(PASSES) for i in IMPLS])
def bench_ranking(benchmark, model, sessions, batch, path, ort_threads, pass_no, impl):
    ranker, whole = sessions[ort_threads]
    user, cands, ctx, enc, ids = model.requests[batch]
    if impl == "rec_engine":
        if path == "score_candidates":
            def fn():
                return ranker.score_candidates(user, cands, ctx)
        else:
            def fn():
                return ranker(enc)
    elif impl == "onnxruntime-whole":
        feed = {"ids": ids}

        def fn():
            return whole.run(["prob"], feed)[0]
    else:   # ORT at its best: ids copied into an input buffer bound once, the output into a bound buffer
        buf, out = np.empty_like(ids), np.empty(batch, np.float32)
        io = whole.io_binding()
        io.bind_cpu_input("ids", buf)
        io.bind_output("prob", "cpu", 0, np.float32, [batch], out.ctypes.data)
        buf[:] = ids
        whole.run_with_iobinding(io)
        np.testing.assert_allclose(out, whole.run(["prob"], {"ids": ids})[0], rtol=0, atol=TOL)

        def fn():
            buf[:] = ids
            whole.run_with_iobinding(io)
            return out.copy()

    what = "candidates of one user (score_candidates)" if path == "score_candidates" else "examples (EncodedBatch)"
    benchmark.group = (f"ranking {what} batch={batch} (DeepFM, 26 fields, dim {DIM}, MLP "
                       f"{'-'.join(map(str, MLP))}; ORT threads {ort_threads})")
    benchmark.extra_info.update(impl=impl, path=path, batch=batch, ort_threads=ort_threads, pass_no=pass_no,
                                passes=PASSES, simd=rec_engine.simd_level())
    rounds = -(-ROUNDS[batch] // PASSES)
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=min(50, rounds // 4))
