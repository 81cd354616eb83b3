"""pdengine.train.vae (`pdengine train-vae`): training, saved folder, exact resume, input errors, eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import AutoencoderKL
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from pdengine.engine.media import read_video, write_video
from pdengine.train.vae import (
    TRAIN_LOG,
    VaeTrainError,
    _augment,
    default_vae_config,
    evaluate_vae,
    load_frames,
    train_vae,
    train_vae_command,
    vae_factor,
)

SIZE = 16
# A very small AutoencoderKL (same 3-level layout as the default, fewer channels) keeps each step at a few ms.
TINY = {"block_out_channels": [8, 16, 16], "norm_num_groups": 8}
FAST = {"size": SIZE, "config": TINY, "batch_size": 4, "lr": 2e-3, "save_every": 0}


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A coloured circle or square on a two-colour gradient, uint8 (size, size, 3)."""
    t = np.linspace(0.0, 1.0, size)[None, :, None]
    a, b = rng.integers(40, 200, size=(2, 3))
    img = Image.fromarray(((1 - t) * a + t * b).repeat(size, axis=0).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(2, size // 4 + 1))
    cx, cy = rng.integers(r, size - r, size=2)
    box = (int(cx - r), int(cy - r), int(cx + r), int(cy + r))
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=colour)
    return np.asarray(img)


def _write_table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: one thread is as fast as two, and immune to an oversubscribed CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vae_data")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    rows = []
    for i in range(24):
        Image.fromarray(_scene(rng, SIZE)).save(root / "images" / f"{i}.png")
        rows.append({"path": f"images/{i}.png", "caption": "a shape"})
    images = _write_table(root / "images.csv", rows)
    held = _write_table(root / "held.csv", rows[:8])
    videos = []
    for i in range(2):
        frames = np.stack([_scene(rng, SIZE) for _ in range(3)])
        write_video(frames, root / "videos" / f"{i}.mp4", "mp4", fps=4.0)
        videos.append({"path": f"videos/{i}.mp4", "caption": "a clip"})
    return {"images": images, "held": held, "videos": _write_table(root / "videos.csv", videos), "root": root}


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("vae_run") / "vae"
    result = train_vae(data["images"], out, steps=40, log_every=5, seed=0, eval_data=data["held"], **FAST)
    return out, result


def _reference_frames(table: Path) -> np.ndarray:
    """The table's PNGs read straight with PIL (already SIZE x SIZE: no resizing involved)."""
    with open(table, newline="") as fp:
        paths = [table.parent / row["path"] for row in csv.DictReader(fp)]
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def _reference_encode(vae: AutoencoderKL, frames: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """Posterior means and uint8 reconstructions, computed directly with diffusers."""
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        y = vae.decode(z).sample
    y8 = ((y.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return z, y8


def test_default_config_has_factor_4_and_divisible_groups():
    cfg = default_vae_config(64)
    assert vae_factor(cfg) == 4
    assert cfg["latent_channels"] == 4
    assert all(c % cfg["norm_num_groups"] == 0 for c in cfg["block_out_channels"])
    vae = AutoencoderKL(**cfg)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 64, 64)).latent_dist.mean
    assert z.shape == (1, 4, 16, 16)


def test_short_run_lowers_loss_and_saves_a_diffusers_folder(data, trained):
    out, result = trained
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 8 and losses[-1] < 0.9 * losses[0]

    vae = AutoencoderKL.from_pretrained(out)
    assert list(vae.config.block_out_channels) == TINY["block_out_channels"]
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"], rel=1e-12)
    # The scaling factor is 1 / std of the training frames' posterior means (all 24 frames here).
    z, _ = _reference_encode(vae, _reference_frames(data["images"]))
    assert result["scaling_factor"] == pytest.approx(1.0 / z.double().std(unbiased=False).item(), rel=1e-5)

    log = json.loads((out / TRAIN_LOG).read_text())
    for key in ("command", "steps", "seconds", "device", "final", "heldout_psnr_db", "train_psnr_db",
                "scaling_factor", "settings"):
        assert key in log, key
    assert log["steps"] == 40 and log["device"] == "cpu" and log["final"]["step"] == 40
    assert log["command"].startswith("pdengine train-vae --data ")
    assert log["heldout_psnr_db"] == pytest.approx(evaluate_vae(out, data["held"], None)["psnr_db"], rel=1e-9)
    # No temporaries left behind.
    assert not [p for p in out.rglob(".*")]


def test_evaluate_vae_matches_a_reference_psnr(data, trained):
    out, _ = trained
    vae = AutoencoderKL.from_pretrained(out)
    frames = _reference_frames(data["images"])
    z, recon = _reference_encode(vae, frames)
    mse = ((frames.astype(np.float64) - recon.astype(np.float64)) ** 2).mean(axis=(1, 2, 3))
    expected = float(np.mean(10 * np.log10(255.0**2 / mse)))

    got = evaluate_vae(out, data["images"], None)
    assert got["frames"] == len(frames)
    assert got["psnr_db"] == pytest.approx(expected, rel=1e-6)
    scaled = z.double() * vae.config.scaling_factor
    assert got["latent_std"] == pytest.approx(scaled.std(unbiased=False).item(), rel=1e-5)
    assert got["latent_std"] == pytest.approx(1.0, rel=1e-5)  # measured on these very frames
    sub = evaluate_vae(out, data["images"], 5, seed=3)
    assert sub["frames"] == 5 and sub == evaluate_vae(out, data["images"], 5, seed=3)


class _Kill(Exception):
    """Stands in for a kill: raised from the log callback in the middle of a run."""


def test_resume_after_a_kill_continues_exactly(data, tmp_path):
    run = {**FAST, "steps": 12, "log_every": 4, "seed": 1, "schedule": "cosine"}
    straight = train_vae(data["images"], tmp_path / "a", **run)

    def kill_at_8(line: str) -> None:
        if line.startswith("step 8/"):
            raise _Kill

    with pytest.raises(_Kill):
        train_vae(data["images"], tmp_path / "b", **{**run, "save_every": 5}, log=kill_at_8)
    assert json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["step"] == 5
    assert not (tmp_path / "b" / "config.json").exists()  # no model before the run completes
    resumed = train_vae(data["images"], tmp_path / "b", **run, resume=True)

    wa = load_file(tmp_path / "a" / "diffusion_pytorch_model.safetensors")
    wb = load_file(tmp_path / "b" / "diffusion_pytorch_model.safetensors")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert resumed["history"] == straight["history"]
    assert resumed["scaling_factor"] == straight["scaling_factor"]
    # A different seed really gives different weights (the comparison above can fail).
    train_vae(data["images"], tmp_path / "c", **{**run, "seed": 2})
    wc = load_file(tmp_path / "c" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_augment_applies_a_symmetry_of_the_square():
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, size=(32, 5, 5, 3), dtype=np.uint8)
    out = _augment(batch, np.random.default_rng(1))
    seen = set()
    for before, after in zip(batch, out):
        images = [np.rot90(before, k) for k in range(4)] + [np.rot90(before[:, ::-1], k) for k in range(4)]
        matches = [i for i, img in enumerate(images) if np.array_equal(img, after)]
        assert len(matches) == 1
        seen.add(matches[0])
    assert len(seen) > 4  # really random, not one fixed transform


def test_video_table_uses_every_frame(data, tmp_path):
    frames = load_frames(data["videos"], SIZE)
    expected = np.concatenate([read_video(data["root"] / "videos" / f"{i}.mp4") for i in range(2)])
    assert np.array_equal(frames, expected)
    both = load_frames([data["held"], data["videos"]], SIZE)
    assert np.array_equal(both, np.concatenate([_reference_frames(data["held"]), expected]))
    result = train_vae([data["held"], data["videos"]], tmp_path / "v", steps=2, log_every=0, **FAST)
    assert result["frames"] == 8 + 6


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing_table", "not found"),
        ("wrong_column", "missing column"),
        ("missing_media", "not found"),
        ("size", "not divisible"),
        ("groups", "norm_num_groups"),
        ("unknown_config", "unknown AutoencoderKL argument"),
        ("lr", "lr must be"),
        ("resume_without_checkpoint", "no checkpoint"),
    ],
)
def test_bad_inputs_fail_before_training(data, tmp_path, case, message):
    table, kwargs = data["images"], dict(FAST)
    if case == "missing_table":
        table = tmp_path / "nope.csv"
    elif case == "wrong_column":
        table = _write_table(tmp_path / "t.csv", [{"file": "images/0.png"}])
    elif case == "missing_media":
        table = _write_table(tmp_path / "t.csv", [{"path": str(data["root"] / "images" / "0.png")},
                                                  {"path": "gone.png"}])
    elif case == "size":
        kwargs["size"] = 18  # the tiny VAE's factor is 4
    elif case == "groups":
        kwargs["config"] = {**TINY, "norm_num_groups": 3}
    elif case == "unknown_config":
        kwargs["config"] = {**TINY, "channels": 8}
    elif case == "lr":
        kwargs["lr"] = 0.0
    out = tmp_path / "out"
    with pytest.raises(VaeTrainError, match=message):
        train_vae(table, out, steps=2, resume=case == "resume_without_checkpoint", **kwargs)
    assert not out.exists()


def test_out_and_resume_mismatch_errors(data, tmp_path):
    out = tmp_path / "out"
    train_vae(data["images"], out, steps=2, log_every=0, **FAST)
    with pytest.raises(VaeTrainError, match="not empty"):
        train_vae(data["images"], out, steps=4, **FAST)
    with pytest.raises(VaeTrainError, match="lr"):
        train_vae(data["images"], out, steps=4, resume=True, **{**FAST, "lr": 1e-4})
    with pytest.raises(VaeTrainError, match="beyond"):
        train_vae(data["images"], out, steps=1, resume=True, **FAST)
    cosine = tmp_path / "cosine"
    train_vae(data["images"], cosine, steps=2, log_every=0, **{**FAST, "schedule": "cosine"})
    with pytest.raises(VaeTrainError, match="schedule"):
        train_vae(data["images"], cosine, steps=4, resume=True, **{**FAST, "schedule": "cosine"})


def test_cli(data, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "cli"
    args = ["--data", str(data["images"]), "--out", str(out), "--steps", "3", "--batch-size", "4",
            "--size", str(SIZE), "--config", str(config), "--log-every", "1",
            "--eval-data", str(data["held"])]
    result = CliRunner().invoke(train_vae_command, args)
    assert result.exit_code == 0, result.output
    assert "step 3/3" in result.output and "held-out PSNR" in result.output
    log = json.loads((out / TRAIN_LOG).read_text())
    assert log["steps"] == 3 and log["heldout_psnr_db"] is not None
    bad = CliRunner().invoke(train_vae_command, ["--data", str(data["images"]), "--out", str(tmp_path / "x"),
                                                 "--size", "18", "--config", str(config)])
    assert bad.exit_code != 0 and "not divisible" in bad.output
