"""What the public functions remember per call signature: the normalized arguments and the backend
chosen, so that a repeated call skips the argument checks (_args.py) and the backend choice
(backends.select). On small layers those cost more than the op itself: about 40 us a conv call on
the CPU dev box, against 45 us for the C++ op (benchmarks/results/2026-12-06_CPU-AMD-EPYC-2-threads_front-end.txt).

A signature holds everything the checks and the choice read: each tensor's type, shape, dtype,
device and layout, the geometry arguments exactly (an int or a tuple of two ints; 1.0 and True
are equal to 1 in a dict but must be refused, so any other kind of argument takes the full path
every time), and the backend chosen. Only calls that passed the checks leave a plan, so every
error still comes from the full path. Under autocast the signature is the cast call's. Not
planned: calls under torch.compile (dynamo would trace the lookup) or a __torch_function__ mode
(it must see what runs), unbatched input and even-sized kernels with padding='same' (both
reshape the call).

Whatever else backend choice reads changes only by auto_choice.reload(), which calls clear().
"""
from ._args import plain_eager, remember

_plans: dict = {}  # at most _args.MAX_CACHED signatures; many (dynamic shapes) start it over


def clear():
    """Forget every plan (after something the backend choice reads has changed)."""
    _plans.clear()


def _exact(value):
    """value as a key that equals only the same valid geometry; KeyError where none is kept."""
    kind = type(value)
    if kind is int or kind is str:
        return value
    if kind is tuple and len(value) == 2 and type(value[0]) is int and type(value[1]) is int:
        return value
    raise KeyError(value)


def _tensor_key(t):
    return None if t is None else (type(t), t.shape, t.dtype, t.device, t.layout)


def conv_key(op, backend_name, input, weight, bias, residual, stride, padding, dilation, groups):
    """The signature of a conv call, or None where it cannot have a plan."""
    if not plain_eager():  # nothing compiling, no __torch_function__ mode
        return None
    try:
        return (op, backend_name, type(input), input.shape, input.dtype, input.device, input.layout,
                type(weight), weight.shape, weight.dtype, weight.device, weight.layout,
                _tensor_key(bias), _tensor_key(residual),
                _exact(stride), _exact(padding), _exact(dilation), _exact(groups))
    except (AttributeError, KeyError):  # not a tensor, or geometry given another way
        return None


def add_relu_key(backend_name, input, other):
    """The signature of an add_relu call, or None where it cannot have a plan."""
    if not plain_eager():  # nothing compiling, no __torch_function__ mode
        return None
    try:
        return ("add_relu", backend_name, type(input), input.shape, input.dtype, input.device, input.layout,
                type(other), other.shape, other.dtype, other.device, other.layout)
    except AttributeError:
        return None


def get(key):
    return None if key is None else _plans.get(key)


def keep(key, plan):
    if key is not None:
        remember(_plans, key, plan)
