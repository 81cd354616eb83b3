"""Pure-PyTorch references for `temporal_attention.py` (never imports triton).

Same layout contracts as the kernels: token rows (N, C) in (b, f, p) order, n = (b*F + f)*P + p with
P = H*W pixels per frame. The references do the obvious thing -- reshape, permute to one sequence per
pixel, attend, permute back -- so they also define what the kernels' fusions must equal.
"""

from __future__ import annotations

import math

import torch


def _check_tokens(t: torch.Tensor, num_frames: int, pixels: int, name: str) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2D (N, C) token rows, got shape {tuple(t.shape)}")
    if num_frames < 1 or pixels < 1 or t.shape[0] % (num_frames * pixels):
        raise ValueError(f"{name}: N={t.shape[0]} rows is not a multiple of num_frames * pixels = "
                         f"{num_frames} * {pixels}")


def temporal_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, heads: int,
                           scale: float | None = None, *, pixels: int, upcast: bool = True,
                           return_lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention over the frames of every pixel, no mask.

    q, k, v: (N, heads*D) rows in (b, f, p) order, N = B * num_frames * pixels. Returns o (N, heads*D) in
    the inputs' dtype (and, with `return_lse`, the log-sum-exp of the scaled scores as (heads, N) fp32, the
    kernel's layout). `upcast` computes in fp32; otherwise in the inputs' dtype (PyTorch's own
    low-precision error, the yardstick for the kernel's).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tokens(t, num_frames, pixels, name)
    if k.shape != q.shape or v.shape != q.shape or q.shape[1] % heads:
        raise ValueError(f"q, k, v must share one (N, heads*D) shape with heads={heads} dividing the columns")
    n, width = q.shape
    head_dim = width // heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    b = n // (num_frames * pixels)

    def to_sequences(t: torch.Tensor) -> torch.Tensor:
        # (b f p) (h d) -> (b p) h f d: one sequence of num_frames tokens per pixel and head.
        t = t.float() if upcast else t
        return t.reshape(b, num_frames, pixels, heads, head_dim).permute(0, 2, 3, 1, 4)

    qs, ks, vs = (to_sequences(t) for t in (q, k, v))
    scores = (qs @ ks.transpose(-1, -2)) * scale  # (B, P, heads, F, F)
    o = torch.softmax(scores, dim=-1) @ vs
    o = o.permute(0, 3, 1, 2, 4).reshape(n, width).to(q.dtype)
    if not return_lse:
        return o
    lse = torch.logsumexp(scores.float(), dim=-1)  # (B, P, heads, F)
    return o, lse.permute(2, 0, 3, 1).reshape(heads, n)


def reference_path_bytes(batch: int, num_frames: int, pixels: int, heads: int, head_dim: int,
                         dtype: torch.dtype = torch.bfloat16, *, backward: bool = False) -> int:
    """HBM bytes of the permute-based path on (b, f, p) rows with a fused attention core (flash SDPA):
    forward copies q, k, v to (b p) h f d order (read + write each), attends (read q, k, v, write o and
    the lse) and copies o back (read + write); the backward copies do in and dq, dk, dv out (read +
    write each) around a flash backward (read q, k, v, o, do, lse, write dq, dk, dv). Scores never touch
    HBM here, so this is the permutes' cost alone; an unfused (math) attention moves F x F scores on top."""
    item = torch.empty((), dtype=dtype).element_size()
    tensor = batch * num_frames * pixels * heads * head_dim * item
    lse = batch * num_frames * pixels * heads * 4
    if not backward:
        return 2 * 3 * tensor + (4 * tensor + lse) + 2 * tensor
    return 2 * tensor + (8 * tensor + lse) + 2 * 3 * tensor


def video_group_norm_to_tokens_ref(x: torch.Tensor, num_frames: int, weight: torch.Tensor | None,
                                   bias: torch.Tensor | None, groups: int, eps: float,
                                   upcast: bool = True) -> torch.Tensor:
    """GroupNorm of x (B*F, C, H, W) with statistics per video (over C/G x F x H x W), returned as token
    rows (B*F*H*W, C) in (b, f, p) order (the kernel's fused output). Statistics in fp32 either way;
    `upcast=False` applies the affine transform in x's dtype."""
    if x.dim() != 4 or x.shape[0] % num_frames or x.shape[1] % groups:
        raise ValueError(f"x must be (B*F, C, H, W) with F={num_frames} dividing the first and groups={groups} "
                         f"dividing C, got {tuple(x.shape)}")
    bf, c, h, w = x.shape
    b = bf // num_frames
    xg = x.reshape(b, num_frames, groups, c // groups, h * w).float()
    var, mean = torch.var_mean(xg, dim=(1, 3, 4), keepdim=True, unbiased=False)
    y = ((xg - mean) * torch.rsqrt(var + eps)).reshape(bf, c, h * w)
    y = y if upcast else y.to(x.dtype)
    if weight is not None:
        y = y * (weight.float() if upcast else weight)[None, :, None]
    if bias is not None:
        y = y + (bias.float() if upcast else bias)[None, :, None]
    return y.permute(0, 2, 1).reshape(bf * h * w, c).to(x.dtype)


def tokens_to_video_residual_ref(t: torch.Tensor, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x + t with token rows t (B*F*H*W, C) in (b, f, p) order laid back out as x's (B*F, C, H, W)."""
    if x.dim() != 4 or x.shape[0] % num_frames:
        raise ValueError(f"x must be (B*F, C, H, W) with F={num_frames} dividing the first dim, got {tuple(x.shape)}")
    bf, c, h, w = x.shape
    if t.shape != (bf * h * w, c):
        raise ValueError(f"t must be (B*F*H*W, C) = {(bf * h * w, c)}, got {tuple(t.shape)}")
    return x + t.reshape(bf, h, w, c).permute(0, 3, 1, 2)
