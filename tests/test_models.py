"""cnnkernels.models against torchvision: state_dict keys, parameter counts, MACs, and outputs with
the same weights in eval mode (BN folded, fused ops) and train mode (a few SGD steps)."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import cnnkernels
import cnnkernels.models as M
from cnnkernels.models._layers import conv_unit
from conftest import assert_matches_reference, cpu_conv_runs_in_fp32, cuda_or_skip

tvm = pytest.importorskip("torchvision.models")

ZOO = ["alexnet", "vgg11", "vgg11_bn", "vgg13", "vgg13_bn", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn",
       "resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
       "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]


# ---------------------------------------------------------------- helpers (test_fuse.py uses them too)

def randomize_(model, seed=0):
    """Fill every parameter and buffer with non-trivial values, quickly (one pass, no default init).

    Convs and linears get He-scaled normal weights and small random biases; each BatchNorm gets
    running statistics, scale and shift far from the identity, so folding mistakes show.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.normal_(0, math.sqrt(2.0 / m.weight[0].numel()), generator=g)
                if m.bias is not None:
                    m.bias.normal_(0, 0.1, generator=g)
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.2, generator=g)
                if m.track_running_stats:
                    m.running_mean.normal_(0, 0.2, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
                    m.num_batches_tracked.zero_()
    return model


def build(factory, seed=0, **kwargs):
    """factory(**kwargs) built on the meta device (no default init), then randomized on the CPU."""
    with torch.device("meta"):
        model = factory(**kwargs)
    return randomize_(model.to_empty(device="cpu"), seed)


def torchvision_twin(name, state, dtype=None, **kwargs):
    """torchvision's model `name` holding `state` (the tensors themselves unless dtype converts them)."""
    with torch.device("meta"):
        model = getattr(tvm, name)(**kwargs)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, assign=True)
    return model


def assert_close_to_torchvision(ours, theirs32, theirs64, x):
    """The project's tolerance rule: error vs float64 at most 2× torchvision's own fp32 error + floor."""
    with torch.no_grad():
        out, ref32, ref64 = ours(x), theirs32(x), theirs64(x.double())
    assert_matches_reference(out, ref64, ref32)


# ---------------------------------------------------------------- structure

@pytest.mark.parametrize("name", ZOO)
def test_state_dict_keys_shapes_and_param_count_match_torchvision(name):
    with torch.device("meta"):
        ours, theirs = getattr(M, name)(), getattr(tvm, name)()
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    assert all(ours_sd[k].shape == theirs_sd[k].shape for k in ours_sd)
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert count == tvm.get_model_weights(name).DEFAULT.meta["num_params"]


def test_known_parameter_counts():
    with torch.device("meta"):
        assert sum(p.numel() for p in M.resnet50().parameters()) == 25_557_032
        assert sum(p.numel() for p in M.vgg16().parameters()) == 138_357_544
        assert sum(p.numel() for p in M.lenet5().parameters()) == 61_706
        assert sum(p.numel() for p in M.lenet5(num_classes=5, in_channels=3).parameters()) == 61_581


@pytest.mark.parametrize("name", ["resnet18", "alexnet"])
def test_same_seed_gives_torchvision_initial_weights(name):
    torch.manual_seed(1)
    ours = getattr(M, name)(num_classes=10)
    torch.manual_seed(1)
    theirs = getattr(tvm, name)(num_classes=10)
    theirs_sd = theirs.state_dict()
    assert all(torch.equal(v, theirs_sd[k]) for k, v in ours.state_dict().items())


def test_constructor_arguments_like_torchvision():
    model = M.resnet18(num_classes=7, zero_init_residual=True)
    assert model.fc.out_features == 7
    assert all(b.bn2.weight.count_nonzero() == 0 for layer in (model.layer1, model.layer4) for b in layer)
    with torch.device("meta"):
        assert M.vgg11(dropout=0.2, num_classes=3).classifier[2].p == 0.2
        assert M.alexnet(dropout=0.3).classifier[0].p == 0.3
        assert M.resnext50_32x4d().layer1[0].conv2.groups == 32
        assert M.resnet50(replace_stride_with_dilation=[False, True, True]).layer4[1].conv2.dilation == (4, 4)
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1"):
        M.resnet18(groups=2)


def test_weights_from_state_dict_path_or_enum(tmp_path):
    source = build(M.resnet18, num_classes=10)
    path = tmp_path / "r18.pth"
    torch.save(source.state_dict(), path)
    for weights in (source.state_dict(), path, str(path)):
        loaded = M.resnet18(weights=weights, num_classes=10)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())

    class FakeEnum:  # the part of torchvision's WeightsEnum the constructors use
        meta = {"categories": [str(i) for i in range(10)]}

        def get_state_dict(self, progress, check_hash):
            return source.state_dict()

    assert M.resnet18(weights=FakeEnum()).fc.out_features == 10
    with pytest.raises(RuntimeError, match="size mismatch"):
        M.resnet18(weights=path)  # 1000 classes: torchvision's strict loading complains
    with pytest.raises(TypeError, match="weights must be"):
        M.resnet18(weights=3)


# ---------------------------------------------------------------- eval mode: BN folded, fused ops

CL = torch.channels_last
EVAL_CASES = [  # (name, input shape, memory format): small inputs, as AdaptiveAvgPool makes any size work
    ("alexnet", (1, 3, 64, 64), CL),
    ("vgg11", (1, 3, 32, 32), None),
    ("vgg11_bn", (2, 3, 32, 32), CL),
    ("vgg16_bn", (1, 3, 32, 32), None),
    ("resnet18", (2, 3, 64, 64), CL),
    ("resnet34", (1, 3, 32, 32), None),
    ("resnet50", (2, 3, 32, 32), CL),
    ("resnet101", (1, 3, 16, 16), None),
    ("resnet152", (1, 3, 16, 16), None),
    ("resnext50_32x4d", (1, 3, 32, 32), CL),
    ("wide_resnet50_2", (1, 3, 16, 16), None),
]


@pytest.mark.parametrize("name,shape,memory_format", EVAL_CASES)
def test_eval_outputs_match_torchvision(name, shape, memory_format):
    ours = build(getattr(M, name), num_classes=10).eval()
    state = ours.state_dict()
    theirs32 = torchvision_twin(name, state, num_classes=10).eval()
    theirs64 = torchvision_twin(name, state, torch.float64, num_classes=10).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    assert_close_to_torchvision(ours, theirs32, theirs64, x)


def test_eval_lenet5_matches_its_reference_mode_in_float64():
    ours = build(M.lenet5).eval()
    x = torch.randn(3, 1, 32, 32)
    with torch.no_grad():
        out = ours(x)
        with M.reference_mode():
            ref32 = ours(x)
            ref64 = build(M.lenet5).double().eval()(x.double())
    assert_matches_reference(out, ref64, ref32)


def test_eval_calls_the_fused_ops_not_the_modules(monkeypatch):
    calls = []
    for op in ("conv2d_relu", "conv2d_add_relu", "add_relu"):
        real = getattr(cnnkernels, op)
        monkeypatch.setattr(cnnkernels, op, lambda *a, real=real, op=op, **k: calls.append(op) or real(*a, **k))
    model = build(M.resnet18).eval()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls.count("conv2d_relu") == 9 and calls.count("conv2d_add_relu") == 8 and "add_relu" not in calls
    calls.clear()
    model.train()(torch.randn(2, 3, 32, 32))
    assert calls.count("add_relu") == 8 and calls.count("conv2d_relu") == 0  # BN sits between conv and ReLU
    calls.clear()
    build(M.vgg11).train()(torch.randn(1, 3, 32, 32))
    assert calls.count("conv2d_relu") == 8


def test_folded_weights_are_cached_and_refolded_when_anything_changes(monkeypatch):
    import cnnkernels.models._layers as layers

    folds = []
    real = layers.fold_conv_bn
    monkeypatch.setattr(layers, "fold_conv_bn", lambda *a: folds.append(1) or real(*a))
    ours = build(M.resnet18, num_classes=10).eval()
    theirs = torchvision_twin("resnet18", ours.state_dict(), num_classes=10).eval()  # shares the tensors
    x = torch.randn(2, 3, 32, 32)

    def check():
        with torch.no_grad():
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)

    check()
    assert len(folds) == 20  # every conv–BN pair of ResNet-18
    check()
    assert len(folds) == 20  # nothing changed: all from the cache
    with torch.no_grad():
        ours.layer2[0].bn1.running_var.mul_(3)
        ours.layer3[1].conv2.weight.mul_(-1)
    check()
    assert len(folds) == 22
    ours.load_state_dict(build(M.resnet18, seed=5, num_classes=10).state_dict())  # copy_ into the same tensors
    check()
    ours.train()(torch.randn(4, 3, 32, 32))  # updates the running statistics in place
    ours.eval()
    check()
    # eval-mode fine-tuning with a fused optimizer, which writes without bumping version counters
    opt = torch.optim.SGD(ours.parameters(), lr=0.1, fused=True)
    ours(x).square().mean().backward()
    opt.step()
    check()
    ours.double()
    theirs.double()
    with torch.no_grad():
        assert ours(x.double()).dtype == torch.float64
        torch.testing.assert_close(ours(x.double()), theirs(x.double()))


def test_eval_gradients_reach_conv_and_bn_parameters_like_torchvision():
    """Every parameter's gradient through the folded BN meets the tolerance rule against
    torchvision's float64 gradient, as torchvision's own float32 gradient does."""
    ours = build(M.resnet18, num_classes=10).eval()
    state = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs = torchvision_twin("resnet18", state, num_classes=10).eval()
    theirs64 = torchvision_twin("resnet18", state, dtype=torch.float64, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for model, inp in ((ours, x), (theirs, x), (theirs64, x.double())):
        model(inp).square().mean().backward()
    grads, grads64 = dict(theirs.named_parameters()), dict(theirs64.named_parameters())
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        assert_matches_reference(p.grad, grads64[name].grad, grads[name].grad)


# ---------------------------------------------------------------- train mode

@pytest.mark.parametrize("name,shape,steps", [("resnet18", (4, 3, 32, 32), 3), ("vgg11", (2, 3, 32, 32), 2),
                                              ("vgg11_bn", (2, 3, 32, 32), 1), ("alexnet", (2, 3, 64, 64), 2)])
def test_sgd_steps_match_torchvision(name, shape, steps):
    """SGD steps in train mode (batch statistics, dropout with the same draws): same losses, running
    statistics and weights as torchvision's model. VGG's and AlexNet's two big FC layers (over 50M
    weights) stay frozen, in both models, to keep the CPU time small; all convs train."""
    ours = build(getattr(M, name), num_classes=10).train()
    theirs = torchvision_twin(name, {k: v.clone() for k, v in ours.state_dict().items()}, num_classes=10).train()
    for model in (ours, theirs):
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.out_features == 4096:
                m.requires_grad_(False)
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(shape, generator=g), torch.randint(0, 10, (shape[0],), generator=g))
               for _ in range(steps)]
    losses = {}
    for label, model in (("ours", ours), ("theirs", theirs)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        torch.manual_seed(4)  # the dropout draws
        losses[label] = []
        for x, y in batches:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses[label].append(loss.item())
    torch.testing.assert_close(losses["ours"], losses["theirs"], rtol=1e-4, atol=1e-5)
    theirs_sd = theirs.state_dict()
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, theirs_sd[k], rtol=1e-3, atol=1e-5, msg=k)


# ---------------------------------------------------------------- summary and conv_layers

@pytest.mark.parametrize("name", ZOO)
def test_summary_matches_torchvision_tables(name):
    with torch.device("meta"):
        model = getattr(M, name)()
    s = M.summary(model, (3, 224, 224))
    meta = tvm.get_model_weights(name).DEFAULT.meta
    assert s.total_params == meta["num_params"]
    decimals = len(str(meta["_ops"]).split(".")[1])
    assert round(s.total_macs / 1e9, decimals) == meta["_ops"]


def test_summary_rows_and_table():
    model = M.resnet50()
    s = M.summary(model, (3, 224, 224))
    assert s.total_macs == 4_089_184_256 and s.total_params == 25_557_032
    assert round(M.summary(M.vgg16(), (3, 224, 224)).total_macs / 1e9, 2) == 15.47
    rows = {r.name: r for r in s.rows}
    assert rows["conv1"].output_shape == (1, 64, 112, 112) and rows["conv1"].macs == 64 * 112 * 112 * 3 * 49
    assert rows["layer4.2.conv3"].output_shape == (1, 2048, 7, 7)
    assert rows["fc"].macs == 2048 * 1000 and rows["fc"].params == 2048 * 1000 + 1000
    assert sum(r.params for r in s.rows) == s.total_params
    assert M.summary(model, (8, 3, 224, 224)).total_macs == 8 * s.total_macs
    text = str(s)
    assert "layer3.5.bn3" in text and "4,089,184,256" in text and "25,557,032" in text
    tv = tvm.resnet50()
    assert M.summary(tv, (3, 224, 224)).total_macs == s.total_macs
    assert next(model.parameters()).device.type == "cpu"  # the model itself was not moved or run


def test_conv_layers_resnet50():
    with torch.device("meta"):
        model = M.resnet50()
    layers = M.conv_layers(model, (3, 224, 224))
    assert sum(l["count"] for l in layers) == 53
    assert sum(l["count"] for l in layers if l["has_residual"]) == 16
    assert sum(l["count"] for l in layers if l["relu"] and not l["has_residual"]) == 33
    assert sum(l["count"] for l in layers if not l["relu"]) == 4  # the downsample convs
    assert sum(l["count"] * l["macs"] for l in layers) == 4_089_184_256 - 2048 * 1000
    stem = next(l for l in layers if l["R"] == 7)
    assert stem == dict(C=3, K=64, H=224, W=224, P=112, Q=112, R=7, S=7, stride=(2, 2), padding=(3, 3),
                        dilation=(1, 1), groups=1, relu=True, has_residual=False, count=1, names=["conv1"],
                        macs=64 * 112 * 112 * 3 * 49)
    tail = next(l for l in layers if "layer1.1.conv3" in l["names"])
    assert (tail["C"], tail["K"], tail["H"], tail["R"], tail["count"]) == (64, 256, 56, 1, 3) and tail["has_residual"]
    assert len(layers) == len({tuple((k, v) for k, v in l.items() if k not in ("count", "names")) for l in layers})
    with torch.device("meta"):
        tv = tvm.resnet50()
    def canonical(layers):
        return sorted(repr({k: v for k, v in l.items() if k != "names"}) for l in layers)

    assert canonical(M.conv_layers(tv, (3, 224, 224))) == canonical(layers)


def test_conv_layers_vgg16():
    with torch.device("meta"):
        layers = M.conv_layers(M.vgg16_bn(), (1, 3, 224, 224))
    assert sum(l["count"] for l in layers) == 13 and all(l["relu"] and not l["has_residual"] for l in layers)
    assert {(l["C"], l["K"], l["H"]) for l in layers if l["count"] > 1} == {(256, 256, 56), (512, 512, 28),
                                                                          (512, 512, 14)}
    assert next(l for l in layers if l["H"] == 14)["count"] == 3


# ---------------------------------------------------------------- GPU, bf16

@pytest.mark.gpu
@pytest.mark.parametrize("name,shape,kwargs", [("resnet50", (8, 3, 64, 64), {}), ("resnet18", (8, 3, 64, 64), {}),
                                               ("vgg16_bn", (4, 3, 64, 64), {"dropout": 0.0})])
def test_bf16_cuda_eval_and_train_match_torchvision(name, shape, kwargs):
    """bf16, channels_last: eval mode (folded BN, fused ops) and a train-mode forward (batch-statistics
    BN; no dropout, whose CUDA masks may depend on the dtype)."""
    cuda_or_skip()
    kwargs["num_classes"] = 10
    ours = build(getattr(M, name), **kwargs).cuda()
    state = ours.state_dict()
    theirs64 = torchvision_twin(name, state, torch.float64, **kwargs).eval()
    ours.to(torch.bfloat16, memory_format=torch.channels_last).eval()
    theirs = torchvision_twin(name, {k: v.clone() for k, v in ours.state_dict().items()}, **kwargs)
    theirs.to(memory_format=torch.channels_last).eval()
    x = torch.randn(shape, device="cuda").contiguous(memory_format=torch.channels_last)
    assert_close_to_torchvision(ours, theirs, theirs64, x.bfloat16())
    ours.train()
    theirs.train()
    torch.manual_seed(0)
    out = ours(x.bfloat16())
    torch.manual_seed(0)
    ref = theirs(x.bfloat16())
    with torch.no_grad():
        ref64 = torchvision_twin(name, {k: v.double() for k, v in state.items()}, **kwargs).train()
        torch.manual_seed(0)
        ref64 = ref64(x.double())
    assert_matches_reference(out.detach(), ref64, ref.detach())


def _fp32_route_or_f_conv2d(x, weight, bias, dtype, **args):
    """What a plain 16-bit unit conv must compute: in fp32, rounded once, where the C++ ops do so."""
    if cpu_conv_runs_in_fp32(dtype):
        return F.conv2d(x.float(), weight.float(), bias.float(), **args).to(dtype)
    return F.conv2d(x, weight, bias, **args)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_plain_16_bit_cpu_convs_run_as_the_fused_ops_do(dtype):
    """A unit without ReLU (ResNet's downsample conv) is F.conv2d, not one of our ops: in a 16-bit
    dtype that the C++ ops compute in fp32 on this CPU (F.conv2d's fallback there is 8-40x slower)
    it is computed in fp32 and rounded once too, else F.conv2d as it is; in the input's layout."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1, stride=2).to(dtype)
    x = torch.randn(2, 8, 10, 10).to(dtype).contiguous(memory_format=torch.channels_last)
    out = conv_unit(x, conv)
    fp32 = F.conv2d(x.float(), conv.weight.float(), conv.bias.float(), stride=2)
    expected = _fp32_route_or_f_conv2d(x, conv.weight, conv.bias, dtype, stride=2)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, expected)
    assert (out.float() - fp32).abs().max() <= fp32.abs().max() * 2**-7  # within one 16-bit rounding


class _ConvDtypes(TorchDispatchMode):
    """Records the input dtype of each aten.convolution that runs under it."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten.convolution.default:
            self.seen.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_plain_16_bit_cpu_convs_under_autocast_run_as_the_fused_ops_do(dtype):
    """Under autocast the downsample conv rounds fp32 operands to autocast's dtype as F.conv2d does
    there, then takes the same route as above (autocast must not send the fp32 conv back to 16 bits);
    gradients reach the fp32 parameters in fp32."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 1, stride=2)
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=dtype):
        with _ConvDtypes() as conv_dtypes:
            out = conv_unit(x, conv)
        theirs = conv(x)
    # The outputs alone cannot tell: ATen's 16-bit fallback also sums in fp32 and rounds once.
    assert conv_dtypes.seen == [torch.float32 if cpu_conv_runs_in_fp32(dtype) else dtype]
    rounded = [t.detach().to(dtype) for t in (x, conv.weight, conv.bias)]
    assert out.dtype == theirs.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, _fp32_route_or_f_conv2d(*rounded, dtype, stride=2))
    assert (out.float() - theirs.float()).abs().max() <= theirs.float().abs().max() * 2**-6
    out.float().sum().backward()
    assert conv.weight.grad.dtype == torch.float32 and conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_train_mode_16_bit_cpu_convs_before_batch_norm_run_as_the_fused_ops_do(dtype):
    """In train mode the conv before BatchNorm is a plain conv too: the same route, forward and
    backward, so its gradients match the fp32 computation rounded to the dtype."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1).to(dtype), nn.BatchNorm2d(16).to(dtype).train()
    x = torch.randn(2, 8, 10, 10).to(dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    grad = torch.randn(2, 16, 10, 10).to(dtype)
    out = conv_unit(x, conv, bn)
    out.backward(grad)

    x_ref, w_ref, b_ref = (t.detach().clone().requires_grad_() for t in (x, conv.weight, conv.bias))
    bn_ref = nn.BatchNorm2d(16).to(dtype).train()
    y_ref = _fp32_route_or_f_conv2d(x_ref, w_ref, b_ref, dtype, padding=1)
    out_ref = bn_ref(y_ref)
    out_ref.backward(grad)
    assert out.dtype == dtype and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, out_ref)
    for ours, ref in ((x.grad, x_ref.grad), (conv.weight.grad, w_ref.grad), (conv.bias.grad, b_ref.grad)):
        assert ours.dtype == dtype and torch.equal(ours, ref)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("block", ["BasicBlock", "Bottleneck"])
def test_zoo_resnets_trace_with_fullgraph(block, mode):
    """A zoo ResNet (one block per stage) compiles without graph breaks, eval (folded BN, fused ops)
    and train (BN, add_relu): output and every gradient as in eager."""
    from cnnkernels.models import resnet
    torch.manual_seed(0)
    model = resnet.ResNet(getattr(resnet, block), [1, 1, 1, 1], num_classes=10).to(memory_format=torch.channels_last)
    getattr(model, mode)()
    twin = copy.deepcopy(model)
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    out = torch.compile(twin, fullgraph=True, backend="aot_eager")(x)
    out.square().sum().backward()
    expected = model(x)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    for traced, eager in zip(twin.parameters(), model.parameters()):
        torch.testing.assert_close(traced.grad, eager.grad, rtol=1e-5, atol=1e-5)


def test_plain_cpu_convs_under_autocast_trace_with_fullgraph():
    """The autocast check and the autocast-off region of the plain conv trace without graph breaks
    (train mode: conv, then BatchNorm); loss and gradient as in eager."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16).train()
    x = torch.randn(2, 8, 10, 10).contiguous(memory_format=torch.channels_last)

    def loss(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return conv_unit(x, conv, bn).float().square().sum()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        out = fn(x)
        out.backward()  # before the next forward: train-mode BN updates its running statistics in place
        results.append((out.detach(), conv.weight.grad))
        conv.weight.grad = None
    (eager, eager_grad), (traced, traced_grad) = results
    assert torch.equal(traced, eager) and torch.equal(traced_grad, eager_grad)
