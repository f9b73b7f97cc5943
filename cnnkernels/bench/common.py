"""Names shared by the benchmark's modules."""
import torch

from ..auto_choice import dtype_name  # noqa: F401  (records name dtypes as auto_choice.json's classes do)

DTYPES = {
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "fp32": torch.float32, "float32": torch.float32, "float": torch.float32,
}

# Contenders per device. Peers are what a user has without this package; ours run through
# cnnkernels.use_backend(name).
GPU_PEERS = ("cudnn", "cudnn_fused", "compile")
GPU_OURS = ("triton", "cuda")
CPU_PEERS = ("eager", "onednn", "compile")
CPU_OURS = ("cuda", "auto")  # "cuda" is the C++ extension, whose CPU kernels run on CPU tensors
MAX_AUTOTUNE = "compile_max_autotune"

# The CPU peers play the GPU peers' roles in the summary, whose keys are named after the GPU ones.
SUMMARY_ROLE = {"cudnn": "cudnn", "eager": "cudnn", "cudnn_fused": "cudnn_fused", "onednn": "cudnn_fused",
                "compile": "compile"}


class Unavailable(Exception):
    """The contender cannot run here at all (not built, no such model, ...)."""


class Unsupported(Exception):
    """The contender runs here but not this case (cuDNN has no fused engine for it, ...)."""


def ours(device):
    return GPU_OURS if device == "cuda" else CPU_OURS


def peers(device):
    return GPU_PEERS if device == "cuda" else CPU_PEERS
