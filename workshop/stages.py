"""The stage registry: every DeepSpeed setting the workshop runs, by name, with its rung and its JSON.

    stages.REGISTRY["zero3_offload"].ds_path   # <repo>/ds_configs/zero3_offload.json
    stages.REGISTRY["zero3_offload"].label     # 'ZeRO-3 + opt cpu'

``workshop bench``, ``workshop scale``, ``workshop estimate``, the report and the out-of-memory advice
read it; tests/test_ds_configs.py checks each entry against its JSON file and its job script.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DS_CONFIGS = REPO / "ds_configs"
RUNGS = ("baseline", "deepspeed_single_gpu", "offload", "multi_node")  # the ladder's folders, in order


@dataclass(frozen=True)
class Stage:
    name: str
    rung: str                       # the folder of the ladder that teaches it
    ds_json: str | None             # its file in ds_configs/; None: the Trainer without DeepSpeed
    zero_stage: int | None = None   # None: no DeepSpeed
    offload_optimizer: str | None = None
    offload_param: str | None = None
    job_script: bool = True         # <rung>/<name>.slurm runs it; the others are variants bench and scale run

    @property
    def ds_path(self) -> Path | None:
        return DS_CONFIGS / self.ds_json if self.ds_json else None

    @property
    def label(self) -> str:
        return label(self.zero_stage, self.offload_optimizer, self.offload_param)


def label(zero_stage: int | None, offload_optimizer: str | None = None, offload_param: str | None = None,
          world_size: int = 1) -> str:
    """'Trainer', 'ZeRO-2', 'ZeRO-3 + opt cpu + params cpu', with ' x8 GPUs' when more than one."""
    text = "Trainer" if zero_stage is None else f"ZeRO-{zero_stage}"
    if offload_optimizer:
        text += f" + opt {offload_optimizer}"
    if offload_param:
        text += f" + params {offload_param}"
    if world_size > 1:
        text += f" x{world_size} GPUs"
    return text


# In the order of GPU memory saved: `workshop estimate` prints the stages with a job script in this order.
REGISTRY: dict[str, Stage] = {stage.name: stage for stage in (
    Stage("baseline", "baseline", None),
    Stage("zero0", "deepspeed_single_gpu", "zero0.json", 0),
    Stage("zero1", "deepspeed_single_gpu", "zero1.json", 1),
    Stage("zero2", "deepspeed_single_gpu", "zero2.json", 2),
    Stage("zero2_offload", "offload", "zero2_offload.json", 2, "cpu"),
    Stage("zero3", "deepspeed_single_gpu", "zero3.json", 3),
    Stage("zero3_offload", "offload", "zero3_offload.json", 3, "cpu"),
    Stage("zero3_offload_all", "offload", "zero3_offload_all.json", 3, "cpu", "cpu"),
    Stage("zero3_nvme", "offload", "zero3_nvme.json", 3, "nvme", "nvme"),
    # The same with the offloaded buffers not pinned, and ZeRO-1 offloaded: no rung teaches them.
    Stage("zero1_offload", "offload", "zero1_offload.json", 1, "cpu", job_script=False),
    Stage("zero1_offload_nopin", "offload", "zero1_offload_nopin.json", 1, "cpu", job_script=False),
    Stage("zero2_offload_nopin", "offload", "zero2_offload_nopin.json", 2, "cpu", job_script=False),
    Stage("zero3_offload_nopin", "offload", "zero3_offload_nopin.json", 3, "cpu", job_script=False),
)}
