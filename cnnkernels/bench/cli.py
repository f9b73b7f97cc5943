"""python -m cnnkernels.bench: how much faster cnnkernels' fused ops and models are than what a
PyTorch user already has on this machine, and how close they come to its roofline."""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

from . import plots, report, train
from .common import CPU_OURS, CPU_PEERS, DTYPES, GPU_OURS, GPU_PEERS, MAX_AUTOTUNE, dtype_name, ours, peers
from .runner import Plan, Runner
from .shapes import LAYER_SETS, MODEL_INPUTS, QUICK_LAYERS
from .timing import keep_freed_memory

ALL_LAYER_SETS = list(LAYER_SETS)
ALL_MODELS = list(MODEL_INPUTS)

# What each mode measures, per device. The GPU default fits benchmarks/gpu_check.sh's budget.
PRESETS = {
    ("cuda", "quick"): dict(layers="quick", batch=[64], dtype=["bf16"], models=["lenet5"], model_batch=[1],
                            target_ms=30.0),
    ("cuda", "default"): dict(layers=["vgg16", "resnet50", "add_relu"], batch=[64], dtype=["bf16"],
                              models=["resnet50", "vgg16"], model_batch=[256, 1], target_ms=100.0),
    ("cuda", "full"): dict(layers=ALL_LAYER_SETS, batch=[1, 64, 256], dtype=["bf16", "fp16", "fp32"],
                           models=ALL_MODELS, model_batch=[256, 1], target_ms=100.0),
    ("cpu", "quick"): dict(layers="quick", batch=[1], dtype=["fp32"], models=["lenet5"], model_batch=[1],
                           target_ms=30.0),
    ("cpu", "default"): dict(layers=["resnet50", "add_relu"], batch=[8], dtype=["fp32"], models=["resnet50"],
                             model_batch=[8, 1], target_ms=300.0),
    ("cpu", "full"): dict(layers=ALL_LAYER_SETS, batch=[1, 64, 256], dtype=["fp32", "bf16"], models=ALL_MODELS,
                          model_batch=[256, 1], target_ms=300.0),
}

# --train: {model: batch} per device and mode (issue 7: ResNet-50 at 128, VGG-16 at 64, bf16, on a GPU;
# tiny and fast on a CPU). torch.compile is in --full only, or with --train-compile.
TRAIN_PRESETS = {
    ("cuda", "quick"): dict(models={"resnet18": 64}, dtype=["bf16"], compile=False, target_ms=30.0),
    ("cuda", "default"): dict(models={"resnet50": 128, "vgg16": 64}, dtype=["bf16"], compile=False,
                              target_ms=100.0),
    ("cuda", "full"): dict(models={"resnet50": 128, "vgg16": 64}, dtype=["bf16"], compile=True, target_ms=300.0),
    ("cpu", "quick"): dict(models={"lenet5": 8}, dtype=["fp32"], compile=False, target_ms=100.0),
    ("cpu", "default"): dict(models={"resnet18": 2, "lenet5": 8}, dtype=["fp32"], compile=False, target_ms=300.0),
    ("cpu", "full"): dict(models={"resnet18": 2, "lenet5": 8}, dtype=["fp32"], compile=True, target_ms=300.0),
}

GPU_ADDS = ("On a GPU this command also measures: cuDNN eager (cudnn) and cuDNN's fused conv+ReLU ops "
            "(cudnn_fused), torch.compile with Triton code generation, our Triton and CUDA kernels, CUDA-graph "
            "timings at batch 1, rotating inputs where they fit in L2, and bf16 at batch 64 for the summary.")


def _csv(text):
    return [x.strip() for x in text.split(",") if x.strip()]


def parser():
    p = argparse.ArgumentParser(prog="python -m cnnkernels.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Contenders on a GPU: " + ", ".join(GPU_PEERS + GPU_OURS) + f" (+{MAX_AUTOTUNE} "
                                       "with --max-autotune); on a CPU: " + ", ".join(CPU_PEERS + CPU_OURS) + ".")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a tiny subset in seconds (CI)")
    mode.add_argument("--full", action="store_true", help="every layer set, batch 1/64/256, every dtype, every model")
    p.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda if available, else cpu")
    p.add_argument("--dtype", type=_csv, help="comma list of bf16, fp16, fp32")
    p.add_argument("--batch", type=_csv, help="layer batch sizes, comma list")
    p.add_argument("--layers", type=_csv,
                   help=f"layer sets, comma list of {', '.join(ALL_LAYER_SETS)}, or none")
    p.add_argument("--models", type=_csv, help=f"models, comma list of {', '.join(ALL_MODELS)}, or none")
    p.add_argument("--model-batch", type=_csv, help="model batch sizes, comma list")
    p.add_argument("--contenders", type=_csv, help="only these contenders, comma list")
    p.add_argument("--max-autotune", action="store_true",
                   help=f"also time {MAX_AUTOTUNE} (torch.compile mode max-autotune-no-cudagraphs; slow to tune)")
    p.add_argument("--tf32", choices=["on", "off"], default="on",
                   help="TF32 for fp32 matmuls and convs, the same for every contender (default on, cuDNN's default)")
    p.add_argument("--cpu-malloc", choices=["keep", "default"], default="keep",
                   help="on a CPU: keep freed memory in the process, so that no contender's time includes "
                        "page faults on fresh pages (keep, the default), or glibc's default")
    p.add_argument("--target-ms", type=float, help="measured time per result (sets the repetitions)")
    p.add_argument("--budget-s", type=float,
                   help="stop starting new measurements after this many seconds; the rest is recorded as skipped")
    p.add_argument("--gpu-tests-report", help="pytest --junitxml file (or JSON with passed/failed/skipped) of "
                                              "the GPU test run, for summary.gpu_tests")
    p.add_argument("--out", default="bench-out", help="output folder (default ./bench-out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train", action="store_true",
                   help="time a training step (forward, backward, SGD step) of whole models instead: eager "
                        "(torchvision) vs ours (the cnnkernels.models zoo); with --models and --model-batch (one "
                        "batch for all, or one per model), --dtype, --contenders of eager, ours, ours_cuda, ours_triton, compile")
    p.add_argument("--train-compile", action="store_true",
                   help="with --train: also torch.compile of the eager model (on in --full; compiling a ResNet-50 "
                        "training step takes minutes)")
    return p


def make_plan(args, device):
    mode = "quick" if args.quick else "full" if args.full else "default"
    preset = PRESETS[(device, mode)]
    ints = lambda xs: [int(x) for x in xs]  # noqa: E731
    dtypes = _dtypes(args.dtype or preset["dtype"])
    names = args.layers if args.layers is not None else preset["layers"]
    if names == "quick":
        layers = list(QUICK_LAYERS)
    else:
        unknown = [n for n in names if n not in LAYER_SETS and n != "none"]
        if unknown:
            raise SystemExit(f"unknown layer set(s) {', '.join(unknown)}; choose from {', '.join(ALL_LAYER_SETS)}")
        layers = [layer for n in names if n != "none" for layer in LAYER_SETS[n]]
    models = [m for m in (args.models if args.models is not None else preset["models"]) if m != "none"]
    unknown = [m for m in models if m not in MODEL_INPUTS]
    if unknown:
        raise SystemExit(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(ALL_MODELS)}")
    contenders = list(peers(device) + ours(device)) + ([MAX_AUTOTUNE] if args.max_autotune else [])
    if args.contenders:
        unknown = [c for c in args.contenders if c not in contenders]
        if unknown:
            raise SystemExit(f"unknown contender(s) {', '.join(unknown)} on {device}; choose from "
                             f"{', '.join(contenders)}")
        contenders = [c for c in contenders if c in args.contenders]
    return Plan(device=device, dtypes=dtypes, layers=layers, batches=ints(args.batch or preset["batch"]),
                models=models, model_batches=ints(args.model_batch or preset["model_batch"]), contenders=contenders,
                target_ms=args.target_ms or preset["target_ms"], budget_s=args.budget_s, quick=args.quick,
                seed=args.seed)


def _dtypes(names):
    try:
        return [DTYPES[d.lower()] for d in names]
    except KeyError as error:
        raise SystemExit(f"unknown dtype {error}; use bf16, fp16 or fp32")


def make_train_plan(args, device):
    """--train's plan: (model, batch) cases from the preset, or --models with --model-batch (one batch
    for every model, or one per model; a model the preset names keeps its batch when none is given)."""
    ignored = [flag for flag, value in (("--layers", args.layers), ("--batch", args.batch),
                                        ("--max-autotune", args.max_autotune)) if value]
    if ignored:
        raise SystemExit(f"{', '.join(ignored)} do(es) not apply to --train")
    mode = "quick" if args.quick else "full" if args.full else "default"
    preset = TRAIN_PRESETS[(device, mode)]
    names = [m for m in (args.models if args.models is not None else preset["models"]) if m != "none"]
    unknown = [f"{m} ({why})" for m in names if (why := train.model_problem(m))]
    if unknown:
        raise SystemExit(f"unknown model(s) for --train: {', '.join(unknown)}")
    if args.model_batch:
        batches = [int(b) for b in args.model_batch]
        if len(batches) == 1:
            batches *= len(names)
        if len(batches) != len(names):
            raise SystemExit("--train: give --model-batch one batch size, or one per model")
    else:
        fallback = next(iter(preset["models"].values()))
        batches = [preset["models"].get(m, fallback) for m in names]
    contenders = ["eager", "ours"] + (["compile"] if preset["compile"] or args.train_compile else [])
    if args.contenders:
        unknown = [c for c in args.contenders if c not in train.CONTENDERS]
        if unknown:
            raise SystemExit(f"unknown contender(s) {', '.join(unknown)} for --train; choose from "
                             f"{', '.join(train.CONTENDERS)}")
        contenders = [c for c in train.CONTENDERS if c in args.contenders]
    return train.TrainPlan(device=device, dtypes=_dtypes(args.dtype or preset["dtype"]),
                           cases=list(zip(names, batches)), contenders=contenders,
                           target_ms=args.target_ms or preset["target_ms"], budget_s=args.budget_s, seed=args.seed)


def set_conditions(device, tf32=True, cpu_malloc="keep"):
    """The same settings for every contender; returned for the record."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    settings = {"cudnn.benchmark": True, "cuda.matmul.allow_tf32": tf32, "cudnn.allow_tf32": tf32,
                "memory_format": "channels_last"}
    if device == "cpu":
        settings["cpu_malloc"] = keep_freed_memory() if cpu_malloc == "keep" else "glibc's default"
    return settings


def _device(args):
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    return device


def main_train(args, argv):
    """--train: the training step of whole models (train.py), written to <stem>-train.json/.txt."""
    device = _device(args)
    plan = make_train_plan(args, device)
    settings = set_conditions(device, args.tf32 == "on", args.cpu_malloc)
    settings.update(optimizer=f"SGD(lr={train.LR}, momentum={train.MOMENTUM})", loss="cross_entropy",
                    ours_backend=train.OURS_BACKEND, timing="back-to-back steps, median; first step and warm-up "
                    "excluded", peak_memory=(f"torch.cuda.max_memory_allocated over {train.PEAK_STEPS} steps after "
                                             "the timed ones" if device == "cuda" else "not measured on a CPU"))
    env = report.environment(device)
    print(f"cnnkernels.bench --train on {env['device']}: torch {env['torch']}, triton {env['triton']}, "
          f"cuDNN {env['cudnn']}, commit {env['commit']}", flush=True)
    print(f"  {', '.join(f'{m}@{b}' for m, b in plan.cases)}, dtypes {[dtype_name(d) for d in plan.dtypes]}, "
          f"contenders {plan.contenders}; {settings}", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = report.file_stem(env)
    json_path, txt_path = out / f"{stem}-train.json", out / f"{stem}-train.txt"
    config = {"argv": sys.argv[1:] if argv is None else list(argv), "device": device, "mode": "train",
              "dtypes": [dtype_name(d) for d in plan.dtypes], "cases": [f"{m}@{b}" for m, b in plan.cases],
              "contenders": plan.contenders, "target_ms": plan.target_ms, "budget_s": plan.budget_s,
              "seed": plan.seed}
    started = time.monotonic()

    def write(final=False):
        entries = train.summarize(runner.records)
        notes = train.loss_notes(entries)
        skipped = sum(r["status"] == "skipped" for r in runner.records)
        if skipped:
            notes.append(f"{skipped} results skipped: time budget of {plan.budget_s:g} s used up")
        notes += [f"{r['name']} {r['contender']} {r['status']}: {r['message']}" for r in runner.records
                  if r["status"] in ("error", "unavailable")]
        if device == "cpu":
            notes.append("CPU run: peak memory is not measured; issue 7's target is for one H100 in bf16")
        if not final:
            notes.append("partial: the run had not finished when this file was written")
        meta = {"config": config, "environment": env, "settings": settings,
                "elapsed_s": time.monotonic() - started, "notes": notes}
        report.write_train_json(json_path, entries, runner.records, meta)
        table = report.train_table(entries, runner.records, env["device"])
        txt_path.write_text(table + "\n" + "".join(f"note: {n}\n" for n in notes))
        return table, notes

    runner = train.TrainRunner(plan, env["device"], on_record=write)
    runner.run()
    table, notes = write(final=True)
    print("\n" + table)
    for note in notes:
        print("note: " + note)
    print(f"\nwrote {json_path}, {txt_path} in {time.monotonic() - started:.0f} s")
    return 0


def main(argv=None):
    args = parser().parse_args(argv)
    if args.train:
        return main_train(args, argv)
    device = _device(args)
    plan = make_plan(args, device)
    settings = set_conditions(device, args.tf32 == "on", args.cpu_malloc)
    env = report.environment(device)
    gpu_tests, gpu_tests_note = report.read_gpu_tests(args.gpu_tests_report)

    print(f"cnnkernels.bench on {env['device']}: torch {env['torch']}, triton {env['triton']}, cuDNN {env['cudnn']}, "
          f"commit {env['commit']}", flush=True)
    print(f"  {len(plan.layers)} layers x batch {plan.batches}, models {plan.models} x batch {plan.model_batches}, "
          f"dtypes {[dtype_name(d) for d in plan.dtypes]}, contenders {plan.contenders}; {settings}", flush=True)
    if device == "cpu":
        print("  No GPU here: this is the CPU comparison. " + GPU_ADDS, flush=True)

    started = time.monotonic()
    runner = Runner(plan, env["device"])
    records = runner.run()
    elapsed = time.monotonic() - started

    summary, basis = report.summarize(records, env, device, gpu_tests)
    notes = [gpu_tests_note] + [f"{c} unavailable: {why}" for c, why in runner.unavailable.items()]
    if device == "cpu":
        notes.append("CPU run: summary.layers' geomean_vs_cudnn compares with eager, geomean_vs_cudnn_fused with "
                     "onednn (torch.ops.mkldnn._convolution_pointwise), geomean_vs_compile with compile. " + GPU_ADDS)
    skipped = sum(r["status"] == "skipped" for r in records)
    if skipped:
        notes.append(f"{skipped} results skipped: time budget of {plan.budget_s:g} s used up")
    meta = {"config": {"argv": sys.argv[1:] if argv is None else list(argv), "device": device,
                       "dtypes": [dtype_name(d) for d in plan.dtypes], "batches": plan.batches,
                       "layers": [l.label for l in plan.layers], "models": plan.models,
                       "model_batches": plan.model_batches, "contenders": plan.contenders,
                       "target_ms": plan.target_ms, "budget_s": plan.budget_s},
            "environment": env, "settings": settings, "peaks": runner.peaks, "summary_basis": basis,
            "elapsed_s": elapsed, "notes": notes}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = report.file_stem(env)
    json_path, csv_path = out / f"{stem}.json", out / f"{stem}.csv"
    report.write_json(json_path, summary, records, meta)
    report.write_csv(csv_path, records, env)
    table = report.tables(records, device)
    (out / f"{stem}.txt").write_text(table + "\n")
    png_paths, plot_note = plots.write_plots(out, stem, records, runner.peaks, device, basis["dtype"],
                                             basis["batch"], env["device"])
    if plot_note:
        notes.append(plot_note)
        report.write_json(json_path, summary, records, meta)

    peaks = runner.peaks
    print("\nPeaks measured now: " + ", ".join(f"{d} matmul {f / 1e12:.3g} TFLOP/s"
                                               for d, f in peaks["matmul_flops"].items())
          + f", copy {peaks['copy_bytes_per_s'] / 1e9:.4g} GB/s\n")
    print(table)
    print("\nsummary (" + f"layers: {basis['dtype']}, batch {basis['batch']}, {basis['layers']} conv layers of "
          f"{', '.join(basis['layer_models']) or '-'}):")
    print(json.dumps(summary, indent=1))
    if device == "cuda":
        print("\nTargets of issues 3 and 6:\n" + (report.targets_markdown(report.targets(summary, records, device))
                                                 or "none measured"))
    for note in notes:
        print("note: " + note)
    print(f"\nwrote {json_path}, {csv_path}, {out / (stem + '.txt')}"
          + "".join(f", {p}" for p in png_paths) + f" in {elapsed:.0f} s")
    return 0
