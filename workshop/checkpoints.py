"""Surviving time limits and preemption: stop cleanly on a signal, checkpoint atomically, resume.

SLURM sends SIGUSR1 before the time limit (``#SBATCH --signal=B:USR1@600``, forwarded to every rank
by slurm/node.sh) and SIGTERM on preemption or ``scancel``. Either one makes the run save a
checkpoint at the next optimizer-step boundary and stop; ``status.json`` then says ``stopped``,
and the next start with the same run folder (the requeued job) resumes from the newest complete
checkpoint by itself. ``--resume_from_checkpoint PATH`` resumes from a checkpoint by hand.

A checkpoint is written under ``checkpoints/.incomplete/`` and renamed to ``checkpoints/checkpoint-N``
once every rank has finished writing it, so a job killed while saving leaves the previous
checkpoint as the newest one. The last ``--save_total_limit`` checkpoints are kept.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import TrainerCallback

from workshop.callbacks import TokenCountingTrainer

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


class WorkshopTrainer(TokenCountingTrainer):
    """The Trainer with atomic checkpoints (write under a temporary name, then rename)."""

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
