"""The AMX-BF16 tile kernel of the bf16 scans (Intel Sapphire Rapids and later): the switch, and scans of 16
queries or more (the tiles take whole blocks of 16, the AVX-512 kernel the rest) against NumPy, with the tiles
on and off, packed and converted panels, dimensions the tiles take (multiples of 32 up to 128) and others,
from several threads at once. On a CPU without AMX the same scans run on the AVX-512 kernel (the tests
still check them); the on/off comparison is skipped there with its reason."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import rec_engine
from rec_engine import _core, topk
from rec_engine.topk import ItemIndex

needs_amx = pytest.mark.skipif(not _core.amx_available(), reason="this CPU (or kernel) has no AMX-BF16 tiles")


@pytest.fixture
def amx():
    """Puts the switch back to its default (on; a no-op where the tiles are not available) after the test."""
    yield
    _core.set_amx(True)


def _bf16(a: np.ndarray) -> np.ndarray:
    u = a.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
    return u.astype(np.uint32).view(np.float32)


def _exact_top(q, x, k):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    return np.argsort(-s, axis=1, kind="stable")[:, :k], s


def test_switch(amx):
    _core.set_amx(False)
    assert not _core.amx_enabled()
    _core.set_amx(True)
    assert _core.amx_enabled() == (_core.amx_available() and rec_engine.simd_level() == "avx512")
    before = rec_engine.simd_level()
    try:
        for level in rec_engine.supported_simd_levels():
            rec_engine.set_simd_level(level)
            if level != "avx512":
                assert not _core.amx_enabled()
    finally:
        rec_engine.set_simd_level(before)


@pytest.mark.parametrize("on", [True, False])
@pytest.mark.parametrize("copy", [True, False])
@pytest.mark.parametrize("nq,d,n", [(16, 64, 1000), (17, 64, 777), (33, 32, 3001), (64, 96, 500), (40, 128, 1025),
                                    (100, 64, 4096), (20, 19, 300), (18, 130, 257)])
def test_exact_bf16_scans_match_numpy(amx, rng, on, copy, nq, d, n):
    _core.set_amx(on)
    q = rng.normal(size=(nq, d)).astype(np.float32)
    x = rng.normal(size=(n, d)).astype(np.float32)
    want, s = _exact_top(q, x, 10)
    got = topk(q, ItemIndex(x, "bf16", copy=copy), 10)
    np.testing.assert_array_equal(got.ids, want)
    np.testing.assert_allclose(got.scores, np.take_along_axis(s, want, axis=1), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("nq,d", [(16, 64), (48, 32), (35, 128), (32, 96)])
def test_reduced_ranking_is_the_bf16_products(amx, rng, nq, d):
    # exact=False with shortlist = k: the ids are the top k by the bf16 score, tiles on or off
    q = rng.normal(size=(nq, d)).astype(np.float32)
    x = rng.normal(size=(2000, d)).astype(np.float32)
    s = _bf16(q).astype(np.float64) @ _bf16(x).astype(np.float64).T
    for on in (True, False):
        _core.set_amx(on)
        res = topk(q, ItemIndex(x, "bf16", shortlist=10, exact=False), 10)
        for b in range(nq):
            got = s[b, res.ids[b]]
            kth = np.sort(s[b])[::-1][9]
            # every returned item scores at least the 10th best bf16 score, up to the float32 sum's rounding
            assert got.min() >= kth - 1e-5 * np.abs(s[b]).max() * d


@needs_amx
@pytest.mark.parametrize("d", [32, 64, 128])
def test_tiles_and_vectors_rank_alike(amx, rng, d):
    q = rng.normal(size=(80, d)).astype(np.float32)
    x = rng.normal(size=(5000, d)).astype(np.float32)
    out = {}
    for on in (True, False):
        _core.set_amx(on)
        assert _core.amx_enabled() == (on and rec_engine.simd_level() == "avx512")
        out[on] = topk(q, ItemIndex(x, "bf16", shortlist=50, exact=False), 50)
    np.testing.assert_array_equal(out[True].ids, out[False].ids)
    np.testing.assert_array_equal(out[True].scores, out[False].scores)


def test_many_threads_at_once(amx, rng):
    _core.set_amx(True)
    x = rng.normal(size=(6000, 64)).astype(np.float32)
    index = ItemIndex(x, "bf16")
    queries = [rng.normal(size=(16 + 7 * t, 64)).astype(np.float32) for t in range(6)]
    wants = [_exact_top(q, x, 20)[0] for q in queries]
    errors: list = []

    def run(t):
        try:
            for _ in range(5):
                np.testing.assert_array_equal(topk(queries[t], index, 20, num_threads=1).ids, wants[t])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors[0]


def test_environment_turns_the_tiles_off():
    import os
    import subprocess
    import sys

    code = ("import numpy as np; from rec_engine import _core, topk; from rec_engine.topk import ItemIndex; "
            "x = np.random.default_rng(0).normal(size=(500, 64)).astype(np.float32); "
            "r = topk(x[:32], ItemIndex(x, 'bf16'), 1); "
            "print(_core.amx_available(), _core.amx_enabled(), bool((r.ids[:, 0] == np.arange(32)).all()))")
    env = dict(os.environ, REC_ENGINE_AMX="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False", "True"]
