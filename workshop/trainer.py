"""The one Trainer subclass and its callbacks: what a run measures, profiles, and how it stops and resumes.

``WorkshopTrainer`` counts the tokens it trains on and writes checkpoints atomically.
``MeasureCallback`` writes one row per logging step to ``steps.jsonl`` and to the log line, for example::

    step 40/96 | epoch 1.25 | loss 2.3105 | 11.2k tok/s | MFU 31.4% | GPU 6.01 GiB (peak 7.20, reserved 8.00) | host 3.1 GiB | elapsed 0:37 | left ~0:31

"elapsed" is the job's time since its start; "left" the training steps still to do, at this launch's
mean step time so far (evaluations and checkpoints not included). ``JobClock`` owns both, and the
job's time per phase (``time_breakdown_s`` in metrics.json). Rows are written at logging steps, where
the Trainer already waits for the GPU to report the loss, so measuring adds no extra synchronisation.
Tokens are the non-padding tokens of every rank.

Checkpoints (``SaveOnTimeOrSignal``): by default one every ``--save_minutes`` (30) of training, none
at the end of an epoch (``--save_strategy epoch|steps`` brings back the Trainer's own schedule), and the
trained model at the end. Surviving time limits and preemption: SLURM sends SIGUSR1 before the time limit
(``#SBATCH --signal=B:USR1@600``, forwarded to every rank by slurm/node.sh) and SIGTERM on preemption
or ``scancel``. Either one makes the run save a checkpoint at the next optimizer-step boundary and
stop; ``status.json`` then says ``stopped``, and the next start with the same run folder (the requeued
job) resumes from the newest complete checkpoint by itself. ``--resume_from_checkpoint PATH`` resumes
from a checkpoint by hand.

A checkpoint is written under ``checkpoints/.incomplete/`` and renamed to ``checkpoints/checkpoint-N``
once every rank has finished writing it, so a job killed while saving leaves the previous
checkpoint as the newest one. The last ``--save_total_limit`` checkpoints are kept, and with
``--load_best_model_at_end`` the best one too.
"""

from __future__ import annotations

import contextlib
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
from workshop.errors import WorkshopError
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


# The phases of a job, in the order they first happen: time_breakdown_s in metrics.json.
PHASES = ("launch_and_imports", "preflight", "data", "model_build", "trainer_setup", "training_steps", "evaluation",
          "checkpoints", "final_save", "answer_scoring", "writing_results")
JOB_START = "WORKSHOP_JOB_START"  # seconds since the epoch at the job script's start (slurm/common.sh)


class JobClock:
    """Where a job's wall time goes: every moment from the job's start to its results belongs to one phase.

    The job script exports its start time in $WORKSHOP_JOB_START; without it (a bare ``workshop train``)
    the process's start counts. ``launch_and_imports`` runs from there to the clock's creation, the first
    line of ``workshop train``; ``switch`` ends the current phase and starts another; ``within`` runs a
    phase inside the current one and goes back to it (evaluation and checkpoints happen inside
    ``trainer.train()``, so they are not counted in the training steps as well).
    """

    def __init__(self):
        started = os.environ.get(JOB_START)
        try:
            start = float(started) if started else _process_start()
        except ValueError:
            raise WorkshopError(f"{JOB_START}={started} is not a time in seconds since the epoch: unset it (the "
                                "job scripts set it themselves)") from None
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.seconds["launch_and_imports"] = max(0.0, time.time() - start)
        self.current = "preflight"
        self.mark = time.monotonic()

    def switch(self, phase: str) -> None:
        now = time.monotonic()
        self.seconds[self.current] += now - self.mark
        self.current, self.mark = phase, now

    @contextlib.contextmanager
    def within(self, phase: str):
        outer = self.current
        self.switch(phase)
        try:
            yield
        finally:
            self.switch(outer)

    def so_far(self, phase: str) -> float:
        """Seconds spent in ``phase`` until now, the running part included."""
        return self.seconds[phase] + (time.monotonic() - self.mark if phase == self.current else 0.0)

    def elapsed(self) -> float:
        """Seconds since the job started."""
        return sum(self.seconds.values()) + time.monotonic() - self.mark

    def breakdown(self) -> dict[str, float]:
        """Seconds per phase until now (the current phase closed here); they add up to the job's wall time."""
        self.switch(self.current)
        return dict(self.seconds)


def _process_start() -> float:
    """Seconds since the epoch at this process's start.

    On Linux from the kernel's start time in clock ticks since boot (10 ms steps): psutil adds those to
    the boot time rounded to the second, which can put the start up to a second early.
    """
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError):  # no /proc (macOS): psutil's reading is exact there
        return psutil.Process().create_time()


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class WorkshopTrainer(Trainer):
    """The stock Trainer, counting non-padding tokens and writing checkpoints atomically.

    Tokens are counted on the device without waiting for it (``include_num_input_tokens_seen`` does
    the same count but calls ``.item()`` on every micro-batch, which stalls the GPU pipeline). A
    checkpoint is written under a temporary name and renamed once every rank has written its part.
    Evaluations and checkpoints are timed on the job's clock as phases of their own.
    """

    def __init__(self, *args, clock: JobClock | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.clock = clock or JobClock()
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=self.args.device)

    def training_step(self, model, inputs, *args, **kwargs):
        self.tokens_seen += inputs["attention_mask"].sum()
        return super().training_step(model, inputs, *args, **kwargs)

    def evaluate(self, *args, **kwargs):
        with self.clock.within("evaluation"):
            return super().evaluate(*args, **kwargs)

    def _get_output_dir(self, trial):
        return os.path.join(self.args.output_dir, STAGING) if getattr(self, "_staging", False) else \
            super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        with self.clock.within("checkpoints"):
            self._save_checkpoint_atomically(model, trial)

    def _save_checkpoint_atomically(self, model, trial):
        final_root = Path(self.args.output_dir)
        name = f"checkpoint-{self.state.global_step}"
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)  # writes .incomplete/checkpoint-N on every rank
        finally:
            self._staging = False
        staged = final_root / STAGING / name
        if self._best() == staged:  # the Trainer found the best checkpoint where it was being written
            self.state.best_model_checkpoint = str(final_root / name)
            if self.args.should_save:
                self.state.save_to_json(str(staged / "trainer_state.json"))  # so that a resumed run knows it
        _barrier()  # every rank's shards are on disk before the checkpoint counts as complete
        if self.args.should_save:
            target = final_root / name
            if target.exists():  # saved again at the same step (a stop right after an epoch's save)
                shutil.rmtree(target)
            os.replace(staged, target)
            self._rotate(final_root)
        _barrier()

    def _best(self) -> Path | None:
        """--load_best_model_at_end's checkpoint so far."""
        return Path(self.state.best_model_checkpoint) if self.state.best_model_checkpoint else None

    def _rotate(self, root: Path) -> None:
        limit = self.args.save_total_limit
        if limit:
            for old in complete_checkpoints(root)[:-limit]:
                if old != self._best():
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
        self.setup_peak = (0, 0)  # GPU bytes (allocated, reserved) before the first step, kept at on_train_begin
        self.eval_samples_per_second: list[float] = []

    # -- helpers
    def _memory(self) -> dict:
        rss = self.process.memory_info().rss
        self.peak_host_rss = max(self.peak_host_rss, rss)
        row = {"host_rss_gib": rss / GIB, "gpu_allocated_gib": None, "gpu_reserved_gib": None,
               "gpu_peak_allocated_gib": None, "gpu_peak_reserved_gib": None}
        if self.cuda:
            allocated, reserved = self._gpu_peaks()
            row.update(gpu_allocated_gib=torch.cuda.memory_allocated() / GIB,
                       gpu_reserved_gib=torch.cuda.memory_reserved() / GIB,
                       gpu_peak_allocated_gib=allocated / GIB, gpu_peak_reserved_gib=reserved / GIB)
        return row

    def _gpu_peaks(self) -> tuple[int, int]:
        """The run's GPU high-water marks so far (allocated, reserved): the set-up's, or the training's since."""
        return (max(self.setup_peak[0], torch.cuda.max_memory_allocated()),
                max(self.setup_peak[1], torch.cuda.max_memory_reserved()))

    def peaks(self) -> dict:
        self._memory()
        # The kernel's high-water mark also covers what no step saw: loading the model, DeepSpeed's set-up.
        max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        gpu = {"peak_gpu_allocated_gib": None, "peak_gpu_reserved_gib": None, "peak_gpu_allocated_setup_gib": None,
               "peak_gpu_allocated_training_gib": None}
        if self.cuda:
            allocated, reserved = self._gpu_peaks()
            gpu.update(peak_gpu_allocated_gib=allocated / GIB, peak_gpu_reserved_gib=reserved / GIB,
                       peak_gpu_allocated_setup_gib=self.setup_peak[0] / GIB,
                       peak_gpu_allocated_training_gib=torch.cuda.max_memory_allocated() / GIB)
        return {**gpu, "peak_host_rss_gib": max(self.peak_host_rss, max_rss) / GIB}

    # -- events
    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.clock.switch("training_steps")
        if self.cuda:  # the set-up's peak (the model's build, DeepSpeed's engine and optimizer), then the training's
            self.setup_peak = (torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved())
            torch.cuda.reset_peak_memory_stats()
        self.start = self.last_time = time.perf_counter()
        self.last_tokens = all_ranks_sum(self.trainer.tokens_seen)
        self.last_step = self.first_step = state.global_step
        if self.is_main:
            self.steps_file = open(self.steps_path, "a")

    # An epoch's time is the job clock's training_steps within it: the evaluations and checkpoints made
    # during the epoch (--eval_strategy steps, checkpoints by time) are phases of their own, not in it.
    def on_epoch_begin(self, args, state, control, **kwargs):
        self.epoch_start = self.trainer.clock.so_far("training_steps")

    def on_step_end(self, args, state, control, **kwargs):
        if self.first_step_s is None:  # one wait for the GPU in the run, at its first step
            if self.cuda:
                torch.cuda.synchronize()
            self.first_step_s = self.trainer.clock.so_far("training_steps") - self.epoch_start

    def on_epoch_end(self, args, state, control, **kwargs):
        if self.cuda:
            torch.cuda.synchronize()
        self.epoch_times.append(self.trainer.clock.so_far("training_steps") - self.epoch_start)

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
        clock = self.trainer.clock
        # the steps still to do at this launch's mean step time so far (evaluation and checkpoints not in it)
        step_s = clock.so_far("training_steps") / max(state.global_step - self.first_step, 1)
        print0(f"step {state.global_step}/{state.max_steps} | epoch {state.epoch:.2f} | loss {logs['loss']:.4f} | "
               f"{tokens_per_s / 1000:.1f}k tok/s{mfu_text}{gpu} | host {row['host_rss_gib']:.1f} GiB | "
               f"elapsed {metrics.clock_time(clock.elapsed())} | "
               f"left ~{metrics.clock_time(step_s * (state.max_steps - state.global_step))}")

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.clock.switch("trainer_setup")
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


class SaveOnTimeOrSignal(TrainerCallback):
    """A checkpoint every ``--save_minutes``; on SIGUSR1/SIGTERM one at the next step boundary, then stop.

    Every rank decides the same at each step, or a save one rank enters and another does not would hang
    the run (DeepSpeed's save is collective): a tiny all-reduce on a CPU (gloo) group each step adds up
    what each rank saw, a signal (ranks may see it a step apart) or its clock's checkpoint time, without
    waiting on the GPU. The interval counts from the start of training, then from the end of the last
    checkpoint (any checkpoint: the Trainer's, by time, on a signal).
    """

    def __init__(self, save_every_s: float, clock: JobClock):
        self.save_every_s, self.clock = save_every_s, clock
        self.received: str | None = None
        self.stopped_at: int | None = None
        # The job scripts start training with SIGUSR1 ignored, so that a late signal (SLURM signals
        # every process again when it ends a job) never kills a rank: that is what goes back after.
        self.previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        self.group = None
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo")

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        log.warning("received %s: saving a checkpoint at the next step, then stopping", self.received)

    def _decide(self) -> tuple[bool, bool]:
        """(a checkpoint is due by the clock, a stop signal came), as every rank agrees."""
        due = bool(self.save_every_s) and self.clock.elapsed() - self.last_save >= self.save_every_s
        flags = torch.tensor([int(due), int(self.received is not None)])
        if self.group is not None:
            dist.all_reduce(flags, group=self.group)
        if flags[1] and self.received is None:
            self.received = "signal on another rank"
        return bool(flags[0]), bool(flags[1])

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = self.clock.elapsed()  # on the job's clock; the Trainer calls this before any step

    def on_save(self, args, state, control, **kwargs):
        self.last_save = self.clock.elapsed()

    def on_step_end(self, args, state, control, **kwargs):
        due, stop = self._decide()
        if due or stop:
            control.should_save = True
        if stop:
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
