"""Shared fixtures: the built-in tokenizer and a finished tiny run, made once per session."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from workshop import builtin_data, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tokenizer():
    return builtin_data.build_tokenizer()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A real `workshop train --preset tiny` run folder (CPU, a few seconds)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert train.main(["--preset", "tiny", "--run_dir", str(run_dir), "--stage", "baseline"]) == 0
    return run_dir


def read_json(path):
    return json.loads(Path(path).read_text())


# DeepSpeed in one process on the CPU: its process group (and HfDeepSpeedConfig) are process-wide, so each
# such test runs its script in a Python process of its own, after this set-up.
DEEPSPEED_ONE_PROCESS = """
import os, socket
import deepspeed
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
deepspeed.init_distributed(dist_backend="gloo")
"""


def run_with_deepspeed(script: str) -> str:
    """``script`` after DeepSpeed's one-process set-up, in a process of its own; its standard output."""
    result = subprocess.run([sys.executable, "-c", DEEPSPEED_ONE_PROCESS + script], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
