#!/usr/bin/env bash
# Installs cnnkernels, built from this checkout, and what its tests and benchmarks need into
# ./.venv. Safe to run again: it reuses the venv and rebuilds the extension.
set -euo pipefail
cd "$(dirname "$0")/.."

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: the extension is compiled against the torch that is installed. The default is a
# CUDA build, so the CUDA kernels compile even on a machine without a GPU.
python -m pip install -q "torch==${TORCH_VERSION:-2.14.1}" "torchvision==${TORCHVISION_VERSION:-0.29.1}"
# What the build reads: ninja for parallel compiles, CUTLASS's headers for the Hopper conv.
python -m pip install -q ninja pybind11 "nvidia-cutlass==4.2.0"
MAX_JOBS="${MAX_JOBS:-$(nproc)}" python -m pip install -q --no-build-isolation -e ".[test,bench]"
python -m cnnkernels.info
