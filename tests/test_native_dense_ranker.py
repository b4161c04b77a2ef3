"""The native dense part through the ranker (rec_engine.native_dense): built for DeepFM and Wide&Deep from their
exported graphs, not for xDeepFM, FM or int8 models; the same probabilities as ONNX Runtime's on the request,
row-chunk and batch paths; dropped when it disagrees at load; ONNX Runtime below the avx512 level."""
from __future__ import annotations

import numpy as np
import pytest

import rec_engine

pytest.importorskip("onnx", reason="the native dense part is read from the ONNX graph (serve extra)")
from test_dense_split import CONTEXTS, ctr_bundles  # noqa: E402, F401  (its module's trained bundles)


def _ranker(path, **kw):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import CtrRanker

    return CtrRanker(open_bundle(path), **kw)


def _ort_only(path, monkeypatch, **kw):
    monkeypatch.setenv("REC_ENGINE_NATIVE_DENSE", "0")
    r = _ranker(path, **kw)
    monkeypatch.delenv("REC_ENGINE_NATIVE_DENSE")
    assert r.runner.native is None and r.runner.split is not None
    return r


@pytest.mark.parametrize("kind", ["deepfm", "widedeep"])
def test_built_from_the_exported_graph_and_scores_as_onnx_runtime(ctr_bundles, rng, monkeypatch, kind):
    r = _ranker(ctr_bundles[kind], batch_threads=2, request_threads=2)
    assert r.runner.native is not None
    ref = _ort_only(ctr_bundles[kind], monkeypatch)
    users = [int(u) for u in rng.integers(0, 200, 5)] + [10_000]
    for j, u in enumerate(users):
        ctx = CONTEXTS[j % len(CONTEXTS)]
        for n in (16, 37, 150, 700):          # the split's bound path from 16 rows; 700: two row chunks
            cands = rng.integers(0, r.n_items, n)
            np.testing.assert_allclose(r.score_candidates(u, cands, ctx), ref.score_candidates(u, cands, ctx),
                                       rtol=1e-5, atol=1e-6)
    cands = [rng.integers(0, r.n_items, 300) for _ in users]
    ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
    for g, u, c, x in zip(r.score_candidates_batch(users, cands, ctxs), users, cands, ctxs):
        np.testing.assert_allclose(g, ref.score_candidates(u, c, x), rtol=1e-5, atol=1e-6)


def test_not_built_for_models_outside_the_pattern(ctr_bundles):
    from rec_engine.bundle import open_bundle
    from rec_engine.ranking import quantize_dense

    assert _ranker(ctr_bundles["xdeepfm"]).runner.native is None        # CIN: the graph has more than the MLP
    assert _ranker(ctr_bundles["fm"]).runner.native is None             # no first layer to split
    b = open_bundle(ctr_bundles["deepfm"])
    assert _ranker(ctr_bundles["deepfm"], dense=quantize_dense(b.onnx_path("dense"))).runner.native is None


def test_a_native_part_that_disagrees_is_dropped(ctr_bundles, monkeypatch):
    from rec_engine import ctr_runner, native_dense

    def off_by_one(model, **kw):    # a net whose bias is not the model's: the load-time check must see it
        net = native_dense.native_dense(model, **kw)

        class Shifted:
            def forward(self, e, li, fb, out):
                net.forward(e, li, fb, out)
                out += 1.0
                return out
        return Shifted()

    monkeypatch.setattr(ctr_runner, "native_dense", off_by_one)
    assert _ranker(ctr_bundles["deepfm"]).runner.native is None


def test_below_avx512_onnx_runtime_runs_it(ctr_bundles, rng, monkeypatch):
    """At another SIMD level the runner calls ONNX Runtime (the core's portable loop is correct but slow);
    switching back to avx512 uses the core again."""
    if "avx512" not in rec_engine.supported_simd_levels():
        pytest.skip("this CPU has no avx512 level: the native dense part never runs here")
    r = _ranker(ctr_bundles["deepfm"])
    net, calls = r.runner.native, []

    class Counting:      # the net, its forward calls counted
        def forward(self, *a):
            calls.append(len(a[0]))
            return net.forward(*a)

        def __getattr__(self, name):
            return getattr(net, name)

    r.runner.native = Counting()         # (before the first call: the bound buffers' calls are made with it)
    ref = _ort_only(ctr_bundles["deepfm"], monkeypatch)
    cands = rng.integers(0, r.n_items, 64)
    before = rec_engine.simd_level()
    try:
        rec_engine.set_simd_level("avx2")
        np.testing.assert_allclose(r.score_candidates(3, cands), ref.score_candidates(3, cands), rtol=1e-5, atol=1e-6)
        assert calls == []
    finally:
        rec_engine.set_simd_level(before)
    np.testing.assert_allclose(r.score_candidates(3, cands), ref.score_candidates(3, cands), rtol=1e-5, atol=1e-6)
    assert calls == [64]
