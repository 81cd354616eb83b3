"""Noisy-latent update: classifier-free-guidance combine + scheduler step in one elementwise pass, in place.

After the UNet call on the batched [uncond; cond] input, a sampling step is
    m      = m_u + s * (m_c - m_u)                         (CFG; skipped with guidance off)
    x_prev = c_sample * x + c_model * m + c_noise * noise  (the scheduler step in linear form)
with [c_sample, c_model, c_noise] = `scheduler.coefficients(step_index, eta)` (engine/schedulers.py) and the
guidance scale s both read from device tensors: no host sync, so the step is CUDA-graph safe. The linear
form covers DDIM (any eta) and DDPM for every prediction type, but not clip_sample=True (x_0 is clamped, the
step is not linear): `coefficients()` raises there and the sampler must use `scheduler.step` instead.

The eager version reads the UNet output three times and x twice and writes three temporaries; this pass
reads each input once and writes x once (`modeled_bytes`), so it should run at HBM bandwidth: one (b, c, f)
row of H*W elements per program, 8 elements per thread (16-byte vectors), fp32 math, stored in x's dtype.
The UNet output is read with its strides (the UNet returns a permuted view of its (B*F, C, H, W) rows).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .compile_check import CompileSpec, jit_function
from .latent_update_ref import check_latent_update_inputs

__all__ = ["latent_update_", "modeled_bytes", "compile_specs"]


@triton.jit
def _latent_update_kernel(
    x_ptr,  # (B, C, F, H, W) contiguous latent x_t, overwritten with x_{t_prev}
    model_ptr,  # (G*B, C, F, H, W) UNet output, any strides; G = 2 stacks [uncond; cond] (HAS_CFG)
    noise_ptr,  # (B, C, F, H, W) standard normal noise, any strides (HAS_NOISE)
    coeffs_ptr,  # (3,) fp32 [c_sample, c_model, c_noise] of this step
    guidance_ptr,  # (1,) guidance scale s (HAS_CFG)
    B, C, F, W, HW,
    stride_model_b, stride_model_c, stride_model_f, stride_model_h, stride_model_w,
    stride_noise_b, stride_noise_c, stride_noise_f, stride_noise_h, stride_noise_w,
    HAS_CFG: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    HW_FLAT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # Rows on grid axis 0 (up to 2^31 programs), so large batches never hit axis 1's 65535 limit.
    row = tl.program_id(0)  # (b, c, f) row of x
    f = row % F
    c = (row // F) % C
    b = row // (F * C)
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = hw < HW
    # Flat (H, W) planes address as one run (contiguous, vectorisable loads); other strides pay a division.
    if HW_FLAT:
        model_hw = hw
        noise_hw = hw
    else:
        h = hw // W
        w = hw % W
        model_hw = h * stride_model_h + w * stride_model_w
        noise_hw = h * stride_noise_h + w * stride_noise_w

    inner = c * stride_model_c + f * stride_model_f + model_hw
    m = tl.load(model_ptr + b.to(tl.int64) * stride_model_b + inner, mask=mask, other=0.0).to(tl.float32)
    if HAS_CFG:
        # The cond half is sample b + B of the UNet batch [uncond; cond].
        m_c = tl.load(model_ptr + (b + B).to(tl.int64) * stride_model_b + inner, mask=mask, other=0.0)
        m_c = m_c.to(tl.float32)
        s = tl.load(guidance_ptr).to(tl.float32)
        m = m + s * (m_c - m)

    x_off = row.to(tl.int64) * HW + hw
    x = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    c_sample = tl.load(coeffs_ptr)
    c_model = tl.load(coeffs_ptr + 1)
    out = c_sample * x + c_model * m
    if HAS_NOISE:
        n_off = b.to(tl.int64) * stride_noise_b + c * stride_noise_c + f * stride_noise_f + noise_hw
        noise = tl.load(noise_ptr + n_off, mask=mask, other=0.0).to(tl.float32)
        out += tl.load(coeffs_ptr + 2) * noise
    tl.store(x_ptr + x_off, out.to(x_ptr.dtype.element_ty), mask=mask)


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


def _launch(x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor, guidance: torch.Tensor | None,
            noise: torch.Tensor | None) -> torch.Tensor:
    b, c, f, h, w = x.shape
    hw = h * w
    block, num_warps = _block_config(hw)
    grid = (b * c * f, triton.cdiv(hw, block))
    _latent_update_kernel[grid](
        x, model_output,
        noise if noise is not None else x,
        coeffs,
        guidance if guidance is not None else coeffs,
        b, c, f, w, hw,
        *model_output.stride(),
        *(noise.stride() if noise is not None else (0,) * 5),
        HAS_CFG=guidance is not None, HAS_NOISE=noise is not None,
        HW_FLAT=_hw_flat(model_output) and _hw_flat(noise),
        BLOCK=block, num_warps=num_warps,
    )
    return x


# ----------------------------------------------------------------------------------------------- public


def latent_update_(x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor,
                   guidance: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """One sampling step in place: x <- c_sample * x + c_model * m + c_noise * noise; returns x.

    x (B, C, F, H, W) contiguous; model_output the UNet output in any strides, (2B, ...) = [uncond; cond]
    when `guidance` (a one-element device tensor s, m = m_u + s (m_c - m_u)) is given, else (B, ...);
    coeffs the (3,) fp32 `scheduler.coefficients(step_index, eta)`; noise (B, C, F, H, W) or None, which
    drops the noise term (the caller's choice: right for DDIM with eta = 0, where c_noise is 0).
    fp32 math, stored in x's dtype.
    """
    check_latent_update_inputs(x, model_output, coeffs, guidance, noise)
    if not x.is_contiguous():
        raise ValueError("latent_update_: x must be contiguous (it is updated in place)")
    if not coeffs.is_contiguous():
        raise ValueError("latent_update_: coeffs must be contiguous")
    return _launch(x, model_output, coeffs, guidance, noise)


def modeled_bytes(shape: tuple[int, int, int, int, int], dtype: torch.dtype = torch.bfloat16, *,
                  cfg: bool = True, has_noise: bool = False, model_dtype: torch.dtype | None = None,
                  noise_dtype: torch.dtype | None = None) -> int:
    """Minimum HBM bytes for a latent of `shape` (B, C, F, H, W) in `dtype`: the UNet output ((2B, ...) with
    CFG, in `model_dtype`, default `dtype`) and x (and the noise) read once, x written once. The three
    coefficients and the guidance scale are left out (four values)."""
    n = 1
    for d in shape:
        n *= d
    item = torch.empty((), dtype=dtype).element_size()
    model_item = torch.empty((), dtype=model_dtype or dtype).element_size()
    noise_item = torch.empty((), dtype=noise_dtype or dtype).element_size()
    total = (2 if cfg else 1) * n * model_item + 2 * n * item
    if has_noise:
        total += n * noise_item
    return total


# ----------------------------------------------------------------------------------------------- compile check



def compile_specs() -> list[CompileSpec]:
    """The distinct launches at the pixeldance shapes (4 latent channels, F = 16, 32x32 latents; B only sets
    the grid): CFG with and without noise (DDPM / DDIM eta > 0 vs DDIM eta = 0) in bf16 and fp32, and
    guidance off in bf16."""
    block, num_warps = _block_config(32 * 32)
    specs = []
    for name, ptr, cfg, has_noise in (
        ("cfg_bf16", "*bf16", True, False),
        ("cfg_noise_bf16", "*bf16", True, True),
        ("cfg_fp32", "*fp32", True, False),
        ("cfg_noise_fp32", "*fp32", True, True),
        ("nocfg_bf16", "*bf16", False, False),
    ):
        signature = {"x_ptr": ptr, "model_ptr": ptr, "noise_ptr": ptr, "coeffs_ptr": "*fp32",
                     "guidance_ptr": "*fp32"}
        signature.update({n: "i32" for n in ("B", "C", "F", "W", "HW")})
        signature.update({f"stride_{t}_{d}": "i32" for t in ("model", "noise") for d in "bcfhw"})
        signature.update({n: "constexpr" for n in ("HAS_CFG", "HAS_NOISE", "HW_FLAT", "BLOCK")})
        specs.append(CompileSpec(
            name=f"latent_update_{name}", fn=jit_function(_latent_update_kernel), signature=signature,
            constexprs={"HAS_CFG": cfg, "HAS_NOISE": has_noise, "HW_FLAT": True, "BLOCK": block},
            num_warps=num_warps, num_stages=1, expects_mma=False,
            # H*W and the batch / channel / frame strides of the UNet output's permuted view (and of the noise)
            # are multiples of 16 there, as the launcher sees them: 16-byte vectors, no sub-word accesses.
            divisible=("HW", *(f"stride_{t}_{d}" for t in ("model", "noise") for d in "bcf")), max_narrow_global=0,
        ))
    return specs
