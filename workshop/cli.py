"""``workshop <command>``: one console script for every capability.

    workshop train --preset tiny        # fine-tune (python -m workshop train works the same)
    workshop report logs/               # the metrics tables and plots from run folders
    workshop estimate --model gpt2-xl   # predicted memory per GPU for each ZeRO stage
    workshop doctor                     # is this machine ready? (run it before the first job)

``entry`` is the process's entry point (the `workshop` script, `python -m workshop`, so every launcher):
it ends the process with the command's exit status. ``main`` returns it, for callers in a process of
their own (the tests).
"""

from __future__ import annotations

import atexit
import ctypes
import importlib
import os
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


def exit_status(argv: list[str] | None = None) -> int:
    """``main``'s status, with what would escape it turned into the status the process ends with."""
    try:
        return main(argv)
    except SystemExit as e:  # --help (0), argparse's own usage errors (2)
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())
        return 130  # what a shell reports for Ctrl-C
    except BaseException:  # the traceback, as Python prints it; status.json holds its first line
        sys.excepthook(*sys.exc_info())
        return 1


def end_process(code: int):
    """Flush and close, then end the process with ``code``, skipping the interpreter's teardown.

    A run's results are written and its process group left before this; what remains of a normal
    exit is the teardown of modules and C++ objects, where a gloo/NCCL worker thread still alive can
    abort the process ("terminate called without an active exception", SIGABRT): a completed run
    would then exit 134 and its job read FAILED (pytorch/pytorch#179291).
    The atexit handlers still run: they close what libraries opened (logging handlers among them).
    """
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, OSError, ValueError):  # closed, or replaced by something without flush
            pass
    try:
        ctypes.CDLL(None).fflush(None)  # C libraries' buffered output (printf) too
    except (AttributeError, OSError):
        pass
    os._exit(code)


def entry() -> None:
    """The `workshop` console script and `python -m workshop`: run the command, end with its status."""
    end_process(exit_status())
