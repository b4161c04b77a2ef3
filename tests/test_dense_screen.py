"""The dense part's screen (rec_engine._core.DenseNet(..., screen=True)): bf16x3 or bf16 tile logits with a bound on
each row's distance to the float32 logit, checked against the float32 forward pass on random, scaled-up and
non-finite inputs; and the ranking built on it (score_candidates(top=k), Engine.recommend / recommend_batch),
which must answer exactly what float32 ranking alone answers. Where this CPU has no AMX-BF16 tiles the screen
is float32 itself (bounds 0), which is checked too."""
from __future__ import annotations

import numpy as np
import pytest

import rec_engine
from rec_engine import _core
from rec_engine.engine import Engine
from test_dense_tiles import SHAPES, _inputs, _params

tiles = _core.amx_available() and rec_engine.simd_level() == "avx512"
needs_tiles = pytest.mark.skipif(not tiles, reason="this CPU (or kernel) has no AMX-BF16 tiles at the avx512 level")
CONTEXTS = [{"hour": 9.0, "device": "android"}, {"hour": 23.0, "device": "ios"}, {}, {"device": "web"}, None]


@pytest.fixture
def amx():
    """Puts the switch back to its default (on) after the test."""
    yield
    _core.set_amx(True)


def _net(params, F, d, var, fm, scale=1.0, screen=True):
    weights, biases, bias = params
    return _core.DenseNet(F, d, list(var), [w * np.float32(scale) for w in weights], biases, bias, 0.5, fm,
                          screen=screen)


def _check(net, emb, lin, fb, tiles="bf16x3"):
    n = len(emb)
    f32 = net.forward(emb, lin, fb, np.empty(n, np.float32)).astype(np.float64)
    logit, bound = net.screen(emb, lin, fb, np.empty(n, np.float32), np.empty(n, np.float32), tiles)
    finite = np.isfinite(f32) & np.isfinite(logit)
    assert np.all(np.abs(logit[finite] - f32[finite]) <= bound[finite])
    assert np.all(bound[~finite] == np.inf)
    return logit, bound, f32


@needs_tiles
@pytest.mark.parametrize("tiles_of", ["bf16x3", "bf16"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("scale", [0.1, 1.0, 3.0])
def test_the_bound_holds_on_random_rows(rng, shape, scale, tiles_of):
    """|screen's logit - forward's| <= bound on every row; the screen's logits are the tiles' (those of a
    bf16x3 / bf16 net of the same weights, bit for bit)."""
    F, d, var, hidden, fm = shape
    params = _params(rng, F, d, var, hidden)
    net = _net(params, F, d, var, fm, scale)
    weights, biases, bias = params
    ref = _core.DenseNet(F, d, list(var), [w * np.float32(scale) for w in weights], biases, bias, 0.5, fm,
                         precision=tiles_of)
    assert net.screen_active and not net.tiles_active and net.precision == "float32" and ref.tiles_active
    for rows in (1, 5, 31, 32, 33, 200, 500):
        emb, lin, fb = _inputs(rng, rows, F, d, hidden[0])
        logit, bound, f32 = _check(net, emb, lin, fb, tiles_of)
        assert np.all(np.isfinite(bound)) and np.all(bound > 0)
        np.testing.assert_array_equal(logit, ref.forward(emb, lin, fb, np.empty(rows, np.float32)))


@needs_tiles
def test_bf16_bounds_are_wider_than_bf16x3s(rng):
    """The same rows: bf16's bounds are wider than bf16x3's by about the ratio of their products' errors
    (2^-7 against ~2^-13 with the float32 sums), and its logits are further from float32's."""
    F, d, var, hidden, fm = SHAPES[0]
    net = _net(_params(rng, F, d, var, hidden), F, d, var, fm)
    emb, lin, fb = _inputs(rng, 300, F, d, hidden[0])
    l3, b3, f32 = _check(net, emb, lin, fb, "bf16x3")
    l1, b1, _ = _check(net, emb, lin, fb, "bf16")
    assert 10 < np.median(b1 / b3) < 300
    assert np.max(np.abs(l1 - f32)) > 10 * np.max(np.abs(l3 - f32))


@needs_tiles
def test_the_bound_is_tight_enough_to_screen_a_ranking_model(rng):
    """The benchmark's DeepFM shape with weights of a trained model's scale (std 0.05): the bound stays far
    below the spread of 500 logits, so a request's best 10 leave few rows to compute again."""
    F, d, var, hidden, fm = SHAPES[0]
    sizes = [len(var) * d, *hidden, 1]
    weights = [rng.normal(0, 0.05, (n, k)).astype(np.float32) for k, n in zip(sizes[:-1], sizes[1:])]
    biases = [None] + [rng.normal(0, 0.05, n).astype(np.float32) for n in sizes[2:]]
    net = _core.DenseNet(F, d, var, weights, biases, 0.1, 0.5, fm, screen=True)
    emb, lin, fb = _inputs(rng, 500, F, d, hidden[0])
    logit, bound, f32 = _check(net, emb, lin, fb)
    assert np.median(bound) < 0.01 * np.std(f32)


@needs_tiles
@pytest.mark.parametrize("tiles_of", ["bf16x3", "bf16"])
def test_non_finite_rows_get_an_infinite_bound(rng, tiles_of):
    F, d, var, hidden, fm = SHAPES[1]
    net = _net(_params(rng, F, d, var, hidden), F, d, var, fm)
    emb, lin, fb = _inputs(rng, 40, F, d, hidden[0])
    emb[3, var[0], 0] = np.nan
    emb[7, var[1], 2] = np.inf
    emb[9, var[2], 1] = 3e38
    lin[11, 0] = np.nan
    logit, bound, f32 = _check(net, emb, lin, fb, tiles_of)
    for r in (3, 7, 11):
        assert bound[r] == np.inf
    ok = np.setdiff1d(np.arange(40), [3, 7, 9, 11])
    assert np.all(np.isfinite(bound[ok]))


def test_without_the_tiles_the_screen_is_float32_itself(rng, amx):
    F, d, var, hidden, fm = SHAPES[0]
    params = _params(rng, F, d, var, hidden)
    net = _net(params, F, d, var, fm)
    _core.set_amx(False)
    assert not net.screen_active
    emb, lin, fb = _inputs(rng, 77, F, d, hidden[0])
    for t in ("bf16x3", "bf16"):
        logit, bound = net.screen(emb, lin, fb, np.empty(77, np.float32), np.empty(77, np.float32), t)
        np.testing.assert_array_equal(logit, net.forward(emb, lin, fb, np.empty(77, np.float32)))
        np.testing.assert_array_equal(bound, np.zeros(77, np.float32))
    plain = _net(params, F, d, var, fm, screen=False)      # never screens: no tile weights built
    _core.set_amx(True)
    assert not plain.screen_active


def test_screen_arguments_are_checked(rng):
    F, d, var, hidden, fm = SHAPES[1]
    params = _params(rng, F, d, var, hidden)
    with pytest.raises(ValueError, match="precision must be float32"):
        _core.DenseNet(F, d, var, params[0], params[1], params[2], 0.5, fm, precision="bf16x3", screen=True)
    net = _net(params, F, d, var, fm)
    emb, lin, fb = _inputs(rng, 6, F, d, hidden[0])
    out = np.empty(6, np.float32)
    with pytest.raises(ValueError, match="bound must have 6"):
        net.screen(emb, lin, fb, out, np.empty(5, np.float32))
    with pytest.raises(ValueError, match="different arrays"):
        net.screen(emb, lin, fb, out, out)
    with pytest.raises(TypeError):
        net.screen(emb, lin, fb, out, np.empty(6, np.float64))
    with pytest.raises(ValueError, match="logit must have 6"):
        net.screen(emb, lin, fb, np.empty(7, np.float32), np.empty(6, np.float32))
    for bad in ("float32", "int8", "BF16"):
        with pytest.raises(ValueError, match="tiles must be 'bf16x3' or 'bf16'"):
            net.screen(emb, lin, fb, out, np.empty(6, np.float32), bad)
    with pytest.raises(TypeError):
        net.screen(emb, lin, fb, out, np.empty(6, np.float32), 3)


def _engines(trained, monkeypatch):
    monkeypatch.setenv("REC_ENGINE_DENSE_SCREEN", "0")
    plain = Engine.load(trained.bundle("pipe_a"))
    monkeypatch.setenv("REC_ENGINE_DENSE_SCREEN", "1")
    screened = Engine.load(trained.bundle("pipe_a"))
    return plain, screened


@pytest.mark.parametrize("tiles_of", ["bf16", "bf16x3"])
def test_screened_ranking_answers_as_float32_ranking(trained, rng, monkeypatch, tiles_of):
    """recommend and recommend_batch with the screen (starting on either tiles) give the ids and scores of
    float32 ranking, bit for bit, at k from 1 to more than the candidates; score_candidates(top=k): the best k as
    without top, the rest -1 or their float32 probability."""
    pytest.importorskip("onnx", reason="the native dense part is read from the ONNX graph (serve extra)")
    plain, screened = _engines(trained, monkeypatch)
    with plain, screened:
        runner = screened._version.ranking.runner
        assert runner.native is not None and runner.native.screen_active == tiles
        assert runner.screen_tiles == "bf16"        # the default start
        runner.screen_tiles = tiles_of
        assert plain._version.ranking.runner.native.screen_active is False
        users = rng.integers(0, 400, 12).tolist()
        for j, u in enumerate(users):
            c = CONTEXTS[j % len(CONTEXTS)]
            for k in (1, 3, 10, 50, 1000):
                a, b = plain.recommend(u, k, context=c), screened.recommend(u, k, context=c)
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_array_equal(a.scores, b.scores)
        ctxs = [CONTEXTS[j % len(CONTEXTS)] for j in range(len(users))]
        for k in (1, 10):
            for a, b in zip(plain.recommend_batch(users, k, contexts=ctxs),
                            screened.recommend_batch(users, k, contexts=ctxs)):
                np.testing.assert_array_equal(a.ids, b.ids)
                np.testing.assert_array_equal(a.scores, b.scores)
        if tiles:
            assert runner.screen_calls > 0 and runner.screen_again < runner.screen_rows
        ranker, ref = screened._version.ranking, plain._version.ranking
        cands = rng.choice(ranker.n_items, 300, replace=False)
        full = ref.score_candidates(users[0], cands, CONTEXTS[0])
        for k in (1, 7, 299):
            got = ranker.score_candidates(users[0], cands, CONTEXTS[0], top=k)
            best = np.lexsort((cands, -full))[:k]
            np.testing.assert_array_equal(np.lexsort((cands, -got))[:k], best)
            np.testing.assert_array_equal(got[best], full[best])
            assert np.all((got == -1) | (got == full))
        np.testing.assert_array_equal(ranker.score_candidates(users[0], cands, CONTEXTS[0]), full)
        with pytest.raises(ValueError):
            ranker.score_candidates(users[0], cands, top=0)
        with pytest.raises(ValueError, match="top must be an integer"):
            ranker.score_candidates(users[0], cands, top="3")


def test_screened_ranking_ties_and_duplicated_rows(trained, monkeypatch):
    """Candidates repeated many times (rows with equal logits) and k cutting through the repeats: the same ids
    and scores as float32 ranking."""
    pytest.importorskip("onnx", reason="the native dense part is read from the ONNX graph (serve extra)")
    plain, screened = _engines(trained, monkeypatch)
    with plain, screened:
        ranker, ref = screened._version.ranking, plain._version.ranking
        cands = np.repeat(np.arange(40), 8)
        full = ref.score_candidates(5, cands, None)
        for k in (1, 4, 8, 9, 100):
            got = ranker.score_candidates(5, cands, None, top=k)
            best = np.lexsort((np.arange(len(cands)), -full))[:k]
            np.testing.assert_array_equal(np.sort(got[best]), np.sort(full[best]))
            assert np.sort(got)[::-1][k - 1] == np.sort(full)[::-1][k - 1]


@needs_tiles
def test_the_screen_steps_to_bf16x3_then_to_float32_when_too_many_rows_come_back(trained, rng, monkeypatch):
    """top = half the rows: every call computes at least half its rows again, so after 32 calls on the bf16
    tiles the runner moves to bf16x3, after 32 more it stops screening; the answers are float32's throughout."""
    pytest.importorskip("onnx", reason="the native dense part is read from the ONNX graph (serve extra)")
    plain, screened = _engines(trained, monkeypatch)
    with plain, screened:
        ranker, ref, runner = screened._version.ranking, plain._version.ranking, screened._version.ranking.runner
        cands = rng.choice(ranker.n_items, 300, replace=False)
        full = ref.score_candidates(3, cands, CONTEXTS[1])
        best = np.lexsort((cands, -full))[:150]
        seen = []
        for _ in range(70):
            seen.append((runner.screen_tiles, runner._screen_on))
            got = ranker.score_candidates(3, cands, CONTEXTS[1], top=150)
            np.testing.assert_array_equal(got[best], full[best])
            assert np.all((got == -1) | (got == full))
        assert seen[0] == ("bf16", True) and seen[31] == ("bf16", True)
        assert seen[32] == ("bf16x3", True) and seen[63] == ("bf16x3", True)
        assert seen[64] == ("bf16x3", False) and runner.screen_calls == 64
        assert runner.screen_again * 2 >= runner.screen_rows
