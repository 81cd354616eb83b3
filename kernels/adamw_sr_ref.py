"""Pure-PyTorch reference of the bf16 AdamW step with stochastic rounding (`adamw_sr.py`); never imports triton.

With bf16 weights and no fp32 master copy (`pdengine train --pure-bf16`), an AdamW update of a weight is
about lr (Adam normalises the gradient), far below half a bf16 ulp of the weight at fine-tuning rates (lr 1e-5
against weights of 1e-2..1: the ulp is 2^-8 of the value), so rounding each new weight to the nearest bf16 value
drops nearly every update and the model does not train. Stochastic rounding rounds up with probability equal
to the discarded fraction: each stored value is one of its two bf16 neighbours and equals the fp32 result in
expectation, so small updates accumulate over steps as they would in fp32. The moments are kept in bf16 the
same way.

This module is the CPU path of `pdengine.train.optim.AdamWSR` (the kernel runs on CUDA) and the kernel's
accuracy reference: `adamw_step_fp32` is the update in fp32 (torch.optim.AdamW's formula), and
`stochastic_round_bf16` the rounding, driven by a torch generator.
"""

from __future__ import annotations

import math

import torch

__all__ = ["adamw_step_fp32", "stochastic_round_bf16", "adamw_sr_step_ref_"]


def adamw_step_fp32(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float, beta1: float,
                    beta2: float, eps: float, weight_decay: float, step: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step (decoupled weight decay, bias-corrected moments, `step` counted from 1) in fp32:
    (new weight, first moment, second moment), unrounded."""
    p, g, m, v = (t.float() for t in (p, g, m, v))
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    p = p * (1 - lr * weight_decay)
    denom = v.sqrt() / math.sqrt(1 - beta2 ** step) + eps
    return p - (lr / (1 - beta1 ** step)) * m / denom, m, v


def stochastic_round_bf16(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 x to bf16, rounding up (in magnitude) with probability equal to the 16 discarded low bits' fraction:
    a random 16-bit integer is added to the bit pattern, then the low half is cut. Unbiased: E[round(x)] = x."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, generator=generator, dtype=torch.int32, device=x.device)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def adamw_sr_step_ref_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, *, lr: float,
                       beta1: float, beta2: float, eps: float, weight_decay: float, step: int,
                       generator: torch.Generator | None = None) -> None:
    """The step in place: fp32 math, each bf16 tensor among p, m, v stochastically rounded, others stored."""
    new = adamw_step_fp32(p, g, m, v, lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay, step=step)
    for dst, val in zip((p, m, v), new):
        dst.copy_(stochastic_round_bf16(val, generator) if dst.dtype == torch.bfloat16 else val)
