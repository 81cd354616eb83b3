"""AdamWSR: AdamW for bf16 weights with stochastic rounding (`pdengine train --pure-bf16`).

torch.optim.AdamW on bf16 parameters rounds every new weight (and moment) to the nearest bf16 value, which at
fine-tuning learning rates drops nearly every update (`kernels/adamw_sr_ref.py` says why). This optimizer
makes the same AdamW step in fp32 and rounds stochastically: one Triton pass per parameter tensor on CUDA
(`kernels/adamw_sr.py`), the reference on the CPU. Its state has torch.optim.AdamW's layout (`step`,
`exp_avg`, `exp_avg_sq` per parameter, moments in the parameter's dtype), so checkpoints move between the two.
The random streams come from (seed, step, parameter index) alone: a resumed run rounds as an uninterrupted one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch

__all__ = ["AdamWSR"]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter or state tensor; t itself otherwise."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


class AdamWSR(torch.optim.Optimizer):
    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2,
                 seed: int = 0, use_kernel: bool | None = None):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, betas={betas}, eps={eps}, "
                             f"weight_decay={weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))
        self.seed = int(seed)
        # None: the Triton kernel for CUDA parameters, the reference for others; True: the kernel for all
        # (CPU tensors through Triton's interpreter, TRITON_INTERPRET=1: the kernel's tests).
        self.use_kernel = use_kernel

    def _seed(self, step: int, index: int) -> int:
        # Distinct, reproducible streams per (seed, step, parameter): a 31-bit mix (Philox takes the rest).
        h = (self.seed * 0x9E3779B1 + step * 0x85EBCA77 + index * 0xC2B2AE3D) & 0xFFFFFFFF
        h ^= h >> 15
        return (h * 0x2C1B3C6D & 0xFFFFFFFF) >> 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                index += 1
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWSR does not take sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                state["step"] += 1
                step = int(state["step"].item())
                kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"], step=step)
                seed = self._seed(step, index)
                # FSDP2 shards parameters as DTensors: the step is elementwise, so each rank updates its own
                # shard; the rank goes into the seed (the random streams' element index restarts per shard).
                p_, grad, m_, v_ = (_local(t) for t in (p, p.grad, state["exp_avg"], state["exp_avg_sq"]))
                if p_ is not p:
                    seed = (seed + 0x9E3779B1 * _rank()) % (1 << 31)
                grad = grad.contiguous()
                kernel = p_.is_cuda if self.use_kernel is None else self.use_kernel
                if kernel and not p_.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
                    raise RuntimeError("AdamWSR(use_kernel=True) on CPU tensors needs TRITON_INTERPRET=1")
                if kernel and p_.is_contiguous():
                    from pdengine.kernels.adamw_sr import adamw_sr_step_

                    adamw_sr_step_(p_, grad, m_, v_, seed=seed, **kw)
                else:
                    from pdengine.kernels.adamw_sr_ref import adamw_sr_step_ref_

                    gen = torch.Generator(device=p_.device).manual_seed(seed)
                    adamw_sr_step_ref_(p_, grad, m_, v_, generator=gen, **kw)
        return loss
