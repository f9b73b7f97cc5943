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
    (out / "0-older.json").unlink()


def test_train_is_not_implemented_yet(capsys):
    assert cli.main(["--train"]) == 2
    assert "not implemented yet" in capsys.readouterr().err


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
