"""`pdengine train` and `pdengine cache-latents`: thin click wrappers over `train()` and `cache_latents_job()`.

Registered by `engine/cli.py` (`main.add_command(train_command)`, `main.add_command(cache_latents_command)`).
Module level imports click, the stdlib and `train/config.py` (stdlib only) so that `pdengine --help`
never imports torch; the work is imported inside the commands.
"""

from __future__ import annotations

import click

from .config import TrainConfig, flag

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}
_D = TrainConfig()  # defaults shown by --help are the dataclass's


def _options(f):
    """The options of `pdengine train`, one per TrainConfig field (applied bottom-up, listed top-down)."""
    opts = [
        click.option("--config", "config_file", type=click.Path(dir_okay=False),
                     help="TOML file giving any of these options (snake_case or kebab-case keys); flags override it."),
        click.option("--model", metavar="DIR", help="Start from a PixelDance model folder."),
        click.option("--init-from-sd", metavar="DIR", help="Start from a Stable Diffusion folder: its 2D UNet inflated to 3D."),
        click.option("--init-from-modelscope", metavar="DIR", help="Start from a ModelScope text-to-video folder (conv_in expanded)."),
        click.option("--preset", metavar="NAME", help="Start from fresh weights of a UNet3D preset (tiny, small, pixeldance)."),
        click.option("--components", metavar="DIR", help="Folder supplying vae/, text_encoder/, tokenizer/, scheduler/ when the "
                                          "start has none (--preset)."),
        click.option("--data", metavar="FILE", help="Video table (CSV/JSONL/Parquet) with path and caption columns."),
        click.option("--images", metavar="FILE|DIR", help="Image table, or a latent cache of images, for joint image-text training."),
        click.option("--latent-cache", metavar="DIR", help="Train from a `pdengine cache-latents` folder instead of --data."),
        click.option("--video-column", default=_D.video_column, help="Video path column of --data."),
        click.option("--image-column", default=_D.image_column, help="Image path column of --images."),
        click.option("--caption-column", default=_D.caption_column, help="Caption column."),
        click.option("--resolution", type=int, default=_D.resolution, help="Square training size in pixels."),
        click.option("--frames", type=int, default=_D.frames, help="Frames per clip."),
        click.option("--fps", type=float, default=_D.fps, help="Frame rate clips are sampled at."),
        click.option("--num-workers", type=int, default=_D.num_workers, help="DataLoader worker processes."),
        click.option("--out", metavar="DIR", help="Run folder: checkpoints/, final/, metrics.jsonl."),
        click.option("--steps", type=int, default=_D.steps, help="Optimizer steps."),
        click.option("--batch-size", type=int, default=_D.batch_size, help="Samples per process and micro-batch."),
        click.option("--grad-accum", type=int, default=_D.grad_accum, help="Micro-batches per optimizer step."),
        click.option("--lr", type=float, default=_D.lr, help="Learning rate (after warmup)."),
        click.option("--warmup-steps", type=int, default=_D.warmup_steps, help="Linear LR warmup steps."),
        click.option("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay."),
        click.option("--max-grad-norm", type=float, default=_D.max_grad_norm, help="Gradient clipping (0: off)."),
        click.option("--optimizer", type=click.Choice(["adamw", "adamw8bit"]), default=_D.optimizer,
                     help="adamw: PyTorch's (fused on CUDA); adamw8bit: bitsandbytes'."),
        click.option("--eta", type=float, default=_D.eta, help="Probability of dropping the last-frame instruction."),
        click.option("--text-drop", type=float, default=_D.text_drop, help="Probability of the empty prompt (CFG)."),
        click.option("--cond-timestep", type=int, default=_D.cond_timestep,
                     help="Instructions are noised to this timestep."),
        click.option("--last-frame-window", type=int, default=_D.last_frame_window,
                     help="Last-frame instruction picked among the last N frames."),
        click.option("--perturb", type=click.Choice(["instructions", "last", "none"]), default=_D.perturb,
                     help="Which instruction slots are noised."),
        click.option("--image-every", type=int, default=_D.image_every,
                     help="One image step every N steps when --images is given (0: off)."),
        click.option("--device", metavar="DEVICE", help="cpu, cuda, cuda:1  [default: cuda if available (LOCAL_RANK's under torchrun)]"),
        click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default=_D.dtype,
                     help="Compute dtype: auto = bf16 autocast (fp32 master weights) on CUDA, fp32 on the CPU."),
        click.option("--pure-bf16", is_flag=True, default=_D.pure_bf16,
                     help="bf16 weights and optimizer state (AdamW with stochastic rounding)."),
        click.option("--checkpointing", type=click.Choice(["none", "attention", "full"]), default=_D.checkpointing,
                     help="Activation checkpointing policy."),
        click.option("--backend", type=click.Choice(["auto", "torch", "triton"]), default=_D.backend,
                     help="Temporal layers: Triton kernels, PyTorch reference, or auto (kernels on CUDA)."),
        click.option("--dropout", type=float, help="Override the UNet's dropout probability  [default: the model's]"),
        click.option("--ema", type=float, help="Keep EMA weights with this decay (e.g. 0.9999)  [default: off]"),
        click.option("--ema-device", type=click.Choice(["gpu", "cpu"]), default=_D.ema_device,
                     help="Where the EMA weights live (cpu: averaged in host memory by a background thread "
                          "that overlaps the next step; with --fsdp each rank keeps its own shards)."),
        click.option("--fsdp", is_flag=True, default=_D.fsdp, help="Shard with FSDP2 instead of DDP (CUDA)."),
        click.option("--compile", is_flag=True, default=_D.compile,
                     help="torch.compile the UNet (Inductor; the first steps pay the compile time)."),
        click.option("--save-every", type=int, default=_D.save_every, help="Checkpoint every N steps (0: never)."),
        click.option("--keep", type=int, default=_D.keep, help="Checkpoints kept."),
        click.option("--resume", is_flag=True, default=_D.resume, help="Continue from the last complete checkpoint."),
        click.option("--seed", type=int, default=_D.seed, help="Seed of every random draw."),
        click.option("--log-every", type=int, default=_D.log_every, help="Progress-bar update interval (steps)."),
        click.option("--tensorboard/--no-tensorboard", default=_D.tensorboard,
                     help="Also write TensorBoard logs (when tensorboard is installed)."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def build_config(ctx: click.Context, params: dict) -> TrainConfig:
    """TOML values first, then every flag given on the command line (not left at its default)."""
    from click.core import ParameterSource

    config_file = params.pop("config_file")
    given = {k: v for k, v in params.items() if ctx.get_parameter_source(k) != ParameterSource.DEFAULT}
    if config_file is not None:
        return TrainConfig.from_toml(config_file, **given)
    return TrainConfig(**params)


@click.command("train", context_settings=CONTEXT)
@_options
@click.pass_context
def train_command(ctx: click.Context, **params):
    """Train a PixelDance UNet (the paper's recipe): resumable, memory-lean, multi-GPU under torchrun."""
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .data import DatasetError
    from .trainer import TrainError, train

    try:
        config = build_config(ctx, params)
        summary = train(config)
    except (ConfigError, TrainError, CheckpointError, DatasetError) as e:
        raise click.ClickException(str(e)) from None
    if summary["final"] is None:  # not rank 0
        return
    skipped = summary["skipped"]
    click.echo(f"trained to step {summary['steps']} (loss {summary['loss']:.4f}, "
               f"{summary['samples_per_s'] or 0:.2f} samples/s); skipped {skipped['video']} video(s), "
               f"{skipped['image']} image(s)")
    click.echo(f"final weights: {summary['final']}; metrics: {summary['metrics']}")


@click.command("cache-latents", context_settings=CONTEXT)
@click.option("--model", required=True, metavar="DIR", help="Model folder whose vae/, text_encoder/, tokenizer/ encode the data.")
@click.option("--data", metavar="FILE", help="Video table (CSV/JSONL/Parquet) to encode.")
@click.option("--images", metavar="FILE", help="Image table to encode instead of videos (for --images of `pdengine train`).")
@click.option("--out", required=True, metavar="DIR", help="Cache folder (created).")
@click.option("--video-column", default=_D.video_column, help="Path column of the table.")
@click.option("--caption-column", default=_D.caption_column, help="Caption column.")
@click.option("--resolution", type=int, default=_D.resolution, help="Square size in pixels.")
@click.option("--frames", type=int, default=_D.frames, help="Frames per clip.")
@click.option("--fps", type=float, default=_D.fps, help="Frame rate clips are sampled at.")
@click.option("--batch-size", type=int, default=4, help="Items encoded together.")
@click.option("--shard-size", type=int, default=256, help="Items per safetensors shard.")
@click.option("--seed", type=int, default=_D.seed, help="Seed of the clip starts.")
@click.option("--device", help="cpu, cuda, cuda:1  [default: cuda if available]")
@click.option("--dtype", type=click.Choice(["auto", "fp32", "bf16"]), default="auto",
              help="Encoder and storage dtype: auto = bf16 on CUDA, fp32 on the CPU.")
@click.option("--overwrite", is_flag=True, help="Replace an existing cache in --out.")
def cache_latents_command(model, data, images, out, video_column, caption_column, resolution, frames, fps,
                          batch_size, shard_size, seed, device, dtype, overwrite):
    """Encode videos (or images) and captions once with the frozen VAE and text encoder."""
    from .config import ConfigError
    from .data import DatasetError
    from .trainer import TrainError, cache_latents_job

    try:
        path, count = cache_latents_job(model=model, data=data, images=images, out=out, video_column=video_column,
                                        caption_column=caption_column, resolution=resolution, frames=frames, fps=fps,
                                        batch_size=batch_size, shard_size=shard_size, seed=seed, device=device,
                                        dtype=dtype, overwrite=overwrite)
    except (ConfigError, TrainError, DatasetError, FileExistsError, FileNotFoundError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"cached {count} item(s) in {path}")


__all__ = ["train_command", "cache_latents_command", "build_config", "flag"]
