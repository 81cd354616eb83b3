"""`pdengine bench train`: our trainer's step against a reference diffusers training loop.

On a GPU (one run, same batch): our UNet3D (Triton backend, activation checkpointing policy, fused AdamW,
bf16 autocast with fp32 master weights; also with the temporal convs' GEMMs on cuBLAS, and the memory-lean
setup: bf16 weights, full checkpointing) vs diffusers' `UNet3DConditionModel` + `torch.optim.AdamW` (bf16
autocast, fp32 master weights); peak memory per sample and samples/s (`TRAIN_PROVIDERS`).

On the CPU (no timing, no memory claim): saved-activation bytes per sample of one training forward,
counted with `torch.autograd.graph.saved_tensors_hooks` on `meta` tensors at the `pixeldance` preset
(16 x 256 x 256 video, latent 16 x 32 x 32), for each of our checkpointing policies with the torch backend
and with the Triton backend (the kernels' operators on meta tensors, `pdengine.kernels.as_operators`), and
for the reference model; and parameter / gradient / optimizer-state bytes of each setup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .common import collecting_rows, emit, env_info, save_rows

FRAMES, LATENT, TEXT_LEN = 16, 32, 77
POLICIES = ("none", "attention", "full")


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                           diffusers_model: bool = False) -> int:
    """Bytes autograd keeps for the backward of one forward (+ MSE loss): every tensor packed by autograd,
    each storage counted once (views of one activation share it). Parameters are not activations and are
    left out; attention counts as CUDA's fused kernel (no probability matrix saved, `FusedSDPAOnMeta`)."""
    from .common import FusedSDPAOnMeta

    params = {p.untyped_storage()._cdata for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in params:
            storages[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), FusedSDPAOnMeta():
        out = model(x, t, encoder_hidden_states=ctx).sample if diffusers_model else model(x, t, ctx)
        out.float().square().mean()
    return sum(storages.values())


def state_bytes(n_params: int, setup: str) -> dict[str, int]:
    """Parameter, gradient and optimizer-state bytes. fp32 master: fp32 params and grads, AdamW's two fp32
    moments; pure bf16: bf16 params and grads, bf16 moments; adamw8bit: fp32 params/grads, 1-byte moments."""
    per = {"fp32_master": (4, 4, 8), "pure_bf16": (2, 2, 4), "adamw8bit": (4, 4, 2)}[setup]
    return {"param_bytes": n_params * per[0], "grad_bytes": n_params * per[1], "optimizer_bytes": n_params * per[2]}


def _meta_inputs(cfg: dict, dtype: torch.dtype, batch: int = 1):
    with torch.device("meta"):
        x = torch.empty(batch, cfg["in_channels"], FRAMES, LATENT, LATENT, dtype=dtype)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, TEXT_LEN, cfg["cross_attention_dim"], dtype=dtype)
    return x, t, ctx


def _cpu_rows(preset: str) -> list[dict[str, Any]]:
    from diffusers import UNet3DConditionModel

    from pdengine.kernels import as_operators
    from pdengine.model import UNet3D, preset_config
    from pdengine.train.trainer import apply_activation_checkpointing

    cfg = preset_config(preset)
    dt = torch.bfloat16  # what autocast computes in
    rows = []
    x, t, ctx = _meta_inputs(cfg, dt)
    with torch.device("meta"):
        ref = UNet3DConditionModel(**{k: v for k, v in cfg.items() if k != "sample_size"}).to(dt).train()
    n_params = sum(p.numel() for p in ref.parameters())
    ref_saved = saved_activation_bytes(ref, x, t, ctx, diffusers_model=True)
    base = {"bench": "train", "device": "cpu", "preset": preset, "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}",
            "status": "ok", "parameters": n_params}
    rows.append({**base, "provider": "diffusers_reference", "checkpointing": "none (unsupported by the model)",
                 "saved_activation_gib_per_sample": ref_saved / 2**30, "saved_ratio_vs_reference": 1.0,
                 **state_bytes(n_params, "fp32_master")})
    # The torch backend (the PyTorch reference layers) and the Triton backend (what the trainer runs on a GPU:
    # each kernel one operator whose fake implementation reaches meta tensors, saving what its backward keeps).
    for backend in ("torch", "triton"):
        for policy in POLICIES:
            with torch.device("meta"):
                ours = UNet3D(cfg, backend=backend).to(dt).train()
            apply_activation_checkpointing(ours, policy)
            with as_operators():
                saved = saved_activation_bytes(ours, x, t, ctx)
            rows.append({**base, "provider": f"pdengine_{backend}_backend", "checkpointing": policy,
                         "saved_activation_gib_per_sample": saved / 2**30,
                         "saved_ratio_vs_reference": saved / ref_saved, **state_bytes(n_params, "fp32_master")})
    (default,) = [r for r in rows if r["provider"] == "pdengine_triton_backend" and r["checkpointing"] == "attention"]
    for setup in ("pure_bf16", "adamw8bit"):
        rows.append({**base, "provider": f"pdengine_{setup}", "checkpointing": "attention",
                     "saved_activation_gib_per_sample": default["saved_activation_gib_per_sample"],
                     "saved_ratio_vs_reference": default["saved_ratio_vs_reference"], **state_bytes(n_params, setup)})
    return rows


# pdengine: the trainer's defaults (fp32 master weights + bf16 autocast, attention checkpointing, fused AdamW);
# pdengine_cublas_conv: the same with the temporal convs' GEMMs on cuBLAS; pdengine_lean: the memory-lean
# setup (--pure-bf16 weights and optimizer state, full checkpointing); diffusers_reference: UNet3DConditionModel
# + torch AdamW, fp32 master + bf16 autocast, no checkpointing.
TRAIN_PROVIDERS = ("pdengine", "pdengine_cublas_conv", "pdengine_lean", "diffusers_reference")
# On request only (--providers): pdengine_compile, the defaults under torch.compile (Inductor compiles the
# 1.4B-parameter forward and backward first: minutes).
OPTIONAL_PROVIDERS = ("pdengine_compile",)


def _gpu_rows(preset: str, batches: list[int], steps: int,
              providers: tuple[str, ...] = TRAIN_PROVIDERS) -> list[dict[str, Any]]:  # pragma: no cover - GPU
    from pdengine.engine.schedulers import default_scheduler
    from pdengine.kernels.temporal_conv import conv_gemm
    from pdengine.model import preset_config

    cfg = preset_config(preset)
    abar = default_scheduler("ddpm").alphas_cumprod.to("cuda")
    rows = []
    for b in batches:
        for provider in providers:
            lean = provider == "pdengine_lean"
            row: dict[str, Any] = {"bench": "train", "device": "cuda", "preset": preset, "provider": provider,
                                   "batch": b, "shape": f"{FRAMES}x{LATENT * 8}x{LATENT * 8}",
                                   "weights": "bf16" if lean else "fp32 master + bf16 autocast",
                                   "checkpointing": ("full" if lean else "attention") if provider != "diffusers_reference"
                                   else "none"}
            try:
                # pdengine_cublas_conv: the temporal convs' GEMMs (forward and backward) on cuBLAS; the others
                # as `pdengine train` runs them (the GPU's launch table, `pdengine tune`).
                with conv_gemm("cublas" if provider == "pdengine_cublas_conv" else "auto"):
                    row.update(_gpu_measure(provider, b, cfg, abar, steps))
            except Exception as e:  # a failing provider is an explicit row (OOM included)
                row["status"] = f"error: {type(e).__name__}: {e}"[:500]
            torch.cuda.empty_cache()
            rows.append(emit(row))
    return rows


def _gpu_measure(provider: str, b: int, cfg: dict, abar: torch.Tensor, steps: int) -> dict[str, Any]:  # pragma: no cover
    import time

    from diffusers import UNet3DConditionModel

    from pdengine.model import UNet3D
    from pdengine.train.recipe import RecipeConfig, training_inputs
    from pdengine.train.trainer import apply_activation_checkpointing

    from .common import nvml_fields

    dev = torch.device("cuda")
    torch.manual_seed(0)
    ours = provider.startswith("pdengine")
    # Both models are initialised on the GPU: a 1.4B-parameter CPU init costs tens of seconds of lease.
    if ours:
        lean = provider == "pdengine_lean"
        with torch.device(dev):
            model = UNet3D(cfg, backend="auto").train()
        if lean:
            model.to(torch.bfloat16)
        apply_activation_checkpointing(model, "full" if lean else "attention")
        if lean:  # what `pdengine train --pure-bf16` runs: AdamW with stochastic rounding (kernels/adamw_sr.py)
            from pdengine.train.optim import AdamWSR

            opt = AdamWSR(model.parameters(), lr=1e-5)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        if provider == "pdengine_compile":
            model = torch.compile(model, dynamic=False)
    else:
        with torch.device(dev):
            model = UNet3DConditionModel(**{k: v for k, v in cfg.items() if k != "sample_size"}).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    gen = torch.Generator().manual_seed(0)
    z0 = torch.randn(b, cfg["out_channels"], FRAMES, LATENT, LATENT, device=dev)
    text = torch.randn(b, TEXT_LEN, cfg["cross_attention_dim"], device=dev)
    uncond = torch.zeros(TEXT_LEN, cfg["cross_attention_dim"], device=dev)

    def step() -> None:
        inp = training_inputs(z0, text, uncond, abar, RecipeConfig(), gen, use_kernel=ours)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if ours:
                pred = model(inp.unet_input, inp.timesteps, inp.context)
            else:
                pred = model(inp.unet_input, inp.timesteps, encoder_hidden_states=inp.context).sample
        torch.nn.functional.mse_loss(pred.float(), inp.target.float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # warm-up: kernel compilation, allocator
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    sec = (time.perf_counter() - t0) / steps
    peak = torch.cuda.max_memory_allocated() / 2**30
    return {"status": "ok", "step_s": sec, "samples_per_s": b / sec, "peak_memory_gib": peak,
            "peak_memory_gib_per_sample": peak / b, **nvml_fields(0)}


def run_train_bench(device: str, json_path: Path | None = None, csv_path: Path | None = None,
                    preset: str = "pixeldance", batches: list[int] | None = None, steps: int = 5,
                    providers: list[str] | None = None) -> list[dict]:
    unknown = sorted(set(providers or ()) - set(TRAIN_PROVIDERS + OPTIONAL_PROVIDERS))
    if unknown:
        raise ValueError(f"unknown train providers {unknown}; choose from "
                         f"{', '.join(TRAIN_PROVIDERS + OPTIONAL_PROVIDERS)}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device; use device='cpu' for the proxies")
    chosen = tuple(providers) if providers else TRAIN_PROVIDERS
    stamp = env_info(device)
    done: list[dict] = []

    def keep(row: dict) -> None:  # each finished GPU row goes to the files at once: a cut run keeps it
        done.append(row)
        save_rows(done, json_path, csv_path)

    with collecting_rows(stamp, keep):
        rows = _gpu_rows(preset, batches or [1, 2, 4], steps, chosen) if device == "cuda" else _cpu_rows(preset)
    rows = [{**r, **stamp} for r in rows]
    save_rows(rows, json_path, csv_path)
    return rows
