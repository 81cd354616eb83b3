"""Evaluation metrics on constructed cases, and `pdengine eval` end to end on a tiny random model."""

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pdengine.train.evaluate import (
    AREA_JUMP,
    COLOUR_THRESHOLD,
    LOSS_TIMESTEPS,
    MIN_TRAVEL,
    PSNR_MAX_DB,
    EvalError,
    aggregate,
    background_flicker,
    colour_kept,
    demo_model_dir,
    eval_command,
    first_frame_psnr,
    follows_text,
    heldout_loss,
    largest_component,
    last_frame_error_px,
    load_heldout,
    measure_video,
    motion_accuracy,
    object_stats,
    opposite_caption,
    parse_taus,
    phase_shift,
    psnr,
    score_video,
    shape_kept,
    track_object,
)
from pdengine.train.synth import MOTIONS, ClipSpec, caption, render_clip, sample_spec, write_dataset

SIZE, FRAMES = 64, 12


def _clips(kind: str, n: int = 3):
    return [render_clip(sample_spec(np.random.default_rng([21, i]), kind), SIZE, FRAMES) for i in range(n)]


# --------------------------------------------------------------------------- building blocks


def test_psnr_matches_its_definition():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, size=a.shape), 0, 255).astype(np.uint8)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / mse), rel=1e-12)
    assert psnr(a, a) == PSNR_MAX_DB
    assert first_frame_psnr(np.stack([b, a]), a) == pytest.approx(psnr(b, a))
    with pytest.raises(EvalError):
        psnr(a, a[:8])


def test_largest_component_against_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        mask = rng.random((12, 15)) < 0.45
        got = largest_component(mask)
        # Reference: grow each component by repeated 4-neighbour dilation inside the mask.
        best = np.zeros_like(mask)
        seen = np.zeros_like(mask)
        for r, c in zip(*np.nonzero(mask)):
            if seen[r, c]:
                continue
            comp = np.zeros_like(mask)
            comp[r, c] = True
            while True:
                grown = comp.copy()
                grown[1:] |= comp[:-1]
                grown[:-1] |= comp[1:]
                grown[:, 1:] |= comp[:, :-1]
                grown[:, :-1] |= comp[:, 1:]
                grown &= mask
                if (grown == comp).all():
                    break
                comp = grown
            seen |= comp
            if comp.sum() > best.sum():
                best = comp
        np.testing.assert_array_equal(got, best)
    assert not largest_component(np.zeros((4, 4), dtype=bool)).any()


def test_track_object_finds_the_largest_blob_of_the_colour():
    frames = np.full((3, 20, 30, 3), 120, dtype=np.uint8)
    red = (220, 50, 50)
    frames[0, 4:8, 10:16] = red  # 4 x 6 block: centre (13, 6) in pixel-centre coordinates
    frames[0, 15:17, 2:4] = red  # a smaller blob of the same colour is ignored
    frames[1, 2:3, 2:4] = red  # 2 pixels: below MIN_PIXELS
    frames[2, 10:14, 20:24] = (220, 50 + int(COLOUR_THRESHOLD) + 5, 50)  # beyond the colour threshold
    stats = object_stats(frames, red)
    np.testing.assert_allclose(stats["centre"][0], [13.0, 6.0])
    assert stats["area"][0] == 24 and stats["found"].tolist() == [True, False, False]
    np.testing.assert_array_equal(stats["colour"][0], red)
    assert np.isnan(track_object(frames, red)[1:]).all()


def test_phase_shift_recovers_a_circular_shift():
    rng = np.random.default_rng(2)
    base = rng.normal(size=(48, 48))
    for _ in range(3):  # smooth the noise so the peak is not a lone pixel
        base = (base + np.roll(base, 1, 0) + np.roll(base, 1, 1) + np.roll(base, (1, 1), (0, 1))) / 4
    img = np.repeat(((base - base.min()) / np.ptp(base) * 255)[..., None], 3, -1).astype(np.uint8)
    for dx, dy in ((3, -2), (-5, 0), (0, 4)):
        moved = np.roll(img, (dy, dx), axis=(0, 1))
        got = phase_shift(img, moved)
        assert got == pytest.approx((dx, dy), abs=0.25)


def test_last_frame_error_and_penalty():
    track = np.array([[1.0, 1.0], [4.0, 5.0]])
    assert last_frame_error_px(track, (1.0, 1.0)) == pytest.approx(5.0)
    lost = np.array([[1.0, 1.0], [np.nan, np.nan]])
    assert math.isnan(last_frame_error_px(lost, (1.0, 1.0)))
    assert last_frame_error_px(lost, (1.0, 1.0), penalty=90.5) == 90.5


def test_load_heldout_reads_the_split_and_its_ground_truth(tmp_path):
    write_dataset(tmp_path / "d", videos=6, images=0, seed=1, size=32, frames=3, holdout=0.5)
    clips = load_heldout(tmp_path / "d")
    assert len(clips) == 3 and len(load_heldout(tmp_path / "d", limit=2)) == 2
    for c in clips:
        assert c["truth"]["id"] == c["id"] and c["truth"]["caption"] == c["caption"] and c["path"].is_file()
    (tmp_path / "d" / "videos" / f"{clips[0]['id']}.json").unlink()
    with pytest.raises(EvalError, match="ground truth"):
        load_heldout(tmp_path / "d")


def test_parse_taus():
    assert parse_taus(["0", "T/2", "T"], 50) == [0, 25, 50]
    assert parse_taus(["T,10", "10"], 20) == [10, 20]
    for bad in (["x"], ["51"], ["-1"]):
        with pytest.raises(EvalError):
            parse_taus(bad, 50)


# --------------------------------------------------------------------------- metrics on whole videos


@pytest.mark.parametrize("kind", MOTIONS)
def test_perfect_video_scores_perfectly(kind):
    for frames, truth in _clips(kind):
        rec = score_video(frames, truth, frames[0])
        assert rec["first_frame_psnr"] == PSNR_MAX_DB
        assert rec["follows_text"], (kind, truth["direction"])
        assert rec["last_frame_error_px"] < 0.5
        assert rec["colour_kept"] == 1.0 and rec["shape_kept"] == 1.0 and rec["object_found"] == 1.0
        if kind == "pan":
            assert math.isnan(rec["background_flicker"])
        else:
            assert rec["background_flicker"] == 0.0


@pytest.mark.parametrize("kind", ["move", "grow", "shrink", "pan"])
def test_reversed_video_fails_directional_text(kind):
    for frames, truth in _clips(kind):
        assert not follows_text(measure_video(frames[::-1].copy(), truth), truth)


def test_reversed_bounce_still_bounces():
    # "bounces" names no direction: a reversal is one either way round.
    for frames, truth in _clips("bounce"):
        assert follows_text(measure_video(frames[::-1].copy(), truth), truth)


def test_frozen_video_has_a_large_last_frame_error():
    for frames, truth in _clips("move") + _clips("pan"):
        frozen = np.repeat(frames[:1], FRAMES, axis=0)
        rec = score_video(frozen, truth, frames[0])
        travel = math.dist(truth["centre"][0], truth["centre"][-1])
        assert travel >= 0.15 * SIZE
        assert rec["last_frame_error_px"] == pytest.approx(travel, abs=0.5)
        assert not rec["follows_text"]


def test_motion_accuracy_counts_the_share_that_follows():
    (fa, ta), (fb, tb) = _clips("move", 2)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    wrong = {**tb, "direction": opposite[tb["direction"]]}
    tracks = [measure_video(fa, ta), measure_video(fb, tb)]
    assert motion_accuracy(tracks, [ta, tb]) == 1.0
    assert motion_accuracy(tracks, [ta, wrong]) == 0.5
    # Barely moving: below the MIN_TRAVEL threshold the object has not moved.
    m = measure_video(fa, ta)
    m["centre"] = np.repeat(m["centre"][:1], FRAMES, 0)
    m["centre"][-1] += 0.9 * MIN_TRAVEL * SIZE * np.array({"left": (-1, 0), "right": (1, 0), "up": (0, -1),
                                                           "down": (0, 1)}[ta["direction"]])
    assert not follows_text(m, ta)
    with pytest.raises(EvalError):
        motion_accuracy([], [])


def test_consistency_metrics_catch_colour_and_size_jumps():
    (frames, truth), = _clips("move", 1)
    m = measure_video(frames, truth)
    assert colour_kept(m, truth["rgb"]) == 1.0 and shape_kept(m, truth) == 1.0
    recoloured = frames.copy()
    k = FRAMES // 2
    blob = object_stats(frames[k:k + 1], truth["rgb"])["found"]
    assert blob.all()
    mask = np.linalg.norm(frames[k].astype(float) - truth["rgb"], axis=-1) < COLOUR_THRESHOLD
    recoloured[k][mask] = np.clip(np.asarray(truth["rgb"]) + (0, 40, 0), 0, 255)  # within threshold, off colour
    assert colour_kept(measure_video(recoloured, truth), truth["rgb"]) == pytest.approx(1 - 1 / FRAMES)
    m2 = dict(m)
    m2["area"] = m["area"].copy()
    m2["area"][k] *= 1 + 2 * AREA_JUMP  # one frame's area jumps: the pairs into and out of it fail
    assert shape_kept(m2, truth) == pytest.approx(1 - 2 / (FRAMES - 1))


def test_background_flicker_measures_background_change():
    (frames, truth), = _clips("grow", 1)
    m = measure_video(frames, truth)
    noisy = frames.astype(int)
    noisy[1::2] += 6  # every other frame brighter: each pair differs by 6 levels (no clipping here)
    assert noisy.max() <= 255  # backgrounds stay below 200 levels: no clipping
    noisy = noisy.astype(np.uint8)
    assert background_flicker(noisy, truth, m) == pytest.approx(6.0, abs=1e-9)


def test_aggregate():
    recs = [score_video(f, t, f[0]) for kind in MOTIONS for f, t in _clips(kind, 1)]
    out = aggregate(recs)
    assert out["motion_accuracy"] == 1.0 and set(out["motion_accuracy_by_kind"]) == set(MOTIONS)


def test_demo_model_dir(monkeypatch, tmp_path):
    from pdengine.engine import generate

    assert (demo_model_dir() / "model_index.json").is_file()  # shipped with the package
    monkeypatch.setattr(generate, "DEMO_DIR", tmp_path / "missing")
    with pytest.raises(EvalError, match="demo model is missing"):
        demo_model_dir()


def test_mp4_coding_keeps_the_metrics_near_perfect(tmp_path):
    from pdengine.engine.media import read_video

    out = tmp_path / "set"
    write_dataset(out, videos=10, images=0, seed=3, size=SIZE, frames=FRAMES, fps=4.0, holdout=0.1)
    recs = []
    for i in range(10):
        truth = json.loads((out / "videos" / f"clip{i:06d}.json").read_text())
        video = read_video(out / "videos" / f"clip{i:06d}.mp4")
        rendered, _ = render_clip(ClipSpec.from_dict(truth["spec"]), SIZE, FRAMES)
        recs.append(score_video(video, truth, rendered[0]))
    scores = aggregate(recs)
    # crf 18 is near-lossless: the data itself must pass every text-following and position check.
    assert scores["motion_accuracy"] == 1.0 and scores["object_found"] == 1.0
    assert max(r["last_frame_error_px"] for r in recs) < 1.5
    assert scores["first_frame_psnr"] > 30.0


# --------------------------------------------------------------------------- the command


def test_eval_command_end_to_end(tiny_pipeline_dir, tmp_path):
    data = tmp_path / "data"
    write_dataset(data, videos=4, images=0, seed=0, size=32, frames=4, fps=4.0, holdout=0.5)
    runner = CliRunner()
    out = tmp_path / "eval.json"
    args = ["--model", str(tiny_pipeline_dir), "--data", str(data), "--steps", "2", "--json", str(out),
            "--device", "cpu", "--batch-size", "2"]
    result = runner.invoke(eval_command, args)
    assert result.exit_code == 0, result.output
    assert "| run | tau |" in result.output
    res = json.loads(out.read_text())
    assert res["taus"] == [0, 1, 2] and res["headline_tau"] == 2 and res["videos"] == 2
    assert isinstance(res["first_frame_psnr"], float) and 0 < res["first_frame_psnr"] <= PSNR_MAX_DB
    assert 0.0 <= res["motion_accuracy"] <= 1.0
    assert 0.0 <= res["last_frame_error_px"] <= math.hypot(32, 32)
    assert set(res["last_frame_error_px_by_tau"]) == {"0", "1", "2"}
    assert res["reference"]["motion_accuracy"] == 1.0
    assert len(res["by_tau"]["2"]["per_video"]) == 2
    loss = res["heldout_loss"]
    assert set(loss) == {"prediction_type", "timesteps", "opposite_clips", "first_last", "first_only"}
    assert all(math.isfinite(loss[k][v]) for k in ("first_last", "first_only") for v in ("caption", "empty_prompt"))
    assert "| empty prompt |" in result.output and "Held-out denoising loss" in result.output

    no_data = runner.invoke(eval_command, ["--model", str(tiny_pipeline_dir), "--data", str(tmp_path / "none")])
    assert no_data.exit_code != 0 and "heldout.csv" in no_data.output


# --------------------------------------------------------------------------- held-out denoising loss


@pytest.mark.parametrize("kind", ["move", "pan", "grow", "shrink"])
def test_opposite_caption_flips_the_motion_and_back(kind):
    for i in range(4):
        spec = sample_spec(np.random.default_rng([5, i]), kind)
        _, truth = render_clip(spec, 32, 4)
        flipped = opposite_caption(truth)
        assert flipped is not None and flipped != caption(spec)
        words = set(flipped.split()) ^ set(caption(spec).split())  # the words that changed
        assert words in ({"left", "right"}, {"up", "down"}, {"grows", "shrinks"})
        back = json.loads(json.dumps(truth))
        back["spec"] = {**truth["spec"], "motion": {"grow": "shrink", "shrink": "grow"}.get(kind, kind),
                        "direction": {"left": "right", "right": "left", "up": "down", "down": "up"}.get(spec.direction)}
        back["motion"] = back["spec"]["motion"]
        assert opposite_caption(back) == caption(spec)


@pytest.mark.parametrize("kind", ["bounce", "still"])
def test_opposite_caption_is_none_without_a_direction(kind):
    _, truth = render_clip(sample_spec(np.random.default_rng(3), kind), 32, 4)
    assert opposite_caption(truth) is None
    assert opposite_caption({"motion": "move"}) is None  # no spec to rewrite


class _OraclePipe:
    """Stands in for PixelDancePipeline in `heldout_loss`: its UNet recovers each clip from the first-frame
    slot of c_image and returns the exact target (forward process inverted by hand) when the text is the
    clip's caption, and the target + 1 otherwise; so the loss is 0 for captions and 1 for anything else."""

    def __init__(self, z0, captions, prediction):
        from pdengine.engine.schedulers import SD_SCHEDULE, load_scheduler

        self.scheduler_config = {**SD_SCHEDULE, "prediction_type": prediction}
        self.abar = load_scheduler(self.scheduler_config, kind="ddpm").alphas_cumprod.float()
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.z0, self.captions, self.prediction = z0, list(captions), prediction
        self.vocab = sorted(set(captions) | {""} | {f"not {c}" for c in captions})
        self.calls = []

    def encode_text(self, prompts):
        return torch.stack([torch.full((3, 2), float(self.vocab.index(p))) for p in prompts])

    def unet(self, x, t, text):
        c = self.z0.shape[1]
        z_t, c_image = x[:, :c], x[:, c:]
        rows = [int(torch.argmin((self.z0[:, :, 0] - c_image[j:j + 1, :, 0]).flatten(1).abs().sum(1))) for j in range(len(x))]
        x0 = self.z0[rows]
        self.calls.append((bool(c_image[:, :, -1].abs().sum() > 0), c_image[:, :, 1:-1].abs().sum().item()))
        assert torch.equal(c_image[:, :, 0], x0[:, :, 0])
        assert torch.equal(c_image[:, :, -1], x0[:, :, -1]) or not c_image[:, :, -1].abs().sum()
        a = self.abar[t].reshape(-1, 1, 1, 1, 1)
        eps = (z_t - a.sqrt() * x0) / (1 - a).sqrt()
        target = a.sqrt() * eps - (1 - a).sqrt() * x0 if self.prediction == "v_prediction" else eps
        ok = torch.tensor([float(self.vocab[int(text[j, 0, 0])] == self.captions[r]) for j, r in enumerate(rows)])
        return target + (1 - ok).reshape(-1, 1, 1, 1, 1)


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_heldout_loss_against_an_oracle(prediction):
    z0 = torch.randn(5, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    captions = [f"clip {i}" for i in range(5)]
    opposites = [f"not clip {i}" if i % 2 else None for i in range(5)]
    pipe = _OraclePipe(z0, captions, prediction)
    res = heldout_loss(pipe, z0, captions, opposites, batch_size=2)
    assert res["prediction_type"] == prediction and res["opposite_clips"] == 2
    assert res["timesteps"] == list(LOSS_TIMESTEPS)
    for key in ("first_last", "first_only"):
        assert res[key]["caption"] == pytest.approx(0.0, abs=1e-6)
        assert res[key]["caption_on_opposite_clips"] == pytest.approx(0.0, abs=1e-6)
        assert res[key]["empty_prompt"] == pytest.approx(1.0, abs=1e-5)
        assert res[key]["opposite"] == pytest.approx(1.0, abs=1e-5)
    # the last-frame slot is filled exactly for "first_last", the slots between stay zero
    assert {last for last, _ in pipe.calls} == {True, False} and all(mid == 0 for _, mid in pipe.calls)
    assert heldout_loss(pipe, z0, captions, opposites, batch_size=5) == res
    none = heldout_loss(pipe, z0, captions, [None] * 5)
    assert none["opposite_clips"] == 0 and none["first_only"]["opposite"] is None
    with pytest.raises(EvalError, match="captions"):
        heldout_loss(pipe, z0, captions[:4], opposites)
