"""Pure-PyTorch reference for the GEGLU activation (`geglu.py`); never imports triton.

The transformers' feed-forward (SD / ModelScope `FeedForward`, diffusers' `GEGLU`) projects to twice its
inner width and gates one half with the exact (erf) GELU of the other:
    h, gate = proj(x).chunk(2, dim=-1);  y = h * gelu(gate)
Eagerly that is three passes after the projection (gelu reads the gate and writes it; the product reads both
halves and writes y) and autograd keeps gelu(gate) beside the projection for the backward.

The input checks live here (torch only) so the kernel and the reference reject the same inputs alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_geglu_input", "geglu_ref", "geglu_backward_ref"]


def check_geglu_input(p: torch.Tensor) -> int:
    """The projection output p (..., 2*I), floating point, unit stride along the last dim; returns I."""
    if p.dim() < 1 or not p.is_floating_point():
        raise ValueError(f"p must be a floating-point (..., 2*I) projection, got {tuple(p.shape)} {p.dtype}")
    if p.shape[-1] % 2:
        raise ValueError(f"p's last dim must be even (the [h | gate] halves), got {p.shape[-1]}")
    if p.numel() and p.stride(-1) != 1:
        raise ValueError(f"p must have unit stride along its last dim, got strides {p.stride()}")
    return p.shape[-1] // 2


def geglu_ref(p: torch.Tensor) -> torch.Tensor:
    """h * gelu(gate) for [h | gate] = p, in p's dtype (the eager computation diffusers runs)."""
    check_geglu_input(p)
    h, gate = p.chunk(2, dim=-1)
    return h * F.gelu(gate)


def geglu_backward_ref(dy: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """d(loss)/dp = [dy * gelu(gate) | dy * h * gelu'(gate)], gelu'(g) = Phi(g) + g * phi(g), in fp32."""
    h, gate = p.float().chunk(2, dim=-1)
    dy = dy.float()
    cdf = 0.5 * (1.0 + torch.erf(gate * 0.7071067811865476))
    pdf = torch.exp(-0.5 * gate * gate) * 0.3989422804014327
    return torch.cat([dy * gate * cdf, dy * h * (cdf + gate * pdf)], dim=-1)
