"""Under ZeRO-3 every rank holds a slice of each weight; the saved model must hold the whole of it."""

import os
import subprocess
import sys

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoModelForCausalLM

from conftest import REPO
from workshop.trainer import complete_checkpoints


def test_zero3_saves_a_consolidated_model_equal_to_the_engines_weights(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workshop", "train", "--preset", "tiny", "--run_dir", str(run_dir), "--num_train_epochs", "1",
           "--answer_eval_samples", "0", "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    # The engine's own partitions, gathered from its checkpoint at the same (last) step.
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    engine = get_fp32_state_dict_from_zero_checkpoint(str(last))
    assert set(engine) <= set(saved)
    for name, tensor in engine.items():
        assert tensor.numel() > 0 and torch.equal(saved[name], tensor), name
