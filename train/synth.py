"""Synthetic video/image data with ground truth: coloured shapes that move the way their caption says.

`pdengine data synth` writes a WebVid-layout set the trainer reads directly, plus the geometry every
frame was drawn from, so `pdengine eval` can measure how well a model follows its three instructions.

Coordinates: a frame of `size` pixels spans [0, size] x [0, size]; pixel (row i, column j) covers
[j, j + 1) x [i, i + 1), so its centre is (j + 0.5, i + 0.5); y grows downwards. A `ClipSpec` is
resolution-free (positions and sizes are fractions of the frame side); `render_clip` turns it into
pixels, and the ground truth it returns is in pixels of the rendered frames.

Shapes: a circle of radius s, an axis-aligned square of half side s, an upward equilateral triangle of
circumradius 1.25 s (its centroid is its centre, so a tracked blob's centroid is the recorded centre).
`half_extent` in the ground truth is s. Rendering is supersampled (4 x 4 samples per pixel) so edges are
anti-aliased; backgrounds are smooth functions of world coordinates, so a camera pan is a sub-pixel
shift of the same texture.

Motions (every distance is random, so the caption never fixes the end state: the last-frame
instruction is needed to hit it):
- move: straight, constant speed, to the left/right/up/down over 20-50% of the frame;
- bounce: along one axis, out to a turning point at 35-65% of the clip, then back 50-100% of the way;
- grow / shrink: the size changes linearly by a factor 1.4-2.0, the centre stays put;
- pan: the camera moves left/right over 15-35% of the frame; object and background shift together
  (the content moves opposite to the camera). Pans use textured backgrounds (checker, noise) only, so
  the shift is visible everywhere.

Layout of `write_dataset(out, ...)`::

    out/synth.json                 settings and counts (the summary returned)
    out/train.csv, out/heldout.csv id,path,caption  (paths relative to out/; the two splits are disjoint)
    out/videos/<id>.mp4            H.264 clip, `frames` frames at `fps`
    out/videos/<id>.json           ground truth (see `render_clip`) + the spec it was drawn from
    out/images.csv                 id,path,caption
    out/images/<id>.png            single-frame scenes ("a red circle", "a blue square on stripes")

Determinism: clip i of a dataset is drawn from `default_rng([seed, 0, i])`, image i from
`default_rng([seed, 1, i])`, the split from `default_rng([seed, 2])`; no global random state is touched.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import click
import numpy as np

GENERATOR_VERSION = 1

SHAPES = ("circle", "square", "triangle")
# Saturated object colours, all far (> 85 RGB units) from every background colour below, so a colour
# threshold separates object from background even after lossy video coding.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 50, 50),
    "green": (50, 190, 70),
    "blue": (50, 90, 225),
    "yellow": (235, 205, 50),
    "purple": (170, 60, 210),
}
BACKGROUNDS = ("gradient", "stripes", "checker", "noise")
PAN_BACKGROUNDS = ("checker", "noise")  # 2D textures: a horizontal shift shows everywhere
MOTIONS = ("move", "bounce", "grow", "shrink", "pan")
STILL = "still"  # image scenes
DIRECTIONS = ("left", "right", "up", "down")
# The dataset cycles through this list, so every split sees every motion (moves have 4 directions).
KIND_CYCLE = ("move", "bounce", "move", "grow", "move", "shrink", "move", "pan")

TRIANGLE_R = 1.25  # circumradius of a triangle of half-extent s, in units of s
SUPERSAMPLE = 4  # samples per pixel side
_MARGIN = 0.03  # free space kept between an object and the frame border, in frame sides
_BG_PHRASE = {"gradient": "on a gradient", "stripes": "on stripes", "checker": "on a checkerboard",
              "noise": "on a mottled background"}
_UNIT = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0)}


class SynthError(ValueError):
    """Bad settings for the synthetic data generator."""


@dataclass(frozen=True)
class Background:
    """A smooth, low-contrast texture: base RGB plus `amplitude` times a pattern in [-1, 1].

    Lengths (period, wave lengths) are fractions of the frame side; angles in radians.
    """

    kind: str
    base: tuple[float, float, float]
    amplitude: float
    angle: float = 0.0
    period: float = 0.25
    phase: float = 0.0
    waves: tuple[tuple[float, float, float, float], ...] = ()  # noise: (angle, wavelength, phase, weight)


@dataclass(frozen=True)
class ClipSpec:
    """One clip (or, with motion "still", one image), in frame-relative units.

    `start` is the object's centre at t = 0 (fractions of the frame side); `scale` its half-extent at
    t = 0 and `end_scale` at t = 1; `distance` the travel (move, bounce's first leg, pan's camera);
    `turn` the bounce's turning time and `back` the share of the first leg it travels back.
    """

    shape: str
    colour: str
    motion: str
    background: Background
    start: tuple[float, float]
    scale: float
    end_scale: float
    direction: str | None = None
    distance: float = 0.0
    turn: float = 0.5
    back: float = 0.0

    @property
    def rgb(self) -> tuple[int, int, int]:
        return COLOURS[self.colour]

    def to_dict(self) -> dict:
        """JSON-ready (tuples as lists); `from_dict` turns it back into an equal spec."""
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, d: dict) -> ClipSpec:
        bg = dict(d["background"])
        bg["base"] = tuple(bg["base"])
        bg["waves"] = tuple(tuple(w) for w in bg["waves"])
        return cls(**{**d, "background": Background(**bg), "start": tuple(d["start"])})


# ---------------------------------------------------------------------------------------------
# Sampling specs
# ---------------------------------------------------------------------------------------------


def _extent(shape: str, scale: float) -> float:
    """Largest distance from the centre to the shape's edge along x or y, in units of `scale`'s."""
    return scale * (TRIANGLE_R if shape == "triangle" else 1.0)


def _background(rng: np.random.Generator, kinds: tuple[str, ...]) -> Background:
    kind = str(rng.choice(kinds))
    grey = rng.uniform(85.0, 165.0)
    base = tuple(float(grey + t) for t in rng.uniform(-12.0, 12.0, size=3))
    amplitude = float(rng.uniform(8.0, 20.0))
    angle = float(rng.uniform(0.0, math.pi))
    period = float(rng.uniform(0.18, 0.32))
    phase = float(rng.uniform(0.0, 2 * math.pi))
    waves: tuple = ()
    if kind == "noise":
        waves = tuple(
            (float(rng.uniform(0, 2 * math.pi)), float(rng.uniform(0.15, 0.5)), float(rng.uniform(0, 2 * math.pi)),
             float(rng.uniform(0.5, 1.0)))
            for _ in range(6)
        )
    return Background(kind, base, amplitude, angle, period, phase, waves)


def _place(rng: np.random.Generator, lo: float, hi: float) -> float:
    if hi < lo:  # the size and distance ranges of `sample_spec` always leave room; guard edits to them
        raise SynthError(f"no room to place an object: centre range [{lo:.3f}, {hi:.3f}]")
    return float(rng.uniform(lo, hi))


def sample_spec(rng: np.random.Generator, kind: str | None = None) -> ClipSpec:
    """Draw a random clip spec from `rng`; `kind` is one of MOTIONS, "still", or None (a random motion)."""
    if kind is None:
        kind = str(rng.choice(KIND_CYCLE))
    if kind not in (*MOTIONS, STILL):
        raise SynthError(f"unknown clip kind {kind!r} (choose from {', '.join((*MOTIONS, STILL))})")
    shape = str(rng.choice(SHAPES))
    colour = str(rng.choice(list(COLOURS)))
    background = _background(rng, PAN_BACKGROUNDS if kind == "pan" else BACKGROUNDS)

    if kind in ("grow", "shrink"):
        small = float(rng.uniform(0.06, 0.09))
        big = small * float(rng.uniform(1.4, 2.0))
        scale, end_scale = (small, big) if kind == "grow" else (big, small)
    else:
        scale = end_scale = float(rng.uniform(0.07, 0.15 if kind == STILL else 0.13))
    m = _extent(shape, max(scale, end_scale)) + _MARGIN  # centre range is [m, 1 - m]

    direction, distance, turn, back = None, 0.0, 0.5, 0.0
    x, y = _place(rng, m, 1 - m), _place(rng, m, 1 - m)
    if kind == "move":
        direction = str(rng.choice(DIRECTIONS))
        distance = float(rng.uniform(0.2, 0.5))
    elif kind == "bounce":
        direction = str(rng.choice(DIRECTIONS))
        distance = float(rng.uniform(0.2, 0.45))
        turn = float(rng.uniform(0.35, 0.65))
        back = float(rng.uniform(0.5, 1.0))
    elif kind == "pan":
        direction = str(rng.choice(("left", "right")))
        distance = float(rng.uniform(0.15, 0.35))
    if direction is not None:
        # Start where the whole path fits: the object travels `distance` along the axis (the content
        # moves opposite to a panning camera).
        dx, dy = _UNIT[direction]
        if kind == "pan":
            dx = -dx
        if dx:
            x = _place(rng, m, 1 - m - distance) if dx > 0 else _place(rng, m + distance, 1 - m)
        else:
            y = _place(rng, m, 1 - m - distance) if dy > 0 else _place(rng, m + distance, 1 - m)
    return ClipSpec(shape, colour, kind, background, (x, y), scale, end_scale, direction, distance, turn, back)


def caption(spec: ClipSpec, rng: np.random.Generator | None = None) -> str:
    """The text instruction of a clip; a still scene names its background when `rng` says so."""
    obj = f"a {spec.colour} {spec.shape}"
    m = spec.motion
    if m == "move":
        way = f"to the {spec.direction}" if spec.direction in ("left", "right") else spec.direction
        return f"{obj} moves {way}"
    if m == "bounce":
        return f"{obj} bounces"
    if m in ("grow", "shrink"):
        return f"{obj} {m}s"
    if m == "pan":
        return f"the camera pans {spec.direction}"
    if rng is not None and rng.random() < 0.5:
        return f"{obj} {_BG_PHRASE[spec.background.kind]}"
    return obj


def all_captions() -> list[str]:
    """Every caption this generator can write (sorted): the phrase space a demo text encoder is pretrained on."""
    out = {f"the camera pans {d}" for d in ("left", "right")}
    for shape in SHAPES:
        for colour in COLOURS:
            obj = f"a {colour} {shape}"
            out.add(obj)
            out.update(f"{obj} {phrase}" for phrase in _BG_PHRASE.values())
            out.update(f"{obj} moves {'to the ' + d if d in ('left', 'right') else d}" for d in DIRECTIONS)
            out.update(f"{obj} {verb}" for verb in ("bounces", "grows", "shrinks"))
    return sorted(out)


def vocabulary() -> list[str]:
    """Every word a caption of this generator can contain (sorted): what a demo tokenizer must know."""
    words = {"a", "the", "camera", "pans", "moves", "to", "bounces", "grows", "shrinks", *SHAPES, *COLOURS,
             *DIRECTIONS}
    for phrase in _BG_PHRASE.values():
        words.update(phrase.split())
    return sorted(words)


# ---------------------------------------------------------------------------------------------
# Geometry and rendering
# ---------------------------------------------------------------------------------------------


def trajectory(spec: ClipSpec, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centre (F, 2), half-extent (F,), camera offset (F, 2)) in frame-relative units at t = k / (F - 1).

    The centre is where the object appears in the frame (a pan's camera motion included).
    """
    if frames < 1:
        raise SynthError(f"frames must be >= 1, got {frames}")
    t = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    start = np.asarray(spec.start, dtype=np.float64)
    unit = np.asarray(_UNIT.get(spec.direction, (0.0, 0.0)), dtype=np.float64)
    if spec.motion == "move":
        offset = spec.distance * t
    elif spec.motion == "bounce":
        u = spec.turn
        offset = np.where(t <= u, spec.distance * t / u,
                          spec.distance * (1.0 - spec.back * (t - u) / (1.0 - u)))
    else:
        offset = np.zeros_like(t)
    camera = np.zeros((frames, 2))
    if spec.motion == "pan":
        camera = spec.distance * t[:, None] * unit
        centre = start - camera
    else:
        centre = start + offset[:, None] * unit
    half = spec.scale + (spec.end_scale - spec.scale) * t
    return centre, half, camera


def shape_area(shape: str, half_extent: np.ndarray | float) -> np.ndarray:
    """Exact area (px^2) of a shape of half-extent s (px)."""
    s = np.asarray(half_extent, dtype=np.float64)
    if shape == "circle":
        return math.pi * s**2
    if shape == "square":
        return 4.0 * s**2
    if shape == "triangle":
        return 3.0 * math.sqrt(3.0) / 4.0 * (TRIANGLE_R * s) ** 2
    raise SynthError(f"unknown shape {shape!r}")


def _pattern(bg: Background, u: np.ndarray, v: np.ndarray, size: int) -> np.ndarray:
    """Texture in [-1, 1] at world coordinates (u, v) in pixels."""
    x, y = u / size - 0.5, v / size - 0.5  # frame-relative, so the texture scales with `size`
    if bg.kind == "gradient":
        return (x * math.cos(bg.angle) + y * math.sin(bg.angle)) / math.sqrt(0.5)
    if bg.kind == "stripes":
        proj = x * math.cos(bg.angle) + y * math.sin(bg.angle)
        # tanh of a sine: flat bands with soft edges, smooth enough to need no anti-aliasing.
        return np.tanh(3.0 * np.sin(2 * math.pi * proj / bg.period + bg.phase)) / math.tanh(3.0)
    if bg.kind == "checker":
        prod = np.sin(2 * math.pi * x / bg.period + bg.phase) * np.sin(2 * math.pi * y / bg.period + bg.phase)
        return np.tanh(4.0 * prod) / math.tanh(4.0)
    if bg.kind == "noise":
        total = np.zeros(np.broadcast_shapes(np.shape(x), np.shape(y)))
        for angle, wavelength, phase, weight in bg.waves:
            total = total + weight * np.sin(2 * math.pi * (x * math.cos(angle) + y * math.sin(angle)) / wavelength
                                            + phase)
        return total / sum(w[3] for w in bg.waves)
    raise SynthError(f"unknown background kind {bg.kind!r}")


def render_background(bg: Background, size: int, camera_px: np.ndarray) -> np.ndarray:
    """float64 (F, size, size, 3) background seen by a camera at offsets `camera_px` (F, 2)."""
    centres = np.arange(size) + 0.5
    u = centres[None, None, :] + camera_px[:, 0, None, None]
    v = centres[None, :, None] + camera_px[:, 1, None, None]
    pattern = _pattern(bg, u, v, size)
    return np.asarray(bg.base)[None, None, None, :] + bg.amplitude * pattern[..., None]


def _inside(shape: str, dx: np.ndarray, dy: np.ndarray, s: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= s * s
    if shape == "square":
        return (np.abs(dx) <= s) & (np.abs(dy) <= s)
    # Equilateral triangle, apex up, circumradius R: inside all three edges, each at the inradius R / 2
    # along its outward normal (down, and 30 degrees above the horizontal on either side).
    r_in = 0.5 * TRIANGLE_R * s
    half_sqrt3 = 0.5 * math.sqrt(3.0)
    return (dy <= r_in) & (half_sqrt3 * dx - 0.5 * dy <= r_in) & (-half_sqrt3 * dx - 0.5 * dy <= r_in)


def coverage(shape: str, cx: float, cy: float, s: float, size: int) -> np.ndarray:
    """Share (0-1) of each pixel of a size x size frame covered by the shape (supersampled)."""
    out = np.zeros((size, size))
    ext = _extent(shape, s) + 1.0
    x0, x1 = max(0, math.floor(cx - ext)), min(size, math.ceil(cx + ext) + 1)
    y0, y1 = max(0, math.floor(cy - ext)), min(size, math.ceil(cy + ext) + 1)
    if x0 >= x1 or y0 >= y1:
        return out
    k = SUPERSAMPLE
    sub = (np.arange(k) + 0.5) / k
    xs = (np.arange(x0, x1)[:, None] + sub[None, :]).reshape(-1) - cx  # sample x positions, relative
    ys = (np.arange(y0, y1)[:, None] + sub[None, :]).reshape(-1) - cy
    hit = _inside(shape, xs[None, :], ys[:, None], s).astype(np.float64)  # (rows * k, cols * k)
    out[y0:y1, x0:x1] = hit.reshape(y1 - y0, k, x1 - x0, k).mean(axis=(1, 3))
    return out


def render_clip(spec: ClipSpec, size: int, frames: int) -> tuple[np.ndarray, dict]:
    """Render a clip: uint8 frames (F, size, size, 3) and its ground truth (pixels of these frames).

    Ground truth keys: shape, colour, rgb, motion, direction, background (kind), size, frames,
    centre [[x, y]] and half_extent [s] and area [px^2] per frame, camera [[x, y]] per frame (the pan
    offset), end_fixed_by_text (False: every distance is random), spec (to re-render exactly).
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise SynthError(f"size must be an int >= 8, got {size!r}")
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise SynthError(f"frames must be a positive int, got {frames!r}")
    if spec.shape not in SHAPES or spec.colour not in COLOURS:
        raise SynthError(f"unknown shape/colour {spec.shape!r}/{spec.colour!r}")
    centre, half, camera = trajectory(spec, frames)
    centre_px, half_px, camera_px = centre * size, half * size, camera * size
    if spec.motion == "pan":
        bg = render_background(spec.background, size, camera_px)
    else:  # static camera: draw the background once
        bg = np.broadcast_to(render_background(spec.background, size, camera_px[:1]), (frames, size, size, 3))
    rgb = np.asarray(spec.rgb, dtype=np.float64)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for k in range(frames):
        alpha = coverage(spec.shape, centre_px[k, 0], centre_px[k, 1], half_px[k], size)[..., None]
        out[k] = np.clip(np.rint(bg[k] * (1.0 - alpha) + rgb * alpha), 0, 255).astype(np.uint8)
    truth = {
        "shape": spec.shape,
        "colour": spec.colour,
        "rgb": list(spec.rgb),
        "motion": spec.motion,
        "direction": spec.direction,
        "background": spec.background.kind,
        "size": size,
        "frames": frames,
        "centre": centre_px.tolist(),
        "half_extent": half_px.tolist(),
        "area": shape_area(spec.shape, half_px).tolist(),
        "camera": camera_px.tolist(),
        "end_fixed_by_text": False,
        "spec": spec.to_dict(),
    }
    return out, truth


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int, index: int | None = None) -> np.random.Generator:
    return np.random.default_rng([seed, stream] if index is None else [seed, stream, index])


def _check_int(name: str, value: int, lo: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < lo:
        raise SynthError(f"{name} must be an int >= {lo}, got {value!r}")


def dump_truth(truth: dict) -> str:
    """Ground truth as JSON text: one top-level key per line, each value compact (per-frame lists stay short)."""
    lines = [f" {json.dumps(k)}: {json.dumps(v)}" for k, v in truth.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as fp:
        writer = csv.DictWriter(fp, fieldnames=["id", "path", "caption"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise SynthError(f"--out {out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise SynthError(f"--out {out}: folder is not empty (pass --overwrite to replace a synthetic set)")
        if not (out / "synth.json").is_file():
            # Never delete a folder this generator did not write.
            raise SynthError(f"--out {out}: not a synthetic set (no synth.json); refusing to overwrite it")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def split_ids(n: int, holdout: float, seed: int) -> np.ndarray:
    """Sorted indices of the held-out clips: round(holdout * n) of them (at least 1 when holdout > 0)."""
    if not 0.0 <= holdout < 1.0:
        raise SynthError(f"holdout must be in [0, 1), got {holdout!r}")
    k = 0 if holdout == 0 else max(1, round(holdout * n))
    if n and k >= n:
        raise SynthError(f"holdout {holdout} of {n} videos leaves no training clip")
    return np.sort(_rng(seed, 2).permutation(n)[:k])


def write_dataset(out: str | os.PathLike, videos: int, images: int, seed: int, size: int = 64, frames: int = 16,
                  fps: float = 4.0, holdout: float = 0.1, *, overwrite: bool = False,
                  log: Callable[[str], None] | None = None) -> dict:
    """Write a synthetic WebVid-layout set (see the module docstring); returns the summary in synth.json."""
    from PIL import Image

    from pdengine.engine.media import write_video

    _check_int("videos", videos, 0)
    _check_int("images", images, 0)
    _check_int("seed", seed, 0)
    _check_int("frames", frames, 1)
    _check_int("size", size, 8)
    if videos + images == 0:
        raise SynthError("nothing to write: --videos and --images are both 0")
    if size % 2:
        raise SynthError(f"size must be even (H.264 needs even sides), got {size}")
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise SynthError(f"fps must be a positive number, got {fps!r}")
    held = set(split_ids(videos, holdout, seed).tolist())
    out = Path(out)
    _prepare_out(out, overwrite)
    started = time.perf_counter()
    settings = {"generator_version": GENERATOR_VERSION, "seed": seed, "size": size, "frames": frames,
                "fps": float(fps), "holdout": holdout}
    # Written first, so an interrupted run leaves a folder that --overwrite recognises as ours.
    (out / "synth.json").write_text(json.dumps({**settings, "complete": False}, indent=1) + "\n", encoding="utf-8")

    train_rows, held_rows, kinds = [], [], {}
    if videos:
        (out / "videos").mkdir()
    for i in range(videos):
        rng = _rng(seed, 0, i)
        spec = sample_spec(rng, KIND_CYCLE[i % len(KIND_CYCLE)])
        clip, truth = render_clip(spec, size, frames)
        clip_id = f"clip{i:06d}"
        text = caption(spec, rng)
        truth = {"id": clip_id, "caption": text, "fps": float(fps), **truth}
        write_video(clip, out / "videos" / f"{clip_id}.mp4", "mp4", fps)
        (out / "videos" / f"{clip_id}.json").write_text(dump_truth(truth), encoding="utf-8")
        row = {"id": clip_id, "path": f"videos/{clip_id}.mp4", "caption": text}
        (held_rows if i in held else train_rows).append(row)
        kinds[spec.motion] = kinds.get(spec.motion, 0) + 1
        if log is not None and (i + 1) % 200 == 0:
            log(f"{i + 1}/{videos} videos")
    if videos:
        _write_csv(out / "train.csv", train_rows)
        _write_csv(out / "heldout.csv", held_rows)

    image_rows = []
    if images:
        (out / "images").mkdir()
    for i in range(images):
        rng = _rng(seed, 1, i)
        spec = sample_spec(rng, STILL)
        frame, _ = render_clip(spec, size, 1)
        image_id = f"img{i:06d}"
        Image.fromarray(frame[0], "RGB").save(out / "images" / f"{image_id}.png", format="PNG")
        image_rows.append({"id": image_id, "path": f"images/{image_id}.png", "caption": caption(spec, rng)})
    if images:
        _write_csv(out / "images.csv", image_rows)

    summary = {
        **settings, "complete": True, "videos": videos, "train_videos": len(train_rows), "heldout_videos": len(held_rows),
        "images": images, "motions": dict(sorted(kinds.items())),
        "tables": {"train": "train.csv" if videos else None, "heldout": "heldout.csv" if videos else None,
                   "images": "images.csv" if images else None},
    }
    (out / "synth.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    summary["seconds"] = time.perf_counter() - started  # not in synth.json: the file stays seed-determined
    return summary


# ---------------------------------------------------------------------------------------------
# CLI (registered by engine/cli.py; module level imports only click, numpy and the stdlib)
# ---------------------------------------------------------------------------------------------

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True}


@click.group("data", context_settings=CONTEXT)
def data_command() -> None:
    """Datasets: a synthetic video/image set with ground truth."""


@data_command.command("synth", context_settings=CONTEXT)
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Output folder.")
@click.option("--videos", default=1000, help="Video clips (train + held-out).")
@click.option("--images", default=1000, help="Single-frame image scenes.")
@click.option("--seed", default=0, help="Seed: the same seed gives the same set.")
@click.option("--size", default=64, help="Frame side in pixels (even).")
@click.option("--frames", default=16, help="Frames per clip.")
@click.option("--fps", default=4.0, help="Frame rate of the written clips.")
@click.option("--holdout", default=0.1, help="Share of the clips held out for evaluation (heldout.csv).")
@click.option("--overwrite", is_flag=True, help="Replace an existing synthetic set in --out.")
def synth_command(out, videos, images, seed, size, frames, fps, holdout, overwrite):
    """Coloured shapes moving as their captions say, in WebVid layout, with per-frame ground truth."""
    from pdengine.engine.media import MediaError

    try:
        s = write_dataset(out, videos, images, seed, size, frames, fps, holdout, overwrite=overwrite,
                          log=lambda m: click.echo(m, err=True))
    except (SynthError, MediaError) as e:
        raise click.ClickException(str(e)) from None
    click.echo(f"{s['train_videos']} train + {s['heldout_videos']} held-out videos, {s['images']} images "
               f"in {out} ({s['seconds']:.1f} s)")

