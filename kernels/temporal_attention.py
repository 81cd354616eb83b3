"""Bidirectional temporal attention on channels-last token rows, forward and backward (flash-style).

Every pixel of every video is an independent sequence over its F frames. Tokens stay in (b, f, p) row
order, n = (b*F + f)*P + p with P = H*W, so the temporal transformer's projections are plain GEMMs on an
(N, C) matrix and this kernel walks a pixel's frames with a stride of P rows: no (b p) f permute copies.

Design: one program owns BLOCK_P pixels x one head and holds their whole sequences (F <= 64), so the
softmax needs no online rescaling and the backward is a single pass. q/k/v are loaded as
(BLOCK_P, F_PAD, D_PAD) tiles (about 8K elements: 8 pixels at F = 16, D = 64) and multiplied with batched
3D `tl.dot`: one (F_PAD x F_PAD) score matrix per pixel on tensor cores (mma.sync m16n8k16 -- HMMA on
sm80 and sm90 alike, as wgmma has no batch dimension; F_PAD = 16 fills the M dimension exactly at F = 16).
The alternative, (BLOCK_P*F_PAD, D) tiles with off-diagonal blocks masked, spends BLOCK_P x the MMA work
and (BLOCK_P*F_PAD)^2 score registers on blocks it throws away; the batched dot does only the diagonal.
Many pixels per program keep each load wide (16-byte vectors along D, 8 rows per frame) although every
matrix is tiny. F and D are padded to powers of two >= 16 (the MMA's M/N/K); padded keys get -inf scores,
padded query rows, head-dim columns and pixels load zeros and are never stored. Softmax in fp32 with exp2,
the scale and log2(e) folded into one multiply. fp32 inputs use 3xTF32 dots (about fp32 accuracy).

Also here (layout fusions around the cuBLAS projections): `video_group_norm_to_tokens` (GroupNorm with
per-video statistics that writes (b, f, p) token rows straight from (B*F, C, H, W); its backward is two
kernels on the saved statistics) and `tokens_to_video_residual` (tokens back to (B*F, C, H, W) fused with
the residual add).
"""

from __future__ import annotations

import math
from typing import List

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec

_LOG2E = 1.4426950408889634


@triton.jit
def _tile_ptrs(base_ptr, rows, stride_n, offs_d, ALIGNED: tl.constexpr):
    """(BLOCK_P, F_PAD, D_PAD) pointers for token rows `rows` (relative to the video's first row)."""
    ptrs = base_ptr + (rows * stride_n)[:, :, None] + offs_d[None, None, :]
    if ALIGNED:
        # The launcher checked 16-byte aligned bases and row strides: let the compiler issue 16-byte
        # loads along D (a plain JIT launch infers this by specialisation; the hint makes it explicit
        # and visible to the ahead-of-time compile check).
        ptrs = tl.max_contiguous(tl.multiple_of(ptrs, (1, 1, 16)), (1, 1, 8))
    return ptrs


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """Batched a @ b with fp32 accumulation."""
    if EMULATE_BF16:
        # Triton's CPU interpreter keeps bf16 as raw uint16 and would multiply the bit patterns (3.9).
        # bf16 x bf16 products are exact in fp32, so upcasting first gives what the tensor cores give.
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _cast(x, dtype: tl.constexpr, EMULATE_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even."""
    if EMULATE_BF16:
        # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even, which would double
        # the bf16 error the tests measure: round the fp32 bit pattern first, then the cast is exact.
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    else:
        return x.to(dtype)


@triton.jit
def _temporal_attn_fwd_kernel(
    q_ptr,  # (N, heads*D) row stride stride_q_n, column stride 1
    k_ptr,  # (N, heads*D) row stride stride_k_n
    v_ptr,  # (N, heads*D) row stride stride_v_n
    o_ptr,  # (N, heads*D) row stride stride_o_n
    lse_ptr,  # (heads, N) fp32, natural-log log-sum-exp of the scaled scores
    N, P, F,
    stride_q_n, stride_k_n, stride_v_n, stride_o_n,
    qk_scale,  # softmax scale * log2(e): scores go straight to exp2
    D: tl.constexpr, D_PAD: tl.constexpr, F_PAD: tl.constexpr, BLOCK_P: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)  # (video, pixel block): axis 0, the only axis with room for B*P/BLOCK_P blocks
    head = tl.program_id(1)
    blocks_per_video = tl.cdiv(P, BLOCK_P)
    b = pid // blocks_per_video
    offs_p = (pid % blocks_per_video) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_f = tl.arange(0, F_PAD)
    offs_d = tl.arange(0, D_PAD)  # D padded to a power of two >= 16 (the MMA's K); pads load 0
    # 64-bit only for the video's first row; offsets inside one video fit int32 (checked by the launcher).
    row0 = b.to(tl.int64) * F * P
    rows = offs_f[None, :] * P + offs_p[:, None]  # (BLOCK_P, F_PAD)
    valid = (offs_p < P)[:, None] & (offs_f < F)[None, :]
    mask3 = valid[:, :, None] & (offs_d < D)[None, None, :]
    col = head * D
    q = tl.load(_tile_ptrs(q_ptr + row0 * stride_q_n + col, rows, stride_q_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)
    k = tl.load(_tile_ptrs(k_ptr + row0 * stride_k_n + col, rows, stride_k_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)
    v = tl.load(_tile_ptrs(v_ptr + row0 * stride_v_n + col, rows, stride_v_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)

    s = _dot(q, tl.trans(k, 0, 2, 1), DOT_PRECISION, EMULATE_BF16) * qk_scale  # (BLOCK_P, F_PAD, F_PAD)
    s = tl.where((offs_f < F)[None, None, :], s, float("-inf"))
    m = tl.max(s, axis=2)  # finite: every sequence has >= 1 real key, padded query rows score 0
    p = tl.math.exp2(s - m[:, :, None])
    denom = tl.sum(p, axis=2)
    o = _dot(_cast(p, v.dtype, EMULATE_BF16), v, DOT_PRECISION, EMULATE_BF16) / denom[:, :, None]

    tl.store(_tile_ptrs(o_ptr + row0 * stride_o_n + col, rows, stride_o_n, offs_d, ALIGNED),
             _cast(o, o_ptr.dtype.element_ty, EMULATE_BF16), mask=mask3)
    lse = (m + tl.math.log2(denom)) * 0.6931471805599453  # back to natural log for the saved statistic
    tl.store(lse_ptr + head.to(tl.int64) * N + row0 + rows, lse, mask=valid)


@triton.jit
def _temporal_attn_bwd_kernel(
    q_ptr,  # (N, heads*D) row stride stride_q_n
    k_ptr,  # (N, heads*D) row stride stride_k_n
    v_ptr,  # (N, heads*D) row stride stride_v_n
    o_ptr,  # (N, heads*D) row stride stride_o_n
    do_ptr,  # (N, heads*D) row stride stride_do_n
    lse_ptr,  # (heads, N) fp32
    dq_ptr,  # (N, heads*D) row stride stride_dq_n
    dk_ptr,  # (N, heads*D) row stride stride_dk_n
    dv_ptr,  # (N, heads*D) row stride stride_dv_n
    N, P, F,
    stride_q_n, stride_k_n, stride_v_n, stride_o_n, stride_do_n, stride_dq_n, stride_dk_n, stride_dv_n,
    scale,  # softmax scale (natural units): dS carries it into dq and dk
    D: tl.constexpr, D_PAD: tl.constexpr, F_PAD: tl.constexpr, BLOCK_P: tl.constexpr, ALIGNED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, EMULATE_BF16: tl.constexpr,
):
    pid = tl.program_id(0)
    head = tl.program_id(1)
    blocks_per_video = tl.cdiv(P, BLOCK_P)
    b = pid // blocks_per_video
    offs_p = (pid % blocks_per_video) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_f = tl.arange(0, F_PAD)
    offs_d = tl.arange(0, D_PAD)  # D padded to a power of two >= 16 (the MMA's K); pads load 0
    row0 = b.to(tl.int64) * F * P
    rows = offs_f[None, :] * P + offs_p[:, None]  # (BLOCK_P, F_PAD)
    valid = (offs_p < P)[:, None] & (offs_f < F)[None, :]
    mask3 = valid[:, :, None] & (offs_d < D)[None, None, :]
    col = head * D

    # delta_i = sum_d dO_id O_id = sum_j P_ij dP_ij: the softmax-Jacobian term, one value per query row.
    # Padded rows load dO = 0, so their delta, dP and dS are all zero and they add nothing to dK, dV.
    do = tl.load(_tile_ptrs(do_ptr + row0 * stride_do_n + col, rows, stride_do_n, offs_d, ALIGNED),
                 mask=mask3, other=0.0)
    o = tl.load(_tile_ptrs(o_ptr + row0 * stride_o_n + col, rows, stride_o_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=2)
    q = tl.load(_tile_ptrs(q_ptr + row0 * stride_q_n + col, rows, stride_q_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)
    k = tl.load(_tile_ptrs(k_ptr + row0 * stride_k_n + col, rows, stride_k_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)
    lse = tl.load(lse_ptr + head.to(tl.int64) * N + row0 + rows, mask=valid, other=0.0)

    # Recompute the probabilities from the saved log-sum-exp (never stored in the forward).
    s = _dot(q, tl.trans(k, 0, 2, 1), DOT_PRECISION, EMULATE_BF16) * (scale * 1.4426950408889634)
    s = tl.where((offs_f < F)[None, None, :], s, float("-inf"))
    p = tl.math.exp2(s - (lse * 1.4426950408889634)[:, :, None])  # (BLOCK_P, F_PAD, F_PAD)

    dv = _dot(tl.trans(_cast(p, do.dtype, EMULATE_BF16), 0, 2, 1), do, DOT_PRECISION, EMULATE_BF16)
    tl.store(_tile_ptrs(dv_ptr + row0 * stride_dv_n + col, rows, stride_dv_n, offs_d, ALIGNED),
             _cast(dv, dv_ptr.dtype.element_ty, EMULATE_BF16), mask=mask3)

    v = tl.load(_tile_ptrs(v_ptr + row0 * stride_v_n + col, rows, stride_v_n, offs_d, ALIGNED),
                mask=mask3, other=0.0)
    dp = _dot(do, tl.trans(v, 0, 2, 1), DOT_PRECISION, EMULATE_BF16)
    ds = _cast(p * (dp - delta[:, :, None]) * scale, q.dtype, EMULATE_BF16)  # dL/d(q.k), scale folded in
    dq = _dot(ds, k, DOT_PRECISION, EMULATE_BF16)
    tl.store(_tile_ptrs(dq_ptr + row0 * stride_dq_n + col, rows, stride_dq_n, offs_d, ALIGNED),
             _cast(dq, dq_ptr.dtype.element_ty, EMULATE_BF16), mask=mask3)
    dk = _dot(tl.trans(ds, 0, 2, 1), q, DOT_PRECISION, EMULATE_BF16)
    tl.store(_tile_ptrs(dk_ptr + row0 * stride_dk_n + col, rows, stride_dk_n, offs_d, ALIGNED),
             _cast(dk, dk_ptr.dtype.element_ty, EMULATE_BF16), mask=mask3)


@triton.jit
def _frame_group_stats_kernel(
    x_ptr,  # (B*F, C, H, W) contiguous
    mean_ptr,  # (B*F, G) fp32: mean of each (frame, group) chunk
    m2_ptr,  # (B*F, G) fp32: sum of squared deviations from that mean
    chunk,  # C/G * H*W: a (frame, group) chunk is contiguous in NCHW
    BLOCK: tl.constexpr,
):
    # One program per (frame, group): B*F*G programs keep the GPU busy where one per (video, group) would
    # not (64 programs at B=2, G=32); the apply kernel merges the F partials of a video exactly.
    pid = tl.program_id(0)
    base = x_ptr + pid.to(tl.int64) * chunk
    # Shifted sums (by the chunk's first value) keep the one-pass variance from cancelling when
    # |mean| >> std; exact in the count, so partials merge with Chan's formula.
    shift = tl.load(base).to(tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    acc_sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, chunk, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        d = tl.where(offs < chunk, tl.load(base + offs, mask=offs < chunk, other=0.0).to(tl.float32) - shift, 0.0)
        acc += d
        acc_sq += d * d
    s = tl.sum(acc, axis=0)
    mean_shifted = s / chunk
    tl.store(mean_ptr + pid, shift + mean_shifted)
    tl.store(m2_ptr + pid, tl.sum(acc_sq, axis=0) - s * mean_shifted)


@triton.jit
def _layout_tile(C, P, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """The layout kernels' (channel, pixel) tile of one frame: axis 0 runs over (frame, pixel block) -- B*F*P /
    BLOCK_P can pass 65,535 --, axis 1 over channel blocks. Returns the frame row bf, pixel and channel
    offsets and the (BLOCK_C, BLOCK_P) mask."""
    blocks_per_frame = tl.cdiv(P, BLOCK_P)
    bf = tl.program_id(0) // blocks_per_frame
    offs_p = (tl.program_id(0) % blocks_per_frame) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    return bf, offs_p, offs_c, (offs_c < C)[:, None] & (offs_p < P)[None, :]


@triton.jit
def _video_group_moments(mean_ptr, m2_ptr, bf, offs_c, C, P, F, G, eps, F_PAD: tl.constexpr):
    """Mean and 1/std of each channel's group over the video of frame row bf, merged from the F per-frame
    partials (equal counts) by Chan's formula: mean = avg(mean_f), M2 = sum(M2_f) + n sum((mean_f - mean)^2),
    var = M2 / (F n)."""
    group = offs_c // (C // G)
    offs_f = tl.arange(0, F_PAD)
    stat = ((bf // F) * F + offs_f)[None, :] * G + group[:, None]  # (BLOCK_C, F_PAD)
    stat_mask = (offs_c < C)[:, None] & (offs_f < F)[None, :]
    means = tl.load(mean_ptr + stat, mask=stat_mask, other=0.0)
    m2s = tl.load(m2_ptr + stat, mask=stat_mask, other=0.0)
    mean = tl.sum(means, axis=1) / F
    dev = tl.where(stat_mask, means - mean[:, None], 0.0)
    n = (C // G) * P
    var = (tl.sum(m2s, axis=1) + n * tl.sum(dev * dev, axis=1)) / (F * n)
    return mean, tl.math.rsqrt(tl.maximum(var, 0.0) + eps)


@triton.jit
def _video_to_tokens_kernel(
    x_ptr,  # (B*F, C, H, W) contiguous
    out_ptr,  # (B*F*H*W, C) token rows in (b, f, p) order, contiguous
    mean_ptr,  # (B*F, G) fp32 partial means (NORMALIZE)
    m2_ptr,  # (B*F, G) fp32 partial sums of squared deviations (NORMALIZE)
    w_ptr,  # (C,) GroupNorm weight (HAS_WEIGHT)
    b_ptr,  # (C,) GroupNorm bias (HAS_BIAS)
    C, P, F, G, eps,
    NORMALIZE: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    F_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bf, offs_p, offs_c, mask = _layout_tile(C, P, BLOCK_C, BLOCK_P)
    # Read along pixels (contiguous in NCHW) ...
    x = tl.load(x_ptr + bf.to(tl.int64) * C * P + offs_c[:, None] * P + offs_p[None, :], mask=mask, other=0.0)
    y = x.to(tl.float32)  # (BLOCK_C, BLOCK_P)
    if NORMALIZE:
        mean, rstd = _video_group_moments(mean_ptr, m2_ptr, bf, offs_c, C, P, F, G, eps, F_PAD)
        y = (y - mean[:, None]) * rstd[:, None]
        if HAS_WEIGHT:
            y = y * tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None]
        if HAS_BIAS:
            y = y + tl.load(b_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None]
    # ... write along channels (contiguous in the token rows): the transpose goes through shared memory.
    rows = bf.to(tl.int64) * P + offs_p
    mask_pc = (offs_p < P)[:, None] & (offs_c < C)[None, :]
    tl.store(out_ptr + rows[:, None] * C + offs_c[None, :], tl.trans(y).to(out_ptr.dtype.element_ty), mask=mask_pc)


@triton.jit
def _tokens_to_video_residual_kernel(
    t_ptr,  # (B*F*H*W, C) token rows in (b, f, p) order, row stride stride_t_n
    x_ptr,  # (B*F, C, H, W) contiguous residual
    out_ptr,  # (B*F, C, H, W) contiguous
    C, P, stride_t_n,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    bf, offs_p, offs_c, mask_cp = _layout_tile(C, P, BLOCK_C, BLOCK_P)
    # Tokens are read along channels, the video along pixels: both coalesced, transposed in between.
    t = _load_tokens_transposed(t_ptr, bf, offs_p, offs_c, C, P, stride_t_n)
    offs = bf.to(tl.int64) * C * P + offs_c[:, None] * P + offs_p[None, :]
    x = tl.load(x_ptr + offs, mask=mask_cp, other=0.0)
    out = x.to(tl.float32) + t
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask_cp)


@triton.jit
def _load_tokens_transposed(t_ptr, bf, offs_p, offs_c, C, P, stride_t_n):
    """The (BLOCK_C, BLOCK_P) fp32 tile of token rows (b, f, p) of frame row bf, read along channels
    (coalesced in the token layout), zeros outside."""
    rows = bf.to(tl.int64) * P + offs_p
    mask_pc = (offs_p < P)[:, None] & (offs_c < C)[None, :]
    t = tl.load(t_ptr + rows[:, None] * stride_t_n + offs_c[None, :], mask=mask_pc, other=0.0)
    return tl.trans(t.to(tl.float32))


@triton.jit
def _tokens_group_norm_bwd_reduce_kernel(
    x_ptr,  # (B*F, C, H, W) contiguous: the forward's input
    dy_ptr,  # (B*F*H*W, C) gradient of the token rows, row stride stride_dy_n
    mean_ptr, m2_ptr,  # (B*F, G) fp32: the forward's per-frame partial statistics
    ps1_ptr,  # (B*F*blocks_per_frame, C) fp32 out: sum of dy over the tile's pixels
    ps2_ptr,  # (B*F*blocks_per_frame, C) fp32 out: sum of dy * xhat over the tile's pixels
    C, P, F, G, eps, stride_dy_n,
    F_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # GroupNorm-to-tokens backward, pass 1 of 2: per-channel partial sums on the forward's tiles (x read along
    # pixels, dy along channels). Deterministic: one partial row per (frame, pixel block), no atomics.
    bf, offs_p, offs_c, mask = _layout_tile(C, P, BLOCK_C, BLOCK_P)
    x = tl.load(x_ptr + bf.to(tl.int64) * C * P + offs_c[:, None] * P + offs_p[None, :], mask=mask,
                other=0.0).to(tl.float32)
    mean, rstd = _video_group_moments(mean_ptr, m2_ptr, bf, offs_c, C, P, F, G, eps, F_PAD)
    xhat = (x - mean[:, None]) * rstd[:, None]
    dy = _load_tokens_transposed(dy_ptr, bf, offs_p, offs_c, C, P, stride_dy_n)
    part = tl.program_id(0) * C + offs_c
    tl.store(ps1_ptr + part, tl.sum(dy, axis=1), mask=offs_c < C)
    tl.store(ps2_ptr + part, tl.sum(tl.where(mask, dy * xhat, 0.0), axis=1), mask=offs_c < C)


@triton.jit
def _tokens_group_norm_bwd_apply_kernel(
    x_ptr,  # (B*F, C, H, W) contiguous: the forward's input
    dy_ptr,  # (B*F*H*W, C) gradient of the token rows, row stride stride_dy_n
    mean_ptr, m2_ptr,  # (B*F, G) fp32: the forward's per-frame partial statistics
    w_ptr,  # (C,) GroupNorm weight (HAS_WEIGHT)
    ca_ptr,  # (B, G) fp32: mean over the (video, group) of weight * dy
    cb_ptr,  # (B, G) fp32: mean over the (video, group) of weight * dy * xhat
    dx_ptr,  # (B*F, C, H, W) out
    C, P, F, G, eps, stride_dy_n,
    HAS_WEIGHT: tl.constexpr, F_PAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Pass 2 of 2: dx = rstd * (weight * dy - ca - xhat * cb), written in the video layout.
    bf, offs_p, offs_c, mask = _layout_tile(C, P, BLOCK_C, BLOCK_P)
    offs = bf.to(tl.int64) * C * P + offs_c[:, None] * P + offs_p[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    mean, rstd = _video_group_moments(mean_ptr, m2_ptr, bf, offs_c, C, P, F, G, eps, F_PAD)
    xhat = (x - mean[:, None]) * rstd[:, None]
    gdy = _load_tokens_transposed(dy_ptr, bf, offs_p, offs_c, C, P, stride_dy_n)
    if HAS_WEIGHT:
        gdy = gdy * tl.load(w_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None]
    coef = (bf // F) * G + offs_c // (C // G)
    ca = tl.load(ca_ptr + coef, mask=offs_c < C, other=0.0)
    cb = tl.load(cb_ptr + coef, mask=offs_c < C, other=0.0)
    dx = rstd[:, None] * (gdy - ca[:, None] - xhat * cb[:, None])
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------- launchers

_MAX_FRAMES = 64  # F_PAD <= 64: a whole sequence (and its F_PAD x F_PAD scores) fits one program's registers
_MAX_HEAD_DIM = 128
_INT32_MAX = 2**31 - 1


def _attn_config(f_pad: int, d_pad: int, dtype: torch.dtype, backward: bool) -> tuple[int, int, str]:
    """(BLOCK_P, num_warps, dot precision) from a fixed table (no autotuning: CUDA-graph friendly and
    compile-checkable). About 8K elements per (BLOCK_P, F_PAD, D_PAD) tile in 16-bit types, 4K in fp32;
    the backward holds about twice the live tiles of the forward, so it gets 8 warps for the same tile
    (2K elements in fp32: with 4K, Triton 3.6 spilled 72 bytes on sm80). At these sizes no 16-bit launch
    spills (compile_specs: 80-175 registers). At F_PAD = 64 (not a pixeldance launch) Triton 3.9 compiles
    every dtype without spills; 3.4-3.8 spill in the bf16 kernels (up to 26 KB in the backward at head dim
    128): slower there, still correct."""
    fp32 = dtype == torch.float32
    block_p = max(1, ((2048 if backward else 4096) if fp32 else 8192) // (f_pad * d_pad))
    num_warps = 8 if backward or fp32 else 4
    # fp32 inputs: 3xTF32 keeps about fp32 accuracy on tensor cores (plain TF32 would lose ~3 digits,
    # "ieee" FMA dots spill); 16-bit inputs ignore the flag.
    return block_p, num_warps, "tf32x3"


def _pad16(n: int) -> int:
    # Frames and head dim become the M/N/K of m16n8k16 MMAs: powers of two, at least 16.
    return max(16, triton.next_power_of_2(n))


def _aligned(head_dim: int, *tensors: torch.Tensor) -> bool:
    """16-byte aligned base pointers, row strides and head offsets: the kernels may then hint 16-byte
    vector accesses."""
    return all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
               and (head_dim * t.element_size()) % 16 == 0 for t in tensors)


def _emulate_bf16(t: torch.Tensor) -> bool:
    # CPU tensors only ever reach a kernel through the Triton interpreter (see _dot).
    return t.dtype == torch.bfloat16 and not t.is_cuda


def _check_attention_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, heads: int,
                            pixels: int) -> int:
    """Validate the (N, heads*D) layout contract; returns the head dim D."""
    if q.dim() != 2 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must be 2D (N, heads*D) of one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"q, k, v must share one dtype in fp16/bf16/fp32, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError("q, k, v must be on one device")
    if any(t.stride(1) != 1 for t in (q, k, v)):
        raise ValueError("q, k, v need unit column stride (stride(1) == 1); row strides may be anything")
    n, width = q.shape
    if heads < 1 or width % heads:
        raise ValueError(f"heads={heads} does not divide the {width} columns of q")
    head_dim = width // heads
    if head_dim > _MAX_HEAD_DIM:
        raise ValueError(f"head dim {head_dim} > {_MAX_HEAD_DIM} not supported")
    if not 1 <= num_frames <= _MAX_FRAMES:
        raise ValueError(f"num_frames={num_frames} outside 1..{_MAX_FRAMES}")
    if pixels < 1 or n % (num_frames * pixels):
        raise ValueError(f"N={n} rows is not a multiple of num_frames * pixels = {num_frames} * {pixels}")
    # Offsets inside one video are int32 in the kernels (the video's first row is 64-bit).
    if num_frames * pixels * max(t.stride(0) for t in (q, k, v)) + width > _INT32_MAX:
        raise ValueError("one video's q/k/v span more than 2**31 elements: not supported")
    return head_dim


def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, heads: int,
                       pixels: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward: o (N, heads*D) contiguous and lse (heads, N) fp32."""
    n, width = q.shape
    head_dim = width // heads
    o = torch.empty((n, width), dtype=q.dtype, device=q.device)
    lse = torch.empty((heads, n), dtype=torch.float32, device=q.device)
    f_pad, d_pad = _pad16(num_frames), _pad16(head_dim)
    block_p, num_warps, precision = _attn_config(f_pad, d_pad, q.dtype, backward=False)
    videos = n // (num_frames * pixels)
    grid = (videos * triton.cdiv(pixels, block_p), heads)
    _temporal_attn_fwd_kernel[grid](
        q, k, v, o, lse, n, pixels, num_frames,
        q.stride(0), k.stride(0), v.stride(0), o.stride(0),
        scale * _LOG2E,
        D=head_dim, D_PAD=d_pad, F_PAD=f_pad, BLOCK_P=block_p, ALIGNED=_aligned(head_dim, q, k, v, o),
        DOT_PRECISION=precision,
        EMULATE_BF16=_emulate_bf16(q), num_warps=num_warps, num_stages=1,
    )
    return o, lse


def _attention_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                        do: torch.Tensor, num_frames: int, heads: int, pixels: int, scale: float,
                        dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor) -> None:
    """Launch the backward into dq, dk, dv ((N, heads*D), any row stride, unit column stride)."""
    n, width = q.shape
    head_dim = width // heads
    f_pad, d_pad = _pad16(num_frames), _pad16(head_dim)
    block_p, num_warps, precision = _attn_config(f_pad, d_pad, q.dtype, backward=True)
    videos = n // (num_frames * pixels)
    grid = (videos * triton.cdiv(pixels, block_p), heads)
    _temporal_attn_bwd_kernel[grid](
        q, k, v, o, do, lse, dq, dk, dv, n, pixels, num_frames,
        q.stride(0), k.stride(0), v.stride(0), o.stride(0), do.stride(0), dq.stride(0), dk.stride(0),
        dv.stride(0),
        scale,
        D=head_dim, D_PAD=d_pad, F_PAD=f_pad, BLOCK_P=block_p,
        ALIGNED=_aligned(head_dim, q, k, v, o, do, dq, dk, dv),
        DOT_PRECISION=precision, EMULATE_BF16=_emulate_bf16(q), num_warps=num_warps, num_stages=1,
    )


_LAYOUT_BLOCK_C = 64
_LAYOUT_BLOCK_P = 64
_STATS_BLOCK = 1024
_LAYOUT_WARPS = 8  # 64x64 transpose tiles: 4 warps need 120-170 registers a thread, 8 warps 40-80


def _check_video(x: torch.Tensor, num_frames: int, name: str = "x") -> None:
    if x.dim() != 4 or num_frames < 1 or x.shape[0] % num_frames:
        raise ValueError(f"{name} must be (B*F, C, H, W) with num_frames={num_frames} dividing its first dim, "
                         f"got {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (B*F, C, H, W)")
    if x.shape[1] * x.shape[2] * x.shape[3] > _INT32_MAX:
        raise ValueError(f"{name}: one frame spans more than 2**31 elements: not supported")


def _video_to_tokens(x: torch.Tensor, num_frames: int, stats: tuple[torch.Tensor, torch.Tensor] | None,
                     weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float
                     ) -> torch.Tensor:
    """(B*F, C, H, W) -> (B*F*H*W, C) token rows, normalised with the partial `stats` when given."""
    bf, c, h, w = x.shape
    pixels = h * w
    out = torch.empty((bf * pixels, c), dtype=x.dtype, device=x.device)
    mean, m2 = stats if stats is not None else (out, out)  # unused pointers when NORMALIZE is off
    grid = (bf * triton.cdiv(pixels, _LAYOUT_BLOCK_P), triton.cdiv(c, _LAYOUT_BLOCK_C))
    _video_to_tokens_kernel[grid](
        x, out, mean, m2, weight if weight is not None else out, bias if bias is not None else out,
        c, pixels, num_frames, groups, eps,
        NORMALIZE=stats is not None, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        F_PAD=triton.next_power_of_2(num_frames), BLOCK_C=_LAYOUT_BLOCK_C, BLOCK_P=_LAYOUT_BLOCK_P,
        num_warps=_LAYOUT_WARPS,
    )
    return out


def _group_norm_to_tokens_forward(x: torch.Tensor, num_frames: int, weight: torch.Tensor | None,
                                  bias: torch.Tensor | None, groups: int, eps: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token rows and the per-frame partial statistics (mean, m2), (B*F, G) fp32, the backward reuses."""
    bf, c, h, w = x.shape
    chunk = (c // groups) * h * w
    mean = torch.empty((bf, groups), dtype=torch.float32, device=x.device)
    m2 = torch.empty_like(mean)
    # One fixed BLOCK: chunks are 160..10240 elements at the pixeldance shapes, and a half-masked pass over
    # a small chunk costs less than compiling (and checking) one more variant.
    _frame_group_stats_kernel[(bf * groups,)](x, mean, m2, chunk, BLOCK=_STATS_BLOCK, num_warps=4)
    return _video_to_tokens(x, num_frames, (mean, m2), weight, bias, groups, eps), mean, m2


def _group_norm_to_tokens_backward(dy: torch.Tensor, x: torch.Tensor, num_frames: int, weight: torch.Tensor | None,
                                   mean: torch.Tensor, m2: torch.Tensor, groups: int, eps: float,
                                   needs: tuple[bool, bool, bool]) -> tuple:
    """(dx, dweight, dbias) of the GroupNorm-to-tokens from the token gradient dy: per-channel partial sums
    of dy and dy * xhat on the forward's tiles (one kernel), their per-(video, group) means over (B, C)-sized
    tensors, then dx = rstd * (weight * dy - mean(weight * dy) - xhat * mean(weight * dy * xhat)) (one
    kernel). The statistics are the forward's; nothing of the activation's size is recomputed in PyTorch."""
    bf, c, h, w = x.shape
    p, b, cpg = h * w, bf // num_frames, c // groups
    blocks = triton.cdiv(p, _LAYOUT_BLOCK_P)
    grid = (bf * blocks, triton.cdiv(c, _LAYOUT_BLOCK_C))
    f_pad = triton.next_power_of_2(num_frames)
    ps1 = torch.empty((bf * blocks, c), dtype=torch.float32, device=x.device)
    ps2 = torch.empty_like(ps1)
    _tokens_group_norm_bwd_reduce_kernel[grid](
        x, dy, mean, m2, ps1, ps2, c, p, num_frames, groups, eps, dy.stride(0), F_PAD=f_pad,
        BLOCK_C=_LAYOUT_BLOCK_C, BLOCK_P=_LAYOUT_BLOCK_P, num_warps=_LAYOUT_WARPS,
    )
    s1 = ps1.view(b, num_frames * blocks, c).sum(1)  # (B, C): sums of dy and dy * xhat per video
    s2 = ps2.view(b, num_frames * blocks, c).sum(1)
    dweight = s2.sum(0).to(weight.dtype) if needs[1] else None
    dbias = s1.sum(0) if needs[2] else None
    dx = None
    if needs[0]:
        scale = weight.float() if weight is not None else torch.ones(c, device=x.device)
        n = cpg * num_frames * p
        ca = (s1 * scale).view(b, groups, cpg).sum(-1) / n
        cb = (s2 * scale).view(b, groups, cpg).sum(-1) / n
        dx = torch.empty_like(x)
        _tokens_group_norm_bwd_apply_kernel[grid](
            x, dy, mean, m2, weight if weight is not None else ca, ca, cb, dx, c, p, num_frames, groups, eps,
            dy.stride(0), HAS_WEIGHT=weight is not None, F_PAD=f_pad, BLOCK_C=_LAYOUT_BLOCK_C,
            BLOCK_P=_LAYOUT_BLOCK_P, num_warps=_LAYOUT_WARPS,
        )
    return dx, dweight, dbias


def _tokens_to_video_residual_forward(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    bf, c, h, w = x.shape
    pixels = h * w
    out = torch.empty_like(x)
    grid = (bf * triton.cdiv(pixels, _LAYOUT_BLOCK_P), triton.cdiv(c, _LAYOUT_BLOCK_C))
    _tokens_to_video_residual_kernel[grid](t, x, out, c, pixels, t.stride(0), BLOCK_C=_LAYOUT_BLOCK_C,
                                           BLOCK_P=_LAYOUT_BLOCK_P, num_warps=_LAYOUT_WARPS)
    return out


def _unit_column_stride(t: torch.Tensor) -> torch.Tensor:
    # Incoming gradients are normally contiguous; an expanded or transposed one is copied once.
    return t if t.stride(1) == 1 else t.contiguous()


class _TemporalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, num_frames, heads, pixels, scale):
        o, lse = _attention_forward(q, k, v, num_frames, heads, pixels, scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (num_frames, heads, pixels, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (q, k, v))
        _attention_backward(q, k, v, o, lse, _unit_column_stride(do), *ctx.args, dq, dk, dv)
        return dq, dk, dv, None, None, None, None


class _TemporalAttentionQKV(torch.autograd.Function):
    """Same op on one fused (N, 3*heads*D) projection: the backward writes one (N, 3*heads*D) gradient
    instead of three slice gradients that autograd would scatter into three zero-filled copies."""

    @staticmethod
    def forward(ctx, qkv, num_frames, heads, pixels, scale):
        o, lse = _attention_qkv(qkv, num_frames, heads, pixels, scale)
        ctx.save_for_backward(qkv, o, lse)
        ctx.args = (num_frames, heads, pixels, scale)
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        qkv, o, lse = ctx.saved_tensors
        return _attention_qkv_backward(do, qkv, o, lse, *ctx.args), None, None, None, None


class _VideoGroupNormToTokens(torch.autograd.Function):
    """Fused forward (statistics, then normalise-and-transpose); backward in two kernels on the saved
    statistics (`_group_norm_to_tokens_backward`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, num_frames, groups, eps):
        y, mean, m2 = _group_norm_to_tokens_forward(x, num_frames, weight, bias, groups, eps)
        ctx.save_for_backward(x, weight, mean, m2)
        ctx.args = (num_frames, groups, eps)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, m2 = ctx.saved_tensors
        num_frames, groups, eps = ctx.args
        needs = tuple(ctx.needs_input_grad[:3])
        dx, dweight, dbias = _group_norm_to_tokens_backward(_unit_column_stride(dy), x, num_frames, weight, mean, m2,
                                                            groups, eps, needs)
        if dbias is not None:
            dbias = dbias.to(ctx.bias_dtype)
        return dx, dweight, dbias, None, None, None


class _TokensToVideoResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, x, num_frames):
        ctx.num_frames = num_frames
        return _tokens_to_video_residual_forward(t, x)

    @staticmethod
    def backward(ctx, dout):
        # d(x + layout(t)) = (dout, layout^-1(dout)): the token gradient is the same transpose-copy kernel.
        dt = _video_to_tokens_copy(dout, ctx.num_frames) if ctx.needs_input_grad[0] else None
        return dt, dout if ctx.needs_input_grad[1] else None, None


# ------------------------------------------------------------------------------------------------- public API


def temporal_attention_with_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, heads: int,
                                scale: float | None = None, *, pixels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`temporal_attention` that also returns the log-sum-exp of the scaled scores, (heads, N) fp32
    (natural log; not differentiable)."""
    head_dim = _check_attention_inputs(q, k, v, num_frames, heads, pixels)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    return _TemporalAttention.apply(q, k, v, num_frames, heads, pixels, scale)


def temporal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_frames: int, heads: int,
                       scale: float | None = None, *, pixels: int) -> torch.Tensor:
    """Bidirectional multi-head self-attention over the frames of every pixel (autograd-aware).

    q, k, v: (N, heads*D) token rows in (b, f, p) order, N = B * num_frames * pixels (pixels = H*W: the
    frame stride in rows); any row stride (e.g. column slices of a fused qkv projection), unit column
    stride. Head dim D <= 128 (any; padded to a power of two >= 16 inside), num_frames in 1..64; scale
    defaults to 1/sqrt(D).
    Returns o (N, heads*D), contiguous, same row order and dtype.
    """
    return temporal_attention_with_lse(q, k, v, num_frames, heads, scale, pixels=pixels)[0]


def temporal_attention_qkv(qkv: torch.Tensor, num_frames: int, heads: int, scale: float | None = None, *,
                           pixels: int) -> torch.Tensor:
    """`temporal_attention` on a fused (N, 3*heads*D) projection [q | k | v]; its gradient is one
    (N, 3*heads*D) tensor written in place by the backward kernel."""
    if qkv.dim() != 2 or qkv.shape[1] % 3:
        raise ValueError(f"qkv must be (N, 3*heads*D), got {tuple(qkv.shape)}")
    width = qkv.shape[1] // 3
    head_dim = _check_attention_inputs(qkv[:, :width], qkv[:, width:2 * width], qkv[:, 2 * width:], num_frames,
                                       heads, pixels)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    if operator_path():  # the operators below
        return _attention_qkv_op(qkv, num_frames, heads, pixels, scale)[0]
    return _TemporalAttentionQKV.apply(qkv, num_frames, heads, pixels, scale)[0]


def video_group_norm_to_tokens(x: torch.Tensor, num_frames: int, weight: torch.Tensor | None,
                               bias: torch.Tensor | None, groups: int, eps: float) -> torch.Tensor:
    """GroupNorm of x (B*F, C, H, W) with statistics per video (over C/G x F x H x W, fp32), written
    straight as token rows (B*F*H*W, C) in (b, f, p) order: `video_group_norm` + the permute copy in two
    launches (per-frame partial statistics, then normalise-and-transpose). Autograd-aware: the backward is
    two kernels on the saved statistics (partial sums, then dx) and a few (B, C)-sized reductions."""
    _check_video(x, num_frames)
    c = x.shape[1]
    if groups < 1 or c % groups:
        raise ValueError(f"groups={groups} does not divide C={c}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (p.shape != (c,) or p.device != x.device):
            raise ValueError(f"{name} must be ({c},) on {x.device}, got {tuple(p.shape)} on {p.device}")
    if operator_path():  # the operators below
        return _group_norm_to_tokens_op(x, num_frames, weight, bias, groups, float(eps))[0]
    return _VideoGroupNormToTokens.apply(x, weight, bias, num_frames, groups, float(eps))


def tokens_to_video_residual(t: torch.Tensor, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """x + t, the token rows t (B*F*H*W, C) in (b, f, p) order (any row stride, unit column stride) laid
    back out as x's contiguous (B*F, C, H, W): the inverse layout change fused with the residual add.
    Autograd-aware (the token gradient is one transpose-copy kernel)."""
    _check_video(x, num_frames)
    bf, c, h, w = x.shape
    if t.dim() != 2 or t.shape != (bf * h * w, c) or t.stride(1) != 1:
        raise ValueError(f"t must be ({bf * h * w}, {c}) token rows with unit column stride, got {tuple(t.shape)} "
                         f"strides {t.stride()}")
    if t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"t and x must share dtype and device, got {t.dtype}/{t.device} and {x.dtype}/{x.device}")
    if operator_path():  # the operators below
        return _tokens_to_video_residual_op(t, x, num_frames)
    return _TokensToVideoResidual.apply(t, x, num_frames)


# ------------------------------------------------------------------------------- operators for torch.compile
# Under torch.compile each entry point above is one opaque operator with its backward registered (a second
# operator where the backward runs kernels): traced code sees nodes with shapes from the fake implementations
# instead of walking into the launchers and kernels (which Dynamo cannot trace on the CPU interpreter), for
# inference and training alike. Eager calls skip the dispatcher and use the autograd Functions above.


def _attention_qkv(qkv: torch.Tensor, num_frames: int, heads: int, pixels: int,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    width = qkv.shape[1] // 3
    return _attention_forward(qkv[:, :width], qkv[:, width:2 * width], qkv[:, 2 * width:], num_frames, heads,
                              pixels, scale)


_attention_qkv_op = torch.library.custom_op("pdengine::temporal_attention_qkv", _attention_qkv, mutates_args=())


@_attention_qkv_op.register_fake
def _(qkv, num_frames, heads, pixels, scale):
    return (qkv.new_empty((qkv.shape[0], qkv.shape[1] // 3)),
            qkv.new_empty((heads, qkv.shape[0]), dtype=torch.float32))


def _attention_qkv_backward(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor, num_frames: int,
                            heads: int, pixels: int, scale: float) -> torch.Tensor:
    width = qkv.shape[1] // 3
    dqkv = torch.empty(qkv.shape, dtype=qkv.dtype, device=qkv.device)
    parts = [(t[:, :width], t[:, width:2 * width], t[:, 2 * width:]) for t in (qkv, dqkv)]
    _attention_backward(*parts[0], o, lse, _unit_column_stride(do), num_frames, heads, pixels, scale, *parts[1])
    return dqkv


_attention_qkv_backward_op = torch.library.custom_op("pdengine::temporal_attention_qkv_backward",
                                                     _attention_qkv_backward, mutates_args=())


@_attention_qkv_backward_op.register_fake
def _(do, qkv, o, lse, num_frames, heads, pixels, scale):
    return torch.empty_like(qkv)


def _attention_qkv_setup(ctx, inputs, output):
    qkv, num_frames, heads, pixels, scale = inputs
    ctx.save_for_backward(qkv, *output)
    ctx.args = (num_frames, heads, pixels, scale)


def _attention_qkv_grad(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return _attention_qkv_backward_op(do, qkv, o, lse, *ctx.args), None, None, None, None


_attention_qkv_op.register_autograd(_attention_qkv_grad, setup_context=_attention_qkv_setup)


_group_norm_to_tokens_op = torch.library.custom_op("pdengine::video_group_norm_to_tokens",
                                                   _group_norm_to_tokens_forward, mutates_args=())


@_group_norm_to_tokens_op.register_fake
def _(x, num_frames, weight, bias, groups, eps):
    bf, c, h, w = x.shape
    stats = x.new_empty((bf, groups), dtype=torch.float32)
    return x.new_empty((bf * h * w, c)), stats, torch.empty_like(stats)


def _group_norm_to_tokens_grads(dy: torch.Tensor, x: torch.Tensor, num_frames: int, weight: torch.Tensor | None,
                                mean: torch.Tensor, m2: torch.Tensor, groups: int, eps: float,
                                needs: List[bool]) -> List[torch.Tensor]:
    """[dx, dweight, dbias]; one that was not needed is an empty tensor."""
    grads = _group_norm_to_tokens_backward(_unit_column_stride(dy), x, num_frames, weight, mean, m2, groups, eps,
                                           tuple(needs))
    return [g if g is not None else dy.new_empty(0) for g in grads]


_group_norm_to_tokens_backward_op = torch.library.custom_op("pdengine::video_group_norm_to_tokens_backward",
                                                            _group_norm_to_tokens_grads, mutates_args=())


@_group_norm_to_tokens_backward_op.register_fake
def _(dy, x, num_frames, weight, mean, m2, groups, eps, needs):
    c = x.shape[1]
    shapes = (x.shape, (c,), (c,))
    dtypes = (x.dtype, weight.dtype if weight is not None else torch.float32, torch.float32)
    return [x.new_empty(shape, dtype=dt) if need else dy.new_empty(0) for shape, dt, need in zip(shapes, dtypes, needs)]


def _group_norm_to_tokens_setup(ctx, inputs, output):
    x, num_frames, weight, bias, groups, eps = inputs
    ctx.save_for_backward(x, weight, output[1], output[2])
    ctx.args = (num_frames, groups, eps)
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _group_norm_to_tokens_grad(ctx, dy, _dmean, _dm2):
    x, weight, mean, m2 = ctx.saved_tensors
    num_frames, groups, eps = ctx.args
    needs = [bool(ctx.needs_input_grad[i]) for i in (0, 2, 3)]
    dx, dweight, dbias = _group_norm_to_tokens_backward_op(dy, x, num_frames, weight, mean, m2, groups, eps, needs)
    return (dx if needs[0] else None, None, dweight if needs[1] else None,
            dbias.to(ctx.bias_dtype) if needs[2] else None, None, None)


_group_norm_to_tokens_op.register_autograd(_group_norm_to_tokens_grad, setup_context=_group_norm_to_tokens_setup)


def _tokens_to_video_residual(t: torch.Tensor, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    return _tokens_to_video_residual_forward(t, x)


_tokens_to_video_residual_op = torch.library.custom_op("pdengine::tokens_to_video_residual", _tokens_to_video_residual,
                                                       mutates_args=())


@_tokens_to_video_residual_op.register_fake
def _(t, x, num_frames):
    return torch.empty_like(x)


def _video_to_tokens_copy(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    return _video_to_tokens(x.contiguous(), num_frames, None, None, None, 1, 0.0)


_video_to_tokens_op = torch.library.custom_op("pdengine::video_to_tokens", _video_to_tokens_copy, mutates_args=())


@_video_to_tokens_op.register_fake
def _(x, num_frames):
    bf, c, h, w = x.shape
    return x.new_empty((bf * h * w, c))


def _tokens_to_video_residual_setup(ctx, inputs, output):
    ctx.num_frames = inputs[2]


def _tokens_to_video_residual_grad(ctx, dout):
    # d(x + layout(t)) = (dout, layout^-1(dout)): the token gradient is the transpose-copy kernel.
    dt = _video_to_tokens_op(dout, ctx.num_frames) if ctx.needs_input_grad[0] else None
    return dt, dout if ctx.needs_input_grad[1] else None, None


_tokens_to_video_residual_op.register_autograd(_tokens_to_video_residual_grad,
                                               setup_context=_tokens_to_video_residual_setup)


def modeled_bytes(batch: int, num_frames: int, pixels: int, heads: int, head_dim: int,
                  dtype: torch.dtype = torch.bfloat16, *, backward: bool = False) -> int:
    """Minimum HBM bytes of one attention call on B*F*P token rows: the forward reads q, k, v once and
    writes o and the fp32 lse; the backward reads q, k, v, o, dO and the lse once and writes dq, dk, dv
    (delta = rowsum(dO * O) is computed in-program, so o is its only extra read)."""
    item = torch.empty((), dtype=dtype).element_size()
    tensor = batch * num_frames * pixels * heads * head_dim * item
    lse = batch * num_frames * pixels * heads * 4
    return (5 + 3) * tensor + lse if backward else (3 + 1) * tensor + lse


def modeled_layout_bytes(batch: int, num_frames: int, pixels: int, channels: int, groups: int,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Minimum HBM bytes of the two layout kernels: `video_group_norm_to_tokens` reads x twice (statistics
    pass, then normalise pass) and writes the tokens, plus the fp32 per-(frame, group) partials (written
    once, read by the F frames' channel blocks: counted once); `tokens_to_video_residual` reads t and x
    and writes the output."""
    item = torch.empty((), dtype=dtype).element_size()
    tensor = batch * num_frames * pixels * channels * item
    partials = 2 * batch * num_frames * groups * 4
    return {"group_norm_to_tokens": 3 * tensor + 2 * partials, "tokens_to_video_residual": 3 * tensor}


# ----------------------------------------------------------------------------------------------- compile check


def _attention_signature(ptr: str, backward: bool) -> dict[str, str]:
    names = ["q_ptr", "k_ptr", "v_ptr", "o_ptr"] + (["do_ptr"] if backward else [])
    sig = {name: ptr for name in names}
    sig["lse_ptr"] = "*fp32"
    strides = ["q", "k", "v", "o"]
    if backward:
        sig.update({name: ptr for name in ("dq_ptr", "dk_ptr", "dv_ptr")})
        strides += ["do", "dq", "dk", "dv"]
    sig.update({name: "i32" for name in ["N", "P", "F"] + [f"stride_{t}_n" for t in strides]})
    sig["scale" if backward else "qk_scale"] = "fp32"
    sig.update({name: "constexpr" for name in ("D", "D_PAD", "F_PAD", "BLOCK_P", "ALIGNED", "DOT_PRECISION",
                                                "EMULATE_BF16")})
    return sig


def compile_specs() -> list[CompileSpec]:
    """The distinct launches: attention at the pixeldance shapes (head dim 64, F = 16; heads 5/8/10/20 and
    P = 1024/256/64/16 are runtime values, so one config per direction) in bf16 and fp32, plus F = 64 and
    D = 128 in bf16 to show the largest tiles compile without spills too; then the layout kernels.

    Names are unique: `compile_check.compile_all` finds them by name in its non-interpreted child process.
    """
    types = {torch.bfloat16: "*bf16", torch.float32: "*fp32"}
    configs = [  # (name, dtype, num_frames, head_dim)
        ("f16_d64_bf16", torch.bfloat16, 16, 64),
        ("f16_d64_fp32", torch.float32, 16, 64),
        ("f64_d64_bf16", torch.bfloat16, 64, 64),
        ("f16_d128_bf16", torch.bfloat16, 16, 128),
        ("f64_d128_bf16", torch.bfloat16, 64, 128),
    ]
    specs = []
    for name, dtype, frames, head_dim in configs:
        f_pad = _pad16(frames)
        for backward, fn in ((False, _temporal_attn_fwd_kernel), (True, _temporal_attn_bwd_kernel)):
            block_p, num_warps, precision = _attn_config(f_pad, head_dim, dtype, backward)
            specs.append(CompileSpec(
                name=f"temporal_attn_{'bwd' if backward else 'fwd'}_{name}",
                fn=fn,
                signature=_attention_signature(types[dtype], backward),
                constexprs={"D": head_dim, "D_PAD": head_dim, "F_PAD": f_pad, "BLOCK_P": block_p, "ALIGNED": True,
                            "DOT_PRECISION": precision, "EMULATE_BF16": False},
                num_warps=num_warps, num_stages=1, expects_mma=True,
            ))
    return specs + _layout_compile_specs()


def _layout_compile_specs() -> list[CompileSpec]:
    """The layout kernels at the pixeldance shapes (F = 16 for the temporal transformers, 1 for the spatial
    ones; C, H, W and the groups are runtime values), bf16 and fp32 activations. Channels, pixels (and row
    strides) are multiples of 16 at every level there, which the launcher specializes on: compiled so, the
    activations move as 16-byte vectors both ways (the transposes go through shared memory), which each spec
    requires of its SASS (no sub-word global accesses)."""
    specs = []
    for dtype in ("bf16", "fp32"):
        specs.append(CompileSpec(
            name=f"video_group_stats_{dtype}", fn=_frame_group_stats_kernel,
            signature={"x_ptr": f"*{dtype}", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "chunk": "i32",
                       "BLOCK": "constexpr"},
            constexprs={"BLOCK": _STATS_BLOCK}, num_warps=4, num_stages=1, divisible=("chunk",),
            max_narrow_global=1,  # the chunk's first value (the shift of its sums)
        ))
    tokens_sig = {"x_ptr": "", "out_ptr": "", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "w_ptr": "*fp32",
                  "b_ptr": "*fp32", "C": "i32", "P": "i32", "F": "i32", "G": "i32", "eps": "fp32"}
    tokens_sig.update({name: "constexpr" for name in ("NORMALIZE", "HAS_WEIGHT", "HAS_BIAS", "F_PAD", "BLOCK_C",
                                                       "BLOCK_P")})
    # F_PAD 16: the temporal transformers (16 frames per video); 1: the spatial transformers, which run the
    # GroupNorm-to-tokens with one frame per "video" (per-image statistics), suffix "_image".
    for dtype in ("bf16", "fp32"):
        for normalize in (True, False):  # GroupNorm to tokens / the residual's token gradient
            for f_pad in ((16, 1) if normalize else (16,)):
                specs.append(CompileSpec(
                    name=f"video_to_tokens_{'norm' if normalize else 'copy'}_{dtype}{'_image' if f_pad == 1 else ''}",
                    fn=_video_to_tokens_kernel, signature={**tokens_sig, "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}"},
                    constexprs={"NORMALIZE": normalize, "HAS_WEIGHT": normalize, "HAS_BIAS": normalize,
                                "F_PAD": f_pad, "BLOCK_C": _LAYOUT_BLOCK_C, "BLOCK_P": _LAYOUT_BLOCK_P},
                    num_warps=_LAYOUT_WARPS, num_stages=1, divisible=("C", "P"), max_narrow_global=0,
                ))
        bwd_sig = {"x_ptr": f"*{dtype}", "dy_ptr": f"*{dtype}", "mean_ptr": "*fp32", "m2_ptr": "*fp32", "C": "i32",
                   "P": "i32", "F": "i32", "G": "i32", "eps": "fp32", "stride_dy_n": "i32"}
        for f_pad in (16, 1):
            blocks = {"F_PAD": f_pad, "BLOCK_C": _LAYOUT_BLOCK_C, "BLOCK_P": _LAYOUT_BLOCK_P}
            for fn, extra, consts in (
                (_tokens_group_norm_bwd_reduce_kernel, {"ps1_ptr": "*fp32", "ps2_ptr": "*fp32"}, blocks),
                (_tokens_group_norm_bwd_apply_kernel,
                 {"w_ptr": "*fp32", "ca_ptr": "*fp32", "cb_ptr": "*fp32", "dx_ptr": f"*{dtype}"},
                 {"HAS_WEIGHT": True, **blocks}),
            ):
                types = {**bwd_sig, **extra, **{k: "constexpr" for k in consts}}
                specs.append(CompileSpec(
                    name=f"{fn.__name__.strip('_').removesuffix('_kernel')}_{dtype}{'_image' if f_pad == 1 else ''}",
                    fn=fn, signature={name: types[name] for name in fn.arg_names},  # the kernel's argument order
                    constexprs=consts, num_warps=_LAYOUT_WARPS, num_stages=1,
                    divisible=("C", "P", "stride_dy_n"), max_narrow_global=0,
                ))
        specs.append(CompileSpec(
            name=f"tokens_to_video_residual_{dtype}", fn=_tokens_to_video_residual_kernel,
            signature={"t_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "out_ptr": f"*{dtype}", "C": "i32", "P": "i32",
                       "stride_t_n": "i32", "BLOCK_C": "constexpr", "BLOCK_P": "constexpr"},
            constexprs={"BLOCK_C": _LAYOUT_BLOCK_C, "BLOCK_P": _LAYOUT_BLOCK_P}, num_warps=_LAYOUT_WARPS,
            num_stages=1, divisible=("C", "P", "stride_t_n"), max_narrow_global=0,
        ))
    return specs
