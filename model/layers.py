"""Building blocks of the PixelDance UNet, in plain PyTorch.

Parameter names follow diffusers' `UNet3DConditionModel` (ModelScope text-to-video) exactly, so its
checkpoints load key for key; the forward code is this project's own and works on the (B*F, C, H, W)
layout the whole UNet uses, reshaping to frames only where a temporal layer needs it.

Temporal layers take `num_frames` and are never called for images (F = 1): the UNet skips them, as the
paper does for joint image-video training.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger("pdengine")


# Triton generates code for NVIDIA GPUs of compute capability 8.0 and newer (Ampere, Ada, Hopper, ...); the
# kernels also use bf16 tensor-core instructions and asynchronous copies, which older GPUs lack.
MIN_CAPABILITY = (8, 0)


_GPU_PROBLEMS: dict[int, str] = {}  # per device index: asked once (every layer asks at every call)


@torch.compiler.assume_constant_result  # read once while tracing, a constant in the compiled graph
def gpu_kernel_problem(index: int) -> str:
    """Why CUDA device `index` cannot run the Triton kernels ("" when it can)."""
    if index not in _GPU_PROBLEMS:
        major, minor = torch.cuda.get_device_capability(index)
        _GPU_PROBLEMS[index] = "" if (major, minor) >= MIN_CAPABILITY else (
            f"{torch.cuda.get_device_name(index)} is compute capability {major}.{minor}; the Triton kernels "
            f"need {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer (Ampere, Ada, Hopper)")
    return _GPU_PROBLEMS[index]


def kernel_problem(x: torch.Tensor) -> str:
    """Why the Triton kernels cannot run on x's device ("" when they can: CPU and meta tensors have no
    such limit here; `use_kernels` handles the interpreter)."""
    if not x.is_cuda:
        return ""
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    return gpu_kernel_problem(index)


def use_kernels(backend: str, x: torch.Tensor) -> bool:
    """Whether a layer runs its Triton kernel for input `x`: always for "triton", on CUDA tensors of a GPU
    the kernels support for "auto" (the UNet says once when it falls back, and why), never for "torch". CPU
    tensors reach the kernels only through the Triton interpreter; `meta` tensors (shape-only counting) reach
    their operators' fake implementations. "triton" on a GPU older than `MIN_CAPABILITY` is an error."""
    if backend == "torch" or (backend == "auto" and not x.is_cuda):
        return False
    if x.is_cuda:
        problem = kernel_problem(x)
        if problem and backend == "triton":
            raise RuntimeError(f"backend='triton': {problem}; use backend='auto' (the PyTorch reference there) "
                               "or 'torch'")
        return not problem
    if not x.is_cuda and not x.is_meta and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 to run the kernels in Triton's CPU "
            "interpreter); use backend='auto' to pick the PyTorch reference on the CPU"
        )
    return True


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps -> (B, dim) fp32, cosine half first (flip_sin_to_cos,
    frequency shift 0: the SD / ModelScope convention)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    args = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_dim: int, embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, embed_dim)
        self.linear_2 = nn.Linear(embed_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


def video_group_norm(
    x: torch.Tensor, num_frames: int, norm: nn.GroupNorm
) -> torch.Tensor:
    """GroupNorm whose statistics span channels-of-group x frames x pixels of each video.

    x: (B*F, C, H, W). Equivalent to `norm` applied to the (B, C, F, H, W) video, but computed in the
    (B, F, C, H, W) layout without a permute copy. Statistics in fp32.
    """
    bf, c, h, w = x.shape
    b, g = bf // num_frames, norm.num_groups
    xg = x.reshape(b, num_frames, g, c // g, h * w).float()
    var, mean = torch.var_mean(xg, dim=(1, 3, 4), keepdim=True, unbiased=False)
    y = (xg - mean) * torch.rsqrt(var + norm.eps)
    y = y.reshape(b, num_frames, c, h * w)
    if norm.affine:
        y = y * norm.weight.float()[None, None, :, None] + norm.bias.float()[None, None, :, None]
    return y.reshape(bf, c, h, w).to(x.dtype)


def needs_grad(x: torch.Tensor, module: nn.Module) -> bool:
    """Whether autograd would record a call of `module` on x."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def fused_transformer_gemms(x: torch.Tensor, module: nn.Module, backend: str) -> bool:
    """Whether `module` (a transformer or one of its blocks) runs its GEMMs fused with their neighbours
    (kernels/fused_linear.py): kernels on, `PDENGINE_TRANSFORMER_GEMM=fused`, no gradients, eager (under
    torch.compile the compiler fuses the norms and residual adds itself, and the folded weights' cache
    would break its graph)."""
    if not use_kernels(backend, x) or torch.compiler.is_compiling():
        return False
    from pdengine.kernels.fused_linear import transformer_gemm_for

    return transformer_gemm_for(x.device, module.gemm_level) == "fused" and not needs_grad(x, module)


def _norm_proj_in(module: nn.Module, x: torch.Tensor, num_frames: int, fused: bool) -> tuple[torch.Tensor, Any]:
    """A transformer's GroupNorm (statistics per video of `num_frames` images), token rows in (b, f, p) order
    and proj_in, from x (B*F, C, H, W). In the fused mode (`fused`: `fused_transformer_gemms` of the
    transformer) also the first block's LayerNorm statistics of the output from the GEMM's epilogue (None
    otherwise), and where the images are large enough (`group_norm_fold_ok`) the norm is folded into proj_in:
    one read of x for the statistics, and the GEMM normalises x's tiles as it loads them (the normalised
    tokens are never written). Otherwise the GroupNorm-to-tokens layout kernel, then proj_in."""
    from pdengine.kernels import fused_linear as fl
    from pdengine.kernels.temporal_attention import video_group_norm_to_tokens

    norm, proj = module.norm, module.proj_in
    if fused and fl.group_norm_fold_ok(x.shape[2] * x.shape[3], x.dtype):
        stats = fl.video_group_stats(x, num_frames, norm.num_groups, norm.eps)
        return fl.group_norm_linear(x, num_frames, stats, _folded_group_norm(module), stats_out=True)
    t = video_group_norm_to_tokens(x, num_frames, norm.weight, norm.bias, norm.num_groups, norm.eps)
    if fused:
        return fl.fused_linear(t, proj.weight, proj.bias, stats_out=True)
    return proj(t), None


# The attributes where inference keeps tensors derived from the weights (packed or folded copies).
WEIGHT_CACHES = ("_gn_fold_cache", "_packed_qkv", "_fold_cache")


def clear_weight_caches(model: nn.Module) -> int:
    """Drop every derived-weight copy kept for inference (they are rebuilt on the next call); returns how
    many were dropped. Memory measurements use it to start each configuration from the weights alone."""
    dropped = 0
    for module in model.modules():
        for name in WEIGHT_CACHES:
            if getattr(module, name, None) is not None:
                setattr(module, name, None)
                dropped += 1
    return dropped


def _folded_group_norm(module: nn.Module) -> Any:
    """The transformer's GroupNorm affine folded into its proj_in (`fused_linear.fold_layer_norm`: W * gamma,
    b + W @ beta), once per weight version, device and dtype."""
    from pdengine.kernels.fused_linear import fold_layer_norm

    norm, proj = module.norm, module.proj_in
    params = (norm.weight, norm.bias, proj.weight, proj.bias)
    key = tuple((p.data_ptr(), p._version, p.dtype) for p in params if p is not None)
    cached = getattr(module, "_gn_fold_cache", None)
    if cached is None or cached[0] != key:
        cached = (key, fold_layer_norm(norm.weight, norm.bias, norm.eps, proj.weight, proj.bias))
        module._gn_fold_cache = cached
    return cached[1]


def _proj_out_residual(module: nn.Module, t: torch.Tensor, x: torch.Tensor, num_frames: int,
                       fused: bool) -> torch.Tensor:
    """x + proj_out(t) in x's (B*F, C, H, W) layout for (image, pixel)-ordered token rows t: one fused GEMM
    in the fused mode (`fused`, where the image size allows), else proj_out then the layout kernel."""
    from pdengine.kernels.fused_linear import linear_to_video_residual, video_layout_ok
    from pdengine.kernels.temporal_attention import tokens_to_video_residual

    proj = module.proj_out
    if fused and video_layout_ok(x.shape[2] * x.shape[3], x.dtype):
        return linear_to_video_residual(t, proj.weight, proj.bias, x)
    return tokens_to_video_residual(proj(t), x, num_frames)


def group_norm_silu(x: torch.Tensor, norm: nn.GroupNorm, backend: str,
                    shift: torch.Tensor | None = None) -> torch.Tensor:
    """silu(norm(x + shift[:, :, None, None])): one Triton pass each way with the kernels on
    (kernels/group_norm_silu.py), the eager ops otherwise."""
    if use_kernels(backend, x):
        from pdengine.kernels.group_norm_silu import group_norm_silu as fused

        return fused(x, norm.weight, norm.bias, norm.num_groups, norm.eps, shift)
    if shift is not None:
        x = x + shift[:, :, None, None]
    return F.silu(norm(x))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice, with the timestep embedding added between; 1x1 shortcut when the
    channel count changes. With the kernels on each GroupNorm + SiLU (and the timestep add before the
    second) is one Triton pass, forward and backward."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(0.0)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(group_norm_silu(x, self.norm1, self.backend))
        h = group_norm_silu(h, self.norm2, self.backend, shift=self.time_emb_proj(F.silu(temb)))
        h = self.conv2(self.dropout(h))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        out = x + h
        if self.output_scale_factor != 1.0:
            out = out / self.output_scale_factor
        return out


def _temporal_stage(in_dim: int, out_dim: int, groups: int, dropout: float | None) -> nn.Sequential:
    # The Sequential indices are the checkpoint's key names (conv1.0 / conv1.2, convN.0 / convN.3).
    layers: list[nn.Module] = [nn.GroupNorm(groups, in_dim), nn.SiLU()]
    if dropout is not None:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Conv3d(in_dim, out_dim, (3, 1, 1), padding=(1, 0, 0)))
    return nn.Sequential(*layers)


def temporal_conv1d(x: torch.Tensor, num_frames: int, conv: nn.Conv3d) -> torch.Tensor:
    """Kernel-3, padding-1 convolution over frames of x (B*F, C, H, W), as three per-frame 1x1 convs
    (channel GEMMs) on time-shifted frames: no (B, C, F, H, W) permute copy."""
    bf, c, h, w = x.shape
    b = bf // num_frames
    weight = conv.weight  # (C_out, C_in, 3, 1, 1)
    taps = [F.conv2d(x, weight[:, :, k]) for k in range(3)]  # tap k multiplies frame f + k - 1
    taps = [t.reshape(b, num_frames, -1, h, w) for t in taps]
    out = taps[1].clone()
    out[:, 1:] += taps[0][:, :-1]
    out[:, :-1] += taps[2][:, 1:]
    out = out + conv.bias[None, None, :, None, None]
    return out.reshape(bf, -1, h, w)


class TemporalConvLayer(nn.Module):
    """Four (GroupNorm -> SiLU -> [dropout] -> conv over frames) stages with a residual around them.

    The GroupNorms normalise each video over channels-of-group x frames x pixels. The last conv starts at
    zero, so a freshly inserted layer is the identity.
    """

    def __init__(self, dim: int, groups: int, dropout: float = 0.1, backend: str = "torch"):
        super().__init__()
        self.backend = backend
        self.conv1 = _temporal_stage(dim, dim, groups, None)
        self.conv2 = _temporal_stage(dim, dim, groups, dropout)
        self.conv3 = _temporal_stage(dim, dim, groups, dropout)
        self.conv4 = _temporal_stage(dim, dim, groups, dropout)
        nn.init.zeros_(self.conv4[-1].weight)
        nn.init.zeros_(self.conv4[-1].bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        stages = (self.conv1, self.conv2, self.conv3, self.conv4)
        if use_kernels(self.backend, x):
            from pdengine.kernels.temporal_conv import temporal_conv_block

            return temporal_conv_block(
                x, num_frames, [(s[0].weight, s[0].bias) for s in stages], [(s[-1].weight, s[-1].bias) for s in stages],
                groups=self.conv1[0].num_groups, eps=self.conv1[0].eps,
                dropout_p=self.conv2[2].p if self.training else 0.0, training=self.training,
            )
        h = x
        for stage in stages:
            norm, conv = stage[0], stage[-1]
            h = F.silu(video_group_norm(h, num_frames, norm))
            if len(stage) == 4:
                h = stage[2](h)
            h = temporal_conv1d(h, num_frames, conv)
        return x + h


class Attention(nn.Module):
    """Multi-head attention (self or cross) with bias-free q/k/v projections, through PyTorch SDPA."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None):
        super().__init__()
        inner = heads * dim_head
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        o = _sdpa(self, self.to_q(x), self.to_k(context), self.to_v(context))
        return self.to_out[1](self.to_out[0](o))

    def packed_qkv_weight(self, x: torch.Tensor) -> torch.Tensor:
        """[W_q; W_k; W_v] for one self-attention projection GEMM on x. Without gradients (and outside
        torch.compile) the concatenation is kept per weight version, dtype and device instead of being redone
        at every call (3 x inner x dim written and read again: 10 MB per attention at C = 1280). The copy
        stays beside the weights: 216 MiB in bf16 for the `pixeldance` preset's self-attentions."""
        weights = (self.to_q.weight, self.to_k.weight, self.to_v.weight)
        if needs_grad(x, self) or torch.compiler.is_compiling():
            return torch.cat(weights)
        key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in weights)
        cached = getattr(self, "_packed_qkv", None)
        if cached is None or cached[0] != key:
            cached = (key, torch.cat(weights))
            self._packed_qkv = cached
        return cached[1]


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with 4x inner width (keys net.0.proj, net.2). With the kernels on, the GEGLU's
    gate runs as one Triton pass over the projection (kernels/geglu.py), or at inference with
    the transformer GEMMs fused (`PDENGINE_TRANSFORMER_GEMM`) fused with the projection in one Triton GEMM."""

    def __init__(self, dim: int, mult: int = 4, backend: str = "torch"):
        super().__init__()
        inner = dim * mult
        self.backend = backend
        self.gemm_level: str | None = None  # the transformer size it belongs to (`_set_gemm_level`)
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(0.0), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_kernels(self.backend, x):
            from pdengine.kernels.fused_linear import transformer_gemm_for
            from pdengine.kernels.geglu import ff_geglu, geglu

            proj = self.net[0].proj
            if not needs_grad(x, proj) and not torch.compiler.is_compiling() and \
                    transformer_gemm_for(x.device, self.gemm_level) == "fused":
                x = ff_geglu(x, proj.weight, proj.bias)
            else:
                x = geglu(proj(x))
            return self.net[2](self.net[1](x))
        for layer in self.net:
            x = layer(x)
        return x


class _BackendSwitch:
    """`backend` of a transformer layer: setting it also switches its feed-forwards' GEGLU kernel. Also names the
    layer's size for the per-size transformer GEMM choice (`_set_gemm_level`)."""

    def _set_gemm_level(self, kind: str, channels: int, inner: int) -> None:
        """Name this transformer's size (`temporal_conv_table.gemm_level`) on it, its blocks and their
        feed-forwards: a launch table may choose the fused or the cuBLAS GEMMs per transformer size."""
        from pdengine.kernels.temporal_conv_table import gemm_level

        level = gemm_level(kind, channels, inner)
        for m in self.modules():
            if isinstance(m, (_BackendSwitch, TransformerBlock, FeedForward)):
                m.gemm_level = level

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        self._backend = value
        for m in self.modules():
            if isinstance(m, FeedForward):
                m.backend = value


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, then cross-attention (or a second self-attention when
    `cross_attention_dim` is None: the temporal blocks), then GEGLU feed-forward; residual after each."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int | None, backend: str = "torch"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn1 = Attention(dim, heads, dim_head)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim)
        self.norm3 = nn.LayerNorm(dim, eps=1e-5)
        self.ff = FeedForward(dim, backend=backend)
        self._self_attn2 = cross_attention_dim is None
        self.gemm_level: str | None = None  # set by the transformer holding it

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, partials: Any = None) -> torch.Tensor:
        """`partials`: in the fused mode, x's LayerNorm statistics from the GEMM that wrote it
        (`fused_linear.RowPartials`), else they are computed from x."""
        if self._fused_inference(x):
            return self._forward_fused(x, context, partials=partials)
        if use_kernels(self.ff.backend, x):  # one packed q/k/v GEMM (x read once), as the temporal blocks do
            y = _packed_self_attention(self.attn1, self.norm1(x))
        else:
            y = self.attn1(self.norm1(x))
        if self._add_norm_kernel(x):
            x, h = _add_norm(x, y, self.norm2)
            x, h = _add_norm(x, self.attn2(h, context), self.norm3)
            return x + self.ff(h)
        x = x + y
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

    def forward_frames(self, t: torch.Tensor, num_frames: int, pixels: int, partials: Any = None) -> torch.Tensor:
        """The temporal block on token rows (N, dim) in (b, f, p) order, attention by the Triton kernel:
        q/k/v come from one fused projection GEMM and the kernel reads them in place (no permutes)."""
        if self._fused_inference(t):
            return self._forward_fused(t, None, (num_frames, pixels), partials)
        y = _kernel_self_attention(self.attn1, self.norm1(t), num_frames, pixels)
        if self._add_norm_kernel(t):
            t, h = _add_norm(t, y, self.norm2)
            t, h = _add_norm(t, _kernel_self_attention(self.attn2, h, num_frames, pixels), self.norm3)
            return t + self.ff(h)
        t = t + y
        t = t + _kernel_self_attention(self.attn2, self.norm2(t), num_frames, pixels)
        return t + self.ff(self.norm3(t))

    def _add_norm_kernel(self, x: torch.Tensor) -> bool:
        """Whether the residual adds run with the next LayerNorm as one kernel (kernels/add_layer_norm.py):
        kernels on, no gradients, eager (the compiler fuses them itself), rows of at most 2048 channels."""
        if not use_kernels(self.ff.backend, x) or needs_grad(x, self) or torch.compiler.is_compiling():
            return False
        if x.shape[-1] > 2048:
            if not getattr(self, "_warned_add_norm", False):
                self._warned_add_norm = True
                logger.warning("pdengine transformer block: %d channels is over the add + LayerNorm kernel's 2048; "
                               "this block runs them as separate ops", x.shape[-1])
            return False
        return True

    # -- inference with the transformer GEMMs fused (`PDENGINE_TRANSFORMER_GEMM=fused`) ----------------------

    def _fused_inference(self, x: torch.Tensor) -> bool:
        return fused_transformer_gemms(x, self, self.ff.backend)

    def _folds(self) -> dict[str, Any]:
        """Each LayerNorm folded into the projection after it (`fused_linear.fold_layer_norm`): computed once
        per weight version, device and dtype, and held beside the weights (about the size of the q/k/v and
        feed-forward projections again)."""
        from pdengine.kernels.fused_linear import fold_layer_norm

        params = list(self.parameters())
        key = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        cached = getattr(self, "_fold_cache", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        a1, a2, proj = self.attn1, self.attn2, self.ff.net[0].proj

        def qkv(attn):
            return torch.cat([attn.to_q.weight, attn.to_k.weight, attn.to_v.weight])

        folds = {
            "attn1": fold_layer_norm(self.norm1.weight, self.norm1.bias, self.norm1.eps, qkv(a1)),
            "attn2": fold_layer_norm(self.norm2.weight, self.norm2.bias, self.norm2.eps,
                                     qkv(a2) if self._self_attn2 else a2.to_q.weight),
            "ff": fold_layer_norm(self.norm3.weight, self.norm3.bias, self.norm3.eps, proj.weight, proj.bias),
        }
        self._fold_cache = (key, folds)
        return folds

    def _forward_fused(self, x: torch.Tensor, context: torch.Tensor | None, frames: tuple[int, int] | None = None,
                       partials: Any = None) -> torch.Tensor:
        """The block with each LayerNorm folded into the projection after it (its statistics from the
        epilogue of the GEMM before it), each residual add in the output projection's epilogue
        (kernels/fused_linear.py), the feed-forward's projection and gate in one kernel: the norms' outputs,
        the projections' outputs before the residual and the feed-forward's projection never reach memory,
        and the rows are never re-read for statistics. `frames` = (num_frames, pixels): token rows for the
        temporal attention kernel; otherwise (n, L, dim) sequences through SDPA."""
        from pdengine.kernels.fused_linear import fused_linear, layer_norm_linear, merge_row_stats, row_stats
        from pdengine.kernels.geglu import ff_geglu

        folds = self._folds()
        eps = folds["attn1"].eps
        stats = merge_row_stats(partials, eps) if partials is not None else row_stats(x, eps)
        for attn, name, following in ((self.attn1, "attn1", "attn2"), (self.attn2, "attn2", "ff")):
            if name == "attn1" or self._self_attn2:
                o = _attend_packed(attn, layer_norm_linear(x, folds[name], stats), frames)
            else:
                q = layer_norm_linear(x, folds[name], stats)
                o = _sdpa(attn, q, attn.to_k(context), attn.to_v(context))
            x, partials = fused_linear(o, attn.to_out[0].weight, attn.to_out[0].bias, residual=x, stats_out=True)
            stats = merge_row_stats(partials, folds[following].eps)
        ff = folds["ff"]
        h = ff_geglu(x, ff.weight, ff.bias, stats=stats, colsum=ff.colsum)
        return fused_linear(h, self.ff.net[2].weight, self.ff.net[2].bias, residual=x)


def _sdpa(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Multi-head SDPA of (n, Lq, inner) queries on (nk, Lk, inner) keys and values (any row strides), back to
    (n, Lq, inner). nk may divide n: each key/value sequence then serves n / nk consecutive query sequences (a
    video's frames attending to its one text: attention is per query row, so the frames fold into one longer
    query sequence, and the text's keys and values are projected once per video instead of once per frame)."""
    n, lq, _ = q.shape
    nk = k.shape[0]
    if n % nk:
        raise ValueError(f"{n} query sequences cannot share {nk} key/value sequences")
    q = q.reshape(nk, (n // nk) * lq, attn.heads, -1).transpose(1, 2)
    k, v = (t.reshape(nk, t.shape[1], attn.heads, -1).transpose(1, 2) for t in (k, v))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, lq, -1)


def _attend_packed(attn: Attention, qkv: torch.Tensor, frames: tuple[int, int] | None) -> torch.Tensor:
    """Self-attention on one packed [q | k | v] projection: the temporal kernel reads token rows in place
    (`frames` = (num_frames, pixels)); otherwise SDPA on its three column slices."""
    if frames is not None:
        from pdengine.kernels.temporal_attention import temporal_attention_qkv

        return temporal_attention_qkv(qkv, frames[0], attn.heads, pixels=frames[1])
    return _sdpa(attn, *qkv.chunk(3, dim=-1))


def _add_norm(x: torch.Tensor, y: torch.Tensor, norm: nn.LayerNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """(x + y, norm(x + y)) in one Triton pass."""
    from pdengine.kernels.add_layer_norm import add_layer_norm

    return add_layer_norm(x, y, norm.weight, norm.bias, norm.eps)


def _packed_self_attention(attn: Attention, h: torch.Tensor) -> torch.Tensor:
    """attn(h) for self-attention on (n, L, dim) sequences with q, k, v from one packed projection GEMM."""
    o = _attend_packed(attn, F.linear(h, attn.packed_qkv_weight(h)), None)
    return attn.to_out[1](attn.to_out[0](o))


def _kernel_self_attention(attn: Attention, h: torch.Tensor, num_frames: int, pixels: int) -> torch.Tensor:
    from pdengine.kernels.temporal_attention import temporal_attention_qkv

    qkv = F.linear(h, attn.packed_qkv_weight(h))
    o = temporal_attention_qkv(qkv, num_frames, attn.heads, pixels=pixels)
    return attn.to_out[1](attn.to_out[0](o))


class SpatialTransformer(_BackendSwitch, nn.Module):
    """Per-frame 2D transformer: GroupNorm, linear proj_in over pixels, one block with text
    cross-attention, linear proj_out, residual. `context`: (B*F, L, D), one text per frame, or (B, L, D), one
    per video of F consecutive frames (what the UNet passes: the text's keys and values are then projected
    once per video)."""

    def __init__(self, channels: int, heads: int, dim_head: int, groups: int, cross_attention_dim: int,
                 backend: str = "torch"):
        super().__init__()
        inner = heads * dim_head
        self.backend = backend
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, dim_head, cross_attention_dim,
                                                                  backend)])
        self.proj_out = nn.Linear(inner, channels)
        self._set_gemm_level("spatial", channels, inner)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        bf, c, h, w = x.shape
        if use_kernels(self.backend, x):
            # The temporal transformer's layout kernels with one frame per "video": the per-image GroupNorm
            # writes token rows directly (or folds into proj_in), and the way back is fused with the residual
            # add (no permute copies).
            x = x.contiguous()
            fused = fused_transformer_gemms(x, self, self.backend)  # once per call, for proj_in and proj_out
            t, partials = _norm_proj_in(self, x, 1, fused)
            t = t.view(bf, h * w, -1)
            for block in self.transformer_blocks:
                t, partials = block(t, context, partials), None
            return _proj_out_residual(self, t.view(bf * h * w, -1), x, 1, fused)
        t = self.norm(x).permute(0, 2, 3, 1).reshape(bf, h * w, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t, context)
        t = self.proj_out(t)
        return x + t.reshape(bf, h, w, c).permute(0, 3, 1, 2)


class TemporalTransformer(_BackendSwitch, nn.Module):
    """Bidirectional self-attention over the frames of every pixel: GroupNorm per video, proj_in,
    one block of two self-attentions (no mask) and a feed-forward, proj_out, residual."""

    def __init__(self, channels: int, heads: int, dim_head: int, groups: int, backend: str = "torch"):
        super().__init__()
        inner = heads * dim_head
        self.backend = backend
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(inner, heads, dim_head, None, backend)])
        self.proj_out = nn.Linear(inner, channels)
        self._set_gemm_level("temporal", channels, inner)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b = bf // num_frames
        if use_kernels(self.backend, x) and self._kernel_fits(num_frames):
            return self._forward_kernels(x, num_frames)
        t = video_group_norm(x, num_frames, self.norm)
        # (B, F, C, H, W) -> (B*H*W, F, C): one short sequence per pixel.
        t = t.reshape(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        t = self.proj_in(t)
        for block in self.transformer_blocks:
            t = block(t)
        t = self.proj_out(t)
        t = t.reshape(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bf, c, h, w)
        return x + t

    def _kernel_fits(self, num_frames: int) -> bool:
        """The attention kernel covers head dims up to 128 and 1..64 frames; outside that this layer runs
        the PyTorch path for its attention and layout (SD 1.x inflations have head dims of 160; the GEGLU
        kernel still runs) and says so once."""
        attn = self.transformer_blocks[0].attn1
        head_dim = attn.to_q.out_features // attn.heads
        if head_dim <= 128 and num_frames <= 64:
            return True
        if not getattr(self, "_warned_fallback", False):
            self._warned_fallback = True
            logger.warning("pdengine temporal attention: head dim %d / %d frames is outside the Triton kernel's "
                           "range (head dim <= 128, frames <= 64); this layer's attention and layout use the "
                           "PyTorch path", head_dim,
                           num_frames)
        return False

    def _forward_kernels(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        # Tokens stay in (b, f, p) row order from proj_in to proj_out: the projections are plain GEMMs and
        # the attention kernel walks frames with a stride of H*W rows, so the (b p) f permutes vanish. The
        # GroupNorm writes tokens directly (or folds into proj_in), and the way back is fused with the residual
        # add.
        bf, c, h, w = x.shape
        fused = fused_transformer_gemms(x, self, self.backend)  # once per call, for proj_in and proj_out
        t, partials = _norm_proj_in(self, x, num_frames, fused)
        for block in self.transformer_blocks:
            t, partials = block.forward_frames(t, num_frames, h * w, partials), None
        return _proj_out_residual(self, t, x, num_frames, fused)


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (padding 0 means SD's asymmetric right/bottom pad)."""

    def __init__(self, channels: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest 2x (or to an explicit size, for odd skip sizes) then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)
