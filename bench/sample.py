"""`pdengine bench sample`: end-to-end sampling of the `pixeldance` preset, side by side.

On a GPU (one run, same weights, same schedule, bf16): our static sampler with and without a CUDA graph, the
temporal convs as the GPU's launch table says (`pdengine tune`; the rows' `conv_table` names it); also with
the graph and the temporal convs' forward forced onto cuBLAS (`pdengine_graph_cublas_conv`) and with the
UNet under `torch.compile` inside the graph (`pdengine_graph_compile`); diffusers' `UNet3DConditionModel` in
a diffusers-style loop (eager, SDPA), and the same under `torch.compile(mode="max-autotune")` (both compiled
runs use `--compile-mode`); seconds per video, videos/s, UNet FLOPs, MFU against the bf16 matmul peak
measured in the same run, peak memory, NVML clocks/power, compile/capture time.

Beside them, per batch, `sample_breakdown` rows: one eager UNet call on the CFG batch split by layer kind
(temporal conv, temporal attention, spatial ResNet, spatial attention, resampling, other), ours and
diffusers' (diffusers also with channels_last weights: NHWC convolutions), from CUDA events around each
layer (`bench.common.layer_times`).

On the CPU (no timing, and nothing claimed about speed): proxies counted on `meta` tensors — UNet FLOPs
per video (torch.utils.flop_counter; each UNet its own: diffusers' projects the text's cross-attention keys
and values once per frame, ours once per video), aten ops per denoising step (= kernel launches of an eager step;
a captured graph replays them as one launch) and bytes per step, in all and per layer kind (every aten op's
inputs and outputs, `bench.common.count_bytes`), for our step with the torch backend and with the Triton
backend (each kernel one operator, counted by its modeled bytes: `operator_byte_models`), and for the
diffusers UNet step.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import torch

from .common import LAYER_KINDS, collecting_rows, emit, env_info, save_rows

FRAMES, LATENT, TEXT_LEN = 16, 32, 77
# Denoising steps of each provider's untimed first call (CUDA-graph capture, compiles, cached weights).
WARMUP_STEPS = 3


def _unet_config() -> dict:
    from pdengine.model import preset_config

    return preset_config("pixeldance")


def _diffusers_unet(cfg: dict, device, dtype):
    from diffusers import UNet3DConditionModel

    fields = {k: v for k, v in cfg.items() if k != "sample_size"}
    with torch.device(device):
        return UNet3DConditionModel(**fields).to(dtype).eval()


def unet_flops_by_kind(batch: int, frames: int = FRAMES, latent: int = LATENT, *,
                       model: str = "pdengine") -> dict[str, int]:
    """FLOPs of one UNet forward per layer kind (`_unet_flops_by_kind`; counted once per shape and model)."""
    return dict(_unet_flops_by_kind(batch, frames, latent, model))


@functools.cache
def _unet_flops_by_kind(batch: int, frames: int, latent: int, model: str) -> dict[str, int]:
    """FLOPs of one UNet forward of the pixeldance preset on (batch, 8, frames, latent, latent) per layer
    kind (`bench.common.layer_flops`: temporal conv, temporal attention, spatial ResNet, spatial attention,
    resample, other) and `total`, counted on meta tensors; `model` "pdengine" (ours) or "diffusers" (its
    `UNet3DConditionModel` with the same config). The same math but in one place: ours projects the text's
    cross-attention keys and values once per video, diffusers' once per frame (the spatial attention kind)."""
    from pdengine.model import UNet3D

    from .common import layer_flops

    if model not in ("pdengine", "diffusers"):
        raise ValueError(f"model must be 'pdengine' or 'diffusers', got {model!r}")
    cfg = _unet_config()
    with torch.device("meta"):
        x = torch.empty(batch, cfg["in_channels"], frames, latent, latent)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, TEXT_LEN, cfg["cross_attention_dim"])
    with torch.no_grad():
        if model == "diffusers":
            ref = _diffusers_unet(cfg, "meta", torch.float32)
            return layer_flops(ref, lambda: ref(x, t, encoder_hidden_states=ctx))
        with torch.device("meta"):
            unet = UNet3D(cfg).eval()
        return layer_flops(unet, lambda: unet(x, t, ctx))


# The Stable Diffusion VAE (what PixelDance folders carry): its decoder turns each 32x32 latent frame into a
# 256x256 image.
SD_VAE_CONFIG = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
                 "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
                 "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": LATENT * 8}


def _sd_vae(device, dtype):
    from diffusers import AutoencoderKL

    with torch.device(device):
        return torch.nn.Module.to(AutoencoderKL(**SD_VAE_CONFIG), dtype=dtype).eval()


def vae_decode_flops(frames: int = FRAMES, latent: int = LATENT) -> int:
    """FLOPs of decoding one video's latent frames with the SD VAE, counted on meta tensors."""
    from torch.utils.flop_counter import FlopCounterMode

    vae = _sd_vae("meta", torch.bfloat16)
    z = torch.empty(frames, SD_VAE_CONFIG["latent_channels"], latent, latent, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        vae.decode(z)
    return counter.get_total_flops()


def unet_flops(batch: int, frames: int = FRAMES, latent: int = LATENT, *, model: str = "pdengine") -> int:
    """FLOPs of one UNet forward of the pixeldance preset on (batch, 8, frames, latent, latent), counted
    on meta tensors (ours, or diffusers' model: `unet_flops_by_kind`)."""
    return unet_flops_by_kind(batch, frames, latent, model=model)["total"]


def operator_byte_models() -> dict[str, Any]:
    """Modeled HBM bytes of the fused operators whose kernels make several passes over their data (the
    temporal conv block's four stages; the GroupNorm-to-tokens statistics pass), for `ByteCounter(modeled=)`.
    Every other operator of ours reads its inputs and writes its outputs once, which the counter's default
    rule already counts."""
    from pdengine.kernels import temporal_attention, temporal_conv

    def conv_block(args, kwargs):
        x, num_frames = args[0], args[1]
        bf, c, h, w = x.shape
        return temporal_conv.modeled_bytes(bf // num_frames, num_frames, c, h, w, x.dtype)

    def group_norm_to_tokens(args, kwargs):
        x, num_frames, groups = args[0], args[1], args[4]
        bf, c, h, w = x.shape
        return temporal_attention.modeled_layout_bytes(bf // num_frames, num_frames, h * w, c, groups,
                                                       x.dtype)["group_norm_to_tokens"]

    return {"pdengine::temporal_conv_block": conv_block, "pdengine::video_group_norm_to_tokens": group_norm_to_tokens}


def _meta_step_counts(batch: int) -> dict[str, dict[str, Any]]:
    """aten ops and bytes of one CFG denoising step (UNet on [uncond; cond] + combine + update), ours
    (static step with cached conditioning) with the torch backend and with the Triton backend (feed-forwards
    as by default, and fused), vs the diffusers UNet with c_image concatenated; with each UNet's bytes per
    layer kind."""
    from pdengine.engine.graph_sampler import Bucket, StaticSampler
    from pdengine.engine.schedulers import default_scheduler
    from pdengine.kernels import as_operators
    from pdengine.model import UNet3D

    from .common import ByteCounter, FusedSDPAOnMeta, _layer_marks

    cfg = _unet_config()
    c = cfg["out_channels"]
    dt = torch.bfloat16

    def counted(model, fn, modeled=None) -> dict[str, Any]:
        counter = ByteCounter(modeled)
        with torch.no_grad(), FusedSDPAOnMeta(), counter:
            with _layer_marks(model, LAYER_KINDS, lambda: counter.total_bytes) as marks:
                fn()
        kinds: dict[str, int] = {}
        for kind, a, b in marks:
            kinds[kind] = kinds.get(kind, 0) + b - a
        kinds["other"] = counter.total_bytes - sum(kinds.values())
        return {"bytes": counter.total_bytes, "ops": counter.ops, "kinds": kinds}

    from pdengine.kernels.fused_linear import transformer_gemm

    out: dict[str, dict[str, Any]] = {}
    for key, backend, ff in (("ours", "torch", "cublas"), ("ours_triton", "triton", "cublas"),
                             ("ours_triton_fused_gemm", "triton", "fused")):
        with torch.device("meta"):
            unet = UNet3D(cfg, backend=backend).to(dt).eval()
        sched = default_scheduler("ddim")
        sched.set_timesteps(50, device="meta")
        bucket = Bucket(batch, c, FRAMES, LATENT, LATENT, TEXT_LEN, cfg["cross_attention_dim"], dt, 50, "ddim", 0.0,
                        True)
        # The update runs as the eager scheduler step here (the fused update kernel has no operator to reach on
        # meta tensors): about 1 MB per video, under 0.01% of the step's bytes.
        sampler = StaticSampler(unet, sched, bucket, torch.device("meta"), use_graph=False, fused_update=False)
        if backend == "triton":
            with as_operators(), transformer_gemm(ff):
                # The packed q/k/v weights and (fused) the folded LayerNorm weights are made once per weight
                # version (the sampler's warm-up call before capture), not per step: outside the count.
                with torch.no_grad():
                    sampler._step()
                out[key] = counted(unet, sampler._step, operator_byte_models())
        else:
            out[key] = counted(unet, sampler._step)

    ref = _diffusers_unet(cfg, "meta", dt)
    x = torch.empty(batch, c, FRAMES, LATENT, LATENT, device="meta", dtype=dt)
    c_image = torch.empty_like(x)
    ctx = torch.empty(2 * batch, TEXT_LEN, cfg["cross_attention_dim"], device="meta", dtype=dt)
    t = torch.zeros((), dtype=torch.long, device="meta")

    def diffusers_step():
        inp = torch.cat([x, c_image], dim=1)
        eps = ref(torch.cat([inp, inp]), t, encoder_hidden_states=ctx).sample
        u, cnd = eps.chunk(2)
        eps = u + 7.5 * (cnd - u)
        # DDIM eta 0 update (diffusers' step does these elementwise ops on host-indexed scalars).
        x0 = (x - 0.1 * eps) / 0.9
        return 0.95 * x0 + 0.3 * eps

    out["diffusers"] = counted(ref, diffusers_step)
    return out


def _cpu_rows(batches: list[int], steps: int) -> list[dict[str, Any]]:
    rows = []
    for b in batches:
        by_kind = unet_flops_by_kind(2 * b)  # CFG: the UNet runs on [uncond; cond]
        flops_step = by_kind["total"]
        theirs = unet_flops(2 * b, model="diffusers")
        counts = _meta_step_counts(b)
        # Ours three times: the torch backend (the reference path), the Triton backend (what a GPU runs: each
        # fused kernel one operator, counted by its modeled bytes) and the same with the transformers' GEMMs
        # fused with their LayerNorms, residual adds and GEGLU (`PDENGINE_TRANSFORMER_GEMM=fused`), beside the
        # diffusers UNet.
        for provider, key in (("pdengine_torch_backend", "ours"), ("pdengine_triton_backend", "ours_triton"),
                              ("pdengine_triton_backend_fused_gemm", "ours_triton_fused_gemm"), ("diffusers", "diffusers")):
            work = theirs if provider == "diffusers" else flops_step
            rows.append({
                "bench": "sample", "provider": provider, "device": "cpu", "batch": b, "steps": steps,
                "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}", "status": "ok",
                "unet_gflops_per_video": round(work * steps / b / 1e9, 1),
                "unet_gflop_per_frame_per_pass": round(work / (2 * b) / FRAMES / 1e9, 1),
                "launches_per_step_eager": counts[key]["ops"],
                "gb_per_step": round(counts[key]["bytes"] / 1e9, 2),
                **{f"gb_{k}": round(v / 1e9, 2) for k, v in counts[key]["kinds"].items()},
            })
        # Where the UNet's FLOPs are, per layer kind: with the GPU's `sample_breakdown` times, the bound on
        # what faster temporal layers alone can give end to end.
        # The VAE decode beside the sampling: its share of a video's FLOPs bounds what overlapping the decode of
        # one batch with the sampling of the next could save.
        decode = vae_decode_flops()
        rows.append({"bench": "sample_breakdown", "provider": "pixeldance_unet", "device": "cpu", "batch": b,
                     "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}", "status": "ok",
                     "decode_gflop_per_video": round(decode / 1e9, 1),
                     "decode_share_of_video": round(decode / (decode + flops_step * steps / b), 4),
                     "unet_call_gflop": round(flops_step / 1e9, 1),
                     **{f"gflop_{k}": round(v / 1e9, 1) for k, v in by_kind.items() if k != "total"},
                     **{f"share_{k}": round(v / flops_step, 4) for k, v in by_kind.items() if k != "total"}})
    return rows


GPU_PROVIDERS = ("pdengine_graph", "pdengine_graph_fused_gemm", "pdengine_graph_cublas_conv", "pdengine_eager",
                 "diffusers_eager", "pdengine_graph_compile", "diffusers_compile", "breakdown")


def _gpu_rows(batches: list[int], steps: int, compile_mode: str,
              only: list[str] | None) -> list[dict[str, Any]]:  # pragma: no cover
    from pdengine.model import UNet3D

    from .common import measure_peaks

    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = _unet_config()
    peaks = measure_peaks("cuda")
    torch.manual_seed(0)
    with torch.device(dev):  # initialised on the GPU: a 1.4B-parameter CPU init costs tens of seconds of lease
        ours = UNet3D(cfg, backend="auto").to(dt).eval()
    ref = _diffusers_unet(cfg, dev, dt)
    ref.load_state_dict(ours.state_dict())
    compiled = None if compile_mode == "none" else torch.compile(ref, mode=compile_mode)
    rows = []
    for b in batches:
        rows += _gpu_batch_rows(b, steps, cfg, ours, ref, compiled, peaks, compile_mode, only)
    return rows


def _gpu_batch_rows(b: int, steps: int, cfg: dict, ours, ref, compiled, peaks, compile_mode: str,
                    only: list[str] | None) -> list[dict]:  # pragma: no cover
    import time

    from diffusers import DDIMScheduler as DiffusersDDIM

    from pdengine.engine.graph_sampler import Bucket, StaticSampler, compile_mode_inside_graph
    from pdengine.engine.schedulers import SD_SCHEDULE, load_scheduler
    from pdengine.kernels.fused_linear import transformer_gemm
    from pdengine.kernels.temporal_conv import conv_gemm
    from pdengine.model.layers import clear_weight_caches

    from .common import nvml_fields

    dev, dt, c = torch.device("cuda"), torch.bfloat16, cfg["out_channels"]
    # Each UNet's own counted FLOPs for its rows' TFLOP/s and MFU (diffusers' projects the text's keys and
    # values per frame: 1.2% more at the preset).
    flops = {m: unet_flops(2 * b, model=m) * steps for m in ("pdengine", "diffusers")}
    gen = torch.Generator(device="cuda").manual_seed(0)
    x_t = torch.randn(b, c, FRAMES, LATENT, LATENT, device=dev, dtype=dt, generator=gen)
    c_first = torch.zeros_like(x_t)
    c_first[:, :, 0] = torch.randn(b, c, LATENT, LATENT, device=dev, dtype=dt, generator=gen)
    c_last = torch.zeros_like(x_t)
    text = torch.randn(b, TEXT_LEN, cfg["cross_attention_dim"], device=dev, dtype=dt, generator=gen)
    uncond = torch.randn_like(text)
    has_last = torch.zeros(b, dtype=torch.bool, device=dev)

    def static_sampler(use_graph: bool, compile_mode: str | None = None) -> StaticSampler:
        sched = load_scheduler(SD_SCHEDULE, kind="ddim")
        sched.set_timesteps(steps, device=dev)
        bucket = Bucket(b, c, FRAMES, LATENT, LATENT, TEXT_LEN, cfg["cross_attention_dim"], dt, steps, "ddim", 0.0, True)
        return StaticSampler(ours, sched, bucket, dev, use_graph=use_graph,
                             compile_backend="inductor" if compile_mode else None, compile_mode=compile_mode)

    # Each provider's sampler is built when its row starts and dropped when it ends (with its graph's memory
    # pool), so one provider's memory never counts in another's peak.
    samplers: dict[str, StaticSampler] = {}
    sampler_kinds = {"graph": (True, None), "eager": (False, None), "graph_cublas": (True, None),
                     "graph_fused_gemm": (True, None), "graph_compile": (True, compile_mode)}

    def ours_run(which: str, gemm: str = "auto", transformer: str = "auto", n: int | None = None):
        # The temporal convs' forward GEMM is chosen when the step runs (and so when it is captured): "auto"
        # follows the GPU's launch table (`pdengine tune`), as `pdengine generate` does. Likewise the
        # transformers' GEMMs (`PDENGINE_TRANSFORMER_GEMM`; the row's env stamp says what "auto" ran).
        if which not in samplers:
            samplers[which] = static_sampler(*sampler_kinds[which])
        with torch.no_grad(), conv_gemm(gemm, "forward"), transformer_gemm(transformer):
            return samplers[which].run(x_t, text, uncond, ours.condition_features(c_first),
                                       ours.condition_features(c_last), has_last, tau=steps // 2, guidance=7.5,
                                       steps=n)

    def diffusers_run(model, n: int | None = None):
        sched = DiffusersDDIM.from_config(SD_SCHEDULE)
        sched.set_timesteps(steps, device=dev)
        x, ctx = x_t.clone(), torch.cat([uncond, text])
        with torch.no_grad():
            for t in sched.timesteps[:n]:
                inp = torch.cat([x, c_first], dim=1)
                eps = model(torch.cat([inp, inp]), t, encoder_hidden_states=ctx).sample
                u, cnd = eps.chunk(2)
                x = sched.step(u + 7.5 * (cnd - u), t, x).prev_sample
        return x

    # Our providers: (sampler, temporal conv forward GEMM, transformer GEMMs); "auto" follows the GPU's launch
    # table, which the rows' env stamp (`conv_table`, `transformer_gemm`) describes.
    settings = {
        "pdengine_graph": ("graph", "auto", "auto"),
        "pdengine_graph_fused_gemm": ("graph_fused_gemm", "auto", "fused"),
        "pdengine_graph_cublas_conv": ("graph_cublas", "cublas", "auto"),
        "pdengine_eager": ("eager", "auto", "auto"),
    }
    if compiled is not None:
        # Both compiled the same way (`--compile-mode`); ours inside its CUDA graph, the kernels as operators.
        settings["pdengine_graph_compile"] = ("graph_compile", "auto", "auto")
    providers = {name: functools.partial(ours_run, *setting) for name, setting in settings.items()}
    providers["diffusers_eager"] = functools.partial(diffusers_run, ref)
    if compiled is not None:
        providers["diffusers_compile"] = functools.partial(diffusers_run, compiled)
    weight_bytes = {m: sum(p.numel() * p.element_size() for p in model.parameters())
                    for m, model in (("pdengine", ours), ("diffusers", ref))}
    rows = []
    for name in sorted(set(only or ()) - set(providers) - {"breakdown"}):  # asked for, not available
        rows.append(emit({"bench": "sample", "provider": name, "device": "cuda", "batch": b, "steps": steps,
                          "status": "skipped: the compiled providers need --compile-mode other than none"}))
    for name, fn in providers.items():
        if only is not None and name not in only:
            continue
        row: dict[str, Any] = {"bench": "sample", "provider": name, "device": "cuda", "batch": b, "steps": steps,
                               "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}"}
        if name in settings:  # what this provider ran (the env stamp's fields say what "auto" resolves to)
            row["provider_conv_gemm"], row["provider_transformer_gemm"] = settings[name][1:]
        if name.endswith("_compile"):
            # Ours runs inside its own CUDA graph: a mode with Inductor graphs runs without them (StaticSampler).
            row["compile_mode"] = (compile_mode_inside_graph(compile_mode) if name.startswith("pdengine")
                                   else compile_mode)
        model = "diffusers" if name.startswith("diffusers") else "pdengine"
        try:
            # Memory from the weights alone: no other provider's sampler or graph pool, no derived-weight
            # copies (ours rebuilds its packed and folded weights inside this row, where they count).
            samplers.clear()
            clear_weight_caches(ours)
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            fn(n=WARMUP_STEPS)  # capture / compile / caches on a few steps: reported apart, not timed
            torch.cuda.synchronize()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            work = flops[model]
            # This provider's peak: its own model's weights plus what it allocated (the other model's weights,
            # resident meanwhile, left out).
            peak = torch.cuda.max_memory_allocated() - base + weight_bytes[model]
            row.update({
                "status": "ok", "seconds_per_video": sec / b, "videos_per_s": b / sec,
                "first_call_overhead_s": max(0.0, first - sec * WARMUP_STEPS / steps),
                "unet_tflops": work / sec / 1e12, "mfu": work / sec / 1e12 / peaks["peak_tflops"],
                "peak_memory_gib": peak / 2**30, **nvml_fields(0),
            })
        except Exception as e:  # a failing provider is an explicit row, never a missing one
            row["status"] = f"error: {type(e).__name__}: {e}"[:500]
        finally:
            samplers.clear()
        rows.append(emit(row))
    if only is None or "breakdown" in only:
        rows += _breakdown_rows(b, ours, ref, x_t, c_first, text, uncond)
    return rows


def _breakdown_rows(b: int, ours, ref, x_t, c_first, text, uncond) -> list[dict]:  # pragma: no cover
    """Where one eager UNet call on the CFG batch spends its time, per layer kind, ours and diffusers'
    (`bench.common.layer_times`): the map of what to speed up next."""
    from pdengine.kernels.fused_linear import transformer_gemm
    from pdengine.kernels.temporal_conv import conv_gemm

    from .common import layer_times

    inp = torch.cat([x_t, c_first], dim=1)
    inp, ctx = torch.cat([inp, inp]), torch.cat([uncond, text])
    t = torch.full((2 * b,), 500, device=inp.device)
    flops = {m: unet_flops_by_kind(2 * b, model=m) for m in ("pdengine", "diffusers")}
    models = {
        "pdengine_eager": (ours, lambda: ours(inp, t, ctx), "auto"),
        "pdengine_eager_cublas_conv": (ours, lambda: ours(inp, t, ctx), "cublas"),
        # The transformers' GEMMs fused with their LayerNorms, residual adds and the GEGLU (Triton GEMMs,
        # `PDENGINE_TRANSFORMER_GEMM=fused`): the transformer kinds' times against pdengine_eager's say whether
        # it should become the default.
        "pdengine_eager_fused_gemm": (ours, lambda: ours(inp, t, ctx), "auto"),
        "diffusers_eager": (ref, lambda: ref(inp, t, encoder_hidden_states=ctx), "auto"),
        # The same diffusers model with its weights in channels_last (a copy, made for this row only: the
        # models above keep their weights where captured graphs and compiled code expect them): cuDNN's
        # convolutions then produce NHWC activations (no NCHW<->NHWC transposes around them). How much this
        # moves the spatial ResNets' time decides whether an NHWC layout for our UNet is worth building.
        "diffusers_eager_channels_last": (None, None, "auto"),
    }
    rows = []
    for name, (model, call, gemm) in models.items():
        row: dict[str, Any] = {"bench": "sample_breakdown", "provider": name, "device": "cuda", "batch": b,
                               "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}"}
        try:
            if model is None:
                model = copy.deepcopy(ref)
                for module in model.modules():  # the 2D convs (the temporal layers' Conv3d have 5-D weights)
                    if isinstance(module, torch.nn.Conv2d):
                        torch.nn.Module.to(module, memory_format=torch.channels_last)
                call = functools.partial(model, inp, t, encoder_hidden_states=ctx)
            ff = "fused" if name.endswith("fused_gemm") else "cublas"
            if name.startswith("pdengine"):  # what this row ran
                row["provider_conv_gemm"], row["provider_transformer_gemm"] = gemm, ff
            work = flops["diffusers" if name.startswith("diffusers") else "pdengine"]
            with torch.no_grad(), conv_gemm(gemm, "forward"), transformer_gemm(ff):
                ms = layer_times(model, call)
            row.update({"status": "ok", "unet_call_ms": ms["total"],
                        **{f"ms_{kind}": v for kind, v in ms.items() if kind != "total"},
                        # achieved TFLOP/s per layer kind (each UNet's FLOPs, counted on meta)
                        **{f"tflops_{kind}": work[kind] / v / 1e9 for kind, v in ms.items()
                           if kind in work and v > 0}})
        except Exception as e:  # an explicit row, never a missing one
            row["status"] = f"error: {type(e).__name__}: {e}"[:500]
        finally:
            model = call = None  # the channels_last copy goes before the next row
        rows.append(emit(row))
    rows.append(emit(_decode_row(b, inp.device)))
    return rows


def _decode_row(b: int, device) -> dict[str, Any]:  # pragma: no cover
    """The batch's VAE decode as `generate` runs it (bf16, channels_last, 8 frames per chunk; SD VAE with
    random weights): its time per video beside the sampling's says whether overlapping the decode of one
    batch with the next batch's sampling would be worth its memory."""
    from pdengine.engine.pipeline import decode_frames

    from .common import time_cuda

    row: dict[str, Any] = {"bench": "sample_breakdown", "provider": "vae_decode", "device": "cuda", "batch": b,
                           "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}"}
    try:
        vae = torch.nn.Module.to(_sd_vae(device, torch.bfloat16), memory_format=torch.channels_last)
        frames = torch.randn(b * FRAMES, SD_VAE_CONFIG["latent_channels"], LATENT, LATENT, device=device)
        with torch.no_grad():
            ms = time_cuda(lambda: decode_frames(vae, frames, torch.bfloat16), warmup=1, target_ms=0.0, min_reps=3)
        row.update({"status": "ok", "ms_per_video": ms / b,
                    "tflops": vae_decode_flops() * b / (ms * 1e-3) / 1e12})
    except Exception as e:  # an explicit row, never a missing one
        row["status"] = f"error: {type(e).__name__}: {e}"[:500]
    return row


def run_sample_bench(device: str, json_path: Path | None = None, csv_path: Path | None = None,
                     batches: list[int] | None = None, steps: int = 50,
                     compile_mode: str = "max-autotune", providers: list[str] | None = None) -> list[dict[str, Any]]:
    unknown = sorted(set(providers or ()) - set(GPU_PROVIDERS))
    if unknown:
        raise ValueError(f"unknown sample providers {unknown}; choose from {', '.join(GPU_PROVIDERS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='cpu' for the proxies")
    batches = batches or [1, 8, 16]
    stamp = env_info(device)
    done: list[dict] = []

    def keep(row: dict) -> None:  # each finished GPU row goes to the files at once: a cut run keeps it
        done.append(row)
        save_rows(done, json_path, csv_path)

    with collecting_rows(stamp, keep):
        rows = _gpu_rows(batches, steps, compile_mode, providers) if device == "cuda" else _cpu_rows(batches, steps)
    rows = [{**r, **stamp} for r in rows]
    save_rows(rows, json_path, csv_path)
    return rows
