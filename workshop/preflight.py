"""Checks before anything is written: the machine offers what the run needs, or the run stops in one line.

``workshop train`` runs them once the model's size and the data are known, before the run folder is
made and before DeepSpeed builds anything: the GPU count, room under the run folder, the sequence
length against the model's positions, host memory and NVMe room for offloaded states, DeepSpeed's
async_io op (libaio) for NVMe offload, and a CUDA arch list DeepSpeed's op builder can parse.
Each raises ``WorkshopError`` with one line that names the flag or file and the fix.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import psutil
import torch

from workshop import memory
from workshop import model as models
from workshop.errors import WorkshopError
from workshop.units import GIB, MIB

logger = logging.getLogger(__name__)

# What DeepSpeed's op builder parses in TORCH_CUDA_ARCH_LIST (ops/op_builder/builder.py,
# compute_capability_args: int() of each dot-separated part, "+PTX" stripped). "9.0a" is valid for
# PyTorch but makes DeepSpeed crash with "invalid literal for int() with base 10: '0a'".
_PARSABLE_ARCH = re.compile(r"\d+\.\d+(\+PTX)?")


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists: where the run folder will be created."""
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_run_dir(run_dir: Path) -> None:
    if (run_dir / "metrics.json").exists():
        raise WorkshopError(f"--run_dir {run_dir} already holds a finished run: give a new --run_dir or remove it")
    parent = _nearest_existing(run_dir)
    if not parent.is_dir():  # --run_dir some_file/run, or --logs_root naming a file
        raise WorkshopError(f"--run_dir {run_dir}: {parent} is a file, not a folder: choose another --run_dir "
                            "or --logs_root")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise WorkshopError(f"--run_dir {run_dir}: {parent} is not writable: choose a folder you can write to "
                            "(--run_dir or --logs_root)")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB else f"{n_bytes / MIB:.1f} MiB"


def check_room(run_dir: Path, n_params: int, training_args, save_model: bool) -> None:
    """The run folder's disk has room for at least one checkpoint and the saved model.

    A full disk otherwise shows up only when the first checkpoint is written, an epoch into the run.
    """
    saves = training_args.save_strategy != "no" or training_args.save_minutes
    needed = min(memory.CHECKPOINT_BYTES_PER_PARAM.values()) * n_params if saves else 0
    if save_model:  # 16-bit under DeepSpeed (ZeRO-3 consolidates to 16-bit), else the fp32 weights
        needed += (2 if training_args.deepspeed and training_args.precision in ("bf16", "fp16") else 4) * n_params
    where = _nearest_existing(run_dir)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise WorkshopError(f"--run_dir {run_dir}: {where} has {_size(free)} free but this run writes at least "
                            f"{_size(needed)} (a checkpoint with optimizer states and the final model of "
                            f"{n_params / 1e6:.1f}M parameters): free some space, choose another --run_dir or "
                            "--logs_root, or use --save_strategy no")


def check_gpu_count() -> None:
    """More processes on this node than GPUs it can see fails deep in CUDA ("invalid device ordinal")."""
    if not torch.cuda.is_available():
        return  # CPU processes (gloo) need no GPU each
    local = (os.environ.get("LOCAL_WORLD_SIZE")  # torchrun
             or os.environ.get("LOCAL_SIZE"))  # the deepspeed launcher
    asked = int(local) if local else int(os.environ.get("LOCAL_RANK", "0")) + 1
    visible = torch.cuda.device_count()
    if asked > visible:
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={shown})" if shown is not None else ""
        raise WorkshopError(f"{asked} training processes on this node but only {visible} GPU(s) visible{shown}: "
                            f"start at most {visible} (torchrun --nproc_per_node {visible}, NPROC_PER_NODE="
                            f"{visible} for the job scripts) or ask SLURM for {asked} (#SBATCH --gres=gpu:{asked})")


def check_lengths(data_args, config) -> None:
    limit = models.max_positions(config)
    if limit is not None and data_args.max_seq_length > limit:
        raise WorkshopError(f"--max_seq_length {data_args.max_seq_length} is longer than the model's {limit} "
                            f"positions: use --max_seq_length {limit} or less")


def check_host_memory(needed_bytes: int, source: str) -> None:
    """The node has ``needed_bytes`` of host memory available for the offloaded states."""
    available = psutil.virtual_memory().available
    if needed_bytes > available:
        raise WorkshopError(f"{source} offloads about {needed_bytes / GIB:.1f} GiB to host memory but this node has "
                            f"{available / GIB:.1f} GiB available; ask for more (#SBATCH --mem), spread the job "
                            "over more nodes, or offload to NVMe (ds_configs/zero3_nvme.json)")


def check_nvme_path(nvme_path: str, needed_bytes: int) -> None:
    """``nvme_path`` is a writable folder with room for ``needed_bytes``."""
    flag = f"--nvme_path {nvme_path}"
    path = Path(nvme_path)
    if not path.exists():
        raise WorkshopError(f"{flag} does not exist; create it (mkdir -p {nvme_path}) on the node's local NVMe disk")
    if not path.is_dir():
        raise WorkshopError(f"{flag} is not a folder; pass a folder on the node's local NVMe disk")
    try:  # a real write: permissions, read-only mounts and quotas all show up here
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise WorkshopError(f"{flag} is not writable ({error.strerror}); pass a folder you own, "
                            "e.g. /local/nvme/$USER") from None
    free = shutil.disk_usage(path).free
    if free < needed_bytes:
        raise WorkshopError(f"{flag} has {free / GIB:.1f} GiB free but ZeRO-Infinity will write about "
                            f"{needed_bytes / GIB:.1f} GiB there; free some space or pass a larger disk")


def check_async_io(source: str) -> None:
    """DeepSpeed's async_io op, which NVMe offload reads and writes through, can be built here."""
    from deepspeed.ops.op_builder import AsyncIOBuilder

    if not AsyncIOBuilder().is_compatible():
        raise WorkshopError(f"{source} offloads to NVMe, which needs DeepSpeed's async_io op and so libaio: "
                            "apt-get install libaio-dev (dnf install libaio-devel on RHEL/Rocky), "
                            "or use a CPU offload config such as ds_configs/zero3_offload_all.json")


def fix_cuda_arch_list() -> str | None:
    """Give DeepSpeed's op builder a TORCH_CUDA_ARCH_LIST it can parse; returns the value set, if any.

    Unset, the list is probed per op build (which fails in forked workers); with entries such as
    "9.0a" (set by some H100 images) the build crashes. Both get the visible GPUs' capabilities.
    """
    if not torch.cuda.is_available():
        return None
    current = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    entries = [entry for entry in current.replace(" ", ";").split(";") if entry]  # DeepSpeed splits the same way
    if entries and all(_PARSABLE_ARCH.fullmatch(entry) for entry in entries):
        return None
    capabilities = {torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}
    value = ";".join(f"{major}.{minor}" for major, minor in sorted(capabilities))
    os.environ["TORCH_CUDA_ARCH_LIST"] = value
    if current:
        logger.warning("TORCH_CUDA_ARCH_LIST=%s cannot be parsed by DeepSpeed's op builder; using %s", current, value)
    else:
        logger.info("TORCH_CUDA_ARCH_LIST set to %s (the visible GPUs) for DeepSpeed's op builds", value)
    return value


def check_resources(config: dict, n_params: int, training_args, num_nodes: int, source: str) -> None:
    """What the machine must offer for this config: host memory, NVMe room, async_io, an arch list."""
    half_precision = bool(training_args.fp16 or training_args.bf16)
    for where, needed_bytes in memory.offloaded_bytes(config, n_params, half_precision, num_nodes).items():
        if where == "cpu":
            check_host_memory(needed_bytes, source)
        else:
            check_nvme_path(where, needed_bytes)
            check_async_io(source)
    fix_cuda_arch_list()
