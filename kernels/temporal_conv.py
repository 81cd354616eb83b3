"""Fused temporal conv block (ModelScope / diffusers `TemporalConvLayer`) in Triton, forward and backward.

The block is x + stage4(stage3(stage2(stage1(x)))), each stage GroupNorm (per video over channels-of-group
x frames x pixels) -> SiLU -> [dropout, stages 2-4, training] -> conv over frames (kernel 3, padding 1) +
bias. Everything reads the UNet's (B*F, C, H, W) layout in place (rows ordered (b, f)); there are no
permute copies. Reference: `temporal_conv_ref.py`.

Forward, per stage (one launch of `_stage_fwd_kernel` + one tiny `_gn_finalize_kernel`):
  * The conv is an implicit GEMM: out[o, n] = sum_k sum_c W[o, c, k] * a[c, n shifted by k - 1 frames],
    where the GEMM column n runs over the (frame, pixel) positions of one video, so a tile can span several
    frames when H*W is small (the 4x4 and 8x8 UNet levels) and the frame shift is just an address offset.
  * a = dropout(silu((h - mean) * rstd * gamma + beta)) is computed while the input tile is loaded (from
    per-(video, channel) center / scale / shift; the mean is subtracted before scaling so large-mean inputs
    do not cancel), cast to the GEMM dtype and fed to tl.dot (tensor cores, fp32 accumulator). The operand
    is recomputed by every output tile that reads it: 3 taps x C_out / BLOCK_M times.
  * Epilogue: + bias, + the block's residual (stage 4), store, and per-row partial statistics of the stored
    (rounded) output for the next stage's GroupNorm: the row's mean and sum of squared deviations, by the
    corrected two-pass algorithm on the tile in registers.
  * Statistics are deterministic per-tile partials (no atomics: same bits every run), combined per (video,
    group) by `_gn_finalize_kernel`: the mean relative to one partial's mean, then Chan's parallel-variance
    formula. E[y^2] - mean^2 is not used: for activations whose mean is large against their spread
    (x ~ 50 + N(0, 1)) it cancels ~2500 against ~2501 and keeps only 3-4 of fp32's 7 digits. Stage 1 gets
    its statistics from `_stats_kernel` (one read of x).
  * Variant (`_GemmConfig.prenorm`): `_norm_act_kernel` writes a once (same arithmetic and mask) and the
    conv kernel runs as a plain implicit GEMM on it (`PRENORM`), trading one write + read of the activation
    for the prologue's recompute; `pdengine bench conv-configs` times both on a GPU.
  * Variant (`set_conv_gemm("cublas")`, env PDENGINE_CONV_GEMM=cublas): `_pad_kernel` writes a with a zero
    frame before and after each video, the conv runs as one cuBLAS batched GEMM over overlapping
    three-frame windows of it (`_window_gemm`: no copies), and `_gemm_epilogue_kernel` adds bias and
    residual and takes the statistics. Its backward (`_stage_backward_cublas`) pads g the same way for the
    transposed conv, and the weight gradient is three plain GEMMs of channel-major padded g and a; the
    dgrad epilogue runs as `_act_bwd_kernel`. Either direction can use either GEMM (same saved tensors).
    The second cuBLAS variant (`cublas_im2col`) has `_pad_kernel` write each window's three frames as a
    column block of one (3*C, windows*HW) matrix and runs the conv (or its transpose, on g) as a single GEMM
    over it: three times the bytes written, for one wide GEMM instead of many thin ones at small H*W.
  * Which variant and tile each stage runs: `set_conv_gemm` ("auto" by default) and, on a GPU, its launch
    table (`temporal_conv_table.py`, measured per GPU model by `pdengine tune`): per kind of GEMM (fwd,
    dgrad, wgrad), dtype and shape, cuBLAS or the fastest correct Triton tile. No table: the fused kernels
    with the built-in tiles (`_gemm_config`, `_dgrad_config`, `_wgrad_config`).
  * Dropout: keep = tl.rand(seed + stage, i) >= p with i the element's flat index in (B*F, C, H*W), so the
    three output frames that read an element, and the backward, regenerate the same mask. `dropout_masks`
    materialises it for tests. The seed changes every training step, so the kernels that take it are not
    specialized on its value (`do_not_specialize`): a seed that happens to be 1 or a multiple of 16 would
    otherwise compile another variant of each kernel mid-run.

Backward (training), per stage, from g = dLoss/d(stage output):
  * `_stage_wgrad_kernel`: dW[o, c, k] = sum_n g[o, n] a[c, n + k - 1] with a recomputed from the saved stage
    input, and dbias = sum_n g; split over n in a few deterministic partials, summed by `_sum_splits_kernel`.
  * `_stage_dgrad_kernel`: da = the transposed temporal conv (implicit GEMM with W^T and frame-shifted g);
    its epilogue applies dropout and SiLU backward giving dn = dLoss/d(normalised+affine input), stores dn
    and per-row partial sums of dn and dn * xhat.
  * `_gn_bwd_reduce_kernel`: per (video, group) reductions -> dgamma, dbeta and the coefficients of
    dh = A * dn + B * h + C; `_gn_bwd_apply_kernel` applies them (+ the residual's gradient for stage 1).
  Saved for backward: the four stage inputs (x, y1, y2, y3, each the size of x; x is the caller's tensor)
  plus tiny per-(video, group/channel) statistics; the dropout masks are regenerated from the seed.
  Recomputing y1..y3 instead would save 3 activations of memory per layer at the price of running stages
  1-3 forward again (3/4 of the forward) inside every backward; the UNet holds many larger saved activations
  (attention, ResNet blocks) besides, so memory is spent to save time here. Nothing of the backward runs in
  PyTorch except allocations and views of the parameter gradients.

Dtypes: activations fp32, fp16 or bf16; the convs run in x's dtype (weights of another dtype are cast
once per call), GroupNorm parameters are read as fp32, statistics and accumulators are fp32, parameter
gradients come back in each parameter's dtype. fp32 GEMMs use exact IEEE products (input_precision="ieee"),
not TF32, so fp32 matches the reference to ~1e-5. On CPU tensors (the Triton interpreter) bf16 GEMMs and
casts are emulated with fp32 (`_dot`, `_cast`): the interpreter multiplies bf16 bit patterns and truncates.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator, Sequence
from typing import List, NamedTuple

import torch
import triton
import triton.language as tl

from . import operator_path
from . import temporal_conv_table as conv_table
from .compile_check import CompileSpec
from .temporal_conv_table import ConvTable

logger = logging.getLogger("pdengine")

# --------------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------------


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, INTERPRETED: tl.constexpr):
    """acc + a @ b with fp32 accumulation."""
    if INTERPRETED:
        # Triton's CPU interpreter (3.9) keeps bf16 as raw uint16 and would multiply the bit patterns. A
        # product of two bf16 (or fp16) values is exact in fp32: upcasting gives what tensor cores give.
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=PRECISION)
    return out


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERPRETED: tl.constexpr):
    """fp32 x -> dtype, rounding to nearest even."""
    if INTERPRETED:
        if dtype == tl.bfloat16:
            # The interpreter truncates fp32 -> bf16 where the GPU rounds to nearest even: round the bit
            # pattern first so the cast is exact and CPU tests see the GPU's rounding error, not twice it.
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            y = bits.to(tl.float32, bitcast=True).to(dtype)
        else:
            y = x.to(dtype)
    else:
        y = x.to(dtype)
    return y


@triton.jit
def _row_stats(v, mask, cnt):
    """Mean and sum of squared deviations of each row of v (fp32, zeros where masked; cnt valid columns),
    by the corrected two-pass algorithm: the second pass measures the first mean's rounding error, so a
    large common offset (activations around 50) costs no accuracy."""
    mean0 = tl.sum(v, axis=1) / cnt
    dev = tl.where(mask, v - mean0[:, None], 0.0)
    corr = tl.sum(dev, axis=1)
    return mean0 + corr / cnt, tl.sum(dev * dev, axis=1) - corr * corr / cnt


@triton.jit
def _store_row_stats(v, mask, n_ok, pmean_ptr, pm2_ptr, part, row_ok):
    """Store the per-row partial statistics (mean, squared deviations) of the fp32 tile v over its valid
    columns n_ok, at `part` (the rows' (b, tile, channel) index)."""
    row_mean, row_m2 = _row_stats(tl.where(mask, v, 0.0), mask, tl.sum(n_ok.to(tl.float32), axis=0))
    tl.store(pmean_ptr + part, row_mean, mask=row_ok)
    tl.store(pm2_ptr + part, row_m2, mask=row_ok)


@triton.jit
def _channel_tile(C, F, HW, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (channel, (frame, pixel)) tile of the elementwise-and-statistics kernels, grid (channel blocks,
    column blocks, videos): channel offsets and mask, column mask, the columns' frame and pixel, the tile mask."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C
    n_ok = offs_n < F * HW
    return offs_c, c_ok, n_ok, offs_n // HW, offs_n % HW, c_ok[:, None] & n_ok[None, :]


@triton.jit(do_not_specialize=["seed"])
def _stage_fwd_kernel(
    h_ptr,  # (B*F, C_in, HW) stage input
    w_ptr,  # (C_out, C_in, 3) conv weight, channels contiguous (see _weight3)
    bias_ptr,  # (C_out,)
    center_ptr,  # (B, C_in) fp32: GroupNorm as (h - center) * scale + shift (the group's mean)
    scale_ptr,  # (B, C_in) fp32: rstd * gamma
    shift_ptr,  # (B, C_in) fp32: beta
    res_ptr,  # (B*F, C_out, HW) residual, read when HAS_RESIDUAL
    y_ptr,  # (B*F, C_out, HW) output
    pmean_ptr,  # (B, NT, C_out) fp32: per-row means of the stored y, written when HAS_STATS
    pm2_ptr,  # (B, NT, C_out) fp32: per-row sums of squared deviations from the row mean
    C_in, C_out, F, HW, NT, seed, p_drop, drop_scale,
    stride_w_o, stride_w_k,
    HAS_RESIDUAL: tl.constexpr, HAS_STATS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
    PRENORM: tl.constexpr = False,  # h_ptr already holds the activation (`_norm_act_kernel`): a plain GEMM
):
    pid_o = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (frame, pixel) positions of video b
    o_ok = offs_o < C_out
    n_ok = offs_n < F * HW
    f = offs_n // HW
    p = offs_n % HW
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
    num_c = tl.cdiv(C_in, BLOCK_C)
    # One flat loop over (tap, channel chunk) so the compiler pipelines a single loop.
    for it in range(0, 3 * num_c):
        k = it // num_c
        c0 = (it - k * num_c) * BLOCK_C
        fk = f + (k - 1)
        col_ok = n_ok & (fk >= 0) & (fk < F)  # frames -1 and F are the conv's zero padding
        col = (b * F + tl.where(col_ok, fk, 0)) * (C_in * HW) + p
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < C_in
        offs = offs_c[:, None] * HW + col[None, :]
        mask = c_ok[:, None] & col_ok[None, :]
        w = tl.load(w_ptr + offs_o[:, None] * stride_w_o + offs_c[None, :] + k * stride_w_k,
                    mask=o_ok[:, None] & c_ok[None, :], other=0.0)
        if PRENORM:
            acc = _dot(w, tl.load(h_ptr + offs, mask=mask, other=0.0), acc, DOT_PRECISION, INTERPRETED)
        else:
            h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            center = tl.load(center_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
            scale = tl.load(scale_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
            shift = tl.load(shift_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
            # Subtract the mean before scaling: h * scale - mean * scale would cancel for large-mean inputs.
            t = (h - center[:, None]) * scale[:, None] + shift[:, None]
            a = t * tl.sigmoid(t)
            if HAS_DROPOUT:
                a = tl.where(tl.rand(seed, offs) >= p_drop, a * drop_scale, 0.0)
            # Padding must contribute 0, not silu(shift): mask after the activation.
            a = tl.where(mask, a, 0.0)
            acc = _dot(w, _cast(a, w.dtype, INTERPRETED), acc, DOT_PRECISION, INTERPRETED)

    bias = tl.load(bias_ptr + offs_o, mask=o_ok, other=0.0).to(tl.float32)
    acc += bias[:, None]
    out_offs = offs_o[:, None] * HW + ((b * F + f) * (C_out * HW) + p)[None, :]
    out_mask = o_ok[:, None] & n_ok[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + out_offs, mask=out_mask, other=0.0).to(tl.float32)
    y = _cast(acc, y_ptr.dtype.element_ty, INTERPRETED)
    tl.store(y_ptr + out_offs, y, mask=out_mask)
    if HAS_STATS:
        # Statistics of the values as stored (rounded), which is what the next stage normalises.
        _store_row_stats(y.to(tl.float32), out_mask, n_ok, pmean_ptr, pm2_ptr, (b * NT + pid_n) * C_out + offs_o,
                         o_ok)


@triton.jit
def _stats_kernel(
    x_ptr,  # (B*F, C, HW)
    pmean_ptr,  # (B, NT, C) fp32: per-row means
    pm2_ptr,  # (B, NT, C) fp32: per-row sums of squared deviations from the row mean
    C, F, HW, NT,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    b = tl.program_id(2)
    offs_c, c_ok, n_ok, f, p, mask = _channel_tile(C, F, HW, BLOCK_C, BLOCK_N)
    x = tl.load(x_ptr + offs_c[:, None] * HW + ((b * F + f) * (C * HW) + p)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    _store_row_stats(x, mask, n_ok, pmean_ptr, pm2_ptr, (b * NT + tl.program_id(1)) * C + offs_c, c_ok)


@triton.jit
def _gn_finalize_kernel(
    pmean_ptr,  # (B, NT, C) fp32 per-row partial means (row = channel, TILE_N columns of one video)
    pm2_ptr,  # (B, NT, C) fp32 per-row partial squared deviations
    gamma_ptr,  # (C,)
    beta_ptr,  # (C,)
    mean_ptr,  # (B, G) fp32 out
    rstd_ptr,  # (B, G) fp32 out
    center_ptr,  # (B, C) fp32 out: the group's mean
    scale_ptr,  # (B, C) fp32 out: rstd * gamma
    shift_ptr,  # (B, C) fp32 out: beta
    C, G, CPG, NT, FHW, TILE_N, eps,
    BLOCK_T: tl.constexpr, BLOCK_CPG: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // G
    g = pid % G
    j = tl.arange(0, BLOCK_CPG)
    c_ok = j < CPG
    offs_c = g * CPG + j
    n_total = (CPG * FHW).to(tl.float32)
    # Means of the partials relative to one of them: the differences are small and exact, so the group
    # mean is rounded once (a sum of ~50-valued means would round at every step).
    ref = tl.load(pmean_ptr + b * NT * C + g * CPG)
    total = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < NT)[:, None] & c_ok[None, :]
        m = tl.load(pmean_ptr + (b * NT + t[:, None]) * C + offs_c[None, :], mask=mask, other=0.0)
        cnt = tl.minimum(TILE_N, FHW - t * TILE_N).to(tl.float32)
        total += tl.sum(tl.where(mask, cnt[:, None] * (m - ref), 0.0), axis=0)
    mean = ref + tl.sum(total, axis=0) / n_total
    # Chan et al.: M2 = sum_i M2_i + n_i (mean_i - mean)^2, every term non-negative, no cancellation.
    m2 = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
    for t0 in range(0, NT, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        mask = (t < NT)[:, None] & c_ok[None, :]
        offs = (b * NT + t[:, None]) * C + offs_c[None, :]
        m = tl.load(pmean_ptr + offs, mask=mask, other=0.0)
        q = tl.load(pm2_ptr + offs, mask=mask, other=0.0)
        cnt = tl.minimum(TILE_N, FHW - t * TILE_N).to(tl.float32)
        dev = m - mean
        m2 += tl.sum(tl.where(mask, q + cnt[:, None] * dev * dev, 0.0), axis=0)
    var = tl.sum(m2, axis=0) / n_total
    rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(mean_ptr + pid, mean)
    tl.store(rstd_ptr + pid, rstd)
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    beta = tl.load(beta_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(center_ptr + b * C + offs_c, tl.zeros((BLOCK_CPG,), dtype=tl.float32) + mean, mask=c_ok)
    tl.store(scale_ptr + b * C + offs_c, gamma * rstd, mask=c_ok)
    tl.store(shift_ptr + b * C + offs_c, beta, mask=c_ok)


@triton.jit(do_not_specialize=["seed"])
def _stage_wgrad_kernel(
    g_ptr,  # (B*F, C_out, HW) gradient of the stage output
    h_ptr,  # (B*F, C_in, HW) stage input (the activation is recomputed from it)
    center_ptr,  # (B, C_in) fp32
    scale_ptr,  # (B, C_in) fp32
    shift_ptr,  # (B, C_in) fp32
    dw_part_ptr,  # (SPLIT, C_out, C_in, 3) fp32 out
    db_part_ptr,  # (SPLIT, C_out) fp32 out
    C_in, C_out, F, HW, NT, B, TILES_PER_SPLIT, seed, p_drop, drop_scale,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_o = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    o_ok = offs_o < C_out
    c_ok = offs_c < C_in
    acc0 = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_O, BLOCK_C), dtype=tl.float32)
    dbias = tl.zeros((BLOCK_O,), dtype=tl.float32)
    start = pid_s * TILES_PER_SPLIT
    end = tl.minimum(start + TILES_PER_SPLIT, B * NT)
    for tile in range(start, end):
        b = tile // NT
        offs_n = (tile - b * NT) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < F * HW
        f = offs_n // HW
        p = offs_n % HW
        # The activation of input frame f, recomputed once and used by all three taps: (BLOCK_N, BLOCK_C).
        a_offs = ((b * F + f) * (C_in * HW) + p)[:, None] + offs_c[None, :] * HW
        a_mask = n_ok[:, None] & c_ok[None, :]
        h = tl.load(h_ptr + a_offs, mask=a_mask, other=0.0).to(tl.float32)
        center = tl.load(center_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
        scale = tl.load(scale_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
        shift = tl.load(shift_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
        t = (h - center[None, :]) * scale[None, :] + shift[None, :]
        a = t * tl.sigmoid(t)
        if HAS_DROPOUT:
            a = tl.where(tl.rand(seed, a_offs) >= p_drop, a * drop_scale, 0.0)
        a = _cast(tl.where(a_mask, a, 0.0), g_ptr.dtype.element_ty, INTERPRETED)
        # Tap k of output frame f - k + 1 reads input frame f.
        fo = f + 1
        ok = n_ok & (fo < F)
        g_offs = offs_o[:, None] * HW + ((b * F + tl.where(ok, fo, 0)) * (C_out * HW) + p)[None, :]
        g = tl.load(g_ptr + g_offs, mask=o_ok[:, None] & ok[None, :], other=0.0)
        acc0 = _dot(g, a, acc0, DOT_PRECISION, INTERPRETED)
        g_offs = offs_o[:, None] * HW + ((b * F + f) * (C_out * HW) + p)[None, :]
        g = tl.load(g_ptr + g_offs, mask=o_ok[:, None] & n_ok[None, :], other=0.0)
        acc1 = _dot(g, a, acc1, DOT_PRECISION, INTERPRETED)
        dbias += tl.sum(g.to(tl.float32), axis=1)  # tap 1 visits every output position exactly once
        fo = f - 1
        ok = n_ok & (fo >= 0)
        g_offs = offs_o[:, None] * HW + ((b * F + tl.where(ok, fo, 0)) * (C_out * HW) + p)[None, :]
        g = tl.load(g_ptr + g_offs, mask=o_ok[:, None] & ok[None, :], other=0.0)
        acc2 = _dot(g, a, acc2, DOT_PRECISION, INTERPRETED)

    part = ((pid_s * C_out + offs_o[:, None]) * C_in + offs_c[None, :]) * 3
    mask = o_ok[:, None] & c_ok[None, :]
    tl.store(dw_part_ptr + part, acc0, mask=mask)
    tl.store(dw_part_ptr + part + 1, acc1, mask=mask)
    tl.store(dw_part_ptr + part + 2, acc2, mask=mask)
    if pid_c == 0:
        tl.store(db_part_ptr + pid_s * C_out + offs_o, dbias, mask=o_ok)


@triton.jit
def _sum_splits_kernel(
    part_ptr,  # (SPLIT, N) fp32
    out_ptr,  # (N,) the parameter's dtype
    N, SPLIT,
    INTERPRETED: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, SPLIT):
        acc += tl.load(part_ptr + s * N + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, _cast(acc, out_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _stage_dgrad_kernel(
    g_ptr,  # (B*F, C_out, HW) gradient of the stage output
    w_ptr,  # (C_out, C_in, 3) conv weight, channels contiguous (see _weight3)
    h_ptr,  # (B*F, C_in, HW) stage input
    rstd_ptr,  # (B, G) fp32
    center_ptr,  # (B, C_in) fp32
    scale_ptr,  # (B, C_in) fp32
    shift_ptr,  # (B, C_in) fp32
    dn_ptr,  # (B*F, C_in, HW) out: gradient w.r.t. the GroupNorm output (after its affine)
    ps1_ptr,  # (B, NT, C_in) fp32 out: per-row sums of dn
    ps2_ptr,  # (B, NT, C_in) fp32 out: per-row sums of dn * xhat
    C_in, C_out, F, HW, NT, CPG, G, seed, p_drop, drop_scale,
    stride_w_o, stride_w_k,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
):
    pid_c = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = offs_c < C_in
    n_ok = offs_n < F * HW
    f = offs_n // HW
    p = offs_n % HW
    acc = tl.zeros((BLOCK_C, BLOCK_N), dtype=tl.float32)
    num_o = tl.cdiv(C_out, BLOCK_O)
    for it in range(0, 3 * num_o):
        k = it // num_o
        o0 = (it - k * num_o) * BLOCK_O
        fo = f - (k - 1)  # the output frame whose tap k read input frame f
        col_ok = n_ok & (fo >= 0) & (fo < F)
        col = (b * F + tl.where(col_ok, fo, 0)) * (C_out * HW) + p
        offs_o = o0 + tl.arange(0, BLOCK_O)
        o_ok = offs_o < C_out
        g = tl.load(g_ptr + offs_o[:, None] * HW + col[None, :], mask=o_ok[:, None] & col_ok[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_o[None, :] * stride_w_o + offs_c[:, None] + k * stride_w_k,
                     mask=c_ok[:, None] & o_ok[None, :], other=0.0)
        acc = _dot(wt, g, acc, DOT_PRECISION, INTERPRETED)

    offs = offs_c[:, None] * HW + ((b * F + f) * (C_in * HW) + p)[None, :]
    _act_backward(acc, h_ptr, offs, c_ok[:, None] & n_ok[None, :], b, offs_c, c_ok, C_in, CPG, G, rstd_ptr,
                  center_ptr, scale_ptr, shift_ptr, dn_ptr, ps1_ptr, ps2_ptr, (b * NT + pid_n) * C_in + offs_c, seed,
                  p_drop, drop_scale, HAS_DROPOUT, INTERPRETED)


@triton.jit
def _act_backward(da, h_ptr, offs, mask, b, offs_c, c_ok, C_in, CPG, G, rstd_ptr, center_ptr, scale_ptr, shift_ptr,
                  dn_ptr, ps1_ptr, ps2_ptr, part, seed, p_drop, drop_scale,
                  HAS_DROPOUT: tl.constexpr, INTERPRETED: tl.constexpr):
    """From da = dLoss/d(activation) (an fp32 tile at `offs` of the stage input h): dropout and SiLU backward
    on the recomputed pre-activation t = xhat * gamma + beta; stores dn = dLoss/dt and the per-row partial
    sums of dn and dn * xhat (at `part`) that the GroupNorm backward reduces."""
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + b * G + offs_c // CPG, mask=c_ok, other=0.0)
    center = tl.load(center_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
    scale = tl.load(scale_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
    shift = tl.load(shift_ptr + b * C_in + offs_c, mask=c_ok, other=0.0)
    hc = h - center[:, None]
    t = hc * scale[:, None] + shift[:, None]
    sig = tl.sigmoid(t)
    if HAS_DROPOUT:
        da = tl.where(tl.rand(seed, offs) >= p_drop, da * drop_scale, 0.0)
    dn = _cast(da * sig * (1.0 + t * (1.0 - sig)), dn_ptr.dtype.element_ty, INTERPRETED)
    tl.store(dn_ptr + offs, dn, mask=mask)
    # Partial sums of what the apply kernel will read back (the stored, possibly rounded dn).
    dnf = tl.where(mask, dn.to(tl.float32), 0.0)
    xhat = hc * rstd[:, None]
    tl.store(ps1_ptr + part, tl.sum(dnf, axis=1), mask=c_ok)
    tl.store(ps2_ptr + part, tl.sum(dnf * xhat, axis=1), mask=c_ok)


@triton.jit(do_not_specialize=["seed"])
def _act_bwd_kernel(
    da_ptr,  # the transposed-conv GEMM's output over the windows (window b*(F+2) + f is frame f), its
    # (channel, window, pixel) element at c * STRIDE_DC + window * STRIDE_DW + p (see _gemm_epilogue_kernel)
    h_ptr,  # (B*F, C_in, HW) stage input
    rstd_ptr, center_ptr, scale_ptr, shift_ptr,  # as in _stage_dgrad_kernel
    dn_ptr,  # (B*F, C_in, HW) out
    ps1_ptr, ps2_ptr,  # (B, NT, C_in) fp32 out
    C_in, F, HW, NT, CPG, G, seed, p_drop, drop_scale, STRIDE_DC, STRIDE_DW,
    HAS_DROPOUT: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The dgrad kernel's epilogue as its own pass, after the cuBLAS transposed conv (_stage_backward_cublas).
    b = tl.program_id(2)
    offs_c, c_ok, n_ok, f, p, mask = _channel_tile(C_in, F, HW, BLOCK_C, BLOCK_N)
    da = tl.load(da_ptr + offs_c[:, None] * STRIDE_DC + ((b * (F + 2) + f) * STRIDE_DW + p)[None, :], mask=mask,
                 other=0.0).to(tl.float32)
    offs = offs_c[:, None] * HW + ((b * F + f) * (C_in * HW) + p)[None, :]
    _act_backward(da, h_ptr, offs, mask, b, offs_c, c_ok, C_in, CPG, G, rstd_ptr, center_ptr, scale_ptr, shift_ptr,
                  dn_ptr, ps1_ptr, ps2_ptr, (b * NT + tl.program_id(1)) * C_in + offs_c, seed, p_drop, drop_scale,
                  HAS_DROPOUT, INTERPRETED)


@triton.jit
def _gn_bwd_reduce_kernel(
    ps1_ptr,  # (B, NT, C) fp32 per-row sums of dn
    ps2_ptr,  # (B, NT, C) fp32 per-row sums of dn * xhat
    mean_ptr,  # (B, G) fp32
    rstd_ptr,  # (B, G) fp32
    gamma_ptr,  # (C,)
    coef_a_ptr,  # (B, C) fp32 out
    coef_b_ptr,  # (B, C) fp32 out
    coef_c_ptr,  # (B, C) fp32 out: dh = A * dn + B * h + C
    dgamma_ptr,  # (C,) out, gamma's dtype
    dbeta_ptr,  # (C,) out, beta's dtype
    B, C, G, CPG, NT, inv_n,
    INTERPRETED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CPG: tl.constexpr,
):
    # One program per group, looping over videos, so dgamma/dbeta are summed over the batch here too.
    g = tl.program_id(0)
    j = tl.arange(0, BLOCK_CPG)
    c_ok = j < CPG
    offs_c = g * CPG + j
    gamma = tl.load(gamma_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)
    dgamma = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
    dbeta = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
    for b in range(0, B):
        s1 = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
        s2 = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
        for t0 in range(0, NT, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            mask = (t < NT)[:, None] & c_ok[None, :]
            offs = (b * NT + t[:, None]) * C + offs_c[None, :]
            s1 += tl.sum(tl.load(ps1_ptr + offs, mask=mask, other=0.0), axis=0)
            s2 += tl.sum(tl.load(ps2_ptr + offs, mask=mask, other=0.0), axis=0)
        dbeta += s1
        dgamma += s2
        mean = tl.load(mean_ptr + b * G + g)
        rstd = tl.load(rstd_ptr + b * G + g)
        # dh = rstd * (gamma*dn - c1 - xhat*c2), c1 = mean(gamma*dn), c2 = mean(gamma*dn*xhat) over the group.
        c1 = tl.sum(gamma * s1, axis=0) * inv_n
        c2 = tl.sum(gamma * s2, axis=0) * inv_n
        zero = tl.zeros((BLOCK_CPG,), dtype=tl.float32)
        tl.store(coef_a_ptr + b * C + offs_c, rstd * gamma, mask=c_ok)
        tl.store(coef_b_ptr + b * C + offs_c, zero - rstd * rstd * c2, mask=c_ok)
        tl.store(coef_c_ptr + b * C + offs_c, zero + rstd * (rstd * c2 * mean - c1), mask=c_ok)
    tl.store(dgamma_ptr + offs_c, _cast(dgamma, dgamma_ptr.dtype.element_ty, INTERPRETED), mask=c_ok)
    tl.store(dbeta_ptr + offs_c, _cast(dbeta, dbeta_ptr.dtype.element_ty, INTERPRETED), mask=c_ok)


@triton.jit
def _row_pixel_tile(ROWS, C, F, HW, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """The elementwise kernels' 2D tile of (row = (b, f, c), pixel): its row mask, element mask, the rows'
    (video, channel) index for gathering per-(video, channel) coefficients, and the elements' offsets."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    r_ok = rows < ROWS
    mask = r_ok[:, None] & (offs_p < HW)[None, :]
    bc = (rows // (F * C)) * C + rows % C
    return r_ok, mask, bc, rows[:, None] * HW + offs_p[None, :]


@triton.jit
def _gn_bwd_apply_kernel(
    dn_ptr,  # (B*F, C, HW)
    h_ptr,  # (B*F, C, HW) the stage input
    coef_a_ptr,  # (B, C) fp32
    coef_b_ptr,  # (B, C) fp32
    coef_c_ptr,  # (B, C) fp32
    dres_ptr,  # (B*F, C, HW) gradient reaching the block input through the residual, when HAS_RESIDUAL
    dh_ptr,  # (B*F, C, HW) out
    ROWS, C, F, HW,
    HAS_RESIDUAL: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    r_ok, mask, bc, offs = _row_pixel_tile(ROWS, C, F, HW, BLOCK_R, BLOCK_P)
    ca = tl.load(coef_a_ptr + bc, mask=r_ok, other=0.0)
    cb = tl.load(coef_b_ptr + bc, mask=r_ok, other=0.0)
    cc = tl.load(coef_c_ptr + bc, mask=r_ok, other=0.0)
    dn = tl.load(dn_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dh = ca[:, None] * dn + cb[:, None] * h + cc[:, None]
    if HAS_RESIDUAL:
        dh += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dh_ptr + offs, _cast(dh, dh_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _norm_act_kernel(
    h_ptr,  # (B*F, C, HW) stage input
    a_ptr,  # (B*F, C, HW) out: dropout(silu(GroupNorm(h))) in h's dtype
    center_ptr, scale_ptr, shift_ptr,  # (B, C) fp32, as in _stage_fwd_kernel
    ROWS, C, F, HW, seed, p_drop, drop_scale,
    HAS_DROPOUT: tl.constexpr, INTERPRETED: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # The forward's operand prologue as its own pass (the PRENORM variant): same arithmetic, same dropout
    # mask (Philox on the element's flat index), stored once instead of recomputed by every output tile.
    r_ok, mask, bc, offs = _row_pixel_tile(ROWS, C, F, HW, BLOCK_R, BLOCK_P)
    center = tl.load(center_ptr + bc, mask=r_ok, other=0.0)
    scale = tl.load(scale_ptr + bc, mask=r_ok, other=0.0)
    shift = tl.load(shift_ptr + bc, mask=r_ok, other=0.0)
    h = tl.load(h_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = (h - center[:, None]) * scale[:, None] + shift[:, None]
    a = t * tl.sigmoid(t)
    if HAS_DROPOUT:
        a = tl.where(tl.rand(seed, offs) >= p_drop, a * drop_scale, 0.0)
    tl.store(a_ptr + offs, _cast(a, a_ptr.dtype.element_ty, INTERPRETED), mask=mask)


@triton.jit(do_not_specialize=["seed"])
def _pad_kernel(
    h_ptr,  # (B*F, C, HW) source
    out_ptr,  # padded destination: (b, padded frame fp, c, p) at (b*(F+2) + fp) * STRIDE_F + c * STRIDE_C + p
    out2_ptr,  # a second padded destination (HAS_OUT2) with strides STRIDE_F2, STRIDE_C2
    center_ptr, scale_ptr, shift_ptr,  # (B, C) fp32, as in _stage_fwd_kernel (read when ACT)
    ROWS, C, F, HW, seed, p_drop, drop_scale,  # ROWS = B*(F+2)*C, the padded (video, frame, channel) rows
    STRIDE_F, STRIDE_C, STRIDE_F2, STRIDE_C2,
    N_WINDOWS, TAP_STRIDE,  # TAPS = 3: the windows (columns) and the offset between the taps' row blocks
    ACT: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_OUT2: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr, TAPS: tl.constexpr = 1,
):
    # The cuBLAS variant's operands: each video's frames written between a zero frame before and after, so
    # the conv over frames (or its transpose) becomes one batched GEMM over overlapping three-frame windows
    # (see _stage_forward_cublas). Frame-major destinations (STRIDE_F = C*HW, STRIDE_C = HW) serve those
    # windows; channel-major ones (STRIDE_F = HW, STRIDE_C = B*(F+2)*HW) make every tap's window a plain
    # (C, columns) slice for the weight gradient. With ACT the source is a stage input and the written value
    # is the activation dropout(silu(GroupNorm(h))): the fused prologue's arithmetic and dropout mask (Philox
    # on the element's flat index in the unpadded layout); else the source is copied.
    # TAPS = 3 writes the im2col matrix of the windows instead (`_stage_forward_cublas`, im2col): row block k
    # (at TAP_STRIDE = C * N_WINDOWS * HW - HW past the channel-major destination) holds padded frame j + k
    # in column block j, so padded frame jp goes to column block jp - k of row block k.
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    r_ok = rows < ROWS
    p_ok = offs_p < HW
    c = rows % C
    jp = rows // C  # padded frame over all videos: b * (F + 2) + fp
    fp = jp % (F + 2)
    b = jp // (F + 2)
    valid = r_ok & (fp >= 1) & (fp <= F)
    src = ((b * F + tl.where(valid, fp - 1, 0)) * C + c)[:, None] * HW + offs_p[None, :]
    mask = valid[:, None] & p_ok[None, :]
    v = tl.load(h_ptr + src, mask=mask, other=0.0)
    if ACT:
        center = tl.load(center_ptr + b * C + c, mask=valid, other=0.0)
        scale = tl.load(scale_ptr + b * C + c, mask=valid, other=0.0)
        shift = tl.load(shift_ptr + b * C + c, mask=valid, other=0.0)
        t = (v.to(tl.float32) - center[:, None]) * scale[:, None] + shift[:, None]
        a = t * tl.sigmoid(t)
        if HAS_DROPOUT:
            a = tl.where(tl.rand(seed, src) >= p_drop, a * drop_scale, 0.0)
        v = _cast(tl.where(mask, a, 0.0), out_ptr.dtype.element_ty, INTERPRETED)
    store_mask = r_ok[:, None] & p_ok[None, :]
    dst = out_ptr + (jp * STRIDE_F + c * STRIDE_C)[:, None] + offs_p[None, :]
    if TAPS == 3:
        for k in tl.static_range(3):
            tap_ok = (jp >= k) & (jp - k < N_WINDOWS)
            tl.store(dst + k * TAP_STRIDE, v, mask=store_mask & tap_ok[:, None])
    else:
        tl.store(dst, v, mask=store_mask)
    if HAS_OUT2:
        tl.store(out2_ptr + (jp * STRIDE_F2 + c * STRIDE_C2)[:, None] + offs_p[None, :], v, mask=store_mask)


@triton.jit
def _gemm_epilogue_kernel(
    z_ptr,  # the GEMM's output over the windows: window b*(F+2) + f is video b's frame f; its (channel,
    # window, pixel) element at c * STRIDE_ZC + window * STRIDE_ZW + p: (windows, C, HW) from the windowed
    # GEMM, (C, windows * HW) from the im2col one
    bias_ptr,  # (C,)
    res_ptr,  # (B*F, C, HW) residual, read when HAS_RESIDUAL
    y_ptr,  # (B*F, C, HW) out
    pmean_ptr,  # (B, NT, C) fp32: per-row means of the stored y, written when HAS_STATS
    pm2_ptr,  # (B, NT, C) fp32: per-row sums of squared deviations from the row mean
    C, F, HW, NT, STRIDE_ZC, STRIDE_ZW,
    HAS_RESIDUAL: tl.constexpr, HAS_STATS: tl.constexpr, INTERPRETED: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # The fused kernel's epilogue as its own pass: + bias [+ residual], store in the model's layout (the
    # GEMM's two junk windows per video dropped), and the next GroupNorm's partial statistics of the
    # stored values.
    b = tl.program_id(2)
    offs_c, c_ok, n_ok, f, p, mask = _channel_tile(C, F, HW, BLOCK_C, BLOCK_N)
    z = tl.load(z_ptr + offs_c[:, None] * STRIDE_ZC + ((b * (F + 2) + f) * STRIDE_ZW + p)[None, :], mask=mask,
                other=0.0).to(tl.float32)
    acc = z + tl.load(bias_ptr + offs_c, mask=c_ok, other=0.0).to(tl.float32)[:, None]
    offs = offs_c[:, None] * HW + ((b * F + f) * (C * HW) + p)[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    y = _cast(acc, y_ptr.dtype.element_ty, INTERPRETED)
    tl.store(y_ptr + offs, y, mask=mask)
    if HAS_STATS:
        _store_row_stats(y.to(tl.float32), mask, n_ok, pmean_ptr, pm2_ptr, (b * NT + tl.program_id(1)) * C + offs_c,
                         c_ok)


@triton.jit(do_not_specialize=["seed"])
def _dropout_mask_kernel(
    out_ptr,  # (N,) fp32: 0 or 1/(1-p)
    N, seed, p_drop, drop_scale,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    keep = tl.rand(seed, offs) >= p_drop  # the same expression as in the stage kernels
    tl.store(out_ptr + offs, tl.where(keep, drop_scale, 0.0), mask=offs < N)


# --------------------------------------------------------------------------------------------------------
# Launch configurations: a fixed table chosen from the shapes (no autotune: graph-capture friendly, and the
# compile check covers exactly what runs).
# --------------------------------------------------------------------------------------------------------


class _GemmConfig(NamedTuple):
    block_m: int  # output rows per program (C_out forward, C_in dgrad)
    block_n: int  # (frame, pixel) columns per program
    block_k: int  # reduction chunk over channels
    num_warps: int
    num_stages: int
    # Forward only: write the activation in a separate pass and run the conv as a plain GEMM on it, instead
    # of normalising in the GEMM's operand prologue (one more write + read of the activation, against the
    # prologue's recompute: 3 x C_out / block_m times per element). Which wins is a measurement.
    prenorm: bool = False
    # Forward only: the activation written with each video's zero frame padding (`_pad_kernel`), the
    # conv as one cuBLAS batched GEMM over overlapping three-frame windows, then bias / residual / the next
    # GroupNorm's statistics in `_gemm_epilogue_kernel` (block_* fields unused). See _stage_forward_cublas.
    cublas: bool = False
    im2col: bool = False  # with cublas: the windows written as one im2col matrix, the conv a single GEMM


class _WgradConfig(NamedTuple):
    block_o: int
    block_c: int
    block_n: int  # reduction chunk over (frame, pixel) columns
    split: int  # partial sums over the columns, summed by _sum_splits_kernel
    num_warps: int
    num_stages: int


def _pow2_clamp(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(n)))


def _gemm_config(rows: int, red: int, hw: int, fhw: int) -> _GemmConfig:
    """Forward implicit-GEMM tiles from (channels, H*W). Wide row tiles at 640+ channels keep the recompute
    of the normalised operand (3 taps x rows / block_m) low; column tiles shrink with H*W so the 4x4 level
    still has enough programs; a 32-channel reduction chunk and 8 warps keep the operand's elementwise
    prologue (GroupNorm, SiLU, Philox dropout) free of spills. 16 is tl.dot's minimum size."""
    block_m = _pow2_clamp(rows, 16, 128 if rows >= 640 else 64)
    block_k = _pow2_clamp(red, 16, 32)
    wide = 128 if hw >= 256 and block_m <= 64 else 64
    block_n = _pow2_clamp(fhw, 16, wide if hw >= 64 else 32)
    num_warps = 8 if block_m * block_n >= 4096 else 4
    return _GemmConfig(block_m, block_n, block_k, num_warps, 3)


CONV_GEMMS = ("auto", "triton", "cublas", "cublas_im2col")
_DIRECTIONS = ("forward", "backward")
_CONV_GEMM = {"forward": "auto", "backward": "auto"}


def set_conv_gemm(name: str, direction: str = "both") -> dict[str, str]:
    """Which GEMMs the temporal conv runs, for direction "forward", "backward" or "both":
      * "auto" (the default): per stage kind and shape as this GPU's launch table says (`pdengine tune`,
        `temporal_conv_table.py`); where it has no entry (and on the CPU), the fused Triton kernels with the
        built-in tiles;
      * "triton": the fused implicit-GEMM kernels, with the table's fastest Triton tile where it has one;
      * "cublas": the activation / gradient written with frame padding in its own pass, then cuBLAS over
        overlapping frame windows;
      * "cublas_im2col": the same with the windows written as one im2col matrix, the conv (forward) or its
        transpose (backward) one GEMM over all of them; the weight gradient as for "cublas".
    Returns the previous choice of both directions. PDENGINE_CONV_GEMM (one name, both directions) sets
    it at import."""
    if name not in CONV_GEMMS:
        raise ValueError(f"conv GEMM must be one of {CONV_GEMMS}, got {name!r}")
    if direction not in (*_DIRECTIONS, "both"):
        raise ValueError(f"direction must be 'forward', 'backward' or 'both', got {direction!r}")
    previous = dict(_CONV_GEMM)
    for d in _DIRECTIONS if direction == "both" else (direction,):
        _CONV_GEMM[d] = name
    return previous


@contextlib.contextmanager
def conv_gemm(name: str, direction: str = "both") -> Iterator[None]:
    """`set_conv_gemm(name, direction)` for the duration of a with-block."""
    previous = set_conv_gemm(name, direction)
    try:
        yield
    finally:
        _CONV_GEMM.update(previous)


set_conv_gemm(os.environ.get("PDENGINE_CONV_GEMM", "auto"))  # a bad value fails the import, here
if os.environ.get(conv_table.TABLE_ENV):
    conv_table.read(os.environ[conv_table.TABLE_ENV])  # likewise a bad PDENGINE_CONV_TABLE, naming the file

_UNSET = object()
_TABLE_OVERRIDE: list = [_UNSET]  # launch_table(): one table (or None, the built-in tiles) for every device
_TABLES: dict[tuple[str, int | None], ConvTable | None] = {}  # per CUDA device, found on its first stage


@contextlib.contextmanager
def launch_table(table: ConvTable | None) -> Iterator[None]:
    """Use `table` (None: no table, the built-in tiles) on every device for the duration of a with-block,
    instead of the tables found per GPU: what `pdengine tune` sweeps under, and what tests pin."""
    previous = _TABLE_OVERRIDE[0]
    _TABLE_OVERRIDE[0] = table
    try:
        yield
    finally:
        _TABLE_OVERRIDE[0] = previous


def table_for(device: torch.device) -> ConvTable | None:
    """The launch table that stages on `device` use: launch_table()'s if one is set; on a CUDA device the
    one found for its GPU model (`temporal_conv_table.find`, once per device; one log line saying which,
    or that there is none); None on other devices."""
    if _TABLE_OVERRIDE[0] is not _UNSET:
        return _TABLE_OVERRIDE[0]
    if device.type != "cuda":
        return None
    key = (device.type, device.index)
    if key not in _TABLES:
        name = torch.cuda.get_device_name(device)
        table, problems = conv_table.find(name)  # a bad $PDENGINE_CONV_TABLE raises, naming the file
        for problem in problems:
            logger.warning("pdengine temporal conv: %s", problem)
        if table is None:
            logger.warning("pdengine temporal conv: no launch table tuned for %s (`pdengine tune` measures one): "
                           "'auto' runs the fused Triton kernels with built-in tiles", name)
        else:
            logger.info("pdengine temporal conv: launch table %s", table.describe())
        _TABLES[key] = table
    return _TABLES[key]


def _entry(kind: str, x: torch.Tensor, c_out: int, c_in: int, hw: int) -> conv_table.Entry | None:
    table = table_for(x.device)
    dtype = conv_table.DTYPE_KEYS.get(x.dtype)
    return None if table is None or dtype is None else table.lookup(kind, dtype, c_out, c_in, hw)


def _cublas_variant(direction: str, entry: conv_table.Entry | None) -> str | None:
    """None when the stage GEMM runs the Triton kernels, else its cuBLAS variant ("cublas" or
    "cublas_im2col"): from the mode, and under "auto" from the table's entry."""
    mode = _CONV_GEMM[direction]
    if mode == "auto":
        mode = entry.best if entry is not None and isinstance(entry.best, str) else "triton"
    return None if mode == "triton" else mode


_WARNED_IM2COL = [False]


def _im2col_or_windows(variant: str | None, videos: int, frames: int, channels: int, hw: int) -> str | None:
    """`variant`, except that an im2col matrix past int32 indexing (3 * videos * (F+2) * C * HW elements: only
    for huge batches, which the block splits by whole videos to fit the other layouts) runs the windowed
    cuBLAS variant instead, said once."""
    if variant != "cublas_im2col" or 3 * videos * (frames + 2) * channels * hw <= _MAX_LAUNCH_ELEMENTS:
        return variant
    if not _WARNED_IM2COL[0]:
        _WARNED_IM2COL[0] = True
        logger.warning("pdengine temporal conv: an im2col matrix of %d videos x %d frames x %d channels x %d "
                       "pixels passes int32 indexing; those stages run the windowed cuBLAS GEMM", videos,
                       frames, channels, hw)
    return "cublas"


def _gemm_launch(direction: str, entry: conv_table.Entry | None, builtin: _GemmConfig, videos: int,
                 frames: int, channels: int, hw: int) -> _GemmConfig:
    """The launch of a conv or transposed-conv stage (`channels`: those of the GEMM's padded operand):
    `cublas` (and `im2col`) set when it runs on cuBLAS, else the table's Triton tile, else `builtin`."""
    variant = _im2col_or_windows(_cublas_variant(direction, entry), videos, frames, channels, hw)
    if variant is not None:
        return builtin._replace(cublas=True, im2col=variant == "cublas_im2col")
    if entry is not None and entry.triton is not None:
        return _GemmConfig(*entry.triton)
    return builtin


def _forward_launch(x: torch.Tensor, c_out: int, c_in: int, hw: int, fhw: int) -> _GemmConfig:
    """The forward stage's launch (`_gemm_launch`)."""
    frames = fhw // hw
    return _gemm_launch("forward", _entry("fwd", x, c_out, c_in, hw), _gemm_config(c_out, c_in, hw, fhw),
                        x.shape[0] // frames, frames, c_in, hw)


def _backward_launch(x: torch.Tensor, c_out: int, c_in: int, hw: int, fhw: int,
                     b: int) -> tuple[_GemmConfig, _WgradConfig | None]:
    """(dgrad, wgrad) launches of one stage's backward: dgrad as `_gemm_launch` gives it; wgrad None when the
    weight gradient runs on cuBLAS."""
    dgrad = _gemm_launch("backward", _entry("dgrad", x, c_out, c_in, hw), _dgrad_config(c_in, c_out, hw, fhw), b,
                         fhw // hw, c_out, hw)
    w_entry = _entry("wgrad", x, c_out, c_in, hw)
    wgrad = None
    if _cublas_variant("backward", w_entry) is None:
        if w_entry is not None and w_entry.triton is not None:
            o, c, n, split, warps, stages = w_entry.triton
            wgrad = _WgradConfig(o, c, n, split or _wgrad_split(c_out, c_in, b, fhw, o, c, n), warps, stages)
        else:
            wgrad = _wgrad_config(c_out, c_in, b, fhw)
    return dgrad, wgrad


def _dgrad_config(rows: int, red: int, hw: int, fhw: int) -> _GemmConfig:
    """Transposed-conv tiles: like the forward's but at most 4096 outputs per program, because the epilogue
    (SiLU and dropout backward, two partial sums) holds several fp32 tiles at once."""
    cfg = _gemm_config(rows, red, hw, fhw)
    block_n = max(16, min(cfg.block_n, 4096 // cfg.block_m))
    return _GemmConfig(cfg.block_m, block_n, cfg.block_k, 8 if cfg.block_m * block_n >= 4096 else 4, 3)


def _wgrad_config(c_out: int, c_in: int, b: int, fhw: int) -> _WgradConfig:
    """64 x 64 weight tiles (three fp32 accumulators, one per tap) over 32-column chunks; the (b, f, p)
    reduction is split only as far as needed to give about one wave of programs, which keeps the fp32
    partials (split x C_out x C_in x 3) small."""
    block_o = _pow2_clamp(c_out, 16, 64)
    block_c = _pow2_clamp(c_in, 16, 64)
    block_n = _pow2_clamp(fhw, 16, 32)
    split = _wgrad_split(c_out, c_in, b, fhw, block_o, block_c, block_n)
    return _WgradConfig(block_o, block_c, block_n, split, 8, 2)


def _row_pixel_grid(rows: int, hw: int) -> tuple[tuple[int, int], int, int]:
    """(grid, BLOCK_R, BLOCK_P) of the elementwise (row, pixel) kernels: _APPLY_BLOCK elements a program."""
    block_p = _pow2_clamp(hw, 16, 256)
    block_r = _APPLY_BLOCK // block_p
    return (triton.cdiv(rows, block_r), triton.cdiv(hw, block_p)), block_r, block_p


def _wgrad_split(c_out: int, c_in: int, b: int, fhw: int, block_o: int, block_c: int, block_n: int) -> int:
    """Partials over the columns: enough programs for about one wave, at least 8 column chunks each, at
    most 8 partials."""
    tiles = triton.cdiv(c_out, block_o) * triton.cdiv(c_in, block_c)
    chunks = b * triton.cdiv(fhw, block_n)
    return max(1, min(_WGRAD_PROGRAMS // tiles, chunks // 8, 8))


def _reduce_blocks(cpg: int) -> tuple[int, int]:
    """(BLOCK_T, BLOCK_CPG) of the per-group reductions: a 512-element tile of (partial row, channel). At
    least 64 channels wide so one compiled variant serves 10, 20 and 40 channels per group (the UNet's)."""
    block_cpg = max(64, triton.next_power_of_2(cpg))
    return max(1, 512 // block_cpg), block_cpg


_WGRAD_PROGRAMS = 128  # about one wave on an A100 / H100 (no device query: the table must be static)
_STATS_BLOCK_C = 32
_STATS_BLOCK_N = 128
_APPLY_BLOCK = 2048  # elements per program of the elementwise GroupNorm-backward kernel


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 operands: exact products (the fp32 path is the accuracy reference); 16-bit operands ignore it.
    return "ieee" if dtype == torch.float32 else "tf32"


# --------------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------------


class GroupNormStats(NamedTuple):
    """One stage's GroupNorm per video: mean, rstd (B, G) and, per (video, channel), the form the kernels
    apply, (h - center) * scale + shift = (h - mean) * rstd * gamma + beta."""

    mean: torch.Tensor
    rstd: torch.Tensor
    center: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def _interpreted(t: torch.Tensor) -> bool:
    # CPU tensors only ever reach a kernel through the Triton interpreter (see _dot and _cast).
    return not t.is_cuda


def _weight3(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(C_out, C_in, 3[, 1, 1]) -> a (C_out, C_in, 3) view, in the activations' dtype, of memory laid out
    (C_out, 3, C_in): channels contiguous, so the GEMM kernels load weight tiles as 16-byte vectors into
    their software pipeline, and each output channel's row is the (tap, channel) reduction axis of the
    cuBLAS forward (`_conv_matrix`). (With the parameter's own layout the channel stride is 3 elements: the
    sm90 SASS of the inference forward at 1280 channels, 8x8, then loads both operands with scalar 2-byte
    loads outside the pipeline, 157 registers; packed, both are asynchronous 16-byte copies, 64 registers.
    The copy costs one pass over the weight, 3 C_out C_in elements, per call.)"""
    if weight.dim() == 5:
        if weight.shape[2:] != (3, 1, 1):
            raise ValueError(f"temporal conv weight must be (C_out, C_in, 3, 1, 1), got {tuple(weight.shape)}")
        weight = weight.view(weight.shape[0], weight.shape[1], 3)
    elif weight.dim() != 3 or weight.shape[2] != 3:
        raise ValueError(f"temporal conv weight must be (C_out, C_in, 3) or (C_out, C_in, 3, 1, 1), "
                         f"got {tuple(weight.shape)}")
    return weight.to(dtype).permute(0, 2, 1).contiguous().permute(0, 2, 1)


def _conv_matrix(weight3: torch.Tensor) -> torch.Tensor:
    """The `_weight3` layout as the (C_out, 3 * C_in) matrix W[o, k * C_in + c] = w[o, c, k] (a view)."""
    c_out, c_in, _ = weight3.shape
    if weight3.stride() != (3 * c_in, 1, c_in):
        raise ValueError("the weight must come packed by _weight3")
    return weight3.permute(0, 2, 1).reshape(c_out, 3 * c_in)


def _drop_scale(p: float) -> float:
    return 1.0 / (1.0 - p) if p > 0 else 1.0


def _stage_seed(seed: int, stage: int) -> int:
    # A different Philox key per stage: the stages' masks are independent.
    return seed + stage


def _gn_finalize(pmean: torch.Tensor, pm2: torch.Tensor, tile_n: int, fhw: int, gamma: torch.Tensor,
                 beta: torch.Tensor, groups: int, eps: float) -> GroupNormStats:
    b, nt, c = pmean.shape
    cpg = c // groups
    dev = pmean.device
    mean = torch.empty(b, groups, device=dev, dtype=torch.float32)
    rstd = torch.empty_like(mean)
    center, scale, shift = torch.empty(3, b, c, device=dev, dtype=torch.float32)
    block_t, block_cpg = _reduce_blocks(cpg)
    _gn_finalize_kernel[(b * groups,)](
        pmean, pm2, gamma, beta, mean, rstd, center, scale, shift, c, groups, cpg, nt, fhw, tile_n, eps,
        BLOCK_T=block_t, BLOCK_CPG=block_cpg, num_warps=4,
    )
    return GroupNormStats(mean, rstd, center, scale, shift)


def input_stats(x: torch.Tensor, num_frames: int, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                eps: float) -> GroupNormStats:
    """GroupNorm statistics of x (B*F, C, H, W) per video (one read of x) folded with gamma/beta."""
    bf, c, h, w = x.shape
    b, hw = bf // num_frames, h * w
    fhw = num_frames * hw
    nt = triton.cdiv(fhw, _STATS_BLOCK_N)
    pmean = torch.empty(b, nt, c, device=x.device, dtype=torch.float32)
    pm2 = torch.empty_like(pmean)
    grid = (triton.cdiv(c, _STATS_BLOCK_C), nt, b)
    _stats_kernel[grid](x, pmean, pm2, c, num_frames, hw, nt, BLOCK_C=_STATS_BLOCK_C, BLOCK_N=_STATS_BLOCK_N,
                        num_warps=4)
    return _gn_finalize(pmean, pm2, _STATS_BLOCK_N, fhw, gamma, beta, groups, eps)


def _stage_forward(h: torch.Tensor, num_frames: int, weight: torch.Tensor, bias: torch.Tensor,
                   stats: GroupNormStats, *, residual: torch.Tensor | None, next_norm: tuple | None,
                   groups: int, eps: float, dropout_p: float, seed: int,
                   out: torch.Tensor | None = None) -> tuple[torch.Tensor, GroupNormStats | None]:
    """One stage: y = conv(dropout(silu(GN(h)))) + bias [+ residual]; with next_norm = (gamma, beta) also
    the next stage's GroupNorm statistics of y."""
    bf, c_in, hh, ww = h.shape
    c_out = weight.shape[0]
    b, hw = bf // num_frames, hh * ww
    fhw = num_frames * hw
    cfg = _forward_launch(h, c_out, c_in, hw, fhw)
    y = torch.empty(bf, c_out, hh, ww, device=h.device, dtype=h.dtype) if out is None else out
    if cfg.cublas:
        return _stage_forward_cublas(h, num_frames, weight, bias, stats, residual=residual, next_norm=next_norm,
                                     groups=groups, eps=eps, dropout_p=dropout_p, seed=seed, out=y,
                                     im2col=cfg.im2col)
    nt = triton.cdiv(fhw, cfg.block_n)
    pmean, pm2 = _stat_partials(b, nt, c_out, next_norm, stats)
    grid = (triton.cdiv(c_out, cfg.block_m), nt, b)
    if weight.stride(1) != 1:
        raise ValueError("the weight must come packed by _weight3 (channels contiguous)")
    operand = h
    if cfg.prenorm:
        operand = torch.empty_like(h)
        grid_e, block_r, block_p = _row_pixel_grid(bf * c_in, hw)
        _norm_act_kernel[grid_e](
            h, operand, stats.center, stats.scale, stats.shift, bf * c_in, c_in, num_frames, hw, seed, dropout_p,
            _drop_scale(dropout_p), HAS_DROPOUT=dropout_p > 0, INTERPRETED=_interpreted(h), BLOCK_R=block_r,
            BLOCK_P=block_p, num_warps=4,
        )
    _stage_fwd_kernel[grid](
        operand, weight, bias, stats.center, stats.scale, stats.shift, residual if residual is not None else y, y,
        pmean, pm2, c_in, c_out, num_frames, hw, nt, seed, dropout_p, _drop_scale(dropout_p),
        weight.stride(0), weight.stride(2),
        HAS_RESIDUAL=residual is not None, HAS_STATS=next_norm is not None,
        HAS_DROPOUT=dropout_p > 0 and not cfg.prenorm, DOT_PRECISION=_dot_precision(h.dtype),
        INTERPRETED=_interpreted(h), BLOCK_O=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_C=cfg.block_k,
        PRENORM=cfg.prenorm, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if next_norm is None:
        return y, None
    return y, _gn_finalize(pmean, pm2, cfg.block_n, fhw, next_norm[0], next_norm[1], groups, eps)


def _stat_partials(b: int, nt: int, c: int, next_norm: tuple | None,
                   stats: GroupNormStats) -> tuple[torch.Tensor, torch.Tensor]:
    """The (B, NT, C) fp32 partial means and squared deviations a stage writes for the next GroupNorm; without
    a next norm, any fp32 pointer (never written: HAS_STATS=False)."""
    if next_norm is None:
        return stats.scale, stats.scale
    pmean = torch.empty(b, nt, c, device=stats.scale.device, dtype=torch.float32)
    return pmean, torch.empty_like(pmean)


def _stage_forward_cublas(h: torch.Tensor, num_frames: int, weight: torch.Tensor, bias: torch.Tensor,
                          stats: GroupNormStats, *, residual: torch.Tensor | None, next_norm: tuple | None,
                          groups: int, eps: float, dropout_p: float, seed: int, out: torch.Tensor,
                          im2col: bool = False) -> tuple[torch.Tensor, GroupNormStats | None]:
    """`_stage_forward` with the conv on cuBLAS. With the activation stored as (B*(F+2), C_in, HW), each
    video's frames between zero frames, output frame f of video b reads padded frames j..j+2 for
    j = b*(F+2) + f, and those three frames are one contiguous (3*C_in, HW) block: window j is the matrix at
    offset j*C_in*HW, and consecutive windows overlap by two frames. So the conv is one strided batched GEMM,
    out[j] = W (C_out, 3*C_in) @ window[j], over j = 0 .. B*(F+2) - 3, with no copy of the windows; the two
    windows per video that straddle a video boundary (j = b*(F+2) + F, + F + 1) compute junk that the
    epilogue pass skips (2 / (F+2) of the FLOPs: 11% at 16 frames). Passes: activation (read h, write a
    padded), GEMM (read a, write z), epilogue (read z [+ residual], write y, statistics).

    With im2col the activation pass writes each window's three frames as a column block of one
    (3*C_in, windows*HW) matrix (three times the activation's bytes), and the conv is a single GEMM with
    windows*HW columns instead of `windows` GEMMs of HW columns each: at the 8x8 and 4x4 levels (64 and 16
    columns per window) the batched GEMM's matrices are thin, the single one is not."""
    bf, c_in, hh, ww = h.shape
    c_out = weight.shape[0]
    b, hw = bf // num_frames, hh * ww
    fp = num_frames + 2
    (a,) = _padded(h, num_frames, act=(stats, dropout_p, seed), im2col=im2col)
    n_windows = b * fp - 2
    if im2col:
        z = torch.mm(_conv_matrix(weight), a)  # (C_out, windows * HW)
        z_strides = (n_windows * hw, hw)
    else:
        z = _window_gemm(_conv_matrix(weight), a, n_windows)  # (windows, C_out, HW)
        z_strides = (hw, c_out * hw)
    nt = triton.cdiv(num_frames * hw, _STATS_BLOCK_N)
    pmean, pm2 = _stat_partials(b, nt, c_out, next_norm, stats)
    _gemm_epilogue_kernel[(triton.cdiv(c_out, _STATS_BLOCK_C), nt, b)](
        z, bias, residual if residual is not None else out, out, pmean, pm2, c_out, num_frames, hw, nt, *z_strides,
        HAS_RESIDUAL=residual is not None, HAS_STATS=next_norm is not None, INTERPRETED=_interpreted(h),
        BLOCK_C=_STATS_BLOCK_C, BLOCK_N=_STATS_BLOCK_N, num_warps=4,
    )
    if next_norm is None:
        return out, None
    return out, _gn_finalize(pmean, pm2, _STATS_BLOCK_N, num_frames * hw, next_norm[0], next_norm[1], groups, eps)


def _padded(x: torch.Tensor, num_frames: int, *, channel_major: Sequence[bool] = (False,),
            act: tuple[GroupNormStats, float, int] | None = None, im2col: bool = False) -> list[torch.Tensor]:
    """x (B*F, C, H, W) with a zero frame before and after each video, in one or two layouts (one pass over
    x): frame-major (B*(F+2), C, H*W) or channel-major (C, B*(F+2)*H*W). With act = (stats, dropout_p,
    seed) the values written are the stage activation dropout(silu(GroupNorm(x))). With im2col, the first
    (frame-major) layout is written instead as the (3*C, windows*H*W) matrix whose column block j stacks
    padded frames j, j+1, j+2 (windows = B*(F+2) - 2): every window's three frames as one GEMM operand."""
    bf, c, hh, ww = x.shape
    hw = hh * ww
    jp = (bf // num_frames) * (num_frames + 2)
    n_windows = jp - 2
    outs, strides = [], []
    layouts = list(channel_major)
    if im2col:  # in place of the first layout, which must be the frame-major one
        if layouts[0]:
            raise ValueError("im2col replaces the frame-major layout")
        outs.append(torch.empty((3 * c, n_windows * hw), device=x.device, dtype=x.dtype))
        strides.append((hw, n_windows * hw))
        layouts = layouts[1:]
    for cm in layouts:
        outs.append(torch.empty((c, jp * hw) if cm else (jp, c, hw), device=x.device, dtype=x.dtype))
        strides.append((hw, jp * hw) if cm else (c * hw, hw))
    if act is None:
        coef = torch.empty(1, device=x.device, dtype=torch.float32)  # not read (ACT=False)
        center = scale = shift = coef
        p, seed = 0.0, 0
    else:
        stats, p, seed = act
        center, scale, shift = stats.center, stats.scale, stats.shift
    grid, block_r, block_p = _row_pixel_grid(jp * c, hw)
    _pad_kernel[grid](
        x, outs[0], outs[-1], center, scale, shift, jp * c, c, num_frames, hw, seed, p, _drop_scale(p),
        *strides[0], *strides[-1], n_windows, c * n_windows * hw - hw, ACT=act is not None, HAS_DROPOUT=p > 0,
        HAS_OUT2=len(outs) > 1, INTERPRETED=_interpreted(x), BLOCK_R=block_r, BLOCK_P=block_p,
        TAPS=3 if im2col else 1, num_warps=4,
    )
    return outs


def _window_gemm(matrix: torch.Tensor, padded: torch.Tensor, n_windows: int) -> torch.Tensor:
    """out[j] = matrix (M, 3*C) @ window j of a frame-major padded tensor (frames j, j+1, j+2: one contiguous
    (3*C, H*W) block at offset j*C*H*W; consecutive windows overlap by two frames) for j < n_windows: one
    strided batched GEMM (cuBLAS on a GPU) reading the windows in place, no copies."""
    _, c, hw = padded.shape
    windows = padded.as_strided((n_windows, 3 * c, hw), (c * hw, hw, 1))
    return torch.bmm(matrix.expand(n_windows, *matrix.shape), windows)


def _stage_backward_cublas(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, num_frames: int,
                           stats: GroupNormStats, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                           dropout_p: float, seed: int, residual_grad: torch.Tensor | None,
                           weight_param: torch.Tensor, bias_param: torch.Tensor, need_weight: bool,
                           need_input: bool, im2col: bool = False) -> tuple:
    """`_stage_wgrad` + `_stage_dgrad` with the GEMMs on cuBLAS: (dh, dgamma, dbeta, dW, dbias), None where
    not needed. The output gradient g is written once with frame padding in two layouts:
      * frame-major: the transposed conv da[b, f] = sum_k W_k^T g[b, f + 1 - k] is one batched GEMM of the
        (C_in, 3*C_out) matrix [W_2^T W_1^T W_0^T] over g's overlapping three-frame windows, like the forward
        (with im2col: one GEMM over the windows' im2col matrix, written in this layout's place);
      * channel-major (C_out, columns): with the activation recomputed into the same layout, tap k's weight
        gradient dW_k = sum over windows j of g_j a_(j+k)^T is one GEMM of two column slices (the pad
        columns of g are zero, so windows straddling two videos add nothing).
    The weight gradient comes out of cuBLAS in the activation dtype (as under autocast), then is cast to the
    parameter's dtype; the Triton path accumulates it in fp32 instead."""
    bf, c_in, hh, ww = h.shape
    c_out = g.shape[1]
    b, hw = bf // num_frames, hh * ww
    n_windows = b * (num_frames + 2) - 2
    layouts = ((False,) if need_input else ()) + ((True,) if need_weight else ())
    if not layouts:
        return None, None, None, None, None
    gpads = _padded(g, num_frames, channel_major=layouts, im2col=im2col and need_input)
    dw = db = None
    if need_weight:
        g_cols = gpads[-1][:, hw:hw + n_windows * hw]  # window j's output gradient = padded frame j + 1
        (a_cols,) = _padded(h, num_frames, channel_major=(True,), act=(stats, dropout_p, seed))
        dw3 = torch.empty(3, c_out, c_in, device=h.device, dtype=h.dtype)
        for k in range(3):
            torch.mm(g_cols, a_cols[:, k * hw:k * hw + n_windows * hw].t(), out=dw3[k])
        dw = torch.empty(weight_param.shape, device=h.device, dtype=weight_param.dtype)
        dw.view(c_out, c_in, 3).copy_(dw3.permute(1, 2, 0))  # the parameter's own (contiguous) layout
        db = g.sum(dim=(0, 2, 3), dtype=torch.float32).to(bias_param.dtype)
    if not need_input:
        return None, None, None, dw, db
    transposed = weight.flip(2).permute(1, 2, 0).reshape(c_in, 3 * c_out)
    if im2col:
        da = torch.mm(transposed, gpads[0])  # (C_in, windows * HW)
        da_strides = (n_windows * hw, hw)
    else:
        da = _window_gemm(transposed, gpads[0], n_windows)  # (windows, C_in, HW)
        da_strides = (hw, c_in * hw)
    nt = triton.cdiv(num_frames * hw, _STATS_BLOCK_N)
    dn = torch.empty_like(h)
    ps1 = torch.empty(b, nt, c_in, device=h.device, dtype=torch.float32)
    ps2 = torch.empty_like(ps1)
    _act_bwd_kernel[(triton.cdiv(c_in, _STATS_BLOCK_C), nt, b)](
        da, h, stats.rstd, stats.center, stats.scale, stats.shift, dn, ps1, ps2, c_in, num_frames, hw, nt,
        c_in // groups, groups, seed, dropout_p, _drop_scale(dropout_p), *da_strides, HAS_DROPOUT=dropout_p > 0,
        INTERPRETED=_interpreted(h), BLOCK_C=_STATS_BLOCK_C, BLOCK_N=_STATS_BLOCK_N, num_warps=4,
    )
    dh, dgamma, dbeta = _gn_backward(dn, ps1, ps2, h, num_frames, stats, gamma, beta, groups, residual_grad)
    return dh, dgamma, dbeta, dw, db


def _stage_wgrad(g: torch.Tensor, h: torch.Tensor, num_frames: int, stats: GroupNormStats,
                 weight_param: torch.Tensor, bias_param: torch.Tensor, dropout_p: float,
                 seed: int, cfg: _WgradConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """dW (in the weight parameter's shape and dtype) and dbias of one stage (tile: cfg, else the built-in)."""
    bf, c_in, hh, ww = h.shape
    c_out = g.shape[1]
    b, hw = bf // num_frames, hh * ww
    fhw = num_frames * hw
    cfg = cfg or _wgrad_config(c_out, c_in, b, fhw)
    nt = triton.cdiv(fhw, cfg.block_n)
    tiles_per_split = triton.cdiv(b * nt, cfg.split)
    dw_part = torch.empty(cfg.split, c_out, c_in, 3, device=h.device, dtype=torch.float32)
    db_part = torch.empty(cfg.split, c_out, device=h.device, dtype=torch.float32)
    grid = (triton.cdiv(c_out, cfg.block_o), triton.cdiv(c_in, cfg.block_c), cfg.split)
    _stage_wgrad_kernel[grid](
        g, h, stats.center, stats.scale, stats.shift, dw_part, db_part, c_in, c_out, num_frames, hw, nt, b,
        tiles_per_split, seed, dropout_p, _drop_scale(dropout_p),
        HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=_dot_precision(h.dtype), INTERPRETED=_interpreted(h),
        BLOCK_O=cfg.block_o, BLOCK_C=cfg.block_c, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dw = torch.empty(weight_param.shape, device=h.device, dtype=weight_param.dtype)
    db = torch.empty(c_out, device=h.device, dtype=bias_param.dtype)
    for part, dst in ((dw_part, dw), (db_part, db)):
        n = dst.numel()
        _sum_splits_kernel[(triton.cdiv(n, 1024),)](part, dst, n, cfg.split, INTERPRETED=_interpreted(h),
                                                    BLOCK=1024, num_warps=4)
    return dw, db


def _stage_dgrad(g: torch.Tensor, weight: torch.Tensor, h: torch.Tensor, num_frames: int, stats: GroupNormStats,
                 gamma: torch.Tensor, beta: torch.Tensor, groups: int, dropout_p: float, seed: int,
                 residual_grad: torch.Tensor | None,
                 cfg: _GemmConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dLoss/d(stage input) [+ residual_grad], dgamma, dbeta of one stage (tile: cfg, else the built-in)."""
    bf, c_in, hh, ww = h.shape
    c_out = g.shape[1]
    b, hw = bf // num_frames, hh * ww
    fhw = num_frames * hw
    cpg = c_in // groups
    cfg = cfg or _dgrad_config(c_in, c_out, hw, fhw)
    nt = triton.cdiv(fhw, cfg.block_n)
    dn = torch.empty_like(h)
    ps1 = torch.empty(b, nt, c_in, device=h.device, dtype=torch.float32)
    ps2 = torch.empty_like(ps1)
    grid = (triton.cdiv(c_in, cfg.block_m), nt, b)
    if weight.stride(1) != 1:
        raise ValueError("the weight must come packed by _weight3 (channels contiguous)")
    _stage_dgrad_kernel[grid](
        g, weight, h, stats.rstd, stats.center, stats.scale, stats.shift, dn, ps1, ps2,
        c_in, c_out, num_frames, hw, nt, cpg, groups, seed, dropout_p, _drop_scale(dropout_p),
        weight.stride(0), weight.stride(2),
        HAS_DROPOUT=dropout_p > 0, DOT_PRECISION=_dot_precision(h.dtype), INTERPRETED=_interpreted(h),
        BLOCK_C=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_O=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return _gn_backward(dn, ps1, ps2, h, num_frames, stats, gamma, beta, groups, residual_grad)


def _gn_backward(dn: torch.Tensor, ps1: torch.Tensor, ps2: torch.Tensor, h: torch.Tensor, num_frames: int,
                 stats: GroupNormStats, gamma: torch.Tensor, beta: torch.Tensor, groups: int,
                 residual_grad: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GroupNorm backward from dn = dLoss/d(normalised + affine h) and its per-row partial sums (B, NT, C):
    dh [+ residual_grad], dgamma, dbeta."""
    bf, c_in, hh, ww = h.shape
    b, hw = bf // num_frames, hh * ww
    nt, cpg = ps1.shape[1], c_in // groups
    coef = torch.empty(3, b, c_in, device=h.device, dtype=torch.float32)
    dgamma = torch.empty(c_in, device=h.device, dtype=gamma.dtype)
    dbeta = torch.empty(c_in, device=h.device, dtype=beta.dtype)
    block_t, block_cpg = _reduce_blocks(cpg)
    _gn_bwd_reduce_kernel[(groups,)](
        ps1, ps2, stats.mean, stats.rstd, gamma, coef[0], coef[1], coef[2], dgamma, dbeta,
        b, c_in, groups, cpg, nt, 1.0 / (cpg * num_frames * hw), INTERPRETED=_interpreted(h), BLOCK_T=block_t,
        BLOCK_CPG=block_cpg, num_warps=4,
    )
    dh = torch.empty_like(h)
    grid_e, block_r, block_p = _row_pixel_grid(bf * c_in, hw)
    _gn_bwd_apply_kernel[grid_e](
        dn, h, coef[0], coef[1], coef[2], residual_grad if residual_grad is not None else dn, dh,
        bf * c_in, c_in, num_frames, hw,
        HAS_RESIDUAL=residual_grad is not None, INTERPRETED=_interpreted(h), BLOCK_R=block_r, BLOCK_P=block_p,
        num_warps=4,
    )
    return dh, dgamma, dbeta


def _block_forward(x: torch.Tensor, num_frames: int, norms: Sequence, weights: Sequence[torch.Tensor],
                   biases: Sequence[torch.Tensor], groups: int, eps: float, dropout_p: float, seed: int,
                   keep: bool) -> tuple[torch.Tensor, list[torch.Tensor], list[GroupNormStats]]:
    """The four stages; keep=True keeps every stage input (for backward), else two buffers ping-pong."""
    stats = [input_stats(x, num_frames, norms[0][0], norms[0][1], groups, eps)]
    inputs = [x]
    spare: list[torch.Tensor] = []
    h = x
    for s in range(4):
        last = s == 3
        out = spare.pop() if spare else None
        y, nxt = _stage_forward(h, num_frames, weights[s], biases[s], stats[s], residual=x if last else None,
                                next_norm=None if last else norms[s + 1], groups=groups, eps=eps,
                                dropout_p=dropout_p if s > 0 else 0.0, seed=_stage_seed(seed, s), out=out)
        if not keep and s > 0:
            spare.append(h)  # stage s's input is dead once stage s has run
        if not last:
            stats.append(nxt)
            inputs.append(y)
        h = y
    return h, inputs, stats


# --------------------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------------------


def _block_backward(dout: torch.Tensor, inputs: Sequence[torch.Tensor], weights: Sequence[torch.Tensor],
                    gammas: Sequence[torch.Tensor], betas: Sequence[torch.Tensor],
                    weight_params: Sequence[torch.Tensor], biases: Sequence[torch.Tensor],
                    stats: Sequence[GroupNormStats], num_frames: int, groups: int, dropout_p: float, seed: int,
                    need_weight: Sequence[bool], need_input: bool) -> tuple:
    """The block's backward from the saved stage inputs and statistics: (dx, dgammas, dbetas, dweights,
    dbiases), lists of 4, None where not needed. need_weight[s]: stage s's conv weight or bias trains (frozen
    convs skip the weight-gradient GEMM); need_input: x or stage 1's GroupNorm trains."""
    dout = dout.contiguous()
    dgammas, dbetas, dws, dbs = [None] * 4, [None] * 4, [None] * 4, [None] * 4
    g = dout
    for s in (3, 2, 1, 0):
        p = dropout_p if s > 0 else 0.0
        stage_seed = _stage_seed(seed, s)
        stage_input = s > 0 or need_input
        h = inputs[s]
        hw = h.shape[2] * h.shape[3]
        dgrad, wgrad = _backward_launch(h, g.shape[1], h.shape[1], hw, num_frames * hw, h.shape[0] // num_frames)
        # The GEMMs that run on cuBLAS share one pass writing g's padded layouts (both, when both do).
        cublas_w, cublas_d = need_weight[s] and wgrad is None, stage_input and dgrad.cublas
        g_next = None
        if cublas_w or cublas_d:
            g_next, dgammas[s], dbetas[s], dws[s], dbs[s] = _stage_backward_cublas(
                g, weights[s], h, num_frames, stats[s], gammas[s], betas[s], groups, p, stage_seed,
                dout if s == 0 else None, weight_params[s], biases[s], cublas_w, cublas_d, im2col=dgrad.im2col)
        if need_weight[s] and not cublas_w:
            dws[s], dbs[s] = _stage_wgrad(g, h, num_frames, stats[s], weight_params[s], biases[s], p, stage_seed,
                                          cfg=wgrad)
        if stage_input and not cublas_d:
            g_next, dgammas[s], dbetas[s] = _stage_dgrad(g, weights[s], h, num_frames, stats[s], gammas[s],
                                                         betas[s], groups, p, stage_seed,
                                                         residual_grad=dout if s == 0 else None, cfg=dgrad)
        g = g_next
    return g, dgammas, dbetas, dws, dbs


class _TemporalConvBlockFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, num_frames, groups, eps, dropout_p, seed, *params):
        gammas, betas, weight_params, biases = params[0:4], params[4:8], params[8:12], params[12:16]
        weights = [_weight3(w, x.dtype) for w in weight_params]
        norms = list(zip(gammas, betas))
        out, inputs, stats = _block_forward(x, num_frames, norms, weights, biases, groups, eps, dropout_p, seed,
                                            keep=True)
        flat_stats = [t for st in stats for t in st]
        ctx.save_for_backward(*inputs, *weights, *gammas, *betas, *weight_params, *biases, *flat_stats)
        ctx.cfg = (num_frames, groups, dropout_p, seed)
        return out

    @staticmethod
    def backward(ctx, dout):
        num_frames, groups, dropout_p, seed = ctx.cfg
        saved = ctx.saved_tensors
        inputs, weights, gammas, betas = saved[0:4], saved[4:8], saved[8:12], saved[12:16]
        weight_params, biases, flat = saved[16:20], saved[20:24], saved[24:]
        # needs_input_grad: x, five non-tensor arguments, then gammas (6..9), betas, weights, biases.
        needs = ctx.needs_input_grad
        dx, dgammas, dbetas, dws, dbs = _block_backward(
            dout, inputs, weights, gammas, betas, weight_params, biases, _unflatten_stats(flat), num_frames, groups,
            dropout_p, seed, [needs[14 + s] or needs[18 + s] for s in range(4)], needs[0] or needs[6] or needs[10])
        return (dx, None, None, None, None, None, *dgammas, *dbetas, *dws, *dbs)


def _unflatten_stats(flat: Sequence[torch.Tensor]) -> list[GroupNormStats]:
    n = len(GroupNormStats._fields)
    return [GroupNormStats(*flat[n * s:n * (s + 1)]) for s in range(len(flat) // n)]


# The trainable block as operators for torch.compile (training under compile): the forward returns the
# output and what the backward reads (stage inputs y1..y3 and the statistics, fresh tensors), the backward is
# a second operator; Dynamo and AOTAutograd see two opaque nodes instead of the launchers. The dropout seed
# is a tensor so that a seed drawn inside a compiled region stays in the graph.


def _block_train(x: torch.Tensor, num_frames: int, gammas: List[torch.Tensor], betas: List[torch.Tensor],
                 weights: List[torch.Tensor], biases: List[torch.Tensor], groups: int, eps: float, dropout_p: float,
                 seed: torch.Tensor) -> List[torch.Tensor]:
    packed = [_weight3(w, x.dtype) for w in weights]
    out, inputs, stats = _block_forward(x, num_frames, list(zip(gammas, betas)), packed, biases, groups, eps,
                                        dropout_p, int(seed), keep=True)
    # Outputs may not alias each other: the statistics' center / scale / shift share one allocation.
    return [out, *inputs[1:], *(t.clone() for st in stats for t in st)]


_block_train_op = torch.library.custom_op("pdengine::temporal_conv_block_train", _block_train, mutates_args=())


@_block_train_op.register_fake
def _(x, num_frames, gammas, betas, weights, biases, groups, eps, dropout_p, seed):
    b, c = x.shape[0] // num_frames, x.shape[1]
    groups_stats = [x.new_empty((b, groups), dtype=torch.float32)] * 2
    channel_stats = [x.new_empty((b, c), dtype=torch.float32)] * 3
    return [torch.empty_like(x) for _ in range(4)] + [torch.empty_like(t) for _ in range(4)
                                                      for t in (*groups_stats, *channel_stats)]


def _block_train_backward(dout: torch.Tensor, saved: List[torch.Tensor], gammas: List[torch.Tensor],
                          betas: List[torch.Tensor], weights: List[torch.Tensor], biases: List[torch.Tensor],
                          num_frames: int, groups: int, dropout_p: float, seed: torch.Tensor,
                          need_weight: List[bool], need_input: bool) -> List[torch.Tensor]:
    """[dx, 4 dgammas, 4 dbetas, 4 dweights, 4 dbiases]; a gradient that was not needed is an empty tensor."""
    inputs, flat = saved[:4], saved[4:]
    packed = [_weight3(w, inputs[0].dtype) for w in weights]
    dx, dgammas, dbetas, dws, dbs = _block_backward(
        dout, inputs, packed, gammas, betas, weights, biases, _unflatten_stats(flat), num_frames, groups, dropout_p,
        int(seed), need_weight, need_input)
    empty = dout.new_empty(0)
    return [t if t is not None else empty.clone() for t in (dx, *dgammas, *dbetas, *dws, *dbs)]


_block_train_backward_op = torch.library.custom_op("pdengine::temporal_conv_block_train_backward",
                                                   _block_train_backward, mutates_args=())


@_block_train_backward_op.register_fake
def _(dout, saved, gammas, betas, weights, biases, num_frames, groups, dropout_p, seed, need_weight, need_input):
    def like(t: torch.Tensor, needed: bool) -> torch.Tensor:
        return torch.empty_like(t) if needed else dout.new_empty(0)

    stage0 = need_input
    return [like(saved[0], need_input), *(like(g, s > 0 or stage0) for s, g in enumerate(gammas)),
            *(like(b, s > 0 or stage0) for s, b in enumerate(betas)),
            *(like(w, need_weight[s]) for s, w in enumerate(weights)),
            *(like(b, need_weight[s]) for s, b in enumerate(biases))]


def _block_train_setup(ctx, inputs, output):
    x, num_frames, gammas, betas, weights, biases, groups, eps, dropout_p, seed = inputs
    ctx.save_for_backward(x, *output[1:], *gammas, *betas, *weights, *biases, seed)
    ctx.cfg = (num_frames, groups, dropout_p, len(output) - 1)


def _block_train_grad(ctx, grads):
    num_frames, groups, dropout_p, n_saved = ctx.cfg
    saved = ctx.saved_tensors
    x, rest = saved[0], saved[1:]
    kept, params, seed = rest[:n_saved], rest[n_saved:-1], rest[-1]
    gammas, betas, weights, biases = params[0:4], params[4:8], params[8:12], params[12:16]
    needs = ctx.needs_input_grad  # per input, lists for the list inputs
    need_weight = [needs[4][s] or needs[5][s] for s in range(4)]
    need_input = needs[0] or needs[2][0] or needs[3][0]
    out = _block_train_backward_op(grads[0], [x, *kept], list(gammas), list(betas), list(weights), list(biases),
                                   num_frames, groups, dropout_p, seed, need_weight, need_input)
    dx, dgammas, dbetas, dws, dbs = out[0], out[1:5], out[5:9], out[9:13], out[13:17]

    def pick(ts, flags):
        return [t if f else None for t, f in zip(ts, flags)]

    stage_input = [s > 0 or need_input for s in range(4)]
    return (dx if needs[0] else None, None, pick(dgammas, stage_input), pick(dbetas, stage_input),
            pick(dws, need_weight), pick(dbs, need_weight), None, None, None, None)


_block_train_op.register_autograd(_block_train_grad, setup_context=_block_train_setup)


# --------------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------------


_MAX_LAUNCH_ELEMENTS = 2**31 - 1  # int32 indexing inside the kernels


def _check_x(x: torch.Tensor, num_frames: int) -> None:
    if x.dim() != 4:
        raise ValueError(f"x must be (B*F, C, H, W), got shape {tuple(x.shape)}")
    if num_frames < 1 or x.shape[0] % num_frames != 0:
        raise ValueError(f"x has {x.shape[0]} rows, not a multiple of num_frames={num_frames}")
    if (num_frames + 2) * x[0].numel() > _MAX_LAUNCH_ELEMENTS:
        raise ValueError(f"one video has {num_frames * x[0].numel()} elements; the kernels index with int32 "
                         "(< 2**31, with two frames of padding)")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"unsupported dtype {x.dtype} (fp32, fp16, bf16)")


def _check_dropout(dropout_p: float) -> None:
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")


def temporal_conv_block(
    x: torch.Tensor,
    num_frames: int,
    norms: Sequence[tuple[torch.Tensor, torch.Tensor]],
    convs: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    groups: int,
    eps: float = 1e-5,
    dropout_p: float = 0.0,
    seed: int | None = None,
    training: bool = False,
) -> torch.Tensor:
    """x + stage4(stage3(stage2(stage1(x)))) for x (B*F, C, H, W), rows ordered (b, f). Autograd-aware.

    norms: 4 x (gamma, beta) of the GroupNorms; convs: 4 x (weight (C, C, 3, 1, 1) or (C, C, 3), bias).
    Dropout (stages 2-4) runs only when training and dropout_p > 0; its mask comes from `seed` (drawn from
    torch's default CPU generator when None, so torch.manual_seed makes runs repeatable).
    """
    _check_x(x, num_frames)
    _check_dropout(dropout_p)
    if len(norms) != 4 or len(convs) != 4:
        raise ValueError(f"expected 4 norms and 4 convs, got {len(norms)} and {len(convs)}")
    c = x.shape[1]
    if c % groups != 0:
        raise ValueError(f"{c} channels are not divisible into {groups} groups")
    for s, ((gamma, beta), (weight, bias)) in enumerate(zip(norms, convs)):
        if weight.shape[:2] != (c, c) or bias.shape != (c,) or gamma.shape != (c,) or beta.shape != (c,):
            raise ValueError(f"stage {s + 1}: expected (C, C, 3[, 1, 1]) weight and (C,) bias/gamma/beta with "
                             f"C={c}, got {tuple(weight.shape)}, {tuple(bias.shape)}, {tuple(gamma.shape)}, "
                             f"{tuple(beta.shape)}")
    p = dropout_p if training else 0.0
    if seed is not None and not 0 <= int(seed) < 2**31 - 4:
        raise ValueError(f"seed must be in [0, 2**31 - 4), got {seed}")
    gammas = [n[0] for n in norms]
    betas = [n[1] for n in norms]
    weights = [cv[0] for cv in convs]
    biases = [cv[1] for cv in convs]
    params = [*gammas, *betas, *weights, *biases]
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params))
    # The kernels index a launch with int32: a batch past 2**31 elements runs as several launches over whole
    # videos (statistics and convolutions never cross videos, so this is exact); each chunk gets its own
    # dropout seeds so masks do not repeat. Counted with the cuBLAS variant's two padding frames per video.
    per_video = (num_frames + 2) * x[0].numel()
    max_rows = (_MAX_LAUNCH_ELEMENTS // per_video) * num_frames
    if needs_grad and operator_path() and x.shape[0] <= max_rows:
        # Training under torch.compile: one operator pair (see _block_train); a seed drawn here stays a tensor
        # in the graph (int() of it would break the graph).
        seed_t = torch.randint(0, 2**31 - 8, ()) if p > 0 and seed is None else torch.tensor(int(seed or 0))
        return _block_train_op(x.contiguous(), num_frames, gammas, betas, weights, biases, groups, eps, p, seed_t)[0]
    if p > 0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 8, ()))
    seed = 0 if seed is None else int(seed)
    if x.shape[0] > max_rows:
        parts = [temporal_conv_block(part, num_frames, norms, convs, groups=groups, eps=eps, dropout_p=dropout_p,
                                     seed=(seed + 4 * i) % (2**31 - 8), training=training)
                 for i, part in enumerate(x.split(max_rows))]
        return torch.cat(parts)
    x = x.contiguous()
    if needs_grad:
        return _TemporalConvBlockFn.apply(x, num_frames, groups, eps, p, seed, *params)
    if operator_path():
        return _block_inference_op(x, num_frames, gammas, betas, weights, biases, groups, eps, p, seed)
    return _block_inference(x, num_frames, gammas, betas, weights, biases, groups, eps, p, seed)


def _block_inference(x: torch.Tensor, num_frames: int, gammas: List[torch.Tensor], betas: List[torch.Tensor],
                     weights: List[torch.Tensor], biases: List[torch.Tensor], groups: int, eps: float,
                     dropout_p: float, seed: int) -> torch.Tensor:
    out, _, _ = _block_forward(x, num_frames, list(zip(gammas, betas)), [_weight3(w, x.dtype) for w in weights],
                               biases, groups, eps, dropout_p, seed, keep=False)
    return out


# The no-grad block as one opaque operator for torch.compile: traced code sees a single node (shapes from the
# fake implementation) instead of walking into the launcher and the kernels. Eager calls skip the dispatcher.
_block_inference_op = torch.library.custom_op("pdengine::temporal_conv_block", _block_inference, mutates_args=())


@_block_inference_op.register_fake
def _(x, num_frames, gammas, betas, weights, biases, groups, eps, dropout_p, seed):
    return torch.empty_like(x)


def temporal_conv_stage(
    x: torch.Tensor,
    num_frames: int,
    norm: tuple[torch.Tensor, torch.Tensor],
    conv: tuple[torch.Tensor, torch.Tensor],
    *,
    groups: int,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    seed: int = 0,
    stage: int = 0,
) -> torch.Tensor:
    """One stage, forward only (for benchmarks and tests): conv(dropout(silu(GN(x)))) + bias [+ residual],
    C_in may differ from C_out. The dropout mask is the block's stage `stage` (0-3) mask for `seed`."""
    _check_x(x, num_frames)
    _check_dropout(dropout_p)
    x = x.contiguous()
    if x.shape[1] % groups != 0:
        raise ValueError(f"{x.shape[1]} channels are not divisible into {groups} groups")
    weight = _weight3(conv[0], x.dtype)
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects {weight.shape[1]} input channels, x has {x.shape[1]}")
    if residual is not None:
        expected = (x.shape[0], weight.shape[0], *x.shape[2:])
        if tuple(residual.shape) != expected:
            raise ValueError(f"residual must be {expected}, got {tuple(residual.shape)}")
        residual = residual.contiguous()
    stats = input_stats(x, num_frames, norm[0], norm[1], groups, eps)
    y, _ = _stage_forward(x, num_frames, weight, conv[1], stats, residual=residual, next_norm=None, groups=groups,
                          eps=eps, dropout_p=dropout_p, seed=_stage_seed(seed, stage))
    return y


def dropout_masks(shape: Sequence[int], *, seed: int, dropout_p: float,
                  device: torch.device | str = "cpu") -> list[torch.Tensor | None]:
    """The dropout multipliers (0 or 1/(1-p), fp32, `shape` = the block input's) that `temporal_conv_block`
    uses for `seed`: [None, m2, m3, m4], ready for `temporal_conv_block_ref(dropout_masks=...)`."""
    _check_dropout(dropout_p)
    n = 1
    for d in shape:
        n *= int(d)
    masks: list[torch.Tensor | None] = [None]
    for s in (1, 2, 3):
        out = torch.empty(n, device=device, dtype=torch.float32)
        _dropout_mask_kernel[(triton.cdiv(n, 1024),)](out, n, _stage_seed(seed, s), dropout_p,
                                                      _drop_scale(dropout_p), BLOCK=1024)
        masks.append(out.view(*shape))
    return masks


# --------------------------------------------------------------------------------------------------------
# Modeled traffic and compile specs
# --------------------------------------------------------------------------------------------------------


def modeled_bytes(b: int, f: int, c: int, h: int, w: int, dtype: torch.dtype = torch.bfloat16, *,
                  backward: bool = False) -> int:
    """Minimum HBM bytes this design moves for a C -> C block's forward (or, with backward=True, its
    backward), counting each kernel's reads and writes of every tensor once.

    Forward: the stats kernel reads x; each stage reads its input once, writes its output once, reads the
    weights/bias/GroupNorm parameters and the (B, C) fp32 center/scale/shift, and writes the fp32 statistics
    partials that the finalize kernel reads back; stage 4 also reads the residual x. Backward, per stage:
    wgrad reads g and the stage input and writes fp32 split partials (read back by the split sum, which
    writes dW and dbias); dgrad reads g, W and the stage input and writes dn and partial sums; the reduce
    kernel writes coefficients, dgamma, dbeta; the apply kernel reads dn and the stage input and writes dh
    (stage 1 also reads the residual's gradient). Re-reads served by L2 (the frame halo of the taps, one
    operand tile per output tile) are not counted.
    """
    es = torch.empty((), dtype=dtype).element_size()
    hw, fhw = h * w, f * h * w
    act = b * fhw * c * es
    weight = 3 * c * c * es
    vec = c * es  # one bias / gamma / beta
    folded = 3 * b * c * 4  # center, scale, shift: (B, C) fp32 each

    def partials(tile_n: int) -> int:
        return 2 * b * triton.cdiv(fhw, tile_n) * c * 4  # two fp32 (B, NT, C) arrays

    fwd_cfg = _gemm_config(c, c, hw, fhw)
    fwd = act + 2 * partials(_STATS_BLOCK_N) + 2 * vec + folded  # stats kernel on x, finalize
    for s in range(4):
        fwd += 2 * act + weight + vec + folded  # read input, write output, params
        if s < 3:
            fwd += 2 * partials(fwd_cfg.block_n) + 2 * vec + folded  # next stage's statistics
        else:
            fwd += act  # residual
    if not backward:
        return fwd
    wcfg = _wgrad_config(c, c, b, fhw)
    dcfg = _dgrad_config(c, c, hw, fhw)
    split_part = wcfg.split * (3 * c * c + c) * 4
    bwd = 0
    for s in range(4):
        bwd += 2 * act + folded + 2 * split_part + weight + vec  # wgrad + split sum
        bwd += 2 * act + weight + 2 * folded + act + partials(dcfg.block_n)  # dgrad
        bwd += partials(dcfg.block_n) + vec + 3 * b * c * 4 + 2 * vec  # reduce
        bwd += 3 * act + 3 * b * c * 4 + (act if s == 0 else 0)  # apply
    return bwd


_PRESET = {"b": 2, "f": 16, "groups": 32, "channels": (320, 640, 1280), "hw": (1024, 256, 64, 16)}


_FLOAT_ARGS = {"p_drop", "drop_scale", "eps", "inv_n"}
# Int arguments that are multiples of 16 at the preset (C in {320, 640, 1280}, F = 16, H*W in {1024, 256, 64,
# 16}, the packed weight's strides C_in and C_out*C_in, rows B*F*C): the launcher specializes on that.
_DIVISIBLE_AT_PRESET = {"C_in", "C_out", "C", "F", "HW", "stride_w_o", "stride_w_k", "ROWS", "STRIDE_F", "STRIDE_C",
                        "STRIDE_F2", "STRIDE_C2", "TAP_STRIDE", "STRIDE_ZC", "STRIDE_ZW",
                        "STRIDE_DC", "STRIDE_DW"}
_FP32_PTRS = {"center_ptr", "scale_ptr", "shift_ptr", "pmean_ptr", "pm2_ptr", "mean_ptr", "rstd_ptr", "ps1_ptr",
              "ps2_ptr", "dw_part_ptr", "db_part_ptr", "part_ptr", "coef_a_ptr", "coef_b_ptr", "coef_c_ptr"}


def _signature(fn, consts: dict) -> dict[str, str]:
    """Triton signature of `fn` at the preset: statistics/partials fp32, every other tensor bf16 (bf16
    activations and parameters), int arguments i32, the few float scalars fp32."""
    names = inspect.signature(getattr(fn, "fn", fn)).parameters
    sig = {}
    for name in names:
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in _FP32_PTRS else "*bf16"
        else:
            sig[name] = "fp32" if name in _FLOAT_ARGS else "i32"
    return sig


def compile_specs() -> list[CompileSpec]:
    """Every launch at the `pixeldance` shapes (CFG batch 2, 16 frames, 32 groups, C in {320, 640, 1280},
    H*W in {32x32, 16x16, 8x8, 4x4}, bf16), one spec per distinct configuration. GEMM kernels are listed
    with dropout on (the training variant: a superset of the inference code)."""
    specs: dict[tuple, CompileSpec] = {}

    def add(name: str, fn, consts: dict, num_warps: int, num_stages: int, mma: bool):
        consts = {**consts, "INTERPRETED": False} if "INTERPRETED" in _signature(fn, {}) else consts
        key = (name, tuple(sorted(consts.items())), num_warps, num_stages)
        tag = "-".join(f"{k.lower()}{int(v) if isinstance(v, bool) else v}" for k, v in consts.items()
                       if k not in ("DOT_PRECISION", "INTERPRETED"))
        sig = _signature(fn, consts)
        specs.setdefault(key, CompileSpec(f"{name}[{tag}-w{num_warps}]", fn, sig, consts, num_warps, num_stages, mma,
                                          divisible=tuple(n for n in sig if n in _DIVISIBLE_AT_PRESET)))

    b, f, groups = _PRESET["b"], _PRESET["f"], _PRESET["groups"]
    for c in _PRESET["channels"]:
        block_t, block_cpg = _reduce_blocks(c // groups)
        add("gn_finalize", _gn_finalize_kernel, {"BLOCK_T": block_t, "BLOCK_CPG": block_cpg}, 4, 3, False)
        add("gn_bwd_reduce", _gn_bwd_reduce_kernel, {"BLOCK_T": block_t, "BLOCK_CPG": block_cpg}, 4, 3, False)
        for hw in _PRESET["hw"]:
            fhw = f * hw
            cfg = _gemm_config(c, c, hw, fhw)
            for stats, res in ((True, False), (False, True)):
                add("stage_fwd", _stage_fwd_kernel,
                    {"HAS_RESIDUAL": res, "HAS_STATS": stats, "HAS_DROPOUT": True, "DOT_PRECISION": "tf32",
                     "BLOCK_O": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_C": cfg.block_k, "PRENORM": False},
                    cfg.num_warps, cfg.num_stages, True)
            # The prenorm variant at the same tiles (what `pdengine bench conv-configs` compares against).
            add("stage_fwd_prenorm", _stage_fwd_kernel,
                {"HAS_RESIDUAL": True, "HAS_STATS": True, "HAS_DROPOUT": False, "DOT_PRECISION": "tf32",
                 "BLOCK_O": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_C": cfg.block_k, "PRENORM": True},
                cfg.num_warps, cfg.num_stages, True)
            dcfg = _dgrad_config(c, c, hw, fhw)
            add("stage_dgrad", _stage_dgrad_kernel,
                {"HAS_DROPOUT": True, "DOT_PRECISION": "tf32", "BLOCK_C": dcfg.block_m, "BLOCK_N": dcfg.block_n,
                 "BLOCK_O": dcfg.block_k}, dcfg.num_warps, dcfg.num_stages, True)
            wcfg = _wgrad_config(c, c, b, fhw)
            add("stage_wgrad", _stage_wgrad_kernel,
                {"HAS_DROPOUT": True, "DOT_PRECISION": "tf32", "BLOCK_O": wcfg.block_o, "BLOCK_C": wcfg.block_c,
                 "BLOCK_N": wcfg.block_n}, wcfg.num_warps, wcfg.num_stages, True)
            _, block_r, block_p = _row_pixel_grid(b * f * c, hw)
            add("gn_bwd_apply", _gn_bwd_apply_kernel,
                {"HAS_RESIDUAL": True, "BLOCK_R": block_r, "BLOCK_P": block_p}, 4, 3, False)
            add("norm_act", _norm_act_kernel, {"HAS_DROPOUT": True, "BLOCK_R": block_r, "BLOCK_P": block_p}, 4, 3,
                False)
            # The cuBLAS variant's passes (set_conv_gemm("cublas")).
            _, block_r, block_p = _row_pixel_grid(b * (f + 2) * c, hw)
            for taps in (1, 3):  # 3: the im2col matrix of the single-GEMM forward (cublas_im2col)
                add("pad", _pad_kernel, {"ACT": True, "HAS_DROPOUT": True, "HAS_OUT2": False, "BLOCK_R": block_r,
                                         "BLOCK_P": block_p, "TAPS": taps}, 4, 3, False)
            add("pad", _pad_kernel, {"ACT": False, "HAS_DROPOUT": False, "HAS_OUT2": True, "BLOCK_R": block_r,
                                     "BLOCK_P": block_p, "TAPS": 1}, 4, 3, False)
    for stats, res in ((True, False), (False, True)):
        add("gemm_epilogue", _gemm_epilogue_kernel,
            {"HAS_RESIDUAL": res, "HAS_STATS": stats, "BLOCK_C": _STATS_BLOCK_C, "BLOCK_N": _STATS_BLOCK_N}, 4, 3,
            False)
    add("act_bwd", _act_bwd_kernel, {"HAS_DROPOUT": True, "BLOCK_C": _STATS_BLOCK_C, "BLOCK_N": _STATS_BLOCK_N}, 4,
        3, False)
    add("stats", _stats_kernel, {"BLOCK_C": _STATS_BLOCK_C, "BLOCK_N": _STATS_BLOCK_N}, 4, 3, False)
    add("sum_splits", _sum_splits_kernel, {"BLOCK": 1024}, 4, 3, False)
    return list(specs.values())

