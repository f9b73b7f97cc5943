"""What PyTorch's THP_MEM_ALLOC_ENABLE=1 (transparent huge pages for CPU tensors of 2 MiB or
more) does to ops whose outputs are 32 MiB or more, which glibc maps afresh, and the first
write page-faults in 4 KiB pages, on every call. Each op runs alone in a fresh process, with
the variable 0 and 1 alternating; fp32, channels_last; the time and minor page faults of each
of the first calls, since huge pages take a few calls to come cheaply (the kernel compacts
memory for the first ones).
    python benchmarks/huge_pages.py
"""
import json
import os
import resource
import subprocess
import sys
import time

CALLS = 8
OPS = ["eager relu(x + y) 16x256x56x56", "ours add_relu 16x256x56x56",
       "eager conv+relu 64>64 3x3 @224 b4", "ours conv2d_relu 64>64 3x3 @224 b4"]


def child(op):
    import torch
    import torch.nn.functional as F
    import cnnkernels
    torch.set_grad_enabled(False)
    torch.manual_seed(0)

    def cl(*shape):
        return torch.randn(*shape).contiguous(memory_format=torch.channels_last)
    if "add" in op or "x + y" in op:
        a, b = cl(16, 256, 56, 56), cl(16, 256, 56, 56)
        fn = (lambda: cnnkernels.add_relu(a, b)) if op.startswith("ours") else (lambda: torch.relu(a + b))
    else:
        x, w, bias = cl(4, 64, 224, 224), torch.randn(64, 64, 3, 3) / 24, torch.randn(64)
        fn = ((lambda: cnnkernels.conv2d_relu(x, w, bias, padding=1)) if op.startswith("ours")
              else (lambda: F.relu(F.conv2d(x, w, bias, padding=1), inplace=True)))
    times, faults = [], []
    for _ in range(CALLS):
        f0, t0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
        fn()
        times.append(round((time.perf_counter() - t0) * 1e3, 1))
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    print(json.dumps({"ms": times, "faults": faults}))


def main():
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        print(f"transparent_hugepage/enabled: {f.read().strip()}; {CALLS} calls per process, ms (minor faults)")
    for op in OPS:
        for rnd in range(2):
            for thp in ("0", "1"):
                env = dict(os.environ, THP_MEM_ALLOC_ENABLE=thp)
                r = subprocess.run([sys.executable, __file__, op], env=env, capture_output=True, text=True)
                lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
                if not lines:
                    print(f"{op} THP={thp}: failed: {r.stderr[-300:]}")
                    continue
                d = json.loads(lines[0])
                calls = " ".join(f"{t:6.1f}({f})" for t, f in zip(d["ms"], d["faults"]))
                print(f"{op:36s} THP={thp}: {calls}  | last 4 best {min(d['ms'][-4:]):6.1f}", flush=True)


if __name__ == "__main__":
    main() if len(sys.argv) == 1 else child(sys.argv[1])
