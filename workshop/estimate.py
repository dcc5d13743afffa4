"""``workshop estimate``: predicted GPU and host memory per ZeRO stage, before spending GPU time.

    workshop estimate --model gpt2-large                          # every stage x offload on one 80 GiB GPU
    workshop estimate --model bigscience/bloom-7b1 --num_gpus 8 --gpu_memory_gib 40
    workshop estimate --model path/to/model_or_config.json --deepspeed ds_configs/zero3.json
    workshop estimate --model gpt2-medium --zero_stage none --micro_batch 8 --seq_len 1024

The command line over ``workshop.memory``, whose docstring says what is predicted and how.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from workshop import stages
from workshop.ds_config import deepspeed_choices
from workshop.errors import WorkshopError
from workshop.memory import CUDA_CONTEXT_BYTES, NCCL_BYTES, DeepSpeedSettings, Estimate, Settings, predict
from workshop.shapes import ModelShape, model_shape
from workshop.units import GIB

OFFLOAD_CHOICES = ("none", "cpu", "nvme")
# (stage, optimizer offload, parameter offload) of each stage a job script runs, in the registry's order.
LADDER = [(s.zero_stage, s.offload_optimizer, s.offload_param) for s in stages.REGISTRY.values() if s.job_script]


def _stage(value: str) -> int | None | str:
    if value in ("none", "all"):
        return None if value == "none" else "all"
    if value in ("0", "1", "2", "3"):
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: use 0, 1, 2, 3, none (no DeepSpeed) or all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workshop estimate",
        description="Predicted memory per GPU (model states, activations, logits, DeepSpeed buffers, CUDA context) "
                    "and per node (host), for each ZeRO stage and offload choice, and whether it fits your GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bigscience/bloom-560m",
                   help="known name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, bloom-560m, bloom-1b7, bloom-3b, "
                        "bloom-7b1, ...), a local model folder, a config.json, or a cached hub name. Works offline "
                        "for the known names.")
    p.add_argument("--zero_stage", type=_stage, default="all", metavar="{0,1,2,3,none,all}",
                   help="0-3, 'none' (the Trainer without DeepSpeed) or 'all' (every rung of the workshop's ladder)")
    p.add_argument("--offload", choices=OFFLOAD_CHOICES + ("all",), default="all",
                   help="where the optimizer state lives (ZeRO-Offload / ZeRO-Infinity): cpu trades GPU memory for "
                        "host memory and time; nvme when host memory is short too")
    p.add_argument("--offload_param", choices=OFFLOAD_CHOICES + ("all",), default="all",
                   help="where the parameters live (stage 3 only): the last resort when the 16-bit weights alone "
                        "do not fit")
    p.add_argument("--deepspeed", default=None,
                   help="a DeepSpeed JSON (e.g. ds_configs/zero2.json): its stage, offload and bucket sizes are "
                        "used (and override --zero_stage/--offload)")
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--num_nodes", type=int, default=1, help="nodes")
    p.add_argument("--micro_batch", type=int, default=16,
                   help="per-GPU batch (--per_device_train_batch_size). Activations grow linearly with it: halve "
                        "it (and double gradient accumulation) when only activations do not fit")
    p.add_argument("--seq_len", type=int, default=512,
                   help="tokens per sample in the longest batch (--max_seq_length, or less with dynamic padding)")
    p.add_argument("--targets_per_sample", type=int, default=None,
                   help="tokens per sample the loss has a target for (--loss_on answer: the answer's); the output "
                        "layer makes logits only there (--fast_kernels). Default: every position, the most a batch "
                        "can need. `workshop train` and `workshop report` take it from the run's data")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="training precision; fp32 doubles activations and removes nothing from the optimizer")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="keep only each layer's input and recompute the rest: activations shrink ~20-30x for "
                        "about a third more compute")
    p.add_argument("--vocab_size", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--attn_implementation", choices=("sdpa", "eager"), default=None,
                   help="attention kernel; default: what workshop train picks for the model (sdpa stores no s x s "
                        "matrix)")
    p.add_argument("--stock_kernels", action="store_true",
                   help="for runs with --fast_kernels false (GPT-2's stock GELU keeps more activations)")
    p.add_argument("--gpu_memory_gib", type=float, default=80.0,
                   help="GPU memory to check the predictions against (H100/A100: 80, A100: 40, V100: 32 or 16)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON instead of a table")
    return p


def _rows(args) -> list[tuple[int | None, str | None, str | None]]:
    def keep(value, wanted):
        return wanted == "all" or (value or "none") == wanted

    rows = [r for r in LADDER if (args.zero_stage == "all" or r[0] == args.zero_stage)
            and keep(r[1], args.offload) and keep(r[2], args.offload_param)]
    if not rows and args.zero_stage != "all":  # an explicit combination off the ladder, e.g. stage 1 + cpu
        optimizer = None if args.offload == "all" else args.offload
        param = None if args.offload_param == "all" else args.offload_param
        rows = [(args.zero_stage, None if optimizer == "none" else optimizer, None if param == "none" else param)]
    return rows


def _offload_label(optimizer: str | None, param: str | None) -> str:
    if not optimizer and not param:
        return "-"
    return f"optimizer {optimizer or '-'}" + (f", params {param}" if param else "")


def _positions(e: Estimate) -> str:
    return "every position" if e.logit_positions == e.seq_len else f"{e.logit_positions} targets per sample"


def format_estimates(shape: ModelShape, estimates: list[Estimate], gpu_gib: float) -> str:
    first = estimates[0]
    lines = [
        f"{shape.name}: {shape.n_params / 1e6:,.1f}M parameters, {shape.n_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.n_heads} heads, vocabulary {shape.vocab_size:,}, attention {shape.attn_implementation}",
        f"micro-batch {first.micro_batch} x {first.seq_len} tokens, logits at {_positions(first)}, {first.precision}, "
        f"{first.world_size} GPU(s) on {first.num_nodes} node(s)",
        "",
        f"| ZeRO stage | offload | model states | activations | logits | peak (PyTorch) | GPU total (nvidia-smi) "
        f"| host per node | fits {gpu_gib:g} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        stage = "none (Trainer)" if e.zero_stage is None else str(e.zero_stage)
        nvme = f" + {e.nvme_bytes / GIB:.1f} NVMe" if e.nvme_bytes else ""
        fits = "yes" if e.fits(gpu_gib * GIB) else "no"
        if fits == "yes" and e.gpu_total_bytes > 0.9 * gpu_gib * GIB:
            fits = "tight"
        lines.append(f"| {stage} | {_offload_label(e.offload_optimizer, e.offload_param)} "
                     f"| {e.model_states_bytes / GIB:.2f} | {e.activations_bytes / GIB:.2f} "
                     f"| {e.logits_bytes / GIB:.2f} "
                     f"| {e.peak_allocated_bytes / GIB:.2f} | {e.gpu_total_bytes / GIB:.2f} "
                     f"| {e.host_bytes / GIB:.1f}{nvme} | {fits} |")
    lines += [
        "",
        "GiB per GPU unless marked. Model states: the ZeRO paper's bytes per parameter (mixed-precision Adam "
        "2 + 2 + 12, fp32 4 + 4 + 8, the Trainer 4 + 4 + 8), divided as the stage partitions them; ZeRO-1 in bf16 "
        "keeps its gradients in fp32 (2 + 4 + 12, ds_configs/zero1.json).",
        f"Activations: {first.formula}. "
        "Logits: 12 bytes x batch x positions x vocabulary (fp32 loss and its gradients).",
        "Peak (PyTorch) predicts torch.cuda.max_memory_allocated: the start of backward, the optimizer step or, with "
        "optimizer offload, DeepSpeed handing the gradients to the offloaded optimizer, whichever is largest, "
        "DeepSpeed's buckets included. GPU total adds the allocator's cache and the CUDA "
        f"context ({CUDA_CONTEXT_BYTES / GIB:.2f} GiB, +{NCCL_BYTES / GIB:.1f} with NCCL): compare it with nvidia-smi.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag in ("num_gpus", "num_nodes", "micro_batch", "seq_len", "targets_per_sample"):
            if getattr(args, flag) is not None and getattr(args, flag) < 1:
                raise WorkshopError(f"--{flag} {getattr(args, flag)}: must be 1 or more")
        ds_config = None
        if args.deepspeed:
            try:
                ds_config = json.loads(Path(args.deepspeed).read_text())
            except (OSError, ValueError) as e:
                raise WorkshopError(f"--deepspeed {args.deepspeed}: cannot read it as JSON ({e})") from None
        shape = model_shape(args.model, args.vocab_size)
        if ds_config is not None:
            rows = [deepspeed_choices(ds_config)]
        else:
            rows = _rows(args)
            if not rows:
                raise WorkshopError("--zero_stage/--offload/--offload_param select nothing: parameter offload needs "
                                    "stage 3, any offload needs DeepSpeed")
        world = args.num_gpus * args.num_nodes
        deepspeed = DeepSpeedSettings.from_config(ds_config, shape.hidden_size)
        predicted = dataclasses.replace(shape, attn_implementation=args.attn_implementation or shape.attn_implementation)
        estimates = [predict(predicted, Settings(args.seq_len, args.micro_batch, stage, opt, par, world, args.num_nodes,
                                                 args.precision, args.gradient_checkpointing, not args.stock_kernels,
                                                 deepspeed, args.targets_per_sample))
                     for stage, opt, par in rows]
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps({"model": predicted.__dict__, "estimates": [e.gib() for e in estimates]}, indent=2))
    else:
        print(format_estimates(predicted, estimates, args.gpu_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
