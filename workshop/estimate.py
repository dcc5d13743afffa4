"""``workshop estimate``: predicted GPU and host memory per ZeRO stage, before spending GPU time.

    workshop estimate --model gpt2-large                          # every stage x offload on one 80 GiB GPU
    workshop estimate --model bigscience/bloom-7b1 --num_gpus 8 --gpu_memory_gib 40
    workshop estimate --model path/to/model_or_config.json --deepspeed ds_configs/zero3.json
    workshop estimate --model gpt2-medium --zero_stage none --micro_batch 8 --seq_len 1024

What is predicted, per GPU (all figures in bytes inside, GiB on screen):

* **Model states**, by the ZeRO paper (Rajbhandari et al. 2020, sec. 3.1 and 5): mixed-precision
  Adam keeps 2 bytes of 16-bit parameters, 2 of 16-bit gradients and 12 of optimizer state (fp32
  master copy 4 + momentum 4 + variance 4) per parameter; fp32 training 4 + 4 + 8. Stage 1 divides
  the optimizer state by the number of GPUs, stage 2 the gradients too, stage 3 the parameters too.
  The plain Trainer (no DeepSpeed) keeps fp32 weights, fp32 gradients and Adam: 4 + 4 + 8. Stage 1
  in bf16, as ``ds_configs/zero1.json`` runs it, keeps 4-byte gradients: DeepSpeed's ``BF16_Optimizer``
  (``grad_accum_dtype``).
  ``model_states_bytes()`` gives DeepSpeed's own figures instead (see there for the differences).
* **Activations** saved for the backward pass, per layer ``s*b*h*c1 + b*a*s*s*c2`` bytes
  (s sequence, b micro-batch, h hidden size, a heads). Korthikanti et al. 2022 ("Reducing
  activation recomputation in large transformer models", eq. 2) give c1 = 34, c2 = 5 for a 16-bit
  Megatron GPT layer; that is the fallback for unknown architectures. For the workshop's two
  architectures the coefficients are counted for the Hugging Face code and were checked on an H100
  (bytes saved for backward, per layer, measured with torch.autograd.graph.saved_tensors_hooks):
  see ``ACTIVATION_COEFFICIENTS``. Under torch autocast (the Trainer without DeepSpeed) the
  residual stream and LayerNorm stay fp32. GPT-2's stock GELU, eight elementwise operations, keeps
  their intermediates too (``STOCK_GELU_BYTES``); ``--fast_kernels`` (the default) runs it as one.
* **Logits and loss**: the fp32 log-softmax of the logits and, at the start of backward, its
  gradient and the logits' gradient: 12 bytes x micro-batch x sequence x vocabulary, every
  position a target. ``--fast_kernels`` makes logits only at the targets, so a run with fewer (the
  loss on the answer only, batches shorter than the longest) needs less than this.
* **DeepSpeed buffers**: gradient reduction buckets (``reduce_bucket_size`` 16-bit elements, twice
  with ``overlap_comm``), ZeRO-3 gathered layers, and the optimizer step's temporary copies.

The peak is the larger of two moments: the start of backward (parameters, optimizer state,
all activations and the loss buffers; gradients do not exist yet, the Trainer frees them each
step) and the optimizer step (every state plus the flattened gradient copies). This predicts
``torch.cuda.max_memory_allocated``. ``nvidia-smi`` shows more: the allocator's cache (reserved
minus allocated: measured 2-6 % without DeepSpeed, 15-27 % with it, at one sequence length; with
dynamic padding every batch has its own length, and at micro-batch 16 the cache grew to 0.6-1.1
times the allocated peak on an H200, so the nvidia-smi prediction is then low) plus the CUDA context,
cuBLAS workspaces and loaded kernels (1.75 GiB measured on an H100 with CUDA 13; the bare context
is about 0.5 GiB) and NCCL's buffers (0.4 GiB more whenever torch.distributed is up).

Checked again on one H200 with ``workshop bench`` (2026-12-01, the same versions; gpt2-medium,
micro-batch 16 and 4, dynamic padding, the Trainer and ZeRO 1/2/3 and ZeRO-2 offload, with and
without --fast_kernels, 21 runs): those at micro-batch 16 within 3 % of the allocated peak, those at
micro-batch 4 and the original workshop's settings (fp16, eager attention, padding to 512) within
19 %, all above the prediction (tests/test_estimate.py keeps the micro-batch 16 ones). And for bloom-560m
with its attention through the fused kernel (2026-12-02, 10 runs): at micro-batch 4 the Trainer and
ZeRO 1/2/3 within 10 % (kept there too), ZeRO-2 offload 14 % below the prediction; at micro-batch 16
the prediction is 1.5-1.7x the measured peak, because the loss's term counts a logit for every position
of the longest batch where --fast_kernels computes them at the batch's targets only (for BLOOM's 250,880
words the largest term). ZeRO-1 with its fp32 gradients (BF16_Optimizer, 2026-12-02), at micro-batch 4:
both models within 3 % (kept there too).

Checked on one H100 (torch 2.11, transformers 5.17, DeepSpeed 0.19.8, bf16, sequence 512, the
ds_configs/ settings): gpt2-medium, gpt2-large and bloom-560m, the Trainer in bf16/fp32/eager
attention and ZeRO 0/1/2/3 with and without CPU offload, micro-batch 2-8, 20 runs: every predicted
peak within 3 % of torch.cuda.max_memory_allocated, and the nvidia-smi prediction within 6 %
(tests/test_estimate.py keeps these measurements). Several GPUs were not measured: there the
partitioning follows the paper and DeepSpeed's code, the buffers are DeepSpeed's configured sizes.

Host memory (per node): 1.5 GiB per process for Python, PyTorch and the CUDA libraries, plus, with
CPU offload, DeepSpeed's host buffers counted one by one (``cpu_offload_host_bytes``): 18 bytes per
parameter unpinned, and with ``pin_memory`` each pinned buffer rounded up to a power of two by
PyTorch's pinned-memory allocator. Checked on one H200 node with ``workshop scale`` (bloom-4b8 to
bloom-7b1 shapes, ZeRO-2 and ZeRO-3 offload, pinned and not, 8 runs): every one within 2 % of the
training process's peak resident memory (tests/test_scale.py keeps them). Without CPU offload (and
for NVMe offload, whose swap buffers are not counted) DeepSpeed's own convention
(``model_states_bytes().cpu_bytes``, with its 1.5 buffer factor).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from workshop.errors import WorkshopError
from workshop.shapes import ModelShape, model_shape
from workshop.units import GIB

# Measured on an H100 (CUDA 13, torch 2.11): nvidia-smi minus torch.cuda.memory_reserved at the peak.
CUDA_CONTEXT_BYTES = int(1.75 * GIB)
NCCL_BYTES = int(0.4 * GIB)  # DeepSpeed always starts torch.distributed; so does the Trainer on several GPUs
HOST_PROCESS_BYTES = int(1.5 * GIB)  # RSS of one training process before the model: Python, torch, CUDA libraries
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

# DeepSpeed's defaults where a JSON leaves a key out (deepspeed/runtime/zero/config.py).
DS_DEFAULTS = {"reduce_bucket_size": int(5e8), "contiguous_gradients": True, "stage3_prefetch_bucket_size": int(5e7),
               "stage3_max_live_parameters": int(1e9), "sub_group_size": int(1e9)}

OFFLOAD_CHOICES = ("none", "cpu", "nvme")


# ----------------------------------------------------------------------------------------------
# DeepSpeed's convention
# ----------------------------------------------------------------------------------------------
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
                           ds: "DeepSpeedSettings", offload_param: bool = False) -> int:
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


# ----------------------------------------------------------------------------------------------
# The estimate
# ----------------------------------------------------------------------------------------------
def precision_mode(zero_stage: int | None, precision: str) -> str:
    """How the layers run: 'amp' (autocast over fp32 weights), '16bit' (DeepSpeed's cast model) or 'fp32'."""
    if precision == "fp32":
        return "fp32"
    if precision not in ("bf16", "fp16"):
        raise WorkshopError(f"--precision {precision}: use bf16, fp16 or fp32")
    return "amp" if zero_stage is None else "16bit"


def coefficients(model_type: str, attn_implementation: str, mode: str, fast_kernels: bool = True):
    """(c1, c2) of the activation formula, and whether they were measured for this architecture."""
    attention = "eager" if attn_implementation == "eager" else "sdpa"
    known = (model_type, attention) in ACTIVATION_COEFFICIENTS
    c1, c2 = ACTIVATION_COEFFICIENTS.get((model_type, attention), KORTHIKANTI)[mode]
    if model_type == "gpt2" and not fast_kernels:
        c1 += STOCK_GELU_BYTES[mode]
    return c1, c2, known


def activation_bytes(n_layers: int, hidden: int, heads: int, seq_len: int, micro_batch: int, mode: str = "16bit",
                     model_type: str = "gpt2", attn_implementation: str = "sdpa",
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


def grad_accum_dtype(precision: str) -> str:
    """What ``"grad_accum_dtype": "auto"`` (``ds_configs/zero1.json``) becomes for a run in ``precision``.

    In bf16, fp32: ZeRO-1 then runs DeepSpeed's ``BF16_Optimizer``, which keeps the gradients in one
    flat fp32 buffer, whole, and clips and steps them as one tensor, where the ZeRO optimizer (ZeRO-2's
    too) works through them tensor by tensor; both partition the optimizer states over the GPUs. In fp16
    and fp32, the precision itself: DeepSpeed has no such optimizer there, and an fp32 accumulation would
    only add a copy of every gradient. ``workshop train`` fills it (``ds_preflight.resolve_config``).
    """
    return "fp32" if precision == "bf16" else precision


FP32_NAMES = {"fp32", "float32", "float", "torch.float32"}  # DeepSpeed's names for it (runtime.config.DtypeEnum)


@dataclass(frozen=True)
class DeepSpeedSettings:
    """The few keys of a DeepSpeed JSON that move memory; 'auto' is resolved as the Trainer does."""
    reduce_bucket_size: int = DS_DEFAULTS["reduce_bucket_size"]
    overlap_comm: bool | None = None  # DeepSpeed's default: on for stage 3 only
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = DS_DEFAULTS["stage3_prefetch_bucket_size"]
    max_live_parameters: int = DS_DEFAULTS["stage3_max_live_parameters"]
    sub_group_size: int = DS_DEFAULTS["sub_group_size"]
    # Whether offloaded buffers are page-locked: ds_configs/ pins (these defaults, for estimates without a JSON);
    # DeepSpeed's own default, where a JSON leaves pin_memory out, is not to (from_config).
    pin_optimizer: bool = True
    pin_param: bool = True
    # data_types.grad_accum_dtype: "auto" as in ds_configs/zero1.json (grad_accum_dtype()), None for DeepSpeed's
    # default, the model's own dtype.
    grad_accum_dtype: str | None = "auto"

    @classmethod
    def from_config(cls, ds_config: dict | None, hidden_size: int) -> "DeepSpeedSettings":
        zero = (ds_config or {}).get("zero_optimization") or {}

        def value(key, auto, default):
            v = zero.get(key, default)
            return int(auto) if v == "auto" else int(float(v))

        # The Trainer fills these 'auto' values from the hidden size (transformers.integrations.deepspeed).
        return cls(reduce_bucket_size=value("reduce_bucket_size", hidden_size**2, DS_DEFAULTS["reduce_bucket_size"]),
                   overlap_comm=zero.get("overlap_comm"),
                   contiguous_gradients=bool(zero.get("contiguous_gradients", True)),
                   prefetch_bucket_size=value("stage3_prefetch_bucket_size", 0.9 * hidden_size**2,
                                              DS_DEFAULTS["stage3_prefetch_bucket_size"]),
                   max_live_parameters=value("stage3_max_live_parameters", 1e9,
                                             DS_DEFAULTS["stage3_max_live_parameters"]),
                   sub_group_size=value("sub_group_size", 1e9, DS_DEFAULTS["sub_group_size"]),
                   pin_optimizer=bool((zero.get("offload_optimizer") or {}).get("pin_memory", False)),
                   pin_param=bool((zero.get("offload_param") or {}).get("pin_memory", False)),
                   grad_accum_dtype=(ds_config.get("data_types") or {}).get("grad_accum_dtype") if ds_config
                   else cls.grad_accum_dtype)


def deepspeed_choices(ds_config: dict | None) -> tuple[int | None, str | None, str | None]:
    """(zero stage, optimizer offload device, parameter offload device) of a DeepSpeed JSON; None where absent."""
    if not ds_config:
        return None, None, None
    zero = ds_config.get("zero_optimization") or {}

    def device(key):
        d = (zero.get(key) or {}).get("device")
        return None if d in (None, "none") else d

    return int(zero.get("stage", 0)), device("offload_optimizer"), device("offload_param")


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
    precision: str
    params_bytes: int                # model states by the ZeRO paper's formulas, per GPU
    grads_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    backward_peak_bytes: int         # at the start of backward
    step_peak_bytes: int             # during the optimizer step
    peak_allocated_bytes: int        # the larger: predicts torch.cuda.max_memory_allocated
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
        return "backward" if self.backward_peak_bytes >= self.step_peak_bytes else "optimizer step"

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


def estimate(n_params: int, n_layers: int, hidden: int, heads: int, vocab: int, seq_len: int, micro_batch: int,
             zero_stage: int | None = None, offload_optimizer: str | None = None, offload_param: str | None = None,
             world_size: int = 1, precision: str = "bf16", *, num_nodes: int = 1, model_type: str = "gpt2",
             attn_implementation: str = "sdpa", largest_layer_params: int | None = None,
             deepspeed: DeepSpeedSettings | None = None, gradient_checkpointing: bool = False,
             fast_kernels: bool = True) -> Estimate:
    """Predicted per-GPU and per-node memory for one training configuration (see the module docstring).

    zero_stage None is the Trainer without DeepSpeed (torch autocast over fp32 weights);
    offload_* are None, "cpu" or "nvme"; world_size counts GPUs over all nodes; fast_kernels as
    `workshop train --fast_kernels`.
    """
    offload_optimizer = None if offload_optimizer in (None, "none") else offload_optimizer
    offload_param = None if offload_param in (None, "none") else offload_param
    if zero_stage is None and (offload_optimizer or offload_param):
        raise WorkshopError("--offload needs DeepSpeed: give --zero_stage 1, 2 or 3")
    if offload_param and zero_stage != 3:
        raise WorkshopError("--offload_param needs --zero_stage 3 (only stage 3 partitions the parameters)")
    if world_size % num_nodes:
        raise WorkshopError(f"--num_gpus {world_size} is not a multiple of --num_nodes {num_nodes}")
    P, N = n_params, world_size
    gpus_per_node = world_size // num_nodes
    largest = largest_layer_params if largest_layer_params is not None else vocab * hidden  # the embedding
    ds = deepspeed or DeepSpeedSettings()
    mode = precision_mode(zero_stage, precision)
    mixed = mode != "fp32"
    accumulation = grad_accum_dtype(precision) if ds.grad_accum_dtype == "auto" else ds.grad_accum_dtype
    # DeepSpeed's BF16_Optimizer (engine._do_optimizer_sanity_check): a flat fp32 gradient buffer, kept whole
    bf16_optimizer = (zero_stage == 1 and precision == "bf16" and accumulation in FP32_NAMES
                      and not offload_optimizer)
    acts = activation_bytes(n_layers, hidden, heads, seq_len, micro_batch, mode, model_type, attn_implementation,
                            gradient_checkpointing, fast_kernels)
    loss = logits_bytes(micro_batch, seq_len, vocab)

    # --- model states by the paper's formulas (what the table's "model states" column shows)
    if zero_stage is None:
        params, grads, optim = 4 * P, 4 * P, 8 * P  # fp32 weights and gradients, Adam's two moments
    else:
        p, g, k = (2, 2, 12) if mixed else (4, 4, 8)
        params = p * P / N if zero_stage == 3 else p * P
        grads = g * P / N if zero_stage >= 2 else (4 if bf16_optimizer else g) * P
        optim = k * P / N if zero_stage >= 1 else k * P
        if offload_optimizer:
            optim = 0
        if offload_param:
            params = 0

    # --- what is allocated at the two peak moments (calibrated on an H100, see the module docstring)
    if zero_stage is None:
        # Backward starts with fp32 weights, Adam's moments and autocast's 16-bit weight copies (2 bytes);
        # the gradients are freed at every step (zero_grad set_to_none). The fused AdamW adds no copies.
        backward = 12 * P + (2 * P if mixed else 0) + acts + loss
        step = 16 * P
    else:
        w = 2 if mixed else 4                      # bytes of a working parameter / gradient
        master = 4 if mixed else 0                 # fp32 master copy
        fp32_grad = 4 if mixed else 0              # fp32 gradient partition the optimizer steps on
        partitions = N if zero_stage >= 1 else 1  # stage 0 is plain data parallelism
        optimizer_state = 0 if offload_optimizer else (master + 8) * P / partitions
        bucket = ds.reduce_bucket_size * w if ds.contiguous_gradients else 0
        if zero_stage == 3:
            if offload_param:
                # Measured: one GPU kept the whole 16-bit model anyway (prefetch); DeepSpeed caps the
                # gathered parameters at stage3_max_live_parameters.
                weights = min(w * P / N, w * ds.max_live_parameters)
            else:
                weights = w * P / N
            gathered = 4 * largest + w * ds.prefetch_bucket_size if N > 1 else 0
            grad_buffer = 0 if offload_optimizer else w * P / N  # allocated at init, on the CPU with offload
            resident = weights + grad_buffer + optimizer_state + bucket + gathered
            backward = resident + acts + loss
            step = resident + (0 if offload_optimizer else (w + fp32_grad) * min(P / N, ds.sub_group_size))
        elif bf16_optimizer:
            resident = w * P + 4 * P + optimizer_state  # the fp32 gradients live from the start
            backward = resident + acts + loss
            # After backward: the 16-bit gradients, and the all-reduce's flat copy of the fp32 ones in the
            # communication dtype (engine.allreduce_bucket; on one GPU too), at most.
            step = resident + w * P + (4 + w) * P
        else:
            overlap = bool(ds.overlap_comm)
            # Stages 0-2 allocate the reduction bucket(s) at the first gradient, after the loss's
            # buffers are gone: whichever is larger counts.
            buckets = bucket * (2 if overlap else 1) if zero_stage > 0 else 0
            resident = w * P + optimizer_state
            backward = resident + acts + max(loss, buckets)
            if offload_optimizer:
                step = resident + buckets
            else:
                grads16 = w * P if zero_stage < 2 else w * P / N
                flat_copies = (w + fp32_grad) * P / partitions
                step = resident + grads16 + flat_copies
    backward, step = int(backward), int(step)
    peak = max(backward, step)
    uses_deepspeed = zero_stage is not None
    reserved = int(peak * RESERVED_FACTOR["deepspeed" if uses_deepspeed else "trainer"])
    context = CUDA_CONTEXT_BYTES + (NCCL_BYTES if uses_deepspeed or N > 1 else 0)

    # --- host (per node) and NVMe
    if zero_stage is None:
        ds_states = None
        host = gpus_per_node * (HOST_PROCESS_BYTES + 4 * P)  # each process loads the fp32 model first
    else:
        on_cpu = offload_optimizer == "cpu"
        states = model_states_bytes(P, zero_stage, gpus_per_node, num_nodes, offload_optimizer=on_cpu,
                                    offload_param=on_cpu and offload_param == "cpu", largest_layer_params=largest)
        ds_states = states.gpu_bytes if mixed else None
        # With CPU offload DeepSpeed's buffers are counted one by one; otherwise its own estimate (the model loaded).
        buffers = (gpus_per_node * cpu_offload_host_bytes(P, zero_stage, N, largest, ds, offload_param == "cpu")
                   if on_cpu else states.cpu_bytes)
        host = gpus_per_node * HOST_PROCESS_BYTES + buffers
    nvme = 0
    if offload_optimizer == "nvme":
        nvme += 16 * P // num_nodes  # fp32 master, Adam moments and fp32 gradients of this node's partitions
    if offload_param == "nvme":
        nvme += 2 * P // num_nodes

    return Estimate(
        zero_stage=zero_stage, offload_optimizer=offload_optimizer, offload_param=offload_param, world_size=N,
        num_nodes=num_nodes, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
        params_bytes=int(params), grads_bytes=int(grads), optimizer_bytes=int(optim), activations_bytes=acts,
        logits_bytes=loss, backward_peak_bytes=backward, step_peak_bytes=step, peak_allocated_bytes=peak,
        reserved_bytes=reserved, cuda_context_bytes=context, gpu_total_bytes=reserved + context,
        host_bytes=int(host), nvme_bytes=int(nvme), deepspeed_gpu_bytes=ds_states,
        formula=activation_formula(model_type, attn_implementation, mode, fast_kernels))


def estimate_for_shape(shape: ModelShape, seq_len: int, micro_batch: int, zero_stage: int | None = None,
                       offload_optimizer: str | None = None, offload_param: str | None = None, world_size: int = 1,
                       precision: str = "bf16", num_nodes: int = 1, ds_config: dict | None = None,
                       attn_implementation: str | None = None, gradient_checkpointing: bool = False,
                       fast_kernels: bool = True) -> Estimate:
    """``estimate()`` for a ModelShape, with DeepSpeed's bucket sizes taken from its JSON (or its defaults)."""
    return estimate(shape.n_params, shape.n_layers, shape.hidden_size, shape.n_heads, shape.vocab_size, seq_len,
                    micro_batch, zero_stage, offload_optimizer, offload_param, world_size, precision,
                    num_nodes=num_nodes, model_type=shape.model_type,
                    attn_implementation=attn_implementation or shape.attn_implementation,
                    largest_layer_params=shape.largest_layer_params,
                    deepspeed=DeepSpeedSettings.from_config(ds_config, shape.hidden_size),
                    gradient_checkpointing=gradient_checkpointing, fast_kernels=fast_kernels)


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
# (stage, optimizer offload, parameter offload): the workshop's ladder, in its order.
LADDER = [(None, None, None), (0, None, None), (1, None, None), (2, None, None), (2, "cpu", None),
          (3, None, None), (3, "cpu", None), (3, "cpu", "cpu"), (3, "nvme", "nvme")]


def _stage(value: str) -> int | None | str:
    if value in ("none", "all"):
        return None if value == "none" else "all"
    if value in ("0", "1", "2", "3"):
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: use 0, 1, 2, 3, none (no DeepSpeed) or all")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="workshop estimate",
        description="Predicted memory per GPU (model states, activations, logits, DeepSpeed buffers, CUDA context) "
                    "and per node (host), for each ZeRO stage and offload choice, and whether it fits your GPU.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="bigscience/bloom-560m",
                   help="known name (gpt2, gpt2-medium, gpt2-large, gpt2-xl, bloom-560m, bloom-1b7, bloom-3b, "
                        "bloom-7b1, ...), a local model folder, a config.json, or a cached hub name. Works offline "
                        "for the known names.")
    p.add_argument("--zero_stage", type=_stage, default="all", metavar="{0,1,2,3,none,all}",
                   help="0-3, 'none' (the Trainer without DeepSpeed) or 'all' (every rung of the workshop's ladder)")
    p.add_argument("--offload", choices=OFFLOAD_CHOICES + ("all",), default="all",
                   help="where the optimizer state lives (ZeRO-Offload / ZeRO-Infinity): cpu trades GPU memory for "
                        "host memory and time; nvme when host memory is short too")
    p.add_argument("--offload_param", choices=OFFLOAD_CHOICES + ("all",), default="all",
                   help="where the parameters live (stage 3 only): the last resort when the 16-bit weights alone "
                        "do not fit")
    p.add_argument("--deepspeed", default=None,
                   help="a DeepSpeed JSON (e.g. ds_configs/zero2.json): its stage, offload and bucket sizes are "
                        "used (and override --zero_stage/--offload)")
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs per node")
    p.add_argument("--num_nodes", type=int, default=1, help="nodes")
    p.add_argument("--micro_batch", type=int, default=16,
                   help="per-GPU batch (--per_device_train_batch_size). Activations grow linearly with it: halve "
                        "it (and double gradient accumulation) when only activations do not fit")
    p.add_argument("--seq_len", type=int, default=512,
                   help="tokens per sample in the longest batch (--max_seq_length, or less with dynamic padding)")
    p.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16",
                   help="training precision; fp32 doubles activations and removes nothing from the optimizer")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="keep only each layer's input and recompute the rest: activations shrink ~20-30x for "
                        "about a third more compute")
    p.add_argument("--vocab_size", type=int, default=None, help="override the vocabulary size")
    p.add_argument("--attn_implementation", choices=("sdpa", "eager"), default=None,
                   help="attention kernel; default: what workshop train picks for the model (sdpa stores no s x s "
                        "matrix)")
    p.add_argument("--stock_kernels", action="store_true",
                   help="for runs with --fast_kernels false (GPT-2's stock GELU keeps more activations)")
    p.add_argument("--gpu_memory_gib", type=float, default=80.0,
                   help="GPU memory to check the predictions against (H100/A100: 80, A100: 40, V100: 32 or 16)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON instead of a table")
    return p


def _rows(args) -> list[tuple[int | None, str | None, str | None]]:
    def keep(value, wanted):
        return wanted == "all" or (value or "none") == wanted

    rows = [r for r in LADDER if (args.zero_stage == "all" or r[0] == args.zero_stage)
            and keep(r[1], args.offload) and keep(r[2], args.offload_param)]
    if not rows and args.zero_stage != "all":  # an explicit combination off the ladder, e.g. stage 1 + cpu
        optimizer = None if args.offload == "all" else args.offload
        param = None if args.offload_param == "all" else args.offload_param
        rows = [(args.zero_stage, None if optimizer == "none" else optimizer, None if param == "none" else param)]
    return rows


def _offload_label(optimizer: str | None, param: str | None) -> str:
    if not optimizer and not param:
        return "-"
    return f"optimizer {optimizer or '-'}" + (f", params {param}" if param else "")


def format_estimates(shape: ModelShape, estimates: list[Estimate], gpu_gib: float) -> str:
    first = estimates[0]
    lines = [
        f"{shape.name}: {shape.n_params / 1e6:,.1f}M parameters, {shape.n_layers} layers, hidden {shape.hidden_size}, "
        f"{shape.n_heads} heads, vocabulary {shape.vocab_size:,}, attention {shape.attn_implementation}",
        f"micro-batch {first.micro_batch} x {first.seq_len} tokens, {first.precision}, {first.world_size} GPU(s) on "
        f"{first.num_nodes} node(s)",
        "",
        f"| ZeRO stage | offload | model states | activations | logits | peak (PyTorch) | GPU total (nvidia-smi) "
        f"| host per node | fits {gpu_gib:g} GiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for e in estimates:
        stage = "none (Trainer)" if e.zero_stage is None else str(e.zero_stage)
        nvme = f" + {e.nvme_bytes / GIB:.1f} NVMe" if e.nvme_bytes else ""
        fits = "yes" if e.fits(gpu_gib * GIB) else "no"
        if fits == "yes" and e.gpu_total_bytes > 0.9 * gpu_gib * GIB:
            fits = "tight"
        lines.append(f"| {stage} | {_offload_label(e.offload_optimizer, e.offload_param)} "
                     f"| {e.model_states_bytes / GIB:.2f} | {e.activations_bytes / GIB:.2f} "
                     f"| {e.logits_bytes / GIB:.2f} "
                     f"| {e.peak_allocated_bytes / GIB:.2f} | {e.gpu_total_bytes / GIB:.2f} "
                     f"| {e.host_bytes / GIB:.1f}{nvme} | {fits} |")
    lines += [
        "",
        "GiB per GPU unless marked. Model states: the ZeRO paper's bytes per parameter (mixed-precision Adam "
        "2 + 2 + 12, fp32 4 + 4 + 8, the Trainer 4 + 4 + 8), divided as the stage partitions them; ZeRO-1 in bf16 "
        "keeps its gradients in fp32 (2 + 4 + 12, ds_configs/zero1.json).",
        f"Activations: {first.formula}. "
        "Logits: 12 bytes x batch x sequence x vocabulary (fp32 loss and its gradients).",
        "Peak (PyTorch) predicts torch.cuda.max_memory_allocated: the start of backward or the optimizer step, "
        "whichever is larger, DeepSpeed's buckets included. GPU total adds the allocator's cache and the CUDA "
        f"context ({CUDA_CONTEXT_BYTES / GIB:.2f} GiB, +{NCCL_BYTES / GIB:.1f} with NCCL): compare it with nvidia-smi.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag in ("num_gpus", "num_nodes", "micro_batch", "seq_len"):
            if getattr(args, flag) < 1:
                raise WorkshopError(f"--{flag} {getattr(args, flag)}: must be 1 or more")
        ds_config = None
        if args.deepspeed:
            try:
                ds_config = json.loads(Path(args.deepspeed).read_text())
            except (OSError, ValueError) as e:
                raise WorkshopError(f"--deepspeed {args.deepspeed}: cannot read it as JSON ({e})") from None
        shape = model_shape(args.model, args.vocab_size)
        if ds_config is not None:
            rows = [deepspeed_choices(ds_config)]
        else:
            rows = _rows(args)
            if not rows:
                raise WorkshopError("--zero_stage/--offload/--offload_param select nothing: parameter offload needs "
                                    "stage 3, any offload needs DeepSpeed")
        world = args.num_gpus * args.num_nodes
        estimates = [estimate_for_shape(shape, args.seq_len, args.micro_batch, stage, opt, par, world, args.precision,
                                        args.num_nodes, ds_config, args.attn_implementation,
                                        args.gradient_checkpointing, fast_kernels=not args.stock_kernels)
                     for stage, opt, par in rows]
    except WorkshopError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    if args.json:
        print(json.dumps({"model": shape.__dict__, "estimates": [e.gib() for e in estimates]}, indent=2))
    else:
        print(format_estimates(shape, estimates, args.gpu_memory_gib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
