"""What backend "auto" runs per layer class, derived from benchmark results.

A layer class is the op family ("conv" or "add_relu"), the dtype and, for convs, the geometry's
kind: "depthwise", "grouped", "stem" (fewer than 16 input channels), "1x1" or "kxk".
cnnkernels/auto_choice.json holds, per device type and class, our backends that the named
results file measured faster than PyTorch (geometric mean over that class's layers), fastest
first. Classes it does not list use backends.AUTO_ORDER. Results whose GPU tests failed give
nothing: a backend must be both verified and faster.
`python -m cnnkernels.bench.auto_choice RESULTS.json --write` writes it (bench/auto_choice.py).
"""
import json
from pathlib import Path

from . import _call_plans

TABLE_PATH = Path(__file__).with_name("auto_choice.json")


def conv_kind(in_channels, kernel_hw, groups):
    if groups > 1 and in_channels == groups:
        return "depthwise"
    if groups > 1:
        return "grouped"
    if in_channels < 16:
        return "stem"
    return "1x1" if tuple(kernel_hw) == (1, 1) else "kxk"


def class_key(op_family, dtype_name, kind=None):
    return f"{op_family}:{dtype_name}" + (f":{kind}" if kind else "")


def dtype_name(dtype):
    return str(dtype).removeprefix("torch.")


def _read():
    try:
        return json.loads(TABLE_PATH.read_text()).get("devices", {})
    except FileNotFoundError:
        return {}


# Read at import, not on first use: torch.compile traces backend choice, and a first call made
# under it cannot read a file (fullgraph=True failed on it). A plain global, not
# functools.lru_cache, which torch.compile warns about at every call it meets.
_loaded = _read()


def _table():
    return _loaded


def reload():
    """Reads auto_choice.json again (after it was rewritten)."""
    global _loaded
    _loaded = _read()
    _call_plans.clear()


def order(device_type, key):
    """Our backends for this class on this device type, fastest first, or None if not measured."""
    entry = _table().get(device_type, {}).get(key)
    return None if entry is None else tuple(entry)


def classes(device_type):
    """{class: our backends, fastest first} measured for this device type."""
    return dict(_table().get(device_type, {}))


def conv_class(call):
    kernel_hw = (call.weight.shape[2], call.weight.shape[3])
    return class_key("conv", dtype_name(call.input.dtype), conv_kind(call.input.shape[1], kernel_hw, call.groups))


def add_relu_class(input):
    return class_key("add_relu", dtype_name(input.dtype))
