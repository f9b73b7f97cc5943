"""What each contender runs for one layer: a function of an input set (a tuple of tensors).

Every contender gets the same tensors: channels_last inputs, weights and residuals in the same
dtype. The peers run what a user has without this package:
  cudnn / eager   F.conv2d (bias inside), then the residual added in place and an in-place ReLU,
                  as torchvision's models run them; add_relu alone as torch.relu(x + other), the
                  baseline issue 2's target names (two passes and two outputs; torchvision's
                  blocks add and ReLU in place instead)
  cudnn_fused     torch.cudnn_convolution_relu / torch.cudnn_convolution_add_relu
  onednn          torch.ops.mkldnn._convolution_pointwise (unary "relu", or binary "add" + "relu")
  compile         torch.compile of the eager function, default mode, static shapes
  compile_max_autotune   the same in mode "max-autotune-no-cudagraphs" (the harness itself puts
                  every contender in a CUDA graph at batch 1)
Ours run cnnkernels' public functions under cnnkernels.use_backend(name).
"""
import math

import torch
import torch.nn.functional as F

from .common import MAX_AUTOTUNE, Unavailable, Unsupported


def make_inputs(case, batch, dtype, device, n_sets, seed=0):
    """`n_sets` input sets of random data (never zeros: they hide unwritten outputs)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(shape, scale=1.0, channels_last=True):
        fmt = torch.channels_last if channels_last and len(shape) == 4 else torch.contiguous_format
        t = torch.empty(shape, device=device, dtype=dtype, memory_format=fmt)
        return t.normal_(0.0, scale, generator=gen)

    sets = []
    for _ in range(n_sets):
        if case.op == "add_relu":
            sets.append((randn(case.input_shape(batch)), randn(case.input_shape(batch))))
            continue
        fan_in = case.in_channels // case.groups * case.kernel ** 2
        args = [randn(case.input_shape(batch)), randn(case.weight_shape(), 1 / math.sqrt(fan_in)),
                randn((case.out_channels,), 0.1)]
        if case.residual:
            args.append(randn(case.output_shape(batch)))
        sets.append(tuple(args))
    return sets


def eager_function(case):
    """The case as PyTorch's eager ops run it."""
    if case.op == "add_relu":
        def add_relu(x, other):
            return torch.relu(x + other)
        return add_relu
    geometry = (case.stride, case.padding, case.dilation, case.groups)
    if case.residual:
        def conv_add_relu(x, w, b, r):
            y = F.conv2d(x, w, b, *geometry)
            y.add_(r)
            return y.relu_()
        return conv_add_relu

    def conv_relu(x, w, b):
        return F.relu(F.conv2d(x, w, b, *geometry), inplace=True)
    return conv_relu


def _cudnn_fused(case, device):
    if device != "cuda":
        raise Unavailable("cuDNN's fused ops run on CUDA tensors only")
    if case.op == "add_relu":
        raise Unsupported("cuDNN has no fused add+ReLU op")
    g = ([case.stride] * 2, [case.padding] * 2, [case.dilation] * 2, case.groups)
    if case.residual:
        return lambda x, w, b, r: torch.cudnn_convolution_add_relu(x, w, r, 1.0, b, *g)
    return lambda x, w, b: torch.cudnn_convolution_relu(x, w, b, *g)


def _onednn(case, device):
    if device != "cpu":
        raise Unavailable("oneDNN's fused ops run on CPU tensors only")
    if case.op == "add_relu":
        raise Unsupported("oneDNN has no fused add+ReLU op here")
    if not torch.backends.mkldnn.is_available():
        raise Unavailable("this torch was built without oneDNN (mkldnn)")
    g = ([case.padding] * 2, [case.stride] * 2, [case.dilation] * 2, case.groups)
    pointwise = torch.ops.mkldnn._convolution_pointwise
    if case.residual:
        return lambda x, w, b, r: pointwise.binary(x, r, w, b, *g, "add", 1.0, "relu", [], "")
    return lambda x, w, b: pointwise(x, w, b, *g, "relu", [], "")


def compiled(fn, contender):
    """torch.compile of fn, fresh: dynamo's caches are reset so that earlier shapes neither make
    this compile dynamic nor use up its recompile limit."""
    torch._dynamo.reset()
    mode = "max-autotune-no-cudagraphs" if contender == MAX_AUTOTUNE else None
    return torch.compile(fn, mode=mode, dynamic=False)


def backend_problem(name, device):
    """Why our backend `name` cannot run on `device`, or None."""
    if name == "auto":
        return None
    from cnnkernels import backends
    return backends.why_unavailable(name, device)


def _ours(case, device, name):
    import cnnkernels
    problem = backend_problem(name, device)
    if problem:
        raise Unavailable(problem)
    use = cnnkernels.use_backend
    if case.op == "add_relu":
        def add_relu(x, other):
            with use(name):
                return cnnkernels.add_relu(x, other)
        return add_relu
    g = (case.stride, case.padding, case.dilation, case.groups)
    if case.residual:
        def conv_add_relu(x, w, b, r):
            with use(name):
                return cnnkernels.conv2d_add_relu(x, w, r, b, *g)
        return conv_add_relu

    def conv_relu(x, w, b):
        with use(name):
            return cnnkernels.conv2d_relu(x, w, b, *g)
    return conv_relu


def layer_function(contender, case, device):
    """The function contender runs for `case`: fn(*input_set) -> output. Raises Unavailable or
    Unsupported where it cannot."""
    if contender in ("cudnn", "eager"):
        return eager_function(case)
    if contender == "cudnn_fused":
        return _cudnn_fused(case, device)
    if contender == "onednn":
        return _onednn(case, device)
    if contender in ("compile", MAX_AUTOTUNE):
        return compiled(eager_function(case), contender)
    return _ours(case, device, contender)
