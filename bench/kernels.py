"""`pdengine bench kernels`: each Triton kernel family at the `pixeldance` shapes beside its references.

Providers (one row each, per shape and direction):
    triton         our kernel (`pdengine.kernels.<family>`); the temporal conv as the engine runs it (the
                   GPU's launch table from `pdengine tune`, else the fused kernels with built-in tiles)
    triton_cublas  temporal_conv only: our block with its forward convs on cuBLAS
                   (`temporal_conv.conv_gemm("cublas", "forward")`), the backward as `triton`
    cublas_geglu   geglu's "feed-forward in" scope only: cuBLAS's projection, then our gate kernel (the
                   default inference path; `triton` there is the fused projection + gate, `ff_geglu`)
    torch_ref      the eager pure-PyTorch reference (`pdengine.kernels.<family>_ref`)
    torch_compile  that reference under `torch.compile` (compile time reported apart, as `compile_s`)
    diffusers      the diffusers layer doing the same job, where one exists

Rows carry a `scope`. temporal_attention has two: "attention core" (our kernel vs the reference core,
permute copies included) and "temporal transformer" (the whole temporal layer: our `TemporalTransformer`
on the kernel or on PyTorch vs diffusers' `TransformerTemporalModel`); speedups compare rows of one scope
only, so the whole diffusers layer is never set against the attention core alone.

References run in the benchmark dtype (bf16): the attention reference with `upcast=False`.

GPU (`device="cuda"`): median time by CUDA events with an L2 flush per rep; effective bandwidth = the
kernel's modeled bytes (`bytes_modeled`, the same for every provider) / time; FLOP/s from FLOPs counted on the reference (`FlopCounterMode`, GEMM/attention
FLOPs), percentages of peaks measured in the same run, NVML clocks/temperature/power after each row.
CPU (`device="cpu"`): no timing and no kernel launches. `bytes_fused` (the kernel module's
`modeled_bytes`) against `bytes_reference` counted on `meta` tensors of the full shape by
`bench.common.count_bytes`, and the compile statistics of every `compile_specs()` entry for sm80/sm90.
"""

from __future__ import annotations

import csv
import importlib
import inspect
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .common import (
    FusedSDPAOnMeta,
    count_bytes,
    emit,
    env_info,
    measure_peaks,
    nvml_index,
    nvml_snapshot,
    profile_fields,
    time_cuda,
    wall_seconds,
)
from .plot import write_plot

FAMILIES = ("temporal_conv", "temporal_attention", "concat_cond", "latent_update", "geglu", "fused_linear",
            "group_norm_silu", "add_layer_norm", "adamw_sr")
DIRECTIONS_WITH_BACKWARD = ("fwd", "bwd", "fwd+bwd")
FRAMES = 16
LEVELS = ((32, 320), (16, 640), (8, 1280), (4, 1280))  # (H = W, channels) of the UNet levels, 32x32 latent
QUICK_LEVELS = ((32, 320), (8, 1280))  # the top level and one deeper level
HEAD_DIM = 64
GROUPS = 32
TRANSFORMER_IN_HEADS = 8  # the UNet's `transformer_in`: 8 heads of 64 on C = 320 (full runs only)
LATENT_CHANNELS = 4
LATENT_SIZE = 32
VIDEOS = 1  # videos per batch; the UNet batch is 2x that (classifier-free guidance)
BANDWIDTH_VIDEOS, BANDWIDTH_LATENT = 64, 64  # a latent update whose time HBM bandwidth sets, not the launch
DDIM_STEPS, DDIM_STEP_INDEX = 50, 10  # the denoising step the latent-update rows use
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
# Leading CSV columns; the rest follow sorted.
CSV_LEAD = ["kernel", "provider", "scope", "shape", "direction", "dtype", "device", "status", "median_ms", "gbps",
            "tflops", "pct_peak_bw", "pct_peak_flops", "speedup_vs_torch_ref", "speedup_vs_diffusers",
            "bytes_fused", "bytes_reference", "bytes_ratio", "aten_ops", "arch"]


@dataclass
class Workload:
    """One provider ready to run: `fwd()` computes the output; gradients are taken w.r.t. `grad_inputs`;
    `setup()` (if any) restores state an in-place provider changed, before every timed rep."""

    fwd: Callable[[], Any]
    grad_inputs: list[torch.Tensor] = field(default_factory=list)
    setup: Callable[[], Any] | None = None


@dataclass
class Case:
    """One problem of one family: builds its shared tensors on a device and a workload per provider."""

    kernel: str
    shape: str
    scope: str
    directions: tuple[str, ...]
    make_inputs: Callable[[str, torch.dtype], dict[str, Any]]
    providers: dict[str, Callable[[dict[str, Any]], Workload]]
    modeled: Callable[[torch.dtype], Any] | None  # the kernel's modeled bytes; None: no fused model
    flops_from: str = "torch_ref"


# ---------------------------------------------------------------------------------------------------------
# Helpers


def _error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
    msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return "error: " + (msg if len(msg) <= 300 else msg[:297] + "...")


def _output_tensor(out: Any) -> torch.Tensor:
    """The tensor a provider returned (diffusers returns output objects or tuples)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    for name in ("sample", "prev_sample"):
        if isinstance(getattr(out, name, None), torch.Tensor):
            return getattr(out, name)
    raise TypeError(f"provider returned {type(out).__name__}, not a tensor")


def _randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random parameters of a realistic scale: the layers' zero-initialised output convs/projections
    would otherwise make the outputs trivial (the identity), which hides wrong results."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif name.endswith("weight"):  # normalisation scales
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 0.1)
    return module


def _cast(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    # nn.Module.to, not diffusers' ModelMixin.to: the latter warns on every cast to a low-precision dtype.
    return torch.nn.Module.to(module, dtype=dtype).eval()


def _modeled_directions(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`modeled_bytes(...)` as returned (a number or a dict per direction); a function with a `backward`
    flag instead gives {"fwd": ..., "bwd": ...}."""
    res = fn(*args, **kwargs)
    if isinstance(res, dict) or "backward" not in inspect.signature(fn).parameters:
        return res
    return {"fwd": res, "bwd": fn(*args, backward=True, **kwargs)}


def _modeled_for(modeled: Any, direction: str) -> int:
    """The modeled bytes of one direction from `modeled_bytes(...)`'s number (forward only) or dict."""
    if isinstance(modeled, dict):
        if direction == "fwd+bwd" and "fwd+bwd" not in modeled:
            return int(modeled["fwd"]) + int(modeled["bwd"])
        if direction not in modeled:
            raise KeyError(f"modeled_bytes gives no {direction!r} entry (keys: {sorted(modeled)})")
        return int(modeled[direction])
    if direction != "fwd":
        raise ValueError(f"modeled_bytes returns one number (the forward); there is no {direction} model")
    return int(modeled)


# ---------------------------------------------------------------------------------------------------------
# temporal_conv


def _temporal_conv_cases(levels: Iterable[tuple[int, int]], videos: int, frames: int) -> list[Case]:
    cases = []
    for size, channels in levels:
        b = 2 * videos

        def make(device: str, dtype: torch.dtype, size=size, channels=channels, b=b) -> dict[str, Any]:
            from diffusers.models.resnet import TemporalConvLayer

            with torch.device(device):
                layer = TemporalConvLayer(channels, channels, dropout=0.1, norm_num_groups=GROUPS)
            layer = _cast(_randomize_(layer, 0), dtype)
            stages = (layer.conv1, layer.conv2, layer.conv3, layer.conv4)
            x = torch.randn(b * frames, channels, size, size, device=device, dtype=dtype, requires_grad=True)
            return {
                "x": x, "frames": frames, "layer": layer, "eps": layer.conv1[0].eps,
                "norms": [(s[0].weight, s[0].bias) for s in stages],
                "convs": [(s[-1].weight, s[-1].bias) for s in stages],
                "grad_inputs": [x, *layer.parameters()],
            }

        def modeled(dtype: torch.dtype, size=size, channels=channels, b=b) -> Any:
            from pdengine.kernels.temporal_conv import modeled_bytes

            return _modeled_directions(modeled_bytes, b, frames, channels, size, size, dtype)

        cases.append(Case(
            "temporal_conv", f"B{b}xF{frames} C{channels} {size}x{size}", "layer", DIRECTIONS_WITH_BACKWARD,
            make, {"triton": _conv_triton, "triton_cublas": _conv_triton_cublas, "torch_ref": _conv_ref,
                   "torch_compile": _conv_compile, "diffusers": _conv_diffusers}, modeled))
    return cases


def _conv_args(s: dict[str, Any]) -> tuple[tuple, dict]:
    return (s["x"], s["frames"], s["norms"], s["convs"]), {"groups": GROUPS, "eps": s["eps"]}


def _conv_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.temporal_conv import temporal_conv_block

    args, kwargs = _conv_args(s)
    return Workload(lambda: temporal_conv_block(*args, **kwargs), s["grad_inputs"])


def _conv_triton_cublas(s: dict[str, Any]) -> Workload:
    """Our block with the forward convs on cuBLAS (padded activation pass + batched GEMM over overlapping
    frame windows + epilogue pass); backward is the Triton kernels, as for `triton`."""
    from pdengine.kernels.temporal_conv import conv_gemm, temporal_conv_block

    args, kwargs = _conv_args(s)

    def run() -> torch.Tensor:
        with conv_gemm("cublas", "forward"):
            return temporal_conv_block(*args, **kwargs)

    return Workload(run, s["grad_inputs"])


def _conv_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.temporal_conv_ref import temporal_conv_block_ref

    fn = torch.compile(temporal_conv_block_ref, dynamic=False) if compile else temporal_conv_block_ref
    args, kwargs = _conv_args(s)
    return Workload(lambda: fn(*args, **kwargs), s["grad_inputs"])


def _conv_compile(s: dict[str, Any]) -> Workload:
    return _conv_ref(s, compile=True)


def _conv_diffusers(s: dict[str, Any]) -> Workload:
    layer, x, frames = s["layer"], s["x"], s["frames"]
    return Workload(lambda: layer(x, num_frames=frames), s["grad_inputs"])


# ---------------------------------------------------------------------------------------------------------
# temporal_attention


def _attention_levels(levels: Iterable[tuple[int, int]], quick: bool) -> list[tuple[int, int, int]]:
    """(H = W, channels, heads): heads = C / 64 at every level, plus `transformer_in` in full runs."""
    out = [(size, channels, channels // HEAD_DIM) for size, channels in levels]
    if not quick:
        out.insert(1, (LATENT_SIZE, 320, TRANSFORMER_IN_HEADS))
    return out


def _temporal_attention_cases(levels: list[tuple[int, int, int]], videos: int, frames: int) -> list[Case]:
    cases = []
    for size, channels, heads in levels:
        b, p = 2 * videos, size * size

        def make_core(device: str, dtype: torch.dtype, p=p, heads=heads, b=b) -> dict[str, Any]:
            # q/k/v are column slices of one fused projection output, as the model passes them.
            torch.manual_seed(0)
            inner = heads * HEAD_DIM
            qkv = torch.randn(b * frames * p, 3 * inner, device=device, dtype=dtype, requires_grad=True)
            return {"q": qkv[:, :inner], "k": qkv[:, inner:2 * inner], "v": qkv[:, 2 * inner:],
                    "frames": frames, "heads": heads, "pixels": p, "grad_inputs": [qkv]}

        def make_layer(device: str, dtype: torch.dtype, size=size, channels=channels, heads=heads, b=b):
            from diffusers.models.transformers.transformer_temporal import TransformerTemporalModel

            from pdengine.model.layers import TemporalTransformer

            with torch.device(device):
                theirs = TransformerTemporalModel(num_attention_heads=heads, attention_head_dim=HEAD_DIM,
                                                  in_channels=channels, norm_num_groups=GROUPS)
                ours = TemporalTransformer(channels, heads, HEAD_DIM, GROUPS, backend="torch")
            theirs = _cast(_randomize_(theirs, 0), dtype)
            ours = _cast(ours, dtype)
            ours.load_state_dict(theirs.state_dict(), strict=True)
            x = torch.randn(b * frames, channels, size, size, device=device, dtype=dtype, requires_grad=True)
            return {"x": x, "frames": frames, "diffusers": theirs, "ours": ours,
                    "grad_inputs": [x, *theirs.parameters()], "grad_inputs_ours": [x, *ours.parameters()]}

        def modeled(dtype: torch.dtype, p=p, heads=heads, b=b) -> Any:
            from pdengine.kernels.temporal_attention import modeled_bytes

            return _modeled_directions(modeled_bytes, b, frames, p, heads, HEAD_DIM, dtype)

        cases.append(Case(
            "temporal_attention", f"B{b} F{frames} P{p} h{heads}xd{HEAD_DIM}", "attention core",
            DIRECTIONS_WITH_BACKWARD, make_core,
            {"triton": _attn_triton, "torch_ref": _attn_ref, "torch_compile": _attn_compile}, modeled))
        cases.append(Case(
            "temporal_attention", f"B{b}xF{frames} C{channels} {size}x{size} h{heads}", "temporal transformer",
            DIRECTIONS_WITH_BACKWARD, make_layer,
            {"triton": _tt_triton, "torch_ref": _tt_torch, "diffusers": _tt_diffusers}, None))
    return cases


def _attn_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.temporal_attention import temporal_attention

    q, k, v, frames, heads, p = s["q"], s["k"], s["v"], s["frames"], s["heads"], s["pixels"]
    return Workload(lambda: temporal_attention(q, k, v, frames, heads, pixels=p), s["grad_inputs"])


def _attn_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.temporal_attention_ref import temporal_attention_ref

    fn = torch.compile(temporal_attention_ref, dynamic=False) if compile else temporal_attention_ref
    q, k, v, frames, heads, p = s["q"], s["k"], s["v"], s["frames"], s["heads"], s["pixels"]
    # upcast=False: the reference in the kernel's own dtype (its fp32 mode is a numerics yardstick, not a
    # speed baseline).
    return Workload(lambda: fn(q, k, v, frames, heads, pixels=p, upcast=False), s["grad_inputs"])


def _attn_compile(s: dict[str, Any]) -> Workload:
    return _attn_ref(s, compile=True)


def _tt_triton(s: dict[str, Any]) -> Workload:
    layer, x, frames = s["ours"], s["x"], s["frames"]

    def run() -> torch.Tensor:
        # The layer as the engine runs it on a GPU: backend "triton" for the call (its attention, layout and
        # feed-forward kernels), "torch" again after it, for the torch_ref provider sharing the layer. Only
        # ever timed on CUDA (the switch refuses CPU tensors outside the interpreter).
        layer.backend = "triton"
        try:
            return layer(x, frames)
        finally:
            layer.backend = "torch"

    return Workload(run, s["grad_inputs_ours"])


def _tt_torch(s: dict[str, Any]) -> Workload:
    layer, x, frames = s["ours"], s["x"], s["frames"]
    return Workload(lambda: layer(x, frames), s["grad_inputs_ours"])


def _tt_diffusers(s: dict[str, Any]) -> Workload:
    layer, x, frames = s["diffusers"], s["x"], s["frames"]
    return Workload(lambda: layer(x, num_frames=frames, return_dict=False)[0], s["grad_inputs"])


# ---------------------------------------------------------------------------------------------------------
# concat_cond


def _concat_cond_cases(videos: int, frames: int) -> list[Case]:
    c, size = LATENT_CHANNELS, LATENT_SIZE

    def make(device: str, dtype: torch.dtype) -> dict[str, Any]:
        torch.manual_seed(0)
        return {
            "z_t": torch.randn(videos, c, frames, size, size, device=device, dtype=dtype),
            "f_first": torch.randn(videos, c, size, size, device=device, dtype=dtype),
            "f_last": torch.randn(videos, c, size, size, device=device, dtype=dtype),
            "keep_last": torch.ones(videos, device=device, dtype=torch.bool),  # the tau rule's mask
        }

    def modeled(dtype: torch.dtype) -> Any:
        from pdengine.kernels.concat_cond import modeled_bytes

        return modeled_bytes((videos, c, frames, size, size), dtype, repeat=2)

    shape = f"B{videos} C{c} F{frames} {size}x{size} repeat2"
    return [Case("concat_cond", shape, "kernel", ("fwd",), make,
                 {"triton": _concat_triton, "torch_ref": _concat_ref, "torch_compile": _concat_compile}, modeled)]


def _concat_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.concat_cond import concat_condition

    return Workload(lambda: concat_condition(s["z_t"], s["f_first"], s["f_last"], s["keep_last"], repeat=2))


def _concat_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.concat_cond_ref import concat_condition_ref

    fn = torch.compile(concat_condition_ref, dynamic=False) if compile else concat_condition_ref
    return Workload(lambda: fn(s["z_t"], s["f_first"], s["f_last"], s["keep_last"], repeat=2))


def _concat_compile(s: dict[str, Any]) -> Workload:
    return _concat_ref(s, compile=True)


# ---------------------------------------------------------------------------------------------------------
# latent_update


def _latent_update_cases(videos: int, frames: int, size: int = LATENT_SIZE) -> list[Case]:
    c = LATENT_CHANNELS

    def make(device: str, dtype: torch.dtype) -> dict[str, Any]:
        from diffusers import DDIMScheduler as DiffusersDDIM

        from pdengine.engine.schedulers import SD_SCHEDULE, load_scheduler

        torch.manual_seed(0)
        theirs = DiffusersDDIM.from_config(dict(SD_SCHEDULE))
        theirs.set_timesteps(DDIM_STEPS)
        ours = load_scheduler(dict(SD_SCHEDULE), kind="ddim")
        coeff_device = "cpu" if device == "meta" else device
        ours.set_timesteps(DDIM_STEPS, device=coeff_device)
        coeffs = ours.coefficients(DDIM_STEP_INDEX).to(device)
        x0 = torch.randn(videos, c, frames, size, size, device=device, dtype=dtype)
        return {
            "x0": x0, "x": x0.clone(),
            "model_output": torch.randn(2 * videos, c, frames, size, size, device=device, dtype=dtype),
            "coeffs": coeffs, "guidance": torch.tensor(7.5, device=device, dtype=torch.float32),
            "guidance_float": 7.5, "scheduler": theirs, "timestep": int(theirs.timesteps[DDIM_STEP_INDEX]),
        }

    def modeled(dtype: torch.dtype) -> Any:
        from pdengine.kernels.latent_update import modeled_bytes

        return modeled_bytes((videos, c, frames, size, size), dtype)

    shape = f"B{videos} C{c} F{frames} {size}x{size} cfg2"
    return [Case("latent_update", shape, "kernel", ("fwd",), make,
                 {"triton": _lu_triton, "torch_ref": _lu_ref, "torch_compile": _lu_compile,
                  "diffusers": _lu_diffusers}, modeled)]


def _lu_restore(s: dict[str, Any]) -> Callable[[], Any]:
    return lambda: s["x"].copy_(s["x0"])


def _lu_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.latent_update import latent_update_

    def run() -> torch.Tensor:
        latent_update_(s["x"], s["model_output"], s["coeffs"], s["guidance"])
        return s["x"]

    return Workload(run, setup=_lu_restore(s))


def _lu_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.latent_update_ref import latent_update_ref

    fn = torch.compile(latent_update_ref, dynamic=False) if compile else latent_update_ref
    return Workload(lambda: fn(s["x"], s["model_output"], s["coeffs"], s["guidance"]), setup=_lu_restore(s))


def _lu_compile(s: dict[str, Any]) -> Workload:
    return _lu_ref(s, compile=True)


def _lu_diffusers(s: dict[str, Any]) -> Workload:
    sched, t, g = s["scheduler"], s["timestep"], s["guidance_float"]

    def run() -> torch.Tensor:
        # What a diffusers pipeline does per step: split the CFG batch, mix, then DDIMScheduler.step.
        uncond, cond = s["model_output"].chunk(2)
        eps = uncond + g * (cond - uncond)
        return sched.step(eps, t, s["x"], return_dict=False)[0]

    # x is shared with the in-place kernel: restore it before every call like the other providers.
    return Workload(run, setup=_lu_restore(s))


# ---------------------------------------------------------------------------------------------------------
# geglu


def _geglu_cases(levels: Iterable[tuple[int, int]], videos: int, frames: int) -> list[Case]:
    """The feed-forward's gate at each level: 2 * videos * frames * H * W token rows (the CFG batch), inner
    width 4 * C, on the projection's output (the projection itself is the same cuBLAS GEMM for all)."""
    cases = []
    for hw, c in levels:
        rows, inner = 2 * videos * frames * hw * hw, 4 * c

        def make(device: str, dtype: torch.dtype, rows=rows, inner=inner) -> dict[str, Any]:
            torch.manual_seed(0)
            return {"p": torch.randn(rows, 2 * inner, device=device, dtype=dtype, requires_grad=True)}

        def modeled(dtype: torch.dtype, rows=rows, inner=inner) -> Any:
            from pdengine.kernels.geglu import modeled_bytes

            return _modeled_directions(modeled_bytes, rows, inner, dtype)

        cases.append(Case("geglu", f"N{rows} I{inner} ({hw}x{hw} C{c})", "kernel", DIRECTIONS_WITH_BACKWARD, make,
                          {"triton": _geglu_triton, "torch_ref": _geglu_ref, "torch_compile": _geglu_compile},
                          modeled))

        def make_ff(device: str, dtype: torch.dtype, rows=rows, c=c, inner=inner) -> dict[str, Any]:
            torch.manual_seed(0)
            return {"x": torch.randn(rows, c, device=device, dtype=dtype),
                    "w": torch.randn(2 * inner, c, device=device, dtype=dtype) * c ** -0.5,
                    "b": torch.randn(2 * inner, device=device, dtype=dtype) * 0.1}

        def modeled_ff(dtype: torch.dtype, rows=rows, c=c, inner=inner) -> Any:
            item = torch.empty((), dtype=dtype).element_size()
            return (rows * c + 2 * inner * c + 2 * inner + rows * inner) * item  # x, W, bias in; y out

        # The feed-forward's first half at inference (projection + gate): the fused Triton GEMM against cuBLAS's
        # projection followed by the gate kernel, the eager reference (diffusers' GEGLU does the same ops) and
        # its torch.compile. FLOPs from the projection.
        cases.append(Case("geglu", f"N{rows} K{c} I{inner} ({hw}x{hw})", "feed-forward in", ("fwd",), make_ff,
                          {"triton": _ff_fused, "cublas_geglu": _ff_cublas_geglu, "torch_ref": _ff_ref,
                           "torch_compile": _ff_compile}, modeled_ff))
    return cases


def _ff_fused(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.geglu import ff_geglu

    return Workload(lambda: ff_geglu(s["x"], s["w"], s["b"]))


def _ff_cublas_geglu(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.geglu import geglu

    return Workload(lambda: geglu(torch.nn.functional.linear(s["x"], s["w"], s["b"])))


def _ff_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.geglu_ref import geglu_ref

    def fn(x, w, b):
        return geglu_ref(torch.nn.functional.linear(x, w, b))

    run = torch.compile(fn, dynamic=False) if compile else fn
    return Workload(lambda: run(s["x"], s["w"], s["b"]))


def _ff_compile(s: dict[str, Any]) -> Workload:
    return _ff_ref(s, compile=True)


def _geglu_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.geglu import geglu

    return Workload(lambda: geglu(s["p"]), [s["p"]])


def _geglu_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.geglu_ref import geglu_ref

    fn = torch.compile(geglu_ref, dynamic=False) if compile else geglu_ref
    return Workload(lambda: fn(s["p"]), [s["p"]])


def _geglu_compile(s: dict[str, Any]) -> Workload:
    return _geglu_ref(s, compile=True)


# ---------------------------------------------------------------------------------------------------------
# fused_linear


def _fused_linear_cases(levels: Iterable[tuple[int, int]], videos: int, frames: int) -> list[Case]:
    """The transformer block's fused linears at each level, inference (forward only), on 2 * videos * frames *
    H * W token rows of width C: a LayerNorm folded into the q/k/v projection (N = 3C) against the eager
    LayerNorm + projection, and the output projection (N = C) with the residual add in its epilogue against
    the projection + add. FLOPs from the projection."""
    cases = []
    for hw, c in levels:
        rows = 2 * videos * frames * hw * hw

        def make(device: str, dtype: torch.dtype, rows=rows, c=c) -> dict[str, Any]:
            from pdengine.kernels.fused_linear import fold_layer_norm

            torch.manual_seed(0)
            s = {"x": torch.randn(rows, c, device=device, dtype=dtype),
                 "ln_w": 1.0 + 0.1 * torch.randn(c, device=device, dtype=dtype),
                 "ln_b": 0.1 * torch.randn(c, device=device, dtype=dtype),
                 "w_qkv": torch.randn(3 * c, c, device=device, dtype=dtype) * c ** -0.5,
                 "o": torch.randn(rows, c, device=device, dtype=dtype),
                 "w_out": torch.randn(c, c, device=device, dtype=dtype) * c ** -0.5,
                 "b_out": 0.1 * torch.randn(c, device=device, dtype=dtype),
                 "res": torch.randn(rows, c, device=device, dtype=dtype)}
            s["folded"] = fold_layer_norm(s["ln_w"], s["ln_b"], 1e-5, s["w_qkv"])  # once per weight version
            return s

        def modeled_norm(dtype: torch.dtype, rows=rows, c=c) -> int:
            from pdengine.kernels.fused_linear import modeled_bytes

            return modeled_bytes(rows, c, 3 * c, dtype, norm=True) + 3 * c * c * _item(dtype) + 2 * 3 * c * 4

        def modeled_res(dtype: torch.dtype, rows=rows, c=c) -> int:
            from pdengine.kernels.fused_linear import modeled_bytes

            return modeled_bytes(rows, c, c, dtype, residual=True) + (c * c + c) * _item(dtype)

        cases.append(Case("fused_linear", f"N{rows} K{c} -> {3 * c} ({hw}x{hw})", "norm + q/k/v", ("fwd",), make,
                          {"triton": _fl_norm_triton, "torch_ref": _fl_norm_ref, "torch_compile": _fl_norm_compile},
                          modeled_norm))
        cases.append(Case("fused_linear", f"N{rows} K{c} -> {c} ({hw}x{hw})", "out + residual", ("fwd",), make,
                          {"triton": _fl_res_triton, "torch_ref": _fl_res_ref, "torch_compile": _fl_res_compile},
                          modeled_res))
        if hw * hw >= 64:  # where the fold runs (`group_norm_fold_ok`)
            cases.append(_gn_proj_in_case(hw, c, videos, frames))
    return cases


def _gn_proj_in_case(hw: int, c: int, videos: int, frames: int) -> Case:
    """A temporal transformer's GroupNorm (32 groups, statistics per video), its way to token rows and proj_in
    (C -> C): folded into one GEMM (`group_norm_linear`, after `video_group_stats`) against the GroupNorm-to-
    tokens layout kernel + cuBLAS (`triton_layout`: the default path) and the eager norm, permute and linear."""
    n = 2 * videos * frames

    def make(device: str, dtype: torch.dtype) -> dict[str, Any]:
        from pdengine.kernels.fused_linear import fold_layer_norm

        torch.manual_seed(0)
        s = {"x": torch.randn(n, c, hw, hw, device=device, dtype=dtype),
             "gn_w": 1.0 + 0.1 * torch.randn(c, device=device, dtype=dtype),
             "gn_b": 0.1 * torch.randn(c, device=device, dtype=dtype),
             "w": torch.randn(c, c, device=device, dtype=dtype) * c ** -0.5,
             "b": 0.1 * torch.randn(c, device=device, dtype=dtype)}
        s["folded"] = fold_layer_norm(s["gn_w"], s["gn_b"], 1e-6, s["w"], s["b"])  # once per weight version
        return s

    def modeled(dtype: torch.dtype) -> int:  # x read twice (statistics, GEMM), the tokens written; weights
        act = n * c * hw * hw * _item(dtype)
        return 3 * act + (c * c + c) * _item(dtype) + c * 4

    def triton_fold(s: dict[str, Any]) -> Workload:
        from pdengine.kernels.fused_linear import group_norm_linear, video_group_stats

        return Workload(lambda: group_norm_linear(s["x"], frames, video_group_stats(s["x"], frames, 32, 1e-6),
                                                  s["folded"]))

    def triton_layout(s: dict[str, Any]) -> Workload:
        from pdengine.kernels.temporal_attention import video_group_norm_to_tokens

        return Workload(lambda: torch.nn.functional.linear(
            video_group_norm_to_tokens(s["x"], frames, s["gn_w"], s["gn_b"], 32, 1e-6), s["w"], s["b"]))

    def ref(s: dict[str, Any], compile: bool = False) -> Workload:
        from pdengine.kernels.fused_linear_ref import group_norm_linear_ref

        fn = torch.compile(group_norm_linear_ref, dynamic=False) if compile else group_norm_linear_ref
        return Workload(lambda: fn(s["x"], frames, s["gn_w"], s["gn_b"], 32, 1e-6, s["w"], s["b"]))

    return Case("fused_linear", f"{n}x{c}x{hw}x{hw} -> N{n * hw * hw} x {c}", "group norm + proj_in", ("fwd",),
                make, {"triton": triton_fold, "triton_layout": triton_layout, "torch_ref": ref,
                       "torch_compile": lambda s: ref(s, compile=True)}, modeled)


def _item(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fl_norm_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.fused_linear import layer_norm_linear

    return Workload(lambda: layer_norm_linear(s["x"], s["folded"]))


def _fl_norm_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.fused_linear_ref import layer_norm_linear_ref

    fn = torch.compile(layer_norm_linear_ref, dynamic=False) if compile else layer_norm_linear_ref
    return Workload(lambda: fn(s["x"], s["ln_w"], s["ln_b"], 1e-5, s["w_qkv"]))


def _fl_norm_compile(s: dict[str, Any]) -> Workload:
    return _fl_norm_ref(s, compile=True)


def _fl_res_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.fused_linear import fused_linear

    return Workload(lambda: fused_linear(s["o"], s["w_out"], s["b_out"], residual=s["res"]))


def _fl_res_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.fused_linear_ref import linear_residual_ref

    fn = torch.compile(linear_residual_ref, dynamic=False) if compile else linear_residual_ref
    return Workload(lambda: fn(s["o"], s["w_out"], s["b_out"], s["res"]))


def _fl_res_compile(s: dict[str, Any]) -> Workload:
    return _fl_res_ref(s, compile=True)


# ---------------------------------------------------------------------------------------------------------
# group_norm_silu


def _group_norm_silu_cases(levels: Iterable[tuple[int, int]], videos: int, frames: int) -> list[Case]:
    """The spatial ResNets' second GroupNorm + SiLU (with the timestep add before it) at each level, on the
    2 * videos * frames images of the CFG batch, forward and backward."""
    cases = []
    for hw, c in levels:
        n = 2 * videos * frames

        def make(device: str, dtype: torch.dtype, n=n, c=c, hw=hw) -> dict[str, Any]:
            torch.manual_seed(0)
            return {"x": torch.randn(n, c, hw, hw, device=device, dtype=dtype, requires_grad=True),
                    "w": (1.0 + 0.1 * torch.randn(c, device=device, dtype=dtype)).requires_grad_(),
                    "b": (0.1 * torch.randn(c, device=device, dtype=dtype)).requires_grad_(),
                    "shift": torch.randn(n, c, device=device, dtype=dtype, requires_grad=True)}

        def modeled(dtype: torch.dtype, n=n, c=c, hw=hw) -> Any:
            from pdengine.kernels.group_norm_silu import modeled_bytes

            return _modeled_directions(modeled_bytes, n, c, hw * hw, dtype, shift=True)

        cases.append(Case("group_norm_silu", f"N{n} C{c} {hw}x{hw}", "timestep add + GroupNorm + SiLU",
                          DIRECTIONS_WITH_BACKWARD, make,
                          {"triton": _gns_triton, "torch_ref": _gns_ref, "torch_compile": _gns_compile}, modeled))
    return cases


def _gns_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.group_norm_silu import group_norm_silu

    return Workload(lambda: group_norm_silu(s["x"], s["w"], s["b"], GROUPS, 1e-5, s["shift"]),
                    [s["x"], s["w"], s["b"], s["shift"]])


def _gns_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.group_norm_silu_ref import group_norm_silu_ref

    fn = torch.compile(group_norm_silu_ref, dynamic=False) if compile else group_norm_silu_ref
    return Workload(lambda: fn(s["x"], s["w"], s["b"], GROUPS, 1e-5, s["shift"]), [s["x"], s["w"], s["b"], s["shift"]])


def _gns_compile(s: dict[str, Any]) -> Workload:
    return _gns_ref(s, compile=True)


# ---------------------------------------------------------------------------------------------------------
# add_layer_norm


def _add_layer_norm_cases(levels: Iterable[tuple[int, int]], videos: int, frames: int) -> list[Case]:
    """A transformer block's residual add + next LayerNorm at each level, on the 2 * videos * frames * H * W
    token rows of the CFG batch (inference: forward only)."""
    cases = []
    for hw, c in levels:
        rows = 2 * videos * frames * hw * hw

        def make(device: str, dtype: torch.dtype, rows=rows, c=c) -> dict[str, Any]:
            torch.manual_seed(0)
            return {"x": torch.randn(rows, c, device=device, dtype=dtype),
                    "y": torch.randn(rows, c, device=device, dtype=dtype),
                    "w": 1.0 + 0.1 * torch.randn(c, device=device, dtype=dtype),
                    "b": 0.1 * torch.randn(c, device=device, dtype=dtype)}

        def modeled(dtype: torch.dtype, rows=rows, c=c) -> Any:
            from pdengine.kernels.add_layer_norm import modeled_bytes

            return {"fwd": modeled_bytes(rows, c, dtype)}

        cases.append(Case("add_layer_norm", f"N{rows} C{c} ({hw}x{hw})", "residual add + LayerNorm", ("fwd",), make,
                          {"triton": _aln_triton, "torch_ref": _aln_ref, "torch_compile": _aln_compile}, modeled))
    return cases


def _aln_triton(s: dict[str, Any]) -> Workload:
    from pdengine.kernels.add_layer_norm import add_layer_norm

    # (norm, sum): the rows compare the LayerNorm's output, the first tensor returned
    return Workload(lambda: add_layer_norm(s["x"], s["y"], s["w"], s["b"], 1e-5)[::-1])


def _aln_ref(s: dict[str, Any], compile: bool = False) -> Workload:
    from pdengine.kernels.add_layer_norm_ref import add_layer_norm_ref

    fn = torch.compile(add_layer_norm_ref, dynamic=False) if compile else add_layer_norm_ref
    return Workload(lambda: fn(s["x"], s["y"], s["w"], s["b"], 1e-5)[::-1])


def _aln_compile(s: dict[str, Any]) -> Workload:
    return _aln_ref(s, compile=True)


# ---------------------------------------------------------------------------------------------------------
# adamw_sr

ADAMW_ELEMENTS = 3840 * 1280 * 8  # eight q/k/v-sized weights of the 8x8 level at once: 39M elements


def _adamw_sr_cases(n: int = ADAMW_ELEMENTS) -> list[Case]:
    """The optimizer step of `pdengine train --pure-bf16` over n elements (weights, gradients, both moments in
    the run's dtype): the kernel (fp32 math, stochastic rounding) against the same step in eager PyTorch and
    torch.optim.AdamW's fused step (`torch_adamw`: what --pure-bf16 ran before, rounding to nearest). The
    weight and moments are restored before each timed call."""
    hyper = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=10)

    def make(device: str, dtype: torch.dtype) -> dict[str, Any]:
        torch.manual_seed(0)
        s = {"p0": torch.randn(n, device=device, dtype=dtype), "g": 1e-3 * torch.randn(n, device=device, dtype=dtype),
             "m0": 1e-3 * torch.randn(n, device=device, dtype=dtype),
             "v0": 1e-6 * torch.rand(n, device=device, dtype=dtype)}
        s.update(p=s["p0"].clone(), m=s["m0"].clone(), v=s["v0"].clone())
        return s

    def restore(s: dict[str, Any]) -> Callable[[], Any]:
        return lambda: [s[k].copy_(s[k + "0"]) for k in ("p", "m", "v")]

    def triton(s: dict[str, Any]) -> Workload:
        from pdengine.kernels.adamw_sr import adamw_sr_step_

        def run() -> torch.Tensor:
            adamw_sr_step_(s["p"], s["g"], s["m"], s["v"], seed=1, **hyper)
            return s["p"]

        return Workload(run, setup=restore(s))

    def ref(s: dict[str, Any]) -> Workload:
        from pdengine.kernels.adamw_sr_ref import adamw_sr_step_ref_

        def run() -> torch.Tensor:
            adamw_sr_step_ref_(s["p"], s["g"], s["m"], s["v"], **hyper)
            return s["p"]

        return Workload(run, setup=restore(s))

    def torch_adamw(s: dict[str, Any]) -> Workload:
        step = torch.tensor(float(hyper["step"]), device=s["p"].device)

        def run() -> torch.Tensor:
            step.fill_(hyper["step"])
            torch._fused_adamw_([s["p"]], [s["g"]], [s["m"]], [s["v"]], [], [step], lr=hyper["lr"],
                                beta1=hyper["beta1"], beta2=hyper["beta2"], weight_decay=hyper["weight_decay"],
                                eps=hyper["eps"], amsgrad=False, maximize=False)
            return s["p"]

        return Workload(run, setup=restore(s))

    def modeled(dtype: torch.dtype) -> int:
        from pdengine.kernels.adamw_sr import modeled_bytes

        return modeled_bytes(n, dtype, dtype)

    return [Case("adamw_sr", f"{n} elements", "optimizer step", ("fwd",), make,
                 {"triton": triton, "torch_ref": ref, "torch_adamw": torch_adamw}, modeled)]


# ---------------------------------------------------------------------------------------------------------
# Cases


def build_cases(families: Iterable[str], quick: bool, videos: int = VIDEOS, frames: int = FRAMES,
                levels: Iterable[tuple[int, int]] | None = None) -> list[Case]:
    """The benchmark problems of `families` at the pixeldance shapes (`levels` overrides the UNet levels)."""
    lv = list(levels) if levels is not None else list(QUICK_LEVELS if quick else LEVELS)
    cases: list[Case] = []
    for fam in families:
        if fam == "temporal_conv":
            cases += _temporal_conv_cases(lv, videos, frames)
        elif fam == "temporal_attention":
            cases += _temporal_attention_cases(_attention_levels(lv, quick or levels is not None), videos, frames)
        elif fam == "concat_cond":
            cases += _concat_cond_cases(videos, frames)
        elif fam == "latent_update":
            # The preset's batch (0.5 MB per latent at one video: launch time, not bandwidth) and a batch big
            # enough to read the kernel's share of HBM bandwidth off (64 videos of 64x64 latents, 512x512 pixels:
            # 134 MB per call), the 85% target.
            cases += _latent_update_cases(videos, frames) + _latent_update_cases(BANDWIDTH_VIDEOS, frames,
                                                                                 BANDWIDTH_LATENT)
        elif fam == "geglu":
            cases += _geglu_cases(lv, videos, frames)
        elif fam == "fused_linear":
            cases += _fused_linear_cases(lv, videos, frames)
        elif fam == "group_norm_silu":
            cases += _group_norm_silu_cases(lv, videos, frames)
        elif fam == "add_layer_norm":
            cases += _add_layer_norm_cases(lv, videos, frames)
        elif fam == "adamw_sr":
            cases += _adamw_sr_cases()
        else:
            raise ValueError(f"unknown kernel family {fam!r} (known: {', '.join(FAMILIES)})")
    return cases


def _row(case: Case, provider: str, direction: str, device: str, dtype: torch.dtype, env: dict[str, str],
         status: str = "ok", **fields: Any) -> dict[str, Any]:
    return {"kernel": case.kernel, "provider": provider, "scope": case.scope, "shape": case.shape,
            "direction": direction, "dtype": DTYPE_NAMES[dtype], "device": device, "status": status,
            **fields, **env}


# ---------------------------------------------------------------------------------------------------------
# CPU: modeled vs counted bytes, compile statistics


def _count_direction(wl: Workload, direction: str) -> tuple[int, int]:
    """(bytes, aten ops) the workload moves in `direction`, counted by dispatch (see bench.common)."""
    if direction == "fwd":
        with torch.no_grad():
            return count_bytes(wl.fwd)
    def backward(out: torch.Tensor) -> Any:
        return torch.autograd.grad(out, wl.grad_inputs, torch.empty_like(out), allow_unused=True)

    with torch.enable_grad():
        if direction == "bwd":
            with FusedSDPAOnMeta():  # the forward (not counted) must build the same graph as a counted one
                out = _output_tensor(wl.fwd())
            return count_bytes(backward, out)
        return count_bytes(lambda: backward(_output_tensor(wl.fwd())))


def _cpu_case_rows(case: Case, dtype: torch.dtype, env: dict[str, str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    counted = [p for p in ("torch_ref", "diffusers") if p in case.providers]
    modeled: Any = None
    modeled_error = ""
    if case.modeled is not None:
        try:
            modeled = case.modeled(dtype)
        except Exception as e:  # reported in the row, never hidden
            modeled_error = _error(e)
    try:
        state = case.make_inputs("meta", dtype)
    except Exception as e:  # reported in the row, never hidden
        return [_row(case, p, d, "cpu", dtype, env, _error(e)) for p in counted for d in case.directions]
    for provider in counted:
        try:
            wl = case.providers[provider](state)
        except Exception as e:  # reported in the row, never hidden
            rows += [_row(case, provider, d, "cpu", dtype, env, _error(e)) for d in case.directions]
            continue
        for direction in case.directions:
            try:
                nbytes, ops = _count_direction(wl, direction)
            except Exception as e:  # reported in the row, never hidden
                rows.append(_row(case, provider, direction, "cpu", dtype, env, _error(e)))
                continue
            fields: dict[str, Any] = {"bytes_reference": nbytes, "aten_ops": ops, "count_device": "meta"}
            if case.modeled is None:
                fields.update(bytes_fused=None, bytes_ratio=None,
                              note="whole layer: no fused byte model; compare bytes_reference across providers")
                rows.append(_row(case, provider, direction, "cpu", dtype, env, **fields))
                continue
            if modeled_error:
                rows.append(_row(case, provider, direction, "cpu", dtype, env, modeled_error, **fields))
                continue
            try:
                fused = _modeled_for(modeled, direction)
            except (KeyError, ValueError, TypeError) as e:
                rows.append(_row(case, provider, direction, "cpu", dtype, env, _error(e), **fields))
                continue
            fields.update(bytes_fused=fused, bytes_ratio=nbytes / fused if fused > 0 else None)
            rows.append(_row(case, provider, direction, "cpu", dtype, env, **fields))
    return rows


def compile_rows(families: Iterable[str], env: dict[str, str]) -> list[dict[str, Any]]:
    """Registers, spills, shared memory and tensor-core instruction counts of every `compile_specs()`
    entry of `families`, compiled for sm80 and sm90 (no GPU needed)."""
    from pdengine.kernels.compile_check import ARCHS, compile_spec

    rows: list[dict[str, Any]] = []
    base = {"provider": "triton", "scope": "kernel", "direction": "compile", "device": "cpu"}
    for fam in families:
        try:
            specs = importlib.import_module(f"pdengine.kernels.{fam}").compile_specs()
        except Exception as e:  # reported in the row, never hidden
            rows.append({"kernel": fam, **base, "shape": "compile_specs()", "dtype": "", "arch": None,
                         "status": _error(e), **env})
            continue
        for spec in specs:
            dtypes = sorted({t.lstrip("*") for t in spec.signature.values() if t.startswith("*")})
            for arch in ARCHS:
                row = {"kernel": fam, **base, "shape": spec.name, "dtype": "/".join(dtypes), "arch": arch}
                try:
                    rep = compile_spec(spec, arch)
                except Exception as e:  # reported in the row, never hidden
                    rows.append({**row, "status": _error(e), **env})
                    continue
                check = "ok"
                if rep.spills:
                    check = f"spills {rep.spills} bytes"
                elif rep.expects_mma and rep.mma_instructions == 0:
                    check = "expects tensor-core instructions, found none"
                elif spec.max_narrow_global is not None and rep.narrow_global > spec.max_narrow_global:
                    check = f"{rep.narrow_global} sub-word global accesses (at most {spec.max_narrow_global})"
                rows.append({**row, "status": "ok", "registers": rep.registers, "spills": rep.spills,
                             "stack_bytes": rep.stack_bytes, "local_bytes": rep.local_bytes,
                             "shared_bytes": rep.shared_bytes, "mma_instructions": rep.mma_instructions,
                             "narrow_global": rep.narrow_global, "vector_global": rep.vector_global,
                             "expects_mma": rep.expects_mma, "num_warps": spec.num_warps,
                             "num_stages": spec.num_stages, "compile_check": check, **env})
    return rows


def run_cpu(cases: list[Case], families: list[str], dtype: torch.dtype = torch.bfloat16,
            with_compile: bool = True) -> list[dict[str, Any]]:
    """CPU rows: counted reference bytes vs modeled fused bytes per case, then the compile statistics."""
    env = env_info("cpu")
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows += _cpu_case_rows(case, dtype, env)
    if with_compile:
        rows += compile_rows(families, env)
    return rows


# ---------------------------------------------------------------------------------------------------------
# GPU: timing


def _flops(case: Case, dtype: torch.dtype) -> dict[str, float]:
    """FLOPs per direction counted on `meta` tensors through the scope's reference provider."""
    from torch.utils.flop_counter import FlopCounterMode

    wl = case.providers[case.flops_from](case.make_inputs("meta", dtype))
    out: dict[str, float] = {}
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        wl.fwd()
    out["fwd"] = fc.get_total_flops()
    if "bwd" in case.directions:
        with torch.enable_grad():
            y = _output_tensor(wl.fwd())
            with FlopCounterMode(display=False) as fc:
                torch.autograd.grad(y, wl.grad_inputs, torch.empty_like(y), allow_unused=True)
        out["bwd"] = fc.get_total_flops()
        out["fwd+bwd"] = out["fwd"] + out["bwd"]
    return out


def _timed_fn(wl: Workload, direction: str) -> Callable[[], Any]:
    """The callable to time for `direction`: the forward without autograd (the sampling path), the
    backward alone on a retained graph, or forward and backward together."""
    if direction == "fwd":
        def fwd() -> Any:
            with torch.no_grad():
                return wl.fwd()
        return fwd
    with torch.enable_grad():
        out = _output_tensor(wl.fwd())
    grad = torch.randn_like(out)
    if direction == "bwd":
        return lambda: torch.autograd.grad(out, wl.grad_inputs, grad, retain_graph=True, allow_unused=True)

    def fwd_bwd() -> Any:
        with torch.enable_grad():
            return torch.autograd.grad(_output_tensor(wl.fwd()), wl.grad_inputs, grad, allow_unused=True)
    return fwd_bwd


def _forward_output(wl: Workload) -> torch.Tensor:
    if wl.setup is not None:
        wl.setup()
    with torch.no_grad():
        return _output_tensor(wl.fwd()).detach().float().clone()


def _gpu_case_rows(case: Case, device: str, dtype: torch.dtype, env: dict[str, str], peaks: dict[str, float],
                   timer: Callable[..., float], snapshot: Callable[[], dict[str, Any]],
                   profiler: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    try:
        state = case.make_inputs(device, dtype)
    except Exception as e:  # reported in the row, never hidden
        return [_row(case, p, d, device, dtype, env, _error(e)) for p in case.providers for d in case.directions]
    try:
        flops: dict[str, float] | str = _flops(case, dtype)
    except Exception as e:  # reported in the rows, which still get their timings
        flops = _error(e)
    modeled: Any = None
    modeled_error = ""
    if case.modeled is not None:
        try:
            modeled = case.modeled(dtype)
        except Exception as e:  # reported in the rows, which still get their timings
            modeled_error = _error(e)
    reference_out: torch.Tensor | None = None
    # torch_ref first: every other provider's output is compared with its output.
    for provider in sorted(case.providers, key=lambda p: p != "torch_ref"):
        build = case.providers[provider]
        extra: dict[str, Any] = {}
        try:
            if provider == "torch_compile":
                torch._dynamo.reset()  # a fresh cache per case: no recompile limit, no dynamic-shape fallback
            wl = build(state)
            if provider == "torch_compile":
                extra["compile_s"] = round(wall_seconds(lambda wl=wl: _forward_output(wl)), 3)
            out = _forward_output(wl)
        except Exception as e:  # reported in the row, never hidden
            rows += [_row(case, provider, d, device, dtype, env, _error(e)) for d in case.directions]
            continue
        if provider == "torch_ref":
            reference_out = out
        elif reference_out is not None:
            extra["max_abs_diff_vs_torch_ref"] = (out - reference_out).abs().max().item()
        del out
        for direction in case.directions:
            fields = dict(extra)
            try:
                ms = timer(_timed_fn(wl, direction), setup=wl.setup)
            except Exception as e:  # reported in the row, never hidden
                rows.append(_row(case, provider, direction, device, dtype, env, _error(e), **fields))
                continue
            fields["median_ms"] = ms
            if profiler is not None:
                try:
                    fields.update(profiler(_timed_fn(wl, direction), setup=wl.setup))
                except Exception as e:  # the timing stands; the profile says why it is missing
                    fields["profile_status"] = _error(e)
            if isinstance(flops, str):
                fields["flops_status"] = flops
            elif flops.get(direction):
                fields["flops"] = flops[direction]
                fields["tflops"] = flops[direction] / (ms * 1e-3) / 1e12
                fields["pct_peak_flops"] = 100 * fields["tflops"] / peaks["peak_tflops"]
            if modeled_error:
                fields["bytes_status"] = modeled_error
            elif modeled is not None:
                try:
                    fields["bytes_modeled"] = _modeled_for(modeled, direction)
                except (KeyError, ValueError, TypeError) as e:
                    fields["bytes_status"] = _error(e)
                else:
                    fields["gbps"] = fields["bytes_modeled"] / (ms * 1e-3) / 1e9
                    fields["pct_peak_bw"] = 100 * fields["gbps"] / peaks["peak_gbps"]
            fields.update(snapshot())
            rows.append(_row(case, provider, direction, device, dtype, env, **fields))
        del wl
    return rows


def add_speedups(rows: list[dict[str, Any]]) -> None:
    """speedup_vs_torch_ref / speedup_vs_diffusers of every timed row, within one (kernel, scope, shape,
    direction): never across scopes."""
    def key(r: dict[str, Any]) -> tuple:
        return r["kernel"], r.get("scope"), r["shape"], r["direction"]

    base: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.get("status") == "ok" and "median_ms" in r and r["provider"] in ("torch_ref", "diffusers"):
            base.setdefault(key(r), {})[r["provider"]] = r["median_ms"]
    for r in rows:
        if r.get("status") != "ok" or "median_ms" not in r:
            continue
        ref = base.get(key(r), {})
        if "torch_ref" in ref:
            r["speedup_vs_torch_ref"] = ref["torch_ref"] / r["median_ms"]
        if "diffusers" in ref:
            r["speedup_vs_diffusers"] = ref["diffusers"] / r["median_ms"]


def run_gpu(cases: list[Case], device: str = "cuda", dtype: torch.dtype = torch.bfloat16,
            timer: Callable[..., float] = time_cuda, peaks: dict[str, float] | None = None,
            snapshot: Callable[[], dict[str, Any]] | None = None,
            profiler: Callable[..., dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Timed rows of every case. `timer`, `peaks` and `snapshot` default to CUDA events, peaks measured
    now and NVML of the current device; tests replace them to run the bookkeeping on the CPU. `profiler`
    (e.g. `common.profile_fields`) adds its fields to every timed row."""
    env = env_info(device)
    if peaks is None:
        peaks = measure_peaks(device)
    if snapshot is None:
        try:
            index = nvml_index(torch.cuda.current_device())
        except Exception as e:  # no NVML (or no matching device): every row says so instead of clocks
            message = f"unavailable: {type(e).__name__}: {e}"
            snapshot = lambda: {"nvml": message}  # noqa: E731
        else:
            snapshot = lambda: nvml_snapshot(index)  # noqa: E731
    env = {**env, **{k: peaks[k] for k in ("peak_gbps", "peak_tflops")}}
    rows: list[dict[str, Any]] = []
    for case in cases:
        rows += [emit(r) for r in _gpu_case_rows(case, device, dtype, env, peaks, timer, snapshot, profiler)]
        if device == "cuda":
            torch.cuda.empty_cache()
    add_speedups(rows)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Output


def write_rows(rows: list[dict[str, Any]], json_path: Path | None, csv_path: Path | None) -> dict[str, Path]:
    """Write the rows as JSON (`json_path`), CSV (`csv_path`, default beside the JSON) and the SVG chart
    beside the CSV. Fresh files every run: nothing is appended."""
    written: dict[str, Path] = {}
    if json_path is not None:
        json_path = Path(json_path)
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(rows, indent=2, default=str) + "\n")
        written["json"] = json_path
        if csv_path is None:
            csv_path = json_path.with_suffix(".csv")
    if csv_path is not None:
        csv_path = Path(csv_path)
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        keys = {k for r in rows for k in r}
        columns = [k for k in CSV_LEAD if k in keys] + sorted(keys - set(CSV_LEAD))
        with csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            for r in rows:
                writer.writerow({k: "" if r.get(k) is None else r[k] for k in columns})
        written["csv"] = csv_path
        written["svg"] = write_plot(rows, csv_path.with_suffix(".svg"))
    return written


def run_kernel_bench(device: str, json_path: Path | None, csv_path: Path | None, families: list[str] | None,
                     quick: bool, profile: bool = False) -> list[dict]:
    """Benchmark `families` (default: all four) on `device` ("cuda": timings; "cpu": byte counts and
    compile statistics), write JSON/CSV/SVG where asked, and return the rows."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    families = list(families) if families else list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown kernel families {unknown} (known: {', '.join(FAMILIES)})")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='cpu' for byte counts")
    cases = build_cases(families, quick)
    if device == "cuda":
        rows = run_gpu(cases, profiler=profile_fields if profile else None)
    else:
        rows = run_cpu(cases, families)
    write_rows(rows, json_path, csv_path)
    return rows
