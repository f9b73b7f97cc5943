"""The CUDA kernels' index arithmetic, checked without a GPU: csrc/cuda/emulation compiles the
generic conv, add_relu and relu_backward_bias_grad kernels for the CPU and compares them with
float64 references."""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_generic_cuda_kernels_run_correctly_on_the_cpu_emulation():
    done = subprocess.run(["bash", str(ROOT / "csrc" / "cuda" / "emulation" / "run.sh")], capture_output=True,
                          text=True, timeout=900, env=os.environ | {"PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("checks passed") == 3, done.stdout
