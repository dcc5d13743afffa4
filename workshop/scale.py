"""``workshop scale``: the largest model each stage trains on one GPU, predicted and then found.

    workshop scale                                             # every stage, the whole ladder, one GPU
    workshop scale --stages baseline zero3_offload_all --steps 3
    workshop scale --stages zero3_nvme --nvme_path /local/nvme/$USER
    workshop scale --gradient_checkpointing                    # how far recomputing activations moves it
    workshop scale --combine logs/scale/A logs/scale/B --out logs/scale/all   # stages run in separate jobs
    workshop scale --combine logs/scale/A --repredict --out logs/scale/A2     # predicted again, no GPU time

For each stage it predicts, with ``workshop estimate``, which models of the ladder fit this GPU, this
node's free host memory and (NVMe offload) the free disk, and starts at the largest predicted to fit:
if that trains, it climbs until a size fails; if not, it steps down until one trains. Each attempt
is a real ``workshop train`` run of a few optimizer steps (micro-batch 1, full 512-token blocks of the
built-in text, random weights from the model's configuration) in a process of its own, so an
out-of-memory error, a refusal by the pre-flight checks or a kill by the kernel becomes a row, not
the end of the benchmark.

The ladder: the workshop's GPT-2 and BLOOM shapes, then BLOOM shapes widened and deepened past
bloom-7b1 (``shapes.SCALED_BLOOM``), each written as a config.json into the output folder.

Output: a run folder per attempt, ``scale.md`` and ``scale.json`` (rewritten after every attempt)
with one row per attempt (predicted GPU/host/NVMe memory, status, tokens/s, peak GPU memory by
PyTorch and nvidia-smi, peak host memory, NVMe disk used) and a summary per stage: the largest size
that trained, the estimator's predicted ceiling, and how many sizes apart they are.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from workshop import files, memory, runner, shapes, stages
from workshop.ds_config import deepspeed_choices
from workshop.errors import WorkshopError
from workshop.units import GIB, MIB

# The stages it climbs, in this order (stages.REGISTRY says each one's JSON).
STAGES = ("baseline", "zero2", "zero3", "zero2_offload", "zero2_offload_nopin", "zero3_offload", "zero3_offload_nopin",
          "zero3_offload_all", "zero3_nvme")
# The models, smallest first: the published shapes, then BLOOM scaled past bloom-7b1 (shapes.SCALED_BLOOM).
LADDER = ["gpt2-medium", "bigscience/bloom-560m", "bigscience/bloom-1b1", "bigscience/bloom-1b7", "bigscience/bloom-3b",
          "bloom-4b8", "bloom-6b3", "bigscience/bloom-7b1", "bloom-10b", "bloom-14b", "bloom-21b"]
# Each attempt: a few full blocks, no evaluation, nothing saved but the run folder's own files.
TRAIN_FLAGS = ["--stage", "scale", "--from_config", "--tokenizer_name_or_path", "builtin",
               "--dataset_name", "builtin_text", "--per_device_train_batch_size", "1",
               "--gradient_accumulation_steps", "1", "--logging_steps", "1", "--eval_strategy", "no",
               "--save_strategy", "no", "--no_save_model", "--answer_eval_samples", "0"]


@dataclass(frozen=True)
class Resources:
    """What one GPU node offers a run: the card's memory, free host memory, free NVMe disk (bytes)."""
    gpu_bytes: float
    host_bytes: float
    nvme_bytes: float | None


def write_configs(folder: Path, models: list[str]) -> dict[str, Path]:
    """config.json for every ladder entry (published shapes and scaled ones alike): one code path."""
    paths = {}
    for name in models:
        if name in shapes.SCALED_BLOOM:
            config = shapes.table_config(shapes.SCALED_BLOOM[name])
        else:
            config = shapes.config_for(name)  # the published shapes, the tiny ones sized by the built-in tokenizer
        paths[name] = folder / name.split("/")[-1]
        config.save_pretrained(paths[name])
    return paths


def check_models(models: list[str]) -> None:
    unknown = [name for name in models if name not in shapes.SCALED_BLOOM and name not in shapes.KNOWN_ARCHITECTURES]
    if unknown:
        known = LADDER + [n for n in shapes.KNOWN_ARCHITECTURES if n not in LADDER]
        raise WorkshopError(f"--models {' '.join(unknown)}: not a shape the ladder knows; use {', '.join(known)}")


def predict(shape: shapes.ModelShape, stage: str, seq_len: int, precision: str,
            gradient_checkpointing: bool) -> memory.Estimate:
    path = stages.REGISTRY[stage].ds_path
    ds_config = json.loads(path.read_text()) if path else None
    zero, optimizer, param = deepspeed_choices(ds_config)
    return memory.predict(shape, memory.Settings(
        seq_len, 1, zero, optimizer, param, precision=precision, gradient_checkpointing=gradient_checkpointing,
        deepspeed=memory.DeepSpeedSettings.from_config(ds_config, shape.hidden_size)))


def fits(e: memory.Estimate, resources: Resources) -> bool:
    room_on_disk = resources.nvme_bytes is None or e.nvme_bytes <= resources.nvme_bytes
    return e.fits(resources.gpu_bytes) and e.host_bytes <= resources.host_bytes and room_on_disk


def prediction_fields(e: memory.Estimate, resources: Resources) -> dict:
    """An attempt row's predicted columns."""
    return {"predicted_peak_allocated_gib": e.peak_allocated_bytes / GIB, "predicted_gpu_gib": e.gpu_total_bytes / GIB,
            "predicted_host_gib": e.host_bytes / GIB,
            "predicted_nvme_gib": e.nvme_bytes / GIB, "predicted_fits": fits(e, resources)}


def predicted_ceiling(predicted_fit: list[bool]) -> int | None:
    """Index of the largest size predicted to fit below the first that does not (sizes grow along the ladder)."""
    ceiling = None
    for i, ok in enumerate(predicted_fit):
        if not ok:
            break
        ceiling = i
    return ceiling


def search(n_sizes: int, start: int | None, attempt) -> int | None:
    """The largest index that trains: from ``start`` up while runs succeed, or down until one does.

    ``attempt(i)`` runs size i and says whether it trained. Sizes above a failure are never tried.
    """
    if n_sizes == 0:
        return None
    i = 0 if start is None else start
    if attempt(i):
        while i + 1 < n_sizes and attempt(i + 1):
            i += 1
        return i
    while i > 0:
        i -= 1
        if attempt(i):
            return i
    return None


class DiskSampler:
    """Peak disk space taken on a folder's file system during a run (ZeRO-Infinity's swap files)."""

    def __init__(self, folder: Path | None, interval_s: float = 1.0):
        self.folder, self.interval_s, self.peak = folder, interval_s, 0
        if folder is None:
            return
        self.base = shutil.disk_usage(folder).used
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while not self.done.wait(self.interval_s):
            self.peak = max(self.peak, shutil.disk_usage(self.folder).used - self.base)

    def stop(self) -> float | None:
        if self.folder is None:
            return None
        self.done.set()
        self.thread.join()
        self.peak = max(self.peak, shutil.disk_usage(self.folder).used - self.base)
        return self.peak / GIB


def attempt_row(out: Path, stage: str, name: str, config_path: Path, steps: int, seq_len: int,
                nvme_path: Path | None, extra: list[str], timeout_s: float) -> dict:
    run_dir = out / stage / name.split("/")[-1]
    flags = ["--model_name_or_path", str(config_path), *TRAIN_FLAGS, "--max_steps", str(steps),
             "--max_seq_length", str(seq_len), *extra]
    if stages.REGISTRY[stage].ds_path:
        flags += ["--deepspeed", str(stages.REGISTRY[stage].ds_path)]
    nvme = None
    if stage == "zero3_nvme":
        nvme = nvme_path / f"scale-{name.split('/')[-1]}"
        nvme.mkdir(parents=True, exist_ok=True)
        flags += ["--nvme_path", str(nvme)]
    print(f"\n=== {stage} | {name}", flush=True)
    disk = DiskSampler(nvme)
    try:
        row, metrics = runner.train_in_subprocess(run_dir, flags, timeout_s)
    finally:
        nvme_used = disk.stop()
        if nvme is not None:
            shutil.rmtree(nvme, ignore_errors=True)  # the next size needs the room
    row.update(nvme_used_gib=nvme_used, **{k: metrics.get(k) for k in (
        "tokens_per_second", "mfu", "peak_gpu_allocated_gib", "peak_gpu_reserved_gib", "peak_host_rss_gib")})
    return row


def scale_stage(out: Path, stage: str, ladder: list[str], model_shapes: dict, configs: dict, resources: Resources,
                settings: dict, args, on_row=lambda rows: None) -> tuple[list[dict], dict]:
    """The stage's attempts as rows, and its summary; ``on_row(rows)`` is told of each new row."""
    predictions = [predict(model_shapes[name], stage, **settings) for name in ladder]
    predicted_fit = [fits(e, resources) for e in predictions]
    ceiling = predicted_ceiling(predicted_fit)
    extra = (["--gradient_checkpointing"] if args.gradient_checkpointing else []) + args.extra
    rows = []

    def attempt(i: int) -> bool:
        name, e = ladder[i], predictions[i]
        row = {"stage": stage, "model": name.split("/")[-1], "params": model_shapes[name].n_params,
               **prediction_fields(e, resources)}
        row.update(attempt_row(out, stage, name, configs[name], args.steps, args.seq_len, args.nvme_path, extra,
                               args.timeout_s))
        rows.append(row)
        print("    " + table(rows[-1:]).splitlines()[-1], flush=True)
        on_row(rows)
        return row["status"] == "completed"

    search(len(ladder), ceiling, attempt)
    rows.sort(key=lambda r: r["params"])
    return rows, summarize(stage, rows, [name.split("/")[-1] for name in ladder])


def summarize(stage: str, rows: list[dict], ladder: list[str], ceiling: str | None = None) -> dict:
    """A stage's summary from its attempts: the largest size that trained, the predicted ceiling, sizes apart.

    ``ceiling``: the predicted ceiling where it was predicted over the whole ladder again (``repredict``).
    Otherwise: the search starts at the predicted ceiling, and predictions grow with size along the
    ladder, so the ceiling is the largest attempted size predicted to fit.
    """
    def largest(keep):
        return max((r for r in rows if keep(r)), key=lambda r: r["params"], default=None)

    trained = largest(lambda r: r["status"] == "completed")
    if ceiling is None:
        fitted = largest(lambda r: r["predicted_fits"])
        ceiling = fitted and fitted["model"]
    return {"stage": stage,
            "largest_trained": trained and trained["model"],
            "largest_trained_params": trained and trained["params"],
            "predicted_ceiling": ceiling,
            "sizes_apart": ladder.index(trained["model"]) - ladder.index(ceiling) if trained and ceiling else None}


def repredict(folder: Path, stage: str, rows: list[dict], ladder: list[str], recorded: dict,
              settings: dict) -> tuple[list, str]:
    """A stage's rows predicted again by the current estimator, against the GPU, host memory and disk its
    run recorded, and the predicted ceiling over the whole ladder; shapes from the run's own configs,
    ``settings`` (seq_len, precision, gradient_checkpointing) as the run predicted with."""
    if recorded.get("gpu_gib") is None:
        raise WorkshopError(f"--combine {folder}: no GPU or host memory recorded for {stage}; leave out --repredict")
    nvme = recorded.get("nvme_free_gib")
    resources = Resources(recorded["gpu_gib"] * GIB, recorded["host_available_gib"] * GIB, nvme and nvme * GIB)
    predictions = {}
    for name in ladder:
        config = folder / "models" / name
        if not (config / "config.json").is_file():
            raise WorkshopError(f"--combine {folder}: {config}/config.json is missing; leave out --repredict")
        predictions[name] = predict(shapes.model_shape(str(config)), stage, **settings)
    ceiling = predicted_ceiling([fits(predictions[name], resources) for name in ladder])
    rows = [{**r, **prediction_fields(predictions[r["model"]], resources)} for r in rows]
    return rows, ceiling if ceiling is None else ladder[ceiling]


def gpu_memory_bytes() -> float | None:
    """The first GPU's memory from nvidia-smi: asking torch would put a CUDA context in this process."""
    if not shutil.which("nvidia-smi"):
        return None
    result = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True)
    lines = result.stdout.split()
    return float(lines[0]) * MIB if result.returncode == 0 and lines else None


def _params(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def table(rows: list[dict]) -> str:
    """One row per attempt, each measurement beside its prediction: PyTorch's peak allocated (what the
    estimator is checked against), nvidia-smi's peak, host memory, NVMe."""
    head = ["stage", "model", "parameters", "predicted fits", "status", "tokens/s", "peak alloc GiB",
            "predicted alloc GiB", "alloc / predicted", "nvidia-smi GiB", "predicted nvidia-smi GiB",
            "peak host GiB", "predicted host GiB", "NVMe used GiB", "predicted NVMe GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def f(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"

    for r in rows:
        status = r["status"] if r["status"] == "completed" else f"{r['status']}: {str(r.get('error'))[:90]}"
        measured, predicted = r.get("peak_gpu_allocated_gib"), r.get("predicted_peak_allocated_gib")
        ratio = measured / predicted if measured is not None and predicted else None
        lines.append("| " + " | ".join([
            r["stage"], r["model"], _params(r["params"]), "yes" if r["predicted_fits"] else "no", status,
            f(r.get("tokens_per_second"), ",.0f"), f(measured, ".1f"), f(predicted, ".1f"), f(ratio, ".1%"),
            f(r.get("nvidia_smi_peak_gib"), ".1f"), f(r["predicted_gpu_gib"], ".1f"),
            f(r.get("peak_host_rss_gib"), ".1f"), f(r["predicted_host_gib"], ".1f"),
            f(r.get("nvme_used_gib"), ".1f"), f(r["predicted_nvme_gib"], ".1f")]) + " |")
    return "\n".join(lines)


def summary_table(summaries: list[dict]) -> str:
    lines = ["| stage | largest that trained | parameters | predicted ceiling | sizes apart |", "|---|---|---|---|---|"]
    for s in summaries:
        params = _params(s["largest_trained_params"]) if s["largest_trained_params"] else "-"
        apart = "-" if s["sizes_apart"] is None else f"{s['sizes_apart']:+d}"
        lines.append(f"| {s['stage']} | {s['largest_trained'] or 'none'} | {params} | "
                     f"{s['predicted_ceiling'] or 'none'} | {apart} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workshop scale", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stages", nargs="+", default=None, choices=list(STAGES),
                   help="default: every stage, zero3_nvme only when --nvme_path is given")
    p.add_argument("--models", nargs="+", default=LADDER,
                   help="the ladder (tried in order of size): known names, scaled BLOOM shapes, tiny-gpt2/tiny-bloom")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per attempt (the first one warms up)")
    p.add_argument("--seq_len", type=int, default=512, help="tokens per sample (every block is full)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="recompute activations in backward: the ceiling where activations are the wall")
    p.add_argument("--nvme_path", type=Path, default=None,
                   help="a folder on a local NVMe disk, needed by the zero3_nvme stage")
    p.add_argument("--gpu_memory_gib", type=float, default=None,
                   help="GPU memory the predictions are checked against; default: what nvidia-smi reports")
    p.add_argument("--timeout_s", type=float, default=1800, help="an attempt running longer counts as failed")
    p.add_argument("--out", default=None, help="output folder; default logs/scale/<timestamp>")
    p.add_argument("--combine", nargs="+", type=Path, default=None, metavar="DIR",
                   help="train nothing: write one ladder from earlier runs' folders (a stage from the last that has it)")
    p.add_argument("--repredict", action="store_true",
                   help="with --combine: predict again with the current estimator, against the GPU, host memory and "
                        "disk each run recorded, with its sequence length and checkpointing (a combined ladder whose "
                        "runs differed in them takes --seq_len and --gradient_checkpointing as given here)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="flags passed to every `workshop train` run (put last)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"logs/scale/{dt.datetime.now():%Y%m%d-%H%M%S}")
    if args.stages is None:
        args.stages = [stage for stage in STAGES if args.nvme_path is not None or stage != "zero3_nvme"]
    try:
        if out.exists() and any(out.iterdir()):
            raise WorkshopError(f"--out {out} is not empty: give a new folder (earlier results stay untouched)")
        if args.repredict and not args.combine:
            raise WorkshopError("--repredict predicts earlier runs again: give their folders with --combine")
        if args.combine:
            text = combine(args.combine, out, args)
            print(f"{text}\nwritten: {out / 'scale.md'}, {out / 'scale.json'}")
            return 0
        if "zero3_nvme" in args.stages and args.nvme_path is None:
            raise WorkshopError("--stages zero3_nvme offloads to NVMe: pass --nvme_path DIR on the node's local disk, "
                                "or leave that stage out")
        if args.nvme_path is not None and not args.nvme_path.is_dir():
            raise WorkshopError(f"--nvme_path {args.nvme_path} is not a folder: create it (mkdir -p) on the local disk")
        check_models(args.models)
        if args.steps < 1:
            raise WorkshopError(f"--steps {args.steps} must be at least 1")
        detected = gpu_memory_bytes()
        precision = "bf16" if detected else "fp32"  # what --precision auto picks (fp16 costs the same bytes)
        gpu_bytes = args.gpu_memory_gib * GIB if args.gpu_memory_gib else detected
        if gpu_bytes is None:
            raise WorkshopError("no GPU found by nvidia-smi: give --gpu_memory_gib to predict for a GPU of that size")
        configs = write_configs(out / "models", args.models)
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    model_shapes = {name: shapes.model_shape(str(path)) for name, path in configs.items()}
    ladder = sorted(args.models, key=lambda name: model_shapes[name].n_params)
    short_ladder = [name.split("/")[-1] for name in ladder]
    host_total = psutil.virtual_memory().total / GIB
    header = (f"{runner.environment_line()}; host memory {host_total:.0f} GiB; micro-batch 1 x {args.seq_len} tokens, "
              f"{args.steps} steps{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    settings = {"seq_len": args.seq_len, "precision": precision, "gradient_checkpointing": args.gradient_checkpointing}
    rows, summaries = [], []
    for stage in args.stages:
        resources = Resources(gpu_bytes, psutil.virtual_memory().available,
                              shutil.disk_usage(args.nvme_path).free if stage == "zero3_nvme" else None)
        # Rewritten after every attempt and stage: a job stopped at its time limit keeps what it has.
        stage_rows, summary = scale_stage(
            out, stage, ladder, model_shapes, configs, resources, settings, args,
            on_row=lambda new: write_results(out, header, short_ladder, rows + new, summaries, settings))
        rows += stage_rows
        summaries.append({**summary, "gpu_gib": gpu_bytes / GIB, "host_available_gib": resources.host_bytes / GIB,
                          "nvme_free_gib": None if resources.nvme_bytes is None else resources.nvme_bytes / GIB})
        text = write_results(out, header, short_ladder, rows, summaries, settings)
    print(f"\n{text}\nwritten: {out / 'scale.md'}, {out / 'scale.json'}")
    return 0


def write_results(out: Path, header: str, ladder: list[str], rows: list[dict], summaries: list[dict],
                  predicted_with: dict | None) -> str:
    """scale.md and scale.json for the attempts so far (a summary for each finished stage); returns the Markdown.

    ``predicted_with``: the estimator's settings (seq_len, precision, gradient_checkpointing), or None
    for a combined ladder whose runs differed."""
    text = f"{header}\n\n{summary_table(summaries)}\n\n{table(rows)}\n"
    files.write_text(out / "scale.md", text)
    files.write_json(out / "scale.json", {"header": header, "ladder": ladder, "predicted_with": predicted_with,
                                          "summary": summaries, "rows": rows})
    return text


def common(settings) -> dict | None:
    """The settings all the runs shared, or None."""
    distinct = {json.dumps(s, sort_keys=True): s for s in settings}
    return next(iter(distinct.values())) if len(distinct) == 1 else None


def combine(folders: list[Path], out: Path, args) -> str:
    """One ladder from several ``workshop scale`` runs (the stages split over jobs with --stages).

    A stage's rows come from the last folder that has any; its summary is made again from them, so
    a run stopped before a stage's summary was written still counts. ``args.repredict`` makes the
    predictions again (``repredict``); a stage whose run stopped before its summary then takes the GPU
    and host memory that run recorded for its other stages.
    """
    by_stage: dict[str, tuple] = {}
    headers = []
    for folder in folders:
        data, header = files.read_results(folder, "scale")
        headers.append(header)
        ladder = data["ladder"]
        # A combined ladder whose runs predicted with different settings records none: the flags given
        # now, and bf16 (the runs had GPUs).
        settings = data["predicted_with"] or {"seq_len": args.seq_len, "precision": "bf16",
                                              "gradient_checkpointing": args.gradient_checkpointing}
        resources = {s["stage"]: s for s in data["summary"]}
        run_resources = {k: v for k, v in (data["summary"] or [{}])[0].items()
                         if k in ("gpu_gib", "host_available_gib")}
        for stage in dict.fromkeys(r["stage"] for r in data["rows"]):
            stage_rows = sorted((r for r in data["rows"] if r["stage"] == stage), key=lambda r: r["params"])
            by_stage[stage] = (folder, stage_rows, ladder, resources.get(stage, {}), run_resources, settings)
    rows, summaries = [], []
    for stage, (folder, stage_rows, ladder, resources, run_resources, settings) in sorted(
            by_stage.items(), key=lambda s: STAGES.index(s[0])):
        ceiling = None
        if args.repredict:
            resources = resources or run_resources
            stage_rows, ceiling = repredict(folder, stage, stage_rows, ladder, resources, settings)
        rows += stage_rows
        summaries.append({**resources, **summarize(stage, stage_rows, ladder, ceiling), "from": str(folder)})
    header = "; ".join(dict.fromkeys(headers))  # one line when the runs shared their setting, as they should
    predicted = (" Predictions made again by the current estimator, against the GPU, host memory and disk each "
                 "run recorded." if args.repredict else "")
    out.mkdir(parents=True, exist_ok=True)
    return write_results(out, f"{header}\n\nCombined from {', '.join(str(f) for f in folders)}.{predicted}",
                         list(dict.fromkeys(n for _, _, ladder, *_ in by_stage.values() for n in ladder)),
                         rows, summaries, common(s for *_, s in by_stage.values()))
