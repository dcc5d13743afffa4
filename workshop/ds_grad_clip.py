"""``--foreach_grad_clip``: ZeRO-1's gradient clipping in bf16 as multi-tensor operations.

ZeRO-1 in bf16 (``ds_configs/zero1.json``) runs DeepSpeed's ``BF16_Optimizer``. Each step it takes
the norm of the gradients with one ``norm`` per tensor and scales them with one ``mul_`` per tensor,
each launched from Python (``deepspeed.runtime.utils.get_global_norm_of_tensors`` and
``clip_tensors_by_global_norm``): 292 of each per step for gpt2-medium, the ``mul_`` ones after the
optimizer has waited for the GPU to report the norm, so the GPU idles while they are launched. The
``Trainer`` without DeepSpeed clips with ``torch.nn.utils.clip_grad_norm_``, which does the same
arithmetic with ``torch._foreach_norm`` and ``torch._foreach_mul_``: a few launches in all.

``use(True)`` gives the ``BF16_Optimizer``'s module the two functions below; they compute the same
norm (the L2 norm of the per-tensor L2 norms, in fp32, an inf or NaN norm marked -1 as DeepSpeed
marks it) and the same scaling. Model or expert parallelism, and norms other than L2, go to
DeepSpeed's own functions. ``use(False)`` puts DeepSpeed's back. Nothing else in DeepSpeed changes.
"""

from __future__ import annotations

import torch


def foreach_global_norm(input_tensors, norm_type=2, mpu=None, moe_ep_group=None):
    """``get_global_norm_of_tensors`` with one multi-tensor norm: a float32 scalar tensor, -1 if not finite."""
    tensors = list(input_tensors)
    if float(norm_type) != 2.0 or mpu is not None or moe_ep_group is not None or not tensors:
        from deepspeed.runtime.utils import get_global_norm_of_tensors

        return get_global_norm_of_tensors(tensors, norm_type=norm_type, mpu=mpu, moe_ep_group=moe_ep_group)
    norms = torch._foreach_norm([t.detach().float() for t in tensors], 2.0)  # fp32 already in BF16_Optimizer
    total = torch.linalg.vector_norm(torch.stack(norms))
    return total.masked_fill_(~total.isfinite(), -1.0)


def foreach_clip_by_global_norm(input_tensors, max_norm=1.0, global_norm=None, mpu=None, eps=1e-6):
    """``clip_tensors_by_global_norm`` with one multi-tensor multiplication; returns the norm."""
    tensors = list(input_tensors)
    if global_norm is None:
        global_norm = foreach_global_norm(tensors, mpu=mpu)
    clip_coef = max_norm / (global_norm + eps)
    if clip_coef < 1:  # as DeepSpeed decides it; BF16_Optimizer has waited for the norm already
        torch._foreach_mul_([t.detach() for t in tensors], clip_coef)
    return global_norm


def use(enabled: bool) -> None:
    """The multi-tensor functions in DeepSpeed's BF16_Optimizer (enabled), or DeepSpeed's own."""
    from deepspeed.runtime import bf16_optimizer, utils

    bf16_optimizer.get_global_norm_of_tensors = foreach_global_norm if enabled else utils.get_global_norm_of_tensors
    bf16_optimizer.clip_tensors_by_global_norm = (foreach_clip_by_global_norm if enabled
                                                   else utils.clip_tensors_by_global_norm)
