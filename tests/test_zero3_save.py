"""The saved model is the model trained: under ZeRO-3 every rank holds a slice of each weight and the saved model
must hold the whole of it; at every stage it must hold the engine's weights, not the ones training started from."""

import os
import subprocess
import sys

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import REPO
from workshop.trainer import complete_checkpoints


def test_zero3_saves_a_consolidated_model_equal_to_the_engines_weights(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "workshop", "train", "--preset", "tiny", "--run_dir", str(run_dir), "--num_train_epochs", "1",
           "--answer_eval_samples", "0", "--save_strategy", "epoch",  # a checkpoint to compare with
           "--deepspeed", str(REPO / "ds_configs" / "zero3.json")]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    saved = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    # The engine's own partitions, gathered from its checkpoint at the same (last) step.
    last = complete_checkpoints(run_dir / "checkpoints")[-1]
    engine = get_fp32_state_dict_from_zero_checkpoint(str(last))
    assert set(engine) <= set(saved)
    for name, tensor in engine.items():
        assert tensor.numel() > 0 and torch.equal(saved[name], tensor), name


# One process, ZeRO-2 (or another stage) from ds_configs/, one epoch of 8 steps; the model as built is kept.
ZERO12_SCRIPT = """
import sys
import torch
from workshop import model as models, train

build_model = models.build_model

def keep(*args, **kwargs):
    model = build_model(*args, **kwargs)
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()}, sys.argv[2] + "-initial.pt")
    return model

models.build_model = keep
assert train.main(["--preset", "tiny", "--run_dir", sys.argv[2], "--num_train_epochs", "1", "--max_train_samples", "64",
                   "--eval_strategy", "no", "--answer_eval_samples", "0", "--save_strategy", "epoch",
                   "--deepspeed", sys.argv[1]]) == 0
"""


@pytest.mark.parametrize("stage", ["zero2"])  # ZeRO-1 on a CPU in fp32 runs the same optimizer and save
def test_zero2_saves_the_engines_weights_not_the_initial_ones(tmp_path, stage):
    """The saved model against the engine's fp32 master weights in its last checkpoint (what the optimizer stepped
    on), equal to the last bit on a CPU in fp32, and against the weights as built: each one must have moved."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-c", ZERO12_SCRIPT, str(REPO / "ds_configs" / f"{stage}.json"),
                             str(run_dir)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    saved = load_file(run_dir / "model" / "model.safetensors")
    engine = get_fp32_state_dict_from_zero_checkpoint(str(complete_checkpoints(run_dir / "checkpoints")[-1]))
    initial = torch.load(f"{run_dir}-initial.pt")
    assert set(saved) <= set(engine)
    for name, tensor in saved.items():
        assert torch.equal(tensor, engine[name]), name
        assert not torch.equal(tensor, initial[name]), f"{name} is as it was built"
