"""cnnkernels.fuse(): same outputs as the original model, fewer kernels, nothing unproven rewritten."""
import pytest
import torch
import torch.nn as nn

import cnnkernels
import cnnkernels.models as M
from cnnkernels.fuse import fold_conv_bn, fuse
from cnnkernels.nn import Conv2dAddReLU
from conftest import assert_matches_reference, cuda_or_skip
from test_models import build, randomize_, torchvision_twin

tvm = pytest.importorskip("torchvision.models")

TORCHVISION_CASES = [  # (name, input shape, constructor arguments, expected (folded BNs, relu, add_relu) counts)
    ("resnet18", (2, 3, 64, 64), {}, (20, 9, 8)),
    ("resnet50", (1, 3, 64, 64), {}, (53, 33, 16)),
    ("vgg11_bn", (1, 3, 32, 32), {}, (8, 8, 0)),
    ("alexnet", (1, 3, 64, 64), {}, (0, 5, 0)),
    ("resnext50_32x4d", (1, 3, 32, 32), {}, (53, 33, 16)),
    ("wide_resnet50_2", (1, 3, 32, 32), {}, (53, 33, 16)),
    ("mobilenet_v2", (1, 3, 64, 64), {}, (52, 0, 0)),            # ReLU6 stays; every BN follows a conv
    ("densenet121", (1, 3, 64, 64), {}, (59, 59, 0)),            # stem and the 1×1 bottlenecks only
    ("googlenet", (1, 3, 64, 64), {"aux_logits": False, "init_weights": False}, (57, 57, 0)),
]


def counts(report):
    return (sum(f.bn is not None for f in report.fused), sum(f.epilogue == "relu" for f in report.fused),
            sum(f.epilogue == "add_relu" for f in report.fused))


@pytest.mark.parametrize("name,shape,kwargs,expected", TORCHVISION_CASES)
def test_fused_torchvision_model_matches_original(name, shape, kwargs, expected):
    model = build(getattr(tvm, name), num_classes=10, **kwargs).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fused, report = fuse(model, report=True)
    assert counts(report) == expected, str(report)
    assert not fused.training
    model64 = torchvision_twin(name, model.state_dict(), torch.float64, num_classes=10, **kwargs).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_matches_reference(fused(x), model64(x.double()), model(x))
    # the original is untouched: same modules, same values, no storage shared with the fused copy
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) >= expected[0]
    originals = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in originals for p in fused.parameters())


def test_resnet50_has_no_batchnorm_left_and_one_kernel_per_conv():
    model = build(tvm.resnet50).eval()
    fused = fuse(model)
    kinds = [type(m) for m in fused.modules()]
    assert nn.BatchNorm2d not in kinds
    assert kinds.count(cnnkernels.nn.Conv2dReLU) == 33
    assert kinds.count(Conv2dAddReLU) == 16
    assert kinds.count(nn.Conv2d) == 4  # the downsample convs, BN folded, no ReLU after them
    assert nn.ReLU not in kinds
    # summary() and conv_layers() read fused models too (on the meta device, through the fused ops)
    assert M.summary(fused, (3, 224, 224)).total_macs == 4_089_184_256

    def canonical(layers):
        return sorted(repr({k: v for k, v in l.items() if k != "names"}) for l in layers)

    assert canonical(M.conv_layers(fused, (3, 224, 224))) == canonical(M.conv_layers(model, (3, 224, 224)))


def test_fused_model_calls_the_fused_ops(monkeypatch):
    calls = []
    for op in ("conv2d_relu", "conv2d_add_relu"):
        real = getattr(cnnkernels, op)
        counted = lambda *a, real=real, op=op, **k: calls.append(op) or real(*a, **k)  # noqa: E731
        monkeypatch.setattr(cnnkernels, op, counted)
        monkeypatch.setattr(cnnkernels.functional, op, counted)  # what cnnkernels.nn's modules call
    fused = fuse(build(tvm.resnet18).eval())
    with torch.no_grad():
        fused(torch.randn(1, 3, 32, 32))
    assert calls.count("conv2d_relu") == 9 and calls.count("conv2d_add_relu") == 8


def test_fuse_refuses_train_mode_and_non_modules():
    model = build(tvm.resnet18)
    with pytest.raises(ValueError, match="eval mode"):
        fuse(model)
    model.eval()
    model.layer1[0].bn1.train()
    with pytest.raises(ValueError, match="eval mode"):
        fuse(model)
    with pytest.raises(TypeError, match="nn.Module"):
        fuse(lambda x: x)


def test_inplace_reuses_the_original_modules():
    model = build(tvm.resnet18).eval()
    fc = model.fc
    fused = fuse(model, inplace=True)
    assert fused.fc is fc
    assert fused.get_submodule("layer1.0.conv1").weight is not model.layer1[0].conv1.weight  # folded
    assert isinstance(fuse(model), nn.Module)


def test_fuse_the_cnnkernels_zoo():
    ours = build(M.resnet50, num_classes=10).eval()
    fused, report = fuse(ours, report=True)
    assert counts(report) == (53, 33, 16)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), ours(x), rtol=1e-4, atol=1e-4)


def test_fold_conv_bn_in_float64_keeps_dtype_and_layout():
    conv = nn.Conv2d(4, 8, 3, bias=False).to(torch.bfloat16).to(memory_format=torch.channels_last)
    bn = randomize_(nn.Sequential(nn.BatchNorm2d(8, eps=1e-3))).eval()[0]
    with torch.no_grad():
        weight, bias = fold_conv_bn(conv.weight, None, bn)
    assert weight.dtype == bias.dtype == torch.bfloat16
    assert weight.is_contiguous(memory_format=torch.channels_last)
    scale = bn.weight.double() / (bn.running_var.double() + 1e-3).sqrt()
    expected = (conv.weight.double() * scale.view(-1, 1, 1, 1)).to(torch.bfloat16)
    assert torch.equal(weight, expected)  # rounded once, from float64
    assert torch.equal(bias, (bn.bias.double() - bn.running_mean.double() * scale).to(torch.bfloat16))


# ---------------------------------------------------------------- what must be left alone

class Untraceable(nn.Module):
    """Data-dependent control flow at the top: torch.fx cannot trace it, but its children can be fused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(inplace=True))
        self.block = tvm.resnet.BasicBlock(64, 64)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:
            x = self.block(x)
        return x


class Awkward(nn.Module):
    """Each pattern here looks fusable but is not equivalent (or not provably so) when rewritten."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Conv2d(8, 8, 3, padding=1)           # called twice: its BN cannot be folded into it
        self.bn_shared = nn.BatchNorm2d(8)
        self.conv_two_users = nn.Conv2d(8, 8, 1)
        self.bn_two_users = nn.BatchNorm2d(8)
        self.conv_no_stats = nn.Conv2d(8, 8, 1)
        self.bn_no_stats = nn.BatchNorm2d(8, track_running_stats=False)
        self.conv_relu6 = nn.Conv2d(8, 8, 1)
        self.relu6 = nn.ReLU6()
        self.bn_first = nn.BatchNorm2d(8)                      # BN before a conv (DenseNet style)
        self.conv_after_bn = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_broadcast = nn.Conv2d(8, 8, 1)              # its add broadcasts: fused with a safe fallback
        self.offset = nn.Parameter(torch.randn(1, 8, 1, 1))
        self.conv_reflect = nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        x = torch.relu(self.bn_shared(self.shared(x))) + self.shared(x)
        y = self.conv_two_users(x)
        x = torch.relu(self.bn_two_users(y)) + y
        x = self.bn_no_stats(self.conv_no_stats(x))
        x = self.relu6(self.conv_relu6(x))
        x = self.conv_after_bn(torch.relu(self.bn_first(x)))
        x = torch.relu(self.conv_broadcast(x) + self.offset)
        return torch.nn.functional.relu(self.conv_reflect(x), inplace=True)


def test_untraceable_model_is_fused_child_by_child():
    model = randomize_(Untraceable()).eval()
    fused, report = fuse(model, report=True)
    assert any(where == "<model>" and "cannot trace" in why for where, why in report.skipped)
    assert {f.name for f in report.fused} == {"stem.0", "block.conv1", "block.conv2"}
    assert isinstance(fused.stem.get_submodule("0"), cnnkernels.nn.Conv2dReLU)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
        assert fused(x - 10).shape == model(x - 10).shape  # the other branch still works


def test_leaves_alone_what_it_cannot_prove_equivalent():
    model = randomize_(Awkward()).eval()
    fused, report = fuse(model, report=True)
    why = {where: reason for where, reason in report.skipped}
    assert "called 2 times" in why["bn_shared"]
    assert "2 users" in why["bn_two_users"]
    assert "no running statistics" in why["bn_no_stats"]
    assert "ReLU6" in why["relu6"]
    assert "not a Conv2d" in why["bn_first"]
    assert {f.name: f.epilogue for f in report.fused} == {"conv_broadcast": "add_relu", "conv_reflect": "relu"}
    kinds = {name: type(m) for name, m in fused.named_modules()}
    assert kinds["bn_shared"] is kinds["bn_two_users"] is kinds["bn_first"] is nn.BatchNorm2d
    x = torch.randn(2, 8, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-4)
    print(report)  # readable
    assert "left alone" in str(report) and "conv_broadcast" in str(report)


def test_in_place_add_into_the_residual_is_not_fused():
    class AddIntoIdentity(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x):
            identity = x * 2
            identity += self.conv(x)   # writes into identity, which is returned too
            return torch.relu(identity), identity

    model = randomize_(AddIntoIdentity()).eval()
    fused, report = fuse(model, report=True)
    assert report.fused == []
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        for a, b in zip(fused(x), model(x)):
            torch.testing.assert_close(a, b)


# ---------------------------------------------------------------- GPU, bf16

@pytest.mark.gpu
@pytest.mark.parametrize("name,kwargs", [("resnet50", {}), ("vgg11_bn", {}), ("densenet121", {}),
                                         ("googlenet", {"aux_logits": False, "init_weights": False})])
def test_bf16_cuda_fused_matches_torchvision(name, kwargs):
    cuda_or_skip()
    model = build(getattr(tvm, name), num_classes=10, **kwargs).eval()
    model64 = torchvision_twin(name, model.state_dict(), torch.float64, num_classes=10, **kwargs).cuda().eval()
    model = model.to("cuda", torch.bfloat16, memory_format=torch.channels_last)
    fused = fuse(model)
    x = torch.randn(8, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_matches_reference(fused(x.bfloat16()), model64(x.double()), model(x.bfloat16()))
