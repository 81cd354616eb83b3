"""Pure-PyTorch reference for the transformer blocks' residual add + next LayerNorm (`add_layer_norm.py`); never
imports triton.

A pre-norm transformer block (diffusers' `BasicTransformerBlock`; ours in `model/layers.py`) runs
    x = x + attn1(norm1(x));  x = x + attn2(norm2(x), context);  x = x + ff(norm3(x))
so after each attention the residual sum is written, then read again by the next LayerNorm, which writes its
output. This is that computation as PyTorch runs it (each op in the inputs' dtype), the kernel's accuracy
reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["add_layer_norm_ref"]


def add_layer_norm_ref(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s)) with s = x + y, normalised over the last dim."""
    s = x + y
    return s, F.layer_norm(s, (s.shape[-1],), weight, bias, eps)
