"""The PixelDance pipeline: a diffusers-style model folder loaded into frozen components, and the
reference sampler (batched classifier-free guidance, the tau rule for the last frame, long videos made
clip by clip).

Model folder: `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .conditioning import build_c_image, unet_input

PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    # part -> alternatives, each a tuple of files that must all exist
    "unet": (("config.json",),),
    "vae": (("config.json",),),
    "text_encoder": (("config.json",),),
    "tokenizer": (("vocab.json", "merges.txt"), ("tokenizer.json",)),
    "scheduler": (("scheduler_config.json",),),
}


def decode_frames(vae, frames: torch.Tensor, dtype: torch.dtype, frames_per_chunk: int = 8) -> torch.Tensor:
    """Unscaled latent frames (N, C, h, w) -> images (N, 3, H, W) float32 through `vae.decode`, a few frames at
    a time (memory stays bounded; the VAE treats frames independently, so chunking is exact). On CUDA the
    chunks go in channels_last: cuDNN's convolutions in the decoder then run NHWC kernels without transposes
    (the VAE's weights are converted when the pipeline loads it)."""
    fmt = torch.channels_last if frames.is_cuda else torch.contiguous_format
    out = [vae.decode(chunk.to(dtype).contiguous(memory_format=fmt)).sample.float()
           for chunk in frames.split(max(1, frames_per_chunk))]
    return torch.cat(out)


class ModelFolderError(ValueError):
    """A model folder that is missing a part or has a malformed one; the message names the part."""


def check_model_folder(path: str | Path) -> dict:
    """Verify the folder layout without loading weights; returns model_index.json's content."""
    root = Path(path)
    if not root.is_dir():
        raise ModelFolderError(f"model folder {root} does not exist")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelFolderError(f"model folder {root}: missing model_index.json")
    try:
        index = json.loads(index_path.read_text())
    except json.JSONDecodeError as e:
        raise ModelFolderError(f"model folder {root}: model_index.json is not valid JSON ({e})") from None
    if not isinstance(index, dict):
        raise ModelFolderError(f"model folder {root}: model_index.json must hold a JSON object")
    for part, alternatives in PARTS.items():
        part_dir = root / part
        if not part_dir.is_dir():
            raise ModelFolderError(f"model folder {root}: missing part '{part}/'")
        if not any(all((part_dir / f).is_file() for f in files) for files in alternatives):
            want = " or ".join("+".join(files) for files in alternatives)
            raise ModelFolderError(f"model folder {root}: part '{part}/' lacks {want}")
        for f in part_dir.glob("*.json"):
            try:
                json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise ModelFolderError(f"model folder {root}: part '{part}/': {f.name} is not valid JSON ({e})") \
                    from None
    return index


@dataclass
class SampleSettings:
    """Everything that shapes one denoising run (the CLI's flags)."""

    num_frames: int = 16
    height: int = 256
    width: int = 256
    steps: int = 50
    sampler: str = "ddim"  # "ddim" | "ddpm"
    eta: float = 0.0
    guidance: float = 7.5
    tau: int | None = None  # steps that use the last-frame instruction; None -> steps // 2

    def resolved_tau(self) -> int:
        return self.steps // 2 if self.tau is None else self.tau

    def validate(self, vae_scale_factor: int = 8) -> None:
        if self.num_frames < 2:
            raise ValueError(f"frames must be >= 2, got {self.num_frames}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v <= 0 or v % vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {vae_scale_factor}, got {v}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if not 0 <= self.eta <= 1:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")
        if self.sampler == "ddpm" and self.eta != 0:
            raise ValueError("eta applies to the DDIM sampler only")
        if self.guidance < 0:
            raise ValueError(f"guidance must be >= 0, got {self.guidance}")
        tau = self.resolved_tau()
        if not 0 <= tau <= self.steps:
            raise ValueError(f"tau must be between 0 and steps ({self.steps}), got {tau}")


def denoise(
    unet: torch.nn.Module,
    scheduler,
    latents: torch.Tensor,
    text: torch.Tensor,
    uncond: torch.Tensor | None,
    c_first: torch.Tensor,
    c_last: torch.Tensor,
    has_last: torch.Tensor,
    *,
    guidance: float,
    tau: int,
    eta: float = 0.0,
    step_noise: Callable[[int], torch.Tensor] | None = None,
    on_step: Callable[[int], None] | None = None,
    cache_conditioning: bool = True,
) -> torch.Tensor:
    """PixelDance sampling loop (DDIM, Song et al. 2021 / DDPM, Ho et al. 2020) with text CFG.

    latents (B, C, F, h, w) = x_T; text/uncond (B, L, D); c_first/c_last (B, C, F, h, w) hold the
    first/last-frame slots of c_image; has_last (B,) marks videos with a last-frame instruction, which is
    used while the step index is below `tau` and zeros after (the paper's tau rule). Classifier-free
    guidance batches [uncond, cond] in one UNet call (diffusers' order); only the text is
    unconditioned: c_image is the same in both halves. Every per-step quantity is a device tensor.

    With `cache_conditioning`, conv_in's response to each instruction slot is computed once
    (`UNet3D.condition_features`) and mixed per step with the tau mask; the UNet then reads only the
    latent channels. Without it, the full `[z_t ; c_image]` input is built every step.
    """
    device = latents.device
    timesteps = scheduler.timesteps
    cfg = uncond is not None
    context = torch.cat([uncond, text]) if cfg else text
    tau_t = torch.tensor(tau, device=device)
    has_last = has_last.to(device=device, dtype=torch.bool)
    b, _, f = latents.shape[:3]
    if cache_conditioning:
        feat_first = unet.condition_features(c_first)
        feat_last = unet.condition_features(c_last)
    for i in range(len(timesteps)):
        step = torch.tensor(i, device=device, dtype=torch.long)
        t = timesteps.index_select(0, step.reshape(1))
        keep = has_last & (step < tau_t)
        if cache_conditioning:
            keep_rows = keep.to(feat_last.dtype).repeat_interleave(f).reshape(-1, 1, 1, 1)
            feats = feat_first + keep_rows * feat_last
            x, feats = (torch.cat([latents, latents]), torch.cat([feats, feats])) if cfg else (latents, feats)
            eps = unet(x, t.expand(x.shape[0]), context, cond_features=feats)
        else:
            x = unet_input(latents, c_first, c_last, keep)
            if cfg:
                x = torch.cat([x, x])
            eps = unet(x, t.expand(x.shape[0]), context)
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        noise = step_noise(i) if step_noise is not None else None
        latents = scheduler.step(eps, step, latents, noise=noise, eta=eta)
        if on_step is not None:
            on_step(i)
    return latents


class PixelDancePipeline:
    """Frozen components of a PixelDance model folder and the sampling entry points."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler_config: dict, *,
                 device: torch.device, dtype: torch.dtype):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler_config = scheduler_config
        self.device, self.dtype = device, dtype
        self._empty_embedding: torch.Tensor | None = None
        # The static-buffer sampler (CUDA-graph captured on GPUs) is the default on CUDA; `use_cuda_graph`
        # False runs the same static step eagerly (`--no-cuda-graph`).
        self.static_sampler = device.type == "cuda"
        self.use_cuda_graph = True
        self.compile_backend: str | None = None  # torch.compile the static sampler's UNet (`--compile`)
        self._samplers: dict = {}
        self._retired_capture_seconds = 0.0
        self.latent_channels = int(vae.config.latent_channels)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = float(vae.config.scaling_factor)
        shift = getattr(vae.config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, backend: str = "torch") -> PixelDancePipeline:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        from pdengine.model import UNet3D

        from .schedulers import read_scheduler_config

        root = Path(path)
        check_model_folder(root)
        device = torch.device(device)

        def part(name: str, load: Callable[[], object]):
            try:
                return load()
            except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
                raise ModelFolderError(f"model folder {root}: cannot load part '{name}/': {e}") from e

        vae = part("vae", lambda: AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype))
        unet = part("unet", lambda: UNet3D.from_pretrained(root / "unet", backend=backend, dtype=dtype))
        text_encoder = part("text_encoder", lambda: CLIPTextModel.from_pretrained(root / "text_encoder",
                                                                                   torch_dtype=dtype))
        tokenizer = part("tokenizer", lambda: CLIPTokenizer.from_pretrained(root / "tokenizer"))
        scheduler_config = part("scheduler", lambda: read_scheduler_config(root / "scheduler"))

        latent = int(vae.config.latent_channels)
        in_ch, out_ch = unet.config["in_channels"], unet.config["out_channels"]
        if in_ch == latent:
            raise ModelFolderError(
                f"model folder {root}: the unet has {in_ch} input channels, a text-to-video (ModelScope) model; "
                f"convert it first: pdengine convert --from modelscope {root} --out DIR"
            )
        if in_ch != 2 * latent or out_ch != latent:
            raise ModelFolderError(
                f"model folder {root}: unet has in/out channels {in_ch}/{out_ch}, a PixelDance model needs "
                f"{2 * latent}/{latent} for a VAE with {latent} latent channels"
            )
        if unet.config["cross_attention_dim"] != text_encoder.config.hidden_size:
            raise ModelFolderError(
                f"model folder {root}: unet cross_attention_dim {unet.config['cross_attention_dim']} != "
                f"text encoder hidden size {text_encoder.config.hidden_size}"
            )
        if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
            # The folder says its VAE overflows in fp16 (SD-family VAEs do: NaN, then black frames): it
            # encodes and decodes in fp32, as diffusers' pipelines do, and hands back fp16 latents.
            vae.to(torch.float32)
        for m in (unet, vae, text_encoder):
            m.requires_grad_(False).eval().to(device)
        if device.type == "cuda":
            vae.to(memory_format=torch.channels_last)
        return cls(unet, vae, text_encoder, tokenizer, scheduler_config, device=device, dtype=dtype)

    # ------------------------------------------------------------------ encoders
    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP hidden states (B, L, D), prompts padded to the tokenizer's max length. The empty
        prompt's embedding (the unconditional branch) is computed once and cached."""
        prompts = list(prompts)
        if prompts and all(p == "" for p in prompts):
            if self._empty_embedding is None:
                self._empty_embedding = self._encode(["" ])
            return self._empty_embedding.expand(len(prompts), -1, -1)
        return self._encode(prompts)

    def _encode(self, prompts: list[str]) -> torch.Tensor:
        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, images_per_chunk: int = 8) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> scaled VAE latents (B, C, H/8, W/8), a few images at a time so
        memory stays bounded. Uses the posterior mean (deterministic: the same instruction always gives the
        same latent)."""
        out = []
        for chunk in images.split(max(1, images_per_chunk)):
            posterior = self.vae.encode(chunk.to(self.device, self.vae.dtype)).latent_dist
            out.append(((posterior.mean - self.shift_factor) * self.scaling_factor).to(self.dtype))
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, frames_per_chunk: int = 8) -> torch.Tensor:
        """Latents (B, C, F, h, w) -> video (B, 3, F, H, W) float32 in [-1, 1], decoded a few frames at a
        time so memory stays bounded (the VAE treats frames independently, so chunking is exact)."""
        b, c, f, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        video = decode_frames(self.vae, flat / self.scaling_factor + self.shift_factor, self.vae.dtype,
                              frames_per_chunk)
        return video.reshape(b, f, *video.shape[1:]).permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ sampling
    @property
    def capture_seconds(self) -> float:
        """CUDA-graph capture time of every sampler this pipeline has built so far."""
        return self._retired_capture_seconds + sum(sp.capture_seconds for sp in self._samplers.values())

    def make_scheduler(self, settings: SampleSettings):
        from .schedulers import load_scheduler

        scheduler = load_scheduler(self.scheduler_config, kind=settings.sampler)
        scheduler.set_timesteps(settings.steps, device=self.device)
        return scheduler

    def _static_sampler(self, batch: int, latents: torch.Tensor, text: torch.Tensor, settings: SampleSettings):
        """The StaticSampler of this bucket, built (and captured) on first use, then reused."""
        from .graph_sampler import Bucket, StaticSampler

        _, c, f, h, w = latents.shape
        bucket = Bucket(batch, c, f, h, w, text.shape[1], text.shape[2], self.dtype, settings.steps,
                        settings.sampler, settings.eta, settings.guidance > 1.0)
        key = (bucket, self.use_cuda_graph, self.compile_backend)
        if key not in self._samplers:
            if self.device.type == "cuda" and self._samplers:
                # A captured graph holds its private memory pool while it lives: one bucket's at a time, so a
                # new bucket (the smaller last batch of a prompts file, say) never needs two pools' memory,
                # which `--batch-size auto` did not measure.
                self._retired_capture_seconds += sum(sp.capture_seconds for sp in self._samplers.values())
                self._samplers.clear()
                torch.cuda.empty_cache()
            self._samplers[key] = StaticSampler(self.unet, self.make_scheduler(settings), bucket, self.device,
                                                use_graph=self.use_cuda_graph, compile_backend=self.compile_backend)
        return self._samplers[key]

    @torch.no_grad()
    def sample_clip(
        self,
        prompts: Sequence[str],
        first_latents: Sequence[torch.Tensor | None],
        last_latents: Sequence[torch.Tensor | None],
        generators: Sequence[torch.Generator],
        settings: SampleSettings,
        on_step: Callable[[int], None] | None = None,
        cache_conditioning: bool = True,
        static: bool | None = None,
    ) -> torch.Tensor:
        """One clip per prompt -> latents (B, C, F, h, w). Instruction latents are (C, h, w) or None.
        Each video draws its initial noise (shape (1, C, F, h, w), fp32, on the CPU, like diffusers'
        `randn_tensor` with a CPU generator) and any step noise from its own generator."""
        b = len(prompts)
        if not (len(first_latents) == len(last_latents) == len(generators) == b):
            raise ValueError("prompts, instructions and generators must have the same length")
        settings.validate(self.vae_scale_factor)
        c, f = self.latent_channels, settings.num_frames
        h, w = settings.height // self.vae_scale_factor, settings.width // self.vae_scale_factor
        shape = (1, c, f, h, w)

        def draw() -> torch.Tensor:
            return torch.cat([torch.randn(shape, generator=g) for g in generators]).to(self.device, self.dtype)

        latents = draw()
        zeros = torch.zeros(c, h, w, device=self.device, dtype=self.dtype)
        firsts = torch.stack([x.to(self.device, self.dtype) if x is not None else zeros for x in first_latents])
        lasts = torch.stack([x.to(self.device, self.dtype) if x is not None else zeros for x in last_latents])
        c_first = build_c_image(firsts, None, f)
        c_last = build_c_image(None, lasts, f)
        has_last = torch.tensor([x is not None for x in last_latents], device=self.device)

        text = self.encode_text(prompts)
        uncond = self.encode_text([""] * b) if settings.guidance > 1.0 else None
        stochastic = settings.sampler == "ddpm" or settings.eta > 0
        static = self.static_sampler if static is None else static
        if static and cache_conditioning:
            sampler = self._static_sampler(b, latents, text, settings)
            return sampler.run(
                latents * sampler.scheduler.init_noise_sigma, text, uncond, self.unet.condition_features(c_first),
                self.unet.condition_features(c_last), has_last, tau=settings.resolved_tau(),
                guidance=settings.guidance, step_noise=(lambda i: draw()) if stochastic else None, on_step=on_step,
            )
        scheduler = self.make_scheduler(settings)
        latents = latents * scheduler.init_noise_sigma
        return denoise(
            self.unet, scheduler, latents, text, uncond, c_first, c_last, has_last,
            guidance=settings.guidance, tau=settings.resolved_tau(), eta=settings.eta,
            step_noise=(lambda i: draw()) if stochastic else None, on_step=on_step,
            cache_conditioning=cache_conditioning,
        )

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        first_images: Sequence[torch.Tensor | None],
        last_images: Sequence[torch.Tensor | None],
        seeds: Sequence[int],
        settings: SampleSettings,
        clips: int = 1,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Videos (B, 3, F', H, W) float32 in [-1, 1] from images (3, H, W) in [-1, 1] or None.

        Long videos (`clips` > 1) are made autoregressively: the last decoded frame of clip k is the
        first-frame instruction of clip k+1, and that repeated frame is dropped when the clips are
        joined, so F' = F + (clips - 1) * (F - 1). The last-frame instruction steers the final clip only.
        """
        if clips < 1:
            raise ValueError(f"clips must be >= 1, got {clips}")
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

        def encode(images: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
            present = [i for i, x in enumerate(images) if x is not None]
            out: list[torch.Tensor | None] = [None] * len(images)
            if present:
                lat = self.encode_images(torch.stack([images[i] for i in present]))
                for j, i in enumerate(present):
                    out[i] = lat[j]
            return out

        first_lat = encode(first_images)
        last_lat = encode(last_images)
        pieces = []
        for k in range(clips):
            final = k == clips - 1
            latents = self.sample_clip(prompts, first_lat, last_lat if final else [None] * len(prompts),
                                       generators, settings, on_step=on_step)
            video = self.decode(latents)
            pieces.append(video if k == 0 else video[:, :, 1:])
            if not final:
                first_lat = list(self.encode_images(video[:, :, -1].clamp(-1, 1)))
        return torch.cat(pieces, dim=2)
