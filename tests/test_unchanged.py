"""A tiny run's files and its report row keep their keys and values (timings and the machine aside).

The fixture ``fixtures/tiny_run.json`` was made from a run of the tiny preset by the code before the
package's re-layout (issue 34), so this test says that moving code around changed nothing a user
sees: metrics.json, config.json, the report's row, and the loss of every logged step.

A change that means to add or change a value writes the fixture again and shows the difference:

    WORKSHOP_WRITE_FIXTURE=1 pytest tests/test_unchanged.py && git diff tests/fixtures/tiny_run.json
"""

import json
import math
import os
from pathlib import Path

import pytest
import torch

from conftest import read_json

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_run.json"
MASKED = "<timing or machine>"

# Values that change from run to run or machine to machine: their keys are compared, not their values.
TIMINGS = {"train_runtime", "train_runtime_s", "epoch_times_s", "first_step_s", "time_per_epoch_s", "train_samples_per_second",
           "eval_samples_per_second", "tokens_per_second", "peak_host_rss_gib", "eval_runtime",
           "eval_steps_per_second", "train_steps_per_second", "run_dir", "output_dir", "started_at", "hostname",
           "host_total_memory_gib", "wall_time_s", "time_breakdown_s"}
ENVIRONMENT_VERSIONS = {"python", "torch", "transformers", "accelerate", "deepspeed"}
STEP_KEYS = ("step", "epoch", "loss", "tokens", "samples")
# Losses on another CPU may differ in the last digits (other vector kernels sum in another order).
RELATIVE_TOLERANCE = 1e-4


def masked(values: dict, keys=TIMINGS) -> dict:
    return {k: MASKED if k in keys else v for k, v in values.items()}


def digest(run_dir: Path) -> dict:
    """What the fixture holds of a run folder: its files and its report row, timings masked."""
    from workshop import report

    config = read_json(run_dir / "config.json")
    config["workshop"] = masked(config["workshop"])
    config["training"] = masked(config["training"])
    config["environment"] = masked(config["environment"], TIMINGS | ENVIRONMENT_VERSIONS)
    row = masked(report.summarize(report.load_run(run_dir)), TIMINGS | {"run"})
    steps = [json.loads(line) for line in (run_dir / "steps.jsonl").read_text().splitlines()]
    return {
        "metrics": masked(read_json(run_dir / "metrics.json")),
        "config": config,
        "report": row,
        "log_history": [masked(entry) for entry in read_json(run_dir / "log_history.json")],
        "steps": [{k: s[k] for k in STEP_KEYS} for s in steps],
    }


def differences(expected, actual, where="") -> list[str]:
    """Where ``actual`` differs from ``expected``: keys and their order, values, floats within the tolerance."""
    if isinstance(expected, dict) and isinstance(actual, dict):
        if list(expected) != list(actual):
            return [f"{where or 'top'}: keys {list(expected)} became {list(actual)}"]
        return [d for key in expected for d in differences(expected[key], actual[key], f"{where}.{key}")]
    if isinstance(expected, list) and isinstance(actual, list) and len(expected) == len(actual):
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in differences(e, a, f"{where}[{i}]")]
    if isinstance(expected, float) and isinstance(actual, float):
        return [] if math.isclose(expected, actual, rel_tol=RELATIVE_TOLERANCE) else [f"{where}: {expected} -> {actual}"]
    return [] if expected == actual and type(expected) is type(actual) else [f"{where}: {expected!r} -> {actual!r}"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fixture is a CPU run (fp32, no padding multiple)")
def test_a_tiny_runs_files_and_report_are_as_before(tiny_run):
    found = digest(tiny_run)
    if os.environ.get("WORKSHOP_WRITE_FIXTURE"):
        FIXTURE.write_text(json.dumps(found, indent=1) + "\n")
    assert differences(json.loads(FIXTURE.read_text()), found) == []
