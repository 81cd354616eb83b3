"""GroupNorm + SiLU of the spatial ResNets (and the UNet's output norm) in one kernel each way, with the
timestep embedding's per-channel add folded in.

In the (N, C, H, W) layout the channels of one group of one image are one contiguous block of
C/G * H * W elements (10,240 at the `pixeldance` top level: 20 KB in bf16). One program per (image, group)
walks its block three times: the sum (mean), the centred sum of squares (variance: exact even when |mean| >>
std, like PyTorch's), then normalise, scale, shift, SiLU and store. The first pass brings the block from
HBM; the other two find it in L2 (at most a few thousand blocks are in flight at once: tens of MB, the H100's
/ H200's L2 is 50 / 60 MB). So HBM sees one read and one write of the activation, where eager PyTorch reads
it three times and writes it twice (GroupNorm's two passes, then the SiLU), and once more each for the
timestep add `h + temb[:, :, None, None]` before the second norm, which the kernel applies to each element
as it is loaded (`shift`, (N, C)). fp32 statistics and math, one rounding to x's dtype at the store. The
block is walked in (channels x pixels) tiles, so the per-channel values (shift, affine) are loaded once per
tile row and the pixels move as 16-byte vectors (the compile check bounds the sub-word accesses: a first
version indexed the block flat and gathered the channel values per element, 80 two-byte loads in its SASS).

For training the forward also keeps each group's mean and rstd, and autograd saves only the input (and the
shift): the eager ops also keep the GroupNorm's output for the SiLU (and, with the timestep add, its sum). The
backward is one kernel too (one program per image and group, two passes: the group's gradient sums, then
the input's gradient), giving the affine's gradients per image (summed over images after) and the shift's.
Used by `ResnetBlock2D` and the UNet's output norm with the kernels on (`backend="triton"`, or "auto" on
CUDA). Under torch.compile and inside `pdengine.kernels.as_operators()` the entry point is an opaque operator
(`pdengine::group_norm_silu`; for training `group_norm_silu_train` with its backward registered) whose fake
implementation gives the shapes on meta tensors.
"""

from __future__ import annotations

from typing import List

import torch
import triton
import triton.language as tl

from . import operator_path
from .compile_check import CompileSpec, jit_function
from .temporal_conv import _cast

__all__ = ["group_norm_silu", "modeled_bytes", "compile_specs"]


@triton.jit
def _load_tile(x_ptr, shift_ptr, base, shift_base, cs, c_ok, pixels, HW, HAS_SHIFT: tl.constexpr):
    """One (channels x pixels) tile of a group's block as fp32, each channel's timestep shift added (one
    load per channel, broadcast along the pixels); 0 outside the block."""
    ok = c_ok[:, None] & (pixels < HW)[None, :]
    v = tl.load(x_ptr + base + cs[:, None] * HW + pixels[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + shift_base + cs, mask=c_ok, other=0.0).to(tl.float32)
        v = tl.where(ok, v + sh[:, None], 0.0)
    return v, ok


@triton.jit
def _gn_silu_kernel(
    x_ptr,  # (N, C, H, W) contiguous
    shift_ptr,  # (N, C) contiguous: added per channel before the norm (HAS_SHIFT)
    w_ptr, b_ptr,  # (C,) the norm's affine (HAS_AFFINE)
    y_ptr,  # (N, C, H, W) contiguous
    mean_ptr, rstd_ptr,  # (N * G,) fp32 statistics, kept for the backward (SAVE_STATS)
    C, HW, CPG, G, eps,
    HAS_SHIFT: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    SAVE_STATS: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_C: tl.constexpr,  # channels of the group per tile (`_fwd_blocks`)
    BLOCK_HW: tl.constexpr,  # pixels per tile
):
    """One program per (image, group), three passes over its block in (channels x pixels) tiles: the
    per-channel values (shift, affine) are loaded once per tile row and broadcast along the pixels, which
    stay contiguous (16-byte vector accesses); no per-element channel arithmetic."""
    pid = tl.program_id(0)  # image * G + group: up to 2^31 programs, no 65,535 cap
    n = pid // G
    g = pid % G
    count = CPG * HW
    base = n.to(tl.int64) * C * HW + (g * CPG).to(tl.int64) * HW
    shift_base = n.to(tl.int64) * C + g * CPG
    rows = tl.arange(0, BLOCK_C)
    hw = tl.arange(0, BLOCK_HW)
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            v, ok = _load_tile(x_ptr, shift_ptr, base, shift_base, c0 + rows, c0 + rows < CPG, h0 + hw, HW,
                               HAS_SHIFT)
            acc += v
    mean = tl.sum(tl.sum(acc, axis=1), axis=0) / count
    acc = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for c0 in range(0, CPG, BLOCK_C):
        for h0 in range(0, HW, BLOCK_HW):
            v, ok = _load_tile(x_ptr, shift_ptr, base, shift_base, c0 + rows, c0 + rows < CPG, h0 + hw, HW,
                               HAS_SHIFT)
            d = tl.where(ok, v - mean, 0.0)
            acc += d * d
    rstd = 1.0 / tl.sqrt(tl.sum(tl.sum(acc, axis=1), axis=0) / count + eps)
    if SAVE_STATS:
        tl.store(mean_ptr + pid, mean)
        tl.store(rstd_ptr + pid, rstd)
    for c0 in range(0, CPG, BLOCK_C):
        cs = c0 + rows
        c_ok = cs < CPG
        # y = (v - mean) * (rstd * gamma) + beta, the per-channel factors once per tile row (centred first:
        # no cancellation when |mean| >> std)
        scale = tl.where(c_ok, rstd, 0.0)
        beta = tl.zeros((BLOCK_C,), dtype=tl.float32)
        if HAS_AFFINE:
            scale = scale * tl.load(w_ptr + g * CPG + cs, mask=c_ok, other=0.0).to(tl.float32)
            beta = tl.load(b_ptr + g * CPG + cs, mask=c_ok, other=0.0).to(tl.float32)
        for h0 in range(0, HW, BLOCK_HW):
            v, ok = _load_tile(x_ptr, shift_ptr, base, shift_base, cs, c_ok, h0 + hw, HW, HAS_SHIFT)
            y = (v - mean) * scale[:, None] + beta[:, None]
            y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + base + cs[:, None] * HW + (h0 + hw)[None, :], _cast(y, y_ptr.dtype.element_ty,
                     INTERPRETED), mask=ok)


@triton.jit
def _bwd_tile(dy_ptr, x_ptr, base, cs, c_ok, pixels, HW, sh, gamma, beta, mean, rstd):
    """One (channels x pixels) tile of the backward: offsets, mask, the normalised input and the gradient at
    the affine's output (dz = dy * silu'(z)), recomputed from x; 0 outside the mask."""
    mask = c_ok[:, None] & (pixels < HW)[None, :]
    offs = base + cs[:, None] * HW + pixels[None, :]
    xhat = (tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) + sh[:, None] - mean) * rstd
    z = xhat * gamma[:, None] + beta[:, None]
    sig = 1.0 / (1.0 + tl.exp(-z))
    dz = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32) * sig * (1.0 + z * (1.0 - sig))
    return offs, mask, xhat, tl.where(mask, dz, 0.0)


@triton.jit
def _gn_silu_bwd_kernel(
    dy_ptr, x_ptr,  # (N, C, H, W) contiguous: the output's gradient, the forward's input
    shift_ptr,  # (N, C) (HAS_SHIFT)
    w_ptr, b_ptr,  # (C,) (HAS_AFFINE)
    mean_ptr, rstd_ptr,  # (N * G,) fp32 from the forward
    dx_ptr,  # (N, C, H, W) contiguous
    dw_ptr, db_ptr,  # (N, C) fp32: this image's share of the affine's gradients (HAS_AFFINE)
    dshift_ptr,  # (N, C) fp32: the shift's gradient (HAS_SHIFT)
    C, HW, CPG, G,
    HAS_SHIFT: tl.constexpr,
    HAS_AFFINE: tl.constexpr,
    INTERPRETED: tl.constexpr,
    BLOCK_C: tl.constexpr,  # >= CPG: the group's channels in one tile dimension
    BLOCK_HW: tl.constexpr,
):
    """One program per (image, group), two passes over its block (channels x pixels tiles). With v = x + shift,
    xhat = (v - mean) * rstd, z = gamma * xhat + beta, y = z * sigmoid(z):
        dz = dy * s * (1 + z * (1 - s)),  s = sigmoid(z)
        dgamma_c += sum dz * xhat,  dbeta_c += sum dz            (per channel, this image's share)
        dv = rstd * (gamma * dz - mean_g(gamma * dz) - xhat * mean_g(gamma * dz * xhat))
        dshift_c = sum over pixels of dv
    The group means come from the first pass's per-channel sums, weighted by gamma."""
    pid = tl.program_id(0)
    n = pid // G
    g = pid % G
    base = n.to(tl.int64) * C * HW + (g * CPG).to(tl.int64) * HW
    cs = tl.arange(0, BLOCK_C)
    c_ok = cs < CPG
    ch = g * CPG + cs
    if HAS_AFFINE:
        gamma = tl.load(w_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
        beta = tl.load(b_ptr + ch, mask=c_ok, other=0.0).to(tl.float32)
    else:
        gamma = tl.where(c_ok, 1.0, 0.0)
        beta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    if HAS_SHIFT:
        sh = tl.load(shift_ptr + n.to(tl.int64) * C + ch, mask=c_ok, other=0.0).to(tl.float32)
    else:
        sh = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.load(mean_ptr + pid)
    rstd = tl.load(rstd_ptr + pid)
    hw = tl.arange(0, BLOCK_HW)
    acc_a = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)  # dz * xhat
    acc_b = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)  # dz
    for h0 in range(0, HW, BLOCK_HW):
        offs, mask, xhat, dz = _bwd_tile(dy_ptr, x_ptr, base, cs, c_ok, h0 + hw, HW, sh, gamma, beta, mean, rstd)
        acc_a += dz * xhat
        acc_b += dz
    sum_a = tl.sum(acc_a, axis=1)
    sum_b = tl.sum(acc_b, axis=1)
    if HAS_AFFINE:
        tl.store(dw_ptr + n.to(tl.int64) * C + ch, sum_a, mask=c_ok)
        tl.store(db_ptr + n.to(tl.int64) * C + ch, sum_b, mask=c_ok)
    count = CPG * HW
    m1 = tl.sum(gamma * sum_b, axis=0) / count
    m2 = tl.sum(gamma * sum_a, axis=0) / count
    acc_s = tl.zeros((BLOCK_C, BLOCK_HW), dtype=tl.float32)
    for h0 in range(0, HW, BLOCK_HW):
        offs, mask, xhat, dz = _bwd_tile(dy_ptr, x_ptr, base, cs, c_ok, h0 + hw, HW, sh, gamma, beta, mean, rstd)
        dv = tl.where(mask, rstd * (gamma[:, None] * dz - m1 - xhat * m2), 0.0)
        tl.store(dx_ptr + offs, _cast(dv, dx_ptr.dtype.element_ty, INTERPRETED), mask=mask)
        acc_s += dv
    if HAS_SHIFT:
        tl.store(dshift_ptr + n.to(tl.int64) * C + ch, tl.sum(acc_s, axis=1), mask=c_ok)


_TILE, _WARPS = 2048, 4  # elements per tile: 16 per thread, two 16-byte vectors in bf16


def _fwd_blocks(cpg: int, hw: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of the forward: up to 1024 pixels of a channel per tile row and as many of the group's
    channels as fill a 2048-element tile (10 / 20 / 40 channels per group at 32x32 / 16x16 / 8x8 in the
    `pixeldance` preset: 2 x 1024, 8 x 256, 32 x 64 tiles; 64 x 16 at 4x4)."""
    block_hw = min(triton.next_power_of_2(hw), 1024)
    return min(triton.next_power_of_2(cpg), max(1, _TILE // block_hw)), block_hw


def _bwd_blocks(cpg: int, hw: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_HW) of the backward: all of a group's channels, 2048-element tiles."""
    block_c = triton.next_power_of_2(cpg)
    return block_c, max(1, min(triton.next_power_of_2(hw), _TILE // block_c))


def _forward_stats(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                   eps: float, shift: torch.Tensor | None, save_stats: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(n * groups if save_stats else 0, dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    if y.numel():
        affine = weight is not None
        block_c, block_hw = _fwd_blocks(c // groups, h * w)
        _gn_silu_kernel[(n * groups,)](
            x, shift if shift is not None else x, weight if affine else x, bias if affine else x, y,
            mean if save_stats else y, rstd if save_stats else y,
            c, h * w, c // groups, groups, eps, HAS_SHIFT=shift is not None, HAS_AFFINE=affine,
            SAVE_STATS=save_stats, INTERPRETED=not x.is_cuda, BLOCK_C=block_c, BLOCK_HW=block_hw,
            num_warps=_WARPS)
    return y, mean, rstd


def _forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
             shift: torch.Tensor | None) -> torch.Tensor:
    return _forward_stats(x, weight, bias, groups, eps, shift, save_stats=False)[0]


def _backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
              shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
              groups: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    n, c, h, w = x.shape
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    affine = weight is not None
    dw = torch.zeros((n, c) if affine else (0,), dtype=torch.float32, device=x.device)
    db = torch.zeros_like(dw)
    dshift = torch.zeros((n, c) if shift is not None else (0,), dtype=torch.float32, device=x.device)
    if x.numel():
        block_c, block_hw = _bwd_blocks(c // groups, h * w)
        _gn_silu_bwd_kernel[(n * groups,)](
            dy, x, shift if shift is not None else x, weight if affine else x, bias if affine else x, mean, rstd,
            dx, dw if affine else dx, db if affine else dx, dshift if shift is not None else dx,
            c, h * w, c // groups, groups, HAS_SHIFT=shift is not None, HAS_AFFINE=affine,
            INTERPRETED=not x.is_cuda, BLOCK_C=block_c, BLOCK_HW=block_hw, num_warps=_WARPS)
    return (dx, dw.sum(0).to(weight.dtype) if affine else None, db.sum(0).to(bias.dtype) if affine else None,
            dshift.to(shift.dtype) if shift is not None else None)


class _GroupNormSiLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, shift, groups, eps):
        y, mean, rstd = _forward_stats(x, weight, bias, groups, eps, shift)
        ctx.save_for_backward(x, weight, bias, shift, mean, rstd)
        ctx.groups = groups
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias, shift, mean, rstd = ctx.saved_tensors
        dx, dw, db, dshift = _backward(dy, x, weight, bias, shift, mean, rstd, ctx.groups)
        return dx, dw, db, dshift, None, None


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(group_norm(x + shift[:, :, None, None], groups, weight, bias, eps)) for x (N, C, H, W) in one pass
    of HBM (statistics per image and group, fp32), in x's dtype. `shift` (N, C): e.g. the ResNet's projected
    timestep embedding. Autograd-aware (one backward kernel; saves only x, the shift and the statistics)."""
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
    x = x.contiguous()
    shift = shift.contiguous() if shift is not None else None
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, shift))
    if operator_path():
        if grad:
            return _train_op(x, weight, bias, groups, float(eps), shift)[0]
        return _op(x, weight, bias, groups, float(eps), shift)
    if grad:
        return _GroupNormSiLU.apply(x, weight, bias, shift, groups, float(eps))
    return _forward(x, weight, bias, groups, float(eps), shift)


def modeled_bytes(n: int, c: int, hw: int, dtype: torch.dtype = torch.bfloat16, shift: bool = False, *,
                  backward: bool = False) -> int:
    """Minimum HBM bytes: the activation read once and written once (the statistics passes re-read each
    group's block from L2), the shift (N, C) read once; the affine is negligible. The backward reads dy and x
    once (its second pass from L2) and writes dx, plus the fp32 per-image gradients of the affine and shift."""
    item = torch.empty((), dtype=dtype).element_size()
    if backward:
        return 3 * n * c * hw * item + (3 if shift else 2) * n * c * 4
    return 2 * n * c * hw * item + (n * c * item if shift else 0)


_op = torch.library.custom_op("pdengine::group_norm_silu", _forward, mutates_args=())


@_op.register_fake
def _(x, weight, bias, groups, eps, shift):
    return torch.empty_like(x)


def _train_forward(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
                   shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _forward_stats(x, weight, bias, groups, eps, shift)


_train_op = torch.library.custom_op("pdengine::group_norm_silu_train", _train_forward, mutates_args=())


@_train_op.register_fake
def _(x, weight, bias, groups, eps, shift):
    stats = x.new_empty(x.shape[0] * groups, dtype=torch.float32)
    return torch.empty_like(x), stats, torch.empty_like(stats)


def _backward_op_impl(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                      shift: torch.Tensor | None, mean: torch.Tensor, rstd: torch.Tensor,
                      groups: int) -> List[torch.Tensor]:
    dx, dw, db, dshift = _backward(dy, x, weight, bias, shift, mean, rstd, groups)
    empty = x.new_empty(0)
    return [dx, dw if dw is not None else empty, db if db is not None else empty,
            dshift if dshift is not None else empty]


_backward_op = torch.library.custom_op("pdengine::group_norm_silu_backward", _backward_op_impl, mutates_args=())


@_backward_op.register_fake
def _(dy, x, weight, bias, shift, mean, rstd, groups):
    return [torch.empty_like(x), weight.new_empty(weight.shape) if weight is not None else x.new_empty(0),
            bias.new_empty(bias.shape) if bias is not None else x.new_empty(0),
            shift.new_empty(shift.shape) if shift is not None else x.new_empty(0)]


def _train_setup(ctx, inputs, output):
    x, weight, bias, groups, _, shift = inputs
    ctx.save_for_backward(x, weight, bias, shift, output[1], output[2])
    ctx.groups = groups


def _train_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dshift = _backward_op(dy, x, weight, bias, shift, mean, rstd, ctx.groups)
    return (dx, dw if weight is not None else None, db if bias is not None else None, None, None,
            dshift if shift is not None else None)


_train_op.register_autograd(_train_grad, setup_context=_train_setup)



def compile_specs() -> list[CompileSpec]:
    """The forward in bf16 with the affine and the timestep shift at each level of the `pixeldance` preset (10,
    20 and 40 channels per group over 32x32 ... 4x4 pixels: the tiles differ), and at the top level without the
    shift, for training (statistics kept) and in fp32. The backward in bf16 with the shift for the preset's 10,
    20 and 40 channels per group (C = 320 / 640 / 1280 in 32 groups: 16 x 128, 32 x 64 and 64 x 32 tiles)."""
    specs = []
    forward = [("bf16", "*bf16", True, False, cpg, hw) for cpg, hw in ((10, 1024), (20, 256), (40, 64), (40, 16))]
    forward += [("bf16", "*bf16", False, False, 10, 1024), ("bf16", "*bf16", True, True, 10, 1024),
                ("fp32", "*fp32", True, False, 10, 1024)]
    for dname, ptr, has_shift, save, cpg, hw in forward:
        block_c, block_hw = _fwd_blocks(cpg, hw)
        specs.append(CompileSpec(
            name=f"group_norm_silu_{dname}{'_shift' if has_shift else ''}{'_train' if save else ''}_c{cpg}_hw{hw}",
            fn=jit_function(_gn_silu_kernel),
            signature={"x_ptr": ptr, "shift_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "mean_ptr": "*fp32",
                       "rstd_ptr": "*fp32", "C": "i32", "HW": "i32", "CPG": "i32", "G": "i32", "eps": "fp32",
                       "HAS_SHIFT": "constexpr", "HAS_AFFINE": "constexpr", "SAVE_STATS": "constexpr",
                       "INTERPRETED": "constexpr", "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr"},
            constexprs={"HAS_SHIFT": has_shift, "HAS_AFFINE": True, "SAVE_STATS": save, "INTERPRETED": False,
                        "BLOCK_C": block_c, "BLOCK_HW": block_hw},
            num_warps=_WARPS, num_stages=1, divisible=("C", "HW"),
            max_narrow_global=16,  # the per-channel shift and affine; the activation moves as 16-byte vectors
        ))
    for cpg, hw in ((10, 1024), (20, 256), (40, 64)):
        block_c, block_hw = _bwd_blocks(cpg, hw)
        specs.append(CompileSpec(
            name=f"group_norm_silu_bwd_bf16_c{block_c}", fn=jit_function(_gn_silu_bwd_kernel),
            signature={"dy_ptr": "*bf16", "x_ptr": "*bf16", "shift_ptr": "*bf16", "w_ptr": "*bf16", "b_ptr": "*bf16",
                       "mean_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": "*bf16", "dw_ptr": "*fp32",
                       "db_ptr": "*fp32", "dshift_ptr": "*fp32", "C": "i32", "HW": "i32", "CPG": "i32", "G": "i32",
                       "HAS_SHIFT": "constexpr", "HAS_AFFINE": "constexpr", "INTERPRETED": "constexpr",
                       "BLOCK_C": "constexpr", "BLOCK_HW": "constexpr"},
            constexprs={"HAS_SHIFT": True, "HAS_AFFINE": True, "INTERPRETED": False, "BLOCK_C": block_c,
                        "BLOCK_HW": block_hw},
            num_warps=_WARPS, num_stages=1, divisible=("C", "HW"), max_narrow_global=16,
        ))
    return specs
