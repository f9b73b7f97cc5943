"""Builds cnnkernels and its extension cnnkernels._C.

The C++ CPU kernels are always built. The CUDA kernels in csrc/cuda/ are built whenever the
installed torch is a CUDA build and nvcc is found, with or without a GPU on this machine.

Environment:
  CNNKERNELS_CPU_ONLY=1    build the CPU kernels only
  TORCH_CUDA_ARCH_LIST     CUDA archs (default: sm_90a code plus compute_90 PTX for newer cards)
  MAX_JOBS                 parallel compile jobs (ninja)
"""
import glob
import hashlib
import os
import shutil
import subprocess
import sys

from setuptools import find_packages, setup



def _set_cuda_home_from_nvcc():
    # torch derives CUDA_HOME from where `nvcc` is on PATH, which misleads when that is a
    # wrapper (/usr/local/bin/nvcc -> CUDA_HOME=/usr/local, without libcudart). nvcc itself
    # says where its toolkit is: the TOP line of `nvcc --dryrun`.
    nvcc = shutil.which("nvcc")
    if "CUDA_HOME" in os.environ or "CUDA_PATH" in os.environ or not nvcc:
        return
    try:
        lines = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                               capture_output=True, text=True,
                               timeout=60).stderr.splitlines()
    except (OSError, subprocess.SubprocessError):
        return
    for line in lines:
        if line.startswith("#$ TOP="):
            os.environ["CUDA_HOME"] = os.path.realpath(line.split("=", 1)[1].strip())


_set_cuda_home_from_nvcc()
try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit(
        "cnnkernels needs PyTorch installed before it is built. Install torch first, then build "
        "against it without build isolation:\n    pip install torch\n    pip install --no-build-isolation ."
    )

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_90a,code=sm_90a",  # Hopper, with wgmma and TMA
    "-gencode=arch=compute_90,code=compute_90",  # PTX that newer cards compile at load time
]


def cuda_build_decision():
    """(build CUDA?, reason). Never asks torch.cuda.is_available(): build boxes have no GPU."""
    if os.environ.get("CNNKERNELS_CPU_ONLY", "0") == "1":
        return False, "CNNKERNELS_CPU_ONLY=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return False, "no CUDA sources in csrc/cuda"
    return True, ""


def cuda_library_headers():
    """Headers torch's CUDA headers include (cuBLAS, cuSPARSE) that a bare system CUDA may lack:
    the nvidia cu13 wheels that torch depends on carry them."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for root in nvidia.__path__:
        found += glob.glob(os.path.join(root, "cu*", "include"))
        found += glob.glob(os.path.join(root, "*", "include"))
    return [d for d in dict.fromkeys(found) if os.path.isdir(d)]


def cutlass_headers():
    try:
        import cutlass_library
    except ImportError:
        return []
    base = os.path.join(os.path.dirname(cutlass_library.__file__), "source")
    dirs = [os.path.join(base, "include"), os.path.join(base, "tools", "util", "include")]
    return dirs if all(os.path.isdir(d) for d in dirs) else []


def c_string(value):
    return '"' + str(value).replace('"', "") + '"'


def extension():
    with_cuda, why_not = cuda_build_decision()
    sources = ["csrc/ops.cpp", "csrc/conv_args.cpp", "csrc/autograd.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    defines = [("CNNKERNELS_TORCH_VERSION", c_string(torch.__version__))]
    # at::parallel_for is inline OpenMP: without -fopenmp the CPU kernels run on one thread.
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if not with_cuda:
        print(f"cnnkernels: building the CPU kernels only ({why_not})")
        return CppExtension("cnnkernels._C", sources, define_macros=defines,
                            extra_compile_args={"cxx": cxx}, extra_link_args=link), ""

    sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
    nvcc = ["-O3", "--expt-relaxed-constexpr", "--use_fast_math", "-lineinfo"]
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if not archs:
        nvcc += DEFAULT_CUDA_ARCH_FLAGS
        archs = "9.0a;9.0+PTX"
    defines += [("CNNKERNELS_WITH_CUDA", None), ("CNNKERNELS_CUDA_VERSION", c_string(torch.version.cuda)),
                ("CNNKERNELS_CUDA_ARCHS", c_string(archs))]
    # Only the .cu files include torch's CUDA headers. The C++ files do not get these folders: a
    # machine's nvidia packages can hold anything, and a header there must not shadow a C++ one.
    for d in cuda_library_headers():  # searched after torch's and CUDA_HOME's own include dirs
        nvcc += ["-isystem", d]
    include_dirs = cutlass_headers()
    if include_dirs:
        defines.append(("CNNKERNELS_WITH_CUTLASS", None))
    else:
        print("cnnkernels: CUTLASS headers not found (pip install nvidia-cutlass); "
              "building the generic CUDA conv kernel only")
    print(f"cnnkernels: building CPU and CUDA kernels (CUDA {torch.version.cuda}, archs {archs})")
    return CUDAExtension("cnnkernels._C", sources, define_macros=defines, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link), archs


def sources_digest(ext, archs):
    """A digest of csrc/ and the build's configuration. It is part of torch.compile's cache key
    (cnnkernels/_compile_cache.py), so that no graph traced through another build is reused."""
    digest = hashlib.sha256(repr((torch.__version__, archs, ext.define_macros)).encode())
    for path in sorted(glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True)):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                digest.update(os.path.relpath(path, ROOT).encode() + b"\0" + f.read())
    return digest.hexdigest()[:16]


def write_build_info(ext, archs):
    # Read before cnnkernels._C is loaded, so a .so built for another torch is never loaded.
    with open(os.path.join(ROOT, "cnnkernels", "_build_info.py"), "w") as f:
        f.write("# Written by setup.py.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\nCUDA_ARCHS = {archs!r}\n"
                f"SOURCES_DIGEST = {sources_digest(ext, archs)!r}\n")


ext, archs = extension()
write_build_info(ext, archs)
setup(
    packages=find_packages(include=["cnnkernels", "cnnkernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": BuildExtension},
)
