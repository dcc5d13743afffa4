"""Shared fixtures: the built-in tokenizer and a finished tiny run, made once per session."""

import json
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
