"""One entry point, however it is started: python, torchrun, the deepspeed launcher or srun.

torchrun and the deepspeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT.
Plain ``python`` sets none of them, and DeepSpeed then falls back to MPI discovery and fails with
"cannot load MPI library". ``srun python`` without torchrun sets only SLURM_* values.
``init_env`` fills the missing variables before anything touches torch.distributed.
"""

from __future__ import annotations

import os
import socket
import subprocess


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_env(deepspeed: bool) -> str:
    """Make RANK/WORLD_SIZE/... present where needed; returns how the process was started.

    A single process without DeepSpeed stays non-distributed (no process group at all).
    """
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return "launcher"  # torchrun / deepspeed / a job script that already set them
    ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if "SLURM_PROCID" in os.environ and ntasks > 1:
        # `srun python -m workshop train` with one task per process.
        nodelist = os.environ["SLURM_JOB_NODELIST"]
        head = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                              check=True).stdout.split()[0]
        os.environ.update(RANK=os.environ["SLURM_PROCID"], WORLD_SIZE=str(ntasks),
                          LOCAL_RANK=os.environ.get("SLURM_LOCALID", "0"), MASTER_ADDR=head)
        # Every task derives the same port from the job id, so none has to tell the others.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return "srun"
    if not deepspeed:
        return "single process"
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    return "single process"


def init_deepspeed_comm() -> None:
    """Give DeepSpeed the process group accelerate made.

    On GPUs accelerate starts DeepSpeed's communication itself; on CPU processes (gloo) it starts
    only torch.distributed, and DeepSpeed would then count a world of 1 and reject the batch size.
    """
    import deepspeed
    from deepspeed import comm

    if not comm.is_initialized():
        deepspeed.init_distributed(auto_mpi_discovery=False)


def shutdown() -> None:
    """Leave torch.distributed together, once every rank is done.

    Left to interpreter exit, gloo's worker threads can still hold finished work whose tensors are
    freed while the interpreter is torn down, and the rank aborts ("terminate called without an
    active exception", SIGABRT) after a run that otherwise succeeded (pytorch/pytorch#179291).
    The barrier keeps the first rank done from leaving while another still talks to it. This narrows
    that window but does not close it: the process entry point (cli.end_process) then ends the
    process without the interpreter's teardown.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def leave_on_error() -> None:
    """Drop this rank's process group on the way out of an error, without waiting for the other ranks.

    Left to interpreter exit, NCCL warns after the error line that the group was never destroyed;
    a barrier could wait for a rank that never comes.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def local_world_size() -> int:
    return int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")))


def num_nodes() -> int:
    return max(1, world_size() // max(1, local_world_size()))


def is_main() -> bool:
    return rank() == 0


def print0(*args, **kwargs) -> None:
    """Print once, on rank 0 (nanochat's print0)."""
    if is_main():
        print(*args, **kwargs, flush=True)


def broadcast(value):
    """Rank 0's value on every rank (identity in a single process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
