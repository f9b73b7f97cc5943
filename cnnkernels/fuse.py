"""fuse(): turn an eval-mode model into one that computes the same function with fewer kernels.

Rewrites, found by tracing the model with torch.fx:
  Conv2d → BatchNorm2d                      the BN folds into the conv's weight and bias (in float64)
  Conv2d → ReLU                             cnnkernels.nn.Conv2dReLU
  Conv2d → + residual → ReLU                Conv2dAddReLU (one conv2d_add_relu call)
BN folding runs first, so Conv2d → BN → ReLU and conv → BN → + identity → ReLU (residual block
tails) become one kernel each. Anything that cannot be proven equivalent is left as it is, with the
reason in the report. A model (or part) that torch.fx cannot trace is searched child by child.
"""
import copy
import dataclasses
import operator

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .nn import Conv2dAddReLU, Conv2dReLU

__all__ = ["fuse", "fold_conv_bn", "FuseReport", "FusedConv"]


def fold_conv_bn(weight, bias, bn):
    """(weight, bias) of the one conv equal to conv(weight, bias) followed by `bn` in eval mode.

    Computed in float64 and returned in weight's dtype, device and memory format.
    """
    f64 = torch.float64
    scale = torch.rsqrt(bn.running_var.to(f64) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(f64)
    shift = -bn.running_mean.to(f64) if bias is None else bias.to(f64) - bn.running_mean.to(f64)
    new_bias = shift * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias.to(f64)
    new_weight = weight.to(f64) * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    channels_last = weight.dim() == 4 and weight.is_contiguous(memory_format=torch.channels_last)
    memory_format = torch.channels_last if channels_last and not weight.is_contiguous() else torch.contiguous_format
    return (new_weight.to(weight.dtype).contiguous(memory_format=memory_format),
            new_bias.to(weight.dtype))


@dataclasses.dataclass
class FusedConv:
    name: str            # qualified name of the conv in the fused model (and in the original)
    bn: str | None       # the BatchNorm2d folded into it, if any
    epilogue: str        # "none", "relu" (Conv2dReLU) or "add_relu" (Conv2dAddReLU)


@dataclasses.dataclass
class FuseReport:
    fused: list[FusedConv] = dataclasses.field(default_factory=list)
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)   # (where, why)

    def __str__(self):
        lines = [f"fused {len(self.fused)} convs:"]
        for f in self.fused:
            parts = [f.name] + ([f"folded {f.bn}"] if f.bn else []) + ([f.epilogue] if f.epilogue != "none" else [])
            lines.append("  " + " + ".join(parts))
        lines.append(f"left alone ({len(self.skipped)}):")
        lines += [f"  {where}: {why}" for where, why in self.skipped]
        return "\n".join(lines)


def fuse(model: nn.Module, inplace: bool = False, report: bool = False):
    """Return an eval-mode model computing the same function as `model` with fused conv kernels.

    model must be in eval mode (folding BN uses its running statistics). Unless inplace=True the
    original is deep-copied first and never changed; with inplace=True its modules and parameters
    are reused and may be changed, so use only the returned model.

    The result is a torch.fx.GraphModule with the original's module names (reach a layer with
    fused.get_submodule("layer1.0.conv2"); containers are plain Modules, so no indexing), or, for
    a model torch.fx cannot trace, the model itself with its traceable children fused. It is for
    inference: its BatchNorms are gone. report=True returns (fused_model, FuseReport).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"fuse() expects an nn.Module, but got {type(model).__name__}")
    if any(m.training for m in model.modules()):
        raise ValueError("fuse() needs a model in eval mode (call model.eval() first): folding BatchNorm "
                         "uses its running statistics, which train mode keeps updating")
    if not inplace:
        model = copy.deepcopy(model)
    log = FuseReport()
    fused = _fuse_module(model, "", log).eval()
    return (fused, log) if report else fused


class _Tracer(fx.Tracer):
    # Keep convs (incl. already fused ones), BNs and cnnkernels' own modules as single nodes.
    def is_leaf_module(self, m, qualname):
        return (isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) or type(m).__module__.startswith("cnnkernels.nn")
                or super().is_leaf_module(m, qualname))


def _fuse_module(module, prefix, log):
    if not any(True for _ in module.children()):
        return module
    from .models import reference_mode  # the zoo traces module by module only in reference mode

    try:
        with reference_mode():
            graph = _Tracer().trace(module)
    except Exception as e:  # torch.fx raises many kinds; any of them means "search the children"
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        log.skipped.append((prefix.rstrip(".") or "<model>",
                            f"torch.fx cannot trace it ({type(e).__name__}: {message}); fusing its children"))
        for name, child in list(module.named_children()):
            new = _fuse_module(child, f"{prefix}{name}.", log)
            if new is not child:
                setattr(module, name, new)
        return module
    gm = fx.GraphModule(module, graph, class_name=f"Fused{type(module).__name__}")
    return gm if _Rewriter(gm, prefix, log).run() else module


_ADDS = {operator.add, operator.iadd, torch.add, "add", "add_"}
_INPLACE_ADDS = {operator.iadd, "add_"}
_RELUS = {torch.relu, torch.relu_, F.relu, "relu", "relu_"}


def _describe(node):
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', node.target)}()"
    if node.op == "call_method":
        return f".{node.target}()"
    return "the model's input" if node.op == "placeholder" else f"{node.op} {node.target}"


class _Rewriter:
    """One traced module's rewrite: BN folding first, then the ReLU epilogues."""

    def __init__(self, gm, prefix, log):
        self.gm, self.graph, self.prefix, self.log = gm, gm.graph, prefix, log
        self.modules = dict(gm.named_modules())
        self.calls = {}
        for node in self.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
        self.folded, self.epilogue = {}, {}

    def run(self):
        for node in list(self.graph.nodes):
            if node.op == "call_module" and isinstance(self.modules[node.target], nn.BatchNorm2d):
                self._fold(node)
        for node in list(self.graph.nodes):
            if self._is_relu(node):
                self._fuse_relu(node)
        self._note_other_activations()
        for name in self.folded.keys() | self.epilogue.keys():
            self.log.fused.append(FusedConv(self.prefix + name, self.prefix + self.folded[name] if name in self.folded
                                            else None, self.epilogue.get(name, "none")))
        if not (self.folded or self.epilogue):
            return False
        self.gm.delete_all_unused_submodules()
        self.graph.lint()
        self.gm.recompile()
        return True

    def _skip(self, node, why):
        self.log.skipped.append((self.prefix + str(node.target), why))

    def _calls_conv(self, node):
        return node.op == "call_module" and isinstance(self.modules[node.target], nn.Conv2d)

    def _conv(self, node):
        """(conv, None) if `node` calls a plain nn.Conv2d that may be rewritten, else (None, reason)."""
        conv = self.modules[node.target]
        if type(conv) is not nn.Conv2d:
            return None, f"{node.target} is a {type(conv).__name__}, not a plain nn.Conv2d"
        if self.calls[node.target] > 1:
            return None, f"conv {node.target} is called {self.calls[node.target]} times (shared module)"
        if len(node.users) > 1:
            return None, f"conv {node.target}'s output has {len(node.users)} users"
        if conv._forward_hooks or conv._forward_pre_hooks or torch.nn.utils.parametrize.is_parametrized(conv):
            return None, f"conv {node.target} has hooks or parametrizations"
        if len(node.args) != 1 or node.kwargs:
            return None, f"conv {node.target} is called with extra arguments"
        return conv, None

    def _replace_conv(self, target, cls, weight, bias):
        old = self.modules[target]
        new = cls(old.in_channels, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                  dilation=old.dilation, groups=old.groups, bias=bias is not None, padding_mode=old.padding_mode,
                  device="meta")
        new.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, old.weight.requires_grad)
        if bias is not None:
            new.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias, old.weight.requires_grad)
        parent, _, leaf = target.rpartition(".")
        setattr(self.gm.get_submodule(parent), leaf, new)
        self.modules[target] = new

    def _fold(self, node):
        bn = self.modules[node.target]
        if type(bn) is not nn.BatchNorm2d:
            return self._skip(node, f"{type(bn).__name__} is not a plain nn.BatchNorm2d")
        if bn.running_mean is None or bn.running_var is None:
            return self._skip(node, "no running statistics: it normalizes with batch statistics even in eval mode")
        if len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
            return self._skip(node, "called with extra arguments")
        source = node.args[0]
        if not self._calls_conv(source):
            return self._skip(node, f"not folded: its input is {_describe(source)}, not a Conv2d (only a BN "
                                    "right after a conv folds; one before a conv, as in DenseNet, stays)")
        conv, why = self._conv(source)
        if conv is None:
            return self._skip(node, f"not folded: {why}")
        if bn.num_features != conv.out_channels:
            return self._skip(node, f"not folded: {bn.num_features} features but the conv has {conv.out_channels}")
        with torch.no_grad():
            self._replace_conv(source.target, nn.Conv2d, *fold_conv_bn(conv.weight, conv.bias, bn))
        node.replace_all_uses_with(source)
        self.graph.erase_node(node)
        self.folded[source.target] = node.target

    def _is_relu(self, node):
        if node.op == "call_module":
            return type(self.modules[node.target]) is nn.ReLU and len(node.args) == 1 and not node.kwargs
        if node.op in ("call_function", "call_method") and node.target in _RELUS:
            extra = list(node.args[1:]) + [v for k, v in node.kwargs.items()]
            return node.kwargs.keys() <= {"inplace"} and all(isinstance(v, bool) for v in extra)
        return False

    def _fuse_relu(self, relu):
        source = relu.args[0]
        if not isinstance(source, fx.Node):
            return
        if self._calls_conv(source):
            conv, why = self._conv(source)
            if conv is None:
                return self._skip(relu, f"ReLU not fused: {why}")
            self._replace_conv(source.target, Conv2dReLU, conv.weight, conv.bias)
            relu.replace_all_uses_with(source)
            self.graph.erase_node(relu)
            self.epilogue[source.target] = "relu"
        elif self._is_add(source) and len(source.users) == 1:
            self._fuse_add_relu(source, relu)

    def _is_add(self, node):
        return (node.op in ("call_function", "call_method") and node.target in _ADDS and len(node.args) == 2
                and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args))

    def _fuse_add_relu(self, add, relu):
        reasons = []
        for conv_node, residual in (add.args, add.args[::-1]):
            if not self._calls_conv(conv_node):
                continue
            conv, why = self._conv(conv_node)
            if conv is not None and conv_node is residual:
                conv, why = None, "the conv output is added to itself"
            if conv is not None and add.target in _INPLACE_ADDS and add.args[0] is residual:
                conv, why = None, "the add writes into the residual tensor in place"
            if conv is not None and self._input_mutated_between(conv_node, relu):
                conv, why = None, "the conv's input is modified in place before the add"
            if conv is None:
                reasons.append(why)
                continue
            with self.graph.inserting_before(relu):
                fused = self.graph.call_module(conv_node.target, (conv_node.args[0], residual))
            self._replace_conv(conv_node.target, Conv2dAddReLU, conv.weight, conv.bias)
            relu.replace_all_uses_with(fused)
            for node in (relu, add, conv_node):
                self.graph.erase_node(node)
            self.epilogue[conv_node.target] = "add_relu"
            return
        if reasons:
            self._skip(relu, "add + ReLU not fused: " + "; ".join(reasons))

    def _input_mutated_between(self, conv_node, end):
        """Whether a node after conv_node and before end may write into the conv's input in place."""
        x = conv_node.args[0]
        node = conv_node.next
        while node is not end:
            if x in node.args and self._is_inplace(node):
                return True
            node = node.next
        return False

    def _is_inplace(self, node):
        if node.op == "call_module":
            return bool(getattr(self.modules[node.target], "inplace", False))
        if node.op == "call_method":
            return node.target.endswith("_")
        if node.op == "call_function":
            name = getattr(node.target, "__name__", "")
            return (node.kwargs.get("inplace", False) or name.endswith("_")
                    or (node.target in vars(operator).values() and name.startswith("i")))
        return False

    def _note_other_activations(self):
        for node in self.graph.nodes:
            if (node.op == "call_module" and type(self.modules[node.target]) is nn.Conv2d
                    and len(node.users) == 1):
                (user,) = node.users
                activation = self.modules.get(user.target) if user.op == "call_module" else None
                if type(activation).__module__ == nn.ReLU.__module__ and type(activation) is not nn.ReLU:
                    self._skip(user, f"{type(activation).__name__} after conv {node.target} "
                                     "not fused: only ReLU is")
