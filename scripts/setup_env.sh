#!/usr/bin/env bash
# Creates .venv (if missing) and installs rec_engine into it with the given extras, e.g. "test".
# Needs only python3 (with venv) and a C++17 compiler; everything else comes from the package index.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
spec="."
if [ -n "$extras" ]; then spec=".[${extras}]"; fi
.venv/bin/python -m pip install --quiet "$spec"
