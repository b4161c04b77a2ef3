#!/usr/bin/env bash
# Regenerates bench/latest/: every suite at full size on the current build, then the report and its plots.
# About 45 minutes on 2 idle cores; keep the machine otherwise idle (the ratios are measured in the same run,
# but p99 and the HTTP table move with any other load). Needs the bench extra (faiss-cpu, matplotlib):
#   bash scripts/setup_env.sh test,bench,serve && bash bench/run_latest.sh
# It times the rec_engine that $PY imports (setup_env.sh installs the working tree into .venv; with a dev
# build instead, put it first on PYTHONPATH: the server subprocesses inherit the environment).
# Parts can be skipped: SKIP="kernels http" bash bench/run_latest.sh (names: kernels bag4m ranking engine scan http).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$PWD/.venv/bin/python}
export OMP_WAIT_POLICY=passive   # each library brings an OpenMP runtime: spinning workers starve the next one
R=bench/results
L=bench/latest
mkdir -p "$R" "$L"
skip() { [[ " ${SKIP:-} " == *" $1 "* ]]; }

skip kernels || (cd bench && "$PY" -m pytest bench_kernels.py -q --bench-items 1000000 --benchmark-json results/kernels_1M.json)
skip bag4m || (cd bench && "$PY" -m pytest bench_kernels.py -q -k embedding_bag --bench-table-rows 4000000 \
    --benchmark-json results/kernels_bag4M.json)
skip ranking || (cd bench && "$PY" -m pytest bench_ranking.py -q --benchmark-json results/ranking.json)
# (OpenBLAS's threads would busy-wait after the plain path's matvec through its own ONNX Runtime call)
skip engine || (cd bench && OPENBLAS_THREAD_TIMEOUT=4 "$PY" -m pytest bench_engine.py -q --benchmark-json results/engine.json)
skip scan || "$PY" bench/bench_scan.py --json "$R/scan.json" | tee "$L/SCAN.md"
skip http || { "$PY" bench/bench_http.py --workers 1,2 --coalesce-us 0,5000 --int8-workers 2 --plot "$L/http_throughput.png" \
    && cp "$R/http.md" "$L/HTTP.md"; }

jsons=()
for f in kernels_1M kernels_bag4M ranking engine gfcf; do [[ -f "$R/$f.json" ]] && jsons+=("$R/$f.json"); done
"$PY" bench/report.py "${jsons[@]}" --out "$L"
echo "bench/latest: REPORT.md (+ plots), SCAN.md, HTTP.md"
