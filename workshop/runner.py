"""Running ``workshop train`` in a child process with ``nvidia-smi`` sampled beside it: what ``workshop bench``
and ``workshop scale`` share.

Each attempt is a process of its own, so an out-of-memory error, a crash or a kill by the kernel ends
that attempt only and becomes a row of the table; ``environment_line`` heads every table.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from workshop.stages import REPO


class GpuLogger:
    """``nvidia-smi`` sampled into the run folder, in the format the slurm/ loggers write."""

    QUERY = "timestamp,index,name,memory.used,memory.total,utilization.gpu,power.draw"

    def __init__(self, run_dir: Path, interval_ms: int = 500):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.process = None
        if not shutil.which("nvidia-smi"):
            return
        self.file = open(run_dir / f"gpu_memory-{socket.gethostname()}.csv", "w")
        self.process = subprocess.Popen(["nvidia-smi", f"--query-gpu={self.QUERY}", "--format=csv,nounits",
                                         f"-lms={interval_ms}"], stdout=self.file, stderr=subprocess.DEVNULL)

    def stop(self):
        if self.process is None:
            return
        self.process.terminate()
        self.process.wait()
        self.file.close()


def nvidia_smi_peak_mib(run_dir: Path) -> float | None:
    peaks = []
    for path in run_dir.glob("gpu_memory-*.csv"):
        rows = list(csv.reader(io.StringIO(path.read_text())))
        header = [h.strip() for h in rows[0]] if rows else []
        if "memory.used [MiB]" in header:
            column = header.index("memory.used [MiB]")
            peaks += [float(r[column]) for r in rows[1:] if len(r) > column and r[column].strip()]
    return max(peaks) if peaks else None


def train_in_subprocess(run_dir: Path, flags: list[str], timeout_s: float | None = None,
                        env: dict | None = None) -> tuple[dict, dict]:
    """``workshop train --run_dir run_dir *flags`` in a child process, ``nvidia-smi`` sampled beside it; ``env``:
    variables set for the child on top of this process's environment.

    Returns (row, metrics): the row has status (completed, or how it failed: oom, failed, killed, a
    refusal before training, timeout), error, wall_s and the nvidia-smi peak; metrics is the run's
    metrics.json ({} when it did not finish). A child of its own, so an out-of-memory error, a crash
    or a kill by the kernel ends that run only.
    """
    cmd = [sys.executable, "-m", "workshop", "train", "--run_dir", str(run_dir), *flags]
    print(f"{' '.join(cmd)}", flush=True)
    logger = GpuLogger(run_dir)
    started = time.perf_counter()
    process = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env={**os.environ, **env} if env else None)
    timed_out = threading.Event()

    def stop_at_timeout():
        timed_out.set()
        process.kill()

    timer = threading.Timer(timeout_s, stop_at_timeout) if timeout_s else None
    if timer:
        timer.start()
    lines = []
    try:
        for line in process.stdout:  # shown as it comes: a large model's attempt takes minutes
            print(f"    {line}", end="", flush=True)
            lines.append(line)
        returncode = process.wait()
    finally:
        if timer:
            timer.cancel()
        logger.stop()
    output = "".join(lines)
    run_dir.mkdir(parents=True, exist_ok=True)  # a run refused before training made no folder
    (run_dir / "train.log").write_text(output)
    row = {"wall_s": time.perf_counter() - started,
           "nvidia_smi_peak_gib": (nvidia_smi_peak_mib(run_dir) or 0) / 1024 or None}
    metrics_path = run_dir / "metrics.json"
    if returncode == 0 and metrics_path.exists():
        return {**row, "status": "completed", "error": None}, json.loads(metrics_path.read_text())
    status = json.loads((run_dir / "status.json").read_text()) if (run_dir / "status.json").exists() else {}
    if timed_out.is_set():
        row.update(status="timeout", error=f"stopped after {timeout_s:.0f} s")
    elif returncode < 0:  # SIGKILL from the kernel's out-of-memory killer, most often: host memory ran out
        row.update(status="killed", error=f"killed by signal {-returncode} (host memory exhausted?)")
    elif status.get("status") in ("oom", "failed"):
        row.update(status=status["status"], error=status.get("error"))
    else:  # a pre-flight check refused it, in one line
        row.update(status="refused" if returncode == 2 else "failed", error=error_line(output))
    return row, {}


def error_line(output: str) -> str:
    """The workshop's own ``error: ...`` line, the last one if several; else the last line of output.

    Not simply the last line: libraries may still print on the way out (NCCL's warnings, for one).
    """
    lines = output.strip().splitlines() or [""]
    errors = [line for line in lines if line.startswith("error: ")]
    return (errors or lines)[-1].removeprefix("error: ")


def environment_line() -> str:
    """The GPU, the versions and the date: the first line of every table.

    The GPU by name and the start of its UUID (as ``nvidia-smi -L`` prints it): two cards of one model can
    differ in speed, and a table combined from pieces run on different cards says so.
    """
    import torch
    import transformers

    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "-"
    gpu = "no GPU"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        gpu = f"{props.name} (GPU-{str(props.uuid)[:8]})"
    return (f"{gpu}; torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {ds}; "
            f"{dt.date.today().isoformat()}")
