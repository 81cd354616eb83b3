"""Launch-configuration sweep of the temporal conv's three GEMM kernels, to retune the fixed tables in
`kernels/temporal_conv.py` (`_gemm_config`, `_dgrad_config`, `_wgrad_config`) from one GPU call.

For each `pixeldance` level (CFG batch 2, 16 frames, C 320 / 640 / 1280 at 32x32 / 16x16 / 8x8 / 4x4) and each
candidate (block_m, block_n, block_k, num_warps, num_stages), one stage runs through the real launcher with
the table swapped for the candidate:
  * `fwd`: conv(silu(GroupNorm(h))) + bias, the implicit GEMM with the normalisation in its operand prologue
    (or the activation in its own pass: `prenorm`);
  * `dgrad`: the stage's input gradient (transposed conv, SiLU/GroupNorm backward);
  * `wgrad`: the conv weight's gradient (split over the columns into partials, then summed).
Each kind also has the `cublas` candidate: the same stage through `temporal_conv.conv_gemm("cublas")` (the
activation or gradient written with frame padding in its own pass, the GEMMs on cuBLAS), and fwd and dgrad
`cublas_im2col` (the windows as one im2col matrix, the conv or its transpose a single GEMM).
Every row carries the candidate's error against the fp32 PyTorch reference (a configuration that computes
something else is reported as such, never timed as a winner), and on a GPU its median time and TFLOP/s
(2 C_out C_in 3 B F H W per stage). The built-in choice is marked `default`; `pdengine tune` turns the
timed rows into this GPU's launch table (`table_from_rows`). On the CPU (Triton
interpreter) only the errors are computed, at whatever small shape the caller gives: that checks the
candidates are valid launches, not their speed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .common import emit, env_info

LEVELS = ((320, 32), (640, 16), (1280, 8), (1280, 4))  # (channels, side) of the pixeldance UNet levels
VIDEOS, FRAMES, GROUPS = 2, 16, 32
# The batches `pdengine tune` times at: the forward at the sampler's (8 videos, 16 with classifier-free
# guidance), the backward kinds at a training batch of 4 videos per GPU.
TUNE_VIDEOS = {"fwd": 16, "dgrad": 4, "wgrad": 4}

CUBLAS = ("cublas",)  # the cuBLAS variant of a kind (no launch table)
CUBLAS_IM2COL = ("cublas_im2col",)  # fwd / dgrad: one cuBLAS GEMM over an im2col matrix of the windows
_CUBLAS_VARIANTS = (CUBLAS, CUBLAS_IM2COL)
# (block_m, block_n, block_k, num_warps, num_stages[, prenorm]): around the current table, wider row tiles (less
# recompute of the normalised operand: 3 x C_out / block_m times), deeper K chunks, more stages. Only
# tiles that compile for sm90 without spills in the training variant (dropout, statistics, residual on):
# checked with the compile check's tools on the CPU (re-checked with PRENORM a constant, as launched: 70-221
# registers, no spills on sm90; (64, 128, 32) spills 8 bytes on sm80 with statistics and residual both on,
# which no stage launches); the dgrad epilogue holds several fp32 tiles, so its
# tiles stay at 8192 outputs or fewer (128 x 128 and 256 x 64 spill 288-4352 stack bytes there).
FWD_CANDIDATES = (
    (64, 64, 32, 4, 3),
    (64, 128, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 64, 32, 8, 4),
    (128, 128, 32, 8, 3),
    (256, 64, 32, 8, 3),
    (256, 64, 64, 8, 3),
    # prenorm: the activation written by its own pass, the conv a plain GEMM (no per-tile prologue, so
    # deeper K chunks and wider tiles fit: 70-140 registers, no spills)
    (128, 64, 64, 8, 3, True),
    (128, 128, 64, 8, 3, True),
    (128, 128, 64, 8, 4, True),
    (256, 64, 64, 8, 3, True),
    CUBLAS,
    CUBLAS_IM2COL,
)
DGRAD_CANDIDATES = (
    (64, 64, 32, 4, 3),
    (64, 128, 32, 8, 3),
    (128, 32, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (128, 64, 64, 8, 3),
    (128, 64, 32, 8, 4),
    CUBLAS,
    CUBLAS_IM2COL,
)
# Weight gradient: (block_o, block_c, block_n, split, num_warps, num_stages); split = 0 keeps the table's
# split for that tile (about one wave of programs). 128 x 128 tiles spill (three fp32 accumulators).
WGRAD_CANDIDATES = (
    (64, 64, 32, 0, 8, 2),
    (64, 64, 32, 1, 8, 2),
    (64, 64, 32, 16, 8, 2),
    (64, 64, 64, 0, 8, 2),
    (64, 64, 32, 0, 8, 3),
    (128, 64, 32, 0, 8, 2),
    (64, 128, 32, 0, 8, 2),
    CUBLAS,
)
QUICK = {"fwd": ((128, 64, 32, 8, 3), (256, 64, 32, 8, 3), (128, 128, 64, 8, 3, True), CUBLAS, CUBLAS_IM2COL),
         "dgrad": ((128, 64, 32, 8, 3), (128, 64, 64, 8, 3), CUBLAS, CUBLAS_IM2COL),
         "wgrad": ((64, 64, 32, 1, 8, 2), (128, 64, 32, 0, 8, 2), CUBLAS)}
KINDS = ("fwd", "dgrad", "wgrad")


@contextlib.contextmanager
def _table(kind: str, config: tuple | None) -> Iterator[None]:
    """Run one candidate: None leaves everything as it is; `CUBLAS` (or `CUBLAS_IM2COL`) puts the kind's
    direction on that cuBLAS variant;
    any other candidate puts it on the Triton kernels with the launch table swapped for that candidate."""
    from pdengine.kernels import temporal_conv as tc

    if config is None:
        yield
        return
    direction = "forward" if kind == "fwd" else "backward"
    if config in _CUBLAS_VARIANTS:
        with tc.conv_gemm(config[0], direction):
            yield
        return
    if kind == "wgrad" and not config[3]:
        raise ValueError("a wgrad candidate needs its split resolved (_normalise)")
    name = {"fwd": "_gemm_config", "dgrad": "_dgrad_config", "wgrad": "_wgrad_config"}[kind]
    original = getattr(tc, name)
    make = tc._WgradConfig if kind == "wgrad" else tc._GemmConfig
    setattr(tc, name, lambda *args, **kwargs: make(*config))
    try:
        with tc.conv_gemm("triton", direction):
            yield
    finally:
        setattr(tc, name, original)


def default_config(kind: str, c: int, hw: int, frames: int = FRAMES, videos: int = VIDEOS) -> tuple:
    """What a stage of this kind runs at one level without a launch table: `CUBLAS` when its direction is set
    to cuBLAS (`temporal_conv.set_conv_gemm`), else the built-in tile (block_m, block_n, block_k, num_warps,
    num_stages, prenorm); for wgrad (block_o, block_c, block_n, split, num_warps, num_stages)."""
    from pdengine.kernels import temporal_conv as tc

    mode = tc._CONV_GEMM["forward" if kind == "fwd" else "backward"]
    if mode in ("cublas", "cublas_im2col"):
        return CUBLAS if kind == "wgrad" else (mode,)  # (the weight gradient has one cuBLAS variant)
    if kind == "wgrad":
        return tuple(tc._wgrad_config(c, c, videos, frames * hw))
    fn = tc._gemm_config if kind == "fwd" else tc._dgrad_config
    return tuple(fn(c, c, hw, frames * hw))[:6]


def config_name(kind: str, config: tuple) -> str:
    """"128x64x32 w8 s3" (+ " prenorm"); wgrad "64x64x32 split4 w8 s2"; "cublas"; "cublas_im2col"."""
    if config in _CUBLAS_VARIANTS:
        return config[0]
    if kind == "wgrad":
        o, c, n, split, warps, stages = config
        return f"{o}x{c}x{n} split{split or 'auto'} w{warps} s{stages}"
    m, n, k, warps, stages = config[:5]
    return f"{m}x{n}x{k} w{warps} s{stages}" + (" prenorm" if len(config) > 5 and config[5] else "")


def _inputs(c: int, side: int, videos: int, frames: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(videos * frames, c, side, side, device=device, generator=gen).to(dtype)
    gamma = 1 + 0.1 * torch.randn(c, device=device, generator=gen)
    beta = 0.1 * torch.randn(c, device=device, generator=gen)
    weight = (torch.randn(c, c, 3, device=device, generator=gen) / (3 * c) ** 0.5).to(dtype)
    bias = (0.1 * torch.randn(c, device=device, generator=gen)).to(dtype)
    g = torch.randn(videos * frames, c, side, side, device=device, generator=gen).to(dtype)
    return x, gamma, beta, weight, bias, g


def _reference(x, gamma, beta, weight, bias, g, frames: int, groups: int, eps: float):
    """fp32 reference of one stage, {kind: expected}: its output, and for output gradient g the input and
    weight gradients."""
    from pdengine.kernels.temporal_conv_ref import temporal_conv1d_ref, video_group_norm_ref

    x32 = x.float().requires_grad_()
    w32 = weight.float().requires_grad_()
    a = F.silu(video_group_norm_ref(x32, frames, gamma, beta, groups, eps))
    out = temporal_conv1d_ref(a, frames, w32, bias.float())
    dx, dw = torch.autograd.grad(out, (x32, w32), g.float())
    return {"fwd": out.detach(), "dgrad": dx, "wgrad": dw}


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got.float() - ref).norm() / ref.norm().clamp_min(1e-30))


def _runner(kind: str, x, gamma, beta, weight, bias, g, frames: int, groups: int, eps: float):
    from pdengine.kernels import temporal_conv as tc

    stats = tc.input_stats(x, frames, gamma, beta, groups, eps)
    w3 = tc._weight3(weight, x.dtype)
    if kind == "fwd":
        # As the block's first three stages run it: packed weight and input statistics at hand, the next
        # stage's GroupNorm statistics in the epilogue (the same gamma/beta serve as the next norm's here).
        return lambda: tc._stage_forward(x, frames, w3, bias, stats, residual=None, next_norm=(gamma, beta),
                                         groups=groups, eps=eps, dropout_p=0.0, seed=0)[0]
    mode = tc._CONV_GEMM["backward"]
    if mode in ("cublas", "cublas_im2col"):
        wgrad = kind == "wgrad"
        return lambda: tc._stage_backward_cublas(g, w3, x, frames, stats, gamma, beta, groups, 0.0, 0, None, weight,
                                                 bias, wgrad, not wgrad, im2col=mode == "cublas_im2col")[
            3 if wgrad else 0]
    if kind == "wgrad":
        return lambda: tc._stage_wgrad(g, x, frames, stats, weight, bias, 0.0, 0)[0]
    return lambda: tc._stage_dgrad(g, w3, x, frames, stats, gamma, beta, groups, 0.0, 0, None)[0]


def _normalise(kind: str, config: tuple, c: int, videos: int, fhw: int) -> tuple:
    """A candidate as the launcher will see it: GEMM kinds get prenorm (default False); wgrad's split 0
    becomes the split the table's rule gives that tile (about one wave of programs)."""
    if config in _CUBLAS_VARIANTS:
        return config
    if kind != "wgrad":
        return tuple(config[:5]) + (bool(config[5]) if len(config) > 5 else False,)
    from pdengine.kernels import temporal_conv as tc

    o, cc, n, split, warps, stages = config
    return (o, cc, n, split or tc._wgrad_split(c, c, videos, fhw, o, cc, n), warps, stages)


def _table_entry(kind: str, candidate: tuple) -> str | list:
    """A candidate as a launch table entry (`kernels/temporal_conv_table.py`): "cublas", "cublas_im2col" or
    the tile's list."""
    if candidate in _CUBLAS_VARIANTS:
        return candidate[0]
    if kind == "wgrad":
        return list(candidate)
    return [*candidate[:5], bool(candidate[5]) if len(candidate) > 5 else False]


def _fields(kind: str, config: tuple) -> dict[str, Any]:
    if config in _CUBLAS_VARIANTS:
        return {"cublas": True, "im2col": config == CUBLAS_IM2COL}
    names = (("block_o", "block_c", "block_n", "split", "num_warps", "num_stages") if kind == "wgrad" else
             ("block_m", "block_n", "block_k", "num_warps", "num_stages", "prenorm"))
    return dict(zip(names, config))


def sweep(device: str, levels: Iterable[tuple[int, int]] = LEVELS, quick: bool = False,
          kinds: Iterable[str] = KINDS,
          videos: int = VIDEOS, frames: int = FRAMES, groups: int = GROUPS, dtype: torch.dtype = torch.bfloat16,
          eps: float = 1e-5, max_rel_err: float = 2e-2) -> list[dict[str, Any]]:
    """One row per (kind, level, candidate); the built-in choice comes first at each level. Runs without
    this GPU's launch table: each candidate is exactly what it says."""
    from pdengine.kernels import temporal_conv as tc

    timed = device == "cuda"
    if timed:
        from .common import time_cuda
    rows: list[dict[str, Any]] = []
    for c, side in levels:
        hw = side * side
        tensors = _inputs(c, side, videos, frames, device, dtype)
        expected = _reference(*tensors, frames, groups, eps)
        flops = 2 * c * c * 3 * videos * frames * hw  # every kind is one GEMM of this size
        for kind in kinds:
            ref = expected[kind]
            default_raw = default_config(kind, c, hw, frames, videos)
            if kind == "wgrad" and default_raw not in _CUBLAS_VARIANTS:
                default_raw = (*default_raw[:3], 0, *default_raw[4:])  # its split is the built-in rule's
            default = _normalise(kind, default_raw, c, videos, frames * hw)
            candidates = QUICK[kind] if quick else {"fwd": FWD_CANDIDATES, "dgrad": DGRAD_CANDIDATES,
                                                    "wgrad": WGRAD_CANDIDATES}[kind]
            seen = set()
            for candidate in (default_raw, *candidates):
                config = _normalise(kind, candidate, c, videos, frames * hw)
                if config in seen:
                    continue
                seen.add(config)
                row: dict[str, Any] = {
                    "bench": "conv_configs", "kind": kind, "device": device, "dtype": str(dtype).split(".")[-1],
                    "shape": f"B{videos}xF{frames} C{c} {side}x{side}", "channels": c, "hw": hw,
                    "config": config_name(kind, config), **_fields(kind, config), "default": config == default,
                    # As a launch table stores it: before _normalise, so a wgrad split of 0 stays the rule's
                    # (which follows the batch at hand).
                    "table_entry": _table_entry(kind, candidate),
                }
                try:
                    with tc.launch_table(None), _table(kind, config):
                        fn = _runner(kind, *tensors, frames, groups, eps)
                        err = _rel_err(fn(), ref)
                        row["rel_err"] = err
                        if err > max_rel_err:
                            row["status"] = f"wrong: relative error {err:.3g} > {max_rel_err}"
                        else:
                            row["status"] = "ok"
                            if timed:
                                ms = time_cuda(fn)
                                row.update({"median_ms": ms, "tflops": flops / ms / 1e9})
                except Exception as e:  # a candidate that fails to compile or launch is an explicit row
                    row["status"] = f"error: {type(e).__name__}: {e}"[:500]
                rows.append(emit(row) if timed else row)
    return rows


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest correct candidate per (kind, shape), with its speedup over the table's default."""
    out = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["shape"]), []).append(r)
    for (kind, shape), rs in groups.items():
        timed = [r for r in rs if r.get("status") == "ok" and "median_ms" in r]
        if not timed:
            continue
        best = min(timed, key=lambda r: r["median_ms"])
        default = next((r for r in timed if r["default"]), None)
        out.append({"kind": kind, "shape": shape, "best": best["config"], "best_ms": best["median_ms"],
                    "default": default["config"] if default else None,
                    "speedup_vs_default": default["median_ms"] / best["median_ms"] if default else None})
    return out


def run_conv_configs(device: str, json_path: Path | None = None, quick: bool = False) -> list[dict[str, Any]]:
    import json

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but torch sees no CUDA device")
    if device == "cpu":
        # The interpreter at a small shape: validity of every candidate, no timing.
        rows = sweep("cpu", levels=((32, 4),), quick=quick, videos=1, frames=4, groups=8, dtype=torch.float32,
                     max_rel_err=1e-4)
    else:
        rows = sweep("cuda", quick=quick)
    stamp = env_info(device)
    rows = [{**r, **stamp} for r in rows]
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"rows": rows, "best": best_rows(rows)}, indent=2, default=str) + "\n")
    return rows


def table_from_rows(rows: list[dict[str, Any]], device_name: str,
                    meta: dict[str, Any] | None = None) -> tuple[Any, dict[tuple, dict[str, Any]]]:
    """The launch table timed sweep rows make (`kernels/temporal_conv_table.py`): per (kind, dtype, level),
    "best" is the fastest correct candidate (cuBLAS or a Triton tile) and "triton" the fastest correct
    Triton tile. Returns (table, {entry key: its timings}): only rows with status "ok" and a time count."""
    from pdengine.kernels import temporal_conv_table as ct

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok" and isinstance(r.get("median_ms"), float):
            dtype = ct.dtype_name(getattr(torch, r["dtype"]))
            groups.setdefault((r["kind"], dtype, r["channels"], r["channels"], r["hw"]), []).append(r)
    entries, extra = [], {}
    for key, rs in sorted(groups.items()):
        best = min(rs, key=lambda r: r["median_ms"])
        tiles = [r for r in rs if isinstance(r["table_entry"], list)]
        fastest_tile = min(tiles, key=lambda r: r["median_ms"]) if tiles else None
        builtin = next((r for r in rs if r["default"]), None)
        kind, dtype, c_out, c_in, hw = key
        entries.append({"kind": kind, "dtype": dtype, "c_out": c_out, "c_in": c_in, "hw": hw,
                        "best": best["table_entry"], "triton": fastest_tile and fastest_tile["table_entry"]})
        extra[key] = {"shape": best["shape"], "best_ms": best["median_ms"],
                      "triton_ms": fastest_tile and fastest_tile["median_ms"],
                      "builtin": builtin and builtin["config"], "builtin_ms": builtin and builtin["median_ms"]}
    table = ct.parse({"device": device_name, "meta": meta or {}, "entries": entries}, "memory")
    return table, extra


TRANSFORMER_KINDS = {"SpatialTransformer": "spatial", "TemporalTransformer": "temporal"}


def _transformer_level_times(model: torch.nn.Module, fn: Callable[[], Any]) -> dict[str, float]:
    """Milliseconds per call of `fn` inside `model`'s transformers, summed per size (`gemm_level`), and `total`."""
    from .common import layer_times

    times = layer_times(model, fn, kinds=TRANSFORMER_KINDS, label=lambda m: m.gemm_level)
    return {k: v for k, v in times.items() if k != "other"}


def measure_transformer_gemm(device: torch.device, cfg: dict | None = None, videos: int = 8, frames: int = FRAMES,
                             latent: int = 32,
                             level_timer: Callable[[torch.nn.Module, Callable[[], Any]], dict[str, float]] | None = None,
                             ) -> dict[str, Any]:
    """How this GPU should run the transformers' GEMMs at inference: one eager UNet call (the `pixeldance`
    preset, or `cfg`) on the CFG batch of `videos` videos (the sampler's batch 8 by default; halved while it
    does not fit in memory), bf16, with the GEMMs on cuBLAS and fused, timed per transformer size
    (`temporal_conv_table.gemm_level`: the fused GEMMs may win where a transformer's rows are many and its K
    small, memory-bound, and lose where it is compute-bound). Both outputs are compared with the same call in
    fp32 (`relative_error`); each size takes the fused GEMMs only if their error is at most twice cuBLAS's (or
    fp32-level: 1e-3) and they were at least 3% faster there (`choose_transformer_gemm`). Returns the record a
    launch table keeps ({"choice", "levels", "level_ms", "cublas_ms", "fused_ms", "rel_diff", "err_cublas",
    "err_fused", "videos"}; the *_ms totals are the whole call's, rel_diff is fused against cuBLAS).
    `level_timer(model, fn)` gives {level: ms, "total": ms} (CUDA events by default)."""
    while True:
        try:
            return _measure_transformer_gemm(device, cfg, videos, frames, latent, level_timer)
        except torch.OutOfMemoryError:
            if videos == 1:
                raise
            videos //= 2
            if device.type == "cuda":
                torch.cuda.empty_cache()


def relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Mean absolute difference over mean magnitude."""
    return ((got.float() - ref.float()).abs().mean() / ref.float().abs().mean().clamp_min(1e-12)).item()


def _measure_transformer_gemm(device: torch.device, cfg: dict | None, videos: int, frames: int, latent: int,
                              level_timer) -> dict[str, Any]:
    from pdengine.kernels.fused_linear import transformer_gemm
    from pdengine.model import UNet3D, preset_config

    cfg = cfg if cfg is not None else preset_config("pixeldance")
    dt = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet3D(cfg, backend="triton").to(dt).eval()
        for p in unet.parameters():  # zero-initialised output layers would make the comparison trivial
            p.requires_grad_(False)
            if p.ndim >= 2 and not p.abs().sum():
                p.normal_(0.0, p[0].numel() ** -0.5)
        b = 2 * videos
        x = torch.randn(b, cfg["in_channels"], frames, latent, latent, dtype=dt)
        t = torch.full((b,), 500)
        ctx = torch.randn(b, 77, cfg["cross_attention_dim"], dtype=dt)
    outs, times = {}, {}
    for mode in ("cublas", "fused"):
        with transformer_gemm(mode), torch.no_grad():
            outs[mode] = unet(x, t, ctx).float()
            times[mode] = (level_timer or _transformer_level_times)(unet, lambda: unet(x, t, ctx))
    if dt == torch.float32:
        reference = outs["cublas"]
    else:  # the same weights and inputs in fp32 (the model's last use: converted in place)
        unet.float()
        with transformer_gemm("cublas"), torch.no_grad():
            reference = unet(x.float(), t, ctx.float())
    err = {mode: relative_error(out, reference) for mode, out in outs.items()}
    level_ms = {k: [times["cublas"][k], times["fused"].get(k, float("inf"))] for k in times["cublas"] if k != "total"}
    choice, levels = choose_transformer_gemm(outputs_match(err["fused"], err["cublas"]), level_ms)
    return {"choice": choice, "levels": levels, "level_ms": level_ms, "cublas_ms": times["cublas"]["total"],
            "fused_ms": times["fused"]["total"], "rel_diff": relative_error(outs["fused"], outs["cublas"]),
            "err_cublas": err["cublas"], "err_fused": err["fused"], "videos": videos}


def outputs_match(err_fused: float, err_cublas: float, floor: float = 1e-3) -> bool:
    """The fused GEMMs' output is as good as cuBLAS's: its error against fp32 at most twice cuBLAS's own (both
    run in the same low precision; rounding in other places gives other, not larger, errors), or below
    `floor` (fp32 runs, where cuBLAS is the reference itself)."""
    return err_fused <= max(2.0 * err_cublas, floor)


def choose_transformer_gemm(match: bool, level_ms: dict[str, list[float]]) -> tuple[str, dict[str, str]]:
    """Per transformer size, "fused" only if the outputs matched (`outputs_match`) and the fused GEMMs were at
    least 3% faster there (`level_ms`: {level: [cublas_ms, fused_ms]}); returns (choice, levels) with
    choice "fused" or "cublas" when every size agrees, else "per_level"."""
    levels = {k: "fused" if match and f < 0.97 * c else "cublas" for k, (c, f) in level_ms.items()}
    kinds = set(levels.values())
    return (kinds.pop() if len(kinds) == 1 else "per_level") if kinds else "cublas", levels


def tune(quick: bool = False, out: Path | None = None, json_path: Path | None = None):
    """Time the temporal conv's candidates on this GPU (`sweep`) and write the launch table that the engine
    then uses on every GPU of this model: to `out`, by default the user's cache (where the engine looks
    first; `temporal_conv_table.user_path`). Returns (table, path written, extra timings, rows)."""
    import json

    from pdengine.kernels import temporal_conv as tc
    from pdengine.kernels import temporal_conv_table as ct

    if not torch.cuda.is_available():
        raise RuntimeError("pdengine tune times the temporal conv on a GPU, and torch sees no CUDA device")
    name = torch.cuda.get_device_name(torch.cuda.current_device())
    path = out if out is not None else ct.user_path(name)
    with tc.launch_table(None):  # what the sweep runs under, whatever table this GPU has now
        stamp = env_info("cuda")
    meta = {k: stamp[k] for k in ("torch", "triton", "git_sha", "timestamp")}
    meta.update({"videos": dict(TUNE_VIDEOS), "frames": FRAMES, "candidates": "quick" if quick else "all"})
    rows: list[dict[str, Any]] = []
    table = extra = None
    device = torch.device("cuda", torch.cuda.current_device())
    try:  # first, as it is quick: the transformers' GEMMs, a few UNet calls each way (built-in conv tiles)
        with tc.launch_table(None):
            gemm = measure_transformer_gemm(device)
    except Exception as e:  # recorded, never fatal: the conv table is measured either way
        gemm = {"choice": "cublas", "error": f"{type(e).__name__}: {e}"[:500]}
    torch.cuda.empty_cache()
    # Kept at once, so that a run cut during the sweep keeps it: in the rows file, and in the table when it
    # goes to a path of the caller's (the user's own table, found by default, is replaced only once a level of
    # the sweep has finished: a failed sweep leaves the table that worked).
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps({"rows": [], "best": [], "transformer_gemm": gemm}, indent=2,
                                        default=str) + "\n")
    if out is not None:
        ct.write(ct.ConvTable(name, "memory", {}, dict(meta), gemm), path)
    for level in LEVELS:  # the table so far is written after each level: a run cut short keeps those
        for kind in KINDS:
            rows += [{**r, **stamp} for r in sweep("cuda", levels=(level,), quick=quick, kinds=(kind,),
                                                   videos=TUNE_VIDEOS[kind])]
            torch.cuda.empty_cache()
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"rows": rows, "best": best_rows(rows), "transformer_gemm": gemm},
                                            indent=2, default=str) + "\n")
        table, extra = table_from_rows(rows, name, meta)
        table.transformer_gemm = gemm
        if table.entries:
            ct.write(table, path, extra)
    if not table.entries:
        raise RuntimeError("no candidate ran correctly on this GPU: no table written (the rows say why"
                           + (f": {json_path})" if json_path else ")"))
    tc._TABLES.clear()  # this process, too, looks its table up again
    return table, path, extra, rows
