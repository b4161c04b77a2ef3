"""Benchmark report: Markdown tables and plots from pytest-benchmark JSON files.

Usage (from the repository root)::

    .venv/bin/python bench/report.py                      # every bench/**/*.json -> bench/results/REPORT.md
    .venv/bin/python bench/report.py a.json b.json --out DIR

Each JSON file is what ``pytest bench/... --benchmark-json FILE`` writes. Benchmarks are grouped by
their ``group``; the interleaved passes of one implementation (same group and ``extra_info["impl"]``)
are merged by pooling their raw round times, then the median and p99 are taken, and every baseline gets
``baseline median / rec_engine median`` (above 1: rec_engine is faster). A group that appears in
several files is reported once per file (the file is named in the section), so runs with different
options (thread counts, table sizes) stay apart.

The header lists each file's machine: CPU, SIMD level, thread counts and library versions (recorded by
bench/conftest.py under ``machine_info.rec_engine_bench``).

Plots (PNG, matplotlib; skipped with a printed reason when it is not installed): latency against corpus
size and against batch size, from benchmarks whose ``extra_info`` has ``sweep`` = "items" or "batch"
(bench_kernels.py's size sweeps), one line per implementation.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from ratios import REFERENCE, fastest_baseline, label, ratio_cell  # noqa: E402


def load(paths):
    """[(path, data)] of the readable pytest-benchmark JSON files among ``paths``."""
    out = []
    for p in paths:
        try:
            data = json.loads(Path(p).read_text())
        except (OSError, ValueError) as e:
            print(f"skipped {p}: {e}")
            continue
        if isinstance(data, dict) and "benchmarks" in data:
            out.append((Path(p), data))
    return out


def rows_by_group(data):
    """{group: [(impl, median_s, p99_s, rounds, recall or None)]} with rec_engine first, passes merged."""
    raw: "OrderedDict[str, OrderedDict[str, list]]" = OrderedDict()
    recall: dict = {}
    for b in data["benchmarks"]:
        stats = b.get("stats") or {}
        rounds = stats.get("data") or []
        if not rounds:
            if "median" not in stats:
                continue
            rounds = [stats["median"]]  # no raw data: the median only (p99 then equals it)
        impl = str((b.get("extra_info") or {}).get("impl", b.get("name")))
        group = b.get("group") or b.get("name", "?").split("[")[0]
        raw.setdefault(group, OrderedDict()).setdefault(impl, []).extend(rounds)
        info = b.get("extra_info") or {}
        if "recall" in info:
            recall[group, impl] = min(recall.get((group, impl), 1.0), float(info["recall"]))
    groups = OrderedDict()
    for group, impls in raw.items():
        rows = []
        for impl, r in impls.items():
            a = np.asarray(r, dtype=np.float64)
            rows.append((impl, float(np.median(a)), float(np.percentile(a, 99)), int(a.size),
                         recall.get((group, impl))))
        rows.sort(key=lambda row: row[0] != REFERENCE)
        groups[group] = rows
    return groups


def fmt(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.2f} us"
    if seconds < 1.0:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds:.3f} s"


def machine_lines(data):
    mi = data.get("machine_info") or {}
    info = mi.get("rec_engine_bench") or {}
    cpu = info.get("cpu") or (mi.get("cpu") or {}).get("brand_raw", "?")
    v = info.get("versions") or {}
    lines = [f"- CPU: {cpu}, {info.get('cores', '?')} cores; SIMD level {info.get('simd_level', '?')} "
             f"(supported: {', '.join(info.get('simd_levels_supported', []) or ['?'])}); "
             f"OpenMP {info.get('rec_engine_openmp', '?')}",
             f"- threads: bench {info.get('bench_threads', '?')}, torch {info.get('torch_num_threads', '?')}, "
             f"faiss {info.get('faiss_omp_max_threads', '?')}, rec_engine default "
             f"{info.get('rec_engine_default_num_threads', '?')}",
             "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
             f"- core: {info.get('rec_engine_core', '?')}"]
    if info.get("openblas_core"):
        lines.append(f"- OpenBLAS cores: {info['openblas_core']}")
    if info.get("env_at_start"):
        lines.append(f"- environment: {info['env_at_start']}")
    if info.get("transparent_hugepages"):
        lines.append(f"- transparent hugepages: {info['transparent_hugepages']}")
    if data.get("datetime"):
        lines.append(f"- run: {data['datetime']}")
    return lines


def markdown(files) -> str:
    out = ["# rec_engine benchmark report", "",
           "Medians and p99 of the raw rounds of each implementation (interleaved passes pooled); "
           "ratio = baseline median / rec_engine median (above 1: rec_engine is faster).", ""]
    for path, data in files:
        out += [f"## {path.name}", ""] + machine_lines(data) + [""]
        summary = []
        for group, rows in rows_by_group(data).items():
            ref = next((r for r in rows if r[0] == REFERENCE), None)
            best = fastest_baseline(rows)
            out += [f"### {group}", "", "| impl | median | p99 | rounds | ratio |", "|---|---:|---:|---:|---|"]
            for impl, med, p99, n, rec in rows:
                out.append(f"| {label(impl, rec)} | {fmt(med)} | {fmt(p99)} | {n} | {ratio_cell(impl, med, ref, best)} |")
            out.append("")
            if ref is not None and len(rows) > 1:
                ratios = ", ".join(ratio_cell(r[0], r[1], ref, best) for r in rows if r[0] != REFERENCE)
                summary.append(f"| {group} | {fmt(ref[1])} | {ratios} |")
        if summary:
            out += ["### summary", "", "| group | rec_engine median | ratios |", "|---|---:|---|"]
            out += summary + [""]
    return "\n".join(out) + "\n"


def sweep_points(files, kind):
    """{impl: [(x, median_s)]} over benchmarks with extra_info sweep == kind (x: items or batch)."""
    key = "items" if kind == "items" else "batch"
    pts: "OrderedDict[str, dict]" = OrderedDict()
    for _, data in files:
        raw = {}
        for b in data["benchmarks"]:
            ei = b.get("extra_info") or {}
            if ei.get("sweep") != kind or key not in ei:
                continue
            rounds = (b.get("stats") or {}).get("data") or [(b.get("stats") or {}).get("median")]
            raw.setdefault((str(ei.get("impl")), int(ei[key])), []).extend(x for x in rounds if x is not None)
        for (impl, x), r in raw.items():
            pts.setdefault(impl, {})[x] = float(np.median(r))
    return {impl: sorted(d.items()) for impl, d in pts.items()}


def plots(files, out_dir: Path) -> list[Path]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print(f"plots skipped: matplotlib is not installed ({e}); pip install matplotlib")
        return []
    made = []
    for kind, xlabel, name in (("items", "corpus size (items)", "latency_vs_corpus.png"),
                               ("batch", "batch size (queries)", "latency_vs_batch.png")):
        pts = sweep_points(files, kind)
        if not pts:
            print(f"no '{kind}' sweep in the JSON files: {name} not drawn (run bench_kernels.py -k sweep)")
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for impl, xy in pts.items():
            xs, ys = zip(*xy)
            ax.plot(xs, [y * 1e3 for y in ys], marker="o", label=impl)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("median latency (ms)")
        ax.set_title(f"top-k (k=10) latency vs {kind}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=120)
        plt.close(fig)
        made.append(path)
    return made


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("json", nargs="*", help="pytest-benchmark JSON files (default: every bench/**/*.json)")
    ap.add_argument("--out", default=str(HERE / "results"), help="output folder (default bench/results)")
    args = ap.parse_args(argv)
    paths = [Path(p) for p in args.json] or sorted(HERE.rglob("*.json"))
    files = load(paths)
    if not files:
        print("no pytest-benchmark JSON files found; run e.g. "
              "`pytest bench/bench_kernels.py --benchmark-json bench/results/kernels.json` first")
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    made = plots(files, out)
    text = markdown(files)
    if made:
        text += "\n## plots\n\n" + "\n".join(f"![{p.stem}]({p.name})" for p in made) + "\n"
    (out / "REPORT.md").write_text(text)
    print(f"wrote {out / 'REPORT.md'} from {len(files)} file(s)" + (f" and {len(made)} plot(s)" if made else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
