"""Per-layer shapes, parameters and multiply-accumulates of any model, and its conv geometries.

Both run the model once on the meta device (no weights are copied, nothing is computed), with
cnnkernels.models in reference_mode() so every layer is a module call that a forward hook sees.
MACs count convolutions and linear layers, as torchvision's tables ("GFLOPS") do.
"""
import copy
import dataclasses
import itertools
import math

import torch
import torch.nn as nn

from ._layers import reference_mode

__all__ = ["summary", "conv_layers", "ModelSummary", "LayerRow"]


@dataclasses.dataclass
class LayerRow:
    name: str               # qualified module name ("layer1.0.conv2")
    type: str               # module class name
    input_shape: tuple
    output_shape: tuple
    params: int             # the module's own parameters (0 on repeated calls of a shared module)
    macs: int               # for the whole input batch


@dataclasses.dataclass
class ModelSummary:
    input_size: tuple
    rows: list
    total_params: int       # unique parameters of the model
    trainable_params: int
    total_macs: int

    def __str__(self):
        header = ("Layer", "Type", "Output shape", "Params", "MACs")
        table = [header] + [(r.name, r.type, "×".join(map(str, r.output_shape)), f"{r.params:,}", f"{r.macs:,}")
                            for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        rule = "-" * (sum(widths) + 2 * (len(widths) - 1))

        def line(row):
            return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

        return "\n".join([line(header), rule, *map(line, table[1:]), rule,
                          f"Input size: {'×'.join(map(str, self.input_size))}",
                          f"Total params: {self.total_params:,} (trainable {self.trainable_params:,})",
                          f"Total MACs: {self.total_macs:,} ({self.total_macs / 1e9:.2f} G)"])


def _meta_copy(model):
    """A deep copy of model whose parameters and buffers are empty meta tensors (copies no data)."""
    memo = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def _input_shape(input_size):
    shape = tuple(int(s) for s in input_size)
    return (1, *shape) if len(shape) == 3 else shape


def _macs(module, inputs, output):
    if isinstance(module, nn.modules.conv._ConvNd) and not module.transposed:
        return output.numel() * (module.in_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Linear):
        return output.numel() * module.in_features
    return 0


def _shape(x):
    if isinstance(x, torch.Tensor):
        return tuple(x.shape)
    if isinstance(x, (tuple, list)) and x:
        return _shape(x[0])
    return ()


def _trace_layers(model, input_size, dtype):
    """Run a meta copy of model once; return [(qualified name, module, input, output)] per leaf call."""
    meta = _meta_copy(model)
    meta.eval()  # shapes are the same in both modes; eval keeps BN and dropout from touching anything
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    if dtype is None:
        dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    calls = []
    handles = []
    for name, module in meta.named_modules():
        if not any(True for _ in module.children()):
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: calls.append((name, m, i, o))))
    try:
        with reference_mode(), torch.no_grad():
            meta(torch.empty(_input_shape(input_size), device="meta", dtype=dtype))
    finally:
        for h in handles:
            h.remove()
    return meta, calls


def summary(model: nn.Module, input_size, *, dtype: torch.dtype | None = None) -> ModelSummary:
    """Per leaf-layer output shape, parameters and MACs of `model` on an input of input_size, plus totals.

    input_size: (C, H, W) for one image, or (N, C, H, W); MACs are for that whole input. dtype:
    the input's, by default the model's. print() the result for a table. The model itself is not
    run, changed or copied with its weights.
    """
    _, calls = _trace_layers(model, input_size, dtype)
    rows, seen = [], set()
    for name, module, inputs, output in calls:
        params = 0 if id(module) in seen else sum(p.numel() for p in module.parameters(recurse=False))
        seen.add(id(module))
        rows.append(LayerRow(name, type(module).__name__, _shape(inputs), _shape(output), params,
                             _macs(module, inputs, output)))
    unique = {id(p): p for p in model.parameters()}.values()
    return ModelSummary(_input_shape(input_size), rows, sum(p.numel() for p in unique),
                        sum(p.numel() for p in unique if p.requires_grad), sum(r.macs for r in rows))


def conv_layers(model: nn.Module, input_size, *, dtype: torch.dtype | None = None) -> list[dict]:
    """The distinct Conv2d geometries of `model` at input_size, with how often each occurs.

    Each dict: C, K (input/output channels), H, W (input size), P, Q (output size), R, S (kernel),
    stride, padding, dilation (pairs), groups, relu (a ReLU follows and fuse() fuses it), has_residual
    (fuse() turns it into conv2d_add_relu; relu is then True too), count (calls at this geometry),
    macs (per image, per call) and names (the conv modules). The batch size of input_size does not
    matter. The epilogues are what fuse() finds in an eval-mode copy of the model.
    """
    import cnnkernels.nn
    from ..fuse import fuse
    from ..nn import Conv2dAddReLU

    _, calls = _trace_layers(model, input_size, dtype)
    _, report = fuse(_meta_copy(model).eval(), inplace=True, report=True)
    epilogue = {f.name: f.epilogue for f in report.fused}
    layers = {}
    for name, conv, inputs, output in calls:
        if not isinstance(conv, nn.Conv2d):
            continue
        c, h, w = inputs[0].shape[-3:]
        k, p, q = output.shape[-3:]
        kind = ("add_relu" if isinstance(conv, Conv2dAddReLU) else "relu" if isinstance(conv, cnnkernels.nn.Conv2dReLU)
                else epilogue.get(name, "none"))
        geometry = dict(C=c, K=k, H=h, W=w, P=p, Q=q, R=conv.kernel_size[0], S=conv.kernel_size[1],
                        stride=tuple(conv.stride), padding=conv.padding if isinstance(conv.padding, str)
                        else tuple(conv.padding), dilation=tuple(conv.dilation), groups=conv.groups,
                        relu=kind != "none", has_residual=kind == "add_relu")
        entry = layers.setdefault(tuple(geometry.items()), {**geometry, "count": 0, "names": []})
        entry["count"] += 1
        entry["names"].append(name)
    for entry in layers.values():
        entry["macs"] = entry["K"] * entry["P"] * entry["Q"] * (entry["C"] // entry["groups"]) * entry["R"] * entry["S"]
    return list(layers.values())
