#!/usr/bin/env bash
# The GPU check, in one call on an H100 or H200 with the machine's own torch:
#   builds the extension for Hopper, runs the whole test suite with CUDA required, runs
#   compute-sanitizer over the CUDA kernels, runs the benchmark suite's default GPU subset and
#   its training step (--train), and writes everything under $OUT (default ./gpu-out). About 8
#   minutes on an H100; the steps end by 570 s (580 s if the build takes its whole cap), under
#   one device command's 10 minutes.
# Usage: bash benchmarks/gpu_check.sh [--full]
# Each step has its own time cap, so one slow step cannot eat the lease; the summary at the
# end says which steps passed, and the exit status is 1 if any failed.
# On the lent device machine: carry the nvidia-cutlass wheel in .whl/ (see README) and call
#   run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=600).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT" "$OUT/work"
LOG="$OUT/gpu_check.log"
FULL="${1:-}"
export PYTHONUNBUFFERED=1
declare -a SUMMARY=()
FAILED=0

step() {  # step NAME SECONDS COMMAND...: runs with a time cap, logs, records the status
  local name=$1 cap=$2; shift 2
  local start=$SECONDS
  echo "=== $name (cap ${cap}s): $*" | tee -a "$LOG"
  # SIGINT first: Python stops as on Ctrl-C, so pytest still writes its report of what ran.
  timeout --signal=INT --kill-after=20 "$cap" "$@" >> "$LOG" 2>&1
  local rc=$?
  LAST_RC=$rc  # 124: stopped at its cap
  [ "$rc" -eq 0 ] || FAILED=1
  SUMMARY+=("$(printf '%-12s rc=%-3s %4ss' "$name" "$rc" "$((SECONDS - start))")")
  echo "=== $name: rc=$rc in $((SECONDS - start))s" | tee -a "$LOG"
  return $rc
}

{ date -u; nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } >> "$LOG" 2>&1

# Packages the GPU image lacks (nvidia-cutlass) travel as wheels in .whl/ (see README).
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl >> "$LOG" 2>&1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# If the image's pip/setuptools cannot do the editable install, build in place (ninja reuses the
# objects already compiled) and import from the checkout.
export TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS=16
if ! step build 180 python3 -m pip install --no-build-isolation --no-deps -e .; then
  step build_inplace 150 python3 setup.py build_ext --inplace || { printf '%s\n' "${SUMMARY[@]}"; exit 1; }
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" FAILED=0
fi
python3 -m cnnkernels.info 2>&1 | tee -a "$LOG"

# Correctness runs on the first (untuned) Triton config; the autotune tests turn tuning on
# themselves. Tuning every test shape would take longer than the whole check.
# 12 workers: the tests compile many Triton kernels (CPU-bound) on a 16-core machine.
XDIST=""
python3 -c "import xdist" 2> /dev/null && XDIST="-n 12"
# A run stopped at its cap did not run every test: its report is kept as gpu-tests-partial.xml
# and not given to the bench, so the results do not count as verified (bench/auto_choice.py).
# The tests may run until 350 s into the check (at least 170 s: what the build leaves of its cap
# goes to them), so that with the later steps' caps (105 + 45 + 70 s) the check ends by 570 s.
TESTS_CAP=$((350 - SECONDS))
[ "$TESTS_CAP" -lt 170 ] && TESTS_CAP=170
step tests "$TESTS_CAP" env CNNKERNELS_REQUIRE_CUDA=1 CNNKERNELS_AUTOTUNE=0 python3 -m pytest tests -q $XDIST \
  -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml"
[ "$LAST_RC" -eq 124 ] && [ -f "$OUT/gpu-tests.xml" ] && mv "$OUT/gpu-tests.xml" "$OUT/gpu-tests-partial.xml"
grep -E "^[0-9]+ (passed|failed)|^=+ .*(passed|failed)" "$LOG" | tail -n 1

# The bench stops starting measurements after --budget-s; what is left is recorded as skipped.
BENCH_ARGS=(--out "$OUT/work/bench" --gpu-tests-report "$OUT/gpu-tests.xml" --budget-s 60) BENCH_CAP=105
[ "$FULL" = "--full" ] && BENCH_ARGS+=(--full --budget-s 480) BENCH_CAP=560
step bench "$BENCH_CAP" python3 -m cnnkernels.bench "${BENCH_ARGS[@]}"

# Issue 7's training step, ResNet-50@128 in bf16: eager (torchvision, cuDNN) vs the zoo under the
# triton backend, whose only Triton kernels in train mode are the fused BatchNorm + ReLU (convs
# stay cuDNN's). The zoo under "auto" is eager until results verify ours, so it is not timed here;
# VGG-16 (no BN) and compile are for --train --full. The -train.json is rewritten after every
# result, so a cap leaves what was measured.
step train 45 python3 -m cnnkernels.bench --train --models resnet50 --contenders eager,ours_triton \
  --out "$OUT/work/bench" --budget-s 25
python3 -m cnnkernels.bench.readme "$OUT/work/bench" > "$OUT/work/bench/README-section.md" 2>> "$LOG"

# Without the caching allocator every tensor is its own allocation, so out-of-bounds
# accesses are caught. The script also exits non-zero on a wrong result.
step memcheck 70 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
  compute-sanitizer --tool memcheck --error-exitcode 1 python3 csrc/cuda/memcheck.py

# At most 8 files come back from the device machine: the key ones, plus one archive of all. Six
# land in $OUT: gpu_check.log, gpu-tests.xml, the layer and -train JSON, README-section.md, the archive.
cp "$OUT"/work/bench/*.json "$OUT/" 2> /dev/null
cp "$OUT"/work/bench/*.md "$OUT/" 2> /dev/null
tar -czf "$OUT/gpu_check.tar.gz" -C "$OUT" work $(cd "$OUT" && ls gpu-tests*.xml 2> /dev/null) gpu_check.log
rm -rf "$OUT/work"
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
exit $FAILED
