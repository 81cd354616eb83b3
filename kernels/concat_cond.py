"""Channel-concat conditioning: the UNet input `[z_t ; c_image]` in one pass, c_image never materialised.

c_image = [f_first, 0, ..., 0, f_last] over the F frames (slot 0 the first-frame latent, slot F-1 the
last-frame latent times a per-sample keep mask: the tau rule at inference, the eta = 0.25 drop in training;
method.md). Each program writes one (b, f, channel) row of H*W output elements: a z_t row for the first C
channels, an instruction row (f_first at f = 0, keep * f_last at f = F-1, zeros between) for the last C. The
zero rows cost a store and no load.

Layout contract (the reference `concat_cond_ref.py` keeps the same one): the output is written in memory
order (R*B, F, 2C, H, W) and returned as the logical (R*B, 2C, F, H, W) view `out.permute(0, 2, 1, 3, 4)`.
The UNet turns its input into frame rows first thing (`sample.permute(0, 2, 1, 3, 4).reshape(B*F, 2C, H, W)`);
on this view that is free, where a contiguous (B, 2C, F, H, W) input would be copied once more. Inputs are
read with their strides (z_t is often itself a permuted view).

`repeat = R` writes R identical copies on the batch in the same pass (the [uncond; cond] halves of
classifier-free guidance differ only in the text), so the input is read once for both.

Training (`concat_condition_train`) also forms z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps per sample and
perturbs each instruction slot whose `cond_noise_*` is given to timestep `cond_timestep` (the paper perturbs
c_image "with noise corresponding to timestep 100"); a slot whose cond_noise is None is left clean — which
slots to perturb is the trainer's choice. Every input of the training variant is data (latents, noise,
schedule), so no backward is defined.

Everything the kernel needs per sample (keep mask, timesteps, schedule) is read on the device: the launch
never syncs with the host, so a CUDA graph can capture it (with `out=` a preallocated buffer).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_check import CompileSpec, jit_function
from .concat_cond_ref import (
    alloc_unet_input,
    check_concat_inputs,
    check_train_inputs,
    check_unet_input_out,
)

__all__ = ["alloc_unet_input", "concat_condition", "concat_condition_train", "modeled_bytes", "compile_specs"]


@triton.jit
def _concat_cond_kernel(
    out_ptr,  # (R*B, F, 2C, H, W) contiguous; the caller sees its (R*B, 2C, F, H, W) view
    z_ptr,  # (B, C, F, H, W) z_t, or z0 when TRAIN
    noise_ptr,  # (B, C, F, H, W) forward-process noise (TRAIN)
    first_ptr,  # (B, C, H, W) f_first (HAS_FIRST)
    last_ptr,  # (B, C, H, W) f_last (HAS_LAST)
    keep_ptr,  # (B,) bool/float keep mask of the last slot (HAS_KEEP); stride 0 broadcasts one value
    eps_first_ptr,  # (B, C, H, W) noise perturbing f_first (PERTURB_FIRST)
    eps_last_ptr,  # (B, C, H, W) noise perturbing f_last (PERTURB_LAST)
    t_ptr,  # (B,) integer training timesteps (TRAIN)
    abar_ptr,  # (T,) fp32 alphas_cumprod (TRAIN)
    cond_t,  # timestep the instruction slots are perturbed to (TRAIN)
    C, F, W, HW,
    stride_z_b, stride_z_c, stride_z_f, stride_z_h, stride_z_w,
    stride_noise_b, stride_noise_c, stride_noise_f, stride_noise_h, stride_noise_w,
    stride_first_b, stride_first_c, stride_first_h, stride_first_w,
    stride_last_b, stride_last_c, stride_last_h, stride_last_w,
    stride_efirst_b, stride_efirst_c, stride_efirst_h, stride_efirst_w,
    stride_elast_b, stride_elast_c, stride_elast_h, stride_elast_w,
    stride_keep_b,
    REPEAT: tl.constexpr,
    TRAIN: tl.constexpr,
    HAS_FIRST: tl.constexpr,
    HAS_LAST: tl.constexpr,
    HAS_KEEP: tl.constexpr,
    PERTURB_FIRST: tl.constexpr,
    PERTURB_LAST: tl.constexpr,
    HW_FLAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Rows on grid axis 0 (up to 2^31 programs), so large batches never hit axis 1's 65535 limit.
    row = tl.program_id(0)  # (b, f, c2) in the output's memory order
    n_rows = tl.num_programs(0)
    c2 = row % (2 * C)
    f = (row // (2 * C)) % F
    b = row // (2 * C * F)
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_row = hw < HW
    is_z = c2 < C
    c = tl.where(is_z, c2, c2 - C)
    b64 = b.to(tl.int64)
    # Offsets inside the (H, W) plane per input. Flat planes address as one run, which keeps the loads
    # contiguous and vectorisable; other strides pay one division.
    if HW_FLAT:
        z_hw = hw
        noise_hw = hw
        first_hw = hw
        last_hw = hw
        efirst_hw = hw
        elast_hw = hw
    else:
        h = hw // W
        w = hw % W
        z_hw = h * stride_z_h + w * stride_z_w
        noise_hw = h * stride_noise_h + w * stride_noise_w
        first_hw = h * stride_first_h + w * stride_first_w
        last_hw = h * stride_last_h + w * stride_last_w
        efirst_hw = h * stride_efirst_h + w * stride_efirst_w
        elast_hw = h * stride_elast_h + w * stride_elast_w

    # Scalar row conditions become a row length (HW or 0) compared against hw: one vector compare per
    # mask, and a row whose length is 0 issues no memory traffic.
    m_z = hw < tl.where(is_z, HW, 0)
    z_off = b64 * stride_z_b + c * stride_z_c + f * stride_z_f + z_hw
    if TRAIN:
        t = tl.load(t_ptr + b)
        abar = tl.load(abar_ptr + t)
        n_off = b64 * stride_noise_b + c * stride_noise_c + f * stride_noise_f + noise_hw
        z0 = tl.load(z_ptr + z_off, mask=m_z, other=0.0).to(tl.float32)
        eps = tl.load(noise_ptr + n_off, mask=m_z, other=0.0).to(tl.float32)
        val = tl.sqrt(abar) * z0 + tl.sqrt(1.0 - abar) * eps  # DDPM eq. 4
        abar_c = tl.load(abar_ptr + cond_t)
        sqrt_abar_c = tl.sqrt(abar_c)
        sqrt_one_minus_abar_c = tl.sqrt(1.0 - abar_c)
    else:
        val = tl.load(z_ptr + z_off, mask=m_z, other=0.0).to(tl.float32)

    if HAS_FIRST:
        m_first = hw < tl.where((c2 >= C) & (f == 0), HW, 0)
        off = b64 * stride_first_b + c * stride_first_c + first_hw
        v = tl.load(first_ptr + off, mask=m_first, other=0.0).to(tl.float32)
        if PERTURB_FIRST:
            off = b64 * stride_efirst_b + c * stride_efirst_c + efirst_hw
            e = tl.load(eps_first_ptr + off, mask=m_first, other=0.0).to(tl.float32)
            v = sqrt_abar_c * v + sqrt_one_minus_abar_c * e
        val += v  # the masks are disjoint: each output element gets exactly one term

    if HAS_LAST:
        is_last = (c2 >= C) & (f == F - 1)
        if HAS_KEEP:
            keep = tl.load(keep_ptr + b64 * stride_keep_b).to(tl.float32)
            # A dropped last frame (keep = 0) is not even read: after tau steps the slot costs nothing.
            is_last = is_last & (keep != 0.0)
        m_last = hw < tl.where(is_last, HW, 0)
        off = b64 * stride_last_b + c * stride_last_c + last_hw
        v = tl.load(last_ptr + off, mask=m_last, other=0.0).to(tl.float32)
        if PERTURB_LAST:
            off = b64 * stride_elast_b + c * stride_elast_c + elast_hw
            e = tl.load(eps_last_ptr + off, mask=m_last, other=0.0).to(tl.float32)
            v = sqrt_abar_c * v + sqrt_one_minus_abar_c * e
        if HAS_KEEP:
            v = keep * v
        val += v

    y = val.to(out_ptr.dtype.element_ty)
    for r in tl.static_range(REPEAT):
        # Copy r of row `row` is row `row + r * n_rows` of the (R*B, F, 2C, H, W) buffer.
        tl.store(out_ptr + (row + r * n_rows).to(tl.int64) * HW + hw, y, mask=in_row)


# ----------------------------------------------------------------------------------------------- launcher


def _block_config(hw: int) -> tuple[int, int]:
    """(BLOCK, num_warps): one row of H*W per program (split above 2048), 8 elements per thread so every
    thread moves a 16-byte vector of bf16 (two of fp32)."""
    block = min(max(triton.next_power_of_2(hw), 256), 2048)
    return block, block // 256


def _hw_flat(t: torch.Tensor | None) -> bool:
    """True when the trailing (H, W) plane of `t` is one contiguous run (None counts as flat)."""
    if t is None:
        return True
    h, w = t.shape[-2:]
    return (w == 1 or t.stride(-1) == 1) and (h == 1 or t.stride(-2) == w)


def _strides(t: torch.Tensor | None, ndim: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * ndim


def _launch(z: torch.Tensor, noise: torch.Tensor | None, f_first: torch.Tensor | None,
            f_last: torch.Tensor | None, keep_last: torch.Tensor | None, eps_first: torch.Tensor | None,
            eps_last: torch.Tensor | None, timesteps: torch.Tensor | None, abar: torch.Tensor | None,
            cond_t: int, repeat: int, out: torch.Tensor | None) -> torch.Tensor:
    b, c, f, h, w = z.shape
    shape = (repeat * b, 2 * c, f, h, w)
    if out is None:
        out = alloc_unet_input(repeat * b, c, f, h, w, dtype=z.dtype, device=z.device)
    else:
        check_unet_input_out(out, shape, z.dtype, z.device)
    hw = h * w
    block, num_warps = _block_config(hw)
    has_last = f_last is not None
    has_keep = has_last and keep_last is not None
    stride_keep = keep_last.stride(0) if has_keep and keep_last.numel() > 1 else 0
    flat = all(_hw_flat(t) for t in (z, noise, f_first, f_last, eps_first, eps_last))
    grid = (b * f * 2 * c, triton.cdiv(hw, block))
    _concat_cond_kernel[grid](
        out, z,
        noise if noise is not None else z,
        f_first if f_first is not None else z,
        f_last if has_last else z,
        keep_last if has_keep else z,
        eps_first if eps_first is not None else z,
        eps_last if eps_last is not None else z,
        timesteps if timesteps is not None else z,
        abar if abar is not None else z,
        cond_t,
        c, f, w, hw,
        *z.stride(), *_strides(noise, 5),
        *_strides(f_first, 4), *_strides(f_last, 4), *_strides(eps_first, 4), *_strides(eps_last, 4),
        stride_keep,
        REPEAT=repeat, TRAIN=noise is not None, HAS_FIRST=f_first is not None, HAS_LAST=has_last, HAS_KEEP=has_keep,
        PERTURB_FIRST=eps_first is not None, PERTURB_LAST=eps_last is not None, HW_FLAT=flat,
        BLOCK=block, num_warps=num_warps,
    )
    return out


# ----------------------------------------------------------------------------------------------- public


def concat_condition(z_t: torch.Tensor, f_first: torch.Tensor | None, f_last: torch.Tensor | None,
                     keep_last: torch.Tensor | None, *, repeat: int = 1,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """`[z_t ; c_image]` on channels -> logical (repeat*B, 2C, F, H, W), memory (repeat*B, F, 2C, H, W).

    z_t (B, C, F, H, W), any strides; f_first / f_last (B, C, H, W) or None (a zero slot); keep_last (B,)
    0/1 device tensor (bool or float; None keeps every last frame) scales the last-frame slot. `repeat = 2`
    writes the CFG batch [x; x]. `out` (from `alloc_unet_input`) is filled instead of a new buffer.
    """
    check_concat_inputs(z_t, f_first, f_last, keep_last, repeat)
    return _launch(z_t, None, f_first, f_last, keep_last, None, None, None, None, 0, repeat, out)


def concat_condition_train(z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                           alphas_cumprod: torch.Tensor, f_first: torch.Tensor | None,
                           f_last: torch.Tensor | None, keep_last: torch.Tensor | None, *,
                           cond_noise_first: torch.Tensor | None = None,
                           cond_noise_last: torch.Tensor | None = None, cond_timestep: int = 100,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """Training UNet input in one pass: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise per sample (t from
    `timesteps` (B,), abar from `alphas_cumprod` (T,) fp32 on the device), instruction slots perturbed to
    `cond_timestep` where their cond_noise is given (None: that slot stays clean), last slot times keep_last
    (the eta drop). Same layout contract as `concat_condition`. fp32 math, stored in z0's dtype.

    Timestep values are not range-checked (that would sync with the device). No backward: every input is
    data (latents, noise, schedule), nothing here is trained.
    """
    check_train_inputs(z0, noise, timesteps, alphas_cumprod, f_first, f_last, keep_last, cond_noise_first,
                       cond_noise_last, cond_timestep)
    return _launch(z0, noise, f_first, f_last, keep_last, cond_noise_first, cond_noise_last, timesteps,
                   alphas_cumprod.contiguous(), cond_timestep, 1, out)


def modeled_bytes(shape: tuple[int, int, int, int, int], dtype: torch.dtype = torch.bfloat16, *,
                  repeat: int = 1, has_first: bool = True, has_last: bool = True, training: bool = False,
                  perturb_first: bool = False, perturb_last: bool = False) -> int:
    """Minimum HBM bytes for z_t's `shape` (B, C, F, H, W): z_t (and the noise when training) read once,
    each present instruction (and its perturbing noise) read once, the (repeat*B, 2C, F, H, W) output written
    once. Per-sample scalars (keep mask, timesteps, two schedule values) are left out: B values."""
    b, c, f, h, w = shape
    item = torch.empty((), dtype=dtype).element_size()
    latent = b * c * f * h * w
    slot = b * c * h * w
    reads = latent * (2 if training else 1)
    reads += slot * (int(has_first) + int(has_last) + int(perturb_first) + int(perturb_last))
    writes = repeat * 2 * latent
    return (reads + writes) * item


# ----------------------------------------------------------------------------------------------- compile check



def _signature(ptr: str, keep: str, idx: str) -> dict[str, str]:
    sig = {"out_ptr": ptr, "z_ptr": ptr, "noise_ptr": ptr, "first_ptr": ptr, "last_ptr": ptr,
           "keep_ptr": keep, "eps_first_ptr": ptr, "eps_last_ptr": ptr, "t_ptr": idx, "abar_ptr": "*fp32"}
    ints = ["cond_t", "C", "F", "W", "HW"]
    ints += [f"stride_{n}_{d}" for n in ("z", "noise") for d in "bcfhw"]
    ints += [f"stride_{n}_{d}" for n in ("first", "last", "efirst", "elast") for d in "bchw"]
    ints += ["stride_keep_b"]
    sig.update({name: "i32" for name in ints})
    sig.update({name: "constexpr" for name in ("REPEAT", "TRAIN", "HAS_FIRST", "HAS_LAST", "HAS_KEEP", "PERTURB_FIRST",
                                                "PERTURB_LAST", "HW_FLAT", "BLOCK")})
    return sig


def compile_specs() -> list[CompileSpec]:
    """The distinct launches at the pixeldance shapes (4 latent channels, F = 16, 32x32 latents; B only sets
    the grid): sampling with CFG (repeat 2) and without, bf16 and fp32 (bool keep mask from the tau rule);
    training in fp32 and bf16 with both slots or only the last slot perturbed (float keep mask)."""
    block, num_warps = _block_config(32 * 32)
    specs = []
    configs = [
        # name, pointer type, keep type, REPEAT, TRAIN, PERTURB_FIRST, PERTURB_LAST
        ("sample_cfg_bf16", "*bf16", "*i1", 2, False, False, False),
        ("sample_cfg_fp32", "*fp32", "*i1", 2, False, False, False),
        ("sample_bf16", "*bf16", "*i1", 1, False, False, False),
        ("train_fp32", "*fp32", "*fp32", 1, True, True, True),
        ("train_last_bf16", "*bf16", "*fp32", 1, True, False, True),
    ]
    for name, ptr, keep, repeat, train, pf, pl in configs:
        specs.append(CompileSpec(
            name=f"concat_cond_{name}",
            fn=jit_function(_concat_cond_kernel),
            signature=_signature(ptr, keep, "*i64"),
            constexprs={"REPEAT": repeat, "TRAIN": train, "HAS_FIRST": True, "HAS_LAST": True,
                        "HAS_KEEP": True, "PERTURB_FIRST": pf, "PERTURB_LAST": pl, "HW_FLAT": True, "BLOCK": block},
            num_warps=num_warps, num_stages=1, expects_mma=False,
            # H*W and the batch / channel / frame strides are multiples of 16 there, as the launcher sees them:
            # 16-byte vectors; the one sub-word access is the bool keep mask's byte.
            divisible=("HW", *(f"stride_{t}_{d}" for t in ("z", "noise") for d in "bcf"),
                       *(f"stride_{t}_{d}" for t in ("first", "last", "efirst", "elast") for d in "bc")),
            max_narrow_global=1,
        ))
    return specs
