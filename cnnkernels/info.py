"""`python -m cnnkernels.info`: what was built, and what is usable on this machine and why not."""
import importlib.util
import os

import torch

from . import __version__, _extension, auto_choice, backends


def report():
    lines = [f"cnnkernels {__version__}",
             f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})"]
    triton_spec = importlib.util.find_spec("triton")
    if triton_spec is None:
        lines.append("triton: not installed")
    else:
        import triton
        mode = "interpreter (TRITON_INTERPRET=1)" if os.environ.get("TRITON_INTERPRET") == "1" else "compiled"
        lines.append(f"triton {triton.__version__}, {mode}")

    ext = _extension.module()
    if ext is None:
        lines.append(f"extension cnnkernels._C: not usable: {_extension.problem()}")
    else:
        lines.append(f"extension cnnkernels._C: built for torch {ext.torch_version}, "
                     f"CUDA {ext.cuda_version or 'none (CPU-only build)'}, archs {ext.cuda_archs or '-'}")
        lines.append(f"  kernels: {', '.join(ext.kernels)}")

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        lines.append(f"GPU: {props.name}, sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                     f"{props.total_memory / 2**30:.0f} GiB")
        arch = f"{props.major}.{props.minor}"
        if ext is not None and ext.cuda_archs and arch not in ext.cuda_archs and "PTX" not in ext.cuda_archs:
            lines.append(f"  warning: the extension was built for {ext.cuda_archs}, not this GPU's {arch}: "
                         f"rebuild with TORCH_CUDA_ARCH_LIST={arch}")
    else:
        lines.append("GPU: none (torch.cuda.is_available() is False)")

    lines.append(f"backend chosen now: {backends.get_backend()}")
    for device in ("cpu", "cuda"):
        if device == "cuda" and not torch.cuda.is_available():
            continue
        parts = []
        for name in backends.BACKENDS:
            why = backends.why_unavailable(name, device)
            parts.append(f"{name}: {'usable' if why is None else 'not usable: ' + why}")
        lines.append(f"on {device}: " + "; ".join(parts))
        order = [name for name in backends.AUTO_ORDER.get(device, ()) if name != "torch"] + ["torch"]
        for klass, ours in auto_choice.classes(device).items():
            lines.append(f"  auto for {klass} (measured, auto_choice.json): {', '.join([*ours, 'torch'])}")
        lines.append(f"  auto for other classes: {', '.join(order)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
