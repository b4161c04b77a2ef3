#!/usr/bin/env bash
# The C++ core under sanitizers (issue 18). Builds with clang (Debian: apt-get install clang libclang-rt-14-dev
# libomp-14-dev) into a separate build folder, never touching the dev or wheel builds:
#   bash scripts/sanitize.sh [asan|tsan|all] [PYTEST ARGS...]
#     asan  (default) build/asan: -fsanitize=address,undefined; runs ctest (the C++ kernel tests) and the
#           Python kernel and thread tests against that core (python itself is not instrumented: the ASan
#           runtime is LD_PRELOADed and leak detection is off, since CPython's own allocations look like leaks)
#     tsan  build/tsan: -fsanitize=thread; runs ctest and the threaded Python tests (tests/test_threads.py).
#           OpenMP regions are checked through LLVM's Archer tool (libarcher.so), which tells TSan about the
#           uninstrumented libomp's synchronization.
#     all   both
# Any sanitizer report fails the run (errors are not recoverable: -fno-sanitize-recover=all, halt_on_error=1).
# Only the build step is needed by the fuzzers: SANITIZE_BUILD_ONLY=1 bash scripts/sanitize.sh asan
# The assembled package is build/<kind>/pkg (PYTHONPATH=build/<kind>/pkg:.devpath).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-asan}"
[ $# -gt 0 ] && shift
py=.venv/bin/python
CC_BIN="${CC_SAN:-clang}"
CXX_BIN="${CXX_SAN:-clang++}"
if ! command -v "$CXX_BIN" >/dev/null 2>&1; then
  echo "sanitize: $CXX_BIN not found (Debian: apt-get install -y clang libclang-rt-14-dev libomp-14-dev)" >&2
  exit 2
fi
jobs="${SANITIZE_JOBS:-2}"
# the build's own tools (the test extra has cmake and ninja; pybind11 is only a wheel build dependency)
"$py" -c "import pybind11" 2>/dev/null || "$py" -m pip install -q pybind11
"$py" -c "import cmake, ninja" 2>/dev/null || "$py" -m pip install -q cmake ninja

PY_TESTS_ASAN=(tests/test_topk.py tests/test_embedding.py tests/test_graph.py tests/test_threads.py
               tests/test_topk_packed_and_quantized.py tests/test_keys.py tests/test_pool_select.py
               tests/test_native_dense.py)
[ -f tests/test_fuzz_regressions.py ] && PY_TESTS_ASAN+=(tests/test_fuzz_regressions.py)
PY_TESTS_TSAN=("${PY_TESTS_ASAN[@]}")

build() {  # build KIND SANITIZE_FLAGS OPENMP(ON|OFF) MODULE_LINK_FLAGS
  local k="$1" flags="$2" omp="$3" modflags="$4" dir="build/$1"
  local t0=$SECONDS
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
        -DCMAKE_C_COMPILER="$CC_BIN" -DCMAKE_CXX_COMPILER="$CXX_BIN" \
        -DCMAKE_CXX_FLAGS="$flags -fno-omit-frame-pointer -fno-sanitize-recover=all" \
        -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O1 -g" \
        -DCMAKE_EXE_LINKER_FLAGS="$flags" \
        -DCMAKE_MODULE_LINKER_FLAGS="$modflags" -DCMAKE_SHARED_LINKER_FLAGS="$modflags" \
        -DREC_ENGINE_BUILD_PYTHON=ON -DREC_ENGINE_BUILD_TESTS=ON -DREC_ENGINE_INSTALL_PACKAGE=OFF \
        -DREC_ENGINE_USE_OPENMP="$omp" \
        -DPython_EXECUTABLE="$py" -Dpybind11_DIR="$($py -m pybind11 --cmakedir)" \
        -DCMAKE_MAKE_PROGRAM="$PWD/.venv/bin/ninja" > "$dir.configure.log" 2>&1 \
    || { cat "$dir.configure.log" >&2; exit 1; }
  cmake --build "$dir" -j "$jobs"
  rm -rf "$dir/pkg"
  mkdir -p "$dir/pkg/rec_engine"
  cp python/rec_engine/*.py python/rec_engine/*.pyi python/rec_engine/py.typed "$dir/pkg/rec_engine/"
  cp "$dir"/_core*.so "$dir/pkg/rec_engine/"
  echo "sanitize[$k]: built in $((SECONDS - t0)) s: PYTHONPATH=$dir/pkg"
}

run_asan() {
    # the module leaves the ASan runtime's symbols undefined: the runtime is LD_PRELOADed (python is not
  # instrumented): clang's own below, atheris's asan_with_fuzzer.so for the fuzzers (scripts/fuzz.sh)
  # fuzzer-no-link: coverage counters for the fuzzers (scripts/fuzz.sh); the plain ASan runtime ignores them
  # -fno-sanitize=vptr,function: atheris's runtime lacks UBSan's C++ part (type checks of virtual and indirect calls)
  build asan "-fsanitize=address,undefined,fuzzer-no-link -fno-sanitize=vptr,function" ON "-fsanitize=address,undefined"
  [ "${SANITIZE_BUILD_ONLY:-0}" = 1 ] && return 0
  local rt t0
  rt="$("$CXX_BIN" -print-file-name=libclang_rt.asan-x86_64.so)"
  export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1"
  export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
  t0=$SECONDS
  ctest --test-dir build/asan --output-on-failure
  echo "sanitize[asan]: ctest passed in $((SECONDS - t0)) s"
  t0=$SECONDS
  # every SIMD level the machine has is exercised by the tests' own `simd` fixture
  LD_PRELOAD="$rt" PYTHONPATH="build/asan/pkg:.devpath" "$py" -c \
    'import rec_engine._core as c; print("sanitize[asan]: core", c.__file__, "simd", c.simd_level())'
  LD_PRELOAD="$rt" PYTHONPATH="build/asan/pkg:.devpath" "$py" -m pytest -q -p no:cacheprovider "${PY_TESTS_ASAN[@]}" "$@"
  echo "sanitize[asan]: python tests passed in $((SECONDS - t0)) s"
}

run_tsan() {
  # the module leaves the TSan symbols undefined: they come from the python executable built here
  build tsan "-fsanitize=thread" ON "-fsanitize=thread"
  local archer t0 inc libdir
  inc="$("$py" -c 'import sysconfig; print(sysconfig.get_path("include"))')"
  libdir="$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')"
  "$CC_BIN" -fsanitize=thread -O1 -g -I"$inc" scripts/sanitize_python_main.c -o build/tsan/python \
      -L"$libdir" -l"python$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LDVERSION"))')" -Wl,-rpath,"$libdir" -Wl,--export-dynamic
  [ "${SANITIZE_BUILD_ONLY:-0}" = 1 ] && return 0
  archer="$(ls /usr/lib/llvm-*/lib/libarcher.so 2>/dev/null | head -1 || true)"   # optional (libomp-dev)
  export TSAN_OPTIONS="halt_on_error=1:second_deadlock_stack=1:ignore_noninstrumented_modules=1"
  [ -n "$archer" ] && export OMP_TOOL_LIBRARIES="$archer" ARCHER_OPTIONS="verbose=0"
  t0=$SECONDS
  ctest --test-dir build/tsan --output-on-failure
  echo "sanitize[tsan]: ctest passed in $((SECONDS - t0)) s"
  t0=$SECONDS
  local site
  site="$("$py" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
  PYTHONPATH="build/tsan/pkg:.devpath:$site" build/tsan/python -m pytest -q -p no:cacheprovider "${PY_TESTS_TSAN[@]}" "$@"
  echo "sanitize[tsan]: python tests passed in $((SECONDS - t0)) s"
}

case "$kind" in
  asan) run_asan "$@" ;;
  tsan) run_tsan "$@" ;;
  all) run_asan "$@"; run_tsan "$@" ;;
  *) echo "usage: sanitize.sh [asan|tsan|all] [PYTEST ARGS...]" >&2; exit 2 ;;
esac
