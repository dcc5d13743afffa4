"""``workshop doctor``: is this machine ready for the workshop's jobs? One line per check.

    workshop doctor                                        # laptop, login node, CI: GPU checks skipped
    srun --gres=gpu:1 --pty workshop doctor                # a GPU node: the GPU checks too
    workshop doctor --model_name_or_path gpt2 --dataset_name wikitext   # the job's model and data
    workshop doctor --deepspeed ds_configs/zero3_nvme.json # the NVMe rung: async_io/libaio must work

Each line says ``ok``, ``skipped`` (and why: no GPU here, not a SLURM cluster), ``warn`` (works
here, but something a later rung or a compute node needs is missing; the line says what) or
``FAIL`` (and the fix). The exit status is 0 when nothing FAILs, 1 otherwise. Checks, in order:

* Python and every dependency against the ranges in pyproject.toml (the installed package's
  metadata where there is no pyproject.toml next to the package);
* GPU, driver, CUDA (with cuDNN and the nvcc DeepSpeed compiles with), bf16, NCCL: skipped where
  there is no GPU, FAIL where there is one (nvidia-smi lists it, or SLURM gave the job one, or
  --require_gpu) that torch cannot use;
* DeepSpeed's ops, asked the way ``ds_report`` asks (its op builders' compatibility probes):
  cpu_adam, which every CPU-offload config runs, and async_io (libaio), which only NVMe offload
  needs. Neither is compiled here unless --build_ops: the first offload job compiles cpu_adam
  (about a minute) and later jobs load it;
* the Hugging Face cache and offline state for the job's model and data set, through
  ``workshop prefetch --check_only``'s own check, naming the ``workshop prefetch`` command to run;
* the bytecode of what a job imports: where Python finds no compiled cache (``__pycache__``) and may
  not write one (PYTHONDONTWRITEBYTECODE, a read-only environment: common in containers), every job
  compiles torch and transformers again as it starts, seconds each time; the line names the
  ``compileall`` command that does it once;
* the SLURM commands, where this looks like a SLURM cluster (sbatch on PATH, or inside a job);
* free space under logs/ for a run of the model: its checkpoints and the saved model.

It needs no GPU, no network and no SLURM, writes nothing (--build_ops: the compiled ops, where
torch keeps them), and takes a few seconds: most of it importing torch, DeepSpeed and transformers,
plus, where the model is in the cache, a child process that loads it with the hub offline, as a
compute node would.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.metadata
import io
import logging
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from workshop.errors import WorkshopError  # these two import nothing: safe where packages are missing
from workshop.units import GIB

OK, SKIPPED, WARN, FAIL = "ok", "skipped", "warn", "FAIL"
DISTRIBUTION = "llm-finetuning-workshop"

# Where the job scripts' Python comes from: the fix for a missing package is to install it there.
PIP_FIX = "python -m pip install {req} in the environment the jobs use (the one slurm/env.sh activates)"

# Free space a run needs under logs/: the Trainer keeps 2 checkpoints (save_total_limit) and writes
# a third before it deletes the oldest, each the largest a stage writes (memory.CHECKPOINT_BYTES_PER_PARAM:
# 14 bytes per parameter under DeepSpeed in 16 bits), and the saved model 4 more (fp32).
# bigscience/bloom-560m: 559M x (3 x 14 + 4) = 24 GiB; gpt2: 5.3 GiB.
CHECKPOINTS_KEPT = 3
SAVED_MODEL_BYTES_PER_PARAM = 4
MIN_FREE_BYTES = 2 * GIB  # any run: logs, memory CSVs, tokenised data, a tiny model and its checkpoints
UNKNOWN_MODEL_FREE_BYTES = 10 * GIB  # a model whose size is not known here (not cached yet)

SLURM_GPU_VARIABLES = ("SLURM_GPUS_ON_NODE", "SLURM_JOB_GPUS", "SLURM_STEP_GPUS")
# Modules a job imports without cached bytecode, above which the start-up pays for compiling them: a
# module is a few milliseconds; torch alone is some 2,800 of them.
UNCACHED_MODULES_WARN = 50


@dataclass
class Check:
    name: str
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<8} {self.name:<13} {self.detail}"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workshop doctor",
        description="Check that this machine has what the workshop's jobs need: one line per check, each failure "
                    "with its fix. Exit status 0 when nothing fails (GPU checks are skipped where there is no GPU, "
                    "SLURM's where there is no cluster), 1 otherwise. Run it on the login node before the first "
                    "job, and inside a job (srun --gres=gpu:1 workshop doctor) for the GPU checks.")
    p.add_argument("--model_name_or_path", default=None,
                   help="The job's model, looked up in the Hugging Face cache. Default: workshop train's.")
    p.add_argument("--tokenizer_name_or_path", default=None, help="The job's tokenizer, if not the model's.")
    p.add_argument("--from_config", action="store_true",
                   help="The job builds the model from its configuration: its weights are not needed.")
    p.add_argument("--dataset_name", default=None, choices=["squad", "wikitext", "builtin", "builtin_text", "none"],
                   help="The job's data set, looked up in the cache ('none': skip). Default: workshop train's.")
    p.add_argument("--dataset_config_name", default=None, help="Hub configuration of the data set, as the job's.")
    p.add_argument("--deepspeed", default=None, metavar="JSON",
                   help="The DeepSpeed config the job uses: only the ops it needs must work. Default: what every "
                        "rung needs, i.e. cpu_adam for CPU offload, while async_io (libaio) only warns, since only "
                        "ds_configs/zero3_nvme.json needs it.")
    p.add_argument("--build_ops", action="store_true",
                   help="Compile and load the DeepSpeed ops now instead of only asking whether they can be built "
                        "(about a minute the first time; later jobs then load them at once).")
    p.add_argument("--require_gpu", action="store_true",
                   help="Fail where torch sees no GPU (inside a GPU job this is automatic: SLURM's GPU variables or "
                        "nvidia-smi say there should be one).")
    p.add_argument("--logs_root", default="logs", help="Where the jobs write their run folders (default: %(default)s).")
    p.add_argument("--min_free_gib", type=float, default=None,
                   help="Free space the runs need under --logs_root. Default: what one run of the model writes "
                        f"(up to {CHECKPOINTS_KEPT} checkpoints, each the weights and the optimizer's state, + the saved "
                        f"model), at least {MIN_FREE_BYTES // GIB} GiB.")
    return p


# --------------------------------------------------------------------------------- small helpers
def _first_line(error: BaseException | str) -> str:
    text = error if isinstance(error, str) else f"{type(error).__name__}: {error}"
    return (text.strip().splitlines() or [""])[0][:200]


def _import(name: str):
    """(module, None) or (None, the exception). What a library prints while it is imported
    (DeepSpeed logs its accelerator choice) stays off the check lines."""
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stdout(buffer):
            module = importlib.import_module(name)
    except Exception as error:  # ImportError, or a library that fails in its own import (a missing .so)
        return None, error
    finally:
        # A logging handler made during the import kept the buffer as its stream: give it stdout back.
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                if getattr(handler, "stream", None) is buffer:
                    handler.setStream(sys.stdout)
    return module, None


def _not_importable(name: str, what: str, error: Exception) -> Check:
    """A check that needs a module that does not import: skipped where a package is missing (its own
    line above FAILs already), FAIL where everything is installed and the import itself breaks (a
    CUDA or cuDNN library that cannot be loaded, a broken install)."""
    if isinstance(error, ModuleNotFoundError):
        return Check(name, SKIPPED, f"{what} does not import ({_first_line(error)}): see the packages above")
    return Check(name, FAIL, f"{what} does not import ({_first_line(error)}): a library it loads is missing or "
                 "another version shadows it (LD_LIBRARY_PATH, `module list`): load the modules the jobs load "
                 "(slurm/env.sh), or reinstall it: python -m pip install --force-reinstall <package>")


def _run(command: list[str], timeout: float = 30) -> tuple[int, str]:
    """(exit status, output) of a command; 127 where it cannot be started."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError) as error:
        return 127, _first_line(error)
    return result.returncode, (result.stdout + result.stderr).strip()


def installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


# ------------------------------------------------------------------------ Python and packages
def requirements() -> tuple[str | None, list[str], str]:
    """(requires-python, dependency strings, where they were read). pyproject.toml next to the
    package when there is one (the code that runs is the checkout's, even where an older copy was
    installed), else the installed package's metadata."""
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    try:
        import tomllib  # Python 3.11+
    except ImportError:
        tomllib = None
    if tomllib is not None and pyproject.is_file():
        project = tomllib.loads(pyproject.read_text()).get("project", {})
        if project.get("name") == DISTRIBUTION:
            return project.get("requires-python"), list(project.get("dependencies", [])), "pyproject.toml"
    metadata = importlib.metadata.metadata(DISTRIBUTION)  # PackageNotFoundError: the caller says what to do
    return metadata.get("Requires-Python"), importlib.metadata.requires(DISTRIBUTION) or [], "the package's metadata"


def check_versions() -> list[Check]:
    try:
        from packaging.requirements import Requirement
        from packaging.specifiers import SpecifierSet
    except ImportError:
        return [Check("packages", FAIL, "the packaging module is missing, so no version can be compared: "
                      + PIP_FIX.format(req="packaging"))]
    try:
        requires_python, dependencies, source = requirements()
    except importlib.metadata.PackageNotFoundError:
        return [Check("packages", FAIL, f"no pyproject.toml next to the workshop package and {DISTRIBUTION} is not "
                      "installed: run `python -m pip install -e .` in the repository")]
    python = platform.python_version()
    checks = []
    if requires_python and not SpecifierSet(requires_python).contains(python, prereleases=True):
        checks.append(Check("python", FAIL, f"{python} ({sys.executable}) but the workshop needs {requires_python}: "
                            "make the environment with a newer Python (module load python/3.12, or conda)"))
    else:
        checks.append(Check("python", OK, f"{python} ({requires_python or 'any'}), {sys.executable}; the ranges below "
                            f"are {source}'s"))
    for text in dependencies:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra (test) or another platform's
        version = installed_version(req.name)
        wanted = str(req.specifier) or "any version"
        fix = PIP_FIX.format(req=f'"{req.name}{req.specifier}"')
        if version is None:
            checks.append(Check(req.name, FAIL, f"not installed (a job stops with ModuleNotFoundError): {fix}"))
        elif not req.specifier.contains(version, prereleases=True):
            checks.append(Check(req.name, FAIL, f"{version} installed but the workshop needs {wanted}: {fix}"))
        else:
            checks.append(Check(req.name, OK, f"{version} ({wanted})"))
    return checks


# ---------------------------------------------------------------------------------------- GPU
@dataclass
class NvidiaSmi:
    gpus: list[str]          # `nvidia-smi -L` lines
    driver: str | None       # "550.54.15"
    cuda: str | None         # the newest CUDA the driver supports, "12.4"


def nvidia_smi() -> NvidiaSmi | None:
    """What the driver's own tool reports, or None where nvidia-smi is not on PATH or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    status, listing = _run(["nvidia-smi", "-L"])
    if status != 0:
        return None
    _, header = _run(["nvidia-smi"])
    driver = re.search(r"Driver Version:\s*([\d.]+)", header)
    cuda = re.search(r"CUDA Version:\s*([\d.]+)", header)
    return NvidiaSmi([line for line in listing.splitlines() if line.startswith("GPU ")],
                     driver and driver.group(1), cuda and cuda.group(1))


def _gpu_expected(smi: NvidiaSmi | None, require_gpu: bool) -> str | None:
    """Why this machine should have a usable GPU, or None."""
    if require_gpu:
        return "--require_gpu"
    if smi and smi.gpus:
        return f"nvidia-smi lists {len(smi.gpus)} GPU(s)"
    for name in SLURM_GPU_VARIABLES:
        if os.environ.get(name):
            return f"SLURM gave this job GPUs ({name}={os.environ[name]})"
    return None


def _no_usable_gpu(torch, smi: NvidiaSmi | None, expected: str) -> str:
    """The FAIL line where a GPU should be usable and torch sees none: the likeliest cause first."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    driver_cuda = smi.cuda if smi and smi.cuda else None
    if torch.version.cuda is None:
        wheel = f"cu{driver_cuda.replace('.', '')[:3]}" if driver_cuda else "cuXYZ"
        return (f"{expected} but torch {torch.__version__} is a CPU-only build: install a CUDA build of torch "
                f"(python -m pip install torch --index-url https://download.pytorch.org/whl/{wheel}, "
                f"at most the driver's CUDA {driver_cuda or '(see nvidia-smi)'})")
    if visible is not None and visible.strip() in ("", "-1", "NoDevFiles"):
        return (f"{expected} but CUDA_VISIBLE_DEVICES={visible!r} hides them: ask SLURM for GPUs "
                "(#SBATCH --gres=gpu:1) and leave CUDA_VISIBLE_DEVICES to it")
    if smi is None:
        return (f"{expected} but neither nvidia-smi nor torch finds one: the NVIDIA driver is not loaded on this "
                "node; run on a GPU node (srun --gres=gpu:1 ...) or ask the admins")
    return (f"{expected} but torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use them; the driver "
            f"{smi.driver or '?'} supports CUDA up to {driver_cuda or '?'}: install a torch built for that CUDA or "
            "older, or run on nodes with a newer driver")


def check_gpu(require_gpu: bool = False, nvcc_needed_by: str | None = None) -> list[Check]:
    """gpu, driver, cuda, bf16 and nccl: skipped where there is no GPU, FAIL where one is unusable.
    ``nvcc_needed_by``: the config whose ops DeepSpeed compiles with nvcc on a GPU node (async_io)."""
    names = ("gpu", "driver", "cuda", "bf16", "nccl")
    torch, error = _import("torch")
    if torch is None:
        return [_not_importable("gpu", "torch", error)] + [Check(name, SKIPPED, "torch does not import")
                                                            for name in names[1:]]
    smi = nvidia_smi()
    expected = _gpu_expected(smi, require_gpu)
    if not torch.cuda.is_available():
        if expected is None:
            why = ("no NVIDIA GPU here (no nvidia-smi, torch sees none): fine on a laptop, CI or a login node; on a "
                   "cluster, check a GPU node with `srun --gres=gpu:1 workshop doctor`")
            return [Check("gpu", SKIPPED, why)] + [Check(name, SKIPPED, "no GPU") for name in names[1:]]
        rest = [Check(name, SKIPPED, "no usable GPU (see the gpu line)") for name in names[1:]]
        return [Check("gpu", FAIL, _no_usable_gpu(torch, smi, expected))] + rest

    count = torch.cuda.device_count()
    properties = [torch.cuda.get_device_properties(i) for i in range(count)]
    kinds = sorted({f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / GIB:.0f} GiB)" for p in properties})
    checks = [Check("gpu", OK, f"{count} x {', '.join(kinds)}")]

    if smi is None:
        checks.append(Check("driver", WARN, "nvidia-smi is not on PATH: the jobs log GPU memory with it "
                            "(slurm/node.sh); add the driver's utilities to PATH (module load cuda)"))
    else:
        checks.append(Check("driver", OK, f"{smi.driver or '?'} (CUDA up to {smi.cuda or '?'})"))
    checks.append(_check_cuda(torch, nvcc_needed_by))

    try:
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # older torch has no including_emulation
        bf16 = torch.cuda.is_bf16_supported()
    if bf16:
        checks.append(Check("bf16", OK, "supported: --precision auto trains in bf16"))
    else:
        checks.append(Check("bf16", WARN, f"{properties[0].name} has no bf16: --precision auto trains in fp16 here, "
                            "so losses and speeds differ from BENCHMARKS.md's bf16 runs"))

    if torch.distributed.is_available() and torch.distributed.is_nccl_available():
        version = torch.cuda.nccl.version()
        version = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        checks.append(Check("nccl", OK, f"{version}, torch's own, for the multi-GPU and multi-node jobs"))
    else:
        checks.append(Check("nccl", FAIL, f"torch {torch.__version__} was built without NCCL, so multi-GPU jobs "
                            "cannot start: install torch's CUDA build from download.pytorch.org"))
    return checks


def _check_cuda(torch, nvcc_needed_by: str | None = None) -> Check:
    """torch's CUDA, cuDNN, and the nvcc DeepSpeed compiles its CUDA ops with, by DeepSpeed's own
    mismatch check. In DeepSpeed 0.19 cpu_adam comes from the CPU op builder on GPU machines too (plain
    C++, no nvcc); on a GPU node async_io (NVMe offload) and fused_adam are CUDA ops, built with nvcc."""
    parts = [f"torch built with CUDA {torch.version.cuda}"]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    if cudnn is None:
        return Check("cuda", FAIL, "torch cannot load cuDNN (libcudnn): another cuDNN on LD_LIBRARY_PATH shadows the "
                     "one torch's wheel brings (module unload cudnn), or reinstall torch")
    parts.append(f"cuDNN {cudnn}")
    builder, error = _import("deepspeed.ops.op_builder.builder")
    if builder is None:
        return Check("cuda", OK, ", ".join(parts) + f" (DeepSpeed does not import: {_first_line(error)})")
    major_minor = ".".join(torch.version.cuda.split(".")[:2])
    problem = None
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            builder.assert_no_cuda_mismatch("doctor")
        parts.append("nvcc {}.{}".format(*builder.installed_cuda_version()))
    except builder.MissingCUDAException:
        problem = "no nvcc (CUDA_HOME unset)"
    except Exception as error:  # CUDAMismatchException: DeepSpeed refuses to compile CUDA ops with it
        problem = _first_line(str(error)).lstrip(">- ").split(", unable")[0]
    if problem:
        fix = f"module load cuda/{major_minor} (or point CUDA_HOME at a CUDA {major_minor} toolkit)"
        for_what = f"needed by {nvcc_needed_by}" if nvcc_needed_by else "cpu_adam needs none"
        return Check("cuda", FAIL if nvcc_needed_by else WARN,
                     f"{', '.join(parts)}; {problem}: DeepSpeed cannot compile its CUDA ops (async_io for NVMe, "
                     f"fused_adam); {for_what}: {fix}")
    note = _arch_list_note()
    return Check("cuda", OK, ", ".join(parts) + (f"; {note}" if note else ""))


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _arch_list_note() -> str | None:
    """What workshop train does to TORCH_CUDA_ARCH_LIST before DeepSpeed compiles anything, said, not done."""
    before = os.environ.get("TORCH_CUDA_ARCH_LIST")
    preflight, _ = _import("workshop.preflight")
    if not before or preflight is None:
        return None
    try:
        with _quiet(preflight.__name__):
            chosen = preflight.fix_cuda_arch_list()
    finally:
        os.environ["TORCH_CUDA_ARCH_LIST"] = before
    if chosen is None:
        return None
    return (f"TORCH_CUDA_ARCH_LIST={before} makes DeepSpeed's op builder crash; workshop train uses {chosen} "
            f"instead, export TORCH_CUDA_ARCH_LIST={chosen} for anything else that compiles DeepSpeed ops")


# ---------------------------------------------------------------------------- DeepSpeed's ops
def op_needs(deepspeed_config: str | None) -> dict[str, str | None]:
    """{op: what needs it, or None}: cpu_adam for optimizer offload, async_io for NVMe."""
    if deepspeed_config is None:
        return {"cpu_adam": "the offload rung (ds_configs/*offload*.json)", "async_io": None}
    from workshop import ds_config

    devices = ds_config.offload_devices(ds_config.load_config(deepspeed_config))
    return {"cpu_adam": deepspeed_config if devices["offload_optimizer"] else None,
            "async_io": deepspeed_config if "nvme" in devices.values() else None}


NVME_ONLY = "needed only by the NVMe rung (ds_configs/zero3_nvme.json)"
BUILD_TOOLS_FIX = {"ninja": "python -m pip install ninja", "c++": "apt-get install g++ (or module load gcc)"}
OP_FIX = {"async_io": "apt-get install libaio-dev (dnf install libaio-devel on RHEL/Rocky)",
          "cpu_adam": "run `ds_report` for DeepSpeed's own account"}


def check_ops(needs: dict[str, str | None], build: bool = False) -> list[Check]:
    """Each op as ds_report judges it: pre-built into DeepSpeed, or compatible (its builder finds
    what it needs to compile it just in time, with ninja and a C++ compiler)."""
    deepspeed, error = _import("deepspeed")
    if deepspeed is None:
        return [_not_importable(op, "deepspeed", error) for op in needs]
    from deepspeed.git_version_info import installed_ops
    from deepspeed.ops.op_builder import builder as builder_module
    from deepspeed.ops.op_builder.all_ops import ALL_OPS
    from torch.utils.cpp_extension import is_ninja_available

    # DeepSpeed >= 0.18.x: probe_is_compatible turns a probe that raises into "not compatible".
    probe = getattr(builder_module, "probe_is_compatible",
                    lambda op_builder, verbose: op_builder.is_compatible(verbose))
    missing_tools = [tool for tool, found in (("ninja", is_ninja_available()),
                                              ("c++", shutil.which(os.environ.get("CXX", "c++")))) if not found]
    checks = []
    for op, needed_by in needs.items():
        op_builder = ALL_OPS.get(op)
        if op_builder is None:
            checks.append(Check(op, FAIL if needed_by else WARN, f"DeepSpeed {deepspeed.__version__} has no {op} op"))
            continue
        reasons = io.StringIO()
        with contextlib.redirect_stdout(reasons):  # the probe prints why it says no
            compatible = probe(op_builder, True)
        prebuilt = bool(installed_ops.get(op))
        # The probe's first reason, without its colours: "async_io requires the dev libaio .so object and headers ..."
        reasons = [re.sub(r"\x1b\[[0-9;]*m|\[WARNING\]", "", line).strip() for line in reasons.getvalue().splitlines()]
        why = next((line for line in reasons if line), "")
        for_what = f"needed by {needed_by}" if needed_by else NVME_ONLY
        if not compatible:
            checks.append(Check(op, FAIL if needed_by else WARN,
                                f"DeepSpeed cannot build it here ({why or 'ds_report says not compatible'}); "
                                f"{for_what}: {OP_FIX.get(op, 'see ds_report')}"))
        elif not prebuilt and missing_tools:
            fixes = "; ".join(BUILD_TOOLS_FIX[tool] for tool in missing_tools)
            tools = " and ".join(missing_tools) + (" is" if len(missing_tools) == 1 else " are")
            checks.append(Check(op, FAIL if needed_by else WARN,
                                f"compiled on first use, but {tools} missing; {for_what}: {fixes}"))
        elif build:
            checks.append(_build_op(op, for_what, needed_by))
        else:
            how = "pre-built into DeepSpeed" if prebuilt else (
                "DeepSpeed can build it here (ninja, c++): the first job that uses it compiles it, about a minute "
                "(--build_ops: now)")
            checks.append(Check(op, OK, f"{how}; {for_what}"))
    return checks


def _build_op(op: str, for_what: str, needed_by: str | None) -> Check:
    """Compile (or find compiled) and load the op, in a child process so that the compiler's output
    stays out of the check lines; its last lines are the FAIL's reason."""
    from workshop import preflight

    # As workshop train does before DeepSpeed builds anything: an arch list DeepSpeed can parse (some
    # H100 images set "9.0a", on which its op builder crashes), for the child to inherit.
    with _quiet(preflight.__name__):
        preflight.fix_cuda_arch_list()
    code = f"from deepspeed.ops.op_builder.all_ops import ALL_OPS; ALL_OPS[{op!r}].load(verbose=False)"
    start = time.monotonic()
    status, output = _run([sys.executable, "-c", code], timeout=1800)
    if status == 0:
        cache = os.environ.get("TORCH_EXTENSIONS_DIR", "~/.cache/torch_extensions")
        return Check(op, OK, f"compiled (or found compiled) and loaded in {time.monotonic() - start:.0f} s; jobs with "
                     f"the same TORCH_EXTENSIONS_DIR ({cache}) load it from there; {for_what}")
    tail = " | ".join(line.strip() for line in output.splitlines()[-3:])
    return Check(op, FAIL if needed_by else WARN, f"does not build: {tail[:300]}; {for_what}: "
                 f"{OP_FIX.get(op, 'see ds_report')}")


# ---------------------------------------------------------------------- the Hugging Face cache
def _describe(args) -> str:
    parts = [args.model_name_or_path] if args.model_name_or_path != "none" else []
    if args.tokenizer_name_or_path and args.tokenizer_name_or_path != args.model_name_or_path:
        parts.append(f"tokenizer {args.tokenizer_name_or_path}")
    if args.dataset_name != "none":
        parts.append(args.dataset_name)
    return ", ".join(parts) or "nothing"


def _prefetch_flags(args) -> list[str]:
    flags = ["--model_name_or_path", args.model_name_or_path, "--dataset_name", args.dataset_name]
    if args.tokenizer_name_or_path:
        flags += ["--tokenizer_name_or_path", args.tokenizer_name_or_path]
    if args.from_config:
        flags.append("--from_config")
    if args.dataset_config_name:
        flags += ["--dataset_config_name", args.dataset_config_name]
    return flags


def look_in_cache(args) -> tuple[list[str], str | None]:
    """(what was found, the first thing missing or None), with the hub offline as on a compute
    node: `workshop prefetch --check_only` in a child process (the libraries read the offline
    variables once, at import), or in this process where the hub is already offline."""
    from workshop import prefetch

    if all(prefetch.offline_flags()):
        prefetch.quiet_libraries()
        try:
            return prefetch.check(args), None
        except WorkshopError as error:
            return [], str(error)
        except Exception as error:
            return [], _first_line(error)
    # Most often nothing was fetched yet: the hub cache says so at once, without a child process.
    import huggingface_hub

    for flag, name in (("--model_name_or_path", args.model_name_or_path),
                       ("--tokenizer_name_or_path", prefetch.tokenizer_name(args))):
        if prefetch.from_hub(name):
            try:
                huggingface_hub.snapshot_download(name, local_files_only=True)  # the local cache only
            except Exception:
                return [], f"{flag} {name} is not in the local cache"
    result = subprocess.run([sys.executable, "-m", "workshop", "prefetch", "--check_only", *_prefetch_flags(args)],
                            env={**os.environ, **prefetch.OFFLINE_ENV}, capture_output=True, text=True, timeout=600)
    found = [line.split("in the cache: ", 1)[1] for line in result.stdout.splitlines() if "in the cache: " in line]
    if result.returncode == 0:
        return found, None
    errors = [line[len("error: "):] for line in result.stderr.splitlines() if line.startswith("error: ")]
    return found, errors[-1] if errors else _first_line(result.stderr.strip().splitlines()[-1] if result.stderr.strip()
                                                        else f"exit status {result.returncode}")


def check_hf_cache(args) -> Check:
    prefetch, error = _import("workshop.prefetch")
    if prefetch is None:
        return _not_importable("hf cache", "workshop.prefetch", error)
    tokenizer = prefetch.tokenizer_name(args)
    if not (prefetch.from_hub(args.model_name_or_path) or prefetch.from_hub(tokenizer)
            or prefetch.dataset_source(args)):
        return Check("hf cache", OK, f"nothing to fetch for {_describe(args)}: built from a config, built in or local")
    from workshop import hub  # importable wherever prefetch is

    dataset = args.dataset_name if args.dataset_name in hub.DATASET_SOURCES else None
    fetch = hub.command(args.model_name_or_path, args.tokenizer_name_or_path, args.from_config, dataset,
                        args.dataset_config_name)
    offline_now = all(prefetch.offline_flags())
    found, missing = look_in_cache(args)
    exports = " ".join(f"{key}={value}" for key, value in prefetch.OFFLINE_ENV.items())
    if missing is None:
        state = ("the hub is offline here, as jobs on nodes without internet need it" if offline_now else
                 f"the hub is not set offline here: export {exports} for jobs on nodes without internet")
        return Check("hf cache", OK, f"{'; '.join(found)}: in the cache; {state}")
    if "workshop prefetch" not in missing:
        missing += f": run `{fetch}` on a login node with internet"
    if offline_now:
        if fetch not in missing:
            missing += f"; model and data in one go: `{fetch}`"
        import huggingface_hub

        # "But I did prefetch": then the job looks in another cache than prefetch filled.
        cache = huggingface_hub.constants.HF_HUB_CACHE
        return Check("hf cache", FAIL, f"{missing} (looked in {cache}: prefetch and the jobs need the same HF_HOME)")
    # What is missing, without the offline child's own advice (it was offline; this shell is not).
    missing = missing.split(" and the hub is offline")[0].split(": run `")[0]
    return Check("hf cache", WARN, f"{missing}. The hub is not set offline here, so a job started here downloads it "
                 f"where there is internet; compute nodes without internet cannot: run `{fetch}` on the login "
                 f"node, then export {exports}")


# ------------------------------------------------------------------------------------- bytecode
def uncached_modules() -> list[str]:
    """Source files of the imported modules whose bytecode cache (``__pycache__/*.pyc``) does not exist:
    Python compiles them at every start (after an import, where it may write the cache, none is left)."""
    specs = [getattr(module, "__spec__", None) for module in list(sys.modules.values())]
    return sorted(spec.origin for spec in specs if spec and spec.cached and not os.path.exists(spec.cached))


def _import_root(path: str) -> str:
    """The sys.path entry a module's file lies under (the longest that holds it)."""
    roots = [entry for entry in sys.path if entry and path.startswith(os.path.join(os.path.abspath(entry), ""))]
    return os.path.abspath(max(roots, key=len)) if roots else os.path.dirname(path)


def check_bytecode() -> Check:
    """Whether a job compiles what it imports at every start (workshop.train imported here, as a job does)."""
    train, error = _import("workshop.train")
    if train is None:
        return _not_importable("bytecode", "workshop.train", error)
    uncached = uncached_modules()
    if len(uncached) < UNCACHED_MODULES_WARN:
        return Check("bytecode", OK, f"what a job imports has its bytecode cached ({len(uncached)} modules without)")
    roots = sorted({_import_root(path) for path in uncached})
    why = "PYTHONDONTWRITEBYTECODE is set" if sys.dont_write_bytecode else "Python may not write their __pycache__"
    return Check("bytecode", WARN, f"{len(uncached)} modules the jobs import have no compiled bytecode and {why}: "
                 "every job compiles them again as it starts (seconds each launch); compile them once: "
                 f"{sys.executable} -m compileall -qq -j 0 {' '.join(roots)}")


# ---------------------------------------------------------------------------------------- SLURM
def check_slurm() -> Check:
    """Skipped off a cluster (no sbatch, not in a job); on one, the commands the job scripts use and
    a controller that answers."""
    in_job = bool(os.environ.get("SLURM_JOB_ID"))
    if shutil.which("sbatch") is None and not in_job:
        return Check("slurm", SKIPPED, "not on a SLURM cluster (no sbatch on PATH): the job scripts run here with "
                     "bash, as on a laptop")
    # sbatch submits, srun starts the processes on several nodes, scontrol names the nodes and requeues,
    # squeue shows the jobs, sinfo the partitions (and asks the controller); a job uses all but sbatch.
    needed = ("srun", "scontrol", "squeue", "sinfo") if in_job else ("sbatch", "srun", "scontrol", "squeue", "sinfo")
    missing = [command for command in needed if shutil.which(command) is None]
    if missing:
        return Check("slurm", FAIL, f"{', '.join(missing)} not on PATH: module load slurm, or ask the admins "
                     "where the SLURM commands are")
    status, output = _run(["sinfo", "--noheader", "--format=%P"], timeout=30)
    if status != 0:
        return Check("slurm", FAIL, f"sinfo cannot reach the SLURM controller ({_first_line(output or 'no output')}): "
                     "check SLURM_CONF and that the cluster is up (scontrol ping), or ask the admins")
    _, version = _run(["sbatch", "--version"] if not in_job else ["srun", "--version"])
    partitions = ", ".join(output.split()) or "none listed"
    where = f"inside job {os.environ['SLURM_JOB_ID']}, " if in_job else ""
    return Check("slurm", OK, f"{_first_line(version)}, {where}partitions: {partitions}")


# ------------------------------------------------------------------------------ room under logs/
def run_bytes(model: str) -> tuple[int, str]:
    """(bytes one run of the model writes under logs/, how that was worked out)."""
    if model == "none":
        return MIN_FREE_BYTES, "the floor for any run"
    try:
        from workshop.memory import CHECKPOINT_BYTES_PER_PARAM
        from workshop.shapes import TINY_MODELS, model_shape

        if model in TINY_MODELS:
            return MIN_FREE_BYTES, f"the floor for any run; {model} is tiny"
        n_params = model_shape(model).n_params  # known shapes, local folders, cached configs: never the network
    except Exception:  # not cached yet, or transformers missing (its line above says so)
        return UNKNOWN_MODEL_FREE_BYTES, f"{model}'s size is not known here"
    checkpoint = max(CHECKPOINT_BYTES_PER_PARAM.values())
    needed = max(MIN_FREE_BYTES, n_params * (CHECKPOINTS_KEPT * checkpoint + SAVED_MODEL_BYTES_PER_PARAM))
    return needed, (f"a {model} run: {n_params / 1e6:,.0f}M parameters x ({CHECKPOINTS_KEPT} checkpoints x "
                    f"{checkpoint} + {SAVED_MODEL_BYTES_PER_PARAM} for the saved model) bytes")


def check_logs(logs_root: str, model: str, min_free_gib: float | None) -> Check:
    path = Path(logs_root).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())  # the jobs mkdir -p the rest
    if not os.access(existing, os.W_OK | os.X_OK):
        return Check("logs", FAIL, f"{existing} is not writable, so the jobs cannot create their run folders under "
                     f"{logs_root}: run from a folder you own, or pass --logs_root to the jobs")
    if min_free_gib is not None:
        needed, why = int(min_free_gib * GIB), "--min_free_gib"
    else:
        needed, why = run_bytes(model)
    free = free_bytes(existing)
    state = f"{free / GIB:.1f} GiB free under {logs_root}, {needed / GIB:.1f} GiB needed ({why})"
    if free < needed:
        return Check("logs", FAIL, f"{state}: free some space (old runs under {logs_root}), or point --logs_root at a "
                     "larger disk (a project or scratch file system, not $HOME)")
    return Check("logs", OK, state)


# ----------------------------------------------------------------------------------- the command
def _train_defaults() -> tuple[str | None, str | None]:
    """workshop train's --model_name_or_path and --dataset_name (None where workshop.config does not import)."""
    config, _ = _import("workshop.config")
    if config is None:
        return None, None
    return config.ModelArguments.model_name_or_path, config.DataArguments.dataset_name


def run_checks(args, needs: dict[str, str | None]):
    """Every check, one at a time (a generator, so that each line shows as soon as it is known)."""
    yield from check_versions()
    yield from check_gpu(args.require_gpu, nvcc_needed_by=needs.get("async_io"))
    yield from check_ops(needs, build=args.build_ops)
    if args.model_name_or_path is None or args.dataset_name is None:
        yield Check("hf cache", SKIPPED, "workshop train's defaults are unknown: workshop.config does not import "
                    "(see the packages above)")
    else:
        yield check_hf_cache(args)
    yield check_bytecode()
    yield check_slurm()
    yield check_logs(args.logs_root, args.model_name_or_path or "none", args.min_free_gib)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    model_default, dataset_default = _train_defaults()
    args.model_name_or_path = args.model_name_or_path or model_default
    args.dataset_name = args.dataset_name or dataset_default
    try:
        needs = op_needs(args.deepspeed)
    except WorkshopError as error:  # a wrong path or bad JSON: a bad flag, said before checking anything
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code
    except ImportError:  # torch missing: DeepSpeed's ops are skipped anyway, and torch's line says why
        needs = {"cpu_adam": args.deepspeed, "async_io": args.deepspeed}
    print(f"workshop doctor: what the jobs need on this machine ({platform.node()}, {os.getcwd()})", flush=True)
    counts = {OK: 0, SKIPPED: 0, WARN: 0, FAIL: 0}
    for check in run_checks(args, needs):
        print(check.line(), flush=True)
        counts[check.status] += 1
    verdict = ("every check the jobs here need passes" if not counts[FAIL] else
               "fix the FAIL lines, then run `workshop doctor` again")
    print(f"{counts[OK]} ok, {counts[SKIPPED]} skipped, {counts[WARN]} warn, {counts[FAIL]} FAIL: {verdict}")
    return 1 if counts[FAIL] else 0
