#!/usr/bin/env bash
# Compiles this folder's CUDA kernels for the CPU (cuda_on_cpu.h) and checks them against
# float64 references: their index arithmetic, tested where no GPU is. Needs g++ with C++20 and
# the torch to build against (for c10's Half/BFloat16). About 30 s.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
torch_include="$("${PYTHON:-python}" -c 'from torch.utils.cpp_extension import include_paths; print(include_paths()[0])' 2>/dev/null)"
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for test in conv_kernels_on_cpu add_relu_kernels_on_cpu relu_backward_kernels_on_cpu; do
  "${CXX:-g++}" -std=c++20 -O1 -pthread -I"$here" -I"$here/stubs" -I"$here/.." -isystem "$torch_include" \
      "$here/$test.cpp" -o "$out/$test"
  if ! "$out/$test" > "$out/$test.log"; then
    grep -v '^ok' "$out/$test.log"
    exit 1
  fi
  echo "$test: $(grep -c '^ok' "$out/$test.log") checks passed"
done
