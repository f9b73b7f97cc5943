"""Per-shape autotuning of the Triton kernels, with results kept on disk across processes.

Tuned configs live in ``$CNNKERNELS_CACHE_DIR/autotune.json`` (default
``~/.cache/cnnkernels/autotune.json``), keyed by kernel, GPU name, triton version and shape.
Every tuning also appends each candidate's time, or why it failed, to ``autotune-timings.jsonl``
beside it: how close the runners-up came, for whoever next changes the candidate lists.
``CNNKERNELS_AUTOTUNE=0`` turns tuning off: untuned shapes then use the first candidate.
"""

import functools
import json
import math
import os
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton

from . import _runtime


class Config(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int
    tma: bool = False  # conv GEMM: load tiles through TMA tensor descriptors where eligible
    boxes: bool = False  # conv, with tma: rows are (images x rows x columns) boxes of the output, see conv.py
    persistent: bool = False  # conv, with boxes: one program per SM walks the tiles


def cache_path() -> str:
    root = os.environ.get("CNNKERNELS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "cnnkernels")
    return os.path.join(root, "autotune.json")


@functools.lru_cache(maxsize=None)
def _device_facts(index: int):
    major, minor = torch.cuda.get_device_capability(index)
    return torch.cuda.get_device_name(index), major, minor


def device_facts(device: torch.device):
    """(name, capability major, minor) of a CUDA device, looked up once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _device_facts(index)


def is_hopper(device: torch.device) -> bool:
    return device_facts(device)[1] == 9


def pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, 1 << max(0, math.ceil(math.log2(max(1, n)))))


class Tuner:
    """Picks the fastest config per key; remembers it in memory and in the JSON file."""

    def __init__(self, kernel_name: str):
        self.kernel_name = kernel_name
        self._memory: dict = {}
        self._lock = threading.Lock()

    def _full_key(self, device: torch.device, key: tuple) -> str:
        name, major, minor = device_facts(device)
        return f"{self.kernel_name}|{name}|sm{major}{minor}|triton{_runtime.triton_version()}|{key!r}"

    def pick(
        self,
        device: torch.device,
        key: tuple,
        candidates: Sequence[Config],
        bench: Callable[[Config], float],
        can_run: bool,
        compile_only: Optional[Callable[[Config], None]] = None,
    ) -> Config:
        """The tuned config for `key`, tuning now if needed and allowed.

        `bench(config)` must time the kernel on scratch buffers. `can_run` is False for fake
        tensors (torch.compile tracing), which get the cached choice or the first candidate.
        `compile_only(config)`, if given, compiles the kernel without launching it (Triton's
        `warmup`): all candidates are then compiled at once before any is timed.
        """
        full_key = self._full_key(device, key)
        with self._lock:
            if full_key in self._memory:
                return self._memory[full_key]
            stored = _disk_entries().get(full_key)
            if stored is not None:
                config = Config(*stored)
                self._memory[full_key] = config
                return config
            if len(candidates) == 1 or not can_run or not _runtime.env_flag("CNNKERNELS_AUTOTUNE", True):
                return candidates[0]
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError(
                    f"cnnkernels: {self.kernel_name} has no tuned config for this shape and cannot autotune "
                    "during CUDA graph capture; warm up first (run the model once eagerly, outside capture) "
                    "or set CNNKERNELS_AUTOTUNE=0"
                )
            if compile_only is not None:
                compile_concurrently(compile_only, candidates)
            timings, failures = [], []
            for config in candidates:
                try:
                    timings.append((bench(config), config))
                except Exception as error:  # e.g. out of shared memory for this tile on this GPU
                    failures.append((config, f"{type(error).__name__}: {str(error)[:200]}"))
            _log_timings(full_key, timings, failures)
            if not timings:
                return candidates[0]
            best = min(timings, key=lambda tc: tc[0])[1]
            self._memory[full_key] = best
            _write_disk(full_key, best)
            return best


def compile_concurrently(compile_only: Callable[[Config], None], candidates: Sequence[Config]) -> None:
    """Compiles every candidate on a thread pool through Triton's AsyncCompileMode. Triton's
    compiler passes and ptxas run outside the GIL (two threads compiled the conv's candidates
    1.6x faster on this project's 2-core machine), so tuning a new shape waits for about the
    slowest compile rather than the sum of all. A failed compile is left for the timing loop."""
    workers = min(len(candidates), os.cpu_count() or 1)
    if workers < 2 or not hasattr(triton, "AsyncCompileMode"):
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="cnnkernels-compile") as pool:
        mode = triton.AsyncCompileMode(pool, ignore_errors=True)
        try:
            mode.__enter__()
        except RuntimeError:  # the caller's own AsyncCompileMode is active: it compiles our kernels
            return
        try:
            for config in candidates:
                try:
                    compile_only(config)
                except Exception:  # noqa: BLE001 - e.g. a tile this GPU cannot hold; bench() meets it again
                    pass
        finally:
            mode.__exit__(None, None, None)


def bench_ms(fn: Callable[[], None]) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median")


_disk_lock = threading.Lock()
_disk_loaded: dict = {}  # cache_path() -> entries read from it, once per process


def _disk_entries() -> dict:
    path = cache_path()
    if path not in _disk_loaded:
        _disk_loaded[path] = _read_disk()
    return _disk_loaded[path]


def _read_disk() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _log_timings(full_key: str, timings, failures) -> None:
    """Appends one JSON line: every candidate's median ms, fastest first, and the failures."""
    record = {"key": full_key,
              "ms": [[list(config), ms] for ms, config in sorted(timings, key=lambda tc: tc[0])],
              "failed": [[list(config), why] for config, why in failures]}
    path = os.path.join(os.path.dirname(cache_path()), "autotune-timings.jsonl")
    with _disk_lock:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            warnings.warn(f"cnnkernels: could not log autotune timings to {path}: {e}")


def _write_disk(full_key: str, config: Config) -> None:
    """Merge one entry into the JSON file (atomic replace, so concurrent processes never see half a file)."""
    path = cache_path()
    with _disk_lock:
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            data = _read_disk()
            data[full_key] = list(config)
            _disk_entries()[full_key] = list(config)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".autotune-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            warnings.warn(f"cnnkernels: could not save autotune results to {path}: {e}")
