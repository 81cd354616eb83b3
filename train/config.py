"""`TrainConfig`: every option of `pdengine train`, loadable from a TOML file, checked before any data loads.

Stdlib only at module level: `train/cli.py` reads the defaults from here, and `pdengine --help` must
not import torch. `validate()` imports what it needs lazily.

TOML: top-level keys are the option names in snake_case or kebab-case (`batch_size` or `batch-size`);
an unknown key is an error naming it. Command-line flags override the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

INIT_FLAGS = {  # field -> (init kind for pdengine.train.init.init_unet, the CLI flag)
    "model": ("model", "--model"),
    "init_from_sd": ("sd", "--init-from-sd"),
    "init_from_modelscope": ("modelscope", "--init-from-modelscope"),
    "preset": ("preset", "--preset"),
}
DTYPES = ("auto", "fp32", "bf16")
CHECKPOINTING = ("none", "attention", "full")
OPTIMIZERS = ("adamw", "adamw8bit")
EMA_DEVICES = ("gpu", "cpu")
BACKENDS = ("auto", "torch", "triton")
PERTURB_MODES = ("instructions", "last", "none")  # mirrors pdengine.train.recipe.PERTURB_MODES


class ConfigError(ValueError):
    """A bad training option; the message names the option (as its CLI flag) and the problem."""


def flag(name: str) -> str:
    """`batch_size` -> `--batch-size`: how errors name an option."""
    return "--" + name.replace("_", "-")


@dataclass
class TrainConfig:
    """Options of `pdengine train` (field name = flag name in snake_case)."""

    # --- where the UNet starts (exactly one)
    model: str | None = None  # a PixelDance model folder
    init_from_sd: str | None = None  # a Stable Diffusion folder (or its unet/): inflated to 3D
    init_from_modelscope: str | None = None  # a ModelScope text-to-video folder: conv_in expanded
    preset: str | None = None  # fresh weights of a UNet3D preset
    # Folder that supplies vae/, text_encoder/, tokenizer/ and scheduler/ when the init source has none
    # (--preset): needed to train from raw videos, and copied into checkpoints so they are complete models.
    components: str | None = None

    # --- data
    data: str | None = None  # CSV/JSONL of videos + captions
    images: str | None = None  # CSV/JSONL of images + captions, or a latent cache of images (joint training)
    latent_cache: str | None = None  # folder written by `pdengine cache-latents` (instead of --data)
    video_column: str = "path"
    image_column: str = "path"
    caption_column: str = "caption"
    resolution: int = 256
    frames: int = 16
    fps: float = 4.0
    num_workers: int = 2
    out: str | None = None

    # --- optimisation
    steps: int = 1000
    batch_size: int = 1  # per process and micro-batch
    grad_accum: int = 1
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0 turns clipping off
    optimizer: str = "adamw"

    # --- the recipe
    eta: float = 0.25
    text_drop: float = 0.1
    cond_timestep: int = 100
    last_frame_window: int = 3
    perturb: str = "instructions"
    image_every: int = 8  # one image step every N optimizer steps (0: off)

    # --- precision and memory
    device: str | None = None  # default: cuda when available (LOCAL_RANK's GPU under torchrun), else cpu
    dtype: str = "auto"  # compute dtype: auto = bf16 autocast on CUDA, fp32 on CPU
    pure_bf16: bool = False  # bf16 weights and optimizer state (no fp32 master copy)
    checkpointing: str = "none"
    backend: str = "auto"  # temporal layers: Triton kernels (auto: on CUDA) or the PyTorch reference
    dropout: float | None = None  # override the UNet's dropout probability (None: keep the model's)
    ema: float | None = None  # EMA decay (None: no EMA)
    ema_device: str = "gpu"  # gpu: beside the weights; cpu: in host memory
    fsdp: bool = False  # shard parameters, gradients and optimizer state with FSDP2 instead of DDP
    compile: bool = False  # torch.compile the UNet (Inductor); the Triton kernels enter as operators

    # --- robustness and logging
    save_every: int = 500  # 0: only the final weights
    keep: int = 3
    resume: bool = False
    seed: int = 0
    log_every: int = 10
    tensorboard: bool = True  # write OUT/tensorboard when tensorboard is installed

    # ------------------------------------------------------------------ construction
    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> TrainConfig:
        """Build from a mapping of option names (snake or kebab case); unknown keys are an error."""
        known = set(cls.field_names())
        out: dict[str, Any] = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(f"{where}: unknown key {key!r}")
            if name in out:
                raise ConfigError(f"{where}: key {key!r} is given twice")
            out[name] = value
        return cls(**out)

    @classmethod
    def from_toml(cls, path: str | os.PathLike, **overrides: Any) -> TrainConfig:
        """Options from a TOML file, then `overrides` (the command line's explicit flags) on top."""
        return cls.from_dict({**read_toml(path), **overrides}, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def init_source(self) -> tuple[str, str]:
        """(kind, source) for `init_unet`; validate() has made sure there is exactly one."""
        for name, (kind, _) in INIT_FLAGS.items():
            if getattr(self, name) is not None:
                return kind, getattr(self, name)
        raise ConfigError("no model to start from: give one of " + ", ".join(f for _, f in INIT_FLAGS.values()))

    def recipe(self):  # -> pdengine.train.recipe.RecipeConfig
        from .recipe import RecipeConfig

        return RecipeConfig(eta=self.eta, text_drop=self.text_drop, cond_timestep=self.cond_timestep,
                            last_frame_window=self.last_frame_window, perturb=self.perturb)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every option (types, ranges, files, combinations) without loading any data or weights."""
        self._check_types()
        self._check_init()
        self._check_data()
        self._check_numbers()
        self._check_choices()
        self._check_out()

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if not _type_ok(value, hints[f.name]):
                raise ConfigError(f"{flag(f.name)}: expected {_type_name(hints[f.name])}, got {value!r}")

    def _check_init(self) -> None:
        given = [f for name, (_, f) in INIT_FLAGS.items() if getattr(self, name) is not None]
        if len(given) != 1:
            choices = ", ".join(f for _, f in INIT_FLAGS.values())
            what = "none" if not given else " and ".join(given)
            raise ConfigError(f"give exactly one model to start from ({choices}); got {what}")
        kind, source = self.init_source()
        if kind == "preset":
            from pdengine.model.config import PRESETS

            if source not in PRESETS:
                raise ConfigError(f"--preset: unknown preset {source!r}; choose from {sorted(PRESETS)}")
        else:
            _need_dir(source, INIT_FLAGS[_field_of(kind)][1])
            root = Path(source)
            if kind == "model":
                from pdengine.engine.pipeline import ModelFolderError, check_model_folder

                try:
                    check_model_folder(root)
                except ModelFolderError as e:
                    raise ConfigError(f"--model: {e}") from None
            elif not ((root / "unet" / "config.json").is_file() or (root / "config.json").is_file()):
                raise ConfigError(f"{INIT_FLAGS[_field_of(kind)][1]} {root}: no unet/config.json")
        if self.components is not None:
            _need_dir(self.components, "--components")
            root = Path(self.components)
            missing = [p for p in ("vae", "text_encoder", "tokenizer", "scheduler") if not (root / p).is_dir()]
            if missing:
                raise ConfigError(f"--components {root}: missing part(s) {', '.join(p + '/' for p in missing)}")

    def _check_data(self) -> None:
        if (self.data is None) == (self.latent_cache is None):
            raise ConfigError("give exactly one of --data FILE (raw videos) or --latent-cache DIR")
        if self.data is not None:
            _need_file(self.data, "--data")
        if self.latent_cache is not None:
            _check_cache(self.latent_cache, "--latent-cache", "video")
        if self.images is not None:
            if not Path(self.images).exists():
                raise ConfigError(f"--images {self.images}: no such file or folder")
            if Path(self.images).is_dir():
                _check_cache(self.images, "--images", "image")
            if self.image_every == 0:
                raise ConfigError("--images is given but --image-every is 0 (image batches off)")
        if self.needs_encoders() and self.parts_source() is None:
            raise ConfigError("training from raw data needs a VAE and a text encoder, and --preset has none: "
                              "pass --components DIR (a model folder with vae/, text_encoder/, tokenizer/)")
        for name in ("video_column", "caption_column", "image_column"):
            if not getattr(self, name).strip():
                raise ConfigError(f"{flag(name)} must not be empty")

    def needs_encoders(self) -> bool:
        """Raw videos or raw images are encoded online with the frozen VAE and text encoder."""
        return self.data is not None or (self.images is not None and not Path(self.images).is_dir())

    def _check_numbers(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "frames", "keep", "log_every", "last_frame_window"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag(name)} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "num_workers", "image_every", "save_every", "seed", "cond_timestep"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        if self.frames < 2:
            raise ConfigError(f"--frames must be >= 2 (first and last frame), got {self.frames}")
        if self.resolution <= 0 or self.resolution % 8:
            raise ConfigError(f"--resolution must be a positive multiple of 8, got {self.resolution}")
        for name in ("lr", "fps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{flag(name)} must be > 0, got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{flag(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("eta", "text_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{flag(name)} must be in [0, 1], got {getattr(self, name)}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.ema is not None and not 0.0 < self.ema < 1.0:
            raise ConfigError(f"--ema (the decay) must be in (0, 1), got {self.ema}")
        timesteps = self.num_train_timesteps()
        if self.cond_timestep >= timesteps:
            raise ConfigError(f"--cond-timestep must be below the schedule's {timesteps} timesteps, "
                              f"got {self.cond_timestep}")

    def _check_choices(self) -> None:
        for name, choices in (("dtype", DTYPES), ("checkpointing", CHECKPOINTING), ("optimizer", OPTIMIZERS),
                              ("ema_device", EMA_DEVICES), ("backend", BACKENDS), ("perturb", PERTURB_MODES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{flag(name)} must be one of {', '.join(choices)}; got {getattr(self, name)!r}")
        device = self.resolved_device()
        if self.pure_bf16 and self.dtype == "fp32":
            raise ConfigError("--pure-bf16 keeps the weights in bf16: it cannot be combined with --dtype fp32")
        if self.optimizer == "adamw8bit":
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError("--optimizer adamw8bit needs bitsandbytes: pip install bitsandbytes") from None
            if device.type != "cuda":
                raise ConfigError("--optimizer adamw8bit runs on CUDA only")
        if self.backend == "triton":
            try:
                import triton  # noqa: F401
            except ImportError:
                raise ConfigError("--backend triton needs triton, which is not installed") from None
        if self.fsdp:
            if int(os.environ.get("WORLD_SIZE", "1")) < 2:
                raise ConfigError("--fsdp shards over processes: launch with torchrun --nproc-per-node N (N >= 2)")
            if self.optimizer == "adamw8bit":
                raise ConfigError("--optimizer adamw8bit with --fsdp is not supported")

    def _check_out(self) -> None:
        if self.out is None:
            raise ConfigError("--out DIR is required")
        out = Path(self.out)
        if out.exists() and not out.is_dir():
            raise ConfigError(f"--out {out} exists and is not a folder")
        from .checkpoint import latest_checkpoint

        found = latest_checkpoint(out) if out.is_dir() else None
        if self.resume and found is None:
            raise ConfigError(f"--resume: no complete checkpoint in {out / 'checkpoints'}")
        if not self.resume and found is not None:
            raise ConfigError(f"--out {out} already holds checkpoints ({found.name}): pass --resume to continue "
                              "that run, or choose another --out")

    # ------------------------------------------------------------------ derived settings
    def resolved_device(self):  # -> torch.device
        """The training device: --device, or cuda (LOCAL_RANK's GPU under torchrun) when available, else cpu."""
        import torch

        if self.device is None:
            if torch.cuda.is_available():
                return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            return torch.device("cpu")
        try:
            device = torch.device(self.device)
        except RuntimeError as e:
            raise ConfigError(f"--device {self.device!r}: {e}") from None
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise ConfigError(f"--device {self.device}: CUDA is not available on this machine")
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise ConfigError(f"--device {self.device}: only {torch.cuda.device_count()} CUDA device(s)")
            if device.index is None:  # plain "cuda": this process's GPU (LOCAL_RANK's under torchrun)
                local = os.environ.get("LOCAL_RANK")
                device = torch.device("cuda", int(local) if local is not None else torch.cuda.current_device())
        elif device.type != "cpu":
            raise ConfigError(f"--device must be cpu or cuda[:N], got {self.device!r}")
        return device

    def compute_dtype(self) -> str:
        """"bf16" or "fp32": auto is bf16 on CUDA (autocast) and fp32 on the CPU; --pure-bf16 implies bf16."""
        if self.pure_bf16:
            return "bf16"
        if self.dtype == "auto":
            return "bf16" if self.resolved_device().type == "cuda" else "fp32"
        return self.dtype

    def parts_source(self) -> Path | None:
        """The folder whose vae/, text_encoder/, tokenizer/, scheduler/ the run uses (and copies into
        checkpoints): --components, else the init folder (PixelDance, ModelScope or SD all have them)."""
        if self.components is not None:
            return Path(self.components)
        kind, source = self.init_source()
        if kind == "preset":
            return None
        root = Path(source)
        if kind == "sd" and not (root / "vae").is_dir() and (root.parent / "vae").is_dir():
            root = root.parent  # --init-from-sd pointed at the unet/ subfolder
        return root if (root / "vae").is_dir() and (root / "text_encoder").is_dir() else None

    def scheduler_config(self) -> dict[str, Any]:
        """The training noise schedule: the parts folder's scheduler config, else SD's (default_scheduler)."""
        parts = self.parts_source()
        path = parts / "scheduler" / "scheduler_config.json" if parts is not None else None
        if path is not None and path.is_file():
            try:
                config = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path} is not valid JSON ({e})") from None
            if not isinstance(config, dict):
                raise ConfigError(f"{path} must hold a JSON object")
            return config
        from pdengine.engine.schedulers import SD_SCHEDULE

        return dict(SD_SCHEDULE)

    def num_train_timesteps(self) -> int:
        value = self.scheduler_config().get("num_train_timesteps", 1000)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"scheduler config: num_train_timesteps must be a positive int, got {value!r}")
        return value


# ---------------------------------------------------------------------------------------------- helpers


def read_toml(path: str | os.PathLike) -> dict[str, Any]:
    """The top-level table of a TOML file (Python 3.11's tomllib; tomli on 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        try:
            import tomli as tomllib
        except ImportError:
            raise ConfigError("reading a TOML config on Python 3.10 needs tomli: pip install tomli") from None
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {p}: no such file")
    try:
        with p.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"--config {p}: not valid TOML ({e})") from None


def _field_of(kind: str) -> str:
    return next(name for name, (k, _) in INIT_FLAGS.items() if k == kind)


def _need_file(path: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p}: no such file")
    if not p.is_file():
        raise ConfigError(f"{what} {p}: not a file")


def _need_dir(path: str, what: str) -> None:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{what} {p}: no such folder")
    if not p.is_dir():
        raise ConfigError(f"{what} {p}: not a folder")


def _check_cache(path: str, what: str, kind: str) -> None:
    """A latent cache folder with a readable index of the right kind (its index only: no shard is read)."""
    _need_dir(path, what)
    from .data import DatasetError
    from .latent_cache import read_index

    try:
        index = read_index(path)
    except DatasetError as e:
        raise ConfigError(f"{what}: {e}") from None
    frames = index["latent_shape"][1]
    if kind == "video" and frames < 2:
        raise ConfigError(f"{what} {path}: the cache holds images (F = 1); it must hold videos")
    if kind == "image" and frames != 1:
        raise ConfigError(f"{what} {path}: the cache holds videos (F = {frames}); it must hold images")


def _type_ok(value: Any, hint: Any) -> bool:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_type_ok(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:  # TOML writes 1 for 1.0
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, hint)


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    return "nothing" if hint is type(None) else hint.__name__
