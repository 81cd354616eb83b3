"""The transformer blocks' residual add and the LayerNorm after it in one pass, for inference.

In a pre-norm block the output projection of each attention is added to the residual stream x, and the next
sub-layer's LayerNorm reads that sum again: eagerly the add reads x and y and writes s, the LayerNorm reads
s and writes h: at least 3 reads and 2 writes of the token rows, in two launches. Here one program takes BLOCK_R whole rows (C <= 2048 channels: the row fits in registers), adds,
rounds the sum to its dtype (what the eager add stores and the eager LayerNorm reads), takes the mean and the
centred variance of the rounded row, normalises, applies the affine and stores both s and h: 2 reads and 2
writes. Used by `TransformerBlock` on the cuBLAS GEMM path with the kernels on, without gradients (twice per
block: after the first and the second attention); the fused GEMM mode (`fused_linear`) instead puts the add
in the output projection's epilogue and folds the LayerNorm into the next projection. Under torch.compile and
inside `pdengine.kernels.as_operators()` the entry point is an opaque operator (`pdengine::add_layer_norm`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec, jit_function
from .fused_linear import _rows
from .temporal_conv import _cast

__all__ = ["add_layer_norm", "modeled_bytes", "compile_specs"]


@triton.jit
def _add_ln_kernel(
    x_ptr, y_ptr,  # (R, C) rows, row strides stride_x / stride_y, unit column stride
    w_ptr, b_ptr,  # (C,) the LayerNorm's affine (HAS_WEIGHT / HAS_BIAS)
    s_ptr, h_ptr,  # (R, C) contiguous outputs: x + y and its LayerNorm
    R, C, stride_x, stride_y, eps,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= C: whole rows
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # axis 0: up to 2^31 programs
    cols = tl.arange(0, BLOCK_C)
    c_ok = cols < C
    mask = (rows < R)[:, None] & c_ok[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(x_ptr + r64 * stride_x + cols[None, :], mask=mask, other=0.0)
    y = tl.load(y_ptr + r64 * stride_y + cols[None, :], mask=mask, other=0.0)
    s = _cast(x.to(tl.float32) + y.to(tl.float32), s_ptr.dtype.element_ty, INTERPRETED)
    tl.store(s_ptr + r64 * C + cols[None, :], s, mask=mask)
    v = tl.where(mask, s.to(tl.float32), 0.0)
    mean = tl.sum(v, axis=1) / C
    d = tl.where(mask, v - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / C + eps)
    h = d * rstd[:, None]
    if HAS_WEIGHT:
        h = h * tl.load(w_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        h = h + tl.load(b_ptr + cols, mask=c_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(h_ptr + r64 * C + cols[None, :], _cast(h, h_ptr.dtype.element_ty, INTERPRETED), mask=mask)


_TILE = 4096  # elements per program: 16 per thread at 8 warps, 32 with 4


def _config(c: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_C, num_warps): whole rows, about 4K elements per program."""
    block_c = triton.next_power_of_2(c)
    return max(1, _TILE // block_c), block_c, 8 if block_c >= 1024 else 4


def _forward(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    c = x.shape[-1]
    x2, y2 = _rows(x, c, "x"), _rows(y, c, "y")
    s = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(s)
    r = x2.shape[0]
    if r:
        block_r, block_c, num_warps = _config(c)
        _add_ln_kernel[(triton.cdiv(r, block_r),)](
            x2, y2, weight if weight is not None else x2, bias if bias is not None else x2, s, h,
            r, c, x2.stride(0), y2.stride(0), eps, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
            INTERPRETED=not x.is_cuda, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=num_warps)
    return s, h


def add_layer_norm(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(s, layer_norm(s, weight, bias, eps)) with s = x + y over the last dim (at most 2048 channels), both in
    x's dtype, in one pass: fp32 math, the sum rounded to x's dtype before its statistics (as the eager add
    stores it). x and y: the same shape and dtype, rows collapsible without a copy (unit last-dim stride).
    Inference only: no autograd (the block's training path runs the eager ops)."""
    if x.shape != y.shape or x.dtype != y.dtype or x.device != y.device or not x.is_floating_point():
        raise ValueError(f"x and y must be floating-point tensors of one shape, dtype and device, got "
                         f"{tuple(x.shape)} {x.dtype} {x.device} and {tuple(y.shape)} {y.dtype} {y.device}")
    c = x.shape[-1]
    if not 1 <= c <= 2048:
        raise ValueError(f"add_layer_norm keeps whole rows in registers: 1..2048 channels, got {c}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.shape != (c,) or t.device != x.device):
            raise ValueError(f"{name} must be ({c},) on {x.device}, got {tuple(t.shape)} on {t.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, y, weight, bias)):
        raise RuntimeError("add_layer_norm is inference only (no autograd): call it under torch.no_grad()")
    if operator_path():
        s, h = _op(x, y, weight, bias, float(eps))
        return s, h
    return _forward(x, y, weight, bias, float(eps))


def modeled_bytes(rows: int, c: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Minimum HBM bytes: x and y read once, the sum and its LayerNorm written once (the affine negligible)."""
    return 4 * rows * c * torch.empty((), dtype=dtype).element_size()


def _op_impl(x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(x, y, weight, bias, eps)


_op = torch.library.custom_op("pdengine::add_layer_norm", _op_impl, mutates_args=())


@_op.register_fake
def _(x, y, weight, bias, eps):
    return torch.empty_like(x), torch.empty_like(x)


def compile_specs() -> list[CompileSpec]:
    """bf16 with the affine at the preset's transformer widths (320, 640, 1280: 512, 1024 and 2048-wide row
    tiles), and fp32 at 320. Rows and widths are multiples of 16 there, as the launcher sees them: everything,
    the affine too, moves as 16-byte vectors (no sub-word accesses)."""
    specs = []
    for dname, ptr, c in (("bf16", "*bf16", 320), ("bf16", "*bf16", 640), ("bf16", "*bf16", 1280),
                          ("fp32", "*fp32", 320)):
        block_r, block_c, num_warps = _config(c)
        specs.append(CompileSpec(
            name=f"add_layer_norm_{dname}_c{c}", fn=jit_function(_add_ln_kernel),
            signature={"x_ptr": ptr, "y_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "s_ptr": ptr, "h_ptr": ptr,
                       "R": "i32", "C": "i32", "stride_x": "i32", "stride_y": "i32", "eps": "fp32",
                       "HAS_WEIGHT": "constexpr", "HAS_BIAS": "constexpr", "INTERPRETED": "constexpr",
                       "BLOCK_R": "constexpr", "BLOCK_C": "constexpr"},
            constexprs={"HAS_WEIGHT": True, "HAS_BIAS": True, "INTERPRETED": False, "BLOCK_R": block_r,
                        "BLOCK_C": block_c},
            num_warps=num_warps, num_stages=1, divisible=("C", "stride_x", "stride_y"), max_narrow_global=0,
        ))
    return specs
