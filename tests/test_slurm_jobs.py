"""The job scripts themselves: the slurm/ helpers under plain bash, and the real scripts under sbatch.

Two kinds of test live here.

* Shell tests (no SLURM, a few seconds): each stage script runs under `bash` in a copy of the
  repository whose `workshop` package is a stub, so that what is checked is the shell: the
  arguments it passes on, the run folder, the memory loggers, exit codes, no orphan processes, the
  warning signal reaching the training.
* SLURM tests (`-m slurm`, skipped unless SLURM_CONF names a running cluster): the real scripts,
  the real package, submitted with sbatch to the cluster of `.ci/slurm_cluster.sh`:

      eval "$(.ci/slurm_cluster.sh start)" && pytest -m slurm tests/test_slurm_jobs.py
      .ci/slurm_cluster.sh stop

  `.ci/run` starts that cluster before the whole test suite and sets WORKSHOP_REQUIRE_SLURM=1, so
  that in CI a cluster that went missing fails these tests instead of skipping them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in REPO.glob("*/*.slurm"))

# --- shell tests: a stub `workshop` package in a copy of the repository ----------------------------

STUB = r'''
"""Stub of `python -m workshop train`: records what it was given, then behaves as STUB_* say. As the real
one: exit status 2 is a refusal, one line and nothing written; else status.json says "running" once its
checks have passed, and how the run ended at its end (STUB_STATUS, else completed or failed by the exit status)."""
import json, os, signal, sys, time

argv = sys.argv[1:]
run_dir = argv[argv.index("--run_dir") + 1]
rank = int(os.environ.get("RANK", "0"))
code = int(os.environ.get("STUB_EXIT", "0"))
if code == 2:
    print("error: --stub refused: fix it", file=sys.stderr)
    sys.exit(2)
got = []
usr1_at_start = signal.getsignal(signal.SIGUSR1)
signal.signal(signal.SIGUSR1, lambda sig, frame: got.append("USR1"))
signal.signal(signal.SIGTERM, lambda sig, frame: got.append("TERM"))
os.makedirs(run_dir, exist_ok=True)
if rank == 0:
    with open(f"{run_dir}/status.json", "w") as f:
        json.dump({"status": "running", "error": None}, f)
record = {"argv": argv, "rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", "1")),
          "usr1_ignored_at_start": usr1_at_start == signal.SIG_IGN, "job_start": os.environ.get("WORKSHOP_JOB_START"),
          "master": [os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")]}
with open(f"{run_dir}/stub-{rank}.json", "w") as f:
    json.dump(record, f)
deadline = time.time() + float(os.environ.get("STUB_SECONDS", "0"))
while time.time() < deadline and not got:
    time.sleep(0.05)
with open(f"{run_dir}/stub-{rank}.json", "w") as f:
    json.dump(dict(record, signals=got), f)
if rank == 0:
    with open(f"{run_dir}/status.json", "w") as f:
        json.dump({"status": os.environ.get("STUB_STATUS") or ("completed" if code == 0 else "failed")}, f)
sys.exit(code)
'''


@pytest.fixture
def stub_repo(tmp_path):
    """A copy of the job scripts and slurm/ helpers, with a stub `workshop` package beside them."""
    root = tmp_path / "repo"
    shutil.copytree(REPO / "slurm", root / "slurm")
    for script in STAGE_SCRIPTS:
        (root / script).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / script, root / script)
    (root / "logs").mkdir()
    (root / "workshop").mkdir()
    (root / "workshop" / "__init__.py").write_text("")
    (root / "workshop" / "__main__.py").write_text(STUB)
    return root


def local_env(**extra):
    """This environment without SLURM (the tests may run inside a job) plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_"))}
    env.pop("NPROC_PER_NODE", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python
    # no GPU, so the launcher depends on NPROC_PER_NODE alone
    env.update(LOG_INTERVAL="0.2", WORKSHOP_PYTHON=sys.executable, CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def start_script(repo, script, *args, **env):
    return subprocess.Popen(["bash", script, *args], cwd=repo, env=local_env(**env), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def finish(proc, timeout=60):
    out, _ = proc.communicate(timeout=timeout)
    return proc.returncode, out


def stub_records(run_dir):
    return {int(p.stem.split("-")[1]): json.loads(p.read_text()) for p in Path(run_dir).glob("stub-*.json")}


def processes_in_session(sid):
    """Processes still alive in session `sid` (Linux /proc): the script's leftovers."""
    left = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == sid:
            left.append(stat.parent.name)
    return left


def wait_until(condition, timeout=30.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def test_every_stage_script_passes_its_lesson_and_the_arguments_on(stub_repo):
    """Under plain bash each script runs locally: stage, DeepSpeed JSON, then the user's flags."""
    procs = {s: start_script(stub_repo, s, "--run_dir", f"logs/run-{Path(s).stem}", "--preset", "tiny",
                             NVME_PATH="/nvme/here")
             for s in STAGE_SCRIPTS}
    assert len(procs) >= 11, STAGE_SCRIPTS
    for script, proc in procs.items():
        rc, out = finish(proc)
        assert rc == 0, out
        assert "mode: local (no SLURM job)" in out and "launcher: python, 1 process" in out, out
        assert re.search(r"^START .*\n(.*\n)*END .* exit=0 ", out, re.M), out
        argv = stub_records(stub_repo / f"logs/run-{Path(script).stem}")[0]["argv"]
        stage, name = script.split("/")[0], Path(script).stem
        expected = ["train", "--stage", stage]
        if stage in ("deepspeed_single_gpu", "offload"):
            expected += ["--deepspeed", f"ds_configs/{name}.json"]
            assert (REPO / f"ds_configs/{name}.json").is_file(), f"{script} names a missing DeepSpeed JSON"
        if name == "zero3_nvme":
            expected += ["--nvme_path", "/nvme/here"]
        assert argv == expected + ["--run_dir", f"logs/run-{name}", "--preset", "tiny"], (script, argv)


def test_run_folder_environment_log_and_memory_csv(stub_repo):
    before = time.time()
    rc, out = finish(start_script(stub_repo, "baseline/baseline.slurm", "--lr", "1e-3", STUB_SECONDS="1",
                                  WORKSHOP_JOB_START="1"))  # one left in the environment is not this job's
    assert rc == 0, out
    run_dirs = list((stub_repo / "logs" / "baseline").iterdir())
    assert len(run_dirs) == 1 and re.fullmatch(r"\d{8}-\d{6}", run_dirs[0].name), run_dirs
    run_dir = run_dirs[0]
    # the job's start, handed to the training for its time breakdown: after the script began, before it ended
    # (whole seconds where bash has no EPOCHREALTIME)
    assert before - 1 <= float(stub_records(run_dir)[0]["job_start"]) <= time.time()
    assert stub_records(run_dir)[0]["argv"] == [
        "train", "--stage", "baseline", "--run_dir", f"logs/baseline/{run_dir.name}", "--lr", "1e-3"]
    node = os.uname().nodename.split(".")[0]
    env_log = (run_dir / f"environment-{node}.txt").read_text()
    assert "## versions" in env_log and re.search(r"^python \d", env_log, re.M), env_log
    variables = env_log.split("## variables")[1].split("## nvidia-smi")[0].splitlines()[1:]
    assert all(re.match(r"(SLURM|NCCL|CUDA|MASTER)_", v) for v in variables if v), variables
    assert "PATH=" not in env_log and "HOME=" not in env_log
    assert (run_dir / "pip-freeze.txt").stat().st_size > 0
    assert (run_dir / f"gpu_memory-{node}.csv").exists() == (shutil.which("nvidia-smi") is not None)
    if Path("/proc/meminfo").exists():
        rows = (run_dir / f"host_memory-{node}.csv").read_text().splitlines()
        assert rows[0] == "timestamp,used_mib,total_mib,available_mib"
        assert len(rows) >= 3, rows  # sampled every 0.2 s for 1 s, from the stub's status.json on
        ts, used, total, available = rows[1].split(",")
        assert re.fullmatch(r"\d{4}/\d\d/\d\d \d\d:\d\d:\d\d\.\d{3}", ts)
        assert int(used) + int(available) == pytest.approx(int(total), abs=2)


def test_rank_variables_of_the_submitting_shell_do_not_reach_the_training(stub_repo):
    """sbatch passes the whole environment on: a RANK or MASTER_PORT left in the submitting shell (an
    earlier distributed run, a test process) must not make a one-process job join a process group."""
    rc, out = finish(start_script(stub_repo, "baseline/baseline.slurm", "--run_dir", "logs/leak", RANK="3",
                                  WORLD_SIZE="4", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2", MASTER_ADDR="10.9.9.9",
                                  MASTER_PORT="45437"))
    assert rc == 0, out
    record = stub_records(stub_repo / "logs" / "leak")[0]
    assert (record["rank"], record["world_size"], record["master"]) == (0, 1, [None, None]), record


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc to find leftovers")
def test_failed_training_gives_its_exit_code_and_leaves_no_process_behind(stub_repo):
    # a long sampling interval: a logger's `sleep` left behind would still be there to find
    proc = start_script(stub_repo, "baseline/baseline.slurm", STUB_SECONDS="1", STUB_EXIT="3", LOG_INTERVAL="30")
    rc = proc.wait(timeout=60)
    clean = wait_until(lambda: not processes_in_session(proc.pid), timeout=5)
    left = processes_in_session(proc.pid)
    for pid in left:  # before reading the output: a leftover would hold the pipe open
        os.kill(int(pid), signal.SIGKILL)
    out = proc.stdout.read()
    assert clean, f"left running: {left}\n{out}"
    assert rc == 3, out
    assert re.search(r"^END .* exit=3 ", out, re.M), out


def test_the_job_ends_as_the_runs_status_json_says(stub_repo):
    """END line and exit status follow status.json, whatever the launcher returned after it was written;
    a status.json from an earlier part of the run (here: completed, then a refused restart) is not this one's.
    A refused run leaves nothing under logs/: no run folder, no environment log or memory CSV, and an
    existing folder as it was."""
    cases = {  # name: (status the stub writes, its exit status, the job's exit status, END's status)
        "completed": ("completed", 0, 0, "completed"),
        "completed_then_aborted": ("completed", 134, 0, "completed"),  # SIGABRT in the teardown
        "failed": ("failed", 1, 1, "failed"),
        "oom": ("oom", 3, 3, "oom"),
        "stopped": ("stopped", 75, 75, "stopped"),
        "stopped_exit_0": ("stopped", 0, 1, "stopped"),
        "refused_in_a_finished_folder": ("", 2, 2, "none"),
        "refused": ("", 2, 2, "none"),
    }
    (stub_repo / "logs" / "refused_in_a_finished_folder").mkdir()
    (stub_repo / "logs" / "refused_in_a_finished_folder" / "status.json").write_text('{"status": "completed"}')
    finished = sorted(p.name for p in (stub_repo / "logs" / "refused_in_a_finished_folder").iterdir())
    procs = {name: start_script(stub_repo, "baseline/baseline.slurm", "--run_dir", f"logs/{name}",
                                STUB_STATUS=status, STUB_EXIT=str(code))
             for name, (status, code, _, _) in cases.items()}
    for name, proc in procs.items():
        rc, out = finish(proc)
        _, _, job_rc, end_status = cases[name]
        assert rc == job_rc, (name, out)
        assert re.search(rf"^END .* stage=baseline status={end_status} exit={job_rc} ", out, re.M), (name, out)
        assert ("the job counts as completed" in out) == (name == "completed_then_aborted"), (name, out)
        assert not list((stub_repo / "logs" / name).glob(".launch.*")), "the launch stamp is left behind"
    assert not (stub_repo / "logs" / "refused").exists(), list((stub_repo / "logs" / "refused").iterdir())
    assert sorted(p.name for p in (stub_repo / "logs" / "refused_in_a_finished_folder").iterdir()) == finished
    assert json.loads((stub_repo / "logs" / "refused_in_a_finished_folder" / "status.json").read_text()) == {
        "status": "completed"}


@pytest.mark.parametrize("nproc", [1, 2], ids=["python", "torchrun"])
def test_warning_signal_reaches_every_rank(stub_repo, nproc):
    """SIGUSR1 to the job shell (what --signal=B:USR1 does) reaches the ranks, not the launcher."""
    if nproc > 1:
        pytest.importorskip("torch")
    proc = start_script(stub_repo, "multi_node/multi_gpu.slurm", "--run_dir", "logs/sig",
                        STUB_SECONDS="60", NPROC_PER_NODE=str(nproc))
    run_dir = stub_repo / "logs" / "sig"
    assert wait_until(lambda: len(stub_records(run_dir)) == nproc, timeout=60), proc.stdout
    time.sleep(0.2)  # the stub's handlers are set before its record is written; the shell's trap too
    os.kill(proc.pid, signal.SIGUSR1)
    rc, out = finish(proc)
    assert rc == 0, out
    assert ("launcher: torchrun" if nproc > 1 else "launcher: python") in out, out
    assert "stopped on SIGUSR1" in out, out
    records = stub_records(run_dir)
    assert sorted(records) == list(range(nproc)), records
    for record in records.values():
        assert record["signals"] == ["USR1"], records
        assert record["usr1_ignored_at_start"], "the training should start with SIGUSR1 ignored"
        assert record["world_size"] == nproc


# --- SLURM tests: the real scripts and package on the cluster of .ci/slurm_cluster.sh --------------

# The CI nodes have no GPUs and 2 cores between them: drop the scripts' GPU request, one CPU a task.
# --time stays above the scripts' --signal=B:USR1@600, or the warning would come at once.
CI_SBATCH_ARGS = ["--gres=none", "--cpus-per-task=1", "--mem=3G", "--time=30"]
JOB_TIMEOUT_S = 600


def _cluster_problem():
    if shutil.which("sbatch") is None:
        return "SLURM is not installed (no sbatch): eval \"$(.ci/slurm_cluster.sh start)\" installs and starts one"
    if not os.environ.get("SLURM_CONF"):
        return "SLURM_CONF is not set: eval \"$(.ci/slurm_cluster.sh start)\" starts a cluster and sets it"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    if "UP" not in ping.stdout:
        return f"no SLURM controller answers for SLURM_CONF={os.environ['SLURM_CONF']}: .ci/slurm_cluster.sh start"
    return None


def job_env():
    """What sbatch passes on to the job (--export=ALL): this environment, with this interpreter's
    folder first on PATH, so the job's `python` is the one running the tests (a venv's pytest may
    be started without activating the venv)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name in ("WORKSHOP_PYTHON", "NPROC_PER_NODE"):  # the scripts' defaults are what is tested
        env.pop(name, None)
    # what an in-process training of another test may have left in os.environ (a job script drops
    # these itself; popped here too so these tests do not depend on the order of the others)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.fixture
def sbatch():
    """submit(script, *args) -> job id; waits for nothing. Removes each job's log and run folder."""
    problem = _cluster_problem()
    if problem:
        if os.environ.get("WORKSHOP_REQUIRE_SLURM") == "1":
            pytest.fail(f"WORKSHOP_REQUIRE_SLURM=1 but {problem}")
        pytest.skip(problem)
    made = []
    (REPO / "logs").mkdir(exist_ok=True)  # the scripts' --output=logs/%x-%j.out: sbatch makes no folder

    def submit(script, *args):
        done = subprocess.run(["sbatch", "--parsable", *CI_SBATCH_ARGS, script, *args],
                              cwd=REPO, env=job_env(), capture_output=True, text=True)
        assert done.returncode == 0, f"sbatch {script} refused: {done.stderr}"
        job_id = done.stdout.strip().split(";")[0]
        made.append((job_id, script))
        return job_id

    yield submit
    for job_id, script in made:
        subprocess.run(["scancel", job_id], capture_output=True)
        shutil.rmtree(REPO / "logs" / script.split("/")[0] / job_id, ignore_errors=True)
        for log in (REPO / "logs").glob(f"*-{job_id}.out"):
            log.unlink()
        try:
            (REPO / "logs" / script.split("/")[0]).rmdir()  # only if no other run is in it
        except OSError:
            pass


def job_info(job_id):
    """`scontrol show job` as a dict of its Key=Value fields (JobState, ExitCode, Restarts, ...)."""
    info = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", info))


def job_log(job_id):
    name = job_info(job_id)["JobName"]
    log_file = REPO / "logs" / f"{name}-{job_id}.out"
    return log_file.read_text() if log_file.exists() else f"(no log file {log_file})"


def job_queued(job_id):
    """Pending, running or being requeued (a requeued job stays in squeue, same id)."""
    queued = subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True)
    return queued.returncode == 0 and bool(queued.stdout.strip())


def wait_for_job(job_id, timeout=JOB_TIMEOUT_S):
    """Poll squeue every second (sbatch --wait reports up to 32 s late), then read the job's state."""
    deadline = time.time() + timeout
    while job_queued(job_id):
        if time.time() > deadline:
            subprocess.run(["scancel", job_id], capture_output=True)
            raise AssertionError(f"job {job_id} still queued or running after {timeout} s: cancelled\n"
                                 f"{job_log(job_id)[-3000:]}")
        time.sleep(1)
    info = job_info(job_id)
    return info["JobState"], info["ExitCode"], job_log(job_id)


def run_folder(script, job_id):
    return REPO / "logs" / script.split("/")[0] / job_id


def assert_completed_run(script, job_id):
    state, exit_code, log = wait_for_job(job_id)
    assert (state, exit_code) == ("COMPLETED", "0:0"), f"{script}: {state} {exit_code}\n{log[-4000:]}"
    assert re.search(r"^END .* status=completed exit=0 ", log, re.M), log[-4000:]
    run_dir = run_folder(script, job_id)
    for name in ("config.json", "metrics.json", "pip-freeze.txt"):
        assert (run_dir / name).is_file(), f"{run_dir} has no {name}\n{log[-4000:]}"
    assert list(run_dir.glob("host_memory-*.csv")) and list(run_dir.glob("environment-*.txt")), \
        sorted(p.name for p in run_dir.iterdir())
    assert f"mode: SLURM job {job_id}" in log, log
    return json.loads((run_dir / "metrics.json").read_text()), log


@pytest.mark.slurm
def test_baseline_job_completes(sbatch):
    job = sbatch("baseline/baseline.slurm", "--preset", "tiny")
    metrics, log = assert_completed_run("baseline/baseline.slurm", job)
    assert metrics["stage"] == "baseline" and metrics["deepspeed"] is None
    assert metrics["world_size"] == 1 and metrics["final_train_loss"] is not None
    assert "launcher: python, 1 process" in log
    # the job ran the tests' interpreter (sbatch passed PATH on), not whatever python the node has
    env_log = next(run_folder("baseline/baseline.slurm", job).glob("environment-*.txt")).read_text()
    python_line = re.search(r"^python \S+ (\S+)$", env_log, re.M)
    assert python_line and Path(python_line.group(1)).parent == Path(sys.executable).parent, env_log


@pytest.mark.slurm
def test_zero_stage_job_completes(sbatch):
    job = sbatch("deepspeed_single_gpu/zero2.slurm", "--preset", "tiny")
    metrics, _ = assert_completed_run("deepspeed_single_gpu/zero2.slurm", job)
    assert metrics["stage"] == "deepspeed_single_gpu" and metrics["deepspeed"] == "zero2.json"
    assert metrics["zero_stage"] == 2, metrics


@pytest.mark.slurm
def test_offload_job_completes(sbatch):
    job = sbatch("offload/zero2_offload.slurm", "--preset", "tiny")
    metrics, _ = assert_completed_run("offload/zero2_offload.slurm", job)
    assert metrics["stage"] == "offload" and metrics["deepspeed"] == "zero2_offload.json"
    assert metrics["offload_optimizer"] == "cpu", metrics


@pytest.mark.slurm
def test_multi_node_job_runs_one_rank_on_each_node(sbatch):
    script = "multi_node/multi_node.slurm"
    job = sbatch(script, "--preset", "tiny")
    metrics, log = assert_completed_run(script, job)
    assert metrics["world_size"] == 2 and metrics["num_nodes"] == 2, metrics
    assert "launcher: srun + torchrun, 2 nodes x 1 processes = world size 2" in log, log
    # one srun task per node, each with its own node rank: its line names the node it ran on
    nodes = subprocess.run(["scontrol", "show", "hostnames", re.search(r"nodes (\S+),", log).group(1)],
                           capture_output=True, text=True, check=True).stdout.split()
    assert len(nodes) == 2, nodes
    for node_rank, node in enumerate(nodes):
        assert re.search(rf"^{node_rank}: node {node} \(host .*\): node_rank {node_rank} of 2, "
                         rf"ranks {node_rank}\.\.{node_rank} of world size 2$", log, re.M), log
        assert (run_folder(script, job) / f"environment-{node}.txt").is_file()
        assert (run_folder(script, job) / f"host_memory-{node}.csv").is_file()


@pytest.mark.slurm
def test_failing_job_is_seen_failed_with_its_exit_code(sbatch):
    job = sbatch("baseline/baseline.slurm", "--preset", "tiny", "--no_such_flag", "1")
    state, exit_code, log = wait_for_job(job)
    assert (state, exit_code) == ("FAILED", "2:0"), f"{state} {exit_code}\n{log[-3000:]}"
    assert re.search(r"^END .* status=none exit=2 .* run folder: none$", log, re.M), log  # refused
    assert not run_folder("baseline/baseline.slurm", job).exists(), "a refused run leaves no run folder"


@pytest.mark.slurm
def test_warning_signal_checkpoints_requeues_resumes_and_completes(sbatch):
    """Issue 6 under SLURM: the time-limit warning (`--signal=B:USR1@600`, sent here by hand to the
    batch shell as SLURM would) makes the real training save a checkpoint and stop; the job requeues
    itself under the same id, resumes from that checkpoint in the same run folder and completes."""
    script = "baseline/baseline.slurm"
    # 2 x 256 steps of about 20 ms: room to signal mid-epoch, done in seconds
    job = sbatch(script, "--preset", "tiny", "--max_train_samples", "2048", "--logging_steps", "1")
    run_dir = run_folder(script, job)
    steps_file = run_dir / "steps.jsonl"

    def steps():
        if not steps_file.exists():
            return []
        return [json.loads(line)["step"] for line in steps_file.read_text().splitlines() if line.endswith("}")]

    # training has started (the trainer's handler is installed before the first step)
    assert wait_until(lambda: len(steps()) >= 3 or not job_queued(job), timeout=JOB_TIMEOUT_S), job_log(job)
    signalled = subprocess.run(["scancel", "--batch", "--signal=USR1", job], capture_output=True, text=True)
    assert signalled.returncode == 0, f"{signalled.stderr}\n{job_log(job)[-3000:]}"

    metrics, log = assert_completed_run(script, job)
    assert job_info(job)["Restarts"] == "1", job_info(job)

    # first part: the signal reached the training, which checkpointed and stopped; the job requeued
    assert "SIGUSR1 (time limit near): forwarding it to the training (python)" in log, log
    stopped = re.search(r"stopped on SIGUSR1 at step (\d+): checkpoint saved", log)
    assert stopped, log
    stop_step = int(stopped.group(1))
    assert f"requeueing job {job} (restart 1 of at most" in log, log
    # second part: same job id, restart 1, resumed from the checkpoint of the stop
    assert f"mode: SLURM job {job} (restart 1)" in log, log
    assert re.search(rf"^resuming from \S*/checkpoints/checkpoint-{stop_step}$", log, re.M), log
    assert len(re.findall(r"^START ", log, re.M)) == 2 and "not requeued" not in log, log
    # each part ends cleanly, the first too (SLURM's SIGTERM after the requeue must not cut it short)
    assert len(re.findall(r"^END .* exit=0 ", log, re.M)) == 2, log
    assert re.search(r"^END .* status=stopped,requeued exit=0 ", log, re.M), log

    # the run folder holds both parts as one run
    assert json.loads((run_dir / "status.json").read_text())["status"] == "completed"
    total = metrics["total_steps"]
    assert 0 < stop_step < total, (stop_step, total)
    assert steps() == list(range(1, total + 1)), f"steps.jsonl rows: {steps()}"
    history = json.loads((run_dir / "log_history.json").read_text())
    assert [e["step"] for e in history if "loss" in e] == list(range(1, total + 1)), history
    assert [round(e["epoch"]) for e in history if "eval_loss" in e] == [1, 2], history
    assert "train_runtime" in history[-1], history[-1]
    assert (run_dir / "model").is_dir() and metrics["final_train_loss"] is not None
    rows = next(run_dir.glob("host_memory-*.csv")).read_text().splitlines()
    assert rows.count("timestamp,used_mib,total_mib,available_mib") == 1, "the requeued part appends"
