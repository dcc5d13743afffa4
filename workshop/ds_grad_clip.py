"""``--foreach_grad_clip``: DeepSpeed's per-tensor gradient work at ZeRO-1/2 as multi-tensor operations.

ZeRO-1 in bf16 (``ds_configs/zero1.json``) runs DeepSpeed's ``BF16_Optimizer``. After each backward
it adds every bf16 gradient into its fp32 buffer with a conversion to fp32 and an ``add_`` per
tensor (``update_hp_grads``); each step it takes the norm with one ``norm`` per tensor and scales
the gradients with one ``mul_`` per tensor (``deepspeed.runtime.utils.get_global_norm_of_tensors``
and ``clip_tensors_by_global_norm``): for gpt2-medium's 292 tensors, 1,168 operations a step, each
launched from Python, the ``mul_`` ones after the optimizer has waited for the GPU to report
the norm, so the GPU idles while they are launched. The ``Trainer`` without DeepSpeed clips with
``torch.nn.utils.clip_grad_norm_``, which does the same arithmetic with ``torch._foreach_norm`` and
``torch._foreach_mul_``: a few launches in all.

ZeRO-2 (and ZeRO-1 with bf16 gradients or in fp16) runs DeepSpeed's ZeRO optimizer, whose
``get_grad_norm_direct`` copies each gradient tensor to fp64 and takes its norm, two launches per
tensor, and writes the fp64 copies out in full (8 bytes per parameter, every step).

``use(True)`` gives ``BF16_Optimizer`` and the ZeRO optimizer the functions below; they compute the
same sums (the bf16 gradient added to the fp32 one; the L2 norm of the per-tensor L2 norms, in fp32,
or in DeepSpeed's norm type for the ZeRO optimizer, an inf or NaN norm marked -1 as DeepSpeed marks
it) and the same scaling. Expert and model parallelism, and norms other than L2, go to DeepSpeed's
own code wherever DeepSpeed treats them apart. ``use(False)`` puts DeepSpeed's back. Nothing else in
DeepSpeed changes.
"""

from __future__ import annotations

import torch


def foreach_global_norm(input_tensors, norm_type=2, mpu=None, moe_ep_group=None, **graph):
    """``get_global_norm_of_tensors`` with one multi-tensor norm: a float32 scalar tensor, -1 if not finite.

    ``graph``: ``use_graph``, which DeepSpeed before 0.19.8 passes (``bf16.graph_harvesting``); if true, DeepSpeed's
    own function replays its captured loop."""
    tensors = list(input_tensors)
    if float(norm_type) != 2.0 or mpu is not None or moe_ep_group is not None or not tensors or any(graph.values()):
        from deepspeed.runtime.utils import get_global_norm_of_tensors

        return get_global_norm_of_tensors(tensors, norm_type=norm_type, mpu=mpu, moe_ep_group=moe_ep_group, **graph)
    norms = torch._foreach_norm([t.detach().float() for t in tensors], 2.0)  # fp32 already in BF16_Optimizer
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.masked_fill_(~total.isfinite(), -1.0)


def foreach_clip_by_global_norm(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6, **graph):
    """``clip_tensors_by_global_norm`` with one multi-tensor multiplication; returns the norm."""
    tensors = list(input_tensors)
    if any(graph.values()):
        from deepspeed.runtime.utils import clip_tensors_by_global_norm

        return clip_tensors_by_global_norm(tensors, max_norm, global_norm, mpu, eps, **graph)
    if global_norm is None:
        global_norm = foreach_global_norm(tensors, mpu=mpu)
    clip_coef = max_norm / (global_norm + eps)
    if clip_coef < 1:  # as DeepSpeed decides it; BF16_Optimizer has waited for the norm already
        torch._foreach_mul_([t.detach() for t in tensors], clip_coef)
    return global_norm


def foreach_grad_norm_direct(self, gradients, params, norm_type=2):
    """``DeepSpeedZeroOptimizer.get_grad_norm_direct`` with one multi-tensor norm, accumulated in DeepSpeed's
    norm type (fp64 on a GPU) without copying the gradients to it; the same selection of tensors, reductions
    across processes and -1 for a norm that is not finite."""
    from deepspeed.runtime.zero import stage_1_and_2 as zero

    if float(norm_type) != 2.0:
        return _DEEPSPEED["get_grad_norm_direct"](self, gradients, params, norm_type)
    selected = []
    for g, p in zip((g for g in gradients if not getattr(g, "_zero_padding", False)), params):
        if hasattr(p, zero.PIPE_REPLICATED) and p.ds_pipe_replicated:  # replicated by pipeline parallelism
            continue
        if zero.is_model_parallel_parameter(p) or self.model_parallel_rank == 0:
            selected.append(g.detach())
    device = zero.get_accelerator().current_device_name()
    norm_dtype = zero.get_norm_dtype() if hasattr(zero, "get_norm_dtype") else torch.float64  # fp64 before 0.19.6
    if selected:
        norms = torch._foreach_norm(selected, 2.0, dtype=norm_dtype)
        total_norm = torch.stack(norms).to(device).pow(2).sum().float()
    else:
        total_norm = torch.tensor(0.0, dtype=torch.float32).to(self.device)
    zero.dist.all_reduce(total_norm, op=zero.dist.ReduceOp.SUM, group=self.dp_process_group)
    self._model_parallel_all_reduce(tensor=total_norm, op=zero.dist.ReduceOp.SUM)
    total_norm = total_norm.pow(0.5)
    return total_norm.masked_fill_(~total_norm.isfinite(), -1.0)


@torch.no_grad()
def foreach_update_hp_grads(self, clear_lp_grads=False):
    """``BF16_Optimizer.update_hp_grads``: each bf16 gradient added into its fp32 buffer by one multi-tensor
    ``add_`` (the conversion inside the addition, no fp32 copy), the same bookkeeping per parameter."""
    if getattr(self, "immediate_grad_update", False):
        return
    if getattr(self, "autoep_folding_tp_group", None) is not None or getattr(self, "graph_harvesting", False):
        # tensor-parallel folding corrects each gradient first; graph harvesting replays a captured loop
        return _DEEPSPEED["update_hp_grads"](self, clear_lp_grads)
    hp_grads, lp_grads = [], []
    for i, group in enumerate(self.bf16_groups):
        for j, lp in enumerate(group):
            if lp.grad is None:
                continue
            hp_grad = self.fp32_groups_gradients[i][j]
            assert hp_grad is not None, f"high precision param has no gradient: group {i}, param {j}"
            hp_grads.append(hp_grad.data)
            lp_grads.append(lp.grad.data.view(hp_grad.shape))
            lp._hp_grad = hp_grad
            self.fp32_groups_has_gradients[i][j] = True
    if hp_grads:
        torch._foreach_add_(hp_grads, lp_grads)
        if clear_lp_grads:
            torch._foreach_zero_(lp_grads)


_DEEPSPEED = {}  # DeepSpeed's own methods, kept the first time use() replaces them


def use(enabled: bool) -> None:
    """The multi-tensor functions in DeepSpeed's BF16_Optimizer and ZeRO optimizer (enabled), or DeepSpeed's own."""
    from deepspeed.runtime import bf16_optimizer, utils
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    bf16_optimizer.get_global_norm_of_tensors = foreach_global_norm if enabled else utils.get_global_norm_of_tensors
    bf16_optimizer.clip_tensors_by_global_norm = (foreach_clip_by_global_norm if enabled
                                                   else utils.clip_tensors_by_global_norm)
    for owner, name, ours in ((DeepSpeedZeroOptimizer, "get_grad_norm_direct", foreach_grad_norm_direct),
                              (bf16_optimizer.BF16_Optimizer, "update_hp_grads", foreach_update_hp_grads)):
        own = _DEEPSPEED.setdefault(name, getattr(owner, name))
        setattr(owner, name, ours if enabled else own)
