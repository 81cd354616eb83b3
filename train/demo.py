"""The demo model: a small PixelDance trained by `pdengine train` on `pdengine data synth` clips.

How the shipped demo (`engine/demo/`, `--model demo`) is made, end to end, is `train/demo_recipe.sh`
(every step a command; its header lists the deviations from the paper's recipe):

    pdengine data synth --out data --videos 2000 --images 1000 --frames 8 --seed 0
    pdengine train-vae --data data/images.csv --data data/train.csv --eval-data data/heldout.csv --out vae ...
    pdengine demo init --vae vae --out init                # tokenizer, text encoder, VAE, scheduler, fresh UNet
    pdengine cache-latents --model init --data data/train.csv --resolution 64 --frames 8 --out cache/videos
    pdengine cache-latents --model init --images data/images.csv --resolution 64 --out cache/images
    pdengine train --model init --latent-cache cache/videos --images cache/images --out run ...
    pdengine demo package --run run --checkpoint run/checkpoints/step-N --out engine/demo
    pdengine demo gallery --data data --out engine/demo/gallery; pdengine eval --data data ...

The parts `demo init` writes:
- tokenizer: a real `CLIPTokenizer` whose vocabulary gives every word the generator can write one token
  (`synth.vocabulary()`); any other text still tokenizes (byte-level BPE);
- text_encoder: a small `CLIPTextModel` (hidden 32, 2 layers), seeded, optionally pretrained, then frozen:
  the UNet learns to read its fixed embeddings of the captions, as PixelDance reads frozen CLIP's.
  `--text-steps N` pretrains it on the caption grammar first (`train/text_pretrain.py`, a stand-in for
  CLIP's pretraining); the shipped demo's had 600 steps. Left at random weights (N = 0, the earlier demo),
  its UNet never learned the motion words in 6,000 steps (engine/demo/README.md);
- vae: the `pdengine train-vae` AutoencoderKL (spatial factor 4: 64x64 frames -> 16x16x4 latents);
- scheduler: Stable Diffusion's scaled-linear schedule with DDIM (the engine default), v-prediction
  (`DEMO_PREDICTION`: the paper predicts epsilon);
- unet: fresh weights of `DEMO_UNET` below. Cross-attention (and so the temporal attention) sits at the
  8x8 and 4x4 latent levels only: at 16x16 it cost more than half of a CPU training step for little use on
  these scenes, where the first frame already fixes the appearance.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import click

DEMO_SIZE = 64
DEMO_FRAMES = 8
# The guidance scale the shipped folder asks for (`_sample_defaults`; `pdengine generate`/`eval`/`demo
# gallery` use it unless told otherwise), the best of a sweep on held-out clips (engine/demo/README.md).
DEMO_GUIDANCE = 2.0

# v-prediction (the scheduler config says so; `pdengine train` and the samplers follow it): with epsilon
# prediction, a short CPU run learned to ignore the image instructions at high noise (measured: the x0 its
# output implied at t = 999 was off by 5.9 in unit-variance latents, and zeroing c_image changed its loss
# there by 0-5%), so its samples started from a wrong layout.
DEMO_PREDICTION = "v_prediction"

DEMO_UNET: dict[str, Any] = {
    "in_channels": 8,
    "out_channels": 4,
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "down_block_types": ["DownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D"],
    "up_block_types": ["CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "UpBlock3D"],
    "norm_num_groups": 8,
    "attention_head_dim": 8,
    "cross_attention_dim": 32,
    "sample_size": DEMO_SIZE // 4,
}

_INIT_README = """\
# Demo model: initial folder (untrained UNet)

Written by `pdengine demo init --vae {vae} --seed {seed}`. The UNet has **fresh random weights**: this
folder is the start of `pdengine train --model DIR`, not a model to sample from. The VAE comes from
`pdengine train-vae`; the tokenizer and the frozen text encoder are built here (see `pdengine.train.demo`).
"""


class DemoError(ValueError):
    """Bad input to the demo-building commands."""


def demo_unet_config() -> dict[str, Any]:
    from pdengine.model.config import resolve_config

    return resolve_config(dict(DEMO_UNET))


def write_demo_init(out: str | os.PathLike, vae: str | os.PathLike, *, seed: int = 0, text_steps: int = 0,
                    overwrite: bool = False) -> Path:
    """Write the folder a demo training run starts from (see the module docstring); returns `out`.
    `text_steps` > 0 pretrains the text encoder that many steps on every caption the generator can write
    (`train/text_pretrain.py`; its record goes to text_encoder/pretraining.json) before it is frozen; 0
    leaves it at its seeded random weights, as the shipped demo has it.

    Built in a temporary folder beside `out` and renamed into place, so a failure leaves nothing behind.
    """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTokenizer

    from pdengine.engine.schedulers import SD_SCHEDULE
    from pdengine.engine.tiny import (
        _check_target,
        _model_index,
        _move_into_place,
        tiny_text_encoder,
        write_tiny_tokenizer,
    )
    from pdengine.model import UNet3D

    from .synth import all_captions, vocabulary
    from .text_pretrain import pretrain_text_encoder

    out, vae = Path(out), Path(vae)
    if text_steps < 0:
        raise DemoError(f"--text-steps must be >= 0, got {text_steps}")
    if not (vae / "config.json").is_file():
        raise DemoError(f"--vae {vae}: no config.json (a `pdengine train-vae` output folder is expected)")
    try:
        autoencoder = AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as e:
        raise DemoError(f"--vae {vae}: cannot load an AutoencoderKL: {e}") from None
    factor = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    if DEMO_SIZE // factor != DEMO_UNET["sample_size"] or autoencoder.config.latent_channels * 2 != DEMO_UNET["in_channels"]:
        raise DemoError(f"--vae {vae}: factor {factor} and {autoencoder.config.latent_channels} latent channels do not "
                        f"fit the demo UNet ({DEMO_SIZE} px -> {DEMO_UNET['sample_size']} latents of "
                        f"{DEMO_UNET['in_channels'] // 2} channels)")
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp / "tokenizer", words=vocabulary()))
        text_encoder = tiny_text_encoder(len(tokenizer), seed, bos_token_id=tokenizer.bos_token_id,
                                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        record = None
        if text_steps:
            record = pretrain_text_encoder(text_encoder, tokenizer, all_captions(), steps=text_steps, seed=seed)
        text_encoder.save_pretrained(tmp / "text_encoder", safe_serialization=True)
        if record is not None:
            (tmp / "text_encoder" / "pretraining.json").write_text(json.dumps({**record, "seed": seed}, indent=2) + "\n")
        autoencoder.save_pretrained(tmp / "vae", safe_serialization=True)
        DDIMScheduler.from_config(SD_SCHEDULE, prediction_type=DEMO_PREDICTION).save_pretrained(tmp / "scheduler")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            UNet3D(demo_unet_config()).save_pretrained(tmp / "unet")
        (tmp / "model_index.json").write_text(json.dumps(_model_index("pixeldance"), indent=2) + "\n")
        (tmp / "README.md").write_text(_INIT_README.format(vae=vae, seed=seed), encoding="utf-8")
        _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def training_record(run: str | os.PathLike, upto: int | None = None) -> dict[str, Any]:
    """What a `pdengine train` run folder says about how its model was made (up to step `upto`): steps,
    samples, summed step time (over every resumed invocation), the final loss (mean of the last 100 steps)."""
    run = Path(run)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DemoError(f"--run {run}: no metrics.jsonl (not a `pdengine train` run folder)")
    by_step: dict[int, dict] = {}
    for row in _read_jsonl(metrics_path):
        if row.get("loss") is not None and "step" in row and (upto is None or row["step"] <= upto):
            by_step[int(row["step"])] = row  # a resumed run logs the steps after its checkpoint again
    if not by_step:
        raise DemoError(f"{metrics_path}: no training steps logged")
    rows = [by_step[k] for k in sorted(by_step)]
    last = rows[-100:]
    return {
        "steps": rows[-1]["step"],
        "samples": sum(int(r.get("samples", 0)) for r in rows),
        "train_time_s": sum(float(r.get("step_time_s", 0.0)) for r in rows),
        "final_loss": sum(r["loss"] for r in last) / len(last),
    }


def package_demo(run: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                 ema: bool = True, readme: str | os.PathLike | None = None, overwrite: bool = False,
                 guidance: float = DEMO_GUIDANCE) -> Path:
    """Copy a finished run's `final/` model folder (or one of its checkpoints) to `out`, with the EMA weights
    as its UNet when `ema`, marked as trained, with its sample defaults (the demo's frames and size,
    `guidance`), plus `training.json` (`training_record` up to that step) and README.md (`readme`'s text, if
    given). Built beside `out` and renamed into place."""
    from pdengine.engine.tiny import _check_target, _move_into_place

    from .checkpoint import EMA_DIR

    run, out = Path(run), Path(out)
    final = Path(checkpoint) if checkpoint is not None else run / "final"
    if not (final / "model_index.json").is_file():
        raise DemoError(f"{final}: no model_index.json (a finished run's final/ or a checkpoint folder is expected)")
    step = json.loads((final / "model_index.json").read_text()).get("_training_step")
    record = training_record(run, upto=step)
    if step is not None and record["steps"] != step:
        raise DemoError(f"{run}/metrics.jsonl ends at step {record['steps']}, {final} is step {step}")
    if ema and not (final / EMA_DIR / "config.json").is_file():
        raise DemoError(f"{final} has no {EMA_DIR}/ weights (train with --ema, or package with --no-ema)")
    _check_target(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            src = final / (EMA_DIR if part == "unet" and ema else part)
            if not src.is_dir():
                raise DemoError(f"{final}: no {part}/ (train with --model pointing at a `pdengine demo init` folder)")
            shutil.copytree(src, tmp / part)
        index = json.loads((final / "model_index.json").read_text())
        for key in ("_random_weights", "_training_step"):
            index.pop(key, None)
        index["_sample_defaults"] = {"frames": DEMO_FRAMES, "size": DEMO_SIZE, "guidance": guidance}
        index["_demo"] = True
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        from safetensors import safe_open

        n = 0
        with safe_open(str(tmp / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
            for key in f.keys():
                n += math.prod(f.get_slice(key).get_shape())
        record["unet_parameters"] = n
        record["weights"] = "ema" if ema else "raw"
        record["unet_config"] = json.loads((tmp / "unet" / "config.json").read_text())
        (tmp / "training.json").write_text(json.dumps(record, indent=1) + "\n")
        write_example_frames(tmp / "examples")  # the instructions of the README's example command
        if readme is not None:
            shutil.copyfile(readme, tmp / "README.md")
        _move_into_place(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out


EXAMPLE = {"shape": "circle", "colour": "red", "motion": "move", "direction": "right", "start": [0.25, 0.55],
           "distance": 0.45, "scale": 0.11, "background": "stripes"}


def write_example_frames(out: str | os.PathLike, seed: int = 7) -> dict[str, Path]:
    """Render the README's example instructions into `out`: first.png and last.png of a red circle moving
    right on stripes (64x64; the background drawn from `seed`). Returns {"first", "last"}."""
    import numpy as np
    from PIL import Image

    from .synth import ClipSpec, _background, render_clip

    bg = _background(np.random.default_rng(seed), (EXAMPLE["background"],))
    spec = ClipSpec(EXAMPLE["shape"], EXAMPLE["colour"], EXAMPLE["motion"], bg, tuple(EXAMPLE["start"]),
                    EXAMPLE["scale"], EXAMPLE["scale"], EXAMPLE["direction"], EXAMPLE["distance"])
    frames, _ = render_clip(spec, DEMO_SIZE, DEMO_FRAMES)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"first": out / "first.png", "last": out / "last.png"}
    Image.fromarray(frames[0]).save(paths["first"])
    Image.fromarray(frames[-1]).save(paths["last"])
    return paths


def _panel(frames, scale: int):
    """(F, H, W, 3) uint8 -> nearest-neighbour upscaled by `scale`."""
    return frames.repeat(scale, axis=1).repeat(scale, axis=2)


def write_gallery(model: str, data: str | os.PathLike, out: str | os.PathLike, *, steps: int = 50,
                  guidance: float | None = None, seed: int = 0, scale: int = 2) -> list[dict[str, str]]:
    """One GIF per motion kind of the held-out clips of a synthetic set: [first-frame instruction |
    last-frame instruction | generated video (tau = T) | the held-out video itself], side by side.
    Returns [{"file", "caption", "id"}] and writes `out/gallery.md` (a markdown table of them).
    `guidance` None: the model folder's (`sample_defaults`)."""
    import numpy as np
    import torch

    from pdengine.engine.media import frames_to_uint8, read_video, write_video
    from pdengine.engine.pipeline import PixelDancePipeline, SampleSettings

    from .evaluate import frame_to_tensor, load_heldout, resolve_model

    out = Path(out)
    clips, seen = [], set()
    for clip in load_heldout(data):
        if clip["truth"]["motion"] not in seen:
            seen.add(clip["truth"]["motion"])
            clips.append(clip)
    videos = [read_video(c["path"]) for c in clips]
    frames, size = clips[0]["truth"]["frames"], clips[0]["truth"]["size"]
    model_dir = resolve_model(model)
    if guidance is None:
        from pdengine.engine.generate import sample_defaults

        guidance = sample_defaults(str(model_dir))["guidance"]
    pipe = PixelDancePipeline.from_pretrained(model_dir, device="cpu", dtype=torch.float32)

    settings = SampleSettings(num_frames=frames, height=size, width=size, steps=steps, guidance=guidance, tau=steps)
    gen = pipe.generate([c["caption"] for c in clips], [frame_to_tensor(v[0]) for v in videos],
                        [frame_to_tensor(v[-1]) for v in videos],
                        [seed + i for i in range(len(clips))], settings)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    gap = np.full((frames, size * scale, 2 * scale, 3), 255, dtype=np.uint8)
    for i, (clip, video) in enumerate(zip(clips, videos)):
        generated = frames_to_uint8(gen[i].permute(1, 0, 2, 3))
        still = [np.repeat(video[[k]], frames, axis=0) for k in (0, -1)]
        panels = [_panel(x, scale) for x in (still[0], still[1], generated, video)]
        strip = np.concatenate([panels[0], gap, panels[1], gap, panels[2], gap, panels[3]], axis=2)
        name = f"{clip['truth']['motion']}.gif"
        write_video(strip, out / name, "gif", clip["truth"].get("fps", 4.0))
        entries.append({"file": name, "caption": clip["caption"], "id": clip["id"]})
    lines = ["| text instruction | first frame · last frame · **generated** · held-out video |", "|---|---|"]
    lines += [f"| {e['caption']} | ![{e['caption']}]({e['file']}) |" for e in entries]
    (out / "gallery.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return entries


def comparison_table(results: dict[str, dict]) -> str:
    """Markdown table of several `pdengine eval` results (name -> its JSON), one row per model and tau; name
    the models by their guidance when it differs. Then their held-out denoising losses, where measured."""
    head = ["model", "tau", "first-frame PSNR (dB)", "motion acc.", "last-frame err (px)", "colour kept",
            "object found"]
    keys = ("first_frame_psnr", "motion_accuracy", "last_frame_error_px", "colour_kept", "object_found")
    fmts = ("{:.2f}", "{:.3f}", "{:.2f}", "{:.3f}", "{:.3f}")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, res in results.items():
        for tau, scores in res["by_tau"].items():
            cells = ["n/a" if scores.get(k) is None else f.format(scores[k]) for k, f in zip(keys, fmts)]
            lines.append(f"| {name} | {tau}/{res['steps']} | " + " | ".join(cells) + " |")
    first = next(iter(results.values()))
    scales = sorted({res["guidance"] for res in results.values()})
    guidance = f"guidance {scales[0]}" if len(scales) == 1 else "guidance " + " or ".join(map(str, scales)) + \
        " (as the model column says)"
    lines.append(f"\n{first['videos']} held-out clips, {first['steps']} DDIM steps, {guidance}.")
    with_loss = {name: res for name, res in results.items() if res.get("heldout_loss")}
    if with_loss:  # results written before `pdengine eval` measured it have none
        from .evaluate import loss_table

        lines += ["", loss_table(with_loss)]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# CLI (registered by engine/cli.py; module level imports only click and the stdlib)
# ---------------------------------------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group("demo", context_settings=CONTEXT)
def demo_command() -> None:
    """Build the demo model: the initial folder to train from, and the shipped folder from a run."""


@demo_command.command("init", context_settings=CONTEXT)
@click.option("--vae", required=True, type=click.Path(file_okay=False), help="A `pdengine train-vae` output folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--seed", default=0, help="Seed of the text encoder and the fresh UNet weights.")
@click.option("--text-steps", default=0, help="Pretrain the text encoder this many steps on the caption grammar "
              "before freezing it (0: seeded random weights, as the shipped demo).")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
def init_command(vae, out, seed, text_steps, overwrite):
    """Tokenizer for the synthetic captions, frozen text encoder, the VAE, scheduler and a fresh demo UNet."""
    try:
        path = write_demo_init(out, vae, seed=seed, text_steps=text_steps, overwrite=overwrite)
    except (DemoError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path} (untrained UNet: train it with `pdengine train --model {path} ...`)")


@demo_command.command("package", context_settings=CONTEXT)
@click.option("--run", required=True, type=click.Path(file_okay=False), help="A finished `pdengine train` run folder.")
@click.option("--checkpoint", type=click.Path(file_okay=False), help="Package this checkpoint of the run instead "
              "of its final/ (e.g. RUN/checkpoints/step-1200).")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Model folder to write.")
@click.option("--ema/--no-ema", default=True, help="Ship the EMA weights (the folder's ema/) as the UNet.")
@click.option("--readme", type=click.Path(dir_okay=False), help="Markdown file to ship as the folder's README.md.")
@click.option("--guidance", type=float, default=DEMO_GUIDANCE,
              help="The guidance scale the folder asks samplers to use by default.")
@click.option("--overwrite", is_flag=True, help="Replace an existing folder.")
def package_command(run, checkpoint, out, ema, readme, guidance, overwrite):
    """Make a shippable model folder from a run: its final weights, training record and README."""
    try:
        path = package_demo(run, out, checkpoint=checkpoint, ema=ema, readme=readme, overwrite=overwrite,
                            guidance=guidance)
    except (DemoError, FileExistsError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"wrote {path}")


@demo_command.command("gallery", context_settings=CONTEXT)
@click.option("--model", default="demo", help="PixelDance model folder, or 'demo'.")
@click.option("--data", required=True, type=click.Path(file_okay=False), help="A `pdengine data synth` folder.")
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Folder for the GIFs and gallery.md.")
@click.option("--steps", default=50, help="DDIM steps (tau = steps: the last frame steers every step).")
@click.option("--guidance", type=float, help="Classifier-free guidance scale on the text.  "
                                             "[default: the model's, else 7.5]")
@click.option("--seed", default=0, help="Clip i is sampled with seed + i.")
def gallery_command(model, data, out, steps, guidance, seed):
    """GIFs of held-out clips, one per motion kind: first frame, last frame, generated, held-out video."""
    from pdengine.engine.cli import _quiet_libraries

    from .evaluate import EvalError

    _quiet_libraries()
    try:
        entries = write_gallery(model, data, out, steps=steps, guidance=guidance, seed=seed)
    except EvalError as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{len(entries)} GIFs in {out} (table: {Path(out) / 'gallery.md'})")


@demo_command.command("table", context_settings=CONTEXT)
@click.argument("results", nargs=-1, required=True)
def table_command(results):
    """Markdown table comparing `pdengine eval --json` results given as NAME=PATH."""
    loaded = {}
    for item in results:
        name, sep, path = item.partition("=")
        if not sep or not name:
            raise click.ClickException(f"{item!r}: expected NAME=PATH")
        try:
            loaded[name] = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise click.ClickException(f"{path}: {e}") from None
    click.echo(comparison_table(loaded))
