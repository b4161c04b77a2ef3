"""SIMD level selection: detection, the environment override and switching at run time."""
from __future__ import annotations

import subprocess
import sys

import pytest

import rec_engine


def run_python(code, **env):
    import os
    e = dict(os.environ)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, timeout=60)


def test_supported_levels_start_with_scalar_and_include_the_current_one():
    levels = rec_engine.supported_simd_levels()
    assert levels[0] == "scalar"
    assert set(levels) <= {"scalar", "avx2", "avx512"}
    assert rec_engine.simd_level() in levels


@pytest.mark.parametrize("level", rec_engine.supported_simd_levels())
def test_environment_variable_forces_the_level(level):
    r = run_python("import rec_engine; print(rec_engine.simd_level())", REC_ENGINE_SIMD=level)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == level


def test_unknown_level_in_environment_fails_the_import_with_a_clear_message():
    r = run_python("import rec_engine", REC_ENGINE_SIMD="sse9")
    assert r.returncode != 0
    assert "REC_ENGINE_SIMD=sse9: expected scalar, avx2 or avx512" in r.stderr


def test_set_simd_level_switches_and_rejects_unknown_levels():
    before = rec_engine.simd_level()
    try:
        rec_engine.set_simd_level("scalar")
        assert rec_engine.simd_level() == "scalar"
    finally:
        rec_engine.set_simd_level(before)
    assert rec_engine.simd_level() == before
    with pytest.raises(ValueError, match="unknown SIMD level 'fast'"):
        rec_engine.set_simd_level("fast")
    with pytest.raises(TypeError):
        rec_engine.set_simd_level(2)


def test_thread_settings_are_reported():
    assert rec_engine.default_num_threads() >= 1
    assert isinstance(rec_engine.openmp_enabled(), bool)
