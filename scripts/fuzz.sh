#!/usr/bin/env bash
# Fuzz the core and the bundle loader with atheris against the ASan/UBSan core (issue 18):
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]      SECONDS per target (default 20); TARGET: core, bundle (default both)
# Needs clang (Debian: apt-get install -y clang libclang-rt-14-dev libomp-14-dev); installs atheris into
# .venv when missing; builds build/asan (scripts/sanitize.sh) and the seed bundles (build/fuzz/seeds) once.
# Corpora grow in build/fuzz/corpus/<target>; a crashing input is written to build/fuzz/crashes/<target>-*
# and its report to build/fuzz/<target>.log. Prints one line per target: seconds, executions, result.
# FUZZ_KEEP_GOING=1 lists every distinct unexpected Python exception (build/fuzz/findings.txt) instead of
# stopping at the first; native crashes and sanitizer reports always stop the run.
# To replay one input: bash scripts/fuzz.sh replay TARGET FILE
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
replay=""
if [ "${1:-}" = replay ]; then
  replay="$3"; set -- 0 "$2"
fi
secs="${1:-20}"
[ $# -gt 0 ] && shift
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(core bundle)

"$py" -c "import atheris" 2>/dev/null || "$py" -m pip install -q atheris
SANITIZE_BUILD_ONLY=1 bash scripts/sanitize.sh asan > build/fuzz-asan-build.log 2>&1 \
  || { tail -30 build/fuzz-asan-build.log >&2; exit 1; }
mkdir -p build/fuzz/crashes
site="$("$py" -c 'import atheris, os; print(atheris.path())')"
# atheris's own ASan runtime with libFuzzer in it (the core was built with -fsanitize=fuzzer-no-link, so
# libFuzzer sees its branches); python itself is not instrumented: no leak detection
export LD_PRELOAD="$site/asan_with_fuzzer.so"
export ASAN_OPTIONS="detect_leaks=0:allocator_may_return_null=1:abort_on_error=0:handle_abort=1"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1"
export PYTHONPATH="build/asan/pkg:.devpath"
export FUZZ_FINDINGS="$PWD/build/fuzz/findings.txt"
export OMP_NUM_THREADS=2

if [[ " ${targets[*]} " == *" bundle "* ]] && [ ! -f build/fuzz/seeds/.done ]; then
  echo "fuzz: building the seed bundles (build/fuzz/seeds)"
  # (an uninstrumented rec_engine writes them: the dev build's when there is one, else the installed one)
  seedpath=""
  compgen -G "python/rec_engine/_core*.so" > /dev/null && seedpath="python:.devpath"
  env -u LD_PRELOAD PYTHONPATH="$seedpath" "$py" fuzz/make_seeds.py build/fuzz/seeds
fi

if [ -n "$replay" ]; then
  exec "$py" "fuzz/fuzz_${targets[0]}.py" "$replay"
fi

rm -f "$FUZZ_FINDINGS"
FUZZ_WORK="$(mktemp -d "${TMPDIR:-/dev/shm}/rec_engine_fuzz.XXXXXX" 2>/dev/null || mktemp -d)"
export FUZZ_WORK
trap 'rm -rf "$FUZZ_WORK"' EXIT
status=0
printf '%-8s %8s %12s  %s\n' target seconds executions result
for t in "${targets[@]}"; do
  corpus="build/fuzz/corpus/$t"
  mkdir -p "$corpus"
  log="build/fuzz/$t.log"
  dirs=("$corpus")
  [ -d "fuzz/corpus/$t" ] && dirs+=("fuzz/corpus/$t")
  t0=$SECONDS
  rc=0
  "$py" "fuzz/fuzz_$t.py" -max_total_time="$secs" -rss_limit_mb=4096 -timeout=60 -print_final_stats=1 \
      -artifact_prefix="build/fuzz/crashes/$t-" "${dirs[@]}" > "$log" 2>&1 || rc=$?
  execs="$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' | tail -1)"
  [ -n "$execs" ] || execs="$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')"
  if [ "$rc" = 0 ]; then
    result=ok
  else
    result="FAILED (rc $rc, see $log; input: $(ls -t build/fuzz/crashes/"$t"-* 2>/dev/null | head -1))"
    status=1
  fi
  printf '%-8s %8s %12s  %s\n' "$t" "$((SECONDS - t0))" "${execs:-?}" "$result"
done
[ -s "$FUZZ_FINDINGS" ] && { echo "findings so far (build/fuzz/findings.txt):"; sort -u "$FUZZ_FINDINGS"; }
exit $status
