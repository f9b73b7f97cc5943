"""PNG plots of a run: per-layer speedups, the roofline with every layer placed on it, and model
images/s. Needs matplotlib (the `bench` extra)."""
from .common import ours
from .report import speedups


# One color per contender in every plot; a CPU peer takes the color of the GPU peer it stands for.
COLORS = {"cudnn": "tab:blue", "eager": "tab:blue", "cudnn_fused": "tab:orange", "onednn": "tab:orange",
          "compile": "tab:green", "compile_max_autotune": "tab:olive", "triton": "tab:red", "cuda": "tab:purple",
          "auto": "tab:brown"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _empty(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_speedups(path, records, device, dtype, batch, title):
    """One panel per backend of ours: a bar per (layer, peer) with peer time / our time."""
    plt = _pyplot()
    from matplotlib import ticker
    layer = [r for r in records if r["section"] == "layer" and r["dtype"] == dtype and r["batch"] == batch]
    names = list(dict.fromkeys(r["name"] for r in layer))
    present = list(dict.fromkeys(r["contender"] for r in layer))
    mine = [c for c in ours(device) if c in present]
    theirs = [c for c in present if c not in mine]
    fig, axes = plt.subplots(max(len(mine), 1), 1, figsize=(max(8, 0.45 * len(names) + 2), 4.5 * max(len(mine), 1)),
                             squeeze=False)
    for ax, backend in zip(axes[:, 0], mine or [None]):
        if backend is None or not names:
            _empty(ax, "no layer results of ours")
            continue
        width = 0.8 / max(len(theirs), 1)
        for i, peer in enumerate(theirs):
            s = speedups(layer, backend, peer)
            xs = [j + (i - (len(theirs) - 1) / 2) * width for j, n in enumerate(names) if n in s]
            ax.bar(xs, [s[n] for n in names if n in s], width, label=f"vs {peer}", color=COLORS.get(peer))
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log", base=2)
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.set_xticks(range(len(names)), names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel(f"{backend} speedup (x)")
        ax.set_title(f"{backend}: {title}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_roofline(path, records, peaks, dtype, batch, title):
    """Achieved TFLOP/s against arithmetic intensity (FLOPs per minimum byte), under the measured
    roof min(peak FLOP/s, intensity x copy bandwidth)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 5.5))
    layer = [r for r in records if r["section"] == "layer" and r["dtype"] == dtype and r["batch"] == batch
             and r["status"] == "ok"]
    peak = peaks["matmul_flops"].get(dtype)
    if not layer or not peak:
        _empty(ax, "no layer results")
    else:
        bw = peaks["copy_bytes_per_s"]
        ai = [r["flops"] / r["min_bytes"] for r in layer]
        lo, hi = min(ai) / 2, max(ai) * 2
        xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
        ax.plot(xs, [min(peak, x * bw) / 1e12 for x in xs], color="black", label="roofline (measured peaks)")
        for contender in dict.fromkeys(r["contender"] for r in layer):
            mine = [r for r in layer if r["contender"] == contender]
            ax.scatter([r["flops"] / r["min_bytes"] for r in mine], [r["tflops"] for r in mine], s=18,
                       label=contender, alpha=0.8, color=COLORS.get(contender))
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("arithmetic intensity (FLOP per minimum byte)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"{title}; peaks {peak / 1e12:.3g} TFLOP/s, {bw / 1e9:.3g} GB/s", fontsize=9)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_models(path, records, dtype, title):
    """Images/s per model@batch and contender (log scale where they differ widely, as LeNet-5 and
    VGG-16 do)."""
    plt = _pyplot()
    models = [r for r in records if r["section"] == "model" and r["dtype"] == dtype and r["status"] == "ok"]
    names = list(dict.fromkeys(r["name"] for r in models))
    contenders = list(dict.fromkeys(r["contender"] for r in models))
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(names) + 2), 4.5))
    if not models:
        _empty(ax, "no model results")
    else:
        width = 0.8 / len(contenders)
        for i, c in enumerate(contenders):
            by = {r["name"]: r["images_per_second"] for r in models if r["contender"] == c}
            xs = [j + (i - (len(contenders) - 1) / 2) * width for j, n in enumerate(names) if n in by]
            ax.bar(xs, [by[n] for n in names if n in by], width, label=c, color=COLORS.get(c))
        ax.set_xticks(range(len(names)), names)
        values = [r["images_per_second"] for r in models]
        if max(values) > 50 * min(values):
            ax.set_yscale("log")
        ax.set_ylabel("images/s")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(out_dir, stem, records, peaks, device, dtype, batch, device_name):
    """The three PNGs; their paths. Without matplotlib, none (and the reason)."""
    try:
        _pyplot()
    except ImportError as error:
        return [], f"no plots: matplotlib is not installed ({error})"
    title = f"{device_name}, {dtype}, batch {batch}"
    paths = [out_dir / f"{stem}-speedup.png", out_dir / f"{stem}-roofline.png", out_dir / f"{stem}-models.png"]
    plot_speedups(paths[0], records, device, dtype, batch, title)
    plot_roofline(paths[1], records, peaks, dtype, batch, title)
    plot_models(paths[2], records, dtype, f"{device_name}, {dtype}")
    return paths, None

