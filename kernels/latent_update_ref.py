"""Pure-PyTorch reference for the noisy-latent update (`latent_update.py`); never imports triton.

One sampling step after the UNet: the classifier-free-guidance combine of the batched output
[uncond; cond], `m = m_u + s * (m_c - m_u)`, then the scheduler step in linear form
`x_prev = c_sample * x + c_model * m + c_noise * noise`, whose coefficients are
`scheduler.coefficients(step_index, eta)` (engine/schedulers.py: DDIM for any eta and DDPM, every
prediction type; not clip_sample=True, whose x_0 clamp is not linear — `coefficients()` raises there and
the sampler must fall back to `scheduler.step`).

The input checks live here (torch only) so the kernel and the reference reject the same inputs alike.
"""

from __future__ import annotations

import torch

__all__ = ["check_latent_update_inputs", "latent_update_ref"]


def check_latent_update_inputs(x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor,
                               guidance: torch.Tensor | None, noise: torch.Tensor | None) -> None:
    """Shapes, dtypes and devices (no value is read: no host sync)."""
    if x.ndim != 5 or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point (B, C, F, H, W) latent, got {tuple(x.shape)} {x.dtype}")
    groups = 1 if guidance is None else 2
    want = (groups * x.shape[0], *x.shape[1:])
    if tuple(model_output.shape) != want:
        what = "[uncond; cond] (2B, C, F, H, W)" if groups == 2 else "(B, C, F, H, W) (guidance off)"
        raise ValueError(f"model_output has shape {tuple(model_output.shape)}, expected {what} = {want}")
    if not model_output.is_floating_point():
        raise ValueError(f"model_output must be floating point, got {model_output.dtype}")
    if coeffs.shape != (3,) or coeffs.dtype != torch.float32:
        raise ValueError(f"coeffs must be the (3,) fp32 [c_sample, c_model, c_noise] of "
                         f"scheduler.coefficients(), got {tuple(coeffs.shape)} {coeffs.dtype}")
    if guidance is not None:
        if not isinstance(guidance, torch.Tensor):
            raise ValueError(f"guidance must be a one-element device tensor (graph-safe), got {type(guidance)}")
        if guidance.numel() != 1 or not guidance.is_floating_point():
            raise ValueError(f"guidance must be one floating-point value, got {tuple(guidance.shape)} "
                             f"{guidance.dtype}")
    if noise is not None and (tuple(noise.shape) != tuple(x.shape) or not noise.is_floating_point()):
        raise ValueError(f"noise must be floating point with x's shape {tuple(x.shape)}, got "
                         f"{tuple(noise.shape)} {noise.dtype}")
    for name, t in (("model_output", model_output), ("coeffs", coeffs), ("guidance", guidance), ("noise", noise)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, x on {x.device}")


def latent_update_ref(x: torch.Tensor, model_output: torch.Tensor, coeffs: torch.Tensor,
                      guidance: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """x_{t_prev} as a new tensor: CFG combine (when `guidance` is given, model_output = [uncond; cond]),
    then `c_sample * x + c_model * m + c_noise * noise` (no noise term when `noise` is None). fp32 math,
    x's dtype out."""
    check_latent_update_inputs(x, model_output, coeffs, guidance, noise)
    m = model_output.float()
    if guidance is not None:
        m_u, m_c = m.chunk(2)
        m = m_u + guidance.float().reshape(()) * (m_c - m_u)
    c_sample, c_model, c_noise = coeffs.unbind(0)
    out = c_sample * x.float() + c_model * m
    if noise is not None:
        out = out + c_noise * noise.float()
    return out.to(x.dtype)
