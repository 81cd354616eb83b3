"""`UNet3D`: the PixelDance denoiser.

A Stable-Diffusion-style 2D UNet made 3D with a temporal conv after every 2D ResNet block and a
bidirectional temporal self-attention after every 2D attention block (plus one temporal transformer
after `conv_in`). The input is `[z_t ; c_image]` on channels; the output is the predicted noise.

Architecture, config fields and state-dict keys are those of diffusers' `UNet3DConditionModel`
(ModelScope text-to-video), so those checkpoints load as they are. Two differences, both on purpose:

* For images (F = 1) every temporal layer is bypassed, as the paper does for joint image-video
  training. diffusers still runs them at F = 1, where they are not the identity (the conv's centre tap
  and bias apply, and a one-token softmax still passes V through the output projection), so outputs
  differ from diffusers at F = 1 only. For F > 1 they match.
* `backend` picks the implementation of the hot layers at construction without touching the weights.

Config quirk kept for checkpoint compatibility: the field `attention_head_dim` is used as the *head
dimension* of every attention (heads = channels // attention_head_dim), while `transformer_in` has 8
heads of `attention_head_dim` channels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import BACKENDS, head_dims, resolve_config
from .layers import (
    Downsample2D,
    ResnetBlock2D,
    SpatialTransformer,
    TemporalConvLayer,
    TemporalTransformer,
    TimestepEmbedding,
    Upsample2D,
    group_norm_silu,
    kernel_problem,
    logger,
    timestep_embedding,
    use_kernels,
)

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"
CONFIG_NAME = "config.json"


class UNetBlock3D(nn.Module):
    """One UNet level: `num_layers` x (resnet, temporal conv[, spatial attention, temporal attention]),
    then an optional down- or up-sampler. Up levels concatenate one skip tensor before each resnet."""

    def __init__(self, *, in_channels: int, out_channels: int, temb_channels: int, num_layers: int,
                 cross_attention: bool, cfg: dict[str, Any], head_dim: int, skip_channels: Sequence[int] = (),
                 downsample: bool = False, upsample: bool = False):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        self.has_cross_attention = cross_attention
        self.resnets = nn.ModuleList()
        self.temp_convs = nn.ModuleList()
        for i in range(num_layers):
            res_in = (in_channels if i == 0 else out_channels) + (skip_channels[i] if skip_channels else 0)
            self.resnets.append(ResnetBlock2D(res_in, out_channels, temb_channels, groups, eps))
            self.temp_convs.append(TemporalConvLayer(out_channels, groups))
        if cross_attention:
            heads = out_channels // head_dim
            self.attentions = nn.ModuleList(
                SpatialTransformer(out_channels, heads, head_dim, groups, cfg["cross_attention_dim"])
                for _ in range(num_layers)
            )
            self.temp_attentions = nn.ModuleList(
                TemporalTransformer(out_channels, heads, head_dim, groups) for _ in range(num_layers)
            )
        if downsample:
            self.downsamplers = nn.ModuleList([Downsample2D(out_channels, cfg["downsample_padding"])])
        if upsample:
            self.upsamplers = nn.ModuleList([Upsample2D(out_channels)])

    def layer(self, i: int, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
              num_frames: int) -> torch.Tensor:
        h = self.resnets[i](h, temb)
        if num_frames > 1:
            h = self.temp_convs[i](h, num_frames)
        if self.has_cross_attention:
            h = self.attentions[i](h, context)
            if num_frames > 1:
                h = self.temp_attentions[i](h, num_frames)
        return h


class MidBlock3D(nn.Module):
    """resnet, temporal conv, then (spatial attention, temporal attention, resnet, temporal conv)."""

    def __init__(self, channels: int, temb_channels: int, cfg: dict[str, Any], head_dim: int):
        super().__init__()
        groups, eps = cfg["norm_num_groups"], cfg["norm_eps"]
        scale = cfg["mid_block_scale_factor"]
        heads = channels // head_dim
        self.resnets = nn.ModuleList(
            ResnetBlock2D(channels, channels, temb_channels, groups, eps, output_scale_factor=scale)
            for _ in range(2)
        )
        self.temp_convs = nn.ModuleList(TemporalConvLayer(channels, groups) for _ in range(2))
        self.attentions = nn.ModuleList(
            [SpatialTransformer(channels, heads, head_dim, groups, cfg["cross_attention_dim"])]
        )
        self.temp_attentions = nn.ModuleList([TemporalTransformer(channels, heads, head_dim, groups)])

    def forward(self, h: torch.Tensor, temb: torch.Tensor, context: torch.Tensor,
                num_frames: int) -> torch.Tensor:
        video = num_frames > 1
        h = self.resnets[0](h, temb)
        if video:
            h = self.temp_convs[0](h, num_frames)
        h = self.attentions[0](h, context)
        if video:
            h = self.temp_attentions[0](h, num_frames)
        h = self.resnets[1](h, temb)
        if video:
            h = self.temp_convs[1](h, num_frames)
        return h


class UNet3D(nn.Module):
    """PixelDance denoiser. `forward(sample (B, C, F, H, W), timestep (B,) or scalar,
    encoder_hidden_states (B, L, D)) -> (B, C_out, F, H, W)`."""

    def __init__(self, config: dict[str, Any] | None = None, backend: str = "torch", **overrides: Any):
        super().__init__()
        cfg = resolve_config({**(config or {}), **overrides})
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.config = cfg
        self._backend = "torch"
        ch = cfg["block_out_channels"]
        temb_dim = ch[0] * 4
        dims = head_dims(cfg)

        self.conv_in = nn.Conv2d(cfg["in_channels"], ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.transformer_in = TemporalTransformer(ch[0], 8, dims[0], cfg["norm_num_groups"])

        self.down_blocks = nn.ModuleList()
        out_c = ch[0]
        for i, kind in enumerate(cfg["down_block_types"]):
            in_c, out_c = out_c, ch[i]
            self.down_blocks.append(UNetBlock3D(
                in_channels=in_c, out_channels=out_c, temb_channels=temb_dim,
                num_layers=cfg["layers_per_block"], cross_attention=kind == "CrossAttnDownBlock3D",
                cfg=cfg, head_dim=dims[i], downsample=i < len(ch) - 1,
            ))
        self.mid_block = MidBlock3D(ch[-1], temb_dim, cfg, dims[-1])

        # Skip channels each up level consumes, in the order the down path produced them (popped from
        # the end): conv_in output, then per level `layers_per_block` outputs plus the downsampler's.
        skips = [ch[0]]
        for i in range(len(ch)):
            skips += [ch[i]] * cfg["layers_per_block"] + ([ch[i]] if i < len(ch) - 1 else [])
        rev = list(reversed(ch))
        self.up_blocks = nn.ModuleList()
        prev_c = rev[0]
        n_up = cfg["layers_per_block"] + 1
        for i, kind in enumerate(cfg["up_block_types"]):
            level_skips = [skips.pop() for _ in range(n_up)]
            self.up_blocks.append(UNetBlock3D(
                in_channels=prev_c, out_channels=rev[i], temb_channels=temb_dim, num_layers=n_up,
                cross_attention=kind == "CrossAttnUpBlock3D", cfg=cfg, head_dim=dims[len(ch) - 1 - i],
                skip_channels=level_skips,
                upsample=i < len(ch) - 1,
            ))
            prev_c = rev[i]

        self.conv_norm_out = nn.GroupNorm(cfg["norm_num_groups"], ch[0], eps=cfg["norm_eps"])
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(ch[0], cfg["out_channels"], 3, padding=1)
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        """Switch the implementation of the kernel-backed layers (weights untouched): the temporal conv and
        attention layers, and every transformer's GroupNorm-to-tokens layout and GEGLU. "torch" (PyTorch
        reference), "triton" (the kernels), "auto" (kernels on CUDA inputs, reference on CPU)."""
        if value not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {value!r}")
        if value != "torch":
            try:
                import triton  # noqa: F401
            except ImportError:
                if value == "triton":
                    raise ValueError("backend 'triton' needs triton, which is not installed") from None
                logger.warning("pdengine UNet3D: triton is not installed: backend=auto uses the PyTorch reference")
                value = "torch"
        self._backend = value
        self._announced = False
        for m in self.modules():
            if isinstance(m, (TemporalConvLayer, TemporalTransformer, SpatialTransformer, ResnetBlock2D)):
                m.backend = value

    # ------------------------------------------------------------------ forward
    def condition_features(self, c_image: torch.Tensor) -> torch.Tensor:
        """`conv_in`'s response to the c_image channels alone, (B*F, C0, H, W), without bias.

        conv_in is linear, so conv_in([z ; c]) = conv(z, W_z) + b + conv(c, W_c): a sampler computes this
        once per video batch and passes it as `cond_features` with the plain latent as `sample`. Linear in
        c_image too, so features of the first- and last-frame slots can be mixed per step with the tau
        mask instead of recomputing them at the tau boundary.
        """
        b, c, f, h, w = c_image.shape
        n_z = self.config["in_channels"] - c
        x = c_image.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        return F.conv2d(x, self.conv_in.weight[:, n_z:], None, padding=1)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                encoder_hidden_states: torch.Tensor, cond_features: torch.Tensor | None = None) -> torch.Tensor:
        if sample.is_cuda:
            # Triton launches on the *current* CUDA device: make it the input's (cuda:1, torchrun ranks).
            with torch.cuda.device(sample.device):
                return self._forward(sample, timestep, encoder_hidden_states, cond_features)
        return self._forward(sample, timestep, encoder_hidden_states, cond_features)

    def _forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                 encoder_hidden_states: torch.Tensor, cond_features: torch.Tensor | None) -> torch.Tensor:
        if sample.ndim != 5:
            raise ValueError(f"sample must be (B, C, F, H, W), got shape {tuple(sample.shape)}")
        b, c, f, h, w = sample.shape
        expected = self.config["in_channels"]
        if cond_features is not None:
            if cond_features.shape != (b * f, self.conv_in.out_channels, h, w):
                raise ValueError(f"cond_features must be {(b * f, self.conv_in.out_channels, h, w)}, "
                                 f"got {tuple(cond_features.shape)}")
            if c >= expected:
                raise ValueError(f"with cond_features, sample holds only the latent channels (< {expected}), got {c}")
        elif c != expected:
            raise ValueError(f"sample has {c} channels, the model expects {expected}")
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != b:
            raise ValueError(
                f"encoder_hidden_states must be (B={b}, L, D), got {tuple(encoder_hidden_states.shape)}"
            )
        if not self._announced and self._backend != "torch":
            self._announced = True
            on = use_kernels(self._backend, sample)
            active = "Triton kernels" if on else "PyTorch reference"
            if not on and sample.is_cuda:
                active += f" ({kernel_problem(sample)})"
            gemms = ""
            if on:
                from pdengine.kernels.fused_linear import transformer_gemm_for, transformer_gemm_mode

                gemms = (f"; transformer GEMMs at inference: {transformer_gemm_for(sample.device)} "
                         f"(PDENGINE_TRANSFORMER_GEMM={transformer_gemm_mode()})")
            logger.warning("pdengine UNet3D: backend=%s -> %s for the temporal layers and the transformers' "
                           "norm layout and GEGLU (%s%s)", self._backend, active, sample.device, gemms)
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(b) if t.numel() == 1 else t.reshape(b)

        emb = self.time_embedding(timestep_embedding(t, self.config["block_out_channels"][0]).to(sample.dtype))
        emb = emb.repeat_interleave(f, dim=0)
        # One text per video: the spatial transformers' cross-attention folds each video's frames into one
        # query sequence (`layers._sdpa`), so the text is not repeated per frame.
        context = encoder_hidden_states

        x = sample.permute(0, 2, 1, 3, 4).reshape(b * f, c, h, w)
        if cond_features is None:
            x = self.conv_in(x)
        else:
            x = F.conv2d(x, self.conv_in.weight[:, :c], self.conv_in.bias, padding=1) + cond_features
        if f > 1:
            x = self.transformer_in(x, f)

        skips = [x]
        for block in self.down_blocks:
            for i in range(len(block.resnets)):
                x = block.layer(i, x, emb, context, f)
                skips.append(x)
            if hasattr(block, "downsamplers"):
                x = block.downsamplers[0](x)
                skips.append(x)

        x = self.mid_block(x, emb, context, f)

        for block in self.up_blocks:
            for i in range(len(block.resnets)):
                x = torch.cat([x, skips.pop()], dim=1)
                x = block.layer(i, x, emb, context, f)
            if hasattr(block, "upsamplers"):
                # Odd skip sizes (H, W not a multiple of 2**levels): upsample to the skip's size.
                x = block.upsamplers[0](x, tuple(skips[-1].shape[-2:]))

        x = self.conv_out(group_norm_silu(x, self.conv_norm_out, self._backend))  # conv_act's SiLU inside
        return x.reshape(b, f, -1, h, w).permute(0, 2, 1, 3, 4)

    # ------------------------------------------------------------------ construction / IO
    @classmethod
    def from_preset(cls, name: str, backend: str = "torch", **overrides: Any) -> UNet3D:
        from .config import preset_config

        return cls(preset_config(name, **overrides), backend=backend)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write config.json + diffusion_pytorch_model.safetensors (diffusers' UNet folder format)."""
        from safetensors.torch import save_file

        from .config import diffusers_config

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(directory / WEIGHTS_NAME)
        (directory / CONFIG_NAME).write_text(json.dumps(diffusers_config(self.config), indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path, in_channels: int | None = None, backend: str = "torch",
                        dtype: torch.dtype | None = None, device: str | torch.device | None = None) -> UNet3D:
        """Load a diffusers-format UNet folder (config.json + safetensors; a model folder with a `unet/`
        part also works). With `in_channels` larger than the checkpoint's, the extra `conv_in` input
        channels start at zero, so the model computes exactly what the checkpoint did (ModelScope's 4
        channels -> PixelDance's 8)."""
        from .config import UNetLoadError

        directory = Path(directory)
        if not (directory / CONFIG_NAME).is_file() and (directory / "unet" / CONFIG_NAME).is_file():
            directory = directory / "unet"
        config_path = directory / CONFIG_NAME
        if not config_path.is_file():
            raise UNetLoadError(f"unet: no {CONFIG_NAME} in {directory}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise UNetLoadError(f"unet: {config_path} is not valid JSON ({e})") from None
        state = _read_safetensors(directory)
        ckpt_in = config.get("in_channels", 4)
        if "conv_in.weight" in state:
            ckpt_in = state["conv_in.weight"].shape[1]
        if in_channels is not None:
            if in_channels < ckpt_in:
                raise UNetLoadError(
                    f"unet: asked for in_channels={in_channels} but the checkpoint has {ckpt_in}"
                )
            config["in_channels"] = in_channels
        try:
            with torch.device("meta"):
                model = cls(config, backend=backend)
        except (ValueError, KeyError, TypeError) as e:
            raise UNetLoadError(f"unet: bad config in {config_path}: {e}") from None
        target = model.config["in_channels"]
        if "conv_in.weight" in state and state["conv_in.weight"].shape[1] < target:
            w = state["conv_in.weight"]
            extra = torch.zeros(w.shape[0], target - w.shape[1], *w.shape[2:], dtype=w.dtype)
            state["conv_in.weight"] = torch.cat([w, extra], dim=1)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise UNetLoadError(
                f"unet: checkpoint in {directory} does not match its config: "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''} "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for k, v in state.items():
            if v.shape != expected[k].shape:
                raise UNetLoadError(
                    f"unet: {k} has shape {tuple(v.shape)}, config expects {tuple(expected[k].shape)}"
                )
        dtype = dtype or torch.float32
        state = {k: v.to(device=device or "cpu", dtype=dtype) for k, v in state.items()}
        model.load_state_dict(state, assign=True)
        return model.eval()


def _read_safetensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from .config import UNetLoadError

    single, index = directory / WEIGHTS_NAME, directory / WEIGHTS_INDEX_NAME
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise UNetLoadError(f"unet: bad shard index {index}: {e}") from None
        files = [directory / name for name in sorted(set(weight_map.values()))]
    else:
        pickles = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {pickles}: pickle checkpoints are not loaded; convert them to safetensors)" if pickles else ""
        raise UNetLoadError(f"unet: no {WEIGHTS_NAME} in {directory}{hint}")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types; name the file and re-raise
            raise UNetLoadError(f"unet: cannot read {f}: {e}") from e
    return state
