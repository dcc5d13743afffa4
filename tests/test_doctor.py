"""`workshop doctor`: one line per check, FAIL lines with their fix, exit 0 where nothing fails.

Most checks run in this process against this machine; what this machine cannot show (an old package,
a GPU torch cannot use, a SLURM controller that does not answer, a full disk) is made up by
replacing one lookup or by putting stand-in commands on PATH. The cache checks run as
tests/test_offline.py's do: fresh processes, caches in temporary folders, the hub unreachable.

    pytest tests/test_doctor.py
"""

import re
import stat
import sys
from pathlib import Path

import pytest

from conftest import REPO
from test_offline import FAKE_REPO, cache_env, offline_env, put_in_hub_cache, saved_tiny_model, workshop  # noqa: F401
from workshop import cli, doctor

NOTHING_TO_FETCH = ["--model_name_or_path", "tiny-gpt2", "--dataset_name", "builtin"]
GPU_CHECKS = ("gpu", "driver", "cuda", "bf16", "nccl")


def run_doctor(capsys, *argv) -> tuple[int, dict[str, str]]:
    """(exit status, {check name: its line}) of `workshop doctor argv`, in this process."""
    rc = cli.main(["doctor", *argv])
    lines = capsys.readouterr().out.splitlines()
    checks = {}
    for line in lines[1:-1]:  # between the heading and the summary
        status, name, detail = re.match(r"(ok|skipped|warn|FAIL) +(.+?)  +(.*)", line).groups()
        checks[name] = f"{status} {detail}"
    assert lines[-1].startswith(f"{sum(1 for c in checks.values() if c.startswith('ok '))} ok"), lines[-1]
    return rc, checks


def fake_commands(folder: Path, **scripts: str) -> Path:
    """Shell scripts named after commands (sbatch=..., nvidia-smi=...) in folder, for PATH."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, body in scripts.items():
        path = folder / name.replace("_", "-")
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


# --------------------------------------------------------------------------- this machine
def test_this_cpu_machine_passes_with_the_gpu_checks_skipped(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU machine: the GPU checks run instead of being skipped")
    rc, checks = run_doctor(capsys, *NOTHING_TO_FETCH)
    assert rc == 0, checks
    assert not [c for c in checks.values() if c.startswith("FAIL")], checks
    for name in GPU_CHECKS:
        assert checks[name].startswith("skipped"), (name, checks[name])
    assert "srun --gres=gpu:1 workshop doctor" in checks["gpu"]
    for name in ("python", "torch", "transformers", "deepspeed", "datasets"):
        assert checks[name].startswith("ok"), (name, checks[name])
    assert checks["cpu_adam"].startswith("ok")
    assert checks["hf cache"].startswith("ok nothing to fetch")
    assert checks["logs"].startswith("ok")


# ---------------------------------------------------------------------------- versions
def test_a_missing_or_too_old_package_fails_with_the_install_command(capsys, monkeypatch):
    real = doctor.installed_version
    fake = {"deepspeed": None, "transformers": "4.57.0"}
    monkeypatch.setattr(doctor, "installed_version", lambda name: fake[name] if name in fake else real(name))
    monkeypatch.setattr(doctor.platform, "python_version", lambda: "3.9.18")
    rc, checks = run_doctor(capsys, *NOTHING_TO_FETCH)
    assert rc == 1
    assert checks["deepspeed"] == ('FAIL not installed (a job stops with ModuleNotFoundError): python -m pip install '
                                   '"deepspeed>=0.18" in the environment the jobs use (the one slurm/env.sh activates)')
    assert checks["transformers"].startswith('FAIL 4.57.0 installed but the workshop needs <6,>=5.0: python -m pip '
                                             'install "transformers<6,>=5.0"')
    assert checks["python"].startswith("FAIL 3.9.18") and "needs >=3.10" in checks["python"]
    assert checks["torch"].startswith("ok")


def test_the_ranges_are_pyproject_toml_s_or_the_installed_package_s(monkeypatch):
    requires_python, dependencies, source = doctor.requirements()
    assert source == "pyproject.toml" and requires_python == ">=3.10"
    assert "deepspeed>=0.18" in dependencies and not [d for d in dependencies if d.startswith("pytest")]
    # installed without its pyproject.toml next to it (pip install ., not -e): the metadata, extras left out
    if doctor.installed_version(doctor.DISTRIBUTION) is None:
        pytest.skip("the workshop is not installed here (pip install -e .)")
    monkeypatch.setattr(doctor, "__file__", "/nowhere/workshop/doctor.py")
    assert doctor.requirements()[2] == "the package's metadata"
    checks = {check.name: check for check in doctor.check_versions()}
    assert "pytest" not in checks and checks["deepspeed"].status == doctor.OK


# ---------------------------------------------------------------------------------- GPU
def test_a_gpu_that_torch_cannot_use_fails(tmp_path, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("torch uses this machine's GPU")
    smi = """case "$1" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-00000000-0000-0000-0000-000000000000)" ;;
  *) echo "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4 |" ;;
esac"""
    monkeypatch.setenv("PATH", str(fake_commands(tmp_path / "bin", nvidia_smi=smi)))
    gpu, *rest = doctor.check_gpu()
    assert gpu.status == doctor.FAIL
    assert gpu.detail.startswith(f"nvidia-smi lists 1 GPU(s) but torch {torch.__version__} is a CPU-only build: "
                                 "install a CUDA build of torch (python -m pip install torch --index-url "
                                 "https://download.pytorch.org/whl/cu124")
    assert [c.status for c in rest] == [doctor.SKIPPED] * 4
    # SLURM's GPU variables say the same where nvidia-smi is not on PATH
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    monkeypatch.setenv("SLURM_JOB_GPUS", "0")
    assert doctor.check_gpu()[0].status == doctor.FAIL


def test_torch_that_is_installed_but_does_not_import_fails(monkeypatch):
    real = doctor._import
    broken = OSError("libcudnn.so.9: cannot open shared object file: No such file or directory")
    monkeypatch.setattr(doctor, "_import", lambda name: (None, broken) if name == "torch" else real(name))
    gpu, *rest = doctor.check_gpu()
    assert gpu.status == doctor.FAIL and "torch does not import (OSError: libcudnn.so.9" in gpu.detail
    assert "LD_LIBRARY_PATH" in gpu.detail and [c.status for c in rest] == [doctor.SKIPPED] * 4
    # not installed at all: its package line FAILs, this one is skipped
    monkeypatch.setattr(doctor, "_import", lambda name: (None, ModuleNotFoundError("No module named 'torch'")))
    assert doctor.check_gpu()[0].status == doctor.SKIPPED


def fake_gpu_torch(name="NVIDIA H100 80GB HBM3", capability=(9, 0), bf16=True):
    """torch as a GPU machine shows it, for the lines this CPU machine cannot produce."""
    from types import SimpleNamespace

    import torch

    properties = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=80 * doctor.GIB)
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 2,
                           get_device_properties=lambda i: properties,
                           is_bf16_supported=lambda including_emulation=True: bf16,
                           nccl=SimpleNamespace(version=lambda: (2, 27, 3)))
    return SimpleNamespace(__version__="2.11.0+cu130", version=SimpleNamespace(cuda="13.0"), cuda=cuda,
                           backends=SimpleNamespace(cudnn=SimpleNamespace(is_available=lambda: True,
                                                                          version=lambda: 91002)),
                           distributed=SimpleNamespace(is_available=lambda: True, is_nccl_available=lambda: True),
                           real=torch)


def test_the_lines_of_a_usable_gpu(tmp_path, monkeypatch):
    from deepspeed.ops.op_builder import builder

    smi = """case "$1" in
  -L) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)"; echo "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-1)" ;;
  *) echo "| NVIDIA-SMI 580.95.05    Driver Version: 580.95.05    CUDA Version: 13.0 |" ;; esac"""
    monkeypatch.setenv("PATH", str(fake_commands(tmp_path / "bin", nvidia_smi=smi)))
    real = doctor._import
    torch = fake_gpu_torch()
    monkeypatch.setattr(doctor, "_import", lambda name: (torch, None) if name == "torch" else real(name))
    monkeypatch.setattr(builder, "assert_no_cuda_mismatch", lambda name="": True)
    monkeypatch.setattr(builder, "installed_cuda_version", lambda name="": (13, 0))
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    lines = {check.name: (check.status, check.detail) for check in doctor.check_gpu()}
    assert lines == {
        "gpu": ("ok", "2 x NVIDIA H100 80GB HBM3 (sm_90, 80 GiB)"),
        "driver": ("ok", "580.95.05 (CUDA up to 13.0)"),
        "cuda": ("ok", "torch built with CUDA 13.0, cuDNN 91002, nvcc 13.0"),
        "bf16": ("ok", "supported: --precision auto trains in bf16"),
        "nccl": ("ok", "2.27.3, torch's own, for the multi-GPU and multi-node jobs")}

    # An H100 image's "9.0a": said on the cuda line, with what workshop train uses instead (the
    # real preflight.fix_cuda_arch_list, asked about the fake GPUs), and left as it was.
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    monkeypatch.setattr(torch.real.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.real.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.real.cuda, "get_device_capability", lambda i=0: (9, 0))
    status, detail = dict((c.name, (c.status, c.detail)) for c in doctor.check_gpu())["cuda"]
    assert status == "ok"
    assert "TORCH_CUDA_ARCH_LIST=9.0a makes DeepSpeed's op builder crash; workshop train uses 9.0" in detail
    assert doctor.os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0a"

    # nvcc of another CUDA: only the NVMe rung's async_io needs it on a GPU node
    def mismatch(name=""):
        raise builder.CUDAMismatchException(
            ">- DeepSpeed Op Builder: Installed CUDA version 12.4 does not match the version torch was compiled with "
            "13.0, unable to compile cuda/cpp extensions without a matching cuda version.")
    monkeypatch.setattr(builder, "assert_no_cuda_mismatch", mismatch)
    cuda = doctor.check_gpu()[2]
    assert cuda.status == doctor.WARN and "cpu_adam needs none: module load cuda/13.0" in cuda.detail
    assert "Installed CUDA version 12.4 does not match the version torch was compiled with 13.0" in cuda.detail
    cuda = doctor.check_gpu(nvcc_needed_by="ds_configs/zero3_nvme.json")[2]
    assert cuda.status == doctor.FAIL and "needed by ds_configs/zero3_nvme.json: module load cuda/13.0" in cuda.detail

    # a V100: no bf16, so the numbers differ from the bf16 benchmarks (a warning, not a failure)
    v100 = fake_gpu_torch("Tesla V100-SXM2-32GB", (7, 0), bf16=False)
    monkeypatch.setattr(doctor, "_import", lambda name: (v100, None) if name == "torch" else real(name))
    bf16 = doctor.check_gpu()[3]
    assert bf16.status == doctor.WARN
    assert bf16.detail.startswith("Tesla V100-SXM2-32GB has no bf16: --precision auto trains in fp16")

# ------------------------------------------------------------------------- DeepSpeed's ops
def test_async_io_fails_only_where_the_job_offloads_to_nvme(monkeypatch):
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    monkeypatch.setattr(ALL_OPS["async_io"], "is_compatible", lambda verbose=False: False)
    cpu_adam, async_io = doctor.check_ops(doctor.op_needs(None))
    assert cpu_adam.status == doctor.OK and async_io.status == doctor.WARN
    assert "needed only by the NVMe rung" in async_io.detail and "apt-get install libaio-dev" in async_io.detail
    cpu_adam, async_io = doctor.check_ops(doctor.op_needs(str(REPO / "ds_configs/zero3_nvme.json")))
    assert async_io.status == doctor.FAIL and "apt-get install libaio-dev" in async_io.detail
    assert async_io.detail.startswith("DeepSpeed cannot build it here") and "zero3_nvme.json" in async_io.detail
    # a config without offload needs neither
    assert doctor.op_needs(str(REPO / "ds_configs/zero2.json")) == {"cpu_adam": None, "async_io": None}


def test_cpu_adam_that_cannot_be_built_fails(monkeypatch, capsys):
    from deepspeed.ops.op_builder.all_ops import ALL_OPS

    monkeypatch.setattr(ALL_OPS["cpu_adam"], "is_compatible", lambda verbose=False: False)
    rc, checks = run_doctor(capsys, *NOTHING_TO_FETCH)
    assert rc == 1 and checks["cpu_adam"].startswith("FAIL DeepSpeed cannot build it here")
    monkeypatch.undo()
    monkeypatch.setattr("torch.utils.cpp_extension.is_ninja_available", lambda: False)
    [cpu_adam] = [c for c in doctor.check_ops(doctor.op_needs(None)) if c.name == "cpu_adam"]
    assert cpu_adam.status == doctor.FAIL and "ninja" in cpu_adam.detail and "pip install ninja" in cpu_adam.detail


def test_a_deepspeed_config_that_does_not_exist_is_a_bad_flag(capsys):
    assert cli.main(["doctor", "--deepspeed", "nope.json"]) == 2
    assert capsys.readouterr().err.startswith("error: --deepspeed nope.json: no such file")


# ------------------------------------------------------------------------ the HF cache
def test_the_cache_offline_and_online(tmp_path, saved_tiny_model):
    """Offline with an empty cache: FAIL naming the prefetch command. Not set offline, with the model
    in the cache: ok, looked up by prefetch's offline check in a child process."""
    empty, filled = tmp_path / "empty", tmp_path / "filled"
    online = {**offline_env(filled), **cache_env(filled)}
    del online["HF_HUB_OFFLINE"], online["HF_DATASETS_OFFLINE"]
    put_in_hub_cache(Path(online["HF_HUB_CACHE"]), FAKE_REPO, saved_tiny_model)
    flags = ["--dataset_name", "none", "--min_free_gib", "0"]
    missing, found = workshop((["doctor", "--model_name_or_path", "gpt2", *flags], offline_env(empty), tmp_path),
                              (["doctor", "--model_name_or_path", FAKE_REPO, *flags], online, tmp_path))
    assert missing.returncode == 1, missing.stdout + missing.stderr[-2000:]
    [line] = [line for line in missing.stdout.splitlines() if line.startswith("FAIL     hf cache")]
    assert "gpt2 is not in the local cache and the hub is offline" in line
    assert "run `workshop prefetch --model_name_or_path gpt2` on a login node" in line
    assert found.returncode == 0, found.stdout + found.stderr[-2000:]
    [line] = [line for line in found.stdout.splitlines() if " hf cache " in line]
    assert line.startswith("ok") and f"model {FAKE_REPO} (gpt2, weights: model.safetensors)" in line, line
    assert "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 for jobs on nodes without internet" in line


def test_an_empty_cache_only_warns_where_the_hub_is_not_set_offline(tmp_path, monkeypatch):
    import huggingface_hub

    from workshop import prefetch

    monkeypatch.setattr(prefetch, "offline_flags", lambda: (False, False))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    args = doctor.parser().parse_args(["--model_name_or_path", "gpt2", "--dataset_name", "squad"])
    check = doctor.check_hf_cache(args)
    assert check.status == doctor.WARN, check
    assert check.detail.startswith("--model_name_or_path gpt2 is not in the local cache. The hub is not set offline")
    assert "run `workshop prefetch --model_name_or_path gpt2 --dataset_name squad` on the login node" in check.detail


# ------------------------------------------------------------------------------- SLURM
def test_slurm_is_skipped_off_a_cluster_and_checked_on_one(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    check = doctor.check_slurm()
    assert check.status == doctor.SKIPPED and check.detail.startswith("not on a SLURM cluster (no sbatch on PATH)")

    commands = dict(sbatch="echo slurm 22.05.8", srun="true", scontrol="true", squeue="true",
                    sinfo="echo 'slurm_load_partitions: Unable to contact slurm controller (connect failure)' >&2; "
                          "exit 1")
    monkeypatch.setenv("PATH", str(fake_commands(tmp_path / "down", **commands)))
    check = doctor.check_slurm()
    assert check.status == doctor.FAIL
    assert "sinfo cannot reach the SLURM controller (slurm_load_partitions" in check.detail

    monkeypatch.setenv("PATH", str(fake_commands(tmp_path / "up", **{**commands, "sinfo": "echo 'debug*'"})))
    assert doctor.check_slurm() == doctor.Check("slurm", doctor.OK, "slurm 22.05.8, partitions: debug*")

    (tmp_path / "up" / "srun").unlink()
    check = doctor.check_slurm()
    assert check.status == doctor.FAIL and check.detail.startswith("srun not on PATH: module load slurm")


# ----------------------------------------------------------------------------- room under logs/
def test_free_space_below_a_run_of_the_model_fails(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "free_bytes", lambda path: 4 * doctor.GIB)
    check = doctor.check_logs(str(tmp_path / "logs"), "gpt2", None)  # the folder need not exist yet
    assert check.status == doctor.FAIL, check
    assert check.detail.startswith("4.0 GiB free under")
    assert "5.3 GiB needed (a gpt2 run: 124M parameters" in check.detail
    assert "free some space" in check.detail
    monkeypatch.setattr(doctor, "free_bytes", lambda path: 6 * doctor.GIB)
    assert doctor.check_logs(str(tmp_path / "logs"), "gpt2", None).status == doctor.OK
    monkeypatch.undo()
    rc, checks = run_doctor(capsys, *NOTHING_TO_FETCH, "--logs_root", str(tmp_path), "--min_free_gib", "1e9")
    assert rc == 1 and checks["logs"].startswith("FAIL")
    assert "1000000000.0 GiB needed (--min_free_gib)" in checks["logs"]



def test_modules_without_bytecode_are_counted_with_the_command_that_compiles_them(tmp_path, monkeypatch):
    """A module imported where Python may not write its bytecode is compiled again at every start: it is
    counted, and the warning names compileall for its folder; once compiled, it is not counted."""
    import importlib.util
    import py_compile

    source = tmp_path / "workshop_uncached_probe.py"
    source.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    try:
        importlib.import_module(source.stem)
        assert str(source) in doctor.uncached_modules()
        monkeypatch.setattr(doctor, "UNCACHED_MODULES_WARN", 1)
        check = doctor.check_bytecode()
        assert check.status == doctor.WARN and "PYTHONDONTWRITEBYTECODE is set" in check.detail
        assert f"{sys.executable} -m compileall -qq -j 0 " in check.detail and str(tmp_path) in check.detail.split()
        py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)))
        assert str(source) not in doctor.uncached_modules()
    finally:
        sys.modules.pop(source.stem, None)
