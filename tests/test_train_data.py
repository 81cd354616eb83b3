"""Training data layer: tables, video/image datasets, skip counting, resumable sampler, latent cache."""

from __future__ import annotations

import json
import pickle
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from torch.utils.data import DataLoader

from pdengine.engine.media import load_image, read_video, write_video
from pdengine.train import data as data_module
from pdengine.train.data import (
    DatasetError,
    ImageTextDataset,
    ResumableSampler,
    VideoTextDataset,
    collate_skip_none,
    read_table,
)
from pdengine.train.latent_cache import LatentCacheDataset, cache_latents

H, W = 32, 48
STEP = 12  # colour levels between consecutive frame indices


# ---------------------------------------------------------------------------------------------
# Synthetic media
# ---------------------------------------------------------------------------------------------


def index_frames(n: int) -> np.ndarray:
    """uint8 (n, H, W, 3): frame k is flat, its index in (R, G) = 16 + STEP * (k % 16, k // 16), with
    a small gradient in B so resizing has something to do."""
    k = np.arange(n)
    frames = np.zeros((n, H, W, 3), np.uint8)
    frames[..., 0] = (16 + STEP * (k % 16))[:, None, None]
    frames[..., 1] = (16 + STEP * (k // 16))[:, None, None]
    frames[..., 2] = (np.arange(W) * 4)[None, None, :]
    return frames


def frame_index(frames: np.ndarray) -> np.ndarray:
    """Recover the source index of uint8 (F, h, w, 3) frames made by `index_frames`."""
    r = np.rint((frames[..., 0].mean(axis=(1, 2)) - 16) / STEP).astype(int)
    g = np.rint((frames[..., 1].mean(axis=(1, 2)) - 16) / STEP).astype(int)
    return r + 16 * g


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """Dataset clip (3, F, H, W) in [-1, 1] -> uint8 (F, H, W, 3) (exact for values made from uint8)."""
    return torch.round((video + 1) * 127.5).to(torch.uint8).permute(1, 2, 3, 0).numpy()


def write_av(frames: np.ndarray, path: Path, fps: int, fmt: str, codec: str, **options: str) -> None:
    """Encode with PyAV directly: containers and encoder settings that `write_video` does not make."""
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for i, frame in enumerate(frames):
            vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
            vf.pts, vf.time_base = i, Fraction(1, fps)
            container.mux(stream.encode(vf))
        container.mux(stream.encode(None))


@pytest.fixture(scope="module")
def media(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("media")
    write_video(index_frames(40), root / "v8.mp4", "mp4", 8)  # 4.875 s
    write_video(index_frames(100), root / "clips" / "v24.mp4", "mp4", 24)  # 4.125 s, in a subfolder
    write_video(index_frames(10), root / "short.mp4", "mp4", 8)  # 1.125 s: too short for 3.75 s clips
    write_video(index_frames(30), root / "v6.gif", "gif", 6)  # GIF delays 17/100 s
    write_video(index_frames(20), root / "v2.mp4", "mp4", 2)  # slow source: frames repeat at 4 fps
    # A keyframe every 5 frames and B-frames: clips need a real seek.
    write_av(index_frames(100), root / "gop.mp4", 24, "mp4", "libx264", g="5", keyint_min="5", bf="2", crf="18")
    write_av(index_frames(40), root / "v8.mkv", 8, "matroska", "libx264", crf="18")
    write_av(index_frames(40), root / "v8.webm", 8, "webm", "libvpx-vp9", crf="20", b="0")
    write_av(index_frames(40), root / "v8.avi", 8, "avi", "libx264", crf="18")  # AVI stores no pts
    (root / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(4096))
    return root


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "path,caption") -> Path:
    lines = [header] + [f"{p},{c}" for p, c in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def reference_clip(path: Path, start: int, stride: int, frames: int) -> np.ndarray:
    """Full decode with media.read_video, then every stride-th frame from `start`."""
    return read_video(path)[start : start + stride * frames : stride]


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------


def test_read_table_csv_and_jsonl(tmp_path):
    csv_file = tmp_path / "d.csv"
    csv_file.write_text('\ufeffvideo,text,extra\na.mp4,"a cat, running",1\nb.mp4,,2\n')
    assert read_table(csv_file, ["video", "text"]) == [
        {"video": "a.mp4", "text": "a cat, running"}, {"video": "b.mp4", "text": ""}]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"video": "a.mp4", "text": "x", "n": 3}\n\n{"video": "b.mp4", "text": "y"}\n')
    assert read_table(jsonl, ["video", "text"]) == [{"video": "a.mp4", "text": "x"}, {"video": "b.mp4", "text": "y"}]


@pytest.mark.parametrize(
    ("name", "content", "columns", "message"),
    [
        ("empty.csv", "", ["path"], "empty file"),
        ("nocol.csv", "file,caption\na.mp4,x\n", ["path", "caption"], "missing column(s) ['path']"),
        ("header.csv", "path,caption\n", ["path", "caption"], "no rows"),
        ("blank.csv", "path,caption\na.mp4,x\n ,y\n", ["path", "caption"], "blank.csv:3: column 'path' is empty"),
        ("short.csv", "path,caption\na.mp4\n", ["path", "caption"], "short.csv:2: row has fewer fields"),
        ("empty.jsonl", "\n", ["path"], "no rows"),
        ("bad.jsonl", '{"path": "a.mp4"}\n{"path": \n', ["path"], "bad.jsonl:2: invalid JSON"),
        ("list.jsonl", '["a.mp4"]\n', ["path"], "list.jsonl:1: expected a JSON object"),
        ("key.jsonl", '{"path": "a.mp4"}\n{"file": "b.mp4"}\n', ["path"], "key.jsonl:2: missing key(s) ['path']"),
        ("num.jsonl", '{"path": 3}\n', ["path"], "num.jsonl:1: column 'path' must hold text"),
        ("data.tsv", "path\ta\n", ["path"], "unknown table type '.tsv'"),
    ],
)
def test_read_table_errors(tmp_path, name, content, columns, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DatasetError) as info:
        read_table(path, columns, nonempty=["path"] if "path" in columns else ())
    assert message in str(info.value) and name in str(info.value)


def test_read_table_missing_file_and_parquet(tmp_path):
    with pytest.raises(DatasetError, match="data file not found"):
        read_table(tmp_path / "nope.csv", ["path"])
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "d.parquet").write_bytes(b"PAR1")
        with pytest.raises(DatasetError, match="pyarrow"):
            read_table(tmp_path / "d.parquet", ["path"])
        return
    pq.write_table(pa.table({"path": ["a.png"], "caption": ["x"]}), tmp_path / "d.parquet")
    assert read_table(tmp_path / "d.parquet", ["path", "caption"]) == [{"path": "a.png", "caption": "x"}]


def test_dataset_construction_errors(tmp_path):
    data = write_csv(tmp_path / "d.csv", [("a.mp4", "x"), ("b.txt", "y")])
    with pytest.raises(DatasetError, match=r"d\.csv:3: 'b\.txt' has an unknown video extension"):
        VideoTextDataset(data)
    data = write_csv(tmp_path / "i.csv", [("a.png", "x"), ("b.mp4", "y")])
    with pytest.raises(DatasetError, match=r"i\.csv:3: 'b\.mp4' has an unknown image extension"):
        ImageTextDataset(data)
    good = write_csv(tmp_path / "g.csv", [("a.mp4", "x")])
    with pytest.raises(DatasetError, match="missing column"):
        VideoTextDataset(good, caption_column="text")
    for kwargs in ({"frames": 0}, {"fps": 0.0}, {"resolution": (32,)}, {"resolution": -8},
                   {"min_frames": 17}):
        with pytest.raises(DatasetError):
            VideoTextDataset(good, **kwargs)


# ---------------------------------------------------------------------------------------------
# Video clips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "src_frames", "stride"), [
    ("v8.mp4", 40, 2), ("clips/v24.mp4", 100, 6), ("gop.mp4", 100, 6),
    ("v8.mkv", 40, 2), ("v8.webm", 40, 2), ("v8.avi", 40, 2),
])
def test_video_clips_resample_by_timestamp(media, tmp_path, name, src_frames, stride):
    """At 4 fps, clips take every 2nd frame of an 8 fps source and every 6th of a 24 fps one; each
    clip equals the same frames of a full decode (the seek path included: gop.mp4 has keyframes every
    5 frames and B-frames)."""
    data = write_csv(tmp_path / "d.csv", [(str(media / name), "a clip")])  # absolute path in the table
    ds = VideoTextDataset(data, resolution=(H, W), frames=16, fps=4.0)
    full = read_video(media / name)
    starts = set()
    for epoch in range(6):
        ds.set_epoch(epoch, seed=1)
        item = ds[0]
        assert item["caption"] == "a clip" and item["index"] == 0
        video = item["video"]
        assert video.dtype == torch.float32 and video.shape == (3, 16, H, W)
        assert video.min() >= -1 and video.max() <= 1
        clip = to_uint8(video)
        idx = frame_index(clip)
        start = int(idx[0])
        np.testing.assert_array_equal(idx, start + stride * np.arange(16))
        assert 0 <= start <= src_frames - 1 - stride * 15  # the whole clip lies inside the source
        np.testing.assert_array_equal(clip, full[start : start + stride * 16 : stride])
        starts.add(start)
    assert len(starts) > 1  # the start is random across epochs


@pytest.mark.parametrize("path", ["no_timestamps", "seek_overshoot"])
def test_fallback_decoding_paths(media, tmp_path, monkeypatch, path):
    """Without packet timestamps (decode all, time by frame) or after a seek that lands past t0
    (decode from the start), clips equal those of the seeking path."""
    data = write_csv(tmp_path / "d.csv", [(str(media / "gop.mp4"), "x")])
    ds = VideoTextDataset(data, resolution=(H, W), frames=16, fps=4.0)
    expected = [ds[(0, e)]["video"] for e in range(3)]
    calls = []
    if path == "no_timestamps":
        monkeypatch.setattr(data_module, "_packet_pts", lambda container, stream: None)
    else:
        real = data_module._decode_pts

        def overshoot(container, stream, need, seek):
            calls.append(seek)
            return None if seek else real(container, stream, need, seek)

        monkeypatch.setattr(data_module, "_decode_pts", overshoot)
    for e in range(3):
        torch.testing.assert_close(ds[(0, e)]["video"], expected[e], rtol=0, atol=0)
    assert calls == ([] if path == "no_timestamps" else [True, False] * 3)


def test_gif_and_jsonl_custom_columns(media, tmp_path):
    """GIF frames last 17/100 s: clip frame k is the source frame nearest to t0 + k / 4 s."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"file": str(media / "v6.gif"), "text": "gif"}) + "\n")
    ds = VideoTextDataset(data, resolution=(H, W), frames=8, fps=4.0, video_column="file", caption_column="text")
    times = np.arange(30) * 0.17
    for epoch in range(3):
        ds.set_epoch(epoch, seed=0)
        item = ds[0]
        idx = frame_index(to_uint8(item["video"]))
        targets = times[idx[0]] + np.arange(8) / 4.0
        expected = [int(np.argmin(np.abs(times - t))) for t in targets]
        np.testing.assert_array_equal(idx, expected)
        assert item["caption"] == "gif"


def test_frames_resized_like_load_image(media, tmp_path):
    """resolution 16 on 32x48 frames: cover to 16x24 then centre crop, exactly as load_image does."""
    data = write_csv(tmp_path / "d.csv", [(str(media / "v8.mp4"), "x")])
    small = VideoTextDataset(data, resolution=16, frames=4, fps=4.0)
    full = VideoTextDataset(data, resolution=(H, W), frames=4, fps=4.0)
    video = small[0]["video"]
    assert video.shape == (3, 4, 16, 16)
    source = to_uint8(full[0]["video"])  # same seed and epoch -> same clip
    for k in range(4):
        png = tmp_path / f"{k}.png"
        Image.fromarray(source[k]).save(png)
        torch.testing.assert_close(video[:, k], load_image(png, 16, 16), rtol=0, atol=0)


def test_determinism_and_epoch_keys(media, tmp_path):
    data = write_csv(tmp_path / "d.csv", [(str(media / "v8.mp4"), "x"), (str(media / "clips/v24.mp4"), "y")])
    a = VideoTextDataset(data, resolution=(H, W), frames=16)
    b = VideoTextDataset(data, resolution=(H, W), frames=16)
    a.set_epoch(3, seed=7)
    b.set_epoch(3, seed=7)
    for i in range(2):
        torch.testing.assert_close(a[i]["video"], b[i]["video"], rtol=0, atol=0)
    # An (index, epoch) key gives the clip of that epoch whatever the dataset's own epoch.
    c = VideoTextDataset(data, resolution=(H, W), frames=16, seed=7)
    torch.testing.assert_close(c[(1, 3)]["video"], a[1]["video"], rtol=0, atol=0)
    # The same clip through an explicit generator.
    torch.testing.assert_close(c.sample(1, a.generator(1))["video"], a[1]["video"], rtol=0, atol=0)
    starts = {int(frame_index(to_uint8(c[(0, e)]["video"]))[0]) for e in range(8)}
    assert len(starts) > 1
    with pytest.raises(IndexError):
        c[2]


def test_skips_counted_and_collated(media, tmp_path):
    rows = [(str(media / "v8.mp4"), "good"), (str(media / "bad.mp4"), "corrupt"),
            (str(media / "short.mp4"), "short"), (str(media / "missing.mp4"), "missing"),
            (str(media / "clips/v24.mp4"), "good too")]
    ds = VideoTextDataset(write_csv(tmp_path / "d.csv", rows), resolution=(H, W), frames=16, fps=4.0)
    loader = DataLoader(ds, batch_size=5, num_workers=0, collate_fn=collate_skip_none)
    (batch,) = list(loader)
    assert batch["video"].shape == (2, 3, 16, H, W)
    assert batch["caption"] == ["good", "good too"]
    assert batch["index"].tolist() == [0, 4]
    assert batch["skipped"] == 3
    assert ds.skipped == {"corrupt": 1, "too_short": 1, "missing": 1}
    assert collate_skip_none([None, None]) is None
    # With an epoch-keyed ResumableSampler: full batches, skipped ones still counted.
    sampler = ResumableSampler(len(ds), seed=0, with_epoch=True)
    loader = DataLoader(ds, batch_size=5, sampler=sampler, num_workers=0, collate_fn=collate_skip_none)
    batch = next(iter(loader))
    assert batch["video"].shape[0] + batch["skipped"] == 5
    assert sorted(batch["index"].tolist()) == [0, 4]


def test_too_short_boundary_and_min_frames(media, tmp_path):
    data = write_csv(tmp_path / "d.csv", [(str(media / "short.mp4"), "x"), (str(media / "v2.mp4"), "y")])
    # short.mp4: 10 frames at 8 fps span 9/8 s; 5 frames at 4 fps need exactly 1 s, 6 need 1.25 s.
    assert VideoTextDataset(data, resolution=(H, W), frames=5, fps=4.0)[0] is not None
    ds = VideoTextDataset(data, resolution=(H, W), frames=6, fps=4.0)
    assert ds[0] is None and ds.skipped == {"too_short": 1}
    # v2.mp4 (2 fps) sampled at 4 fps: 8 frames hold 4 distinct source frames, each twice.
    ds = VideoTextDataset(data, resolution=(H, W), frames=8, fps=4.0)
    idx = frame_index(to_uint8(ds[1]["video"]))
    np.testing.assert_array_equal(idx, idx[0] + np.arange(8) // 2)
    strict = VideoTextDataset(data, resolution=(H, W), frames=8, fps=4.0, min_frames=5)
    assert strict[1] is None and strict.skipped == {"too_few_frames": 1}
    assert VideoTextDataset(data, resolution=(H, W), frames=8, fps=4.0, min_frames=4)[1] is not None


def test_image_dataset(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)).save(tmp_path / "img" / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8)).save(tmp_path / "img" / "b.jpg")
    (tmp_path / "img" / "bad.png").write_bytes(b"not a png")
    data = write_csv(tmp_path / "d.csv", [("img/a.png", "a"), ("img/bad.png", "bad"), ("img/b.jpg", "b"),
                                          ("img/gone.png", "gone")], header="image,text")
    ds = ImageTextDataset(data, resolution=(16, 24), image_column="image", caption_column="text")
    batch = collate_skip_none([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (2, 3, 16, 24) and batch["caption"] == ["a", "b"]
    torch.testing.assert_close(batch["image"][0], load_image(tmp_path / "img" / "a.png", 16, 24), rtol=0, atol=0)
    torch.testing.assert_close(batch["image"][1], load_image(tmp_path / "img" / "b.jpg", 16, 24), rtol=0, atol=0)
    assert batch["skipped"] == 2 and ds.skipped == {"corrupt": 1, "missing": 1}


# ---------------------------------------------------------------------------------------------
# Resumable sampler
# ---------------------------------------------------------------------------------------------


def take(it, k: int) -> list:
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("k", [0, 3, 7, 10, 23])
def test_sampler_resume_equals_uninterrupted(k):
    reference = take(iter(ResumableSampler(7, seed=5)), 40)
    first = ResumableSampler(7, seed=5)
    it = iter(first)
    consumed = take(it, k)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    assert state == first.state_at(k)
    resumed = ResumableSampler(7, seed=5)
    resumed.load_state_dict(state)
    assert consumed + take(iter(resumed), 40 - k) == reference


def test_sampler_epochs_are_permutations_and_ranks_disjoint():
    n, world = 11, 3
    per_rank = [take(iter(ResumableSampler(n, seed=2, rank=r, world_size=world)), 2 * (n // world))
                for r in range(world)]
    for epoch in range(2):
        shards = [set(s[epoch * 3 : epoch * 3 + 3]) for s in per_rank]
        assert all(len(s) == 3 for s in shards)
        assert not (shards[0] & shards[1] or shards[0] & shards[2] or shards[1] & shards[2])
        perm = np.random.default_rng([2, epoch]).permutation(n)
        assert set().union(*shards) == set(perm[: world * 3].tolist())
    single = take(iter(ResumableSampler(n, seed=2)), 2 * n)
    assert sorted(single[:n]) == list(range(n)) and sorted(single[n:]) == list(range(n))
    assert single[:n] != single[n:]  # a fresh permutation each epoch
    keyed = take(iter(ResumableSampler(n, seed=2, with_epoch=True)), n + 1)
    assert [i for i, _ in keyed] == single[: n + 1] and keyed[-1][1] == 1 and keyed[0][1] == 0


def test_sampler_rejects_foreign_state():
    s = ResumableSampler(10, seed=0, rank=1, world_size=2)
    for bad in ({**s.state_dict(), "n": 11}, {**s.state_dict(), "seed": 1}, {**s.state_dict(), "rank": 0},
                {**s.state_dict(), "position": 6}):
        with pytest.raises(ValueError):
            s.load_state_dict(bad)
    with pytest.raises(ValueError):
        ResumableSampler(2, seed=0, rank=0, world_size=3)
    with pytest.raises(ValueError):
        ResumableSampler(4, seed=0, rank=2, world_size=2)


# ---------------------------------------------------------------------------------------------
# Latent cache
# ---------------------------------------------------------------------------------------------


class FakePipeline:
    """Deterministic stand-in: latents = 8x8 average pool plus a channel mean; text from characters."""

    scaling_factor = 0.5

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        pooled = F.avg_pool2d(images, 8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1) * self.scaling_factor

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        codes = torch.zeros(len(prompts), 5, 3)
        for i, p in enumerate(prompts):
            for j, ch in enumerate(p[:5]):
                codes[i, j] = torch.tensor([ord(ch), j, len(p)], dtype=torch.float32) / 100
        return codes


def fake_reference(item: dict) -> torch.Tensor:
    """Per-item reference latents (C, F, h, w) computed frame by frame."""
    video = item["video"] if "video" in item else item["image"].unsqueeze(1)
    frames = [FakePipeline().encode_images(video[:, k : k + 1].permute(1, 0, 2, 3))[0] for k in range(video.shape[1])]
    return torch.stack(frames, dim=1)


@pytest.fixture(scope="module")
def cache_table(media, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cache-table")
    rows = [(str(media / "v8.mp4"), "one"), (str(media / "bad.mp4"), "bad"), (str(media / "gop.mp4"), "two"),
            (str(media / "clips/v24.mp4"), "three"), (str(media / "missing.mp4"), "gone"),
            (str(media / "v8.mp4"), "four"), (str(media / "gop.mp4"), "five")]
    return write_csv(root / "d.csv", rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_round_trip_fake_pipeline(cache_table, tmp_path, dtype):
    ds = VideoTextDataset(cache_table, resolution=(H, W), frames=4, fps=4.0)
    ds.set_epoch(2, seed=3)
    out = cache_latents(ds, FakePipeline(), tmp_path / "cache", shard_size=3, batch_size=2, dtype=dtype,
                        progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["count"] == 5 and [s["count"] for s in index["shards"]] == [3, 2]
    assert index["latent_shape"] == [4, 4, H // 8, W // 8] and index["text_shape"] == [5, 3]
    assert index["skipped"] == {"total": 2, "by_reason": {"corrupt": 1, "missing": 1}}
    assert index["scaling_factor"] == 0.5 and index["source"] == str(cache_table.resolve())
    assert index["dtype"] == str(dtype).removeprefix("torch.") and index["kind"] == "video"
    with safe_open(str(out / "shard-00000.safetensors"), framework="pt") as f:
        assert f.get_tensor("latents").dtype == dtype
        assert json.loads(f.metadata()["captions"]) == ["one", "two", "three"]
        assert json.loads(f.metadata()["source_indices"]) == [0, 2, 3]

    cached = LatentCacheDataset(out)
    assert len(cached) == 5
    for i, src in enumerate([0, 2, 3, 5, 6]):
        item = cached[i]
        ref_item = ds[src]  # same seed and epoch -> the same clip
        assert item["source_index"] == src and item["index"] == i and item["caption"] == ref_item["caption"]
        assert item["latents"].dtype == torch.float32 and item["text"].dtype == torch.float32
        ref = fake_reference(ref_item).to(dtype).float()
        torch.testing.assert_close(item["latents"], ref, rtol=1e-6, atol=1e-6)
        text = FakePipeline().encode_text([ref_item["caption"]])[0].to(dtype).float()
        torch.testing.assert_close(item["text"], text, rtol=0, atol=0)

    # DataLoader workers receive a pickled copy: open shard handles must not travel with it.
    copy = pickle.loads(pickle.dumps(cached))
    torch.testing.assert_close(copy[4]["latents"], cached[4]["latents"], rtol=0, atol=0)
    loader = DataLoader(cached, batch_size=2, num_workers=0)
    assert next(iter(loader))["latents"].shape == (2, 4, 4, H // 8, W // 8)
    with pytest.raises(FileExistsError, match="not empty"):
        cache_latents(ds, FakePipeline(), out, progress=False)


def test_cache_images_overwrite_and_errors(tmp_path):
    (tmp_path / "img").mkdir()
    rng = np.random.default_rng(1)
    for name in "abc":
        Image.fromarray(rng.integers(0, 256, (16, 24, 3), dtype=np.uint8)).save(tmp_path / "img" / f"{name}.png")
    data = write_csv(tmp_path / "d.csv", [(f"img/{n}.png", n) for n in "abc"])
    ds = ImageTextDataset(data, resolution=(16, 24))
    out = cache_latents(ds, FakePipeline(), tmp_path / "cache", shard_size=1, progress=False)
    assert sorted(p.name for p in out.glob("shard-*")) == [f"shard-0000{k}.safetensors" for k in range(3)]
    cached = LatentCacheDataset(out)
    assert cached[1]["latents"].shape == (4, 1, 2, 3)  # F = 1 for images
    torch.testing.assert_close(cached[(1, 9)]["latents"], fake_reference(ds[1]), rtol=0, atol=0)
    # Overwriting with a smaller cache removes the shards it no longer lists.
    ds.paths = ds.paths[:1]
    ds.captions = ds.captions[:1]
    cache_latents(ds, FakePipeline(), out, shard_size=1, progress=False, overwrite=True)
    assert [p.name for p in out.glob("shard-*")] == ["shard-00000.safetensors"] and len(LatentCacheDataset(out)) == 1

    with pytest.raises(DatasetError, match="no index.json"):
        LatentCacheDataset(tmp_path / "img")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "index.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        LatentCacheDataset(tmp_path / "broken")
    index = json.loads((out / "index.json").read_text())
    (out / "shard-00000.safetensors").rename(out / "moved.safetensors")
    with pytest.raises(DatasetError, match="shard-00000.safetensors is missing"):
        LatentCacheDataset(out)
    (out / "moved.safetensors").rename(out / "shard-00000.safetensors")
    (out / "index.json").write_text(json.dumps({**index, "latent_shape": [4, 1, 2, 4]}))
    with pytest.raises(DatasetError, match="has shape"):
        LatentCacheDataset(out)[0]
    all_bad = ImageTextDataset(write_csv(tmp_path / "bad.csv", [("img/none.png", "x")]), resolution=16)
    with pytest.raises(DatasetError, match="none of the 1 items"):
        cache_latents(all_bad, FakePipeline(), tmp_path / "empty-cache", progress=False)


def test_cache_with_tiny_pipeline(media, tmp_path, tiny_pipeline_dir):
    from pdengine.engine.pipeline import PixelDancePipeline

    pipe = PixelDancePipeline.from_pretrained(tiny_pipeline_dir)
    data = write_csv(tmp_path / "d.csv", [(str(media / "v8.mp4"), "red ball moves"),
                                          (str(media / "gop.mp4"), "blue box")])
    ds = VideoTextDataset(data, resolution=(H, W), frames=4, fps=4.0)
    out = cache_latents(ds, pipe, tmp_path / "cache", batch_size=2, progress=False)
    assert json.loads((out / "index.json").read_text())["scaling_factor"] == pipe.scaling_factor
    cached = LatentCacheDataset(out)
    for i in range(2):
        item, src = cached[i], ds[i]
        ref = pipe.encode_images(src["video"].permute(1, 0, 2, 3)).permute(1, 0, 2, 3)  # (C, F, h, w)
        assert item["latents"].shape == ref.shape == (4, 4, H // 8, W // 8)
        torch.testing.assert_close(item["latents"], ref, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(item["text"], pipe.encode_text([src["caption"]])[0], rtol=1e-4, atol=1e-5)
