"""Timing: medians after warm-up, with the first call (compilation, autotuning, cuDNN's
algorithm search) timed on its own and never mixed into the samples.

GPU: CUDA events around each call. Before each call a spin kernel (torch.cuda._sleep) keeps the
GPU busy while the CPU queues the call, so the events measure device time, not Python launch
cost; at batch 1 every contender runs as a CUDA graph instead. Inputs rotate over several sets
when one set would stay in L2.
With pad=False (the training step) the calls run back to back, unpadded: a step's time is then
its steady-state throughput, launch overhead included where it exceeds the device time.
CPU: time.perf_counter around each call, with freed memory kept in the process
(keep_freed_memory), and the contenders of one case timed in interleaved rounds: a shared
machine's slow spells (2x for seconds on the dev VM) then fall on every contender alike.
"""
import ctypes
import math
import statistics
import time
from dataclasses import dataclass, field

import torch

from .common import dtype_name


@dataclass
class Timing:
    samples_ms: list
    first_call_s: float
    graph: bool = False
    sets: int = 1
    notes: list = field(default_factory=list)

    def percentile(self, q):
        s = sorted(self.samples_ms)
        if len(s) == 1:
            return s[0]
        return statistics.quantiles(s, n=100, method="inclusive")[q - 1]

    p20 = property(lambda self: self.percentile(20))
    p50 = property(lambda self: statistics.median(self.samples_ms))
    p80 = property(lambda self: self.percentile(80))


def rotating_sets(working_set_bytes, l2_bytes, max_sets=64):
    """How many input sets to rotate over so that one call's inputs are no longer in L2."""
    if not l2_bytes or working_set_bytes > 2 * l2_bytes:
        return 1
    return max(2, min(max_sets, math.ceil(4 * l2_bytes / max(working_set_bytes, 1))))


def _reps(per_call_ms, target_ms, min_reps, max_reps):
    return int(min(max_reps, max(min_reps, target_ms / max(per_call_ms, 1e-4))))


def keep_freed_memory():
    """glibc hands freed blocks of a few MB or more back to the OS, so the next tensor of that size
    lands on fresh pages and pays a page fault per 4 KiB at its first write. Which contender pays
    them depends on what the process freed before: the same op then runs in one of two modes, up
    to 7x apart (eager relu(x + y) on 4x256x56x56 fp32: 1.05 ms, or 7.7 ms with 6,240 faults per
    call). With glibc's trim and mmap thresholds raised to 1 GiB, freed memory is reused, as
    jemalloc and tcmalloc (which PyTorch's CPU performance guide advises) reuse it, and every
    contender's time is its compute. Returns the setting, for the record."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "left as is (no glibc mallopt)"
    m_trim_threshold, m_mmap_threshold, one_gib = -1, -3, 1 << 30
    if mallopt(m_trim_threshold, one_gib) and mallopt(m_mmap_threshold, one_gib):
        return "glibc: freed memory kept (M_TRIM_THRESHOLD and M_MMAP_THRESHOLD 1 GiB)"
    return "left as is (mallopt refused)"


class CpuTimer:
    device = "cpu"
    l2_bytes = 0
    interleaves = True  # time_all's contenders share rounds

    def __init__(self, target_ms=300.0, min_reps=5, max_reps=100, max_rounds=10):
        self.target_ms, self.min_reps, self.max_reps, self.max_rounds = target_ms, min_reps, max_reps, max_rounds

    def time(self, fn, n_sets=1, graph=False, pad=True):
        """Times fn(i) for input set i. `graph` and `pad` have no meaning on a CPU."""
        (result,) = self.time_all({"fn": fn}, n_sets).values()
        if isinstance(result, BaseException):
            raise result
        return result

    def time_all(self, fns, n_sets=1, graph=False):
        """{name: Timing} for each fn(i) of {name: fn}: each one's first call and warm-up alone, then
        every fn in turn, round after round, each round in another order. A name whose fn raised
        maps to the exception instead."""
        results, per_call_ms = {}, {}
        for name, fn in fns.items():
            try:
                start = time.perf_counter()
                fn(0)
                first = time.perf_counter() - start
                warmup = []
                while len(warmup) < 2 or (len(warmup) < 10 and sum(warmup) < self.target_ms / 4):
                    start = time.perf_counter()
                    fn(len(warmup) % n_sets)
                    warmup.append((time.perf_counter() - start) * 1e3)
            except Exception as error:  # noqa: BLE001 - the caller records it for this contender
                results[name] = error
                continue
            results[name] = Timing([], first, sets=n_sets)
            per_call_ms[name] = min(warmup)
        reps = {n: _reps(ms, self.target_ms, self.min_reps, self.max_reps) for n, ms in per_call_ms.items()}
        rounds = min([self.max_rounds] + list(reps.values())) if reps else 0
        names = list(reps)
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                if isinstance(results[name], BaseException):
                    continue
                samples = results[name].samples_ms
                try:
                    for _ in range(reps[name] // rounds + (r < reps[name] % rounds)):
                        start = time.perf_counter()
                        fns[name](len(samples) % n_sets)
                        samples.append((time.perf_counter() - start) * 1e3)
                except Exception as error:  # noqa: BLE001
                    results[name] = error
        return results


class GpuTimer:
    device = "cuda"
    interleaves = False  # time_all's contenders are timed one after the other

    def __init__(self, target_ms=100.0, min_reps=10, max_reps=200):
        self.target_ms, self.min_reps, self.max_reps = target_ms, min_reps, max_reps
        self.l2_bytes = getattr(torch.cuda.get_device_properties(torch.cuda.current_device()), "L2_cache_size", 0)
        self._sleep = getattr(torch.cuda, "_sleep", None)
        self._cycles_per_ms = self._calibrate_sleep() if self._sleep else 0

    def _calibrate_sleep(self):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self._sleep(1000)  # loads the kernel
        cycles = 2_000_000
        start.record()
        self._sleep(cycles)
        end.record()
        end.synchronize()
        return cycles / max(start.elapsed_time(end), 1e-3)

    def time(self, fn, n_sets=1, graph=False, pad=True):
        """Times fn(i) for input set i; with graph=True, replays of one CUDA graph that calls fn
        once on every set. pad=False leaves out the spin kernel before each call: the calls run
        back to back and each sample includes any time the GPU waits for the host."""
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn(0)
        torch.cuda.synchronize()
        first = time.perf_counter() - start
        notes = []
        for i in range(max(n_sets, 3)):  # every set once (weights packed, shapes tuned), then steady
            fn(i % n_sets)
        torch.cuda.synchronize()

        step, calls_per_step = (lambda i: fn(i % n_sets)), 1
        if graph:
            try:
                step, calls_per_step = self._capture(fn, n_sets), n_sets
            except Exception as error:  # noqa: BLE001 - recorded, then timed without a graph
                torch.cuda.synchronize()
                graph = False
                notes.append(f"CUDA graph capture failed, timed without a graph: {error}"[:300])

        # Estimate the device time per step and the CPU time to queue one.
        host = time.perf_counter()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(3):
            step(i)
        end.record()
        host_ms = (time.perf_counter() - host) * 1e3 / 3
        end.synchronize()
        device_ms = start.elapsed_time(end) / 3
        reps = _reps(device_ms, self.target_ms, self.min_reps, self.max_reps)
        pad_cycles = int(1.5 * host_ms * self._cycles_per_ms) + 1000

        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        for i in range(reps):
            if pad and self._sleep:
                self._sleep(pad_cycles)
            starts[i].record()
            step(i)
            ends[i].record()
        torch.cuda.synchronize()
        samples = [s.elapsed_time(e) / calls_per_step for s, e in zip(starts, ends)]
        return Timing(samples, first, graph=graph, sets=n_sets, notes=notes)

    def time_all(self, fns, n_sets=1, graph=False):
        """{name: Timing, or the exception its fn raised}, one fn after the other: each call's
        device time is measured apart from the host's, so there is nothing to interleave."""
        results = {}
        for name, fn in fns.items():
            try:
                results[name] = self.time(fn, n_sets, graph=graph)
            except Exception as error:  # noqa: BLE001 - the caller records it for this contender
                results[name] = error
        return results

    @staticmethod
    def _capture(fn, n_sets):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up on a side stream, as graph capture asks
            for i in range(3):
                fn(i % n_sets)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for i in range(n_sets):
                fn(i)
        torch.cuda.synchronize()
        return lambda i: g.replay()


def make_timer(device, target_ms=None):
    if device == "cuda":
        return GpuTimer(target_ms or 100.0)
    return CpuTimer(target_ms or 300.0)


def _matmul_flops(timer, n, dtype, gen):
    """FLOP/s of an n x n x n matmul: torch.mm's, and on a CPU oneDNN's too (as a 1x1
    convolution of n pixels from n to n channels) where it is faster. MKL's sgemm, behind torch.mm
    on x86, takes its AVX2 path on AMD CPUs: 116-187 GFLOP/s on 2 Zen 5 cores, where oneDNN's
    convolutions ran 420-500, so torch.mm alone put layers at 300-500% of the roofline."""
    a = torch.randn(n, n, device=timer.device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=timer.device, dtype=dtype, generator=gen)
    ms = timer.time(lambda i: torch.mm(a, b)).p50
    if timer.device == "cpu" and torch.backends.mkldnn.is_available():
        x = a.reshape(1, n, n, 1).contiguous(memory_format=torch.channels_last)
        w = b.reshape(n, n, 1, 1)
        conv = torch.ops.mkldnn._convolution_pointwise
        try:
            ms = min(ms, timer.time(lambda i: conv(x, w, None, [0, 0], [1, 1], [1, 1], 1, "none", [], "")).p50)
        except RuntimeError:  # a dtype this CPU's oneDNN does not take
            pass
    return 2 * n ** 3 / (ms * 1e-3)


def measure_peaks(timer, dtypes, quick=False):
    """The roofline's two ceilings, measured here and now: a large matmul per dtype (FLOP/s) and a
    large copy (bytes read + written per second)."""
    device = timer.device
    gen = torch.Generator(device=device).manual_seed(0)
    n = 8192 if device == "cuda" else (1024 if quick else 2048)
    flops = {d: _matmul_flops(timer, n, d, gen) for d in dtypes}
    sixteen_bit = [d for d in dtypes if d in (torch.float16, torch.bfloat16)]
    if device == "cpu" and sixteen_bit:
        # A 16-bit dtype can always be computed in fp32, as CPUs without 16-bit arithmetic (and
        # PyTorch's fp16 kernels on them) do: its ceiling is at least fp32's. fp16's own GEMM on a
        # Zen 5 ran at a small fraction of it and put layers at 4,000-22,000% of the "roofline".
        fp32 = flops[torch.float32] if torch.float32 in flops else _matmul_flops(timer, n, torch.float32, gen)
        for d in sixteen_bit:
            flops[d] = max(flops[d], fp32)
    peaks = {"matmul_n": n, "matmul_flops": {dtype_name(d): f for d, f in flops.items()}}
    numel = (1 << 28) if device == "cuda" else ((8 << 20) if quick else (32 << 20))  # fp32 elements
    src = torch.randn(numel, device=device, generator=gen)
    dst = torch.empty_like(src)
    t = timer.time(lambda i: dst.copy_(src))
    peaks["copy_bytes"] = 2 * src.numel() * src.element_size()
    peaks["copy_bytes_per_s"] = peaks["copy_bytes"] / (t.p50 * 1e-3)
    return peaks
