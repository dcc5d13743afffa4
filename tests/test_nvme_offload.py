"""ZeRO-Infinity (ds_configs/zero3_nvme.json) really trains: parameters and optimizer states on disk,
read back through DeepSpeed's swap buffers step after step."""

import json
import os
import subprocess
import sys

import pytest
from transformers import GPT2Config

from conftest import REPO


def test_zero3_nvme_trains_past_the_first_step_with_buffers_sized_to_the_model(tmp_path):
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible():
        if os.environ.get("WORKSHOP_REQUIRE_LIBAIO") == "1":  # set by .ci/run, which installs libaio
            pytest.fail("WORKSHOP_REQUIRE_LIBAIO=1 but DeepSpeed's async_io op cannot be built: install libaio-dev")
        pytest.skip("no libaio here: apt-get install libaio-dev to run it")
    # Large enough that its matrices are swapped (over the Trainer's persistence threshold of 10 x hidden).
    GPT2Config(n_embd=256, n_layer=2, n_head=4, n_positions=128).save_pretrained(tmp_path / "model")
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "workshop", "train", "--run_dir", str(run_dir),
           "--model_name_or_path", str(tmp_path / "model"), "--from_config", "--tokenizer_name_or_path", "builtin",
           "--dataset_name", "builtin_text", "--max_seq_length", "128", "--per_device_train_batch_size", "1",
           "--max_steps", "3", "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no",
           "--no_save_model", "--answer_eval_samples", "0",
           "--deepspeed", str(REPO / "ds_configs" / "zero3_nvme.json"), "--nvme_path", str(nvme)]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    # With DeepSpeed's default reuse distance, step 2 ran out of swap buffers ("Not enough buffers 0 for swapping 1").
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3]
    config = json.loads((run_dir / "config.json").read_text())
    offload = config["deepspeed_config"]["zero_optimization"]["offload_param"]
    assert offload["buffer_size"] == config["model_info"]["largest_layer_params"] == 50257 * 256
