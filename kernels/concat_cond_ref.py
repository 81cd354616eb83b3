"""Pure-PyTorch reference for the channel-concat conditioning (`concat_cond.py`); never imports triton.

The UNet input is `[z_t ; c_image]` on channels, c_image = [f_first, 0, ..., 0, f_last] over the F frames
with the last-frame slot times a per-sample keep mask (method.md). This reference builds c_image explicitly
and concatenates with `torch.cat`, then hands the result back under the same layout contract as the kernel:

Layout contract (shared with the kernel): the result is the logical (R*B, 2C, F, H, W) tensor whose memory
is (R*B, F, 2C, H, W) contiguous, i.e. `buffer.permute(0, 2, 1, 3, 4)` of a contiguous (R*B, F, 2C, H, W)
buffer. The UNet's first operation, `sample.permute(0, 2, 1, 3, 4).reshape(B*F, 2C, H, W)`, is then a free
view instead of a copy of the whole input. R = `repeat` stacks identical copies on the batch (the sampler's
[uncond; cond] halves of classifier-free guidance, which differ only in the text).

The input checks live here (torch only) so the kernel and the reference reject the same inputs alike.
"""

from __future__ import annotations

import torch

__all__ = [
    "alloc_unet_input",
    "check_unet_input_out",
    "check_concat_inputs",
    "check_train_inputs",
    "concat_condition_ref",
    "concat_condition_train_ref",
]


def alloc_unet_input(batch: int, channels: int, frames: int, height: int, width: int, *,
                     dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """An uninitialised UNet-input buffer in the layout contract: logical (batch, 2*channels, frames, h, w),
    memory (batch, frames, 2*channels, h, w). `batch` includes the repeat (2B with CFG)."""
    buf = torch.empty(batch, frames, 2 * channels, height, width, dtype=dtype, device=device)
    return buf.permute(0, 2, 1, 3, 4)


def check_unet_input_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                         device: torch.device) -> None:
    """`out` must be a buffer of the layout contract with logical `shape`, `dtype` on `device`."""
    if tuple(out.shape) != tuple(shape):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {tuple(shape)}")
    if out.dtype != dtype or out.device != device:
        raise ValueError(f"out is {out.dtype} on {out.device}, expected {dtype} on {device}")
    if not out.permute(0, 2, 1, 3, 4).is_contiguous():
        raise ValueError(
            "out must be the (B, 2C, F, H, W) view of a contiguous (B, F, 2C, H, W) buffer "
            "(see alloc_unet_input), so the UNet's (B*F, 2C, H, W) reshape stays free"
        )


def _check_slot(name: str, t: torch.Tensor | None, want: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> None:
    if t is None:
        return
    if tuple(t.shape) != want:
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected (B, C, H, W) = {want}")
    if t.dtype != dtype or t.device != device:
        raise ValueError(f"{name} is {t.dtype} on {t.device}, expected {dtype} on {device} (like z_t)")


def check_concat_inputs(z_t: torch.Tensor, f_first: torch.Tensor | None, f_last: torch.Tensor | None,
                        keep_last: torch.Tensor | None, repeat: int = 1) -> None:
    """Shapes, dtypes and devices of the inference inputs (no value is read: no host sync)."""
    if z_t.ndim != 5:
        raise ValueError(f"z_t must be (B, C, F, H, W), got shape {tuple(z_t.shape)}")
    if not z_t.is_floating_point():
        raise ValueError(f"z_t must be a floating-point tensor, got {z_t.dtype}")
    b, c, f, h, w = z_t.shape
    if f < 2:
        raise ValueError(f"c_image needs at least 2 frames (first and last slot), got F = {f}")
    _check_slot("f_first", f_first, (b, c, h, w), z_t.dtype, z_t.device)
    _check_slot("f_last", f_last, (b, c, h, w), z_t.dtype, z_t.device)
    if keep_last is not None:
        if keep_last.ndim > 1 or keep_last.numel() not in (1, b):
            raise ValueError(f"keep_last must be (B,) with B = {b} (or one value), got shape "
                             f"{tuple(keep_last.shape)}")
        if not (keep_last.dtype == torch.bool or keep_last.is_floating_point()):
            raise ValueError(f"keep_last must be bool or floating point (0/1), got {keep_last.dtype}")
        if keep_last.device != z_t.device:
            raise ValueError(f"keep_last is on {keep_last.device}, z_t on {z_t.device}")
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"repeat must be an int >= 1, got {repeat!r}")


def check_train_inputs(z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                       alphas_cumprod: torch.Tensor, f_first: torch.Tensor | None,
                       f_last: torch.Tensor | None, keep_last: torch.Tensor | None,
                       cond_noise_first: torch.Tensor | None, cond_noise_last: torch.Tensor | None,
                       cond_timestep: int) -> None:
    """The training inputs; timesteps' values are not range-checked (that would sync with the device)."""
    check_concat_inputs(z0, f_first, f_last, keep_last)
    if tuple(noise.shape) != tuple(z0.shape) or noise.dtype != z0.dtype or noise.device != z0.device:
        raise ValueError(f"noise is {tuple(noise.shape)} {noise.dtype} on {noise.device}, expected z0's "
                         f"{tuple(z0.shape)} {z0.dtype} on {z0.device}")
    b, c, _, h, w = z0.shape
    if timesteps.shape != (b,) or timesteps.is_floating_point() or timesteps.dtype == torch.bool:
        raise ValueError(f"timesteps must be a (B,) integer tensor with B = {b}, got "
                         f"{tuple(timesteps.shape)} {timesteps.dtype}")
    if alphas_cumprod.ndim != 1 or alphas_cumprod.dtype != torch.float32:
        raise ValueError(f"alphas_cumprod must be a (T,) fp32 tensor, got {tuple(alphas_cumprod.shape)} "
                         f"{alphas_cumprod.dtype}")
    for name, t in (("timesteps", timesteps), ("alphas_cumprod", alphas_cumprod)):
        if t.device != z0.device:
            raise ValueError(f"{name} is on {t.device}, z0 on {z0.device}")
    if isinstance(cond_timestep, bool) or not isinstance(cond_timestep, int):
        raise ValueError(f"cond_timestep must be an int, got {cond_timestep!r}")
    if not 0 <= cond_timestep < alphas_cumprod.shape[0]:
        raise ValueError(f"cond_timestep {cond_timestep} is outside [0, {alphas_cumprod.shape[0]})")
    for slot, f, eps in (("first", f_first, cond_noise_first), ("last", f_last, cond_noise_last)):
        if eps is None:
            continue
        if f is None:
            raise ValueError(f"cond_noise_{slot} is given but f_{slot} is None: there is no {slot}-frame "
                             "instruction to perturb")
        _check_slot(f"cond_noise_{slot}", eps, (b, c, h, w), z0.dtype, z0.device)


def _to_layout(x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Copy the logical (N, 2C, F, H, W) tensor `x` into a buffer of the layout contract."""
    n, c2, f, h, w = x.shape
    if out is None:
        out = alloc_unet_input(n, c2 // 2, f, h, w, dtype=x.dtype, device=x.device)
    else:
        check_unet_input_out(out, tuple(x.shape), x.dtype, x.device)
    out.copy_(x)
    return out


def concat_condition_ref(z_t: torch.Tensor, f_first: torch.Tensor | None, f_last: torch.Tensor | None,
                         keep_last: torch.Tensor | None, *, repeat: int = 1,
                         out: torch.Tensor | None = None) -> torch.Tensor:
    """`[z_t ; c_image]` -> logical (repeat*B, 2C, F, H, W) in the layout contract (module docstring).

    z_t (B, C, F, H, W); f_first / f_last (B, C, H, W) or None (zeros); keep_last (B,) 0/1 (bool or float)
    scales the last-frame slot, None keeps it everywhere.
    """
    check_concat_inputs(z_t, f_first, f_last, keep_last, repeat)
    b, c, f, h, w = z_t.shape
    c_image = z_t.new_zeros(b, c, f, h, w)
    if f_first is not None:
        c_image[:, :, 0] = f_first
    if f_last is not None:
        keep = 1 if keep_last is None else keep_last.to(z_t.dtype).reshape(-1, 1, 1, 1)
        c_image[:, :, f - 1] = keep * f_last
    x = torch.cat([z_t, c_image], dim=1)
    if repeat > 1:
        x = torch.cat([x] * repeat, dim=0)
    return _to_layout(x, out)


def concat_condition_train_ref(z0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                               alphas_cumprod: torch.Tensor, f_first: torch.Tensor | None,
                               f_last: torch.Tensor | None, keep_last: torch.Tensor | None, *,
                               cond_noise_first: torch.Tensor | None = None,
                               cond_noise_last: torch.Tensor | None = None, cond_timestep: int = 100,
                               out: torch.Tensor | None = None) -> torch.Tensor:
    """Training UNet input: z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) noise per sample (DDPM eq. 4), and each
    instruction slot whose cond_noise is given perturbed to `cond_timestep` the same way; then the keep mask
    (the eta drop) and the layout contract of `concat_condition_ref`. fp32 math, stored in z0's dtype."""
    check_train_inputs(z0, noise, timesteps, alphas_cumprod, f_first, f_last, keep_last, cond_noise_first,
                       cond_noise_last, cond_timestep)
    abar = alphas_cumprod[timesteps].reshape(-1, 1, 1, 1, 1)
    z_t = (abar.sqrt() * z0.float() + (1.0 - abar).sqrt() * noise.float()).to(z0.dtype)
    abar_c = alphas_cumprod[cond_timestep]

    def perturb(f: torch.Tensor | None, eps: torch.Tensor | None) -> torch.Tensor | None:
        if f is None or eps is None:
            return f
        return (abar_c.sqrt() * f.float() + (1.0 - abar_c).sqrt() * eps.float()).to(f.dtype)

    return concat_condition_ref(z_t, perturb(f_first, cond_noise_first), perturb(f_last, cond_noise_last),
                                keep_last, out=out)
