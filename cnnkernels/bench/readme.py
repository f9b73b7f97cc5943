"""The README's performance section, in markdown, from the newest results file:

    python -m cnnkernels.bench.readme [RESULTS_DIR_OR_JSON]   (default benchmarks/results)

"Newest" is the latest summary.date, ties broken by file name. The text names the card and the
file, and links the run's plots where they sit beside it. Where training-step results
(`<stem>-train.json`, from `--train`) are there too, a "Training step" section follows: for a
folder the newest of them, for a results file the -train.json beside it. Given a -train.json
itself, only that section is written.
"""
import json
import sys
from pathlib import Path

from . import report

DEFAULT_DIR = Path("benchmarks/results")
TRAIN_SUFFIX = "-train.json"


def newest_results(where=DEFAULT_DIR):
    where = Path(where)
    if where.is_file():
        return where
    found = []
    for path in where.glob("*.json"):
        if path.name.endswith(TRAIN_SUFFIX):
            continue
        try:
            summary = json.loads(path.read_text())["summary"]
        except (ValueError, KeyError, TypeError):
            continue
        found.append((summary.get("date", ""), path.name, path))
    if not found:
        raise FileNotFoundError(f"no results JSON with a summary under {where}")
    return max(found)[2]


def newest_train(where=DEFAULT_DIR):
    """The training results that go with `where` (a folder: its newest -train.json by the date in
    meta.environment, then name; a results file: the -train.json beside it), or None."""
    where = Path(where)
    if where.is_file():
        if where.name.endswith(TRAIN_SUFFIX):
            return where
        beside = where.with_name(where.stem + TRAIN_SUFFIX)
        return beside if beside.exists() else None
    found = []
    for path in where.glob("*" + TRAIN_SUFFIX):
        try:
            data = json.loads(path.read_text())
            date = data["meta"]["environment"]["date"]
            data["train"]
        except (ValueError, KeyError, TypeError):
            continue
        found.append((date, path.name, path))
    return max(found)[2] if found else None


def train_markdown(path):
    """The "Training step" section: card, versions and file, then a row per model@batch and dtype."""
    path = Path(path)
    data = json.loads(path.read_text())
    meta = data.get("meta", {})
    env, settings = meta.get("environment", {}), meta.get("settings", {})
    device = meta.get("config", {}).get("device")
    out = ["### Training step", "",
           f"Measured on **{env.get('device')}** on {env.get('date')} (torch {env.get('torch')}, Triton "
           f"{env.get('triton')}, cuDNN {env.get('cudnn')}, commit `{env.get('commit')}`) by "
           f"`python -m cnnkernels.bench --train`: zero_grad + forward + cross-entropy + backward + "
           f"{settings.get('optimizer', 'SGD')} step, train mode, channels_last, same weights and data for every "
           f"contender; median step time. Results: [`{path.as_posix()}`]({path.as_posix()}).", ""]
    if device == "cpu":
        out += ["A CPU run: peak memory is not measured, and issue 7's target (ours at least 1.05x eager, peak "
                "memory no higher) is for one H100 in bf16.", ""]
    out += _markdown_table(*report.train_rows(data["train"], data["records"]))
    return "\n".join(out).rstrip() + "\n"


def _markdown_table(headers, rows):
    """The lines of a markdown table."""
    return (["| " + " | ".join(headers) + " |", "|---" * len(headers) + "|"]
            + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _ms(r):
    return f"{r['ms_p50']:.4g}" if r and r["status"] == "ok" else (r["status"] if r else "")


def markdown(path):
    path = Path(path)
    data = json.loads(path.read_text())
    s, records, meta = data["summary"], data["records"], data.get("meta", {})
    device = meta.get("config", {}).get("device") or ("cpu" if s["cudnn"] == "n/a" else "cuda")
    basis = meta.get("summary_basis", {})
    batch = basis.get("batch", report.SUMMARY_BATCH)
    peaks = meta.get("peaks") or {}
    isa = meta.get("environment", {}).get("cpu_capability")
    out = [f"Measured on **{s['device']}**{f' ({isa})' if isa else ''} on {s['date']} (torch {s['torch']}, Triton {s['triton']}, "
           f"cuDNN {s['cudnn']}, commit `{s['commit']}`): {s['dtype']}, channels_last, layers at batch {batch}. "
           f"Results: [`{path.as_posix()}`]({path.as_posix()}).", ""]
    if peaks:
        flops = peaks.get("matmul_flops", {}).get(s["dtype"])
        out += [f"Peaks measured in the same run: {s['dtype']} matmul {flops / 1e12:.4g} TFLOP/s, "
                f"device copy {peaks['copy_bytes_per_s'] / 1e9:.4g} GB/s. Roofline fraction = "
                "max(FLOPs / peak, minimum bytes / copy bandwidth) / measured time.", ""]
    t = s["gpu_tests"]
    if t["passed"] or t["failed"] or t["skipped"]:
        out += [f"GPU tests in the same check: {t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped.", ""]
    elif not s["device"].startswith("CPU"):  # a GPU run whose tests gave no complete report
        out += ["GPU tests in the same check: no complete report (not run, or stopped at their time cap).", ""]

    if s["layers"]:
        keys = report.LAYER_KEYS
        out += ["| backend | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
        for backend, v in s["layers"].items():
            out.append(f"| {backend} | " + " | ".join("-" if v[k] is None else f"{v[k]:.3g}" for k in keys) + " |")
        out.append("")
    if device == "cuda":
        table = report.targets_markdown(report.targets(s, records, device))
        if table:
            out += ["Targets (issues 3 and 6):", "", table, ""]

    if s["models"]:
        contenders = list(dict.fromkeys(c for v in s["models"].values() for c in v))
        out += ["| model@batch (images/s) | " + " | ".join(contenders) + " |", "|---" * (len(contenders) + 1) + "|"]
        for name, v in s["models"].items():
            out.append(f"| {name} | " + " | ".join(report.images(v[c]) if c in v else "-" for c in contenders) + " |")
        out.append("")
    memory = report.model_memory_table(records)
    if memory:
        out += [report.MODEL_MEMORY_TITLE + ":", ""] + _markdown_table(*memory) + [""]

    layer = [r for r in records if r["section"] == "layer" and r["dtype"] == s["dtype"] and r["batch"] == batch]
    if layer:
        contenders = list(dict.fromkeys(r["contender"] for r in layer))
        mine = [c for c in s["layers"] if c in contenders]
        theirs = [c for c in contenders if c not in mine]
        by_name = {}
        for r in layer:
            by_name.setdefault(r["name"], {})[r["contender"]] = r
        head = ["layer", "count"] + [f"{c} ms" for c in contenders]
        for b in mine:
            head += [f"{b} vs {p}" for p in theirs] + [f"{b} roofline"]
        out += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
        for name, by in by_name.items():
            cells = [name, str(next(iter(by.values()))["count"])] + [_ms(by.get(c)) for c in contenders]
            for b in mine:
                m = by.get(b)
                cells += [report.speedup_text(m, by.get(p)) for p in theirs]
                cells.append(f"{100 * m['roofline_fraction']:.0f}%" if m and m["status"] == "ok" else "")
            out.append("| " + " | ".join(cells) + " |")
        out.append("")

    stem = path.with_suffix("")
    for suffix, what in (("speedup", "per-layer speedups"), ("roofline", "roofline"), ("models", "models")):
        png = Path(f"{stem}-{suffix}.png")
        if png.exists():
            out.append(f"![{what}]({png.as_posix()})")
    return "\n".join(out).rstrip() + "\n"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    where = Path(argv[0] if argv else DEFAULT_DIR)
    train = newest_train(where)
    parts = []
    if not (where.is_file() and where.name.endswith(TRAIN_SUFFIX)):
        try:
            parts.append(markdown(newest_results(where)))
        except FileNotFoundError as error:
            if train is None:
                print(f"cnnkernels.bench.readme: {error}", file=sys.stderr)
                return 1
    if train is not None:
        parts.append(train_markdown(train))
    print("\n".join(parts), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
