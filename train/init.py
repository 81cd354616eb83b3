"""Where a PixelDance UNet starts from: a PixelDance folder, a ModelScope text-to-video folder (conv_in
expanded), a Stable Diffusion 2D UNet inflated to 3D, or a preset with fresh weights.

Inflation (`inflate_from_sd`): every spatial weight of the 2D UNet is copied under the same key (the
UNet3D layout is the 2D one plus temporal layers); the new temporal layers start as the identity (each
temporal conv's last conv and each temporal transformer's `proj_out` are zero), and the c_image input
channels of `conv_in` start at zero. So the inflated model initially computes, frame by frame, exactly
what the 2D model did.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pdengine.model import UNet3D
from pdengine.model.layers import TemporalTransformer
from pdengine.model.unet3d import _read_safetensors

INIT_KINDS = ("model", "modelscope", "sd", "preset")

_BLOCK_MAP = {
    "CrossAttnDownBlock2D": "CrossAttnDownBlock3D",
    "DownBlock2D": "DownBlock3D",
    "CrossAttnUpBlock2D": "CrossAttnUpBlock3D",
    "UpBlock2D": "UpBlock3D",
}

# 2D UNet config fields whose non-default values this inflation cannot represent.
_MUST_BE = {
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "only_cross_attention": False,
    "dual_cross_attention": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "num_class_embeds": None,
    "resnet_time_scale_shift": "default",
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_type": "default",
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "projection_class_embeddings_input_dim": None,
    "class_embeddings_concat": False,
    "act_fn": "silu",
}


def _unet_dir(path: Path) -> Path:
    return path / "unet" if (path / "unet" / "config.json").is_file() else path


def unet3d_config_from_sd(sd_config: dict, in_channels: int) -> dict:
    """The UNet3D config whose spatial part is the given UNet2DConditionModel config."""
    name = sd_config.get("_class_name", "UNet2DConditionModel")
    if name != "UNet2DConditionModel":
        raise ValueError(f"expected a UNet2DConditionModel config, got {name!r}")
    for key, want in _MUST_BE.items():
        if key in sd_config and sd_config[key] != want:
            raise ValueError(f"cannot inflate a 2D UNet with {key}={sd_config[key]!r} (supported: {want!r})")
    tl = sd_config.get("transformer_layers_per_block", 1)
    if (tl if isinstance(tl, int) else max(tl)) != 1:
        raise ValueError("cannot inflate a 2D UNet with transformer_layers_per_block > 1")
    down = [_BLOCK_MAP.get(t, t) for t in sd_config["down_block_types"]]
    up = [_BLOCK_MAP.get(t, t) for t in sd_config["up_block_types"]]
    channels = list(sd_config["block_out_channels"])
    # diffusers' 2D naming: `attention_head_dim` holds the number of HEADS unless num_attention_heads is set.
    heads = sd_config.get("num_attention_heads") or sd_config.get("attention_head_dim", 8)
    heads = list(heads) if isinstance(heads, (list, tuple)) else [heads] * len(channels)
    dims = [c // h for c, h in zip(channels, heads)]
    if any(c % h for c, h in zip(channels, heads)):
        raise ValueError(f"channels {channels} are not divisible by the head counts {heads}")
    return {
        "sample_size": sd_config.get("sample_size"),
        "in_channels": in_channels,
        "out_channels": sd_config.get("out_channels", 4),
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": channels,
        "layers_per_block": sd_config.get("layers_per_block", 2),
        "downsample_padding": sd_config.get("downsample_padding", 1),
        "mid_block_scale_factor": sd_config.get("mid_block_scale_factor", 1.0),
        "act_fn": "silu",
        "norm_num_groups": sd_config.get("norm_num_groups", 32),
        "norm_eps": sd_config.get("norm_eps", 1e-5),
        "cross_attention_dim": sd_config.get("cross_attention_dim", 1280),
        "attention_head_dim": dims[0] if len(set(dims)) == 1 else dims,
    }


def inflate_from_sd(source: str | Path, in_channels: int = 8, backend: str = "torch") -> UNet3D:
    """A UNet3D whose spatial layers are the SD 2D UNet's and whose temporal layers are the identity."""
    unet_dir = _unet_dir(Path(source))
    config_path = unet_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"no UNet config at {config_path}")
    sd_config = json.loads(config_path.read_text())
    config = unet3d_config_from_sd(sd_config, in_channels)
    state = _read_safetensors(unet_dir)
    model = UNet3D(config, backend=backend)
    # SD 1.x projects in/out of its transformers with 1x1 convs; ours are linear layers: same numbers.
    for key, value in list(state.items()):
        if (".proj_in.weight" in key or ".proj_out.weight" in key) and value.ndim == 4:
            state[key] = value[:, :, 0, 0]
    w = state["conv_in.weight"]
    if w.shape[1] > in_channels:
        raise ValueError(f"the 2D UNet has {w.shape[1]} input channels, more than in_channels={in_channels}")
    state["conv_in.weight"] = torch.cat([w, w.new_zeros(w.shape[0], in_channels - w.shape[1], *w.shape[2:])], 1)
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"2D UNet weights with no place in the UNet3D: {unexpected[:5]}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: 2D UNet shape {tuple(value.shape)} != UNet3D {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TemporalTransformer):
                m.proj_out.weight.zero_()
                m.proj_out.bias.zero_()
    return model


def init_unet(kind: str, source: str | Path, in_channels: int = 8, backend: str = "torch") -> UNet3D:
    """The UNet a training run starts from. kind: "model" (a PixelDance folder), "modelscope" (a
    text-to-video folder: conv_in gains zero c_image channels), "sd" (a Stable Diffusion UNet, inflated),
    "preset" (fresh weights of a named preset)."""
    if kind == "model":
        model = UNet3D.from_pretrained(_unet_dir(Path(source)), backend=backend)
        if model.config["in_channels"] != in_channels:
            raise ValueError(f"{source}: unet has {model.config['in_channels']} input channels, expected "
                             f"{in_channels} (a ModelScope folder? use --init-from-modelscope)")
        return model
    if kind == "modelscope":
        return UNet3D.from_pretrained(_unet_dir(Path(source)), in_channels=in_channels, backend=backend)
    if kind == "sd":
        return inflate_from_sd(source, in_channels=in_channels, backend=backend)
    if kind == "preset":
        return UNet3D.from_preset(str(source), backend=backend, in_channels=in_channels)
    raise ValueError(f"init kind must be one of {INIT_KINDS}, got {kind!r}")
