"""Runs a benchmark plan: every (layer or model, batch, dtype) group with each contender, in an
order that drops the least important work first when a time budget runs out: on a GPU all
non-compile contenders first, then torch.compile (slow to compile) for models, then for layers;
on a CPU case by case, every contender of a case timed together (CpuTimer.time_all).

Each contender's first output is checked against a float32 reference of the same inputs: a
result is kept as "ok" only if its error is at most 3x that of PyTorch's eager ops in the same
dtype plus a floor (a sanity check against broken kernels; the tests are the precision check).
"""
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from .common import MAX_AUTOTUNE, Unavailable, Unsupported, dtype_name
from .contenders import eager_function, layer_function, make_inputs
from .models import model_function, model_inputs
from .shapes import model_conv_layers
from .timing import make_timer, measure_peaks, rotating_sets

ERROR_FLOOR = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 5e-3}
COMPILERS = ("compile", MAX_AUTOTUNE)


@dataclass
class Plan:
    device: str
    dtypes: list
    layers: list  # ConvLayer / AddReluShape
    batches: list
    models: list  # names
    model_batches: list
    contenders: list
    target_ms: float = None
    budget_s: float = None
    quick: bool = False
    seed: int = 0


@dataclass
class Group:
    section: str  # "layer" or "model"
    case: object  # a shapes entry, or a model name
    batch: int
    dtype: torch.dtype
    contenders: list


def _groups(plan, interleaved):
    """The work, most important first: every non-compile contender, then the compilers for
    models (largest batch first), then the compilers for layers. Where a group's contenders are
    timed together (interleaved, on a CPU), the compilers stay in their case's group, last."""
    layers = [(case, b, d) for d in plan.dtypes for b in plan.batches for case in plan.layers]
    models = [(m, b, d) for d in plan.dtypes for b in plan.model_batches for m in plan.models]
    eager = [c for c in plan.contenders if c not in COMPILERS]
    compilers = [c for c in plan.contenders if c in COMPILERS]
    model_eager = [c for c in eager if c not in ("cudnn_fused", "onednn")]  # no model-level form
    if interleaved:
        work = [Group("layer", *k, eager + compilers) for k in layers]
        work += [Group("model", *k, model_eager + compilers) for k in models]
    else:
        work = [Group("layer", *k, eager) for k in layers] + [Group("model", *k, model_eager) for k in models]
        work += [Group("model", *k, compilers) for k in sorted(models, key=lambda k: -k[1])]
        work += [Group("layer", *k, compilers) for k in layers]
    return [g for g in work if g.contenders]


class _Progress:
    def __init__(self, total):
        try:
            from tqdm import tqdm
            self._bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, mininterval=1.0)
        except ImportError:
            self._bar, self._done, self._total = None, 0, total

    def step(self, label):
        if self._bar is not None:
            self._bar.set_postfix_str(label[:60], refresh=False)
            self._bar.update(1)
        else:
            self._done += 1
            print(f"[{self._done}/{self._total}] {label}", file=sys.stderr, flush=True)

    def close(self):
        if self._bar is not None:
            self._bar.close()


def forward_memory_mib(call):
    """The GPU memory that one more eager call of a timed model takes at its peak, beyond what is
    already allocated (its inputs, and the outputs kept by the timing): its output, activations and
    workspaces, as the caching allocator hands them out. None where it cannot be measured."""
    try:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        call(0)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    except RuntimeError:
        return None


def relative_error(out, ref):
    diff = (out.float() - ref).nan_to_num(float("inf"))
    return (diff.norm() / ref.norm().clamp_min(1e-30)).item()


class _TF32Off:
    """Temporarily IEEE fp32, for the float32 reference."""

    def __enter__(self):
        self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved


class Runner:
    def __init__(self, plan, device_name):
        self.plan = plan
        self.device_name = device_name
        self.timer = make_timer(plan.device, plan.target_ms)
        self.records = []
        self.unavailable = {}  # contender -> why, reported once
        self.peaks = None
        self._start = None

    def run(self):
        self._start = time.monotonic()
        if self.plan.device == "cpu":
            torch.set_num_threads(os.cpu_count())
        peak_dtypes = list(dict.fromkeys(
            ([torch.bfloat16] if self.plan.device == "cuda" else []) + list(self.plan.dtypes)))
        self.peaks = measure_peaks(self.timer, peak_dtypes, quick=self.plan.quick)
        work = _groups(self.plan, self.timer.interleaves)
        progress = _Progress(sum(len(g.contenders) for g in work))
        try:
            for group in work:
                self._run_group(group, progress)
        finally:
            progress.close()
        return self.records

    def _over_budget(self):
        return self.plan.budget_s is not None and time.monotonic() - self._start > self.plan.budget_s

    def _run_group(self, group, progress):
        label = group.case.label if group.section == "layer" else group.case
        label = f"{label} b{group.batch} {dtype_name(group.dtype)}"
        if self._over_budget():
            for c in group.contenders:
                self._add(group, c, status="skipped", message=f"time budget of {self.plan.budget_s:g} s used up")
                progress.step(f"{label} {c} (skipped)")
            return
        try:
            setup = self._setup(group)
        except Exception as error:  # noqa: BLE001 - recorded for every contender of the group
            status, why = (("unavailable", str(error)) if isinstance(error, Unavailable)
                           else ("error", f"inputs or reference failed: {type(error).__name__}: {error}"[:300]))
            for c in group.contenders:
                self._add(group, c, status=status, message=why)
                progress.step(f"{label} {c}")
            self._free()
            return
        interleaved = {}  # timed together, where the timer interleaves them (on a CPU)
        for contender in group.contenders:
            progress.step(f"{label} {contender}")
            if self._over_budget():
                self._add(group, contender, status="skipped",
                          message=f"time budget of {self.plan.budget_s:g} s used up")
                continue
            fn = self._function(group, contender)
            if fn is None:
                continue
            if self.timer.interleaves:
                interleaved[contender] = fn
            else:
                self._measure(group, {contender: fn}, setup)
        if interleaved:
            self._measure(group, interleaved, setup)
        del setup
        self._free()

    def _free(self):
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()

    def _setup(self, group):
        """Input sets, a float32 reference of set 0 and the eager error against it."""
        device, dtype = self.plan.device, group.dtype
        if group.section == "layer":
            case = group.case
            ws = case.min_bytes(group.batch, torch.empty((), dtype=dtype).element_size())
            n_sets = rotating_sets(ws, self.timer.l2_bytes)
            sets = make_inputs(case, group.batch, dtype, device, n_sets, self.plan.seed)
            eager = eager_function(case)
            with _TF32Off():
                ref = eager(*[t.float() for t in sets[0]])
            peer = eager(*sets[0])
        else:
            n_sets = 1
            sets = [model_inputs(group.case, group.batch, dtype, device, self.plan.seed)]
            with _TF32Off():
                ref = model_function("eager", group.case, device, torch.float32)(sets[0][0].float()).float()
            peer = model_function("eager", group.case, device, dtype)(*sets[0])
        return {"sets": sets, "n_sets": n_sets, "ref": ref, "peer_error": relative_error(peer, ref)}

    def _function(self, group, contender):
        """The contender's function for this group, or None with the reason recorded."""
        if contender in self.unavailable:
            return self._add(group, contender, status="unavailable", message=self.unavailable[contender])
        try:
            if group.section == "layer":
                return layer_function(contender, group.case, self.plan.device)
            return model_function(contender, group.case, self.plan.device, group.dtype)
        except Exception as error:  # noqa: BLE001 - one failing contender must not stop the run
            return self._failed(group, contender, error)

    def _measure(self, group, fns, setup):
        """Times {contender: fn} on the group's input sets, checks each first output against the
        reference and records the results."""
        device, sets, firsts = self.plan.device, setup["sets"], {}

        def calling(contender, fn):
            def call(i):
                out = fn(*sets[i])
                firsts.setdefault(contender, out)
                return out
            return call

        calls = {c: calling(c, fn) for c, fn in fns.items()}
        graph = device == "cuda" and group.batch == 1
        try:
            timings = self.timer.time_all(calls, setup["n_sets"], graph=graph)
            memory_mib = {c: forward_memory_mib(calls[c]) if device == "cuda" and group.section == "model" else None
                          for c, t in timings.items() if not isinstance(t, BaseException)}
        finally:
            if any(c in COMPILERS for c in fns):
                torch._dynamo.reset()
        for contender, timing in timings.items():
            if isinstance(timing, BaseException):
                self._failed(group, contender, timing)
                continue
            error = relative_error(firsts[contender], setup["ref"])
            bound = 3 * setup["peer_error"] + ERROR_FLOOR[group.dtype]
            ok = math.isfinite(error) and error <= bound
            self._add(group, contender, timing=timing, rel_error=error, memory_mib=memory_mib[contender],
                      status="ok" if ok else "wrong",
                      message="; ".join(timing.notes + ([] if ok else [
                          f"relative error {error:.3g} against float32 exceeds {bound:.3g} (eager's own: "
                          f"{setup['peer_error']:.3g})"])))

    def _failed(self, group, contender, error):
        """Records why a contender did not run here."""
        if isinstance(error, Unavailable):
            if group.section == "layer" or contender in ("triton", "cuda", "auto"):
                self.unavailable[contender] = str(error)
            return self._add(group, contender, status="unavailable", message=str(error))
        if isinstance(error, Unsupported):
            return self._add(group, contender, status="n/a", message=str(error))
        if isinstance(error, NotImplementedError):
            return self._add(group, contender, status="unsupported", message=str(error)[:300])
        if isinstance(error, torch.OutOfMemoryError):
            self._free()
        fused_peer = contender in ("cudnn_fused", "onednn") and isinstance(error, RuntimeError)
        return self._add(group, contender, status="unsupported" if fused_peer else "error",
                         message=f"{type(error).__name__}: {error}"[:300])

    def _add(self, group, contender, status, message="", timing=None, rel_error=None, memory_mib=None):
        dtype = group.dtype
        elem = torch.empty((), dtype=dtype).element_size()
        r = {"section": group.section, "contender": contender, "dtype": dtype_name(dtype), "batch": group.batch,
             "device": self.device_name, "status": status, "message": message}
        if group.section == "layer":
            case = group.case
            r.update(name=case.label, model=case.model, layer=case.name, op=case.op, count=case.count)
            flops, nbytes = case.flops(group.batch), case.min_bytes(group.batch, elem)
            roof_s = self._roofline_s(flops, nbytes, dtype)
        else:
            layers = model_conv_layers(group.case)
            r.update(name=f"{group.case}@{group.batch}", model=group.case, layer=None, op="model", count=1)
            flops = sum(l.count * l.flops(group.batch) for l in layers)
            nbytes = sum(l.count * l.min_bytes(group.batch, elem) for l in layers)
            roof_s = sum(l.count * self._roofline_s(l.flops(group.batch), l.min_bytes(group.batch, elem), dtype)
                         for l in layers)  # convs only: a lower bound on the model's time
        r.update(flops=flops, min_bytes=nbytes, roofline_ms=roof_s * 1e3)
        if timing is not None:
            p50_s = timing.p50 * 1e-3
            r.update(ms_p20=timing.p20, ms_p50=timing.p50, ms_p80=timing.p80, reps=len(timing.samples_ms),
                     first_call_s=timing.first_call_s, graph=timing.graph, rotating_sets=timing.sets,
                     rel_error=rel_error, tflops=flops / p50_s / 1e12, gbps=nbytes / p50_s / 1e9,
                     roofline_fraction=roof_s / p50_s)
            if group.section == "model":
                r["images_per_second"] = group.batch / p50_s
                r["forward_memory_mib"] = memory_mib
        self.records.append(r)

    def _roofline_s(self, flops, nbytes, dtype):
        peak_flops = self.peaks["matmul_flops"][dtype_name(dtype)]
        return max(flops / peak_flops, nbytes / self.peaks["copy_bytes_per_s"])
