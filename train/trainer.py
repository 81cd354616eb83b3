"""The PixelDance trainer: `train(config) -> summary`, a plain function over the recipe in `recipe.py`.

One optimizer step = `grad_accum` micro-batches of `batch_size` samples per process; every
`image_every`-th step (when image data is given) takes its micro-batches from the image data instead
(F = 1: the UNet bypasses its temporal layers, c_image is zeros). Each micro-batch is encoded with the
frozen VAE and text encoder (raw data) or read from a latent cache, the recipe draws t, the noise and
the instruction/text drops from one CPU generator, and the UNet's prediction (noise, or v when the model
folder's scheduler says v_prediction) is scored with MSE.

Determinism and resumption: every random draw of a step comes from state that checkpoints hold
(the recipe's generator, torch/numpy/python RNGs of every rank, the samplers' positions, the optimizer
and LR schedule), so a run killed and resumed produces the losses an uninterrupted run would.

Multi-process (`torchrun`): DDP over the process group (nccl on CUDA, gloo on the CPU), or FSDP2
(`fully_shard`, --fsdp) with one unit per module the UNet's forward calls. Every rank draws the
recipe's randomness for the whole global micro-batch and uses the rows of its own samples, so N
processes with batch B see the same draws, and the same losses, as one process with batch N x B
(ResumableSampler interleaves ranks: sample j of rank r is row j * N + r of the global batch). Rank 0
logs and writes checkpoints; the loss is all-reduced before the NaN check, so all ranks stop together.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import (
    EMA_DIR,
    STATE_JSON,
    STATE_PT,
    latest_checkpoint,
    load_trainer_state,
    save_checkpoint,
    write_final,
    write_model_folder,
)
from .config import ConfigError, TrainConfig
from .ema import EMA, save_ema_folder
from .recipe import RecipeConfig, training_inputs, training_loss

logger = logging.getLogger(__name__)

STATE_FORMAT = "pdengine-trainer-state"
STATE_VERSION = 1
METRICS_NAME = "metrics.jsonl"
COMPILE_BACKEND = "inductor"  # torch.compile backend of --compile
# The empty prompt's text embedding, stored beside a latent cache (the trainer needs it for the text
# drop, and a cache-only run has no text encoder to compute it).
UNCOND_NAME = "uncond.safetensors"


class TrainError(ValueError):
    """A run that cannot start or go on (bad data, mismatched model and data); the message says why."""


class NonFiniteLossError(TrainError):
    """The loss or the gradient norm stopped being finite; no checkpoint of that state was written."""


# ---------------------------------------------------------------------------------------------- distributed


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this module created the process group (and destroys it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes (RANK / WORLD_SIZE / LOCAL_RANK); single process otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        # Long timeout: rank 0 writes multi-GB checkpoints while the others wait at the next collective.
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30),
                                device_id=device if device.type == "cuda" else None)
    if dist.get_world_size() != world or dist.get_rank() != rank:
        raise TrainError(f"process group (rank {dist.get_rank()} of {dist.get_world_size()}) disagrees with "
                         f"RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank, world, local_rank, owns)


def _all_reduce(t: torch.Tensor, dist_info: DistInfo, op: str = "sum") -> torch.Tensor:
    if dist_info.enabled:
        import torch.distributed as dist

        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return t


# ---------------------------------------------------------------------------------------------- model helpers


def apply_activation_checkpointing(unet: nn.Module, policy: str) -> int:
    """Recompute activations in the backward pass instead of storing them (torch.utils.checkpoint,
    use_reentrant=False), by wrapping the forward of the chosen submodules in place; returns how many.

    "attention": every spatial and temporal transformer (their attention maps and feed-forwards are the
    bulk of the activations). "full": every layer of every down/up block (resnet, temporal conv, spatial
    and temporal attention) and the mid block. "none": nothing. Weights and state-dict keys are untouched.
    """
    from torch.utils.checkpoint import checkpoint

    from pdengine.model.layers import SpatialTransformer, TemporalTransformer

    def wrap(obj: nn.Module, name: str) -> None:
        fn = getattr(obj, name)
        if getattr(fn, "_pdengine_checkpointed", False):
            raise ValueError(f"{type(obj).__name__}.{name} is already checkpointed")

        def checkpointed(*args, **kwargs):
            if not torch.is_grad_enabled():  # inference: nothing to save, nothing to recompute
                return fn(*args, **kwargs)
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)

        checkpointed._pdengine_checkpointed = True
        setattr(obj, name, checkpointed)

    if policy == "none":
        return 0
    targets: list[tuple[nn.Module, str]] = []
    if policy == "attention":
        targets = [(m, "forward") for m in unet.modules() if isinstance(m, (SpatialTransformer, TemporalTransformer))]
    elif policy == "full":
        targets = [(b, "layer") for b in [*unet.down_blocks, *unet.up_blocks]] + [(unet.mid_block, "forward")]
    else:
        raise ValueError(f"checkpointing policy must be none, attention or full, got {policy!r}")
    for obj, name in targets:
        wrap(obj, name)
    return len(targets)


def fsdp_units(unet: nn.Module) -> list[nn.Module]:
    """The submodules the UNet's forward calls as modules, innermost first: each becomes one FSDP2 unit
    (all-gathered before its forward, resharded after). The blocks themselves are never called (the
    forward walks their layers), so they cannot be units; the mid block is."""
    units: list[nn.Module] = [unet.transformer_in]
    for block in [*unet.down_blocks, *unet.up_blocks]:
        for name in ("resnets", "temp_convs", "attentions", "temp_attentions", "downsamplers", "upsamplers"):
            units.extend(getattr(block, name, ()))
    units.append(unet.mid_block)
    return units


def set_dropout(unet: nn.Module, p: float) -> int:
    """Set the probability of every dropout layer (the temporal convs'); returns how many were set."""
    layers = [m for m in unet.modules() if isinstance(m, nn.Dropout)]
    for m in layers:
        m.p = p
    return len(layers)


def lr_at(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warmup over the first `warmup_steps` optimizer steps (step is 1-based), then constant."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, step / warmup_steps)


# ---------------------------------------------------------------------------------------------- RNG state


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's global RNG states as tensors and plain values (loadable with weights_only=True)."""
    version, py_state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "torch_cpu": torch.get_rng_state(),
        "python_version": int(version), "python_state": torch.tensor(py_state, dtype=torch.int64),
        "python_gauss": gauss,
        "numpy_name": str(name), "numpy_keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": int(pos), "numpy_has_gauss": int(has_gauss), "numpy_cached_gaussian": float(cached),
    }
    if device.type == "cuda":
        out["torch_cuda"] = torch.cuda.get_rng_state(device)
    return out


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch_cpu"])
    random.setstate((state["python_version"], tuple(int(v) for v in state["python_state"].tolist()),
                     state["python_gauss"]))
    np.random.set_state((state["numpy_name"], state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_cached_gaussian"]))
    if device.type == "cuda":
        if "torch_cuda" not in state:
            raise TrainError("the checkpoint was written by a CPU run: its CUDA RNG state is missing")
        torch.cuda.set_rng_state(state["torch_cuda"], device)


# ---------------------------------------------------------------------------------------------- uncond


def write_uncond(cache_dir: str | os.PathLike, embedding: torch.Tensor, model: str | None = None) -> Path:
    """Store the empty prompt's embedding (L, D) beside a latent cache (atomically)."""
    from safetensors.torch import save_file

    path = Path(cache_dir) / UNCOND_NAME
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    meta = {"format": "pdengine-uncond", "model": str(model) if model is not None else ""}
    save_file({"uncond": embedding.detach().float().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def read_uncond(cache_dir: str | os.PathLike) -> torch.Tensor:
    from safetensors.torch import load_file

    path = Path(cache_dir) / UNCOND_NAME
    if not path.is_file():
        raise TrainError(f"latent cache {cache_dir} has no {UNCOND_NAME} (the empty prompt's text embedding, "
                         "needed for the text drop): rebuild it with `pdengine cache-latents`, or pass "
                         "--components DIR with the text encoder it was made with")
    return load_file(str(path))["uncond"].float()


# ---------------------------------------------------------------------------------------------- the loss


def micro_batch_loss(unet: nn.Module, z0: torch.Tensor, text: torch.Tensor, uncond: torch.Tensor,
                     alphas_cumprod: torch.Tensor, recipe: RecipeConfig, gen: torch.Generator, *,
                     per_rank: int, rank: int = 0, world_size: int = 1) -> torch.Tensor:
    """The recipe's loss for this rank's `n` samples (n <= per_rank after skips) of a global micro-batch
    of `per_rank * world_size`: the draws are made for the whole global batch (so they do not depend on
    how it is split over processes, nor on skipped items), this rank's rows are used."""
    n = z0.shape[0]
    if world_size == 1 and n == per_rank:
        return training_loss(unet, z0, text, uncond, alphas_cumprod, recipe, gen)
    rows = torch.arange(n, device=z0.device) * world_size + rank
    z_all = z0.new_zeros((per_rank * world_size, *z0.shape[1:]))
    z_all[rows] = z0
    t_all = text.new_zeros((per_rank * world_size, *text.shape[1:]))
    t_all[rows] = text
    from pdengine.model.layers import use_kernels

    backend = getattr(getattr(unet, "module", unet), "backend", "torch")
    inputs = training_inputs(z_all, t_all, uncond, alphas_cumprod, recipe, gen, use_kernel=use_kernels(backend, z0))
    pred = unet(inputs.unet_input[rows], inputs.timesteps[rows], inputs.context[rows])
    return F.mse_loss(pred.float(), inputs.target[rows].float())


# ---------------------------------------------------------------------------------------------- data


class _Source:
    """One dataset as an endless, resumable stream of this rank's micro-batches."""

    def __init__(self, name: str, dataset, *, raw: bool, batch_size: int, dist_info: DistInfo, seed: int,
                 num_workers: int, pin_memory: bool = False, consumed: int = 0):
        from torch.utils.data import DataLoader

        from .data import ResumableSampler, collate_skip_none

        if len(dataset) < dist_info.world_size:
            raise TrainError(f"{name} data: {len(dataset)} item(s) cannot be shared by {dist_info.world_size} "
                             "processes")
        self.name, self.dataset, self.raw, self.batch_size = name, dataset, raw, batch_size
        self.sampler = ResumableSampler(len(dataset), seed, dist_info.rank, dist_info.world_size, with_epoch=True)
        self.sampler.load_state_dict(self.sampler.state_at(consumed))
        self.consumed = consumed  # indices of this rank's stream used by training so far (skips included)
        self.skipped = 0
        # A private generator: creating the iterator must not draw from the global RNG (which dropout uses).
        self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, collate_fn=collate_skip_none,
                                 num_workers=num_workers, generator=torch.Generator().manual_seed(seed),
                                 persistent_workers=False, pin_memory=pin_memory)
        self._iter: Iterator | None = None

    def next(self) -> dict | None:
        """The next micro-batch (None when every item of it was skipped)."""
        if self._iter is None:
            self._iter = iter(self.loader)
        batch = next(self._iter)
        self.consumed += self.batch_size
        self.skipped += self.batch_size if batch is None else int(batch["skipped"])
        return batch

    def state(self) -> dict:
        return {"consumed": self.consumed, "skipped": self.skipped,
                "sampler": self.sampler.state_at(self.consumed)}

    def skip_reasons(self) -> dict[str, int]:
        return dict(Counter(getattr(self.dataset, "skipped", {})))


class _Encoders:
    """The frozen VAE and text encoder of a model folder (raw-data training)."""

    def __init__(self, root: Path, device: torch.device, dtype: torch.dtype):
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        from pdengine.engine.pipeline import PixelDancePipeline

        try:
            vae = AutoencoderKL.from_pretrained(root / "vae", torch_dtype=dtype)
            text_encoder = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype)
            tokenizer = CLIPTokenizer.from_pretrained(root / "tokenizer")
        except (OSError, ValueError) as e:
            raise TrainError(f"{root}: cannot load the frozen VAE / text encoder: {e}") from e
        for m in (vae, text_encoder):
            m.requires_grad_(False).eval().to(device)
        # The pipeline's encoders (posterior mean, scaling, padding to the tokenizer's length) are reused
        # as they are: cached latents and online latents are then the same numbers. It never needs a UNet.
        self.pipe = PixelDancePipeline(None, vae, text_encoder, tokenizer, {}, device=device, dtype=dtype)
        self.latent_channels = self.pipe.latent_channels
        self.text_dim = int(text_encoder.config.hidden_size)

    @torch.no_grad()
    def video(self, video: torch.Tensor, chunk: int = 32) -> torch.Tensor:
        """(B, 3, F, H, W) in [-1, 1] -> scaled latents (B, C, F, h, w) fp32, a few frames per VAE call."""
        b, _, f, h, w = video.shape
        flat = video.permute(0, 2, 1, 3, 4).reshape(b * f, 3, h, w)
        lat = torch.cat([self.pipe.encode_images(x) for x in flat.split(chunk)]).float()
        return lat.reshape(b, f, *lat.shape[1:]).permute(0, 2, 1, 3, 4).contiguous()

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        return self.pipe.encode_text(captions).float()


# ---------------------------------------------------------------------------------------------- metrics


class _Metrics:
    """metrics.jsonl (one row per optimizer step), TensorBoard when installed, NVML memory on GPUs."""

    def __init__(self, out: Path, enabled: bool, tensorboard: bool, device: torch.device, resume_step: int,
                 log: Callable[[str], None]):
        self.enabled = enabled
        self.file = None
        self.tb = None
        self.nvml = None
        if not enabled:
            return
        path = out / METRICS_NAME
        if resume_step > 0 and path.is_file():
            # Rows after the checkpoint belong to the killed run's lost steps: they are redone.
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(line + "\n" for line in keep))
            os.replace(tmp, path)
        elif path.is_file():
            path.unlink()
        self.file = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                log("tensorboard is not installed: metrics go to metrics.jsonl only (pip install tensorboard)")
            else:
                self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
        if device.type == "cuda":
            try:
                import pynvml

                from pdengine.bench.common import nvml_index

                index = device.index if device.index is not None else torch.cuda.current_device()
                # NVML numbers GPUs its own way (CUDA_VISIBLE_DEVICES, PCI order): matched by UUID.
                self.nvml = pynvml.nvmlDeviceGetHandleByIndex(nvml_index(index))
            except Exception as e:  # ImportError, NVMLError (not an OSError), a GPU NVML does not list
                log(f"NVML unavailable ({type(e).__name__}: {e}): GPU memory is reported from torch only")

    def memory(self, device: torch.device) -> dict[str, float]:
        if device.type != "cuda":
            return {}
        out = {"torch_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30}
        if self.nvml is not None:
            import pynvml

            try:
                out["gpu_memory_used_gb"] = pynvml.nvmlDeviceGetMemoryInfo(self.nvml).used / 2**30
            except Exception:  # a metrics row never ends a run; the torch figure stays
                self.nvml = None
        return out

    def write(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tb.add_scalar(f"train/{key}", value, row["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


# ---------------------------------------------------------------------------------------------- the run


def train(config: TrainConfig, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run `pdengine train`; returns a summary (steps, losses, skipped items, output folders).

    Every option is checked (`config.validate()`) before any data or weights load. Raises ConfigError
    for bad options, TrainError (NonFiniteLossError for a NaN/inf loss) when the run cannot go on.
    """
    config.validate()
    device = config.resolved_device()
    dist_info = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        return _Run(config, device, dist_info, log).run()
    finally:
        if dist_info.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()


def _default_log(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)


class _Run:
    def __init__(self, config: TrainConfig, device: torch.device, dist_info: DistInfo,
                 log: Callable[[str], None] | None):
        self.cfg, self.device, self.dist = config, device, dist_info
        main_log = log or _default_log
        self.log = main_log if dist_info.is_main else (lambda message: None)
        self.out = Path(config.out)
        self.bf16 = config.compute_dtype() == "bf16"
        self.recipe = config.recipe()
        self.per_rank = config.batch_size

    # ------------------------------------------------------------------ setup
    def _resume_state(self) -> tuple[Path | None, dict, dict]:
        if not self.cfg.resume:
            return None, {}, {}
        ckpt = latest_checkpoint(self.out)
        if ckpt is None:  # validate() checked, but another process may have removed it since
            raise TrainError(f"--resume: no complete checkpoint in {self.out / 'checkpoints'}")
        state, tensors = load_trainer_state(ckpt)
        if state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
            raise TrainError(f"{ckpt / STATE_JSON}: not a {STATE_FORMAT} v{STATE_VERSION} file")
        if state["world_size"] != self.dist.world_size:
            raise TrainError(f"{ckpt} was written by {state['world_size']} process(es); resume it with the same "
                             f"number (this run has {self.dist.world_size}): the data order depends on it")
        if state["step"] >= self.cfg.steps:
            raise TrainError(f"{ckpt} is at step {state['step']}, not before --steps {self.cfg.steps}: "
                             "raise --steps to train further")
        changed = {k: (v, getattr(self.cfg, k)) for k, v in state["config"].items()
                   if k not in ("steps", "resume", "log_every", "num_workers", "save_every", "keep", "tensorboard")
                   and getattr(self.cfg, k, v) != v}
        if changed:
            self.log("resuming with changed options (the run will not repeat the uninterrupted one): "
                     + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items()))
        self.log(f"resuming from {ckpt} (step {state['step']})")
        return ckpt, state, tensors

    def _build_data(self, state: dict) -> None:
        from .data import DatasetError, ImageTextDataset, VideoTextDataset
        from .latent_cache import LatentCacheDataset

        cfg = self.cfg
        try:
            if cfg.latent_cache is not None:
                video = LatentCacheDataset(cfg.latent_cache)
                if video.index.get("kind") == "image" or video.latent_shape[1] < 2:
                    raise TrainError(f"--latent-cache {cfg.latent_cache}: holds images (F = 1), not videos")
            else:
                video = VideoTextDataset(cfg.data, resolution=cfg.resolution, frames=cfg.frames, fps=cfg.fps,
                                         video_column=cfg.video_column, caption_column=cfg.caption_column,
                                         seed=cfg.seed)
            image = None
            if cfg.images is not None and cfg.image_every > 0:
                if Path(cfg.images).is_dir():
                    image = LatentCacheDataset(cfg.images)
                    if image.latent_shape[1] != 1:
                        raise TrainError(f"--images {cfg.images}: a latent cache of videos, not images")
                else:
                    image = ImageTextDataset(cfg.images, resolution=cfg.resolution, image_column=cfg.image_column,
                                             caption_column=cfg.caption_column, seed=cfg.seed)
        except DatasetError as e:
            raise TrainError(str(e)) from e
        if len(video) == 0:
            raise TrainError("the video data holds no items")
        common = {"batch_size": self.per_rank, "dist_info": self.dist, "seed": cfg.seed,
                  "num_workers": cfg.num_workers, "pin_memory": self.device.type == "cuda"}
        self.video = _Source("video", video, raw=cfg.latent_cache is None,
                             consumed=state.get("video", {}).get("consumed", 0), **common)
        self.video.skipped = state.get("video", {}).get("skipped", 0)
        self.image = None
        if image is not None:
            self.image = _Source("image", image, raw=not Path(cfg.images).is_dir(),
                                 consumed=(state.get("image") or {}).get("consumed", 0), **common)
            self.image.skipped = (state.get("image") or {}).get("skipped", 0)

    def _build_encoders(self) -> None:
        self.encoders = None
        parts = self.cfg.parts_source()
        raw = self.video.raw or (self.image is not None and self.image.raw)
        if raw:
            if parts is None:
                raise TrainError("raw data needs a VAE and a text encoder: pass --components DIR")
            # bf16 on the GPU (frozen: no master weights needed), fp32 on the CPU.
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
            self.encoders = _Encoders(parts, self.device, dtype)
        caches = [s.dataset for s in (self.video, self.image) if s is not None and not s.raw]
        if self.encoders is not None:
            self.uncond = self.encoders.text([""])[0]
            self.latent_channels, self.text_dim = self.encoders.latent_channels, self.encoders.text_dim
        else:
            self.uncond = read_uncond(caches[0].root)
            self.latent_channels, self.text_dim = caches[0].latent_shape[0], caches[0].text_shape[1]
        for cache in caches:
            if cache.latent_shape[0] != self.latent_channels or cache.text_shape[1] != self.text_dim:
                raise TrainError(f"latent cache {cache.root}: latents with {cache.latent_shape[0]} channels and text "
                                 f"of width {cache.text_shape[1]} do not match this run's {self.latent_channels} "
                                 f"and {self.text_dim}")
        self.uncond = self.uncond.to(self.device)

    def _build_model(self, ckpt: Path | None) -> None:
        from pdengine.model import UNet3D

        from .init import init_unet

        cfg = self.cfg
        in_channels = 2 * self.latent_channels
        try:
            if ckpt is not None:
                unet = UNet3D.from_pretrained(ckpt / "unet", backend=cfg.backend)
            else:
                kind, source = cfg.init_source()
                # Fresh weights (a preset, new temporal layers) come from --seed, and drawing them must
                # not move the global RNG that the training steps use.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(cfg.seed)
                    unet = init_unet(kind, source, in_channels=in_channels, backend=cfg.backend)
        except (OSError, ValueError) as e:
            raise TrainError(f"cannot build the UNet: {e}") from e
        if unet.config["in_channels"] != in_channels or unet.config["out_channels"] != self.latent_channels:
            raise TrainError(f"the UNet has in/out channels {unet.config['in_channels']}/{unet.config['out_channels']}; "
                             f"latents with {self.latent_channels} channels need {in_channels}/{self.latent_channels}")
        if unet.config["cross_attention_dim"] != self.text_dim:
            raise TrainError(f"the UNet's cross_attention_dim is {unet.config['cross_attention_dim']}, the text "
                             f"embeddings are {self.text_dim} wide")
        if cfg.dropout is not None:
            set_dropout(unet, cfg.dropout)
        unet.to(device=self.device, dtype=torch.bfloat16 if cfg.pure_bf16 else torch.float32)
        unet.requires_grad_(True).train()
        self.unet_config = dict(unet.config)
        self.ema = None
        if cfg.ema is not None and ckpt is not None and not (ckpt / EMA_DIR / "config.json").is_file():
            raise TrainError(f"--ema: {ckpt} has no {EMA_DIR}/ weights (it was written without --ema)")
        apply_activation_checkpointing(unet, cfg.checkpointing)
        self.unet = unet  # the bare module (FSDP-sharded in place with --fsdp): saved, EMA'd, clipped
        self.model = unet  # what the forward pass calls (DDP-wrapped when distributed without --fsdp)
        if self.dist.enabled and cfg.fsdp:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            # The mesh names the run's device type: FSDP's default mesh takes the machine's accelerator, which
            # would move a CPU (gloo) run's weights onto a GPU when the machine has one.
            mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
            # One FSDP unit per module the UNet's forward calls (its blocks are not called as modules: the
            # forward walks their layers), then the root for the stem and the head.
            for unit in fsdp_units(unet):
                fully_shard(unit, mesh=mesh)
            fully_shard(unet, mesh=mesh)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Image steps bypass the temporal layers: their parameters get no gradient then.
            self.model = DDP(unet, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             find_unused_parameters=self.image is not None)
        # The average of the weights: on rank 0 only with replicated weights (only it saves), on every rank
        # under FSDP (each averages its own shards; saving gathers them).
        if cfg.ema is not None and (self.dist.is_main or self._fsdp):
            ema_device = torch.device("cpu") if cfg.ema_device == "cpu" else self.device
            ema_state = UNet3D.from_pretrained(ckpt / EMA_DIR).state_dict() if ckpt is not None else None
            try:
                self.ema = EMA(unet, cfg.ema, ema_device, ema_state)
            except ValueError as e:
                raise TrainError(f"--ema: {ckpt / EMA_DIR if ckpt is not None else 'the model'}: {e}") from e
        if cfg.compile:
            # Wraps whatever the forward calls (DDP or FSDP included); video and image steps compile once each.
            self.model = torch.compile(self.model, backend=COMPILE_BACKEND, dynamic=False)

    def _build_optimizer(self, tensors: dict) -> None:
        cfg = self.cfg
        params = [p for p in self.unet.parameters() if p.requires_grad]
        if cfg.optimizer == "adamw8bit":
            import bitsandbytes as bnb

            self.optimizer = bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        elif cfg.pure_bf16:
            # bf16 weights without an fp32 master copy: rounded to nearest, almost every update at fine-tuning
            # rates would be lost; AdamWSR rounds stochastically (kernels/adamw_sr.py).
            from pdengine.train.optim import AdamWSR

            self.optimizer = AdamWSR(params, lr=cfg.lr, weight_decay=cfg.weight_decay, seed=cfg.seed)
        else:
            fused = self.device.type == "cuda"
            self.optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               fused=True if fused else None)
        if "optimizer" in tensors:
            saved_format = tensors.get("optimizer_format", "torch")
            if saved_format != self._optimizer_format():
                raise TrainError(f"the checkpoint's optimizer state is in the {saved_format!r} layout, this run "
                                 f"uses {self._optimizer_format()!r} (resume with --fsdp exactly when it was on)")
            try:
                if self._fsdp:
                    from torch.distributed.checkpoint.state_dict import (
                        StateDictOptions,
                        set_optimizer_state_dict,
                    )

                    set_optimizer_state_dict(self.unet, self.optimizer, tensors["optimizer"],
                                             options=StateDictOptions(full_state_dict=True))
                else:
                    self.optimizer.load_state_dict(tensors["optimizer"])
            except (ValueError, KeyError, RuntimeError) as e:
                raise TrainError(f"the checkpoint's optimizer state does not fit this model/optimizer: {e}") from e

    @property
    def _fsdp(self) -> bool:
        return self.dist.enabled and self.cfg.fsdp

    def _optimizer_format(self) -> str:
        # FSDP's full optimizer state is keyed by parameter names, torch's own by parameter order.
        return "fsdp-full" if self._fsdp else "torch"

    def _gather_ema(self) -> dict[str, torch.Tensor] | None:
        """The whole EMA state on rank 0 (None elsewhere, or without --ema). Under FSDP a collective."""
        if self.ema is None:
            return None
        return self.ema.full_state(self.unet, keep=self.dist.is_main)

    def _gather_states(self) -> tuple[dict[str, torch.Tensor] | None, dict]:
        """(full model state or None when self.unet holds it unsharded, optimizer state). With FSDP this is a
        collective: every rank calls it; rank 0 receives the full tensors on the CPU."""
        if not self._fsdp:
            return None, self.optimizer.state_dict()
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.unet, options=options),
                get_optimizer_state_dict(self.unet, self.optimizer, options=options))

    # ------------------------------------------------------------------ one step
    def _fetch(self, source: _Source) -> tuple[torch.Tensor, torch.Tensor]:
        """The next micro-batch as (latents (n, C, F, h, w), text (n, L, D)) fp32 on the device. A batch of
        skipped items only is replaced by the next one (all ranks together, so DDP stays in step)."""
        skipped_in_a_row = 0
        while True:
            batch = source.next()
            if self.dist.enabled:
                empty = torch.tensor([float(batch is None)], device=self.device)
                any_empty = _all_reduce(empty, self.dist, "max").item() > 0
            else:
                any_empty = batch is None
            if not any_empty:
                break
            skipped_in_a_row += source.batch_size
            # A whole epoch of this rank's share without one readable item: the data is unusable, and
            # waiting longer would loop forever. Every rank counts the same, so all stop together.
            if skipped_in_a_row >= source.sampler.per_epoch:
                raise TrainError(f"{source.name} data: none of {skipped_in_a_row} items in a row could be read "
                                 f"(reasons: {source.skip_reasons() or 'see the log'}); check the files and columns")
        if source.raw:
            media = batch["video"] if "video" in batch else batch["image"].unsqueeze(2)
            z0 = self.encoders.video(media.to(self.device, non_blocking=True))
            text = self.encoders.text(list(batch["caption"]))
        else:
            # Copied in their stored dtype (asynchronous from pinned memory), widened on the device: a dtype
            # change in the same call would convert on the CPU first and copy synchronously.
            z0 = batch["latents"].to(self.device, non_blocking=True).float()
            text = batch["text"].to(self.device, non_blocking=True).float()
        return z0, text

    def _autocast(self):
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def _step(self, step: int) -> dict[str, Any]:
        cfg = self.cfg
        is_image = self.image is not None and step % cfg.image_every == 0
        source = self.image if is_image else self.video
        lr = lr_at(step, cfg.lr, cfg.warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        samples = 0
        for micro in range(cfg.grad_accum):
            z0, text = self._fetch(source)
            samples += z0.shape[0]
            sync = micro == cfg.grad_accum - 1 or not self.dist.enabled
            if self._fsdp:
                # FSDP2 keeps unsharded gradients across the accumulation and reduce-scatters once.
                self.unet.set_requires_gradient_sync(sync)
                ctx = contextlib.nullcontext()
            else:
                ctx = contextlib.nullcontext() if sync else self.model.no_sync()
            with ctx:
                with self._autocast():
                    loss = micro_batch_loss(self.model, z0, text, self.uncond, self.alphas_cumprod, self.recipe,
                                            self.gen, per_rank=self.per_rank, rank=self.dist.rank,
                                            world_size=self.dist.world_size)
                (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        totals = torch.stack([loss_sum / cfg.grad_accum, torch.tensor(float(samples), device=self.device)])
        _all_reduce(totals, self.dist, "sum")
        loss_value = totals[0].item() / self.dist.world_size
        params = [p for p in self.unet.parameters() if p.grad is not None]
        if cfg.max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
            norm = norm.full_tensor()
        grad_norm = norm.item()
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            last = latest_checkpoint(self.out)
            raise NonFiniteLossError(
                f"step {step}: loss is {loss_value} (gradient norm {grad_norm}); loss scale: none (bf16/fp32 "
                f"training does not scale the loss). Stopped without saving this state; the last good checkpoint "
                f"is {last if last is not None else 'none (no checkpoint was written yet)'}"
            )
        if self.ema is not None:
            self.ema.before_weights_change()  # an asynchronous copy of the last weights must finish first
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.unet)
        return {"loss": loss_value, "lr": lr, "grad_norm": grad_norm, "samples": int(totals[1].item()),
                "image": is_image}

    # ------------------------------------------------------------------ checkpoints
    def _trainer_state(self, step: int) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT, "version": STATE_VERSION, "step": step,
            "epoch": self.video.sampler.state_at(self.video.consumed)["epoch"],
            "world_size": self.dist.world_size,
            "video": self.video.state(), "image": self.image.state() if self.image is not None else None,
            "lr_schedule": {"kind": "linear_warmup_constant", "base_lr": self.cfg.lr,
                            "warmup_steps": self.cfg.warmup_steps, "last_lr": lr_at(step, self.cfg.lr,
                                                                                     self.cfg.warmup_steps)},
            "samples_seen": self.samples_seen, "losses": self.losses, "config": self.cfg.to_dict(),
        }

    def _skipped_totals(self) -> dict[str, int]:
        counts = torch.tensor([float(self.video.skipped), float(self.image.skipped if self.image else 0)],
                              device=self.device)
        _all_reduce(counts, self.dist, "sum")
        return {"video": int(counts[0].item()), "image": int(counts[1].item())}

    def _write_model(self, folder: Path, step: int, full_state: dict[str, torch.Tensor] | None,
                     ema_state: dict[str, torch.Tensor] | None) -> None:
        unet = self.unet
        if full_state is not None:  # FSDP: the gathered weights in an unsharded shell
            from pdengine.model import UNet3D

            with torch.device("meta"):
                unet = UNet3D(self.unet_config)
            unet.load_state_dict(full_state, assign=True)
        write_model_folder(folder, unet, self.cfg.parts_source(), self.scheduler_config,
                           extra_index={"_training_step": step})
        if ema_state is not None:
            save_ema_folder(folder / EMA_DIR, ema_state, self.unet_config)

    def _save(self, step: int) -> Path | None:
        rng = capture_rng(self.device)
        if self.dist.enabled:
            import torch.distributed as dist

            every: list[Any] = [None] * self.dist.world_size
            dist.all_gather_object(every, rng)
        else:
            every = [rng]
        state = self._trainer_state(step)
        full_state, optimizer_state = self._gather_states()
        ema_state = self._gather_ema()
        path = None
        if self.dist.is_main:
            def write(folder: Path) -> None:
                self._write_model(folder, step, full_state, ema_state)
                torch.save({"optimizer": optimizer_state, "optimizer_format": self._optimizer_format(),
                            "recipe_generator": self.gen.get_state(), "rng": every}, folder / STATE_PT)
                (folder / STATE_JSON).write_text(json.dumps(state, indent=1) + "\n")

            path = save_checkpoint(self.out, step, write, keep=self.cfg.keep)
            self.log(f"step {step}: checkpoint {path}")
        if self.dist.enabled:
            import torch.distributed as dist

            dist.barrier()
        return path

    # ------------------------------------------------------------------ main loop
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        from pdengine.engine.schedulers import load_scheduler

        cfg = self.cfg
        t_setup = time.perf_counter()
        ckpt, state, tensors = self._resume_state()
        start = int(state.get("step", 0))
        random.seed(cfg.seed + self.dist.rank)
        np.random.seed(cfg.seed + self.dist.rank)
        torch.manual_seed(cfg.seed + self.dist.rank)
        # The recipe's draws are shared by all ranks (the same generator everywhere, see micro_batch_loss).
        self.gen = torch.Generator().manual_seed(cfg.seed)

        self._build_data(state)
        self._build_encoders()
        self.scheduler_config = cfg.scheduler_config()
        # The UNet learns what the model folder's scheduler says it predicts, so sampling reads it back the same.
        self.recipe.prediction_type = self.scheduler_config.get("prediction_type", "epsilon")
        try:
            self.alphas_cumprod = load_scheduler(self.scheduler_config, kind="ddpm").alphas_cumprod
            self.recipe.validate(len(self.alphas_cumprod))
        except ValueError as e:
            raise ConfigError(f"training schedule / recipe: {e}") from None
        self._build_model(ckpt)
        self._build_optimizer(tensors)
        self.losses: list[float] = list(state.get("losses", []))
        self.samples_seen = int(state.get("samples_seen", 0))
        if ckpt is not None:
            self.gen.set_state(tensors["recipe_generator"])
            restore_rng(tensors["rng"][self.dist.rank], self.device)
        if self.dist.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        metrics = _Metrics(self.out, self.dist.is_main, cfg.tensorboard, self.device, start, self.log)
        if cfg.parts_source() is None:
            self.log("note: no --components: checkpoints and final/ hold the unet and scheduler only (no vae/, "
                     "text_encoder/, tokenizer/), so `pdengine generate` cannot load them as they are")
        n_params = sum(p.numel() for p in self.unet.parameters())
        self.log(f"training {n_params / 1e6:.1f}M parameters on {self.device} x{self.dist.world_size} "
                 f"({'bf16' if self.bf16 else 'fp32'}{' pure, AdamW with stochastic rounding' if cfg.pure_bf16 else ''}"
                 ", checkpointing "
                 f"{cfg.checkpointing}); {len(self.video.dataset)} videos"
                 + (f", {len(self.image.dataset)} images" if self.image is not None else "")
                 + f"; setup {time.perf_counter() - t_setup:.1f}s")

        bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=not self.dist.is_main,
                   dynamic_ncols=True)
        last_saved = start if ckpt is not None else None
        last_row: dict[str, Any] = {}
        t_run = time.perf_counter()
        samples_run = 0
        try:
            for step in range(start + 1, cfg.steps + 1):
                t0 = time.perf_counter()
                try:
                    result = self._step(step)
                except NonFiniteLossError:
                    metrics.write({"step": step, "loss": None, "nonfinite": True})
                    raise
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                dt = time.perf_counter() - t0
                self.losses.append(result["loss"])
                self.samples_seen += result["samples"]
                samples_run += result["samples"]
                skipped = self._skipped_totals()
                last_row = {"step": step, "loss": result["loss"], "lr": result["lr"],
                            "grad_norm": result["grad_norm"], "samples": result["samples"],
                            "samples_per_s": result["samples"] / dt, "step_time_s": dt,
                            "image_step": result["image"], "skipped_video": skipped["video"],
                            "skipped_image": skipped["image"], **metrics.memory(self.device)}
                metrics.write(last_row)
                bar.update(1)
                if step % cfg.log_every == 0 or step == cfg.steps:
                    postfix = {"loss": f"{result['loss']:.4f}", "sps": f"{last_row['samples_per_s']:.1f}",
                               "skipped": skipped["video"] + skipped["image"]}
                    if "gpu_memory_used_gb" in last_row:
                        postfix["mem_gb"] = f"{last_row['gpu_memory_used_gb']:.1f}"
                    bar.set_postfix(postfix)
                if cfg.save_every and step % cfg.save_every == 0:
                    self._save(step)
                    last_saved = step
            if cfg.save_every and last_saved != cfg.steps:
                self._save(cfg.steps)  # so a later run can go on with a larger --steps
            final = None
            full_state, _ = self._gather_states()
            ema_state = self._gather_ema()
            if self.dist.is_main:
                final = write_final(self.out,
                                    lambda folder: self._write_model(folder, cfg.steps, full_state, ema_state))
                self.log(f"final weights: {final}")
        finally:
            bar.close()
            metrics.close()
            if self.ema is not None:
                self.ema.close()
        elapsed = time.perf_counter() - t_run
        skipped = self._skipped_totals()
        reasons = {"video": self.video.skip_reasons(), "image": self.image.skip_reasons() if self.image else {}}
        summary = {
            "steps": cfg.steps, "start_step": start, "world_size": self.dist.world_size,
            "loss": self.losses[-1] if self.losses else None, "losses": self.losses,
            "samples_seen": self.samples_seen, "samples_per_s": samples_run / elapsed if elapsed > 0 else None,
            "time_s": elapsed, "skipped": {**skipped, "reasons": reasons},
            "final": str(final) if final is not None else None,
            "last_checkpoint": str(latest_checkpoint(self.out)) if self.dist.is_main and cfg.save_every else None,
            "metrics": str(self.out / METRICS_NAME),
        }
        if skipped["video"] or skipped["image"]:
            self.log(f"skipped items: {skipped['video']} video(s), {skipped['image']} image(s)"
                     + (f" (reasons in this process: {reasons})" if cfg.num_workers == 0 else ""))
        return summary


# ---------------------------------------------------------------------------------------------- cache-latents


def cache_latents_job(*, model: str, data: str | None, images: str | None, out: str, video_column: str = "path",
                      caption_column: str = "caption", resolution: int = 256, frames: int = 16, fps: float = 4.0,
                      batch_size: int = 4, shard_size: int = 256, seed: int = 0, device: str | None = None,
                      dtype: str = "auto", overwrite: bool = False) -> tuple[Path, int]:
    """`pdengine cache-latents`: encode a video (or image) table with a model folder's frozen VAE and text
    encoder into a latent cache, plus the empty prompt's embedding (uncond.safetensors) the trainer needs.
    Returns (cache folder, items cached)."""
    from .data import ImageTextDataset, VideoTextDataset
    from .latent_cache import cache_latents, read_index

    if (data is None) == (images is None):
        raise ConfigError("give exactly one of --data FILE (videos) or --images FILE")
    root = Path(model)
    missing = [p for p in ("vae", "text_encoder", "tokenizer") if not (root / p).is_dir()]
    if not root.is_dir() or missing:
        raise ConfigError(f"--model {root}: not a model folder with vae/, text_encoder/, tokenizer/"
                          + (f" (missing {', '.join(missing)})" if root.is_dir() else ""))
    for name, value in (("--resolution", resolution), ("--frames", frames), ("--batch-size", batch_size),
                        ("--shard-size", shard_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if resolution % 8:
        raise ConfigError(f"--resolution must be a multiple of 8, got {resolution}")
    if dtype not in ("auto", "fp32", "bf16"):
        raise ConfigError(f"--dtype must be auto, fp32 or bf16, got {dtype!r}")
    probe = TrainConfig(device=device)
    dev = probe.resolved_device()
    torch_dtype = torch.bfloat16 if dtype == "bf16" or (dtype == "auto" and dev.type == "cuda") else torch.float32
    if data is not None:
        dataset = VideoTextDataset(data, resolution=resolution, frames=frames, fps=fps, video_column=video_column,
                                   caption_column=caption_column, seed=seed)
    else:
        dataset = ImageTextDataset(images, resolution=resolution, image_column=video_column,
                                   caption_column=caption_column, seed=seed)
    encoders = _Encoders(root, dev, torch_dtype)
    path = cache_latents(dataset, encoders.pipe, out, shard_size=shard_size, batch_size=batch_size, device=dev,
                         dtype=torch_dtype, overwrite=overwrite)
    write_uncond(path, encoders.text([""])[0], model=str(root.resolve()))
    return path, read_index(path)["count"]
