"""Media I/O: image loading, video writing (mp4/gif/png folder), reading back, atomic writes."""

from __future__ import annotations

import math
import os

import av
import numpy as np
import pytest
import torch
from PIL import GifImagePlugin, Image, ImageOps

from pdengine.engine import media
from pdengine.engine.media import (
    MediaError,
    check_image,
    frames_to_uint8,
    load_image,
    probe_video,
    read_video,
    write_video,
)


def smooth_video(f: int = 8, h: int = 64, w: int = 96) -> np.ndarray:
    """A smooth moving pattern (uint8 (F, H, W, 3)) that lossy codecs reproduce closely."""
    t = np.arange(f)[:, None, None]
    y = np.arange(h)[None, :, None]
    x = np.arange(w)[None, None, :]
    r = 128 + 100 * np.sin(x / 15 + t / 3) * np.cos(y / 20)
    g = 128 + 80 * np.cos((x + y) / 25 - t / 4)
    b = np.broadcast_to(x * 2 + t * 3, (f, h, w))
    return np.stack([r, g, b], axis=-1).clip(0, 255).round().astype(np.uint8)


def smooth_image(w: int, h: int) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 / w, y * 255 / h, 128 + 100 * np.sin((x + y) / 7)], axis=-1)
    return Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")


def entries(folder) -> list[str]:
    return sorted(os.listdir(folder))


# ---------------------------------------------------------------------------------------------
# frames_to_uint8
# ---------------------------------------------------------------------------------------------


def test_frames_to_uint8_layout_range_and_rounding():
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 3, 5, 7, generator=g) * 2.4 - 1.2  # some values outside [-1, 1]
    video[0, 0, 0, 0], video[0, 1, 0, 0], video[0, 2, 0, 0] = -1.0, 1.0, 0.0
    out = frames_to_uint8(video)
    assert out.dtype == np.uint8 and out.shape == (3, 5, 7, 3)
    ref = np.rint((np.clip(video.numpy(), -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(out, ref)
    assert tuple(out[0, 0, 0]) == (0, 255, 128)  # -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128 (half to even)
    # bf16 input goes through fp32
    np.testing.assert_array_equal(
        frames_to_uint8(video.bfloat16()), frames_to_uint8(video.bfloat16().float())
    )


@pytest.mark.parametrize(
    "video, match",
    [
        (torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "floating"),
        (torch.zeros(3, 2, 4, 4), r"\(F, 3, H, W\)"),
        (torch.zeros(3, 4, 4), r"\(F, 3, H, W\)"),
        (np.zeros((2, 3, 4, 4), np.float32), "torch.Tensor"),
    ],
)
def test_frames_to_uint8_errors(video, match):
    with pytest.raises(MediaError, match=match):
        frames_to_uint8(video)


# ---------------------------------------------------------------------------------------------
# write_video / read_video round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, name, fps, max_mae",
    [
        ("mp4", "clip.mp4", 8, 4.0),  # crf 18 + 4:2:0 chroma on a smooth pattern
        ("gif", "clip.gif", 10, 8.0),  # 256-colour adaptive palette per frame
        ("png", "clip", 8, 0.0),  # lossless
    ],
)
def test_round_trip(tmp_path, fmt, name, fps, max_mae):
    video = smooth_video()
    out = write_video(video, tmp_path / name, fmt, fps)
    assert out == tmp_path / name
    back = read_video(out)
    assert back.dtype == np.uint8 and back.shape == video.shape
    mae = np.abs(back.astype(np.float64) - video).mean()
    if fmt == "png":
        np.testing.assert_array_equal(back, video)
    else:
        assert mae < max_mae, f"{fmt}: mean abs error {mae:.2f}"
    info = probe_video(out)
    assert info["frames"] == len(video) and (info["height"], info["width"]) == video.shape[1:3]
    assert info["fps"] == pytest.approx(fps)
    assert entries(tmp_path) == [name]  # no temporaries left


def test_mp4_stream_is_h264_yuv420p(tmp_path):
    out = write_video(smooth_video(4, 32, 48), tmp_path / "a.mp4", "mp4", 24)
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert float(stream.average_rate) == 24


def test_non_integer_fps(tmp_path):
    out = write_video(smooth_video(4, 32, 32), tmp_path / "a.mp4", "mp4", 7.5)
    assert probe_video(out)["fps"] == pytest.approx(7.5)


def test_gif_keeps_identical_frames_and_loops(tmp_path):
    # Pillow's own multi-frame writer would merge these into one frame.
    video = np.repeat(smooth_video(2, 16, 24), [3, 2], axis=0)
    out = write_video(video, tmp_path / "still.gif", "gif", 5)
    back = read_video(out)
    assert back.shape == video.shape
    with Image.open(out) as img:
        assert img.info["loop"] == 0 and img.info["duration"] == 200
    # FFmpeg's GIF decoder reads the same frames as Pillow.
    with av.open(str(out)) as container:
        ff = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    np.testing.assert_array_equal(ff, back)


def test_png_folder_names_and_overwrite(tmp_path):
    out = write_video(smooth_video(3, 8, 8), tmp_path / "frames", "png", 4)
    assert entries(out) == ["00000.png", "00001.png", "00002.png"]
    # Rewriting with fewer frames replaces the whole set (no stale 00002.png).
    video = smooth_video(2, 8, 8)[::-1].copy()
    write_video(video, out, "png", 4)
    assert entries(out) == ["00000.png", "00001.png"]
    np.testing.assert_array_equal(read_video(out), video)
    assert entries(tmp_path) == ["frames"]
    assert media._frame_digits(100_000) == 5 and media._frame_digits(100_001) == 6


def test_png_folder_refuses_foreign_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("keep me")
    with pytest.raises(MediaError, match="docs: folder exists and holds files other than"):
        write_video(smooth_video(2, 8, 8), tmp_path / "docs", "png", 4)
    assert entries(tmp_path / "docs") == ["notes.txt"]


def test_mp4_overwrites_existing_file_and_creates_parent(tmp_path):
    target = tmp_path / "sub" / "dir" / "a.mp4"
    write_video(smooth_video(2, 16, 16), target, "mp4", 8)
    write_video(smooth_video(5, 16, 16), target, "mp4", 8)
    assert probe_video(target)["frames"] == 5


# ---------------------------------------------------------------------------------------------
# Atomic writes: a failure mid-way leaves neither a file under the final name nor a temporary
# ---------------------------------------------------------------------------------------------


def _fail_on_call(monkeypatch, owner, attr, n, folder):
    """Patch owner.attr to fail on its n-th call, checking that a temporary exists by then."""
    real = getattr(owner, attr)
    calls = {"n": 0}

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == n:
            temps = [folder / e for e in os.listdir(folder) if e.startswith(".")]
            assert temps, "the encoder should be writing a temporary by now"
            assert any(t.is_dir() or t.stat().st_size > 0 for t in temps), "temporary should hold data"
            raise RuntimeError("encoder crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, attr, wrapper)


@pytest.mark.parametrize(
    "fmt, name, owner, attr, fail_at",
    [
        # x264 buffers ~40 frames of lookahead before the first packet (and the file header) is
        # written, so fail late enough for a partial file to exist.
        ("mp4", "a.mp4", media, "_av_frame", 60),
        ("gif", "a.gif", GifImagePlugin, "getdata", 12),  # past the 8 KiB write buffer
        ("png", "a", Image.Image, "save", 3),
    ],
)
@pytest.mark.parametrize("existing", [False, True])
def test_atomic_write_on_failure(tmp_path, monkeypatch, fmt, name, owner, attr, fail_at, existing):
    target = tmp_path / name
    if existing:
        old = write_video(smooth_video(2, 16, 16), target, fmt, 4)
        old_frames = read_video(old)
    _fail_on_call(monkeypatch, owner, attr, fail_at, tmp_path)
    with pytest.raises(RuntimeError, match="encoder crashed"):
        write_video(smooth_video(fail_at + 4, 16, 16), target, fmt, 4)
    monkeypatch.undo()
    if existing:
        assert entries(tmp_path) == [name]
        np.testing.assert_array_equal(read_video(target), old_frames)  # old output untouched
    else:
        assert entries(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# write_video / read_video errors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frames, name, fmt, fps, match",
    [
        (smooth_video(2, 8, 8), "a.avi", "avi", 8, r"unknown video format 'avi'"),
        (smooth_video(2, 8, 8), "a.gif", "mp4", 8, r"a.gif: a mp4 file must end in .mp4"),
        (smooth_video(2, 8, 8), "a.mp4", "png", 8, "png frame folder must not be named"),
        (np.zeros((0, 8, 8, 3), np.uint8), "a.mp4", "mp4", 8, "no frames to write"),
        (np.zeros((2, 8, 8, 3), np.float32), "a.mp4", "mp4", 8, "must be uint8, got float32"),
        (np.zeros((2, 8, 8), np.uint8), "a.mp4", "mp4", 8, r"shape \(F, H, W, 3\)"),
        (np.zeros((2, 3, 8, 8), np.uint8), "a.mp4", "mp4", 8, r"shape \(F, H, W, 3\)"),
        (np.zeros((2, 0, 8, 3), np.uint8), "a.mp4", "mp4", 8, "zero size"),
        ([[0]], "a.mp4", "mp4", 8, "numpy array, got list"),
        (np.zeros((2, 9, 8, 3), np.uint8), "a.mp4", "mp4", 8, "even height and width, got 8x9"),
        (np.zeros((2, 8, 7, 3), np.uint8), "a.mp4", "mp4", 8, "even height and width, got 7x8"),
        (smooth_video(2, 8, 8), "a.mp4", "mp4", 0, "fps must be a positive number, got 0"),
        (smooth_video(2, 8, 8), "a.mp4", "mp4", math.nan, "fps must be a positive number"),
        (smooth_video(2, 8, 8), "a.mp4", "mp4", True, "fps must be a positive number"),
        (smooth_video(2, 8, 8), "a.gif", "gif", 60, "faster than 50 fps"),
    ],
)
def test_write_video_errors(tmp_path, frames, name, fmt, fps, match):
    with pytest.raises(MediaError, match=match) as e:
        write_video(frames, tmp_path / name, fmt, fps)
    assert str(tmp_path / name) in str(e.value)
    assert entries(tmp_path) == []


def test_write_video_target_kind_conflicts(tmp_path):
    (tmp_path / "a.mp4").mkdir()
    with pytest.raises(MediaError, match="a.mp4: is a folder"):
        write_video(smooth_video(2, 8, 8), tmp_path / "a.mp4", "mp4", 8)
    (tmp_path / "frames").write_text("x")
    with pytest.raises(MediaError, match="frames: exists and is not a folder"):
        write_video(smooth_video(2, 8, 8), tmp_path / "frames", "png", 8)
    assert entries(tmp_path) == ["a.mp4", "frames"]


def test_read_video_errors(tmp_path):
    with pytest.raises(MediaError, match="missing.mp4: video not found"):
        read_video(tmp_path / "missing.mp4")
    (tmp_path / "clip.txt").write_text("x")
    with pytest.raises(MediaError, match="unsupported video type '.txt'"):
        read_video(tmp_path / "clip.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MediaError, match="empty: no numbered PNG frames"):
        read_video(tmp_path / "empty")
    (tmp_path / "junk.mp4").write_bytes(os.urandom(256))
    with pytest.raises(MediaError, match="junk.mp4: cannot decode video"):
        read_video(tmp_path / "junk.mp4")
    with pytest.raises(MediaError, match="junk.mp4: cannot read video"):
        probe_video(tmp_path / "junk.mp4")
    (tmp_path / "junk.gif").write_bytes(b"not a gif at all")
    with pytest.raises(MediaError, match="junk.gif: not a GIF"):
        read_video(tmp_path / "junk.gif")
    gap = write_video(smooth_video(3, 8, 8), tmp_path / "gap", "png", 4)
    (gap / "00001.png").unlink()
    with pytest.raises(MediaError, match="gap: frame 1 missing"):
        read_video(gap)
    sizes = write_video(smooth_video(2, 8, 8), tmp_path / "sizes", "png", 4)
    Image.new("RGB", (4, 4)).save(sizes / "00001.png")
    with pytest.raises(MediaError, match="00001.png: size"):
        read_video(sizes)


def test_read_png_folder_from_elsewhere_starts_at_one(tmp_path):
    # ffmpeg's image2 muxer numbers from 1 and stores no fps.
    video = smooth_video(3, 8, 8)
    for i, frame in enumerate(video, start=1):
        Image.fromarray(frame).save(tmp_path / f"{i:05d}.png")
    np.testing.assert_array_equal(read_video(tmp_path), video)
    assert probe_video(tmp_path) == {"frames": 3, "height": 8, "width": 8, "fps": None}


# ---------------------------------------------------------------------------------------------
# load_image / check_image
# ---------------------------------------------------------------------------------------------


def pil_cover_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Reference: PIL resize (Lanczos) to cover (height, width), then PIL centre crop."""
    scale = max(width / img.width, height / img.height)
    size = (max(width, round(img.width * scale)), max(height, round(img.height * scale)))
    resized = img.resize(size, Image.Resampling.LANCZOS)
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    return np.asarray(resized.crop((left, top, left + width, top + height)))


@pytest.mark.parametrize(
    "src_wh, height, width",
    [
        ((90, 60), 32, 40),  # landscape into less-wide target: crop the sides
        ((90, 60), 40, 24),  # landscape into portrait target: crop a lot of the sides
        ((50, 120), 48, 48),  # portrait into square: crop top and bottom
        ((40, 30), 64, 96),  # upscale
    ],
)
def test_load_image_resize_and_crop(tmp_path, src_wh, height, width):
    img = smooth_image(*src_wh)
    img.save(tmp_path / "img.png")
    x = load_image(tmp_path / "img.png", height, width)
    assert x.dtype == torch.float32 and x.shape == (3, height, width)
    assert x.min() >= -1 and x.max() <= 1
    ref = torch.from_numpy(pil_cover_crop(img, height, width).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, ref, rtol=0, atol=1e-6)
    # Independent check: PIL's ImageOps.fit (crop to the aspect ratio, then resize) differs only by
    # sub-pixel placement, so the two agree closely on a smooth image.
    fit = np.asarray(ImageOps.fit(img, (width, height), Image.Resampling.LANCZOS))
    fit_t = torch.from_numpy(fit.copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (x - fit_t).abs().mean() < 0.03
    assert check_image(tmp_path / "img.png") == src_wh


def test_load_image_exact_size_is_untouched(tmp_path):
    img = smooth_image(24, 16)
    img.save(tmp_path / "img.png")
    x = load_image(tmp_path / "img.png", 16, 24)
    ref = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
    torch.testing.assert_close(x, ref, rtol=0, atol=0)


def test_load_image_grayscale_and_rgba_become_rgb(tmp_path):
    Image.new("L", (8, 8), 200).save(tmp_path / "g.png")
    Image.new("RGBA", (8, 8), (10, 20, 30, 128)).save(tmp_path / "a.png")
    g = load_image(tmp_path / "g.png", 8, 8)
    assert g.shape == (3, 8, 8) and torch.allclose(g, torch.full_like(g, 200 / 127.5 - 1))
    a = load_image(tmp_path / "a.png", 8, 8)
    assert a[:, 0, 0].tolist() == pytest.approx([10 / 127.5 - 1, 20 / 127.5 - 1, 30 / 127.5 - 1])


def test_exif_orientation_is_applied(tmp_path):
    # Stored 60x40 with the left half red and the right half blue; orientation 6 means "rotate
    # 90 degrees clockwise to display", so the displayed image is 40x60 with red on top.
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (255, 0, 0)
    stored[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "rot.png", exif=exif)
    assert check_image(tmp_path / "rot.png") == (40, 60)
    x = load_image(tmp_path / "rot.png", 60, 40)
    assert x[:, :30].mean(dim=(1, 2)).tolist() == pytest.approx([1, -1, -1])
    assert x[:, 30:].mean(dim=(1, 2)).tolist() == pytest.approx([-1, -1, 1])


def test_image_errors(tmp_path):
    cases = []
    cases.append((tmp_path / "missing.png", "missing.png: image file not found"))
    (tmp_path / "folder.png").mkdir()
    cases.append((tmp_path / "folder.png", "folder.png: not a file"))
    (tmp_path / "empty.png").write_bytes(b"")
    cases.append((tmp_path / "empty.png", r"empty.png: empty file \(0 bytes\)"))
    (tmp_path / "text.png").write_text("hello, not a picture")
    cases.append((tmp_path / "text.png", "text.png: not an image Pillow can read"))
    smooth_image(64, 64).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    cases.append((tmp_path / "cut.png", "cut.png: cannot decode image"))
    for path, match in cases:
        with pytest.raises(MediaError, match=match):
            check_image(path)
        with pytest.raises(MediaError, match=match):
            load_image(path, 16, 16)


@pytest.mark.parametrize("height, width", [(0, 16), (16, -1), (16.0, 16), (True, 16)])
def test_load_image_bad_size(tmp_path, height, width):
    smooth_image(8, 8).save(tmp_path / "img.png")
    with pytest.raises(MediaError, match="must be a positive int"):
        load_image(tmp_path / "img.png", height, width)
