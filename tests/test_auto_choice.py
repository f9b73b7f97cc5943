""""auto" per layer class: the classes, the table derived from benchmark results, and select()."""
import json
from pathlib import Path

import pytest
import torch

import cnnkernels
from cnnkernels import auto_choice, backends
from cnnkernels._args import conv_call
from cnnkernels.bench import auto_choice as derive_tool

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("c, kernel, groups, kind", [(3, (7, 7), 1, "stem"), (64, (1, 1), 1, "1x1"),
                                                     (64, (3, 3), 1, "kxk"), (64, (1, 5), 1, "kxk"),
                                                     (32, (3, 3), 32, "depthwise"), (64, (3, 3), 2, "grouped")])
def test_conv_kind(c, kernel, groups, kind):
    assert auto_choice.conv_kind(c, kernel, groups) == kind


def _results(device, records, gpu_tests=None):
    return {"meta": {"config": {"device": device}}, "summary": {"gpu_tests": gpu_tests or {}},
            "records": [{**dict(section="layer", status="ok", batch=64, dtype="bfloat16", op="conv2d_relu"), **r}
                        for r in records]}


def test_derive_orders_backends_faster_than_pytorch_by_geomean():
    one_by_one = ["resnet50 64>256 1x1 @56 (ds)", "resnet50 256>64 1x1 @56"]
    records = [dict(name=n, contender=c, ms_p50=ms) for n in one_by_one
               for c, ms in (("cudnn", 1.0), ("cuda", 0.8), ("triton", 0.9))]
    records += [dict(name="vgg16 64>64 3x3 @224", contender=c, ms_p50=ms)
                for c, ms in (("cudnn", 1.0), ("cuda", 1.1), ("triton", 0.95))]
    records += [dict(name="resnet50 add_relu 256x56x56", op="add_relu", contender=c, ms_p50=ms)
                for c, ms in (("cudnn", 1.0), ("cuda", 1.2), ("triton", 1.3))]
    records.append(dict(name="vgg16 64>64 3x3 @224", contender="cuda", ms_p50=0.1, status="error"))
    device, table, note = derive_tool.derive(_results("cuda", records, {"passed": 10, "failed": 0}))
    assert device == "cuda" and not note
    assert table == {"conv:bfloat16:1x1": ["cuda", "triton"], "conv:bfloat16:kxk": ["triton"],
                     "add_relu:bfloat16": []}


def test_derive_on_a_cpu_keeps_ours_within_the_noise():
    def records(name, ours_ms):
        return [dict(name=name, contender="eager", ms_p50=1.0, dtype="float32"),
                dict(name=name, contender="cuda", ms_p50=ours_ms, dtype="float32")]
    results = _results("cpu", records("vgg16 64>64 3x3 @224", 1.03) + records("resnet50 256>64 1x1 @56", 1.15))
    _, table, _ = derive_tool.derive(results)
    assert table == {"conv:float32:kxk": ["cuda"], "conv:float32:1x1": []}


def test_derive_trusts_no_backend_when_gpu_tests_failed():
    records = [dict(name="vgg16 64>64 3x3 @224", contender=c, ms_p50=ms) for c, ms in (("cudnn", 1.0), ("cuda", 0.5))]
    for tests in ({"passed": 10, "failed": 1}, {"passed": 0, "failed": 0}):
        _, table, note = derive_tool.derive(_results("cuda", records, tests))
        assert table == {} and "no backend is verified" in note


def test_committed_table_follows_its_results_files():
    committed = json.loads(auto_choice.TABLE_PATH.read_text())
    for device, sources in committed["sources"].items():
        derived_device, table, _ = derive_tool.derive_all([ROOT / source for source in sources])
        assert derived_device == device and committed["devices"][device] == table


def test_results_files_join_and_may_not_both_measure_a_class(tmp_path):
    def results_file(name, dtype, device="cpu"):
        records = [dict(name="vgg16 64>64 3x3 @224", contender="eager", ms_p50=1.0, dtype=dtype),
                   dict(name="vgg16 64>64 3x3 @224", contender="cuda", ms_p50=0.5, dtype=dtype)]
        path = tmp_path / name
        path.write_text(json.dumps(_results(device, records)))
        return path

    fp32, bf16 = results_file("fp32.json", "float32"), results_file("bf16.json", "bfloat16")
    device, table, _ = derive_tool.derive_all([fp32, bf16])
    assert device == "cpu" and table == {"conv:bfloat16:kxk": ["cuda"], "conv:float32:kxk": ["cuda"]}
    with pytest.raises(ValueError, match="conv:float32:kxk is measured in both"):
        derive_tool.derive_all([fp32, results_file("again.json", "float32")])
    with pytest.raises(ValueError, match="one device type"):
        derive_tool.derive_all([fp32, results_file("gpu.json", "bfloat16", device="cuda")])


@pytest.mark.parametrize("listed, expected", [(["cuda"], "cuda"), ([], "torch"), (None, backends.AUTO_ORDER["cpu"][0])])
def test_auto_follows_the_table_for_the_calls_class(monkeypatch, listed, expected):
    table = {} if listed is None else {"cpu": {"conv:float32:kxk": listed}}
    monkeypatch.setattr(auto_choice, "_table", lambda: table)
    call = conv_call("conv2d_relu", torch.randn(1, 16, 6, 6), torch.randn(8, 16, 3, 3), None, 1, 1, 1, 1)
    assert auto_choice.conv_class(call) == "conv:float32:kxk"
    with cnnkernels.use_backend("auto"):
        chosen = backends.select("conv2d_relu", call.input.device, lambda b: b.conv_unsupported(call),
                                 lambda: auto_choice.conv_class(call))
    assert chosen.name == expected
