"""Checkpoints, the job's clock and the stop on a signal, in process and in seconds (CPU).

A ``WorkshopTrainer`` over a GPT-2 of one layer and 8 dimensions built from a config trains a handful
of steps on generated token ids: 4 samples a step, so N samples make N / 4 steps an epoch, and the
expected checkpoint names below are written out from that arithmetic. ``SaveOnTimeOrSignal`` and
``JobClock`` run on fake clocks where the test needs exact times, and signals are raised in this
process. The whole-run versions (a real ``workshop train``, resumed) are in tests/test_resume.py;
these are the ones mutmut runs (pyproject.toml ``[tool.mutmut]``), so every trainer is made in its
test, never in a shared fixture (CONTRIBUTING.md: a fixture made once hides later tests from mutmut).
"""

import ctypes
import errno
import json
import logging
import os
import signal
import sys
import time
import types
from pathlib import Path

import psutil
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file
from transformers import (GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainerControl, TrainerState,
                          TrainingArguments, default_data_collator)

from workshop import trainer as trainer_module
from workshop.errors import WorkshopError
from workshop.trainer import JobClock, SaveOnTimeOrSignal, WorkshopTrainer, complete_checkpoints

BATCH = 4  # samples per step
SEQ, VOCAB = 8, 16

# time_breakdown_s's phases in their order, named here rather than read from the code
PHASES = ["launch_and_imports", "preflight", "data", "model_build", "trainer_setup", "training_steps", "evaluation",
          "checkpoints", "final_save", "answer_scoring", "writing_results"]


@pytest.fixture(autouse=True)
def one_thread():
    """Matrices of 8 dimensions gain nothing from more threads, and on a busy machine (a CI runner's two cores)
    waiting for them made this file 4x slower: 13 s instead of 3."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _samples(n: int, seed: int) -> list[dict]:
    """Sample i has SEQ - i % 4 tokens, then padding: 8 + 7 + 6 + 5 = 26 tokens in every 4 samples."""
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=torch.Generator().manual_seed(seed))
    mask = torch.tensor([[int(position < SEQ - i % 4) for position in range(SEQ)] for i in range(n)])
    return [{"input_ids": x * m, "attention_mask": m, "labels": torch.where(m == 1, x, -100)}
            for x, m in zip(ids, mask)]


def _trainer(tmp_path, samples: int, callbacks=(), eval_samples: int = 0, compute_metrics=None, clock=None,
             **training) -> WorkshopTrainer:
    """A WorkshopTrainer writing to tmp_path/checkpoints, ``samples // 4`` steps an epoch, one epoch unless told."""
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, n_positions=SEQ, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0))
    settings = dict(num_train_epochs=1, save_strategy="no", eval_strategy="no", logging_strategy="no",
                    per_device_train_batch_size=BATCH)
    args = TrainingArguments(output_dir=str(tmp_path / "checkpoints"), per_device_eval_batch_size=BATCH, use_cpu=True,
                             report_to="none", disable_tqdm=True, **{**settings, **training})
    # model and args by place, as the stock Trainer takes them
    return WorkshopTrainer(model, args, data_collator=default_data_collator,
                           train_dataset=_samples(samples, seed=1),
                           eval_dataset=_samples(eval_samples, seed=2) if eval_samples else None,
                           compute_metrics=compute_metrics, callbacks=list(callbacks), clock=clock)


def _listing(folder) -> list[str]:
    return sorted(os.listdir(folder))


def _state(checkpoint) -> dict:
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


# --------------------------------------------------------------------------------------------------
# complete_checkpoints


def test_complete_checkpoints_are_sorted_by_step_and_skip_staging_files_and_other_names(tmp_path):
    for name in ("checkpoint-10", "checkpoint-9", "checkpoint-100", "checkpoint-2", "runs", "checkpoint-7x",
                 "xcheckpoint-5", "checkpoint-", ".incomplete/checkpoint-200"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoint-300").write_text("a file, not a checkpoint folder")
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-9",
                                              tmp_path / "checkpoint-10", tmp_path / "checkpoint-100"]
    assert complete_checkpoints(str(tmp_path)) == complete_checkpoints(tmp_path)  # a path as text, as train.py has it


def test_complete_checkpoints_of_a_missing_folder_or_a_file_is_none(tmp_path):
    assert complete_checkpoints(tmp_path / "missing") == []
    (tmp_path / "checkpoints").write_text("not a folder")
    assert complete_checkpoints(tmp_path / "checkpoints") == []


# --------------------------------------------------------------------------------------------------
# WorkshopTrainer: checkpoints written in staging, renamed, rotated; the best one kept


def test_each_checkpoint_is_written_in_staging_and_renamed_to_checkpoint_N_once_complete(tmp_path):
    """16 samples: 4 steps; a checkpoint every 2 steps: checkpoint-2 and checkpoint-4, no limit on how many."""
    trainer = _trainer(tmp_path, samples=16, save_strategy="steps", save_steps=2)
    root = tmp_path / "checkpoints"
    written = []  # where the optimizer went, and whether the final name existed while it was written
    save_optimizer = trainer._save_optimizer_and_scheduler

    def spy(output_dir):
        written.append((output_dir, (root / Path(output_dir).name).exists()))
        return save_optimizer(output_dir)

    trainer._save_optimizer_and_scheduler = spy
    trainer.train()
    assert written == [(str(root / ".incomplete" / "checkpoint-2"), False),
                       (str(root / ".incomplete" / "checkpoint-4"), False)]
    assert _listing(root) == [".incomplete", "checkpoint-2", "checkpoint-4"]
    assert _listing(root / ".incomplete") == []
    for step in (2, 4):
        checkpoint = root / f"checkpoint-{step}"
        assert {"model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(_listing(checkpoint))
        assert _state(checkpoint)["global_step"] == step
    assert trainer.state.best_model_checkpoint is None  # no --load_best_model_at_end


def test_checkpoints_are_timed_as_a_phase_inside_the_training_and_the_clock_goes_back(tmp_path):
    clock = JobClock()
    trainer = _trainer(tmp_path, samples=8, save_strategy="steps", save_steps=1, clock=clock)
    assert trainer.clock is clock  # the job's own, not one of the trainer's
    clock.switch("training_steps")
    trainer.train()
    assert clock.current == "training_steps"
    assert clock.seconds["checkpoints"] > 0
    assert _listing(tmp_path / "checkpoints") == [".incomplete", "checkpoint-1", "checkpoint-2"]


def test_evaluation_is_timed_as_a_phase_and_takes_the_stock_trainers_arguments(tmp_path):
    clock = JobClock()
    trainer = _trainer(tmp_path, samples=4, eval_samples=4, clock=clock)
    clock.switch("training_steps")
    assert "test_loss" in trainer.evaluate(eval_dataset=_samples(4, seed=3), metric_key_prefix="test")
    assert "held_out_loss" in trainer.evaluate(None, None, "held_out")  # eval_dataset, ignore_keys, metric_key_prefix
    assert clock.current == "training_steps"
    assert clock.seconds["evaluation"] > 0


def test_the_trainer_counts_the_tokens_it_trained_on_not_the_padding(tmp_path):
    trainer = _trainer(tmp_path, samples=16)  # 4 steps of 4 samples
    trainer.train()
    assert trainer.tokens_seen.item() == 4 * (8 + 7 + 6 + 5)
    assert trainer.tokens_seen.dtype == torch.int64  # a float32 count is exact only up to 2**24 = 16.8M tokens


def test_counting_tokens_leaves_the_training_as_the_stock_trainers(tmp_path):
    """Micro-batches of 2 samples, 2 a step: their targets differ in number (7 + 6, 5 + 4), so the loss is scaled by
    the step's count that the Trainer hands to training_step; lose it and the weights move differently."""
    workshop = _trainer(tmp_path / "workshop", samples=8, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    workshop.train()
    stock = _trainer(tmp_path / "stock", samples=8, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    stock.training_step = types.MethodType(Trainer.training_step, stock)
    stock.train()
    assert workshop.state.global_step == stock.state.global_step == 2
    for (name, mine), theirs in zip(workshop.model.state_dict().items(), stock.model.state_dict().values()):
        assert torch.equal(mine, theirs), name


def test_rotation_keeps_the_newest_save_total_limit_by_step_number_not_by_name(tmp_path):
    """40 samples: 10 steps, a checkpoint each, 2 kept: checkpoint-9 and checkpoint-10 (by name, "checkpoint-10"
    sorts before "checkpoint-8", and the newest would be the one deleted)."""
    trainer = _trainer(tmp_path, samples=40, save_strategy="steps", save_steps=1, save_total_limit=2)
    trainer.train()
    assert _listing(tmp_path / "checkpoints") == [".incomplete", "checkpoint-10", "checkpoint-9"]


def test_a_checkpoint_the_file_system_will_not_delete_does_not_stop_the_training(tmp_path, monkeypatch):
    """On NFS a folder holding a file still open elsewhere cannot be removed ("Directory not empty": the .nfs files
    stay); the rotation leaves it and trains on. Here the removal of checkpoint-1's folder fails: 16 samples, 4
    steps, a checkpoint each, 2 kept: checkpoint-2 goes, checkpoint-1 stays (emptied), with checkpoint-3 and -4."""
    rmdir = os.rmdir

    def refuse_checkpoint_1(path, *args, **kwargs):
        if os.path.basename(os.fsdecode(path)) == "checkpoint-1":
            raise OSError(errno.ENOTEMPTY, "Directory not empty", os.fsdecode(path))
        return rmdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", refuse_checkpoint_1)
    trainer = _trainer(tmp_path, samples=16, save_strategy="steps", save_steps=1, save_total_limit=2)
    trainer.train()
    assert trainer.state.global_step == 4
    assert _listing(tmp_path / "checkpoints") == [".incomplete", "checkpoint-1", "checkpoint-3", "checkpoint-4"]


class ScriptedScores:
    """compute_metrics giving these scores, one an evaluation, whatever the model predicts."""

    def __init__(self, *scores):
        self.scores = list(scores)

    def __call__(self, prediction):
        return {"score": self.scores.pop(0)}


def test_the_best_checkpoint_survives_the_rotation_at_its_final_name_and_is_loaded_at_the_end(tmp_path):
    """24 samples: 6 steps, an evaluation and a checkpoint each, 2 kept; scores (greater is better) make step 2's the
    best: checkpoint-2 is kept beside the newest two, checkpoint-5 and checkpoint-6. The Trainer finds the best where
    it was written, in staging: the workshop must point at its final name, also in its own trainer_state.json, where
    a resumed run reads it."""
    trainer = _trainer(tmp_path, samples=24, eval_samples=4, save_strategy="steps", save_steps=1,
                       eval_strategy="steps", eval_steps=1, save_total_limit=2, load_best_model_at_end=True,
                       metric_for_best_model="score", greater_is_better=True,
                       compute_metrics=ScriptedScores(1.0, 3.0, 2.0, 0.5, 0.4, 0.3))
    trainer.train()
    root = tmp_path / "checkpoints"
    best = str(root / "checkpoint-2")
    assert _listing(root) == [".incomplete", "checkpoint-2", "checkpoint-5", "checkpoint-6"]
    assert trainer.state.best_model_checkpoint == best
    for step in (2, 5, 6):
        assert _state(root / f"checkpoint-{step}")["best_model_checkpoint"] == best, step
    want = load_file(root / "checkpoint-2" / "model.safetensors")  # the best model loaded at the end
    for name, tensor in trainer.model.state_dict().items():
        if name in want:
            assert torch.equal(tensor, want[name]), name


def test_the_best_checkpoint_alone_is_left_with_a_limit_of_one(tmp_path):
    """With --save_total_limit 1 the Trainer deletes, at the end, every checkpoint but the best, in the final folder
    (not in staging): 16 samples, 4 steps, step 1's score the best."""
    trainer = _trainer(tmp_path, samples=16, eval_samples=4, save_strategy="steps", save_steps=1,
                       eval_strategy="steps", eval_steps=1, save_total_limit=1, load_best_model_at_end=True,
                       metric_for_best_model="score", greater_is_better=True,
                       compute_metrics=ScriptedScores(5.0, 1.0, 2.0, 3.0))
    trainer.train()
    root = tmp_path / "checkpoints"
    assert _listing(root) == [".incomplete", "checkpoint-1"]
    assert trainer.state.best_model_checkpoint == str(root / "checkpoint-1")


def test_saving_again_at_the_same_step_replaces_the_checkpoint(tmp_path):
    """8 samples: 2 steps, a checkpoint at the end (step 2); saved again at step 2, the old folder goes whole."""
    trainer = _trainer(tmp_path, samples=8, save_strategy="steps", save_steps=2)
    trainer.train()
    root = tmp_path / "checkpoints"
    (root / "checkpoint-2" / "left-from-the-first-save").write_text("")
    trainer._save_checkpoint(trainer.model, None)
    assert _listing(root) == [".incomplete", "checkpoint-2"]
    assert "left-from-the-first-save" not in _listing(root / "checkpoint-2")
    assert "model.safetensors" in _listing(root / "checkpoint-2")
    assert _listing(root / ".incomplete") == []


# --------------------------------------------------------------------------------------------------
# JobClock


class FakeTime:
    """time.time and time.monotonic, each where the test sets it."""

    def __init__(self, wall: float, monotonic: float):
        self.wall, self.mono = wall, monotonic

    def time(self):
        return self.wall

    def monotonic(self):
        return self.mono


@pytest.fixture
def fake_time(monkeypatch):
    fake = FakeTime(wall=1010.0, monotonic=50.0)
    monkeypatch.setattr(trainer_module, "time", fake)
    monkeypatch.setenv("WORKSHOP_JOB_START", "1000.0")
    return fake


def test_the_job_clocks_phases_add_up_to_the_elapsed_time_and_within_goes_back_to_the_outer_phase(fake_time):
    clock = JobClock()  # 10 s after the job's start, at the job's first line
    assert clock.current == "preflight"
    fake_time.mono = 53.0
    clock.switch("training_steps")  # preflight 3 s
    fake_time.mono = 60.0
    with clock.within("checkpoints"):  # 7 s of training before it
        fake_time.mono = 62.5
        assert clock.so_far("checkpoints") == 2.5 and clock.so_far("training_steps") == 7.0
        assert clock.elapsed() == 10 + 3 + 7 + 2.5
    assert clock.current == "training_steps"
    fake_time.mono = 64.0
    with pytest.raises(KeyboardInterrupt):  # a phase that raises still ends, and the outer one comes back
        with clock.within("evaluation"):
            fake_time.mono = 65.0
            raise KeyboardInterrupt
    assert clock.current == "training_steps"
    fake_time.mono = 66.0
    assert clock.elapsed() == 16.0 + 10  # 50 -> 66 on the monotonic clock, after 10 s before it
    breakdown = clock.breakdown()
    assert list(breakdown) == PHASES
    assert breakdown == {**dict.fromkeys(PHASES, 0.0), "launch_and_imports": 10.0, "preflight": 3.0,
                         "training_steps": 7.0 + 1.5 + 1.0, "checkpoints": 2.5, "evaluation": 1.0}
    assert clock.current == "training_steps" and clock.so_far("training_steps") == 9.5  # closed at 66, running on
    fake_time.mono = 67.0
    assert clock.so_far("training_steps") == 10.5 and clock.so_far("checkpoints") == 2.5


def test_the_job_clock_starts_at_workshop_job_start_and_never_before_zero(fake_time, monkeypatch):
    assert JobClock().seconds["launch_and_imports"] == 10.0
    monkeypatch.setenv("WORKSHOP_JOB_START", "1012.5")  # a start after now: another machine's clock
    assert JobClock().seconds["launch_and_imports"] == 0.0


def test_a_workshop_job_start_that_is_not_a_number_stops_with_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("WORKSHOP_JOB_START", "yesterday")
    with pytest.raises(WorkshopError) as error:
        JobClock()
    assert str(error.value) == ("WORKSHOP_JOB_START=yesterday is not a time in seconds since the epoch: unset it (the "
                                "job scripts set it themselves)")
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_without_workshop_job_start_the_clock_starts_at_the_process_start(monkeypatch):
    """psutil's start time adds the kernel's ticks to the boot time rounded to the second: up to 1 s early."""
    monkeypatch.delenv("WORKSHOP_JOB_START", raising=False)
    started = psutil.Process().create_time()
    assert started - 0.02 <= trainer_module._process_start() <= started + 1.02
    monkeypatch.setenv("WORKSHOP_JOB_START", "")  # set but empty: the same
    clock = JobClock()
    assert clock.seconds["launch_and_imports"] == pytest.approx(clock.elapsed(), abs=0.01)
    assert (clock.seconds["launch_and_imports"] - 1.02 <= time.time() - started
            <= clock.seconds["launch_and_imports"] + 1.02)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc and prctl are Linux's")
def test_the_process_start_is_read_from_proc_even_under_a_name_with_a_parenthesis(monkeypatch):
    """/proc/self/stat gives the name in parentheses, then the fields: a name may hold ") " itself, so the fields
    start after the last ")". Read from /proc, not from psutil (up to a second early), which is made to fail here."""
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_NAME = 15
    name = Path("/proc/self/comm").read_text().rstrip("\n").encode()
    monkeypatch.setattr(trainer_module, "psutil", None)
    started = psutil.Process().create_time()
    assert libc.prctl(PR_SET_NAME, b"a) 1 2 3 4 5 6", 0, 0, 0) == 0
    try:
        assert Path("/proc/self/comm").read_text() == "a) 1 2 3 4 5 6\n"
        assert started - 0.02 <= trainer_module._process_start() <= started + 1.02
    finally:
        libc.prctl(PR_SET_NAME, name, 0, 0, 0)


# --------------------------------------------------------------------------------------------------
# SaveOnTimeOrSignal


class FakeClock:
    """The job's clock, where SaveOnTimeOrSignal reads it: elapsed seconds as the test sets them."""

    def __init__(self):
        self.elapsed_s = 0.0

    def elapsed(self):
        return self.elapsed_s


@pytest.fixture
def saver_factory():
    """SaveOnTimeOrSignal objects whose signal handlers are put back after the test, whatever happens."""
    made = []

    def make(save_every_s, clock):
        made.append(SaveOnTimeOrSignal(save_every_s, clock))
        return made[-1]

    yield make
    for saver in reversed(made):
        saver.restore_handlers()


def _step(saver, step):
    return saver.on_step_end(None, TrainerState(global_step=step), TrainerControl())


def test_a_checkpoint_is_due_save_every_s_after_training_began_then_after_the_last_one_ended(saver_factory):
    clock = FakeClock()
    every_minute = saver_factory(60, clock)
    clock.elapsed_s = 5.0  # the job's start-up before training
    every_minute.on_train_begin(None, TrainerState(), TrainerControl())
    decided = []
    for elapsed, event in [(64.9, "step"), (65.0, "step"), (70.0, "saved"), (129.9, "step"), (130.0, "step")]:
        clock.elapsed_s = elapsed
        if event == "saved":  # that checkpoint took 5 s; the next is due a minute after it ended
            every_minute.on_save(None, TrainerState(), TrainerControl())
            continue
        control = _step(every_minute, int(elapsed))
        decided.append((elapsed, control.should_save, control.should_training_stop))
    assert decided == [(64.9, False, False), (65.0, True, False), (129.9, False, False), (130.0, True, False)]
    assert (every_minute.stopped_at, every_minute.received) == (None, None)


def test_with_an_interval_of_zero_no_checkpoint_is_ever_due_by_the_clock(saver_factory):
    clock = FakeClock()
    never = saver_factory(0, clock)
    never.on_train_begin(None, TrainerState(), TrainerControl())
    for elapsed in (0.0, 1.0, 1e9):
        clock.elapsed_s = elapsed
        control = _step(never, 1)
        assert (control.should_save, control.should_training_stop) == (False, False), elapsed


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_stop_signal_saves_and_stops_at_the_next_step_then_skips_the_epoch_end_save_and_evaluation(
        sig, saver_factory, caplog):
    stop = saver_factory(60 * 30, FakeClock())
    stop.on_train_begin(None, TrainerState(), TrainerControl())
    control = _step(stop, 6)
    assert (control.should_save, control.should_training_stop) == (False, False)  # nothing received yet
    ends_epoch = TrainerControl(should_save=True, should_evaluate=True)
    assert stop.on_epoch_end(None, TrainerState(global_step=6), ends_epoch) is ends_epoch
    assert (ends_epoch.should_save, ends_epoch.should_evaluate) == (True, True)  # no stop: the epoch's own work stays
    with caplog.at_level(logging.WARNING, logger="workshop.trainer"):
        signal.raise_signal(sig)
    name = signal.Signals(sig).name
    assert [r.getMessage() for r in caplog.records] == [
        f"received {name}: saving a checkpoint at the next step, then stopping"]
    control = _step(stop, 7)
    assert (control.should_save, control.should_training_stop) == (True, True)
    assert (stop.received, stop.stopped_at) == (name, 7)
    control.should_evaluate = True
    assert stop.on_epoch_end(None, TrainerState(global_step=7), control) is control
    assert (control.should_evaluate, control.should_save) == (False, False)  # the step's checkpoint is the one


def test_the_handlers_there_before_come_back_after():
    def earlier_handler(signum, frame):
        pass

    before = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, signal.SIG_IGN),  # as the job scripts start training
              signal.SIGTERM: signal.signal(signal.SIGTERM, earlier_handler)}
    try:
        stop = SaveOnTimeOrSignal(0, FakeClock())
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            assert signal.getsignal(sig) == stop._handle, sig
        stop.restore_handlers()
        assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN
        assert signal.getsignal(signal.SIGTERM) == earlier_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_every_rank_saves_and_stops_when_another_rank_saw_a_signal_or_its_clock(saver_factory, monkeypatch):
    """Across ranks the decision is a sum of what each saw (a CPU all-reduce); here the other ranks' share is added
    by a stand-in for the all-reduce. The real two-process run: tests/test_resume.py."""
    clock = FakeClock()
    stop = saver_factory(60, clock)
    stop.group = "the ranks' gloo group"
    others = []  # what the other ranks add: (checkpoint due, signal seen)

    def all_reduce(flags, group):
        assert group == "the ranks' gloo group"
        flags += torch.tensor(others.pop(0))

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    stop.on_train_begin(None, TrainerState(), TrainerControl())
    others.append([0, 0])
    control = _step(stop, 1)
    assert (control.should_save, control.should_training_stop, stop.received) == (False, False, None)
    others.append([1, 0])  # another rank's clock says a checkpoint is due
    control = _step(stop, 2)
    assert (control.should_save, control.should_training_stop, stop.received) == (True, False, None)
    others.append([0, 1])  # another rank received the signal
    control = _step(stop, 3)
    assert (control.should_save, control.should_training_stop) == (True, True)
    assert (stop.received, stop.stopped_at) == ("signal on another rank", 3)


def test_a_group_for_the_decision_is_made_only_with_more_than_one_rank(saver_factory, monkeypatch):
    made = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "new_group", lambda **kwargs: made.append(kwargs) or "group")
    for world_size, group in ((1, None), (2, "group")):
        monkeypatch.setattr(dist, "get_world_size", lambda: world_size)
        assert saver_factory(60, FakeClock()).group == group, world_size
    assert made == [{"backend": "gloo"}]  # on the CPU: the decision never waits for the GPU


class AdvanceClock(TrainerCallback):
    """Moves the fake clock on by ``step_s`` at each step, and raises ``sig`` in this process at step ``signal_at``,
    before SaveOnTimeOrSignal sees the step's end; counts the checkpoints and evaluations."""

    def __init__(self, clock, step_s=0.0, sig=None, signal_at=None):
        self.clock, self.step_s, self.sig, self.signal_at = clock, step_s, sig, signal_at
        self.saved_at, self.evaluated_at = [], []

    def on_step_begin(self, args, state, control, **kwargs):
        self.clock.elapsed_s += self.step_s

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.signal_at:
            signal.raise_signal(self.sig)

    def on_save(self, args, state, control, **kwargs):
        self.saved_at.append(state.global_step)

    def on_evaluate(self, args, state, control, **kwargs):
        self.evaluated_at.append(state.global_step)


def test_in_training_a_checkpoint_is_saved_each_time_the_interval_passes(tmp_path, saver_factory):
    """4 s a step, one every 10 s: due at step 3 (12 s), then 10 s after that save, at step 6 (24 s); 32 samples are 8
    steps, so checkpoint-3 and checkpoint-6, no other."""
    clock = FakeClock()
    steps = AdvanceClock(clock, step_s=4.0)
    trainer = _trainer(tmp_path, samples=32, callbacks=[steps, saver_factory(10.0, clock)])
    trainer.train()
    assert steps.saved_at == [3, 6]
    assert _listing(tmp_path / "checkpoints") == [".incomplete", "checkpoint-3", "checkpoint-6"]


def test_in_training_a_signal_saves_once_and_stops_without_the_epoch_end_save_or_evaluation(tmp_path,
                                                                                             saver_factory):
    """2 epochs of 4 steps (16 samples), saved and evaluated at each epoch's end; SIGUSR1 at step 2: one checkpoint,
    checkpoint-2, training stops there, and the epoch's end (reached early) neither evaluates nor saves again."""
    clock = FakeClock()
    steps = AdvanceClock(clock, sig=signal.SIGUSR1, signal_at=2)
    stop = saver_factory(60 * 30, clock)
    trainer = _trainer(tmp_path, samples=16, eval_samples=4, num_train_epochs=2, save_strategy="epoch",
                       eval_strategy="epoch", callbacks=[steps, stop])
    trainer.train()
    assert (trainer.state.global_step, stop.stopped_at, stop.received) == (2, 2, "SIGUSR1")
    assert (steps.saved_at, steps.evaluated_at) == ([2], [])
    assert _listing(tmp_path / "checkpoints") == [".incomplete", "checkpoint-2"]
