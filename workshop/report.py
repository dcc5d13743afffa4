"""``workshop report``: the workshop's metrics table, a comparison across runs, and plots, from run folders.

    workshop report logs/baseline/12345           # one run: report.md, report.csv and plots in its folder
    workshop report logs/                         # every run below logs/: comparison in logs/report/
    workshop report logs/deepspeed_single_gpu logs/offload --out /tmp/zero_vs_offload

A run folder is any folder holding metrics.json or log_history.json (or config.json + status.json:
a run that died before logging, e.g. out of memory, keeps its row). Every number is read from the
folder itself:

* from ``log_history.json`` (the Trainer's own records): final train loss (the last logged
  ``loss``), the Trainer's mean train loss, eval loss per epoch, eval samples/s, steps per epoch,
  total steps, train runtime;
* from ``metrics.json``: time per epoch, train samples/s (an epoch's samples over it), tokens/s and
  MFU, all on one clock, the training steps alone (evaluation and checkpoints left out); a run
  without metrics.json (stopped, failed) has none of them; PyTorch's peak allocated/reserved GPU
  memory, peak host RSS (``steps.jsonl`` stands in for these where metrics.json is missing);
* from ``gpu_memory-<host>.csv``: the largest ``memory.used`` of any GPU, per host (nvidia-smi);
* from ``host_memory-<host>.csv``: the largest ``used_mib``, per host;
* from ``config.json``: the settings, fed to ``workshop.memory`` for the predicted memory shown
  beside the measured one.

For each rung among the runs, a table with the columns of that rung's fill-in table (its README),
in the same order, so a participant can check what they filled in; perplexity (exp of the final
eval loss) joins it where a run trained on plain text.

Runs that differ only in their GPU count get a scaling efficiency: train samples/s per GPU relative to
the smallest GPU count among them; under the tables, a multi-GPU run without a comparable one-GPU run
says what it was measured against, or which settings keep it from any.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from workshop import memory, metrics, shapes, stages
from workshop.ds_config import deepspeed_choices
from workshop.errors import WorkshopError
from workshop.files import write_text
from workshop.metrics import format_table, markdown_table
from workshop.shapes import ModelShape
from workshop.units import GIB, mib_to_gib
RUN_MARKERS = ("metrics.json", "log_history.json")
SKIP_DIRS = {"model", "checkpoints", "tensorboard", "report", "__pycache__"}


# ----------------------------------------------------------------------------------------------
# Reading run folders
# ----------------------------------------------------------------------------------------------
def is_run_dir(path: Path) -> bool:
    return any((path / m).is_file() for m in RUN_MARKERS) or (
        (path / "status.json").is_file() and (path / "config.json").is_file())


def find_run_dirs(paths: list[str | Path]) -> list[Path]:
    """Run folders at or below the given paths, sorted, each once; never looks inside a run's model/checkpoints."""
    found: list[Path] = []
    for root in map(Path, paths):
        if not root.is_dir():
            raise WorkshopError(f"{root}: no such folder: give run folders (logs/<stage>/<run id>) or logs/")
        stack = [root]
        while stack:
            folder = stack.pop()
            if is_run_dir(folder):
                found.append(folder)
                continue
            stack += [p for p in folder.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                      and not p.name.startswith(".")]
    unique = {p.resolve(): p for p in found}
    return sorted(unique.values(), key=lambda p: str(p))


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except ValueError as e:
        raise WorkshopError(f"{path}: not valid JSON ({e}): the run may have been killed while writing it") from None


def read_steps(path: Path) -> list[dict]:
    """steps.jsonl; a last line cut short by a killed job is skipped."""
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def parse_time(text: str) -> dt.datetime | None:
    """nvidia-smi's '2026/11/23 14:02:11.123', ISO 8601, or seconds since the epoch."""
    text = text.strip()
    for fmt in ("%Y/%m/%d %H:%M:%S.%f", "%Y/%m/%d %H:%M:%S"):
        try:
            return dt.datetime.strptime(text, fmt)
        except ValueError:
            pass
    try:
        return dt.datetime.fromisoformat(text)
    except ValueError:
        pass
    try:
        return dt.datetime.fromtimestamp(float(text))
    except ValueError:
        return None


def _number(text: str) -> float | None:
    """'1234', '1234 MiB' (csv without nounits) -> float; '[N/A]', '[Not Supported]' -> None."""
    text = text.strip().split(" ")[0]
    try:
        return float(text)
    except ValueError:
        return None


def _csv_rows(path: Path) -> list[dict]:
    """Rows keyed by the header's names without units ('memory.used [MiB]' -> 'memory.used').

    A logger that was restarted repeats the header; a line cut short by a killed job is skipped.
    """
    rows, header = [], None
    for fields in csv.reader(io.StringIO(path.read_text()), skipinitialspace=True):
        if not fields:
            continue
        names = [f.split(" [")[0].strip() for f in fields]
        if names and names[0] == "timestamp":
            header = names
            continue
        if header is None or len(fields) != len(header):
            continue
        rows.append(dict(zip(header, fields)))
    return rows


def read_gpu_csv(path: Path) -> list[dict]:
    """The nvidia-smi logger's samples: time, index, name, memory used/total (MiB), utilisation (%), power (W)."""
    samples = []
    for row in _csv_rows(path):
        used = _number(row.get("memory.used", ""))
        if used is None:
            continue
        samples.append({"time": parse_time(row["timestamp"]), "index": int(_number(row.get("index", "0")) or 0),
                        "name": row.get("name", "").strip(), "memory_used_mib": used,
                        "memory_total_mib": _number(row.get("memory.total", "")),
                        "utilization_pct": _number(row.get("utilization.gpu", "")),
                        "power_w": _number(row.get("power.draw", ""))})
    return samples


def read_host_csv(path: Path) -> list[dict]:
    """The host memory logger's samples: time, used, total, available (MiB)."""
    samples = []
    for row in _csv_rows(path):
        used = _number(row.get("used_mib", ""))
        if used is None:
            continue
        samples.append({"time": parse_time(row["timestamp"]), "used_mib": used,
                        "total_mib": _number(row.get("total_mib", "")),
                        "available_mib": _number(row.get("available_mib", ""))})
    return samples


def _per_host(folder: Path, prefix: str, reader) -> dict[str, list[dict]]:
    return {p.name[len(prefix) + 1:-4]: reader(p) for p in sorted(folder.glob(f"{prefix}-*.csv"))}


@dataclass
class Run:
    path: Path
    config: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    log_history: list = field(default_factory=list)
    steps: list = field(default_factory=list)
    status: dict = field(default_factory=dict)
    gpu_csv: dict = field(default_factory=dict)   # host -> samples
    host_csv: dict = field(default_factory=dict)  # host -> samples

    @property
    def name(self) -> str:
        return f"{self.path.parent.name}/{self.path.name}"


def load_run(path: str | Path) -> Run:
    path = Path(path)
    return Run(path=path, config=_read_json(path / "config.json") or {},
               metrics=_read_json(path / "metrics.json") or {},
               log_history=_read_json(path / "log_history.json") or [], steps=read_steps(path / "steps.jsonl"),
               status=_read_json(path / "status.json") or {},
               gpu_csv=_per_host(path, "gpu_memory", read_gpu_csv),
               host_csv=_per_host(path, "host_memory", read_host_csv))


# ----------------------------------------------------------------------------------------------
# One run's numbers
# ----------------------------------------------------------------------------------------------
def nvidia_smi_peaks(gpu_csv: dict[str, list[dict]]) -> dict[str, float]:
    """Largest memory.used of any GPU, per host, in GiB (nvidia-smi's MiB / 1024)."""
    return {host: mib_to_gib(max(s["memory_used_mib"] for s in samples)) for host, samples in gpu_csv.items() if samples}


def host_memory_peaks(host_csv: dict[str, list[dict]]) -> dict[str, float]:
    return {host: mib_to_gib(max(s["used_mib"] for s in samples)) for host, samples in host_csv.items() if samples}


def _first(*values):
    return next((v for v in values if v is not None), None)


def _ds_config(run: Run) -> dict | None:
    """The run's DeepSpeed JSON as config.json records it (resolved); None without DeepSpeed."""
    ds = run.config.get("deepspeed_config")
    return ds if isinstance(ds, dict) else None


def settings(run: Run) -> dict:
    """Who ran what: metrics.json's labels first, config.json where metrics.json is missing (a failed run)."""
    m, cfg = run.metrics, run.config
    training, env = cfg.get("training") or {}, cfg.get("environment") or {}
    data, labels = cfg.get("data") or {}, cfg.get("labels") or {}
    model = cfg.get("model") or {}
    ds_stage, ds_opt, ds_param = deepspeed_choices(_ds_config(run))
    deepspeed = _first(m.get("deepspeed"), labels.get("deepspeed"))
    stage = m.get("zero_stage") if "zero_stage" in m else ds_stage
    micro = _first(m.get("per_device_train_batch_size"), training.get("per_device_train_batch_size"))
    accum = _first(m.get("gradient_accumulation_steps"), training.get("gradient_accumulation_steps"))
    world = _first(m.get("world_size"), env.get("world_size"), 1)
    return {
        "run": run.name,
        "status": run.status.get("status") or ("completed" if m else None),
        "stage": _first(m.get("stage"), labels.get("stage"), (cfg.get("workshop") or {}).get("stage"),
                        run.path.parent.name),
        "run_id": _first(m.get("run_id"), labels.get("run_id"), run.path.name),
        "model": _first(m.get("model"), labels.get("model"), model.get("model_name_or_path")),
        "dataset": _first(m.get("dataset"), labels.get("dataset"), data.get("dataset_name")),
        "device": env.get("device"),
        "precision": _first(m.get("precision"), training.get("precision")),
        "deepspeed": deepspeed,
        "zero_stage": stage,
        "offload_optimizer": m.get("offload_optimizer") if "offload_optimizer" in m else ds_opt,
        "offload_param": m.get("offload_param") if "offload_param" in m else ds_param,
        "world_size": world,
        "num_nodes": _first(m.get("num_nodes"), env.get("num_nodes"), 1),
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": accum,
        "global_batch_size": _first(m.get("global_batch_size"),
                                    micro * accum * world if micro and accum and world else None),
        "max_seq_length": _first(m.get("max_seq_length"), data.get("max_seq_length")),
        "epochs": _first(m.get("epochs"), training.get("num_train_epochs")),
        # what else makes a training step's work per sample (SCALING_KEYS), as config.json records it
        "train_samples": _first(m.get("train_samples"), (cfg.get("data_stats") or {}).get("train_samples")),
        "pad_to_max_length": data.get("pad_to_max_length"),
        "pad_to_multiple_of": data.get("pad_to_multiple_of"),
        "loss_on": data.get("loss_on"),
        "attn_implementation": model.get("attn_implementation"),
        "fast_kernels": model.get("fast_kernels"),
        "gradient_checkpointing": training.get("gradient_checkpointing"),
        "torch_compile": training.get("torch_compile"),
    }


def setting_label(row: dict) -> str:
    """The row's stage label: 'Trainer', 'ZeRO-2', 'ZeRO-3 + opt cpu + params cpu', ' x8 GPUs' (stages.label)."""
    return stages.label(row.get("zero_stage"), row.get("offload_optimizer"), row.get("offload_param"),
                        row.get("world_size") or 1)


def _seq_len_at_peak(run: Run) -> int | None:
    """Tokens per sample in the longest batch: dynamic padding pads each batch only to its longest sample."""
    m, cfg = run.metrics, run.config
    data, stats = cfg.get("data") or {}, cfg.get("data_stats") or {}
    max_len = _first(m.get("max_seq_length"), data.get("max_seq_length"))
    longest = _first(m.get("length_max"), stats.get("length_max"))
    if data.get("pad_to_max_length") or longest is None:
        return int(max_len) if max_len else None
    seq = longest  # never above max_len: prepare() keeps no sample longer than --max_seq_length
    # the multiple the collator rounded to; where config.json does not say, its default: 8 on a GPU
    on_gpu = (cfg.get("environment") or {}).get("device", "cpu") != "cpu"
    multiple = data["pad_to_multiple_of"] if "pad_to_multiple_of" in data else (8 if on_gpu else None)
    if multiple:
        seq = math.ceil(seq / multiple) * multiple
    return int(seq)


def _model_shape(run: Run, name: str | None) -> ModelShape | None:
    """The model's shape as config.json's model_info records it; None where it lacks the counts.

    Where model_info leaves out the model type, the largest layer or the attention, they are the shapes
    table's type for the model's name, the embedding and sdpa.
    """
    info = run.config.get("model_info") or {}
    counts = [info.get(key) for key in ("n_params", "n_layers", "hidden_size", "n_heads", "vocab_size")]
    if any(v is None for v in counts):
        return None
    n_params, n_layers, hidden, heads, vocab = counts
    model_type = info.get("model_type") or ((shapes.known(name) if name else None) or {}).get("model_type", "unknown")
    attn = (run.config.get("model") or {}).get("attn_implementation") or "sdpa"
    largest = _first(info.get("largest_layer_params"), vocab * hidden)
    return ModelShape(name or "", model_type, n_params, largest, n_layers, hidden, heads, vocab, attn)


def predict(run: Run, row: dict) -> memory.Estimate | None:
    """`workshop estimate`'s prediction for this run's settings; None where the run folder lacks the model's shape."""
    shape = _model_shape(run, row.get("model"))
    seq = _seq_len_at_peak(run)
    micro = row.get("per_device_train_batch_size")
    if shape is None or not seq or not micro:
        return None
    model_settings = run.config.get("model") or {}
    try:
        return memory.predict(shape, memory.Settings(
            seq, micro, row.get("zero_stage"), row.get("offload_optimizer"), row.get("offload_param"),
            row.get("world_size"), row.get("num_nodes"), row.get("precision"),  # settings(): 1 where unrecorded
            bool((run.config.get("training") or {}).get("gradient_checkpointing")),
            model_settings.get("fast_kernels", False),  # not recorded: the library's own modules
            memory.DeepSpeedSettings.from_config(_ds_config(run), shape.hidden_size),
            (run.config.get("data_stats") or {}).get("targets_max")))  # not recorded: every position
    except WorkshopError:  # a precision or setting the estimator does not cover
        return None


def summarize(run: Run) -> dict:
    """One row of the comparison: settings, the workshop's table, measured and predicted memory."""
    m = run.metrics
    row = settings(run)
    row["setting"] = setting_label(row)
    hist = metrics.digest(run.log_history)
    row.update(hist)
    if row["epochs"] is None:
        row["epochs"] = hist["epochs_done"]
    del row["epochs_done"]
    steps = run.steps
    # Time and throughputs on the one clock of training steps alone, so that two runs differ by their
    # training, not by their evaluation or their disk: metrics.json's, or none. (The Trainer's runtime and
    # samples/s, and steps.jsonl's intervals, count evaluation and checkpoints.)
    row["time_per_epoch_s"] = m.get("time_per_epoch_s")
    row["train_samples_per_second"] = metrics.samples_per_second(m.get("train_samples"), row["time_per_epoch_s"])
    row["tokens_per_second"] = m.get("tokens_per_second")
    row["mfu"] = m.get("mfu")
    row["peak_gpu_allocated_gib"] = _first(m.get("peak_gpu_allocated_gib"),
                                           _max(steps, "gpu_peak_allocated_gib"))
    row["peak_gpu_reserved_gib"] = _first(m.get("peak_gpu_reserved_gib"), _max(steps, "gpu_peak_reserved_gib"))
    row["peak_gpu_allocated_setup_gib"] = m.get("peak_gpu_allocated_setup_gib")  # before the first step
    smi = nvidia_smi_peaks(run.gpu_csv)
    row["peak_nvidia_smi_gib"] = max(smi.values()) if smi else None
    row["nvidia_smi_peak_by_host"] = smi
    row["gpu_name"] = next((s["name"] for samples in run.gpu_csv.values() for s in samples if s["name"]), None)
    host = host_memory_peaks(run.host_csv)
    row["peak_host_used_gib"] = max(host.values()) if host else None
    row["host_used_peak_by_host"] = host
    row["peak_host_rss_gib"] = _first(m.get("peak_host_rss_gib"), _max(steps, "host_rss_gib"))
    prediction = predict(run, row)
    row["predicted_peak_allocated_gib"] = prediction.peak_allocated_bytes / GIB if prediction else None
    row["predicted_gpu_total_gib"] = prediction.gpu_total_bytes / GIB if prediction else None
    row["predicted_host_gib"] = prediction.host_bytes / GIB if prediction else None
    row["allocated_over_predicted"] = (row["peak_gpu_allocated_gib"] / row["predicted_peak_allocated_gib"]
                                       if row["peak_gpu_allocated_gib"] and prediction else None)
    row["nvidia_smi_over_predicted"] = (row["peak_nvidia_smi_gib"] / row["predicted_gpu_total_gib"]
                                        if row["peak_nvidia_smi_gib"] and prediction else None)
    row["exact_match"], row["f1"] = m.get("exact_match"), m.get("f1")
    row["wall_time_s"], row["time_breakdown_s"] = m.get("wall_time_s"), m.get("time_breakdown_s")
    row["error"] = run.status.get("error")
    row["run_dir"] = str(run.path)
    return row


def _max(rows: list[dict], key: str):
    values = [r[key] for r in rows if r.get(key) is not None]
    return max(values) if values else None


# Everything but the GPU count that changes a run's samples/s: the model and its kernels, the data (its samples,
# lengths, padding, targets), the batch per GPU, the stage and its JSON, the precision, the GPU, the epochs (the
# first step's one-off cost is part of the first epoch's time). Runs equal in all of them form a group.
SCALING_KEYS = ("model", "dataset", "device", "precision", "deepspeed", "zero_stage", "offload_optimizer",
                "offload_param", "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length",
                "train_samples", "epochs", "pad_to_max_length", "pad_to_multiple_of", "loss_on",
                "attn_implementation", "fast_kernels", "gradient_checkpointing", "torch_compile")


def add_scaling_efficiency(rows: list[dict]) -> None:
    """efficiency = (samples/s at N GPUs / N) / (samples/s at N0 / N0), N0 the smallest GPU count of runs
    that differ only in their GPU count (equal in every SCALING_KEYS), samples/s of training steps alone
    (``summarize``). 1.0 is perfect scaling; the smallest run is 1.0 by definition. ``scaling_against``
    names the runs at N0."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        row["scaling_efficiency"] = row["scaling_against"] = None
        if row.get("train_samples_per_second") and row.get("world_size"):
            groups.setdefault(tuple(row.get(k) for k in SCALING_KEYS), []).append(row)
    for members in groups.values():
        if len({r["world_size"] for r in members}) < 2:
            continue
        smallest = min(r["world_size"] for r in members)
        base = [r for r in members if r["world_size"] == smallest]
        per_gpu = sum(r["train_samples_per_second"] / r["world_size"] for r in base) / len(base)
        for r in members:
            r["scaling_efficiency"] = r["train_samples_per_second"] / r["world_size"] / per_gpu
            r["scaling_against"] = ", ".join(b["run"] for b in base)


def scaling_notes(rows: list[dict]) -> list[str]:
    """For each multi-GPU run with a speed: what its scaling efficiency is measured against where that is not
    a one-GPU run, and why it has none: the closest one-GPU run and the settings they differ in."""
    one_gpu = [r for r in rows if r.get("world_size") == 1 and r.get("train_samples_per_second")]
    notes = []
    for row in rows:
        if (row.get("world_size") or 1) == 1 or not row.get("train_samples_per_second"):
            continue
        name = f"`{row['run']}` ({row['world_size']} GPUs)"
        if row["scaling_efficiency"] is not None:
            if not any(r["run"] in row["scaling_against"].split(", ") for r in one_gpu):
                notes.append(f"{name}: against {row['scaling_against']}, its smallest GPU count: no comparable "
                             "one-GPU run")
            continue
        if not one_gpu:
            notes.append(f"{name}: no scaling efficiency: no one-GPU run among these runs")
            continue
        differing = {r["run"]: [k for k in SCALING_KEYS if row.get(k) != r.get(k)] for r in one_gpu}
        closest = min(one_gpu, key=lambda r: len(differing[r["run"]]))
        what = ", ".join(f"{k} {closest.get(k)} vs {row.get(k)}" for k in differing[closest["run"]])
        notes.append(f"{name}: no scaling efficiency: no one-GPU run differs from it in the GPU count alone; the "
                     f"closest, `{closest['run']}`, differs in {what}")
    return notes


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------
# (header, row key) of the side-by-side comparison; the CSV holds every key.
COMPARISON = [
    ("run", "run"), ("setting", "setting"), ("model", "model"), ("status", "status"),
    ("micro-batch", "per_device_train_batch_size"), ("final train loss", "final_train_loss"),
    ("eval loss per epoch", "eval_loss_per_epoch"), ("train samples/s", "train_samples_per_second"),
    ("eval samples/s", "eval_samples_per_second"), ("steps/epoch", "steps_per_epoch"),
    ("time/epoch (s)", "time_per_epoch_s"), ("tokens/s", "tokens_per_second"), ("MFU", "mfu"),
    ("scaling efficiency", "scaling_efficiency"),
]
MEMORY = [
    ("run", "run"), ("setting", "setting"), ("GPU", "gpu_name"),
    ("peak allocated (PyTorch)", "peak_gpu_allocated_gib"), ("predicted", "predicted_peak_allocated_gib"),
    ("measured / predicted", "allocated_over_predicted"), ("set-up peak", "peak_gpu_allocated_setup_gib"),
    ("peak reserved (PyTorch)", "peak_gpu_reserved_gib"),
    ("peak nvidia-smi", "peak_nvidia_smi_gib"), ("predicted nvidia-smi", "predicted_gpu_total_gib"),
    ("peak host used", "peak_host_used_gib"), ("peak host RSS", "peak_host_rss_gib"),
    ("predicted host", "predicted_host_gib"),
]


# A rung's table: the original workshop's metrics beside memory and time, the columns of the rung
# READMEs' fill-in tables in the same order, then what the rung adds.
RUNG_COLUMNS = [
    ("run", "run"), ("setting", "setting"), ("final train loss", "final_train_loss"),
    ("eval loss per epoch", "eval_loss_per_epoch"), ("train samples/s", "train_samples_per_second"),
    ("eval samples/s", "eval_samples_per_second"), ("steps/epoch", "steps_per_epoch"),
    ("time/epoch (s)", "time_per_epoch_s"), ("peak allocated (GiB)", "peak_gpu_allocated_gib"),
    ("peak nvidia-smi (GiB)", "peak_nvidia_smi_gib"),
]
RUNG_EXTRAS = {
    "offload": [("peak host used (GiB)", "peak_host_used_gib")],
    "multi_node": [("GPUs", "world_size"), ("scaling efficiency", "scaling_efficiency")],
}
TEXT_DATASETS = ("wikitext", "builtin_text")  # plain text: perplexity is the number to read


def rung_columns(stage: str, rows: list[dict]) -> list[tuple[str, str]]:
    columns = RUNG_COLUMNS + RUNG_EXTRAS.get(stage, [])
    if any(r.get("dataset") in TEXT_DATASETS for r in rows):
        columns = columns + [("perplexity", "perplexity")]
    return columns


def rung_tables(rows: list[dict]) -> str:
    """One table per stage among the rows, in the order the stages first appear."""
    stages = list(dict.fromkeys(r.get("stage") for r in rows))
    parts = []
    for stage in stages:
        members = [r for r in rows if r.get("stage") == stage]
        parts += [f"## {stage}", "", markdown_table(members, rung_columns(stage, members)), ""]
    return "\n".join(parts)



def time_breakdown_markdown(rows: list[dict]) -> str:
    """Where each job's time went (time_breakdown_s): one row per run, one column per phase, in seconds."""
    timed = [r for r in rows if r.get("time_breakdown_s")]
    if not timed:
        return ""
    phases = list(dict.fromkeys(phase for r in timed for phase in r["time_breakdown_s"]))
    table = [{"run": r["run"], "wall_time_s": round(r["wall_time_s"], 1),
              **{phase: round(seconds, 1) for phase, seconds in r["time_breakdown_s"].items()}} for r in timed]
    return "\n".join(["## Where the time went (s)", "",
                      markdown_table(table, [("run", "run"), ("wall time", "wall_time_s"), *((p, p) for p in phases)]),
                      "", "From the job script's start (or the process's) to the results, on rank 0; the phases add "
                      "up to the wall time. training_steps leaves out the evaluations and checkpoints made during "
                      "training."])


def comparison_markdown(rows: list[dict]) -> str:
    timing = time_breakdown_markdown(rows)
    notes = scaling_notes(rows)
    return "\n".join([
        rung_tables(rows),
        *(["Scaling efficiency compares runs that differ in their GPU count alone:", "",
           *(f"- {n}" for n in notes), ""] if notes else []),
        "## Training", "", markdown_table(rows, COMPARISON), "",
        *([timing, ""] if timing else []),
        "## Memory (GiB per GPU; host: per node)", "", markdown_table(rows, MEMORY), "",
        "Peak allocated/reserved: torch.cuda.max_memory_allocated/reserved on rank 0; set-up: the peak allocated "
        "before the first step (the model's build, DeepSpeed's engine and optimizer). nvidia-smi: the largest "
        "memory.used of any GPU in gpu_memory-<host>.csv, which adds the allocator's cache and the CUDA context. "
        "Predicted: `workshop estimate` for the run's model, stage, offload, micro-batch, longest batch and GPU count.",
    ])


def to_csv(rows: list[dict]) -> str:
    keys = list(rows[0]) if rows else []
    for row in rows[1:]:
        keys += [k for k in row if k not in keys]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return out.getvalue()


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def default_out(paths: list[str], runs: list[Path]) -> Path:
    if len(runs) == 1:
        return runs[0]
    if len(paths) == 1 and not is_run_dir(Path(paths[0])):
        return Path(paths[0]) / "report"
    return Path("logs") / "report"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workshop report",
        description="The workshop's metrics table for each run folder, a side-by-side comparison (Markdown, CSV) "
                    "and plots (PNG), with the predicted memory beside the measured one.")
    p.add_argument("paths", nargs="*", default=["logs"],
                   help="run folders, or folders to search for them (default: logs/)")
    p.add_argument("--out", default=None,
                   help="where report.md, report.csv and the plots go (default: the run folder for one run, "
                        "<folder>/report for one searched folder, else logs/report)")
    p.add_argument("--no_plots", action="store_true", help="tables only (no matplotlib needed)")
    return p


def write_report(runs: list[Run], out: Path, plots: bool) -> dict:
    """Writes report.md, report.csv and the plots into out; returns {"rows": ..., "files": [...]}."""
    rows = [summarize(run) for run in runs]
    add_scaling_efficiency(rows)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    if plots:
        from workshop import plots as plotting

        images = plotting.write_plots(runs, rows, out)
    title = f"# Workshop report: {rows[0]['run']}" if len(rows) == 1 else f"# Workshop report: {len(rows)} runs"
    parts = [title, "", comparison_markdown(rows)]
    if len(rows) == 1:
        parts += ["", "## Metrics", "", format_table(_workshop_table(rows[0]))]
    parts += [""] + [f"![{p.stem}]({p.name})" for p in images]
    write_text(out / "report.md", "\n".join(parts) + "\n")
    write_text(out / "report.csv", to_csv(rows))
    files = [out / "report.md", out / "report.csv", *images]
    return {"rows": rows, "files": files, "markdown": comparison_markdown(rows)}


def _workshop_table(row: dict) -> dict:
    skip = {"run", "run_dir", "setting", "nvidia_smi_peak_by_host", "host_used_peak_by_host", "time_breakdown_s"}
    return {k: v for k, v in row.items() if k not in skip}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        run_dirs = find_run_dirs(args.paths)
        if not run_dirs:
            raise WorkshopError(f"no run folders (with metrics.json or log_history.json) under {' '.join(args.paths)}: "
                                "give logs/ or a logs/<stage>/<run id> folder")
        runs = [load_run(p) for p in run_dirs]
        out = Path(args.out) if args.out else default_out(args.paths, run_dirs)
        result = write_report(runs, out, plots=not args.no_plots)
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    print(result["markdown"])
    print("\nwritten: " + ", ".join(str(f) for f in result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
