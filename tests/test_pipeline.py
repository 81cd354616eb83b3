"""The PixelDance pipeline: parity with diffusers' TextToVideoSDPipeline, c_image layout, the tau rule,
long-video chaining, seeds and batching."""

import numpy as np
import pytest
import torch

from pdengine.engine.conditioning import build_c_image, unet_input
from pdengine.engine.convert import convert_model
from pdengine.engine.pipeline import PixelDancePipeline, SampleSettings


@pytest.fixture(scope="module")
def converted_dir(tiny_modelscope_dir, tmp_path_factory):
    return convert_model(tiny_modelscope_dir, tmp_path_factory.mktemp("conv") / "pd", source="modelscope")


@pytest.fixture(scope="module")
def pipe(tiny_pipeline_dir):
    return PixelDancePipeline.from_pretrained(tiny_pipeline_dir)


def test_matches_diffusers_text_to_video_pipeline(tiny_modelscope_dir, converted_dir):
    """A ModelScope model converted with zero c_image channels reproduces TextToVideoSDPipeline frame for
    frame (DDIM, eta 0, CFG 7.5, same seed) in fp32."""
    from diffusers import TextToVideoSDPipeline

    ref = TextToVideoSDPipeline.from_pretrained(tiny_modelscope_dir)
    ref.set_progress_bar_config(disable=True)
    prompt, seed = "a red circle moves to the left", 11
    kwargs = dict(num_frames=3, height=64, width=48, num_inference_steps=4, guidance_scale=7.5)
    expected_latents = ref(prompt, generator=torch.Generator().manual_seed(seed), output_type="latent",
                           **kwargs).frames
    expected_video = ref(prompt, generator=torch.Generator().manual_seed(seed), output_type="pt", **kwargs).frames

    ours = PixelDancePipeline.from_pretrained(converted_dir)
    settings = SampleSettings(num_frames=3, height=64, width=48, steps=4, guidance=7.5)
    latents = ours.sample_clip([prompt], [None], [None], [torch.Generator().manual_seed(seed)], settings)
    torch.testing.assert_close(latents, expected_latents, rtol=1e-4, atol=1e-5)
    video = ours.generate([prompt], [None], [None], [seed], settings)  # (B, 3, F, H, W) in [-1, 1]
    got = ((video + 1) / 2).clamp(0, 1).permute(0, 2, 1, 3, 4)  # diffusers: (B, F, 3, H, W) in [0, 1]
    torch.testing.assert_close(got, expected_video.float(), rtol=1e-4, atol=1e-4)


def test_c_image_layout():
    gen = torch.Generator().manual_seed(0)
    first, last = torch.randn(2, 4, 3, 5, generator=gen), torch.randn(2, 4, 3, 5, generator=gen)
    c = build_c_image(first, last, 6)
    assert c.shape == (2, 4, 6, 3, 5)
    assert torch.equal(c[:, :, 0], first) and torch.equal(c[:, :, -1], last)
    assert not c[:, :, 1:-1].any()
    assert not build_c_image(None, last, 4)[:, :, 0].any()
    assert build_c_image(None, None, 2, shape=(1, 4, 3, 5)).shape == (1, 4, 2, 3, 5)
    with pytest.raises(ValueError, match="at least 2 frames"):
        build_c_image(first, last, 1)
    z = torch.randn(2, 4, 6, 3, 5, generator=gen)
    x = unet_input(z, build_c_image(first, None, 6), build_c_image(None, last, 6), torch.tensor([1, 0]))
    assert torch.equal(x[:, :4], z)
    assert torch.equal(x[0, 4:], c[0])
    assert torch.equal(x[1, 4:], build_c_image(first, None, 6)[1])


class SpyUNet(torch.nn.Module):
    """Records the UNet inputs of every step and predicts zeros-ish noise (a fixed linear map)."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.calls = unet, []
        self.config = unet.config

    def forward(self, x, t, ctx, cond_features=None):
        self.calls.append((x.clone(), t.clone(), ctx.clone()))
        return self.unet(x, t, ctx, cond_features=cond_features)

    def condition_features(self, c_image):
        return self.unet.condition_features(c_image)


def test_tau_rule_and_cfg_halves(pipe, tiny_pipeline_dir):
    """Last-frame instruction present for steps < tau only; c_image identical in both CFG halves; the
    unconditional half sees the empty prompt's embedding."""
    spy = SpyUNet(pipe.unet)
    pipe.unet = spy
    try:
        gen = torch.Generator().manual_seed(1)
        first, last = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
        settings = SampleSettings(num_frames=3, height=64, width=64, steps=5, guidance=3.0, tau=2)
        pipe.sample_clip(["a", "b"], [first, first], [last, None],
                         [torch.Generator().manual_seed(s) for s in (0, 1)], settings, cache_conditioning=False)
    finally:
        pipe.unet = spy.unet
    assert len(spy.calls) == 5
    empty = pipe.encode_text([""])[0]
    for i, (x, t, ctx) in enumerate(spy.calls):
        assert x.shape == (4, 8, 3, 8, 8)  # [uncond video 0, uncond video 1, cond 0, cond 1]
        torch.testing.assert_close(x[:2], x[2:], rtol=0, atol=0)  # same latents and c_image in both halves
        torch.testing.assert_close(ctx[0], empty)
        assert torch.equal(x[0, 4:, 0], first) and torch.equal(x[1, 4:, 0], first)
        assert not x[:, 4:, 1].any()
        expect_last = last if i < 2 else torch.zeros_like(last)
        assert torch.equal(x[0, 4:, -1], expect_last), i
        assert not x[1, 4:, -1].any()  # video 1 has no last-frame instruction at all
        assert torch.equal(t, t[:1].expand(4))
    assert spy.calls[0][1][0] > spy.calls[-1][1][0]  # timesteps decrease


def test_cached_conditioning_equals_the_full_input(pipe):
    """conv_in is linear: its c_image response computed once and mixed with the tau mask per step gives
    the same videos as feeding [z_t ; c_image] every step."""
    gen = torch.Generator().manual_seed(4)
    first, last = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    settings = SampleSettings(num_frames=3, height=64, width=64, steps=4, guidance=3.0, tau=2)
    args = (["a", "b"], [first, None], [last, last])
    cached = pipe.sample_clip(*args, [torch.Generator().manual_seed(s) for s in (0, 1)], settings)
    full = pipe.sample_clip(*args, [torch.Generator().manual_seed(s) for s in (0, 1)], settings,
                            cache_conditioning=False)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_guidance_off_runs_single_batch(pipe):
    spy = SpyUNet(pipe.unet)
    pipe.unet = spy
    try:
        settings = SampleSettings(num_frames=2, height=64, width=64, steps=2, guidance=1.0)
        pipe.sample_clip(["a"], [None], [None], [torch.Generator().manual_seed(0)], settings)
    finally:
        pipe.unet = spy.unet
    assert all(x.shape[0] == 1 for x, _, _ in spy.calls)


def test_seeds_and_batching_are_reproducible(pipe):
    settings = SampleSettings(num_frames=2, height=64, width=64, steps=2, guidance=2.0, sampler="ddpm")
    both = pipe.generate(["x", "y"], [None, None], [None, None], [5, 6], settings)
    alone = pipe.generate(["y"], [None], [None], [6], settings)
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    again = pipe.generate(["x", "y"], [None, None], [None, None], [5, 6], settings)
    assert torch.equal(both, again)
    assert not torch.allclose(both[0], both[1])


def test_long_video_chains_last_frame_into_next_clip(pipe, monkeypatch):
    settings = SampleSettings(num_frames=3, height=64, width=64, steps=2, guidance=2.0)
    firsts_seen, lasts_seen = [], []
    original = PixelDancePipeline.sample_clip

    def spy(self, prompts, first_latents, last_latents, generators, s, on_step=None):
        firsts_seen.append(first_latents)
        lasts_seen.append(last_latents)
        return original(self, prompts, first_latents, last_latents, generators, s, on_step)

    monkeypatch.setattr(PixelDancePipeline, "sample_clip", spy)
    img = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    video = pipe.generate(["go"], [img], [img], [0], settings, clips=3)
    assert video.shape == (1, 3, 3 + 2 * 2, 64, 64)
    assert len(firsts_seen) == 3
    # Clip k+1's first-frame instruction is the VAE latent of clip k's last decoded frame, which is
    # also frame 2k+2 of the joined video.
    for k in (1, 2):
        expected = pipe.encode_images(video[:, :, 2 * k].clamp(-1, 1))[0]
        torch.testing.assert_close(firsts_seen[k][0], expected, rtol=1e-4, atol=1e-5)
    assert lasts_seen[0] == [None] and lasts_seen[1] == [None] and lasts_seen[2][0] is not None


def test_decode_in_chunks_equals_whole(pipe):
    lat = torch.randn(1, 4, 5, 8, 8, generator=torch.Generator().manual_seed(3))
    whole = pipe.decode(lat, frames_per_chunk=5)
    chunked = pipe.decode(lat, frames_per_chunk=2)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert whole.shape == (1, 3, 5, 64, 64)


def test_bad_settings_raise(pipe):
    gens = [torch.Generator().manual_seed(0)]
    for bad, msg in [
        (SampleSettings(num_frames=1, height=64, width=64), "frames"),
        (SampleSettings(height=60, width=64), "multiple of 8"),
        (SampleSettings(height=64, width=64, steps=4, tau=5), "tau"),
        (SampleSettings(height=64, width=64, sampler="euler"), "sampler"),
        (SampleSettings(height=64, width=64, sampler="ddpm", eta=0.5), "eta"),
    ]:
        with pytest.raises(ValueError, match=msg):
            pipe.sample_clip(["a"], [None], [None], gens, bad)


def test_modelscope_folder_needs_conversion(tiny_modelscope_dir, converted_dir):
    from pdengine.engine.pipeline import ModelFolderError

    with pytest.raises(ModelFolderError, match="pdengine convert --from modelscope"):
        PixelDancePipeline.from_pretrained(tiny_modelscope_dir)
    from pdengine.model import UNet3D

    unet = UNet3D.from_pretrained(converted_dir / "unet")
    assert unet.config["in_channels"] == 8 and not unet.conv_in.weight[:, 4:].any()
    assert np.isfinite(unet.conv_in.weight.detach().numpy()).all()


@pytest.mark.parametrize(
    "settings",
    [
        SampleSettings(num_frames=3, height=64, width=64, steps=4, guidance=3.0, tau=2),
        SampleSettings(num_frames=2, height=64, width=64, steps=3, guidance=1.0),
        SampleSettings(num_frames=3, height=64, width=64, steps=3, guidance=2.0, sampler="ddpm", tau=1),
        SampleSettings(num_frames=3, height=64, width=64, steps=3, guidance=2.0, eta=0.7),
    ],
)
def test_static_sampler_equals_reference_sampler(pipe, settings):
    """The static-buffer step (what a CUDA graph captures; eager here) equals the reference loop, including
    the device-side tau switch, CFG off, and stochastic steps fed from the same generators."""
    gen = torch.Generator().manual_seed(6)
    first, last = torch.randn(4, 8, 8, generator=gen), torch.randn(4, 8, 8, generator=gen)
    args = (["a", "b"], [first, None], [last, last])

    def gens():
        return [torch.Generator().manual_seed(s) for s in (3, 4)]

    ref = pipe.sample_clip(*args, gens(), settings, static=False)
    static = pipe.sample_clip(*args, gens(), settings, static=True)
    torch.testing.assert_close(static, ref, rtol=1e-4, atol=1e-5)
    again = pipe.sample_clip(*args, gens(), settings, static=True)  # buffers reused: same result
    torch.testing.assert_close(again, static, rtol=0, atol=0)
    # A partial run (the benches' warm-up: `steps=1`) leaves nothing behind that changes the next full run.
    (sampler,) = [sp for sp in pipe._samplers.values() if (sp.bucket.frames, sp.bucket.steps, sp.bucket.sampler,
                                                           sp.bucket.eta, sp.bucket.cfg) ==
                  (settings.num_frames, settings.steps, settings.sampler, settings.eta, settings.guidance > 1.0)]
    feat = torch.randn_like(sampler.feat_first)
    partial = sampler.run(torch.randn_like(sampler.latents), torch.randn(2, *sampler.context.shape[1:]),
                          torch.randn(2, *sampler.context.shape[1:]) if sampler.bucket.cfg else None, feat, feat,
                          torch.ones(2, dtype=torch.bool), tau=1, guidance=5.0,
                          step_noise=lambda i: torch.randn_like(sampler.latents), steps=1)
    assert partial.shape == static.shape[:1] + sampler.latents.shape[1:]
    after = pipe.sample_clip(*args, gens(), settings, static=True)
    torch.testing.assert_close(after, static, rtol=0, atol=0)


def test_static_sampler_with_compiled_unet_equals_uncompiled(pipe):
    """`--compile`: the static step with the UNet under torch.compile (the aot_eager backend here: the same
    tracing, no code generation) gives the uncompiled result."""
    settings = SampleSettings(num_frames=3, height=64, width=64, steps=3, guidance=3.0, tau=1)
    args = (["a"], [None], [None])
    plain = pipe.sample_clip(*args, [torch.Generator().manual_seed(2)], settings, static=True)
    pipe.compile_backend = "aot_eager"
    try:
        compiled = pipe.sample_clip(*args, [torch.Generator().manual_seed(2)], settings, static=True)
    finally:
        pipe.compile_backend = None
    assert any(key[2] == "aot_eager" for key in pipe._samplers)
    torch.testing.assert_close(compiled, plain, rtol=1e-4, atol=1e-5)


def test_compile_modes_inside_the_sampler_graph_drop_inductor_graphs():
    from pdengine.engine.graph_sampler import compile_mode_inside_graph

    assert compile_mode_inside_graph("max-autotune") == "max-autotune-no-cudagraphs"
    assert compile_mode_inside_graph("reduce-overhead") == "default"
    assert compile_mode_inside_graph("default") == "default" and compile_mode_inside_graph(None) is None


@pytest.mark.gpu
@pytest.mark.parametrize("transformer", ["cublas", "fused"])
def test_cuda_graph_replay_equals_eager_and_never_syncs(tiny_pipeline_dir, gpu, transformer):
    """With the Triton kernels (backend "auto" on CUDA), also with the transformers' GEMMs fused: their folded
    weights are made in the warm-up, before capture."""
    from pdengine.kernels.fused_linear import transformer_gemm

    pipe_gpu = PixelDancePipeline.from_pretrained(tiny_pipeline_dir, device=gpu, backend="auto")
    settings = SampleSettings(num_frames=4, height=64, width=64, steps=5, guidance=4.0, tau=2)
    args = (["a", "b"], [None, None], [None, None])

    def gens():
        return [torch.Generator().manual_seed(s) for s in (1, 2)]

    with transformer_gemm(transformer):
        pipe_gpu.use_cuda_graph = False
        eager = pipe_gpu.sample_clip(*args, gens(), settings, static=True)
        pipe_gpu.use_cuda_graph = True
        graphed = pipe_gpu.sample_clip(*args, gens(), settings, static=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-3, atol=1e-3)
    sampler = next(s for (b, g, _), s in pipe_gpu._samplers.items() if g)
    assert sampler.graph is not None
    torch.cuda.set_sync_debug_mode("error")
    try:
        sampler.graph.replay()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_encode_in_chunks_equals_whole(pipe):
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(5)) * 2 - 1
    torch.testing.assert_close(pipe.encode_images(images, images_per_chunk=2),
                               pipe.encode_images(images, images_per_chunk=5), rtol=1e-5, atol=1e-5)


def test_fp16_keeps_a_force_upcast_vae_in_fp32(tiny_pipeline_dir):
    """A VAE whose config says it overflows in fp16 (`force_upcast`, as SD-family VAEs do) encodes and decodes
    in fp32 in an fp16 pipeline, handing back fp16 latents; the UNet and text encoder stay fp16."""
    pipe = PixelDancePipeline.from_pretrained(tiny_pipeline_dir, dtype=torch.float16)
    assert pipe.vae.config.force_upcast and pipe.vae.dtype == torch.float32
    assert next(pipe.unet.parameters()).dtype == torch.float16
    lat = pipe.encode_images(torch.zeros(2, 3, 64, 64))
    assert lat.dtype == torch.float16
    video = pipe.decode(lat.permute(1, 0, 2, 3)[None])  # (1, C, F=2, h, w)
    assert video.dtype == torch.float32 and video.shape[2] == 2 and torch.isfinite(video).all()
