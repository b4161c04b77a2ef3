"""The ranking model's first dense layer split by what is constant within a request (rec_engine.dense_split):
the split model against the whole one, through the ranker's single and batched paths, and the graphs it must
leave alone."""
from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the split rewrites ONNX graphs with the onnx package (serve extra)")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from rec_engine import dense_split  # noqa: E402
from rec_engine.dense_split import FIRST_BIAS, split_first_layer  # noqa: E402
from serving_fixtures import torch_one_thread  # noqa: E402

F, D, H = 5, 4, 6


def _mlp_model(*, shape=(-1, F * D), trans_b=1, alpha=1.0, reshape_twice=False, bias=True, w1="w1") -> bytes:
    """emb [B, F, D], lin [B, F] -> sum(lin) + relu(reshape(emb) W0^T + b0) w1 (a small DeepFM-like graph)."""
    rng = np.random.default_rng(1)
    w0 = rng.normal(0, 0.5, (H, F * D) if trans_b else (F * D, H)).astype(np.float32)
    b0 = rng.normal(0, 0.5, H).astype(np.float32)
    w1_arr = rng.normal(0, 0.5, (1, H)).astype(np.float32)
    inits = [numpy_helper.from_array(np.array(shape, np.int64), "shape"), numpy_helper.from_array(w0, "w0"),
             numpy_helper.from_array(b0, "b0"), numpy_helper.from_array(w1_arr, w1),
             numpy_helper.from_array(np.array([1], np.int64), "axes")]
    gemm_in = ["view", "w0", "b0"] if bias else ["view", "w0"]
    nodes = [helper.make_node("Reshape", ["emb", "shape"], ["view"]),
             helper.make_node("Gemm", gemm_in, ["h"], transB=trans_b, alpha=alpha),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", w1], ["o"], transB=1),
             helper.make_node("Squeeze", ["o", "axes"], ["sq"]),
             helper.make_node("ReduceSum", ["lin", "axes"], ["ls"], keepdims=0),
             helper.make_node("Add", ["sq", "ls"], ["logit"])]
    if reshape_twice:
        nodes += [helper.make_node("ReduceSum", ["view", "axes"], ["vs"], keepdims=0),
                  helper.make_node("Add", ["logit", "vs"], ["logit2"])]
    out = "logit2" if reshape_twice else "logit"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", F, D]),
                                             helper.make_tensor_value_info("lin", TensorProto.FLOAT, ["b", F])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def _run(model: bytes, feed: dict) -> np.ndarray:
    import onnxruntime as ort

    s = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return s.run(None, feed)[0]


@pytest.mark.parametrize("const", [[0], [0, 1], [1, 3], [0, 2, 4], [1, 2, 3, 4]])
def test_split_model_equals_the_whole_one(rng, const):
    model = _mlp_model()
    split = split_first_layer(model, emb="emb", n_fields=F, dim=D, constant_fields=const)
    assert split is not None and split.const.tolist() == sorted(const)
    for lengths in ([1], [7], [3, 1, 5], [2, 0, 4]):
        n = sum(lengths)
        emb = rng.normal(0, 1, (n, F, D)).astype(np.float32)
        lin = rng.normal(0, 1, (n, F)).astype(np.float32)
        starts = np.cumsum(lengths) - lengths
        for s, ln in zip(starts, lengths):          # constant fields equal within each request
            emb[s:s + ln, const] = emb[s, const]
        want = _run(model, {"emb": emb, "lin": lin}).astype(np.float64)
        nz = np.array(lengths) > 0
        fb = np.repeat(split.first_bias(emb[starts[nz]]), np.array(lengths)[nz], axis=0)
        got = _run(split.model, {"emb": emb, "lin": lin, FIRST_BIAS: fb})
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        # the reference arithmetic of first_bias: the constant fields' columns of W0 times their values, plus b0
        m = onnx.load_from_string(model)
        w0 = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "w0"))
        b0 = numpy_helper.to_array(next(i for i in m.graph.initializer if i.name == "b0"))
        cols = np.concatenate([np.arange(f * D, (f + 1) * D) for f in sorted(const)])
        x = emb[starts[nz]].reshape(int(nz.sum()), -1)[:, cols].astype(np.float64)
        np.testing.assert_allclose(split.first_bias(emb[starts[nz]]), x @ w0[:, cols].T.astype(np.float64) + b0,
                                   rtol=1e-5, atol=1e-5)


def test_a_model_that_already_uses_the_input_name(rng):
    """The bias input takes a fresh name when the model already holds a tensor called first_bias."""
    model = _mlp_model(w1=FIRST_BIAS)
    split = split_first_layer(model, emb="emb", n_fields=F, dim=D, constant_fields=[0, 1])
    assert split is not None and split.input != FIRST_BIAS
    emb = rng.normal(0, 1, (4, F, D)).astype(np.float32)
    emb[:, [0, 1]] = emb[:1, [0, 1]]
    lin = rng.normal(0, 1, (4, F)).astype(np.float32)
    np.testing.assert_allclose(_run(split.model, {"emb": emb, "lin": lin, split.input: split.first_bias(emb[:1])}),
                               _run(model, {"emb": emb, "lin": lin}), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [dict(trans_b=0), dict(alpha=0.5), dict(shape=(-1, F, D)),
                                    dict(reshape_twice=True), dict(bias=False)])
def test_graphs_outside_the_pattern_are_not_split(kwargs):
    assert split_first_layer(_mlp_model(**kwargs), emb="emb", n_fields=F, dim=D, constant_fields=[0, 1]) is None


def test_nothing_to_split_and_no_onnx(monkeypatch):
    model = _mlp_model()
    for const in ([], list(range(F)), [F], [-1]):
        assert split_first_layer(model, emb="emb", n_fields=F, dim=D, constant_fields=const) is None
    assert split_first_layer(model, emb="other", n_fields=F, dim=D, constant_fields=[0]) is None
    monkeypatch.setitem(__import__("sys").modules, "onnx", None)      # the onnx package missing
    assert split_first_layer(model, emb="emb", n_fields=F, dim=D, constant_fields=[0]) is None


# ------------------------------------------------------------------------------------------ through the ranker
@pytest.fixture(scope="module")
def ctr_bundles(tmp_path_factory):
    torch = pytest.importorskip("torch", reason="the ranker tests train small models with torch (test extra)")
    from rec_engine_train import pipeline
    from rec_engine_train.loop import TrainConfig

    with torch_one_thread(torch):
        root = tmp_path_factory.mktemp("split")
        data = pipeline.load_data("synthetic", "ctr", synthetic={"n_users": 200, "n_items": 150})
        out = {}
        for kind, params in (("deepfm", {"mlp": [24, 12]}), ("widedeep", {"mlp": [16]}),
                             ("xdeepfm", {"mlp": [16], "cin": [8]}), ("fm", {})):
            res = pipeline.train(kind, data, TrainConfig(epochs=1, lr=1e-2, batch_size=512, dim=8, seed=0,
                                                         progress=False, params=params), log=lambda _m: None)
            out[kind] = pipeline.export(res, data, root / kind)
        return out


def _whole(ranker):
    """The same ranker with its split turned off (the reference: the whole dense part)."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    r = CtrRanker(open_bundle(ranker.bundle.path))
    r.runner.split = None
    r.runner.split_session = None
    return r


CONTEXTS = [None, {"hour": 9.0, "device": "android"}, {"device": "web"}]


@pytest.mark.parametrize("kind", ["deepfm", "widedeep", "xdeepfm"])
def test_ranker_split_scores_equal_the_whole_model(ctr_bundles, rng, kind):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    r = CtrRanker(open_bundle(ctr_bundles[kind]), batch_threads=2)
    assert r.runner.split is not None
    calls = []                               # every split path computes the bias: count that it runs
    first_bias = r.runner.split.first_bias
    r.runner.split.first_bias = lambda rows, out=None: calls.append(len(rows)) or first_bias(rows, out)
    const = set(r.runner.split.const.tolist())
    assert const == set(r.user_pos.tolist()) | set(r.ctx_pos.tolist())
    ref = _whole(r)
    users = [int(u) for u in rng.integers(0, 200, 6)] + [10_000]         # the last one unknown to the store
    for j, u in enumerate(users):
        ctx = CONTEXTS[j % len(CONTEXTS)]
        for n in (1, 2, 37, 150, 1500):                                    # 1500: past the bound buffers
            cands = rng.integers(0, r.n_items, n)
            np.testing.assert_allclose(r.score_candidates(u, cands, ctx), ref.score_candidates(u, cands, ctx),
                                       rtol=1e-5, atol=1e-6)
    cands = [rng.integers(0, r.n_items, int(n)) for n in rng.integers(0, 400, len(users))]
    ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
    singles = len(calls)
    # one bias a request of 16 rows or more on the bound (single-request) path, whose smaller requests run the
    # whole model (the bias, a product of its own, would cost more than it saves); 1500 rows go through logits()
    assert singles == len(users) * 3
    got = r.score_candidates_batch(users, cands, ctxs, chunk_rows=700)
    want = [ref.score_candidates(u, c, x) for u, c, x in zip(users, cands, ctxs)]
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    assert len(calls) > singles and sum(calls[singles:]) == sum(len(c) > 0 for c in cands)   # a bias a user


def test_chunks_scored_at_once_equal_one_at_a_time(ctr_bundles, rng):
    """batch_threads > 1: a batch's chunks are scored on that many threads at once (one-thread sessions); the
    probabilities equal the sequential batch path's and the single calls'."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    par, seq = CtrRanker(b, batch_threads=2), CtrRanker(b)
    users = [int(u) for u in rng.integers(0, 200, 30)] + [10_000, 3, 3]
    cands = [rng.integers(0, par.n_items, int(n)) for n in rng.integers(0, 120, len(users))]
    ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
    for rows in (1, 100, 1024):
        got = par.score_candidates_batch(users, cands, ctxs, chunk_rows=rows)
        want = seq.score_candidates_batch(users, cands, ctxs, chunk_rows=rows)
        for g, w, u, c, x in zip(got, want, users, cands, ctxs):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(g, seq.score_candidates(u, c, x), rtol=1e-5, atol=1e-6)
    assert par._chunk_pool is not None and seq._chunk_pool is None


def test_item_features_from_the_store_match_take_and_pool(ctr_bundles, rng):
    """The candidates' item bags go from the feature store into emb / lin by one core call (pool_select); a
    store the core refuses (other dtypes) takes the bags and pools them instead: the same inputs either way."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    r = CtrRanker(open_bundle(ctr_bundles["deepfm"]), batch_threads=2)
    assert r.items.rows is None           # multi-valued and numeric item fields: the pooling path
    users, cands = [3, 10_000], rng.integers(0, r.n_items, 90)
    parts = [r._parts(u, None) for u in users]
    got = [np.full((90, r.n_fields, r.dim), np.nan, np.float32), np.full((90, r.n_fields), np.nan, np.float32)]
    r._fill_pooled(*got, users, cands, (40, 50), parts)

    def refuse(*_a):
        raise TypeError("other dtypes")

    r._select = refuse
    want = [np.zeros((90, r.n_fields, r.dim), np.float32), np.zeros((90, r.n_fields), np.float32)]
    r._fill_pooled(*want, users, cands, (40, 50), parts)
    for g, w in zip(got, want):
        assert not np.isnan(g).any()
        np.testing.assert_array_equal(g, w)


def test_models_without_a_first_layer_or_int8_run_whole(ctr_bundles, rng):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker, quantize_dense

    fm = CtrRanker(open_bundle(ctr_bundles["fm"]))
    assert fm.runner.split is None
    assert fm.score_candidates(3, np.arange(20)).shape == (20,)
    b = open_bundle(ctr_bundles["deepfm"])
    q = CtrRanker(b, dense=quantize_dense(b.onnx_path("dense")))
    assert q.runner.split is None
    assert np.all(np.isfinite(q.score_candidates(3, np.arange(20))))


def test_a_split_that_disagrees_is_dropped(ctr_bundles, monkeypatch):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    monkeypatch.setattr(dense_split.FirstLayerSplit, "first_bias",
                        lambda self, rows, out=None: np.full((len(rows), self.hidden), 5.0, np.float32))
    r = CtrRanker(open_bundle(ctr_bundles["deepfm"]))
    assert r.runner.split is None


def test_groups_must_cover_the_rows(ctr_bundles):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    r = CtrRanker(open_bundle(ctr_bundles["deepfm"]))
    emb = np.zeros((4, r.n_fields, r.dim), np.float32)
    lin = np.zeros((4, r.n_fields), np.float32)
    with pytest.raises(ValueError, match="groups add up to 3 rows, there are 4"):
        r.runner.logits(emb, lin, groups=[1, 2])
    with pytest.raises(ValueError, match="lengths >= 0"):
        r.runner.logits(emb, lin, groups=[-1, 5])
    np.testing.assert_allclose(r.runner.logits(emb, lin, groups=[1, 3]), r.runner.logits(emb, lin), rtol=1e-5,
                               atol=1e-6)


# ------------------------------------------------------------------------------ a request's rows on several threads
def _chunked(ranker, rows: int = 64):
    """The ranker with its runner's chunks set to ``rows`` rows at least (the test models are far cheaper a row
    than the DeepFM that CHUNK_MIN_ROWS is set for: by their own cost they would never be cut)."""
    ranker.runner.chunk_min_rows = rows
    return ranker


def test_chunk_rows_follow_the_models_cost(ctr_bundles):
    """A model's rows per chunk scale with the multiply-adds a row of its dense part costs: a small MLP gets far
    more than CHUNK_MIN_ROWS, a model without a matrix product (fm) is never cut, and neither is one whose
    session has its own intra-op threads."""
    import onnxruntime as ort

    from rec_engine.bundle import open_bundle
    from rec_engine.ctr_runner import CHUNK_MIN_ROWS, _dense_macs
    from rec_engine.ranking import CtrRanker

    deep = CtrRanker(open_bundle(ctr_bundles["deepfm"]), request_threads=2)
    macs = _dense_macs(open_bundle(ctr_bundles["deepfm"]).onnx_path("dense"))
    assert 0 < macs < 400_000
    assert deep.runner.chunk_min_rows == -(-64 * 400_000 // macs) > CHUNK_MIN_ROWS
    assert deep.runner.request_threads == 2
    fm = CtrRanker(open_bundle(ctr_bundles["fm"]), request_threads=2)
    assert _dense_macs(open_bundle(ctr_bundles["fm"]).onnx_path("dense")) == 0
    assert fm.runner.chunk_min_rows == 0 and fm.runner.request_threads == 1
    one = CtrRanker(open_bundle(ctr_bundles["fm"]))
    for n in (1, 2, 300):           # asked for threads, still one call
        cands = np.arange(n) % fm.n_items
        np.testing.assert_allclose(fm.score_candidates(3, cands, threads=4), one.score_candidates(3, cands),
                                   rtol=1e-6, atol=1e-7)
    assert fm.runner._row_pool is None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    own = CtrRanker(open_bundle(ctr_bundles["deepfm"]), opts, request_threads=2)
    assert own.runner.request_threads == 1


@pytest.mark.parametrize("kind", ["deepfm", "widedeep"])
def test_a_requests_row_chunks_equal_one_call(ctr_bundles, rng, kind):
    """request_threads > 1: a request's candidates run through the dense part as row chunks at once (at least
    chunk_min_rows each; the split model); every candidate's probability is the one-thread call's, on every
    size around the chunk boundaries and past the bound buffers."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles[kind])
    par, one = _chunked(CtrRanker(b, request_threads=3)), _chunked(CtrRanker(b))
    assert par.runner.split is not None
    m = 64
    for j, n in enumerate((1, m - 1, m, 2 * m - 1, 2 * m, 2 * m + 1, 3 * m - 1, 3 * m + 7, 500, 1024, 1500)):
        u, ctx = int(rng.integers(0, 200)), CONTEXTS[j % len(CONTEXTS)]
        cands = rng.integers(0, par.n_items, n)
        want = one.score_candidates(u, cands, ctx)
        np.testing.assert_allclose(par.score_candidates(u, cands, ctx), want, rtol=1e-5, atol=1e-6)
        for t in (1, 2, 5):      # the per-call override
            np.testing.assert_allclose(one.score_candidates(u, cands, ctx, threads=t), want, rtol=1e-5, atol=1e-6)
    assert par.runner._row_workers == 2 and one.runner._row_workers == 4      # one pool, as large as asked
    bound = par.runner._tls.bound
    assert {key for n in (3 * m + 7, 500) for key in bound[n][6]} == {(3, True)}
    assert set(bound[2 * m + 1][6]) == {(2, True)} and not bound[m][6]


def test_int8_dense_cut_in_chunks_stays_close(ctr_bundles, rng):
    """The int8 dense part quantizes activations per call, so chunks move probabilities a little, not more."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker, quantize_dense

    b = open_bundle(ctr_bundles["deepfm"])
    q = quantize_dense(b.onnx_path("dense"))
    par, one = _chunked(CtrRanker(b, dense=q, request_threads=2)), CtrRanker(b, dense=q)
    ref = CtrRanker(b)
    for u in rng.integers(0, 200, 5):
        cands = rng.integers(0, par.n_items, 300)
        got, whole = par.score_candidates(int(u), cands), one.score_candidates(int(u), cands)
        np.testing.assert_allclose(got, whole, atol=2e-2)
        np.testing.assert_allclose(got, ref.score_candidates(int(u), cands), atol=3e-2)
    assert par.runner._row_workers == 1


def test_row_chunks_from_many_threads_at_once(ctr_bundles, rng):
    """Requests from several threads share the chunk pool; each gets its own candidates' probabilities."""
    from concurrent.futures import ThreadPoolExecutor

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    par, one = _chunked(CtrRanker(b, request_threads=2)), CtrRanker(b)
    work = [(int(rng.integers(0, 200)), rng.integers(0, par.n_items, int(rng.integers(1, 700))),
             CONTEXTS[j % len(CONTEXTS)]) for j in range(60)]
    want = [one.score_candidates(u, c, x) for u, c, x in work]
    with ThreadPoolExecutor(4) as ex:
        got = list(ex.map(lambda w: par.score_candidates(*w), work))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def test_a_failing_chunk_raises_after_every_chunk_ended(ctr_bundles, rng):
    """A chunk that raises: the call raises that error only once every other chunk has ended (none writes into
    the thread's buffers after), and the next call scores right."""
    import threading
    import time

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    par, one = _chunked(CtrRanker(b, request_threads=3)), CtrRanker(b)
    runner = par.runner
    inner, ended, calls = runner._run_io_split, [], []
    lock = threading.Lock()

    def flaky(io):
        with lock:
            calls.append(io)
            first = len(calls) == 1
        if first:
            raise RuntimeError("chunk failed")
        time.sleep(0.05)           # the others still run when the failure is seen
        inner(io)
        ended.append(io)

    runner._run_io_split = flaky
    cands = rng.integers(0, par.n_items, 400)
    with pytest.raises(RuntimeError, match="chunk failed"):
        par.score_candidates(3, cands)
    assert len(ended) == 2           # both other chunks had ended when the call raised
    runner._run_io_split = inner
    np.testing.assert_allclose(par.score_candidates(3, cands), one.score_candidates(3, cands), rtol=1e-5, atol=1e-6)


def _in_thread(fn, timeout: float = 60.0):
    """fn() on another thread, joined with a timeout: a call that hangs fails the test instead of hanging it.
    Returns fn's result or raises its error."""
    import threading

    box = {}

    def target():
        try:
            box["out"] = fn()
        except BaseException as e:   # noqa: BLE001 - handed to the test
            box["err"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), "the call hung"
    if "err" in box:
        raise box["err"]
    return box["out"]


def test_constant_fields_written_while_the_other_chunks_pool_theirs(ctr_bundles, rng):
    """The caller's thread writes a request's user and context fields (prep) while the other row chunk pools its
    item fields: prep here waits until that chunk's pooling has started (it would time out if they ran one
    after the other); no chunk's dense part starts before prep and the split's first-layer share from row 0
    have ended; every probability is the one-thread call's; and a prep that raises stops every chunk's dense
    part (the next call scores right)."""
    import threading

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    par, one = _chunked(CtrRanker(b, request_threads=2)), CtrRanker(b)
    runner = par.runner
    inner_run, inner_entities, inner_items = runner._run_io_split, par._fill_entities, par._fill_items
    inner_bias = runner.split.first_bias
    filling, biased, order, lock = threading.Event(), threading.Event(), [], threading.Lock()
    overlapped = []

    def run(io):
        with lock:
            order.append(("run", biased.is_set()))
        inner_run(io)

    def entities(*args):
        overlapped.append(filling.wait(10.0))     # the other chunk pools its item fields meanwhile
        inner_entities(*args)

    def items(*args):
        filling.set()          # (while prep waits, only the other chunk can be here)
        inner_items(*args)

    def bias(rows, out=None):
        got = inner_bias(rows, out)
        biased.set()
        return got

    runner._run_io_split, par._fill_entities, par._fill_items, runner.split.first_bias = run, entities, items, bias
    for j, n in enumerate((300, 500)):
        u, ctx, cands = int(rng.integers(0, 200)), CONTEXTS[j % len(CONTEXTS)], rng.integers(0, par.n_items, n)
        filling.clear()
        biased.clear()
        order.clear()
        overlapped.clear()
        got = _in_thread(lambda: par.score_candidates(u, cands, ctx))
        np.testing.assert_allclose(got, one.score_candidates(u, cands, ctx), rtol=1e-5, atol=1e-6)
        assert overlapped == [True]
        assert order == [("run", True)] * 2

    def failing(*args):
        raise RuntimeError("prep failed")

    par._fill_entities = failing
    order.clear()
    with pytest.raises(RuntimeError, match="prep failed"):
        _in_thread(lambda: par.score_candidates(3, rng.integers(0, par.n_items, 400)))
    assert order == []                     # no dense part ran on half-written inputs
    par._fill_entities = inner_entities
    cands = rng.integers(0, par.n_items, 400)
    np.testing.assert_allclose(_in_thread(lambda: par.score_candidates(3, cands)), one.score_candidates(3, cands),
                               rtol=1e-5, atol=1e-6)


def test_a_chunk_pool_that_cannot_start_every_chunk_does_not_hang(ctr_bundles, rng):
    """Three row chunks; the pool takes the first worker chunk, then refuses the second (as a pool shut down at
    exit does): the started chunk, which waits for the caller's prep, is freed and runs no dense part, the call
    raises the pool's error instead of hanging, and the next call scores right."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    par, one = _chunked(CtrRanker(b, request_threads=3)), CtrRanker(b)
    runner = par.runner
    cands = rng.integers(0, par.n_items, 400)
    want = one.score_candidates(3, cands)
    np.testing.assert_allclose(par.score_candidates(3, cands), want, rtol=1e-5, atol=1e-6)   # (the pool exists)
    pool, runs, inner_run = runner._row_pool, [], runner._run_io_split

    class Refusing:
        def __init__(self):
            self.n = 0

        def submit(self, fn):
            self.n += 1
            if self.n > 1:
                raise RuntimeError("cannot schedule new futures")
            return pool.submit(fn)

    runner._row_pool = Refusing()
    runner._run_io_split = lambda io: runs.append(io) or inner_run(io)
    with pytest.raises(RuntimeError, match="cannot schedule"):
        _in_thread(lambda: par.score_candidates(3, cands), timeout=30.0)
    assert runs == []
    runner._row_pool, runner._run_io_split = pool, inner_run
    np.testing.assert_allclose(par.score_candidates(3, cands), want, rtol=1e-5, atol=1e-6)


def test_requests_under_the_split_minimum_run_the_whole_model(ctr_bundles, rng):
    """A lone request of fewer than _SPLIT_MIN_ROWS rows runs the whole dense part (no first-layer share is
    computed), one of that many or more the split one; both give the whole model's probabilities."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ctr_runner import _SPLIT_MIN_ROWS
    from rec_engine.ranking import CtrRanker

    r = CtrRanker(open_bundle(ctr_bundles["deepfm"]))
    ref = _whole(r)
    calls, inner = [], r.runner.split.first_bias
    r.runner.split.first_bias = lambda rows, out=None: calls.append(len(rows)) or inner(rows, out)
    for n, split in ((1, False), (_SPLIT_MIN_ROWS - 1, False), (_SPLIT_MIN_ROWS, True), (_SPLIT_MIN_ROWS + 1, True)):
        calls.clear()
        cands = rng.integers(0, r.n_items, n)
        np.testing.assert_allclose(r.score_candidates(5, cands, CONTEXTS[1]), ref.score_candidates(5, cands, CONTEXTS[1]),
                                   rtol=1e-5, atol=1e-6)
        assert calls == ([1] if split else []), n


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_request_threads_must_be_a_positive_integer(ctr_bundles, rng, bad):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import load_ranking

    b = open_bundle(ctr_bundles["deepfm"])
    with pytest.raises(ValueError, match="request_threads must be an integer >= 1"):
        load_ranking(b, request_threads=bad)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        load_ranking(b).score_candidates(3, np.arange(5), threads=bad)


def test_a_batch_of_one_user_is_scored_as_a_request(ctr_bundles, rng):
    """score_candidates_batch of one user takes score_candidates' path on the batch's threads (a server's
    lone request), with the probabilities of the batch path."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    r, ref = _chunked(CtrRanker(b, batch_threads=2)), CtrRanker(b)
    seen = []
    inner = r.score_candidates
    r.score_candidates = lambda *a, **kw: seen.append(kw.get("threads")) or inner(*a, **kw)
    for n, ctx in ((300, CONTEXTS[1]), (7, None)):
        cands = rng.integers(0, r.n_items, n)
        (got,) = r.score_candidates_batch([4], [cands], [ctx])
        (want,) = ref.score_candidates_batch([4], [cands], [ctx], chunk_rows=10_000)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert seen == [2, 2] and r.runner._row_workers == 1
    assert [len(p) for p in r.score_candidates_batch([4], [np.zeros(0, np.int64)])] == [0]
    assert len(seen) == 2            # no candidates: the batch path



def test_a_batch_of_users_with_many_rows_each_goes_user_by_user(ctr_bundles, rng):
    """Users with at least two row chunks' worth of candidates each: the batch scores them one user at a time
    on each of its threads (the request path, one-thread pooling and dense part); the probabilities are the
    batch chunks' and the single calls', in the users' order, and a batch with a user below that size (or with
    none) takes the chunk path."""
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    r, ref = _chunked(CtrRanker(b, batch_threads=2), 32), CtrRanker(b)
    calls = []
    inner = r._score_one
    r._score_one = lambda *a: calls.append(a[4]) or inner(*a)
    users = [int(u) for u in rng.integers(0, 200, 9)] + [250]        # (250: a user the store does not know)
    sizes = [64, 65, 500, 1024, 64, 300, 77, 128, 90, 700]
    cands = [rng.integers(0, r.n_items, n) for n in sizes]
    ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
    got = r.score_candidates_batch(users, cands, ctxs)
    assert calls == [1] * len(users)
    chunked = ref.score_candidates_batch(users, cands, ctxs)
    for g, c, u, x, w in zip(got, cands, users, ctxs, chunked):
        assert g.shape == (len(c),)
        np.testing.assert_allclose(g, ref.score_candidates(u, c, x), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
    calls.clear()
    for short in (63, 0, 1025):     # one user too small for it, without candidates, or past the bound buffers
        cands2 = cands[:3] + [rng.integers(0, r.n_items, short)]
        got = r.score_candidates_batch(users[:4], cands2, ctxs[:4])
        assert calls == []
        for g, c, u, x in zip(got, cands2, users, ctxs):
            np.testing.assert_allclose(g, ref.score_candidates(u, c, x) if len(c) else np.zeros(0), rtol=1e-5,
                                       atol=1e-6)


def test_then_is_applied_to_each_users_scores_on_every_batch_path(ctr_bundles, rng):
    """score_candidates_batch(then=f) holds f(j, probs_j) for every user j, whatever path the batch takes (one
    user, user by user on the batch's threads, row chunks), the probs those of the call without it; on the
    user-by-user path f runs on the thread that scored the user (the batch's other thread too)."""
    import threading

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    r, ref = _chunked(CtrRanker(b, batch_threads=2), 32), CtrRanker(b)
    for sizes in ([300], [64, 500, 90, 128, 77, 65], [10, 3, 40, 0, 25]):
        users = [int(u) for u in rng.integers(0, 200, len(sizes))]
        cands = [rng.integers(0, r.n_items, n) for n in sizes]
        ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
        seen, lock = [], threading.Lock()

        def then(j, p):
            with lock:
                seen.append((j, threading.get_ident()))
            return j, p.copy(), float(p.sum()) if len(p) else None

        got = r.score_candidates_batch(users, cands, ctxs, then=then)
        want = ref.score_candidates_batch(users, cands, ctxs)
        assert sorted(j for j, _ in seen) == list(range(len(users)))
        for j, (g, w) in enumerate(zip(got, want)):
            assert g[0] == j
            np.testing.assert_allclose(g[1], w, rtol=1e-5, atol=1e-6)
        if min(sizes) >= 64 and len(sizes) > 1:     # the user-by-user path: both threads ran f
            assert len({t for _, t in seen}) == 2


def test_a_chunk_whose_pooling_fails_raises_after_every_chunk_ended(ctr_bundles, rng):
    """Each row chunk pools its own candidates' item fields before its dense part: a chunk whose pooling raises
    runs no dense part, the call raises once the other chunks have ended, and the next call scores right."""
    import threading
    import time

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    par, one = _chunked(CtrRanker(b, request_threads=3)), CtrRanker(b)
    inner_fill, inner_run, ran, rows = par._fill_items, par.runner._run_io_split, [], []
    lock = threading.Lock()

    def fill(emb, lin, cands, nt=None, row0=0):
        with lock:
            rows.append((row0, len(cands), nt))
        if row0 == 133:              # the middle chunk, on a pool thread
            raise IndexError("pooling failed")
        time.sleep(0.05)
        inner_fill(emb, lin, cands, nt, row0)

    def run(io):
        inner_run(io)
        ran.append(io)

    par._fill_items, par.runner._run_io_split = fill, run
    cands = rng.integers(0, par.n_items, 400)
    with pytest.raises(IndexError, match="pooling failed"):
        par.score_candidates(3, cands)
    assert len(ran) == 2 and sorted(rows) == [(0, 133, 1), (133, 133, 1), (266, 134, 1)]
    par._fill_items = inner_fill
    np.testing.assert_allclose(par.score_candidates(3, cands), one.score_candidates(3, cands), rtol=1e-5, atol=1e-6)
    rows.clear()
    par._fill_items = fill
    par.score_candidates(3, cands[:50])        # too few rows to cut: one fill on the caller's threads
    assert rows == [(0, 50, None)]


def test_user_by_user_batches_need_a_one_thread_session(ctr_bundles, rng):
    """With a session of several intra-op threads the batch keeps its chunks (several such calls at once would
    ask for more threads than cores), with the same probabilities."""
    import onnxruntime as ort

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    b = open_bundle(ctr_bundles["deepfm"])
    r, ref = _chunked(CtrRanker(b, opts, batch_threads=2), 32), CtrRanker(b)
    calls = []
    inner = r._score_one
    r._score_one = lambda *a: calls.append(a[4]) or inner(*a)
    users, cands = [3, 7, 9], [rng.integers(0, r.n_items, n) for n in (100, 200, 300)]
    for g, u, c in zip(r.score_candidates_batch(users, cands), users, cands):
        np.testing.assert_allclose(g, ref.score_candidates(u, c), rtol=1e-5, atol=1e-6)
    assert calls == [] and not r.runner.one_thread_session


def test_a_field_of_both_users_and_items_is_refused(ctr_bundles):
    import copy

    from rec_engine.bundle import BundleError, open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    groups = b.meta["entity_fields"]
    b.meta["entity_fields"] = bad = copy.deepcopy(groups)
    bad["user"] = list(bad["user"]) + [bad["item"][0]]
    with pytest.raises(BundleError, match="both user and item fields"):
        CtrRanker(b)


def test_a_user_that_fails_in_a_user_by_user_batch_raises_after_every_share_ended(ctr_bundles, rng):
    """The batch threads take the users one at a time; one user's error is raised once every thread has
    ended (nothing scores on after the call returns), and the next batch is right."""
    import threading
    import time

    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    b = open_bundle(ctr_bundles["deepfm"])
    r, ref = _chunked(CtrRanker(b, batch_threads=3), 32), CtrRanker(b)
    inner, done, threads = r._score_one, [], set()

    def flaky(user, *a):
        threads.add(threading.get_ident())
        if user == 13:
            raise RuntimeError("user 13 failed")
        time.sleep(0.01)
        out = inner(user, *a)
        done.append(user)
        return out

    r._score_one = flaky
    users = list(range(10, 22))
    cands = [rng.integers(0, r.n_items, 100) for _ in users]
    with pytest.raises(RuntimeError, match="user 13 failed"):
        r.score_candidates_batch(users, cands)
    # the threads take the next user not taken yet: the one that took 13 stops there, the others score every
    # other user, and all had ended when the call raised (nothing more is scored after it)
    assert sorted(done) == [u for u in users if u != 13] and len(threads) == 3
    n_done = len(done)
    time.sleep(0.05)
    assert len(done) == n_done
    r._score_one = inner
    for g, u, c in zip(r.score_candidates_batch(users, cands), users, cands):
        np.testing.assert_allclose(g, ref.score_candidates(u, c), rtol=1e-5, atol=1e-6)
