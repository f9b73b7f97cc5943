"""What a run leaves behind: the `summary` object other tooling reads, the terminal table, the
JSON and CSV files. Speedups are peer time / our time (above 1: ours is faster)."""
import csv
import datetime
import json
import math
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

from .common import SUMMARY_ROLE, ours, peers

SUMMARY_KEYS = ("device", "date", "commit", "torch", "triton", "cudnn", "dtype", "gpu_tests", "layers", "models")
LAYER_KEYS = ("geomean_vs_cudnn", "geomean_vs_cudnn_fused", "geomean_vs_compile", "min_vs_cudnn_fused",
              "geomean_roofline_fraction")
# The summary's layer set: issue 3's targets are over these models' conv layers.
SUMMARY_LAYER_MODELS = ("vgg16", "resnet50")
SUMMARY_BATCH = 64


def git_commit(path=None):
    """The checked-out commit (12 hex digits, "-dirty" with local changes), or "unknown"."""
    path = Path(path or Path(__file__).resolve().parents[2])
    try:
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")


def read_gpu_tests(path):
    """(passed, failed, skipped) counts from a pytest --junitxml file or a JSON file holding those
    three keys; and a note on where they came from."""
    if path is None:
        return {"passed": 0, "failed": 0, "skipped": 0}, "no --gpu-tests-report given: gpu_tests are zeros"
    path = Path(path)
    if not path.exists():
        return {"passed": 0, "failed": 0, "skipped": 0}, f"{path} does not exist: gpu_tests are zeros"
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return {k: int(data.get(k, 0)) for k in ("passed", "failed", "skipped")}, f"gpu_tests from {path}"
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else root.iter("testsuite")
    tests = failed = skipped = 0
    for s in suites:
        tests += int(s.get("tests", 0))
        failed += int(s.get("failures", 0)) + int(s.get("errors", 0))
        skipped += int(s.get("skipped", 0))
    return {"passed": tests - failed - skipped, "failed": failed, "skipped": skipped}, f"gpu_tests from {path}"


def geomean(xs):
    xs = [x for x in xs if x is not None and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def _ok(records, **where):
    return [r for r in records if r["status"] == "ok" and all(r.get(k) == v for k, v in where.items())]


def summary_basis(records, device):
    """The dtype and batch of the summary's layer numbers: bf16 at batch 64 where measured (the GPU
    default), else the run's first dtype and largest batch."""
    layers = [r for r in records if r["section"] == "layer"]
    dtypes = list(dict.fromkeys(r["dtype"] for r in layers)) or list(
        dict.fromkeys(r["dtype"] for r in records)) or ["bfloat16"]
    dtype = "bfloat16" if device == "cuda" and "bfloat16" in dtypes else dtypes[0]
    batches = {r["batch"] for r in layers}
    batch = SUMMARY_BATCH if SUMMARY_BATCH in batches or not batches else max(batches)
    return dtype, batch


def summary_layers(records, dtype, batch):
    """The conv layers the summary covers: VGG-16's and ResNet-50's where measured, else all."""
    convs = [r for r in records if r["section"] == "layer" and r["op"] != "add_relu"
             and r["dtype"] == dtype and r["batch"] == batch]
    preferred = [r for r in convs if r["model"] in SUMMARY_LAYER_MODELS]
    return preferred or convs


def speedup_text(ours, peer):
    """The peer's time over ours as "1.23x", or "" unless both measured fine (table cells)."""
    if ours and peer and ours["status"] == "ok" and peer["status"] == "ok":
        return f"{peer['ms_p50'] / ours['ms_p50']:.2f}x"
    return ""


def speedups(records, backend, peer):
    """{layer name: peer time / backend time} over the layers where both are ok."""
    mine = {r["name"]: r["ms_p50"] for r in records if r["contender"] == backend and r["status"] == "ok"}
    theirs = {r["name"]: r["ms_p50"] for r in records if r["contender"] == peer and r["status"] == "ok"}
    return {name: theirs[name] / t for name, t in mine.items() if name in theirs}


def summarize(records, env, device, gpu_tests):
    dtype, batch = summary_basis(records, device)
    layer_records = summary_layers(records, dtype, batch)
    role = {SUMMARY_ROLE[p]: p for p in peers(device)}
    layers = {}
    for backend in ours(device):
        mine = [r for r in layer_records if r["contender"] == backend and r["status"] == "ok"]
        if not mine:
            continue
        vs = {k: speedups(layer_records, backend, role[k]) for k in ("cudnn", "cudnn_fused", "compile")}
        fused = list(vs["cudnn_fused"].values())
        layers[backend] = {
            "geomean_vs_cudnn": geomean(vs["cudnn"].values()),
            "geomean_vs_cudnn_fused": geomean(fused),
            "geomean_vs_compile": geomean(vs["compile"].values()),
            "min_vs_cudnn_fused": min(fused) if fused else None,
            "geomean_roofline_fraction": geomean(r["roofline_fraction"] for r in mine),
        }
    models = {}
    for r in _ok(records, section="model", dtype=dtype):
        models.setdefault(r["name"], {})[r["contender"]] = r["images_per_second"]
    summary = {
        "device": env["device"], "date": env["date"], "commit": env["commit"], "torch": env["torch"],
        "triton": env["triton"], "cudnn": env["cudnn"], "dtype": dtype, "gpu_tests": gpu_tests,
        "layers": layers, "models": models,
    }
    basis = {"dtype": dtype, "batch": batch, "layers": len({r["name"] for r in layer_records}),
             "layer_models": sorted({r["model"] for r in layer_records}),
             "roles": {k: v for k, v in role.items()}}
    return summary, basis


def environment(device):
    import torch
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "n/a"
    if device == "cuda":
        name = torch.cuda.get_device_name()
        cudnn = str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a"
    else:
        name, cudnn = f"{_cpu_name()} ({torch.get_num_threads()} threads)", "n/a"
    env = {"device": name, "date": datetime.date.today().isoformat(), "commit": git_commit(),
           "torch": torch.__version__, "triton": triton_version, "cudnn": cudnn}
    if device != "cuda":
        # The vector ISA PyTorch's CPU kernels dispatch to (AVX2 or AVX512): oneDNN's speed, and
        # which of our kernels' clones run, follow it more than the model name does.
        env["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    return env


def _cpu_name():
    """The CPU's model name, with its family and model numbers: a virtual machine may call a Zen 4
    and a Zen 5 EPYC both "AMD EPYC", and oneDNN runs twice as fast on the second."""
    try:
        fields = {}
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        if "model name" in fields:
            numbers = f" family {fields['cpu family']} model {fields['model']}" if "cpu family" in fields else ""
            return f"CPU {fields['model name']}{numbers}"
    except OSError:
        pass
    import platform
    return "CPU " + (platform.processor() or platform.machine())


def file_stem(env):
    """Date, card and versions, as committed result files are named."""
    raw = f"{env['date']}_{env['device']}_torch{env['torch']}_triton{env['triton']}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-")


def write_json(path, summary, records, meta):
    path.write_text(json.dumps({"summary": summary, "records": records, "meta": meta}, indent=1, default=str))


CSV_COLUMNS = ("name", "section", "op", "model", "layer", "count", "contender", "dtype", "batch", "metric", "p20",
               "p50", "p80", "status", "device", "torch", "triton", "cudnn", "commit")


def write_csv(path, records, env):
    """One long table: a row per (record, metric); rates take their p20 from the p80 time."""
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            base = {**r, **{k: env[k] for k in ("torch", "triton", "cudnn", "commit")}}
            if r["status"] != "ok":
                w.writerow({**base, "metric": "status"})
                continue
            t = (r["ms_p20"], r["ms_p50"], r["ms_p80"])
            rows = [("ms", t), ("first_call_s", (None, r["first_call_s"], None)),
                    ("rel_error", (None, r["rel_error"], None))]
            for metric, amount in (("tflops", r["flops"] / 1e9), ("gbps", r["min_bytes"] / 1e6),
                                   ("roofline_fraction", r["roofline_ms"])):
                rows.append((metric, tuple(amount / x for x in t[::-1])))
            if r["section"] == "model":
                rows.append(("images_per_second", tuple(r["batch"] * 1e3 / x for x in t[::-1])))
                if r.get("forward_memory_mib") is not None:
                    rows.append(("forward_memory_mib", (None, r["forward_memory_mib"], None)))
            for metric, (p20, p50, p80) in rows:
                w.writerow({**base, "metric": metric, "p20": p20, "p50": p50, "p80": p80})


_SHORT = {"n/a": "n/a", "unsupported": "unsup", "unavailable": "-", "error": "error", "wrong": "WRONG",
          "skipped": "skip"}


def images(per_second):
    return f"{per_second:,.0f}" if per_second >= 100 else f"{per_second:.3g}"


def _cell(r, value):
    if r is None:
        return ""
    return value(r) if r["status"] == "ok" else _SHORT.get(r["status"], r["status"])


def _format(headers, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in rows])


MODEL_MEMORY_TITLE = "Models: GPU memory one forward takes at its peak beyond its inputs, MiB"


def model_memory_table(records):
    """(headers, rows) of each model's forward memory per contender (runner.forward_memory_mib), or
    None where none was measured (CPU runs)."""
    measured = [r for r in records if r["section"] == "model" and r.get("forward_memory_mib") is not None]
    if not measured:
        return None
    contenders = list(dict.fromkeys(r["contender"] for r in measured))
    by_model = {}
    for r in measured:
        by_model.setdefault(f"{r['name']} {r['dtype']}", {})[r["contender"]] = r["forward_memory_mib"]
    rows = [[name] + [f"{v[c]:,.0f}" if c in v else "" for c in contenders] for name, v in by_model.items()]
    return ["model@batch dtype"] + contenders, rows


def tables(records, device):
    """The terminal tables: per (section, dtype, batch), each contender's median ms (models: img/s),
    then each of our backends' speedup against each peer and its roofline fraction."""
    out = []
    present = list(dict.fromkeys(r["contender"] for r in records))
    mine = [c for c in ours(device) if c in present]
    theirs = [c for c in present if c not in mine]
    groups = {}
    for r in records:
        kind = "model" if r["section"] == "model" else ("add_relu" if r["op"] == "add_relu" else "conv")
        groups.setdefault((kind, r["dtype"], r["batch"]), {}).setdefault(r["name"], {})[r["contender"]] = r
    for (kind, dtype, batch), rows_by_name in groups.items():
        model = kind == "model"
        headers = ["model@batch" if model else "layer", "n"] + [f"{c} {'img/s' if model else 'ms'}" for c in present]
        for b in mine:
            headers += [f"{b}/{p}" for p in theirs] + [f"{b} roof"]
        rows = []
        for name, by in rows_by_name.items():
            count = next(iter(by.values()))["count"]
            row = [name, count]
            row += [_cell(by.get(c), (lambda r: images(r["images_per_second"])) if model
                          else (lambda r: f"{r['ms_p50']:.4g}")) for c in present]
            for b in mine:
                mb = by.get(b)
                row += [speedup_text(mb, by.get(p)) for p in theirs]
                row.append(_cell(mb, lambda r: f"{100 * r['roofline_fraction']:.0f}%"))
            rows.append(row)
        title = f"{'Models' if model else 'add_relu' if kind == 'add_relu' else 'Conv layers'}: {dtype}, " \
                f"batch {batch}, channels_last"
        out.append(title + "\n" + _format(headers, rows))
    memory = model_memory_table(records)
    if memory:
        out.append(MODEL_MEMORY_TITLE + "\n" + _format(*memory))
    first = {}
    for r in records:
        if r["status"] == "ok":
            first.setdefault(r["contender"], []).append(r["first_call_s"])
    if first:
        out.append("First calls (compilation, autotuning, cuDNN's algorithm search; not in the timings): "
                   + ", ".join(f"{c} {sum(t):.1f} s over {len(t)}, at most {max(t):.1f} s" for c, t in first.items()))
    return "\n\n".join(out)


# The speed targets of issues 3 and 6 (one H100, bf16, channels_last): (what, threshold).
LAYER_TARGETS = (("geomean_vs_cudnn", 1.15), ("geomean_vs_cudnn_fused", 1.0), ("min_vs_cudnn_fused", 0.85),
                 ("geomean_roofline_fraction", 0.60))
MODEL_TARGETS = (("resnet50@256", "cudnn", 1.3), ("resnet50@256", "compile", 1.0), ("resnet50@256", None, 26500),
                 ("vgg16@256", "cudnn", 1.1), ("vgg16@256", "compile", 1.0), ("resnet50@1", "compile", 1.0),
                 ("vgg16@1", "compile", 1.0))
ADD_RELU_TARGET = 0.90  # of the measured copy bandwidth, at every ResNet-50 shape


def targets(summary, records, device):
    """[(target, threshold, {backend: value or None})] for the targets this run measured."""
    rows = []
    backends = [b for b in ours(device) if any(r["contender"] == b for r in records)]

    def row(name, value_of, threshold):
        values = {b: value_of(b) for b in backends}
        if any(v is not None for v in values.values()):
            rows.append((name, threshold, values))

    for key, threshold in LAYER_TARGETS:
        row(f"layers: {key}", lambda b: summary["layers"].get(b, {}).get(key), threshold)
    dtype = summary["dtype"]
    add_relu = [r for r in records if r["op"] == "add_relu" and r["dtype"] == dtype and r["batch"] == SUMMARY_BATCH
                and r["status"] == "ok"]
    row("add_relu: lowest fraction of copy bandwidth",
        lambda b: min((r["roofline_fraction"] for r in add_relu if r["contender"] == b), default=None),
        ADD_RELU_TARGET)
    role = {SUMMARY_ROLE[p]: p for p in peers(device)}
    for model, peer, threshold in MODEL_TARGETS:
        ips = summary["models"].get(model, {})
        if peer is None:
            row(f"{model}: images/s", lambda b: ips.get(b), threshold)
        else:
            p = role.get(peer, peer)
            row(f"{model}: speedup vs {p}", lambda b: ips[b] / ips[p] if b in ips and p in ips else None,
                threshold)
    return rows


def targets_markdown(rows):
    """The targets as a markdown table, each value marked met, or missed with its gap."""
    if not rows:
        return ""
    backends = list(rows[0][2])
    lines = ["| target | at least | " + " | ".join(backends) + " |", "|---" * (len(backends) + 2) + "|"]
    for name, threshold, values in rows:
        cells = ["-" if v is None else f"{v:.3g} met" if v >= threshold else f"{v:.3g} **missed by {threshold - v:.3g}**"
                 for v in values.values()]
        lines.append(f"| {name} | {threshold:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# The training step (train.py): a row per (model, batch, dtype).

def _train_target_text(entry):
    """Issue 7's target for ours: speed (at least 1.05x eager) and peak memory (no higher)."""
    t, speedup = entry["target"], entry["speedup_vs_eager"].get("ours")
    if t["speedup_met"] is None:
        return ""
    speed = f"{t['speedup_at_least']:g}x " + ("met" if t["speedup_met"] else f"missed ({speedup:.2f}x)")
    memory = {None: "n/a", True: "met", False: "missed"}[t["peak_memory_met"]]
    return f"{speed}; memory {memory}"


def _first_loss(record, agrees):
    """A contender's first-step loss, flagged where its losses differ from eager's."""
    if record is None or record["status"] != "ok":
        return "-"
    return f"{record['loss_first_step']:.4g}" + ("" if agrees else " DIFFER")


def train_rows(entries, records):
    """(headers, rows) of the training-step table: per contender step ms, images/s and peak MiB;
    each one's speedup over eager; every contender's first-step loss; issue 7's target."""
    contenders = list(dict.fromkeys(r["contender"] for r in records))
    others = [c for c in contenders if c != "eager"]
    headers = ["model@batch", "dtype"]
    for c in contenders:
        headers += [f"{c} ms", f"{c} img/s", f"{c} peak MiB"]
    headers += [f"{c}/eager" for c in others] + ["first loss " + "/".join(contenders), "target (ours)"]
    by = {}
    for r in records:
        by.setdefault((r["name"], r["dtype"]), {})[r["contender"]] = r
    rows = []
    for e in entries:
        rs = by.get((e["name"], e["dtype"]), {})
        row = [e["name"], e["dtype"]]
        for c in contenders:
            r = rs.get(c)
            peak = lambda r: "n/a" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:,.0f}"  # noqa: E731
            row += [_cell(r, lambda r: f"{r['ms_p50']:.4g}"), _cell(r, lambda r: images(r["images_per_second"])),
                    _cell(r, peak)]
        row += [speedup_text(rs.get(c), rs.get("eager")) for c in others]
        row.append("/".join(_first_loss(rs.get(c), e["loss_agrees"].get(c, True)) for c in contenders))
        row.append(_train_target_text(e))
        rows.append(row)
    return headers, rows


def train_table(entries, records, device_name):
    headers, rows = train_rows(entries, records)
    title = (f"Training step (zero_grad + forward + cross-entropy + backward + SGD step) on {device_name}, "
             "channels_last")
    return title + "\n" + _format(headers, rows)


def write_train_json(path, entries, records, meta):
    """The training results: `train` (summarized entries), `records`, `meta` (config, environment,
    settings, notes). No `summary` key: that one is the layer results' (readme.newest_results)."""
    path.write_text(json.dumps({"train": entries, "records": records, "meta": meta}, indent=1, default=str))
