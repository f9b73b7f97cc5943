"""Compiles every Triton kernel, in every config its launch code would try, for Hopper (sm_90)
without a GPU: Triton's compiler and ptxas run on the CPU. Catches what the interpreter cannot
(tl.dot shape and dtype rules, layouts, register limits, compiler crashes) before a GPU run.
Each host tensor descriptor a launch passes is also checked, with the box and swizzle the compiled
kernel asks for, against what the driver's cuTensorMapEncodeTiled accepts (its documented limits):
an invalid one fails only when a GPU encodes it.

    python tests/triton_hopper_compile.py [--quick | --box-layers | --bench-layers]
    (TRITON_INTERPRET must be unset)

--quick (what CI runs, about a minute): bf16 and fp32 only, every layer kind once, with a
residual. The full run (about 5 minutes on 2 cores) adds fp16, fp64 and both residual choices.
--box-layers: the output-box configs only, at stride-1 layers of the benchmark (batch 64, bf16,
with a residual), to show the boxes they pick and their registers (1x1 layers: persistent only).
--bench-layers: every config the tuner would try at every conv layer the benchmark times (bf16,
batch 1 and 64, its epilogue), so that the descriptors are checked at real sizes (about 2 minutes).

The ops run on CPU tensors with their launches replaced by compilation, so the same code that
picks configs and arguments on a GPU picks them here. Prints one line per compiled kernel variant
and exits non-zero if any failed.
"""
import inspect
import itertools
import os
import re
import subprocess
import sys
import tempfile
import traceback

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("unset TRITON_INTERPRET: this compiles the kernels for a GPU")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from cnnkernels.triton_ops import _autotune, _runtime, add_relu, batch_norm, conv, relu_backward  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
compiled, failures, spilling, descriptors_checked = {}, [], [], []


def registers_and_local_bytes(cubin):
    """From cuobjdump's resource usage: registers per thread and local memory (spills) per thread."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    reg, local = re.search(r"REG:(\d+)", usage), re.search(r"LOCAL:(\d+)", usage)
    return (int(reg.group(1)) if reg else None), (int(local.group(1)) if local else None)


def tma_descriptor_problems(desc, meta):
    """What cuTensorMapEncodeTiled would refuse in the descriptor Triton's launcher encodes from
    `desc` (shape and strides in elements, innermost last) and the compiled kernel's `meta` (the
    box it loads, its swizzle, the element size), as the CUDA driver API documents its limits."""
    elem, box, swizzle = meta["elem_size"], list(meta["block_size"]), meta["swizzle"]
    shape, strides = list(desc.shape), list(desc.strides)
    problems = []
    if not 1 <= len(shape) <= 5 or len(box) != len(shape):
        problems.append(f"rank {len(shape)} with a box of rank {len(box)}")
    if desc.base.data_ptr() % 16:
        problems.append("a base address that is not 16-byte aligned")
    if strides[-1] != 1:
        problems.append("an innermost stride other than 1")
    problems += [f"dimension {d} outside 1..2^32" for d in shape if not 1 <= d <= 2**32]
    problems += [f"stride {s * elem} B, not a multiple of 16 below 2^40" for s in strides[:-1]
                 if (s * elem) % 16 or not 0 < s * elem < 2**40]
    problems += [f"box dimension {b} outside 1..256" for b in box if not 1 <= b <= 256]
    inner = box[-1] * elem
    if inner % 16:
        problems.append(f"an inner box of {inner} B, not a multiple of 16")
    span = {1: 32, 2: 64, 3: 128}.get(swizzle)  # CU_TENSOR_MAP_SWIZZLE_32B/64B/128B
    if span is not None and inner > span:
        problems.append(f"an inner box of {inner} B, wider than its {span} B swizzle")
    return problems


def specialization(kernel, args, kwargs):
    """(signature, constexprs, attrs, bound arguments) as a launch builds them: Triton's own
    specializer makes ints equal to 1 constants and marks 16-divisible ints and 16-byte-aligned
    pointers, which decides vectorized loads and software pipelining."""
    bound = inspect.signature(kernel.fn).bind(*args, **kwargs)
    bound.apply_defaults()
    bound = bound.arguments
    sig, constexprs, attrs = {}, {}, {}
    for index, p in enumerate(kernel.params):
        value = bound[p.name]
        if p.is_constexpr:
            sig[p.name], constexprs[p.name] = "constexpr", value
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        sig[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = spec
        elif isinstance(spec, str) and spec:
            attrs[(index,)] = BaseBackend.parse_attr(spec)
    return sig, constexprs, attrs, bound


def compile_for_hopper(kernel, args, kwargs):
    kwargs = dict(kwargs)
    options = {"num_warps": kwargs.pop("num_warps", 4), "num_stages": kwargs.pop("num_stages", 3)}
    sig, constexprs, attrs, bound = specialization(kernel, args, kwargs)
    key = (kernel.__name__, tuple(sorted(sig.items())), tuple(sorted(constexprs.items())), tuple(sorted(attrs)),
           tuple(options.items()))
    label = f"{kernel.__name__} {options} " + " ".join(f"{k}={v}" for k, v in constexprs.items())
    if key not in compiled:
        compiled[key] = compile_variant(kernel, sig, constexprs, attrs, options, label)
    # Every call's descriptors, as a launch encodes them (the key does not hold their shapes).
    descriptors = [v for v in bound.values() if isinstance(v, TensorDescriptor)]
    for desc, meta in zip(descriptors, compiled[key] or []):
        problems = tma_descriptor_problems(desc, meta)
        descriptors_checked.append(label)
        if problems:
            failures.append(label)
            print(f"FAIL {label}: TMA descriptor of shape {list(desc.shape)}, strides {list(desc.strides)}, "
                  f"box {meta['block_size']}: " + "; ".join(problems), flush=True)


def compile_variant(kernel, sig, constexprs, attrs, options, label):
    """Compiles one variant and prints its resources; returns its descriptors' metadata (None if it failed)."""
    try:
        binary = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=HOPPER, options=options)
        ptx = binary.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no mma"
        if re.search(r"wgmma\.mma_async[^\n]*\}, \{%r", ptx):
            mma += " (A from registers)"
        if "cp.async.bulk.tensor" in ptx:
            mma += ", TMA loads"
        regs, local = registers_and_local_bytes(binary.asm["cubin"])
        if local:
            spilling.append(label)
        print(f"ok   {label}: {regs} registers, {local} B local (spills), {binary.metadata.shared} B shared, {mma}",
              flush=True)
        return getattr(binary.metadata, "tensordesc_meta", None) or []
    except Exception:  # noqa: BLE001 - report every failing variant, not only the first
        failures.append(label)
        print(f"FAIL {label}\n{traceback.format_exc(limit=3)}", flush=True)
        return None


def summary():
    print(f"{len(compiled)} kernel variants compiled for sm_90, {len(failures)} failed, {len(spilling)} spill; "
          f"{len(descriptors_checked)} TMA descriptors checked")
    return 1 if failures else 0


class CompilingLauncher:
    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        return lambda *args, **kwargs: compile_for_hopper(self.kernel, args, kwargs)


def every_candidate(self, device, key, candidates, bench, can_run, compile_only=None):
    for config in candidates:
        bench(config)
    return candidates[0]


_runtime.launcher = CompilingLauncher
_autotune.is_hopper = lambda device: True
_autotune.bench_ms = lambda fn: (fn(), 1.0)[1]
_autotune.Tuner.pick = every_candidate


def t(*shape, dtype, channels_last=False):
    x = torch.randn(*shape, dtype=dtype)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def main(quick):
    dtypes = [torch.bfloat16, torch.float32] if quick else [torch.bfloat16, torch.float16, torch.float32, torch.float64]
    # (input, weight shape, stride, padding, dilation, groups): FLAT_K (few channels), channel
    # blocks (EVEN_C or not), padding, depthwise, grouped; big enough that no tile is clamped.
    convs = [((8, 3, 64, 64), (64, 3, 7, 7), 2, 3, 1, 1), ((8, 64, 32, 32), (128, 64, 3, 3), 1, 1, 1, 1),
             ((8, 256, 16, 16), (256, 256, 1, 1), 1, 0, 1, 1), ((8, 40, 16, 16), (64, 40, 3, 3), 1, 1, 2, 1),
             ((8, 64, 32, 32), (64, 1, 3, 3), 1, 1, 1, 64), ((8, 64, 16, 16), (128, 32, 3, 3), 1, 1, 1, 2)]
    for dtype, (xs, ws, stride, pad, dil, groups), residual in itertools.product(dtypes, convs,
                                                                                (True,) if quick else (False, True)):
        x, w, b = t(*xs, dtype=dtype, channels_last=True), t(*ws, dtype=dtype, channels_last=True), t(ws[0], dtype=dtype)
        oh = (xs[2] + 2 * pad - dil * (ws[2] - 1) - 1) // stride + 1
        r = t(xs[0], ws[0], oh, oh, dtype=dtype, channels_last=True) if residual else None
        for allow_tf32 in ((False, True) if dtype == torch.float32 else (False,)):
            _runtime.cudnn_conv_allows_tf32 = lambda: allow_tf32
            conv._conv2d_fused(x, w, r, b, (stride, stride), (pad, pad), (dil, dil), groups)
    for dtype, channels_last in itertools.product(dtypes, (False, True)):
        a = t(4, 64, 14, 14, dtype=dtype, channels_last=channels_last)
        add_relu.add_relu_triton(a, a)
        relu_backward.relu_backward_bias_grad_triton(a, a)
        w, stats = torch.ones(64, dtype=dtype), torch.ones(64, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        running = torch.ones(64, dtype=dtype)
        for residual in (None, a):
            batch_norm.batch_norm_relu_train_triton(a, w, w, residual, 1e-5, None, None, 0.0)
            batch_norm.batch_norm_relu_train_triton(a, w, w, residual, 1e-5, running, running.clone(), 0.1)
            batch_norm.batch_norm_relu_backward_triton(a, a, a, stats, stats, w, 1e-5, residual is not None)
    return summary()


def empty_bf16(shape):
    """A 4-D bf16 channels_last tensor, uninitialized: the launches only compile, and benchmark sizes are large."""
    return torch.empty(shape, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)


def box_layers():
    conv._HOPPER_16BIT = [c for c in conv._HOPPER_16BIT if c.boxes]
    for c, k, hw, ks in ((64, 64, 224, 3), (64, 64, 56, 3), (128, 128, 28, 3), (256, 256, 14, 3), (512, 512, 7, 3),
                         (256, 64, 56, 1), (64, 256, 56, 1), (1024, 256, 14, 1), (512, 2048, 7, 1)):
        print(f"== {c}>{k} {ks}x{ks} @{hw}", flush=True)
        x, w, res = empty_bf16((64, c, hw, hw)), empty_bf16((k, c, ks, ks)), empty_bf16((64, k, hw, hw))
        pad = (ks // 2, ks // 2)
        conv._conv2d_fused(x, w, res, torch.empty(k, dtype=torch.bfloat16), (1, 1), pad, (1, 1), 1)
    return summary()


def bench_layers():
    from cnnkernels.bench import shapes

    for model in shapes.MODEL_INPUTS:
        for layer, batch in itertools.product(shapes.model_conv_layers(model), (1, 64)):
            res = empty_bf16(layer.output_shape(batch)) if layer.residual else None
            conv._conv2d_fused(empty_bf16(layer.input_shape(batch)), empty_bf16(layer.weight_shape()), res,
                               torch.empty(layer.out_channels, dtype=torch.bfloat16), (layer.stride,) * 2,
                               (layer.padding,) * 2, (layer.dilation,) * 2, layer.groups)
    return summary()


if __name__ == "__main__":
    modes = {"--box-layers": box_layers, "--bench-layers": bench_layers}
    chosen = [modes[a] for a in sys.argv[1:] if a in modes]
    sys.exit(chosen[0]() if chosen else main(quick="--quick" in sys.argv[1:]))
