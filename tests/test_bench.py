"""The benchmark suite on the CPU: the quick CLI run writes every output with the summary keys
other tooling reads, and the numbers behind it (shapes, FLOPs, speedups) are right."""
import json
import math
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from cnnkernels.bench import cli, readme, report, shapes, timing

ROOT = Path(__file__).resolve().parents[1]

JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest" errors="1" failures="2"
skipped="3" tests="10" time="1.0"></testsuite></testsuites>"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    junit = out / "gpu-tests.xml"
    junit.write_text(JUNIT)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "cnnkernels.bench", "--quick", "--device", "cpu", "--out", str(out),
                           "--gpu-tests-report", str(junit)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = [p for p in out.glob("*.json")]
    return out, json_path, json.loads(json_path.read_text()), proc.stdout


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_quick_run_writes_every_output(quick_run):
    out, json_path, _, stdout = quick_run
    stem = json_path.stem
    for suffix in (".csv", ".txt"):
        assert (out / (stem + suffix)).stat().st_size > 0
    for kind in ("speedup", "roofline", "models"):
        assert (out / f"{stem}-{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Conv layers: float32, batch 1" in stdout and "eager ms" in stdout
    assert "On a GPU this command also measures" in stdout


def test_cpu_run_records_that_freed_memory_is_kept(quick_run):
    settings = quick_run[2]["meta"]["settings"]
    assert settings["cpu_malloc"].startswith("glibc: freed memory kept") or "left as is" in settings["cpu_malloc"]
    assert "cpu_malloc" in quick_run[3]


def test_cpu_run_records_the_vector_isa_and_the_readme_names_it(quick_run):
    import torch

    isa = quick_run[2]["meta"]["environment"]["cpu_capability"]
    assert isa == torch.backends.cpu.get_cpu_capability()
    assert f"** ({isa}) on " in readme.markdown(quick_run[1])
    assert "cpu_capability" not in quick_run[2]["summary"]  # the summary's keys are a contract


KEEP_FREED_MEMORY = """
import resource, sys, torch
from cnnkernels.bench.timing import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory().startswith("glibc"), "mallopt refused"
x = torch.randn(2_000_000)
for _ in range(3):
    torch.relu(x + x)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.relu(x + x)  # two 8 MB results per call, each freed before the next call
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_ends_page_faults_on_fresh_tensors():
    def faults(mode):
        proc = subprocess.run([sys.executable, "-c", KEEP_FREED_MEMORY, mode], capture_output=True, text=True,
                              timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.split()[-1])
    # 10 calls x 2 tensors x 8 MB of 4 KiB pages would fault 39,000 times if every tensor were fresh
    assert faults("keep") < 500
    assert faults("default") > 5 * max(faults("keep"), 100)


def test_summary_has_exactly_the_issue_keys(quick_run):
    data = quick_run[2]
    assert set(data) >= {"summary", "records"}
    s = data["summary"]
    assert set(s) == set(report.SUMMARY_KEYS)
    for key in ("device", "commit", "torch", "triton", "cudnn"):
        assert isinstance(s[key], str) and s[key]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d", s["date"])
    assert s["dtype"] == "float32" and s["torch"] == torch.__version__
    assert s["gpu_tests"] == {"passed": 4, "failed": 3, "skipped": 3}
    assert s["layers"], "no backend of ours was measured"
    for backend, values in s["layers"].items():
        assert backend in ("cuda", "auto")
        assert set(values) == set(report.LAYER_KEYS)
        assert all(_positive(v) for v in values.values()), values
    assert s["models"], "no model was measured"
    for name, by in s["models"].items():
        assert re.fullmatch(r"[a-z0-9]+@\d+", name)
        assert {"eager", "compile", "auto"} <= set(by) and all(_positive(v) for v in by.values()), by


def test_records_cover_every_contender(quick_run):
    records = quick_run[2]["records"]
    ok = [r for r in records if r["status"] == "ok"]
    assert {"eager", "onednn", "compile", "auto"} <= {r["contender"] for r in ok}
    assert {r["status"] for r in records} <= {"ok", "n/a", "unavailable"}, [
        (r["name"], r["contender"], r["message"]) for r in records if r["status"] not in ("ok", "n/a", "unavailable")]
    for r in ok:
        assert r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"]
        assert _positive(r["roofline_fraction"]) and _positive(r["flops"]) and _positive(r["min_bytes"])
        assert r["rel_error"] < 1e-2
    # onednn has no add+ReLU op: said so, never timed as something else
    (onednn_add,) = [r for r in records if r["op"] == "add_relu" and r["contender"] == "onednn"]
    assert onednn_add["status"] == "n/a" and "ms_p50" not in onednn_add


def test_csv_is_one_long_table(quick_run):
    out, json_path, data, _ = quick_run
    lines = (out / (json_path.stem + ".csv")).read_text().splitlines()
    assert lines[0].split(",") == list(report.CSV_COLUMNS)
    ms_rows = [line for line in lines if ",ms," in line]
    assert len(ms_rows) == sum(r["status"] == "ok" for r in data["records"])


def test_readme_section_names_card_and_file(quick_run, tmp_path):
    out, json_path, data, _ = quick_run
    older = dict(data, summary=dict(data["summary"], date="2000-01-01", device="older card"))
    (out / "0-older.json").write_text(json.dumps(older))
    assert readme.newest_results(out) == json_path
    text = readme.markdown(readme.newest_results(out))
    assert data["summary"]["device"] in text and json_path.name in text
    assert "| backend | geomean_vs_cudnn |" in text and "lenet5@1" in text
    assert f"{json_path.stem}-speedup.png" in text
    assert report.MODEL_MEMORY_TITLE not in text  # a CPU run measures no GPU memory
    (out / "0-older.json").unlink()
    measured = dict(data, records=[dict(r, forward_memory_mib=12.5) if r["section"] == "model" else r
                                   for r in data["records"]])
    (tmp_path / "gpu.json").write_text(json.dumps(measured))
    text = readme.markdown(tmp_path / "gpu.json")
    assert report.MODEL_MEMORY_TITLE + ":" in text and "| lenet5@1 float32 | " in text and "| 12 |" in text


@pytest.fixture(scope="module")
def train_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("train")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "cnnkernels.bench", "--train", "--quick", "--device", "cpu", "--out",
                           str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = out.glob("*-train.json")
    return out, json_path, json.loads(json_path.read_text()), proc.stdout


def test_train_quick_run_writes_json_and_table(train_run):
    out, json_path, data, stdout = train_run
    assert set(data) == {"train", "records", "meta"}
    meta = data["meta"]
    assert json_path.name == report.file_stem(meta["environment"]) + "-train.json"
    assert set(meta["environment"]) == {"device", "date", "commit", "torch", "triton", "cudnn", "cpu_capability"}
    assert meta["config"]["cases"] == ["lenet5@8"] and meta["config"]["contenders"] == ["eager", "ours"]
    assert meta["settings"]["optimizer"] == "SGD(lr=0.01, momentum=0.9)"
    by = {r["contender"]: r for r in data["records"]}
    assert set(by) == {"eager", "ours"} and all(r["status"] == "ok" for r in by.values()), data["records"]
    assert "traced in reference_mode" in by["eager"]["runs"] and "use_backend('auto')" in by["ours"]["runs"]
    for r in by.values():
        assert r["ms_p20"] <= r["ms_p50"] <= r["ms_p80"] and r["reps"] >= 5
        assert r["images_per_second"] == pytest.approx(8 * 1e3 / r["ms_p50"])
        assert r["peak_memory_mib"] is None  # not measured on a CPU, never made up
    (entry,) = data["train"]
    assert entry["name"] == "lenet5@8" and entry["dtype"] == "float32"
    assert entry["speedup_vs_eager"]["ours"] == pytest.approx(by["eager"]["ms_p50"] / by["ours"]["ms_p50"])
    assert entry["target"]["speedup_met"] == (entry["speedup_vs_eager"]["ours"] >= 1.05)
    assert entry["target"]["peak_memory_met"] is None
    table = (out / (json_path.stem + ".txt")).read_text()
    assert table.splitlines()[0].startswith("Training step") and table.splitlines()[0] in stdout
    row = next(line for line in table.splitlines() if line.startswith("lenet5@8"))
    assert f"{entry['speedup_vs_eager']['ours']:.2f}x" in row and "memory n/a" in row


def test_train_losses_of_eager_and_ours_agree(train_run):
    data = train_run[2]
    by = {r["contender"]: r for r in data["records"]}
    eager, ours = by["eager"], by["ours"]
    # Same weights and data: the first step's losses agree to float32 rounding, and so do the losses
    # after the same number of optimizer steps.
    assert ours["loss_first_step"] == pytest.approx(eager["loss_first_step"], rel=1e-4)
    assert ours["loss_check_step"] == eager["loss_check_step"] == 3
    assert ours["loss_after_warmup"] == pytest.approx(eager["loss_after_warmup"], rel=1e-3)
    # The optimizer steps: three steps on the same batch lower the loss; timing starts after them.
    assert eager["loss_after_warmup"] < eager["loss_first_step"]
    assert min(eager["first_timed_step"], ours["first_timed_step"]) >= 3
    assert data["train"][0]["loss_agrees"] == {"ours": True}


def _train_record(name, contender, ms, peak_mib=None, loss=2.0, batch=64):
    peak = None if peak_mib is None else peak_mib * 2 ** 20
    return {"section": "train", "name": f"{name}@{batch}", "model": name, "batch": batch, "dtype": "bfloat16",
            "contender": contender, "status": "ok", "ms_p50": ms, "images_per_second": batch * 1e3 / ms,
            "peak_memory_bytes": peak, "peak_memory_mib": peak_mib, "loss_first_step": 2.0,
            "loss_after_warmup": loss}


def test_train_ours_cuda_runs_the_zoo_model_on_the_extension(monkeypatch):
    """An ours_<backend> contender's step runs the zoo model under use_backend(<backend>)."""
    import cnnkernels
    from cnnkernels.bench import train
    seen = []
    eager, _, ours = train.build_models("lenet5", seed=0)
    x, y = train.make_batch("lenet5", 2, train.num_classes(eager), torch.float32, "cpu", seed=0)
    real_select = cnnkernels.backends.select
    monkeypatch.setattr(cnnkernels.backends, "select",
                        lambda *args: seen.append(cnnkernels.get_backend()) or real_select(*args))
    train.TrainStep("ours_cuda", ours, "cpu", torch.float32, x, y)()
    assert seen and set(seen) == {"cuda"}


def test_train_steps_interleaved_on_a_cpu_draw_the_dropout_masks_they_draw_alone():
    """Interleaved steps keep their own stream of the CPU generator: each contender's losses are
    those of its steps run alone, where two steps sharing the generator would draw other masks."""
    from cnnkernels.bench import train
    base = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.Flatten(), torch.nn.Dropout(0.5),
                               torch.nn.Linear(4 * 6 * 6, 10))
    x = torch.randn(4, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,))

    def losses_of(*own_cpu_rng):
        torch.manual_seed(1)
        steps = [train.TrainStep("eager", base, "cpu", torch.float32, x, y, own_cpu_rng=own) for own in own_cpu_rng]
        for _ in range(4):
            for step in steps:
                step()
        return [torch.stack(step.losses) for step in steps]

    (alone,) = losses_of(False)
    first, second = losses_of(True, True)
    assert torch.equal(first, alone) and torch.equal(second, alone)
    shared_first, shared_second = losses_of(False, False)
    assert torch.equal(shared_first[:1], alone[:1]) and not torch.equal(shared_second, alone)


def test_train_runner_on_a_cpu_times_a_case_s_contenders_in_shared_rounds(monkeypatch):
    from cnnkernels.bench import train
    from cnnkernels.bench.timing import CpuTimer
    rounds = []
    real_time_all = CpuTimer.time_all
    monkeypatch.setattr(CpuTimer, "time_all", lambda self, fns, *a, **k: rounds.append(sorted(fns)) or
                        real_time_all(self, fns, *a, **k))
    plan = train.TrainPlan(device="cpu", dtypes=[torch.float32], cases=[("lenet5", 2)],
                           contenders=["eager", "ours"], target_ms=5.0)
    records = train.TrainRunner(plan, "cpu").run()
    assert rounds == [["eager", "ours"]]
    assert [(r["contender"], r["status"]) for r in records] == [("eager", "ok"), ("ours", "ok")]
    assert all(r["first_timed_step"] >= train.CHECK_STEP and r["reps"] >= 5 for r in records)


def test_train_summary_speedup_memory_and_loss_flags():
    from cnnkernels.bench import train
    records = [_train_record("resnet50", "eager", 100.0, 5000.0), _train_record("resnet50", "ours", 90.0, 4900.0),
               _train_record("resnet50", "compile", 125.0, 4000.0, loss=2.5),
               _train_record("vgg16", "eager", 100.0, 5000.0), _train_record("vgg16", "ours", 98.0, 5100.0),
               dict(_train_record("vgg16", "compile", 1.0), status="skipped")]
    res, vgg = train.summarize(records)
    assert res["speedup_vs_eager"] == {"ours": pytest.approx(100 / 90), "compile": pytest.approx(0.8)}
    assert res["peak_memory_vs_eager"]["ours"] == pytest.approx(0.98)
    assert res["target"] == {"speedup_at_least": 1.05, "speedup_met": True, "peak_memory_met": True}
    assert res["loss_agrees"] == {"ours": True, "compile": False}
    assert res["loss_rel_diff_vs_eager"]["compile"] == pytest.approx(0.25)
    assert vgg["target"] == {"speedup_at_least": 1.05, "speedup_met": False, "peak_memory_met": False}
    assert "compile" not in vgg["speedup_vs_eager"] and vgg["status"]["compile"] == "skipped"
    (note,) = train.loss_notes([res, vgg])
    assert note.startswith("resnet50@64 bfloat16: compile's loss differs from eager's by 25%")
    headers, rows = report.train_rows([res, vgg], records)
    cells = dict(zip(headers, rows[1]))
    assert cells["ours/eager"] == "1.02x" and cells["compile ms"] == "skip" and cells["ours peak MiB"] == "5,100"
    assert cells["target (ours)"] == "1.05x missed (1.02x); memory missed"
    # Every contender's first loss, flagged where its losses differ from eager's (compile's here).
    assert dict(zip(headers, rows[0]))["first loss eager/ours/compile"] == "2/2/2 DIFFER"
    assert cells["first loss eager/ours/compile"] == "2/2/-"


def test_train_plan_defaults_and_overrides():
    def plan(*argv, device="cpu"):
        return cli.make_train_plan(cli.parser().parse_args(["--train", *argv]), device)
    gpu = plan(device="cuda")
    assert gpu.cases == [("resnet50", 128), ("vgg16", 64)] and gpu.dtypes == [torch.bfloat16]
    assert gpu.contenders == ["eager", "ours"]
    assert plan("--full", device="cuda").contenders == ["eager", "ours", "compile"]
    assert plan("--train-compile").contenders == ["eager", "ours", "compile"]
    assert plan().cases == [("resnet18", 2), ("lenet5", 8)] and plan().dtypes == [torch.float32]
    assert plan("--quick").cases == [("lenet5", 8)]
    assert plan("--models", "resnet50,vgg16", "--model-batch", "32,16").cases == [("resnet50", 32), ("vgg16", 16)]
    assert plan("--models", "vgg16,lenet5", "--model-batch", "4", "--dtype", "bf16").cases == [("vgg16", 4),
                                                                                                 ("lenet5", 4)]
    assert plan("--models", "vgg16", device="cuda").cases == [("vgg16", 64)]
    assert plan("--contenders", "ours,eager").contenders == ["eager", "ours"]
    assert plan("--contenders", "ours_triton,eager,ours_cuda").contenders == ["eager", "ours_cuda", "ours_triton"]
    for bad in (["--models", "nosuchnet"], ["--models", "vgg16,lenet5", "--model-batch", "1,2,3"],
                ["--contenders", "cudnn_fused"], ["--layers", "vgg16"]):
        with pytest.raises(SystemExit):
            plan(*bad)


def test_train_budget_records_skipped(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # in-process: leave the test's threads alone
    assert cli.main(["--train", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)]) == 0
    (json_path,) = tmp_path.glob("*-train.json")
    data = json.loads(json_path.read_text())
    assert [(r["name"], r["contender"], r["status"]) for r in data["records"]] == [
        ("resnet18@2", "eager", "skipped"), ("resnet18@2", "ours", "skipped"),
        ("lenet5@8", "eager", "skipped"), ("lenet5@8", "ours", "skipped")]
    assert all("time budget of 0 s used up" in r["message"] for r in data["records"])
    assert "4 results skipped: time budget of 0 s used up" in data["meta"]["notes"]
    assert [e["speedup_vs_eager"] for e in data["train"]] == [{}, {}]
    assert "skip" in (tmp_path / (json_path.stem + ".txt")).read_text()


def test_readme_training_section_names_card_and_file(train_run, quick_run, capsys):
    _, train_json, train_data, _ = train_run
    assert readme.train_markdown(train_json).startswith("### Training step")
    assert readme.main([str(train_json.parent)]) == 0  # a folder of training results only
    text = capsys.readouterr().out
    assert train_data["meta"]["environment"]["device"] in text and train_json.name in text
    assert "| model@batch | dtype | eager ms |" in text and "| lenet5@8 | float32 |" in text
    assert "for one H100 in bf16" in text and "Peaks measured" not in text
    # Beside the layer results: both sections, and the layer section still reads the layer file.
    out, layer_json = quick_run[0], quick_run[1]
    beside = out / (layer_json.stem + "-train.json")
    beside.write_text(train_json.read_text())
    try:
        assert readme.newest_results(out) == layer_json and readme.newest_train(out) == beside
        assert readme.newest_train(layer_json) == beside
        assert readme.main([str(out)]) == 0
        text = capsys.readouterr().out
        assert text.index("| backend | geomean_vs_cudnn |") < text.index("### Training step")
        assert beside.name in text and layer_json.name in text
    finally:
        beside.unlink()


def test_gpu_tests_report_from_junit_or_json(tmp_path):
    junit = tmp_path / "r.xml"
    junit.write_text(JUNIT)
    assert report.read_gpu_tests(junit)[0] == {"passed": 4, "failed": 3, "skipped": 3}
    js = tmp_path / "r.json"
    js.write_text('{"passed": 7, "failed": 0, "skipped": 1}')
    assert report.read_gpu_tests(js)[0] == {"passed": 7, "failed": 0, "skipped": 1}
    counts, note = report.read_gpu_tests(None)
    assert counts == {"passed": 0, "failed": 0, "skipped": 0} and "zeros" in note


def _record(name, contender, ms, model="resnet50", op="conv2d_relu", fraction=0.5):
    return {"section": "layer", "name": name, "model": model, "op": op, "dtype": "bfloat16", "batch": 64,
            "contender": contender, "status": "ok", "ms_p50": ms, "roofline_fraction": fraction}


def test_summary_speedups_are_peer_time_over_ours():
    records = []
    for name, (cudnn, fused, mine) in {"a": (2.0, 1.0, 1.0), "b": (8.0, 1.0, 2.0)}.items():
        records += [_record(name, "cudnn", cudnn), _record(name, "cudnn_fused", fused), _record(name, "compile", cudnn),
                    _record(name, "triton", mine, fraction=0.25 if name == "a" else 1.0)]
    records.append(_record("c", "triton", 1.0, model="lenet5"))  # not a VGG-16/ResNet-50 layer: left out
    records.append(dict(_record("d", "cudnn_fused", 1.0), status="unsupported"))
    records.append(_record("d", "triton", 1.0))  # no peer result: in the roofline geomean only
    summary, basis = report.summarize(records, dict.fromkeys(("device", "date", "commit", "torch", "triton", "cudnn"),
                                                             "x"), "cuda", {"passed": 1, "failed": 0, "skipped": 0})
    t = summary["layers"]["triton"]
    assert t["geomean_vs_cudnn"] == pytest.approx(math.sqrt(2.0 * 4.0))
    assert t["geomean_vs_cudnn_fused"] == pytest.approx(math.sqrt(1.0 * 0.5))
    assert t["min_vs_cudnn_fused"] == pytest.approx(0.5)
    assert t["geomean_roofline_fraction"] == pytest.approx((0.25 * 1.0 * 0.5) ** (1 / 3))
    assert basis["batch"] == 64 and basis["layers"] == 3 and summary["dtype"] == "bfloat16"


def _conv_counts(model, input_shape):
    counts = Counter()

    def hook(m, inputs, output):
        counts[(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                inputs[0].shape[-1])] += 1
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(hook)
    with torch.no_grad():
        model(torch.empty(input_shape, device="meta"))
    return counts


def _table_counts(layers):
    counts = Counter()
    for l in layers:
        counts[(l.in_channels, l.out_channels, l.kernel, l.stride, l.padding, l.width)] += l.count
    return counts


@pytest.mark.parametrize("name", ["alexnet", "vgg16", "resnet50"])
def test_layer_tables_match_torchvision(name):
    torchvision = pytest.importorskip("torchvision")
    with torch.device("meta"):
        model = getattr(torchvision.models, name)().eval()
    assert _conv_counts(model, (1, *shapes.MODEL_INPUTS[name])) == _table_counts(shapes.LAYER_SETS[name])


def test_lenet5_table_matches_the_zoo():
    models = pytest.importorskip("cnnkernels.models")
    with torch.device("meta"):
        model = models.lenet5().eval()
    with models.reference_mode():
        assert _conv_counts(model, (1, *shapes.MODEL_INPUTS["lenet5"])) == _table_counts(shapes.LENET5)


def test_flops_and_bytes():
    # torchvision's tables: 4.09 GMAC for ResNet-50, 15.47 for VGG-16, 0.71 for AlexNet, each with
    # its fully connected layers (2.05, 123.6 and 58.6 MMAC), which these conv tables leave out.
    gmac = {n: sum(l.count * l.flops(1) for l in shapes.LAYER_SETS[n]) / 2e9 for n in ("resnet50", "vgg16", "alexnet")}
    assert gmac["resnet50"] + 0.00205 == pytest.approx(4.09, abs=0.005)
    assert gmac["vgg16"] + 0.1236 == pytest.approx(15.47, abs=0.005)
    assert gmac["alexnet"] + 0.0586 == pytest.approx(0.71, abs=0.005)
    layer = next(l for l in shapes.RESNET50 if l.name == "layer4.0.conv3")  # 512 -> 2048, 1x1, 7x7, + residual
    assert layer.min_bytes(2, 2) == 2 * (2 * 512 * 49 + 2048 * 512 + 2048 + 2 * 2 * 2048 * 49)
    add = shapes.RESNET50_ADD_RELU[0]
    assert add.min_bytes(1, 4) == 3 * 256 * 56 * 56 * 4


def test_cpu_timer_interleaves_contenders_and_keeps_their_failures_apart():
    calls = []

    def contender(name, fails=False):
        def fn(i):
            calls.append((name, i))
            if fails:
                raise RuntimeError(f"{name} failed")
        return fn
    timer = timing.CpuTimer(target_ms=0.0, min_reps=6, max_reps=6, max_rounds=3)
    results = timer.time_all({"a": contender("a"), "c": contender("c", fails=True), "b": contender("b")}, n_sets=2)
    assert isinstance(results["c"], RuntimeError) and "c failed" in str(results["c"])
    assert [len(results[n].samples_ms) for n in "ab"] == [6, 6]
    assert all(results[n].first_call_s >= 0 and results[n].sets == 2 for n in "ab")
    # Each alone: its first call and two warm-up calls (c: one call, failed). Then 3 rounds of 2
    # calls each, each round starting with another contender, so that a slow spell hits both.
    alone = ["a"] * 3 + ["c"] + ["b"] * 3
    rounds = ["a", "a", "b", "b"] + ["b", "b", "a", "a"] + ["a", "a", "b", "b"]
    assert [name for name, _ in calls] == alone + rounds
    assert [i for name, i in calls if name == "a"] == [0, 0, 1] + [0, 1, 0, 1, 0, 1]  # the sets in turn
    (only,) = timer.time_all({"c": contender("c", fails=True)}).values()
    assert isinstance(only, RuntimeError)


class _OneAfterAnother(timing.CpuTimer):
    """A CPU timer that times contenders one after the other, as the GPU timer does."""
    interleaves = False

    def time_all(self, fns, n_sets=1, graph=False):
        return {name: super(_OneAfterAnother, self).time_all({name: fn}, n_sets)[name] for name, fn in fns.items()}


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "one_after_another"])
def test_runner_records_every_contender_either_way(interleaved):
    from cnnkernels.bench.runner import Plan, Runner
    plan = Plan(device="cpu", dtypes=[torch.float32], layers=[shapes.LENET5[1], shapes.RESNET50_ADD_RELU[-1]],
                batches=[1], models=[], model_batches=[], contenders=["eager", "onednn", "cuda", "auto"],
                target_ms=1.0, quick=True)
    runner = Runner(plan, "test CPU")
    if not interleaved:
        runner.timer = _OneAfterAnother(target_ms=1.0)
    records = runner.run()
    got = {(r["name"], r["contender"]): r["status"] for r in records}
    conv, add = (c.label for c in plan.layers)
    assert got == {(conv, "eager"): "ok", (conv, "onednn"): "ok", (conv, "cuda"): "ok", (conv, "auto"): "ok",
                   (add, "eager"): "ok", (add, "onednn"): "n/a", (add, "cuda"): "ok", (add, "auto"): "ok"}
    assert all(r["reps"] >= 5 and r["ms_p50"] > 0 for r in records if r["status"] == "ok")


def test_rotating_sets_leave_l2():
    l2 = 50 << 20
    assert timing.rotating_sets(200 << 20, l2) == 1  # far larger than L2: one set
    assert timing.rotating_sets(10 << 20, l2) * (10 << 20) >= 2 * l2
    assert timing.rotating_sets(1, l2) == 64  # capped
    assert timing.rotating_sets(1 << 20, 0) == 1  # no L2 figure (CPU)


@pytest.mark.parametrize("name", list(shapes.MODEL_INPUTS))
def test_layer_tables_match_the_zoos_conv_layers(name):
    """Geometry, count and epilogue (ReLU, residual) of every unique conv, as fuse() sees the model."""
    models = pytest.importorskip("cnnkernels.models")
    if not hasattr(models, "conv_layers"):
        pytest.skip("cnnkernels.models.conv_layers is not there yet")
    with torch.device("meta"):
        model = getattr(models, name)()
    zoo = {(d["C"], d["K"], d["R"], d["stride"][0], d["padding"][0], d["H"], d["has_residual"], d["relu"]): d["count"]
           for d in models.conv_layers(model, shapes.MODEL_INPUTS[name])}
    ours = {(l.in_channels, l.out_channels, l.kernel, l.stride, l.padding, l.height, l.residual, l.relu_in_model):
            l.count for l in shapes.LAYER_SETS[name]}
    assert ours == zoo


def test_targets_say_met_or_missed_by_how_much():
    summary = {"dtype": "bfloat16", "layers": {"triton": dict.fromkeys(report.LAYER_KEYS, 1.2)},
               "models": {"resnet50@256": {"cudnn": 20000.0, "compile": 25000.0, "triton": 27000.0}}}
    records = [{"contender": "triton", "op": "add_relu", "dtype": "bfloat16", "batch": 64, "status": "ok",
                "roofline_fraction": 0.8}]
    rows = {name: (threshold, values["triton"]) for name, threshold, values in report.targets(summary, records, "cuda")}
    assert rows["layers: geomean_vs_cudnn"] == (1.15, 1.2)
    assert rows["add_relu: lowest fraction of copy bandwidth"] == (0.9, 0.8)
    assert rows["resnet50@256: speedup vs cudnn"] == (1.3, pytest.approx(1.35))
    assert rows["resnet50@256: images/s"] == (26500, 27000.0)
    assert "vgg16@256: speedup vs cudnn" not in rows  # not measured: not listed
    table = report.targets_markdown(report.targets(summary, records, "cuda"))
    assert "| layers: geomean_vs_cudnn | 1.15 | 1.2 met |" in table
    assert "| add_relu: lowest fraction of copy bandwidth | 0.9 | 0.8 **missed by 0.1** |" in table


def _model_record(name, contender, memory_mib, dtype="bfloat16"):
    return {"section": "model", "name": name, "model": name.split("@")[0], "op": "model", "count": 1,
            "dtype": dtype, "batch": int(name.split("@")[1]), "contender": contender, "status": "ok",
            "ms_p20": 9.0, "ms_p50": 10.0, "ms_p80": 11.0, "images_per_second": 100.0, "first_call_s": 0.1,
            "rel_error": 1e-3, "flops": 1e9, "min_bytes": 1e6, "roofline_ms": 1.0, "roofline_fraction": 0.1,
            "forward_memory_mib": memory_mib}


def test_model_memory_shows_in_the_table_csv_and_readme(tmp_path):
    """GPU runs measure each model's forward memory (runner.forward_memory_mib); CPU runs do not,
    and then no memory table is printed."""
    records = [_model_record("resnet50@256", "cudnn", 4096.0), _model_record("resnet50@256", "cuda", 3072.4),
               _model_record("resnet50@256", "triton", None), _model_record("resnet50@1", "cuda", 35.0)]
    headers, rows = report.model_memory_table(records)
    assert headers == ["model@batch dtype", "cudnn", "cuda"]
    assert rows == [["resnet50@256 bfloat16", "4,096", "3,072"], ["resnet50@1 bfloat16", "", "35"]]
    assert report.MODEL_MEMORY_TITLE in report.tables(records, "cuda")
    assert report.model_memory_table([dict(r, forward_memory_mib=None) for r in records]) is None
    assert report.MODEL_MEMORY_TITLE not in report.tables([dict(r, forward_memory_mib=None) for r in records], "cuda")

    env = dict.fromkeys(("torch", "triton", "cudnn", "commit"), "x")
    report.write_csv(tmp_path / "r.csv", records, env)
    memory_rows = [line for line in (tmp_path / "r.csv").read_text().splitlines() if ",forward_memory_mib," in line]
    assert len(memory_rows) == 3 and any(",3072.4," in line for line in memory_rows)
