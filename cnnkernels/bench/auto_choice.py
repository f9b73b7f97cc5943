"""Derives cnnkernels/auto_choice.json, what "auto" runs per layer class, from results files.

    python -m cnnkernels.bench.auto_choice RESULTS.json...           prints the table it would write
    python -m cnnkernels.bench.auto_choice RESULTS.json... --write   merges it into auto_choice.json

Several files of one device type (e.g. one run per dtype) give one table: each class must come
from one file only.

For each layer class (cnnkernels/auto_choice.py) the table lists our backends whose geometric
mean speedup over PyTorch on that class's layers is above 1 - TIE[device], fastest first; "auto"
tries them, then PyTorch. On a GPU (CUDA-event timings) that is strictly faster; on a CPU, whose
timings move by +-10% between runs, within 5% counts as a tie and keeps ours, which also caches
oneDNN's weight reorders that the benchmark (channels_last weights) does not exercise. Only the results' device type is replaced, the others are kept. GPU results whose
tests did not all pass give an empty table: a backend must be verified as well as faster.
"""
import json
import math
import sys
from pathlib import Path

from .. import auto_choice
from .shapes import LAYER_SETS

# Per device type, the contender that times PyTorch itself (what the "torch" backend runs).
PYTORCH_CONTENDER = {"cuda": "cudnn", "cpu": "eager"}
OUR_BACKENDS = ("cuda", "triton")
TIE = {"cuda": 0.0, "cpu": 0.05}


def _record_class(record, layers_by_label):
    if record.get("op") == "add_relu":
        return auto_choice.class_key("add_relu", record["dtype"])
    layer = layers_by_label.get(record["name"])
    if layer is None:
        return None
    kind = auto_choice.conv_kind(layer.in_channels, (layer.kernel, layer.kernel), layer.groups)
    return auto_choice.class_key("conv", record["dtype"], kind)


def derive(results):
    """(device type, {class: [backends faster than PyTorch, fastest first]}, why-empty note)."""
    layers_by_label = {layer.label: layer for layers in LAYER_SETS.values() for layer in layers}
    device_type = results["meta"]["config"]["device"]
    tests = results["summary"].get("gpu_tests", {})
    if device_type == "cuda" and (tests.get("failed", 1) or not tests.get("passed")):
        return device_type, {}, f"GPU tests did not all pass ({tests}): no backend is verified"
    reference = PYTORCH_CONTENDER[device_type]
    times = {}  # (class, layer name, batch) -> {contender: ms}
    for r in results["records"]:
        if r.get("section") != "layer" or r.get("status") != "ok":
            continue
        klass = _record_class(r, layers_by_label)
        if klass is not None:
            times.setdefault((klass, r["name"], r["batch"]), {})[r["contender"]] = r["ms_p50"]
    ratios = {}  # class -> backend -> [PyTorch ms / ours ms]
    for (klass, _, _), by in times.items():
        if reference not in by:
            continue
        for backend in OUR_BACKENDS:
            if backend in by:
                ratios.setdefault(klass, {}).setdefault(backend, []).append(by[reference] / by[backend])
    table = {}
    for klass, per_backend in sorted(ratios.items()):
        geomeans = {b: math.exp(sum(map(math.log, rs)) / len(rs)) for b, rs in per_backend.items()}
        table[klass] = [b for b, g in sorted(geomeans.items(), key=lambda kv: -kv[1]) if g > 1.0 - TIE[device_type]]
    return device_type, table, ""


def derive_all(sources):
    """derive() over results files of one device type, their tables joined: (device type, table,
    notes). A class measured in two files is an error: which one should count is not obvious."""
    device_types, table, notes, origin = set(), {}, [], {}
    for source in sources:
        device_type, part, note = derive(json.loads(Path(source).read_text()))
        device_types.add(device_type)
        for klass in part:
            if klass in origin:
                raise ValueError(f"class {klass} is measured in both {origin[klass]} and {source}")
            origin[klass] = source
        table.update(part)
        if note:
            notes.append(f"{source}: {note}")
    if len(device_types) != 1:
        raise ValueError(f"results files of one device type expected, got {sorted(device_types)}")
    return device_types.pop(), dict(sorted(table.items())), notes


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    sources = [Path(a) for a in argv if not a.startswith("-")]
    if not sources:
        print(__doc__)
        return 2
    device_type, table, notes = derive_all(sources)
    print(json.dumps({device_type: table}, indent=1))
    for note in notes:
        print("note: " + note, file=sys.stderr)
    if "--write" in argv:
        path = auto_choice.TABLE_PATH
        current = json.loads(path.read_text()) if path.exists() else {"devices": {}, "sources": {}}
        current["devices"][device_type] = table
        current["sources"][device_type] = [source.as_posix() for source in sources]
        path.write_text(json.dumps(current, indent=1, sort_keys=True) + "\n")
        auto_choice.reload()
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
