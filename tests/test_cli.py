"""`pdengine` CLI end to end: generate (mp4/gif/png, manifest, prompts files), convert, info, and a
clear error for every bad input, found before any model is loaded."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from pdengine.engine import pipeline as pipeline_mod
from pdengine.engine.cli import main
from pdengine.engine.media import probe_video, read_video

FAST = ["--frames", "3", "--size", "64", "--steps", "2"]


def run(*args, ok=True):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "first.png"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 80, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail loudly if a test of bad input gets as far as loading the model."""

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was reported")

    monkeypatch.setattr(pipeline_mod.PixelDancePipeline, "from_pretrained", classmethod(refuse))


def test_help_does_not_import_torch():
    code = "import sys; from pdengine.engine.cli import main; sys.argv=['pdengine','--help']\n" \
           "try:\n    main()\nexcept SystemExit:\n    pass\nassert 'torch' not in sys.modules, 'torch imported'"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "generate" in out.stdout


def test_generate_mp4_decodes_to_the_right_frames(tiny_pipeline_dir, image, tmp_path):
    out = tmp_path / "out"
    result = run("generate", "a red circle moves to the right", "--model", tiny_pipeline_dir,
                 "--first-frame", image, "--last-frame", image, "--frames", "3", "--height", "64",
                 "--width", "48", "--steps", "2", "--clips", "2", "--seed", "4", "--out", out)
    assert "resized and centre-cropped to 48x64" in result.output
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 1 and manifest[0]["seed"] == 4 and manifest[0]["clips"] == 2
    video = out / manifest[0]["file"]
    assert video.suffix == ".mp4"
    info = probe_video(video)
    assert (info["frames"], info["height"], info["width"]) == (3 + 2, 64, 48)
    assert read_video(video).shape == (5, 64, 48, 3)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_generate_prompts_file_batches_and_formats(tiny_pipeline_dir, image, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "one", "first_frame": image.name, "seed": 9}) + "\n"
                       + json.dumps({"prompt": "two"}) + "\n" + json.dumps({"prompt": "three"}) + "\n")
    out_png, out_gif = tmp_path / "png", tmp_path / "gif"
    run("generate", "--prompts", prompts, "--model", tiny_pipeline_dir, *FAST, "--batch-size", "2",
        "--seed", "100", "--format", "png", "--out", out_png)
    run("generate", "--prompts", prompts, "--model", tiny_pipeline_dir, *FAST, "--batch-size", "1",
        "--seed", "100", "--format", "gif", "--out", out_gif)
    rows = [json.loads(x) for x in (out_png / "manifest.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [9, 101, 102]
    assert rows[0]["first_frame"] == str(image)
    for r in rows:
        frames = read_video(out_png / r["file"])
        assert frames.shape == (3, 64, 64, 3)
    # Micro-batching does not change a video (same seed, same frames, up to GIF quantisation).
    gif_rows = [json.loads(x) for x in (out_gif / "manifest.jsonl").read_text().splitlines()]
    for r, g in zip(rows, gif_rows):
        a = read_video(out_png / r["file"]).astype(float)
        b = read_video(out_gif / g["file"]).astype(float)
        assert np.abs(a - b).mean() < 8


def test_tiny_random_says_it_is_noise(tmp_path):
    result = run("generate", "hello", "--model", "tiny-random", *FAST, "--compile", "--out", tmp_path / "o")
    assert "RANDOM weights" in result.output and "noise" in result.output
    assert "without --first-frame" in result.output
    # --compile concerns the static CUDA sampler: on the CPU it says so and the run goes on uncompiled.
    assert "--compile applies to the static CUDA sampler" in result.output
    row = json.loads((tmp_path / "o" / "manifest.jsonl").read_text().splitlines()[0])
    assert row["compiled"] is False


def test_generate_transformer_gemm_option_sets_the_mode_for_the_run(tiny_pipeline_dir, tmp_path, monkeypatch):
    """`--transformer-gemm` holds for the whole run (and only for it); without it the environment's setting."""
    import pdengine.engine.generate as gen
    from pdengine.kernels.fused_linear import transformer_gemm_mode

    seen = []
    monkeypatch.setattr(gen, "run_generate", lambda job, resume: seen.append(transformer_gemm_mode()) or [])
    for extra in (["--transformer-gemm", "fused"], []):
        run("generate", "a prompt", "--model", tiny_pipeline_dir, "--out", tmp_path / "o", *extra)
    assert seen == ["fused", "auto"] and transformer_gemm_mode() == "auto"
    result = run("generate", "a prompt", "--model", tiny_pipeline_dir, "--transformer-gemm", "cudnn", ok=False)
    assert result.exit_code != 0 and "cudnn" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--first-frame", "missing.png"], "missing.png"),
        (["--size", "60"], "multiple of 8"),
        (["--frames", "1"], "frames must be >= 2"),
        (["--steps", "4", "--tau", "9"], "tau"),
        (["--batch-size", "0"], "batch-size"),
        (["--clips", "0"], "clips"),
        (["--seed", "-1"], "seed"),
    ],
)
def test_generate_bad_inputs(tiny_pipeline_dir, tmp_path, no_model_load, args, message):
    result = run("generate", "a prompt", "--model", tiny_pipeline_dir, "--out", tmp_path / "o", *args, ok=False)
    assert result.exit_code != 0
    assert message in result.output


def test_generate_bad_image_and_prompts_file(tiny_pipeline_dir, tmp_path, no_model_load):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    result = run("generate", "x", "--model", tiny_pipeline_dir, "--first-frame", bad, "--out", tmp_path / "o",
                 ok=False)
    assert result.exit_code != 0 and "bad.png" in result.output
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "ok"}\n{"prompt": "broken"\n')
    result = run("generate", "--prompts", prompts, "--model", tiny_pipeline_dir, "--out", tmp_path / "o", ok=False)
    assert result.exit_code != 0 and "p.jsonl:2" in result.output
    result = run("generate", "--model", tiny_pipeline_dir, "--out", tmp_path / "o", ok=False)
    assert result.exit_code != 0 and "no prompts" in result.output


def test_generate_unwritable_out(tiny_pipeline_dir, tmp_path, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("generate", "x", "--model", tiny_pipeline_dir, "--out", blocker / "sub", ok=False)
    assert result.exit_code != 0 and "not writable" in result.output


def test_generate_names_the_broken_model_part(tiny_pipeline_dir, tmp_path, no_model_load):
    import shutil

    broken = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, broken)
    shutil.rmtree(broken / "vae")
    result = run("generate", "x", "--model", broken, "--out", tmp_path / "o", ok=False)
    assert result.exit_code != 0 and "missing part 'vae/'" in result.output
    shutil.copytree(tiny_pipeline_dir / "vae", broken / "vae")
    (broken / "model_index.json").write_text("{oops")
    result = run("generate", "x", "--model", broken, "--out", tmp_path / "o", ok=False)
    assert "model_index.json is not valid JSON" in result.output
    result = run("generate", "x", "--model", tmp_path / "nowhere", "--out", tmp_path / "o", ok=False)
    assert "does not exist" in result.output


def test_convert_cli(tiny_modelscope_dir, tiny_pipeline_dir, tmp_path):
    out = tmp_path / "converted"
    run("convert", "--from", "modelscope", tiny_modelscope_dir, "--out", out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "PixelDancePipeline"
    assert json.loads((out / "unet" / "config.json").read_text())["in_channels"] == 8
    result = run("convert", "--from", "modelscope", tiny_modelscope_dir, "--out", out, ok=False)
    assert "not empty" in result.output
    result = run("convert", "--from", "modelscope", tiny_pipeline_dir, "--out", tmp_path / "x", ok=False)
    assert "--from pixeldance" in result.output
    run("convert", "--from", "pixeldance", tiny_pipeline_dir, "--out", tmp_path / "again")


def test_info_cli():
    import torch

    result = run("info")
    assert torch.__version__ in result.output and "pixeldance" in result.output
    data = json.loads(run("info", "--json").output)
    assert data["presets"]["pixeldance"] > 1_400_000_000


def test_t2i_model_makes_the_first_frame(tiny_pipeline_dir, tmp_path, monkeypatch):
    """Without --first-frame, --t2i-model (a Stable Diffusion folder) draws the first frame from the prompt
    with the video's seed; the image handed to the pipeline equals diffusers' own output for that seed."""
    import torch
    from diffusers import StableDiffusionPipeline

    from pdengine.engine.tiny import write_tiny_sd_pipeline

    sd_dir = write_tiny_sd_pipeline(tmp_path / "sd", seed=1)
    seen = []
    original = pipeline_mod.PixelDancePipeline.generate

    def spy(self, prompts, firsts, lasts, seeds, settings, clips=1, on_step=None):
        seen.append(firsts)
        return original(self, prompts, firsts, lasts, seeds, settings, clips, on_step)

    monkeypatch.setattr(pipeline_mod.PixelDancePipeline, "generate", spy)
    result = run("generate", "a blue square", "--model", tiny_pipeline_dir, "--t2i-model", sd_dir, *FAST,
                 "--seed", "3", "--out", tmp_path / "o")
    assert "without --first-frame" not in result.output
    sd = StableDiffusionPipeline.from_pretrained(sd_dir, safety_checker=None, requires_safety_checker=False)
    sd.set_progress_bar_config(disable=True)
    expected = sd("a blue square", height=64, width=64, generator=torch.Generator().manual_seed(3),
                  output_type="pt").images[0] * 2 - 1
    torch.testing.assert_close(seen[0][0], expected, rtol=1e-5, atol=1e-5)
    result = run("generate", "x", "--model", tiny_pipeline_dir, "--t2i-model", tmp_path, "--out", tmp_path / "o",
                 ok=False)
    assert "not a diffusers model folder" in result.output


def _png_videos(out):
    rows = [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    return {r["index"]: read_video(out / r["file"]) for r in rows}, rows


def _crash_on_batch(monkeypatch, n: int):
    """Make the pipeline's n-th batch raise; returns the real `generate` (to put back)."""
    original = pipeline_mod.PixelDancePipeline.generate
    calls = []

    def crashing(self, *a, **k):
        calls.append(1)
        if len(calls) == n:
            raise RuntimeError("simulated crash")
        return original(self, *a, **k)

    monkeypatch.setattr(pipeline_mod.PixelDancePipeline, "generate", crashing)
    return original


def test_resume_after_a_crash_gives_the_same_videos(tiny_pipeline_dir, tmp_path, monkeypatch):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    args = ["generate", "--prompts", prompts, "--model", tiny_pipeline_dir, *FAST, "--format", "png", "--seed", "5"]
    run(*args, "--out", tmp_path / "straight")
    original = _crash_on_batch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*args, "--out", tmp_path / "resumed")
    monkeypatch.setattr(pipeline_mod.PixelDancePipeline, "generate", original)
    assert len((tmp_path / "resumed" / "manifest.jsonl").read_text().splitlines()) == 1  # batch 1 survived
    result = run(*args, "--out", tmp_path / "resumed", ok=False)
    assert result.exit_code != 0 and "--resume" in result.output
    result = run(*args, "--out", tmp_path / "resumed", "--resume")
    assert "1 video(s) already done" in result.output
    a, rows_a = _png_videos(tmp_path / "straight")
    b, rows_b = _png_videos(tmp_path / "resumed")
    assert sorted(a) == sorted(b) == [0, 1, 2]
    for i in a:
        assert np.array_equal(a[i], b[i]), i
    assert [r["seed"] for r in rows_b] == [5, 6, 7]
    other = tmp_path / "q.txt"
    other.write_text("different\ntwo\nthree\n")
    result = run("generate", "--prompts", other, "--model", tiny_pipeline_dir, *FAST, "--format", "png",
                 "--seed", "5", "--out", tmp_path / "resumed", "--resume", ok=False)
    assert "different prompt or seed" in result.output


def test_overlapped_writes_keep_order_and_flush_before_a_crash(tiny_pipeline_dir, tmp_path, monkeypatch):
    """With writes overlapping the next batch's sampling (the GPU default), videos and manifest lines come
    out as without, in order; when sampling batch k+1 fails, batch k (still being written) is flushed first."""
    import threading
    import time

    from pdengine.engine import generate as generate_mod
    from pdengine.engine import media as media_mod

    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    args = ["generate", "--prompts", prompts, "--model", tiny_pipeline_dir, *FAST, "--format", "png", "--seed", "5"]
    run(*args, "--out", tmp_path / "plain")
    monkeypatch.setattr(generate_mod, "overlap_writes", lambda device: True)
    threads = []
    real_write = media_mod.write_video

    def slow_write(*a, **k):
        threads.append(threading.current_thread().name)
        time.sleep(0.2)  # still writing when the next batch starts
        return real_write(*a, **k)

    monkeypatch.setattr(media_mod, "write_video", slow_write)  # generate imports it from media when it runs
    run(*args, "--out", tmp_path / "overlap")
    a, rows_a = _png_videos(tmp_path / "plain")
    b, rows_b = _png_videos(tmp_path / "overlap")
    assert [r["index"] for r in rows_b] == [0, 1, 2] and sorted(a) == sorted(b)
    for i in a:
        assert np.array_equal(a[i], b[i]), i
    assert threads and all(name.startswith("pdengine-writer") for name in threads)
    _crash_on_batch(monkeypatch, 3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(*args, "--out", tmp_path / "crashed")
    rows = [json.loads(x) for x in (tmp_path / "crashed" / "manifest.jsonl").read_text().splitlines()]
    assert [r["index"] for r in rows] == [0, 1]  # batch 2 was in flight when batch 3 failed: written
    assert all((tmp_path / "crashed" / r["file"]).is_dir() for r in rows)


def test_torchrun_two_processes_write_the_same_videos(tiny_pipeline_dir, tmp_path):
    """`torchrun --nproc-per-node 2 pdengine generate` (gloo on CPU) shards the prompts by rank and
    merges one manifest; each video equals the single-process one."""
    import os
    import shutil

    prompts = tmp_path / "p.txt"
    prompts.write_text("alpha\nbeta\ngamma\n")
    common = ["generate", "--prompts", str(prompts), "--model", str(tiny_pipeline_dir), *FAST, "--format", "png",
              "--seed", "1"]
    run(*common, "--out", tmp_path / "single")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         shutil.which("pdengine"), *common, "--out", str(tmp_path / "multi")],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, _ = _png_videos(tmp_path / "single")
    b, rows = _png_videos(tmp_path / "multi")
    assert sorted(b) == [0, 1, 2] and sorted(r["rank"] for r in rows) == [0, 0, 1]
    assert not list((tmp_path / "multi").glob("manifest.rank*"))
    for i in a:
        # Same seed, same model: equal up to float summation order (the processes run with 1 CPU thread,
        # this one with several), i.e. at most one uint8 level on a few pixels.
        diff = np.abs(a[i].astype(int) - b[i].astype(int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (i, diff.max(), (diff > 0).mean())


def test_batch_size_auto_on_cpu_and_bad_value(tiny_pipeline_dir, tmp_path):
    result = run("generate", "x", "y", "--model", tiny_pipeline_dir, *FAST, "--batch-size", "auto",
                 "--out", tmp_path / "o")
    assert "--batch-size auto: no GPU memory to size against on the CPU; using 1" in result.output
    assert len((tmp_path / "o" / "manifest.jsonl").read_text().splitlines()) == 2
    result = run("generate", "x", "--model", tiny_pipeline_dir, "--batch-size", "many", "--out", tmp_path / "p",
                 ok=False)
    assert result.exit_code != 0 and "--batch-size must be an integer or 'auto'" in result.output


def test_review_fixes_eta_convert_and_home_paths(tiny_pipeline_dir, tiny_modelscope_dir, tmp_path, monkeypatch,
                                                   no_model_load):
    import shutil

    import torch
    from safetensors import safe_open

    result = run("generate", "x", "--model", tiny_pipeline_dir, "--eta", "1.5", "--out", tmp_path / "o", ok=False)
    assert result.exit_code != 0 and "eta must be in [0, 1]" in result.output
    # --model with ~ is expanded before it is checked.
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_pipeline_dir, tmp_path / "m")
    from pdengine.engine.generate import GenerateJob, validate_job
    from pdengine.engine.pipeline import SampleSettings
    from pdengine.engine.prompts import PromptSpec

    job = GenerateJob([PromptSpec("x")], "~/m", tmp_path / "o", SampleSettings(height=64, width=64))
    validate_job(job)
    assert job.model == str(tmp_path / "m")
    # convert never writes over (or inside) its source.
    result = run("convert", "--from", "pixeldance", tmp_path / "m", "--out", tmp_path, "--overwrite", ok=False)
    assert result.exit_code != 0 and "outside the source folder" in result.output and (tmp_path / "m").is_dir()
    # convert keeps the checkpoint's dtype.
    from diffusers import UNet3DConditionModel

    half = tmp_path / "half"
    shutil.copytree(tiny_modelscope_dir, half)
    UNet3DConditionModel.from_pretrained(half / "unet").to(torch.float16).save_pretrained(half / "unet")
    run("convert", "--from", "modelscope", half, "--out", tmp_path / "half-pd")
    with safe_open(str(tmp_path / "half-pd" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as fh:
        assert fh.get_tensor("conv_in.weight").dtype == torch.float16


def test_sample_defaults_come_from_the_model_folder(tiny_pipeline_dir, tmp_path, monkeypatch):
    import json
    import shutil

    from pdengine.engine import generate

    assert generate.sample_defaults(str(tiny_pipeline_dir)) == {"frames": 16, "size": 256, "guidance": 7.5}
    folder = tmp_path / "m"
    shutil.copytree(tiny_pipeline_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    given = {"frames": 3, "size": 32, "guidance": 2.5}
    (folder / "model_index.json").write_text(json.dumps({**index, "_sample_defaults": given}))
    assert generate.sample_defaults(str(folder)) == given
    result = run("generate", "a red circle", "--model", folder, "--steps", "2", "--format", "png",
                 "--out", tmp_path / "o")
    record = json.loads((tmp_path / "o" / "manifest.jsonl").read_text().splitlines()[0])
    frames = sorted((tmp_path / "o" / record["file"]).glob("*.png"))
    assert len(frames) == 3  # the folder's frame count, at its size
    from PIL import Image

    assert Image.open(frames[0]).size == (32, 32)
    assert record["guidance"] == 2.5  # and its guidance
    assert "RANDOM" in result.output  # the tiny folder says its weights are random
    run("generate", "a red circle", "--model", folder, "--steps", "1", "--frames", "2", "--size", "16",
        "--guidance", "4", "--format", "png", "--out", tmp_path / "o3")
    assert json.loads((tmp_path / "o3" / "manifest.jsonl").read_text().splitlines()[0])["guidance"] == 4.0

    monkeypatch.setattr(generate, "DEMO_DIR", tmp_path / "not-installed")
    missing = run("generate", "x", "--out", tmp_path / "o2", ok=False)
    assert missing.exit_code != 0 and "demo model is missing" in missing.output


def test_a_gpu_is_always_named_with_its_index(monkeypatch):
    """`torch.cuda.set_device` and CUDA graphs need an indexed device: with no --device (or plain "cuda") the
    sampler runs on the current GPU by index, LOCAL_RANK's under torchrun; an explicit index is kept."""
    import torch

    from pdengine.engine.generate import GenerateError, _pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert _pick_device(None) == "cuda:1" and _pick_device("cuda") == "cuda:1"
    assert _pick_device(None, local_rank=3, world=4) == "cuda:3" and _pick_device("cuda", 2, 4) == "cuda:2"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a launcher showing each rank its one GPU
    assert _pick_device(None, local_rank=3, world=4) == "cuda:0"
    assert _pick_device("cuda:0", 3, 4) == "cuda:0" and _pick_device("cpu") == "cpu"
    from pdengine.engine.generate import _torch_dtype

    for capability, dtype in (((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16), ((7, 5), torch.float16)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        assert _torch_dtype(None, "cuda:0") == dtype  # bf16 only where the GPU computes it natively
    assert _torch_dtype(None, "cpu") == torch.float32 and _torch_dtype("bf16", "cpu") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _pick_device(None) == "cpu"
    with pytest.raises(GenerateError, match="CUDA is not available"):
        _pick_device("cuda")
