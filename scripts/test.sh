#!/usr/bin/env bash
# Sets up .venv with the test and cluster extras (the cluster tests run a local Ray cluster) and runs the fast
# test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test,cluster
.venv/bin/python -m pytest "$@"
