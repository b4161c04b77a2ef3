#!/usr/bin/env bash
# Sets up .venv with the test extra and runs the fast test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh test
.venv/bin/python -m pytest "$@"
