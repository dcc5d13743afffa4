"""Time limits, preemption and crashes cost minutes, not the run (CPU, tiny model)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, read_json
from workshop import train
from workshop.errors import STOPPED
from workshop.trainer import STAGING, WorkshopTrainer, complete_checkpoints

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
