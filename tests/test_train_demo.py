"""`pdengine demo init` / `demo package`: the folders the demo model is trained from and shipped as."""

import json

import pytest
import torch
from click.testing import CliRunner

from pdengine.train.demo import (
    DEMO_FRAMES,
    DEMO_GUIDANCE,
    DEMO_SIZE,
    DEMO_UNET,
    DemoError,
    demo_command,
    package_demo,
    training_record,
    write_demo_init,
)
from pdengine.train.synth import vocabulary


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    from pdengine.train.vae import default_vae_config

    path = tmp_path_factory.mktemp("vae")
    torch.manual_seed(0)
    AutoencoderKL(**default_vae_config(DEMO_SIZE)).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def init_dir(vae_dir, tmp_path_factory):
    return write_demo_init(tmp_path_factory.mktemp("demo") / "init", vae_dir, seed=0)


def test_init_folder_is_a_loadable_untrained_model(init_dir, vae_dir):
    from transformers import CLIPTokenizer

    from pdengine.engine.pipeline import PixelDancePipeline, SampleSettings

    index = json.loads((init_dir / "model_index.json").read_text())
    assert index["_random_weights"] is True  # generate warns: the UNet is untrained
    sched = json.loads((init_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction" and sched["_class_name"] == "DDIMScheduler"
    unet_cfg = json.loads((init_dir / "unet" / "config.json").read_text())
    assert {k: unet_cfg[k] for k in DEMO_UNET} == DEMO_UNET

    tok = CLIPTokenizer.from_pretrained(init_dir / "tokenizer")
    for word in vocabulary():  # every caption word is one token, between BOS and EOS
        assert len(tok(word)["input_ids"]) == 3, word
    assert len(tok("a zebra jumps")["input_ids"]) > 5  # other text still tokenizes, byte by byte

    pipe = PixelDancePipeline.from_pretrained(init_dir, device="cpu", dtype=torch.float32)
    first = torch.rand(1, 3, DEMO_SIZE, DEMO_SIZE) * 2 - 1
    out = pipe.generate(["a red circle moves up"], [first[0]], [None], [0],
                        SampleSettings(num_frames=DEMO_FRAMES, height=DEMO_SIZE, width=DEMO_SIZE, steps=2))
    assert out.shape == (1, 3, DEMO_FRAMES, DEMO_SIZE, DEMO_SIZE)
    # The VAE is the given one, weight for weight.
    from diffusers import AutoencoderKL

    a, b = AutoencoderKL.from_pretrained(vae_dir).state_dict(), AutoencoderKL.from_pretrained(init_dir / "vae").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_init_is_deterministic_and_refuses_bad_input(init_dir, vae_dir, tmp_path):
    from safetensors.torch import load_file

    again = write_demo_init(tmp_path / "again", vae_dir, seed=0)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        a, b = load_file(init_dir / part), load_file(again / part)
        assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileExistsError):
        write_demo_init(again, vae_dir)
    with pytest.raises(DemoError, match="config.json"):
        write_demo_init(tmp_path / "x", tmp_path / "no-vae")

    from diffusers import AutoencoderKL

    from pdengine.train.vae import default_vae_config

    factor8 = tmp_path / "vae8"
    cfg = default_vae_config(DEMO_SIZE)
    cfg.update(block_out_channels=[32, 32, 64, 64], down_block_types=["DownEncoderBlock2D"] * 4,
               up_block_types=["UpDecoderBlock2D"] * 4)
    AutoencoderKL(**cfg).save_pretrained(factor8)
    with pytest.raises(DemoError, match="factor 8"):
        write_demo_init(tmp_path / "y", factor8)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_init_can_pretrain_the_text_encoder(init_dir, vae_dir, tmp_path):
    from safetensors.torch import load_file

    pre = write_demo_init(tmp_path / "pre", vae_dir, seed=0, text_steps=5)
    record = json.loads((pre / "text_encoder" / "pretraining.json").read_text())
    assert record["steps"] == 5 and record["seed"] == 0 and record["captions"] > 100
    assert not (init_dir / "text_encoder" / "pretraining.json").exists()
    a, b = load_file(init_dir / "text_encoder/model.safetensors"), load_file(pre / "text_encoder/model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # trained ...
    a, b = load_file(init_dir / "unet/diffusion_pytorch_model.safetensors"), load_file(pre / "unet/diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # ... and nothing else changed
    with pytest.raises(DemoError, match="text-steps"):
        write_demo_init(tmp_path / "neg", vae_dir, text_steps=-1)


def _fake_run(run, init_dir, losses):
    """A run folder as `pdengine train` leaves it: metrics.jsonl and final/ with ema/."""
    import shutil

    from pdengine.model import UNet3D

    final = run / "final"
    shutil.copytree(init_dir, final)
    index = json.loads((final / "model_index.json").read_text())
    del index["_random_weights"]
    (final / "model_index.json").write_text(json.dumps(index))
    ema = UNet3D.from_pretrained(final / "unet")
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)
    ema.save_pretrained(final / "ema")
    rows = [{"step": i + 1, "loss": v, "samples": 8, "step_time_s": 0.5} for i, v in enumerate(losses)]
    rows.insert(2, {"step": 3, "loss": None, "nonfinite": True})  # a crashed attempt, resumed below
    rows.append({"step": 2, "loss": 99.0, "samples": 8, "step_time_s": 0.5})  # resumed from step 1: replaces it
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ema


def test_package_ships_the_ema_weights_with_the_record(init_dir, tmp_path):
    from safetensors.torch import load_file

    losses = [float(v) for v in range(1, 151)]
    ema = _fake_run(tmp_path / "run", init_dir, losses)
    record = training_record(tmp_path / "run")
    expect = losses[:]
    expect[1] = 99.0
    assert record["steps"] == 150 and record["samples"] == 150 * 8
    assert record["train_time_s"] == pytest.approx(150 * 0.5)
    assert record["final_loss"] == pytest.approx(sum(expect[-100:]) / 100)

    readme = tmp_path / "README.md"
    readme.write_text("# demo\n")
    out = package_demo(tmp_path / "run", tmp_path / "ship", readme=readme)
    shipped = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(shipped[k], v) for k, v in ema.state_dict().items())
    index = json.loads((out / "model_index.json").read_text())
    assert index["_demo"] is True and "_random_weights" not in index
    assert index["_sample_defaults"] == {"frames": DEMO_FRAMES, "size": DEMO_SIZE, "guidance": DEMO_GUIDANCE}
    rec = json.loads((out / "training.json").read_text())
    assert rec["weights"] == "ema" and rec["unet_parameters"] == sum(p.numel() for p in ema.parameters())
    assert (out / "README.md").read_text() == "# demo\n" and not (out / "ema").exists()

    # A checkpoint: the record stops at its step.
    ckpt = tmp_path / "run" / "checkpoints" / "step-000100"
    import shutil

    shutil.copytree(tmp_path / "run" / "final", ckpt)
    index = json.loads((ckpt / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_training_step": 100}))
    mid = package_demo(tmp_path / "run", tmp_path / "mid", checkpoint=ckpt)
    rec = json.loads((mid / "training.json").read_text())
    assert rec["steps"] == 100 and rec["final_loss"] == pytest.approx(sum(expect[:100]) / 100)
    assert "_training_step" not in json.loads((mid / "model_index.json").read_text())
    (ckpt / "model_index.json").write_text(json.dumps({**index, "_training_step": 500}))
    with pytest.raises(DemoError, match="ends at step 150"):
        package_demo(tmp_path / "run", tmp_path / "late", checkpoint=ckpt)

    raw = package_demo(tmp_path / "run", tmp_path / "raw", ema=False)
    a = load_file(raw / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(init_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_package_errors(init_dir, tmp_path):
    with pytest.raises(DemoError, match="model_index.json"):
        package_demo(tmp_path / "nothing", tmp_path / "o")
    _fake_run(tmp_path / "run", init_dir, [1.0, 2.0])
    (tmp_path / "run" / "final" / "ema" / "config.json").unlink()
    with pytest.raises(DemoError, match="--no-ema"):
        package_demo(tmp_path / "run", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_cli(vae_dir, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(demo_command, ["init", "--vae", str(vae_dir), "--out", str(tmp_path / "i")])
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "i" / "unet" / "config.json").is_file()
    again = runner.invoke(demo_command, ["init", "--vae", str(vae_dir), "--out", str(tmp_path / "i")])
    assert again.exit_code != 0 and "not empty" in again.output
    bad = runner.invoke(demo_command, ["package", "--run", str(tmp_path / "none"), "--out", str(tmp_path / "p")])
    assert bad.exit_code != 0 and "model_index.json" in bad.output


def test_gallery_strips(init_dir, tmp_path):
    from pdengine.engine.media import read_video
    from pdengine.train.demo import write_gallery
    from pdengine.train.synth import write_dataset

    data = tmp_path / "data"
    write_dataset(data, videos=16, images=0, seed=0, size=DEMO_SIZE, frames=DEMO_FRAMES, fps=4.0, holdout=0.5)
    entries = write_gallery(str(init_dir), data, tmp_path / "g", steps=2, scale=1)
    motions = [json.loads((data / "videos" / f"{e['id']}.json").read_text())["motion"] for e in entries]
    assert len(set(motions)) == len(motions) >= 3  # one clip per motion kind
    gif = read_video(tmp_path / "g" / entries[0]["file"])
    assert gif.shape == (DEMO_FRAMES, DEMO_SIZE, 4 * DEMO_SIZE + 3 * 2, 3)
    held_out = read_video(data / "videos" / f"{entries[0]['id']}.mp4")
    # The first panel is the first-frame instruction in every frame (GIF palettes are lossy: loose bound).
    diff = gif[:, :, :DEMO_SIZE].astype(float) - held_out[0][None].astype(float)
    assert abs(diff).mean() < 8.0
    table = (tmp_path / "g" / "gallery.md").read_text()
    assert all(e["caption"] in table and e["file"] in table for e in entries)


def test_comparison_table(tmp_path):
    from pdengine.train.demo import comparison_table

    def result(psnr, acc):
        scores = {"first_frame_psnr": psnr, "motion_accuracy": acc, "last_frame_error_px": None,
                  "colour_kept": 1.0, "object_found": 0.5}
        return {"videos": 4, "steps": 10, "guidance": 7.5, "by_tau": {"0": scores, "10": scores}}

    table = comparison_table({"full": result(31.234, 0.9), "no-text": result(20.0, 0.25)})
    lines = table.splitlines()
    assert lines[0].startswith("| model | tau |") and len([x for x in lines if x.startswith("| full")]) == 2
    assert "| full | 0/10 | 31.23 | 0.900 | n/a | 1.000 | 0.500 |" in lines
    assert "| no-text | 10/10 | 20.00 | 0.250 |" in table
    assert table.endswith("4 held-out clips, 10 DDIM steps, guidance 7.5.")
    assert "denoising loss" not in table  # results without it (older JSON) get no loss table
    loss = {"prediction_type": "v_prediction", "timesteps": [100, 900], "opposite_clips": 3,
            "first_last": {"caption": 0.04, "empty_prompt": 0.05, "opposite": None, "caption_on_opposite_clips": None},
            "first_only": {"caption": 0.06, "empty_prompt": 0.07, "opposite": 0.08, "caption_on_opposite_clips": 0.061}}
    with_loss = comparison_table({"full": {**result(31.0, 0.9), "heldout_loss": loss}, "old": result(20.0, 0.25)})
    assert "| full | first + last | 0.0400 | 0.0500 | n/a | n/a |" in with_loss
    assert "| full | first only | 0.0600 | 0.0700 | 0.0800 | 0.0610 |" in with_loss
    assert "| old | first" not in with_loss and "on the 3 clips that have one" in with_loss
    mixed = comparison_table({"g=7.5": result(30.0, 1.0), "g=1": {**result(30.0, 1.0), "guidance": 1.0}})
    assert mixed.endswith("guidance 1.0 or 7.5 (as the model column says).")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(result(30.0, 1.0)))
    out = CliRunner().invoke(demo_command, ["table", f"m={path}"])
    assert out.exit_code == 0 and "| m | 0/10 | 30.00 | 1.000 |" in out.output
    bad = CliRunner().invoke(demo_command, ["table", str(path)])
    assert bad.exit_code != 0 and "NAME=PATH" in bad.output
