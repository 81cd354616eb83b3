"""Pure-PyTorch reference for the transformers' fused linear layers (`fused_linear.py`); never imports triton.

A pre-norm transformer block (SD / ModelScope `BasicTransformerBlock`, ours in `model/layers.py`) runs three
times per block
    h = layer_norm(x) ;  y = h @ W.T + b ;  ... ;  x = x + out_proj(o)
eagerly as separate passes: the LayerNorm reads x and writes h, the projection reads h again, the output
projection writes its result and the residual add reads it and x and writes the sum. These are those
computations as PyTorch runs them, the kernels' accuracy references.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["row_stats_ref", "layer_norm_linear_ref", "linear_residual_ref", "linear_to_video_residual_ref",
           "video_group_stats_ref", "group_norm_linear_ref"]


def row_stats_ref(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of x (..., K): mean and 1 / sqrt(biased variance + eps), in fp32, shaped (rows,)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    var, mean = torch.var_mean(rows, dim=1, unbiased=False)
    return mean, torch.rsqrt(var + eps)


def layer_norm_linear_ref(x: torch.Tensor, ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float,
                          weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """linear(layer_norm(x)) as two eager passes (the LayerNorm's output in x's dtype)."""
    h = F.layer_norm(x, (x.shape[-1],), ln_weight, ln_bias, eps)
    return F.linear(h, weight, bias)


def linear_residual_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        residual: torch.Tensor) -> torch.Tensor:
    """residual + linear(x) as two eager passes."""
    return residual + F.linear(x, weight, bias)


def linear_to_video_residual_ref(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                 x: torch.Tensor) -> torch.Tensor:
    """x + linear(t) laid out as x (B*F, C, H, W), for token rows t in (image, pixel) order: the projection,
    a permute copy and the add, as a transformer's proj_out and residual run eagerly."""
    bf, c, h, w = x.shape
    y = F.linear(t, weight, bias).view(bf, h * w, c).permute(0, 2, 1).reshape(bf, c, h, w)
    return x + y


def video_group_stats_ref(x: torch.Tensor, num_frames: int, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm statistics of x (B*F, C, H, W) per video and group: mean and 1 / sqrt(biased variance + eps),
    fp32 (B, G)."""
    bf, c, h, w = x.shape
    xg = x.reshape(bf // num_frames, num_frames, groups, c // groups, h * w).float()
    var, mean = torch.var_mean(xg, dim=(1, 3, 4), unbiased=False)
    return mean, torch.rsqrt(var + eps)


def group_norm_linear_ref(x: torch.Tensor, num_frames: int, gn_weight: torch.Tensor | None,
                          gn_bias: torch.Tensor | None, groups: int, eps: float, weight: torch.Tensor,
                          bias: torch.Tensor | None = None) -> torch.Tensor:
    """A transformer's GroupNorm (statistics per video), its permute to token rows in (b, f, p) order and its
    proj_in, as eager PyTorch runs them (diffusers' temporal transformer): the video permuted to (B, C, F, H*W)
    for the norm, normalised in x's dtype, permuted to token rows, then the linear. (B*F*H*W, N)."""
    bf, c, h, w = x.shape
    b = bf // num_frames
    video = x.view(b, num_frames, c, h * w).permute(0, 2, 1, 3)
    y = F.group_norm(video, groups, gn_weight, gn_bias, eps)  # (B, C, F, H*W)
    tokens = y.permute(0, 2, 3, 1).reshape(bf * h * w, c)
    return F.linear(tokens, weight, bias)
