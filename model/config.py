"""UNet3D configuration: diffusers `UNet3DConditionModel` field names, validation and presets."""

from __future__ import annotations

from typing import Any

BACKENDS = frozenset({"torch", "triton", "auto"})

DOWN_TYPES = ("CrossAttnDownBlock3D", "DownBlock3D")
UP_TYPES = ("CrossAttnUpBlock3D", "UpBlock3D")

# diffusers' UNet3DConditionModel defaults (the ModelScope text-to-video model), field for field.
DEFAULTS: dict[str, Any] = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "cross_attention_dim": 1024,
    "attention_head_dim": 64,
    "num_attention_heads": None,
    "time_cond_proj_dim": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    # ModelScope-sized, 8 input channels ([z_t ; c_image]): 1.41B parameters.
    "pixeldance": {"in_channels": 8, "sample_size": 32},
    "small": {
        "in_channels": 8,
        "block_out_channels": [64, 128, 256, 256],
        "layers_per_block": 2,
        "attention_head_dim": 32,
        "cross_attention_dim": 512,
        "sample_size": 32,
    },
    "tiny": {
        "in_channels": 8,
        "block_out_channels": [32, 64],
        "layers_per_block": 1,
        "down_block_types": ["CrossAttnDownBlock3D", "DownBlock3D"],
        "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D"],
        "norm_num_groups": 8,
        "attention_head_dim": 8,
        "cross_attention_dim": 32,
        "sample_size": 8,
    },
}


class UNetLoadError(ValueError):
    """A UNet folder or config that cannot be loaded; the message names the part and the problem."""


def resolve_config(config: dict[str, Any]) -> dict[str, Any]:
    """Fill defaults, drop diffusers' bookkeeping keys (`_class_name`, ...) and validate."""
    cfg = dict(DEFAULTS)
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in DEFAULTS:
            raise ValueError(f"unknown UNet3D config field {key!r}")
        cfg[key] = value
    for key in ("down_block_types", "up_block_types", "block_out_channels"):
        cfg[key] = list(cfg[key])
    n = len(cfg["block_out_channels"])
    if len(cfg["down_block_types"]) != n or len(cfg["up_block_types"]) != n:
        raise ValueError("down_block_types, up_block_types and block_out_channels must have the same length")
    for t in cfg["down_block_types"]:
        if t not in DOWN_TYPES:
            raise ValueError(f"unsupported down block type {t!r} (expected one of {DOWN_TYPES})")
    for t in cfg["up_block_types"]:
        if t not in UP_TYPES:
            raise ValueError(f"unsupported up block type {t!r} (expected one of {UP_TYPES})")
    if cfg["num_attention_heads"] is not None:
        raise ValueError("num_attention_heads is not supported (diffusers' UNet3DConditionModel rejects it too)")
    if cfg["time_cond_proj_dim"] is not None:
        raise ValueError("time_cond_proj_dim is not supported")
    if cfg["act_fn"] != "silu":
        raise ValueError(f"act_fn must be 'silu', got {cfg['act_fn']!r}")
    hd = cfg["attention_head_dim"]
    if isinstance(hd, (list, tuple)):
        cfg["attention_head_dim"] = hd = list(hd)
        if len(hd) != n:
            raise ValueError(f"attention_head_dim has {len(hd)} entries for {n} levels")
    groups = cfg["norm_num_groups"]
    if not isinstance(groups, int) or groups <= 0:
        raise ValueError(f"norm_num_groups must be a positive int, got {groups!r}")
    for c, d in zip(cfg["block_out_channels"], head_dims(cfg)):
        if not isinstance(d, int) or d <= 0:
            raise ValueError(f"attention_head_dim must be a positive int or one per level, got {hd!r}")
        if c % groups:
            raise ValueError(f"block_out_channels {c} is not divisible by norm_num_groups {groups}")
        if c % d:
            raise ValueError(f"block_out_channels {c} is not divisible by its attention head dim {d}")
    if cfg["in_channels"] < 1 or cfg["out_channels"] < 1:
        raise ValueError("in_channels and out_channels must be positive")
    return cfg


def head_dims(cfg: dict[str, Any]) -> list[int]:
    """Attention head dimension per UNet level. One int (diffusers' UNet3DConditionModel, ModelScope) or,
    as this project's extension, one per level (needed to inflate SD 1.x UNets, whose levels keep 8 heads
    of growing width); `transformer_in` uses the first level's."""
    hd = cfg["attention_head_dim"]
    return list(hd) if isinstance(hd, list) else [hd] * len(cfg["block_out_channels"])


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return resolve_config({**PRESETS[name], **overrides})


def diffusers_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The config.json a diffusers `UNet3DConditionModel` folder holds."""
    try:
        from diffusers import __version__ as diffusers_version
    except ImportError:  # diffusers is a dependency; this only keeps save usable in a stripped env
        diffusers_version = "0.30.0"
    return {"_class_name": "UNet3DConditionModel", "_diffusers_version": diffusers_version, **cfg}


def count_parameters(name_or_config: str | dict[str, Any]) -> int:
    """Parameter count of a preset or config, built on the meta device (no memory, no time)."""
    import torch

    from .unet3d import UNet3D

    cfg = preset_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    with torch.device("meta"):
        model = UNet3D(cfg)
    return sum(p.numel() for p in model.parameters())
