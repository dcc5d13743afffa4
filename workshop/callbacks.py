"""What the run measures while it trains: memory, useful tokens/s, MFU, time per epoch.

One row per logging step goes to ``steps.jsonl`` and to the log line, for example::

    step 40/96 | epoch 1.25 | loss 2.3105 | 11.2k tok/s | MFU 31.4% | GPU 6.01 GiB (peak 7.20, reserved 8.00) | host 3.1 GiB

Rows are written at logging steps, where the Trainer already waits for the GPU to report the loss,
so measuring adds no extra synchronisation. Tokens are the non-padding tokens of every rank.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import psutil
import torch
from transformers import Trainer, TrainerCallback

from workshop import metrics
from workshop.distributed import print0
from workshop.units import GIB

class TokenCountingTrainer(Trainer):
    """The stock Trainer, counting non-padding tokens on the device without waiting for it.

    (``include_num_input_tokens_seen`` does the same count but calls ``.item()`` on every micro-batch,
    which stalls the GPU pipeline.)
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.tokens_seen = torch.zeros((), dtype=torch.int64, device=self.args.device)

    def training_step(self, model, inputs, *args, **kwargs):
        self.tokens_seen += inputs["attention_mask"].sum()
        return super().training_step(model, inputs, *args, **kwargs)


def all_ranks_sum(value: torch.Tensor) -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return int(value.item())


class MeasureCallback(TrainerCallback):
    """Writes steps.jsonl, prints the log line, and keeps the per-run peaks and epoch times."""

    def __init__(self, trainer: TokenCountingTrainer, steps_path, flops_per_token: float, gpu_name: str | None,
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
        (self.run_dir / "profile.txt").write_text(text)
        self.profiler.export_chrome_trace(str(self.run_dir / "profile_trace.json"))
        print0(f"profile: {head} -> {self.run_dir / 'profile.txt'}")
        self.profiler = None
