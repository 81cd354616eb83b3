"""Media I/O: conditioning images in, generated videos out (mp4, gif, png folder) and back.

Conventions:
- An image tensor is float32 (3, H, W) in [-1, 1], the range the VAE expects.
- A video tensor is float (F, 3, H, W) in [-1, 1] (frames first, as the pipeline's decoded output);
  `frames_to_uint8` turns it into the uint8 (F, H, W, 3) array that every writer takes and that
  `read_video` returns.
- Writers never leave a half-written file under the final name: they write a hidden temporary
  next to it and `os.replace` it into place, removing the temporary on failure.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import uuid
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import GifImagePlugin, Image, ImageOps, PngImagePlugin, UnidentifiedImageError

VIDEO_FORMATS = ("mp4", "gif", "png")
# Suffixes decoded with PyAV by `read_video` (the trainer reads clips from the usual containers).
_AV_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi")
_FRAME_NAME = re.compile(r"^(\d+)\.png$")
_PNG_FPS_KEY = "pdengine-fps"
_MP4_CRF = 18  # visually near-lossless for x264 at small file size
# GIF stores delays in 1/100 s and browsers stretch delays below 2/100 s to 1/10 s.
_GIF_MAX_FPS = 50.0


class MediaError(ValueError):
    """Bad media input or output request; the message names the offending path."""


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------


def _open_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode `path` fully, apply its EXIF orientation and return an RGB image."""
    p = Path(path)
    if not p.exists():
        raise MediaError(f"{p}: image file not found")
    if not p.is_file():
        raise MediaError(f"{p}: not a file")
    if p.stat().st_size == 0:
        raise MediaError(f"{p}: empty file (0 bytes), not an image")
    try:
        with Image.open(p) as img:
            # load() decodes every pixel: a truncated file fails here, not later in the pipeline.
            img.load()
            img = ImageOps.exif_transpose(img)
            rgb = img.convert("RGB")
    except UnidentifiedImageError as e:
        raise MediaError(f"{p}: not an image Pillow can read") from e
    except (OSError, SyntaxError) as e:  # Pillow reports corrupt data as OSError/SyntaxError
        raise MediaError(f"{p}: cannot decode image: {e}") from e
    if rgb.width == 0 or rgb.height == 0:
        raise MediaError(f"{p}: image has zero size {rgb.width}x{rgb.height}")
    return rgb


def check_image(path: str | os.PathLike) -> tuple[int, int]:
    """Verify that `path` exists and decodes; return its (width, height) after EXIF orientation.

    Meant to run before any model is loaded, so a bad path fails in seconds, not minutes.
    """
    img = _open_rgb(path)
    return img.width, img.height


def cover_crop(img: Image.Image, height: int, width: int) -> np.ndarray:
    """Resize an RGB image (Lanczos, antialiased) keeping its aspect ratio so it covers (height, width),
    then centre-crop to exactly that size; uint8 (height, width, 3). Conditioning images and training
    frames all go through this one rule."""
    scale = max(width / img.width, height / img.height)
    # max() guards against the covering side rounding one pixel short.
    new_w = max(width, round(img.width * scale))
    new_h = max(height, round(img.height * scale))
    if (new_w, new_h) != img.size:
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)), dtype=np.uint8)


def load_image(path: str | os.PathLike, height: int, width: int) -> torch.Tensor:
    """Load an image as float32 (3, height, width) in [-1, 1].

    The image is resized (Lanczos, antialiased) keeping its aspect ratio so that it covers
    (height, width), then centre-cropped to exactly that size.
    """
    for name, v in (("height", height), ("width", width)):
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            raise MediaError(f"{path}: {name} must be a positive int, got {v!r}")
    array = cover_crop(_open_rgb(path), height, width)  # (H, W, 3)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32)
    return tensor / 127.5 - 1.0


# ---------------------------------------------------------------------------------------------
# Video writing
# ---------------------------------------------------------------------------------------------


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """Convert a float video (F, 3, H, W) in [-1, 1] to a uint8 (F, H, W, 3) numpy array.

    Values outside [-1, 1] are clamped; the conversion rounds to the nearest level.
    """
    if not isinstance(video, torch.Tensor):
        raise MediaError(f"frames_to_uint8: expected a torch.Tensor, got {type(video).__name__}")
    if not video.is_floating_point():
        raise MediaError(f"frames_to_uint8: expected a floating tensor, got {video.dtype}")
    if video.ndim != 4 or video.shape[1] != 3:
        raise MediaError(f"frames_to_uint8: expected shape (F, 3, H, W), got {tuple(video.shape)}")
    x = video.detach().to(device="cpu", dtype=torch.float32)
    x = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def _check_frames(frames: np.ndarray, path: Path) -> None:
    if not isinstance(frames, np.ndarray):
        raise MediaError(f"{path}: frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise MediaError(f"{path}: frames must be uint8, got {frames.dtype} (see frames_to_uint8)")
    if frames.ndim != 4 or frames.shape[3] != 3:
        raise MediaError(f"{path}: frames must have shape (F, H, W, 3), got {frames.shape}")
    f, h, w, _ = frames.shape
    if f == 0:
        raise MediaError(f"{path}: no frames to write")
    if h == 0 or w == 0:
        raise MediaError(f"{path}: frames have zero size {w}x{h}")


def _check_fps(fps: float, path: Path) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise MediaError(f"{path}: fps must be a positive number, got {fps!r}")


def _av_frame(frame: np.ndarray, index: int, time_base: Fraction) -> av.VideoFrame:
    """One RGB frame as a PyAV frame at presentation time `index` (in units of `time_base`)."""
    vf = av.VideoFrame.from_ndarray(frame, format="rgb24")
    vf.pts = index
    vf.time_base = time_base
    return vf


def _encode_mp4(frames: np.ndarray, out: Path, fps: float) -> None:
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 2997/100, exact for integer fps
    f, h, w, _ = frames.shape
    with av.open(str(out), mode="w", format="mp4") as container:
        # mbtree off: with macroblock-tree rate control libx264 gives different bytes for identical frames
        # from run to run; without it an mp4 is a pure function of its frames (deterministic datasets).
        stream = container.add_stream("libx264", rate=rate, options={"crf": str(_MP4_CRF), "x264-params": "mbtree=0"})
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        time_base = 1 / rate
        for i in range(f):
            container.mux(stream.encode(_av_frame(frames[i], i, time_base)))
        container.mux(stream.encode(None))  # flush the encoder's delayed frames


def _encode_gif(frames: np.ndarray, out: Path, fps: float) -> None:
    # Pillow's multi-frame GIF writer merges identical consecutive frames (summing their delays),
    # which changes the frame count; write the frames one by one with its public per-frame
    # helpers instead, each frame with its own adaptive palette.
    delay_ms = 10 * max(2, round(100 / fps))  # GIF delays are whole 1/100 s
    with open(out, "wb") as fp:
        for i, frame in enumerate(frames):
            img = Image.fromarray(frame, "RGB").convert("P", palette=Image.Palette.ADAPTIVE)
            if i == 0:
                header, _ = GifImagePlugin.getheader(img, info={"loop": 0, "duration": delay_ms})
                fp.writelines(header)
            fp.writelines(GifImagePlugin.getdata(img, duration=delay_ms, include_color_table=True))
        fp.write(b";")  # GIF trailer


def _frame_digits(n_frames: int) -> int:
    return max(5, len(str(n_frames - 1)))


def _encode_png_folder(frames: np.ndarray, out: Path, fps: float) -> None:
    digits = _frame_digits(len(frames))
    meta = PngImagePlugin.PngInfo()
    meta.add_text(_PNG_FPS_KEY, repr(float(fps)))  # a png folder has no timing of its own
    for i, frame in enumerate(frames):
        Image.fromarray(frame, "RGB").save(out / f"{i:0{digits}d}.png", format="PNG", pnginfo=meta)


def _is_frame_folder(path: Path) -> bool:
    """True when `path` is a folder holding only numbered PNG frames (a previous png output)."""
    return all(child.is_file() and _FRAME_NAME.match(child.name) for child in path.iterdir())


def _temp_sibling(path: Path, tag: str) -> Path:
    # Hidden, unique and in the same folder, so os.replace is an atomic rename on one filesystem.
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex[:12]}")


def _write_file_atomic(path: Path, encode: Callable[[Path], None]) -> None:
    if path.is_dir():
        raise MediaError(f"{path}: is a folder; refusing to replace it with a file")
    tmp = _temp_sibling(path, "tmp")
    try:
        encode(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _write_folder_atomic(path: Path, encode: Callable[[Path], None]) -> None:
    if path.exists() and not path.is_dir():
        raise MediaError(f"{path}: exists and is not a folder")
    if path.is_dir() and not _is_frame_folder(path):
        raise MediaError(f"{path}: folder exists and holds files other than numbered PNG frames")
    tmp = _temp_sibling(path, "tmp")
    os.mkdir(tmp)
    try:
        encode(tmp)
        if path.is_dir():
            # A folder cannot be renamed over a non-empty one: move the old frames aside first,
            # so the final name always holds either the old or the new complete set.
            old = _temp_sibling(path, "old")
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp)
        raise


def write_video(frames: np.ndarray, path: str | os.PathLike, fmt: str, fps: float) -> Path:
    """Write uint8 frames (F, H, W, 3) to `path` as "mp4" (H.264), "gif" or "png" (folder).

    mp4: libx264, yuv420p, crf 18, needs even H and W. gif: every frame kept, loops forever,
    delays rounded to 1/100 s, at most 50 fps. png: a folder of `00000.png`, `00001.png`, ...
    (at least 5 digits) with the fps stored in each frame's text chunk. The parent folder is
    created if missing; an existing output is replaced atomically. Returns the output path.
    """
    path = Path(path)
    if fmt not in VIDEO_FORMATS:
        raise MediaError(f"{path}: unknown video format {fmt!r} (choose from {', '.join(VIDEO_FORMATS)})")
    if fmt in ("mp4", "gif") and path.suffix.lower() != f".{fmt}":
        raise MediaError(f"{path}: a {fmt} file must end in .{fmt}")
    _check_frames(frames, path)
    _check_fps(fps, path)
    _, h, w, _ = frames.shape
    if fmt == "mp4" and (h % 2 or w % 2):
        raise MediaError(f"{path}: mp4 (yuv420p) needs even height and width, got {w}x{h}")
    if fmt == "gif" and fps > _GIF_MAX_FPS:
        raise MediaError(f"{path}: gif cannot play faster than {_GIF_MAX_FPS:g} fps, got {fps}")
    if fmt == "png" and path.suffix.lower() in (".mp4", ".gif"):
        raise MediaError(f"{path}: a png frame folder must not be named like a {path.suffix} file")

    frames = np.ascontiguousarray(frames)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "mp4":
        _write_file_atomic(path, lambda tmp: _encode_mp4(frames, tmp, fps))
    elif fmt == "gif":
        _write_file_atomic(path, lambda tmp: _encode_gif(frames, tmp, fps))
    else:
        _write_folder_atomic(path, lambda tmp: _encode_png_folder(frames, tmp, fps))
    return path


# ---------------------------------------------------------------------------------------------
# Video reading
# ---------------------------------------------------------------------------------------------


def _frame_files(folder: Path) -> list[Path]:
    """Numbered PNG frames of `folder` in order; the numbers must be consecutive."""
    numbered = []
    for child in folder.iterdir():
        m = _FRAME_NAME.match(child.name)
        if m and child.is_file():
            numbered.append((int(m.group(1)), child))
    if not numbered:
        raise MediaError(f"{folder}: no numbered PNG frames (00000.png, ...) in folder")
    numbered.sort()
    first = numbered[0][0]
    for k, (n, child) in enumerate(numbered):
        if n != first + k:
            raise MediaError(f"{folder}: frame {first + k} missing (next file is {child.name})")
    return [child for _, child in numbered]


def _video_kind(path: Path) -> str:
    if not path.exists():
        raise MediaError(f"{path}: video not found")
    if path.is_dir():
        return "png"
    suffix = path.suffix.lower()
    if suffix == ".gif":
        return "gif"
    if suffix in _AV_SUFFIXES:
        return "av"
    raise MediaError(f"{path}: unsupported video type {suffix!r} (mp4/gif file or png frame folder)")


def _read_png_folder(path: Path) -> np.ndarray:
    frames = []
    for file in _frame_files(path):
        frames.append(np.asarray(_open_rgb(file), dtype=np.uint8))
        if frames[-1].shape != frames[0].shape:
            raise MediaError(f"{file}: size {frames[-1].shape[1::-1]} differs from the first frame's")
    return np.stack(frames)


def _read_gif(path: Path) -> np.ndarray:
    frames = []
    try:
        with Image.open(path) as img:
            for i in range(getattr(img, "n_frames", 1)):
                img.seek(i)
                frames.append(np.asarray(img.convert("RGB"), dtype=np.uint8))
    except UnidentifiedImageError as e:
        raise MediaError(f"{path}: not a GIF Pillow can read") from e
    except (OSError, SyntaxError, EOFError) as e:
        raise MediaError(f"{path}: cannot decode GIF: {e}") from e
    return np.stack(frames)


def _read_av(path: Path) -> np.ndarray:
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except av.FFmpegError as e:
        raise MediaError(f"{path}: cannot decode video: {e}") from e
    if not frames:
        raise MediaError(f"{path}: video stream has no frames")
    return np.stack(frames)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Read an mp4 (or other PyAV container), a gif or a png frame folder as uint8 (F, H, W, 3)."""
    path = Path(path)
    kind = _video_kind(path)
    if kind == "png":
        return _read_png_folder(path)
    if kind == "gif":
        return _read_gif(path)
    return _read_av(path)


def probe_video(path: str | os.PathLike) -> dict:
    """Return {frames, height, width, fps} without decoding every frame where the format allows.

    fps is a float; it is None for a png folder not written by `write_video` (no timing stored)
    and for a gif without frame delays.
    """
    path = Path(path)
    kind = _video_kind(path)
    if kind == "png":
        files = _frame_files(path)
        try:
            with Image.open(files[0]) as img:
                width, height = img.size
                fps_text = img.info.get(_PNG_FPS_KEY)
        except (UnidentifiedImageError, OSError, SyntaxError) as e:
            raise MediaError(f"{files[0]}: cannot read PNG frame: {e}") from e
        fps = float(fps_text) if fps_text is not None else None
        return {"frames": len(files), "height": height, "width": width, "fps": fps}
    if kind == "gif":
        try:
            with Image.open(path) as img:
                width, height = img.size
                n_frames = getattr(img, "n_frames", 1)
                duration = img.info.get("duration")
        except UnidentifiedImageError as e:
            raise MediaError(f"{path}: not a GIF Pillow can read") from e
        except (OSError, SyntaxError, EOFError) as e:
            raise MediaError(f"{path}: cannot decode GIF: {e}") from e
        fps = 1000.0 / duration if duration else None
        return {"frames": n_frames, "height": height, "width": width, "fps": fps}
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise MediaError(f"{path}: no video stream")
            stream = container.streams.video[0]
            n_frames = stream.frames
            if n_frames == 0:  # container without a frame count: count packets, no decoding
                n_frames = sum(1 for p in container.demux(stream) if p.size)
            rate = stream.average_rate or stream.guessed_rate
            return {
                "frames": n_frames,
                "height": stream.height,
                "width": stream.width,
                "fps": float(rate) if rate else None,
            }
    except av.FFmpegError as e:
        raise MediaError(f"{path}: cannot read video: {e}") from e
