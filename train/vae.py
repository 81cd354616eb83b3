"""`pdengine train-vae`: train a small diffusers `AutoencoderKL` on frames of a synthetic (or any) set.

The demo model needs a VAE that reconstructs its 64x64 scenes nearly perfectly (the first-frame
instruction is only as sharp as the VAE's reconstruction of it); Stable Diffusion's VAE is far too big for
a CPU demo, so we train a small one.

Data: one or more tables (CSV/JSONL/Parquet, see `train.data.read_table`) with a `path` column, paths
relative to the table's folder, e.g. a synthetic set's `images.csv` and `train.csv` together. Each row is
an image, or a video (by suffix) whose every frame becomes a training frame. All frames are decoded once,
resized to cover `size` x `size` and centre-cropped (the rule of `engine.media.load_image`), and kept in
memory as uint8: N frames cost N * size * size * 3 bytes (900 synthetic clips of 16 frames plus 1000
images at 64x64: 15400 frames, 190 MB). With `augment` (the default) each training frame goes through a
random one of the square's 8 symmetries (flips, transposes).

Model (`default_vae_config`): 3 levels of `DownEncoderBlock2D`/`UpDecoderBlock2D`, channels (32, 64, 64),
one ResNet per level, GroupNorm with 32 groups, 4 latent channels, 0.95M parameters: a 64x64 frame becomes
16x16x4 latents (spatial factor 4, not SD's 8: at 64x64 an 8x8 latent grid is too coarse for the 2-pixel
position accuracy the demo aims at).

Loss, in Stable Diffusion's (LDM's) convention so that `kl_weight` means what it means there::

    loss = mean (x - x̂)²  +  kl_weight * KL(q(z|x) || N(0, I)) / (3 H W)

KL is summed over a sample's latent elements, averaged over the batch; dividing by the pixel count (3 H W)
is the LDM loss (reconstruction summed per sample) scaled to a per-pixel mean so the learning rate does
not depend on the image size. z is a sample of the posterior. `loss="mse"` (the default) optimises PSNR,
the metric the demo is judged by, directly; `loss="l1"` is LDM's choice.
Adam, constant learning rate by default (`schedule="cosine"` decays it to 0 at the last step).

Scaling factor: after training, the latents (posterior means, which `engine.pipeline` encodes with) of up
to `SCALE_FRAMES` training frames are measured and `scaling_factor = 1 / std` is written into the saved
config, so `latents * scaling_factor` has unit variance, as the diffusion model's noise schedule assumes
(SD measured its 0.18215 the same way). No shift is applied (`shift_factor` stays None); the mean of the
scaled latents is recorded in `train_log.json` (`latent_mean_scaled`).

Determinism and resume: the weights are initialised from `seed`; step k draws its batch and augmentation
from `numpy.random.default_rng([seed, 1, k])` and its posterior sample from a torch generator seeded from
`(seed, 3, k)`; its learning rate is a function of k. Every random draw is a function of (seed, step), so
the checkpoint needs no RNG state: model + Adam state + step resume exactly (bitwise on the CPU with the
same thread count). A resume must use the checkpoint's settings; only `steps` may grow, and only with
the constant schedule (the cosine one spans the planned steps).

Output folder::

    out/config.json                          \\ a diffusers AutoencoderKL folder:
    out/diffusion_pytorch_model.safetensors  /  AutoencoderKL.from_pretrained(out)
    out/train_log.json                       command, settings, steps, time, device, losses, PSNR, scaling
    out/checkpoint/state.json                step, settings, loss log; names the two files below
    out/checkpoint/model-<step>.safetensors  model weights at `step`
    out/checkpoint/optimizer-<step>.pt       Adam state (tensors only: torch.load(weights_only=True))

Every file is written to a hidden temporary and renamed into place; `state.json` is replaced last, so a
kill at any moment leaves the previous checkpoint intact (older step files are deleted only afterwards).
The model files are written once, at the end. Copy `config.json` and the safetensors file (not
`checkpoint/`) into a model folder's `vae/`.
"""

from __future__ import annotations

import json
import math
import os
import shlex
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

if TYPE_CHECKING:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}

LOSSES = ("l1", "mse")
SCHEDULES = ("constant", "cosine")
SCALE_FRAMES = 1024  # training frames encoded to measure the latent std (the scaling factor)
EVAL_BATCH = 64
HISTORY_EVERY = 100  # loss history interval when log_every is 0 (the log is then silent)
CHECKPOINT_DIR = "checkpoint"
STATE_JSON = "state.json"
TRAIN_LOG = "train_log.json"
MODEL_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
# Settings that define a run: a resume must match them all (`steps` may grow, logging may change).
_RUN_KEYS = ("data", "config", "size", "batch_size", "lr", "schedule", "kl_weight", "loss", "augment", "seed")


class VaeTrainError(ValueError):
    """Bad settings, data or output folder for VAE training; raised before any training step."""


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def default_vae_config(size: int = 64) -> dict[str, Any]:
    """AutoencoderKL kwargs of the default small VAE (spatial factor 4, 4 latent channels)."""
    return {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": size,
        "mid_block_add_attention": True,
        "scaling_factor": 1.0,  # replaced by the measured 1 / std after training
    }


def vae_factor(config: dict[str, Any]) -> int:
    """Spatial downsampling factor: each level but the last halves the resolution."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def resolve_config(config: dict[str, Any] | str | os.PathLike | None, size: int) -> dict[str, Any]:
    """The default config updated with `config` (a dict or a JSON file of AutoencoderKL kwargs), checked."""
    import inspect

    from diffusers import AutoencoderKL

    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise VaeTrainError(f"size must be a positive int, got {size!r}")
    if config is None:
        overrides: dict[str, Any] = {}
    elif isinstance(config, dict):
        overrides = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise VaeTrainError(f"{path}: config file not found")
        try:
            overrides = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise VaeTrainError(f"{path}: invalid JSON ({e.msg})") from None
        if not isinstance(overrides, dict):
            raise VaeTrainError(f"{path}: expected a JSON object of AutoencoderKL arguments")
    allowed = set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - allowed)
    if unknown:
        raise VaeTrainError(f"unknown AutoencoderKL argument(s) {unknown}; allowed: {sorted(allowed)}")
    if "sample_size" in overrides and overrides["sample_size"] != size:
        raise VaeTrainError(f"config sample_size={overrides['sample_size']} differs from size={size}")
    try:  # a JSON round trip: tuples become lists, as in a saved config (a resume compares them)
        cfg = json.loads(json.dumps({**default_vae_config(size), **overrides}))
    except TypeError as e:
        raise VaeTrainError(f"config values must be JSON-serialisable: {e}") from None
    channels = list(cfg["block_out_channels"])
    cfg["block_out_channels"] = channels
    for key in ("down_block_types", "up_block_types"):
        cfg[key] = list(cfg[key])
        if len(cfg[key]) != len(channels):
            raise VaeTrainError(f"{key} has {len(cfg[key])} entries, block_out_channels has {len(channels)}")
    groups = cfg["norm_num_groups"]
    if any(c % groups for c in channels):
        raise VaeTrainError(f"norm_num_groups={groups} must divide every block_out_channels entry {channels}")
    factor = vae_factor(cfg)
    if size % factor:
        raise VaeTrainError(f"size={size} is not divisible by the VAE's spatial factor {factor} "
                            f"({len(channels)} levels); pick a multiple of {factor}")
    return cfg


# ---------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------


def _tables(data: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    tables = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    if not tables:
        raise VaeTrainError("no data table given")
    return [Path(t) for t in tables]


def load_frames(data: str | os.PathLike | Sequence[str | os.PathLike], size: int,
                column: str = "path") -> np.ndarray:
    """Every frame of the tables' images and videos as uint8 (N, size, size, 3), in table order.

    `data` is one table or several (their frames are concatenated). A missing or undecodable file is an
    error here (not a skip, unlike the trainer's datasets): the frame pool is built once, before
    training, so a bad set should stop the run at once.
    """
    import numpy as np

    return np.concatenate([_load_table(table, size, column) for table in _tables(data)])


def _load_table(data: Path, size: int, column: str) -> np.ndarray:
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    from pdengine.engine.media import MediaError, read_video

    from .data import VIDEO_SUFFIXES, DatasetError, _cover_crop, read_table

    try:
        rows = read_table(data, [column], nonempty=[column])
    except DatasetError as e:
        raise VaeTrainError(str(e)) from None
    frames: list[np.ndarray] = []
    for row in rows:
        path = data.parent / row[column].strip()  # an absolute path replaces the folder
        if not path.exists():
            raise VaeTrainError(f"{data}: {path} not found")
        if path.suffix.lower() in VIDEO_SUFFIXES:
            try:
                video = read_video(path)
            except MediaError as e:
                raise VaeTrainError(f"{data}: {e}") from None
            frames.extend(_cover_crop(f, size, size) for f in video)
        else:
            try:
                with Image.open(path) as img:
                    # EXIF orientation applied, as `engine.media.load_image` does for conditioning images.
                    rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"), dtype=np.uint8)
            except (UnidentifiedImageError, OSError) as e:
                raise VaeTrainError(f"{data}: {path}: not an image or video that can be read ({e})") from None
            frames.append(_cover_crop(rgb, size, size))
    return np.stack(frames)


def _to_tensor(frames: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1] (the VAE's range)."""
    import numpy as np
    import torch

    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """float (B, 3, H, W) in [-1, 1] -> uint8 (B, H, W, 3), clamped and rounded (as videos are written)."""
    import torch

    x = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def psnr_db(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-frame PSNR (dB, peak 255) of uint8 (N, H, W, 3) frames; inf where a frame is reproduced exactly."""
    import numpy as np

    if reference.shape != test.shape:
        raise ValueError(f"shape mismatch: {reference.shape} vs {test.shape}")
    err = (reference.astype(np.float64) - test.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)


def _pick(n_frames: int, n: int | None, seed: int) -> np.ndarray:
    """Indices of `n` frames: all of them in order when n is None or >= the pool, else a seeded subset."""
    import numpy as np

    if n is None or n >= n_frames:
        return np.arange(n_frames)
    return np.sort(np.random.default_rng([seed, 2]).choice(n_frames, size=n, replace=False))


def _measure(vae: AutoencoderKL, frames: np.ndarray, device: torch.device) -> dict[str, Any]:
    """Reconstruct `frames` through the posterior mean; per-frame PSNR and raw latent statistics."""
    import numpy as np
    import torch

    psnrs, total, total_sq, count = [], 0.0, 0.0, 0
    was_training = vae.training
    vae.eval()
    with torch.no_grad():
        for i in range(0, len(frames), EVAL_BATCH):
            chunk = frames[i : i + EVAL_BATCH]
            z = vae.encode(_to_tensor(chunk, device)).latent_dist.mean
            psnrs.append(psnr_db(chunk, _to_uint8(vae.decode(z).sample)))
            z64 = z.double()  # float64 sums: a million latents summed in fp32 lose digits
            total += z64.sum().item()
            total_sq += (z64**2).sum().item()
            count += z.numel()
    vae.train(was_training)
    mean = total / count
    std = math.sqrt(max(total_sq / count - mean**2, 0.0))
    return {"psnr": np.concatenate(psnrs), "latent_mean": mean, "latent_std": std}


def evaluate_vae(vae_dir: str | os.PathLike, data: str | os.PathLike | Sequence[str | os.PathLike],
                 n: int | None = 256, *, seed: int = 0, device: str = "cpu") -> dict[str, Any]:
    """Reconstruction quality of a saved VAE on `n` frames of `data` (all frames when n is None).

    `data` is one table or several, as for `train_vae`; `n` frames are a seeded subset (`seed`).

    Frames are encoded to the posterior mean (as `engine.pipeline` does), decoded, clamped and rounded to
    uint8, and compared with the source frames. Returns psnr_db (mean of per-frame PSNRs, peak 255),
    psnr_min_db, latent_std and latent_mean (of the scaled latents, mean * scaling_factor: about 1 and 0
    when the scaling factor fits these frames) and frames (how many were used).
    """
    import torch
    from diffusers import AutoencoderKL

    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise VaeTrainError(f"n must be a positive int or None, got {n!r}")
    vae_dir = Path(vae_dir)
    if not (vae_dir / "config.json").is_file():
        raise VaeTrainError(f"{vae_dir}: not a VAE folder (no config.json)")
    vae = AutoencoderKL.from_pretrained(vae_dir).to(torch.device(device))
    size = int(vae.config.sample_size)
    frames = load_frames(data, size)
    stats = _measure(vae, frames[_pick(len(frames), n, seed)], torch.device(device))
    scale = float(vae.config.scaling_factor)
    return {"psnr_db": float(stats["psnr"].mean()), "psnr_min_db": float(stats["psnr"].min()),
            "latent_std": stats["latent_std"] * scale, "latent_mean": stats["latent_mean"] * scale,
            "frames": len(stats["psnr"])}


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------


def _replace_bytes(path: Path, write: Callable[[Path], None]) -> None:
    """Write `path` through a hidden temporary in its folder, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_json(path: Path, obj: dict) -> None:
    text = json.dumps(obj, indent=1) + "\n"
    _replace_bytes(path, lambda p: p.write_text(text, encoding="utf-8"))


def _save_checkpoint(ckpt: Path, step: int, vae: AutoencoderKL, optimizer: torch.optim.Optimizer,
                     state: dict) -> None:
    import torch
    from safetensors.torch import save_file

    ckpt.mkdir(parents=True, exist_ok=True)
    model_name, optim_name = f"model-{step:07d}.safetensors", f"optimizer-{step:07d}.pt"
    weights = {k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}
    _replace_bytes(ckpt / model_name, lambda p: save_file(weights, str(p)))
    _replace_bytes(ckpt / optim_name, lambda p: torch.save(optimizer.state_dict(), p))
    _write_json(ckpt / STATE_JSON, {**state, "step": step, "model": model_name, "optimizer": optim_name})
    # Only now is the previous checkpoint unreferenced.
    for old in ckpt.iterdir():
        if old.name.startswith(("model-", "optimizer-")) and old.name not in (model_name, optim_name):
            old.unlink()


def _load_checkpoint(ckpt: Path) -> dict:
    path = ckpt / STATE_JSON
    if not path.is_file():
        raise VaeTrainError(f"--resume: no checkpoint in {ckpt} (no {STATE_JSON})")
    state = json.loads(path.read_text(encoding="utf-8"))
    for key in ("model", "optimizer"):
        if not (ckpt / state[key]).is_file():
            raise VaeTrainError(f"{path} names {state[key]}, which is missing")
    return state


def _save_model(out: Path, vae: AutoencoderKL) -> None:
    """save_pretrained into a temporary folder inside `out`, then rename each file into place."""
    import shutil

    tmp = Path(tempfile.mkdtemp(prefix=".model.tmp-", dir=out))
    try:
        vae.save_pretrained(tmp, safe_serialization=True)
        # safetensors writes its file owner-only (0600); give it config.json's umask-derived mode instead.
        shutil.copymode(tmp / MODEL_FILES[0], tmp / MODEL_FILES[1])
        # Weights first: until config.json appears, the folder is not a loadable (half-new) model.
        for name in reversed(MODEL_FILES):
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise VaeTrainError(f"{name} must be an int >= {lo}, got {value!r}")


def _check_number(name: str, value: Any, positive: bool) -> None:
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if not ok or value < 0 or (positive and value == 0):
        kind = "positive" if positive else "non-negative"
        raise VaeTrainError(f"{name} must be a {kind} number, got {value!r}")


def _command(settings: dict, out: Path, steps: int, device: str, config: Any, eval_data: Any) -> str:
    """The `pdengine train-vae` command line equivalent to this call."""
    args = ["pdengine", "train-vae"]
    for table in settings["data"]:
        args += ["--data", table]
    args += ["--out", str(out), "--steps", str(steps), "--batch-size", str(settings["batch_size"]),
             "--lr", repr(settings["lr"]), "--schedule", settings["schedule"],
             "--size", str(settings["size"]),
             "--kl-weight", repr(settings["kl_weight"]), "--loss", settings["loss"],
             "--augment" if settings["augment"] else "--no-augment", "--seed", str(settings["seed"]),
             "--device", device]
    if isinstance(config, (str, os.PathLike)):
        args += ["--config", str(config)]
    elif settings["config"] != default_vae_config(settings["size"]):
        args += ["--config", "CONFIG.json"]  # a dict was passed: train_log.json's settings.config holds it
    if eval_data is not None:
        args += ["--eval-data", str(eval_data)]
    return shlex.join(args)


def _augment(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each frame through a random one of the square's 8 symmetries (flips and transposes).

    The VAE must reconstruct any layout; the symmetries multiply the backgrounds and positions it sees,
    which closes much of the gap between training and held-out PSNR on a few hundred synthetic scenes.
    """
    import numpy as np

    out = []
    for frame, k in zip(batch, rng.integers(8, size=len(batch))):
        if k & 1:
            frame = frame[:, ::-1]
        if k & 2:
            frame = frame[::-1]
        if k & 4:
            frame = frame.transpose(1, 0, 2)
        out.append(frame)
    return np.stack(out)


def _learning_rate(lr: float, schedule: str, step: int, steps: int) -> float:
    """Learning rate of step `step` (0-based): constant, or cosine from lr down to 0 at step `steps`."""
    if schedule == "constant":
        return lr
    return 0.5 * lr * (1.0 + math.cos(math.pi * step / steps))


def _mean_losses(step: int, window: list[list[float]]) -> dict[str, float]:
    """Mean (total, reconstruction, KL) losses of the steps in `window`, which ends at `step`."""
    n = len(window)
    total, rec, kl = (sum(row[i] for row in window) / n for i in range(3))
    return {"step": step, "steps": n, "loss": total, "rec": rec, "kl": kl}


def _step_generator(seed: int, step: int) -> torch.Generator:
    """Torch generator of step `step`'s posterior sample, seeded from (seed, 3, step) like numpy streams."""
    import numpy as np
    import torch

    state = int(np.random.SeedSequence([seed, 3, step]).generate_state(1, np.uint64)[0])
    return torch.Generator(device="cpu").manual_seed(state >> 1)  # manual_seed takes < 2**63


def train_vae(data: str | os.PathLike | Sequence[str | os.PathLike], out: str | os.PathLike, *,
              config: dict[str, Any] | str | os.PathLike | None = None, size: int = 64, steps: int = 3000,
              batch_size: int = 16, lr: float = 1e-3, schedule: str = "constant", kl_weight: float = 1e-6,
              loss: str = "mse", augment: bool = True, seed: int = 0, device: str = "cpu",
              log_every: int = 100, save_every: int = 500, resume: bool = False,
              eval_data: str | os.PathLike | None = None, eval_frames: int = 256,
              log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train a small AutoencoderKL on the frames of `data` and save it to `out` (see the module docstring).

    `save_every` steps (0: only at the end) a checkpoint is written to out/checkpoint/; `resume=True`
    continues from it up to `steps` (the other settings must match the checkpoint's). `eval_data`: a table
    of held-out frames whose PSNR (over `eval_frames` of them) goes into the log. `log` receives progress
    lines every `log_every` steps (0: none). Returns the dict written to out/train_log.json.
    """
    import numpy as np
    import torch
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    for name, value, lo in (("steps", steps, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                            ("log_every", log_every, 0), ("save_every", save_every, 0),
                            ("eval_frames", eval_frames, 1)):
        _check_int(name, value, lo)
    _check_number("lr", lr, positive=True)
    _check_number("kl_weight", kl_weight, positive=False)
    if loss not in LOSSES:
        raise VaeTrainError(f"loss must be one of {LOSSES}, got {loss!r}")
    if schedule not in SCHEDULES:
        raise VaeTrainError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    cfg = resolve_config(config, size)
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise VaeTrainError(f"bad device {device!r}: {e}") from None
    out = Path(out)
    ckpt = out / CHECKPOINT_DIR
    if resume:
        state = _load_checkpoint(ckpt)
    else:
        state = None
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise VaeTrainError(f"{out} exists and is not empty: pass --resume to continue its run, "
                                "or choose a new --out")
    tables = _tables(data)
    settings = {"data": [str(t.resolve()) for t in tables], "config": cfg, "size": size,
                "batch_size": batch_size, "lr": float(lr), "schedule": schedule,
                "kl_weight": float(kl_weight), "loss": loss, "augment": bool(augment), "seed": seed,
                "steps": steps}
    if state is not None:
        saved = state["settings"]
        differ = [k for k in _RUN_KEYS if saved.get(k) != settings[k]]
        if differ:
            was = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            raise VaeTrainError(f"--resume: {', '.join(differ)} differ(s) from the checkpoint's ({was})")
        if state["step"] > steps:
            raise VaeTrainError(f"--resume: the checkpoint is at step {state['step']}, beyond steps={steps}")
        if schedule != "constant" and saved["steps"] != steps:
            raise VaeTrainError(f"--resume: the {schedule} schedule spans the run's steps={saved['steps']}; "
                                f"steps={steps} would change the learning rates already used")
    frames = load_frames(tables, size)
    held = load_frames(eval_data, size) if eval_data is not None else None
    say = log or (lambda _msg: None)
    say(f"{len(frames)} training frames of {size}x{size} from {', '.join(map(str, tables))}"
        + (f", {len(held)} held-out frames from {eval_data}" if held is not None else ""))

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**cfg)
    vae = vae.to(dev).train()
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    start, history, window, seconds = 0, [], [], 0.0
    if state is not None:
        vae.load_state_dict(load_file(str(ckpt / state["model"]), device=str(dev)))
        optimizer.load_state_dict(torch.load(ckpt / state["optimizer"], map_location=dev, weights_only=True))
        start, history, window, seconds = state["step"], state["history"], state["window"], state["seconds"]
        say(f"resumed from {ckpt} at step {start}")
    out.mkdir(parents=True, exist_ok=True)

    n_pixels = 3 * size * size
    began = time.perf_counter()

    def checkpoint(step: int) -> None:
        # No RNG state to save: every draw of step k derives from (seed, k) (see the module docstring).
        # `window` holds the losses since the last log line, so a resumed run logs the same means.
        _save_checkpoint(ckpt, step, vae, optimizer,
                         {"settings": settings, "history": history, "window": window,
                          "seconds": seconds + time.perf_counter() - began})

    for step in range(start, steps):
        rng = np.random.default_rng([seed, 1, step])
        batch = frames[rng.integers(len(frames), size=batch_size)]
        x = _to_tensor(_augment(batch, rng) if augment else batch, dev)
        for group in optimizer.param_groups:
            group["lr"] = _learning_rate(lr, schedule, step, steps)
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=_step_generator(seed, step)).to(dev)
        z = posterior.mean + posterior.std * noise
        recon = vae.decode(z).sample
        rec = (recon - x).abs().mean() if loss == "l1" else ((recon - x) ** 2).mean()
        kl = posterior.kl().mean()
        total = rec + kl_weight * kl / n_pixels
        if not torch.isfinite(total):
            raise FloatingPointError(f"step {step + 1}: loss is {total.item()} (lower --lr?)")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        window.append([total.item(), rec.item(), kl.item()])
        done = step + 1
        # Windows end on fixed step numbers, so a resumed run's history equals an uninterrupted one's.
        if done % (log_every or HISTORY_EVERY) == 0:
            history.append(_mean_losses(done, window))
            window = []
            if log_every:
                last = history[-1]
                say(f"step {done}/{steps}  loss {last['loss']:.5f}  {loss} {last['rec']:.5f}  "
                    f"kl {last['kl']:.1f}  {(done - start) / (time.perf_counter() - began):.2f} steps/s  "
                    f"{seconds + time.perf_counter() - began:.0f} s")
        if save_every and done % save_every == 0 and done != steps:
            checkpoint(done)
    run_seconds = time.perf_counter() - began
    checkpoint(steps)

    # Scaling factor: 1 / std of the posterior means over (a seeded subset of) the training frames.
    scale_stats = _measure(vae, frames[_pick(len(frames), SCALE_FRAMES, seed)], dev)
    scaling = 1.0 / scale_stats["latent_std"]
    vae.register_to_config(scaling_factor=scaling)
    held_stats = _measure(vae, held[_pick(len(held), eval_frames, seed)], dev) if held is not None else None
    _save_model(out, vae)
    result = {
        "command": _command(settings, out, steps, device, config, eval_data),
        "settings": settings,
        "steps": steps,
        "seconds": seconds + run_seconds,
        "steps_per_s": (steps - start) / run_seconds if steps > start else None,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "frames": len(frames),
        "parameters": sum(p.numel() for p in vae.parameters()),
        "final": _mean_losses(steps, window) if window else history[-1],
        "history": history,
        "train_psnr_db": float(scale_stats["psnr"].mean()),
        "heldout_psnr_db": float(held_stats["psnr"].mean()) if held_stats else None,
        "heldout_psnr_min_db": float(held_stats["psnr"].min()) if held_stats else None,
        "heldout_frames": len(held_stats["psnr"]) if held_stats else None,
        "scaling_factor": scaling,
        "latent_mean_scaled": scale_stats["latent_mean"] * scaling,
        "latent_std_raw": scale_stats["latent_std"],
    }
    _write_json(out / TRAIN_LOG, result)
    return result


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


@click.command("train-vae", context_settings=CONTEXT)
@click.option("--data", required=True, multiple=True, type=click.Path(dir_okay=False),
              help="Image or video table (CSV/JSONL, 'path' column), e.g. DIR/images.csv; repeat to combine.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output VAE folder.")
@click.option("--steps", default=3000, help="Training steps (total, also when resuming).")
@click.option("--batch-size", default=16, help="Frames per step.")
@click.option("--lr", default=1e-3, help="Adam learning rate (the peak, with --schedule cosine).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="constant", help="Learning-rate schedule.")
@click.option("--size", default=64, help="Frame side in pixels (a multiple of the VAE's factor, 4).")
@click.option("--kl-weight", default=1e-6, help="KL weight (LDM convention: per sample, over 3*H*W pixels).")
@click.option("--loss", type=click.Choice(LOSSES), default="mse",
              help="Reconstruction loss (mse optimises PSNR directly).")
@click.option("--augment/--no-augment", default=True, help="Random flips/transposes of the training frames.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help="JSON file of AutoencoderKL arguments overriding the default small config.")
@click.option("--seed", default=0, help="Seed for the weights, batches and posterior samples.")
@click.option("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
@click.option("--log-every", default=100, help="Print the mean losses every N steps (0: never).")
@click.option("--save-every", default=500, help="Write out/checkpoint every N steps (0: only at the end).")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint.")
@click.option("--eval-data", type=click.Path(dir_okay=False),
              help="Held-out table (e.g. DIR/heldout.csv) whose PSNR goes into train_log.json.")
def train_vae_command(data: tuple[str, ...], out: str, steps: int, batch_size: int, lr: float,
                      schedule: str, size: int, kl_weight: float, loss: str, augment: bool,
                      config_file: str | None, seed: int, device: str, log_every: int, save_every: int,
                      resume: bool, eval_data: str | None) -> None:
    """Train a small AutoencoderKL on image/video frames; save it with a measured scaling factor."""
    try:
        result = train_vae(list(data), out, config=config_file, size=size, steps=steps, batch_size=batch_size,
                           lr=lr, schedule=schedule, kl_weight=kl_weight, loss=loss, augment=augment,
                           seed=seed, device=device, log_every=log_every, save_every=save_every,
                           resume=resume, eval_data=eval_data, log=click.echo)
    except (VaeTrainError, FloatingPointError) as e:
        raise click.ClickException(str(e)) from None
    held = result["heldout_psnr_db"]
    click.echo(f"saved {out}: {result['steps']} steps in {result['seconds']:.0f} s, "
               f"train PSNR {result['train_psnr_db']:.2f} dB"
               + (f", held-out PSNR {held:.2f} dB" if held is not None else "")
               + f", scaling_factor {result['scaling_factor']:.5f}")


__all__: Sequence[str] = ("VaeTrainError", "default_vae_config", "evaluate_vae", "load_frames", "psnr_db",
                          "resolve_config", "train_vae", "train_vae_command", "vae_factor")
