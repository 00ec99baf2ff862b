#!/usr/bin/env bash
# Put DeepSpeed and the pure-Python dependencies the GPU machine's image lacks into .device/whl/,
# so that `accelerate launch --config_file accelerate/2x8gpu-deepspeed-zero2.yaml ...` (and
# tests/test_gpu.py's ZeRO-2 test) can run there. PyPI has DeepSpeed only as an sdist; built with
# DS_BUILD_OPS=0 it is a pure-Python wheel (~2 MB) whose CUDA ops compile at run time with ninja,
# when one is first used.
#
#   bash ../shared/device/prepare.sh        # first: it recreates .device/ from scratch
#   bash scripts/gpu-extra-wheels.sh        # then this adds to .device/whl/
#
# DEEPSPEED_VERSION picks the release (default below); EXTRA_DEPS the dependency wheels to carry
# (default: hjson, DeepSpeed's one requirement the image lacks; the image has ninja, py-cpuinfo,
# psutil, msgpack, einops, pydantic, packaging, numpy, tqdm and torch).
set -euo pipefail
root=$(git rev-parse --show-toplevel 2>/dev/null) || { echo "gpu-extra-wheels.sh: run it inside the project checkout" >&2; exit 1; }
cd "$root"
version=${DEEPSPEED_VERSION:-0.19.8}
deps=${EXTRA_DEPS:-hjson}
pip=(python3 -m pip)
[ -x .venv/bin/python ] && pip=(.venv/bin/python -m pip)
whl=.device/whl
mkdir -p "$whl"
exclude=$(git rev-parse --git-path info/exclude)  # .device/ stays out of git, as prepare.sh keeps it
mkdir -p "$(dirname "$exclude")"
grep -qx "/.device/" "$exclude" 2>/dev/null || echo "/.device/" >> "$exclude"
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT

# DeepSpeed: the wheel is pure Python (py3-none-any) when no op is prebuilt
DS_BUILD_OPS=0 "${pip[@]}" wheel -q --no-deps --no-cache-dir "deepspeed==$version" -w "$build" 2>&1 | grep -v "^WARNING: Location" || true
built=$(ls "$build"/deepspeed-"$version"-*.whl 2>/dev/null | head -1)
[ -n "$built" ] || { echo "gpu-extra-wheels.sh: building deepspeed==$version failed" >&2; exit 1; }
case "$built" in
  *-py3-none-any.whl) ;;
  *) echo "gpu-extra-wheels.sh: $built is not a pure-Python wheel (ops were compiled in): set DS_BUILD_OPS=0" >&2; exit 1 ;;
esac
rm -f "$whl"/deepspeed-*.whl
cp "$built" "$whl/"

# its dependencies the image lacks, as binary wheels for the GPU machine's Python 3.12
# shellcheck disable=SC2086
"${pip[@]}" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  -d "$whl" $deps 2>&1 | grep -v "^WARNING: Location" || true
for d in $deps; do
  ls "$whl" | grep -qi "^${d//-/_}-" || { echo "gpu-extra-wheels.sh: no wheel for $d" >&2; exit 1; }
done

for f in "$whl"/deepspeed-*.whl; do du -h "$f"; done
for d in $deps; do du -h "$whl"/$(ls "$whl" | grep -i "^${d//-/_}-" | head -1); done
echo "added: $(du -ch "$whl"/deepspeed-*.whl $(for d in $deps; do ls "$whl"/* | grep -i "/${d//-/_}-"; done) | tail -1 | cut -f1); .device/ now $(du -sh .device | cut -f1)"
