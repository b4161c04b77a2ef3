#!/usr/bin/env bash
# Development build of the core outside pip, for working on C++ while other things use the installed package:
#   bash scripts/dev_build.sh DIR      builds into DIR/build and assembles DIR/pkg/rec_engine (python files + _core)
# then run Python with PYTHONPATH=DIR/pkg (plus .devpath for rec_engine_train). Rerun after every change.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${1:?usage: dev_build.sh DIR}"
py=.venv/bin/python
cmake -S . -B "$dir/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DREC_ENGINE_BUILD_PYTHON=ON \
      -DREC_ENGINE_BUILD_TESTS=ON -DREC_ENGINE_INSTALL_PACKAGE=OFF -DPython_EXECUTABLE="$py" \
      -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" > /dev/null
cmake --build "$dir/build" -j 2
mkdir -p "$dir/pkg/rec_engine"
cp python/rec_engine/*.py python/rec_engine/*.pyi python/rec_engine/py.typed "$dir/pkg/rec_engine/"
cp "$dir"/build/_core*.so "$dir/pkg/rec_engine/"
echo "built: PYTHONPATH=$dir/pkg  (C++ tests: ctest --test-dir $dir/build)"
