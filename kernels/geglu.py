"""GEGLU activation of the transformers' feed-forward: forward and backward in one pass each, and for
inference fused with the projection GEMM.

The feed-forward's first projection writes p = [h | gate] (N, 2*I) (cuBLAS, bias in its epilogue); then
    y = h * gelu(gate)                      (exact erf GELU, fp32 math, stored in p's dtype)
reads p once and writes y once (`modeled_bytes`), where the eager chunk / gelu / mul reads 5*I and writes
2*I per row. The backward reads dy and p once and writes dp = [dy * gelu(gate) | dy * h * gelu'(gate)]
(gelu'(g) = Phi(g) + g * phi(g)); autograd keeps only p (the eager path also keeps gelu(gate): I per row
less saved activation per feed-forward in training).

Rows go on grid axis 0 (up to 2^31 programs: no 65,535 cap at large batches), column blocks on axis 1;
each program moves a BLOCK_R x BLOCK_I tile of both halves with 16-byte vectors along the row, row offsets
in int64 (N * 2I passes 2^31 elements at batch 32). p may be a row-strided view (unit stride along the
last dim); dy any strides.

For inference there is also `ff_geglu`, the projection and the gate in one kernel: each 128 x 64 output tile
multiplies x by the h and the gate rows of the weight (two fp32 accumulators, tensor cores for 16-bit
operands) and gates in the epilogue, so p never reaches memory (a forward pass then reads x and writes y
only, and no p-sized buffer is held). Whether it beats cuBLAS's projection + the gate kernel depends on how
close a Triton GEMM gets to cuBLAS at these shapes (K = 320..1280): opt-in with the transformers' other fused
GEMMs (`PDENGINE_TRANSFORMER_GEMM=fused`, `fused_linear.transformer_gemm("fused")`, which also folds the
LayerNorm before it into its weight) until `pdengine bench kernels --family geglu` has timed both on a GPU.

Under torch.compile and inside `pdengine.kernels.as_operators()` the entry points are opaque operators, the
gate's with its backward registered (fake implementations give shapes on meta tensors).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec, jit_function
from .fused_linear import _fold_norm, _rows, _tile_offsets
from .geglu_ref import check_geglu_input
from .temporal_conv import _cast, _dot

__all__ = ["geglu", "ff_geglu", "modeled_bytes", "compile_specs"]


@triton.jit
def _gelu(g):
    """Exact (erf) GELU of fp32 g."""
    return 0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476))


@triton.jit
def _tile_and_halves(p_ptr, R, INNER, stride_p, BLOCK_R: tl.constexpr, BLOCK_I: tl.constexpr):
    """This program's tile: int64 row offsets (BLOCK_R, 1), columns, mask, and the h and gate halves (fp32)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (rows < R)[:, None] & (cols < INNER)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    h_ptrs = p_ptr + rows64 * stride_p + cols[None, :]
    h = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(h_ptrs + INNER, mask=mask, other=0.0).to(tl.float32)
    return rows64, cols, mask, h, g


@triton.jit
def _geglu_fwd_kernel(
    p_ptr,  # (R, 2*INNER) [h | gate], row stride stride_p, unit column stride
    y_ptr,  # (R, INNER) output, row stride stride_y
    R, INNER, stride_p, stride_y,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows64, cols, mask, h, g = _tile_and_halves(p_ptr, R, INNER, stride_p, BLOCK_R, BLOCK_I)
    y = h * _gelu(g)
    tl.store(y_ptr + rows64 * stride_y + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _geglu_bwd_kernel(
    dy_ptr,  # (R, INNER) gradient of y, row stride stride_dy, unit column stride
    p_ptr,  # (R, 2*INNER) the forward's [h | gate]
    dp_ptr,  # (R, 2*INNER) output gradient [dh | dgate], row stride stride_dp
    R, INNER, stride_dy, stride_p, stride_dp,
    BLOCK_R: tl.constexpr,
    BLOCK_I: tl.constexpr,
):
    rows64, cols, mask, h, g = _tile_and_halves(p_ptr, R, INNER, stride_p, BLOCK_R, BLOCK_I)
    dy = tl.load(dy_ptr + rows64 * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    cdf = 0.5 * (1.0 + tl.erf(g * 0.7071067811865476))
    pdf = tl.exp(-0.5 * g * g) * 0.3989422804014327
    dh_ptrs = dp_ptr + rows64 * stride_dp + cols[None, :]
    tl.store(dh_ptrs, (dy * g * cdf).to(dp_ptr.dtype.element_ty), mask=mask)
    tl.store(dh_ptrs + INNER, (dy * h * (cdf + g * pdf)).to(dp_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ff_geglu_kernel(
    x_ptr,  # (M, K) input rows, row stride stride_x, unit column stride
    w_ptr,  # (2*INNER, K) the projection's weight [W_h; W_gate], contiguous
    b_ptr,  # (2*INNER,) its bias (HAS_BIAS), any float dtype
    mean_ptr, rstd_ptr,  # (M,) fp32 row statistics of x (NORM: a LayerNorm folded into the weight)
    cs_ptr,  # (2*INNER,) fp32 column sums of the folded weight (NORM)
    y_ptr,  # (M, INNER) output, contiguous
    M, K, INNER, stride_x,
    NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no masks along K
    PRECISION: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n = _tile_offsets(M, INNER, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < INNER
    a_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_x + offs_k[None, :]
    # B = W^T tiles (BLOCK_K, BLOCK_N), K contiguous: the h columns and, INNER rows further, the gate's.
    bh_ptrs = w_ptr + offs_n.to(tl.int64)[None, :] * K + offs_k[:, None]
    gate_offset = INNER * K  # the weight is small: (2 * INNER) * K elements fit int32
    acc_h = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_ok[:, None], other=0.0)
            bh = tl.load(bh_ptrs, mask=n_ok[None, :], other=0.0)
            bg = tl.load(bh_ptrs + gate_offset, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            bh = tl.load(bh_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            bg = tl.load(bh_ptrs + gate_offset, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_h = _dot(a, bh, acc_h, PRECISION, INTERPRETED)
        acc_g = _dot(a, bg, acc_g, PRECISION, INTERPRETED)
        a_ptrs += BLOCK_K
        bh_ptrs += BLOCK_K
    if NORM:  # a LayerNorm folded into the weight (fused_linear.py): both halves' column sums
        acc_h = _fold_norm(acc_h, mean_ptr, rstd_ptr, cs_ptr, offs_m, offs_n, m_ok, n_ok)
        acc_g = _fold_norm(acc_g, mean_ptr, rstd_ptr, cs_ptr + INNER, offs_m, offs_n, m_ok, n_ok)
    if HAS_BIAS:
        acc_h += tl.load(b_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.load(b_ptr + INNER + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = _cast(acc_h * _gelu(acc_g), y_ptr.dtype.element_ty, INTERPRETED)
    tl.store(y_ptr + offs_m.to(tl.int64)[:, None] * INNER + offs_n[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


# ----------------------------------------------------------------------------------------------- launchers


def _block_config(inner: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_I, num_warps): tiles of 2048 elements per half, 256 columns wide (the feed-forward
    widths 1280 / 2560 / 5120 of the preset are multiples), 16 elements per thread of 4 warps."""
    block_i = min(256, triton.next_power_of_2(max(inner, 1)))
    return max(1, 2048 // block_i), block_i, 4


def _forward(p: torch.Tensor) -> torch.Tensor:
    inner = p.shape[-1] // 2
    p2 = _rows(p, 2 * inner, "p")
    y = torch.empty((p2.shape[0], inner), dtype=p.dtype, device=p.device)
    if y.numel():
        block_r, block_i, num_warps = _block_config(inner)
        grid = (triton.cdiv(p2.shape[0], block_r), triton.cdiv(inner, block_i))
        _geglu_fwd_kernel[grid](p2, y, p2.shape[0], inner, p2.stride(0), y.stride(0), BLOCK_R=block_r,
                                BLOCK_I=block_i, num_warps=num_warps)
    return y.view(*p.shape[:-1], inner)


def _backward(dy: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    inner = p.shape[-1] // 2
    p2 = _rows(p, 2 * inner, "p")
    dy2 = dy.reshape(-1, inner)
    if dy2.numel() and dy2.stride(1) != 1:
        dy2 = dy2.contiguous()
    dp = torch.empty(p2.shape, dtype=p.dtype, device=p.device)
    if dp.numel():
        block_r, block_i, num_warps = _block_config(inner)
        grid = (triton.cdiv(p2.shape[0], block_r), triton.cdiv(inner, block_i))
        _geglu_bwd_kernel[grid](dy2, p2, dp, p2.shape[0], inner, dy2.stride(0), p2.stride(0), dp.stride(0),
                                BLOCK_R=block_r, BLOCK_I=block_i, num_warps=num_warps)
    return dp.view(p.shape)


class _FFConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def _ff_config(dtype: torch.dtype) -> _FFConfig:
    """16-bit operands: 128 x 64 output tiles with two fp32 accumulators (h and gate), K steps of 64, three
    stages (tensor cores; 110-128 registers, no spills on sm80/sm90). fp32 operands (exact products on FMA
    units, the accuracy path): 64 x 64 tiles, K steps of 16, two stages: 128 registers, no spills."""
    if dtype == torch.float32:
        return _FFConfig(64, 64, 16, 8, 8, 2)
    return _FFConfig(128, 64, 64, 8, 8, 3)


def _ff_geglu_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                      mean: torch.Tensor | None = None, rstd: torch.Tensor | None = None,
                      colsum: torch.Tensor | None = None) -> torch.Tensor:
    k = x.shape[-1]
    inner = weight.shape[0] // 2
    x2 = _rows(x, k, "x")
    y = torch.empty((x2.shape[0], inner), dtype=x.dtype, device=x.device)
    if y.numel():
        cfg = _ff_config(x.dtype)
        grid = (triton.cdiv(x2.shape[0], cfg.block_m) * triton.cdiv(inner, cfg.block_n),)
        norm = mean is not None
        _ff_geglu_kernel[grid](
            x2, weight, bias if bias is not None else weight, mean if norm else weight, rstd if norm else weight,
            colsum if norm else weight, y, x2.shape[0], k, inner, x2.stride(0),
            NORM=norm, HAS_BIAS=bias is not None, EVEN_K=k % cfg.block_k == 0,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", INTERPRETED=not x.is_cuda,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    return y.view(*x.shape[:-1], inner)


class _GEGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, p):
        ctx.save_for_backward(p)
        return _forward(p)

    @staticmethod
    def backward(ctx, dy):
        (p,) = ctx.saved_tensors
        return _backward(dy, p)


# ----------------------------------------------------------------------------------------------- public


def geglu(p: torch.Tensor) -> torch.Tensor:
    """h * gelu(gate) for the projection p = [h | gate] (..., 2*I) -> (..., I), exact (erf) GELU, fp32
    math, in p's dtype. p needs unit stride along its last dim and leading dims that collapse into rows
    (any contiguous tensor, or a row slice of one). Autograd-aware (one backward kernel; saves only p)."""
    check_geglu_input(p)
    if operator_path():
        return _geglu_op(p)
    return _GEGLU.apply(p)


def ff_geglu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
             stats: tuple[torch.Tensor, torch.Tensor] | None = None,
             colsum: torch.Tensor | None = None) -> torch.Tensor:
    """The feed-forward's first half in one kernel, for inference: GEGLU(x @ weight.T + bias) with
    [h | gate] = the projection, (..., K) -> (..., I) for a (2*I, K) weight. The projection never reaches
    memory: each output tile multiplies x by both halves' weight rows and gates in the epilogue (fp32
    accumulation; fp32 operands multiply exactly). With `stats` = (mean, rstd) of x's rows and `colsum` of a
    LayerNorm folded into the weight (`fused_linear.fold_layer_norm`) it computes GEGLU(linear(layer_norm(x)))
    without the norm's output. No autograd: with gradients required use `geglu(F.linear(x, weight, bias))`,
    whose backward needs the projection."""
    if x.dim() < 1 or not x.is_floating_point() or x.numel() and x.stride(-1) != 1:
        raise ValueError(f"x must be floating-point (..., K) rows with unit last-dim stride, got {tuple(x.shape)} "
                         f"{x.dtype} strides {x.stride()}")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1] or weight.shape[0] % 2 or not weight.is_contiguous():
        raise ValueError(f"weight must be a contiguous (2*I, K={x.shape[-1]}) projection, got {tuple(weight.shape)}")
    if weight.numel() >= 2**31:
        raise ValueError(f"weight {tuple(weight.shape)} has 2**31 elements or more: the kernel indexes it with int32")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    # A folded LayerNorm's bias is fp32 (b + W @ beta, see fused_linear.fold_layer_norm); otherwise x's dtype.
    if (weight.dtype != x.dtype or any(t.device != x.device for t in (weight, *([bias] if bias is not None else [])))
            or bias is not None and bias.dtype != x.dtype and stats is None):
        raise ValueError("x, weight and bias must share dtype and device")
    if (stats is None) != (colsum is None):
        raise ValueError("stats and colsum go together (a folded LayerNorm), or neither")
    mean = rstd = None
    if stats is not None:
        mean, rstd = stats
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        for name, t, size in (("mean", mean, rows), ("rstd", rstd, rows), ("colsum", colsum, weight.shape[0])):
            if t.shape != (size,) or t.dtype != torch.float32 or not t.is_contiguous() or t.device != x.device:
                raise ValueError(f"{name} must be a contiguous fp32 ({size},) vector, got {tuple(t.shape)} {t.dtype}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        raise ValueError("ff_geglu is for inference (no autograd): use geglu(F.linear(x, weight, bias)) "
                         "when gradients are needed")
    if operator_path():
        return _ff_geglu_op(x, weight, bias, mean, rstd, colsum)
    return _ff_geglu_forward(x, weight, bias, mean, rstd, colsum)


def modeled_bytes(rows: int, inner: int, dtype: torch.dtype = torch.bfloat16, *, backward: bool = False) -> int:
    """Minimum HBM bytes: the forward reads p (2*I per row) and writes y (I); the backward reads dy (I) and
    p (2*I) and writes dp (2*I)."""
    item = torch.empty((), dtype=dtype).element_size()
    return (5 if backward else 3) * rows * inner * item


# ----------------------------------------------------------------------------------------------- operators

_geglu_op = torch.library.custom_op("pdengine::geglu", _forward, mutates_args=())


@_geglu_op.register_fake
def _(p):
    return p.new_empty((*p.shape[:-1], p.shape[-1] // 2))


_geglu_backward_op = torch.library.custom_op("pdengine::geglu_backward", _backward, mutates_args=())


@_geglu_backward_op.register_fake
def _(dy, p):
    return torch.empty_like(p)


def _geglu_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _geglu_grad(ctx, dy):
    (p,) = ctx.saved_tensors
    return _geglu_backward_op(dy, p)


_geglu_op.register_autograd(_geglu_grad, setup_context=_geglu_setup)


_ff_geglu_op = torch.library.custom_op("pdengine::ff_geglu", _ff_geglu_forward, mutates_args=())


@_ff_geglu_op.register_fake
def _(x, weight, bias, mean=None, rstd=None, colsum=None):
    return x.new_empty((*x.shape[:-1], weight.shape[0] // 2))


# ----------------------------------------------------------------------------------------------- compile check



def compile_specs() -> list[CompileSpec]:
    """The gate's forward and backward in bf16 and fp32 (the tile does not depend on the preset's widths 1280 /
    2560 / 5120, all multiples of 256; the row count only sets the grid), and the fused projection + gate
    (K = 320 / 640 / 1280, all multiples of its K step: EVEN_K) in bf16 (tensor cores; also with a folded
    LayerNorm) and fp32."""
    block_r, block_i, num_warps = _block_config(1280)
    consts = {"BLOCK_R": block_r, "BLOCK_I": block_i}
    specs = []
    for dname, ptr in (("bf16", "*bf16"), ("fp32", "*fp32")):
        specs.append(CompileSpec(
            name=f"geglu_fwd_{dname}", fn=jit_function(_geglu_fwd_kernel),
            signature={"p_ptr": ptr, "y_ptr": ptr, "R": "i32", "INNER": "i32", "stride_p": "i32", "stride_y": "i32",
                       "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"},
            constexprs=consts, num_warps=num_warps, num_stages=1, divisible=("INNER", "stride_p", "stride_y"),
        ))
        specs.append(CompileSpec(
            name=f"geglu_bwd_{dname}", fn=jit_function(_geglu_bwd_kernel),
            signature={"dy_ptr": ptr, "p_ptr": ptr, "dp_ptr": ptr, "R": "i32", "INNER": "i32", "stride_dy": "i32",
                       "stride_p": "i32", "stride_dp": "i32", "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"},
            constexprs=consts, num_warps=num_warps, num_stages=1,
            divisible=("INNER", "stride_dy", "stride_p", "stride_dp"),
        ))
    for dname, ptr, dtype, norm in (("bf16", "*bf16", torch.bfloat16, False), ("bf16", "*bf16", torch.bfloat16, True),
                                    ("fp32", "*fp32", torch.float32, False)):
        cfg = _ff_config(dtype)
        specs.append(CompileSpec(
            name=f"ff_geglu_{'norm_' if norm else ''}{dname}", fn=jit_function(_ff_geglu_kernel),
            signature={"x_ptr": ptr, "w_ptr": ptr, "b_ptr": "*fp32" if norm else ptr, "mean_ptr": "*fp32",
                       "rstd_ptr": "*fp32", "cs_ptr": "*fp32", "y_ptr": ptr, "M": "i32", "K": "i32", "INNER": "i32",
                       "stride_x": "i32", **{n: "constexpr" for n in ("NORM", "HAS_BIAS", "EVEN_K", "PRECISION",
                                                                     "INTERPRETED", "BLOCK_M", "BLOCK_N", "BLOCK_K",
                                                                     "GROUP_M")}},
            constexprs={"NORM": norm, "HAS_BIAS": True, "EVEN_K": True, "PRECISION": "ieee" if dtype == torch.float32 else "tf32",
                        "INTERPRETED": False, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k,
                        "GROUP_M": cfg.group_m},
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, expects_mma=dtype != torch.float32,
            divisible=("K", "INNER", "stride_x"),
        ))
    return specs
