"""One entry point whichever way it is started: python, torchrun (other tests), the deepspeed launcher."""

import json
import os
import subprocess
import sys

from conftest import REPO

TINY = ["--preset", "tiny", "--num_train_epochs", "1", "--answer_eval_samples", "0", "--save_strategy", "no",
        "--deepspeed", str(REPO / "ds_configs" / "zero2.json")]


def _run(cmd, run_dir):
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    return json.loads((run_dir / "config.json").read_text()), json.loads((run_dir / "metrics.json").read_text())


def test_plain_python_with_deepspeed_never_falls_into_mpi_discovery(tmp_path):
    config, metrics = _run([sys.executable, "-m", "workshop", "train", *TINY, "--run_dir", str(tmp_path / "run")],
                           tmp_path / "run")
    assert config["workshop"]["launch"] == "single process" and metrics["world_size"] == 1


def test_the_deepspeed_launcher(tmp_path):
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", "29533",
           "--module", "workshop", "train", *TINY, "--run_dir", str(tmp_path / "run")]
    config, metrics = _run(cmd, tmp_path / "run")
    assert config["workshop"]["launch"] == "launcher" and metrics["world_size"] == 2
