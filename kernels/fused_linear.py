"""The transformers' linear layers with their neighbours fused, for inference: LayerNorm folded into the
projection that follows it, and the residual add in the output projection's epilogue.

A pre-norm block runs `x + out(attn(q, k, v = linear(layer_norm(x))))` and `x + ff(layer_norm(x))`. Eagerly
each LayerNorm reads x and writes h (2 passes of the token rows) and the projection reads h again; each
output projection writes its result, which the residual add reads beside x before writing the sum (3 more).
Here:

- **LayerNorm folded into the projection.** With per-row mean mu and rstd r, and the norm's affine gamma, beta,
      layer_norm(x) @ W.T + b  =  r * (x @ W'.T - mu * s) + b'
  where W' = W * gamma (columns scaled), s = W' summed over K (one number per output column, taken from
  W' as rounded to its dtype, so the cancellation is exact up to fp32 accumulation) and b' = b + W @ beta.
  The GEMM multiplies the raw rows x (plain tiles: asynchronous copies and tensor cores as in any GEMM) and
  the epilogue applies r, mu and s; `row_stats` reads x once for (mu, r) (8 bytes per row written). The
  LayerNorm's output is never written: per norm, 1 pass of the rows instead of 3.
  W', b', s are computed once per weight version (`fold_layer_norm`) and held beside the weights.
- **The norm's statistics from the GEMM before it.** Where the rows x were just written by one of these
  GEMMs (`stats_out=True`: the output projections with their residual, a transformer's proj_in), its epilogue
  also writes each tile's row mean and centred sum of squares of the values as stored (8 bytes per row and
  column tile), and `merge_row_stats` combines them in a fixed order (Chan et al.'s parallel variance:
  deterministic, and exact like a two-pass variance): no pass over x at all for the statistics.
- **A transformer's GroupNorm folded into its proj_in.** The GroupNorm (statistics per video and group) and
  the way from the (B*F, C, H, W) layout to token rows otherwise take one kernel that reads x twice and writes
  the normalised tokens, which proj_in reads again. `group_norm_linear` reads x's tiles straight from the video
  layout (each tile's rows are pixels of one image: contiguous, 16-byte asynchronous copies), normalises them
  as they are loaded with `video_group_stats` (one read of x; the affine folded into W and b as for a
  LayerNorm), rounds them once to x's dtype (as the norm's output would be) and multiplies: per transformer
  2 passes of the activation instead of 4. Images of 64 pixels and more (`group_norm_fold_ok`).
- **Residual in the epilogue.** `fused_linear(o, W, b, residual=x)` writes x + o @ W.T + b directly: the
  projection's output is never stored and re-read (2 passes instead of 4 for the output, per block 3 times).
  `linear_to_video_residual` does the same for a transformer's proj_out, storing straight into the
  (B*F, C, H, W) layout of its residual (the token rows' way back to the video layout, otherwise its own
  kernel: `temporal_attention.tokens_to_video_residual`).

fp32 accumulation throughout; fp32 operands multiply exactly (the accuracy path); 16-bit operands use
tensor cores. No autograd (training keeps the cuBLAS projections, whose backward needs the normalised
input): inference only, under the switch `transformer_gemm("fused")` / `PDENGINE_TRANSFORMER_GEMM=fused`,
which also turns on the feed-forward's fused projection + gate (`geglu.ff_geglu`, with the LayerNorm folded
in the same way). The default, "auto", runs it on a GPU whose launch table says `pdengine tune` found it
faster than cuBLAS there (one UNet call each way, outputs compared first), and cuBLAS otherwise
(`pdengine info` and the bench rows say which mode ran).

Rows on grid axis 0 (as (row tile, column tile) pairs, GROUP_M row tiles per column tile so a weight tile
stays in L2), int64 row offsets. Under torch.compile and inside `pdengine.kernels.as_operators()` the entry
points are opaque operators whose fake implementations give shapes on meta tensors.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec, jit_function
from .temporal_conv import _cast, _dot

__all__ = ["row_stats", "merge_row_stats", "RowPartials", "fused_linear", "layer_norm_linear",
           "linear_to_video_residual", "video_layout_ok", "fold_layer_norm", "FoldedNorm", "video_group_stats",
           "group_norm_linear", "group_norm_fold_ok", "transformer_gemm",
           "transformer_gemm_mode", "transformer_gemm_for", "modeled_bytes", "compile_specs"]


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _row_stats_kernel(
    x_ptr,  # (R, K) rows, row stride stride_x, unit column stride
    mean_ptr,  # (R,) fp32
    rstd_ptr,  # (R,) fp32
    R, K, stride_x, eps,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_x
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        acc += tl.load(base + cols[None, :], mask=r_ok[:, None] & (cols < K)[None, :], other=0.0).to(tl.float32)
    mean = tl.sum(acc, axis=1) / K
    # Second pass over the same rows (from L1/L2: a row is at most a few KB) for the centred sum of squares,
    # as exact as PyTorch's LayerNorm even when |mean| >> std.
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        mask = r_ok[:, None] & (cols < K)[None, :]
        d = tl.load(base + cols[None, :], mask=mask, other=0.0).to(tl.float32) - mean[:, None]
        d = tl.where(mask, d, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=1) / K + eps)
    tl.store(mean_ptr + rows, mean, mask=r_ok)
    tl.store(rstd_ptr + rows, rstd, mask=r_ok)


@triton.jit
def _tile_ids(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile of an (M, N) GEMM: (row tile, column tile). Programs walk GROUP_M row tiles
    per column tile, so a column tile's weight rows stay in L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % size_m, (pid % per_group) // size_m


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile's row and column offsets (see `_tile_ids`)."""
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _fold_norm(acc, mean_ptr, rstd_ptr, cs_ptr, offs_m, offs_n, m_ok, n_ok):
    """x @ W'.T -> layer_norm(x) @ W.T for a folded LayerNorm: r * (acc - mu * colsum), per row and column."""
    mu = tl.load(mean_ptr + offs_m, mask=m_ok, other=0.0)
    rs = tl.load(rstd_ptr + offs_m, mask=m_ok, other=0.0)
    cs = tl.load(cs_ptr + offs_n, mask=n_ok, other=0.0)
    return (acc - mu[:, None] * cs[None, :]) * rs[:, None]


@triton.jit
def _linear_kernel(
    x_ptr,  # (M, K) input rows, row stride stride_x, unit column stride
    w_ptr,  # (N, K) weight, contiguous
    b_ptr,  # (N,) bias (HAS_BIAS), any float dtype
    mean_ptr, rstd_ptr,  # (M,) fp32 row statistics (NORM)
    cs_ptr,  # (N,) fp32 column sums of the folded weight (NORM)
    r_ptr,  # (M, N) residual, row stride stride_r (HAS_RES); (M / P, N, P) when VIDEO_P
    y_ptr,  # (M, N) output, contiguous; (M / P, N, P) when VIDEO_P
    part_ptr,  # (M, cdiv(N, BLOCK_N), 2) fp32: each tile's row mean and centred sum of squares (STATS_OUT)
    gm_ptr, gr_ptr,  # (videos, K / CPG) fp32 GroupNorm mean and rstd per (video, group) (VIDEO_IN)
    M, N, K, stride_x, stride_r, CPG, ROWS_V,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RES: tl.constexpr,
    VIDEO_P: tl.constexpr,  # 0, or P: rows m = image * P + pixel stored to the (images, N, P) layout
    STATS_OUT: tl.constexpr,  # the output rows' LayerNorm statistics, per tile (row layout only)
    VIDEO_IN: tl.constexpr,  # 0, or P: x is (M / P, K, P) video-layout input, GroupNorm-normalised as loaded
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
    PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    pid_m, pid_n = _tile_ids(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    rows64 = offs_m.to(tl.int64)[:, None]
    if VIDEO_IN > 0:
        # Rows m = image * P + pixel read from the (images, K, P) video layout: a tile's rows are consecutive
        # pixels of one image of one video (P and ROWS_V are multiples of BLOCK_M), so each channel's pixels
        # load contiguously (the image and first pixel as scalars, for 16-byte vectors), and one video's
        # GroupNorm statistics serve the tile, one (mean, rstd) pair per channel's group.
        first = pid_m * BLOCK_M
        pixel = tl.multiple_of(first % VIDEO_IN, BLOCK_M) + tl.arange(0, BLOCK_M)  # P % BLOCK_M == 0
        a_ptrs = x_ptr + (first // VIDEO_IN).to(tl.int64) * K * VIDEO_IN + offs_k[None, :] * VIDEO_IN + pixel[:, None]
        g_base = (first // ROWS_V) * (K // CPG)  # this video's first (video, group) statistic
        a_step = BLOCK_K * VIDEO_IN
    else:
        a_ptrs = x_ptr + rows64 * stride_x + offs_k[None, :]
        a_step = BLOCK_K
    b_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]  # W^T tiles (BLOCK_K, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if VIDEO_IN > 0:
            # (x - mean) * rstd of the channel's group, rounded once to x's dtype (as the GroupNorm's output
            # would be); the affine is folded into the weight and bias.
            groups = g_base + (k0 + offs_k) // CPG
            if EVEN_K:
                mu = tl.load(gm_ptr + groups)
                rs = tl.load(gr_ptr + groups)
            else:
                mu = tl.load(gm_ptr + groups, mask=k_ok, other=0.0)
                rs = tl.load(gr_ptr + groups, mask=k_ok, other=0.0)
            a = _cast((a.to(tl.float32) - mu[None, :]) * rs[None, :], x_ptr.dtype.element_ty, INTERPRETED)
        acc = _dot(a, b, acc, PRECISION, INTERPRETED)
        a_ptrs += a_step
        b_ptrs += BLOCK_K
    if NORM:
        acc = _fold_norm(acc, mean_ptr, rstd_ptr, cs_ptr, offs_m, offs_n, m_ok, n_ok)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if VIDEO_P > 0:
        # Token rows back to the (B*F, C, H, W) layout: a tile's rows are consecutive pixels of one image
        # (P % BLOCK_M == 0), so the stores run contiguously down each output channel (the image and first
        # pixel as scalars, so the compiler sees the contiguity: 16-byte vector stores).
        first = pid_m * BLOCK_M
        pixel = tl.multiple_of(first % VIDEO_P, BLOCK_M) + tl.arange(0, BLOCK_M)  # P % BLOCK_M == 0
        out = (first // VIDEO_P).to(tl.int64) * N * VIDEO_P + offs_n[None, :] * VIDEO_P + pixel[:, None]
        r_off = out
    else:
        out = rows64 * N + offs_n[None, :]
        r_off = rows64 * stride_r + offs_n[None, :]
    if HAS_RES:
        acc += tl.load(r_ptr + r_off, mask=mask, other=0.0).to(tl.float32)
    y = _cast(acc, y_ptr.dtype.element_ty, INTERPRETED)
    tl.store(y_ptr + out, y, mask=mask)
    if STATS_OUT:
        # The next LayerNorm's statistics of the values as stored, per (row, column tile): the tile's mean and
        # centred sum of squares, merged across tiles in a fixed order by `merge_row_stats` (deterministic,
        # exact like a two-pass variance). The rows are never read again for them.
        yf = tl.where(mask, y.to(tl.float32), 0.0)
        count = tl.sum(n_ok.to(tl.float32), axis=0)
        mean_t = tl.sum(yf, axis=1) / count
        d = tl.where(mask, yf - mean_t[:, None], 0.0)
        tiles = tl.cdiv(N, BLOCK_N)
        p_ptrs = part_ptr + offs_m.to(tl.int64) * (2 * tiles) + 2 * pid_n
        tl.store(p_ptrs, mean_t, mask=m_ok)
        tl.store(p_ptrs + 1, tl.sum(d * d, axis=1), mask=m_ok)


@triton.jit
def _merge_stats_kernel(
    part_ptr,  # (R, TILES, 2) fp32 per-tile row means and centred sums of squares
    mean_ptr, rstd_ptr,  # (R,) fp32
    R, N, TILES, TILE, eps,
    BLOCK_R: tl.constexpr,
    TILES_P2: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = rows < R
    t = tl.arange(0, TILES_P2)
    t_ok = t < TILES
    counts = tl.maximum(tl.minimum(TILE, N - t * TILE), 0).to(tl.float32)  # columns per tile
    mask = r_ok[:, None] & t_ok[None, :]
    ptrs = part_ptr + rows.to(tl.int64)[:, None] * (2 * TILES) + 2 * t[None, :]
    mean_t = tl.load(ptrs, mask=mask, other=0.0)
    m2_t = tl.load(ptrs + 1, mask=mask, other=0.0)
    mean = tl.sum(mean_t * counts[None, :], axis=1) / N
    dev = tl.where(mask, mean_t - mean[:, None], 0.0)
    m2 = tl.sum(m2_t + counts[None, :] * dev * dev, axis=1)  # Chan et al.'s parallel variance
    tl.store(mean_ptr + rows, mean, mask=r_ok)
    tl.store(rstd_ptr + rows, 1.0 / tl.sqrt(m2 / N + eps), mask=r_ok)


# ----------------------------------------------------------------------------------------------- launchers


class _LinearConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _linear_config(dtype: torch.dtype, n: int) -> _LinearConfig:
    """16-bit operands: 128-row tiles, 128 columns (64 where N is an odd multiple of 64: the preset's 320 and
    960), K steps of 64, three stages (tensor cores). fp32 operands (exact products on FMA units, the accuracy
    path): 64 x 64 tiles, K steps of 16, two stages."""
    if dtype == torch.float32:
        return _LinearConfig(64, 64, 16, 8, 4, 2)
    return _LinearConfig(128, 128 if n % 128 == 0 else 64, 64, 8, 8, 3)


def _stats_config(k: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_K, num_warps): 4096-element tiles, up to 1024 columns per step."""
    block_k = min(1024, triton.next_power_of_2(max(k, 1)))
    return max(1, 4096 // block_k), block_k, 4


def _rows(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """t (..., width) as (R, width) rows without copying; unit stride along the last dim required."""
    try:
        rows = t.view(-1, width)
    except RuntimeError:
        rows = None
    if rows is None or (rows.numel() and rows.stride(1) != 1):
        raise ValueError(f"{name}'s leading dims must collapse into rows without a copy, with unit last-dim stride; "
                         f"got shape {tuple(t.shape)} strides {t.stride()}")
    return rows


def _row_stats_forward(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    k = x.shape[-1]
    x2 = _rows(x, k, "x")
    mean = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if mean.numel():
        block_r, block_k, num_warps = _stats_config(k)
        _row_stats_kernel[(triton.cdiv(x2.shape[0], block_r),)](
            x2, mean, rstd, x2.shape[0], k, x2.stride(0), eps, BLOCK_R=block_r, BLOCK_K=block_k, num_warps=num_warps)
    return mean, rstd


def _video_block_m(cfg: _LinearConfig, pixels: int) -> int:
    """The largest row tile (down to 16) that divides `pixels` and fits the config, or 0 if none does."""
    block = cfg.block_m
    while block >= 16 and pixels % block:
        block //= 2
    return block if block >= 16 else 0


def _stats_tiles(dtype: torch.dtype, n: int) -> tuple[int, int]:
    """(column tiles, tile width) of the per-tile statistics a row-layout linear with N outputs writes."""
    block_n = _linear_config(dtype, n).block_n
    return triton.cdiv(n, block_n), block_n


class _VideoInput(NamedTuple):
    """A video-layout GEMM input (images, K, P), GroupNorm-normalised per (video, group) as it is loaded."""

    mean: torch.Tensor  # (videos, groups) fp32
    rstd: torch.Tensor  # (videos, groups) fp32
    pixels: int  # P
    num_frames: int


def _linear_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor | None,
                    rstd: torch.Tensor | None, colsum: torch.Tensor | None, residual: torch.Tensor | None,
                    video_pixels: int = 0, partials: torch.Tensor | None = None,
                    video_in: _VideoInput | None = None) -> torch.Tensor:
    n = weight.shape[0]
    if video_in is not None:  # x (images, K, H, W): its token rows are (image, pixel) pairs
        k = x.shape[1]
        x2 = x
        rows = x.shape[0] * video_in.pixels
        x_shape = (rows, k)
    else:
        k = x.shape[-1]
        x2 = _rows(x, k, "x")
        rows = x2.shape[0]
        x_shape = x.shape
    r2 = None
    if residual is not None:
        r2 = residual if video_pixels else _rows(residual, n, "residual")
    y = torch.empty((rows // video_pixels, n, video_pixels) if video_pixels else (rows, n), dtype=x.dtype,
                    device=x.device)
    if y.numel():
        cfg = _linear_config(x.dtype, n)
        block_m = cfg.block_m
        for pixels in (video_pixels, video_in.pixels if video_in is not None else 0):
            block_m = min(block_m, _video_block_m(cfg, pixels)) if pixels else block_m
        grid = (triton.cdiv(rows, block_m) * triton.cdiv(n, cfg.block_n),)
        norm = mean is not None
        gn = video_in is not None
        _linear_kernel[grid](
            x2, weight, bias if bias is not None else weight, mean if norm else weight, rstd if norm else weight,
            colsum if norm else weight, r2 if r2 is not None else weight, y,
            partials if partials is not None else weight,
            video_in.mean if gn else weight, video_in.rstd if gn else weight,
            rows, n, k, 0 if gn else x2.stride(0), r2.stride(0) if r2 is not None and not video_pixels else 0,
            k // video_in.mean.shape[1] if gn else 1, video_in.num_frames * video_in.pixels if gn else 1,
            NORM=norm, HAS_BIAS=bias is not None, HAS_RES=r2 is not None, VIDEO_P=video_pixels,
            STATS_OUT=partials is not None, VIDEO_IN=video_in.pixels if gn else 0,
            EVEN_K=k % cfg.block_k == 0, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
            INTERPRETED=not x.is_cuda, BLOCK_M=block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
            GROUP_M=cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y if video_pixels else y.view(*x_shape[:-1], n)


# ----------------------------------------------------------------------------------------------- mode

TRANSFORMER_GEMMS = ("auto", "cublas", "fused")


def _mode_from_env() -> str:
    value = os.environ.get("PDENGINE_TRANSFORMER_GEMM", "auto")
    if value not in TRANSFORMER_GEMMS:
        raise ValueError(f"PDENGINE_TRANSFORMER_GEMM must be one of {TRANSFORMER_GEMMS}, got {value!r}")
    return value


_transformer_gemm = _mode_from_env()


def transformer_gemm_mode() -> str:
    """The setting for how the UNet's transformer blocks run their GEMMs at inference with the kernels on:
    "cublas" (cuBLAS projections, eager LayerNorms and residual adds, the `geglu` gate kernel), "fused"
    (LayerNorms folded into the projections, residual adds in the output projections' epilogues, the
    feed-forward's projection and gate in one kernel: `fused_linear`, `geglu.ff_geglu`) or "auto" (the
    default: what `pdengine tune` measured as faster on this GPU model, recorded in its launch table; cuBLAS
    without a record). `PDENGINE_TRANSFORMER_GEMM` sets it at import; `transformer_gemm(name)` for a block of
    code; `transformer_gemm_for(device)` resolves "auto". Training always runs the cuBLAS path (its backward
    needs the normalised inputs and the projections)."""
    return _transformer_gemm


def transformer_gemm_for(device: torch.device, level: str | None = None) -> str:
    """"cublas" or "fused" for the transformer `level` (`temporal_conv_table.gemm_level`:
    "spatial|temporal:<channels>:<inner>", which each transformer and its blocks carry) on `device`: the setting, with "auto" resolved from the
    device's launch table (`temporal_conv.table_for`: the GPU model's table, or `launch_table()`'s); "cublas"
    without a record. A record may choose per level ("per_level", with its "levels"; a level it does not
    list runs cuBLAS); asked without a level, that gives "per_level"."""
    if _transformer_gemm != "auto":
        return _transformer_gemm
    from .temporal_conv import table_for

    table = table_for(device)
    record = table.transformer_gemm if table is not None else None
    if not record:
        return "cublas"
    if record["choice"] == "per_level":
        return "per_level" if level is None else record.get("levels", {}).get(level, "cublas")
    return record["choice"]



@contextlib.contextmanager
def transformer_gemm(name: str) -> Iterator[None]:
    global _transformer_gemm
    if name not in TRANSFORMER_GEMMS:
        raise ValueError(f"transformer_gemm must be one of {TRANSFORMER_GEMMS}, got {name!r}")
    previous, _transformer_gemm = _transformer_gemm, name
    try:
        yield
    finally:
        _transformer_gemm = previous


# ----------------------------------------------------------------------------------------------- public


class FoldedNorm(NamedTuple):
    """A LayerNorm folded into the linear layer after it (see the module docstring)."""

    weight: torch.Tensor  # (N, K) W * gamma, in W's dtype
    bias: torch.Tensor  # (N,) fp32: b + W @ beta
    colsum: torch.Tensor  # (N,) fp32: the rounded W' summed over K
    eps: float


@torch.no_grad()
def fold_layer_norm(ln_weight: torch.Tensor | None, ln_bias: torch.Tensor | None, eps: float, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> FoldedNorm:
    """Fold `layer_norm(., (K,), ln_weight, ln_bias, eps)` into the linear layer (weight (N, K), bias (N,))
    that follows it, for `layer_norm_linear`."""
    n, k = weight.shape
    for name, t in (("ln_weight", ln_weight), ("ln_bias", ln_bias)):
        if t is not None and t.shape != (k,):
            raise ValueError(f"{name} must be ({k},) for a (N, {k}) weight, got {tuple(t.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"bias must be ({n},), got {tuple(bias.shape)}")
    w32 = weight.float()
    folded = (w32 * ln_weight.float()[None, :] if ln_weight is not None else w32).to(weight.dtype).contiguous()
    b = torch.zeros(n, dtype=torch.float32, device=weight.device)
    if bias is not None:
        b += bias.float()
    if ln_bias is not None:
        b += w32 @ ln_bias.float()
    return FoldedNorm(folded, b, folded.float().sum(dim=1), float(eps))


def _check_rows(x: torch.Tensor, name: str = "x") -> None:
    if x.dim() < 1 or not x.is_floating_point() or x.numel() and x.stride(-1) != 1:
        raise ValueError(f"{name} must be floating-point (..., K) rows with unit last-dim stride, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")


def _check_inference(*tensors: torch.Tensor | None) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("the fused linear kernels are for inference (no autograd): run the eager LayerNorm, "
                         "linear and residual add when gradients are needed")


class RowPartials(NamedTuple):
    """LayerNorm statistics of a `fused_linear` output's rows, per column tile (`stats_out=True`): each
    tile's mean and centred sum of squares, (rows, tiles, 2) fp32; `merge_row_stats` gives (mean, rstd)."""

    partials: torch.Tensor
    width: int  # N, the row length
    tile: int  # columns per tile (the last may hold fewer)


def merge_row_stats(p: RowPartials, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, rstd) per row, fp32 (rows,), from a linear's per-tile statistics: as `row_stats` of its output,
    reading 8 bytes per row and tile instead of the rows."""
    if p.partials.dim() != 3 or p.partials.shape[2] != 2 or p.partials.dtype != torch.float32:
        raise ValueError(f"partials must be (rows, tiles, 2) fp32, got {tuple(p.partials.shape)} {p.partials.dtype}")
    if p.partials.shape[1] != triton.cdiv(p.width, p.tile):
        raise ValueError(f"{p.partials.shape[1]} tiles do not cover width {p.width} in tiles of {p.tile}")
    if operator_path():
        return _merge_op(p.partials, p.width, p.tile, float(eps))
    return _merge_forward(p.partials, p.width, p.tile, float(eps))


def _merge_forward(partials: torch.Tensor, width: int, tile: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    rows, tiles = partials.shape[:2]
    mean = torch.empty(rows, dtype=torch.float32, device=partials.device)
    rstd = torch.empty_like(mean)
    if rows:
        block_r = 128
        _merge_stats_kernel[(triton.cdiv(rows, block_r),)](
            partials.contiguous(), mean, rstd, rows, width, tiles, tile, eps, BLOCK_R=block_r,
            TILES_P2=triton.next_power_of_2(tiles), num_warps=4)
    return mean, rstd


def row_stats(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm statistics of each row of x (..., K): mean and 1 / sqrt(biased variance + eps), fp32 (rows,)."""
    _check_rows(x)
    _check_inference(x)
    if operator_path():
        return _row_stats_op(x, float(eps))
    return _row_stats_forward(x, float(eps))


def fused_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 stats: tuple[torch.Tensor, torch.Tensor] | None = None, colsum: torch.Tensor | None = None,
                 residual: torch.Tensor | None = None, stats_out: bool = False):
    """y = [r * (x @ weight.T - mu * colsum)] + bias + residual, (..., K) -> (..., N) in x's dtype: with
    `stats` = (mu, r) of x's rows and the folded norm's `colsum` the bracket is the LayerNorm folded into the
    GEMM; without them it is x @ weight.T. fp32 accumulation and epilogue. With `stats_out` it returns
    (y, RowPartials): the next LayerNorm's statistics of y from the epilogue (`merge_row_stats`), so no pass
    over y is needed for them. No autograd."""
    _check_rows(x)
    k = x.shape[-1]
    if weight.dim() != 2 or weight.shape[1] != k or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous (N, K={k}) matrix, got {tuple(weight.shape)}")
    if weight.numel() >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} has 2**31 elements or more: the kernel indexes it with int32")
    n = weight.shape[0]
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating-point ({n},) vector, got {tuple(bias.shape)} {bias.dtype}")
    if weight.dtype != x.dtype or any(t is not None and t.device != x.device for t in (weight, bias, residual)):
        raise ValueError("x and weight must share dtype, and every tensor x's device")
    if (stats is None) != (colsum is None):
        raise ValueError("stats and colsum go together (a folded LayerNorm), or neither")
    mean = rstd = None
    if stats is not None:
        mean, rstd = stats
        rows = x.numel() // k if k else 0
        for name, t, size in (("mean", mean, rows), ("rstd", rstd, rows), ("colsum", colsum, n)):
            if t.shape != (size,) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != x.device:
                raise ValueError(f"{name} must be a contiguous fp32 ({size},) vector, got {tuple(t.shape)} {t.dtype}")
    if residual is not None:
        if residual.shape != (*x.shape[:-1], n) or residual.dtype != x.dtype:
            raise ValueError(f"residual must be {(*x.shape[:-1], n)} in {x.dtype}, got {tuple(residual.shape)} "
                             f"{residual.dtype}")
        _check_rows(residual, "residual")
    _check_inference(x, weight, bias, residual)
    if stats_out:
        tiles, tile = _stats_tiles(x.dtype, n)
        run = _linear_stats_op if operator_path() else _linear_stats
        y, partials = run(x, weight, bias, mean, rstd, colsum, residual)
        return y, RowPartials(partials, n, tile)
    if operator_path():
        return _linear_op(x, weight, bias, mean, rstd, colsum, residual)
    return _linear_forward(x, weight, bias, mean, rstd, colsum, residual)


def video_layout_ok(pixels: int, dtype: torch.dtype) -> bool:
    """Whether `linear_to_video_residual` takes images of `pixels` pixels: a multiple of 16 (its row tiles
    must not straddle two images)."""
    return pixels > 0 and _video_block_m(_linear_config(dtype, 128), pixels) > 0


def linear_to_video_residual(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                             x: torch.Tensor) -> torch.Tensor:
    """x + (t @ weight.T + bias) in x's (B*F, N, H, W) layout, for token rows t (B*F*H*W, K) in (image,
    pixel) order: a transformer's output projection and its way back to the video layout with the residual
    add, in one kernel (the projection's token rows are never stored). H*W must be a multiple of 16
    (`video_layout_ok`). No autograd."""
    if x.dim() != 4 or not x.is_floating_point() or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous floating-point (B*F, C, H, W) tensor, got {tuple(x.shape)}")
    bf, c, h, w = x.shape
    _check_rows(t, "t")
    if t.dim() != 2 or t.shape[0] != bf * h * w:
        raise ValueError(f"t must be ({bf * h * w}, K) token rows, got {tuple(t.shape)}")
    if weight.dim() != 2 or weight.shape != (c, t.shape[1]) or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous ({c}, {t.shape[1]}) matrix, got {tuple(weight.shape)}")
    if bias is not None and (bias.shape != (c,) or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating-point ({c},) vector, got {tuple(bias.shape)}")
    if t.dtype != x.dtype or weight.dtype != x.dtype or any(u is not None and u.device != x.device
                                                             for u in (t, weight, bias)):
        raise ValueError("t, weight and x must share dtype and device")
    if not video_layout_ok(h * w, x.dtype):
        raise ValueError(f"H*W = {h * w} pixels per image is not a multiple of 16")
    _check_inference(t, weight, bias, x)
    if operator_path():
        return _video_op(t, weight, bias, x)
    return _linear_video(t, weight, bias, x)


def layer_norm_linear(x: torch.Tensor, folded: FoldedNorm,
                      stats: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """linear(layer_norm(x)) for a `fold_layer_norm` result: `row_stats` (unless given, e.g. shared by
    several projections of the same rows) and one GEMM whose epilogue applies the norm."""
    if stats is None:
        stats = row_stats(x, folded.eps)
    return fused_linear(x, folded.weight, folded.bias, stats=stats, colsum=folded.colsum)


def _video_group_stats(x: torch.Tensor, num_frames: int, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    from .temporal_attention import _STATS_BLOCK, _frame_group_stats_kernel

    bf, c, h, w = x.shape
    b, n = bf // num_frames, (c // groups) * h * w
    mean_f = torch.empty((bf, groups), dtype=torch.float32, device=x.device)
    m2_f = torch.empty_like(mean_f)
    if not mean_f.numel():
        return mean_f.view(b, groups), m2_f.view(b, groups)
    _frame_group_stats_kernel[(bf * groups,)](x, mean_f, m2_f, n, BLOCK=_STATS_BLOCK, num_warps=4)
    # The F frames' partials of each video merged exactly (equal counts, Chan et al.): (B, G)-sized ops.
    mean_f, m2_f = mean_f.view(b, num_frames, groups), m2_f.view(b, num_frames, groups)
    mean = mean_f.mean(dim=1)
    m2 = m2_f.sum(dim=1) + n * (mean_f - mean[:, None]).square().sum(dim=1)
    return mean, torch.rsqrt(m2 / (num_frames * n) + eps)


def video_group_stats(x: torch.Tensor, num_frames: int, groups: int, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GroupNorm statistics of x (B*F, C, H, W) per video and group (over C/G x F x H x W): mean and
    1 / sqrt(biased variance + eps), fp32 (B, G). One read of x (per-frame partials, then an exact merge)."""
    if (x.dim() != 4 or not x.is_contiguous() or num_frames < 1 or x.shape[0] % num_frames or groups < 1
            or x.shape[1] % groups):
        raise ValueError(f"x must be a contiguous (B*F, C, H, W) tensor with F = {num_frames} dividing B*F and "
                         f"groups = {groups} dividing C, got {tuple(x.shape)}")
    _check_inference(x)
    if operator_path():
        return _group_stats_op(x, num_frames, groups, float(eps))
    return _video_group_stats(x, num_frames, groups, float(eps))


def group_norm_fold_ok(pixels: int, dtype: torch.dtype) -> bool:
    """Whether `group_norm_linear` takes images of `pixels` pixels: its row tiles must not straddle two images,
    and tiles under 64 rows (the 4x4 level's 16) would waste the GEMM: the layout kernel runs there instead."""
    cfg = _linear_config(dtype, 128)
    return pixels > 0 and _video_block_m(cfg, pixels) >= min(64, cfg.block_m)


def group_norm_linear(x: torch.Tensor, num_frames: int, stats: tuple[torch.Tensor, torch.Tensor],
                      folded: FoldedNorm, *, stats_out: bool = False):
    """linear(group_norm(x)) as token rows (B*F*H*W, N) in (b, f, p) order, from the video layout x (B*F, C, H,
    W): a transformer's GroupNorm, its way to token rows and its proj_in in one GEMM, which normalises x's
    tiles as it loads them with `stats` = `video_group_stats(x, ...)`; the norm's affine is folded into the
    weight and bias (`folded` = `fold_layer_norm(norm.weight, norm.bias, norm.eps, W, b)`, its colsum unused).
    The normalised tokens are never written. With `stats_out`, (y, RowPartials) as `fused_linear`'s. H*W must
    pass `group_norm_fold_ok`. No autograd."""
    if x.dim() != 4 or not x.is_floating_point() or not x.is_contiguous():
        raise ValueError(f"x must be a contiguous floating-point (B*F, C, H, W) tensor, got {tuple(x.shape)}")
    bf, c, h, w = x.shape
    if num_frames < 1 or bf % num_frames:
        raise ValueError(f"num_frames = {num_frames} must divide B*F = {bf}")
    weight, bias = folded.weight, folded.bias
    if weight.dim() != 2 or weight.shape[1] != c or not weight.is_contiguous() or weight.dtype != x.dtype:
        raise ValueError(f"the folded weight must be a contiguous (N, {c}) matrix in {x.dtype}, got "
                         f"{tuple(weight.shape)} {weight.dtype}")
    mean, rstd = stats
    b = bf // num_frames
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t.dim() != 2 or t.shape[0] != b or c % t.shape[1] or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous fp32 (B={b}, groups) statistics, got {tuple(t.shape)} "
                             f"{t.dtype}")
    if any(t.device != x.device for t in (weight, bias, mean, rstd)):
        raise ValueError("every tensor must be on x's device")
    if not group_norm_fold_ok(h * w, x.dtype):
        raise ValueError(f"H*W = {h * w} pixels per image: the fold needs a multiple of 64 (group_norm_fold_ok)")
    _check_inference(x, weight, bias)
    if stats_out:
        _, tile = _stats_tiles(x.dtype, weight.shape[0])
        run = _gn_linear_stats_op if operator_path() else _gn_linear_stats
        y, partials = run(x, num_frames, weight, bias, mean, rstd)
        return y, RowPartials(partials, weight.shape[0], tile)
    run = _gn_linear_op if operator_path() else _gn_linear
    return run(x, num_frames, weight, bias, mean, rstd)


def modeled_bytes(rows: int, k: int, n: int, dtype: torch.dtype = torch.bfloat16, *, norm: bool = False,
                  residual: bool = False) -> int:
    """Minimum HBM bytes of one fused linear (weights aside): x read once, y written once, the residual read
    once; with a folded norm also `row_stats`' read of x and the 8 bytes per row of statistics (written, then
    read by the GEMM)."""
    item = torch.empty((), dtype=dtype).element_size()
    total = rows * (k + n + (n if residual else 0)) * item
    if norm:
        total += rows * k * item + 2 * rows * 8
    return total


# ----------------------------------------------------------------------------------------------- operators

_row_stats_op = torch.library.custom_op("pdengine::row_stats", _row_stats_forward, mutates_args=())


@_row_stats_op.register_fake
def _(x, eps):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(rows, dtype=torch.float32), x.new_empty(rows, dtype=torch.float32)


def _linear_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor | None,
                 rstd: torch.Tensor | None, colsum: torch.Tensor | None,
                 residual: torch.Tensor | None) -> torch.Tensor:
    return _linear_forward(x, weight, bias, mean, rstd, colsum, residual)


def _linear_video(t: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    return _linear_forward(t, weight, bias, None, None, None, x, video_pixels=x.shape[2] * x.shape[3]).view(x.shape)


_linear_op = torch.library.custom_op("pdengine::fused_linear", _linear_rows, mutates_args=())


@_linear_op.register_fake
def _(x, weight, bias, mean, rstd, colsum, residual):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _linear_stats(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, mean: torch.Tensor | None,
                  rstd: torch.Tensor | None, colsum: torch.Tensor | None,
                  residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    tiles, _ = _stats_tiles(x.dtype, weight.shape[0])
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    partials = torch.empty((rows, tiles, 2), dtype=torch.float32, device=x.device)
    return _linear_forward(x, weight, bias, mean, rstd, colsum, residual, partials=partials), partials


_linear_stats_op = torch.library.custom_op("pdengine::fused_linear_stats", _linear_stats, mutates_args=())


@_linear_stats_op.register_fake
def _(x, weight, bias, mean, rstd, colsum, residual):
    tiles, _ = _stats_tiles(x.dtype, weight.shape[0])
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty((*x.shape[:-1], weight.shape[0])), x.new_empty((rows, tiles, 2), dtype=torch.float32)


_merge_op = torch.library.custom_op("pdengine::merge_row_stats", _merge_forward, mutates_args=())


@_merge_op.register_fake
def _(partials, width, tile, eps):
    rows = partials.shape[0]
    return partials.new_empty(rows), partials.new_empty(rows)


_video_op = torch.library.custom_op("pdengine::linear_to_video_residual", _linear_video, mutates_args=())


@_video_op.register_fake
def _(t, weight, bias, x):
    return torch.empty_like(x)


_group_stats_op = torch.library.custom_op("pdengine::video_group_stats", _video_group_stats, mutates_args=())


@_group_stats_op.register_fake
def _(x, num_frames, groups, eps):
    b = x.shape[0] // num_frames
    return x.new_empty((b, groups), dtype=torch.float32), x.new_empty((b, groups), dtype=torch.float32)


def _gn_input(x: torch.Tensor, num_frames: int, mean: torch.Tensor, rstd: torch.Tensor) -> _VideoInput:
    return _VideoInput(mean, rstd, x.shape[2] * x.shape[3], num_frames)


def _gn_linear(x: torch.Tensor, num_frames: int, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
               rstd: torch.Tensor) -> torch.Tensor:
    return _linear_forward(x, weight, bias, None, None, None, None, video_in=_gn_input(x, num_frames, mean, rstd))


def _gn_linear_stats(x: torch.Tensor, num_frames: int, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                     rstd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    tiles, _ = _stats_tiles(x.dtype, weight.shape[0])
    partials = torch.empty((x.shape[0] * x.shape[2] * x.shape[3], tiles, 2), dtype=torch.float32, device=x.device)
    y = _linear_forward(x, weight, bias, None, None, None, None, partials=partials,
                        video_in=_gn_input(x, num_frames, mean, rstd))
    return y, partials


_gn_linear_op = torch.library.custom_op("pdengine::group_norm_linear", _gn_linear, mutates_args=())
_gn_linear_stats_op = torch.library.custom_op("pdengine::group_norm_linear_stats", _gn_linear_stats, mutates_args=())


@_gn_linear_op.register_fake
def _(x, num_frames, weight, bias, mean, rstd):
    return x.new_empty((x.shape[0] * x.shape[2] * x.shape[3], weight.shape[0]))


@_gn_linear_stats_op.register_fake
def _(x, num_frames, weight, bias, mean, rstd):
    rows = x.shape[0] * x.shape[2] * x.shape[3]
    tiles, _ = _stats_tiles(x.dtype, weight.shape[0])
    return x.new_empty((rows, weight.shape[0])), x.new_empty((rows, tiles, 2), dtype=torch.float32)


# ----------------------------------------------------------------------------------------------- compile check



def compile_specs() -> list[CompileSpec]:
    """The launches at the `pixeldance` widths: row statistics for K = 320 (512-column steps) and 640 / 1280
    (1024); the linear in bf16 with a folded norm (q/k/v: N = 960, 64-column tiles; N = 1280, 128), with a
    residual and the next norm's statistics (output projections: N = 320 and 1280), back to the video layout
    (proj_out at the 32x32, 8x8 and 4x4 levels: 128-, 64- and 16-row tiles), all K multiples of 64 (EVEN_K);
    the fp32 path; and the statistics' merge."""
    specs = []
    for k in (320, 1280):
        block_r, block_k, num_warps = _stats_config(k)
        specs.append(CompileSpec(
            name=f"row_stats_bf16_k{block_k}", fn=jit_function(_row_stats_kernel),
            signature={"x_ptr": "*bf16", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "R": "i32", "K": "i32",
                       "stride_x": "i32", "eps": "fp32", "BLOCK_R": "constexpr", "BLOCK_K": "constexpr"},
            constexprs={"BLOCK_R": block_r, "BLOCK_K": block_k}, num_warps=num_warps, num_stages=1,
            divisible=("K", "stride_x"),
        ))
    specs.append(CompileSpec(
        name="merge_row_stats", fn=jit_function(_merge_stats_kernel),
        signature={"part_ptr": "*fp32", "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "R": "i32", "N": "i32",
                   "TILES": "i32", "TILE": "i32", "eps": "fp32", "BLOCK_R": "constexpr", "TILES_P2": "constexpr"},
        constexprs={"BLOCK_R": 128, "TILES_P2": 16}, num_warps=4, num_stages=1, divisible=("N", "TILE"),
    ))
    names = ("NORM", "HAS_BIAS", "HAS_RES", "VIDEO_P", "STATS_OUT", "VIDEO_IN", "EVEN_K", "PRECISION",
             "INTERPRETED", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M")
    # (name, dtype name, dtype, N, folded norm, residual, video pixels out, statistics out, video pixels in):
    # the GroupNorm-folded proj_in at the 32x32 (C 320, 128-row tiles) and 8x8 (C 1280, 64) levels.
    variants = (("norm", "bf16", torch.bfloat16, 960, True, False, 0, False, 0),
                ("norm", "bf16", torch.bfloat16, 1280, True, False, 0, False, 0),
                ("residual_stats", "bf16", torch.bfloat16, 320, False, True, 0, True, 0),
                ("residual_stats", "bf16", torch.bfloat16, 1280, False, True, 0, True, 0),
                ("residual", "bf16", torch.bfloat16, 1280, False, True, 0, False, 0),
                ("video1024", "bf16", torch.bfloat16, 320, False, True, 1024, False, 0),
                ("video64", "bf16", torch.bfloat16, 1280, False, True, 64, False, 0),
                ("video16", "bf16", torch.bfloat16, 1280, False, True, 16, False, 0),
                ("gn_in1024", "bf16", torch.bfloat16, 320, False, False, 0, True, 1024),
                ("gn_in64", "bf16", torch.bfloat16, 1280, False, False, 0, True, 64),
                ("norm_residual", "fp32", torch.float32, 320, True, True, 0, True, 0))
    for kind, dname, dtype, n, norm, res, video, stats, video_in in variants:
        cfg = _linear_config(dtype, n)
        pixels = video or video_in
        block_m = _video_block_m(cfg, pixels) if pixels else cfg.block_m
        ptr = f"*{dname}"
        divisible = ("N", "K", "stride_x", "stride_r") + (("M",) if pixels else ()) + (("ROWS_V",) if video_in else ())
        specs.append(CompileSpec(
            name=f"fused_linear_{kind}_{dname}_n{cfg.block_n}", fn=jit_function(_linear_kernel),
            signature={"x_ptr": ptr, "w_ptr": ptr, "b_ptr": "*fp32" if norm or video_in else ptr,
                       "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "cs_ptr": "*fp32", "r_ptr": ptr, "y_ptr": ptr,
                       "part_ptr": "*fp32", "gm_ptr": "*fp32", "gr_ptr": "*fp32", "M": "i32", "N": "i32",
                       "K": "i32", "stride_x": "i32", "stride_r": "i32", "CPG": "i32", "ROWS_V": "i32",
                       **{c: "constexpr" for c in names}},
            constexprs={"NORM": norm, "HAS_BIAS": True, "HAS_RES": res, "VIDEO_P": video, "STATS_OUT": stats,
                        "VIDEO_IN": video_in, "EVEN_K": True,
                        "PRECISION": "ieee" if dtype == torch.float32 else "tf32", "INTERPRETED": False,
                        "BLOCK_M": block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, expects_mma=dtype != torch.float32,
            divisible=divisible,
            # the video layout's rows (pixels of one image) load or store as 16-byte vectors
            max_narrow_global=0 if pixels else None,
        ))
    return specs
