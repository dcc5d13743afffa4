"""Time limits, preemption and crashes cost minutes, not the run (CPU, tiny model)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState

from conftest import REPO, read_json
from workshop import train
from workshop.errors import STOPPED
from workshop.trainer import STAGING, STOP_SIGNALS, StopOnSignal, WorkshopTrainer, complete_checkpoints

# 256 samples / micro-batch 8 = 32 steps an epoch, 2 epochs, a loss logged every step.
RUN = ["--preset", "tiny", "--logging_steps", "1", "--answer_eval_samples", "0"]


def _losses(run_dir) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in read_json(run_dir / "log_history.json") if "loss" in e}


def _weights(run_dir) -> dict:
    return load_file(run_dir / "model" / "model.safetensors")


def _command(run_dir, *extra):
    return [sys.executable, "-m", "workshop", "train", *RUN, "--run_dir", str(run_dir), *extra]


def _stop_with_signal_mid_epoch(run_dir, *extra) -> int:
    """Start a run, send SLURM's warning signal once it has trained a few steps; the step it stopped at."""
    process = subprocess.Popen(_command(run_dir, *extra), cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    steps = run_dir / "steps.jsonl"
    deadline = time.time() + 120
    while not (steps.exists() and len(steps.read_text().splitlines()) >= 3):
        assert process.poll() is None and time.time() < deadline, process.stdout.read()[-3000:]
        time.sleep(0.005)
    process.send_signal(signal.SIGUSR1)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == STOPPED, output[-3000:]  # not 0: the run is not finished
    status = read_json(run_dir / "status.json")
    assert status["status"] == "stopped" and status["signal"] == "SIGUSR1", status
    return status["step"]


# ZeRO-1 and ZeRO-2 checkpoint different optimizers where bf16 runs (on a GPU): BF16_Optimizer and the ZeRO one.
@pytest.mark.parametrize("deepspeed", [[], *(["--deepspeed", str(REPO / "ds_configs" / f"{stage}.json")]
                                             for stage in ("zero1", "zero2"))],
                         ids=["no-deepspeed", "zero1", "zero2"])
def test_signal_checkpoint_resume_equals_an_uninterrupted_run(tmp_path, deepspeed):
    reference = tmp_path / "uninterrupted"
    subprocess.run(_command(reference, *deepspeed), cwd=REPO, check=True, capture_output=True)

    interrupted = tmp_path / "interrupted"
    stopped_at = _stop_with_signal_mid_epoch(interrupted, *deepspeed)
    assert 3 <= stopped_at < 32, "stopped mid-epoch"
    assert [p.name for p in complete_checkpoints(interrupted / "checkpoints")] == [f"checkpoint-{stopped_at}"]

    resumed = subprocess.run(_command(interrupted, *deepspeed), cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming from {interrupted / 'checkpoints' / f'checkpoint-{stopped_at}'}" in resumed.stdout
    assert read_json(interrupted / "status.json")["status"] == "completed"

    expected, got = _losses(reference), _losses(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 65))
    for step in range(stopped_at + 1, 65):
        assert got[step] == pytest.approx(expected[step], rel=1e-5), step
    want = _weights(reference)
    for name, tensor in _weights(interrupted).items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6)
    # steps.jsonl shows both parts of the run
    rows = [json.loads(line) for line in (interrupted / "steps.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 1 and rows[-1]["step"] == 64


@pytest.fixture(scope="module")
def model_with_dropout(tmp_path_factory, tokenizer):
    """tiny-gpt2 with GPT-2's own dropout (0.1) on, saved: each step then draws from the random-number generator,
    so a resume that does not restore the generator's state takes other steps. (The tiny models have no dropout.)"""
    from workshop import model as models
    from workshop.config import ModelArguments

    path = tmp_path_factory.mktemp("tiny-gpt2-dropout")
    args = ModelArguments(model_name_or_path="tiny-gpt2")
    config = models.model_config(args, tokenizer)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = 0.1
    torch.manual_seed(0)
    models.build_model(args, tokenizer, config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_resume_with_dropout_continues_exactly_from_the_newest_complete_checkpoint(tmp_path, monkeypatch, capsys,
                                                                                 model_with_dropout):
    """In process: 2 epochs of 8 steps, dropout on; SIGTERM (the signal of preemption and scancel) at step 10 leaves
    checkpoint-8 (the first epoch's) and checkpoint-10, and a newer half-written one is planted in staging.

    The resumed steps 11-16 must take the uninterrupted run's losses. Tolerance 1e-6 relative: in one
    process on one CPU the two runs do the same operations on the same tensors (measured: equal to the last
    bit). Tried: not restoring the random-number state (Trainer._load_rng_state a no-op) moves step 11's loss
    by 1.3e-3 relative (5.4388 against 5.4461); resuming from checkpoint-8 (the oldest, or the first by name)
    shows in the log and in the step the resumed part starts at."""
    run = ["--preset", "tiny", "--model_name_or_path", str(model_with_dropout), "--tokenizer_name_or_path",
           str(model_with_dropout), "--max_train_samples", "64", "--logging_steps", "1", "--eval_strategy", "no",
           "--answer_eval_samples", "0"]
    reference = tmp_path / "uninterrupted"
    assert train.main(run + ["--run_dir", str(reference)]) == 0
    assert read_json(reference / "model" / "config.json")["resid_pdrop"] == 0.1  # dropout really on

    on_step_end = StopOnSignal.on_step_end

    def signal_at_step_10(self, args, state, control, **kwargs):
        if state.global_step == 10:
            signal.raise_signal(signal.SIGTERM)  # through the handler StopOnSignal installed
        return on_step_end(self, args, state, control, **kwargs)

    interrupted = tmp_path / "interrupted"
    monkeypatch.setattr(StopOnSignal, "on_step_end", signal_at_step_10)
    assert train.main(run + ["--run_dir", str(interrupted)]) == STOPPED
    monkeypatch.setattr(StopOnSignal, "on_step_end", on_step_end)
    assert read_json(interrupted / "status.json") == {"status": "stopped", "error": None, "signal": "SIGTERM",
                                                      "step": 10}
    checkpoints = interrupted / "checkpoints"
    assert [p.name for p in complete_checkpoints(checkpoints)] == ["checkpoint-8", "checkpoint-10"]
    shutil.copytree(checkpoints / "checkpoint-10", checkpoints / STAGING / "checkpoint-12")  # killed while saving

    capsys.readouterr()
    assert train.main(run + ["--run_dir", str(interrupted)]) == 0
    assert f"resuming from {checkpoints / 'checkpoint-10'}\n" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in (interrupted / "steps.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 11)) + list(range(11, 17))  # the resumed part starts after step 10
    expected, got = _losses(reference), _losses(interrupted)
    assert sorted(got) == sorted(expected) == list(range(1, 17))
    for step in range(11, 17):
        assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=0), step
    want = _weights(reference)
    for name, tensor in _weights(interrupted).items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-6, atol=0)


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_every_signal_the_job_scripts_send_stops_at_the_next_step_with_a_checkpoint(sig):
    """SIGUSR1 (SLURM's warning before the time limit) and SIGTERM (preemption, scancel); handlers put back after."""
    assert {signal.SIGUSR1, signal.SIGTERM} <= set(STOP_SIGNALS)
    before = signal.getsignal(sig)
    stop = StopOnSignal()
    try:
        control = TrainerControl()
        state = TrainerState(global_step=7)
        assert not stop.on_step_end(None, state, control).should_training_stop  # nothing received yet
        signal.raise_signal(sig)
        control = stop.on_step_end(None, state, control)
        assert (control.should_save, control.should_training_stop) == (True, True)
        assert (stop.received, stop.stopped_at) == (signal.Signals(sig).name, 7)
        control.should_evaluate = True
        control = stop.on_epoch_end(None, state, control)  # the checkpoint is the step's; no epoch-end work
        assert (control.should_evaluate, control.should_save) == (False, False)
    finally:
        stop.restore_handlers()
    assert signal.getsignal(sig) == before


def test_the_newest_complete_checkpoint_is_the_highest_step_not_the_last_name(tmp_path):
    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-100", "checkpoint-2", "runs", "checkpoint-7x",
                 f"{STAGING}/checkpoint-200"):
        (tmp_path / name).mkdir(parents=True)
    (tmp_path / "checkpoint-300").write_text("a file, not a checkpoint folder")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["checkpoint-2", "checkpoint-9", "checkpoint-10",
                                                                "checkpoint-100"]
    assert complete_checkpoints(tmp_path / "missing") == []


def test_kill_while_saving_leaves_the_previous_checkpoint_as_newest(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    original = WorkshopTrainer._save_optimizer_and_scheduler

    def killed_during_second_save(self, output_dir):
        if self.state.global_step == 64:
            raise KeyboardInterrupt("killed while writing checkpoint-64")
        return original(self, output_dir)

    monkeypatch.setattr(WorkshopTrainer, "_save_optimizer_and_scheduler", killed_during_second_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(RUN + ["--run_dir", str(run_dir)])
    assert read_json(run_dir / "status.json")["status"] == "failed"
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-32"]
    assert (run_dir / "checkpoints" / STAGING / "checkpoint-64").is_dir()  # the half-written one

    monkeypatch.setattr(WorkshopTrainer, "_save_optimizer_and_scheduler", original)
    capsys.readouterr()
    assert train.main(RUN + ["--run_dir", str(run_dir)]) == 0
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-32'}" in capsys.readouterr().out
    assert read_json(run_dir / "metrics.json")["total_steps"] == 64
    assert [p.name for p in complete_checkpoints(run_dir / "checkpoints")] == ["checkpoint-32", "checkpoint-64"]


def test_manual_resume_from_a_named_checkpoint(tmp_path, capsys):
    first = tmp_path / "first"
    assert train.main(RUN + ["--run_dir", str(first), "--num_train_epochs", "1"]) == 0
    checkpoint = first / "checkpoints" / "checkpoint-32"
    second = tmp_path / "second"
    capsys.readouterr()
    assert train.main(RUN + ["--run_dir", str(second), "--resume_from_checkpoint", str(checkpoint)]) == 0
    assert f"resuming from {checkpoint}" in capsys.readouterr().out
    assert sorted(_losses(second)) == list(range(1, 65))  # the checkpoint's history, then steps 33-64
    assert json.loads((second / "steps.jsonl").read_text().splitlines()[0])["step"] == 33


# Two processes (gloo): the signal reaches rank 1 only, before step 5 ends; each rank reports what it decided.
TWO_RANKS_SCRIPT = """
import json, signal, sys
import torch.distributed as dist
from transformers import TrainerControl, TrainerState
from workshop.trainer import StopOnSignal

dist.init_process_group("gloo")
rank = dist.get_rank()
stop = StopOnSignal()
decided = []
for step in (4, 5):
    if step == 5 and rank == 1:
        signal.raise_signal(signal.SIGUSR1)
    control = stop.on_step_end(None, TrainerState(global_step=step), TrainerControl())
    decided.append([step, control.should_save, control.should_training_stop])
stop.restore_handlers()
with open(f"{sys.argv[1]}/rank{rank}.json", "w") as f:  # a file each: the ranks' printed lines can interleave
    json.dump({"decided": decided, "received": stop.received, "stopped_at": stop.stopped_at}, f)
dist.barrier()
dist.destroy_process_group()
"""


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    """SLURM may signal one node's ranks a step before another's; a rank that stopped alone would leave the others
    waiting in their next collective until the job is killed, and the checkpoint would never be complete."""
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS_SCRIPT)
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script), str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    ranks = {rank: read_json(tmp_path / f"rank{rank}.json") for rank in (0, 1)}
    for rank in (0, 1):
        assert ranks[rank]["decided"] == [[4, False, False], [5, True, True]], rank
        assert ranks[rank]["stopped_at"] == 5
    assert (ranks[0]["received"], ranks[1]["received"]) == ("signal on another rank", "SIGUSR1")
