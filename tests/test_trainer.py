"""`pdengine train` on the CPU: options checked before any data loads, end-to-end runs from a latent cache
and from raw videos/images, exact resumption (also after a crash mid-checkpoint), NaN stop, gradient
accumulation, activation-checkpointing policies, EMA, and 2 processes (gloo) against one."""

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from pdengine.engine.media import write_video
from pdengine.engine.pipeline import PixelDancePipeline
from pdengine.model import UNet3D
from pdengine.train import checkpoint as ckpt_mod
from pdengine.train import data as data_mod
from pdengine.train import init as init_mod
from pdengine.train import latent_cache as cache_mod
from pdengine.train import trainer
from pdengine.train.checkpoint import latest_checkpoint, list_checkpoints, load_trainer_state
from pdengine.train.cli import cache_latents_command, train_command
from pdengine.train.config import ConfigError, TrainConfig
from pdengine.train.latent_cache import cache_latents
from pdengine.train.recipe import training_inputs
from pdengine.train.trainer import (
    EMA,
    NonFiniteLossError,
    TrainError,
    apply_activation_checkpointing,
    read_uncond,
    train,
    write_uncond,
)
from tests.kernel_utils import assert_close

N_ITEMS = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from intra-op threads, and OpenMP threads stall for seconds when the small
    test machine is shared with other processes: one thread keeps these tests fast and steady."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class _FakeEncoders:
    """Stands in for the VAE/text encoder when building a cache: latents (4, h/2, w/2) and text (77, 32)
    that depend only on the input, so the cache is reproducible."""

    scaling_factor = 0.18215

    def encode_images(self, images):
        pooled = F.avg_pool2d(images, 2)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1) * 2

    def encode_text(self, captions):
        return torch.stack([torch.randn(77, 32, generator=torch.Generator().manual_seed(len(c) * 7919 + ord(c[-1])))
                            for c in captions])


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """A latent cache of N_ITEMS random clips: latents (C=4, F=3, 8x8), text (L=77, D=32), plus uncond."""
    gen = torch.Generator().manual_seed(0)
    items = [{"video": torch.rand(3, 3, 16, 16, generator=gen) * 2 - 1, "caption": f"clip {i}", "index": i}
             for i in range(N_ITEMS)]
    out = cache_latents(items, _FakeEncoders(), tmp_path_factory.mktemp("cache") / "c", shard_size=3,
                        batch_size=2, progress=False)
    write_uncond(out, torch.randn(77, 32, generator=gen))
    return out


def _cfg(model, cache, out, **overrides):
    base = dict(model=str(model) if model else None, latent_cache=str(cache) if cache else None, out=str(out), steps=3, batch_size=2, num_workers=0,
                save_every=1, keep=5, device="cpu", tensorboard=False, log_every=1)
    base.update(overrides)
    return TrainConfig(**base)


def _rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _weights(folder):
    return UNet3D.from_pretrained(folder).state_dict()


def _assert_same_weights(a, b, name, scale=1.0, exact=False):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), f"{name}: {k} differs"
        else:
            assert_close(a[k], b[k], name=f"{name}: {k}", scale=scale)


def _assert_adam_weights_match(a, b, lr, steps, name):
    """Weights after `steps` Adam steps from the same start, with gradients equal up to rounding. Adam divides
    by sqrt(v) + 1e-8, so a parameter whose gradient is ~1e-8 may move by up to lr on a rounding difference;
    everything else must agree closely (a wrong gradient or optimizer state moves almost every weight by ~lr)."""
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in b])
    assert diff.max() <= 2 * lr * steps, name
    assert (diff > 1e-6).float().mean() < 1e-3, f"{name}: {int((diff > 1e-6).sum())} of {diff.numel()} weights differ"


class _Killed(BaseException):
    """A simulated kill (SIGKILL-like: nothing in the trainer may catch it)."""


def _loss_patch(monkeypatch, action_at_call):
    """Wrap the trainer's loss; `action_at_call(n, loss)` may raise or alter the n-th call's loss (1-based)."""
    real = trainer.micro_batch_loss
    calls = {"n": 0}

    def patched(*args, **kwargs):
        calls["n"] += 1
        return action_at_call(calls["n"], real(*args, **kwargs))

    monkeypatch.setattr(trainer, "micro_batch_loss", patched)


@pytest.fixture(scope="module")
def straight(tiny_pipeline_dir, cache_dir, tmp_path_factory):
    """The uninterrupted reference run: 3 steps, a checkpoint every step, EMA on."""
    out = tmp_path_factory.mktemp("straight") / "run"
    summary = train(_cfg(tiny_pipeline_dir, cache_dir, out, ema=0.9))
    return out, summary


# ------------------------------------------------------------------------------------------ end to end


def test_end_to_end_from_a_latent_cache(straight, tiny_pipeline_dir):
    out, summary = straight
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert np.isfinite(r["loss"]) and r["loss"] > 0 and r["lr"] == 1e-5 and r["samples"] == 2
        assert r["samples_per_s"] > 0 and r["skipped_video"] == 0 and r["skipped_image"] == 0
    assert summary["losses"] == [r["loss"] for r in rows] and summary["samples_seen"] == 6
    pipe = PixelDancePipeline.from_pretrained(out / "final")
    _assert_same_weights(pipe.unet.state_dict(), _weights(out / "checkpoints" / "step-000003" / "unet"), "final")
    state, tensors = load_trainer_state(latest_checkpoint(out))
    assert state["step"] == 3 and state["video"]["consumed"] == 6 and state["epoch"] == 0
    assert state["video"]["sampler"]["position"] == 6 and state["lr_schedule"]["last_lr"] == 1e-5
    assert state["config"]["ema"] == 0.9 and len(state["losses"]) == 3
    assert set(tensors) == {"optimizer", "optimizer_format", "recipe_generator", "rng"}
    init = _weights(tiny_pipeline_dir / "unet")
    assert not torch.equal(init["conv_in.weight"], pipe.unet.conv_in.weight)  # it trained


def test_ema_weights_follow_the_update_formula(straight, tiny_pipeline_dir):
    out, _ = straight
    decay = 0.9
    expected = _weights(tiny_pipeline_dir / "unet")
    for step in (1, 2, 3):
        w = _weights(out / "checkpoints" / f"step-{step:06d}" / "unet")
        expected = {k: decay * expected[k] + (1 - decay) * w[k] for k in w}
        _assert_same_weights(_weights(out / "checkpoints" / f"step-{step:06d}" / "ema"), expected, f"ema@{step}")
    _assert_same_weights(_weights(out / "final" / "ema"), expected, "final ema")


def _ema_against_the_formula(model: torch.nn.Module, ema: EMA, steps: int = 3) -> None:
    """Change the weights in place `steps` times, as an optimizer does (after `before_weights_change`), and
    compare the average with the formula computed from copies of the weights."""
    decay = ema.decay
    expected = {k: v.detach().double().cpu().clone() for k, v in model.state_dict().items()}
    for step in range(steps):
        ema.before_weights_change()
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.5).add_(0.25 * (step + 1))
        ema.update(model)
        expected = {k: decay * expected[k] + (1 - decay) * v.detach().double().cpu()
                    for k, v in model.state_dict().items()}
    for k, v in ema.state_dict().items():
        assert_close(v.double().cpu(), expected[k], name=f"ema {k}")


@pytest.mark.parametrize("asynchronous", [False, True], ids=["in-place", "background-thread"])
def test_ema_class_update(asynchronous):
    """The average follows ema <- d * ema + (1 - d) * w, also when a background thread averages copies of the
    weights (as with --ema-device cpu and GPU weights)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.75, torch.device("cpu"), asynchronous=asynchronous)
    try:
        _ema_against_the_formula(model, ema)
    finally:
        ema.close()
    with pytest.raises(ValueError, match="decay"):
        EMA(model, 1.0, torch.device("cpu"))


def test_a_failed_background_average_is_raised():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, 0.75, torch.device("cpu"), asynchronous=True)
    ema.update(model)
    ema.wait()
    ema.shadow["weight"] = torch.zeros(5)  # no longer the weight's shape: the next average fails
    ema.update(model)
    with pytest.raises(RuntimeError):
        ema.wait()
    ema.close()


@pytest.mark.gpu
def test_ema_in_host_memory_of_gpu_weights(gpu):
    """--ema-device cpu with the weights on a GPU: copies on a side stream into pinned buffers, averaged by a
    background thread while the GPU goes on; the optimizer's in-place update waits for the copy."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.LayerNorm(64)).to(gpu)
    ema = EMA(model, 0.9, torch.device("cpu"))
    assert ema.asynchronous
    try:
        _ema_against_the_formula(model, ema, steps=4)
    finally:
        ema.close()


def test_resume_after_a_kill_continues_exactly(straight, tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    ref_out, ref = straight
    out = tmp_path / "run"

    def kill_at_step_3(n, loss):
        if n == 3:
            raise _Killed()
        return loss

    _loss_patch(monkeypatch, kill_at_step_3)
    with pytest.raises(_Killed):
        train(_cfg(tiny_pipeline_dir, cache_dir, out, ema=0.9, save_every=2))
    monkeypatch.undo()
    # Step 2 ran and was checkpointed; pretend the kill came after step 3's metrics row.
    (out / "metrics.jsonl").open("a").write(json.dumps({"step": 3, "loss": -1.0}) + "\n")
    assert latest_checkpoint(out).name == "step-000002"
    summary = train(_cfg(tiny_pipeline_dir, cache_dir, out, ema=0.9, save_every=2, resume=True))
    assert summary["start_step"] == 2
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the lost step 3 row was replaced, not duplicated
    np.testing.assert_allclose([r["loss"] for r in rows], ref["losses"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(summary["losses"], ref["losses"], rtol=0, atol=1e-6)
    # On the CPU a resumed run is bit-for-bit the uninterrupted one (optimizer state included).
    _assert_same_weights(_weights(out / "final" / "unet"), _weights(ref_out / "final" / "unet"), "resumed", exact=True)
    _assert_same_weights(_weights(out / "final" / "ema"), _weights(ref_out / "final" / "ema"), "resumed ema",
                         exact=True)


def test_resume_after_a_crash_during_a_checkpoint_write(straight, tiny_pipeline_dir, cache_dir, tmp_path,
                                                        monkeypatch):
    ref_out, ref = straight
    out = tmp_path / "run"
    real_save = torch.save
    calls = {"n": 0}

    def save_then_crash(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # step 2's trainer_state.pt: the model folder is already written
            raise OSError("simulated crash: disk gone")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save_then_crash)
    with pytest.raises(OSError, match="simulated crash"):
        train(_cfg(tiny_pipeline_dir, cache_dir, out, keep=2))
    monkeypatch.undo()
    root = out / "checkpoints"
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert (root / "latest").read_text().strip() == "step-000001"
    # What a SIGKILL at that moment would have left instead: a temp folder and, from a careless copy, a
    # step folder without its state. Neither may be taken for a checkpoint.
    (root / ".tmp-step-000002-killed" / "unet").mkdir(parents=True)
    (root / "step-000002" / "unet").mkdir(parents=True)
    (root / "step-000002" / "trainer_state.json").write_text("{}")
    summary = train(_cfg(tiny_pipeline_dir, cache_dir, out, keep=2, resume=True))
    assert summary["start_step"] == 1
    np.testing.assert_allclose(summary["losses"], ref["losses"], rtol=0, atol=1e-6)
    _assert_same_weights(_weights(out / "final" / "unet"), _weights(ref_out / "final" / "unet"), "resumed", exact=True)
    # keep=2: only the last two remain, leftovers cleaned, the pointer on the newest.
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step-000002", "step-000003"]
    assert (root / "latest").read_text().strip() == "step-000003"


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    _loss_patch(monkeypatch, lambda n, loss: loss * float("nan") if n == 2 else loss)
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss is nan .*loss scale.*step-000001"):
        train(_cfg(tiny_pipeline_dir, cache_dir, out, steps=2))
    assert [s for s, _ in list_checkpoints(out)] == [1]
    assert not (out / "final").exists()
    state, _ = load_trainer_state(out / "checkpoints" / "step-000001")
    assert state["step"] == 1
    PixelDancePipeline.from_pretrained(out / "checkpoints" / "step-000001")


def _per_sample_loss(unet, z0, text, uncond, abar, recipe, gen, *, per_rank, rank=0, world_size=1):
    """The recipe with each sample's draws seeded by its own content: independent of how samples are
    grouped into micro-batches, so accumulation can be compared with one big batch."""
    parts = []
    for i in range(z0.shape[0]):
        g = torch.Generator().manual_seed(int(z0[i].abs().sum().item() * 1000))
        parts.append(training_inputs(z0[i:i + 1], text[i:i + 1], uncond, abar, recipe, g))
    pred = unet(torch.cat([p.unet_input for p in parts]), torch.cat([p.timesteps for p in parts]),
                torch.cat([p.context for p in parts]))
    return F.mse_loss(pred.float(), torch.cat([p.target for p in parts]).float())


def test_gradient_accumulation_matches_one_big_batch(tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "micro_batch_loss", _per_sample_loss)
    common = dict(steps=2, save_every=0, dropout=0.0, max_grad_norm=0.0, lr=1e-3)
    big = train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "big", batch_size=2, grad_accum=1, **common))
    acc = train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "acc", batch_size=1, grad_accum=2, **common))
    np.testing.assert_allclose(acc["losses"], big["losses"], rtol=1e-5)
    # The gradient norm checks the 1/grad_accum scaling (Adam's update alone would hide a wrong scale).
    np.testing.assert_allclose([r["grad_norm"] for r in _rows(tmp_path / "acc")],
                               [r["grad_norm"] for r in _rows(tmp_path / "big")], rtol=1e-5)
    _assert_adam_weights_match(_weights(tmp_path / "acc" / "final" / "unet"),
                               _weights(tmp_path / "big" / "final" / "unet"), common["lr"], common["steps"], "accum")


def test_compiled_unet_trains_like_the_eager_one(tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    """--compile wires torch.compile around what the forward calls: the same losses as without (dropout off;
    the aot_eager backend traces forward and backward like Inductor but runs them eagerly: no C++ build on
    the CPU). The kernels' operators under compile are checked in test_unet3d_backends."""
    import torch._dynamo

    monkeypatch.setattr(trainer, "COMPILE_BACKEND", "aot_eager")
    common = dict(steps=2, save_every=0, dropout=0.0, backend="torch")
    plain = train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "plain", **common))
    torch._dynamo.reset()
    compiled = train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "compiled", compile=True, **common))
    torch._dynamo.reset()
    np.testing.assert_allclose(compiled["losses"], plain["losses"], rtol=1e-4)
    _assert_same_weights(_weights(tmp_path / "compiled" / "final" / "unet"),
                         _weights(tmp_path / "plain" / "final" / "unet"), "compiled vs eager", scale=3.0)


@pytest.mark.parametrize("source", ["sd", "modelscope", "preset+components", "preset"])
def test_every_init_source_trains_to_a_model_folder(source, cache_dir, tiny_pipeline_dir, tiny_modelscope_dir,
                                                    tmp_path):
    from pdengine.engine.tiny import write_tiny_sd_pipeline

    init = {"sd": dict(init_from_sd=str(write_tiny_sd_pipeline(tmp_path / "sd"))),
            "modelscope": dict(init_from_modelscope=str(tiny_modelscope_dir)),
            "preset+components": dict(preset="tiny", components=str(tiny_pipeline_dir)),
            "preset": dict(preset="tiny")}[source]
    out = tmp_path / "run"
    summary = train(_cfg(None, cache_dir, out, steps=1, save_every=0, **init))
    assert np.isfinite(summary["loss"])
    if source == "preset":  # nothing to take a VAE / text encoder from: the unet and the schedule only
        assert sorted(p.name for p in (out / "final").iterdir()) == ["model_index.json", "scheduler", "unet"]
        UNet3D.from_pretrained(out / "final" / "unet")
    else:
        assert PixelDancePipeline.from_pretrained(out / "final").unet.config["in_channels"] == 8


@pytest.mark.parametrize("policy", ["attention", "full"])
def test_activation_checkpointing_same_loss_and_grads_less_saved(policy):
    torch.manual_seed(0)
    base = UNet3D.from_preset("tiny", cross_attention_dim=32).train()  # dropout on: its RNG must replay
    wrapped = copy.deepcopy(base)
    assert apply_activation_checkpointing(wrapped, policy) > 0
    gen = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 8, 3, 8, 8, generator=gen), torch.randn(2, 7, 32, generator=gen)
    t, target = torch.tensor([3, 700]), torch.randn(2, 4, 3, 8, 8, generator=gen)

    def run(model):
        saved = []
        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(lambda s: saved.append(s.numel()) or s, lambda s: s):
            loss = F.mse_loss(model(x, t, ctx), target)
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters()}, sum(saved)

    loss_a, grads_a, saved_a = run(base)
    loss_b, grads_b, saved_b = run(wrapped)
    assert_close(loss_b, loss_a, name="loss")
    for n in grads_a:
        assert_close(grads_b[n], grads_a[n], name=f"grad {n}")
    assert saved_b < saved_a * (0.8 if policy == "attention" else 0.5)
    assert base.state_dict().keys() == wrapped.state_dict().keys()
    with pytest.raises(ValueError, match="already checkpointed"):
        apply_activation_checkpointing(wrapped, policy)


# ------------------------------------------------------------------------------------------ raw data


@pytest.fixture(scope="module")
def raw_data(tmp_path_factory):
    """4 short mp4 videos (+ one missing file) and 2 images, with CSV tables."""
    from PIL import Image

    root = tmp_path_factory.mktemp("raw")
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i in range(4):
        write_video(rng.integers(0, 255, (8, 64, 64, 3), dtype=np.uint8), root / f"v{i}.mp4", "mp4", 8)
        rows.append(f"v{i}.mp4,video {i}")
    rows.append("gone.mp4,a missing video")
    (root / "videos.csv").write_text("\n".join(rows) + "\n")
    rows = ["path,caption"]
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(root / f"i{i}.png")
        rows.append(f"i{i}.png,image {i}")
    (root / "images.csv").write_text("\n".join(rows) + "\n")
    return root


def test_end_to_end_from_raw_videos_and_images(tiny_pipeline_dir, raw_data, tmp_path):
    out = tmp_path / "run"
    summary = train(TrainConfig(model=str(tiny_pipeline_dir), data=str(raw_data / "videos.csv"),
                                images=str(raw_data / "images.csv"), image_every=2, out=str(out), steps=2,
                                batch_size=2, resolution=64, frames=3, fps=4.0, num_workers=0, save_every=0,
                                device="cpu", tensorboard=False, checkpointing="full"))
    rows = _rows(out)
    assert [r["image_step"] for r in rows] == [False, True]
    assert all(np.isfinite(r["loss"]) for r in rows)
    # 5 table rows, one missing: which batch holds it depends on the shuffle; it is counted when drawn.
    assert summary["skipped"]["video"] == rows[-1]["skipped_video"]
    assert summary["skipped"]["video"] == sum(summary["skipped"]["reasons"]["video"].values())
    PixelDancePipeline.from_pretrained(out / "final")
    assert not (out / "checkpoints").exists()  # save_every 0: final weights only


def test_unreadable_or_empty_data_is_a_clear_error(tiny_pipeline_dir, raw_data, tmp_path):
    (raw_data / "none.csv").write_text("path,caption\ngone1.mp4,a\ngone2.mp4,b\n")
    cfg = TrainConfig(model=str(tiny_pipeline_dir), data=str(raw_data / "none.csv"), out=str(tmp_path / "o"), steps=2,
                      resolution=64, frames=3, num_workers=0, device="cpu", tensorboard=False)
    with pytest.raises(TrainError, match=r"video data: none of 2 items in a row could be read .*missing"):
        train(cfg)
    (raw_data / "empty.csv").write_text("path,caption\n")
    with pytest.raises(TrainError, match="no rows"):
        train(dataclasses.replace(cfg, data=str(raw_data / "empty.csv")))
    (raw_data / "cols.csv").write_text("file,text\nv0.mp4,a\n")
    with pytest.raises(TrainError, match="missing column"):
        train(dataclasses.replace(cfg, data=str(raw_data / "cols.csv")))


def test_cache_latents_command_then_train(tiny_pipeline_dir, raw_data, tmp_path):
    cache = tmp_path / "cache"
    result = CliRunner().invoke(cache_latents_command, [
        "--model", str(tiny_pipeline_dir), "--data", str(raw_data / "videos.csv"), "--out", str(cache),
        "--resolution", "64", "--frames", "3", "--batch-size", "2", "--device", "cpu"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "cached 4 item(s)" in result.output
    index = cache_mod.read_index(cache)
    assert index["latent_shape"] == [4, 3, 8, 8] and index["text_shape"] == [77, 32]
    pipe = PixelDancePipeline.from_pretrained(tiny_pipeline_dir)
    assert_close(read_uncond(cache), pipe.encode_text([""])[0], name="uncond")
    result = CliRunner().invoke(train_command, [
        "--model", str(tiny_pipeline_dir), "--latent-cache", str(cache), "--out", str(tmp_path / "run"), "--steps", "1",
        "--batch-size", "2", "--num-workers", "0", "--device", "cpu", "--no-tensorboard"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "trained to step 1" in result.output and "skipped 0 video(s)" in result.output
    assert (tmp_path / "run" / "checkpoints" / "step-000001").is_dir()  # the last step is always checkpointed
    # Without the stored empty-prompt embedding, a cache-only run (no text encoder) cannot do the text drop.
    (cache / trainer.UNCOND_NAME).unlink()
    with pytest.raises(TrainError, match="uncond.safetensors"):
        train(_cfg(None, cache, tmp_path / "run2", preset="tiny", steps=1))


# ------------------------------------------------------------------------------------------ options


@pytest.fixture
def no_data_loading(monkeypatch):
    """Fail loudly if a bad option is reported only after data (or the model) started loading."""

    def refuse(*a, **k):
        raise AssertionError("data or model loading started before the bad option was reported")

    for obj, name in ((data_mod.VideoTextDataset, "__init__"), (data_mod.ImageTextDataset, "__init__"),
                      (cache_mod.LatentCacheDataset, "__init__")):
        monkeypatch.setattr(obj, name, refuse)
    monkeypatch.setattr(init_mod, "init_unet", refuse)


BAD_OPTIONS = [
    (dict(model=None), "exactly one model"),
    (dict(preset="tiny"), "exactly one model"),
    (dict(model=None, preset="huge"), "unknown preset"),
    (dict(model="/nonexistent/model"), "--model /nonexistent/model: no such folder"),
    (dict(data="x.csv"), "exactly one of --data"),
    (dict(latent_cache=None), "exactly one of --data"),
    (dict(latent_cache=None, data="/nonexistent.csv"), "--data /nonexistent.csv: no such file"),
    (dict(images="/nonexistent.csv"), "--images /nonexistent.csv: no such file"),
    (dict(steps=0), "--steps must be >= 1"),
    (dict(batch_size=0), "--batch-size must be >= 1"),
    (dict(grad_accum=0), "--grad-accum must be >= 1"),
    (dict(lr=0.0), "--lr must be > 0"),
    (dict(warmup_steps=-1), "--warmup-steps must be >= 0"),
    (dict(resolution=60), "--resolution must be a positive multiple of 8"),
    (dict(frames=1), "--frames must be >= 2"),
    (dict(fps=0.0), "--fps must be > 0"),
    (dict(eta=1.5), r"--eta must be in \[0, 1\]"),
    (dict(text_drop=-0.1), r"--text-drop must be in \[0, 1\]"),
    (dict(cond_timestep=1000), "--cond-timestep must be below the schedule's 1000"),
    (dict(perturb="all"), "--perturb must be one of"),
    (dict(image_every=-1), "--image-every must be >= 0"),
    (dict(checkpointing="some"), "--checkpointing must be one of none, attention, full"),
    (dict(optimizer="sgd"), "--optimizer must be one of"),
    (dict(optimizer="adamw8bit"), "adamw8bit"),
    (dict(dtype="fp16"), "--dtype must be one of"),
    (dict(dtype="fp32", pure_bf16=True), "--pure-bf16"),
    (dict(ema=1.0), r"--ema \(the decay\) must be in \(0, 1\)"),
    (dict(ema_device="tpu"), "--ema-device must be one of"),
    (dict(dropout=1.0), r"--dropout must be in \[0, 1\)"),
    (dict(max_grad_norm=-1.0), "--max-grad-norm must be >= 0"),
    (dict(save_every=-1), "--save-every must be >= 0"),
    (dict(keep=0), "--keep must be >= 1"),
    (dict(num_workers=-1), "--num-workers must be >= 0"),
    (dict(log_every=0), "--log-every must be >= 1"),
    (dict(seed=-1), "--seed must be >= 0"),
    (dict(device="tpu"), "--device"),
    (dict(fsdp=True), "--fsdp"),
    (dict(backend="cuda"), "--backend must be one of"),
    (dict(steps="10"), "--steps: expected int"),
    (dict(resume="yes"), "--resume: expected bool"),
    (dict(caption_column=" "), "--caption-column must not be empty"),
    (dict(out=None), "--out DIR is required"),
    (dict(resume=True), "--resume: no complete checkpoint"),
]


@pytest.mark.parametrize("overrides,message", BAD_OPTIONS, ids=[m for _, m in BAD_OPTIONS])
def test_every_bad_option_is_reported_before_data_loading(overrides, message, tiny_pipeline_dir, cache_dir,
                                                          tmp_path, no_data_loading):
    if overrides.get("optimizer") == "adamw8bit" and torch.cuda.is_available():
        pytest.skip("the 8-bit optimizer may well work here")
    cfg = dataclasses.replace(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "out"), **overrides)
    with pytest.raises(ConfigError, match=message):
        train(cfg)


def test_data_and_out_combinations(tiny_pipeline_dir, cache_dir, raw_data, straight, tmp_path, no_data_loading):
    # Raw data with a preset: no VAE / text encoder anywhere.
    cfg = _cfg(None, None, tmp_path / "o", preset="tiny", data=str(raw_data / "videos.csv"))
    with pytest.raises(ConfigError, match="--components"):
        train(cfg)
    with pytest.raises(ConfigError, match="--image-every is 0"):
        train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "o", images=str(raw_data / "images.csv"), image_every=0))
    with pytest.raises(ConfigError, match="must hold images"):
        train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "o", images=str(cache_dir)))
    with pytest.raises(ConfigError, match="no index.json"):
        train(_cfg(tiny_pipeline_dir, tmp_path, tmp_path / "o"))
    with pytest.raises(ConfigError, match="already holds checkpoints .*--resume"):
        train(_cfg(tiny_pipeline_dir, cache_dir, straight[0]))


def test_toml_config_unknown_keys_and_cli_override(tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    toml = tmp_path / "train.toml"
    toml.write_text(f'model = "{tiny_pipeline_dir}"\nlatent-cache = "{cache_dir}"\nout = "{tmp_path / "o"}"\n'
                    'steps = 7\nbatch_size = 3\nlr = 1\nema = 0.99\n')
    cfg = TrainConfig.from_toml(toml, steps=9)
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.ema) == (9, 3, 1, 0.99)
    cfg.validate()
    bad = tmp_path / "bad.toml"
    bad.write_text('model = "x"\nbatch_sise = 2\n')
    with pytest.raises(ConfigError, match="unknown key 'batch_sise'"):
        TrainConfig.from_toml(bad)
    (tmp_path / "broken.toml").write_text("steps = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        TrainConfig.from_toml(tmp_path / "broken.toml")

    seen = {}

    def fake_train(config):
        seen["cfg"] = config
        raise TrainError("stop here")

    monkeypatch.setattr(trainer, "train", fake_train)
    result = CliRunner().invoke(train_command, ["--config", str(toml), "--batch-size", "5", "--lr", "0.5"])
    assert result.exit_code != 0 and "stop here" in result.output
    cfg = seen["cfg"]
    assert (cfg.steps, cfg.batch_size, cfg.lr, cfg.ema, cfg.seed) == (7, 5, 0.5, 0.99, 0)  # flags beat the file
    result = CliRunner().invoke(train_command, ["--config", str(bad)])
    assert result.exit_code != 0 and "unknown key 'batch_sise'" in result.output
    monkeypatch.undo()
    result = CliRunner().invoke(train_command, ["--preset", "tiny", "--latent-cache", str(cache_dir), "--steps", "0",
                                                "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "--steps must be >= 1" in result.output


def test_cli_module_does_not_import_torch():
    code = ("import sys\nfrom pdengine.train.cli import train_command, cache_latents_command\n"
            "for cmd in (train_command, cache_latents_command):\n"
            "    try:\n        cmd(['--help'])\n    except SystemExit:\n        pass\n"
            "assert 'torch' not in sys.modules, 'torch imported'")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "--grad-accum" in out.stdout and "--shard-size" in out.stdout and "[default: 0.25]" in out.stdout


# ------------------------------------------------------------------------------------------ two processes


def _free_ports(n: int) -> list[int]:
    """n distinct ports that are free now and below the kernel's ephemeral range: the runs use them one after
    another, and a port taken from the ephemeral range (bind to port 0) could meanwhile become the local end of
    one of gloo's connections in an earlier run (EADDRINUSE, seen in CI)."""
    import random

    try:
        low = int(open("/proc/sys/net/ipv4/ip_local_port_range").read().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng, ports = random.Random(), []
    while len(ports) < n:
        port = rng.randrange(10000, max(10001, low - 1))
        if port in ports:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


def _ddp_worker(rank: int, world: int, ports: list[int], config: dict, fsdp_config: dict, nan_config: dict) -> None:
    """Rank `rank` of several runs in one process (imports and warm-up paid once): DDP; FSDP2 for 2 steps,
    then resumed to 3 (its sharded optimizer state goes through a checkpoint); then a DDP run where rank 1
    alone sees a NaN loss at step 2."""
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    os.environ["MASTER_PORT"] = str(ports[0])
    train(TrainConfig(**config))
    os.environ["MASTER_PORT"] = str(ports[1])
    train(TrainConfig(**{**fsdp_config, "steps": 2}))
    os.environ["MASTER_PORT"] = str(ports[2])
    train(TrainConfig(**{**fsdp_config, "resume": True}))

    real = trainer.micro_batch_loss
    calls = {"n": 0}

    def nan_on_rank_1(*a, **k):
        calls["n"] += 1
        loss = real(*a, **k)
        return loss * float("nan") if rank == 1 and calls["n"] == 2 else loss

    trainer.micro_batch_loss = nan_on_rank_1
    os.environ["MASTER_PORT"] = str(ports[3])
    try:
        train(TrainConfig(**nan_config))
    except NonFiniteLossError as e:  # every rank must stop, not only the one that saw the NaN
        (ckpt_mod.Path(nan_config["out"]) / f"stopped-{rank}").write_text(str(e))


@pytest.mark.slow  # about 30 s: two spawned processes, four runs
def test_two_processes_match_one(tiny_pipeline_dir, cache_dir, tmp_path):
    common = dict(steps=3, save_every=2, dropout=0.0, lr=1e-3)
    one = train(_cfg(tiny_pipeline_dir, cache_dir, tmp_path / "one", batch_size=2, ema=0.5, **common))
    cfg = _cfg(tiny_pipeline_dir, cache_dir, tmp_path / "two", batch_size=1, **common).to_dict()
    # FSDP with EMA: each rank averages its own shards (in a background thread with --ema-device cpu), the
    # checkpoint gathers them and the resumed run shards them again.
    fsdp_cfg = _cfg(tiny_pipeline_dir, cache_dir, tmp_path / "fsdp", batch_size=1, fsdp=True, checkpointing="full",
                    ema=0.5, ema_device="cpu", **common).to_dict()
    nan_cfg = _cfg(tiny_pipeline_dir, cache_dir, tmp_path / "nan", batch_size=1, **common).to_dict()
    (tmp_path / "nan").mkdir()
    ports = _free_ports(4)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, ports, cfg, fsdp_cfg, nan_cfg), nprocs=2)
    for run in ("two", "fsdp"):
        rows = _rows(tmp_path / run)
        np.testing.assert_allclose([r["loss"] for r in rows], one["losses"], rtol=1e-5, err_msg=run)
        assert [r["samples"] for r in rows] == [2, 2, 2]
        _assert_adam_weights_match(_weights(tmp_path / run / "final" / "unet"),
                                   _weights(tmp_path / "one" / "final" / "unet"), common["lr"], common["steps"], run)
    # The average of weights that each moved by at most lr per step moved by at most that much too.
    _assert_adam_weights_match(_weights(tmp_path / "fsdp" / "final" / "ema"), _weights(tmp_path / "one" / "final" / "ema"),
                               common["lr"], common["steps"], "fsdp ema")
    state, tensors = load_trainer_state(latest_checkpoint(tmp_path / "two"))
    assert state["world_size"] == 2 and len(tensors["rng"]) == 2
    # A NaN seen by one rank stops both (the loss is all-reduced before the check).
    for rank in (0, 1):
        assert "step 2: loss is nan" in (tmp_path / "nan" / f"stopped-{rank}").read_text()
    assert [s for s, _ in list_checkpoints(tmp_path / "nan")] == []


def test_prediction_type_follows_the_model_folders_scheduler(tiny_pipeline_dir, cache_dir, tmp_path, monkeypatch):
    """A folder whose scheduler predicts v trains on the v target (and its checkpoints keep saying so)."""
    import shutil

    folder = tmp_path / "v-model"
    shutil.copytree(tiny_pipeline_dir, folder)
    sched_path = folder / "scheduler" / "scheduler_config.json"
    sched = json.loads(sched_path.read_text())
    sched_path.write_text(json.dumps({**sched, "prediction_type": "v_prediction"}))
    seen = []
    real = trainer.micro_batch_loss

    def recording(*args, **kwargs):
        seen.append(args[5].prediction_type)  # the RecipeConfig
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "micro_batch_loss", recording)
    out = tmp_path / "run"
    train(_cfg(folder, cache_dir, out, steps=1))
    assert seen == ["v_prediction"]
    saved = json.loads((out / "final" / "scheduler" / "scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"


def test_the_training_gpu_is_named_with_its_index(monkeypatch):
    """--device cuda (or none, with a GPU) is this process's GPU by index (`torch.cuda.set_device` and NCCL's
    device_id need one): LOCAL_RANK's under torchrun, else the current device."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 2)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert TrainConfig(device="cuda").resolved_device() == torch.device("cuda", 2)
    assert TrainConfig(device="cuda:1").resolved_device() == torch.device("cuda", 1)
    assert TrainConfig().resolved_device() == torch.device("cuda", 0)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert TrainConfig(device="cuda").resolved_device() == torch.device("cuda", 3)
    assert TrainConfig().resolved_device() == torch.device("cuda", 3)
    with pytest.raises(ConfigError, match="only 4 CUDA device"):
        TrainConfig(device="cuda:4").resolved_device()


@pytest.mark.gpu
def test_training_on_the_gpu(gpu, tiny_pipeline_dir, cache_dir, tmp_path):
    """`pdengine train` on a CUDA device named without an index: bf16 autocast, the kernels' backward passes,
    fused AdamW, EMA, checkpointing; finite losses, GPU memory in the metrics, a model folder at the end."""
    out = tmp_path / "gpu"
    summary = train(_cfg(tiny_pipeline_dir, cache_dir, out, device="cuda", steps=2, save_every=2, ema=0.9))
    rows = _rows(out)
    assert [r["step"] for r in rows] == [1, 2] and all(np.isfinite(r["loss"]) for r in rows)
    assert all(r["torch_max_allocated_gb"] > 0 for r in rows)
    assert summary["losses"] == [r["loss"] for r in rows] and (out / "final" / "unet").is_dir()


def test_pure_bf16_trains_with_stochastic_rounding(tiny_pipeline_dir, cache_dir, tmp_path):
    """--pure-bf16: bf16 weights and moments, AdamW with stochastic rounding (train/optim.py: rounded to nearest
    almost every update at fine-tuning rates would be lost), finite losses, a bf16 model folder that moved."""
    out = tmp_path / "bf16"
    summary = train(_cfg(tiny_pipeline_dir, cache_dir, out, steps=2, pure_bf16=True, save_every=2))
    assert all(np.isfinite(loss) for loss in summary["losses"])
    state, _ = load_trainer_state(latest_checkpoint(out))
    assert state["config"]["pure_bf16"] is True
    from safetensors.torch import load_file

    (weights_file,) = (out / "final" / "unet").glob("*.safetensors")
    assert {t.dtype for t in load_file(weights_file).values()} == {torch.bfloat16}
    final = UNet3D.from_pretrained(out / "final" / "unet")
    init = UNet3D.from_pretrained(tiny_pipeline_dir / "unet")
    assert not torch.equal(final.conv_in.weight.float(), init.conv_in.weight.float())
