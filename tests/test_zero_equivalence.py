"""ZeRO stages and offload change where memory goes, not what the model learns.

Two CPU processes (gloo), fp32, the same saved tiny model and seed, the same global batch: the
per-step training losses of ZeRO 0-3 and of CPU/NVMe offload must equal plain DDP's.

Tolerance, 1e-4 relative: in fp32 the only differences are the order of floating-point sums
(DDP all-reduces gradient buckets, ZeRO reduce-scatters partitions) and DeepSpeed's CPU Adam
fusing the update differently; over these steps that moves losses by about 1e-6. A real bug (a
lost gradient partition, a wrong global batch, padding in the loss) moves them by more than 1e-2.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from workshop import model as models
from workshop.config import ModelArguments

RELATIVE_TOLERANCE = 1e-4
STAGES = ["zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload", "zero3_offload_all"]


def _async_io_usable() -> bool:
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        return AsyncIOBuilder().is_compatible(verbose=False)
    except Exception:
        return False


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tokenizer):
    """Weights saved once and loaded by every run (ZeRO-3 would otherwise initialise them partitioned)."""
    path = tmp_path_factory.mktemp("tiny-model")
    args = ModelArguments(model_name_or_path="tiny-gpt2")
    models.build_model(args, tokenizer, models.model_config(args, tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def train_losses(run_dir, saved_model, *extra) -> list[float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workshop", "train", "--preset", "tiny", "--model_name_or_path", str(saved_model),
           "--tokenizer_name_or_path", str(saved_model), "--run_dir", str(run_dir),
           "--num_train_epochs", "1", "--max_train_samples", "96", "--logging_steps", "1",
           "--eval_strategy", "no", "--save_strategy", "no", "--answer_eval_samples", "0",
           # DeepSpeed's CPU Adam (offload) decays every parameter, the Trainer's AdamW spares biases
           # and LayerNorm weights (ds_configs/README.md): without decay both compute the same update.
           "--weight_decay", "0", *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    history = json.loads((run_dir / "log_history.json").read_text())
    return [e["loss"] for e in history if "loss" in e]


@pytest.fixture(scope="module")
def ddp_losses(tmp_path_factory, saved_model):
    return train_losses(tmp_path_factory.mktemp("ddp") / "run", saved_model)


def assert_same_losses(losses, reference):
    assert len(losses) == len(reference) == 6
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    assert worst < RELATIVE_TOLERANCE, (losses, reference)


@pytest.mark.parametrize("stage", STAGES)
def test_zero_stage_matches_ddp(stage, tmp_path, saved_model, ddp_losses):
    losses = train_losses(tmp_path / "run", saved_model, "--deepspeed", str(REPO / "ds_configs" / f"{stage}.json"))
    assert_same_losses(losses, ddp_losses)


@pytest.mark.skipif(not _async_io_usable(), reason="DeepSpeed's async_io op cannot build here (apt-get install libaio-dev)")
def test_nvme_offload_matches_ddp(tmp_path, saved_model, ddp_losses):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    losses = train_losses(tmp_path / "run", saved_model, "--deepspeed", str(REPO / "ds_configs" / "zero3_nvme.json"),
                          "--nvme_path", str(nvme))
    assert_same_losses(losses, ddp_losses)
