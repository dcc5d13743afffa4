"""GPU and host memory of a training run, predicted from the model's shape and a few settings.

    memory.predict(shapes.model_shape("gpt2-medium"), memory.Settings(seq_len=512, micro_batch=4, zero_stage=2))

``workshop estimate`` prints these predictions, ``workshop train`` fits its default micro-batch to the
GPU with them and words its out-of-memory advice, and the report puts them beside what a run measured.
What is predicted, per GPU (all figures in bytes inside, GiB on screen):

* **Model states**, by the ZeRO paper (Rajbhandari et al. 2020, sec. 3.1 and 5): ``BYTES_PER_PARAM``
  below, divided by the number of GPUs as the stage partitions them (``PARTITIONED``).
  ``model_states_bytes()`` gives DeepSpeed's own figures instead (see there for the differences).
* **Activations** saved for the backward pass, per layer ``s*b*h*c1 + b*a*s*s*c2`` bytes
  (s sequence, b micro-batch, h hidden size, a heads). Korthikanti et al. 2022 ("Reducing
  activation recomputation in large transformer models", eq. 2) give c1 = 34, c2 = 5 for a 16-bit
  Megatron GPT layer; that is the fallback for unknown architectures. For the workshop's two
  architectures the coefficients are counted for the Hugging Face code and measured (bytes saved
  for backward, per layer, with torch.autograd.graph.saved_tensors_hooks): ``ACTIVATION_COEFFICIENTS``.
  Under torch autocast (the Trainer without DeepSpeed) the residual stream and LayerNorm stay fp32.
  GPT-2's stock GELU, eight elementwise operations, keeps their intermediates too
  (``STOCK_GELU_BYTES``); ``--fast_kernels`` (the default) runs it as one.
* **Logits and loss**: the fp32 log-softmax of the logits and, at the start of backward, its
  gradient and the logits' gradient: 12 bytes x micro-batch x positions x vocabulary. The positions
  are every token of the sequence, or with ``--fast_kernels`` (logits only where the loss has a
  target) the targets per sample: ``Settings.targets_per_sample``, which `workshop train` and the
  report take from the run's data (the most targets any sample has) and `workshop estimate` from
  ``--targets_per_sample`` (default: every position a target, the most a batch can need).
* **DeepSpeed buffers**: gradient reduction buckets (``reduce_bucket_size`` 16-bit elements, twice
  with ``overlap_comm``), ZeRO-3 gathered layers, the optimizer step's temporary copies, and with
  optimizer offload what handing the gradients to the CPU takes (``gpu_peaks``).
* **The rest**: 64 MiB allocated at every stage besides the model states and DeepSpeed's buffers,
  measured (``LIBRARY_WORKSPACE_BYTES``).

The peak is the largest of three moments: the start of backward (parameters, optimizer state,
all activations and the loss buffers; gradients do not exist yet, the Trainer frees them each
step), with optimizer offload the end of backward, where DeepSpeed hands the gradients to the
offloaded optimizer, and the optimizer step (every state plus the flattened gradient copies).
This predicts ``torch.cuda.max_memory_allocated``. ``nvidia-smi`` shows more: the allocator's cache (reserved
minus allocated: 2-6 % without DeepSpeed, 15-27 % with it, at one sequence length; with dynamic
padding every batch has its own length, and at micro-batch 16 the cache reaches 0.6-1.1 times the
allocated peak, so the nvidia-smi prediction is then low) plus the CUDA context, cuBLAS workspaces
and loaded kernels (1.75 GiB with CUDA 13; the bare context is about 0.5 GiB) and NCCL's buffers
(0.4 GiB more whenever torch.distributed is up). tests/test_estimate.py holds the H100 and H200
measurements the predictions are checked against, all on one GPU: on several, the partitioning
follows the paper and DeepSpeed's code, and the buffers are DeepSpeed's configured sizes.

Host memory (per node): 1.5 GiB per process for Python, PyTorch and the CUDA libraries, plus, with
CPU offload, DeepSpeed's host buffers counted one by one (``cpu_offload_host_bytes``): 18 bytes per
parameter unpinned, and with ``pin_memory`` each pinned buffer rounded up to a power of two by
PyTorch's pinned-memory allocator (tests/test_scale.py holds the measurements). Without CPU offload
(and for NVMe offload, whose swap buffers are not counted) DeepSpeed's own convention
(``model_states_bytes().cpu_bytes``, with its 1.5 buffer factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

from workshop import distributed, stages
from workshop.ds_config import deepspeed_choices, grad_accum_dtype
from workshop.errors import WorkshopError
from workshop.shapes import ModelShape
from workshop.units import GIB

# Bytes per parameter of the model states, and which of them each stage divides by the number of GPUs N
# (the ZeRO paper, sec. 3.1: mixed-precision Adam keeps 16-bit parameters and gradients, and an fp32
# master copy 4 + momentum 4 + variance 4):
#
#   stage      parameters   gradients   optimizer states   divided by N
#   Trainer    4 (fp32)     4 (fp32)    8 (Adam)           -             torch autocast over fp32 weights
#   ZeRO-0     2            2           12                 -
#   ZeRO-1     2            2           12                 optimizer states (in bf16 the gradients: 4)
#   ZeRO-2     2            2           12                 optimizer states, gradients
#   ZeRO-3     2            2           12                 optimizer states, gradients, parameters
#
# DeepSpeed in fp32 keeps 4 + 4 + 8 (no master copy). ZeRO-1 in bf16, as ds_configs/zero1.json runs it,
# keeps its gradients in fp32, whole (DeepSpeed's BF16_Optimizer).
BYTES_PER_PARAM = {"trainer": (4, 4, 8), "mixed": (2, 2, 12), "fp32": (4, 4, 8)}
BF16_OPTIMIZER_GRAD_BYTES = 4
PARTITIONED = {0: (False, False, False), 1: (False, False, True), 2: (False, True, True), 3: (True, True, True)}
# What optimizer offload moves off the GPU: the fp32 master copy and Adam's moments (12) and the fp32
# gradient partition the optimizer steps on (4), as DeepSpeed's estimators count them.
OFFLOADED_OPTIMIZER_BYTES = 16
# A checkpoint per parameter: the weights as trained and the optimizer's state, no gradients. The
# Trainer's: fp32 weights 4 + Adam's moments 8 = 12; DeepSpeed's in 16 bits: 2 + 12 = 14.
CHECKPOINT_BYTES_PER_PARAM = {mode: weights + optim for mode, (weights, _, optim) in BYTES_PER_PARAM.items()}

# Measured on an H100 (CUDA 13, torch 2.11): nvidia-smi minus torch.cuda.memory_reserved at the peak.
CUDA_CONTEXT_BYTES = int(1.75 * GIB)
NCCL_BYTES = int(0.4 * GIB)  # DeepSpeed always starts torch.distributed; so does the Trainer on several GPUs
HOST_PROCESS_BYTES = int(1.5 * GIB)  # RSS of one training process before the model: Python, torch, CUDA libraries
# Allocated between steps beyond the model states and DeepSpeed's buffers, the same at every stage
# (BENCHMARKS.md's memory sweep on an H100, gpt2-medium: 0.063-0.066 GiB in steps.jsonl's gpu_allocated_gib).
LIBRARY_WORKSPACE_BYTES = 64 * 2**20
# DeepSpeed's stage 3 takes a gradient's norm in fp64 this many elements at a time (_constant_buffered_norm2).
NORM_CHUNK = 250_000_000
# torch.cuda.memory_reserved / max_memory_allocated at the peak, measured: 1.03-1.06 (Trainer), 1.15-1.27 (DeepSpeed).
RESERVED_FACTOR = {"trainer": 1.05, "deepspeed": 1.2}

# Bytes saved for backward per transformer layer: (c1 per s*b*h, c2 per b*a*s^2), by how the layer runs.
#   "amp":   fp32 weights under torch autocast (the Trainer with --precision bf16/fp16, no DeepSpeed)
#   "16bit": the model itself in bf16/fp16 (DeepSpeed casts it)
#   "fp32":  no mixed precision
# 'sdpa' stores no s x s attention matrix (fused kernel); 'eager' does (softmax output, dropout).
# GPT-2 as the workshop runs it (--fast_kernels): its GELU is one kernel that keeps only its input.
ACTIVATION_COEFFICIENTS = {
    # GPT-2, sdpa: ln 4+4, qkv 2+6, attention out 2+2, two dropout masks 1+1, fc in 2, proj in 8,
    # plus rounding: 42 measured under autocast, 39 in 16-bit; fp32 counted from the stock figure.
    ("gpt2", "sdpa"): {"amp": (42, 0), "16bit": (39, 0), "fp32": (74, 0)},
    # eager adds the attention matrix: softmax out (fp32 under autocast), dropout mask, dropout out.
    # amp and 16bit measured; fp32 counted (4 + 1 + 4), not measured.
    ("gpt2", "eager"): {"amp": (42, 6.5), "16bit": (39, 4.5), "fp32": (74, 9)},
    # BLOOM has no fused attention in transformers: fp32 softmax output (4) + its 16-bit copy (2).
    # Its GELU is one autograd function that saves only its input. All three measured.
    ("bloom", "eager"): {"amp": (36, 6), "16bit": (32, 6), "fp32": (64, 4)},
    # The workshop's BLOOM attention through the fused kernel (model.use_sdpa_for_bloom_attention): eager's
    # per-token bytes (the kernel keeps query, key, value and its output, as the library's products do) and
    # no s x s matrix per layer; ALiBi and the mask are one s x s tensor for the whole model, left out.
    # Counted so; the predictions it gives measured at every stage (tests/test_estimate.py, H200_MEASURED).
    ("bloom", "sdpa"): {"amp": (36, 0), "16bit": (32, 0), "fp32": (64, 0)},
}
KORTHIKANTI = {"amp": (34, 5), "16bit": (34, 5), "fp32": (68, 10)}  # fp32: the 16-bit figure doubled
# --fast_kernels false: GPT-2's stock GELU, eight elementwise operations, keeps their intermediates
# too (measured: 90 under autocast, 62 in 16-bit, per s*b*h).
STOCK_GELU_BYTES = {"amp": 48, "16bit": 23, "fp32": 48}
# Bytes per layer and token*hidden kept with --gradient_checkpointing: the layer's input only.
CHECKPOINT_INPUT_BYTES = {"amp": 4, "16bit": 2, "fp32": 4}
LOSS_BYTES_PER_LOGIT = 12  # fp32 log-softmax output + its gradient + the logits' gradient

# DeepSpeed's defaults where a JSON leaves a key out, or sets 'auto' where the Trainer fills nothing
# (deepspeed/runtime/zero/config.py and offload_config.py; offloaded buffers are pinned by default since
# deepspeed 0.19, the versions requirements.txt names).
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "overlap_comm": None, "contiguous_gradients": True,
               "stage3_prefetch_bucket_size": int(5e7), "stage3_max_live_parameters": int(1e9),
               "sub_group_size": int(1e9), "pin_memory": True}


# DeepSpeed's own convention ----------------------------------------------------------------------------------
class ModelStates(NamedTuple):
    gpu_bytes: int  # per GPU
    cpu_bytes: int  # per node


def model_states_bytes(n_params: int, zero_stage: int, num_gpus_per_node: int = 1, num_nodes: int = 1,
                       offload_optimizer: bool = False, offload_param: bool = False, largest_layer_params: int = 0,
                       zero_init: bool = True, additional_buffer_factor: float = 1.5) -> ModelStates:
    """Model-state memory exactly as DeepSpeed estimates it (bf16/fp16 mixed precision with Adam).

    Stage 2 equals ``deepspeed.runtime.zero.stage_1_and_2.estimate_zero2_model_states_mem_needs``,
    stage 3 ``deepspeed.runtime.zero.stage3.estimate_zero3_model_states_mem_needs`` (same inputs,
    same integer rounding). Differences from the paper's pure numbers, all DeepSpeed's:

    * 18 bytes per parameter are partitioned, not the paper's 2 + 12 (stage 2) or 16 (stage 3):
      DeepSpeed also counts its fp32 copy of the gradient partition (4 bytes) that the optimizer
      steps on. Stage 2 keeps 2 bytes of 16-bit parameters whole; with optimizer offload those
      2 bytes are all it counts on the GPU.
    * ZeRO-3 adds 4 bytes x the largest layer (the gathered 16-bit parameters and gradients of one
      layer), and with parameter offload counts nothing else on the GPU.
    * CPU figures are per node and multiplied by ``additional_buffer_factor`` (1.5): the offloaded
      states (16 or 18 bytes per parameter, or 4 x GPUs when that is larger: every process loads
      the model in fp32), or, without offload, the fp32 model loaded once per GPU (with zero.Init:
      only the largest layer).

    DeepSpeed has no estimate for stages 0 and 1; the same conventions give stage 1 = 2 + 2 bytes
    kept whole (16-bit parameters and gradients) + 16 partitioned, stage 0 = 20 bytes on every GPU.
    """
    total_gpus = num_nodes * num_gpus_per_node
    if zero_stage == 3:
        gpus_factor = 1 / num_nodes
        largest_layer_memory = 4 * largest_layer_params
        if offload_optimizer:
            if offload_param:
                gpu = largest_layer_memory
                cpu = (n_params * 18 * gpus_factor if zero_init
                       else n_params * max(4 * num_gpus_per_node, 18 * gpus_factor)) * additional_buffer_factor
            else:
                gpu = largest_layer_memory + int(2 * n_params / total_gpus)
                cpu = (n_params * 16 * gpus_factor if zero_init
                       else n_params * max(4 * num_gpus_per_node, 16 * gpus_factor)) * additional_buffer_factor
        else:
            gpu = largest_layer_memory + int(18 * n_params / total_gpus)
            cpu = (largest_layer_params if zero_init else n_params) * 4 * num_gpus_per_node * additional_buffer_factor
        return ModelStates(int(gpu), int(cpu))
    if zero_stage in (1, 2):
        whole = 2 if zero_stage == 2 else 4  # stage 1 keeps the 16-bit gradients whole as well
        if offload_optimizer:
            gpu = whole * n_params
            cpu = n_params * max(4 * total_gpus, 16) * additional_buffer_factor
        else:
            partitioned = 18 if zero_stage == 2 else 16
            gpu = whole * n_params + int(partitioned * n_params / total_gpus)
            cpu = n_params * 4 * num_gpus_per_node * additional_buffer_factor
        return ModelStates(int(gpu), int(cpu))
    if zero_stage == 0:
        return ModelStates(20 * n_params, int(n_params * 4 * num_gpus_per_node * additional_buffer_factor))
    raise ValueError(f"zero_stage must be 0, 1, 2 or 3, not {zero_stage!r}")


def host_allocation_bytes(nbytes: float, pinned: bool) -> int:
    """Host memory one allocation takes: PyTorch's pinned-memory allocator (CachingHostAllocator) rounds
    each request up to a power of two; ordinary memory takes what is asked."""
    n = int(nbytes)
    return 1 << (n - 1).bit_length() if pinned and n > 1 else n


# Tensors pinned one by one, of sizes spread evenly on a log scale, take 1/ln 2 times their size on average.
MEAN_POWER_OF_TWO_ROUNDING = 1 / math.log(2)


def cpu_offload_host_bytes(n_params: int, zero_stage: int, world_size: int, largest_layer_params: int,
                           ds: "DeepSpeedSettings", offload_param: bool) -> int:
    """Host memory of one process's buffers under DeepSpeed's CPU optimizer offload, as DeepSpeed 0.19 allocates them.

    Per parameter of the process's partition (P / GPUs), bf16/fp16 mixed precision, DeepSpeed's CPU Adam:

    * Adam's two fp32 moments: 8 bytes, ordinary memory, at every stage;
    * ZeRO-1/2 (``stage_1_and_2.py``): one flat fp32 master partition (4), its 16-bit copy for the way
      back to the GPU (2) and the fp32 gradient partition (4), each pinned with ``pin_memory``, plus
      one pinned 16-bit staging buffer of the largest layer;
    * ZeRO-3 (``stage3.py``): the fp32 master (4, ordinary memory) and the fp32 gradients (4, pinned),
      one allocation per sub-group of ``sub_group_size`` elements, and one flat pinned 16-bit gradient
      partition (2); with parameter offload also the 16-bit parameters twice: once flat (2), and once
      tensor by tensor by ``zero.Init`` (2), which PyTorch's pinned-memory cache keeps once freed.

    That is 18 bytes per parameter unpinned (22 with parameter offload), and more pinned: each pinned
    allocation is rounded up to a power of two (``host_allocation_bytes``), so a flat buffer just past
    one takes nearly twice its size. The Trainer's second parameter group (biases and norms, which take
    no weight decay) is small: one group is counted.
    """
    part = n_params / world_size
    pin = ds.pin_optimizer

    def alloc(nbytes, pinned=pin):
        return host_allocation_bytes(nbytes, pinned)

    total = 8 * part  # Adam's moments
    if zero_stage in (1, 2):
        total += alloc(4 * part) + alloc(2 * part) + alloc(4 * part) + alloc(2 * largest_layer_params)
    else:
        full, rest = divmod(part, ds.sub_group_size)
        sub_groups = [ds.sub_group_size] * int(full) + ([rest] if rest else [])
        total += 4 * part + sum(alloc(4 * n) for n in sub_groups) + alloc(2 * part)
        if offload_param:
            total += alloc(2 * part, ds.pin_param)
            total += 2 * part * (MEAN_POWER_OF_TWO_ROUNDING if ds.pin_param else 1)
    return int(total)


# Activations and the loss ------------------------------------------------------------------------------------
def precision_mode(zero_stage: int | None, precision: str) -> str:
    """How the layers run: 'amp' (autocast over fp32 weights), '16bit' (DeepSpeed's cast model) or 'fp32'."""
    if precision == "fp32":
        return "fp32"
    if precision not in ("bf16", "fp16"):
        raise WorkshopError(f"--precision {precision}: use bf16, fp16 or fp32")
    return "amp" if zero_stage is None else "16bit"


def coefficients(model_type: str, attn_implementation: str, mode: str, fast_kernels: bool):
    """(c1, c2) of the activation formula, and whether they were measured for this architecture."""
    attention = "eager" if attn_implementation == "eager" else "sdpa"
    known = (model_type, attention) in ACTIVATION_COEFFICIENTS
    c1, c2 = ACTIVATION_COEFFICIENTS.get((model_type, attention), KORTHIKANTI)[mode]
    if model_type == "gpt2" and not fast_kernels:
        c1 += STOCK_GELU_BYTES[mode]
    return c1, c2, known


def activation_bytes(n_layers: int, hidden: int, heads: int, seq_len: int, micro_batch: int, mode: str,
                     model_type: str, attn_implementation: str,
                     gradient_checkpointing: bool = False, fast_kernels: bool = True) -> int:
    """Activations saved for backward on one GPU (see ACTIVATION_COEFFICIENTS for the formula)."""
    c1, c2, _ = coefficients(model_type, attn_implementation, mode, fast_kernels)
    sbh = seq_len * micro_batch * hidden
    per_layer = c1 * sbh + c2 * micro_batch * heads * seq_len * seq_len
    if gradient_checkpointing:
        # Each layer keeps its input; one layer at a time is recomputed with its full activations.
        return int(n_layers * CHECKPOINT_INPUT_BYTES[mode] * sbh + per_layer)
    return int(n_layers * per_layer)


def activation_formula(model_type: str, attn_implementation: str, mode: str, fast_kernels: bool = True) -> str:
    attention = "eager" if attn_implementation == "eager" else "sdpa"
    c1, c2, known = coefficients(model_type, attn_implementation, mode, fast_kernels)
    source = f"measured for {model_type}/{attention}" if known else "Korthikanti et al. 2022"
    return f"per layer s*b*h*{c1:g} + b*a*s^2*{c2:g} bytes ({mode}, {source})"


def logits_bytes(micro_batch: int, seq_len: int, vocab_size: int) -> int:
    return LOSS_BYTES_PER_LOGIT * micro_batch * seq_len * vocab_size


FP32_NAMES = {"fp32", "float32", "float", "torch.float32"}  # DeepSpeed's names for it (runtime.config.DtypeEnum)


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The few keys of a DeepSpeed JSON that move memory, as DeepSpeed reads them (from_config)."""
    reduce_bucket_size: int = DS_DEFAULTS["reduce_bucket_size"]
    overlap_comm: bool | None = None  # DeepSpeed's default: on for stage 3 only
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = DS_DEFAULTS["stage3_prefetch_bucket_size"]
    max_live_parameters: int = DS_DEFAULTS["stage3_max_live_parameters"]
    sub_group_size: int = DS_DEFAULTS["sub_group_size"]
    # Whether offloaded buffers are page-locked: ds_configs/ pins, and so does DeepSpeed by default.
    pin_optimizer: bool = True
    pin_param: bool = True
    # data_types.grad_accum_dtype: "auto" as in ds_configs/zero1.json (grad_accum_dtype()), None for DeepSpeed's
    # default, the model's own dtype.
    grad_accum_dtype: str | None = "auto"

    @classmethod
    def from_config(cls, ds_config: dict | None, hidden_size: int) -> "DeepSpeedSettings":
        """The settings DeepSpeed runs with: an 'auto' the Trainer fills takes its value from the hidden size
        (transformers.integrations.deepspeed, trainer_config_finalize); DeepSpeed drops any other 'auto', and
        a key left out or dropped takes DeepSpeed's default."""
        zero = (ds_config or {}).get("zero_optimization") or {}
        filled = {"reduce_bucket_size": hidden_size**2}
        if zero.get("stage") == 3:
            filled["stage3_prefetch_bucket_size"] = 0.9 * hidden_size**2

        def value(key, section=zero):
            v = section.get(key)
            v = filled.get(key) if v == "auto" else v
            return DS_DEFAULTS[key] if v is None else v

        def pinned(part: str) -> bool:
            section = zero.get(part)
            return bool(section) and bool(value("pin_memory", section))

        return cls(reduce_bucket_size=int(float(value("reduce_bucket_size"))),
                   overlap_comm=value("overlap_comm"),
                   contiguous_gradients=bool(value("contiguous_gradients")),
                   prefetch_bucket_size=int(float(value("stage3_prefetch_bucket_size"))),
                   max_live_parameters=int(float(value("stage3_max_live_parameters"))),
                   sub_group_size=int(float(value("sub_group_size"))),
                   pin_optimizer=pinned("offload_optimizer"), pin_param=pinned("offload_param"),
                   grad_accum_dtype=(ds_config.get("data_types") or {}).get("grad_accum_dtype") if ds_config
                   else cls.grad_accum_dtype)


@dataclass(frozen=True)
class Estimate:
    """Predicted memory of one configuration; every figure in bytes, per GPU unless it says host/node."""
    zero_stage: int | None           # None: the Trainer without DeepSpeed
    offload_optimizer: str | None
    offload_param: str | None
    world_size: int
    num_nodes: int
    micro_batch: int
    seq_len: int
    logit_positions: int             # per sample: the targets (--fast_kernels) or every position
    precision: str
    params_bytes: int                # model states by the ZeRO paper's formulas, per GPU
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    backward_peak_bytes: int         # at the start of backward
    reduce_peak_bytes: int           # as the gradients go to an offloaded optimizer (0 without offload)
    step_peak_bytes: int             # during the optimizer step
    peak_allocated_bytes: int        # the largest: predicts torch.cuda.max_memory_allocated
    reserved_bytes: int              # predicts torch.cuda.max_memory_reserved
    cuda_context_bytes: int
    gpu_total_bytes: int             # predicts the nvidia-smi peak: reserved + context
    host_bytes: int                  # per node
    nvme_bytes: int                  # per node
    deepspeed_gpu_bytes: int | None  # DeepSpeed's own model-state estimate (model_states_bytes), for comparison
    formula: str = field(default="")

    @property
    def model_states_bytes(self) -> int:
        return self.params_bytes + self.grads_bytes + self.optimizer_bytes

    @property
    def peak_phase(self) -> str:
        phases = {"backward": self.backward_peak_bytes, "gradients to the offloaded optimizer": self.reduce_peak_bytes,
                  "optimizer step": self.step_peak_bytes}
        return max(phases, key=phases.get)

    def fits(self, gpu_bytes: float) -> bool:
        """Whether the nvidia-smi peak (allocator cache and CUDA context included) fits a GPU of that size."""
        return self.gpu_total_bytes <= gpu_bytes

    def gib(self) -> dict:
        """The figures in GiB, for tables and JSON."""
        out = {k: v for k, v in self.__dict__.items() if not k.endswith("_bytes")}
        for k, v in self.__dict__.items():
            if k.endswith("_bytes"):
                out[k[:-6] + "_gib"] = None if v is None else v / GIB
        out["model_states_gib"] = self.model_states_bytes / GIB
        out["peak_phase"] = self.peak_phase
        return out


@dataclass(frozen=True)
class Settings:
    """What a run's memory depends on besides the model's shape."""
    seq_len: int                        # tokens per sample in the longest batch
    micro_batch: int
    zero_stage: int | None = None       # None: the Trainer without DeepSpeed (torch autocast over fp32 weights)
    offload_optimizer: str | None = None  # None, "cpu" or "nvme"
    offload_param: str | None = None
    world_size: int = 1                 # GPUs over all nodes
    num_nodes: int = 1
    precision: str = "bf16"
    gradient_checkpointing: bool = False
    fast_kernels: bool = True           # as `workshop train --fast_kernels`
    deepspeed: DeepSpeedSettings = field(default_factory=DeepSpeedSettings)
    targets_per_sample: int | None = None  # positions with a target in a sample; None: all seq_len of them

    @property
    def logit_positions(self) -> int:
        """Positions per sample whose logits are made: the targets with --fast_kernels, else every one."""
        if self.fast_kernels and self.targets_per_sample is not None:
            return min(self.targets_per_sample, self.seq_len)
        return self.seq_len

    def __post_init__(self):
        for key in ("offload_optimizer", "offload_param"):
            if getattr(self, key) == "none":
                object.__setattr__(self, key, None)
        if self.zero_stage is None and (self.offload_optimizer or self.offload_param):
            raise WorkshopError("--offload needs DeepSpeed: give --zero_stage 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise WorkshopError("--offload_param needs --zero_stage 3 (only stage 3 partitions the parameters)")
        if self.world_size % self.num_nodes:
            raise WorkshopError(f"--num_gpus {self.world_size} is not a multiple of --num_nodes {self.num_nodes}")

    @property
    def mode(self) -> str:
        return precision_mode(self.zero_stage, self.precision)

    @property
    def bf16_optimizer(self) -> bool:
        """DeepSpeed's BF16_Optimizer (engine._do_optimizer_sanity_check): a flat fp32 gradient buffer, kept whole."""
        ds = self.deepspeed
        accumulation = grad_accum_dtype(self.precision) if ds.grad_accum_dtype == "auto" else ds.grad_accum_dtype
        return (self.zero_stage == 1 and self.precision == "bf16" and accumulation in FP32_NAMES
                and not self.offload_optimizer)


def predict(shape: ModelShape, s: Settings) -> Estimate:
    """Predicted per-GPU and per-node memory of one training configuration (see the module docstring)."""
    mode = s.mode
    acts = activation_bytes(shape.n_layers, shape.hidden_size, shape.n_heads, s.seq_len, s.micro_batch, mode,
                            shape.model_type, shape.attn_implementation, s.gradient_checkpointing, s.fast_kernels)
    loss = logits_bytes(s.micro_batch, s.logit_positions, shape.vocab_size)
    params, grads, optim = paper_model_states(shape.n_params, s)
    phases = gpu_peaks(shape, s, acts, loss)
    peak = max(phases)
    uses_deepspeed = s.zero_stage is not None
    reserved = int(peak * RESERVED_FACTOR["deepspeed" if uses_deepspeed else "trainer"])
    context = CUDA_CONTEXT_BYTES + (NCCL_BYTES if uses_deepspeed or s.world_size > 1 else 0)
    host, ds_states = host_bytes(shape, s)
    return Estimate(
        zero_stage=s.zero_stage, offload_optimizer=s.offload_optimizer, offload_param=s.offload_param,
        world_size=s.world_size, num_nodes=s.num_nodes, micro_batch=s.micro_batch, seq_len=s.seq_len,
        logit_positions=s.logit_positions, precision=s.precision, params_bytes=int(params), grads_bytes=int(grads), optimizer_bytes=int(optim),
        activations_bytes=acts, logits_bytes=loss, backward_peak_bytes=phases.backward,
        reduce_peak_bytes=phases.reduce, step_peak_bytes=phases.step,
        peak_allocated_bytes=peak, reserved_bytes=reserved, cuda_context_bytes=context,
        gpu_total_bytes=reserved + context, host_bytes=int(host), nvme_bytes=int(nvme_bytes(shape.n_params, s)),
        deepspeed_gpu_bytes=ds_states,
        formula=activation_formula(shape.model_type, shape.attn_implementation, mode, s.fast_kernels))


def paper_model_states(n_params: int, s: Settings) -> tuple[float, float, float]:
    """(parameters, gradients, optimizer states) per GPU by the ZeRO paper: the table's "model states"."""
    P, N = n_params, s.world_size
    if s.zero_stage is None:
        p, g, k = BYTES_PER_PARAM["trainer"]
        return p * P, g * P, k * P
    p, g, k = BYTES_PER_PARAM["fp32" if s.mode == "fp32" else "mixed"]
    if s.bf16_optimizer:
        g = BF16_OPTIMIZER_GRAD_BYTES
    params, grads, optim = (b * P / N if divided else b * P for b, divided in zip((p, g, k), PARTITIONED[s.zero_stage]))
    return (0 if s.offload_param else params), grads, (0 if s.offload_optimizer else optim)


class Phases(NamedTuple):
    """GPU bytes allocated at the three moments that can set a run's peak."""
    backward: int  # the start of backward
    reduce: int    # optimizer offload: the gradients handed to the offloaded optimizer (0 without offload)
    step: int      # the optimizer step


def gpu_peaks(shape: ModelShape, s: Settings, acts: int, loss: int) -> Phases:
    """What is allocated at the start of backward, as DeepSpeed hands the gradients to an offloaded
    optimizer, and during the optimizer step, in bytes per GPU (LIBRARY_WORKSPACE_BYTES included)."""
    P, N, L, ds = shape.n_params, s.world_size, shape.largest_layer_params, s.deepspeed
    mixed = s.mode != "fp32"
    base = LIBRARY_WORKSPACE_BYTES
    if s.zero_stage is None:
        # Backward starts with fp32 weights, Adam's moments and autocast's 16-bit weight copies (2 bytes);
        # the gradients are freed at every step (zero_grad set_to_none). The fused AdamW adds no copies.
        return Phases(int(base + 12 * P + (2 * P if mixed else 0) + acts + loss), 0, int(base + 16 * P))
    w = 2 if mixed else 4                      # bytes of a working parameter / gradient
    master = 4 if mixed else 0                 # fp32 master copy
    fp32_grad = 4 if mixed else 0              # fp32 gradient partition the optimizer steps on
    partitions = N if s.zero_stage >= 1 else 1  # stage 0 is plain data parallelism
    optimizer_state = 0 if s.offload_optimizer else (master + 8) * P / partitions
    # ZeRO-1/2 keep their gradients contiguous whenever they offload the optimizer, whatever the JSON says
    contiguous = ds.contiguous_gradients or (bool(s.offload_optimizer) and s.zero_stage < 3)
    bucket = ds.reduce_bucket_size * w if contiguous else 0
    oversized = L > ds.reduce_bucket_size  # a layer larger than the bucket is reduced on its own
    reduce = 0
    if s.zero_stage == 3:
        if s.offload_param:
            # One GPU keeps the whole 16-bit model anyway (prefetch); DeepSpeed caps the gathered
            # parameters at stage3_max_live_parameters.
            weights = min(w * P / N, w * ds.max_live_parameters)
        else:
            weights = w * P / N
        gathered = 4 * L + w * ds.prefetch_bucket_size if N > 1 else 0
        grad_buffer = 0 if s.offload_optimizer else w * P / N  # allocated at init, on the CPU with offload
        resident = weights + grad_buffer + optimizer_state + bucket + gathered
        backward = resident + acts + loss
        step = resident + (0 if s.offload_optimizer else (w + fp32_grad) * min(P / N, ds.sub_group_size))
        if s.offload_optimizer:
            # stage3.partition_grads, at the end of backward (the activations freed): each gradient's
            # partition copied back to the GPU (w), kept until the bucket is done; its norm in fp64 (8,
            # in chunks of NORM_CHUNK), then its fp32 copy for the CPU (4), kept for the bucket when the
            # optimizer swaps to NVMe. A layer larger than the bucket goes alone, its gradient whole beside
            # it (which outweighs any bucket). With the parameters offloaded, the layer just reduced is still
            # gathered.
            part = L / N
            per_layer = max(8 * min(part, NORM_CHUNK), fp32_grad * part)
            largest = w * L + w * part + per_layer if oversized else 0
            b = min(P, ds.reduce_bucket_size) / N  # one bucket's elements on this rank
            if s.offload_optimizer == "nvme":
                rest = (w + fp32_grad) * b + (8 - fp32_grad) * min(part, NORM_CHUNK)
            else:
                rest = w * b + per_layer
            on_gpu = 0 if s.offload_param else w * P / N
            reduce = on_gpu + bucket + gathered + (w * L if s.offload_param else 0) + max(largest, rest)
    elif s.bf16_optimizer:
        resident = w * P + 4 * P + optimizer_state  # the fp32 gradients live from the start
        backward = resident + acts + loss
        # After backward: the 16-bit gradients, and the all-reduce's flat copy of the fp32 ones in the
        # communication dtype (engine.allreduce_bucket; on one GPU too), at most.
        step = resident + w * P + (4 + w) * P
    else:
        # Stages 0-2 allocate the reduction bucket(s) at the first gradient, after the loss's
        # buffers are gone: whichever is larger counts.
        buckets = bucket * (2 if ds.overlap_comm else 1) if s.zero_stage > 0 else 0
        # With optimizer offload, a 16-bit buffer of the largest layer on the GPU (temp_grad_buffer_for_gpu_offload).
        resident = w * P + optimizer_state + (w * L if s.offload_optimizer else 0)
        backward = resident + acts + max(loss, buckets)
        if s.offload_optimizer:
            step = resident + buckets
            # stage_1_and_2.copy_grads_in_partition, gradient by gradient: its norm in fp64, whole (8), then
            # its fp32 copy for the CPU (4). A layer larger than the bucket keeps its 16-bit gradient beside it.
            reduce = resident + buckets + (w * L if oversized else 0) + 8 * L
        else:
            grads16 = w * P if s.zero_stage < 2 else w * P / N
            flat_copies = (w + fp32_grad) * P / partitions
            step = resident + grads16 + flat_copies
    return Phases(int(base + backward), int(base + reduce) if reduce else 0, int(base + step))


def host_bytes(shape: ModelShape, s: Settings) -> tuple[float, int | None]:
    """(host memory per node, DeepSpeed's own GPU model-state figure or None) for this configuration."""
    P, N = shape.n_params, s.world_size
    gpus_per_node = s.world_size // s.num_nodes
    if s.zero_stage is None:
        return gpus_per_node * (HOST_PROCESS_BYTES + 4 * P), None  # each process loads the fp32 model first
    on_cpu = s.offload_optimizer == "cpu"
    states = model_states_bytes(P, s.zero_stage, gpus_per_node, s.num_nodes, offload_optimizer=on_cpu,
                                offload_param=on_cpu and s.offload_param == "cpu",
                                largest_layer_params=shape.largest_layer_params)
    # With CPU offload DeepSpeed's buffers are counted one by one; otherwise its own estimate (the model loaded).
    buffers = (gpus_per_node * cpu_offload_host_bytes(P, s.zero_stage, N, shape.largest_layer_params, s.deepspeed,
                                                      s.offload_param == "cpu")
               if on_cpu else states.cpu_bytes)
    return gpus_per_node * HOST_PROCESS_BYTES + buffers, states.gpu_bytes if s.mode != "fp32" else None


def nvme_bytes(n_params: int, s: Settings) -> int:
    """Bytes per node ZeRO-Infinity writes to NVMe: the optimizer's states, the 16-bit parameters."""
    nvme = 0
    if s.offload_optimizer == "nvme":
        nvme += OFFLOADED_OPTIMIZER_BYTES * n_params // s.num_nodes
    if s.offload_param == "nvme":
        nvme += 2 * n_params // s.num_nodes
    return nvme


def offloaded_bytes(config: dict, n_params: int, half_precision: bool, num_nodes: int = 1) -> dict:
    """Bytes one node keeps off the GPU: {"cpu": n} and/or {<nvme_path>: n}, for ``n_params`` parameters.

    ZeRO partitions the states evenly over all ranks, so a node holds 1/num_nodes of them.
    """
    zero = config.get("zero_optimization") or {}
    sizes = {"offload_optimizer": OFFLOADED_OPTIMIZER_BYTES,
             "offload_param": BYTES_PER_PARAM["mixed" if half_precision else "fp32"][0]}
    needed: dict = {}
    for section, bytes_per_param in sizes.items():
        offload = zero.get(section) or {}
        device = offload.get("device", "none")
        if device == "none":
            continue
        where = "cpu" if device == "cpu" else offload.get("nvme_path")
        if where is None:
            raise WorkshopError(f"zero_optimization.{section} offloads to NVMe but names no folder; "
                                'add "nvme_path": "auto" to it and pass --nvme_path DIR')
        needed[where] = needed.get(where, 0) + bytes_per_param * n_params // num_nodes
    return needed


# workshop train: the micro-batch that fits, and the advice when memory runs out ---------------------------------
class LongestBatch(NamedTuple):
    """The batch a run's prediction assumes, from its data: every sample as long as the longest, as the
    collator pads it, with as many targets as the sample that has the most."""
    seq_len: int
    targets_per_sample: int | None = None  # None: every position a target


def predicted_memory(shape: ModelShape, model_args, training_args, batch: LongestBatch, micro_batch: int) -> Estimate:
    """What `workshop estimate` predicts for a `workshop train` run's settings at this micro-batch."""
    ds = training_args.deepspeed or None
    stage, offload_optimizer, offload_param = deepspeed_choices(ds)
    return predict(shape, Settings(batch.seq_len, micro_batch, stage, offload_optimizer, offload_param,
                                   distributed.world_size(), distributed.num_nodes(), training_args.precision,
                                   training_args.gradient_checkpointing, model_args.fast_kernels,
                                   DeepSpeedSettings.from_config(ds, shape.hidden_size), batch.targets_per_sample))


# The estimate's GPU total (allocator cache and CUDA context included) may use this share of the card.
FIT_SHARE = 0.9


def micro_batch_that_fits(shape: ModelShape, model_args, training_args, batch: LongestBatch, gpu_bytes: float) -> int:
    """The micro-batch, halved until `workshop estimate` puts the run within FIT_SHARE of the GPU (1 at least)."""
    micro = training_args.per_device_train_batch_size
    while micro > 1 and predicted_memory(shape, model_args, training_args, batch,
                                         micro).gpu_total_bytes > FIT_SHARE * gpu_bytes:
        micro //= 2
    return micro


# Where to go when the setup ran out of GPU memory, by its ZeRO stage (None: no DeepSpeed).
NEXT_STAGE = {None: "zero2", 0: "zero2", 1: "zero2", 2: "zero3", 3: "zero3_offload_all"}


def oom_message(shape: ModelShape, model_args, training_args, batch: LongestBatch) -> str:
    """One line: how far memory got, what this setup should need, and the next things to try."""
    import torch

    stage, offload_optimizer, offload_param = deepspeed_choices(training_args.deepspeed or None)
    micro, accum = training_args.per_device_train_batch_size, training_args.gradient_accumulation_steps
    predicted = predicted_memory(shape, model_args, training_args, batch, micro)
    peak = torch.cuda.max_memory_reserved() / GIB if torch.cuda.is_available() else float("nan")
    card = torch.cuda.get_device_properties(0).total_memory / GIB if torch.cuda.is_available() else float("nan")
    # what this setup does not do yet, cheapest first
    steps = []
    if micro > 1:
        steps.append(f"--per_device_train_batch_size {micro // 2} --gradient_accumulation_steps {accum * 2} "
                     "(same global batch)")
    if not training_args.gradient_checkpointing:
        steps.append("--gradient_checkpointing")
    following = stages.REGISTRY[NEXT_STAGE[stage]]
    if (following.zero_stage, following.offload_optimizer, following.offload_param) != (
            stage, offload_optimizer, offload_param):
        steps.append(f"ds_configs/{following.ds_json}" + (" on several GPUs" if stage is None else ""))
    if not offload_optimizer:
        steps.append(f"CPU offload (ds_configs/{stages.REGISTRY['zero3_offload'].ds_json})")
    if not steps:
        steps.append("more GPUs (multi_node/: ZeRO-3 divides the model states over them)")
    return (f"out of GPU memory (reserved {peak:.1f} GiB of the card's {card:.1f} GiB; `workshop estimate` predicts "
            f"{predicted.peak_allocated_bytes / GIB:.1f} GiB allocated for this setup): try {', then '.join(steps)}")
