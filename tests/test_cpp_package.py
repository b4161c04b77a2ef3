"""The C++ package: build the core with its C++ tests, install it, and build and run the example
program against the installed package with find_package(rec_engine)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rec_engine import topk

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tool(name):
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def run(cmd, **kw):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    cmake = tool("cmake")
    if cmake is None:
        pytest.fail("cmake is required (it is in the test extra)")
    base = tmp_path_factory.mktemp("cpp")
    gen = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={tool('ninja')}"] if tool("ninja") else []
    build, prefix = base / "build", base / "prefix"
    run([cmake, "-S", ROOT, "-B", build, *gen, "-DREC_ENGINE_BUILD_TESTS=ON", f"-DCMAKE_INSTALL_PREFIX={prefix}"])
    run([cmake, "--build", build, "--parallel", str(os.cpu_count() or 2)])
    run([cmake, "--install", build])
    return {"cmake": cmake, "gen": gen, "build": build, "prefix": prefix, "base": base}


def test_cpp_kernel_tests_pass_on_every_simd_level(installed):
    ctest = Path(installed["cmake"]).with_name("ctest")
    r = run([str(ctest) if ctest.exists() else "ctest", "--test-dir", installed["build"], "--output-on-failure"])
    assert "100% tests passed" in r.stdout


def test_install_tree_holds_headers_library_and_package_config(installed):
    prefix = installed["prefix"]
    for header in ("embedding.hpp", "graph.hpp", "topk.hpp", "simd.hpp", "errors.hpp"):
        assert (prefix / "include" / "rec_engine" / header).is_file()
    libs = list(prefix.glob("lib*/librec_engine_core.*"))
    assert libs, "librec_engine_core not installed"
    assert list(prefix.glob("lib*/cmake/rec_engine/rec_engineConfig.cmake"))


def test_example_program_links_the_installed_package_and_matches_python(installed, rng):
    base = installed["base"]
    ex_build = base / "example"
    run([installed["cmake"], "-S", ROOT / "cpp" / "examples", "-B", ex_build, *installed["gen"],
         f"-DCMAKE_PREFIX_PATH={installed['prefix']}"])
    run([installed["cmake"], "--build", ex_build])
    items = rng.normal(size=(500, 12)).astype(np.float32)
    queries = rng.normal(size=(3, 12)).astype(np.float32)
    np.save(base / "items.npy", items)
    np.save(base / "queries.npy", queries)
    exe = ex_build / "topk_npy"
    out = run([exe, base / "items.npy", base / "queries.npy", "7", "cosine"]).stdout.splitlines()
    want = topk(queries, items, 7, metric="cosine")
    rows = [line for line in out if line.startswith("query ")]
    assert len(rows) == 3
    for q, line in enumerate(rows):
        pairs = [p.split(":") for p in line.split(":", 1)[1].split()]
        assert [int(i) for i, _ in pairs] == want.ids[q].tolist()
        np.testing.assert_allclose([float(s) for _, s in pairs], want.scores[q], rtol=1e-5)
    bad = subprocess.run([exe, base / "missing.npy", base / "queries.npy"], capture_output=True, text=True)
    assert bad.returncode == 1 and "cannot open" in bad.stderr
