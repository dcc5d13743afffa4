"""The one Trainer subclass and its callbacks: what a run measures, profiles, and how it stops and resumes.

``WorkshopTrainer`` counts the tokens it trains on and writes checkpoints atomically.
``MeasureCallback`` writes one row per logging step to ``steps.jsonl`` and to the log line, for example::

    step 40/96 | epoch 1.25 | loss 2.3105 | 11.2k tok/s | MFU 31.4% | GPU 6.01 GiB (peak 7.20, reserved 8.00) | host 3.1 GiB

Rows are written at logging steps, where the Trainer already waits for the GPU to report the loss,
so measuring adds no extra synchronisation. Tokens are the non-padding tokens of every rank.

Surviving time limits and preemption (``StopOnSignal``): SLURM sends SIGUSR1 before the time limit
(``#SBATCH --signal=B:USR1@600``, forwarded to every rank by slurm/node.sh) and SIGTERM on preemption
or ``scancel``. Either one makes the run save a checkpoint at the next optimizer-step boundary and
stop; ``status.json`` then says ``stopped``, and the next start with the same run folder (the requeued
job) resumes from the newest complete checkpoint by itself. ``--resume_from_checkpoint PATH`` resumes
from a checkpoint by hand.

A checkpoint is written under ``checkpoints/.incomplete/`` and renamed to ``checkpoints/checkpoint-N``
once every rank has finished writing it, so a job killed while saving leaves the previous
checkpoint as the newest one. The last ``--save_total_limit`` checkpoints are kept.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from transformers import Trainer, TrainerCallback

from workshop import files, metrics
from workshop.distributed import print0
from workshop.units import GIB

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
STAGING = ".incomplete"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def complete_checkpoints(folder: str | Path) -> list[Path]:
    """Finished checkpoints in ``folder``, oldest first (anything still in staging is not one)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class WorkshopTrainer(Trainer):
    """The stock Trainer, counting non-padding tokens and writing checkpoints atomically.

    Tokens are counted on the device without waiting for it (``include_num_input_tokens_seen`` does
    the same count but calls ``.item()`` on every micro-batch, which stalls the GPU pipeline). A
    checkpoint is written under a temporary name and renamed once every rank has written its part.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=self.args.device)

    def training_step(self, model, inputs, *args, **kwargs):
        self.tokens_seen += inputs["attention_mask"].sum()
        return super().training_step(model, inputs, *args, **kwargs)

    def _get_output_dir(self, trial):
        return os.path.join(self.args.output_dir, STAGING) if getattr(self, "_staging", False) else \
            super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        final_root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # writes .incomplete/checkpoint-N on every rank
        finally:
            self._staging = False
        _barrier()  # every rank's shards are on disk before the checkpoint counts as complete
        if self.args.should_save:
            target = final_root / name
            if target.exists():  # saved again at the same step (a stop right after an epoch's save)
                shutil.rmtree(target)
            os.replace(final_root / STAGING / name, target)
            self._rotate(final_root)
        _barrier()

    def _rotate(self, root: Path) -> None:
        limit = self.args.save_total_limit
        if limit:
            for old in complete_checkpoints(root)[:-limit]:
                shutil.rmtree(old, ignore_errors=True)


def all_ranks_sum(value: torch.Tensor) -> int:
    """A count summed over every rank (the value itself in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return int(value.item())


class MeasureCallback(TrainerCallback):
    """Writes steps.jsonl, prints the log line, and keeps the per-run peaks and epoch times."""

    def __init__(self, trainer: WorkshopTrainer, steps_path, flops_per_token: float, gpu_name: str | None,
                 precision: str, world_size: int, is_main: bool):
        self.trainer = trainer
        self.steps_path = steps_path
        self.flops_per_token = flops_per_token
        self.peak_flops = metrics.peak_flops(gpu_name, precision)
        self.world_size = world_size
        self.is_main = is_main
        self.cuda = torch.cuda.is_available()
        self.process = psutil.Process()
        self.epoch_times: list[float] = []
        self.first_step_s = None  # this run's first optimizer step: kernels loaded, optimizer state allocated
        self.peak_host_rss = 0
        self.eval_samples_per_second: list[float] = []

    # -- helpers
    def _memory(self) -> dict:
        rss = self.process.memory_info().rss
        self.peak_host_rss = max(self.peak_host_rss, rss)
        row = {"host_rss_gib": rss / GIB, "gpu_allocated_gib": None, "gpu_reserved_gib": None,
               "gpu_peak_allocated_gib": None, "gpu_peak_reserved_gib": None}
        if self.cuda:
            row.update(gpu_allocated_gib=torch.cuda.memory_allocated() / GIB,
                       gpu_reserved_gib=torch.cuda.memory_reserved() / GIB,
                       gpu_peak_allocated_gib=torch.cuda.max_memory_allocated() / GIB,
                       gpu_peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB)
        return row

    def peaks(self) -> dict:
        self._memory()
        # The kernel's high-water mark also covers what no step saw: loading the model, DeepSpeed's set-up.
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {
            "peak_gpu_allocated_gib": torch.cuda.max_memory_allocated() / GIB if self.cuda else None,
            "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / GIB if self.cuda else None,
            "peak_host_rss_gib": max(self.peak_host_rss, max_rss) / GIB,
        }

    # -- events
    def on_train_begin(self, args, state, control, **kwargs):
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = all_ranks_sum(self.trainer.tokens_seen)
        self.last_step = self.first_step = state.global_step
        if self.is_main:
            self.steps_file = open(self.steps_path, "a")

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:  # one wait for the GPU in the run, at its first step
            if self.cuda:
                torch.cuda.synchronize()
            self.first_step_s = time.perf_counter() - self.epoch_start

    def on_epoch_end(self, args, state, control, **kwargs):
        # Fires before the epoch's evaluation and checkpoint, so this is training time alone.
        if self.cuda:
            torch.cuda.synchronize()
        self.epoch_times.append(time.perf_counter() - self.epoch_start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "eval_samples_per_second" in logs:
            self.eval_samples_per_second.append(logs["eval_samples_per_second"])
        if "loss" not in logs:
            if self.is_main and "eval_loss" in logs:
                print0(f"eval  epoch {logs.get('epoch', 0):.2f} | eval loss {logs['eval_loss']:.4f} | "
                       f"{logs.get('eval_samples_per_second', 0):.1f} samples/s")
            return
        # Every rank takes part in the token all-reduce; only rank 0 writes and prints.
        tokens = all_ranks_sum(self.trainer.tokens_seen)
        now = time.perf_counter()
        dt = max(now - self.last_time, 1e-9)
        steps = state.global_step - self.last_step
        samples = steps * args.per_device_train_batch_size * args.gradient_accumulation_steps * self.world_size
        tokens_per_s = (tokens - self.last_tokens) / dt
        mfu = metrics.mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size)
        row = {"step": state.global_step, "epoch": state.epoch, "loss": logs["loss"],
               "time_s": now - self.start, "step_time_s": dt / max(steps, 1), "tokens": tokens - self.last_tokens,
               "samples": samples, "tokens_per_s": tokens_per_s, "samples_per_s": samples / dt, "mfu": mfu,
               **self._memory()}
        self.last_time, self.last_tokens, self.last_step = now, tokens, state.global_step
        if not self.is_main:
            return
        self.steps_file.write(json.dumps(row) + "\n")
        self.steps_file.flush()
        gpu = (f" | GPU {row['gpu_allocated_gib']:.2f} GiB (peak {row['gpu_peak_allocated_gib']:.2f}, "
               f"reserved {row['gpu_peak_reserved_gib']:.2f})" if self.cuda else "")
        mfu_text = f" | MFU {100 * mfu:.1f}%" if mfu is not None else ""
        print0(f"step {state.global_step}/{state.max_steps} | epoch {state.epoch:.2f} | loss {logs['loss']:.4f} | "
               f"{tokens_per_s / 1000:.1f}k tok/s{mfu_text}{gpu} | host {row['host_rss_gib']:.1f} GiB")

    def on_train_end(self, args, state, control, **kwargs):
        self.train_time = time.perf_counter() - self.start
        if self.is_main:
            self.steps_file.close()


class ProfileCallback(TrainerCallback):
    """``--profile_steps N``: torch.profiler over N optimizer steps after the first, on rank 0.

    The first step is left out: it loads kernels, allocates the optimizer state and (under
    DeepSpeed) its buffers; ``--profile_first_step`` (``from_first``) profiles from it, to see what
    that costs. profile.txt opens with how busy the GPU was (kernel time over wall
    time: a low figure means the GPU waits for Python, kernel launches or the CPU optimizer), then
    the operations that took the most time: on a GPU by GPU time, then again by CPU time (where a
    GPU that waits is waiting).
    """

    def __init__(self, run_dir, steps: int, is_main: bool, from_first: bool = False):
        self.run_dir, self.steps, self.is_main = run_dir, steps, is_main
        self.skip = 0 if from_first else 1  # optimizer steps before the profile starts
        self.cuda = torch.cuda.is_available()
        self.profiler = None
        self.first_step = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.first_step is None:
            self.first_step = state.global_step
        if self.is_main and self.profiler is None and state.global_step == self.first_step + self.skip:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()
            self.start_time, self.start_step = time.perf_counter(), state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is not None and state.global_step - self.start_step >= self.steps:
            self._finish(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        if self.profiler is not None:  # fewer steps left than asked for
            self._finish(state.global_step)

    def _finish(self, step: int) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        wall_s = time.perf_counter() - self.start_time
        self.profiler.stop()
        steps = step - self.start_step
        events = self.profiler.key_averages()
        # The kernels themselves (device events); CPU operations carry their kernels' time as well.
        kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
        device_s = sum(e.self_device_time_total for e in kernels) / 1e6
        sort_by = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        head = (f"{steps} optimizer step(s) profiled (steps {self.start_step + 1}-{step}): {wall_s:.3f} s wall, "
                f"{wall_s / max(steps, 1) * 1000:.1f} ms per step")
        if self.cuda:
            head += (f"; GPU kernels {device_s:.3f} s = {100 * device_s / wall_s:.0f}% of the wall time "
                     "(the rest the GPU waits)")
        text = f"{head}\n\n{events.table(sort_by=sort_by, row_limit=30)}\n"
        if self.cuda:  # where a GPU that waits is waiting: the operations that kept the CPU busiest
            text += f"\nBy CPU time:\n{events.table(sort_by='self_cpu_time_total', row_limit=30)}\n"
        files.write_text(self.run_dir / "profile.txt", text)
        trace = self.run_dir / "profile_trace.json"  # written whole, then renamed, as every run-folder file
        self.profiler.export_chrome_trace(str(trace.with_name(trace.name + ".partial")))
        os.replace(trace.with_name(trace.name + ".partial"), trace)
        print0(f"profile: {head} -> {self.run_dir / 'profile.txt'}")
        self.profiler = None


class StopOnSignal(TrainerCallback):
    """On SIGUSR1/SIGTERM: checkpoint at the next step boundary and stop, on every rank together."""

    def __init__(self):
        self.received: str | None = None
        self.stopped_at: int | None = None
        # The job scripts start training with SIGUSR1 ignored, so that a late signal (SLURM signals
        # every process again when it ends a job) never kills a rank: that is what goes back after.
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        # Ranks may see the signal a step apart; a tiny all-reduce on a CPU (gloo) group each step
        # makes them agree without waiting on the GPU.
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint at the next step, then stopping", self.received)

    def _any_rank_received(self) -> bool:
        if self.group is None:
            return self.received is not None
        flag = torch.tensor([int(self.received is not None)])
        dist.all_reduce(flag, group=self.group)
        if flag.item() and self.received is None:
            self.received = "signal on another rank"
        return bool(flag.item())

    def on_step_end(self, args, state, control, **kwargs):
        if self._any_rank_received():
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.stopped_at is not None:  # the checkpoint is written; no end-of-epoch eval or save
            control.should_evaluate = False
            control.should_save = False
        return control

    def restore_handlers(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
