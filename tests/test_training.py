"""Training through the fused ops: DDP across two CPU processes (gloo), deterministic mode, and
CUDA-graph capture of forward and backward."""
import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cnnkernels


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cnnkernels.nn.Conv2dReLU(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.tail = cnnkernels.nn.AddReLU()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        y = self.stem(x)
        y = cnnkernels.conv2d_add_relu(y, self.conv.weight, y, self.conv.bias, padding=1)
        y = self.tail(y, y)
        return self.fc(y.mean((2, 3)))


def training_batch():
    generator = torch.Generator().manual_seed(0)
    return torch.randn(8, 3, 10, 10, generator=generator), torch.randint(0, 5, (8,), generator=generator)


def _run_ranks(tmp_path):
    """Runs tests/ddp_worker.py as ranks 0 and 1; returns the failed ranks' stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ddp_worker.py")
    env = os.environ | {"GLOO_SOCKET_IFNAME": "lo"}
    ranks = [subprocess.Popen([sys.executable, worker, str(rank), "2", port, str(tmp_path / "state.pt"),
                               str(tmp_path / f"grads{rank}.pt")], env=env, stderr=subprocess.PIPE, text=True)
             for rank in range(2)]
    failures = []
    for rank in ranks:
        _, stderr = rank.communicate(timeout=300)
        if rank.returncode != 0:
            failures.append(f"exit {rank.returncode}: {stderr[-3000:]}")
    return failures


def test_ddp_two_processes_match_one_process_on_the_full_batch(tmp_path):
    torch.manual_seed(0)
    model = TinyResNet()
    torch.save(model.state_dict(), tmp_path / "state.pt")
    x, y = training_batch()
    nn.functional.cross_entropy(model(x), y).backward()
    expected = [p.grad for p in model.parameters()]

    # One retry: the free port picked here can be taken by another process before gloo binds it.
    for attempt in range(2):
        failures = _run_ranks(tmp_path)
        if not failures:
            break
    assert not failures, failures
    for rank in range(2):
        grads = torch.load(tmp_path / f"grads{rank}.pt")
        for got, want in zip(grads, expected):
            assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.on_device
def test_example_trains_a_zoo_model_under_torchrun():
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "train_ddp.py")
    # The example runs one process per GPU (NCCL), or CPU processes (gloo) without a GPU.
    procs = min(2, torch.cuda.device_count()) if torch.cuda.is_available() else 2
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
                           example, "--model", "resnet18", "--steps", "3", "--batch", "2", "--image-size", "32"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"images/s over {procs} processes, final loss" in done.stdout


@pytest.mark.gpu
def test_example_names_a_rank_without_a_gpu():
    """More processes than GPUs: the example says so, instead of CUDA's 'invalid device ordinal'."""
    example = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples", "train_ddp.py")
    gpus = torch.cuda.device_count()
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus + 1}",
                           example, "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert f"local rank {gpus} needs GPU {gpus}, but this node has {gpus}" in done.stderr + done.stdout


def test_deterministic_mode_gives_bitwise_equal_forward_and_backward():
    """Our kernels use no atomics (the bias gradient's sums run in a fixed order) and the rest of
    the backward is ATen's, which follows torch.use_deterministic_algorithms: two runs must agree
    to the bit."""
    x = torch.randn(2, 4, 9, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.randn(6, 4, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    r = torch.randn(2, 6, 9, 9, requires_grad=True)

    def run():
        out = cnnkernels.conv2d_add_relu(x, w, r, b, padding=1)
        grads = torch.autograd.grad(cnnkernels.add_relu(out, r).square().sum(), (x, w, b, r))
        return (out,) + grads

    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for backend in ("cuda", "torch"):
            with cnnkernels.use_backend(backend):
                first, second = run(), run()
            assert all(torch.equal(a, b) for a, b in zip(first, second)), backend
    finally:
        torch.use_deterministic_algorithms(was)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton", "torch"])
def test_reduce_overhead_capture_matches_eager_after_warmup(backend):
    """torch.compile(mode="reduce-overhead") records CUDA graphs of the forward and the backward;
    after warm-up, replays on fresh inputs must equal eager, gradients included."""
    torch.manual_seed(0)
    eager_model = TinyResNet().cuda().to(memory_format=torch.channels_last)
    captured_model = copy.deepcopy(eager_model)
    compiled = torch.compile(captured_model, mode="reduce-overhead", fullgraph=True)

    def step(model, x, y):
        model.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss.detach().clone(), [p.grad.clone() for p in model.parameters()]

    was_tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    try:
        with cnnkernels.use_backend(backend):
            for i in range(5):  # the first calls compile and record; the last ones replay
                x, y = (t.cuda() + i if t.is_floating_point() else t.cuda() for t in training_batch())
                x = x.contiguous(memory_format=torch.channels_last)
                torch.compiler.cudagraph_mark_step_begin()
                loss, grads = step(compiled, x, y)
                expected_loss, expected_grads = step(eager_model, x, y)
                assert torch.allclose(loss, expected_loss, atol=1e-5, rtol=1e-5), (i, loss, expected_loss)
                for g, e in zip(grads, expected_grads):
                    assert torch.allclose(g, e, atol=1e-4, rtol=1e-4), i
    finally:
        torch.backends.cudnn.allow_tf32 = was_tf32
