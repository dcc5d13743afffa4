"""``workshop <command>``: one console script for every capability.

    workshop train --preset tiny        # fine-tune (python -m workshop train works the same)
    workshop report logs/               # the metrics tables and plots from run folders
    workshop estimate --model gpt2-xl   # predicted memory per GPU for each ZeRO stage
    workshop doctor                     # is this machine ready? (run it before the first job)
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("workshop.train", "fine-tune a model (every stage script runs this)"),
    "report": ("workshop.report", "metrics table (Markdown, CSV) and plots from run folders"),
    "estimate": ("workshop.estimate", "predicted GPU and host memory per ZeRO stage"),
    "bench": ("workshop.bench", "each stage as the original workshop ran it vs this project's defaults (GPU)"),
    "scale": ("workshop.scale", "the largest model each stage trains on one GPU, predicted and found (GPU)"),
    "prefetch": ("workshop.prefetch", "download model, tokenizer and data into the caches (login node)"),
    "doctor": ("workshop.doctor", "is this machine ready for the jobs? one line per check, each failure with its fix"),
}


def usage() -> str:
    lines = ["usage: workshop <command> [flags]   (workshop <command> --help for its flags)", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith(("--local_rank", "--local-rank")):
        # The deepspeed launcher (`deepspeed --module workshop train ...`) puts --local_rank=N before
        # the command; the Trainer's arguments read it after.
        argv.insert(1, argv.pop(0))
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"error: unknown command {command!r}: use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)
