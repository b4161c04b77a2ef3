#!/usr/bin/env bash
# Sets up .venv (with the train and serve extras) and runs the end-to-end demo on synthetic data. Extra arguments go to `rec-engine demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh train,serve
.venv/bin/rec-engine demo "$@"
