"""The dense part's reduced precisions on AMX-BF16 tiles (rec_engine._core.DenseNet(precision="bf16x3" / "bf16")):
against a NumPy emulation of the same bf16 products and against float64; a permission, not an order (float32
exactly where the tiles are off); each row's logit independent of the rows beside it (a batch scores as single
calls); many threads at once; the engine option (ranking_precision) and its report. Where this CPU has no
AMX-BF16 the tile tests skip and the float32 fallback is still checked."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import rec_engine
from rec_engine import _core

needs_tiles = pytest.mark.skipif(not (_core.amx_available() and rec_engine.simd_level() == "avx512"),
                                 reason="this CPU (or kernel) has no AMX-BF16 tiles at the avx512 level")

SHAPES = [
    (26, 16, list(range(8, 20)), [400, 400, 400], True),    # the benchmark's DeepFM (K0 = 192, 400 off 32)
    (7, 12, [6, 0, 3], [81, 7], True),                     # scattered fields, 36 inputs, outputs off 32
    (4, 20, [0, 1, 2, 3], [64], False),                    # Wide&Deep: no FM, one hidden layer of two 32-blocks
    (3, 1, [2], [1, 1, 1], True),                          # one value a field, one unit a layer
]


@pytest.fixture
def amx():
    """Puts the switch back to its default (on) after the test."""
    yield
    _core.set_amx(True)


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> the nearest bf16 (ties to even), as float32."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16).astype(np.uint32).view(np.float32)


def _params(rng, F, d, var, hidden):
    sizes = [len(var) * d, *hidden, 1]
    weights = [rng.normal(0, 1.0 / np.sqrt(k), (n, k)).astype(np.float32) for k, n in zip(sizes[:-1], sizes[1:])]
    biases = [None] + [rng.normal(0, 0.3, n).astype(np.float32) for n in sizes[2:]]
    return weights, biases, float(rng.normal())


def _nets(F, d, var, params, fm):
    weights, biases, bias = params
    return {p: _core.DenseNet(F, d, list(var), weights, biases, bias, 0.5, fm, precision=p)
            for p in ("float32", "bf16x3", "bf16")}


def _reference(params, emb, lin, fb, var, fm, products=None):
    """float64 logits; products: None (exact), "bf16x3" or "bf16": each hidden layer's input (rounded to float32,
    as the kernels keep it) and weights split into bf16 parts and only those products summed."""
    weights, biases, bias = params
    e = emb.astype(np.float64)
    logit = bias + lin.astype(np.float64).sum(axis=1)
    if fm:
        s = e.sum(axis=1)
        logit = logit + 0.5 * (s * s - (e * e).sum(axis=1)).sum(axis=1)
    h = emb[:, var].reshape(len(emb), -1)
    for j, (w, b) in enumerate(zip(weights, biases)):
        add = fb.reshape(-1).astype(np.float64) if j == 0 else b.astype(np.float64)
        last = j == len(weights) - 1
        if products is None or last:
            z = h.astype(np.float64) @ w.astype(np.float64).T + add
        else:
            x = h.astype(np.float32)
            xh, wh = _bf16(x), _bf16(w)
            z = xh.astype(np.float64) @ wh.astype(np.float64).T
            if products == "bf16x3":
                xl, wl = _bf16(x - xh), _bf16(w - wh)
                z += xh.astype(np.float64) @ wl.astype(np.float64).T + xl.astype(np.float64) @ wh.astype(np.float64).T
            z += add
        h = z if last else np.maximum(z, 0.0).astype(np.float32)
    return logit + h[:, 0]


def _inputs(rng, rows, F, d, hidden0):
    return (rng.normal(0, 0.5, (rows, F, d)).astype(np.float32), rng.normal(0, 0.5, (rows, F)).astype(np.float32),
            rng.normal(0, 0.5, (1, hidden0)).astype(np.float32))


def test_precision_is_checked_and_reported(rng):
    params = _params(rng, 5, 4, [1, 2], [8])
    for p in ("float32", "bf16x3", "bf16"):
        net = _core.DenseNet(5, 4, [1, 2], *params[:2], params[2], 0.5, True, precision=p)
        assert net.precision == p
        assert net.tiles_active == (p != "float32" and _core.amx_enabled())
    assert _core.DenseNet(5, 4, [1, 2], *params[:2], params[2], 0.5, True).precision == "float32"
    for bad in ("fp16", "BF16", ""):
        with pytest.raises(ValueError, match="precision must be"):
            _core.DenseNet(5, 4, [1, 2], *params[:2], params[2], 0.5, True, precision=bad)


@needs_tiles
@pytest.mark.parametrize("F,d,var,hidden,fm", SHAPES)
def test_tiles_sum_the_bf16_products_they_claim(amx, rng, F, d, var, hidden, fm):
    params = _params(rng, F, d, var, hidden)
    nets = _nets(F, d, var, params, fm)
    assert nets["bf16x3"].tiles_active and nets["bf16"].tiles_active
    for rows in (1, 2, 17, 31, 32, 33, 70, 500):
        emb, lin, fb = _inputs(rng, rows, F, d, hidden[0])
        exact = _reference(params, emb, lin, fb, var, fm)
        scale = max(1.0, float(np.abs(exact).max()))
        got = {p: n.forward(emb, lin, fb, np.empty(rows, np.float32)).astype(np.float64) for p, n in nets.items()}
        err = {p: float(np.abs(g - exact).max()) for p, g in got.items()}
        # bf16x3: float32's answer to ~16 significant bits a product
        assert err["bf16x3"] <= 5e-5 * scale, err
        # each agrees with the emulation of its own products far better than with the exact sums
        for p, tol in (("bf16x3", 2e-5), ("bf16", 5e-4)):
            emul = _reference(params, emb, lin, fb, var, fm, products=p)
            np.testing.assert_allclose(got[p], emul, rtol=0, atol=tol * scale)
        assert err["bf16"] <= 5e-2 * scale
        if rows >= 17 and hidden[0] >= 64:     # enough terms that the reduced precisions show
            assert err["bf16x3"] * 8 < err["bf16"], err


def test_float32_exactly_when_the_tiles_are_off(amx, rng):
    F, d, var, hidden, fm = SHAPES[0]
    params = _params(rng, F, d, var, hidden)
    nets = _nets(F, d, var, params, fm)
    emb, lin, fb = _inputs(rng, 45, F, d, hidden[0])
    want = nets["float32"].forward(emb, lin, fb, np.empty(45, np.float32))
    _core.set_amx(False)
    for p in ("bf16x3", "bf16"):
        assert not nets[p].tiles_active and nets[p].precision == p
        np.testing.assert_array_equal(nets[p].forward(emb, lin, fb, np.empty(45, np.float32)), want)
    _core.set_amx(True)
    if _core.amx_enabled():
        assert nets["bf16x3"].tiles_active
        assert not np.array_equal(nets["bf16"].forward(emb, lin, fb, np.empty(45, np.float32)), want)


@needs_tiles
@pytest.mark.parametrize("precision", ["bf16x3", "bf16"])
def test_a_rows_logit_does_not_depend_on_the_rows_beside_it(amx, rng, precision):
    """Rows are padded to blocks of 32 and summed tile by tile: a row scored alone, in a request's chunk or in a
    batch gets the same bits (what lets recommend_batch answer as single calls do)."""
    F, d, var, hidden, fm = SHAPES[0]
    net = _nets(F, d, var, _params(rng, F, d, var, hidden), fm)[precision]
    emb, lin, fb = _inputs(rng, 100, F, d, hidden[0])
    whole = net.forward(emb, lin, fb, np.empty(100, np.float32))
    for lo, hi in ((0, 1), (5, 6), (31, 64), (33, 100), (99, 100)):
        part = net.forward(np.ascontiguousarray(emb[lo:hi]), np.ascontiguousarray(lin[lo:hi]), fb,
                           np.empty(hi - lo, np.float32))
        np.testing.assert_array_equal(part, whole[lo:hi])


@needs_tiles
def test_many_threads_at_once_give_the_serial_results(amx, rng):
    F, d, var, hidden, fm = SHAPES[0]
    nets = _nets(F, d, var, _params(rng, F, d, var, hidden), fm)
    jobs = [(p, *_inputs(rng, n, F, d, hidden[0])) for n in (3, 40, 250, 500) for p in ("bf16x3", "bf16", "float32")]
    want = [nets[p].forward(e, li, fb, np.empty(len(e), np.float32)) for p, e, li, fb in jobs]
    got, errors = [None] * len(jobs), []

    def work(i):
        try:
            for _ in range(4):
                p, e, li, fb = jobs[i]
                got[i] = nets[p].forward(e, li, fb, np.empty(len(e), np.float32))
                np.testing.assert_array_equal(got[i], want[i])
        except Exception as ex:     # noqa: BLE001 - reported below
            errors.append(ex)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def test_non_finite_inputs_stay_non_finite(amx, rng):
    """A NaN in a row's varying fields gives that row a NaN logit at every precision (not a finite number, not
    an infinity from a rounding carry), and leaves the other rows' logits as they were. (Wide&Deep: no FM, whose
    sum over all fields would carry the NaN past the MLP.)"""
    F, d, var, hidden, fm = SHAPES[2]
    nets = _nets(F, d, var, _params(rng, F, d, var, hidden), fm)
    emb, lin, fb = _inputs(rng, 40, F, d, hidden[0])
    for p, net in nets.items():
        clean = net.forward(emb, lin, fb, np.empty(40, np.float32))
        bad = emb.copy()
        bad[3, var[0], 1] = np.nan
        got = net.forward(bad, lin, fb, np.empty(40, np.float32))
        assert np.isnan(got[3]), p
        np.testing.assert_array_equal(np.delete(got, 3), np.delete(clean, 3))
