"""DDIM/DDPM schedulers against diffusers' DDIMScheduler/DDPMScheduler (the reference), all in fp32."""

from __future__ import annotations

import json

import diffusers
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from pdengine.engine.schedulers import (
    SCHEDULER_CONFIG_NAME,
    DDIMScheduler,
    DDPMScheduler,
    SchedulerConfig,
    load_scheduler,
)

SHAPE = (2, 4, 3, 5, 6)  # (B, C, F, H, W)
RTOL, ATOL = 1e-5, 1e-5  # fp32 against fp32
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "clip_sample": False}
SPACINGS = ("leading", "trailing", "linspace")


def fake_model(x: torch.Tensor, t: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """Deterministic stand-in for a denoiser: bounded, depends on x_t and t."""
    return 0.9 * torch.tanh(x) + 0.1 * torch.sin(base + t.float() / 97.0)


def _pair(config: dict, n: int, ours_cls=DDIMScheduler, ref_cls=diffusers.DDIMScheduler, ref_config=None):
    ref = ref_cls(**(ref_config if ref_config is not None else config))
    ours = ours_cls.from_config(config)
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    return ours, ref


def run_ddim(config: dict, n: int, eta: float = 0.0) -> None:
    """Whole DDIM trajectory with the same model and noise, compared after every step."""
    ours, ref = _pair(config, n)
    gen = torch.Generator().manual_seed(n)
    x_ref = torch.randn(SHAPE, generator=gen)
    base = torch.randn(SHAPE, generator=gen)
    x = x_ref.clone()
    for i, t in enumerate(ref.timesteps):
        noise = torch.randn(SHAPE, generator=gen)
        x_ref = ref.step(
            fake_model(x_ref, t, base), t, x_ref, eta=eta, variance_noise=noise if eta > 0 else None
        ).prev_sample
        x = ours.step(
            fake_model(x, ours.timesteps[i], base),
            torch.tensor(i),
            x,
            noise=noise if eta > 0 else None,
            eta=eta,
        )
        torch.testing.assert_close(x, x_ref, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"step {i}: {m}")
    assert torch.isfinite(x).all()


def run_ddpm(config: dict, n: int, ref_config: dict | None = None) -> None:
    """Whole DDPM trajectory: diffusers draws noise from a seeded CPU generator, we draw the same noise
    from an identically seeded one (diffusers skips the draw at t = 0, which is only the last step)."""
    ours, ref = _pair(config, n, DDPMScheduler, diffusers.DDPMScheduler, ref_config)
    gen = torch.Generator().manual_seed(7)
    x_ref = torch.randn(SHAPE, generator=gen)
    base = torch.randn(SHAPE, generator=gen)
    x = x_ref.clone()
    gen_ref, gen_ours = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    for i, t in enumerate(ref.timesteps):
        x_ref = ref.step(fake_model(x_ref, t, base), t, x_ref, generator=gen_ref).prev_sample
        noise = torch.randn(SHAPE, generator=gen_ours)
        x = ours.step(fake_model(x, ours.timesteps[i], base), torch.tensor(i), x, noise=noise)
        torch.testing.assert_close(x, x_ref, rtol=RTOL, atol=ATOL, msg=lambda m, i=i: f"step {i}: {m}")
    assert torch.isfinite(x).all()


# ------------------------------------------------------------------------------------------- timesteps


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("steps_offset", [0, 1])
def test_timesteps_every_count(spacing, steps_offset):
    ref = diffusers.DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    ours = DDIMScheduler(timestep_spacing=spacing, steps_offset=steps_offset)
    for n in range(1, 1001):
        ref.set_timesteps(n)
        if int(ref.timesteps.max()) >= 1000:  # diffusers would index past the table at step time
            with pytest.raises(ValueError, match="outside"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64
        if len(ref.timesteps) == n + 1:
            # diffusers' float arange overshoots for some n and appends t = -1; we keep the n real steps.
            assert spacing == "trailing" and int(ref.timesteps[-1]) == -1, n
            torch.testing.assert_close(ours.timesteps, ref.timesteps[:n], rtol=0, atol=0)
        else:
            torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0, msg=f"n={n}")


def test_ddpm_prev_timestep_leading():
    """DDPM with fewer steps jumps t -> t - T // n (leading), like diffusers' custom num_inference_steps."""
    sched = DDPMScheduler()
    sched.set_timesteps(50)
    prev = sched.timesteps - 1000 // 50
    torch.testing.assert_close(sched.prev_timesteps[:-1], prev[:-1], rtol=0, atol=0)
    assert int(sched.prev_timesteps[-1]) == -1


# ------------------------------------------------------------------------------------------- DDIM


@pytest.mark.parametrize("n", [1, 7, 25, 50])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_deterministic(spacing, n):
    run_ddim({**SD, "timestep_spacing": spacing}, n)


@pytest.mark.parametrize("eta", [0.5, 1.0])
@pytest.mark.parametrize("spacing", SPACINGS)
def test_ddim_eta(spacing, eta):
    run_ddim({**SD, "timestep_spacing": spacing}, 25, eta)


@pytest.mark.parametrize(
    "options",
    [
        {"set_alpha_to_one": False},
        {"set_alpha_to_one": True, "steps_offset": 1},
        {"clip_sample": True},
        {"clip_sample": True, "clip_sample_range": 2.5},
        {"prediction_type": "v_prediction"},
        {"prediction_type": "sample", "clip_sample": True},
        {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02},
        {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:60],
)
@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_ddim_options(options, eta):
    run_ddim({**SD, **options}, 25, eta)


def test_ddim_zero_snr_eta_one_first_step_is_finite():
    """At t = T-1 with zero terminal SNR and eta = 1 the direction term is sqrt(0); diffusers' rounding
    makes it sqrt(-tiny) = NaN, ours clamps that rounding. Expected value from diffusers' own pieces."""
    config = {
        **SD,
        "prediction_type": "v_prediction",
        "rescale_betas_zero_snr": True,
        "timestep_spacing": "trailing",
    }
    ours, ref = _pair(config, 25)
    gen = torch.Generator().manual_seed(9)
    x, v, z = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    t, t_prev = ref.timesteps[0], ref.timesteps[0] - 1000 // 25
    x0 = ref.step(v, t, x, eta=1.0, variance_noise=z).pred_original_sample
    expected = ref.alphas_cumprod[t_prev] ** 0.5 * x0 + ref._get_variance(t, t_prev) ** 0.5 * z
    torch.testing.assert_close(
        ours.step(v, torch.tensor(0), x, noise=z, eta=1.0), expected, rtol=RTOL, atol=ATOL
    )


# ------------------------------------------------------------------------------------------- DDPM


def test_ddpm_noise_matches_diffusers_draw():
    """Our per-step torch.randn from an identically seeded generator reproduces diffusers' draw."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(3):
        torch.testing.assert_close(
            randn_tensor(SHAPE, generator=g1), torch.randn(SHAPE, generator=g2), rtol=0, atol=0
        )


@pytest.mark.parametrize("n", [1000, 50])
@pytest.mark.parametrize(
    "variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"]
)
def test_ddpm_variance_types(variance_type, n):
    config = {**SD, "variance_type": variance_type}
    # diffusers 0.42 takes sqrt of log(beta_t) for fixed_large_log (NaN); the name means sigma^2 = beta_t,
    # i.e. the same noise as fixed_large, which is what we compare against.
    ref_config = {**config, "variance_type": "fixed_large"} if variance_type == "fixed_large_log" else None
    run_ddpm(config, n, ref_config)


@pytest.mark.parametrize(
    "options",
    [
        {},  # diffusers defaults: linear betas, clip_sample=True
        {"steps_offset": 1, "variance_type": "fixed_large"},  # noise at t = 1 although t_prev = -1
        {"timestep_spacing": "trailing"},
        {"timestep_spacing": "linspace", "variance_type": "fixed_large"},
        {"prediction_type": "v_prediction", "clip_sample": False},
        {"prediction_type": "sample", "clip_sample": True, "beta_schedule": "squaredcos_cap_v2"},
        {
            "prediction_type": "v_prediction",
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "clip_sample": False,
            **{k: v for k, v in SD.items() if k != "clip_sample"},
        },
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items())[:60] or "defaults",
)
def test_ddpm_options(options):
    run_ddpm(options, 50)


# ------------------------------------------------------------------------------------------- linear form


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("kind,eta", [("ddim", 0.0), ("ddim", 0.7), ("ddim", 1.0), ("ddpm", 0.0)])
def test_coefficients_equal_step(kind, eta, prediction_type):
    config = {
        **SD,
        "prediction_type": prediction_type,
        "set_alpha_to_one": False,
        "timestep_spacing": "trailing",
    }
    sched = load_scheduler(config, kind=kind)
    sched.set_timesteps(25)
    gen = torch.Generator().manual_seed(0)
    for i in range(25):
        x, m, z = (torch.randn(SHAPE, generator=gen) for _ in range(3))
        idx = torch.tensor(i)
        c = sched.coefficients(idx, eta=eta)
        assert c.shape == (3,) and c.dtype == torch.float32
        expected = sched.step(m, idx, x, noise=z, eta=eta)
        torch.testing.assert_close(
            c[0] * x + c[1] * m + c[2] * z,
            expected,
            rtol=1e-5,
            atol=2e-5,
            msg=lambda msg, i=i: f"step {i}: {msg}",
        )


def test_coefficients_reject_clipping():
    sched = DDIMScheduler(clip_sample=True)
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="clip_sample"):
        sched.coefficients(torch.tensor(0))


def test_step_keeps_dtype_and_computes_in_fp32():
    sched = DDIMScheduler(**SD)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(1)
    x, m = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    out = sched.step(m.bfloat16(), torch.tensor(3), x.bfloat16())
    assert out.dtype == torch.bfloat16
    ref = sched.step(m.bfloat16().float(), torch.tensor(3), x.bfloat16().float())
    torch.testing.assert_close(out, ref.bfloat16(), rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- training helpers


@pytest.mark.parametrize(
    "cls,ref_cls", [(DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler)]
)
def test_add_noise_and_velocity(cls, ref_cls):
    config = {**SD, "rescale_betas_zero_snr": True}
    ours, ref = cls.from_config(config), ref_cls(**config)
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(SHAPE, generator=gen), torch.randn(SHAPE, generator=gen)
    timesteps = torch.tensor([999, 17])
    torch.testing.assert_close(
        ours.add_noise(x0, noise, timesteps), ref.add_noise(x0, noise, timesteps), rtol=RTOL, atol=ATOL
    )
    torch.testing.assert_close(
        ours.get_velocity(x0, noise, timesteps), ref.get_velocity(x0, noise, timesteps), rtol=RTOL, atol=ATOL
    )
    assert ours.add_noise(x0.bfloat16(), noise.bfloat16(), timesteps).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="timesteps"):
        ours.add_noise(x0, noise, torch.tensor([1, 2, 3]))


# ------------------------------------------------------------------------------------------- config / loading


@pytest.mark.parametrize(
    "cls,ref_cls", [(DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler)]
)
def test_from_empty_config_equals_diffusers_defaults(cls, ref_cls):
    ours, ref = cls.from_config({}), ref_cls()
    for name, value in ours.config.to_dict().items():
        if name in ref.config:
            assert ref.config[name] == value, name
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
    ours.set_timesteps(50)
    ref.set_timesteps(50)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, rtol=0, atol=0)
    assert ours.init_noise_sigma == ref.init_noise_sigma == 1.0
    assert ours.order == ref.order == 1
    x = torch.ones(2)
    assert ours.scale_model_input(x, ours.timesteps[0]) is x


def test_load_from_diffusers_folders(tmp_path):
    ddim_config = {**SD, "prediction_type": "v_prediction", "steps_offset": 1, "set_alpha_to_one": False}
    diffusers.DDIMScheduler(**ddim_config).save_pretrained(tmp_path / "scheduler")
    saved = json.loads((tmp_path / "scheduler" / SCHEDULER_CONFIG_NAME).read_text())
    assert saved["_class_name"] == "DDIMScheduler"  # unknown keys below must be ignored
    for path in (tmp_path / "scheduler", tmp_path, tmp_path / "scheduler" / SCHEDULER_CONFIG_NAME):
        sched = load_scheduler(path)
        assert isinstance(sched, DDIMScheduler)
        assert sched.config == SchedulerConfig.from_dict(ddim_config)
    # --sampler ddpm: same betas, other update rule.
    ddpm = load_scheduler(tmp_path, kind="ddpm")
    assert isinstance(ddpm, DDPMScheduler)
    torch.testing.assert_close(ddpm.betas, sched.betas, rtol=0, atol=0)
    diffusers.DDPMScheduler(variance_type="fixed_large").save_pretrained(tmp_path / "ddpm")
    assert load_scheduler(tmp_path / "ddpm").config.variance_type == "fixed_large"


@pytest.mark.parametrize(
    "cls,ref_cls", [(DDIMScheduler, diffusers.DDIMScheduler), (DDPMScheduler, diffusers.DDPMScheduler)]
)
def test_save_pretrained_loads_in_diffusers(tmp_path, cls, ref_cls):
    ours = cls(**SD, timestep_spacing="trailing", steps_offset=1)
    ours.save_pretrained(tmp_path)
    ref = ref_cls.from_pretrained(tmp_path)
    for name, value in ours.to_diffusers_config().items():
        if not name.startswith("_"):
            assert ref.config[name] == value, name


@pytest.mark.parametrize(
    "bad,match",
    [
        ({"thresholding": True}, "thresholding"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule"),
        ({"variance_type": "learned_range"}, "variance_type"),
        ({"variance_type": "learned"}, "variance_type"),
        ({"variance_type": "huge"}, "variance_type"),
        ({"timestep_spacing": "karras"}, "timestep_spacing"),
        ({"trained_betas": [0.1, 0.2]}, "trained_betas"),
        ({"clip_sample": "yes"}, "clip_sample"),
        ({"num_train_timesteps": 0}, "num_train_timesteps"),
        ({"steps_offset": -1}, "steps_offset"),
    ],
)
def test_bad_configs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        load_scheduler({"_class_name": "DDPMScheduler", **bad})


def test_bad_loads_and_calls_raise(tmp_path):
    with pytest.raises(ValueError, match="PNDMScheduler"):
        load_scheduler({"_class_name": "PNDMScheduler"})
    with pytest.raises(ValueError, match="None"):
        load_scheduler({})
    assert isinstance(
        load_scheduler({"_class_name": "PNDMScheduler", "skip_prk_steps": True}, kind="ddim"), DDIMScheduler
    )
    with pytest.raises(ValueError, match="kind"):
        load_scheduler({}, kind="euler")
    with pytest.raises(FileNotFoundError):
        load_scheduler(tmp_path / "missing")
    with pytest.raises(TypeError, match="typo_field"):
        DDIMScheduler(typo_field=1)

    ddim, ddpm = DDIMScheduler(), DDPMScheduler()
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(x, torch.tensor(0), x)
    for bad_n in (0, 1001):
        with pytest.raises(ValueError, match="num_inference_steps"):
            ddim.set_timesteps(bad_n)
    ddim.set_timesteps(10)
    ddpm.set_timesteps(10)
    with pytest.raises(ValueError, match="noise"):
        ddim.step(x, torch.tensor(0), x, eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        ddim.step(x, torch.tensor(0), x, noise=x, eta=1.5)
    with pytest.raises(ValueError, match="noise"):
        ddpm.step(x, torch.tensor(0), x)
    with pytest.raises(ValueError, match="eta"):
        ddpm.step(x, torch.tensor(0), x, noise=x, eta=0.5)
    with pytest.raises(ValueError, match="int64"):
        ddim.step(x, torch.tensor([0]), x)
    with pytest.raises(ValueError, match="int64"):
        ddim.step(x, torch.tensor(0, dtype=torch.int32), x)
    with pytest.raises(ValueError, match="outside"):
        ddim.step(x, 10, x)


# ------------------------------------------------------------------------------------------- no host sync


def _host_sync(*args, **kwargs):
    raise AssertionError("scheduler step synchronised with the host")


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_step_never_reads_tensor_values(monkeypatch, kind):
    sched = load_scheduler({**SD, "clip_sample": True}, kind=kind)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(4)
    x, m, z = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    idx = torch.tensor(9)
    eta = 0.5 if kind == "ddim" else 0.0
    expected = sched.step(m, idx, x, noise=z, eta=eta)
    for name in ("item", "tolist", "numpy", "__bool__", "__int__", "__index__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, _host_sync)
    out = sched.step(m, idx, x, noise=z, eta=eta)
    monkeypatch.undo()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_step_compiles_without_graph_break(kind):
    """fullgraph=True raises on any graph break (.item(), data-dependent branch), the proxy for capture."""
    import torch._dynamo

    torch._dynamo.reset()
    sched = load_scheduler({**SD, "clip_sample": True}, kind=kind)
    sched.set_timesteps(10)
    eta = 0.5 if kind == "ddim" else 0.0

    linear = load_scheduler(SD, kind=kind)
    linear.set_timesteps(10)

    def step(m, idx, x, z):
        return sched.step(m, idx, x, noise=z, eta=eta), linear.coefficients(idx, eta=eta)

    compiled = torch.compile(step, fullgraph=True, backend="eager", dynamic=False)
    gen = torch.Generator().manual_seed(5)
    x, m, z = (torch.randn(SHAPE, generator=gen) for _ in range(3))
    for i in (0, 9):  # a second index must reuse the graph (the index is data, not a constant)
        idx = torch.tensor(i)
        out, coefficients = compiled(m, idx, x, z)
        torch.testing.assert_close(out, sched.step(m, idx, x, noise=z, eta=eta), rtol=0, atol=0)
        torch.testing.assert_close(coefficients, linear.coefficients(idx, eta=eta), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_step_cuda_graph_capture(kind):
    sched = load_scheduler(SD, kind=kind)
    sched.set_timesteps(25, device="cuda")
    eta = 1.0 if kind == "ddim" else 0.0
    gen = torch.Generator(device="cuda").manual_seed(6)
    x, m, z = (torch.randn(SHAPE, device="cuda", generator=gen) for _ in range(3))
    idx = torch.zeros((), dtype=torch.int64, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside capture
        sched.step(m, idx, x, noise=z, eta=eta)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sched.step(m, idx, x, noise=z, eta=eta)
    for i in (0, 13, 24):
        idx.fill_(i)
        graph.replay()
        torch.testing.assert_close(
            out, sched.step(m, torch.tensor(i, device="cuda"), x, noise=z, eta=eta), rtol=0, atol=0
        )


def test_default_scheduler_is_sds_scaled_linear_schedule():
    """The engine's default schedule equals diffusers' schedulers configured like Stable Diffusion."""
    import diffusers

    from pdengine.engine.schedulers import SD_SCHEDULE, default_scheduler

    for kind, ref_cls in (("ddpm", diffusers.DDPMScheduler), ("ddim", diffusers.DDIMScheduler)):
        ours = default_scheduler(kind)
        ref = ref_cls.from_config(SD_SCHEDULE)  # from_config drops fields the class does not have
        assert ours.config.beta_schedule == "scaled_linear" and ours.config.num_train_timesteps == 1000
        torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, rtol=0, atol=0)
