"""The report's plots (PNG): ``workshop report`` calls ``write_plots``; no display is needed.

    loss.png        train loss (solid) and eval loss (dashed, dots) of every run against epochs
    gpu_memory.png  GPU memory over time per run: nvidia-smi's memory.used (the fullest GPU at each
                    sample, one line per host), or PyTorch's reserved/allocated from steps.jsonl
                    where no nvidia-smi CSV exists
    peaks.png       per run: peak GPU memory (PyTorch allocated and reserved, nvidia-smi, predicted)
                    and time per epoch, as bars

Figures are drawn with matplotlib's object API on the Agg canvas (no pyplot, so no global backend
switch) and written under a temporary name, then renamed: a reader never sees half a PNG.
"""

from __future__ import annotations

import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from workshop.units import mib_to_gib


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def run_labels(rows: list[dict]) -> list[str]:
    """Short, unique legend labels: the setting, the model when runs differ in it, the run id when still ambiguous."""
    models = {r.get("model") for r in rows}
    labels = [(f"{r.get('model')} " if len(models) > 1 else "") + r.get("setting", r["run"]) for r in rows]
    return [f"{label} ({r['run_id']})" if labels.count(label) > 1 else label for label, r in zip(labels, rows)]


def plot_losses(runs, labels: list[str], path: Path) -> Path | None:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    drawn = False
    for i, (run, label) in enumerate(zip(runs, labels)):
        color = f"C{i % 10}"
        train = [(e["epoch"], e["loss"]) for e in run.log_history if "loss" in e and "epoch" in e]
        evals = [(e["epoch"], e["eval_loss"]) for e in run.log_history if "eval_loss" in e and "epoch" in e]
        if train:
            ax.plot(*zip(*train), color=color, label=f"{label} train")
        if evals:
            ax.plot(*zip(*evals), color=color, linestyle="--", marker="o", label=f"{label} eval")
        drawn = drawn or bool(train or evals)
    if not drawn:
        return None
    return _finish(fig, ax, path, "epoch", "loss", "Loss: train (solid) and eval (dashed)")


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def gpu_memory_series(run) -> list[tuple[str, list[float], list[float]]]:
    """(name, seconds, GiB) lines for one run: nvidia-smi per host, else steps.jsonl reserved and allocated."""
    series = []
    starts = [s["time"] for samples in run.gpu_csv.values() for s in samples if s["time"] is not None]
    t0 = min(starts) if starts else None
    for host, samples in run.gpu_csv.items():
        fullest: dict = {}  # one sample time -> the largest memory.used over this host's GPUs
        for s in samples:
            if s["time"] is not None:
                fullest[s["time"]] = max(fullest.get(s["time"], 0.0), s["memory_used_mib"])
        if fullest:
            times = sorted(fullest)
            series.append((f"nvidia-smi {host}", [(t - t0).total_seconds() for t in times],
                           [mib_to_gib(fullest[t]) for t in times]))
    if not series:
        for key, name in (("gpu_reserved_gib", "reserved"), ("gpu_allocated_gib", "allocated")):
            points = [(s["time_s"], s[key]) for s in run.steps if s.get(key) is not None and "time_s" in s]
            if points:
                series.append((f"PyTorch {name}", *map(list, zip(*points))))
    return series


def plot_gpu_memory(runs, labels: list[str], path: Path) -> Path | None:
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    drawn = False
    for i, (run, label) in enumerate(zip(runs, labels)):
        for j, (name, seconds, gib) in enumerate(gpu_memory_series(run)):
            ax.plot(seconds, gib, color=f"C{i % 10}", linestyle=("-", ":", "--", "-.")[j % 4],
                    label=f"{label}: {name}")
            drawn = True
    if not drawn:
        return None
    ax.set_ylim(bottom=0)
    return _finish(fig, ax, path, "seconds since the first sample", "GPU memory (GiB)", "GPU memory over time")


PEAK_BARS = [("PyTorch allocated", "peak_gpu_allocated_gib"), ("PyTorch reserved", "peak_gpu_reserved_gib"),
             ("nvidia-smi", "peak_nvidia_smi_gib"), ("predicted (allocated)", "predicted_peak_allocated_gib"),
             ("predicted (nvidia-smi)", "predicted_gpu_total_gib")]


def plot_peaks(rows: list[dict], labels: list[str], path: Path) -> Path | None:
    if not rows:
        return None
    fig = Figure(figsize=(max(8.0, 1.6 * len(rows) + 4), 4.8))
    mem, time = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    positions = range(len(rows))
    width = 0.8 / len(PEAK_BARS)
    highest = max([r.get(key) or 0.0 for r in rows for _, key in PEAK_BARS] + [1.0])
    for k, (name, key) in enumerate(PEAK_BARS):
        values = [r.get(key) or 0.0 for r in rows]
        hatch = "//" if key.startswith("predicted") else None
        mem.bar([p + (k - (len(PEAK_BARS) - 1) / 2) * width for p in positions], values, width, label=name,
                color=f"C{k}", hatch=hatch, edgecolor="white" if hatch else None)
    mem.set_ylabel("GiB per GPU")
    mem.set_title("Peak GPU memory")
    mem.set_ylim(0, highest * 1.4)  # room for the legend above the bars
    mem.legend(fontsize="small", ncol=2, loc="upper left")
    time.bar(list(positions), [r.get("time_per_epoch_s") or 0.0 for r in rows], 0.6, color="C7")
    time.set_ylabel("seconds")
    time.set_title("Time per epoch")
    for ax in (mem, time):
        ax.set_xticks(list(positions))
        ax.set_xticklabels(labels, rotation=30, ha="right", fontsize="small")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def write_plots(runs, rows: list[dict], out_dir: Path) -> list[Path]:
    """loss.png, gpu_memory.png and peaks.png in out_dir (each only where there is something to draw)."""
    labels = run_labels(rows)
    out_dir = Path(out_dir)
    written = [plot_losses(runs, labels, out_dir / "loss.png"),
               plot_gpu_memory(runs, labels, out_dir / "gpu_memory.png"),
               plot_peaks(rows, labels, out_dir / "peaks.png")]
    return [p for p in written if p is not None]
