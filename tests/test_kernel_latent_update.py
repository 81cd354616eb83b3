"""Noisy-latent update kernel (`kernels/latent_update.py`) against the device schedulers' `step` on the
CFG-combined model output (engine/schedulers.py) and its PyTorch reference; in-place semantics, strided
UNet outputs, compile check."""

from __future__ import annotations

import os

import pytest
import torch

from pdengine.engine.schedulers import SD_SCHEDULE, DDIMScheduler, load_scheduler
from pdengine.kernels import latent_update, latent_update_ref
from tests.kernel_utils import assert_close, assert_low_precision_close, assert_streaming_compiles_clean

SHAPE = (2, 3, 5, 3, 5)  # (B, C, F, H, W): odd F, H*W = 15 (no block multiple)
STEPS = 4
GUIDANCE = 7.5


def _model_output(shape, groups, seed, dtype=torch.float32, layout="unet"):
    """A random UNet output of batch groups*B in the layout the UNet returns: the (B, C, F, H, W) view of
    (B, F, C, H, W) memory ("unet"), or additionally with a transposed (H, W) plane ("non_flat")."""
    b, c, f, h, w = shape
    g = torch.Generator().manual_seed(seed)
    if layout == "unet":
        return torch.randn(groups * b, f, c, h, w, generator=g).to(dtype).permute(0, 2, 1, 3, 4)
    return torch.randn(groups * b, f, c, w, h, generator=g).to(dtype).permute(0, 2, 1, 4, 3)


def _cfg(model_output, guidance):
    if guidance is None:
        return model_output
    m_u, m_c = model_output.chunk(2)
    return m_u + guidance * (m_c - m_u)


@pytest.mark.parametrize("kind, eta, prediction", [
    ("ddim", 0.0, "epsilon"), ("ddim", 0.5, "epsilon"), ("ddpm", 0.0, "epsilon"), ("ddim", 0.5, "v_prediction"),
])
@pytest.mark.parametrize("cfg", [True, False])
def test_trajectory_matches_scheduler_step(kind, eta, prediction, cfg):
    sched = load_scheduler({**SD_SCHEDULE, "prediction_type": prediction}, kind=kind)
    assert not sched.config.clip_sample
    sched.set_timesteps(STEPS)
    noisy = kind == "ddpm" or eta > 0
    guidance = torch.tensor(GUIDANCE) if cfg else None
    x_ref = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    x = x_ref.clone()
    storage = x.data_ptr()
    for i in range(STEPS):
        out = _model_output(SHAPE, 2 if cfg else 1, seed=10 + i)
        noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(100 + i)) if noisy else None
        step = torch.tensor(i)
        x_ref = sched.step(_cfg(out, GUIDANCE if cfg else None), step, x_ref, noise=noise, eta=eta)
        coeffs = sched.coefficients(step, eta)
        expected = latent_update_ref.latent_update_ref(x, out, coeffs, guidance, noise)
        ret = latent_update.latent_update_(x, out, coeffs, guidance, noise)
        assert ret is x and x.data_ptr() == storage  # in place
        assert_close(x, expected, torch.float32, f"{kind} eta={eta} step {i} vs reference")
        assert_close(x, x_ref, torch.float32, f"{kind} eta={eta} step {i} vs scheduler.step")


def test_reference_matches_scheduler_step():
    sched = load_scheduler(SD_SCHEDULE, kind="ddpm")
    sched.set_timesteps(STEPS)
    x = torch.randn(SHAPE)
    out = _model_output(SHAPE, 2, seed=3)
    noise = torch.randn(SHAPE)
    for i in range(STEPS):
        expected = sched.step(_cfg(out, GUIDANCE), torch.tensor(i), x, noise=noise)
        got = latent_update_ref.latent_update_ref(x, out, sched.coefficients(i), torch.tensor(GUIDANCE), noise)
        assert_close(got, expected, torch.float32, f"reference step {i}")


@pytest.mark.parametrize("kind, eta", [("ddim", 0.0), ("ddpm", 0.0)])
def test_bf16(kind, eta):
    sched = load_scheduler(SD_SCHEDULE, kind=kind)
    sched.set_timesteps(STEPS)
    x_lp = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).bfloat16()
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).bfloat16() if kind == "ddpm" else None
    for i in (0, STEPS - 1):
        out = _model_output(SHAPE, 2, seed=20 + i, dtype=torch.bfloat16)
        x = x_lp.clone()
        latent_update.latent_update_(x, out, sched.coefficients(i, eta), torch.tensor(GUIDANCE), noise)
        assert x.dtype == torch.bfloat16
        # PyTorch in bf16 as the reference pipeline runs it (the CFG combine in bf16, then the step), and the
        # same step in fp32 from the same bf16 inputs.
        torch_lp = sched.step(_cfg(out, GUIDANCE), torch.tensor(i), x_lp, noise=noise, eta=eta)
        torch32 = sched.step(_cfg(out.float(), GUIDANCE), torch.tensor(i), x_lp.float(),
                             noise=None if noise is None else noise.float(), eta=eta)
        assert_low_precision_close(x, torch_lp, torch32, f"{kind} bf16 step {i}")


def test_strided_inputs_and_inputs_untouched():
    sched = load_scheduler(SD_SCHEDULE, kind="ddim")
    sched.set_timesteps(STEPS)
    out = _model_output(SHAPE, 2, seed=5, layout="non_flat")
    noise = torch.randn(SHAPE[0], SHAPE[2], SHAPE[1], SHAPE[4], SHAPE[3]).permute(0, 2, 1, 4, 3)
    out_copy, noise_copy = out.clone(), noise.clone()
    x0 = torch.randn(SHAPE)
    coeffs = sched.coefficients(1, 0.5)
    x = x0.clone()
    latent_update.latent_update_(x, out, coeffs, torch.tensor(GUIDANCE), noise)
    expected = sched.step(_cfg(out, GUIDANCE), torch.tensor(1), x0, noise=noise, eta=0.5)
    assert_close(x, expected, torch.float32, "strided model_output and noise")
    assert torch.equal(out, out_copy) and torch.equal(noise, noise_copy)


def test_batch_one_and_guidance_scale_is_read_from_tensor():
    shape = (1, 4, 2, 4, 4)
    sched = load_scheduler(SD_SCHEDULE, kind="ddim")
    sched.set_timesteps(STEPS)
    out = _model_output(shape, 2, seed=7)
    x0 = torch.randn(shape)
    for scale in (1.0, 3.0):  # the same launch, a new value in the same guidance buffer
        guidance = torch.tensor(scale)
        x = x0.clone()
        latent_update.latent_update_(x, out, sched.coefficients(2), guidance)
        assert_close(x, sched.step(_cfg(out, scale), torch.tensor(2), x0), torch.float32, f"s={scale}")


def test_clip_sample_is_refused_by_coefficients():
    # The error path: the kernel needs a linear step, and coefficients() refuses clip_sample=True, so the
    # sampler falls back to scheduler.step explicitly.
    sched = DDIMScheduler(clip_sample=True)
    sched.set_timesteps(STEPS)
    with pytest.raises(ValueError, match="clip_sample"):
        sched.coefficients(0)


@pytest.mark.parametrize("case, match", [
    ("x_strided", "x must be contiguous"), ("batch_cfg", "expected .uncond; cond."),
    ("batch_nocfg", "guidance off"), ("coeffs_dtype", "coeffs must be"), ("guidance_float", "device tensor"),
    ("guidance_numel", "guidance must be one"), ("noise_shape", "noise must be"),
])
def test_input_errors(case, match):
    b, c, f, h, w = SHAPE
    x = torch.randn(SHAPE)
    out = _model_output(SHAPE, 2, seed=0)
    coeffs = torch.tensor([1.0, -0.1, 0.0])
    guidance, noise = torch.tensor(GUIDANCE), None
    if case == "x_strided":
        x = torch.randn(b, f, c, h, w).permute(0, 2, 1, 3, 4)
    elif case == "batch_cfg":
        out = out[:b]
    elif case == "batch_nocfg":
        guidance = None
    elif case == "coeffs_dtype":
        coeffs = coeffs.double()
    elif case == "guidance_float":
        guidance = GUIDANCE
    elif case == "guidance_numel":
        guidance = torch.ones(2)
    elif case == "noise_shape":
        noise = torch.randn(b, c, f, h, w + 1)
    with pytest.raises(ValueError, match=match):
        latent_update.latent_update_(x, out, coeffs, guidance, noise)
    if case != "x_strided":  # the reference returns a new tensor, so it takes any x
        with pytest.raises(ValueError, match=match):
            latent_update_ref.latent_update_ref(x, out, coeffs, guidance, noise)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_modeled_bytes_counts_every_tensor_once(dtype):
    shape = (2, 4, 16, 8, 8)
    x = torch.zeros(shape, dtype=dtype)
    out = torch.zeros(2 * shape[0], *shape[1:], dtype=dtype)
    noise = torch.zeros(shape, dtype=dtype)
    read = sum(t.numel() * t.element_size() for t in (x, out, noise))
    assert latent_update.modeled_bytes(shape, dtype, has_noise=True) == read + x.numel() * x.element_size()
    read = sum(t.numel() * t.element_size() for t in (x, out[: shape[0]]))
    assert latent_update.modeled_bytes(shape, dtype, cfg=False) == read + x.numel() * x.element_size()


def test_compile_specs_no_spills():
    assert_streaming_compiles_clean(latent_update.compile_specs())


@pytest.mark.gpu
def test_cuda_graph_replay(gpu):
    """Captured once, replayed with new coefficients and guidance in the same device buffers."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("needs compiled kernels: run with TRITON_INTERPRET=0")
    b, c, f, h, w = 2, 4, 16, 32, 32  # the pixeldance latent
    sched = load_scheduler(SD_SCHEDULE, kind="ddim")
    sched.set_timesteps(STEPS, device=gpu)
    x = torch.randn(b, c, f, h, w, device=gpu, dtype=torch.bfloat16)
    out = torch.randn(2 * b, f, c, h, w, device=gpu, dtype=torch.bfloat16).permute(0, 2, 1, 3, 4)
    coeffs = sched.coefficients(0).clone()
    guidance = torch.tensor(GUIDANCE, device=gpu)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture: compiles the kernel
        latent_update.latent_update_(x, out, coeffs, guidance)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        latent_update.latent_update_(x, out, coeffs, guidance)
    for i in range(STEPS):
        coeffs.copy_(sched.coefficients(i))
        guidance.fill_(1.0 + i)
        expected = latent_update_ref.latent_update_ref(x, out, coeffs, guidance)
        graph.replay()
        assert_close(x, expected, torch.bfloat16, f"graph replay step {i}")
