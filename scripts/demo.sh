#!/usr/bin/env bash
# Sets up .venv and runs the demo on generated data. Extra arguments go to `rec-engine demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
.venv/bin/rec-engine demo "$@"
