"""The dense part of DeepFM / Wide&Deep run by the core (rec_engine._core.DenseNet): its forward pass against a
float64 NumPy recomputation at every SIMD level, on odd sizes (fields, dims, hidden sizes off the 80-output
panels, 1 to 500 rows, the varying fields in one run or scattered); every refusal; many threads at once.
Through the ranker: test_native_dense_ranker.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from rec_engine import _core



def _net(rng, F, d, var, hidden, fm=True, scale=0.5):
    sizes = [len(var) * d, *hidden, 1]
    weights = [rng.normal(0, 1.0 / np.sqrt(k), (n, k)).astype(np.float32) for k, n in zip(sizes[:-1], sizes[1:])]
    biases = [None] + [rng.normal(0, 0.3, n).astype(np.float32) for n in sizes[2:]]
    bias = float(rng.normal())
    return _core.DenseNet(F, d, list(var), weights, biases, bias, scale, fm), (weights, biases, bias)


def _reference(params, emb, lin, first_bias, var, fm, scale):
    """float64: bias + sum(lin) + scale * FM(emb) + MLP(emb[:, var])."""
    weights, biases, bias = params
    e, li = emb.astype(np.float64), lin.astype(np.float64)
    logit = bias + li.sum(axis=1)
    if fm:
        s = e.sum(axis=1)
        logit = logit + scale * (s * s - (e * e).sum(axis=1)).sum(axis=1)
    h = e[:, var].reshape(len(e), -1)
    for j, (w, b) in enumerate(zip(weights, biases)):
        h = h @ w.astype(np.float64).T + (first_bias.astype(np.float64).reshape(-1) if j == 0 else b)
        if j < len(weights) - 1:
            h = np.maximum(h, 0.0)
    return logit + h[:, 0]


@pytest.mark.parametrize("F,d,var,hidden,fm", [
    (26, 16, list(range(8, 20)), [400, 400, 400], True),     # the benchmark's DeepFM
    (5, 8, [1, 2, 3], [24, 12], True),                      # hidden sizes under one panel
    (7, 12, [6, 0, 3], [81, 7], True),                      # scattered fields, a dim off 16, 81 = a panel + 1
    (4, 20, [0, 1, 2, 3], [160], False),                    # Wide&Deep: no FM, two full panels
    (3, 1, [2], [1, 1, 1], True),                           # one value a field, one unit a layer
])
def test_forward_matches_a_float64_recomputation(simd, rng, F, d, var, hidden, fm):
    net, params = _net(rng, F, d, var, hidden, fm)
    assert net.macs_per_row == sum(k * n for k, n in zip([len(var) * d, *hidden], [*hidden, 1]))
    for rows in (1, 2, 4, 5, 6, 13, 37) + ((500,) if simd == "avx512" else ()):
        emb = rng.normal(0, 0.5, (rows, F, d)).astype(np.float32)
        lin = rng.normal(0, 0.5, (rows, F)).astype(np.float32)
        fb = rng.normal(0, 0.5, (1, hidden[0])).astype(np.float32)
        out = np.full(rows, np.nan, np.float32)
        got = net.forward(emb, lin, fb, out)
        assert got is out and out.dtype == np.float32
        want = _reference(params, emb, lin, fb, var, fm, 0.5)
        np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-5 * max(1.0, np.abs(want).max()))


def test_relu_zeroes_negative_units_and_zero_inputs_give_the_biases(simd, rng):
    """All-zero rows: the FM and linear terms vanish and each layer passes relu(bias) on, so the logit is a
    short recomputation; first-layer biases of both signs check that negative units are cut."""
    F, d, var = 3, 4, [0, 2]
    net, (weights, biases, bias) = _net(rng, F, d, var, [9, 5])
    fb = np.linspace(-1, 1, 9, dtype=np.float32)
    out = net.forward(np.zeros((3, F, d), np.float32), np.zeros((3, F), np.float32), fb, np.empty(3, np.float32))
    h = np.maximum(fb.astype(np.float64), 0)
    h = np.maximum(weights[1].astype(np.float64) @ h + biases[1], 0)
    want = bias + weights[2].astype(np.float64) @ h + biases[2]
    np.testing.assert_allclose(out, np.full(3, want[0]), rtol=1e-6, atol=1e-6)


def test_the_construction_is_checked(rng):
    w = [np.ones((4, 6), np.float32), np.ones((1, 4), np.float32)]
    b = [None, np.ones(1, np.float32)]
    _core.DenseNet(3, 2, [0, 2, 1], w, b, 0.0, 0.5, True)          # (fields in any order)
    bad = [
        dict(var_fields=[0, 3, 1]),                                 # a field past n_fields
        dict(var_fields=[0, 0, 1]),                                 # a field twice
        dict(var_fields=[]),
        dict(var_fields=[0, 1]),                                    # 4 inputs, the layer takes 6
        dict(weights=[w[0]], biases=[None]),                        # no output layer
        dict(weights=[w[0], np.ones((2, 4), np.float32)], biases=[None, np.ones(2, np.float32)]),   # 2 outputs
        dict(biases=[np.ones(4, np.float32), b[1]]),                # the first layer's bias comes per call
        dict(biases=[None, np.ones(3, np.float32)]),
        dict(weights=[w[0], np.ones((1, 5), np.float32)]),          # does not take the previous layer's 4
        dict(n_fields=0),
        dict(weights=[w[0]], biases=[None, b[1]]),                  # lists of different lengths
    ]
    for change in bad:
        args = dict(n_fields=3, dim=2, var_fields=[0, 2, 1], weights=w, biases=b, bias=0.0, fm_scale=0.5, fm=True)
        args.update(change)
        with pytest.raises(ValueError):
            _core.DenseNet(**args)
    with pytest.raises(TypeError):
        _core.DenseNet(3, 2, [0, 1, 2], [w[0].astype(np.float64), w[1]], b, 0.0, 0.5, True)


def test_forward_refuses_what_it_cannot_read_and_writes_nothing(rng):
    net, _ = _net(rng, 3, 4, [1, 2], [6])
    emb = np.zeros((5, 3, 4), np.float32)
    lin = np.zeros((5, 3), np.float32)
    fb = np.zeros((1, 6), np.float32)
    out = np.full(5, 7.0, np.float32)
    ro = np.zeros(5, np.float32)
    ro.flags.writeable = False
    cases = [
        (TypeError, (emb.astype(np.float64), lin, fb, out)),
        (TypeError, (np.zeros((5, 3, 8), np.float32)[:, :, ::2], lin, fb, out)),     # not C-contiguous
        (ValueError, (emb.reshape(15, 4), lin, fb, out)),                           # 2 dimensions
        (ValueError, (np.zeros((5, 2, 4), np.float32), lin, fb, out)),              # fields
        (ValueError, (np.zeros((5, 3, 5), np.float32), lin, fb, out)),              # dim
        (ValueError, (emb, np.zeros((4, 3), np.float32), fb, out)),                 # rows of lin
        (ValueError, (emb, lin, np.zeros(5, np.float32), out)),                     # first_bias size
        (TypeError, (emb, lin, [0.0] * 6, out)),
        (ValueError, (emb, lin, fb, np.zeros(4, np.float32))),                      # rows of out
        (TypeError, (emb, lin, fb, np.zeros(5, np.float64))),
        (ValueError, (emb, lin, fb, ro)),                                           # read-only
    ]
    for exc, args in cases:
        with pytest.raises(exc):
            net.forward(*args)
    assert np.all(out == 7.0)
    assert net.forward(emb[:0], lin[:0], fb, out[:0]).shape == (0,)


def test_many_threads_at_once_give_the_serial_results(rng):
    F, d, var = 10, 16, list(range(4, 10))
    net, _ = _net(rng, F, d, var, [96, 40])
    inputs = [(rng.normal(0, 0.5, (n, F, d)).astype(np.float32), rng.normal(0, 0.5, (n, F)).astype(np.float32),
               rng.normal(0, 0.5, (1, 96)).astype(np.float32)) for n in rng.integers(1, 300, 16)]
    want = [net.forward(e, li, fb, np.empty(len(e), np.float32)).copy() for e, li, fb in inputs]
    got = [[None] * len(inputs) for _ in range(6)]

    def work(t):
        for _ in range(5):
            for j in range(len(inputs))[::-1 if t % 2 else 1]:
                e, li, fb = inputs[j]
                got[t][j] = net.forward(e, li, fb, np.empty(len(e), np.float32))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for g in got:
        for a, b in zip(g, want):
            np.testing.assert_array_equal(a, b)     # each row's sums in a fixed order: bit for bit
