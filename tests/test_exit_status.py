"""The exit status says what status.json says: completed is 0, whatever the interpreter's teardown does.

A finished two-process run used to die now and then at exit ("terminate called without an active
exception", SIGABRT, in 1 of 23 runs): gloo's threads outlived the interpreter's teardown, and a
completed run read as failed. The process entry point (``workshop.cli.entry``) now ends every
process with ``os._exit`` once results are written and the process group is left.

    pytest tests/test_exit_status.py                                # about a minute on 2 cores
    WORKSHOP_EXIT_RUNS=40 pytest -m slow tests/test_exit_status.py  # + 40 real trainings (release)

Stopped runs (a signal: exit status 75) are checked in test_resume.py, refused ones (2) in
test_bad_input.py, a job's END line and state in test_slurm_jobs.py.
"""

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import REPO, read_json
from workshop import cli
from workshop.trainer import WorkshopTrainer

# One rank of a two-process run, cut down to what its end does: a gloo process group on a TCP store
# and the side group the stop-signal callback makes (both kept referenced to the end, as the Trainer
# keeps its groups), a few all-reduces, status.json on rank 0, then the exit path of `workshop train`:
# leave the group (distributed.shutdown; "stay" skips it), end the process (cli.end_process).
# It imports torch, not transformers: ~1.2 s of CPU a process instead of ~10 for a real run.
RANK_PROGRAM = r"""
import sys, time
from datetime import timedelta
from pathlib import Path
import torch
import torch.distributed as dist
from workshop import distributed, files
from workshop.cli import end_process

folder, rank, leave = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "leave"
port_file, wait = folder / "port", timedelta(seconds=60)
if rank == 0:
    store = dist.TCPStore("127.0.0.1", 0, 2, is_master=True, timeout=wait, wait_for_workers=False)
    files.write_text(port_file, str(store.port))
else:
    deadline = time.time() + 60
    while not port_file.exists() and time.time() < deadline:
        time.sleep(0.01)
    store = dist.TCPStore("127.0.0.1", int(port_file.read_text()), 2, is_master=False, timeout=wait)
dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
side = dist.new_group(backend="gloo")
total = torch.ones(4096)
for step in range(8):
    dist.all_reduce(total)
    dist.all_reduce(total, group=side)
if rank == 0:
    files.write_json(folder / "status.json", {"status": "completed", "error": None})
    print(f"completed: {total[0].item():.0f}")  # not flushed here: the exit path must flush it
if leave:
    distributed.shutdown()
end_process(0)
"""

# 40 launches: an exit path that failed 1 launch in 20 would pass all 40 with probability
# 0.95^40 = 13%, so this catches it 87% of the time (1 in 10: 98.5%). Half the launches end as a
# completed `workshop train` does (leave the group, then end_process), half as a failed one does
# (end_process without leaving), where the interpreter's own teardown aborts often: 8 of 40 such
# launches once here, 0 of 20 another time, 0 of 40 with end_process. What this program cannot show
# is the rare abort after the group is left (1 real run in 23 in the issue, 1 in 40 here, none in
# 100 launches of this program): test_the_exit_path_skips_a_teardown_that_aborts checks end_process
# against a teardown that always aborts, and WORKSHOP_EXIT_RUNS repeats the real training.
# 80 processes of ~1.2 s CPU each: about a minute on 2 cores, four launches at a time.
LAUNCHES = 40
AT_ONCE = 4


def _launch(folder, leave: bool = True) -> str | None:
    """Both ranks of one run; None if it ended as it should, else what went wrong."""
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "PYTHONUNBUFFERED"):  # unbuffered output would hide an exit that drops what is held back
        env.pop(name, None)
    procs = []
    for rank in (0, 1):
        with open(folder / f"out-{rank}", "w") as out, open(folder / f"err-{rank}", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", RANK_PROGRAM, str(folder), str(rank),
                                           "leave" if leave else "stay"],
                                          cwd=folder, env=env, stdout=out, stderr=err))
    try:
        codes = [p.wait(timeout=180) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return "still running after 180 s"
    errors = [(folder / f"err-{rank}").read_text() for rank in (0, 1)]
    if codes != [0, 0]:
        return f"exit statuses {codes}: {' | '.join(e.strip()[-300:] for e in errors)}"
    if read_json(folder / "status.json")["status"] != "completed":
        return "status.json does not say completed"
    if (folder / "out-0").read_text() != "completed: 65536\n":  # 1 doubled by 16 all-reduces of 2 ranks
        return f"rank 0's output lost or wrong: {(folder / 'out-0').read_text()!r}"
    if any("terminate called" in e for e in errors):
        return "exit status 0 but: " + " | ".join(e.strip()[-300:] for e in errors)
    return None


def test_many_short_two_process_runs_all_exit_0_and_say_completed(tmp_path):
    started = time.perf_counter()
    with ThreadPoolExecutor(AT_ONCE) as pool:
        results = list(pool.map(_launch, [tmp_path / f"run{i}" for i in range(LAUNCHES)],
                                [i % 2 == 0 for i in range(LAUNCHES)]))
    bad = {f"{i} ({'left the group' if i % 2 == 0 else 'stayed'})": r for i, r in enumerate(results) if r}
    assert not bad, f"{len(bad)} of {LAUNCHES} runs ended badly ({time.perf_counter() - started:.0f} s): {bad}"


# A process whose teardown aborts, always: a C exit handler that calls abort(), as gloo's threads can
# (exit status 134, SIGABRT, after a normal exit). It imports no torch: a fraction of a second.
ABORTING_TEARDOWN = r"""
import ctypes, sys
from workshop.cli import end_process
libc = ctypes.CDLL(None)
libc.__cxa_atexit(ctypes.cast(libc.abort, ctypes.c_void_p), None, None)
print("results written")  # not flushed here
end_process(int(sys.argv[1]))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the aborting exit handler is registered through glibc")
@pytest.mark.parametrize("code", [0, 3])
def test_the_exit_path_skips_a_teardown_that_aborts(code):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # output held back, as in a file
    result = subprocess.run([sys.executable, "-c", ABORTING_TEARDOWN, str(code)], capture_output=True, text=True,
                            env={**env, "PYTHONPATH": str(REPO)})
    assert (result.returncode, result.stdout) == (code, "results written\n"), result.stderr[-2000:]


# --- how each outcome ends, through the entry point's own function (in this process) ---------------

def _raise(error):
    def train(self, *args, **kwargs):
        raise error
    return train


@pytest.mark.parametrize("error, code, status", [
    (RuntimeError("the disk is on fire"), 1, "RuntimeError: the disk is on fire"),
    (KeyboardInterrupt(), 130, "KeyboardInterrupt: "),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), 3, "oom"),
], ids=["failed", "interrupted", "oom"])
def test_a_run_that_fails_exits_non_zero_and_status_json_says_why(tmp_path, monkeypatch, capsys, error, code,
                                                                  status):
    monkeypatch.setattr(WorkshopTrainer, "train", _raise(error))
    run_dir = tmp_path / "run"
    assert cli.exit_status(["train", "--preset", "tiny", "--run_dir", str(run_dir)]) == code
    written = read_json(run_dir / "status.json")
    err = capsys.readouterr().err.strip().splitlines()
    if status == "oom":
        assert written["status"] == "oom" and err[-1] == f"error: {written['error']}", err[-3:]
    else:
        assert written == {"status": "failed", "error": status}
        assert "Traceback (most recent call last):" in err, err[-3:]
        assert err[-1] == status.removesuffix(": "), err[-3:]  # the traceback's last line: the one-line reason


def test_refused_and_help_exit_2_and_0_and_write_nothing(tmp_path, capsys):
    assert cli.exit_status(["train", "--preset", "tiny", "--run_dir", str(tmp_path / "run"),
                            "--per_device_train_batch_size", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --per_device_train_batch_size 0 must be at least 1"
    assert cli.exit_status(["train", "--help"]) == 0
    assert cli.exit_status(["no_such_command"]) == 2
    assert not (tmp_path / "run").exists()


# --- the real thing, many times (before a release) ------------------------------------------------

@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("WORKSHOP_EXIT_RUNS"),
                    reason="set WORKSHOP_EXIT_RUNS=N to run N real two-process trainings (N=40: ~10 min on 2 cores)")
def test_real_two_process_trainings_all_exit_0_and_say_completed(tmp_path):
    """The issue's own command, N times: torchrun, two CPU processes, no DeepSpeed."""
    runs = int(os.environ["WORKSHOP_EXIT_RUNS"])
    bad = {}
    for i in range(runs):
        run_dir = tmp_path / f"run{i}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
               "workshop", "train", "--preset", "tiny", "--seed", "7", "--max_steps", "8", "--logging_steps", "1",
               "--run_dir", str(run_dir)]
        env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
        result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"})
        status = read_json(run_dir / "status.json")["status"] if (run_dir / "status.json").exists() else None
        if result.returncode != 0 or status != "completed" or "terminate called" in result.stderr:
            bad[i] = (result.returncode, status, result.stderr[-500:])
        elif "| length_max |" not in result.stdout:  # the metrics table's last row: output flushed at exit
            bad[i] = (result.returncode, status, "the metrics table is cut short")
    assert not bad, f"{len(bad)} of {runs} runs: {bad}"
