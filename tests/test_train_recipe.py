"""The PixelDance training objective: noising equals the scheduler's, instructions follow the recipe."""

import pytest
import torch
from diffusers import DDPMScheduler

from pdengine.engine.schedulers import SD_SCHEDULE
from pdengine.train.recipe import RecipeConfig, training_inputs, training_loss
from tests.kernel_utils import assert_close

ABAR = DDPMScheduler.from_config(SD_SCHEDULE).alphas_cumprod


def _batch(b=3, f=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, f, 6, 7, generator=gen), torch.randn(b, 9, 16, generator=gen), torch.randn(9, 16, generator=gen)


def _replay(b, c, f, h, w, seed):
    """The documented draw order, replayed: t, eps, text drop, last-frame offset, eta drop, noises."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (b,), generator=gen)
    eps = torch.randn(b, c, f, h, w, generator=gen)
    text_u = torch.rand(b, generator=gen)
    offset = torch.randint(0, min(3, f), (b,), generator=gen)
    eta_u = torch.rand(b, generator=gen)
    n_first = torch.randn(b, c, h, w, generator=gen)
    n_last = torch.randn(b, c, h, w, generator=gen)
    return t, eps, text_u, offset, eta_u, n_first, n_last


def test_noising_matches_diffusers_add_noise_and_instructions_follow_the_recipe():
    z0, text, uncond = _batch()
    cfg = RecipeConfig()
    out = training_inputs(z0, text, uncond, ABAR, cfg, torch.Generator().manual_seed(7))
    t, eps, text_u, offset, eta_u, n_first, n_last = _replay(3, 4, 5, 6, 7, seed=7)
    assert torch.equal(out.timesteps, t)
    z_t = DDPMScheduler.from_config(SD_SCHEDULE).add_noise(z0, eps, t)
    assert_close(out.unet_input[:, :4], z_t, name="z_t")
    assert torch.equal(out.target, eps)
    a = ABAR[100]
    first = a.sqrt() * z0[:, :, 0] + (1 - a).sqrt() * n_first
    assert_close(out.unet_input[:, 4:, 0], first, name="first-frame slot")
    for i in range(3):
        last = a.sqrt() * z0[i, :, 4 - offset[i]] + (1 - a).sqrt() * n_last[i]
        expected = last if eta_u[i] >= 0.25 else torch.zeros_like(last)
        assert_close(out.unet_input[i, 4:, -1], expected, name=f"last-frame slot {i}")
    assert not out.unet_input[:, 4:, 1:-1].any()  # PAD frames stay zero
    for i in range(3):
        assert torch.equal(out.context[i], text[i] if text_u[i] >= 0.1 else uncond)


def test_last_frame_is_one_of_the_last_three_and_rates_hold():
    z0 = torch.arange(8.0).reshape(1, 1, 8, 1, 1).expand(4000, 1, 8, 1, 1).contiguous()
    text, uncond = torch.ones(4000, 2, 3), torch.zeros(2, 3)
    cfg = RecipeConfig(perturb="none")
    out = training_inputs(z0, text, uncond, ABAR, cfg, torch.Generator().manual_seed(0))
    last = out.unet_input[:, 1, -1, 0, 0]
    kept = out.keep_last
    assert set(last[kept].tolist()) == {5.0, 6.0, 7.0}
    assert not last[~kept].any()
    assert abs((~kept).float().mean().item() - 0.25) < 0.03  # eta = 0.25
    assert abs((~out.text_kept).float().mean().item() - 0.1) < 0.02
    assert torch.equal(out.unet_input[:, 1, 0, 0, 0], torch.zeros(4000))  # first frame (value 0), unperturbed


def test_modes_images_and_validation():
    z0, text, uncond = _batch(f=1)
    out = training_inputs(z0, text, uncond, ABAR, RecipeConfig(), torch.Generator().manual_seed(1))
    assert not out.unet_input[:, 4:].any() and not out.keep_last.any()  # image batch: c_image zeros
    z0, text, uncond = _batch()
    a = training_inputs(z0, text, uncond, ABAR, RecipeConfig(perturb="last", eta=0.0), torch.Generator().manual_seed(2))
    assert torch.equal(a.unet_input[:, 4:, 0], z0[:, :, 0])  # first slot not perturbed in "last" mode
    b = training_inputs(z0, text, uncond, ABAR, RecipeConfig(perturb="last", eta=0.0), torch.Generator().manual_seed(2))
    assert torch.equal(a.unet_input, b.unet_input)  # same seed, same draws
    for bad in (RecipeConfig(eta=1.5), RecipeConfig(perturb="all"), RecipeConfig(cond_timestep=1000),
                RecipeConfig(last_frame_window=0)):
        with pytest.raises(ValueError):
            training_inputs(z0, text, uncond, ABAR, bad, torch.Generator())


def test_training_loss_is_the_mse_and_backpropagates():
    from pdengine.model import UNet3D

    torch.manual_seed(0)
    unet = UNet3D.from_preset("tiny", cross_attention_dim=16)
    z0, text, uncond = _batch(b=2, f=3)
    z0 = z0[..., :4, :4]
    loss = training_loss(unet, z0, text, uncond, ABAR, RecipeConfig(), torch.Generator().manual_seed(3))
    inputs = training_inputs(z0, text, uncond, ABAR, RecipeConfig(), torch.Generator().manual_seed(3))
    expected = torch.nn.functional.mse_loss(unet(inputs.unet_input, inputs.timesteps, inputs.context), inputs.target)
    assert_close(loss, expected, name="loss")
    loss.backward()
    assert unet.conv_in.weight.grad is not None and unet.conv_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("perturb,f", [("instructions", 5), ("last", 3), ("none", 2), ("instructions", 1)])
def test_fused_input_kernel_equals_the_reference(perturb, f):
    """The Triton training-input kernel (interpreter on CPU) consumes the same draws as the reference."""
    z0, text, uncond = _batch(b=3, f=f)
    cfg = RecipeConfig(perturb=perturb, eta=0.5)
    ref = training_inputs(z0, text, uncond, ABAR, cfg, torch.Generator().manual_seed(9))
    fused = training_inputs(z0, text, uncond, ABAR, cfg, torch.Generator().manual_seed(9), use_kernel=True)
    assert_close(fused.unet_input, ref.unet_input, name="unet input")
    assert torch.equal(fused.target, ref.target) and torch.equal(fused.timesteps, ref.timesteps)
    assert torch.equal(fused.keep_last, ref.keep_last) and torch.equal(fused.context, ref.context)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_v_prediction_target_is_diffusers_velocity(use_kernel):
    """prediction_type "v_prediction": the same draws and UNet input, the target is diffusers' velocity."""
    z0, text, uncond = _batch(b=3, f=4)
    eps_cfg, v_cfg = RecipeConfig(), RecipeConfig(prediction_type="v_prediction")
    ref = training_inputs(z0, text, uncond, ABAR, eps_cfg, torch.Generator().manual_seed(3), use_kernel=use_kernel)
    out = training_inputs(z0, text, uncond, ABAR, v_cfg, torch.Generator().manual_seed(3), use_kernel=use_kernel)
    assert torch.equal(out.unet_input, ref.unet_input) and torch.equal(out.timesteps, ref.timesteps)
    velocity = DDPMScheduler.from_config(SD_SCHEDULE).get_velocity(z0, ref.target, ref.timesteps)
    assert_close(out.target, velocity, name="v target")
    with pytest.raises(ValueError, match="prediction_type"):
        RecipeConfig(prediction_type="sample").validate()
