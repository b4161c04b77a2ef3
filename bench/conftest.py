"""Benchmark-suite plumbing: options, machine description, and the ratio table printed at the end.

Every benchmark in this folder sets ``benchmark.group`` (one case, e.g. "topk batch ...") and
``benchmark.extra_info["impl"]`` (who ran it: "rec_engine", "numpy", "torch", "faiss", "scipy", ...).
At the end of the session the results are grouped by ``group`` and, inside a group, told apart by
``impl``; for each group the table gives the median and p99 of every implementation and the ratio
``baseline median / rec_engine median`` (above 1: rec_engine is faster).
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import os
import platform
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

import rec_engine

from ratios import REFERENCE as REFERENCE_IMPL, fastest_baseline, label, ratio_cell  # noqa: E402

# rec_engine's default is OpenMP's, which this process shares with torch: torch.set_num_threads(n) (done by
# the bench module) changes it, so it is read here, before any benchmark runs, and again at the end.
_DEFAULT_THREADS_AT_START = rec_engine.default_num_threads()
HERE = Path(__file__).resolve().parent

# OPENBLAS_* as this process found them, before the bench module overrides OPENBLAS_CORETYPE around
# `import faiss` (see bench_kernels.py).
_ENV_AT_START = {name: os.environ.get(name) for name in
                 ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "OPENBLAS_NUM_THREADS",
                  "OPENBLAS_THREAD_TIMEOUT", "MKL_NUM_THREADS", "REC_ENGINE_SIMD")}


# ----------------------------------------------------------------------------------------- options
def pytest_addoption(parser):
    group = parser.getgroup("rec_engine bench")
    group.addoption("--bench-threads", type=int, default=2,
                    help="threads for rec_engine (num_threads=), torch.set_num_threads and FAISS (default 2)")
    group.addoption("--bench-items", type=int, default=200_000,
                    help="items in the top-k corpus (default 200000; the full size is 1000000)")
    group.addoption("--bench-table-rows", type=int, default=1_000_000,
                    help="rows of the embedding-bag table (default 1000000)")
    group.addoption("--bench-pass-table", action="store_true",
                    help="also print pytest-benchmark's own table (one row per implementation and pass)")
    group.addoption("--bench-report", default=str(HERE / "results" / "ratios.md"),
                    help="write the ratio table as Markdown here ('' to skip; default bench/results/ratios.md)")


def pytest_sessionstart(session):
    # pytest-benchmark's own table has a row per pass of each implementation (see PASSES in
    # bench_kernels.py); the ratio table below merges them, so the long one is shown only on request.
    bs = getattr(session.config, "_benchmarksession", None)
    if bs is not None and not session.config.getoption("--bench-pass-table") and not bs.verbose:
        bs.quiet = True


@pytest.fixture(scope="session")
def threads(pytestconfig) -> int:
    n = pytestconfig.getoption("--bench-threads")
    if n < 1:
        raise pytest.UsageError("--bench-threads must be >= 1")
    return n


# ------------------------------------------------------------------------------ machine description
def _cpu_model() -> str:
    fields = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # first processor only
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    name = fields.get("model name", platform.processor() or "unknown")
    extra = []
    if "cpu family" in fields:
        extra.append(f"family {fields['cpu family']} model {fields.get('model', '?')}")
    flags = set(fields.get("flags", "").split())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile") if f in flags]
    if isa:
        extra.append(" ".join(isa))
    return f"{name} ({'; '.join(extra)})" if extra else name


def _version(dist: str, module: str | None = None) -> str:
    mod = sys.modules.get(module or dist)
    if mod is not None and getattr(mod, "__version__", None):
        return str(mod.__version__)
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _openblas_cores() -> dict:
    """The kernel family ("core") each OpenBLAS loaded in this process picked, by owning package.

    NumPy, SciPy and faiss-cpu each bundle their own OpenBLAS; each reads OPENBLAS_CORETYPE once, when
    it is loaded. Only libraries already loaded are listed (SciPy's loads with scipy.linalg)."""
    cores = {}
    try:
        with open("/proc/self/maps") as fh:
            paths = sorted({ln.split()[-1] for ln in fh if "openblas" in ln.lower() and ln.split()[-1].startswith("/")})
    except OSError:
        return cores
    for path in paths:
        owner = Path(path).parent.name.replace(".libs", "").replace("_cpu", "")
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for sym in ("openblas_get_corename", "scipy_openblas_get_corename64_", "scipy_openblas_get_corename",
                    "openblas_get_corename64_"):
            fn = getattr(lib, sym, None)
            if fn is not None:
                fn.restype = ctypes.c_char_p
                cores[owner] = fn().decode()
                break
    return cores


def _core_build() -> str:
    """Which compiled core ran: the installed extension's path and modification time (the working tree
    may be newer than what is installed in the venv)."""
    import datetime

    from rec_engine import _core
    path = Path(_core.__file__)
    mtime = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return f"{path} (built {mtime:%Y-%m-%d %H:%M:%S} UTC)"


def machine_description(config) -> "OrderedDict[str, object]":
    torch = sys.modules.get("torch")
    faiss = sys.modules.get("faiss")
    info = OrderedDict()
    info["cpu"] = _cpu_model()
    info["cores"] = os.cpu_count()
    info["simd_level"] = rec_engine.simd_level()
    info["simd_levels_supported"] = rec_engine.supported_simd_levels()
    info["rec_engine_default_num_threads"] = _DEFAULT_THREADS_AT_START
    info["rec_engine_default_num_threads_at_end"] = rec_engine.default_num_threads()
    info["rec_engine_openmp"] = rec_engine.openmp_enabled()
    info["rec_engine_amx"] = rec_engine._core.amx_enabled()     # bf16 scans of 16+ queries on AMX tiles
    info["rec_engine_core"] = _core_build()
    info["bench_threads"] = config.getoption("--bench-threads")
    info["torch_num_threads"] = torch.get_num_threads() if torch is not None else None
    info["faiss_omp_max_threads"] = faiss.omp_get_max_threads() if faiss is not None else None
    info["versions"] = OrderedDict(
        rec_engine=rec_engine.__version__, numpy=_version("numpy"), torch=_version("torch"),
        faiss=_version("faiss-cpu", "faiss"), scipy=_version("scipy"), python=platform.python_version())
    info["openblas_core"] = _openblas_cores()
    info["env_at_start"] = {k: v for k, v in _ENV_AT_START.items() if v is not None}
    try:
        info["transparent_hugepages"] = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        pass
    return info


def pytest_benchmark_update_machine_info(config, machine_info):
    """Recorded in the JSON written by --benchmark-json / --benchmark-autosave."""
    machine_info["rec_engine_bench"] = machine_description(config)


def pytest_report_header(config):
    return (f"rec_engine {rec_engine.__version__}: simd={rec_engine.simd_level()} "
            f"default_num_threads={_DEFAULT_THREADS_AT_START} bench_threads={config.getoption('--bench-threads')}")


# ------------------------------------------------------------------------------------- ratio table
def _fmt_time(seconds: float, unit: tuple[str, float]) -> str:
    name, scale = unit
    return f"{seconds * scale:.3f} {name}" if seconds * scale < 10 else f"{seconds * scale:.1f} {name}"


def _unit_for(seconds: float) -> tuple[str, float]:
    if seconds < 1e-3:
        return "us", 1e6
    if seconds < 1.0:
        return "ms", 1e3
    return "s", 1.0


def collect_rows(benchmarks):
    """{group: [(impl, median_s, p99_s, rounds, recall or None), ...]} in run order, the reference first.

    Benchmarks with the same group and impl (the interleaved passes of one implementation) are merged:
    their raw round times are pooled before the median and p99 are taken."""
    data: "OrderedDict[str, OrderedDict[str, list]]" = OrderedDict()
    recall: dict = {}
    for bench in benchmarks:
        rounds = list(getattr(bench.stats, "data", []) or [])
        if not rounds or getattr(bench, "has_error", False):
            continue
        impl = str(bench.extra_info.get("impl", bench.name))
        group = bench.group or bench.name.split("[")[0]
        data.setdefault(group, OrderedDict()).setdefault(impl, []).extend(rounds)
        if "recall" in bench.extra_info:
            recall[group, impl] = min(recall.get((group, impl), 1.0), float(bench.extra_info["recall"]))
    groups: "OrderedDict[str, list]" = OrderedDict()
    for group, impls in data.items():
        rows = []
        for impl, rounds in impls.items():
            arr = np.asarray(rounds, dtype=np.float64)
            rows.append((impl, float(np.median(arr)), float(np.percentile(arr, 99)), arr.size,
                         recall.get((group, impl))))
        rows.sort(key=lambda r: r[0] != REFERENCE_IMPL)  # stable: the rest keep run order
        groups[group] = rows
    return groups


def ratio_table(groups) -> list[str]:
    lines = []
    for group, rows in groups.items():
        ref = next((r for r in rows if r[0] == REFERENCE_IMPL), None)
        best = fastest_baseline(rows)
        unit = _unit_for(ref[1] if ref is not None else min(r[1] for r in rows))
        lines.append("")
        lines.append(group)
        lines.append(f"  {'impl':<34}{'median':>12}{'p99':>12}{'rounds':>8}   ratio (baseline median / rec_engine median)")
        for impl, med, p99, n, rec in rows:
            lines.append(f"  {label(impl, rec):<34}{_fmt_time(med, unit):>12}{_fmt_time(p99, unit):>12}{n:>8}   "
                         f"{ratio_cell(impl, med, ref, best)}")
        if ref is not None and best is not None:
            verdict = "rec_engine faster" if best[1] > ref[1] else "rec_engine SLOWER"
            lines.append(f"  -> fastest baseline: {best[0]}/{REFERENCE_IMPL} = {best[1] / ref[1]:.2f}x ({verdict})")
    return lines


def markdown_report(groups, info) -> str:
    out = ["# rec_engine benchmark: medians, p99 and ratios", ""]
    out.append("ratio = baseline median / rec_engine median (above 1: rec_engine is faster)")
    out.append("")
    for key, value in info.items():
        out.append(f"- **{key}**: {value}")
    for group, rows in groups.items():
        ref = next((r for r in rows if r[0] == REFERENCE_IMPL), None)
        best = fastest_baseline(rows)
        unit = _unit_for(ref[1] if ref is not None else min(r[1] for r in rows))
        out += ["", f"### {group}", "", "| impl | median | p99 | rounds | ratio |", "|---|---:|---:|---:|---|"]
        for impl, med, p99, n, rec in rows:
            out.append(f"| {label(impl, rec)} | {_fmt_time(med, unit)} | {_fmt_time(p99, unit)} | {n} | "
                       f"{ratio_cell(impl, med, ref, best)} |")
    return "\n".join(out) + "\n"


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or bs.disabled or not bs.benchmarks:
        return
    groups = collect_rows(bs.benchmarks)
    if not groups:
        return
    info = machine_description(config)
    tr = terminalreporter
    tr.write_sep("=", "rec_engine ratio table")
    v = info["versions"]
    tr.write_line(f"CPU: {info['cpu']}, {info['cores']} cores")
    tr.write_line(f"rec_engine {v['rec_engine']}: simd_level={info['simd_level']} "
                  f"default_num_threads={info['rec_engine_default_num_threads']} "
                  f"(at end {info['rec_engine_default_num_threads_at_end']}) openmp={info['rec_engine_openmp']} "
                  f"amx={info['rec_engine_amx']}; "
                  f"bench threads={info['bench_threads']} (torch {info['torch_num_threads']}, "
                  f"faiss {info['faiss_omp_max_threads']})")
    tr.write_line(f"core: {info['rec_engine_core']}")
    tr.write_line(f"numpy {v['numpy']}, torch {v['torch']}, faiss {v['faiss']}, scipy {v['scipy']}; "
                  f"OpenBLAS cores: {info['openblas_core']}; env at start: {info['env_at_start'] or '{}'}")
    tr.write_line("ratio = baseline median / rec_engine median (above 1: rec_engine is faster); "
                  "p99 from each benchmark's raw rounds")
    for line in ratio_table(groups):
        tr.write_line(line)
    report = config.getoption("--bench-report")
    if report:
        path = Path(report)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(markdown_report(groups, info))
        tr.write_line("")
        tr.write_line(f"ratio table written to {path}")
