"""GroupNorm + SiLU of the spatial ResNets (and the UNet's output norm) in one kernel, for inference, with the
timestep embedding's per-channel add folded in.

In the (N, C, H, W) layout the channels of one group of one image are one contiguous block of
C/G * H * W elements (10,240 at the `pixeldance` top level: 20 KB in bf16). One program per (image, group)
walks its block three times: the sum (mean), the centred sum of squares (variance: exact even when |mean| >>
std, like PyTorch's), then normalise, scale, shift, SiLU and store. The first pass brings the block from
HBM; the other two find it in L2 (at most a few thousand blocks are in flight at once: tens of MB, the H100's
/ H200's L2 is 50 / 60 MB). So HBM sees one read and one write of the activation, where eager PyTorch reads
it three times and writes it twice (GroupNorm's two passes, then the SiLU), and once more each for the
timestep add `h + temb[:, :, None, None]` before the second norm, which the kernel applies to each element
as it is loaded (`shift`, (N, C)). fp32 statistics and math, one rounding to x's dtype at the store.

Inference only (no autograd: training keeps the eager ops). Used by `ResnetBlock2D` and the UNet's output
norm with the kernels on (`backend="triton"`, or "auto" on CUDA) when no gradient is needed. Under
torch.compile and inside `pdengine.kernels.as_operators()` the entry point is an opaque operator
(`pdengine::group_norm_silu`) whose fake implementation gives the shape on meta tensors.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec
from .temporal_conv import _cast

__all__ = ["group_norm_silu", "modeled_bytes", "compile_specs"]


@triton.jit
def _load_block(x_ptr, shift_ptr, base, shift_base, offs, count, HW, HAS_SHIFT: tl.constexpr):
    """One stretch of a group's block as fp32, the timestep shift of each element's channel added; 0 past
    the block's end."""
    ok = offs < count
    v = tl.load(x_ptr + base + offs, mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        v += tl.load(shift_ptr + shift_base + offs // HW, mask=ok, other=0.0).to(tl.float32)
    return v, ok


@triton.jit
def _gn_silu_kernel(
    x_ptr,  # (N, C, H, W) contiguous
    shift_ptr,  # (N, C) contiguous: added per channel before the norm (HAS_SHIFT)
    w_ptr, b_ptr,  # (C,) the norm's affine (HAS_AFFINE)
    y_ptr,  # (N, C, H, W) contiguous
    C, HW, CPG, G, eps,
    HAS_SHIFT: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)  # image * G + group: up to 2^31 programs, no 65,535 cap
    n = pid // G
    g = pid % G
    count = CPG * HW
    base = n.to(tl.int64) * C * HW + (g * CPG).to(tl.int64) * HW
    shift_base = n.to(tl.int64) * C + g * CPG
    idx = tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        v, ok = _load_block(x_ptr, shift_ptr, base, shift_base, start + idx, count, HW, HAS_SHIFT)
        acc += v
    mean = tl.sum(acc, axis=0) / count
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, count, BLOCK):
        v, ok = _load_block(x_ptr, shift_ptr, base, shift_base, start + idx, count, HW, HAS_SHIFT)
        d = tl.where(ok, v - mean, 0.0)
        acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(acc, axis=0) / count + eps)
    for start in range(0, count, BLOCK):
        offs = start + idx
        v, ok = _load_block(x_ptr, shift_ptr, base, shift_base, offs, count, HW, HAS_SHIFT)
        y = (v - mean) * rstd
        if HAS_AFFINE:
            c = g * CPG + offs // HW
            y = y * tl.load(w_ptr + c, mask=ok, other=1.0).to(tl.float32) + \
                tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
        y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + base + offs, _cast(y, y_ptr.dtype.element_ty, INTERPRETED), mask=ok)


_BLOCK, _WARPS = 2048, 4  # 16 elements per thread: two 16-byte vectors in bf16


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
             shift: torch.Tensor | None) -> torch.Tensor:
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    if y.numel():
        affine = weight is not None
        _gn_silu_kernel[(n * groups,)](
            x, shift if shift is not None else x, weight if affine else x, bias if affine else x, y,
            c, h * w, c // groups, groups, eps, HAS_SHIFT=shift is not None, HAS_AFFINE=affine,
            INTERPRETED=not x.is_cuda, BLOCK=_BLOCK, num_warps=_WARPS)
    return y


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps)) for x (N, C, H, W) in one pass
    of HBM (statistics per image and group, fp32), in x's dtype. `shift` (N, C): e.g. the ResNet's projected
    timestep embedding. No autograd: with gradients required use the eager ops."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (N, C, H, W) tensor, got {tuple(x.shape)} {x.dtype}")
    n, c = x.shape[:2]
    if groups < 1 or c % groups:
        raise ValueError(f"groups must divide the {c} channels, got {groups}")
    if (weight is None) != (bias is None):
        raise ValueError("weight and bias go together (the norm's affine), or neither")
    for name, t, shape in (("weight", weight, (c,)), ("bias", bias, (c,)), ("shift", shift, (n, c))):
        if t is not None and (t.shape != shape or not t.is_floating_point() or t.device != x.device):
            raise ValueError(f"{name} must be a floating-point {shape} tensor on {x.device}, got {tuple(t.shape)} "
                             f"{t.dtype} on {t.device}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, shift)):
        raise ValueError("group_norm_silu is for inference (no autograd): use the eager GroupNorm and SiLU when "
                         "gradients are needed")
    x = x.contiguous()
    shift = shift.contiguous() if shift is not None else None
    if operator_path():
        return _op(x, weight, bias, groups, float(eps), shift)
    return _forward(x, weight, bias, groups, float(eps), shift)


def modeled_bytes(n: int, c: int, hw: int, dtype: torch.dtype = torch.bfloat16, shift: bool = False) -> int:
    """Minimum HBM bytes: the activation read once and written once (the statistics passes re-read each
    group's block from L2), the shift (N, C) read once; the affine is negligible."""
    item = torch.empty((), dtype=dtype).element_size()
    return 2 * n * c * hw * item + (n * c * item if shift else 0)


_op = torch.library.custom_op("pdengine::group_norm_silu", _forward, mutates_args=())


@_op.register_fake
def _(x, weight, bias, groups, eps, shift):
    return torch.empty_like(x)


def _jit(fn):
    """The compilable JITFunction behind a kernel (under TRITON_INTERPRET=1 `@triton.jit` gives an
    InterpretedFunction, which `triton.compile` cannot take)."""
    return fn if isinstance(fn, triton.runtime.JITFunction) else triton.runtime.JITFunction(fn.fn)


def compile_specs() -> list[CompileSpec]:
    """bf16 with the affine, with and without the timestep shift (the tile does not depend on the shape: one
    program per image and group, 2048-element steps through its block); fp32 with the shift."""
    specs = []
    for dname, ptr, has_shift in (("bf16", "*bf16", False), ("bf16", "*bf16", True), ("fp32", "*fp32", True)):
        specs.append(CompileSpec(
            name=f"group_norm_silu_{dname}{'_shift' if has_shift else ''}", fn=_jit(_gn_silu_kernel),
            signature={"x_ptr": ptr, "shift_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "C": "i32",
                       "HW": "i32", "CPG": "i32", "G": "i32", "eps": "fp32", "HAS_SHIFT": "constexpr",
                       "HAS_AFFINE": "constexpr", "INTERPRETED": "constexpr", "BLOCK": "constexpr"},
            constexprs={"HAS_SHIFT": has_shift, "HAS_AFFINE": True, "INTERPRETED": False, "BLOCK": _BLOCK},
            num_warps=_WARPS, num_stages=1, divisible=("C", "HW"),
        ))
    return specs
