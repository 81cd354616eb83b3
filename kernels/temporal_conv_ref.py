"""Pure-PyTorch reference of the temporal conv block (ModelScope / diffusers `TemporalConvLayer`).

Works in the UNet's (B*F, C, H, W) layout with rows ordered (b, f), like the kernels in
`temporal_conv.py`; never imports triton. Four stages, each

    GroupNorm (statistics per video over channels-of-group x frames x pixels) -> SiLU
    -> [dropout, stages 2-4] -> conv over frames (kernel 3, zero padding 1) + bias

and the block returns x + stage4(stage3(stage2(stage1(x)))).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor]


def video_group_norm_ref(x: torch.Tensor, num_frames: int, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                         eps: float) -> torch.Tensor:
    """GroupNorm of x (B*F, C, H, W) with statistics per (video, group) over C/G channels x F frames x H*W
    pixels, computed in fp32 (two-pass var_mean); the result has x's dtype."""
    bf, c, h, w = x.shape
    xg = x.reshape(bf // num_frames, num_frames, groups, c // groups, h * w).float()
    var, mean = torch.var_mean(xg, dim=(1, 3, 4), keepdim=True, unbiased=False)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(bf, c, h, w)
    y = y * gamma.float()[None, :, None, None] + beta.float()[None, :, None, None]
    return y.to(x.dtype)


def temporal_conv1d_ref(a: torch.Tensor, num_frames: int, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Conv over frames, kernel 3, zero padding 1: out[b, f] = sum_k W[:, :, k] @ a[b, f + k - 1] + bias.

    a: (B*F, C_in, H, W); weight: (C_out, C_in, 3) or the checkpoint's Conv3d (C_out, C_in, 3, 1, 1)."""
    bf, c_in, h, w = a.shape
    weight = weight.reshape(weight.shape[0], c_in, 3)
    frames = a.reshape(bf // num_frames, num_frames, c_in, h * w)
    padded = F.pad(frames, (0, 0, 0, 0, 1, 1))  # one zero frame before and after each video
    out = sum(torch.einsum("oc,bfcp->bfop", weight[:, :, k], padded[:, k:k + num_frames]) for k in range(3))
    out = out + bias[None, None, :, None]
    return out.reshape(bf, -1, h, w)


def temporal_conv_block_ref(
    x: torch.Tensor,
    num_frames: int,
    norms: Sequence[Pair],
    convs: Sequence[Pair],
    *,
    groups: int,
    eps: float = 1e-5,
    dropout_masks: Sequence[torch.Tensor | None] | None = None,
    upcast: bool = False,
) -> torch.Tensor:
    """x + stage4(stage3(stage2(stage1(x)))) for x (B*F, C, H, W).

    norms: 4 x (gamma, beta); convs: 4 x (weight, bias). dropout_masks: None (eval) or 4 entries, each None
    or a multiplier broadcastable to the stage's activation (0 for dropped elements, 1/(1-p) for kept ones;
    `temporal_conv.dropout_masks` materialises the kernels' masks). upcast: compute in fp32 (parameters
    too) and return fp32.
    """
    if len(norms) != 4 or len(convs) != 4:
        raise ValueError(f"expected 4 norms and 4 convs, got {len(norms)} and {len(convs)}")
    if dropout_masks is not None and len(dropout_masks) != 4:
        raise ValueError(f"dropout_masks needs one entry per stage (4), got {len(dropout_masks)}")
    if upcast:
        x = x.float()
        norms = [(g.float(), b.float()) for g, b in norms]
        convs = [(w.float(), b.float()) for w, b in convs]
    h = x
    for s, ((gamma, beta), (weight, bias)) in enumerate(zip(norms, convs)):
        h = F.silu(video_group_norm_ref(h, num_frames, gamma, beta, groups, eps))
        if dropout_masks is not None and dropout_masks[s] is not None:
            h = h * dropout_masks[s].to(h.dtype)
        h = temporal_conv1d_ref(h, num_frames, weight.to(h.dtype), bias.to(h.dtype))
    return x + h
