#!/usr/bin/env bash
# Issue 15's GPU checks, on the GPU machine, in one call (see ../shared/device/README.md):
#
#   here:   make test && bash ../shared/device/prepare.sh && bash scripts/gpu-extra-wheels.sh
#   there:  bash scripts/gpu-checks.sh [bench] [train] [tests] [serve]     (default: all four, in that order)
#
# Each step has a time limit (BENCH_S, TRAIN_S, TESTS_S,
# SERVE_S seconds) so that one slow step cannot eat the others'. Logs and JSON go to $OUT (at most
# 8 files come back): gpu.txt/gpu.json (benchmarks/gpu.py parts 1-5; BENCH_NAME renames them), train.txt/train.json
# (benchmarks/train_step.py, part 6),
# pytest.txt (the whole suite on CUDA), serve.txt/serve.json (benchmarks/serve_load.py).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
# the carried wheels are installed once per call: export GPU_CHECKS_SITE=DIR to share them between
# invocations (installed into DIR when it does not exist yet)
if [ ! -d "${GPU_CHECKS_SITE:-/nonexistent}" ]; then
  export GPU_CHECKS_SITE=${GPU_CHECKS_SITE:-$(mktemp -d)/site}
  python3 -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$GPU_CHECKS_SITE" \
    .device/whl/*.whl > /tmp/pip.txt 2>&1 || { echo "installing the carried wheels failed:"; tail -5 /tmp/pip.txt; exit 3; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  PYTHONPATH=$GPU_CHECKS_SITE python3 -c "import torch, transformers, peft, accelerate; print('torch', torch.__version__, \
'transformers', transformers.__version__, 'peft', peft.__version__, 'accelerate', accelerate.__version__)"
fi
export PYTHONPATH=$GPU_CHECKS_SITE:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=${BENCH_NAME:-gpu}  # bench's files: $OUT/$B.txt and $OUT/$B.json
steps=${*:-bench train tests serve}
for step in $steps; do
  start=$(date +%s)
  case "$step" in
    bench) timeout "${BENCH_S:-300}" python3 benchmarks/gpu.py --parts "${PARTS:-1,2,3,4,5}" \
             --compiled-parts "${COMPILED_PARTS:-3}" ${BENCH_ARGS:-} --json "$OUT/$B.json" > "$OUT/$B.txt" 2>&1
           echo "== bench rc=$? $(( $(date +%s) - start )) s"; grep -v "^  " "$OUT/$B.txt" | grep -iE "error|Traceback" | head -5
           grep "^  " "$OUT/$B.txt" | grep -v "^  |" ;;
    train) timeout "${TRAIN_S:-120}" python3 benchmarks/train_step.py --budget-s "${TRAIN_BUDGET_S:-85}" \
             --json "$OUT/train.json" > "$OUT/train.txt" 2>&1
           echo "== train rc=$? $(( $(date +%s) - start )) s"; tail -25 "$OUT/train.txt" ;;
    tests) # -o addopts="": pyproject's -q would cancel -v, and -v names each test as it ends (a run cut short
           # by its time limit still says which failed)
           timeout "${TESTS_S:-240}" python3 -m pytest -o addopts="" -v -p no:cacheprovider -n "${WORKERS:-14}" \
             --timeout 200 -rfE \
             --tb=short ${TESTS:-tests} > "$OUT/pytest.txt" 2>&1
           echo "== tests rc=$? $(( $(date +%s) - start )) s"
           grep -E " (FAILED|ERROR) |^(FAILED|ERROR)|passed|failed" "$OUT/pytest.txt" | tail -30 ;;
    *+tests)  # another step while the suite runs beside it (the suite's tiny models barely use the GPU)
           bash "$0" tests > /dev/null 2>&1 &
           bash "$0" "${step%+tests}"
           wait
           echo "== tests $(( $(date +%s) - start )) s"; grep -E " (FAILED|ERROR) |^(FAILED|ERROR)|passed|failed" \
             "$OUT/pytest.txt" | tail -30 ;;
    serve) # the deadline must cover the model save, the server start and its warm-up compile (~60 s on an H200)
           timeout "${SERVE_S:-170}" python3 benchmarks/serve_load.py \
             ${SERVE_ARGS:---random mmbert-base --clients 128,1,8,32 --seconds 2 --deadline 160} --json "$OUT/serve.json" \
             > "$OUT/serve.txt" 2>&1
           echo "== serve rc=$? $(( $(date +%s) - start )) s"; tail -30 "$OUT/serve.txt" ;;
    *) echo "unknown step $step: bench | train | tests | serve | STEP+tests"; exit 2 ;;
  esac
done
