"""GEGLU activation of the transformers' feed-forward, forward and backward in one pass each.

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

Under torch.compile and inside `pdengine.kernels.as_operators()` the entry point is one opaque operator with
its backward registered (fake implementations give shapes on meta tensors).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec
from .geglu_ref import check_geglu_input

__all__ = ["geglu", "modeled_bytes", "compile_specs"]


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
    y = h * (0.5 * g * (1.0 + tl.erf(g * 0.7071067811865476)))
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


# ----------------------------------------------------------------------------------------------- launchers


def _block_config(inner: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_I, num_warps): tiles of 2048 elements per half, 256 columns wide (the feed-forward
    widths 1280 / 2560 / 5120 of the preset are multiples), 16 elements per thread of 4 warps."""
    block_i = min(256, triton.next_power_of_2(max(inner, 1)))
    return max(1, 2048 // block_i), block_i, 4


def _rows(t: torch.Tensor, width: int, name: str) -> torch.Tensor:
    """t (..., width) as (R, width) rows without copying; unit stride along the last dim required."""
    try:
        return t.view(-1, width)
    except RuntimeError:
        raise ValueError(f"{name}'s leading dims must collapse into rows without a copy, got shape {tuple(t.shape)} "
                         f"strides {t.stride()}") from None


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


# ----------------------------------------------------------------------------------------------- compile check


def _jit(fn):
    """The compilable JITFunction behind a kernel (under TRITON_INTERPRET=1 `@triton.jit` gives an
    InterpretedFunction, which `triton.compile` cannot take)."""
    return fn if isinstance(fn, triton.runtime.JITFunction) else triton.runtime.JITFunction(fn.fn)


def compile_specs() -> list[CompileSpec]:
    """Forward and backward in bf16 and fp32 (the tile does not depend on the preset's widths 1280 / 2560 /
    5120, all multiples of 256; the row count only sets the grid)."""
    block_r, block_i, num_warps = _block_config(1280)
    consts = {"BLOCK_R": block_r, "BLOCK_I": block_i}
    specs = []
    for dname, ptr in (("bf16", "*bf16"), ("fp32", "*fp32")):
        specs.append(CompileSpec(
            name=f"geglu_fwd_{dname}", fn=_jit(_geglu_fwd_kernel),
            signature={"p_ptr": ptr, "y_ptr": ptr, "R": "i32", "INNER": "i32", "stride_p": "i32", "stride_y": "i32",
                       "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"},
            constexprs=consts, num_warps=num_warps, num_stages=1, divisible=("INNER", "stride_p", "stride_y"),
        ))
        specs.append(CompileSpec(
            name=f"geglu_bwd_{dname}", fn=_jit(_geglu_bwd_kernel),
            signature={"dy_ptr": ptr, "p_ptr": ptr, "dp_ptr": ptr, "R": "i32", "INNER": "i32", "stride_dy": "i32",
                       "stride_p": "i32", "stride_dp": "i32", "BLOCK_R": "constexpr", "BLOCK_I": "constexpr"},
            constexprs=consts, num_warps=num_warps, num_stages=1,
            divisible=("INNER", "stride_dy", "stride_p", "stride_dp"),
        ))
    return specs
