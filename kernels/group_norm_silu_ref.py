"""Pure-PyTorch reference for the spatial ResNets' GroupNorm + SiLU (`group_norm_silu.py`); never imports
triton.

Each `ResnetBlock2D` (SD / ModelScope, diffusers' `ResnetBlock2D`; ours in `model/layers.py`) runs
    h = conv1(silu(group_norm(x)));  h = h + temb_proj(silu(temb))[:, :, None, None]
    h = conv2(silu(group_norm(h)))
and the UNet ends with `conv_out(silu(group_norm(x)))`. Eagerly the timestep add, the GroupNorm (two passes:
statistics, then normalise) and the SiLU each read and write the activation. This is that computation as
PyTorch runs it, the kernel's accuracy reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["group_norm_silu_ref"]


def group_norm_silu_ref(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                        eps: float, shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(group_norm(x + shift[:, :, None, None])) per image of x (N, C, H, W), each op in x's dtype."""
    if shift is not None:
        x = x + shift[:, :, None, None]
    return F.silu(F.group_norm(x, groups, weight, bias, eps))
