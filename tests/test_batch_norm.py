"""Train-mode BatchNorm2d + (residual) + ReLU fused in Triton (cnnkernels/batch_norm.py), against
float64 PyTorch: output, running statistics, and the gradients of input, weight, bias, residual."""
import copy

import pytest
import torch
import torch.nn as nn

import cnnkernels
from cnnkernels import batch_norm
from conftest import DEVICES, LogOps, assert_matches_reference, interpreting_triton, poisoned_outputs, spy_op_calls

pytestmark = pytest.mark.usefixtures("_triton_usable")


@pytest.fixture
def _triton_usable(request):
    """CPU cases need Triton's interpreter (as in CI); CUDA cases are gated by conftest."""
    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if params.get("device", "cpu") == "cpu" and not interpreting_triton():
        pytest.skip("Triton runs on CPU tensors only through its interpreter (TRITON_INTERPRET=1, as in CI)")


def make_bn(channels, dtype, device, momentum=0.1):
    bn = nn.BatchNorm2d(channels, momentum=momentum).to(device=device, dtype=dtype)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def run(bn, x, residual, grad, fused):
    x = x.detach().requires_grad_()
    residual = None if residual is None else residual.detach().requires_grad_()
    if fused:
        with cnnkernels.use_backend("triton"):
            assert batch_norm.runs_fused(x, bn, residual)
            out = batch_norm.batch_norm_relu_train(x, bn, residual)
    else:
        y = bn(x)
        out = torch.relu(y if residual is None else y + residual)
    inputs = [x, bn.weight, bn.bias] + ([] if residual is None else [residual])
    return [out, *torch.autograd.grad(out, inputs, grad), bn.running_mean.clone(), bn.running_var.clone()]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_batch_norm_relu_matches_float64(dtype, memory_format, residual, momentum, device):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("PyTorch's own CPU batch_norm lacks float16 kernels for the comparison")
    check_against_float64((3, 21, 9, 10) if device == "cpu" else (16, 64, 28, 28), dtype, memory_format, residual,
                          momentum, device)


@pytest.fixture
def tile_elements(request, monkeypatch):
    """Runs the test with relu_backward.TILE_ELEMENTS set to the param (benchmarks/bn_tiles.py sweeps it)."""
    from cnnkernels.triton_ops import relu_backward
    monkeypatch.setattr(relu_backward, "TILE_ELEMENTS", request.param)
    relu_backward._WALKS.clear()
    yield request.param
    relu_backward._WALKS.clear()


@pytest.mark.parametrize("tile_elements", [1024, 4096], indirect=True)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_several_programs_per_image_and_channel_blocks(memory_format, tile_elements):
    """130 channels span two or more channel blocks, and 20x20 images two or more programs each."""
    check_against_float64((2, 130, 20, 20), torch.float32, memory_format, True, 0.1, "cpu")


def check_against_float64(shape, dtype, memory_format, residual, momentum, device):
    gen = torch.Generator().manual_seed(0)

    def t(scale=1.0, offset=0.0):  # made in `dtype`, so that the float64 reference sees the same values
        x = torch.randn(shape, generator=gen) * scale + offset
        return x.to(device=device, dtype=dtype).contiguous(memory_format=memory_format)
    x, res, grad = t(3.0, 5.0), (t() if residual else None), t()  # an offset mean: the variance must not cancel
    torch.manual_seed(0)
    bn = make_bn(shape[1], dtype, device, momentum)

    def up(t):
        return None if t is None else t.double()
    with poisoned_outputs():
        ours = run(copy.deepcopy(bn), x, res, grad, fused=True)
    theirs = run(copy.deepcopy(bn), x, res, grad, fused=False)
    ref64 = run(copy.deepcopy(bn).double(), up(x), up(res), up(grad), fused=False)
    assert ours[0].is_contiguous(memory_format=memory_format)
    for mine, pytorch, ref in zip(ours, theirs, ref64):
        assert_matches_reference(mine, ref, pytorch)


def test_num_batches_tracked_and_cumulative_average_like_pytorch():
    x = torch.randn(4, 3, 5, 5)
    ours, theirs = make_bn(3, torch.float32, "cpu", momentum=None), None
    theirs = copy.deepcopy(ours)
    for step in range(3):
        run(ours, x + step, None, torch.ones_like(x), fused=True)
        run(theirs, x + step, None, torch.ones_like(x), fused=False)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == 3
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)


def test_gradcheck_in_float64():
    from cnnkernels.triton_ops.batch_norm import batch_norm_relu_train

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x, r, w, b = t(2, 3, 4, 5), t(2, 3, 4, 5), t(3), t(3)
    assert torch.autograd.gradcheck(lambda *a: batch_norm_relu_train(*a, 1e-5), (x, w, b, r))
    assert torch.autograd.gradcheck(lambda *a: batch_norm_relu_train(*a, None, 1e-5), (x, w, b))


def test_double_backward_in_float64():
    """create_graph=True takes PyTorch's differentiable batch-norm backward (before: an error)."""
    from cnnkernels.triton_ops.batch_norm import batch_norm_relu_train

    def t(*shape):
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    x, r, w, b = t(2, 2, 2, 3), t(2, 2, 2, 3), t(2), t(2)  # small: every perturbation runs the interpreter
    assert torch.autograd.gradgradcheck(lambda *a: batch_norm_relu_train(*a, 1e-5), (x, w, b, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_double_backward_matches_float64(dtype):
    from cnnkernels.triton_ops.batch_norm import batch_norm_relu_train

    gen = torch.Generator().manual_seed(0)
    x, w, b, r, v = (torch.randn(shape, generator=gen).to(dtype)
                     for shape in [(2, 3, 4, 5), (3,), (3,), (2, 3, 4, 5), (2, 3, 4, 5)])

    def second_order_grads(fused, dtype):
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, w, b, r)]
        xx, ww, bb, rr = leaves
        y = (batch_norm_relu_train(xx, ww, bb, rr, 1e-5) if fused else
             torch.relu(nn.functional.batch_norm(xx, None, None, ww, bb, True, 0.0, 1e-5) + rr))
        grad_x, grad_w = torch.autograd.grad((y * y * v.to(dtype)).sum(), (xx, ww), create_graph=True)
        ((grad_x * v.to(dtype)).sum() + grad_w.sum()).backward()
        return [t.grad for t in leaves]
    with poisoned_outputs():
        ours = second_order_grads(True, dtype)
    for mine, pytorch, ref in zip(ours, second_order_grads(False, dtype), second_order_grads(False, torch.float64)):
        assert_matches_reference(mine, ref, pytorch)


def test_unsupported_calls_run_as_pytorch_does():
    x = torch.randn(2, 3, 4, 4)
    bn = make_bn(3, torch.float32, "cpu")
    assert batch_norm.fused_unsupported(x, bn.eval(), None)
    assert batch_norm.fused_unsupported(x, nn.BatchNorm2d(3, affine=False), None)
    assert batch_norm.fused_unsupported(x, bn.train(), torch.randn(2, 3, 4, 5))
    with cnnkernels.use_backend("torch"):
        assert not batch_norm.runs_fused(x, bn, None)
    with cnnkernels.use_backend("triton"):
        assert batch_norm.runs_fused(x, bn, None)
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            batch_norm.batch_norm_relu_train(torch.randn(1, 3, 1, 1), bn)


def test_forward_mode_ad_runs_as_pytorch_does():
    """The fused kernels have no jvp formula: a dual input takes PyTorch's path, tangent included."""
    import torch.autograd.forward_ad as forward_ad
    x, tangent = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(2, 3, 4, 4, dtype=torch.float64)
    tangents, first = [], make_bn(3, torch.float64, "cpu")
    for backend in ("torch", "triton"):
        bn = copy.deepcopy(first)
        with cnnkernels.use_backend(backend), forward_ad.dual_level():
            dual = forward_ad.make_dual(x, tangent)
            assert not batch_norm.runs_fused(dual, bn, None)
            tangents.append(forward_ad.unpack_dual(batch_norm.batch_norm_relu_train(dual, bn)).tangent)
    assert tangents[1] is not None and torch.allclose(tangents[1], tangents[0])


def test_eager_calls_skip_the_dispatcher_unless_something_intercepts(monkeypatch):
    """Plain eager calls run the ops' bodies directly (the dispatcher's cost is host time in a
    training step) and still bump the running statistics' versions as the op would; under a
    dispatch mode (here one that logs ops) they go through the dispatcher, which it sees."""
    from cnnkernels.triton_ops import batch_norm as triton_batch_norm

    forward, backward = "batch_norm_relu_train_triton", "batch_norm_relu_backward_triton"
    calls = spy_op_calls(monkeypatch, (triton_batch_norm, forward), (triton_batch_norm, backward))
    bn = make_bn(3, torch.float32, "cpu")
    x = torch.randn(2, 3, 4, 4)
    versions = bn.running_mean._version, bn.running_var._version
    run(bn, x, None, torch.ones_like(x), fused=True)
    assert calls == [(forward, "direct"), (backward, "direct")]
    assert bn.running_mean._version > versions[0] and bn.running_var._version > versions[1]
    calls.clear()
    with LogOps() as log:
        run(bn, x, None, torch.ones_like(x), fused=True)
    assert calls == [(forward, "dispatcher"), (backward, "dispatcher")]
    assert any("batch_norm_relu_train_triton" in op for op in log.ops)
    assert any("batch_norm_relu_backward_triton" in op for op in log.ops)


def test_op_rejects_bad_arguments():
    from cnnkernels.triton_ops.batch_norm import batch_norm_relu_train_triton as op
    x, c = torch.randn(2, 3, 4, 4), torch.ones(3)
    with pytest.raises(RuntimeError, match="expected weight of size"):
        op(x, torch.ones(4), c, None, 1e-5, None, None, 0.0)
    with pytest.raises(RuntimeError, match="expected residual of size"):
        op(x, c, c, x[:1], 1e-5, None, None, 0.0)
    with pytest.raises(RuntimeError, match="running_mean and running_var must be given together"):
        op(x, c, c, None, 1e-5, torch.zeros(3), None, 0.1)
    with pytest.raises(RuntimeError, match="but running_var is on meta"):
        op(x, c, c, None, 1e-5, torch.zeros(3), torch.ones(3, device="meta"), 0.1)
    with pytest.raises(RuntimeError, match="non-empty"):
        op(torch.randn(2, 0, 4, 4), torch.ones(0), torch.ones(0), None, 1e-5, None, None, 0.0)


def test_zoo_basic_block_trains_alike_on_triton_and_torch():
    """A ResNet block in train mode: the fused BN path (triton) and PyTorch's give the same loss,
    gradients and running statistics."""
    from cnnkernels.models.resnet import BasicBlock
    torch.manual_seed(0)
    block = BasicBlock(8, 8).train()
    twin = copy.deepcopy(block)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with cnnkernels.use_backend("triton"):
        loss = block(x).square().mean()
    with cnnkernels.use_backend("torch"):
        expected = twin(x).square().mean()
    loss.backward()
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(block.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=name)
    for name in ("bn1", "bn2"):
        torch.testing.assert_close(getattr(block, name).running_var, getattr(twin, name).running_var)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_batch_norm_ops(device):
    """The schemas (the forward mutates the running statistics) and the fake kernels against the
    real ones. The interpreter cannot run on functional tensors, so the CPU skips AOT dispatch."""
    from cnnkernels.triton_ops import batch_norm as ops  # noqa: F401  registers the ops

    def t(*shape):
        return torch.randn(*shape, device=device).contiguous(
            memory_format=torch.channels_last if len(shape) == 4 else torch.contiguous_format)
    x, res, w, b = t(4, 8, 5, 5), t(4, 8, 5, 5), t(8), t(8)
    running_mean, running_var = t(8), t(8).abs()
    checks = {} if device == "cuda" else {"test_utils": ("test_schema", "test_autograd_registration", "test_faketensor")}
    forward, backward = torch.ops.cnnkernels.batch_norm_relu_train_triton, torch.ops.cnnkernels.batch_norm_relu_backward_triton
    torch.library.opcheck(forward.default, (x, w, b, res, 1e-5, running_mean, running_var, 0.1), **checks)
    torch.library.opcheck(forward.default, (x, w, b, None, 1e-5, None, None, 0.0), **checks)
    out, mean, var = forward(x, w, b, res, 1e-5, None, None, 0.0)
    torch.library.opcheck(backward.default, (t(4, 8, 5, 5), x, out, mean, var, w, 1e-5, True), **checks)


@pytest.mark.gpu  # the interpreter's kernels cannot run on traced tensors
def test_torch_compile_fullgraph_matches_eager():
    """The autograd.Function over the two ops (the forward mutates the running statistics) traces
    with fullgraph=True: output, gradients and running statistics as in eager."""
    from cnnkernels.triton_ops.batch_norm import batch_norm_relu_train

    def unit(x, res, bn):
        out = batch_norm_relu_train(x, bn.weight, bn.bias, res, bn.eps, bn.running_mean, bn.running_var, 0.1)
        return out.square().sum()

    gen = torch.Generator(device="cuda").manual_seed(0)
    x, res = (torch.randn(4, 16, 8, 8, device="cuda", generator=gen).contiguous(memory_format=torch.channels_last)
              for _ in range(2))
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        bn = make_bn(16, torch.float32, "cuda")
        xg, rg = x.clone().requires_grad_(), res.clone().requires_grad_()
        fn = torch.compile(unit, fullgraph=True) if compiled else unit
        loss = fn(xg, rg, bn)
        loss.backward()
        results.append([loss, xg.grad, rg.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)


def test_dynamo_traces_the_fused_unit_without_graph_breaks():
    """fullgraph=True through batch_norm.batch_norm_relu_train (backend choice, momentum factor,
    the autograd.Function, the mutating op): same loss, gradients and running statistics as
    eager. The "eager" compile backend runs the captured graph as is: under the interpreter the
    kernels cannot run on AOT autograd's traced tensors (the GPU test compiles it fully)."""
    gen = torch.Generator().manual_seed(0)
    x, res = (torch.randn(4, 16, 8, 8, generator=gen).contiguous(memory_format=torch.channels_last) for _ in range(2))

    def unit(x, res, bn):
        return batch_norm.batch_norm_relu_train(x, bn, res).square().sum()

    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        bn = make_bn(16, torch.float32, "cpu")
        xg, rg = x.clone().requires_grad_(), res.clone().requires_grad_()
        fn = torch.compile(unit, fullgraph=True, backend="eager") if compiled else unit
        with cnnkernels.use_backend("triton"):
            loss = fn(xg, rg, bn)
        loss.backward()
        results.append([loss, xg.grad, rg.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var,
                        bn.num_batches_tracked])
    for eager, traced in zip(*results):
        torch.testing.assert_close(traced, eager, rtol=1e-5, atol=1e-5)
