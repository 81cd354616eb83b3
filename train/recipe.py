"""The PixelDance training objective (the paper's recipe, every knob configurable).

One step, for video latents z_0 (B, C, F, h, w) with text embeddings:

1. DDPM forward process: t ~ U{0..T-1} per sample, eps ~ N(0, I), z_t = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps
   (epsilon prediction, MSE loss, as the paper). `prediction_type` "v_prediction" regresses
   v = sqrt(abar_t) eps - sqrt(1 - abar_t) z_0 instead (it follows the model folder's scheduler config, so
   sampling reads the output the same way): its loss does not vanish at high noise, where eps-prediction
   lets a model ignore the image instructions (the x0 it implies there is off by 1/sqrt(abar_t)).
2. Image instructions from the clip itself: the first-frame instruction is the real first frame; the
   last-frame instruction is one of the last `last_frame_window` (3) real frames at random, so a rough
   draft works at inference.
3. The instructions are perturbed with noise for timestep `cond_timestep` (100):
   f' = sqrt(abar_100) f + sqrt(1 - abar_100) eps_f. Which slots: `perturb` = "instructions" (both
   first and last slots: the paper says c_image is perturbed; the zero PAD frames stay zero, since zero
   means "no instruction"), "last" (only the last-frame slot), or "none".
4. The last-frame instruction is dropped (zeros) with probability `eta` (0.25).
5. The caption is replaced by the empty prompt with probability `text_drop` (10%) for classifier-free
   guidance.

Image batches (F = 1, the paper's joint image-text training): the UNet bypasses its temporal layers and
c_image is zeros (a plain text-to-image objective keeps the spatial layers trained on images).

All random draws come from one CPU `torch.Generator`, so a run is reproducible on any device and a
resumed run continues the same stream (its state goes into checkpoints).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pdengine.engine.conditioning import build_c_image

PERTURB_MODES = ("instructions", "last", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass
class RecipeConfig:
    eta: float = 0.25  # probability of dropping the last-frame instruction
    text_drop: float = 0.1  # probability of training a sample on the empty prompt
    cond_timestep: int = 100  # instructions are noised to this timestep
    last_frame_window: int = 3  # last-frame instruction picked among the last N real frames
    perturb: str = "instructions"  # "instructions" | "last" | "none"
    prediction_type: str = "epsilon"  # what the UNet regresses: "epsilon" | "v_prediction"

    def validate(self, num_train_timesteps: int = 1000) -> None:
        for name in ("eta", "text_drop"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if not 0 <= self.cond_timestep < num_train_timesteps:
            raise ValueError(f"cond_timestep must be in [0, {num_train_timesteps}), got {self.cond_timestep}")
        if self.last_frame_window < 1:
            raise ValueError(f"last_frame_window must be >= 1, got {self.last_frame_window}")
        if self.perturb not in PERTURB_MODES:
            raise ValueError(f"perturb must be one of {PERTURB_MODES}, got {self.perturb!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainingInputs:
    unet_input: torch.Tensor  # (B, 2C, F, h, w)
    timesteps: torch.Tensor  # (B,) int64
    context: torch.Tensor  # (B, L, D)
    target: torch.Tensor  # (B, C, F, h, w): the noise eps, or v (RecipeConfig.prediction_type)
    keep_last: torch.Tensor  # (B,) bool: last-frame instruction kept
    text_kept: torch.Tensor  # (B,) bool: caption kept (not replaced by the empty prompt)


def regression_target(z0: torch.Tensor, eps: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the UNet regresses for z_t = sqrt(abar_t) z0 + sqrt(1 - abar_t) eps: eps, or
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) z0 (float32; abar_t broadcasts against z0)."""
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * eps.float() - (1 - abar_t).sqrt() * z0.float()
    return eps.float()


def _randn(shape: tuple[int, ...], gen: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=like.device, dtype=torch.float32)


def training_inputs(
    z0: torch.Tensor,
    text: torch.Tensor,
    uncond: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    cfg: RecipeConfig,
    gen: torch.Generator,
    use_kernel: bool = False,
) -> TrainingInputs:
    """Draw everything one training step needs and build the UNet input.

    z0 (B, C, F, h, w) scaled VAE latents; text (B, L, D); uncond (L, D) the empty prompt's embedding;
    alphas_cumprod (T,) of the training schedule; gen a CPU generator (the only source of randomness).
    `use_kernel`: build the UNet input with the fused Triton kernel (`concat_condition_train`: z_t, the
    perturbed instruction slots and the eta drop in one pass, c_image never materialised) instead of the
    PyTorch reference; both consume the same draws and agree to fp32 rounding.
    """
    if z0.ndim != 5:
        raise ValueError(f"z0 must be (B, C, F, h, w), got {tuple(z0.shape)}")
    b, c, f, h, w = z0.shape
    T = alphas_cumprod.shape[0]
    cfg.validate(T)
    device = z0.device
    abar = alphas_cumprod.to(device=device, dtype=torch.float32)

    # Draw order is fixed (it is part of the reproducibility contract): t, eps, text drop, last-frame
    # choice, eta drop, instruction noise.
    t = torch.randint(0, T, (b,), generator=gen)
    eps = _randn((b, c, f, h, w), gen, z0)
    text_kept = torch.rand(b, generator=gen) >= cfg.text_drop
    window = min(cfg.last_frame_window, f)
    last_idx = f - 1 - torch.randint(0, window, (b,), generator=gen)
    keep_last = torch.rand(b, generator=gen) >= cfg.eta
    noise_first = _randn((b, c, h, w), gen, z0)
    noise_last = _randn((b, c, h, w), gen, z0)

    t_dev = t.to(device)
    a = abar[t_dev].reshape(b, 1, 1, 1, 1)
    target = regression_target(z0, eps.to(device), a, cfg.prediction_type).to(z0.dtype)
    context = torch.where(text_kept.to(device).reshape(b, 1, 1), text, uncond.to(text.dtype).expand_as(text))
    if use_kernel and f > 1:  # image batches (F = 1) have no instruction slots: the reference path below
        from pdengine.kernels.concat_cond import concat_condition_train

        last = z0[torch.arange(b, device=device), :, last_idx.to(device)]
        unet_input = concat_condition_train(
            z0, eps.to(z0.dtype), t_dev, abar, z0[:, :, 0], last, keep_last.to(device),
            cond_noise_first=noise_first.to(z0.dtype) if cfg.perturb == "instructions" else None,
            cond_noise_last=noise_last.to(z0.dtype) if cfg.perturb in ("instructions", "last") else None,
            cond_timestep=cfg.cond_timestep,
        )
        return TrainingInputs(unet_input, t_dev, context, target, keep_last.to(device), text_kept.to(device))

    z_t = a.sqrt() * z0.float() + (1 - a).sqrt() * eps
    if f == 1:  # image batch: no instructions
        c_image = torch.zeros_like(z_t)
        keep_last = torch.zeros(b, dtype=torch.bool)
    else:
        x0 = z0.float()
        f_first = x0[:, :, 0]
        f_last = x0[torch.arange(b, device=device), :, last_idx.to(device)]
        a_c = abar[cfg.cond_timestep]
        if cfg.perturb in ("instructions",):
            f_first = a_c.sqrt() * f_first + (1 - a_c).sqrt() * noise_first
        if cfg.perturb in ("instructions", "last"):
            f_last = a_c.sqrt() * f_last + (1 - a_c).sqrt() * noise_last
        f_last = f_last * keep_last.to(device=device, dtype=f_last.dtype).reshape(b, 1, 1, 1)
        c_image = build_c_image(f_first, f_last, f)
    unet_input = torch.cat([z_t, c_image], dim=1).to(z0.dtype)
    return TrainingInputs(unet_input, t_dev, context, target, keep_last.to(device), text_kept.to(device))


def training_loss(unet: torch.nn.Module, z0: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                  alphas_cumprod: torch.Tensor, cfg: RecipeConfig, gen: torch.Generator,
                  use_kernel: bool | None = None) -> torch.Tensor:
    """MSE between the UNet's prediction and its target (eps or v; fp32 loss). `use_kernel` None: the
    fused input kernel when the UNet's backend runs kernels for these tensors (CUDA with "auto")."""
    if use_kernel is None:
        from pdengine.model.layers import use_kernels

        # DDP wraps the UNet: its backend lives on `.module`.
        use_kernel = use_kernels(getattr(getattr(unet, "module", unet), "backend", "torch"), z0)
    inputs = training_inputs(z0, text, uncond, alphas_cumprod, cfg, gen, use_kernel=use_kernel)
    pred = unet(inputs.unet_input, inputs.timesteps, inputs.context)
    return F.mse_loss(pred.float(), inputs.target.float())
