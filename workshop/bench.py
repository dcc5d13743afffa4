"""``workshop bench``: each stage as the original workshop set it up, then with this project's defaults.

One invocation on one GPU, the same data for every run, one epoch each:

    workshop bench                                   # gpt2-medium and bloom-560m, every single-GPU stage
    workshop bench --models gpt2-medium --stages baseline zero2
    workshop bench --combine logs/bench/A logs/bench/B    # one table from a bench split over jobs

- data: 1000 SQuAD-shaped samples from the built-in generator with SQuAD-like context lengths
  (``builtin_data.SQUAD_LIKE_SENTENCES``), written as SQuAD JSONL files and read through --train_file;
- models: built from their published configurations (random weights: speed and memory do not
  depend on the values), tokenised with the built-in BPE;
- original: fp16, every sample padded to 512 tokens, loss on every token, micro-batch 4 x
  accumulation 4, the original DeepSpeed JSON (AdamW written out, fp16, ``stage`` only), PyTorch's
  unfused AdamW, eager attention, the library's modules and DeepSpeed's functions as they are
  (``--fast_kernels false --foreach_grad_clip false``);
- default: the project's defaults (bf16, dynamic padding in random batches, the same global batch
  of 16 as one micro-batch, fused AdamW, fused attention (SDPA; BLOOM's through the workshop's own
  forward, ``model.use_sdpa_for_bloom_attention``), ``--fast_kernels``, ``--foreach_grad_clip``, no wait
  for the GPU after each micro-batch, ds_configs/*.json), with the original's loss on every token
  so that eval losses compare like with like (the defaults' own loss on the answer is faster still:
  ``--fast_kernels`` computes logits only where there is a target);
- default_micro4: the defaults at the original's micro-batch 4 x accumulation 4, so that peak
  memory is compared at the same micro-batch (and the micro-batch's own gain shows);
- the other default_* modes (``--modes``): the defaults with one lever changed, in the flags (``MODES``),
  in the stage's DeepSpeed JSON (``DS_LEVERS``) or in the training process's environment
  (``ENV_LEVERS``), so that each lever's gain is measured on its own;
- reference: a plain PyTorch loop on the default's batches and model (bf16 autocast, fused AdamW, SDPA,
  ``torch.compile``), the bar for the baseline: its second pass over the same batches; a loop more
  than 1.2x slower than the baseline default is no bar, and that target is left unjudged with a note
  saying so. The same loop runs eager as well (its row ``eager``), so that what the compiler adds or
  takes away shows, and the first pass of each has a row of its own (``eager, first pass``: what
  meeting every batch length and kernel for the first time costs, as the Trainer's one epoch does;
  ``compiled, first pass``: that and compiling).

A bench split over jobs (``--stages`` a few at a time, to fit a time limit) comes back together
with ``--combine``: one table and one verdict, each model and stage from one of the invocations.

Every run is an ordinary run folder under the output folder (``workshop report`` reads them),
with an ``nvidia-smi`` CSV beside it. The table (Markdown and CSV) gives per stage: time per epoch
(training steps alone, as metrics.json has it: the epoch's evaluation is left out, as it is from the
reference loop's pass), the time to the end of the first optimizer step (what each process pays once: loading the kernels
it meets first, allocating the optimizer state), useful (non-padding) tokens/s and MFU (on the time per
epoch's clock), peak memory
(PyTorch and nvidia-smi), final eval loss, and the original/default time ratio; then a verdict per
target (``TIME_RATIO_TARGETS``, eval loss within 2%, peak memory no higher, the baseline within 1.2x
of the reference loop), judged from this invocation alone.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import sys
import time
from pathlib import Path

from workshop import builtin_data, files, stages
from workshop.errors import WorkshopError
from workshop.runner import environment_line, train_in_subprocess
from workshop.units import GIB

# The stages it runs, in this order (stages.REGISTRY says each one's JSON).
STAGES = ("baseline", "zero1", "zero2", "zero3", "zero2_offload")


def original_ds_config(stage: str) -> dict | None:
    """The original workshop's DeepSpeed JSON for a stage: only these keys, values written out."""
    entry = stages.REGISTRY[stage]
    if entry.zero_stage is None:
        return None
    zero = {"stage": entry.zero_stage}
    if entry.offload_optimizer:
        zero["offload_optimizer"] = {"device": entry.offload_optimizer}
    return {
        "train_batch_size": "auto", "gradient_accumulation_steps": "auto", "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 5e-5, "betas": [0.9, 0.999], "eps": 1e-8,
                                                  "weight_decay": 0.01}},
        "fp16": {"enabled": True},
        "zero_optimization": zero,
    }


# Every mode evaluates in the original's batches of 4: the Trainer's eval loss is a mean of per-batch
# means, so batching the same samples differently moves it, which the modes must not do.
COMMON = ["--no_save_model", "--from_config", "--tokenizer_name_or_path", "builtin", "--num_train_epochs", "1",
          "--answer_eval_samples", "0", "--save_strategy", "no", "--eval_strategy", "epoch", "--logging_steps", "10",
          "--per_device_eval_batch_size", "4"]
MICRO4 = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "4"]
MODES = {
    "original": ["--precision", "fp16", "--pad_to_max_length", "--max_seq_length", "512", "--loss_on", "sequence",
                 "--optim", "adamw_torch", "--attn_implementation", "eager", "--train_sampling_strategy", "random",
                 "--logging_nan_inf_filter", "true", "--fast_kernels", "false", "--foreach_grad_clip", "false", *MICRO4],
    "default": ["--loss_on", "sequence"],
    "default_micro4": ["--loss_on", "sequence", *MICRO4],
    # One lever at a time, to measure what each default buys (select with --modes).
    "default_length_grouped": ["--loss_on", "sequence", "--train_sampling_strategy", "group_by_length"],
    "default_padded": ["--loss_on", "sequence", "--pad_to_max_length", "--max_seq_length", "512"],
    "default_compiled": ["--loss_on", "sequence", "--torch_compile"],
    "default_stock_kernels": ["--loss_on", "sequence", "--fast_kernels", "false"],
    "default_fp16": ["--loss_on", "sequence", "--precision", "fp16"],
    "default_workers": ["--loss_on", "sequence", "--dataloader_num_workers", "2"],
    "default_pad64": ["--loss_on", "sequence", "--pad_to_multiple_of", "64"],
    "default_eager_attention": ["--loss_on", "sequence", "--attn_implementation", "eager"],
    "default_per_tensor_grad_clip": ["--loss_on", "sequence", "--foreach_grad_clip", "false"],
}
DEFAULT_MODES = ["original", "default", "default_micro4"]
# Levers inside the DeepSpeed JSON: the stage's ds_configs/ file with these keys set (stages with DeepSpeed only).
DS_LEVERS = {
    # DeepSpeed's own default at ZeRO-1/2, which ds_configs/ turns off: an inf/NaN check of every gradient
    # tensor before each bf16 step, ending in a wait for the GPU (the Trainer alone and ZeRO-3 make none).
    "default_overflow_check": {"bf16": {"check_grad_overflow": True}},
    # ZeRO-1's gradients in bf16, where ds_configs/zero1.json accumulates them in fp32 under bf16: DeepSpeed then
    # runs the ZeRO optimizer (ZeRO-2's) instead of its BF16_Optimizer, which keeps them in one flat buffer.
    "default_bf16_grad_accum": {"data_types": {"grad_accum_dtype": "bf16"}},
    # BF16_Optimizer's copy of each gradient into the fp32 buffer from a hook during backward, not after it.
    "default_immediate_grad_update": {"bf16": {"immediate_grad_update": True}},
    # DeepSpeed's throughput timer, which ds_configs/ turns off: a wait for the GPU as each forward starts and
    # after each step, to time a figure it prints only with steps_per_print set.
    "default_throughput_timer": {"timers": {"throughput": {"enabled": True}}},
    # ZeRO-2: one all-reduce of each gradient bucket instead of a reduce of each rank's part of it.
    "default_no_reduce_scatter": {"zero_optimization": {"reduce_scatter": False}},
    # ZeRO-2: gradients kept per tensor and flattened per bucket, instead of copied into one contiguous buffer.
    "default_no_contiguous_gradients": {"zero_optimization": {"contiguous_gradients": False}},
    # ZeRO-2's gradients in fp32 under bf16: each bucket added into one fp32 buffer of the partition.
    "default_fp32_grad_accum": {"data_types": {"grad_accum_dtype": "fp32"}},
}
# Levers in the environment of the training process.
ENV_LEVERS = {
    # The allocator maps more memory onto the segments it has instead of adding segments (cudaMalloc).
    "default_expandable_segments": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"},
    # Matrix products through cuBLASLt instead of cuBLAS.
    "default_cublaslt": {"TORCH_BLAS_PREFER_CUBLASLT": "1"},
}
MODES.update({mode: MODES["default"] for mode in [*DS_LEVERS, *ENV_LEVERS]})


def _short(model: str) -> str:
    return model.split("/")[-1]


def write_data(folder: Path, samples: int, eval_samples: int) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, n, seed in (("train", samples, 0), ("validation", eval_samples, 1)):
        path = folder / f"{name}.jsonl"
        records = builtin_data.squad_records(n, seed=seed, context_sentences=builtin_data.SQUAD_LIKE_SENTENCES)
        files.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
        paths.append(path)
    return paths[0], paths[1]


def run_one(out: Path, model: str, stage: str, mode: str, data: tuple[Path, Path], extra: list[str],
            seed: int = 42, name_seed: bool = False) -> dict:
    run_dir = out / f"{_short(model)}-{stage}-{mode}{f'-seed{seed}' if name_seed else ''}"
    flags = ["--stage", "bench", "--model_name_or_path", model, "--train_file", str(data[0]),
             "--validation_file", str(data[1]), *COMMON, *MODES[mode], "--seed", str(seed), *extra]
    ds = original_ds_config(stage) if mode == "original" else stages.REGISTRY[stage].ds_path
    if mode in DS_LEVERS:
        ds = with_keys(json.loads(ds.read_text()), DS_LEVERS[mode])
    if isinstance(ds, dict):
        out.joinpath("ds_configs").mkdir(exist_ok=True)
        path = out / "ds_configs" / f"{mode}_{stage}.json"
        files.write_json(path, ds)
        flags += ["--deepspeed", str(path)]
    elif ds:
        flags += ["--deepspeed", str(ds)]
    print(f"\n=== {model} | {stage} | {mode} | seed {seed}", flush=True)
    row, metrics = train_in_subprocess(run_dir, flags, env=ENV_LEVERS.get(mode))
    row = {"model": _short(model), "stage": stage, "mode": mode, "seed": seed, **row}
    if row["status"] != "completed":
        return row
    row.update({k: metrics.get(k) for k in (
        "time_per_epoch_s", "first_step_s", "tokens_per_second", "mfu", "peak_gpu_allocated_gib",
        "peak_gpu_reserved_gib", "final_eval_loss", "length_mean", "per_device_train_batch_size",
        "gradient_accumulation_steps")})
    print("    " + table([row]).splitlines()[-1], flush=True)
    return row


def with_keys(config: dict, keys: dict) -> dict:
    """``config`` with the nested ``keys`` set, the rest as it was."""
    merged = dict(config)
    for key, value in keys.items():
        merged[key] = with_keys(merged.get(key) or {}, value) if isinstance(value, dict) else value
    return merged


def baseline_batching(rows: list[dict], model: str) -> tuple[int, int]:
    """The micro-batch and accumulation the baseline default ran with (fitted to the GPU), else the defaults."""
    from dataclasses import fields

    from workshop.config import WorkshopTrainingArguments

    ran = next((r for r in rows if (r["model"], r["stage"], r["mode"]) == (_short(model), "baseline", "default")
                and r.get("per_device_train_batch_size")), None)
    if ran:
        return ran["per_device_train_batch_size"], ran["gradient_accumulation_steps"]
    defaults = {f.name: f.default for f in fields(WorkshopTrainingArguments)}
    return defaults["per_device_train_batch_size"], defaults["gradient_accumulation_steps"]


def reference_loop(model: str, data: tuple[Path, Path], samples: int, batching: tuple[int, int],
                   compile_model: bool = True) -> list[dict]:
    """A plain PyTorch loop on the default's batches: bf16 autocast, fused AdamW, SDPA, torch.compile.

    batching: (micro-batch, accumulation), the baseline default run's. Two rows: the first pass over
    the batches (mode "<kind>, first pass") and the second, the reference.
    """
    import torch

    from workshop import data_loader, model as models
    from workshop.config import DataArguments, ModelArguments

    gc.collect()  # an earlier loop's model (its patched forward refers back to it) and its cached memory
    torch.cuda.empty_cache()
    torch.manual_seed(42)
    models.prefer_shape_agnostic_attention()
    margs = ModelArguments(model_name_or_path=model, tokenizer_name_or_path="builtin", from_config=True,
                           attn_implementation="sdpa")
    tokenizer = models.load_tokenizer(margs)
    config = models.model_config(margs, tokenizer)
    net = models.build_model(margs, tokenizer, config, torch.device("cuda"))
    data_args = DataArguments(train_file=str(data[0]), validation_file=str(data[1]), max_train_samples=samples,
                              loss_on="sequence")
    prepared = data_loader.prepare(data_args, tokenizer, seed=42)
    micro, accum = batching
    collate = data_loader.Collator.for_run(data_args, tokenizer.pad_token_id)
    # Random batches, as the default's sampler draws them: the same padding, on average, per batch.
    order = torch.randperm(len(prepared.train), generator=torch.Generator().manual_seed(42)).tolist()
    batches = [collate([prepared.train[i] for i in order[j:j + micro]]) for j in range(0, len(order), micro)]
    optimizer = torch.optim.AdamW(net.parameters(), lr=5e-5, weight_decay=0.01, fused=True)
    if compile_model:
        # Regional compilation: the decoder blocks share their code, so one compiled block serves all
        # of them (a whole-model compile took minutes before the first step).
        blocks = next(m for m in net.modules() if isinstance(m, torch.nn.ModuleList))
        for block in blocks:
            block.compile(dynamic=True)

    def train_step(batch):
        batch = {k: v.cuda(non_blocking=True) for k, v in batch.items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = net(**batch).loss / accum
        loss.backward()
        return loss

    def one_pass(start: float) -> float:
        """The pass over every batch; returns the seconds from ``start`` to the end of its first optimizer step."""
        first_step_s = None
        for i, batch in enumerate(batches):
            train_step(batch)
            if (i + 1) % accum == 0:
                torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if first_step_s is None:  # one wait for the GPU per pass, as the Trainer's run has
                    torch.cuda.synchronize()
                    first_step_s = time.perf_counter() - start
        torch.cuda.synchronize()
        return first_step_s

    # Two passes over every batch, each timed. The first meets every batch length, kernel and allocation for
    # the first time, and compiles, as the Trainer's one epoch does (but for compiling). The second is the
    # bar: a batch of a size not seen yet can fail a guard the compiler set and compile again (inductor's
    # fusion heuristic guards on the number of tokens in the batch; TORCH_LOGS=recompiles names it).
    rows = []
    kind = "compiled" if compile_model else "eager"
    tokens = sum(len(s["input_ids"]) for s in prepared.train)
    for mode in (f"{kind}, first pass", kind):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        first_step_s = one_pass(start)
        seconds = time.perf_counter() - start
        rows.append({"model": _short(model), "stage": "reference loop", "mode": mode, "status": "completed",
                     "time_per_epoch_s": seconds, "first_step_s": first_step_s,
                     "tokens_per_second": tokens / seconds,
                     "per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
                     "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                     "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB})
    return rows


def table(rows: list[dict]) -> str:
    seeds = len({r.get("seed") for r in rows if r.get("seed") is not None}) > 1  # a column only when they differ
    head = ["model", "stage", "mode", *(["seed"] if seeds else []), "time/epoch s", "first step s", "tokens/s",
            "MFU %", "peak alloc GiB", "peak reserved GiB", "nvidia-smi GiB", "eval loss", "original/this"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_key = {}
    for r in rows:  # a mode's rows for each seed; the first seed's where another stage has none (the reference)
        by_key.setdefault((r["model"], r["stage"], r["mode"], r.get("seed")), r)
        by_key.setdefault((r["model"], r["stage"], r["mode"], "any"), r)

    def f(value, spec):
        return format(value, spec) if isinstance(value, (int, float)) else "-"

    def time_ratio(numerator, denominator):
        if numerator and denominator and numerator.get("time_per_epoch_s") and denominator.get("time_per_epoch_s"):
            return numerator["time_per_epoch_s"] / denominator["time_per_epoch_s"]
        return None

    for r in rows:
        notes, seed = [], r.get("seed")
        if r["mode"].startswith("default") and (
                x := time_ratio(by_key.get((r["model"], r["stage"], "original", seed)), r)):
            notes.append(f"{x:.2f}x")
        if r["mode"] not in ("original", "default") and (
                x := time_ratio(r, by_key.get((r["model"], r["stage"], "default", seed)))):
            notes.append(f"this/default {x:.2f}x")  # a lever turned on or off: its time against the default's
        if r["stage"] == "reference loop" and (
                x := time_ratio(by_key.get((r["model"], "baseline", "default", "any")), r)):
            notes.append(f"baseline default / loop = {x:.2f}x")
        ratio = "; ".join(notes) or "-"
        mode = r["mode"] if r.get("status") == "completed" else f"{r['mode']} ({r.get('status')})"
        lines.append("| " + " | ".join([
            r["model"], r["stage"], mode, *([f(seed, "d")] if seeds else []), f(r.get("time_per_epoch_s"), ".1f"),
            f(r.get("first_step_s"), ".2f"), f(r.get("tokens_per_second"), ",.0f"),
            f(100 * r["mfu"] if r.get("mfu") is not None else None, ".1f"),
            f(r.get("peak_gpu_allocated_gib"), ".2f"), f(r.get("peak_gpu_reserved_gib"), ".2f"),
            f(r.get("nvidia_smi_peak_gib"), ".2f"),
            f(r.get("final_eval_loss"), ".4f"), ratio]) + " |")
    return "\n".join(lines)


# What the defaults must reach against the original workshop, one GPU, ratios within one invocation.
TIME_RATIO_TARGETS = {"baseline": 3.0, "zero1": 3.0, "zero2": 3.0, "zero3": 2.0, "zero2_offload": 1.5}
EVAL_LOSS_SLACK = 1.02       # the default's final eval loss at most 2% above the original's
REFERENCE_SLACK = 1.2        # the baseline default at most 1.2x the plain PyTorch loop's time


def averaged(rows: list[dict]) -> dict:
    """One row per model, stage and mode: each measurement's mean over the seeds that completed.

    ``runs`` says how many; ``final_eval_loss_spread`` is the largest minus the smallest eval loss.
    """
    groups: dict = {}
    for r in rows:
        if r.get("status") == "completed":
            groups.setdefault((r["model"], r["stage"], r["mode"]), []).append(r)
    means = {}
    for key, group in groups.items():
        mean = {**group[0], "runs": len(group)}
        for name in group[0]:
            values = [g.get(name) for g in group]
            numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
            if name != "seed" and numbers and len(set(values)) > 1:  # settings such as the micro-batch stay as they are
                mean[name] = sum(values) / len(values)
        losses = [g["final_eval_loss"] for g in group if g.get("final_eval_loss") is not None]
        mean["final_eval_loss_spread"] = max(losses) - min(losses) if len(losses) > 1 else None
        means[key] = mean
    return means


def targets(rows: list[dict]) -> list[dict]:
    """Each target, per model and stage with an original row: value, bound, met.

    Time, eval loss and the reference loop need the default's row. Peak memory needs a row at the
    original's micro-batch, the default's or default_micro4's: ``--modes original default_micro4``
    judges memory alone. With several seeds, each side is the mean over its seeds (``averaged``).
    """
    by_key = averaged(rows)
    checks = []
    for (model, stage, mode), original in by_key.items():
        if mode != "original":
            continue
        default = by_key.get((model, stage, "default"))
        # Memory at the same micro-batch: the default's own, or default_micro4 when the default's is larger.
        micro = original.get("per_device_train_batch_size")
        same = next((r for r in (default, by_key.get((model, stage, "default_micro4")))
                     if r and r.get("per_device_train_batch_size") == micro), None)
        if default is None and same is None:
            continue

        def check(what, value, bound, met, against):
            checks.append({"model": model, "stage": stage, "target": what, "value": value, "bound": bound,
                           "met": None if value is None else met(value, bound),
                           "runs": min(against["runs"], original["runs"])})

        if default:
            ratio = (original["time_per_epoch_s"] / default["time_per_epoch_s"]
                     if original.get("time_per_epoch_s") and default.get("time_per_epoch_s") else None)
            check("original/default time", ratio, TIME_RATIO_TARGETS[stage], lambda v, b: v >= b, default)
            loss = (default["final_eval_loss"] / original["final_eval_loss"]
                    if original.get("final_eval_loss") and default.get("final_eval_loss") is not None else None)
            check("eval loss default/original", loss, EVAL_LOSS_SLACK, lambda v, b: v <= b, default)
            if original["final_eval_loss_spread"] is not None:  # how far apart seeds alone put the original
                checks[-1]["seed_spread"] = original["final_eval_loss_spread"] / original["final_eval_loss"]
        memory = (same["peak_gpu_allocated_gib"] / original["peak_gpu_allocated_gib"]
                  if same and original.get("peak_gpu_allocated_gib") and same.get("peak_gpu_allocated_gib") else None)
        check(f"peak allocated default/original (micro-batch {micro})", memory, 1.0, lambda v, b: v <= b,
              same or default)
        reference = by_key.get((model, "reference loop", "compiled"))
        if default and stage == "baseline" and reference:
            check("baseline default/reference loop time", default["time_per_epoch_s"] / reference["time_per_epoch_s"],
                  REFERENCE_SLACK, lambda v, b: v <= b, default)
            if checks[-1]["value"] < 1 / REFERENCE_SLACK:
                # The loop runs the Trainer's batches with less around them: the bar to reach, not one to beat
                # by this much. A loop slower than the Trainer ran badly (its card or its set-up), not the Trainer well.
                checks[-1].update(met=None, note="the loop ran slower than the default: no reference")
    return checks


def targets_table(checks: list[dict]) -> str:
    lines = ["| model | stage | target | value | bound | met | seeds |", "|---|---|---|---|---|---|---|"]
    for c in checks:
        value = "-" if c["value"] is None else f"{c['value']:.3f}"
        met = {True: "yes", False: "**no**", None: "-"}[c["met"]]
        sign = ">=" if c["target"].startswith("original/default") else "<="
        seeds = f"{c.get('runs', 1)}" + (f"; the original's spread {100 * c['seed_spread']:.1f}%"
                                         if c.get("seed_spread") is not None else "")
        seeds += f"; {c['note']}" if c.get("note") else ""
        lines.append(f"| {c['model']} | {c['stage']} | {c['target']} | {value} | {sign} {c['bound']:g} | {met} "
                     f"| {seeds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workshop bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["gpt2-medium", "bigscience/bloom-560m"],
                   help="Architectures, built from their configs.")
    p.add_argument("--stages", nargs="+", default=list(STAGES), choices=list(STAGES))
    p.add_argument("--modes", nargs="+", default=DEFAULT_MODES, choices=list(MODES),
                   help="original, default and default_micro4; the other default_* modes change one lever each.")
    p.add_argument("--samples", type=int, default=1000, help="Training samples (one epoch).")
    p.add_argument("--eval_samples", type=int, default=100)
    p.add_argument("--seeds", nargs="+", type=int, default=[42],
                   help="Training seeds (initial weights, batch order): every run once per seed, the targets "
                        "judged on the means. The samples stay the same.")
    p.add_argument("--no_reference", action="store_true", help="Skip the plain PyTorch loop.")
    p.add_argument("--out", default=None, help="Output folder; default logs/bench/<timestamp>.")
    p.add_argument("--combine", nargs="+", type=Path, default=None, metavar="DIR",
                   help="Train nothing: one table and verdict from earlier bench folders (a bench split over jobs "
                        "with --stages), each model and stage from the last folder that ran it.")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="Flags passed to every `workshop train` run (put last), e.g. --extra --torch_compile.")
    args = p.parse_args(argv)
    out = Path(args.out or f"logs/bench/{dt.datetime.now():%Y%m%d-%H%M%S}")
    try:
        if out.exists() and any(out.iterdir()):
            raise WorkshopError(f"--out {out} is not empty: give a new folder (earlier results stay untouched)")
        if args.combine:
            rows, header = combine(args.combine)
            out.mkdir(parents=True, exist_ok=True)
            text = write_results(out, rows, header, f"Combined from {', '.join(map(str, args.combine))}: each model "
                                                    "and stage from the last that ran it.")
            print(f"{text}\nwritten: {out / 'bench.md'}, {out / 'bench.json'}")
            return 0
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    data = write_data(out / "data", args.samples, args.eval_samples)
    rows = []
    for model in args.models:
        for stage in args.stages:
            for mode in args.modes:
                if mode in DS_LEVERS and stages.REGISTRY[stage].ds_json is None:
                    continue  # a DeepSpeed setting: nothing to change where DeepSpeed does not run
                for seed in args.seeds:
                    rows.append(run_one(out, model, stage, mode, data, ["--max_train_samples", str(args.samples)]
                                        + args.extra, seed, name_seed=len(args.seeds) > 1))
                    write_results(out, rows)  # a job stopped at its time limit keeps the rows it finished
    # The loops run in this process, after every training run: the memory they leave cached would count in
    # a later run's nvidia-smi reading (gpt2-medium's, after bloom-560m's loops, read 47 GiB too high).
    if not args.no_reference and os.environ.get("CUDA_VISIBLE_DEVICES", "0") != "":
        for model in args.models:
            for compiled in (False, True):  # the eager loop tells what torch.compile itself adds or takes away
                print(f"\n=== {model} | reference loop | {'compiled' if compiled else 'eager'}: a first pass "
                      "over every batch, then the timed one", flush=True)
                loop = reference_loop(model, data, args.samples, baseline_batching(rows, model), compiled)
                print("\n".join("    " + line for line in table(loop).splitlines()[2:]), flush=True)
                rows += loop
                write_results(out, rows)
    print(f"\n{write_results(out, rows)}\nwritten: {out / 'bench.md'}, {out / 'bench.json'}")
    return 0


def write_results(out: Path, rows: list[dict], header: str | None = None, note: str = "") -> str:
    """bench.md and bench.json for the rows so far; returns the Markdown.

    header: the GPU, versions and date (``environment_line``) unless given; note: a paragraph under it."""
    header = header or environment_line()
    checks = targets(rows)
    text = "\n\n".join(part for part in (header, note, table(rows)) if part) + "\n"
    if checks:
        text += ("\nTargets (a row per target, model and stage; ratios within one invocation):\n\n"
                 f"{targets_table(checks)}\n")
    files.write_text(out / "bench.md", text)
    files.write_json(out / "bench.json", {"header": header, "rows": rows, "targets": checks})
    return text


def combine(folders: list[Path]) -> tuple[list[dict], str]:
    """The rows of several bench folders, and their header lines: a bench split over jobs with --stages.

    Each model and stage comes whole from the last folder that ran it, and the reference loops with
    their model's baseline (loops from a folder without it are left out): every ratio in the table
    stays between the runs of one invocation. The header: each folder's, once where they agree.
    """
    chosen: dict[tuple[str, str], list[dict]] = {}
    headers = []
    for folder in folders:
        data, header = files.read_results(folder, "bench")
        headers.append(header)
        found: dict[tuple[str, str], list[dict]] = {}
        for r in data["rows"]:
            if r["stage"] != "reference loop":
                found.setdefault((r["model"], r["stage"]), []).append(r)
        for r in data["rows"]:
            if r["stage"] == "reference loop" and (r["model"], "baseline") in found:
                found[(r["model"], "baseline")].append(r)
        chosen.update(found)
    models = list(dict.fromkeys(model for model, _ in chosen))
    ordered = [chosen[key] for key in sorted(chosen, key=lambda k: (models.index(k[0]), STAGES.index(k[1])))]
    rows = [r for group in ordered for r in group if r["stage"] != "reference loop"]
    rows += [r for group in ordered for r in group if r["stage"] == "reference loop"]  # last, as a bench writes them
    return rows, "; ".join(dict.fromkeys(headers))
