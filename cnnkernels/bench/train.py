"""The training-step benchmark (issue 7): `python -m cnnkernels.bench --train`.

A step is zero_grad(set_to_none=True), forward, cross-entropy loss, backward and an SGD step
(lr 0.01, momentum 0.9, foreach default), on one fixed synthetic batch, the model in train mode,
in the run's dtype and channels_last. Contenders, all starting from the same weights:

  eager    torchvision.models.<name>() as a PyTorch user runs it (cuDNN on a GPU, oneDNN on a CPU);
           for a model torchvision lacks (lenet5), the zoo model traced by torch.fx in its
           reference mode: the same plain PyTorch modules
  ours     cnnkernels.models.<name>() with torchvision's state_dict loaded, under
           cnnkernels.use_backend("auto"): its forward calls the fused ops
  ours_cuda, ours_triton
           the same under use_backend("cuda") / use_backend("triton"): our kernels whatever
           "auto" picks today; only when asked for with --contenders
  compile  torch.compile of the eager model (the optimizer step stays eager); only with
           --train-compile or --full, as compiling a ResNet-50 training step takes minutes

On a GPU each contender's model is built right before it is timed and freed after, so its peak
memory is its own. On a CPU the contenders of a case are built together and timed in shared,
interleaved rounds (CpuTimer.time_all), so that a machine whose speed drifts slows each alike;
each keeps its own stream of the CPU generator, so its dropout masks are the ones it would draw
alone. Timing reuses timing.py's timers: the first step (compilation, cuDNN's algorithm search,
autotuning) and the warm-up steps are never in the samples; on a GPU the steps run back to back
(no spin-kernel padding), so a step's time is its steady-state throughput.
Peak memory (CUDA only) is torch.cuda.max_memory_allocated over PEAK_STEPS further steps after
the timed ones, the statistics reset before them; on a CPU it is null.

The losses are a sanity check, not a precision test: ours' and compile's loss of the first step
(identical weights and data) and after the warm-up (step CHECK_STEP, i.e. after CHECK_STEP optimizer
steps) must be within LOSS_RTOL of eager's, or the result is flagged (kept, with a note). The check
uses a fixed step rather than the first timed one because the CPU timer's warm-up length depends
on the step time, so the first timed step is a different step for each contender; every timer runs
at least CHECK_STEP steps before it times one. The first timed step's loss and index are recorded
too.
"""
import contextlib
import copy
import gc
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .common import Unavailable, dtype_name
from .contenders import compiled
from .shapes import MODEL_INPUTS
from .timing import make_timer

CONTENDERS = ("eager", "ours", "ours_cuda", "ours_triton", "compile")
OURS_BACKEND = "auto"


def backend_of(contender):
    """The cnnkernels backend an "ours*" contender runs: "ours" is auto, "ours_cuda" the C++ extension."""
    return OURS_BACKEND if contender == "ours" else contender.split("_", 1)[1]
TARGET_SPEEDUP = 1.05  # issue 7: ours at least 1.05x eager cuDNN, peak memory no higher
LOSS_RTOL = 0.05
LR, MOMENTUM = 0.01, 0.9
PEAK_STEPS = 2
CHECK_STEP = 3  # the loss compared after the warm-up: every timer has run at least this many steps before timing
DEFAULT_INPUT = (3, 224, 224)


@dataclass
class TrainPlan:
    device: str
    dtypes: list
    cases: list  # [(model name, batch)]
    contenders: list
    target_ms: float = None
    budget_s: float = None
    seed: int = 0


def input_shape(name):
    return MODEL_INPUTS.get(name, DEFAULT_INPUT)


def _torchvision_constructor(name):
    try:
        import torchvision
    except ImportError:
        return None
    return getattr(torchvision.models, name, None)


def model_problem(name):
    """Why model `name` cannot be benchmarked, or None."""
    try:
        import cnnkernels.models as zoo
    except ImportError as error:
        return f"cnnkernels.models cannot be imported: {error}"
    if name.startswith("_") or not callable(getattr(zoo, name, None)):
        return f"cnnkernels.models has no {name}()"
    return None


def build_models(name, seed):
    """(eager model, what it is, our model): on the CPU in float32, with the same weights."""
    import cnnkernels.models as zoo
    problem = model_problem(name)
    if problem:
        raise Unavailable(problem)
    torch.manual_seed(seed)
    ours = getattr(zoo, name)()
    constructor = _torchvision_constructor(name)
    if constructor is not None:
        eager = constructor()
        ours.load_state_dict(eager.state_dict())
        return eager, f"torchvision.models.{name}", ours
    with zoo.reference_mode():
        eager = torch.fx.symbolic_trace(copy.deepcopy(ours))
    return eager, f"cnnkernels.models.{name} traced in reference_mode (torchvision has no {name})", ours


def num_classes(model):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise Unavailable("the model has no final nn.Linear to size the labels by")
    return linears[-1].out_features


def make_batch(name, batch, n_classes, dtype, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.empty((batch, *input_shape(name)), device=device, dtype=dtype, memory_format=torch.channels_last)
    x.normal_(generator=gen)
    y = torch.randint(0, n_classes, (batch,), device=device, generator=gen)
    return x, y


class TrainStep:
    """One contender's model, optimizer and step function; the losses of every step, unsynced."""

    def __init__(self, contender, base, device, dtype, x, y, own_cpu_rng=False):
        self.model = copy.deepcopy(base).to(device=device, dtype=dtype, memory_format=torch.channels_last)
        self.model.train()
        self.forward = compiled(self.model, "compile") if contender == "compile" else self.model
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=LR, momentum=MOMENTUM)
        self.context = contextlib.nullcontext
        if contender.startswith("ours"):
            import cnnkernels
            self.context = lambda: cnnkernels.use_backend(backend_of(contender))
        self.x, self.y, self.losses = x, y, []
        # Steps interleaved with other contenders' keep their own stream of the CPU generator, so
        # that their dropout masks are the ones they would draw alone.
        self.cpu_rng = torch.get_rng_state() if own_cpu_rng else None

    def __call__(self, i=0):
        if self.cpu_rng is not None:
            torch.set_rng_state(self.cpu_rng)
        self.optimizer.zero_grad(set_to_none=True)
        with self.context():
            out = self.forward(self.x)
        loss = F.cross_entropy(out, self.y)
        loss.backward()
        self.optimizer.step()
        self.losses.append(loss.detach())
        if self.cpu_rng is not None:
            self.cpu_rng = torch.get_rng_state()


def rel_diff(value, reference):
    if value is None or reference is None:
        return None
    if not (math.isfinite(value) and math.isfinite(reference)):
        return math.inf
    return abs(value - reference) / max(abs(reference), 1e-12)


class TrainRunner:
    """Runs a TrainPlan; `on_record` is called after each result (the CLI rewrites its files then,
    so a run killed by a time cap leaves what it measured)."""

    def __init__(self, plan, device_name, on_record=None):
        self.plan = plan
        self.device_name = device_name
        self.timer = make_timer(plan.device, plan.target_ms)
        self.records = []
        self.on_record = on_record or (lambda: None)
        self._start = None

    def _over_budget(self):
        return self.plan.budget_s is not None and time.monotonic() - self._start > self.plan.budget_s

    def run(self):
        self._start = time.monotonic()
        if self.plan.device == "cpu":
            torch.set_num_threads(os.cpu_count())
        for dtype in self.plan.dtypes:
            for name, batch in self.plan.cases:
                self._run_case(name, batch, dtype)
        return self.records

    def _run_case(self, name, batch, dtype):
        label = f"{name}@{batch} {dtype_name(dtype)}"
        skip = f"time budget of {self.plan.budget_s:g} s used up" if self.plan.budget_s is not None else ""
        if self._over_budget():
            for c in self.plan.contenders:
                self._add(name, batch, dtype, c, status="skipped", message=skip)
            return
        try:
            eager, eager_runs, ours = build_models(name, self.plan.seed)
            x, y = make_batch(name, batch, num_classes(eager), dtype, self.plan.device, self.plan.seed)
        except Exception as error:  # noqa: BLE001 - recorded for every contender of the case
            status = "unavailable" if isinstance(error, Unavailable) else "error"
            for c in self.plan.contenders:
                self._add(name, batch, dtype, c, status=status, message=f"{type(error).__name__}: {error}"[:300])
            return
        runs = {c: f"cnnkernels.models.{name}, use_backend({backend_of(c)!r})" for c in CONTENDERS
                if c.startswith("ours")}
        runs.update(eager=eager_runs, compile=f"torch.compile({eager_runs})")
        bases = {c: ours if c.startswith("ours") else eager for c in self.plan.contenders}
        groups = [self.plan.contenders] if self.timer.interleaves else [[c] for c in self.plan.contenders]
        for group in groups:
            if self._over_budget():
                for contender in group:
                    self._add(name, batch, dtype, contender, status="skipped", message=skip)
                continue
            print(f"[train] {label} {', '.join(group)}", file=sys.stderr, flush=True)
            self._measure(name, batch, dtype, group, bases, runs, x, y)
        del eager, ours, bases, x, y
        self._free()

    def _free(self):
        gc.collect()
        if self.plan.device == "cuda":
            torch.cuda.empty_cache()

    def _measure(self, name, batch, dtype, group, bases, runs, x, y):
        """Times the group's contenders (interleaved, where there are several) and records each."""
        outcomes, steps = {}, {}  # outcomes: contender -> (timing, peak, losses), or what it raised
        try:
            for contender in group:
                try:
                    if self.plan.device == "cuda":
                        self._free()
                        torch.cuda.synchronize()
                    torch.manual_seed(self.plan.seed + 1)  # the same dropout masks for every contender
                    steps[contender] = TrainStep(contender, bases[contender], self.plan.device, dtype, x, y,
                                                 own_cpu_rng=len(group) > 1)
                except Exception as error:  # noqa: BLE001 - one failing contender must not stop the run
                    outcomes[contender] = error
            for contender, timing in self._time(steps).items():
                if isinstance(timing, BaseException):
                    outcomes[contender] = timing
                    continue
                try:
                    losses = self._losses(steps[contender], timing)  # before the peak-memory steps
                    outcomes[contender] = (timing, self._peak_memory(steps[contender]), losses)
                except Exception as error:  # noqa: BLE001
                    outcomes[contender] = error
        finally:
            if "compile" in group:
                torch._dynamo.reset()
            del steps
            self._free()
        for contender in group:
            outcome = outcomes[contender]
            if isinstance(outcome, BaseException):
                status = "unavailable" if isinstance(outcome, Unavailable) else "error"
                self._add(name, batch, dtype, contender, status=status, runs=runs[contender],
                          message=f"{type(outcome).__name__}: {outcome}"[:300])
            else:
                timing, peak, losses = outcome
                self._add(name, batch, dtype, contender, status="ok", runs=runs[contender],
                          message="; ".join(timing.notes), timing=timing, peak=peak, losses=losses)

    def _time(self, steps):
        """{contender: Timing, or the exception its step raised}."""
        if self.timer.interleaves:
            return self.timer.time_all(steps)
        timings = {}
        for contender, step in steps.items():
            try:
                timings[contender] = self.timer.time(step, graph=False, pad=False)
            except Exception as error:  # noqa: BLE001
                timings[contender] = error
        return timings

    def _peak_memory(self, step):
        """Peak CUDA memory over PEAK_STEPS more steps, the statistics reset before them; None on a CPU."""
        if self.plan.device != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        for i in range(PEAK_STEPS):
            step(i)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()

    @staticmethod
    def _losses(step, timing):
        first_timed = len(step.losses) - len(timing.samples_ms)
        return {"loss_first_step": step.losses[0].float().item(),
                "loss_after_warmup": step.losses[CHECK_STEP].float().item(),
                "loss_first_timed": step.losses[first_timed].float().item(), "first_timed_step": first_timed}

    def _add(self, name, batch, dtype, contender, status, message="", runs=None, timing=None, peak=None,
             losses=None):
        r = {"section": "train", "name": f"{name}@{batch}", "model": name, "batch": batch,
             "dtype": dtype_name(dtype), "contender": contender, "runs": runs, "device": self.device_name,
             "status": status, "message": message}
        if timing is not None:
            r.update(ms_p20=timing.p20, ms_p50=timing.p50, ms_p80=timing.p80, reps=len(timing.samples_ms),
                     first_call_s=timing.first_call_s, images_per_second=batch / (timing.p50 * 1e-3),
                     peak_memory_bytes=peak, peak_memory_mib=None if peak is None else peak / 2 ** 20,
                     loss_check_step=CHECK_STEP, **losses)
        self.records.append(r)
        self.on_record()


def summarize(records):
    """Per (model, batch, dtype): each contender's step time, images/s and peak memory, ours' and
    compile's speedup over eager (eager ms / their ms), their peak memory over eager's, the loss
    check, and issue 7's target (ours at least TARGET_SPEEDUP x eager, peak memory no higher)."""
    cases = {}
    for r in records:
        cases.setdefault((r["name"], r["dtype"]), []).append(r)
    out = []
    for (name, dtype), rs in cases.items():
        by = {r["contender"]: r for r in rs if r["status"] == "ok"}
        eager = by.get("eager")
        entry = {"name": name, "model": rs[0]["model"], "batch": rs[0]["batch"], "dtype": dtype,
                 "status": {r["contender"]: r["status"] for r in rs},
                 "ms": {c: r["ms_p50"] for c, r in by.items()},
                 "images_per_second": {c: r["images_per_second"] for c, r in by.items()},
                 "peak_memory_mib": {c: r["peak_memory_mib"] for c, r in by.items()},
                 "speedup_vs_eager": {}, "peak_memory_vs_eager": {}, "loss_rel_diff_vs_eager": {},
                 "loss_agrees": {}}
        for c, r in by.items():
            if c == "eager" or eager is None:
                continue
            entry["speedup_vs_eager"][c] = eager["ms_p50"] / r["ms_p50"]
            if r["peak_memory_bytes"] is not None and eager["peak_memory_bytes"] is not None:
                entry["peak_memory_vs_eager"][c] = r["peak_memory_bytes"] / eager["peak_memory_bytes"]
            diff = max(rel_diff(r["loss_first_step"], eager["loss_first_step"]),
                       rel_diff(r["loss_after_warmup"], eager["loss_after_warmup"]))
            entry["loss_rel_diff_vs_eager"][c] = diff
            entry["loss_agrees"][c] = diff <= LOSS_RTOL
        speedup = entry["speedup_vs_eager"].get("ours")
        memory = entry["peak_memory_vs_eager"].get("ours")
        entry["target"] = {"speedup_at_least": TARGET_SPEEDUP,
                           "speedup_met": None if speedup is None else speedup >= TARGET_SPEEDUP,
                           "peak_memory_met": None if memory is None else memory <= 1.0}
        out.append(entry)
    return out


def loss_notes(entries):
    return [f"{e['name']} {e['dtype']}: {c}'s loss differs from eager's by {100 * d:.3g}% (more than "
            f"{100 * LOSS_RTOL:g}%; same weights and data): check its forward and backward"
            for e in entries for c, d in e["loss_rel_diff_vs_eager"].items() if not e["loss_agrees"][c]]
