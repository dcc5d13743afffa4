"""The workshop's metrics arithmetic, in one place: FLOPs per token, the GPUs' peak FLOP/s, MFU, tokens/s,
the digest of the Trainer's log history (perplexity among it), and the tables they are printed in.

The measuring callback (``trainer.MeasureCallback``), ``workshop train``'s metrics.json and
``workshop report`` all compute them here, so a number in the log line, in metrics.json and in the
report is the same number.
"""

from __future__ import annotations

import math


def flops_per_token(n_params: int, n_layers: int, hidden: int, seq_len: float) -> float:
    """Training FLOPs per token: 6 N for the weights (forward + backward) plus 12 L s h for attention."""
    return 6 * n_params + 12 * n_layers * seq_len * hidden


# Dense peak TFLOP/s by GPU name and precision, from the vendors' data sheets (no sparsity).
# fp32 without TF32 runs on the CUDA cores. A GPU missing here gets no MFU rather than a guess.
PEAK_TFLOPS = {
    "H200": {"bf16": 989, "fp16": 989, "fp32": 67},
    "H100 80GB HBM3": {"bf16": 989, "fp16": 989, "fp32": 67},  # SXM
    "H100 PCIe": {"bf16": 756, "fp16": 756, "fp32": 51},
    "H100 NVL": {"bf16": 835, "fp16": 835, "fp32": 60},
    "A100": {"bf16": 312, "fp16": 312, "fp32": 19.5},
    "L40S": {"bf16": 362, "fp16": 362, "fp32": 91.6},
    "A10": {"bf16": 125, "fp16": 125, "fp32": 31.2},
    "V100": {"fp16": 125, "fp32": 15.7},
}


def peak_flops(gpu_name: str | None, precision: str) -> float | None:
    """Peak FLOP/s of one GPU at this precision, or None when the GPU is not in the table."""
    if not gpu_name:
        return None
    for key, peaks in PEAK_TFLOPS.items():
        if key in gpu_name and precision in peaks:
            return peaks[precision] * 1e12
    return None


def mfu(tokens_per_s: float | None, flops_per_token: float, peak: float | None, world_size: int) -> float | None:
    """Model FLOPs utilisation: the FLOP/s the tokens took over what the GPUs could do; None without a peak."""
    if not peak or not tokens_per_s:
        return None
    return tokens_per_s * flops_per_token / (peak * world_size)


def perplexity(eval_loss: float | None) -> float | None:
    """exp of the mean cross-entropy per target token: the number of equally likely next tokens the model
    hesitates between. None past exp(700), which a float cannot hold (a loss that high means nothing)."""
    return math.exp(eval_loss) if eval_loss is not None and eval_loss < 700 else None


def digest(history: list[dict]) -> dict:
    """The workshop's table entries that the Trainer's log history holds, exactly as logged."""
    train = [e for e in history if "loss" in e]
    evals = [e for e in history if "eval_loss" in e]
    summary = next((e for e in reversed(history) if "train_runtime" in e), {})
    last = next((e for e in reversed(history) if e.get("step") is not None), {})
    # An evaluation at the end of epoch 1 sits exactly on the epoch's last step; otherwise scale.
    first_epoch_eval = next((e for e in evals if e.get("epoch") == 1), None)
    if first_epoch_eval is not None:
        steps_per_epoch = first_epoch_eval["step"]
    elif last.get("epoch"):
        steps_per_epoch = round(last["step"] / last["epoch"])
    else:
        steps_per_epoch = None
    return {
        "final_train_loss": train[-1]["loss"] if train else None,
        "mean_train_loss": summary.get("train_loss"),
        "eval_loss_per_epoch": [e["eval_loss"] for e in evals],
        "final_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "perplexity": perplexity(evals[-1]["eval_loss"]) if evals else None,
        "eval_samples_per_second": evals[-1].get("eval_samples_per_second") if evals else None,
        "steps_per_epoch": steps_per_epoch,
        "total_steps": last.get("step"),
        "epochs_done": last.get("epoch"),
        "train_runtime_s": summary.get("train_runtime"),
    }


def samples_per_second(train_samples: int | None, time_per_epoch_s: float | None) -> float | None:
    """Training samples per second of training steps: an epoch's samples (all ranks) over the time per epoch.

    The same clock as the time per epoch, which leaves evaluation and checkpoints out; the Trainer's own
    ``train_samples_per_second`` counts them, so it falls with every evaluation and checkpoint and would
    compare two runs' evaluation and disk as much as their training.
    """
    return train_samples / time_per_epoch_s if train_samples and time_per_epoch_s else None


# --------------------------------------------------------------------------------------------------
# Tables


def clock_time(seconds: float) -> str:
    """Seconds as a clock reads them: 0:07, 12:34, 1:02:03."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_breakdown(breakdown: dict[str, float]) -> str:
    """A job's seconds per phase (``time_breakdown_s``) as a table with each phase's share of the wall time."""
    wall = sum(breakdown.values())
    lines = ["| phase | seconds | share |", "|---|---|---|"]
    lines += [f"| {phase} | {seconds:.1f} | {100 * seconds / wall if wall else 0:.0f}% |"
              for phase, seconds in breakdown.items()]
    return "\n".join(lines + [f"| wall time | {wall:.1f} | 100% |"])


def show(value, key: str = "") -> str:
    """One value as a table cell; the key says its unit (mfu and efficiencies in %, *_gib to 2 places)."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        if key == "mfu" or key.endswith("efficiency") or key.endswith("_over_predicted"):
            return f"{100 * value:.1f}%"
        if key.endswith("_gib"):
            return f"{value:.2f}"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.4g}"
    if isinstance(value, list):
        return ", ".join(show(v, key) for v in value)
    if isinstance(value, dict):
        return ", ".join(f"{k}: {show(v, key)}" for k, v in value.items())
    return str(value).replace("|", "\\|")


def format_table(metrics: dict) -> str:
    """A run's metrics (metrics.json) as a two-column Markdown table; train.py prints it at the end of a run."""
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {key} | {show(value, key)} |" for key, value in metrics.items()]
    return "\n".join(lines)


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Rows as a Markdown table of the given (header, row key) columns."""
    lines = ["| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(show(r.get(k), k) for _, k in columns) + " |" for r in rows]
    return "\n".join(lines)
