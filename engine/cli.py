"""`pdengine` command line: thin click wrappers over plain functions.

Keep this module free of heavy imports (torch, diffusers): `pdengine --help` must stay instant.
"""

from __future__ import annotations

import sys

import click

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group(context_settings=CONTEXT)
@click.version_option(package_name="pixeldance-engine")
def main() -> None:
    """PixelDance video diffusion engine: sample, train and profile."""


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err)) from None


def _quiet_libraries() -> None:
    """Silence diffusers/transformers per-file loading bars and advice; the command reports itself."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for lib in (diffusers_logging, transformers_logging):
        lib.set_verbosity_error()
        lib.disable_progress_bar()


@main.command(context_settings=CONTEXT)
@click.argument("prompt", nargs=-1)
@click.option("--prompts", "prompts_file", type=click.Path(dir_okay=False),
              help="A .txt (one prompt a line) or .jsonl (prompt/first_frame/last_frame/seed) file.")
@click.option("--model", default="demo",
              help="PixelDance model folder, 'demo' (the shipped demo model: 64x64, 8 frames, synthetic "
                   "shapes) or 'tiny-random' (random weights: makes noise).")
@click.option("--first-frame", type=click.Path(dir_okay=False), help="First-frame instruction image.")
@click.option("--last-frame", type=click.Path(dir_okay=False), help="Last-frame instruction image.")
@click.option("--frames", type=int, help="Frames per clip.  [default: the model's, else 16]")
@click.option("--size", type=int, help="Square size in pixels (a multiple of the VAE's factor).  "
                                       "[default: the model's, else 256]")
@click.option("--height", type=int, help="Height in pixels (overrides --size).")
@click.option("--width", type=int, help="Width in pixels (overrides --size).")
@click.option("--steps", default=50, help="Denoising steps.")
@click.option("--sampler", type=click.Choice(["ddim", "ddpm"]), default="ddim")
@click.option("--eta", default=0.0, help="DDIM eta (0: deterministic).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale on the text (<= 1: off).  "
                                             "[default: the model's, else 7.5]")
@click.option("--tau", type=int, help="Steps that use the last-frame instruction  [default: steps // 2]")
@click.option("--seed", default=0, help="Base seed; video i uses seed + i unless its line sets one.")
@click.option("--batch-size", default="1", help="Videos sampled together, or 'auto' (largest that fits the GPU).")
@click.option("--clips", default=1, help="Clips chained per video (last frame -> next first frame).")
@click.option("--fps", default=4.0, help="Frame rate of the written video.")
@click.option("--format", "fmt", type=click.Choice(["mp4", "gif", "png"]), default="mp4")
@click.option("--out", "out_dir", default="outputs", type=click.Path(file_okay=False), help="Output folder.")
@click.option("--device", help="cpu, cuda, cuda:1 ...  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]),
              help="[default: bf16 on CUDA (fp16 on GPUs older than compute capability 8.0), fp32 on CPU]")
@click.option("--t2i-model", type=click.Path(file_okay=False),
              help="Stable Diffusion folder that makes the first frame from the text when none is given.")
@click.option("--backend", type=click.Choice(["auto", "triton", "torch"]), default="auto",
              help="Temporal layers: Triton kernels, PyTorch reference, or auto (kernels on CUDA).")
@click.option("--no-cuda-graph", is_flag=True, help="Run the static sampler eagerly (no CUDA graph capture).")
@click.option("--compile", "compile_unet", is_flag=True,
              help="torch.compile (Inductor) the UNet of the static CUDA sampler before capture (the first batch "
                   "pays the compile time).")
@click.option("--transformer-gemm", type=click.Choice(["auto", "cublas", "fused"]),
              help="The transformers' GEMMs with the kernels on: cuBLAS, fused with their norms and residual adds "
                   "(Triton), or auto (what `pdengine tune` measured faster on this GPU; cuBLAS untuned).  "
                   "[default: $PDENGINE_TRANSFORMER_GEMM, else auto]")
@click.option("--resume", is_flag=True, help="Skip videos already in --out's manifest (same prompts and seeds).")
def generate(prompt, prompts_file, model, first_frame, last_frame, frames, size, height, width, steps,
             sampler, eta, guidance, tau, seed, batch_size, clips, fps, fmt, out_dir, device, dtype,
             t2i_model, backend, no_cuda_graph, compile_unet, transformer_gemm, resume):
    """Sample PixelDance videos from text + first frame (+ optional last frame)."""
    from pathlib import Path

    from .generate import GenerateError, GenerateJob, run_generate, sample_defaults
    from .media import MediaError
    from .pipeline import ModelFolderError, SampleSettings
    from .prompts import PromptFileError, PromptSpec, read_prompts

    _quiet_libraries()
    try:
        specs = [PromptSpec(p) for p in prompt]
        if prompts_file:
            specs += read_prompts(prompts_file)
        for spec in specs:
            spec.first_frame = spec.first_frame or first_frame
            spec.last_frame = spec.last_frame or last_frame
        if batch_size != "auto":
            try:
                batch_size = int(batch_size)
            except ValueError:
                raise GenerateError(f"--batch-size must be an integer or 'auto', got {batch_size!r}") from None
        if frames is None or guidance is None or (size is None and not (height and width)):
            defaults = sample_defaults(model)
            frames = defaults["frames"] if frames is None else frames
            size = defaults["size"] if size is None else size
            guidance = defaults["guidance"] if guidance is None else guidance
        settings = SampleSettings(num_frames=frames, height=height or size, width=width or size, steps=steps,
                                  sampler=sampler, eta=eta, guidance=guidance, tau=tau)
        job = GenerateJob(specs=specs, model=model, out_dir=Path(out_dir), settings=settings, seed=seed,
                          batch_size=batch_size, clips=clips, fps=fps, fmt=fmt, device=device, dtype=dtype,
                          t2i_model=t2i_model, backend=backend, cuda_graph=not no_cuda_graph,
                          compile=compile_unet)
        with _transformer_gemm_setting(transformer_gemm):
            records = run_generate(job, resume=resume)
    except (GenerateError, PromptFileError, MediaError, ModelFolderError) as e:
        _fail(e)
    click.echo(f"{len(records)} video(s) in {out_dir} (manifest: {Path(out_dir) / 'manifest.jsonl'})")


def _transformer_gemm_setting(value: str | None):
    """A with-block under `--transformer-gemm` (none: the environment's setting)."""
    import contextlib

    if value is None:
        return contextlib.nullcontext()
    try:
        from pdengine.kernels.fused_linear import transformer_gemm
    except ImportError as e:
        _fail(f"--transformer-gemm needs the Triton kernels, which cannot be imported here: {e}")
    return transformer_gemm(value)


@main.command(context_settings=CONTEXT)
@click.option("--from", "source", type=click.Choice(["modelscope", "pixeldance"]), required=True,
              help="Layout of SRC.")
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "dst", required=True, type=click.Path(file_okay=False), help="New PixelDance folder.")
@click.option("--overwrite", is_flag=True, help="Replace DST if it exists.")
def convert(source, src, dst, overwrite):
    """Turn a diffusers text-to-video (ModelScope) folder into a PixelDance folder (conv_in expanded with
    zero channels for c_image, so it starts out computing what the original did)."""
    from .convert import convert_model
    from .pipeline import ModelFolderError

    _quiet_libraries()
    try:
        out = convert_model(src, dst, source=source, overwrite=overwrite)
    except (ModelFolderError, FileExistsError, ValueError) as e:
        _fail(e)
    click.echo(f"wrote {out}")


@main.group(context_settings=CONTEXT)
def bench() -> None:
    """Benchmarks against the reference PyTorch layers and diffusers."""


@bench.command("kernels", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="cuda: time every provider; cpu: modeled vs counted bytes and compile stats (no timing).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="CSV path [default: beside --json].")
@click.option("--family", "families", multiple=True,
              type=click.Choice(["temporal_conv", "temporal_attention", "concat_cond", "latent_update", "geglu",
                                 "fused_linear", "group_norm_silu", "add_layer_norm", "adamw_sr"]),
              help="Only these kernel families (repeatable).  [default: all]")
@click.option("--quick", is_flag=True, help="Fewer shapes.")
@click.option("--profile", is_flag=True,
              help="cuda: add each row's host issue time and its top GPU kernels (torch.profiler).")
def bench_kernels(device, json_path, csv_path, families, quick, profile):
    """Each kernel family at the pixeldance shapes, side by side with its references."""
    from pathlib import Path

    from pdengine.bench.kernels import run_kernel_bench

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run_kernel_bench(device, Path(json_path) if json_path else None, Path(csv_path) if csv_path else None,
                            list(families) or None, quick, profile)
    failed = [r for r in rows if r.get("status", "ok") != "ok"]
    click.echo(f"{len(rows)} rows ({len(failed)} failed)" + (f"; JSON: {json_path}" if json_path else ""))


@bench.command("conv-configs", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="cuda: time every candidate at the pixeldance levels; cpu: check them at a small shape.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
@click.option("--quick", is_flag=True, help="Two or three candidates per kernel instead of six or eight.")
def bench_conv_configs(device, json_path, quick):
    """Launch-configuration sweep of the temporal conv's GEMM kernels (forward, dgrad, wgrad)."""
    from pathlib import Path

    from pdengine.bench.conv_configs import best_rows, run_conv_configs

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run_conv_configs(device, Path(json_path) if json_path else None, quick)
    bad = [r for r in rows if r["status"] != "ok"]
    for r in bad:
        click.echo(f"{r['kind']} {r['shape']} {r['config']}: {r['status']}")
    for b in best_rows(rows):
        click.echo(f"{b['kind']} {b['shape']}: best {b['best']} {b['best_ms']:.4f} ms, default {b['default']}"
                   + (f" ({b['speedup_vs_default']:.2f}x)" if b["speedup_vs_default"] else ""))
    click.echo(f"{len(rows)} rows ({len(bad)} not ok)" + (f"; JSON: {json_path}" if json_path else ""))


@main.command(context_settings=CONTEXT)
@click.option("--quick", is_flag=True, help="Three or four candidates per GEMM kind instead of seven to thirteen.")
@click.option("--out", "out_path", type=click.Path(dir_okay=False),
              help="Write the table here instead of the user cache (then point PDENGINE_CONV_TABLE at it).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write every timed row here.")
def tune(quick, out_path, json_path):
    """Measure the temporal conv's launch table on this GPU (used from then on by generate, train, bench).

    At each pixeldance level, times the fused Triton kernels over several tiles and the cuBLAS variant, for
    the conv, its transpose and its weight gradient, each checked against the fp32 reference first; the
    fastest correct one per kind and shape goes into the table for this GPU model. First it times one UNet
    call with the transformers' GEMMs on cuBLAS and fused (outputs compared first) and records which to run
    here (PDENGINE_TRANSFORMER_GEMM=auto, the default)."""
    from pathlib import Path

    from pdengine.bench.conv_configs import tune as run_tune

    try:
        table, path, extra, rows = run_tune(quick, Path(out_path) if out_path else None,
                                            Path(json_path) if json_path else None)
    except RuntimeError as e:
        _fail(e)
    for key, entry in sorted(table.entries.items()):
        t = extra[key]
        best = entry.best if isinstance(entry.best, str) else "triton " + "x".join(map(str, entry.best[:3]))
        gain = f" ({t['builtin_ms'] / t['best_ms']:.2f}x the built-in {t['builtin']})" if t["builtin_ms"] else ""
        click.echo(f"{key[0]:5} {t['shape']}: {best} {t['best_ms']:.4f} ms{gain}")
    gemm = table.transformer_gemm or {}
    if "error" in gemm:
        click.echo(f"transformer GEMMs: not measured ({gemm['error']}): cublas")
    elif gemm:
        click.echo(f"transformer GEMMs: {gemm['choice']} (one UNet call: cuBLAS {gemm['cublas_ms']:.2f} ms, fused "
                   f"{gemm['fused_ms']:.2f} ms, outputs differ by {gemm['rel_diff']:.2e} relative"
                   + (f"; error against fp32: cuBLAS {gemm['err_cublas']:.2e}, fused {gemm['err_fused']:.2e}"
                      if "err_fused" in gemm else "") + ")")
        for level, (cublas_ms, fused_ms) in sorted(gemm.get("level_ms", {}).items()):
            click.echo(f"  {level}: {gemm['levels'][level]} (cuBLAS {cublas_ms:.3f} ms, fused {fused_ms:.3f} ms)")
    bad = sum(r["status"] != "ok" for r in rows)
    click.echo(f"{table.describe()}: written to {path}" + (f"; {bad} candidates not ok (see --json)" if bad else ""))


@bench.command("sample", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="cuda: time the samplers side by side; cpu: FLOPs, launches and bytes per step (no timing).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="CSV path [default: beside --json].")
@click.option("--batch", "batches", multiple=True, type=int, help="Videos per batch (repeatable).  [default: 1 8 16]")
@click.option("--steps", default=50, help="DDIM steps.")
@click.option("--compile-mode", default="max-autotune", show_default=True,
              type=click.Choice(["max-autotune", "default", "none"]),
              help="torch.compile mode of the compiled providers (none: leave those rows out).")
@click.option("--providers", help="Comma-separated subset of the GPU providers to run (pdengine_graph, "
                                  "pdengine_graph_fused_gemm, pdengine_graph_cublas_conv, pdengine_eager, "
                                  "diffusers_eager, pdengine_graph_compile, diffusers_compile, breakdown).  "
                                  "[default: all]")
def bench_sample(device, json_path, csv_path, batches, steps, compile_mode, providers):
    """End-to-end sampling of the pixeldance preset (16x256x256, CFG 7.5) vs diffusers."""
    from pathlib import Path

    from pdengine.bench.sample import run_sample_bench

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        rows = run_sample_bench(device, Path(json_path) if json_path else None, Path(csv_path) if csv_path else None,
                                list(batches) or None, steps, compile_mode=compile_mode,
                                providers=[p.strip() for p in providers.split(",")] if providers else None)
    except ValueError as e:
        _fail(e)
    for r in rows:
        keys = [k for k in ("provider", "batch", "status", "seconds_per_video", "videos_per_s", "mfu",
                            "unet_gflops_per_video", "launches_per_step_eager", "gb_per_step") if k in r]
        click.echo("  ".join(f"{k}={r[k]}" for k in keys))


@bench.command("train", context_settings=CONTEXT)
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto",
              help="cuda: step time and peak memory vs a diffusers loop; cpu: saved-activation and state bytes.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Write the rows as JSON here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False), help="CSV path [default: beside --json].")
@click.option("--preset", default="pixeldance", type=click.Choice(["pixeldance", "small", "tiny"]))
@click.option("--batch", "batches", multiple=True, type=int, help="Batch sizes on the GPU.  [default: 1 2 4]")
@click.option("--steps", default=5, help="Timed optimizer steps per setup (GPU).")
@click.option("--providers", help="Comma-separated GPU setups (pdengine, pdengine_cublas_conv, pdengine_lean, "
                                  "diffusers_reference, pdengine_compile).  [default: all but pdengine_compile]")
def bench_train(device, json_path, csv_path, preset, batches, steps, providers):
    """Training step of our trainer vs a reference diffusers loop (same batch)."""
    from pathlib import Path

    from pdengine.bench.train import run_train_bench

    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        rows = run_train_bench(device, Path(json_path) if json_path else None, Path(csv_path) if csv_path else None,
                               preset, list(batches) or None, steps,
                               [p.strip() for p in providers.split(",")] if providers else None)
    except ValueError as e:
        _fail(e)
    for r in rows:
        keys = [k for k in ("provider", "checkpointing", "batch", "status", "saved_activation_gib_per_sample",
                            "saved_ratio_vs_reference", "samples_per_s", "peak_memory_gib_per_sample") if k in r]
        click.echo("  ".join(f"{k}={r[k]:.3g}" if isinstance(r[k], float) else f"{k}={r[k]}" for k in keys))


@main.command(context_settings=CONTEXT)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")
def info(as_json):
    """Versions, devices, available backends and preset sizes."""
    import json

    from .info import collect_info, format_info

    data = collect_info()
    click.echo(json.dumps(data, indent=2, default=str) if as_json else format_info(data))


def _register_training_commands() -> None:
    # train/cli.py imports only click and the stdlib at module level, so --help stays torch-free.
    from pdengine.train.cli import cache_latents_command, train_command
    from pdengine.train.demo import demo_command
    from pdengine.train.evaluate import eval_command
    from pdengine.train.synth import data_command
    from pdengine.train.vae import train_vae_command

    main.add_command(train_command)
    main.add_command(cache_latents_command)
    main.add_command(data_command)
    main.add_command(eval_command)
    main.add_command(train_vae_command)
    main.add_command(demo_command)


_register_training_commands()


if __name__ == "__main__":
    sys.exit(main())
