#!/usr/bin/env bash
# The test suite on this machine's CPU, but against the GPU image's stack: torch 2.11.0+cu130,
# triton 3.6.0 and torchvision 0.26.0, with the extension (sm_90a code included) built against
# torch 2.11's headers. A lent GPU gets 15 minutes; what breaks only on that stack should break
# here first (seen: a custom op whose omitted mutable argument torch 2.11 indexes, IndexError).
# The GPU-only tests still skip: they need the device.
# Needs ./.venv from .ci/install.sh, whose nvidia and CUTLASS headers and pytest plugins it
# borrows. First run: about 1 GB of downloads, a full build (~15 min on 2 cores), then the tests
# (~5 min); later runs rebuild only what changed.
# Usage: bash .ci/device_stack_check.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
WORK="${WORK:-/tmp/cnnkernels-device-stack}"
VENV="$WORK/venv" SRC="$WORK/src"
[ -x .venv/bin/python ] || { echo "run .ci/install.sh first (./.venv is borrowed from)"; exit 1; }

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  # numpy < 2.4: Triton 3.6's interpreter turns one-element arrays into scalars, which 2.4 refuses.
  { "$VENV/bin/pip" install -q --no-deps torch==2.11.0 triton==3.6.0 torchvision==0.26.0 &&
    "$VENV/bin/pip" install -q typing_extensions sympy filelock networkx jinja2 fsspec setuptools \
      ninja pybind11 "numpy<2.4"; } > "$WORK/install.log" 2>&1 \
    || { tail -n 20 "$WORK/install.log"; rm -rf "$VENV"; exit 1; }
  # Searched after the venv's own packages: the rest (pytest, nvidia headers, CUTLASS) from ./.venv.
  .venv/bin/python -c "import sysconfig; print(sysconfig.get_path('purelib'))" \
    > "$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_path('purelib'))")/zz_borrowed.pth"
fi

# The working tree as it is, uncommitted changes included; tar keeps modification times, so
# ninja recompiles only the sources that changed since the last run.
mkdir -p "$SRC"
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$SRC"
cd "$SRC"
PATH="$VENV/bin:$PATH" TORCH_CUDA_ARCH_LIST=9.0a MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
  "$VENV/bin/python" setup.py -q build_ext --inplace > "$WORK/build.log" 2>&1 \
  || { tail -n 40 "$WORK/build.log"; exit 1; }
"$VENV/bin/python" -m cnnkernels.info | sed -n 1,4p  # sed reads it all: no SIGPIPE under pipefail
# PYTHONPATH: the tests' subprocesses (DDP workers, torchrun) import cnnkernels from here too.
PYTHONPATH="$SRC" exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
