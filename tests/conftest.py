"""Shared fixtures: every kernel test can run once per SIMD level this machine supports."""
from __future__ import annotations

import numpy as np
import pytest

import rec_engine

LEVELS = rec_engine.supported_simd_levels()


@pytest.fixture(params=LEVELS)
def simd(request):
    """Run the test at each supported SIMD level (scalar, avx2, avx512 where available)."""
    before = rec_engine.simd_level()
    rec_engine.set_simd_level(request.param)
    try:
        yield request.param
    finally:
        rec_engine.set_simd_level(before)


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


pytest_plugins = ["serving_fixtures"]
