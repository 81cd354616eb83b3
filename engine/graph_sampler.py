"""Static-shape sampler: one denoising step captured once as a CUDA graph and replayed every step.

Everything the step touches lives in buffers allocated once per bucket (batch, frames, latent size,
dtype, steps, sampler): the latents, the step noise, the [uncond; cond] text embeddings, conv_in's
response to the instruction slots (the conditioning cache), the per-video last-frame flag, and the step
counter, tau and guidance scale as device tensors. The step reads its timestep and scheduler
coefficients from device tables with the device step counter and increments that counter itself, so
one captured graph serves every step and the tau switch happens on the device.

Without a GPU (or with `use_graph=False`) the very same step function runs eagerly: that is the
`--no-cuda-graph` path, and what the CPU tests compare against the reference sampler.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from pdengine.model.layers import kernel_problem

logger = logging.getLogger("pdengine")


def compile_mode_inside_graph(mode: str | None) -> str | None:
    """The torch.compile mode to use for a UNet whose calls this sampler captures in its own CUDA graph:
    modes that make Inductor capture CUDA graphs of its own (which cannot nest inside ours) lose that part."""
    return {"max-autotune": "max-autotune-no-cudagraphs", "reduce-overhead": "default"}.get(mode, mode)


@dataclass(frozen=True)
class Bucket:
    batch: int
    channels: int
    frames: int
    height: int  # latent
    width: int  # latent
    text_len: int
    text_dim: int
    dtype: torch.dtype
    steps: int
    sampler: str
    eta: float
    cfg: bool


class StaticSampler:
    """Denoising loop over preallocated buffers; CUDA-graph captured when `use_graph` and on CUDA."""

    def __init__(self, unet: torch.nn.Module, scheduler, bucket: Bucket, device: torch.device,
                 use_graph: bool = True, fused_update: bool | None = None, compile_backend: str | None = None,
                 compile_mode: str | None = None):
        self.unet, self.scheduler, self.bucket = unet, scheduler, bucket
        self.device = torch.device(device)
        self.use_graph = use_graph and self.device.type == "cuda"
        # torch.compile of the UNet (e.g. "inductor"): compiled during the warm-up before capture; the Triton
        # kernels enter the compiled graph as opaque operators (pdengine::*), so nothing breaks the graph.
        self.compile_backend = compile_backend
        self.compile_mode = compile_mode_inside_graph(compile_mode) if self.use_graph else compile_mode
        if self.compile_mode != compile_mode:
            logger.info("pdengine sampler: compile mode %r -> %r inside the sampler's CUDA graph", compile_mode,
                        self.compile_mode)
        compile_mode = self.compile_mode
        self._unet_call = (torch.compile(unet, backend=compile_backend, mode=compile_mode, dynamic=False)
                           if compile_backend else unet)
        b, c, f, h, w = bucket.batch, bucket.channels, bucket.frames, bucket.height, bucket.width
        dt = bucket.dtype
        n = 2 * b if bucket.cfg else b
        c0 = unet.conv_in.out_channels
        kw = {"device": self.device}
        self.latents = torch.zeros(b, c, f, h, w, dtype=dt, **kw)
        self.noise = torch.zeros(b, c, f, h, w, dtype=dt, **kw)
        self.context = torch.zeros(n, bucket.text_len, bucket.text_dim, dtype=dt, **kw)
        self.feat_first = torch.zeros(b * f, c0, h, w, dtype=dt, **kw)
        self.feat_last = torch.zeros(b * f, c0, h, w, dtype=dt, **kw)
        self.has_last = torch.zeros(b, dtype=torch.bool, **kw)
        self.step_index = torch.zeros((), dtype=torch.long, **kw)
        self.tau = torch.zeros((), dtype=torch.long, **kw)
        self.guidance = torch.ones((), dtype=torch.float32, **kw)
        self.stochastic = bucket.sampler == "ddpm" or bucket.eta > 0
        # The fused update kernel needs the linear form of the scheduler step (no x_0 clipping).
        linear = not scheduler.config.clip_sample
        problem = kernel_problem(self.latents)  # a GPU older than the Triton kernels support
        if fused_update and problem:
            raise RuntimeError(f"the fused latent-update kernel cannot run here: {problem}")
        on_gpu = self.device.type == "cuda" and not problem
        self.fused_update = linear and (fused_update if fused_update is not None else on_gpu)
        if (fused_update and not linear):
            logger.warning("pdengine sampler: clip_sample=True makes the scheduler step non-linear: the fused "
                           "latent-update kernel is off, the reference step runs instead")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.capture_seconds = 0.0

    # ------------------------------------------------------------------ the step
    def _step(self) -> None:
        f = self.bucket.frames
        step = self.step_index
        t = self.scheduler.timesteps.index_select(0, step.reshape(1))
        keep = self.has_last & (step < self.tau)
        keep_rows = keep.to(self.feat_last.dtype).repeat_interleave(f).reshape(-1, 1, 1, 1)
        feats = self.feat_first + keep_rows * self.feat_last
        x = self.latents
        if self.bucket.cfg:
            x, feats = torch.cat([x, x]), torch.cat([feats, feats])
        eps = self._unet_call(x, t.expand(x.shape[0]), self.context, cond_features=feats)
        noise = self.noise if self.stochastic else None
        if self.fused_update:
            from pdengine.kernels.latent_update import latent_update_

            coeffs = self.scheduler.coefficients(step, self.bucket.eta)
            latent_update_(self.latents, eps, coeffs, self.guidance if self.bucket.cfg else None, noise)
        else:
            if self.bucket.cfg:
                eps_u, eps_c = eps.chunk(2)
                eps = eps_u + self.guidance.to(eps.dtype) * (eps_c - eps_u)
            self.latents.copy_(self.scheduler.step(eps, step, self.latents, noise=noise, eta=self.bucket.eta))
        self.step_index.add_(1)

    def _device_context(self):
        # Kernels launch on the current CUDA device and graphs capture on a stream of it.
        return torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()

    def _capture(self) -> None:
        """Warm up on a side stream (kernel autotuning and lazy init happen here, never during capture),
        then capture one step. The warm-up's effect on the buffers is undone by `run`, which refills them."""
        t0 = time.perf_counter()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                self.step_index.zero_()
                self._step()
        torch.cuda.current_stream(self.device).wait_stream(stream)
        self.step_index.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self._step()
        torch.cuda.synchronize(self.device)
        self.graph = graph
        self.capture_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ run
    @torch.no_grad()
    def run(self, latents: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor | None,
            feat_first: torch.Tensor, feat_last: torch.Tensor, has_last: torch.Tensor, *, tau: int,
            guidance: float, step_noise: Callable[[int], torch.Tensor] | None = None,
            on_step: Callable[[int], None] | None = None, steps: int | None = None) -> torch.Tensor:
        """Denoise `latents` (x_T); the same contract as `engine.pipeline.denoise` with cached
        conditioning. Returns a fresh tensor (the buffers are reused by the next call). `steps` stops after
        the first that many steps (a warm-up: capture, compiles and caches without the whole schedule)."""
        with self._device_context():
            return self._run(latents, text, uncond, feat_first, feat_last, has_last, tau=tau, guidance=guidance,
                             step_noise=step_noise, on_step=on_step, steps=steps)

    def _run(self, latents, text, uncond, feat_first, feat_last, has_last, *, tau, guidance, step_noise,
             on_step, steps) -> torch.Tensor:
        if self.use_graph and self.graph is None:
            self.context.copy_(torch.cat([uncond, text]) if self.bucket.cfg else text)
            self.feat_first.copy_(feat_first)
            self.feat_last.copy_(feat_last)
            self._capture()
        self.latents.copy_(latents)
        self.context.copy_(torch.cat([uncond, text]) if self.bucket.cfg else text)
        self.feat_first.copy_(feat_first)
        self.feat_last.copy_(feat_last)
        self.has_last.copy_(has_last)
        self.tau.fill_(tau)
        self.guidance.fill_(guidance)
        self.step_index.zero_()
        for i in range(self.bucket.steps if steps is None else min(steps, self.bucket.steps)):
            if self.stochastic:
                if step_noise is None:
                    raise ValueError("a stochastic sampler needs step_noise")
                self.noise.copy_(step_noise(i), non_blocking=True)
            if self.graph is not None:
                self.graph.replay()
            else:
                self._step()
            if on_step is not None:
                on_step(i)
        return self.latents.clone()
